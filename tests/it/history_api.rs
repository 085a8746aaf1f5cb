//! The chat-history API and the `/ws/admin` feed over real sockets, against SQLite and
//! real MariaDB (127.0.0.1:3306, root, no password): token checks, a recorded
//! conversation read back, the live feed, hostile input, keyset paging while rows are
//! inserted, streaming export of 100,000 rows, and per-day statistics of a device and of
//! the fleet.

use crate::common;

use common::scratch_db::ScratchDb;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use reqwest::StatusCode;
use serde_json::{Value, json};
use sqlx::AssertSqlSafe;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use xiaozhi_gateway::config::Config;
use xiaozhi_gateway::history::audio::{encode_wav, wav_info};
use xiaozhi_gateway::history::record::new_id;
use xiaozhi_gateway::history::store::Store;
use xiaozhi_gateway::history::writer::{RecordMode, StoredEvent};
use xiaozhi_gateway::server::Gateway;
use xiaozhi_tools::simulator::upstream::{MockUpstream, MockUpstreamConfig};

const TOKEN: &str = "history-api-test-token";

// --- databases -----------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Sqlite,
    MariaDb,
}

/// Direct access to the database the gateway uses, for inserting and counting.
#[derive(Clone)]
enum Db {
    MySql(sqlx::MySqlPool),
    Sqlite(sqlx::SqlitePool),
}

/// A row to insert directly.
#[derive(Clone, Debug)]
struct Row {
    mac: String,
    agent: Option<String>,
    session: String,
    chat_type: i64,
    content: String,
    audio_id: Option<String>,
    created_at: String,
}

fn row(mac: &str, session: &str, chat_type: i64, content: &str, created_at: &str) -> Row {
    Row {
        mac: mac.into(),
        agent: None,
        session: session.into(),
        chat_type,
        content: content.into(),
        audio_id: None,
        created_at: created_at.into(),
    }
}

const INSERT_ROWS_PER_STATEMENT: usize = 1000;

impl Db {
    /// Inserts rows in multi-row statements (placeholders only; values are bound).
    async fn insert(&self, rows: &[Row]) {
        for chunk in rows.chunks(INSERT_ROWS_PER_STATEMENT) {
            let mut sql = String::from(
                "INSERT INTO ai_agent_chat_history \
                 (mac_address, agent_id, session_id, chat_type, content, audio_id, created_at, updated_at) VALUES ",
            );
            for i in 0..chunk.len() {
                if i > 0 {
                    sql.push(',');
                }
                sql.push_str("(?, ?, ?, ?, ?, ?, ?, ?)");
            }
            macro_rules! run {
                ($pool:expr) => {{
                    let mut q = sqlx::query(AssertSqlSafe(sql.clone()));
                    for r in chunk {
                        q = q
                            .bind(&r.mac)
                            .bind(&r.agent)
                            .bind(&r.session)
                            .bind(r.chat_type)
                            .bind(&r.content)
                            .bind(&r.audio_id)
                            .bind(&r.created_at)
                            .bind(&r.created_at);
                    }
                    q.execute($pool).await.unwrap();
                }};
            }
            match self {
                Db::MySql(pool) => run!(pool),
                Db::Sqlite(pool) => run!(pool),
            }
        }
    }

    async fn insert_audio(&self, id: &str, wav: &[u8]) {
        const SQL: &str = "INSERT INTO ai_agent_chat_audio (id, audio) VALUES (?, ?)";
        match self {
            Db::MySql(pool) => {
                sqlx::query(SQL)
                    .bind(id)
                    .bind(wav)
                    .execute(pool)
                    .await
                    .unwrap();
            }
            Db::Sqlite(pool) => {
                sqlx::query(SQL)
                    .bind(id)
                    .bind(wav)
                    .execute(pool)
                    .await
                    .unwrap();
            }
        }
    }

    async fn scalar(&self, sql: &'static str) -> i64 {
        match self {
            Db::MySql(pool) => sqlx::query_scalar(sql).fetch_one(pool).await.unwrap(),
            Db::Sqlite(pool) => sqlx::query_scalar(sql).fetch_one(pool).await.unwrap(),
        }
    }

    async fn history_rows(&self) -> i64 {
        self.scalar("SELECT COUNT(*) FROM ai_agent_chat_history")
            .await
    }

    async fn audio_rows(&self) -> i64 {
        self.scalar("SELECT COUNT(*) FROM ai_agent_chat_audio")
            .await
    }

    async fn ids_of_session(&self, session: &str) -> Vec<i64> {
        const SQL: &str = "SELECT id FROM ai_agent_chat_history WHERE session_id = ? ORDER BY id";
        match self {
            Db::MySql(pool) => sqlx::query_scalar(SQL)
                .bind(session)
                .fetch_all(pool)
                .await
                .unwrap(),
            Db::Sqlite(pool) => sqlx::query_scalar(SQL)
                .bind(session)
                .fetch_all(pool)
                .await
                .unwrap(),
        }
    }

    async fn close(&self) {
        match self {
            Db::MySql(pool) => pool.close().await,
            Db::Sqlite(pool) => pool.close().await,
        }
    }
}

// --- the gateway and its API -----------------------------------------------------------

struct Env {
    gw: Gateway,
    api: Api,
    db: Db,
    scratch: Option<ScratchDb>,
    _dir: tempfile::TempDir,
}

fn history_config(database_url: &str, journal: &std::path::Path) -> Config {
    let mut c = common::test_config();
    c.history.enabled = true;
    c.history.database_url = database_url.to_owned();
    c.history.journal_dir = journal.to_owned();
    c.history.mode = RecordMode::Audio;
    c.history.write_timeout_ms = 2_000;
    c.history.retry_secs = 1;
    c.history.api_token = Some(TOKEN.into());
    c
}

impl Env {
    async fn start(kind: Kind, upstream: Option<&MockUpstream>) -> Env {
        Env::start_with(kind, |c| {
            if let Some(u) = upstream {
                c.pipeline.xiaozhi.urls = vec![u.url.clone()];
            }
        })
        .await
    }

    async fn start_with(kind: Kind, adjust: impl FnOnce(&mut Config)) -> Env {
        let dir = tempfile::tempdir().unwrap();
        let scratch = match kind {
            Kind::Sqlite => None,
            Kind::MariaDb => Some(ScratchDb::new("api").await),
        };
        let url = match &scratch {
            None => format!("sqlite://{}", dir.path().join("h.db").display()),
            Some(s) => s.url(),
        };
        // The schema first, so tests can insert before the gateway has written anything.
        let store = Store::connect(&url, Duration::from_secs(5)).await.unwrap();
        store.migrate().await.unwrap();
        let db = match store {
            Store::MySql(pool) => Db::MySql(pool),
            Store::Sqlite(pool) => Db::Sqlite(pool),
        };
        let mut config = history_config(&url, dir.path());
        adjust(&mut config);
        let gw = common::start_with(config).await;
        let api = Api::new(&gw);
        Env {
            gw,
            api,
            db,
            scratch,
            _dir: dir,
        }
    }

    async fn finish(self) {
        self.gw.shutdown().await;
        self.db.close().await;
        if let Some(s) = self.scratch {
            s.drop_db().await;
        }
    }
}

struct Api {
    base: String,
    client: reqwest::Client,
}

impl Api {
    fn new(gw: &Gateway) -> Api {
        Api {
            base: format!("http://{}", gw.addrs.http),
            client: reqwest::Client::new(),
        }
    }

    /// `segments` are percent-encoded as path segments; `query` as a query string.
    fn url(&self, segments: &[&str], query: &[(&str, &str)]) -> reqwest::Url {
        let mut url = reqwest::Url::parse(&self.base).unwrap();
        url.path_segments_mut().unwrap().extend(segments);
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        url
    }

    async fn send(&self, url: reqwest::Url, token: Option<&str>) -> reqwest::Response {
        let mut request = self.client.get(url);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send().await.unwrap()
    }

    /// GET with the right token; the status and the JSON body (Null if not JSON).
    async fn get(&self, segments: &[&str], query: &[(&str, &str)]) -> (StatusCode, Value) {
        let response = self.send(self.url(segments, query), Some(TOKEN)).await;
        let status = response.status();
        let body = response.bytes().await.unwrap();
        (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
    }

    /// GET that must succeed; the JSON body.
    async fn ok(&self, segments: &[&str], query: &[(&str, &str)]) -> Value {
        let (status, body) = self.get(segments, query).await;
        assert_eq!(status, StatusCode::OK, "{segments:?} {query:?}: {body}");
        body
    }
}

const HISTORY: [&str; 2] = ["api", "history"];

fn path<'a>(rest: &[&'a str]) -> Vec<&'a str> {
    HISTORY
        .iter()
        .copied()
        .chain(rest.iter().copied())
        .collect()
}

// --- conversations ---------------------------------------------------------------------

fn expected_turns(turns: u32) -> Vec<(i64, String)> {
    (1..=turns)
        .flat_map(|t| [(1, format!("turn {t}")), (2, format!("reply {t}"))])
        .collect()
}

// --- token -------------------------------------------------------------------------------

#[tokio::test]
async fn the_token_is_required_and_without_one_the_routes_are_not_served() {
    let env = Env::start(Kind::Sqlite, None).await;
    let devices = env.api.url(&path(&["devices"]), &[]);
    let response = env.api.send(devices.clone(), None).await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(response.headers()["www-authenticate"], "Bearer");
    let body: Value = response.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("missing"));
    for wrong in ["wrong", "", &format!("{TOKEN}x"), &TOKEN[..TOKEN.len() - 1]] {
        let response = env.api.send(devices.clone(), Some(wrong)).await;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{wrong:?}");
        let _: Value = response.json().await.unwrap();
    }
    // Not a bearer scheme, and not in the query string.
    let response = env
        .api
        .client
        .get(devices.clone())
        .header("authorization", format!("Basic {TOKEN}"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let response = env
        .api
        .send(
            env.api.url(
                &path(&["devices"]),
                &[("token", TOKEN), ("access_token", TOKEN)],
            ),
            None,
        )
        .await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    // Every route is behind it.
    for segments in [
        path(&["devices", "aa:bb:cc:dd:ee:ff", "sessions"]),
        path(&["devices", "aa:bb:cc:dd:ee:ff", "stats"]),
        path(&["stats"]),
        path(&["sessions", "x", "messages"]),
        path(&["audio", "00"]),
        path(&["search"]),
        path(&["export"]),
        vec!["api", "v2", "chat-history", "aa:bb:cc:dd:ee:ff"],
        vec!["ws", "admin"],
    ] {
        let response = env.api.send(env.api.url(&segments, &[]), None).await;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{segments:?}");
    }
    assert_eq!(
        env.api.ok(&path(&["devices"]), &[]).await["devices"],
        json!([])
    );
    // An unknown device in the combined view: not connected, nothing recorded.
    let view = env
        .api
        .ok(&["api", "v2", "chat-history", "aa_bb_cc_dd_ee_ff"], &[])
        .await;
    assert_eq!(view["live"]["connected"], false);
    assert_eq!(view["stats"]["sessions"], 0);
    assert_eq!(view["recent_sessions"], json!([]));
    env.finish().await;

    // No api_token: 404, with or without a token.
    let env = Env::start_with(Kind::Sqlite, |c| c.history.api_token = None).await;
    for token in [None, Some(TOKEN)] {
        for segments in [path(&["devices"]), vec!["ws", "admin"]] {
            let response = env.api.send(env.api.url(&segments, &[]), token).await;
            assert_eq!(response.status(), StatusCode::NOT_FOUND, "{segments:?}");
        }
    }
    env.finish().await;

    // A token but no history: 404 too.
    let mut c = common::test_config();
    c.history.api_token = Some(TOKEN.into());
    let gw = common::start_with(c).await;
    let api = Api::new(&gw);
    let response = api
        .send(api.url(&path(&["devices"]), &[]), Some(TOKEN))
        .await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    gw.shutdown().await;
}

// --- a recorded conversation -------------------------------------------------------------

async fn a_recorded_conversation_reads_back(kind: Kind, n: u32) {
    let upstream = MockUpstream::start(MockUpstreamConfig::default())
        .await
        .unwrap();
    let env = Env::start(kind, Some(&upstream)).await;
    let (_dev, session) = common::converse(&env.gw, n, 2).await;
    let mac = common::mac(n);
    let api = &env.api;

    // Messages, in order, once the writer has stored them.
    let mut messages = Vec::new();
    for _ in 0..100 {
        let body = api
            .ok(&path(&["sessions", &session, "messages"]), &[])
            .await;
        messages = body["messages"].as_array().unwrap().clone();
        if messages.len() >= 4 {
            assert_eq!(body["next"], Value::Null);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let got: Vec<(i64, String)> = messages
        .iter()
        .map(|m| {
            (
                m["chat_type"].as_i64().unwrap(),
                m["content"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(got, expected_turns(2));
    let ids: Vec<i64> = messages.iter().map(|m| m["id"].as_i64().unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    for m in &messages {
        assert_eq!(m["mac_address"], mac.colon());
        assert_eq!(m["session_id"], session.as_str());
        let t = m["created_at"].as_str().unwrap();
        assert_eq!(t.len(), 23, "{t}: YYYY-MM-DD HH:MM:SS.mmm");
    }
    let first_at = messages[0]["created_at"].as_str().unwrap().to_owned();
    let last_at = messages[3]["created_at"].as_str().unwrap().to_owned();

    // Paging by id: two pages of two.
    let page = api
        .ok(
            &path(&["sessions", &session, "messages"]),
            &[("limit", "2")],
        )
        .await;
    assert_eq!(page["messages"].as_array().unwrap().len(), 2);
    let next = page["next"].as_i64().unwrap().to_string();
    let page = api
        .ok(
            &path(&["sessions", &session, "messages"]),
            &[("limit", "2"), ("after_id", &next)],
        )
        .await;
    assert_eq!(page["messages"][0]["content"], "turn 2");
    assert_eq!(page["next"], Value::Null);

    // The device...
    let devices = api.ok(&path(&["devices"]), &[]).await;
    let device = devices["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["mac_address"] == mac.colon())
        .unwrap_or_else(|| panic!("{devices}"));
    assert_eq!(device["sessions"], 1);
    assert_eq!(device["messages"], 4);
    assert_eq!(device["last_at"], last_at.as_str());

    // ...its session with counts (either MAC spelling)...
    for spelling in [mac.underscored(), mac.colon()] {
        let sessions = api
            .ok(&path(&["devices", &spelling, "sessions"]), &[])
            .await;
        assert_eq!(sessions["next"], Value::Null);
        let s = &sessions["sessions"][0];
        assert_eq!(s["session_id"], session.as_str());
        assert_eq!(
            (&s["user"], &s["assistant"], &s["tool"], &s["messages"]),
            (&json!(2), &json!(2), &json!(0), &json!(4)),
            "{s}"
        );
        assert_eq!(s["has_audio"], 4);
        assert_eq!(s["started_at"], first_at.as_str());
        assert_eq!(s["ended_at"], last_at.as_str());
    }

    // ...and every utterance's audio as a WAV.
    let mut audio_seconds = 0.0;
    for m in &messages {
        let id = m["audio_id"].as_str().expect("audio recorded");
        let response = api
            .send(api.url(&path(&["audio", id]), &[]), Some(TOKEN))
            .await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["content-type"], "audio/wav");
        let wav = response.bytes().await.unwrap();
        let info = wav_info(&wav).expect("a valid WAV");
        assert_eq!(
            (info.sample_rate, info.channels, info.bits_per_sample),
            (16_000, 1, 16)
        );
        assert!((240..=360).contains(&info.duration_ms), "{info:?}");
        audio_seconds += (wav.len() - 44) as f64 / 32_000.0;
    }
    let (status, body) = api.get(&path(&["audio", &"0".repeat(32)]), &[]).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body["error"].is_string());

    // The day's statistics.
    let day = &first_at[..10];
    let stats = api
        .ok(
            &path(&["devices", &mac.colon(), "stats"]),
            &[("from", day), ("to", day)],
        )
        .await;
    let d = &stats["days"][0];
    assert_eq!(d["day"], day);
    assert_eq!(
        (&d["sessions"], &d["messages"], &d["user"], &d["assistant"]),
        (&json!(1), &json!(4), &json!(2), &json!(2))
    );
    assert_eq!(d["audio_messages"], 4);
    let seconds = d["audio_seconds"].as_f64().unwrap();
    assert!(
        (seconds - audio_seconds).abs() < 1e-9,
        "{seconds} {audio_seconds}"
    );

    // Search.
    let found = api
        .ok(&path(&["search"]), &[("q", "reply"), ("mac", &mac.colon())])
        .await;
    let contents: Vec<&str> = found["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["content"].as_str().unwrap())
        .collect();
    assert_eq!(contents, ["reply 1", "reply 2"]);

    // The combined view: live state, totals, latest sessions.
    let view = api
        .ok(&["api", "v2", "chat-history", &mac.underscored()], &[])
        .await;
    assert_eq!(view["device_id"], mac.colon());
    assert_eq!(view["live"]["connected"], true, "{view}");
    assert!(
        view["live"]["remote"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:")
    );
    assert_eq!(view["live"]["connected_at"].as_str().unwrap().len(), 23);
    assert_eq!(view["stats"]["sessions"], 1);
    assert_eq!(view["stats"]["messages"], 4);
    assert_eq!(view["stats"]["last_activity"], last_at.as_str());
    assert_eq!(view["recent_sessions"][0]["session_id"], session.as_str());
    env.finish().await;
}

#[tokio::test]
async fn a_recorded_conversation_reads_back_from_sqlite() {
    a_recorded_conversation_reads_back(Kind::Sqlite, 300).await;
}

#[tokio::test]
async fn a_recorded_conversation_reads_back_from_mariadb() {
    a_recorded_conversation_reads_back(Kind::MariaDb, 301).await;
}

// --- the live feed -----------------------------------------------------------------------

type Ws = tokio_tungstenite::WebSocketStream<TcpStream>;

async fn ws_connect(
    gw: &Gateway,
    headers: &[(&str, String)],
) -> Result<(Ws, tungstenite::handshake::client::Response), tungstenite::Error> {
    let mut request = format!("ws://{}/ws/admin", gw.addrs.http)
        .into_client_request()
        .unwrap();
    for (name, value) in headers {
        request.headers_mut().insert(
            tungstenite::http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            value.parse().unwrap(),
        );
    }
    let tcp = TcpStream::connect(gw.addrs.http).await.unwrap();
    tokio_tungstenite::client_async(request, tcp).await
}

/// The next `chat_update`s, up to `n`, within `timeout`.
async fn chat_updates(ws: &mut Ws, n: usize, timeout: Duration) -> Vec<Value> {
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + timeout;
    while out.len() < n {
        let Ok(Some(Ok(message))) = tokio::time::timeout_at(deadline, ws.next()).await else {
            break;
        };
        if let tungstenite::Message::Text(text) = message {
            let v: Value = serde_json::from_str(&text).unwrap();
            if v["type"] == "presence" {
                continue;
            }
            assert_eq!(v["type"], "chat_update", "{v}");
            out.push(v);
        }
    }
    out
}

#[tokio::test]
async fn ws_admin_receives_every_record_of_a_live_conversation() {
    let upstream = MockUpstream::start(MockUpstreamConfig::default())
        .await
        .unwrap();
    let env = Env::start(Kind::Sqlite, Some(&upstream)).await;
    let gw = &env.gw;

    // Refused without the token, with a wrong one, and with it in the query string.
    for headers in [
        vec![],
        vec![("authorization", "Bearer nope".to_owned())],
        vec![("sec-websocket-protocol", "bearer.nope".to_owned())],
    ] {
        match ws_connect(gw, &headers).await {
            Err(tungstenite::Error::Http(response)) => {
                assert_eq!(response.status(), 401)
            }
            other => panic!("{headers:?}: {:?}", other.map(|_| ())),
        }
    }
    let mut request = format!("ws://{}/ws/admin?token={TOKEN}", gw.addrs.http)
        .into_client_request()
        .unwrap();
    request.headers_mut().remove("authorization");
    let tcp = TcpStream::connect(gw.addrs.http).await.unwrap();
    assert!(matches!(
        tokio_tungstenite::client_async(request, tcp).await,
        Err(tungstenite::Error::Http(r)) if r.status() == 401
    ));

    // A server client with the header; a browser with the subprotocols (ours is chosen);
    // a browser offering only the bearer one (it is echoed, as browsers require).
    let (mut header_ws, _) = ws_connect(gw, &[("authorization", format!("Bearer {TOKEN}"))])
        .await
        .unwrap();
    let (mut browser_ws, response) = ws_connect(
        gw,
        &[(
            "sec-websocket-protocol",
            format!("xiaozhi-admin, bearer.{TOKEN}"),
        )],
    )
    .await
    .unwrap();
    assert_eq!(
        response.headers()["sec-websocket-protocol"],
        "xiaozhi-admin"
    );
    let (mut bare_ws, response) =
        ws_connect(gw, &[("sec-websocket-protocol", format!("bearer.{TOKEN}"))])
            .await
            .unwrap();
    assert_eq!(
        response.headers()["sec-websocket-protocol"],
        format!("bearer.{TOKEN}").as_str()
    );

    let (_dev, session) = common::converse(gw, 310, 2).await;
    let mac = common::mac(310).colon();
    for ws in [&mut header_ws, &mut browser_ws, &mut bare_ws] {
        let updates = chat_updates(ws, 4, Duration::from_secs(10)).await;
        let got: Vec<(i64, String)> = updates
            .iter()
            .map(|u| {
                (
                    u["chat_type"].as_i64().unwrap(),
                    u["content"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        assert_eq!(got, expected_turns(2));
        for u in &updates {
            assert_eq!(u["mac_address"], mac.as_str());
            assert_eq!(u["session_id"], session.as_str());
            assert_eq!(u["has_audio"], true);
            assert_eq!(u["created_at"].as_str().unwrap().len(), 23);
        }
    }
    env.finish().await;
}

fn event(n: usize, content: String) -> StoredEvent {
    StoredEvent {
        mac_address: "02:00:00:00:00:99".into(),
        agent_id: None,
        session_id: "slow".into(),
        chat_type: 1,
        content: format!("{n} {content}"),
        has_audio: false,
        created_at: "2025-01-01 00:00:00.000".into(),
    }
}

/// Reads until the server ends the feed; returns the chat updates seen and the close
/// frame, if one came.
async fn drain(ws: &mut Ws) -> (usize, Option<tungstenite::protocol::CloseFrame>) {
    let mut updates = 0;
    loop {
        match tokio::time::timeout(Duration::from_secs(15), ws.next()).await {
            Ok(Some(Ok(tungstenite::Message::Text(_)))) => updates += 1,
            Ok(Some(Ok(tungstenite::Message::Close(frame)))) => return (updates, frame),
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(_))) | Ok(None) => return (updates, None),
            Err(_) => panic!("the feed of a slow consumer was not ended"),
        }
    }
}

#[tokio::test]
async fn a_consumer_that_falls_behind_is_disconnected_and_recording_never_waits() {
    let env = Env::start(Kind::Sqlite, None).await;
    let auth = [("authorization", format!("Bearer {TOKEN}"))];

    // Overtaken by the broadcast queue (the feed task has not run in between).
    let (mut lagging, _) = ws_connect(&env.gw, &auth).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    for n in 0..5_000 {
        let _ = env.gw.history_events.send(event(n, "x".repeat(100)));
    }
    assert!(started.elapsed() < Duration::from_millis(500));
    let (updates, frame) = drain(&mut lagging).await;
    let frame = frame.expect("a close frame");
    assert_eq!(u16::from(frame.code), 1013);
    assert!(frame.reason.contains("too slow"), "{}", frame.reason);
    assert_eq!(updates, 0);

    // A socket that stops taking data: one send blocks for over a second.
    let (mut stalled, _) = ws_connect(&env.gw, &auth).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let big = "y".repeat(64 * 1024);
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    for n in 0..400 {
        let t = Instant::now();
        let _ = env.gw.history_events.send(event(n, big.clone()));
        slowest = slowest.max(t.elapsed());
        if n % 16 == 15 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    eprintln!(
        "400 x 64 KiB events published in {:?} (slowest {slowest:?})",
        started.elapsed()
    );
    assert!(slowest < Duration::from_millis(50), "{slowest:?}");
    // Give the feed time to hit the 1 s send timeout, then read what it managed to send.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let (updates, frame) = drain(&mut stalled).await;
    eprintln!(
        "stalled consumer got {updates} of 400 updates before the feed ended ({:?})",
        frame.as_ref().map(|f| f.reason.to_string())
    );
    assert!(updates < 400, "the stalled consumer was never cut off");

    // A consumer that keeps up is not affected.
    let (mut keeping_up, _) = ws_connect(&env.gw, &auth).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    for n in 0..10 {
        let _ = env.gw.history_events.send(event(n, "z".into()));
    }
    assert_eq!(
        chat_updates(&mut keeping_up, 10, Duration::from_secs(5))
            .await
            .len(),
        10
    );
    env.finish().await;
}

/// A GET written by hand (for request lines no HTTP client will build); the status.
async fn raw_get(gw: &Gateway, target: &str) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = TcpStream::connect(gw.addrs.http).await.unwrap();
    let request = format!(
        "GET {target} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {TOKEN}\r\nConnection: close\r\n\r\n"
    );
    if tcp.write_all(request.as_bytes()).await.is_err() {
        return None;
    }
    let mut response = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut response)).await;
    let head = String::from_utf8_lossy(&response[..response.len().min(64)]).into_owned();
    head.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

// --- hostile input -------------------------------------------------------------------------

const HOSTILE_MAC: &str = "02:00:00:00:00:42";

async fn hostile_input_is_refused_or_harmless(kind: Kind) {
    let env = Env::start(kind, None).await;
    let day = "2025-02-01";
    let rows = [
        row(HOSTILE_MAC, "s1", 1, "100% sure", "2025-02-01 10:00:00.000"),
        row(
            HOSTILE_MAC,
            "s1",
            2,
            "snake_case",
            "2025-02-01 10:00:01.000",
        ),
        row(
            HOSTILE_MAC,
            "s1",
            1,
            r"back\slash",
            "2025-02-01 10:00:02.000",
        ),
        row(
            HOSTILE_MAC,
            "s1",
            2,
            "plain text",
            "2025-02-01 10:00:03.000",
        ),
        row(
            HOSTILE_MAC,
            "s1",
            1,
            "' OR 1=1 --",
            "2025-02-01 10:00:04.000",
        ),
        row(
            HOSTILE_MAC,
            "s1",
            2,
            "bang! here",
            "2025-02-01 10:00:05.000",
        ),
    ];
    env.db.insert(&rows).await;
    let wav = encode_wav(&[0; 1600], 16_000);
    env.db.insert_audio(&"a".repeat(32), &wav).await;
    let (history_before, audio_before) = (env.db.history_rows().await, env.db.audio_rows().await);
    let api = &env.api;

    // Search takes metacharacters literally.
    for (q, expected) in [
        ("%", vec!["100% sure"]),
        ("_", vec!["snake_case"]),
        (r"\", vec![r"back\slash"]),
        ("!", vec!["bang! here"]),
        ("' OR 1=1 --", vec!["' OR 1=1 --"]),
        ("%_", vec![]),
        ("PLAIN", vec!["plain text"]),
    ] {
        let body = api.ok(&path(&["search"]), &[("q", q)]).await;
        let got: Vec<&str> = body["results"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["content"].as_str().unwrap())
            .collect();
        assert_eq!(got, expected, "q={q:?}");
    }

    let huge = "x".repeat(100 * 1024);
    let long = "y".repeat(10 * 1024);
    let (s65, a33, q201) = ("s".repeat(65), "a".repeat(33), "q".repeat(201));
    let sql = "' OR 1=1 --";
    let sql_mac = "aa:bb:cc:dd:ee:ff' OR '1'='1";
    let bad_cursor = {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{sql}\n{sql}"))
    };
    type Case<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>);
    let refused: Vec<Case> = vec![
        // MACs.
        (path(&["devices", sql, "sessions"]), vec![]),
        (path(&["devices", sql_mac, "sessions"]), vec![]),
        (path(&["devices", "%", "sessions"]), vec![]),
        (path(&["devices", "_", "sessions"]), vec![]),
        (path(&["devices", r"\", "sessions"]), vec![]),
        (path(&["devices", &long, "sessions"]), vec![]),
        (path(&["devices", &long, "stats"]), vec![]),
        (vec!["api", "v2", "chat-history", sql], vec![]),
        (vec!["api", "v2", "chat-history", &long], vec![]),
        (path(&["search"]), vec![("q", "x"), ("mac", sql)]),
        (path(&["export"]), vec![("mac", sql_mac)]),
        // Ids and terms too long or malformed.
        (path(&["sessions", &long, "messages"]), vec![]),
        (path(&["sessions", &s65, "messages"]), vec![]),
        (path(&["audio", sql]), vec![]),
        (path(&["audio", "%"]), vec![]),
        (path(&["audio", &a33]), vec![]),
        (path(&["audio", &long]), vec![]),
        (path(&["search"]), vec![]),
        (path(&["search"]), vec![("q", "")]),
        (path(&["search"]), vec![("q", &long)]),
        (path(&["search"]), vec![("q", &q201)]),
        // Dates and ranges.
        (path(&["export"]), vec![("from", sql)]),
        (path(&["export"]), vec![("to", &long)]),
        (path(&["export"]), vec![("from", "2025-02-30")]),
        (path(&["export"]), vec![("from", "2025-02-02"), ("to", day)]),
        (path(&["export"]), vec![("format", "xml")]),
        (path(&["export"]), vec![("format", sql)]),
        (
            path(&["devices", HOSTILE_MAC, "stats"]),
            vec![("from", "yesterday")],
        ),
        (
            path(&["devices", HOSTILE_MAC, "stats"]),
            vec![("from", "2000-01-01"), ("to", "2025-01-01")],
        ),
        // Numbers and cursors.
        (path(&["devices"]), vec![("limit", "0")]),
        (path(&["devices"]), vec![("limit", "501")]),
        (path(&["devices"]), vec![("limit", "-1")]),
        (path(&["devices"]), vec![("limit", sql)]),
        (
            path(&["devices"]),
            vec![("limit", "99999999999999999999999")],
        ),
        (path(&["devices"]), vec![("offset", sql)]),
        (path(&["devices"]), vec![("offset", "-5")]),
        (
            path(&["sessions", "s1", "messages"]),
            vec![("after_id", "-1")],
        ),
        (
            path(&["sessions", "s1", "messages"]),
            vec![("after_id", sql)],
        ),
        (path(&["search"]), vec![("q", "x"), ("after_id", "1e3")]),
        (
            path(&["devices", HOSTILE_MAC, "sessions"]),
            vec![("before", sql)],
        ),
        (
            path(&["devices", HOSTILE_MAC, "sessions"]),
            vec![("before", &bad_cursor)],
        ),
        (
            path(&["devices", HOSTILE_MAC, "sessions"]),
            vec![("before", &long)],
        ),
    ];
    for (segments, query) in &refused {
        let (status, body) = api.get(segments, query).await;
        assert_eq!(
            status,
            StatusCode::BAD_REQUEST,
            "{:?} {:?}",
            segments
                .iter()
                .map(|s| &s[..s.len().min(40)])
                .collect::<Vec<_>>(),
            query
                .iter()
                .map(|(k, v)| (k, &v[..v.len().min(40)]))
                .collect::<Vec<_>>()
        );
        assert!(body["error"].is_string(), "{body}");
    }

    // Accepted but matching nothing.
    for segments in [
        path(&["sessions", sql, "messages"]),
        path(&["sessions", "%", "messages"]),
        path(&["sessions", "_", "messages"]),
        path(&["sessions", r"\", "messages"]),
        path(&["sessions", "s%", "messages"]),
    ] {
        let body = api.ok(&segments, &[]).await;
        assert_eq!(body["messages"], json!([]), "{segments:?}");
    }
    let (status, _) = api.get(&path(&["audio", &"b".repeat(32)]), &[]).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let empty = api
        .ok(
            &path(&["search"]),
            &[("q", "x"), ("mac", "aa:bb:cc:dd:ee:ff")],
        )
        .await;
    assert_eq!(empty["results"], json!([]));

    // 100 KB anywhere. HTTP clients refuse to build such a URL (over 64 KB), so these
    // go as raw requests: the server must answer 4xx (or close), never 5xx.
    let huge_targets = [
        format!("/api/history/devices/{huge}/sessions"),
        format!("/api/history/devices/{huge}/stats"),
        format!("/api/history/sessions/{huge}/messages"),
        format!("/api/history/audio/{huge}"),
        format!("/api/history/search?q={huge}"),
        format!("/api/history/export?from={huge}&to={huge}"),
        format!("/api/v2/chat-history/{huge}"),
    ];
    for target in &huge_targets {
        match raw_get(&env.gw, target).await {
            Some(status) => assert!(
                (400..500).contains(&status),
                "100 KB input: {status} for {}",
                &target[..40]
            ),
            None => eprintln!("100 KB input: connection closed without an answer"),
        }
    }
    // Just under the URI limit: through to the API's own checks.
    let big = "z".repeat(60 * 1024);
    for target in [
        format!("/api/history/sessions/{big}/messages"),
        format!("/api/history/search?q={big}"),
        format!("/api/history/export?to={big}"),
        format!("/api/history/devices/{big}/sessions"),
    ] {
        assert_eq!(
            raw_get(&env.gw, &target).await,
            Some(400),
            "{}",
            &target[..40]
        );
    }

    // Path segments that are not UTF-8 or hold control characters, a query string that
    // is not UTF-8.
    for raw in [
        "sessions/%FF%FE/messages",
        "sessions/a%0Ab/messages",
        "sessions/a%00b/messages",
        "devices/aa%00bb/sessions",
        "search?q=%FF%FE",
    ] {
        let response = api
            .client
            .get(format!("{}/api/history/{raw}", api.base))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        // Invalid UTF-8 in a query string decodes lossily (U+FFFD): a search for that.
        assert!(
            status == StatusCode::BAD_REQUEST
                || (raw.starts_with("search") && body["results"] == json!([])),
            "{raw}: {status} {body}"
        );
    }

    // Nothing changed, and everything still answers.
    assert_eq!(env.db.history_rows().await, history_before);
    assert_eq!(env.db.audio_rows().await, audio_before);
    let body = api.ok(&path(&["sessions", "s1", "messages"]), &[]).await;
    assert_eq!(body["messages"].as_array().unwrap().len(), rows.len());
    let response = api
        .send(
            api.url(&path(&["audio", &"A".repeat(32)]), &[]),
            Some(TOKEN),
        )
        .await;
    // Hex ids are compared as stored; MySQL's collation ignores case, SQLite's does not.
    assert!(matches!(
        response.status(),
        StatusCode::OK | StatusCode::NOT_FOUND
    ));
    let response = api
        .send(
            api.url(&path(&["audio", &"a".repeat(32)]), &[]),
            Some(TOKEN),
        )
        .await;
    assert_eq!(response.bytes().await.unwrap().as_ref(), wav.as_slice());
    env.finish().await;
}

#[tokio::test]
async fn hostile_input_is_refused_or_harmless_sqlite() {
    hostile_input_is_refused_or_harmless(Kind::Sqlite).await;
}

#[tokio::test]
async fn hostile_input_is_refused_or_harmless_mariadb() {
    hostile_input_is_refused_or_harmless(Kind::MariaDb).await;
}

// --- paging while rows are inserted --------------------------------------------------------

const PAGING_MAC: &str = "02:00:00:00:01:01";

fn ts(base_secs: u32, ms: u32) -> String {
    let total_ms = base_secs as u64 * 1000 + ms as u64;
    let (h, rest) = (total_ms / 3_600_000, total_ms % 3_600_000);
    let (m, rest) = (rest / 60_000, rest % 60_000);
    let (s, ms) = (rest / 1000, rest % 1000);
    format!("2025-03-01 {h:02}:{m:02}:{s:02}.{ms:03}")
}

async fn paging_is_stable_while_rows_are_inserted(kind: Kind) {
    let env = Env::start(kind, None).await;
    // 12 sessions of 10 rows; sessions 2k and 2k+1 start at the same instant, so the
    // session id breaks ties.
    let mut rows = Vec::new();
    for k in 0..12u32 {
        for i in 0..10u32 {
            rows.push(row(
                PAGING_MAC,
                &format!("s{k:02}"),
                1 + (i % 2) as i64,
                &format!("row {k} {i}"),
                &ts(3600 + (k / 2) * 60, i * 10),
            ));
        }
    }
    env.db.insert(&rows).await;
    let original_ids = env.db.ids_of_session("s00").await;
    assert_eq!(original_ids.len(), 10);

    // Meanwhile: new sessions (later), and later rows in existing sessions.
    let stop = Arc::new(AtomicBool::new(false));
    let inserter = {
        let (db, stop) = (env.db.clone(), stop.clone());
        tokio::spawn(async move {
            let mut n = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let late = ts(7200 + n, 0);
                db.insert(&[
                    row(PAGING_MAC, &format!("new{n:04}"), 1, "new row", &late),
                    row(PAGING_MAC, "s00", 2, "row late", &late),
                    row(PAGING_MAC, &format!("s{:02}", n % 12), 1, "row late", &late),
                ])
                .await;
                n += 1;
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
            n
        })
    };
    let api = &env.api;

    // Sessions, 7 per page.
    let mut seen = Vec::new();
    let mut before: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut query = vec![("limit", "7")];
        if let Some(b) = &before {
            query.push(("before", b.as_str()));
        }
        let body = api
            .ok(&path(&["devices", PAGING_MAC, "sessions"]), &query)
            .await;
        pages += 1;
        let page = body["sessions"].as_array().unwrap();
        assert!(page.len() <= 7);
        seen.extend(
            page.iter()
                .map(|s| s["session_id"].as_str().unwrap().to_owned()),
        );
        match body["next"].as_str() {
            Some(next) => before = Some(next.to_owned()),
            None => break,
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let originals: Vec<String> = seen
        .iter()
        .filter(|s| s.starts_with('s'))
        .cloned()
        .collect();
    let expected: Vec<String> = (0..12).rev().map(|k| format!("s{k:02}")).collect();
    assert_eq!(
        originals, expected,
        "each session once, newest first ({pages} pages)"
    );
    let mut unique = seen.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), seen.len(), "no session twice");

    // Messages of one session, 7 per page.
    let mut ids = Vec::new();
    let mut after = 0i64;
    loop {
        let body = api
            .ok(
                &path(&["sessions", "s00", "messages"]),
                &[("limit", "7"), ("after_id", &after.to_string())],
            )
            .await;
        ids.extend(
            body["messages"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m["id"].as_i64().unwrap()),
        );
        match body["next"].as_i64() {
            Some(next) => after = next,
            None => break,
        }
        if ids.len() > 10_000 {
            panic!("paging does not end");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "in order, none twice");
    assert_eq!(
        ids[..10],
        original_ids[..],
        "every original message once, first"
    );

    // Search results, 7 per page.
    let mut found = Vec::new();
    let mut after = 0i64;
    loop {
        let body = api
            .ok(
                &path(&["search"]),
                &[
                    ("q", "row "),
                    ("mac", PAGING_MAC),
                    ("limit", "7"),
                    ("after_id", &after.to_string()),
                ],
            )
            .await;
        found.extend(
            body["results"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|m| m["content"].as_str().unwrap().starts_with("row "))
                .filter(|m| m["content"] != "row late")
                .map(|m| m["content"].as_str().unwrap().to_owned()),
        );
        match body["next"].as_i64() {
            Some(next) => after = next,
            None => break,
        }
        if found.len() > 10_000 {
            panic!("paging does not end");
        }
    }
    stop.store(true, Ordering::Relaxed);
    let inserted = inserter.await.unwrap();
    let expected: Vec<String> = rows.iter().map(|r| r.content.clone()).collect();
    assert_eq!(found, expected, "every original row once, in order");
    eprintln!("{kind:?}: {inserted} insert rounds ran while paging");
    assert!(inserted > 0);
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paging_is_stable_while_rows_are_inserted_sqlite() {
    paging_is_stable_while_rows_are_inserted(Kind::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paging_is_stable_while_rows_are_inserted_mariadb() {
    paging_is_stable_while_rows_are_inserted(Kind::MariaDb).await;
}

// --- export --------------------------------------------------------------------------------

fn export_rows(n: usize) -> Vec<Row> {
    (0..n)
        .map(|i| {
            let day = i % 10;
            let content = if i % 10 == 3 {
                format!("row {i}: he said \"hi, there\",\nthen left\r\n")
            } else {
                format!("row {i}")
            };
            Row {
                mac: format!("02:00:00:00:02:{:02x}", i % 10),
                agent: None,
                session: format!("sess-{}", i / 100),
                chat_type: 1 + (i % 3) as i64,
                content,
                audio_id: None,
                created_at: format!(
                    "2025-04-{:02} {:02}:{:02}:{:02}.{:03}",
                    day + 1,
                    (i / 3600) % 24,
                    (i / 60) % 60,
                    i % 60,
                    i % 1000
                ),
            }
        })
        .collect()
}

/// A minimal RFC 4180 reader: records of fields.
fn parse_csv(text: &str) -> Vec<Vec<String>> {
    let mut records = Vec::new();
    let mut record = Vec::new();
    let mut field = String::new();
    let mut chars = text.chars().peekable();
    let mut quoted = false;
    while let Some(c) = chars.next() {
        if quoted {
            match c {
                '"' if chars.peek() == Some(&'"') => {
                    chars.next();
                    field.push('"');
                }
                '"' => quoted = false,
                c => field.push(c),
            }
            continue;
        }
        match c {
            '"' => quoted = true,
            ',' => record.push(std::mem::take(&mut field)),
            '\r' if chars.peek() == Some(&'\n') => {}
            '\n' => {
                record.push(std::mem::take(&mut field));
                records.push(std::mem::take(&mut record));
            }
            c => field.push(c),
        }
    }
    assert!(
        !quoted && field.is_empty() && record.is_empty(),
        "ends with a complete record"
    );
    records
}

/// Streams an export, counting CSV records (outside quotes) or JSON lines as they come.
async fn stream_export(
    api: &Api,
    query: &[(&str, &str)],
) -> (reqwest::header::HeaderMap, u64, u64) {
    let mut response = api
        .send(api.url(&path(&["export"]), query), Some(TOKEN))
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let headers = response.headers().clone();
    let jsonl = query.contains(&("format", "jsonl"));
    let (mut records, mut bytes, mut quoted) = (0u64, 0u64, false);
    let mut partial = Vec::new();
    while let Some(chunk) = response.chunk().await.unwrap() {
        bytes += chunk.len() as u64;
        if jsonl {
            partial.extend_from_slice(&chunk);
            let mut start = 0;
            while let Some(end) = partial[start..].iter().position(|&b| b == b'\n') {
                let line = &partial[start..start + end];
                let v: Value = serde_json::from_slice(line).unwrap();
                assert!(v["id"].is_i64());
                records += 1;
                start += end + 1;
            }
            partial.drain(..start);
        } else {
            for &b in chunk.iter() {
                match b {
                    b'"' => quoted = !quoted,
                    b'\n' if !quoted => records += 1,
                    _ => {}
                }
            }
        }
    }
    assert!(partial.is_empty() && !quoted);
    (headers, records, bytes)
}

#[tokio::test]
async fn export_streams_100k_rows_from_mariadb_as_csv_and_jsonl() {
    const N: usize = 100_000;
    let env = Env::start(Kind::MariaDb, None).await;
    let rows = export_rows(N);
    let t = Instant::now();
    env.db.insert(&rows).await;
    eprintln!("inserted {N} rows in {:?}", t.elapsed());

    let t = Instant::now();
    let (headers, records, bytes) = stream_export(&env.api, &[("format", "csv")]).await;
    eprintln!(
        "CSV export of {N} rows: {:?}, {:.1} MB",
        t.elapsed(),
        bytes as f64 / 1e6
    );
    assert_eq!(records, N as u64 + 1, "header + one record per row");
    assert_eq!(headers["content-type"], "text/csv; charset=utf-8");
    assert_eq!(
        headers["content-disposition"],
        "attachment; filename=\"chat-history.csv\""
    );
    assert!(
        headers.get("content-length").is_none(),
        "streamed, not buffered"
    );

    let t = Instant::now();
    let (headers, records, bytes) = stream_export(&env.api, &[("format", "jsonl")]).await;
    eprintln!(
        "JSONL export of {N} rows: {:?}, {:.1} MB",
        t.elapsed(),
        bytes as f64 / 1e6
    );
    assert_eq!(records, N as u64);
    assert_eq!(headers["content-type"], "application/x-ndjson");

    // One device over three days, read back field by field.
    let mac = "02:00:00:00:02:03";
    let query = [
        ("format", "csv"),
        ("mac", mac),
        ("from", "2025-04-03"),
        ("to", "2025-04-05"),
    ];
    let response = env
        .api
        .send(env.api.url(&path(&["export"]), &query), Some(TOKEN))
        .await;
    assert_eq!(
        response.headers()["content-disposition"],
        "attachment; filename=\"chat-history-020000000203-from-2025-04-03-to-2025-04-05.csv\""
    );
    let csv = parse_csv(&response.text().await.unwrap());
    let expected: Vec<&Row> = rows
        .iter()
        .filter(|r| r.mac == mac && ("2025-04-03".."2025-04-06").contains(&&r.created_at[..10]))
        .collect();
    assert!(!expected.is_empty());
    assert_eq!(
        csv[0],
        [
            "id",
            "mac_address",
            "agent_id",
            "session_id",
            "chat_type",
            "content",
            "audio_id",
            "created_at"
        ]
    );
    assert_eq!(csv.len() - 1, expected.len());
    for (record, r) in csv[1..].iter().zip(&expected) {
        assert_eq!(record[1], r.mac);
        assert_eq!(record[3], r.session);
        assert_eq!(record[4], r.chat_type.to_string());
        assert_eq!(record[5], r.content);
        assert_eq!(record[7], r.created_at);
    }
    env.finish().await;
}

#[tokio::test]
async fn export_from_sqlite_matches_the_rows() {
    const N: usize = 2_500;
    let env = Env::start(Kind::Sqlite, None).await;
    let rows = export_rows(N);
    env.db.insert(&rows).await;
    let response = env
        .api
        .send(env.api.url(&path(&["export"]), &[]), Some(TOKEN))
        .await;
    let csv = parse_csv(&response.text().await.unwrap());
    assert_eq!(csv.len(), N + 1);
    for (record, r) in csv[1..].iter().zip(&rows) {
        assert_eq!(
            (&record[1], &record[3], &record[5], &record[7]),
            (&r.mac, &r.session, &r.content, &r.created_at)
        );
    }
    let response = env
        .api
        .send(
            env.api.url(
                &path(&["export"]),
                &[("format", "jsonl"), ("to", "2025-04-01")],
            ),
            Some(TOKEN),
        )
        .await;
    let text = response.text().await.unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let expected: Vec<&Row> = rows
        .iter()
        .filter(|r| r.created_at.starts_with("2025-04-01"))
        .collect();
    assert_eq!(lines.len(), expected.len());
    for (line, r) in lines.iter().zip(expected) {
        assert_eq!(line["content"], r.content.as_str());
        assert_eq!(line["chat_type"], r.chat_type);
    }
    env.finish().await;
}

// --- statistics ------------------------------------------------------------------------------

/// day, sessions, messages, user, assistant, tool, audio messages, audio seconds.
type DayRow = (String, i64, i64, i64, i64, i64, i64, f64);

async fn stats_count_days_and_audio_seconds(kind: Kind) {
    let env = Env::start(kind, None).await;
    let mac = "02:00:00:00:03:01";
    let other = "02:00:00:00:03:02";
    let mut audio = HashMap::new();
    for (name, seconds) in [
        ("two", 2.0),
        ("half", 0.5),
        ("one_half", 1.5),
        ("other", 3.0),
    ] {
        let id = new_id();
        let wav = encode_wav(&vec![0i16; (16_000.0 * seconds) as usize], 16_000);
        env.db.insert_audio(&id, &wav).await;
        audio.insert(name, id);
    }
    let with_audio = |mut r: Row, name: &str| {
        r.audio_id = Some(audio[name].clone());
        r
    };
    env.db
        .insert(&[
            // Before the range.
            row(mac, "a0", 1, "early", "2025-04-30 23:59:59.999"),
            // Day 1: sessions a and b.
            with_audio(row(mac, "a", 1, "q", "2025-05-01 08:00:00.000"), "two"),
            with_audio(row(mac, "a", 2, "r", "2025-05-01 08:00:01.000"), "half"),
            row(mac, "a", 3, "[{\"tool\":1}]", "2025-05-01 08:00:02.000"),
            row(mac, "b", 1, "q", "2025-05-01 23:59:59.999"),
            // Day 2: session b goes on.
            with_audio(row(mac, "b", 1, "q", "2025-05-02 00:00:10.000"), "one_half"),
            row(mac, "b", 2, "r", "2025-05-02 00:00:11.000"),
            // Day 3: one message at its very start. Day 4: after the range.
            row(mac, "c", 1, "q", "2025-05-03 00:00:00.000"),
            row(mac, "d", 1, "q", "2025-05-04 00:00:00.000"),
            // Another device on the same days.
            with_audio(row(other, "x", 1, "q", "2025-05-01 09:00:00.000"), "other"),
        ])
        .await;
    let stats = env
        .api
        .ok(
            &path(&["devices", "02_00_00_00_03_01", "stats"]),
            &[("from", "2025-05-01"), ("to", "2025-05-03")],
        )
        .await;
    let days: Vec<DayRow> = stats["days"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["day"].as_str().unwrap().to_owned(),
                d["sessions"].as_i64().unwrap(),
                d["messages"].as_i64().unwrap(),
                d["user"].as_i64().unwrap(),
                d["assistant"].as_i64().unwrap(),
                d["tool"].as_i64().unwrap(),
                d["audio_messages"].as_i64().unwrap(),
                d["audio_seconds"].as_f64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        days,
        [
            ("2025-05-01".to_owned(), 2, 4, 2, 1, 1, 2, 2.5),
            ("2025-05-02".to_owned(), 1, 2, 1, 1, 0, 1, 1.5),
            ("2025-05-03".to_owned(), 1, 1, 1, 0, 0, 0, 0.0),
        ]
    );
    assert_eq!(stats["totals"]["messages"], 7);
    assert_eq!(stats["totals"]["audio_seconds"], 4.0);
    assert_eq!(
        (&stats["from"], &stats["to"]),
        (&json!("2025-05-01"), &json!("2025-05-03"))
    );

    // A range with nothing in it: every day, all zero.
    let empty = env
        .api
        .ok(
            &path(&["devices", mac, "stats"]),
            &[("from", "2024-02-27"), ("to", "2024-03-01")],
        )
        .await;
    let days: Vec<&str> = empty["days"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["day"].as_str().unwrap())
        .collect();
    assert_eq!(
        days,
        ["2024-02-27", "2024-02-28", "2024-02-29", "2024-03-01"]
    );
    assert_eq!(empty["totals"]["messages"], 0);
    env.finish().await;
}

#[tokio::test]
async fn stats_count_days_and_audio_seconds_sqlite() {
    stats_count_days_and_audio_seconds(Kind::Sqlite).await;
}

#[tokio::test]
async fn stats_count_days_and_audio_seconds_mariadb() {
    stats_count_days_and_audio_seconds(Kind::MariaDb).await;
}

fn day_rows(stats: &Value) -> Vec<DayRow> {
    stats["days"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["day"].as_str().unwrap().to_owned(),
                d["sessions"].as_i64().unwrap(),
                d["messages"].as_i64().unwrap(),
                d["user"].as_i64().unwrap(),
                d["assistant"].as_i64().unwrap(),
                d["tool"].as_i64().unwrap(),
                d["audio_messages"].as_i64().unwrap(),
                d["audio_seconds"].as_f64().unwrap(),
            )
        })
        .collect()
}

/// mac, sessions, messages, audio seconds.
type TopRow = (String, i64, i64, f64);

fn top_rows(stats: &Value) -> Vec<TopRow> {
    stats["top_devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            assert_eq!(d.as_object().unwrap().len(), 4, "{d}");
            (
                d["mac_address"].as_str().unwrap().to_owned(),
                d["sessions"].as_i64().unwrap(),
                d["messages"].as_i64().unwrap(),
                d["audio_seconds"].as_f64().unwrap(),
            )
        })
        .collect()
}

async fn fleet_stats_count_days_and_rank_devices(kind: Kind) {
    let env = Env::start(kind, None).await;
    let (a, b, c) = (
        "02:00:00:00:04:0a",
        "02:00:00:00:04:0b",
        "02:00:00:00:04:0c",
    );
    let mut audio = HashMap::new();
    for (name, seconds) in [("two", 2.0), ("half", 0.5), ("three", 3.0)] {
        let id = new_id();
        let wav = encode_wav(&vec![0i16; (16_000.0 * seconds) as usize], 16_000);
        env.db.insert_audio(&id, &wav).await;
        audio.insert(name, id);
    }
    let with_audio = |mut r: Row, name: &str| {
        r.audio_id = Some(audio[name].clone());
        r
    };
    env.db
        .insert(&[
            // Before and after the range: never counted.
            row(a, "early", 1, "q", "2025-05-31 23:59:59.999"),
            row(c, "late", 1, "q", "2025-06-05 00:00:00.000"),
            row(c, "late", 2, "r", "2025-06-05 00:00:01.000"),
            // Day 1: a (2 sessions), b (1). b uses a session id a uses too: two sessions.
            with_audio(row(a, "s1", 1, "q", "2025-06-01 00:00:00.000"), "two"),
            row(a, "s1", 2, "r", "2025-06-01 00:00:01.000"),
            row(a, "s1", 3, "[{\"tool\":1}]", "2025-06-01 00:00:02.000"),
            row(a, "s2", 1, "q", "2025-06-01 10:00:00.000"),
            with_audio(row(b, "s1", 1, "q", "2025-06-01 11:00:00.000"), "three"),
            row(b, "s1", 2, "r", "2025-06-01 11:00:01.000"),
            // Day 2: nothing. Day 3: a's s2 goes on; c once.
            with_audio(row(a, "s2", 2, "r", "2025-06-03 09:00:00.000"), "half"),
            row(c, "t1", 1, "q", "2025-06-03 23:59:59.999"),
            // Day 4: b catches up with a (5 messages each; a comes first, by MAC).
            row(b, "s9", 1, "q", "2025-06-04 00:00:00.000"),
            row(b, "s9", 2, "r", "2025-06-04 00:00:01.000"),
            row(b, "s9", 1, "q", "2025-06-04 12:00:00.000"),
        ])
        .await;
    let range = [("from", "2025-06-01"), ("to", "2025-06-04")];
    let stats = env.api.ok(&path(&["stats"]), &range).await;
    assert_eq!(
        (&stats["from"], &stats["to"]),
        (&json!("2025-06-01"), &json!("2025-06-04"))
    );
    assert_eq!(
        day_rows(&stats),
        [
            ("2025-06-01".to_owned(), 3, 6, 3, 2, 1, 2, 5.0),
            ("2025-06-02".to_owned(), 0, 0, 0, 0, 0, 0, 0.0),
            ("2025-06-03".to_owned(), 2, 2, 1, 1, 0, 1, 0.5),
            ("2025-06-04".to_owned(), 1, 3, 2, 1, 0, 0, 0.0),
        ]
    );
    let totals = &stats["totals"];
    assert_eq!(
        (
            &totals["sessions"],
            &totals["messages"],
            &totals["user"],
            &totals["assistant"],
            &totals["tool"],
            &totals["audio_messages"],
            &totals["audio_seconds"],
        ),
        (
            &json!(6),
            &json!(11),
            &json!(6),
            &json!(4),
            &json!(1),
            &json!(3),
            &json!(5.5)
        )
    );
    assert_eq!(
        top_rows(&stats),
        [
            (a.to_owned(), 2, 5, 2.5),
            (b.to_owned(), 2, 5, 3.0),
            (c.to_owned(), 1, 1, 0.0),
        ]
    );
    // The fleet's days are the sum of its devices' days.
    let mut sum: Vec<DayRow> = day_rows(&stats)
        .into_iter()
        .map(|d| (d.0, 0, 0, 0, 0, 0, 0, 0.0))
        .collect();
    for mac in [a, b, c] {
        let device = env.api.ok(&path(&["devices", mac, "stats"]), &range).await;
        for (total, d) in sum.iter_mut().zip(day_rows(&device)) {
            total.1 += d.1;
            total.2 += d.2;
            total.3 += d.3;
            total.4 += d.4;
            total.5 += d.5;
            total.6 += d.6;
            total.7 += d.7;
        }
    }
    assert_eq!(sum, day_rows(&stats));

    // `top` limits the list; one day narrows it.
    let top1 = env
        .api
        .ok(&path(&["stats"]), &[range[0], range[1], ("top", "1")])
        .await;
    assert_eq!(top_rows(&top1), [(a.to_owned(), 2, 5, 2.5)]);
    assert_eq!(top1["days"], stats["days"]);
    let day4 = env
        .api
        .ok(
            &path(&["stats"]),
            &[("from", "2025-06-04"), ("to", "2025-06-04")],
        )
        .await;
    assert_eq!(top_rows(&day4), [(b.to_owned(), 1, 3, 0.0)]);

    // A range with nothing in it: every day at zero, no devices.
    let empty = env
        .api
        .ok(
            &path(&["stats"]),
            &[("from", "2024-02-28"), ("to", "2024-03-01")],
        )
        .await;
    let days: Vec<String> = day_rows(&empty).into_iter().map(|d| d.0).collect();
    assert_eq!(days, ["2024-02-28", "2024-02-29", "2024-03-01"]);
    assert!(day_rows(&empty).iter().all(|d| d.2 == 0 && d.1 == 0));
    assert_eq!(empty["totals"]["messages"], 0);
    assert_eq!(empty["top_devices"], json!([]));
    env.finish().await;
}

#[tokio::test]
async fn fleet_stats_count_days_and_rank_devices_sqlite() {
    fleet_stats_count_days_and_rank_devices(Kind::Sqlite).await;
}

#[tokio::test]
async fn fleet_stats_count_days_and_rank_devices_mariadb() {
    fleet_stats_count_days_and_rank_devices(Kind::MariaDb).await;
}

async fn fleet_stats_top_devices_are_limited_and_ordered(kind: Kind) {
    let env = Env::start(kind, None).await;
    // 30 devices: device i has (i % 7) + 1 messages in session "s", so there are ties,
    // each broken by MAC; listed in reverse so insertion order cannot help.
    let mut rows = Vec::new();
    let mut expected: Vec<(String, i64)> = Vec::new();
    for i in (0..30u32).rev() {
        let mac = format!("02:00:00:00:05:{i:02x}");
        let n = i64::from(i % 7) + 1;
        for m in 0..n {
            rows.push(row(
                &mac,
                "s",
                1 + m % 2,
                "x",
                &format!("2025-07-{:02} 12:00:{m:02}.000", 1 + i % 3),
            ));
        }
        expected.push((mac, n));
    }
    env.db.insert(&rows).await;
    expected.sort_by(|x, y| y.1.cmp(&x.1).then_with(|| x.0.cmp(&y.0)));
    let range = [("from", "2025-07-01"), ("to", "2025-07-03")];
    let listed = |stats: &Value| -> Vec<(String, i64)> {
        top_rows(stats)
            .into_iter()
            .map(|(mac, sessions, messages, _)| {
                assert_eq!(sessions, 1);
                (mac, messages)
            })
            .collect()
    };
    // Default: 10.
    let stats = env.api.ok(&path(&["stats"]), &range).await;
    assert_eq!(listed(&stats), expected[..10]);
    assert_eq!(stats["totals"]["messages"], rows.len());
    for top in [1usize, 4, 29, 30, 100] {
        let n = top.to_string();
        let stats = env
            .api
            .ok(&path(&["stats"]), &[range[0], range[1], ("top", &n)])
            .await;
        assert_eq!(listed(&stats), expected[..top.min(30)], "top={top}");
    }
    env.finish().await;
}

#[tokio::test]
async fn fleet_stats_top_devices_are_limited_and_ordered_sqlite() {
    fleet_stats_top_devices_are_limited_and_ordered(Kind::Sqlite).await;
}

#[tokio::test]
async fn fleet_stats_top_devices_are_limited_and_ordered_mariadb() {
    fleet_stats_top_devices_are_limited_and_ordered(Kind::MariaDb).await;
}

// --- the device list and the fleet statistics, against the statements they replaced -----

// The statements these endpoints ran before they were made fast (one GROUP BY over the
// table or the range each). The answers must not change.
const GROUPED_DEVICES_MY: &str = "SELECT mac_address, MAX(agent_id) AS agent_id, \
     COUNT(DISTINCT session_id) AS sessions, COUNT(*) AS messages, \
     LEFT(DATE_FORMAT(MAX(created_at), '%Y-%m-%d %H:%i:%s.%f'), 23) AS last_at \
     FROM ai_agent_chat_history WHERE mac_address IS NOT NULL \
     GROUP BY mac_address ORDER BY MAX(created_at) DESC, mac_address LIMIT ? OFFSET ?";
const GROUPED_DEVICES_LITE: &str = "SELECT mac_address, MAX(agent_id) AS agent_id, \
     COUNT(DISTINCT session_id) AS sessions, COUNT(*) AS messages, \
     MAX(created_at) AS last_at \
     FROM ai_agent_chat_history WHERE mac_address IS NOT NULL \
     GROUP BY mac_address ORDER BY MAX(created_at) DESC, mac_address LIMIT ? OFFSET ?";
const GROUPED_FLEET_DAYS_MY: &str = "SELECT DATE_FORMAT(h.created_at, '%Y-%m-%d') AS day, \
     COUNT(DISTINCT h.mac_address, h.session_id) AS sessions, COUNT(*) AS messages, \
     COUNT(CASE WHEN h.chat_type = 1 THEN 1 END) AS user_messages, \
     COUNT(CASE WHEN h.chat_type = 2 THEN 1 END) AS assistant_messages, \
     COUNT(CASE WHEN h.chat_type = 3 THEN 1 END) AS tool_messages, \
     COUNT(a.id) AS audio_messages, \
     CAST(COALESCE(SUM(CASE WHEN LENGTH(a.audio) > 44 THEN LENGTH(a.audio) - 44 ELSE 0 END), 0) \
     AS SIGNED) AS audio_bytes \
     FROM ai_agent_chat_history h LEFT JOIN ai_agent_chat_audio a ON a.id = h.audio_id \
     WHERE h.created_at >= ? AND h.created_at < ? \
     GROUP BY DATE_FORMAT(h.created_at, '%Y-%m-%d') ORDER BY day";
const GROUPED_FLEET_DAYS_LITE: &str = "SELECT substr(h.created_at, 1, 10) AS day, \
     COUNT(DISTINCT h.mac_address || ' ' || h.session_id) AS sessions, COUNT(*) AS messages, \
     COUNT(CASE WHEN h.chat_type = 1 THEN 1 END) AS user_messages, \
     COUNT(CASE WHEN h.chat_type = 2 THEN 1 END) AS assistant_messages, \
     COUNT(CASE WHEN h.chat_type = 3 THEN 1 END) AS tool_messages, \
     COUNT(a.id) AS audio_messages, \
     COALESCE(SUM(CASE WHEN LENGTH(a.audio) > 44 THEN LENGTH(a.audio) - 44 ELSE 0 END), 0) \
     AS audio_bytes \
     FROM ai_agent_chat_history h LEFT JOIN ai_agent_chat_audio a ON a.id = h.audio_id \
     WHERE h.created_at >= ? AND h.created_at < ? \
     GROUP BY substr(h.created_at, 1, 10) ORDER BY day";
const GROUPED_TOP_MY: &str = "SELECT h.mac_address, COUNT(DISTINCT h.session_id) AS sessions, \
     COUNT(*) AS messages, \
     CAST(COALESCE(SUM(CASE WHEN LENGTH(a.audio) > 44 THEN LENGTH(a.audio) - 44 ELSE 0 END), 0) \
     AS SIGNED) AS audio_bytes \
     FROM ai_agent_chat_history h LEFT JOIN ai_agent_chat_audio a ON a.id = h.audio_id \
     WHERE h.created_at >= ? AND h.created_at < ? \
     GROUP BY h.mac_address HAVING h.mac_address IS NOT NULL \
     ORDER BY messages DESC, CAST(h.mac_address AS BINARY) LIMIT ?";
const GROUPED_TOP_LITE: &str = "SELECT h.mac_address, COUNT(DISTINCT h.session_id) AS sessions, \
     COUNT(*) AS messages, \
     COALESCE(SUM(CASE WHEN LENGTH(a.audio) > 44 THEN LENGTH(a.audio) - 44 ELSE 0 END), 0) \
     AS audio_bytes \
     FROM ai_agent_chat_history h LEFT JOIN ai_agent_chat_audio a ON a.id = h.audio_id \
     WHERE h.created_at >= ? AND h.created_at < ? AND h.mac_address IS NOT NULL \
     GROUP BY h.mac_address ORDER BY messages DESC, h.mac_address LIMIT ?";

/// A bound value of a reference statement.
#[derive(Clone, Copy)]
enum Bind<'a> {
    Int(i64),
    Text(&'a str),
}

/// One cell as JSON: an integer, a string, or null.
macro_rules! cell {
    ($row:expr, $i:expr) => {{
        let (row, i) = ($row, $i);
        if let Ok(v) = row.try_get::<Option<i64>, _>(i) {
            v.map_or(Value::Null, Value::from)
        } else if let Ok(v) = row.try_get::<Option<String>, _>(i) {
            v.map_or(Value::Null, Value::from)
        } else {
            let v: Option<Vec<u8>> = row.try_get(i).unwrap();
            v.map_or(Value::Null, |b| Value::from(String::from_utf8(b).unwrap()))
        }
    }};
}

impl Db {
    /// Rows of a statement (the MySQL or the SQLite one), each a list of JSON cells.
    async fn rows(&self, mysql: &str, sqlite: &str, binds: &[Bind<'_>]) -> Vec<Vec<Value>> {
        use sqlx::Row as _;
        macro_rules! run {
            ($pool:expr, $sql:expr) => {{
                let mut q = sqlx::query(AssertSqlSafe($sql.to_owned()));
                for b in binds {
                    q = match *b {
                        Bind::Int(v) => q.bind(v),
                        Bind::Text(v) => q.bind(v),
                    };
                }
                q.fetch_all($pool)
                    .await
                    .unwrap()
                    .iter()
                    .map(|r| (0..r.len()).map(|i| cell!(r, i)).collect())
                    .collect()
            }};
        }
        match self {
            Db::MySql(pool) => run!(pool, mysql),
            Db::Sqlite(pool) => run!(pool, sqlite),
        }
    }

    /// A message without a device (manager-api's column allows it).
    async fn insert_without_mac(&self, session: &str, created_at: &str) {
        const SQL: &str = "INSERT INTO ai_agent_chat_history \
             (mac_address, agent_id, session_id, chat_type, content, audio_id, created_at, updated_at) \
             VALUES (NULL, NULL, ?, 1, 'no device', NULL, ?, ?)";
        match self {
            Db::MySql(pool) => {
                sqlx::query(SQL)
                    .bind(session)
                    .bind(created_at)
                    .bind(created_at)
                    .execute(pool)
                    .await
                    .unwrap();
            }
            Db::Sqlite(pool) => {
                sqlx::query(SQL)
                    .bind(session)
                    .bind(created_at)
                    .bind(created_at)
                    .execute(pool)
                    .await
                    .unwrap();
            }
        }
    }
}

/// 40 devices over six days (2025-08-01 .. 2025-08-06), deterministic: agents that change
/// (and are sometimes missing), session ids shared between devices, sessions that go on
/// past midnight, tool messages, audio of several lengths; and four devices whose newest
/// message is at the same instant, the first of 2025-08-07.
fn fleet_rows(audio_ids: &[String]) -> Vec<Row> {
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let mut rows = Vec::new();
    for d in 0..40u64 {
        let mac = format!("02:00:00:00:06:{d:02x}");
        let sessions = 1 + next(6);
        for k in 0..sessions {
            // Shared ids: "s0".."s3" are used by many devices.
            let session = format!("s{}", (d + k) % 4 + 4 * (k / 4));
            let day = 1 + next(6);
            // Some sessions start just before midnight and go on.
            let mut secs = if next(5) == 0 {
                86_400 - 30
            } else {
                next(86_000)
            };
            for m in 0..(1 + next(9)) {
                secs += 1 + next(20);
                let (day, s) = (day + secs / 86_400, secs % 86_400);
                if day > 6 {
                    break;
                }
                let agent = match (d % 4, m % 3) {
                    (0, _) => None,
                    (1, _) => Some(format!("agent-{d:02}")),
                    (2, 0) => None,
                    (2, _) => Some(format!("agent-{:02}", 40 + m)),
                    _ => Some(format!("agent-{:02}", 80 - m)),
                };
                let mut r = row(
                    &mac,
                    &session,
                    [1, 2, 1, 2, 3][(m % 5) as usize],
                    "x",
                    &format!(
                        "2025-08-{day:02} {:02}:{:02}:{:02}.{:03}",
                        s / 3600,
                        s / 60 % 60,
                        s % 60,
                        next(1000)
                    ),
                );
                r.agent = agent;
                if m % 2 == 0 && next(3) > 0 {
                    r.audio_id = Some(audio_ids[next(audio_ids.len() as u64) as usize].clone());
                }
                rows.push(r);
            }
        }
    }
    // Four devices whose newest message is at the same instant: by MAC, in reverse.
    for d in [0x23u64, 0x21, 0x22, 0x20] {
        let mut r = row(
            &format!("02:00:00:00:06:{d:02x}"),
            "tie",
            1,
            "x",
            "2025-08-07 00:00:00.000",
        );
        r.agent = Some("agent-tie".into());
        rows.push(r);
    }
    rows
}

async fn the_device_list_and_fleet_stats_answer_as_before(kind: Kind) {
    let env = Env::start(kind, None).await;
    let mut audio_ids = Vec::new();
    for seconds in [0.5, 1.0, 2.25, 3.0] {
        let id = new_id();
        let wav = encode_wav(&vec![0i16; (16_000.0 * seconds) as usize], 16_000);
        env.db.insert_audio(&id, &wav).await;
        audio_ids.push(id);
    }
    let rows = fleet_rows(&audio_ids);
    env.db.insert(&rows).await;
    // Messages without a device: in the days' counts, never a device.
    env.db
        .insert_without_mac("orphan", "2025-08-03 10:00:00.000")
        .await;
    env.db
        .insert_without_mac("orphan", "2025-08-07 10:00:00.000")
        .await;
    let db = &env.db;

    // The device list, by hand: newest message first, then by MAC; the highest agent id.
    let mut by_mac: HashMap<&str, Vec<&Row>> = HashMap::new();
    for r in &rows {
        by_mac.entry(r.mac.as_str()).or_default().push(r);
    }
    let mut expected: Vec<Value> = by_mac
        .iter()
        .map(|(mac, rs)| {
            let mut sessions: Vec<&str> = rs.iter().map(|r| r.session.as_str()).collect();
            sessions.sort();
            sessions.dedup();
            json!({
                "mac_address": mac,
                "agent_id": rs.iter().filter_map(|r| r.agent.clone()).max(),
                "sessions": sessions.len(),
                "messages": rs.len(),
                "last_at": rs.iter().map(|r| r.created_at.clone()).max(),
            })
        })
        .collect();
    let key = |d: &Value| {
        (
            std::cmp::Reverse(d["last_at"].as_str().unwrap().to_owned()),
            d["mac_address"].as_str().unwrap().to_owned(),
        )
    };
    expected.sort_by_key(key);
    assert_eq!(expected.len(), 40);
    let tied: Vec<&str> = expected[..4]
        .iter()
        .map(|d| d["mac_address"].as_str().unwrap())
        .collect();
    assert_eq!(
        tied,
        [
            "02:00:00:00:06:20",
            "02:00:00:00:06:21",
            "02:00:00:00:06:22",
            "02:00:00:00:06:23"
        ]
    );
    let all = env.api.ok(&path(&["devices"]), &[("limit", "500")]).await;
    assert_eq!(all["devices"], json!(expected));
    assert!(
        expected
            .iter()
            .any(|d| d["agent_id"].is_null() && d["messages"].as_i64() > Some(0))
    );

    // Every page, as the grouped statement gives it.
    let as_rows = |body: &Value| -> Vec<Vec<Value>> {
        body["devices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| {
                ["mac_address", "agent_id", "sessions", "messages", "last_at"]
                    .iter()
                    .map(|k| d[*k].clone())
                    .collect()
            })
            .collect()
    };
    for limit in [1i64, 3, 7, 50] {
        let mut paged = Vec::new();
        for offset in (0..=42i64).step_by(if limit == 50 { 42 } else { 1 }) {
            let (l, o) = (limit.to_string(), offset.to_string());
            let body = env
                .api
                .ok(&path(&["devices"]), &[("limit", &l), ("offset", &o)])
                .await;
            let reference = db
                .rows(
                    GROUPED_DEVICES_MY,
                    GROUPED_DEVICES_LITE,
                    &[Bind::Int(limit), Bind::Int(offset)],
                )
                .await;
            assert_eq!(as_rows(&body), reference, "limit {limit} offset {offset}");
            if offset % limit == 0 {
                paged.extend(as_rows(&body));
            }
        }
        assert_eq!(paged, as_rows(&all), "pages of {limit}");
    }

    // Fleet statistics over several ranges, and the top devices at several sizes.
    let day_start = |d: &str| format!("{d} 00:00:00.000");
    let next_day = |d: &str| {
        let n: u32 = d[8..].parse().unwrap();
        format!("{}{:02} 00:00:00.000", &d[..8], n + 1)
    };
    for (from, to) in [
        ("2025-08-01", "2025-08-06"),
        ("2025-07-30", "2025-08-09"),
        ("2025-08-02", "2025-08-04"),
        ("2025-08-06", "2025-08-06"),
        ("2025-08-07", "2025-08-07"),
        ("2025-07-01", "2025-07-03"),
    ] {
        let (start, end) = (day_start(from), next_day(to));
        let range = [Bind::Text(&start), Bind::Text(&end)];
        let reference_days = db
            .rows(GROUPED_FLEET_DAYS_MY, GROUPED_FLEET_DAYS_LITE, &range)
            .await;
        for top in [1i64, 5, 100] {
            let n = top.to_string();
            let stats = env
                .api
                .ok(
                    &path(&["stats"]),
                    &[("from", from), ("to", to), ("top", &n)],
                )
                .await;
            let days: Vec<Vec<Value>> = day_rows(&stats)
                .into_iter()
                .filter(|d| d.2 > 0)
                .map(|d| {
                    vec![
                        json!(d.0),
                        json!(d.1),
                        json!(d.2),
                        json!(d.3),
                        json!(d.4),
                        json!(d.5),
                        json!(d.6),
                        json!(d.7),
                    ]
                })
                .collect();
            let seconds = |mut r: Vec<Value>| {
                let bytes = r.pop().unwrap().as_i64().unwrap();
                r.push(json!(bytes as f64 / 32_000.0));
                r
            };
            let expected_days: Vec<Vec<Value>> =
                reference_days.iter().cloned().map(seconds).collect();
            assert_eq!(days, expected_days, "{from}..{to}");
            let reference_top: Vec<Vec<Value>> = db
                .rows(
                    GROUPED_TOP_MY,
                    GROUPED_TOP_LITE,
                    &[range[0], range[1], Bind::Int(top)],
                )
                .await
                .into_iter()
                .map(seconds)
                .collect();
            let listed: Vec<Vec<Value>> = top_rows(&stats)
                .into_iter()
                .map(|t| vec![json!(t.0), json!(t.1), json!(t.2), json!(t.3)])
                .collect();
            assert_eq!(listed, reference_top, "{from}..{to} top {top}");
        }
    }

    // MySQL/MariaDB name the time index for the fleet: without it (before migration 0003
    // has run) the same answers come from the statements without the hint.
    if let Db::MySql(pool) = db {
        let range = [("from", "2025-08-01"), ("to", "2025-08-06"), ("top", "5")];
        let with_index = env.api.ok(&path(&["stats"]), &range).await;
        sqlx::query("DROP INDEX idx_xz_created_mac_session ON ai_agent_chat_history")
            .execute(pool)
            .await
            .unwrap();
        let without = env.api.ok(&path(&["stats"]), &range).await;
        assert_eq!(without, with_index);
        assert!(with_index["totals"]["messages"].as_i64() > Some(100));
    }
    env.finish().await;
}

#[tokio::test]
async fn the_device_list_and_fleet_stats_answer_as_before_sqlite() {
    the_device_list_and_fleet_stats_answer_as_before(Kind::Sqlite).await;
}

#[tokio::test]
async fn the_device_list_and_fleet_stats_answer_as_before_mariadb() {
    the_device_list_and_fleet_stats_answer_as_before(Kind::MariaDb).await;
}

#[tokio::test]
async fn fleet_stats_need_the_token_refuse_bad_parameters_and_default_to_30_days() {
    let env = Env::start(Kind::Sqlite, None).await;
    let stats = env.api.url(&path(&["stats"]), &[]);
    let response = env.api.send(stats.clone(), None).await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(response.headers()["www-authenticate"], "Bearer");
    let response = env.api.send(stats, Some("wrong")).await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let body: Value = response.json().await.unwrap();
    assert!(body["error"].is_string());

    for (query, says) in [
        (vec![("top", "0")], "top"),
        (vec![("top", "101")], "top"),
        (vec![("top", "-1")], "top"),
        (vec![("top", "ten")], "top"),
        (vec![("top", "1e1")], "top"),
        (vec![("from", "2025-13-01")], "from"),
        (vec![("to", "2025-02-30")], "to"),
        (vec![("from", "yesterday")], "from"),
        (vec![("from", "' OR 1=1 --")], "from"),
        (vec![("from", "2025-06-02"), ("to", "2025-06-01")], "after"),
        (vec![("from", "2020-01-01"), ("to", "2025-01-01")], "days"),
    ] {
        let (status, body) = env.api.get(&path(&["stats"]), &query).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query:?}: {body}");
        let error = body["error"].as_str().unwrap();
        assert!(error.contains(says), "{query:?}: {error}");
    }
    // 1000 days is the most.
    let (status, _) = env
        .api
        .get(
            &path(&["stats"]),
            &[("from", "2022-01-01"), ("to", "2024-09-26")],
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = env
        .api
        .get(
            &path(&["stats"]),
            &[("from", "2022-01-01"), ("to", "2024-09-27")],
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // Without a range: the last 30 days up to today, in the zone history is written in,
    // so a message written now is on the last day.
    let offset = common::test_config().history.utc_offset_minutes;
    let now = xiaozhi_gateway::history::writer::format_time(
        xiaozhi_gateway::history::record::now_ms(),
        offset,
    );
    env.db
        .insert(&[row("02:00:00:00:06:01", "now", 1, "hello", &now)])
        .await;
    let stats = env.api.ok(&path(&["stats"]), &[]).await;
    let days = day_rows(&stats);
    assert_eq!(days.len(), 30);
    assert_eq!(stats["to"], now[..10]);
    assert_eq!(days.last().unwrap().0, now[..10]);
    assert_eq!(days.last().unwrap().2, 1);
    assert_eq!(
        top_rows(&stats),
        [("02:00:00:00:06:01".to_owned(), 1, 1, 0.0)]
    );
    env.finish().await;
}

#[tokio::test]
async fn ws_admin_receives_presence_as_devices_come_and_go() {
    let upstream = MockUpstream::start(MockUpstreamConfig::default())
        .await
        .unwrap();
    let env = Env::start(Kind::Sqlite, Some(&upstream)).await;
    let gw = &env.gw;
    let (mut ws, _) = ws_connect(gw, &[("authorization", format!("Bearer {TOKEN}"))])
        .await
        .unwrap();
    let (dev, session) = common::converse(gw, 390, 1).await;
    let mac = dev.credentials.mac.colon();
    dev.disconnect().await;
    let mut states = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while states.last().map(String::as_str) != Some("offline") {
        let Ok(Some(Ok(tungstenite::Message::Text(text)))) =
            tokio::time::timeout_at(deadline, ws.next()).await
        else {
            break;
        };
        let v: Value = serde_json::from_str(&text).unwrap();
        if v["type"] == "presence" && v["mac_address"] == mac.as_str() {
            if v["state"] == "in_session" || v["state"] == "session_ended" {
                assert_eq!(v["session_id"], session.as_str());
            }
            states.push(v["state"].as_str().unwrap().to_owned());
        }
    }
    assert_eq!(states, ["online", "in_session", "session_ended", "offline"]);
}
