//! The `xiaozhi-gateway` command: `serve` (the default), `config check`, `simulate`,
//! `credentials`, `bench`, and the admin and history tools.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use figment::Figment;
use figment::providers::Serialized;
use tracing_subscriber::EnvFilter;
use xiaozhi_gateway::admin::client::AdminClient;
use xiaozhi_gateway::config::{Config, LogFormat};
use xiaozhi_gateway::http::ota;
use xiaozhi_gateway::protocol::mac::Mac;
use xiaozhi_gateway::server::Gateway;
use xiaozhi_tools::bench::command::BenchCommand;
use xiaozhi_tools::bench::command::print_report;
use xiaozhi_tools::simulator::audio::Transport;
use xiaozhi_tools::simulator::firmware::Firmware;
use xiaozhi_tools::simulator::turns::{TurnConfig, run_turns};
use xiaozhi_tools::simulator::upstream::{MockUpstream, MockUpstreamConfig};
use xiaozhi_tools::simulator::{self, SimConfig};

#[derive(Parser)]
#[command(
    name = "xiaozhi-gateway",
    version,
    about = "Device edge for xiaozhi ESP32 voice assistants"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    config: ConfigArgs,
}

#[derive(Args, Clone)]
struct ConfigArgs {
    /// TOML config file (defaults < file < XZ_* environment).
    #[arg(long, short = 'c', global = true, env = "XZ_CONFIG")]
    config: Option<PathBuf>,
    /// Development mode: accept unsigned device passwords when no signature key is set
    /// (same as auth.allow_unsigned = true; a warning is logged at every start).
    #[arg(long, global = true)]
    dev: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (the default).
    Serve,
    /// Configuration tools.
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
    /// Simulate firmware devices against a running gateway and report latency and loss.
    Simulate(SimulateArgs),
    /// Print a device's MQTT settings (as the OTA endpoint hands them out) as JSON,
    /// signed with the configured signature key.
    Credentials(CredentialsArgs),
    /// Measure sustained chat-history writes (records/s) against a database.
    BenchHistory(BenchHistoryArgs),
    /// Create the chat-history schema in `history.database_url` (what is missing only;
    /// existing tables are never altered).
    Migrate,
    /// Run a mock xiaozhi-server (WebSocket) to try or measure the `xiaozhi` pipeline
    /// without a real one: it answers each turn with stt, tts and audio frames that carry
    /// their send time.
    MockUpstream(MockUpstreamArgs),
    /// List connected devices (online / in a conversation) through the broker listener,
    /// as an admin: state, node, group, remote address, session.
    Devices(DevicesArgs),
    /// Send an admin command to a device and print the reply: status, goodbye, kick,
    /// or mcp with a JSON-RPC request, e.g.
    /// `cmd aa:bb:cc:dd:ee:ff mcp '{"method":"tools/list"}'`.
    Cmd(CmdArgs),
    /// Benchmark tools: `load` (simulated devices, latency, loss, a process's CPU and
    /// RSS), `floor` (the minimal echo server to compare with) and `upstream` (a lean
    /// echoing xiaozhi-server stand-in). See docs/benchmarks.md.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Try the web console: a gateway with a mock speech server and a few simulated
    /// devices that keep talking (chat history in SQLite under ./xiaozhi-demo/ unless
    /// history.database_url is set). Prints the console's address and token.
    Demo(DemoArgs),
    /// Soak with faults: a churning fleet at half the measured per-core capacity for a
    /// chosen time while the database, Redis and the upstream are cut and the upstream is
    /// restarted; reports RSS and tasks over time and checks every conversation's chat
    /// history is in the database exactly once. See docs/soak.md.
    Soak(xiaozhi_tools::soak::command::SoakArgs),
}

#[derive(Args)]
struct DemoArgs {
    /// Simulated devices.
    #[arg(long, default_value_t = 3)]
    devices: u32,
    /// Turns per conversation.
    #[arg(long, default_value_t = 2)]
    turns: u32,
    /// Seconds each device pauses between conversations.
    #[arg(long, default_value_t = 20)]
    pause: u64,
}

#[derive(Args)]
struct AdminArgs {
    /// Broker address (default: broker.listen from the config, or with
    /// `bus.mode = "external"` the broker in bus.url).
    #[arg(long)]
    broker: Option<std::net::SocketAddr>,
    /// Broker user (default: the first admin in broker.users).
    #[arg(long, env = "XZ_ADMIN_USERNAME")]
    username: Option<String>,
    #[arg(long, env = "XZ_ADMIN_PASSWORD", hide_env_values = true)]
    password: Option<String>,
    /// How long to wait for the reply, in ms.
    #[arg(long, default_value_t = 10_000)]
    timeout_ms: u64,
    /// Print the raw JSON reply.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct DevicesArgs {
    #[command(flatten)]
    admin: AdminArgs,
    /// Only devices in this state: online or in_session.
    #[arg(long)]
    state: Option<String>,
    /// Only devices on this gateway node.
    #[arg(long)]
    node: Option<String>,
    /// Only devices of this client-id group.
    #[arg(long)]
    group: Option<String>,
}

#[derive(Args)]
struct CmdArgs {
    #[command(flatten)]
    admin: AdminArgs,
    /// The device's MAC (aa:bb:cc:dd:ee:ff or aa_bb_cc_dd_ee_ff).
    mac: Mac,
    /// status, goodbye, kick, mcp (or any command the gateway knows).
    command: String,
    /// For mcp: the JSON-RPC request (`{"method":...,"params":...}`); for others: extra
    /// fields of the command as a JSON object (e.g. `{"reason":"maintenance"}`).
    #[arg(value_name = "JSON")]
    payload: Option<String>,
}

#[derive(Args)]
struct BenchHistoryArgs {
    /// Database to write to (its rows use MACs starting with 02:be).
    #[arg(long, default_value = "mysql://root@127.0.0.1:3306/test")]
    database_url: String,
    #[arg(long, default_value_t = 50_000)]
    records: u64,
    /// Fill instead of measuring the writer: write `--records` rows for `--devices`
    /// devices, user and assistant taking turns in sessions spread over the last `--days`
    /// days, with multi-row INSERTs, and leave them in the database.
    #[arg(long)]
    fill: bool,
    /// With `--fill`: how many devices the rows belong to.
    #[arg(long, default_value_t = 1000, requires = "fill")]
    devices: u32,
    /// With `--fill`: sessions start within this many days before now.
    #[arg(long, default_value_t = 30, requires = "fill")]
    days: u32,
    /// With `--fill`: the zone the times are written in, as `history.utc_offset_minutes`.
    #[arg(
        long,
        default_value_t = 480,
        allow_hyphen_values = true,
        requires = "fill"
    )]
    utc_offset_minutes: i32,
    /// With `--fill`: seeds the generated devices, sessions and texts.
    #[arg(long, default_value_t = 1, requires = "fill")]
    seed: u64,
    /// Records per transaction at most.
    #[arg(long, default_value_t = 256)]
    batch: usize,
    /// Opus frames of audio per record, decoded to WAV and stored (0: text only).
    #[arg(long, default_value_t = 0)]
    audio_frames: u32,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct MockUpstreamArgs {
    /// Address to listen on; the URL to configure is ws://ADDR/xiaozhi/v1/.
    #[arg(long, default_value = "127.0.0.1:8000")]
    listen: std::net::SocketAddr,
    /// Verify the gateway's bearer token with this secret (xiaozhi-server's server.auth_key).
    #[arg(long, env = "XZ_PIPELINE__XIAOZHI__AUTH_KEY", hide_env_values = true)]
    auth_key: Option<String>,
    /// Uplink frames that make one user turn.
    #[arg(long, default_value_t = 5)]
    frames_per_turn: u32,
    /// Reply frames per turn.
    #[arg(long, default_value_t = 5)]
    reply_frames: u32,
    /// Pace reply frames at the frame duration (as xiaozhi-server does) instead of
    /// sending them at once.
    #[arg(long)]
    paced: bool,
}

#[derive(Args)]
struct CredentialsArgs {
    /// The device's MAC address (aa:bb:cc:dd:ee:ff or aa_bb_cc_dd_ee_ff).
    #[arg(long)]
    mac: Mac,
    /// Client id group (board type); default ota.group (GID_default).
    #[arg(long)]
    group: Option<String>,
    /// IP address put in the username, as manager-api records the device's address.
    #[arg(long, default_value = "127.0.0.1")]
    ip: std::net::IpAddr,
}

#[derive(Subcommand)]
enum ConfigAction {
    /// Load and validate the configuration, print warnings and the effective settings.
    Check,
}

#[derive(Args)]
struct SimulateArgs {
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => match load_config(&cli.config) {
            Ok(config) => {
                init_logging(&config);
                runtime.block_on(serve(config))
            }
            Err(code) => code,
        },
        Command::Config {
            action: ConfigAction::Check,
        } => match load_config(&cli.config) {
            Ok(config) => {
                for w in config.warnings() {
                    println!("warning: {w}");
                }
                let mut shown = config.clone();
                if shown.auth.signature_key.is_some() {
                    shown.auth.signature_key = Some("<redacted>".into());
                }
                shown.history.database_url =
                    xiaozhi_gateway::config::redact_url(&shown.history.database_url);
                if shown.history.api_token.is_some() {
                    shown.history.api_token = Some("<redacted>".into());
                }
                if shown.pipeline.xiaozhi.auth_key.is_some() {
                    shown.pipeline.xiaozhi.auth_key = Some("<redacted>".into());
                }
                for user in &mut shown.broker.users {
                    user.password = "<redacted>".into();
                }
                match effective_config_json(&shown) {
                    Ok(text) => println!("{text}"),
                    Err(e) => eprintln!("(cannot print the effective config: {e})"),
                }
                println!("config OK");
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Credentials(args) => match load_config(&cli.config) {
            Ok(config) => credentials(&config, &args),
            Err(code) => code,
        },
        Command::Simulate(args) if args.turns => {
            tracing_subscriber::fmt()
                .with_env_filter(EnvFilter::new("warn"))
                .init();
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
            let report = runtime.block_on(run_turns(config));
            print_report(&report, args.json);
            if report.conversations == 0 {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Command::BenchHistory(args) => {
            tracing_subscriber::fmt()
                .with_env_filter(EnvFilter::new("warn"))
                .init();
            if args.fill {
                let config = xiaozhi_tools::bench::history::FillConfig {
                    database_url: args.database_url,
                    rows: args.records,
                    devices: args.devices,
                    days: args.days,
                    utc_offset_minutes: args.utc_offset_minutes,
                    seed: args.seed,
                };
                return report_result(
                    runtime.block_on(xiaozhi_tools::bench::history::fill(config)),
                    args.json,
                );
            }
            let config = xiaozhi_tools::bench::history::BenchConfig {
                database_url: args.database_url,
                records: args.records,
                batch: args.batch,
                audio_frames: args.audio_frames,
            };
            report_result(
                runtime.block_on(xiaozhi_tools::bench::history::run(config)),
                args.json,
            )
        }
        Command::Migrate => match load_config(&cli.config) {
            Ok(config) => runtime.block_on(migrate(config)),
            Err(code) => code,
        },
        Command::Demo(args) => match load_admin_config(&cli.config) {
            Ok(config) => {
                init_logging(&config);
                runtime.block_on(demo(config, args))
            }
            Err(code) => code,
        },
        Command::MockUpstream(args) => {
            tracing_subscriber::fmt()
                .with_env_filter(EnvFilter::new("info"))
                .init();
            runtime.block_on(mock_upstream(args))
        }
        Command::Devices(args) => match load_admin_config(&cli.config) {
            Ok(config) => runtime.block_on(devices(&config, args)),
            Err(code) => code,
        },
        Command::Cmd(args) => match load_admin_config(&cli.config) {
            Ok(config) => runtime.block_on(cmd(&config, args)),
            Err(code) => code,
        },
        Command::Bench(command) => {
            tracing_subscriber::fmt()
                .with_env_filter(EnvFilter::new("warn"))
                .init();
            drop(runtime);
            xiaozhi_tools::bench::command::run(command)
        }
        Command::Soak(args) => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")),
                )
                .init();
            drop(runtime);
            xiaozhi_tools::soak::command::main(args)
        }
        Command::Simulate(args) => {
            tracing_subscriber::fmt()
                .with_env_filter(EnvFilter::new("warn"))
                .init();
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
            let report = runtime.block_on(simulator::run(config));
            print_report(&report, args.json);
            if report.connected == 0 {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
    }
}

/// Prints a tool's report (success) or its error (failure).
fn report_result<R, E>(result: Result<R, E>, json: bool) -> ExitCode
where
    R: serde::Serialize + std::fmt::Display,
    E: std::fmt::Display,
{
    match result {
        Ok(report) => {
            print_report(&report, json);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `credentials`: the device's MQTT settings as JSON on stdout.
fn credentials(config: &Config, args: &CredentialsArgs) -> ExitCode {
    let group = match &args.group {
        None => config.ota.group.clone(),
        Some(g) => match ota::sanitize_group(g) {
            Some(clean) if clean == *g => clean,
            _ => {
                eprintln!(
                    "error: --group {g:?} is not a valid group (want 1 to {} characters of A-Z a-z 0-9 _ -)",
                    ota::MAX_GROUP_LEN
                );
                return ExitCode::from(2);
            }
        },
    };
    if config.auth.signature_key.is_none() {
        eprintln!(
            "warning: no signature key is set; the password is unsigned and only a gateway in development mode (--dev) accepts it"
        );
    }
    let ports = ota::MqttPorts {
        plain: config.mqtt.listen.port(),
        tls: config.device_tls().map(|_| config.mqtt.tls_listen.port()),
    };
    let endpoint = match ota::ota_endpoint(config, ports) {
        Ok(endpoint) => endpoint,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let settings = ota::mqtt_settings(config, &endpoint, &group, &args.mac, &args.ip.to_string());
    match serde_json::to_string_pretty(&settings) {
        Ok(text) => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: cannot print the settings: {e}");
            ExitCode::FAILURE
        }
    }
}

fn effective_config_json(config: &Config) -> Result<String, String> {
    let value = serde_json::to_value(config).map_err(|e| e.to_string())?;
    Ok(format!("{value:#}"))
}

fn load_config(args: &ConfigArgs) -> Result<Config, ExitCode> {
    let overrides = if args.dev {
        Figment::from(Serialized::default("auth.allow_unsigned", true))
    } else {
        Figment::new()
    };
    Config::load(args.config.as_deref(), overrides).map_err(|e| {
        eprintln!("error: {e}");
        ExitCode::from(2)
    })
}

/// The config for admin commands: they serve no devices, so a missing signature key is
/// not an error here.
fn load_admin_config(args: &ConfigArgs) -> Result<Config, ExitCode> {
    let overrides = Figment::from(Serialized::default("auth.allow_unsigned", true));
    Config::load(args.config.as_deref(), overrides).map_err(|e| {
        eprintln!("error: {e}");
        ExitCode::from(2)
    })
}

async fn admin_client(config: &Config, args: &AdminArgs) -> Result<AdminClient, ExitCode> {
    let external = config.bus.mode == xiaozhi_gateway::config::BusMode::External;
    // Where admins connect: --broker, else the external bus broker, else the embedded
    // broker listener.
    let (host, port) = match (args.broker, external) {
        (Some(addr), _) => (addr.ip().to_string(), addr.port()),
        (None, true) => match config.bus.broker_address() {
            Ok(hp) => hp,
            Err(e) => {
                eprintln!("error: bus.url {:?}: {e}", config.bus.url);
                return Err(ExitCode::from(2));
            }
        },
        (None, false) => {
            let mut addr = config.broker.listen;
            if addr.ip().is_unspecified() {
                addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
            }
            (addr.ip().to_string(), addr.port())
        }
    };
    let from_config = config
        .broker
        .users
        .iter()
        .find(|u| u.role == xiaozhi_gateway::config::BrokerRole::Admin)
        .map(|u| (u.username.clone(), u.password.clone()));
    // On an external broker: the broker's own users; this node's bus login, or none
    // (anonymous), when no admin is named.
    let from_bus = external.then(|| {
        (
            config.bus.username.clone().unwrap_or_default(),
            config.bus.password.clone().unwrap_or_default(),
        )
    });
    let (Some(username), Some(password)) = (
        args.username
            .clone()
            .or_else(|| from_config.as_ref().map(|u| u.0.clone()))
            .or_else(|| from_bus.as_ref().map(|u| u.0.clone())),
        args.password
            .clone()
            .or_else(|| from_config.as_ref().map(|u| u.1.clone()))
            .or_else(|| from_bus.as_ref().map(|u| u.1.clone())),
    ) else {
        eprintln!(
            "error: no broker user: pass --username/--password (XZ_ADMIN_USERNAME/XZ_ADMIN_PASSWORD) or add an admin to broker.users"
        );
        return Err(ExitCode::from(2));
    };
    AdminClient::connect(&host, port, &username, &password, Duration::from_secs(5))
        .await
        .map_err(|e| {
            eprintln!("error: {e}");
            ExitCode::from(2)
        })
}

/// `devices`: every connected device, page by page.
async fn devices(config: &Config, args: DevicesArgs) -> ExitCode {
    let client = match admin_client(config, &args.admin).await {
        Ok(c) => c,
        Err(code) => return code,
    };
    let timeout = Duration::from_millis(args.admin.timeout_ms);
    let mut after: Option<String> = None;
    let mut all = Vec::new();
    loop {
        let filter = serde_json::json!({
            "state": args.state, "node": args.node, "group": args.group,
            "after": after, "limit": 1000,
        });
        let filter: serde_json::Map<String, serde_json::Value> = filter
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(_, v)| !v.is_null())
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let reply = match client
            .request(
                None,
                serde_json::json!({"command": "list_online", "filter": filter}),
                timeout,
            )
            .await
        {
            Ok(r) => r,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
        };
        if reply["ok"] != true {
            eprintln!("error: {}", reply["error"]);
            return ExitCode::FAILURE;
        }
        let result = &reply["result"];
        all.extend(result["devices"].as_array().cloned().unwrap_or_default());
        match result["next"].as_str() {
            Some(next) => after = Some(next.to_owned()),
            None => break,
        }
    }
    client.disconnect().await;
    if args.admin.json {
        println!("{}", serde_json::Value::Array(all));
        return ExitCode::SUCCESS;
    }
    println!(
        "{:<18} {:<10} {:<14} {:<16} {:<22} {:<9} SESSION",
        "MAC", "STATE", "NODE", "GROUP", "REMOTE", "SINCE"
    );
    let now = xiaozhi_gateway::history::record::now_ms();
    for d in &all {
        let since = d["session_since_ms"]
            .as_i64()
            .or(d["connected_at_ms"].as_i64())
            .map(|t| format_age(now - t))
            .unwrap_or_default();
        println!(
            "{:<18} {:<10} {:<14} {:<16} {:<22} {:<9} {}",
            d["mac_address"].as_str().unwrap_or(""),
            d["state"].as_str().unwrap_or(""),
            d["node"].as_str().unwrap_or(""),
            d["group"].as_str().unwrap_or(""),
            d["remote"].as_str().unwrap_or(""),
            since,
            d["session_id"].as_str().unwrap_or(""),
        );
    }
    let in_session = all.iter().filter(|d| d["state"] == "in_session").count();
    let in_call = all.iter().filter(|d| d["state"] == "in_call").count();
    println!(
        "{} connected, {} in a conversation, {} in a device call",
        all.len(),
        in_session,
        in_call
    );
    ExitCode::SUCCESS
}

fn format_age(ms: i64) -> String {
    let s = (ms / 1000).max(0);
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        _ => format!("{}h{}m", s / 3600, (s % 3600) / 60),
    }
}

/// `cmd`: one admin command, its reply on stdout; exit 0 on success, 1 on an error reply.
async fn cmd(config: &Config, args: CmdArgs) -> ExitCode {
    let extra = match args
        .payload
        .as_deref()
        .map(serde_json::from_str::<serde_json::Value>)
    {
        None => None,
        Some(Ok(v)) if v.is_object() => Some(v),
        Some(Ok(_)) => {
            eprintln!("error: the JSON argument must be an object");
            return ExitCode::from(2);
        }
        Some(Err(e)) => {
            eprintln!("error: the JSON argument is not JSON: {e}");
            return ExitCode::from(2);
        }
    };
    let mut command = serde_json::json!({"command": args.command});
    match (args.command.as_str(), extra) {
        ("mcp", Some(payload)) => command["payload"] = payload,
        ("mcp", None) => {
            eprintln!("error: mcp needs a JSON-RPC request, e.g. '{{\"method\":\"tools/list\"}}'");
            return ExitCode::from(2);
        }
        (_, Some(serde_json::Value::Object(fields))) => {
            for (k, v) in fields {
                command[k] = v;
            }
        }
        _ => {}
    }
    let client = match admin_client(config, &args.admin).await {
        Ok(c) => c,
        Err(code) => return code,
    };
    let timeout = Duration::from_millis(args.admin.timeout_ms);
    let reply = client.request(Some(&args.mac), command, timeout).await;
    client.disconnect().await;
    match reply {
        Ok(reply) => {
            let ok = reply["ok"] == true;
            if args.admin.json {
                println!("{reply}");
            } else if ok {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&reply["result"]).unwrap_or_default()
                );
            } else {
                eprintln!(
                    "error: {}: {}",
                    reply["error"]["code"].as_str().unwrap_or("?"),
                    reply["error"]["message"].as_str().unwrap_or("")
                );
            }
            if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

fn init_logging(config: &Config) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("{},rumqttd=warn", config.log.level)));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match config.log.format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn serve(config: Config) -> ExitCode {
    let gateway = match Gateway::start(config).await {
        Ok(g) => g,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    wait_for_signal().await;
    gateway.shutdown().await;
    ExitCode::SUCCESS
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

async fn demo(mut config: Config, args: DemoArgs) -> ExitCode {
    use xiaozhi_tools::simulator::demo::{DemoDevice, demo_dialogue};
    use xiaozhi_tools::simulator::device::DeviceCredentials;

    const FRAMES_PER_TURN: u32 = 10;
    let mock = match MockUpstream::start_on(
        ([127, 0, 0, 1], 0).into(),
        MockUpstreamConfig {
            frames_per_turn: FRAMES_PER_TURN,
            reply_frames: 10,
            paced: true,
            dialogue: demo_dialogue(),
            ..MockUpstreamConfig::default()
        },
    )
    .await
    {
        Ok(m) => m,
        Err(e) => {
            eprintln!("error: cannot start the mock speech server: {e}");
            return ExitCode::FAILURE;
        }
    };
    let defaults = Config::default();
    if config.history.database_url == defaults.history.database_url {
        config.history.database_url = "sqlite://xiaozhi-demo/history.db".into();
    }
    if config.history.journal_dir == defaults.history.journal_dir {
        config.history.journal_dir = "xiaozhi-demo/journal".into();
    }
    config.history.enabled = true;
    let token = config
        .history
        .api_token
        .get_or_insert_with(|| hex::encode(rand::random::<[u8; 16]>()))
        .clone();
    // The demo's devices sign with the configured key, or one made up for this run.
    let key = config
        .auth
        .signature_key
        .get_or_insert_with(|| format!("Demo-{}", hex::encode(rand::random::<[u8; 16]>())))
        .clone();
    config.auth.allow_unsigned = false;
    config.pipeline.kind = xiaozhi_gateway::config::PipelineKind::Xiaozhi;
    config.pipeline.xiaozhi.urls = vec![mock.url.clone()];
    let gateway = match Gateway::start(config).await {
        Ok(g) => g,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut http = gateway.addrs.http;
    if http.ip().is_unspecified() {
        http.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let mut mqtt = gateway.addrs.mqtt;
    if mqtt.ip().is_unspecified() {
        mqtt.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let stop = tokio_util::sync::CancellationToken::new();
    let mut devices = tokio::task::JoinSet::new();
    for n in 0..args.devices {
        let mac = DeviceCredentials::nth_mac(n);
        let device = DemoDevice {
            mqtt,
            credentials: DeviceCredentials::for_mac(mac, "GID_demo", Some(key.as_bytes())),
            turns: args.turns.max(1),
            frames_per_turn: FRAMES_PER_TURN,
            pause: Duration::from_secs(args.pause) + Duration::from_millis(u64::from(n) * 1500),
            reconnect_after: Duration::from_secs(15),
        };
        devices.spawn(device.run(stop.clone()));
    }
    println!();
    println!("  console:  http://{http}/console/");
    println!("  token:    {token}");
    println!(
        "  devices:  {} talking (MQTT {mqtt}), mock speech server {}",
        args.devices, mock.url
    );
    println!();
    println!("  Stop with Ctrl-C.");
    wait_for_signal().await;
    stop.cancel();
    while devices.join_next().await.is_some() {}
    gateway.shutdown().await;
    mock.stop().await;
    ExitCode::SUCCESS
}

async fn mock_upstream(args: MockUpstreamArgs) -> ExitCode {
    let config = MockUpstreamConfig {
        auth_key: args.auth_key,
        frames_per_turn: args.frames_per_turn,
        reply_frames: args.reply_frames,
        paced: args.paced,
        stamp_frames: true,
        ..MockUpstreamConfig::default()
    };
    let mock = match MockUpstream::start_on(args.listen, config).await {
        Ok(mock) => mock,
        Err(e) => {
            eprintln!(
                "error: cannot listen on {}: {e} (change --listen)",
                args.listen
            );
            return ExitCode::FAILURE;
        }
    };
    println!(
        "mock xiaozhi-server listening; configure pipeline.xiaozhi.urls = [\"{}\"]",
        mock.url
    );
    wait_for_signal().await;
    mock.stop().await;
    let seen = mock.observed();
    println!(
        "connections {}, refused {}, turns {}, uplink frames {}",
        seen.connections,
        seen.rejected.len(),
        seen.turns,
        seen.uplink_frames
    );
    ExitCode::SUCCESS
}

async fn migrate(config: Config) -> ExitCode {
    use xiaozhi_gateway::history::store::Store;
    let url = &config.history.database_url;
    let shown = xiaozhi_gateway::config::redact_url(url);
    if let Some(path) = url.strip_prefix("sqlite://")
        && let Some(parent) = std::path::Path::new(path).parent()
        && !parent.as_os_str().is_empty()
        && let Err(e) = std::fs::create_dir_all(parent)
    {
        eprintln!("error: cannot create {}: {e}", parent.display());
        return ExitCode::FAILURE;
    }
    let store = match Store::connect(url, Duration::from_secs(10)).await {
        Ok(store) => store,
        Err(e) => {
            eprintln!("error: {shown}: {e} (history.database_url)");
            return ExitCode::FAILURE;
        }
    };
    match store.migrate().await {
        Ok(applied) => {
            for name in applied {
                println!("{name}: up to date");
            }
            println!("chat-history schema ready in {shown}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: migrating {shown}: {e}");
            ExitCode::FAILURE
        }
    }
}
