//! A token bucket: the one rate rule every per-peer limit uses.
//!
//! `rate` tokens per second refill up to `burst`; each event takes one. A bucket starts
//! full, so a peer may burst right after it appears (a device sends its hello, its MCP
//! tool list and a listen in quick succession) and is held to `rate` only when it keeps
//! it up. A rate of 0 means unlimited, so a limit can be switched off in config.

use std::time::Instant;

/// Token bucket state for one peer. Small and `Copy`: it lives inside per-connection
/// and per-channel state.
#[derive(Debug, Clone, Copy)]
pub struct TokenBucket {
    tokens: f64,
    rate: f64,
    burst: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket of `burst` tokens refilled at `rate` per second (`rate` 0: no limit).
    pub fn new(rate: u32, burst: u32, now: Instant) -> Self {
        let burst = f64::from(burst.max(1));
        TokenBucket {
            tokens: burst,
            rate: f64::from(rate),
            burst,
            last: now,
        }
    }

    /// Whether this bucket limits anything.
    pub fn is_unlimited(&self) -> bool {
        self.rate == 0.0
    }

    /// Takes one token if there is one.
    pub fn try_take(&mut self, now: Instant) -> bool {
        if self.is_unlimited() {
            return true;
        }
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Whether the bucket has refilled completely (its peer has been quiet long enough
    /// that forgetting it changes nothing).
    pub fn is_full(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= self.burst
    }

    fn refill(&mut self, now: Instant) {
        // `saturating_duration_since`: a clock read that went backwards adds nothing.
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn bursts_then_holds_to_the_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10, 5, t0);
        assert_eq!((0..8).filter(|_| b.try_take(t0)).count(), 5);
        // 0.35 s at 10/s: 3 more tokens.
        let t1 = t0 + Duration::from_millis(350);
        assert_eq!((0..8).filter(|_| b.try_take(t1)).count(), 3);
        // Never more than the burst, however long the pause.
        let t2 = t1 + Duration::from_secs(3600);
        assert!(b.is_full(t2));
        assert_eq!((0..8).filter(|_| b.try_take(t2)).count(), 5);
    }

    #[test]
    fn rate_zero_is_unlimited() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(0, 1, t0);
        assert!(b.is_unlimited());
        assert!((0..10_000).all(|_| b.try_take(t0)));
    }

    #[test]
    fn a_clock_going_backwards_adds_nothing() {
        let t1 = Instant::now() + Duration::from_secs(10);
        let mut b = TokenBucket::new(1, 1, t1);
        assert!(b.try_take(t1));
        assert!(!b.try_take(t1 - Duration::from_secs(5)));
    }
}
