//! Presence (in memory and in Redis) and admin commands over MQTT, end to end: firmware
//! devices on the device port, admin and observer clients (MQTT 3.1.1 and 5) on the
//! broker listener, a real Redis (127.0.0.1:6379, and private redis-server processes for
//! outages), and gateway processes that are killed.

use crate::common;

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use redis::AsyncCommands;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use serde_json::{Value, json};
use tokio::process::{Child, Command};
use xiaozhi_gateway::admin::client::AdminClient;
use xiaozhi_gateway::config::{BrokerRole, BrokerUser, Config};
use xiaozhi_gateway::presence::redis::RedisPresence;
use xiaozhi_gateway::presence::{PresenceQuery, PresenceState, PresenceStore};
use xiaozhi_gateway::protocol::mac::Mac;
use xiaozhi_gateway::server::Gateway;
use xiaozhi_tools::simulator::device::SimDevice;

const REDIS: &str = "redis://127.0.0.1:6379";
const BIN: &str = env!("CARGO_BIN_EXE_xiaozhi-gateway");
const WAIT: Duration = Duration::from_secs(10);
const OBSERVER_USER: &str = "watcher";
const OBSERVER_PASS: &str = "watcher-secret";

fn unique_prefix(tag: &str) -> String {
    format!(
        "xz-test-{tag}-{}-{}:",
        std::process::id(),
        xiaozhi_gateway::history::record::new_id()[..8].to_owned()
    )
}

fn redis_config(prefix: &str, node: &str) -> Config {
    let mut c = common::test_config();
    c.node.id = node.into();
    c.presence.redis_url = Some(REDIS.into());
    c.presence.key_prefix = prefix.into();
    c
}

async fn redis_conn() -> redis::aio::MultiplexedConnection {
    redis::Client::open(REDIS)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .expect("Redis at 127.0.0.1:6379 (.ci/run starts it)")
}

async fn clean_redis(prefix: &str) {
    let mut conn = redis_conn().await;
    let keys: Vec<String> = conn.keys(format!("{prefix}*")).await.unwrap_or_default();
    if !keys.is_empty() {
        let _: () = conn.del(keys).await.unwrap();
    }
}

/// Waits until the store's entry for a device is in `want` (None: absent).
async fn wait_presence(
    store: &dyn PresenceStore,
    mac: &Mac,
    want: Option<PresenceState>,
) -> Option<xiaozhi_gateway::presence::PresenceRecord> {
    let deadline = Instant::now() + WAIT;
    loop {
        let got = store.get(&mac.colon()).await.ok().flatten();
        if got.as_ref().map(|r| r.state) == want {
            return got;
        }
        if Instant::now() > deadline {
            panic!("{mac}: presence {got:?}, want {want:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn admin(gw: &Gateway) -> AdminClient {
    AdminClient::connect(
        "127.0.0.1",
        gw.addrs.broker.unwrap().port(),
        common::ADMIN_USER,
        common::ADMIN_PASS,
        WAIT,
    )
    .await
    .expect("admin connects")
}

/// A plain MQTT 3.1.1 client on the broker listener, subscribed to `filters`.
async fn watcher(
    port: u16,
    user: &str,
    pass: &str,
    id: &str,
    filters: &[&str],
) -> (AsyncClient, EventLoop) {
    let mut opts = MqttOptions::new(id, "127.0.0.1", port);
    opts.set_credentials(user, pass);
    let (client, mut eventloop) = AsyncClient::new(opts, 64);
    for f in filters {
        client.subscribe(*f, QoS::AtMostOnce).await.unwrap();
    }
    let mut acks = 0;
    while acks < filters.len() {
        match tokio::time::timeout(WAIT, eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => acks += 1,
            Ok(Ok(_)) => {}
            other => panic!("watcher {id}: {other:?}"),
        }
    }
    (client, eventloop)
}

/// The next publish whose topic and JSON payload satisfy `pred`.
async fn next_where(
    eventloop: &mut EventLoop,
    mut pred: impl FnMut(&str, &Value) -> bool,
) -> (String, Value, bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                let v: Value = serde_json::from_slice(&p.payload).unwrap_or(Value::Null);
                if pred(&p.topic, &v) {
                    return (p.topic, v, p.retain);
                }
            }
            Ok(Ok(_)) => {}
            other => panic!("no matching publish: {other:?}"),
        }
    }
}

/// Devices go online, into a conversation, back online, offline (with and without
/// DISCONNECT): the store, the retained presence topic and the session events agree.
async fn lifecycle(config: Config, tag: u32) {
    let gw = common::start_with(config).await;
    let store = gw.presence.store().clone();
    let port = gw.addrs.broker.unwrap().port();
    let (_c, mut events) = watcher(
        port,
        common::ADMIN_USER,
        common::ADMIN_PASS,
        &format!("events-{tag}"),
        &["xiaozhi/devices/+/presence", "xiaozhi/devices/+/session"],
    )
    .await;

    let mut dev = common::device(&gw, tag).await;
    let mac = common::mac(tag);
    let rec = wait_presence(&*store, &mac, Some(PresenceState::Online))
        .await
        .unwrap();
    assert_eq!(rec.node, gw.presence.node());
    assert_eq!(rec.client_id, dev.credentials.client_id);
    assert_eq!(rec.group, "GID_test");
    assert!(rec.remote.starts_with("127.0.0.1:"));
    let (_, v, _) = next_where(&mut events, |t, v| {
        t.ends_with("/presence") && v["state"] == "online"
    })
    .await;
    assert_eq!(v["mac_address"], mac.colon());

    // A subscriber that arrives later still gets the current state (retained).
    let (_l, mut late) = watcher(
        port,
        common::ADMIN_USER,
        common::ADMIN_PASS,
        &format!("late-{tag}"),
        &[&format!("xiaozhi/devices/{mac}/presence")],
    )
    .await;
    let (_, v, retained) = next_where(&mut late, |_, _| true).await;
    assert!(retained, "presence is retained");
    assert_eq!(v["state"], "online");

    let (hello, _audio) = common::conversation(&mut dev).await;
    let rec = wait_presence(&*store, &mac, Some(PresenceState::InSession))
        .await
        .unwrap();
    assert_eq!(rec.session_id.as_deref(), Some(hello.session_id.as_str()));
    assert!(rec.session_since_ms.is_some());
    let (_, v, _) = next_where(&mut events, |t, v| {
        t.ends_with("/session") && v["event"] == "session_started"
    })
    .await;
    assert_eq!(v["session_id"], hello.session_id.as_str());
    assert_eq!(
        v["transport"], "ctr",
        "stock firmware's hello gets AES-CTR: {v}"
    );
    assert_eq!(
        store
            .list(&PresenceQuery {
                state: Some(PresenceState::InSession),
                ..Default::default()
            })
            .await
            .unwrap()
            .devices
            .iter()
            .filter(|d| d.mac_address == mac.colon())
            .count(),
        1
    );

    dev.publish_json(&json!({"type": "goodbye", "session_id": hello.session_id}))
        .await
        .unwrap();
    let rec = wait_presence(&*store, &mac, Some(PresenceState::Online))
        .await
        .unwrap();
    assert!(rec.session_id.is_none());
    let (_, v, _) = next_where(&mut events, |t, v| {
        t.ends_with("/session") && v["event"] == "session_ended"
    })
    .await;
    assert_eq!(v["reason"], "device_goodbye");
    assert!(v["duration_ms"].is_u64());
    assert!(v["uplink_bytes"].is_u64() && v["dropped"].is_u64());

    dev.disconnect().await;
    let rec = wait_presence(&*store, &mac, Some(PresenceState::Offline))
        .await
        .unwrap();
    assert!(rec.last_seen_ms > 0, "offline keeps last seen");
    let (_, v, _) = next_where(&mut events, |t, v| {
        t.ends_with("/presence") && v["state"] == "offline"
    })
    .await;
    assert_eq!(v["mac_address"], mac.colon());
    let listed = store.list(&PresenceQuery::default()).await.unwrap();
    assert!(listed.devices.iter().all(|d| d.mac_address != mac.colon()));

    // A device that loses power: no DISCONNECT, the socket just closes.
    let dev2 = common::device(&gw, tag + 1).await;
    let mac2 = common::mac(tag + 1);
    wait_presence(&*store, &mac2, Some(PresenceState::Online)).await;
    dev2.vanish().await;
    wait_presence(&*store, &mac2, Some(PresenceState::Offline)).await;
    assert_eq!(gw.metrics.snapshot().presence_errors, 0);
    gw.shutdown().await;
}

#[tokio::test]
async fn presence_follows_devices_in_memory() {
    lifecycle(common::test_config(), 600).await;
}

#[tokio::test]
async fn presence_follows_devices_in_redis() {
    let prefix = unique_prefix("life");
    lifecycle(redis_config(&prefix, "node-life"), 610).await;
    // The layout the README documents.
    let mut conn = redis_conn().await;
    let hash: std::collections::HashMap<String, String> = conn
        .hgetall(format!("{prefix}dev:{}", common::mac(610).colon()))
        .await
        .unwrap();
    assert_eq!(hash.get("state").map(String::as_str), Some("offline"));
    assert_eq!(hash.get("node").map(String::as_str), Some("node-life"));
    let ttl: i64 = conn
        .pttl(format!("{prefix}dev:{}", common::mac(610).colon()))
        .await
        .unwrap();
    assert!(ttl > 0, "offline entries expire too (pttl {ttl})");
    clean_redis(&prefix).await;
}

// ---------------------------------------------------------------------------------------
// Redis outage: a private redis-server that we stop and start again.

#[tokio::test]
async fn devices_keep_working_while_redis_is_down_and_state_is_right_after() {
    let port = common::free_port();
    let mut redis = common::start_redis(port).await;
    let mut config = common::test_config();
    config.presence.redis_url = Some(format!("redis://127.0.0.1:{port}"));
    config.presence.timeout_ms = 300;
    config.presence.heartbeat_secs = 1;
    config.presence.ttl_secs = 3;
    let gw = common::start_with(config).await;
    let store = gw.presence.store().clone();

    let dev_a = common::device(&gw, 620).await;
    wait_presence(&*store, &common::mac(620), Some(PresenceState::Online)).await;

    redis.kill().await.unwrap();
    let _ = redis.wait().await;
    // Devices come and go; conversations still work.
    dev_a.disconnect().await;
    let mut dev_b = common::device(&gw, 621).await;
    let (hello, _audio) = common::conversation(&mut dev_b).await;
    assert!(!hello.session_id.is_empty());
    assert!(
        common::eventually(WAIT, || gw.metrics.snapshot().presence_errors > 0).await,
        "errors are counted"
    );
    assert!(!gw.presence.healthy());

    // Redis returns empty (no persistence): the gateway writes the current state.
    let _redis = common::start_redis(port).await;
    wait_presence(&*store, &common::mac(621), Some(PresenceState::InSession)).await;
    wait_presence(&*store, &common::mac(620), Some(PresenceState::Offline)).await;
    assert!(common::eventually(WAIT, || gw.presence.healthy()).await);
    dev_b.disconnect().await;
    gw.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Two nodes on one Redis: one in this process, one a real gateway process that is killed.

async fn spawn_node(prefix: &str, node: &str) -> (Child, SocketAddr) {
    let mut child = Command::new(BIN)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("XZ_MQTT__LISTEN", "127.0.0.1:0")
        .env("XZ_BROKER__LISTEN", "127.0.0.1:0")
        .env("XZ_UDP__LISTEN", "127.0.0.1:0")
        .env("XZ_HTTP__LISTEN", "127.0.0.1:0")
        .env("XZ_LOG__FORMAT", "json")
        .env("XZ_HISTORY__ENABLED", "false")
        .env("XZ_AUTH__SIGNATURE_KEY", common::KEY)
        .env("XZ_NODE__ID", node)
        .env("XZ_PRESENCE__REDIS_URL", REDIS)
        .env("XZ_PRESENCE__KEY_PREFIX", prefix)
        .env("XZ_PRESENCE__HEARTBEAT_SECS", "1")
        .env("XZ_PRESENCE__TTL_SECS", "3")
        .args(["serve"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mqtt = common::wait_serving(&mut child).await;
    (child, mqtt)
}

#[tokio::test]
async fn two_nodes_share_redis_and_a_dead_nodes_devices_expire() {
    let prefix = unique_prefix("nodes");
    let (mut node_a, mqtt_a) = spawn_node(&prefix, "node-a").await;
    let mut config_b = redis_config(&prefix, "node-b");
    config_b.presence.heartbeat_secs = 1;
    config_b.presence.ttl_secs = 3;
    let gw_b = common::start_with(config_b.clone()).await;
    let store = gw_b.presence.store().clone();

    let _dev_a = SimDevice::connect(mqtt_a, common::creds(630))
        .await
        .unwrap();
    let dev_b = common::device(&gw_b, 631).await;
    let a = wait_presence(&*store, &common::mac(630), Some(PresenceState::Online))
        .await
        .unwrap();
    let b = wait_presence(&*store, &common::mac(631), Some(PresenceState::Online))
        .await
        .unwrap();
    assert_eq!((a.node.as_str(), b.node.as_str()), ("node-a", "node-b"));

    // Node B restarts: its reconcile clears its own leftovers, never node A's device.
    dev_b.vanish().await;
    gw_b.shutdown().await;
    let gw_b = common::start_with(config_b).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let a = wait_presence(&*store, &common::mac(630), Some(PresenceState::Online))
        .await
        .unwrap();
    assert_eq!(a.node, "node-a");
    let dev_b = common::device(&gw_b, 631).await;
    wait_presence(&*store, &common::mac(631), Some(PresenceState::Online)).await;

    // Node A dies without a word: within the TTL its device is no longer connected.
    node_a.start_kill().unwrap();
    let _ = node_a.wait().await;
    let killed = Instant::now();
    wait_presence(&*store, &common::mac(630), None).await;
    let took = killed.elapsed();
    assert!(
        took <= Duration::from_secs(5),
        "expired after {took:?} (ttl 3 s)"
    );
    let page = store.list(&PresenceQuery::default()).await.unwrap();
    let macs: Vec<_> = page.devices.iter().map(|d| d.mac_address.clone()).collect();
    assert!(macs.contains(&common::mac(631).colon()), "{macs:?}");
    assert!(!macs.contains(&common::mac(630).colon()), "{macs:?}");
    // Node B's heartbeats kept its device alive past the TTL.
    tokio::time::sleep(Duration::from_secs(4)).await;
    wait_presence(&*store, &common::mac(631), Some(PresenceState::Online)).await;

    dev_b.disconnect().await;
    gw_b.shutdown().await;
    clean_redis(&prefix).await;
    // The store used directly by a reader on yet another "node".
    let reader = RedisPresence::connect(REDIS, &prefix, Duration::from_secs(2)).await;
    assert!(reader.is_ok());
}

// ---------------------------------------------------------------------------------------
// Admin commands.

#[tokio::test]
async fn admin_commands_round_trip_with_mqtt_3() {
    let gw = common::start().await;
    let admin = admin(&gw).await;
    let mut dev = common::device(&gw, 640).await;
    let mac = common::mac(640);
    let t = WAIT;
    wait_presence(&**gw.presence.store(), &mac, Some(PresenceState::Online)).await;

    let status = admin
        .request(Some(&mac), json!({"command": "status"}), t)
        .await
        .unwrap();
    assert_eq!(status["ok"], true, "{status}");
    assert_eq!(status["result"]["state"], "online");
    assert_eq!(status["result"]["node"], gw.presence.node());
    assert!(status["request_id"].is_string());

    let tools = admin
        .request(
            Some(&mac),
            json!({"command": "mcp", "payload": {"jsonrpc": "2.0", "method": "tools/list"}}),
            t,
        )
        .await
        .unwrap();
    assert_eq!(tools["ok"], true, "{tools}");
    let names: Vec<&str> = tools["result"]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["name"].as_str())
        .collect();
    assert!(
        names.contains(&"self.audio_speaker.set_volume"),
        "{names:?}"
    );

    let set = admin
        .request(
            Some(&mac),
            json!({"command": "mcp", "payload": {"method": "tools/call", "params": {"name": "self.audio_speaker.set_volume", "arguments": {"volume": 37}}}}),
            t,
        )
        .await
        .unwrap();
    assert_eq!(set["ok"], true, "{set}");
    assert_eq!(dev.mcp_volume(), 37);

    // Every failure is a reply with a code.
    let code = |v: &Value| v["error"]["code"].as_str().unwrap_or("").to_owned();
    let slow = admin
        .request(
            Some(&mac),
            json!({"command": "mcp", "timeout_ms": 200, "payload": {"method": "tools/call", "params": {"name": "self.test.sleep", "arguments": {"ms": 2000}}}}),
            t,
        )
        .await
        .unwrap();
    assert_eq!(code(&slow), "device_timeout", "{slow}");
    let rpc = admin
        .request(
            Some(&mac),
            json!({"command": "mcp", "payload": {"method": "no/such/method"}}),
            t,
        )
        .await
        .unwrap();
    assert_eq!(code(&rpc), "device_error", "{rpc}");
    let unknown = admin
        .request(Some(&mac), json!({"command": "reboot"}), t)
        .await
        .unwrap();
    assert_eq!(code(&unknown), "unknown_command");
    let none = admin
        .request(Some(&mac), json!({"command": "goodbye"}), t)
        .await
        .unwrap();
    assert_eq!(code(&none), "no_conversation");
    let offline = admin
        .request(
            Some(&common::mac(649)),
            json!({"command": "mcp", "payload": {"method": "tools/list"}}),
            t,
        )
        .await
        .unwrap();
    assert_eq!(code(&offline), "device_offline");
    let offline_status = admin
        .request(Some(&common::mac(649)), json!({"command": "status"}), t)
        .await
        .unwrap();
    assert_eq!(offline_status["result"]["state"], "offline");
    let wrong = admin
        .request(None, json!({"command": "status"}), t)
        .await
        .unwrap();
    assert_eq!(code(&wrong), "wrong_topic");

    // goodbye ends the conversation; the device hears it.
    let (hello, _audio) = common::conversation(&mut dev).await;
    let bye = admin
        .request(Some(&mac), json!({"command": "goodbye"}), t)
        .await
        .unwrap();
    assert_eq!(bye["ok"], true, "{bye}");
    let goodbye = dev.recv_type("goodbye", t).await.unwrap();
    assert_eq!(goodbye["session_id"], hello.session_id.as_str());

    // list_online: filters and paging.
    let _d2 = common::device(&gw, 641).await;
    let _d3 = common::device(&gw, 642).await;
    for n in [641, 642] {
        wait_presence(
            &**gw.presence.store(),
            &common::mac(n),
            Some(PresenceState::Online),
        )
        .await;
    }
    let page1 = admin
        .request(
            None,
            json!({"command": "list_online", "filter": {"limit": 2}}),
            t,
        )
        .await
        .unwrap();
    assert_eq!(page1["result"]["total"], 3, "{page1}");
    assert_eq!(page1["result"]["devices"].as_array().unwrap().len(), 2);
    let next = page1["result"]["next"].as_str().unwrap().to_owned();
    let page2 = admin
        .request(
            None,
            json!({"command": "list_online", "filter": {"limit": 2, "after": next}}),
            t,
        )
        .await
        .unwrap();
    assert_eq!(page2["result"]["devices"].as_array().unwrap().len(), 1);
    assert!(page2["result"]["next"].is_null());
    let filtered = admin
        .request(
            None,
            json!({"command": "list_online", "filter": {"state": "in_session"}}),
            t,
        )
        .await
        .unwrap();
    assert_eq!(filtered["result"]["total"], 0, "{filtered}");

    // kick disconnects.
    let kick = admin
        .request(Some(&mac), json!({"command": "kick"}), t)
        .await
        .unwrap();
    assert_eq!(kick["ok"], true);
    assert!(dev.closed(t).await, "kicked device is disconnected");
    wait_presence(&**gw.presence.store(), &mac, Some(PresenceState::Offline)).await;

    admin.disconnect().await;
    gw.shutdown().await;
}

#[tokio::test]
async fn malformed_commands_get_an_error_reply_never_silence() {
    let gw = common::start().await;
    let port = gw.addrs.broker.unwrap().port();
    let (client, mut el) = watcher(
        port,
        common::ADMIN_USER,
        common::ADMIN_PASS,
        "raw-admin",
        &["xiaozhi/admin/errors", "xiaozhi/admin/replies/+", "ops/#"],
    )
    .await;
    let mac = common::mac(650);
    client
        .publish(
            format!("xiaozhi/admin/commands/{mac}"),
            QoS::AtLeastOnce,
            false,
            "{not json",
        )
        .await
        .unwrap();
    let (topic, v, _) = next_where(&mut el, |_, _| true).await;
    assert_eq!(topic, "xiaozhi/admin/errors");
    assert_eq!(v["error"]["code"], "malformed_json");
    client
        .publish(
            format!("xiaozhi/admin/commands/{mac}"),
            QoS::AtLeastOnce,
            false,
            r#"{"request_id":"no-command"}"#,
        )
        .await
        .unwrap();
    let (topic, v, _) = next_where(&mut el, |_, _| true).await;
    assert_eq!(topic, "xiaozhi/admin/replies/no-command");
    assert_eq!(v["error"]["code"], "invalid_command");

    // MQTT 3.1.1 clients name a reply topic with reply_to; never a device's topic.
    let status = |id: &str, reply_to: &str| {
        json!({"request_id": id, "command": "status", "reply_to": reply_to}).to_string()
    };
    let topic = format!("xiaozhi/admin/commands/{mac}");
    client
        .publish(
            &topic,
            QoS::AtLeastOnce,
            false,
            status("rt-1", "ops/replies"),
        )
        .await
        .unwrap();
    let (reply_topic, v, _) = next_where(&mut el, |_, _| true).await;
    assert_eq!(reply_topic, "ops/replies");
    assert_eq!(v["result"]["state"], "offline");
    client
        .publish(
            &topic,
            QoS::AtLeastOnce,
            false,
            status("rt-2", &format!("devices/p2p/{mac}")),
        )
        .await
        .unwrap();
    let (reply_topic, _, _) = next_where(&mut el, |_, _| true).await;
    assert_eq!(reply_topic, "xiaozhi/admin/replies/rt-2");
    gw.shutdown().await;
}

#[tokio::test]
async fn mqtt5_commands_reply_on_the_response_topic_with_correlation_data() {
    use rumqttc::v5::mqttbytes::QoS as QoS5;
    use rumqttc::v5::mqttbytes::v5::{Packet as Packet5, PublishProperties};
    use rumqttc::v5::{AsyncClient as Client5, Event as Event5, MqttOptions as Options5};

    let gw = common::start().await;
    let _dev = common::device(&gw, 660).await;
    let mac = common::mac(660);
    wait_presence(&**gw.presence.store(), &mac, Some(PresenceState::Online)).await;

    let mut opts = Options5::new("v5-admin", "127.0.0.1", gw.addrs.broker.unwrap().port());
    opts.set_credentials(common::ADMIN_USER, common::ADMIN_PASS);
    let (client, mut el) = Client5::new(opts, 16);
    client
        .subscribe("ops/replies/v5-admin", QoS5::AtMostOnce)
        .await
        .unwrap();
    client
        .subscribe("xiaozhi/admin/replies/+", QoS5::AtMostOnce)
        .await
        .unwrap();
    let mut acks = 0;
    while acks < 2 {
        if let Event5::Incoming(Packet5::SubAck(_)) = tokio::time::timeout(WAIT, el.poll())
            .await
            .unwrap()
            .unwrap()
        {
            acks += 1;
        }
    }
    let send = |response_topic: &str, corr: &'static [u8], id: &str| {
        let props = PublishProperties {
            response_topic: Some(response_topic.to_owned()),
            correlation_data: Some(bytes::Bytes::from_static(corr)),
            ..Default::default()
        };
        let payload = json!({"request_id": id, "command": "status"}).to_string();
        let client = client.clone();
        let topic = format!("xiaozhi/admin/commands/{mac}");
        async move {
            client
                .publish_with_properties(topic, QoS5::AtLeastOnce, false, payload, props)
                .await
                .unwrap()
        }
    };
    send("ops/replies/v5-admin", b"corr-1", "v5-1").await;
    let deadline = tokio::time::Instant::now() + WAIT;
    let (topic, corr, body) = loop {
        let event = tokio::time::timeout_at(deadline, el.poll()).await;
        if let Event5::Incoming(Packet5::Publish(p)) = event.unwrap().unwrap() {
            let corr = p
                .properties
                .as_ref()
                .and_then(|pp| pp.correlation_data.clone());
            break (
                String::from_utf8_lossy(&p.topic).into_owned(),
                corr,
                serde_json::from_slice::<Value>(&p.payload).unwrap(),
            );
        }
    };
    assert_eq!(topic, "ops/replies/v5-admin");
    assert_eq!(corr.as_deref(), Some(&b"corr-1"[..]));
    assert_eq!(body["ok"], true, "{body}");
    assert_eq!(body["result"]["state"], "online");

    // A response topic on a gateway-owned topic is not honoured: the default topic is used.
    send(
        "xiaozhi/devices/aa_bb_cc_dd_ee_ff/presence",
        b"corr-2",
        "v5-2",
    )
    .await;
    let deadline = tokio::time::Instant::now() + WAIT;
    let topic = loop {
        let event = tokio::time::timeout_at(deadline, el.poll()).await;
        if let Event5::Incoming(Packet5::Publish(p)) = event.unwrap().unwrap() {
            break String::from_utf8_lossy(&p.topic).into_owned();
        }
    };
    assert_eq!(topic, "xiaozhi/admin/replies/v5-2");
    gw.shutdown().await;
}

#[tokio::test]
async fn observers_and_devices_cannot_command() {
    let mut config = common::test_config();
    config.broker.users.push(BrokerUser {
        username: OBSERVER_USER.into(),
        password: OBSERVER_PASS.into(),
        role: BrokerRole::Observer,
    });
    let gw = common::start_with(config).await;
    let port = gw.addrs.broker.unwrap().port();
    let mut victim = common::device(&gw, 670).await;
    let mut intruder = common::device(&gw, 671).await;
    let mac = common::mac(670);
    wait_presence(&**gw.presence.store(), &mac, Some(PresenceState::Online)).await;
    let (_a, mut replies) = watcher(
        port,
        common::ADMIN_USER,
        common::ADMIN_PASS,
        "reply-watch",
        &["xiaozhi/admin/#"],
    )
    .await;

    // The observer may watch events but not command.
    let (observer, mut obs_el) = watcher(
        port,
        OBSERVER_USER,
        OBSERVER_PASS,
        "observer",
        &["xiaozhi/devices/+/presence"],
    )
    .await;
    let kick = json!({"request_id": "obs-1", "command": "kick"}).to_string();
    observer
        .publish(
            format!("xiaozhi/admin/commands/{mac}"),
            QoS::AtLeastOnce,
            false,
            kick.clone(),
        )
        .await
        .unwrap();
    let obs_pump = tokio::spawn(async move { while obs_el.poll().await.is_ok() {} });

    // A device publishes a command and a message for another device from the device port.
    intruder
        .publish_to(&format!("xiaozhi/admin/commands/{mac}"), kick.into_bytes())
        .await
        .unwrap();
    intruder
        .publish_to(
            &format!("devices/p2p/{mac}"),
            br#"{"type":"goodbye","session_id":""}"#.to_vec(),
        )
        .await
        .unwrap();

    // Nothing reached the command topic, the executor or the victim.
    let seen = tokio::time::timeout(
        Duration::from_millis(1500),
        next_where(&mut replies, |_, _| true),
    )
    .await;
    assert!(seen.is_err(), "no command passed: {seen:?}");
    let m = gw.metrics.snapshot();
    assert_eq!(m.admin_commands_ok + m.admin_commands_failed, 0);
    assert!(m.broker_publish_refused >= 1, "{m:?}");
    assert!(m.mqtt_dropped_foreign_topic >= 2, "{m:?}");
    assert!(
        victim.recv(Duration::from_millis(300)).await.is_err(),
        "victim got nothing"
    );
    assert!(!victim.is_closed());
    obs_pump.abort();
    gw.shutdown().await;
}

/// Command round-trip latency (status from the store; an MCP call through the device),
/// printed for the README and the closing note.
#[tokio::test]
async fn command_round_trip_latency() {
    let gw = common::start().await;
    let admin = admin(&gw).await;
    let _dev = common::device(&gw, 680).await;
    let mac = common::mac(680);
    wait_presence(&**gw.presence.store(), &mac, Some(PresenceState::Online)).await;
    let mut report = Vec::new();
    for (label, command) in [
        ("status", json!({"command": "status"})),
        (
            "mcp tools/call",
            json!({"command": "mcp", "payload": {"method": "tools/call", "params": {"name": "self.test.echo", "arguments": {"text": "hi"}}}}),
        ),
    ] {
        let mut samples = Vec::new();
        for _ in 0..300 {
            let t0 = Instant::now();
            let reply = admin
                .request(Some(&mac), command.clone(), WAIT)
                .await
                .unwrap();
            samples.push(t0.elapsed());
            assert_eq!(reply["ok"], true, "{reply}");
        }
        samples.sort();
        let p = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
        report.push(format!(
            "{label}: n={} p50={:?} p99={:?} max={:?}",
            samples.len(),
            p(0.5),
            p(0.99),
            samples[samples.len() - 1]
        ));
        assert!(
            p(0.5) < Duration::from_millis(100),
            "{label} p50 {:?}",
            p(0.5)
        );
    }
    println!("admin command round trip: {}", report.join("; "));
    admin.disconnect().await;
    gw.shutdown().await;
}

/// Chat records and upstream failures reach the bus, for observers too.
#[tokio::test]
async fn chat_records_and_upstream_failures_are_events() {
    use xiaozhi_tools::simulator::upstream::{MockUpstream, MockUpstreamConfig};
    let upstream = MockUpstream::start(MockUpstreamConfig::default())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::test_config();
    config.broker.users.push(BrokerUser {
        username: OBSERVER_USER.into(),
        password: OBSERVER_PASS.into(),
        role: BrokerRole::Observer,
    });
    config.pipeline.xiaozhi.urls = vec![upstream.url.clone()];
    config.history.enabled = true;
    config.history.database_url = format!("sqlite://{}/h.db", dir.path().display());
    config.history.journal_dir = dir.path().to_owned();
    let gw = common::start_with(config).await;
    let (_o, mut events) = watcher(
        gw.addrs.broker.unwrap().port(),
        OBSERVER_USER,
        OBSERVER_PASS,
        "chat-observer",
        &["xiaozhi/devices/+/chat", "xiaozhi/events/#"],
    )
    .await;
    let (_dev, session) = common::converse(&gw, 690, 1).await;
    let mac = common::mac(690);
    let (topic, user, _) = next_where(&mut events, |t, v| {
        t.ends_with("/chat") && v["chat_type"] == 1
    })
    .await;
    assert_eq!(topic, format!("xiaozhi/devices/{mac}/chat"));
    assert_eq!(user["type"], "chat_update");
    assert_eq!(user["session_id"], session.as_str());
    assert_eq!(user["content"], "turn 1");
    let (_, reply, _) = next_where(&mut events, |t, v| {
        t.ends_with("/chat") && v["chat_type"] == 2
    })
    .await;
    assert_eq!(reply["content"], "reply 1");
    gw.shutdown().await;

    // An upstream that is not there: the device gets an alert, the bus an event.
    let mut config = common::test_config();
    config.pipeline.xiaozhi.urls = vec![format!(
        "ws://127.0.0.1:{}/xiaozhi/v1/",
        common::free_port()
    )];
    config.pipeline.xiaozhi.connect_timeout_ms = 1_000;
    let gw = common::start_with(config).await;
    let (_a, mut events) = watcher(
        gw.addrs.broker.unwrap().port(),
        common::ADMIN_USER,
        common::ADMIN_PASS,
        "upstream-watch",
        &["xiaozhi/events/upstream"],
    )
    .await;
    let mut dev = common::device(&gw, 691).await;
    dev.publish_json(&SimDevice::firmware_hello())
        .await
        .unwrap();
    let alert = dev.recv_type("alert", WAIT).await.unwrap();
    let (_, event, _) = next_where(&mut events, |_, _| true).await;
    assert_eq!(event["event"], "upstream_failed");
    assert_eq!(event["mac_address"], common::mac(691).colon());
    assert_eq!(event["error"], alert["message"]);
    gw.shutdown().await;
}

/// Devices that leave in the middle of their conversations: the conversation ending (on
/// its own task) must never overwrite the departure (seen by the dispatcher) in the store.
#[tokio::test]
async fn devices_leaving_mid_conversation_all_end_offline() {
    let prefix = unique_prefix("leave");
    let gw = common::start_with(redis_config(&prefix, "node-leave")).await;
    let store = gw.presence.store().clone();
    let mut devices = Vec::new();
    for n in 0..300u32 {
        let mut dev = common::device(&gw, 700 + n).await;
        dev.publish_json(&SimDevice::firmware_hello())
            .await
            .unwrap();
        devices.push(dev);
    }
    let mut sessions = Vec::new();
    for dev in &mut devices {
        let hello = dev.recv_type("hello", WAIT).await.unwrap();
        sessions.push(hello["session_id"].as_str().unwrap().to_owned());
    }
    // Goodbye and gone at once, as the simulator (and a device powering off) does.
    let leaving: Vec<_> = devices
        .into_iter()
        .zip(sessions)
        .map(|(mut dev, session)| {
            tokio::spawn(async move {
                let bye = json!({"type": "goodbye", "session_id": session});
                dev.publish_json(&bye).await.unwrap();
                dev.disconnect().await
            })
        })
        .collect();
    for l in leaving {
        l.await.unwrap();
    }
    let deadline = Instant::now() + WAIT;
    loop {
        let page = store.list(&PresenceQuery::default()).await.unwrap();
        if page.total == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still listed as connected: {:?}",
            page.devices
                .iter()
                .map(|d| (&d.mac_address, d.state))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for n in 0..300u32 {
        let rec = store
            .get(&common::mac(700 + n).colon())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(rec.state, PresenceState::Offline, "{}", rec.mac_address);
    }
    gw.shutdown().await;
    clean_redis(&prefix).await;
}

/// `devices` and `cmd` from the command line, against a running gateway.
#[tokio::test]
async fn devices_and_cmd_cli() {
    let gw = common::start().await;
    let mut dev = common::device(&gw, 720).await;
    let mac = common::mac(720);
    wait_presence(&**gw.presence.store(), &mac, Some(PresenceState::Online)).await;
    let cli = |args: &[&str], password: &str| {
        let mut cmd = Command::new(BIN);
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("XZ_BROKER__LISTEN", gw.addrs.broker.unwrap().to_string())
            .env("XZ_ADMIN_USERNAME", common::ADMIN_USER)
            .env("XZ_ADMIN_PASSWORD", password)
            .args(args)
            .stdin(Stdio::null());
        async move {
            let out = tokio::time::timeout(WAIT, cmd.output())
                .await
                .unwrap()
                .unwrap();
            (
                out.status.code(),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        }
    };
    let (code, stdout, stderr) = cli(&["devices", "--json"], common::ADMIN_PASS).await;
    assert_eq!(code, Some(0), "{stderr}");
    let listed: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(listed[0]["mac_address"], mac.colon());
    assert_eq!(listed[0]["state"], "online");

    let (code, stdout, _) = cli(&["devices"], common::ADMIN_PASS).await;
    assert_eq!(code, Some(0));
    assert!(
        stdout.contains(&mac.colon()) && stdout.contains("1 connected, 0 in a conversation"),
        "{stdout}"
    );

    let (code, stdout, stderr) = cli(&["cmd", &mac.colon(), "status"], common::ADMIN_PASS).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(
        serde_json::from_str::<Value>(&stdout).unwrap()["state"],
        "online"
    );

    let (code, stdout, stderr) = cli(
        &["cmd", &mac.colon(), "mcp", r#"{"method":"tools/call","params":{"name":"self.audio_speaker.set_volume","arguments":{"volume":12}}}"#],
        common::ADMIN_PASS,
    )
    .await;
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert_eq!(dev.mcp_volume(), 12);

    let (code, _, stderr) = cli(&["cmd", &mac.colon(), "goodbye"], common::ADMIN_PASS).await;
    assert_eq!(code, Some(1));
    assert!(stderr.contains("no_conversation"), "{stderr}");

    let (code, _, stderr) = cli(&["cmd", &mac.colon(), "status"], "wrong-password").await;
    assert_eq!(code, Some(2));
    assert!(stderr.contains("refused"), "{stderr}");

    let (code, _, stderr) = cli(&["cmd", &mac.colon(), "mcp", "[1]"], common::ADMIN_PASS).await;
    assert_eq!(code, Some(2));
    assert!(stderr.contains("must be an object"), "{stderr}");
    dev.publish_json(&json!({"type": "goodbye", "session_id": ""}))
        .await
        .unwrap();
    gw.shutdown().await;
}
