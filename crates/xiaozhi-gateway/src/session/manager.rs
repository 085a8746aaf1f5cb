//! The session manager: one dispatcher task that owns the table of live conversations.
//!
//! The rules (which conversation a message belongs to, when a hello starts or replaces
//! one, when one ends and why) are `crate::protocol::session`'s, pure and tested there;
//! this module is their driver: it parses each device message, feeds the rules, and
//! performs their decisions with the channels of each conversation task.
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
use crate::protocol::control::{self, DeviceMessage, parse_device_message};
use crate::protocol::credentials::DeviceIdentity;
use crate::protocol::mac::Mac;
use crate::protocol::session::{Conversations, Decision, Via};

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
    /// Most audio recorded per utterance, in milliseconds (`history.max_utterance_secs`).
    pub history_max_utterance_ms: u64,
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

/// A device message the rules were asked about, kept for the decision that uses it.
struct Incoming {
    device: Arc<DeviceIdentity>,
    generation: u64,
    message: ControlMessage,
}

/// Commands queued per conversation from the calling service (a join and a hang-up at
/// most are ever outstanding).
const LEG_COMMANDS: usize = 8;

/// Handle to the dispatcher; cheap to clone.
#[derive(Clone)]
pub struct SessionManager {
    tx: mpsc::Sender<Event>,
}

/// What reaches one conversation task.
struct Live {
    control: mpsc::Sender<ControlMessage>,
    end: Option<oneshot::Sender<EndReason>>,
    /// Calling-service commands (become a call leg, hang up).
    legs: mpsc::Sender<LegCommand>,
}

impl SessionManager {
    /// Starts the dispatcher on the current runtime.
    pub fn start(deps: SessionDeps) -> SessionManager {
        let (tx, rx) = mpsc::channel(EVENT_QUEUE);
        let dispatcher = Dispatcher {
            deps: Arc::new(deps),
            conversations: Conversations::new(),
            live: HashMap::new(),
            decisions: Vec::with_capacity(4),
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
    /// The rules' view: which conversation is each device's.
    conversations: Conversations,
    /// The channels of each running conversation task, by serial.
    live: HashMap<u64, Live>,
    /// The rules' decisions, performed as soon as they are made.
    decisions: Vec<Decision>,
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
                } => self.on_message(device, generation, Via::Mqtt, payload),
                Event::StreamMessage {
                    device,
                    generation,
                    serial,
                    payload,
                } => self.on_message(device, generation, Via::Stream { serial }, payload),
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
                    let mut decisions = std::mem::take(&mut self.decisions);
                    self.conversations
                        .on_disconnected(mac, generation, &mut decisions);
                    self.perform(&mut decisions, None);
                    self.decisions = decisions;
                }
                Event::Ended { mac, serial } => {
                    self.conversations.on_ended(mac, serial);
                    self.live.remove(&serial);
                }
                Event::Leg {
                    mac,
                    command,
                    taken,
                } => {
                    let running = self.conversations.running(&mac);
                    let result = match running.and_then(|serial| self.live.get(&serial)) {
                        None => Err(JoinError::NoConversation),
                        Some(live) => live.legs.try_send(command).map_err(|e| match e {
                            mpsc::error::TrySendError::Full(_) => JoinError::Busy,
                            mpsc::error::TrySendError::Closed(_) => JoinError::NoConversation,
                        }),
                    };
                    let _ = taken.send(result);
                }
                Event::EndConversation { mac, ended } => {
                    let mut decisions = std::mem::take(&mut self.decisions);
                    let found = self.conversations.on_end_requested(mac, &mut decisions);
                    self.perform(&mut decisions, None);
                    self.decisions = decisions;
                    let _ = ended.send(found);
                }
                Event::Shutdown { done } => {
                    self.shutting_down = true;
                    self.stop_background.cancel();
                    self.background.close();
                    let mut decisions = std::mem::take(&mut self.decisions);
                    self.conversations.on_shutdown(&mut decisions);
                    self.perform(&mut decisions, None);
                    self.decisions = decisions;
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

    fn on_message(
        &mut self,
        device: Arc<DeviceIdentity>,
        generation: u64,
        via: Via,
        payload: Bytes,
    ) {
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
        let is_mcp = matches!(&message, DeviceMessage::Other { kind, .. } if kind == "mcp");
        Metrics::inc(match &message {
            DeviceMessage::Hello(_) => &m.device_messages_hello,
            DeviceMessage::Listen { .. } => &m.device_messages_listen,
            DeviceMessage::Abort { .. } => &m.device_messages_abort,
            DeviceMessage::Goodbye { .. } => &m.device_messages_goodbye,
            DeviceMessage::Other { .. } if is_mcp => &m.device_messages_mcp,
            DeviceMessage::Other { .. } => &m.device_messages_other,
        });
        // MCP belongs to the device link first: replies to the gateway's own requests
        // end there, whether or not a conversation runs; the rest goes on as relayed.
        let (json, raw) = if is_mcp {
            match self.relay_mcp(&device.mac, json) {
                Some(relayed) => relayed,
                None => return,
            }
        } else {
            (json, payload)
        };
        let mut decisions = std::mem::take(&mut self.decisions);
        self.conversations
            .on_message(device.mac, generation, via, &message, &mut decisions);
        let incoming = Incoming {
            device,
            generation,
            message: ControlMessage { message, json, raw },
        };
        self.perform(&mut decisions, Some(incoming));
        self.decisions = decisions;
    }

    /// An MCP message from the device, through the device's MCP client: `None` when it
    /// ends there (or is malformed), else the JSON (and bytes) to relay.
    fn relay_mcp(
        &self,
        mac: &Mac,
        mut json: serde_json::Value,
    ) -> Option<(serde_json::Value, Bytes)> {
        let mcp = self.deps.directory.mcp(mac)?;
        let inner = json.get_mut("payload").map(serde_json::Value::take);
        let Some(inner) = inner.filter(serde_json::Value::is_object) else {
            Metrics::inc(&self.deps.metrics.control_malformed);
            return None;
        };
        let relay = mcp.on_device_payload(inner)?;
        json["payload"] = relay;
        let raw = Bytes::from(json.to_string());
        Some((json, raw))
    }

    /// Performs the rules' decisions; `incoming` is the device message they were about,
    /// if any (a hello to start a conversation with, or a message to forward).
    fn perform(&mut self, decisions: &mut Vec<Decision>, mut incoming: Option<Incoming>) {
        let deps = self.deps.clone();
        let m = &deps.metrics;
        let mac = incoming.as_ref().map(|i| i.device.mac);
        for decision in decisions.drain(..) {
            match decision {
                Decision::Start { serial } => {
                    let Some(Incoming {
                        device,
                        generation,
                        message:
                            ControlMessage {
                                message: DeviceMessage::Hello(hello),
                                ..
                            },
                    }) = incoming.take()
                    else {
                        // The rules start conversations for hellos only.
                        continue;
                    };
                    self.spawn(serial, device, generation, hello);
                }
                Decision::End { serial, reason } => {
                    if let Some(tx) = self.live.get_mut(&serial).and_then(|l| l.end.take()) {
                        let _ = tx.send(reason);
                    }
                }
                Decision::Detach { serial } => {
                    self.live.remove(&serial);
                }
                Decision::Forward { serial } => {
                    let Some(incoming) = incoming.take() else {
                        continue;
                    };
                    let mac = incoming.device.mac;
                    let Some(live) = self.live.get(&serial) else {
                        Metrics::inc(&m.control_without_session);
                        continue;
                    };
                    match live.control.try_send(incoming.message) {
                        Ok(()) => {}
                        Err(mpsc::error::TrySendError::Full(_)) => {
                            Metrics::inc(&m.control_queue_full);
                            warn!(%mac, "conversation control queue full; device message dropped");
                        }
                        Err(mpsc::error::TrySendError::Closed(_)) => {
                            Metrics::inc(&m.control_without_session)
                        }
                    }
                }
                Decision::RefuseHello { why } => {
                    Metrics::inc(&m.hellos_refused);
                    if let Some(mac) = mac {
                        warn!(%mac, "{why}");
                        deps.sink
                            .send_to_device(&mac, Bytes::from(control::alert(None, &why)));
                    }
                }
                Decision::HelloDuringShutdown => Metrics::inc(&m.hellos_during_shutdown),
                Decision::NoConversation => {
                    Metrics::inc(&m.control_without_session);
                    debug!(mac = ?mac, "device message with no conversation");
                }
            }
        }
    }

    fn spawn(
        &mut self,
        serial: u64,
        device: Arc<DeviceIdentity>,
        generation: u64,
        hello: control::HelloRequest,
    ) {
        let (control_tx, control_rx) = mpsc::channel(CONTROL_QUEUE);
        let (end_tx, end_rx) = oneshot::channel();
        let (legs_tx, legs_rx) = mpsc::channel(LEG_COMMANDS);
        let mac = device.mac;
        self.live.insert(
            serial,
            Live {
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
