//! The `xiaozhi-gateway soak` command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;

use super::plan::{self, FaultKind};
use super::{SoakConfig, run};

/// Talking devices through an upstream that one core carries, as measured: 1,000 devices
/// cost 37.9% of a core (docs/benchmarks.md, "Through an upstream"; README, Performance),
/// so one core carries about 2,640.
pub const MEASURED_DEVICES_PER_CORE: u32 = 2_640;

#[derive(Args)]
pub struct SoakArgs {
    /// Length of the run, in minutes (warm-up included; the drain and the check come after).
    #[arg(long, default_value_t = 60.0)]
    minutes: f64,
    /// Simulated devices. The default, 1,320, is half the measured per-core capacity
    /// through an upstream: 1,000 talking devices cost 37.9% of a core
    /// (docs/benchmarks.md, "Through an upstream"), about 2,640 per core.
    #[arg(long, default_value_t = MEASURED_DEVICES_PER_CORE / 2)]
    devices: u32,
    /// Seconds each of the database, Redis and the upstream is cut (default: a tenth of
    /// the run, 5 to 60 s: 30 s for a 5-minute run, 60 s from 10 minutes).
    #[arg(long)]
    fault_secs: Option<u64>,
    /// Faults to inject, in order: db, redis, upstream (cut), restart (the mock speech
    /// server stopped for up to 5 s and started on the same port); `none` for none.
    #[arg(long, default_value = "db,redis,upstream,restart")]
    faults: String,
    /// MariaDB/MySQL server for the chat history; the soak creates a database
    /// `xz_soak_<pid>_<time>` there and drops it afterwards (unless --keep-db).
    #[arg(long, default_value = "mysql://root@127.0.0.1:3306/test")]
    mysql: String,
    /// Redis for presence; the soak's keys get a prefix of their own and are deleted
    /// afterwards.
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    redis: String,
    /// Directory for soak.csv, summary.json, soak.png, gateway.log and the journal.
    #[arg(long, default_value = "soak-report")]
    report: PathBuf,
    /// Seconds between samples (CSV rows).
    #[arg(long, default_value_t = 5)]
    sample_secs: u64,
    /// Seconds between progress lines.
    #[arg(long, default_value_t = 30)]
    progress_secs: u64,
    /// Fail when the gateway's RSS at the end of the load is over this many MB.
    #[arg(long, default_value_t = 512)]
    max_rss_mb: u64,
    /// Fail when the gateway's tasks at the end of the load exceed those at the end of
    /// the warm-up by more than this many per device.
    #[arg(long, default_value_t = 2)]
    tasks_per_device: u64,
    /// Fail when the idle gateway after the run has more tasks than before it by more
    /// than this.
    #[arg(long, default_value_t = 64)]
    idle_task_slack: u64,
    /// Seconds to wait after the load for sessions to end and the journal to be replayed.
    #[arg(long, default_value_t = 180)]
    drain_secs: u64,
    /// Devices started per second during the ramp.
    #[arg(long, default_value_t = 100)]
    connect_rate: u32,
    /// Turns per conversation: 1 to this many.
    #[arg(long, default_value_t = 4)]
    max_turns: u32,
    /// Mean seconds between conversations of a device (uniform from half to 1.5x).
    #[arg(long, default_value_t = 10.0)]
    conversation_pause_secs: f64,
    /// Mean seconds between turns (uniform from half to 1.5x).
    #[arg(long, default_value_t = 2.0)]
    turn_pause_secs: f64,
    /// Chance that a device leaves (disconnects or vanishes) after a conversation.
    #[arg(long, default_value_t = 0.2)]
    churn: f64,
    /// Chance that a device that left comes back as a new device.
    #[arg(long, default_value_t = 0.5)]
    new_device_share: f64,
    /// Seeds the devices' random choices.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// history.mode of the gateway: text, or audio (decodes every utterance to WAV).
    #[arg(long, default_value = "text")]
    history_mode: String,
    /// Keep the soak's database for inspection.
    #[arg(long)]
    keep_db: bool,
    /// Do not render soak.png (needs Node.js, console/node_modules and Chromium).
    #[arg(long)]
    no_plot: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

fn around(mean_secs: f64) -> (Duration, Duration) {
    let mean = Duration::from_secs_f64(mean_secs.max(0.0));
    (mean / 2, mean.mul_f64(1.5))
}

/// Builds the configuration from the arguments.
pub fn config(args: &SoakArgs) -> Result<SoakConfig, String> {
    if args.minutes.is_nan() || args.minutes <= 0.0 {
        return Err("--minutes must be positive".into());
    }
    let total = Duration::from_secs_f64(args.minutes * 60.0);
    let kinds: Vec<FaultKind> = if args.faults.trim() == "none" {
        Vec::new()
    } else {
        args.faults
            .split(',')
            .filter(|s| !s.trim().is_empty())
            .map(|s| {
                FaultKind::parse(s).ok_or_else(|| {
                    format!("unknown fault {s:?} (db, redis, upstream, restart, none)")
                })
            })
            .collect::<Result<_, _>>()?
    };
    let fault = args
        .fault_secs
        .map_or_else(|| plan::default_fault(total), Duration::from_secs);
    let plan = plan::plan(total, fault, &kinds).map_err(|e| e.to_string())?;
    if !matches!(args.history_mode.as_str(), "text" | "audio") {
        return Err("--history-mode is text or audio".into());
    }
    if args.devices == 0 {
        return Err("--devices must be at least 1".into());
    }
    Ok(SoakConfig {
        plan,
        devices: args.devices,
        connect_rate: args.connect_rate.max(1),
        max_turns: args.max_turns.max(1),
        turn_pause: around(args.turn_pause_secs),
        conversation_pause: around(args.conversation_pause_secs),
        churn: args.churn,
        new_device_share: args.new_device_share,
        seed: args.seed,
        mysql: args.mysql.clone(),
        redis: args.redis.clone(),
        history_mode: args.history_mode.clone(),
        report_dir: args.report.clone(),
        sample_every: Duration::from_secs(args.sample_secs.max(1)),
        progress_every: Duration::from_secs(args.progress_secs.max(1)),
        drain_timeout: Duration::from_secs(args.drain_secs),
        max_rss_mb: args.max_rss_mb,
        tasks_per_device: args.tasks_per_device,
        idle_task_slack: args.idle_task_slack,
        keep_db: args.keep_db,
        plot: !args.no_plot,
    })
}

/// Runs `soak`: exit status 0 if every check passed, 1 if one failed, 2 if the soak
/// could not run.
pub fn main(args: SoakArgs) -> ExitCode {
    let config = match config(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(config)) {
        Ok(summary) => {
            if args.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&summary).unwrap_or_default()
                );
            } else {
                println!("{summary}");
            }
            if summary.passed() {
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
