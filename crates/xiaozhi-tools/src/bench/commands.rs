//! `bench commands`: admin command round trips through the bus, the way an operator's
//! tool or manager-api's MCP calls see them.
//!
//! Simulated devices (which answer MCP like the firmware) connect to one or more
//! gateway nodes; one admin client on the broker (the embedded broker listener, or the
//! external broker of a scale-out cluster) sends `mcp tools/list` (or `status`) to them,
//! `--concurrency` at a time, and the round trips are reported as percentiles, split by
//! whether the node that received the command ran it or forwarded it to the device's
//! node (the reply's `via`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{Value, json};

use super::histogram::{LatencyHistogram, LatencySummary};
use crate::simulator::device::{DeviceCredentials, SimDevice};
use xiaozhi_gateway::admin::client::AdminClient;
use xiaozhi_gateway::protocol::mac::Mac;

/// What to measure.
#[derive(Debug, Clone)]
pub struct CommandsConfig {
    /// The broker admin clients use (`host`, `port`).
    pub broker: (String, u16),
    pub username: String,
    pub password: String,
    /// Device MQTT listeners of the nodes; devices are spread over them in turn.
    pub nodes: Vec<SocketAddr>,
    pub signature_key: Option<String>,
    pub devices: u32,
    pub commands: u32,
    pub concurrency: usize,
    /// `mcp` (a `tools/list` the device answers) or `status`.
    pub kind: String,
    pub first_device: u32,
    pub timeout: Duration,
}

/// The measured round trips.
#[derive(Debug, Clone, Serialize)]
pub struct CommandsReport {
    pub kind: String,
    pub nodes: usize,
    pub devices: u32,
    pub concurrency: usize,
    pub ok: u64,
    pub failed: u64,
    /// Commands per second over the measured run.
    pub rate: f64,
    pub all: LatencySummary,
    /// Run by the node that received them.
    pub direct: LatencySummary,
    /// Forwarded by the receiving node to the device's node.
    pub forwarded: LatencySummary,
}

impl std::fmt::Display for CommandsReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{} commands to {} devices on {} node(s), {} at a time: {} ok, {} failed, {:.0}/s",
            self.kind, self.devices, self.nodes, self.concurrency, self.ok, self.failed, self.rate
        )?;
        writeln!(f, "  all:       {}", self.all)?;
        writeln!(f, "  direct:    {}", self.direct)?;
        write!(f, "  forwarded: {}", self.forwarded)
    }
}

/// Why the benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum CommandsError {
    #[error("device {mac} cannot connect to {node}: {reason}")]
    Device {
        mac: Mac,
        node: SocketAddr,
        reason: String,
    },
    #[error("admin client: {0}")]
    Admin(#[from] xiaozhi_gateway::admin::client::ClientError),
    #[error("the devices did not all answer commands within {0:?} (is admin.enabled on?)")]
    NotReady(Duration),
}

/// Connects the devices, waits until every one answers, then measures.
pub async fn run(config: CommandsConfig) -> Result<CommandsReport, CommandsError> {
    let key = config.signature_key.as_deref().map(str::as_bytes);
    let mut devices = Vec::new();
    let mut macs = Vec::new();
    for i in 0..config.devices {
        let mac = DeviceCredentials::nth_mac(config.first_device + i);
        let node = config.nodes[i as usize % config.nodes.len()];
        let creds = DeviceCredentials::for_mac(mac, "GID_bench", key);
        let dev = SimDevice::connect(node, creds)
            .await
            .map_err(|e| CommandsError::Device {
                mac,
                node,
                reason: e.to_string(),
            })?;
        devices.push(dev);
        macs.push(mac);
    }
    let (host, port) = &config.broker;
    let admin = Arc::new(
        AdminClient::connect(
            host,
            *port,
            &config.username,
            &config.password,
            config.timeout,
        )
        .await?,
    );
    let command = match config.kind.as_str() {
        "status" => json!({"command": "status"}),
        _ => json!({"command": "mcp", "payload": {"method": "tools/list"}}),
    };
    // Ready when every device answers (presence written, subscriptions in place).
    let ready_by = Instant::now() + config.timeout;
    for mac in &macs {
        loop {
            let reply = admin
                .request(Some(mac), command.clone(), Duration::from_secs(1))
                .await;
            if reply.is_ok_and(|r| r["ok"] == true) {
                break;
            }
            if Instant::now() > ready_by {
                return Err(CommandsError::NotReady(config.timeout));
            }
        }
    }

    let started = Instant::now();
    let per_worker = config.commands.div_ceil(config.concurrency.max(1) as u32);
    let mut workers = Vec::new();
    for _ in 0..config.concurrency.max(1) {
        let admin = admin.clone();
        let macs = macs.clone();
        let command = command.clone();
        let timeout = config.timeout;
        workers.push(tokio::spawn(async move {
            let mut tally = Tally::default();
            for _ in 0..per_worker {
                // Random devices: a fixed stride can fall in step with the broker's
                // round robin and land every command on its device's node.
                let mac = &macs[rand::random::<u64>() as usize % macs.len()];
                let sent = Instant::now();
                let reply = admin.request(Some(mac), command.clone(), timeout).await;
                tally.add(reply.ok(), sent.elapsed());
            }
            tally
        }));
    }
    let mut tally = Tally::default();
    for w in workers {
        if let Ok(t) = w.await {
            tally.merge(&t);
        }
    }
    let elapsed = started.elapsed();
    drop(devices);
    if let Ok(admin) = Arc::try_unwrap(admin) {
        admin.disconnect().await;
    }
    Ok(CommandsReport {
        kind: config.kind,
        nodes: config.nodes.len(),
        devices: config.devices,
        concurrency: config.concurrency,
        ok: tally.ok,
        failed: tally.failed,
        rate: (tally.ok + tally.failed) as f64 / elapsed.as_secs_f64().max(1e-9),
        all: tally.all.summary(),
        direct: tally.direct.summary(),
        forwarded: tally.forwarded.summary(),
    })
}

#[derive(Default)]
struct Tally {
    ok: u64,
    failed: u64,
    all: LatencyHistogram,
    direct: LatencyHistogram,
    forwarded: LatencyHistogram,
}

impl Tally {
    fn add(&mut self, reply: Option<Value>, latency: Duration) {
        match reply {
            Some(r) if r["ok"] == true => {
                self.ok += 1;
                self.all.record(latency);
                match r.get("via") {
                    Some(_) => self.forwarded.record(latency),
                    None => self.direct.record(latency),
                }
            }
            _ => self.failed += 1,
        }
    }

    fn merge(&mut self, other: &Tally) {
        self.ok += other.ok;
        self.failed += other.failed;
        self.all.merge(&other.all);
        self.direct.merge(&other.direct);
        self.forwarded.merge(&other.forwarded);
    }
}
