//! Conversations: one task per device conversation, hello -> audio channel -> pipeline ->
//! goodbye or timeout, and the manager that routes device JSON to them.
//!
//! * [`manager`]: a single dispatcher task that owns the table of live conversations
//!   (at most one per device). It classifies each device message once: `hello` starts a
//!   conversation (replacing any current one), `goodbye` ends it, everything else goes to
//!   the conversation's bounded control queue.
//! * [`conversation`]: the task of one conversation.
//!
//! Goodbye semantics (PROTOCOL.md section 4): when the device says goodbye we close
//! without answering; when we end a conversation (pipeline finished, idle timeout,
//! shutdown) the device gets `{"type":"goodbye","session_id":...}`; a replaced
//! conversation or a disconnected device gets nothing.

pub mod call_leg;
pub mod conversation;
pub mod device_mcp;
pub mod directory;
pub mod manager;

use std::sync::Arc;

use bytes::Bytes;

use crate::broker::registry::DeviceRegistry;
use crate::protocol::mac::Mac;

pub use manager::{SessionDeps, SessionManager};

/// Where JSON for devices goes: the local registry here; an external broker when the
/// gateway runs behind one.
pub trait DeviceSink: Send + Sync + 'static {
    /// Queues a message for the device; false if it was dropped (and counted).
    fn send_to_device(&self, mac: &Mac, payload: Bytes) -> bool;
}

impl DeviceSink for DeviceRegistry {
    fn send_to_device(&self, mac: &Mac, payload: Bytes) -> bool {
        self.send(mac, payload).is_ok()
    }
}

/// A conversation's own control stream to the device (QUIC), preferred over MQTT while
/// it is open.
pub trait ControlStream: Send + Sync + 'static {
    /// Queues a message on the stream; false if the stream is not (or no longer) there,
    /// and the message should go by MQTT.
    fn try_send(&self, payload: &Bytes) -> bool;
}

/// Sends JSON to one device.
#[derive(Clone)]
pub struct DeviceOut {
    pub mac: Mac,
    sink: Arc<dyn DeviceSink>,
    stream: Option<Arc<dyn ControlStream>>,
}

impl DeviceOut {
    pub fn new(mac: Mac, sink: Arc<dyn DeviceSink>) -> Self {
        DeviceOut {
            mac,
            sink,
            stream: None,
        }
    }

    /// The same device, preferring `stream` whenever it is open.
    pub fn with_stream(&self, stream: Arc<dyn ControlStream>) -> Self {
        DeviceOut {
            stream: Some(stream),
            ..self.clone()
        }
    }

    /// Queues a JSON message for the device.
    pub fn send_json(&self, json: String) -> bool {
        let payload = Bytes::from(json);
        if let Some(stream) = &self.stream
            && stream.try_send(&payload)
        {
            return true;
        }
        self.sink.send_to_device(&self.mac, payload)
    }
}

/// Which audio transports conversations may get (`transport.*`, `quic.enabled`).
#[derive(Debug, Clone, Default)]
pub struct TransportPolicy {
    /// Offer AES-128-GCM over UDP to devices announcing `udp_aead`.
    pub udp_aead: bool,
    /// Groups that may not fall back to AES-128-CTR.
    pub require_authenticated: std::collections::HashSet<String>,
}

/// Why a conversation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndReason {
    /// The device said goodbye.
    DeviceGoodbye,
    /// The device's MQTT connection ended.
    DeviceDisconnected,
    /// The device said hello again.
    Replaced,
    /// No audio either way for `udp.idle_timeout_secs`.
    Idle,
    /// The pipeline ended it.
    PipelineFinished,
    /// The pipeline failed.
    PipelineFailed(String),
    /// The gateway is shutting down.
    Shutdown,
    /// An admin ended it (`goodbye` command).
    Admin,
    /// The device closed its QUIC connection (or lost it).
    DeviceClosedTransport,
    /// The device reported that its audio channel timed out (`{"type":"udp_timeout"}`,
    /// sent by some firmware forks): the speech server's conversation is closed and the
    /// device told, as the Node gateway does.
    DeviceUdpTimeout,
    /// The device call this conversation carried ended (the other party left, nobody
    /// answered, the longest call duration passed).
    CallEnded,
}

impl EndReason {
    /// Whether the device should be told (`goodbye`): only when we end it and the device
    /// is still there to hear it. A QUIC connection that ended may have been lost rather
    /// than closed, so the device hears it over MQTT too.
    pub fn tell_device(&self) -> bool {
        matches!(
            self,
            EndReason::Idle
                | EndReason::PipelineFinished
                | EndReason::PipelineFailed(_)
                | EndReason::Shutdown
                | EndReason::Admin
                | EndReason::DeviceClosedTransport
                | EndReason::DeviceUdpTimeout
                | EndReason::CallEnded
        )
    }

    /// Whether the device itself went away (or its channel did): a call it is being
    /// rung for ends. A replacing hello does not count: a rung device says hello to take
    /// the call.
    pub fn is_departure(&self) -> bool {
        matches!(
            self,
            EndReason::DeviceGoodbye
                | EndReason::DeviceDisconnected
                | EndReason::Idle
                | EndReason::DeviceClosedTransport
                | EndReason::DeviceUdpTimeout
        )
    }

    pub fn label(&self) -> &'static str {
        match self {
            EndReason::DeviceGoodbye => "device_goodbye",
            EndReason::DeviceDisconnected => "device_disconnected",
            EndReason::Replaced => "replaced",
            EndReason::Idle => "idle",
            EndReason::PipelineFinished => "pipeline_finished",
            EndReason::PipelineFailed(_) => "pipeline_failed",
            EndReason::Shutdown => "shutdown",
            EndReason::Admin => "admin",
            EndReason::DeviceClosedTransport => "device_closed_transport",
            EndReason::DeviceUdpTimeout => "device_udp_timeout",
            EndReason::CallEnded => "call_ended",
        }
    }
}
