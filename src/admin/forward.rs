//! Scale-out: admin commands that reach a node other than the one holding the device.
//!
//! With an external broker each admin command reaches one node of the shared
//! subscription group, chosen by the broker, not by where the device is. That node asks
//! the presence store (Redis) which node holds the device and, if it is another one,
//! forwards the command there over the bus (`xiaozhi/nodes/<owner>/commands`) in an
//! [`Envelope`] that carries the reply address it already resolved. The owner runs the
//! command as its own and answers the admin directly: one hop more, one reply, and the
//! admin never learns there are nodes. A forwarded command is never forwarded again, so
//! a stale presence entry costs one `device_offline` reply, not a loop.
//!
//! The management API forwards the same way ([`Forwarder::call`]) and waits for the
//! owner's reply on its own `xiaozhi/nodes/<node>/replies/<call>` topic.
//!
//! Why shared subscriptions plus forwarding rather than every node reading every
//! command: exactly one node answers each command, including commands for devices no
//! node holds (which every node would otherwise ignore, leaving the admin to time out),
//! and the broker fans each command out once instead of once per node. The price is the
//! extra hop when the command lands on the wrong node ((N-1)/N of the time with N nodes).
//! ARCHITECTURE.md has the numbers.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::sync::oneshot;

use crate::broker::bus::{Bus, BusCommand};
use crate::broker::topics;
use crate::metrics::Metrics;
use crate::presence::PresenceState;
use crate::presence::tracker::PresenceTracker;
use crate::protocol::mac::Mac;

/// Calls the management API may have waiting for another node at once.
pub const MAX_PENDING_CALLS: usize = 4096;

/// An admin command on its way from the node that received it to the node that holds
/// the device.
#[derive(Debug, Serialize, Deserialize)]
pub struct Envelope<'a> {
    /// The command's original topic (`xiaozhi/admin/commands/<mac_>`).
    pub topic: String,
    /// The command as the admin published it (a JSON object).
    #[serde(borrow)]
    pub command: &'a RawValue,
    /// Where the owner sends its reply.
    pub reply_topic: String,
    /// MQTT 5 correlation data for the reply, base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_data: Option<String>,
    /// The node that forwarded it (named in the reply's `via`).
    pub from: String,
}

/// Why an envelope could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvelopeError {
    #[error("not a forwarded-command envelope: {0}")]
    Json(String),
    #[error("correlation_data is not base64")]
    Correlation,
}

/// The envelope for `command` (the admin's payload, already known to be JSON).
pub fn encode(
    topic: &str,
    command: &[u8],
    reply_topic: &str,
    correlation_data: Option<&[u8]>,
    from: &str,
) -> Option<Vec<u8>> {
    let command: &RawValue = serde_json::from_slice(command).ok()?;
    serde_json::to_vec(&Envelope {
        topic: topic.to_owned(),
        command,
        reply_topic: reply_topic.to_owned(),
        correlation_data: correlation_data.map(|c| B64.encode(c)),
        from: from.to_owned(),
    })
    .ok()
}

/// The command an envelope carries, as the owner runs it.
pub fn decode(payload: &[u8]) -> Result<BusCommand, EnvelopeError> {
    let envelope: Envelope =
        serde_json::from_slice(payload).map_err(|e| EnvelopeError::Json(e.to_string()))?;
    let correlation_data = match envelope.correlation_data {
        Some(c) => Some(Bytes::from(
            B64.decode(c).map_err(|_| EnvelopeError::Correlation)?,
        )),
        None => None,
    };
    let command = BusCommand {
        topic: envelope.topic,
        payload: Bytes::copy_from_slice(envelope.command.get().as_bytes()),
        response_topic: Some(envelope.reply_topic),
        correlation_data,
        forwarded_by: Some(envelope.from),
    };
    Ok(command)
}

/// Management-API calls waiting for another node's reply, by call number.
#[derive(Default)]
pub struct PendingCalls {
    next: AtomicU64,
    waiting: Mutex<HashMap<u64, oneshot::Sender<Bytes>>>,
}

/// A registered call; dropping it (answered or timed out) forgets the call.
pub struct PendingCall<'a> {
    pub id: u64,
    pub reply: oneshot::Receiver<Bytes>,
    calls: &'a PendingCalls,
}

impl Drop for PendingCall<'_> {
    fn drop(&mut self) {
        self.calls.lock().remove(&self.id);
    }
}

impl PendingCalls {
    /// A new call, unless [`MAX_PENDING_CALLS`] are already waiting.
    pub fn register(&self) -> Option<PendingCall<'_>> {
        let mut waiting = self.lock();
        if waiting.len() >= MAX_PENDING_CALLS {
            return None;
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, reply) = oneshot::channel();
        waiting.insert(id, tx);
        Some(PendingCall {
            id,
            reply,
            calls: self,
        })
    }

    /// Hands a reply to its call; false if nobody waits for it (late or unknown).
    pub fn complete(&self, id: u64, payload: Bytes) -> bool {
        let tx = self.lock().remove(&id);
        tx.is_some_and(|tx| tx.send(payload).is_ok())
    }

    /// Calls waiting now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, oneshot::Sender<Bytes>>> {
        // Every critical section is one insert or remove: poisoning cannot leave it torn.
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Why a forwarded call got no answer.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CallError {
    #[error("node {0} did not answer within {1:?}")]
    Timeout(String, Duration),
    #[error("too many calls waiting for other nodes")]
    Busy,
    #[error("the command could not be encoded")]
    Encode,
}

/// Finds the device's node and forwards commands there (scale-out mode only).
pub struct Forwarder {
    pub node: String,
    bus: Bus,
    presence: PresenceTracker,
    pub calls: std::sync::Arc<PendingCalls>,
    metrics: std::sync::Arc<Metrics>,
    /// How long the presence store may take to say where a device is.
    lookup_timeout: Duration,
}

impl Forwarder {
    pub fn new(
        node: String,
        bus: Bus,
        presence: PresenceTracker,
        calls: std::sync::Arc<PendingCalls>,
        metrics: std::sync::Arc<Metrics>,
        lookup_timeout: Duration,
    ) -> Self {
        Forwarder {
            node,
            bus,
            presence,
            calls,
            metrics,
            lookup_timeout,
        }
    }

    /// The other node that holds `mac` according to the presence store, if any. `None`
    /// when the store says nobody (or this node) holds it, or cannot say in time: the
    /// command then runs here and answers from what this node knows.
    pub async fn owner_elsewhere(&self, mac: Mac) -> Option<String> {
        let colon = mac.colon();
        let lookup = self.presence.store().get(&colon);
        let record = match tokio::time::timeout(self.lookup_timeout, lookup).await {
            Ok(Ok(record)) => record?,
            _ => {
                Metrics::inc(&self.metrics.admin_forward_lookup_failed);
                return None;
            }
        };
        (record.state != PresenceState::Offline && record.node != self.node).then_some(record.node)
    }

    /// Sends a command received from the bus on to `owner`, which replies to
    /// `reply_topic` itself.
    pub fn forward(&self, owner: &str, command: &BusCommand, reply_topic: &str) -> bool {
        let Some(envelope) = encode(
            &command.topic,
            &command.payload,
            reply_topic,
            command.correlation_data.as_deref(),
            &self.node,
        ) else {
            return false;
        };
        Metrics::inc(&self.metrics.admin_commands_forwarded);
        self.bus
            .publish(topics::node_commands(owner), Bytes::from(envelope));
        true
    }

    /// Runs `command` (an admin command's JSON, for the device of `topic`) on `owner` and
    /// returns its reply payload.
    pub async fn call(
        &self,
        owner: &str,
        topic: &str,
        command: &[u8],
        timeout: Duration,
    ) -> Result<Bytes, CallError> {
        let mut call = self.calls.register().ok_or(CallError::Busy)?;
        let reply_topic = topics::node_reply(&self.node, call.id);
        let envelope =
            encode(topic, command, &reply_topic, None, &self.node).ok_or(CallError::Encode)?;
        Metrics::inc(&self.metrics.admin_commands_forwarded);
        self.bus
            .publish(topics::node_commands(owner), Bytes::from(envelope));
        match tokio::time::timeout(timeout, &mut call.reply).await {
            Ok(Ok(payload)) => Ok(payload),
            _ => {
                Metrics::inc(&self.metrics.admin_forward_timeouts);
                Err(CallError::Timeout(owner.to_owned(), timeout))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_round_trip_the_command_and_its_reply_address() {
        let command = br#"{"request_id":"r-1","command":"status"}"#;
        let bytes = encode(
            "xiaozhi/admin/commands/aa_bb_cc_dd_ee_ff",
            command,
            "ops/replies/1",
            Some(b"\x00\xffcorr"),
            "gw-a",
        )
        .unwrap();
        let decoded = decode(&bytes).unwrap();
        assert_eq!(decoded.forwarded_by.as_deref(), Some("gw-a"));
        assert_eq!(decoded.topic, "xiaozhi/admin/commands/aa_bb_cc_dd_ee_ff");
        assert_eq!(&decoded.payload[..], &command[..]);
        assert_eq!(decoded.response_topic.as_deref(), Some("ops/replies/1"));
        assert_eq!(
            decoded.correlation_data.as_deref(),
            Some(&b"\x00\xffcorr"[..])
        );
    }

    #[test]
    fn bad_envelopes_are_refused() {
        assert!(encode("t", b"not json", "r", None, "n").is_none());
        assert!(matches!(decode(b"{}"), Err(EnvelopeError::Json(_))));
        assert!(matches!(decode(b"\xff"), Err(EnvelopeError::Json(_))));
        let bad_corr =
            br#"{"topic":"t","command":{},"reply_topic":"r","correlation_data":"!!","from":"n"}"#;
        assert_eq!(decode(bad_corr).unwrap_err(), EnvelopeError::Correlation);
    }

    #[test]
    fn calls_complete_once_and_are_forgotten_when_dropped() {
        let calls = PendingCalls::default();
        let mut a = calls.register().unwrap();
        let b = calls.register().unwrap();
        assert_ne!(a.id, b.id);
        assert!(calls.complete(a.id, Bytes::from_static(b"x")));
        assert_eq!(a.reply.try_recv().unwrap(), Bytes::from_static(b"x"));
        assert!(!calls.complete(a.id, Bytes::new()), "answered once");
        let b_id = b.id;
        drop(b);
        assert!(!calls.complete(b_id, Bytes::new()), "timed out: forgotten");
        drop(a);
        assert!(calls.is_empty());
    }

    #[test]
    fn pending_calls_are_bounded() {
        let calls = PendingCalls::default();
        let held: Vec<_> = (0..MAX_PENDING_CALLS)
            .map(|_| calls.register().unwrap())
            .collect();
        assert!(calls.register().is_none());
        drop(held);
        assert!(calls.register().is_some());
    }
}
