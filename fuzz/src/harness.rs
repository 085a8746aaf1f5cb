//! What each fuzz target does with its input: one function per target, taking the raw
//! bytes libFuzzer generates, driving the gateway's code the way the service does and
//! asserting the invariants that are cheap to check.
//!
//! The file is shared: the fuzz crate compiles it as `xiaozhi_fuzz::harness` (the
//! targets in `fuzz_targets/` are one-line wrappers), and the main crate's
//! `tests/it/fuzz_regressions.rs` includes it with `#[path]` to replay every seed and every
//! saved crash under plain `cargo test`, without libFuzzer. So it may use only crates the
//! main crate depends on, and nothing that needs nightly.
//!
//! Input layouts (the seeds in `fuzz/seeds/<target>/` follow them; `seeds.rs` builds
//! them):
//! * `device_mqtt`: `[flags][p0 p1 p2 p3][MQTT byte stream]`. `flags` bit 0 picks the
//!   verifier (0: signed with [`SIGNATURE_KEY`], 1: unsigned), bit 1 a small packet
//!   limit. The stream is delivered in chunks whose sizes and the time that passes
//!   before each come from `p0..p3` in turn (low 6 bits + 1 = size, top 2 bits = time).
//! * `device_json`: one MQTT payload, as a device publishes it.
//! * `udp_datagram`: records `[h][len hi][len lo][len bytes]`; `h` bits 0-1 pick the
//!   source address; with bit 2 the harness encrypts the record as the device would
//!   (the first 16 bytes are the header and IV, the rest plaintext), and with bit 3 it
//!   also sets the type byte and the length field right; with bit 4 a GCM device seals
//!   the record, which an AES-GCM channel must accept exactly once (raw records never
//!   authenticate there).
//! * `upstream_frames`: `[kind][frame]`: kind 0 text frame, 1 binary frame from the
//!   server, 2 uplink frame to encode, 3 uplink clock steps.
//! * `config`: a TOML file.
//! * `history_query`: `[endpoint][path parameter]\n[query string]`.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{ConnectReturnCode, Packet, SubscribeReasonCode};
use rumqttc::mqttbytes::{Error as FrameError, QoS};
use serde_json::{Value, json};

use xiaozhi_gateway::front_end::{device_packet, wire_packet};
use xiaozhi_gateway::protocol::audio_channel::{
    DownlinkSealer, DropReason, FIRST_BIND_MAX_SEQUENCE, REBIND_WINDOW, UplinkChannel, Verdict,
};
use xiaozhi_gateway::protocol::cipher::PacketCipher;
use xiaozhi_gateway::protocol::control::{self, AudioParams, DeviceMessage, UdpOffer};
use xiaozhi_gateway::protocol::credentials::{self, Verifier};
use xiaozhi_gateway::protocol::datagram::{DatagramError, HEADER_LEN, Header, MAX_DATAGRAM_LEN};
use xiaozhi_gateway::protocol::device_mqtt::{
    Action, CloseReason, ConnAckCode, DeviceMqttConnection, DeviceMqttSettings, DevicePacket, Reply,
};
use xiaozhi_gateway::protocol::gcm_channel::{GcmCipher, GcmReceiver, GcmSealer};
use xiaozhi_gateway::protocol::mcp::{DeviceReply, McpRouter};
use xiaozhi_gateway::protocol::{opus, upstream};

/// The signature key the integration tests use (`tests/it/common`), and so the seeds.
pub const SIGNATURE_KEY: &str = "test-signature-key";
/// The uplink topic (the config default).
pub const UPLINK_TOPIC: &str = "device-server";
/// The front end's packet limit by default (`mqtt.max_packet_bytes`).
pub const MAX_PACKET: usize = 128 * 1024;
/// The limit with `flags` bit 1, so that oversized packets are cheap to reach.
pub const SMALL_MAX_PACKET: usize = 256;
/// The AES key of the fuzzed audio channel.
pub const UDP_KEY: [u8; 16] = *b"\x00\x01\x02\x03\x04\x05\x06\x07\x08\x09\x0a\x0b\x0c\x0d\x0e\x0f";
/// The connection id the harness's downlink uses.
pub const CONNECTION_ID: u32 = 0x1234_5678;

/// A target's harness.
pub type Harness = fn(&[u8]);

/// Every target, by name, for the regression test.
pub const TARGETS: &[(&str, Harness)] = &[
    ("device_mqtt", device_mqtt),
    ("device_json", device_json),
    ("udp_datagram", udp_datagram),
    ("upstream_frames", upstream_frames),
    ("config", config),
    ("history_query", history_query),
];

// --- device_mqtt ---------------------------------------------------------------------

/// The front end's settings as the default config gives them.
pub fn mqtt_settings() -> DeviceMqttSettings {
    DeviceMqttSettings {
        connect_timeout: Duration::from_secs(10),
        default_keep_alive: Duration::from_secs(240),
        uplink_topic: UPLINK_TOPIC.to_owned(),
    }
}

/// What the fuzzer's packets did to the connection so far, to check each action against.
struct MqttObserver {
    signed: bool,
    authenticated: Option<String>,
    closed: bool,
    /// An `Authenticated` was just seen: the next action must be the CONNACK.
    expect_connack: bool,
    /// A refusing CONNACK was just sent: the next action must close.
    expect_auth_close: bool,
}

impl MqttObserver {
    /// Checks the actions one packet (or timeout, or framing error) produced.
    fn check(&mut self, input: Option<&Packet>, actions: &[Action]) {
        for action in actions {
            assert!(!self.closed, "action after Close: {action:?}");
            if self.expect_connack {
                assert_eq!(
                    action,
                    &Action::Send(Reply::ConnAck(ConnAckCode::Accepted)),
                    "Authenticated must be followed by CONNACK 0"
                );
                self.expect_connack = false;
                continue;
            }
            if self.expect_auth_close {
                assert!(
                    matches!(action, Action::Close(CloseReason::AuthFailed(_))),
                    "a refusing CONNACK must be followed by Close(AuthFailed): {action:?}"
                );
            }
            match action {
                Action::Authenticated { identity, .. } => {
                    assert!(self.authenticated.is_none(), "authenticated twice");
                    let Some(Packet::Connect(connect)) = input else {
                        panic!("Authenticated without a CONNECT: {input:?}");
                    };
                    assert_eq!(identity.client_id, connect.client_id);
                    assert_eq!(
                        credentials::parse_client_id(&connect.client_id).as_ref(),
                        Ok(identity)
                    );
                    let login = connect.login.as_ref().expect("authenticated without login");
                    assert!(!login.password.is_empty());
                    if self.signed {
                        assert_eq!(
                            credentials::sign(
                                SIGNATURE_KEY.as_bytes(),
                                &connect.client_id,
                                &login.username
                            ),
                            login.password,
                            "accepted a password that is not the signature"
                        );
                    }
                    self.authenticated =
                        Some(xiaozhi_gateway::protocol::topics::p2p(&identity.mac));
                    self.expect_connack = true;
                }
                Action::Send(reply) => {
                    // Written as the front end writes it.
                    let packet = &wire_packet(reply.clone());
                    check_writes_and_reads_back(packet);
                    match packet {
                        Packet::ConnAck(ack) => {
                            assert!(self.authenticated.is_none(), "CONNACK after CONNACK");
                            assert_ne!(
                                ack.code,
                                ConnectReturnCode::Success,
                                "CONNACK 0 without Authenticated"
                            );
                            self.expect_auth_close = true;
                        }
                        Packet::PubAck(ack) => {
                            let Some(Packet::Publish(p)) = input else {
                                panic!("PUBACK for {input:?}")
                            };
                            assert_eq!((p.qos, p.pkid), (QoS::AtLeastOnce, ack.pkid));
                        }
                        Packet::SubAck(ack) => {
                            let Some(Packet::Subscribe(s)) = input else {
                                panic!("SUBACK for {input:?}")
                            };
                            assert_eq!(ack.pkid, s.pkid);
                            assert_eq!(ack.return_codes.len(), s.filters.len());
                            let own = self.authenticated.as_deref().expect("SUBACK before auth");
                            for (code, filter) in ack.return_codes.iter().zip(&s.filters) {
                                if matches!(code, SubscribeReasonCode::Success(_)) {
                                    assert_eq!(
                                        filter.path, own,
                                        "subscription to a foreign topic granted"
                                    );
                                }
                            }
                        }
                        Packet::UnsubAck(_) | Packet::PingResp => {
                            assert!(self.authenticated.is_some(), "{packet:?} before CONNECT");
                        }
                        other => panic!("the server never sends {other:?}"),
                    }
                }
                Action::Uplink(payload) => {
                    assert!(self.authenticated.is_some(), "uplink before auth");
                    let Some(Packet::Publish(p)) = input else {
                        panic!("uplink from {input:?}")
                    };
                    assert_eq!(p.topic, UPLINK_TOPIC);
                    assert_ne!(p.qos, QoS::ExactlyOnce);
                    assert_eq!(payload, &p.payload);
                }
                Action::Dropped(_) => {
                    assert!(self.authenticated.is_some(), "dropped before auth")
                }
                Action::Close(_) => self.closed = true,
            }
        }
        assert!(!self.expect_connack, "Authenticated without CONNACK");
    }
}

/// A packet the server writes must come back unchanged through the reader a client uses.
fn check_writes_and_reads_back(packet: &Packet) {
    let mut buf = BytesMut::new();
    packet
        .write(&mut buf, usize::MAX)
        .expect("server packet writes");
    let back = Packet::read(&mut buf, usize::MAX).expect("server packet reads back");
    assert_eq!(&back, packet);
    assert!(buf.is_empty());
}

/// Splits the stream into the driver's reads: sizes and clock steps from `pattern`.
fn mqtt_chunks(pattern: [u8; 4], mut stream: &[u8]) -> Vec<(Duration, &[u8])> {
    let mut chunks = Vec::new();
    let mut i = 0;
    while !stream.is_empty() {
        let p = pattern[i % 4];
        let size = usize::from(p & 0x3f) + 1;
        let step = match p >> 6 {
            0 => Duration::ZERO,
            1 => Duration::from_secs(1),
            2 => Duration::from_secs(30),
            _ => Duration::from_secs(200),
        };
        let (chunk, rest) = stream.split_at(size.min(stream.len()));
        chunks.push((step, chunk));
        stream = rest;
        i += 1;
    }
    chunks
}

/// A framing outcome, comparable across chunkings.
#[derive(Debug, PartialEq)]
enum Framed {
    Packet(Packet),
    Error(String),
}

fn framing_error(e: &FrameError) -> String {
    format!("{e:?}")
}

/// Frames a whole buffer at once, up to the first error (where a connection ends).
fn frame_all(stream: &[u8], max_packet: usize) -> Vec<Framed> {
    let mut buf = BytesMut::from(stream);
    let mut out = Vec::new();
    loop {
        match Packet::read(&mut buf, max_packet) {
            Ok(p) => out.push(Framed::Packet(p)),
            Err(FrameError::InsufficientBytes(_)) => return out,
            Err(e) => {
                out.push(Framed::Error(framing_error(&e)));
                return out;
            }
        }
    }
}

/// What one [`device_mqtt`] run came to (the regression tests check that the seeds
/// reach where they are meant to).
#[derive(Debug, Default, PartialEq)]
pub struct MqttRun {
    pub authenticated: bool,
    pub uplinks: usize,
    pub close: Option<CloseReason>,
}

/// The device MQTT front end: framing in arbitrary chunks plus the connection state
/// machine, driven the way `broker::front_end` drives them.
pub fn device_mqtt(data: &[u8]) {
    device_mqtt_run(data);
}

/// [`device_mqtt`], saying how far the connection got.
pub fn device_mqtt_run(data: &[u8]) -> MqttRun {
    let mut run = MqttRun::default();
    let Some((&flags, rest)) = data.split_first() else {
        return run;
    };
    let Some((pattern, stream)) = rest.split_first_chunk::<4>() else {
        return run;
    };
    let signed = flags & 1 == 0;
    let verifier = if signed {
        Verifier::Signed {
            key: SIGNATURE_KEY.as_bytes().to_vec(),
        }
    } else {
        Verifier::Unsigned
    };
    let max_packet = if flags & 2 == 0 {
        MAX_PACKET
    } else {
        SMALL_MAX_PACKET
    };
    let settings = mqtt_settings();

    let start = Instant::now();
    let mut now = start;
    let mut conn = DeviceMqttConnection::new(&settings, now);
    let mut observer = MqttObserver {
        signed,
        authenticated: None,
        closed: false,
        expect_connack: false,
        expect_auth_close: false,
    };
    let mut rbuf = BytesMut::new();
    let mut actions = Vec::new();
    let mut framed = Vec::new();
    let mut consumed_all = true;

    'connection: for (step, chunk) in mqtt_chunks(*pattern, stream) {
        // The driver sleeps until the deadline while it waits for bytes.
        now += step;
        if conn.deadline().is_some_and(|d| now >= d) {
            conn.handle_timeout(now, &mut actions);
            observer.check(None, &actions);
            run.close = close_reason(&actions);
            assert!(
                conn.is_closed(),
                "a passed deadline must close the connection"
            );
            consumed_all = false;
            break 'connection;
        }
        rbuf.extend_from_slice(chunk);
        loop {
            let before = rbuf.len();
            let input = match Packet::read(&mut rbuf, max_packet) {
                Ok(packet) => {
                    framed.push(Framed::Packet(packet.clone()));
                    conn.handle_packet(
                        device_packet(packet.clone()),
                        now,
                        &settings,
                        &verifier,
                        &mut actions,
                    );
                    Some(packet)
                }
                Err(FrameError::InsufficientBytes(_)) => break,
                Err(e) => {
                    framed.push(Framed::Error(framing_error(&e)));
                    conn.handle_malformed(&mut actions);
                    // The bytes of a bad fixed header are not consumed: only closing
                    // keeps the driver from spinning on them.
                    assert!(
                        conn.is_closed() || rbuf.len() < before,
                        "malformed input neither consumed nor closing: the driver would spin"
                    );
                    None
                }
            };
            observer.check(input.as_ref(), &actions);
            run.uplinks += actions
                .iter()
                .filter(|a| matches!(a, Action::Uplink(_)))
                .count();
            let closing = close_reason(&actions);
            actions.clear();
            assert_eq!(conn.is_closed(), observer.closed);
            assert_eq!(conn.deadline().is_none(), conn.is_closed());
            if closing.is_some() {
                run.close = closing;
                consumed_all = false;
                break 'connection;
            }
            assert!(
                conn.deadline().is_some_and(|d| d > now),
                "an open connection's deadline is in the future"
            );
        }
    }

    // Framing does not depend on how the bytes were split.
    let whole = frame_all(stream, max_packet);
    if consumed_all {
        assert_eq!(framed, whole, "chunked framing differs from whole framing");
    } else {
        assert!(
            whole.starts_with(&framed),
            "chunked framing is not a prefix of whole framing"
        );
    }

    // A closed connection ignores everything.
    if conn.is_closed() {
        let mut out = Vec::new();
        conn.handle_packet(DevicePacket::PingReq, now, &settings, &verifier, &mut out);
        conn.handle_malformed(&mut out);
        conn.handle_timeout(now + Duration::from_secs(100_000), &mut out);
        assert!(out.is_empty(), "closed connection acted: {out:?}");
    }
    run.authenticated = observer.authenticated.is_some();
    run
}

fn close_reason(actions: &[Action]) -> Option<CloseReason> {
    actions.iter().find_map(|a| match a {
        Action::Close(reason) => Some(reason.clone()),
        _ => None,
    })
}

/// A seed input for [`device_mqtt`]: `packets` written back to back.
pub fn device_mqtt_input(flags: u8, pattern: [u8; 4], packets: &[Packet]) -> Vec<u8> {
    let mut buf = BytesMut::new();
    for p in packets {
        p.write(&mut buf, usize::MAX).expect("seed packet writes");
    }
    let mut out = vec![flags];
    out.extend_from_slice(&pattern);
    out.extend_from_slice(&buf);
    out
}

// --- device_json -----------------------------------------------------------------------

/// JSON equality that allows the last bit of a float (serde_json's default float parser
/// is not always correctly rounded, so parse -> print -> parse may move one ULP).
fn json_close(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            if x == y {
                return true;
            }
            match (x.as_f64(), y.as_f64()) {
                (Some(x), Some(y)) => (x - y).abs() <= x.abs().max(y.abs()) * 1e-12,
                _ => false,
            }
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| json_close(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| json_close(v, w)))
        }
        _ => a == b,
    }
}

/// An MCP router with one request of the gateway's and one of the speech server's in
/// flight: their ids are returned (ours, and the server's as it sent it).
fn busy_router(now: Instant) -> (McpRouter, u64, Value, u64) {
    let mut router = McpRouter::new(8);
    let (gateway_id, _) = router
        .gateway_request("tools/list", None)
        .expect("room for one request");
    let server_id = json!("server-7");
    let forwarded = router.on_upstream_payload(
        json!({"jsonrpc": "2.0", "id": server_id, "method": "tools/call", "params": {"name": "x"}}),
        now,
    );
    let ours = forwarded.to_device.expect("forwarded")["id"]
        .as_u64()
        .expect("our id");
    (router, gateway_id, server_id, ours)
}

/// A device's MQTT payload: classified the way the session manager does, answered
/// the way a conversation would, and routed through MCP when it is MCP.
pub fn device_json(data: &[u8]) {
    let parsed = control::parse_device_message(data);
    if let Ok((message, value)) = &parsed {
        let kind = value["type"]
            .as_str()
            .expect("classified without a string type");
        let session_id = value.get("session_id").and_then(Value::as_str);
        match message {
            DeviceMessage::Hello(hello) => {
                assert_eq!(kind, "hello");
                let frame = hello.audio_params.frame_duration;
                assert!((1..=120).contains(&frame), "frame_duration {frame}");
                check_hello_answers(hello);
            }
            DeviceMessage::Listen {
                session_id: s,
                mode,
                ..
            } => {
                assert_eq!(kind, "listen");
                assert_eq!(s.as_deref(), session_id);
                assert_eq!(mode.as_deref(), value.get("mode").and_then(Value::as_str));
            }
            DeviceMessage::Abort { session_id: s } | DeviceMessage::Goodbye { session_id: s } => {
                assert!(kind == "abort" || kind == "goodbye");
                assert_eq!(s.as_deref(), session_id);
            }
            DeviceMessage::Other {
                kind: k,
                session_id: s,
            } => {
                assert_eq!(k, kind);
                assert!(!matches!(kind, "hello" | "listen" | "abort" | "goodbye"));
                assert_eq!(s.as_deref(), session_id);
                if kind == "mcp"
                    && let Some(payload) = value.get("payload")
                {
                    check_mcp_from_device(payload);
                }
            }
        }
    }

    // The bus copy of anything sent to a device (the gateway's own messages, but
    // `devices/p2p/` messages from bus clients are arbitrary too).
    if let Some(redacted) = control::redact_for_bus(data) {
        let mut expected: Value =
            serde_json::from_slice(data).expect("redacted something that is not JSON");
        let copy: Value = serde_json::from_slice(&redacted).expect("redacted copy is JSON");
        assert_eq!(copy["udp"]["key"], control::REDACTED);
        expected["udp"]["key"] = json!(control::REDACTED);
        assert!(
            json_close(&expected, &copy),
            "redaction changed more than the key"
        );
    }
}

/// Our hello to the device and to the speech server carry the device's audio
/// parameters and features unchanged, and the device can read ours.
fn check_hello_answers(hello: &control::HelloRequest) {
    let offer = UdpOffer {
        server: "192.0.2.1".into(),
        port: 8884,
        key_hex: hex_of(&UDP_KEY),
        nonce_hex: hex_of(&xiaozhi_gateway::protocol::datagram::nonce_template(
            CONNECTION_ID,
        )),
        encryption: xiaozhi_gateway::protocol::encryption::Encryption::Aes128Ctr,
    };
    let ours: Value =
        serde_json::from_str(&control::server_hello("s-1", &hello.audio_params, &offer))
            .expect("server hello is JSON");
    let back: AudioParams =
        serde_json::from_value(ours["audio_params"].clone()).expect("audio params read back");
    assert_eq!(back, hello.audio_params);
    let device_view = xiaozhi_tools::simulator::audio::ServerHello::parse(&ours)
        .expect("the firmware reads our hello");
    assert_eq!(device_view.connection_id(), CONNECTION_ID);
    assert_eq!(device_view.key, UDP_KEY);

    let up: Value = serde_json::from_str(&upstream::upstream_hello(hello)).expect("upstream hello");
    let back: AudioParams =
        serde_json::from_value(up["audio_params"].clone()).expect("audio params upstream");
    assert_eq!(back, hello.audio_params);
    assert!(json_close(&up["features"], &hello.features));
}

fn hex_of(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A device's MCP payload reaches exactly the party that asked.
fn check_mcp_from_device(payload: &Value) {
    let now = Instant::now();
    let (mut router, gateway_id, server_id, ours) = busy_router(now);
    let pending = router.pending();
    match router.on_device_payload(payload.clone()) {
        DeviceReply::Gateway { id, .. } => {
            assert_eq!(id, gateway_id);
            assert_eq!(payload["id"].as_u64(), Some(gateway_id));
            assert_eq!(router.pending(), pending - 1);
        }
        DeviceReply::Upstream(relayed) => {
            assert_eq!(payload["id"].as_u64(), Some(ours));
            assert_eq!(relayed["id"], server_id, "the server's id is restored");
            assert_eq!(router.pending(), pending - 1);
        }
        DeviceReply::Unsolicited(relayed) => {
            assert_eq!(&relayed, payload);
            assert_eq!(router.pending(), pending);
        }
    }
    // A device's tools/list page, as the setup reads it.
    let mut cache = xiaozhi_gateway::protocol::mcp::ToolCache::default();
    let result = payload.get("result").unwrap_or(payload);
    let _ = cache.add_page(result, 32);
    assert!(cache.tools.len() <= 32);
    assert_eq!(
        cache.tools_value().as_array().map(Vec::len),
        Some(cache.tools.len())
    );
    assert!(cache.tool_names().len() <= cache.tools.len());
}

// --- udp_datagram ----------------------------------------------------------------------

/// The source addresses a record can come from.
fn udp_addr(selector: u8) -> SocketAddr {
    SocketAddr::from(([192, 0, 2, 1 + (selector & 3)], 40_000))
}

/// What the channel must have done so far, from the verdicts alone.
#[derive(Default)]
struct ChannelShadow {
    peer: Option<SocketAddr>,
    last_sequence: u32,
    learned_toc: Option<u8>,
    /// Addresses refused as hijack since the last accepted datagram: a rebinding
    /// needs an earlier sign from the same address.
    hijack_since_accept: HashSet<SocketAddr>,
}

/// What one [`udp_datagram`] run came to.
#[derive(Debug, Default, PartialEq)]
pub struct UdpRun {
    pub accepted: usize,
    pub rebinds: usize,
    /// Drop labels, in order.
    pub drops: Vec<&'static str>,
}

/// UDP audio: header parsing, decryption and the sequence, replay and address rules of
/// one channel over a run of datagrams, and our own downlink sealing of each payload.
pub fn udp_datagram(data: &[u8]) {
    udp_datagram_run(data);
}

/// [`udp_datagram`], saying what the channel did.
pub fn udp_datagram_run(data: &[u8]) -> UdpRun {
    let mut run = UdpRun::default();
    let cipher = PacketCipher::new(&UDP_KEY);
    let mut channel = UplinkChannel::new(cipher.clone());
    let mut sealer = DownlinkSealer::new(cipher.clone(), CONNECTION_ID);
    let mut shadow = ChannelShadow::default();
    let mut sealed_count = 0u32;
    let mut sealed = Vec::new();
    // The same records against an AES-GCM channel: raw bytes never authenticate, and
    // what a GCM device seals (records with bit 4 of `h`) is accepted exactly once.
    let gcm = GcmCipher::new(&UDP_KEY);
    let mut gcm_channel = GcmReceiver::uplink(gcm.clone(), CONNECTION_ID);
    let mut gcm_device = GcmSealer::uplink(gcm, CONNECTION_ID);
    let mut rest = data;
    while let Some((&h, after)) = rest.split_first() {
        let Some((len, after)) = after.split_first_chunk::<2>() else {
            break;
        };
        let len = usize::from(u16::from_be_bytes(*len) & 0x07ff);
        let (record, after) = after.split_at(len.min(after.len()));
        rest = after;

        let from = udp_addr(h);
        let mut datagram = record.to_vec();
        if h & 4 != 0 && datagram.len() >= HEADER_LEN {
            if h & 8 != 0 {
                datagram[0] = 1;
                let n = (datagram.len() - HEADER_LEN).min(usize::from(u16::MAX)) as u16;
                datagram[2..4].copy_from_slice(&n.to_be_bytes());
            }
            let (iv, payload) = datagram.split_at_mut(HEADER_LEN);
            let iv: [u8; HEADER_LEN] = (&*iv).try_into().expect("16 bytes");
            cipher.apply(&iv, payload);
        }
        match check_datagram(&datagram, &mut channel, &mut shadow, from, &cipher) {
            Verdict::Accept { rebound, .. } => {
                run.accepted += 1;
                run.rebinds += usize::from(rebound);
            }
            Verdict::Drop(reason) => run.drops.push(reason.label()),
        }
        let peer_before = gcm_channel.peer();
        let mut raw = datagram.clone();
        assert!(
            matches!(gcm_channel.on_datagram(&mut raw, from), Verdict::Drop(_)),
            "unsealed bytes authenticated"
        );
        assert_eq!(
            gcm_channel.peer(),
            peer_before,
            "a GCM drop moved the downlink"
        );
        if h & 16 != 0 && !record.is_empty() {
            let mut genuine = Vec::new();
            if gcm_device.seal(0, record, &mut genuine).is_ok() {
                let replay = genuine.clone();
                let Verdict::Accept { opus_len, .. } = gcm_channel.on_datagram(&mut genuine, from)
                else {
                    panic!("a sealed datagram was refused");
                };
                assert_eq!(&genuine[HEADER_LEN..HEADER_LEN + opus_len], record);
                assert_eq!(gcm_channel.peer(), Some(from));
                assert_eq!(
                    gcm_channel.on_datagram(&mut replay.clone(), from),
                    Verdict::Drop(DropReason::Replay)
                );
            }
        }

        // Every payload that parses goes back down sealed, numbered from 1.
        if let Ok(header) = Header::parse(&datagram)
            && usize::from(header.payload_len) + HEADER_LEN <= MAX_DATAGRAM_LEN
        {
            let mut plain = datagram[HEADER_LEN..].to_vec();
            let iv = header.to_bytes();
            cipher.apply(&iv, &mut plain);
            sealer
                .seal(header.timestamp, &plain, &mut sealed)
                .expect("a received payload fits a datagram");
            sealed_count += 1;
            let back = Header::parse(&sealed).expect("our datagram parses");
            assert_eq!(back.sequence, sealed_count, "downlink numbered from 1");
            assert_eq!(back.connection_id, CONNECTION_ID);
            assert_eq!(back.timestamp, header.timestamp);
            let iv = back.to_bytes();
            cipher.apply(&iv, &mut sealed[HEADER_LEN..]);
            assert_eq!(&sealed[HEADER_LEN..], &plain[..], "seal/decrypt round trip");
        }
    }
    run
}

fn check_datagram(
    datagram: &[u8],
    channel: &mut UplinkChannel,
    shadow: &mut ChannelShadow,
    from: SocketAddr,
    cipher: &PacketCipher,
) -> Verdict {
    let parsed = Header::parse(datagram);
    match parsed {
        Ok(h) => {
            assert_eq!(&h.to_bytes()[..], &datagram[..HEADER_LEN]);
            assert_eq!(usize::from(h.payload_len), datagram.len() - HEADER_LEN);
            assert!(h.payload_len > 0 && datagram.len() <= MAX_DATAGRAM_LEN);
        }
        Err(DatagramError::Truncated) => assert!(datagram.len() < HEADER_LEN),
        Err(DatagramError::Oversized) => assert!(datagram.len() > MAX_DATAGRAM_LEN),
        Err(DatagramError::WrongType(t)) => assert_eq!(datagram[0], t),
        Err(_) => {}
    }
    assert_eq!(
        Header::peek_connection_id(datagram),
        datagram
            .get(4..8)
            .map(|b| u32::from_be_bytes(b.try_into().expect("4 bytes")))
    );

    let mut buf = datagram.to_vec();
    let verdict = channel.on_datagram(&mut buf, from);
    match verdict {
        Verdict::Drop(reason) => {
            assert_eq!(channel.peer(), shadow.peer, "a drop moved the downlink");
            match reason {
                DropReason::Malformed(e) => assert_eq!(parsed, Err(e)),
                DropReason::Hijack => {
                    assert!(
                        shadow.peer != Some(from),
                        "the bound peer refused as hijack"
                    );
                    shadow.hijack_since_accept.insert(from);
                }
                DropReason::Replay => {
                    let h = parsed.expect("a replay parsed");
                    assert!(h.sequence <= shadow.last_sequence);
                }
                DropReason::Undecryptable => {
                    let payload = &buf[HEADER_LEN..];
                    assert!(opus::inspect(payload).is_none(), "refused valid Opus");
                }
                DropReason::Unauthenticated | DropReason::Stale => {
                    panic!("an AES-CTR channel gave an AES-GCM drop reason: {reason:?}")
                }
            }
        }
        Verdict::Accept {
            header,
            gap,
            rebound,
            opus_len,
        } => {
            assert_eq!(parsed, Ok(header));
            assert_eq!(opus_len, usize::from(header.payload_len));
            let sequence = header.sequence;
            assert!(sequence > shadow.last_sequence, "accepted a replay");
            let expected_gap = if shadow.last_sequence == 0 {
                sequence - 1
            } else {
                sequence - shadow.last_sequence - 1
            };
            assert_eq!(gap, expected_gap);
            let payload = &buf[HEADER_LEN..];
            let shape = opus::inspect(payload);
            if let Some(s) = shape {
                assert!(s.frames >= 1 && s.duration_us <= 120_000);
            }
            let ahead = sequence - shadow.last_sequence;
            match shadow.peer {
                None => {
                    assert!(!rebound);
                    assert!(sequence <= FIRST_BIND_MAX_SEQUENCE, "first bind too far");
                    assert!(shape.is_some(), "first bind without Opus");
                }
                Some(peer) if peer == from => {
                    assert!(!rebound);
                    assert!(
                        ahead <= REBIND_WINDOW || shape.is_some(),
                        "jumped with garbage"
                    );
                }
                Some(_) => {
                    assert!(rebound, "moved without saying so");
                    assert!(ahead <= REBIND_WINDOW, "rebound outside the window");
                    assert!(shape.is_some(), "rebound without Opus");
                    assert!(
                        shadow
                            .learned_toc
                            .is_none_or(|t| payload.first() == Some(&t)),
                        "rebound with another encoder's TOC"
                    );
                    assert!(
                        shadow.hijack_since_accept.contains(&from),
                        "rebound on the first datagram from a new address"
                    );
                }
            }
            assert_eq!(channel.peer(), Some(from));
            // Decrypted in place: encrypting again gives back the wire bytes.
            let mut again = payload.to_vec();
            cipher.apply(&header.to_bytes(), &mut again);
            assert_eq!(&again[..], &datagram[HEADER_LEN..]);

            shadow.peer = Some(from);
            shadow.last_sequence = sequence;
            if shape.is_some() {
                shadow.learned_toc = payload.first().copied();
            }
            shadow.hijack_since_accept.clear();
        }
    }
    verdict
}

/// One `udp_datagram` record.
pub fn udp_record(h: u8, bytes: &[u8]) -> Vec<u8> {
    let mut out = vec![h];
    out.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
    out.extend_from_slice(bytes);
    out
}

// --- upstream_frames -------------------------------------------------------------------

/// The speech server's WebSocket frames: text (hello, MCP, turn tracking, as the relay
/// handles them) and binary audio in both directions.
pub fn upstream_frames(data: &[u8]) {
    let Some((&kind, frame)) = data.split_first() else {
        return;
    };
    match kind % 4 {
        0 => upstream_text(&String::from_utf8_lossy(frame)),
        1 => upstream_binary(frame),
        2 => {
            let Some((ts, opus)) = frame.split_first_chunk::<4>() else {
                return;
            };
            let timestamp = u32::from_be_bytes(*ts);
            let mut out = Vec::new();
            upstream::encode_audio(timestamp, opus, &mut out);
            let decoded = upstream::decode_audio(&out).expect("our frame decodes");
            assert_eq!(decoded.timestamp, timestamp);
            assert_eq!(&out[decoded.payload], opus);
            assert_eq!(
                xiaozhi_tools::simulator::upstream::parse_uplink(&out),
                Some((timestamp, opus)),
                "the server reads our frame"
            );
        }
        _ => {
            let mut clock = upstream::UplinkClock::default();
            let mut first = None;
            for step in frame.chunks_exact(5) {
                let sequence = u32::from_be_bytes([step[0], step[1], step[2], step[3]]);
                let ms = u32::from(step[4]);
                let ts = clock.timestamp(sequence, ms);
                let first = *first.get_or_insert(sequence);
                assert_eq!(ts, sequence.wrapping_sub(first).wrapping_mul(ms));
            }
        }
    }
}

fn upstream_text(text: &str) {
    let device = AudioParams::default();
    match upstream::parse_server_hello(text, &device) {
        Ok(hello) => {
            assert!(!hello.session_id.is_empty());
            let v: Value = serde_json::from_str(text).expect("hello was JSON");
            assert_eq!(v["type"], "hello");
            assert_eq!(v["session_id"].as_str(), Some(hello.session_id.as_str()));
        }
        Err(upstream::ServerHelloError::NotJson) => {
            assert!(serde_json::from_str::<Value>(text).is_err())
        }
        Err(_) => {}
    }

    if let Ok(url) = upstream::gateway_url(text) {
        assert!(url.starts_with("ws://") || url.starts_with("wss://"));
        assert!(url.ends_with(upstream::GATEWAY_QUERY));
        assert_eq!(
            upstream::gateway_url(&url).as_ref(),
            Ok(&url),
            "not idempotent"
        );
    }

    // What the relay does with a text frame (`pipeline::xiaozhi::relay`).
    let Ok(value) = serde_json::from_str::<Value>(text) else {
        return;
    };
    let kind = value.get("type").and_then(Value::as_str).unwrap_or("");
    let state = value.get("state").and_then(Value::as_str);
    let mut turn = upstream::TurnTracker::default();
    turn.on_server_message(kind, state);
    match (kind, state) {
        ("stt", _) | ("tts", Some("start" | "sentence_start")) => assert!(turn.mid_turn()),
        _ => assert!(!turn.mid_turn()),
    }
    if kind == "mcp"
        && let Some(payload) = value.get("payload").filter(|p| p.is_object())
    {
        check_mcp_from_server(payload);
    }
}

/// A speech server's MCP payload: answered from the cache or forwarded under an id of
/// ours, and the device's answer goes back with the server's id.
fn check_mcp_from_server(payload: &Value) {
    let now = Instant::now();
    for cached in [false, true] {
        let (mut router, _, _, _) = busy_router(now);
        if cached {
            router.cache.initialize = Some(r#"{"protocolVersion":"2024-11-05"}"#.into());
            router
                .cache
                .add_page(&json!({"tools": [{"name": "t"}]}), 32);
        }
        let method = payload.get("method").and_then(Value::as_str).unwrap_or("");
        let id = payload.get("id").filter(|id| !id.is_null());
        let request = router.on_upstream_payload(payload.clone(), now);
        if let Some(answer) = &request.answer {
            assert_eq!(answer.get("id"), id, "answered with another id");
        }
        let Some(to_device) = request.to_device else {
            continue;
        };
        if method.is_empty() || id.is_none() || method == "initialize" {
            continue;
        }
        // Forwarded under an id the router allocated.
        let ours = to_device["id"].as_u64().expect("forwarded with our id");
        assert!(ours >= 10_000);
        let reply = router.on_device_payload(json!({"jsonrpc": "2.0", "id": ours, "result": {}}));
        assert_eq!(
            reply,
            DeviceReply::Upstream(json!({"jsonrpc": "2.0", "id": id, "result": {}})),
            "the device's answer goes back with the server's id"
        );
    }
}

fn upstream_binary(frame: &[u8]) {
    match upstream::decode_audio(frame) {
        Ok(decoded) => {
            let declared = u32::from_be_bytes(frame[12..16].try_into().expect("4 bytes"));
            assert_eq!(decoded.payload.start, upstream::FRAME_HEADER_LEN);
            assert_eq!(decoded.payload.len(), declared as usize);
            assert!(decoded.payload.end <= frame.len());
            let opus = &frame[decoded.payload.clone()];
            // Re-encoded the way we send uplink, it decodes to the same.
            let mut out = Vec::new();
            upstream::encode_audio(decoded.timestamp, opus, &mut out);
            let again = upstream::decode_audio(&out).expect("re-encoded frame decodes");
            assert_eq!(again.timestamp, decoded.timestamp);
            assert_eq!(&out[again.payload], opus);
        }
        Err(upstream::AudioFrameError::Short(n)) => {
            assert_eq!(n, frame.len());
            assert!(n < upstream::FRAME_HEADER_LEN);
        }
        Err(upstream::AudioFrameError::Length {
            declared,
            available,
        }) => assert!(declared as usize > available),
    }
    // The mock server's own parser agrees with ours on its frames.
    if let Some(d) = xiaozhi_tools::simulator::upstream::parse_downlink(frame) {
        let ours = upstream::decode_audio(frame).expect("a server frame decodes");
        assert_eq!(ours.timestamp, d.timestamp);
        assert_eq!(&frame[ours.payload], &d.opus[..]);
    }
}

// --- config ----------------------------------------------------------------------------

/// The config loader on an arbitrary TOML file: an error, never a panic; and a config
/// that loads must be one the service can start with.
pub fn config(data: &[u8]) {
    use figment::Figment;
    use figment::providers::{Format, Toml};
    use xiaozhi_gateway::config::Config;

    let text = String::from_utf8_lossy(data);
    let Ok(config) = Config::from_figment(Figment::from(Toml::string(&text))) else {
        return;
    };
    config.validate().expect("from_figment validated it");
    let _ = config.warnings();
    let _ = config.pipeline_kind();
    let _ = config.device_tls();
    let _ = config.udp_idle_timeout();
    let _ = xiaozhi_gateway::config::redact_url(&config.history.database_url);
    for url in &config.pipeline.xiaozhi.urls {
        upstream::gateway_url(url).expect("validated URL");
    }

    // What `server.rs` builds from it for every device connection, and the first
    // minutes of one that connects with keep-alive 0 (the configured default applies).
    let settings = DeviceMqttSettings {
        connect_timeout: Duration::from_secs(config.mqtt.connect_timeout_secs),
        default_keep_alive: Duration::from_secs(config.mqtt.default_keep_alive_secs),
        uplink_topic: config.mqtt.uplink_topic.clone(),
    };
    let verifier = config.verifier();
    let now = Instant::now();
    let mut conn = DeviceMqttConnection::new(&settings, now);
    let mut out = Vec::new();
    let mac = xiaozhi_gateway::protocol::mac::Mac::from_octets([2, 0x5a, 0, 0, 0, 1]);
    let client_id = format!("GID_test@@@{mac}@@@{mac}");
    let username = credentials::username_for_ip("192.0.2.10");
    let password = match &config.auth.signature_key {
        Some(key) => credentials::sign(key.as_bytes(), &client_id, &username),
        None => "unsigned".to_owned(),
    };
    let mut connect = rumqttc::mqttbytes::v4::Connect::new(client_id);
    connect.keep_alive = 0;
    connect.login = Some(rumqttc::mqttbytes::v4::Login::new(username, password));
    conn.handle_packet(
        device_packet(Packet::Connect(connect)),
        now,
        &settings,
        &verifier,
        &mut out,
    );
    assert!(
        matches!(out.first(), Some(Action::Authenticated { .. })),
        "a device with valid credentials is refused: {out:?}"
    );
    conn.handle_packet(DevicePacket::PingReq, now, &settings, &verifier, &mut out);
    let _ = conn.deadline();
}

// --- history_query ---------------------------------------------------------------------

/// The history API's query strings and path parameters, through the checks every
/// handler makes before it touches the database.
pub fn history_query(data: &[u8]) {
    use xiaozhi_gateway::http::history::{self, Endpoint};

    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let endpoint = Endpoint::ALL[usize::from(selector) % Endpoint::ALL.len()];
    let (path, query) = match rest.iter().position(|&b| b == b'\n') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    // Axum hands handlers percent-decoded UTF-8 path parameters.
    let path = String::from_utf8_lossy(path);
    let Ok(uri) = axum::http::Uri::try_from(format!("/api/history/x?{}", escape_query(query)))
    else {
        return;
    };
    let today = time::Date::from_calendar_date(2025, time::Month::June, 15).expect("a date");
    let Ok(checked) = history::check_input(endpoint, &path, &uri, today) else {
        return;
    };
    let int = |name: &str| checked.get(name).and_then(Value::as_i64);
    if let Some(limit) = int("limit") {
        assert!((1..=history::MAX_LIMIT).contains(&limit), "limit {limit}");
    }
    for name in ["offset", "after_id"] {
        if let Some(n) = int(name) {
            assert!(n >= 0, "{name} {n}");
        }
    }
    if let Some(top) = int("top") {
        assert!((1..=history::MAX_TOP).contains(&top));
    }
    if let Some(q) = checked.get("q").and_then(Value::as_str) {
        let n = q.chars().count();
        assert!(
            (1..=history::MAX_SEARCH_TERM).contains(&n),
            "q of {n} characters"
        );
    }
    if let Some(days) = checked.get("days").and_then(Value::as_array) {
        assert!(!days.is_empty() && days.len() as i64 <= history::MAX_STATS_DAYS);
        assert_eq!(days.first().map(|d| &d["day"]), Some(&checked["from"]));
        assert_eq!(days.last().map(|d| &d["day"]), Some(&checked["to"]));
        let start = checked["start"].as_str().expect("start");
        let end = checked["end"].as_str().expect("end");
        assert!(start < end, "empty time range {start}..{end}");
    }
    if let Some(disposition) = checked.get("disposition").and_then(Value::as_str) {
        axum::http::HeaderValue::from_str(disposition).expect("a header value");
        let from = checked["from"].as_str().expect("from");
        let until = checked["until"].as_str().expect("until");
        assert!(from < until, "empty export range {from}..{until}");
    }
    if let Some(mac) = checked.get("mac").and_then(Value::as_str) {
        assert!(mac.parse::<xiaozhi_gateway::protocol::mac::Mac>().is_ok());
    }
    if matches!(endpoint, Endpoint::Messages | Endpoint::Audio) {
        assert!(!path.is_empty());
    }
}

/// Percent-encodes the bytes a URI query cannot hold, so that every input reaches the
/// parser (a client's library does the same); `%` stays, so the fuzzer writes escapes,
/// valid or not, itself.
pub fn escape_query(query: &[u8]) -> String {
    let mut out = String::with_capacity(query.len());
    for &b in query {
        if b.is_ascii_graphic() && b != b'#' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
