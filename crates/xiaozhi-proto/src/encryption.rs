//! Which cipher suite a UDP audio channel speaks, chosen per conversation in the hello:
//! `aes-128-ctr` (stock firmware, [`super::audio_channel`]) or `aes-128-gcm` (the
//! `udp_aead` extension, [`super::gcm_channel`]). The socket driver holds one
//! [`ChannelReceiver`] and one [`ChannelSealer`] per channel and never needs to know which.

use std::net::SocketAddr;

use super::audio_channel::{DownlinkSealer, SealError, UplinkChannel, Verdict};
use super::cipher::{KEY_LEN, PacketCipher};
use super::gcm_channel::{GcmCipher, GcmReceiver, GcmSealer};

/// The cipher suite of a UDP audio channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encryption {
    /// What stock firmware speaks: secrecy, no integrity.
    Aes128Ctr,
    /// Authenticated: every datagram carries a tag over header and payload.
    Aes128Gcm,
}

impl Encryption {
    /// The `udp.encryption` value of the server hello.
    pub fn wire_name(self) -> &'static str {
        match self {
            Encryption::Aes128Ctr => "aes-128-ctr",
            Encryption::Aes128Gcm => "aes-128-gcm",
        }
    }

    /// Reads a `udp.encryption` value.
    pub fn from_wire_name(name: &str) -> Option<Encryption> {
        match name {
            "aes-128-ctr" => Some(Encryption::Aes128Ctr),
            "aes-128-gcm" => Some(Encryption::Aes128Gcm),
            _ => None,
        }
    }

    /// The server's two halves of a new channel.
    pub fn server_channel(
        self,
        key: &[u8; KEY_LEN],
        connection_id: u32,
    ) -> (ChannelReceiver, ChannelSealer) {
        match self {
            Encryption::Aes128Ctr => {
                let cipher = PacketCipher::new(key);
                (
                    ChannelReceiver::Ctr(UplinkChannel::new(cipher.clone())),
                    ChannelSealer::Ctr(DownlinkSealer::new(cipher, connection_id)),
                )
            }
            Encryption::Aes128Gcm => {
                let cipher = GcmCipher::new(key);
                (
                    ChannelReceiver::Gcm(Box::new(GcmReceiver::uplink(
                        cipher.clone(),
                        connection_id,
                    ))),
                    ChannelSealer::Gcm(Box::new(GcmSealer::downlink(cipher, connection_id))),
                )
            }
        }
    }
}

/// The receiving half of a channel, either suite. GCM's state is boxed: its expanded
/// key and GHASH key would double the size of every stock CTR channel, while CTR, the
/// common case, stays inline (no pointer chase per stock datagram).
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub enum ChannelReceiver {
    Ctr(UplinkChannel),
    Gcm(Box<GcmReceiver>),
}

impl ChannelReceiver {
    /// Validates and decrypts in place; see each suite for the rules.
    pub fn on_datagram(&mut self, datagram: &mut [u8], from: SocketAddr) -> Verdict {
        match self {
            ChannelReceiver::Ctr(c) => c.on_datagram(datagram, from),
            ChannelReceiver::Gcm(c) => c.on_datagram(datagram, from),
        }
    }

    /// Where downlink audio should go: the suite's own binding, which an accepted
    /// datagram does not always move (a late GCM datagram moves nothing).
    pub fn peer(&self) -> Option<SocketAddr> {
        match self {
            ChannelReceiver::Ctr(c) => c.peer(),
            ChannelReceiver::Gcm(c) => c.peer(),
        }
    }
}

/// The sending half of a channel, either suite (boxed GCM, as for [`ChannelReceiver`]).
#[derive(Debug)]
pub enum ChannelSealer {
    Ctr(DownlinkSealer),
    Gcm(Box<GcmSealer>),
}

impl ChannelSealer {
    /// Writes one sealed datagram for `opus` into `out` (cleared first).
    pub fn seal(
        &mut self,
        timestamp: u32,
        opus: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), SealError> {
        match self {
            ChannelSealer::Ctr(s) => s.seal(timestamp, opus, out),
            ChannelSealer::Gcm(s) => s.seal(timestamp, opus, out),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audio_channel::DropReason;
    use crate::datagram::HEADER_LEN;

    #[test]
    fn wire_names_round_trip() {
        for e in [Encryption::Aes128Ctr, Encryption::Aes128Gcm] {
            assert_eq!(Encryption::from_wire_name(e.wire_name()), Some(e));
        }
        assert_eq!(Encryption::from_wire_name("aes-256-gcm"), None);
    }

    /// A server channel of one suite refuses what the other suite seals under the same
    /// key: a device and server that disagree on the suite never exchange audio.
    #[test]
    fn the_suites_do_not_understand_each_other() {
        let key = [3u8; 16];
        let opus = [11 << 3, 1, 2, 3, 4];
        let addr = SocketAddr::from(([127, 0, 0, 1], 1));
        let mut out = Vec::new();
        let (mut gcm_rx, _) = Encryption::Aes128Gcm.server_channel(&key, 7);
        DownlinkSealer::new(PacketCipher::new(&key), 7)
            .seal(0, &opus, &mut out)
            .unwrap();
        assert!(matches!(
            gcm_rx.on_datagram(&mut out, addr),
            Verdict::Drop(_)
        ));
        let (mut ctr_rx, _) = Encryption::Aes128Ctr.server_channel(&key, 7);
        GcmSealer::uplink(GcmCipher::new(&key), 7)
            .seal(0, &opus, &mut out)
            .unwrap();
        // CTR cannot tell: it decrypts to noise that is not 60 ms of Opus.
        let v = ctr_rx.on_datagram(&mut out, addr);
        assert!(
            matches!(v, Verdict::Drop(DropReason::Undecryptable))
                || !matches!(v, Verdict::Accept { opus_len, .. } if out[HEADER_LEN..HEADER_LEN + opus_len] == opus)
        );
    }
}
