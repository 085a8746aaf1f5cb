//! `bench calls`: device-to-device calls under load.
//!
//! Pairs of simulated firmware devices open conversations (callers on one node, callees on
//! the same node or another one of a cluster), are connected through the management API
//! as manager-api connects them (`/api/call/request`, then `/api/call/accept`), and then
//! talk both ways at the firmware's pace for the measured window. Every frame carries its
//! send time, so each receiver measures the device-to-device latency (the sender's send to
//! its own accepted datagram, both sides on this machine's clock). The report gives those
//! percentiles, loss, and the CPU of the gateway processes over the window, per bridged
//! call.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::BodyExt;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::Semaphore;

use super::histogram::{LatencyHistogram, LatencySummary};
use super::procstat::{self, CpuShare};
use crate::simulator::audio::{ServerHello, SimAudio};
use crate::simulator::device::{DeviceCredentials, SimDevice};

/// Opus TOC of the bench's frames (SILK wideband, one 40 ms frame: any valid TOC other
/// than the ringing silence's), then the stamp.
const TOC: u8 = 10 << 3;
/// TOC + send time (unix micros) + the frame's number.
const STAMP_LEN: usize = 1 + 8 + 4;

/// What to run.
#[derive(Debug, Clone)]
pub struct CallsConfig {
    /// Device MQTT listener the callers connect to.
    pub caller_mqtt: SocketAddr,
    /// Device MQTT listener the callees connect to (another node for cross-node calls).
    pub callee_mqtt: SocketAddr,
    /// The management API the calls are made through (any node).
    pub http: SocketAddr,
    /// Signs device passwords and the management token.
    pub signature_key: String,
    pub pairs: u32,
    pub warmup: Duration,
    pub measure: Duration,
    pub frame_ms: u32,
    /// Bytes per frame (at least the stamp, 13).
    pub frame_bytes: usize,
    /// Gateway processes to measure (CPU over the window).
    pub pids: Vec<u32>,
    pub first_device: u32,
}

/// What a run measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CallsReport {
    pub pairs: u32,
    /// Pairs whose call was bridged.
    pub bridged: u32,
    pub frames_sent: u64,
    pub frames_received: u64,
    pub loss_percent: f64,
    /// Downlink datagrams the firmware's checks would drop.
    pub rejected: u64,
    /// Device to device, in the measured window.
    pub latency: LatencySummary,
    /// Per gateway process: pid and CPU over the window (percent of one core).
    pub cpu: Vec<(u32, CpuShare)>,
    /// All measured processes' CPU per bridged call, percent of one core.
    pub cpu_per_call_percent: f64,
    pub errors: Vec<String>,
}

impl std::fmt::Display for CallsReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "calls:        {} of {} pairs bridged",
            self.bridged, self.pairs
        )?;
        writeln!(
            f,
            "frames:       {} sent, {} received ({:.3}% lost), {} rejected by firmware checks",
            self.frames_sent, self.frames_received, self.loss_percent, self.rejected
        )?;
        writeln!(f, "latency:      {} (device to device)", self.latency)?;
        for (pid, cpu) in &self.cpu {
            writeln!(
                f,
                "gateway {pid}: {:.1}% of a core (user {:.1} + kernel {:.1})",
                cpu.total_percent, cpu.user_percent, cpu.system_percent
            )?;
        }
        write!(
            f,
            "per call:     {:.3}% of a core per bridged call (both directions)",
            self.cpu_per_call_percent
        )?;
        if let Some(first) = self.errors.first() {
            write!(f, "\nerrors:       {} (first: {first})", self.errors.len())?;
        }
        Ok(())
    }
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// A frame stamped with its send time and number.
fn stamped(frame: &mut [u8], n: u32) {
    frame[0] = TOC;
    frame[1..9].copy_from_slice(&now_micros().to_be_bytes());
    frame[9..13].copy_from_slice(&n.to_be_bytes());
}

fn stamp_of(opus: &[u8]) -> Option<u64> {
    (opus.len() >= STAMP_LEN && opus[0] == TOC)
        .then(|| u64::from_be_bytes(opus[1..9].try_into().unwrap_or_default()))
}

/// POSTs JSON with the management token; the status and the JSON answer.
pub async fn post_json(
    addr: SocketAddr,
    path: &str,
    token: &str,
    body: &Value,
) -> Result<(u16, Value), String> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    let request = hyper::Request::post(path)
        .header(hyper::header::HOST, addr.to_string())
        .header(hyper::header::AUTHORIZATION, format!("Bearer {token}"))
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(http_body_util::Full::new(Bytes::from(body.to_string())))
        .map_err(|e| e.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let bytes = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Ok((status, value))
}

/// One device of a pair, connected and with its audio channel open.
struct Party {
    device: SimDevice,
    audio: SimAudio,
}

async fn open_party(mqtt: SocketAddr, n: u32, key: &str) -> Result<Party, String> {
    let creds = DeviceCredentials::for_mac(
        DeviceCredentials::nth_mac(n),
        "GID_bench",
        Some(key.as_bytes()),
    );
    let mut device = SimDevice::connect(mqtt, creds)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    device
        .publish_json(&device.hello())
        .await
        .map_err(|e| e.to_string())?;
    let hello = device
        .recv_type("hello", Duration::from_secs(10))
        .await
        .map_err(|e| format!("hello: {e}"))?;
    if let Some(why) = device.violations().first() {
        return Err(format!("firmware 2.4 would ignore the hello: {why}"));
    }
    let hello = ServerHello::parse(&hello).map_err(|e| e.to_string())?;
    let audio = SimAudio::open(&hello, ([127, 0, 0, 1], 0).into())
        .await
        .map_err(|e| e.to_string())?;
    Ok(Party { device, audio })
}

/// What one talking device counted.
#[derive(Default)]
struct Tally {
    sent: u64,
    received: u64,
    rejected: u64,
    latency: LatencyHistogram,
}

/// One device talks until `until`, counting what it receives from `measure_from` on.
async fn talk(
    party: &mut Party,
    frame_ms: u32,
    frame_bytes: usize,
    measure_from: tokio::time::Instant,
    until: tokio::time::Instant,
) -> Tally {
    let mut tally = Tally::default();
    let mut frame = vec![0x5au8; frame_bytes.max(STAMP_LEN)];
    let mut tick = tokio::time::interval(Duration::from_millis(u64::from(frame_ms)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut n = 0u32;
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(until) => break,
            _ = tick.tick() => {
                stamped(&mut frame, n);
                if party.audio.send(n * frame_ms, &frame).await.is_err() {
                    break;
                }
                if tokio::time::Instant::now() >= measure_from {
                    tally.sent += 1;
                }
                n += 1;
            }
            got = party.audio.recv(Duration::from_secs(3600)) => {
                let Ok(Some(frame)) = got else { continue };
                if tokio::time::Instant::now() < measure_from {
                    continue;
                }
                if let Some(stamp) = stamp_of(&frame.opus) {
                    tally.received += 1;
                    tally.latency.record_micros(now_micros().saturating_sub(stamp));
                }
            }
        }
    }
    tally.rejected = party.audio.rejected;
    tally
}

/// Runs the bench.
pub async fn run(config: CallsConfig) -> CallsReport {
    let config = Arc::new(config);
    let token = xiaozhi_gateway::http::management::daily_token(
        time::OffsetDateTime::now_utc().date(),
        &config.signature_key,
    );
    let mut report = CallsReport {
        pairs: config.pairs,
        ..CallsReport::default()
    };
    // Connect and call, a bounded number of pairs at a time.
    let setup = Arc::new(Semaphore::new(32));
    let mut tasks = Vec::new();
    for i in 0..config.pairs {
        let config = config.clone();
        let setup = setup.clone();
        let token = token.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = setup.acquire().await.map_err(|e| e.to_string())?;
            let n = config.first_device + 2 * i;
            let caller = open_party(config.caller_mqtt, n, &config.signature_key).await?;
            let callee = open_party(config.callee_mqtt, n + 1, &config.signature_key).await?;
            let (a, b) = (caller.device.credentials.mac, callee.device.credentials.mac);
            let body = json!({"caller_mac": a.colon(), "target_mac": b.colon(), "caller_nickname": "bench"});
            let (status, answer) = post_json(config.http, "/api/call/request", &token, &body).await?;
            if status != 200 || answer["status"] != "pending" {
                return Err(format!("request {a} -> {b}: HTTP {status} {answer}"));
            }
            let (status, answer) =
                post_json(config.http, "/api/call/accept", &token, &json!({"mac": b.colon()}))
                    .await?;
            if status != 200 || answer["status"] != "bridged" {
                return Err(format!("accept {b}: HTTP {status} {answer}"));
            }
            Ok::<_, String>((caller, callee))
        }));
    }
    let mut pairs = Vec::new();
    for task in tasks {
        match task.await {
            Ok(Ok(pair)) => pairs.push(pair),
            Ok(Err(e)) => report.errors.push(e),
            Err(e) => report.errors.push(e.to_string()),
        }
    }
    report.bridged = pairs.len() as u32;
    if pairs.is_empty() {
        return report;
    }
    // Everyone talks; the measured window follows the warm-up.
    let start = tokio::time::Instant::now();
    let measure_from = start + config.warmup;
    let until = measure_from + config.measure;
    let tallies = Arc::new(Mutex::new(Vec::new()));
    let mut talkers = Vec::new();
    for (caller, callee) in pairs {
        for mut party in [caller, callee] {
            let config = config.clone();
            let tallies = tallies.clone();
            talkers.push(tokio::spawn(async move {
                let tally = talk(
                    &mut party,
                    config.frame_ms,
                    config.frame_bytes,
                    measure_from,
                    until,
                )
                .await;
                tallies
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(tally);
                party
            }));
        }
    }
    // The CPU window is the measured one.
    tokio::time::sleep_until(measure_from).await;
    let before: Vec<_> = config
        .pids
        .iter()
        .map(|pid| (*pid, procstat::sample(Some(*pid)).ok()))
        .collect();
    tokio::time::sleep_until(until).await;
    for (pid, first) in before {
        if let (Some(a), Ok(b)) = (first, procstat::sample(Some(pid))) {
            report.cpu.push((pid, procstat::cpu_between(&a, &b)));
        }
    }
    let mut parties = Vec::new();
    for t in talkers {
        if let Ok(party) = t.await {
            parties.push(party);
        }
    }
    let mut latency = LatencyHistogram::new();
    for tally in tallies
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
    {
        report.frames_sent += tally.sent;
        report.frames_received += tally.received;
        report.rejected += tally.rejected;
        latency.merge(&tally.latency);
    }
    report.latency = latency.summary();
    report.loss_percent = if report.frames_sent == 0 {
        0.0
    } else {
        report.frames_sent.saturating_sub(report.frames_received) as f64 * 100.0
            / report.frames_sent as f64
    };
    let total: f64 = report.cpu.iter().map(|(_, c)| c.total_percent).sum();
    report.cpu_per_call_percent = total / f64::from(report.bridged.max(1));
    for party in parties {
        party.device.disconnect().await;
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_carry_their_send_time() {
        let mut frame = vec![0u8; 40];
        let before = now_micros();
        stamped(&mut frame, 7);
        let stamp = stamp_of(&frame).unwrap();
        assert!(stamp >= before && stamp <= now_micros());
        assert_eq!(u32::from_be_bytes(frame[9..13].try_into().unwrap()), 7);
        assert_eq!(stamp_of(&[TOC, 1, 2]), None);
        assert_eq!(
            stamp_of(xiaozhi_gateway::session::call_leg::SILENCE_FRAME),
            None
        );
    }
}
