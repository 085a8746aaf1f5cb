//! "Logged once per offender": which peers have already been warned about.
//!
//! A flood from one address must produce one warning, not one per refused packet, yet a
//! peer that misbehaves again much later deserves a fresh line. So a peer is warned at
//! most once per `window`. The table is bounded: when it is full, entries older than the
//! window are dropped, and if it is still full the newcomer is not logged (its refusals
//! are still counted by the caller).

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// Peers warned recently.
#[derive(Debug)]
pub struct OffenderLog<K> {
    warned: HashMap<K, Instant>,
    window: Duration,
    capacity: usize,
}

impl<K: Hash + Eq + Copy> OffenderLog<K> {
    pub fn new(window: Duration, capacity: usize) -> Self {
        OffenderLog {
            warned: HashMap::new(),
            window,
            capacity: capacity.max(1),
        }
    }

    /// Whether `peer` should be warned about now; if so, it is remembered.
    pub fn should_warn(&mut self, peer: K, now: Instant) -> bool {
        if let Some(at) = self.warned.get_mut(&peer) {
            if now.saturating_duration_since(*at) < self.window {
                return false;
            }
            *at = now;
            return true;
        }
        if self.warned.len() >= self.capacity {
            let window = self.window;
            self.warned
                .retain(|_, at| now.saturating_duration_since(*at) < window);
            if self.warned.len() >= self.capacity {
                return false;
            }
        }
        self.warned.insert(peer, now);
        true
    }

    pub fn len(&self) -> usize {
        self.warned.len()
    }

    pub fn is_empty(&self) -> bool {
        self.warned.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn once_per_window_per_peer() {
        let t0 = Instant::now();
        let mut log = OffenderLog::new(Duration::from_secs(60), 16);
        assert!(log.should_warn(1u32, t0));
        assert!(!log.should_warn(1, t0 + Duration::from_secs(59)));
        assert!(log.should_warn(2, t0));
        assert!(log.should_warn(1, t0 + Duration::from_secs(61)));
    }

    #[test]
    fn bounded_and_forgets_stale_peers_first() {
        let t0 = Instant::now();
        let mut log = OffenderLog::new(Duration::from_secs(60), 2);
        assert!(log.should_warn(1u32, t0));
        assert!(log.should_warn(2, t0));
        // Full with fresh entries: a newcomer is not logged, and not remembered.
        assert!(!log.should_warn(3, t0 + Duration::from_secs(1)));
        assert_eq!(log.len(), 2);
        // Once the old ones are stale, room is made.
        assert!(log.should_warn(3, t0 + Duration::from_secs(61)));
        assert_eq!(log.len(), 1);
    }
}
