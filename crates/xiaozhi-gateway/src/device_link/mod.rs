//! The JSON side of a connected device, as the layers above the broker reach it: where a
//! message for a device goes ([`DeviceSink`], [`DeviceOut`]: its MQTT connection, or the
//! control stream of its QUIC channel while that is open) and its MCP client ([`mcp`]),
//! which the gateway, the management API and the speech server share.
//!
//! Below the pipelines and the session layer, which both speak to devices through it;
//! above the broker, whose registry is one sink.

pub mod mcp;

use std::sync::Arc;

use bytes::Bytes;

use crate::audio::channel::ControlStream;
use crate::broker::registry::DeviceRegistry;
use crate::protocol::mac::Mac;

/// Where JSON for devices goes: the local registry here; an external broker when the
/// gateway runs behind one.
pub trait DeviceSink: Send + Sync + 'static {
    /// Queues a message for the device; false if it was dropped (and counted).
    fn send_to_device(&self, mac: &Mac, payload: Bytes) -> bool;
}

impl DeviceSink for DeviceRegistry {
    fn send_to_device(&self, mac: &Mac, payload: Bytes) -> bool {
        self.send(mac, payload).is_ok()
    }
}

/// Sends JSON to one device.
#[derive(Clone)]
pub struct DeviceOut {
    pub mac: Mac,
    sink: Arc<dyn DeviceSink>,
    stream: Option<Arc<dyn ControlStream>>,
}

impl DeviceOut {
    pub fn new(mac: Mac, sink: Arc<dyn DeviceSink>) -> Self {
        DeviceOut {
            mac,
            sink,
            stream: None,
        }
    }

    /// The same device, preferring `stream` whenever it is open.
    pub fn with_stream(&self, stream: Arc<dyn ControlStream>) -> Self {
        DeviceOut {
            stream: Some(stream),
            ..self.clone()
        }
    }

    /// Queues a JSON message for the device.
    pub fn send_json(&self, json: String) -> bool {
        let payload = Bytes::from(json);
        if let Some(stream) = &self.stream
            && stream.try_send(&payload)
        {
            return true;
        }
        self.sink.send_to_device(&self.mac, payload)
    }
}
