//! A mock xiaozhi-server: the gateway's upstream, for integration tests and benchmarks.
//!
//! The gateway is only half of a conversation: devices talk MQTT + UDP to it, and it
//! talks WebSocket to xiaozhi-server, which runs ASR, the LLM and TTS. Running the real
//! server in tests needs Python, model keys and seconds per turn, and it cannot be made
//! to misbehave on demand. This module is a small, deterministic stand-in that speaks the
//! same WebSocket protocol the real server speaks with the MQTT gateway:
//!
//! * the upgrade goes to `/xiaozhi/v1/?from=mqtt_gateway` with `device-id`, `client-id`,
//!   `protocol-version: 2` and `authorization: Bearer <token>` headers, the token being
//!   verified (see [`token`]) when an `auth_key` is configured;
//! * the gateway's `hello` is answered with a WebSocket-transport hello and a fresh
//!   session id;
//! * binary frames carry a 16-byte header in both directions (see [`encode_uplink`] and
//!   [`parse_downlink`]);
//! * a user turn (a `listen stop`, or [`MockUpstreamConfig::frames_per_turn`] uplink audio
//!   frames) is answered like the real server does: `stt`, `tts start`, `llm`,
//!   `tts sentence_start`, Opus frames, `tts stop`. The Opus frames are valid packets
//!   whose bytes carry the turn and frame index ([`reply_frame`], [`parse_reply_frame`])
//!   so a test at the device end can check order and loss.
//!
//! [`Behavior`] makes it fail the ways a real upstream fails (auth rejection, a hello
//! that never comes, a close mid-turn, garbage frames), and [`Observed`] records what
//! the gateway sent, for assertions.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use futures_util::{SinkExt as _, StreamExt as _};
use hmac::{Hmac, Mac as _};
use serde_json::{Value, json};
use sha2::Sha256;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{
    Callback, ErrorResponse, Request, Response,
};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

/// The path and query the MQTT gateway connects to.
pub const GATEWAY_PATH: &str = "/xiaozhi/v1/?from=mqtt_gateway";
/// Length of the binary frame header, both directions.
pub const HEADER_LEN: usize = 16;
/// Allowed distance between a token's timestamp and now.
pub const TOKEN_MAX_SKEW_SECS: u64 = 300;
/// Cap on every list in [`Observed`] (and on the [`MockUpstream::wait_text`] inbox).
pub const OBSERVED_CAP: usize = 10_000;
/// TOC byte of the reply frames: config 3 (SILK NB, 60 ms), mono, one frame.
pub const REPLY_TOC: u8 = 0x18;
/// Filler byte of the reply frames after the turn and index.
pub const REPLY_FILL: u8 = 0xA5;

/// How long a connection may take to complete the WebSocket upgrade.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long connections get to close cleanly after a shutdown before being aborted.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);
/// Queue of upstream-initiated texts per connection.
const INJECT_QUEUE: usize = 64;

/// How the mock behaves on each connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Behavior {
    /// Normal: verify, answer hello, play turns (see the module doc).
    #[default]
    Normal,
    /// Reject the WebSocket upgrade with HTTP 401 (auth failure).
    RejectAuth,
    /// Accept the upgrade, then refuse in plain text ("认证失败", authentication failed)
    /// and close, as xiaozhi-server does with a bad token.
    RejectAuthInBand,
    /// Accept the upgrade but never answer the hello.
    SilentHello,
    /// Answer the hello, then never read again (a server that is stuck or too slow):
    /// the gateway's writes back up.
    Stall,
    /// Answer the hello, then close the WebSocket (close frame code 1011) as soon as the
    /// first uplink audio frame arrives (mid-turn).
    CloseMidTurn,
    /// Answer the hello, then on the first uplink audio frame send a binary frame shorter
    /// than 16 bytes and a text frame that is not JSON, then continue as Normal.
    GarbageFrames,
}

/// What the mock server does and announces.
#[derive(Debug, Clone)]
pub struct MockUpstreamConfig {
    pub behavior: Behavior,
    /// Secret for the Authorization token; None = do not check the token.
    pub auth_key: Option<String>,
    /// Audio params the server hello announces (default: opus, 24000 Hz, 1 ch, 60 ms).
    pub sample_rate: u32,
    pub frame_duration: u32,
    /// Downlink Opus frames per reply sentence (default 5) and their byte length
    /// (default 40; at least 6, at most 65535).
    pub reply_frames: u32,
    pub reply_frame_bytes: usize,
    /// Uplink frames that make one user turn when no `listen stop` arrives (default 5).
    pub frames_per_turn: u32,
    /// Pace downlink frames at frame_duration (true) or send them as fast as possible
    /// (false, default).
    pub paced: bool,
    /// Write the send time (unix microseconds) into each reply frame (see
    /// [`stamped_reply`]), so a client can measure the relay's latency. Needs
    /// `reply_frame_bytes` >= 14.
    pub stamp_frames: bool,
    /// What the user "said" and the assistant answers, turn by turn (cycled); empty:
    /// `turn N` / `reply N`, which tests match on.
    pub dialogue: Vec<(String, String)>,
}

impl Default for MockUpstreamConfig {
    fn default() -> Self {
        MockUpstreamConfig {
            behavior: Behavior::Normal,
            auth_key: None,
            sample_rate: 24_000,
            frame_duration: 60,
            reply_frames: 5,
            reply_frame_bytes: 40,
            frames_per_turn: 5,
            paced: false,
            stamp_frames: false,
            dialogue: Vec::new(),
        }
    }
}

/// Everything the server observed, for assertions. Every list keeps its first
/// [`OBSERVED_CAP`] entries.
#[derive(Clone, Debug, Default)]
pub struct Observed {
    /// Upgrade requests received (accepted or not).
    pub connections: u32,
    /// Reasons for each refused upgrade (bad path/query, missing header, bad token).
    pub rejected: Vec<String>,
    /// Lower-cased request headers of each accepted connection.
    pub headers: Vec<HashMap<String, String>>,
    /// Request path+query of each upgrade request.
    pub paths: Vec<String>,
    /// Hello JSON received from the gateway.
    pub hellos: Vec<Value>,
    /// Every other text frame received (parsed JSON).
    pub texts: Vec<Value>,
    /// Text frames from the gateway that were not JSON.
    pub bad_texts: u64,
    /// Binary audio frames received (well-formed header).
    pub uplink_frames: u64,
    /// Header timestamps of uplink frames, in arrival order.
    pub uplink_timestamps: Vec<u32>,
    /// Binary frames with a bad header.
    pub malformed_uplink: u64,
    /// Connections the gateway closed (close frame, `goodbye`, EOF or error).
    pub closes_by_gateway: u32,
    /// Session ids handed out.
    pub session_ids: Vec<String>,
    /// Turns answered, over all connections.
    pub turns: u32,
}

/// The token the gateway presents as `Authorization: Bearer <token>`:
/// base64url-without-padding(HMAC-SHA256(secret, `client_id|device_id|ts`)) + `.` + ts.
pub fn token(secret: &str, client_id: &str, device_id: &str, unix_secs: u64) -> String {
    let sig = signature(secret, client_id, device_id, unix_secs).finalize();
    format!("{}.{unix_secs}", URL_SAFE_NO_PAD.encode(sig.into_bytes()))
}

fn signature(secret: &str, client_id: &str, device_id: &str, unix_secs: u64) -> Hmac<Sha256> {
    // HMAC accepts keys of any length.
    let mut mac = <Hmac<Sha256> as hmac::Mac>::new_from_slice(secret.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
    mac.update(format!("{client_id}|{device_id}|{unix_secs}").as_bytes());
    mac
}

/// Checks a token against the secret and the clock; `Err` says why it is refused.
pub fn verify_token(
    secret: &str,
    client_id: &str,
    device_id: &str,
    token: &str,
    now_unix_secs: u64,
) -> Result<(), String> {
    let (sig, ts) = token
        .rsplit_once('.')
        .ok_or_else(|| "token has no timestamp".to_string())?;
    let ts: u64 = ts
        .parse()
        .map_err(|_| format!("token timestamp {ts:?} is not a number"))?;
    if ts.abs_diff(now_unix_secs) > TOKEN_MAX_SKEW_SECS {
        return Err(format!(
            "token timestamp {ts} is more than {TOKEN_MAX_SKEW_SECS} s from now ({now_unix_secs})"
        ));
    }
    let sig = URL_SAFE_NO_PAD
        .decode(sig)
        .map_err(|_| "token signature is not base64url".to_string())?;
    signature(secret, client_id, device_id, ts)
        .verify_slice(&sig)
        .map_err(|_| "token signature mismatch".to_string())
}

/// A downlink reply frame's Opus payload: [`REPLY_TOC`], the turn (mod 256), the frame
/// index within the turn (u32 BE), then [`REPLY_FILL`] up to `len` (at least 6 bytes).
pub fn reply_frame(turn: u32, index: u32, len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len.max(6));
    v.push(REPLY_TOC);
    v.push(turn as u8);
    v.extend_from_slice(&index.to_be_bytes());
    v.resize(len.max(6), REPLY_FILL);
    v
}

/// Inverse of [`reply_frame`]: `(turn mod 256, index)`, or `None` for anything else.
pub fn parse_reply_frame(opus: &[u8]) -> Option<(u32, u32)> {
    if opus.len() < 6 || opus[0] != REPLY_TOC || opus[6..].iter().any(|&b| b != REPLY_FILL) {
        return None;
    }
    let index = u32::from_be_bytes([opus[2], opus[3], opus[4], opus[5]]);
    Some((u32::from(opus[1]), index))
}

/// Where a stamped reply frame carries its send time.
const STAMP_AT: std::ops::Range<usize> = 6..14;

/// Unix time in microseconds (the wall clock, so two processes on one machine agree).
pub fn unix_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// A server->gateway binary frame with the send time written into its reply payload.
fn stamp_now(frame: &[u8]) -> Vec<u8> {
    let mut frame = frame.to_vec();
    let at = HEADER_LEN + STAMP_AT.start..HEADER_LEN + STAMP_AT.end;
    if frame.len() >= at.end {
        frame[at].copy_from_slice(&unix_micros().to_be_bytes());
    }
    frame
}

/// A stamped reply frame's `(turn mod 256, index, send time in unix microseconds)`.
pub fn stamped_reply(opus: &[u8]) -> Option<(u32, u32, u64)> {
    if opus.len() < STAMP_AT.end
        || opus[0] != REPLY_TOC
        || opus[STAMP_AT.end..].iter().any(|&b| b != REPLY_FILL)
    {
        return None;
    }
    let index = u32::from_be_bytes([opus[2], opus[3], opus[4], opus[5]]);
    let stamp = u64::from_be_bytes(opus[STAMP_AT].try_into().ok()?);
    Some((u32::from(opus[1]), index, stamp))
}

/// A gateway->server binary frame: zeros, timestamp (bytes 8-11), length (12-15), Opus.
pub fn encode_uplink(timestamp: u32, opus: &[u8]) -> Vec<u8> {
    let mut v = vec![0u8; HEADER_LEN];
    v[8..12].copy_from_slice(&timestamp.to_be_bytes());
    v[12..16].copy_from_slice(&(opus.len() as u32).to_be_bytes());
    v.extend_from_slice(opus);
    v
}

/// Parses a gateway->server binary frame into `(timestamp, opus)`. `None` if it is shorter
/// than the header, bytes 0-7 are not zero, or the length field exceeds what follows.
pub fn parse_uplink(frame: &[u8]) -> Option<(u32, &[u8])> {
    if frame.len() < HEADER_LEN || frame[..8].iter().any(|&b| b != 0) {
        return None;
    }
    let ts = u32::from_be_bytes([frame[8], frame[9], frame[10], frame[11]]);
    let len = u32::from_be_bytes([frame[12], frame[13], frame[14], frame[15]]) as usize;
    let body = &frame[HEADER_LEN..];
    (len <= body.len()).then(|| (ts, &body[..len]))
}

/// A server->gateway binary frame, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DownlinkFrame {
    pub sequence: u32,
    pub timestamp: u32,
    pub opus: Vec<u8>,
}

/// Builds a server->gateway binary frame: byte 0 = 1, bytes 2-3 length (u16 BE), 4-7
/// sequence, 8-11 timestamp, 12-15 length (u32 BE), then Opus.
pub fn encode_downlink(sequence: u32, timestamp: u32, opus: &[u8]) -> Vec<u8> {
    let mut v = vec![0u8; HEADER_LEN];
    v[0] = 1;
    v[2..4].copy_from_slice(&(opus.len().min(usize::from(u16::MAX)) as u16).to_be_bytes());
    v[4..8].copy_from_slice(&sequence.to_be_bytes());
    v[8..12].copy_from_slice(&timestamp.to_be_bytes());
    v[12..16].copy_from_slice(&(opus.len() as u32).to_be_bytes());
    v.extend_from_slice(opus);
    v
}

/// Parses a server->gateway binary frame (as [`encode_downlink`] builds them).
pub fn parse_downlink(frame: &[u8]) -> Option<DownlinkFrame> {
    if frame.len() < HEADER_LEN || frame[0] != 1 {
        return None;
    }
    let sequence = u32::from_be_bytes([frame[4], frame[5], frame[6], frame[7]]);
    let timestamp = u32::from_be_bytes([frame[8], frame[9], frame[10], frame[11]]);
    let len = u32::from_be_bytes([frame[12], frame[13], frame[14], frame[15]]) as usize;
    let body = &frame[HEADER_LEN..];
    (len <= body.len()).then(|| DownlinkFrame {
        sequence,
        timestamp,
        opus: body[..len].to_vec(),
    })
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn push_capped<T>(v: &mut Vec<T>, item: T) {
    if v.len() < OBSERVED_CAP {
        v.push(item);
    }
}

/// State shared by the handle, the accept loop and the connections.
struct Shared {
    config: MockUpstreamConfig,
    observed: Mutex<Observed>,
    /// Texts from the gateway not yet returned by `wait_text`, oldest first.
    inbox: Mutex<VecDeque<Value>>,
    /// Bumped on every inbox push, to wake `wait_text`.
    inbox_seq: watch::Sender<u64>,
    /// Open connections, oldest first, with their queue of upstream-initiated texts.
    conns: Mutex<Vec<(u64, mpsc::Sender<String>)>>,
    next_conn: AtomicU64,
    shutdown: watch::Sender<bool>,
}

impl Shared {
    fn observe(&self, f: impl FnOnce(&mut Observed)) {
        f(&mut lock(&self.observed));
    }

    fn record_text(&self, v: Value) {
        {
            let mut o = lock(&self.observed);
            if v["type"] == "hello" {
                push_capped(&mut o.hellos, v.clone());
            } else {
                push_capped(&mut o.texts, v.clone());
            }
        }
        {
            let mut inbox = lock(&self.inbox);
            if inbox.len() >= OBSERVED_CAP {
                inbox.pop_front();
            }
            inbox.push_back(v);
        }
        self.inbox_seq.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Removes and returns the oldest inbox text matching `pred`.
    fn take_text(&self, pred: &impl Fn(&Value) -> bool) -> Option<Value> {
        let mut inbox = lock(&self.inbox);
        let i = inbox.iter().position(pred)?;
        inbox.remove(i)
    }
}

/// A running mock xiaozhi-server. Dropping it shuts it down.
pub struct MockUpstream {
    pub addr: SocketAddr,
    /// `ws://127.0.0.1:PORT/xiaozhi/v1/`, without the query (the gateway adds it).
    pub url: String,
    shared: Arc<Shared>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl MockUpstream {
    /// Binds 127.0.0.1 on a free port and starts accepting.
    pub async fn start(config: MockUpstreamConfig) -> std::io::Result<MockUpstream> {
        Self::start_on(([127, 0, 0, 1], 0).into(), config).await
    }

    /// Binds `addr` and starts accepting.
    pub async fn start_on(
        addr: SocketAddr,
        config: MockUpstreamConfig,
    ) -> std::io::Result<MockUpstream> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            config,
            observed: Mutex::new(Observed::default()),
            inbox: Mutex::new(VecDeque::new()),
            inbox_seq: watch::Sender::new(0),
            conns: Mutex::new(Vec::new()),
            next_conn: AtomicU64::new(0),
            shutdown: watch::Sender::new(false),
        });
        let task = tokio::spawn(accept_loop(listener, shared.clone()));
        Ok(MockUpstream {
            addr,
            url: format!("ws://{addr}/xiaozhi/v1/"),
            shared,
            task: Mutex::new(Some(task)),
        })
    }

    /// Everything the server observed, for assertions (a snapshot).
    pub fn observed(&self) -> Observed {
        lock(&self.shared.observed).clone()
    }

    /// Sends a text frame (e.g. an MCP request) on the newest open connection. False if
    /// there is none.
    pub async fn send_text_to_newest(&self, text: String) -> bool {
        let mut text = text;
        loop {
            let newest = lock(&self.shared.conns).last().cloned();
            let Some((id, tx)) = newest else {
                return false;
            };
            match tx.send(text).await {
                Ok(()) => return true,
                Err(mpsc::error::SendError(t)) => {
                    // That connection has just ended; try the one before it.
                    text = t;
                    lock(&self.shared.conns).retain(|(i, _)| *i != id);
                }
            }
        }
    }

    /// Waits (up to `timeout`) for a text frame from the gateway, on any connection,
    /// that matches `pred`, and returns it parsed. Frames that arrived before the call
    /// count too; each frame is returned by at most one call (oldest match first).
    /// Hellos are included.
    pub async fn wait_text(
        &self,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Option<Value> {
        let deadline = Instant::now() + timeout;
        let mut seq = self.shared.inbox_seq.subscribe();
        loop {
            if let Some(v) = self.shared.take_text(&pred) {
                return Some(v);
            }
            match tokio::time::timeout_at(deadline, seq.changed()).await {
                Ok(Ok(())) => {}
                _ => return self.shared.take_text(&pred),
            }
        }
    }

    /// Stops accepting and closes every connection (close code 1001); connections that
    /// do not finish closing within a second are aborted.
    pub fn shutdown(&self) {
        self.shared.shutdown.send_replace(true);
    }

    /// [`shutdown`](Self::shutdown), then waits until every task has ended.
    pub async fn stop(&self) {
        self.shutdown();
        let task = lock(&self.task).take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}

impl Drop for MockUpstream {
    fn drop(&mut self) {
        // The accept loop sees this, closes the connections and ends within
        // SHUTDOWN_GRACE, aborting whatever is left.
        self.shutdown();
    }
}

/// Resolves once shutdown has been requested (or its sender is gone).
async fn shutdown_requested(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|&stop| stop).await;
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut stop = shared.shutdown.subscribe();
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = shutdown_requested(&mut stop) => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((tcp, _peer)) => {
                    conns.spawn(connection(tcp, shared.clone()));
                }
                Err(e) => {
                    tracing::debug!(error = %e, "mock upstream: accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            },
        }
    }
    drop(listener);
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    conns.shutdown().await;
}

/// The upgrade check, as tungstenite's handshake callback.
struct Upgrade(Arc<Shared>);

impl Callback for Upgrade {
    fn on_request(self, req: &Request, resp: Response) -> Result<Response, ErrorResponse> {
        check_request(&self.0, req).map_err(|(status, reason)| {
            let mut refusal = ErrorResponse::new(Some(reason));
            *refusal.status_mut() = status;
            refusal
        })?;
        Ok(resp)
    }
}

/// Checks an upgrade request the way xiaozhi-server does for the MQTT gateway, and
/// records it.
fn check_request(shared: &Shared, req: &Request) -> Result<(), (StatusCode, String)> {
    let path = req
        .uri()
        .path_and_query()
        .map_or_else(|| req.uri().path().to_string(), |p| p.as_str().to_string());
    let headers: HashMap<String, String> = req
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_ascii_lowercase(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let verdict = judge(&shared.config, &path, &headers);
    shared.observe(|o| {
        o.connections = o.connections.saturating_add(1);
        push_capped(&mut o.paths, path);
        match &verdict {
            Ok(()) => push_capped(&mut o.headers, headers),
            Err((_, reason)) => push_capped(&mut o.rejected, reason.clone()),
        }
    });
    verdict
}

fn judge(
    config: &MockUpstreamConfig,
    path: &str,
    headers: &HashMap<String, String>,
) -> Result<(), (StatusCode, String)> {
    if config.behavior == Behavior::RejectAuth {
        return Err((StatusCode::UNAUTHORIZED, "behavior RejectAuth".into()));
    }
    if !path.starts_with("/xiaozhi/v1/") || !path.ends_with("?from=mqtt_gateway") {
        return Err((StatusCode::BAD_REQUEST, format!("bad path {path:?}")));
    }
    let header = |name: &str| headers.get(name).map(String::as_str);
    let Some(device_id) = header("device-id") else {
        return Err((StatusCode::BAD_REQUEST, "missing device-id header".into()));
    };
    let Some(client_id) = header("client-id") else {
        return Err((StatusCode::BAD_REQUEST, "missing client-id header".into()));
    };
    match header("protocol-version") {
        Some("2") => {}
        Some(v) => return Err((StatusCode::BAD_REQUEST, format!("protocol-version {v:?}"))),
        None => {
            return Err((
                StatusCode::BAD_REQUEST,
                "missing protocol-version header".into(),
            ));
        }
    }
    // Like xiaozhi-server with `server.auth.enabled = false`, a mock without a key
    // takes any connection, token or not.
    if let Some(key) = &config.auth_key {
        let Some(auth) = header("authorization") else {
            return Err((
                StatusCode::UNAUTHORIZED,
                "missing authorization header".into(),
            ));
        };
        let Some(token) = auth.strip_prefix("Bearer ") else {
            return Err((
                StatusCode::UNAUTHORIZED,
                format!("authorization is not a Bearer token: {auth:?}"),
            ));
        };
        verify_token(key, client_id, device_id, token, unix_now())
            .map_err(|e| (StatusCode::UNAUTHORIZED, e))?;
    }
    Ok(())
}

async fn connection(tcp: TcpStream, shared: Arc<Shared>) {
    let _ = tcp.set_nodelay(true);
    let mut stop = shared.shutdown.subscribe();
    let ws = tokio::select! {
        _ = shutdown_requested(&mut stop) => return,
        r = tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            tokio_tungstenite::accept_hdr_async(tcp, Upgrade(shared.clone())),
        ) => match r {
            Ok(Ok(ws)) => ws,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "mock upstream: upgrade failed");
                return;
            }
            Err(_) => return,
        },
    };
    if shared.config.behavior == Behavior::RejectAuthInBand {
        // What xiaozhi-server does with a bad token: it accepts the upgrade, says so in
        // plain text, and closes.
        let mut ws = ws;
        let _ = ws.send(Message::text("认证失败")).await;
        let _ = ws.close(None).await;
        return;
    }
    if shared.config.behavior == Behavior::Stall {
        stall(ws, &shared, &mut stop).await;
        return;
    }
    let id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
    let (tx, rx) = mpsc::channel(INJECT_QUEUE);
    lock(&shared.conns).push((id, tx));
    Session::new(&shared).run(ws, rx, stop).await;
    lock(&shared.conns).retain(|(i, _)| *i != id);
}

/// [`Behavior::Stall`]: answer the hello, then stop reading until shutdown.
async fn stall(
    mut ws: WebSocketStream<TcpStream>,
    shared: &Shared,
    stop: &mut watch::Receiver<bool>,
) {
    while let Some(Ok(message)) = ws.next().await {
        if message.is_text() {
            break;
        }
    }
    let sid = hex::encode(rand::random::<[u8; 16]>());
    shared.observe(|o| push_capped(&mut o.session_ids, sid.clone()));
    let hello = json!({
        "type": "hello",
        "transport": "websocket",
        "session_id": sid,
        "audio_params": {
            "format": "opus",
            "sample_rate": shared.config.sample_rate,
            "channels": 1,
            "frame_duration": shared.config.frame_duration,
        },
    });
    let _ = ws.send(Message::text(hello.to_string())).await;
    shutdown_requested(stop).await;
}

/// What to do after handling a frame from the gateway.
enum Next {
    Continue,
    /// The gateway ended the session (`goodbye`).
    GatewayLeft,
    /// Close from our side with this code.
    Close(CloseCode, &'static str),
}

/// One queued outgoing message; `audio` ones are paced when the config says so.
struct Out {
    msg: Message,
    audio: bool,
}

/// One connection's protocol state.
struct Session<'a> {
    shared: &'a Shared,
    config: &'a MockUpstreamConfig,
    sid: Option<String>,
    /// Turns answered on this connection.
    turn: u32,
    /// A user turn has begun (listen start or audio) and not been answered.
    turn_open: bool,
    frames_in_turn: u32,
    /// Downlink sequence number of the last frame sent.
    seq: u32,
    misbehaved: bool,
    outq: VecDeque<Out>,
    next_frame_at: Instant,
}

type Ws = WebSocketStream<TcpStream>;

impl<'a> Session<'a> {
    fn new(shared: &'a Shared) -> Self {
        Session {
            shared,
            config: &shared.config,
            sid: None,
            turn: 0,
            turn_open: false,
            frames_in_turn: 0,
            seq: 0,
            misbehaved: false,
            outq: VecDeque::new(),
            next_frame_at: Instant::now(),
        }
    }

    async fn run(
        mut self,
        mut ws: Ws,
        mut inject: mpsc::Receiver<String>,
        mut stop: watch::Receiver<bool>,
    ) {
        let ended = loop {
            if self.pump(&mut ws).await.is_err() {
                break Next::GatewayLeft;
            }
            let wait_frame = self.config.paced && !self.outq.is_empty();
            tokio::select! {
                _ = shutdown_requested(&mut stop) => {
                    break Next::Close(CloseCode::Away, "server shutting down");
                }
                _ = tokio::time::sleep_until(self.next_frame_at), if wait_frame => {}
                Some(text) = inject.recv() => {
                    if ws.send(Message::text(text)).await.is_err() {
                        break Next::GatewayLeft;
                    }
                }
                msg = ws.next() => match msg {
                    None | Some(Err(_)) => break Next::GatewayLeft,
                    Some(Ok(Message::Close(_))) => {
                        // Flushes tungstenite's reply to the close.
                        let _ = ws.close(None).await;
                        break Next::GatewayLeft;
                    }
                    Some(Ok(Message::Text(t))) => match self.on_text(t.as_str()) {
                        Next::Continue => {}
                        other => break other,
                    },
                    Some(Ok(Message::Binary(b))) => match self.on_binary(&b) {
                        Next::Continue => {}
                        other => break other,
                    },
                    Some(Ok(_)) => {}
                },
            }
        };
        match ended {
            Next::GatewayLeft => {
                self.shared
                    .observe(|o| o.closes_by_gateway = o.closes_by_gateway.saturating_add(1));
                let _ = tokio::time::timeout(SHUTDOWN_GRACE, ws.close(None)).await;
            }
            Next::Close(code, reason) => {
                let frame = CloseFrame {
                    code,
                    reason: reason.into(),
                };
                let _ = tokio::time::timeout(SHUTDOWN_GRACE, async {
                    if ws.close(Some(frame)).await.is_ok() {
                        // Wait for the gateway's reply to the close (or EOF).
                        while let Some(Ok(_)) = ws.next().await {}
                    }
                })
                .await;
            }
            Next::Continue => {}
        }
    }

    /// Sends queued messages, stopping at an audio frame that is not due yet.
    async fn pump(&mut self, ws: &mut Ws) -> Result<(), tokio_tungstenite::tungstenite::Error> {
        loop {
            let due = match self.outq.front() {
                None => return Ok(()),
                Some(out) => {
                    !(out.audio && self.config.paced && Instant::now() < self.next_frame_at)
                }
            };
            if !due {
                return Ok(());
            }
            let Some(out) = self.outq.pop_front() else {
                return Ok(());
            };
            let msg = match out.msg {
                Message::Binary(frame) if out.audio && self.config.stamp_frames => {
                    Message::Binary(stamp_now(&frame).into())
                }
                other => other,
            };
            ws.send(msg).await?;
            if out.audio && self.config.paced {
                self.next_frame_at += Duration::from_millis(u64::from(self.config.frame_duration));
            }
        }
    }

    fn replying(&self) -> bool {
        !self.outq.is_empty()
    }

    fn queue_json(&mut self, v: Value) {
        self.outq.push_back(Out {
            msg: Message::text(v.to_string()),
            audio: false,
        });
    }

    fn on_text(&mut self, text: &str) -> Next {
        let Ok(v) = serde_json::from_str::<Value>(text) else {
            self.shared
                .observe(|o| o.bad_texts = o.bad_texts.saturating_add(1));
            return Next::Continue;
        };
        let kind = v["type"].as_str().unwrap_or_default().to_string();
        let state = v["state"].as_str().unwrap_or_default().to_string();
        self.shared.record_text(v);
        match kind.as_str() {
            "hello" => self.on_hello(),
            "goodbye" => return Next::GatewayLeft,
            _ if self.sid.is_none() => {}
            // While a reply is playing, listen and audio do not start or end a turn.
            "listen" if self.replying() => {}
            "listen" => match state.as_str() {
                // Audio travels by UDP and `listen` by MQTT, so the turn's first frames
                // may be here already: a turn they opened is kept.
                "start" if !self.turn_open => {
                    self.turn_open = true;
                    self.frames_in_turn = 0;
                }
                "stop" if self.turn_open => self.answer_turn(),
                _ => {}
            },
            // Like the real server: drop the rest of the reply and end TTS.
            "abort" if self.replying() => {
                self.outq.clear();
                let sid = self.sid.clone();
                self.queue_json(json!({"type": "tts", "state": "stop", "session_id": sid}));
            }
            _ => {}
        }
        Next::Continue
    }

    fn on_hello(&mut self) {
        if self.config.behavior == Behavior::SilentHello {
            return;
        }
        let sid = match &self.sid {
            Some(sid) => sid.clone(),
            None => {
                let sid = hex::encode(rand::random::<[u8; 16]>());
                self.shared
                    .observe(|o| push_capped(&mut o.session_ids, sid.clone()));
                self.sid = Some(sid.clone());
                sid
            }
        };
        self.queue_json(json!({
            "type": "hello",
            "transport": "websocket",
            "session_id": sid,
            "audio_params": {
                "format": "opus",
                "sample_rate": self.config.sample_rate,
                "channels": 1,
                "frame_duration": self.config.frame_duration,
            },
        }));
    }

    fn on_binary(&mut self, frame: &[u8]) -> Next {
        let Some((ts, _opus)) = parse_uplink(frame) else {
            self.shared
                .observe(|o| o.malformed_uplink = o.malformed_uplink.saturating_add(1));
            return Next::Continue;
        };
        self.shared.observe(|o| {
            o.uplink_frames = o.uplink_frames.saturating_add(1);
            push_capped(&mut o.uplink_timestamps, ts);
        });
        if self.sid.is_none() {
            return Next::Continue;
        }
        if !self.misbehaved {
            match self.config.behavior {
                Behavior::CloseMidTurn => {
                    self.misbehaved = true;
                    return Next::Close(CloseCode::Error, "mock upstream: close mid-turn");
                }
                Behavior::GarbageFrames => {
                    self.misbehaved = true;
                    self.outq.push_back(Out {
                        msg: Message::binary(vec![0xDE, 0xAD, 0xBE, 0xEF, 0x00, 0x01, 0x02]),
                        audio: false,
                    });
                    self.outq.push_back(Out {
                        msg: Message::text("this is {not json"),
                        audio: false,
                    });
                }
                _ => {}
            }
        }
        if self.replying() {
            return Next::Continue;
        }
        self.turn_open = true;
        self.frames_in_turn += 1;
        if self.frames_in_turn >= self.config.frames_per_turn.max(1) {
            self.answer_turn();
        }
        Next::Continue
    }

    /// Queues the reply to one user turn, as the real server sends it.
    fn answer_turn(&mut self) {
        self.turn += 1;
        self.turn_open = false;
        self.frames_in_turn = 0;
        self.shared.observe(|o| o.turns = o.turns.saturating_add(1));
        let (n, sid) = (self.turn, self.sid.clone());
        let (said, reply) = match self.config.dialogue.as_slice() {
            [] => (format!("turn {n}"), format!("reply {n}")),
            lines => {
                let (said, reply) = &lines[(n as usize - 1) % lines.len()];
                (said.clone(), reply.clone())
            }
        };
        self.queue_json(json!({"type": "stt", "text": said, "session_id": sid}));
        self.queue_json(json!({"type": "tts", "state": "start", "session_id": sid}));
        self.queue_json(
            json!({"type": "llm", "text": "😊", "emotion": "happy", "session_id": sid}),
        );
        self.queue_json(json!({
            "type": "tts",
            "state": "sentence_start",
            "text": reply,
            "session_id": sid,
        }));
        let len = self
            .config
            .reply_frame_bytes
            .clamp(6, usize::from(u16::MAX));
        for i in 0..self.config.reply_frames {
            self.seq = self.seq.wrapping_add(1);
            let opus = reply_frame(n, i, len);
            let ts = i.wrapping_mul(self.config.frame_duration);
            self.outq.push_back(Out {
                msg: Message::binary(encode_downlink(self.seq, ts, &opus)),
                audio: true,
            });
        }
        self.queue_json(json!({"type": "tts", "state": "stop", "session_id": sid}));
        self.next_frame_at = Instant::now();
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn stamped_frames_carry_their_send_time() {
        let frame = encode_downlink(1, 0, &reply_frame(3, 7, 40));
        let before = unix_micros();
        let stamped = stamp_now(&frame);
        let opus = &parse_downlink(&stamped).unwrap().opus;
        let (turn, index, at) = stamped_reply(opus).expect("stamped frame");
        assert_eq!((turn, index), (3, 7));
        assert!(at >= before && at <= unix_micros());
        assert_eq!(
            stamped_reply(&reply_frame(3, 7, 10)),
            None,
            "too short to stamp"
        );
    }
    use super::*;
    use tokio_tungstenite::tungstenite::Error as WsError;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
    use tokio_tungstenite::tungstenite::http::HeaderValue;

    type Client = WebSocketStream<TcpStream>;

    const CLIENT_ID: &str = "aa_bb_cc_dd_ee_ff";
    const DEVICE_ID: &str = "aa:bb:cc:dd:ee:ff";

    #[test]
    fn token_vector() {
        assert_eq!(
            token("server-secret", CLIENT_ID, DEVICE_ID, 1_700_000_000),
            "fy4JL2L2_XXB02AyGRKsU0uu9ypadGv9bTmmBwfU6lk.1700000000"
        );
        let t = token("server-secret", CLIENT_ID, DEVICE_ID, 1_700_000_000);
        assert!(verify_token("server-secret", CLIENT_ID, DEVICE_ID, &t, 1_700_000_100).is_ok());
        assert!(verify_token("server-secret", CLIENT_ID, DEVICE_ID, &t, 1_700_000_301).is_err());
        assert!(verify_token("other", CLIENT_ID, DEVICE_ID, &t, 1_700_000_000).is_err());
        assert!(verify_token("server-secret", "x", DEVICE_ID, &t, 1_700_000_000).is_err());
        assert!(verify_token("server-secret", CLIENT_ID, DEVICE_ID, "junk", 0).is_err());
    }

    #[test]
    fn reply_frame_round_trip() {
        for (turn, index, len) in [(1, 0, 40), (7, 123_456, 6), (255, u32::MAX, 100)] {
            let f = reply_frame(turn, index, len);
            assert_eq!(f.len(), len);
            assert_eq!(f[0], REPLY_TOC);
            assert_eq!(parse_reply_frame(&f), Some((turn, index)));
        }
        assert_eq!(reply_frame(1, 2, 0).len(), 6);
        assert_eq!(parse_reply_frame(&[REPLY_TOC, 1, 0, 0]), None);
        let mut f = reply_frame(1, 2, 20);
        f[10] = 0;
        assert_eq!(parse_reply_frame(&f), None);
    }

    #[test]
    fn uplink_header() {
        let f = encode_uplink(120, &[1, 2, 3]);
        assert_eq!(parse_uplink(&f), Some((120, &[1u8, 2, 3][..])));
        assert_eq!(parse_uplink(&f[..15]), None);
        let mut long = f.clone();
        long[15] = 4; // length exceeds what follows
        assert_eq!(parse_uplink(&long), None);
        let d = encode_downlink(3, 180, &[9; 5]);
        assert_eq!(u16::from_be_bytes([d[2], d[3]]), 5);
        assert_eq!(
            parse_downlink(&d),
            Some(DownlinkFrame {
                sequence: 3,
                timestamp: 180,
                opus: vec![9; 5]
            })
        );
    }

    async fn connect(mock: &MockUpstream, secret: &str, unix_secs: u64) -> Result<Client, WsError> {
        let mut req = format!("{}?from=mqtt_gateway", mock.url)
            .into_client_request()
            .unwrap();
        let h = req.headers_mut();
        h.insert("device-id", HeaderValue::from_static(DEVICE_ID));
        h.insert("client-id", HeaderValue::from_static(CLIENT_ID));
        h.insert("protocol-version", HeaderValue::from_static("2"));
        let auth = format!("Bearer {}", token(secret, CLIENT_ID, DEVICE_ID, unix_secs));
        h.insert("authorization", HeaderValue::from_str(&auth).unwrap());
        h.insert("x-forwarded-for", HeaderValue::from_static("192.0.2.7"));
        let tcp = TcpStream::connect(mock.addr).await.unwrap();
        tokio_tungstenite::client_async(req, tcp)
            .await
            .map(|(ws, _)| ws)
    }

    async fn recv(ws: &mut Client) -> Message {
        tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("timed out")
            .expect("stream ended")
            .expect("ws error")
    }

    async fn recv_json(ws: &mut Client) -> Value {
        match recv(ws).await {
            Message::Text(t) => serde_json::from_str(t.as_str()).unwrap(),
            other => panic!("expected text, got {other:?}"),
        }
    }

    fn config() -> MockUpstreamConfig {
        MockUpstreamConfig {
            auth_key: Some("server-secret".into()),
            ..MockUpstreamConfig::default()
        }
    }

    async fn hello(ws: &mut Client, frame_duration: u32) -> String {
        let hello = json!({
            "type": "hello", "version": 2, "transport": "websocket",
            "audio_params": {"format": "opus", "sample_rate": 16000, "channels": 1, "frame_duration": 60},
            "features": {"mcp": true},
        });
        ws.send(Message::text(hello.to_string())).await.unwrap();
        let reply = recv_json(ws).await;
        assert_eq!(reply["type"], "hello");
        assert_eq!(reply["transport"], "websocket");
        assert_eq!(
            reply["audio_params"],
            json!({"format": "opus", "sample_rate": 24000, "channels": 1, "frame_duration": frame_duration})
        );
        reply["session_id"].as_str().unwrap().to_string()
    }

    #[tokio::test]
    async fn one_turn() {
        let mock = MockUpstream::start(config()).await.unwrap();
        let mut ws = connect(&mock, "server-secret", unix_now()).await.unwrap();
        let sid = hello(&mut ws, 60).await;
        for i in 0..5u32 {
            let f = encode_uplink(i * 60, &[0x78, i as u8, 0, 0]);
            ws.send(Message::binary(f)).await.unwrap();
        }
        let stt = recv_json(&mut ws).await;
        assert_eq!(
            stt,
            json!({"type": "stt", "text": "turn 1", "session_id": sid})
        );
        let start = recv_json(&mut ws).await;
        assert_eq!(
            start,
            json!({"type": "tts", "state": "start", "session_id": sid})
        );
        let llm = recv_json(&mut ws).await;
        assert_eq!(llm["type"], "llm");
        assert_eq!(llm["emotion"], "happy");
        let sentence = recv_json(&mut ws).await;
        assert_eq!(sentence["state"], "sentence_start");
        assert_eq!(sentence["text"], "reply 1");
        for i in 0..5u32 {
            let Message::Binary(b) = recv(&mut ws).await else {
                panic!("expected a binary frame");
            };
            let d = parse_downlink(&b).unwrap();
            assert_eq!(d.sequence, i + 1);
            assert_eq!(d.timestamp, i * 60);
            assert_eq!(d.opus.len(), 40);
            assert_eq!(parse_reply_frame(&d.opus), Some((1, i)));
        }
        let stop = recv_json(&mut ws).await;
        assert_eq!(
            stop,
            json!({"type": "tts", "state": "stop", "session_id": sid})
        );

        // Upstream-initiated MCP request, and the gateway's answer.
        let mcp = json!({"type": "mcp", "payload": {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}});
        assert!(mock.send_text_to_newest(mcp.to_string()).await);
        assert_eq!(recv_json(&mut ws).await, mcp);
        let answer =
            json!({"type": "mcp", "payload": {"jsonrpc": "2.0", "id": 1, "result": {"tools": []}}});
        ws.send(Message::text(answer.to_string())).await.unwrap();
        let got = mock
            .wait_text(Duration::from_secs(5), |v| v["type"] == "mcp")
            .await;
        assert_eq!(got, Some(answer));

        ws.send(Message::text(
            json!({"type": "goodbye", "session_id": sid}).to_string(),
        ))
        .await
        .unwrap();
        // The server closes after the goodbye.
        loop {
            match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
                Ok(Some(Ok(Message::Close(_))) | None | Some(Err(_))) => break,
                Ok(Some(Ok(_))) => {}
                Err(_) => panic!("server did not close after goodbye"),
            }
        }

        let o = mock.observed();
        assert_eq!(o.connections, 1);
        assert!(o.rejected.is_empty());
        assert_eq!(o.paths, vec![GATEWAY_PATH.to_string()]);
        assert_eq!(o.headers[0]["device-id"], DEVICE_ID);
        assert_eq!(o.headers[0]["x-forwarded-for"], "192.0.2.7");
        assert_eq!(o.hellos.len(), 1);
        assert_eq!(o.uplink_frames, 5);
        assert_eq!(o.uplink_timestamps, vec![0, 60, 120, 180, 240]);
        assert_eq!(o.malformed_uplink, 0);
        assert_eq!(o.session_ids, vec![sid]);
        assert_eq!(o.turns, 1);
        assert_eq!(o.closes_by_gateway, 1);
        mock.stop().await;
    }

    #[tokio::test]
    async fn wrong_token_is_rejected() {
        let mock = MockUpstream::start(config()).await.unwrap();
        match connect(&mock, "wrong-secret", unix_now()).await {
            Err(WsError::Http(resp)) => assert_eq!(resp.status(), StatusCode::UNAUTHORIZED),
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("wrong token accepted"),
        }
        match connect(&mock, "server-secret", unix_now() - 301).await {
            Err(WsError::Http(resp)) => assert_eq!(resp.status(), StatusCode::UNAUTHORIZED),
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("stale token accepted"),
        }
        let o = mock.observed();
        assert_eq!(o.connections, 2);
        assert_eq!(o.rejected.len(), 2);
        assert!(o.rejected[0].contains("mismatch"), "{:?}", o.rejected);
        assert!(o.rejected[1].contains("from now"), "{:?}", o.rejected);
        assert!(o.headers.is_empty());
        mock.stop().await;
    }

    #[tokio::test]
    async fn close_mid_turn() {
        let mock = MockUpstream::start(MockUpstreamConfig {
            behavior: Behavior::CloseMidTurn,
            ..config()
        })
        .await
        .unwrap();
        let mut ws = connect(&mock, "server-secret", unix_now()).await.unwrap();
        hello(&mut ws, 60).await;
        ws.send(Message::binary(encode_uplink(0, &[1, 2, 3])))
            .await
            .unwrap();
        match recv(&mut ws).await {
            Message::Close(Some(f)) => assert_eq!(u16::from(f.code), 1011),
            other => panic!("expected close, got {other:?}"),
        }
        // Lets the client flush its reply to the close.
        let _ = ws.next().await;
        mock.stop().await;
        assert_eq!(mock.observed().closes_by_gateway, 0);
    }

    #[tokio::test]
    async fn garbage_then_paced_turn_on_listen_stop() {
        let mock = MockUpstream::start(MockUpstreamConfig {
            behavior: Behavior::GarbageFrames,
            frame_duration: 20,
            reply_frames: 3,
            paced: true,
            auth_key: None,
            ..config()
        })
        .await
        .unwrap();
        let mut ws = connect(&mock, "anything", 0).await.unwrap();
        let sid = hello(&mut ws, 20).await;
        let listen = |state: &str| {
            Message::text(
                json!({"session_id": sid, "type": "listen", "state": state, "mode": "manual"})
                    .to_string(),
            )
        };
        ws.send(listen("start")).await.unwrap();
        ws.send(Message::binary(encode_uplink(0, &[1])))
            .await
            .unwrap();
        ws.send(Message::binary(vec![0u8; 3])).await.unwrap(); // malformed
        match recv(&mut ws).await {
            Message::Binary(b) => assert!(b.len() < HEADER_LEN),
            other => panic!("expected short binary, got {other:?}"),
        }
        match recv(&mut ws).await {
            Message::Text(t) => assert!(serde_json::from_str::<Value>(t.as_str()).is_err()),
            other => panic!("expected non-JSON text, got {other:?}"),
        }
        ws.send(listen("stop")).await.unwrap();
        assert_eq!(recv_json(&mut ws).await["text"], "turn 1");
        for _ in 0..3 {
            recv_json(&mut ws).await;
        }
        let t0 = Instant::now();
        for i in 0..3u32 {
            let Message::Binary(b) = recv(&mut ws).await else {
                panic!("expected a binary frame");
            };
            assert_eq!(
                parse_reply_frame(&parse_downlink(&b).unwrap().opus),
                Some((1, i))
            );
        }
        // Three frames paced at 20 ms: the last one goes out 40 ms after the first.
        assert!(
            t0.elapsed() >= Duration::from_millis(30),
            "{:?}",
            t0.elapsed()
        );
        assert_eq!(recv_json(&mut ws).await["state"], "stop");
        let o = mock.observed();
        assert_eq!((o.uplink_frames, o.malformed_uplink), (1, 1));
        assert_eq!(o.texts.len(), 2);
        drop(ws);
        let deadline = Instant::now() + Duration::from_secs(5);
        while mock.observed().closes_by_gateway == 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(mock.observed().closes_by_gateway, 1);
        mock.stop().await;
    }
}
