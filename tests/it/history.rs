//! Chat history end to end: conversations through the mock xiaozhi-server are recorded
//! in SQLite and in real MariaDB (127.0.0.1:3306, root, no password), with WAV audio,
//! per-agent policies, and no loss or duplicates across a database outage and a restart.

use crate::common;

use common::scratch_db::ScratchDb;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use sqlx::Row;
use tokio::net::{TcpListener, TcpStream};
use xiaozhi_gateway::config::Config;
use xiaozhi_gateway::history::audio::wav_info;
use xiaozhi_gateway::history::writer::RecordMode;
use xiaozhi_tools::simulator::upstream::{MockUpstream, MockUpstreamConfig};

fn history_config(
    upstream: &MockUpstream,
    database_url: String,
    journal: &std::path::Path,
) -> Config {
    let mut c = common::test_config();
    c.pipeline.xiaozhi.urls = vec![upstream.url.clone()];
    c.history.enabled = true;
    c.history.database_url = database_url;
    c.history.journal_dir = journal.to_owned();
    c.history.mode = RecordMode::Audio;
    c.history.write_timeout_ms = 1_000;
    c.history.retry_secs = 1;
    c
}

#[derive(Debug)]
struct Row3 {
    session_id: String,
    chat_type: i64,
    content: String,
    audio: Option<Vec<u8>>,
    agent_id: Option<String>,
}

async fn mysql_rows(pool: &sqlx::MySqlPool, mac: &str) -> Vec<Row3> {
    sqlx::query(
        "SELECT h.session_id, h.chat_type, h.content, h.agent_id, a.audio FROM ai_agent_chat_history h \
         LEFT JOIN ai_agent_chat_audio a ON a.id = h.audio_id WHERE h.mac_address = ? ORDER BY h.id",
    )
    .bind(mac)
    .fetch_all(pool)
    .await
    .unwrap()
    .into_iter()
    .map(|r| Row3 {
        session_id: r.get("session_id"),
        chat_type: i64::from(r.get::<i8, _>("chat_type")),
        content: r.get("content"),
        audio: r.get("audio"),
        agent_id: r.get("agent_id"),
    })
    .collect()
}

/// The rows a conversation of `turns` turns must produce, in order.
fn assert_turn_rows(rows: &[Row3], session_id: &str, turns: u32, with_audio: bool) {
    let expected: Vec<(i64, String)> = (1..=turns)
        .flat_map(|t| [(1, format!("turn {t}")), (2, format!("reply {t}"))])
        .collect();
    let got: Vec<(i64, String)> = rows
        .iter()
        .map(|r| (r.chat_type, r.content.clone()))
        .collect();
    assert_eq!(got, expected);
    for row in rows {
        assert_eq!(
            row.session_id, session_id,
            "the session id the device got in its hello"
        );
        match (&row.audio, with_audio) {
            (Some(wav), true) => {
                let info = wav_info(wav).expect("a valid WAV");
                assert_eq!(
                    (info.sample_rate, info.channels, info.bits_per_sample),
                    (16_000, 1, 16)
                );
                // 5 frames of 60 ms each way, within one frame.
                assert!(
                    (240..=360).contains(&info.duration_ms),
                    "{} ms for {:?}",
                    info.duration_ms,
                    row.content
                );
            }
            (None, false) => {}
            (audio, _) => panic!(
                "audio {:?} for {:?}, expected {with_audio}",
                audio.as_ref().map(Vec::len),
                row.content
            ),
        }
    }
}

async fn eventually_rows(pool: &sqlx::MySqlPool, mac: &str, n: usize) -> Vec<Row3> {
    for _ in 0..100 {
        let rows = mysql_rows(pool, mac).await;
        if rows.len() >= n {
            return rows;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    mysql_rows(pool, mac).await
}

#[tokio::test]
async fn a_conversation_is_recorded_in_mariadb_with_audio() {
    let db = ScratchDb::new("test").await;
    let upstream = MockUpstream::start(MockUpstreamConfig::default())
        .await
        .unwrap();
    let journal = tempfile::tempdir().unwrap();
    let gw = common::start_with(history_config(&upstream, db.url(), journal.path())).await;
    let mut events = gw.history_events.subscribe();
    let session = common::converse(&gw, 200, 2).await.1;
    let mac = common::mac(200).colon();
    let pool = db.pool().await;
    let rows = eventually_rows(&pool, &mac, 4).await;
    assert_turn_rows(&rows, &session, 2, true);
    // Live consumers saw each stored record.
    let mut seen = Vec::new();
    while let Ok(e) = events.try_recv() {
        seen.push(e.content);
    }
    assert_eq!(seen, ["turn 1", "reply 1", "turn 2", "reply 2"]);
    gw.shutdown().await;
    pool.close().await;
    db.drop_db().await;
}

#[tokio::test]
async fn the_embedded_default_sqlite_gets_the_same_rows() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = MockUpstream::start(MockUpstreamConfig::default())
        .await
        .unwrap();
    let url = format!(
        "sqlite://{}",
        dir.path().join("nested/history.db").display()
    );
    let gw = common::start_with(history_config(&upstream, url.clone(), dir.path())).await;
    let session = common::converse(&gw, 201, 2).await.1;
    let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
    let mac = common::mac(201).colon();
    let mut rows = Vec::new();
    for _ in 0..100 {
        rows = sqlx::query(
            "SELECT h.session_id, h.chat_type, h.content, a.audio FROM ai_agent_chat_history h \
             LEFT JOIN ai_agent_chat_audio a ON a.id = h.audio_id WHERE h.mac_address = ? ORDER BY h.id",
        )
        .bind(&mac)
        .fetch_all(&pool)
        .await
        .unwrap()
        .into_iter()
        .map(|r| Row3 {
            session_id: r.get("session_id"),
            chat_type: r.get("chat_type"),
            content: r.get("content"),
            audio: r.get("audio"),
            agent_id: None,
        })
        .collect();
        if rows.len() >= 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_turn_rows(&rows, &session, 2, true);
    gw.shutdown().await;
}

#[tokio::test]
async fn chat_history_conf_decides_what_is_recorded() {
    let db = ScratchDb::new("test").await;
    let pool = db.pool().await;
    // Minimal manager-api device and agent tables.
    for sql in [
        "CREATE TABLE ai_agent (id VARCHAR(32) NOT NULL PRIMARY KEY, chat_history_conf TINYINT NOT NULL DEFAULT 0)",
        "CREATE TABLE ai_device (id VARCHAR(32) NOT NULL PRIMARY KEY, mac_address VARCHAR(50), agent_id VARCHAR(32))",
        "INSERT INTO ai_agent VALUES ('agent0', 0), ('agent1', 1), ('agent2', 2)",
    ] {
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(&pool)
            .await
            .unwrap();
    }
    for (n, agent) in [(210u32, "agent0"), (211, "agent1"), (212, "agent2")] {
        let mac = common::mac(n).colon();
        sqlx::query("INSERT INTO ai_device (id, mac_address, agent_id) VALUES (?, ?, ?)")
            .bind(mac.replace(':', ""))
            .bind(&mac)
            .bind(agent)
            .execute(&pool)
            .await
            .unwrap();
    }
    let upstream = MockUpstream::start(MockUpstreamConfig::default())
        .await
        .unwrap();
    let journal = tempfile::tempdir().unwrap();
    let gw = common::start_with(history_config(&upstream, db.url(), journal.path())).await;
    let mut sessions = Vec::new();
    for n in [210u32, 211, 212, 213] {
        sessions.push(common::converse(&gw, n, 1).await.1);
    }
    let rows = eventually_rows(&pool, &common::mac(212).colon(), 2).await;
    assert_turn_rows(&rows, &sessions[2], 1, true);
    assert!(rows.iter().all(|r| r.agent_id.as_deref() == Some("agent2")));
    let rows = eventually_rows(&pool, &common::mac(211).colon(), 2).await;
    assert_turn_rows(&rows, &sessions[1], 1, false);
    // Give the writer time to have written anything it would write for the others.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        mysql_rows(&pool, &common::mac(210).colon())
            .await
            .is_empty(),
        "conf 0 records nothing"
    );
    assert!(
        mysql_rows(&pool, &common::mac(213).colon())
            .await
            .is_empty(),
        "unknown device: nothing"
    );
    assert!(gw.metrics.snapshot().history_records_skipped >= 4);
    gw.shutdown().await;
    pool.close().await;
    db.drop_db().await;
}

/// A TCP proxy to MariaDB that can be cut (connections refused and existing ones dropped).
struct Switch {
    addr: SocketAddr,
    up: Arc<AtomicBool>,
    generation: Arc<tokio::sync::watch::Sender<u64>>,
}

impl Switch {
    async fn start() -> Switch {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let up = Arc::new(AtomicBool::new(true));
        let generation = Arc::new(tokio::sync::watch::Sender::new(0u64));
        let (u, g) = (up.clone(), generation.clone());
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if !u.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let mut cut = g.subscribe();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect("127.0.0.1:3306").await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        Switch {
            addr,
            up,
            generation,
        }
    }

    fn set(&self, up: bool) {
        self.up.store(up, Ordering::SeqCst);
        if !up {
            self.generation.send_modify(|g| *g += 1);
        }
    }
}

#[tokio::test]
async fn an_outage_loses_nothing_and_duplicates_nothing_even_across_a_restart() {
    let db = ScratchDb::new("test").await;
    let switch = Switch::start().await;
    let url = format!("mysql://root@{}/{}", switch.addr, db.name);
    let upstream = MockUpstream::start(MockUpstreamConfig::default())
        .await
        .unwrap();
    let journal = tempfile::tempdir().unwrap();
    let pool = db.pool().await;

    // Up: the schema is created and a first conversation stored.
    let gw = common::start_with(history_config(&upstream, url.clone(), journal.path())).await;
    let s1 = common::converse(&gw, 220, 1).await.1;
    assert_eq!(
        eventually_rows(&pool, &common::mac(220).colon(), 2)
            .await
            .len(),
        2
    );

    // Down mid-service: a conversation goes to the journal...
    switch.set(false);
    let s2 = common::converse(&gw, 221, 2).await.1;
    assert!(
        common::eventually(Duration::from_secs(10), || gw
            .metrics
            .snapshot()
            .history_records_journaled
            >= 4)
        .await,
        "{:?}",
        gw.metrics.snapshot()
    );
    // The backlog is observable.
    let health: serde_json::Value = reqwest::get(format!("http://{}/healthz", gw.addrs.http))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        health["history"]["journal_bytes"].as_u64().unwrap() > 0,
        "{health}"
    );
    assert!(
        health["history"]["journaled"].as_u64().unwrap() >= 4,
        "{health}"
    );
    // ...and comes back when the database does.
    switch.set(true);
    let rows = eventually_rows(&pool, &common::mac(221).colon(), 4).await;
    assert_turn_rows(&rows, &s2, 2, true);

    // Down again, and the gateway restarts before it returns: the journal survives.
    switch.set(false);
    let s3 = common::converse(&gw, 222, 1).await.1;
    assert!(
        common::eventually(Duration::from_secs(10), || gw
            .metrics
            .snapshot()
            .history_records_journaled
            >= 6)
        .await
    );
    gw.shutdown().await;
    assert!(
        std::fs::metadata(journal.path().join("history.journal"))
            .unwrap()
            .len()
            > 0
    );
    switch.set(true);
    let gw = common::start_with(history_config(&upstream, url, journal.path())).await;
    let rows = eventually_rows(&pool, &common::mac(222).colon(), 2).await;
    assert_turn_rows(&rows, &s3, 1, true);

    // Nothing twice, anywhere.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_turn_rows(
        &mysql_rows(&pool, &common::mac(220).colon()).await,
        &s1,
        1,
        true,
    );
    assert_turn_rows(
        &mysql_rows(&pool, &common::mac(221).colon()).await,
        &s2,
        2,
        true,
    );
    assert_turn_rows(
        &mysql_rows(&pool, &common::mac(222).colon()).await,
        &s3,
        1,
        true,
    );
    gw.shutdown().await;
    pool.close().await;
    db.drop_db().await;
}

#[tokio::test]
async fn retention_deletes_old_audio_and_text_without_dangling_references() {
    use xiaozhi_gateway::history::record::{ChatType, now_ms};
    use xiaozhi_gateway::history::retention::{Retention, run_once};
    use xiaozhi_gateway::history::store::{Store, StoredRecord};
    use xiaozhi_gateway::history::writer::format_time;

    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("r.db").display());
    let store = Store::connect(&url, Duration::from_secs(5)).await.unwrap();
    store.migrate().await.unwrap();
    let day = 86_400_000i64;
    let now = now_ms();
    let wav = xiaozhi_gateway::history::audio::encode_wav(&[0i16; 1600], 16_000);
    let rows: Vec<StoredRecord> = [(40, "forty"), (10, "ten"), (1, "one")]
        .into_iter()
        .map(|(age, text)| StoredRecord {
            record_id: xiaozhi_gateway::history::record::new_id(),
            mac_address: "aa:bb:cc:dd:ee:ff".into(),
            agent_id: None,
            session_id: format!("s-{age}"),
            chat_type: ChatType::User,
            content: text.into(),
            wav: Some(wav.clone()),
            created_at: format_time(now - age * day, 480),
        })
        .collect();
    assert_eq!(store.write_batch(&rows).await.unwrap(), 3);

    let retention = Retention {
        audio_days: 7,
        text_days: 30,
        utc_offset_minutes: 480,
    };
    let deleted = run_once(&store, retention, now).await.unwrap();
    assert_eq!((deleted.rows, deleted.audio), (1, 2), "{deleted:?}");

    let Store::Sqlite(pool) = &store else {
        unreachable!()
    };
    let left: Vec<(String, Option<String>)> =
        sqlx::query_as("SELECT content, audio_id FROM ai_agent_chat_history ORDER BY id")
            .fetch_all(pool)
            .await
            .unwrap();
    assert_eq!(left.len(), 2);
    assert_eq!(
        (left[0].0.as_str(), left[0].1.is_none()),
        ("ten", true),
        "old audio stripped"
    );
    assert_eq!(
        (left[1].0.as_str(), left[1].1.is_some()),
        ("one", true),
        "recent audio kept"
    );
    let dangling: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM ai_agent_chat_history h LEFT JOIN ai_agent_chat_audio a ON a.id = h.audio_id \
         WHERE h.audio_id IS NOT NULL AND a.id IS NULL",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(dangling, 0);
    let blobs: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM ai_agent_chat_audio")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(blobs, 1, "only the recent row's audio remains");
    // A second pass has nothing left to do.
    let again = run_once(&store, retention, now).await.unwrap();
    assert_eq!((again.rows, again.audio), (0, 0));
}

#[tokio::test]
async fn connecting_updates_manager_api_last_connected_at_throttled() {
    let db = ScratchDb::new("test").await;
    let pool = db.pool().await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(
        "CREATE TABLE ai_device (id VARCHAR(32) NOT NULL PRIMARY KEY, mac_address VARCHAR(50), \
         agent_id VARCHAR(32), last_connected_at DATETIME NULL)",
    ))
    .execute(&pool)
    .await
    .unwrap();
    let mac = common::mac(230).colon();
    sqlx::query("INSERT INTO ai_device (id, mac_address) VALUES (?, ?)")
        .bind(mac.replace(':', ""))
        .bind(&mac)
        .execute(&pool)
        .await
        .unwrap();
    let journal = tempfile::tempdir().unwrap();
    let mut config = common::test_config();
    config.history.enabled = true;
    config.history.database_url = db.url();
    config.history.journal_dir = journal.path().to_owned();
    let gw = common::start_with(config).await;
    let last = || async {
        sqlx::query_scalar::<_, Option<time::PrimitiveDateTime>>(
            "SELECT last_connected_at FROM ai_device WHERE mac_address = ?",
        )
        .bind(&mac)
        .fetch_one(&pool)
        .await
        .unwrap()
    };
    let dev = common::device(&gw, 230).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let first = loop {
        if let Some(t) = last().await {
            break t;
        }
        assert!(Instant::now() < deadline, "last_connected_at never set");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Reconnecting within the throttle period does not write again.
    dev.disconnect().await;
    let dev = common::device(&gw, 230).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(last().await, Some(first), "throttled");
    assert_eq!(gw.metrics.snapshot().presence_last_connected_updates, 1);
    dev.disconnect().await;
    gw.shutdown().await;
    db.drop_db().await;
}

/// Firmware 2.4's `glyph_push`: the largest payload it takes (64 glyphs, 64 KiB of
/// bitmaps, about 88 KB of JSON) on an `stt` and a `tts sentence_start` goes from
/// xiaozhi-server to the device intact (the device's own 2.4 checks accept every glyph),
/// and to bus observers; chat history keeps the text and never the bitmaps.
#[tokio::test]
async fn glyph_push_is_relayed_intact_and_recorded_without_bitmaps() {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    use serde_json::{Value, json};
    use xiaozhi_tools::simulator::firmware::{TextFont, glyph_push};

    let dir = tempfile::tempdir().unwrap();
    let upstream = MockUpstream::start(MockUpstreamConfig::default())
        .await
        .unwrap();
    let url = format!("sqlite://{}", dir.path().join("glyphs.db").display());
    let gw = common::start_with(history_config(&upstream, url.clone(), dir.path())).await;
    let mac = common::mac(205);

    // A bus observer (its client must take packets that large: rumqttc's default is 10 KiB).
    let mut opts = MqttOptions::new(
        "glyph-observer",
        "127.0.0.1",
        gw.addrs.broker.unwrap().port(),
    );
    opts.set_credentials(common::ADMIN_USER, common::ADMIN_PASS);
    opts.set_max_packet_size(1 << 20, 1 << 20);
    let (observer, mut events) = AsyncClient::new(opts, 100);
    observer
        .subscribe(format!("xiaozhi/devices/{mac}/down"), QoS::AtMostOnce)
        .await
        .unwrap();
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(5), events.poll())
            .await
            .unwrap()
            .unwrap();
        if matches!(ev, Event::Incoming(Packet::SubAck(_))) {
            break;
        }
    }

    let mut dev = common::device(&gw, 205).await;
    let (hello, _audio) = common::conversation(&mut dev).await;
    let font = TextFont::default();
    let stt = json!({
        "type": "stt", "session_id": hello.session_id, "text": "𠮷野家",
        "glyph_push": glyph_push(&font, 64, 64, 32),
    });
    let sentence = json!({
        "type": "tts", "state": "sentence_start", "session_id": hello.session_id,
        "text": "𠀀𠀁", "glyph_push": glyph_push(&font, 64, 32, 64),
    });
    assert!(sentence.to_string().len() > 87_000);
    for message in [
        &stt,
        &sentence,
        &json!({"type": "tts", "state": "stop", "session_id": hello.session_id}),
    ] {
        assert!(upstream.send_text_to_newest(message.to_string()).await);
    }
    assert_eq!(
        dev.recv_type("stt", Duration::from_secs(5)).await.unwrap(),
        stt
    );
    assert_eq!(
        dev.recv_type("tts", Duration::from_secs(5)).await.unwrap(),
        sentence
    );
    assert_eq!(
        dev.glyphs_accepted(),
        128,
        "every glyph passes the firmware's checks"
    );
    assert!(dev.violations().is_empty(), "{:?}", dev.violations());

    // Bus observers see the same message.
    let copy = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Event::Incoming(Packet::Publish(p)) = events.poll().await.unwrap() {
                let v: Value = serde_json::from_slice(&p.payload).unwrap_or_default();
                if v["state"] == "sentence_start" {
                    return v;
                }
            }
        }
    })
    .await
    .expect("the /down copy of the glyph message");
    assert_eq!(copy, sentence);

    // History: the two texts, nothing of the bitmaps.
    let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
    let mut rows: Vec<(i64, String)> = Vec::new();
    for _ in 0..100 {
        rows = sqlx::query(
            "SELECT chat_type, content FROM ai_agent_chat_history WHERE mac_address = ? ORDER BY id",
        )
        .bind(mac.colon())
        .fetch_all(&pool)
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.get("chat_type"), r.get("content")))
        .collect();
        if rows.len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(rows, vec![(1, "𠮷野家".to_owned()), (2, "𠀀𠀁".to_owned())]);
    gw.shutdown().await;
}
