//! The QUIC endpoint driver: one accept loop, one task per connection.
//!
//! A connection must, within [`ATTACH_TIMEOUT`] of its handshake, open a bidirectional
//! stream and send an attach frame with a token from a hello. A good token binds the
//! connection to that conversation: audio datagrams then go both ways until either side
//! closes (the conversation ending closes with code `DONE`; the device closing ends the
//! conversation). A bad, reused or expired token, or no attach in time, closes the
//! connection with a code that says which, and is counted.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::FutureExt;
use rand::Rng;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::cert::ServerIdentity;
use super::tokens::{TokenRefusal, TokenTable};
use super::{ControlIn, QuicDownlink, QuicLease, Slot, send_datagram};
use crate::audio::UplinkFrame;
use crate::audio::channel::{
    Attach, AudioChannel, ChannelCounters, ChannelShared, Downlink, DownlinkPath, Lease,
};
use crate::lifecycle::Lifecycle;
use crate::limits::TokenBucket;
use crate::metrics::Metrics;
use crate::net::BindError;
use crate::protocol::quic_framing::{
    self, ALPN, AudioDatagram, close_code, control_frame, control_frame_len,
};

/// How long a client has, after its handshake, to present its token.
pub const ATTACH_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a QUIC handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection with no packets for this long is gone (clients keep it alive; the
/// firmware-style client pings every few seconds).
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How often spent tokens are forgotten.
const SWEEP_INTERVAL: Duration = Duration::from_secs(5);
/// Control frames queued for a device's stream before further ones go by MQTT.
const CONTROL_OUT_QUEUE: usize = 64;
/// How long a closing connection may take to deliver its last control messages.
const FLUSH: Duration = Duration::from_secs(1);

/// What the endpoint needs to be built.
pub struct QuicSettings {
    pub listen: SocketAddr,
    /// Announced in the hello; 0: the port bound.
    pub public_port: u16,
    pub identity: ServerIdentity,
    pub token_ttl: Duration,
    /// Uplink frames queued per conversation (`udp.uplink_queue`).
    pub uplink_queue: usize,
    /// Kernel socket buffers to ask for (`udp.recv_buffer_bytes`, `udp.send_buffer_bytes`;
    /// see [`crate::net::bind_udp`]).
    pub recv_buffer_bytes: usize,
    pub send_buffer_bytes: usize,
    /// Connections open at once; further ones are refused.
    pub max_connections: usize,
    /// Datagrams per second and burst one connection may send (`udp.channel_rate`,
    /// `udp.channel_burst`; rate 0: no limit).
    pub rate: u32,
    pub burst: u32,
    /// Control messages per second and burst one device may send on its stream, as
    /// over MQTT (`mqtt.message_rate`, `mqtt.message_burst`; rate 0: no limit).
    pub control_rate: u32,
    pub control_burst: u32,
}

/// The per-connection rate limits.
#[derive(Debug, Clone, Copy)]
struct Limits {
    datagrams: (u32, u32),
    control: (u32, u32),
}

/// The endpoint, to be run as one task.
pub struct QuicEndpoint {
    endpoint: quinn::Endpoint,
    table: Arc<Mutex<TokenTable<Arc<Slot>>>>,
    metrics: Arc<Metrics>,
    max_connections: usize,
    limits: Limits,
}

/// Handle for opening QUIC channels; cheap to clone.
#[derive(Clone)]
pub struct QuicHandle {
    table: Arc<Mutex<TokenTable<Arc<Slot>>>>,
    identity: ServerIdentity,
    metrics: Arc<Metrics>,
    uplink_queue: usize,
    local_addr: SocketAddr,
    public_port: u16,
    epoch: Instant,
}

/// What the hello tells a device about the QUIC endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuicOffer {
    pub port: u16,
    pub cert_sha256: [u8; 32],
    pub token_ttl_ms: u64,
}

impl QuicEndpoint {
    /// Binds the endpoint.
    pub fn bind(
        settings: QuicSettings,
        metrics: Arc<Metrics>,
    ) -> Result<(QuicEndpoint, QuicHandle), BindError> {
        let bind_err = |source| BindError {
            what: "QUIC audio",
            addr: settings.listen,
            setting: "quic.listen",
            source,
        };
        let tls = settings
            .identity
            .server_config(ALPN)
            .map_err(|e| bind_err(std::io::Error::other(e.to_string())))?;
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
            .map_err(|e| bind_err(std::io::Error::other(e.to_string())))?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        let mut transport = quinn::TransportConfig::default();
        transport
            .max_idle_timeout(Some(IDLE_TIMEOUT.try_into().expect("30 s fits a VarInt")))
            .max_concurrent_uni_streams(0u8.into())
            .max_concurrent_bidi_streams(1u8.into())
            .datagram_receive_buffer_size(Some(64 * 1024))
            .datagram_send_buffer_size(64 * 1024);
        server.transport_config(Arc::new(transport));
        server.migration(true);
        let socket = crate::net::bind_udp(
            settings.listen,
            settings.recv_buffer_bytes,
            settings.send_buffer_bytes,
        )
        .map_err(bind_err)?;
        let endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(server),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(bind_err)?;
        let local_addr = endpoint.local_addr().map_err(bind_err)?;
        let table = Arc::new(Mutex::new(TokenTable::new(settings.token_ttl)));
        let handle = QuicHandle {
            table: table.clone(),
            identity: settings.identity,
            metrics: metrics.clone(),
            uplink_queue: settings.uplink_queue,
            local_addr,
            public_port: if settings.public_port == 0 {
                local_addr.port()
            } else {
                settings.public_port
            },
            epoch: Instant::now(),
        };
        Ok((
            QuicEndpoint {
                endpoint,
                table,
                metrics,
                max_connections: settings.max_connections,
                limits: Limits {
                    datagrams: (settings.rate, settings.burst),
                    control: (settings.control_rate, settings.control_burst),
                },
            },
            handle,
        ))
    }

    /// Accepts connections until `life` says stop accepting. Its connections close when
    /// `life` closes connections; then the endpoint closes, waiting for its connections
    /// and for peers to acknowledge the close at most until the gateway's deadline (one
    /// grace period for everything, `shutdown.grace_secs`).
    pub async fn run(self, life: Lifecycle) {
        let tracker = TaskTracker::new();
        let close = life.close_signal();
        let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
        loop {
            tokio::select! {
                _ = life.accepting_stopped() => break,
                _ = sweep.tick() => {
                    let expired = self
                        .table
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .sweep(Instant::now());
                    Metrics::add(&self.metrics.quic_tokens_expired, expired as u64);
                }
                incoming = self.endpoint.accept() => {
                    let Some(incoming) = incoming else { break };
                    if self.endpoint.open_connections() >= self.max_connections {
                        Metrics::inc(&self.metrics.quic_refused_limit);
                        incoming.refuse();
                        continue;
                    }
                    tracker.spawn(serve(
                        incoming,
                        self.table.clone(),
                        self.metrics.clone(),
                        self.limits,
                        close.clone(),
                    ));
                }
            }
        }
        // Connections close when told (after the conversations they carry said goodbye).
        close.cancelled().await;
        tracker.close();
        let _ = life.until_deadline(tracker.wait()).await;
        self.endpoint
            .close(close_code::SHUTDOWN.into(), b"server shutting down");
        let _ = life.until_deadline(self.endpoint.wait_idle()).await;
    }
}

impl QuicHandle {
    /// The address the endpoint is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// What the hello announces (the certificate pin is read per hello, so a reloaded
    /// certificate is announced from then on).
    pub fn offer(&self) -> QuicOffer {
        let ttl = self.table.lock().unwrap_or_else(|p| p.into_inner()).ttl();
        QuicOffer {
            port: self.public_port,
            cert_sha256: self.identity.fingerprint(),
            token_ttl_ms: u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
        }
    }

    /// Issues a token for a new conversation's channel. `control_in` receives the
    /// control JSON the device sends on its stream.
    pub fn open_channel(&self, control_in: Option<ControlIn>) -> AudioChannel {
        let shared = Arc::new(ChannelShared::new(self.epoch));
        shared.touch();
        let (uplink_tx, uplink_rx) = mpsc::channel(self.uplink_queue);
        let slot = Arc::new(Slot {
            uplink_tx: Mutex::new(Some(uplink_tx)),
            shared: shared.clone(),
            conn: Mutex::new(None),
            next_sequence: AtomicU32::new(1),
            ended: CancellationToken::new(),
            device_left: CancellationToken::new(),
            control_in,
            control_out: OnceLock::new(),
            stream_overflowed: AtomicBool::new(false),
        });
        let token = {
            let mut rng = rand::rng();
            let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                let token: [u8; super::TOKEN_LEN] = rng.random();
                if table.issue(token, slot.clone(), Instant::now()) {
                    break token;
                }
            }
        };
        AudioChannel {
            attach: Attach::Quic {
                token,
                offer: self.offer(),
            },
            uplink: uplink_rx,
            downlink: Downlink::new(
                DownlinkPath::Quic(QuicDownlink(slot.clone())),
                shared.clone(),
                self.metrics.clone(),
            ),
            shared,
            lease: Lease::Quic(QuicLease {
                slot,
                token,
                table: self.table.clone(),
            }),
        }
    }
}

/// Why a connection was closed before it attached.
struct Refused {
    code: u32,
    reason: &'static str,
}

/// Reads the attach frame from the client's first stream.
async fn read_attach(
    conn: &quinn::Connection,
) -> Result<(quinn::SendStream, quinn::RecvStream, quic_framing::Attach), Refused> {
    let no_attach = |_| Refused {
        code: close_code::NO_ATTACH,
        reason: "no control stream",
    };
    let (send, mut recv) = conn.accept_bi().await.map_err(no_attach)?;
    let frame = read_frame(&mut recv).await?.ok_or(Refused {
        code: close_code::NO_ATTACH,
        reason: "control stream ended before the attach frame",
    })?;
    let attach = quic_framing::parse_attach(&frame).map_err(|_| Refused {
        code: close_code::BAD_FRAME,
        reason: "the first control frame is not a valid attach",
    })?;
    Ok((send, recv, attach))
}

/// Reads one control frame; `None` at a clean end of stream.
async fn read_frame(recv: &mut quinn::RecvStream) -> Result<Option<Vec<u8>>, Refused> {
    let bad = |_| Refused {
        code: close_code::BAD_FRAME,
        reason: "control stream broken",
    };
    let mut prefix = [0u8; 2];
    match recv.read_exact(&mut prefix).await {
        Ok(()) => {}
        // A clean end, or the connection going away: not a malformed frame.
        Err(quinn::ReadExactError::FinishedEarly(0))
        | Err(quinn::ReadExactError::ReadError(quinn::ReadError::ConnectionLost(_))) => {
            return Ok(None);
        }
        Err(e) => return Err(bad(e)),
    }
    let len = control_frame_len(prefix).map_err(|_| Refused {
        code: close_code::BAD_FRAME,
        reason: "control frame too large",
    })?;
    let mut frame = vec![0u8; len];
    recv.read_exact(&mut frame).await.map_err(bad)?;
    Ok(Some(frame))
}

/// One connection, from handshake to close.
async fn serve(
    incoming: quinn::Incoming,
    table: Arc<Mutex<TokenTable<Arc<Slot>>>>,
    metrics: Arc<Metrics>,
    limits: Limits,
    shutdown: CancellationToken,
) {
    let remote = incoming.remote_address();
    let conn = match tokio::time::timeout(HANDSHAKE_TIMEOUT, incoming).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            Metrics::inc(&metrics.quic_handshake_failed);
            debug!(%remote, error = %e, "QUIC handshake failed");
            return;
        }
        Err(_) => {
            Metrics::inc(&metrics.quic_handshake_failed);
            debug!(%remote, "QUIC handshake timed out");
            return;
        }
    };
    Metrics::inc(&metrics.quic_connections);
    let now = Instant::now();
    let mut buckets = (
        TokenBucket::new(limits.datagrams.0, limits.datagrams.1, now),
        TokenBucket::new(limits.control.0, limits.control.1, now),
    );
    attach_and_serve(&conn, &table, &metrics, &mut buckets, &shutdown).await;
    Metrics::dec(&metrics.quic_connections);
}

async fn attach_and_serve(
    conn: &quinn::Connection,
    table: &Mutex<TokenTable<Arc<Slot>>>,
    metrics: &Arc<Metrics>,
    (bucket, control_bucket): &mut (TokenBucket, TokenBucket),
    shutdown: &CancellationToken,
) {
    let remote = conn.remote_address();
    let attached = tokio::select! {
        r = tokio::time::timeout(ATTACH_TIMEOUT, read_attach(conn)) => r.unwrap_or(Err(Refused {
            code: close_code::NO_ATTACH,
            reason: "no attach frame in time",
        })),
        _ = shutdown.cancelled() => Err(Refused { code: close_code::SHUTDOWN, reason: "server shutting down" }),
    };
    let (send, mut recv, attach) = match attached {
        Ok(v) => v,
        Err(refused) => {
            Metrics::inc(&metrics.quic_refused_no_attach);
            debug!(%remote, reason = refused.reason, "QUIC connection closed before attaching");
            conn.close(refused.code.into(), refused.reason.as_bytes());
            return;
        }
    };
    let redeemed = table
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .redeem(&attach.token, Instant::now());
    let slot = match redeemed {
        Ok(slot) => slot,
        Err(why) => {
            Metrics::inc(match why {
                TokenRefusal::Unknown => &metrics.quic_refused_unknown_token,
                TokenRefusal::Reused => &metrics.quic_refused_reused_token,
                TokenRefusal::Expired => &metrics.quic_refused_expired_token,
                TokenRefusal::Ended => &metrics.quic_refused_ended,
            });
            let code = if why == TokenRefusal::Ended {
                debug!(%remote, "QUIC connection for a conversation that has ended");
                close_code::DONE
            } else {
                warn!(%remote, reason = why.label(), "QUIC connection refused: bad session token");
                close_code::BAD_TOKEN
            };
            conn.close(code.into(), why.label().as_bytes());
            return;
        }
    };
    let uplink_tx = slot
        .uplink_tx
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take();
    let Some(uplink_tx) = uplink_tx.filter(|_| !slot.ended.is_cancelled()) else {
        // The conversation ended between the hello and this connection.
        conn.close(close_code::DONE.into(), b"conversation ended");
        return;
    };
    *slot.conn.lock().unwrap_or_else(|p| p.into_inner()) = Some(conn.clone());
    Metrics::inc(&metrics.quic_attached);
    info!(%remote, control = attach.control, "QUIC channel attached");
    let mut control_out_rx = None;
    if attach.control {
        let (tx, rx) = mpsc::channel(CONTROL_OUT_QUEUE);
        let _ = slot.control_out.set(tx);
        control_out_rx = Some(rx);
    }

    let shared = slot.shared.clone();
    let mut last_remote = remote;
    let mut last_sequence = 0u32;
    let control_reader = async {
        loop {
            match read_frame(&mut recv).await {
                Ok(Some(frame)) => {
                    // The device's MQTT message rate applies on the stream too.
                    if !control_bucket.is_unlimited() && !control_bucket.try_take(Instant::now()) {
                        Metrics::inc(&metrics.mqtt_dropped_rate_limited);
                        continue;
                    }
                    if let Some(control_in) = &slot.control_in {
                        control_in(Bytes::from(frame));
                    }
                }
                Ok(None) => return None,
                Err(refused) => return Some(refused),
            }
        }
    }
    .fuse();
    // The stream's sending side: `attached`, then (if asked for) the conversation's
    // control JSON. It runs inside the loop below so a client that never opens its
    // receive window cannot hold this task; when the connection is about to close it
    // writes what is queued and finishes the stream, within `FLUSH`.
    let finishing = CancellationToken::new();
    let control_writer = write_control(send, control_out_rx, finishing.clone());
    tokio::pin!(control_writer);
    let mut writer_done = false;
    tokio::pin!(control_reader);
    let mut reader_done = false;
    let close = loop {
        tokio::select! {
            _ = slot.ended.cancelled() => {
                break Some((close_code::DONE, &b"conversation ended"[..]));
            }
            _ = shutdown.cancelled() => {
                break Some((close_code::SHUTDOWN, &b"server shutting down"[..]));
            }
            broken = &mut control_reader, if !reader_done => {
                reader_done = true;
                if let Some(refused) = broken {
                    Metrics::inc(&metrics.quic_drop_malformed);
                    conn.close(refused.code.into(), refused.reason.as_bytes());
                    slot.device_left.cancel();
                    break None;
                }
            }
            () = &mut control_writer, if !writer_done => writer_done = true,
            datagram = conn.read_datagram() => {
                let Ok(datagram) = datagram else {
                    Metrics::inc(&metrics.quic_closed_by_device);
                    slot.device_left.cancel();
                    break None;
                };
                Metrics::inc(&metrics.quic_rx_datagrams);
                Metrics::add(&metrics.quic_rx_bytes, datagram.len() as u64);
                // As on UDP: a flood costs a counter, not the conversation's queue.
                if !bucket.is_unlimited() && !bucket.try_take(Instant::now()) {
                    Metrics::inc(&metrics.udp_drop_rate_limited);
                    ChannelCounters::add(&shared.stats.dropped, 1);
                    continue;
                }
                let now_remote = conn.remote_address();
                if now_remote != last_remote {
                    Metrics::inc(&metrics.quic_migrations);
                    debug!(from = %last_remote, to = %now_remote, "QUIC connection migrated");
                    last_remote = now_remote;
                }
                on_datagram(&datagram, conn, &slot, &shared, &uplink_tx, &mut last_sequence, metrics);
            }
        }
    };
    if let Some((code, reason)) = close {
        // Deliver what the conversation said last (e.g. `tts stop`) before closing:
        // closing a QUIC connection abandons stream data not yet sent.
        finishing.cancel();
        if !writer_done {
            let _ = tokio::time::timeout(FLUSH, &mut control_writer).await;
        }
        conn.close(code.into(), reason);
    }
    *slot.conn.lock().unwrap_or_else(|p| p.into_inner()) = None;
}

/// Writes `attached`, then each queued control message, on the stream; once `finishing`
/// fires, writes what is still queued, finishes the stream and waits (bounded by the
/// caller) for the device to have read it. Without a queue (the device did not ask for
/// control on the stream) it only writes `attached` and finishes at the end.
async fn write_control(
    mut send: quinn::SendStream,
    mut queue: Option<mpsc::Receiver<Bytes>>,
    finishing: CancellationToken,
) {
    if !write_frame(&mut send, quic_framing::attached_json().as_bytes()).await {
        return;
    }
    loop {
        let next = async {
            match queue.as_mut() {
                Some(q) => q.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            _ = finishing.cancelled() => break,
            json = next => match json {
                Some(json) => {
                    if !write_frame(&mut send, &json).await {
                        return;
                    }
                }
                None => break,
            },
        }
    }
    if let Some(q) = queue.as_mut() {
        q.close();
        while let Ok(json) = q.try_recv() {
            if !write_frame(&mut send, &json).await {
                return;
            }
        }
    }
    let _ = send.finish();
    let _ = send.stopped().await;
}

/// Writes one control frame; false if the stream is gone. A message too large for a frame
/// was refused by `try_send` already (it went by MQTT), so it is skipped here.
async fn write_frame(send: &mut quinn::SendStream, json: &[u8]) -> bool {
    match control_frame(json) {
        Ok(frame) => send.write_all(&frame).await.is_ok(),
        Err(_) => true,
    }
}

fn on_datagram(
    datagram: &Bytes,
    conn: &quinn::Connection,
    slot: &Slot,
    shared: &ChannelShared,
    uplink_tx: &mpsc::Sender<UplinkFrame>,
    last_sequence: &mut u32,
    metrics: &Metrics,
) {
    let frame = match AudioDatagram::parse(datagram) {
        Ok(f) => f,
        Err(e) => {
            Metrics::inc(&metrics.quic_drop_malformed);
            ChannelCounters::add(&shared.stats.dropped, 1);
            debug!(error = %e, "QUIC audio datagram dropped");
            return;
        }
    };
    if frame.sequence > *last_sequence {
        let gap = frame.sequence - last_sequence.saturating_add(1);
        if gap > 0 && *last_sequence > 0 {
            Metrics::add(&metrics.udp_uplink_gaps, u64::from(gap));
        }
        *last_sequence = frame.sequence;
    }
    shared.uplink_seen();
    ChannelCounters::add(&shared.stats.uplink_packets, 1);
    ChannelCounters::add(&shared.stats.uplink_bytes, datagram.len() as u64);
    if shared.reflect.load(Ordering::Relaxed) {
        if send_datagram(conn, slot, frame.timestamp, frame.opus, shared, metrics) {
            Metrics::inc(&metrics.echo_frames_reflected);
        }
        return;
    }
    let opus = datagram.slice(quic_framing::AUDIO_HEADER_LEN..);
    let up = UplinkFrame {
        timestamp: frame.timestamp,
        sequence: frame.sequence,
        opus,
    };
    match uplink_tx.try_send(up) {
        Ok(()) => {}
        Err(mpsc::error::TrySendError::Full(_)) => {
            Metrics::inc(&metrics.udp_drop_queue_full);
            ChannelCounters::add(&shared.stats.dropped, 1);
        }
        Err(mpsc::error::TrySendError::Closed(_)) => {}
    }
}
