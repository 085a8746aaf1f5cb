//! The recorder of one conversation: turns relayed traffic into chat-history records.
//!
//! * A user row per `stt` text from the speech server, with the uplink Opus of that
//!   utterance: the frames since the device last started listening (at most
//!   `max_utterance` of the most recent ones).
//! * An assistant row per `tts sentence_start` text, with the downlink Opus that follows
//!   it until the next sentence or `tts stop`; written when the sentence is complete.
//! * A tool row (chat_type 3, a one-element JSON array) per `tools/call` the speech
//!   server sends the device, and one per result the device returns.
//!
//! The recorder never blocks the relay: it builds records and hands them to the writer's
//! queue. Recording a frame allocates nothing per frame: each utterance's frames go into
//! one [`OpusPackets`] buffer that grows by doubling, a dozen or so allocations per
//! utterance. (Sizing each utterance's buffer from the last one saved those and cost
//! ~15 KB of RSS per talking device, measured: docs/benchmarks.md, Round 2.)

use std::collections::HashMap;

use serde_json::{Value, json};

use super::opus_packets::OpusPackets;
use super::record::{ChatRecord, ChatType, OpusAudio, now_ms};
use super::writer::HistoryHandle;
use crate::protocol::control::AudioParams;

/// Records one conversation.
pub struct ConversationRecorder {
    history: HistoryHandle,
    mac_address: String,
    session_id: String,
    uplink_rate: u32,
    downlink_rate: u32,
    /// Most uplink packets kept per utterance (the most recent ones).
    max_user_packets: usize,
    /// Most downlink packets kept per sentence (the first ones).
    max_sentence_packets: usize,
    user_audio: OpusPackets,
    user_started_ms: Option<i64>,
    sentence: Option<Sentence>,
    /// `tools/call` requests waiting for their result: id -> tool name.
    tool_calls: HashMap<String, String>,
}

struct Sentence {
    text: String,
    started_ms: i64,
    packets: OpusPackets,
}

impl ConversationRecorder {
    /// `uplink` and `downlink`: each direction's audio (the device's hello, the
    /// server's); `max_utterance_ms`: the most audio kept per utterance, turned into
    /// packets with each direction's frame duration.
    pub fn new(
        history: HistoryHandle,
        mac_address: String,
        session_id: String,
        uplink: &AudioParams,
        downlink: &AudioParams,
        max_utterance_ms: u64,
    ) -> Self {
        ConversationRecorder {
            history,
            mac_address,
            session_id,
            uplink_rate: uplink.sample_rate,
            downlink_rate: downlink.sample_rate,
            max_user_packets: packets_for(max_utterance_ms, uplink.frame_duration),
            max_sentence_packets: packets_for(max_utterance_ms, downlink.frame_duration),
            user_audio: OpusPackets::default(),
            user_started_ms: None,
            sentence: None,
            tool_calls: HashMap::new(),
        }
    }

    /// An uplink Opus frame from the device.
    pub fn uplink(&mut self, opus: &[u8]) {
        if self.user_audio.len() >= self.max_user_packets {
            self.user_audio.pop_front();
        }
        self.user_started_ms.get_or_insert_with(now_ms);
        self.user_audio.push(opus);
    }

    /// A downlink Opus frame from the speech server.
    pub fn downlink(&mut self, opus: &[u8]) {
        if let Some(sentence) = &mut self.sentence
            && sentence.packets.len() < self.max_sentence_packets
        {
            sentence.packets.push(opus);
        }
    }

    /// The device started listening: a new utterance begins.
    pub fn listen_start(&mut self) {
        self.user_audio.clear();
        self.user_started_ms = None;
    }

    /// A JSON message from the speech server (already parsed).
    pub fn server_message(&mut self, message: &Value) {
        let kind = message.get("type").and_then(Value::as_str).unwrap_or("");
        let text = message.get("text").and_then(Value::as_str);
        match (kind, message.get("state").and_then(Value::as_str)) {
            ("stt", _) => {
                if let Some(text) = text.filter(|t| !t.trim().is_empty()) {
                    let packets = std::mem::take(&mut self.user_audio);
                    let at = self.user_started_ms.take().unwrap_or_else(now_ms);
                    let audio = (!packets.is_empty()).then_some(OpusAudio {
                        sample_rate: self.uplink_rate,
                        packets,
                    });
                    self.emit(ChatType::User, text.to_owned(), audio, at);
                }
            }
            ("tts", Some("sentence_start")) => {
                self.finish_sentence();
                if let Some(text) = text.filter(|t| !t.trim().is_empty()) {
                    self.sentence = Some(Sentence {
                        text: text.to_owned(),
                        started_ms: now_ms(),
                        packets: OpusPackets::default(),
                    });
                }
            }
            ("tts", Some("stop")) => self.finish_sentence(),
            ("mcp", _) => {
                if let Some(payload) = message.get("payload") {
                    self.server_mcp(payload);
                }
            }
            _ => {}
        }
    }

    /// An MCP payload the device sent toward the speech server (already routed).
    pub fn device_mcp(&mut self, payload: &Value) {
        let Some(id) = payload.get("id").map(id_key) else {
            return;
        };
        let Some(name) = self.tool_calls.remove(&id) else {
            return;
        };
        let outcome = payload
            .get("result")
            .or_else(|| payload.get("error"))
            .cloned()
            .unwrap_or(Value::Null);
        let content = json!([{ "tool_call_id": id, "name": name, "content": outcome }]);
        self.emit(ChatType::Tool, content.to_string(), None, now_ms());
    }

    fn server_mcp(&mut self, payload: &Value) {
        if payload.get("method").and_then(Value::as_str) != Some("tools/call") {
            return;
        }
        let Some(id) = payload.get("id").map(id_key) else {
            return;
        };
        let params = payload.get("params").cloned().unwrap_or(Value::Null);
        let name = params
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        let arguments = params.get("arguments").cloned().unwrap_or(json!({}));
        let content = json!([{
            "id": id,
            "type": "function",
            "function": { "name": name, "arguments": arguments.to_string() },
        }]);
        if self.tool_calls.len() < 256 {
            self.tool_calls.insert(id, name);
        }
        self.emit(ChatType::Tool, content.to_string(), None, now_ms());
    }

    fn finish_sentence(&mut self) {
        if let Some(sentence) = self.sentence.take() {
            let audio = (!sentence.packets.is_empty()).then_some(OpusAudio {
                sample_rate: self.downlink_rate,
                packets: sentence.packets,
            });
            self.emit(
                ChatType::Assistant,
                sentence.text,
                audio,
                sentence.started_ms,
            );
        }
    }

    fn emit(&mut self, chat_type: ChatType, content: String, audio: Option<OpusAudio>, at: i64) {
        self.history.record(ChatRecord::new(
            self.mac_address.clone(),
            self.session_id.clone(),
            chat_type,
            content,
            audio,
            at,
        ));
    }
}

impl Drop for ConversationRecorder {
    /// A conversation that ends mid-sentence still records what was said.
    fn drop(&mut self) {
        self.finish_sentence();
    }
}

/// Packets of `frame_ms` that hold `max_ms` of audio (at least one).
fn packets_for(max_ms: u64, frame_ms: u32) -> usize {
    usize::try_from(max_ms / u64::from(frame_ms.max(1)))
        .unwrap_or(usize::MAX)
        .max(1)
}

fn id_key(id: &Value) -> String {
    match id {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_is_the_configured_duration_in_each_directions_frames() {
        // 120 s of the firmware's 60 ms frames, and of a server's 20 ms ones.
        assert_eq!(packets_for(120_000, 60), 2_000);
        assert_eq!(packets_for(120_000, 20), 6_000);
        assert_eq!(packets_for(0, 60), 1);
        assert_eq!(packets_for(120_000, 0), 120_000);
    }
}
