//! Gateway events on the bus, for admins, observers and integrations:
//!
//! | topic | payload |
//! | --- | --- |
//! | `xiaozhi/devices/<mac_>/presence` (retained) | the presence record ([`crate::presence::PresenceRecord`]) |
//! | `xiaozhi/devices/<mac_>/session` | `session_started` / `session_ended` (duration, bytes, drops, reason) |
//! | `xiaozhi/devices/<mac_>/chat` | each stored chat record, the same payload as `/ws/admin`'s `chat_update` |
//! | `xiaozhi/events/upstream` | `upstream_failed`: a conversation could not be opened upstream |
//! | `xiaozhi/devices/<mac_>/push` | `push_state`: a push to the device changed state ([`PushEvent`]) |
//! | `xiaozhi/events/push` | `push_queued`: a push request was queued (batch id, device count); nodes deliver from it |
//!
//! Presence is published by the tracker; this module builds the rest. Publishing never
//! blocks (the bus drops and counts when its queue is full).

use std::sync::Arc;

use bytes::Bytes;
use serde_json::{Value, json};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::audio::channel::ChannelStats;
use crate::broker::bus::Bus;
use crate::history::record::now_ms;
use crate::history::writer::StoredEvent;
use crate::metrics::Metrics;
use crate::protocol::mac::Mac;
use crate::protocol::topics;

/// Publishes this node's events.
#[derive(Clone)]
pub struct EventPublisher {
    bus: Bus,
    node: Arc<str>,
    /// Upstream failures for live consumers on this node (`/ws/admin`).
    upstream_failures: broadcast::Sender<UpstreamFailure>,
    /// Push state changes for live consumers on this node (`/ws/admin`).
    push_states: broadcast::Sender<PushEvent>,
}

/// A push changed state (`queued`, `sending`, `sent`, `delivered`, `expired`, `failed`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct PushEvent {
    pub id: String,
    pub batch_id: String,
    /// Colon form.
    pub mac_address: String,
    pub kind: String,
    pub state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The node that made the change.
    pub node: String,
    /// Unix milliseconds.
    pub at_ms: i64,
}

/// Push state changes buffered for a slow live consumer before it misses some (a fleet
/// push makes one per device).
const PUSH_EVENT_BUFFER: usize = 4096;

/// A conversation could not reach (or lost) xiaozhi-server.
#[derive(Debug, Clone, serde::Serialize)]
pub struct UpstreamFailure {
    /// Colon form.
    pub mac_address: String,
    pub error: String,
    /// Unix milliseconds.
    pub at_ms: i64,
}

/// Upstream failures buffered for a slow live consumer before it misses some.
const UPSTREAM_FAILURE_BUFFER: usize = 64;

/// How a conversation ended, for its event.
pub struct SessionEnd<'a> {
    pub session_id: &'a str,
    pub reason: &'a str,
    pub duration_ms: u64,
    pub stats: ChannelStats,
}

impl EventPublisher {
    pub fn new(bus: Bus, node: &str) -> Self {
        EventPublisher {
            bus,
            node: node.into(),
            upstream_failures: broadcast::channel(UPSTREAM_FAILURE_BUFFER).0,
            push_states: broadcast::channel(PUSH_EVENT_BUFFER).0,
        }
    }

    /// Upstream failures from now on (for `/ws/admin`).
    pub fn subscribe_upstream_failures(&self) -> broadcast::Receiver<UpstreamFailure> {
        self.upstream_failures.subscribe()
    }

    /// Push state changes from now on (for `/ws/admin`).
    pub fn subscribe_push(&self) -> broadcast::Receiver<PushEvent> {
        self.push_states.subscribe()
    }

    /// This node's id, as events name it.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// A push changed state: on the device's `push` topic and to live consumers.
    pub fn push_state(&self, mac: &Mac, event: PushEvent) {
        if let Ok(Value::Object(mut body)) = serde_json::to_value(&event) {
            body.insert("event".into(), Value::from("push_state"));
            self.publish(topics::device_push(mac), Value::Object(body));
        }
        let _ = self.push_states.send(event);
    }

    /// A push request was queued: every node delivers its batch to the devices it holds.
    pub fn push_queued(&self, batch_id: &str, devices: usize) {
        self.publish(
            topics::EVENTS_PUSH.to_owned(),
            json!({
                "event": "push_queued",
                "batch_id": batch_id,
                "devices": devices,
                "node": &*self.node,
                "at_ms": now_ms(),
            }),
        );
    }

    fn publish(&self, topic: String, event: Value) {
        self.bus.publish(topic, Bytes::from(event.to_string()));
    }

    /// `transport`: the audio transport the hello gave (`ctr`, `gcm`, `quic`).
    pub fn session_started(&self, mac: &Mac, session_id: &str, pipeline: &str, transport: &str) {
        self.publish(
            topics::device_session(mac),
            json!({
                "event": "session_started",
                "mac_address": mac.colon(),
                "session_id": session_id,
                "pipeline": pipeline,
                "transport": transport,
                "node": &*self.node,
                "at_ms": now_ms(),
            }),
        );
    }

    pub fn session_ended(&self, mac: &Mac, end: &SessionEnd<'_>) {
        self.publish(
            topics::device_session(mac),
            json!({
                "event": "session_ended",
                "mac_address": mac.colon(),
                "session_id": end.session_id,
                "reason": end.reason,
                "duration_ms": end.duration_ms,
                "uplink_packets": end.stats.uplink_packets,
                "uplink_bytes": end.stats.uplink_bytes,
                "downlink_packets": end.stats.downlink_packets,
                "downlink_bytes": end.stats.downlink_bytes,
                "dropped": end.stats.dropped,
                "node": &*self.node,
                "at_ms": now_ms(),
            }),
        );
    }

    pub fn upstream_failed(&self, mac: &Mac, error: &str) {
        // No live consumer is normal: the send only fails then.
        let _ = self.upstream_failures.send(UpstreamFailure {
            mac_address: mac.colon(),
            error: error.to_owned(),
            at_ms: now_ms(),
        });
        self.publish(
            topics::events_upstream(),
            json!({
                "event": "upstream_failed",
                "mac_address": mac.colon(),
                "error": error,
                "node": &*self.node,
                "at_ms": now_ms(),
            }),
        );
    }

    /// A stored chat record, as `/ws/admin` sends it.
    pub fn chat(&self, event: &StoredEvent) {
        let Ok(mac) = event.mac_address.parse::<Mac>() else {
            return;
        };
        let Ok(Value::Object(mut body)) = serde_json::to_value(event) else {
            return;
        };
        body.insert("type".into(), Value::from("chat_update"));
        self.publish(topics::device_chat(&mac), Value::Object(body));
    }

    /// Forwards every stored chat record to the bus until stopped.
    pub async fn forward_chat(
        self,
        mut events: broadcast::Receiver<StoredEvent>,
        metrics: Arc<Metrics>,
        stop: CancellationToken,
    ) {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                event = events.recv() => match event {
                    Ok(event) => self.chat(&event),
                    Err(broadcast::error::RecvError::Lagged(n)) => Metrics::add(&metrics.events_dropped, n),
                    Err(broadcast::error::RecvError::Closed) => return,
                },
            }
        }
    }
}
