//! Talking demo devices: a fleet that keeps having conversations, for trying the web
//! console (`xiaozhi-gateway demo`) and for its end-to-end test.
//!
//! Each device connects as the firmware does (signed credentials, MCP answered by the
//! simulator's firmware-faithful MCP server), then repeats: a conversation of a few
//! turns in `auto` listening mode through the speech server (the gateway relays it, so
//! every turn becomes chat history with audio), a goodbye, a pause. A device that the
//! gateway disconnects (an operator's "disconnect") comes back after
//! [`DemoDevice::reconnect_after`], as real devices do.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::json;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use super::audio::{ServerHello, SimAudio, synthetic_frame};
use super::device::{DeviceCredentials, SimDevice, SimError};
use xiaozhi_gateway::history::record::now_ms;

/// What the demo's speech server says, turn by turn: Chinese and English, short and
/// long, so the console shows how it wraps and mixes scripts.
pub fn demo_dialogue() -> Vec<(String, String)> {
    [
        ("今天天气怎么样？", "今天晴，最高气温二十三度，适合出门散步。"),
        ("What time is it in Shenzhen?", "It is a quarter past three in the afternoon in Shenzhen."),
        (
            "给我讲一个关于小猫钓鱼的故事，要长一点，讲给五岁的孩子听。",
            "从前有一只小猫，它跟着妈妈去河边钓鱼。一会儿蝴蝶飞过来，它就去追蝴蝶；一会儿蜻蜓飞过来，它又去捉蜻蜓，结果一条鱼也没钓到。妈妈告诉它，做事要一心一意，后来小猫认真钓鱼，终于钓到了一条大鱼。",
        ),
        ("Turn the volume down a little.", "Done: the volume is now 40."),
    ]
    .into_iter()
    .map(|(a, b)| (a.to_owned(), b.to_owned()))
    .collect()
}

/// How one demo device behaves.
#[derive(Debug, Clone)]
pub struct DemoDevice {
    pub mqtt: SocketAddr,
    pub credentials: DeviceCredentials,
    /// Turns per conversation.
    pub turns: u32,
    /// Frames spoken per turn (must match the speech server's `frames_per_turn`).
    pub frames_per_turn: u32,
    /// Pause between conversations.
    pub pause: Duration,
    /// Wait before connecting again after the connection was lost.
    pub reconnect_after: Duration,
}

/// Frame duration the demo devices speak with.
pub const FRAME_MS: u32 = 60;

impl DemoDevice {
    /// Runs until `stop`; never returns early on errors (they are logged and retried).
    pub async fn run(self, stop: CancellationToken) {
        let mac = self.credentials.mac.colon();
        loop {
            let result = tokio::select! {
                _ = stop.cancelled() => return,
                r = self.connected_life(&stop) => r,
            };
            match result {
                Ok(()) => return,
                Err(e) => info!(%mac, error = %e, "demo device lost its connection; reconnecting"),
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(self.reconnect_after) => {}
            }
        }
    }

    /// One connection: conversations until the connection fails (or `stop`).
    async fn connected_life(&self, stop: &CancellationToken) -> Result<(), SimError> {
        let mut dev = SimDevice::connect(self.mqtt, self.credentials.clone()).await?;
        loop {
            self.conversation(&mut dev).await?;
            tokio::select! {
                _ = stop.cancelled() => {
                    dev.disconnect().await;
                    return Ok(());
                }
                _ = tokio::time::sleep(self.pause) => {}
            }
            if dev.is_closed() {
                return Err(SimError::Protocol("connection closed".into()));
            }
        }
    }

    /// One conversation: hello, `turns` turns, goodbye.
    async fn conversation(&self, dev: &mut SimDevice) -> Result<(), SimError> {
        let (session, mut audio) = open_conversation(dev).await?;
        for turn in 0..self.turns {
            speak_turn(
                dev,
                &mut audio,
                &session,
                turn * self.frames_per_turn,
                self.frames_per_turn,
            )
            .await?;
        }
        dev.publish_json(&json!({"session_id": session, "type": "goodbye"}))
            .await?;
        debug!(session, "demo conversation done");
        Ok(())
    }
}

/// Says hello, waits for the server's, and opens the UDP channel.
pub async fn open_conversation(dev: &mut SimDevice) -> Result<(String, SimAudio), SimError> {
    dev.publish_json(&SimDevice::firmware_hello()).await?;
    let hello = dev.recv_type("hello", Duration::from_secs(10)).await?;
    let hello = ServerHello::parse(&hello)?;
    let audio = SimAudio::open(&hello, ([127, 0, 0, 1], 0).into()).await?;
    Ok((hello.session_id, audio))
}

/// When the device heard the reply to a turn: unix ms of the server's `stt` (what the
/// user said) and of its `tts stop` (the answer complete).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TurnHeard {
    pub stt_at_ms: i64,
    pub stop_at_ms: i64,
}

/// One user turn in `auto` mode: `listen start`, `frames` frames at the frame pace,
/// then the whole reply (until `tts stop`). Frame numbers start at `first_frame`.
pub async fn speak_turn(
    dev: &mut SimDevice,
    audio: &mut SimAudio,
    session: &str,
    first_frame: u32,
    frames: u32,
) -> Result<TurnHeard, SimError> {
    dev.publish_json(
        &json!({"session_id": session, "type": "listen", "state": "start", "mode": "auto"}),
    )
    .await?;
    // As on the device: the first frame leaves one frame duration after `listen start`,
    // when the microphone has captured it.
    for i in 0..frames {
        tokio::time::sleep(Duration::from_millis(u64::from(FRAME_MS))).await;
        let index = first_frame + i;
        audio
            .send(index * FRAME_MS, &synthetic_frame(index, 40))
            .await?;
    }
    let mut stt_at_ms = None;
    loop {
        let (_, payload) = dev.recv(Duration::from_secs(10)).await?;
        let message: serde_json::Value = serde_json::from_slice(&payload).unwrap_or_default();
        match (message["type"].as_str(), message["state"].as_str()) {
            (Some("stt"), _) => stt_at_ms = Some(now_ms()),
            (Some("tts"), Some("stop")) => {
                let stop_at_ms = now_ms();
                return Ok(TurnHeard {
                    stt_at_ms: stt_at_ms.unwrap_or(stop_at_ms),
                    stop_at_ms,
                });
            }
            _ => {}
        }
    }
}
