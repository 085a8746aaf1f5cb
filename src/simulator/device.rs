//! One simulated device's MQTT side, speaking as the firmware does: MQTT 3.1.1, the
//! manager-api style credentials, QoS 0 JSON to `device-server`, no SUBSCRIBE (unless a
//! test asks for one, as older firmware did), PINGREQ at half the keep-alive.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{
    Connect, ConnectReturnCode, Login, Packet, Publish, Subscribe, SubscribeReasonCode,
};
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::protocol::credentials::{sign, username_for_ip};
use crate::protocol::mac::Mac;

/// The keep-alive the firmware asks for.
pub const FIRMWARE_KEEP_ALIVE_SECS: u16 = 240;

/// Credentials of a simulated device.
#[derive(Debug, Clone)]
pub struct DeviceCredentials {
    pub client_id: String,
    pub username: String,
    pub password: String,
    pub mac: Mac,
}

impl DeviceCredentials {
    /// Credentials the way manager-api issues them: `GROUP@@@MAC_@@@MAC_`, username
    /// base64 `{"ip":...}`, password the HMAC under `key` (any non-empty string if none).
    pub fn for_mac(mac: Mac, group: &str, key: Option<&[u8]>) -> Self {
        let client_id = format!("{group}@@@{mac}@@@{mac}");
        let username = username_for_ip("192.0.2.10");
        let password = match key {
            Some(k) => sign(k, &client_id, &username),
            None => "unsigned".to_owned(),
        };
        DeviceCredentials {
            client_id,
            username,
            password,
            mac,
        }
    }

    /// The n-th simulated MAC (`02:00:..`, locally administered).
    pub fn nth_mac(n: u32) -> Mac {
        let b = n.to_be_bytes();
        Mac::from_octets([0x02, 0x5a, b[0], b[1], b[2], b[3]])
    }
}

/// Errors a simulated device can meet.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("CONNACK refused with {0:?}")]
    Refused(ConnectReturnCode),
    #[error("connection closed")]
    Closed,
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    #[error("protocol: {0}")]
    Protocol(String),
}

/// A connected simulated device (MQTT side).
pub struct SimDevice {
    pub credentials: DeviceCredentials,
    writer: WriteHalf<Box<dyn Stream>>,
    inbox: mpsc::Receiver<Inbound>,
    reader: JoinHandle<()>,
    wbuf: BytesMut,
    next_pkid: u16,
}

/// A byte stream the simulator can run over (TCP or TLS).
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Stream for T {}

/// What the reader task passes on.
#[derive(Debug)]
enum Inbound {
    Publish { topic: String, payload: Bytes },
    SubAck(Vec<SubscribeReasonCode>),
}

impl SimDevice {
    /// Connects over TCP and completes CONNECT/CONNACK.
    pub async fn connect(
        addr: SocketAddr,
        credentials: DeviceCredentials,
    ) -> Result<SimDevice, SimError> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Self::connect_over(Box::new(stream), credentials, FIRMWARE_KEEP_ALIVE_SECS).await
    }

    /// Completes CONNECT/CONNACK over any stream.
    pub async fn connect_over(
        stream: Box<dyn Stream>,
        credentials: DeviceCredentials,
        keep_alive: u16,
    ) -> Result<SimDevice, SimError> {
        let (mut reader, mut writer) = tokio::io::split(stream);
        let mut connect = Connect::new(credentials.client_id.clone());
        connect.keep_alive = keep_alive;
        connect.login = Some(Login::new(
            credentials.username.clone(),
            credentials.password.clone(),
        ));
        let mut wbuf = BytesMut::new();
        Packet::Connect(connect)
            .write(&mut wbuf, usize::MAX)
            .map_err(|e| SimError::Protocol(e.to_string()))?;
        writer.write_all(&wbuf).await?;
        wbuf.clear();

        let mut rbuf = BytesMut::with_capacity(4096);
        let connack =
            tokio::time::timeout(Duration::from_secs(10), read_packet(&mut reader, &mut rbuf))
                .await
                .map_err(|_| SimError::Timeout("CONNACK"))??;
        match connack {
            Packet::ConnAck(ack) if ack.code == ConnectReturnCode::Success => {}
            Packet::ConnAck(ack) => return Err(SimError::Refused(ack.code)),
            other => {
                return Err(SimError::Protocol(format!(
                    "expected CONNACK, got {other:?}"
                )));
            }
        }
        let (tx, inbox) = mpsc::channel(1024);
        let reader = tokio::spawn(read_loop(reader, rbuf, tx));
        Ok(SimDevice {
            credentials,
            writer,
            inbox,
            reader,
            wbuf,
            next_pkid: 1,
        })
    }

    /// Publishes JSON to `device-server` at QoS 0, as the firmware does.
    pub async fn publish_json(&mut self, value: &Value) -> Result<(), SimError> {
        self.publish_raw(value.to_string().into_bytes()).await
    }

    /// Publishes any bytes to `device-server` at QoS 0.
    pub async fn publish_raw(&mut self, payload: Vec<u8>) -> Result<(), SimError> {
        self.send(Packet::Publish(Publish::new(
            "device-server",
            QoS::AtMostOnce,
            payload,
        )))
        .await
    }

    /// Sends a PINGREQ.
    pub async fn ping(&mut self) -> Result<(), SimError> {
        self.send(Packet::PingReq).await
    }

    /// Subscribes (older firmware did) and returns the SUBACK codes.
    pub async fn subscribe(&mut self, topic: &str) -> Result<Vec<SubscribeReasonCode>, SimError> {
        let mut s = Subscribe::new(topic, QoS::AtMostOnce);
        s.pkid = self.next_pkid;
        self.next_pkid = self.next_pkid.wrapping_add(1).max(1);
        self.send(Packet::Subscribe(s)).await?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            match tokio::time::timeout_at(deadline, self.inbox.recv()).await {
                Ok(Some(Inbound::SubAck(codes))) => return Ok(codes),
                Ok(Some(_)) => continue,
                Ok(None) => return Err(SimError::Closed),
                Err(_) => return Err(SimError::Timeout("SUBACK")),
            }
        }
    }

    async fn send(&mut self, packet: Packet) -> Result<(), SimError> {
        self.wbuf.clear();
        packet
            .write(&mut self.wbuf, usize::MAX)
            .map_err(|e| SimError::Protocol(e.to_string()))?;
        self.writer.write_all(&self.wbuf).await?;
        Ok(())
    }

    /// The next message the server published to this device (topic, payload).
    pub async fn recv(&mut self, timeout: Duration) -> Result<(String, Bytes), SimError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.inbox.recv()).await {
                Ok(Some(Inbound::Publish { topic, payload })) => return Ok((topic, payload)),
                Ok(Some(_)) => continue,
                Ok(None) => return Err(SimError::Closed),
                Err(_) => return Err(SimError::Timeout("a server message")),
            }
        }
    }

    /// The next JSON message of the given `type`, skipping others.
    pub async fn recv_type(&mut self, kind: &str, timeout: Duration) -> Result<Value, SimError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            let (_, payload) = self.recv(remaining).await?;
            if let Ok(v) = serde_json::from_slice::<Value>(&payload)
                && v["type"] == kind
            {
                return Ok(v);
            }
        }
    }

    /// Whether the server has closed the connection (the reader task ended).
    pub fn is_closed(&self) -> bool {
        self.reader.is_finished()
    }

    /// Waits until the server closes the connection.
    pub async fn closed(&mut self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.inbox.recv()).await {
                Ok(Some(_)) => continue,
                Ok(None) => return true,
                Err(_) => return false,
            }
        }
    }

    /// Sends DISCONNECT and closes.
    pub async fn disconnect(mut self) {
        let _ = self.send(Packet::Disconnect).await;
        let _ = self.writer.shutdown().await;
        self.reader.abort();
    }

    /// The hello the firmware sends to open a conversation.
    pub fn firmware_hello() -> Value {
        json!({
            "type": "hello",
            "version": 3,
            "transport": "udp",
            "features": { "mcp": true, "aec": false },
            "audio_params": { "format": "opus", "sample_rate": 16000, "channels": 1, "frame_duration": 60 },
        })
    }
}

impl Drop for SimDevice {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

async fn read_packet<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
) -> Result<Packet, SimError> {
    loop {
        match Packet::read(buf, 1 << 20) {
            Ok(p) => return Ok(p),
            Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
            Err(e) => return Err(SimError::Protocol(e.to_string())),
        }
        if reader.read_buf(buf).await? == 0 {
            return Err(SimError::Closed);
        }
    }
}

async fn read_loop(
    mut reader: ReadHalf<Box<dyn Stream>>,
    mut buf: BytesMut,
    tx: mpsc::Sender<Inbound>,
) {
    while let Ok(packet) = read_packet(&mut reader, &mut buf).await {
        let inbound = match packet {
            Packet::Publish(p) => Inbound::Publish {
                topic: p.topic,
                payload: p.payload,
            },
            Packet::SubAck(ack) => Inbound::SubAck(ack.return_codes),
            _ => continue,
        };
        if tx.send(inbound).await.is_err() {
            break;
        }
    }
}
