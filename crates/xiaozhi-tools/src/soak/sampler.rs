//! What the soak watches in the gateway process: memory from `/proc/<pid>/status`, CPU
//! from `/proc/<pid>/stat` (through [`crate::bench::procstat`]), and the gateway's own
//! gauges from `GET /metrics`.
//!
//! The soak runs the gateway as a child process so these figures are the gateway's
//! alone, not mixed with the simulated fleet's. The scrape is a plain HTTP/1.0 request
//! over a TCP stream: the soak needs a handful of numbers from one loopback endpoint,
//! not an HTTP client.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long one scrape may take.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest exposition accepted.
const MAX_EXPOSITION: usize = 4 << 20;

/// Resident memory now and at its peak, in KiB.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Memory {
    pub rss_kb: u64,
    pub hwm_kb: u64,
}

/// Parses `VmRSS` and `VmHWM` out of `/proc/<pid>/status`.
pub fn parse_status(status: &str) -> Option<Memory> {
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
    };
    Some(Memory {
        rss_kb: field("VmRSS:")?,
        hwm_kb: field("VmHWM:")?,
    })
}

/// Reads the memory of process `pid`.
pub fn memory(pid: u32) -> io::Result<Memory> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    parse_status(&status).ok_or_else(|| io::Error::other("no VmRSS/VmHWM in /proc status"))
}

/// The gateway figures the soak follows, from one scrape.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct GatewayGauges {
    /// Tokio tasks alive in the gateway's runtime.
    pub tasks_alive: u64,
    pub devices_connected: u64,
    pub sessions_live: u64,
    pub history_queue_depth: u64,
    pub history_journal_bytes: u64,
    pub records_stored: u64,
    pub records_journaled: u64,
    pub records_replayed: u64,
    pub records_lost: u64,
    pub write_failures: u64,
    pub upstream_failures: u64,
}

/// Every sample of a Prometheus text exposition, keyed by name and labels exactly as
/// written (`xiaozhi_runtime_tasks{kind="alive"}`). Comments and unparsable lines are
/// skipped.
pub fn parse_exposition(text: &str) -> HashMap<&str, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.trim().rsplit_once(' ')?;
            Some((series.trim(), value.parse::<f64>().ok()?))
        })
        .collect()
}

impl GatewayGauges {
    /// Picks the soak's figures out of an exposition (absent ones read 0).
    pub fn from_exposition(text: &str) -> GatewayGauges {
        let all = parse_exposition(text);
        let get = |k: &str| all.get(k).copied().unwrap_or(0.0).max(0.0) as u64;
        let outcome = |o: &str| get(&format!("xiaozhi_history_records_total{{outcome=\"{o}\"}}"));
        let upstream_failures = all
            .iter()
            .filter(|(k, _)| k.starts_with("xiaozhi_upstream_failures_total"))
            .map(|(_, v)| v.max(0.0) as u64)
            .sum();
        GatewayGauges {
            tasks_alive: get("xiaozhi_runtime_tasks{kind=\"alive\"}"),
            devices_connected: get("xiaozhi_devices_connected"),
            sessions_live: get("xiaozhi_sessions_live"),
            history_queue_depth: get("xiaozhi_history_queue_depth"),
            history_journal_bytes: get("xiaozhi_history_journal_bytes"),
            records_stored: outcome("stored"),
            records_journaled: outcome("journaled"),
            records_replayed: outcome("replayed"),
            records_lost: outcome("lost"),
            write_failures: get("xiaozhi_history_write_failures_total"),
            upstream_failures,
        }
    }
}

/// `GET /metrics` from the gateway's HTTP listener.
pub async fn scrape(http: SocketAddr) -> io::Result<GatewayGauges> {
    let body = tokio::time::timeout(SCRAPE_TIMEOUT, get_metrics(http))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "GET /metrics timed out"))??;
    Ok(GatewayGauges::from_exposition(&body))
}

async fn get_metrics(http: SocketAddr) -> io::Result<String> {
    let mut s = TcpStream::connect(http).await?;
    s.write_all(
        format!("GET /metrics HTTP/1.0\r\nHost: {http}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut raw = Vec::new();
    (&mut s)
        .take(MAX_EXPOSITION as u64)
        .read_to_end(&mut raw)
        .await?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| io::Error::other("no HTTP header in the /metrics answer"))?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        let status = head.lines().next().unwrap_or_default();
        return Err(io::Error::other(format!("GET /metrics: {status}")));
    }
    Ok(body.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_memory_from_proc_status() {
        let status =
            "Name:\txiaozhi-gateway\nVmPeak:\t  900 kB\nVmHWM:\t   61234 kB\nVmRSS:\t   51200 kB\n";
        assert_eq!(
            parse_status(status),
            Some(Memory {
                rss_kb: 51_200,
                hwm_kb: 61_234
            })
        );
        assert_eq!(parse_status("Name: x\n"), None);
        let own = memory(std::process::id()).unwrap();
        assert!(own.rss_kb > 0 && own.hwm_kb >= own.rss_kb);
    }

    #[test]
    fn picks_the_gauges_out_of_an_exposition() {
        let text = "\
# HELP xiaozhi_runtime_tasks Tokio runtime.
# TYPE xiaozhi_runtime_tasks gauge
xiaozhi_runtime_tasks{kind=\"alive\"} 1234
xiaozhi_runtime_tasks{kind=\"workers\"} 2
xiaozhi_devices_connected 660
xiaozhi_sessions_live 310
xiaozhi_history_journal_bytes 4096
xiaozhi_history_records_total{outcome=\"stored\"} 1000
xiaozhi_history_records_total{outcome=\"journaled\"} 20
xiaozhi_history_records_total{outcome=\"replayed\"} 20
xiaozhi_history_records_total{outcome=\"lost\"} 0
xiaozhi_upstream_failures_total{reason=\"refused\"} 3
xiaozhi_upstream_failures_total{reason=\"midway\"} 4
garbage line
";
        let g = GatewayGauges::from_exposition(text);
        assert_eq!(g.tasks_alive, 1234);
        assert_eq!(g.devices_connected, 660);
        assert_eq!(g.sessions_live, 310);
        assert_eq!(g.history_journal_bytes, 4096);
        assert_eq!((g.records_stored, g.records_journaled), (1000, 20));
        assert_eq!(g.upstream_failures, 7);
        assert_eq!(g.history_queue_depth, 0);
    }
}
