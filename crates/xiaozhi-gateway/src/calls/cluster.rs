//! Calling across the nodes of a cluster: the actions the call book plans go to the node
//! that holds each device (`xiaozhi/nodes/<node>/calls`), and the audio of a call whose
//! devices are on two nodes travels between their legs on
//! `xiaozhi/nodes/<node>/call-audio/<call>/<mac_>` as `udp_aead` datagrams sealed with
//! AES-128-GCM under the call's own key (QoS 0 like the device's own UDP): the key is in
//! the call book only, never in these messages, so the broker and its other clients see
//! ciphertext.
//!
//! manager-api's own multi-backend router gives up on such calls
//! (`CROSS_BACKEND_CALL_UNSUPPORTED`); here they are ordinary calls, because the book is
//! shared (Redis) and every node can reach every other through the bus.

use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::broker::inbound::CallTraffic;
use crate::metrics::Metrics;
use crate::protocol::call_book::CallAction;
use crate::protocol::mac::Mac;
use crate::session::call_leg::CallLegs;

/// An action on its way to the device's node: the action itself (tagged by `action`),
/// and for a bridged leg the node that holds its peer.
#[derive(Debug, Serialize, Deserialize)]
struct Envelope {
    #[serde(flatten)]
    action: CallAction,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    peer_node: Option<String>,
}

/// The envelope of `action` (with the peer's node for a bridged leg).
pub fn encode(action: &CallAction, peer_node: Option<&str>) -> Bytes {
    let envelope = Envelope {
        action: action.clone(),
        peer_node: peer_node.map(str::to_owned),
    };
    // Plain values always serialize.
    Bytes::from(serde_json::to_vec(&envelope).unwrap_or_default())
}

/// The action an envelope carries, and the peer's node for a bridged leg.
pub fn decode(payload: &[u8]) -> Result<(CallAction, Option<String>), serde_json::Error> {
    let envelope: Envelope = serde_json::from_slice(payload)?;
    Ok((envelope.action, envelope.peer_node))
}

/// What the bus delivers to this node about calls: actions go to the calling service's
/// queue, audio straight to the leg it is for.
pub struct ClusterInbound {
    pub legs: Arc<CallLegs>,
    pub actions: mpsc::Sender<Bytes>,
    pub metrics: Arc<Metrics>,
}

impl CallTraffic for ClusterInbound {
    fn action(&self, payload: Bytes) {
        if self.actions.try_send(payload).is_err() {
            Metrics::inc(&self.metrics.call_actions_malformed);
        }
    }

    fn audio(&self, call: u64, mac: Mac, payload: Bytes) {
        // Opened (authenticated) by the leg, which holds the call's key.
        self.legs.deliver_remote(mac, call, payload);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mac(n: u8) -> Mac {
        Mac::from_octets([4, 0, 0, 0, 0, n])
    }

    #[test]
    fn every_action_survives_its_envelope() {
        for (action, node) in [
            (
                CallAction::Ring {
                    target: mac(1),
                    call: 3,
                    caller_nickname: "奶奶".into(),
                },
                None,
            ),
            (
                CallAction::Leg {
                    device: mac(1),
                    call: 3,
                    peer: mac(2),
                    bridged: true,
                },
                Some("gw-b".to_owned()),
            ),
            (
                CallAction::Leg {
                    device: mac(1),
                    call: 3,
                    peer: mac(2),
                    bridged: false,
                },
                None,
            ),
            (
                CallAction::Accepted {
                    caller: mac(1),
                    callee: mac(2),
                    call: 3,
                },
                None,
            ),
            (
                CallAction::HangUp {
                    device: mac(2),
                    call: 9,
                },
                None,
            ),
        ] {
            let bytes = encode(&action, node.as_deref());
            assert_eq!(decode(&bytes).unwrap(), (action, node));
        }
        assert!(decode(b"{\"action\":\"dance\"}").is_err());
        assert!(decode(b"\xff").is_err());
    }
}
