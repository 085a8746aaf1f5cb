//! The topic map: every MQTT topic the gateway reads or writes, in one place.
//!
//! | topic | who publishes | what |
//! | --- | --- | --- |
//! | `device-server` | devices (device port only) | all device JSON; never reaches the bus as is |
//! | `devices/p2p/<mac_>` | any authorised bus client | delivered to that device, which never subscribed |
//! | `xiaozhi/devices/<mac_>/up` | gateway | each device message, with its identity in the topic |
//! | `xiaozhi/devices/<mac_>/down` | gateway | each message the gateway itself sent the device |
//! | `xiaozhi/devices/<mac_>/presence` | gateway | `{"state":"online"|"offline",...}` on connect/disconnect |
//!
//! Architecture invariant: device traffic reaches the bus only on identity-bearing topics
//! (`xiaozhi/devices/<mac_>/...`), built from the MAC the device authenticated with.

use crate::protocol::mac::Mac;

/// Prefix of the server-to-device topics.
pub const P2P_PREFIX: &str = "devices/p2p/";
/// Filter the gateway subscribes to on the bus to deliver messages to devices.
pub const P2P_FILTER: &str = "devices/p2p/+";

/// `devices/p2p/<mac_>`: where the firmware expects server messages.
pub fn p2p(mac: &Mac) -> String {
    format!("{P2P_PREFIX}{mac}")
}

/// The device a `devices/p2p/<mac_>` topic addresses, if it is one.
pub fn parse_p2p(topic: &str) -> Option<Mac> {
    topic.strip_prefix(P2P_PREFIX)?.parse().ok()
}

/// `xiaozhi/devices/<mac_>/up`: a device's messages, as seen by bus clients.
pub fn device_up(mac: &Mac) -> String {
    format!("xiaozhi/devices/{mac}/up")
}

/// `xiaozhi/devices/<mac_>/down`: messages the gateway sent the device.
pub fn device_down(mac: &Mac) -> String {
    format!("xiaozhi/devices/{mac}/down")
}

/// `xiaozhi/devices/<mac_>/presence`: connect and disconnect events.
pub fn device_presence(mac: &Mac) -> String {
    format!("xiaozhi/devices/{mac}/presence")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn p2p_round_trips_and_rejects_others() {
        let mac: Mac = "aa_bb_cc_dd_ee_ff".parse().unwrap();
        assert_eq!(p2p(&mac), "devices/p2p/aa_bb_cc_dd_ee_ff");
        assert_eq!(parse_p2p(&p2p(&mac)), Some(mac));
        assert_eq!(parse_p2p("devices/p2p/+"), None);
        assert_eq!(parse_p2p("devices/p2p/aa_bb_cc_dd_ee_ff/x"), None);
        assert_eq!(device_up(&mac), "xiaozhi/devices/aa_bb_cc_dd_ee_ff/up");
    }
}
