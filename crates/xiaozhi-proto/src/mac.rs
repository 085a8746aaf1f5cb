//! Device MAC addresses in the two spellings the ecosystem uses.
//!
//! Topics and client ids carry the MAC lowercase with `_` between octets
//! (`aa_bb_cc_dd_ee_ff`, "MAC_" in PROTOCOL.md); HTTP headers and manager-api use colons
//! (`aa:bb:cc:dd:ee:ff`). [`Mac`] parses either, stores the six octets and prints both,
//! so a topic can never be built from an unvalidated string.

use std::fmt;
use std::str::FromStr;

/// A device's MAC address (six octets).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Mac([u8; 6]);

/// Why a string is not a MAC address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a MAC address (want six hex octets separated by '_' or ':'): {0:?}")]
pub struct InvalidMac(pub String);

impl Mac {
    /// Builds a MAC from its octets.
    pub const fn from_octets(octets: [u8; 6]) -> Self {
        Mac(octets)
    }

    /// The six octets.
    pub const fn octets(&self) -> [u8; 6] {
        self.0
    }

    /// `aa_bb_cc_dd_ee_ff`: the spelling used in client ids and MQTT topics.
    pub fn underscored(&self) -> String {
        self.join('_')
    }

    /// `aa:bb:cc:dd:ee:ff`: the spelling used in HTTP headers and manager-api tables.
    pub fn colon(&self) -> String {
        self.join(':')
    }

    fn join(&self, sep: char) -> String {
        let mut out = String::with_capacity(17);
        for (i, octet) in self.0.iter().enumerate() {
            if i > 0 {
                out.push(sep);
            }
            out.push_str(&format!("{octet:02x}"));
        }
        out
    }
}

impl FromStr for Mac {
    type Err = InvalidMac;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || InvalidMac(s.chars().take(64).collect());
        let sep = if s.contains('_') { '_' } else { ':' };
        let mut octets = [0u8; 6];
        let mut parts = s.split(sep);
        for octet in &mut octets {
            let part = parts.next().ok_or_else(bad)?;
            if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad());
            }
            *octet = u8::from_str_radix(part, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(Mac(octets))
    }
}

impl fmt::Display for Mac {
    /// Displays the underscored form, the one used on topics and in logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.underscored())
    }
}

impl fmt::Debug for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Mac({self})")
    }
}

/// Serialized in the colon form, as manager-api and JSON documents spell it; either
/// spelling reads back.
impl serde::Serialize for Mac {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.colon())
    }
}

impl<'de> serde::Deserialize<'de> for Mac {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_both_spellings_and_normalises_case() {
        let a: Mac = "AA_bb_cc_dd_ee_ff".parse().unwrap();
        let b: Mac = "aa:bb:cc:dd:ee:ff".parse().unwrap();
        assert_eq!(a, b);
        assert_eq!(a.underscored(), "aa_bb_cc_dd_ee_ff");
        assert_eq!(a.colon(), "aa:bb:cc:dd:ee:ff");
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "",
            "aa_bb",
            "aa_bb_cc_dd_ee_ff_00",
            "zz_bb_cc_dd_ee_ff",
            "aab_b_cc_dd_ee_ff",
            "+a_bb_cc_dd_ee_ff",
        ] {
            assert!(bad.parse::<Mac>().is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn serializes_in_colon_form_and_reads_either() {
        let mac: Mac = "aa_bb_cc_dd_ee_0f".parse().unwrap();
        assert_eq!(
            serde_json::to_string(&mac).unwrap(),
            "\"aa:bb:cc:dd:ee:0f\""
        );
        assert_eq!(
            serde_json::from_str::<Mac>("\"AA_BB_CC_DD_EE_0F\"").unwrap(),
            mac
        );
        assert!(serde_json::from_str::<Mac>("\"nope\"").is_err());
    }

    proptest! {
        #[test]
        fn round_trips(octets in any::<[u8; 6]>()) {
            let mac = Mac::from_octets(octets);
            prop_assert_eq!(mac.underscored().parse::<Mac>().unwrap(), mac);
            prop_assert_eq!(mac.colon().parse::<Mac>().unwrap(), mac);
        }
    }
}
