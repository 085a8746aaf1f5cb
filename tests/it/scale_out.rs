//! Scale-out: gateway nodes on an external MQTT broker (a private Mosquitto per test)
//! and a shared Redis (127.0.0.1:6379, one key prefix per test). Admin clients talk only
//! to Mosquitto; devices talk only to their own node.

use crate::common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use redis::AsyncCommands;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use serde_json::{Value, json};
use xiaozhi_gateway::admin::client::AdminClient;
use xiaozhi_gateway::config::{BusMode, Config};
use xiaozhi_gateway::presence::PresenceState;
use xiaozhi_gateway::protocol::mac::Mac;
use xiaozhi_gateway::server::Gateway;
use xiaozhi_tools::simulator::device::SimDevice;
use xiaozhi_tools::simulator::upstream::{MockUpstream, MockUpstreamConfig};
use xiaozhi_tools::soak::fault_proxy::FaultProxy;
use xiaozhi_tools::soak::gateway::GatewayProcess;

use common::scratch_db::ScratchDb;

const REDIS: &str = "redis://127.0.0.1:6379";
const WAIT: Duration = Duration::from_secs(10);

fn unique_prefix(tag: &str) -> String {
    format!(
        "xz-test-{tag}-{}-{}:",
        std::process::id(),
        xiaozhi_gateway::history::record::new_id()[..8].to_owned()
    )
}

/// A node on the external broker at `mqtt_port`, sharing Redis under `prefix`.
fn node_config(node: &str, mqtt_port: u16, prefix: &str) -> Config {
    let mut c = common::test_config();
    c.node.id = node.into();
    c.bus.mode = BusMode::External;
    c.bus.url = format!("mqtt://127.0.0.1:{mqtt_port}");
    c.bus.reconnect_max_secs = 1;
    c.presence.redis_url = Some(REDIS.into());
    c.presence.key_prefix = prefix.into();
    c
}

async fn clean_redis(prefix: &str) {
    let mut conn = redis::Client::open(REDIS)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .expect("Redis at 127.0.0.1:6379 (.ci/run starts it)");
    let keys: Vec<String> = conn.keys(format!("{prefix}*")).await.unwrap_or_default();
    if !keys.is_empty() {
        let _: () = conn.del(keys).await.unwrap();
    }
}

async fn wait_bus(gw: &Gateway) {
    assert!(
        common::eventually(WAIT, || gw.metrics.snapshot().bus_connected == 1).await,
        "node connects to the external broker"
    );
}

async fn wait_online(gw: &Gateway, mac: &Mac, node: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        let got = gw.presence.store().get(&mac.colon()).await.ok().flatten();
        if got
            .as_ref()
            .is_some_and(|r| r.state == PresenceState::Online && r.node == node)
        {
            return;
        }
        assert!(Instant::now() < deadline, "{mac} online on {node}: {got:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An admin on Mosquitto (any credentials: it allows anonymous clients), retrying the
/// first command until the nodes' subscriptions are in place.
async fn admin(port: u16, probe: &Mac) -> AdminClient {
    let admin = AdminClient::connect("127.0.0.1", port, "ops", "ops", WAIT)
        .await
        .expect("admin connects to mosquitto");
    let deadline = Instant::now() + WAIT;
    loop {
        let reply = admin
            .request(
                Some(probe),
                json!({"command": "status"}),
                Duration::from_millis(500),
            )
            .await;
        if reply.is_ok_and(|r| r["ok"] == true) {
            return admin;
        }
        assert!(Instant::now() < deadline, "nodes answer commands");
    }
}

/// An MQTT 5 client on Mosquitto subscribed to `filter`.
async fn v5_client(port: u16, id: &str, filter: &str) -> (AsyncClient, EventLoop) {
    let opts = MqttOptions::new(id, "127.0.0.1", port);
    let (client, mut events) = AsyncClient::new(opts, 64);
    client.subscribe(filter, QoS::AtMostOnce).await.unwrap();
    loop {
        match tokio::time::timeout(WAIT, events.poll()).await {
            Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => return (client, events),
            Ok(Ok(_)) => {}
            other => panic!("v5 client {id}: {other:?}"),
        }
    }
}

/// Every publish that arrives within `window`: (topic, payload, correlation data).
async fn collect(events: &mut EventLoop, window: Duration) -> Vec<(String, Value, Option<Bytes>)> {
    let deadline = tokio::time::Instant::now() + window;
    let mut out = Vec::new();
    while let Ok(event) = tokio::time::timeout_at(deadline, events.poll()).await {
        if let Ok(Event::Incoming(Packet::Publish(p))) = event {
            let topic = String::from_utf8_lossy(&p.topic).into_owned();
            let payload = serde_json::from_slice(&p.payload).unwrap_or(Value::Null);
            let correlation = p.properties.and_then(|p| p.correlation_data);
            out.push((topic, payload, correlation));
        }
    }
    out
}

fn manager_client_id(mac: &Mac) -> String {
    format!("GID_default@@@{mac}@@@{mac}")
}

async fn management(gw: &Gateway, path: &str, body: &Value) -> Value {
    management_at(gw.addrs.http, path, body).await
}

async fn management_at(http: std::net::SocketAddr, path: &str, body: &Value) -> Value {
    let token = xiaozhi_gateway::http::management::daily_token(
        time::OffsetDateTime::now_utc().date(),
        common::KEY,
    );
    let resp = reqwest::Client::new()
        .post(format!("http://{http}{path}"))
        .bearer_auth(token)
        .json(body)
        .timeout(Duration::from_secs(20))
        .send()
        .await
        .expect("management API answers");
    resp.json().await.expect("JSON answer")
}

#[tokio::test]
async fn admins_on_the_external_broker_reach_devices_on_every_node() {
    let port = common::free_port();
    let _mosquitto = common::start_mosquitto(port).await;
    let prefix = unique_prefix("scale-cmd");
    let a = common::start_with(node_config("gw-a", port, &prefix)).await;
    let b = common::start_with(node_config("gw-b", port, &prefix)).await;
    assert_eq!(a.addrs.broker, None, "no embedded broker listener");
    wait_bus(&a).await;
    wait_bus(&b).await;

    let (mac_a, mac_b, mac_gone) = (common::mac(1101), common::mac(1102), common::mac(1103));
    let mut dev_a = common::device(&a, 1101).await;
    let mut dev_b = common::device(&b, 1102).await;
    wait_online(&a, &mac_a, "gw-a").await;
    wait_online(&a, &mac_b, "gw-b").await;
    let admin = admin(port, &mac_a).await;

    // Each command reaches one node (shared subscription) and is answered by the
    // device's node, wherever it landed.
    let mut vias = 0;
    for round in 0..6 {
        for (mac, node) in [
            (&mac_a, "gw-a"),
            (&mac_a, "gw-a"),
            (&mac_b, "gw-b"),
            (&mac_b, "gw-b"),
        ] {
            let status = admin
                .request(Some(mac), json!({"command": "status"}), WAIT)
                .await
                .unwrap();
            assert_eq!(status["ok"], true, "round {round}: {status}");
            assert_eq!(
                status["node"], node,
                "answered by the device's node: {status}"
            );
            assert_eq!(status["result"]["node"], node);
            if let Some(via) = status["via"].as_str() {
                assert_ne!(via, node, "forwarded by the other node: {status}");
                vias += 1;
            }
            assert!(
                status["result"]["tools"].is_array(),
                "tools known only to the owner: {status}"
            );
        }
    }
    let set_volume = |v: u8| json!({"command": "mcp", "payload": {"method": "tools/call", "params": {"name": "self.audio_speaker.set_volume", "arguments": {"volume": v}}}});
    for (i, (mac, dev)) in [(&mac_a, &dev_a), (&mac_b, &dev_b)].into_iter().enumerate() {
        for v in [11 + i as u8, 21 + i as u8, 31 + i as u8] {
            let reply = admin.request(Some(mac), set_volume(v), WAIT).await.unwrap();
            assert_eq!(reply["ok"], true, "{reply}");
            assert_eq!(dev.mcp_volume(), v);
        }
    }
    assert!(vias > 0, "24 commands, none forwarded?");
    let forwarded = a.metrics.snapshot().admin_commands_forwarded
        + b.metrics.snapshot().admin_commands_forwarded;
    assert!(forwarded > 0, "30 commands, none landed on the wrong node?");

    // MQTT 5: the response topic and correlation data survive forwarding, and a device
    // no node holds gets exactly one answer.
    let (ops, mut replies) = v5_client(port, "ops-v5", "ops/replies/#").await;
    for (i, mac) in [&mac_a, &mac_b, &mac_gone, &mac_b].into_iter().enumerate() {
        let props = PublishProperties {
            response_topic: Some(format!("ops/replies/{i}")),
            correlation_data: Some(Bytes::from(format!("corr-{i}"))),
            ..Default::default()
        };
        let command = json!({"request_id": format!("v5-{i}"), "command": "status"});
        ops.publish_with_properties(
            format!("xiaozhi/admin/commands/{mac}"),
            QoS::AtLeastOnce,
            false,
            command.to_string(),
            props,
        )
        .await
        .unwrap();
    }
    let got = collect(&mut replies, Duration::from_secs(3)).await;
    assert_eq!(got.len(), 4, "one reply per command: {got:?}");
    for (i, want_node) in [Some("gw-a"), Some("gw-b"), None, Some("gw-b")]
        .into_iter()
        .enumerate()
    {
        let (_, reply, corr) = got
            .iter()
            .find(|(t, _, _)| t == &format!("ops/replies/{i}"))
            .unwrap_or_else(|| panic!("reply {i} in {got:?}"));
        assert_eq!(
            corr.as_deref(),
            Some(format!("corr-{i}").as_bytes()),
            "{reply}"
        );
        match want_node {
            Some(node) => assert_eq!(reply["node"], node, "{reply}"),
            None => {
                assert_eq!(reply["ok"], true, "status of an unknown device: {reply}");
                assert_eq!(reply["result"]["state"], "offline", "{reply}");
            }
        }
    }
    // A device command for a device nobody holds: one device_offline answer.
    let gone = admin
        .request(Some(&mac_gone), json!({"command": "goodbye"}), WAIT)
        .await
        .unwrap();
    assert_eq!(gone["error"]["code"], "device_offline", "{gone}");

    // devices/p2p/<mac_> from an admin reaches the device on whichever node holds it.
    ops.publish(
        format!("devices/p2p/{mac_b}"),
        QoS::AtMostOnce,
        false,
        r#"{"type":"custom","text":"hello b"}"#,
    )
    .await
    .unwrap();
    collect(&mut replies, Duration::from_millis(200)).await; // sends it
    let custom = dev_b.recv_type("custom", WAIT).await.unwrap();
    assert_eq!(custom["text"], "hello b");
    assert!(
        dev_a
            .recv_type("custom", Duration::from_millis(500))
            .await
            .is_err()
    );
    assert!(a.metrics.snapshot().bus_p2p_elsewhere >= 1);

    // Node A's management API answers for the device node B holds.
    let ids = [
        manager_client_id(&mac_a),
        manager_client_id(&mac_b),
        manager_client_id(&mac_gone),
    ];
    let status = management(&a, "/api/devices/status", &json!({"clientIds": ids})).await;
    assert_eq!(status[&ids[0]]["exists"], true, "{status}");
    assert_eq!(status[&ids[1]]["exists"], true, "from Redis: {status}");
    assert_eq!(status[&ids[2]]["exists"], false, "{status}");
    let body = json!({"type": "mcp", "payload": {"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "self.audio_speaker.set_volume", "arguments": {"volume": 77}}}});
    let answer = management(&a, &format!("/api/commands/{}", ids[1]), &body).await;
    assert_eq!(answer["success"], true, "{answer}");
    assert_eq!(dev_b.mcp_volume(), 77);
    let answer = management(&a, &format!("/api/commands/{}", ids[2]), &body).await;
    assert_eq!(answer["success"], false, "{answer}");
    assert_eq!(answer["error"], "device not connected");

    drop(dev_a);
    drop(dev_b);
    a.shutdown().await;
    b.shutdown().await;
    clean_redis(&prefix).await;
}

#[tokio::test]
async fn devices_keep_talking_while_the_broker_is_away_and_events_flow_again() {
    let port = common::free_port();
    let mut mosquitto = common::start_mosquitto(port).await;
    let prefix = unique_prefix("scale-outage");
    let upstream = MockUpstream::start(MockUpstreamConfig::default())
        .await
        .unwrap();
    let mut config = node_config("gw-solo", port, &prefix);
    config.broker.publish_queue = 64;
    config.pipeline.xiaozhi.urls = vec![upstream.url.clone()];
    let gw = common::start_with(config).await;
    wait_bus(&gw).await;
    let mac = common::mac(1111);
    let (watch, events) = v5_client(port, "watch-1", &format!("xiaozhi/devices/{mac}/up")).await;

    // The broker goes away: devices keep talking (a whole conversation through echo),
    // the bus counts the gap and keeps at most its queue.
    mosquitto.kill().await.unwrap();
    let _ = mosquitto.wait().await;
    drop(watch);
    assert!(
        common::eventually(WAIT, || gw.metrics.snapshot().bus_connected == 0).await,
        "the node sees the broker go"
    );
    let (mut dev, session) = common::converse(&gw, 1111, 2).await;
    for i in 0..300 {
        dev.publish_json(&json!({"session_id": session, "type": "custom", "n": i}))
            .await
            .unwrap();
    }
    assert!(
        common::eventually(WAIT, || gw.metrics.snapshot().bus_dropped > 0).await,
        "a full queue drops and counts"
    );
    let m = gw.metrics.snapshot();
    assert!(m.bus_queued <= 64, "queue bounded: {}", m.bus_queued);
    assert!(m.bus_disconnects >= 1);

    // The broker is back: the node reconnects, subscribes again, and events flow.
    let _mosquitto = common::start_mosquitto(port).await;
    wait_bus(&gw).await;
    let (_watch, mut events_again) =
        v5_client(port, "watch-2", &format!("xiaozhi/devices/{mac}/up")).await;
    drop(events);
    let deadline = Instant::now() + WAIT;
    let mut seen = false;
    let mut n = 1000;
    while !seen && Instant::now() < deadline {
        dev.publish_json(&json!({"session_id": session, "type": "custom", "n": n}))
            .await
            .unwrap();
        n += 1;
        let got = collect(&mut events_again, Duration::from_millis(200)).await;
        seen = got
            .iter()
            .any(|(_, v, _)| v["type"] == "custom" && v["n"].as_u64() >= Some(1000));
    }
    assert!(seen, "device messages reach the broker again");
    let admin = admin(port, &mac).await;
    let status = admin
        .request(Some(&mac), json!({"command": "status"}), WAIT)
        .await
        .unwrap();
    assert_eq!(status["node"], "gw-solo", "{status}");
    drop(dev);
    gw.shutdown().await;
    upstream.stop().await;
    clean_redis(&prefix).await;
}

/// What a node process is told (everything else is the built-in default).
struct NodeEnv<'a> {
    node: &'a str,
    mqtt_port: u16,
    prefix: &'a str,
    database_url: String,
    journal: &'a std::path::Path,
    upstream: &'a str,
}

async fn spawn_node(env: &NodeEnv<'_>, log: &std::path::Path) -> GatewayProcess {
    let vars: Vec<(String, String)> = [
        ("XZ_NODE__ID", env.node.to_owned()),
        ("XZ_AUTH__SIGNATURE_KEY", common::KEY.to_owned()),
        ("XZ_MQTT__LISTEN", "127.0.0.1:0".into()),
        ("XZ_MQTT__CONNECT_RATE_PER_SOURCE", "0".into()),
        ("XZ_MQTT__MESSAGE_RATE", "0".into()),
        ("XZ_UDP__LISTEN", "127.0.0.1:0".into()),
        ("XZ_UDP__CHANNEL_RATE", "0".into()),
        ("XZ_HTTP__LISTEN", "127.0.0.1:0".into()),
        ("XZ_LOG__FORMAT", "json".into()),
        ("XZ_LOG__LEVEL", "info".into()),
        ("XZ_BUS__MODE", "external".into()),
        ("XZ_BUS__URL", format!("mqtt://127.0.0.1:{}", env.mqtt_port)),
        ("XZ_BUS__RECONNECT_MAX_SECS", "1".into()),
        ("XZ_PRESENCE__REDIS_URL", REDIS.into()),
        ("XZ_PRESENCE__KEY_PREFIX", env.prefix.to_owned()),
        ("XZ_PRESENCE__HEARTBEAT_SECS", "1".into()),
        ("XZ_PRESENCE__TTL_SECS", "3".into()),
        ("XZ_PIPELINE__KIND", "xiaozhi".into()),
        (
            "XZ_PIPELINE__XIAOZHI__URLS",
            format!("[\"{}\"]", env.upstream),
        ),
        ("XZ_HISTORY__ENABLED", "true".into()),
        ("XZ_HISTORY__MODE", "text".into()),
        ("XZ_HISTORY__DATABASE_URL", env.database_url.clone()),
        ("XZ_HISTORY__JOURNAL_DIR", env.journal.display().to_string()),
        ("XZ_HISTORY__WRITE_TIMEOUT_MS", "500".into()),
        ("XZ_HISTORY__RETRY_SECS", "1".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    GatewayProcess::start(
        std::path::Path::new(env!("CARGO_BIN_EXE_xiaozhi-gateway")),
        &vars,
        log,
    )
    .await
    .unwrap_or_else(|e| panic!("node {} starts: {e}", env.node))
}

async fn device_at(addr: std::net::SocketAddr, n: u32) -> SimDevice {
    SimDevice::connect(addr, common::creds(n))
        .await
        .expect("device connects")
}

/// The node the presence store names for a device, if it reads as connected.
async fn node_of(
    store: &xiaozhi_gateway::presence::redis::RedisPresence,
    mac: &Mac,
) -> Option<String> {
    use xiaozhi_gateway::presence::PresenceStore;
    store
        .get(&mac.colon())
        .await
        .ok()
        .flatten()
        .filter(|r| r.state != PresenceState::Offline)
        .map(|r| r.node)
}

/// (chat_type, content) of every row of a session.
async fn rows_of(pool: &sqlx::MySqlPool, session: &str) -> Vec<(i8, String)> {
    sqlx::query_as("SELECT chat_type, content FROM ai_agent_chat_history WHERE session_id = ? ORDER BY chat_type, content")
        .bind(session)
        .fetch_all(pool)
        .await
        .unwrap_or_default()
}

#[tokio::test]
async fn a_killed_nodes_devices_carry_on_elsewhere_and_its_journal_replays_once() {
    let port = common::free_port();
    let _mosquitto = common::start_mosquitto(port).await;
    let prefix = unique_prefix("scale-kill");
    let db = ScratchDb::new("scale").await;
    let pool = db.pool().await;
    let upstream = MockUpstream::start(MockUpstreamConfig::default())
        .await
        .unwrap();
    let mariadb: std::net::SocketAddr = "127.0.0.1:3306".parse().unwrap();
    // Node A reaches the database through a proxy the test can cut.
    let db_proxy = FaultProxy::start("mariadb", mariadb).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (journal_a, journal_b) = (dir.path().join("journal-a"), dir.path().join("journal-b"));
    let env_a = NodeEnv {
        node: "gw-a",
        mqtt_port: port,
        prefix: &prefix,
        database_url: format!("mysql://root@{}/{}", db_proxy.addr, db.name),
        journal: &journal_a,
        upstream: &upstream.url,
    };
    let env_b = NodeEnv {
        node: "gw-b",
        mqtt_port: port,
        prefix: &prefix,
        database_url: db.url(),
        journal: &journal_b,
        upstream: &upstream.url,
    };
    let a = spawn_node(&env_a, &dir.path().join("a.log")).await;
    let b = spawn_node(&env_b, &dir.path().join("b.log")).await;
    let store = xiaozhi_gateway::presence::redis::RedisPresence::connect(
        REDIS,
        &prefix,
        Duration::from_secs(2),
    )
    .await
    .expect("Redis");

    // Six devices on A, two on B; every one has a conversation stored at once.
    let on_a: Vec<u32> = (1201..1207).collect();
    let on_b: Vec<u32> = vec![1211, 1212];
    let mut completed = Vec::new();
    let mut devices = Vec::new();
    for &n in &on_a {
        let mut dev = device_at(a.mqtt, n).await;
        completed.push(common::converse_on(&mut dev, 1).await);
        devices.push((n, dev));
    }
    let mut held_by_b = Vec::new();
    for &n in &on_b {
        let mut dev = device_at(b.mqtt, n).await;
        completed.push(common::converse_on(&mut dev, 1).await);
        held_by_b.push(dev);
    }

    // Process A's management API reports and commands a device process B holds.
    let on_b_id = manager_client_id(&common::mac(on_b[0]));
    let status = management_at(
        a.http,
        "/api/devices/status",
        &json!({"clientIds": [on_b_id]}),
    )
    .await;
    assert_eq!(status[&on_b_id]["exists"], true, "{status}");
    let body = json!({"type": "mcp", "payload": {"jsonrpc": "2.0", "id": 9, "method": "tools/call", "params": {"name": "self.audio_speaker.set_volume", "arguments": {"volume": 64}}}});
    let answer = management_at(a.http, &format!("/api/commands/{on_b_id}"), &body).await;
    assert_eq!(answer["success"], true, "{answer}");
    assert_eq!(held_by_b[0].mcp_volume(), 64);

    // A's database goes away: A's next conversations are journaled on A's disk.
    db_proxy.cut();
    let mut cut_sessions = Vec::new();
    for (_, dev) in devices.iter_mut().take(3) {
        cut_sessions.push(common::converse_on(dev, 1).await);
    }
    tokio::time::sleep(Duration::from_secs(2)).await; // past the write timeout: journaled
    let journaled: u64 = std::fs::read_dir(&journal_a)
        .map(|d| {
            d.filter_map(|e| e.ok()?.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0);
    assert!(journaled > 0, "A journals while its database is away");

    // A dies mid-conversation.
    let (_, mid) = devices.last_mut().unwrap();
    let (hello, mut audio) = common::conversation(mid).await;
    mid.publish_json(&common::listen_start(&hello.session_id, "auto"))
        .await
        .unwrap();
    for i in 0..2 {
        audio
            .send(
                i * 60,
                &xiaozhi_tools::simulator::audio::synthetic_frame(i, 30),
            )
            .await
            .unwrap();
    }
    a.kill().await;

    // A's devices notice and come back on B (all but the last, which stays away); their
    // new conversations are stored by B.
    for (_, dev) in &devices {
        assert!(
            common::eventually(WAIT, || dev.is_closed()).await,
            "the device sees its node die"
        );
    }
    drop(devices);
    let mut moved = Vec::new();
    for &n in &on_a[..5] {
        let mut dev = device_at(b.mqtt, n).await;
        completed.push(common::converse_on(&mut dev, 1).await);
        moved.push(dev);
    }
    for &n in &on_a[..5] {
        assert_eq!(
            node_of(&store, &common::mac(n)).await.as_deref(),
            Some("gw-b")
        );
    }
    // The one that stayed away expires with A's heartbeats (TTL 3 s).
    let gone = common::mac(on_a[5]);
    let deadline = Instant::now() + Duration::from_secs(3 + 5);
    while node_of(&store, &gone).await.is_some() {
        assert!(
            Instant::now() < deadline,
            "a dead node's device expires within the TTL"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // An admin on the broker finds them on B.
    let admin = admin(port, &common::mac(on_a[0])).await;
    let status = admin
        .request(
            Some(&common::mac(on_a[0])),
            json!({"command": "status"}),
            WAIT,
        )
        .await
        .unwrap();
    assert_eq!(status["node"], "gw-b", "{status}");
    // So does the CLI, with the bus settings a node has (no admin named: anonymous).
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_xiaozhi-gateway"))
        .args(["cmd", &common::mac(on_a[1]).colon(), "status", "--json"])
        .env("XZ_BUS__MODE", "external")
        .env("XZ_BUS__URL", format!("mqtt://127.0.0.1:{port}"))
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reply: Value = serde_json::from_str(&stdout).expect("JSON reply");
    assert_eq!(reply["node"], "gw-b", "{reply}");

    // A restarts with the same id and its database back: its journal replays, and the
    // devices B now holds stay B's.
    db_proxy.restore();
    let a2 = spawn_node(&env_a, &dir.path().join("a2.log")).await;
    let all: Vec<&String> = completed.iter().chain(&cut_sessions).collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut missing = Vec::new();
        for session in &all {
            let rows = rows_of(&pool, session).await;
            let kinds: Vec<i8> = rows.iter().map(|r| r.0).collect();
            assert!(rows.len() <= 2, "session {session} stored twice: {rows:?}");
            if kinds != [1, 2] {
                missing.push((*session).clone());
            }
        }
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "sessions not stored once after A's restart: {missing:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for &n in &on_a[..5] {
        assert_eq!(
            node_of(&store, &common::mac(n)).await.as_deref(),
            Some("gw-b"),
            "A's restart leaves B's devices alone"
        );
    }
    drop(moved);
    drop(held_by_b);
    a2.stop(Duration::from_secs(5)).await;
    b.stop(Duration::from_secs(5)).await;
    upstream.stop().await;
    db.drop_db().await;
    clean_redis(&prefix).await;
}

#[tokio::test]
async fn the_simulator_reconnects_to_another_node_like_the_firmware() {
    let port = common::free_port();
    let _mosquitto = common::start_mosquitto(port).await;
    let prefix = unique_prefix("scale-sim");
    let a = common::start_with(node_config("gw-sim-a", port, &prefix)).await;
    let b = common::start_with(node_config("gw-sim-b", port, &prefix)).await;
    let config = xiaozhi_tools::simulator::SimConfig {
        mqtt: vec![a.addrs.mqtt, b.addrs.mqtt],
        signature_key: Some(common::KEY.into()),
        devices: 6,
        stream_for: Duration::from_secs(6),
        first_device: 1300,
        ..Default::default()
    };
    let sim = tokio::spawn(xiaozhi_tools::simulator::run(config));
    tokio::time::sleep(Duration::from_secs(2)).await;
    a.shutdown().await;
    let report = sim.await.unwrap();
    assert!(report.errors.is_empty(), "{report}");
    assert_eq!(report.connected, 6, "{report}");
    assert!(
        report.reconnects >= 3,
        "the three devices on A came back on B: {report}"
    );
    // Frames sent while a device was between nodes are lost; the rest are echoed.
    assert!(
        report.frames_echoed * 10 >= report.frames_sent * 6,
        "most frames echoed across the move: {report}"
    );
    b.shutdown().await;
    clean_redis(&prefix).await;
}

/// A broker that speaks only MQTT 3.1.1, as some deployed brokers do: a proxy in front of
/// Mosquitto that refuses every MQTT 5 CONNECT the way a 3.1.1 broker does (CONNACK
/// return code 1, "unacceptable protocol version") and passes 3.1.1 connections through.
async fn v311_only_proxy(mosquitto: u16) -> (u16, tokio::task::JoinHandle<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            tokio::spawn(async move {
                // Fixed header, remaining length (< 128 bytes here), then the variable
                // header: protocol name "MQTT" (2 + 4 bytes) and the level.
                let mut head = vec![0u8; 9];
                if client.read_exact(&mut head).await.is_err() {
                    return;
                }
                let level = head[8];
                if level == 5 {
                    let _ = client.write_all(&[0x20, 0x02, 0x00, 0x01]).await;
                    return;
                }
                let Ok(mut broker) = tokio::net::TcpStream::connect(("127.0.0.1", mosquitto)).await
                else {
                    return;
                };
                if broker.write_all(&head).await.is_ok() {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut broker).await;
                }
            });
        }
    });
    (port, task)
}

#[tokio::test]
async fn a_broker_without_mqtt_5_is_spoken_to_in_3_1_1() {
    let port = common::free_port();
    let _mosquitto = common::start_mosquitto(port).await;
    let (v311_port, proxy) = v311_only_proxy(port).await;
    let prefix = unique_prefix("scale-v311");
    // protocol = "auto" (the default): MQTT 5 first, then 3.1.1.
    let gw = common::start_with(node_config("gw-v311", v311_port, &prefix)).await;
    wait_bus(&gw).await;
    assert!(
        gw.metrics.snapshot().bus_disconnects >= 1,
        "the MQTT 5 attempt was refused"
    );
    let mac = common::mac(1120);
    let mut dev = common::device(&gw, 1120).await;
    wait_online(&gw, &mac, "gw-v311").await;
    // Commands (reply_to, as 3.1.1 has no response topic) and deliveries both work.
    let admin = admin(port, &mac).await;
    let status = admin
        .request(Some(&mac), json!({"command": "status"}), WAIT)
        .await
        .unwrap();
    assert_eq!(status["node"], "gw-v311", "{status}");
    let (ops, mut events) = v5_client(port, "ops-v311", "ops/none").await;
    ops.publish(
        format!("devices/p2p/{mac}"),
        QoS::AtMostOnce,
        false,
        r#"{"type":"custom","text":"over 3.1.1"}"#,
    )
    .await
    .unwrap();
    collect(&mut events, Duration::from_millis(200)).await;
    let custom = dev.recv_type("custom", WAIT).await.unwrap();
    assert_eq!(custom["text"], "over 3.1.1");
    gw.shutdown().await;
    proxy.abort();
    clean_redis(&prefix).await;
}
