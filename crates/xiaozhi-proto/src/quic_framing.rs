//! What travels inside the QUIC transport (docs/transports.md): audio datagrams and the
//! frames of the control stream. QUIC itself encrypts, authenticates and de-duplicates
//! packets, so an audio datagram needs no cipher and no connection id, only what the
//! pipeline and the device's player use:
//!
//! ```text
//! audio datagram (RFC 9221 DATAGRAM frame payload)
//!   0  4  timestamp, big-endian (as in the UDP header)
//!   4  4  sequence, big-endian, from 1 per direction
//!   8  n  one Opus packet
//!
//! control stream frame (the client's first bidirectional stream)
//!   0  2  length of the JSON that follows, big-endian, at most MAX_CONTROL_FRAME
//!   2  n  one UTF-8 JSON object
//! ```
//!
//! The client's first control frame is `{"type":"attach","token":"<hex>"}`; the server
//! answers `{"type":"attached"}` or closes the connection with one of
//! the [`close_code`]s. After that either side may send any control JSON the MQTT topic
//! would carry.

use serde_json::Value;

use super::datagram::MAX_DATAGRAM_LEN;

/// Bytes before the Opus packet in an audio datagram.
pub const AUDIO_HEADER_LEN: usize = 8;
/// The ALPN protocol id both sides must offer.
pub const ALPN: &[u8] = b"xiaozhi-audio/1";
/// Largest control frame either side accepts.
pub const MAX_CONTROL_FRAME: usize = 16 * 1024;
/// Length of a session token in bytes (hex in the hello).
pub const TOKEN_LEN: usize = 16;

/// Application close codes (QUIC `CONNECTION_CLOSE` error codes).
pub mod close_code {
    /// The conversation ended normally (either side).
    pub const DONE: u32 = 0;
    /// The token is unknown, already used or expired.
    pub const BAD_TOKEN: u32 = 1;
    /// No valid attach frame in time.
    pub const NO_ATTACH: u32 = 2;
    /// A control frame was malformed or too large.
    pub const BAD_FRAME: u32 = 3;
    /// The server is shutting down.
    pub const SHUTDOWN: u32 = 4;
}

/// One audio datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AudioDatagram<'a> {
    pub timestamp: u32,
    pub sequence: u32,
    pub opus: &'a [u8],
}

/// Why an audio datagram or control frame is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FramingError {
    #[error("audio datagram shorter than its 8-byte header plus one byte of Opus")]
    Truncated,
    #[error("audio datagram longer than {MAX_DATAGRAM_LEN} bytes")]
    Oversized,
    #[error("control frame of {0} bytes exceeds {MAX_CONTROL_FRAME}")]
    FrameTooLarge(usize),
    #[error("control frame is not a JSON object: {0}")]
    NotJson(String),
    #[error("attach frame: {0}")]
    BadAttach(&'static str),
}

impl<'a> AudioDatagram<'a> {
    /// Parses one received datagram.
    pub fn parse(bytes: &'a [u8]) -> Result<AudioDatagram<'a>, FramingError> {
        if bytes.len() > MAX_DATAGRAM_LEN {
            return Err(FramingError::Oversized);
        }
        if bytes.len() <= AUDIO_HEADER_LEN {
            return Err(FramingError::Truncated);
        }
        let (head, opus) = bytes.split_at(AUDIO_HEADER_LEN);
        Ok(AudioDatagram {
            timestamp: u32::from_be_bytes([head[0], head[1], head[2], head[3]]),
            sequence: u32::from_be_bytes([head[4], head[5], head[6], head[7]]),
            opus,
        })
    }

    /// Appends the wire form to `out`.
    pub fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.timestamp.to_be_bytes());
        out.extend_from_slice(&self.sequence.to_be_bytes());
        out.extend_from_slice(self.opus);
    }
}

/// Encodes one control frame.
pub fn control_frame(json: &[u8]) -> Result<Vec<u8>, FramingError> {
    if json.len() > MAX_CONTROL_FRAME {
        return Err(FramingError::FrameTooLarge(json.len()));
    }
    let mut out = Vec::with_capacity(2 + json.len());
    out.extend_from_slice(&(json.len() as u16).to_be_bytes());
    out.extend_from_slice(json);
    Ok(out)
}

/// Reads the length prefix of a control frame.
pub fn control_frame_len(prefix: [u8; 2]) -> Result<usize, FramingError> {
    let n = usize::from(u16::from_be_bytes(prefix));
    if n > MAX_CONTROL_FRAME {
        return Err(FramingError::FrameTooLarge(n));
    }
    Ok(n)
}

/// What the client asked for in its attach frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attach {
    pub token: [u8; TOKEN_LEN],
    /// Server-to-device control JSON should come on this stream rather than MQTT.
    pub control: bool,
}

/// Parses the client's first control frame.
pub fn parse_attach(json: &[u8]) -> Result<Attach, FramingError> {
    let v: Value =
        serde_json::from_slice(json).map_err(|e| FramingError::NotJson(e.to_string()))?;
    if v.get("type").and_then(Value::as_str) != Some("attach") {
        return Err(FramingError::BadAttach("type is not \"attach\""));
    }
    let token = v
        .get("token")
        .and_then(Value::as_str)
        .and_then(|s| hex::decode(s).ok())
        .and_then(|b| <[u8; TOKEN_LEN]>::try_from(b).ok())
        .ok_or(FramingError::BadAttach("token is not 32 hex digits"))?;
    Ok(Attach {
        token,
        control: v.get("control").and_then(Value::as_bool).unwrap_or(false),
    })
}

/// The attach frame a client sends.
pub fn attach_json(token: &[u8; TOKEN_LEN], control: bool) -> String {
    serde_json::json!({"type": "attach", "token": hex::encode(token), "control": control})
        .to_string()
}

/// The server's answer to a valid attach.
pub fn attached_json() -> String {
    serde_json::json!({"type": "attached"}).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn audio_datagram_layout() {
        let mut out = Vec::new();
        AudioDatagram {
            timestamp: 960,
            sequence: 1,
            opus: &[0x58, 1, 2],
        }
        .write(&mut out);
        assert_eq!(hex::encode(&out), "000003c000000001580102");
        assert_eq!(
            AudioDatagram::parse(&out).unwrap(),
            AudioDatagram {
                timestamp: 960,
                sequence: 1,
                opus: &[0x58, 1, 2]
            }
        );
        assert_eq!(
            AudioDatagram::parse(&out[..8]),
            Err(FramingError::Truncated)
        );
        assert_eq!(
            AudioDatagram::parse(&[0; MAX_DATAGRAM_LEN + 1]),
            Err(FramingError::Oversized)
        );
    }

    #[test]
    fn attach_frames() {
        let token = [0xab; TOKEN_LEN];
        let a = parse_attach(attach_json(&token, true).as_bytes()).unwrap();
        assert_eq!(
            a,
            Attach {
                token,
                control: true
            }
        );
        assert!(parse_attach(br#"{"type":"attach","token":"abcd"}"#).is_err());
        assert!(parse_attach(br#"{"type":"hello"}"#).is_err());
        assert!(parse_attach(b"not json").is_err());
        let frame = control_frame(b"{}").unwrap();
        assert_eq!(frame, [0, 2, b'{', b'}']);
        assert_eq!(control_frame_len([0, 2]), Ok(2));
        assert!(control_frame_len([0xff, 0xff]).is_err());
        assert!(control_frame(&vec![b' '; MAX_CONTROL_FRAME + 1]).is_err());
    }

    proptest! {
        #[test]
        fn audio_datagrams_round_trip(timestamp: u32, sequence: u32, opus in proptest::collection::vec(any::<u8>(), 1..1000)) {
            let mut out = Vec::new();
            let d = AudioDatagram { timestamp, sequence, opus: &opus };
            d.write(&mut out);
            prop_assert_eq!(AudioDatagram::parse(&out), Ok(d));
        }

        #[test]
        fn parsing_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = AudioDatagram::parse(&bytes);
            let _ = parse_attach(&bytes);
        }
    }
}
