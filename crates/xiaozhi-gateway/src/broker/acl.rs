//! Who may publish and subscribe where on the broker listener.
//!
//! rumqttd has no ACLs and no publish hook: any client its own listener authenticates can
//! publish anything, admin commands and forged device traffic included. So broker-listener
//! clients end in our own code ([`super::clients`]), which asks this module about every
//! PUBLISH, SUBSCRIBE and will before anything reaches the router.
//!
//! Pure functions, no I/O. The rules:
//!
//! * Nobody on the listener publishes to what the gateway owns: `xiaozhi/devices/...`,
//!   `xiaozhi/events/...`, `xiaozhi/admin/replies/...`, `xiaozhi/admin/errors`,
//!   `device-server`, nor to `$` topics, nor to names with wildcards or NUL.
//! * An admin may publish `xiaozhi/admin/commands`, `xiaozhi/admin/commands/<mac_>`,
//!   `devices/p2p/<mac_>` (canonical lowercase MAC), and anything outside the reserved
//!   namespaces (`xiaozhi/...`, `devices/...`, `device-server`, `$...`).
//! * An observer publishes nothing.
//! * An admin may subscribe to any valid filter (shared subscriptions included); an
//!   observer only to filters whose first two levels are literally `xiaozhi/devices` or
//!   `xiaozhi/events` (so `#`, `xiaozhi/#`, `xiaozhi/+/...` and `xiaozhi/admin/...` are
//!   refused).

use crate::config::BrokerRole;
use crate::protocol::topics;

/// Why a publish or subscription was refused: a message for logs and a stable label for
/// metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Empty, or containing a wildcard or NUL.
    #[error("not a valid topic name")]
    InvalidTopic,
    /// Empty, a misplaced wildcard, NUL, or a malformed shared subscription.
    #[error("not a valid topic filter")]
    InvalidFilter,
    /// `$...`: the broker's own namespace.
    #[error("$ topics belong to the broker")]
    SystemTopic,
    /// A topic only the gateway publishes on.
    #[error("the gateway owns this topic")]
    GatewayOwned,
    /// Inside `xiaozhi/...` or `devices/...` but not one of the topics admins may publish.
    #[error(
        "reserved namespace: admins publish only xiaozhi/admin/commands[/<mac_>] and devices/p2p/<mac_> there"
    )]
    Reserved,
    /// The role may not publish at all.
    #[error("this role may not publish")]
    ReadOnly,
    /// Outside what an observer may read.
    #[error("observers may subscribe only under xiaozhi/devices and xiaozhi/events")]
    OutsideObserverScope,
}

impl Refusal {
    /// A short snake_case label (logs, metric labels).
    pub fn label(&self) -> &'static str {
        match self {
            Refusal::InvalidTopic => "invalid_topic",
            Refusal::InvalidFilter => "invalid_filter",
            Refusal::SystemTopic => "system_topic",
            Refusal::GatewayOwned => "gateway_owned",
            Refusal::Reserved => "reserved",
            Refusal::ReadOnly => "read_only",
            Refusal::OutsideObserverScope => "outside_observer_scope",
        }
    }
}

/// The role's name as configured (`admin`, `observer`).
pub fn role_name(role: BrokerRole) -> &'static str {
    match role {
        BrokerRole::Admin => "admin",
        BrokerRole::Observer => "observer",
    }
}

/// May a client with `role` publish on `topic`?
pub fn may_publish(role: BrokerRole, topic: &str) -> Result<(), Refusal> {
    if topic.is_empty() || topic.contains(['+', '#', '\0']) {
        return Err(Refusal::InvalidTopic);
    }
    if topic.starts_with('$') {
        return Err(Refusal::SystemTopic);
    }
    match role {
        BrokerRole::Observer => Err(Refusal::ReadOnly),
        BrokerRole::Admin => admin_may_publish(topic),
    }
}

fn admin_may_publish(topic: &str) -> Result<(), Refusal> {
    let first = topic.split('/').next().unwrap_or_default();
    if first == topics::DEVICE_UPLINK {
        return Err(Refusal::GatewayOwned);
    }
    if first == topics::XIAOZHI_ROOT {
        if topics::parse_admin_command(topic).is_some() {
            return Ok(());
        }
        let owned = topic.starts_with(topics::DEVICES_PREFIX)
            || topic.starts_with(topics::EVENTS_PREFIX)
            || topic.starts_with(topics::ADMIN_REPLIES_PREFIX)
            || topic == topics::ADMIN_ERRORS
            // The parents of the owned prefixes are the gateway's too.
            || topic == "xiaozhi/devices"
            || topic == "xiaozhi/events"
            || topic == "xiaozhi/admin/replies";
        return Err(if owned {
            Refusal::GatewayOwned
        } else {
            Refusal::Reserved
        });
    }
    if first == topics::DEVICES_ROOT {
        let p2p = topic
            .strip_prefix(topics::P2P_PREFIX)
            .and_then(topics::parse_canonical_mac);
        return if p2p.is_some() {
            Ok(())
        } else {
            Err(Refusal::Reserved)
        };
    }
    Ok(())
}

/// May a client with `role` subscribe to `filter`?
pub fn may_subscribe(role: BrokerRole, filter: &str) -> Result<(), Refusal> {
    let inner = match filter.strip_prefix("$share/") {
        Some(rest) => {
            // `$share/<group>/<filter>`: the group is one level without wildcards.
            let (group, inner) = rest.split_once('/').ok_or(Refusal::InvalidFilter)?;
            if group.is_empty() || group.contains(['+', '#', '\0']) {
                return Err(Refusal::InvalidFilter);
            }
            inner
        }
        None => filter,
    };
    if !valid_filter(inner) {
        return Err(Refusal::InvalidFilter);
    }
    if inner.starts_with('$') {
        return Err(Refusal::SystemTopic);
    }
    match role {
        BrokerRole::Admin => Ok(()),
        BrokerRole::Observer => {
            let mut levels = inner.split('/');
            let (first, second) = (levels.next(), levels.next());
            if first == Some(topics::XIAOZHI_ROOT) && matches!(second, Some("devices" | "events")) {
                Ok(())
            } else {
                Err(Refusal::OutsideObserverScope)
            }
        }
    }
}

/// MQTT filter syntax: non-empty, no NUL, `+` only as a whole level, `#` only as the whole
/// last level.
fn valid_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.contains('\0') {
        return false;
    }
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        let last = levels.peek().is_none();
        let ok = match level {
            "+" => true,
            "#" => last,
            other => !other.contains(['+', '#']),
        };
        if !ok {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use BrokerRole::{Admin, Observer};

    const MAC: &str = "aa_bb_cc_dd_ee_ff";

    #[test]
    fn admin_publishes_commands_and_p2p_only_inside_reserved_namespaces() {
        for ok in [
            "xiaozhi/admin/commands".to_owned(),
            format!("xiaozhi/admin/commands/{MAC}"),
            format!("devices/p2p/{MAC}"),
            "integration/anything".to_owned(),
            "a//b".to_owned(),
            "/leading".to_owned(),
            "xiaozhix/devices".to_owned(),
            "device-serverx".to_owned(),
        ] {
            assert_eq!(may_publish(Admin, &ok), Ok(()), "{ok}");
        }
        let refused = [
            (format!("xiaozhi/devices/{MAC}/up"), Refusal::GatewayOwned),
            (
                format!("xiaozhi/devices/{MAC}/presence"),
                Refusal::GatewayOwned,
            ),
            ("xiaozhi/devices".to_owned(), Refusal::GatewayOwned),
            ("xiaozhi/events/upstream".to_owned(), Refusal::GatewayOwned),
            ("xiaozhi/admin/replies/r1".to_owned(), Refusal::GatewayOwned),
            ("xiaozhi/admin/errors".to_owned(), Refusal::GatewayOwned),
            ("device-server".to_owned(), Refusal::GatewayOwned),
            ("device-server/x".to_owned(), Refusal::GatewayOwned),
            ("$SYS/x".to_owned(), Refusal::SystemTopic),
            ("$share/g/x".to_owned(), Refusal::SystemTopic),
            ("xiaozhi".to_owned(), Refusal::Reserved),
            ("xiaozhi/other".to_owned(), Refusal::Reserved),
            ("xiaozhi/admin/commands/".to_owned(), Refusal::Reserved),
            (
                "xiaozhi/admin/commands/not-a-mac".to_owned(),
                Refusal::Reserved,
            ),
            (
                "xiaozhi/admin/commands/AA_BB_CC_DD_EE_FF".to_owned(),
                Refusal::Reserved,
            ),
            (format!("xiaozhi/admin/commands/{MAC}/x"), Refusal::Reserved),
            (
                "devices/p2p/aa:bb:cc:dd:ee:ff".to_owned(),
                Refusal::Reserved,
            ),
            (
                "devices/p2p/AA_BB_CC_DD_EE_FF".to_owned(),
                Refusal::Reserved,
            ),
            (format!("devices/p2p/{MAC}/x"), Refusal::Reserved),
            ("devices/other".to_owned(), Refusal::Reserved),
            ("devices".to_owned(), Refusal::Reserved),
            ("".to_owned(), Refusal::InvalidTopic),
            ("a/+/b".to_owned(), Refusal::InvalidTopic),
            ("a/#".to_owned(), Refusal::InvalidTopic),
            ("devices/p2p/+".to_owned(), Refusal::InvalidTopic),
            ("a\0b".to_owned(), Refusal::InvalidTopic),
        ];
        for (topic, why) in refused {
            assert_eq!(may_publish(Admin, &topic), Err(why), "{topic:?}");
        }
    }

    #[test]
    fn observer_publishes_nothing() {
        for topic in [
            "xiaozhi/admin/commands".to_owned(),
            format!("xiaozhi/admin/commands/{MAC}"),
            format!("devices/p2p/{MAC}"),
            "integration/anything".to_owned(),
        ] {
            assert_eq!(may_publish(Observer, &topic), Err(Refusal::ReadOnly));
        }
    }

    #[test]
    fn admin_subscribes_to_any_valid_filter() {
        for ok in [
            "#",
            "+",
            "xiaozhi/#",
            "xiaozhi/+/x",
            "devices/p2p/+",
            "xiaozhi/admin/commands/+",
            "a//b",
            "$share/g/xiaozhi/devices/#",
        ] {
            assert_eq!(may_subscribe(Admin, ok), Ok(()), "{ok}");
        }
        for (bad, why) in [
            ("", Refusal::InvalidFilter),
            ("a/#/b", Refusal::InvalidFilter),
            ("a#", Refusal::InvalidFilter),
            ("a/b+", Refusal::InvalidFilter),
            ("a\0", Refusal::InvalidFilter),
            ("$share/g", Refusal::InvalidFilter),
            ("$share//x", Refusal::InvalidFilter),
            ("$share/+/x", Refusal::InvalidFilter),
            ("$share/g/", Refusal::InvalidFilter),
            ("$SYS/#", Refusal::SystemTopic),
            ("$share/g/$SYS/#", Refusal::SystemTopic),
        ] {
            assert_eq!(may_subscribe(Admin, bad), Err(why), "{bad:?}");
        }
    }

    #[test]
    fn observer_reads_device_and_gateway_events_only() {
        for ok in [
            "xiaozhi/devices/#",
            "xiaozhi/devices/+/up",
            "xiaozhi/devices",
            "xiaozhi/events/#",
            "xiaozhi/events/upstream",
            "$share/g/xiaozhi/events/#",
        ] {
            assert_eq!(may_subscribe(Observer, ok), Ok(()), "{ok}");
        }
        for bad in [
            "#",
            "+/#",
            "xiaozhi/#",
            "xiaozhi/+/x",
            "xiaozhi/+",
            "xiaozhi/admin/#",
            "xiaozhi/admin/commands/+",
            "xiaozhi/admin/replies/+",
            "devices/p2p/+",
            "xiaozhi",
            "xiaozhi/devicesx/#",
            "$share/g/#",
        ] {
            assert_eq!(
                may_subscribe(Observer, bad),
                Err(Refusal::OutsideObserverScope),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn labels_are_distinct() {
        let all = [
            Refusal::InvalidTopic,
            Refusal::InvalidFilter,
            Refusal::SystemTopic,
            Refusal::GatewayOwned,
            Refusal::Reserved,
            Refusal::ReadOnly,
            Refusal::OutsideObserverScope,
        ];
        let labels: std::collections::HashSet<_> = all.iter().map(Refusal::label).collect();
        assert_eq!(labels.len(), all.len());
    }
}
