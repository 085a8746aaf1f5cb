//! The `xiaozhi` pipeline against a real WebSocket server that plays xiaozhi-server:
//! headers and token, hello translation, turns with JSON over MQTT and audio over UDP,
//! every failure mode ending in alert + goodbye, and device MCP through the cache.

use crate::common;

use std::time::Duration;

use serde_json::{Value, json};
use xiaozhi_gateway::config::Config;
use xiaozhi_gateway::server::Gateway;
use xiaozhi_tools::simulator::audio::{SimAudio, synthetic_frame};
use xiaozhi_tools::simulator::device::SimDevice;
use xiaozhi_tools::simulator::upstream::{
    Behavior, MockUpstream, MockUpstreamConfig, parse_reply_frame,
};

const SERVER_SECRET: &str = "server-secret";

fn config_for(urls: Vec<String>) -> Config {
    let mut c = common::test_config();
    c.pipeline.xiaozhi.urls = urls;
    c.pipeline.xiaozhi.auth_key = Some(SERVER_SECRET.into());
    c.pipeline.xiaozhi.connect_timeout_ms = 2_000;
    c
}

async fn mock(behavior: Behavior) -> MockUpstream {
    MockUpstream::start(MockUpstreamConfig {
        behavior,
        auth_key: Some(SERVER_SECRET.into()),
        ..MockUpstreamConfig::default()
    })
    .await
    .expect("mock upstream")
}

async fn gateway_with(upstream: &MockUpstream) -> Gateway {
    common::start_with(config_for(vec![upstream.url.clone()])).await
}

/// Sends `n` frames of one turn, starting at sequence-derived index `first`.
async fn talk(audio: &mut SimAudio, first: u32, n: u32) {
    for i in first..first + n {
        audio.send(i * 60, &synthetic_frame(i, 30)).await.unwrap();
    }
}

/// Waits for the device's alert then its goodbye; returns the alert's message.
async fn alert_then_goodbye(dev: &mut SimDevice) -> (String, Value) {
    let alert = dev
        .recv_type("alert", Duration::from_secs(5))
        .await
        .expect("the device is told why");
    let goodbye = dev
        .recv_type("goodbye", Duration::from_secs(5))
        .await
        .expect("and the conversation is closed");
    (
        alert["message"].as_str().unwrap_or_default().to_owned(),
        goodbye,
    )
}

#[tokio::test]
async fn a_device_holds_several_turns_through_xiaozhi_server() {
    let upstream = mock(Behavior::Normal).await;
    let gw = gateway_with(&upstream).await;
    let mut dev = common::device(&gw, 100).await;
    let (hello, mut audio) = common::conversation(&mut dev).await;

    // What the server saw: the Node gateway's path, headers, token and hello.
    let seen = upstream.observed();
    assert!(
        seen.rejected.is_empty(),
        "token accepted: {:?}",
        seen.rejected
    );
    assert!(
        seen.paths[0].ends_with("/xiaozhi/v1/?from=mqtt_gateway"),
        "{:?}",
        seen.paths
    );
    let headers = &seen.headers[0];
    let mac = dev.credentials.mac;
    assert_eq!(headers["device-id"], mac.colon());
    assert_eq!(headers["client-id"], mac.underscored());
    assert_eq!(headers["protocol-version"], "2");
    assert!(headers["authorization"].starts_with("Bearer "));
    assert_eq!(headers["x-forwarded-for"], "127.0.0.1");
    let up_hello = &seen.hellos[0];
    assert_eq!(up_hello["version"], 2);
    assert_eq!(up_hello["transport"], "websocket");
    assert_eq!(up_hello["audio_params"]["sample_rate"], 16000);
    assert_eq!(up_hello["features"]["mcp"], true);

    // The device's hello carries the server's session id and downlink audio params.
    assert_eq!(seen.session_ids, vec![hello.session_id.clone()]);
    assert_eq!(hello.downlink_sample_rate, 24000);

    dev.publish_json(&common::listen_start(&hello.session_id, "auto"))
        .await
        .unwrap();
    for turn in 1..=3u32 {
        talk(&mut audio, (turn - 1) * 5, 5).await;
        let stt = dev.recv_type("stt", Duration::from_secs(5)).await.unwrap();
        assert_eq!(stt["text"], format!("turn {turn}"));
        let start = dev.recv_type("tts", Duration::from_secs(5)).await.unwrap();
        assert_eq!(start["state"], "start");
        let llm = dev.recv_type("llm", Duration::from_secs(5)).await.unwrap();
        assert_eq!(llm["emotion"], "happy");
        let sentence = dev.recv_type("tts", Duration::from_secs(5)).await.unwrap();
        assert_eq!(sentence["state"], "sentence_start");
        let mut frames = Vec::new();
        while frames.len() < 5 {
            let frame = audio
                .recv(Duration::from_secs(5))
                .await
                .unwrap()
                .expect("reply audio over UDP");
            frames.push(parse_reply_frame(&frame.opus).expect("intact reply frame"));
        }
        assert_eq!(
            frames,
            (0..5).map(|i| (turn, i)).collect::<Vec<_>>(),
            "in order"
        );
        let stop = dev.recv_type("tts", Duration::from_secs(5)).await.unwrap();
        assert_eq!(stop["state"], "stop");
    }
    // Uplink timestamps are a media clock from the first frame.
    let seen = upstream.observed();
    assert_eq!(seen.uplink_frames, 15);
    assert_eq!(&seen.uplink_timestamps[..3], &[0, 60, 120]);
    // Device JSON reached the server verbatim.
    assert!(
        seen.texts
            .iter()
            .any(|t| t["type"] == "listen" && t["state"] == "start")
    );

    // The device's goodbye closes the WebSocket.
    dev.publish_json(&json!({"session_id": hello.session_id, "type": "goodbye"}))
        .await
        .unwrap();
    assert!(
        common::upstream_closed(&upstream, 1).await,
        "gateway closed the upstream"
    );
    assert_eq!(gw.metrics.snapshot().upstream_connects, 1);
    gw.shutdown().await;
}

#[tokio::test]
async fn two_conversations_never_cross() {
    let upstream = mock(Behavior::Normal).await;
    let gw = gateway_with(&upstream).await;
    let mut a = common::device(&gw, 101).await;
    let mut b = common::device(&gw, 102).await;
    let (ha, mut aa) = common::conversation(&mut a).await;
    let (hb, mut ab) = common::conversation(&mut b).await;
    assert_ne!(ha.session_id, hb.session_id);
    a.publish_json(&common::listen_start(&ha.session_id, "auto"))
        .await
        .unwrap();
    b.publish_json(&common::listen_start(&hb.session_id, "auto"))
        .await
        .unwrap();
    talk(&mut aa, 0, 5).await;
    talk(&mut ab, 0, 5).await;
    for (dev, audio) in [(&mut a, &mut aa), (&mut b, &mut ab)] {
        let stt = dev.recv_type("stt", Duration::from_secs(5)).await.unwrap();
        assert_eq!(
            stt["text"], "turn 1",
            "each connection has its own turn count"
        );
        for i in 0..5 {
            let f = audio.recv(Duration::from_secs(5)).await.unwrap().unwrap();
            assert_eq!(parse_reply_frame(&f.opus), Some((1, i)));
        }
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn an_unreachable_upstream_gets_the_device_an_alert_and_goodbye() {
    // A port nothing listens on.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("ws://{}/xiaozhi/v1/", dead.local_addr().unwrap());
    drop(dead);
    let gw = common::start_with(config_for(vec![url])).await;
    let mut dev = common::device(&gw, 103).await;
    dev.publish_json(&SimDevice::firmware_hello())
        .await
        .unwrap();
    let (message, goodbye) = alert_then_goodbye(&mut dev).await;
    assert!(message.contains("refused"), "{message}");
    assert_eq!(goodbye["session_id"], "");
    let m = gw.metrics.snapshot();
    assert_eq!(m.upstream_failed_refused, 1);
    assert_eq!(m.hellos_refused, 1);
    // The device stays connected and can try again.
    assert!(!dev.is_closed());
    gw.shutdown().await;
}

#[tokio::test]
async fn a_dead_upstream_is_skipped_for_a_live_one() {
    let upstream = mock(Behavior::Normal).await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_url = format!("ws://{}/xiaozhi/v1/", dead.local_addr().unwrap());
    drop(dead);
    let gw = common::start_with(config_for(vec![dead_url, upstream.url.clone()])).await;
    for n in 0..3 {
        let mut dev = common::device(&gw, 110 + n).await;
        let (hello, _audio) = common::conversation(&mut dev).await;
        assert!(!hello.session_id.is_empty());
    }
    let m = gw.metrics.snapshot();
    assert_eq!(m.upstream_connects, 3);
    assert_eq!(
        m.upstream_failed_refused, 1,
        "the dead one is tried once, then skipped"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn refused_credentials_are_reported_to_the_device() {
    let upstream = mock(Behavior::RejectAuth).await;
    let gw = gateway_with(&upstream).await;
    let mut dev = common::device(&gw, 104).await;
    dev.publish_json(&SimDevice::firmware_hello())
        .await
        .unwrap();
    let (message, _) = alert_then_goodbye(&mut dev).await;
    assert!(message.contains("credentials"), "{message}");
    assert_eq!(gw.metrics.snapshot().upstream_failed_auth, 1);
    gw.shutdown().await;
}

#[tokio::test]
async fn a_refusal_in_plain_text_is_an_auth_failure() {
    let upstream = mock(Behavior::RejectAuthInBand).await;
    let gw = gateway_with(&upstream).await;
    let mut dev = common::device(&gw, 114).await;
    dev.publish_json(&SimDevice::firmware_hello())
        .await
        .unwrap();
    let (message, _) = alert_then_goodbye(&mut dev).await;
    assert!(
        message.contains("credentials") && message.contains("认证失败"),
        "{message}"
    );
    assert_eq!(gw.metrics.snapshot().upstream_failed_auth, 1);
    gw.shutdown().await;
}

#[tokio::test]
async fn a_wrong_server_secret_is_refused_by_the_server() {
    let upstream = mock(Behavior::Normal).await;
    let mut config = config_for(vec![upstream.url.clone()]);
    config.pipeline.xiaozhi.auth_key = Some("not-the-secret".into());
    let gw = common::start_with(config).await;
    let mut dev = common::device(&gw, 105).await;
    dev.publish_json(&SimDevice::firmware_hello())
        .await
        .unwrap();
    alert_then_goodbye(&mut dev).await;
    assert_eq!(
        upstream.observed().rejected.len(),
        1,
        "the token did not verify"
    );
    assert_eq!(gw.metrics.snapshot().upstream_failed_auth, 1);
    gw.shutdown().await;
}

#[tokio::test]
async fn a_silent_upstream_times_out_within_the_budget() {
    let upstream = mock(Behavior::SilentHello).await;
    let mut config = config_for(vec![upstream.url.clone()]);
    config.pipeline.xiaozhi.connect_timeout_ms = 500;
    let gw = common::start_with(config).await;
    let mut dev = common::device(&gw, 106).await;
    let started = std::time::Instant::now();
    dev.publish_json(&SimDevice::firmware_hello())
        .await
        .unwrap();
    let (message, _) = alert_then_goodbye(&mut dev).await;
    let waited = started.elapsed();
    assert!(message.contains("did not answer"), "{message}");
    assert!(
        waited >= Duration::from_millis(450) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
    assert_eq!(gw.metrics.snapshot().upstream_failed_timeout, 1);
    gw.shutdown().await;
}

#[tokio::test]
async fn an_upstream_closing_mid_turn_ends_in_alert_and_goodbye() {
    let upstream = mock(Behavior::CloseMidTurn).await;
    let gw = gateway_with(&upstream).await;
    let mut dev = common::device(&gw, 107).await;
    let (hello, mut audio) = common::conversation(&mut dev).await;
    dev.publish_json(&common::listen_start(&hello.session_id, "auto"))
        .await
        .unwrap();
    talk(&mut audio, 0, 2).await;
    let (message, goodbye) = alert_then_goodbye(&mut dev).await;
    assert!(message.contains("speech server"), "{message}");
    assert_eq!(
        goodbye["session_id"],
        hello.session_id.as_str(),
        "firmware closes only on its own session id"
    );
    assert_eq!(gw.metrics.snapshot().upstream_failed_midway, 1);
    // The gateway is still healthy: the same device opens a new conversation.
    assert!(!dev.is_closed());
    let (again, _audio) = common::conversation(&mut dev).await;
    assert_ne!(again.session_id, hello.session_id);
    gw.shutdown().await;
}

#[tokio::test]
async fn garbage_from_the_upstream_is_dropped_and_counted() {
    let upstream = mock(Behavior::GarbageFrames).await;
    let gw = gateway_with(&upstream).await;
    let mut dev = common::device(&gw, 108).await;
    let (hello, mut audio) = common::conversation(&mut dev).await;
    dev.publish_json(&common::listen_start(&hello.session_id, "auto"))
        .await
        .unwrap();
    // At the device's pace: the mock ignores audio while it still has frames to send.
    for i in 0..6u32 {
        audio.send(i * 60, &synthetic_frame(i, 30)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    // The turn still completes.
    let stt = dev.recv_type("stt", Duration::from_secs(5)).await.unwrap();
    assert_eq!(stt["text"], "turn 1");
    for i in 0..5 {
        let f = audio.recv(Duration::from_secs(5)).await.unwrap().unwrap();
        assert_eq!(parse_reply_frame(&f.opus), Some((1, i)));
    }
    dev.recv_type("tts", Duration::from_secs(5)).await.unwrap();
    assert!(gw.metrics.snapshot().upstream_malformed >= 2);
    gw.shutdown().await;
}

#[tokio::test]
async fn server_mcp_setup_is_answered_from_the_device_cache() {
    let upstream = mock(Behavior::Normal).await;
    let gw = gateway_with(&upstream).await;
    let mut dev = common::device(&gw, 109).await;
    let mcp = gw
        .directory
        .mcp(&dev.credentials.mac)
        .expect("device MCP client");
    assert!(
        mcp.wait_setup(Duration::from_secs(5)).await,
        "setup finished"
    );
    let cache = mcp.cache();
    assert!(cache.complete && cache.tools.len() >= 5, "{cache:?}");
    let asked_before = dev.mcp_requests().len();

    let (_hello, _audio) = common::conversation(&mut dev).await;
    // The server's own setup, as xiaozhi-server sends it.
    let init = json!({"type": "mcp", "payload": {"jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2024-11-05", "capabilities": {"vision": {"url": "http://vision", "token": "t"}}}}});
    assert!(upstream.send_text_to_newest(init.to_string()).await);
    let answer = upstream
        .wait_text(Duration::from_secs(5), |t| {
            t["type"] == "mcp" && t["payload"]["id"] == 1
        })
        .await
        .expect("initialize answered");
    assert!(answer["payload"]["result"]["protocolVersion"].is_string());
    let list =
        json!({"type": "mcp", "payload": {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}});
    assert!(upstream.send_text_to_newest(list.to_string()).await);
    let answer = upstream
        .wait_text(Duration::from_secs(5), |t| {
            t["type"] == "mcp" && t["payload"]["id"] == 2
        })
        .await
        .expect("tools/list answered");
    assert_eq!(
        answer["payload"]["result"]["tools"]
            .as_array()
            .unwrap()
            .len(),
        cache.tools.len()
    );
    assert!(gw.metrics.snapshot().mcp_cache_answers >= 2);

    // The device was not asked for its tools again, but did get the vision settings.
    assert!(
        common::eventually(Duration::from_secs(3), || dev
            .mcp_requests()
            .iter()
            .any(|r| r["method"] == "initialize"
                && r["params"]["capabilities"]["vision"]["url"] == "http://vision"))
        .await
    );
    let later: Vec<Value> = dev.mcp_requests()[asked_before..].to_vec();
    assert!(
        later.iter().all(|r| r["method"] != "tools/list"),
        "{later:?}"
    );

    // tools/call goes through; two concurrent calls get their own answers although the
    // server reuses small ids.
    let slow = json!({"type": "mcp", "payload": {"jsonrpc": "2.0", "id": 3, "method": "tools/call",
        "params": {"name": "self.test.sleep", "arguments": {"ms": 300}}}});
    let fast = json!({"type": "mcp", "payload": {"jsonrpc": "2.0", "id": 4, "method": "tools/call",
        "params": {"name": "self.test.echo", "arguments": {"text": "hi there"}}}});
    assert!(upstream.send_text_to_newest(slow.to_string()).await);
    assert!(upstream.send_text_to_newest(fast.to_string()).await);
    let fast_answer = upstream
        .wait_text(Duration::from_secs(5), |t| {
            t["type"] == "mcp" && t["payload"]["id"] == 4
        })
        .await
        .expect("fast call answered");
    assert_eq!(
        fast_answer["payload"]["result"]["content"][0]["text"],
        "hi there"
    );
    let slow_answer = upstream
        .wait_text(Duration::from_secs(5), |t| {
            t["type"] == "mcp" && t["payload"]["id"] == 3
        })
        .await
        .expect("slow call answered");
    assert_ne!(
        slow_answer["payload"]["result"]["content"][0]["text"],
        "hi there"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn the_turns_simulator_measures_the_relay() {
    let upstream = MockUpstream::start(MockUpstreamConfig {
        auth_key: Some(SERVER_SECRET.into()),
        stamp_frames: true,
        ..MockUpstreamConfig::default()
    })
    .await
    .unwrap();
    let gw = gateway_with(&upstream).await;
    let report =
        xiaozhi_tools::simulator::turns::run_turns(xiaozhi_tools::simulator::turns::TurnConfig {
            mqtt: gw.addrs.mqtt,
            signature_key: Some(common::KEY.into()),
            devices: 3,
            duration: Duration::from_millis(1200),
            first_device: 120,
            ..Default::default()
        })
        .await;
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(report.conversations, 3);
    assert!(report.turns >= 6, "{report}");
    assert_eq!(report.missing_frames, 0, "{report}");
    assert_eq!(report.unstamped_frames, 0);
    assert_eq!(report.relay.count as u64, report.turns * 5);
    assert!(
        report.relay.p50_ms > 0.0 && report.relay.p50_ms < 50.0,
        "{report}"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn a_stalled_upstream_costs_bounded_memory_and_drops_oldest_audio() {
    let upstream = mock(Behavior::Stall).await;
    let mut config = config_for(vec![upstream.url.clone()]);
    config.pipeline.xiaozhi.audio_buffer_frames = 16;
    let gw = common::start_with(config).await;
    let mut dev = common::device(&gw, 115).await;
    let (hello, mut audio) = common::conversation(&mut dev).await;
    // Far more than the socket buffers between us and the stalled server can hold
    // (~10 MB), sent as fast as possible.
    for i in 0..8_000u32 {
        audio.send(i * 60, &synthetic_frame(i, 1200)).await.unwrap();
        if i % 500 == 0 {
            tokio::task::yield_now().await;
        }
    }
    assert!(
        common::eventually(Duration::from_secs(10), || gw
            .metrics
            .snapshot()
            .upstream_audio_dropped
            > 0)
        .await,
        "oldest audio dropped once the buffer is full: {:?}",
        gw.metrics.snapshot()
    );
    // The device can still end the conversation, promptly.
    dev.publish_json(&json!({"session_id": hello.session_id, "type": "goodbye"}))
        .await
        .unwrap();
    assert!(
        common::eventually(Duration::from_secs(3), || gw
            .metrics
            .snapshot()
            .sessions_live
            == 0)
        .await,
        "conversation ended despite the stuck upstream"
    );
    // And the gateway keeps serving.
    let mut other = common::device(&gw, 116).await;
    let (h, _a) = common::conversation(&mut other).await;
    assert!(!h.session_id.is_empty());
    gw.shutdown().await;
}

#[tokio::test]
async fn shutdown_says_goodbye_and_closes_the_upstream() {
    let upstream = mock(Behavior::Normal).await;
    let gw = gateway_with(&upstream).await;
    let mut dev = common::device(&gw, 117).await;
    let (hello, _audio) = common::conversation(&mut dev).await;
    let shutdown = tokio::spawn(gw.shutdown());
    let goodbye = dev
        .recv_type("goodbye", Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(goodbye["session_id"], hello.session_id.as_str());
    tokio::time::timeout(Duration::from_secs(5), shutdown)
        .await
        .expect("shutdown is bounded")
        .unwrap();
    assert!(
        common::upstream_closed(&upstream, 1).await,
        "the upstream got a close"
    );
}

/// `{"type":"udp_timeout"}` (sent by some firmware forks when their audio channel timed
/// out) ends the conversation as the Node gateway does: the upstream WebSocket is closed
/// and the device hears goodbye with its session id; the device stays connected.
#[tokio::test]
async fn a_device_udp_timeout_closes_the_upstream_and_says_goodbye() {
    let upstream = mock(Behavior::Normal).await;
    let gw = gateway_with(&upstream).await;
    let mut dev = common::device(&gw, 118).await;
    let (hello, _audio) = common::conversation(&mut dev).await;
    dev.publish_json(&json!({"session_id": hello.session_id, "type": "udp_timeout"}))
        .await
        .unwrap();
    let goodbye = dev
        .recv_type("goodbye", Duration::from_secs(5))
        .await
        .expect("the device is told");
    assert_eq!(goodbye["session_id"], hello.session_id.as_str());
    assert!(
        common::upstream_closed(&upstream, 1).await,
        "the upstream got a close"
    );
    assert!(
        upstream
            .observed()
            .texts
            .iter()
            .all(|t| t["type"] != "udp_timeout"),
        "the report is the gateway's, not relayed"
    );
    assert_eq!(gw.directory.status(&common::mac(118)), Some(false));
    // A new conversation works as before.
    let (again, _audio) = common::conversation(&mut dev).await;
    assert_ne!(again.session_id, hello.session_id);
    gw.shutdown().await;
}
