//! The QUIC audio transport (the `quic` protocol extension, docs/transports.md): for
//! devices and clients that can run QUIC, audio travels as RFC 9221 datagrams on a
//! connection of their own, authenticated and encrypted by TLS 1.3, on a UDP port of its
//! own (`quic.listen`).
//!
//! * [`tokens`]: the one-time session tokens the hello hands out and a connection
//!   presents on its first stream to claim its conversation.
//! * [`cert`]: the endpoint's certificate, whose SHA-256 the hello carries so a device
//!   can pin it without a CA; and the pinning verifier clients use.
//! * [`endpoint`]: the driver: accepts connections, checks tokens, moves audio between
//!   datagrams and the conversation, and closes connections when conversations end.
//!
//! A conversation sees the same [`crate::audio::AudioChannel`] as over UDP: an uplink
//! queue and a [`crate::audio::Downlink`]. QUIC's connection migration replaces the UDP
//! channel's address binding: a client that changes address keeps its connection.

pub mod cert;
pub mod endpoint;
pub mod tokens;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::audio::UplinkFrame;
use crate::audio::channel::{ChannelCounters, ChannelShared};
use crate::metrics::Metrics;
use crate::protocol::quic_framing::{AUDIO_HEADER_LEN, AudioDatagram};

pub use crate::protocol::quic_framing::TOKEN_LEN;
pub use endpoint::{QuicEndpoint, QuicHandle};
use tokens::{Token, TokenTable};

/// Called with each control JSON message the device sends on its control stream.
pub type ControlIn = Box<dyn Fn(Bytes) + Send + Sync>;

/// What a conversation and its QUIC connection share.
pub(crate) struct Slot {
    /// Taken by the connection that redeems the token.
    uplink_tx: Mutex<Option<mpsc::Sender<UplinkFrame>>>,
    shared: Arc<ChannelShared>,
    /// The device's connection, once attached.
    conn: Mutex<Option<quinn::Connection>>,
    next_sequence: AtomicU32,
    /// The conversation has let go: the connection is closed.
    ended: CancellationToken,
    /// The device closed its connection (or it was lost): the conversation ends.
    device_left: CancellationToken,
    /// Where device control JSON from the stream goes.
    control_in: Option<ControlIn>,
    /// Server-to-device control JSON, when the device asked for it on the stream.
    control_out: OnceLock<mpsc::Sender<Bytes>>,
    /// The stream's queue was full once (the device does not read it): control JSON
    /// goes by MQTT for the rest of the conversation.
    stream_overflowed: std::sync::atomic::AtomicBool,
}

impl Slot {
    fn connection(&self) -> Option<quinn::Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// The downlink half of a QUIC channel.
#[derive(Clone)]
pub struct QuicDownlink(Arc<Slot>);

impl QuicDownlink {
    /// Where the connection is now (after any migration).
    pub fn peer(&self) -> Option<SocketAddr> {
        self.0.connection().map(|c| c.remote_address())
    }

    /// Sends one frame as a datagram; false (counted) if the device has not attached or
    /// the connection cannot take it.
    pub(crate) fn send(
        &self,
        timestamp: u32,
        opus: &[u8],
        shared: &ChannelShared,
        metrics: &Metrics,
    ) -> bool {
        let Some(conn) = self.0.connection() else {
            Metrics::inc(&metrics.udp_drop_no_peer);
            ChannelCounters::add(&shared.stats.dropped, 1);
            return false;
        };
        send_datagram(&conn, &self.0, timestamp, opus, shared, metrics)
    }
}

/// Seals and sends one downlink datagram on `conn`.
fn send_datagram(
    conn: &quinn::Connection,
    slot: &Slot,
    timestamp: u32,
    opus: &[u8],
    shared: &ChannelShared,
    metrics: &Metrics,
) -> bool {
    let sequence = slot.next_sequence.fetch_add(1, Ordering::Relaxed);
    let mut buf = Vec::with_capacity(AUDIO_HEADER_LEN + opus.len());
    AudioDatagram {
        timestamp,
        sequence,
        opus,
    }
    .write(&mut buf);
    let len = buf.len() as u64;
    match conn.send_datagram(Bytes::from(buf)) {
        Ok(()) => {
            Metrics::inc(&metrics.quic_tx_datagrams);
            Metrics::add(&metrics.quic_tx_bytes, len);
            ChannelCounters::add(&shared.stats.downlink_packets, 1);
            ChannelCounters::add(&shared.stats.downlink_bytes, len);
            true
        }
        Err(e) => {
            Metrics::inc(&metrics.quic_drop_send);
            ChannelCounters::add(&shared.stats.dropped, 1);
            tracing::debug!(error = %e, "QUIC datagram not sent");
            false
        }
    }
}

/// Frees a QUIC channel's token and closes its connection when the conversation drops
/// the channel.
pub struct QuicLease {
    slot: Arc<Slot>,
    token: Token,
    table: Arc<Mutex<TokenTable<Arc<Slot>>>>,
}

impl QuicLease {
    pub(crate) fn release(&self) {
        self.table
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .revoke(&self.token, std::time::Instant::now());
        self.slot.ended.cancel();
    }

    /// Resolves when the device has closed its connection (or lost it for good).
    pub(crate) fn device_left(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.slot.device_left.cancelled()
    }

    /// The channel's control stream as a conversation sees it.
    pub(crate) fn control_stream(&self) -> Arc<dyn crate::audio::channel::ControlStream> {
        Arc::new(ControlStreamOut(self.slot.clone()))
    }
}

/// Server-to-device control JSON on the QUIC stream, while the device has asked for it
/// and the connection is up; MQTT otherwise.
struct ControlStreamOut(Arc<Slot>);

impl crate::audio::channel::ControlStream for ControlStreamOut {
    fn try_send(&self, payload: &Bytes) -> bool {
        let slot = &self.0;
        if slot.ended.is_cancelled()
            || slot.device_left.is_cancelled()
            || slot.stream_overflowed.load(Ordering::Relaxed)
            || payload.len() > crate::protocol::quic_framing::MAX_CONTROL_FRAME
        {
            return false;
        }
        let Some(tx) = slot.control_out.get() else {
            return false;
        };
        match tx.try_send(payload.clone()) {
            Ok(()) => true,
            Err(_) => {
                // From here on everything goes by MQTT, so later messages cannot
                // overtake ones still queued for the stream by much.
                slot.stream_overflowed.store(true, Ordering::Relaxed);
                false
            }
        }
    }
}
