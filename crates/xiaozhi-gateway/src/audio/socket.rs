//! The UDP socket driver: the receive and send tasks of the audio path, one per shard.
//!
//! The audio port is served by `udp.shards` sockets bound together (`SO_REUSEPORT`),
//! one per core by default. A classic BPF program on the group hands each datagram to
//! the socket whose index is its connection id modulo the shard count, and a channel's
//! connection id is chosen so that this is the shard that holds it
//! ([`crate::net::bind_udp_steered`]). So each shard's task owns its part of the
//! routing table outright and the shards share nothing per datagram: no lock, no
//! cross-core wake-up, and a device whose NAT moves it to a new address or port stays
//! on its shard (the kernel's default 4-tuple hashing would move it). Elsewhere than
//! Linux there is one shard.
//!
//! Each shard's task takes no lock on its hot path: sessions register channels through
//! a bounded command queue that the task always drains before the next datagram
//! (`biased` select), which guarantees a channel is routable before its hello reaches
//! the device. Entries whose conversation has ended are removed lazily (when their
//! uplink receiver is found closed) and by a periodic sweep.
//!
//! The same task sends its channels' downlink datagrams: conversations seal their frames
//! into the shard's bounded [`SendQueue`] and the task sends what has gathered with one
//! `sendmmsg`, just as it receives with one `recvmmsg` ([`super::batch`]). Per datagram
//! that leaves the kernel's unavoidable work and the cipher, not a system call and a
//! wake-up each.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::batch::{BATCH, RecvBatch, SendBatch, SendQueue};
use super::channel::{
    Attach, AudioChannel, ChannelCounters, ChannelShared, Downlink, DownlinkPath, Lease,
    SpliceTarget, UplinkFrame,
};
use super::frame_slab::FrameSlab;
use crate::limits::TokenBucket;
use crate::metrics::Metrics;
use crate::net::{BindError, bind_udp_steered};
use crate::protocol::audio_channel::{DropReason, Verdict};
use crate::protocol::cipher::KEY_LEN;
use crate::protocol::datagram::{CONNECTION_ID_OFFSET, HEADER_LEN, Header};
use crate::protocol::encryption::{ChannelReceiver, ChannelSealer, Encryption};

/// How often closed channels are swept from the table even if no datagram names them.
const SWEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Receive batches handled before the task looks at its other duties again.
const BATCHES_PER_TURN: usize = 8;

/// Downlink datagrams that may wait for the socket task (about a second of audio for
/// 500 talking devices); beyond it frames are dropped and counted.
const SEND_QUEUE_CAPACITY: usize = 8192;

/// Bytes of uplink frames a channel's slab holds before it starts over: 8-15 frames of
/// 60 ms, more than a conversation that keeps up leaves unread (the slab is reclaimed
/// whenever it has consumed them all, see `FrameSlab`).
const UPLINK_SLAB_BYTES: usize = 1024;

struct Route {
    channel: ChannelReceiver,
    /// The channel's datagram rate (`udp.channel_rate`), checked before decryption.
    rate: TokenBucket,
    /// Already warned that this channel exceeds its rate.
    warned_rate: bool,
    uplink_tx: mpsc::Sender<UplinkFrame>,
    shared: Arc<ChannelShared>,
    /// The conversation's downlink sealer, for reflect mode and for splices into it.
    sealer: Arc<Mutex<ChannelSealer>>,
    /// A device call with a device of this node: accepted frames go to that channel's
    /// downlink (see [`AudioSocketHandle::splice`]), whichever shard holds it.
    splice: Option<Splice>,
    /// Where accepted frames are copied for the conversation (no allocation per frame).
    frames: FrameSlab,
}

/// Where a spliced channel's frames go: the target channel's state and downlink sealer,
/// held for as long as the splice lasts (its `closed` flag says when the target has
/// gone), so no routing table is consulted and the target may be on any shard.
struct Splice {
    shared: Arc<ChannelShared>,
    sealer: Arc<Mutex<ChannelSealer>>,
}

enum Command {
    Register {
        connection_id: u32,
        route: Box<Route>,
    },
    Splice {
        connection_id: u32,
        into: Option<SpliceTarget>,
    },
}

/// Handle for opening channels; cheap to clone.
#[derive(Clone)]
pub struct AudioSocketHandle {
    shards: Arc<[ShardHandle]>,
    /// Where the next channel goes (round robin).
    next_shard: Arc<AtomicUsize>,
    live_ids: Arc<Mutex<HashSet<u32>>>,
    limits: ChannelLimits,
    metrics: Arc<Metrics>,
    epoch: Instant,
    local_addr: SocketAddr,
}

/// What a session needs of one shard: its send queue and its command queue.
struct ShardHandle {
    send_queue: Arc<SendQueue>,
    commands: mpsc::Sender<Command>,
}

/// What each channel may use: its uplink queue and its datagram rate.
#[derive(Debug, Clone, Copy)]
pub struct ChannelLimits {
    /// Uplink frames queued for the conversation (`udp.uplink_queue`).
    pub uplink_queue: usize,
    /// Datagrams per second and burst (`udp.channel_rate`, `udp.channel_burst`; rate 0:
    /// no limit).
    pub rate: u32,
    pub burst: u32,
}

/// How the audio socket is bound.
#[derive(Debug, Clone, Copy)]
pub struct SocketOptions {
    pub listen: SocketAddr,
    /// Sockets and receive tasks (`udp.shards`; at least 1).
    pub shards: usize,
    pub recv_buffer: usize,
    pub send_buffer: usize,
}

/// The receive side: every shard, to be run by [`AudioSocket::run`].
pub struct AudioSocket {
    shards: Vec<Shard>,
}

/// One socket of the group, its part of the routing table and its send queue.
struct Shard {
    index: usize,
    socket: Arc<UdpSocket>,
    send_queue: Arc<SendQueue>,
    commands: mpsc::Receiver<Command>,
    metrics: Arc<Metrics>,
}

impl AudioSocket {
    /// Binds the audio socket's shards with the requested kernel buffer sizes.
    pub fn bind(
        options: SocketOptions,
        limits: ChannelLimits,
        metrics: Arc<Metrics>,
    ) -> Result<(AudioSocket, AudioSocketHandle), BindError> {
        let bind_err = |source| BindError {
            what: "UDP audio",
            addr: options.listen,
            setting: "udp.listen",
            source,
        };
        let sockets = bind_udp_steered(
            options.listen,
            options.shards.max(1),
            CONNECTION_ID_OFFSET as u32,
            options.recv_buffer,
            options.send_buffer,
        )
        .map_err(bind_err)?;
        let mut shards = Vec::with_capacity(sockets.len());
        let mut handles = Vec::with_capacity(sockets.len());
        let mut local_addr = options.listen;
        for (index, std_sock) in sockets.into_iter().enumerate() {
            let socket = Arc::new(UdpSocket::from_std(std_sock).map_err(bind_err)?);
            local_addr = socket.local_addr().map_err(bind_err)?;
            let (tx, rx) = mpsc::channel(1024);
            let send_queue = Arc::new(SendQueue::new(SEND_QUEUE_CAPACITY));
            handles.push(ShardHandle {
                send_queue: send_queue.clone(),
                commands: tx,
            });
            shards.push(Shard {
                index,
                socket,
                send_queue,
                commands: rx,
                metrics: metrics.clone(),
            });
        }
        let handle = AudioSocketHandle {
            shards: handles.into(),
            next_shard: Arc::new(AtomicUsize::new(0)),
            live_ids: Arc::new(Mutex::new(HashSet::new())),
            limits,
            metrics,
            epoch: Instant::now(),
            local_addr,
        };
        Ok((AudioSocket { shards }, handle))
    }

    /// Runs every shard as its own task until `shutdown` fires and each has sent what
    /// was queued.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut tasks = tokio::task::JoinSet::new();
        for shard in self.shards {
            tasks.spawn(shard.run(shutdown.clone()));
        }
        while let Some(done) = tasks.join_next().await {
            if let Err(e) = done {
                warn!(error = %e, "UDP audio shard task failed");
            }
        }
    }
}

impl Shard {
    /// Receives and routes datagrams until `shutdown` fires.
    async fn run(mut self, shutdown: CancellationToken) {
        let mut routes: HashMap<u32, Route> = HashMap::new();
        let mut received = RecvBatch::new();
        let mut scratch = Vec::with_capacity(256);
        let mut sender = SendBatch::new();
        let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
        let socket = self.socket.clone();
        let queue = self.send_queue.clone();
        let label = self.index.to_string();
        let datagrams = self
            .metrics
            .udp_shards
            .datagrams
            .with_label_values(&[label.as_str()]);
        let channels = self
            .metrics
            .udp_shards
            .channels
            .with_label_values(&[label.as_str()]);
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                Some(cmd) = self.commands.recv() => match cmd {
                    Command::Register { connection_id, route } => { routes.insert(connection_id, *route); }
                    Command::Splice { connection_id, into } => {
                        if let Some(route) = routes.get_mut(&connection_id) {
                            route.splice = into.and_then(|t| Some(Splice {
                                shared: t.shared.upgrade()?,
                                sealer: t.sealer.upgrade()?,
                            }));
                        }
                    }
                },
                () = queue.ready() => self.flush(&mut sender).await,
                _ = sweep.tick() => {
                    routes.retain(|_, r| !r.is_closed());
                    channels.set(i64::try_from(routes.len()).unwrap_or(i64::MAX));
                }
                ready = socket.readable() => {
                    if let Err(e) = ready {
                        debug!(error = %e, "UDP socket not readable");
                        continue;
                    }
                    let n = self.receive(&mut received, &mut routes, &mut scratch);
                    datagrams.inc_by(n);
                }
            }
        }
        // Whatever conversations sealed before the stop still goes out.
        self.flush(&mut sender).await;
    }

    /// Takes up to [`BATCHES_PER_TURN`] batches of waiting datagrams.
    /// Returns how many datagrams it took.
    fn receive(
        &self,
        batch: &mut RecvBatch,
        routes: &mut HashMap<u32, Route>,
        scratch: &mut Vec<u8>,
    ) -> u64 {
        let mut taken = 0;
        for _ in 0..BATCHES_PER_TURN {
            let n = match batch.recv(&self.socket) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                // ICMP errors surface here on some platforms; they are not fatal.
                Err(e) => {
                    debug!(error = %e, "UDP receive error");
                    break;
                }
            };
            taken += n as u64;
            for i in 0..n {
                if let (datagram, Some(from)) = batch.datagram(i) {
                    self.on_datagram(routes, datagram, from, scratch);
                }
            }
            if n < BATCH {
                break;
            }
        }
        taken
    }

    async fn flush(&self, sender: &mut SendBatch) {
        let done = sender.flush(&self.send_queue, &self.socket).await;
        let m = &self.metrics;
        Metrics::add(&m.udp_tx_datagrams, done.datagrams);
        Metrics::add(&m.udp_tx_bytes, done.bytes);
        Metrics::add(&m.udp_send_errors, done.errors);
    }

    fn on_datagram(
        &self,
        routes: &mut HashMap<u32, Route>,
        datagram: &mut [u8],
        from: SocketAddr,
        scratch: &mut Vec<u8>,
    ) {
        let m = &self.metrics;
        Metrics::inc(&m.udp_rx_datagrams);
        Metrics::add(&m.udp_rx_bytes, datagram.len() as u64);
        let Some(id) = Header::peek_connection_id(datagram) else {
            Metrics::inc(&m.udp_drop_malformed);
            return;
        };
        let Some(route) = routes.get_mut(&id) else {
            Metrics::inc(&m.udp_drop_unknown_id);
            return;
        };
        if route.shared.closed.load(Ordering::Relaxed) {
            routes.remove(&id);
            Metrics::inc(&m.udp_drop_unknown_id);
            return;
        }
        // Before decryption: a flood naming a live channel costs a counter, not AES.
        if !route.rate.is_unlimited() && !route.rate.try_take(Instant::now()) {
            Metrics::inc(&m.udp_drop_rate_limited);
            ChannelCounters::add(&route.shared.stats.dropped, 1);
            if !std::mem::replace(&mut route.warned_rate, true) {
                warn!(connection_id = id, %from, "audio channel exceeds udp.channel_rate; the excess is dropped (counted in xiaozhi_udp_drops_total, logged once per channel)");
            }
            return;
        }
        match route.channel.on_datagram(datagram, from) {
            Verdict::Accept {
                header,
                gap,
                rebound,
                opus_len,
            } => {
                if gap > 0 {
                    Metrics::add(&m.udp_uplink_gaps, u64::from(gap));
                }
                if rebound {
                    Metrics::inc(&m.udp_rebinds);
                    debug!(connection_id = id, %from, "audio channel rebound to a new address");
                }
                {
                    // The channel's own binding, not `from`: an accepted datagram does not
                    // always move it (a late AES-GCM datagram from an old address).
                    let bound = route.channel.peer();
                    let mut peer = route.shared.peer.lock().unwrap_or_else(|p| p.into_inner());
                    if *peer != bound {
                        *peer = bound;
                    }
                }
                route.shared.uplink_seen();
                let stats = &route.shared.stats;
                ChannelCounters::add(&stats.uplink_packets, 1);
                ChannelCounters::add(&stats.uplink_bytes, datagram.len() as u64);
                let opus = &datagram[HEADER_LEN..HEADER_LEN + opus_len];
                if let Some(splice) = &route.splice {
                    self.splice(splice, header.timestamp, opus, scratch);
                    return;
                }
                if route.shared.reflect.load(Ordering::Relaxed) {
                    let to = route.channel.peer().unwrap_or(from);
                    let m = &self.metrics;
                    let (sealer, shared) = (&route.sealer, &route.shared);
                    let reflected = &m.echo_frames_reflected;
                    self.seal_and_queue(
                        sealer,
                        shared,
                        to,
                        header.timestamp,
                        opus,
                        scratch,
                        reflected,
                    );
                    return;
                }
                let frame = UplinkFrame {
                    timestamp: header.timestamp,
                    sequence: header.sequence,
                    opus: route.frames.copy(opus),
                };
                match route.uplink_tx.try_send(frame) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        Metrics::inc(&m.udp_drop_queue_full);
                        ChannelCounters::add(&stats.dropped, 1);
                    }
                    // The conversation has gone; its lease is about to be dropped.
                    Err(mpsc::error::TrySendError::Closed(_)) => {
                        Metrics::inc(&m.udp_drop_unknown_id);
                    }
                }
            }
            Verdict::Drop(reason) => {
                let counter = match reason {
                    DropReason::Malformed(_) => &m.udp_drop_malformed,
                    DropReason::Replay => &m.udp_drop_replay,
                    DropReason::Hijack => &m.udp_drop_hijack,
                    DropReason::Undecryptable => &m.udp_drop_decrypt,
                    DropReason::Unauthenticated => &m.udp_drop_auth,
                    DropReason::Stale => &m.udp_drop_stale,
                };
                Metrics::inc(counter);
                ChannelCounters::add(&route.shared.stats.dropped, 1);
                match reason {
                    DropReason::Hijack => {
                        warn!(connection_id = id, %from, "datagram with a live connection id from an unproven address dropped");
                    }
                    DropReason::Unauthenticated => {
                        debug!(connection_id = id, %from, "datagram failed authentication; dropped");
                    }
                    _ => {}
                }
            }
        }
    }
}

impl Route {
    /// The conversation has let go of the channel, or its uplink receiver has gone.
    fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::Relaxed) || self.uplink_tx.is_closed()
    }
}

impl Shard {
    /// A spliced frame: sealed into the target channel's downlink (if it is still open
    /// and its device has an address) and queued for this task's next flush. Every
    /// socket of the group has the same address, so the device cannot tell which one
    /// sent it.
    fn splice(&self, target: &Splice, timestamp: u32, opus: &[u8], scratch: &mut Vec<u8>) {
        let m = &self.metrics;
        if target.shared.closed.load(Ordering::Relaxed) {
            Metrics::inc(&m.call_frames_dropped_no_peer);
            return;
        }
        let Some(addr) = *target.shared.peer.lock().unwrap_or_else(|p| p.into_inner()) else {
            Metrics::inc(&m.call_frames_dropped_no_peer);
            return;
        };
        target.shared.touch();
        let (sealer, shared) = (&target.sealer, &target.shared);
        self.seal_and_queue(
            sealer,
            shared,
            addr,
            timestamp,
            opus,
            scratch,
            &m.call_frames_spliced,
        );
    }

    /// Seals a frame with a channel's downlink sealer and queues it for `to`, counting
    /// it in `sent` and in the channel's traffic, or its drop. Reflect mode (realtime
    /// echo) and splices send this way, exactly as the conversation's `Downlink::send`
    /// would have.
    #[allow(clippy::too_many_arguments)]
    fn seal_and_queue(
        &self,
        sealer: &Mutex<ChannelSealer>,
        shared: &ChannelShared,
        to: SocketAddr,
        timestamp: u32,
        opus: &[u8],
        scratch: &mut Vec<u8>,
        sent: &std::sync::atomic::AtomicU64,
    ) {
        let m = &self.metrics;
        let stats = &shared.stats;
        let sealed = sealer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .seal(timestamp, opus, scratch);
        if sealed.is_err() {
            // An uplink datagram always fits one downlink datagram; counted all the same.
            Metrics::inc(&m.udp_drop_downlink_oversized);
            ChannelCounters::add(&stats.dropped, 1);
            return;
        }
        match self.send_queue.push(to, scratch) {
            Ok(()) => {
                Metrics::inc(sent);
                ChannelCounters::add(&stats.downlink_packets, 1);
                ChannelCounters::add(&stats.downlink_bytes, scratch.len() as u64);
            }
            Err(_) => {
                Metrics::inc(&m.udp_drop_send_queue_full);
                ChannelCounters::add(&stats.dropped, 1);
            }
        }
    }
}

/// Why a channel could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("the audio socket has stopped")]
    SocketStopped,
}

impl AudioSocketHandle {
    /// The address the socket is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// How many shards serve the audio port.
    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// The shard whose socket receives `connection_id`'s datagrams.
    fn shard_of(&self, connection_id: u32) -> &ShardHandle {
        &self.shards[(connection_id % self.shards.len() as u32) as usize]
    }

    /// Splices channel `connection_id`'s accepted uplink into `into`'s downlink (`None`:
    /// back to its conversation). Takes effect before the next datagram the receive task
    /// handles.
    pub async fn splice(&self, connection_id: u32, into: Option<SpliceTarget>) {
        let _ = self
            .shard_of(connection_id)
            .commands
            .send(Command::Splice {
                connection_id,
                into,
            })
            .await;
    }

    /// Reserves a fresh connection id and key for a channel of the given suite, and makes
    /// it routable before returning (so the hello that announces it can be sent right
    /// after).
    ///
    /// Channels go to the shards in turn; the connection id is drawn at random among
    /// those that steer to the channel's shard.
    pub async fn open_channel(&self, encryption: Encryption) -> Result<AudioChannel, OpenError> {
        let shards = self.shards.len() as u32;
        let shard = (self.next_shard.fetch_add(1, Ordering::Relaxed) % self.shards.len()) as u32;
        let (key, connection_id) = {
            let mut rng = rand::rng();
            let key: [u8; KEY_LEN] = rng.random();
            let mut live = self.live_ids.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                let drawn: u32 = rng.random();
                let Some(id) = (drawn - drawn % shards).checked_add(shard) else {
                    continue;
                };
                if id != 0 && live.insert(id) {
                    break (key, id);
                }
            }
        };
        let shard = &self.shards[shard as usize];
        let (receiver, sealer) = encryption.server_channel(&key, connection_id);
        let shared = Arc::new(ChannelShared::new(self.epoch));
        shared.touch();
        let (uplink_tx, uplink_rx) = mpsc::channel(self.limits.uplink_queue);
        let sealer = Arc::new(Mutex::new(sealer));
        let channel = AudioChannel {
            attach: Attach::Udp {
                connection_id,
                key,
                encryption,
            },
            uplink: uplink_rx,
            downlink: Downlink::new(
                DownlinkPath::Udp {
                    sealer: sealer.clone(),
                    queue: shard.send_queue.clone(),
                },
                shared.clone(),
                self.metrics.clone(),
            ),
            shared: shared.clone(),
            lease: Lease::Udp {
                live_ids: self.live_ids.clone(),
                connection_id,
            },
        };
        let route = Box::new(Route {
            channel: receiver,
            rate: TokenBucket::new(self.limits.rate, self.limits.burst, Instant::now()),
            warned_rate: false,
            uplink_tx,
            shared,
            sealer,
            splice: None,
            frames: FrameSlab::new(UPLINK_SLAB_BYTES),
        });
        shard
            .commands
            .send(Command::Register {
                connection_id,
                route,
            })
            .await
            .map_err(|_| OpenError::SocketStopped)?;
        Ok(channel)
    }
}
