//! Call legs: conversations that carry a device-to-device call instead of a speech
//! server's conversation.
//!
//! When a device calls another (`crate::calls`), its conversation hangs up on the
//! speech server but keeps its audio channel, session id and everything the device
//! holds; from then on it is a *leg* of the call. A leg sends each uplink frame to its
//! peer leg (a queue on this node, or the bus when the peer is on another node) and
//! seals what arrives from the peer into its own downlink, under its own channel's key,
//! sequence and header rules. Until the call is bridged the leg answers every uplink
//! frame with a frame of silence, so a caller waiting for an answer hears nothing, not
//! itself.
//!
//! [`CallLegs`] is this node's switchboard: the inbound queue of every leg, the devices
//! being rung here (so that their departure can end the call), and the bus handle that
//! carries frames to legs on other nodes. It decides nothing about calls: the rules are
//! `crate::protocol::call_book`'s and the decisions `crate::calls`'.
//!
//! Audio is never held decrypted for longer than it takes to re-seal one frame: a frame
//! waits at most in the peer leg's small queue ([`LEG_QUEUE`], about a second; full:
//! dropped and counted) and is sealed as soon as the leg takes it. Between nodes a frame
//! crosses the bus sealed with AES-128-GCM under the call's own key ([`RemoteSeal`]), so
//! the broker and its other clients see only ciphertext.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use crate::audio::{SpliceTarget, UplinkFrame};
use crate::broker::bus::Bus;
use crate::metrics::Metrics;
use crate::protocol::audio_channel::Verdict;
use crate::protocol::call_book::CallId;
use crate::protocol::call_book::MediaKey;
use crate::protocol::datagram::HEADER_LEN;
use crate::protocol::gcm_channel::{GcmCipher, GcmReceiver, GcmSealer};
use crate::protocol::mac::Mac;
use crate::protocol::topics;

/// Frames queued for a leg's downlink before further ones are dropped (about a second
/// of 60 ms frames).
pub const LEG_QUEUE: usize = 16;

/// A 60 ms Opus frame of silence: what libopus (1.3, 16 kHz mono, VoIP) makes of 960
/// zero samples once its encoder has settled (SILK wideband, TOC 0x58). Opus decodes
/// at any rate, so devices whose downlink is 24 kHz play it too. What a caller hears
/// while the call rings.
pub const SILENCE_FRAME: &[u8] = &[
    0x58, 0x01, 0xf2, 0x5e, 0x72, 0x36, 0x92, 0x1f, 0x05, 0xfa, 0x47, 0x8d, 0x69, 0x2c, 0x8f, 0x20,
    0x0a, 0xfb, 0xfb, 0x2b, 0x20,
];

/// Where a leg's uplink goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerRoute {
    /// Not bridged yet (the call rings this device): it hears silence.
    Ringing(Mac),
    /// The peer device is on this node.
    Local(Mac),
    /// The peer device is on another node, reached over the bus; frames are sealed under
    /// the call's key, in the caller's direction if `caller` (this leg is the caller).
    Remote {
        mac: Mac,
        node: String,
        key: MediaKey,
        caller: bool,
    },
}

/// A frame for a leg: plain from a leg of this node, sealed from another node.
#[derive(Debug)]
pub enum LegFrame {
    Plain(UplinkFrame),
    Sealed(Bytes),
}

/// The AES-128-GCM of a leg's frames to and from another node: the call's key, the two
/// directions told apart (the caller's frames and the target's), a sequence from 1 per
/// sender that never wraps and a replay window per receiver, exactly the `udp_aead`
/// datagram format (`protocol::gcm_channel`). A leg keeps one for its call, so no
/// sequence (nonce) is ever used twice under a key.
pub struct RemoteSeal {
    sealer: GcmSealer,
    receiver: GcmReceiver,
    /// Sealed or opened in place; one frame at a time.
    buf: Vec<u8>,
}

impl RemoteSeal {
    pub fn new(call: CallId, key: &MediaKey, caller: bool) -> RemoteSeal {
        let cipher = GcmCipher::new(&key.0);
        // The low 32 bits of the call id stand where a channel's connection id would.
        let id = call as u32;
        let (sealer, receiver) = if caller {
            (
                GcmSealer::uplink(cipher.clone(), id),
                GcmReceiver::downlink(cipher, id),
            )
        } else {
            (
                GcmSealer::downlink(cipher.clone(), id),
                GcmReceiver::uplink(cipher, id),
            )
        };
        RemoteSeal {
            sealer,
            receiver,
            buf: Vec::with_capacity(256),
        }
    }

    /// Seals one frame; the datagram to publish.
    pub fn seal(&mut self, timestamp: u32, opus: &[u8]) -> Option<&[u8]> {
        self.sealer.seal(timestamp, opus, &mut self.buf).ok()?;
        Some(&self.buf)
    }

    /// Authenticates and opens one datagram from the peer: its timestamp and Opus frame,
    /// or `None` (forged, replayed, malformed).
    pub fn open(&mut self, datagram: &[u8]) -> Option<(u32, &[u8])> {
        self.buf.clear();
        self.buf.extend_from_slice(datagram);
        let from = std::net::SocketAddr::from(([0, 0, 0, 0], 0));
        match self.receiver.on_datagram(&mut self.buf, from) {
            Verdict::Accept {
                header, opus_len, ..
            } => Some((
                header.timestamp,
                &self.buf[HEADER_LEN..HEADER_LEN + opus_len],
            )),
            Verdict::Drop(_) => None,
        }
    }
}

impl PeerRoute {
    /// The other party of the call.
    pub fn peer(&self) -> Mac {
        match self {
            PeerRoute::Ringing(mac) | PeerRoute::Local(mac) | PeerRoute::Remote { mac, .. } => *mac,
        }
    }

    pub fn is_bridged(&self) -> bool {
        !matches!(self, PeerRoute::Ringing(_))
    }
}

/// What the call service asks of a device's conversation.
#[derive(Debug)]
pub enum LegCommand {
    /// Become (or stay) a leg of `call`, sending the uplink to `peer`.
    Join { call: CallId, peer: PeerRoute },
    /// The call ended: say goodbye to the device and end the conversation.
    HangUp { call: CallId },
}

/// What the session layer tells the call service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallEvent {
    /// `mac` left `call`: its leg ended (anything but the call's own hang-up), or, while
    /// being rung, it said goodbye or disconnected. `reason` is the session's end reason.
    Left {
        mac: Mac,
        call: CallId,
        reason: &'static str,
    },
}

/// One leg on this node.
struct Leg {
    call: CallId,
    inbound: mpsc::Sender<LegFrame>,
    /// Its channel, when it is a UDP one a peer's uplink can be spliced into.
    splice: Option<SpliceTarget>,
}

#[derive(Default)]
struct Table {
    legs: HashMap<Mac, Leg>,
    /// Devices of this node being rung, by call.
    ringing: HashMap<Mac, CallId>,
}

/// This node's call legs and ringing devices, and the way to legs on other nodes.
pub struct CallLegs {
    table: Mutex<Table>,
    /// The bus and this node's id, for legs whose peer is on another node (scale-out).
    cluster: OnceLock<(Bus, String)>,
    metrics: std::sync::Arc<Metrics>,
}

impl CallLegs {
    pub fn new(metrics: std::sync::Arc<Metrics>) -> CallLegs {
        CallLegs {
            table: Mutex::new(Table::default()),
            cluster: OnceLock::new(),
            metrics,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        // Every critical section is a map insert, remove or lookup.
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Lets legs reach peers on other nodes over `bus` (external bus only).
    pub fn connect_cluster(&self, bus: Bus, node: String) {
        let _ = self.cluster.set((bus, node));
    }

    /// This node's id, when it is part of a cluster.
    pub fn node(&self) -> Option<&str> {
        self.cluster.get().map(|(_, node)| node.as_str())
    }

    /// A conversation became a leg of `call`; frames for it go to `inbound` (or straight
    /// into `splice`, its UDP channel).
    pub fn register(
        &self,
        mac: Mac,
        call: CallId,
        inbound: mpsc::Sender<LegFrame>,
        splice: Option<SpliceTarget>,
    ) {
        let mut table = self.lock();
        table.ringing.remove(&mac);
        let leg = Leg {
            call,
            inbound,
            splice,
        };
        if table.legs.insert(mac, leg).is_none() {
            Metrics::inc(&self.metrics.call_legs);
        }
    }

    /// The leg of `call` on `mac` ended.
    pub fn unregister(&self, mac: Mac, call: CallId) {
        let mut table = self.lock();
        if table.legs.get(&mac).is_some_and(|l| l.call == call) {
            table.legs.remove(&mac);
            Metrics::dec(&self.metrics.call_legs);
        }
    }

    /// The call `mac` is a leg of on this node.
    pub fn leg_call(&self, mac: Mac) -> Option<CallId> {
        self.lock().legs.get(&mac).map(|l| l.call)
    }

    /// The inbound queue of `mac`'s leg of `call`, if it has registered.
    pub fn inbound(&self, mac: Mac, call: CallId) -> Option<mpsc::Sender<LegFrame>> {
        self.lock()
            .legs
            .get(&mac)
            .filter(|l| l.call == call)
            .map(|l| l.inbound.clone())
    }

    /// The UDP channel of `mac`'s leg of `call`, to splice a peer's uplink into.
    pub fn splice_target(&self, mac: Mac, call: CallId) -> Option<SpliceTarget> {
        self.lock()
            .legs
            .get(&mac)
            .filter(|l| l.call == call)
            .and_then(|l| l.splice.clone())
    }

    /// Hands a sealed frame from another node to `mac`'s leg of `call`; dropped and
    /// counted if there is none or its queue is full.
    pub fn deliver_remote(&self, mac: Mac, call: CallId, sealed: Bytes) {
        Metrics::inc(&self.metrics.call_frames_remote_in);
        match self.inbound(mac, call) {
            Some(tx) => {
                if tx.try_send(LegFrame::Sealed(sealed)).is_err() {
                    Metrics::inc(&self.metrics.call_frames_dropped_queue_full);
                }
            }
            None => Metrics::inc(&self.metrics.call_frames_dropped_no_peer),
        }
    }

    /// Publishes a sealed frame for `mac`'s leg of `call` on `node`. False without a
    /// cluster.
    pub fn send_remote(&self, node: &str, mac: Mac, call: CallId, sealed: &[u8]) -> bool {
        let Some((bus, _)) = self.cluster.get() else {
            return false;
        };
        bus.publish(
            topics::node_call_audio(node, call, &mac),
            Bytes::copy_from_slice(sealed),
        );
        Metrics::inc(&self.metrics.call_frames_remote_out);
        true
    }

    /// `mac` is being rung for `call` on this node.
    pub fn set_ringing(&self, mac: Mac, call: CallId) {
        self.lock().ringing.insert(mac, call);
    }

    /// The call ringing `mac`, if any; forgets it (its departure is reported once).
    pub fn take_ringing(&self, mac: Mac) -> Option<CallId> {
        self.lock().ringing.remove(&mac)
    }

    /// Forgets ringing entries and reports legs that `still` no longer knows: `still`
    /// says whether `mac` is still in `call`. Returns the legs to hang up.
    pub fn reconcile(&self, still: impl Fn(Mac, CallId) -> bool) -> Vec<(Mac, CallId)> {
        let mut table = self.lock();
        table.ringing.retain(|mac, call| still(*mac, *call));
        table
            .legs
            .iter()
            .filter(|(mac, leg)| !still(**mac, leg.call))
            .map(|(mac, leg)| (*mac, leg.call))
            .collect()
    }

    /// Legs and ringing devices on this node (for status and tests).
    pub fn counts(&self) -> (usize, usize) {
        let table = self.lock();
        (table.legs.len(), table.ringing.len())
    }
}

/// A command the dispatcher could not hand to a conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JoinError {
    /// The device has no conversation (no audio channel) on this node.
    NoConversation,
    /// The conversation's command queue is full.
    Busy,
}

/// The reply to a join: whether the device's conversation took the command.
pub type JoinReply = oneshot::Sender<Result<(), JoinError>>;

#[cfg(test)]
mod tests {
    use super::*;

    fn mac(n: u8) -> Mac {
        Mac::from_octets([2, 0, 0, 0, 0, n])
    }

    #[test]
    fn legs_are_found_by_device_and_call_only() {
        let legs = CallLegs::new(Default::default());
        let (tx, mut rx) = mpsc::channel(LEG_QUEUE);
        legs.register(mac(1), 7, tx, None);
        assert!(legs.splice_target(mac(1), 7).is_none());
        assert_eq!(legs.leg_call(mac(1)), Some(7));
        assert!(legs.inbound(mac(1), 8).is_none(), "another call");
        let frame = Bytes::from_static(b"sealed");
        legs.deliver_remote(mac(1), 7, frame.clone());
        assert!(matches!(rx.try_recv().unwrap(), LegFrame::Sealed(b) if b == frame));
        legs.deliver_remote(mac(1), 8, frame.clone());
        assert!(rx.try_recv().is_err());
        assert_eq!(legs.metrics.snapshot().call_frames_dropped_no_peer, 1);
        legs.unregister(mac(1), 8);
        assert_eq!(legs.counts(), (1, 0), "a late unregister of another call");
        legs.unregister(mac(1), 7);
        assert_eq!(legs.counts(), (0, 0));
        assert_eq!(legs.metrics.snapshot().call_legs, 0);
    }

    #[test]
    fn a_ringing_device_is_reported_once_and_reconciled() {
        let legs = CallLegs::new(Default::default());
        legs.set_ringing(mac(2), 3);
        assert_eq!(legs.take_ringing(mac(2)), Some(3));
        assert_eq!(legs.take_ringing(mac(2)), None);
        legs.set_ringing(mac(2), 3);
        legs.set_ringing(mac(3), 4);
        let (tx, _rx) = mpsc::channel(1);
        legs.register(mac(4), 5, tx, None);
        let hang_up = legs.reconcile(|m, c| (m, c) == (mac(3), 4));
        assert_eq!(hang_up, vec![(mac(4), 5)]);
        assert_eq!(legs.take_ringing(mac(2)), None);
        assert_eq!(legs.take_ringing(mac(3)), Some(4));
    }

    #[test]
    fn the_silence_frame_is_60_ms_of_silence_at_every_downlink_rate() {
        for rate in [16_000, 24_000, 48_000] {
            let mut decoder = opus::Decoder::new(rate, opus::Channels::Mono).unwrap();
            let mut pcm = vec![0i16; 5760];
            // The decoder's first frames carry its own start-up; take the third.
            let mut samples = 0;
            for _ in 0..3 {
                samples = decoder.decode(SILENCE_FRAME, &mut pcm, false).unwrap();
            }
            assert_eq!(samples as u32, rate * 60 / 1000, "{rate} Hz");
            let loudest = pcm[..samples]
                .iter()
                .map(|s| s.unsigned_abs())
                .max()
                .unwrap();
            assert!(loudest <= 4, "{rate} Hz: {loudest}");
        }
    }

    #[test]
    fn remote_frames_are_sealed_per_direction_and_open_once() {
        let key = MediaKey([9; 16]);
        let (mut caller, mut target) = (
            RemoteSeal::new(77, &key, true),
            RemoteSeal::new(77, &key, false),
        );
        let sealed = caller.seal(960, b"opus frame").unwrap().to_vec();
        assert!(
            !sealed.windows(10).any(|w| w == b"opus frame"),
            "ciphertext on the bus"
        );
        assert_eq!(target.open(&sealed), Some((960, &b"opus frame"[..])));
        assert_eq!(target.open(&sealed), None, "a replay is refused");
        // The caller cannot open its own direction, nor a forged or foreign datagram.
        let again = caller.seal(1020, b"next").unwrap().to_vec();
        assert_eq!(caller.open(&again), None);
        let mut forged = again.clone();
        forged[20] ^= 1;
        assert_eq!(target.open(&forged), None);
        let mut other = RemoteSeal::new(77, &MediaKey([8; 16]), false);
        assert_eq!(other.open(&again), None, "another call's key");
        assert_eq!(target.open(&again), Some((1020, &b"next"[..])));
        let back = target.seal(0, b"reply").unwrap().to_vec();
        assert_eq!(caller.open(&back), Some((0, &b"reply"[..])));
    }
}
