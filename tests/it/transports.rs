//! The authenticated audio transports (docs/transports.md) over real sockets: AES-GCM
//! over the UDP port and QUIC on its own port, negotiated in the hello; and stock
//! firmware, which announces neither, still getting AES-CTR.

use crate::common;

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::net::UdpSocket;
use xiaozhi_gateway::config::Config;
use xiaozhi_gateway::protocol::audio_channel::Verdict;
use xiaozhi_gateway::protocol::datagram::HEADER_LEN;
use xiaozhi_gateway::protocol::gcm_channel::{GcmCipher, GcmReceiver, GcmSealer};
use xiaozhi_gateway::server::Gateway;
use xiaozhi_tools::simulator::audio::{
    QuicHello, ServerHello, SimLink, Transport, frame_index, synthetic_frame,
};
use xiaozhi_tools::simulator::device::{DeviceCredentials, SimDevice};
use xiaozhi_tools::simulator::quic::SimQuic;
use xiaozhi_tools::simulator::upstream::{MockUpstream, MockUpstreamConfig, parse_reply_frame};

const WAIT: Duration = Duration::from_secs(5);

fn config() -> Config {
    let mut c = common::test_config();
    c.quic.enabled = true;
    c.quic.listen = ([127, 0, 0, 1], 0).into();
    c
}

fn local() -> SocketAddr {
    ([127, 0, 0, 1], 0).into()
}

/// Says a hello announcing `transport`; returns the server's hello, raw and parsed.
async fn hello(dev: &mut SimDevice, transport: Transport) -> (Value, ServerHello) {
    dev.publish_json(&transport.hello()).await.unwrap();
    let raw = dev.recv_type("hello", WAIT).await.expect("server hello");
    let parsed = ServerHello::parse(&raw).expect("valid server hello");
    (raw, parsed)
}

/// Hello, open the channel, listen in `mode`.
async fn open(dev: &mut SimDevice, transport: Transport, mode: &str) -> (ServerHello, SimLink) {
    let (_, hello) = hello(dev, transport).await;
    assert_eq!(hello.transport(), transport);
    let link = SimLink::open(&hello, local()).await.expect("channel opens");
    dev.publish_json(&common::listen_start(&hello.session_id, mode))
        .await
        .unwrap();
    (hello, link)
}

/// Sends frames `range` and expects each echoed back (realtime echo).
async fn echo(link: &mut SimLink, range: std::ops::Range<u32>) {
    for i in range.clone() {
        link.send(i * 60, &synthetic_frame(i, 40)).await.unwrap();
    }
    let mut seen = Vec::new();
    while seen.len() < range.len() {
        let frame = link
            .recv(WAIT)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("echo of {range:?}: got {seen:?}"));
        seen.push(frame_index(&frame.opus).unwrap());
    }
    seen.sort_unstable();
    assert_eq!(seen, range.collect::<Vec<_>>());
}

async fn eventually(
    gw: &Gateway,
    what: &str,
    f: impl Fn(&xiaozhi_gateway::metrics::MetricsSnapshot) -> bool,
) {
    assert!(
        common::eventually(WAIT, || f(&gw.metrics.snapshot())).await,
        "{what}: {:?}",
        gw.metrics.snapshot()
    );
}

#[tokio::test]
async fn stock_firmware_gets_aes_ctr_even_when_everything_is_offered() {
    let gw = common::start_with(config()).await;
    let mut dev = common::device(&gw, 1).await;
    // Exactly the firmware's hello, then two that do not quite opt in.
    for hello_json in [
        SimDevice::firmware_hello(),
        SimDevice::firmware_1x_hello(),
        json!({"type":"hello","version":3,"transport":"udp","features":{"mcp":true,"udp_aead":1,"quic":"yes"}}),
        json!({"type":"hello","version":3,"transport":"udp"}),
    ] {
        dev.publish_json(&hello_json).await.unwrap();
        let raw = dev.recv_type("hello", WAIT).await.unwrap();
        assert_eq!(raw["transport"], "udp", "{raw}");
        assert_eq!(raw["udp"]["encryption"], "aes-128-ctr", "{raw}");
        assert!(raw.get("quic").is_none(), "{raw}");
    }
    let (_, mut link) = open(&mut dev, Transport::Ctr, "realtime").await;
    echo(&mut link, 0..10).await;
    let m = gw.metrics.snapshot();
    assert_eq!(
        (
            m.audio_sessions_ctr,
            m.audio_sessions_gcm,
            m.audio_sessions_quic
        ),
        (5, 0, 0),
        "the 2.4 and 1.x hellos, two near misses, and the conversation"
    );
}

#[tokio::test]
async fn gcm_conversation_with_echo() {
    let gw = common::start_with(config()).await;
    let mut dev = common::device(&gw, 2).await;
    let (raw, _) = hello(&mut dev, Transport::Gcm).await;
    assert_eq!(raw["udp"]["encryption"], "aes-128-gcm");
    assert_eq!(raw["transport"], "udp");
    let (_, mut link) = open(&mut dev, Transport::Gcm, "realtime").await;
    echo(&mut link, 0..30).await;
    assert_eq!(link.rejected(), 0);
    let m = gw.metrics.snapshot();
    assert_eq!(m.audio_sessions_gcm, 2);
    assert_eq!(
        (m.udp_drop_auth, m.udp_drop_stale, m.udp_drop_hijack),
        (0, 0, 0)
    );
}

/// A turn through the test xiaozhi-server on each authenticated transport.
#[tokio::test]
async fn gcm_and_quic_conversations_through_the_test_upstream() {
    let upstream = MockUpstream::start(MockUpstreamConfig::default())
        .await
        .unwrap();
    let mut c = config();
    c.pipeline.xiaozhi.urls = vec![upstream.url.clone()];
    let gw = common::start_with(c).await;
    for (n, transport) in [(3, Transport::Gcm), (4, Transport::Quic)] {
        let mut dev = common::device(&gw, n).await;
        let (hello, mut link) = open(&mut dev, transport, "auto").await;
        for i in 0..5 {
            link.send(i * 60, &synthetic_frame(i, 30)).await.unwrap();
        }
        let stt = dev.recv_type("stt", WAIT).await.unwrap();
        assert_eq!(stt["text"], "turn 1", "{transport:?}");
        let mut frames = Vec::new();
        while frames.len() < 5 {
            let frame = link.recv(WAIT).await.unwrap().expect("reply audio");
            frames.push(parse_reply_frame(&frame.opus).expect("intact reply frame"));
        }
        assert_eq!(
            frames,
            (0..5).map(|i| (1, i)).collect::<Vec<_>>(),
            "{transport:?}"
        );
        loop {
            let tts = dev.recv_type("tts", WAIT).await.unwrap();
            if tts["state"] == "stop" {
                break;
            }
        }
        dev.publish_json(&json!({"session_id": hello.session_id, "type": "goodbye"}))
            .await
            .unwrap();
    }
    assert_eq!(upstream.observed().uplink_frames, 10);
}

/// Raw GCM datagrams from the hello's key: forgeries, replays, stale and truncated
/// datagrams are dropped and counted; only an authenticated datagram moves the downlink.
#[tokio::test]
async fn gcm_drops_what_does_not_authenticate_and_binds_only_to_what_does() {
    let gw = common::start_with(config()).await;
    let mut dev = common::device(&gw, 5).await;
    let (_, hello) = hello(&mut dev, Transport::Gcm).await;
    // Auto mode: frames are collected and played back on `listen stop` to wherever the
    // channel is bound then.
    dev.publish_json(&common::listen_start(&hello.session_id, "auto"))
        .await
        .unwrap();
    let cipher = GcmCipher::new(&hello.key);
    let id = hello.connection_id();
    let mut device = GcmSealer::uplink(cipher.clone(), id);
    let mut seal = |i: u32| {
        let mut d = Vec::new();
        device
            .seal(i * 60, &synthetic_frame(i, 40), &mut d)
            .unwrap();
        d
    };
    let a = UdpSocket::bind(local()).await.unwrap();
    let b = UdpSocket::bind(local()).await.unwrap();
    let c = UdpSocket::bind(local()).await.unwrap();
    let udp = gw.addrs.udp;
    let snap = || gw.metrics.snapshot();

    let sealed: Vec<Vec<u8>> = (0..72).map(&mut seal).collect();
    a.send_to(&sealed[0], udp).await.unwrap();
    eventually(&gw, "first datagram accepted", |m| m.udp_rx_datagrams == 1).await;

    // A forgery: one flipped ciphertext bit, from another address.
    let mut forged = sealed[1].clone();
    forged[HEADER_LEN + 2] ^= 0x01;
    c.send_to(&forged, udp).await.unwrap();
    eventually(&gw, "forgery counted", |m| m.udp_drop_auth == 1).await;
    // A forged header (timestamp changed) fails too.
    let mut retimed = sealed[1].clone();
    retimed[10] ^= 0x80;
    a.send_to(&retimed, udp).await.unwrap();
    eventually(&gw, "forged header counted", |m| m.udp_drop_auth == 2).await;
    // The genuine one still gets in afterwards (the forgery moved nothing).
    a.send_to(&sealed[1], udp).await.unwrap();
    // Replays of accepted datagrams.
    a.send_to(&sealed[0], udp).await.unwrap();
    c.send_to(&sealed[1], udp).await.unwrap();
    eventually(&gw, "replays counted", |m| m.udp_drop_replay == 2).await;
    // Reordered beyond the window: 71 arrives, then 2 (69 behind; the window is 64).
    a.send_to(&sealed[71], udp).await.unwrap();
    a.send_to(&sealed[2], udp).await.unwrap();
    eventually(&gw, "stale counted", |m| m.udp_drop_stale == 1).await;
    // Late but inside the window: accepted.
    a.send_to(&sealed[60], udp).await.unwrap();
    // Truncated on the wire, and a payload shorter than a tag.
    a.send_to(&sealed[3][..sealed[3].len() - 5], udp)
        .await
        .unwrap();
    let mut short = sealed[3][..HEADER_LEN + 8].to_vec();
    short[2..4].copy_from_slice(&8u16.to_be_bytes());
    a.send_to(&short, udp).await.unwrap();
    eventually(&gw, "truncated counted", |m| m.udp_drop_malformed == 2).await;
    assert_eq!(snap().udp_rebinds, 0);

    // A genuine datagram from B moves the binding there; a bad tag from C does not.
    let mut later: Vec<Vec<u8>> = (72..76).map(&mut seal).collect();
    b.send_to(&later[0], udp).await.unwrap();
    eventually(&gw, "rebound to B", |m| m.udp_rebinds == 1).await;
    later[1][HEADER_LEN] ^= 0xff;
    c.send_to(&later[1], udp).await.unwrap();
    eventually(&gw, "bad tag from C counted", |m| m.udp_drop_auth == 3).await;
    assert_eq!(snap().udp_rebinds, 1);
    // A genuine but late datagram from the old address (A) is accepted and moves nothing.
    b.send_to(&later[3], udp).await.unwrap();
    a.send_to(&later[2], udp).await.unwrap();
    eventually(&gw, "late datagram received", |m| m.udp_rx_datagrams == 15).await;
    assert_eq!(snap().udp_rebinds, 1);

    // Playback goes to B (the device's authenticated address), none to A or C.
    dev.publish_json(&json!({"session_id": hello.session_id, "type": "listen", "state": "stop"}))
        .await
        .unwrap();
    let mut rx = GcmReceiver::downlink(cipher, id);
    let mut buf = vec![0u8; 1600];
    let mut played = Vec::new();
    while let Ok(Ok((n, _))) =
        tokio::time::timeout(Duration::from_secs(2), b.recv_from(&mut buf)).await
    {
        match rx.on_datagram(&mut buf[..n], udp) {
            Verdict::Accept { opus_len, .. } => {
                played.push(frame_index(&buf[HEADER_LEN..HEADER_LEN + opus_len]).unwrap())
            }
            Verdict::Drop(why) => panic!("downlink does not authenticate: {why:?}"),
        }
    }
    played.sort_unstable();
    assert_eq!(
        played,
        vec![0, 1, 60, 71, 72, 74, 75],
        "the accepted frames, played to B"
    );
    for (name, s) in [("A", &a), ("C", &c)] {
        assert!(
            tokio::time::timeout(Duration::from_millis(200), s.recv_from(&mut buf))
                .await
                .is_err(),
            "{name} got downlink audio"
        );
    }
}

#[tokio::test]
async fn quic_conversation_end_to_end_and_clean_close() {
    let gw = common::start_with(config()).await;
    let quic_addr = gw.addrs.quic.expect("QUIC endpoint bound");
    let mut dev = common::device(&gw, 6).await;
    let (raw, hello) = hello(&mut dev, Transport::Quic).await;
    assert_eq!(raw["transport"], "quic");
    assert_eq!(raw["quic"]["port"], quic_addr.port());
    assert_eq!(raw["quic"]["alpn"], "xiaozhi-audio/1");
    assert!(raw.get("udp").is_none(), "{raw}");
    let mut link = SimLink::open(&hello, local()).await.unwrap();
    dev.publish_json(&common::listen_start(&hello.session_id, "realtime"))
        .await
        .unwrap();
    echo(&mut link, 0..30).await;
    eventually(&gw, "attached", |m| {
        m.quic_attached == 1 && m.quic_connections == 1
    })
    .await;

    // The device closes its connection: the conversation ends.
    let SimLink::Quic(quic) = &link else {
        panic!("not QUIC")
    };
    quic.close();
    eventually(&gw, "conversation ended by the device", |m| {
        m.sessions_live == 0 && m.quic_closed_by_device == 1 && m.quic_connections == 0
    })
    .await;
    // It may have lost the connection rather than closed it: it hears the end over MQTT.
    let goodbye = dev
        .recv_type("goodbye", WAIT)
        .await
        .expect("goodbye over MQTT");
    assert_eq!(goodbye["session_id"], hello.session_id.as_str());

    // The server ends a conversation (the device's goodbye over MQTT): the connection is
    // closed cleanly with code 0.
    let (_, mut link) = open(&mut dev, Transport::Quic, "realtime").await;
    echo(&mut link, 0..3).await;
    dev.publish_json(&json!({"session_id": "", "type": "goodbye"}))
        .await
        .unwrap();
    let SimLink::Quic(quic) = &link else {
        panic!("not QUIC")
    };
    match quic.closed(WAIT).await {
        Some(quinn::ConnectionError::ApplicationClosed(close)) => {
            assert_eq!(u64::from(close.error_code), 0, "{close:?}");
        }
        other => panic!("expected an application close, got {other:?}"),
    }
    assert_eq!(gw.metrics.snapshot().quic_drop_malformed, 0);
}

#[tokio::test]
async fn quic_tokens_are_checked_used_once_and_expire() {
    let mut c = config();
    c.quic.token_ttl_secs = 1;
    let gw = common::start_with(c).await;
    let mut dev = common::device(&gw, 7).await;
    let (_, hello) = hello(&mut dev, Transport::Quic).await;
    let quic = hello.quic.clone().unwrap();

    // A guessed token.
    let guessed = QuicHello {
        token: [0x5a; 16],
        ..quic.clone()
    };
    let err = SimQuic::connect(hello.udp, &guessed, local(), false)
        .await
        .err()
        .expect("a wrong token is refused");
    assert!(err.to_string().contains("unknown_token"), "{err}");

    // The right one, once.
    let _first = SimQuic::connect(hello.udp, &quic, local(), false)
        .await
        .expect("the hello's token attaches");
    let err = SimQuic::connect(hello.udp, &quic, local(), false)
        .await
        .err()
        .expect("a reused token is refused");
    assert!(err.to_string().contains("reused_token"), "{err}");

    // A token not presented within its TTL.
    let (_, late) = open_hello_only(&mut dev).await;
    tokio::time::sleep(Duration::from_millis(1_300)).await;
    let err = SimQuic::connect(late.udp, late.quic.as_ref().unwrap(), local(), false)
        .await
        .err()
        .expect("an expired token is refused");
    assert!(err.to_string().contains("expired_token"), "{err}");

    // The token of a conversation that ended before anyone presented it: code 0.
    let (_, ended) = open_hello_only(&mut dev).await;
    dev.publish_json(&json!({"session_id": ended.session_id, "type": "goodbye"}))
        .await
        .unwrap();
    eventually(&gw, "conversation ended", |m| m.sessions_live == 0).await;
    let err = SimQuic::connect(ended.udp, ended.quic.as_ref().unwrap(), local(), false)
        .await
        .err()
        .expect("the token of an ended conversation is refused");
    assert!(
        err.to_string().contains("conversation_ended") && err.to_string().contains("code 0"),
        "{err}"
    );

    let m = gw.metrics.snapshot();
    assert_eq!(
        (
            m.quic_attached,
            m.quic_refused_unknown_token,
            m.quic_refused_reused_token,
            m.quic_refused_expired_token,
            m.quic_refused_ended,
        ),
        (1, 1, 1, 1, 1)
    );
}

async fn open_hello_only(dev: &mut SimDevice) -> (Value, ServerHello) {
    hello(dev, Transport::Quic).await
}

#[tokio::test]
async fn the_quic_client_refuses_a_certificate_that_is_not_pinned() {
    let gw = common::start_with(config()).await;
    let mut dev = common::device(&gw, 8).await;
    let (_, hello) = hello(&mut dev, Transport::Quic).await;
    let mut wrong = hello.quic.clone().unwrap();
    wrong.cert_sha256[0] ^= 1;
    let err = SimQuic::connect(hello.udp, &wrong, local(), false)
        .await
        .err()
        .expect("a certificate with another hash is refused");
    assert!(err.to_string().contains("pinned"), "{err}");
    // Nothing attached; the real token is still good for the real certificate.
    assert_eq!(gw.metrics.snapshot().quic_attached, 0);
    SimQuic::connect(hello.udp, hello.quic.as_ref().unwrap(), local(), false)
        .await
        .expect("the pinned certificate is accepted");
}

#[tokio::test]
async fn a_quic_client_that_changes_its_port_keeps_talking() {
    let gw = common::start_with(config()).await;
    let mut dev = common::device(&gw, 9).await;
    let (_, mut link) = open(&mut dev, Transport::Quic, "realtime").await;
    echo(&mut link, 0..10).await;
    let SimLink::Quic(quic) = &link else {
        panic!("not QUIC")
    };
    let before = quic.local_addr().unwrap();
    let after = quic.rebind(local()).unwrap();
    assert_ne!(before.port(), after.port());
    echo(&mut link, 10..30).await;
    eventually(&gw, "migration seen", |m| m.quic_migrations >= 1).await;
    let m = gw.metrics.snapshot();
    assert_eq!((m.sessions_live, m.quic_attached), (1, 1));
}

/// With `control: true` the conversation's JSON goes both ways on the QUIC stream.
#[tokio::test]
async fn quic_control_stream_carries_json_both_ways() {
    let gw = common::start_with(config()).await;
    let mut dev = common::device(&gw, 10).await;
    let (_, hello) = hello(&mut dev, Transport::Quic).await;
    let mut quic = SimQuic::connect(hello.udp, hello.quic.as_ref().unwrap(), local(), true)
        .await
        .unwrap();
    quic.send_control(&common::listen_start(&hello.session_id, "auto"))
        .await
        .unwrap();
    for i in 0..4 {
        quic.send(i * 60, &synthetic_frame(i, 40)).unwrap();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    quic.send_control(&json!({"session_id": hello.session_id, "type": "listen", "state": "stop"}))
        .await
        .unwrap();
    let tts = quic
        .recv_control(WAIT)
        .await
        .unwrap()
        .expect("tts start on the stream");
    assert_eq!(
        (tts["type"].as_str(), tts["state"].as_str()),
        (Some("tts"), Some("start"))
    );
    let mut played = Vec::new();
    while played.len() < 4 {
        let f = quic.recv(WAIT).await.unwrap().expect("playback");
        played.push(frame_index(&f.opus).unwrap());
    }
    assert_eq!(played, vec![0, 1, 2, 3]);
    // Nothing of it went by MQTT.
    assert!(
        dev.recv_type("tts", Duration::from_millis(300))
            .await
            .is_err()
    );
}

#[tokio::test]
async fn a_group_that_requires_authentication_is_refused_aes_ctr() {
    let mut c = config();
    c.quic.enabled = false;
    c.transport.require_authenticated = vec!["GID_secure".into()];
    let gw = common::start_with(c).await;
    let secure =
        DeviceCredentials::for_mac(common::mac(11), "GID_secure", Some(common::KEY.as_bytes()));
    let mut dev = SimDevice::connect(gw.addrs.mqtt, secure).await.unwrap();

    dev.publish_json(&SimDevice::firmware_hello())
        .await
        .unwrap();
    let alert = dev
        .recv_type("alert", WAIT)
        .await
        .expect("refused with an alert");
    assert!(
        alert["message"].as_str().unwrap().contains("GID_secure"),
        "{alert}"
    );
    // It announced QUIC only, which this gateway does not run: refused too.
    dev.publish_json(&Transport::Quic.hello()).await.unwrap();
    dev.recv_type("alert", WAIT)
        .await
        .expect("refused with an alert");
    assert_eq!(gw.metrics.snapshot().hellos_refused_transport_policy, 2);
    assert_eq!(gw.metrics.snapshot().audio_sessions_ctr, 0);

    let (_, mut link) = open(&mut dev, Transport::Gcm, "realtime").await;
    echo(&mut link, 0..5).await;
    // Other groups are unaffected.
    let mut other = common::device(&gw, 12).await;
    let (_, mut link) = open(&mut other, Transport::Ctr, "realtime").await;
    echo(&mut link, 0..5).await;
}

/// A QUIC device is held to the same rates as a UDP channel and an MQTT connection.
#[tokio::test]
async fn quic_datagrams_and_control_frames_are_rate_limited() {
    let mut c = config();
    c.udp.channel_rate = 10;
    c.udp.channel_burst = 5;
    c.mqtt.message_rate = 1;
    c.mqtt.message_burst = 3;
    let gw = common::start_with(c).await;
    let mut dev = common::device(&gw, 13).await;
    let (_, hello) = hello(&mut dev, Transport::Quic).await;
    let mut quic = SimQuic::connect(hello.udp, hello.quic.as_ref().unwrap(), local(), false)
        .await
        .unwrap();
    for i in 0..40 {
        quic.send(i * 60, &synthetic_frame(i, 40)).unwrap();
    }
    for _ in 0..10 {
        quic.send_control(&json!({"type": "iot", "session_id": hello.session_id}))
            .await
            .unwrap();
    }
    eventually(&gw, "datagrams over the rate dropped", |m| {
        m.quic_rx_datagrams == 40 && m.udp_drop_rate_limited >= 30
    })
    .await;
    // 10 frames on the stream, a burst of 3 (the device's MQTT messages draw on their
    // own bucket, which may add to the count).
    eventually(&gw, "control frames over the rate dropped", |m| {
        m.mqtt_dropped_rate_limited >= 6
    })
    .await;
    // Only the excess: the burst got through.
    assert!(gw.metrics.snapshot().udp_drop_rate_limited <= 35);
}
