//! `xiaozhi-gateway bench-history`: sustained write throughput of the chat-history
//! writer against a real database, with the gateway's own batching, policy lookups and
//! (optionally) audio decoding. Prints records/s.
//!
//! `bench-history --fill` instead leaves a big, realistic history behind for measuring
//! the history API and the console against it: `--records` rows for `--devices` devices,
//! in sessions spread over the last `--days` days, written straight into the tables with
//! multi-row INSERTs (not through the writer).

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use xiaozhi_gateway::history::journal::Journal;
use xiaozhi_gateway::history::record::{ChatRecord, ChatType, OpusAudio, now_ms};
use xiaozhi_gateway::history::store::{Store, StoreError};
use xiaozhi_gateway::history::writer::{HistoryWriter, RecordMode, WriterSettings, format_time};
use xiaozhi_gateway::metrics::Metrics;

/// What to write.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    pub database_url: String,
    pub records: u64,
    pub batch: usize,
    /// Opus frames of audio per record (0: text only).
    pub audio_frames: u32,
}

/// What was measured.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub backend: &'static str,
    pub records: u64,
    pub batch: usize,
    pub audio_frames: u32,
    pub stored: u64,
    pub journaled: u64,
    pub seconds: f64,
    pub records_per_sec: f64,
}

impl std::fmt::Display for BenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {} records ({} stored, {} journaled), batch {}, {} audio frames each: {:.2} s, {:.0} records/s",
            self.backend,
            self.records,
            self.stored,
            self.journaled,
            self.batch,
            self.audio_frames,
            self.seconds,
            self.records_per_sec
        )
    }
}

/// Runs the benchmark; the rows it writes carry the MAC `02:be:nc:h0:00:00`-style
/// prefix `02:be` so they are easy to delete.
pub async fn run(config: BenchConfig) -> Result<BenchReport, String> {
    let store = Store::connect(&config.database_url, Duration::from_secs(10))
        .await
        .map_err(|e| e.to_string())?;
    store.migrate().await.map_err(|e| e.to_string())?;
    let journal_dir = std::env::temp_dir().join(format!("xz-bench-journal-{}", std::process::id()));
    let journal = Journal::open(&journal_dir).map_err(|e| e.to_string())?;
    let metrics = Arc::new(Metrics::default());
    let (events, _) = tokio::sync::broadcast::channel(16);
    let stop = CancellationToken::new();
    let settings = WriterSettings {
        batch: config.batch,
        mode: if config.audio_frames > 0 {
            RecordMode::Audio
        } else {
            RecordMode::Text
        },
        write_timeout: Duration::from_secs(30),
        ..WriterSettings::default()
    };
    let backend = store.backend();
    let (handle, task) = HistoryWriter::start(
        store,
        journal,
        settings,
        metrics.clone(),
        events,
        stop.clone(),
    )
    .map_err(|e| e.to_string())?;
    let frame = crate::simulator::audio::synthetic_frame(0, 60);
    let started = Instant::now();
    for i in 0..config.records {
        let audio = (config.audio_frames > 0).then(|| OpusAudio {
            sample_rate: 16_000,
            packets: std::iter::repeat_n(&frame, config.audio_frames as usize).collect(),
        });
        let record = ChatRecord::new(
            // 100 devices taking turns, as a fleet does.
            format!("02:be:00:00:00:{:02x}", i % 100),
            format!("bench-session-{}", i / 20),
            if i % 2 == 0 {
                ChatType::User
            } else {
                ChatType::Assistant
            },
            format!("benchmark utterance number {i}, about as long as a sentence"),
            audio,
            now_ms(),
        );
        if !handle.record_waiting(record).await {
            return Err("writer stopped".into());
        }
    }
    drop(handle);
    stop.cancel();
    let _ = task.await;
    let seconds = started.elapsed().as_secs_f64();
    let _ = std::fs::remove_dir_all(&journal_dir);
    let m = metrics.snapshot();
    Ok(BenchReport {
        backend,
        records: config.records,
        batch: config.batch,
        audio_frames: config.audio_frames,
        stored: m.history_records_stored,
        journaled: m.history_records_journaled,
        seconds,
        records_per_sec: m.history_records_stored as f64 / seconds,
    })
}

// --- fill ------------------------------------------------------------------------------

/// What `--fill` writes.
#[derive(Debug, Clone)]
pub struct FillConfig {
    pub database_url: String,
    /// Rows in all.
    pub rows: u64,
    pub devices: u32,
    /// Sessions start within this many days before now.
    pub days: u32,
    /// The zone times are written in (`history.utc_offset_minutes`).
    pub utc_offset_minutes: i32,
    /// Seeds the generator: the same seed and settings give the same rows (but for the
    /// times, which end now).
    pub seed: u64,
}

/// What `--fill` wrote.
#[derive(Debug, Clone, Serialize)]
pub struct FillReport {
    pub backend: &'static str,
    pub rows: u64,
    pub devices: u32,
    pub sessions: u64,
    /// The oldest and newest `created_at` written.
    pub first: String,
    pub last: String,
    /// Rows in the history table afterwards (there may have been some before).
    pub table_rows: i64,
    pub seconds: f64,
    pub rows_per_sec: f64,
}

impl std::fmt::Display for FillReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {} rows, {} devices, {} sessions, {} .. {}: {:.2} s, {:.0} rows/s; \
             the table now has {} rows",
            self.backend,
            self.rows,
            self.devices,
            self.sessions,
            self.first,
            self.last,
            self.seconds,
            self.rows_per_sec,
            self.table_rows
        )
    }
}

/// Rows per INSERT statement (7 bound values each: well under both backends' limits).
const FILL_ROWS_PER_STATEMENT: usize = 1000;
/// Statements per transaction.
const FILL_STATEMENTS_PER_TRANSACTION: usize = 20;
/// Messages in a session: from this many ...
const FILL_SESSION_MIN: u64 = 4;
/// ... to this many.
const FILL_SESSION_MAX: u64 = 24;

const USER_LINES: &[&str] = &[
    "今天天气怎么样",
    "给我讲个笑话吧",
    "明天早上七点叫我起床",
    "播放一首周杰伦的歌",
    "What time is it in London?",
    "帮我把客厅的灯关掉",
    "How far away is the moon?",
    "我有点累了，陪我聊聊天",
    "一加一等于几",
    "Set a timer for ten minutes",
];

const ASSISTANT_LINES: &[&str] = &[
    "今天多云转晴，气温十八到二十五度，出门记得带件外套哦。",
    "好的，有一只小企鹅去北极旅行，结果发现那里根本没有企鹅朋友。",
    "没问题，我已经帮你设置好明天早上七点的闹钟啦。",
    "好的，马上为你播放。",
    "It is a quarter past three in the afternoon in London right now.",
    "客厅的灯已经关掉了，还有什么需要我帮忙的吗？",
    "The moon is about 384,400 kilometres from Earth on average.",
    "辛苦啦，要不要先休息一下？我可以给你放一段轻松的音乐。",
    "一加一等于二，这个我很确定！",
    "Timer set for ten minutes, I will let you know when it is done.",
];

/// A small deterministic generator (splitmix64): the fill needs spread, not secrecy.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

/// One session to write: its device, when it starts and how many messages it has.
struct PlannedSession {
    device: u32,
    start_ms: i64,
    messages: u64,
    seed: u64,
}

/// A device's MAC: `02:be:` and its index.
fn fill_mac(device: u32) -> String {
    let b = device.to_be_bytes();
    format!("02:be:{:02x}:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2], b[3])
}

/// Splits `rows` over the devices (unevenly, as a fleet is: the busiest has about five
/// times the quietest's share) and each device's share into sessions, each starting at
/// a random time in the window and ending before `now_ms`; the result is ordered by start,
/// so ids grow with time as they do in a real table.
fn plan(config: &FillConfig, now_ms: i64) -> Vec<PlannedSession> {
    let mut rng = SplitMix(config.seed);
    let devices = config.devices as usize;
    let weights: Vec<u64> = (0..devices).map(|_| rng.range(20, 100)).collect();
    let total_weight: u64 = weights.iter().sum();
    let mut shares: Vec<u64> = weights
        .iter()
        .map(|w| (u128::from(config.rows) * u128::from(*w) / u128::from(total_weight)) as u64)
        .collect();
    // Each share was rounded down by less than one: fewer than `devices` rows are left.
    let left = config.rows - shares.iter().sum::<u64>();
    for share in shares.iter_mut().take(left as usize) {
        *share += 1;
    }
    let window_ms = i64::from(config.days.max(1)) * 86_400_000;
    // The longest a session lasts (seconds between messages at most 20), so that it
    // ends before now.
    let longest_ms = FILL_SESSION_MAX as i64 * 20_000;
    let mut sessions = Vec::new();
    for (device, mut share) in shares.into_iter().enumerate() {
        while share > 0 {
            let mut messages = rng.range(FILL_SESSION_MIN, FILL_SESSION_MAX).min(share);
            if share - messages < FILL_SESSION_MIN {
                messages = share;
            }
            share -= messages;
            let start_ms = now_ms
                - longest_ms.max(messages as i64 * 20_000)
                - (rng.next() % (window_ms - longest_ms).max(1) as u64) as i64;
            sessions.push(PlannedSession {
                device: device as u32,
                start_ms,
                messages,
                seed: rng.next(),
            });
        }
    }
    sessions.sort_by_key(|s| (s.start_ms, s.device));
    sessions
}

/// A row ready to bind.
struct FillRow {
    mac: String,
    agent_id: String,
    session_id: String,
    chat_type: i64,
    content: String,
    created_at: String,
}

/// The rows of session number `index`: user and assistant taking turns, 2 to 20
/// seconds apart.
fn session_rows(s: &PlannedSession, index: u64, utc_offset_minutes: i32, out: &mut Vec<FillRow>) {
    let mut rng = SplitMix(s.seed);
    let mac = fill_mac(s.device);
    // manager-api's agent ids are 32 hex digits.
    let mut agent = SplitMix(u64::from(s.device));
    let agent_id = format!("{:016x}{:016x}", agent.next(), agent.next());
    // A UUID-like id, unique through `index`.
    let session_id = format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        rng.next() as u32,
        rng.next() as u16,
        rng.next() % 0x1000,
        rng.next() % 0x1000,
        index
    );
    let mut at = s.start_ms;
    let mut line = rng.next() as usize;
    for n in 0..s.messages {
        let user = n % 2 == 0;
        let content = if user {
            line = rng.next() as usize;
            USER_LINES[line % USER_LINES.len()].to_owned()
        } else {
            ASSISTANT_LINES[line % ASSISTANT_LINES.len()].to_owned()
        };
        out.push(FillRow {
            mac: mac.clone(),
            agent_id: agent_id.clone(),
            session_id: session_id.clone(),
            chat_type: if user { 1 } else { 2 },
            content,
            created_at: format_time(at, utc_offset_minutes),
        });
        at += rng.range(2_000, 20_000) as i64;
    }
}

/// The INSERT for `n` rows.
fn fill_statement(n: usize) -> String {
    let mut sql = String::from(
        "INSERT INTO ai_agent_chat_history \
         (mac_address, agent_id, session_id, chat_type, content, audio_id, created_at, updated_at) \
         VALUES ",
    );
    for i in 0..n {
        if i > 0 {
            sql.push(',');
        }
        sql.push_str("(?, ?, ?, ?, ?, NULL, ?, ?)");
    }
    sql
}

/// Where a fill writes: one connection, one transaction at a time.
enum FillConn {
    MySql(sqlx::pool::PoolConnection<sqlx::MySql>),
    Sqlite(sqlx::pool::PoolConnection<sqlx::Sqlite>),
}

impl FillConn {
    async fn execute(&mut self, sql: &str) -> Result<(), sqlx::Error> {
        match self {
            FillConn::MySql(c) => sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
                .execute(&mut **c)
                .await
                .map(drop),
            FillConn::Sqlite(c) => sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
                .execute(&mut **c)
                .await
                .map(drop),
        }
    }

    /// Inserts `rows` in one statement (the statement text comes from `fill_statement`;
    /// every value is bound).
    async fn insert(&mut self, rows: &[FillRow]) -> Result<(), sqlx::Error> {
        let sql = fill_statement(rows.len());
        macro_rules! run {
            ($conn:expr) => {{
                let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
                for r in rows {
                    q = q
                        .bind(r.mac.as_str())
                        .bind(r.agent_id.as_str())
                        .bind(r.session_id.as_str())
                        .bind(r.chat_type)
                        .bind(r.content.as_str())
                        .bind(r.created_at.as_str())
                        .bind(r.created_at.as_str());
                }
                q.execute(&mut **$conn).await.map(drop)
            }};
        }
        match self {
            FillConn::MySql(c) => run!(c),
            FillConn::Sqlite(c) => run!(c),
        }
    }

    async fn count(&mut self) -> Result<i64, sqlx::Error> {
        const SQL: &str = "SELECT COUNT(*) FROM ai_agent_chat_history";
        match self {
            FillConn::MySql(c) => sqlx::query_scalar(SQL).fetch_one(&mut **c).await,
            FillConn::Sqlite(c) => sqlx::query_scalar(SQL).fetch_one(&mut **c).await,
        }
    }
}

/// Writes the rows `config` asks for and leaves them in the database (schema created
/// first if missing). Rows are appended: running it twice doubles them.
pub async fn fill(config: FillConfig) -> Result<FillReport, String> {
    if config.devices == 0 || config.rows == 0 || config.days == 0 {
        return Err("--devices, --records and --days must be at least 1".into());
    }
    let store = Store::connect(&config.database_url, Duration::from_secs(10))
        .await
        .map_err(|e| e.to_string())?;
    store.migrate().await.map_err(|e| e.to_string())?;
    let backend = store.backend();
    let sql_error = |e: sqlx::Error| StoreError::from(e).to_string();
    let mut conn = match &store {
        Store::MySql(pool) => FillConn::MySql(pool.acquire().await.map_err(sql_error)?),
        Store::Sqlite(pool) => {
            let mut conn = FillConn::Sqlite(pool.acquire().await.map_err(sql_error)?);
            // A bulk load: a crash mid-fill loses at most the fill itself.
            conn.execute("PRAGMA synchronous = OFF")
                .await
                .map_err(sql_error)?;
            conn
        }
    };
    let started = Instant::now();
    let sessions = plan(&config, now_ms());
    let mut first: Option<String> = None;
    let mut last = String::new();
    let mut rows = Vec::with_capacity(FILL_ROWS_PER_STATEMENT + FILL_SESSION_MAX as usize);
    let mut statements = 0;
    let mut written = 0u64;
    conn.execute("BEGIN").await.map_err(sql_error)?;
    for (index, session) in sessions.iter().enumerate() {
        session_rows(session, index as u64, config.utc_offset_minutes, &mut rows);
        let is_last = index + 1 == sessions.len();
        while rows.len() >= FILL_ROWS_PER_STATEMENT || (is_last && !rows.is_empty()) {
            let n = rows.len().min(FILL_ROWS_PER_STATEMENT);
            for r in &rows[..n] {
                if first.as_ref().is_none_or(|f| r.created_at < *f) {
                    first = Some(r.created_at.clone());
                }
                if r.created_at > last {
                    last.clone_from(&r.created_at);
                }
            }
            conn.insert(&rows[..n]).await.map_err(sql_error)?;
            rows.drain(..n);
            written += n as u64;
            statements += 1;
            if statements % FILL_STATEMENTS_PER_TRANSACTION == 0 {
                conn.execute("COMMIT").await.map_err(sql_error)?;
                conn.execute("BEGIN").await.map_err(sql_error)?;
            }
        }
    }
    conn.execute("COMMIT").await.map_err(sql_error)?;
    let seconds = started.elapsed().as_secs_f64();
    let table_rows = conn.count().await.map_err(sql_error)?;
    Ok(FillReport {
        backend,
        rows: written,
        devices: config.devices,
        sessions: sessions.len() as u64,
        first: first.unwrap_or_default(),
        last,
        table_rows,
        seconds,
        rows_per_sec: written as f64 / seconds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(rows: u64, devices: u32) -> FillConfig {
        FillConfig {
            database_url: String::new(),
            rows,
            devices,
            days: 30,
            utc_offset_minutes: 480,
            seed: 7,
        }
    }

    #[test]
    fn a_fill_plan_has_every_row_once_in_the_window_in_time_order() {
        let now = 1_750_000_000_000;
        for (rows, devices) in [(1, 1), (5, 3), (10_007, 13), (100_000, 1000)] {
            let c = config(rows, devices);
            let sessions = plan(&c, now);
            assert_eq!(sessions.iter().map(|s| s.messages).sum::<u64>(), rows);
            assert!(sessions.windows(2).all(|w| w[0].start_ms <= w[1].start_ms));
            let window = i64::from(c.days) * 86_400_000;
            for s in &sessions {
                assert!(s.device < devices);
                assert!(s.start_ms >= now - window - FILL_SESSION_MAX as i64 * 20_000);
                let mut out = Vec::new();
                session_rows(s, 0, 480, &mut out);
                assert_eq!(out.len() as u64, s.messages);
                let types: Vec<i64> = out.iter().map(|r| r.chat_type).collect();
                assert!(types.iter().step_by(2).all(|t| *t == 1), "{types:?}");
                assert!(
                    types.iter().skip(1).step_by(2).all(|t| *t == 2),
                    "{types:?}"
                );
                assert!(out.windows(2).all(|w| w[0].created_at < w[1].created_at));
                assert!(out.last().unwrap().created_at <= format_time(now, 480));
            }
            if rows >= 100 * u64::from(devices) {
                // Every device has some, and not all the same.
                let mut per_device = vec![0u64; devices as usize];
                for s in &sessions {
                    per_device[s.device as usize] += s.messages;
                }
                assert!(per_device.iter().all(|n| *n > 0));
                assert!(per_device.iter().max() > per_device.iter().min());
            }
        }
    }

    #[test]
    fn fill_ids_and_statements_are_well_formed() {
        assert_eq!(fill_mac(0), "02:be:00:00:00:00");
        assert_eq!(fill_mac(1000), "02:be:00:00:03:e8");
        let sessions = plan(&config(1000, 10), 1_750_000_000_000);
        let mut ids = std::collections::HashSet::new();
        for (i, s) in sessions.iter().enumerate() {
            let mut out = Vec::new();
            session_rows(s, i as u64, 480, &mut out);
            assert_eq!(out[0].session_id.len(), 36);
            assert_eq!(out[0].agent_id.len(), 32);
            assert!(ids.insert(out[0].session_id.clone()));
        }
        let sql = fill_statement(3);
        assert_eq!(sql.matches('?').count(), 21);
        assert!(sql.ends_with(
            "(?, ?, ?, ?, ?, NULL, ?, ?),(?, ?, ?, ?, ?, NULL, ?, ?),(?, ?, ?, ?, ?, NULL, ?, ?)"
        ));
    }
}
