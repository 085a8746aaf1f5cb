//! The soak's simulated fleet: devices that connect, hold conversations of a few turns
//! through the speech server, pause, and now and then leave (cleanly or by vanishing)
//! and come back, some as new devices. Every device retries when the gateway or the
//! speech server refuses it, with a backoff, as firmware does when the user tries again.
//!
//! Each device also keeps the ledger the exactly-once check needs ([`super::check`]):
//! per conversation, the records its completed turns must have left (the `stt` and
//! sentence texts it heard) and the ones a turn cut short may have left. The turn loop
//! is the soak's own rather than `simulator::demo::speak_turn`, because the ledger needs
//! the texts the device heard and the soak needs to notice the gateway's `goodbye`
//! (a fault ends the conversation) instead of waiting out a timeout.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::check::{ASSISTANT, ExpectedConversation, USER};
use crate::simulator::audio::{ServerHello, SimAudio, synthetic_frame};
use crate::simulator::device::{DeviceCredentials, SimDevice, SimDeviceOptions, SimError};

/// Duration of each uplink frame, as the firmware sends them.
pub const FRAME_MS: u32 = 60;
/// Bytes of each synthetic uplink frame.
const FRAME_BYTES: usize = 40;
/// How long a device waits for the server's hello, as the firmware does.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a device waits for the reply to a turn before giving up on the conversation.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// Loopback source addresses the fleet spreads over (127.0.0.2 and up), so that the
/// gateway's per-source admission limits see a crowd of hosts, as in the field, rather
/// than one host with a thousand connections.
const SOURCES: u32 = 16;
/// First and largest retry delay after a refusal or a failed connect.
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// How the fleet behaves.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// The gateway's device MQTT address.
    pub mqtt: SocketAddr,
    /// Device passwords are signed with this (the gateway's `auth.signature_key`).
    pub signature_key: String,
    pub group: String,
    /// Devices connected at once (the fleet's size).
    pub devices: u32,
    /// Devices started per second during the ramp.
    pub connect_rate: u32,
    /// Turns per conversation: 1 to this many.
    pub max_turns: u32,
    /// Frames spoken per turn (the speech server's `frames_per_turn`).
    pub frames_per_turn: u32,
    /// Pause between turns and between conversations (uniform in each range).
    pub turn_pause: (Duration, Duration),
    pub conversation_pause: (Duration, Duration),
    /// Chance that a device leaves after a conversation.
    pub churn: f64,
    /// Chance that a device that left comes back as a new device (a new MAC).
    pub new_device_share: f64,
    /// How long a device that left stays away.
    pub away: (Duration, Duration),
    /// The speech server's dialogue (cycled per conversation), to know what a turn cut
    /// short would have recorded.
    pub dialogue: Vec<(String, String)>,
    /// Seeds every device's random choices.
    pub seed: u64,
}

/// Counters of the fleet, read while it runs.
#[derive(Default)]
pub struct FleetStats {
    connected: AtomicI64,
    connects: AtomicU64,
    connect_failures: AtomicU64,
    conversations: AtomicU64,
    refused: AtomicU64,
    turns_completed: AtomicU64,
    turns_cut: AtomicU64,
    ended_by_gateway: AtomicU64,
    leaves: AtomicU64,
    new_devices: AtomicU64,
    text_mismatches: AtomicU64,
}

/// A copy of [`FleetStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct FleetSnapshot {
    /// Devices with a live MQTT connection now.
    pub connected: u64,
    /// MQTT connections made, and attempts that failed.
    pub connects: u64,
    pub connect_failures: u64,
    /// Conversations opened (the server's hello arrived).
    pub conversations: u64,
    /// Hellos refused (an alert, or no hello within 10 s).
    pub refused: u64,
    /// Turns heard complete (`stt` and `tts stop`), and turns cut short.
    pub turns_completed: u64,
    pub turns_cut: u64,
    /// Conversations the gateway ended (`goodbye`: an upstream failure).
    pub ended_by_gateway: u64,
    /// Times a device left (disconnect or vanish), and came back as a new device.
    pub leaves: u64,
    pub new_devices: u64,
    /// Completed turns whose texts were not the dialogue line the device expected.
    pub text_mismatches: u64,
}

impl FleetStats {
    pub fn snapshot(&self) -> FleetSnapshot {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        FleetSnapshot {
            connected: self.connected.load(Ordering::Relaxed).max(0) as u64,
            connects: l(&self.connects),
            connect_failures: l(&self.connect_failures),
            conversations: l(&self.conversations),
            refused: l(&self.refused),
            turns_completed: l(&self.turns_completed),
            turns_cut: l(&self.turns_cut),
            ended_by_gateway: l(&self.ended_by_gateway),
            leaves: l(&self.leaves),
            new_devices: l(&self.new_devices),
            text_mismatches: l(&self.text_mismatches),
        }
    }
}

fn inc(a: &AtomicU64) {
    a.fetch_add(1, Ordering::Relaxed);
}

struct Shared {
    config: FleetConfig,
    stats: FleetStats,
    ledger: Mutex<Vec<ExpectedConversation>>,
    /// The next MAC number a new device takes.
    next_mac: AtomicU32,
}

/// The running fleet.
pub struct Fleet {
    shared: Arc<Shared>,
    stop: CancellationToken,
    tasks: JoinSet<()>,
}

impl Fleet {
    /// Starts every device (they ramp up at `connect_rate`).
    pub fn start(config: FleetConfig) -> Fleet {
        let shared = Arc::new(Shared {
            next_mac: AtomicU32::new(config.devices),
            config,
            stats: FleetStats::default(),
            ledger: Mutex::new(Vec::new()),
        });
        let stop = CancellationToken::new();
        let mut tasks = JoinSet::new();
        for slot in 0..shared.config.devices {
            tasks.spawn(device(slot, shared.clone(), stop.clone()));
        }
        Fleet {
            shared,
            stop,
            tasks,
        }
    }

    pub fn stats(&self) -> FleetSnapshot {
        self.shared.stats.snapshot()
    }

    /// Stops every device (a turn in flight counts as cut short) and returns the ledger,
    /// sorted by session id as the check wants it, and the final counters.
    pub async fn stop(mut self) -> (Vec<ExpectedConversation>, FleetSnapshot) {
        self.stop.cancel();
        while self.tasks.join_next().await.is_some() {}
        let mut ledger =
            std::mem::take(&mut *self.shared.ledger.lock().unwrap_or_else(|e| e.into_inner()));
        ledger.sort_by(|a, b| a.session_id.as_bytes().cmp(b.session_id.as_bytes()));
        (ledger, self.shared.stats.snapshot())
    }
}

fn between(rng: &mut StdRng, (lo, hi): (Duration, Duration)) -> Duration {
    if hi <= lo {
        lo
    } else {
        rng.random_range(lo..=hi)
    }
}

/// Sleeps, unless stopped first; `false` if stopped.
async fn pause(stop: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        _ = stop.cancelled() => false,
        _ = tokio::time::sleep(d) => true,
    }
}

/// Exponential backoff with jitter: `attempt` 0 waits about [`BACKOFF_MIN`].
fn backoff(rng: &mut StdRng, attempt: u32) -> Duration {
    let base = BACKOFF_MIN
        .saturating_mul(1 << attempt.min(5))
        .min(BACKOFF_MAX);
    base.mul_f64(rng.random_range(0.5..1.5))
}

/// How a device's connection ended.
enum Life {
    /// The soak is over.
    Stopped,
    /// The device decided to leave (`vanish`: without DISCONNECT).
    Leave { vanish: bool },
    /// The connection failed.
    Lost,
}

/// How one conversation ended.
enum Conversation {
    /// All its turns done (or given up on) and the goodbye sent.
    Done,
    /// The gateway ended it (`goodbye`).
    EndedByGateway,
    /// No hello: an alert or a timeout.
    Refused,
    /// The connection failed.
    Lost,
}

/// How one turn ended.
enum Turn {
    Complete,
    EndedByGateway,
    TimedOut,
}

/// The local address device `slot` connects from: one of [`SOURCES`] loopback
/// addresses when the gateway is on IPv4 loopback, else the unspecified address.
fn source_address(gateway: SocketAddr, slot: u32) -> IpAddr {
    match gateway.ip() {
        IpAddr::V4(ip) if ip.is_loopback() => {
            IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + (slot % SOURCES) as u8))
        }
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
    }
}

/// Connects from `source` and completes CONNECT/CONNACK.
async fn connect(
    gateway: SocketAddr,
    source: IpAddr,
    credentials: DeviceCredentials,
) -> Result<SimDevice, SimError> {
    let socket = match source {
        IpAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        IpAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.bind((source, 0).into())?;
    let stream = socket.connect(gateway).await?;
    stream.set_nodelay(true)?;
    SimDevice::connect_over_with(Box::new(stream), credentials, SimDeviceOptions::default()).await
}

/// One device slot, until stopped.
async fn device(slot: u32, shared: Arc<Shared>, stop: CancellationToken) {
    let config = &shared.config;
    let mut rng = StdRng::seed_from_u64(config.seed ^ (u64::from(slot) << 20));
    // Ramp: the slot starts at its place in line, then at a random point of a pause.
    let ramp = Duration::from_secs_f64(f64::from(slot) / f64::from(config.connect_rate.max(1)));
    if !pause(&stop, ramp).await {
        return;
    }
    let source = source_address(config.mqtt, slot);
    let mut mac_n = slot;
    let mut failures = 0u32;
    loop {
        let credentials = DeviceCredentials::for_mac(
            DeviceCredentials::nth_mac(mac_n),
            &config.group,
            Some(config.signature_key.as_bytes()),
        );
        let connected = tokio::select! {
            _ = stop.cancelled() => return,
            r = connect(config.mqtt, source, credentials) => r,
        };
        let mut dev = match connected {
            Ok(dev) => dev,
            Err(e) => {
                tracing::debug!(slot, error = %e, "soak device: connect failed");
                inc(&shared.stats.connect_failures);
                let wait = backoff(&mut rng, failures);
                failures += 1;
                if !pause(&stop, wait).await {
                    return;
                }
                continue;
            }
        };
        failures = 0;
        inc(&shared.stats.connects);
        shared.stats.connected.fetch_add(1, Ordering::Relaxed);
        let life = connected_life(&shared, &mut dev, source, &mut rng, &stop).await;
        shared.stats.connected.fetch_sub(1, Ordering::Relaxed);
        let away = match life {
            Life::Stopped => {
                dev.disconnect().await;
                return;
            }
            Life::Lost => {
                drop(dev);
                backoff(&mut rng, 0)
            }
            Life::Leave { vanish } => {
                if vanish {
                    dev.vanish().await;
                } else {
                    dev.disconnect().await;
                }
                inc(&shared.stats.leaves);
                if rng.random_bool(config.new_device_share.clamp(0.0, 1.0)) {
                    mac_n = shared.next_mac.fetch_add(1, Ordering::Relaxed);
                    inc(&shared.stats.new_devices);
                }
                between(&mut rng, config.away)
            }
        };
        if !pause(&stop, away).await {
            return;
        }
    }
}

/// Conversations on one connection until the device leaves, the connection fails or the
/// soak stops.
async fn connected_life(
    shared: &Shared,
    dev: &mut SimDevice,
    source: IpAddr,
    rng: &mut StdRng,
    stop: &CancellationToken,
) -> Life {
    let config = &shared.config;
    // The first conversation starts at a random point of a pause, so that devices do
    // not talk in lockstep.
    let first = between(rng, (Duration::ZERO, config.conversation_pause.1));
    if !pause(stop, first).await {
        return Life::Stopped;
    }
    let mut refusals = 0u32;
    loop {
        let mut log = ExpectedConversation {
            session_id: String::new(),
            mac: dev.credentials.mac.colon(),
            required: Vec::new(),
            allowed: Vec::new(),
        };
        let turns = rng.random_range(1..=config.max_turns.max(1));
        let outcome = tokio::select! {
            _ = stop.cancelled() => None,
            c = conversation(shared, dev, source, turns, rng, &mut log) => Some(c),
        };
        if !log.session_id.is_empty() {
            inc(&shared.stats.conversations);
            if !log.required.is_empty() || !log.allowed.is_empty() {
                shared
                    .stats
                    .turns_cut
                    .fetch_add((log.allowed.len() / 2) as u64, Ordering::Relaxed);
                shared
                    .ledger
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(log);
            }
        }
        let wait = match outcome {
            None => return Life::Stopped,
            Some(Conversation::Lost) => return Life::Lost,
            Some(Conversation::Refused) => {
                inc(&shared.stats.refused);
                refusals += 1;
                backoff(rng, refusals - 1)
            }
            Some(Conversation::EndedByGateway) => {
                inc(&shared.stats.ended_by_gateway);
                refusals = 0;
                backoff(rng, 0)
            }
            Some(Conversation::Done) => {
                refusals = 0;
                if rng.random_bool(config.churn.clamp(0.0, 1.0)) {
                    return Life::Leave {
                        vanish: rng.random_bool(0.5),
                    };
                }
                between(rng, config.conversation_pause)
            }
        };
        if !pause(stop, wait).await {
            return Life::Stopped;
        }
        if dev.is_closed() {
            return Life::Lost;
        }
    }
}

/// The message's `type`, `state`, `session_id` and `text`.
fn fields(payload: &[u8]) -> Option<(String, String, String, String)> {
    let v: Value = serde_json::from_slice(payload).ok()?;
    let s = |k: &str| v[k].as_str().unwrap_or_default().to_owned();
    Some((s("type"), s("state"), s("session_id"), s("text")))
}

/// Hello, `turns` turns, goodbye. Fills `log` as it goes.
async fn conversation(
    shared: &Shared,
    dev: &mut SimDevice,
    source: IpAddr,
    turns: u32,
    rng: &mut StdRng,
    log: &mut ExpectedConversation,
) -> Conversation {
    let config = &shared.config;
    // Leftovers of the previous conversation (a late alert or goodbye) must not be
    // taken for answers to this one.
    while dev.recv(Duration::ZERO).await.is_ok() {}
    if dev
        .publish_json(&SimDevice::firmware_hello())
        .await
        .is_err()
    {
        return Conversation::Lost;
    }
    let deadline = tokio::time::Instant::now() + HELLO_TIMEOUT;
    let hello = loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let payload = match dev.recv(left).await {
            Ok((_, p)) => p,
            Err(SimError::Timeout(_)) => return Conversation::Refused,
            Err(_) => return Conversation::Lost,
        };
        let Ok(message) = serde_json::from_slice::<Value>(&payload) else {
            continue;
        };
        match message["type"].as_str() {
            Some("hello") => break message,
            Some("alert") => return Conversation::Refused,
            _ => {}
        }
    };
    let Ok(hello) = ServerHello::parse(&hello) else {
        return Conversation::Refused;
    };
    let Ok(mut audio) = SimAudio::open(&hello, (source, 0).into()).await else {
        return Conversation::Lost;
    };
    log.session_id = hello.session_id.clone();
    let session = hello.session_id;
    for n in 1..=turns {
        let turn = match turn(shared, dev, &mut audio, &session, n, log).await {
            Ok(t) => t,
            Err(_) => return Conversation::Lost,
        };
        match turn {
            Turn::Complete => {}
            Turn::EndedByGateway => return Conversation::EndedByGateway,
            Turn::TimedOut => break,
        }
        if n < turns {
            // Between turns, listen for the gateway ending the conversation.
            let until = tokio::time::Instant::now() + between(rng, config.turn_pause);
            loop {
                let left = until.saturating_duration_since(tokio::time::Instant::now());
                match dev.recv(left).await {
                    Ok((_, p)) => {
                        if let Some((kind, _, sid, _)) = fields(&p)
                            && kind == "goodbye"
                            && (sid == session || sid.is_empty())
                        {
                            return Conversation::EndedByGateway;
                        }
                    }
                    Err(SimError::Timeout(_)) => break,
                    Err(_) => return Conversation::Lost,
                }
            }
        }
    }
    match dev
        .publish_json(&json!({"session_id": session, "type": "goodbye"}))
        .await
    {
        Ok(()) => Conversation::Done,
        Err(_) => Conversation::Lost,
    }
}

/// The dialogue line of turn `n` (1-based) of a conversation.
fn line(dialogue: &[(String, String)], n: u32) -> (String, String) {
    match dialogue {
        [] => (format!("turn {n}"), format!("reply {n}")),
        lines => lines[(n as usize - 1) % lines.len()].clone(),
    }
}

/// One turn in `auto` mode: `listen start`, the frames at the frame pace, then the
/// reply until `tts stop`. While it is in flight its records are allowed but not
/// required; once heard complete they are required.
async fn turn(
    shared: &Shared,
    dev: &mut SimDevice,
    audio: &mut SimAudio,
    session: &str,
    n: u32,
    log: &mut ExpectedConversation,
) -> Result<Turn, SimError> {
    let config = &shared.config;
    let (said, reply) = line(&config.dialogue, n);
    log.allowed.push((USER, said.clone()));
    log.allowed.push((ASSISTANT, reply.clone()));
    dev.publish_json(
        &json!({"session_id": session, "type": "listen", "state": "start", "mode": "auto"}),
    )
    .await?;
    let first = (n - 1) * config.frames_per_turn;
    for i in 0..config.frames_per_turn {
        tokio::time::sleep(Duration::from_millis(u64::from(FRAME_MS))).await;
        let index = first + i;
        audio
            .send(index * FRAME_MS, &synthetic_frame(index, FRAME_BYTES))
            .await?;
    }
    let deadline = tokio::time::Instant::now() + REPLY_TIMEOUT;
    let (mut heard_said, mut heard_reply) = (None, None);
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let payload = match dev.recv(left).await {
            Ok((_, p)) => p,
            Err(SimError::Timeout(_)) => return Ok(Turn::TimedOut),
            Err(e) => return Err(e),
        };
        let Some((kind, state, sid, text)) = fields(&payload) else {
            continue;
        };
        match (kind.as_str(), state.as_str()) {
            ("stt", _) => heard_said = Some(text),
            ("tts", "sentence_start") => heard_reply = Some(text),
            ("tts", "stop") => break,
            ("goodbye", _) if sid == session || sid.is_empty() => {
                return Ok(Turn::EndedByGateway);
            }
            _ => {}
        }
    }
    let (Some(heard_said), Some(heard_reply)) = (heard_said, heard_reply) else {
        // A `tts stop` without the turn's texts: not a completed turn.
        return Ok(Turn::TimedOut);
    };
    if heard_said != said || heard_reply != reply {
        inc(&shared.stats.text_mismatches);
    }
    log.allowed.truncate(log.allowed.len() - 2);
    log.required.push((USER, heard_said));
    log.required.push((ASSISTANT, heard_reply));
    inc(&shared.stats.turns_completed);
    Ok(Turn::Complete)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dialogue_lines_cycle_per_conversation() {
        let d = vec![("a".to_string(), "A".to_string()), ("b".into(), "B".into())];
        assert_eq!(line(&d, 1), ("a".into(), "A".into()));
        assert_eq!(line(&d, 3), ("a".into(), "A".into()));
        assert_eq!(line(&[], 2), ("turn 2".into(), "reply 2".into()));
    }

    #[test]
    fn backoff_grows_to_its_cap() {
        let mut rng = StdRng::seed_from_u64(1);
        assert!(backoff(&mut rng, 0) <= BACKOFF_MIN.mul_f64(1.5));
        assert!(backoff(&mut rng, 0) >= BACKOFF_MIN.mul_f64(0.5));
        for _ in 0..100 {
            assert!(backoff(&mut rng, 40) <= BACKOFF_MAX.mul_f64(1.5));
        }
    }
}
