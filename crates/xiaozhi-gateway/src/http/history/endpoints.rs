//! The read endpoints: devices, sessions, messages, audio, statistics, search and the
//! combined device view. Each checks its input ([`super::params`]), asks
//! [`crate::history::query`] and answers JSON.

use std::collections::HashMap;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use time::Date;

use super::errors::{ApiError, ApiResult};
use super::params::{
    Params, PathParam, before_cursor, check_audio_id, check_session_id, day_end, day_start,
    format_date, parse_mac, search_term, store, trim_page,
};
use super::{DEFAULT_TOP, MAX_STATS_DAYS, MAX_TOP, RECENT_SESSIONS};
use crate::history::query::{self, DayStats, SessionCursor};
use crate::history::writer::format_time;
use crate::http::HttpState;

/// `GET /api/history/devices?limit=&offset=`.
pub(super) async fn devices(State(state): State<HttpState>, params: Params) -> ApiResult<Response> {
    let limit = params.limit()?;
    let offset = params.int("offset", 0, 0, 1_000_000_000)?;
    let rows = query::devices(store(&state)?, limit, offset).await?;
    Ok(Json(json!({ "devices": rows, "limit": limit, "offset": offset })).into_response())
}

/// `GET /api/history/devices/{mac}/sessions?limit=&before=`.
pub(super) async fn sessions(
    State(state): State<HttpState>,
    PathParam(mac): PathParam,
    params: Params,
) -> ApiResult<Response> {
    let mac = parse_mac(&mac)?;
    let limit = params.limit()?;
    let before = before_cursor(&params)?;
    let rows = query::sessions(store(&state)?, &mac, before.as_ref(), limit + 1).await?;
    let (rows, more) = trim_page(rows, limit);
    let next = more
        .then(|| rows.last().map(|s| SessionCursor::after(s).encode()))
        .flatten();
    Ok(Json(json!({ "mac_address": mac, "sessions": rows, "next": next })).into_response())
}

/// `GET /api/history/sessions/{session_id}/messages?limit=&after_id=`.
pub(super) async fn messages(
    State(state): State<HttpState>,
    PathParam(session_id): PathParam,
    params: Params,
) -> ApiResult<Response> {
    check_session_id(&session_id)?;
    let limit = params.limit()?;
    let after_id = params.after_id()?;
    let rows = query::messages(store(&state)?, &session_id, after_id, limit + 1).await?;
    let (rows, more) = trim_page(rows, limit);
    let next = more.then(|| rows.last().map(|m| m.id)).flatten();
    Ok(Json(json!({ "session_id": session_id, "messages": rows, "next": next })).into_response())
}

/// `GET /api/history/audio/{audio_id}`.
pub(super) async fn audio(
    State(state): State<HttpState>,
    PathParam(id): PathParam,
) -> ApiResult<Response> {
    check_audio_id(&id)?;
    let Some(wav) = query::audio(store(&state)?, &id).await? else {
        return Err(ApiError::NotFound("no such audio"));
    };
    Ok((
        [
            (header::CONTENT_TYPE, HeaderValue::from_static("audio/wav")),
            (
                header::CACHE_CONTROL,
                HeaderValue::from_static("private, max-age=86400"),
            ),
        ],
        wav,
    )
        .into_response())
}

/// Today in the zone history is written in.
pub(super) fn today(state: &HttpState) -> Date {
    let offset = time::UtcOffset::from_whole_seconds(state.config.history.utc_offset_minutes * 60)
        .unwrap_or(time::UtcOffset::UTC);
    time::OffsetDateTime::now_utc().to_offset(offset).date()
}

/// The days a stats request covers: `from` and `to` (both included), by default the
/// last 30 days up to `today`; at most `MAX_STATS_DAYS`.
pub(super) fn stats_range(params: &Params, today: Date) -> ApiResult<(Date, Date)> {
    let (from, to) = (params.date("from")?, params.date("to")?);
    let to = to.unwrap_or(today);
    let from = from.unwrap_or_else(|| to.saturating_sub(time::Duration::days(29)));
    if from > to {
        return Err(ApiError::bad("from is after to"));
    }
    let span = (to - from).whole_days() + 1;
    if span > MAX_STATS_DAYS {
        return Err(ApiError::bad(format!(
            "at most {MAX_STATS_DAYS} days per request"
        )));
    }
    Ok((from, to))
}

/// `from`, `to`, every day from `from` to `to` (the days without a row in `rows` as
/// zeros), oldest first, and their `totals`.
pub(super) fn stats_body(from: Date, to: Date, rows: Vec<DayStats>) -> Value {
    let mut by_day: HashMap<String, DayStats> =
        rows.into_iter().map(|d| (d.day.clone(), d)).collect();
    let mut days = Vec::with_capacity(((to - from).whole_days() + 1).max(0) as usize);
    let mut totals = DayStats::empty(String::new());
    let mut day = Some(from);
    while let Some(d) = day.filter(|d| *d <= to) {
        let key = format_date(d);
        let stats = by_day.remove(&key).unwrap_or_else(|| DayStats::empty(key));
        totals.sessions += stats.sessions;
        totals.messages += stats.messages;
        totals.user += stats.user;
        totals.assistant += stats.assistant;
        totals.tool += stats.tool;
        totals.audio_messages += stats.audio_messages;
        totals.audio_seconds += stats.audio_seconds;
        days.push(stats);
        day = d.next_day();
    }
    json!({
        "from": format_date(from),
        "to": format_date(to),
        "days": days,
        "totals": {
            "sessions": totals.sessions,
            "messages": totals.messages,
            "user": totals.user,
            "assistant": totals.assistant,
            "tool": totals.tool,
            "audio_messages": totals.audio_messages,
            "audio_seconds": totals.audio_seconds,
        },
    })
}

/// `GET /api/history/devices/{mac}/stats?from=YYYY-MM-DD&to=YYYY-MM-DD`: every day of
/// the range (zeros included), oldest first, and the totals. Default: the last 30 days
/// in the zone history is written in.
pub(super) async fn stats(
    State(state): State<HttpState>,
    PathParam(mac): PathParam,
    params: Params,
) -> ApiResult<Response> {
    let mac = parse_mac(&mac)?;
    let (from, to) = stats_range(&params, today(&state))?;
    let rows =
        query::daily_stats(store(&state)?, Some(&mac), &day_start(from), &day_end(to)).await?;
    let mut body = stats_body(from, to, rows);
    body["mac_address"] = Value::from(mac);
    Ok(Json(body).into_response())
}

/// `GET /api/history/stats?from=YYYY-MM-DD&to=YYYY-MM-DD&top=10`: the per-device stats
/// over every device, and `top_devices`: the `top` devices with the most messages in
/// the range (most first, then by MAC).
pub(super) async fn fleet_stats(
    State(state): State<HttpState>,
    params: Params,
) -> ApiResult<Response> {
    let (from, to) = stats_range(&params, today(&state))?;
    let top = params.int("top", DEFAULT_TOP, 1, MAX_TOP)?;
    let store = store(&state)?;
    let (start, end) = (day_start(from), day_end(to));
    // Two statements, each on its own connection, at the same time.
    let (rows, top_devices) = tokio::try_join!(
        query::daily_stats(store, None, &start, &end),
        query::top_devices(store, &start, &end, top),
    )?;
    let mut body = stats_body(from, to, rows);
    body["top_devices"] = json!(top_devices);
    Ok(Json(body).into_response())
}

/// `GET /api/history/search?q=&mac=&limit=&after_id=`.
pub(super) async fn search(State(state): State<HttpState>, params: Params) -> ApiResult<Response> {
    let q = search_term(&params)?;
    let mac = params.mac()?;
    let limit = params.limit()?;
    let after_id = params.after_id()?;
    let rows = query::search(store(&state)?, q, mac.as_deref(), after_id, limit + 1).await?;
    let (rows, more) = trim_page(rows, limit);
    let next = more.then(|| rows.last().map(|m| m.id)).flatten();
    Ok(Json(json!({ "q": q, "results": rows, "next": next })).into_response())
}

/// `GET /api/v2/chat-history/{device_id}`: the device's live state on this node, its
/// totals and its latest sessions. `device_id` is the MAC (either spelling) or a client
/// id that contains it.
pub(super) async fn device_view(
    State(state): State<HttpState>,
    PathParam(device_id): PathParam,
) -> ApiResult<Response> {
    let Some(mac) = crate::http::management::mac_of_client_id(&device_id) else {
        return Err(ApiError::bad(
            "not a device id (a MAC: aa:bb:cc:dd:ee:ff or aa_bb_cc_dd_ee_ff)",
        ));
    };
    let mac_address = mac.colon();
    let live = match state.directory.get(&mac) {
        Some(entry) => {
            let connected_ms = entry
                .connected_at
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as i64)
                .unwrap_or(0);
            json!({
                "connected": true,
                "in_conversation": entry.conversation.is_some(),
                "session_id": entry.conversation.as_ref().map(|(_, id)| id),
                "connected_at": format_time(connected_ms, state.config.history.utc_offset_minutes),
                "connected_at_ms": connected_ms,
                "remote": entry.remote.to_string(),
                "client_id": entry.identity.client_id,
            })
        }
        None => json!({
            "connected": false,
            "in_conversation": false,
            "session_id": null,
            "connected_at": null,
            "connected_at_ms": null,
            "remote": null,
            "client_id": null,
        }),
    };
    let store = store(&state)?;
    let totals = query::device_totals(store, &mac_address).await?;
    let recent = query::sessions(store, &mac_address, None, RECENT_SESSIONS).await?;
    Ok(Json(json!({
        "device_id": mac_address,
        "mac_address": mac_address,
        "live": live,
        "stats": {
            "sessions": totals.sessions,
            "messages": totals.messages,
            "last_activity": totals.last_at,
        },
        "recent_sessions": recent,
    }))
    .into_response())
}

#[cfg(test)]
mod tests {
    use super::super::params::parse_date;
    use super::*;

    #[test]
    fn stats_fill_every_day_of_the_range_and_add_up() {
        let day = |d: &str, messages: i64, audio_seconds: f64| DayStats {
            messages,
            sessions: 1,
            user: messages,
            audio_seconds,
            ..DayStats::empty(d.to_owned())
        };
        let (from, to) = (
            parse_date("2024-02-27").unwrap(),
            parse_date("2024-03-01").unwrap(),
        );
        // Rows come from the database oldest first, only for days with activity.
        let body = stats_body(
            from,
            to,
            vec![day("2024-02-28", 3, 1.5), day("2024-03-01", 2, 0.25)],
        );
        assert_eq!(
            (&body["from"], &body["to"]),
            (&json!("2024-02-27"), &json!("2024-03-01"))
        );
        let days: Vec<(&str, i64)> = body["days"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| (d["day"].as_str().unwrap(), d["messages"].as_i64().unwrap()))
            .collect();
        assert_eq!(
            days,
            [
                ("2024-02-27", 0),
                ("2024-02-28", 3),
                ("2024-02-29", 0),
                ("2024-03-01", 2)
            ]
        );
        assert_eq!(body["totals"]["messages"], 5);
        assert_eq!(body["totals"]["user"], 5);
        assert_eq!(body["totals"]["sessions"], 2);
        assert_eq!(body["totals"]["audio_seconds"], 1.75);
        // One day.
        let one = stats_body(from, from, Vec::new());
        assert_eq!(one["days"].as_array().unwrap().len(), 1);
        assert_eq!(one["totals"]["messages"], 0);
    }
}
