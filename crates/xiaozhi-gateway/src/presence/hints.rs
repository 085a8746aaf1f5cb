//! What devices say about themselves before they connect: board type and firmware version
//! from their OTA check (`POST /xiaozhi/ota/`), kept so presence records can show them.
//!
//! The MQTT connection carries neither (the client id's group is a sanitised board name at
//! best), so the OTA handler records them here and the presence tracker reads them when
//! the device connects. Bounded: past the cap an arbitrary entry is evicted, which at
//! worst leaves one device's hints blank until its next OTA check.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::protocol::mac::Mac;

/// Devices whose hints are kept at most.
const MAX_DEVICES: usize = 100_000;
/// Longest board or version string kept.
const MAX_LEN: usize = 64;

/// Board and firmware of one device.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceHint {
    pub board: Option<String>,
    pub firmware: Option<String>,
}

/// The latest hints per device.
#[derive(Debug, Default)]
pub struct DeviceHints {
    devices: Mutex<HashMap<Mac, DeviceHint>>,
}

fn clip(s: Option<&str>) -> Option<String> {
    let s = s?.trim();
    (!s.is_empty()).then(|| s.chars().take(MAX_LEN).collect())
}

impl DeviceHints {
    /// Records what a device reported; blank values keep what was known.
    pub fn record(&self, mac: Mac, board: Option<&str>, firmware: Option<&str>) {
        let (board, firmware) = (clip(board), clip(firmware));
        if board.is_none() && firmware.is_none() {
            return;
        }
        let mut devices = self.devices.lock().unwrap_or_else(|p| p.into_inner());
        if devices.len() >= MAX_DEVICES
            && !devices.contains_key(&mac)
            && let Some(victim) = devices.keys().next().copied()
        {
            devices.remove(&victim);
        }
        let hint = devices.entry(mac).or_default();
        if board.is_some() {
            hint.board = board;
        }
        if firmware.is_some() {
            hint.firmware = firmware;
        }
    }

    /// What the device last reported, if anything.
    pub fn get(&self, mac: &Mac) -> DeviceHint {
        self.devices
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(mac)
            .cloned()
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_known_values_and_clips() {
        let hints = DeviceHints::default();
        let mac: Mac = "aa:bb:cc:dd:ee:ff".parse().unwrap();
        assert_eq!(hints.get(&mac), DeviceHint::default());
        hints.record(mac, Some("esp32-s3-box"), Some("1.6.0"));
        hints.record(mac, Some("  "), None);
        assert_eq!(hints.get(&mac).board.as_deref(), Some("esp32-s3-box"));
        let long = "x".repeat(500);
        hints.record(mac, None, Some(&long));
        assert_eq!(hints.get(&mac).firmware.unwrap().len(), MAX_LEN);
    }
}
