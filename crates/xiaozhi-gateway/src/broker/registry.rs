//! Which devices are connected to this node, and how to reach each one.
//!
//! One entry per MAC. A new connection for a MAC replaces the old one (the firmware
//! reconnects with the same client id after a drop, often before the old TCP connection
//! has been noticed as dead), and the old connection is told to close. Each connection
//! gets a generation number so that the late cleanup of a replaced connection can never
//! remove its successor.
//!
//! Sending to a device never waits: each connection has a bounded outbound queue, and a
//! message for a full queue is dropped and counted rather than stalling the sender.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::metrics::Metrics;
use crate::protocol::credentials::DeviceIdentity;
use crate::protocol::mac::Mac;

/// What a connection task can be asked to do.
#[derive(Debug)]
pub enum Outbound {
    /// Publish this payload to the device on `devices/p2p/<mac_>`.
    Publish(Bytes),
    /// Close the connection (replaced, kicked or shutting down).
    Close(&'static str),
}

/// A registered connection.
#[derive(Debug, Clone)]
pub struct DeviceHandle {
    pub identity: Arc<DeviceIdentity>,
    pub generation: u64,
    pub remote: SocketAddr,
    tx: mpsc::Sender<Outbound>,
}

/// Why a message could not be queued for a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    #[error("device is not connected")]
    NotConnected,
    #[error("device's outbound queue is full")]
    QueueFull,
}

/// The live device connections of this node.
#[derive(Debug)]
pub struct DeviceRegistry {
    devices: Mutex<HashMap<Mac, DeviceHandle>>,
    next_generation: AtomicU64,
    queue_len: usize,
    metrics: Arc<Metrics>,
}

impl DeviceRegistry {
    pub fn new(queue_len: usize, metrics: Arc<Metrics>) -> Self {
        DeviceRegistry {
            devices: Mutex::new(HashMap::new()),
            next_generation: AtomicU64::new(1),
            queue_len,
            metrics,
        }
    }

    /// Registers a freshly authenticated connection, closing any older one for the same
    /// device. Returns the new handle and the receiver its connection task drains.
    pub fn register(
        &self,
        identity: DeviceIdentity,
        remote: SocketAddr,
    ) -> (DeviceHandle, mpsc::Receiver<Outbound>) {
        let (tx, rx) = mpsc::channel(self.queue_len);
        let handle = DeviceHandle {
            identity: Arc::new(identity),
            generation: self.next_generation.fetch_add(1, Ordering::Relaxed),
            remote,
            tx,
        };
        let old = self.lock().insert(handle.identity.mac, handle.clone());
        match old {
            Some(old) => {
                Metrics::inc(&self.metrics.connections_replaced);
                // If its queue is full the old task is wedged anyway; dropping our handle
                // is enough for it to notice once it drains.
                let _ = old
                    .tx
                    .try_send(Outbound::Close("replaced by a newer connection"));
            }
            None => Metrics::inc(&self.metrics.devices_connected),
        }
        (handle, rx)
    }

    /// Removes a connection if it is still the registered one. Returns whether it was.
    pub fn unregister(&self, mac: &Mac, generation: u64) -> bool {
        let mut devices = self.lock();
        if devices.get(mac).is_some_and(|h| h.generation == generation) {
            devices.remove(mac);
            Metrics::dec(&self.metrics.devices_connected);
            true
        } else {
            false
        }
    }

    /// Queues a message for a device without waiting.
    pub fn send(&self, mac: &Mac, payload: Bytes) -> Result<(), SendError> {
        let tx = match self.lock().get(mac) {
            Some(h) => h.tx.clone(),
            None => {
                Metrics::inc(&self.metrics.mqtt_dropped_not_connected);
                return Err(SendError::NotConnected);
            }
        };
        tx.try_send(Outbound::Publish(payload))
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => {
                    Metrics::inc(&self.metrics.mqtt_dropped_queue_full);
                    SendError::QueueFull
                }
                mpsc::error::TrySendError::Closed(_) => {
                    Metrics::inc(&self.metrics.mqtt_dropped_not_connected);
                    SendError::NotConnected
                }
            })
    }

    /// Asks a device's connection to close. Returns whether it was connected.
    pub fn close(&self, mac: &Mac, reason: &'static str) -> bool {
        let tx = self.lock().get(mac).map(|h| h.tx.clone());
        tx.is_some_and(|tx| tx.try_send(Outbound::Close(reason)).is_ok())
    }

    /// The current connection of a device.
    pub fn get(&self, mac: &Mac) -> Option<DeviceHandle> {
        self.lock().get(mac).cloned()
    }

    /// Number of connected devices.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Asks every connection to close (shutdown).
    pub fn close_all(&self, reason: &'static str) {
        let txs: Vec<_> = self.lock().values().map(|h| h.tx.clone()).collect();
        for tx in txs {
            let _ = tx.try_send(Outbound::Close(reason));
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Mac, DeviceHandle>> {
        // A panic while holding this lock cannot leave the map inconsistent (every
        // critical section is a single insert/remove/get), so poisoning is ignored.
        self.devices.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::credentials::parse_client_id;

    fn identity() -> DeviceIdentity {
        parse_client_id("G@@@aa_bb_cc_dd_ee_ff@@@u").unwrap()
    }

    #[test]
    fn replacement_closes_the_old_and_late_cleanup_keeps_the_new() {
        let metrics = Arc::new(Metrics::default());
        let reg = DeviceRegistry::new(4, metrics.clone());
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let (old, mut old_rx) = reg.register(identity(), addr);
        let (new, mut new_rx) = reg.register(identity(), addr);
        assert!(matches!(old_rx.try_recv(), Ok(Outbound::Close(_))));
        assert!(
            !reg.unregister(&old.identity.mac, old.generation),
            "stale cleanup must not remove the new connection"
        );
        reg.send(&new.identity.mac, Bytes::from_static(b"hi"))
            .unwrap();
        assert!(matches!(new_rx.try_recv(), Ok(Outbound::Publish(p)) if p == "hi"));
        assert_eq!(metrics.snapshot().devices_connected, 1);
        assert!(reg.unregister(&new.identity.mac, new.generation));
        assert_eq!(metrics.snapshot().devices_connected, 0);
        assert_eq!(
            reg.send(&new.identity.mac, Bytes::new()),
            Err(SendError::NotConnected)
        );
    }

    #[test]
    fn full_queue_drops_and_counts() {
        let metrics = Arc::new(Metrics::default());
        let reg = DeviceRegistry::new(1, metrics.clone());
        let (h, _rx) = reg.register(identity(), "127.0.0.1:1".parse().unwrap());
        reg.send(&h.identity.mac, Bytes::new()).unwrap();
        assert_eq!(
            reg.send(&h.identity.mac, Bytes::new()),
            Err(SendError::QueueFull)
        );
        assert_eq!(metrics.snapshot().mqtt_dropped_queue_full, 1);
    }
}
