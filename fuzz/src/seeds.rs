//! The generated part of the seed corpora in `fuzz/seeds/<target>/`: realistic inputs
//! built with the gateway's own code (real device credentials signed with
//! [`SIGNATURE_KEY`], datagrams encrypted the way the firmware does, the server's binary
//! frame layouts), so that the fuzzer starts from the states that matter: an
//! authenticated device, a bound audio channel, a running conversation.
//!
//! `tests/it/fuzz_regressions.rs` checks that the committed files match this list, and
//! rewrites them when run with `XZ_WRITE_SEEDS=1`. Hand-written seeds (the config files,
//! for instance) live beside these and are not checked against anything.

use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{
    Connect, Login, Packet, PubAck, Publish, Subscribe, SubscribeFilter, Unsubscribe,
};
use serde_json::json;

use xiaozhi_gateway::protocol::audio_channel::DownlinkSealer;
use xiaozhi_gateway::protocol::cipher::PacketCipher;
use xiaozhi_gateway::protocol::control::{self, AudioParams, UdpOffer};
use xiaozhi_gateway::protocol::datagram::Header;
use xiaozhi_gateway::protocol::mac::Mac;
use xiaozhi_gateway::protocol::mcp::{self, McpRouter};
use xiaozhi_gateway::protocol::upstream;
use xiaozhi_tools::simulator::device::{DeviceCredentials, SimDevice};

use crate::harness::{
    CONNECTION_ID, SIGNATURE_KEY, UDP_KEY, UPLINK_TOPIC, device_mqtt_input, udp_record,
};

/// One seed file: target, file name, bytes.
pub struct Seed {
    pub target: &'static str,
    pub name: &'static str,
    pub bytes: Vec<u8>,
}

fn seed(target: &'static str, name: &'static str, bytes: impl Into<Vec<u8>>) -> Seed {
    Seed {
        target,
        name,
        bytes: bytes.into(),
    }
}

/// Every generated seed.
pub fn all() -> Vec<Seed> {
    let mut seeds = Vec::new();
    seeds.extend(device_mqtt());
    seeds.extend(device_json());
    seeds.extend(udp_datagram());
    seeds.extend(upstream_frames());
    seeds.extend(history_query());
    seeds
}

/// The simulator's first device, signed the way manager-api signs.
pub fn credentials() -> DeviceCredentials {
    DeviceCredentials::for_mac(
        DeviceCredentials::nth_mac(1),
        "GID_test",
        Some(SIGNATURE_KEY.as_bytes()),
    )
}

fn connect(creds: &DeviceCredentials, keep_alive: u16, password: Option<&str>) -> Packet {
    let mut c = Connect::new(creds.client_id.clone());
    c.keep_alive = keep_alive;
    c.login = Some(Login::new(
        creds.username.clone(),
        password.unwrap_or(&creds.password).to_owned(),
    ));
    Packet::Connect(c)
}

fn publish(payload: &serde_json::Value, qos: QoS, pkid: u16) -> Packet {
    let mut p = Publish::new(UPLINK_TOPIC, qos, payload.to_string().into_bytes());
    p.pkid = pkid;
    Packet::Publish(p)
}

/// Chunking patterns: (whole 64-byte reads, no time), (1, 6, 2 and 17 bytes with a
/// second between some), (three 64-byte reads at once, then 200 s: the keep-alive
/// runs out).
const WHOLE: [u8; 4] = [0x3f; 4];
const RAGGED: [u8; 4] = [0x00, 0x05, 0x41, 0x10];
const SLOW: [u8; 4] = [0x3f, 0x3f, 0x3f, 0xff];

fn device_mqtt() -> Vec<Seed> {
    let creds = credentials();
    let hello = SimDevice::firmware_hello();
    let conversation = vec![
        connect(&creds, 60, None),
        publish(&hello, QoS::AtMostOnce, 0),
        publish(
            &json!({"session_id": "s-1", "type": "listen", "state": "start", "mode": "auto"}),
            QoS::AtMostOnce,
            0,
        ),
        Packet::PingReq,
        Packet::Subscribe(Subscribe::new_many([
            SubscribeFilter::new(
                xiaozhi_gateway::protocol::topics::p2p(&creds.mac),
                QoS::AtLeastOnce,
            ),
            SubscribeFilter::new("#".into(), QoS::AtMostOnce),
        ])),
        publish(
            &json!({"session_id": "s-1", "type": "mcp", "payload": {"jsonrpc": "2.0", "id": 10000, "result": {"tools": []}}}),
            QoS::AtLeastOnce,
            7,
        ),
        Packet::Unsubscribe(Unsubscribe::new("#")),
        Packet::PubAck(PubAck::new(3)),
        publish(
            &json!({"session_id": "s-1", "type": "goodbye"}),
            QoS::AtMostOnce,
            0,
        ),
        Packet::Disconnect,
    ];
    let mut foreign = Publish::new("devices/p2p/aa_bb_cc_dd_ee_ff", QoS::AtMostOnce, "{}");
    foreign.pkid = 0;
    let mut qos2 = Publish::new(UPLINK_TOPIC, QoS::ExactlyOnce, "{}");
    qos2.pkid = 9;
    let big = Publish::new(UPLINK_TOPIC, QoS::AtMostOnce, vec![b' '; 600]);
    let unsigned_creds =
        DeviceCredentials::for_mac(Mac::from_octets([2, 0, 0, 0, 0, 2]), "GID_test", None);
    vec![
        seed(
            "device_mqtt",
            "conversation",
            device_mqtt_input(0, WHOLE, &conversation),
        ),
        seed(
            "device_mqtt",
            "conversation-ragged",
            device_mqtt_input(0, RAGGED, &conversation),
        ),
        seed(
            "device_mqtt",
            "unsigned",
            device_mqtt_input(
                1,
                WHOLE,
                &[
                    connect(&unsigned_creds, 0, None),
                    publish(&hello, QoS::AtMostOnce, 0),
                ],
            ),
        ),
        seed(
            "device_mqtt",
            "bad-password",
            device_mqtt_input(0, WHOLE, &[connect(&creds, 60, Some("d3Jvbmc="))]),
        ),
        seed(
            "device_mqtt",
            "keep-alive-runs-out",
            device_mqtt_input(
                0,
                SLOW,
                &[
                    connect(&creds, 60, None),
                    publish(&hello, QoS::AtMostOnce, 0),
                    Packet::PingReq,
                    Packet::PingReq,
                ],
            ),
        ),
        seed(
            "device_mqtt",
            "ping-first",
            device_mqtt_input(0, WHOLE, &[Packet::PingReq]),
        ),
        seed(
            "device_mqtt",
            "foreign-topic-then-qos2",
            device_mqtt_input(
                0,
                RAGGED,
                &[
                    connect(&creds, 30, None),
                    Packet::Publish(foreign),
                    Packet::Publish(qos2),
                ],
            ),
        ),
        seed(
            "device_mqtt",
            "oversized",
            device_mqtt_input(2, WHOLE, &[connect(&creds, 60, None), Packet::Publish(big)]),
        ),
    ]
}

fn device_json() -> Vec<Seed> {
    let udp = UdpOffer {
        server: "192.0.2.1".into(),
        port: 8884,
        key_hex: "00112233445566778899aabbccddeeff".into(),
        nonce_hex: "01000000123456780000000000000000".into(),
        encryption: xiaozhi_gateway::protocol::encryption::Encryption::Aes128Ctr,
    };
    let mut router = McpRouter::new(8);
    let (_, initialize) = router
        .gateway_request(
            "initialize",
            Some(mcp::initialize_params("xiaozhi-gateway", "0.1.0")),
        )
        .expect("room");
    let text = |v: serde_json::Value| v.to_string().into_bytes();
    vec![
        seed("device_json", "hello", text(SimDevice::firmware_hello())),
        seed(
            "device_json",
            "listen-start",
            text(json!({"session_id": "s-1", "type": "listen", "state": "start", "mode": "auto"})),
        ),
        seed(
            "device_json",
            "listen-detect",
            text(
                json!({"session_id": "s-1", "type": "listen", "state": "detect", "text": "你好小智"}),
            ),
        ),
        seed(
            "device_json",
            "listen-stop",
            text(json!({"session_id": "s-1", "type": "listen", "state": "stop"})),
        ),
        seed(
            "device_json",
            "abort",
            text(json!({"session_id": "s-1", "type": "abort", "reason": "wake_word_detected"})),
        ),
        seed(
            "device_json",
            "goodbye",
            text(json!({"session_id": "s-1", "type": "goodbye"})),
        ),
        seed(
            "device_json",
            "mcp-tools-page",
            text(
                json!({"session_id": "s-1", "type": "mcp", "payload": {"jsonrpc": "2.0", "id": 10000, "result": {"tools": [
                {"name": "self.get_device_status", "description": "Status", "inputSchema": {"type": "object", "properties": {}}},
                {"name": "self.audio_speaker.set_volume", "inputSchema": {"type": "object", "properties": {"volume": {"type": "integer", "minimum": 0, "maximum": 100}}, "required": ["volume"]}}
            ], "nextCursor": "c1"}}}),
            ),
        ),
        seed(
            "device_json",
            "mcp-error",
            text(
                json!({"type": "mcp", "payload": {"jsonrpc": "2.0", "id": 10001, "error": {"code": -32601, "message": "no such tool"}}}),
            ),
        ),
        seed(
            "device_json",
            "mcp-notification",
            text(
                json!({"type": "mcp", "payload": {"jsonrpc": "2.0", "method": "notifications/state_changed", "params": {"state": "idle"}}}),
            ),
        ),
        seed(
            "device_json",
            "iot",
            text(
                json!({"session_id": "s-1", "type": "iot", "update": true, "states": [{"name": "Speaker", "state": {"volume": 80}}]}),
            ),
        ),
        seed(
            "device_json",
            "server-hello",
            control::server_hello("s-1", &AudioParams::default(), &udp).into_bytes(),
        ),
        seed(
            "device_json",
            "gateway-mcp-initialize",
            mcp::device_message(&initialize, Some("s-1")).into_bytes(),
        ),
        seed(
            "device_json",
            "tts-start",
            control::tts("s-1", "sentence_start", Some("好的")).into_bytes(),
        ),
    ]
}

fn udp_datagram() -> Vec<Seed> {
    // The firmware's encoder: SILK wideband 60 ms, one frame.
    let opus = |seq: u8| [11 << 3, seq, 0xaa, 0xbb, 0xcc, 0xdd];
    let plain = |seq: u32, payload: &[u8]| {
        let mut d = Header {
            flags: 0,
            payload_len: payload.len() as u16,
            connection_id: CONNECTION_ID,
            timestamp: seq * 60,
            sequence: seq,
        }
        .to_bytes()
        .to_vec();
        d.extend_from_slice(payload);
        d
    };
    // Encrypted on the device's side, as it goes on the wire.
    let wire = |seq: u32, payload: &[u8]| {
        let mut sealer = DownlinkSealer::new(PacketCipher::new(&UDP_KEY), CONNECTION_ID);
        let mut out = Vec::new();
        for _ in 1..seq {
            sealer.seal(0, payload, &mut out).expect("fits");
        }
        sealer.seal(seq * 60, payload, &mut out).expect("fits");
        out
    };
    const SEAL: u8 = 4 | 8;
    let records = |rs: &[Vec<u8>]| rs.concat();
    vec![
        seed(
            "udp_datagram",
            "stream",
            records(&[
                udp_record(SEAL, &plain(1, &opus(1))),
                udp_record(SEAL, &plain(2, &opus(2))),
                udp_record(SEAL, &plain(4, &opus(4))),
                udp_record(SEAL, &plain(4, &opus(4))),
                udp_record(SEAL, &plain(3, &opus(3))),
            ]),
        ),
        seed(
            "udp_datagram",
            "nat-rebinding",
            records(&[
                udp_record(SEAL, &plain(1, &opus(1))),
                udp_record(SEAL | 1, &plain(3, &opus(3))),
                udp_record(SEAL | 1, &plain(4, &opus(4))),
                udp_record(SEAL, &plain(5, &opus(5))),
            ]),
        ),
        seed(
            "udp_datagram",
            "on-the-wire",
            records(&[
                udp_record(0, &wire(1, &opus(1))),
                udp_record(0, &wire(2, &opus(2))),
                udp_record(2, &wire(3, &opus(3))),
            ]),
        ),
        seed(
            "udp_datagram",
            "malformed",
            records(&[
                udp_record(0, &[1, 0, 0, 4, 0, 0, 0, 1]),
                udp_record(0, &plain(1, &[])),
                udp_record(0, &[2; 20]),
                udp_record(SEAL, &plain(300, &opus(1))),
                udp_record(SEAL, &plain(1, &[(11 << 3) | 3, 0])),
            ]),
        ),
    ]
}

fn upstream_frames() -> Vec<Seed> {
    let text = |v: serde_json::Value| {
        let mut out = vec![0];
        out.extend_from_slice(v.to_string().as_bytes());
        out
    };
    let binary = |frame: Vec<u8>| {
        let mut out = vec![1];
        out.extend_from_slice(&frame);
        out
    };
    let opus = [11 << 3, 1, 2, 3, 4];
    // xiaozhi-server's binary protocol version 2: version u16, type u16, reserved u32,
    // timestamp u32, payload size u32, payload.
    let mut v2 = vec![0, 2, 0, 0, 0, 0, 0, 0];
    v2.extend_from_slice(&960u32.to_be_bytes());
    v2.extend_from_slice(&(opus.len() as u32).to_be_bytes());
    v2.extend_from_slice(&opus);
    // Version 3: type u8, reserved u8, payload size u16, payload (not what the gateway
    // negotiates; it must be refused or read harmlessly).
    let mut v3 = vec![0, 0];
    v3.extend_from_slice(&(opus.len() as u16).to_be_bytes());
    v3.extend_from_slice(&opus);
    let mut uplink = vec![2];
    uplink.extend_from_slice(&120u32.to_be_bytes());
    uplink.extend_from_slice(&opus);
    let mut clock = vec![3];
    for (seq, ms) in [(7u32, 60u8), (8, 60), (10, 60), (u32::MAX, 60), (0, 255)] {
        clock.extend_from_slice(&seq.to_be_bytes());
        clock.push(ms);
    }
    let mut url = vec![0];
    url.extend_from_slice(b"ws://127.0.0.1:8000/xiaozhi/v1/");
    vec![
        seed(
            "upstream_frames",
            "hello",
            text(
                json!({"type": "hello", "version": 1, "transport": "websocket", "session_id": "3f1c", "audio_params": {"format": "opus", "sample_rate": 24000, "channels": 1, "frame_duration": 60}}),
            ),
        ),
        seed(
            "upstream_frames",
            "stt",
            text(json!({"type": "stt", "text": "今天天气怎么样", "session_id": "3f1c"})),
        ),
        seed(
            "upstream_frames",
            "llm-emotion",
            text(json!({"type": "llm", "text": "😊", "emotion": "happy", "session_id": "3f1c"})),
        ),
        seed(
            "upstream_frames",
            "tts-sentence",
            text(
                json!({"type": "tts", "state": "sentence_start", "text": "今天晴。", "session_id": "3f1c"}),
            ),
        ),
        seed(
            "upstream_frames",
            "tts-stop",
            text(json!({"type": "tts", "state": "stop", "session_id": "3f1c"})),
        ),
        seed(
            "upstream_frames",
            "mcp-tools-call",
            text(
                json!({"type": "mcp", "session_id": "3f1c", "payload": {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "self.audio_speaker.set_volume", "arguments": {"volume": 50}}}}),
            ),
        ),
        seed(
            "upstream_frames",
            "mcp-initialize",
            text(
                json!({"type": "mcp", "session_id": "3f1c", "payload": {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"protocolVersion": mcp::PROTOCOL_VERSION, "capabilities": {"vision": {"url": "http://192.0.2.1/vision", "token": "t"}}}}}),
            ),
        ),
        seed(
            "upstream_frames",
            "mcp-tools-list",
            text(
                json!({"type": "mcp", "session_id": "3f1c", "payload": {"jsonrpc": "2.0", "id": 3, "method": "tools/list", "params": {"cursor": ""}}}),
            ),
        ),
        seed(
            "upstream_frames",
            "mcp-initialized",
            text(
                json!({"type": "mcp", "session_id": "3f1c", "payload": {"jsonrpc": "2.0", "method": "notifications/initialized"}}),
            ),
        ),
        seed("upstream_frames", "url", url),
        seed("upstream_frames", "binary-v2", binary(v2)),
        seed("upstream_frames", "binary-v3", binary(v3)),
        seed(
            "upstream_frames",
            "binary-node-layout",
            binary(xiaozhi_tools::simulator::upstream::encode_downlink(
                9, 540, &opus,
            )),
        ),
        seed("upstream_frames", "binary-lying-length", {
            let mut f = vec![0u8; 16];
            f[15] = 200;
            binary(f)
        }),
        seed("upstream_frames", "uplink", uplink),
        seed("upstream_frames", "uplink-clock", clock),
        seed(
            "upstream_frames",
            "token-shaped",
            text(json!(upstream::token(
                b"server-secret",
                "aa_bb_cc_dd_ee_ff",
                "aa:bb:cc:dd:ee:ff",
                1_700_000_000
            ))),
        ),
    ]
}

fn history_query() -> Vec<Seed> {
    use xiaozhi_gateway::history::query::SessionCursor;
    use xiaozhi_gateway::http::history::Endpoint;
    let q = |endpoint: Endpoint, path: &str, query: &str| {
        let index = Endpoint::ALL
            .iter()
            .position(|e| *e == endpoint)
            .expect("listed") as u8;
        let mut out = vec![index];
        out.extend_from_slice(path.as_bytes());
        out.push(b'\n');
        out.extend_from_slice(query.as_bytes());
        out
    };
    let cursor = SessionCursor {
        started_at: "2025-06-01 12:00:00.000".into(),
        session_id: "3f1c-77".into(),
    }
    .encode();
    vec![
        seed(
            "history_query",
            "devices",
            q(Endpoint::Devices, "", "limit=10&offset=20"),
        ),
        seed(
            "history_query",
            "sessions",
            q(
                Endpoint::Sessions,
                "02:5a:00:00:00:01",
                &format!("limit=5&before={cursor}"),
            ),
        ),
        seed(
            "history_query",
            "messages",
            q(Endpoint::Messages, "3f1c-77", "limit=50&after_id=10"),
        ),
        seed(
            "history_query",
            "audio",
            q(Endpoint::Audio, "0123456789abcdef0123456789abcdef", ""),
        ),
        seed(
            "history_query",
            "device-stats",
            q(
                Endpoint::DeviceStats,
                "02_5a_00_00_00_01",
                "from=2025-01-01&to=2025-01-31",
            ),
        ),
        seed(
            "history_query",
            "fleet-stats",
            q(
                Endpoint::FleetStats,
                "",
                "from=2024-02-27&to=2024-03-01&top=5",
            ),
        ),
        seed(
            "history_query",
            "search",
            q(
                Endpoint::Search,
                "",
                "q=%E5%A4%A9%E6%B0%94+today&mac=02:5a:00:00:00:01&limit=20&after_id=0",
            ),
        ),
        seed(
            "history_query",
            "export",
            q(
                Endpoint::Export,
                "",
                "format=jsonl&mac=02_5a_00_00_00_01&from=2025-01-01&to=9999-12-31",
            ),
        ),
        seed(
            "history_query",
            "device-view",
            q(
                Endpoint::DeviceView,
                "GID_test@@@02_5a_00_00_00_01@@@02_5a_00_00_00_01",
                "",
            ),
        ),
    ]
}
