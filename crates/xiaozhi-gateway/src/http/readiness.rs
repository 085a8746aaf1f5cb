//! `GET /readyz`: whether this node can do its job now, dependency by dependency.
//!
//! `/healthz` says the process is alive (and shows its queues); `/readyz` asks each
//! dependency, with a short timeout, and answers 503 when any is down, naming it and
//! the reason, so a load balancer or an operator knows what to fix:
//!
//! * `database`: the chat-history database answers `SELECT 1` (when history is on);
//! * `presence`: the presence store answers (Redis `PING`; memory always does);
//! * `upstream`: at least one xiaozhi-server accepts a TCP connection (when the `xiaozhi`
//!   pipeline is configured). Only TCP: a WebSocket handshake would open a conversation
//!   upstream.
//!
//! Listeners are bound before the gateway reports itself started (a busy port is a
//! startup error), so a node that answers here has them.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use super::HttpState;

/// How long each dependency gets to answer.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

fn check(ok: Result<(), String>) -> Value {
    match ok {
        Ok(()) => json!({"ok": true}),
        Err(reason) => json!({"ok": false, "reason": reason}),
    }
}

async fn timed<F, E>(what: &str, f: F) -> Result<(), String>
where
    F: std::future::Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    match tokio::time::timeout(CHECK_TIMEOUT, f).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("{what} did not answer within {CHECK_TIMEOUT:?}")),
    }
}

/// Host and port of a `ws://` / `wss://` URL (default ports 80 / 443).
pub(crate) fn upstream_addr(url: &str) -> Option<(String, u16)> {
    let uri: Uri = url.trim().parse().ok()?;
    let host = uri.host()?.trim_start_matches('[').trim_end_matches(']');
    let port = uri.port_u16().unwrap_or(match uri.scheme_str() {
        Some("wss") => 443,
        _ => 80,
    });
    Some((host.to_owned(), port))
}

async fn upstream_reachable(urls: &[String]) -> Result<(), String> {
    let mut reasons = Vec::new();
    for url in urls {
        let redacted = crate::config::redact_url(url);
        let Some((host, port)) = upstream_addr(url) else {
            reasons.push(format!("{redacted}: not a ws:// URL"));
            continue;
        };
        let connect = async {
            tokio::net::TcpStream::connect((host.as_str(), port))
                .await
                .map(drop)
        };
        match timed("upstream", connect).await {
            Ok(()) => return Ok(()),
            Err(e) => reasons.push(format!("{redacted}: {e}")),
        }
    }
    Err(reasons.join("; "))
}

pub(super) async fn readyz(State(state): State<HttpState>) -> Response {
    let mut checks = Map::new();
    if let Some(store) = &state.history {
        checks.insert(
            "database".into(),
            check(timed("database", store.ping()).await),
        );
    }
    let presence = state.presence.store();
    let mut p = check(timed("presence store", presence.ping()).await);
    p["backend"] = presence.backend().into();
    checks.insert("presence".into(), p);
    let urls = &state.config.pipeline.xiaozhi.urls;
    if state.config.pipeline_kind() == crate::config::PipelineKind::Xiaozhi {
        checks.insert("upstream".into(), check(upstream_reachable(urls).await));
    }
    let ready = checks.values().all(|c| c["ok"] == true);
    let body = json!({
        "status": if ready { "ready" } else { "not_ready" },
        "node": state.presence.node(),
        "checks": checks,
    });
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body)).into_response()
}

#[cfg(test)]
mod tests {
    use super::upstream_addr;

    #[test]
    fn upstream_addresses() {
        assert_eq!(
            upstream_addr("ws://10.0.0.5:8000/xiaozhi/v1/"),
            Some(("10.0.0.5".into(), 8000))
        );
        assert_eq!(
            upstream_addr("wss://speech.example.com/xiaozhi/v1/"),
            Some(("speech.example.com".into(), 443))
        );
        assert_eq!(
            upstream_addr("ws://[::1]:9000/x"),
            Some(("::1".into(), 9000))
        );
        assert_eq!(upstream_addr("not a url"), None);
    }
}
