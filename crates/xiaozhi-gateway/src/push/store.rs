//! The push queue in the history database (`xz_push`, `migrations/<backend>/0005_push.sql`):
//! it outlives restarts, and in a cluster every node sharing the database sees it.
//!
//! A node sends a push only after claiming it (`queued` -> `sending`, naming itself) with one
//! conditional UPDATE; whoever changes the row first wins, so a push is sent once however
//! many nodes hold a stale view of it. Every statement with a value in it is
//! parameterised; the same SQL runs on MySQL/MariaDB and SQLite.

use sqlx::Row;

use crate::history::store::{Store, StoreError};
use crate::protocol::push::PushState;

/// One push (one device) as stored.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PushRow {
    pub id: String,
    pub batch_id: String,
    /// Colon form.
    pub mac_address: String,
    pub kind: String,
    /// The kind's fields (JSON).
    pub fields: serde_json::Value,
    pub state: PushState,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Where the request came from: `http`, `mqtt`, `redis`.
    pub source: String,
    pub created_ms: i64,
    pub expires_ms: i64,
    pub updated_ms: i64,
}

/// The columns every read selects, in [`PushRow`]'s order.
const COLUMNS: &str = "id, batch_id, mac_address, kind, fields, state, error, node, source, \
                       created_ms, expires_ms, updated_ms";

/// States that still wait for delivery (count against the bounds).
const WAITING: &str = "state IN ('queued', 'sending')";

/// Rows per multi-row INSERT (12 values each, well under SQLite's parameter limit).
const INSERT_CHUNK: usize = 500;

/// Runs the same code against whichever pool the store has.
macro_rules! on_pool {
    ($store:expr, $pool:ident => $body:expr) => {
        match $store {
            Store::MySql($pool) => $body,
            Store::Sqlite($pool) => $body,
        }
    };
}

/// Reads one row of [`COLUMNS`].
macro_rules! push_row {
    ($row:expr) => {{
        let row = $row;
        let fields: String = row.try_get("fields")?;
        let state: String = row.try_get("state")?;
        PushRow {
            id: row.try_get("id")?,
            batch_id: row.try_get("batch_id")?,
            mac_address: row.try_get("mac_address")?,
            kind: row.try_get("kind")?,
            fields: serde_json::from_str(&fields).unwrap_or(serde_json::Value::Null),
            state: PushState::parse(&state).unwrap_or(PushState::Failed),
            error: row.try_get("error")?,
            node: row.try_get("node")?,
            source: row.try_get("source")?,
            created_ms: row.try_get("created_ms")?,
            expires_ms: row.try_get("expires_ms")?,
            updated_ms: row.try_get("updated_ms")?,
        }
    }};
}

/// What to list.
#[derive(Debug, Clone, Default)]
pub struct PushFilter {
    pub batch_id: Option<String>,
    /// Colon form.
    pub mac_address: Option<String>,
    pub state: Option<PushState>,
    /// Keyset paging: rows created before this (ms), then by id.
    pub before: Option<(i64, String)>,
    pub limit: u32,
}

/// Why a batch was not queued.
#[derive(Debug, thiserror::Error)]
pub enum InsertError {
    #[error(
        "{count} device(s) already have push.max_per_device ({max}) pushes waiting, e.g. {examples}"
    )]
    DeviceFull {
        count: usize,
        max: u64,
        examples: String,
    },
    #[error(
        "{waiting} pushes are waiting across the fleet; {adding} more would pass push.max_queued ({max})"
    )]
    FleetFull { waiting: u64, adding: u64, max: u64 },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<sqlx::Error> for InsertError {
    fn from(e: sqlx::Error) -> Self {
        InsertError::Store(e.into())
    }
}

/// The push queue.
#[derive(Clone)]
pub struct PushStore {
    store: Store,
}

impl PushStore {
    pub fn new(store: Store) -> Self {
        PushStore { store }
    }

    /// Queues `rows` (all `queued`) in one transaction, or none of them: refused when a
    /// device would pass `max_per_device` waiting pushes or the fleet `max_queued`.
    pub async fn insert(
        &self,
        rows: &[PushRow],
        max_per_device: u64,
        max_queued: u64,
    ) -> Result<(), InsertError> {
        // SQLite: take the write lock first. A deferred transaction that reads, then
        // writes, fails at once with SQLITE_BUSY(_SNAPSHOT) when the delivery task wrote in
        // between (WAL cannot upgrade it), whatever the busy timeout.
        let begin = match &self.store {
            Store::MySql(_) => "BEGIN",
            Store::Sqlite(_) => "BEGIN IMMEDIATE",
        };
        on_pool!(&self.store, pool => {
            let mut tx = pool.begin_with(begin).await?;
            let waiting: i64 =
                sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT COUNT(*) FROM xz_push WHERE {WAITING}")))
                    .fetch_one(&mut *tx)
                    .await?;
            let waiting = waiting.max(0) as u64;
            if waiting + rows.len() as u64 > max_queued {
                return Err(InsertError::FleetFull { waiting, adding: rows.len() as u64, max: max_queued });
            }
            // Devices at their bound: few rows (only devices with waiting pushes count).
            let full: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                "SELECT mac_address FROM xz_push WHERE {WAITING} \
                 GROUP BY mac_address HAVING COUNT(*) >= ?"
            )))
            .bind(max_per_device as i64)
            .fetch_all(&mut *tx)
            .await?;
            if !full.is_empty() {
                let full: std::collections::HashSet<String> = full.into_iter().collect();
                let hit: Vec<&str> = rows
                    .iter()
                    .filter(|r| full.contains(&r.mac_address))
                    .map(|r| r.mac_address.as_str())
                    .collect();
                if !hit.is_empty() {
                    return Err(InsertError::DeviceFull {
                        count: hit.len(),
                        max: max_per_device,
                        examples: hit.iter().take(5).copied().collect::<Vec<_>>().join(", "),
                    });
                }
            }
            for chunk in rows.chunks(INSERT_CHUNK) {
                let marks = vec!["(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"; chunk.len()].join(", ");
                let sql = format!("INSERT INTO xz_push ({COLUMNS}) VALUES {marks}");
                let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
                for r in chunk {
                    q = q
                        .bind(r.id.as_str())
                        .bind(r.batch_id.as_str())
                        .bind(r.mac_address.as_str())
                        .bind(r.kind.as_str())
                        .bind(r.fields.to_string())
                        .bind(r.state.as_str())
                        .bind(r.error.as_deref())
                        .bind(r.node.as_deref())
                        .bind(r.source.as_str())
                        .bind(r.created_ms)
                        .bind(r.expires_ms)
                        .bind(r.updated_ms);
                }
                q.execute(&mut *tx).await?;
            }
            tx.commit().await?;
            Ok(())
        })
    }

    pub async fn get(&self, id: &str) -> Result<Option<PushRow>, StoreError> {
        let sql = format!("SELECT {COLUMNS} FROM xz_push WHERE id = ?");
        on_pool!(&self.store, pool => {
            let row = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(id).fetch_optional(pool).await?;
            match row {
                Some(row) => Ok(Some(push_row!(row))),
                None => Ok(None),
            }
        })
    }

    /// Newest first.
    pub async fn list(&self, filter: &PushFilter) -> Result<Vec<PushRow>, StoreError> {
        let mut sql = format!("SELECT {COLUMNS} FROM xz_push WHERE 1 = 1");
        if filter.batch_id.is_some() {
            sql.push_str(" AND batch_id = ?");
        }
        if filter.mac_address.is_some() {
            sql.push_str(" AND mac_address = ?");
        }
        if filter.state.is_some() {
            sql.push_str(" AND state = ?");
        }
        if filter.before.is_some() {
            sql.push_str(" AND (created_ms < ? OR (created_ms = ? AND id < ?))");
        }
        sql.push_str(" ORDER BY created_ms DESC, id DESC LIMIT ?");
        on_pool!(&self.store, pool => {
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
            if let Some(b) = &filter.batch_id {
                q = q.bind(b.as_str());
            }
            if let Some(m) = &filter.mac_address {
                q = q.bind(m.as_str());
            }
            if let Some(s) = filter.state {
                q = q.bind(s.as_str());
            }
            if let Some((ms, id)) = &filter.before {
                q = q.bind(*ms).bind(*ms).bind(id.as_str());
            }
            let rows = q.bind(i64::from(filter.limit)).fetch_all(pool).await?;
            let mut out = Vec::with_capacity(rows.len());
            for row in rows {
                out.push(push_row!(row));
            }
            Ok(out)
        })
    }

    /// A device's pushes waiting to be sent and not expired, oldest first.
    pub async fn due_for(
        &self,
        mac: &str,
        now_ms: i64,
        limit: u32,
    ) -> Result<Vec<PushRow>, StoreError> {
        let sql = format!(
            "SELECT {COLUMNS} FROM xz_push WHERE mac_address = ? AND state = 'queued' \
             AND expires_ms > ? ORDER BY created_ms, id LIMIT ?"
        );
        on_pool!(&self.store, pool => {
            let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(mac)
                .bind(now_ms)
                .bind(i64::from(limit))
                .fetch_all(pool)
                .await?;
            let mut out = Vec::with_capacity(rows.len());
            for row in rows {
                out.push(push_row!(row));
            }
            Ok(out)
        })
    }

    /// A batch's pushes still waiting and not expired.
    pub async fn due_in_batch(
        &self,
        batch_id: &str,
        now_ms: i64,
    ) -> Result<Vec<PushRow>, StoreError> {
        let sql = format!(
            "SELECT {COLUMNS} FROM xz_push WHERE batch_id = ? AND state = 'queued' AND expires_ms > ?"
        );
        on_pool!(&self.store, pool => {
            let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(batch_id)
                .bind(now_ms)
                .fetch_all(pool)
                .await?;
            let mut out = Vec::with_capacity(rows.len());
            for row in rows {
                out.push(push_row!(row));
            }
            Ok(out)
        })
    }

    /// Every device with a push waiting and not expired (at most `limit`).
    pub async fn waiting_devices(
        &self,
        now_ms: i64,
        limit: u32,
    ) -> Result<Vec<String>, StoreError> {
        on_pool!(&self.store, pool => {
            Ok(sqlx::query_scalar(
                "SELECT DISTINCT mac_address FROM xz_push WHERE state = 'queued' AND expires_ms > ? LIMIT ?",
            )
            .bind(now_ms)
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await?)
        })
    }

    /// How many pushes wait, across the fleet.
    pub async fn waiting_count(&self) -> Result<u64, StoreError> {
        let sql = format!("SELECT COUNT(*) FROM xz_push WHERE {WAITING}");
        on_pool!(&self.store, pool => {
            let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql)).fetch_one(pool).await?;
            Ok(n.max(0) as u64)
        })
    }

    /// Takes a push for sending: true if this call moved it from `queued` to `sending`
    /// (and it had not expired), false if another node or an expiry got there first.
    pub async fn claim(&self, id: &str, node: &str, now_ms: i64) -> Result<bool, StoreError> {
        on_pool!(&self.store, pool => {
            let done = sqlx::query(
                "UPDATE xz_push SET state = 'sending', node = ?, updated_ms = ? \
                 WHERE id = ? AND state = 'queued' AND expires_ms > ?",
            )
            .bind(node)
            .bind(now_ms)
            .bind(id)
            .bind(now_ms)
            .execute(pool)
            .await?;
            Ok(done.rows_affected() == 1)
        })
    }

    /// Ends a claimed push in `state` (`sent`, `delivered`, `failed`), or hands it back
    /// (`queued`: the device went away or got busy before it was sent).
    pub async fn finish(
        &self,
        id: &str,
        state: PushState,
        error: Option<&str>,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let error = error.map(|e| e.chars().take(500).collect::<String>());
        on_pool!(&self.store, pool => {
            let done = sqlx::query(
                "UPDATE xz_push SET state = ?, error = ?, updated_ms = ? \
                 WHERE id = ? AND state = 'sending'",
            )
            .bind(state.as_str())
            .bind(error)
            .bind(now_ms)
            .bind(id)
            .execute(pool)
            .await?;
            Ok(done.rows_affected() == 1)
        })
    }

    /// Expires waiting pushes past their `expires_at` (at most `limit` per call);
    /// returns those this call expired.
    pub async fn expire_due(&self, now_ms: i64, limit: u32) -> Result<Vec<PushRow>, StoreError> {
        let sql = format!(
            "SELECT {COLUMNS} FROM xz_push WHERE state = 'queued' AND expires_ms <= ? LIMIT ?"
        );
        on_pool!(&self.store, pool => {
            let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(now_ms)
                .bind(i64::from(limit))
                .fetch_all(pool)
                .await?;
            let mut expired = Vec::new();
            for row in rows {
                let mut push = push_row!(row);
                let done = sqlx::query(
                    "UPDATE xz_push SET state = 'expired', updated_ms = ? WHERE id = ? AND state = 'queued'",
                )
                .bind(now_ms)
                .bind(push.id.as_str())
                .execute(pool)
                .await?;
                if done.rows_affected() == 1 {
                    push.state = PushState::Expired;
                    push.updated_ms = now_ms;
                    expired.push(push);
                }
            }
            Ok(expired)
        })
    }

    /// At start: pushes this node had claimed but not finished (it stopped in between)
    /// wait again. Returns how many.
    pub async fn recover(&self, node: &str, now_ms: i64) -> Result<u64, StoreError> {
        on_pool!(&self.store, pool => {
            let done = sqlx::query(
                "UPDATE xz_push SET state = 'queued', updated_ms = ? WHERE state = 'sending' AND node = ?",
            )
            .bind(now_ms)
            .bind(node)
            .execute(pool)
            .await?;
            Ok(done.rows_affected())
        })
    }

    /// Keeps a clip until `expires_ms`.
    pub async fn insert_clip(
        &self,
        id: &str,
        ogg: &[u8],
        duration_ms: u64,
        source: &str,
        created_ms: i64,
        expires_ms: i64,
    ) -> Result<(), StoreError> {
        on_pool!(&self.store, pool => {
            sqlx::query(
                "INSERT INTO xz_push_clip (id, content, duration_ms, source, created_ms, expires_ms) \
                 VALUES (?, ?, ?, ?, ?, ?)",
            )
            .bind(id)
            .bind(ogg)
            .bind(duration_ms as i64)
            .bind(source)
            .bind(created_ms)
            .bind(expires_ms)
            .execute(pool)
            .await?;
            Ok(())
        })
    }

    /// A clip that has not expired.
    pub async fn clip(&self, id: &str, now_ms: i64) -> Result<Option<Vec<u8>>, StoreError> {
        on_pool!(&self.store, pool => {
            Ok(sqlx::query_scalar(
                "SELECT content FROM xz_push_clip WHERE id = ? AND expires_ms > ?",
            )
            .bind(id)
            .bind(now_ms)
            .fetch_optional(pool)
            .await?)
        })
    }

    /// Deletes expired clips (at most `limit`); returns how many.
    pub async fn delete_expired_clips(&self, now_ms: i64, limit: u32) -> Result<u64, StoreError> {
        on_pool!(&self.store, pool => {
            let ids: Vec<String> = sqlx::query_scalar(
                "SELECT id FROM xz_push_clip WHERE expires_ms <= ? LIMIT ?",
            )
            .bind(now_ms)
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await?;
            let mut deleted = 0;
            for id in ids {
                deleted += sqlx::query("DELETE FROM xz_push_clip WHERE id = ?")
                    .bind(id)
                    .execute(pool)
                    .await?
                    .rows_affected();
            }
            Ok(deleted)
        })
    }
}
