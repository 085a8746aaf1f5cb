//! The `xiaozhi-gateway` command: parses the command line, loads the configuration and
//! dispatches. It runs `serve` (the default), `config check`, `credentials` and `migrate`
//! itself; the subcommands that drive a gateway from outside (`simulate`, `demo`,
//! `mock-upstream`, `devices`, `cmd`, `bench`, `bench-history`, `soak`) live in the
//! `xiaozhi-tools` crate.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use figment::Figment;
use figment::providers::Serialized;
use tracing_subscriber::EnvFilter;
use xiaozhi_gateway::config::{Config, LogFormat};
use xiaozhi_gateway::http::ota;
use xiaozhi_gateway::protocol::mac::Mac;
use xiaozhi_gateway::server::{Gateway, shutdown_signal};
use xiaozhi_tools::bench::command::BenchCommand;
use xiaozhi_tools::cli::admin::{self, CmdArgs, DevicesArgs};
use xiaozhi_tools::cli::bench_history::{self, BenchHistoryArgs};
use xiaozhi_tools::cli::demo::{self, DemoArgs, MockUpstreamArgs};
use xiaozhi_tools::cli::push::{self, PushArgs};
use xiaozhi_tools::cli::simulate::{self, SimulateArgs};

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
    /// Push to devices that nobody is talking to: notify (a clip to play), wake (the
    /// device asks its speech server `--reason`), custom, alert, reboot; to `--to MAC`
    /// (repeatable), `--group` or `--fleet`. Queued until each device is connected and
    /// idle, e.g. `push alert --to aa:bb:cc:dd:ee:ff --status Reminder --message "Water the plants"`.
    Push(PushArgs),
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
        Command::Simulate(args) => {
            quiet_logging("warn");
            runtime.block_on(simulate::simulate(args))
        }
        Command::BenchHistory(args) => {
            quiet_logging("warn");
            runtime.block_on(bench_history::bench_history(args))
        }
        Command::Migrate => match load_config(&cli.config) {
            Ok(config) => runtime.block_on(migrate(config)),
            Err(code) => code,
        },
        Command::Demo(args) => match load_admin_config(&cli.config) {
            Ok(config) => {
                init_logging(&config);
                runtime.block_on(demo::demo(config, args))
            }
            Err(code) => code,
        },
        Command::MockUpstream(args) => {
            quiet_logging("info");
            runtime.block_on(demo::mock_upstream(args))
        }
        Command::Devices(args) => match load_admin_config(&cli.config) {
            Ok(config) => runtime.block_on(admin::devices(&config, args)),
            Err(code) => code,
        },
        Command::Cmd(args) => match load_admin_config(&cli.config) {
            Ok(config) => runtime.block_on(admin::cmd(&config, args)),
            Err(code) => code,
        },
        Command::Push(args) => match load_admin_config(&cli.config) {
            Ok(config) => runtime.block_on(push::push(&config, args)),
            Err(code) => code,
        },
        Command::Bench(command) => {
            quiet_logging("warn");
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

/// Logging for the tools: human-readable at `level`, whatever the config says.
fn quiet_logging(level: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::new(level))
        .init();
}

/// Logging for the gateway, from `log.*`; `RUST_LOG` wins.
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
    shutdown_signal().await;
    gateway.shutdown().await;
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
