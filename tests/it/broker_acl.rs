//! The broker listener: authentication with proper CONNACKs, role-based ACLs on every
//! publish and subscription, retained messages, admin commands with MQTT 5 request /
//! response properties, wills, reconnects, and slow-loris resistance.

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use xiaozhi_gateway::broker::bus::{BusCommand, EmbeddedBroker};
use xiaozhi_gateway::broker::inbound::Inbound;
use xiaozhi_gateway::broker::registry::DeviceRegistry;
use xiaozhi_gateway::config::{BrokerConfig, BrokerRole, BrokerUser};
use xiaozhi_gateway::lifecycle::Lifecycle;
use xiaozhi_gateway::metrics::Metrics;
use xiaozhi_gateway::protocol::topics;

const OBSERVER_USER: &str = "watcher";
const OBSERVER_PASS: &str = "watcher-secret";
const WAIT: Duration = Duration::from_secs(5);
/// How long "nothing arrives" is watched for.
const QUIET: Duration = Duration::from_millis(400);

fn users() -> Vec<BrokerUser> {
    vec![
        BrokerUser {
            username: common::ADMIN_USER.into(),
            password: common::ADMIN_PASS.into(),
            role: BrokerRole::Admin,
        },
        BrokerUser {
            username: OBSERVER_USER.into(),
            password: OBSERVER_PASS.into(),
            role: BrokerRole::Observer,
        },
    ]
}

/// The whole gateway, with an observer user beside the admin.
async fn gateway() -> xiaozhi_gateway::server::Gateway {
    let mut config = common::test_config();
    config.broker.users = users();
    common::start_with(config).await
}

/// Just the embedded broker, with the built-in tunables edited by `tune`.
struct Broker {
    broker: EmbeddedBroker,
    /// The admin commands the broker delivers (taken by the test that reads them).
    commands: Option<mpsc::Receiver<BusCommand>>,
    metrics: Arc<Metrics>,
    port: u16,
    /// The listener's lifecycle, as the gateway holds it.
    life: Lifecycle,
    _dir: tempfile::TempDir,
}

async fn broker(tune: impl FnOnce(String) -> String) -> Broker {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("warn")
        .with_test_writer()
        .try_init();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("router.toml");
    let toml = tune(include_str!("../../broker-config/router.toml").to_owned());
    std::fs::write(&path, toml).unwrap();
    let config = BrokerConfig {
        listen: ([127, 0, 0, 1], 0).into(),
        router_config: Some(path),
        users: users(),
        ..BrokerConfig::default()
    };
    let metrics = Arc::new(Metrics::default());
    let registry = Arc::new(DeviceRegistry::new(16, metrics.clone()));
    let (inbound, commands) = Inbound::new(registry, None, metrics.clone());
    let life = Lifecycle::new();
    let broker = EmbeddedBroker::start(&config, inbound, metrics.clone(), &life)
        .await
        .expect("broker starts");
    let port = broker.listen_addr.port();
    Broker {
        broker,
        commands: Some(commands),
        metrics,
        port,
        life,
        _dir: dir,
    }
}

fn mac_topic(prefix: &str, n: u32) -> String {
    format!("{prefix}{}", common::mac(n))
}

/// Waits until `f` picks something out of the events, or `WAIT` passes.
async fn next_event<E, T>(
    rx: &mut mpsc::UnboundedReceiver<E>,
    mut f: impl FnMut(E) -> Option<T>,
) -> Option<T> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(e)) => {
                if let Some(t) = f(e) {
                    return Some(t);
                }
            }
            _ => return None,
        }
    }
}

/// True once the event stream ends (the client's connection closed) within `WAIT`.
async fn closed<E>(rx: &mut mpsc::UnboundedReceiver<E>) -> bool {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(_)) => continue,
            Ok(None) => return true,
            Err(_) => return false,
        }
    }
}

/// True if `f` matches nothing within `QUIET`.
async fn quiet<E>(rx: &mut mpsc::UnboundedReceiver<E>, mut f: impl FnMut(&E) -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + QUIET;
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(e)) if f(&e) => return false,
            Ok(Some(_)) => continue,
            Ok(None) | Err(_) => return true,
        }
    }
}

mod v4 {
    use super::*;
    pub use rumqttc::{
        AsyncClient, ConnectReturnCode, ConnectionError, Event, LastWill, MqttOptions, Packet, QoS,
        SubscribeReasonCode,
    };

    /// A connected 3.1.1 client whose event loop runs in a task; dropping it closes the
    /// socket without DISCONNECT.
    pub struct Client {
        pub client: AsyncClient,
        pub events: mpsc::UnboundedReceiver<Event>,
        task: JoinHandle<()>,
    }

    impl Drop for Client {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    pub fn options(port: u16, id: &str, user: &str, pass: &str) -> MqttOptions {
        let mut opts = MqttOptions::new(id, "127.0.0.1", port);
        opts.set_credentials(user, pass);
        opts
    }

    pub async fn connect_with(opts: MqttOptions) -> Result<Client, ConnectionError> {
        let (client, mut eventloop) = AsyncClient::new(opts, 100);
        loop {
            match tokio::time::timeout(WAIT, eventloop.poll())
                .await
                .expect("CONNACK in time")?
            {
                Event::Incoming(Packet::ConnAck(_)) => break,
                _ => continue,
            }
        }
        let (tx, events) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            while let Ok(e) = eventloop.poll().await {
                if tx.send(e).is_err() {
                    break;
                }
            }
        });
        Ok(Client {
            client,
            events,
            task,
        })
    }

    pub async fn connect(port: u16, id: &str, user: &str, pass: &str) -> Client {
        connect_with(options(port, id, user, pass))
            .await
            .expect("client connects")
    }

    impl Client {
        pub async fn subscribe(&mut self, filter: &str) -> Vec<SubscribeReasonCode> {
            self.client
                .subscribe(filter, QoS::AtLeastOnce)
                .await
                .unwrap();
            next_event(&mut self.events, |e| match e {
                Event::Incoming(Packet::SubAck(ack)) => Some(ack.return_codes),
                _ => None,
            })
            .await
            .expect("SUBACK")
        }

        /// The next publish on `topic`: (payload, retain flag).
        pub async fn publish_on(&mut self, topic: &str) -> Option<(Bytes, bool)> {
            next_event(&mut self.events, |e| match e {
                Event::Incoming(Packet::Publish(p)) if p.topic == topic => {
                    Some((p.payload, p.retain))
                }
                _ => None,
            })
            .await
        }

        pub async fn nothing_on(&mut self, topic: &str) -> bool {
            quiet(
                &mut self.events,
                |e| matches!(e, Event::Incoming(Packet::Publish(p)) if p.topic == topic),
            )
            .await
        }
    }
}

mod v5 {
    use super::*;
    pub use rumqttc::v5::mqttbytes::QoS;
    pub use rumqttc::v5::mqttbytes::v5::{
        ConnectReturnCode, DisconnectReasonCode, Packet, PubAckReason, PublishProperties,
        SubscribeReasonCode,
    };
    pub use rumqttc::v5::{AsyncClient, ConnectionError, Event, MqttOptions};

    pub struct Client {
        pub client: AsyncClient,
        pub events: mpsc::UnboundedReceiver<Event>,
        task: JoinHandle<()>,
    }

    impl Drop for Client {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    pub async fn connect_with(opts: MqttOptions) -> Result<Client, ConnectionError> {
        let (client, mut eventloop) = AsyncClient::new(opts, 100);
        loop {
            match tokio::time::timeout(WAIT, eventloop.poll())
                .await
                .expect("CONNACK in time")?
            {
                Event::Incoming(Packet::ConnAck(_)) => break,
                _ => continue,
            }
        }
        let (tx, events) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            while let Ok(e) = eventloop.poll().await {
                if tx.send(e).is_err() {
                    break;
                }
            }
        });
        Ok(Client {
            client,
            events,
            task,
        })
    }

    pub fn options(port: u16, id: &str, user: &str, pass: &str) -> MqttOptions {
        let mut opts = MqttOptions::new(id, "127.0.0.1", port);
        opts.set_credentials(user, pass);
        opts
    }

    pub async fn connect(port: u16, id: &str, user: &str, pass: &str) -> Client {
        connect_with(options(port, id, user, pass))
            .await
            .expect("client connects")
    }

    impl Client {
        pub async fn subscribe(&mut self, filter: &str) -> Vec<SubscribeReasonCode> {
            self.client
                .subscribe(filter, QoS::AtLeastOnce)
                .await
                .unwrap();
            next_event(&mut self.events, |e| match e {
                Event::Incoming(Packet::SubAck(ack)) => Some(ack.return_codes),
                _ => None,
            })
            .await
            .expect("SUBACK")
        }

        /// The next publish on `topic`: (payload, retain flag, properties).
        pub async fn publish_on(
            &mut self,
            topic: &str,
        ) -> Option<(Bytes, bool, Option<PublishProperties>)> {
            next_event(&mut self.events, |e| match e {
                Event::Incoming(Packet::Publish(p)) if p.topic == topic => {
                    Some((p.payload, p.retain, p.properties))
                }
                _ => None,
            })
            .await
        }
    }
}

#[tokio::test]
async fn wrong_or_missing_credentials_get_the_right_connack() {
    let b = broker(|t| t).await;

    let refused = v4::connect_with(v4::options(b.port, "bad4", common::ADMIN_USER, "nope")).await;
    assert!(
        matches!(
            refused,
            Err(v4::ConnectionError::ConnectionRefused(
                v4::ConnectReturnCode::BadUserNamePassword
            ))
        ),
        "{:?}",
        refused.err()
    );
    // Device-style credentials of an unknown user, and none at all.
    let refused = v4::connect_with(v4::options(b.port, "bad4b", "GID_test", "x")).await;
    assert!(matches!(
        refused,
        Err(v4::ConnectionError::ConnectionRefused(
            v4::ConnectReturnCode::BadUserNamePassword
        ))
    ));
    let refused = v4::connect_with(v4::MqttOptions::new("anon4", "127.0.0.1", b.port)).await;
    assert!(
        matches!(
            refused,
            Err(v4::ConnectionError::ConnectionRefused(
                v4::ConnectReturnCode::NotAuthorized
            ))
        ),
        "{:?}",
        refused.err()
    );

    let refused = v5::connect_with(v5::options(b.port, "bad5", OBSERVER_USER, "nope")).await;
    assert!(
        matches!(
            refused,
            Err(v5::ConnectionError::ConnectionRefused(
                v5::ConnectReturnCode::BadUserNamePassword
            ))
        ),
        "{:?}",
        refused.err()
    );
    let refused = v5::connect_with(v5::MqttOptions::new("anon5", "127.0.0.1", b.port)).await;
    assert!(matches!(
        refused,
        Err(v5::ConnectionError::ConnectionRefused(
            v5::ConnectReturnCode::NotAuthorized
        ))
    ));
    assert_eq!(b.metrics.snapshot().broker_auth_refused, 5);

    // The right password works for both roles and both versions.
    let _a = v4::connect(b.port, "ok4", common::ADMIN_USER, common::ADMIN_PASS).await;
    let _o = v5::connect(b.port, "ok5", OBSERVER_USER, OBSERVER_PASS).await;
    assert!(common::eventually(WAIT, || b.metrics.snapshot().broker_clients_connected == 2).await);
}

#[tokio::test]
async fn retained_messages_reach_late_subscribers_on_v4_and_v5() {
    let b = broker(|t| t).await;
    let topic = topics::device_presence(&common::mac(1));
    let filter = "xiaozhi/devices/+/presence";

    // An early subscriber proves the router has the message before the late ones come.
    let mut early = v4::connect(b.port, "early", common::ADMIN_USER, common::ADMIN_PASS).await;
    assert_eq!(
        early.subscribe(filter).await,
        vec![v4::SubscribeReasonCode::Success(v4::QoS::AtLeastOnce)]
    );
    b.broker
        .bus
        .publish_retained(topic.clone(), Bytes::from_static(b"{\"state\":\"online\"}"));
    let (payload, retain) = early.publish_on(&topic).await.expect("live copy");
    assert_eq!(&payload[..], b"{\"state\":\"online\"}");
    assert!(!retain, "a live publish is not flagged retained");

    let mut late4 = v4::connect(b.port, "late4", OBSERVER_USER, OBSERVER_PASS).await;
    late4.subscribe(filter).await;
    let (payload, retain) = late4.publish_on(&topic).await.expect("retained on v4");
    assert_eq!(&payload[..], b"{\"state\":\"online\"}");
    assert!(retain);

    let mut late5 = v5::connect(b.port, "late5", OBSERVER_USER, OBSERVER_PASS).await;
    late5.subscribe("xiaozhi/devices/#").await;
    let (payload, retain, _) = late5.publish_on(&topic).await.expect("retained on v5");
    assert_eq!(&payload[..], b"{\"state\":\"online\"}");
    assert!(retain);

    // A newer retained message replaces it; an empty one clears it.
    b.broker.bus.publish_retained(
        topic.clone(),
        Bytes::from_static(b"{\"state\":\"offline\"}"),
    );
    early.publish_on(&topic).await.expect("live copy");
    let mut later = v4::connect(b.port, "later", common::ADMIN_USER, common::ADMIN_PASS).await;
    later.subscribe(filter).await;
    assert_eq!(
        &later.publish_on(&topic).await.unwrap().0[..],
        b"{\"state\":\"offline\"}"
    );
    b.broker.bus.publish_retained(topic.clone(), Bytes::new());
    early.publish_on(&topic).await.expect("live copy");
    let mut last = v4::connect(b.port, "last", common::ADMIN_USER, common::ADMIN_PASS).await;
    last.subscribe(filter).await;
    assert!(last.nothing_on(&topic).await, "cleared");
}

#[tokio::test]
async fn observer_cannot_send_admin_commands() {
    let gw = gateway().await;
    let port = gw.addrs.broker.unwrap().port();
    let topic = mac_topic(topics::ADMIN_COMMANDS_PREFIX, 60);

    let mut admin = v4::connect(port, "cmd-admin", common::ADMIN_USER, common::ADMIN_PASS).await;
    admin.subscribe(&topic).await;

    let mut observer = v4::connect(port, "cmd-obs", OBSERVER_USER, OBSERVER_PASS).await;
    // QoS 1: acknowledged all the same, so the client does not hang...
    observer
        .client
        .publish(&topic, v4::QoS::AtLeastOnce, false, "reboot")
        .await
        .unwrap();
    next_event(&mut observer.events, |e| {
        matches!(e, v4::Event::Incoming(v4::Packet::PubAck(_))).then_some(())
    })
    .await
    .expect("PUBACK for the refused publish");
    // ...QoS 2: PUBREC, and the PUBREL is completed without reaching the router...
    observer
        .client
        .publish(&topic, v4::QoS::ExactlyOnce, false, "reboot")
        .await
        .unwrap();
    next_event(&mut observer.events, |e| {
        matches!(e, v4::Event::Incoming(v4::Packet::PubComp(_))).then_some(())
    })
    .await
    .expect("PUBCOMP for the refused publish");
    // ...QoS 0: dropped.
    observer
        .client
        .publish(&topic, v4::QoS::AtMostOnce, false, "reboot")
        .await
        .unwrap();
    assert!(
        admin.nothing_on(&topic).await,
        "the observer's command got through"
    );
    assert_eq!(gw.metrics.snapshot().broker_publish_refused, 3);

    // The connection is still good: an allowed subscription works.
    assert_eq!(
        observer.subscribe("xiaozhi/devices/#").await,
        vec![v4::SubscribeReasonCode::Success(v4::QoS::AtLeastOnce)]
    );

    // An MQTT 5 observer is told why.
    let mut observer5 = v5::connect(port, "cmd-obs5", OBSERVER_USER, OBSERVER_PASS).await;
    observer5
        .client
        .publish(&topic, v5::QoS::AtLeastOnce, false, "reboot")
        .await
        .unwrap();
    let reason = next_event(&mut observer5.events, |e| match e {
        v5::Event::Incoming(v5::Packet::PubAck(ack)) => Some(ack.reason),
        _ => None,
    })
    .await
    .expect("PUBACK");
    assert_eq!(reason, v5::PubAckReason::NotAuthorized);
    assert!(admin.nothing_on(&topic).await);

    // An admin may.
    admin
        .client
        .publish(&topic, v4::QoS::AtLeastOnce, false, "from admin")
        .await
        .unwrap();
    assert_eq!(
        &admin.publish_on(&topic).await.unwrap().0[..],
        b"from admin"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn observer_reads_device_events_only() {
    let gw = gateway().await;
    let port = gw.addrs.broker.unwrap().port();
    let mut observer = v4::connect(port, "obs-sub", OBSERVER_USER, OBSERVER_PASS).await;
    for filter in [
        "#",
        "xiaozhi/#",
        "xiaozhi/+/x",
        "devices/p2p/+",
        "xiaozhi/admin/commands/+",
    ] {
        assert_eq!(
            observer.subscribe(filter).await,
            vec![v4::SubscribeReasonCode::Failure],
            "{filter}"
        );
    }
    assert_eq!(gw.metrics.snapshot().broker_subscribe_refused, 5);

    let mut observer5 = v5::connect(port, "obs-sub5", OBSERVER_USER, OBSERVER_PASS).await;
    assert_eq!(
        observer5.subscribe("#").await,
        vec![v5::SubscribeReasonCode::NotAuthorized]
    );

    assert_eq!(
        observer.subscribe("xiaozhi/devices/#").await,
        vec![v4::SubscribeReasonCode::Success(v4::QoS::AtLeastOnce)]
    );
    let dev = common::device(&gw, 61).await;
    let presence = topics::device_presence(&dev.credentials.mac);
    let (payload, _) = observer.publish_on(&presence).await.expect("presence");
    let presence: serde_json::Value = serde_json::from_slice(&payload).unwrap();
    assert!(presence["state"].is_string(), "{presence}");
    gw.shutdown().await;
}

#[tokio::test]
async fn admin_v5_publish_reaches_a_device() {
    let gw = gateway().await;
    let mut dev = common::device(&gw, 62).await;
    let admin = v5::connect(
        gw.addrs.broker.unwrap().port(),
        "p2p5",
        common::ADMIN_USER,
        common::ADMIN_PASS,
    )
    .await;
    let topic = topics::p2p(&dev.credentials.mac);
    admin
        .client
        .publish(&topic, v5::QoS::AtLeastOnce, false, "{\"type\":\"system\"}")
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (t, payload) = dev
            .recv(deadline - tokio::time::Instant::now())
            .await
            .expect("the device gets the admin's publish");
        if &payload[..] == b"{\"type\":\"system\"}" {
            assert_eq!(t, topic);
            break;
        }
    }
    // A non-canonical spelling of the MAC is refused.
    let upper = format!(
        "{}{}",
        topics::P2P_PREFIX,
        dev.credentials.mac.to_string().to_uppercase()
    );
    admin
        .client
        .publish(&upper, v5::QoS::AtMostOnce, false, "x")
        .await
        .unwrap();
    assert!(common::eventually(WAIT, || gw.metrics.snapshot().broker_publish_refused == 1).await);
    gw.shutdown().await;
}

#[tokio::test]
async fn v5_commands_carry_response_topic_and_correlation_data() {
    let mut b = broker(|t| t).await;
    let mut commands = b.commands.take().expect("commands");

    let admin = v5::connect(b.port, "cmd5", common::ADMIN_USER, common::ADMIN_PASS).await;
    let topic = mac_topic(topics::ADMIN_COMMANDS_PREFIX, 63);
    let props = v5::PublishProperties {
        response_topic: Some("xiaozhi/admin/replies/r-42".into()),
        correlation_data: Some(Bytes::from_static(b"corr-42")),
        ..Default::default()
    };
    admin
        .client
        .publish_with_properties(
            &topic,
            v5::QoS::AtLeastOnce,
            false,
            "{\"cmd\":\"x\"}",
            props,
        )
        .await
        .unwrap();
    let cmd = tokio::time::timeout(WAIT, commands.recv())
        .await
        .expect("command in time")
        .expect("command");
    assert_eq!(cmd.topic, topic);
    assert_eq!(&cmd.payload[..], b"{\"cmd\":\"x\"}");
    assert_eq!(
        cmd.response_topic.as_deref(),
        Some("xiaozhi/admin/replies/r-42")
    );
    assert_eq!(cmd.correlation_data.as_deref(), Some(&b"corr-42"[..]));

    // The gateway-wide topic, from 3.1.1: no properties.
    let admin4 = v4::connect(b.port, "cmd4", common::ADMIN_USER, common::ADMIN_PASS).await;
    admin4
        .client
        .publish(topics::ADMIN_COMMANDS, v4::QoS::AtMostOnce, false, "{}")
        .await
        .unwrap();
    let cmd = tokio::time::timeout(WAIT, commands.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(cmd.topic, topics::ADMIN_COMMANDS);
    assert_eq!((cmd.response_topic, cmd.correlation_data), (None, None));

    // The reply: v5 subscribers get the correlation data, v4 ones the payload.
    let mut sub5 = v5::connect(b.port, "reply5", common::ADMIN_USER, common::ADMIN_PASS).await;
    sub5.subscribe("xiaozhi/admin/replies/+").await;
    let mut sub4 = v4::connect(b.port, "reply4", common::ADMIN_USER, common::ADMIN_PASS).await;
    sub4.subscribe("xiaozhi/admin/replies/+").await;
    let reply_topic = topics::admin_reply("r-42").unwrap();
    b.broker.bus.publish_reply(
        reply_topic.clone(),
        Bytes::from_static(b"{\"ok\":true}"),
        Some(Bytes::from_static(b"corr-42")),
    );
    let (payload, _, props) = sub5.publish_on(&reply_topic).await.expect("v5 reply");
    assert_eq!(&payload[..], b"{\"ok\":true}");
    assert_eq!(
        props.and_then(|p| p.correlation_data).as_deref(),
        Some(&b"corr-42"[..])
    );
    let (payload, _) = sub4.publish_on(&reply_topic).await.expect("v4 reply");
    assert_eq!(&payload[..], b"{\"ok\":true}");

    // Admins cannot forge replies.
    admin
        .client
        .publish(&reply_topic, v5::QoS::AtMostOnce, false, "forged")
        .await
        .unwrap();
    assert!(sub4.nothing_on(&reply_topic).await);
    assert_eq!(b.metrics.snapshot().admin_commands_dropped, 0);
}

#[tokio::test]
async fn a_full_command_queue_drops_and_counts() {
    let b = broker(|t| t).await; // commands never taken
    let admin = v4::connect(b.port, "flood", common::ADMIN_USER, common::ADMIN_PASS).await;
    for _ in 0..1100 {
        admin
            .client
            .publish(topics::ADMIN_COMMANDS, v4::QoS::AtMostOnce, false, "{}")
            .await
            .unwrap();
    }
    assert!(
        common::eventually(WAIT, || b.metrics.snapshot().admin_commands_dropped >= 76).await,
        "{:?}",
        b.metrics.snapshot().admin_commands_dropped
    );
}

/// CONNECT for MQTT 3.1.1 with username and password.
fn raw_connect(client_id: &str, user: &str, pass: &str, keep_alive: u16) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0xC2];
    body.extend_from_slice(&keep_alive.to_be_bytes());
    for s in [client_id, user, pass] {
        body.extend_from_slice(&(s.len() as u16).to_be_bytes());
        body.extend_from_slice(s.as_bytes());
    }
    let mut packet = vec![0x10, body.len() as u8];
    packet.extend_from_slice(&body);
    packet
}

/// Reads until the server closes; returns what it sent, or `None` if it stayed open.
async fn read_until_closed(stream: &mut TcpStream, within: Duration) -> Option<Vec<u8>> {
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Some(got),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => return None,
        }
    }
}

#[tokio::test]
async fn a_silent_socket_delays_nobody_and_is_closed() {
    let b = broker(|t| {
        t.replace(
            "connection_timeout_ms = 5000",
            "connection_timeout_ms = 600",
        )
    })
    .await;
    let addr = b.broker.listen_addr;
    let mut silent = TcpStream::connect(addr).await.unwrap();
    let mut half = TcpStream::connect(addr).await.unwrap();
    half.write_all(&raw_connect("half", "a", "b", 60)[..6])
        .await
        .unwrap();

    let started = std::time::Instant::now();
    let _ok = v4::connect(b.port, "prompt", common::ADMIN_USER, common::ADMIN_PASS).await;
    assert!(
        started.elapsed() < Duration::from_millis(300),
        "CONNECT took {:?}",
        started.elapsed()
    );

    for s in [&mut silent, &mut half] {
        let sent = read_until_closed(s, Duration::from_secs(3))
            .await
            .expect("closed after connection_timeout_ms");
        assert!(
            sent.is_empty(),
            "no CONNACK for a socket that never connected"
        );
    }
    assert_eq!(b.metrics.snapshot().broker_connections_timed_out, 2);
}

#[tokio::test]
async fn keep_alive_and_protocol_versions() {
    let b = broker(|t| t).await;
    let addr = b.broker.listen_addr;

    // Keep-alive 1 s, then silence: closed after 1.5 s.
    let mut quiet = TcpStream::connect(addr).await.unwrap();
    quiet
        .write_all(&raw_connect(
            "ka",
            common::ADMIN_USER,
            common::ADMIN_PASS,
            1,
        ))
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let sent = read_until_closed(&mut quiet, Duration::from_secs(4))
        .await
        .expect("closed for keep-alive");
    assert_eq!(&sent[..4], &[0x20, 2, 0, 0], "CONNACK accepted first");
    assert!(
        started.elapsed() >= Duration::from_millis(1400),
        "{:?}",
        started.elapsed()
    );

    // MQTT 3.1 ("MQIsdp", level 3): CONNACK 1, unacceptable protocol version.
    let mut old = TcpStream::connect(addr).await.unwrap();
    let mut body = vec![0, 6];
    body.extend_from_slice(b"MQIsdp");
    body.extend_from_slice(&[3, 0x02, 0, 60, 0, 2, b'i', b'd']);
    let mut packet = vec![0x10, body.len() as u8];
    packet.extend_from_slice(&body);
    old.write_all(&packet).await.unwrap();
    let sent = read_until_closed(&mut old, WAIT).await.expect("closed");
    assert_eq!(sent, vec![0x20, 2, 0, 1]);

    // Not MQTT at all: closed without an answer.
    let mut http = TcpStream::connect(addr).await.unwrap();
    http.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    assert_eq!(read_until_closed(&mut http, WAIT).await, Some(vec![]));

    // Garbage after a good CONNECT (a CONNACK, which only servers send): closed.
    let mut bad = TcpStream::connect(addr).await.unwrap();
    let mut bytes = raw_connect("bad", common::ADMIN_USER, common::ADMIN_PASS, 60);
    bytes.extend_from_slice(&[0x20, 2, 0, 0]);
    bad.write_all(&bytes).await.unwrap();
    let sent = read_until_closed(&mut bad, WAIT).await.expect("closed");
    assert_eq!(&sent[..4], &[0x20, 2, 0, 0]);
    assert!(b.metrics.snapshot().broker_protocol_errors >= 3);
}

#[tokio::test]
async fn reconnecting_with_the_same_client_id_works() {
    // Three router connections in all: the gateway's link and two clients. Leaked
    // connections would soon fill it.
    let b = broker(|t| t.replace("max_connections = 1024", "max_connections = 3")).await;
    let topic = "integration/ping";

    let mut watcher = v4::connect(b.port, "watcher", common::ADMIN_USER, common::ADMIN_PASS).await;
    watcher.subscribe(topic).await;

    for round in 0..6 {
        // Clean DISCONNECT on even rounds, a dropped socket on odd ones.
        let c = v4::connect(b.port, "same-id", common::ADMIN_USER, common::ADMIN_PASS).await;
        c.client
            .publish(topic, v4::QoS::AtLeastOnce, false, format!("round {round}"))
            .await
            .unwrap();
        assert_eq!(
            watcher.publish_on(topic).await.expect("publish").0,
            format!("round {round}")
        );
        if round % 2 == 0 {
            c.client.disconnect().await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        drop(c);
    }
    // Fresh ids too: the router frees each connection. (The previous client's socket
    // close may still be on its way to the router: retry a refusal for a while. A leak
    // would refuse for ever.)
    for round in 0..4 {
        let id = format!("fresh-{round}");
        let deadline = tokio::time::Instant::now() + WAIT;
        let mut c = loop {
            match v5::connect_with(v5::options(b.port, &id, OBSERVER_USER, OBSERVER_PASS)).await {
                Ok(c) => break c,
                Err(v5::ConnectionError::ConnectionRefused(
                    v5::ConnectReturnCode::ServerUnavailable,
                )) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                Err(e) => panic!("round {round}: {e:?}"),
            }
        };
        c.subscribe("xiaozhi/events/#").await;
    }

    // Taking over a live session: the new connection works, the old one is closed.
    let mut first = v4::connect(b.port, "taken", common::ADMIN_USER, common::ADMIN_PASS).await;
    let second = v4::connect(b.port, "taken", common::ADMIN_USER, common::ADMIN_PASS).await;
    assert!(
        closed(&mut first.events).await,
        "the first connection is closed"
    );
    second
        .client
        .publish(topic, v4::QoS::AtLeastOnce, false, "second")
        .await
        .unwrap();
    assert_eq!(&watcher.publish_on(topic).await.unwrap().0[..], b"second");
}

#[tokio::test]
async fn wills_are_published_on_abrupt_close_only_and_checked() {
    let b = broker(|t| t).await;
    let topic = "integration/will";
    let mut watcher =
        v4::connect(b.port, "will-watch", common::ADMIN_USER, common::ADMIN_PASS).await;
    watcher.subscribe(topic).await;

    let with_will = |id: &str, will_topic: &str| {
        let mut o = v4::options(b.port, id, common::ADMIN_USER, common::ADMIN_PASS);
        o.set_last_will(v4::LastWill::new(
            will_topic,
            "gone",
            v4::QoS::AtMostOnce,
            false,
        ));
        o
    };
    // Dropped socket: the will goes out.
    let c = v4::connect_with(with_will("will-1", topic)).await.unwrap();
    drop(c);
    assert_eq!(
        &watcher.publish_on(topic).await.expect("will").0[..],
        b"gone"
    );

    // Clean DISCONNECT: no will.
    let c = v4::connect_with(with_will("will-2", topic)).await.unwrap();
    c.client.disconnect().await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    drop(c);
    assert!(watcher.nothing_on(topic).await);

    // A will on a topic the user may not publish to: refused at CONNECT.
    let refused = v4::connect_with(with_will("will-3", "xiaozhi/devices/x/presence")).await;
    assert!(matches!(
        refused,
        Err(v4::ConnectionError::ConnectionRefused(
            v4::ConnectReturnCode::NotAuthorized
        ))
    ));
}

#[tokio::test]
async fn unsubscribe_is_acknowledged_even_for_unknown_filters() {
    let b = broker(|t| t).await;
    let mut c = v4::connect(b.port, "unsub", common::ADMIN_USER, common::ADMIN_PASS).await;
    c.subscribe("integration/a").await;
    for filter in ["integration/a", "never/subscribed"] {
        c.client.unsubscribe(filter).await.unwrap();
        next_event(&mut c.events, |e| {
            matches!(e, v4::Event::Incoming(v4::Packet::UnsubAck(_))).then_some(())
        })
        .await
        .expect("UNSUBACK");
    }
    c.client
        .publish("integration/a", v4::QoS::AtLeastOnce, false, "x")
        .await
        .unwrap();
    assert!(c.nothing_on("integration/a").await, "unsubscribed");
}

#[tokio::test]
async fn a_busy_port_names_the_setting() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let config = BrokerConfig {
        listen: taken.local_addr().unwrap(),
        users: users(),
        ..BrokerConfig::default()
    };
    let metrics = Arc::new(Metrics::default());
    let registry = Arc::new(DeviceRegistry::new(16, metrics.clone()));
    let (inbound, _commands) = Inbound::new(registry, None, metrics.clone());
    let err = EmbeddedBroker::start(&config, inbound, metrics, &Lifecycle::new())
        .await
        .err()
        .expect("the port is taken");
    let msg = err.to_string();
    assert!(
        msg.contains("broker.listen") && msg.contains("XZ_BROKER__LISTEN"),
        "{msg}"
    );
}

#[tokio::test]
async fn shutdown_stops_accepting_then_closes_clients_and_tells_v5_ones_why() {
    let b = broker(|t| t).await;
    let mut c = v4::connect(b.port, "stopped", common::ADMIN_USER, common::ADMIN_PASS).await;
    // The v5 client's own event loop, to see the error it ends with.
    let (_c5, mut loop5) = v5::AsyncClient::new(
        v5::options(b.port, "stopped5", OBSERVER_USER, OBSERVER_PASS),
        10,
    );
    loop {
        let event = tokio::time::timeout(WAIT, loop5.poll()).await;
        if let v5::Event::Incoming(v5::Packet::ConnAck(_)) = event.expect("in time").unwrap() {
            break;
        }
    }
    let grace = Duration::from_secs(5);
    let started = tokio::time::Instant::now();
    // Step 1: no new clients; the connected ones stay (their conversations' goodbyes
    // and events are still on their way).
    b.life.begin_shutdown(started + grace);
    b.broker.stop();
    let mut refused = false;
    for _ in 0..50 {
        if TcpStream::connect(b.broker.listen_addr).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(refused, "no longer listening");
    assert!(quiet(&mut c.events, |_| false).await && !c.events.is_closed());
    // Step 2: every client closes; an MQTT 5 client hears the reason.
    b.life.close_connections();
    assert!(
        b.life.wait().await,
        "the listener and its clients end in time"
    );
    assert!(started.elapsed() < grace);
    let ended = loop {
        match tokio::time::timeout(WAIT, loop5.poll())
            .await
            .expect("in time")
        {
            Ok(_) => continue,
            Err(e) => break e,
        }
    };
    assert!(
        matches!(
            ended,
            v5::ConnectionError::MqttState(rumqttc::v5::StateError::ServerDisconnect {
                reason_code: v5::DisconnectReasonCode::ServerShuttingDown,
                ..
            })
        ),
        "{ended:?}"
    );
    assert!(closed(&mut c.events).await, "v4 client closed");
}
