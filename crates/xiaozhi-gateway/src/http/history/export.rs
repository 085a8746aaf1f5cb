//! `GET /api/history/export`: every stored message as CSV or JSON lines, streamed a page
//! at a time so an export of any size holds one page in memory.

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use time::Date;
use tracing::{info, warn};

use super::EXPORT_PAGE;
use super::errors::{ApiError, ApiResult};
use super::params::{Params, day_end, day_start, format_date, store};
use crate::history::query::{self, ExportFilter, Message};
use crate::history::store::{Store, StoreError};
use crate::http::HttpState;
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum ExportFormat {
    Csv,
    Jsonl,
}

/// The CSV columns, in order.
pub const CSV_HEADER: &str =
    "id,mac_address,agent_id,session_id,chat_type,content,audio_id,created_at\r\n";

/// One CSV field (RFC 4180): quoted when it holds a comma, quote or line break.
pub(super) fn csv_field(out: &mut String, value: &str) {
    if value.contains([',', '"', '\r', '\n']) {
        out.push('"');
        for c in value.chars() {
            if c == '"' {
                out.push('"');
            }
            out.push(c);
        }
        out.push('"');
    } else {
        out.push_str(value);
    }
}

pub(super) fn csv_row(out: &mut String, m: &Message) {
    use std::fmt::Write;
    let _ = write!(out, "{}", m.id);
    for field in [m.mac_address.as_deref(), m.agent_id.as_deref()] {
        out.push(',');
        csv_field(out, field.unwrap_or_default());
    }
    out.push(',');
    csv_field(out, m.session_id.as_deref().unwrap_or_default());
    out.push(',');
    if let Some(t) = m.chat_type {
        let _ = write!(out, "{t}");
    }
    out.push(',');
    csv_field(out, m.content.as_deref().unwrap_or_default());
    out.push(',');
    csv_field(out, m.audio_id.as_deref().unwrap_or_default());
    out.push(',');
    csv_field(out, &m.created_at);
    out.push_str("\r\n");
}

pub(super) fn render_page(format: ExportFormat, rows: &[Message]) -> Bytes {
    let mut out = String::with_capacity(rows.len() * 128);
    for m in rows {
        match format {
            ExportFormat::Csv => csv_row(&mut out, m),
            ExportFormat::Jsonl => {
                if let Ok(line) = serde_json::to_string(m) {
                    out.push_str(&line);
                    out.push('\n');
                }
            }
        }
    }
    Bytes::from(out)
}

/// An export's format, MAC (colon form) and days, checked.
pub(super) type ExportParams = (ExportFormat, Option<String>, Option<Date>, Option<Date>);

pub(super) fn export_params(params: &Params) -> ApiResult<ExportParams> {
    let format = match params.get("format").unwrap_or("csv") {
        "csv" | "" => ExportFormat::Csv,
        "jsonl" | "ndjson" => ExportFormat::Jsonl,
        _ => return Err(ApiError::bad("format must be csv or jsonl")),
    };
    let mac = params.mac()?;
    let (from, to) = (params.date("from")?, params.date("to")?);
    if let (Some(f), Some(t)) = (from, to)
        && f > t
    {
        return Err(ApiError::bad("from is after to"));
    }
    Ok((format, mac, from, to))
}

/// An export's content type and `Content-Disposition` (the file name says what it holds).
pub(super) fn export_headers(
    format: ExportFormat,
    mac: Option<&str>,
    from: Option<Date>,
    to: Option<Date>,
) -> (&'static str, String) {
    let mut name = String::from("chat-history");
    if let Some(mac) = mac {
        name.push('-');
        name.push_str(&mac.replace(':', ""));
    }
    if let Some(f) = from {
        name.push_str(&format!("-from-{}", format_date(f)));
    }
    if let Some(t) = to {
        name.push_str(&format!("-to-{}", format_date(t)));
    }
    let (content_type, ext) = match format {
        ExportFormat::Csv => ("text/csv; charset=utf-8", "csv"),
        ExportFormat::Jsonl => ("application/x-ndjson", "jsonl"),
    };
    (
        content_type,
        format!("attachment; filename=\"{name}.{ext}\""),
    )
}

/// Where a streaming export has got to.
pub(super) struct ExportState {
    store: Store,
    filter: ExportFilter,
    format: ExportFormat,
    max_id: i64,
    after_id: i64,
    header: bool,
    done: bool,
    rows: u64,
}

/// `GET /api/history/export?format=csv|jsonl&mac=&from=&to=`: every message that existed
/// when the request came, in id order, fetched and sent `EXPORT_PAGE` rows at a time.
pub(in crate::http) async fn export(
    State(state): State<HttpState>,
    params: Params,
) -> ApiResult<Response> {
    let (format, mac, from, to) = export_params(&params)?;
    let store = store(&state)?.clone();
    let max_id = query::max_id(&store).await?;
    let filter = ExportFilter {
        mac_address: mac.clone(),
        from: from.map_or_else(|| query::TIME_MIN.to_owned(), day_start),
        until: to.map_or_else(|| query::TIME_MAX.to_owned(), day_end),
    };
    let (content_type, disposition) = export_headers(format, mac.as_deref(), from, to);
    let start = ExportState {
        store,
        filter,
        format,
        max_id,
        after_id: 0,
        header: format == ExportFormat::Csv,
        done: false,
        rows: 0,
    };
    let started = std::time::Instant::now();
    let stream = futures_util::stream::unfold(start, move |mut s| async move {
        if s.done {
            return None;
        }
        if s.header {
            s.header = false;
            return Some((Ok(Bytes::from_static(CSV_HEADER.as_bytes())), s));
        }
        match query::export_page(&s.store, &s.filter, s.after_id, s.max_id, EXPORT_PAGE).await {
            Ok(rows) => {
                if (rows.len() as i64) < EXPORT_PAGE {
                    s.done = true;
                    info!(
                        rows = s.rows + rows.len() as u64,
                        ms = started.elapsed().as_millis() as u64,
                        "history export finished"
                    );
                }
                let last = rows.last()?;
                s.after_id = last.id;
                s.rows += rows.len() as u64;
                let chunk = render_page(s.format, &rows);
                Some((Ok(chunk), s))
            }
            Err(e) => {
                // The client sees a truncated body (the connection is cut), never a
                // body that looks complete.
                warn!(error = %e, rows = s.rows, "history export failed mid-stream");
                s.done = true;
                Some((Err::<Bytes, StoreError>(e), s))
            }
        }
    });
    Ok((
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (
                header::CONTENT_DISPOSITION,
                HeaderValue::from_str(&disposition)
                    .unwrap_or_else(|_| HeaderValue::from_static("attachment")),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_fields_are_quoted_when_needed() {
        let mut out = String::new();
        csv_field(&mut out, "plain");
        out.push('|');
        csv_field(&mut out, "a,b");
        out.push('|');
        csv_field(&mut out, "say \"hi\"\nbye");
        assert_eq!(out, "plain|\"a,b\"|\"say \"\"hi\"\"\nbye\"");
    }
}
