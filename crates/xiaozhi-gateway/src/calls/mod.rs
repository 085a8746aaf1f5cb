//! Device-to-device calling: manager-api's address book asks the gateway to connect two
//! devices, and the gateway carries their audio to each other.
//!
//! * `POST /api/call/request {caller_mac, target_mac, caller_nickname}` ([`CallService::request`])
//!   and `POST /api/call/accept {mac}` ([`CallService::accept`]) answer as the Node
//!   gateway does (`status`: `pending`, `bridged`, `offline`, `error`, `no_pending`,
//!   `caller_gone`, with `message`), on the management port with its token.
//! * The rules are `crate::protocol::call_book`'s: this module asks the book (in memory,
//!   or in Redis for a cluster: [`store`]) and carries out the actions it plans, each on
//!   the node that holds the device: a ringing target is woken with MCP
//!   `self.remote_wakeup`, conversations become call legs (`crate::session::call_leg`)
//!   and hang up, the caller hears `{"type":"call_accepted","from":...}`.
//! * Departures come back from the session layer ([`CallEvent`]), timeouts from a sweep
//!   that also reconciles the legs of this node with the book (a lost message can delay
//!   the end of a call, never keep it going).
//!
//! Past the Node gateway: the two devices may be on different nodes of a cluster (the
//! actions go to the device's node over the bus, [`cluster`], and so does the audio),
//! a busy device is refused instead of being rung into a second call, a goodbye from
//! either side ends the call for both, and each device's goodbye carries its own
//! session id.

pub mod cluster;
pub mod store;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::broker::bus::Bus;
use crate::history::record::now_ms;
use crate::metrics::Metrics;
use crate::presence::tracker::PresenceTracker;
use crate::protocol::call_book::{
    self, AcceptOutcome, Call, CallAction, CallId, EndCause, Ended, MediaKey, RequestOutcome,
};
use crate::protocol::mac::Mac;
use crate::protocol::topics;
use crate::session::call_leg::{CallEvent, CallLegs, LegCommand, PeerRoute};
use crate::session::directory::DeviceDirectory;
use crate::session::{DeviceSink, SessionManager};
use store::{CallStore, CallStoreError};

/// How often timeouts are checked.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// How often the legs of this node are reconciled with the book.
const RECONCILE_INTERVAL: Duration = Duration::from_secs(5);
/// How long a call may wait for a leg to appear before a missing one ends it.
const LEG_GRACE_MS: i64 = 10_000;

/// The calling settings (`[calls]`).
#[derive(Debug, Clone)]
pub struct CallSettings {
    /// How long a call rings before it gives up.
    pub ring_timeout: Duration,
    /// Longest bridged call; zero: no limit.
    pub max_call: Duration,
    /// Most calls (ringing and bridged) at once.
    pub max_calls: usize,
    /// How long a woken target may take to answer the MCP wake-up.
    pub wake_timeout: Duration,
    /// How long a presence lookup may take.
    pub lookup_timeout: Duration,
}

/// The answer to a request or an accept, as the Node gateway words it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallAnswer {
    pub status: &'static str,
    pub message: Option<&'static str>,
    /// The other device, on a bridged accept (`peerMac`).
    pub peer_mac: Option<Mac>,
}

impl CallAnswer {
    fn new(status: &'static str, message: Option<&'static str>) -> CallAnswer {
        CallAnswer {
            status,
            message,
            peer_mac: None,
        }
    }

    /// The JSON body: `status`, `message` when there is one, `peerMac` when bridged.
    pub fn to_json(&self) -> serde_json::Value {
        let mut v = json!({"status": self.status});
        if let Some(m) = self.message {
            v["message"] = json!(m);
        }
        if let Some(peer) = self.peer_mac {
            v["peerMac"] = json!(peer.colon());
        }
        v
    }
}

/// The Node gateway's and the native backend's wording of each answer.
mod wording {
    pub const TARGET_OFFLINE: &str = "对方设备不在线，请稍后重试";
    pub const CALLER_OFFLINE: &str = "主叫设备不在线";
    pub const CALLEE_OFFLINE: &str = "接听设备不在线";
    pub const BAD_CALL_MACS: &str = "呼叫设备参数无效";
    pub const BAD_ACCEPT_MAC: &str = "接听设备参数无效";
    pub const NO_PENDING: &str = "没有等待中的通话";
    pub const CALLER_GONE: &str = "主叫方已离开或通话已超时";
    pub const NO_AUDIO_CHANNEL: &str = "设备没有打开的音频通道，无法通话";
    pub const UNAVAILABLE: &str = "通话服务暂时不可用，请稍后再试";
}

/// Where a device is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Location {
    Here,
    Node(String),
    Nowhere,
}

/// The calling service of this node.
pub struct CallService {
    settings: CallSettings,
    store: CallStore,
    /// This node's id.
    node: String,
    sessions: SessionManager,
    directory: Arc<DeviceDirectory>,
    sink: Arc<dyn DeviceSink>,
    presence: PresenceTracker,
    legs: Arc<CallLegs>,
    /// The bus, for events and (in a cluster) actions for other nodes.
    bus: Bus,
    /// Other nodes hold devices too (external bus with a shared book).
    cluster: bool,
    metrics: Arc<Metrics>,
}

/// What the service's task consumes.
pub struct CallInputs {
    /// Departures reported by the session layer.
    pub events: mpsc::Receiver<CallEvent>,
    /// Actions other nodes sent for this node's devices.
    pub actions: mpsc::Receiver<Bytes>,
}

/// Builds the service's parts that other layers need before the service exists.
pub fn channels() -> (mpsc::Sender<CallEvent>, mpsc::Sender<Bytes>, CallInputs) {
    let (events_tx, events) = mpsc::channel(4096);
    let (actions_tx, actions) = mpsc::channel(4096);
    (events_tx, actions_tx, CallInputs { events, actions })
}

/// What the service needs.
pub struct CallDeps {
    pub settings: CallSettings,
    pub store: CallStore,
    pub node: String,
    pub sessions: SessionManager,
    pub directory: Arc<DeviceDirectory>,
    pub sink: Arc<dyn DeviceSink>,
    pub presence: PresenceTracker,
    pub legs: Arc<CallLegs>,
    pub bus: Bus,
    pub cluster: bool,
    pub metrics: Arc<Metrics>,
}

impl CallService {
    pub fn new(deps: CallDeps) -> Arc<CallService> {
        Arc::new(CallService {
            settings: deps.settings,
            store: deps.store,
            node: deps.node,
            sessions: deps.sessions,
            directory: deps.directory,
            sink: deps.sink,
            presence: deps.presence,
            legs: deps.legs,
            bus: deps.bus,
            cluster: deps.cluster,
            metrics: deps.metrics,
        })
    }

    /// The book as it is now (for the console and status).
    pub async fn calls(&self) -> Result<Vec<Call>, CallStoreError> {
        Ok(self.store.snapshot().await?.calls().cloned().collect())
    }

    /// `POST /api/call/request`: `caller` asks to talk to `target`.
    pub async fn request(&self, caller: &str, target: &str, nickname: &str) -> CallAnswer {
        let answer = self.request_inner(caller, target, nickname).await;
        Metrics::inc(match answer.status {
            "pending" => &self.metrics.call_requests_pending,
            "bridged" => &self.metrics.call_requests_bridged,
            "offline" => &self.metrics.call_requests_offline,
            _ => &self.metrics.call_requests_error,
        });
        info!(
            caller,
            target,
            status = answer.status,
            message = answer.message.unwrap_or(""),
            "call request"
        );
        answer
    }

    async fn request_inner(&self, caller: &str, target: &str, nickname: &str) -> CallAnswer {
        let (Some(caller), Some(target)) = (parse_mac(caller), parse_mac(target)) else {
            return CallAnswer::new("error", Some(wording::BAD_CALL_MACS));
        };
        if self.locate(target).await == Location::Nowhere {
            return CallAnswer::new("offline", Some(wording::TARGET_OFFLINE));
        }
        if self.locate(caller).await == Location::Nowhere {
            return CallAnswer::new("error", Some(wording::CALLER_OFFLINE));
        }
        let now = now_ms();
        let max = self.settings.max_calls;
        let media_key = MediaKey(rand::random());
        let outcome = match self
            .store
            .update(|book| book.request(caller, target, nickname, now, max, media_key))
            .await
        {
            Ok(outcome) => outcome,
            Err(e) => {
                warn!(error = %e, "call request: the call book is unavailable");
                return CallAnswer::new("error", Some(wording::UNAVAILABLE));
            }
        };
        let answer = match &outcome {
            RequestOutcome::Ringing(call) => {
                self.publish_event("call_ringing", call, None);
                CallAnswer::new("pending", None)
            }
            RequestOutcome::Bridged(call) => {
                self.publish_event("call_bridged", call, None);
                CallAnswer::new("bridged", None)
            }
            RequestOutcome::Refused(refusal) => {
                return CallAnswer::new("error", Some(refusal.message()));
            }
        };
        // The caller's own leg must start here and now: a caller without an audio channel
        // cannot call, and hears why from its speech server.
        let failed = self.execute(call_book::plan_request(&outcome)).await;
        if failed.contains(&caller) {
            return CallAnswer::new("error", Some(wording::NO_AUDIO_CHANNEL));
        }
        answer
    }

    /// `POST /api/call/accept`: `callee` takes the call ringing it.
    pub async fn accept(&self, callee: &str) -> CallAnswer {
        let answer = self.accept_inner(callee).await;
        Metrics::inc(match answer.status {
            "bridged" => &self.metrics.call_accepts_bridged,
            "no_pending" => &self.metrics.call_accepts_no_pending,
            "caller_gone" => &self.metrics.call_accepts_caller_gone,
            "offline" => &self.metrics.call_accepts_offline,
            _ => &self.metrics.call_accepts_error,
        });
        info!(
            callee,
            status = answer.status,
            message = answer.message.unwrap_or(""),
            "call accept"
        );
        answer
    }

    async fn accept_inner(&self, callee: &str) -> CallAnswer {
        let Some(callee) = parse_mac(callee) else {
            return CallAnswer::new("error", Some(wording::BAD_ACCEPT_MAC));
        };
        if self.locate(callee).await == Location::Nowhere {
            return CallAnswer::new("offline", Some(wording::CALLEE_OFFLINE));
        }
        // Whether the ringing call's caller is still there is asked before the change
        // (it takes a presence lookup); the change re-checks that it is the same call.
        let ringing = match self.store.snapshot().await {
            Ok(book) => book.ringing_for(callee).map(|c| (c.id, c.caller)),
            Err(e) => {
                warn!(error = %e, "call accept: the call book is unavailable");
                return CallAnswer::new("error", Some(wording::UNAVAILABLE));
            }
        };
        let caller_here = match ringing {
            Some((_, caller)) => self.locate(caller).await != Location::Nowhere,
            None => true,
        };
        let now = now_ms();
        let outcome = self
            .store
            .update(|book| {
                let same = book.ringing_for(callee).map(|c| c.id) == ringing.map(|(id, _)| id);
                book.accept(callee, caller_here || !same, now)
            })
            .await;
        let outcome = match outcome {
            Ok(outcome) => outcome,
            Err(e) => {
                warn!(error = %e, "call accept: the call book is unavailable");
                return CallAnswer::new("error", Some(wording::UNAVAILABLE));
            }
        };
        let answer = match &outcome {
            AcceptOutcome::Bridged(call) => {
                self.publish_event("call_bridged", call, None);
                CallAnswer {
                    status: "bridged",
                    message: None,
                    peer_mac: Some(call.caller),
                }
            }
            AcceptOutcome::NoPending => CallAnswer::new("no_pending", Some(wording::NO_PENDING)),
            AcceptOutcome::CallerGone(ended) => {
                if let Some(call) = ended {
                    self.ended(&Ended {
                        call: call.clone(),
                        cause: EndCause::CallerGone,
                        left: None,
                    });
                }
                CallAnswer::new("caller_gone", Some(wording::CALLER_GONE))
            }
            AcceptOutcome::Refused(refusal) => {
                return CallAnswer::new("error", Some(refusal.message()));
            }
        };
        let failed = self.execute(call_book::plan_accept(&outcome)).await;
        if failed.contains(&callee) {
            return CallAnswer::new("error", Some(wording::NO_AUDIO_CHANNEL));
        }
        answer
    }

    /// `mac` left `call` (reported by its node's session layer).
    pub async fn left(&self, mac: Mac, call: CallId, reason: &str) {
        let now = now_ms();
        match self.store.update(|book| book.leave(mac, call, now)).await {
            Ok(Some(ended)) => {
                info!(mac = %mac, call, reason, "call party left; the call ends");
                self.ended(&ended);
                self.execute(call_book::plan_end(&ended)).await;
            }
            Ok(None) => debug!(mac = %mac, call, "left a call that had already ended"),
            Err(e) => {
                warn!(error = %e, mac = %mac, call, "a call departure could not be recorded; the sweep ends the call later")
            }
        }
    }

    /// Records an ended call: metrics and the event.
    fn ended(&self, ended: &Ended) {
        Metrics::inc(match ended.cause {
            EndCause::PartyLeft => &self.metrics.calls_ended_party_left,
            EndCause::RingTimeout => &self.metrics.calls_ended_ring_timeout,
            EndCause::MaxDuration => &self.metrics.calls_ended_max_duration,
            EndCause::CallerGone => &self.metrics.calls_ended_caller_gone,
        });
        self.publish_event("call_ended", &ended.call, Some(ended));
    }

    /// `xiaozhi/events/calls`: every call's ringing, bridging and end.
    fn publish_event(&self, event: &str, call: &Call, ended: Option<&Ended>) {
        let mut v = json!({
            "event": event,
            "call_id": call.id,
            "caller": call.caller.colon(),
            "target": call.target.colon(),
            "state": call.state.as_str(),
            "requested_ms": call.requested_ms,
            "node": self.node,
            "at_ms": now_ms(),
        });
        if let Some(ms) = call.bridged_ms {
            v["bridged_ms"] = json!(ms);
        }
        if let Some(ended) = ended {
            v["cause"] = json!(ended.cause.as_str());
            if let Some(left) = ended.left {
                v["left"] = json!(left.colon());
            }
        }
        self.bus
            .publish(topics::events_calls(), Bytes::from(v.to_string()));
    }

    /// Where `mac` is connected: this node, another node (cluster), or nowhere.
    async fn locate(&self, mac: Mac) -> Location {
        if self.directory.get(&mac).is_some() {
            return Location::Here;
        }
        if !self.cluster {
            return Location::Nowhere;
        }
        let colon = mac.colon();
        let lookup = self.presence.store().get(&colon);
        match tokio::time::timeout(self.settings.lookup_timeout, lookup).await {
            Ok(Ok(Some(record))) if record.state.is_connected() && record.node != self.node => {
                Location::Node(record.node)
            }
            Ok(Ok(_)) => Location::Nowhere,
            Ok(Err(e)) => {
                warn!(error = %e, mac = %mac, "call: presence lookup failed; the device counts as offline");
                Location::Nowhere
            }
            Err(_) => {
                warn!(mac = %mac, "call: presence lookup timed out; the device counts as offline");
                Location::Nowhere
            }
        }
    }

    /// Carries out `actions` (and the ends of calls whose devices turn out to be gone,
    /// in turn). Returns the devices whose leg could not start.
    async fn execute(&self, actions: Vec<CallAction>) -> Vec<Mac> {
        let mut queue: VecDeque<CallAction> = actions.into();
        let mut failed = Vec::new();
        // Calls that ended on the way: what was still planned for them is moot, but for
        // their hang-ups.
        let mut ended_calls = std::collections::HashSet::new();
        // Bounded: each failure removes a call from the book, which plans at most two
        // hang-ups; a hang-up never fails into more work.
        let mut budget = 64;
        while let Some(action) = queue.pop_front() {
            budget -= 1;
            if budget == 0 {
                warn!("call actions: giving up on a chain of failures");
                break;
            }
            if ended_calls.contains(&action_call(&action))
                && !matches!(action, CallAction::HangUp { .. })
            {
                continue;
            }
            let device = action_device(&action);
            let here = self.locate(device).await;
            let outcome = match (&here, &action) {
                (Location::Nowhere, CallAction::HangUp { .. } | CallAction::Accepted { .. }) => {
                    Ok(())
                }
                (Location::Nowhere, _) => Err(()),
                (Location::Here, _) => {
                    let route = self.route_for(&action).await;
                    self.run_local(action.clone(), route).await
                }
                (Location::Node(node), _) => {
                    let peer_node = match &action {
                        CallAction::Leg {
                            peer,
                            bridged: true,
                            ..
                        } => match self.locate(*peer).await {
                            Location::Here => Some(self.node.clone()),
                            Location::Node(n) => Some(n),
                            Location::Nowhere => None,
                        },
                        _ => None,
                    };
                    self.forward(node, &action, peer_node);
                    Ok(())
                }
            };
            if outcome.is_err()
                && let CallAction::Leg { device, call, .. }
                | CallAction::Ring {
                    target: device,
                    call,
                    ..
                } = action
            {
                failed.push(device);
                let now = now_ms();
                ended_calls.insert(call);
                if let Ok(Some(ended)) = self
                    .store
                    .update(|book| book.leave(device, call, now))
                    .await
                {
                    info!(mac = %device, call, "call party unreachable; the call ends");
                    self.ended(&ended);
                    queue.extend(call_book::plan_end(&ended));
                }
            }
        }
        failed
    }

    /// The route of a local leg action, looking the peer up.
    async fn route_for(&self, action: &CallAction) -> Option<PeerRoute> {
        let CallAction::Leg { peer, bridged, .. } = action else {
            return None;
        };
        if !bridged {
            return Some(PeerRoute::Ringing(*peer));
        }
        Some(match self.locate(*peer).await {
            Location::Node(node) => self.remote_route(action, node).await?,
            // A peer that is nowhere: its own leg fails and ends the call.
            Location::Here | Location::Nowhere => PeerRoute::Local(*peer),
        })
    }

    /// The route to a leg's peer on `node`: sealed under the call's key, which only the
    /// book has (never the messages between nodes). `None` when the call is gone.
    async fn remote_route(&self, action: &CallAction, node: String) -> Option<PeerRoute> {
        let CallAction::Leg {
            device, call, peer, ..
        } = action
        else {
            return None;
        };
        let book = self.store.snapshot().await.ok()?;
        let found = book.get(*call)?;
        Some(PeerRoute::Remote {
            mac: *peer,
            node,
            key: found.media_key,
            caller: found.caller == *device,
        })
    }

    /// Carries out an action for a device of this node.
    async fn run_local(&self, action: CallAction, route: Option<PeerRoute>) -> Result<(), ()> {
        match action {
            CallAction::Ring {
                target,
                call,
                caller_nickname,
            } => {
                let Some(mcp) = self.directory.mcp(&target) else {
                    return Err(());
                };
                self.legs.set_ringing(target, call);
                let reason = ring_reason(&caller_nickname);
                let metrics = self.metrics.clone();
                let timeout = self.settings.wake_timeout;
                // The request is answered without waiting for the device (as the Node
                // gateway does); the outcome is logged and counted.
                tokio::spawn(async move {
                    let params = json!({
                        "name": "self.remote_wakeup",
                        "arguments": {"reason": reason, "action": "listen"},
                    });
                    match mcp.call("tools/call", Some(params), timeout).await {
                        Ok(_) => Metrics::inc(&metrics.call_wakes_sent),
                        Err(e) => {
                            Metrics::inc(&metrics.call_wakes_failed);
                            warn!(mac = %target, call, error = %e, "call: the target did not take the wake-up (its firmware may lack self.remote_wakeup)");
                        }
                    }
                });
                Ok(())
            }
            CallAction::Leg { device, call, .. } => {
                // No route: the call ended meanwhile (its book entry is gone).
                let Some(peer) = route else {
                    return Err(());
                };
                self.sessions
                    .leg(device, LegCommand::Join { call, peer })
                    .await
                    .map_err(|e| {
                        warn!(mac = %device, call, error = ?e, "call: the device's conversation cannot become a call leg");
                    })
            }
            CallAction::Accepted { caller, callee, .. } => {
                let message = json!({"type": "call_accepted", "from": callee.colon()});
                self.sink
                    .send_to_device(&caller, Bytes::from(message.to_string()));
                Ok(())
            }
            CallAction::HangUp { device, call } => {
                let _ = self.sessions.leg(device, LegCommand::HangUp { call }).await;
                Ok(())
            }
        }
    }

    /// Sends an action to the node that holds its device.
    fn forward(&self, node: &str, action: &CallAction, peer_node: Option<String>) {
        Metrics::inc(&self.metrics.call_actions_forwarded);
        let payload = cluster::encode(action, peer_node.as_deref());
        self.bus.publish(topics::node_calls(node), payload);
    }

    /// An action another node sent for a device of this node.
    async fn on_forwarded(&self, payload: &[u8]) {
        let (action, peer_node) = match cluster::decode(payload) {
            Ok(v) => v,
            Err(e) => {
                Metrics::inc(&self.metrics.call_actions_malformed);
                warn!(error = %e, "forwarded call action dropped");
                return;
            }
        };
        let route = match &action {
            CallAction::Leg { peer, bridged, .. } => match (bridged, peer_node) {
                (false, _) => Some(PeerRoute::Ringing(*peer)),
                (true, Some(node)) if node != self.node => self.remote_route(&action, node).await,
                (true, _) => Some(PeerRoute::Local(*peer)),
            },
            _ => None,
        };
        let device = action_device(&action);
        if self.run_local(action.clone(), route).await.is_err()
            && let CallAction::Leg { call, .. } | CallAction::Ring { call, .. } = action
        {
            // This node cannot carry the action out: the device left. The call ends
            // (through the shared book), and its other party is hung up.
            self.left(device, call, "unreachable").await;
        }
    }

    /// Ends what timed out.
    async fn sweep(&self) {
        let now = now_ms();
        let ring = self.settings.ring_timeout.as_millis() as i64;
        let max = self.settings.max_call.as_millis() as i64;
        match self.store.update(|book| book.expire(now, ring, max)).await {
            Ok(ended) => {
                for e in ended {
                    info!(call = e.call.id, cause = e.cause.as_str(), "call ended");
                    self.ended(&e);
                    self.execute(call_book::plan_end(&e)).await;
                }
            }
            Err(e) => debug!(error = %e, "call sweep: the call book is unavailable"),
        }
    }

    /// Brings this node's legs and the book back in line: legs of calls the book no
    /// longer has are hung up; calls with a party here whose other party is gone, or
    /// whose leg on this node never appeared, end.
    async fn reconcile(&self) {
        let book = match self.store.snapshot().await {
            Ok(book) => book,
            Err(e) => {
                debug!(error = %e, "call reconcile: the call book is unavailable");
                return;
            }
        };
        let stale = self
            .legs
            .reconcile(|mac, call| book.call_of(mac).is_some_and(|c| c.id == call));
        for (mac, call) in stale {
            info!(mac = %mac, call, "call leg of an ended call hung up");
            let _ = self.sessions.leg(mac, LegCommand::HangUp { call }).await;
        }
        let now = now_ms();
        for call in book.calls() {
            // Each node looks after the calls it holds a party of (so a cluster asks Redis
            // about a call's other party from one node, not from all); a device that
            // lost its node and came back elsewhere is found there.
            let holds_a_party = [call.caller, call.target]
                .iter()
                .any(|m| self.directory.get(m).is_some());
            if now - call.requested_ms < LEG_GRACE_MS || !holds_a_party {
                continue;
            }
            for (device, must_be_leg) in [
                (call.caller, true),
                (call.target, call.state == call_book::CallState::Bridged),
            ] {
                let gone = match self.locate(device).await {
                    Location::Nowhere => true,
                    Location::Here => must_be_leg && self.legs.leg_call(device) != Some(call.id),
                    Location::Node(_) => false,
                };
                if gone {
                    self.left(device, call.id, "reconciled").await;
                    break;
                }
            }
        }
    }

    /// Runs the service: departures, forwarded actions, timeouts; until `stop`.
    pub async fn run(self: Arc<Self>, mut inputs: CallInputs, stop: CancellationToken) {
        let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
        let mut reconcile = tokio::time::interval(RECONCILE_INTERVAL);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        reconcile.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                Some(event) = inputs.events.recv() => match event {
                    CallEvent::Left { mac, call, reason } => self.left(mac, call, reason).await,
                },
                Some(payload) = inputs.actions.recv() => self.on_forwarded(&payload).await,
                _ = sweep.tick() => self.sweep().await,
                _ = reconcile.tick() => self.reconcile().await,
            }
        }
    }
}

/// The device an action is carried out on.
fn action_device(action: &CallAction) -> Mac {
    match action {
        CallAction::Ring { target, .. } => *target,
        CallAction::Leg { device, .. } | CallAction::HangUp { device, .. } => *device,
        CallAction::Accepted { caller, .. } => *caller,
    }
}

/// The call an action belongs to.
fn action_call(action: &CallAction) -> CallId {
    match action {
        CallAction::Ring { call, .. }
        | CallAction::Leg { call, .. }
        | CallAction::HangUp { call, .. }
        | CallAction::Accepted { call, .. } => *call,
    }
}

/// The announcement xiaozhi-server speaks to the target (it recognises the
/// `[device_call]` prefix in the `listen detect` text the woken device sends).
pub fn ring_reason(caller_nickname: &str) -> String {
    let nickname = if caller_nickname.trim().is_empty() {
        "未知"
    } else {
        caller_nickname
    };
    format!("[device_call]您收到来自{nickname}的来电，是否接听？")
}

/// A MAC as manager-api sends it: colons, underscores or dashes, any case.
pub fn parse_mac(raw: &str) -> Option<Mac> {
    raw.trim().replace('-', ":").parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_read_as_the_node_gateway_writes_them() {
        assert_eq!(
            CallAnswer::new("pending", None).to_json(),
            json!({"status": "pending"})
        );
        assert_eq!(
            CallAnswer::new("offline", Some(wording::TARGET_OFFLINE)).to_json(),
            json!({"status": "offline", "message": "对方设备不在线，请稍后重试"})
        );
        let mac: Mac = "aa:bb:cc:dd:ee:01".parse().unwrap();
        assert_eq!(
            CallAnswer {
                status: "bridged",
                message: None,
                peer_mac: Some(mac)
            }
            .to_json(),
            json!({"status": "bridged", "peerMac": "aa:bb:cc:dd:ee:01"})
        );
    }

    #[test]
    fn macs_are_read_in_every_spelling() {
        let mac: Mac = "aa:bb:cc:dd:ee:01".parse().unwrap();
        for raw in [
            "aa:bb:cc:dd:ee:01",
            "AA-BB-CC-DD-EE-01",
            " aa_bb_cc_dd_ee_01 ",
        ] {
            assert_eq!(parse_mac(raw), Some(mac), "{raw}");
        }
        assert_eq!(parse_mac("nope"), None);
    }

    #[test]
    fn the_ring_reason_is_the_node_gateways() {
        assert_eq!(
            ring_reason("奶奶"),
            "[device_call]您收到来自奶奶的来电，是否接听？"
        );
        assert_eq!(
            ring_reason(" "),
            "[device_call]您收到来自未知的来电，是否接听？"
        );
    }
}
