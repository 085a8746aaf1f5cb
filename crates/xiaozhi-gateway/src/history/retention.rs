//! Retention: old audio and old text are deleted in small batches, periodically.
//!
//! Audio goes first and never leaves a dangling reference: each batch clears the
//! `audio_id` of its rows and deletes the blobs in one transaction. Text rows older than
//! their limit go with their audio. The idempotency ledger (`xz_chat_applied`) is pruned
//! after `LEDGER_DAYS`, long after any journal could still be replayed.

use std::time::Duration;

use sqlx::AssertSqlSafe;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::store::{Store, StoreError};
use super::writer::format_time;

/// Rows per delete batch.
const BATCH: usize = 500;
/// Ledger entries are kept this long.
const LEDGER_DAYS: u32 = 30;

/// Limits, in days (0: keep forever).
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    pub audio_days: u32,
    pub text_days: u32,
    pub utc_offset_minutes: i32,
}

/// What one pass deleted.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Deleted {
    pub audio: u64,
    pub rows: u64,
    pub ledger: u64,
}

fn cutoff(days: u32, now_ms: i64, offset: i32) -> String {
    format_time(now_ms - i64::from(days) * 86_400_000, offset)
}

fn placeholders(n: usize) -> String {
    vec!["?"; n].join(", ")
}

/// One retention pass at `now_ms`.
pub async fn run_once(store: &Store, r: Retention, now_ms: i64) -> Result<Deleted, StoreError> {
    let mut deleted = Deleted::default();
    let off = r.utc_offset_minutes;
    // Text rows past their limit: their audio first, then the rows.
    if r.text_days > 0 {
        let before = cutoff(r.text_days, now_ms, off);
        loop {
            let ids = old_rows(store, &before, false).await?;
            if ids.is_empty() {
                break;
            }
            let (audio, rows) = delete_rows(store, &ids).await?;
            deleted.audio += audio;
            deleted.rows += rows;
        }
    }
    if r.audio_days > 0 {
        let before = cutoff(r.audio_days, now_ms, off);
        loop {
            let ids = old_rows(store, &before, true).await?;
            if ids.is_empty() {
                break;
            }
            deleted.audio += strip_audio(store, &ids).await?;
        }
    }
    let before = cutoff(LEDGER_DAYS.max(r.text_days), now_ms, off);
    let sql = "DELETE FROM xz_chat_applied WHERE applied_at < ?";
    deleted.ledger = match store {
        Store::MySql(pool) => sqlx::query(sql)
            .bind(&before)
            .execute(pool)
            .await?
            .rows_affected(),
        Store::Sqlite(pool) => sqlx::query(sql)
            .bind(&before)
            .execute(pool)
            .await?
            .rows_affected(),
    };
    Ok(deleted)
}

/// Ids of up to `BATCH` rows created before `before` (only rows with audio if asked).
async fn old_rows(store: &Store, before: &str, with_audio: bool) -> Result<Vec<i64>, StoreError> {
    let sql = if with_audio {
        "SELECT id FROM ai_agent_chat_history WHERE created_at < ? AND audio_id IS NOT NULL ORDER BY id LIMIT ?"
    } else {
        "SELECT id FROM ai_agent_chat_history WHERE created_at < ? ORDER BY id LIMIT ?"
    };
    Ok(match store {
        Store::MySql(pool) => {
            sqlx::query_scalar(sql)
                .bind(before)
                .bind(BATCH as i64)
                .fetch_all(pool)
                .await?
        }
        Store::Sqlite(pool) => {
            sqlx::query_scalar(sql)
                .bind(before)
                .bind(BATCH as i64)
                .fetch_all(pool)
                .await?
        }
    })
}

/// Clears the audio of these rows and deletes the blobs, in one transaction.
async fn strip_audio(store: &Store, ids: &[i64]) -> Result<u64, StoreError> {
    let list = placeholders(ids.len());
    let select = format!(
        "SELECT audio_id FROM ai_agent_chat_history WHERE id IN ({list}) AND audio_id IS NOT NULL"
    );
    let clear = format!("UPDATE ai_agent_chat_history SET audio_id = NULL WHERE id IN ({list})");
    macro_rules! run {
        ($pool:expr) => {{
            let mut tx = $pool.begin().await?;
            let mut q = sqlx::query_scalar::<_, String>(AssertSqlSafe(select.clone()));
            for id in ids {
                q = q.bind(*id);
            }
            let audio_ids = q.fetch_all(&mut *tx).await?;
            let mut q = sqlx::query(AssertSqlSafe(clear.clone()));
            for id in ids {
                q = q.bind(*id);
            }
            q.execute(&mut *tx).await?;
            let mut n = 0;
            if !audio_ids.is_empty() {
                let delete = format!(
                    "DELETE FROM ai_agent_chat_audio WHERE id IN ({})",
                    placeholders(audio_ids.len())
                );
                let mut q = sqlx::query(AssertSqlSafe(delete));
                for id in &audio_ids {
                    q = q.bind(id);
                }
                n = q.execute(&mut *tx).await?.rows_affected();
            }
            tx.commit().await?;
            n
        }};
    }
    Ok(match store {
        Store::MySql(pool) => run!(pool),
        Store::Sqlite(pool) => run!(pool),
    })
}

/// Deletes these rows and their audio, in one transaction.
async fn delete_rows(store: &Store, ids: &[i64]) -> Result<(u64, u64), StoreError> {
    let audio = strip_audio(store, ids).await?;
    let delete = format!(
        "DELETE FROM ai_agent_chat_history WHERE id IN ({})",
        placeholders(ids.len())
    );
    let rows = match store {
        Store::MySql(pool) => {
            let mut q = sqlx::query(AssertSqlSafe(delete));
            for id in ids {
                q = q.bind(*id);
            }
            q.execute(pool).await?.rows_affected()
        }
        Store::Sqlite(pool) => {
            let mut q = sqlx::query(AssertSqlSafe(delete));
            for id in ids {
                q = q.bind(*id);
            }
            q.execute(pool).await?.rows_affected()
        }
    };
    Ok((audio, rows))
}

/// Runs a pass at start and then every `every`, until `stop`.
pub async fn run_periodically(
    store: Store,
    r: Retention,
    every: Duration,
    stop: CancellationToken,
) {
    if r.audio_days == 0 && r.text_days == 0 {
        return;
    }
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        match run_once(&store, r, super::record::now_ms()).await {
            Ok(d) if d != Deleted::default() => {
                info!(
                    audio = d.audio,
                    rows = d.rows,
                    ledger = d.ledger,
                    "chat-history retention"
                )
            }
            Ok(_) => {}
            Err(e) => warn!(error = %e, "chat-history retention failed; will retry"),
        }
    }
}
