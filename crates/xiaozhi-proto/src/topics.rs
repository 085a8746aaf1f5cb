//! The topic map: every MQTT topic the gateway reads or writes, in one place. Pure string
//! building and parsing (here in the protocol core because the device state machine
//! checks a device's own topic too); the bus and the broker listener use it.
//!
//! | topic | who publishes | what |
//! | --- | --- | --- |
//! | `device-server` | devices (device port only) | all device JSON; never reaches the bus as is |
//! | `devices/p2p/<mac_>` | any authorised bus client | delivered to that device, which never subscribed |
//! | `xiaozhi/devices/<mac_>/up` | gateway | each device message, with its identity in the topic |
//! | `xiaozhi/devices/<mac_>/down` | gateway | each message the gateway itself sent the device |
//! | `xiaozhi/devices/<mac_>/presence` | gateway (retained) | `{"state":"online"|"offline",...}` on connect/disconnect |
//! | `xiaozhi/devices/<mac_>/session` | gateway | a device's conversation events |
//! | `xiaozhi/devices/<mac_>/chat` | gateway | a device's chat transcript |
//! | `xiaozhi/events/upstream` | gateway | upstream (xiaozhi-server) connection events |
//! | `xiaozhi/admin/commands` | admin bus clients | gateway-wide admin commands, read by the gateway |
//! | `xiaozhi/admin/commands/<mac_>` | admin bus clients | admin commands about one device, read by the gateway |
//! | `xiaozhi/admin/replies/<request_id>` | gateway | the answer to one admin command |
//! | `xiaozhi/admin/errors` | gateway | admin commands that could not be read or answered |
//! | `xiaozhi/nodes/<node>/commands` | gateway nodes (scale-out) | an admin command forwarded to the node that holds the device |
//! | `xiaozhi/nodes/<node>/replies/<n>` | gateway nodes (scale-out) | the answer to a command a node's management API forwarded |
//!
//! The map is the same on the embedded broker and on an external one. On an external
//! broker (scale-out, `xiaozhi_gateway::broker::external`) every node subscribes to `devices/p2p/+`
//! (and delivers what is for its own devices), to the command topics through the shared
//! subscription `$share/<bus.share_group>/...` (each command reaches one node), and to its
//! own `xiaozhi/nodes/<node>/...` topics.
//!
//! Architecture invariant: device traffic reaches the bus only on identity-bearing topics
//! (`xiaozhi/devices/<mac_>/...`), built from the MAC the device authenticated with.
//!
//! Who may publish and subscribe where on the broker listener is decided in
//! `xiaozhi_gateway::broker::acl`: the gateway owns `xiaozhi/devices/`, `xiaozhi/events/`,
//! `xiaozhi/admin/replies/`, `xiaozhi/admin/errors` and `device-server`; admins may publish
//! only the command topics and `devices/p2p/<mac_>` inside the reserved namespaces.

use crate::mac::Mac;

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

/// First level of every gateway topic.
pub const XIAOZHI_ROOT: &str = "xiaozhi";
/// First level of the firmware's server-to-device topics.
pub const DEVICES_ROOT: &str = "devices";
/// Prefix of the per-device topics the gateway publishes.
pub const DEVICES_PREFIX: &str = "xiaozhi/devices/";
/// Prefix of the gateway's own events.
pub const EVENTS_PREFIX: &str = "xiaozhi/events/";
/// Where admin bus clients send gateway-wide commands.
pub const ADMIN_COMMANDS: &str = "xiaozhi/admin/commands";
/// Prefix of the per-device admin command topics (`xiaozhi/admin/commands/<mac_>`).
pub const ADMIN_COMMANDS_PREFIX: &str = "xiaozhi/admin/commands/";
/// Filter the gateway subscribes to for per-device admin commands.
pub const ADMIN_COMMANDS_FILTER: &str = "xiaozhi/admin/commands/+";
/// Prefix of the gateway's answers to admin commands.
pub const ADMIN_REPLIES_PREFIX: &str = "xiaozhi/admin/replies/";
/// Where the gateway reports admin commands it could not read or answer.
pub const ADMIN_ERRORS: &str = "xiaozhi/admin/errors";
/// The topic devices publish to (the front end's default `mqtt.uplink_topic`); reserved on
/// the bus.
pub const DEVICE_UPLINK: &str = "device-server";

/// `xiaozhi/admin/commands/<mac_>`: admin commands about one device.
pub fn admin_command(mac: &Mac) -> String {
    format!("{ADMIN_COMMANDS_PREFIX}{mac}")
}

/// What an admin command topic addresses: `Some(None)` for the gateway-wide
/// `xiaozhi/admin/commands`, `Some(Some(mac))` for `xiaozhi/admin/commands/<mac_>` (MAC in
/// its canonical lowercase underscored form), `None` for anything else.
pub fn parse_admin_command(topic: &str) -> Option<Option<Mac>> {
    if topic == ADMIN_COMMANDS {
        return Some(None);
    }
    let mac = parse_canonical_mac(topic.strip_prefix(ADMIN_COMMANDS_PREFIX)?)?;
    Some(Some(mac))
}

/// `xiaozhi/admin/replies/<request_id>`: where the answer to one command goes. `None` when
/// `request_id` cannot be one topic level (empty, longer than 128 bytes, or containing `/`,
/// `+`, `#` or NUL), so a client-chosen id can never address another topic.
pub fn admin_reply(request_id: &str) -> Option<String> {
    let valid = !request_id.is_empty()
        && request_id.len() <= 128
        && !request_id.contains(['/', '+', '#', '\0']);
    valid.then(|| format!("{ADMIN_REPLIES_PREFIX}{request_id}"))
}

/// Prefix of the node-to-node topics (scale-out).
pub const NODES_PREFIX: &str = "xiaozhi/nodes/";

/// `xiaozhi/nodes/<node>/commands`: admin commands forwarded to `node`.
pub fn node_commands(node: &str) -> String {
    format!("{NODES_PREFIX}{node}/commands")
}

/// `xiaozhi/nodes/<node>/replies/+`: the filter for answers to `node`'s forwarded calls.
pub fn node_replies_filter(node: &str) -> String {
    format!("{NODES_PREFIX}{node}/replies/+")
}

/// `xiaozhi/nodes/<node>/replies/<call>`: the answer to `node`'s forwarded call `call`.
pub fn node_reply(node: &str, call: u64) -> String {
    format!("{NODES_PREFIX}{node}/replies/{call}")
}

/// `xiaozhi/nodes/<node>/calls`: device-calling actions for devices on `node`.
pub fn node_calls(node: &str) -> String {
    format!("{NODES_PREFIX}{node}/calls")
}

/// `xiaozhi/nodes/<node>/call-audio/+/+`: the filter for call audio to `node`'s legs.
pub fn node_call_audio_filter(node: &str) -> String {
    format!("{NODES_PREFIX}{node}/call-audio/+/+")
}

/// `xiaozhi/nodes/<node>/call-audio/<call>/<mac_>`: audio for `mac`'s leg of call
/// `call`, on `node`.
pub fn node_call_audio(node: &str, call: u64, mac: &Mac) -> String {
    format!("{NODES_PREFIX}{node}/call-audio/{call}/{mac}")
}

/// Which of `node`'s own topics `topic` is, if any.
pub fn parse_node_topic(node: &str, topic: &str) -> Option<NodeTopic> {
    let rest = topic.strip_prefix(NODES_PREFIX)?.strip_prefix(node)?;
    match rest.strip_prefix('/')? {
        "commands" => Some(NodeTopic::Commands),
        "calls" => Some(NodeTopic::Calls),
        other => {
            if let Some(audio) = other.strip_prefix("call-audio/") {
                let (call, mac) = audio.split_once('/')?;
                return Some(NodeTopic::CallAudio {
                    call: call.parse().ok()?,
                    mac: parse_canonical_mac(mac)?,
                });
            }
            other
                .strip_prefix("replies/")?
                .parse()
                .ok()
                .map(NodeTopic::Reply)
        }
    }
}

/// One of a node's own topics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeTopic {
    /// `xiaozhi/nodes/<node>/commands`.
    Commands,
    /// `xiaozhi/nodes/<node>/replies/<call>`.
    Reply(u64),
    /// `xiaozhi/nodes/<node>/calls`.
    Calls,
    /// `xiaozhi/nodes/<node>/call-audio/<call>/<mac_>`.
    CallAudio { call: u64, mac: Mac },
}

/// A shared subscription (`$share/<group>/<filter>`): the broker hands each message to
/// one member of the group.
pub fn shared(group: &str, filter: &str) -> String {
    format!("$share/{group}/{filter}")
}

/// `xiaozhi/devices/<mac_>/session`: a device's conversation events.
pub fn device_session(mac: &Mac) -> String {
    format!("{DEVICES_PREFIX}{mac}/session")
}

/// `xiaozhi/devices/<mac_>/chat`: a device's chat transcript.
pub fn device_chat(mac: &Mac) -> String {
    format!("{DEVICES_PREFIX}{mac}/chat")
}

/// `xiaozhi/events/upstream`: upstream (xiaozhi-server) connection events.
pub fn events_upstream() -> String {
    format!("{EVENTS_PREFIX}upstream")
}

/// `xiaozhi/events/calls`: device calls ringing, bridged and ended.
pub fn events_calls() -> String {
    format!("{EVENTS_PREFIX}calls")
}

/// A MAC spelled exactly as topics spell it (`aa_bb_cc_dd_ee_ff`, lowercase), so one
/// device has exactly one topic name.
pub fn parse_canonical_mac(s: &str) -> Option<Mac> {
    let mac: Mac = s.parse().ok()?;
    (mac.underscored() == s).then_some(mac)
}

/// `xiaozhi/devices/<mac_>/up`: a device's messages, as seen by bus clients.
pub fn device_up(mac: &Mac) -> String {
    format!("xiaozhi/devices/{mac}/up")
}

/// `xiaozhi/devices/<mac_>/down`: messages the gateway sent the device.
pub fn device_down(mac: &Mac) -> String {
    format!("xiaozhi/devices/{mac}/down")
}

/// `xiaozhi/devices/<mac_>/push`: every state change of a push to the device.
pub fn device_push(mac: &Mac) -> String {
    format!("{DEVICES_PREFIX}{mac}/push")
}

/// `xiaozhi/events/push`: a push request was queued (its batch id and size). Every node
/// of a cluster reads it and delivers the batch's pushes to the devices it holds.
pub const EVENTS_PUSH: &str = "xiaozhi/events/push";

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

    #[test]
    fn admin_topics() {
        let mac: Mac = "aa_bb_cc_dd_ee_ff".parse().unwrap();
        assert_eq!(
            admin_command(&mac),
            "xiaozhi/admin/commands/aa_bb_cc_dd_ee_ff"
        );
        assert_eq!(parse_admin_command(ADMIN_COMMANDS), Some(None));
        assert_eq!(parse_admin_command(&admin_command(&mac)), Some(Some(mac)));
        assert_eq!(
            parse_admin_command("xiaozhi/admin/commands/AA_BB_CC_DD_EE_FF"),
            None,
            "one spelling per device"
        );
        assert_eq!(parse_admin_command("xiaozhi/admin/commands/"), None);
        assert_eq!(parse_admin_command("xiaozhi/admin/commandsx"), None);
        assert_eq!(
            admin_reply("r-1").as_deref(),
            Some("xiaozhi/admin/replies/r-1")
        );
        for bad in ["", "a/b", "+", "#", "a\0", &"x".repeat(129)] {
            assert_eq!(admin_reply(bad), None, "{bad:?}");
        }
        assert_eq!(
            device_session(&mac),
            "xiaozhi/devices/aa_bb_cc_dd_ee_ff/session"
        );
        assert_eq!(device_chat(&mac), "xiaozhi/devices/aa_bb_cc_dd_ee_ff/chat");
        assert_eq!(events_upstream(), "xiaozhi/events/upstream");
        assert!(parse_canonical_mac("aa:bb:cc:dd:ee:ff").is_none());
    }

    #[test]
    fn node_topics() {
        assert_eq!(node_commands("gw-a"), "xiaozhi/nodes/gw-a/commands");
        assert_eq!(node_reply("gw-a", 7), "xiaozhi/nodes/gw-a/replies/7");
        assert_eq!(node_replies_filter("gw-a"), "xiaozhi/nodes/gw-a/replies/+");
        assert_eq!(
            parse_node_topic("gw-a", &node_commands("gw-a")),
            Some(NodeTopic::Commands)
        );
        assert_eq!(
            parse_node_topic("gw-a", &node_reply("gw-a", 7)),
            Some(NodeTopic::Reply(7))
        );
        // Another node's topics, or a node whose id extends ours, are not ours.
        assert_eq!(parse_node_topic("gw-a", &node_commands("gw-b")), None);
        assert_eq!(parse_node_topic("gw", &node_commands("gw-a")), None);
        assert_eq!(
            parse_node_topic("gw-a", "xiaozhi/nodes/gw-a/replies/x"),
            None
        );
        assert_eq!(parse_node_topic("gw-a", "xiaozhi/nodes/gw-a/other"), None);
        assert_eq!(
            parse_node_topic("gw-a", &node_calls("gw-a")),
            Some(NodeTopic::Calls)
        );
        let mac: Mac = "aa:bb:cc:dd:ee:01".parse().unwrap();
        assert_eq!(
            parse_node_topic("gw-a", &node_call_audio("gw-a", 42, &mac)),
            Some(NodeTopic::CallAudio { call: 42, mac })
        );
        assert_eq!(
            parse_node_topic("gw-b", &node_call_audio("gw-a", 42, &mac)),
            None
        );
        for bad in [
            "xiaozhi/nodes/gw-a/call-audio/x/aa_bb_cc_dd_ee_01",
            "xiaozhi/nodes/gw-a/call-audio/42/AA_BB_CC_DD_EE_01",
            "xiaozhi/nodes/gw-a/call-audio/42",
        ] {
            assert_eq!(parse_node_topic("gw-a", bad), None, "{bad}");
        }
        assert_eq!(
            shared("xiaozhi-gateway", ADMIN_COMMANDS),
            "$share/xiaozhi-gateway/xiaozhi/admin/commands"
        );
    }
}
