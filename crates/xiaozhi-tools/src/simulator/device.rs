//! One simulated device's MQTT side, speaking as the firmware does: MQTT 3.1.1, the
//! manager-api style credentials, QoS 0 JSON to `device-server`, no SUBSCRIBE (unless a
//! test asks for one, as older firmware did), PINGREQ at half the keep-alive.
//!
//! MCP: like the firmware, the device answers the server's MCP requests itself (see
//! [`super::mcp`]): a `{"type":"mcp"}` message whose payload has a string `method` is
//! handled by the device's [`SimMcpServer`], logged (see [`SimDevice::mcp_requests`]) and
//! kept out of [`SimDevice::recv`]. The answer goes to `device-server` at QoS 0 as
//! `{"session_id":..,"type":"mcp","payload":..}`, with the session id of the last server
//! hello (or [`SimDevice::set_session_id`]), `""` before any. Turn this off with
//! [`SimDeviceOptions::mcp_auto`] or [`SimDevice::set_mcp_auto`] to see the requests in
//! `recv` and answer them by hand.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
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

use super::firmware::{Firmware, TextFont, check_server_message};
use super::mcp::{McpOutcome, SimMcpServer};
use xiaozhi_gateway::protocol::credentials::{sign, username_for_ip};
use xiaozhi_gateway::protocol::mac::Mac;

/// The keep-alive the firmware asks for.
pub const FIRMWARE_KEEP_ALIVE_SECS: u16 = 240;

/// How many MCP requests (and replies) a device remembers for tests.
pub const MCP_LOG_CAPACITY: usize = 1000;

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

/// How a simulated device behaves beyond its credentials.
#[derive(Debug, Clone)]
pub struct SimDeviceOptions {
    /// MQTT keep-alive in CONNECT.
    pub keep_alive: u16,
    /// Answer MCP requests automatically (the firmware does). When off, they arrive in
    /// [`SimDevice::recv`] like any other message.
    pub mcp_auto: bool,
    /// The device's MCP server: tools, paging, state.
    pub mcp: SimMcpServer,
    /// The firmware it runs: what its hello says, and whether server messages that
    /// firmware would refuse are recorded as violations ([`SimDevice::violations`]).
    pub firmware: Firmware,
}

impl Default for SimDeviceOptions {
    fn default() -> Self {
        SimDeviceOptions {
            keep_alive: FIRMWARE_KEEP_ALIVE_SECS,
            mcp_auto: true,
            mcp: SimMcpServer::default(),
            firmware: Firmware::default(),
        }
    }
}

/// How many refused server messages a device remembers.
pub const VIOLATIONS_CAPACITY: usize = 100;

/// A connected simulated device (MQTT side).
pub struct SimDevice {
    pub credentials: DeviceCredentials,
    writer: Arc<tokio::sync::Mutex<Writer>>,
    shared: Arc<Mutex<Shared>>,
    inbox: mpsc::Receiver<Inbound>,
    reader: JoinHandle<()>,
    replier: JoinHandle<()>,
    next_pkid: u16,
}

/// The write half, shared by the device's methods and its MCP replier.
struct Writer {
    half: WriteHalf<Box<dyn Stream>>,
    buf: BytesMut,
}

impl Writer {
    async fn send(&mut self, packet: Packet) -> Result<(), SimError> {
        self.buf.clear();
        packet
            .write(&mut self.buf, usize::MAX)
            .map_err(|e| SimError::Protocol(e.to_string()))?;
        self.half.write_all(&self.buf).await?;
        Ok(())
    }
}

/// State the reader task and the device share.
struct Shared {
    mcp: SimMcpServer,
    mcp_auto: bool,
    session_id: String,
    requests: VecDeque<Value>,
    replies: VecDeque<Value>,
    firmware: Firmware,
    /// The font a strict firmware checks glyph payloads against.
    font: Option<TextFont>,
    /// Server messages the firmware would have refused, and why (the last
    /// [`VIOLATIONS_CAPACITY`]).
    violations: VecDeque<String>,
    /// Glyphs received in payloads the firmware accepted.
    glyphs: u64,
}

fn push_bounded(log: &mut VecDeque<Value>, v: Value) {
    if log.len() == MCP_LOG_CAPACITY {
        log.pop_front();
    }
    log.push_back(v);
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
        Self::connect_with(addr, credentials, SimDeviceOptions::default()).await
    }

    /// Connects over TCP with options and completes CONNECT/CONNACK.
    pub async fn connect_with(
        addr: SocketAddr,
        credentials: DeviceCredentials,
        options: SimDeviceOptions,
    ) -> Result<SimDevice, SimError> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Self::connect_over_with(Box::new(stream), credentials, options).await
    }

    /// Completes CONNECT/CONNACK over any stream.
    pub async fn connect_over(
        stream: Box<dyn Stream>,
        credentials: DeviceCredentials,
        keep_alive: u16,
    ) -> Result<SimDevice, SimError> {
        let options = SimDeviceOptions {
            keep_alive,
            ..SimDeviceOptions::default()
        };
        Self::connect_over_with(stream, credentials, options).await
    }

    /// Completes CONNECT/CONNACK over any stream, with options.
    pub async fn connect_over_with(
        stream: Box<dyn Stream>,
        credentials: DeviceCredentials,
        options: SimDeviceOptions,
    ) -> Result<SimDevice, SimError> {
        let (mut reader, mut writer) = tokio::io::split(stream);
        let mut connect = Connect::new(credentials.client_id.clone());
        connect.keep_alive = options.keep_alive;
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
        let mut mcp = options.mcp;
        if mcp.mac.is_empty() {
            mcp.mac = credentials.mac.colon();
        }
        let shared = Arc::new(Mutex::new(Shared {
            mcp,
            mcp_auto: options.mcp_auto,
            session_id: String::new(),
            requests: VecDeque::new(),
            replies: VecDeque::new(),
            firmware: options.firmware,
            font: options.firmware.text_font(),
            violations: VecDeque::new(),
            glyphs: 0,
        }));
        let writer = Arc::new(tokio::sync::Mutex::new(Writer {
            half: writer,
            buf: wbuf,
        }));
        let (tx, inbox) = mpsc::channel(1024);
        let (reply_tx, reply_rx) = mpsc::unbounded_channel();
        let replier = tokio::spawn(reply_loop(
            reply_rx,
            Arc::downgrade(&writer),
            Arc::downgrade(&shared),
        ));
        let reader = tokio::spawn(read_loop(reader, rbuf, tx, shared.clone(), reply_tx));
        Ok(SimDevice {
            credentials,
            writer,
            shared,
            inbox,
            reader,
            replier,
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

    /// Publishes to any topic at QoS 0 (firmware never does; tests use it to check that
    /// the gateway refuses such publishes).
    pub async fn publish_to(&mut self, topic: &str, payload: Vec<u8>) -> Result<(), SimError> {
        self.send(Packet::Publish(Publish::new(
            topic,
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
        self.writer.lock().await.send(packet).await
    }

    fn shared(&self) -> MutexGuard<'_, Shared> {
        lock(&self.shared)
    }

    /// Turns automatic MCP answers on or off (on by default). Off, MCP requests arrive in
    /// [`SimDevice::recv`]; they are logged either way. The gateway asks right after
    /// CONNECT, so to catch its first requests use [`SimDeviceOptions::mcp_auto`].
    pub fn set_mcp_auto(&self, on: bool) {
        self.shared().mcp_auto = on;
    }

    /// The MCP request payloads (JSON-RPC, without the envelope) the server sent, oldest
    /// first: the last [`MCP_LOG_CAPACITY`], answered or not, notifications included.
    pub fn mcp_requests(&self) -> Vec<Value> {
        self.shared().requests.iter().cloned().collect()
    }

    /// The MCP replies the device published (whole messages, with `session_id`), oldest
    /// first: the last [`MCP_LOG_CAPACITY`].
    pub fn mcp_replies(&self) -> Vec<Value> {
        self.shared().replies.iter().cloned().collect()
    }

    /// Sets the session id MCP replies carry (the reader also takes it from every server
    /// hello, as the firmware does).
    pub fn set_session_id(&self, id: &str) {
        self.shared().session_id = id.to_owned();
    }

    /// The session id MCP replies carry now.
    pub fn session_id(&self) -> String {
        self.shared().session_id.clone()
    }

    /// The speaker volume, as MCP tool calls left it.
    pub fn mcp_volume(&self) -> u8 {
        self.shared().mcp.volume()
    }

    /// The vision capability the last `initialize` carried.
    pub fn mcp_vision(&self) -> Option<Value> {
        self.shared().mcp.vision()
    }

    /// Reads or changes the device's MCP server (tools, page size, state). Don't hold it
    /// across an await: the reader task needs it.
    pub fn with_mcp<R>(&self, f: impl FnOnce(&mut SimMcpServer) -> R) -> R {
        f(&mut self.shared().mcp)
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

    /// Closes the TCP connection without DISCONNECT, as a device that loses power or
    /// network does (the socket closes when the process does).
    pub async fn vanish(self) {
        self.replier.abort();
        let _ = self.writer.lock().await.half.shutdown().await;
        self.reader.abort();
    }

    /// Sends DISCONNECT and closes.
    pub async fn disconnect(mut self) {
        self.replier.abort();
        let _ = self.send(Packet::Disconnect).await;
        let _ = self.writer.lock().await.half.shutdown().await;
        self.reader.abort();
    }

    /// The hello current firmware (2.4) sends to open a conversation.
    pub fn firmware_hello() -> Value {
        Firmware::V2_4.hello()
    }

    /// The hello of 1.x firmware, still in the field.
    pub fn firmware_1x_hello() -> Value {
        Firmware::V1.hello()
    }

    /// The hello this device's firmware sends.
    pub fn hello(&self) -> Value {
        lock(&self.shared).firmware.hello()
    }

    /// The firmware this device runs.
    pub fn firmware(&self) -> Firmware {
        lock(&self.shared).firmware
    }

    /// Server messages this device's firmware would have refused, and why (always empty
    /// for a firmware that is not strict).
    pub fn violations(&self) -> Vec<String> {
        lock(&self.shared).violations.iter().cloned().collect()
    }

    /// Glyphs delivered in `glyph_push` payloads the firmware accepted.
    pub fn glyphs_accepted(&self) -> u64 {
        lock(&self.shared).glyphs
    }
}

impl Drop for SimDevice {
    fn drop(&mut self) {
        self.reader.abort();
        self.replier.abort();
    }
}

fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(|e| e.into_inner())
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
    shared: Arc<Mutex<Shared>>,
    replies: mpsc::UnboundedSender<Value>,
) {
    while let Ok(packet) = read_packet(&mut reader, &mut buf).await {
        let inbound = match packet {
            Packet::Publish(p) => {
                check_as_firmware(&p.payload, &shared);
                if answer_mcp(&p.payload, &shared, &replies) {
                    continue;
                }
                Inbound::Publish {
                    topic: p.topic,
                    payload: p.payload,
                }
            }
            Packet::SubAck(ack) => Inbound::SubAck(ack.return_codes),
            _ => continue,
        };
        if tx.send(inbound).await.is_err() {
            break;
        }
    }
}

/// A strict firmware's checks of one server message: violations are recorded, glyphs
/// counted.
fn check_as_firmware(payload: &[u8], shared: &Mutex<Shared>) {
    let font = {
        let s = lock(shared);
        if !s.firmware.is_strict() {
            return;
        }
        s.font.clone().unwrap_or_default()
    };
    let verdict = check_server_message(payload, &font);
    let mut s = lock(shared);
    match verdict {
        Ok(glyphs) => s.glyphs += glyphs as u64,
        Err(why) => {
            if s.violations.len() == VIOLATIONS_CAPACITY {
                s.violations.pop_front();
            }
            s.violations.push_back(why);
        }
    }
}

/// Looks at one server message as the firmware would: takes the session id of a hello,
/// and answers an MCP request. Whether the message was an MCP request the device
/// consumed (kept out of the inbox).
fn answer_mcp(
    payload: &[u8],
    shared: &Mutex<Shared>,
    replies: &mpsc::UnboundedSender<Value>,
) -> bool {
    let Ok(message) = serde_json::from_slice::<Value>(payload) else {
        return false;
    };
    let kind = message.get("type").and_then(Value::as_str);
    if kind == Some("hello")
        && let Some(id) = message.get("session_id").and_then(Value::as_str)
    {
        lock(shared).session_id = id.to_owned();
        return false;
    }
    let request = &message["payload"];
    if kind != Some("mcp") || !request["method"].is_string() {
        return false;
    }
    let outcome = {
        let mut s = lock(shared);
        push_bounded(&mut s.requests, request.clone());
        if !s.mcp_auto {
            return false;
        }
        s.mcp.handle(request)
    };
    match outcome {
        McpOutcome::Reply(reply) => {
            let _ = replies.send(reply);
        }
        McpOutcome::ReplyAfter(delay, reply) => {
            let replies = replies.clone();
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let _ = replies.send(reply);
            });
        }
        McpOutcome::Ignore => {}
    }
    true
}

/// Publishes MCP replies in the order they are ready, wrapped as the firmware's
/// `Protocol::SendMcpMessage` does. Holds the writer only weakly, so the connection
/// closes when the device is dropped.
async fn reply_loop(
    mut replies: mpsc::UnboundedReceiver<Value>,
    writer: Weak<tokio::sync::Mutex<Writer>>,
    shared: Weak<Mutex<Shared>>,
) {
    while let Some(payload) = replies.recv().await {
        let (Some(writer), Some(shared)) = (writer.upgrade(), shared.upgrade()) else {
            break;
        };
        let message = {
            let mut s = lock(&shared);
            let message = json!({"session_id": s.session_id, "type": "mcp", "payload": payload});
            push_bounded(&mut s.replies, message.clone());
            message
        };
        let publish = Publish::new("device-server", QoS::AtMostOnce, message.to_string());
        if writer
            .lock()
            .await
            .send(Packet::Publish(publish))
            .await
            .is_err()
        {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use rumqttc::mqttbytes::v4::ConnAck;
    use tokio::io::DuplexStream;

    use super::*;

    /// The server's side of a simulated device's connection.
    struct FakeServer {
        stream: DuplexStream,
        buf: BytesMut,
    }

    impl FakeServer {
        async fn send_json(&mut self, v: Value) {
            let mut out = BytesMut::new();
            Packet::Publish(Publish::new(
                "devices/p2p/x",
                QoS::AtMostOnce,
                v.to_string(),
            ))
            .write(&mut out, usize::MAX)
            .unwrap();
            self.stream.write_all(&out).await.unwrap();
        }

        async fn next_json(&mut self) -> Value {
            let p = tokio::time::timeout(
                Duration::from_secs(5),
                read_packet(&mut self.stream, &mut self.buf),
            )
            .await
            .expect("a packet in time")
            .unwrap();
            match p {
                Packet::Publish(p) => {
                    assert_eq!(p.topic, "device-server");
                    assert_eq!(p.qos, QoS::AtMostOnce);
                    serde_json::from_slice(&p.payload).unwrap()
                }
                other => panic!("expected PUBLISH, got {other:?}"),
            }
        }
    }

    async fn pair(options: SimDeviceOptions) -> (SimDevice, FakeServer) {
        let (device_side, server_side) = tokio::io::duplex(1 << 16);
        let mut server = FakeServer {
            stream: server_side,
            buf: BytesMut::new(),
        };
        let creds = DeviceCredentials::for_mac(DeviceCredentials::nth_mac(1), "GID_test", None);
        let handshake = async {
            let p = read_packet(&mut server.stream, &mut server.buf)
                .await
                .unwrap();
            assert!(matches!(p, Packet::Connect(..)));
            let mut out = BytesMut::new();
            Packet::ConnAck(ConnAck::new(ConnectReturnCode::Success, false))
                .write(&mut out, usize::MAX)
                .unwrap();
            server.stream.write_all(&out).await.unwrap();
        };
        let (dev, ()) = tokio::join!(
            SimDevice::connect_over_with(Box::new(device_side), creds, options),
            handshake
        );
        (dev.unwrap(), server)
    }

    fn mcp(payload: Value) -> Value {
        json!({"type": "mcp", "payload": payload})
    }

    #[tokio::test]
    async fn answers_mcp_and_keeps_it_out_of_the_inbox() {
        let (mut dev, mut server) = pair(SimDeviceOptions::default()).await;
        let vision = json!({"url": "http://v.example/x", "token": "t"});
        server
            .send_json(mcp(
                json!({"jsonrpc": "2.0", "id": 10000, "method": "initialize",
                "params": {"capabilities": {"vision": vision}}}),
            ))
            .await;
        let reply = server.next_json().await;
        assert_eq!(reply["session_id"], "");
        assert_eq!(reply["type"], "mcp");
        assert_eq!(reply["payload"]["id"], 10000);
        assert_eq!(reply["payload"]["result"]["protocolVersion"], "2024-11-05");
        assert_eq!(dev.mcp_vision(), Some(vision));

        // Notifications get no answer and stay out of the inbox too.
        server
            .send_json(mcp(
                json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
            ))
            .await;
        server
            .send_json(json!({"type": "hello", "session_id": "s-1", "transport": "udp"}))
            .await;
        let hello = dev
            .recv_type("hello", Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(hello["session_id"], "s-1");
        assert_eq!(dev.session_id(), "s-1");

        server
            .send_json(mcp(
                json!({"jsonrpc": "2.0", "id": 10001, "method": "tools/call",
                "params": {"name": "self.audio_speaker.set_volume", "arguments": {"volume": 12}}}),
            ))
            .await;
        let reply = server.next_json().await;
        assert_eq!(reply["session_id"], "s-1");
        assert_eq!(reply["payload"]["id"], 10001);
        assert_eq!(reply["payload"]["result"]["content"][0]["text"], "true");
        assert_eq!(dev.mcp_volume(), 12);

        dev.set_session_id("s-2");
        server
            .send_json(mcp(
                json!({"jsonrpc": "2.0", "id": 10002, "method": "nope"}),
            ))
            .await;
        let reply = server.next_json().await;
        assert_eq!(reply["session_id"], "s-2");
        assert_eq!(reply["payload"]["error"]["code"], -32601);

        // An MCP message without a method (not a request) is an ordinary message.
        server
            .send_json(mcp(json!({"jsonrpc": "2.0", "id": 1, "result": {}})))
            .await;
        let v = dev.recv_type("mcp", Duration::from_secs(5)).await.unwrap();
        assert_eq!(v["payload"]["result"], json!({}));
        assert!(matches!(
            dev.recv(Duration::from_millis(100)).await,
            Err(SimError::Timeout(_))
        ));

        let methods: Vec<Value> = dev
            .mcp_requests()
            .iter()
            .map(|r| r["method"].clone())
            .collect();
        assert_eq!(
            methods,
            [
                "initialize",
                "notifications/initialized",
                "tools/call",
                "nope"
            ]
        );
        assert_eq!(dev.mcp_replies().len(), 3);

        // The device's own messages still go out.
        dev.publish_json(&json!({"type": "goodbye"})).await.unwrap();
        assert_eq!(server.next_json().await["type"], "goodbye");
        dev.disconnect().await;
    }

    #[tokio::test]
    async fn slow_calls_are_answered_when_done() {
        let (dev, mut server) = pair(SimDeviceOptions::default()).await;
        let sleep = |id: u64, ms: u64| {
            mcp(json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
                "params": {"name": "self.test.sleep", "arguments": {"ms": ms}}}))
        };
        server.send_json(sleep(1, 300)).await;
        server.send_json(sleep(2, 10)).await;
        server
            .send_json(mcp(
                json!({"jsonrpc": "2.0", "id": 3, "method": "tools/list"}),
            ))
            .await;
        let ids: Vec<Value> = [
            server.next_json().await,
            server.next_json().await,
            server.next_json().await,
        ]
        .iter()
        .map(|r| r["payload"]["id"].clone())
        .collect();
        assert_eq!(ids, [json!(3), json!(2), json!(1)]);
        drop(dev);
    }

    #[tokio::test]
    async fn manual_mode_passes_requests_through() {
        let options = SimDeviceOptions {
            mcp_auto: false,
            ..SimDeviceOptions::default()
        };
        let (mut dev, mut server) = pair(options).await;
        let request = json!({"jsonrpc": "2.0", "id": 5, "method": "tools/list"});
        server.send_json(mcp(request.clone())).await;
        let got = dev.recv_type("mcp", Duration::from_secs(5)).await.unwrap();
        assert_eq!(got["payload"], request);
        assert_eq!(dev.mcp_requests(), [request]);

        // Back on: answered again, with the page size the test set.
        dev.set_mcp_auto(true);
        dev.with_mcp(|m| m.page_size = 1);
        server
            .send_json(mcp(
                json!({"jsonrpc": "2.0", "id": 6, "method": "tools/list"}),
            ))
            .await;
        let reply = server.next_json().await;
        assert_eq!(
            reply["payload"]["result"]["tools"]
                .as_array()
                .unwrap()
                .len(),
            1
        );
        assert_eq!(
            reply["payload"]["result"]["nextCursor"],
            "self.audio_speaker.set_volume"
        );
    }
}
