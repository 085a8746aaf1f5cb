//! Pushes to idle devices, end to end: the HTTP API (management token) and the MQTT admin
//! command in, firmware-exact simulated devices out, the queue in a real database (SQLite
//! files and MariaDB), state changes on the bus.

use crate::common;

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use xiaozhi_gateway::admin::client::AdminClient;
use xiaozhi_gateway::config::Config;
use xiaozhi_gateway::server::Gateway;
use xiaozhi_tools::simulator::device::{DeviceCredentials, SimDevice};
use xiaozhi_tools::simulator::mcp::{SimProperty, SimTool, ToolAction};

const WAIT: Duration = Duration::from_secs(10);

/// Pushes go out fast in tests: a short settle after connect, no notify gap, a sweep a
/// second.
fn config() -> Config {
    let mut c = common::test_config();
    c.push.settle_ms = 100;
    c.push.notify_gap_secs = 0;
    c.push.sweep_secs = 1;
    c
}

/// A config that keeps the queue (and chat history) in a SQLite file in `dir`.
fn config_with_database(dir: &std::path::Path) -> Config {
    let mut c = config();
    c.history.enabled = true;
    c.history.database_url = format!("sqlite://{}", dir.join("history.db").display());
    c.history.journal_dir = dir.join("journal");
    c
}

fn token() -> String {
    xiaozhi_gateway::http::management::daily_token(
        time::OffsetDateTime::now_utc().date(),
        common::KEY,
    )
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

async fn push(gw: &Gateway, body: Value) -> (StatusCode, Value) {
    let resp = http()
        .post(format!("http://{}/api/push", gw.addrs.http))
        .bearer_auth(token())
        .json(&body)
        .send()
        .await
        .expect("POST /api/push");
    let status = resp.status();
    (status, resp.json().await.expect("JSON answer"))
}

async fn get(gw: &Gateway, path: &str) -> (StatusCode, Value) {
    let resp = http()
        .get(format!("http://{}{path}", gw.addrs.http))
        .bearer_auth(token())
        .send()
        .await
        .expect("GET");
    let status = resp.status();
    (status, resp.json().await.expect("JSON answer"))
}

/// The one push id of a single-device answer.
fn id_of(answer: &Value) -> String {
    assert_eq!(answer["devices"], 1, "{answer}");
    answer["pushes"][0]["id"]
        .as_str()
        .expect("push id")
        .to_owned()
}

/// Waits until the push is in `state`; returns it.
async fn wait_state(gw: &Gateway, id: &str, state: &str) -> Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (status, row) = get(gw, &format!("/api/push/{id}")).await;
        assert_eq!(status, StatusCode::OK, "{row}");
        if row["state"] == state {
            return row;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "push {id} never reached {state}: {row}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A device whose firmware has the wake-up tool (the calling forks' `self.remote_wakeup`).
async fn wakeable(gw: &Gateway, n: u32) -> SimDevice {
    let dev = common::device(gw, n).await;
    dev.with_mcp(|mcp| {
        mcp.add_tool(SimTool::new(
            "self.remote_wakeup",
            "Wake the device up and start listening, announcing why",
            vec![SimProperty::string("reason")],
            ToolAction::Text("true".into()),
        ))
    });
    dev
}

/// No message of `kind` reaches the device within `wait`.
async fn nothing_of(dev: &mut SimDevice, kind: &str, wait: Duration) {
    if let Ok(m) = dev.recv_type(kind, wait).await {
        panic!("unexpected {kind}: {m}");
    }
}

#[tokio::test]
async fn each_kind_reaches_an_idle_device_as_the_firmware_reads_it() {
    let gw = common::start_with(config()).await;
    let mut dev = wakeable(&gw, 1).await;
    let mac = common::mac(1).colon();
    let cases = [
        (
            json!({"kind": "notify", "to": mac, "audio_url": "https://example.com/clip.ogg",
                   "subtitles": [{"start_ms": 1200, "text": "二"}, {"start_ms": 0, "text": "一"}]}),
            json!({"type": "notify", "audio_url": "https://example.com/clip.ogg",
                   "subtitles": [{"start_ms": 0, "text": "一"}, {"start_ms": 1200, "text": "二"}]}),
        ),
        (
            json!({"kind": "alert", "to": mac, "status": "提醒", "message": "该喝水了", "emotion": "happy"}),
            json!({"type": "alert", "status": "提醒", "message": "该喝水了", "emotion": "happy"}),
        ),
        (
            json!({"kind": "custom", "to": mac, "payload": {"page": "weather", "temp": 21}}),
            json!({"type": "custom", "payload": {"page": "weather", "temp": 21}}),
        ),
    ];
    for (request, want) in cases {
        let (status, answer) = push(&gw, request).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
        let id = id_of(&answer);
        let got = dev
            .recv_type(want["type"].as_str().unwrap(), WAIT)
            .await
            .expect("the push reaches the device");
        assert_eq!(got, want);
        let row = wait_state(&gw, &id, "sent").await;
        assert_eq!(row["mac_address"], mac);
        assert_eq!(row["source"], "http");
    }

    // wake: the device's tool is called with the reason, and its `true` is the
    // acknowledgement.
    let (status, answer) = push(
        &gw,
        json!({"kind": "wake", "to": mac, "reason": "Tell me the weather"}),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    let id = id_of(&answer);
    wait_state(&gw, &id, "delivered").await;
    let call = dev
        .mcp_requests()
        .into_iter()
        .find(|r| r["params"]["name"] == "self.remote_wakeup")
        .expect("the wake tool was called");
    assert_eq!(call["method"], "tools/call");
    assert_eq!(
        call["params"]["arguments"],
        json!({"reason": "Tell me the weather"})
    );

    // reboot last: the firmware's system command.
    let (_, answer) = push(&gw, json!({"kind": "reboot", "to": mac})).await;
    let id = id_of(&answer);
    let got = dev.recv_type("system", WAIT).await.unwrap();
    assert_eq!(got, json!({"type": "system", "command": "reboot"}));
    wait_state(&gw, &id, "sent").await;

    assert!(dev.violations().is_empty(), "{:?}", dev.violations());
    let m = gw.metrics.snapshot();
    assert_eq!(m.push_queued, 5);
    assert_eq!(m.push_sent, 4);
    assert_eq!(m.push_delivered, 1);
    gw.shutdown().await;
}

#[tokio::test]
async fn a_wake_to_firmware_without_the_tool_fails_and_says_why() {
    let gw = common::start_with(config()).await;
    let _dev = common::device(&gw, 2).await;
    let (_, answer) = push(
        &gw,
        json!({"kind": "wake", "to": common::mac(2).colon(), "reason": "hello"}),
    )
    .await;
    let row = wait_state(&gw, &id_of(&answer), "failed").await;
    let error = row["error"].as_str().unwrap();
    assert!(error.contains("self.remote_wakeup"), "{error}");
    assert_eq!(gw.metrics.snapshot().push_failed, 1);
    gw.shutdown().await;
}

#[tokio::test]
async fn a_push_to_an_offline_device_is_delivered_once_on_reconnect() {
    let gw = common::start_with(config()).await;
    // Seen once, so the gateway knows it.
    common::device(&gw, 3).await.disconnect().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (status, answer) = push(
        &gw,
        json!({"kind": "alert", "to": common::mac(3).colon(), "status": "s", "message": "while you were away"}),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    let id = id_of(&answer);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(wait_state(&gw, &id, "queued").await["node"], Value::Null);

    let mut dev = common::device(&gw, 3).await;
    let got = dev.recv_type("alert", WAIT).await.unwrap();
    assert_eq!(got["message"], "while you were away");
    wait_state(&gw, &id, "sent").await;
    // Once: not again on this connection, nor after a reconnect.
    nothing_of(&mut dev, "alert", Duration::from_millis(1500)).await;
    dev.disconnect().await;
    let mut dev = common::device(&gw, 3).await;
    nothing_of(&mut dev, "alert", Duration::from_millis(2000)).await;
    assert_eq!(gw.metrics.snapshot().push_sent, 1);
    gw.shutdown().await;
}

#[tokio::test]
async fn a_push_is_not_delivered_after_it_expires() {
    let gw = common::start_with(config()).await;
    common::device(&gw, 4).await.disconnect().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (_, answer) = push(
        &gw,
        json!({"kind": "alert", "to": common::mac(4).colon(), "status": "s", "message": "too late", "ttl_secs": 1}),
    )
    .await;
    let id = id_of(&answer);
    wait_state(&gw, &id, "expired").await;
    let mut dev = common::device(&gw, 4).await;
    nothing_of(&mut dev, "alert", Duration::from_millis(2000)).await;
    let m = gw.metrics.snapshot();
    assert_eq!((m.push_expired, m.push_sent), (1, 0));

    // An expiry already past is refused, not queued.
    let (status, answer) = push(
        &gw,
        json!({"kind": "reboot", "to": common::mac(4).colon(), "expires_at": 1000}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    assert_eq!(answer["error"], "invalid_push");
    gw.shutdown().await;
}

#[tokio::test]
async fn a_busy_device_gets_its_push_when_the_conversation_ends() {
    let gw = common::start_with(config()).await;
    let mut dev = common::device(&gw, 5).await;
    let (hello, _audio) = common::conversation(&mut dev).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, answer) = push(
        &gw,
        json!({"kind": "notify", "to": common::mac(5).colon(), "audio_url": "http://10.0.0.2/a.ogg"}),
    )
    .await;
    let id = id_of(&answer);
    nothing_of(&mut dev, "notify", Duration::from_millis(1500)).await;
    wait_state(&gw, &id, "queued").await;
    dev.publish_json(&json!({"session_id": hello.session_id, "type": "goodbye"}))
        .await
        .unwrap();
    let got = dev.recv_type("notify", WAIT).await.unwrap();
    assert_eq!(got["audio_url"], "http://10.0.0.2/a.ogg");
    wait_state(&gw, &id, "sent").await;
    gw.shutdown().await;
}

#[tokio::test]
async fn a_restart_between_queue_and_delivery_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let gw = common::start_with(config_with_database(dir.path())).await;
    common::device(&gw, 6).await.disconnect().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (status, answer) = push(
        &gw,
        json!({"kind": "custom", "to": common::mac(6).colon(), "payload": {"n": 6}}),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    let id = id_of(&answer);
    gw.shutdown().await;

    let gw = common::start_with(config_with_database(dir.path())).await;
    assert_eq!(wait_state(&gw, &id, "queued").await["kind"], "custom");
    let mut dev = common::device(&gw, 6).await;
    let got = dev.recv_type("custom", WAIT).await.unwrap();
    assert_eq!(got, json!({"type": "custom", "payload": {"n": 6}}));
    wait_state(&gw, &id, "sent").await;
    gw.shutdown().await;
}

#[tokio::test]
async fn lists_groups_and_the_fleet_reach_exactly_their_devices() {
    let gw = common::start_with(config()).await;
    let key = Some(common::KEY.as_bytes());
    let kitchen = |n| DeviceCredentials::for_mac(common::mac(n), "GID_kitchen", key);
    let mut devices = Vec::new();
    for n in 10..13 {
        devices.push(common::device(&gw, n).await);
    }
    for n in 13..15 {
        devices.push(SimDevice::connect(gw.addrs.mqtt, kitchen(n)).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let alert = |text: &str| json!({"kind": "alert", "status": "s", "message": text});
    let with = |mut body: Value, key: &str, value: Value| {
        body[key] = value;
        body
    };

    let list = json!([common::mac(10).colon(), common::mac(11).underscored()]);
    let (status, answer) = push(&gw, with(alert("list"), "to", list)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    assert_eq!(answer["devices"], 2);
    let (_, answer) = push(&gw, with(alert("group"), "group", json!("GID_kitchen"))).await;
    assert_eq!(answer["devices"], 2);
    let (_, answer) = push(&gw, with(alert("fleet"), "fleet", json!(true))).await;
    assert_eq!(answer["devices"], 5);
    let batch = answer["batch_id"].as_str().unwrap().to_owned();

    let mut got = Vec::new();
    for dev in devices.iter_mut() {
        let mut messages = Vec::new();
        while let Ok(m) = dev.recv_type("alert", Duration::from_millis(1500)).await {
            messages.push(m["message"].as_str().unwrap().to_owned());
        }
        messages.sort();
        got.push(messages);
    }
    assert_eq!(
        got,
        vec![
            vec!["fleet", "list"],
            vec!["fleet", "list"],
            vec!["fleet"],
            vec!["fleet", "group"],
            vec!["fleet", "group"],
        ]
    );
    let (status, listed) = get(&gw, &format!("/api/push?batch_id={batch}&state=sent")).await;
    assert_eq!(status, StatusCode::OK, "{listed}");
    assert_eq!(listed["pushes"].as_array().unwrap().len(), 5);
    gw.shutdown().await;
}

#[tokio::test]
async fn bad_requests_are_refused_whole_and_counted() {
    let mut c = config();
    c.push.max_per_device = 2;
    let gw = common::start_with(c).await;
    let _dev = common::device(&gw, 20).await;
    // Away devices: their pushes wait, so the bound is reached.
    common::device(&gw, 21).await.disconnect().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mac = common::mac(21).colon();
    let cases = [
        (
            json!({"kind": "notify", "to": mac, "audio_url": "file:///etc/passwd"}),
            StatusCode::BAD_REQUEST,
            "invalid_push",
        ),
        (
            json!({"kind": "sing", "to": mac}),
            StatusCode::BAD_REQUEST,
            "invalid_push",
        ),
        (
            json!({"kind": "custom", "to": mac, "payload": {"x": "y".repeat(20_000)}}),
            StatusCode::BAD_REQUEST,
            "invalid_push",
        ),
        (
            json!({"kind": "reboot", "to": [mac, "aa:aa:aa:aa:aa:aa"]}),
            StatusCode::NOT_FOUND,
            "unknown_device",
        ),
        (
            json!({"kind": "reboot", "group": "GID_nobody"}),
            StatusCode::NOT_FOUND,
            "unknown_device",
        ),
    ];
    for (body, status, code) in cases {
        let (got, answer) = push(&gw, body.clone()).await;
        assert_eq!(
            (got, answer["error"].as_str()),
            (status, Some(code)),
            "{body}: {answer}"
        );
    }
    // Not JSON at all.
    let resp = http()
        .post(format!("http://{}/api/push", gw.addrs.http))
        .bearer_auth(token())
        .body("{")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    // No token.
    let resp = http()
        .post(format!("http://{}/api/push", gw.addrs.http))
        .json(&json!({"kind": "reboot", "to": mac}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);

    // The device's bound: two wait, the third is refused, and a request naming it with
    // a device that has room queues nothing for either.
    for _ in 0..2 {
        let (status, _) = push(&gw, json!({"kind": "reboot", "to": mac})).await;
        assert_eq!(status, StatusCode::ACCEPTED);
    }
    let both = json!({"kind": "reboot", "to": [mac, common::mac(20).colon()]});
    let (status, answer) = push(&gw, both).await;
    assert_eq!(status, StatusCode::CONFLICT, "{answer}");
    assert_eq!(answer["error"], "queue_full");
    let (_, listed) = get(&gw, &format!("/api/push?mac={}", common::mac(20).colon())).await;
    assert_eq!(listed["pushes"], json!([]));

    let (status, _) = get(&gw, "/api/push/0123456789abcdef0123456789abcdef").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, answer) = get(&gw, "/api/push/not-an-id").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");

    let m = gw.metrics.snapshot();
    assert_eq!(m.push_refused_invalid, 4);
    assert_eq!(m.push_refused_unknown_device, 2);
    assert_eq!(m.push_refused_queue_full, 1);
    assert_eq!(m.push_queued, 2);
    gw.shutdown().await;
}

#[tokio::test]
async fn the_mqtt_admin_command_pushes_and_state_changes_are_on_the_bus() {
    let gw = common::start_with(config()).await;
    let broker = gw.addrs.broker.unwrap();
    // A bus observer of every device's push events.
    let mut opts = rumqttc::MqttOptions::new("push-observer", "127.0.0.1", broker.port());
    opts.set_credentials(common::ADMIN_USER, common::ADMIN_PASS);
    let (observer, mut events) = rumqttc::AsyncClient::new(opts, 64);
    observer
        .subscribe("xiaozhi/devices/+/push", rumqttc::QoS::AtMostOnce)
        .await
        .unwrap();
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel::<Value>();
    let pump = tokio::spawn(async move {
        while let Ok(event) = events.poll().await {
            if let rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) = event
                && let Ok(v) = serde_json::from_slice::<Value>(&p.payload)
            {
                let _ = seen_tx.send(v);
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut dev = common::device(&gw, 30).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let admin = AdminClient::connect(
        "127.0.0.1",
        broker.port(),
        common::ADMIN_USER,
        common::ADMIN_PASS,
        WAIT,
    )
    .await
    .unwrap();
    let mac = common::mac(30);
    let reply = admin
        .request(
            Some(&mac),
            json!({"command": "push", "payload": {"kind": "alert", "status": "s", "message": "from mqtt"}}),
            WAIT,
        )
        .await
        .unwrap();
    assert_eq!(reply["ok"], true, "{reply}");
    let id = reply["result"]["pushes"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        dev.recv_type("alert", WAIT).await.unwrap()["message"],
        "from mqtt"
    );
    let row = wait_state(&gw, &id, "sent").await;
    assert_eq!(row["source"], "mqtt");

    // On the fleet topic the payload names the targets.
    let reply = admin
        .request(
            None,
            json!({"command": "push", "payload": {"kind": "custom", "to": [mac.colon()], "payload": {"k": 1}}}),
            WAIT,
        )
        .await
        .unwrap();
    assert_eq!(reply["ok"], true, "{reply}");
    dev.recv_type("custom", WAIT).await.unwrap();
    let reply = admin
        .request(
            None,
            json!({"command": "push", "payload": {"kind": "custom"}}),
            WAIT,
        )
        .await
        .unwrap();
    assert_eq!(reply["ok"], false);
    assert_eq!(reply["error"]["code"], "invalid_command", "{reply}");

    // The bus carried queued then sent for the first push.
    let mut states = Vec::new();
    while states.len() < 2 {
        let event = tokio::time::timeout(WAIT, seen.recv())
            .await
            .unwrap()
            .unwrap();
        if event["id"] == id {
            assert_eq!(event["event"], "push_state");
            assert_eq!(event["mac_address"], mac.colon());
            states.push(event["state"].as_str().unwrap().to_owned());
        }
    }
    assert_eq!(states, ["queued", "sent"]);
    pump.abort();
    admin.disconnect().await;
    gw.shutdown().await;
}

/// A node of a cluster: the external bus on `mosquitto`, presence in Redis under
/// `prefix`, the push queue (and chat history) in the shared MariaDB database `db`.
fn node_config(
    node: &str,
    mosquitto: u16,
    prefix: &str,
    db: &str,
    journal: &std::path::Path,
) -> Config {
    let mut c = config();
    c.node.id = node.into();
    c.bus.mode = xiaozhi_gateway::config::BusMode::External;
    c.bus.url = format!("mqtt://127.0.0.1:{mosquitto}");
    c.bus.reconnect_max_secs = 1;
    c.presence.redis_url = Some("redis://127.0.0.1:6379".into());
    c.presence.key_prefix = prefix.into();
    c.history.enabled = true;
    c.history.database_url = db.into();
    c.history.journal_dir = journal.into();
    // Delivery across nodes must come from the bus event, not from the sweep.
    c.push.sweep_secs = 600;
    c
}

#[tokio::test]
async fn a_push_queued_on_one_node_reaches_the_device_on_another_once() {
    let port = common::free_port();
    let _mosquitto = common::start_mosquitto(port).await;
    let db = common::scratch_db::ScratchDb::new("push_nodes").await;
    let dir = tempfile::tempdir().unwrap();
    let prefix = format!(
        "xz-test-push-{}-{}:",
        std::process::id(),
        &xiaozhi_gateway::history::record::new_id()[..8]
    );
    let a = common::start_with(node_config(
        "gw-a",
        port,
        &prefix,
        &db.url(),
        &dir.path().join("a"),
    ))
    .await;
    let b = common::start_with(node_config(
        "gw-b",
        port,
        &prefix,
        &db.url(),
        &dir.path().join("b"),
    ))
    .await;
    for gw in [&a, &b] {
        assert!(
            common::eventually(WAIT, || gw.metrics.snapshot().bus_connected == 1).await,
            "node connects to the external broker"
        );
    }
    let mut on_a = common::device(&a, 40).await;
    let mut on_b = common::device(&b, 41).await;
    // Both known to the shared presence store.
    let deadline = tokio::time::Instant::now() + WAIT;
    while a
        .presence
        .store()
        .get(&common::mac(41).colon())
        .await
        .ok()
        .flatten()
        .is_none()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "gw-b's device in presence"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Queued on gw-a, for gw-b's device.
    let (status, answer) = push(
        &a,
        json!({"kind": "alert", "to": common::mac(41).colon(), "status": "s", "message": "across"}),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    let id = id_of(&answer);
    assert_eq!(
        on_b.recv_type("alert", WAIT).await.unwrap()["message"],
        "across"
    );
    let row = wait_state(&a, &id, "sent").await;
    assert_eq!(row["node"], "gw-b", "sent by the device's node: {row}");

    // The whole fleet from gw-b: each device once, by its own node.
    let (_, answer) = push(
        &b,
        json!({"kind": "custom", "fleet": true, "payload": {"all": true}}),
    )
    .await;
    assert_eq!(answer["devices"], 2, "{answer}");
    for dev in [&mut on_a, &mut on_b] {
        dev.recv_type("custom", WAIT).await.unwrap();
        nothing_of(dev, "custom", Duration::from_millis(1500)).await;
    }
    nothing_of(&mut on_b, "alert", Duration::from_millis(100)).await;
    let sent = a.metrics.snapshot().push_sent + b.metrics.snapshot().push_sent;
    assert_eq!(sent, 3);
    a.shutdown().await;
    b.shutdown().await;
    db.drop_db().await;
}

/// `xiaozhi-gateway push ...` against a running gateway, as an operator types it.
async fn cli(gw: &Gateway, args: &[&str]) -> std::process::Output {
    let broker = gw.addrs.broker.unwrap().to_string();
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_xiaozhi-gateway"));
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .arg("push")
        .args(args)
        .args([
            "--broker",
            &broker,
            "--username",
            common::ADMIN_USER,
            "--password",
            common::ADMIN_PASS,
        ]);
    tokio::time::timeout(Duration::from_secs(20), cmd.output())
        .await
        .expect("push finishes")
        .expect("push runs")
}

#[tokio::test]
async fn the_cli_pushes_and_its_exit_code_says_whether_it_was_queued() {
    let gw = common::start_with(config()).await;
    let mut dev = common::device(&gw, 50).await;
    let mac = common::mac(50).colon();
    let out = cli(
        &gw,
        &[
            "notify",
            "--to",
            &mac,
            "--audio-url",
            "https://example.com/a.ogg",
            "--subtitle",
            "0:你好",
            "--subtitle",
            "800:world",
        ],
    )
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("queued 1 push(es) of kind notify"),
        "{stdout}"
    );
    assert!(stdout.contains(&mac), "{stdout}");
    let got = dev.recv_type("notify", WAIT).await.unwrap();
    assert_eq!(
        got,
        json!({"type": "notify", "audio_url": "https://example.com/a.ogg",
        "subtitles": [{"start_ms": 0, "text": "你好"}, {"start_ms": 800, "text": "world"}]})
    );

    // Refused by the gateway: 1, and the reason.
    let out = cli(
        &gw,
        &[
            "alert",
            "--to",
            "aa:aa:aa:aa:aa:aa",
            "--status",
            "s",
            "--message",
            "m",
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown_device"));
    // Not askable: 2.
    let out = cli(&gw, &["reboot"]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--to"));
    let out = cli(
        &gw,
        &[
            "notify",
            "--to",
            &mac,
            "--audio-url",
            "https://x/a.ogg",
            "--subtitle",
            "soon",
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(2));
    gw.shutdown().await;
}

/// The talkers' audio beside the fleet push: the load tool's devices in conversation with
/// the echo pipeline, measuring this process.
fn talkers(gw: &Gateway, first: u32, measure: Duration) -> xiaozhi_tools::bench::load::LoadConfig {
    xiaozhi_tools::bench::load::LoadConfig {
        mqtt: gw.addrs.mqtt,
        signature_key: Some(common::KEY.into()),
        devices: 200,
        connect_rate: 1000,
        warmup: Duration::from_secs(1),
        measure,
        first_device: first,
        source_addresses: 1,
        target_pid: Some(std::process::id()),
        ..xiaozhi_tools::bench::load::LoadConfig::default()
    }
}

#[tokio::test]
async fn a_fleet_push_to_5000_devices_keeps_its_rate_while_200_conversations_keep_their_audio() {
    let mut c = config();
    c.push.rate_per_sec = 1000;
    c.mqtt.max_connections_per_source = 0;
    let gw = common::start_with(c).await;
    let alone =
        xiaozhi_tools::bench::load::run(talkers(&gw, 600_000, Duration::from_secs(3))).await;
    assert_eq!(alone.functional_failures(), Vec::<String>::new(), "{alone}");

    let bench = xiaozhi_tools::bench::push::PushBenchConfig {
        mqtt: gw.addrs.mqtt,
        http: gw.addrs.http,
        signature_key: common::KEY.into(),
        devices: 5000,
        connect_rate: 2000,
        singles: 20,
        fleet_timeout: Duration::from_secs(60),
        ..xiaozhi_tools::bench::push::PushBenchConfig::default()
    };
    let pushes = tokio::spawn(xiaozhi_tools::bench::push::run(bench));
    // The talkers' measured window (from about 4 s on) holds the group push (queued
    // about 4.6 s in: the connects, the settle wait, the singles).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let beside =
        xiaozhi_tools::bench::load::run(talkers(&gw, 610_000, Duration::from_secs(7))).await;
    let pushes = pushes.await.unwrap();
    println!("{pushes}\nalone: {alone}\nbeside the push: {beside}");

    assert_eq!(pushes.connected, 5000, "{pushes}");
    assert_eq!(
        (pushes.fleet_queued, pushes.fleet_received),
        (5000, 5000),
        "{pushes}"
    );
    assert_eq!(pushes.errors, 0, "{pushes}");
    // Paced: a second's burst, then push.rate_per_sec; and not much slower than that.
    assert!(
        pushes.fleet_span_ms >= 3600.0,
        "faster than its rate: {pushes}"
    );
    assert!(
        pushes.fleet_span_ms <= 12_000.0,
        "far slower than its rate: {pushes}"
    );
    assert_eq!(
        beside.functional_failures(),
        Vec::<String>::new(),
        "{beside}"
    );
    assert_eq!(beside.frames_lost, 0);
    let (before, during) = (alone.round_trip.p99_ms, beside.round_trip.p99_ms);
    assert!(
        during <= (before * 4.0).max(before + 20.0),
        "the talkers' p99 went from {before:.2} ms to {during:.2} ms during the fleet push"
    );
    assert_eq!(gw.metrics.snapshot().push_sent, 5020);
    gw.shutdown().await;
}

#[tokio::test]
async fn the_official_gateways_redis_rpc_pushes_and_answers() {
    use redis::AsyncCommands;
    let key = format!(
        "xz-test-push-rpc-{}-{}",
        std::process::id(),
        &xiaozhi_gateway::history::record::new_id()[..8]
    );
    let mut c = config();
    c.push.redis_rpc_url = Some("redis://127.0.0.1:6379".into());
    c.push.redis_rpc_key = key.clone();
    let gw = common::start_with(c).await;
    let mut dev = common::device(&gw, 60).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut redis = redis::Client::open("redis://127.0.0.1:6379")
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .expect("Redis at 127.0.0.1:6379 (.ci/run starts it)");
    let replies = format!("{key}:replies");
    let client_id = format!(
        "GID_test@@@{}@@@{}",
        common::mac(60).underscored(),
        common::mac(60).underscored()
    );
    let rpc = json!({"id": "r1", "reply_to": replies, "method": "forward", "clientId": client_id,
        "params": {"type": "notify", "audio_url": "https://example.com/a.ogg"}});
    let _: () = redis.rpush(&key, rpc.to_string()).await.unwrap();
    let got = dev.recv_type("notify", WAIT).await.unwrap();
    assert_eq!(
        got,
        json!({"type": "notify", "audio_url": "https://example.com/a.ogg"})
    );
    let (_, answer): (String, String) = redis.blpop(&replies, 5.0).await.unwrap();
    let answer: Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(
        (answer["id"].as_str(), answer["success"].as_bool()),
        (Some("r1"), Some(true)),
        "{answer}"
    );
    let row = wait_state(&gw, answer["push_id"].as_str().unwrap(), "sent").await;
    assert_eq!(row["source"], "redis");

    // Refused: the answer says why; nothing is queued.
    let bad = json!({"reply_to": replies, "method": "forward", "clientId": client_id, "params": {"type": "hello"}});
    let _: () = redis.rpush(&key, bad.to_string()).await.unwrap();
    let _: () = redis.rpush(&key, "not json").await.unwrap();
    let (_, answer): (String, String) = redis.blpop(&replies, 5.0).await.unwrap();
    let answer: Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(answer["success"], false);
    assert_eq!(answer["error"], "invalid_push", "{answer}");
    assert!(common::eventually(WAIT, || gw.metrics.snapshot().push_refused_invalid == 1).await);
    assert_eq!(gw.metrics.snapshot().push_queued, 1);
    let _: () = redis.del(&[&key, &replies]).await.unwrap();
    gw.shutdown().await;
}

/// A WAV file of a 440 Hz tone.
fn tone_wav(rate: u32, channels: u16, secs: f32) -> Vec<u8> {
    let frames = (rate as f32 * secs) as u32;
    let data_len = frames * u32::from(channels) * 2;
    let mut w = Vec::new();
    w.extend_from_slice(b"RIFF");
    w.extend_from_slice(&(36 + data_len).to_le_bytes());
    w.extend_from_slice(b"WAVEfmt ");
    for v in [
        16u32.to_le_bytes().to_vec(),
        1u16.to_le_bytes().to_vec(),
        channels.to_le_bytes().to_vec(),
        rate.to_le_bytes().to_vec(),
        (rate * u32::from(channels) * 2).to_le_bytes().to_vec(),
        (channels * 2).to_le_bytes().to_vec(),
        16u16.to_le_bytes().to_vec(),
    ] {
        w.extend_from_slice(&v);
    }
    w.extend_from_slice(b"data");
    w.extend_from_slice(&data_len.to_le_bytes());
    for i in 0..frames {
        let v =
            ((i as f32 * 440.0 * 2.0 * std::f32::consts::PI / rate as f32).sin() * 12_000.0) as i16;
        for _ in 0..channels {
            w.extend_from_slice(&v.to_le_bytes());
        }
    }
    w
}

async fn upload(gw: &Gateway, body: Vec<u8>, content_type: &str) -> (StatusCode, Value) {
    let resp = http()
        .post(format!("http://{}/api/push/clips", gw.addrs.http))
        .bearer_auth(token())
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .expect("POST /api/push/clips");
    let status = resp.status();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn clips_are_served_as_mono_ogg_opus_whatever_was_uploaded() {
    let mut c = config();
    c.push.max_clip_bytes = 400_000;
    let gw = common::start_with(c).await;
    let mut dev = common::device(&gw, 70).await;

    // WAV (stereo, 44.1 kHz) and MP3 are converted; the device is pointed at the result.
    let mp3 = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/tone-440hz-1s.mp3"
    ))
    .unwrap();
    for (body, kind, from) in [
        (tone_wav(44_100, 2, 1.0), "audio/wav", "wav"),
        (mp3, "audio/mpeg", "mp3"),
    ] {
        let (status, clip) = upload(&gw, body, kind).await;
        assert_eq!(status, StatusCode::CREATED, "{clip}");
        assert_eq!(clip["from"], from);
        let duration = clip["duration_ms"].as_u64().unwrap();
        assert!((950..=1100).contains(&duration), "{clip}");
        let url = clip["audio_url"].as_str().unwrap().to_owned();
        assert!(
            url.starts_with(&format!(
                "http://127.0.0.1:{}/push/clips/",
                gw.addrs.http.port()
            )),
            "{url}"
        );
        // Fetched as the firmware fetches it: no token, 2xx, Content-Length, audio/ogg.
        let resp = http().get(&url).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["content-type"], "audio/ogg");
        assert!(resp.content_length().is_some());
        let ogg = resp.bytes().await.unwrap();
        let declared = xiaozhi_gateway::push::clip::check_ogg_opus(&ogg).expect("mono Ogg Opus");
        assert!((950..=1100).contains(&declared), "{declared}");

        let (status, answer) = push(
            &gw,
            json!({"kind": "notify", "to": common::mac(70).colon(), "audio_url": url}),
        )
        .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
        assert_eq!(
            dev.recv_type("notify", WAIT).await.unwrap()["audio_url"],
            url
        );
    }

    // A mono Ogg Opus is served byte for byte.
    let (_, first) = upload(&gw, tone_wav(16_000, 1, 0.5), "audio/wav").await;
    let ogg = http()
        .get(first["audio_url"].as_str().unwrap())
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let (status, again) = upload(&gw, ogg.to_vec(), "audio/ogg").await;
    assert_eq!(
        (status, again["from"].as_str()),
        (StatusCode::CREATED, Some("ogg_opus")),
        "{again}"
    );
    let served = http()
        .get(again["audio_url"].as_str().unwrap())
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(served, ogg);

    // Refused: not audio (415), undecodable (400), too large (413), no token (401).
    let (status, answer) = upload(&gw, b"<html>not audio</html>".to_vec(), "audio/wav").await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (StatusCode::UNSUPPORTED_MEDIA_TYPE, Some("invalid_clip")),
        "{answer}"
    );
    let mut broken = tone_wav(16_000, 1, 0.5);
    broken.truncate(44);
    let (status, answer) = upload(&gw, broken, "audio/wav").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    let (status, _) = upload(&gw, tone_wav(48_000, 2, 3.0), "audio/wav").await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    let resp = http()
        .post(format!("http://{}/api/push/clips", gw.addrs.http))
        .body(tone_wav(16_000, 1, 0.1))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    // Unknown names are 404, as is anything that is not an id.
    for path in [
        "/push/clips/0123456789abcdef0123456789abcdef.ogg",
        "/push/clips/x.ogg",
        "/push/clips/0123456789abcdef0123456789abcdef",
    ] {
        let resp = http()
            .get(format!("http://{}{path}", gw.addrs.http))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::NOT_FOUND, "{path}");
    }
    let m = gw.metrics.snapshot();
    assert_eq!((m.push_clips_stored, m.push_clips_refused), (4, 2));
    gw.shutdown().await;
}

#[tokio::test]
async fn a_clip_is_not_served_after_it_expires() {
    let mut c = config();
    c.push.clip_ttl_secs = 1;
    let gw = common::start_with(c).await;
    let (status, clip) = upload(&gw, tone_wav(16_000, 1, 0.3), "audio/wav").await;
    assert_eq!(status, StatusCode::CREATED, "{clip}");
    let url = clip["audio_url"].as_str().unwrap().to_owned();
    assert_eq!(
        http().get(&url).send().await.unwrap().status(),
        StatusCode::OK
    );
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert_eq!(
        http().get(&url).send().await.unwrap().status(),
        StatusCode::NOT_FOUND
    );
    gw.shutdown().await;
}
