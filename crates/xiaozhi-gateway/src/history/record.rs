//! One chat-history record, as the recorder produces it and the writer stores it.
//!
//! A record carries its own random id, so that writing it twice (a journal replayed
//! after a crash, a batch retried after a timeout) is detected by the store and has no
//! effect. Audio travels as the Opus packets of the utterance; the writer decodes them
//! to the WAV that manager-api's `ai_agent_chat_audio` holds, only if the device's
//! policy keeps audio.

use rand::Rng;
use serde::{Deserialize, Serialize};

use super::opus_packets::OpusPackets;

/// `ai_agent_chat_history.chat_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "u8", try_from = "u8")]
pub enum ChatType {
    /// What the user said (the `stt` text).
    User = 1,
    /// What the assistant said (a `tts sentence_start` text).
    Assistant = 2,
    /// A tool call or its result, as a one-element JSON array.
    Tool = 3,
}

impl From<ChatType> for u8 {
    fn from(t: ChatType) -> u8 {
        t as u8
    }
}

impl TryFrom<u8> for ChatType {
    type Error = String;
    fn try_from(v: u8) -> Result<Self, String> {
        match v {
            1 => Ok(ChatType::User),
            2 => Ok(ChatType::Assistant),
            3 => Ok(ChatType::Tool),
            other => Err(format!("unknown chat_type {other}")),
        }
    }
}

/// The audio of one utterance, as received.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpusAudio {
    /// Sample rate the sender announced (the decoder outputs 16 kHz whatever it is).
    pub sample_rate: u32,
    /// Opus packets in order.
    pub packets: OpusPackets,
}

/// One row to be (with its audio).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatRecord {
    /// 32 hex characters; makes writes idempotent.
    pub record_id: String,
    /// The device's MAC, colon form (as manager-api stores it).
    pub mac_address: String,
    /// The session id the device got in its hello.
    pub session_id: String,
    pub chat_type: ChatType,
    pub content: String,
    pub audio: Option<OpusAudio>,
    /// When it was said, unix milliseconds.
    pub created_at_ms: i64,
}

impl ChatRecord {
    pub fn new(
        mac_address: String,
        session_id: String,
        chat_type: ChatType,
        content: String,
        audio: Option<OpusAudio>,
        created_at_ms: i64,
    ) -> Self {
        ChatRecord {
            record_id: new_id(),
            mac_address,
            session_id,
            chat_type,
            content,
            audio,
            created_at_ms,
        }
    }
}

/// A random 32-hex-digit id (the form `ai_agent_chat_audio.id` takes).
pub fn new_id() -> String {
    let bytes: [u8; 16] = rand::rng().random();
    hex::encode(bytes)
}

/// Unix time in milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
