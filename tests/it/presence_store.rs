//! The presence store contract, checked against both backends with one suite: the
//! embedded memory store and Redis at 127.0.0.1:6379 (which must be running; `.ci/run`
//! starts it). Each Redis test works under its own key prefix and deletes its keys at
//! the end, pass or fail. Redis-only tests cover what memory cannot: stored layout,
//! malformed entries, a Redis that is down, and write throughput.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use redis::AsyncCommands;
use redis::aio::MultiplexedConnection;
use tokio::net::{TcpListener, TcpStream};
use xiaozhi_gateway::presence::fleet::{FleetCounts, FleetPage, FleetQuery};
use xiaozhi_gateway::presence::memory::MemoryPresence;
use xiaozhi_gateway::presence::redis::RedisPresence;
use xiaozhi_gateway::presence::{
    PresenceError, PresenceQuery, PresenceRecord, PresenceState, PresenceStore, Ttls,
};

const REDIS: &str = "redis://127.0.0.1:6379/";
const TIMEOUT: Duration = Duration::from_millis(500);
const TTLS: Ttls = Ttls {
    connected: Duration::from_secs(60),
    offline: Duration::from_secs(600),
};

/// What a behavioural test gets: the store, and for Redis a raw connection and the
/// test's key prefix, to look at the stored layout.
struct Ctx {
    store: Arc<dyn PresenceStore>,
    raw: Option<Raw>,
}

#[derive(Clone)]
struct Raw {
    con: MultiplexedConnection,
    prefix: String,
}

fn unique_prefix() -> String {
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "xz-test-{}-{nanos}-{}:",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

async fn raw_connection() -> MultiplexedConnection {
    redis::Client::open(REDIS)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .expect("Redis must be running at 127.0.0.1:6379 (.ci/run starts it)")
}

async fn delete_keys(raw: &mut Raw) {
    let keys: Vec<String> = raw
        .con
        .keys(format!("{}*", raw.prefix))
        .await
        .expect("list test keys");
    for chunk in keys.chunks(1000) {
        let _: () = raw.con.del(chunk).await.expect("delete test keys");
    }
}

/// Runs `body` against the memory store.
async fn with_memory<F, Fut>(body: F)
where
    F: FnOnce(Ctx) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    body(Ctx {
        store: Arc::new(MemoryPresence::new()),
        raw: None,
    })
    .await;
}

/// Runs `body` against Redis under a fresh prefix, then deletes the prefix's keys even
/// if `body` panicked (and re-raises the panic).
async fn with_redis<F, Fut>(body: F)
where
    F: FnOnce(Ctx) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let prefix = unique_prefix();
    let mut raw = Raw {
        con: raw_connection().await,
        prefix: prefix.clone(),
    };
    let store = RedisPresence::connect(REDIS, &prefix, TIMEOUT)
        .await
        .expect("redis store");
    store
        .ping()
        .await
        .expect("Redis must be running at 127.0.0.1:6379 (.ci/run starts it)");
    let outcome = tokio::spawn(body(Ctx {
        store: Arc::new(store),
        raw: Some(raw.clone()),
    }))
    .await;
    delete_keys(&mut raw).await;
    if let Err(error) = outcome {
        std::panic::resume_unwind(error.into_panic());
    }
}

/// One `#[tokio::test]` per backend for each behavioural test.
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod memory_backend {
            $(
                #[tokio::test]
                async fn $name() {
                    super::with_memory(super::$name).await;
                }
            )*
        }
        mod redis_backend {
            $(
                #[tokio::test]
                async fn $name() {
                    super::with_redis(super::$name).await;
                }
            )*
        }
    };
}

both_backends!(
    write_online_then_get,
    session_fields_come_and_go,
    offline_write_is_conditional,
    connected_entries_expire_unless_heartbeated,
    reconcile_marks_only_this_nodes_entries,
    list_filters_and_pages,
    ping_answers,
    fleet_lists_connected_and_offline_devices,
    fleet_pages_across_pages,
    fleet_drops_expired_connected_entries,
    fleet_ignores_a_refused_offline_write,
);

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn mac(i: usize) -> String {
    format!(
        "a0:b1:c2:{:02x}:{:02x}:{:02x}",
        i >> 16,
        (i >> 8) & 0xff,
        i & 0xff
    )
}

fn record(mac: &str, state: PresenceState, node: &str) -> PresenceRecord {
    let now = now_ms();
    PresenceRecord {
        mac_address: mac.into(),
        state,
        node: node.into(),
        client_id: format!("GID_test@@@{}@@@uuid", mac.replace(':', "_")),
        group: "GID_test".into(),
        remote: "192.0.2.7:51000".into(),
        board: None,
        firmware: None,
        session_id: None,
        session_since_ms: None,
        call_peer: None,
        call_bridged: None,
        connected_at_ms: now - 5_000,
        last_seen_ms: now,
    }
}

fn all() -> PresenceQuery {
    PresenceQuery::default()
}

async fn listed(store: &dyn PresenceStore) -> Vec<String> {
    let page = store.list(&all()).await.unwrap();
    page.devices.into_iter().map(|r| r.mac_address).collect()
}

async fn write_online_then_get(ctx: Ctx) {
    let store = &*ctx.store;
    let mut online = record(&mac(1), PresenceState::Online, "node-a");
    online.board = Some("bread-compact-wifi".into());
    online.firmware = Some("1.7.6".into());
    store
        .write(std::slice::from_ref(&online), TTLS)
        .await
        .unwrap();

    assert_eq!(store.get(&mac(1)).await.unwrap(), Some(online.clone()));
    // Upper-case spelling finds it too.
    assert_eq!(
        store.get(&mac(1).to_ascii_uppercase()).await.unwrap(),
        Some(online.clone())
    );
    assert_eq!(store.get(&mac(2)).await.unwrap(), None);
    let page = store.list(&all()).await.unwrap();
    assert_eq!(
        (page.devices, page.next, page.total),
        (vec![online], None, 1)
    );

    if let Some(mut raw) = ctx.raw {
        let dev = format!("{}dev:{}", raw.prefix, mac(1));
        let ttl: i64 = raw.con.pttl(&dev).await.unwrap();
        assert!(ttl > 50_000 && ttl <= 60_000, "connected TTL, got {ttl} ms");
        let node_set: Vec<String> = raw
            .con
            .smembers(format!("{}node:node-a", raw.prefix))
            .await
            .unwrap();
        assert_eq!(node_set, vec![mac(1)]);
        let score: Option<f64> = raw
            .con
            .zscore(format!("{}online", raw.prefix), mac(1))
            .await
            .unwrap();
        assert!(score.is_some_and(|s| s as i64 > now_ms() + 50_000));
    }
}

async fn session_fields_come_and_go(ctx: Ctx) {
    let store = &*ctx.store;
    let mut in_session = record(&mac(1), PresenceState::InSession, "node-a");
    in_session.session_id = Some("5f0c2a9e".into());
    in_session.session_since_ms = Some(in_session.last_seen_ms - 10);
    store
        .write(std::slice::from_ref(&in_session), TTLS)
        .await
        .unwrap();
    assert_eq!(store.get(&mac(1)).await.unwrap(), Some(in_session.clone()));
    let sessions = PresenceQuery {
        state: Some(PresenceState::InSession),
        ..all()
    };
    assert_eq!(store.list(&sessions).await.unwrap().total, 1);

    let back = record(&mac(1), PresenceState::Online, "node-a");
    store
        .write(std::slice::from_ref(&back), TTLS)
        .await
        .unwrap();
    let got = store.get(&mac(1)).await.unwrap().unwrap();
    assert_eq!(got, back);
    assert_eq!((got.session_id, got.session_since_ms), (None, None));
    assert_eq!(store.list(&sessions).await.unwrap().total, 0);

    if let Some(mut raw) = ctx.raw {
        let dev = format!("{}dev:{}", raw.prefix, mac(1));
        for field in ["session_id", "session_since_ms", "board", "firmware"] {
            let exists: bool = raw.con.hexists(&dev, field).await.unwrap();
            assert!(!exists, "stale field {field} left in {dev}");
        }
    }
}

async fn offline_write_is_conditional(ctx: Ctx) {
    let store = &*ctx.store;
    let on_a = record(&mac(1), PresenceState::Online, "node-a");
    store
        .write(std::slice::from_ref(&on_a), TTLS)
        .await
        .unwrap();

    // Node B (which held the device before) reports it gone: too late, A holds it.
    let off_b = record(&mac(1), PresenceState::Offline, "node-b");
    store.write(&[off_b], TTLS).await.unwrap();
    assert_eq!(store.get(&mac(1)).await.unwrap(), Some(on_a.clone()));
    assert_eq!(listed(store).await, vec![mac(1)]);

    // A's own offline applies; the entry keeps its last seen and is not listed.
    let mut off_a = record(&mac(1), PresenceState::Offline, "node-a");
    off_a.last_seen_ms = on_a.last_seen_ms + 1_234;
    store
        .write(std::slice::from_ref(&off_a), TTLS)
        .await
        .unwrap();
    let got = store.get(&mac(1)).await.unwrap().unwrap();
    assert_eq!(got, off_a);
    assert_eq!(got.last_seen_ms, on_a.last_seen_ms + 1_234);
    assert!(listed(store).await.is_empty());
    assert_eq!(store.list(&all()).await.unwrap().total, 0);

    // A missing entry takes an offline write from anyone.
    let off_new = record(&mac(2), PresenceState::Offline, "node-b");
    store
        .write(std::slice::from_ref(&off_new), TTLS)
        .await
        .unwrap();
    assert_eq!(store.get(&mac(2)).await.unwrap(), Some(off_new));

    if let Some(mut raw) = ctx.raw {
        let dev = format!("{}dev:{}", raw.prefix, mac(1));
        let ttl: i64 = raw.con.pttl(&dev).await.unwrap();
        assert!(ttl > 590_000, "offline TTL, got {ttl} ms");
        let online: i64 = raw
            .con
            .zcard(format!("{}online", raw.prefix))
            .await
            .unwrap();
        assert_eq!(online, 0);
        let held: i64 = raw
            .con
            .scard(format!("{}node:node-a", raw.prefix))
            .await
            .unwrap();
        assert_eq!(held, 0);
    }
}

async fn connected_entries_expire_unless_heartbeated(ctx: Ctx) {
    let store = &*ctx.store;
    let short = Ttls {
        connected: Duration::from_millis(400),
        offline: Duration::from_secs(600),
    };
    store
        .write(
            &[
                record(&mac(1), PresenceState::Online, "node-a"),
                record(&mac(2), PresenceState::InSession, "node-a"),
                record(&mac(3), PresenceState::Online, "node-b"),
            ],
            short,
        )
        .await
        .unwrap();
    // Heartbeat mac 2 (ours) and mac 3 (node B's: must not be refreshed by A).
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(900) {
        tokio::time::sleep(Duration::from_millis(150)).await;
        store
            .heartbeat("node-a", &[mac(2), mac(3)], now_ms(), short)
            .await
            .unwrap();
    }
    assert_eq!(store.get(&mac(1)).await.unwrap(), None, "expired");
    assert_eq!(
        store.get(&mac(3)).await.unwrap(),
        None,
        "other node's expired"
    );
    let alive = store
        .get(&mac(2))
        .await
        .unwrap()
        .expect("heartbeated entry");
    assert!(
        alive.last_seen_ms >= now_ms() - 300,
        "heartbeat sets last_seen"
    );
    assert_eq!(listed(store).await, vec![mac(2)]);
    // A heartbeat does not resurrect an expired entry.
    store
        .heartbeat("node-a", &[mac(1)], now_ms(), short)
        .await
        .unwrap();
    assert_eq!(store.get(&mac(1)).await.unwrap(), None);
    assert_eq!(store.list(&all()).await.unwrap().total, 1);

    if let Some(mut raw) = ctx.raw {
        // list pruned the expired members from the online set.
        let online: Vec<String> = raw
            .con
            .zrange(format!("{}online", raw.prefix), 0, -1)
            .await
            .unwrap();
        assert_eq!(online, vec![mac(2)]);
        let seen: Option<f64> = raw
            .con
            .zscore(format!("{}nodes", raw.prefix), "node-a")
            .await
            .unwrap();
        assert!(seen.is_some_and(|s| s as i64 >= now_ms() - 1_000));
    }
}

async fn reconcile_marks_only_this_nodes_entries(ctx: Ctx) {
    let store = &*ctx.store;
    let mut talking = record(&mac(1), PresenceState::InSession, "node-a");
    talking.session_id = Some("s-1".into());
    talking.session_since_ms = Some(talking.last_seen_ms);
    let offline_a = record(&mac(3), PresenceState::Offline, "node-a");
    store
        .write(
            &[
                talking,
                record(&mac(2), PresenceState::Online, "node-a"),
                offline_a.clone(),
                record(&mac(4), PresenceState::Online, "node-b"),
                // Held by A, then moved to B: B's now.
                record(&mac(5), PresenceState::Online, "node-a"),
            ],
            TTLS,
        )
        .await
        .unwrap();
    store
        .write(&[record(&mac(5), PresenceState::Online, "node-b")], TTLS)
        .await
        .unwrap();

    let now = now_ms() + 10;
    assert_eq!(store.reconcile("node-a", now, TTLS).await.unwrap(), 2);
    for i in [1, 2] {
        let got = store.get(&mac(i)).await.unwrap().unwrap();
        assert_eq!(got.state, PresenceState::Offline);
        assert_eq!(got.node, "node-a");
        assert_eq!((got.session_id, got.session_since_ms), (None, None));
        assert_eq!(got.last_seen_ms, now);
    }
    assert_eq!(store.get(&mac(3)).await.unwrap(), Some(offline_a));
    for i in [4, 5] {
        let got = store.get(&mac(i)).await.unwrap().unwrap();
        assert_eq!(
            (got.state, got.node.as_str()),
            (PresenceState::Online, "node-b")
        );
    }
    assert_eq!(listed(store).await, vec![mac(4), mac(5)]);
    assert_eq!(store.reconcile("node-a", now, TTLS).await.unwrap(), 0);
    assert_eq!(store.reconcile("node-c", now, TTLS).await.unwrap(), 0);

    if let Some(mut raw) = ctx.raw {
        let dev = format!("{}dev:{}", raw.prefix, mac(1));
        let ttl: i64 = raw.con.pttl(&dev).await.unwrap();
        assert!(ttl > 590_000, "offline TTL after reconcile, got {ttl} ms");
        let exists: bool = raw
            .con
            .exists(format!("{}node:node-a", raw.prefix))
            .await
            .unwrap();
        assert!(!exists, "reconcile empties the node's set");
    }
}

async fn list_filters_and_pages(ctx: Ctx) {
    let store = &*ctx.store;
    // 25 devices: every 3rd in a session, every 4th on node B, every 5th in another
    // group; written in reverse order to show that listing sorts.
    let records: Vec<PresenceRecord> = (0..25)
        .rev()
        .map(|i| {
            let state = if i % 3 == 0 {
                PresenceState::InSession
            } else {
                PresenceState::Online
            };
            let node = if i % 4 == 0 { "node-b" } else { "node-a" };
            let mut r = record(&mac(i), state, node);
            if i % 5 == 0 {
                r.group = "GID_other".into();
            }
            r
        })
        .collect();
    store.write(&records, TTLS).await.unwrap();
    // Offline devices never list, whatever the filters.
    store
        .write(&[record(&mac(100), PresenceState::Offline, "node-a")], TTLS)
        .await
        .unwrap();

    let count = |pred: fn(usize) -> bool| (0..25).filter(|&i| pred(i)).count();
    let total = |query: PresenceQuery| async move { store.list(&query).await.unwrap().total };
    assert_eq!(total(all()).await, 25);
    assert_eq!(
        total(PresenceQuery {
            state: Some(PresenceState::InSession),
            ..all()
        })
        .await,
        count(|i| i % 3 == 0)
    );
    assert_eq!(
        total(PresenceQuery {
            state: Some(PresenceState::Offline),
            ..all()
        })
        .await,
        0
    );
    assert_eq!(
        total(PresenceQuery {
            node: Some("node-b".into()),
            ..all()
        })
        .await,
        count(|i| i % 4 == 0)
    );
    assert_eq!(
        total(PresenceQuery {
            group: Some("GID_other".into()),
            ..all()
        })
        .await,
        count(|i| i % 5 == 0)
    );
    // mac(16..=25) start "a0:b1:c2:00:00:1"; spelled in upper case.
    let prefix = PresenceQuery {
        mac_prefix: Some("A0:B1:C2:00:00:1".into()),
        ..all()
    };
    let page = store.list(&prefix).await.unwrap();
    assert_eq!(page.total, 9);
    assert_eq!(
        page.devices
            .iter()
            .map(|r| r.mac_address.clone())
            .collect::<Vec<_>>(),
        (16..25).map(mac).collect::<Vec<_>>()
    );
    let combined = PresenceQuery {
        state: Some(PresenceState::Online),
        node: Some("node-a".into()),
        group: Some("GID_test".into()),
        ..all()
    };
    let page = store.list(&combined).await.unwrap();
    let expected: Vec<String> = (0..25)
        .filter(|i| i % 3 != 0 && i % 4 != 0 && i % 5 != 0)
        .map(mac)
        .collect();
    assert_eq!(page.total, expected.len());
    assert_eq!(
        page.devices
            .iter()
            .map(|r| r.mac_address.clone())
            .collect::<Vec<_>>(),
        expected
    );
    assert!(page.devices.iter().all(|r| combined.matches(r)));

    // Paging: 10 + 10 + 5.
    let mut query = PresenceQuery { limit: 10, ..all() };
    let mut pages = Vec::new();
    loop {
        let page = store.list(&query).await.unwrap();
        assert_eq!(page.total, 25);
        pages.push(
            page.devices
                .into_iter()
                .map(|r| r.mac_address)
                .collect::<Vec<_>>(),
        );
        match page.next {
            Some(next) => {
                assert_eq!(Some(&next), pages.last().unwrap().last());
                query.after = Some(next);
            }
            None => break,
        }
    }
    assert_eq!(
        pages.iter().map(Vec::len).collect::<Vec<_>>(),
        vec![10, 10, 5]
    );
    assert_eq!(pages.concat(), (0..25).map(mac).collect::<Vec<_>>());
    // Paging composes with filters: in-session devices, 3 at a time.
    let mut query = PresenceQuery {
        state: Some(PresenceState::InSession),
        limit: 3,
        ..all()
    };
    let mut seen = Vec::new();
    loop {
        let page = store.list(&query).await.unwrap();
        assert_eq!(page.total, 9);
        seen.extend(page.devices.into_iter().map(|r| r.mac_address));
        match page.next {
            Some(next) => query.after = Some(next),
            None => break,
        }
    }
    assert_eq!(
        seen,
        (0..25).filter(|i| i % 3 == 0).map(mac).collect::<Vec<_>>()
    );
}

async fn fleet(store: &dyn PresenceStore, query: FleetQuery) -> FleetPage {
    store.fleet(&query, now_ms()).await.unwrap()
}

fn macs_of(page: &FleetPage) -> Vec<String> {
    page.devices.iter().map(|r| r.mac_address.clone()).collect()
}

fn counts(connected: usize, in_session: usize, offline: usize) -> FleetCounts {
    FleetCounts {
        connected,
        in_session,
        in_call: 0,
        offline,
    }
}

/// `P known` as (member, score), lowest score first.
async fn known_set(raw: &mut Raw) -> Vec<(String, i64)> {
    let members: Vec<(String, f64)> = raw
        .con
        .zrange_withscores(format!("{}known", raw.prefix), 0, -1)
        .await
        .unwrap();
    members.into_iter().map(|(m, s)| (m, s as i64)).collect()
}

const HOUR_MS: i64 = 3_600_000;

async fn fleet_lists_connected_and_offline_devices(ctx: Ctx) {
    let store = &*ctx.store;
    let now = now_ms();
    // 0..4 online on A, 4..6 in session on B, 6..9 offline a minute ago, 9..11 offline
    // two days ago (rewritten late, as after an outage).
    let records: Vec<PresenceRecord> = (0..11)
        .map(|i| {
            let (state, node) = match i {
                0..4 => (PresenceState::Online, "node-a"),
                4..6 => (PresenceState::InSession, "node-b"),
                _ => (PresenceState::Offline, "node-a"),
            };
            let mut r = record(&mac(i), state, node);
            match i {
                1 => r.board = Some("esp32-s3-box".into()),
                4 | 5 => {
                    r.session_id = Some(format!("session-{i}"));
                    r.session_since_ms = Some(r.last_seen_ms - 100);
                }
                6..9 => r.last_seen_ms = now - 60_000,
                9.. => r.last_seen_ms = now - 48 * HOUR_MS,
                _ => {}
            }
            if i == 7 {
                r.firmware = Some("2.0.1-beta".into());
            }
            r
        })
        .collect();
    // In reverse: the listing sorts.
    let reversed: Vec<_> = records.iter().rev().cloned().collect();
    store.write(&reversed, TTLS).await.unwrap();

    let page = fleet(store, FleetQuery::default()).await;
    assert_eq!(page.counts, counts(6, 2, 5));
    assert_eq!((page.total, page.next.as_deref()), (11, None));
    assert_eq!(
        page.devices, records,
        "every field round trips, sorted by MAC"
    );

    for (state, expected) in [
        (PresenceState::Online, 0..4),
        (PresenceState::InSession, 4..6),
        (PresenceState::Offline, 6..11),
    ] {
        let page = fleet(
            store,
            FleetQuery {
                state: Some(state),
                ..FleetQuery::default()
            },
        )
        .await;
        assert_eq!(
            macs_of(&page),
            expected.clone().map(mac).collect::<Vec<_>>()
        );
        assert_eq!(page.total, expected.len());
        assert_eq!(
            page.counts,
            counts(6, 2, 5),
            "counts ignore the state filter"
        );
    }

    let search = |q: &'static str| async move {
        let page = fleet(
            store,
            FleetQuery {
                q: Some(q.into()),
                ..FleetQuery::default()
            },
        )
        .await;
        assert_eq!(page.counts, counts(6, 2, 5), "counts ignore q");
        macs_of(&page)
    };
    assert_eq!(search("ESP32-S3").await, vec![mac(1)]);
    assert_eq!(search("2.0.1-BETA").await, vec![mac(7)]);
    assert_eq!(search("Node-B").await, vec![mac(4), mac(5)]);
    assert_eq!(search("A0:B1:C2:00:00:0A").await, vec![mac(10)]);
    assert_eq!(search("a0_b1_c2_00_00_03").await, vec![mac(3)]);
    assert_eq!(search("192.0.2.7").await.len(), 11);
    assert!(search("nowhere").await.is_empty());

    // "Offline, seen within the hour": the two-day-old ones leave listing and count.
    let since = FleetQuery {
        since_ms: Some(now - HOUR_MS),
        ..FleetQuery::default()
    };
    let page = fleet(store, since.clone()).await;
    assert_eq!(page.counts, counts(6, 2, 3));
    assert_eq!(page.total, 9);
    assert_eq!(macs_of(&page), (0..9).map(mac).collect::<Vec<_>>());
    let page = fleet(
        store,
        FleetQuery {
            state: Some(PresenceState::Offline),
            ..since
        },
    )
    .await;
    assert_eq!(macs_of(&page), (6..9).map(mac).collect::<Vec<_>>());

    // `get` and `list` are unchanged by the fleet view.
    assert_eq!(store.list(&all()).await.unwrap().total, 6);
    assert_eq!(store.get(&mac(9)).await.unwrap(), Some(records[9].clone()));

    if let Some(mut raw) = ctx.raw {
        let known = known_set(&mut raw).await;
        assert_eq!(known.len(), 11);
        let after = now_ms();
        for (member, score) in known {
            let i = (0..11).find(|&i| mac(i) == member).expect("a written MAC");
            let ttl = if i < 6 { 60_000 } else { 600_000 };
            // Scored when the hash expires: write time + its TTL (never last seen +
            // TTL for the late offline rewrites, which would already have passed).
            assert!(
                score >= now + ttl - 1_000 && score <= after + ttl,
                "{member}: score {score}, expected about now + {ttl}"
            );
        }
    }
}

async fn fleet_pages_across_pages(ctx: Ctx) {
    let store = &*ctx.store;
    // 25 devices: every 3rd offline, every 4th (not offline) in a session.
    let state = |i: usize| match i {
        _ if i.is_multiple_of(3) => PresenceState::Offline,
        _ if i.is_multiple_of(4) => PresenceState::InSession,
        _ => PresenceState::Online,
    };
    let records: Vec<_> = (0..25)
        .rev()
        .map(|i| record(&mac(i), state(i), "node-a"))
        .collect();
    store.write(&records, TTLS).await.unwrap();
    let offline = (0..25)
        .filter(|&i| state(i) == PresenceState::Offline)
        .count();
    let in_session = (0..25)
        .filter(|&i| state(i) == PresenceState::InSession)
        .count();

    let walk = |mut query: FleetQuery| async move {
        let mut pages = Vec::new();
        let mut total = None;
        loop {
            let page = fleet(store, query.clone()).await;
            assert_eq!(page.counts, counts(25 - offline, in_session, offline));
            assert!(total.is_none_or(|t| t == page.total), "total is stable");
            total = Some(page.total);
            pages.push(macs_of(&page));
            match page.next {
                Some(next) => {
                    assert_eq!(Some(&next), pages.last().unwrap().last());
                    query.after = Some(next);
                }
                None => break,
            }
        }
        let total = total.unwrap();
        assert_eq!(pages.iter().map(Vec::len).sum::<usize>(), total);
        pages
    };
    let pages = walk(FleetQuery {
        limit: 10,
        ..FleetQuery::default()
    })
    .await;
    assert_eq!(
        pages.iter().map(Vec::len).collect::<Vec<_>>(),
        vec![10, 10, 5]
    );
    assert_eq!(pages.concat(), (0..25).map(mac).collect::<Vec<_>>());
    // Offline devices, 3 at a time.
    let pages = walk(FleetQuery {
        state: Some(PresenceState::Offline),
        limit: 3,
        ..FleetQuery::default()
    })
    .await;
    assert_eq!(
        pages.concat(),
        (0..25).filter(|i| i % 3 == 0).map(mac).collect::<Vec<_>>()
    );
    assert_eq!(pages.len(), 3);
    // A search, 4 at a time, matching only client ids (which spell MACs with `_`):
    // MACs ...:00:10 to ...:00:18.
    let pages = walk(FleetQuery {
        q: Some("C2_00_00_1".into()),
        limit: 4,
        ..FleetQuery::default()
    })
    .await;
    assert_eq!(pages.concat(), (16..25).map(mac).collect::<Vec<_>>());
}

async fn fleet_drops_expired_connected_entries(ctx: Ctx) {
    let store = &*ctx.store;
    let short = Ttls {
        connected: Duration::from_millis(400),
        offline: Duration::from_secs(600),
    };
    store
        .write(
            &[
                record(&mac(1), PresenceState::Online, "node-a"),
                record(&mac(2), PresenceState::InSession, "node-a"),
                record(&mac(3), PresenceState::Offline, "node-a"),
            ],
            short,
        )
        .await
        .unwrap();
    assert_eq!(
        fleet(store, FleetQuery::default()).await.counts,
        counts(2, 1, 1)
    );
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(900) {
        tokio::time::sleep(Duration::from_millis(150)).await;
        store
            .heartbeat("node-a", &[mac(2)], now_ms(), short)
            .await
            .unwrap();
    }
    let page = fleet(store, FleetQuery::default()).await;
    assert_eq!(macs_of(&page), vec![mac(2), mac(3)], "mac 1 expired");
    assert_eq!(page.counts, counts(1, 1, 1));
    assert_eq!(page.total, 2);

    if let Some(mut raw) = ctx.raw {
        // fleet pruned the expired member; the heartbeat kept mac 2's score current.
        let known = known_set(&mut raw).await;
        let members: Vec<&str> = known.iter().map(|(m, _)| m.as_str()).collect();
        assert_eq!(members, vec![mac(2).as_str(), mac(3).as_str()]);
        assert!(known[0].1 > now_ms(), "heartbeat refreshed the known score");
    }
}

async fn fleet_ignores_a_refused_offline_write(ctx: Ctx) {
    let store = &*ctx.store;
    let on_a = record(&mac(1), PresenceState::Online, "node-a");
    store
        .write(std::slice::from_ref(&on_a), TTLS)
        .await
        .unwrap();
    let before = match &ctx.raw {
        Some(raw) => known_set(&mut raw.clone()).await,
        None => Vec::new(),
    };
    // Node B reports the device gone: refused, A holds it.
    let mut off_b = record(&mac(1), PresenceState::Offline, "node-b");
    off_b.last_seen_ms += 10_000;
    store.write(&[off_b], TTLS).await.unwrap();

    let page = fleet(store, FleetQuery::default()).await;
    assert_eq!(page.devices, vec![on_a.clone()]);
    assert_eq!(page.counts, counts(1, 0, 0));
    let offline = fleet(
        store,
        FleetQuery {
            state: Some(PresenceState::Offline),
            ..FleetQuery::default()
        },
    )
    .await;
    assert_eq!((offline.total, offline.devices.len()), (0, 0));

    // After A's own offline write the device is listed as offline, once.
    let off_a = record(&mac(1), PresenceState::Offline, "node-a");
    store
        .write(std::slice::from_ref(&off_a), TTLS)
        .await
        .unwrap();
    let page = fleet(store, FleetQuery::default()).await;
    assert_eq!(page.devices, vec![off_a]);
    assert_eq!(page.counts, counts(0, 0, 1));

    if let Some(mut raw) = ctx.raw {
        // The refused write did not rescore the entry with B's offline TTL.
        assert_eq!(before.len(), 1);
        assert!(before[0].1 <= now_ms() + 60_000, "connected score");
        let after = known_set(&mut raw).await;
        assert_eq!(after.len(), 1);
        assert!(after[0].1 > now_ms() + 590_000, "A's offline score");
    }
}

#[tokio::test]
async fn redis_fleet_records_the_refused_write_nowhere() {
    // Checked between the refused write and anything else touching the entry.
    with_redis(|ctx| async move {
        let mut raw = ctx.raw.unwrap();
        let store = &*ctx.store;
        let on_a = record(&mac(1), PresenceState::Online, "node-a");
        store
            .write(std::slice::from_ref(&on_a), TTLS)
            .await
            .unwrap();
        let before = known_set(&mut raw).await;
        store
            .write(&[record(&mac(1), PresenceState::Offline, "node-b")], TTLS)
            .await
            .unwrap();
        assert_eq!(known_set(&mut raw).await, before);
        let ttl: i64 = raw
            .con
            .pttl(format!("{}dev:{}", raw.prefix, mac(1)))
            .await
            .unwrap();
        assert!(ttl <= 60_000, "still the connected TTL, got {ttl} ms");
    })
    .await;
}

#[tokio::test]
async fn redis_fleet_without_the_known_set_shows_connected_devices() {
    // A deployment older than `P known`: connected devices show (from `P online`),
    // offline ones as soon as they are written again.
    with_redis(|ctx| async move {
        let mut raw = ctx.raw.unwrap();
        let store = &*ctx.store;
        let off = record(&mac(3), PresenceState::Offline, "node-a");
        store
            .write(
                &[
                    record(&mac(1), PresenceState::Online, "node-a"),
                    record(&mac(2), PresenceState::InSession, "node-b"),
                    off.clone(),
                ],
                TTLS,
            )
            .await
            .unwrap();
        let _: () = raw.con.del(format!("{}known", raw.prefix)).await.unwrap();
        let page = fleet(store, FleetQuery::default()).await;
        assert_eq!(macs_of(&page), vec![mac(1), mac(2)]);
        assert_eq!(page.counts, counts(2, 1, 0));

        // Heartbeats and writes fill the set in again.
        store
            .heartbeat("node-a", &[mac(1)], now_ms(), TTLS)
            .await
            .unwrap();
        store.write(&[off], TTLS).await.unwrap();
        let page = fleet(store, FleetQuery::default()).await;
        assert_eq!(macs_of(&page), vec![mac(1), mac(2), mac(3)]);
        assert_eq!(page.counts, counts(2, 1, 1));
        let known: Vec<String> = known_set(&mut raw)
            .await
            .into_iter()
            .map(|(m, _)| m)
            .collect();
        assert_eq!(known.len(), 2);
        assert!(known.contains(&mac(1)) && known.contains(&mac(3)));

        // A restart reconcile puts what it marks offline in the set too.
        let _: () = raw.con.del(format!("{}known", raw.prefix)).await.unwrap();
        assert_eq!(store.reconcile("node-b", now_ms(), TTLS).await.unwrap(), 1);
        let known = known_set(&mut raw).await;
        assert_eq!(known.len(), 1);
        assert_eq!(known[0].0, mac(2));
        assert!(known[0].1 > now_ms() + 590_000, "offline TTL");
        let page = fleet(store, FleetQuery::default()).await;
        assert_eq!(page.counts, counts(1, 0, 1));
    })
    .await;
}

#[tokio::test]
async fn redis_fleet_skips_a_malformed_entry() {
    with_redis(|ctx| async move {
        let mut raw = ctx.raw.unwrap();
        let store = &*ctx.store;
        store
            .write(
                &[
                    record(&mac(1), PresenceState::Online, "node-a"),
                    record(&mac(2), PresenceState::Offline, "node-a"),
                ],
                TTLS,
            )
            .await
            .unwrap();
        let dev = format!("{}dev:{}", raw.prefix, mac(2));
        let _: () = raw.con.hset(&dev, "state", "asleep").await.unwrap();
        let page = fleet(store, FleetQuery::default()).await;
        assert_eq!(macs_of(&page), vec![mac(1)]);
        assert_eq!(page.counts, counts(1, 0, 0));
    })
    .await;
}

// Multi-threaded, as the gateway runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_of_10000_devices() {
    const N: usize = 10_000;
    // 9,000 connected (every 4th of them in a session) and 1,000 offline.
    let records: Vec<PresenceRecord> = (0..N)
        .map(|i| {
            let state = match i {
                _ if i % 10 == 9 => PresenceState::Offline,
                _ if i.is_multiple_of(4) => PresenceState::InSession,
                _ => PresenceState::Online,
            };
            let mut r = record(&mac(i), state, "node-a");
            r.board = Some("bread-compact-wifi".into());
            r.firmware = Some(if i == 4242 { "1.8.0-rc1" } else { "1.7.6" }.into());
            if state == PresenceState::InSession {
                r.session_id = Some(format!("session-{i}"));
                r.session_since_ms = Some(r.last_seen_ms);
            }
            r
        })
        .collect();
    let expected = counts(
        9_000,
        (0..N).filter(|i| i % 10 != 9 && i % 4 == 0).count(),
        1_000,
    );

    async fn measure(backend: &str, store: &dyn PresenceStore, expected: FleetCounts) {
        let mut timings = Vec::new();
        for _ in 0..3 {
            let start = Instant::now();
            let page = fleet(
                store,
                FleetQuery {
                    limit: 100,
                    ..FleetQuery::default()
                },
            )
            .await;
            timings.push(start.elapsed());
            assert_eq!(page.counts, expected);
            assert_eq!((page.total, page.devices.len()), (N, 100));
            assert_eq!(page.next, Some(mac(99)));
        }
        let start = Instant::now();
        let page = fleet(
            store,
            FleetQuery {
                q: Some("1.8.0-RC".into()),
                ..FleetQuery::default()
            },
        )
        .await;
        let search = start.elapsed();
        assert_eq!(macs_of(&page), vec![mac(4242)]);
        let start = Instant::now();
        let page = fleet(
            store,
            FleetQuery {
                state: Some(PresenceState::Offline),
                after: Some(mac(N - 200)),
                limit: 100,
                ..FleetQuery::default()
            },
        )
        .await;
        let last = start.elapsed();
        assert_eq!(page.devices.len(), 20);
        assert_eq!(page.next, None);
        println!(
            "presence: {backend} fleet over {N} devices, limit 100: {timings:?}; \
             search {search:?}; last offline page {last:?}"
        );
        // Generous: a loaded debug build on a shared machine must not flake.
        for took in timings.iter().chain([&search, &last]) {
            assert!(*took < Duration::from_secs(3), "fleet took {took:?}");
        }
    }

    let memory = MemoryPresence::new();
    memory.write(&records, TTLS).await.unwrap();
    measure("memory", &memory, expected).await;

    with_redis(move |ctx| async move {
        let store = &*ctx.store;
        for batch in records.chunks(500) {
            store.write(batch, TTLS).await.unwrap();
        }
        measure("redis", store, expected).await;
    })
    .await;
}

async fn ping_answers(ctx: Ctx) {
    ctx.store.ping().await.unwrap();
    let expected = if ctx.raw.is_some() { "redis" } else { "memory" };
    assert_eq!(ctx.store.backend(), expected);
}

#[tokio::test]
async fn redis_malformed_entry_is_an_error_for_get_and_skipped_by_list() {
    with_redis(|ctx| async move {
        let mut raw = ctx.raw.unwrap();
        let store = &*ctx.store;
        store
            .write(
                &[
                    record(&mac(1), PresenceState::Online, "node-a"),
                    record(&mac(2), PresenceState::Online, "node-a"),
                ],
                TTLS,
            )
            .await
            .unwrap();
        let dev = format!("{}dev:{}", raw.prefix, mac(2));
        let _: () = raw
            .con
            .hset(&dev, "last_seen_ms", "yesterday")
            .await
            .unwrap();
        match store.get(&mac(2)).await {
            Err(PresenceError::Malformed { key, reason }) => {
                assert_eq!(key, dev);
                assert!(reason.contains("last_seen_ms"), "{reason}");
            }
            other => panic!("expected Malformed, got {other:?}"),
        }
        assert_eq!(listed(store).await, vec![mac(1)]);
        // Not a hash at all.
        let _: () = raw.con.del(&dev).await.unwrap();
        let _: () = raw.con.set(&dev, "garbage").await.unwrap();
        match store.get(&mac(2)).await {
            Err(PresenceError::Malformed { key, .. }) => assert_eq!(key, dev),
            other => panic!("expected Malformed, got {other:?}"),
        }
        assert_eq!(listed(store).await, vec![mac(1)]);
    })
    .await;
}

#[tokio::test]
async fn redis_reloads_its_scripts_after_a_flush() {
    // What a Redis restart looks like to the scripts: NOSCRIPT, then load and retry.
    with_redis(|ctx| async move {
        let mut raw = ctx.raw.unwrap();
        let store = &*ctx.store;
        let r = record(&mac(1), PresenceState::Online, "node-a");
        store.write(std::slice::from_ref(&r), TTLS).await.unwrap();
        let _: () = redis::cmd("SCRIPT")
            .arg("FLUSH")
            .query_async(&mut raw.con)
            .await
            .unwrap();
        store
            .heartbeat("node-a", &[mac(1)], r.last_seen_ms + 5, TTLS)
            .await
            .unwrap();
        assert_eq!(
            store.get(&mac(1)).await.unwrap().unwrap().last_seen_ms,
            r.last_seen_ms + 5
        );
        let _: () = redis::cmd("SCRIPT")
            .arg("FLUSH")
            .query_async(&mut raw.con)
            .await
            .unwrap();
        assert_eq!(store.reconcile("node-a", now_ms(), TTLS).await.unwrap(), 1);
    })
    .await;
}

/// A free local port nothing listens on (connections are refused).
async fn closed_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap().port()
}

/// Every call fails within `bound`; returns the slowest.
async fn assert_all_calls_fail_within(store: &RedisPresence, bound: Duration) -> Duration {
    let mut slowest = Duration::ZERO;
    let r = record(&mac(1), PresenceState::Online, "node-a");
    for call in 0..7 {
        let start = Instant::now();
        let failed = match call {
            0 => store.ping().await.is_err(),
            6 => store.fleet(&FleetQuery::default(), now_ms()).await.is_err(),
            1 => store.write(std::slice::from_ref(&r), TTLS).await.is_err(),
            2 => store.get(&mac(1)).await.is_err(),
            3 => store.list(&all()).await.is_err(),
            4 => store
                .heartbeat("node-a", &[mac(1)], now_ms(), TTLS)
                .await
                .is_err(),
            _ => store.reconcile("node-a", now_ms(), TTLS).await.is_err(),
        };
        let took = start.elapsed();
        assert!(failed, "call {call} succeeded against a dead Redis");
        assert!(took <= bound, "call {call} took {took:?} (bound {bound:?})");
        slowest = slowest.max(took);
    }
    slowest
}

#[tokio::test]
async fn redis_down_fails_fast_and_constructing_does_not_fail() {
    // Port 1: nothing listens, the kernel refuses.
    let start = Instant::now();
    let store = RedisPresence::connect("redis://127.0.0.1:1/", "xz-test-down:", TIMEOUT)
        .await
        .expect("constructing must not need Redis");
    assert!(start.elapsed() < Duration::from_millis(100));
    for round in 0..2 {
        let slowest = assert_all_calls_fail_within(&store, 2 * TIMEOUT).await;
        println!("presence: refused port, round {round}: slowest failure {slowest:?}");
    }
    // A malformed URL is the one thing construction rejects.
    assert!(
        RedisPresence::connect("http://127.0.0.1:6379", "x:", TIMEOUT)
            .await
            .is_err()
    );
}

#[tokio::test]
async fn redis_stuck_server_fails_within_the_timeout() {
    // Accepts connections but never answers: the timeout, not the kernel, ends calls.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let store = RedisPresence::connect(&format!("redis://127.0.0.1:{port}/"), "x:", TIMEOUT)
        .await
        .unwrap();
    let slowest = assert_all_calls_fail_within(&store, 2 * TIMEOUT).await;
    println!("presence: silent server: slowest failure {slowest:?}");
    silent.abort();
}

/// Forwards `port` to the real Redis once started: "Redis comes back".
async fn start_proxy(port: u16) -> tokio::task::JoinHandle<()> {
    let listener = TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("rebind the proxy port");
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            tokio::spawn(async move {
                if let Ok(mut outbound) = TcpStream::connect("127.0.0.1:6379").await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    })
}

#[tokio::test]
async fn redis_store_started_while_redis_is_down_writes_once_it_is_back() {
    let port = closed_port().await;
    with_redis(move |ctx| async move {
        let prefix = ctx.raw.as_ref().unwrap().prefix.clone();
        let store = RedisPresence::connect(&format!("redis://127.0.0.1:{port}/"), &prefix, TIMEOUT)
            .await
            .expect("constructing must not need Redis");
        let r = record(&mac(7), PresenceState::Online, "node-a");
        assert!(store.write(std::slice::from_ref(&r), TTLS).await.is_err());

        let proxy = start_proxy(port).await;
        // The tracker retries failed batches; do the same until one lands.
        let start = Instant::now();
        let mut attempts = 0;
        loop {
            attempts += 1;
            match store.write(std::slice::from_ref(&r), TTLS).await {
                Ok(()) => break,
                Err(e) if start.elapsed() < Duration::from_secs(5) => {
                    println!("presence: attempt {attempts} after Redis came back: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!(
                    "still failing {:?} after Redis came back: {e}",
                    start.elapsed()
                ),
            }
        }
        println!(
            "presence: writing again {:?} after Redis came back ({attempts} attempts)",
            start.elapsed()
        );
        assert_eq!(store.get(&mac(7)).await.unwrap(), Some(r.clone()));
        // And the suite's own store (direct) sees it too.
        assert_eq!(ctx.store.get(&mac(7)).await.unwrap(), Some(r));
        proxy.abort();
    })
    .await;
}

#[tokio::test]
async fn redis_write_rate() {
    with_redis(|ctx| async move {
        const N: usize = 10_000;
        const BATCH: usize = 500;
        let store = &*ctx.store;
        let records: Vec<PresenceRecord> = (0..N)
            .map(|i| {
                let state = if i % 4 == 0 {
                    PresenceState::InSession
                } else {
                    PresenceState::Online
                };
                let mut r = record(&mac(i), state, "node-a");
                r.board = Some("bread-compact-wifi".into());
                r.firmware = Some("1.7.6".into());
                if state == PresenceState::InSession {
                    r.session_id = Some(format!("session-{i}"));
                    r.session_since_ms = Some(r.last_seen_ms);
                }
                r
            })
            .collect();
        // Warm up: the first batch also loads the scripts.
        store.write(&records[..1], TTLS).await.unwrap();

        let start = Instant::now();
        for batch in records.chunks(BATCH) {
            store.write(batch, TTLS).await.unwrap();
        }
        let took = start.elapsed();
        let rate = N as f64 / took.as_secs_f64();
        println!(
            "presence: {N} records in {} ms = {rate:.0} writes/s (batches of {BATCH})",
            took.as_millis()
        );

        let start = Instant::now();
        let page = store.list(&all()).await.unwrap();
        println!(
            "presence: list over {N} devices in {} ms",
            start.elapsed().as_millis()
        );
        assert_eq!(page.total, N);
        assert_eq!(page.devices.len(), 100);
    })
    .await;
}
