//! One simulated device's UDP audio channel, with the firmware's rules: a connected
//! socket, datagrams built from the hello's nonce template with the sequence from 1,
//! AES-CTR with the header as IV, and the downlink checks the firmware applies (type,
//! exact length, strictly increasing sequence).

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use tokio::net::UdpSocket;

use super::device::SimError;
use crate::protocol::cipher::PacketCipher;
use crate::protocol::datagram::{HEADER_LEN, Header, MAX_DATAGRAM_LEN, PACKET_TYPE_AUDIO};

/// What the server's hello told the device.
#[derive(Debug, Clone)]
pub struct ServerHello {
    pub session_id: String,
    pub udp: SocketAddr,
    pub key: [u8; 16],
    pub nonce: [u8; 16],
    pub downlink_sample_rate: u32,
    pub frame_duration: u32,
}

impl ServerHello {
    /// Parses a server hello the way the firmware does.
    pub fn parse(v: &Value) -> Result<ServerHello, SimError> {
        let bad = |what: &str| SimError::Protocol(format!("server hello: {what}: {v}"));
        if v["transport"] != "udp" {
            return Err(bad("transport is not udp"));
        }
        let host = v["udp"]["server"]
            .as_str()
            .ok_or_else(|| bad("udp.server"))?;
        let port = v["udp"]["port"]
            .as_u64()
            .and_then(|p| u16::try_from(p).ok())
            .ok_or_else(|| bad("udp.port"))?;
        let udp = format!("{host}:{port}")
            .parse()
            .map_err(|_| bad("udp server is not an IP"))?;
        let hex16 = |field: &str| -> Result<[u8; 16], SimError> {
            let s = v["udp"][field].as_str().ok_or_else(|| bad(field))?;
            hex::decode(s)
                .ok()
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| bad(field))
        };
        Ok(ServerHello {
            session_id: v["session_id"].as_str().unwrap_or_default().to_owned(),
            udp,
            key: hex16("key")?,
            nonce: hex16("nonce")?,
            downlink_sample_rate: v["audio_params"]["sample_rate"].as_u64().unwrap_or(16000) as u32,
            frame_duration: v["audio_params"]["frame_duration"].as_u64().unwrap_or(60) as u32,
        })
    }

    pub fn connection_id(&self) -> u32 {
        u32::from_be_bytes([self.nonce[4], self.nonce[5], self.nonce[6], self.nonce[7]])
    }
}

/// A received, accepted downlink frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DownlinkFrame {
    pub sequence: u32,
    pub timestamp: u32,
    pub opus: Vec<u8>,
}

/// The device's audio channel.
pub struct SimAudio {
    pub socket: UdpSocket,
    cipher: PacketCipher,
    nonce: [u8; 16],
    next_sequence: u32,
    last_downlink_sequence: u32,
    buf: Vec<u8>,
    /// Downlink datagrams the firmware's checks would drop.
    pub rejected: u64,
}

impl SimAudio {
    /// Opens the channel the hello describes, from a local address of the caller's choice.
    pub async fn open(hello: &ServerHello, bind: SocketAddr) -> Result<SimAudio, SimError> {
        let socket = UdpSocket::bind(bind).await?;
        socket.connect(hello.udp).await?;
        Ok(SimAudio {
            socket,
            cipher: PacketCipher::new(&hello.key),
            nonce: hello.nonce,
            next_sequence: 1,
            last_downlink_sequence: 0,
            buf: vec![0; MAX_DATAGRAM_LEN + 1],
            rejected: 0,
        })
    }

    /// Builds the next uplink datagram (consuming a sequence number) without sending it.
    pub fn seal(&mut self, timestamp: u32, opus: &[u8]) -> Vec<u8> {
        let mut header = self.nonce;
        header[2..4].copy_from_slice(&(opus.len() as u16).to_be_bytes());
        header[8..12].copy_from_slice(&timestamp.to_be_bytes());
        header[12..16].copy_from_slice(&self.next_sequence.to_be_bytes());
        self.next_sequence += 1;
        let mut datagram = Vec::with_capacity(HEADER_LEN + opus.len());
        datagram.extend_from_slice(&header);
        datagram.extend_from_slice(opus);
        self.cipher.apply(&header, &mut datagram[HEADER_LEN..]);
        datagram
    }

    /// Sends one uplink frame.
    pub async fn send(&mut self, timestamp: u32, opus: &[u8]) -> Result<(), SimError> {
        let d = self.seal(timestamp, opus);
        self.socket.send(&d).await?;
        Ok(())
    }

    /// Receives the next downlink frame the firmware would accept; `None` on timeout.
    pub async fn recv(&mut self, timeout: Duration) -> Result<Option<DownlinkFrame>, SimError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let n = match tokio::time::timeout_at(deadline, self.socket.recv(&mut self.buf)).await {
                Ok(r) => r?,
                Err(_) => return Ok(None),
            };
            if let Some(frame) = self.accept(n) {
                return Ok(Some(frame));
            }
        }
    }

    fn accept(&mut self, n: usize) -> Option<DownlinkFrame> {
        let d = &mut self.buf[..n];
        let Some(head) = d.first_chunk::<HEADER_LEN>().copied() else {
            self.rejected += 1;
            return None;
        };
        let h = Header::from_bytes(&head);
        if head[0] != PACKET_TYPE_AUDIO
            || usize::from(h.payload_len) + HEADER_LEN != n
            || h.sequence <= self.last_downlink_sequence
        {
            self.rejected += 1;
            return None;
        }
        self.last_downlink_sequence = h.sequence;
        self.cipher.apply(&head, &mut d[HEADER_LEN..]);
        Some(DownlinkFrame {
            sequence: h.sequence,
            timestamp: h.timestamp,
            opus: d[HEADER_LEN..].to_vec(),
        })
    }
}

/// A synthetic 60 ms Opus packet (SILK wideband TOC) carrying `index` so the echo can be
/// matched to what was sent; `len` is the total length (at least 5).
pub fn synthetic_frame(index: u32, len: usize) -> Vec<u8> {
    let mut f = vec![0u8; len.max(5)];
    f[0] = 11 << 3;
    f[1..5].copy_from_slice(&index.to_be_bytes());
    for (i, b) in f.iter_mut().enumerate().skip(5) {
        *b = (i as u8).wrapping_mul(31) ^ (index as u8);
    }
    f
}

/// The index carried by [`synthetic_frame`].
pub fn frame_index(opus: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(opus.get(1..5)?.try_into().ok()?))
}
