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

use super::device_mcp::DeviceMcp;
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
}

/// The connected devices of this node.
#[derive(Default)]
pub struct DeviceDirectory {
    devices: Mutex<HashMap<Mac, DeviceEntry>>,
}

impl DeviceDirectory {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Mac, DeviceEntry>> {
        self.devices.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a new connection; returns the entry it replaced, if any.
    pub fn connected(&self, entry: DeviceEntry) -> Option<DeviceEntry> {
        self.lock().insert(entry.identity.mac, entry)
    }

    /// Removes a connection if it is still the current one for its device.
    pub fn gone(&self, mac: &Mac, generation: u64) -> Option<DeviceEntry> {
        let mut devices = self.lock();
        if devices.get(mac).is_some_and(|e| e.generation == generation) {
            devices.remove(mac)
        } else {
            None
        }
    }

    /// A conversation started (`Some`) or ended (`None`) on a device's connection.
    pub fn set_conversation(&self, mac: &Mac, serial: u64, session_id: Option<String>) {
        if let Some(entry) = self.lock().get_mut(mac) {
            match session_id {
                Some(id) => entry.conversation = Some((serial, id)),
                None => {
                    if entry
                        .conversation
                        .as_ref()
                        .is_some_and(|(s, _)| *s == serial)
                    {
                        entry.conversation = None;
                    }
                }
            }
        }
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
