//! The delivery task: one per node, sending the queued pushes of the devices this node
//! holds once they are connected and idle.
//!
//! What makes it look at a device: a request queued here or on another node (a batch
//! hint), the device connecting (after `push.settle_ms`) or ending a conversation, and a
//! sweep every `push.sweep_secs` over every device with a push waiting (which also
//! expires pushes past `expires_at` and catches any hint that was lost). A push is sent
//! only after this node claims it in the store, so it is sent once in a cluster.
//!
//! Sending is paced by a token bucket (`push.rate_per_sec`): a push to the whole fleet
//! never crowds out conversations, and registry sends never wait (a full device queue
//! hands the push back for later). A `wake` waits for the device's MCP answer in a task
//! of its own, so a slow device holds up nobody.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{broadcast, mpsc};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::emit;
use super::store::{PushRow, PushStore};
use crate::broker::registry::{DeviceRegistry, SendError};
use crate::config::PushConfig;
use crate::events::EventPublisher;
use crate::history::record::now_ms;
use crate::metrics::Metrics;
use crate::protocol::mac::Mac;
use crate::protocol::push::{self, PushKind, PushState};
use crate::session::directory::DeviceDirectory;

/// Why the delivery task should look at the queue now.
#[derive(Debug, Clone)]
pub enum Hint {
    /// A request was queued (here or on another node).
    Batch(String),
    /// A device may have pushes waiting.
    Device(Mac),
}

/// Hints waiting for the task; beyond this they are dropped (the sweep finds the work).
pub const HINT_QUEUE: usize = 1024;

/// Wakes waiting for their device's answer at once.
const MAX_WAKES_IN_FLIGHT: usize = 64;

/// Pushes read per device per look.
const DUE_PER_DEVICE: u32 = 16;

/// After a conversation ends, the firmware needs a moment to be idle again.
const AFTER_SESSION: Duration = Duration::from_millis(300);

/// A device whose connection queue was full is tried again after this.
const RETRY_BUSY: Duration = Duration::from_secs(1);

/// After a reboot push, the device's other pushes wait for it to come back.
const AFTER_REBOOT: Duration = Duration::from_secs(30);

/// What the delivery task works with.
pub struct Delivery {
    pub store: PushStore,
    pub directory: Arc<DeviceDirectory>,
    pub registry: Arc<DeviceRegistry>,
    pub events: EventPublisher,
    pub metrics: Arc<Metrics>,
    pub settings: PushConfig,
    pub node: String,
}

/// A token bucket: `rate` per second, at most one second's worth saved up.
struct Pace {
    rate: f64,
    tokens: f64,
    at: Instant,
}

impl Pace {
    fn new(rate: u32) -> Self {
        let rate = f64::from(rate.max(1));
        Pace {
            rate,
            tokens: rate,
            at: Instant::now(),
        }
    }

    fn refill(&mut self, now: Instant) {
        let secs = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + secs * self.rate).min(self.rate);
        self.at = now;
    }

    fn take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// When the next token is there.
    fn next_token(&self) -> Instant {
        let missing = (1.0 - self.tokens).max(0.0);
        self.at + Duration::from_secs_f64(missing / self.rate)
    }
}

/// The task's working state.
struct Work {
    /// Devices to look at, and from when.
    pending: HashMap<Mac, Instant>,
    /// Pushes read and waiting for a token, not claimed yet.
    ready: VecDeque<PushRow>,
    /// Ids in `ready` (a push is read at most once until it is sent or dropped).
    in_ready: HashSet<String>,
    /// Devices whose next pushes wait until then: after a notify, its notifies and
    /// wakes (`false`); after a reboot, everything (`true`).
    hold: HashMap<Mac, (Instant, bool)>,
    /// Devices with a wake waiting for its answer.
    waking: HashSet<Mac>,
}

impl Delivery {
    /// Runs until stopped; then waits briefly for wakes in flight.
    /// `remote`: batch ids of requests other nodes queued (scale-out; closed otherwise).
    pub async fn run(
        self,
        mut hints: mpsc::Receiver<Hint>,
        mut remote: mpsc::Receiver<String>,
        stop: CancellationToken,
    ) {
        let node = self.node.clone();
        match self.store.recover(&node, now_ms()).await {
            Ok(0) => {}
            Ok(n) => info!(n, "pushes this node had taken before it stopped wait again"),
            Err(e) => {
                warn!(error = %e, "push store: could not recover pushes taken before a restart")
            }
        }
        let mut presence = self.directory.subscribe_presence();
        let mut work = Work {
            pending: HashMap::new(),
            ready: VecDeque::new(),
            in_ready: HashSet::new(),
            hold: HashMap::new(),
            waking: HashSet::new(),
        };
        let mut wakes: JoinSet<Mac> = JoinSet::new();
        let mut pace = Pace::new(self.settings.rate_per_sec);
        let sweep_every = Duration::from_secs(self.settings.sweep_secs.max(1));
        let mut next_sweep = Instant::now();
        let settle = Duration::from_millis(self.settings.settle_ms);
        loop {
            let now = Instant::now();
            let deadline = self.next_deadline(&work, &pace, next_sweep, now);
            tokio::select! {
                _ = stop.cancelled() => break,
                hint = hints.recv() => match hint {
                    Some(Hint::Batch(batch)) => self.batch_ready(&batch, &mut work).await,
                    Some(Hint::Device(mac)) => {
                        work.pending.entry(mac).or_insert(now);
                    }
                    None => break,
                },
                Some(batch) = remote.recv() => self.batch_ready(&batch, &mut work).await,
                event = presence.recv() => match event {
                    Ok(event) => {
                        let after = match event.state {
                            "online" => Some(settle),
                            "session_ended" => Some(AFTER_SESSION),
                            _ => None,
                        };
                        if let (Some(after), Ok(mac)) = (after, event.mac_address.parse::<Mac>()) {
                            work.pending.insert(mac, now + after);
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => next_sweep = now,
                    Err(broadcast::error::RecvError::Closed) => break,
                },
                Some(done) = wakes.join_next(), if !wakes.is_empty() => {
                    if let Ok(mac) = done {
                        work.waking.remove(&mac);
                        // A failed wake leaves the device idle: its next pushes go now.
                        work.pending.entry(mac).or_insert(Instant::now() + AFTER_SESSION);
                    }
                }
                _ = tokio::time::sleep_until(deadline) => {}
            }
            let now = Instant::now();
            if now >= next_sweep {
                self.sweep(&mut work).await;
                next_sweep = now + sweep_every;
            }
            self.look_at_due_devices(&mut work, now).await;
            self.send_ready(&mut work, &mut pace, &mut wakes).await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while wakes.join_next().await.is_some() {}
        })
        .await;
    }

    fn next_deadline(
        &self,
        work: &Work,
        pace: &Pace,
        next_sweep: Instant,
        now: Instant,
    ) -> Instant {
        let mut deadline = next_sweep;
        if !work.ready.is_empty() {
            deadline = deadline.min(pace.next_token().max(now + Duration::from_millis(1)));
        }
        if let Some(first) = work.pending.values().min() {
            deadline = deadline.min(*first);
        }
        deadline
    }

    /// Whether the device is connected here and not in a conversation.
    fn idle_here(&self, mac: &Mac) -> bool {
        self.directory.status(mac) == Some(false)
    }

    /// How much of its settle time (`push.settle_ms` after connecting) a device has left.
    fn settling(&self, mac: &Mac) -> Option<Duration> {
        let entry = self.directory.get(mac)?;
        let age = entry.connected_at.elapsed().unwrap_or_default();
        Duration::from_millis(self.settings.settle_ms)
            .checked_sub(age)
            .filter(|left| !left.is_zero())
    }

    async fn batch_ready(&self, batch_id: &str, work: &mut Work) {
        match self.store.due_in_batch(batch_id, now_ms()).await {
            Ok(rows) => {
                for row in rows {
                    let Ok(mac) = row.mac_address.parse::<Mac>() else {
                        continue;
                    };
                    if !self.idle_here(&mac) {
                        continue;
                    }
                    // A device that has just connected is given its settle time first.
                    if let Some(wait) = self.settling(&mac) {
                        work.pending.insert(mac, Instant::now() + wait);
                        continue;
                    }
                    if work.in_ready.insert(row.id.clone()) {
                        work.ready.push_back(row);
                    }
                }
            }
            Err(e) => {
                warn!(batch_id, error = %e, "push store: could not read a batch (the sweep retries)")
            }
        }
    }

    /// Expires what is past its time, updates the waiting gauge and queues every idle
    /// device of this node that has a push waiting.
    async fn sweep(&self, work: &mut Work) {
        let now = now_ms();
        loop {
            match self.store.expire_due(now, 1000).await {
                Ok(expired) => {
                    for row in &expired {
                        Metrics::inc(&self.metrics.push_expired);
                        emit(&self.events, row, PushState::Expired, None);
                        debug!(id = %row.id, mac = %row.mac_address, "push expired");
                    }
                    if expired.len() < 1000 {
                        break;
                    }
                }
                Err(e) => {
                    warn!(error = %e, "push store: expiry sweep failed");
                    return;
                }
            }
        }
        if let Err(e) = self.store.delete_expired_clips(now, 1000).await {
            warn!(error = %e, "push store: could not delete expired clips");
        }
        if let Ok(n) = self.store.waiting_count().await {
            self.metrics
                .push_waiting
                .store(n, std::sync::atomic::Ordering::Relaxed);
        }
        match self.store.waiting_devices(now, 100_000).await {
            Ok(macs) => {
                let at = Instant::now();
                for mac in macs.iter().filter_map(|m| m.parse::<Mac>().ok()) {
                    if self.idle_here(&mac) {
                        work.pending.entry(mac).or_insert(at);
                    }
                }
            }
            Err(e) => warn!(error = %e, "push store: could not list waiting devices"),
        }
        let at = Instant::now();
        work.hold.retain(|_, (until, _)| *until > at);
    }

    async fn look_at_due_devices(&self, work: &mut Work, now: Instant) {
        let due: Vec<Mac> = work
            .pending
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(mac, _)| *mac)
            .collect();
        for mac in due {
            work.pending.remove(&mac);
            if !self.idle_here(&mac) {
                continue;
            }
            match self
                .store
                .due_for(&mac.colon(), now_ms(), DUE_PER_DEVICE)
                .await
            {
                Ok(rows) => {
                    for row in rows {
                        if work.in_ready.insert(row.id.clone()) {
                            work.ready.push_back(row);
                        }
                    }
                }
                Err(e) => {
                    // The store is away: this device and the others due now wait a while
                    // (retrying at once would spin while it is down).
                    warn!(%mac, error = %e, "push store: could not read a device's pushes; retrying in a second");
                    let later = now + RETRY_BUSY;
                    work.pending.insert(mac, later);
                    for at in work.pending.values_mut() {
                        *at = (*at).max(later);
                    }
                    return;
                }
            }
        }
    }

    async fn send_ready(&self, work: &mut Work, pace: &mut Pace, wakes: &mut JoinSet<Mac>) {
        while let Some(row) = work.ready.front() {
            let Ok(mac) = row.mac_address.parse::<Mac>() else {
                let row = work.ready.pop_front().expect("front");
                work.in_ready.remove(&row.id);
                continue;
            };
            // Gone or busy: it stays queued; connecting or the conversation's end brings
            // it back.
            if !self.idle_here(&mac) {
                let row = work.ready.pop_front().expect("front");
                work.in_ready.remove(&row.id);
                continue;
            }
            let now = Instant::now();
            // A wake's conversation is about to start: everything waits for its end
            // (or for the wake to fail).
            if work.waking.contains(&mac) {
                let row = work.ready.pop_front().expect("front");
                work.in_ready.remove(&row.id);
                continue;
            }
            let held = work
                .hold
                .get(&mac)
                .filter(|(until, _)| *until > now)
                .filter(|(_, everything)| {
                    *everything || matches!(row.kind.as_str(), "notify" | "wake")
                })
                .map(|(until, _)| *until);
            if let Some(until) = held {
                let row = work.ready.pop_front().expect("front");
                work.in_ready.remove(&row.id);
                let entry = work.pending.entry(mac).or_insert(until);
                *entry = (*entry).max(until);
                continue;
            }
            if row.kind == "wake" && work.waking.len() >= MAX_WAKES_IN_FLIGHT {
                // Out of the way, so the other pushes go on (holding it at the front
                // would also keep the task waking for nothing); its device is looked at
                // again shortly.
                let row = work.ready.pop_front().expect("front");
                work.in_ready.remove(&row.id);
                work.pending.entry(mac).or_insert(now + RETRY_BUSY);
                continue;
            }
            if !pace.take(now) {
                return;
            }
            let row = work.ready.pop_front().expect("front");
            work.in_ready.remove(&row.id);
            self.deliver(row, mac, work, wakes).await;
        }
    }

    async fn deliver(&self, row: PushRow, mac: Mac, work: &mut Work, wakes: &mut JoinSet<Mac>) {
        match self.store.claim(&row.id, &self.node, now_ms()).await {
            Ok(true) => {}
            Ok(false) => return, // another node, or its expiry, got there first
            Err(e) => {
                warn!(id = %row.id, error = %e, "push store: could not claim a push (the sweep retries)");
                return;
            }
        }
        let kind = match PushKind::from_stored(&row.kind, &row.fields) {
            Ok(kind) => kind,
            Err(e) => {
                self.finish(
                    &row,
                    PushState::Failed,
                    Some(&format!("unreadable push: {e}")),
                )
                .await;
                return;
            }
        };
        if let PushKind::Wake { reason } = kind {
            work.waking.insert(mac);
            let Some(entry) = self.directory.get(&mac) else {
                work.waking.remove(&mac);
                self.finish(&row, PushState::Queued, None).await;
                return;
            };
            let store = self.store.clone();
            let events = self.events.clone();
            let metrics = self.metrics.clone();
            let timeout = Duration::from_millis(self.settings.wake_timeout_ms);
            wakes.spawn(async move {
                let outcome = wake(&entry.mcp, &reason, timeout).await;
                let (state, error) = match outcome {
                    Ok(()) => (PushState::Delivered, None),
                    Err(e) => (PushState::Failed, Some(e)),
                };
                finish_with(&store, &events, &metrics, &row, state, error.as_deref()).await;
                mac
            });
            return;
        }
        let message = kind.device_message().unwrap_or_default();
        match self.registry.send(&mac, Bytes::from(message.to_string())) {
            Ok(()) => {
                let now = Instant::now();
                match kind {
                    PushKind::Notify { .. } => {
                        work.hold.insert(
                            mac,
                            (
                                now + Duration::from_secs(self.settings.notify_gap_secs),
                                false,
                            ),
                        );
                    }
                    PushKind::Reboot => {
                        work.hold.insert(mac, (now + AFTER_REBOOT, true));
                    }
                    _ => {}
                }
                self.finish(&row, PushState::Sent, None).await;
            }
            Err(SendError::NotConnected) => self.finish(&row, PushState::Queued, None).await,
            Err(SendError::QueueFull) => {
                self.finish(&row, PushState::Queued, None).await;
                work.pending.insert(mac, Instant::now() + RETRY_BUSY);
            }
        }
    }

    async fn finish(&self, row: &PushRow, state: PushState, error: Option<&str>) {
        finish_with(&self.store, &self.events, &self.metrics, row, state, error).await;
    }
}

/// Records a claimed push's end (or hands it back: `queued`), counts it and publishes
/// the change.
async fn finish_with(
    store: &PushStore,
    events: &EventPublisher,
    metrics: &Metrics,
    row: &PushRow,
    state: PushState,
    error: Option<&str>,
) {
    let now = now_ms();
    match store.finish(&row.id, state, error, now).await {
        Ok(true) => {}
        Ok(false) => return,
        Err(e) => {
            // It stays `sending` under this node's name: the next start hands it back.
            warn!(id = %row.id, error = %e, state = state.as_str(), "push store: could not record a push's state");
            return;
        }
    }
    let counter = match state {
        PushState::Sent => Some(&metrics.push_sent),
        PushState::Delivered => Some(&metrics.push_delivered),
        PushState::Failed => Some(&metrics.push_failed),
        _ => None,
    };
    if let Some(counter) = counter {
        Metrics::inc(counter);
    }
    if matches!(state, PushState::Sent | PushState::Delivered) {
        metrics
            .histograms
            .push_delivery
            .observe((now - row.created_ms).max(0) as f64 / 1000.0);
    }
    if state != PushState::Queued {
        debug!(id = %row.id, mac = %row.mac_address, kind = %row.kind, state = state.as_str(), "push");
        emit(events, row, state, error);
    }
}

/// Calls the device's wake tool with `reason`; `Ok` when it answered `true`.
async fn wake(
    mcp: &crate::device_link::mcp::DeviceMcp,
    reason: &str,
    timeout: Duration,
) -> Result<(), String> {
    mcp.wait_setup(timeout).await;
    let names = mcp.cache().tool_names();
    let Some(tool) = push::wake_tool(names.iter().map(String::as_str)) else {
        return Err(format!(
            "the device has no wake tool ({}): its firmware cannot be woken remotely",
            push::WAKE_TOOLS.join(" or ")
        ));
    };
    let result = mcp
        .call("tools/call", Some(push::wake_call(tool, reason)), timeout)
        .await
        .map_err(|e| format!("{tool}: {e}"))?;
    if push::wake_acknowledged(&result) {
        Ok(())
    } else {
        Err(format!("{tool} did not answer true: {result}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pace_allows_its_rate_and_a_second_of_burst() {
        let mut pace = Pace::new(10);
        let start = pace.at;
        let burst = (0..20).filter(|_| pace.take(start)).count();
        assert_eq!(burst, 10);
        assert!(pace.next_token() > start);
        let later = start + Duration::from_millis(500);
        assert_eq!((0..20).filter(|_| pace.take(later)).count(), 5);
        // Idle for long: still one second's worth, not more.
        let much_later = later + Duration::from_secs(60);
        assert_eq!((0..20).filter(|_| pace.take(much_later)).count(), 10);
    }
}
