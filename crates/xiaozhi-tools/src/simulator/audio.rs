//! One simulated device's audio channel, on whichever transport its hello got:
//!
//! * UDP ([`SimAudio`]), with the firmware's rules: a connected socket, datagrams built
//!   from the hello's nonce template with the sequence from 1, AES-CTR with the header as
//!   IV, and the downlink checks the firmware applies (type, exact length, at most a
//!   1,500-byte datagram, strictly increasing sequence); or AES-GCM (the `udp_aead` extension) with its tag and replay
//!   window;
//! * QUIC ([`super::quic::SimQuic`]): a connection that pins the hello's certificate
//!   hash, presents the token, and carries audio as datagrams.
//!
//! [`SimLink`] is either, for code that does not care which.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use tokio::net::UdpSocket;

use super::device::SimError;
use super::quic::SimQuic;
use xiaozhi_gateway::protocol::audio_channel::Verdict;
use xiaozhi_gateway::protocol::cipher::PacketCipher;
use xiaozhi_gateway::protocol::datagram::{
    HEADER_LEN, Header, MAX_DATAGRAM_LEN, PACKET_TYPE_AUDIO,
};
use xiaozhi_gateway::protocol::encryption::Encryption;
use xiaozhi_gateway::protocol::gcm_channel::{GcmCipher, GcmReceiver, GcmSealer};

/// Which audio transport a simulated device asks for in its hello.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Transport {
    /// Stock firmware: announces nothing, gets AES-128-CTR over UDP.
    #[default]
    Ctr,
    /// Announces `udp_aead`: AES-128-GCM over UDP.
    Gcm,
    /// Announces `quic`: a QUIC connection with datagrams.
    Quic,
}

impl Transport {
    /// The current firmware's hello announcing this transport (for `Ctr`, exactly the
    /// firmware's).
    pub fn hello(self) -> Value {
        self.hello_for(super::firmware::Firmware::default())
    }

    /// `firmware`'s hello announcing this transport.
    pub fn hello_for(self, firmware: super::firmware::Firmware) -> Value {
        let mut hello = firmware.hello();
        match self {
            Transport::Ctr => {}
            Transport::Gcm => hello["features"]["udp_aead"] = Value::Bool(true),
            Transport::Quic => hello["features"]["quic"] = Value::Bool(true),
        }
        hello
    }

    pub fn label(self) -> &'static str {
        match self {
            Transport::Ctr => "ctr",
            Transport::Gcm => "gcm",
            Transport::Quic => "quic",
        }
    }
}

/// What a QUIC server hello adds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuicHello {
    pub cert_sha256: [u8; 32],
    pub token: [u8; 16],
}

/// What the server's hello told the device.
#[derive(Debug, Clone)]
pub struct ServerHello {
    pub session_id: String,
    /// Where audio goes: the UDP audio port, or the QUIC endpoint.
    pub udp: SocketAddr,
    /// UDP only (zero for QUIC).
    pub key: [u8; 16],
    pub nonce: [u8; 16],
    /// UDP only: the suite (`udp.encryption`).
    pub encryption: Encryption,
    /// QUIC only.
    pub quic: Option<QuicHello>,
    pub downlink_sample_rate: u32,
    pub frame_duration: u32,
}

impl ServerHello {
    /// Parses a server hello the way the firmware does (and, for the extensions, the way
    /// docs/transports.md tells a client author to).
    pub fn parse(v: &Value) -> Result<ServerHello, SimError> {
        let bad = |what: &str| SimError::Protocol(format!("server hello: {what}: {v}"));
        let section = match v["transport"].as_str() {
            Some("udp") => "udp",
            Some("quic") => "quic",
            _ => return Err(bad("transport is neither udp nor quic")),
        };
        let host = v[section]["server"].as_str().ok_or_else(|| bad("server"))?;
        let port = v[section]["port"]
            .as_u64()
            .and_then(|p| u16::try_from(p).ok())
            .ok_or_else(|| bad("port"))?;
        let udp = format!("{host}:{port}")
            .parse()
            .map_err(|_| bad("server is not an IP"))?;
        let hex_field = |field: &str, len: usize| -> Result<Vec<u8>, SimError> {
            let s = v[section][field].as_str().ok_or_else(|| bad(field))?;
            hex::decode(s)
                .ok()
                .filter(|b| b.len() == len)
                .ok_or_else(|| bad(field))
        };
        let sized = |b: Vec<u8>| -> [u8; 16] { b.try_into().unwrap_or([0; 16]) };
        let (key, nonce, encryption, quic) = if section == "udp" {
            let encryption = Encryption::from_wire_name(
                v["udp"]["encryption"].as_str().unwrap_or("aes-128-ctr"),
            )
            .ok_or_else(|| bad("udp.encryption"))?;
            (
                sized(hex_field("key", 16)?),
                sized(hex_field("nonce", 16)?),
                encryption,
                None,
            )
        } else {
            let cert: [u8; 32] = hex_field("cert_sha256", 32)?
                .try_into()
                .map_err(|_| bad("cert_sha256"))?;
            let quic = QuicHello {
                cert_sha256: cert,
                token: sized(hex_field("token", 16)?),
            };
            ([0; 16], [0; 16], Encryption::Aes128Ctr, Some(quic))
        };
        Ok(ServerHello {
            session_id: v["session_id"].as_str().unwrap_or_default().to_owned(),
            udp,
            key,
            nonce,
            encryption,
            quic,
            downlink_sample_rate: v["audio_params"]["sample_rate"].as_u64().unwrap_or(16000) as u32,
            frame_duration: v["audio_params"]["frame_duration"].as_u64().unwrap_or(60) as u32,
        })
    }

    /// The transport this hello gave.
    pub fn transport(&self) -> Transport {
        match (&self.quic, self.encryption) {
            (Some(_), _) => Transport::Quic,
            (None, Encryption::Aes128Gcm) => Transport::Gcm,
            (None, Encryption::Aes128Ctr) => Transport::Ctr,
        }
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

/// The UDP suite a simulated device speaks.
enum UdpSuite {
    Ctr(PacketCipher),
    Gcm {
        sealer: Box<GcmSealer>,
        receiver: Box<GcmReceiver>,
    },
}

/// The device's UDP audio channel (AES-CTR or AES-GCM).
pub struct SimAudio {
    pub socket: UdpSocket,
    suite: UdpSuite,
    nonce: [u8; 16],
    next_sequence: u32,
    last_downlink_sequence: u32,
    buf: Vec<u8>,
    /// Downlink datagrams the firmware's checks (or, for GCM, the tag and replay
    /// window) would drop.
    pub rejected: u64,
}

impl SimAudio {
    /// Opens the channel the hello describes, from a local address of the caller's choice.
    pub async fn open(hello: &ServerHello, bind: SocketAddr) -> Result<SimAudio, SimError> {
        if hello.quic.is_some() {
            return Err(SimError::Protocol(
                "the hello offers QUIC; open it with SimLink::open".into(),
            ));
        }
        let socket = UdpSocket::bind(bind).await?;
        socket.connect(hello.udp).await?;
        let suite = match hello.encryption {
            Encryption::Aes128Ctr => UdpSuite::Ctr(PacketCipher::new(&hello.key)),
            Encryption::Aes128Gcm => {
                let cipher = GcmCipher::new(&hello.key);
                let id = hello.connection_id();
                UdpSuite::Gcm {
                    sealer: Box::new(GcmSealer::uplink(cipher.clone(), id)),
                    receiver: Box::new(GcmReceiver::downlink(cipher, id)),
                }
            }
        };
        Ok(SimAudio {
            socket,
            suite,
            nonce: hello.nonce,
            next_sequence: 1,
            last_downlink_sequence: 0,
            buf: vec![0; MAX_DATAGRAM_LEN + 1],
            rejected: 0,
        })
    }

    /// Builds the next uplink datagram (consuming a sequence number) without sending it.
    pub fn seal(&mut self, timestamp: u32, opus: &[u8]) -> Vec<u8> {
        let sequence = self.next_sequence;
        self.next_sequence += 1;
        let cipher = match &mut self.suite {
            UdpSuite::Ctr(cipher) => cipher,
            UdpSuite::Gcm { sealer, .. } => {
                let mut datagram = Vec::with_capacity(HEADER_LEN + opus.len() + 16);
                // The sealer numbers from 1 as this channel does; an oversized frame
                // yields an empty datagram, which the server drops as malformed.
                let _ = sealer.seal(timestamp, opus, &mut datagram);
                return datagram;
            }
        };
        let mut header = self.nonce;
        header[2..4].copy_from_slice(&(opus.len() as u16).to_be_bytes());
        header[8..12].copy_from_slice(&timestamp.to_be_bytes());
        header[12..16].copy_from_slice(&sequence.to_be_bytes());
        let mut datagram = Vec::with_capacity(HEADER_LEN + opus.len());
        datagram.extend_from_slice(&header);
        datagram.extend_from_slice(opus);
        cipher.apply(&header, &mut datagram[HEADER_LEN..]);
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
        let cipher = match &mut self.suite {
            UdpSuite::Ctr(cipher) => cipher,
            UdpSuite::Gcm { receiver, .. } => {
                let from = SocketAddr::from(([0, 0, 0, 0], 0));
                return match receiver.on_datagram(d, from) {
                    Verdict::Accept {
                        header, opus_len, ..
                    } => Some(DownlinkFrame {
                        sequence: header.sequence,
                        timestamp: header.timestamp,
                        opus: d[HEADER_LEN..HEADER_LEN + opus_len].to_vec(),
                    }),
                    Verdict::Drop(_) => {
                        self.rejected += 1;
                        None
                    }
                };
            }
        };
        let Some(head) = d.first_chunk::<HEADER_LEN>().copied() else {
            self.rejected += 1;
            return None;
        };
        let h = Header::from_bytes(&head);
        if head[0] != PACKET_TYPE_AUDIO
            || usize::from(h.payload_len) + HEADER_LEN != n
            || usize::from(h.payload_len) > super::firmware::MAX_DOWNLINK_PAYLOAD
            || h.sequence <= self.last_downlink_sequence
        {
            self.rejected += 1;
            return None;
        }
        self.last_downlink_sequence = h.sequence;
        cipher.apply(&head, &mut d[HEADER_LEN..]);
        Some(DownlinkFrame {
            sequence: h.sequence,
            timestamp: h.timestamp,
            opus: d[HEADER_LEN..].to_vec(),
        })
    }
}

/// A device's audio channel on any transport.
pub enum SimLink {
    Udp(Box<SimAudio>),
    Quic(SimQuic),
}

impl SimLink {
    /// Opens whatever the hello offers, from `bind` (the local UDP address).
    pub async fn open(hello: &ServerHello, bind: SocketAddr) -> Result<SimLink, SimError> {
        match &hello.quic {
            Some(quic) => Ok(SimLink::Quic(
                SimQuic::connect(hello.udp, quic, bind, false).await?,
            )),
            None => Ok(SimLink::Udp(Box::new(SimAudio::open(hello, bind).await?))),
        }
    }

    /// Sends one uplink frame.
    pub async fn send(&mut self, timestamp: u32, opus: &[u8]) -> Result<(), SimError> {
        match self {
            SimLink::Udp(a) => a.send(timestamp, opus).await,
            SimLink::Quic(q) => q.send(timestamp, opus),
        }
    }

    /// Receives the next downlink frame; `None` on timeout.
    pub async fn recv(&mut self, timeout: Duration) -> Result<Option<DownlinkFrame>, SimError> {
        match self {
            SimLink::Udp(a) => a.recv(timeout).await,
            SimLink::Quic(q) => q.recv(timeout).await,
        }
    }

    /// Downlink datagrams refused.
    pub fn rejected(&self) -> u64 {
        match self {
            SimLink::Udp(a) => a.rejected,
            SimLink::Quic(q) => q.rejected,
        }
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
