//! The `xiaozhi-gateway bench` command line: `load`, `floor`, `upstream`, `commands` and
//! `calls`.
//!
//! Each part runs as its own process so a benchmark can pin them to cores with
//! `taskset` (the server alone on one core; the load and the upstream on the other), as
//! `docs/benchmarks.md` describes.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};

use super::commands::{self, CommandsConfig};
use super::echo_upstream::{EchoUpstream, Turns};
use super::floor::{Floor, FloorConfig};
use super::load::{self, LoadConfig};

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Run N simulated firmware devices against a server (the gateway in echo mode or
    /// through an upstream, the floor, or the Node.js gateway) and report hello and
    /// round-trip latency, loss, the server's CPU and RSS, and the tool's own lateness.
    Load(LoadArgs),
    /// Run the floor: a minimal single-thread echo server with the same socket calls
    /// and cipher work per datagram as the gateway's audio path and nothing else.
    Floor(FloorArgs),
    /// Run a lean xiaozhi-server stand-in that echoes every audio frame at once.
    Upstream(UpstreamArgs),
    /// Admin command round trips through the bus to devices on one or more nodes
    /// (percentiles, split into commands run where they landed and forwarded ones).
    Commands(CommandsArgs),
    /// Device-to-device calls: pairs of devices connected through the management API
    /// talk both ways; device-to-device latency, loss, and the gateways' CPU per call.
    Calls(CallsArgs),
    /// Pushes to idle devices: one at a time (POST to the device's read, percentiles),
    /// and one to a whole group (how long the fan-out takes, the rate it reaches).
    Push(PushArgs),
}

#[derive(Args)]
pub struct PushArgs {
    /// The gateway's device MQTT listener.
    #[arg(long, default_value = "127.0.0.1:1883")]
    mqtt: SocketAddr,
    /// The gateway's HTTP listener (the management API).
    #[arg(long, default_value = "127.0.0.1:8080")]
    http: SocketAddr,
    /// Signature key: device passwords and the management token derive from it.
    #[arg(long, env = "XZ_AUTH__SIGNATURE_KEY", hide_env_values = true)]
    key: String,
    /// Idle devices the group push goes to.
    #[arg(long, default_value_t = 1000)]
    devices: u32,
    /// Devices connecting per second.
    #[arg(long, default_value_t = 500)]
    connect_rate: u32,
    /// Single pushes timed one after the other.
    #[arg(long, default_value_t = 200)]
    singles: u32,
    /// First device number (for disjoint MACs across runs).
    #[arg(long, default_value_t = 800_000)]
    first_device: u32,
    /// Runtime threads for the tool.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Exit non-zero unless every device connected and read both pushes.
    #[arg(long)]
    check: bool,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct CallsArgs {
    /// Device MQTT listener of the callers' node.
    #[arg(long, default_value = "127.0.0.1:1883")]
    mqtt: SocketAddr,
    /// Device MQTT listener of the callees' node (default: the callers'); another node of
    /// a cluster measures calls across nodes.
    #[arg(long)]
    callee_mqtt: Option<SocketAddr>,
    /// The management API (HTTP) the calls are made through.
    #[arg(long, default_value = "127.0.0.1:8007")]
    http: SocketAddr,
    /// Signature key: device passwords and the management token derive from it.
    #[arg(long, env = "XZ_AUTH__SIGNATURE_KEY", hide_env_values = true)]
    key: String,
    /// Calls (pairs of devices).
    #[arg(long, default_value_t = 50)]
    pairs: u32,
    /// Seconds of talking before the measured window.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Seconds in the measured window.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Bytes of Opus per 60 ms frame.
    #[arg(long, default_value_t = 60)]
    frame_bytes: usize,
    /// Gateway processes to measure, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pid: Vec<u32>,
    /// First device number (for disjoint MACs across runs).
    #[arg(long, default_value_t = 900_000)]
    first_device: u32,
    /// Runtime threads for the tool.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Exit non-zero unless every pair was bridged and nothing was lost or rejected.
    #[arg(long)]
    check: bool,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct CommandsArgs {
    /// The broker admin clients use, host:port: the embedded broker listener, or the
    /// external broker of a cluster.
    #[arg(long, default_value = "127.0.0.1:1884")]
    broker: String,
    #[arg(long, env = "XZ_ADMIN_USERNAME", default_value = "admin")]
    username: String,
    #[arg(
        long,
        env = "XZ_ADMIN_PASSWORD",
        hide_env_values = true,
        default_value = ""
    )]
    password: String,
    /// Device MQTT listeners of the nodes, comma-separated; devices are spread over them.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:1883")]
    nodes: Vec<SocketAddr>,
    /// Signature key for device passwords (omit for a gateway in --dev mode).
    #[arg(long, env = "XZ_AUTH__SIGNATURE_KEY", hide_env_values = true)]
    key: Option<String>,
    #[arg(long, default_value_t = 20)]
    devices: u32,
    #[arg(long, default_value_t = 2000)]
    commands: u32,
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// `mcp` (tools/list, answered by the device) or `status` (answered by the node).
    #[arg(long, default_value = "mcp", value_parser = ["mcp", "status"])]
    kind: String,
    #[arg(long, default_value_t = 0)]
    first_device: u32,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct LoadArgs {
    /// The server's device MQTT address.
    #[arg(long, default_value = "127.0.0.1:1883")]
    mqtt: SocketAddr,
    /// Number of devices.
    #[arg(long, default_value_t = 100)]
    devices: u32,
    /// Devices connecting per second.
    #[arg(long, default_value_t = 500)]
    connect_rate: u32,
    /// Connect and stay idle (no hello, no audio): measures memory per connection.
    #[arg(long)]
    idle: bool,
    /// Seconds of steady load before the measured window.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Seconds in the measured window.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Bytes of Opus per 60 ms frame.
    #[arg(long, default_value_t = 120)]
    frame_bytes: usize,
    /// Process to measure (CPU user/kernel, RSS), e.g. `$(pgrep -f 'xiaozhi-gateway serve')`.
    #[arg(long)]
    pid: Option<u32>,
    /// Signature key for device passwords (omit for a server that does not check).
    #[arg(long, env = "XZ_AUTH__SIGNATURE_KEY", hide_env_values = true)]
    key: Option<String>,
    /// Number of 127.0.0.x source addresses devices bind to (loopback servers only).
    #[arg(long, default_value_t = 8)]
    source_addresses: u8,
    /// Pacer tasks.
    #[arg(long, default_value_t = 4)]
    pacers: usize,
    /// The audio transport devices ask for: ctr (stock firmware), gcm (AES-128-GCM over
    /// UDP) or quic (needs quic.enabled on the server).
    #[arg(long, value_enum, default_value_t = crate::simulator::audio::Transport::Ctr)]
    transport: crate::simulator::audio::Transport,
    /// The firmware devices run: 2.4 (its hello; a server hello 2.4 would ignore counts
    /// as a failed device) or 1 (the 1.x hello).
    #[arg(long, value_enum, default_value_t = crate::simulator::firmware::Firmware::V2_4)]
    firmware: crate::simulator::firmware::Firmware,
    /// Runtime threads for the tool (1: a single-thread runtime, the cheapest).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// First device number (for disjoint MACs across runs).
    #[arg(long, default_value_t = 0)]
    first_device: u32,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Exit with status 1 on any functional failure (devices not connected or not
    /// completed, lost frames, errors), never on timings: for CI smoke runs.
    #[arg(long)]
    check: bool,
}

#[derive(Args)]
pub struct FloorArgs {
    #[arg(long, default_value = "127.0.0.1:18930")]
    mqtt: SocketAddr,
    #[arg(long, default_value = "127.0.0.1:18940")]
    udp: SocketAddr,
    /// Check device passwords against this key (as the gateway does).
    #[arg(long, env = "XZ_AUTH__SIGNATURE_KEY", hide_env_values = true)]
    key: Option<String>,
    /// Be the relay floor: relay audio to this xiaozhi-server (`ws://host:port/path`,
    /// one WebSocket per conversation) instead of echoing it.
    #[arg(long, value_name = "URL")]
    upstream: Option<String>,
}

#[derive(Args)]
pub struct UpstreamArgs {
    #[arg(long, default_value = "127.0.0.1:18900")]
    listen: SocketAddr,
    /// Play conversation turns so chat history records something: `S` or `A-B`
    /// seconds of uplink per utterance (then `stt`, a new `tts sentence_start`, and the
    /// echo as that sentence's audio). Off by default: audio is only echoed.
    #[arg(long, value_name = "SECS")]
    turn_secs: Option<Turns>,
}

/// Runs a bench subcommand to completion.
pub fn run(command: BenchCommand) -> ExitCode {
    match command {
        BenchCommand::Load(args) => run_load(args),
        BenchCommand::Floor(args) => run_floor(args),
        BenchCommand::Upstream(args) => run_upstream(args),
        BenchCommand::Commands(args) => run_commands(args),
        BenchCommand::Calls(args) => run_calls(args),
        BenchCommand::Push(args) => run_push(args),
    }
}

fn run_push(args: PushArgs) -> ExitCode {
    let rt = match runtime(args.threads) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let config = super::push::PushBenchConfig {
        mqtt: args.mqtt,
        http: args.http,
        signature_key: args.key,
        devices: args.devices,
        connect_rate: args.connect_rate,
        singles: args.singles,
        first_device: args.first_device,
        ..super::push::PushBenchConfig::default()
    };
    let report = rt.block_on(super::push::run(config));
    print_report(&report, args.json);
    let failed = report.connected < report.devices
        || report.fleet_received < u64::from(report.connected)
        || (args.check && report.errors > 0);
    if failed {
        eprintln!(
            "check failed: {} of {} devices connected, {} of them read the group push, {} errors",
            report.connected, report.devices, report.fleet_received, report.errors
        );
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

fn run_calls(args: CallsArgs) -> ExitCode {
    let rt = match runtime(args.threads) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let config = super::calls::CallsConfig {
        caller_mqtt: args.mqtt,
        callee_mqtt: args.callee_mqtt.unwrap_or(args.mqtt),
        http: args.http,
        signature_key: args.key,
        pairs: args.pairs,
        warmup: Duration::from_secs_f64(args.warmup.max(0.0)),
        measure: Duration::from_secs_f64(args.seconds.max(0.1)),
        frame_ms: 60,
        frame_bytes: args.frame_bytes,
        pids: args.pid,
        first_device: args.first_device,
    };
    let report = rt.block_on(super::calls::run(config));
    print_report(&report, args.json);
    let failed = report.bridged < report.pairs
        || report.frames_received == 0
        // A frame in flight at each end of the window may land on either side of it.
        || (args.check
            && (report.frames_received + 2 * u64::from(report.bridged) < report.frames_sent
                || report.rejected > 0));
    if failed {
        eprintln!(
            "check failed: {} of {} calls bridged, {} of {} frames received, {} rejected",
            report.bridged,
            report.pairs,
            report.frames_received,
            report.frames_sent,
            report.rejected
        );
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

/// Prints a tool's report as text, or as pretty JSON with `--json`.
pub fn print_report<R: serde::Serialize + std::fmt::Display>(report: &R, json: bool) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(report).unwrap_or_default()
        );
    } else {
        println!("{report}");
    }
}

/// A runtime for a tool (1 thread: the cheapest, a current-thread runtime), or the exit
/// code after saying why there is none.
fn runtime(threads: usize) -> Result<tokio::runtime::Runtime, ExitCode> {
    let built = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    };
    built.map_err(|e| {
        eprintln!("error: cannot start the runtime: {e}");
        ExitCode::FAILURE
    })
}

fn run_load(args: LoadArgs) -> ExitCode {
    let rt = match runtime(args.threads) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let config = LoadConfig {
        mqtt: args.mqtt,
        signature_key: args.key,
        devices: args.devices,
        connect_rate: args.connect_rate,
        talk: !args.idle,
        warmup: Duration::from_secs_f64(args.warmup.max(0.0)),
        measure: Duration::from_secs_f64(args.seconds.max(0.1)),
        frame_bytes: args.frame_bytes,
        source_addresses: args.source_addresses,
        target_pid: args.pid,
        first_device: args.first_device,
        pacers: args.pacers,
        transport: args.transport,
        firmware: args.firmware,
        ..LoadConfig::default()
    };
    let report = rt.block_on(load::run(config));
    print_report(&report, args.json);
    let failures = report.functional_failures();
    if args.check && !failures.is_empty() {
        for f in &failures {
            eprintln!("check failed: {f}");
        }
        return ExitCode::FAILURE;
    }
    if report.connected == 0 {
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

fn run_floor(args: FloorArgs) -> ExitCode {
    let floor = match Floor::start(FloorConfig {
        mqtt: args.mqtt,
        udp: args.udp,
        signature_key: args.key,
        upstream: args.upstream.clone(),
        ..FloorConfig::default()
    }) {
        Ok(f) => f,
        Err(e) => {
            eprintln!(
                "error: cannot start the floor on MQTT {} / UDP {}: {e}",
                args.mqtt, args.udp
            );
            return ExitCode::FAILURE;
        }
    };
    let what = match &args.upstream {
        Some(url) => format!("relay floor to {url}"),
        None => "floor echo server".to_owned(),
    };
    println!(
        "{what}: MQTT {} UDP {} (pid {})",
        floor.mqtt_addr(),
        floor.udp_addr(),
        std::process::id()
    );
    floor.wait();
    ExitCode::SUCCESS
}

fn run_upstream(args: UpstreamArgs) -> ExitCode {
    let rt = match runtime(1) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    rt.block_on(async {
        let upstream = match EchoUpstream::start_with_turns(args.listen, args.turn_secs).await {
            Ok(u) => u,
            Err(e) => {
                eprintln!("error: cannot listen on {}: {e}", args.listen);
                return ExitCode::FAILURE;
            }
        };
        println!(
            "echo upstream: {} (pid {})",
            upstream.url(),
            std::process::id()
        );
        wait_for_stop().await;
        let stats = upstream.stats();
        upstream.stop().await;
        println!("{}", serde_json::to_string(&stats).unwrap_or_default());
        ExitCode::SUCCESS
    })
}

fn run_commands(args: CommandsArgs) -> ExitCode {
    let Some((host, port)) = args
        .broker
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h.to_owned(), p.parse::<u16>().ok()?)))
    else {
        eprintln!("error: --broker {:?}: want host:port", args.broker);
        return ExitCode::from(2);
    };
    if args.nodes.is_empty() || args.devices == 0 {
        eprintln!("error: need at least one node and one device");
        return ExitCode::from(2);
    }
    let rt = match runtime(2) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let config = CommandsConfig {
        broker: (host, port),
        username: args.username,
        password: args.password,
        nodes: args.nodes,
        signature_key: args.key,
        devices: args.devices,
        commands: args.commands,
        concurrency: args.concurrency,
        kind: args.kind,
        first_device: args.first_device,
        timeout: Duration::from_secs(10),
    };
    match rt.block_on(commands::run(config)) {
        Ok(report) => {
            print_report(&report, args.json);
            if report.ok == 0 {
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Ctrl-C or SIGTERM (what `kill` and CI cleanups send).
async fn wait_for_stop() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
