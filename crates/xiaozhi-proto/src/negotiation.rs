//! Which audio transport a conversation gets, from what the device announced in its
//! hello and what this gateway offers (docs/transports.md).
//!
//! A device opts in with flags in its hello's `features` object: `"udp_aead": true`
//! (AES-128-GCM over the usual UDP port) and `"quic": true` (a QUIC connection of its
//! own). Stock firmware announces neither and gets exactly what it always got,
//! AES-128-CTR. When several are possible the strongest wins: QUIC, then GCM.

use serde_json::Value;

use super::encryption::Encryption;

/// The hello feature flag for AES-128-GCM over UDP.
pub const FEATURE_UDP_AEAD: &str = "udp_aead";
/// The hello feature flag for the QUIC transport.
pub const FEATURE_QUIC: &str = "quic";

/// The transport chosen for a conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AudioTransport {
    Udp(Encryption),
    Quic,
}

/// What this gateway offers, from its configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offered {
    pub udp_aead: bool,
    pub quic: bool,
}

/// A device that must use an authenticated transport announced none this gateway offers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "device group {group:?} requires an authenticated audio transport (udp_aead or quic) but the hello announced none this gateway offers (announced: {announced})"
)]
pub struct NotAuthenticated {
    pub group: String,
    pub announced: String,
}

/// True if `features[flag]` is JSON `true`.
fn announces(features: &Value, flag: &str) -> bool {
    features.get(flag).and_then(Value::as_bool) == Some(true)
}

/// Picks the transport. `required` says the device's group may not use AES-CTR.
pub fn choose(
    features: &Value,
    offered: Offered,
    group: &str,
    required: bool,
) -> Result<AudioTransport, NotAuthenticated> {
    if offered.quic && announces(features, FEATURE_QUIC) {
        return Ok(AudioTransport::Quic);
    }
    if offered.udp_aead && announces(features, FEATURE_UDP_AEAD) {
        return Ok(AudioTransport::Udp(Encryption::Aes128Gcm));
    }
    if required {
        let announced: Vec<&str> = [FEATURE_QUIC, FEATURE_UDP_AEAD]
            .into_iter()
            .filter(|f| announces(features, f))
            .collect();
        return Err(NotAuthenticated {
            group: group.to_owned(),
            announced: if announced.is_empty() {
                "none".to_owned()
            } else {
                announced.join(", ")
            },
        });
    }
    Ok(AudioTransport::Udp(Encryption::Aes128Ctr))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const ALL: Offered = Offered {
        udp_aead: true,
        quic: true,
    };

    #[test]
    fn stock_firmware_always_gets_ctr() {
        let firmware = json!({"mcp": true, "aec": false});
        for udp_aead in [false, true] {
            for quic in [false, true] {
                let offered = Offered { udp_aead, quic };
                assert_eq!(
                    choose(&firmware, offered, "GID_test", false),
                    Ok(AudioTransport::Udp(Encryption::Aes128Ctr))
                );
            }
        }
        assert_eq!(
            choose(&Value::Null, ALL, "GID_test", false),
            Ok(AudioTransport::Udp(Encryption::Aes128Ctr))
        );
    }

    #[test]
    fn the_strongest_common_transport_wins() {
        let both = json!({"udp_aead": true, "quic": true});
        assert_eq!(choose(&both, ALL, "g", false), Ok(AudioTransport::Quic));
        let no_quic = Offered {
            udp_aead: true,
            quic: false,
        };
        assert_eq!(
            choose(&both, no_quic, "g", false),
            Ok(AudioTransport::Udp(Encryption::Aes128Gcm))
        );
        // Only JSON true counts.
        let truthy = json!({"udp_aead": 1, "quic": "yes"});
        assert_eq!(
            choose(&truthy, ALL, "g", false),
            Ok(AudioTransport::Udp(Encryption::Aes128Ctr))
        );
    }

    #[test]
    fn a_required_group_is_refused_ctr() {
        let e = choose(&json!({"mcp": true}), ALL, "GID_secure", true).unwrap_err();
        assert!(e.to_string().contains("GID_secure"), "{e}");
        // It announced QUIC, but this gateway runs no QUIC endpoint.
        let only_gcm = Offered {
            udp_aead: true,
            quic: false,
        };
        let e = choose(&json!({"quic": true}), only_gcm, "GID_secure", true).unwrap_err();
        assert_eq!(e.announced, "quic");
        assert_eq!(
            choose(&json!({"udp_aead": true}), ALL, "GID_secure", true),
            Ok(AudioTransport::Udp(Encryption::Aes128Gcm))
        );
    }
}
