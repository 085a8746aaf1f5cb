//! The Node gateway's device-calling endpoints, which manager-api's address book calls
//! (`DeviceAddressBookServiceImpl`), served beside the management API with its token:
//!
//! * `POST /api/call/request` `{"caller_mac", "target_mac", "caller_nickname"}` answers
//!   `{"status": "pending" | "bridged" | "offline" | "error", "message"?}`;
//! * `POST /api/call/accept` `{"mac"}` answers `{"status": "bridged", "peerMac"}` or
//!   `{"status": "no_pending" | "caller_gone" | "offline" | "error", "message"}`.
//!
//! HTTP codes as the Node gateway's: 400 for a body without the fields (`{"error"}`,
//! plus `status`/`message` as the native backend words it), 200 for every decision
//! (xiaozhi-server speaks `message` when `status` is `error`), 401 for a bad token.
//! The decisions are [`crate::calls::CallService`]'s.

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::HttpState;

fn missing(message: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(json!({"error": message, "status": "error", "message": message})),
    )
        .into_response()
}

/// The string field `name` of a JSON body, if present and not empty.
fn field<'a>(body: &'a Value, name: &str) -> Option<&'a str> {
    body.get(name)
        .and_then(Value::as_str)
        .filter(|s| !s.trim().is_empty())
}

/// `POST /api/call/request`.
pub async fn request(State(state): State<HttpState>, body: Bytes) -> Response {
    const MISSING: &str = "缺少必要参数: caller_mac, target_mac";
    let Some(calls) = &state.calls else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let (Some(caller), Some(target)) = (field(&body, "caller_mac"), field(&body, "target_mac"))
    else {
        return missing(MISSING);
    };
    let nickname = body
        .get("caller_nickname")
        .and_then(Value::as_str)
        .unwrap_or("");
    let answer = calls.request(caller, target, nickname).await;
    Json(answer.to_json()).into_response()
}

/// `POST /api/call/accept`.
pub async fn accept(State(state): State<HttpState>, body: Bytes) -> Response {
    const MISSING: &str = "缺少必要参数: mac";
    let Some(calls) = &state.calls else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let Some(mac) = field(&body, "mac") else {
        return missing(MISSING);
    };
    let answer = calls.accept(mac).await;
    Json(answer.to_json()).into_response()
}
