//! Commands and calls between the nodes of a cluster, as they travel on the bus: the
//! [`Envelope`] a node wraps an admin command in to send it on to the device's node
//! (`xiaozhi/nodes/<node>/commands`), and the management-API calls a node waits on for
//! another node's reply (`xiaozhi/nodes/<node>/replies/<n>`).
//!
//! The bus reads and writes these; deciding *where* a command goes (asking presence which
//! node holds the device) is `crate::admin::forward`'s, a layer up.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::sync::oneshot;

use super::bus::BusCommand;

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
