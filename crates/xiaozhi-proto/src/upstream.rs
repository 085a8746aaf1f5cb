//! The gateway's side of the xiaozhi-server WebSocket protocol (PROTOCOL.md section 6).
//!
//! One WebSocket per conversation, opened to `<url>?from=mqtt_gateway` so the server
//! expects gateway framing. This module holds the pure parts: the URL, the request
//! headers and their HMAC token, the hello translation in both directions and the
//! 16-byte binary audio framing. The I/O lives in `xiaozhi_gateway::pipeline::xiaozhi`.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac as _};
use serde_json::{Value, json};
use sha2::Sha256;

use super::control::{AudioParams, HelloRequest};
use super::credentials::DeviceIdentity;

/// The query xiaozhi-server looks for (it checks that the request path *ends* with it).
pub const GATEWAY_QUERY: &str = "?from=mqtt_gateway";

/// Bytes before the Opus payload in every binary frame, both directions.
pub const FRAME_HEADER_LEN: usize = 16;

/// Why a configured upstream URL cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamUrlError {
    #[error("must start with ws:// or wss://")]
    Scheme,
    #[error("has no host")]
    NoHost,
    #[error(
        "has a query other than {GATEWAY_QUERY}; xiaozhi-server only recognises the gateway when the URL ends with it"
    )]
    Query,
}

/// The URL to connect to: the configured one with [`GATEWAY_QUERY`] appended (kept if it
/// is already there).
pub fn gateway_url(base: &str) -> Result<String, UpstreamUrlError> {
    let base = base.trim();
    let rest = base
        .strip_prefix("ws://")
        .or_else(|| base.strip_prefix("wss://"))
        .ok_or(UpstreamUrlError::Scheme)?;
    if rest.is_empty() || rest.starts_with('/') || rest.starts_with('?') {
        return Err(UpstreamUrlError::NoHost);
    }
    if base.ends_with(GATEWAY_QUERY) {
        return Ok(base.to_owned());
    }
    if base.contains('?') {
        return Err(UpstreamUrlError::Query);
    }
    Ok(format!("{base}{GATEWAY_QUERY}"))
}

/// `Authorization` token: base64url-without-padding(HMAC-SHA256(secret,
/// `client_id|device_id|unix_secs`)) + "." + unix_secs, as xiaozhi-server's `AuthManager`
/// verifies it.
pub fn token(secret: &[u8], client_id: &str, device_id: &str, unix_secs: u64) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(client_id.as_bytes());
    mac.update(b"|");
    mac.update(device_id.as_bytes());
    mac.update(b"|");
    mac.update(unix_secs.to_string().as_bytes());
    let signature = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    format!("{signature}.{unix_secs}")
}

/// The request headers for one conversation, in the order the Node gateway sends them.
/// `device-id` is the MAC with colons, `client-id` the third part of the MQTT client id.
pub fn request_headers(
    device: &DeviceIdentity,
    secret: Option<&[u8]>,
    unix_secs: u64,
    device_ip: Option<std::net::IpAddr>,
) -> Vec<(&'static str, String)> {
    let device_id = device.mac.colon();
    let mut headers = vec![
        ("device-id", device_id.clone()),
        ("client-id", device.uuid.clone()),
        ("protocol-version", "2".to_owned()),
    ];
    if let Some(secret) = secret {
        let token = token(secret, &device.uuid, &device_id, unix_secs);
        headers.push(("authorization", format!("Bearer {token}")));
    }
    if let Some(ip) = device_ip {
        headers.push(("x-forwarded-for", ip.to_string()));
    }
    headers
}

/// The hello the gateway sends when the WebSocket opens: the device's audio parameters
/// and features, in the server's WebSocket dialect (version 2).
pub fn upstream_hello(device: &HelloRequest) -> String {
    json!({
        "type": "hello",
        "version": 2,
        "transport": "websocket",
        "audio_params": device.audio_params,
        "features": device.features,
    })
    .to_string()
}

/// What the gateway needs from the server's hello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerHello {
    pub session_id: String,
    /// Downlink audio parameters (the device's own when the server names none).
    pub audio_params: AudioParams,
}

/// Why a server text frame is not a usable hello.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServerHelloError {
    #[error("the speech server's first message is not JSON")]
    NotJson,
    #[error("the speech server answered with {0:?} instead of hello")]
    NotHello(String),
    #[error("the speech server's hello has no session_id")]
    NoSessionId,
    #[error("the speech server's hello has invalid audio_params: {0}")]
    BadAudioParams(String),
}

/// Parses the server's hello; `device` supplies audio parameters the server omits.
pub fn parse_server_hello(
    text: &str,
    device: &AudioParams,
) -> Result<ServerHello, ServerHelloError> {
    let value: Value = serde_json::from_str(text).map_err(|_| ServerHelloError::NotJson)?;
    let kind = value.get("type").and_then(Value::as_str).unwrap_or("");
    if kind != "hello" {
        return Err(ServerHelloError::NotHello(kind.to_owned()));
    }
    let session_id = value
        .get("session_id")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or(ServerHelloError::NoSessionId)?
        .to_owned();
    let audio_params = match value.get("audio_params") {
        None | Some(Value::Null) => device.clone(),
        Some(v) => serde_json::from_value(v.clone())
            .map_err(|e| ServerHelloError::BadAudioParams(e.to_string()))?,
    };
    Ok(ServerHello {
        session_id,
        audio_params,
    })
}

/// Writes one uplink binary frame: bytes 8-11 timestamp, 12-15 payload length, the rest
/// of the header zero (exactly what the Node gateway sends), then the Opus payload.
pub fn encode_audio(timestamp: u32, opus: &[u8], out: &mut Vec<u8>) {
    out.clear();
    out.reserve(FRAME_HEADER_LEN + opus.len());
    out.extend_from_slice(&[0; 8]);
    out.extend_from_slice(&timestamp.to_be_bytes());
    out.extend_from_slice(&(opus.len() as u32).to_be_bytes());
    out.extend_from_slice(opus);
}

/// Why a downlink binary frame was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AudioFrameError {
    #[error("binary frame of {0} bytes is shorter than the 16-byte header")]
    Short(usize),
    #[error("header says {declared} payload bytes but {available} follow")]
    Length { declared: u32, available: usize },
}

/// A downlink frame from the server: its timestamp and the Opus payload (a range of the
/// frame, so no copy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AudioFrame {
    pub timestamp: u32,
    pub payload: std::ops::Range<usize>,
}

/// Parses a server binary frame (bytes 8-11 timestamp, 12-15 payload length).
pub fn decode_audio(frame: &[u8]) -> Result<AudioFrame, AudioFrameError> {
    if frame.len() < FRAME_HEADER_LEN {
        return Err(AudioFrameError::Short(frame.len()));
    }
    let timestamp = u32::from_be_bytes(frame[8..12].try_into().expect("4 bytes"));
    let declared = u32::from_be_bytes(frame[12..16].try_into().expect("4 bytes"));
    let available = frame.len() - FRAME_HEADER_LEN;
    if declared as usize > available {
        return Err(AudioFrameError::Length {
            declared,
            available,
        });
    }
    Ok(AudioFrame {
        timestamp,
        payload: FRAME_HEADER_LEN..FRAME_HEADER_LEN + declared as usize,
    })
}

/// Uplink timestamps: the firmware's header timestamp is not a media clock, so (like the
/// Node gateway) the gateway numbers frames from the first sequence it relays, at the
/// frame duration.
#[derive(Debug, Clone, Copy, Default)]
pub struct UplinkClock {
    first_sequence: Option<u32>,
}

impl UplinkClock {
    pub fn timestamp(&mut self, sequence: u32, frame_ms: u32) -> u32 {
        let first = *self.first_sequence.get_or_insert(sequence);
        sequence.wrapping_sub(first).wrapping_mul(frame_ms)
    }
}

/// Where the server is in the current turn, from the text frames it sends. A close
/// while a reply is owed is a failure the device must hear about.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TurnTracker {
    reply_owed: bool,
}

impl TurnTracker {
    /// Observes a server text frame's `type` and `state`.
    pub fn on_server_message(&mut self, kind: &str, state: Option<&str>) {
        match (kind, state) {
            ("stt", _) | ("tts", Some("start")) | ("tts", Some("sentence_start")) => {
                self.reply_owed = true
            }
            ("tts", Some("stop")) => self.reply_owed = false,
            _ => {}
        }
    }

    /// The device stopped talking (manual mode): a reply is owed from now on.
    pub fn on_listen_stop(&mut self) {
        self.reply_owed = true;
    }

    /// The device aborted the reply.
    pub fn on_abort(&mut self) {
        self.reply_owed = false;
    }

    pub fn mid_turn(&self) -> bool {
        self.reply_owed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::credentials::parse_client_id;

    #[test]
    fn token_matches_the_protocol_vector() {
        assert_eq!(
            token(
                b"server-secret",
                "aa_bb_cc_dd_ee_ff",
                "aa:bb:cc:dd:ee:ff",
                1_700_000_000
            ),
            "fy4JL2L2_XXB02AyGRKsU0uu9ypadGv9bTmmBwfU6lk.1700000000"
        );
    }

    #[test]
    fn headers_name_the_device_like_the_node_gateway() {
        let device = parse_client_id("GID_test@@@aa_bb_cc_dd_ee_ff@@@aa_bb_cc_dd_ee_ff").unwrap();
        let headers = request_headers(
            &device,
            Some(b"server-secret"),
            1_700_000_000,
            Some("192.0.2.10".parse().unwrap()),
        );
        let get = |k| {
            headers
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(get("device-id"), Some("aa:bb:cc:dd:ee:ff"));
        assert_eq!(get("client-id"), Some("aa_bb_cc_dd_ee_ff"));
        assert_eq!(get("protocol-version"), Some("2"));
        assert_eq!(
            get("authorization"),
            Some("Bearer fy4JL2L2_XXB02AyGRKsU0uu9ypadGv9bTmmBwfU6lk.1700000000")
        );
        assert_eq!(get("x-forwarded-for"), Some("192.0.2.10"));
        let unsigned = request_headers(&device, None, 0, None);
        assert!(
            unsigned
                .iter()
                .all(|(n, _)| *n != "authorization" && *n != "x-forwarded-for")
        );
    }

    #[test]
    fn urls_get_the_gateway_query_once() {
        assert_eq!(
            gateway_url("ws://h:8000/xiaozhi/v1/").unwrap(),
            "ws://h:8000/xiaozhi/v1/?from=mqtt_gateway"
        );
        assert_eq!(
            gateway_url("wss://h/xiaozhi/v1/?from=mqtt_gateway").unwrap(),
            "wss://h/xiaozhi/v1/?from=mqtt_gateway"
        );
        assert_eq!(gateway_url("http://h/"), Err(UpstreamUrlError::Scheme));
        assert_eq!(gateway_url("ws:///x"), Err(UpstreamUrlError::NoHost));
        assert_eq!(gateway_url("ws://h/?a=b"), Err(UpstreamUrlError::Query));
    }

    #[test]
    fn hello_translation_both_ways() {
        let device = HelloRequest {
            version: 3,
            transport: "udp".into(),
            audio_params: AudioParams::default(),
            features: json!({"mcp": true, "aec": false}),
        };
        let up: Value = serde_json::from_str(&upstream_hello(&device)).unwrap();
        assert_eq!(up["version"], 2);
        assert_eq!(up["transport"], "websocket");
        assert_eq!(up["audio_params"]["sample_rate"], 16000);
        assert_eq!(up["features"]["mcp"], true);

        let reply = r#"{"type":"hello","transport":"websocket","session_id":"s-1","audio_params":{"format":"opus","sample_rate":24000,"channels":1,"frame_duration":60}}"#;
        let hello = parse_server_hello(reply, &device.audio_params).unwrap();
        assert_eq!(hello.session_id, "s-1");
        assert_eq!(hello.audio_params.sample_rate, 24000);
        let bare = parse_server_hello(
            r#"{"type":"hello","session_id":"s-2"}"#,
            &device.audio_params,
        )
        .unwrap();
        assert_eq!(bare.audio_params, device.audio_params);
        assert_eq!(
            parse_server_hello(r#"{"type":"tts"}"#, &device.audio_params),
            Err(ServerHelloError::NotHello("tts".into()))
        );
        assert_eq!(
            parse_server_hello(r#"{"type":"hello"}"#, &device.audio_params),
            Err(ServerHelloError::NoSessionId)
        );
        assert_eq!(
            parse_server_hello("<html>", &device.audio_params),
            Err(ServerHelloError::NotJson)
        );
    }

    #[test]
    fn audio_frames_round_trip_and_bad_ones_are_refused() {
        let mut buf = Vec::new();
        encode_audio(120, b"opus!", &mut buf);
        assert_eq!(buf.len(), 21);
        assert_eq!(&buf[..8], &[0; 8]);
        let frame = decode_audio(&buf).unwrap();
        assert_eq!(frame.timestamp, 120);
        assert_eq!(&buf[frame.payload], b"opus!");

        // The server's own layout: byte 0 = 1, bytes 2-3 length, 4-7 sequence.
        let mut server = vec![1, 0, 0, 3, 0, 0, 0, 9, 0, 0, 0, 60, 0, 0, 0, 3];
        server.extend_from_slice(b"abc");
        let frame = decode_audio(&server).unwrap();
        assert_eq!((frame.timestamp, &server[frame.payload]), (60, &b"abc"[..]));

        assert_eq!(decode_audio(&[0; 15]), Err(AudioFrameError::Short(15)));
        let mut lying = vec![0; 16];
        lying[15] = 10;
        assert_eq!(
            decode_audio(&lying),
            Err(AudioFrameError::Length {
                declared: 10,
                available: 0
            })
        );
    }

    #[test]
    fn uplink_clock_counts_from_the_first_sequence() {
        let mut clock = UplinkClock::default();
        assert_eq!(clock.timestamp(7, 60), 0);
        assert_eq!(clock.timestamp(8, 60), 60);
        assert_eq!(clock.timestamp(10, 60), 180);
    }

    #[test]
    fn a_reply_is_owed_from_stt_until_tts_stop() {
        let mut t = TurnTracker::default();
        assert!(!t.mid_turn());
        t.on_server_message("stt", None);
        assert!(t.mid_turn());
        t.on_server_message("llm", None);
        t.on_server_message("tts", Some("sentence_start"));
        assert!(t.mid_turn());
        t.on_server_message("tts", Some("stop"));
        assert!(!t.mid_turn());
        t.on_listen_stop();
        assert!(t.mid_turn());
        t.on_abort();
        assert!(!t.mid_turn());
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        fn audio_params() -> impl Strategy<Value = AudioParams> {
            ("[a-z0-9]{0,8}", any::<u32>(), any::<u8>(), any::<u32>()).prop_map(
                |(format, sample_rate, channels, frame_duration)| AudioParams {
                    format,
                    sample_rate,
                    channels,
                    frame_duration,
                },
            )
        }

        proptest! {
            #[test]
            fn audio_frames_decode_to_what_was_encoded(
                timestamp: u32,
                opus in proptest::collection::vec(any::<u8>(), 0..1500),
                trailing in proptest::collection::vec(any::<u8>(), 0..4),
            ) {
                let mut frame = Vec::new();
                encode_audio(timestamp, &opus, &mut frame);
                // Bytes after the declared payload are not part of it.
                frame.extend_from_slice(&trailing);
                let decoded = decode_audio(&frame).unwrap();
                prop_assert_eq!(decoded.timestamp, timestamp);
                prop_assert_eq!(&frame[decoded.payload], &opus[..]);
            }

            #[test]
            fn server_hellos_parse_back(
                session_id in any::<String>().prop_filter("non-empty", |s| !s.is_empty()),
                params in proptest::option::of(audio_params()),
            ) {
                let device = AudioParams::default();
                let mut hello = json!({"type": "hello", "transport": "websocket", "session_id": session_id});
                if let Some(p) = &params {
                    hello["audio_params"] = json!(p);
                }
                prop_assert_eq!(
                    parse_server_hello(&hello.to_string(), &device),
                    Ok(ServerHello { session_id, audio_params: params.unwrap_or(device) })
                );
            }

            #[test]
            fn our_hello_carries_the_device_params(params in audio_params(), mcp: bool, aec: bool) {
                let device = HelloRequest {
                    version: 3,
                    transport: "udp".into(),
                    audio_params: params,
                    features: json!({"mcp": mcp, "aec": aec}),
                };
                let up: Value = serde_json::from_str(&upstream_hello(&device)).unwrap();
                prop_assert_eq!(
                    serde_json::from_value::<AudioParams>(up["audio_params"].clone()).unwrap(),
                    device.audio_params
                );
                prop_assert_eq!(&up["features"], &device.features);
            }

            #[test]
            fn gateway_urls_are_stable(
                tls: bool,
                host in "[a-z0-9][a-z0-9.-]{0,20}(:[0-9]{1,5})?",
                path in "(/[a-z0-9_]{1,8}){0,3}/?",
            ) {
                let base = format!("{}://{host}{path}", if tls { "wss" } else { "ws" });
                let url = gateway_url(&base).unwrap();
                prop_assert_eq!(&url, &format!("{base}{GATEWAY_QUERY}"));
                prop_assert_eq!(gateway_url(&url), Ok(url.clone()));
            }
        }
    }
}
