//! The session manager: one dispatcher task that owns the table of live conversations.
//!
//! Device connections hand it every device message ([`SessionManager::device_message`])
//! and their end ([`SessionManager::device_gone`]) through one bounded queue, so a flood
//! of messages slows the devices sending them instead of growing memory. The dispatcher
//! itself never waits on a conversation: it forwards with `try_send` and counts drops.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info_span, warn};

use super::call_leg::{CallEvent, CallLegs, JoinError, LegCommand};
use super::conversation::{self, ConversationStart};
use super::directory::{DeviceDirectory, DeviceEntry};
use super::{DeviceOut, DeviceSink, EndReason};
use crate::audio::AudioSocketHandle;
use crate::device_link::mcp::{DeviceMcp, McpSettings};
use crate::metrics::Metrics;
use crate::pipeline::{ControlMessage, Pipeline};
use crate::protocol::control::{self, DeviceMessage, HELLO_VERSION, parse_device_message};
use crate::protocol::credentials::DeviceIdentity;
use crate::protocol::mac::Mac;

/// Control messages queued per conversation before further ones are dropped.
const CONTROL_QUEUE: usize = 64;
/// Events queued for the dispatcher; a full queue makes device connections wait.
const EVENT_QUEUE: usize = 4096;

/// What every conversation needs.
pub struct SessionDeps {
    pub pipeline: Arc<dyn Pipeline>,
    pub audio: AudioSocketHandle,
    /// The QUIC endpoint, when enabled.
    pub quic: Option<crate::audio::quic::QuicHandle>,
    /// Which audio transports conversations may get.
    pub transports: super::TransportPolicy,
    pub sink: Arc<dyn DeviceSink>,
    pub metrics: Arc<Metrics>,
    /// Host and port announced in the hello.
    pub udp_public_host: String,
    pub udp_public_port: u16,
    pub idle_timeout: Duration,
    /// What each connected device is doing (written here, read by the HTTP API).
    pub directory: Arc<DeviceDirectory>,
    pub mcp: McpSettings,
    /// Where conversations record chat history (none: not recorded).
    pub history: Option<crate::history::writer::HistoryHandle>,
    /// Most Opus packets recorded per utterance.
    pub history_max_packets: usize,
    /// Where session and upstream events are published (none: not published).
    pub events: Option<crate::events::EventPublisher>,
    /// This node's call legs and rung devices.
    pub call_legs: Arc<CallLegs>,
    /// Where departures from calls are reported (none: calling is off).
    pub call_events: Option<mpsc::Sender<CallEvent>>,
}

enum Event {
    Connected {
        device: Arc<DeviceIdentity>,
        generation: u64,
        remote: SocketAddr,
    },
    Message {
        device: Arc<DeviceIdentity>,
        generation: u64,
        payload: Bytes,
    },
    /// A message on a conversation's own control stream (QUIC): it belongs to that
    /// conversation only, and is dropped if another has replaced it.
    StreamMessage {
        device: Arc<DeviceIdentity>,
        generation: u64,
        serial: u64,
        payload: Bytes,
    },
    Gone {
        mac: Mac,
        generation: u64,
    },
    Ended {
        mac: Mac,
        serial: u64,
    },
    Shutdown {
        done: oneshot::Sender<()>,
    },
    EndConversation {
        mac: Mac,
        ended: oneshot::Sender<bool>,
    },
    /// A command from the calling service for the device's conversation.
    Leg {
        mac: Mac,
        command: LegCommand,
        taken: oneshot::Sender<Result<(), JoinError>>,
    },
}

/// Commands queued per conversation from the calling service (a join and a hang-up at
/// most are ever outstanding).
const LEG_COMMANDS: usize = 8;

/// Handle to the dispatcher; cheap to clone.
#[derive(Clone)]
pub struct SessionManager {
    tx: mpsc::Sender<Event>,
}

struct Live {
    serial: u64,
    /// The device connection the conversation belongs to.
    generation: u64,
    control: mpsc::Sender<ControlMessage>,
    end: Option<oneshot::Sender<EndReason>>,
    /// Calling-service commands (become a call leg, hang up).
    legs: mpsc::Sender<LegCommand>,
}

impl Live {
    fn end(&mut self, reason: EndReason) {
        if let Some(tx) = self.end.take() {
            let _ = tx.send(reason);
        }
    }
}

impl SessionManager {
    /// Starts the dispatcher on the current runtime.
    pub fn start(deps: SessionDeps) -> SessionManager {
        let (tx, rx) = mpsc::channel(EVENT_QUEUE);
        let dispatcher = Dispatcher {
            deps: Arc::new(deps),
            live: HashMap::new(),
            next_serial: 1,
            events: tx.downgrade(),
            tracker: TaskTracker::new(),
            shutting_down: false,
            background: TaskTracker::new(),
            stop_background: CancellationToken::new(),
        };
        tokio::spawn(dispatcher.run(rx));
        SessionManager { tx }
    }

    /// A device connected (authenticated); its MCP setup starts.
    pub async fn device_connected(
        &self,
        device: Arc<DeviceIdentity>,
        generation: u64,
        remote: SocketAddr,
    ) {
        let _ = self
            .tx
            .send(Event::Connected {
                device,
                generation,
                remote,
            })
            .await;
    }

    /// A device published a message.
    pub async fn device_message(
        &self,
        device: Arc<DeviceIdentity>,
        generation: u64,
        payload: Bytes,
    ) {
        let _ = self
            .tx
            .send(Event::Message {
                device,
                generation,
                payload,
            })
            .await;
    }

    /// A device connection ended: its conversation ends with it.
    pub async fn device_gone(&self, mac: Mac, generation: u64) {
        let _ = self.tx.send(Event::Gone { mac, generation }).await;
    }

    /// Ends the device's conversation as an admin asked (the device gets its goodbye);
    /// false if it had none.
    pub async fn end_conversation(&self, mac: Mac) -> bool {
        let (ended, wait) = oneshot::channel();
        if self
            .tx
            .send(Event::EndConversation { mac, ended })
            .await
            .is_err()
        {
            return false;
        }
        wait.await.unwrap_or(false)
    }

    /// Hands a calling-service command to the device's conversation.
    pub async fn leg(&self, mac: Mac, command: LegCommand) -> Result<(), JoinError> {
        let (taken, wait) = oneshot::channel();
        if self
            .tx
            .send(Event::Leg {
                mac,
                command,
                taken,
            })
            .await
            .is_err()
        {
            return Err(JoinError::NoConversation);
        }
        wait.await.unwrap_or(Err(JoinError::NoConversation))
    }

    /// Ends every conversation (each sends its goodbye) and waits until all have.
    pub async fn shutdown(&self) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Event::Shutdown { done }).await.is_ok() {
            let _ = wait.await;
        }
    }
}

struct Dispatcher {
    deps: Arc<SessionDeps>,
    live: HashMap<Mac, Live>,
    next_serial: u64,
    /// For conversations to report their end; weak so the dispatcher's own handle does
    /// not keep its queue open.
    events: mpsc::WeakSender<Event>,
    tracker: TaskTracker,
    shutting_down: bool,
    /// Per-device MCP setup tasks; cancelled at shutdown.
    background: TaskTracker,
    stop_background: CancellationToken,
}

impl Dispatcher {
    async fn run(mut self, mut rx: mpsc::Receiver<Event>) {
        while let Some(event) = rx.recv().await {
            match event {
                Event::Connected {
                    device,
                    generation,
                    remote,
                } => self.on_connected(device, generation, remote),
                Event::Message {
                    device,
                    generation,
                    payload,
                } => self.on_message(device, generation, payload),
                Event::StreamMessage {
                    device,
                    generation,
                    serial,
                    payload,
                } => {
                    if self
                        .live
                        .get(&device.mac)
                        .is_some_and(|l| l.serial == serial)
                    {
                        self.on_message(device, generation, payload);
                    } else {
                        Metrics::inc(&self.deps.metrics.control_without_session);
                    }
                }
                Event::Gone { mac, generation } => {
                    if let Some(entry) = self.deps.directory.gone(&mac, generation) {
                        entry.mcp.close();
                        // A device being rung that disconnects ends the call.
                        if let Some(call) = self.deps.call_legs.take_ringing(mac)
                            && let Some(events) = &self.deps.call_events
                        {
                            let _ = events.try_send(CallEvent::Left {
                                mac,
                                call,
                                reason: EndReason::DeviceDisconnected.label(),
                            });
                        }
                    }
                    if let Some(live) = self
                        .live
                        .get_mut(&mac)
                        .filter(|l| l.generation == generation)
                    {
                        live.end(EndReason::DeviceDisconnected);
                    }
                }
                Event::Ended { mac, serial } => {
                    if self.live.get(&mac).is_some_and(|l| l.serial == serial) {
                        self.live.remove(&mac);
                    }
                }
                Event::Leg {
                    mac,
                    command,
                    taken,
                } => {
                    let result = match self.live.get(&mac).filter(|l| l.end.is_some()) {
                        None => Err(JoinError::NoConversation),
                        Some(live) => live.legs.try_send(command).map_err(|e| match e {
                            mpsc::error::TrySendError::Full(_) => JoinError::Busy,
                            mpsc::error::TrySendError::Closed(_) => JoinError::NoConversation,
                        }),
                    };
                    let _ = taken.send(result);
                }
                Event::EndConversation { mac, ended } => {
                    let live = self.live.get_mut(&mac).filter(|l| l.end.is_some());
                    let found = live.is_some();
                    if let Some(live) = live {
                        live.end(EndReason::Admin);
                    }
                    let _ = ended.send(found);
                }
                Event::Shutdown { done } => {
                    self.shutting_down = true;
                    self.stop_background.cancel();
                    self.background.close();
                    for live in self.live.values_mut() {
                        live.end(EndReason::Shutdown);
                    }
                    self.tracker.close();
                    let tracker = self.tracker.clone();
                    let background = self.background.clone();
                    tokio::spawn(async move {
                        tracker.wait().await;
                        background.wait().await;
                        let _ = done.send(());
                    });
                }
            }
        }
    }

    fn on_connected(&mut self, device: Arc<DeviceIdentity>, generation: u64, remote: SocketAddr) {
        let out = DeviceOut::new(device.mac, self.deps.sink.clone());
        let mcp = Arc::new(DeviceMcp::new(out, self.deps.mcp.max_pending));
        let replaced = self.deps.directory.connected(DeviceEntry {
            identity: device,
            generation,
            remote,
            connected_at: std::time::SystemTime::now(),
            mcp: mcp.clone(),
            conversation: None,
            call: None,
        });
        if let Some(old) = replaced {
            old.mcp.close();
        }
        if self.deps.mcp.setup && !self.shutting_down {
            let settings = self.deps.mcp.clone();
            let stop = self.stop_background.clone();
            self.background.spawn(async move {
                tokio::select! {
                    _ = mcp.setup(&settings) => {}
                    _ = stop.cancelled() => {}
                }
            });
        }
    }

    fn on_message(&mut self, device: Arc<DeviceIdentity>, generation: u64, payload: Bytes) {
        let m = &self.deps.metrics;
        let (message, json) = match parse_device_message(&payload) {
            Ok(v) => v,
            Err(e) => {
                Metrics::inc(&m.control_malformed);
                debug!(mac = %device.mac, error = %e, "device message dropped");
                if matches!(e, control::ControlError::BadHello { .. }) {
                    Metrics::inc(&m.hellos_refused);
                    self.deps.sink.send_to_device(
                        &device.mac,
                        Bytes::from(control::alert(None, &e.to_string())),
                    );
                }
                return;
            }
        };
        Metrics::inc(match &message {
            DeviceMessage::Hello(_) => &m.device_messages_hello,
            DeviceMessage::Listen { .. } => &m.device_messages_listen,
            DeviceMessage::Abort { .. } => &m.device_messages_abort,
            DeviceMessage::Goodbye { .. } => &m.device_messages_goodbye,
            DeviceMessage::Other { kind, .. } if kind == "mcp" => &m.device_messages_mcp,
            DeviceMessage::Other { .. } => &m.device_messages_other,
        });
        match message {
            DeviceMessage::Hello(hello) => {
                if hello.version != HELLO_VERSION || hello.transport != "udp" {
                    Metrics::inc(&m.hellos_refused);
                    let why = format!(
                        "unsupported hello (version {}, transport {:?}): this gateway speaks version {HELLO_VERSION} over udp",
                        hello.version, hello.transport
                    );
                    warn!(mac = %device.mac, "{why}");
                    self.deps
                        .sink
                        .send_to_device(&device.mac, Bytes::from(control::alert(None, &why)));
                    return;
                }
                if self.shutting_down {
                    Metrics::inc(&m.hellos_during_shutdown);
                    return;
                }
                if let Some(mut old) = self.live.remove(&device.mac) {
                    old.end(EndReason::Replaced);
                }
                self.spawn(device, generation, hello);
            }
            DeviceMessage::Goodbye { .. } => {
                if let Some(live) = self.live.get_mut(&device.mac) {
                    live.end(EndReason::DeviceGoodbye);
                }
            }
            DeviceMessage::Other { ref kind, .. } if kind == control::UDP_TIMEOUT => {
                match self.live.get_mut(&device.mac) {
                    Some(live) => live.end(EndReason::DeviceUdpTimeout),
                    None => Metrics::inc(&m.control_without_session),
                }
            }
            DeviceMessage::Other { ref kind, .. } if kind == "mcp" => {
                let Some(mcp) = self.deps.directory.mcp(&device.mac) else {
                    return;
                };
                let mut json = json;
                let inner = json.get_mut("payload").map(serde_json::Value::take);
                let Some(inner) = inner.filter(serde_json::Value::is_object) else {
                    Metrics::inc(&m.control_malformed);
                    return;
                };
                if let Some(relay) = mcp.on_device_payload(inner) {
                    json["payload"] = relay;
                    let raw = Bytes::from(json.to_string());
                    self.forward_to_conversation(
                        &device.mac,
                        ControlMessage { message, json, raw },
                    );
                }
            }
            message => self.forward_to_conversation(
                &device.mac,
                ControlMessage {
                    message,
                    json,
                    raw: payload,
                },
            ),
        }
    }

    fn forward_to_conversation(&mut self, mac: &Mac, message: ControlMessage) {
        let m = &self.deps.metrics;
        let device = mac;
        match self.live.get(mac) {
            Some(live) => match live.control.try_send(message) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    Metrics::inc(&m.control_queue_full);
                    warn!(mac = %device, "conversation control queue full; device message dropped");
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    Metrics::inc(&m.control_without_session)
                }
            },
            None => {
                Metrics::inc(&m.control_without_session);
                debug!(mac = %device, "device message with no conversation");
            }
        }
    }

    fn spawn(
        &mut self,
        device: Arc<DeviceIdentity>,
        generation: u64,
        hello: control::HelloRequest,
    ) {
        let serial = self.next_serial;
        self.next_serial += 1;
        let (control_tx, control_rx) = mpsc::channel(CONTROL_QUEUE);
        let (end_tx, end_rx) = oneshot::channel();
        let (legs_tx, legs_rx) = mpsc::channel(LEG_COMMANDS);
        let mac = device.mac;
        self.live.insert(
            mac,
            Live {
                serial,
                generation,
                control: control_tx,
                end: Some(end_tx),
                legs: legs_tx,
            },
        );
        let deps = self.deps.clone();
        let events = self.events.clone();
        // Control JSON the device sends on a QUIC control stream takes the same way as
        // its MQTT messages.
        let control_in: crate::audio::quic::ControlIn = {
            let events = self.events.clone();
            let device = device.clone();
            let metrics = self.deps.metrics.clone();
            Box::new(move |payload| {
                let Some(tx) = events.upgrade() else { return };
                let message = Event::StreamMessage {
                    device: device.clone(),
                    generation,
                    serial,
                    payload,
                };
                if tx.try_send(message).is_err() {
                    Metrics::inc(&metrics.control_queue_full);
                }
            })
        };
        let span = info_span!("session", %mac, session_id = tracing::field::Empty);
        self.tracker.spawn(
            async move {
                let run = conversation::run(
                    deps,
                    ConversationStart {
                        serial,
                        device,
                        hello,
                        control: control_rx,
                        end: end_rx,
                        control_in,
                        legs: legs_rx,
                    },
                );
                // A conversation that panics must still end: otherwise its entry (and
                // `sessions_live`) would stay for good. The panic is a bug; say so loudly.
                if futures_util::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(run))
                    .await
                    .is_err()
                {
                    tracing::error!(
                        "conversation task panicked (a bug); the conversation is ended"
                    );
                }
                if let Some(events) = events.upgrade() {
                    let _ = events.send(Event::Ended { mac, serial }).await;
                }
            }
            .instrument(span),
        );
    }
}
