//! The chat-history API and the `/ws/admin` live feed (README, "Chat history").
//!
//! * `GET /api/history/devices?limit=&offset=`: devices, most recently active first.
//! * `GET /api/history/devices/{mac}/sessions?limit=&before=`: a device's sessions, newest
//!   first; `before` is the `next` cursor of the previous page.
//! * `GET /api/history/sessions/{session_id}/messages?limit=&after_id=`: messages in order.
//! * `GET /api/history/audio/{audio_id}`: the utterance's WAV.
//! * `GET /api/history/devices/{mac}/stats?from=&to=`: activity per day.
//! * `GET /api/history/stats?from=&to=&top=`: the fleet's activity per day and its most
//!   active devices.
//! * `GET /api/history/search?q=&mac=&limit=&after_id=`: messages containing `q`.
//! * `GET /api/history/export?format=csv|jsonl&mac=&from=&to=`: everything, streamed.
//! * `GET /api/v2/chat-history/{device_id}`: a device's live state, totals and latest
//!   sessions in one answer.
//! * `GET /ws/admin`: a WebSocket that receives `{"type":"chat_update",...}` for every
//!   stored record.
//!
//! Everything needs `Authorization: Bearer <history.api_token>` (the WebSocket also
//! takes the token as the subprotocol `bearer.<token>`, for browsers). Without a token
//! configured, or without a history database, none of it is served (404). Bad input is
//! a 400 with `{"error": "..."}`; a database that does not answer is a 503.

use std::collections::HashMap;
use std::time::Duration;

use axum::body::Body;
use axum::extract::ws::{CloseFrame, Message as WsMessage, WebSocket, WebSocketUpgrade};
use axum::extract::{FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use bytes::Bytes;
use serde::Serialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use time::{Date, Month};
use tokio::sync::broadcast;
use tracing::{debug, info, warn};

use super::HttpState;
use crate::history::query::{self, DayStats, ExportFilter, Message, SessionCursor};
use crate::history::store::{Store, StoreError};
use crate::history::writer::{StoredEvent, format_time};
use crate::protocol::mac::Mac;

/// Items per page unless `limit` says otherwise, and the most it may say.
pub const DEFAULT_LIMIT: i64 = 50;
pub const MAX_LIMIT: i64 = 500;
/// Longest session id, search term and audio id accepted (characters).
pub const MAX_SESSION_ID: usize = 64;
pub const MAX_SEARCH_TERM: usize = 200;
pub const MAX_AUDIO_ID: usize = 32;
/// Most days one stats request may cover.
pub const MAX_STATS_DAYS: i64 = 1000;
/// Devices in the fleet statistics' `top_devices` unless `top` says otherwise, and the
/// most it may say.
pub const DEFAULT_TOP: i64 = 10;
pub const MAX_TOP: i64 = 100;
/// Rows fetched per page of an export.
pub const EXPORT_PAGE: i64 = 1000;
/// Sessions shown in the combined device view.
pub const RECENT_SESSIONS: i64 = 5;
/// A live-feed consumer whose socket takes longer than this for one message is dropped.
pub const FEED_SEND_TIMEOUT: Duration = Duration::from_secs(1);
/// The subprotocol `/ws/admin` answers with when the client offers it.
pub const FEED_PROTOCOL: &str = "xiaozhi-admin";
/// Prefix of the subprotocol that carries the token (`bearer.<token>`).
pub const BEARER_PROTOCOL_PREFIX: &str = "bearer.";

/// Whether the history API (and the console's, which shares its token) is served: a
/// token is configured and the history database is on.
pub(super) fn api_enabled(state: &HttpState) -> bool {
    let token_set = state
        .config
        .history
        .api_token
        .as_deref()
        .is_some_and(|t| !t.is_empty());
    token_set && state.history.is_some()
}

/// The history routes, or none when there is no token or no database.
pub fn routes(state: &HttpState) -> Router<HttpState> {
    if !api_enabled(state) {
        return Router::new();
    }
    let api = Router::new()
        .route("/api/history/devices", get(devices))
        .route("/api/history/devices/{mac}/sessions", get(sessions))
        .route("/api/history/devices/{mac}/stats", get(stats))
        .route("/api/history/stats", get(fleet_stats))
        .route("/api/history/sessions/{session_id}/messages", get(messages))
        .route("/api/history/audio/{audio_id}", get(audio))
        .route("/api/history/search", get(search))
        .route("/api/history/export", get(export))
        .route("/api/v2/chat-history/{device_id}", get(device_view))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    let feed = Router::new()
        .route("/ws/admin", get(admin_feed))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_token_or_protocol,
        ));
    api.merge(feed)
}

// --- errors ------------------------------------------------------------------------

/// Every failure, as the JSON error the client gets.
#[derive(Debug)]
pub enum ApiError {
    BadRequest(String),
    Unauthorized(&'static str),
    NotFound(&'static str),
    Unavailable,
}

impl ApiError {
    fn bad(message: impl Into<String>) -> ApiError {
        ApiError::BadRequest(message.into())
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        warn!(error = %e, "history API: database error");
        ApiError::Unavailable
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, message) = match self {
            ApiError::BadRequest(m) => (StatusCode::BAD_REQUEST, m),
            ApiError::Unauthorized(m) => (StatusCode::UNAUTHORIZED, m.to_owned()),
            ApiError::NotFound(m) => (StatusCode::NOT_FOUND, m.to_owned()),
            ApiError::Unavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "chat-history database unavailable".to_owned(),
            ),
        };
        let mut response = (status, Json(json!({ "error": message }))).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

type ApiResult<T> = Result<T, ApiError>;

// --- authentication ----------------------------------------------------------------

/// Whether `presented` is the configured token, compared in constant time (both sides
/// hashed first, so not even the length leaks).
pub(super) fn token_matches(state: &HttpState, presented: &str) -> bool {
    let Some(expected) = state.config.history.api_token.as_deref() else {
        return false;
    };
    if expected.is_empty() {
        return false;
    }
    let a = Sha256::digest(expected.as_bytes());
    let b = Sha256::digest(presented.as_bytes());
    a.ct_eq(&b).into()
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// The `bearer.<token>` subprotocols a WebSocket request offers.
fn protocol_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|p| p.trim().strip_prefix(BEARER_PROTOCOL_PREFIX))
}

fn check_token(state: &HttpState, headers: &HeaderMap, allow_protocol: bool) -> ApiResult<()> {
    let from_header = bearer(headers);
    let mut offered = from_header.is_some();
    if let Some(token) = from_header
        && token_matches(state, token)
    {
        return Ok(());
    }
    if allow_protocol {
        for token in protocol_tokens(headers) {
            offered = true;
            if token_matches(state, token) {
                return Ok(());
            }
        }
    }
    if offered {
        Err(ApiError::Unauthorized("invalid bearer token"))
    } else {
        Err(ApiError::Unauthorized(
            "missing bearer token (Authorization: Bearer <history.api_token>)",
        ))
    }
}

pub(super) async fn require_token(
    State(state): State<HttpState>,
    request: Request,
    next: Next,
) -> Response {
    match check_token(&state, request.headers(), false) {
        Ok(()) => next.run(request).await,
        Err(e) => {
            debug!(path = %request.uri().path(), "history API: refused");
            e.into_response()
        }
    }
}

async fn require_token_or_protocol(
    State(state): State<HttpState>,
    request: Request,
    next: Next,
) -> Response {
    match check_token(&state, request.headers(), true) {
        Ok(()) => next.run(request).await,
        Err(e) => e.into_response(),
    }
}

// --- input -------------------------------------------------------------------------

/// The query string as a map; a malformed one is a 400.
pub(super) struct Params(pub(super) HashMap<String, String>);

impl<S: Send + Sync> FromRequestParts<S> for Params {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Params::from_uri(&parts.uri)
    }
}

impl Params {
    /// The query string of `uri`, as axum's `Query` extractor reads it.
    fn from_uri(uri: &Uri) -> ApiResult<Params> {
        Query::<HashMap<String, String>>::try_from_uri(uri)
            .map(|Query(q)| Params(q))
            .map_err(|_| ApiError::bad("the query string is not valid"))
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    /// An integer parameter within `min..=max`, or `default` when absent.
    fn int(&self, name: &str, default: i64, min: i64, max: i64) -> ApiResult<i64> {
        match self.get(name) {
            None | Some("") => Ok(default),
            Some(v) => match v.parse::<i64>() {
                Ok(n) if (min..=max).contains(&n) => Ok(n),
                _ => Err(ApiError::bad(format!(
                    "{name} must be an integer from {min} to {max}"
                ))),
            },
        }
    }

    fn limit(&self) -> ApiResult<i64> {
        self.int("limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
    }

    fn after_id(&self) -> ApiResult<i64> {
        self.int("after_id", 0, 0, i64::MAX)
    }

    fn date(&self, name: &str) -> ApiResult<Option<Date>> {
        match self.get(name) {
            None | Some("") => Ok(None),
            Some(v) => parse_date(v)
                .map(Some)
                .ok_or_else(|| ApiError::bad(format!("{name} must be a date, YYYY-MM-DD"))),
        }
    }

    fn mac(&self) -> ApiResult<Option<String>> {
        match self.get("mac") {
            None | Some("") => Ok(None),
            Some(v) => parse_mac(v).map(Some),
        }
    }
}

/// A single path parameter; one that does not decode is a 400.
struct PathParam(String);

impl<S: Send + Sync> FromRequestParts<S> for PathParam {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Path::<String>::from_request_parts(parts, state)
            .await
            .map(|Path(p)| PathParam(p))
            .map_err(|_| ApiError::bad("the path is not valid"))
    }
}

/// `YYYY-MM-DD`, exactly.
pub fn parse_date(s: &str) -> Option<Date> {
    let b = s.as_bytes();
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let digits = |r: std::ops::Range<usize>| -> Option<u32> {
        let part = &s[r];
        part.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| part.parse().ok())
            .flatten()
    };
    let (year, month, day) = (digits(0..4)?, digits(5..7)?, digits(8..10)?);
    if year < 1000 {
        return None;
    }
    let month = Month::try_from(u8::try_from(month).ok()?).ok()?;
    Date::from_calendar_date(year as i32, month, u8::try_from(day).ok()?).ok()
}

fn format_date(d: Date) -> String {
    format!("{:04}-{:02}-{:02}", d.year(), u8::from(d.month()), d.day())
}

/// The first instant of `d`, as the database compares it.
fn day_start(d: Date) -> String {
    format!("{} 00:00:00.000", format_date(d))
}

/// The exclusive upper bound that covers all of `d`.
fn day_end(d: Date) -> String {
    d.next_day()
        .map(day_start)
        .unwrap_or_else(|| query::TIME_MAX.to_owned())
}

/// A MAC in either spelling, as stored (colon form).
fn parse_mac(s: &str) -> ApiResult<String> {
    s.parse::<Mac>()
        .map(|m| m.colon())
        .map_err(|_| ApiError::bad("not a MAC address (aa:bb:cc:dd:ee:ff or aa_bb_cc_dd_ee_ff)"))
}

fn check_session_id(s: &str) -> ApiResult<()> {
    let n = s.chars().count();
    if n == 0 || n > MAX_SESSION_ID || s.chars().any(char::is_control) {
        return Err(ApiError::bad(format!(
            "session id must be 1 to {MAX_SESSION_ID} printable characters"
        )));
    }
    Ok(())
}

fn check_audio_id(s: &str) -> ApiResult<()> {
    if s.is_empty() || s.len() > MAX_AUDIO_ID || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ApiError::bad(format!(
            "audio id must be 1 to {MAX_AUDIO_ID} hex digits"
        )));
    }
    Ok(())
}

/// The `before` cursor of a sessions page, if any.
fn before_cursor(params: &Params) -> ApiResult<Option<SessionCursor>> {
    match params.get("before") {
        None | Some("") => Ok(None),
        Some(token) => SessionCursor::decode(token)
            .map(Some)
            .ok_or_else(|| ApiError::bad("before is not a cursor this API returned (use `next`)")),
    }
}

/// The search term `q`: 1 to [`MAX_SEARCH_TERM`] characters.
fn search_term(params: &Params) -> ApiResult<&str> {
    let q = params.get("q").unwrap_or_default();
    let n = q.chars().count();
    if n == 0 || n > MAX_SEARCH_TERM {
        return Err(ApiError::bad(format!(
            "q must be 1 to {MAX_SEARCH_TERM} characters"
        )));
    }
    Ok(q)
}

fn store(state: &HttpState) -> ApiResult<&Store> {
    // The routes exist only with a store; this is belt and braces.
    state
        .history
        .as_ref()
        .ok_or(ApiError::NotFound("chat history is off"))
}

/// `limit + 1` rows were asked for: trims to `limit` and says whether there were more.
fn trim_page<T>(mut rows: Vec<T>, limit: i64) -> (Vec<T>, bool) {
    let more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    (rows, more)
}

// --- handlers ----------------------------------------------------------------------

/// `GET /api/history/devices?limit=&offset=`.
async fn devices(State(state): State<HttpState>, params: Params) -> ApiResult<Response> {
    let limit = params.limit()?;
    let offset = params.int("offset", 0, 0, 1_000_000_000)?;
    let rows = query::devices(store(&state)?, limit, offset).await?;
    Ok(Json(json!({ "devices": rows, "limit": limit, "offset": offset })).into_response())
}

/// `GET /api/history/devices/{mac}/sessions?limit=&before=`.
async fn sessions(
    State(state): State<HttpState>,
    PathParam(mac): PathParam,
    params: Params,
) -> ApiResult<Response> {
    let mac = parse_mac(&mac)?;
    let limit = params.limit()?;
    let before = before_cursor(&params)?;
    let rows = query::sessions(store(&state)?, &mac, before.as_ref(), limit + 1).await?;
    let (rows, more) = trim_page(rows, limit);
    let next = more
        .then(|| rows.last().map(|s| SessionCursor::after(s).encode()))
        .flatten();
    Ok(Json(json!({ "mac_address": mac, "sessions": rows, "next": next })).into_response())
}

/// `GET /api/history/sessions/{session_id}/messages?limit=&after_id=`.
async fn messages(
    State(state): State<HttpState>,
    PathParam(session_id): PathParam,
    params: Params,
) -> ApiResult<Response> {
    check_session_id(&session_id)?;
    let limit = params.limit()?;
    let after_id = params.after_id()?;
    let rows = query::messages(store(&state)?, &session_id, after_id, limit + 1).await?;
    let (rows, more) = trim_page(rows, limit);
    let next = more.then(|| rows.last().map(|m| m.id)).flatten();
    Ok(Json(json!({ "session_id": session_id, "messages": rows, "next": next })).into_response())
}

/// `GET /api/history/audio/{audio_id}`.
async fn audio(State(state): State<HttpState>, PathParam(id): PathParam) -> ApiResult<Response> {
    check_audio_id(&id)?;
    let Some(wav) = query::audio(store(&state)?, &id).await? else {
        return Err(ApiError::NotFound("no such audio"));
    };
    Ok((
        [
            (header::CONTENT_TYPE, HeaderValue::from_static("audio/wav")),
            (
                header::CACHE_CONTROL,
                HeaderValue::from_static("private, max-age=86400"),
            ),
        ],
        wav,
    )
        .into_response())
}

/// Today in the zone history is written in.
fn today(state: &HttpState) -> Date {
    let offset = time::UtcOffset::from_whole_seconds(state.config.history.utc_offset_minutes * 60)
        .unwrap_or(time::UtcOffset::UTC);
    time::OffsetDateTime::now_utc().to_offset(offset).date()
}

/// The days a stats request covers: `from` and `to` (both included), by default the
/// last 30 days up to `today`; at most `MAX_STATS_DAYS`.
fn stats_range(params: &Params, today: Date) -> ApiResult<(Date, Date)> {
    let (from, to) = (params.date("from")?, params.date("to")?);
    let to = to.unwrap_or(today);
    let from = from.unwrap_or_else(|| to.saturating_sub(time::Duration::days(29)));
    if from > to {
        return Err(ApiError::bad("from is after to"));
    }
    let span = (to - from).whole_days() + 1;
    if span > MAX_STATS_DAYS {
        return Err(ApiError::bad(format!(
            "at most {MAX_STATS_DAYS} days per request"
        )));
    }
    Ok((from, to))
}

/// `from`, `to`, every day from `from` to `to` (the days without a row in `rows` as
/// zeros), oldest first, and their `totals`.
fn stats_body(from: Date, to: Date, rows: Vec<DayStats>) -> Value {
    let mut by_day: HashMap<String, DayStats> =
        rows.into_iter().map(|d| (d.day.clone(), d)).collect();
    let mut days = Vec::with_capacity(((to - from).whole_days() + 1).max(0) as usize);
    let mut totals = DayStats::empty(String::new());
    let mut day = Some(from);
    while let Some(d) = day.filter(|d| *d <= to) {
        let key = format_date(d);
        let stats = by_day.remove(&key).unwrap_or_else(|| DayStats::empty(key));
        totals.sessions += stats.sessions;
        totals.messages += stats.messages;
        totals.user += stats.user;
        totals.assistant += stats.assistant;
        totals.tool += stats.tool;
        totals.audio_messages += stats.audio_messages;
        totals.audio_seconds += stats.audio_seconds;
        days.push(stats);
        day = d.next_day();
    }
    json!({
        "from": format_date(from),
        "to": format_date(to),
        "days": days,
        "totals": {
            "sessions": totals.sessions,
            "messages": totals.messages,
            "user": totals.user,
            "assistant": totals.assistant,
            "tool": totals.tool,
            "audio_messages": totals.audio_messages,
            "audio_seconds": totals.audio_seconds,
        },
    })
}

/// `GET /api/history/devices/{mac}/stats?from=YYYY-MM-DD&to=YYYY-MM-DD`: every day of
/// the range (zeros included), oldest first, and the totals. Default: the last 30 days
/// in the zone history is written in.
async fn stats(
    State(state): State<HttpState>,
    PathParam(mac): PathParam,
    params: Params,
) -> ApiResult<Response> {
    let mac = parse_mac(&mac)?;
    let (from, to) = stats_range(&params, today(&state))?;
    let rows =
        query::daily_stats(store(&state)?, Some(&mac), &day_start(from), &day_end(to)).await?;
    let mut body = stats_body(from, to, rows);
    body["mac_address"] = Value::from(mac);
    Ok(Json(body).into_response())
}

/// `GET /api/history/stats?from=YYYY-MM-DD&to=YYYY-MM-DD&top=10`: the per-device stats
/// over every device, and `top_devices`: the `top` devices with the most messages in
/// the range (most first, then by MAC).
async fn fleet_stats(State(state): State<HttpState>, params: Params) -> ApiResult<Response> {
    let (from, to) = stats_range(&params, today(&state))?;
    let top = params.int("top", DEFAULT_TOP, 1, MAX_TOP)?;
    let store = store(&state)?;
    let (start, end) = (day_start(from), day_end(to));
    // Two statements, each on its own connection, at the same time.
    let (rows, top_devices) = tokio::try_join!(
        query::daily_stats(store, None, &start, &end),
        query::top_devices(store, &start, &end, top),
    )?;
    let mut body = stats_body(from, to, rows);
    body["top_devices"] = json!(top_devices);
    Ok(Json(body).into_response())
}

/// `GET /api/history/search?q=&mac=&limit=&after_id=`.
async fn search(State(state): State<HttpState>, params: Params) -> ApiResult<Response> {
    let q = search_term(&params)?;
    let mac = params.mac()?;
    let limit = params.limit()?;
    let after_id = params.after_id()?;
    let rows = query::search(store(&state)?, q, mac.as_deref(), after_id, limit + 1).await?;
    let (rows, more) = trim_page(rows, limit);
    let next = more.then(|| rows.last().map(|m| m.id)).flatten();
    Ok(Json(json!({ "q": q, "results": rows, "next": next })).into_response())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum ExportFormat {
    Csv,
    Jsonl,
}

/// The CSV columns, in order.
pub const CSV_HEADER: &str =
    "id,mac_address,agent_id,session_id,chat_type,content,audio_id,created_at\r\n";

/// One CSV field (RFC 4180): quoted when it holds a comma, quote or line break.
fn csv_field(out: &mut String, value: &str) {
    if value.contains([',', '"', '\r', '\n']) {
        out.push('"');
        for c in value.chars() {
            if c == '"' {
                out.push('"');
            }
            out.push(c);
        }
        out.push('"');
    } else {
        out.push_str(value);
    }
}

fn csv_row(out: &mut String, m: &Message) {
    use std::fmt::Write;
    let _ = write!(out, "{}", m.id);
    for field in [m.mac_address.as_deref(), m.agent_id.as_deref()] {
        out.push(',');
        csv_field(out, field.unwrap_or_default());
    }
    out.push(',');
    csv_field(out, m.session_id.as_deref().unwrap_or_default());
    out.push(',');
    if let Some(t) = m.chat_type {
        let _ = write!(out, "{t}");
    }
    out.push(',');
    csv_field(out, m.content.as_deref().unwrap_or_default());
    out.push(',');
    csv_field(out, m.audio_id.as_deref().unwrap_or_default());
    out.push(',');
    csv_field(out, &m.created_at);
    out.push_str("\r\n");
}

fn render_page(format: ExportFormat, rows: &[Message]) -> Bytes {
    let mut out = String::with_capacity(rows.len() * 128);
    for m in rows {
        match format {
            ExportFormat::Csv => csv_row(&mut out, m),
            ExportFormat::Jsonl => {
                if let Ok(line) = serde_json::to_string(m) {
                    out.push_str(&line);
                    out.push('\n');
                }
            }
        }
    }
    Bytes::from(out)
}

/// An export's format, MAC (colon form) and days, checked.
type ExportParams = (ExportFormat, Option<String>, Option<Date>, Option<Date>);

fn export_params(params: &Params) -> ApiResult<ExportParams> {
    let format = match params.get("format").unwrap_or("csv") {
        "csv" | "" => ExportFormat::Csv,
        "jsonl" | "ndjson" => ExportFormat::Jsonl,
        _ => return Err(ApiError::bad("format must be csv or jsonl")),
    };
    let mac = params.mac()?;
    let (from, to) = (params.date("from")?, params.date("to")?);
    if let (Some(f), Some(t)) = (from, to)
        && f > t
    {
        return Err(ApiError::bad("from is after to"));
    }
    Ok((format, mac, from, to))
}

/// An export's content type and `Content-Disposition` (the file name says what it holds).
fn export_headers(
    format: ExportFormat,
    mac: Option<&str>,
    from: Option<Date>,
    to: Option<Date>,
) -> (&'static str, String) {
    let mut name = String::from("chat-history");
    if let Some(mac) = mac {
        name.push('-');
        name.push_str(&mac.replace(':', ""));
    }
    if let Some(f) = from {
        name.push_str(&format!("-from-{}", format_date(f)));
    }
    if let Some(t) = to {
        name.push_str(&format!("-to-{}", format_date(t)));
    }
    let (content_type, ext) = match format {
        ExportFormat::Csv => ("text/csv; charset=utf-8", "csv"),
        ExportFormat::Jsonl => ("application/x-ndjson", "jsonl"),
    };
    (
        content_type,
        format!("attachment; filename=\"{name}.{ext}\""),
    )
}

/// Where a streaming export has got to.
struct ExportState {
    store: Store,
    filter: ExportFilter,
    format: ExportFormat,
    max_id: i64,
    after_id: i64,
    header: bool,
    done: bool,
    rows: u64,
}

/// `GET /api/history/export?format=csv|jsonl&mac=&from=&to=`: every message that existed
/// when the request came, in id order, fetched and sent `EXPORT_PAGE` rows at a time.
pub(super) async fn export(State(state): State<HttpState>, params: Params) -> ApiResult<Response> {
    let (format, mac, from, to) = export_params(&params)?;
    let store = store(&state)?.clone();
    let max_id = query::max_id(&store).await?;
    let filter = ExportFilter {
        mac_address: mac.clone(),
        from: from.map_or_else(|| query::TIME_MIN.to_owned(), day_start),
        until: to.map_or_else(|| query::TIME_MAX.to_owned(), day_end),
    };
    let (content_type, disposition) = export_headers(format, mac.as_deref(), from, to);
    let start = ExportState {
        store,
        filter,
        format,
        max_id,
        after_id: 0,
        header: format == ExportFormat::Csv,
        done: false,
        rows: 0,
    };
    let started = std::time::Instant::now();
    let stream = futures_util::stream::unfold(start, move |mut s| async move {
        if s.done {
            return None;
        }
        if s.header {
            s.header = false;
            return Some((Ok(Bytes::from_static(CSV_HEADER.as_bytes())), s));
        }
        match query::export_page(&s.store, &s.filter, s.after_id, s.max_id, EXPORT_PAGE).await {
            Ok(rows) => {
                if (rows.len() as i64) < EXPORT_PAGE {
                    s.done = true;
                    info!(
                        rows = s.rows + rows.len() as u64,
                        ms = started.elapsed().as_millis() as u64,
                        "history export finished"
                    );
                }
                let last = rows.last()?;
                s.after_id = last.id;
                s.rows += rows.len() as u64;
                let chunk = render_page(s.format, &rows);
                Some((Ok(chunk), s))
            }
            Err(e) => {
                // The client sees a truncated body (the connection is cut), never a
                // body that looks complete.
                warn!(error = %e, rows = s.rows, "history export failed mid-stream");
                s.done = true;
                Some((Err::<Bytes, StoreError>(e), s))
            }
        }
    });
    Ok((
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (
                header::CONTENT_DISPOSITION,
                HeaderValue::from_str(&disposition)
                    .unwrap_or_else(|_| HeaderValue::from_static("attachment")),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}

/// `GET /api/v2/chat-history/{device_id}`: the device's live state on this node, its
/// totals and its latest sessions. `device_id` is the MAC (either spelling) or a client
/// id that contains it.
async fn device_view(
    State(state): State<HttpState>,
    PathParam(device_id): PathParam,
) -> ApiResult<Response> {
    let Some(mac) = super::management::mac_of_client_id(&device_id) else {
        return Err(ApiError::bad(
            "not a device id (a MAC: aa:bb:cc:dd:ee:ff or aa_bb_cc_dd_ee_ff)",
        ));
    };
    let mac_address = mac.colon();
    let live = match state.directory.get(&mac) {
        Some(entry) => {
            let connected_ms = entry
                .connected_at
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as i64)
                .unwrap_or(0);
            json!({
                "connected": true,
                "in_conversation": entry.conversation.is_some(),
                "session_id": entry.conversation.as_ref().map(|(_, id)| id),
                "connected_at": format_time(connected_ms, state.config.history.utc_offset_minutes),
                "connected_at_ms": connected_ms,
                "remote": entry.remote.to_string(),
                "client_id": entry.identity.client_id,
            })
        }
        None => json!({
            "connected": false,
            "in_conversation": false,
            "session_id": null,
            "connected_at": null,
            "connected_at_ms": null,
            "remote": null,
            "client_id": null,
        }),
    };
    let store = store(&state)?;
    let totals = query::device_totals(store, &mac_address).await?;
    let recent = query::sessions(store, &mac_address, None, RECENT_SESSIONS).await?;
    Ok(Json(json!({
        "device_id": mac_address,
        "mac_address": mac_address,
        "live": live,
        "stats": {
            "sessions": totals.sessions,
            "messages": totals.messages,
            "last_activity": totals.last_at,
        },
        "recent_sessions": recent,
    }))
    .into_response())
}

// --- live feed ---------------------------------------------------------------------

#[derive(Serialize)]
struct ChatUpdate<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(flatten)]
    event: &'a StoredEvent,
}

/// `GET /ws/admin`: the live feed of stored records.
async fn admin_feed(State(state): State<HttpState>, mut ws: WebSocketUpgrade) -> Response {
    // Subscribe now, so nothing stored after the 101 is missed.
    let events = state.history_events.subscribe();
    // A browser that offered subprotocols needs one of them back: ours if offered,
    // otherwise the (already checked) bearer one it authenticated with.
    let offered: Vec<HeaderValue> = ws.requested_protocols().cloned().collect();
    if let Some(p) = offered
        .iter()
        .find(|p| p.as_bytes() == FEED_PROTOCOL.as_bytes())
    {
        ws.set_selected_protocol(p.clone());
    } else if let Some(p) = offered.iter().find(|p| {
        p.to_str()
            .ok()
            .and_then(|p| p.strip_prefix(BEARER_PROTOCOL_PREFIX))
            .is_some_and(|t| token_matches(&state, t))
    }) {
        ws.set_selected_protocol(p.clone());
    }
    let presence = state.directory.subscribe_presence();
    let failures = state.events.subscribe_upstream_failures();
    let max = state.config.http.ws_max_message_bytes;
    let metrics = state.metrics.clone();
    ws.max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| feed(socket, events, presence, failures, metrics))
}

/// Close codes of the feed.
const CLOSE_GOING_AWAY: u16 = 1001;
const CLOSE_TRY_AGAIN_LATER: u16 = 1013;

async fn close(socket: &mut WebSocket, code: u16, reason: String) {
    let frame = CloseFrame {
        code,
        reason: reason.into(),
    };
    let _ = tokio::time::timeout(
        FEED_SEND_TIMEOUT,
        socket.send(WsMessage::Close(Some(frame))),
    )
    .await;
}

/// `value` as a JSON object with `"type": kind` added.
fn tagged(value: &impl Serialize, kind: &str) -> String {
    let mut value = serde_json::to_value(value).unwrap_or_default();
    value["type"] = serde_json::Value::from(kind);
    value.to_string()
}

/// Sends one feed message; false when the feed must end (the consumer left, or stalled
/// for `FEED_SEND_TIMEOUT` and was told so).
async fn send_text(socket: &mut WebSocket, text: String) -> bool {
    match tokio::time::timeout(FEED_SEND_TIMEOUT, socket.send(WsMessage::Text(text.into()))).await {
        Ok(Ok(())) => true,
        Ok(Err(_)) => false,
        Err(_) => {
            info!("admin feed: consumer too slow (send took over 1 s); disconnected");
            close(
                socket,
                CLOSE_TRY_AGAIN_LATER,
                "too slow: a send took over 1 s".into(),
            )
            .await;
            false
        }
    }
}

/// Sends every stored record until the consumer leaves, falls behind (the broadcast
/// queue overtook it) or stalls (one send took longer than `FEED_SEND_TIMEOUT`). The
/// recorder never waits for a consumer: the broadcast queue drops for the slow one.
async fn feed(
    mut socket: WebSocket,
    mut events: broadcast::Receiver<StoredEvent>,
    mut presence: broadcast::Receiver<crate::session::directory::PresenceEvent>,
    mut failures: broadcast::Receiver<crate::events::UpstreamFailure>,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
) {
    debug!("admin feed: consumer connected");
    let mut ping = tokio::time::interval_at(
        tokio::time::Instant::now() + Duration::from_secs(30),
        Duration::from_secs(30),
    );
    loop {
        tokio::select! {
            event = events.recv() => match event {
                Ok(event) => {
                    let update = ChatUpdate { kind: "chat_update", event: &event };
                    let Ok(text) = serde_json::to_string(&update) else { continue };
                    if !send_text(&mut socket, text).await {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    info!(missed, "admin feed: consumer fell behind; disconnected");
                    close(&mut socket, CLOSE_TRY_AGAIN_LATER, format!("too slow: {missed} records missed")).await;
                    return;
                }
                Err(broadcast::error::RecvError::Closed) => {
                    close(&mut socket, CLOSE_GOING_AWAY, "shutting down".into()).await;
                    return;
                }
            },
            event = presence.recv() => match event {
                Ok(event) => {
                    if !send_text(&mut socket, tagged(&event, "presence")).await {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    close(&mut socket, CLOSE_TRY_AGAIN_LATER, format!("too slow: {missed} presence events missed")).await;
                    return;
                }
                Err(broadcast::error::RecvError::Closed) => {
                    close(&mut socket, CLOSE_GOING_AWAY, "shutting down".into()).await;
                    return;
                }
            },
            failure = failures.recv() => match failure {
                Ok(failure) => {
                    if !send_text(&mut socket, tagged(&failure, "upstream_failure")).await {
                        return;
                    }
                }
                // Alerts are a sample, not a ledger: a consumer that missed some goes on.
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => {
                    close(&mut socket, CLOSE_GOING_AWAY, "shutting down".into()).await;
                    return;
                }
            },
            incoming = socket.recv() => match incoming {
                Some(Err(e)) => {
                    // axum hides tungstenite's error type; its capacity error reads
                    // "Space limit exceeded: Message too long: N > M".
                    if e.to_string().contains("Space limit exceeded") {
                        crate::metrics::Metrics::inc(&metrics.http_rejected_ws_message_too_large);
                        debug!(error = %e, "admin feed: message over http.ws_max_message_bytes; closed");
                    }
                    return;
                }
                None | Some(Ok(WsMessage::Close(_))) => return,
                // Pings are answered by the socket itself; anything else is ignored.
                Some(Ok(_)) => {}
            },
            _ = ping.tick() => {
                match tokio::time::timeout(FEED_SEND_TIMEOUT, socket.send(WsMessage::Ping(Bytes::new()))).await {
                    Ok(Ok(())) => {}
                    _ => return,
                }
            }
        }
    }
}

// --- input checks without a server (fuzzing) ---------------------------------------

/// The history endpoints, for [`check_input`].
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Devices,
    Sessions,
    Messages,
    Audio,
    DeviceStats,
    FleetStats,
    Search,
    Export,
    DeviceView,
}

impl Endpoint {
    #[doc(hidden)]
    pub const ALL: [Endpoint; 9] = [
        Endpoint::Devices,
        Endpoint::Sessions,
        Endpoint::Messages,
        Endpoint::Audio,
        Endpoint::DeviceStats,
        Endpoint::FleetStats,
        Endpoint::Search,
        Endpoint::Export,
        Endpoint::DeviceView,
    ];
}

/// Runs the checks `endpoint`'s handler makes of its path parameter and of the query
/// string of `uri` before it touches the database, with the same functions, and `today`
/// for the clock. `Ok` holds what the handler would go on with (as JSON, for the fuzz
/// target's bounds checks); `Err` the 400 message the client would get.
///
/// For the `history_query` fuzz target and its regression tests (docs/fuzzing.md); the
/// service itself never calls it.
#[doc(hidden)]
pub fn check_input(
    endpoint: Endpoint,
    path_param: &str,
    uri: &Uri,
    today: Date,
) -> Result<Value, String> {
    let checked = (|| -> ApiResult<Value> {
        let params = Params::from_uri(uri)?;
        Ok(match endpoint {
            Endpoint::Devices => json!({
                "limit": params.limit()?,
                "offset": params.int("offset", 0, 0, 1_000_000_000)?,
            }),
            Endpoint::Sessions => {
                let mac = parse_mac(path_param)?;
                let limit = params.limit()?;
                let before = before_cursor(&params)?;
                json!({
                    "mac": mac,
                    "limit": limit,
                    "before": before.map(|c| json!([c.started_at, c.session_id])),
                })
            }
            Endpoint::Messages => {
                check_session_id(path_param)?;
                json!({"limit": params.limit()?, "after_id": params.after_id()?})
            }
            Endpoint::Audio => {
                check_audio_id(path_param)?;
                json!({})
            }
            Endpoint::DeviceStats | Endpoint::FleetStats => {
                if endpoint == Endpoint::DeviceStats {
                    parse_mac(path_param)?;
                }
                let (from, to) = stats_range(&params, today)?;
                let top = match endpoint {
                    Endpoint::FleetStats => Some(params.int("top", DEFAULT_TOP, 1, MAX_TOP)?),
                    _ => None,
                };
                let mut body = stats_body(from, to, Vec::new());
                body["start"] = json!(day_start(from));
                body["end"] = json!(day_end(to));
                body["top"] = json!(top);
                body
            }
            Endpoint::Search => {
                let q = search_term(&params)?;
                json!({
                    "q": q,
                    "mac": params.mac()?,
                    "limit": params.limit()?,
                    "after_id": params.after_id()?,
                })
            }
            Endpoint::Export => {
                let (format, mac, from, to) = export_params(&params)?;
                let (content_type, disposition) = export_headers(format, mac.as_deref(), from, to);
                json!({
                    "content_type": content_type,
                    "disposition": disposition,
                    "from": from.map_or_else(|| query::TIME_MIN.to_owned(), day_start),
                    "until": to.map_or_else(|| query::TIME_MAX.to_owned(), day_end),
                })
            }
            Endpoint::DeviceView => match super::management::mac_of_client_id(path_param) {
                Some(mac) => json!({"mac": mac.colon()}),
                None => return Err(ApiError::bad("not a device id")),
            },
        })
    })();
    checked.map_err(|e| match e {
        ApiError::BadRequest(m) => m,
        other => format!("{other:?}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_parse_strictly() {
        assert_eq!(format_date(parse_date("2025-02-28").unwrap()), "2025-02-28");
        for bad in [
            "",
            "2025-02-30",
            "2025-2-28",
            "2025/02/28",
            "+025-02-28",
            "0999-01-01",
            "2025-02-28 ",
            "' OR 1=1 --",
        ] {
            assert_eq!(parse_date(bad), None, "{bad:?}");
        }
        assert_eq!(
            day_end(parse_date("2024-12-31").unwrap()),
            "2025-01-01 00:00:00.000"
        );
        assert_eq!(day_end(parse_date("9999-12-31").unwrap()), query::TIME_MAX);
    }

    #[test]
    fn stats_fill_every_day_of_the_range_and_add_up() {
        let day = |d: &str, messages: i64, audio_seconds: f64| DayStats {
            messages,
            sessions: 1,
            user: messages,
            audio_seconds,
            ..DayStats::empty(d.to_owned())
        };
        let (from, to) = (
            parse_date("2024-02-27").unwrap(),
            parse_date("2024-03-01").unwrap(),
        );
        // Rows come from the database oldest first, only for days with activity.
        let body = stats_body(
            from,
            to,
            vec![day("2024-02-28", 3, 1.5), day("2024-03-01", 2, 0.25)],
        );
        assert_eq!(
            (&body["from"], &body["to"]),
            (&json!("2024-02-27"), &json!("2024-03-01"))
        );
        let days: Vec<(&str, i64)> = body["days"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| (d["day"].as_str().unwrap(), d["messages"].as_i64().unwrap()))
            .collect();
        assert_eq!(
            days,
            [
                ("2024-02-27", 0),
                ("2024-02-28", 3),
                ("2024-02-29", 0),
                ("2024-03-01", 2)
            ]
        );
        assert_eq!(body["totals"]["messages"], 5);
        assert_eq!(body["totals"]["user"], 5);
        assert_eq!(body["totals"]["sessions"], 2);
        assert_eq!(body["totals"]["audio_seconds"], 1.75);
        // One day.
        let one = stats_body(from, from, Vec::new());
        assert_eq!(one["days"].as_array().unwrap().len(), 1);
        assert_eq!(one["totals"]["messages"], 0);
    }

    #[test]
    fn csv_fields_are_quoted_when_needed() {
        let mut out = String::new();
        csv_field(&mut out, "plain");
        out.push('|');
        csv_field(&mut out, "a,b");
        out.push('|');
        csv_field(&mut out, "say \"hi\"\nbye");
        assert_eq!(out, "plain|\"a,b\"|\"say \"\"hi\"\"\nbye\"");
    }

    #[test]
    fn ids_are_checked() {
        assert!(check_audio_id(&"ab".repeat(16)).is_ok());
        assert!(check_audio_id(&"ab".repeat(17)).is_err());
        assert!(check_audio_id("' OR 1=1 --").is_err());
        assert!(check_session_id(&"é".repeat(64)).is_ok());
        assert!(check_session_id(&"x".repeat(65)).is_err());
        assert!(check_session_id("a\nb").is_err());
    }
}
