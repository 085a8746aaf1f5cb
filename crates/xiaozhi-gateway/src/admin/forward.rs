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

use std::time::Duration;

use bytes::Bytes;

use crate::broker::bus::{Bus, BusCommand};
pub use crate::broker::forwarding::{Envelope, EnvelopeError, PendingCalls, decode, encode};
use crate::metrics::Metrics;
use crate::presence::PresenceState;
use crate::presence::tracker::PresenceTracker;
use crate::protocol::mac::Mac;
use crate::protocol::topics;

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
