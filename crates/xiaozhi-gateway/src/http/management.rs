//! The Node gateway's management API (PROTOCOL.md section 7), which manager-api calls:
//!
//! * `POST /api/devices/status` with `{"clientIds":[...]}` answers, per client id,
//!   `{"isAlive": bool, "exists": bool, "inConversation": bool}`: `exists` and `isAlive`
//!   are both `true` for every connected device (idle or not) and both `false` otherwise;
//!   `inConversation` tells a conversation apart. See [`status_entry`] for why.
//! * `POST /api/commands/{clientId}` with `{"type":"mcp","payload":{JSON-RPC request}}`
//!   sends the request to the device over MCP and answers `{"success":true,"data":result}`
//!   or HTTP 500 `{"success":false,"error":"..."}`.
//!
//! The device-calling endpoints (`/api/call/request`, `/api/call/accept`, [`super::calls`])
//! and the push API (`/api/push`, [`super::push`]) are served here too, behind the same
//! token.
//!
//! All need `Authorization: Bearer <token>`, where the token is
//! `hex(SHA-256("YYYY-MM-DD" + signature_key))`. manager-api computes it from the UTC date
//! (and retries with the day before and after on a 401); the Node gateway from its local
//! date. Tokens of UTC yesterday, today and tomorrow are accepted, which covers every local
//! date. Without a signature key, or with `management.enabled = false`, the routes are not
//! served at all (404).
//!
//! Devices are looked up by the MAC inside the client id, never by the whole id:
//! manager-api builds `{board}@@@{mac_}@@@{mac_}` from its own tables, and its board need not
//! be the group the device connected with.

use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use time::{Date, OffsetDateTime};
use tracing::{info, warn};

use super::HttpState;
use crate::device_link::mcp::McpCallError;
use crate::presence::PresenceState;
use crate::protocol::mac::Mac;

/// Most client ids one status request may ask about.
pub const MAX_STATUS_IDS: usize = 10_000;

/// The management routes, or none when the API is off (no signature key, or
/// `management.enabled = false`; config warns about the first at start).
pub fn routes(state: &HttpState) -> Router<HttpState> {
    if !state.config.management.enabled || state.config.auth.signature_key.is_none() {
        return Router::new();
    }
    let mut routes = Router::new()
        .route("/api/devices/status", post(devices_status))
        .route("/api/commands/{client_id}", post(command));
    if state.calls.is_some() {
        routes = routes
            .route("/api/call/request", post(super::calls::request))
            .route("/api/call/accept", post(super::calls::accept));
    }
    if state.push.is_some() {
        routes = routes
            .route(
                "/api/push",
                post(super::push::submit).get(super::push::list),
            )
            .route("/api/push/{id}", axum::routing::get(super::push::get))
            .route(
                "/api/push/clips",
                post(super::push::upload_clip).layer(axum::extract::DefaultBodyLimit::max(
                    state.config.push.max_clip_bytes,
                )),
            );
    }
    routes.route_layer(middleware::from_fn_with_state(state.clone(), require_token))
}

/// The daily bearer token for `date`: `hex(SHA-256("YYYY-MM-DD" + key))`.
pub fn daily_token(date: Date, signature_key: &str) -> String {
    let day = format!(
        "{:04}-{:02}-{:02}",
        date.year(),
        u8::from(date.month()),
        date.day()
    );
    let mut hash = Sha256::new();
    hash.update(day.as_bytes());
    hash.update(signature_key.as_bytes());
    hex::encode(hash.finalize())
}

/// Whether `presented` is the token of the UTC day before, of or after `now`, compared in
/// constant time.
pub fn token_is_valid(presented: &str, signature_key: &str, now: OffsetDateTime) -> bool {
    let today = now.date();
    let days = [today.previous_day(), Some(today), today.next_day()];
    let mut ok = subtle::Choice::from(0);
    for day in days.into_iter().flatten() {
        let expected = daily_token(day, signature_key);
        // Same length for every well-formed token; a wrong length can never match.
        if expected.len() == presented.len() {
            ok |= expected.as_bytes().ct_eq(presented.as_bytes());
        }
    }
    ok.into()
}

fn json_error(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

async fn require_token(State(state): State<HttpState>, request: Request, next: Next) -> Response {
    let Some(key) = state.config.auth.signature_key.as_deref() else {
        return json_error(StatusCode::NOT_FOUND, "management API is off");
    };
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.trim().split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then(|| token.trim().to_owned())
        });
    match presented {
        None => json_error(
            StatusCode::UNAUTHORIZED,
            "missing bearer token (Authorization: Bearer <token>)",
        ),
        Some(token) if token_is_valid(&token, key, OffsetDateTime::now_utc()) => {
            next.run(request).await
        }
        Some(_) => {
            warn!(path = %request.uri().path(), "management API: invalid bearer token");
            json_error(StatusCode::UNAUTHORIZED, "invalid bearer token")
        }
    }
}

/// The MAC a client id names: `GROUP@@@MAC_@@@UUID`, `GROUP@@@MAC_`, or a bare MAC
/// (`aa_bb_..` or `aa:bb:..`).
pub fn mac_of_client_id(client_id: &str) -> Option<Mac> {
    let parts: Vec<&str> = client_id.split("@@@").collect();
    match parts.as_slice() {
        [mac] | [_, mac] | [_, mac, _] => mac.parse().ok(),
        _ => None,
    }
}

/// `POST /api/devices/status`.
async fn devices_status(State(state): State<HttpState>, body: Bytes) -> Response {
    let bad = || json_error(StatusCode::BAD_REQUEST, "clientIds must be an array");
    let Ok(Value::Object(mut body)) = serde_json::from_slice::<Value>(&body) else {
        return bad();
    };
    let Some(Value::Array(ids)) = body.remove("clientIds") else {
        return bad();
    };
    if ids.len() > MAX_STATUS_IDS {
        return json_error(
            StatusCode::BAD_REQUEST,
            &format!("too many clientIds (at most {MAX_STATUS_IDS})"),
        );
    }
    // manager-api sends strings; anything else is answered under its JSON text.
    let ids: Vec<String> = ids
        .into_iter()
        .map(|id| match id {
            Value::String(s) => s,
            other => other.to_string(),
        })
        .collect();
    let mut statuses: Vec<Option<bool>> = ids
        .iter()
        .map(|id| mac_of_client_id(id).and_then(|mac| state.directory.status(&mac)))
        .collect();
    if state.admin.forwarder.is_some() {
        elsewhere_from_store(&state, &ids, &mut statuses).await;
    }
    let mut out = Map::with_capacity(ids.len());
    for (id, status) in ids.into_iter().zip(statuses) {
        out.insert(id, status_entry(status));
    }
    Json(Value::Object(out)).into_response()
}

/// One device's entry in the status answer: `None` not connected, `Some(in_conversation)`
/// connected.
///
/// Both manager-api generations read this answer, and they disagree about `null`:
///
/// * `main`'s manager-web (DeviceManagement.vue, AddressBookManagement.vue) shows a device
///   online when `isAlive === true`, or `isAlive === null && exists === true`, and offline
///   when `isAlive === false`.
/// * `py-test-mqtt`'s `MqttManagementRouter` merges several backends and fails the whole
///   request (every device's status, calls, tool calls) unless every entry has Boolean
///   `exists` and `isAlive`, with `exists: false, isAlive: true` invalid. It routes calls
///   to the backend whose `exists` is true.
///
/// The Node gateway's `isAlive: null` for an idle device breaks the second; `false` would
/// show the device offline in the first. `isAlive: true` with `exists: true` reads
/// "online" in both and is what the `py-test-mqtt` native backend answers (it means
/// "transport connected" there). No consumer in either branch reads the difference
/// between idle and talking, which `inConversation` keeps for whoever wants it.
pub fn status_entry(status: Option<bool>) -> Value {
    match status {
        Some(in_conversation) => {
            json!({"isAlive": true, "exists": true, "inConversation": in_conversation})
        }
        None => json!({"isAlive": false, "exists": false, "inConversation": false}),
    }
}

/// Scale-out: what the presence store says of the devices this node does not hold
/// (`Some(true)` in a conversation, `Some(false)` connected). A store that cannot answer
/// in time leaves them unknown (answered as not connected), as a lone node would.
async fn elsewhere_from_store(state: &HttpState, ids: &[String], statuses: &mut [Option<bool>]) {
    let (slots, macs): (Vec<usize>, Vec<String>) = ids
        .iter()
        .enumerate()
        .filter(|(i, _)| statuses[*i].is_none())
        .filter_map(|(i, id)| Some((i, mac_of_client_id(id)?.colon())))
        .unzip();
    if macs.is_empty() {
        return;
    }
    let timeout = Duration::from_millis(state.config.presence.timeout_ms);
    let lookup = state.presence.store().get_many(&macs);
    let records = match tokio::time::timeout(timeout, lookup).await {
        Ok(Ok(records)) => records,
        Ok(Err(e)) => {
            warn!(error = %e, "device status: presence store failed; answering for this node's devices only");
            return;
        }
        Err(_) => {
            warn!(
                "device status: presence store did not answer in time; answering for this node's devices only"
            );
            return;
        }
    };
    for (slot, record) in slots.into_iter().zip(records) {
        statuses[slot] = match record.map(|r| r.state) {
            Some(PresenceState::InSession | PresenceState::InCall) => Some(true),
            Some(PresenceState::Online) => Some(false),
            Some(PresenceState::Offline) | None => None,
        };
    }
}

fn command_error(message: &str) -> Response {
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        Json(json!({"success": false, "error": message})),
    )
        .into_response()
}

/// `POST /api/commands/{clientId}`.
async fn command(
    State(state): State<HttpState>,
    Path(client_id): Path<String>,
    body: Bytes,
) -> Response {
    let body: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                Json(json!({"success": false, "error": format!("body is not JSON: {e}")})),
            )
                .into_response();
        }
    };
    let payload = &body["payload"];
    let (Some("mcp"), Some(method)) = (body["type"].as_str(), payload["method"].as_str()) else {
        return command_error("invalid command type");
    };
    let params = payload.get("params").cloned();
    let tool = params
        .as_ref()
        .and_then(|p| p.get("name"))
        .and_then(Value::as_str)
        .map(str::to_owned);
    let Some(mac) = mac_of_client_id(&client_id) else {
        info!(client_id = %client_id.chars().take(128).collect::<String>(), method, outcome = "not_connected", "management command");
        return command_error("device not connected");
    };
    let timeout = Duration::from_secs(state.config.management.command_timeout_secs);
    let Some(mcp) = state.directory.mcp(&mac) else {
        if state.admin.forwarder.is_some() {
            return on_another_node(&state, mac, method, params, timeout).await;
        }
        info!(mac = %mac, method, outcome = "not_connected", "management command");
        return command_error("device not connected");
    };
    let started = Instant::now();
    let result = mcp.call(method, params, timeout).await;
    let ms = started.elapsed().as_millis() as u64;
    let outcome = match &result {
        Ok(_) => "ok",
        Err(McpCallError::NotConnected) => "not_connected",
        Err(McpCallError::Timeout(_)) => "timeout",
        Err(McpCallError::Device(_)) => "device_error",
    };
    info!(mac = %mac, method, tool = tool.as_deref().unwrap_or(""), outcome, ms, "management command");
    match result {
        Ok(data) => Json(json!({"success": true, "data": data})).into_response(),
        Err(McpCallError::NotConnected) => command_error("device not connected"),
        Err(McpCallError::Timeout(t)) => command_error(&format!(
            "device did not answer within {} s",
            t.as_secs_f64()
        )),
        Err(McpCallError::Device(crate::protocol::mcp::McpError::Rpc { message, .. })) => {
            command_error(&message)
        }
        Err(McpCallError::Device(e)) => command_error(&e.to_string()),
    }
}

/// Scale-out: the MCP call for a device this node does not hold, run by the node that
/// does (if the presence store names one) as an admin `mcp` command.
async fn on_another_node(
    state: &HttpState,
    mac: Mac,
    method: &str,
    params: Option<Value>,
    timeout: Duration,
) -> Response {
    let mut payload = json!({"method": method});
    if let Some(p) = params {
        payload["params"] = p;
    }
    let command = json!({
        "request_id": format!("management-{:016x}", rand::random::<u64>()),
        "command": "mcp",
        "payload": payload,
        "timeout_ms": timeout.as_millis() as u64,
    });
    let command = serde_json::to_vec(&command).unwrap_or_default();
    let request =
        match crate::admin::command::parse(&crate::protocol::topics::admin_command(&mac), &command)
        {
            Ok(r) => r,
            Err(rejected) => return command_error(&rejected.error.message),
        };
    let started = Instant::now();
    let result = state.admin.run_now(&request, &command, "management").await;
    let ms = started.elapsed().as_millis() as u64;
    use crate::admin::command::ErrorCode;
    match result {
        Ok(data) => {
            info!(mac = %mac, method, outcome = "ok", ms, "management command (via the device's node)");
            Json(json!({"success": true, "data": data})).into_response()
        }
        Err(e) => {
            info!(mac = %mac, method, outcome = e.code.as_str(), ms, "management command (via the device's node)");
            match e.code {
                ErrorCode::DeviceOffline => command_error("device not connected"),
                _ => command_error(&e.message),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::Month;

    fn date(y: i32, m: u8, d: u8) -> Date {
        Date::from_calendar_date(y, Month::try_from(m).unwrap(), d).unwrap()
    }

    const KEY: &str = "test-signature-key";

    #[test]
    fn daily_token_matches_the_vector() {
        assert_eq!(
            daily_token(date(2026, 11, 24), KEY),
            "8119c07627d921c3991203e0f055da2aa57bef33b247938a4a630eefb7ee3cef"
        );
    }

    #[test]
    fn tokens_of_yesterday_today_and_tomorrow_are_valid() {
        let now = date(2026, 3, 1).midnight().assume_utc();
        for (day, ok) in [
            (date(2026, 2, 27), false),
            (date(2026, 2, 28), true),
            (date(2026, 3, 1), true),
            (date(2026, 3, 2), true),
            (date(2026, 3, 3), false),
        ] {
            assert_eq!(
                token_is_valid(&daily_token(day, KEY), KEY, now),
                ok,
                "{day}"
            );
        }
        let today = daily_token(date(2026, 3, 1), KEY);
        assert!(!token_is_valid(&today, "other-key", now));
        assert!(!token_is_valid("", KEY, now));
        assert!(!token_is_valid(&today[..63], KEY, now));
        assert!(!token_is_valid(&today.to_uppercase(), KEY, now));
    }

    #[test]
    fn client_ids_name_their_mac() {
        let mac: Mac = "aa:bb:cc:dd:ee:ff".parse().unwrap();
        for id in [
            "GID_default@@@aa_bb_cc_dd_ee_ff@@@aa_bb_cc_dd_ee_ff",
            "esp32-s3-box@@@aa_bb_cc_dd_ee_ff@@@some-uuid",
            "GID_default@@@aa_bb_cc_dd_ee_ff",
            "aa_bb_cc_dd_ee_ff",
            "AA:BB:CC:DD:EE:FF",
        ] {
            assert_eq!(mac_of_client_id(id), Some(mac), "{id}");
        }
        for id in [
            "",
            "GID@@@nope@@@x",
            "a@@@aa_bb_cc_dd_ee_ff@@@b@@@c",
            "GID@@@@@@",
        ] {
            assert_eq!(mac_of_client_id(id), None, "{id}");
        }
    }
}
