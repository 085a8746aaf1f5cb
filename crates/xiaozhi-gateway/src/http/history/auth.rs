//! The history API's bearer token: from `Authorization`, or for browsers' WebSockets from
//! the `bearer.<token>` subprotocol, compared in constant time. The console's API shares it.

use axum::extract::{Request, State};
use axum::http::{HeaderMap, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tracing::debug;

use super::BEARER_PROTOCOL_PREFIX;
use super::errors::{ApiError, ApiResult};
use crate::http::HttpState;

/// Whether `presented` is the configured token, compared in constant time (both sides
/// hashed first, so not even the length leaks).
pub(in crate::http) fn token_matches(state: &HttpState, presented: &str) -> bool {
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

pub(super) fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// The `bearer.<token>` subprotocols a WebSocket request offers.
pub(super) fn protocol_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|p| p.trim().strip_prefix(BEARER_PROTOCOL_PREFIX))
}

pub(super) fn check_token(
    state: &HttpState,
    headers: &HeaderMap,
    allow_protocol: bool,
) -> ApiResult<()> {
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

pub(in crate::http) async fn require_token(
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

pub(super) async fn require_token_or_protocol(
    State(state): State<HttpState>,
    request: Request,
    next: Next,
) -> Response {
    match check_token(&state, request.headers(), true) {
        Ok(()) => next.run(request).await,
        Err(e) => e.into_response(),
    }
}
