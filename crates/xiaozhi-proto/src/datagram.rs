//! The 16-byte header of a UDP audio datagram (PROTOCOL.md section 5).
//!
//! ```text
//! offset size field
//!   0     1   type = 0x01
//!   1     1   flags (0)
//!   2     2   payload length
//!   4     4   connection id, chosen by the server
//!   8     4   timestamp
//!  12     4   sequence, from 1 per direction per channel
//! ```
//! All big-endian. The header doubles as the AES-CTR IV, so it is kept as the exact
//! 16 bytes it was on the wire ([`Header::to_bytes`] round-trips).

/// Length of the header in bytes.
pub const HEADER_LEN: usize = 16;
/// Where the big-endian connection id sits in a datagram: the kernel steers datagrams
/// to the audio path's shards by it, before any of our code sees them.
pub const CONNECTION_ID_OFFSET: usize = 4;
/// The only datagram type the firmware speaks.
pub const PACKET_TYPE_AUDIO: u8 = 0x01;
/// The largest datagram we ever accept or build; Opus frames are 20-400 bytes, so this
/// leaves generous room while keeping receive buffers small.
pub const MAX_DATAGRAM_LEN: usize = 1500;

/// A parsed datagram header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Byte 1; zero in everything the firmware sends.
    pub flags: u8,
    /// Number of encrypted payload bytes after the header.
    pub payload_len: u16,
    /// Routes the datagram to its channel.
    pub connection_id: u32,
    /// Sender's timestamp (ms-ish).
    pub timestamp: u32,
    /// Per-direction sequence number, starting at 1.
    pub sequence: u32,
}

/// Why a datagram could not be parsed. Every variant is a counted drop, never an error
/// that reaches a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DatagramError {
    #[error("datagram shorter than its 16-byte header")]
    Truncated,
    #[error("datagram longer than {MAX_DATAGRAM_LEN} bytes")]
    Oversized,
    #[error("datagram type {0:#04x} is not audio (0x01)")]
    WrongType(u8),
    #[error("header says {declared} payload bytes but {actual} follow")]
    LengthMismatch { declared: u16, actual: usize },
    #[error("datagram carries no payload")]
    Empty,
}

impl DatagramError {
    /// Counter label.
    pub fn label(&self) -> &'static str {
        match self {
            DatagramError::Truncated => "truncated",
            DatagramError::Oversized => "oversized",
            DatagramError::WrongType(_) => "wrong_type",
            DatagramError::LengthMismatch { .. } => "length_mismatch",
            DatagramError::Empty => "empty",
        }
    }
}

impl Header {
    /// Parses and validates a whole datagram, returning its header. The payload is
    /// `datagram[HEADER_LEN..]`, of exactly `payload_len` bytes.
    pub fn parse(datagram: &[u8]) -> Result<Header, DatagramError> {
        if datagram.len() > MAX_DATAGRAM_LEN {
            return Err(DatagramError::Oversized);
        }
        let Some(head) = datagram.first_chunk::<HEADER_LEN>() else {
            return Err(DatagramError::Truncated);
        };
        if head[0] != PACKET_TYPE_AUDIO {
            return Err(DatagramError::WrongType(head[0]));
        }
        let header = Header::from_bytes(head);
        let actual = datagram.len() - HEADER_LEN;
        if usize::from(header.payload_len) != actual {
            return Err(DatagramError::LengthMismatch {
                declared: header.payload_len,
                actual,
            });
        }
        if actual == 0 {
            return Err(DatagramError::Empty);
        }
        Ok(header)
    }

    /// Reads the fields of a 16-byte header without validating the type byte.
    pub fn from_bytes(b: &[u8; HEADER_LEN]) -> Header {
        Header {
            flags: b[1],
            payload_len: u16::from_be_bytes([b[2], b[3]]),
            connection_id: u32::from_be_bytes([b[4], b[5], b[6], b[7]]),
            timestamp: u32::from_be_bytes([b[8], b[9], b[10], b[11]]),
            sequence: u32::from_be_bytes([b[12], b[13], b[14], b[15]]),
        }
    }

    /// The 16 wire bytes (type 0x01).
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0] = PACKET_TYPE_AUDIO;
        b[1] = self.flags;
        b[2..4].copy_from_slice(&self.payload_len.to_be_bytes());
        b[4..8].copy_from_slice(&self.connection_id.to_be_bytes());
        b[8..12].copy_from_slice(&self.timestamp.to_be_bytes());
        b[12..16].copy_from_slice(&self.sequence.to_be_bytes());
        b
    }

    /// Reads the connection id of a datagram that is at least 8 bytes long, without any
    /// other check: the socket driver routes on it before the channel validates the rest.
    pub fn peek_connection_id(datagram: &[u8]) -> Option<u32> {
        datagram
            .get(CONNECTION_ID_OFFSET..CONNECTION_ID_OFFSET + 4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
}

/// The hello's `nonce`: the header template the device copies for every datagram
/// (type 1, the connection id, everything else zero).
pub fn nonce_template(connection_id: u32) -> [u8; HEADER_LEN] {
    Header {
        flags: 0,
        payload_len: 0,
        connection_id,
        timestamp: 0,
        sequence: 0,
    }
    .to_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn protocol_vector_header() {
        let h = Header {
            flags: 0,
            payload_len: 40,
            connection_id: 0x1234_5678,
            timestamp: 960,
            sequence: 1,
        };
        assert_eq!(
            hex::encode(h.to_bytes()),
            "0100002812345678000003c000000001"
        );
        assert_eq!(
            hex::encode(nonce_template(0x1234_5678)),
            "01000000123456780000000000000000"
        );
    }

    #[test]
    fn parse_rejects_each_malformation() {
        let h = Header {
            flags: 0,
            payload_len: 3,
            connection_id: 7,
            timestamp: 1,
            sequence: 1,
        };
        let mut ok = h.to_bytes().to_vec();
        ok.extend_from_slice(&[1, 2, 3]);
        assert_eq!(Header::parse(&ok), Ok(h));
        assert_eq!(Header::parse(&ok[..10]), Err(DatagramError::Truncated));
        assert_eq!(
            Header::parse(&ok[..18]),
            Err(DatagramError::LengthMismatch {
                declared: 3,
                actual: 2
            })
        );
        let mut wrong = ok.clone();
        wrong[0] = 2;
        assert_eq!(Header::parse(&wrong), Err(DatagramError::WrongType(2)));
        assert_eq!(
            Header::parse(&vec![1u8; MAX_DATAGRAM_LEN + 1]),
            Err(DatagramError::Oversized)
        );
        let empty = Header {
            payload_len: 0,
            ..h
        }
        .to_bytes();
        assert_eq!(Header::parse(&empty), Err(DatagramError::Empty));
    }

    proptest! {
        #[test]
        fn header_round_trips(flags: u8, payload_len: u16, connection_id: u32, timestamp: u32, sequence: u32) {
            let h = Header { flags, payload_len, connection_id, timestamp, sequence };
            prop_assert_eq!(Header::from_bytes(&h.to_bytes()), h);
            prop_assert_eq!(Header::peek_connection_id(&h.to_bytes()), Some(connection_id));
        }

        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = Header::parse(&bytes);
        }
    }

    proptest! {
        #[test]
        fn a_built_datagram_parses_back(
            flags: u8,
            connection_id: u32,
            timestamp: u32,
            sequence: u32,
            payload in proptest::collection::vec(any::<u8>(), 1..=MAX_DATAGRAM_LEN - HEADER_LEN),
        ) {
            let h = Header { flags, payload_len: payload.len() as u16, connection_id, timestamp, sequence };
            let mut datagram = h.to_bytes().to_vec();
            datagram.extend_from_slice(&payload);
            prop_assert_eq!(Header::parse(&datagram), Ok(h));
        }

        #[test]
        fn the_nonce_template_is_a_header_with_only_the_connection_id(connection_id: u32) {
            let nonce = nonce_template(connection_id);
            prop_assert_eq!(nonce[0], PACKET_TYPE_AUDIO);
            prop_assert_eq!(
                Header::from_bytes(&nonce),
                Header { flags: 0, payload_len: 0, connection_id, timestamp: 0, sequence: 0 }
            );
        }
    }
}
