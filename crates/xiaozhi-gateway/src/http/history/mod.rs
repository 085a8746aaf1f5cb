//! The chat-history API and the `/ws/admin` live feed (README, "Chat history").
//!
//! * `GET /api/history/devices?limit=&offset=`: devices, most recently active first.
//! * `GET /api/history/devices/{mac}/sessions?limit=&before=`: a device's sessions, newest
//!   first; `before` is the `next` cursor of the previous page.
//! * `GET /api/history/sessions/{session_id}/messages?limit=&after_id=`: messages in order.
//! * `GET /api/history/audio/{audio_id}`: the utterance's WAV.
//! * `GET /api/history/devices/{mac}/stats?from=&to=`: activity per day.
//! * `GET /api/history/stats?from=&to=&top=`: the fleet's activity per day and its most
//!   active devices.
//! * `GET /api/history/search?q=&mac=&limit=&after_id=`: messages containing `q`.
//! * `GET /api/history/export?format=csv|jsonl&mac=&from=&to=`: everything, streamed.
//! * `GET /api/v2/chat-history/{device_id}`: a device's live state, totals and latest
//!   sessions in one answer.
//! * `GET /ws/admin`: a WebSocket that receives `{"type":"chat_update",...}` for every
//!   stored record.
//!
//! Everything needs `Authorization: Bearer <history.api_token>` (the WebSocket also
//! takes the token as the subprotocol `bearer.<token>`, for browsers). Without a token
//! configured, or without a history database, none of it is served (404). Bad input is
//! a 400 with `{"error": "..."}`; a database that does not answer is a 503.

mod auth;
mod endpoints;
mod errors;
mod export;
mod feed;
mod fuzz_input;
mod params;

use std::time::Duration;

use axum::Router;
use axum::middleware;
use axum::routing::get;

use crate::http::HttpState;

pub(in crate::http) use auth::require_token;
pub use errors::ApiError;
pub use export::CSV_HEADER;
pub(in crate::http) use export::export;
pub use fuzz_input::{Endpoint, check_input};
pub(in crate::http) use params::Params;
pub use params::parse_date;

use auth::require_token_or_protocol;
use endpoints::{audio, device_view, devices, fleet_stats, messages, search, sessions, stats};
use feed::admin_feed;

/// Items per page unless `limit` says otherwise, and the most it may say.
pub const DEFAULT_LIMIT: i64 = 50;
pub const MAX_LIMIT: i64 = 500;
/// Longest session id, search term and audio id accepted (characters).
pub const MAX_SESSION_ID: usize = 64;
pub const MAX_SEARCH_TERM: usize = 200;
pub const MAX_AUDIO_ID: usize = 32;
/// Most days one stats request may cover.
pub const MAX_STATS_DAYS: i64 = 1000;
/// Devices in the fleet statistics' `top_devices` unless `top` says otherwise, and the
/// most it may say.
pub const DEFAULT_TOP: i64 = 10;
pub const MAX_TOP: i64 = 100;
/// Rows fetched per page of an export.
pub const EXPORT_PAGE: i64 = 1000;
/// Sessions shown in the combined device view.
pub const RECENT_SESSIONS: i64 = 5;
/// A live-feed consumer whose socket takes longer than this for one message is dropped.
pub const FEED_SEND_TIMEOUT: Duration = Duration::from_secs(1);
/// The subprotocol `/ws/admin` answers with when the client offers it.
pub const FEED_PROTOCOL: &str = "xiaozhi-admin";
/// Prefix of the subprotocol that carries the token (`bearer.<token>`).
pub const BEARER_PROTOCOL_PREFIX: &str = "bearer.";
/// Whether the history API (and the console's, which shares its token) is served: a
/// token is configured and the history database is on.
pub(in crate::http) fn api_enabled(state: &HttpState) -> bool {
    let token_set = state
        .config
        .history
        .api_token
        .as_deref()
        .is_some_and(|t| !t.is_empty());
    token_set && state.history.is_some()
}

/// The history routes, or none when there is no token or no database.
pub fn routes(state: &HttpState) -> Router<HttpState> {
    if !api_enabled(state) {
        return Router::new();
    }
    let api = Router::new()
        .route("/api/history/devices", get(devices))
        .route("/api/history/devices/{mac}/sessions", get(sessions))
        .route("/api/history/devices/{mac}/stats", get(stats))
        .route("/api/history/stats", get(fleet_stats))
        .route("/api/history/sessions/{session_id}/messages", get(messages))
        .route("/api/history/audio/{audio_id}", get(audio))
        .route("/api/history/search", get(search))
        .route("/api/history/export", get(export))
        .route("/api/v2/chat-history/{device_id}", get(device_view))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    let feed = Router::new()
        .route("/ws/admin", get(admin_feed))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_token_or_protocol,
        ));
    api.merge(feed)
}
