//! Conversation turns through a speech server, for measuring the relay.
//!
//! Each simulated device opens a conversation in `auto` listening mode and repeats
//! turns: it speaks `frames_per_turn` frames at the frame pace, then waits for the
//! reply (`stt`, `tts start`, audio, `tts stop`). Against the mock xiaozhi-server with
//! stamped frames ([`super::upstream::MockUpstreamConfig::stamp_frames`]), every reply
//! frame carries the wall-clock time the server sent it, so the device measures the
//! latency the gateway adds on the way down: server write -> gateway -> UDP -> device.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::json;
use tokio::sync::Semaphore;

use super::Percentiles;
use super::audio::synthetic_frame;
use super::upstream::{stamped_reply, unix_micros};

/// What to simulate.
#[derive(Debug, Clone)]
pub struct TurnConfig {
    pub mqtt: SocketAddr,
    pub signature_key: Option<String>,
    pub devices: u32,
    /// How long each device keeps taking turns.
    pub duration: Duration,
    /// Frames the device speaks per turn (the mock answers after this many).
    pub frames_per_turn: u32,
    /// Reply frames the mock sends per turn.
    pub reply_frames: u32,
    pub frame_ms: u32,
    pub connect_rate: u32,
    pub first_device: u32,
    pub group: String,
    /// Watch the gateway's `/ws/admin` feed (URL, bearer token) and measure how long
    /// after the device received each `stt` its row was stored and pushed.
    pub history_feed: Option<(String, String)>,
    /// The audio transport devices ask for.
    pub transport: super::audio::Transport,
}

impl Default for TurnConfig {
    fn default() -> Self {
        TurnConfig {
            mqtt: ([127, 0, 0, 1], 1883).into(),
            signature_key: None,
            devices: 10,
            duration: Duration::from_secs(10),
            frames_per_turn: 5,
            reply_frames: 5,
            frame_ms: 60,
            connect_rate: 500,
            first_device: 0,
            group: "GID_sim".into(),
            history_feed: None,
            transport: super::audio::Transport::Ctr,
        }
    }
}

/// What a turns run measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TurnReport {
    pub devices: u32,
    pub connected: u32,
    pub conversations: u32,
    pub turns: u64,
    pub reply_frames: u64,
    /// Reply frames whose payload was not a stamped mock frame.
    pub unstamped_frames: u64,
    /// Reply frames expected but not received before `tts stop` plus a grace period.
    pub missing_frames: u64,
    pub hello: Percentiles,
    /// Server send -> device receive, per reply frame.
    pub relay: Percentiles,
    /// Device receives `stt` -> its chat-history row is stored and on `/ws/admin`.
    pub history: Percentiles,
    /// `stt` texts whose row never showed up on the feed.
    pub history_missing: u64,
    pub errors: Vec<String>,
    pub wall_secs: f64,
}

impl std::fmt::Display for TurnReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "devices:        {} started, {} connected, {} in conversation",
            self.devices, self.connected, self.conversations
        )?;
        writeln!(
            f,
            "hello latency:  p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms (through the upstream)",
            self.hello.p50_ms, self.hello.p99_ms, self.hello.max_ms
        )?;
        writeln!(
            f,
            "relay latency:  p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms (server send -> device, {} frames)",
            self.relay.p50_ms, self.relay.p99_ms, self.relay.max_ms, self.relay.count
        )?;
        writeln!(
            f,
            "turns:          {} completed, {} reply frames, {} missing, {} unstamped",
            self.turns, self.reply_frames, self.missing_frames, self.unstamped_frames
        )?;
        if self.history.count > 0 || self.history_missing > 0 {
            writeln!(
                f,
                "history:        p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms (stt -> row stored and pushed, {} rows, {} missing)",
                self.history.p50_ms,
                self.history.p99_ms,
                self.history.max_ms,
                self.history.count,
                self.history_missing
            )?;
        }
        if !self.errors.is_empty() {
            writeln!(
                f,
                "errors:         {} (first: {})",
                self.errors.len(),
                self.errors[0]
            )?;
        }
        write!(f, "wall time:      {:.1} s", self.wall_secs)
    }
}

type SttTimes = Arc<std::sync::Mutex<std::collections::HashMap<(String, String), Instant>>>;

/// Collects `(session_id, content) -> arrival` for user rows from `/ws/admin`.
async fn watch_feed(
    url: String,
    token: String,
    seen: SttTimes,
    ready: tokio::sync::oneshot::Sender<Result<(), String>>,
) {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = match url.as_str().into_client_request() {
        Ok(r) => r,
        Err(e) => {
            let _ = ready.send(Err(e.to_string()));
            return;
        }
    };
    if let Ok(v) = format!("Bearer {token}").parse() {
        request.headers_mut().insert("authorization", v);
    }
    let host = request.uri().host().unwrap_or("127.0.0.1").to_owned();
    let port = request.uri().port_u16().unwrap_or(80);
    let stream = match tokio::net::TcpStream::connect((host.as_str(), port)).await {
        Ok(s) => s,
        Err(e) => {
            let _ = ready.send(Err(format!("history feed: {e}")));
            return;
        }
    };
    let mut ws = match tokio_tungstenite::client_async(request, stream).await {
        Ok((ws, _)) => ws,
        Err(e) => {
            let _ = ready.send(Err(format!("history feed: {e}")));
            return;
        }
    };
    let _ = ready.send(Ok(()));
    while let Some(Ok(message)) = ws.next().await {
        let Ok(text) = message.to_text() else {
            continue;
        };
        let Ok(v) = serde_json::from_str::<serde_json::Value>(text) else {
            continue;
        };
        if v["type"] == "chat_update" && v["chat_type"] == 1 {
            let key = (
                v["session_id"].as_str().unwrap_or_default().to_owned(),
                v["content"].as_str().unwrap_or_default().to_owned(),
            );
            seen.lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(key, Instant::now());
        }
    }
}

#[derive(Default)]
struct DeviceTurns {
    connected: bool,
    conversation: bool,
    hello: Option<Duration>,
    turns: u64,
    frames: u64,
    unstamped: u64,
    missing: u64,
    relay: Vec<Duration>,
    /// `(session_id, stt text) -> when the device received it`.
    stt: Vec<((String, String), Instant)>,
    error: Option<String>,
}

/// Runs the devices and reports.
pub async fn run_turns(config: TurnConfig) -> TurnReport {
    let started = Instant::now();
    let feed: SttTimes = Arc::default();
    let mut feed_task = None;
    if let Some((url, token)) = config.history_feed.clone() {
        let (ready_tx, ready) = tokio::sync::oneshot::channel();
        feed_task = Some(tokio::spawn(watch_feed(url, token, feed.clone(), ready_tx)));
        if let Ok(Err(e)) = ready.await {
            return TurnReport {
                devices: config.devices,
                errors: vec![e],
                ..TurnReport::default()
            };
        }
    }
    let config = Arc::new(config);
    let handshakes = Arc::new(Semaphore::new(256));
    let gap = Duration::from_secs_f64(1.0 / f64::from(config.connect_rate.max(1)));
    let mut tasks = Vec::with_capacity(config.devices as usize);
    for i in 0..config.devices {
        let config = config.clone();
        let handshakes = handshakes.clone();
        tasks.push(tokio::spawn(async move {
            let mut r = DeviceTurns::default();
            if let Err(e) = one_device(&config, config.first_device + i, &handshakes, &mut r).await
            {
                r.error = Some(e);
            }
            r
        }));
        tokio::time::sleep(gap).await;
    }
    let mut report = TurnReport {
        devices: config.devices,
        ..TurnReport::default()
    };
    let (mut hellos, mut relay, mut stt) = (Vec::new(), Vec::new(), Vec::new());
    for t in tasks {
        let r = t.await.unwrap_or_else(|e| DeviceTurns {
            error: Some(e.to_string()),
            ..Default::default()
        });
        report.connected += u32::from(r.connected);
        report.conversations += u32::from(r.conversation);
        report.turns += r.turns;
        report.reply_frames += r.frames;
        report.unstamped_frames += r.unstamped;
        report.missing_frames += r.missing;
        hellos.extend(r.hello);
        relay.extend(r.relay);
        stt.extend(r.stt);
        if let Some(e) = r.error {
            report.errors.push(e);
        }
    }
    report.hello = Percentiles::of(hellos);
    report.relay = Percentiles::of(relay);
    if let Some(task) = feed_task {
        // The last rows may still be on their way.
        tokio::time::sleep(Duration::from_millis(500)).await;
        task.abort();
        let seen = feed.lock().unwrap_or_else(|p| p.into_inner());
        let mut delays = Vec::new();
        for (key, at) in stt {
            match seen.get(&key) {
                Some(stored) => delays.push(stored.saturating_duration_since(at)),
                None => report.history_missing += 1,
            }
        }
        report.history = Percentiles::of(delays);
    }
    report.wall_secs = started.elapsed().as_secs_f64();
    report
}

async fn one_device(
    config: &TurnConfig,
    n: u32,
    handshakes: &Semaphore,
    r: &mut DeviceTurns,
) -> Result<(), String> {
    let opened = super::open_conversation(
        super::ConversationTarget {
            mqtt: config.mqtt,
            signature_key: config.signature_key.as_deref(),
            group: &config.group,
            udp_bind: ([127, 0, 0, 1], 0).into(),
            mode: "auto",
            transport: config.transport,
            firmware: crate::simulator::firmware::Firmware::default(),
        },
        n,
        handshakes,
        &mut r.connected,
    )
    .await?;
    r.hello = Some(opened.hello_latency);
    r.conversation = true;
    let (mut device, hello, mut audio) = (opened.device, opened.hello, opened.audio);

    let frame = Duration::from_millis(u64::from(config.frame_ms));
    let end = Instant::now() + config.duration;
    let mut index = 0u32;
    while Instant::now() < end {
        for i in 0..config.frames_per_turn {
            if i > 0 {
                tokio::time::sleep(frame).await;
            }
            audio
                .send(index * config.frame_ms, &synthetic_frame(index, 40))
                .await
                .map_err(|e| e.to_string())?;
            index += 1;
        }
        // The reply: audio over UDP until tts stop arrives over MQTT (plus a grace
        // period for datagrams still in flight).
        let mut got = 0u32;
        let mut stop_seen: Option<tokio::time::Instant> = None;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let until = stop_seen
                .map(|t| t + Duration::from_millis(200))
                .unwrap_or(deadline)
                .min(deadline);
            tokio::select! {
                frame = audio.recv(Duration::from_secs(10)) => {
                    let Some(frame) = frame.map_err(|e| e.to_string())? else { continue };
                    let now = unix_micros();
                    match stamped_reply(&frame.opus) {
                        Some((_, _, sent)) => r.relay.push(Duration::from_micros(now.saturating_sub(sent))),
                        None => r.unstamped += 1,
                    }
                    r.frames += 1;
                    got += 1;
                    if got >= config.reply_frames && stop_seen.is_some() {
                        break;
                    }
                }
                msg = device.recv(Duration::from_secs(10)), if stop_seen.is_none() => {
                    let (_, payload) = msg.map_err(|e| format!("reply: {e}"))?;
                    let Ok(msg) = serde_json::from_slice::<serde_json::Value>(&payload) else { continue };
                    if msg["type"] == "stt" {
                        let text = msg["text"].as_str().unwrap_or_default().to_owned();
                        r.stt.push(((hello.session_id.clone(), text), Instant::now()));
                    }
                    if msg["type"] == "tts" && msg["state"] == "stop" {
                        stop_seen = Some(tokio::time::Instant::now());
                        if got >= config.reply_frames {
                            break;
                        }
                    }
                }
                _ = tokio::time::sleep_until(until) => break,
            }
        }
        if stop_seen.is_none() {
            return Err(format!("no reply to turn {} within 10 s", r.turns + 1));
        }
        r.missing += u64::from(config.reply_frames.saturating_sub(got));
        r.turns += 1;
    }
    let _ = device
        .publish_json(&json!({"session_id": hello.session_id, "type": "goodbye"}))
        .await;
    device.disconnect().await;
    Ok(())
}
