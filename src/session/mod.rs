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
pub mod directory;
pub mod manager;

pub use crate::device_link::{DeviceOut, DeviceSink};
pub use manager::{SessionDeps, SessionManager};

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
