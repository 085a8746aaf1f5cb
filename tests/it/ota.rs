//! The OTA endpoint and the `credentials` command: the MQTT settings they hand out must
//! be accepted by the gateway's own device port, as a real device would use them.

use crate::common;

use std::net::SocketAddr;
use std::process::{Output, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use reqwest::StatusCode;
use rumqttc::mqttbytes::v4::ConnectReturnCode;
use serde_json::{Value, json};
use tokio::process::Command;
use xiaozhi_gateway::config::Config;
use xiaozhi_gateway::protocol::mac::Mac;
use xiaozhi_gateway::server::Gateway;
use xiaozhi_tools::simulator::device::{DeviceCredentials, SimDevice, SimError};

const BIN: &str = env!("CARGO_BIN_EXE_xiaozhi-gateway");

fn ota_config() -> Config {
    let mut c = common::test_config();
    c.ota.enabled = true;
    c
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

/// POSTs to the OTA endpoint as the firmware does.
async fn ota(gw: &Gateway, path: &str, device_id: Option<&str>, body: String) -> reqwest::Response {
    let mut req = http()
        .post(format!("http://{}{path}", gw.addrs.http))
        .header("content-type", "application/json")
        .header("Client-Id", "0b0e5e36-1d5b-4a3c-9c5e-9d0c0a7f6a11")
        .body(body);
    if let Some(id) = device_id {
        req = req.header("Device-Id", id);
    }
    req.send().await.expect("HTTP request")
}

/// What the firmware's `GetSystemInfoJson` sends, trimmed.
fn system_info(mac: &Mac, board: &str, version: &str) -> String {
    json!({
        "version": 2,
        "flash_size": 16_777_216,
        "mac_address": mac.colon(),
        "chip_model_name": "esp32s3",
        "application": {"name": "xiaozhi", "version": version},
        "board": {"type": board, "name": board},
    })
    .to_string()
}

fn credentials_from(mqtt: &Value, mac: Mac) -> DeviceCredentials {
    let field = |k: &str| {
        mqtt[k]
            .as_str()
            .unwrap_or_else(|| panic!("mqtt.{k} in {mqtt}"))
            .to_owned()
    };
    DeviceCredentials {
        client_id: field("client_id"),
        username: field("username"),
        password: field("password"),
        mac,
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[tokio::test]
async fn ota_credentials_are_accepted_by_the_device_port() {
    let gw = common::start_with(ota_config()).await;
    let mac = common::mac(1);
    let before = unix_ms();
    let resp = ota(
        &gw,
        "/xiaozhi/ota/",
        Some(&mac.colon()),
        system_info(&mac, "esp32-s3-box3", "1.6.2"),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let reply: Value = resp.json().await.unwrap();
    let after = unix_ms();

    let mqtt = &reply["mqtt"];
    assert_eq!(
        mqtt["client_id"],
        format!("esp32-s3-box3@@@{mac}@@@{mac}"),
        "the board type is the group"
    );
    assert_eq!(
        mqtt["endpoint"],
        format!("127.0.0.1:{}", gw.addrs.mqtt.port())
    );
    assert_eq!(mqtt["publish_topic"], "device-server");
    assert_eq!(mqtt["subscribe_topic"], format!("devices/p2p/{mac}"));
    let username: Value =
        serde_json::from_slice(&B64.decode(mqtt["username"].as_str().unwrap()).unwrap()).unwrap();
    assert_eq!(
        username,
        json!({"ip": "127.0.0.1"}),
        "the TCP peer's address"
    );
    let ts = reply["server_time"]["timestamp"].as_u64().unwrap();
    assert!(
        (before..=after).contains(&ts),
        "{ts} not in {before}..={after}"
    );
    assert_eq!(reply["server_time"]["timezone_offset"], 0);
    // No firmware configured: the device's own version, so it does not upgrade.
    assert_eq!(reply["firmware"]["version"], "1.6.2");

    // Connect where the reply says, with what it says.
    let endpoint: SocketAddr = mqtt["endpoint"].as_str().unwrap().parse().unwrap();
    let creds = credentials_from(mqtt, mac);
    let mut dev = SimDevice::connect(endpoint, creds.clone())
        .await
        .expect("the OTA credentials are accepted");
    assert!(
        common::eventually(Duration::from_secs(5), || gw
            .directory
            .get(&mac)
            .is_some_and(|e| e.identity.group == "esp32-s3-box3"))
        .await
    );
    let (hello, _audio) = common::conversation(&mut dev).await;
    assert!(!hello.session_id.is_empty());
    dev.disconnect().await;

    // The password is bound to the client id: another group with it is refused.
    let forged = DeviceCredentials {
        client_id: format!("GID_other@@@{mac}@@@{mac}"),
        ..creds
    };
    match SimDevice::connect(gw.addrs.mqtt, forged).await {
        Err(SimError::Refused(code)) => assert_eq!(code, ConnectReturnCode::BadUserNamePassword),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("a forged client id was accepted"),
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn configured_firmware_and_default_group() {
    let mut config = ota_config();
    config.ota.firmware_version = "9.9.9".into();
    config.ota.firmware_url = "http://ota.example/fw.bin".into();
    config.ota.timezone_offset_minutes = 480;
    config.ota.mqtt_endpoint = Some("mqtt.example.com:1883".into());
    let gw = common::start_with(config).await;
    let mac = common::mac(2);

    // Empty and invalid bodies are tolerated; without a board the group is ota.group.
    for (path, body) in [
        ("/xiaozhi/ota/", String::new()),
        ("/xiaozhi/ota", "{not json".to_owned()),
        (
            "/xiaozhi/ota/",
            json!({"board": {"type": "@@@"}}).to_string(),
        ),
    ] {
        let resp = ota(&gw, path, Some(&mac.colon().to_uppercase()), body.clone()).await;
        assert_eq!(resp.status(), StatusCode::OK, "{path} {body:?}");
        let reply: Value = resp.json().await.unwrap();
        assert_eq!(
            reply["mqtt"]["client_id"],
            format!("GID_default@@@{mac}@@@{mac}"),
            "{body:?}"
        );
        assert_eq!(reply["mqtt"]["endpoint"], "mqtt.example.com:1883");
        assert_eq!(
            reply["firmware"],
            json!({"version": "9.9.9", "url": "http://ota.example/fw.bin"})
        );
        assert_eq!(reply["server_time"]["timezone_offset"], 480);
        let dev = SimDevice::connect(gw.addrs.mqtt, credentials_from(&reply["mqtt"], mac))
            .await
            .expect("accepted");
        dev.disconnect().await;
    }

    // A board type is sanitised before it becomes the group.
    let resp = ota(
        &gw,
        "/xiaozhi/ota/",
        Some(&mac.colon()),
        system_info(&mac, "bread board/v2@@@x", "1.0.0"),
    )
    .await;
    let reply: Value = resp.json().await.unwrap();
    assert_eq!(
        reply["mqtt"]["client_id"],
        format!("breadboardv2x@@@{mac}@@@{mac}")
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn without_a_version_anywhere_there_is_no_firmware_block() {
    let gw = common::start_with(ota_config()).await;
    let resp = ota(
        &gw,
        "/xiaozhi/ota/",
        Some(&common::mac(3).colon()),
        String::new(),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let reply: Value = resp.json().await.unwrap();
    assert!(reply.get("firmware").is_none(), "{reply}");
    assert!(
        reply["mqtt"]["password"]
            .as_str()
            .is_some_and(|p| !p.is_empty())
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn a_missing_or_bad_device_id_is_a_json_400() {
    let gw = common::start_with(ota_config()).await;
    for id in [None, Some("not-a-mac"), Some("aa:bb:cc:dd:ee"), Some("")] {
        let resp = ota(&gw, "/xiaozhi/ota/", id, "{}".into()).await;
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{id:?}");
        let body: Value = resp.json().await.unwrap();
        assert!(
            body["error"]
                .as_str()
                .is_some_and(|e| e.contains("Device-Id")),
            "{body}"
        );
    }
    // An oversized body is refused before it is read whole.
    let resp = ota(
        &gw,
        "/xiaozhi/ota/",
        Some(&common::mac(1).colon()),
        "x".repeat(65 * 1024),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    gw.shutdown().await;
}

#[tokio::test]
async fn ota_is_absent_unless_enabled() {
    let gw = common::start().await;
    let resp = ota(
        &gw,
        "/xiaozhi/ota/",
        Some(&common::mac(1).colon()),
        String::new(),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    gw.shutdown().await;
}

/// The binary with no configuration from the caller's environment.
fn cli() -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

async fn run(cmd: &mut Command) -> Output {
    tokio::time::timeout(Duration::from_secs(20), cmd.output())
        .await
        .expect("command finishes")
        .expect("command runs")
}

#[tokio::test]
async fn the_credentials_command_prints_settings_the_device_port_accepts() {
    let gw = common::start().await;
    let mac = common::mac(4);
    let out = run(cli()
        .args(["credentials", "--mac", &mac.colon(), "--group", "GID_cli"])
        .args(["--ip", "192.0.2.10"])
        .env("XZ_AUTH__SIGNATURE_KEY", common::KEY)
        .env("XZ_MQTT__LISTEN", gw.addrs.mqtt.to_string()))
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let settings: Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    assert_eq!(settings["client_id"], format!("GID_cli@@@{mac}@@@{mac}"));
    assert_eq!(
        settings["endpoint"],
        format!("127.0.0.1:{}", gw.addrs.mqtt.port())
    );
    assert_eq!(settings["subscribe_topic"], format!("devices/p2p/{mac}"));
    assert_eq!(settings["publish_topic"], "device-server");
    let username: Value =
        serde_json::from_slice(&B64.decode(settings["username"].as_str().unwrap()).unwrap())
            .unwrap();
    assert_eq!(username, json!({"ip": "192.0.2.10"}));
    let endpoint: SocketAddr = settings["endpoint"].as_str().unwrap().parse().unwrap();
    let dev = SimDevice::connect(endpoint, credentials_from(&settings, mac))
        .await
        .expect("the printed credentials are accepted");
    dev.disconnect().await;

    // Underscored MAC and the default group (ota.group) work too.
    let out = run(cli()
        .args(["credentials", "--mac", &mac.underscored()])
        .env("XZ_AUTH__SIGNATURE_KEY", common::KEY))
    .await;
    assert!(out.status.success());
    let settings: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        settings["client_id"],
        format!("GID_default@@@{mac}@@@{mac}")
    );
    SimDevice::connect(gw.addrs.mqtt, credentials_from(&settings, mac))
        .await
        .expect("accepted")
        .disconnect()
        .await;

    // Signed with another key: refused.
    let out = run(cli()
        .args(["credentials", "--mac", &mac.colon()])
        .env("XZ_AUTH__SIGNATURE_KEY", "some-other-key"))
    .await;
    assert!(out.status.success());
    let settings: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(matches!(
        SimDevice::connect(gw.addrs.mqtt, credentials_from(&settings, mac)).await,
        Err(SimError::Refused(ConnectReturnCode::BadUserNamePassword))
    ));
    gw.shutdown().await;
}

#[tokio::test]
async fn the_credentials_command_refuses_bad_input_with_exit_2() {
    for args in [
        vec!["credentials", "--mac", "zz:bb:cc:dd:ee:ff"],
        vec!["credentials", "--mac", "aa:bb:cc"],
        vec!["credentials"],
        vec![
            "credentials",
            "--mac",
            "aa:bb:cc:dd:ee:ff",
            "--group",
            "a@@@b",
        ],
        vec![
            "credentials",
            "--mac",
            "aa:bb:cc:dd:ee:ff",
            "--ip",
            "nowhere",
        ],
    ] {
        let out = run(cli().args(&args).env("XZ_AUTH__SIGNATURE_KEY", common::KEY)).await;
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(out.stdout.is_empty(), "{args:?}: nothing on stdout");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("error"), "{args:?}: {stderr}");
    }
    let out = run(cli()
        .args(["credentials", "--mac", "zz:bb:cc:dd:ee:ff"])
        .env("XZ_AUTH__SIGNATURE_KEY", common::KEY))
    .await;
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("MAC"),
        "names the problem: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // No key and no --dev: the config error.
    let out = run(cli().args(["credentials", "--mac", "aa:bb:cc:dd:ee:ff"])).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("auth.signature_key"));

    // --dev without a key: an unsigned password, with a warning.
    let out = run(cli().args(["--dev", "credentials", "--mac", "aa:bb:cc:dd:ee:ff"])).await;
    assert!(out.status.success());
    let settings: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(settings["password"].as_str().is_some_and(|p| !p.is_empty()));
    assert!(String::from_utf8_lossy(&out.stderr).contains("warning"));
}

/// The endpoint always carries the port of the listener it names: without one the
/// firmware assumes 8883 with TLS. TLS is on exactly for 8883 in the firmware, so a
/// configuration that disagrees with that refuses to start.
#[tokio::test]
async fn the_endpoint_always_has_a_port_that_matches_tls() {
    let mac = common::mac(6);
    let mut config = ota_config();
    config.ota.mqtt_endpoint = Some("mqtt.example.com".into());
    let gw = common::start_with(config).await;
    let resp = ota(&gw, "/xiaozhi/ota/", Some(&mac.colon()), String::new()).await;
    let reply: Value = resp.json().await.unwrap();
    assert_eq!(
        reply["mqtt"]["endpoint"],
        format!("mqtt.example.com:{}", gw.addrs.mqtt.port())
    );
    gw.shutdown().await;

    let mut config = ota_config();
    config.ota.mqtt_endpoint = Some("mqtt.example.com:8883".into());
    config.ota.mqtt_tls = true;
    let gw = common::start_with(config).await;
    let resp = ota(&gw, "/xiaozhi/ota/", Some(&mac.colon()), String::new()).await;
    let reply: Value = resp.json().await.unwrap();
    assert_eq!(reply["mqtt"]["endpoint"], "mqtt.example.com:8883");
    gw.shutdown().await;

    for (endpoint, tls, names) in [
        (Some("mqtt.example.com:8883"), false, "plain MQTT"),
        (Some("mqtt.example.com:1883"), true, "TLS"),
        (None, true, "TLS listener is off"),
    ] {
        let mut config = ota_config();
        config.ota.mqtt_endpoint = endpoint.map(str::to_owned);
        config.ota.mqtt_tls = tls;
        let err = match xiaozhi_gateway::server::Gateway::start(config).await {
            Ok(gw) => {
                gw.shutdown().await;
                panic!("{endpoint:?} tls={tls} started");
            }
            Err(e) => e.to_string(),
        };
        assert!(
            err.contains("ota.mqtt") && err.contains(names),
            "{endpoint:?} tls={tls}: {err}"
        );
    }
}
