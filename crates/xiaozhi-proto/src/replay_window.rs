//! A sliding anti-replay window over 32-bit sequence numbers, as IPsec keeps one
//! (RFC 4303 section 3.4.3): the highest sequence accepted so far and a bitmap of which of
//! the [`WINDOW`] sequences below it have been seen.
//!
//! An authenticated transport (AES-GCM over UDP) can accept a datagram that arrives a
//! little late, since its tag proves it genuine, but must still refuse to accept the same
//! datagram twice. Checking is split from recording so that a datagram is checked before
//! the (comparatively costly) tag verification and recorded only once it authenticates:
//! a forgery never moves the window.

/// How many sequences below the highest accepted one are still accepted if unseen
/// (about 3.8 s of 60 ms audio frames: far more reordering than a real path shows).
pub const WINDOW: u32 = 64;

/// Where a sequence number falls relative to the window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Position {
    /// Above everything accepted so far; `skipped` sequences in between are missing.
    Newest { skipped: u32 },
    /// Inside the window and not seen yet: late but genuine-looking.
    Late,
}

/// Why a sequence number is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Accepted before.
    Replay,
    /// Below the window: too old to tell whether it was seen (or sequence 0, which no
    /// sender uses).
    Stale,
}

/// The window. Starts empty: the first sequence accepted may be any from 1 up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplayWindow {
    /// Highest sequence accepted; 0 before the first.
    highest: u32,
    /// Bit `i` set: sequence `highest - i` was accepted (bit 0 is `highest` itself).
    seen: u64,
}

impl ReplayWindow {
    /// Highest sequence accepted so far (0 before any).
    pub fn highest(&self) -> u32 {
        self.highest
    }

    /// Classifies `sequence` without recording it.
    pub fn check(&self, sequence: u32) -> Result<Position, Refusal> {
        if sequence == 0 {
            return Err(Refusal::Stale);
        }
        if sequence > self.highest {
            let skipped = if self.highest == 0 {
                sequence - 1
            } else {
                sequence - self.highest - 1
            };
            return Ok(Position::Newest { skipped });
        }
        let behind = self.highest - sequence;
        if behind >= WINDOW {
            return Err(Refusal::Stale);
        }
        if self.seen & (1u64 << behind) != 0 {
            Err(Refusal::Replay)
        } else {
            Ok(Position::Late)
        }
    }

    /// Records `sequence` as accepted. Call only after [`ReplayWindow::check`] allowed it
    /// (and the datagram authenticated); recording a refused sequence changes nothing.
    pub fn record(&mut self, sequence: u32) {
        match self.check(sequence) {
            Ok(Position::Newest { .. }) => {
                let shift = sequence - self.highest;
                self.seen = if shift >= 64 { 0 } else { self.seen << shift };
                self.seen |= 1;
                self.highest = sequence;
            }
            Ok(Position::Late) => self.seen |= 1u64 << (self.highest - sequence),
            Err(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn in_order_then_replay() {
        let mut w = ReplayWindow::default();
        assert_eq!(w.check(1), Ok(Position::Newest { skipped: 0 }));
        w.record(1);
        assert_eq!(w.check(1), Err(Refusal::Replay));
        assert_eq!(w.check(4), Ok(Position::Newest { skipped: 2 }));
        w.record(4);
        assert_eq!(w.check(2), Ok(Position::Late));
        w.record(2);
        assert_eq!(w.check(2), Err(Refusal::Replay));
        assert_eq!(w.check(3), Ok(Position::Late));
        assert_eq!(w.check(0), Err(Refusal::Stale));
    }

    #[test]
    fn the_window_edge() {
        let mut w = ReplayWindow::default();
        w.record(100);
        assert_eq!(w.check(100 - WINDOW + 1), Ok(Position::Late));
        assert_eq!(w.check(100 - WINDOW), Err(Refusal::Stale));
        // A jump beyond the window forgets everything below it.
        w.record(100 + 200);
        assert_eq!(w.check(100), Err(Refusal::Stale));
        assert_eq!(w.check(299), Ok(Position::Late));
        assert_eq!(w.highest(), 300);
    }

    #[test]
    fn the_first_sequence_may_be_anything_but_zero() {
        let w = ReplayWindow::default();
        assert_eq!(
            w.check(u32::MAX),
            Ok(Position::Newest {
                skipped: u32::MAX - 1
            })
        );
        let mut w = w;
        w.record(u32::MAX);
        assert_eq!(w.check(u32::MAX), Err(Refusal::Replay));
    }

    proptest! {
        /// Against a model that remembers every sequence: the window never accepts a
        /// sequence twice, and accepts every unseen one that is newest or within WINDOW.
        #[test]
        fn matches_a_model(seqs in proptest::collection::vec(1u32..400, 1..300)) {
            let mut w = ReplayWindow::default();
            let mut accepted = std::collections::HashSet::new();
            let mut highest = 0u32;
            for s in seqs {
                let verdict = w.check(s);
                let expect_ok = !accepted.contains(&s) && (s > highest || highest - s < WINDOW);
                prop_assert_eq!(verdict.is_ok(), expect_ok, "seq {} highest {}", s, highest);
                if let Err(Refusal::Replay) = verdict {
                    prop_assert!(accepted.contains(&s));
                }
                if verdict.is_ok() {
                    w.record(s);
                    accepted.insert(s);
                    highest = highest.max(s);
                }
                prop_assert_eq!(w.highest(), highest);
            }
        }
    }
}
