//! Reading chat history back: the queries behind the history API (`src/http/history.rs`).
//!
//! Every statement is a compiled-in constant, one per backend, and every value goes
//! through `bind`. Times are selected as strings so that both backends answer alike:
//! `YYYY-MM-DD HH:MM:SS.mmm`, in the zone they were written in
//! (`history.utc_offset_minutes`). On MySQL/MariaDB they are formatted from the
//! `DATETIME(3)` column; on SQLite they are the stored text.
//!
//! Lists that grow while someone pages through them are paged by key, never by offset:
//! messages by `id`, sessions by `(started_at, session_id)`. A row inserted while a client
//! pages (a new session, a new message) never shifts the items it has not seen yet, so
//! every item that existed when paging began is returned exactly once.

use serde::Serialize;
use sqlx::Row;
use sqlx::mysql::MySqlRow;
use sqlx::sqlite::SqliteRow;

use super::store::{Store, StoreError};

/// A row from either backend, with the few typed getters the queries need.
enum AnyRow<'r> {
    MySql(&'r MySqlRow),
    Sqlite(&'r SqliteRow),
}

impl AnyRow<'_> {
    fn i64(&self, col: &str) -> Result<i64, sqlx::Error> {
        Ok(self.opt_i64(col)?.unwrap_or(0))
    }

    fn opt_i64(&self, col: &str) -> Result<Option<i64>, sqlx::Error> {
        match self {
            AnyRow::MySql(r) => r.try_get(col),
            AnyRow::Sqlite(r) => r.try_get(col),
        }
    }

    fn opt_string(&self, col: &str) -> Result<Option<String>, sqlx::Error> {
        match self {
            // A computed string may come back with a binary collation on some servers.
            AnyRow::MySql(r) => match r.try_get::<Option<String>, _>(col) {
                Ok(s) => Ok(s),
                Err(_) => Ok(r
                    .try_get::<Option<Vec<u8>>, _>(col)?
                    .map(|b| String::from_utf8_lossy(&b).into_owned())),
            },
            AnyRow::Sqlite(r) => r.try_get(col),
        }
    }

    fn string(&self, col: &str) -> Result<String, sqlx::Error> {
        Ok(self.opt_string(col)?.unwrap_or_default())
    }

    fn opt_bytes(&self, col: &str) -> Result<Option<Vec<u8>>, sqlx::Error> {
        match self {
            AnyRow::MySql(r) => r.try_get(col),
            AnyRow::Sqlite(r) => r.try_get(col),
        }
    }
}

/// Runs one of two statements (MySQL, SQLite) with the same binds and maps every row.
macro_rules! fetch_all {
    ($store:expr, $mysql:expr, $sqlite:expr, [$($arg:expr),* $(,)?], $map:expr) => {
        match $store {
            Store::MySql(pool) => sqlx::query($mysql)
                $(.bind($arg))*
                .fetch_all(pool)
                .await?
                .iter()
                .map(|r| $map(&AnyRow::MySql(r)))
                .collect::<Result<Vec<_>, sqlx::Error>>()?,
            Store::Sqlite(pool) => sqlx::query($sqlite)
                $(.bind($arg))*
                .fetch_all(pool)
                .await?
                .iter()
                .map(|r| $map(&AnyRow::Sqlite(r)))
                .collect::<Result<Vec<_>, sqlx::Error>>()?,
        }
    };
}

/// A device that has history.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct DeviceSummary {
    pub mac_address: String,
    pub agent_id: Option<String>,
    pub sessions: i64,
    pub messages: i64,
    /// The newest message's time.
    pub last_at: Option<String>,
}

/// One session of a device.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct SessionSummary {
    pub session_id: String,
    pub agent_id: Option<String>,
    /// The first message's time.
    pub started_at: String,
    /// The last message's time.
    pub ended_at: String,
    pub messages: i64,
    pub user: i64,
    pub assistant: i64,
    pub tool: i64,
    /// How many messages have audio.
    pub has_audio: i64,
    /// The paging key: `started_at` at the database's full precision.
    #[serde(skip)]
    pub started_key: String,
}

/// One message.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Message {
    pub id: i64,
    pub mac_address: Option<String>,
    pub agent_id: Option<String>,
    pub session_id: Option<String>,
    /// 1 user, 2 assistant, 3 tool.
    pub chat_type: Option<i64>,
    pub content: Option<String>,
    pub audio_id: Option<String>,
    pub created_at: String,
}

/// One day of a device's activity.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DayStats {
    /// `YYYY-MM-DD`.
    pub day: String,
    /// Sessions with at least one message that day.
    pub sessions: i64,
    pub messages: i64,
    pub user: i64,
    pub assistant: i64,
    pub tool: i64,
    /// Messages with audio.
    pub audio_messages: i64,
    /// Sum of the WAV durations (16 kHz mono s16le: `(bytes - 44) / 32000`).
    pub audio_seconds: f64,
}

impl DayStats {
    /// A day without activity.
    pub fn empty(day: String) -> DayStats {
        DayStats {
            day,
            sessions: 0,
            messages: 0,
            user: 0,
            assistant: 0,
            tool: 0,
            audio_messages: 0,
            audio_seconds: 0.0,
        }
    }
}

/// One device's activity in a time range (the fleet statistics' top devices).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DeviceActivity {
    pub mac_address: String,
    /// Sessions with at least one message in the range.
    pub sessions: i64,
    pub messages: i64,
    pub audio_seconds: f64,
}

/// What a device has in total.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, Default)]
pub struct DeviceTotals {
    pub sessions: i64,
    pub messages: i64,
    pub last_at: Option<String>,
}

/// Bytes of PCM per second in the stored WAVs (16 kHz, mono, 16-bit).
pub const WAV_BYTES_PER_SECOND: f64 = 32_000.0;

/// Lower and upper time bound that match every row (the upper one exclusive).
pub const TIME_MIN: &str = "1000-01-01 00:00:00.000";
pub const TIME_MAX: &str = "9999-12-31 23:59:59.999999";

/// The escape character of every `LIKE` pattern built here (`ESCAPE '!'`). Not `\`:
/// MySQL and SQLite disagree on backslashes in string literals, and `!` means the same
/// in both.
pub const LIKE_ESCAPE: char = '!';

/// A `LIKE` pattern matching `term` anywhere, with `%`, `_` and the escape character
/// taken literally.
pub fn contains_pattern(term: &str) -> String {
    let mut out = String::with_capacity(term.len() + 2);
    out.push('%');
    for c in term.chars() {
        if c == '%' || c == '_' || c == LIKE_ESCAPE {
            out.push(LIKE_ESCAPE);
        }
        out.push(c);
    }
    out.push('%');
    out
}

/// Where a page of sessions continues: after the session that started at `started_at`
/// with id `session_id` (sessions are listed newest first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionCursor {
    pub started_at: String,
    pub session_id: String,
}

/// Longest cursor token [`SessionCursor::decode`] reads.
pub const MAX_CURSOR_LEN: usize = 400;

impl SessionCursor {
    /// The cursor after `s`.
    pub fn after(s: &SessionSummary) -> SessionCursor {
        SessionCursor {
            started_at: s.started_key.clone(),
            session_id: s.session_id.clone(),
        }
    }

    /// An opaque URL-safe token (at most [`MAX_CURSOR_LEN`] characters).
    pub fn encode(&self) -> String {
        use base64::Engine;
        let raw = format!("{}\n{}", self.started_at, self.session_id);
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
    }

    /// Reads a token made by [`SessionCursor::encode`]; `None` if it is not one.
    pub fn decode(token: &str) -> Option<SessionCursor> {
        use base64::Engine;
        // A session id may be 64 characters of up to 4 bytes each: with the time, about
        // 380 base64 characters (the fuzz work's property test found 200 too short).
        if token.is_empty() || token.len() > MAX_CURSOR_LEN {
            return None;
        }
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(token)
            .ok()?;
        let raw = String::from_utf8(raw).ok()?;
        let (started_at, session_id) = raw.split_once('\n')?;
        let time_like = !started_at.is_empty()
            && started_at.len() <= 32
            && started_at
                .bytes()
                .all(|b| b.is_ascii_digit() || b" -:.T".contains(&b));
        if !time_like || session_id.is_empty() || session_id.chars().count() > 64 {
            return None;
        }
        Some(SessionCursor {
            started_at: started_at.to_owned(),
            session_id: session_id.to_owned(),
        })
    }
}

/// Which rows an export covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportFilter {
    /// Colon form.
    pub mac_address: Option<String>,
    /// Inclusive lower time bound.
    pub from: String,
    /// Exclusive upper time bound.
    pub until: String,
}

// --- statements --------------------------------------------------------------------
// MySQL formats times with DATE_FORMAT(..., '%Y-%m-%d %H:%i:%s.%f') (microseconds),
// trimmed to milliseconds with LEFT(..., 23) for display. Counts are COUNT (BIGINT on
// both backends); sums are cast to SIGNED (MySQL's SUM would be DECIMAL).

// The device list: every device with history, most recently active first (ties: by MAC,
// in the column's collation, as `ORDER BY mac_address` sorts), a page of them by
// LIMIT/OFFSET. The answer is what one GROUP BY over the whole table gives (newest message,
// highest agent id, distinct sessions, messages per MAC), but the table is never grouped:
// the page is chosen from each device's newest message alone, read from
// idx_xz_mac_created_agent (mac_address, created_at, agent_id, migration 0004), and only
// the devices on the page are counted, each from an index (agent id from 0004's, sessions
// and messages from idx_xz_mac_session_created). Each correlated subquery matches
// `mac_address = p.mac_address` in the column's collation: exactly the rows the GROUP BY
// put in that device's group.
//
// MySQL/MariaDB: the newest message per MAC is a loose index scan ("Using index for
// group-by": one index dive per device). 1,000,000 rows, 1000 devices: 3.5-5 s per page
// grouped (MariaDB read the MAC index with a row lookup per row), 0.03-0.15 s now.
const DEVICES_MY: &str = "SELECT p.mac_address, \
     (SELECT MAX(x.agent_id) FROM ai_agent_chat_history x \
      WHERE x.mac_address = p.mac_address) AS agent_id, \
     (SELECT COUNT(DISTINCT s.session_id) FROM ai_agent_chat_history s \
      WHERE s.mac_address = p.mac_address) AS sessions, \
     (SELECT COUNT(*) FROM ai_agent_chat_history c \
      WHERE c.mac_address = p.mac_address) AS messages, \
     LEFT(DATE_FORMAT(p.last_at, '%Y-%m-%d %H:%i:%s.%f'), 23) AS last_at \
     FROM (SELECT mac_address, MAX(created_at) AS last_at FROM ai_agent_chat_history \
           WHERE mac_address IS NOT NULL GROUP BY mac_address \
           ORDER BY last_at DESC, mac_address LIMIT ? OFFSET ?) p \
     ORDER BY p.last_at DESC, p.mac_address";
// SQLite has no loose index scan: the distinct MACs are walked one index search at a time
// (`macs`: the smallest MAC above the previous one), and each one's newest message is a
// min/max lookup on (mac_address = ?, created_at). 1,000,000 rows: 0.33 s per page
// grouped, 0.02 s now. (BINARY collation throughout, as the GROUP BY had.)
const DEVICES_LITE: &str = "WITH RECURSIVE macs(mac_address) AS ( \
         SELECT MIN(mac_address) FROM ai_agent_chat_history \
         UNION ALL \
         SELECT (SELECT MIN(n.mac_address) FROM ai_agent_chat_history n \
                 WHERE n.mac_address > macs.mac_address) \
         FROM macs WHERE macs.mac_address IS NOT NULL), \
     page AS (SELECT mac_address, \
         (SELECT MAX(l.created_at) FROM ai_agent_chat_history l \
          WHERE l.mac_address = macs.mac_address) AS last_at \
         FROM macs WHERE mac_address IS NOT NULL \
         ORDER BY last_at DESC, mac_address LIMIT ? OFFSET ?) \
     SELECT p.mac_address, \
     (SELECT MAX(x.agent_id) FROM ai_agent_chat_history x \
      WHERE x.mac_address = p.mac_address) AS agent_id, \
     (SELECT COUNT(DISTINCT s.session_id) FROM ai_agent_chat_history s \
      WHERE s.mac_address = p.mac_address) AS sessions, \
     (SELECT COUNT(*) FROM ai_agent_chat_history c \
      WHERE c.mac_address = p.mac_address) AS messages, \
     p.last_at \
     FROM page p ORDER BY p.last_at DESC, p.mac_address";

const SESSIONS_MY: &str = "SELECT session_id, MAX(agent_id) AS agent_id, \
     LEFT(DATE_FORMAT(MIN(created_at), '%Y-%m-%d %H:%i:%s.%f'), 23) AS started_at, \
     LEFT(DATE_FORMAT(MAX(created_at), '%Y-%m-%d %H:%i:%s.%f'), 23) AS ended_at, \
     DATE_FORMAT(MIN(created_at), '%Y-%m-%d %H:%i:%s.%f') AS started_key, \
     COUNT(*) AS messages, \
     COUNT(CASE WHEN chat_type = 1 THEN 1 END) AS user_messages, \
     COUNT(CASE WHEN chat_type = 2 THEN 1 END) AS assistant_messages, \
     COUNT(CASE WHEN chat_type = 3 THEN 1 END) AS tool_messages, \
     COUNT(audio_id) AS audio_messages \
     FROM ai_agent_chat_history WHERE mac_address = ? AND session_id IS NOT NULL \
     GROUP BY session_id \
     ORDER BY MIN(created_at) DESC, CAST(session_id AS BINARY) DESC LIMIT ?";
const SESSIONS_BEFORE_MY: &str = "SELECT session_id, MAX(agent_id) AS agent_id, \
     LEFT(DATE_FORMAT(MIN(created_at), '%Y-%m-%d %H:%i:%s.%f'), 23) AS started_at, \
     LEFT(DATE_FORMAT(MAX(created_at), '%Y-%m-%d %H:%i:%s.%f'), 23) AS ended_at, \
     DATE_FORMAT(MIN(created_at), '%Y-%m-%d %H:%i:%s.%f') AS started_key, \
     COUNT(*) AS messages, \
     COUNT(CASE WHEN chat_type = 1 THEN 1 END) AS user_messages, \
     COUNT(CASE WHEN chat_type = 2 THEN 1 END) AS assistant_messages, \
     COUNT(CASE WHEN chat_type = 3 THEN 1 END) AS tool_messages, \
     COUNT(audio_id) AS audio_messages \
     FROM ai_agent_chat_history WHERE mac_address = ? AND session_id IS NOT NULL \
     GROUP BY session_id \
     HAVING MIN(created_at) < ? \
         OR (MIN(created_at) = ? AND CAST(session_id AS BINARY) < CAST(? AS BINARY)) \
     ORDER BY MIN(created_at) DESC, CAST(session_id AS BINARY) DESC LIMIT ?";
const SESSIONS_LITE: &str = "SELECT session_id, MAX(agent_id) AS agent_id, \
     MIN(created_at) AS started_at, MAX(created_at) AS ended_at, \
     MIN(created_at) AS started_key, \
     COUNT(*) AS messages, \
     COUNT(CASE WHEN chat_type = 1 THEN 1 END) AS user_messages, \
     COUNT(CASE WHEN chat_type = 2 THEN 1 END) AS assistant_messages, \
     COUNT(CASE WHEN chat_type = 3 THEN 1 END) AS tool_messages, \
     COUNT(audio_id) AS audio_messages \
     FROM ai_agent_chat_history WHERE mac_address = ? AND session_id IS NOT NULL \
     GROUP BY session_id \
     ORDER BY MIN(created_at) DESC, session_id DESC LIMIT ?";
const SESSIONS_BEFORE_LITE: &str = "SELECT session_id, MAX(agent_id) AS agent_id, \
     MIN(created_at) AS started_at, MAX(created_at) AS ended_at, \
     MIN(created_at) AS started_key, \
     COUNT(*) AS messages, \
     COUNT(CASE WHEN chat_type = 1 THEN 1 END) AS user_messages, \
     COUNT(CASE WHEN chat_type = 2 THEN 1 END) AS assistant_messages, \
     COUNT(CASE WHEN chat_type = 3 THEN 1 END) AS tool_messages, \
     COUNT(audio_id) AS audio_messages \
     FROM ai_agent_chat_history WHERE mac_address = ? AND session_id IS NOT NULL \
     GROUP BY session_id \
     HAVING MIN(created_at) < ? OR (MIN(created_at) = ? AND session_id < ?) \
     ORDER BY MIN(created_at) DESC, session_id DESC LIMIT ?";

const MESSAGES_MY: &str = "SELECT id, mac_address, agent_id, session_id, \
     CAST(chat_type AS SIGNED) AS chat_type, content, audio_id, \
     LEFT(DATE_FORMAT(created_at, '%Y-%m-%d %H:%i:%s.%f'), 23) AS created_at \
     FROM ai_agent_chat_history WHERE session_id = ? AND id > ? ORDER BY id LIMIT ?";
const MESSAGES_LITE: &str = "SELECT id, mac_address, agent_id, session_id, chat_type, \
     content, audio_id, created_at \
     FROM ai_agent_chat_history WHERE session_id = ? AND id > ? ORDER BY id LIMIT ?";

const AUDIO: &str = "SELECT audio FROM ai_agent_chat_audio WHERE id = ?";

// The PCM bytes of the joined WAVs (`a`), past their 44-byte header.
macro_rules! pcm_bytes {
    () => {
        "COALESCE(SUM(CASE WHEN LENGTH(a.audio) > 44 THEN LENGTH(a.audio) - 44 ELSE 0 END), 0)"
    };
}

macro_rules! audio_bytes_my {
    () => {
        concat!("CAST(", pcm_bytes!(), " AS SIGNED) AS audio_bytes")
    };
}

macro_rules! audio_bytes_lite {
    () => {
        concat!(pcm_bytes!(), " AS audio_bytes")
    };
}

// What a day's statistics count. A session is a (device, session id) pair, so the fleet
// never merges two devices' sessions.
// Everything but the session count and the audio sum, which differ by dialect.
macro_rules! day_counts {
    () => {
        "COUNT(*) AS messages, \
         COUNT(CASE WHEN h.chat_type = 1 THEN 1 END) AS user_messages, \
         COUNT(CASE WHEN h.chat_type = 2 THEN 1 END) AS assistant_messages, \
         COUNT(CASE WHEN h.chat_type = 3 THEN 1 END) AS tool_messages, \
         COUNT(a.id) AS audio_messages, "
    };
}

macro_rules! day_columns_my {
    () => {
        concat!(
            "COUNT(DISTINCT h.mac_address, h.session_id) AS sessions, ",
            day_counts!(),
            audio_bytes_my!()
        )
    };
}

macro_rules! day_columns_lite {
    () => {
        concat!(
            "COUNT(DISTINCT h.mac_address || ' ' || h.session_id) AS sessions, ",
            day_counts!(),
            audio_bytes_lite!()
        )
    };
}

macro_rules! messages_with_audio {
    () => {
        " FROM ai_agent_chat_history h LEFT JOIN ai_agent_chat_audio a ON a.id = h.audio_id WHERE "
    };
}

// The same, read through idx_xz_created_mac_session (migration 0003) whatever MySQL/MariaDB
// estimates: when the range holds most of the table (a young database, a wide range), its
// estimate makes MariaDB sometimes read the whole table instead (10.11, 1,000,000 rows all in
// the range: 1.4 s instead of 0.45 s, from one execution to the next). Each statement
// that names the index has a twin without it, used when the index is not there yet.
macro_rules! messages_with_audio_by_time {
    () => {
        " FROM ai_agent_chat_history h FORCE INDEX (idx_xz_created_mac_session) \
         LEFT JOIN ai_agent_chat_audio a ON a.id = h.audio_id WHERE "
    };
}

// Per-day statistics grouped by day, of one device (`h.mac_address = ? AND ` in front of
// the time range) or of the whole fleet (nothing there): the same statement otherwise.
macro_rules! stats_my {
    ($device:literal) => {
        concat!(
            "SELECT DATE_FORMAT(h.created_at, '%Y-%m-%d') AS day, ",
            day_columns_my!(),
            messages_with_audio!(),
            $device,
            "h.created_at >= ? AND h.created_at < ? \
             GROUP BY DATE_FORMAT(h.created_at, '%Y-%m-%d') ORDER BY day"
        )
    };
}

macro_rules! stats_lite {
    ($device:literal) => {
        concat!(
            "SELECT substr(h.created_at, 1, 10) AS day, ",
            day_columns_lite!(),
            messages_with_audio!(),
            $device,
            "h.created_at >= ? AND h.created_at < ? \
             GROUP BY substr(h.created_at, 1, 10) ORDER BY day"
        )
    };
}

const STATS_MY: &str = stats_my!("h.mac_address = ? AND ");
const STATS_LITE: &str = stats_lite!("h.mac_address = ? AND ");
// The fleet grouped by day: only when the days cannot be listed (see `fleet_days`).
const FLEET_STATS_MY: &str = stats_my!("");
const FLEET_STATS_LITE: &str = stats_lite!("");

// The fleet's statistics are read one day at a time: the same columns over one day's
// range, without GROUP BY. Grouped by day, COUNT(DISTINCT) makes both backends sort every
// row of the range (MariaDB: 1,000,000 rows through an on-disk merge sort); one day at a
// time it only keeps that day's distinct sessions. 1,000,000 rows in 30 days: MariaDB
// 0.8-1.0 s grouped, 0.45-0.5 s by day; SQLite 0.77 s and 0.41 s.
const FLEET_DAY_MY: &str = concat!(
    "SELECT ",
    day_columns_my!(),
    messages_with_audio_by_time!(),
    "h.created_at >= ? AND h.created_at < ?"
);
const FLEET_DAY_UNHINTED_MY: &str = concat!(
    "SELECT ",
    day_columns_my!(),
    messages_with_audio!(),
    "h.created_at >= ? AND h.created_at < ?"
);
const FLEET_DAY_LITE: &str = concat!(
    "SELECT ",
    day_columns_lite!(),
    messages_with_audio!(),
    "h.created_at >= ? AND h.created_at < ?"
);
// The first and the last day with messages in a range (each an index lookup), so that
// only the days between are read.
const FLEET_DAY_SPAN_MY: &str = "SELECT \
     DATE_FORMAT((SELECT MIN(created_at) FROM ai_agent_chat_history \
                  WHERE created_at >= ? AND created_at < ?), '%Y-%m-%d') AS first_day, \
     DATE_FORMAT((SELECT MAX(created_at) FROM ai_agent_chat_history \
                  WHERE created_at >= ? AND created_at < ?), '%Y-%m-%d') AS last_day";
const FLEET_DAY_SPAN_LITE: &str = "SELECT \
     substr((SELECT MIN(created_at) FROM ai_agent_chat_history \
             WHERE created_at >= ? AND created_at < ?), 1, 10) AS first_day, \
     substr((SELECT MAX(created_at) FROM ai_agent_chat_history \
             WHERE created_at >= ? AND created_at < ?), 1, 10) AS last_day";

// The devices with the most messages in a time range. Ties go to the smaller MAC
// (compared as bytes on both backends). The range is grouped by device counting messages
// and audio only; the sessions (COUNT(DISTINCT), which would sort every row of the range)
// are counted afterwards for the listed devices alone, each from its own rows in the range
// (`s.mac_address = t.mac_address`: the same rows the device's group had).
//
// MySQL/MariaDB group by the MAC's bytes first: grouping a million rows in the column's
// case-insensitive collation costs twice as much as by bytes. The few groups are then
// merged in the column's collation, so MACs that the collation calls equal stay one
// device, as before. The missing MAC is dropped after grouping: `mac_address IS NOT NULL`
// in the WHERE makes MariaDB read the range through a MAC index, a row lookup each.
// 1,000,000 rows in the range: 0.75-0.8 s before, 0.4-0.45 s.
macro_rules! top_devices_my {
    ($from:expr) => {
        concat!(
            "SELECT t.mac_address, \
             (SELECT COUNT(DISTINCT s.session_id) FROM ai_agent_chat_history s \
              WHERE s.mac_address = t.mac_address AND s.created_at >= ? AND s.created_at < ?) \
             AS sessions, t.messages, t.audio_bytes \
             FROM (SELECT b.mac_address, CAST(SUM(b.n) AS SIGNED) AS messages, \
                   CAST(SUM(b.pcm) AS SIGNED) AS audio_bytes \
                   FROM (SELECT MIN(h.mac_address) AS mac_address, COUNT(*) AS n, ",
            pcm_bytes!(),
            " AS pcm",
            $from,
            "h.created_at >= ? AND h.created_at < ? \
                         GROUP BY CAST(h.mac_address AS BINARY)) b \
                   WHERE b.mac_address IS NOT NULL GROUP BY b.mac_address \
                   ORDER BY messages DESC, CAST(b.mac_address AS BINARY) LIMIT ?) t \
             ORDER BY t.messages DESC, CAST(t.mac_address AS BINARY)"
        )
    };
}
const TOP_DEVICES_MY: &str = top_devices_my!(messages_with_audio_by_time!());
const TOP_DEVICES_UNHINTED_MY: &str = top_devices_my!(messages_with_audio!());
// SQLite groups by bytes anyway. 1,000,000 rows in the range: 0.48 s before, 0.35 s.
const TOP_DEVICES_LITE: &str = concat!(
    "SELECT t.mac_address, \
     (SELECT COUNT(DISTINCT s.session_id) FROM ai_agent_chat_history s \
      WHERE s.mac_address = t.mac_address AND s.created_at >= ? AND s.created_at < ?) \
     AS sessions, t.messages, t.audio_bytes \
     FROM (SELECT h.mac_address, COUNT(*) AS messages, ",
    audio_bytes_lite!(),
    messages_with_audio!(),
    "h.created_at >= ? AND h.created_at < ? \
           GROUP BY h.mac_address HAVING h.mac_address IS NOT NULL \
           ORDER BY messages DESC, h.mac_address LIMIT ?) t \
     ORDER BY t.messages DESC, t.mac_address"
);

const SEARCH_MY: &str = "SELECT id, mac_address, agent_id, session_id, \
     CAST(chat_type AS SIGNED) AS chat_type, content, audio_id, \
     LEFT(DATE_FORMAT(created_at, '%Y-%m-%d %H:%i:%s.%f'), 23) AS created_at \
     FROM ai_agent_chat_history WHERE id > ? AND content LIKE ? ESCAPE '!' \
     ORDER BY id LIMIT ?";
const SEARCH_MAC_MY: &str = "SELECT id, mac_address, agent_id, session_id, \
     CAST(chat_type AS SIGNED) AS chat_type, content, audio_id, \
     LEFT(DATE_FORMAT(created_at, '%Y-%m-%d %H:%i:%s.%f'), 23) AS created_at \
     FROM ai_agent_chat_history WHERE mac_address = ? AND id > ? \
     AND content LIKE ? ESCAPE '!' ORDER BY id LIMIT ?";
const SEARCH_LITE: &str = "SELECT id, mac_address, agent_id, session_id, chat_type, \
     content, audio_id, created_at \
     FROM ai_agent_chat_history WHERE id > ? AND content LIKE ? ESCAPE '!' \
     ORDER BY id LIMIT ?";
const SEARCH_MAC_LITE: &str = "SELECT id, mac_address, agent_id, session_id, chat_type, \
     content, audio_id, created_at \
     FROM ai_agent_chat_history WHERE mac_address = ? AND id > ? \
     AND content LIKE ? ESCAPE '!' ORDER BY id LIMIT ?";

const MAX_ID: &str = "SELECT COALESCE(MAX(id), 0) AS max_id FROM ai_agent_chat_history";

const EXPORT_MY: &str = "SELECT id, mac_address, agent_id, session_id, \
     CAST(chat_type AS SIGNED) AS chat_type, content, audio_id, \
     LEFT(DATE_FORMAT(created_at, '%Y-%m-%d %H:%i:%s.%f'), 23) AS created_at \
     FROM ai_agent_chat_history WHERE id > ? AND id <= ? \
     AND created_at >= ? AND created_at < ? ORDER BY id LIMIT ?";
const EXPORT_MAC_MY: &str = "SELECT id, mac_address, agent_id, session_id, \
     CAST(chat_type AS SIGNED) AS chat_type, content, audio_id, \
     LEFT(DATE_FORMAT(created_at, '%Y-%m-%d %H:%i:%s.%f'), 23) AS created_at \
     FROM ai_agent_chat_history WHERE mac_address = ? AND id > ? AND id <= ? \
     AND created_at >= ? AND created_at < ? ORDER BY id LIMIT ?";
const EXPORT_LITE: &str = "SELECT id, mac_address, agent_id, session_id, chat_type, \
     content, audio_id, created_at \
     FROM ai_agent_chat_history WHERE id > ? AND id <= ? \
     AND created_at >= ? AND created_at < ? ORDER BY id LIMIT ?";
const EXPORT_MAC_LITE: &str = "SELECT id, mac_address, agent_id, session_id, chat_type, \
     content, audio_id, created_at \
     FROM ai_agent_chat_history WHERE mac_address = ? AND id > ? AND id <= ? \
     AND created_at >= ? AND created_at < ? ORDER BY id LIMIT ?";

const TOTALS_MY: &str = "SELECT COUNT(DISTINCT session_id) AS sessions, COUNT(*) AS messages, \
     LEFT(DATE_FORMAT(MAX(created_at), '%Y-%m-%d %H:%i:%s.%f'), 23) AS last_at \
     FROM ai_agent_chat_history WHERE mac_address = ?";
const TOTALS_LITE: &str = "SELECT COUNT(DISTINCT session_id) AS sessions, COUNT(*) AS messages, \
     MAX(created_at) AS last_at FROM ai_agent_chat_history WHERE mac_address = ?";

// --- row mapping -------------------------------------------------------------------

fn device(r: &AnyRow<'_>) -> Result<DeviceSummary, sqlx::Error> {
    Ok(DeviceSummary {
        mac_address: r.string("mac_address")?,
        agent_id: r.opt_string("agent_id")?,
        sessions: r.i64("sessions")?,
        messages: r.i64("messages")?,
        last_at: r.opt_string("last_at")?,
    })
}

fn session(r: &AnyRow<'_>) -> Result<SessionSummary, sqlx::Error> {
    Ok(SessionSummary {
        session_id: r.string("session_id")?,
        agent_id: r.opt_string("agent_id")?,
        started_at: r.string("started_at")?,
        ended_at: r.string("ended_at")?,
        started_key: r.string("started_key")?,
        messages: r.i64("messages")?,
        user: r.i64("user_messages")?,
        assistant: r.i64("assistant_messages")?,
        tool: r.i64("tool_messages")?,
        has_audio: r.i64("audio_messages")?,
    })
}

fn message(r: &AnyRow<'_>) -> Result<Message, sqlx::Error> {
    Ok(Message {
        id: r.i64("id")?,
        mac_address: r.opt_string("mac_address")?,
        agent_id: r.opt_string("agent_id")?,
        session_id: r.opt_string("session_id")?,
        chat_type: r.opt_i64("chat_type")?,
        content: r.opt_string("content")?,
        audio_id: r.opt_string("audio_id")?,
        created_at: r.string("created_at")?,
    })
}

fn day(r: &AnyRow<'_>) -> Result<DayStats, sqlx::Error> {
    day_counts(r, r.string("day")?)
}

/// A day's counts, from a row without the day in it.
fn day_counts(r: &AnyRow<'_>, day: String) -> Result<DayStats, sqlx::Error> {
    Ok(DayStats {
        day,
        sessions: r.i64("sessions")?,
        messages: r.i64("messages")?,
        user: r.i64("user_messages")?,
        assistant: r.i64("assistant_messages")?,
        tool: r.i64("tool_messages")?,
        audio_messages: r.i64("audio_messages")?,
        audio_seconds: r.i64("audio_bytes")? as f64 / WAV_BYTES_PER_SECOND,
    })
}

fn activity(r: &AnyRow<'_>) -> Result<DeviceActivity, sqlx::Error> {
    Ok(DeviceActivity {
        mac_address: r.string("mac_address")?,
        sessions: r.i64("sessions")?,
        messages: r.i64("messages")?,
        audio_seconds: r.i64("audio_bytes")? as f64 / WAV_BYTES_PER_SECOND,
    })
}

fn totals(r: &AnyRow<'_>) -> Result<DeviceTotals, sqlx::Error> {
    Ok(DeviceTotals {
        sessions: r.i64("sessions")?,
        messages: r.i64("messages")?,
        last_at: r.opt_string("last_at")?,
    })
}

// --- queries -----------------------------------------------------------------------

/// Devices with history, most recently active first.
pub async fn devices(
    store: &Store,
    limit: i64,
    offset: i64,
) -> Result<Vec<DeviceSummary>, StoreError> {
    Ok(fetch_all!(
        store,
        DEVICES_MY,
        DEVICES_LITE,
        [limit, offset],
        device
    ))
}

/// A device's sessions, newest first, starting after `before` (exclusive).
pub async fn sessions(
    store: &Store,
    mac_address: &str,
    before: Option<&SessionCursor>,
    limit: i64,
) -> Result<Vec<SessionSummary>, StoreError> {
    Ok(match before {
        None => fetch_all!(
            store,
            SESSIONS_MY,
            SESSIONS_LITE,
            [mac_address, limit],
            session
        ),
        Some(c) => fetch_all!(
            store,
            SESSIONS_BEFORE_MY,
            SESSIONS_BEFORE_LITE,
            [
                mac_address,
                c.started_at.as_str(),
                c.started_at.as_str(),
                c.session_id.as_str(),
                limit
            ],
            session
        ),
    })
}

/// A session's messages in order, after message `after_id`.
pub async fn messages(
    store: &Store,
    session_id: &str,
    after_id: i64,
    limit: i64,
) -> Result<Vec<Message>, StoreError> {
    Ok(fetch_all!(
        store,
        MESSAGES_MY,
        MESSAGES_LITE,
        [session_id, after_id, limit],
        message
    ))
}

/// The WAV of an audio id, if there is one.
pub async fn audio(store: &Store, audio_id: &str) -> Result<Option<Vec<u8>>, StoreError> {
    let rows: Vec<Option<Vec<u8>>> =
        fetch_all!(store, AUDIO, AUDIO, [audio_id], |r: &AnyRow<'_>| r
            .opt_bytes("audio"));
    Ok(rows.into_iter().next().flatten())
}

/// Activity per day with any, of one device or (`None`) of every device, between
/// `from` (inclusive) and `until` (exclusive), oldest first.
pub async fn daily_stats(
    store: &Store,
    mac_address: Option<&str>,
    from: &str,
    until: &str,
) -> Result<Vec<DayStats>, StoreError> {
    match mac_address {
        Some(mac) => Ok(fetch_all!(
            store,
            STATS_MY,
            STATS_LITE,
            [mac, from, until],
            day
        )),
        None => fleet_daily_stats(store, from, until).await,
    }
}

/// The fleet's days with activity between `from` (inclusive) and `until` (exclusive), one
/// statement per day (`FLEET_DAY_MY`), all in one read transaction so that they count
/// the same snapshot, as one statement would.
async fn fleet_daily_stats(
    store: &Store,
    from: &str,
    until: &str,
) -> Result<Vec<DayStats>, StoreError> {
    macro_rules! by_day {
        ($pool:expr, $span:expr, $day:expr, $unhinted:expr, $wrap:path) => {{
            let mut tx = $pool.begin().await?;
            let span = sqlx::query($span)
                .bind(from)
                .bind(until)
                .bind(from)
                .bind(until)
                .fetch_one(&mut *tx)
                .await?;
            let span = $wrap(&span);
            let (first, last) = (span.opt_string("first_day")?, span.opt_string("last_day")?);
            let Some(days) = fleet_days(first.as_deref(), last.as_deref(), from, until) else {
                // Times that do not start with a date (only possible in SQLite's text).
                tx.rollback().await?;
                return Ok(fetch_all!(
                    store,
                    FLEET_STATS_MY,
                    FLEET_STATS_LITE,
                    [from, until],
                    day
                ));
            };
            let mut out = Vec::with_capacity(days.len());
            let mut statement = $day;
            for d in days {
                let (start, end) = (d.start.as_str(), d.end.as_str());
                let first = sqlx::query(statement)
                    .bind(start)
                    .bind(end)
                    .fetch_one(&mut *tx)
                    .await;
                let row = match first {
                    Err(e) if missing_index(&e) => {
                        statement = $unhinted;
                        sqlx::query(statement)
                            .bind(start)
                            .bind(end)
                            .fetch_one(&mut *tx)
                            .await?
                    }
                    row => row?,
                };
                let stats = day_counts(&$wrap(&row), d.day)?;
                if stats.messages > 0 {
                    out.push(stats);
                }
            }
            tx.commit().await?;
            out
        }};
    }
    Ok(match store {
        Store::MySql(pool) => by_day!(
            pool,
            FLEET_DAY_SPAN_MY,
            FLEET_DAY_MY,
            FLEET_DAY_UNHINTED_MY,
            AnyRow::MySql
        ),
        Store::Sqlite(pool) => by_day!(
            pool,
            FLEET_DAY_SPAN_LITE,
            FLEET_DAY_LITE,
            FLEET_DAY_LITE,
            AnyRow::Sqlite
        ),
    })
}

/// One day of a range: its `YYYY-MM-DD` and the part of the range in it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct DayRange {
    day: String,
    start: String,
    end: String,
}

/// The days from `first` to `last` (`YYYY-MM-DD`, the first and last day with messages
/// in the range `from`..`until`), each with its part of that range: empty when there is
/// no first day; `None` when a day does not parse.
fn fleet_days(
    first: Option<&str>,
    last: Option<&str>,
    from: &str,
    until: &str,
) -> Option<Vec<DayRange>> {
    let (Some(first), Some(last)) = (first, last) else {
        return Some(Vec::new());
    };
    let (mut day, last) = (parse_day(first)?, parse_day(last)?);
    let mut out = Vec::new();
    while day <= last {
        let next = day.next_day();
        let start = format!("{} 00:00:00.000", format_day(day));
        let end = next.map_or_else(
            || TIME_MAX.to_owned(),
            |n| format!("{} 00:00:00.000", format_day(n)),
        );
        // Times compare as text in this format, on both backends.
        out.push(DayRange {
            day: format_day(day),
            start: start.max(from.to_owned()),
            end: end.min(until.to_owned()),
        });
        match next {
            Some(n) => day = n,
            None => break,
        }
    }
    Some(out)
}

/// `YYYY-MM-DD`.
fn parse_day(s: &str) -> Option<time::Date> {
    let b = s.as_bytes();
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let number = |r: std::ops::Range<usize>| -> Option<u16> {
        let part = &s[r];
        part.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| part.parse().ok())
            .flatten()
    };
    let month = time::Month::try_from(u8::try_from(number(5..7)?).ok()?).ok()?;
    time::Date::from_calendar_date(
        i32::from(number(0..4)?),
        month,
        u8::try_from(number(8..10)?).ok()?,
    )
    .ok()
}

fn format_day(d: time::Date) -> String {
    format!("{:04}-{:02}-{:02}", d.year(), u8::from(d.month()), d.day())
}

/// The `limit` devices with the most messages between `from` (inclusive) and `until`
/// (exclusive): most messages first, then by MAC.
pub async fn top_devices(
    store: &Store,
    from: &str,
    until: &str,
    limit: i64,
) -> Result<Vec<DeviceActivity>, StoreError> {
    let top = async |mysql: &'static str| -> Result<Vec<DeviceActivity>, StoreError> {
        Ok(fetch_all!(
            store,
            mysql,
            TOP_DEVICES_LITE,
            [from, until, from, until, limit],
            activity
        ))
    };
    match top(TOP_DEVICES_MY).await {
        Err(StoreError::Sql(e)) if missing_index(&e) => top(TOP_DEVICES_UNHINTED_MY).await,
        result => result,
    }
}

/// Whether MySQL/MariaDB refused a statement for naming an index that is not there
/// (ER_KEY_DOES_NOT_EXIST): idx_xz_created_mac_session before migration 0003 has run.
fn missing_index(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .and_then(|d| d.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>())
        .is_some_and(|d| d.number() == 1176)
}

/// Messages whose content contains `term` (taken literally), in id order after
/// `after_id`, optionally of one device.
pub async fn search(
    store: &Store,
    term: &str,
    mac_address: Option<&str>,
    after_id: i64,
    limit: i64,
) -> Result<Vec<Message>, StoreError> {
    let pattern = contains_pattern(term);
    Ok(match mac_address {
        None => fetch_all!(
            store,
            SEARCH_MY,
            SEARCH_LITE,
            [after_id, pattern.as_str(), limit],
            message
        ),
        Some(mac) => fetch_all!(
            store,
            SEARCH_MAC_MY,
            SEARCH_MAC_LITE,
            [mac, after_id, pattern.as_str(), limit],
            message
        ),
    })
}

/// The highest message id now (0 when there are none): an export covers what existed
/// when it began.
pub async fn max_id(store: &Store) -> Result<i64, StoreError> {
    let rows: Vec<i64> = fetch_all!(store, MAX_ID, MAX_ID, [], |r: &AnyRow<'_>| r.i64("max_id"));
    Ok(rows.into_iter().next().unwrap_or(0))
}

/// One page of an export: the rows after `after_id` up to `max_id`, in id order.
pub async fn export_page(
    store: &Store,
    filter: &ExportFilter,
    after_id: i64,
    max_id: i64,
    limit: i64,
) -> Result<Vec<Message>, StoreError> {
    let (from, until) = (filter.from.as_str(), filter.until.as_str());
    Ok(match filter.mac_address.as_deref() {
        None => fetch_all!(
            store,
            EXPORT_MY,
            EXPORT_LITE,
            [after_id, max_id, from, until, limit],
            message
        ),
        Some(mac) => fetch_all!(
            store,
            EXPORT_MAC_MY,
            EXPORT_MAC_LITE,
            [mac, after_id, max_id, from, until, limit],
            message
        ),
    })
}

/// What a device has in total.
pub async fn device_totals(store: &Store, mac_address: &str) -> Result<DeviceTotals, StoreError> {
    let rows: Vec<DeviceTotals> = fetch_all!(store, TOTALS_MY, TOTALS_LITE, [mac_address], totals);
    Ok(rows.into_iter().next().unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_of_the_longest_session_ids_read_back() {
        // 64 four-byte characters: the longest session id the API allows.
        let cursor = SessionCursor {
            started_at: "2026-11-26 04:30:00.123456".into(),
            session_id: "😀".repeat(64),
        };
        let token = cursor.encode();
        assert!(token.len() <= MAX_CURSOR_LEN, "{}", token.len());
        assert_eq!(SessionCursor::decode(&token), Some(cursor));
    }

    #[test]
    fn like_patterns_take_metacharacters_literally() {
        assert_eq!(contains_pattern("abc"), "%abc%");
        assert_eq!(contains_pattern("50%_off!"), "%50!%!_off!!%");
        assert_eq!(contains_pattern(r"a\b"), r"%a\b%");
        assert_eq!(contains_pattern("' OR 1=1 --"), "%' OR 1=1 --%");
    }

    #[test]
    fn fleet_stats_are_the_device_statement_without_the_device() {
        let device = "h.mac_address = ? AND ";
        assert_eq!(STATS_MY.replacen(device, "", 1), FLEET_STATS_MY);
        assert_eq!(STATS_LITE.replacen(device, "", 1), FLEET_STATS_LITE);
        // One day of the fleet: the same columns, without the grouping.
        let day_my = FLEET_STATS_MY
            .replacen("DATE_FORMAT(h.created_at, '%Y-%m-%d') AS day, ", "", 1)
            .replacen(
                " GROUP BY DATE_FORMAT(h.created_at, '%Y-%m-%d') ORDER BY day",
                "",
                1,
            );
        assert_eq!(day_my, FLEET_DAY_UNHINTED_MY);
        // The hinted twins differ by the hint alone.
        let hint = "ai_agent_chat_history h FORCE INDEX (idx_xz_created_mac_session) LEFT JOIN";
        for (hinted, plain) in [
            (FLEET_DAY_MY, FLEET_DAY_UNHINTED_MY),
            (TOP_DEVICES_MY, TOP_DEVICES_UNHINTED_MY),
        ] {
            assert_eq!(hinted.matches("FORCE INDEX").count(), 1, "{hinted}");
            assert_eq!(
                hinted.replacen(hint, "ai_agent_chat_history h LEFT JOIN", 1),
                plain
            );
        }
        let day_lite = FLEET_STATS_LITE
            .replacen("substr(h.created_at, 1, 10) AS day, ", "", 1)
            .replacen(" GROUP BY substr(h.created_at, 1, 10) ORDER BY day", "", 1);
        assert_eq!(day_lite, FLEET_DAY_LITE);
        for sql in [
            FLEET_STATS_MY,
            FLEET_STATS_LITE,
            FLEET_DAY_MY,
            FLEET_DAY_UNHINTED_MY,
            FLEET_DAY_LITE,
            TOP_DEVICES_MY,
            TOP_DEVICES_UNHINTED_MY,
            TOP_DEVICES_LITE,
        ] {
            assert!(!sql.contains("mac_address = ?"), "{sql}");
            assert!(
                sql.contains("h.created_at >= ? AND h.created_at < ?"),
                "{sql}"
            );
        }
    }

    #[test]
    fn fleet_days_cover_the_range_one_day_each() {
        let range = |d: &DayRange| (d.day.clone(), d.start.clone(), d.end.clone());
        let days = fleet_days(
            Some("2024-02-28"),
            Some("2024-03-01"),
            "2024-02-01 00:00:00.000",
            "2024-03-02 00:00:00.000",
        )
        .unwrap();
        assert_eq!(
            days.iter().map(range).collect::<Vec<_>>(),
            [
                (
                    "2024-02-28".into(),
                    "2024-02-28 00:00:00.000".into(),
                    "2024-02-29 00:00:00.000".into()
                ),
                (
                    "2024-02-29".into(),
                    "2024-02-29 00:00:00.000".into(),
                    "2024-03-01 00:00:00.000".into()
                ),
                (
                    "2024-03-01".into(),
                    "2024-03-01 00:00:00.000".into(),
                    "2024-03-02 00:00:00.000".into()
                ),
            ] as [(String, String, String); 3]
        );
        // Never outside the range asked for; the last day of the calendar ends at TIME_MAX.
        let days = fleet_days(
            Some("2025-01-01"),
            Some("2025-01-01"),
            "2025-01-01 12:00:00.000",
            "2025-01-01 13:00:00.000",
        )
        .unwrap();
        assert_eq!(
            (days[0].start.as_str(), days[0].end.as_str()),
            ("2025-01-01 12:00:00.000", "2025-01-01 13:00:00.000")
        );
        let days = fleet_days(
            Some("9999-12-31"),
            Some("9999-12-31"),
            "9999-12-31 00:00:00.000",
            TIME_MAX,
        )
        .unwrap();
        assert_eq!(days.len(), 1);
        assert_eq!(days[0].end, TIME_MAX);
        // Nothing in the range; days that are not dates.
        assert_eq!(fleet_days(None, None, TIME_MIN, TIME_MAX), Some(Vec::new()));
        for bad in ["2025-1-01 ", "2025-02-30", "x", "2025/01/01"] {
            assert_eq!(
                fleet_days(Some(bad), Some("2025-03-01"), TIME_MIN, TIME_MAX),
                None,
                "{bad}"
            );
        }
    }

    #[test]
    fn session_cursors_round_trip_and_reject_garbage() {
        let c = SessionCursor {
            started_at: "2025-01-02 03:04:05.678000".into(),
            session_id: "a b/c+d".into(),
        };
        let token = c.encode();
        assert!(
            token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        );
        assert_eq!(SessionCursor::decode(&token), Some(c));
        for bad in ["", "!!!", "abc", &"A".repeat(300)] {
            assert_eq!(SessionCursor::decode(bad), None, "{bad}");
        }
        use base64::Engine;
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        assert_eq!(SessionCursor::decode(&b64("' OR 1=1 --\nx")), None);
        assert_eq!(SessionCursor::decode(&b64("2025-01-01\n")), None);
        assert_eq!(
            SessionCursor::decode(&b64(&format!("2025-01-01\n{}", "x".repeat(65)))),
            None
        );
    }
}
