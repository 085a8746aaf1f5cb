//! The push API, served beside the management API with its daily bearer token:
//!
//! * `POST /api/push` with a push request (`protocol::push::parse_request`:
//!   `{"kind", "to" | "group" | "fleet", kind fields, "ttl_secs" | "expires_at"}`)
//!   answers 202 `{"batch_id", "kind", "devices", "pushes": [{"id", "mac_address"}],
//!   "expires_ms"}` (the ids for requests of at most 100 devices), or an error
//!   `{"error": code, "message"}`: 400 `invalid_push`, 404 `unknown_device`, 409
//!   `queue_full`, 503 `unavailable`. Nothing is queued when the answer is an error.
//! * `GET /api/push/{id}` answers the push (`state`, `error`, times in Unix ms).
//! * `GET /api/push?batch_id=&mac=&state=&before=&limit=` lists pushes, newest first;
//!   `next` is the `before` of the following page.
//! * `POST /api/push/clips` with a clip as the body (Ogg Opus, WAV or MP3, at most
//!   `push.max_clip_bytes`) answers 201 `{"id", "audio_url", "duration_ms", "bytes",
//!   "from", "expires_ms"}`: the clip as mono Ogg Opus (the one format the firmware's
//!   notify player takes), converted when it was WAV or MP3; 400 `invalid_clip` says why
//!   not, 413 when too large.
//! * `GET /push/clips/{id}.ogg` (no token: the device fetches it; the id is 128 random
//!   bits) serves it until it expires (`push.clip_ttl_secs`), then 404.
//!
//! The work is [`crate::push::PushService`]'s, the same for every way in.

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::HttpState;
use crate::protocol::mac::Mac;
use crate::protocol::push::PushState;
use crate::push::PushError;
use crate::push::store::PushFilter;

/// Largest page of `GET /api/push`.
pub const MAX_PAGE: u32 = 1000;

fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    (
        status,
        Json(json!({"error": code, "message": message.into()})),
    )
        .into_response()
}

/// The answer to a refused request.
pub fn push_error(e: &PushError) -> Response {
    let status = match e {
        PushError::Invalid(_) => StatusCode::BAD_REQUEST,
        PushError::UnknownDevice(_) | PushError::NoDevices => StatusCode::NOT_FOUND,
        PushError::QueueFull(_) => StatusCode::CONFLICT,
        PushError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        PushError::Clip(crate::push::clip::ClipError::UnknownFormat) => {
            StatusCode::UNSUPPORTED_MEDIA_TYPE
        }
        PushError::Clip(_) => StatusCode::BAD_REQUEST,
    };
    error(status, e.code(), e.to_string())
}

fn disabled() -> Response {
    error(
        StatusCode::NOT_FOUND,
        "push_disabled",
        "pushes are off on this gateway (push.enabled = false)",
    )
}

/// `POST /api/push`.
pub async fn submit(State(state): State<HttpState>, body: Bytes) -> Response {
    let Some(push) = &state.push else {
        return disabled();
    };
    let body: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            let e = PushError::Invalid(crate::protocol::push::InvalidPush {
                field: "body",
                message: format!("not JSON: {e}"),
            });
            crate::metrics::Metrics::inc(&state.metrics.push_refused_invalid);
            return push_error(&e);
        }
    };
    match push.submit(&body, None, "http").await {
        Ok(submitted) => (StatusCode::ACCEPTED, Json(submitted)).into_response(),
        Err(e) => push_error(&e),
    }
}

/// `GET /api/push/{id}`.
pub async fn get(State(state): State<HttpState>, Path(id): Path<String>) -> Response {
    let Some(push) = &state.push else {
        return disabled();
    };
    if id.len() != 32 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_id",
            "a push id is 32 hex digits",
        );
    }
    match push.get(&id).await {
        Ok(Some(row)) => Json(row).into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, "not_found", format!("no push {id}")),
        Err(e) => push_error(&e),
    }
}

/// `POST /api/push/clips`.
pub async fn upload_clip(State(state): State<HttpState>, body: Bytes) -> Response {
    let Some(push) = &state.push else {
        return disabled();
    };
    if body.is_empty() {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_clip",
            "the request body is the clip (Ogg Opus, WAV or MP3)",
        );
    }
    match push.upload_clip(body).await {
        Ok(clip) => (StatusCode::CREATED, Json(clip)).into_response(),
        Err(e) => push_error(&e),
    }
}

/// `GET /push/clips/{id}.ogg`: what a device's notify player fetches.
pub async fn serve_clip(State(state): State<HttpState>, Path(file): Path<String>) -> Response {
    let not_found = || {
        error(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such clip (or it expired)",
        )
    };
    let Some(push) = &state.push else {
        return not_found();
    };
    let Some(id) = file.strip_suffix(".ogg") else {
        return not_found();
    };
    if id.len() != 32 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return not_found();
    }
    match push.clip(id).await {
        Ok(Some(ogg)) => (
            [
                (axum::http::header::CONTENT_TYPE, "audio/ogg"),
                (axum::http::header::CACHE_CONTROL, "private, max-age=3600"),
            ],
            ogg,
        )
            .into_response(),
        Ok(None) => not_found(),
        Err(e) => push_error(&e),
    }
}

/// The query of `GET /api/push`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    pub batch_id: Option<String>,
    pub mac: Option<String>,
    pub state: Option<String>,
    /// `<created_ms>:<id>` of the last push of the previous page.
    pub before: Option<String>,
    pub limit: Option<u32>,
}

/// `GET /api/push`.
pub async fn list(
    State(state): State<HttpState>,
    params: Result<Query<ListParams>, QueryRejection>,
) -> Response {
    let Some(push) = &state.push else {
        return disabled();
    };
    let Ok(Query(params)) = params else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            "known parameters: batch_id, mac, state, before, limit",
        );
    };
    let filter = match filter_of(params) {
        Ok(f) => f,
        Err(message) => return error(StatusCode::BAD_REQUEST, "invalid_query", message),
    };
    match push.list(&filter).await {
        Ok(rows) => {
            let next = (rows.len() == filter.limit as usize)
                .then(|| rows.last().map(|r| format!("{}:{}", r.created_ms, r.id)))
                .flatten();
            Json(json!({"pushes": rows, "next": next})).into_response()
        }
        Err(e) => push_error(&e),
    }
}

/// Checks the list parameters (a plain function, tested without a server).
pub fn filter_of(params: ListParams) -> Result<PushFilter, String> {
    let mac_address = match params.mac {
        Some(m) => Some(
            m.replace('-', ":")
                .parse::<Mac>()
                .map_err(|_| format!("mac {m:?} is not a MAC address"))?
                .colon(),
        ),
        None => None,
    };
    let state = match params.state {
        Some(s) => Some(PushState::parse(&s).ok_or_else(|| {
            format!("state {s:?}: one of queued, sending, sent, delivered, expired, failed")
        })?),
        None => None,
    };
    let before = match params.before {
        Some(b) => {
            let (ms, id) = b
                .split_once(':')
                .ok_or("before is <created_ms>:<id>, the next of the previous page")?;
            let ms: i64 = ms.parse().map_err(|_| "before: created_ms is a number")?;
            Some((ms, id.to_owned()))
        }
        None => None,
    };
    let limit = params.limit.unwrap_or(100);
    if limit == 0 || limit > MAX_PAGE {
        return Err(format!("limit must be 1-{MAX_PAGE}"));
    }
    Ok(PushFilter {
        batch_id: params.batch_id,
        mac_address,
        state,
        before,
        limit,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> ListParams {
        ListParams {
            batch_id: None,
            mac: None,
            state: None,
            before: None,
            limit: None,
        }
    }

    #[test]
    fn list_parameters_are_checked() {
        let f = filter_of(ListParams {
            mac: Some("AA-BB-CC-DD-EE-01".into()),
            state: Some("queued".into()),
            before: Some("17:abc".into()),
            ..params()
        })
        .unwrap();
        assert_eq!(f.mac_address.as_deref(), Some("aa:bb:cc:dd:ee:01"));
        assert_eq!(f.state, Some(PushState::Queued));
        assert_eq!(f.before, Some((17, "abc".into())));
        assert_eq!(f.limit, 100);
        for bad in [
            ListParams {
                mac: Some("x".into()),
                ..params()
            },
            ListParams {
                state: Some("lost".into()),
                ..params()
            },
            ListParams {
                before: Some("17".into()),
                ..params()
            },
            ListParams {
                limit: Some(0),
                ..params()
            },
            ListParams {
                limit: Some(MAX_PAGE + 1),
                ..params()
            },
        ] {
            assert!(filter_of(bad).is_err());
        }
    }
}
