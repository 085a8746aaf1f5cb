//! `GET /api/console/fleet`: every device presence knows, with fleet counts
//! (`docs/console-api.md`). Kept apart from the other console calls because it is the one
//! that reads the whole fleet: its cost grows with the number of devices.

use std::collections::HashMap;

use axum::Json;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use super::HttpState;
use crate::history::record::now_ms;
use crate::presence::PresenceState;
use crate::presence::fleet::FleetQuery;
use crate::protocol::mac::Mac;

use super::console_api::{PRESENCE_TIMEOUT, error};

/// Builds the fleet query from the query string, or says what is wrong.
pub fn fleet_query(params: &HashMap<String, String>) -> Result<FleetQuery, String> {
    let get = |name: &str| {
        params
            .get(name)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    };
    let state = match get("state") {
        None => None,
        Some(s) => Some(
            PresenceState::parse(s)
                .ok_or_else(|| "state must be online, in_session, in_call or offline".to_owned())?,
        ),
    };
    let q = get("q").map(str::to_owned);
    if let Some(q) = &q {
        crate::presence::fleet::check_search(q)?;
    }
    let since_ms = match get("since_ms") {
        None => None,
        Some(v) => Some(
            v.parse::<i64>()
                .ok()
                .filter(|ms| *ms >= 0)
                .ok_or_else(|| "since_ms must be a unix time in milliseconds".to_owned())?,
        ),
    };
    let after = match get("after") {
        None => None,
        Some(v) => Some(
            v.parse::<Mac>()
                .map(|m| m.colon())
                .map_err(|_| "after must be a MAC (the next of the previous page)".to_owned())?,
        ),
    };
    let limit = match get("limit") {
        None => 0,
        Some(v) => v
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=crate::presence::MAX_PAGE).contains(n))
            .ok_or_else(|| format!("limit must be from 1 to {}", crate::presence::MAX_PAGE))?,
    };
    Ok(FleetQuery {
        state,
        q,
        since_ms,
        after,
        limit,
    })
}

pub(super) async fn fleet(
    State(state): State<HttpState>,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    let query = match fleet_query(&params) {
        Ok(q) => q,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let store = state.presence.store();
    match tokio::time::timeout(PRESENCE_TIMEOUT, store.fleet(&query, now_ms())).await {
        Ok(Ok(page)) => {
            // History times carry no zone; the console shows them in the viewer's.
            let mut body = serde_json::to_value(page).unwrap_or_default();
            body["history_utc_offset_minutes"] = state.config.history.utc_offset_minutes.into();
            Json(body).into_response()
        }
        Ok(Err(e)) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("presence store ({}) failed: {e}", store.backend()),
        ),
        Err(_) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "presence store ({}) did not answer in time",
                store.backend()
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn fleet_queries_parse_and_refuse_clearly() {
        let q = fleet_query(&params(&[
            ("state", "offline"),
            ("q", "esp32"),
            ("since_ms", "1764028800000"),
            ("after", "AA_BB_CC_DD_EE_01"),
            ("limit", "50"),
        ]))
        .unwrap();
        assert_eq!(q.state, Some(PresenceState::Offline));
        assert_eq!(q.q.as_deref(), Some("esp32"));
        assert_eq!(q.since_ms, Some(1_764_028_800_000));
        assert_eq!(q.after.as_deref(), Some("aa:bb:cc:dd:ee:01"));
        assert_eq!(q.limit, 50);
        assert_eq!(fleet_query(&params(&[])).unwrap().limit, 0);
        for (k, v, says) in [
            ("state", "asleep", "state"),
            ("since_ms", "-1", "since_ms"),
            ("since_ms", "soon", "since_ms"),
            ("after", "not-a-mac", "after"),
            ("limit", "0", "limit"),
            ("limit", "100000", "limit"),
        ] {
            let e = fleet_query(&params(&[(k, v)])).unwrap_err();
            assert!(e.contains(says), "{k}={v}: {e}");
        }
        let long = "x".repeat(crate::presence::fleet::MAX_SEARCH + 1);
        assert!(fleet_query(&params(&[("q", &long)])).is_err());
    }
}
