//! JSON control messages over MQTT (PROTOCOL.md section 4).
//!
//! Device messages are parsed once into [`DeviceMessage`], which names the few types the
//! gateway acts on itself (hello, listen, abort, goodbye) and keeps everything else as
//! raw JSON to pass on. Server messages are built here so every field name the firmware
//! depends on lives in one file.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::encryption::Encryption;

/// The only hello version current firmware sends over MQTT (the Node gateway refuses
/// others too).
pub const HELLO_VERSION: u64 = 3;

/// The message type some firmware forks send when their audio channel timed out; the
/// Node gateway then closes the conversation's upstream (and the device hears goodbye).
pub const UDP_TIMEOUT: &str = "udp_timeout";

/// Audio parameters as the firmware writes them in its hello and reads them in ours.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AudioParams {
    #[serde(default = "default_format")]
    pub format: String,
    #[serde(default = "default_sample_rate")]
    pub sample_rate: u32,
    #[serde(default = "default_channels")]
    pub channels: u8,
    /// Milliseconds per Opus packet.
    #[serde(default = "default_frame_duration")]
    pub frame_duration: u32,
}

fn default_format() -> String {
    "opus".into()
}
fn default_sample_rate() -> u32 {
    16_000
}
fn default_channels() -> u8 {
    1
}
fn default_frame_duration() -> u32 {
    60
}

impl Default for AudioParams {
    fn default() -> Self {
        AudioParams {
            format: default_format(),
            sample_rate: default_sample_rate(),
            channels: default_channels(),
            frame_duration: default_frame_duration(),
        }
    }
}

/// What a device asked for in its hello.
#[derive(Debug, Clone, PartialEq)]
pub struct HelloRequest {
    pub version: u64,
    pub transport: String,
    pub audio_params: AudioParams,
    /// Passed on verbatim (e.g. `{"mcp":true,"aec":false}`).
    pub features: Value,
}

/// A `listen` state change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenState {
    Start,
    Stop,
    /// Wake word detected; `text` holds it.
    Detect,
    Other(String),
}

/// A message from a device, classified by `type`.
#[derive(Debug, Clone, PartialEq)]
pub enum DeviceMessage {
    Hello(HelloRequest),
    Listen {
        session_id: Option<String>,
        state: ListenState,
        mode: Option<String>,
    },
    Abort {
        session_id: Option<String>,
    },
    Goodbye {
        session_id: Option<String>,
    },
    /// Any other type (`mcp`, `iot`, ...), kept whole for relaying.
    Other {
        kind: String,
        session_id: Option<String>,
    },
}

/// Why a device payload is not a control message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    #[error("payload is not UTF-8 JSON: {0}")]
    NotJson(String),
    #[error("JSON payload is not an object with a string \"type\"")]
    NoType,
    #[error("hello field {field} is invalid: {reason}")]
    BadHello { field: &'static str, reason: String },
}

impl ControlError {
    pub fn label(&self) -> &'static str {
        match self {
            ControlError::NotJson(_) => "not_json",
            ControlError::NoType => "no_type",
            ControlError::BadHello { .. } => "bad_hello",
        }
    }
}

/// Parses a device payload. Returns the classified message and the parsed JSON (for
/// relaying without parsing twice).
pub fn parse_device_message(payload: &[u8]) -> Result<(DeviceMessage, Value), ControlError> {
    let value: Value =
        serde_json::from_slice(payload).map_err(|e| ControlError::NotJson(e.to_string()))?;
    let kind = value
        .get("type")
        .and_then(Value::as_str)
        .ok_or(ControlError::NoType)?;
    let session_id = value
        .get("session_id")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let message = match kind {
        "hello" => DeviceMessage::Hello(parse_hello(&value)?),
        "listen" => DeviceMessage::Listen {
            session_id,
            state: match value.get("state").and_then(Value::as_str).unwrap_or("") {
                "start" => ListenState::Start,
                "stop" => ListenState::Stop,
                "detect" => ListenState::Detect,
                other => ListenState::Other(other.to_owned()),
            },
            mode: value.get("mode").and_then(Value::as_str).map(str::to_owned),
        },
        "abort" => DeviceMessage::Abort { session_id },
        "goodbye" => DeviceMessage::Goodbye { session_id },
        other => DeviceMessage::Other {
            kind: other.to_owned(),
            session_id,
        },
    };
    Ok((message, value))
}

fn parse_hello(value: &Value) -> Result<HelloRequest, ControlError> {
    let version = value.get("version").and_then(Value::as_u64).unwrap_or(0);
    let transport = value
        .get("transport")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    let audio_params = match value.get("audio_params") {
        None | Some(Value::Null) => AudioParams::default(),
        Some(v) => serde_json::from_value(v.clone()).map_err(|e| ControlError::BadHello {
            field: "audio_params",
            reason: e.to_string(),
        })?,
    };
    if audio_params.frame_duration == 0 || audio_params.frame_duration > 120 {
        return Err(ControlError::BadHello {
            field: "audio_params.frame_duration",
            reason: format!("{} ms is outside 1..=120", audio_params.frame_duration),
        });
    }
    Ok(HelloRequest {
        version,
        transport,
        audio_params,
        features: value.get("features").cloned().unwrap_or(Value::Null),
    })
}

/// The UDP part of our hello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpOffer {
    /// Host or IP the device sends audio to (explicit config, never guessed).
    pub server: String,
    pub port: u16,
    /// 32 hex chars.
    pub key_hex: String,
    /// 32 hex chars: the header template.
    pub nonce_hex: String,
    /// `aes-128-ctr` for stock firmware; `aes-128-gcm` for a device that announced
    /// `udp_aead`.
    pub encryption: Encryption,
}

/// The QUIC part of our hello (the `quic` extension, docs/transports.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuicHelloOffer {
    /// Host or IP of the QUIC endpoint (`udp.public_host`).
    pub server: String,
    pub port: u16,
    /// SHA-256 of the server's DER certificate, for the device to pin.
    pub cert_sha256: [u8; 32],
    /// The one-time session token the connection presents on its first stream.
    pub token: [u8; super::quic_framing::TOKEN_LEN],
    /// How long the token stays good.
    pub token_ttl_ms: u64,
}

/// Our answer to a device hello.
pub fn server_hello(session_id: &str, audio_params: &AudioParams, udp: &UdpOffer) -> String {
    json!({
        "type": "hello",
        "version": HELLO_VERSION,
        "session_id": session_id,
        "transport": "udp",
        "udp": {
            "server": udp.server,
            "port": udp.port,
            "encryption": udp.encryption.wire_name(),
            "key": udp.key_hex,
            "nonce": udp.nonce_hex,
        },
        "audio_params": audio_params,
    })
    .to_string()
}

/// Our answer to a device hello that gets the QUIC transport.
pub fn quic_server_hello(
    session_id: &str,
    audio_params: &AudioParams,
    quic: &QuicHelloOffer,
) -> String {
    json!({
        "type": "hello",
        "version": HELLO_VERSION,
        "session_id": session_id,
        "transport": "quic",
        "quic": {
            "server": quic.server,
            "port": quic.port,
            "alpn": String::from_utf8_lossy(super::quic_framing::ALPN),
            "cert_sha256": hex::encode(quic.cert_sha256),
            "token": hex::encode(quic.token),
            "token_ttl_ms": quic.token_ttl_ms,
        },
        "audio_params": audio_params,
    })
    .to_string()
}

/// Ends a conversation: the device closes its audio channel without answering.
pub fn goodbye(session_id: &str) -> String {
    json!({ "type": "goodbye", "session_id": session_id }).to_string()
}

/// `tts` state messages the echo pipeline uses to drive the device UI.
pub fn tts(session_id: &str, state: &str, text: Option<&str>) -> String {
    let mut v = json!({ "type": "tts", "state": state, "session_id": session_id });
    if let Some(text) = text {
        v["text"] = Value::String(text.to_owned());
    }
    v.to_string()
}

/// An alert the device shows on screen.
pub fn alert(session_id: Option<&str>, message: &str) -> String {
    json!({
        "type": "alert",
        "session_id": session_id.unwrap_or(""),
        "status": "error",
        "message": message,
        "emotion": "sad",
    })
    .to_string()
}

/// The copy of a message sent to a device that may go on the bus: a server hello's
/// secrets (the UDP AES key, the QUIC session token) are replaced, so that bus clients
/// (which see every device's traffic) cannot decrypt a conversation's audio or claim
/// its QUIC channel. Anything else is returned unchanged, without parsing unless it
/// looks like a hello.
pub fn redact_for_bus(payload: &[u8]) -> Option<Vec<u8>> {
    const HELLO: &[u8] = b"\"hello\"";
    if !payload.windows(HELLO.len()).any(|w| w == HELLO) {
        return None;
    }
    let mut v: Value = serde_json::from_slice(payload).ok()?;
    let mut redacted = false;
    for (section, field) in [("udp", "key"), ("quic", "token")] {
        if let Some(secret) = v.get_mut(section).and_then(|s| s.get_mut(field)) {
            *secret = Value::String(REDACTED.to_owned());
            redacted = true;
        }
    }
    if !redacted {
        return None;
    }
    serde_json::to_vec(&v).ok()
}

/// What a redacted secret reads as on the bus.
pub const REDACTED: &str = "<redacted>";

#[cfg(test)]
mod tests {
    #[test]
    fn bus_copy_of_a_server_hello_has_no_key() {
        let udp = UdpOffer {
            server: "198.51.100.1".into(),
            port: 8884,
            key_hex: "00112233445566778899aabbccddeeff".into(),
            nonce_hex: "01".repeat(16),
            encryption: Encryption::Aes128Ctr,
        };
        let hello = server_hello("s1", &AudioParams::default(), &udp);
        let redacted = redact_for_bus(hello.as_bytes()).expect("a hello is redacted");
        let v: Value = serde_json::from_slice(&redacted).unwrap();
        assert_eq!(v["udp"]["key"], REDACTED);
        assert_eq!(v["udp"]["nonce"], udp.nonce_hex.as_str());
        assert_eq!(v["session_id"], "s1");
        assert!(redact_for_bus(goodbye("s1").as_bytes()).is_none());
        assert!(redact_for_bus(b"not json \"hello\"").is_none());
    }

    #[test]
    fn bus_copy_of_a_quic_hello_has_no_token() {
        let quic = QuicHelloOffer {
            server: "198.51.100.1".into(),
            port: 8885,
            cert_sha256: [7; 32],
            token: [9; 16],
            token_ttl_ms: 30_000,
        };
        let hello = quic_server_hello("s1", &AudioParams::default(), &quic);
        let v: Value = serde_json::from_str(&hello).unwrap();
        assert_eq!(v["transport"], "quic");
        assert_eq!(v["quic"]["token"], hex::encode([9; 16]));
        assert_eq!(v["quic"]["cert_sha256"], hex::encode([7; 32]));
        assert_eq!(v["quic"]["alpn"], "xiaozhi-audio/1");
        let redacted: Value =
            serde_json::from_slice(&redact_for_bus(hello.as_bytes()).unwrap()).unwrap();
        assert_eq!(redacted["quic"]["token"], REDACTED);
        assert_eq!(redacted["quic"]["cert_sha256"], v["quic"]["cert_sha256"]);
    }

    use super::*;

    const FIRMWARE_HELLO: &str = r#"{"type":"hello","version":3,"transport":"udp","features":{"mcp":true,"aec":false},"audio_params":{"format":"opus","sample_rate":16000,"channels":1,"frame_duration":60}}"#;

    #[test]
    fn parses_firmware_hello() {
        let (msg, _) = parse_device_message(FIRMWARE_HELLO.as_bytes()).unwrap();
        let DeviceMessage::Hello(h) = msg else {
            panic!("{msg:?}")
        };
        assert_eq!((h.version, h.transport.as_str()), (3, "udp"));
        assert_eq!(h.audio_params, AudioParams::default());
        assert_eq!(h.features["mcp"], Value::Bool(true));
    }

    #[test]
    fn classifies_other_messages() {
        let (m, _) = parse_device_message(
            br#"{"session_id":"s1","type":"listen","state":"start","mode":"auto"}"#,
        )
        .unwrap();
        assert_eq!(
            m,
            DeviceMessage::Listen {
                session_id: Some("s1".into()),
                state: ListenState::Start,
                mode: Some("auto".into())
            }
        );
        let (m, _) = parse_device_message(br#"{"session_id":"s1","type":"goodbye"}"#).unwrap();
        assert_eq!(
            m,
            DeviceMessage::Goodbye {
                session_id: Some("s1".into())
            }
        );
        let (m, v) = parse_device_message(
            br#"{"session_id":"s1","type":"mcp","payload":{"jsonrpc":"2.0"}}"#,
        )
        .unwrap();
        assert_eq!(
            m,
            DeviceMessage::Other {
                kind: "mcp".into(),
                session_id: Some("s1".into())
            }
        );
        assert_eq!(v["payload"]["jsonrpc"], "2.0");
    }

    #[test]
    fn malformed_payloads_are_errors_not_panics() {
        assert!(matches!(
            parse_device_message(b"\xff\xfe"),
            Err(ControlError::NotJson(_))
        ));
        assert!(matches!(
            parse_device_message(b"{\"type\":"),
            Err(ControlError::NotJson(_))
        ));
        assert_eq!(
            parse_device_message(b"[1,2]").unwrap_err(),
            ControlError::NoType
        );
        assert_eq!(
            parse_device_message(b"{\"type\":7}").unwrap_err(),
            ControlError::NoType
        );
        assert!(matches!(
            parse_device_message(br#"{"type":"hello","audio_params":{"frame_duration":0}}"#),
            Err(ControlError::BadHello { .. })
        ));
        assert!(matches!(
            parse_device_message(br#"{"type":"hello","audio_params":{"sample_rate":"x"}}"#),
            Err(ControlError::BadHello { .. })
        ));
    }

    #[test]
    fn server_hello_has_the_fields_the_firmware_reads() {
        let udp = UdpOffer {
            server: "192.0.2.1".into(),
            port: 8884,
            key_hex: "00".repeat(16),
            nonce_hex: "01".repeat(16),
            encryption: Encryption::Aes128Ctr,
        };
        let v: Value =
            serde_json::from_str(&server_hello("sess", &AudioParams::default(), &udp)).unwrap();
        assert_eq!(v["type"], "hello");
        assert_eq!(v["transport"], "udp");
        assert_eq!(v["session_id"], "sess");
        assert_eq!(v["udp"]["server"], "192.0.2.1");
        assert_eq!(v["udp"]["port"], 8884);
        assert_eq!(v["udp"]["encryption"], "aes-128-ctr");
        assert_eq!(v["audio_params"]["sample_rate"], 16000);
        assert_eq!(v["audio_params"]["frame_duration"], 60);
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        fn audio_params() -> impl Strategy<Value = AudioParams> {
            ("[a-z0-9]{0,8}", any::<u32>(), any::<u8>(), 1u32..=120).prop_map(
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
            fn audio_params_survive_json(params in audio_params()) {
                let json = serde_json::to_string(&params).unwrap();
                prop_assert_eq!(serde_json::from_str::<AudioParams>(&json).unwrap(), params);
            }

            #[test]
            fn a_device_hello_parses_back(
                version: u64,
                transport in "[a-z]{0,8}",
                params in audio_params(),
                mcp: bool,
            ) {
                let features = json!({"mcp": mcp});
                let hello = json!({
                    "type": "hello",
                    "version": version,
                    "transport": transport,
                    "features": features,
                    "audio_params": params,
                });
                let (message, _) = parse_device_message(hello.to_string().as_bytes()).unwrap();
                prop_assert_eq!(
                    message,
                    DeviceMessage::Hello(HelloRequest { version, transport, audio_params: params, features })
                );
            }

            #[test]
            fn server_messages_read_back_as_what_they_say(
                session_id in any::<String>(),
                state in "[a-z_]{1,16}",
                text in proptest::option::of(any::<String>()),
                message in any::<String>(),
            ) {
                let (m, _) = parse_device_message(goodbye(&session_id).as_bytes()).unwrap();
                prop_assert_eq!(m, DeviceMessage::Goodbye { session_id: Some(session_id.clone()) });

                let (m, v) =
                    parse_device_message(tts(&session_id, &state, text.as_deref()).as_bytes()).unwrap();
                prop_assert_eq!(
                    m,
                    DeviceMessage::Other { kind: "tts".into(), session_id: Some(session_id.clone()) }
                );
                prop_assert_eq!(v["state"].as_str(), Some(state.as_str()));
                prop_assert_eq!(v.get("text").and_then(Value::as_str), text.as_deref());

                let (m, v) = parse_device_message(alert(Some(&session_id), &message).as_bytes()).unwrap();
                prop_assert_eq!(
                    m,
                    DeviceMessage::Other { kind: "alert".into(), session_id: Some(session_id) }
                );
                prop_assert_eq!(v["message"].as_str(), Some(message.as_str()));
            }

            #[test]
            fn the_bus_copy_of_a_server_hello_differs_only_in_the_key(
                session_id in any::<String>(),
                server in "[a-z0-9.:-]{1,30}",
                port: u16,
                key in "[0-9a-f]{32}",
                nonce in "[0-9a-f]{32}",
                params in audio_params(),
            ) {
                let udp = UdpOffer { server, port, key_hex: key, nonce_hex: nonce, encryption: Encryption::Aes128Gcm };
                let hello = server_hello(&session_id, &params, &udp);
                let mut expected: Value = serde_json::from_str(&hello).unwrap();
                expected["udp"]["key"] = json!(REDACTED);
                let redacted = redact_for_bus(hello.as_bytes()).expect("a hello is redacted");
                prop_assert_eq!(serde_json::from_slice::<Value>(&redacted).unwrap(), expected);
            }
        }
    }
}
