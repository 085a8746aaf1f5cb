//! `GET /ws/admin`: a WebSocket that receives every stored record as it is stored (and
//! presence changes, upstream failures and push state changes); a slow consumer is
//! dropped rather than allowed to hold the writer back.

use std::time::Duration;

use axum::extract::State;
use axum::extract::ws::{CloseFrame, Message as WsMessage, WebSocket, WebSocketUpgrade};
use axum::http::HeaderValue;
use axum::response::Response;
use bytes::Bytes;
use serde::Serialize;
use tokio::sync::broadcast;
use tracing::{debug, info};

use super::auth::token_matches;
use super::{BEARER_PROTOCOL_PREFIX, FEED_PROTOCOL, FEED_SEND_TIMEOUT};
use crate::history::writer::StoredEvent;
use crate::http::HttpState;

#[derive(Serialize)]
pub(super) struct ChatUpdate<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(flatten)]
    event: &'a StoredEvent,
}

/// `GET /ws/admin`: the live feed of stored records.
pub(super) async fn admin_feed(
    State(state): State<HttpState>,
    mut ws: WebSocketUpgrade,
) -> Response {
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
    let pushes = state.events.subscribe_push();
    let max = state.config.http.ws_max_message_bytes;
    let metrics = state.metrics.clone();
    ws.max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| {
            feed(
                socket,
                events,
                presence,
                Alerts { failures, pushes },
                metrics,
            )
        })
}

/// The feed's samples beside records and presence: upstream failures and push state
/// changes.
pub(super) struct Alerts {
    pub failures: broadcast::Receiver<crate::events::UpstreamFailure>,
    pub pushes: broadcast::Receiver<crate::events::PushEvent>,
}

/// Close codes of the feed.
pub(super) const CLOSE_GOING_AWAY: u16 = 1001;
pub(super) const CLOSE_TRY_AGAIN_LATER: u16 = 1013;

pub(super) async fn close(socket: &mut WebSocket, code: u16, reason: String) {
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
pub(super) fn tagged(value: &impl Serialize, kind: &str) -> String {
    let mut value = serde_json::to_value(value).unwrap_or_default();
    value["type"] = serde_json::Value::from(kind);
    value.to_string()
}

/// Sends one feed message; false when the feed must end (the consumer left, or stalled
/// for `FEED_SEND_TIMEOUT` and was told so).
pub(super) async fn send_text(socket: &mut WebSocket, text: String) -> bool {
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
pub(super) async fn feed(
    mut socket: WebSocket,
    mut events: broadcast::Receiver<StoredEvent>,
    mut presence: broadcast::Receiver<crate::session::directory::PresenceEvent>,
    alerts: Alerts,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
) {
    let Alerts {
        mut failures,
        mut pushes,
    } = alerts;
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
            push = pushes.recv() => match push {
                Ok(push) => {
                    if !send_text(&mut socket, tagged(&push, "push")).await {
                        return;
                    }
                }
                // A fleet push makes one change per device: a consumer that missed some
                // is told how many and goes on (each push's state is readable by id).
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    let note = serde_json::json!({"missed": missed});
                    if !send_text(&mut socket, tagged(&note, "push_missed")).await {
                        return;
                    }
                }
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
