//! `xiaozhi-gateway soak`: the gateway under a steady, churning load for a long time
//! while its dependencies fail, watched for leaks and for lost or doubled chat history.
//!
//! A benchmark says how fast the gateway is for a minute; a soak says whether it is
//! still right after an hour of devices coming and going and of the database, Redis and
//! the speech server going away and coming back. The gateway runs as a child process
//! ([`gateway`]) against the real MariaDB and Redis and an in-process mock
//! xiaozhi-server, each reached through a [`fault_proxy`] the [`plan`] cuts on
//! schedule (and the mock is restarted once). A simulated [`fleet`] holds conversations
//! and keeps the ledger of what must be in the database; [`sampler`] follows the
//! gateway's memory and task count; at the end [`check`] compares the ledger with the
//! database and [`report`] writes the time series, the summary and the verdict.
//!
//! * [`command`]: the command line.
//! * [`deps`]: the soak's own database and Redis namespace, and URLs through the proxies.

pub mod check;
pub mod command;
pub mod deps;
pub mod fault_proxy;
pub mod fleet;
pub mod gateway;
pub mod plan;
pub mod report;
pub mod sampler;

use std::fs::File;
use std::io::BufWriter;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use self::fault_proxy::FaultProxy;
use self::fleet::{Fleet, FleetConfig};
use self::gateway::{GatewayError, GatewayProcess};
use self::plan::{FaultKind, Plan};
use self::report::{CsvWriter, Sample, Span, Summary};
use self::sampler::GatewayGauges;
use crate::bench::procstat;
use crate::simulator::demo::demo_dialogue;
use crate::simulator::upstream::{MockUpstream, MockUpstreamConfig};

/// Frames per user turn and reply frames per answer of the mock speech server.
const FRAMES_PER_TURN: u32 = 10;
const REPLY_FRAMES: u32 = 10;

/// Everything a soak run needs.
#[derive(Debug, Clone)]
pub struct SoakConfig {
    pub plan: Plan,
    pub devices: u32,
    pub connect_rate: u32,
    pub max_turns: u32,
    pub turn_pause: (Duration, Duration),
    pub conversation_pause: (Duration, Duration),
    pub churn: f64,
    pub new_device_share: f64,
    pub seed: u64,
    /// MariaDB/MySQL server (any database; the soak creates its own).
    pub mysql: String,
    pub redis: String,
    /// `history.mode` of the gateway (`text` or `audio`).
    pub history_mode: String,
    pub report_dir: PathBuf,
    pub sample_every: Duration,
    pub progress_every: Duration,
    pub drain_timeout: Duration,
    /// Fail when the gateway's RSS at the end of the load exceeds this.
    pub max_rss_mb: u64,
    /// Fail when the tasks at the end of the load exceed those at the end of the
    /// warm-up by more than this many per device.
    pub tasks_per_device: u64,
    /// Fail when the idle gateway at the end has more tasks than the idle gateway at the
    /// start by more than this.
    pub idle_task_slack: u64,
    pub keep_db: bool,
    /// Render the CSV to PNG with `console/scripts/plot-soak.mjs`.
    pub plot: bool,
}

/// Why a soak could not run at all (a failed check is not an error: it is in the
/// summary).
#[derive(Debug, thiserror::Error)]
pub enum SoakError {
    #[error("cannot create the report directory {path}: {source}")]
    ReportDir {
        path: String,
        source: std::io::Error,
    },
    #[error("bad URL {0:?}")]
    Url(String),
    #[error("cannot reach {what} at {addr}: {source}")]
    Resolve {
        what: &'static str,
        addr: String,
        source: std::io::Error,
    },
    #[error("cannot create the soak database {name}: {source}")]
    Database { name: String, source: sqlx::Error },
    #[error("cannot start {what}: {source}")]
    Start {
        what: &'static str,
        source: std::io::Error,
    },
    #[error(transparent)]
    Gateway(#[from] GatewayError),
}

/// The mock speech server (restartable on its port).
struct Upstream {
    addr: SocketAddr,
    mock: Option<MockUpstream>,
    restarts: u32,
}

fn mock_config() -> MockUpstreamConfig {
    MockUpstreamConfig {
        frames_per_turn: FRAMES_PER_TURN,
        reply_frames: REPLY_FRAMES,
        paced: true,
        dialogue: demo_dialogue(),
        ..MockUpstreamConfig::default()
    }
}

impl Upstream {
    async fn stop(&mut self) {
        if let Some(mock) = self.mock.take() {
            mock.stop().await;
        }
    }

    async fn start(&mut self) {
        for _ in 0..100 {
            match MockUpstream::start_on(self.addr, mock_config()).await {
                Ok(mock) => {
                    self.mock = Some(mock);
                    self.restarts += 1;
                    return;
                }
                Err(e) => {
                    warn!(error = %e, addr = %self.addr, "soak: mock speech server cannot bind yet");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

/// The three proxies and the mock behind one of them.
struct Faults {
    db: FaultProxy,
    redis: FaultProxy,
    upstream_proxy: FaultProxy,
    upstream: Upstream,
}

impl Faults {
    async fn begin(&mut self, kind: FaultKind) {
        info!(fault = %kind, "soak: fault begins");
        match kind {
            FaultKind::Database => self.db.cut(),
            FaultKind::Redis => self.redis.cut(),
            FaultKind::Upstream => self.upstream_proxy.cut(),
            FaultKind::UpstreamRestart => self.upstream.stop().await,
        }
    }

    async fn end(&mut self, kind: FaultKind) {
        info!(fault = %kind, "soak: fault ends");
        match kind {
            FaultKind::Database => self.db.restore(),
            FaultKind::Redis => self.redis.restore(),
            FaultKind::Upstream => self.upstream_proxy.restore(),
            FaultKind::UpstreamRestart => self.upstream.start().await,
        }
    }
}

/// Reads the gateway: memory, CPU since the last reading, gauges.
struct Watch {
    pid: u32,
    http: SocketAddr,
    last_cpu: Option<procstat::ProcSample>,
    gauges: GatewayGauges,
}

impl Watch {
    async fn sample(
        &mut self,
        t: Duration,
        phase: &'static str,
        fault: String,
        fleet: &fleet::FleetSnapshot,
    ) -> Sample {
        let memory = sampler::memory(self.pid).unwrap_or_default();
        let cpu = procstat::sample(Some(self.pid)).ok();
        let cpu_percent = match (&self.last_cpu, &cpu) {
            (Some(a), Some(b)) => procstat::cpu_between(a, b).total_percent,
            _ => 0.0,
        };
        if cpu.is_some() {
            self.last_cpu = cpu;
        }
        match sampler::scrape(self.http).await {
            Ok(g) => self.gauges = g,
            Err(e) => warn!(error = %e, "soak: cannot scrape the gateway's /metrics"),
        }
        let g = &self.gauges;
        Sample {
            t_secs: t.as_secs_f64(),
            phase,
            fault,
            rss_kb: memory.rss_kb,
            hwm_kb: memory.hwm_kb,
            cpu_percent,
            tasks_alive: g.tasks_alive,
            devices_connected: g.devices_connected,
            sessions_live: g.sessions_live,
            fleet_connected: fleet.connected,
            conversations: fleet.conversations,
            turns_completed: fleet.turns_completed,
            journal_bytes: g.history_journal_bytes,
            records_stored: g.records_stored,
            records_journaled: g.records_journaled,
            records_lost: g.records_lost,
        }
    }
}

fn progress(s: &Sample, total: Duration) {
    println!(
        "[{:>6.0}/{:.0} s] {:<5} rss {:>6.1} MB  tasks {:>6}  cpu {:>5.1}%  devices {:>5}  sessions {:>5}  conversations {:>7}  turns {:>7}  journal {:>8} B  stored {:>8}{}",
        s.t_secs,
        total.as_secs_f64(),
        s.phase,
        s.rss_kb as f64 / 1024.0,
        s.tasks_alive,
        s.cpu_percent,
        s.devices_connected,
        s.sessions_live,
        s.conversations,
        s.turns_completed,
        s.journal_bytes,
        s.records_stored,
        if s.fault.is_empty() {
            String::new()
        } else {
            format!("  FAULT {}", s.fault)
        }
    );
}

/// Runs the soak and returns its summary (whose `failures` decide the verdict).
pub async fn run(config: SoakConfig) -> Result<Summary, SoakError> {
    let dir = &config.report_dir;
    std::fs::create_dir_all(dir).map_err(|source| SoakError::ReportDir {
        path: dir.display().to_string(),
        source,
    })?;
    let run_id = format!(
        "{}_{}",
        std::process::id(),
        xiaozhi_gateway::history::record::now_ms() / 1000
    );
    let db_name = format!("xz_soak_{run_id}");
    let redis_prefix = format!("xz_soak_{run_id}:");

    // The real dependencies, and proxies in front of them.
    let bad_url = |u: &str| SoakError::Url(u.to_owned());
    let (db_host, db_port) =
        deps::authority(&config.mysql, 3306).ok_or_else(|| bad_url(&config.mysql))?;
    let (redis_host, redis_port) =
        deps::authority(&config.redis, 6379).ok_or_else(|| bad_url(&config.redis))?;
    let db_addr = deps::resolve(&db_host, db_port)
        .await
        .map_err(|source| SoakError::Resolve {
            what: "the database",
            addr: format!("{db_host}:{db_port}"),
            source,
        })?;
    let redis_addr = deps::resolve(&redis_host, redis_port)
        .await
        .map_err(|source| SoakError::Resolve {
            what: "Redis",
            addr: format!("{redis_host}:{redis_port}"),
            source,
        })?;
    deps::create_database(&config.mysql, &db_name)
        .await
        .map_err(|source| SoakError::Database {
            name: db_name.clone(),
            source,
        })?;
    let direct_db_url =
        deps::with_database(&config.mysql, &db_name).ok_or_else(|| bad_url(&config.mysql))?;
    let start = |what: &'static str| move |source| SoakError::Start { what, source };
    let db = FaultProxy::start("db", db_addr)
        .await
        .map_err(start("the database proxy"))?;
    let redis = FaultProxy::start("redis", redis_addr)
        .await
        .map_err(start("the Redis proxy"))?;
    let mock = MockUpstream::start(mock_config())
        .await
        .map_err(start("the mock speech server"))?;
    let upstream_proxy = FaultProxy::start("upstream", mock.addr)
        .await
        .map_err(start("the speech server proxy"))?;
    let mut faults = Faults {
        upstream: Upstream {
            addr: mock.addr,
            mock: Some(mock),
            restarts: 0,
        },
        db,
        redis,
        upstream_proxy,
    };
    let gateway_db_url =
        deps::with_address(&direct_db_url, faults.db.addr).ok_or_else(|| bad_url(&config.mysql))?;
    let gateway_redis_url = deps::with_address(&config.redis, faults.redis.addr)
        .ok_or_else(|| bad_url(&config.redis))?;
    let signature_key = format!("Soak-{}", hex::encode(rand::random::<[u8; 16]>()));
    let journal_dir = dir.join("journal");
    let _ = std::fs::remove_dir_all(&journal_dir);
    let env: Vec<(String, String)> = [
        ("XZ_NODE__ID", format!("soak-{run_id}")),
        ("XZ_MQTT__LISTEN", "127.0.0.1:0".into()),
        ("XZ_UDP__LISTEN", "127.0.0.1:0".into()),
        ("XZ_HTTP__LISTEN", "127.0.0.1:0".into()),
        ("XZ_BROKER__LISTEN", "127.0.0.1:0".into()),
        ("XZ_LOG__FORMAT", "json".into()),
        ("XZ_LOG__LEVEL", "warn,xiaozhi_gateway::server=info".into()),
        ("XZ_AUTH__SIGNATURE_KEY", signature_key.clone()),
        ("XZ_PIPELINE__KIND", "xiaozhi".into()),
        (
            "XZ_PIPELINE__XIAOZHI__URLS",
            format!("[\"ws://{}/xiaozhi/v1/\"]", faults.upstream_proxy.addr),
        ),
        ("XZ_HISTORY__ENABLED", "true".into()),
        ("XZ_HISTORY__DATABASE_URL", gateway_db_url),
        ("XZ_HISTORY__JOURNAL_DIR", journal_dir.display().to_string()),
        ("XZ_HISTORY__MODE", config.history_mode.clone()),
        ("XZ_PRESENCE__REDIS_URL", gateway_redis_url),
        ("XZ_PRESENCE__KEY_PREFIX", redis_prefix.clone()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let exe = std::env::current_exe().map_err(start("the gateway (no current executable)"))?;
    let mut gateway = GatewayProcess::start(&exe, &env, &dir.join("gateway.log")).await?;
    println!(
        "soak: gateway pid {} (device MQTT {}, HTTP {}), database {db_name} via {}, Redis prefix {redis_prefix} via {}, speech server {} via {}",
        gateway.pid,
        gateway.mqtt,
        gateway.http,
        faults.db.addr,
        faults.redis.addr,
        faults.upstream.addr,
        faults.upstream_proxy.addr
    );
    println!("soak: plan: {}", config.plan);

    let mut csv = CsvWriter::new(BufWriter::new(
        File::create(dir.join("soak.csv")).map_err(start("the CSV report"))?,
    ))
    .map_err(start("the CSV report"))?;
    let mut samples: Vec<Sample> = Vec::new();
    let mut record = |s: Sample, samples: &mut Vec<Sample>| {
        if let Err(e) = csv.push(&s) {
            warn!(error = %e, "soak: cannot write the CSV");
        }
        samples.push(s);
    };
    let mut watch = Watch {
        pid: gateway.pid,
        http: gateway.http,
        last_cpu: None,
        gauges: GatewayGauges::default(),
    };
    let mut summary = Summary {
        devices: config.devices,
        minutes: config.plan.total.as_secs_f64() / 60.0,
        plan: Some(config.plan.clone()),
        ..Summary::default()
    };

    // Idle baseline.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle = watch
        .sample(
            Duration::ZERO,
            "idle",
            String::new(),
            &fleet::FleetSnapshot::default(),
        )
        .await;
    summary.idle_start_rss_kb = idle.rss_kb;
    summary.idle_start_tasks = idle.tasks_alive;
    progress(&idle, config.plan.total);
    record(idle, &mut samples);

    let fleet = Fleet::start(FleetConfig {
        mqtt: gateway.mqtt,
        signature_key,
        group: "GID_soak".into(),
        devices: config.devices,
        connect_rate: config.connect_rate,
        max_turns: config.max_turns,
        frames_per_turn: FRAMES_PER_TURN,
        turn_pause: config.turn_pause,
        conversation_pause: config.conversation_pause,
        churn: config.churn,
        new_device_share: config.new_device_share,
        away: (Duration::from_secs(1), Duration::from_secs(10)),
        dialogue: demo_dialogue(),
        seed: config.seed,
    });

    // The load, with the faults on schedule.
    let started = Instant::now();
    let mut begun = vec![false; config.plan.faults.len()];
    let mut ended = vec![false; config.plan.faults.len()];
    let mut next_sample = config.sample_every;
    let mut next_progress = Duration::ZERO;
    let mut warmup_taken = false;
    let mut died = None;
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tick.tick().await;
        let t = started.elapsed();
        for (i, w) in config.plan.faults.iter().enumerate() {
            if !begun[i] && t >= w.start {
                begun[i] = true;
                faults.begin(w.kind).await;
            }
            if begun[i] && !ended[i] && t >= w.end {
                ended[i] = true;
                faults.end(w.kind).await;
            }
        }
        if let Some(status) = gateway.exited() {
            died = Some(status);
            break;
        }
        if t >= config.plan.total {
            break;
        }
        if t >= next_sample {
            next_sample += config.sample_every;
            let s = watch
                .sample(t, "load", config.plan.label_at(t), &fleet.stats())
                .await;
            if !warmup_taken && t >= config.plan.warmup {
                warmup_taken = true;
                summary.loaded_start_rss_kb = s.rss_kb;
                summary.loaded_start_tasks = s.tasks_alive;
            }
            if t >= next_progress {
                next_progress += config.progress_every;
                progress(&s, config.plan.total);
            }
            record(s, &mut samples);
        }
    }
    for (i, w) in config.plan.faults.iter().enumerate() {
        if begun[i] && !ended[i] {
            faults.end(w.kind).await;
        }
    }
    if let Some(last) = samples.iter().rev().find(|s| s.phase == "load") {
        summary.loaded_end_rss_kb = last.rss_kb;
        summary.loaded_end_tasks = last.tasks_alive;
    }
    println!("soak: load over; stopping the fleet");
    let (ledger, mut final_fleet) = fleet.stop().await;
    final_fleet.connected = 0;
    summary.fleet = final_fleet;

    // Drain: the devices are gone; wait for the sessions to end and the journal to be
    // replayed.
    let drain_started = Instant::now();
    let mut quiet = 0;
    if died.is_none() {
        loop {
            tokio::time::sleep(Duration::from_secs(2)).await;
            if let Some(status) = gateway.exited() {
                died = Some(status);
                break;
            }
            let t = started.elapsed();
            let s = watch.sample(t, "drain", String::new(), &final_fleet).await;
            let g = watch.gauges;
            let settled = g.sessions_live == 0
                && g.devices_connected == 0
                && g.history_journal_bytes == 0
                && g.history_queue_depth == 0;
            quiet = if settled { quiet + 1 } else { 0 };
            if t >= next_progress || quiet >= 3 {
                next_progress = t + config.progress_every;
                progress(&s, config.plan.total);
            }
            record(s, &mut samples);
            if quiet >= 3 {
                summary.journal_drained = true;
                break;
            }
            if drain_started.elapsed() >= config.drain_timeout {
                break;
            }
        }
    }
    summary.drain_secs = drain_started.elapsed().as_secs_f64();
    summary.settle_state = format!(
        "sessions_live {}, devices_connected {}, history queue {}, journal {} B",
        watch.gauges.sessions_live,
        watch.gauges.devices_connected,
        watch.gauges.history_queue_depth,
        watch.gauges.history_journal_bytes
    );
    if let Some(last) = samples.last() {
        summary.idle_end_rss_kb = last.rss_kb;
        summary.idle_end_tasks = last.tasks_alive;
    }
    let g = watch.gauges;
    summary.records_journaled = g.records_journaled;
    summary.records_replayed = g.records_replayed;
    summary.records_lost = g.records_lost;
    summary.write_failures = g.write_failures;
    summary.upstream_failures = g.upstream_failures;

    // The exactly-once check, straight against the database (not through the proxy).
    println!(
        "soak: checking {} conversations against the database",
        ledger.len()
    );
    match sqlx::MySqlPool::connect(&direct_db_url).await {
        Ok(pool) => {
            match check::check_database(&pool, &ledger).await {
                Ok(tally) => summary.check = Some(tally),
                Err(e) => summary
                    .failures
                    .push(format!("cannot read the chat history: {e}")),
            }
            pool.close().await;
        }
        Err(e) => summary
            .failures
            .push(format!("cannot connect to the soak database: {e}")),
    }
    drop(ledger);

    // Stop the gateway gracefully.
    let gateway_log = gateway.log.clone();
    match died {
        Some(status) => {
            summary.gateway_exit = Some(format!("died during the run: {status}"));
            summary.failures.push(format!(
                "the gateway died during the run ({status}); see {}",
                gateway.log.display()
            ));
        }
        None => {
            let (status, killed) = gateway.stop(Duration::from_secs(30)).await;
            let shown = status.map_or_else(|| "unknown".to_owned(), |s| s.to_string());
            summary.gateway_exit = Some(if killed {
                format!("killed after SIGTERM: {shown}")
            } else {
                shown.clone()
            });
            if killed || !status.is_some_and(|s| s.success()) {
                summary
                    .failures
                    .push(format!("the gateway did not shut down cleanly ({shown})"));
            }
        }
    }
    let log_text = std::fs::read(&gateway_log).unwrap_or_default();
    (summary.gateway_panics, summary.first_panic) =
        gateway::panics(&String::from_utf8_lossy(&log_text));
    drop(log_text);
    if summary.gateway_panics > 0 {
        summary.failures.push(format!(
            "the gateway logged {} panic(s); see {}",
            summary.gateway_panics,
            gateway_log.display()
        ));
    }
    summary.proxies = vec![
        ("db".into(), faults.db.stats()),
        ("redis".into(), faults.redis.stats()),
        ("upstream".into(), faults.upstream_proxy.stats()),
    ];
    summary.upstream_restarts = faults.upstream.restarts;
    faults.upstream.stop().await;

    // Figures and verdict.
    let loaded = samples.iter().filter(|s| s.phase != "idle");
    if let Some(span) = Span::of(loaded.clone(), |s| s.rss_kb) {
        summary.max_rss_kb = span.max;
    }
    if let Some(span) = Span::of(loaded.clone(), |s| s.tasks_alive) {
        summary.max_tasks = span.max;
    }
    summary.hwm_kb = samples.iter().map(|s| s.hwm_kb).max().unwrap_or(0);
    let under_load: Vec<f64> = samples
        .iter()
        .filter(|s| s.phase == "load" && s.t_secs >= config.plan.warmup.as_secs_f64())
        .map(|s| s.cpu_percent)
        .collect();
    if !under_load.is_empty() {
        summary.mean_cpu_percent = under_load.iter().sum::<f64>() / under_load.len() as f64;
    }
    judge(&config, &mut summary);

    // Reports.
    let write_json = || -> std::io::Result<()> {
        let f = File::create(dir.join("summary.json"))?;
        serde_json::to_writer_pretty(BufWriter::new(f), &summary).map_err(std::io::Error::other)
    };
    if let Err(e) = write_json() {
        warn!(error = %e, "soak: cannot write summary.json");
    }
    if config.plot {
        plot(dir, &summary);
    }

    // Cleanup.
    if config.keep_db {
        println!("soak: kept database {db_name}");
    } else if let Err(e) = deps::drop_database(&config.mysql, &db_name).await {
        warn!(error = %e, "soak: cannot drop the soak database");
    }
    match deps::delete_redis_prefix(&config.redis, &redis_prefix).await {
        Ok(n) => info!(keys = n, "soak: Redis keys deleted"),
        Err(e) => warn!(error = %e, "soak: cannot delete the soak's Redis keys"),
    }
    Ok(summary)
}

/// Turns the figures into failures.
fn judge(config: &SoakConfig, summary: &mut Summary) {
    let f = &mut summary.failures;
    match &summary.check {
        Some(t) => {
            if t.missing > 0 {
                f.push(format!(
                    "{} expected record(s) missing from the database",
                    t.missing
                ));
            }
            if t.duplicated > 0 {
                f.push(format!("{} record(s) stored more than once", t.duplicated));
            }
        }
        None => f.push("the exactly-once check did not run".into()),
    }
    if summary.fleet.turns_completed == 0 {
        f.push("no turn completed: the soak tested nothing".into());
    }
    if !summary.journal_drained {
        f.push(format!(
            "the gateway did not settle (no session, no device, history queue and journal empty) within {} s after the load: {}",
            config.drain_timeout.as_secs(),
            summary.settle_state
        ));
    }
    let max_rss_kb = config.max_rss_mb * 1024;
    if summary.loaded_end_rss_kb > max_rss_kb {
        f.push(format!(
            "RSS at the end of the load {:.1} MB is over --max-rss-mb {}",
            summary.loaded_end_rss_kb as f64 / 1024.0,
            config.max_rss_mb
        ));
    }
    let task_bound =
        summary.loaded_start_tasks + u64::from(config.devices) * config.tasks_per_device;
    if summary.loaded_end_tasks > task_bound {
        f.push(format!(
            "tasks grew from {} (warm-up end) to {} (load end), over the bound {task_bound}",
            summary.loaded_start_tasks, summary.loaded_end_tasks
        ));
    }
    if summary.journal_drained
        && summary.idle_end_tasks > summary.idle_start_tasks + config.idle_task_slack
    {
        f.push(format!(
            "the idle gateway kept {} tasks after the load against {} before it (slack {})",
            summary.idle_end_tasks, summary.idle_start_tasks, config.idle_task_slack
        ));
    }
}

/// Renders `soak.csv` to `soak.png` with the console's Chart.js in Chromium
/// (best effort: a missing Node.js or Chromium is a warning, not a failure).
fn plot(dir: &std::path::Path, summary: &Summary) {
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../console/scripts/plot-soak.mjs");
    let title = format!(
        "xiaozhi-gateway soak: {} devices, {:.0} min",
        summary.devices, summary.minutes
    );
    let out = std::process::Command::new("node")
        .arg(&script)
        .arg(dir.join("soak.csv"))
        .arg(dir.join("soak.png"))
        .arg(title)
        .output();
    match out {
        Ok(o) if o.status.success() => println!("soak: plot {}", dir.join("soak.png").display()),
        Ok(o) => warn!(
            stderr = %String::from_utf8_lossy(&o.stderr),
            "soak: the plot script failed (run node {} by hand)",
            script.display()
        ),
        Err(e) => warn!(error = %e, "soak: cannot run node for the plot"),
    }
}
