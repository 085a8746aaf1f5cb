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
use crate::broker::topics;
use crate::config::Config;
use crate::protocol::credentials::{sign, username_for_ip};
use crate::protocol::mac::Mac;

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

/// The MQTT endpoint announced to devices: `ota.mqtt_endpoint`, else
/// `udp.public_host` with the device MQTT port.
pub fn default_endpoint(config: &Config, mqtt_port: u16) -> String {
    match &config.ota.mqtt_endpoint {
        Some(endpoint) if !endpoint.trim().is_empty() => endpoint.trim().to_owned(),
        _ => format!("{}:{mqtt_port}", config.udp.public_host),
    }
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
/// manager-api does, and `mqtt_port` is the device MQTT port for the default endpoint.
pub fn mqtt_settings(
    config: &Config,
    mqtt_port: u16,
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
        endpoint: default_endpoint(config, mqtt_port),
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
    let mqtt = mqtt_settings(&state.config, state.mqtt_port, &group, &mac, &ip);

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
        let s = mqtt_settings(&c, 1883, "GID_test", &mac, "192.0.2.10");
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
        let s = mqtt_settings(&c, 1, "G", &mac, "10.0.0.1");
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
