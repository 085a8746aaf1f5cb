//! The one writer of this node's presence.
//!
//! Transitions arrive from the session layer ([`PresenceTracker::update`]) and must never
//! wait on Redis, so they go into a *coalescing* table: one pending record per device,
//! the latest winning. A single task drains it in batches (one round trip each), so
//! memory is bounded by the number of devices however long the store is away, and no
//! state is lost: after an outage the device's latest state is what gets written.
//!
//! The same task:
//! * reconciles first (entries this node left behind before a restart turn offline),
//!   before any new record is written;
//! * refreshes the TTLs of this node's connected devices on every heartbeat;
//! * after a failed round trip backs off, counts the error, and once the store answers
//!   again rewrites every connected device (what changed during the outage is already
//!   pending);
//! * updates manager-api's `ai_device.last_connected_at`, at most once per device per
//!   throttle period, in batches.
//!
//! Transitions are also published, retained, on `xiaozhi/devices/<mac_>/presence` the
//! moment they happen (the bus does not depend on the store).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::hints::DeviceHints;
use super::{PresenceRecord, PresenceState, PresenceStore, Ttls};
use crate::broker::bus::Bus;
use crate::history::record::now_ms;
use crate::history::store::Store;
use crate::metrics::Metrics;
use crate::protocol::credentials::DeviceIdentity;
use crate::protocol::topics;

/// Records per store round trip at most.
const BATCH: usize = 500;
/// Longest wait between retries while the store is away.
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// How often `last_connected_at` updates are written.
const TOUCH_EVERY: Duration = Duration::from_secs(2);
/// How long shutdown waits for the final writes.
const FINAL_FLUSH: Duration = Duration::from_secs(3);

/// How the tracker behaves.
#[derive(Debug, Clone)]
pub struct TrackerSettings {
    pub node: String,
    pub ttls: Ttls,
    pub heartbeat: Duration,
    /// Timeout of each store round trip.
    pub timeout: Duration,
    /// `ai_device.last_connected_at` at most this often per device; zero: never.
    pub touch_throttle: Duration,
    /// manager-api's time zone (minutes east of UTC) for `last_connected_at`.
    pub utc_offset_minutes: i32,
}

/// A device's transition, as the session layer reports it.
pub struct Transition<'a> {
    pub identity: &'a DeviceIdentity,
    pub remote: std::net::SocketAddr,
    pub connected_at_ms: i64,
    pub state: PresenceState,
    pub session_id: Option<&'a str>,
    /// The call's other device and whether it is bridged (`InCall` only).
    pub call: Option<(crate::protocol::mac::Mac, bool)>,
}

struct Shared {
    settings: TrackerSettings,
    store: Arc<dyn PresenceStore>,
    hints: Arc<DeviceHints>,
    bus: Option<Bus>,
    metrics: Arc<Metrics>,
    /// Latest unwritten record per device (colon MAC).
    pending: Mutex<HashMap<String, PresenceRecord>>,
    /// This node's connected devices, latest record each (heartbeats and resync).
    connected: Mutex<HashMap<String, PresenceRecord>>,
    /// Devices that connected and wait for `last_connected_at`, with when each was last
    /// written (for the throttle).
    touch: Mutex<TouchState>,
    wake: Notify,
    healthy: AtomicBool,
    /// Whether `ai_device.last_connected_at` is written at all (a database and a
    /// throttle): without one, connects are not even queued.
    touch_enabled: bool,
}

#[derive(Default)]
struct TouchState {
    due: Vec<String>,
    last: HashMap<String, Instant>,
}

/// Handle to the presence writer; cheap to clone.
#[derive(Clone)]
pub struct PresenceTracker {
    shared: Arc<Shared>,
}

/// The writer task, for shutdown.
pub struct TrackerTask {
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl TrackerTask {
    /// Writes what is pending (bounded by a short deadline) and stops.
    pub async fn shutdown(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl PresenceTracker {
    /// Starts the writer task on the current runtime.
    pub fn start(
        settings: TrackerSettings,
        store: Arc<dyn PresenceStore>,
        hints: Arc<DeviceHints>,
        bus: Option<Bus>,
        history: Option<Store>,
        metrics: Arc<Metrics>,
    ) -> (PresenceTracker, TrackerTask) {
        let settings_touch = settings.touch_throttle;
        let shared = Arc::new(Shared {
            settings,
            store,
            hints,
            bus,
            metrics,
            pending: Mutex::new(HashMap::new()),
            connected: Mutex::new(HashMap::new()),
            touch: Mutex::new(TouchState::default()),
            wake: Notify::new(),
            healthy: AtomicBool::new(true),
            touch_enabled: history.is_some() && !settings_touch.is_zero(),
        });
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(shared.clone(), history, stop.clone()));
        (PresenceTracker { shared }, TrackerTask { stop, task })
    }

    /// The store, for readers (admin commands, APIs).
    pub fn store(&self) -> &Arc<dyn PresenceStore> {
        &self.shared.store
    }

    /// This node's id.
    pub fn node(&self) -> &str {
        &self.shared.settings.node
    }

    /// Whether the last store round trip succeeded.
    pub fn healthy(&self) -> bool {
        self.shared.healthy.load(Ordering::Relaxed)
    }

    /// Records waiting to be written.
    pub fn backlog(&self) -> usize {
        lock(&self.shared.pending).len()
    }

    /// This node's latest record for a device it holds, if any (no store round trip).
    pub fn local(&self, mac_address: &str) -> Option<PresenceRecord> {
        lock(&self.shared.connected).get(mac_address).cloned()
    }

    /// A device connected, started or ended a conversation, or went away. Never blocks.
    pub fn update(&self, t: Transition<'_>) {
        let s = &self.shared;
        let now = now_ms();
        let mac_address = t.identity.mac.colon();
        let hint = s.hints.get(&t.identity.mac);
        let session_since_ms = match (t.state, t.session_id) {
            (PresenceState::InSession | PresenceState::InCall, Some(id)) => Some(
                lock(&s.connected)
                    .get(&mac_address)
                    .filter(|r| r.session_id.as_deref() == Some(id))
                    .and_then(|r| r.session_since_ms)
                    .unwrap_or(now),
            ),
            _ => None,
        };
        let record = PresenceRecord {
            mac_address: mac_address.clone(),
            state: t.state,
            node: s.settings.node.clone(),
            client_id: t.identity.client_id.clone(),
            group: t.identity.group.clone(),
            remote: t.remote.to_string(),
            board: hint.board,
            firmware: hint.firmware,
            session_id: session_since_ms.and(t.session_id.map(str::to_owned)),
            session_since_ms,
            call_peer: t.call.map(|(peer, _)| peer.colon()),
            call_bridged: t.call.map(|(_, bridged)| bridged),
            connected_at_ms: t.connected_at_ms,
            last_seen_ms: now,
        };
        if let Some(bus) = &s.bus
            && let Ok(json) = serde_json::to_vec(&record)
        {
            bus.publish_retained(topics::device_presence(&t.identity.mac), Bytes::from(json));
        }
        {
            let mut connected = lock(&s.connected);
            let was_connected = connected.contains_key(&mac_address);
            if record.state.is_connected() {
                connected.insert(mac_address.clone(), record.clone());
            } else {
                connected.remove(&mac_address);
            }
            if record.state == PresenceState::Online && !was_connected && s.touch_enabled {
                lock(&s.touch).due.push(mac_address.clone());
            }
        }
        lock(&s.pending).insert(mac_address, record);
        Metrics::inc(&s.metrics.presence_transitions);
        s.wake.notify_one();
    }
}

async fn run(shared: Arc<Shared>, history: Option<Store>, stop: CancellationToken) {
    let s = &*shared;
    let timeout = s.settings.timeout;
    let mut backoff = Duration::from_millis(250);

    // Reconcile before anything of this run is written, retrying while the store is away.
    loop {
        let result = tokio::time::timeout(
            timeout,
            s.store
                .reconcile(&s.settings.node, now_ms(), s.settings.ttls),
        )
        .await;
        match result {
            Ok(Ok(n)) => {
                if n > 0 {
                    info!(node = %s.settings.node, devices = n, "presence: entries left by this node's previous run marked offline");
                }
                set_healthy(s, true);
                break;
            }
            other => {
                store_failed(s, "reconcile", describe(other.map(|r| r.map(|_| ()))));
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.cancelled() => return,
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }

    let mut heartbeat = tokio::time::interval(s.settings.heartbeat);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    heartbeat.tick().await;
    let mut touch_tick = tokio::time::interval(TOUCH_EVERY);
    touch_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut retry_at: Option<tokio::time::Instant> = None;
    loop {
        let retry = async {
            match retry_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = s.wake.notified(), if retry_at.is_none() => {}
            _ = retry => retry_at = None,
            _ = heartbeat.tick() => {
                if retry_at.is_none() && !send_heartbeat(s).await {
                    retry_at = Some(tokio::time::Instant::now() + backoff);
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
            _ = touch_tick.tick() => {
                if let Some(store) = &history {
                    touch_last_connected(s, store).await;
                }
            }
        }
        if retry_at.is_some() {
            continue;
        }
        let was_healthy = s.healthy.load(Ordering::Relaxed);
        if flush(s).await {
            if !was_healthy {
                resync(s);
                if !flush(s).await {
                    retry_at = Some(tokio::time::Instant::now() + backoff);
                    continue;
                }
            }
            backoff = Duration::from_millis(250);
        } else {
            retry_at = Some(tokio::time::Instant::now() + backoff);
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    // Shutdown: the devices' offline records are pending; write them if the store lets.
    let deadline = tokio::time::Instant::now() + FINAL_FLUSH;
    while !lock(&s.pending).is_empty() && tokio::time::Instant::now() < deadline {
        if !flush(s).await {
            break;
        }
    }
    if let Some(store) = &history {
        touch_last_connected(s, store).await;
    }
}

fn describe(
    result: Result<Result<(), super::PresenceError>, tokio::time::error::Elapsed>,
) -> String {
    match result {
        Ok(Ok(())) => "ok".into(),
        Ok(Err(e)) => e.to_string(),
        Err(_) => "timed out".into(),
    }
}

fn set_healthy(s: &Shared, healthy: bool) {
    let was = s.healthy.swap(healthy, Ordering::Relaxed);
    if healthy && !was {
        info!(backend = s.store.backend(), "presence store answers again");
    }
}

fn store_failed(s: &Shared, what: &str, why: String) {
    Metrics::inc(&s.metrics.presence_errors);
    let was = s.healthy.swap(false, Ordering::Relaxed);
    if was {
        warn!(backend = s.store.backend(), operation = what, error = %why, "presence store failed; devices keep working, state is kept and written when it returns");
    }
}

/// Writes everything pending in batches; false if a round trip failed (the records are
/// put back unless a newer one arrived meanwhile).
async fn flush(s: &Shared) -> bool {
    loop {
        let batch: Vec<PresenceRecord> = {
            let mut pending = lock(&s.pending);
            if pending.is_empty() {
                return true;
            }
            let keys: Vec<String> = pending.keys().take(BATCH).cloned().collect();
            keys.iter().filter_map(|k| pending.remove(k)).collect()
        };
        let result =
            tokio::time::timeout(s.settings.timeout, s.store.write(&batch, s.settings.ttls)).await;
        match result {
            Ok(Ok(())) => {
                Metrics::add(&s.metrics.presence_writes, batch.len() as u64);
                set_healthy(s, true);
            }
            other => {
                store_failed(s, "write", describe(other));
                let mut pending = lock(&s.pending);
                for record in batch {
                    pending.entry(record.mac_address.clone()).or_insert(record);
                }
                return false;
            }
        }
    }
}

/// After an outage: every connected device is rewritten (TTLs may have run out).
fn resync(s: &Shared) {
    let connected: Vec<PresenceRecord> = lock(&s.connected).values().cloned().collect();
    let n = connected.len();
    let mut pending = lock(&s.pending);
    for record in connected {
        pending.entry(record.mac_address.clone()).or_insert(record);
    }
    info!(
        devices = n,
        "presence: rewriting this node's devices after the store came back"
    );
}

async fn send_heartbeat(s: &Shared) -> bool {
    let now = now_ms();
    let macs: Vec<String> = {
        let mut connected = lock(&s.connected);
        for record in connected.values_mut() {
            record.last_seen_ms = now;
        }
        connected.keys().cloned().collect()
    };
    for chunk in macs.chunks(BATCH * 4) {
        let result = tokio::time::timeout(
            s.settings.timeout,
            s.store
                .heartbeat(&s.settings.node, chunk, now, s.settings.ttls),
        )
        .await;
        match result {
            Ok(Ok(())) => set_healthy(s, true),
            other => {
                store_failed(s, "heartbeat", describe(other));
                return false;
            }
        }
    }
    Metrics::inc(&s.metrics.presence_heartbeats);
    true
}

async fn touch_last_connected(s: &Shared, store: &Store) {
    let throttle = s.settings.touch_throttle;
    let due: Vec<String> = {
        let mut touch = lock(&s.touch);
        let now = Instant::now();
        let due = std::mem::take(&mut touch.due);
        touch
            .last
            .retain(|_, at| now.duration_since(*at) < throttle);
        let mut fresh = Vec::with_capacity(due.len());
        for mac in due {
            if !touch.last.contains_key(&mac) {
                touch.last.insert(mac.clone(), now);
                fresh.push(mac);
            }
        }
        fresh
    };
    if due.is_empty() {
        return;
    }
    let at = crate::history::writer::format_time(now_ms(), s.settings.utc_offset_minutes);
    match tokio::time::timeout(
        Duration::from_secs(5),
        store.touch_last_connected(&due, &at),
    )
    .await
    {
        Ok(Ok(n)) => Metrics::add(&s.metrics.presence_last_connected_updates, n),
        Ok(Err(e)) => {
            Metrics::inc(&s.metrics.presence_last_connected_errors);
            warn!(error = %e, devices = due.len(), "could not update ai_device.last_connected_at");
        }
        Err(_) => {
            Metrics::inc(&s.metrics.presence_last_connected_errors);
            warn!(
                devices = due.len(),
                "updating ai_device.last_connected_at timed out"
            );
        }
    }
}
