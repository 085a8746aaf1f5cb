//! A running upstream conversation: device audio and JSON up, server audio and JSON down.
//!
//! One task reads the WebSocket and the device's queues; a writer task owns the
//! WebSocket's sending half, so a slow upstream never stalls the downlink. What waits
//! for the writer is bounded: uplink audio in a ring that drops the *oldest* frames
//! (counted) when the upstream falls behind, because late speech is worth less than
//! current speech; device JSON in a small queue (dropped and counted when full).
//!
//! MCP from the server goes through the device's MCP client, which answers
//! `initialize` / `tools/list` from its cache and keeps request ids apart. A server
//! that closes while it owes the device a reply, or whose connection breaks, ends the
//! conversation as failed, so the device gets an alert and a goodbye, never silence.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tracing::debug;

use super::UpstreamSocket;
use super::audio_queue::{DropOldest, Next};
use crate::audio::frame_slab::FrameSlab;
use crate::metrics::Metrics;
use crate::pipeline::{Conversation, ConversationEnd, ConversationIo};
use crate::protocol::control::{DeviceMessage, ListenState};
use crate::protocol::upstream::{self, TurnTracker, UplinkClock};

/// Bytes of encoded uplink frames the relay's slab holds before it starts over (the
/// writer normally sends each before the next arrives).
const UPLINK_SLAB_BYTES: usize = 1024;

/// Device JSON messages waiting for a slow upstream.
const TEXT_QUEUE: usize = 64;

/// A conversation relayed to one xiaozhi-server WebSocket.
pub struct XiaozhiConversation {
    ws: UpstreamSocket,
    audio_buffer_frames: usize,
    metrics: Arc<Metrics>,
}

impl XiaozhiConversation {
    pub fn new(ws: UpstreamSocket, audio_buffer_frames: usize, metrics: Arc<Metrics>) -> Self {
        XiaozhiConversation {
            ws,
            audio_buffer_frames,
            metrics,
        }
    }
}

/// Aborts the writer if the conversation is dropped mid-way.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[async_trait]
impl Conversation for XiaozhiConversation {
    async fn run(self: Box<Self>, io: &mut ConversationIo) -> ConversationEnd {
        let XiaozhiConversation {
            ws,
            audio_buffer_frames,
            metrics,
        } = *self;
        let (sink, mut stream) = ws.split();
        let (text_tx, text_rx) = mpsc::channel(TEXT_QUEUE);
        let audio_tx = Arc::new(DropOldest::new(audio_buffer_frames));
        let mut writer = AbortOnDrop(tokio::spawn(write_loop(
            sink,
            text_rx,
            audio_tx.clone(),
            metrics.clone(),
        )));
        let send_text = |text: String| {
            if text_tx.try_send(Message::text(text)).is_err() {
                Metrics::inc(&metrics.upstream_text_dropped);
            }
        };

        let frame_ms = io.uplink_audio.frame_duration;
        let mut clock = UplinkClock::default();
        let mut turn = TurnTracker::default();
        let mut frame_buf = Vec::new();
        // Owned copies for the writer, without an allocation per frame.
        let mut frames = FrameSlab::new(UPLINK_SLAB_BYTES);
        // End of the user's speech, while the reply's first audio is awaited.
        let mut awaiting_reply: Option<std::time::Instant> = None;
        // A finished JoinHandle must not be polled again (tokio panics): remember it.
        let mut writer_done = false;
        let end = loop {
            tokio::select! {
                biased;
                _ = io.stop.cancelled() => {
                    let _ = text_tx.try_send(Message::Close(Some(CloseFrame {
                        code: CloseCode::Normal,
                        reason: "device ended the conversation".into(),
                    })));
                    break ConversationEnd::Finished;
                }
                message = stream.next() => match message {
                    Some(Ok(Message::Binary(frame))) => match upstream::decode_audio(&frame) {
                        Ok(audio) => {
                            let opus = &frame[audio.payload];
                            if let Some(recorder) = &mut io.recorder {
                                recorder.downlink(opus);
                            }
                            io.downlink.send(audio.timestamp, opus).await;
                            if let Some(since) = awaiting_reply.take() {
                                Metrics::observe(&metrics.histograms.first_audio, since.elapsed());
                            }
                        }
                        Err(e) => {
                            Metrics::inc(&metrics.upstream_malformed);
                            debug!(error = %e, "upstream audio frame dropped");
                        }
                    },
                    Some(Ok(Message::Text(text))) => {
                        let kind = on_server_text(&text, io, &mut turn, &metrics, &send_text);
                        if kind == ServerText::Stt {
                            awaiting_reply.get_or_insert_with(std::time::Instant::now);
                        }
                    }
                    Some(Ok(Message::Close(frame))) => {
                        let code = frame.as_ref().map(|f| f.code);
                        let abnormal = code.is_some_and(|c| c != CloseCode::Normal && c != CloseCode::Away);
                        if turn.mid_turn() || abnormal {
                            Metrics::inc(&metrics.upstream_failed_midway);
                            let why = frame.map(|f| format!(" ({} {})", f.code, f.reason)).unwrap_or_default();
                            break ConversationEnd::Failed(format!(
                                "the speech server ended the conversation before replying{why}"
                            ));
                        }
                        break ConversationEnd::Finished;
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => {
                        Metrics::inc(&metrics.upstream_failed_midway);
                        break ConversationEnd::Failed(format!("lost the speech server: {e}"));
                    }
                    None => {
                        Metrics::inc(&metrics.upstream_failed_midway);
                        break ConversationEnd::Failed("lost the speech server: connection closed".into());
                    }
                },
                control = io.control.recv() => match control {
                    Some(control) => {
                        match &control.message {
                            DeviceMessage::Listen { state: ListenState::Stop, .. } => {
                                turn.on_listen_stop();
                                awaiting_reply.get_or_insert_with(std::time::Instant::now);
                            }
                            DeviceMessage::Listen { state: ListenState::Start, .. } => {
                                if let Some(recorder) = &mut io.recorder {
                                    recorder.listen_start();
                                }
                            }
                            DeviceMessage::Abort { .. } => {
                                turn.on_abort();
                                awaiting_reply = None;
                            }
                            DeviceMessage::Other { kind, .. } if kind == "mcp" => {
                                if let (Some(recorder), Some(payload)) = (&mut io.recorder, control.json.get("payload")) {
                                    recorder.device_mcp(payload);
                                }
                            }
                            _ => {}
                        }
                        match String::from_utf8(control.raw.to_vec()) {
                            Ok(text) => send_text(text),
                            Err(_) => Metrics::inc(&metrics.control_malformed),
                        }
                    }
                    None => break ConversationEnd::Finished,
                },
                frame = io.uplink.recv() => match frame {
                    Some(frame) => {
                        if let Some(recorder) = &mut io.recorder {
                            recorder.uplink(&frame.opus);
                        }
                        let timestamp = clock.timestamp(frame.sequence, frame_ms);
                        upstream::encode_audio(timestamp, &frame.opus, &mut frame_buf);
                        // If the writer has stopped, the loop learns it from `writer`.
                        audio_tx.push(frames.copy(&frame_buf));
                    }
                    None => break ConversationEnd::Finished,
                },
                result = &mut writer.0, if !writer_done => {
                    writer_done = true;
                    // The writer only stops on a send error or after a close frame.
                    let why = result.map(|_| "the speech server stopped taking data").unwrap_or("writer failed");
                    Metrics::inc(&metrics.upstream_failed_midway);
                    break ConversationEnd::Failed(format!("lost the speech server: {why}"));
                }
            }
        };
        // Let the writer flush what is queued (the close frame included), briefly.
        drop(text_tx);
        audio_tx.close();
        if !writer_done {
            let _ =
                tokio::time::timeout(std::time::Duration::from_millis(500), &mut writer.0).await;
        }
        end
    }
}

/// What kind of server text frame was handled, as far as latency tracking cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ServerText {
    /// The server's transcript of the user's speech: the speech has ended.
    Stt,
    Other,
}

/// A text frame from the server: MCP through the device's MCP client, everything else
/// to the device as it came.
fn on_server_text(
    text: &Utf8Bytes,
    io: &mut ConversationIo,
    turn: &mut TurnTracker,
    metrics: &Metrics,
    send_text: &impl Fn(String),
) -> ServerText {
    let Ok(value) = serde_json::from_str::<Value>(text) else {
        Metrics::inc(&metrics.upstream_malformed);
        debug!("upstream text frame is not JSON; dropped");
        return ServerText::Other;
    };
    let kind = value.get("type").and_then(Value::as_str).unwrap_or("");
    let handled = if kind == "stt" {
        ServerText::Stt
    } else {
        ServerText::Other
    };
    turn.on_server_message(kind, value.get("state").and_then(Value::as_str));
    if let Some(recorder) = &mut io.recorder {
        recorder.server_message(&value);
    }
    if kind == "mcp"
        && let Some(mcp) = &io.mcp
        && let Some(payload) = value.get("payload").filter(|p| p.is_object())
    {
        if let Some(answer) = mcp.on_upstream_payload(payload.clone()) {
            Metrics::inc(&metrics.mcp_cache_answers);
            send_text(
                json!({"type": "mcp", "session_id": io.session_id, "payload": answer}).to_string(),
            );
        }
        return handled;
    }
    io.device.send_json(text.as_str().to_owned());
    handled
}

/// Owns the WebSocket's sending half: device JSON first, then audio; stops after a
/// close frame or when both queues are closed.
async fn write_loop(
    mut sink: SplitSink<UpstreamSocket, Message>,
    mut text: mpsc::Receiver<Message>,
    audio: Arc<DropOldest<Bytes>>,
    metrics: Arc<Metrics>,
) {
    let mut audio_open = true;
    loop {
        let message = tokio::select! {
            biased;
            m = text.recv() => match m {
                Some(m) => m,
                None => break,
            },
            a = audio.next(), if audio_open => match a {
                Next::Item(frame) => Message::Binary(frame),
                Next::Dropped(n) => {
                    Metrics::add(&metrics.upstream_audio_dropped, n);
                    continue;
                }
                Next::Closed => {
                    audio_open = false;
                    continue;
                }
            },
        };
        let closing = matches!(message, Message::Close(_));
        if sink.send(message).await.is_err() {
            return;
        }
        if closing {
            break;
        }
    }
    let _ = sink.close().await;
}
