//! The floor: the least any server can do for this protocol, to measure the gateway
//! against.
//!
//! It speaks just enough MQTT for a device to get its audio channel (CONNECT with the
//! same password check as the gateway, the hello exchange, PINGREQ), and echoes audio on
//! one UDP socket from one thread: per datagram one `recv_from`, the header and sequence
//! checks, one AES-CTR pass to decrypt and one to re-encrypt under a downlink header, one
//! `send_to`. No batching, no queues, no tasks, no metrics, no locks: the kernel's cost
//! per datagram plus the cipher work, which is what the gateway's audio path cannot avoid.
//! A benchmark reports the gateway's CPU per talking device next to this server's.
//!
//! With [`FloorConfig::upstream`] set it is the *relay* floor instead: the same MQTT
//! side, and audio relayed to a xiaozhi-server over one WebSocket per conversation
//! ([`super::relay_floor`]).

use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::BytesMut;
use rand::Rng;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{ConnAck, ConnectReturnCode, Packet, Publish};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use xiaozhi_gateway::protocol::cipher::{KEY_LEN, PacketCipher};
use xiaozhi_gateway::protocol::credentials::Verifier;
use xiaozhi_gateway::protocol::datagram::{HEADER_LEN, Header, MAX_DATAGRAM_LEN, nonce_template};

use super::relay_floor;

/// Largest MQTT packet the floor reads (hellos and MCP replies are a few KB).
const MAX_PACKET: usize = 1 << 20;

/// How often the UDP thread looks at the stop flag when no datagram arrives.
const STOP_POLL: Duration = Duration::from_millis(200);

/// Where the floor listens.
#[derive(Debug, Clone)]
pub struct FloorConfig {
    pub mqtt: SocketAddr,
    pub udp: SocketAddr,
    /// Device passwords are checked against this key, as the gateway checks them; `None`
    /// accepts any well-formed credentials (the gateway's `--dev`).
    pub signature_key: Option<String>,
    /// Socket receive and send buffer request, bytes.
    pub socket_buffer: usize,
    /// Relay to this xiaozhi-server (`ws://host:port/path`) instead of echoing.
    pub upstream: Option<String>,
}

impl Default for FloorConfig {
    fn default() -> Self {
        FloorConfig {
            mqtt: ([127, 0, 0, 1], 0).into(),
            udp: ([127, 0, 0, 1], 0).into(),
            signature_key: None,
            socket_buffer: 4 << 20,
            upstream: None,
        }
    }
}

/// A registration from the MQTT side to the UDP thread.
pub(super) enum Registration {
    Open(u32, Box<FloorChannel>),
    Close(u32),
}

pub(super) struct FloorChannel {
    pub(super) cipher: PacketCipher,
    pub(super) last_uplink_sequence: u32,
    pub(super) downlink_sequence: u32,
}

/// A running floor server.
pub struct Floor {
    mqtt_addr: SocketAddr,
    udp_addr: SocketAddr,
    stop: Arc<AtomicBool>,
    udp_thread: Option<JoinHandle<u64>>,
    mqtt_thread: Option<JoinHandle<()>>,
    mqtt_stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Floor {
    /// Binds both sockets and starts the UDP thread and the MQTT thread.
    pub fn start(config: FloorConfig) -> io::Result<Floor> {
        if let Some(url) = &config.upstream {
            relay_floor::check_url(url)?;
        }
        let udp = bind_udp(config.udp, config.socket_buffer)?;
        udp.set_read_timeout(Some(STOP_POLL))?;
        let udp_addr = udp.local_addr()?;
        let std_listener = std::net::TcpListener::bind(config.mqtt)?;
        std_listener.set_nonblocking(true)?;
        let mqtt_addr = std_listener.local_addr()?;
        let (reg_tx, reg_rx) = mpsc::unbounded_channel();
        let stop = Arc::new(AtomicBool::new(false));
        let udp_thread = {
            let stop = stop.clone();
            match config.upstream {
                Some(url) => std::thread::Builder::new()
                    .name("floor-relay".into())
                    .spawn(move || relay_floor::run(udp, reg_rx, stop, url))?,
                None => std::thread::Builder::new()
                    .name("floor-udp".into())
                    .spawn(move || udp_loop(&udp, reg_rx, &stop))?,
            }
        };
        let verifier = match config.signature_key {
            Some(key) => Verifier::Signed {
                key: key.into_bytes(),
            },
            None => Verifier::Unsigned,
        };
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let mqtt_thread = std::thread::Builder::new()
            .name("floor-mqtt".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        eprintln!("floor: cannot start the MQTT runtime: {e}");
                        return;
                    }
                };
                runtime.block_on(async move {
                    let listener = match TcpListener::from_std(std_listener) {
                        Ok(l) => l,
                        Err(e) => {
                            eprintln!("floor: cannot use the MQTT listener: {e}");
                            return;
                        }
                    };
                    let hello = HelloContext {
                        udp: udp_addr,
                        verifier,
                        registrations: reg_tx,
                    };
                    tokio::select! {
                        _ = stop_rx => {}
                        () = accept_loop(listener, Arc::new(hello)) => {}
                    }
                });
            })?;
        Ok(Floor {
            mqtt_addr,
            udp_addr,
            stop,
            udp_thread: Some(udp_thread),
            mqtt_thread: Some(mqtt_thread),
            mqtt_stop: Some(stop_tx),
        })
    }

    pub fn mqtt_addr(&self) -> SocketAddr {
        self.mqtt_addr
    }

    pub fn udp_addr(&self) -> SocketAddr {
        self.udp_addr
    }

    /// Stops both threads; returns the number of datagrams echoed (relayed, up and
    /// down, for the relay floor).
    pub fn stop(mut self) -> u64 {
        self.shutdown()
    }

    /// Blocks until the process is killed (the `bench floor` command).
    pub fn wait(mut self) {
        if let Some(t) = self.udp_thread.take() {
            let _ = t.join();
        }
    }

    fn shutdown(&mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(tx) = self.mqtt_stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.mqtt_thread.take() {
            let _ = t.join();
        }
        self.udp_thread
            .take()
            .map_or(0, |t| t.join().unwrap_or_default())
    }
}

impl Drop for Floor {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn bind_udp(addr: SocketAddr, buffer: usize) -> io::Result<UdpSocket> {
    let domain = if addr.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let sock = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    let _ = sock.set_recv_buffer_size(buffer);
    let _ = sock.set_send_buffer_size(buffer);
    sock.bind(&addr.into())?;
    Ok(sock.into())
}

/// The hot loop. Returns the number of datagrams echoed.
fn udp_loop(
    socket: &UdpSocket,
    mut registrations: mpsc::UnboundedReceiver<Registration>,
    stop: &AtomicBool,
) -> u64 {
    let mut channels: HashMap<u32, FloorChannel> = HashMap::new();
    let mut buf = vec![0u8; MAX_DATAGRAM_LEN + 1];
    let mut echoed = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let (n, from) = match socket.recv_from(&mut buf) {
            Ok(r) => r,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                continue;
            }
            Err(_) => continue,
        };
        let Some(head) = buf[..n].first_chunk::<HEADER_LEN>().copied() else {
            continue;
        };
        let header = Header::from_bytes(&head);
        if head[0] != 1 || usize::from(header.payload_len) + HEADER_LEN != n || n > MAX_DATAGRAM_LEN
        {
            continue;
        }
        // Registrations are looked at only when an id is unknown, so the hot path never
        // touches the queue: the hello that announces an id is sent after its
        // registration, so the id is in the queue by the time its first datagram is.
        if !channels.contains_key(&header.connection_id) {
            while let Ok(r) = registrations.try_recv() {
                match r {
                    Registration::Open(id, c) => {
                        channels.insert(id, *c);
                    }
                    Registration::Close(id) => {
                        channels.remove(&id);
                    }
                }
            }
        }
        let Some(channel) = channels.get_mut(&header.connection_id) else {
            continue;
        };
        if header.sequence <= channel.last_uplink_sequence {
            continue;
        }
        channel.last_uplink_sequence = header.sequence;
        let payload = &mut buf[HEADER_LEN..n];
        channel.cipher.apply(&head, payload);
        channel.downlink_sequence += 1;
        let down = Header {
            flags: 0,
            payload_len: header.payload_len,
            connection_id: header.connection_id,
            timestamp: header.timestamp,
            sequence: channel.downlink_sequence,
        }
        .to_bytes();
        channel.cipher.apply(&down, payload);
        buf[..HEADER_LEN].copy_from_slice(&down);
        if socket.send_to(&buf[..n], from).is_ok() {
            echoed += 1;
        }
    }
    echoed
}

struct HelloContext {
    udp: SocketAddr,
    verifier: Verifier,
    registrations: mpsc::UnboundedSender<Registration>,
}

async fn accept_loop(listener: TcpListener, hello: Arc<HelloContext>) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = tcp.set_nodelay(true);
        tokio::spawn(connection(tcp, hello.clone()));
    }
}

/// One device's MQTT connection: CONNECT, then hellos and pings until it leaves.
async fn connection(mut tcp: TcpStream, hello: Arc<HelloContext>) {
    let mut rbuf = BytesMut::with_capacity(1024);
    let mut wbuf = BytesMut::with_capacity(512);
    let mut open: Vec<u32> = Vec::new();
    let Ok(Packet::Connect(connect)) = read_packet(&mut tcp, &mut rbuf).await else {
        return;
    };
    let (username, password) = connect
        .login
        .as_ref()
        .map(|l| (Some(l.username.as_str()), Some(l.password.as_str())))
        .unwrap_or_default();
    let identity = hello
        .verifier
        .verify(&connect.client_id, username, password);
    let code = if identity.is_ok() {
        ConnectReturnCode::Success
    } else {
        ConnectReturnCode::BadUserNamePassword
    };
    if write_packet(
        &mut tcp,
        &mut wbuf,
        Packet::ConnAck(ConnAck::new(code, false)),
    )
    .await
    .is_err()
    {
        return;
    }
    let Ok(identity) = identity else { return };
    let topic = format!("devices/p2p/{}", identity.mac.underscored());
    while let Ok(packet) = read_packet(&mut tcp, &mut rbuf).await {
        let reply = match packet {
            Packet::Publish(p) => match serde_json::from_slice::<Value>(&p.payload) {
                Ok(v) if v["type"] == "hello" => {
                    let (id, text) = open_channel(&hello, &v);
                    open.push(id);
                    Some(Packet::Publish(Publish::new(
                        topic.as_str(),
                        QoS::AtMostOnce,
                        text,
                    )))
                }
                _ => None,
            },
            Packet::PingReq => Some(Packet::PingResp),
            Packet::Disconnect => break,
            _ => None,
        };
        if let Some(reply) = reply
            && write_packet(&mut tcp, &mut wbuf, reply).await.is_err()
        {
            break;
        }
    }
    for id in open {
        let _ = hello.registrations.send(Registration::Close(id));
    }
}

/// Registers a fresh channel with the UDP thread and returns its id and the hello text.
fn open_channel(hello: &HelloContext, device_hello: &Value) -> (u32, String) {
    let mut rng = rand::rng();
    let key: [u8; KEY_LEN] = rng.random();
    let id: u32 = rng.random_range(1..=u32::MAX);
    let session: [u8; 16] = rng.random();
    let _ = hello.registrations.send(Registration::Open(
        id,
        Box::new(FloorChannel {
            cipher: PacketCipher::new(&key),
            last_uplink_sequence: 0,
            downlink_sequence: 0,
        }),
    ));
    let audio_params = match &device_hello["audio_params"] {
        Value::Object(_) => device_hello["audio_params"].clone(),
        _ => json!({"format": "opus", "sample_rate": 16000, "channels": 1, "frame_duration": 60}),
    };
    let text = json!({
        "type": "hello",
        "version": 3,
        "session_id": hex::encode(session),
        "transport": "udp",
        "udp": {
            "server": hello.udp.ip().to_string(),
            "port": hello.udp.port(),
            "encryption": "aes-128-ctr",
            "key": hex::encode(key),
            "nonce": hex::encode(nonce_template(id)),
        },
        "audio_params": audio_params,
    })
    .to_string();
    (id, text)
}

async fn read_packet(tcp: &mut TcpStream, buf: &mut BytesMut) -> io::Result<Packet> {
    loop {
        match Packet::read(buf, MAX_PACKET) {
            Ok(p) => return Ok(p),
            Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
            Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e.to_string())),
        }
        if tcp.read_buf(buf).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
}

async fn write_packet(tcp: &mut TcpStream, buf: &mut BytesMut, packet: Packet) -> io::Result<()> {
    buf.clear();
    packet
        .write(buf, MAX_PACKET)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
    tcp.write_all(buf).await
}
