//! Owned copies of audio frames without an allocation per frame.
//!
//! A frame that leaves the task that received it (the UDP socket task handing an uplink
//! frame to its conversation, the relay handing it to the WebSocket writer) must be
//! owned: a `Bytes`. `Bytes::copy_from_slice` allocates for each one, 16 times a second
//! per device and direction. A [`FrameSlab`] copies frames back to back into one buffer
//! and hands out each as a `Bytes` view of it; once every view of the buffer has been
//! dropped (the consumer keeps up, which is the steady state) the next frames reuse the
//! same memory, so nothing is allocated. A consumer that falls behind only makes the
//! slab start a fresh buffer, while the old one lives until its last frame is dropped.

use bytes::{Bytes, BytesMut};

/// A buffer frames are copied into and handed out from.
#[derive(Debug)]
pub struct FrameSlab {
    buf: BytesMut,
    /// Bytes each buffer is made with (more if one frame is larger).
    size: usize,
}

impl FrameSlab {
    /// A slab whose buffers hold `size` bytes of frames; nothing is allocated before the
    /// first frame.
    pub fn new(size: usize) -> FrameSlab {
        FrameSlab {
            buf: BytesMut::new(),
            size,
        }
    }

    /// An owned copy of `frame`.
    pub fn copy(&mut self, frame: &[u8]) -> Bytes {
        // Back to the start of the buffer whenever every frame handed out is gone (no
        // allocation; an atomic load when some are still held). Done early, not when
        // the buffer runs out, so a burst of frames arriving together (read in one
        // batch, none consumed yet) never finds the buffer full.
        if self.buf.capacity() < self.size {
            let _ = self.buf.try_reclaim(self.size);
        }
        if self.buf.capacity() < frame.len() {
            self.buf.reserve(self.size.max(frame.len()));
        }
        self.buf.extend_from_slice(frame);
        self.buf.split().freeze()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_come_out_whole_and_independent() {
        let mut slab = FrameSlab::new(64);
        let frames: Vec<Vec<u8>> = (0..100u8).map(|i| vec![i; usize::from(i % 40)]).collect();
        // Kept alive: the slab moves on to fresh buffers and nothing is overwritten.
        let copies: Vec<Bytes> = frames.iter().map(|f| slab.copy(f)).collect();
        for (copy, frame) in copies.iter().zip(&frames) {
            assert_eq!(copy.as_ref(), frame.as_slice());
        }
        // Larger than the slab's size: still one whole frame.
        let big = vec![7u8; 1_000];
        assert_eq!(slab.copy(&big).as_ref(), big.as_slice());
    }

    #[test]
    fn bursts_held_together_reuse_one_buffer_when_consumed_between_them() {
        let mut slab = FrameSlab::new(512);
        let base = slab.copy(&[0; 1]).as_ptr();
        for burst in 0..500u32 {
            // Eight frames read together and held until the burst is consumed.
            let held: Vec<Bytes> = (0..8)
                .map(|i| slab.copy(&[(burst + i) as u8; 60]))
                .collect();
            for frame in &held {
                let offset = frame.as_ptr() as usize - base as usize;
                assert!(offset < 512, "burst {burst} left the first buffer");
            }
        }
    }

    #[test]
    fn a_consumer_that_keeps_up_reuses_one_buffer() {
        let mut slab = FrameSlab::new(256);
        let first = slab.copy(&[1; 60]);
        let base = first.as_ptr();
        drop(first);
        for i in 0..1_000u32 {
            let frame = [(i % 251) as u8; 60];
            let copy = slab.copy(&frame);
            assert_eq!(copy.as_ref(), &frame[..]);
            let offset = copy.as_ptr() as usize - base as usize;
            assert!(offset < 256, "frame {i} is outside the first buffer");
        }
    }
}
