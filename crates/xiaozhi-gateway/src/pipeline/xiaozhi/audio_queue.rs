//! The uplink audio queue between a conversation and its WebSocket writer: bounded,
//! dropping the oldest frame when full (late audio is worth less than current audio),
//! and holding nothing once the writer has taken a frame.
//!
//! It replaced a `tokio::sync::broadcast` channel used as a drop-oldest ring: a
//! broadcast ring keeps every slot's last value alive until it is overwritten, so each
//! conversation held its last 64 frames (about 13 KB) for as long as it lasted.

use std::collections::VecDeque;
use std::sync::{Mutex, PoisonError};

use tokio::sync::Notify;

/// A bounded single-consumer queue that drops its oldest item when full.
pub struct DropOldest<T> {
    state: Mutex<State<T>>,
    ready: Notify,
    capacity: usize,
}

struct State<T> {
    items: VecDeque<T>,
    /// Items dropped since the consumer last looked.
    dropped: u64,
    closed: bool,
}

/// What the consumer gets.
#[derive(Debug, PartialEq, Eq)]
pub enum Next<T> {
    Item(T),
    /// This many items were dropped for lack of room since the last call.
    Dropped(u64),
    /// The producer closed the queue and it is empty.
    Closed,
}

impl<T> DropOldest<T> {
    pub fn new(capacity: usize) -> Self {
        DropOldest {
            state: Mutex::new(State {
                items: VecDeque::new(),
                dropped: 0,
                closed: false,
            }),
            ready: Notify::new(),
            capacity: capacity.max(1),
        }
    }

    /// Queues `item`, dropping the oldest if the queue is full.
    pub fn push(&self, item: T) {
        {
            let mut s = self.lock();
            if s.items.len() == self.capacity {
                s.items.pop_front();
                s.dropped += 1;
            }
            s.items.push_back(item);
        }
        self.ready.notify_one();
    }

    /// No more items will come; the consumer gets [`Next::Closed`] once it has taken the
    /// rest.
    pub fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_one();
    }

    /// The next item, or news of drops, or the end.
    pub async fn next(&self) -> Next<T> {
        loop {
            {
                let mut s = self.lock();
                if s.dropped > 0 {
                    return Next::Dropped(std::mem::take(&mut s.dropped));
                }
                if let Some(item) = s.items.pop_front() {
                    // Let go of the room a burst needed once the queue is drained.
                    if s.items.is_empty() && s.items.capacity() > 8 {
                        s.items.shrink_to(8);
                    }
                    return Next::Item(item);
                }
                if s.closed {
                    return Next::Closed;
                }
            }
            self.ready.notified().await;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn items_come_out_in_order_and_the_oldest_are_dropped_when_full() {
        let q = DropOldest::new(3);
        for i in 0..5 {
            q.push(i);
        }
        assert_eq!(q.next().await, Next::Dropped(2));
        assert_eq!(q.next().await, Next::Item(2));
        assert_eq!(q.next().await, Next::Item(3));
        assert_eq!(q.next().await, Next::Item(4));
        q.close();
        assert_eq!(q.next().await, Next::Closed);
    }

    #[tokio::test]
    async fn a_waiting_consumer_wakes_for_an_item_and_for_close() {
        let q = std::sync::Arc::new(DropOldest::new(4));
        let consumer = {
            let q = q.clone();
            tokio::spawn(async move { (q.next().await, q.next().await) })
        };
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        q.push("frame");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        q.close();
        assert_eq!(consumer.await.unwrap(), (Next::Item("frame"), Next::Closed));
    }

    #[tokio::test]
    async fn nothing_is_held_once_taken() {
        let q = DropOldest::new(64);
        let frame = std::sync::Arc::new([0u8; 150]);
        for _ in 0..64 {
            q.push(frame.clone());
        }
        for _ in 0..64 {
            assert!(matches!(q.next().await, Next::Item(_)));
        }
        assert_eq!(std::sync::Arc::strong_count(&frame), 1);
    }
}
