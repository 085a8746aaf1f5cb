//! What a request may say, checked before the database is asked: the query string,
//! path parameters, dates, MACs, ids and cursors. Each check is a plain function, so the
//! fuzz target ([`super::fuzz_input`]) runs the very same ones.

use std::collections::HashMap;

use axum::extract::{FromRequestParts, Path, Query};
use axum::http::Uri;
use axum::http::request::Parts;
use time::{Date, Month};

use super::errors::{ApiError, ApiResult};
use super::{DEFAULT_LIMIT, MAX_AUDIO_ID, MAX_LIMIT, MAX_SEARCH_TERM, MAX_SESSION_ID};
use crate::history::query::{self, SessionCursor};
use crate::history::store::Store;
use crate::http::HttpState;
use crate::protocol::mac::Mac;

/// The query string as a map; a malformed one is a 400.
pub(in crate::http) struct Params(pub(in crate::http) HashMap<String, String>);

impl<S: Send + Sync> FromRequestParts<S> for Params {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Params::from_uri(&parts.uri)
    }
}

impl Params {
    /// The query string of `uri`, as axum's `Query` extractor reads it.
    pub(super) fn from_uri(uri: &Uri) -> ApiResult<Params> {
        Query::<HashMap<String, String>>::try_from_uri(uri)
            .map(|Query(q)| Params(q))
            .map_err(|_| ApiError::bad("the query string is not valid"))
    }

    pub(super) fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    /// An integer parameter within `min..=max`, or `default` when absent.
    pub(super) fn int(&self, name: &str, default: i64, min: i64, max: i64) -> ApiResult<i64> {
        match self.get(name) {
            None | Some("") => Ok(default),
            Some(v) => match v.parse::<i64>() {
                Ok(n) if (min..=max).contains(&n) => Ok(n),
                _ => Err(ApiError::bad(format!(
                    "{name} must be an integer from {min} to {max}"
                ))),
            },
        }
    }

    pub(super) fn limit(&self) -> ApiResult<i64> {
        self.int("limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
    }

    pub(super) fn after_id(&self) -> ApiResult<i64> {
        self.int("after_id", 0, 0, i64::MAX)
    }

    pub(super) fn date(&self, name: &str) -> ApiResult<Option<Date>> {
        match self.get(name) {
            None | Some("") => Ok(None),
            Some(v) => parse_date(v)
                .map(Some)
                .ok_or_else(|| ApiError::bad(format!("{name} must be a date, YYYY-MM-DD"))),
        }
    }

    pub(super) fn mac(&self) -> ApiResult<Option<String>> {
        match self.get("mac") {
            None | Some("") => Ok(None),
            Some(v) => parse_mac(v).map(Some),
        }
    }
}

/// A single path parameter; one that does not decode is a 400.
pub(super) struct PathParam(pub(super) String);

impl<S: Send + Sync> FromRequestParts<S> for PathParam {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Path::<String>::from_request_parts(parts, state)
            .await
            .map(|Path(p)| PathParam(p))
            .map_err(|_| ApiError::bad("the path is not valid"))
    }
}

/// `YYYY-MM-DD`, exactly.
pub fn parse_date(s: &str) -> Option<Date> {
    let b = s.as_bytes();
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let digits = |r: std::ops::Range<usize>| -> Option<u32> {
        let part = &s[r];
        part.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| part.parse().ok())
            .flatten()
    };
    let (year, month, day) = (digits(0..4)?, digits(5..7)?, digits(8..10)?);
    if year < 1000 {
        return None;
    }
    let month = Month::try_from(u8::try_from(month).ok()?).ok()?;
    Date::from_calendar_date(year as i32, month, u8::try_from(day).ok()?).ok()
}

pub(super) fn format_date(d: Date) -> String {
    format!("{:04}-{:02}-{:02}", d.year(), u8::from(d.month()), d.day())
}

/// The first instant of `d`, as the database compares it.
pub(super) fn day_start(d: Date) -> String {
    format!("{} 00:00:00.000", format_date(d))
}

/// The exclusive upper bound that covers all of `d`.
pub(super) fn day_end(d: Date) -> String {
    d.next_day()
        .map(day_start)
        .unwrap_or_else(|| query::TIME_MAX.to_owned())
}

/// A MAC in either spelling, as stored (colon form).
pub(super) fn parse_mac(s: &str) -> ApiResult<String> {
    s.parse::<Mac>()
        .map(|m| m.colon())
        .map_err(|_| ApiError::bad("not a MAC address (aa:bb:cc:dd:ee:ff or aa_bb_cc_dd_ee_ff)"))
}

pub(super) fn check_session_id(s: &str) -> ApiResult<()> {
    let n = s.chars().count();
    if n == 0 || n > MAX_SESSION_ID || s.chars().any(char::is_control) {
        return Err(ApiError::bad(format!(
            "session id must be 1 to {MAX_SESSION_ID} printable characters"
        )));
    }
    Ok(())
}

pub(super) fn check_audio_id(s: &str) -> ApiResult<()> {
    if s.is_empty() || s.len() > MAX_AUDIO_ID || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ApiError::bad(format!(
            "audio id must be 1 to {MAX_AUDIO_ID} hex digits"
        )));
    }
    Ok(())
}

/// The `before` cursor of a sessions page, if any.
pub(super) fn before_cursor(params: &Params) -> ApiResult<Option<SessionCursor>> {
    match params.get("before") {
        None | Some("") => Ok(None),
        Some(token) => SessionCursor::decode(token)
            .map(Some)
            .ok_or_else(|| ApiError::bad("before is not a cursor this API returned (use `next`)")),
    }
}

/// The search term `q`: 1 to [`MAX_SEARCH_TERM`] characters.
pub(super) fn search_term(params: &Params) -> ApiResult<&str> {
    let q = params.get("q").unwrap_or_default();
    let n = q.chars().count();
    if n == 0 || n > MAX_SEARCH_TERM {
        return Err(ApiError::bad(format!(
            "q must be 1 to {MAX_SEARCH_TERM} characters"
        )));
    }
    Ok(q)
}

pub(super) fn store(state: &HttpState) -> ApiResult<&Store> {
    // The routes exist only with a store; this is belt and braces.
    state
        .history
        .as_ref()
        .ok_or(ApiError::NotFound("chat history is off"))
}

/// `limit + 1` rows were asked for: trims to `limit` and says whether there were more.
pub(super) fn trim_page<T>(mut rows: Vec<T>, limit: i64) -> (Vec<T>, bool) {
    let more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    (rows, more)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_parse_strictly() {
        assert_eq!(format_date(parse_date("2025-02-28").unwrap()), "2025-02-28");
        for bad in [
            "",
            "2025-02-30",
            "2025-2-28",
            "2025/02/28",
            "+025-02-28",
            "0999-01-01",
            "2025-02-28 ",
            "' OR 1=1 --",
        ] {
            assert_eq!(parse_date(bad), None, "{bad:?}");
        }
        assert_eq!(
            day_end(parse_date("2024-12-31").unwrap()),
            "2025-01-01 00:00:00.000"
        );
        assert_eq!(day_end(parse_date("9999-12-31").unwrap()), query::TIME_MAX);
    }

    #[test]
    fn ids_are_checked() {
        assert!(check_audio_id(&"ab".repeat(16)).is_ok());
        assert!(check_audio_id(&"ab".repeat(17)).is_err());
        assert!(check_audio_id("' OR 1=1 --").is_err());
        assert!(check_session_id(&"é".repeat(64)).is_ok());
        assert!(check_session_id(&"x".repeat(65)).is_err());
        assert!(check_session_id("a\nb").is_err());
    }
}
