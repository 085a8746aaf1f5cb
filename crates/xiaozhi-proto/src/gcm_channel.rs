//! AES-128-GCM over the UDP audio channel: the `udp_aead` protocol extension
//! (docs/transports.md), for devices that announce it in their hello.
//!
//! Stock firmware's AES-CTR gives secrecy but no integrity, so the CTR channel
//! ([`super::audio_channel`]) can only guess which datagrams are genuine. Here every
//! datagram carries a 16-byte tag over its payload and its header, so the channel knows:
//!
//! ```text
//! datagram = header (16 bytes, as for CTR) || ciphertext (n bytes) || tag (16 bytes)
//! header.payload_len = n + 16     header is the associated data (authenticated, sent clear)
//! nonce (12 bytes)   = direction (1) || 0 0 0 || connection id (4) || sequence (4), big-endian
//! direction          = 0x01 device -> server, 0x02 server -> device
//! ```
//!
//! # Why the nonce is never reused
//! The key is 16 fresh random bytes per conversation (never shared between two
//! channels). Under that key each direction has its own nonce prefix, and within a
//! direction the sender numbers datagrams 1, 2, 3, ... and never wraps: the sealer
//! refuses to seal once sequence `u32::MAX` is used ([`SealError::SequenceExhausted`],
//! eight years of audio). So no (key, nonce) pair is ever used twice.
//!
//! # What the receiver does
//! Header checks, then the [`ReplayWindow`] (before the tag, so a replay costs no AES),
//! then the tag. Only an authenticated datagram changes state: it is recorded in the
//! window, and if it is the newest yet it moves the downlink to its source address (the
//! device roamed or its NAT rebound; no heuristics needed). A late datagram (inside the
//! window, unseen) is accepted but moves nothing.

use std::net::SocketAddr;

use aes_gcm::aead::array::Array;
use aes_gcm::{AeadInOut, Aes128Gcm, KeyInit};

use super::audio_channel::{DropReason, SealError, Verdict};
use super::cipher::KEY_LEN;
use super::datagram::{DatagramError, HEADER_LEN, Header, MAX_DATAGRAM_LEN};
use super::replay_window::{Position, Refusal, ReplayWindow};

/// Length of the GCM tag at the end of every datagram.
pub const TAG_LEN: usize = 16;
/// Nonce direction byte of datagrams from the device.
pub const DIRECTION_UPLINK: u8 = 0x01;
/// Nonce direction byte of datagrams to the device.
pub const DIRECTION_DOWNLINK: u8 = 0x02;

/// One channel's AEAD: the expanded key and GHASH key, shared by both directions.
#[derive(Clone)]
pub struct GcmCipher {
    aead: Aes128Gcm,
}

impl std::fmt::Debug for GcmCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GcmCipher(<key>)")
    }
}

/// The 12-byte nonce of one datagram.
pub fn nonce(direction: u8, connection_id: u32, sequence: u32) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[0] = direction;
    n[4..8].copy_from_slice(&connection_id.to_be_bytes());
    n[8..12].copy_from_slice(&sequence.to_be_bytes());
    n
}

impl GcmCipher {
    pub fn new(key: &[u8; KEY_LEN]) -> Self {
        GcmCipher {
            aead: Aes128Gcm::new(&Array::from(*key)),
        }
    }

    /// Encrypts `payload` in place and returns the tag; `header` is the associated data.
    pub fn seal(
        &self,
        direction: u8,
        header: &[u8; HEADER_LEN],
        payload: &mut [u8],
    ) -> [u8; TAG_LEN] {
        let h = Header::from_bytes(header);
        let n = Array::from(nonce(direction, h.connection_id, h.sequence));
        let tag = self
            .aead
            .encrypt_inout_detached(&n, header, payload.into())
            .expect("an audio datagram is far below GCM's length limits");
        tag.into()
    }

    /// Checks the tag and decrypts `payload` in place; on failure `payload` is unchanged
    /// in meaning (garbage either way) and nothing may be trusted.
    pub fn open(
        &self,
        direction: u8,
        header: &[u8; HEADER_LEN],
        payload: &mut [u8],
        tag: &[u8; TAG_LEN],
    ) -> bool {
        let h = Header::from_bytes(header);
        let n = Array::from(nonce(direction, h.connection_id, h.sequence));
        self.aead
            .decrypt_inout_detached(&n, header, payload.into(), &Array::from(*tag))
            .is_ok()
    }
}

/// Receiving half of a GCM channel (the server's uplink, or a client's downlink).
#[derive(Debug)]
pub struct GcmReceiver {
    cipher: GcmCipher,
    connection_id: u32,
    direction: u8,
    window: ReplayWindow,
    peer: Option<SocketAddr>,
}

impl GcmReceiver {
    /// The server's side: receives what the device sends.
    pub fn uplink(cipher: GcmCipher, connection_id: u32) -> Self {
        Self::new(cipher, connection_id, DIRECTION_UPLINK)
    }

    /// A client's side: receives what the server sends.
    pub fn downlink(cipher: GcmCipher, connection_id: u32) -> Self {
        Self::new(cipher, connection_id, DIRECTION_DOWNLINK)
    }

    fn new(cipher: GcmCipher, connection_id: u32, direction: u8) -> Self {
        GcmReceiver {
            cipher,
            connection_id,
            direction,
            window: ReplayWindow::default(),
            peer: None,
        }
    }

    /// The address of the newest authenticated datagram's sender.
    pub fn peer(&self) -> Option<SocketAddr> {
        self.peer
    }

    /// Validates, authenticates and decrypts in place. On accept the Opus frame is
    /// `datagram[HEADER_LEN..HEADER_LEN + opus_len]`. On drop no state changes.
    pub fn on_datagram(&mut self, datagram: &mut [u8], from: SocketAddr) -> Verdict {
        let header = match Header::parse(datagram) {
            Ok(h) => h,
            Err(e) => return Verdict::Drop(DropReason::Malformed(e)),
        };
        if header.connection_id != self.connection_id {
            // The socket routes by this id, so only a direct caller can get here.
            return Verdict::Drop(DropReason::Unauthenticated);
        }
        let Some(opus_len) = usize::from(header.payload_len)
            .checked_sub(TAG_LEN)
            .filter(|&n| n > 0)
        else {
            return Verdict::Drop(DropReason::Malformed(DatagramError::Truncated));
        };
        let position = match self.window.check(header.sequence) {
            Ok(p) => p,
            Err(Refusal::Replay) => return Verdict::Drop(DropReason::Replay),
            Err(Refusal::Stale) => return Verdict::Drop(DropReason::Stale),
        };
        let (head, rest) = datagram.split_at_mut(HEADER_LEN);
        let head: &[u8; HEADER_LEN] = (&*head).try_into().expect("split at HEADER_LEN");
        let (payload, tag) = rest.split_at_mut(opus_len);
        let tag: &[u8; TAG_LEN] = (&*tag).try_into().expect("payload_len checked");
        if !self.cipher.open(self.direction, head, payload, tag) {
            return Verdict::Drop(DropReason::Unauthenticated);
        }
        self.window.record(header.sequence);
        let (gap, rebound) = match position {
            Position::Newest { skipped } => {
                let rebound = self.peer.is_some_and(|p| p != from);
                self.peer = Some(from);
                (skipped, rebound)
            }
            Position::Late => (0, false),
        };
        Verdict::Accept {
            header,
            gap,
            rebound,
            opus_len,
        }
    }
}

/// Sending half of a GCM channel.
#[derive(Debug)]
pub struct GcmSealer {
    cipher: GcmCipher,
    connection_id: u32,
    direction: u8,
    /// Sequence of the next datagram; `None` once `u32::MAX` has been used.
    next_sequence: Option<u32>,
}

impl GcmSealer {
    /// The server's side: seals what goes to the device.
    pub fn downlink(cipher: GcmCipher, connection_id: u32) -> Self {
        Self::starting_at(cipher, connection_id, DIRECTION_DOWNLINK, 1)
    }

    /// A client's side: seals what goes to the server.
    pub fn uplink(cipher: GcmCipher, connection_id: u32) -> Self {
        Self::starting_at(cipher, connection_id, DIRECTION_UPLINK, 1)
    }

    pub(crate) fn starting_at(
        cipher: GcmCipher,
        connection_id: u32,
        direction: u8,
        first: u32,
    ) -> Self {
        GcmSealer {
            cipher,
            connection_id,
            direction,
            next_sequence: Some(first.max(1)),
        }
    }

    /// Writes one sealed datagram for `opus` into `out` (cleared first).
    pub fn seal(
        &mut self,
        timestamp: u32,
        opus: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), SealError> {
        let payload_len = u16::try_from(opus.len() + TAG_LEN)
            .ok()
            .filter(|&n| usize::from(n) + HEADER_LEN <= MAX_DATAGRAM_LEN)
            .ok_or(SealError::TooLarge(opus.len()))?;
        let sequence = self.next_sequence.ok_or(SealError::SequenceExhausted)?;
        self.next_sequence = sequence.checked_add(1);
        let header = Header {
            flags: 0,
            payload_len,
            connection_id: self.connection_id,
            timestamp,
            sequence,
        }
        .to_bytes();
        out.clear();
        out.extend_from_slice(&header);
        out.extend_from_slice(opus);
        let tag = self
            .cipher
            .seal(self.direction, &header, &mut out[HEADER_LEN..]);
        out.extend_from_slice(&tag);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const KEY: [u8; 16] = [9; 16];
    const ID: u32 = 0x1234_5678;
    const OPUS: [u8; 5] = [11 << 3, 1, 2, 3, 4];

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn device() -> GcmSealer {
        GcmSealer::uplink(GcmCipher::new(&KEY), ID)
    }

    fn server() -> GcmReceiver {
        GcmReceiver::uplink(GcmCipher::new(&KEY), ID)
    }

    fn sealed(sealer: &mut GcmSealer, opus: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        sealer.seal(960, opus, &mut out).unwrap();
        out
    }

    /// The test vector in docs/transports.md (computed independently with Python's
    /// `cryptography` AESGCM).
    #[test]
    fn documented_vector() {
        let key: [u8; 16] = hex::decode("000102030405060708090a0b0c0d0e0f")
            .unwrap()
            .try_into()
            .unwrap();
        let mut s = GcmSealer::uplink(GcmCipher::new(&key), 0x1234_5678);
        let payload: Vec<u8> = (1..=40).collect();
        let mut out = Vec::new();
        s.seal(960, &payload, &mut out).unwrap();
        assert_eq!(
            hex::encode(&out[..HEADER_LEN]),
            "0100003812345678000003c000000001"
        );
        assert_eq!(
            hex::encode(nonce(DIRECTION_UPLINK, 0x1234_5678, 1)),
            "010000001234567800000001"
        );
        assert_eq!(
            hex::encode(&out),
            "0100003812345678000003c000000001210dea3d60ede0a8b72d9bddb027e700c0a2592e547f0e1cd268db9de5de7badc9370c1d4f5f35e79a78385c215f278f9ab9133c6ebc2675"
        );
    }

    #[test]
    fn round_trip_and_peer_binding() {
        let mut d = device();
        let mut s = server();
        let mut dg = sealed(&mut d, &OPUS);
        assert_eq!(dg.len(), HEADER_LEN + OPUS.len() + TAG_LEN);
        let v = s.on_datagram(&mut dg, addr(1));
        assert!(matches!(
            v,
            Verdict::Accept {
                gap: 0,
                rebound: false,
                opus_len: 5,
                ..
            }
        ));
        assert_eq!(&dg[HEADER_LEN..HEADER_LEN + 5], &OPUS);
        assert_eq!(s.peer(), Some(addr(1)));
        // A genuine datagram from a new address moves the binding.
        let mut dg = sealed(&mut d, &OPUS);
        assert!(matches!(
            s.on_datagram(&mut dg, addr(2)),
            Verdict::Accept { rebound: true, .. }
        ));
        assert_eq!(s.peer(), Some(addr(2)));
    }

    #[test]
    fn forged_replayed_stale_and_truncated_are_dropped() {
        let mut d = device();
        let mut s = server();
        let first = sealed(&mut d, &OPUS);
        assert!(matches!(
            s.on_datagram(&mut first.clone(), addr(1)),
            Verdict::Accept { .. }
        ));
        // Replay of the same bytes.
        assert_eq!(
            s.on_datagram(&mut first.clone(), addr(1)),
            Verdict::Drop(DropReason::Replay)
        );
        // A forgery: right header, one flipped ciphertext bit; from another address it
        // must not move the binding.
        let mut forged = sealed(&mut d, &OPUS);
        forged[HEADER_LEN] ^= 1;
        assert_eq!(
            s.on_datagram(&mut forged, addr(9)),
            Verdict::Drop(DropReason::Unauthenticated)
        );
        assert_eq!(s.peer(), Some(addr(1)));
        // The header is authenticated too: a changed timestamp fails.
        let mut retimed = sealed(&mut d, &OPUS);
        retimed[11] ^= 1;
        assert_eq!(
            s.on_datagram(&mut retimed, addr(1)),
            Verdict::Drop(DropReason::Unauthenticated)
        );
        // Shorter than a tag: malformed.
        let short = Header {
            flags: 0,
            payload_len: 10,
            connection_id: ID,
            timestamp: 0,
            sequence: 50,
        };
        let mut dg = short.to_bytes().to_vec();
        dg.extend_from_slice(&[0; 10]);
        assert_eq!(
            s.on_datagram(&mut dg, addr(1)),
            Verdict::Drop(DropReason::Malformed(DatagramError::Truncated))
        );
        // Cut short on the wire: the length no longer matches.
        let mut cut = sealed(&mut d, &OPUS);
        cut.truncate(cut.len() - 3);
        assert!(matches!(
            s.on_datagram(&mut cut, addr(1)),
            Verdict::Drop(DropReason::Malformed(DatagramError::LengthMismatch { .. }))
        ));
        // Reordered beyond the window: stale.
        let late = sealed(&mut d, &OPUS);
        for _ in 0..super::super::replay_window::WINDOW + 2 {
            let mut dg = sealed(&mut d, &OPUS);
            assert!(matches!(
                s.on_datagram(&mut dg, addr(1)),
                Verdict::Accept { .. }
            ));
        }
        assert_eq!(
            s.on_datagram(&mut late.clone(), addr(1)),
            Verdict::Drop(DropReason::Stale)
        );
    }

    #[test]
    fn late_datagrams_inside_the_window_are_accepted_once_and_move_nothing() {
        let mut d = device();
        let mut s = server();
        let a = sealed(&mut d, &OPUS);
        let b = sealed(&mut d, &OPUS);
        assert!(matches!(
            s.on_datagram(&mut b.clone(), addr(1)),
            Verdict::Accept { gap: 1, .. }
        ));
        assert!(matches!(
            s.on_datagram(&mut a.clone(), addr(2)),
            Verdict::Accept {
                gap: 0,
                rebound: false,
                ..
            }
        ));
        assert_eq!(s.peer(), Some(addr(1)));
        assert_eq!(
            s.on_datagram(&mut a.clone(), addr(1)),
            Verdict::Drop(DropReason::Replay)
        );
    }

    #[test]
    fn directions_do_not_mix() {
        // The server's own downlink datagram, reflected back at it, does not authenticate
        // as uplink even though key, id and sequence match.
        let mut down = GcmSealer::downlink(GcmCipher::new(&KEY), ID);
        let mut dg = sealed(&mut down, &OPUS);
        assert_eq!(
            server().on_datagram(&mut dg, addr(1)),
            Verdict::Drop(DropReason::Unauthenticated)
        );
    }

    #[test]
    fn the_sealer_stops_before_reusing_a_nonce() {
        let mut s = GcmSealer::starting_at(GcmCipher::new(&KEY), ID, DIRECTION_DOWNLINK, u32::MAX);
        let mut out = Vec::new();
        s.seal(0, &OPUS, &mut out).unwrap();
        assert_eq!(
            s.seal(0, &OPUS, &mut out),
            Err(SealError::SequenceExhausted)
        );
        assert_eq!(
            device().seal(0, &[0; MAX_DATAGRAM_LEN], &mut out),
            Err(SealError::TooLarge(MAX_DATAGRAM_LEN))
        );
    }

    proptest! {
        #[test]
        fn sealed_frames_open_to_what_was_sealed(
            key: [u8; 16],
            id: u32,
            frames in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..400), 1..12),
        ) {
            let mut d = GcmSealer::uplink(GcmCipher::new(&key), id);
            let mut s = GcmReceiver::uplink(GcmCipher::new(&key), id);
            let mut out = Vec::new();
            for (i, f) in frames.iter().enumerate() {
                d.seal(i as u32, f, &mut out).unwrap();
                let v = s.on_datagram(&mut out, addr(1));
                let Verdict::Accept { header, opus_len, .. } = v else {
                    return Err(TestCaseError::fail(format!("{v:?}")));
                };
                prop_assert_eq!(header.sequence, i as u32 + 1);
                prop_assert_eq!(&out[HEADER_LEN..HEADER_LEN + opus_len], &f[..]);
            }
        }

        #[test]
        fn any_bit_flip_is_refused(flip in 0usize..(HEADER_LEN + 5 + TAG_LEN) * 8) {
            let mut d = device();
            let mut dg = sealed(&mut d, &OPUS);
            dg[flip / 8] ^= 1 << (flip % 8);
            let v = server().on_datagram(&mut dg, addr(1));
            prop_assert!(matches!(v, Verdict::Drop(_)), "{:?}", v);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut bytes = bytes;
            let _ = server().on_datagram(&mut bytes, addr(1));
        }
    }
}
