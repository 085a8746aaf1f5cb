//! Device presence: which devices are offline, online (MQTT connected) or in a
//! conversation, on which gateway node, since when, from where.
//!
//! The session layer knows the truth for the devices of *this* node (the
//! [`DeviceDirectory`](crate::session::directory::DeviceDirectory)); presence makes it
//! visible to everyone else (admin commands, the management API, other nodes, operators'
//! dashboards) through a [`PresenceStore`]:
//!
//! * [`memory::MemoryPresence`]: the embedded default, nothing to install.
//! * [`redis::RedisPresence`]: production and scale-out; entries of a node that dies
//!   expire on their own (heartbeat TTL).
//!
//! The [`tracker::PresenceTracker`] is the only writer: it coalesces transitions per
//! device (the latest state wins, so memory is bounded by the number of devices and no
//! transition is ever queued behind a slow store), writes them in batches, refreshes the
//! TTLs of this node's devices on a heartbeat, and rewrites everything after the store
//! comes back from an outage.
//!
//! Readers get one device ([`PresenceStore::get`]), a page of connected devices
//! ([`PresenceStore::list`], for admin commands) or the fleet view with offline devices
//! still remembered and counts ([`PresenceStore::fleet`], for the web console; the
//! filtering and paging are the pure [`fleet::fleet_page`]).

pub mod fleet;
pub mod hints;
pub mod memory;
pub mod redis;
pub mod tracker;

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::protocol::mac::Mac;
use fleet::{FleetPage, FleetQuery};

/// What a device is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PresenceState {
    /// Not connected (or its node stopped refreshing it).
    Offline,
    /// MQTT connected, no conversation.
    Online,
    /// In a conversation.
    InSession,
    /// In a device-to-device call (ringing another device, or talking to it): its
    /// conversation carries the call instead of a speech server's.
    InCall,
}

impl PresenceState {
    pub fn as_str(self) -> &'static str {
        match self {
            PresenceState::Offline => "offline",
            PresenceState::Online => "online",
            PresenceState::InSession => "in_session",
            PresenceState::InCall => "in_call",
        }
    }

    pub fn parse(s: &str) -> Option<PresenceState> {
        match s {
            "offline" => Some(PresenceState::Offline),
            "online" => Some(PresenceState::Online),
            "in_session" => Some(PresenceState::InSession),
            "in_call" => Some(PresenceState::InCall),
            _ => None,
        }
    }

    /// Online or in a session.
    pub fn is_connected(self) -> bool {
        self != PresenceState::Offline
    }
}

/// One device's presence, as stored and as published on
/// `xiaozhi/devices/<mac_>/presence`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceRecord {
    /// Colon form, lowercase (`aa:bb:cc:dd:ee:ff`), as manager-api spells it.
    pub mac_address: String,
    pub state: PresenceState,
    /// The gateway node holding (or that last held) the connection.
    pub node: String,
    pub client_id: String,
    /// Client-id group (board name or `GID_default`).
    pub group: String,
    /// TCP peer address of the MQTT connection.
    pub remote: String,
    /// Board type reported by the device (from its OTA request), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub board: Option<String>,
    /// Firmware version reported by the device (from its OTA request), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware: Option<String>,
    /// The running conversation's session id (`in_session` and `in_call`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    /// Unix ms the running conversation started (`in_session` and `in_call`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_since_ms: Option<i64>,
    /// The other device of the call (colon form; `in_call` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub call_peer: Option<String>,
    /// Whether the call is bridged (`true`) or still ringing the other device (`in_call`
    /// only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub call_bridged: Option<bool>,
    /// Unix ms the MQTT connection was accepted.
    pub connected_at_ms: i64,
    /// Unix ms of the latest transition or heartbeat.
    pub last_seen_ms: i64,
}

impl PresenceRecord {
    /// The device's MAC, if the stored spelling parses.
    pub fn mac(&self) -> Option<Mac> {
        self.mac_address.parse().ok()
    }
}

/// Which devices `list` returns, and how many.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PresenceQuery {
    /// Only this state (`online` or `in_session`); none: every connected device.
    pub state: Option<PresenceState>,
    /// Only devices on this node.
    pub node: Option<String>,
    /// Only this client-id group.
    pub group: Option<String>,
    /// Only MACs (colon form) starting with this prefix.
    pub mac_prefix: Option<String>,
    /// Keyset paging: only MACs (colon form) sorting after this one.
    pub after: Option<String>,
    /// Page size; 0 means the default (100); capped at 1000.
    pub limit: usize,
}

/// Default and largest page sizes for [`PresenceQuery`].
pub const DEFAULT_PAGE: usize = 100;
pub const MAX_PAGE: usize = 1000;

impl PresenceQuery {
    /// The page size to use.
    pub fn page_size(&self) -> usize {
        match self.limit {
            0 => DEFAULT_PAGE,
            n => n.min(MAX_PAGE),
        }
    }

    /// Whether a connected device's record passes the filters (not the paging).
    pub fn matches(&self, record: &PresenceRecord) -> bool {
        record.state.is_connected()
            && self.state.is_none_or(|s| s == record.state)
            && self.node.as_ref().is_none_or(|n| *n == record.node)
            && self.group.as_ref().is_none_or(|g| *g == record.group)
            && self
                .mac_prefix
                .as_ref()
                .is_none_or(|p| record.mac_address.starts_with(&p.to_ascii_lowercase()))
    }
}

/// One page of connected devices, sorted by MAC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresencePage {
    pub devices: Vec<PresenceRecord>,
    /// Pass as `after` for the next page; none when this was the last.
    pub next: Option<String>,
    /// Connected devices matching the filters, over all pages.
    pub total: usize,
}

/// Why a presence store failed.
#[derive(Debug, thiserror::Error)]
pub enum PresenceError {
    #[error("redis: {0}")]
    Redis(#[from] ::redis::RedisError),
    #[error("stored presence for {key} is malformed: {reason}")]
    Malformed { key: String, reason: String },
}

/// How long entries live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ttls {
    /// A connected device's entry expires this long after its last write or heartbeat
    /// (a crashed node's devices turn offline on their own).
    pub connected: Duration,
    /// An offline device's entry (kept for "last seen") expires this long after it
    /// went offline.
    pub offline: Duration,
}

/// Where presence is kept. Implementations must be safe to call from many tasks, but
/// the [`tracker::PresenceTracker`] is their only writer per node.
#[async_trait::async_trait]
pub trait PresenceStore: Send + Sync + 'static {
    /// `memory` or `redis`, for logs and health.
    fn backend(&self) -> &'static str;

    /// Writes these records (all by this node), in one round trip where the backend
    /// can. A connected record replaces whatever was stored and takes the connected TTL.
    /// An offline record is written only if the stored entry is missing or belongs to
    /// `record.node` (so a node never marks offline a device that has since connected to
    /// another node); it takes the offline TTL.
    async fn write(&self, records: &[PresenceRecord], ttls: Ttls) -> Result<(), PresenceError>;

    /// Refreshes the connected TTL and `last_seen_ms` of these devices, where the
    /// stored entry still belongs to `node` and is connected.
    async fn heartbeat(
        &self,
        node: &str,
        macs: &[String],
        now_ms: i64,
        ttls: Ttls,
    ) -> Result<(), PresenceError>;

    /// Marks offline every connected entry that still names `node` (a restart of this
    /// node: whatever it held before is gone); returns how many. Entries of other nodes
    /// are never touched.
    async fn reconcile(&self, node: &str, now_ms: i64, ttls: Ttls) -> Result<usize, PresenceError>;

    /// One device's entry; a connected entry whose TTL ran out reads as absent.
    async fn get(&self, mac_address: &str) -> Result<Option<PresenceRecord>, PresenceError>;

    /// Several devices' entries, in order, in one round trip where the backend can.
    async fn get_many(
        &self,
        mac_addresses: &[String],
    ) -> Result<Vec<Option<PresenceRecord>>, PresenceError> {
        let mut out = Vec::with_capacity(mac_addresses.len());
        for mac in mac_addresses {
            out.push(self.get(mac).await?);
        }
        Ok(out)
    }

    /// Connected devices matching the query, sorted by MAC, one page.
    async fn list(&self, query: &PresenceQuery) -> Result<PresencePage, PresenceError>;

    /// Every device the store remembers, connected or offline, as one page of the fleet
    /// view with counts ([`fleet::fleet_page`] over the live entries). A connected entry
    /// whose TTL ran out reads as absent, as for [`get`](PresenceStore::get); `now_ms`
    /// (unix ms) is the clock for backends that expire entries by wall-clock scores.
    async fn fleet(&self, query: &FleetQuery, now_ms: i64) -> Result<FleetPage, PresenceError>;

    /// Whether the store answers (for readiness).
    async fn ping(&self) -> Result<(), PresenceError>;
}
