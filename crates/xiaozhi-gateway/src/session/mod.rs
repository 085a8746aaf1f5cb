//! Conversations: one task per device conversation, hello -> audio channel -> pipeline ->
//! goodbye or timeout, and the manager that routes device JSON to them.
//!
//! * [`manager`]: a single dispatcher task that owns the table of live conversations
//!   (at most one per device). It classifies each device message once and asks the rules
//!   (`crate::protocol::session`, sans-IO, unit- and property-tested): `hello` starts a
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
/// Why a conversation ended (a rule of `crate::protocol::session`).
pub use crate::protocol::session::EndReason;
pub use manager::{SessionDeps, SessionManager};

/// Which audio transports conversations may get (`transport.*`, `quic.enabled`).
#[derive(Debug, Clone, Default)]
pub struct TransportPolicy {
    /// Offer AES-128-GCM over UDP to devices announcing `udp_aead`.
    pub udp_aead: bool,
    /// Groups that may not fall back to AES-128-CTR.
    pub require_authenticated: std::collections::HashSet<String>,
}
