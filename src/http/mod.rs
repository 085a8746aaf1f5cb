//! The HTTP server (axum). For now: `GET /healthz`, answered as long as the process is
//! serving. Metrics, readiness and the APIs arrive with their issues.

use std::sync::Arc;

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Value, json};

use crate::metrics::Metrics;

/// Builds the router.
pub fn router(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .with_state(metrics)
}

async fn healthz(State(metrics): State<Arc<Metrics>>) -> Json<Value> {
    let m = metrics.snapshot();
    Json(json!({
        "status": "ok",
        "devices_connected": m.devices_connected,
        "sessions_live": m.sessions_live,
    }))
}
