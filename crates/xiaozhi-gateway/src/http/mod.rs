//! The HTTP server (axum): `GET /healthz` (alive), `GET /readyz` (dependencies,
//! [`readiness`]), `GET /metrics` (Prometheus), the Node gateway's management API that
//! manager-api calls ([`management`], with device calling in [`calls`]), the optional OTA
//! endpoint ([`ota`]), the chat
//! history API ([`history`]), and the web console ([`console`], [`console_api`]).
//!
//! [`serve`] runs the listener (connection cap, header timeout); [`request_limits`]
//! bounds every request's body (`http.max_body_bytes`, 413) and handler time
//! (`http.request_timeout_secs`, 408), counting both.

pub mod calls;
pub mod console;
pub mod console_api;
mod console_fleet;
pub mod history;
pub mod management;
pub mod ota;
pub mod push;
pub mod readiness;
pub mod serve;

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Value, json};

use crate::config::Config;
use crate::metrics::Metrics;
use crate::session::directory::DeviceDirectory;

/// What the handlers share.
#[derive(Clone)]
pub struct HttpState {
    pub metrics: Arc<Metrics>,
    pub directory: Arc<DeviceDirectory>,
    pub config: Arc<Config>,
    /// The MQTT endpoint OTA hands out (`host:port`, resolved at start).
    pub ota_endpoint: String,
    /// The chat-history database, when history is enabled.
    pub history: Option<crate::history::store::Store>,
    /// Every stored chat-history record, for `/ws/admin`.
    pub history_events: tokio::sync::broadcast::Sender<crate::history::writer::StoredEvent>,
    /// Board and firmware the devices report in their OTA checks.
    pub hints: Arc<crate::presence::hints::DeviceHints>,
    /// Device presence (this node's writer and the shared store).
    pub presence: crate::presence::tracker::PresenceTracker,
    /// Runs admin commands for the console API (the same executor as the bus's).
    pub admin: Arc<crate::admin::executor::AdminDeps>,
    /// Upstream failures, for `/ws/admin`.
    pub events: crate::events::EventPublisher,
    /// Export downloads waiting for their browser.
    pub tickets: Arc<console_api::ExportTickets>,
    /// Device-to-device calling (none: `calls.enabled = false`).
    pub calls: Option<Arc<crate::calls::CallService>>,
    /// Pushes to devices (none: `push.enabled = false`).
    pub push: Option<Arc<crate::push::PushService>>,
}

/// Builds the router.
pub fn router(state: HttpState) -> Router {
    let limits = RequestLimits {
        timeout: std::time::Duration::from_secs(state.config.http.request_timeout_secs),
        max_body_bytes: state.config.http.max_body_bytes,
        metrics: state.metrics.clone(),
    };
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/readyz", get(readiness::readyz))
        // Clips for notify pushes: fetched by devices, no token (the name is the secret).
        .route("/push/clips/{file}", get(push::serve_clip))
        .merge(management::routes(&state))
        .merge(history::routes(&state))
        .merge(console_api::routes(&state))
        .merge(console::routes())
        .merge(ota::routes(&state))
        .with_state(state);
    with_request_limits(app, limits)
}

/// The per-request rules of every route.
#[derive(Clone)]
pub struct RequestLimits {
    /// Time a handler has to produce its response (`http.request_timeout_secs`).
    pub timeout: std::time::Duration,
    /// Largest body an extractor reads (`http.max_body_bytes`); routes may set less.
    pub max_body_bytes: usize,
    pub metrics: Arc<Metrics>,
}

/// Applies [`RequestLimits`] to a router.
pub fn with_request_limits(app: Router, limits: RequestLimits) -> Router {
    let max_body = limits.max_body_bytes;
    app.layer(axum::middleware::from_fn_with_state(limits, request_limits))
        .layer(DefaultBodyLimit::max(max_body))
}

/// Every request: the handler must answer within the timeout (408 otherwise); bodies
/// over the limit (413, from [`DefaultBodyLimit`]) are counted.
async fn request_limits(
    State(limits): State<RequestLimits>,
    request: Request,
    next: Next,
) -> Response {
    match tokio::time::timeout(limits.timeout, next.run(request)).await {
        Ok(response) => {
            if response.status() == StatusCode::PAYLOAD_TOO_LARGE {
                Metrics::inc(&limits.metrics.http_rejected_body_too_large);
            }
            response
        }
        Err(_) => {
            Metrics::inc(&limits.metrics.http_rejected_request_timeout);
            (
                StatusCode::REQUEST_TIMEOUT,
                Json(json!({"error": "request_timeout", "message": "the request took longer than http.request_timeout_secs"})),
            )
                .into_response()
        }
    }
}

/// `GET /metrics`: Prometheus text format.
async fn metrics(State(state): State<HttpState>) -> impl axum::response::IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        crate::metrics::exposition::render(&state.metrics),
    )
}

async fn healthz(State(state): State<HttpState>) -> Json<Value> {
    let m = state.metrics.snapshot();
    Json(json!({
        "status": "ok",
        "devices_connected": m.devices_connected,
        "sessions_live": m.sessions_live,
        "history": {
            "queue_depth": m.history_queue_depth,
            "journal_bytes": m.history_journal_bytes,
            "stored": m.history_records_stored,
            "journaled": m.history_records_journaled,
            "replayed": m.history_records_replayed,
            "lost": m.history_records_lost,
        },
        "presence": {
            "backend": state.presence.store().backend(),
            "node": state.presence.node(),
            "healthy": state.presence.healthy(),
            "backlog": state.presence.backlog(),
            "errors": m.presence_errors,
            "writes": m.presence_writes,
        },
    }))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use axum::body::{Body, Bytes};
    use axum::routing::post;
    use tower::ServiceExt;

    use super::*;

    fn app(metrics: Arc<Metrics>) -> Router {
        let app = Router::new()
            .route(
                "/slow",
                get(|| async {
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    "late"
                }),
            )
            .route(
                "/echo",
                post(|body: Bytes| async move { body.len().to_string() }),
            );
        with_request_limits(
            app,
            RequestLimits {
                timeout: Duration::from_millis(50),
                max_body_bytes: 1024,
                metrics,
            },
        )
    }

    #[tokio::test]
    async fn slow_handlers_get_408_and_large_bodies_413_both_counted() {
        let metrics = Arc::new(Metrics::default());
        let slow = app(metrics.clone())
            .oneshot(Request::get("/slow").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(slow.status(), StatusCode::REQUEST_TIMEOUT);

        let big = app(metrics.clone())
            .oneshot(
                Request::post("/echo")
                    .body(Body::from(vec![b'x'; 4096]))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(big.status(), StatusCode::PAYLOAD_TOO_LARGE);

        let fine = app(metrics.clone())
            .oneshot(
                Request::post("/echo")
                    .body(Body::from(vec![b'x'; 1000]))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(fine.status(), StatusCode::OK);

        let m = metrics.snapshot();
        assert_eq!(m.http_rejected_request_timeout, 1);
        assert_eq!(m.http_rejected_body_too_large, 1);
    }
}
