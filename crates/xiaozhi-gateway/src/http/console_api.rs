//! The calls the web console adds to the chat-history API (`docs/console-api.md`).
//!
//! The console is one page that runs the fleet: it needs every device presence knows
//! (not only the connected ones), a device's MCP tools with their schemas, the admin
//! commands, and downloads that do not put the token in a URL. These are ordinary API
//! calls under the history API's bearer token, so scripts can use them too:
//!
//! * `GET /api/console/fleet?state=&q=&since_ms=&after=&limit=`: presence, all states,
//!   with fleet counts ([`crate::presence::fleet`]).
//! * `GET /api/console/devices/{mac}`: presence, this node's view and the MCP tools.
//! * `POST /api/console/devices/{mac}/commands`: an admin command, run by the same
//!   executor as commands from the bus ([`crate::admin::executor::AdminDeps::run_now`]),
//!   answered with the same reply JSON and an HTTP status that matches its error code.
//! * `POST /api/console/export-link?format=&mac=&from=&to=` and
//!   `GET /api/console/download/{ticket}`: a single-use, 60-second ticket for one export,
//!   so the browser downloads it natively (streamed to disk, never held in page memory)
//!   while the token stays in a header.
//!
//! Like the history API, the routes exist only when `history.api_token` is set and the
//! history database is on.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use rand::Rng;
use serde_json::{Value, json};

use super::HttpState;
use super::history::{self, Params};
use crate::admin::command::{self, ErrorCode};
use crate::protocol::mac::Mac;
use crate::protocol::topics;

/// How long the presence store may take for one console call.
pub const PRESENCE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long an export ticket stays valid, and how many may wait at once.
pub const TICKET_TTL: Duration = Duration::from_secs(60);
pub const MAX_TICKETS: usize = 256;
/// Longest command body accepted.
pub const MAX_COMMAND_BYTES: usize = 64 * 1024;

/// The console routes, or none when the history API is off.
pub fn routes(state: &HttpState) -> Router<HttpState> {
    if !history::api_enabled(state) {
        return Router::new();
    }
    let api = Router::new()
        .route("/api/console/fleet", get(super::console_fleet::fleet))
        .route("/api/console/devices/{mac}", get(device))
        .route("/api/console/devices/{mac}/commands", post(device_command))
        .route("/api/console/export-link", post(export_link))
        .route(
            "/api/console/push",
            post(super::push::submit).get(super::push::list),
        )
        .route("/api/console/push/{id}", get(super::push::get))
        .route(
            "/api/console/push/clips",
            post(super::push::upload_clip).layer(axum::extract::DefaultBodyLimit::max(
                state.config.push.max_clip_bytes,
            )),
        )
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            history::require_token,
        ));
    // The ticket is the credential here.
    api.route("/api/console/download/{ticket}", get(download))
}

pub(super) fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

fn bad(message: impl Into<String>) -> Response {
    error(StatusCode::BAD_REQUEST, message)
}

/// A MAC from the path or the query; `None` when it does not parse ([`bad_mac`]).
fn parse_mac(s: &str) -> Option<Mac> {
    s.parse::<Mac>().ok()
}

fn bad_mac() -> Response {
    bad("the MAC must look like aa:bb:cc:dd:ee:ff or aa_bb_cc_dd_ee_ff")
}

// --- one device ----------------------------------------------------------------------

async fn device(State(state): State<HttpState>, Path(mac): Path<String>) -> Response {
    let Some(mac) = parse_mac(&mac) else {
        return bad_mac();
    };
    let colon = mac.colon();
    let stored = tokio::time::timeout(PRESENCE_TIMEOUT, state.presence.store().get(&colon)).await;
    // The store is the fleet's view; this node's own record stands in when it is away.
    let presence = match stored {
        Ok(Ok(record)) => record.or_else(|| state.presence.local(&colon)),
        _ => state.presence.local(&colon),
    };
    let entry = state.directory.get(&mac);
    let tools = entry
        .as_ref()
        .map(|e| e.mcp.cache().tools_value())
        .unwrap_or_else(|| Value::Array(Vec::new()));
    let session_id = entry
        .as_ref()
        .and_then(|e| e.conversation.as_ref().map(|(_, id)| id.clone()));
    Json(json!({
        "mac_address": colon,
        "presence": presence,
        "connected_here": entry.is_some(),
        "session_id": session_id,
        "tools": tools,
    }))
    .into_response()
}

/// The HTTP status that says what a command's error code says.
pub fn status_of(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::MalformedJson
        | ErrorCode::InvalidCommand
        | ErrorCode::UnknownCommand
        | ErrorCode::WrongTopic => StatusCode::BAD_REQUEST,
        ErrorCode::DeviceOffline | ErrorCode::UnknownDevice => StatusCode::NOT_FOUND,
        ErrorCode::NoConversation | ErrorCode::QueueFull => StatusCode::CONFLICT,
        ErrorCode::DeviceError => StatusCode::BAD_GATEWAY,
        ErrorCode::Busy | ErrorCode::PresenceUnavailable | ErrorCode::Unavailable => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        ErrorCode::DeviceTimeout | ErrorCode::NodeUnreachable => StatusCode::GATEWAY_TIMEOUT,
    }
}

/// A request id for a command that came without one.
fn console_request_id() -> String {
    format!("console-{:016x}", rand::rng().random::<u64>())
}

async fn device_command(
    State(state): State<HttpState>,
    Path(mac): Path<String>,
    body: Bytes,
) -> Response {
    let started = Instant::now();
    let node = state.admin.node.clone();
    let refuse = |request_id: Option<&str>, e: command::CommandError| {
        let reply = command::error_reply(request_id, &e, &node, None, started.elapsed());
        (
            status_of(e.code),
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            reply,
        )
            .into_response()
    };
    let Some(mac) = parse_mac(&mac) else {
        return bad_mac();
    };
    if body.len() > MAX_COMMAND_BYTES {
        return refuse(
            None,
            command::CommandError::new(
                ErrorCode::InvalidCommand,
                format!("the command is larger than {MAX_COMMAND_BYTES} bytes"),
            ),
        );
    }
    // The HTTP caller waits for its answer, so the request id is optional here.
    let payload = match serde_json::from_slice::<Value>(&body) {
        Ok(Value::Object(mut obj)) => {
            if !obj.contains_key("request_id") {
                obj.insert("request_id".into(), Value::from(console_request_id()));
            }
            // A reply topic means nothing to an HTTP caller.
            obj.remove("reply_to");
            serde_json::to_vec(&obj).unwrap_or_default()
        }
        _ => body.to_vec(),
    };
    let topic = topics::admin_command(&mac);
    let request = match command::parse(&topic, &payload) {
        Ok(r) => r,
        Err(rejected) => return refuse(rejected.request_id.as_deref(), rejected.error),
    };
    match state.admin.run_now(&request, &payload, "http").await {
        Ok(result) => {
            let reply =
                command::ok_reply(&request.request_id, &result, &node, None, started.elapsed());
            (
                StatusCode::OK,
                [(axum::http::header::CONTENT_TYPE, "application/json")],
                reply,
            )
                .into_response()
        }
        Err(e) => refuse(Some(&request.request_id), e),
    }
}

// --- export tickets ------------------------------------------------------------------

/// The query string of one export.
type ExportQuery = HashMap<String, String>;

/// Exports waiting to be downloaded: ticket -> (query, issued).
#[derive(Default)]
pub struct ExportTickets {
    waiting: Mutex<HashMap<String, (ExportQuery, Instant)>>,
}

impl ExportTickets {
    /// Keeps `params` under a fresh ticket; none when too many are waiting.
    pub fn issue(&self, params: HashMap<String, String>, now: Instant) -> Option<String> {
        let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        waiting.retain(|_, (_, issued)| now.duration_since(*issued) < TICKET_TTL);
        if waiting.len() >= MAX_TICKETS {
            return None;
        }
        let ticket = hex::encode(rand::rng().random::<[u8; 24]>());
        waiting.insert(ticket.clone(), (params, now));
        Some(ticket)
    }

    /// Takes the ticket's query (once), if it exists and has not expired.
    pub fn redeem(&self, ticket: &str, now: Instant) -> Option<HashMap<String, String>> {
        let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        let (params, issued) = waiting.remove(ticket)?;
        (now.duration_since(issued) < TICKET_TTL).then_some(params)
    }
}

/// The export parameters a ticket may carry.
const EXPORT_PARAMS: [&str; 4] = ["format", "mac", "from", "to"];

async fn export_link(
    State(state): State<HttpState>,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    if let Some(unknown) = params.keys().find(|k| !EXPORT_PARAMS.contains(&k.as_str())) {
        return bad(format!(
            "unknown parameter {unknown:?}; known: format, mac, from, to"
        ));
    }
    if let Some(f) = params.get("format")
        && !matches!(f.as_str(), "" | "csv" | "jsonl" | "ndjson")
    {
        return bad("format must be csv or jsonl");
    }
    if params
        .get("mac")
        .is_some_and(|m| !m.is_empty() && parse_mac(m).is_none())
    {
        return bad_mac();
    }
    for name in ["from", "to"] {
        if let Some(d) = params.get(name).filter(|d| !d.is_empty())
            && history::parse_date(d).is_none()
        {
            return bad(format!("{name} must be a date, YYYY-MM-DD"));
        }
    }
    match state.tickets.issue(params, Instant::now()) {
        Some(ticket) => Json(json!({
            "url": format!("/api/console/download/{ticket}"),
            "expires_in_secs": TICKET_TTL.as_secs(),
        }))
        .into_response(),
        None => error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{MAX_TICKETS} exports are waiting to be downloaded; try again in a minute"),
        ),
    }
}

async fn download(State(state): State<HttpState>, Path(ticket): Path<String>) -> Response {
    match state.tickets.redeem(&ticket, Instant::now()) {
        Some(params) => match history::export(State(state), Params(params)).await {
            Ok(response) => response,
            Err(e) => e.into_response(),
        },
        None => error(
            StatusCode::NOT_FOUND,
            "this download link was used already or has expired; export again",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn command_errors_map_to_http_statuses() {
        assert_eq!(status_of(ErrorCode::DeviceOffline), StatusCode::NOT_FOUND);
        assert_eq!(
            status_of(ErrorCode::DeviceTimeout),
            StatusCode::GATEWAY_TIMEOUT
        );
        assert_eq!(status_of(ErrorCode::NoConversation), StatusCode::CONFLICT);
        assert_eq!(
            status_of(ErrorCode::InvalidCommand),
            StatusCode::BAD_REQUEST
        );
    }

    #[test]
    fn tickets_are_single_use_and_expire() {
        let tickets = ExportTickets::default();
        let t0 = Instant::now();
        let a = tickets.issue(params(&[("format", "csv")]), t0).unwrap();
        let b = tickets.issue(params(&[("format", "jsonl")]), t0).unwrap();
        assert_ne!(a, b);
        assert_eq!(a.len(), 48);
        assert_eq!(tickets.redeem(&a, t0).unwrap()["format"], "csv");
        assert!(tickets.redeem(&a, t0).is_none(), "second use");
        assert!(tickets.redeem(&b, t0 + TICKET_TTL).is_none(), "expired");
        assert!(tickets.redeem("nope", t0).is_none());
        for _ in 0..MAX_TICKETS {
            tickets.issue(HashMap::new(), t0).unwrap();
        }
        assert!(tickets.issue(HashMap::new(), t0).is_none(), "bounded");
        // Expired tickets make room again.
        assert!(tickets.issue(HashMap::new(), t0 + TICKET_TTL).is_some());
    }
}
