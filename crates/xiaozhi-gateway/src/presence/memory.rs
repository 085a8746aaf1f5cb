//! In-memory presence: the embedded default, for a single gateway node with nothing to
//! install.
//!
//! It keeps the same semantics as the Redis backend (TTLs, conditional offline writes,
//! ownership-checked heartbeats, keyset paging) so the tracker, the admin commands and
//! the management API behave identically whichever store is configured; only the
//! visibility differs (this node's process, nobody else).
//!
//! Entries live in one map keyed by the colon-form MAC, each with the instant it
//! expires. An expired entry reads as absent at once and is dropped on the next write,
//! list or fleet read, so memory stays bounded by the devices seen within the offline
//! retention. Offline entries stay in the map (with the offline TTL) for "last seen"
//! and the fleet view.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::fleet::{FleetPage, FleetQuery, fleet_page};
use super::{PresenceError, PresencePage, PresenceQuery, PresenceRecord, PresenceStore, Ttls};

/// Presence kept in this process (see the module docs).
#[derive(Debug, Default)]
pub struct MemoryPresence {
    entries: Mutex<HashMap<String, Entry>>,
}

#[derive(Debug)]
struct Entry {
    record: PresenceRecord,
    expires_at: Instant,
}

impl Entry {
    fn live(&self, now: Instant) -> bool {
        self.expires_at > now
    }
}

impl MemoryPresence {
    pub fn new() -> MemoryPresence {
        MemoryPresence::default()
    }

    /// The map; a panic while holding the lock cannot leave an entry half-written (every
    /// update replaces whole values), so a poisoned lock is still usable.
    fn entries(&self) -> MutexGuard<'_, HashMap<String, Entry>> {
        self.entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// `now + ttl`, saturating far in the future instead of overflowing.
fn deadline(now: Instant, ttl: Duration) -> Instant {
    now.checked_add(ttl)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600))
}

fn purge_expired(entries: &mut HashMap<String, Entry>, now: Instant) {
    entries.retain(|_, entry| entry.live(now));
}

#[async_trait::async_trait]
impl PresenceStore for MemoryPresence {
    fn backend(&self) -> &'static str {
        "memory"
    }

    async fn write(&self, records: &[PresenceRecord], ttls: Ttls) -> Result<(), PresenceError> {
        let now = Instant::now();
        let mut entries = self.entries();
        purge_expired(&mut entries, now);
        for record in records {
            let ttl = if record.state.is_connected() {
                ttls.connected
            } else {
                // Conditional: never mark offline a device another node now holds.
                let foreign = entries
                    .get(&record.mac_address)
                    .is_some_and(|stored| stored.record.node != record.node);
                if foreign {
                    continue;
                }
                ttls.offline
            };
            entries.insert(
                record.mac_address.clone(),
                Entry {
                    record: record.clone(),
                    expires_at: deadline(now, ttl),
                },
            );
        }
        Ok(())
    }

    async fn heartbeat(
        &self,
        node: &str,
        macs: &[String],
        now_ms: i64,
        ttls: Ttls,
    ) -> Result<(), PresenceError> {
        let now = Instant::now();
        let mut entries = self.entries();
        for mac in macs {
            if let Some(entry) = entries.get_mut(mac)
                && entry.live(now)
                && entry.record.state.is_connected()
                && entry.record.node == node
            {
                entry.record.last_seen_ms = now_ms;
                entry.expires_at = deadline(now, ttls.connected);
            }
        }
        Ok(())
    }

    async fn reconcile(&self, node: &str, now_ms: i64, ttls: Ttls) -> Result<usize, PresenceError> {
        let now = Instant::now();
        let mut entries = self.entries();
        purge_expired(&mut entries, now);
        let mut count = 0;
        for entry in entries.values_mut() {
            if entry.record.state.is_connected() && entry.record.node == node {
                entry.record.state = super::PresenceState::Offline;
                entry.record.session_id = None;
                entry.record.session_since_ms = None;
                entry.record.call_peer = None;
                entry.record.call_bridged = None;
                entry.record.last_seen_ms = now_ms;
                entry.expires_at = deadline(now, ttls.offline);
                count += 1;
            }
        }
        Ok(count)
    }

    async fn get(&self, mac_address: &str) -> Result<Option<PresenceRecord>, PresenceError> {
        let now = Instant::now();
        let entries = self.entries();
        Ok(entries
            .get(&mac_address.to_ascii_lowercase())
            .filter(|entry| entry.live(now))
            .map(|entry| entry.record.clone()))
    }

    async fn list(&self, query: &PresenceQuery) -> Result<PresencePage, PresenceError> {
        let now = Instant::now();
        let mut matching: Vec<PresenceRecord> = {
            let mut entries = self.entries();
            purge_expired(&mut entries, now);
            entries
                .values()
                .filter(|entry| query.matches(&entry.record))
                .map(|entry| entry.record.clone())
                .collect()
        };
        matching.sort_unstable_by(|a, b| a.mac_address.cmp(&b.mac_address));
        Ok(page(matching, query))
    }

    /// Expiry here is by this process's monotonic clock (as for `get`), so `now_ms` is
    /// not needed.
    async fn fleet(&self, query: &FleetQuery, _now_ms: i64) -> Result<FleetPage, PresenceError> {
        let now = Instant::now();
        let mut entries = self.entries();
        purge_expired(&mut entries, now);
        // One linear pass under the lock; only the page's records are cloned.
        Ok(fleet_page(
            entries.values().map(|entry| &entry.record),
            query,
        ))
    }

    async fn ping(&self) -> Result<(), PresenceError> {
        Ok(())
    }
}

/// One page of `matching` (connected records passing the query's filters, sorted by
/// MAC): the records after `query.after`, at most `query.page_size()` of them. Shared
/// with the Redis backend so both page identically.
pub(crate) fn page(matching: Vec<PresenceRecord>, query: &PresenceQuery) -> PresencePage {
    let total = matching.len();
    let after = query.after.as_deref().map(str::to_ascii_lowercase);
    let start = match &after {
        Some(after) => matching.partition_point(|r| r.mac_address.as_str() <= after.as_str()),
        None => 0,
    };
    let size = query.page_size();
    let remaining = total - start;
    let devices: Vec<PresenceRecord> = matching.into_iter().skip(start).take(size).collect();
    let next = if remaining > size {
        devices.last().map(|r| r.mac_address.clone())
    } else {
        None
    };
    PresencePage {
        devices,
        next,
        total,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::presence::PresenceState;

    const TTLS: Ttls = Ttls {
        connected: Duration::from_secs(60),
        offline: Duration::from_secs(600),
    };

    fn record(mac: &str, state: PresenceState, node: &str) -> PresenceRecord {
        PresenceRecord {
            mac_address: mac.into(),
            state,
            node: node.into(),
            client_id: format!("GID_test@@@{}", mac.replace(':', "_")),
            group: "GID_test".into(),
            remote: "10.0.0.1:50000".into(),
            board: None,
            firmware: None,
            session_id: None,
            session_since_ms: None,
            call_peer: None,
            call_bridged: None,
            connected_at_ms: 1_000,
            last_seen_ms: 1_000,
        }
    }

    fn mac(i: usize) -> String {
        format!("aa:bb:cc:dd:{:02x}:{:02x}", i / 256, i % 256)
    }

    #[tokio::test]
    async fn offline_write_is_conditional_on_the_node() {
        let store = MemoryPresence::new();
        let m = mac(1);
        store
            .write(&[record(&m, PresenceState::Online, "a")], TTLS)
            .await
            .unwrap();
        store
            .write(&[record(&m, PresenceState::Offline, "b")], TTLS)
            .await
            .unwrap();
        let got = store.get(&m).await.unwrap().unwrap();
        assert_eq!((got.state, got.node.as_str()), (PresenceState::Online, "a"));

        store
            .write(&[record(&m, PresenceState::Offline, "a")], TTLS)
            .await
            .unwrap();
        assert_eq!(
            store.get(&m).await.unwrap().unwrap().state,
            PresenceState::Offline
        );
        // Missing entries take an offline write too.
        store
            .write(&[record(&mac(2), PresenceState::Offline, "b")], TTLS)
            .await
            .unwrap();
        assert!(store.get(&mac(2)).await.unwrap().is_some());
    }

    #[tokio::test]
    async fn expired_entries_read_as_absent_and_are_purged() {
        let store = MemoryPresence::new();
        let short = Ttls {
            connected: Duration::from_millis(20),
            offline: Duration::from_millis(20),
        };
        store
            .write(
                &[
                    record(&mac(1), PresenceState::Online, "a"),
                    record(&mac(2), PresenceState::Offline, "a"),
                ],
                short,
            )
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(40)).await;
        assert_eq!(store.get(&mac(1)).await.unwrap(), None);
        // A heartbeat does not resurrect an expired entry.
        store.heartbeat("a", &[mac(1)], 2_000, TTLS).await.unwrap();
        assert_eq!(store.get(&mac(1)).await.unwrap(), None);
        assert_eq!(
            store.list(&PresenceQuery::default()).await.unwrap().total,
            0
        );
        assert!(store.entries().is_empty());
    }

    #[tokio::test]
    async fn heartbeat_refreshes_only_own_connected_entries() {
        let store = MemoryPresence::new();
        store
            .write(
                &[
                    record(&mac(1), PresenceState::Online, "a"),
                    record(&mac(2), PresenceState::Online, "b"),
                    record(&mac(3), PresenceState::Offline, "a"),
                ],
                TTLS,
            )
            .await
            .unwrap();
        store
            .heartbeat("a", &[mac(1), mac(2), mac(3), mac(4)], 5_000, TTLS)
            .await
            .unwrap();
        let seen = |i| {
            let store = &store;
            async move { store.get(&mac(i)).await.unwrap().map(|r| r.last_seen_ms) }
        };
        assert_eq!(seen(1).await, Some(5_000));
        assert_eq!(seen(2).await, Some(1_000));
        assert_eq!(seen(3).await, Some(1_000));
        assert_eq!(seen(4).await, None);
    }

    #[tokio::test]
    async fn reconcile_marks_own_connected_entries_offline() {
        let store = MemoryPresence::new();
        let mut in_session = record(&mac(1), PresenceState::InSession, "a");
        in_session.session_id = Some("s1".into());
        in_session.session_since_ms = Some(900);
        store
            .write(
                &[
                    in_session,
                    record(&mac(2), PresenceState::Online, "a"),
                    record(&mac(3), PresenceState::Online, "b"),
                    record(&mac(4), PresenceState::Offline, "a"),
                ],
                TTLS,
            )
            .await
            .unwrap();
        assert_eq!(store.reconcile("a", 7_000, TTLS).await.unwrap(), 2);
        let first = store.get(&mac(1)).await.unwrap().unwrap();
        assert_eq!(first.state, PresenceState::Offline);
        assert_eq!((first.session_id, first.session_since_ms), (None, None));
        assert_eq!(first.last_seen_ms, 7_000);
        assert_eq!(
            store.get(&mac(3)).await.unwrap().unwrap().state,
            PresenceState::Online
        );
        assert_eq!(
            store.get(&mac(4)).await.unwrap().unwrap().last_seen_ms,
            1_000
        );
        assert_eq!(store.reconcile("a", 8_000, TTLS).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn list_pages_with_after_and_next() {
        let store = MemoryPresence::new();
        let records: Vec<_> = (0..25)
            .rev()
            .map(|i| record(&mac(i), PresenceState::Online, "a"))
            .collect();
        store.write(&records, TTLS).await.unwrap();
        let mut query = PresenceQuery {
            limit: 10,
            ..PresenceQuery::default()
        };
        let mut seen = Vec::new();
        let mut pages = 0;
        loop {
            let page = store.list(&query).await.unwrap();
            assert_eq!(page.total, 25);
            pages += 1;
            seen.extend(page.devices.into_iter().map(|r| r.mac_address));
            match page.next {
                Some(next) => query.after = Some(next),
                None => break,
            }
        }
        assert_eq!(pages, 3);
        assert_eq!(seen, (0..25).map(mac).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn fleet_shows_offline_entries_and_drops_expired_ones() {
        let store = MemoryPresence::new();
        let short = Ttls {
            connected: Duration::from_millis(20),
            offline: Duration::from_secs(600),
        };
        store
            .write(
                &[
                    record(&mac(1), PresenceState::Online, "a"),
                    record(&mac(2), PresenceState::Offline, "a"),
                ],
                short,
            )
            .await
            .unwrap();
        store
            .write(&[record(&mac(3), PresenceState::InSession, "a")], TTLS)
            .await
            .unwrap();
        let all = FleetQuery::default();
        let page = store.fleet(&all, 0).await.unwrap();
        assert_eq!(page.total, 3);
        assert_eq!(
            (
                page.counts.connected,
                page.counts.in_session,
                page.counts.offline
            ),
            (2, 1, 1)
        );
        tokio::time::sleep(Duration::from_millis(40)).await;
        let page = store.fleet(&all, 0).await.unwrap();
        let macs: Vec<_> = page.devices.iter().map(|r| r.mac_address.clone()).collect();
        assert_eq!(macs, vec![mac(2), mac(3)]);
        assert_eq!(store.entries().len(), 2, "the expired entry is purged");
    }

    #[test]
    fn page_boundaries() {
        let records: Vec<_> = (0..4)
            .map(|i| record(&mac(i), PresenceState::Online, "a"))
            .collect();
        let query = |after: Option<usize>, limit| PresenceQuery {
            after: after.map(mac),
            limit,
            ..PresenceQuery::default()
        };
        // An exactly full last page has no `next`.
        let full = page(records.clone(), &query(None, 4));
        assert_eq!((full.devices.len(), full.next, full.total), (4, None, 4));
        let first = page(records.clone(), &query(None, 2));
        assert_eq!(first.next, Some(mac(1)));
        let last = page(records.clone(), &query(Some(1), 2));
        assert_eq!((last.devices.len(), last.next), (2, None));
        // `after` need not be a stored MAC, and may be spelled in upper case.
        let mut upper = query(None, 10);
        upper.after = Some(mac(1).to_ascii_uppercase());
        assert_eq!(page(records.clone(), &upper).devices[0].mac_address, mac(2));
        let past = page(records, &query(Some(9), 2));
        assert_eq!((past.devices.len(), past.next, past.total), (0, None, 4));
    }
}
