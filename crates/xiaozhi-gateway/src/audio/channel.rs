//! What a conversation holds of its audio channel, whichever transport carries it.
//!
//! [`AudioChannel`] is a lease: its connection id (UDP) or session token (QUIC) stays
//! reserved (and routed to this conversation) until it is dropped. The UDP receive task
//! removes its table entry lazily once the channel is closed, and a QUIC connection is
//! closed by its own task, so dropping never blocks.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::mpsc;
use tracing::debug;

use super::batch::SendQueue;
use crate::audio::quic::QuicDownlink;
use crate::metrics::Metrics;
use crate::protocol::cipher::KEY_LEN;
use crate::protocol::encryption::{ChannelSealer, Encryption};
use crate::protocol::session::EndReason;

/// A conversation's own control stream to the device (QUIC), preferred over MQTT while
/// it is open: the JSON side of a channel that has one.
pub trait ControlStream: Send + Sync + 'static {
    /// Queues a message on the stream; false if the stream is not (or no longer) there,
    /// and the message should go by MQTT.
    fn try_send(&self, payload: &Bytes) -> bool;
}

/// One decrypted uplink Opus frame.
#[derive(Debug, Clone)]
pub struct UplinkFrame {
    /// The device's timestamp from the datagram header.
    pub timestamp: u32,
    pub sequence: u32,
    pub opus: Bytes,
}

/// State shared between the receive task and the conversation.
#[derive(Debug)]
pub(crate) struct ChannelShared {
    /// The device's current UDP address, written by the receive task when the channel
    /// binds or rebinds, read for every downlink datagram.
    pub peer: Mutex<Option<SocketAddr>>,
    /// Milliseconds since `epoch` of the last audio in either direction.
    pub last_activity_ms: AtomicU64,
    pub epoch: Instant,
    /// This channel's traffic, for the session-end event and log line.
    pub stats: ChannelCounters,
    /// Set by a pipeline that plays the uplink straight back (realtime echo): the socket
    /// task then seals each accepted frame back to the device itself instead of handing
    /// it to the conversation (see [`Downlink::set_reflect`]).
    pub reflect: AtomicBool,
    /// Milliseconds since `epoch` of the last accepted uplink datagram.
    pub last_uplink_ms: AtomicU64,
    /// The conversation has let go of the channel (its `AudioChannel` was dropped). The
    /// receive task reads this flag, which sits with the state it touches per datagram
    /// anyway, instead of asking the uplink queue (a cache miss per datagram).
    pub closed: AtomicBool,
}

/// Per-channel traffic counters (relaxed atomics: one writer each way, read at the end).
#[derive(Debug, Default)]
pub(crate) struct ChannelCounters {
    pub uplink_packets: AtomicU64,
    pub uplink_bytes: AtomicU64,
    pub downlink_packets: AtomicU64,
    pub downlink_bytes: AtomicU64,
    /// Datagrams for this channel refused (replay, hijack, undecryptable, malformed) or
    /// frames lost to a full queue, either way.
    pub dropped: AtomicU64,
}

/// A snapshot of one channel's traffic.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ChannelStats {
    pub uplink_packets: u64,
    pub uplink_bytes: u64,
    pub downlink_packets: u64,
    pub downlink_bytes: u64,
    pub dropped: u64,
}

impl ChannelCounters {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    fn snapshot(&self) -> ChannelStats {
        ChannelStats {
            uplink_packets: self.uplink_packets.load(Ordering::Relaxed),
            uplink_bytes: self.uplink_bytes.load(Ordering::Relaxed),
            downlink_packets: self.downlink_packets.load(Ordering::Relaxed),
            downlink_bytes: self.downlink_bytes.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
        }
    }
}

impl ChannelShared {
    pub(crate) fn new(epoch: Instant) -> ChannelShared {
        ChannelShared {
            peer: Mutex::new(None),
            last_activity_ms: AtomicU64::new(0),
            epoch,
            stats: ChannelCounters::default(),
            reflect: AtomicBool::new(false),
            last_uplink_ms: AtomicU64::new(0),
            closed: AtomicBool::new(false),
        }
    }

    pub(crate) fn touch(&self) {
        let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_activity_ms.store(ms, Ordering::Relaxed);
    }

    /// Records an accepted uplink datagram (for activity and for turn ends).
    pub(crate) fn uplink_seen(&self) {
        let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_activity_ms.store(ms, Ordering::Relaxed);
        self.last_uplink_ms.store(ms, Ordering::Relaxed);
    }
}

/// What the server hello tells the device about its channel.
#[derive(Clone, PartialEq, Eq)]
pub enum Attach {
    /// Datagrams on the UDP audio port, routed by connection id.
    Udp {
        connection_id: u32,
        key: [u8; KEY_LEN],
        encryption: Encryption,
    },
    /// A QUIC connection to the QUIC port that presents this one-time token.
    Quic {
        token: [u8; crate::audio::quic::TOKEN_LEN],
        offer: crate::audio::quic::endpoint::QuicOffer,
    },
}

impl std::fmt::Debug for Attach {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Attach::Udp {
                connection_id,
                encryption,
                ..
            } => write!(f, "Udp({connection_id:#010x}, {})", encryption.wire_name()),
            Attach::Quic { .. } => f.write_str("Quic(<token>)"),
        }
    }
}

impl Attach {
    /// The transport's name in logs, events and metrics: `ctr`, `gcm` or `quic`.
    pub fn label(&self) -> &'static str {
        match self {
            Attach::Udp {
                encryption: Encryption::Aes128Ctr,
                ..
            } => "ctr",
            Attach::Udp {
                encryption: Encryption::Aes128Gcm,
                ..
            } => "gcm",
            Attach::Quic { .. } => "quic",
        }
    }
}

/// Frees what a channel reserved when it is dropped.
pub(crate) enum Lease {
    Udp {
        live_ids: Arc<Mutex<std::collections::HashSet<u32>>>,
        connection_id: u32,
    },
    Quic(crate::audio::quic::QuicLease),
}

/// A conversation's audio channel.
pub struct AudioChannel {
    /// What the hello announces.
    pub attach: Attach,
    /// Decrypted uplink frames, in arrival order.
    pub uplink: mpsc::Receiver<UplinkFrame>,
    /// Sends downlink frames.
    pub downlink: Downlink,
    pub(crate) shared: Arc<ChannelShared>,
    pub(crate) lease: Lease,
}

/// A UDP channel another channel's uplink can be spliced into (a device call between two
/// devices of this node): its connection id, its shared state and its downlink sealer,
/// held weakly so that holding a target keeps nothing of a channel that has gone.
#[derive(Debug, Clone)]
pub struct SpliceTarget {
    pub(crate) connection_id: u32,
    pub(crate) shared: std::sync::Weak<ChannelShared>,
    pub(crate) sealer: std::sync::Weak<Mutex<ChannelSealer>>,
}

impl AudioChannel {
    /// What another channel's uplink can be spliced into: UDP channels only (a QUIC
    /// channel's downlink is not the UDP socket's).
    pub fn splice_target(&self) -> Option<SpliceTarget> {
        match (&self.attach, &self.downlink.path) {
            (Attach::Udp { connection_id, .. }, DownlinkPath::Udp { sealer, .. }) => {
                Some(SpliceTarget {
                    connection_id: *connection_id,
                    shared: Arc::downgrade(&self.shared),
                    sealer: Arc::downgrade(sealer),
                })
            }
            _ => None,
        }
    }

    /// Whether the channel has been idle (no audio either way) for `timeout`: the idle
    /// rule (`xiaozhi_proto::session::idle_end`) fed with this channel's last activity
    /// and its clock.
    pub fn idle_end(&self, timeout: std::time::Duration) -> Option<EndReason> {
        let last = self.shared.last_activity_ms.load(Ordering::Relaxed);
        let now = u64::try_from(self.shared.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        let timeout = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        crate::protocol::session::idle_end(last, now, timeout)
    }

    /// Traffic so far.
    pub fn stats(&self) -> ChannelStats {
        self.shared.stats.snapshot()
    }

    /// Resolves when the device has closed the channel's transport (QUIC); never for UDP,
    /// which has no notion of closing.
    pub async fn device_left(&self) {
        match &self.lease {
            Lease::Udp { .. } => std::future::pending().await,
            Lease::Quic(lease) => lease.device_left().await,
        }
    }

    /// The channel's own control stream, for a QUIC device that asked for one.
    pub fn control_stream(&self) -> Option<Arc<dyn ControlStream>> {
        match &self.lease {
            Lease::Udp { .. } => None,
            Lease::Quic(lease) => Some(lease.control_stream()),
        }
    }

    /// Splits off the parts a pipeline needs, keeping the lease (and idle tracking) here.
    pub fn take_io(&mut self) -> (mpsc::Receiver<UplinkFrame>, Downlink) {
        let (tx, rx) = mpsc::channel(1);
        drop(tx);
        let uplink = std::mem::replace(&mut self.uplink, rx);
        (uplink, self.downlink.clone())
    }
}

impl Drop for AudioChannel {
    fn drop(&mut self) {
        self.shared.reflect.store(false, Ordering::Relaxed);
        self.shared.closed.store(true, Ordering::Relaxed);
        match &self.lease {
            Lease::Udp {
                live_ids,
                connection_id,
            } => {
                live_ids
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(connection_id);
            }
            Lease::Quic(lease) => lease.release(),
        }
    }
}

/// Where downlink frames go.
#[derive(Clone)]
pub(crate) enum DownlinkPath {
    /// Sealed here, queued for the UDP socket task, which sends them in batches.
    Udp {
        sealer: Arc<Mutex<ChannelSealer>>,
        queue: Arc<SendQueue>,
    },
    /// Sent as QUIC datagrams on the device's connection, once it has attached.
    Quic(QuicDownlink),
}

/// Sends downlink frames to the device over its channel's transport.
pub struct Downlink {
    path: DownlinkPath,
    shared: Arc<ChannelShared>,
    metrics: Arc<Metrics>,
    buf: Vec<u8>,
}

impl Clone for Downlink {
    fn clone(&self) -> Self {
        Downlink {
            path: self.path.clone(),
            shared: self.shared.clone(),
            metrics: self.metrics.clone(),
            buf: Vec::with_capacity(256),
        }
    }
}

impl Downlink {
    pub(crate) fn new(
        path: DownlinkPath,
        shared: Arc<ChannelShared>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Downlink {
            path,
            shared,
            metrics,
            buf: Vec::with_capacity(256),
        }
    }

    /// Reflect mode, for a pipeline that plays the uplink straight back: while on, the
    /// socket task seals every accepted uplink frame back to the device in the same
    /// batch it received it, and the conversation no longer receives uplink frames. This
    /// takes the two task hand-offs per frame out of realtime echo. Turn it on only with
    /// nothing of the uplink still queued (or frames would overtake each other), and off
    /// before telling the device the turn has ended.
    pub fn set_reflect(&self, on: bool) {
        self.shared.reflect.store(on, Ordering::Relaxed);
    }

    /// When the last accepted uplink datagram arrived (long ago if none has).
    pub fn last_uplink(&self) -> Instant {
        let ms = self.shared.last_uplink_ms.load(Ordering::Relaxed);
        self.shared.epoch + std::time::Duration::from_millis(ms)
    }

    /// The device's address: on UDP once its first valid datagram arrived, on QUIC once
    /// it has attached (and wherever the connection has migrated to since).
    pub fn peer(&self) -> Option<SocketAddr> {
        match &self.path {
            DownlinkPath::Udp { .. } => *self.shared.peer.lock().unwrap_or_else(|p| p.into_inner()),
            DownlinkPath::Quic(quic) => quic.peer(),
        }
    }

    /// Encrypts one Opus frame and queues it for sending. A frame for a device whose
    /// address is not known yet (it has sent no audio, or has not attached over QUIC)
    /// is dropped and counted; so is one that finds the send queue full. Send errors are
    /// counted by the socket task.
    pub async fn send(&mut self, timestamp: u32, opus: &[u8]) -> bool {
        let (sealer, queue) = match &mut self.path {
            DownlinkPath::Udp { sealer, queue } => (sealer, queue),
            DownlinkPath::Quic(quic) => {
                let sent = quic.send(timestamp, opus, &self.shared, &self.metrics);
                if sent {
                    self.shared.touch();
                }
                return sent;
            }
        };
        let Some(peer) = *self.shared.peer.lock().unwrap_or_else(|p| p.into_inner()) else {
            Metrics::inc(&self.metrics.udp_drop_no_peer);
            return false;
        };
        let sealed =
            sealer
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .seal(timestamp, opus, &mut self.buf);
        if let Err(e) = sealed {
            Metrics::inc(&self.metrics.udp_drop_downlink_oversized);
            ChannelCounters::add(&self.shared.stats.dropped, 1);
            debug!(error = %e, "downlink frame cannot be sealed; dropped");
            return false;
        }
        self.shared.touch();
        match queue.push(peer, &self.buf) {
            Ok(()) => {
                let stats = &self.shared.stats;
                ChannelCounters::add(&stats.downlink_packets, 1);
                ChannelCounters::add(&stats.downlink_bytes, self.buf.len() as u64);
                true
            }
            Err(_) => {
                Metrics::inc(&self.metrics.udp_drop_send_queue_full);
                ChannelCounters::add(&self.shared.stats.dropped, 1);
                false
            }
        }
    }
}
