//! The management API as manager-api calls it, over real HTTP: the daily bearer token,
//! device status (looked up by MAC, whatever board manager-api puts in the client id) and
//! MCP commands answered by firmware-exact simulated devices.

use crate::common;

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use time::{Date, OffsetDateTime};
use xiaozhi_gateway::config::Config;
use xiaozhi_gateway::protocol::mac::Mac;
use xiaozhi_gateway::server::Gateway;
use xiaozhi_tools::simulator::device::SimDevice;

/// The token manager-api computes: `hex(SHA-256("YYYY-MM-DD" + key))`.
fn token_for(date: Date, key: &str) -> String {
    let day = format!(
        "{:04}-{:02}-{:02}",
        date.year(),
        u8::from(date.month()),
        date.day()
    );
    hex::encode(Sha256::digest(format!("{day}{key}").as_bytes()))
}

fn today() -> Date {
    OffsetDateTime::now_utc().date()
}

fn token() -> String {
    token_for(today(), common::KEY)
}

/// The client id manager-api builds from its own tables.
fn manager_client_id(mac: &Mac) -> String {
    format!("GID_default@@@{mac}@@@{mac}")
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

/// POSTs `body` with an optional bearer token; returns the status and the JSON body.
async fn post(gw: &Gateway, path: &str, token: Option<&str>, body: &Value) -> (StatusCode, Value) {
    let mut req = http()
        .post(format!("http://{}{path}", gw.addrs.http))
        .json(body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.expect("HTTP request");
    let status = resp.status();
    let text = resp.text().await.unwrap();
    let json = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{path} answered {status} with non-JSON {text:?}: {e}"));
    (status, json)
}

async fn status_of(gw: &Gateway, ids: &[String]) -> Value {
    let (code, body) = post(
        gw,
        "/api/devices/status",
        Some(&token()),
        &json!({ "clientIds": ids }),
    )
    .await;
    assert_eq!(code, StatusCode::OK, "{body}");
    body
}

fn mcp_call(name: &str, arguments: Value) -> Value {
    json!({
        "type": "mcp",
        "payload": {
            "jsonrpc": "2.0",
            "id": 2,
            "method": "tools/call",
            "params": {"name": name, "arguments": arguments},
        }
    })
}

async fn command(gw: &Gateway, mac: &Mac, body: &Value) -> (StatusCode, Value) {
    post(
        gw,
        &format!("/api/commands/{}", manager_client_id(mac)),
        Some(&token()),
        body,
    )
    .await
}

/// The text of a successful `tools/call` result.
fn result_text(body: &Value) -> &str {
    body["data"]["content"][0]["text"]
        .as_str()
        .unwrap_or_else(|| panic!("no text result in {body}"))
}

/// A connected device the directory knows, with the gateway's MCP setup finished.
async fn ready_device(gw: &Gateway, n: u32) -> SimDevice {
    let dev = common::device(gw, n).await;
    let mac = common::mac(n);
    assert!(
        common::eventually(Duration::from_secs(5), || gw.directory.get(&mac).is_some()).await,
        "device {mac} in the directory"
    );
    let mcp = gw.directory.mcp(&mac).unwrap();
    assert!(mcp.wait_setup(Duration::from_secs(10)).await, "MCP setup");
    dev
}

#[tokio::test]
async fn tokens_of_utc_yesterday_today_and_tomorrow_are_accepted() {
    let gw = common::start().await;
    let body = json!({"clientIds": []});
    // Around UTC midnight the server's day may move on between our requests: redo then.
    for attempt in 0..3 {
        let day = today();
        for d in [day.previous_day().unwrap(), day, day.next_day().unwrap()] {
            let (code, answer) = post(
                &gw,
                "/api/devices/status",
                Some(&token_for(d, common::KEY)),
                &body,
            )
            .await;
            if today() == day {
                assert_eq!(code, StatusCode::OK, "token of {d}: {answer}");
                assert_eq!(answer, json!({}));
            }
        }
        if today() == day {
            break;
        }
        assert!(attempt < 2, "the date keeps changing");
    }

    let two_days_ago = token_for(
        today().previous_day().unwrap().previous_day().unwrap(),
        common::KEY,
    );
    let other_key = token_for(today(), "another-key");
    for bad in [
        Some(two_days_ago.as_str()),
        Some(other_key.as_str()),
        Some("garbage"),
        Some(""),
        None,
    ] {
        let (code, answer) = post(&gw, "/api/devices/status", bad, &body).await;
        assert_eq!(code, StatusCode::UNAUTHORIZED, "token {bad:?}");
        assert!(answer["error"].is_string(), "JSON error: {answer}");
    }
    // Commands need the token too, and an unauthorised one never reaches a device.
    let (code, answer) = post(
        &gw,
        &format!("/api/commands/{}", manager_client_id(&common::mac(1))),
        Some("garbage"),
        &mcp_call("self.test.echo", json!({"text": "x"})),
    )
    .await;
    assert_eq!(code, StatusCode::UNAUTHORIZED);
    assert!(answer["error"].is_string());
    gw.shutdown().await;
}

#[tokio::test]
async fn status_is_looked_up_by_mac_and_tells_idle_from_conversation() {
    let gw = common::start().await;
    let idle = ready_device(&gw, 1).await;
    let mut talking = ready_device(&gw, 2).await;
    let (_hello, _audio) = common::conversation(&mut talking).await;
    let talking_mac = common::mac(2);
    assert!(
        common::eventually(Duration::from_secs(5), || gw.directory.status(&talking_mac)
            == Some(true))
        .await
    );

    // The devices connected as GID_test@@@...; manager-api asks with GID_default@@@...
    let ids: Vec<String> = [1, 2, 3].map(|n| manager_client_id(&common::mac(n))).into();
    let status = status_of(&gw, &ids).await;
    assert_eq!(
        status[&ids[0]],
        json!({"isAlive": true, "exists": true, "inConversation": false}),
        "connected, idle"
    );
    assert_eq!(
        status[&ids[1]],
        json!({"isAlive": true, "exists": true, "inConversation": true}),
        "in a conversation"
    );
    assert_eq!(
        status[&ids[2]],
        json!({"isAlive": false, "exists": false, "inConversation": false}),
        "unknown"
    );
    assert_eq!(status.as_object().unwrap().len(), 3);
    // Both manager-api generations read the answer as meant: idle and talking devices
    // online, the unknown one offline, and the strict router accepts every entry.
    py_test_mqtt_router_accepts(&status, &ids).expect("py-test-mqtt router");
    let online: Vec<bool> = ids
        .iter()
        .map(|id| main_manager_web_shows_online(&status, id))
        .collect();
    assert_eq!(online, [true, true, false], "main's manager-web: {status}");

    // The other spellings of a client id name the same device.
    let mac = common::mac(1);
    let spellings = vec![
        format!("esp32-s3-box3@@@{mac}@@@some-uuid"),
        format!("GID_default@@@{mac}"),
        mac.underscored(),
        mac.colon(),
    ];
    let status = status_of(&gw, &spellings).await;
    for id in &spellings {
        assert_eq!(status[id]["exists"], true, "{id}: {status}");
    }
    let junk = vec!["not-a-client-id".to_owned(), "a@@@b@@@c@@@d".to_owned()];
    let status = status_of(&gw, &junk).await;
    for id in &junk {
        assert_eq!(status[id]["exists"], false, "{id}");
    }

    // After a disconnect the device is unknown again.
    idle.disconnect().await;
    assert!(common::eventually(Duration::from_secs(5), || gw.directory.get(&mac).is_none()).await);
    let status = status_of(&gw, &ids[..1]).await;
    assert_eq!(status[&ids[0]]["exists"], false);
    gw.shutdown().await;
}

#[tokio::test]
async fn bad_status_requests_get_400() {
    let gw = common::start().await;
    for body in [
        json!({}),
        json!({"clientIds": "GID@@@aa_bb_cc_dd_ee_ff@@@x"}),
        json!([1, 2]),
        json!(null),
    ] {
        let (code, answer) = post(&gw, "/api/devices/status", Some(&token()), &body).await;
        assert_eq!(code, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(answer["error"], "clientIds must be an array");
    }
    let too_many: Vec<String> = (0..10_001).map(|i| format!("id-{i}")).collect();
    let (code, answer) = post(
        &gw,
        "/api/devices/status",
        Some(&token()),
        &json!({ "clientIds": too_many }),
    )
    .await;
    assert_eq!(code, StatusCode::BAD_REQUEST);
    assert!(answer["error"].as_str().unwrap().contains("too many"));
    gw.shutdown().await;
}

#[tokio::test]
async fn a_command_reaches_the_device_and_returns_its_result() {
    let gw = common::start().await;
    let dev = ready_device(&gw, 1).await;
    let mac = common::mac(1);
    assert_ne!(dev.mcp_volume(), 33);

    let (code, body) = command(
        &gw,
        &mac,
        &mcp_call("self.audio_speaker.set_volume", json!({"volume": 33})),
    )
    .await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(body["success"], true);
    assert_eq!(result_text(&body), "true");
    assert_eq!(body["data"]["isError"], false);
    assert_eq!(dev.mcp_volume(), 33, "the device's volume changed");
    // The device got the call under the gateway's own id, not manager-api's 2.
    let seen = dev
        .mcp_requests()
        .into_iter()
        .find(|r| r["params"]["name"] == "self.audio_speaker.set_volume")
        .expect("the device saw the call");
    assert_eq!(seen["params"]["arguments"], json!({"volume": 33}));
    assert_eq!(seen["method"], "tools/call");

    let (code, body) = command(
        &gw,
        &mac,
        &mcp_call("self.test.echo", json!({"text": "hello from manager-api"})),
    )
    .await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(result_text(&body), "hello from manager-api");

    // The device's status tool reflects the new volume.
    let (code, body) = command(&gw, &mac, &mcp_call("self.get_device_status", json!({}))).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    let status: Value = serde_json::from_str(result_text(&body)).unwrap();
    assert_eq!(status["audio_speaker"]["volume"], 33);

    // A JSON-RPC error from the device is a 500 carrying its message.
    let (code, body) = command(&gw, &mac, &mcp_call("self.no_such_tool", json!({}))).await;
    assert_eq!(code, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(body["success"], false);
    assert!(
        body["error"].as_str().unwrap().contains("Unknown tool"),
        "{body}"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn concurrent_commands_each_get_their_own_answer() {
    let gw = common::start().await;
    let _dev = ready_device(&gw, 1).await;
    let mac = common::mac(1);
    let started = Instant::now();
    let slow = async {
        let r = command(&gw, &mac, &mcp_call("self.test.sleep", json!({"ms": 300}))).await;
        (r, started.elapsed())
    };
    let fast = async {
        let r = command(
            &gw,
            &mac,
            &mcp_call("self.test.echo", json!({"text": "quick"})),
        )
        .await;
        (r, started.elapsed())
    };
    let (((slow_code, slow_body), slow_at), ((fast_code, fast_body), fast_at)) =
        tokio::join!(slow, fast);
    assert_eq!(slow_code, StatusCode::OK, "{slow_body}");
    assert_eq!(fast_code, StatusCode::OK, "{fast_body}");
    assert_eq!(result_text(&slow_body), "slept 300 ms");
    assert_eq!(result_text(&fast_body), "quick");
    assert!(slow_at >= Duration::from_millis(300), "{slow_at:?}");
    assert!(
        fast_at < slow_at,
        "echo {fast_at:?} waited for sleep {slow_at:?}"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn a_silent_device_times_out_after_the_command_timeout() {
    let mut config = common::test_config();
    config.management.command_timeout_secs = 1;
    let gw = common::start_with(config).await;
    let dev = ready_device(&gw, 1).await;
    dev.set_mcp_auto(false);
    let mac = common::mac(1);

    let started = Instant::now();
    let (code, body) = command(&gw, &mac, &mcp_call("self.test.echo", json!({"text": "x"}))).await;
    let elapsed = started.elapsed();
    assert_eq!(code, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
    assert_eq!(body["success"], false);
    assert!(
        body["error"].as_str().unwrap().contains("did not answer"),
        "{body}"
    );
    assert!(elapsed >= Duration::from_secs(1), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(3), "{elapsed:?}");
    assert!(
        dev.mcp_requests()
            .iter()
            .any(|r| r["params"]["name"] == "self.test.echo"),
        "the request reached the device"
    );

    // Answering again: the next command works.
    dev.set_mcp_auto(true);
    let (code, body) = command(
        &gw,
        &mac,
        &mcp_call("self.test.echo", json!({"text": "back"})),
    )
    .await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(result_text(&body), "back");
    gw.shutdown().await;
}

#[tokio::test]
async fn commands_to_unknown_devices_or_of_other_types_fail() {
    let gw = common::start().await;
    let _dev = ready_device(&gw, 1).await;
    let connected = common::mac(1);

    let (code, body) = command(
        &gw,
        &common::mac(9),
        &mcp_call("self.test.echo", json!({"text": "x"})),
    )
    .await;
    assert_eq!(code, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(
        body,
        json!({"success": false, "error": "device not connected"})
    );

    for bad in [
        json!({"type": "iot", "payload": {"method": "tools/call"}}),
        json!({"payload": {"jsonrpc": "2.0", "id": 1, "method": "tools/call"}}),
        json!({"type": "mcp", "payload": {"jsonrpc": "2.0", "id": 1}}),
        json!({"type": "mcp"}),
    ] {
        let (code, body) = command(&gw, &connected, &bad).await;
        assert_eq!(code, StatusCode::INTERNAL_SERVER_ERROR, "{bad}");
        assert_eq!(
            body,
            json!({"success": false, "error": "invalid command type"}),
            "{bad}"
        );
    }

    // A body that is not JSON: a JSON 400.
    let resp = http()
        .post(format!(
            "http://{}/api/commands/{}",
            gw.addrs.http,
            manager_client_id(&connected)
        ))
        .bearer_auth(token())
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["success"], false);
    gw.shutdown().await;
}

async fn api_is_absent(config: Config) {
    let gw = common::start_with(config).await;
    let resp = http()
        .post(format!("http://{}/api/devices/status", gw.addrs.http))
        .bearer_auth(token())
        .json(&json!({"clientIds": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    let health = http()
        .get(format!("http://{}/healthz", gw.addrs.http))
        .send()
        .await
        .unwrap();
    assert_eq!(
        health.status(),
        StatusCode::OK,
        "the rest of HTTP still serves"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn the_api_is_absent_when_disabled_or_without_a_key() {
    let mut disabled = common::test_config();
    disabled.management.enabled = false;
    api_is_absent(disabled).await;

    let mut unsigned = common::test_config();
    unsigned.auth.signature_key = None;
    unsigned.auth.allow_unsigned = true;
    api_is_absent(unsigned).await;
}

/// manager-api `main`, manager-web `DeviceManagement.vue` (and `AddressBookManagement.vue`,
/// the same rule), read 2026-12: whether a device shows online.
///
/// ```js
/// if (deviceStatusMap[mqttClientId]) {
///   if (statusInfo.isAlive === true) isOnline = true;
///   else if (statusInfo.isAlive === false) isOnline = false;
///   else if (statusInfo.isAlive === null && statusInfo.exists === true) isOnline = true;
///   else isOnline = false;
/// } else deviceStatus = 'offline';
/// ```
fn main_manager_web_shows_online(answer: &Value, client_id: &str) -> bool {
    let Some(info) = answer.get(client_id).filter(|v| !v.is_null()) else {
        return false;
    };
    match info.get("isAlive") {
        Some(Value::Bool(alive)) => *alive,
        Some(Value::Null) => info.get("exists") == Some(&Value::Bool(true)),
        _ => false,
    }
}

/// manager-api `py-test-mqtt`, `MqttManagementRouter.parseStatusResponse`, read 2026-12:
/// the checks that fail the whole request (every device's status, calls and tool calls)
/// when one entry breaks them.
///
/// ```java
/// for (String clientId : clientIds) {
///   Object rawStatus = response.get(clientId);
///   if (!(rawStatus instanceof JSONObject status) || !status.containsKey("exists")
///       || !status.containsKey("isAlive")) throw ...;
///   if (!(rawExists instanceof Boolean exists) || !(rawAlive instanceof Boolean alive)
///       || (!exists && alive)) throw ...;
/// }
/// ```
fn py_test_mqtt_router_accepts(answer: &Value, client_ids: &[String]) -> Result<(), String> {
    let response = answer.as_object().ok_or("not a JSON object")?;
    for id in client_ids {
        let status = response
            .get(id)
            .and_then(Value::as_object)
            .ok_or(format!("missing status for {id}"))?;
        let (Some(Value::Bool(exists)), Some(Value::Bool(alive))) =
            (status.get("exists"), status.get("isAlive"))
        else {
            return Err(format!("exists/isAlive not Boolean for {id}: {status:?}"));
        };
        if !exists && *alive {
            return Err(format!("alive but not existing: {id}"));
        }
    }
    Ok(())
}

#[test]
fn the_recorded_consumer_rules_tell_the_answers_apart() {
    // The rule functions themselves, on the answers other gateways give: the Node
    // gateway's null for an idle device is online for main and fails py-test-mqtt.
    let ids = vec!["d".to_owned()];
    let node_idle = json!({"d": {"isAlive": null, "exists": true}});
    assert!(main_manager_web_shows_online(&node_idle, "d"));
    assert!(py_test_mqtt_router_accepts(&node_idle, &ids).is_err());
    let idle_false = json!({"d": {"isAlive": false, "exists": true}});
    assert!(!main_manager_web_shows_online(&idle_false, "d"));
    assert!(py_test_mqtt_router_accepts(&idle_false, &ids).is_ok());
    let invalid = json!({"d": {"isAlive": true, "exists": false}});
    assert!(py_test_mqtt_router_accepts(&invalid, &ids).is_err());
    assert!(py_test_mqtt_router_accepts(&json!({}), &ids).is_err());
    assert!(!main_manager_web_shows_online(&json!({}), "d"));
}
