//! Bad input from devices: it is dropped and counted, and never takes down the
//! connection that sent it (when framing survives) or the process.

use crate::common;

use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use xiaozhi_tools::simulator::device::SimDevice;

#[tokio::test]
async fn malformed_json_and_non_utf8_keep_the_connection() {
    let gw = common::start().await;
    let mut dev = common::device(&gw, 60).await;
    dev.publish_raw(b"{not json".to_vec()).await.unwrap();
    dev.publish_raw(vec![0xff, 0xfe, 0x00, 0x80]).await.unwrap();
    dev.publish_raw(b"[1,2,3]".to_vec()).await.unwrap();
    dev.publish_raw(
        br#"{"type":"hello","version":3,"transport":"udp","audio_params":{"frame_duration":"x"}}"#
            .to_vec(),
    )
    .await
    .unwrap();
    assert!(
        common::eventually(Duration::from_secs(2), || gw
            .metrics
            .snapshot()
            .control_malformed
            == 4)
        .await,
        "{:?}",
        gw.metrics.snapshot()
    );
    // The bad hello got an alert the device can show.
    let alert = dev
        .recv_type("alert", Duration::from_secs(2))
        .await
        .unwrap();
    assert!(
        alert["message"].as_str().unwrap().contains("audio_params"),
        "{alert}"
    );
    // The same connection still holds a conversation.
    let (hello, _audio) = common::conversation(&mut dev).await;
    assert!(!hello.session_id.is_empty());
    assert!(!dev.is_closed());
    gw.shutdown().await;
}

#[tokio::test]
async fn unsupported_hello_gets_an_alert_not_silence() {
    let gw = common::start().await;
    let mut dev = common::device(&gw, 61).await;
    dev.publish_json(&json!({"type": "hello", "version": 1, "transport": "websocket"}))
        .await
        .unwrap();
    let alert = dev
        .recv_type("alert", Duration::from_secs(2))
        .await
        .unwrap();
    assert!(
        alert["message"].as_str().unwrap().contains("version"),
        "{alert}"
    );
    assert_eq!(gw.metrics.snapshot().hellos_refused, 1);
    gw.shutdown().await;
}

#[tokio::test]
async fn half_open_connection_is_dropped_after_one_and_a_half_keep_alives() {
    let gw = common::start().await;
    let stream = TcpStream::connect(gw.addrs.mqtt).await.unwrap();
    // Keep-alive 1 s, then silence (as a device that lost power would be).
    let mut dev = SimDevice::connect_over(Box::new(stream), common::creds(62), 1)
        .await
        .unwrap();
    let t0 = tokio::time::Instant::now();
    assert!(
        dev.closed(Duration::from_secs(5)).await,
        "server never dropped the silent connection"
    );
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_millis(1400) && waited < Duration::from_millis(2500),
        "{waited:?}"
    );
    assert!(
        common::eventually(Duration::from_secs(1), || gw
            .metrics
            .snapshot()
            .devices_connected
            == 0)
        .await
    );
    assert_eq!(gw.metrics.snapshot().connections_timed_out, 1);
    gw.shutdown().await;
}

#[tokio::test]
async fn pings_keep_a_connection_alive() {
    let gw = common::start().await;
    let stream = TcpStream::connect(gw.addrs.mqtt).await.unwrap();
    let mut dev = SimDevice::connect_over(Box::new(stream), common::creds(63), 1)
        .await
        .unwrap();
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        dev.ping().await.unwrap();
    }
    assert!(!dev.is_closed());
    assert_eq!(gw.metrics.snapshot().devices_connected, 1);
    gw.shutdown().await;
}

#[tokio::test]
async fn silent_tcp_client_is_dropped_at_the_connect_timeout() {
    let mut config = common::test_config();
    config.mqtt.connect_timeout_secs = 1;
    let gw = common::start_with(config).await;
    let mut silent = TcpStream::connect(gw.addrs.mqtt).await.unwrap();
    // Others are served meanwhile.
    let dev = common::device(&gw, 64).await;
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(3), silent.read(&mut buf))
        .await
        .expect("closed in time")
        .unwrap();
    assert_eq!(n, 0, "closed without a CONNACK");
    dev.disconnect().await;
    gw.shutdown().await;
}

#[tokio::test]
async fn garbage_bytes_and_oversized_packets_end_only_that_connection() {
    let mut config = common::test_config();
    config.mqtt.max_packet_bytes = 1024;
    let gw = common::start_with(config).await;
    let mut dev = common::device(&gw, 65).await;

    let mut garbage = TcpStream::connect(gw.addrs.mqtt).await.unwrap();
    garbage.write_all(&[0xff; 64]).await.unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(2), garbage.read(&mut buf))
            .await
            .unwrap()
            .unwrap_or(0),
        0
    );

    // An authenticated device that sends a packet over the cap is disconnected.
    let mut big = common::device(&gw, 66).await;
    big.publish_raw(vec![b'x'; 4096]).await.unwrap();
    assert!(big.closed(Duration::from_secs(2)).await);

    // The process and the other device are fine.
    let (hello, _a) = common::conversation(&mut dev).await;
    assert!(!hello.session_id.is_empty());
    assert!(gw.metrics.snapshot().connections_protocol_errors >= 2);
    gw.shutdown().await;
}

#[tokio::test]
async fn a_new_connection_replaces_the_old_one() {
    let gw = common::start().await;
    let mut old = common::device(&gw, 67).await;
    let mut new = common::device(&gw, 67).await;
    assert!(
        old.closed(Duration::from_secs(2)).await,
        "old connection closed"
    );
    assert_eq!(gw.metrics.snapshot().connections_replaced, 1);
    // The device is still connected (through the new connection) and reachable.
    assert!(
        common::eventually(Duration::from_secs(1), || gw
            .metrics
            .snapshot()
            .devices_connected
            == 1)
        .await
    );
    let (hello, _a) = common::conversation(&mut new).await;
    assert!(!hello.session_id.is_empty());
    gw.shutdown().await;
}
