//! The Opus packets of one utterance, kept in one buffer.
//!
//! Chat history keeps every relayed frame of an utterance until the utterance is
//! written, for both directions of every conversation. Holding each frame in its own
//! `Vec<u8>` cost an allocation per frame on the relay's hot path and ~40 bytes of
//! bookkeeping per 60-120 byte frame. [`OpusPackets`] appends the frames' bytes to one
//! buffer and their ends to a second one, so recording a frame allocates nothing once
//! the buffers have grown to the utterance's size (they grow by doubling), and dropping the oldest frames (a cap on
//! the most recent ones) is amortised O(1).
//!
//! In the journal the packets keep the shape they always had (a JSON array of byte
//! arrays), so a journal written by an older gateway replays unchanged.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Frames dropped from the front are reclaimed once they are at least this many and
/// at least half of what is held.
const COMPACT_MIN: usize = 64;

/// Opus packets in order, in one byte buffer.
#[derive(Debug, Clone, Default)]
pub struct OpusPackets {
    /// The packets' bytes back to back (including dropped ones not yet reclaimed).
    bytes: Vec<u8>,
    /// End offset in `bytes` of every packet (including dropped ones).
    ends: Vec<u32>,
    /// Index in `ends` of the first packet still held.
    first: usize,
}

impl OpusPackets {
    /// Appends a packet. A packet that would take the buffer beyond 4 GiB is dropped
    /// (an utterance is capped at minutes, far below it).
    pub fn push(&mut self, packet: &[u8]) {
        let Ok(end) = u32::try_from(self.bytes.len() + packet.len()) else {
            return;
        };
        self.bytes.extend_from_slice(packet);
        self.ends.push(end);
    }

    /// Drops the oldest packet, if any.
    pub fn pop_front(&mut self) {
        if self.first == self.ends.len() {
            return;
        }
        self.first += 1;
        if self.first == self.ends.len() {
            self.clear();
        } else if self.first >= COMPACT_MIN && self.first * 2 >= self.ends.len() {
            self.compact();
        }
    }

    /// Drops every packet, keeping the buffers' capacity.
    pub fn clear(&mut self) {
        self.bytes.clear();
        self.ends.clear();
        self.first = 0;
    }

    /// Packets held.
    pub fn len(&self) -> usize {
        self.ends.len() - self.first
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of the packets held.
    pub fn byte_len(&self) -> usize {
        self.bytes.len() - self.start_of(self.first)
    }

    /// Room the buffers have: (bytes, packets).
    pub fn capacity(&self) -> (usize, usize) {
        (self.bytes.capacity(), self.ends.capacity())
    }

    /// The packets, oldest first.
    pub fn iter(&self) -> Packets<'_> {
        Packets {
            all: self,
            next: self.first,
        }
    }

    fn start_of(&self, index: usize) -> usize {
        match index {
            0 => 0,
            i => self.ends[i - 1] as usize,
        }
    }

    /// Moves the packets held to the front of the buffers.
    fn compact(&mut self) {
        let start = self.start_of(self.first);
        self.bytes.drain(..start);
        self.ends.drain(..self.first);
        let start = start as u32;
        for end in &mut self.ends {
            *end -= start;
        }
        self.first = 0;
    }
}

impl PartialEq for OpusPackets {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().eq(other.iter())
    }
}

impl Eq for OpusPackets {}

impl<P: AsRef<[u8]>> FromIterator<P> for OpusPackets {
    fn from_iter<I: IntoIterator<Item = P>>(packets: I) -> Self {
        let mut all = OpusPackets::default();
        for packet in packets {
            all.push(packet.as_ref());
        }
        all
    }
}

/// Iterator over [`OpusPackets`], oldest first.
#[derive(Clone)]
pub struct Packets<'a> {
    all: &'a OpusPackets,
    next: usize,
}

impl<'a> Iterator for Packets<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        let end = *self.all.ends.get(self.next)? as usize;
        let start = self.all.start_of(self.next);
        self.next += 1;
        self.all.bytes.get(start..end)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = self.all.ends.len() - self.next;
        (left, Some(left))
    }
}

impl ExactSizeIterator for Packets<'_> {}

impl<'a> IntoIterator for &'a OpusPackets {
    type Item = &'a [u8];
    type IntoIter = Packets<'a>;

    fn into_iter(self) -> Packets<'a> {
        self.iter()
    }
}

impl Serialize for OpusPackets {
    /// As a sequence of byte sequences: the JSON `[[1,2],[3]]` a `Vec<Vec<u8>>` gives.
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.iter().map(AsSeq))
    }
}

/// A packet serialized as a sequence of numbers (as `Vec<u8>` is), not as bytes.
struct AsSeq<'a>(&'a [u8]);

impl Serialize for AsSeq<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.0)
    }
}

impl<'de> Deserialize<'de> for OpusPackets {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let packets = Vec::<Vec<u8>>::deserialize(deserializer)?;
        Ok(packets.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(i: usize) -> Vec<u8> {
        (0..(i % 7) + 1).map(|j| (i * 13 + j) as u8).collect()
    }

    #[test]
    fn packets_come_back_in_order_and_whole() {
        let mut all = OpusPackets::default();
        assert!(all.is_empty() && all.iter().next().is_none());
        for i in 0..100 {
            all.push(&packet(i));
        }
        assert_eq!(all.len(), 100);
        assert_eq!(all.iter().len(), 100);
        let back: Vec<Vec<u8>> = all.iter().map(<[u8]>::to_vec).collect();
        assert_eq!(back, (0..100).map(packet).collect::<Vec<_>>());
        assert_eq!(all.byte_len(), back.iter().map(Vec::len).sum::<usize>());
        // An empty packet is a packet too.
        all.push(&[]);
        assert_eq!(all.iter().last(), Some(&[][..]));
    }

    #[test]
    fn dropping_the_oldest_keeps_the_most_recent_across_compactions() {
        let mut all = OpusPackets::default();
        let cap = 150;
        for i in 0..10_000 {
            if all.len() == cap {
                all.pop_front();
            }
            all.push(&packet(i));
            let want_first = (i + 1).saturating_sub(cap);
            assert_eq!(all.len(), i + 1 - want_first);
            if i % 997 == 0 || i == 9_999 {
                let back: Vec<Vec<u8>> = all.iter().map(<[u8]>::to_vec).collect();
                assert_eq!(back, (want_first..=i).map(packet).collect::<Vec<_>>());
            }
        }
        // The buffers stay near the cap, not the 10,000 packets seen.
        assert!(all.capacity().1 <= 4 * cap, "{:?}", all.capacity());
        while !all.is_empty() {
            all.pop_front();
        }
        all.pop_front();
        assert_eq!((all.len(), all.byte_len()), (0, 0));
    }

    #[test]
    fn the_journal_shape_is_an_array_of_byte_arrays_both_ways() {
        let all: OpusPackets = [vec![1u8, 2], vec![], vec![255]].into_iter().collect();
        let json = serde_json::to_string(&all).unwrap();
        assert_eq!(json, "[[1,2],[],[255]]");
        // What an older gateway wrote (a Vec<Vec<u8>>) reads back the same.
        let old = serde_json::to_string(&vec![vec![1u8, 2], vec![], vec![255]]).unwrap();
        assert_eq!(serde_json::from_str::<OpusPackets>(&old).unwrap(), all);
        // After dropping from the front, only what is held is written.
        let mut tail = all.clone();
        tail.pop_front();
        assert_eq!(serde_json::to_string(&tail).unwrap(), "[[],[255]]");
        assert!(serde_json::from_str::<OpusPackets>("[[256]]").is_err());
        assert!(serde_json::from_str::<OpusPackets>("[1]").is_err());
    }
}
