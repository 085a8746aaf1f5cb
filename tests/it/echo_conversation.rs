//! Conversations with the echo pipeline over real MQTT and UDP sockets.

use crate::common;

use std::time::Duration;

use serde_json::json;
use xiaozhi_tools::simulator::audio::{frame_index, synthetic_frame};

/// A device holds a 10-second realtime conversation and gets every frame back,
/// decrypted, in order, with no loss, framed as the firmware requires.
#[tokio::test]
async fn ten_second_conversation_echoes_every_frame_in_order() {
    let gw = common::start().await;
    let mut dev = common::device(&gw, 10).await;
    let (hello, mut audio) = common::conversation(&mut dev).await;
    assert_eq!(hello.frame_duration, 60);
    assert_eq!(hello.udp, gw.addrs.udp);
    dev.publish_json(&common::listen_start(&hello.session_id, "realtime"))
        .await
        .unwrap();

    let frames = 10_000 / 60; // 166 frames = 10 s of 60 ms audio
    let sender = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(60));
        let mut datagrams = Vec::new();
        for i in 0..frames {
            tick.tick().await;
            datagrams.push(i);
        }
        datagrams
    });
    // Send on this task (the socket is owned here) at the frame pace, receiving between.
    let mut received = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(60));
    let mut sent = 0u32;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while received.len() < frames as usize && tokio::time::Instant::now() < deadline {
        tokio::select! {
            _ = tick.tick(), if sent < frames => {
                audio.send(sent * 60, &synthetic_frame(sent, 80)).await.unwrap();
                sent += 1;
            }
            got = audio.recv(Duration::from_secs(2)) => {
                if let Some(frame) = got.unwrap() {
                    assert_eq!(frame.opus, synthetic_frame(frame_index(&frame.opus).unwrap(), 80), "decrypted payload intact");
                    received.push(frame);
                }
            }
        }
    }
    sender.abort();
    let indexes: Vec<u32> = received
        .iter()
        .map(|f| frame_index(&f.opus).unwrap())
        .collect();
    assert_eq!(
        indexes,
        (0..frames).collect::<Vec<_>>(),
        "every frame back, in order, none lost"
    );
    let sequences: Vec<u32> = received.iter().map(|f| f.sequence).collect();
    assert_eq!(
        sequences,
        (1..=frames).collect::<Vec<_>>(),
        "downlink sequence from 1, +1 per datagram"
    );
    assert_eq!(audio.rejected, 0, "nothing the firmware would drop");

    // The device UI was driven: tts start came before the audio.
    let tts = dev.recv_type("tts", Duration::from_secs(2)).await.unwrap();
    assert_eq!(tts["state"], "start");
    assert_eq!(tts["session_id"], hello.session_id.as_str());
    // After the device falls silent the turn ends.
    let tts = dev.recv_type("tts", Duration::from_secs(3)).await.unwrap();
    assert_eq!(tts["state"], "stop");

    let m = gw.metrics.snapshot();
    assert_eq!(m.udp_rx_datagrams, u64::from(frames));
    assert_eq!(m.udp_tx_datagrams, u64::from(frames));
    // Once playback had caught up, the socket task played frames back itself.
    assert!(
        m.echo_frames_reflected > u64::from(frames) / 2,
        "reflected {} of {frames}",
        m.echo_frames_reflected
    );
    assert_eq!(
        m.udp_uplink_gaps + m.udp_drop_replay + m.udp_drop_hijack + m.udp_drop_queue_full,
        0
    );

    // Device goodbye ends the conversation without an answer.
    dev.publish_json(&json!({"session_id": hello.session_id, "type": "goodbye"}))
        .await
        .unwrap();
    assert!(
        common::eventually(Duration::from_secs(2), || gw
            .metrics
            .snapshot()
            .sessions_live
            == 0)
        .await
    );
    assert!(
        dev.recv_type("goodbye", Duration::from_millis(300))
            .await
            .is_err(),
        "no goodbye back for a device goodbye"
    );
    gw.shutdown().await;
}

/// Manual (push-to-talk) listening: the turn is collected until `listen stop`, then
/// played back between `tts start` and `tts stop`, paced at the frame duration.
#[tokio::test]
async fn manual_turn_is_played_back_after_listen_stop() {
    let gw = common::start().await;
    let mut dev = common::device(&gw, 11).await;
    let (hello, mut audio) = common::conversation(&mut dev).await;
    dev.publish_json(&common::listen_start(&hello.session_id, "manual"))
        .await
        .unwrap();
    for i in 0..10u32 {
        audio.send(i * 60, &synthetic_frame(i, 40)).await.unwrap();
    }
    // Nothing comes back while the user is still talking.
    assert!(
        audio
            .recv(Duration::from_millis(300))
            .await
            .unwrap()
            .is_none()
    );
    dev.publish_json(&json!({"session_id": hello.session_id, "type": "listen", "state": "stop"}))
        .await
        .unwrap();
    let start = dev.recv_type("tts", Duration::from_secs(2)).await.unwrap();
    assert_eq!(start["state"], "start");
    let t0 = tokio::time::Instant::now();
    let mut got = Vec::new();
    while got.len() < 10 {
        let frame = audio
            .recv(Duration::from_secs(2))
            .await
            .unwrap()
            .expect("echoed frame");
        got.push(frame_index(&frame.opus).unwrap());
    }
    let elapsed = t0.elapsed();
    assert_eq!(got, (0..10).collect::<Vec<_>>());
    // Paced, not burst: 10 frames of 60 ms take at least ~8 frame periods.
    assert!(
        elapsed >= Duration::from_millis(8 * 60 - 20),
        "playback too fast: {elapsed:?}"
    );
    let stop = dev.recv_type("tts", Duration::from_secs(2)).await.unwrap();
    assert_eq!(stop["state"], "stop");
    gw.shutdown().await;
}

/// Two devices talking at once never receive each other's audio or JSON.
#[tokio::test]
async fn two_devices_never_cross() {
    let gw = common::start().await;
    let mut a = common::device(&gw, 20).await;
    let mut b = common::device(&gw, 21).await;
    let (ha, mut aa) = common::conversation(&mut a).await;
    let (hb, mut ab) = common::conversation(&mut b).await;
    assert_ne!(ha.connection_id(), hb.connection_id());
    assert_ne!(ha.key, hb.key);
    a.publish_json(&common::listen_start(&ha.session_id, "realtime"))
        .await
        .unwrap();
    b.publish_json(&common::listen_start(&hb.session_id, "realtime"))
        .await
        .unwrap();
    // Device A sends even indexes, B odd ones, interleaved.
    for i in 0..20u32 {
        aa.send(i * 60, &synthetic_frame(2 * i, 50)).await.unwrap();
        ab.send(i * 60, &synthetic_frame(2 * i + 1, 50))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut got_a = Vec::new();
    while let Some(f) = aa.recv(Duration::from_millis(700)).await.unwrap() {
        got_a.push(frame_index(&f.opus).unwrap());
    }
    let mut got_b = Vec::new();
    while let Some(f) = ab.recv(Duration::from_millis(700)).await.unwrap() {
        got_b.push(frame_index(&f.opus).unwrap());
    }
    assert_eq!(got_a, (0..20).map(|i| 2 * i).collect::<Vec<_>>());
    assert_eq!(got_b, (0..20).map(|i| 2 * i + 1).collect::<Vec<_>>());
    assert_eq!(aa.rejected + ab.rejected, 0);
    // Every JSON message each device got carries its own session id.
    for (dev, session) in [(&mut a, &ha.session_id), (&mut b, &hb.session_id)] {
        while let Ok((topic, payload)) = dev.recv(Duration::from_millis(200)).await {
            let v: serde_json::Value = serde_json::from_slice(&payload).unwrap();
            assert_eq!(v["session_id"], session.as_str(), "{v}");
            assert!(topic.ends_with(&dev.credentials.mac.to_string()), "{topic}");
        }
    }
    gw.shutdown().await;
}

/// A second hello replaces the conversation: new session id, new key and connection id,
/// and the old channel stops routing.
#[tokio::test]
async fn repeated_hello_replaces_the_session_cleanly() {
    let gw = common::start().await;
    let mut dev = common::device(&gw, 30).await;
    let (first, mut first_audio) = common::conversation(&mut dev).await;
    first_audio.send(0, &synthetic_frame(0, 40)).await.unwrap();
    let (second, mut second_audio) = common::conversation(&mut dev).await;
    assert_ne!(first.session_id, second.session_id);
    assert_ne!(first.connection_id(), second.connection_id());
    assert!(
        common::eventually(Duration::from_secs(2), || gw
            .metrics
            .snapshot()
            .sessions_live
            == 1)
        .await
    );
    // The old channel is gone: its datagrams are unknown ids now.
    let before = gw.metrics.snapshot().udp_drop_unknown_id;
    first_audio.send(60, &synthetic_frame(1, 40)).await.unwrap();
    assert!(
        common::eventually(Duration::from_secs(2), || gw
            .metrics
            .snapshot()
            .udp_drop_unknown_id
            > before)
        .await
    );
    dev.publish_json(&common::listen_start(&second.session_id, "realtime"))
        .await
        .unwrap();
    second_audio.send(0, &synthetic_frame(7, 40)).await.unwrap();
    let f = second_audio
        .recv(Duration::from_secs(2))
        .await
        .unwrap()
        .expect("echo on the new channel");
    assert_eq!(frame_index(&f.opus), Some(7));
    gw.shutdown().await;
}

/// Firmware 2.4 (the default simulated device: its hello with `glyph_push` and
/// `text_font`, every server message checked as 2.4 checks it) and 1.x firmware (its
/// older hello) converse side by side. A server hello breaking a 2.4 rule, sent to the
/// device as any bus client could, is caught: the strict mode can fail.
#[tokio::test]
async fn firmware_2_4_and_1x_devices_both_converse() {
    use xiaozhi_tools::simulator::audio::{ServerHello, SimAudio};
    use xiaozhi_tools::simulator::device::{SimDevice, SimDeviceOptions};
    use xiaozhi_tools::simulator::firmware::Firmware;

    let gw = common::start().await;
    for (n, firmware) in [(61, Firmware::V2_4), (62, Firmware::V1)] {
        let options = SimDeviceOptions {
            firmware,
            ..SimDeviceOptions::default()
        };
        let mut dev = SimDevice::connect_with(gw.addrs.mqtt, common::creds(n), options)
            .await
            .unwrap();
        let hello = dev.hello();
        assert_eq!(hello.get("text_font").is_some(), firmware == Firmware::V2_4);
        dev.publish_json(&hello).await.unwrap();
        let reply = dev
            .recv_type("hello", Duration::from_secs(5))
            .await
            .unwrap();
        assert!(dev.violations().is_empty(), "{:?}", dev.violations());
        let reply = ServerHello::parse(&reply).unwrap();
        let mut audio = SimAudio::open(&reply, "127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        dev.publish_json(&common::listen_start(&reply.session_id, "realtime"))
            .await
            .unwrap();
        for i in 0..10 {
            audio.send(i * 60, &synthetic_frame(i, 50)).await.unwrap();
            let echo = audio
                .recv(Duration::from_secs(2))
                .await
                .unwrap()
                .expect("echoed");
            assert_eq!(frame_index(&echo.opus), Some(i), "{}", firmware.label());
        }
        assert_eq!(audio.rejected, 0);

        let broken = json!({
            "type": "hello", "transport": "udp", "session_id": "x",
            "udp": {"server": "127.0.0.1", "port": 0, "key": "00", "nonce": "01"},
        });
        gw.registry
            .send(&common::mac(n), broken.to_string().into())
            .unwrap();
        let caught =
            common::eventually(Duration::from_secs(3), || !dev.violations().is_empty()).await;
        assert_eq!(caught, firmware.is_strict(), "{}", firmware.label());
        if caught {
            assert!(
                dev.violations()[0].contains("udp.port"),
                "{:?}",
                dev.violations()
            );
        }
    }
    gw.shutdown().await;
}
