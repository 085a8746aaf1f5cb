//! A lean xiaozhi-server stand-in that echoes audio, for benchmarks.
//!
//! Measuring a gateway "through an upstream" needs something at the other end of its
//! WebSocket that answers at once and costs next to nothing, because in a benchmark it
//! shares a core with the load generator: whatever CPU it burns is taken from the
//! measurement. [`crate::simulator::upstream::MockUpstream`] is the full-featured test
//! double (token checks, scripted turns, pacing, failure modes, recording of everything
//! it sees); this module is the opposite, and does only this:
//!
//! * accepts a WebSocket upgrade on any path and query, with any headers;
//! * answers a text `hello` with a WebSocket-transport hello, a fresh 32-hex session id
//!   and the gateway's own `audio_params` (or opus/16 kHz/mono/60 ms when it sent none);
//! * closes normally on a text `goodbye`, and counts and ignores every other text frame;
//! * answers every binary uplink frame (16-byte header: timestamp at bytes 8-11, payload
//!   length at 12-15, then Opus) with one downlink frame at once: byte 0 = 1, the length
//!   (u16 BE) at bytes 2-3, a per-connection sequence from 1 at 4-7, the same timestamp,
//!   the length (u32 BE) at 12-15, then the same Opus bytes unchanged (the load tool
//!   stamps its send time into them). Frames shorter than the header, or whose length
//!   field runs past the end, are counted as bad and skipped.
//!
//! With [`Turns`] set (`bench upstream --turn-secs 3-6`) it also plays conversation
//! turns the way xiaozhi-server does in realtime listening, so that chat history has
//! something to record: after every few seconds of uplink audio (a length drawn per
//! turn from the range, counted in uplink frames of the hello's `frame_duration`) it
//! sends `tts stop` (ending the previous turn), `stt` with a text, `tts start` and
//! `tts sentence_start` with a text, and the echoed audio that follows is that
//! sentence's audio. Speech is continuous: every uplink frame belongs to an utterance.
//!
//! It deliberately does not check tokens or headers, pace its replies, parse binary
//! frames beyond their header, or log per frame.
//!
//! Cost per frame: one task per connection reads every message that is already buffered,
//! queues a reply for each (one allocation per reply) and flushes once when no further
//! message is immediately available, so a burst of frames costs one write. Counters are
//! kept per connection and published to the shared atomics once per batch.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{BufMut as _, Bytes, BytesMut};
use futures_util::{FutureExt as _, SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Length of the binary frame header, both directions.
const HEADER_LEN: usize = 16;
/// How long a connection may take to complete the WebSocket upgrade.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a closing connection waits for the peer's close frame.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// How long [`EchoUpstream::stop`] waits for every task.
const STOP_TIMEOUT: Duration = Duration::from_secs(2);
/// Most messages handled between two flushes, even when more are ready.
const MAX_BATCH: usize = 64;
/// Per-connection read buffer and write-buffer threshold (tungstenite's default of
/// 128 KiB each is far more than a voice connection's 60 ms frames need).
const BUFFER_SIZE: usize = 16 * 1024;

/// Counters of an [`EchoUpstream`], since it started.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct EchoUpstreamStats {
    /// WebSocket connections accepted (upgrade completed).
    pub connections: u64,
    /// WebSocket connections open now.
    pub open: u64,
    /// Well-formed binary uplink frames received.
    pub frames_in: u64,
    /// Downlink frames queued for sending (one per well-formed uplink frame).
    pub frames_out: u64,
    /// Binary frames with a bad header (too short, or a length past the end).
    pub bad_frames: u64,
    /// Text frames received (`hello`, `goodbye` and every ignored one).
    pub text_in: u64,
    /// Turns played (`stt` + `sentence_start` sent), with [`Turns`] set.
    pub turns: u64,
}

/// Conversation turns the upstream plays (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Turns {
    /// Shortest utterance, in seconds.
    pub min_secs: f64,
    /// Longest utterance, in seconds.
    pub max_secs: f64,
}

impl std::str::FromStr for Turns {
    type Err = String;

    /// `S` (every turn S seconds) or `A-B` (each turn between A and B seconds).
    fn from_str(s: &str) -> Result<Turns, String> {
        let (a, b) = s.split_once('-').unwrap_or((s, s));
        let parse = |v: &str| {
            v.trim()
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite() && *v >= 0.1)
                .ok_or_else(|| format!("{v:?}: want seconds >= 0.1"))
        };
        let (min_secs, max_secs) = (parse(a)?, parse(b)?);
        if min_secs > max_secs {
            return Err(format!(
                "{s:?}: the shortest turn is longer than the longest"
            ));
        }
        Ok(Turns { min_secs, max_secs })
    }
}

/// The shared counters behind [`EchoUpstreamStats`].
#[derive(Default)]
struct Counters {
    connections: AtomicU64,
    open: AtomicU64,
    frames_in: AtomicU64,
    frames_out: AtomicU64,
    bad_frames: AtomicU64,
    text_in: AtomicU64,
    turns: AtomicU64,
}

/// A running echo upstream. Dropping it cancels every task; [`stop`](Self::stop) also
/// waits for them.
pub struct EchoUpstream {
    addr: SocketAddr,
    counters: Arc<Counters>,
    cancel: CancellationToken,
    tasks: TaskTracker,
}

impl EchoUpstream {
    /// Binds and starts serving in the background (tokio::spawn on the current runtime).
    pub async fn start(listen: SocketAddr) -> std::io::Result<EchoUpstream> {
        Self::start_with_turns(listen, None).await
    }

    /// Like [`start`](Self::start), playing `turns` on every connection when set.
    pub async fn start_with_turns(
        listen: SocketAddr,
        turns: Option<Turns>,
    ) -> std::io::Result<EchoUpstream> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let counters = Arc::new(Counters::default());
        let cancel = CancellationToken::new();
        let tasks = TaskTracker::new();
        tasks.spawn(accept_loop(
            listener,
            turns,
            counters.clone(),
            cancel.clone(),
            tasks.clone(),
        ));
        Ok(EchoUpstream {
            addr,
            counters,
            cancel,
            tasks,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The URL a gateway should be configured with: `ws://<addr>/xiaozhi/v1/`.
    pub fn url(&self) -> String {
        format!("ws://{}/xiaozhi/v1/", self.addr)
    }

    /// A snapshot of the counters (relaxed loads; per-connection counts are published
    /// once per batch, before the batch's replies are flushed).
    pub fn stats(&self) -> EchoUpstreamStats {
        let c = &*self.counters;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        EchoUpstreamStats {
            connections: load(&c.connections),
            open: load(&c.open),
            frames_in: load(&c.frames_in),
            frames_out: load(&c.frames_out),
            bad_frames: load(&c.bad_frames),
            text_in: load(&c.text_in),
            turns: load(&c.turns),
        }
    }

    /// Stops accepting, closes every connection (close code 1001), waits for the tasks
    /// (bounded by ~2 s).
    pub async fn stop(self) {
        self.cancel.cancel();
        self.tasks.close();
        if tokio::time::timeout(STOP_TIMEOUT, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::debug!(
                left = self.tasks.len(),
                "echo upstream: tasks still running after stop"
            );
        }
    }
}

impl Drop for EchoUpstream {
    fn drop(&mut self) {
        self.cancel.cancel();
        self.tasks.close();
    }
}

async fn accept_loop(
    listener: TcpListener,
    turns: Option<Turns>,
    counters: Arc<Counters>,
    cancel: CancellationToken,
    tasks: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            biased;
            () = cancel.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((tcp, _peer)) => {
                tasks.spawn(connection(tcp, turns, counters.clone(), cancel.clone()));
            }
            Err(e) => {
                // Out of file descriptors and the like: back off a little.
                tracing::debug!(error = %e, "echo upstream: accept failed");
                tokio::select! {
                    () = cancel.cancelled() => break,
                    () = tokio::time::sleep(Duration::from_millis(20)) => {}
                }
            }
        }
    }
}

/// Decrements the open-connection gauge when the connection ends, however it ends.
struct OpenGuard<'a>(&'a AtomicU64);

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

type Ws = WebSocketStream<TcpStream>;

/// Why a connection's serving loop ended.
enum End {
    /// The peer closed, the stream ended or failed: nothing more to do.
    Closed,
    /// The gateway said `goodbye`: close normally.
    Goodbye,
}

async fn connection(
    tcp: TcpStream,
    turns: Option<Turns>,
    counters: Arc<Counters>,
    cancel: CancellationToken,
) {
    let _ = tcp.set_nodelay(true);
    let config = WebSocketConfig::default()
        .read_buffer_size(BUFFER_SIZE)
        .write_buffer_size(BUFFER_SIZE);
    let handshake = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        tokio_tungstenite::accept_async_with_config(tcp, Some(config)),
    );
    let mut ws = tokio::select! {
        biased;
        () = cancel.cancelled() => return,
        r = handshake => match r {
            Ok(Ok(ws)) => ws,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "echo upstream: upgrade failed");
                return;
            }
            Err(_) => {
                tracing::debug!("echo upstream: upgrade timed out");
                return;
            }
        },
    };
    counters.connections.fetch_add(1, Ordering::Relaxed);
    counters.open.fetch_add(1, Ordering::Relaxed);
    let _open = OpenGuard(&counters.open);

    let mut conn = Conn {
        turns,
        ..Conn::default()
    };
    let end = tokio::select! {
        biased;
        () = cancel.cancelled() => None,
        end = conn.serve(&mut ws, &counters) => Some(end),
    };
    conn.publish(&counters);
    let close = match end {
        Some(End::Closed) => return,
        Some(End::Goodbye) => (CloseCode::Normal, "goodbye"),
        None => (CloseCode::Away, "shutting down"),
    };
    let frame = CloseFrame {
        code: close.0,
        reason: close.1.into(),
    };
    // Send the close frame (flushing any replies queued before it) and wait a little
    // for the peer's; tungstenite answers the peer's close and ends the stream.
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        if ws.close(Some(frame)).await.is_ok() {
            while let Some(Ok(_)) = ws.next().await {}
        }
    })
    .await;
    tracing::debug!(code = ?close.0, "echo upstream: connection closed");
}

/// One connection's state: the downlink sequence and counts not yet published.
#[derive(Default)]
struct Conn {
    /// Sequence of the last downlink frame sent (the first one is 1).
    seq: u32,
    frames_in: u64,
    frames_out: u64,
    bad_frames: u64,
    text_in: u64,
    /// Turns played on this connection.
    turns_played: u64,
    /// Turns played since the last publish.
    turns_new: u64,
    /// The turns to play, if any.
    turns: Option<Turns>,
    /// Uplink frame duration the hello announced, in milliseconds.
    frame_ms: u32,
    /// Uplink frames left in the current utterance (0: the first turn starts with the
    /// next frame).
    frames_left: u32,
}

/// Text of every `stt` the upstream sends.
const STT_TEXT: &str = "今天天气怎么样";
/// Text of every `sentence_start` the upstream sends.
const SENTENCE_TEXT: &str = "今天是晴天，气温二十度左右，适合出门散步。";

impl Conn {
    /// Reads and answers until the connection ends or the gateway says goodbye.
    async fn serve(&mut self, ws: &mut Ws, counters: &Counters) -> End {
        loop {
            // Wait for input only with nothing queued: the previous batch was flushed.
            let Some(Ok(msg)) = ws.next().await else {
                return End::Closed;
            };
            if let Some(end) = self.handle(ws, msg).await {
                return end;
            }
            // Answer whatever else is already buffered before paying for a write.
            for _ in 1..MAX_BATCH {
                match ws.next().now_or_never() {
                    None => break,
                    Some(Some(Ok(msg))) => {
                        if let Some(end) = self.handle(ws, msg).await {
                            return end;
                        }
                    }
                    Some(_) => return End::Closed,
                }
            }
            self.publish(counters);
            if let Err(e) = ws.flush().await {
                tracing::debug!(error = %e, "echo upstream: flush failed");
                return End::Closed;
            }
        }
    }

    /// Handles one message, queueing (not flushing) any reply. `Some` ends the loop.
    async fn handle(&mut self, ws: &mut Ws, msg: Message) -> Option<End> {
        match msg {
            Message::Binary(frame) => {
                let Some(reply) = self.echo(&frame) else {
                    self.bad_frames += 1;
                    return None;
                };
                self.frames_in += 1;
                if let Err(e) = self.next_turn(ws).await {
                    tracing::debug!(error = %e, "echo upstream: send failed");
                    return Some(End::Closed);
                }
                if let Err(e) = ws.feed(Message::Binary(reply)).await {
                    tracing::debug!(error = %e, "echo upstream: send failed");
                    return Some(End::Closed);
                }
                self.frames_out += 1;
                None
            }
            Message::Text(text) => {
                self.text_in += 1;
                let Ok(mut v) = serde_json::from_str::<Value>(text.as_str()) else {
                    return None;
                };
                match v.get("type").and_then(Value::as_str) {
                    Some("hello") => {
                        self.frame_ms = v
                            .pointer("/audio_params/frame_duration")
                            .and_then(Value::as_u64)
                            .and_then(|ms| u32::try_from(ms).ok())
                            .filter(|ms| *ms > 0)
                            .unwrap_or(60);
                        let reply = hello_reply(v.get_mut("audio_params").map(Value::take));
                        if let Err(e) = ws.feed(Message::text(reply)).await {
                            tracing::debug!(error = %e, "echo upstream: send failed");
                            return Some(End::Closed);
                        }
                        None
                    }
                    Some("goodbye") => Some(End::Goodbye),
                    _ => None,
                }
            }
            // Pings are answered by tungstenite; after a close frame the stream ends.
            _ => None,
        }
    }

    /// Counts an uplink frame against the current utterance; when it is the first of a
    /// new one, queues the turn's messages (previous sentence's end, `stt`, the new
    /// sentence) ahead of the frame's echo.
    async fn next_turn(
        &mut self,
        ws: &mut Ws,
    ) -> Result<(), tokio_tungstenite::tungstenite::Error> {
        let Some(turns) = self.turns else {
            return Ok(());
        };
        if self.frames_left > 0 {
            self.frames_left -= 1;
            return Ok(());
        }
        let secs = if turns.max_secs > turns.min_secs {
            rand::random_range(turns.min_secs..=turns.max_secs)
        } else {
            turns.min_secs
        };
        let frame_ms = f64::from(self.frame_ms.max(1));
        self.frames_left = ((secs * 1000.0 / frame_ms).round() as u32).max(1) - 1;
        if self.turns_played > 0 {
            ws.feed(Message::text(r#"{"type":"tts","state":"stop"}"#))
                .await?;
            ws.feed(Message::text(
                json!({"type": "stt", "text": STT_TEXT}).to_string(),
            ))
            .await?;
        }
        ws.feed(Message::text(r#"{"type":"tts","state":"start"}"#))
            .await?;
        ws.feed(Message::text(
            json!({"type": "tts", "state": "sentence_start", "text": SENTENCE_TEXT}).to_string(),
        ))
        .await?;
        self.turns_played += 1;
        self.turns_new += 1;
        Ok(())
    }

    /// The downlink answer to an uplink frame, or `None` if its header is bad.
    fn echo(&mut self, frame: &[u8]) -> Option<Bytes> {
        let (header, body) = frame.split_first_chunk::<HEADER_LEN>()?;
        let len = u32::from_be_bytes([header[12], header[13], header[14], header[15]]);
        let opus = body.get(..usize::try_from(len).ok()?)?;
        self.seq = self.seq.wrapping_add(1);
        let mut reply = BytesMut::with_capacity(HEADER_LEN + opus.len());
        reply.put_u8(1);
        reply.put_u8(0);
        reply.put_u16(u16::try_from(len).unwrap_or(u16::MAX));
        reply.put_u32(self.seq);
        reply.put_slice(&header[8..12]);
        reply.put_u32(len);
        reply.put_slice(opus);
        Some(reply.freeze())
    }

    /// Adds the counts since the last call to the shared counters.
    fn publish(&mut self, counters: &Counters) {
        for (local, shared) in [
            (&mut self.frames_in, &counters.frames_in),
            (&mut self.frames_out, &counters.frames_out),
            (&mut self.bad_frames, &counters.bad_frames),
            (&mut self.text_in, &counters.text_in),
            (&mut self.turns_new, &counters.turns),
        ] {
            if *local != 0 {
                shared.fetch_add(std::mem::take(local), Ordering::Relaxed);
            }
        }
    }
}

/// The server hello: WebSocket transport, a fresh session id, and the gateway's audio
/// params (or opus, 16 kHz, mono, 60 ms when it sent none).
fn hello_reply(audio_params: Option<Value>) -> String {
    let audio_params = match audio_params {
        Some(p) if !p.is_null() => p,
        _ => json!({"format": "opus", "sample_rate": 16000, "channels": 1, "frame_duration": 60}),
    };
    json!({
        "type": "hello",
        "transport": "websocket",
        "session_id": hex::encode(rand::random::<[u8; 16]>()),
        "audio_params": audio_params,
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

    type Client = WebSocketStream<TcpStream>;

    const WAIT: Duration = Duration::from_secs(5);

    async fn start() -> EchoUpstream {
        EchoUpstream::start(([127, 0, 0, 1], 0).into())
            .await
            .expect("bind")
    }

    /// Connects as the MQTT gateway does (path, query and headers).
    async fn connect(up: &EchoUpstream) -> Client {
        let tcp = TcpStream::connect(up.local_addr()).await.expect("connect");
        tcp.set_nodelay(true).expect("nodelay");
        let mut req = format!("{}?from=mqtt_gateway", up.url())
            .into_client_request()
            .expect("request");
        let h = req.headers_mut();
        h.insert("device-id", "aa:bb:cc:dd:ee:ff".parse().expect("header"));
        h.insert("client-id", "c0ffee".parse().expect("header"));
        h.insert("protocol-version", "2".parse().expect("header"));
        h.insert("authorization", "Bearer x.1".parse().expect("header"));
        let (ws, _) = tokio_tungstenite::client_async(req, tcp)
            .await
            .expect("upgrade");
        ws
    }

    async fn recv(ws: &mut Client) -> Message {
        tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("timed out")
            .expect("stream ended")
            .expect("ws error")
    }

    async fn recv_json(ws: &mut Client) -> Value {
        match recv(ws).await {
            Message::Text(t) => serde_json::from_str(t.as_str()).expect("json"),
            other => panic!("expected text, got {other:?}"),
        }
    }

    fn uplink(ts: u32, opus: &[u8]) -> Vec<u8> {
        let mut v = vec![0u8; HEADER_LEN];
        v[8..12].copy_from_slice(&ts.to_be_bytes());
        v[12..16].copy_from_slice(&(opus.len() as u32).to_be_bytes());
        v.extend_from_slice(opus);
        v
    }

    /// `(sequence, timestamp, opus)` of a downlink frame, checking the fixed fields.
    fn downlink(msg: Message) -> (u32, u32, Vec<u8>) {
        let Message::Binary(b) = msg else {
            panic!("expected binary, got {msg:?}");
        };
        assert!(b.len() >= HEADER_LEN, "short downlink frame");
        assert_eq!(b[0], 1);
        assert_eq!(b[1], 0);
        let len = u32::from_be_bytes([b[12], b[13], b[14], b[15]]) as usize;
        assert_eq!(usize::from(u16::from_be_bytes([b[2], b[3]])), len);
        assert_eq!(b.len(), HEADER_LEN + len);
        let seq = u32::from_be_bytes([b[4], b[5], b[6], b[7]]);
        let ts = u32::from_be_bytes([b[8], b[9], b[10], b[11]]);
        (seq, ts, b[HEADER_LEN..].to_vec())
    }

    async fn hello(ws: &mut Client, audio_params: Value) -> Value {
        let hello = json!({
            "type": "hello", "version": 2, "transport": "websocket",
            "audio_params": audio_params, "features": {"mcp": true},
        });
        ws.send(Message::text(hello.to_string()))
            .await
            .expect("send");
        recv_json(ws).await
    }

    async fn eventually(up: &EchoUpstream, pred: impl Fn(&EchoUpstreamStats) -> bool) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !pred(&up.stats()) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "stats never matched: {:?}",
                up.stats()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn hello_reply_echoes_audio_params() {
        let up = start().await;
        let mut ws = connect(&up).await;
        let params =
            json!({"format": "opus", "sample_rate": 24000, "channels": 1, "frame_duration": 20});
        let reply = hello(&mut ws, params.clone()).await;
        assert_eq!(reply["type"], "hello");
        assert_eq!(reply["transport"], "websocket");
        let sid = reply["session_id"].as_str().expect("session_id");
        assert_eq!(sid.len(), 32);
        assert!(sid.bytes().all(|b| b.is_ascii_hexdigit()), "{sid}");
        assert_eq!(reply["audio_params"], params);

        // Without audio_params: the default ones; a second session id differs.
        ws.send(Message::text(r#"{"type":"hello","version":2}"#))
            .await
            .expect("send");
        let reply2 = recv_json(&mut ws).await;
        assert_eq!(
            reply2["audio_params"],
            json!({"format": "opus", "sample_rate": 16000, "channels": 1, "frame_duration": 60})
        );
        assert_ne!(reply2["session_id"], reply["session_id"]);

        // Other text frames are counted and ignored.
        ws.send(Message::text(r#"{"type":"listen","state":"start"}"#))
            .await
            .expect("send");
        ws.send(Message::text("not json")).await.expect("send");
        eventually(&up, |s| s.text_in == 4).await;
        let s = up.stats();
        assert_eq!((s.connections, s.open), (1, 1));
        drop(ws); // or stop() waits CLOSE_GRACE for its close reply
        up.stop().await;
    }

    #[tokio::test]
    async fn echoes_frames_in_order() {
        let up = start().await;
        let mut ws = connect(&up).await;
        hello(&mut ws, json!({"format": "opus"})).await;
        let payload = |i: u32| -> Vec<u8> {
            let n = 20 + (i as usize * 7) % 200;
            (0..n).map(|j| (i as usize * 31 + j) as u8).collect()
        };
        for i in 0..100u32 {
            ws.feed(Message::binary(uplink(1000 + i * 60, &payload(i))))
                .await
                .expect("feed");
        }
        ws.flush().await.expect("flush");
        for i in 0..100u32 {
            let (seq, ts, opus) = downlink(recv(&mut ws).await);
            assert_eq!(seq, i + 1);
            assert_eq!(ts, 1000 + i * 60);
            assert_eq!(opus, payload(i), "frame {i}");
        }
        let s = up.stats();
        assert_eq!((s.frames_in, s.frames_out, s.bad_frames), (100, 100, 0));
        drop(ws); // or stop() waits CLOSE_GRACE for its close reply
        up.stop().await;
    }

    #[tokio::test]
    async fn bad_frames_are_counted_and_skipped() {
        let up = start().await;
        let mut ws = connect(&up).await;
        ws.send(Message::binary(vec![0u8; 10])).await.expect("send");
        let mut too_long = uplink(5, b"abcd");
        too_long[12..16].copy_from_slice(&5u32.to_be_bytes());
        ws.send(Message::binary(too_long)).await.expect("send");
        // Non-zero bytes 0-7 and trailing bytes past the length are tolerated.
        let mut good = uplink(7, b"opus!");
        good[..8].copy_from_slice(&[9; 8]);
        good.extend_from_slice(b"trailing");
        ws.send(Message::binary(good)).await.expect("send");
        let (seq, ts, opus) = downlink(recv(&mut ws).await);
        assert_eq!((seq, ts, opus.as_slice()), (1, 7, &b"opus!"[..]));
        let s = up.stats();
        assert_eq!((s.bad_frames, s.frames_in, s.frames_out), (2, 1, 1));
        drop(ws); // or stop() waits CLOSE_GRACE for its close reply
        up.stop().await;
    }

    #[tokio::test]
    async fn goodbye_closes_and_stop_closes_open_connections() {
        let up = start().await;

        let mut ws = connect(&up).await;
        hello(&mut ws, json!({})).await;
        ws.send(Message::text(r#"{"type":"goodbye","session_id":"x"}"#))
            .await
            .expect("send");
        match recv(&mut ws).await {
            Message::Close(Some(f)) => assert_eq!(f.code, CloseCode::Normal),
            other => panic!("expected close, got {other:?}"),
        }
        let end = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("timed out");
        assert!(end.is_none(), "{end:?}");
        eventually(&up, |s| s.open == 0).await;

        let mut a = connect(&up).await;
        let mut b = connect(&up).await;
        eventually(&up, |s| s.open == 2 && s.connections == 3).await;
        let started = tokio::time::Instant::now();
        let stopping = tokio::spawn(up.stop());
        for ws in [&mut a, &mut b] {
            match recv(ws).await {
                Message::Close(Some(f)) => assert_eq!(f.code, CloseCode::Away),
                other => panic!("expected close, got {other:?}"),
            }
            let end = tokio::time::timeout(WAIT, ws.next())
                .await
                .expect("timed out");
            assert!(end.is_none(), "{end:?}");
        }
        tokio::time::timeout(WAIT, stopping)
            .await
            .expect("stop timed out")
            .expect("stop panicked");
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn turns_interleave_stt_and_sentences_with_the_echo() {
        let up = EchoUpstream::start_with_turns(
            ([127, 0, 0, 1], 0).into(),
            Some("0.12".parse().expect("turns")),
        )
        .await
        .expect("bind");
        let mut ws = connect(&up).await;
        hello(&mut ws, json!({"format": "opus", "frame_duration": 60})).await;
        for i in 0..5u32 {
            ws.feed(Message::binary(uplink(i, b"opus")))
                .await
                .expect("feed");
        }
        ws.flush().await.expect("flush");
        // Two 60 ms frames per turn: each turn opens with its messages.
        let mut seen = Vec::new();
        for _ in 0..(5 + 2 + 4 * 2) {
            seen.push(match recv(&mut ws).await {
                Message::Text(t) => {
                    let v: Value = serde_json::from_str(t.as_str()).expect("json");
                    format!(
                        "{}{}",
                        v["type"].as_str().unwrap_or("?"),
                        v["state"]
                            .as_str()
                            .map(|s| format!(" {s}"))
                            .unwrap_or_default()
                    )
                }
                other => format!("audio {}", downlink(other).1),
            });
        }
        let turn = ["tts stop", "stt", "tts start", "tts sentence_start"];
        let mut want = vec!["tts start", "tts sentence_start", "audio 0", "audio 1"];
        want.extend(turn);
        want.extend(["audio 2", "audio 3"]);
        want.extend(turn);
        want.push("audio 4");
        assert_eq!(seen, want);
        eventually(&up, |s| s.turns == 3 && s.frames_in == 5).await;
        assert!("5-3".parse::<Turns>().is_err());
        assert!("0".parse::<Turns>().is_err());
        assert_eq!(
            "3-6".parse::<Turns>(),
            Ok(Turns {
                min_secs: 3.0,
                max_secs: 6.0
            })
        );
        drop(ws);
        up.stop().await;
    }
}
