//! Which xiaozhi-server a new conversation goes to.
//!
//! Conversations take the configured upstreams in turn (round robin), skipping one that
//! failed within `retry_after`; when every upstream failed recently, the one that failed
//! longest ago is tried first. A conversation whose first choice fails tries the others
//! in the same order, within its connect budget. Time comes in as `now`.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The configured upstreams and their recent failures.
#[derive(Debug)]
pub struct Upstreams {
    urls: Vec<String>,
    state: Mutex<State>,
    retry_after: Duration,
}

#[derive(Debug)]
struct State {
    next: usize,
    failed_at: Vec<Option<Instant>>,
}

impl Upstreams {
    /// `urls` are complete (already with the gateway query).
    pub fn new(urls: Vec<String>, retry_after: Duration) -> Self {
        let n = urls.len();
        Upstreams {
            urls,
            state: Mutex::new(State {
                next: 0,
                failed_at: vec![None; n],
            }),
            retry_after,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The order in which one conversation should try the upstreams (indices).
    pub fn plan(&self, now: Instant) -> Vec<usize> {
        let n = self.urls.len();
        let mut state = self.lock();
        let start = state.next % n.max(1);
        state.next = state.next.wrapping_add(1);
        let rotation = (0..n).map(|i| (start + i) % n);
        let healthy = |i: &usize| {
            state.failed_at[*i].is_none_or(|t| now.duration_since(t) >= self.retry_after)
        };
        let mut plan: Vec<usize> = rotation.clone().filter(healthy).collect();
        let mut sick: Vec<usize> = rotation.filter(|i| !healthy(i)).collect();
        sick.sort_by_key(|i| state.failed_at[*i]);
        plan.extend(sick);
        plan
    }

    pub fn url(&self, index: usize) -> &str {
        &self.urls[index]
    }

    pub fn failed(&self, index: usize, now: Instant) {
        self.lock().failed_at[index] = Some(now);
    }

    pub fn succeeded(&self, index: usize) {
        self.lock().failed_at[index] = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn three() -> Upstreams {
        Upstreams::new(
            vec!["ws://a/".into(), "ws://b/".into(), "ws://c/".into()],
            Duration::from_secs(30),
        )
    }

    #[test]
    fn conversations_rotate_over_healthy_upstreams() {
        let u = three();
        let now = Instant::now();
        assert_eq!(u.plan(now), vec![0, 1, 2]);
        assert_eq!(u.plan(now), vec![1, 2, 0]);
        assert_eq!(u.plan(now), vec![2, 0, 1]);
    }

    #[test]
    fn a_failed_upstream_goes_last_until_its_retry_time() {
        let u = three();
        let t0 = Instant::now();
        u.failed(0, t0);
        assert_eq!(u.plan(t0), vec![1, 2, 0]);
        assert_eq!(u.plan(t0), vec![1, 2, 0]);
        let later = t0 + Duration::from_secs(31);
        assert_eq!(
            u.plan(later),
            vec![2, 0, 1],
            "healthy again after retry_after"
        );
        u.failed(2, later);
        u.succeeded(0);
        assert_eq!(u.plan(later), vec![0, 1, 2]);
        assert_eq!(u.plan(later), vec![1, 0, 2]);
    }

    #[test]
    fn when_all_failed_the_oldest_failure_is_tried_first() {
        let u = three();
        let t0 = Instant::now();
        u.failed(1, t0);
        u.failed(2, t0 + Duration::from_secs(1));
        u.failed(0, t0 + Duration::from_secs(2));
        assert_eq!(u.plan(t0 + Duration::from_secs(3)), vec![1, 2, 0]);
    }
}
