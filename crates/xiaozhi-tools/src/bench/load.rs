//! The load generator: N simulated firmware devices against a running server.
//!
//! Each device does what the firmware does: an MQTT connection with manager-api style
//! credentials (no SUBSCRIBE; MCP requests answered), a hello, then a *connected* UDP
//! socket that sends AES-CTR datagrams built from the hello's nonce with the sequence
//! from 1, and accepts downlink datagrams only if they pass the firmware's checks (type,
//! exact length, strictly increasing sequence). With `--transport gcm` devices announce
//! `udp_aead` and seal AES-GCM datagrams; with `--transport quic` they announce `quic`
//! and carry audio as QUIC datagrams (one client endpoint per source address, shared
//! by its devices' connections). The server under test echoes the audio
//! (its echo pipeline, or an upstream that echoes), so every frame's round trip is
//! measured: each uplink frame carries its index and send time.
//!
//! The tool is built not to be the bottleneck, and to say so when it is:
//! * sending is paced in batches: a few pacer tasks each wake every [`TICK`] and send the
//!   frames of the devices whose slot in the 60 ms frame period has come, with one reused
//!   buffer and a non-blocking send, so there is no timer and no allocation per datagram;
//! * each device's receive side is one task that decrypts into a reused buffer and
//!   records into its pacer's histogram (constant memory);
//! * devices bind to several loopback source addresses (127.0.0.1..n), so more than one
//!   address's worth of ports is available;
//! * the report carries the pacers' lateness and the tool's own CPU, next to the target
//!   process's CPU (user and kernel) and RSS over a measured window that starts only once
//!   every device is streaming.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::json;
use tokio::net::{TcpSocket, UdpSocket};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::histogram::{LatencyHistogram, LatencySummary};
use super::procstat::{self, CpuShare, ProcSample};
use crate::simulator::audio::{ServerHello, Transport};
use crate::simulator::device::{DeviceCredentials, SimDevice, SimError};
use crate::simulator::firmware::Firmware;
use crate::simulator::quic::SimQuic;
use xiaozhi_gateway::protocol::audio_channel::Verdict;
use xiaozhi_gateway::protocol::cipher::PacketCipher;
use xiaozhi_gateway::protocol::datagram::{
    HEADER_LEN, Header, MAX_DATAGRAM_LEN, PACKET_TYPE_AUDIO,
};
use xiaozhi_gateway::protocol::gcm_channel::{GcmCipher, GcmReceiver, GcmSealer};
use xiaozhi_gateway::protocol::quic_framing::{AUDIO_HEADER_LEN, AudioDatagram};

/// How often a pacer wakes. Tokio's timer has millisecond resolution; 2 ms spreads a
/// 60 ms frame period over 30 slots.
pub const TICK: Duration = Duration::from_millis(2);

/// Pacer lateness p99 beyond which the tool calls itself saturated.
const SATURATED_LATENESS_MS: f64 = 5.0;

/// How long the server has to answer a hello (the firmware waits 10 s).
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Smallest frame that holds the TOC byte, the index and the send time.
const MIN_FRAME_BYTES: usize = 13;

/// Errors kept verbatim in the report (the rest are counted).
const KEPT_ERRORS: usize = 8;

/// What to run.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// The server's device MQTT address.
    pub mqtt: SocketAddr,
    /// Key to sign device passwords with; `None` for a server that does not check.
    pub signature_key: Option<String>,
    pub devices: u32,
    /// Devices connecting per second.
    pub connect_rate: u32,
    /// At most this many devices between CONNECT and hello reply at once.
    pub handshake_concurrency: usize,
    /// `false`: devices only connect and stay idle (no hello, no audio).
    pub talk: bool,
    /// Streaming (or idling) once every device is up, before the measured window.
    pub warmup: Duration,
    /// The measured window.
    pub measure: Duration,
    pub frame_ms: u32,
    /// Bytes of Opus per frame (the datagram adds 16).
    pub frame_bytes: usize,
    /// Devices bind to 127.0.0.1 ..= 127.0.0.<n> when the server is on loopback.
    pub source_addresses: u8,
    /// The process to measure (CPU and RSS); usually the server's pid.
    pub target_pid: Option<u32>,
    /// First device number, so runs can use disjoint MACs.
    pub first_device: u32,
    pub group: String,
    /// Number of pacer tasks.
    pub pacers: usize,
    /// The audio transport devices ask for.
    pub transport: Transport,
    /// The firmware devices run (2.4 checks every server hello strictly).
    pub firmware: Firmware,
}

impl Default for LoadConfig {
    fn default() -> Self {
        LoadConfig {
            mqtt: ([127, 0, 0, 1], 1883).into(),
            signature_key: None,
            devices: 100,
            connect_rate: 500,
            handshake_concurrency: 256,
            talk: true,
            warmup: Duration::from_secs(2),
            measure: Duration::from_secs(10),
            frame_ms: 60,
            frame_bytes: 120,
            source_addresses: 8,
            target_pid: None,
            first_device: 0,
            group: "GID_bench".into(),
            pacers: 4,
            transport: Transport::Ctr,
            firmware: Firmware::default(),
        }
    }
}

/// The target process over the measured window.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TargetFigures {
    pub pid: u32,
    pub cpu: CpuShare,
    /// `cpu.total_percent` divided by the devices in conversation (or connected, idle).
    pub cpu_percent_per_device: f64,
    pub rss_before_bytes: u64,
    pub rss_end_bytes: u64,
    /// `(rss_end - rss_before) / devices`.
    pub rss_per_device_bytes: f64,
    pub threads: u64,
    /// Threads that used at least [`BUSY_THREAD_PERCENT`] of a core, busiest first: how
    /// the target spread its work (its runtime's workers, its decoder threads).
    pub busy_threads: Vec<procstat::ThreadShare>,
}

/// Threads below this share of a core are left out of [`TargetFigures::busy_threads`].
pub const BUSY_THREAD_PERCENT: f64 = 0.5;

/// The tool's own health: if it was late, the figures above are the tool's, not the
/// server's.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ToolFigures {
    pub cpu: CpuShare,
    pub rss_end_bytes: u64,
    /// How late pacer ticks ran.
    pub pacer_lateness: LatencySummary,
    /// Sends the kernel refused for a full socket buffer.
    pub send_would_block: u64,
    pub saturated: bool,
}

/// What a run measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LoadReport {
    pub mode: &'static str,
    pub devices: u32,
    pub connected: u32,
    /// Devices whose hello was answered and whose audio channel opened.
    pub in_conversation: u32,
    /// Devices that received audio back and met no error until the end.
    pub completed: u32,
    /// Devices whose MQTT connection the server closed during the run.
    pub mqtt_dropped: u64,
    pub errors: u64,
    pub first_errors: Vec<String>,
    /// TCP connect to CONNACK, per device.
    pub connect: LatencySummary,
    /// Devices connected per second over the ramp (first launch to last CONNACK).
    pub connects_per_sec: f64,
    /// The target's CPU from the start of the run to the start of the measured window
    /// (the ramp and the warm-up: MQTT, authentication, MCP setup, and for talking
    /// devices the hello), in milliseconds per connected device.
    pub target_cpu_ms_per_connect: f64,
    pub hello: LatencySummary,
    pub round_trip: LatencySummary,
    pub frames_sent: u64,
    pub frames_received: u64,
    pub frames_lost: u64,
    pub loss_percent: f64,
    /// Downlink datagrams the firmware's checks would have dropped.
    pub downlink_rejected: u64,
    /// The audio transport (`ctr`, `gcm`, `quic`).
    pub transport: &'static str,
    /// UDP payload bytes per frame on the wire, each way (IPv4 and UDP headers add 28).
    pub wire_up_bytes_per_frame: f64,
    pub wire_down_bytes_per_frame: f64,
    /// UDP datagrams per frame each way (1 for UDP transports).
    pub wire_up_datagrams_per_frame: f64,
    pub wire_down_datagrams_per_frame: f64,
    pub window_secs: f64,
    pub wall_secs: f64,
    pub target: Option<TargetFigures>,
    pub tool: ToolFigures,
}

impl LoadReport {
    /// Functional failures (never timings): what a smoke run fails on.
    pub fn functional_failures(&self) -> Vec<String> {
        let mut failures = Vec::new();
        if self.connected != self.devices {
            failures.push(format!(
                "{} of {} devices connected",
                self.connected, self.devices
            ));
        }
        if self.mqtt_dropped > 0 {
            failures.push(format!(
                "{} devices lost their MQTT connection during the run",
                self.mqtt_dropped
            ));
        }
        if self.errors > 0 {
            failures.push(format!(
                "{} errors, first: {:?}",
                self.errors,
                self.first_errors.first()
            ));
        }
        if self.mode == "talk" {
            if self.completed != self.devices {
                failures.push(format!(
                    "{} of {} devices completed",
                    self.completed, self.devices
                ));
            }
            if self.frames_lost > 0 {
                failures.push(format!(
                    "{} of {} frames lost",
                    self.frames_lost, self.frames_sent
                ));
            }
            if self.downlink_rejected > 0 {
                failures.push(format!(
                    "{} downlink datagrams failed the firmware's checks",
                    self.downlink_rejected
                ));
            }
        }
        failures
    }
}

impl std::fmt::Display for LoadReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "devices:      {} ({} mode): {} connected, {} in conversation, {} completed",
            self.devices, self.mode, self.connected, self.in_conversation, self.completed
        )?;
        writeln!(
            f,
            "connect:      {} ({:.0} connects/s{})",
            self.connect,
            self.connects_per_sec,
            if self.target_cpu_ms_per_connect > 0.0 {
                format!(
                    "; target CPU {:.3} ms per device to set up",
                    self.target_cpu_ms_per_connect
                )
            } else {
                String::new()
            }
        )?;
        if self.mode == "talk" {
            writeln!(f, "hello:        {}", self.hello)?;
            writeln!(f, "round trip:   {}", self.round_trip)?;
            writeln!(
                f,
                "frames:       {} sent, {} received, {} lost ({:.3}%), {} rejected by firmware checks",
                self.frames_sent,
                self.frames_received,
                self.frames_lost,
                self.loss_percent,
                self.downlink_rejected
            )?;
            writeln!(
                f,
                "wire:         {} transport, {:.1} B up / {:.1} B down per frame (UDP payload; +28 per datagram for IPv4 and UDP headers), {:.2} / {:.2} datagrams per frame",
                self.transport,
                self.wire_up_bytes_per_frame,
                self.wire_down_bytes_per_frame,
                self.wire_up_datagrams_per_frame,
                self.wire_down_datagrams_per_frame
            )?;
        }
        if let Some(t) = &self.target {
            writeln!(
                f,
                "target pid {}: CPU {:.1}% of a core (user {:.1} + kernel {:.1}) = {:.4}% per device; RSS {:.1} MB -> {:.1} MB ({:.0} B per device), {} threads",
                t.pid,
                t.cpu.total_percent,
                t.cpu.user_percent,
                t.cpu.system_percent,
                t.cpu_percent_per_device,
                t.rss_before_bytes as f64 / 1e6,
                t.rss_end_bytes as f64 / 1e6,
                t.rss_per_device_bytes,
                t.threads
            )?;
            if !t.busy_threads.is_empty() {
                let threads: Vec<String> = t
                    .busy_threads
                    .iter()
                    .map(|s| format!("{} {} {:.1}%", s.name, s.tid, s.total_percent))
                    .collect();
                writeln!(f, "target threads: {}", threads.join(", "))?;
            }
        }
        writeln!(
            f,
            "tool:         CPU {:.1}% (user {:.1} + kernel {:.1}), pacer lateness p99 {:.2} / max {:.2} ms, {} sends refused{}",
            self.tool.cpu.total_percent,
            self.tool.cpu.user_percent,
            self.tool.cpu.system_percent,
            self.tool.pacer_lateness.p99_ms,
            self.tool.pacer_lateness.max_ms,
            self.tool.send_would_block,
            if self.tool.saturated {
                "  ** SATURATED: figures describe the tool, not the server **"
            } else {
                ""
            }
        )?;
        if self.errors > 0 {
            writeln!(
                f,
                "errors:       {} (first: {:?})",
                self.errors,
                self.first_errors.first()
            )?;
        }
        write!(
            f,
            "window:       {:.1} s measured, {:.1} s wall",
            self.window_secs, self.wall_secs
        )
    }
}

/// Errors shared by every task of a run.
#[derive(Default)]
struct ErrorLog {
    count: AtomicU64,
    kept: Mutex<Vec<String>>,
}

impl ErrorLog {
    fn push(&self, e: String) {
        self.count.fetch_add(1, Ordering::Relaxed);
        let mut kept = self.kept.lock().unwrap_or_else(PoisonError::into_inner);
        if kept.len() < KEPT_ERRORS {
            kept.push(e);
        }
    }
}

/// How a device's uplink frames leave.
enum Uplink {
    /// AES-CTR datagrams from the hello's nonce template, as the firmware builds them.
    Ctr {
        socket: Arc<UdpSocket>,
        cipher: PacketCipher,
        nonce: [u8; HEADER_LEN],
    },
    /// AES-GCM datagrams.
    Gcm {
        socket: Arc<UdpSocket>,
        sealer: Box<GcmSealer>,
    },
    /// QUIC datagrams.
    Quic(quinn::Connection),
}

/// A device's sending half, owned by a pacer.
struct Talker {
    uplink: Uplink,
    next_sequence: u32,
    next_index: u32,
}

/// A device's receiving half.
enum Downlink {
    Ctr(Arc<UdpSocket>, PacketCipher),
    Gcm(Arc<UdpSocket>, Box<GcmReceiver>),
    /// The client keeps its control stream open for the conversation.
    Quic(Box<SimQuic>),
}

/// Holds every device's MQTT connection for the run, as firmware would: reads what the
/// server sends (so no inbox fills and stalls the connection), pings within the
/// keep-alive, and notices a connection the server closed.
struct Keeper {
    devices: Vec<SimDevice>,
    dropped: u64,
}

/// How often the keeper reads the devices' inboxes.
const KEEPER_TICK: Duration = Duration::from_secs(1);

/// How often each device pings (the firmware's keep-alive is 240 s; the server closes a
/// silent connection after 1.5 times that).
const PING_EVERY: Duration = Duration::from_secs(60);

async fn keep(
    mut joining: mpsc::UnboundedReceiver<SimDevice>,
    stop: CancellationToken,
    errors: Arc<ErrorLog>,
) -> Keeper {
    let mut keeper = Keeper {
        devices: Vec::new(),
        dropped: 0,
    };
    let mut alive: Vec<bool> = Vec::new();
    let mut tick = tokio::time::interval(KEEPER_TICK);
    let mut last_ping = tokio::time::Instant::now();
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        while let Ok(d) = joining.try_recv() {
            keeper.devices.push(d);
            alive.push(true);
        }
        let ping = last_ping.elapsed() >= PING_EVERY;
        if ping {
            last_ping = tokio::time::Instant::now();
        }
        for (d, alive) in keeper.devices.iter_mut().zip(alive.iter_mut()) {
            if !*alive {
                continue;
            }
            let closed = loop {
                match d.recv(Duration::ZERO).await {
                    Ok(_) => continue,
                    Err(SimError::Closed) => break true,
                    Err(_) => break false,
                }
            };
            if closed || (ping && d.ping().await.is_err()) {
                *alive = false;
                keeper.dropped += 1;
                errors.push(format!(
                    "device {}: the server closed its MQTT connection",
                    d.credentials.mac
                ));
            }
        }
    }
    while let Ok(d) = joining.try_recv() {
        keeper.devices.push(d);
    }
    keeper
}

/// What a pacer's devices share: the round-trip histogram and counters.
#[derive(Default)]
struct PacerShared {
    round_trip: Mutex<LatencyHistogram>,
    sent: AtomicU64,
    received: AtomicU64,
    rejected: AtomicU64,
    would_block: AtomicU64,
    /// UDP payload bytes the devices sent and received (for QUIC, every packet of the
    /// connection: handshake, acknowledgements and keep-alives included).
    wire_up_bytes: AtomicU64,
    wire_down_bytes: AtomicU64,
    /// UDP datagrams each way (for UDP transports, one per frame; QUIC adds its own).
    wire_up_datagrams: AtomicU64,
    wire_down_datagrams: AtomicU64,
}

/// Runs a load and reports. `talk == false` runs idle devices.
pub async fn run(config: LoadConfig) -> LoadReport {
    let started = Instant::now();
    let config = Arc::new(config);
    let epoch = Instant::now();
    let errors = Arc::new(ErrorLog::default());
    let stop_sending = CancellationToken::new();
    let stop_receiving = CancellationToken::new();
    let tasks = TaskTracker::new();
    let target_before = config
        .target_pid
        .and_then(|p| procstat::sample(Some(p)).ok());

    // Pacers.
    let mut pacer_inputs = Vec::new();
    let mut pacer_handles = Vec::new();
    let mut pacer_shared = Vec::new();
    for _ in 0..config.pacers.max(1) {
        let (tx, rx) = mpsc::unbounded_channel::<Talker>();
        let shared = Arc::new(PacerShared::default());
        pacer_inputs.push(tx);
        pacer_shared.push(shared.clone());
        pacer_handles.push(tokio::spawn(pace(
            rx,
            shared,
            config.frame_ms,
            config.frame_bytes.max(MIN_FRAME_BYTES),
            epoch,
            stop_sending.clone(),
        )));
    }

    // Connect ramp, paced in batches like the audio.
    let handshakes = Arc::new(Semaphore::new(config.handshake_concurrency.max(1)));
    let stop_keeping = CancellationToken::new();
    let (keep_tx, keep_rx) = mpsc::unbounded_channel();
    let keeper = tokio::spawn(keep(keep_rx, stop_keeping.clone(), errors.clone()));
    let hellos: Arc<Mutex<LatencyHistogram>> = Arc::default();
    let connects: Arc<Mutex<LatencyHistogram>> = Arc::default();
    let connected = Arc::new(AtomicU64::new(0));
    let in_conversation = Arc::new(AtomicU64::new(0));
    let completed = Arc::new(AtomicU64::new(0));
    let mut launched = 0u32;
    let rate = f64::from(config.connect_rate.max(1));
    let ramp_start = tokio::time::Instant::now();
    let mut device_tasks = Vec::with_capacity(config.devices as usize);
    let quic_endpoints: Arc<Mutex<std::collections::HashMap<IpAddr, quinn::Endpoint>>> =
        Arc::default();
    while launched < config.devices {
        let due =
            ((ramp_start.elapsed().as_secs_f64() * rate).floor() as u32 + 1).min(config.devices);
        while launched < due {
            let n = launched;
            launched += 1;
            let ctx = DeviceContext {
                config: config.clone(),
                n,
                handshakes: handshakes.clone(),
                keeper: keep_tx.clone(),
                hellos: hellos.clone(),
                connects: connects.clone(),
                connected: connected.clone(),
                in_conversation: in_conversation.clone(),
                completed: completed.clone(),
                errors: errors.clone(),
                pacer: pacer_inputs[n as usize % pacer_inputs.len()].clone(),
                pacer_shared: pacer_shared[n as usize % pacer_shared.len()].clone(),
                stop: stop_receiving.clone(),
                epoch,
                tasks: tasks.clone(),
                quic_endpoints: quic_endpoints.clone(),
            };
            device_tasks.push(tasks.spawn(device(ctx)));
        }
        tokio::time::sleep(TICK).await;
    }
    // Every device has either joined its pacer (and is streaming) or failed.
    for t in device_tasks.iter_mut() {
        let _ = (&mut *t).await;
    }
    let ramp_secs = ramp_start.elapsed().as_secs_f64();
    drop(pacer_inputs);
    tokio::time::sleep(config.warmup).await;

    // The measured window.
    let tool_a = procstat::sample(None).ok();
    let target_a = config
        .target_pid
        .and_then(|p| procstat::sample(Some(p)).ok());
    let threads_a = config
        .target_pid
        .and_then(|p| procstat::sample_threads(p).ok());
    let window_start = Instant::now();
    tokio::time::sleep(config.measure).await;
    let tool_b = procstat::sample(None).ok();
    let target_b = config
        .target_pid
        .and_then(|p| procstat::sample(Some(p)).ok());
    let threads_b = config
        .target_pid
        .and_then(|p| procstat::sample_threads(p).ok());
    let window_secs = window_start.elapsed().as_secs_f64();

    // Stop sending, let the last frames come back, then stop receiving.
    stop_sending.cancel();
    let mut lateness = LatencyHistogram::new();
    for h in pacer_handles {
        if let Ok(l) = h.await {
            lateness.merge(&l);
        }
    }
    let drain = Duration::from_millis(u64::from(config.frame_ms) * 4 + 500);
    tokio::time::sleep(drain).await;
    stop_receiving.cancel();
    tasks.close();
    tasks.wait().await;

    // Leave as the firmware does.
    drop(keep_tx);
    stop_keeping.cancel();
    let keeper = keeper.await.unwrap_or(Keeper {
        devices: Vec::new(),
        dropped: 0,
    });
    let devices = keeper.devices;
    let leave = TaskTracker::new();
    let leaving = Arc::new(Semaphore::new(512));
    for mut d in devices {
        let leaving = leaving.clone();
        leave.spawn(async move {
            let _permit = leaving.acquire().await;
            let sid = d.session_id();
            if !sid.is_empty() {
                let _ = d
                    .publish_json(&json!({"session_id": sid, "type": "goodbye"}))
                    .await;
            }
            d.disconnect().await;
        });
    }
    leave.close();
    leave.wait().await;

    let mut round_trip = LatencyHistogram::new();
    let (mut sent, mut received, mut rejected, mut would_block) = (0, 0, 0, 0);
    let (mut wire_up, mut wire_down, mut up_datagrams, mut down_datagrams) =
        (0u64, 0u64, 0u64, 0u64);
    for s in &pacer_shared {
        wire_up += s.wire_up_bytes.load(Ordering::Relaxed);
        wire_down += s.wire_down_bytes.load(Ordering::Relaxed);
        up_datagrams += s.wire_up_datagrams.load(Ordering::Relaxed);
        down_datagrams += s.wire_down_datagrams.load(Ordering::Relaxed);
        round_trip.merge(&s.round_trip.lock().unwrap_or_else(PoisonError::into_inner));
        sent += s.sent.load(Ordering::Relaxed);
        received += s.received.load(Ordering::Relaxed);
        rejected += s.rejected.load(Ordering::Relaxed);
        would_block += s.would_block.load(Ordering::Relaxed);
    }
    let in_conversation = in_conversation.load(Ordering::Relaxed) as u32;
    let connected = connected.load(Ordering::Relaxed) as u32;
    let per_device = if config.talk {
        in_conversation
    } else {
        connected
    }
    .max(1);
    let target = match (config.target_pid, &target_a, &target_b) {
        (Some(pid), Some(a), Some(b)) => Some(TargetFigures {
            busy_threads: match (&threads_a, &threads_b) {
                (Some(ta), Some(tb)) => {
                    procstat::thread_shares(ta, tb, window_secs, BUSY_THREAD_PERCENT)
                }
                _ => Vec::new(),
            },
            ..target_figures(pid, target_before.as_ref(), a, b, per_device)
        }),
        _ => None,
    };
    let pacer_lateness = lateness.summary();
    let tool_cpu = match (&tool_a, &tool_b) {
        (Some(a), Some(b)) => procstat::cpu_between(a, b),
        _ => CpuShare::default(),
    };
    let lost = sent.saturating_sub(received);
    LoadReport {
        mode: if config.talk { "talk" } else { "idle" },
        devices: config.devices,
        connected,
        in_conversation,
        completed: completed.load(Ordering::Relaxed) as u32,
        mqtt_dropped: keeper.dropped,
        errors: errors.count.load(Ordering::Relaxed),
        first_errors: errors
            .kept
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone(),
        connect: connects
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .summary(),
        connects_per_sec: f64::from(connected) / ramp_secs.max(1e-9),
        target_cpu_ms_per_connect: match (&target_before, &target_a) {
            (Some(before), Some(a)) if connected > 0 => {
                let ticks = (a.user_ticks + a.system_ticks)
                    .saturating_sub(before.user_ticks + before.system_ticks);
                ticks as f64 / procstat::ticks_per_second() * 1000.0 / f64::from(connected)
            }
            _ => 0.0,
        },
        hello: hellos
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .summary(),
        round_trip: round_trip.summary(),
        frames_sent: sent,
        frames_received: received,
        frames_lost: lost,
        loss_percent: if sent == 0 {
            0.0
        } else {
            lost as f64 * 100.0 / sent as f64
        },
        downlink_rejected: rejected,
        transport: config.transport.label(),
        wire_up_bytes_per_frame: wire_up as f64 / sent.max(1) as f64,
        wire_down_bytes_per_frame: wire_down as f64 / received.max(1) as f64,
        wire_up_datagrams_per_frame: up_datagrams as f64 / sent.max(1) as f64,
        wire_down_datagrams_per_frame: down_datagrams as f64 / received.max(1) as f64,
        window_secs,
        wall_secs: started.elapsed().as_secs_f64(),
        target,
        tool: ToolFigures {
            cpu: tool_cpu,
            rss_end_bytes: tool_b.map_or(0, |s| s.rss_bytes),
            saturated: pacer_lateness.p99_ms > SATURATED_LATENESS_MS || would_block > 0,
            pacer_lateness,
            send_would_block: would_block,
        },
    }
}

fn target_figures(
    pid: u32,
    before: Option<&ProcSample>,
    a: &ProcSample,
    b: &ProcSample,
    devices: u32,
) -> TargetFigures {
    let cpu = procstat::cpu_between(a, b);
    let rss_before = before.map_or(a.rss_bytes, |s| s.rss_bytes);
    TargetFigures {
        pid,
        cpu,
        cpu_percent_per_device: cpu.total_percent / f64::from(devices),
        rss_before_bytes: rss_before,
        rss_end_bytes: b.rss_bytes,
        rss_per_device_bytes: b.rss_bytes.saturating_sub(rss_before) as f64 / f64::from(devices),
        threads: b.threads,
        busy_threads: Vec::new(),
    }
}

/// One pacer: every [`TICK`], sends the frames of the devices in the current slot.
/// Returns how late its ticks ran.
async fn pace(
    mut joining: mpsc::UnboundedReceiver<Talker>,
    shared: Arc<PacerShared>,
    frame_ms: u32,
    frame_bytes: usize,
    epoch: Instant,
    stop: CancellationToken,
) -> LatencyHistogram {
    let tick_ms = TICK.as_millis().max(1) as u32;
    let slot_count = (frame_ms / tick_ms).max(1) as usize;
    let mut slots: Vec<Vec<Talker>> = (0..slot_count).map(|_| Vec::new()).collect();
    let mut next_slot = 0usize;
    let mut lateness = LatencyHistogram::new();
    let mut datagram = vec![0u8; HEADER_LEN + frame_bytes];
    let mut opus_buf = vec![0u8; frame_bytes];
    let mut sealed = Vec::with_capacity(HEADER_LEN + frame_bytes + 16);
    let start = tokio::time::Instant::now();
    let mut k: u64 = 0;
    let (mut sent, mut would_block, mut wire_up, mut wire_up_datagrams) = (0u64, 0u64, 0u64, 0u64);
    loop {
        k += 1;
        let due = start + TICK * k as u32;
        tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep_until(due) => {}
        }
        lateness.record(tokio::time::Instant::now().saturating_duration_since(due));
        while let Ok(t) = joining.try_recv() {
            slots[next_slot].push(t);
            next_slot = (next_slot + 1) % slot_count;
        }
        let slot = (k % slot_count as u64) as usize;
        let now_us = u64::try_from(epoch.elapsed().as_micros()).unwrap_or(u64::MAX);
        for t in &mut slots[slot] {
            let result = match &mut t.uplink {
                Uplink::Ctr {
                    socket,
                    cipher,
                    nonce,
                } => {
                    let sequence = t.next_sequence;
                    t.next_sequence += 1;
                    build_ctr(
                        cipher,
                        nonce,
                        sequence,
                        t.next_index,
                        &mut datagram,
                        now_us,
                        frame_ms,
                    );
                    t.next_index += 1;
                    socket.try_send(&datagram).map(drop)
                }
                Uplink::Gcm { socket, sealer } => {
                    let opus = stamp_frame(&mut opus_buf, t.next_index, now_us);
                    let timestamp = t.next_index.wrapping_mul(frame_ms);
                    t.next_index += 1;
                    match sealer.seal(timestamp, opus, &mut sealed) {
                        Ok(()) => socket.try_send(&sealed).map(drop),
                        Err(_) => Ok(()),
                    }
                }
                Uplink::Quic(conn) => {
                    let opus = stamp_frame(&mut opus_buf, t.next_index, now_us);
                    let mut d = Vec::with_capacity(AUDIO_HEADER_LEN + opus.len());
                    AudioDatagram {
                        timestamp: t.next_index.wrapping_mul(frame_ms),
                        sequence: t.next_sequence,
                        opus,
                    }
                    .write(&mut d);
                    t.next_sequence += 1;
                    t.next_index += 1;
                    // quinn queues datagrams itself; a full queue drops the oldest.
                    let _ = conn.send_datagram(bytes::Bytes::from(d));
                    Ok(())
                }
            };
            match result {
                Ok(()) => {
                    sent += 1;
                    let len = match &t.uplink {
                        Uplink::Ctr { .. } => datagram.len(),
                        Uplink::Gcm { .. } => sealed.len(),
                        Uplink::Quic(_) => 0,
                    };
                    wire_up += len as u64;
                    wire_up_datagrams += u64::from(len > 0);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => would_block += 1,
                // A refused send (ICMP from a closed port) is a lost frame: it counts as sent.
                Err(_) => sent += 1,
            }
        }
        if k.is_multiple_of(64) {
            shared
                .sent
                .fetch_add(std::mem::take(&mut sent), Ordering::Relaxed);
            shared
                .would_block
                .fetch_add(std::mem::take(&mut would_block), Ordering::Relaxed);
            shared
                .wire_up_bytes
                .fetch_add(std::mem::take(&mut wire_up), Ordering::Relaxed);
            shared
                .wire_up_datagrams
                .fetch_add(std::mem::take(&mut wire_up_datagrams), Ordering::Relaxed);
        }
    }
    shared.sent.fetch_add(sent, Ordering::Relaxed);
    shared.would_block.fetch_add(would_block, Ordering::Relaxed);
    shared.wire_up_bytes.fetch_add(wire_up, Ordering::Relaxed);
    shared
        .wire_up_datagrams
        .fetch_add(wire_up_datagrams, Ordering::Relaxed);
    lateness
}

/// Writes the TOC byte, the frame's index and its send time into a reused Opus buffer.
fn stamp_frame(opus: &mut [u8], index: u32, now_us: u64) -> &[u8] {
    opus[0] = 11 << 3;
    opus[1..5].copy_from_slice(&index.to_be_bytes());
    opus[5..13].copy_from_slice(&now_us.to_be_bytes());
    opus
}

/// Writes device `t`'s next AES-CTR uplink datagram into `datagram` (whose length is
/// fixed).
#[cfg(test)]
fn build_uplink(t: &mut Talker, datagram: &mut [u8], now_us: u64, frame_ms: u32) {
    let Uplink::Ctr { cipher, nonce, .. } = &t.uplink else {
        return;
    };
    build_ctr(
        cipher,
        nonce,
        t.next_sequence,
        t.next_index,
        datagram,
        now_us,
        frame_ms,
    );
    t.next_sequence += 1;
    t.next_index += 1;
}

/// Writes an AES-CTR uplink datagram, as the firmware builds it, into `datagram` (whose
/// length is fixed).
fn build_ctr(
    cipher: &PacketCipher,
    nonce: &[u8; HEADER_LEN],
    sequence: u32,
    index: u32,
    datagram: &mut [u8],
    now_us: u64,
    frame_ms: u32,
) {
    let opus_len = datagram.len() - HEADER_LEN;
    let mut header = *nonce;
    header[2..4].copy_from_slice(&(opus_len as u16).to_be_bytes());
    header[8..12].copy_from_slice(&index.wrapping_mul(frame_ms).to_be_bytes());
    header[12..16].copy_from_slice(&sequence.to_be_bytes());
    datagram[..HEADER_LEN].copy_from_slice(&header);
    // A SILK wideband TOC byte, then the frame's index and send time; the rest stays as
    // the previous frame left it (the server does not decode).
    stamp_frame(&mut datagram[HEADER_LEN..], index, now_us);
    cipher.apply(&header, &mut datagram[HEADER_LEN..]);
}

/// Everything one device task needs.
struct DeviceContext {
    config: Arc<LoadConfig>,
    n: u32,
    handshakes: Arc<Semaphore>,
    keeper: mpsc::UnboundedSender<SimDevice>,
    hellos: Arc<Mutex<LatencyHistogram>>,
    connects: Arc<Mutex<LatencyHistogram>>,
    connected: Arc<AtomicU64>,
    in_conversation: Arc<AtomicU64>,
    completed: Arc<AtomicU64>,
    errors: Arc<ErrorLog>,
    pacer: mpsc::UnboundedSender<Talker>,
    pacer_shared: Arc<PacerShared>,
    stop: CancellationToken,
    epoch: Instant,
    tasks: TaskTracker,
    /// QUIC client endpoints, one per source address.
    quic_endpoints: Arc<Mutex<std::collections::HashMap<IpAddr, quinn::Endpoint>>>,
}

impl DeviceContext {
    /// The shared QUIC client endpoint of `source`.
    fn quic_endpoint(&self, source: IpAddr) -> Result<quinn::Endpoint, String> {
        let mut endpoints = self
            .quic_endpoints
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(e) = endpoints.get(&source) {
            return Ok(e.clone());
        }
        // Large kernel buffers, as the server has: the tool must not lose what it measures.
        let endpoint = xiaozhi_gateway::net::bind_udp(SocketAddr::new(source, 0), 8 << 20, 4 << 20)
            .and_then(|socket| {
                quinn::Endpoint::new(
                    quinn::EndpointConfig::default(),
                    None,
                    socket,
                    Arc::new(quinn::TokioRuntime),
                )
            })
            .map_err(|e| format!("QUIC endpoint on {source}: {e}"))?;
        endpoints.insert(source, endpoint.clone());
        Ok(endpoint)
    }
}

/// One device: connects, says hello, hands its sender to a pacer and runs its receiver
/// until the end of the run. Returns once the sender has joined (or the device failed);
/// the receiver keeps running as its own task.
async fn device(ctx: DeviceContext) {
    match open(&ctx).await {
        Ok(Some((talker, downlink))) => {
            if ctx.pacer.send(talker).is_err() {
                ctx.errors.push(format!("device {}: pacer gone", ctx.n));
                return;
            }
            // The receiver outlives this task; the run's tracker owns it, and it stops on
            // `stop` and reports through `pacer_shared`.
            ctx.tasks.spawn(receive(
                downlink,
                ctx.pacer_shared.clone(),
                ctx.completed.clone(),
                ctx.stop.clone(),
                ctx.epoch,
                ctx.errors.clone(),
            ));
        }
        Ok(None) => {}
        Err(e) => ctx.errors.push(format!("device {}: {e}", ctx.n)),
    }
}

/// The handshake. `Ok(None)` for an idle device (connected and kept).
async fn open(ctx: &DeviceContext) -> Result<Option<(Talker, Downlink)>, String> {
    let config = &ctx.config;
    let n = config.first_device + ctx.n;
    let source = source_ip(config.mqtt.ip(), ctx.n, config.source_addresses);
    let creds = DeviceCredentials::for_mac(
        DeviceCredentials::nth_mac(n),
        &config.group,
        config.signature_key.as_deref().map(str::as_bytes),
    );
    let permit = ctx.handshakes.acquire().await.map_err(|e| e.to_string())?;
    let connect_start = Instant::now();
    let tcp = connect_tcp(source, config.mqtt)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let options = crate::simulator::device::SimDeviceOptions {
        firmware: config.firmware,
        ..Default::default()
    };
    let mut device = SimDevice::connect_over_with(Box::new(tcp), creds, options)
        .await
        .map_err(|e| format!("MQTT connect: {e}"))?;
    ctx.connects
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .record(connect_start.elapsed());
    ctx.connected.fetch_add(1, Ordering::Relaxed);
    if !config.talk {
        drop(permit);
        let _ = ctx.keeper.send(device);
        return Ok(None);
    }
    let t0 = Instant::now();
    device
        .publish_json(&config.transport.hello_for(config.firmware))
        .await
        .map_err(|e| e.to_string())?;
    let hello = wait_hello(&mut device).await?;
    ctx.hellos
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .record(t0.elapsed());
    drop(permit);
    if let Some(why) = device.violations().first() {
        return Err(format!(
            "firmware {} would ignore the server hello: {why}",
            config.firmware.label()
        ));
    }
    let hello = ServerHello::parse(&hello).map_err(|e| e.to_string())?;
    if hello.transport() != config.transport {
        return Err(format!(
            "asked for {} audio, the hello gave {} (is the transport enabled on the server?)",
            config.transport.label(),
            hello.transport().label()
        ));
    }
    device.set_session_id(&hello.session_id);
    let (uplink, downlink) = match &hello.quic {
        Some(quic) => {
            let endpoint = ctx.quic_endpoint(source)?;
            let link = SimQuic::connect_on(endpoint, hello.udp, quic, false)
                .await
                .map_err(|e| format!("QUIC: {e}"))?;
            (
                Uplink::Quic(link.conn.clone()),
                Downlink::Quic(Box::new(link)),
            )
        }
        None => {
            let socket = UdpSocket::bind(SocketAddr::new(source, 0))
                .await
                .map_err(|e| format!("UDP bind {source}: {e}"))?;
            socket
                .connect(hello.udp)
                .await
                .map_err(|e| format!("UDP connect: {e}"))?;
            let socket = Arc::new(socket);
            match hello.transport() {
                Transport::Gcm => {
                    let cipher = GcmCipher::new(&hello.key);
                    let id = hello.connection_id();
                    (
                        Uplink::Gcm {
                            socket: socket.clone(),
                            sealer: Box::new(GcmSealer::uplink(cipher.clone(), id)),
                        },
                        Downlink::Gcm(socket, Box::new(GcmReceiver::downlink(cipher, id))),
                    )
                }
                _ => {
                    let cipher = PacketCipher::new(&hello.key);
                    (
                        Uplink::Ctr {
                            socket: socket.clone(),
                            cipher: cipher.clone(),
                            nonce: hello.nonce,
                        },
                        Downlink::Ctr(socket, cipher),
                    )
                }
            }
        }
    };
    device
        .publish_json(&json!({"session_id": hello.session_id, "type": "listen", "state": "start", "mode": "realtime"}))
        .await
        .map_err(|e| e.to_string())?;
    ctx.in_conversation.fetch_add(1, Ordering::Relaxed);
    let _ = ctx.keeper.send(device);
    let talker = Talker {
        uplink,
        next_sequence: 1,
        next_index: 0,
    };
    Ok(Some((talker, downlink)))
}

async fn wait_hello(device: &mut SimDevice) -> Result<serde_json::Value, String> {
    let deadline = tokio::time::Instant::now() + HELLO_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let (_, payload) = device.recv(left).await.map_err(|e| match e {
            SimError::Timeout(_) => "no hello reply within 10 s".to_owned(),
            e => format!("waiting for the hello reply: {e}"),
        })?;
        let Ok(message) = serde_json::from_slice::<serde_json::Value>(&payload) else {
            continue;
        };
        match message["type"].as_str() {
            Some("hello") => return Ok(message),
            Some("alert") => return Err(format!("alert instead of hello: {}", message["message"])),
            _ => {}
        }
    }
}

/// Source address for device `n`: one of 127.0.0.1..=127.0.0.<count> when the server
/// is on IPv4 loopback, else the unspecified address.
fn source_ip(server: IpAddr, n: u32, count: u8) -> IpAddr {
    match server {
        IpAddr::V4(v4) if v4.is_loopback() => {
            let k = (n % u32::from(count.max(1))) as u8 + 1;
            IpAddr::V4(Ipv4Addr::new(127, 0, 0, k))
        }
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
    }
}

async fn connect_tcp(source: IpAddr, server: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
    let socket = match server {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    if !source.is_unspecified() {
        socket.bind(SocketAddr::new(source, 0))?;
    }
    let stream = socket.connect(server).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// A device's receive side: the firmware's checks (or the GCM tag and window, or
/// QUIC), decryption, and the round trip of every frame.
async fn receive(
    downlink: Downlink,
    shared: Arc<PacerShared>,
    completed: Arc<AtomicU64>,
    stop: CancellationToken,
    epoch: Instant,
    errors: Arc<ErrorLog>,
) {
    let mut buf = vec![0u8; MAX_DATAGRAM_LEN + 1];
    let mut last_sequence = 0u32;
    let (mut received, mut rejected) = (0u64, 0u64);
    let mut failed = false;
    let (mut wire_down, mut wire_down_datagrams) = (0u64, 0u64);
    let mut downlink = downlink;
    loop {
        // The Opus frame's range in `buf`, or `None` for a datagram the device refuses.
        let frame: Option<std::ops::Range<usize>> = match &mut downlink {
            Downlink::Ctr(socket, _) | Downlink::Gcm(socket, _) => {
                let n = tokio::select! {
                    biased;
                    _ = stop.cancelled() => break,
                    r = socket.recv(&mut buf) => match r {
                        Ok(n) => n,
                        Err(e) => {
                            errors.push(format!("UDP receive: {e}"));
                            failed = true;
                            break;
                        }
                    },
                };
                wire_down += n as u64;
                wire_down_datagrams += 1;
                match &mut downlink {
                    Downlink::Ctr(_, cipher) => {
                        accept_ctr(&mut buf[..n], cipher, &mut last_sequence)
                    }
                    Downlink::Gcm(_, receiver) => {
                        let from = SocketAddr::from(([0, 0, 0, 0], 0));
                        match receiver.on_datagram(&mut buf[..n], from) {
                            Verdict::Accept { opus_len, .. } => {
                                Some(HEADER_LEN..HEADER_LEN + opus_len)
                            }
                            Verdict::Drop(_) => None,
                        }
                    }
                    Downlink::Quic(_) => None,
                }
            }
            Downlink::Quic(link) => {
                let datagram = tokio::select! {
                    biased;
                    _ = stop.cancelled() => break,
                    r = link.conn.read_datagram() => match r {
                        Ok(d) => d,
                        Err(e) => {
                            errors.push(format!("QUIC receive: {e}"));
                            failed = true;
                            break;
                        }
                    },
                };
                match AudioDatagram::parse(&datagram) {
                    Ok(d) if d.sequence > last_sequence => {
                        last_sequence = d.sequence;
                        let n = d.opus.len().min(buf.len());
                        buf[..n].copy_from_slice(&d.opus[..n]);
                        Some(0..n)
                    }
                    _ => None,
                }
            }
        };
        let Some(range) = frame.filter(|r| r.len() >= MIN_FRAME_BYTES) else {
            rejected += 1;
            continue;
        };
        let opus = &buf[range];
        let stamp = u64::from_be_bytes(opus[5..13].try_into().unwrap_or_default());
        let now = u64::try_from(epoch.elapsed().as_micros()).unwrap_or(u64::MAX);
        received += 1;
        shared
            .round_trip
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .record_micros(now.saturating_sub(stamp));
    }
    if let Downlink::Quic(link) = &downlink {
        let stats = link.conn.stats();
        wire_down = stats.udp_rx.bytes;
        wire_down_datagrams = stats.udp_rx.datagrams;
        shared
            .wire_up_bytes
            .fetch_add(stats.udp_tx.bytes, Ordering::Relaxed);
        shared
            .wire_up_datagrams
            .fetch_add(stats.udp_tx.datagrams, Ordering::Relaxed);
        link.close();
    }
    shared
        .wire_down_bytes
        .fetch_add(wire_down, Ordering::Relaxed);
    shared
        .wire_down_datagrams
        .fetch_add(wire_down_datagrams, Ordering::Relaxed);
    shared.received.fetch_add(received, Ordering::Relaxed);
    shared.rejected.fetch_add(rejected, Ordering::Relaxed);
    if received > 0 && !failed {
        completed.fetch_add(1, Ordering::Relaxed);
    }
}

/// The firmware's downlink checks and AES-CTR decryption; the Opus frame's range.
fn accept_ctr(
    d: &mut [u8],
    cipher: &PacketCipher,
    last_sequence: &mut u32,
) -> Option<std::ops::Range<usize>> {
    let n = d.len();
    let head = d.first_chunk::<HEADER_LEN>().copied()?;
    let h = Header::from_bytes(&head);
    if head[0] != PACKET_TYPE_AUDIO
        || usize::from(h.payload_len) + HEADER_LEN != n
        || h.sequence <= *last_sequence
    {
        return None;
    }
    *last_sequence = h.sequence;
    cipher.apply(&head, &mut d[HEADER_LEN..]);
    Some(HEADER_LEN..n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_spread_over_loopback_addresses_only_for_loopback_servers() {
        let lo: IpAddr = Ipv4Addr::LOCALHOST.into();
        assert_eq!(source_ip(lo, 0, 4), IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)));
        assert_eq!(source_ip(lo, 5, 4), IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)));
        assert!(source_ip("10.0.0.1".parse().unwrap(), 5, 4).is_unspecified());
    }

    #[test]
    fn uplink_datagrams_follow_the_firmware_layout() {
        let key = [7u8; 16];
        let nonce = xiaozhi_gateway::protocol::datagram::nonce_template(0xdead_beef);
        let std_socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        std_socket.set_nonblocking(true).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _guard = rt.enter();
        let mut t = Talker {
            uplink: Uplink::Ctr {
                socket: Arc::new(UdpSocket::from_std(std_socket).unwrap()),
                cipher: PacketCipher::new(&key),
                nonce,
            },
            next_sequence: 1,
            next_index: 0,
        };
        let mut d = vec![0u8; HEADER_LEN + 20];
        build_uplink(&mut t, &mut d, 123_456, 60);
        build_uplink(&mut t, &mut d, 654_321, 60);
        let h = Header::parse(&d).unwrap();
        assert_eq!(
            (h.connection_id, h.sequence, h.timestamp, h.payload_len),
            (0xdead_beef, 2, 60, 20)
        );
        let head: [u8; HEADER_LEN] = d[..HEADER_LEN].try_into().unwrap();
        PacketCipher::new(&key).apply(&head, &mut d[HEADER_LEN..]);
        assert_eq!(d[HEADER_LEN], 11 << 3);
        assert_eq!(u32::from_be_bytes(d[17..21].try_into().unwrap()), 1);
        assert_eq!(u64::from_be_bytes(d[21..29].try_into().unwrap()), 654_321);
    }
}
