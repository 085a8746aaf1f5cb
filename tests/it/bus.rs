//! The bus: admin clients on the broker listener reach devices through
//! `devices/p2p/<mac_>` and see device traffic on identity-bearing topics.

use crate::common;

use std::time::Duration;

use rumqttc::mqttbytes::v4::SubscribeReasonCode;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use serde_json::json;

async fn admin(gw: &xiaozhi_gateway::server::Gateway, id: &str) -> (AsyncClient, EventLoop) {
    let mut opts = MqttOptions::new(id, "127.0.0.1", gw.addrs.broker.unwrap().port());
    opts.set_credentials(common::ADMIN_USER, common::ADMIN_PASS);
    let (client, mut eventloop) = AsyncClient::new(opts, 100);
    loop {
        match tokio::time::timeout(Duration::from_secs(5), eventloop.poll())
            .await
            .expect("admin connects")
            .expect("admin connection")
        {
            Event::Incoming(Packet::ConnAck(_)) => break,
            _ => continue,
        }
    }
    (client, eventloop)
}

/// Polls the admin's event loop until a publish on a topic matching `pred` arrives.
async fn next_publish(eventloop: &mut EventLoop, pred: impl Fn(&str) -> bool) -> (String, Vec<u8>) {
    next_publish_where(eventloop, |topic, _| pred(topic)).await
}

/// Like [`next_publish`], with the JSON payload in the predicate (the gateway's own MCP
/// traffic with each new device shares the topics).
async fn next_publish_where(
    eventloop: &mut EventLoop,
    pred: impl Fn(&str, &serde_json::Value) -> bool,
) -> (String, Vec<u8>) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let ev = tokio::time::timeout_at(deadline, eventloop.poll())
            .await
            .expect("publish in time")
            .expect("admin connection");
        if let Event::Incoming(Packet::Publish(p)) = ev
            && pred(
                &p.topic,
                &serde_json::from_slice(&p.payload).unwrap_or_default(),
            )
        {
            return (p.topic, p.payload.to_vec());
        }
    }
}

async fn wait_suback(eventloop: &mut EventLoop) {
    loop {
        if let Event::Incoming(Packet::SubAck(_)) =
            tokio::time::timeout(Duration::from_secs(5), eventloop.poll())
                .await
                .unwrap()
                .unwrap()
        {
            return;
        }
    }
}

#[tokio::test]
async fn admin_reaches_a_device_that_never_subscribed() {
    let gw = common::start().await;
    let mut dev = common::device(&gw, 50).await;
    let (client, mut eventloop) = admin(&gw, "admin-p2p").await;
    let topic = format!("devices/p2p/{}", dev.credentials.mac);
    let msg = json!({"type": "system", "command": "reboot"}).to_string();
    client
        .publish(&topic, QoS::AtLeastOnce, false, msg.clone())
        .await
        .unwrap();
    // Drive the admin's event loop while waiting for the device.
    let received = tokio::select! {
        r = dev.recv(Duration::from_secs(5)) => r.expect("device receives the admin's publish"),
        _ = async { loop { let _ = eventloop.poll().await; } } => unreachable!(),
    };
    assert_eq!(received.0, topic, "delivered on the firmware's own topic");
    assert_eq!(received.1, msg.as_bytes());
    gw.shutdown().await;
}

#[tokio::test]
async fn admin_sees_device_messages_and_presence_on_identity_topics() {
    let gw = common::start().await;
    let (client, mut eventloop) = admin(&gw, "admin-watch").await;
    client
        .subscribe("xiaozhi/devices/+/up", QoS::AtMostOnce)
        .await
        .unwrap();
    wait_suback(&mut eventloop).await;
    client
        .subscribe("xiaozhi/devices/+/presence", QoS::AtMostOnce)
        .await
        .unwrap();
    wait_suback(&mut eventloop).await;

    let mut dev = common::device(&gw, 51).await;
    let mac = dev.credentials.mac.to_string();
    let (topic, payload) = next_publish(&mut eventloop, |t| t.ends_with("/presence")).await;
    assert_eq!(topic, format!("xiaozhi/devices/{mac}/presence"));
    let presence: serde_json::Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(presence["state"], "online");

    let msg = json!({"type": "mcp", "session_id": "", "payload": {"jsonrpc": "2.0", "method": "notifications/state"}});
    dev.publish_json(&msg).await.unwrap();
    let (topic, payload) = next_publish_where(&mut eventloop, |t, v| {
        t.ends_with("/up") && v["payload"]["method"] == "notifications/state"
    })
    .await;
    assert_eq!(
        topic,
        format!("xiaozhi/devices/{mac}/up"),
        "the sender's identity is in the topic"
    );
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&payload).unwrap(),
        msg
    );

    dev.disconnect().await;
    let (_, payload) = next_publish(&mut eventloop, |t| t.ends_with("/presence")).await;
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&payload).unwrap()["state"],
        "offline"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn a_device_may_subscribe_only_to_its_own_topic() {
    let gw = common::start().await;
    let mut dev = common::device(&gw, 52).await;
    let own = format!("devices/p2p/{}", dev.credentials.mac);
    let other = format!("devices/p2p/{}", common::mac(53));
    assert_eq!(
        dev.subscribe(&own).await.unwrap(),
        vec![SubscribeReasonCode::Success(QoS::AtMostOnce)]
    );
    assert_eq!(
        dev.subscribe(&other).await.unwrap(),
        vec![SubscribeReasonCode::Failure]
    );
    assert_eq!(
        dev.subscribe("xiaozhi/devices/+/up").await.unwrap(),
        vec![SubscribeReasonCode::Failure]
    );

    // A refused subscription delivers nothing: the other device's message stays its own.
    let mut other_dev = common::device(&gw, 53).await;
    let (client, mut eventloop) = admin(&gw, "admin-sub").await;
    client
        .publish(&other, QoS::AtMostOnce, false, "for 53 only")
        .await
        .unwrap();
    tokio::select! {
        r = other_dev.recv(Duration::from_secs(5)) => assert_eq!(r.unwrap().1, "for 53 only"),
        _ = async { loop { let _ = eventloop.poll().await; } } => unreachable!(),
    }
    assert!(
        dev.recv(Duration::from_millis(300)).await.is_err(),
        "device 52 got device 53's message"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn bus_copy_of_the_server_hello_hides_the_audio_key() {
    let gw = common::start().await;
    let (client, mut eventloop) = admin(&gw, "admin-down").await;
    client
        .subscribe("xiaozhi/devices/+/down", QoS::AtMostOnce)
        .await
        .unwrap();
    wait_suback(&mut eventloop).await;

    let mut dev = common::device(&gw, 53).await;
    let mac = dev.credentials.mac.to_string();
    let (hello, _audio) = common::conversation(&mut dev).await;
    let (topic, payload) = next_publish_where(&mut eventloop, |t, v| {
        t.ends_with("/down") && v["type"] == "hello"
    })
    .await;
    assert_eq!(topic, format!("xiaozhi/devices/{mac}/down"));
    let mirrored: serde_json::Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(mirrored["type"], "hello");
    assert_eq!(mirrored["session_id"], hello.session_id.as_str());
    assert_eq!(
        mirrored["udp"]["key"], "<redacted>",
        "bus clients never see the audio key"
    );
    gw.shutdown().await;
}
