//! A device simulator that speaks exactly as xiaozhi firmware does, for tests and load.
//!
//! * [`device`]: the MQTT side (CONNECT with manager-api style credentials, QoS 0 JSON
//!   to `device-server`, no SUBSCRIBE).
//! * [`audio`]: the UDP side (nonce template, sequence from 1, AES-CTR with the header as
//!   IV, the firmware's downlink checks; or AES-GCM for a device announcing `udp_aead`).
//! * [`quic`]: the QUIC side, for a device announcing `quic`.
//! * [`firmware`]: which firmware a device runs (2.4 by default, or 1.x), its hello, and
//!   the 2.4 rules for server messages (server hello, `glyph_push`), so a run reports
//!   every message a real device would have refused.
//! * [`run`]: N devices at once, each holding one conversation in `realtime` listening
//!   mode and streaming synthetic 60 ms Opus frames that carry their index, so every
//!   echoed frame can be matched to when it was sent. Prints hello latency, audio round
//!   trip and loss. Like the firmware, a device whose gateway goes away connects again
//!   (to the next of the given gateway addresses, as a load balancer would send it) and
//!   carries on with a new conversation.

pub mod audio;
pub mod demo;
pub mod device;
pub mod firmware;
pub mod mcp;
pub mod quic;
pub mod turns;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::json;
use tokio::sync::Semaphore;

use self::audio::{ServerHello, SimLink, Transport, frame_index, synthetic_frame};
use self::device::{DeviceCredentials, SimDevice, SimDeviceOptions};
use self::firmware::Firmware;

/// What to simulate.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Device MQTT addresses of the gateway nodes: device `i` starts at `i % len` and, when
    /// its node goes away, tries the next.
    pub mqtt: Vec<SocketAddr>,
    /// Signature key to sign passwords with; `None` for a gateway in unsigned mode.
    pub signature_key: Option<String>,
    pub devices: u32,
    /// How long each device streams audio.
    pub stream_for: Duration,
    /// Opus frame duration.
    pub frame_ms: u32,
    /// Bytes per synthetic Opus frame.
    pub frame_bytes: usize,
    /// Devices started per second (ramp-up).
    pub connect_rate: u32,
    /// Group part of the client id.
    pub group: String,
    /// First device number (so two runs can use disjoint MACs).
    pub first_device: u32,
    /// Local address UDP sockets bind to.
    pub udp_bind: SocketAddr,
    /// The audio transport devices ask for.
    pub transport: Transport,
    /// The firmware devices run (2.4: strict; a refused server message is an error).
    pub firmware: Firmware,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            mqtt: vec![([127, 0, 0, 1], 1883).into()],
            signature_key: None,
            devices: 10,
            stream_for: Duration::from_secs(10),
            frame_ms: 60,
            frame_bytes: 60,
            connect_rate: 500,
            group: "GID_sim".into(),
            first_device: 0,
            udp_bind: ([127, 0, 0, 1], 0).into(),
            transport: Transport::Ctr,
            firmware: Firmware::default(),
        }
    }
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Percentiles {
    pub count: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Percentiles {
    pub fn of(mut samples: Vec<Duration>) -> Percentiles {
        if samples.is_empty() {
            return Percentiles::default();
        }
        samples.sort_unstable();
        let at = |q: f64| {
            let i = ((samples.len() as f64 - 1.0) * q).round() as usize;
            samples[i].as_secs_f64() * 1000.0
        };
        Percentiles {
            count: samples.len(),
            p50_ms: at(0.5),
            p99_ms: at(0.99),
            max_ms: at(1.0),
        }
    }
}

/// What a run measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SimReport {
    pub devices: u32,
    pub connected: u32,
    pub conversations: u32,
    pub errors: Vec<String>,
    pub hello: Percentiles,
    pub round_trip: Percentiles,
    pub frames_sent: u64,
    pub frames_echoed: u64,
    pub frames_lost: u64,
    pub loss_percent: f64,
    /// Downlink datagrams the firmware's checks would have dropped.
    pub downlink_rejected: u64,
    /// Times a device lost its gateway and connected again.
    pub reconnects: u64,
    pub wall_secs: f64,
}

impl std::fmt::Display for SimReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "devices:        {} started, {} connected, {} in conversation",
            self.devices, self.connected, self.conversations
        )?;
        writeln!(
            f,
            "hello latency:  p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            self.hello.p50_ms, self.hello.p99_ms, self.hello.max_ms
        )?;
        writeln!(
            f,
            "audio round trip: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} frames)",
            self.round_trip.p50_ms,
            self.round_trip.p99_ms,
            self.round_trip.max_ms,
            self.round_trip.count
        )?;
        writeln!(
            f,
            "frames:         {} sent, {} echoed, {} lost ({:.3}% loss), {} rejected by firmware checks",
            self.frames_sent,
            self.frames_echoed,
            self.frames_lost,
            self.loss_percent,
            self.downlink_rejected
        )?;
        if self.reconnects > 0 {
            writeln!(f, "reconnects:     {}", self.reconnects)?;
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

#[derive(Default)]
struct DeviceResult {
    connected: bool,
    conversation: bool,
    hello: Option<Duration>,
    rtts: Vec<Duration>,
    sent: u64,
    echoed: u64,
    rejected: u64,
    reconnects: u64,
    error: Option<String>,
}

/// How long a device that lost its gateway keeps trying to connect again.
const RECONNECT_FOR: Duration = Duration::from_secs(30);
/// Pause between its attempts.
const RECONNECT_PAUSE: Duration = Duration::from_secs(1);

/// Runs the simulation and reports.
pub async fn run(config: SimConfig) -> SimReport {
    let started = Instant::now();
    let config = Arc::new(config);
    // Bounds how many devices are in the connect+hello phase at once.
    let handshakes = Arc::new(Semaphore::new(256));
    let mut tasks = Vec::with_capacity(config.devices as usize);
    let gap = Duration::from_secs_f64(1.0 / f64::from(config.connect_rate.max(1)));
    for i in 0..config.devices {
        let config = config.clone();
        let handshakes = handshakes.clone();
        tasks.push(tokio::spawn(async move {
            let mut result = DeviceResult::default();
            if let Err(e) =
                one_device(&config, config.first_device + i, &handshakes, &mut result).await
            {
                result.error = Some(e);
            }
            result
        }));
        tokio::time::sleep(gap).await;
    }
    let mut report = SimReport {
        devices: config.devices,
        ..SimReport::default()
    };
    let (mut hellos, mut rtts) = (Vec::new(), Vec::new());
    for t in tasks {
        let r = t.await.unwrap_or_else(|e| DeviceResult {
            error: Some(e.to_string()),
            ..Default::default()
        });
        report.connected += u32::from(r.connected);
        report.conversations += u32::from(r.conversation);
        hellos.extend(r.hello);
        rtts.extend(r.rtts);
        report.frames_sent += r.sent;
        report.frames_echoed += r.echoed;
        report.downlink_rejected += r.rejected;
        report.reconnects += r.reconnects;
        if let Some(e) = r.error {
            report.errors.push(e);
        }
    }
    report.hello = Percentiles::of(hellos);
    report.round_trip = Percentiles::of(rtts);
    report.frames_lost = report.frames_sent.saturating_sub(report.frames_echoed);
    report.loss_percent = if report.frames_sent == 0 {
        0.0
    } else {
        report.frames_lost as f64 * 100.0 / report.frames_sent as f64
    };
    report.wall_secs = started.elapsed().as_secs_f64();
    report
}

async fn one_device(
    config: &SimConfig,
    n: u32,
    handshakes: &Semaphore,
    result: &mut DeviceResult,
) -> Result<(), String> {
    let frames = (config.stream_for.as_millis() / u128::from(config.frame_ms.max(1))) as usize;
    let mut stream = Stream {
        sent_at: Vec::with_capacity(frames),
        seen: vec![false; frames],
        frames,
    };
    let nodes = config.mqtt.len().max(1);
    let mut node = n as usize % nodes;
    let mut lost_since: Option<Instant> = None;
    loop {
        let opened = open_conversation(
            ConversationTarget {
                mqtt: config.mqtt[node],
                signature_key: config.signature_key.as_deref(),
                group: &config.group,
                udp_bind: config.udp_bind,
                mode: "realtime",
                transport: config.transport,
                firmware: config.firmware,
            },
            n,
            handshakes,
            &mut result.connected,
        )
        .await;
        let opened = match (opened, lost_since) {
            (Ok(opened), _) => opened,
            (Err(e), Some(since)) if since.elapsed() < RECONNECT_FOR => {
                tracing::debug!(device = n, error = %e, "reconnect failed; trying the next node");
                node = (node + 1) % nodes;
                tokio::time::sleep(RECONNECT_PAUSE).await;
                continue;
            }
            (Err(e), _) => return Err(e),
        };
        if lost_since.take().is_none() {
            result.hello = Some(opened.hello_latency);
        }
        result.conversation = true;
        let (mut device, hello, mut audio) = (opened.device, opened.hello, opened.audio);
        let outcome = stream.run(config, &mut device, &mut audio, result).await;
        result.rejected += audio.rejected();
        if let Some(why) = device.violations().first() {
            return Err(format!(
                "firmware {} would refuse a server message: {why}",
                config.firmware.label()
            ));
        }
        match outcome {
            Streamed::Done => {
                result.sent = stream.sent_at.len() as u64;
                let _ = device
                    .publish_json(&json!({"session_id": hello.session_id, "type": "goodbye"}))
                    .await;
                if let SimLink::Quic(quic) = &audio {
                    quic.close();
                }
                device.disconnect().await;
                return Ok(());
            }
            Streamed::Lost(why) => {
                // The firmware connects again and starts a new conversation; frames in
                // flight when the gateway went away count as lost.
                tracing::debug!(device = n, why, "lost the gateway; connecting again");
                result.sent = stream.sent_at.len() as u64;
                result.reconnects += 1;
                lost_since = Some(Instant::now());
                node = (node + 1) % nodes;
                tokio::time::sleep(RECONNECT_PAUSE).await;
            }
        }
    }
}

/// How one conversation's streaming ended.
enum Streamed {
    /// Every frame sent and echoed (or the drain time passed).
    Done,
    /// The gateway went away.
    Lost(&'static str),
}

/// A device's frames across its conversations (frame indices are unique per device, so
/// echoes are matched whichever conversation carried them).
struct Stream {
    sent_at: Vec<Instant>,
    seen: Vec<bool>,
    frames: usize,
}

impl Stream {
    async fn run(
        &mut self,
        config: &SimConfig,
        device: &mut SimDevice,
        audio: &mut SimLink,
        result: &mut DeviceResult,
    ) -> Streamed {
        let mut tick = tokio::time::interval(Duration::from_millis(u64::from(config.frame_ms)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let mut ping = tokio::time::interval(Duration::from_secs(
            u64::from(device::FIRMWARE_KEEP_ALIVE_SECS) / 2,
        ));
        ping.tick().await;
        let drain = Duration::from_millis(u64::from(config.frame_ms) * 4 + 500);
        let mut stop_at =
            (self.sent_at.len() == self.frames).then(|| tokio::time::Instant::now() + drain);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if device.is_closed() {
                        return Streamed::Lost("MQTT connection closed");
                    }
                    if self.sent_at.len() < self.frames {
                        let i = self.sent_at.len() as u32;
                        let frame = synthetic_frame(i, config.frame_bytes);
                        self.sent_at.push(Instant::now());
                        if audio.send(i * config.frame_ms, &frame).await.is_err() {
                            return Streamed::Lost("UDP send failed");
                        }
                        if self.sent_at.len() == self.frames {
                            stop_at = Some(tokio::time::Instant::now() + drain);
                        }
                    }
                }
                got = audio.recv(Duration::from_secs(3600)) => {
                    let Ok(got) = got else {
                        return Streamed::Lost("UDP receive failed");
                    };
                    if let Some(frame) = got
                        && let Some(i) = frame_index(&frame.opus)
                        && let Some(slot) = self.seen.get_mut(i as usize)
                        && !*slot
                    {
                        *slot = true;
                        result.echoed += 1;
                        result.rtts.push(self.sent_at[i as usize].elapsed());
                    }
                    if result.echoed == self.frames as u64 {
                        return Streamed::Done;
                    }
                }
                _ = ping.tick() => {
                    if device.ping().await.is_err() {
                        return Streamed::Lost("MQTT ping failed");
                    }
                }
                _ = sleep_until_opt(stop_at) => return Streamed::Done,
            }
        }
    }
}

/// Where and how a simulated device opens its conversation.
pub(crate) struct ConversationTarget<'a> {
    pub mqtt: SocketAddr,
    pub signature_key: Option<&'a str>,
    pub group: &'a str,
    pub udp_bind: SocketAddr,
    /// The `listen` mode it starts in.
    pub mode: &'a str,
    /// The audio transport it asks for.
    pub transport: Transport,
    /// The firmware it runs.
    pub firmware: Firmware,
}

/// A conversation a simulated device has opened.
pub(crate) struct OpenedConversation {
    pub device: SimDevice,
    pub hello: ServerHello,
    pub hello_latency: Duration,
    pub audio: SimLink,
}

/// Device `n` connects, says hello and waits for the server's as the firmware does (10 s;
/// an alert says why none will come), opens its UDP channel and starts listening.
/// `connected` is set as soon as the MQTT connection is up. At most as many devices as
/// `handshakes` has permits are between connect and hello at once.
pub(crate) async fn open_conversation(
    target: ConversationTarget<'_>,
    n: u32,
    handshakes: &Semaphore,
    connected: &mut bool,
) -> Result<OpenedConversation, String> {
    let creds = DeviceCredentials::for_mac(
        DeviceCredentials::nth_mac(n),
        target.group,
        target.signature_key.map(str::as_bytes),
    );
    let permit = handshakes.acquire().await.map_err(|e| e.to_string())?;
    let options = SimDeviceOptions {
        firmware: target.firmware,
        ..SimDeviceOptions::default()
    };
    let mut device = SimDevice::connect_with(target.mqtt, creds, options)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    *connected = true;
    let t0 = Instant::now();
    device
        .publish_json(&target.transport.hello_for(target.firmware))
        .await
        .map_err(|e| e.to_string())?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let hello = loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let (_, payload) = device.recv(left).await.map_err(|e| format!("hello: {e}"))?;
        let Ok(message) = serde_json::from_slice::<serde_json::Value>(&payload) else {
            continue;
        };
        match message["type"].as_str() {
            Some("hello") => break message,
            Some("alert") => return Err(format!("alert instead of hello: {}", message["message"])),
            _ => {}
        }
    };
    let hello_latency = t0.elapsed();
    drop(permit);
    // A strict firmware ignores a hello it does not like and gives up after 10 s.
    if let Some(why) = device.violations().first() {
        return Err(format!(
            "firmware {} would ignore the server hello: {why}",
            target.firmware.label()
        ));
    }
    let hello = ServerHello::parse(&hello).map_err(|e| e.to_string())?;
    if hello.transport() != target.transport {
        return Err(format!(
            "asked for {} audio, the hello gave {}",
            target.transport.label(),
            hello.transport().label()
        ));
    }
    let audio = SimLink::open(&hello, target.udp_bind)
        .await
        .map_err(|e| format!("{}: {e}", hello.transport().label()))?;
    device
        .publish_json(&json!({"session_id": hello.session_id, "type": "listen", "state": "start", "mode": target.mode}))
        .await
        .map_err(|e| e.to_string())?;
    Ok(OpenedConversation {
        device,
        hello,
        hello_latency,
        audio,
    })
}

async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
