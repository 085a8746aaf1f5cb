//! The HTTP server (axum): `GET /healthz` (alive), `GET /readyz` (dependencies,
//! [`readiness`]), `GET /metrics` (Prometheus), the Node gateway's management API that
//! manager-api calls ([`management`]), the optional OTA endpoint ([`ota`]), the chat
//! history API ([`history`]), and the web console ([`console`], [`console_api`]).

pub mod console;
pub mod console_api;
mod console_fleet;
pub mod history;
pub mod management;
pub mod ota;
pub mod readiness;

use std::sync::Arc;

use axum::extract::State;
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
    /// The device MQTT port actually bound (for OTA's default endpoint).
    pub mqtt_port: u16,
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
    pub events: crate::admin::events::EventPublisher,
    /// Export downloads waiting for their browser.
    pub tickets: Arc<console_api::ExportTickets>,
}

/// Builds the router.
pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/readyz", get(readiness::readyz))
        .merge(management::routes(&state))
        .merge(history::routes(&state))
        .merge(console_api::routes(&state))
        .merge(console::routes())
        .merge(ota::routes(&state))
        .with_state(state)
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
