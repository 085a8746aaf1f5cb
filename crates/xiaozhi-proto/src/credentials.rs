//! MQTT credentials of xiaozhi devices (PROTOCOL.md section 2).
//!
//! A device's client id is `GROUP@@@MAC_@@@UUID`, its username the base64 of a small JSON
//! object, and its password `base64(HMAC-SHA256(signature_key, client_id + "|" + username))`.
//! This module parses the client id and checks the password in constant time. It also
//! produces credentials, for the simulator and for tests.
//!
//! Unlike the Node gateway, the two-part client id `GROUP@@@MAC_` is refused, and a
//! missing signature key is never taken to mean "accept everyone": that choice is made
//! explicitly in config (`auth.allow_unsigned`) and reaches this module as [`Verifier::Unsigned`].

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, Mac as _};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use super::mac::Mac;

type HmacSha256 = Hmac<Sha256>;

/// Separator between the parts of a device client id.
const PART_SEPARATOR: &str = "@@@";

/// Who a device says it is, parsed from its client id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceIdentity {
    /// The full client id as sent in CONNECT.
    pub client_id: String,
    /// First part: the board name or `GID_default`.
    pub group: String,
    /// Second part: the device's MAC address.
    pub mac: Mac,
    /// Third part: the device UUID (manager-api puts the MAC here as well).
    pub uuid: String,
}

/// Why a CONNECT was refused. Each maps to one MQTT 3.1.1 CONNACK return code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// The client id is not `GROUP@@@MAC_@@@UUID` (this includes the Node gateway's
    /// unsigned two-part form).
    #[error("client id is not GROUP@@@MAC_@@@UUID")]
    MalformedClientId,
    /// No username or no password was sent, or the password is empty.
    #[error("missing username or password")]
    MissingCredentials,
    /// The username is not base64 of a JSON object.
    #[error("username is not base64 of a JSON object")]
    MalformedUsername,
    /// The password does not match the HMAC of client id and username.
    #[error("password does not match the signature")]
    BadSignature,
}

impl AuthError {
    /// The MQTT 3.1.1 CONNACK return code for this refusal: 2 (identifier rejected) for a
    /// client id we cannot parse, 4 (bad user name or password) for everything else.
    pub fn connack_code(&self) -> u8 {
        match self {
            AuthError::MalformedClientId => 0x02,
            _ => 0x04,
        }
    }

    /// A short, stable label for counters and logs.
    pub fn label(&self) -> &'static str {
        match self {
            AuthError::MalformedClientId => "malformed_client_id",
            AuthError::MissingCredentials => "missing_credentials",
            AuthError::MalformedUsername => "malformed_username",
            AuthError::BadSignature => "bad_signature",
        }
    }
}

/// Parses `GROUP@@@MAC_@@@UUID`.
pub fn parse_client_id(client_id: &str) -> Result<DeviceIdentity, AuthError> {
    let mut parts = client_id.split(PART_SEPARATOR);
    let (Some(group), Some(mac), Some(uuid), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(AuthError::MalformedClientId);
    };
    if group.is_empty() || uuid.is_empty() || !mac.contains('_') {
        return Err(AuthError::MalformedClientId);
    }
    let mac: Mac = mac.parse().map_err(|_| AuthError::MalformedClientId)?;
    Ok(DeviceIdentity {
        client_id: client_id.to_owned(),
        group: group.to_owned(),
        mac,
        uuid: uuid.to_owned(),
    })
}

/// Computes the password a device with this client id and username must present.
pub fn sign(signature_key: &[u8], client_id: &str, username: &str) -> String {
    B64.encode(mac_bytes(signature_key, client_id, username))
}

fn mac_bytes(signature_key: &[u8], client_id: &str, username: &str) -> [u8; 32] {
    let mut mac = HmacSha256::new_from_slice(signature_key).expect("HMAC accepts any key length");
    mac.update(client_id.as_bytes());
    mac.update(b"|");
    mac.update(username.as_bytes());
    mac.finalize().into_bytes().into()
}

/// Builds a username the way manager-api does: base64 of `{"ip":"..."}`.
pub fn username_for_ip(ip: &str) -> String {
    B64.encode(serde_json::json!({ "ip": ip }).to_string())
}

/// How device passwords are checked.
#[derive(Clone)]
pub enum Verifier {
    /// Passwords must be the HMAC under this key.
    Signed { key: Vec<u8> },
    /// Development only: any non-empty password is accepted (client id and username
    /// must still be well-formed, so topics and logs still name a real MAC).
    Unsigned,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Verifier::Signed { .. } => f.write_str("Verifier::Signed(<redacted>)"),
            Verifier::Unsigned => f.write_str("Verifier::Unsigned"),
        }
    }
}

impl Verifier {
    /// Checks a CONNECT's client id, username and password.
    pub fn verify(
        &self,
        client_id: &str,
        username: Option<&str>,
        password: Option<&str>,
    ) -> Result<DeviceIdentity, AuthError> {
        let identity = parse_client_id(client_id)?;
        let (Some(username), Some(password)) = (username, password) else {
            return Err(AuthError::MissingCredentials);
        };
        if username.is_empty() || password.is_empty() {
            return Err(AuthError::MissingCredentials);
        }
        if !username_is_json_object(username) {
            return Err(AuthError::MalformedUsername);
        }
        match self {
            Verifier::Unsigned => Ok(identity),
            Verifier::Signed { key } => {
                let expected = mac_bytes(key, client_id, username);
                // Decoding the presented password (rather than encoding ours and comparing
                // strings) keeps the comparison over fixed-size bytes; a password that is
                // not 32 bytes of base64 can never match.
                let presented = B64.decode(password).unwrap_or_default();
                if presented.len() == expected.len() && bool::from(presented.ct_eq(&expected)) {
                    Ok(identity)
                } else {
                    Err(AuthError::BadSignature)
                }
            }
        }
    }
}

fn username_is_json_object(username: &str) -> bool {
    B64.decode(username)
        .ok()
        .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
        .is_some_and(|value| value.is_object())
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &[u8] = b"test-signature-key";
    const CLIENT_ID: &str = "GID_test@@@aa_bb_cc_dd_ee_ff@@@aa_bb_cc_dd_ee_ff";
    const USERNAME: &str = "eyJpcCI6IjE5Mi4wLjIuMTAifQ==";
    const PASSWORD: &str = "FfwPIt7TJgChnLuZz6sXpMkd1uSjj3fB8msdP5us6fk=";

    fn signed() -> Verifier {
        Verifier::Signed { key: KEY.to_vec() }
    }

    #[test]
    fn protocol_vector_signs_and_verifies() {
        assert_eq!(username_for_ip("192.0.2.10"), USERNAME);
        assert_eq!(sign(KEY, CLIENT_ID, USERNAME), PASSWORD);
        let id = signed()
            .verify(CLIENT_ID, Some(USERNAME), Some(PASSWORD))
            .unwrap();
        assert_eq!(id.group, "GID_test");
        assert_eq!(id.mac.underscored(), "aa_bb_cc_dd_ee_ff");
        assert_eq!(id.uuid, "aa_bb_cc_dd_ee_ff");
    }

    #[test]
    fn refusals_carry_the_right_connack_code() {
        let v = signed();
        let wrong = v
            .verify(CLIENT_ID, Some(USERNAME), Some("AAAA"))
            .unwrap_err();
        assert_eq!(
            (wrong.clone(), wrong.connack_code()),
            (AuthError::BadSignature, 4)
        );
        let two_part = v
            .verify(
                "GID_test@@@aa_bb_cc_dd_ee_ff",
                Some(USERNAME),
                Some(PASSWORD),
            )
            .unwrap_err();
        assert_eq!(
            (two_part.clone(), two_part.connack_code()),
            (AuthError::MalformedClientId, 2)
        );
        let garbage = v
            .verify(CLIENT_ID, Some("%%%not-base64"), Some(PASSWORD))
            .unwrap_err();
        assert_eq!(
            (garbage.clone(), garbage.connack_code()),
            (AuthError::MalformedUsername, 4)
        );
        let empty = v.verify(CLIENT_ID, Some(USERNAME), Some("")).unwrap_err();
        assert_eq!(
            (empty.clone(), empty.connack_code()),
            (AuthError::MissingCredentials, 4)
        );
        assert_eq!(
            v.verify(CLIENT_ID, None, None).unwrap_err(),
            AuthError::MissingCredentials
        );
    }

    #[test]
    fn a_password_for_another_device_is_refused() {
        let other = "GID_test@@@aa_bb_cc_dd_ee_00@@@aa_bb_cc_dd_ee_00";
        assert_eq!(
            signed()
                .verify(other, Some(USERNAME), Some(PASSWORD))
                .unwrap_err(),
            AuthError::BadSignature
        );
    }

    #[test]
    fn unsigned_mode_still_requires_well_formed_identity() {
        let v = Verifier::Unsigned;
        assert!(
            v.verify(CLIENT_ID, Some(USERNAME), Some("anything"))
                .is_ok()
        );
        assert_eq!(
            v.verify("GID@@@aa_bb_cc_dd_ee_ff", Some(USERNAME), Some("x"))
                .unwrap_err(),
            AuthError::MalformedClientId
        );
        assert_eq!(
            v.verify(CLIENT_ID, Some("x"), Some("x")).unwrap_err(),
            AuthError::MalformedUsername
        );
    }

    #[test]
    fn client_id_parts_are_validated() {
        for bad in [
            "",
            "@@@@@@",
            "G@@@aa:bb:cc:dd:ee:ff@@@u",
            "G@@@aa_bb_cc_dd_ee_ff@@@",
            "G@@@zz_bb_cc_dd_ee_ff@@@u",
            "G@@@aa_bb_cc_dd_ee_ff@@@u@@@x",
        ] {
            assert_eq!(
                parse_client_id(bad).unwrap_err(),
                AuthError::MalformedClientId,
                "{bad}"
            );
        }
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn client_ids_parse_back(
                group in "[A-Za-z0-9_.-]{1,16}",
                octets: [u8; 6],
                uuid in "[A-Za-z0-9_-]{1,36}",
            ) {
                let mac = Mac::from_octets(octets);
                let client_id = format!("{group}@@@{mac}@@@{uuid}");
                prop_assert_eq!(
                    parse_client_id(&client_id),
                    Ok(DeviceIdentity { client_id: client_id.clone(), group, mac, uuid })
                );
            }

            #[test]
            fn signed_passwords_verify_under_their_key_only(
                key in proptest::collection::vec(any::<u8>(), 1..64),
                octets: [u8; 6],
                ip in any::<String>(),
            ) {
                let mac = Mac::from_octets(octets);
                let client_id = format!("GID_test@@@{mac}@@@{mac}");
                let username = username_for_ip(&ip);
                let password = sign(&key, &client_id, &username);
                let verified = Verifier::Signed { key: key.clone() }
                    .verify(&client_id, Some(&username), Some(&password))
                    .unwrap();
                prop_assert_eq!(verified.mac, mac);
                // Another key (not just a zero appended: HMAC pads short keys with
                // zeros, so `k` and `k || 0` are the same key).
                let mut other = key;
                other[0] ^= 1;
                prop_assert_eq!(
                    Verifier::Signed { key: other }.verify(&client_id, Some(&username), Some(&password)),
                    Err(AuthError::BadSignature)
                );
            }

            #[test]
            fn usernames_carry_the_ip(ip in any::<String>()) {
                let json = B64.decode(username_for_ip(&ip)).unwrap();
                let value: serde_json::Value = serde_json::from_slice(&json).unwrap();
                prop_assert_eq!(value, serde_json::json!({"ip": ip}));
            }
        }
    }
}
