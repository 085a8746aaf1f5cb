//! `bench push`: how fast pushes reach idle devices.
//!
//! Simulated firmware devices connect (in a group of their own, so a group push reaches
//! exactly them) and stay idle. Two figures, both through the management API as an
//! operator's tool pushes:
//!
//! * **single**: one `custom` push at a time to one connected idle device, timed from
//!   before the POST to the device reading the message (queue write, claim, send, the
//!   device's MQTT read): the delivery latency an operator sees.
//! * **fleet**: one `custom` push to the whole group, timed from before the POST to each
//!   device's read: how long the fan-out takes, and the rate it reached against
//!   `push.rate_per_sec`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::histogram::{LatencyHistogram, LatencySummary};
use crate::simulator::device::{DeviceCredentials, SimDevice};

/// What to run.
#[derive(Debug, Clone)]
pub struct PushBenchConfig {
    /// The gateway's device MQTT listener.
    pub mqtt: SocketAddr,
    /// The gateway's HTTP listener (the management API).
    pub http: SocketAddr,
    /// Signature key: device passwords and the management token derive from it.
    pub signature_key: String,
    /// Idle devices the fleet push goes to.
    pub devices: u32,
    /// Devices connecting per second.
    pub connect_rate: u32,
    /// Single pushes timed one after the other.
    pub singles: u32,
    /// First device number (for disjoint MACs across runs).
    pub first_device: u32,
    /// The devices' client-id group (the fleet push's target).
    pub group: String,
    /// How long to wait for every device to receive the fleet push.
    pub fleet_timeout: Duration,
}

impl Default for PushBenchConfig {
    fn default() -> Self {
        PushBenchConfig {
            mqtt: ([127, 0, 0, 1], 1883).into(),
            http: ([127, 0, 0, 1], 8080).into(),
            signature_key: String::new(),
            devices: 1000,
            connect_rate: 500,
            singles: 200,
            first_device: 800_000,
            group: "GID_pushbench".into(),
            fleet_timeout: Duration::from_secs(120),
        }
    }
}

/// What a run measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PushReport {
    pub devices: u32,
    pub connected: u32,
    /// One push at a time, POST to the device's read.
    pub single: LatencySummary,
    /// The fleet push: devices it was queued for, and that read it.
    pub fleet_queued: u64,
    pub fleet_received: u64,
    /// The POST's own round trip (resolving the group and queueing every push).
    pub fleet_accept_ms: f64,
    /// POST to the last device's read.
    pub fleet_span_ms: f64,
    /// Devices reached per second over the span.
    pub fleet_per_sec: f64,
    /// POST to each device's read.
    pub fleet_latency: LatencySummary,
    /// Errors (connects, refused pushes, devices that never read their push).
    pub errors: u64,
    pub first_errors: Vec<String>,
}

impl PushReport {
    fn error(&mut self, e: String) {
        self.errors += 1;
        if self.first_errors.len() < 8 {
            self.first_errors.push(e);
        }
    }
}

impl std::fmt::Display for PushReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "devices: {} connected of {}",
            self.connected, self.devices
        )?;
        writeln!(f, "single push, POST to device: {}", self.single)?;
        writeln!(
            f,
            "fleet push: {} queued, {} received; POST answered in {:.1} ms; last device after {:.0} ms ({:.0} devices/s)",
            self.fleet_queued,
            self.fleet_received,
            self.fleet_accept_ms,
            self.fleet_span_ms,
            self.fleet_per_sec
        )?;
        writeln!(f, "fleet push, POST to each device: {}", self.fleet_latency)?;
        write!(f, "errors: {}", self.errors)?;
        for e in &self.first_errors {
            write!(f, "\n  {e}")?;
        }
        Ok(())
    }
}

/// The management token of today (UTC).
fn token(key: &str) -> String {
    xiaozhi_gateway::http::management::daily_token(time::OffsetDateTime::now_utc().date(), key)
}

async fn post_push(config: &PushBenchConfig, body: &Value) -> Result<Value, String> {
    let (status, answer) = super::calls::post_json(
        config.http,
        "/api/push",
        &token(&config.signature_key),
        body,
    )
    .await?;
    if status != 202 {
        return Err(format!("POST /api/push answered {status}: {answer}"));
    }
    Ok(answer)
}

/// Connects the devices at the configured rate.
async fn connect_all(config: &PushBenchConfig, report: &mut PushReport) -> Vec<SimDevice> {
    let mut joins = JoinSet::new();
    let permits = Arc::new(Semaphore::new(256));
    let gap = Duration::from_secs_f64(1.0 / f64::from(config.connect_rate.max(1)));
    let mut next = Instant::now();
    for i in 0..config.devices {
        tokio::time::sleep_until(next).await;
        next += gap;
        let creds = DeviceCredentials::for_mac(
            DeviceCredentials::nth_mac(config.first_device + i),
            &config.group,
            Some(config.signature_key.as_bytes()),
        );
        let mqtt = config.mqtt;
        let permit = permits.clone().acquire_owned().await;
        joins.spawn(async move {
            let _permit = permit;
            (i, SimDevice::connect(mqtt, creds).await)
        });
    }
    let mut devices = Vec::new();
    while let Some(joined) = joins.join_next().await {
        match joined {
            Ok((_, Ok(device))) => devices.push(device),
            Ok((i, Err(e))) => report.error(format!("device {i}: connect: {e}")),
            Err(e) => report.error(format!("connect task: {e}")),
        }
    }
    devices
}

/// Runs the benchmark.
pub async fn run(config: PushBenchConfig) -> PushReport {
    let mut report = PushReport {
        devices: config.devices,
        ..PushReport::default()
    };
    let mut devices = connect_all(&config, &mut report).await;
    report.connected = devices.len() as u32;
    if devices.is_empty() {
        return report;
    }
    // Past the gateway's settle time after connecting.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let mut singles = LatencyHistogram::new();
    for i in 0..config.singles {
        let device = &mut devices[i as usize % report.connected as usize];
        let mac = device.credentials.mac.colon();
        let started = Instant::now();
        let body = json!({"kind": "custom", "to": mac, "payload": {"single": i}});
        if let Err(e) = post_push(&config, &body).await {
            report.error(e);
            continue;
        }
        match device.recv_type("custom", Duration::from_secs(10)).await {
            Ok(_) => singles.record(started.elapsed()),
            Err(e) => report.error(format!("{mac}: single push not read: {e}")),
        }
    }
    report.single = singles.summary();

    let (arrivals_tx, mut arrivals) = mpsc::unbounded_channel();
    let mut readers = JoinSet::new();
    for mut device in devices {
        let tx = arrivals_tx.clone();
        let timeout = config.fleet_timeout;
        readers.spawn(async move {
            let read = device.recv_type("custom", timeout).await;
            let _ = tx.send(read.map(|_| Instant::now()).map_err(|e| e.to_string()));
            device
        });
    }
    drop(arrivals_tx);
    let started = Instant::now();
    let body = json!({"kind": "custom", "group": config.group, "payload": {"fleet": true}});
    match post_push(&config, &body).await {
        Ok(answer) => {
            report.fleet_accept_ms = started.elapsed().as_secs_f64() * 1000.0;
            report.fleet_queued = answer["devices"].as_u64().unwrap_or(0);
        }
        Err(e) => {
            report.error(e);
            readers.abort_all();
            return report;
        }
    }
    let mut latency = LatencyHistogram::new();
    let mut last = started;
    while let Some(arrival) = arrivals.recv().await {
        match arrival {
            Ok(at) => {
                latency.record(at - started);
                last = last.max(at);
                report.fleet_received += 1;
            }
            Err(e) => report.error(format!("fleet push not read: {e}")),
        }
    }
    report.fleet_latency = latency.summary();
    report.fleet_span_ms = (last - started).as_secs_f64() * 1000.0;
    if report.fleet_span_ms > 0.0 {
        report.fleet_per_sec = report.fleet_received as f64 / (report.fleet_span_ms / 1000.0);
    }
    // Disconnect cleanly, so the gateway's presence sees them leave.
    while let Some(joined) = readers.join_next().await {
        if let Ok(device) = joined {
            device.disconnect().await;
        }
    }
    report
}
