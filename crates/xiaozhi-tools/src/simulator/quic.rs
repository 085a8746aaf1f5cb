//! A simulated device's QUIC audio channel (the `quic` extension, docs/transports.md):
//! what a firmware or client author would implement, and what the tests and benches use.
//!
//! It connects to the endpoint the hello names, accepting only the certificate whose
//! SHA-256 the hello carries, opens its control stream, presents the token, waits for
//! `attached`, then sends and receives Opus as QUIC datagrams. It can move to another
//! local port mid-conversation ([`SimQuic::rebind`]) to exercise connection migration.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde_json::Value;

use super::audio::{DownlinkFrame, QuicHello};
use super::device::SimError;
use xiaozhi_gateway::audio::quic::cert::PinnedCert;
use xiaozhi_gateway::protocol::quic_framing::{
    self, ALPN, AudioDatagram, attach_json, control_frame, control_frame_len,
};

/// How long the client waits for the handshake and the `attached` answer.
const ATTACH_WAIT: Duration = Duration::from_secs(5);
/// Keep-alive PINGs, well inside the server's 30 s idle timeout.
const KEEP_ALIVE: Duration = Duration::from_secs(5);

/// An attached QUIC audio channel.
pub struct SimQuic {
    endpoint: quinn::Endpoint,
    pub conn: quinn::Connection,
    control_send: quinn::SendStream,
    control_recv: quinn::RecvStream,
    next_sequence: u32,
    last_downlink_sequence: u32,
    /// Downlink datagrams refused (malformed or not newer than the last one).
    pub rejected: u64,
}

fn protocol(what: impl std::fmt::Display) -> SimError {
    SimError::Protocol(what.to_string())
}

/// A QUIC client configuration that pins `cert_sha256`.
pub fn client_config(cert_sha256: [u8; 32]) -> Result<quinn::ClientConfig, SimError> {
    let tls = PinnedCert::new(cert_sha256).client_config(ALPN);
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(protocol)?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(KEEP_ALIVE));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

impl SimQuic {
    /// Connects from `bind` and attaches with the hello's token. `control`: ask for the
    /// server's control JSON on the stream instead of MQTT.
    pub async fn connect(
        server: SocketAddr,
        hello: &QuicHello,
        bind: SocketAddr,
        control: bool,
    ) -> Result<SimQuic, SimError> {
        let endpoint = quinn::Endpoint::client(bind)?;
        Self::connect_on(endpoint, server, hello, control).await
    }

    /// As [`SimQuic::connect`], on an endpoint the caller made (a bench shares one
    /// endpoint among many connections).
    pub async fn connect_on(
        endpoint: quinn::Endpoint,
        server: SocketAddr,
        hello: &QuicHello,
        control: bool,
    ) -> Result<SimQuic, SimError> {
        let config = client_config(hello.cert_sha256)?;
        let connecting = endpoint
            .connect_with(config, server, "xiaozhi-gateway")
            .map_err(protocol)?;
        let attach = async {
            let conn = connecting.await.map_err(protocol)?;
            let (mut send, mut recv) = conn.open_bi().await.map_err(protocol)?;
            let frame =
                control_frame(attach_json(&hello.token, control).as_bytes()).map_err(protocol)?;
            send.write_all(&frame).await.map_err(protocol)?;
            let answer = read_control(&mut recv)
                .await
                .map_err(|e| match conn.close_reason() {
                    Some(reason) => protocol(format!("refused: {reason}")),
                    None => e,
                })?
                .ok_or_else(|| protocol("control stream ended before attached"))?;
            if answer["type"] != "attached" {
                return Err(protocol(format!("expected attached, got {answer}")));
            }
            Ok((conn, send, recv))
        };
        let (conn, control_send, control_recv) = tokio::time::timeout(ATTACH_WAIT, attach)
            .await
            .map_err(|_| SimError::Timeout("QUIC attach"))??;
        Ok(SimQuic {
            endpoint,
            conn,
            control_send,
            control_recv,
            next_sequence: 1,
            last_downlink_sequence: 0,
            rejected: 0,
        })
    }

    /// Sends one uplink frame as a datagram.
    pub fn send(&mut self, timestamp: u32, opus: &[u8]) -> Result<(), SimError> {
        let mut buf = Vec::with_capacity(quic_framing::AUDIO_HEADER_LEN + opus.len());
        AudioDatagram {
            timestamp,
            sequence: self.next_sequence,
            opus,
        }
        .write(&mut buf);
        self.next_sequence += 1;
        self.conn
            .send_datagram(Bytes::from(buf))
            .map_err(|e| protocol(format!("QUIC datagram: {e}")))
    }

    /// Receives the next downlink frame newer than the last; `None` on timeout.
    pub async fn recv(&mut self, timeout: Duration) -> Result<Option<DownlinkFrame>, SimError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let datagram = match tokio::time::timeout_at(deadline, self.conn.read_datagram()).await
            {
                Ok(r) => r.map_err(|e| protocol(format!("QUIC connection: {e}")))?,
                Err(_) => return Ok(None),
            };
            match AudioDatagram::parse(&datagram) {
                Ok(d) if d.sequence > self.last_downlink_sequence => {
                    self.last_downlink_sequence = d.sequence;
                    return Ok(Some(DownlinkFrame {
                        sequence: d.sequence,
                        timestamp: d.timestamp,
                        opus: d.opus.to_vec(),
                    }));
                }
                _ => self.rejected += 1,
            }
        }
    }

    /// Sends control JSON on the stream (as it would go to MQTT).
    pub async fn send_control(&mut self, json: &Value) -> Result<(), SimError> {
        let frame = control_frame(json.to_string().as_bytes()).map_err(protocol)?;
        self.control_send.write_all(&frame).await.map_err(protocol)
    }

    /// The next control message from the server; `None` on timeout.
    pub async fn recv_control(&mut self, timeout: Duration) -> Result<Option<Value>, SimError> {
        match tokio::time::timeout(timeout, read_control(&mut self.control_recv)).await {
            Ok(r) => r,
            Err(_) => Ok(None),
        }
    }

    /// Moves the connection to a new local socket (bound to `bind`); returns its address.
    /// The server follows by QUIC connection migration.
    pub fn rebind(&self, bind: SocketAddr) -> Result<SocketAddr, SimError> {
        let socket = std::net::UdpSocket::bind(bind)?;
        let addr = socket.local_addr()?;
        self.endpoint.rebind(socket)?;
        Ok(addr)
    }

    /// The local address now.
    pub fn local_addr(&self) -> Result<SocketAddr, SimError> {
        Ok(self.endpoint.local_addr()?)
    }

    /// Closes the connection as a device ending its conversation does.
    pub fn close(&self) {
        self.conn
            .close(quic_framing::close_code::DONE.into(), b"goodbye");
    }

    /// Waits until the connection is closed (by either side) and says why.
    pub async fn closed(&self, timeout: Duration) -> Option<quinn::ConnectionError> {
        tokio::time::timeout(timeout, self.conn.closed()).await.ok()
    }
}

/// Reads one control frame as JSON; `None` at a clean end of stream.
async fn read_control(recv: &mut quinn::RecvStream) -> Result<Option<Value>, SimError> {
    let mut prefix = [0u8; 2];
    match recv.read_exact(&mut prefix).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(e) => return Err(protocol(format!("control stream: {e}"))),
    }
    let len = control_frame_len(prefix).map_err(protocol)?;
    let mut frame = vec![0u8; len];
    recv.read_exact(&mut frame)
        .await
        .map_err(|e| protocol(format!("control stream: {e}")))?;
    serde_json::from_slice(&frame)
        .map(Some)
        .map_err(|e| protocol(format!("control frame: {e}")))
}
