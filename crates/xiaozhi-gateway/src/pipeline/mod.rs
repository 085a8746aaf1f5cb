//! Speech pipelines: what a conversation's audio and JSON are relayed to.
//!
//! A [`Pipeline`] is opened once per device hello and yields an [`Opened`]
//! conversation: the session id and downlink audio parameters to put in the device's
//! hello, and a [`Conversation`] that then runs with the channel's I/O
//! ([`ConversationIo`]). The shape fits both the built-in [`echo`] pipeline and a
//! xiaozhi-server upstream (one WebSocket per conversation, whose own hello supplies the
//! session id and audio parameters).
//!
//! A conversation ends when `run` returns (the pipeline hung up: the session sends the
//! device a goodbye) or when the session ends it (device goodbye, disconnect, idle,
//! replacement or shutdown): then `ConversationIo::stop` is cancelled and `run` has a
//! moment to hang up cleanly before it is dropped, so implementations must also release
//! everything on drop.

pub mod echo;
pub mod xiaozhi;

use std::net::SocketAddr;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::audio::{Downlink, UplinkFrame};
use crate::device_link::DeviceOut;
use crate::device_link::mcp::DeviceMcp;
use crate::protocol::control::{AudioParams, DeviceMessage, HelloRequest};
use crate::protocol::credentials::DeviceIdentity;

/// What a pipeline is told when a device says hello.
#[derive(Debug, Clone)]
pub struct OpenRequest {
    pub device: Arc<DeviceIdentity>,
    pub hello: HelloRequest,
    /// The device's address as its MQTT connection came from.
    pub remote: Option<SocketAddr>,
}

/// A conversation a pipeline agreed to run.
pub struct Opened {
    /// The session id the device gets in its hello (and must echo in its messages).
    pub session_id: String,
    /// Audio parameters of the downlink, for the device's hello.
    pub downlink_audio: AudioParams,
    pub conversation: Box<dyn Conversation>,
}

/// Why a pipeline could not open a conversation; the device is shown the message.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct PipelineError {
    pub message: String,
}

/// A device control message for the conversation (anything but hello and goodbye).
#[derive(Debug, Clone)]
pub struct ControlMessage {
    pub message: DeviceMessage,
    /// The parsed JSON, for relaying.
    pub json: Value,
    /// The payload exactly as the device sent it.
    pub raw: Bytes,
}

/// The I/O of one running conversation.
pub struct ConversationIo {
    pub session_id: String,
    /// Decrypted uplink Opus frames.
    pub uplink: mpsc::Receiver<UplinkFrame>,
    /// Device JSON addressed to this conversation.
    pub control: mpsc::Receiver<ControlMessage>,
    /// Encrypts and sends downlink Opus frames.
    pub downlink: Downlink,
    /// Sends JSON to the device.
    pub device: DeviceOut,
    /// Audio parameters the device sends with (uplink).
    pub uplink_audio: AudioParams,
    /// Audio parameters announced for the downlink.
    pub downlink_audio: AudioParams,
    /// The device's MCP client (routes MCP between the device and the pipeline).
    pub mcp: Option<Arc<DeviceMcp>>,
    /// Cancelled when the session ends the conversation: hang up and return.
    pub stop: CancellationToken,
    /// Records the conversation's chat history, when enabled.
    pub recorder: Option<crate::history::recorder::ConversationRecorder>,
}

/// How a conversation ended from the pipeline's side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConversationEnd {
    /// The pipeline finished the conversation normally.
    Finished,
    /// The pipeline failed; the device is shown this.
    Failed(String),
}

/// Opens conversations.
#[async_trait]
pub trait Pipeline: Send + Sync + 'static {
    /// Short name for logs (`echo`, `xiaozhi`).
    fn name(&self) -> &'static str;
    async fn open(&self, request: OpenRequest) -> Result<Opened, PipelineError>;
}

/// One conversation's logic.
///
/// It borrows the conversation's I/O rather than owning it: the channel and its queues
/// belong to the session, which keeps them when the pipeline is done with them (a
/// conversation that becomes a call leg goes on with the same channel).
#[async_trait]
pub trait Conversation: Send + 'static {
    async fn run(self: Box<Self>, io: &mut ConversationIo) -> ConversationEnd;
}
