//! Just enough of Opus packet structure (RFC 6716 section 3) to tell a real frame from
//! random bytes.
//!
//! UDP audio is AES-CTR without integrity, so a datagram forged by someone who does not
//! hold the key still "decrypts", to noise. The channel rules use [`inspect`] as one of
//! the signs that a datagram really comes from the device before they let it bind or move
//! the downlink address. It is not a decoder and never runs on the plain relay path
//! beyond reading a byte or two.

/// What the TOC byte (and frame count) of a structurally valid Opus packet say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacketShape {
    /// Total audio duration of the packet in microseconds.
    pub duration_us: u32,
    /// Number of frames in the packet.
    pub frames: u8,
}

/// Longest frame the spec allows, in bytes.
const MAX_FRAME_BYTES: usize = 1275;
/// Longest packet duration the spec allows.
const MAX_PACKET_US: u32 = 120_000;

/// Frame duration in microseconds for each of the 32 TOC configurations.
fn frame_duration_us(config: u8) -> u32 {
    match config {
        0..=11 => [10_000, 20_000, 40_000, 60_000][usize::from(config % 4)],
        12..=15 => [10_000, 20_000][usize::from(config % 2)],
        _ => [2_500, 5_000, 10_000, 20_000][usize::from(config % 4)],
    }
}

/// Checks the packet framing rules of RFC 6716 section 3.4 that can be checked without
/// decoding, and returns the packet's shape, or `None` when the bytes cannot be Opus.
pub fn inspect(packet: &[u8]) -> Option<PacketShape> {
    let (&toc, rest) = packet.split_first()?;
    let per_frame = frame_duration_us(toc >> 3);
    let frames: u8 = match toc & 0b11 {
        0 => (rest.len() <= MAX_FRAME_BYTES).then_some(1)?,
        1 => (rest.len() % 2 == 0 && rest.len() / 2 <= MAX_FRAME_BYTES).then_some(2)?,
        2 => {
            let (&b0, after) = rest.split_first()?;
            let (first_len, after) = if b0 < 252 {
                (usize::from(b0), after)
            } else {
                let (&b1, after2) = after.split_first()?;
                (usize::from(b1) * 4 + usize::from(b0), after2)
            };
            let second_len = after.len().checked_sub(first_len)?;
            (first_len <= MAX_FRAME_BYTES && second_len <= MAX_FRAME_BYTES).then_some(2)?
        }
        _ => {
            let (&count_byte, _) = rest.split_first()?;
            let count = count_byte & 0x3f;
            if count == 0 {
                return None;
            }
            count
        }
    };
    let duration_us = per_frame * u32::from(frames);
    (duration_us <= MAX_PACKET_US).then_some(PacketShape {
        duration_us,
        frames,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn silk_wideband_60ms_single_frame() {
        // TOC config 11 (SILK WB, 60 ms), mono, code 0: what the firmware's encoder emits.
        let packet = [11 << 3, 0xaa, 0xbb, 0xcc];
        assert_eq!(
            inspect(&packet),
            Some(PacketShape {
                duration_us: 60_000,
                frames: 1
            })
        );
    }

    #[test]
    fn celt_20ms_times_three_is_60ms() {
        let packet = [(31 << 3) | 3, 3, 1, 2, 3];
        assert_eq!(
            inspect(&packet),
            Some(PacketShape {
                duration_us: 60_000,
                frames: 3
            })
        );
    }

    #[test]
    fn rejects_impossible_packets() {
        assert_eq!(inspect(&[]), None);
        assert_eq!(
            inspect(&[(11 << 3) | 1, 1, 2, 3]),
            None,
            "code 1 needs an even payload"
        );
        assert_eq!(
            inspect(&[(11 << 3) | 3, 0]),
            None,
            "code 3 needs at least one frame"
        );
        assert_eq!(
            inspect(&[(11 << 3) | 3, 3]),
            None,
            "3 x 60 ms exceeds 120 ms"
        );
        assert_eq!(
            inspect(&[(11 << 3) | 2, 200, 1]),
            None,
            "first frame longer than the packet"
        );
    }

    proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..1400)) {
            let _ = inspect(&bytes);
        }
    }
}
