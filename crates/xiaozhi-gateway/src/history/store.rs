//! The chat-history database: manager-api's tables in MySQL/MariaDB, or the same logical
//! schema in SQLite (the embedded default).
//!
//! Schema objects come from `migrations/<backend>/*.sql`, compiled in: manager-api's two
//! tables, created only when missing and never altered, and our additive objects (the
//! replay ledger `xz_chat_applied`, an index, the `v_chat_summary` view). Every statement
//! with a value in it is parameterised.
//!
//! A batch is written in one transaction. Each record first claims its id in
//! `xz_chat_applied`; a record whose id is already there was written before (a replayed
//! journal, a retried batch) and is skipped, so writes are idempotent.

use std::str::FromStr;
use std::time::Duration;

use sqlx::mysql::{MySqlConnectOptions, MySqlPool, MySqlPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};
// Every string given to `AssertSqlSafe` is a statement from the compiled-in migration
// files; values always go through `bind`.
use sqlx::{AssertSqlSafe, Row};

use super::record::{ChatType, new_id};

/// A record ready for the database: policy applied, audio decoded.
#[derive(Debug, Clone)]
pub struct StoredRecord {
    pub record_id: String,
    pub mac_address: String,
    pub agent_id: Option<String>,
    pub session_id: String,
    pub chat_type: ChatType,
    pub content: String,
    /// A complete WAV file.
    pub wav: Option<Vec<u8>>,
    /// `YYYY-MM-DD HH:MM:SS.mmm` in the configured time zone.
    pub created_at: String,
}

/// What a device's agent says about recording (`ai_agent.chat_history_conf`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DevicePolicy {
    /// manager-api's tables are not there: the gateway's own setting applies.
    Unmanaged,
    /// The device or its agent is unknown to manager-api: nothing is written.
    Unknown,
    /// 0: nothing, 1: text, 2: text and audio.
    Agent { agent_id: String, conf: i32 },
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("unsupported database URL {0:?}: use mysql://... or sqlite://...")]
    Url(String),
    #[error("database: {0}")]
    Sql(#[from] sqlx::Error),
}

/// The database.
#[derive(Clone)]
pub enum Store {
    MySql(MySqlPool),
    Sqlite(SqlitePool),
}

const MYSQL_MIGRATIONS: &[(&str, &str)] = &[
    (
        "0001_chat_history",
        include_str!("../../../../migrations/mysql/0001_chat_history.sql"),
    ),
    (
        "0002_gateway_objects",
        include_str!("../../../../migrations/mysql/0002_gateway_objects.sql"),
    ),
    (
        "0003_fleet_stats_index",
        include_str!("../../../../migrations/mysql/0003_fleet_stats_index.sql"),
    ),
    (
        "0004_device_activity_index",
        include_str!("../../../../migrations/mysql/0004_device_activity_index.sql"),
    ),
    (
        "0005_push",
        include_str!("../../../../migrations/mysql/0005_push.sql"),
    ),
    (
        "0006_push_clips",
        include_str!("../../../../migrations/mysql/0006_push_clips.sql"),
    ),
];

const SQLITE_MIGRATIONS: &[(&str, &str)] = &[
    (
        "0001_chat_history",
        include_str!("../../../../migrations/sqlite/0001_chat_history.sql"),
    ),
    (
        "0002_gateway_objects",
        include_str!("../../../../migrations/sqlite/0002_gateway_objects.sql"),
    ),
    (
        "0003_fleet_stats_index",
        include_str!("../../../../migrations/sqlite/0003_fleet_stats_index.sql"),
    ),
    (
        "0004_device_activity_index",
        include_str!("../../../../migrations/sqlite/0004_device_activity_index.sql"),
    ),
    (
        "0005_push",
        include_str!("../../../../migrations/sqlite/0005_push.sql"),
    ),
    (
        "0006_push_clips",
        include_str!("../../../../migrations/sqlite/0006_push_clips.sql"),
    ),
];

/// Splits a migration file into statements (`;` at a line end), dropping comments.
fn statements(sql: &str) -> impl Iterator<Item = String> + '_ {
    sql.split(";\n").filter_map(|chunk| {
        let statement: Vec<&str> = chunk
            .lines()
            .filter(|l| !l.trim_start().starts_with("--"))
            .collect();
        let statement = statement.join("\n");
        let statement = statement.trim().trim_end_matches(';').trim();
        (!statement.is_empty()).then(|| statement.to_owned())
    })
}

impl Store {
    /// Connects (a SQLite file is created if missing). `acquire_timeout` bounds how long
    /// a write waits for a connection when the database is away.
    pub async fn connect(url: &str, acquire_timeout: Duration) -> Result<Store, StoreError> {
        if url.starts_with("mysql://") || url.starts_with("mariadb://") {
            let url = url.replacen("mariadb://", "mysql://", 1);
            let options = MySqlConnectOptions::from_str(&url)?.charset("utf8mb4");
            let pool = MySqlPoolOptions::new()
                .max_connections(4)
                .acquire_timeout(acquire_timeout)
                .connect_lazy_with(options);
            Ok(Store::MySql(pool))
        } else if url.starts_with("sqlite:") {
            let options = SqliteConnectOptions::from_str(url)?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .busy_timeout(acquire_timeout);
            let pool = SqlitePoolOptions::new()
                .max_connections(4)
                .acquire_timeout(acquire_timeout)
                .connect_with(options)
                .await?;
            Ok(Store::Sqlite(pool))
        } else {
            Err(StoreError::Url(url.to_owned()))
        }
    }

    /// A private in-memory SQLite database (one connection, which holds it): for what
    /// needs the schema when no database is configured. Gone when the store is dropped.
    pub async fn memory() -> Result<Store, StoreError> {
        let options = SqliteConnectOptions::from_str("sqlite::memory:")?;
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(options)
            .await?;
        Ok(Store::Sqlite(pool))
    }

    /// One trivial query: whether the database answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        match self {
            Store::MySql(pool) => {
                sqlx::query("SELECT 1").execute(pool).await?;
            }
            Store::Sqlite(pool) => {
                sqlx::query("SELECT 1").execute(pool).await?;
            }
        }
        Ok(())
    }

    pub fn backend(&self) -> &'static str {
        match self {
            Store::MySql(_) => "mysql",
            Store::Sqlite(_) => "sqlite",
        }
    }

    /// Creates what is missing; never alters what exists. Safe to run any number of
    /// times. Returns the names of the migration files applied.
    pub async fn migrate(&self) -> Result<Vec<&'static str>, StoreError> {
        let mut applied = Vec::new();
        match self {
            Store::MySql(pool) => {
                let mut conn = pool.acquire().await?;
                for (name, sql) in MYSQL_MIGRATIONS {
                    for statement in statements(sql) {
                        match sqlx::raw_sql(AssertSqlSafe(statement.clone()))
                            .execute(&mut *conn)
                            .await
                        {
                            Ok(_) => {}
                            // MySQL (unlike MariaDB) has no CREATE INDEX IF NOT EXISTS.
                            Err(e) if statement.starts_with("CREATE INDEX IF NOT EXISTS") => {
                                create_index_mysql(&mut conn, &statement)
                                    .await
                                    .map_err(|_| e)?;
                            }
                            Err(e) => return Err(e.into()),
                        }
                    }
                    applied.push(*name);
                }
            }
            Store::Sqlite(pool) => {
                let mut conn = pool.acquire().await?;
                for (name, sql) in SQLITE_MIGRATIONS {
                    for statement in statements(sql) {
                        sqlx::raw_sql(AssertSqlSafe(statement.clone()))
                            .execute(&mut *conn)
                            .await?;
                    }
                    applied.push(*name);
                }
            }
        }
        Ok(applied)
    }

    /// The longest `content` the history table takes, when it is limited (manager-api
    /// databases from before 2026-03 have `VARCHAR(1024)`; the table is never altered).
    pub async fn content_limit(&self) -> Result<Option<usize>, StoreError> {
        match self {
            Store::MySql(pool) => {
                let limit: Option<Option<i64>> = sqlx::query_scalar(
                    "SELECT CHARACTER_MAXIMUM_LENGTH FROM information_schema.columns \
                     WHERE table_schema = DATABASE() AND table_name = 'ai_agent_chat_history' \
                     AND column_name = 'content' AND DATA_TYPE = 'varchar'",
                )
                .fetch_optional(pool)
                .await?;
                Ok(limit.flatten().map(|n| n as usize))
            }
            Store::Sqlite(_) => Ok(None),
        }
    }

    /// Whether manager-api's device and agent tables are present (then
    /// `chat_history_conf` decides what is recorded).
    pub async fn managed(&self) -> Result<bool, StoreError> {
        Ok(self.tables_present(&["ai_device", "ai_agent"]).await? == 2)
    }

    /// Whether manager-api's `ai_device` table is present.
    pub async fn has_device_table(&self) -> Result<bool, StoreError> {
        Ok(self.tables_present(&["ai_device"]).await? == 1)
    }

    /// How many of these tables exist in the database.
    async fn tables_present(&self, names: &[&str]) -> Result<i64, StoreError> {
        let marks = vec!["?"; names.len()].join(", ");
        let sql = match self {
            Store::MySql(_) => format!(
                "SELECT COUNT(*) FROM information_schema.tables \
                 WHERE table_schema = DATABASE() AND table_name IN ({marks})"
            ),
            Store::Sqlite(_) => format!(
                "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name IN ({marks})"
            ),
        };
        Ok(match self {
            Store::MySql(pool) => {
                let mut q = sqlx::query_scalar(sqlx::AssertSqlSafe(sql));
                for name in names {
                    q = q.bind(*name);
                }
                q.fetch_one(pool).await?
            }
            Store::Sqlite(pool) => {
                let mut q = sqlx::query_scalar(sqlx::AssertSqlSafe(sql));
                for name in names {
                    q = q.bind(*name);
                }
                q.fetch_one(pool).await?
            }
        })
    }

    /// Sets manager-api's `ai_device.last_connected_at` to `at` (formatted like every
    /// other manager-api time) for these devices (colon MACs), one statement per 512;
    /// returns the rows changed. Nothing happens (and no error) without the table.
    pub async fn touch_last_connected(
        &self,
        mac_addresses: &[String],
        at: &str,
    ) -> Result<u64, StoreError> {
        if mac_addresses.is_empty() || !self.has_device_table().await? {
            return Ok(0);
        }
        let mut changed = 0;
        for chunk in mac_addresses.chunks(MAX_ROWS_PER_STATEMENT) {
            let marks = vec!["?"; chunk.len()].join(", ");
            let sql = format!(
                "UPDATE ai_device SET last_connected_at = ? WHERE mac_address IN ({marks})"
            );
            changed += match self {
                Store::MySql(pool) => {
                    let mut q = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(at);
                    for mac in chunk {
                        q = q.bind(mac);
                    }
                    q.execute(pool).await?.rows_affected()
                }
                Store::Sqlite(pool) => {
                    let mut q = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(at);
                    for mac in chunk {
                        q = q.bind(mac);
                    }
                    q.execute(pool).await?.rows_affected()
                }
            };
        }
        Ok(changed)
    }

    /// The recording policy for a device (its agent's `chat_history_conf`).
    pub async fn device_policy(&self, mac_address: &str) -> Result<DevicePolicy, StoreError> {
        if !self.managed().await? {
            return Ok(DevicePolicy::Unmanaged);
        }
        self.agent_policy(mac_address).await
    }

    /// The policy of a device's agent, given that manager-api's tables are there.
    pub async fn agent_policy(&self, mac_address: &str) -> Result<DevicePolicy, StoreError> {
        const SQL: &str = "SELECT d.agent_id AS agent_id, a.chat_history_conf AS conf \
             FROM ai_device d JOIN ai_agent a ON a.id = d.agent_id \
             WHERE d.mac_address = ? LIMIT 1";
        let row = match self {
            Store::MySql(pool) => sqlx::query(SQL)
                .bind(mac_address)
                .fetch_optional(pool)
                .await?
                .map(|r| {
                    (
                        r.try_get::<Option<String>, _>("agent_id"),
                        r.try_get::<Option<i32>, _>("conf"),
                    )
                }),
            Store::Sqlite(pool) => sqlx::query(SQL)
                .bind(mac_address)
                .fetch_optional(pool)
                .await?
                .map(|r| {
                    (
                        r.try_get::<Option<String>, _>("agent_id"),
                        r.try_get::<Option<i32>, _>("conf"),
                    )
                }),
        };
        Ok(match row {
            Some((Ok(Some(agent_id)), Ok(conf))) => DevicePolicy::Agent {
                agent_id,
                // manager-api's column is NOT NULL DEFAULT 0 (record nothing).
                conf: conf.unwrap_or(0),
            },
            _ => DevicePolicy::Unknown,
        })
    }

    /// Writes a batch in one transaction; records written before are skipped. Returns
    /// how many were new. Whatever the batch size, it costs four statements: which ids
    /// are known, then one multi-row insert each into the ledger, the audio table and
    /// the history table.
    pub async fn write_batch(&self, batch: &[StoredRecord]) -> Result<usize, StoreError> {
        let mut new = 0;
        for chunk in batch.chunks(MAX_ROWS_PER_STATEMENT) {
            new += match self {
                Store::MySql(pool) => write_chunk!(pool.begin(), chunk),
                // IMMEDIATE takes the write lock up front: a deferred transaction that
                // reads first fails with SQLITE_BUSY_SNAPSHOT (517) when another
                // connection (the presence tracker, retention) wrote in between, and
                // busy_timeout cannot retry that.
                Store::Sqlite(pool) => write_chunk!(pool.begin_with("BEGIN IMMEDIATE"), chunk),
            };
        }
        Ok(new)
    }
}

/// Rows per multi-row statement (8 parameters each, well under every backend's limit).
const MAX_ROWS_PER_STATEMENT: usize = 512;

/// The body of [`Store::write_batch`] for one pool type.
macro_rules! write_chunk {
    ($begin:expr, $chunk:expr) => {{
        let chunk: &[StoredRecord] = $chunk;
        let mut tx = $begin.await?;
        let mut known = sqlx::QueryBuilder::new("SELECT record_id FROM xz_chat_applied WHERE record_id IN (");
        let mut list = known.separated(", ");
        for r in chunk {
            list.push_bind(&r.record_id);
        }
        list.push_unseparated(")");
        let known: std::collections::HashSet<String> = known
            .build_query_scalar::<String>()
            .fetch_all(&mut *tx)
            .await?
            .into_iter()
            .collect();
        let fresh: Vec<(&StoredRecord, Option<String>)> = chunk
            .iter()
            .filter(|r| !known.contains(&r.record_id))
            .map(|r| (r, r.wav.as_ref().map(|_| new_id())))
            .collect();
        if !fresh.is_empty() {
            let mut ledger = sqlx::QueryBuilder::new("INSERT INTO xz_chat_applied (record_id) ");
            ledger.push_values(&fresh, |mut b, (r, _)| {
                b.push_bind(&r.record_id);
            });
            ledger.build().execute(&mut *tx).await?;
            let with_audio: Vec<(&Vec<u8>, &String)> = fresh
                .iter()
                .filter_map(|(r, id)| Some((r.wav.as_ref()?, id.as_ref()?)))
                .collect();
            if !with_audio.is_empty() {
                let mut audio = sqlx::QueryBuilder::new("INSERT INTO ai_agent_chat_audio (id, audio) ");
                audio.push_values(&with_audio, |mut b, (wav, id)| {
                    b.push_bind(*id).push_bind(wav.as_slice());
                });
                audio.build().execute(&mut *tx).await?;
            }
            let mut rows = sqlx::QueryBuilder::new(
                "INSERT INTO ai_agent_chat_history \
                 (mac_address, agent_id, session_id, chat_type, content, audio_id, created_at, updated_at) ",
            );
            rows.push_values(&fresh, |mut b, (r, audio_id)| {
                b.push_bind(&r.mac_address)
                    .push_bind(&r.agent_id)
                    .push_bind(&r.session_id)
                    .push_bind(r.chat_type as i16)
                    .push_bind(&r.content)
                    .push_bind(audio_id)
                    .push_bind(&r.created_at)
                    .push_bind(&r.created_at);
            });
            rows.build().execute(&mut *tx).await?;
        }
        tx.commit().await?;
        fresh.len()
    }};
}
use write_chunk;

/// `CREATE INDEX IF NOT EXISTS name ON table (cols)` for MySQL: look first, then create.
async fn create_index_mysql(
    conn: &mut sqlx::pool::PoolConnection<sqlx::MySql>,
    statement: &str,
) -> Result<(), StoreError> {
    let rest = statement
        .trim_start_matches("CREATE INDEX IF NOT EXISTS")
        .trim();
    let mut words = rest.split_whitespace();
    let (Some(name), Some("ON"), Some(table)) = (words.next(), words.next(), words.next()) else {
        return Err(StoreError::Url(statement.to_owned()));
    };
    let table = table.split('(').next().unwrap_or(table).trim_matches('`');
    let name = name.trim_matches('`');
    let exists: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM information_schema.statistics \
         WHERE table_schema = DATABASE() AND table_name = ? AND index_name = ?",
    )
    .bind(table)
    .bind(name)
    .fetch_one(&mut **conn)
    .await?;
    if exists == 0 {
        let plain = format!("CREATE INDEX {rest}");
        sqlx::raw_sql(AssertSqlSafe(plain))
            .execute(&mut **conn)
            .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migration_files_split_into_statements() {
        let sql = "-- a comment\nCREATE TABLE a (x INT);\n\n-- another\nCREATE INDEX i ON a (x);\n";
        let got: Vec<String> = statements(sql).collect();
        assert_eq!(got, ["CREATE TABLE a (x INT)", "CREATE INDEX i ON a (x)"]);
        for (_, sql) in MYSQL_MIGRATIONS.iter().chain(SQLITE_MIGRATIONS) {
            assert!(statements(sql).count() > 0);
        }
    }
}
