//! The devices connected to this node as the rest of the gateway sees them: identity,
//! address, MCP handle and current conversation.
//!
//! The broker's registry answers "how do I reach this device"; the directory answers
//! "what is this device doing", for the management API (manager-api's online status and
//! tool calls) and, later, presence. The session dispatcher writes it (connect, gone),
//! conversations record their session id, readers take cheap clones.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use super::call_leg::PeerRoute;
use crate::device_link::mcp::DeviceMcp;
use crate::presence::PresenceState;
use crate::presence::tracker::{PresenceTracker, Transition};
use crate::protocol::call_book::CallId;
use crate::protocol::credentials::DeviceIdentity;
use crate::protocol::mac::Mac;

/// One connected device.
#[derive(Clone)]
pub struct DeviceEntry {
    pub identity: Arc<DeviceIdentity>,
    /// The connection's generation in the broker registry.
    pub generation: u64,
    pub remote: SocketAddr,
    pub connected_at: SystemTime,
    pub mcp: Arc<DeviceMcp>,
    /// The running conversation: its serial (to tell conversations apart) and session id.
    pub conversation: Option<(u64, String)>,
    /// The call the running conversation carries, if it is a call leg.
    pub call: Option<(CallId, PeerRoute)>,
}

/// A device came or went, or started or ended a conversation (for live consumers such
/// as `/ws/admin`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct PresenceEvent {
    /// Colon form.
    pub mac_address: String,
    pub client_id: String,
    /// `online`, `in_session`, `in_call`, `session_ended` or `offline`.
    pub state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    /// The other device of the call (`in_call` only; colon form).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub call_peer: Option<String>,
    /// Whether the call is bridged (`in_call` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub call_bridged: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remote: Option<String>,
    /// Unix milliseconds.
    pub at_ms: i64,
}

fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Presence events buffered for slow consumers before they are dropped.
const PRESENCE_BUFFER: usize = 1024;

/// The connected devices of this node.
pub struct DeviceDirectory {
    devices: Mutex<HashMap<Mac, DeviceEntry>>,
    presence: tokio::sync::broadcast::Sender<PresenceEvent>,
    /// Writes presence to the store and the bus; none in tests that do not need it.
    tracker: Option<PresenceTracker>,
}

impl Default for DeviceDirectory {
    fn default() -> Self {
        DeviceDirectory::new(None)
    }
}

impl DeviceDirectory {
    pub fn new(tracker: Option<PresenceTracker>) -> Self {
        DeviceDirectory {
            devices: Mutex::new(HashMap::new()),
            presence: tokio::sync::broadcast::channel(PRESENCE_BUFFER).0,
            tracker,
        }
    }

    /// The presence writer, if this directory has one.
    pub fn tracker(&self) -> Option<&PresenceTracker> {
        self.tracker.as_ref()
    }

    /// Presence events from now on.
    pub fn subscribe_presence(&self) -> tokio::sync::broadcast::Receiver<PresenceEvent> {
        self.presence.subscribe()
    }

    /// Reports a transition. Callers hold the devices lock, so the transitions of one
    /// device reach the tracker in the order the table changed (a conversation ending on
    /// one thread can never overwrite the device's departure seen on another).
    fn announce(
        &self,
        entry: &DeviceEntry,
        state: &'static str,
        session_id: Option<String>,
        still_connected: bool,
    ) {
        let call = entry
            .call
            .as_ref()
            .filter(|_| state == "in_call")
            .map(|(_, route)| (route.peer(), route.is_bridged()));
        if let Some(tracker) = &self.tracker {
            let stored = match state {
                "in_session" => Some(PresenceState::InSession),
                "in_call" => Some(PresenceState::InCall),
                "online" => Some(PresenceState::Online),
                // Back to online, unless the device is leaving (then "offline" follows).
                "session_ended" => still_connected.then_some(PresenceState::Online),
                _ => Some(PresenceState::Offline),
            };
            if let Some(stored) = stored {
                tracker.update(Transition {
                    identity: &entry.identity,
                    remote: entry.remote,
                    connected_at_ms: unix_ms(entry.connected_at),
                    state: stored,
                    session_id: session_id.as_deref(),
                    call,
                });
            }
        }
        let _ = self.presence.send(PresenceEvent {
            mac_address: entry.identity.mac.colon(),
            client_id: entry.identity.client_id.clone(),
            state,
            session_id,
            call_peer: call.map(|(peer, _)| peer.colon()),
            call_bridged: call.map(|(_, bridged)| bridged),
            remote: Some(entry.remote.to_string()),
            at_ms: crate::history::record::now_ms(),
        });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Mac, DeviceEntry>> {
        self.devices.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a new connection; returns the entry it replaced, if any.
    pub fn connected(&self, entry: DeviceEntry) -> Option<DeviceEntry> {
        let mut devices = self.lock();
        self.announce(&entry, "online", None, true);
        devices.insert(entry.identity.mac, entry)
    }

    /// Removes a connection if it is still the current one for its device.
    pub fn gone(&self, mac: &Mac, generation: u64) -> Option<DeviceEntry> {
        let mut devices = self.lock();
        if devices.get(mac).is_none_or(|e| e.generation != generation) {
            return None;
        }
        let entry = devices.remove(mac)?;
        if let Some((_, session_id)) = &entry.conversation {
            self.announce(&entry, "session_ended", Some(session_id.clone()), false);
        }
        self.announce(&entry, "offline", None, false);
        Some(entry)
    }

    /// A conversation started (`Some`) or ended (`None`) on a device's connection.
    pub fn set_conversation(&self, mac: &Mac, serial: u64, session_id: Option<String>) {
        let mut devices = self.lock();
        let Some(entry) = devices.get_mut(mac) else {
            return;
        };
        let event = match session_id {
            Some(id) => {
                entry.conversation = Some((serial, id.clone()));
                entry.call = None;
                Some(("in_session", id))
            }
            None => {
                let ended = entry
                    .conversation
                    .take_if(|(s, _)| *s == serial)
                    .map(|(_, id)| ("session_ended", id));
                if ended.is_some() {
                    entry.call = None;
                }
                ended
            }
        };
        if let Some((state, id)) = event {
            let entry = entry.clone();
            self.announce(&entry, state, Some(id), true);
        }
    }

    /// The running conversation (`serial`) became a leg of a call, or its call was
    /// bridged: presence says `in_call`, with the other device.
    pub fn set_call(&self, mac: &Mac, serial: u64, call: Option<(CallId, PeerRoute)>) {
        let mut devices = self.lock();
        let Some(entry) = devices.get_mut(mac) else {
            return;
        };
        let Some((_, session_id)) = entry.conversation.clone().filter(|(s, _)| *s == serial) else {
            return;
        };
        let state = if call.is_some() {
            "in_call"
        } else {
            "in_session"
        };
        entry.call = call;
        let entry = entry.clone();
        self.announce(&entry, state, Some(session_id), true);
    }

    pub fn get(&self, mac: &Mac) -> Option<DeviceEntry> {
        self.lock().get(mac).cloned()
    }

    /// The device's MCP handle, if it is connected.
    pub fn mcp(&self, mac: &Mac) -> Option<Arc<DeviceMcp>> {
        self.lock().get(mac).map(|e| e.mcp.clone())
    }

    /// Whether the device is connected, and whether it is in a conversation.
    pub fn status(&self, mac: &Mac) -> Option<bool> {
        self.lock().get(mac).map(|e| e.conversation.is_some())
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
