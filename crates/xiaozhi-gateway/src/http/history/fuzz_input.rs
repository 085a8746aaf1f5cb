//! The history endpoints' input checks without a server, for the `history_query` fuzz
//! target and its regression tests (docs/fuzzing.md); the service itself never calls it.

use axum::http::Uri;
use serde_json::{Value, json};
use time::Date;

use super::endpoints::{stats_body, stats_range};
use super::errors::{ApiError, ApiResult};
use super::export::{export_headers, export_params};
use super::params::{
    Params, before_cursor, check_audio_id, check_session_id, day_end, day_start, parse_mac,
    search_term,
};
use super::{DEFAULT_TOP, MAX_TOP};
use crate::history::query;

/// The history endpoints, for [`check_input`].
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Devices,
    Sessions,
    Messages,
    Audio,
    DeviceStats,
    FleetStats,
    Search,
    Export,
    DeviceView,
}

impl Endpoint {
    #[doc(hidden)]
    pub const ALL: [Endpoint; 9] = [
        Endpoint::Devices,
        Endpoint::Sessions,
        Endpoint::Messages,
        Endpoint::Audio,
        Endpoint::DeviceStats,
        Endpoint::FleetStats,
        Endpoint::Search,
        Endpoint::Export,
        Endpoint::DeviceView,
    ];
}

/// Runs the checks `endpoint`'s handler makes of its path parameter and of the query
/// string of `uri` before it touches the database, with the same functions, and `today`
/// for the clock. `Ok` holds what the handler would go on with (as JSON, for the fuzz
/// target's bounds checks); `Err` the 400 message the client would get.
///
/// For the `history_query` fuzz target and its regression tests (docs/fuzzing.md); the
/// service itself never calls it.
#[doc(hidden)]
pub fn check_input(
    endpoint: Endpoint,
    path_param: &str,
    uri: &Uri,
    today: Date,
) -> Result<Value, String> {
    let checked = (|| -> ApiResult<Value> {
        let params = Params::from_uri(uri)?;
        Ok(match endpoint {
            Endpoint::Devices => json!({
                "limit": params.limit()?,
                "offset": params.int("offset", 0, 0, 1_000_000_000)?,
            }),
            Endpoint::Sessions => {
                let mac = parse_mac(path_param)?;
                let limit = params.limit()?;
                let before = before_cursor(&params)?;
                json!({
                    "mac": mac,
                    "limit": limit,
                    "before": before.map(|c| json!([c.started_at, c.session_id])),
                })
            }
            Endpoint::Messages => {
                check_session_id(path_param)?;
                json!({"limit": params.limit()?, "after_id": params.after_id()?})
            }
            Endpoint::Audio => {
                check_audio_id(path_param)?;
                json!({})
            }
            Endpoint::DeviceStats | Endpoint::FleetStats => {
                if endpoint == Endpoint::DeviceStats {
                    parse_mac(path_param)?;
                }
                let (from, to) = stats_range(&params, today)?;
                let top = match endpoint {
                    Endpoint::FleetStats => Some(params.int("top", DEFAULT_TOP, 1, MAX_TOP)?),
                    _ => None,
                };
                let mut body = stats_body(from, to, Vec::new());
                body["start"] = json!(day_start(from));
                body["end"] = json!(day_end(to));
                body["top"] = json!(top);
                body
            }
            Endpoint::Search => {
                let q = search_term(&params)?;
                json!({
                    "q": q,
                    "mac": params.mac()?,
                    "limit": params.limit()?,
                    "after_id": params.after_id()?,
                })
            }
            Endpoint::Export => {
                let (format, mac, from, to) = export_params(&params)?;
                let (content_type, disposition) = export_headers(format, mac.as_deref(), from, to);
                json!({
                    "content_type": content_type,
                    "disposition": disposition,
                    "from": from.map_or_else(|| query::TIME_MIN.to_owned(), day_start),
                    "until": to.map_or_else(|| query::TIME_MAX.to_owned(), day_end),
                })
            }
            Endpoint::DeviceView => match crate::http::management::mac_of_client_id(path_param) {
                Some(mac) => json!({"mac": mac.colon()}),
                None => return Err(ApiError::bad("not a device id")),
            },
        })
    })();
    checked.map_err(|e| match e {
        ApiError::BadRequest(m) => m,
        other => format!("{other:?}"),
    })
}
