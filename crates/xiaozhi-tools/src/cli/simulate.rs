//! `xiaozhi-gateway simulate`: firmware-exact devices against a running gateway, streaming
//! to its echo pipeline (or, with `--turns`, taking turns through a speech server), and a
//! report of latency and loss.

use std::process::ExitCode;
use std::time::Duration;

use clap::Args;

use crate::bench::command::print_report;
use crate::simulator::audio::Transport;
use crate::simulator::firmware::Firmware;
use crate::simulator::turns::{TurnConfig, run_turns};
use crate::simulator::{self, SimConfig};

#[derive(Args)]
pub struct SimulateArgs {
    /// Gateway device MQTT address; several, comma-separated, for a cluster: devices
    /// are spread over them, and one whose node goes away connects to the next.
    #[arg(long, default_value = "127.0.0.1:1883", value_delimiter = ',')]
    mqtt: Vec<std::net::SocketAddr>,
    /// Number of devices.
    #[arg(long, default_value_t = 10)]
    devices: u32,
    /// Seconds each device streams audio.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Signature key to sign device passwords with (omit for a gateway in --dev mode).
    #[arg(long, env = "XZ_AUTH__SIGNATURE_KEY", hide_env_values = true)]
    key: Option<String>,
    /// Devices started per second.
    #[arg(long, default_value_t = 500)]
    connect_rate: u32,
    /// Bytes per synthetic Opus frame.
    #[arg(long, default_value_t = 60)]
    frame_bytes: usize,
    /// First device number (for disjoint MACs across runs).
    #[arg(long, default_value_t = 0)]
    first_device: u32,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Take turns through a speech server (the `xiaozhi` pipeline, e.g. against
    /// `mock-upstream`) instead of streaming to the echo pipeline, and report the relay
    /// latency (server send to device receive).
    #[arg(long)]
    turns: bool,
    /// With --turns: frames spoken per turn and reply frames expected (the mock's settings).
    #[arg(long, default_value_t = 5)]
    frames_per_turn: u32,
    #[arg(long, default_value_t = 5)]
    reply_frames: u32,
    /// With --turns: also watch the gateway's history feed (e.g.
    /// ws://127.0.0.1:8007/ws/admin) and report how long after each stt its row was
    /// stored; needs --history-token (the gateway's history.api_token).
    #[arg(long, requires = "history_token")]
    history_feed: Option<String>,
    #[arg(long, env = "XZ_HISTORY__API_TOKEN", hide_env_values = true)]
    history_token: Option<String>,
    /// The audio transport devices ask for in their hello: ctr (stock firmware,
    /// AES-128-CTR over UDP), gcm (AES-128-GCM over UDP) or quic (needs quic.enabled on
    /// the gateway).
    #[arg(long, value_enum, default_value_t = Transport::Ctr)]
    transport: Transport,
    /// The firmware devices run: 2.4 (hello with glyph_push and text_font; a server
    /// message 2.4 would refuse is an error) or 1 (the 1.x hello).
    #[arg(long, value_enum, default_value_t = Firmware::V2_4)]
    firmware: Firmware,
}

/// Runs the simulation; fails when no device connected (or, with `--turns`, no
/// conversation completed).
pub async fn simulate(args: SimulateArgs) -> ExitCode {
    if args.turns {
        return take_turns(args).await;
    }
    let config = SimConfig {
        mqtt: args.mqtt,
        signature_key: args.key,
        devices: args.devices,
        stream_for: Duration::from_secs_f64(args.seconds.max(0.0)),
        connect_rate: args.connect_rate,
        frame_bytes: args.frame_bytes,
        first_device: args.first_device,
        transport: args.transport,
        firmware: args.firmware,
        ..SimConfig::default()
    };
    let report = simulator::run(config).await;
    print_report(&report, args.json);
    if report.connected == 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

async fn take_turns(args: SimulateArgs) -> ExitCode {
    let [mqtt] = args.mqtt[..] else {
        eprintln!("error: --turns takes one --mqtt address");
        return ExitCode::from(2);
    };
    let config = TurnConfig {
        mqtt,
        signature_key: args.key,
        devices: args.devices,
        duration: Duration::from_secs_f64(args.seconds.max(0.0)),
        frames_per_turn: args.frames_per_turn,
        reply_frames: args.reply_frames,
        connect_rate: args.connect_rate,
        first_device: args.first_device,
        history_feed: args.history_feed.zip(args.history_token),
        transport: args.transport,
        ..TurnConfig::default()
    };
    let report = run_turns(config).await;
    print_report(&report, args.json);
    if report.conversations == 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
