//! The optional OTA endpoint (PROTOCOL.md section 1): `POST /xiaozhi/ota/`, served only
//! with `ota.enabled = true`.
//!
//! The firmware posts its system info here at boot, with its MAC in the `Device-Id`
//! header, and takes from the answer the server time, the firmware to upgrade to and the
//! MQTT settings it then connects with. The MQTT settings are built the way manager-api
//! builds them ([`mqtt_settings`]), so devices provisioned here or by manager-api are
//! accepted alike. The `credentials` command of the binary prints the same settings.

use std::net::{IpAddr, SocketAddr};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{ConnectInfo, DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tracing::info;

use super::HttpState;
use crate::config::Config;
use crate::protocol::credentials::{sign, username_for_ip};
use crate::protocol::mac::Mac;
use crate::protocol::topics;

/// Largest request body (the device's system info) accepted; larger ones get HTTP 413.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// Longest client-id group taken from a board type.
pub const MAX_GROUP_LEN: usize = 64;

/// The password handed out when no signature key is set (development mode, where the
/// gateway accepts any non-empty password).
pub const UNSIGNED_PASSWORD: &str = "unsigned";

/// The MQTT settings a device is given: the firmware stores this object as is (its `mqtt`
/// settings namespace) and connects with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MqttSettings {
    /// `host:port` of the device MQTT listener.
    pub endpoint: String,
    /// `GROUP@@@MAC_@@@MAC_`.
    pub client_id: String,
    /// base64 of `{"ip":"<client ip>"}`.
    pub username: String,
    /// `base64(HMAC-SHA256(signature_key, client_id + "|" + username))`.
    pub password: String,
    /// Where the device publishes (`mqtt.uplink_topic`, `device-server`).
    pub publish_topic: String,
    /// `devices/p2p/<mac_>`.
    pub subscribe_topic: String,
}

/// The device MQTT listeners' ports, for the endpoint OTA hands out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MqttPorts {
    /// The plain listener (`mqtt.listen`).
    pub plain: u16,
    /// The TLS listener (`mqtt.tls_listen`), when it is served.
    pub tls: Option<u16>,
}

/// The port on which the firmware speaks MQTT over TLS: it decides by the port alone
/// (`main/protocols/mqtt_protocol.cc` defaults to 8883 without a port; the network
/// layer turns TLS on exactly for port 8883).
pub const FIRMWARE_TLS_PORT: u16 = 8883;

/// Why no usable endpoint can be handed to devices.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndpointError {
    #[error("ota.mqtt_endpoint {0:?}: want host or host:port with a port from 1 to 65535")]
    Malformed(String),
    #[error(
        "ota.mqtt_endpoint host {0:?} contains ':': the firmware splits the endpoint at the first ':', so give a host name or an IPv4 address"
    )]
    ColonInHost(String),
    #[error(
        "ota.mqtt_tls is on but no port was given and the TLS listener is off (set mqtt.tls_cert and mqtt.tls_key, or give the port in ota.mqtt_endpoint)"
    )]
    NoTlsListener,
    #[error(
        "the endpoint {endpoint} is {kind} but the firmware uses TLS exactly when the port is {FIRMWARE_TLS_PORT}: {fix}"
    )]
    TlsPortMismatch {
        endpoint: String,
        kind: &'static str,
        fix: &'static str,
    },
}

/// The MQTT endpoint announced to devices, always with an explicit port: an endpoint
/// without one makes the firmware use 8883 with TLS, whatever the gateway listens on.
///
/// The host is `ota.mqtt_endpoint`'s (else `udp.public_host`); the port is the one
/// `ota.mqtt_endpoint` names (for a proxy in front of the gateway), else the port of the
/// listener `ota.mqtt_tls` picks. Because the firmware turns TLS on by the port alone,
/// a TLS endpoint must be on port 8883 and a plain one must not.
pub fn ota_endpoint(config: &Config, ports: MqttPorts) -> Result<String, EndpointError> {
    let configured = config
        .ota
        .mqtt_endpoint
        .as_deref()
        .map(str::trim)
        .filter(|e| !e.is_empty());
    let (host, port) = match configured {
        Some(endpoint) => match endpoint.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() => {
                let port = port
                    .parse::<u16>()
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| EndpointError::Malformed(endpoint.to_owned()))?;
                (host.to_owned(), Some(port))
            }
            Some(_) => return Err(EndpointError::Malformed(endpoint.to_owned())),
            None => (endpoint.to_owned(), None),
        },
        None => (config.udp.public_host.clone(), None),
    };
    if host.contains(':') {
        return Err(EndpointError::ColonInHost(host));
    }
    let tls = config.ota.mqtt_tls;
    let port = match port {
        Some(p) => p,
        None if tls => ports.tls.ok_or(EndpointError::NoTlsListener)?,
        None => ports.plain,
    };
    let endpoint = format!("{host}:{port}");
    // Port 0 is an ephemeral listener (tests): nothing the firmware could be confused by.
    if port != 0 && (port == FIRMWARE_TLS_PORT) != tls {
        return Err(if tls {
            EndpointError::TlsPortMismatch {
                endpoint,
                kind: "TLS (ota.mqtt_tls = true)",
                fix: "put the TLS listener, or the port your proxy exposes for it, on 8883",
            }
        } else {
            EndpointError::TlsPortMismatch {
                endpoint,
                kind: "plain MQTT (ota.mqtt_tls = false)",
                fix: "use another port for plain MQTT, or set ota.mqtt_tls = true if port 8883 is the TLS listener",
            }
        });
    }
    Ok(endpoint)
}

/// A client-id group made from a board type: only `[A-Za-z0-9_-]` kept, at most
/// [`MAX_GROUP_LEN`] characters; `None` if nothing is left.
pub fn sanitize_group(raw: &str) -> Option<String> {
    let group: String = raw
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '-')
        .take(MAX_GROUP_LEN)
        .collect();
    (!group.is_empty()).then_some(group)
}

/// The MQTT settings of one device, signed with `auth.signature_key` (any non-empty
/// password, [`UNSIGNED_PASSWORD`], when there is none: development mode).
///
/// `group` is used as given (callers sanitise it), `ip` goes into the username as
/// manager-api does, and `endpoint` comes from [`ota_endpoint`].
pub fn mqtt_settings(
    config: &Config,
    endpoint: &str,
    group: &str,
    mac: &Mac,
    ip: &str,
) -> MqttSettings {
    let client_id = format!("{group}@@@{mac}@@@{mac}");
    let username = username_for_ip(ip);
    let password = match &config.auth.signature_key {
        Some(key) => sign(key.as_bytes(), &client_id, &username),
        None => UNSIGNED_PASSWORD.to_owned(),
    };
    MqttSettings {
        endpoint: endpoint.to_owned(),
        client_id,
        username,
        password,
        publish_topic: config.mqtt.uplink_topic.clone(),
        subscribe_topic: topics::p2p(mac),
    }
}

/// `POST /xiaozhi/ota/` (and without the trailing slash), when `ota.enabled`.
pub fn routes(state: &HttpState) -> Router<HttpState> {
    if !state.config.ota.enabled {
        return Router::new();
    }
    Router::new()
        .route("/xiaozhi/ota/", post(ota))
        .route("/xiaozhi/ota", post(ota))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
}

fn bad_request(message: &str) -> Response {
    (StatusCode::BAD_REQUEST, Json(json!({ "error": message }))).into_response()
}

/// Answers a device's OTA check.
///
/// * `Device-Id` (required): the MAC, `aa:bb:cc:dd:ee:ff`; missing or not a MAC: 400.
/// * `Client-Id` (optional): the device UUID; only logged (the client id carries the MAC
///   twice, as manager-api issues it).
/// * Body: the device's system info JSON, tolerated when empty or invalid. `board.type`
///   names the client-id group (sanitised), else `ota.group`; `application.version` is
///   echoed as the firmware version when `ota.firmware_version` is empty, so the device
///   does not upgrade.
///
/// The reply has `server_time`, `firmware` (left out when neither config nor device
/// names a version) and `mqtt` ([`MqttSettings`]; the username carries the TCP peer's IP).
/// Without a signature key (development mode) the password is [`UNSIGNED_PASSWORD`],
/// which the gateway accepts only in that mode.
async fn ota(
    State(state): State<HttpState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(device_id) = headers.get("device-id") else {
        return bad_request("missing Device-Id header (the device MAC, aa:bb:cc:dd:ee:ff)");
    };
    let Some(mac) = device_id
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse::<Mac>().ok())
    else {
        return bad_request("Device-Id is not a MAC address (want aa:bb:cc:dd:ee:ff)");
    };
    let client_uuid = headers
        .get("client-id")
        .and_then(|v| v.to_str().ok())
        .map(|v| v.chars().take(64).collect::<String>());
    let info: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let group = info["board"]["type"]
        .as_str()
        .and_then(sanitize_group)
        .unwrap_or_else(|| state.config.ota.group.clone());
    state.hints.record(
        mac,
        info["board"]["type"].as_str(),
        info["application"]["version"].as_str(),
    );
    let ip = canonical_ip(peer.ip()).to_string();
    let mqtt = mqtt_settings(&state.config, &state.ota_endpoint, &group, &mac, &ip);

    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let mut reply = json!({
        "server_time": {
            "timestamp": now_ms,
            "timezone_offset": state.config.ota.timezone_offset_minutes,
        },
        "mqtt": mqtt,
    });
    let ota = &state.config.ota;
    let version = if ota.firmware_version.is_empty() {
        info["application"]["version"].as_str().map(str::to_owned)
    } else {
        Some(ota.firmware_version.clone())
    };
    if let Some(version) = version {
        reply["firmware"] = json!({"version": version, "url": ota.firmware_url});
    }
    info!(
        mac = %mac,
        group = %group,
        remote = %peer,
        client_uuid = client_uuid.as_deref().unwrap_or(""),
        "OTA check answered with MQTT settings"
    );
    Json(reply).into_response()
}

/// An IPv4 peer on a dual-stack socket shows as `::ffff:a.b.c.d`; devices and
/// manager-api spell it `a.b.c.d`.
fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::credentials::Verifier;

    fn config(key: Option<&str>) -> Config {
        let mut c = Config::default();
        c.auth.signature_key = key.map(str::to_owned);
        c.auth.allow_unsigned = key.is_none();
        c
    }

    #[test]
    fn settings_are_signed_like_manager_api() {
        let mac: Mac = "aa:bb:cc:dd:ee:ff".parse().unwrap();
        let c = config(Some("test-signature-key"));
        let endpoint = ota_endpoint(&c, PORTS).unwrap();
        let s = mqtt_settings(&c, &endpoint, "GID_test", &mac, "192.0.2.10");
        // The vector of PROTOCOL.md / credentials.rs.
        assert_eq!(
            s.client_id,
            "GID_test@@@aa_bb_cc_dd_ee_ff@@@aa_bb_cc_dd_ee_ff"
        );
        assert_eq!(s.username, "eyJpcCI6IjE5Mi4wLjIuMTAifQ==");
        assert_eq!(s.password, "FfwPIt7TJgChnLuZz6sXpMkd1uSjj3fB8msdP5us6fk=");
        assert_eq!(s.endpoint, "127.0.0.1:1883");
        assert_eq!(s.publish_topic, "device-server");
        assert_eq!(s.subscribe_topic, "devices/p2p/aa_bb_cc_dd_ee_ff");
        assert!(
            c.verifier()
                .verify(&s.client_id, Some(&s.username), Some(&s.password))
                .is_ok()
        );
    }

    #[test]
    fn unsigned_settings_pass_the_unsigned_verifier_only() {
        let mac: Mac = "aa:bb:cc:dd:ee:ff".parse().unwrap();
        let mut c = config(None);
        c.ota.mqtt_endpoint = Some("mqtt.example.com:1883".into());
        let endpoint = ota_endpoint(&c, PORTS).unwrap();
        let s = mqtt_settings(&c, &endpoint, "G", &mac, "10.0.0.1");
        assert_eq!(s.endpoint, "mqtt.example.com:1883");
        assert!(!s.password.is_empty());
        assert!(
            Verifier::Unsigned
                .verify(&s.client_id, Some(&s.username), Some(&s.password))
                .is_ok()
        );
        let signed = Verifier::Signed { key: b"k".to_vec() };
        assert!(
            signed
                .verify(&s.client_id, Some(&s.username), Some(&s.password))
                .is_err()
        );
    }

    const PORTS: MqttPorts = MqttPorts {
        plain: 1883,
        tls: None,
    };

    #[test]
    fn the_endpoint_always_has_the_port_of_the_listener_it_names() {
        let mut c = config(Some("k"));
        c.udp.public_host = "gw.example.com".into();
        let tls = MqttPorts {
            plain: 1883,
            tls: Some(8883),
        };
        assert_eq!(ota_endpoint(&c, tls).unwrap(), "gw.example.com:1883");
        // A host without a port gets the listener's port, never the firmware's default.
        c.ota.mqtt_endpoint = Some("mqtt.example.com".into());
        assert_eq!(ota_endpoint(&c, tls).unwrap(), "mqtt.example.com:1883");
        c.ota.mqtt_tls = true;
        assert_eq!(ota_endpoint(&c, tls).unwrap(), "mqtt.example.com:8883");
        assert_eq!(ota_endpoint(&c, PORTS), Err(EndpointError::NoTlsListener));
        // An explicit port is kept (a proxy may expose another one) but must agree with
        // the firmware's rule: TLS exactly on 8883.
        c.ota.mqtt_endpoint = Some("mqtt.example.com:9883".into());
        assert!(matches!(
            ota_endpoint(&c, tls),
            Err(EndpointError::TlsPortMismatch { .. })
        ));
        c.ota.mqtt_tls = false;
        assert_eq!(ota_endpoint(&c, tls).unwrap(), "mqtt.example.com:9883");
        c.ota.mqtt_endpoint = Some("mqtt.example.com:8883".into());
        assert!(matches!(
            ota_endpoint(&c, tls),
            Err(EndpointError::TlsPortMismatch { .. })
        ));
        let on_8883 = MqttPorts {
            plain: 8883,
            tls: None,
        };
        c.ota.mqtt_endpoint = None;
        assert!(ota_endpoint(&c, on_8883).is_err(), "plain listener on 8883");
        for bad in ["mqtt.example.com:", ":1883", "h:0", "h:70000", "h:x"] {
            c.ota.mqtt_endpoint = Some(bad.into());
            assert!(
                matches!(ota_endpoint(&c, tls), Err(EndpointError::Malformed(_))),
                "{bad}"
            );
        }
        c.ota.mqtt_endpoint = Some("[::1]:1883".into());
        assert!(matches!(
            ota_endpoint(&c, tls),
            Err(EndpointError::ColonInHost(_))
        ));
    }

    #[test]
    fn groups_are_sanitised() {
        assert_eq!(
            sanitize_group("esp32-s3-box3").as_deref(),
            Some("esp32-s3-box3")
        );
        assert_eq!(sanitize_group("a@@@b c/d").as_deref(), Some("abcd"));
        assert_eq!(sanitize_group("@@@"), None);
        assert_eq!(sanitize_group(""), None);
        assert_eq!(
            sanitize_group(&"x".repeat(100)).unwrap().len(),
            MAX_GROUP_LEN
        );
        assert_eq!(sanitize_group("日本_1").as_deref(), Some("_1"));
    }

    #[test]
    fn mapped_ipv4_is_shown_as_ipv4() {
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert_eq!(canonical_ip(mapped).to_string(), "192.0.2.1");
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        assert_eq!(canonical_ip(v6), v6);
    }
}
