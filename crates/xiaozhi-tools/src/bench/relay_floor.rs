//! The relay floor: the least a UDP <-> xiaozhi-server relay can do, to measure the
//! gateway's relay against (`bench floor --upstream ws://...`).
//!
//! The floor's MQTT side ([`super::floor`]) hands out channels as usual; here each
//! channel also gets one WebSocket to the upstream, as xiaozhi-server's protocol wants
//! (one connection per conversation), opened with a hello as soon as the device's hello
//! is answered. One thread runs it all on a current-thread runtime:
//!
//! * one task receives every datagram: per datagram one `recv_from`, the header and
//!   sequence checks, one AES-CTR pass, and one WebSocket write of the frame (header +
//!   Opus) straight into that channel's socket;
//! * one task per WebSocket reads the server's frames: per frame one AES-CTR pass under a
//!   downlink header and one `send_to` to the device's address.
//!
//! No batching, no queues between tasks, no metrics, no chat history. What is left is
//! what any relay of this protocol pays: the kernel's per-datagram and per-segment work,
//! WebSocket framing and the cipher.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::stream::SplitSink;
use futures_util::{SinkExt as _, StreamExt as _};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use xiaozhi_gateway::audio::frame_slab::FrameSlab;
use xiaozhi_gateway::protocol::cipher::PacketCipher;
use xiaozhi_gateway::protocol::datagram::{HEADER_LEN, Header, MAX_DATAGRAM_LEN};
use xiaozhi_gateway::protocol::upstream::{decode_audio, encode_audio};

use super::floor::{FloorChannel, Registration};

/// How often the loop looks at the stop flag.
const STOP_POLL: Duration = Duration::from_millis(200);
/// WebSocket read buffer and write threshold (as the gateway's relay uses).
const WS_BUFFER: usize = 4 * 1024;

type Ws = WebSocketStream<TcpStream>;

/// One relayed channel, as the receive task holds it.
struct RelayChannel {
    floor: FloorChannel,
    /// The device's address, for the downlink task (set from the first datagram).
    peer: Arc<Mutex<Option<SocketAddr>>>,
    /// The upstream's sending half, once connected.
    upstream: Option<SplitSink<Ws, Message>>,
}

/// Runs the relay until `stop`; returns the frames relayed up and down.
pub(super) fn run(
    udp: std::net::UdpSocket,
    registrations: mpsc::UnboundedReceiver<Registration>,
    stop: Arc<AtomicBool>,
    upstream: String,
) -> u64 {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("relay floor: cannot start the runtime: {e}");
            return 0;
        }
    };
    runtime.block_on(relay(udp, registrations, stop, upstream))
}

async fn relay(
    udp: std::net::UdpSocket,
    mut registrations: mpsc::UnboundedReceiver<Registration>,
    stop: Arc<AtomicBool>,
    upstream: String,
) -> u64 {
    let udp = match udp
        .set_nonblocking(true)
        .and_then(|()| UdpSocket::from_std(udp))
    {
        Ok(u) => Arc::new(u),
        Err(e) => {
            eprintln!("relay floor: cannot use the UDP socket: {e}");
            return 0;
        }
    };
    let relayed = Arc::new(AtomicU64::new(0));
    let (connected_tx, mut connected) = mpsc::unbounded_channel();
    let mut channels: HashMap<u32, RelayChannel> = HashMap::new();
    let mut buf = vec![0u8; MAX_DATAGRAM_LEN + 1];
    let mut frame = Vec::with_capacity(MAX_DATAGRAM_LEN);
    let mut frames = FrameSlab::new(1024);
    let mut poll = tokio::time::interval(STOP_POLL);
    while !stop.load(Ordering::Relaxed) {
        tokio::select! {
            biased;
            Some(registration) = registrations.recv() => match registration {
                Registration::Open(id, channel) => {
                    let peer = Arc::new(Mutex::new(None));
                    tokio::spawn(connect(
                        upstream.clone(),
                        id,
                        channel.cipher.clone(),
                        peer.clone(),
                        udp.clone(),
                        relayed.clone(),
                        connected_tx.clone(),
                    ));
                    channels.insert(id, RelayChannel { floor: *channel, peer, upstream: None });
                }
                Registration::Close(id) => {
                    if let Some(mut gone) = channels.remove(&id)
                        && let Some(sink) = gone.upstream.as_mut()
                    {
                        let _ = sink.close().await;
                    }
                }
            },
            Some((id, sink)) = connected.recv() => {
                if let Some(channel) = channels.get_mut(&id) {
                    channel.upstream = Some(sink);
                }
            }
            received = udp.recv_from(&mut buf) => {
                let Ok((n, from)) = received else { continue };
                let Some(head) = buf[..n].first_chunk::<HEADER_LEN>().copied() else {
                    continue;
                };
                let header = Header::from_bytes(&head);
                if head[0] != 1 || usize::from(header.payload_len) + HEADER_LEN != n {
                    continue;
                }
                let Some(channel) = channels.get_mut(&header.connection_id) else {
                    continue;
                };
                if header.sequence <= channel.floor.last_uplink_sequence {
                    continue;
                }
                channel.floor.last_uplink_sequence = header.sequence;
                {
                    let mut peer = channel.peer.lock().unwrap_or_else(|p| p.into_inner());
                    if *peer != Some(from) {
                        *peer = Some(from);
                    }
                }
                let Some(sink) = channel.upstream.as_mut() else { continue };
                let payload = &mut buf[HEADER_LEN..n];
                channel.floor.cipher.apply(&head, payload);
                encode_audio(header.timestamp, payload, &mut frame);
                if sink.send(Message::Binary(frames.copy(&frame))).await.is_ok() {
                    relayed.fetch_add(1, Ordering::Relaxed);
                }
            }
            _ = poll.tick() => {}
        }
    }
    relayed.load(Ordering::Relaxed)
}

/// Opens a channel's WebSocket, says hello, hands the sending half to the receive task
/// and relays the server's frames to the device until the connection ends.
async fn connect(
    url: String,
    id: u32,
    cipher: PacketCipher,
    peer: Arc<Mutex<Option<SocketAddr>>>,
    udp: Arc<UdpSocket>,
    relayed: Arc<AtomicU64>,
    connected: mpsc::UnboundedSender<(u32, SplitSink<Ws, Message>)>,
) {
    let config = WebSocketConfig::default()
        .read_buffer_size(WS_BUFFER)
        .write_buffer_size(WS_BUFFER);
    let opened = async {
        let request = format!("{url}?from=mqtt_gateway").into_client_request()?;
        let host = request.uri().host().unwrap_or("127.0.0.1").to_owned();
        let port = request.uri().port_u16().unwrap_or(80);
        let tcp = TcpStream::connect((host.as_str(), port)).await?;
        tcp.set_nodelay(true)?;
        let (ws, _) =
            tokio_tungstenite::client_async_with_config(request, tcp, Some(config)).await?;
        Ok::<_, tokio_tungstenite::tungstenite::Error>(ws)
    };
    let ws = match opened.await {
        Ok(ws) => ws,
        Err(e) => {
            eprintln!("relay floor: cannot reach the upstream {url}: {e}");
            return;
        }
    };
    let (mut sink, mut stream) = ws.split();
    let hello = r#"{"type":"hello","version":1,"transport":"websocket","audio_params":{"format":"opus","sample_rate":16000,"channels":1,"frame_duration":60}}"#;
    if sink.send(Message::text(hello)).await.is_err() || connected.send((id, sink)).is_err() {
        return;
    }
    let mut datagram = vec![0u8; MAX_DATAGRAM_LEN];
    let mut sequence = 0u32;
    while let Some(Ok(message)) = stream.next().await {
        let Message::Binary(frame) = message else {
            continue;
        };
        let Ok(audio) = decode_audio(&frame) else {
            continue;
        };
        let opus = &frame[audio.payload];
        let Some(to) = *peer.lock().unwrap_or_else(|p| p.into_inner()) else {
            continue;
        };
        let Ok(payload_len) = u16::try_from(opus.len()) else {
            continue;
        };
        if HEADER_LEN + opus.len() > datagram.len() {
            continue;
        }
        sequence += 1;
        let down = Header {
            flags: 0,
            payload_len,
            connection_id: id,
            timestamp: audio.timestamp,
            sequence,
        }
        .to_bytes();
        datagram[..HEADER_LEN].copy_from_slice(&down);
        let body = &mut datagram[HEADER_LEN..HEADER_LEN + opus.len()];
        body.copy_from_slice(opus);
        cipher.apply(&down, body);
        if udp
            .send_to(&datagram[..HEADER_LEN + opus.len()], to)
            .await
            .is_ok()
        {
            relayed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Why the relay floor cannot start.
pub(super) fn check_url(url: &str) -> io::Result<()> {
    if url.starts_with("ws://") {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("--upstream {url:?}: want a ws:// URL (the relay floor speaks no TLS)"),
        ))
    }
}
