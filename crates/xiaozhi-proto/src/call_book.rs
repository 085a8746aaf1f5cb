//! Device-to-device calling: every rule of the call lifecycle, as a value.
//!
//! manager-api's address book asks the gateway to connect two devices
//! (`POST /api/call/request`, `POST /api/call/accept`); the Node gateway and the native
//! backend of xiaozhi-esp32-server's `py-test-mqtt` branch define what the answers mean.
//! This module holds the decisions and nothing else: who may call whom, when a call
//! rings, bridges or ends, and which device must be told what. The I/O around it (the
//! HTTP endpoints, the conversations that become call legs, the audio between them, a
//! book shared by several nodes) lives in `xiaozhi_gateway::calls` and never decides anything
//! itself.
//!
//! A call goes through two states:
//!
//! * **ringing**: the caller asked; its speech-server conversation is over and it hears
//!   silence; the target is woken (MCP `self.remote_wakeup`) and talks to its speech
//!   server, which announces the call. The target may accept, or the caller may give up.
//! * **bridged**: both devices' audio goes to each other. Reached by the target's
//!   accept, or at once when two devices call each other ("crossing" requests).
//!
//! A device takes part in at most one call at a time, as caller, ringing target or
//! party to a bridged call; a request touching a device that already does is refused.
//! Any party leaving (goodbye, disconnect, a new hello, idle) ends the call, and the
//! devices still in it are hung up (a `goodbye` with their own session id).
//!
//! Time comes in as `now_ms` (Unix milliseconds, so that nodes sharing a book agree);
//! nothing here reads a clock. [`CallBook::version`] changes with every change, so a
//! store shared by several nodes can write the book back with compare-and-set.

use std::collections::{BTreeMap, HashMap, VecDeque};

use serde::{Deserialize, Serialize};

use super::mac::Mac;

/// Identifies one call for its whole life (ringing, then bridged).
pub type CallId = u64;

/// The AES-128-GCM key of a call's audio between two nodes of a cluster: fresh per call
/// (chosen by whoever asks the book, which holds no randomness), so that frames crossing
/// the bus are sealed and a bus client sees only ciphertext. Kept in the book, never in
/// the messages between nodes; never printed.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct MediaKey(pub [u8; 16]);

impl std::fmt::Debug for MediaKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MediaKey(<redacted>)")
    }
}

impl Serialize for MediaKey {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&hex::encode(self.0))
    }
}

impl<'de> Deserialize<'de> for MediaKey {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        let bytes = hex::decode(s.as_ref()).map_err(serde::de::Error::custom)?;
        let key = bytes
            .try_into()
            .map_err(|_| serde::de::Error::custom("a media key is 16 bytes"))?;
        Ok(MediaKey(key))
    }
}

/// Calls that ended while ringing are remembered this long, so that a late accept is
/// told `caller_gone` rather than `no_pending`.
pub const ENDED_RINGING_TTL_MS: i64 = 5 * 60 * 1000;

/// At most this many ended ringing calls are remembered.
pub const ENDED_RINGING_MAX: usize = 1024;

/// Where a call is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CallState {
    /// Requested; the target has been woken and has not accepted yet.
    Ringing,
    /// Both devices hear each other.
    Bridged,
}

impl CallState {
    pub fn as_str(self) -> &'static str {
        match self {
            CallState::Ringing => "ringing",
            CallState::Bridged => "bridged",
        }
    }
}

/// One call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Call {
    pub id: CallId,
    /// The device that asked first.
    pub caller: Mac,
    /// The device that was asked for.
    pub target: Mac,
    /// How the caller is announced to the target ("[device_call]...来自{nickname}...").
    pub caller_nickname: String,
    pub state: CallState,
    /// Unix ms of the request.
    pub requested_ms: i64,
    /// Unix ms the call was bridged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridged_ms: Option<i64>,
    /// Seals the call's audio between nodes.
    pub media_key: MediaKey,
}

impl Call {
    /// The other party of `device` in this call.
    pub fn peer_of(&self, device: Mac) -> Mac {
        if device == self.caller {
            self.target
        } else {
            self.caller
        }
    }

    /// `device`'s part in this call, if it has one.
    pub fn role_of(&self, device: Mac) -> Option<Role> {
        if device == self.caller {
            Some(Role::Caller)
        } else if device == self.target {
            Some(Role::Target)
        } else {
            None
        }
    }
}

/// A device's part in a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Caller,
    Target,
}

/// Why a request or an accept was refused. Each maps to the Node gateway's
/// `{"status":"error","message":...}` (see [`Refusal::message`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Caller and target are the same device.
    SameDevice,
    /// One of the devices is already in a bridged call.
    AlreadyInCall,
    /// One of the devices is already calling or being called.
    PendingExists,
    /// The book holds as many calls as it may.
    Full,
}

impl Refusal {
    /// The text the speech server speaks to the user (xiaozhi-server speaks `message`
    /// only for `status: "error"`); the Chinese wording of the Node gateway and the
    /// native backend, which users of these devices hear today.
    pub fn message(self) -> &'static str {
        match self {
            Refusal::SameDevice => "呼叫设备参数无效",
            Refusal::AlreadyInCall => "设备已在通话中",
            Refusal::PendingExists => "设备已有等待中的通话",
            Refusal::Full => "通话数量已达上限，请稍后再试",
        }
    }

    /// Short machine name for logs and metrics.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::SameDevice => "same_device",
            Refusal::AlreadyInCall => "already_in_call",
            Refusal::PendingExists => "pending_exists",
            Refusal::Full => "full",
        }
    }
}

/// What a request did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestOutcome {
    /// A new call rings the target.
    Ringing(Call),
    /// The target had already called the caller: that call is bridged now.
    Bridged(Call),
    Refused(Refusal),
}

/// What an accept did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AcceptOutcome {
    /// The call ringing the accepting device is bridged.
    Bridged(Call),
    /// Nothing rings this device.
    NoPending,
    /// The call that rang this device has ended (the caller left or gave up), or its
    /// caller is no longer connected (the call is ended now).
    CallerGone(Option<Call>),
    Refused(Refusal),
}

/// Why a call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndCause {
    /// A party said goodbye, disconnected, said hello again or went idle.
    PartyLeft,
    /// Nobody accepted within the ring timeout.
    RingTimeout,
    /// The call reached its longest allowed duration.
    MaxDuration,
    /// The caller was found gone when the target accepted.
    CallerGone,
}

impl EndCause {
    pub fn as_str(self) -> &'static str {
        match self {
            EndCause::PartyLeft => "party_left",
            EndCause::RingTimeout => "ring_timeout",
            EndCause::MaxDuration => "max_duration",
            EndCause::CallerGone => "caller_gone",
        }
    }
}

/// A call that ended, and who must be hung up because of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ended {
    pub call: Call,
    pub cause: EndCause,
    /// The device whose departure ended it (none for timeouts).
    pub left: Option<Mac>,
}

impl Ended {
    /// The devices that must hear a goodbye: the parties whose conversation is a call
    /// leg (the caller always; the target once bridged), except the one that left.
    pub fn hang_up(&self) -> Vec<Mac> {
        let mut legs = vec![self.call.caller];
        if self.call.state == CallState::Bridged {
            legs.push(self.call.target);
        }
        legs.retain(|m| Some(*m) != self.left);
        legs
    }
}

/// What the gateway must do for a decision, device by device. Executed on the node that
/// holds each device (in JSON, tagged by `action`, when it is sent to another node).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum CallAction {
    /// Wake the target: MCP `tools/call` `self.remote_wakeup` with the announcement.
    Ring {
        target: Mac,
        call: CallId,
        caller_nickname: String,
    },
    /// The device's conversation becomes a leg of `call` with `peer`: its speech-server
    /// conversation ends without a goodbye to the device, its audio channel stays, and
    /// its uplink goes to the peer once `bridged` (until then it hears silence).
    Leg {
        device: Mac,
        call: CallId,
        peer: Mac,
        bridged: bool,
    },
    /// Tell the caller the target accepted: `{"type":"call_accepted","from":<mac>}`.
    Accepted {
        caller: Mac,
        callee: Mac,
        call: CallId,
    },
    /// End the device's leg of `call`: a goodbye with the device's own session id.
    HangUp { device: Mac, call: CallId },
}

/// The actions that carry out a request's outcome.
pub fn plan_request(outcome: &RequestOutcome) -> Vec<CallAction> {
    match outcome {
        RequestOutcome::Ringing(call) => vec![
            CallAction::Leg {
                device: call.caller,
                call: call.id,
                peer: call.target,
                bridged: false,
            },
            CallAction::Ring {
                target: call.target,
                call: call.id,
                caller_nickname: call.caller_nickname.clone(),
            },
        ],
        // The earlier caller already hears silence; the later one leaves its speech
        // server now. Both legs then get their peer.
        RequestOutcome::Bridged(call) => bridge(call),
        RequestOutcome::Refused(_) => Vec::new(),
    }
}

/// The actions that carry out an accept's outcome.
pub fn plan_accept(outcome: &AcceptOutcome) -> Vec<CallAction> {
    match outcome {
        AcceptOutcome::Bridged(call) => {
            let mut actions = vec![CallAction::Accepted {
                caller: call.caller,
                callee: call.target,
                call: call.id,
            }];
            actions.extend(bridge(call));
            actions
        }
        AcceptOutcome::CallerGone(Some(call)) => plan_end(&Ended {
            call: call.clone(),
            cause: EndCause::CallerGone,
            left: None,
        }),
        _ => Vec::new(),
    }
}

/// The actions that carry out an ended call: hang up every leg still in it.
pub fn plan_end(ended: &Ended) -> Vec<CallAction> {
    ended
        .hang_up()
        .into_iter()
        .map(|device| CallAction::HangUp {
            device,
            call: ended.call.id,
        })
        .collect()
}

/// The target's leg first: audio from the caller has somewhere to go as soon as the
/// caller's leg learns its peer.
fn bridge(call: &Call) -> Vec<CallAction> {
    vec![
        CallAction::Leg {
            device: call.target,
            call: call.id,
            peer: call.caller,
            bridged: true,
        },
        CallAction::Leg {
            device: call.caller,
            call: call.id,
            peer: call.target,
            bridged: true,
        },
    ]
}

/// A call that ended while ringing, for `caller_gone`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct EndedRinging {
    target: Mac,
    call: CallId,
    ended_ms: i64,
}

/// Every call in progress, and the rules that change them.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CallBook {
    /// Bumped by every change.
    version: u64,
    /// The next call's id.
    next_id: CallId,
    /// Calls by id; ids grow, so this is also request order (oldest first).
    calls: BTreeMap<CallId, Call>,
    /// Recently ended ringing calls, oldest first (bounded).
    #[serde(default)]
    ended_ringing: VecDeque<EndedRinging>,
    /// Which call each device is in; derived from `calls` (rebuilt after loading).
    #[serde(skip)]
    by_device: HashMap<Mac, CallId>,
}

impl PartialEq for CallBook {
    fn eq(&self, other: &Self) -> bool {
        self.version == other.version
            && self.next_id == other.next_id
            && self.calls == other.calls
            && self.ended_ringing == other.ended_ringing
    }
}

impl Eq for CallBook {}

impl CallBook {
    pub fn new() -> CallBook {
        CallBook {
            next_id: 1,
            ..CallBook::default()
        }
    }

    /// Reads a book written by [`CallBook::to_json`].
    pub fn from_json(json: &[u8]) -> Result<CallBook, serde_json::Error> {
        let mut book: CallBook = serde_json::from_slice(json)?;
        book.next_id = book.next_id.max(1);
        book.by_device = book
            .calls
            .values()
            .flat_map(|c| [(c.caller, c.id), (c.target, c.id)])
            .collect();
        Ok(book)
    }

    pub fn to_json(&self) -> Vec<u8> {
        // A book of plain values always serializes.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Changes with every change to the book.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The call `device` takes part in.
    pub fn call_of(&self, device: Mac) -> Option<&Call> {
        self.calls.get(self.by_device.get(&device)?)
    }

    pub fn get(&self, id: CallId) -> Option<&Call> {
        self.calls.get(&id)
    }

    /// Every call, oldest first.
    pub fn calls(&self) -> impl Iterator<Item = &Call> {
        self.calls.values()
    }

    pub fn len(&self) -> usize {
        self.calls.len()
    }

    pub fn is_empty(&self) -> bool {
        self.calls.is_empty()
    }

    /// The call ringing `target`, if any (the oldest, should there be several).
    pub fn ringing_for(&self, target: Mac) -> Option<&Call> {
        self.call_of(target)
            .filter(|c| c.state == CallState::Ringing && c.target == target)
    }

    /// `caller` asks to talk to `target`. Both are known to be connected (the caller of
    /// this function checks; an offline target is answered `offline` before the book is
    /// asked). `max_calls` bounds the book; `media_key` is the new call's, if one rings.
    pub fn request(
        &mut self,
        caller: Mac,
        target: Mac,
        caller_nickname: &str,
        now_ms: i64,
        max_calls: usize,
        media_key: MediaKey,
    ) -> RequestOutcome {
        if caller == target {
            return RequestOutcome::Refused(Refusal::SameDevice);
        }
        let caller_call = self.call_of(caller).cloned();
        let target_call = self.call_of(target).cloned();
        for call in [&caller_call, &target_call].into_iter().flatten() {
            if call.state == CallState::Bridged {
                return RequestOutcome::Refused(Refusal::AlreadyInCall);
            }
        }
        // Crossing requests: the target is already ringing the caller.
        if let Some(call) = &caller_call
            && call.caller == target
            && call.target == caller
        {
            let call = self.bridge(call.id, now_ms);
            return RequestOutcome::Bridged(call);
        }
        if caller_call.is_some() || target_call.is_some() {
            return RequestOutcome::Refused(Refusal::PendingExists);
        }
        if self.calls.len() >= max_calls {
            return RequestOutcome::Refused(Refusal::Full);
        }
        let call = Call {
            id: self.next_id.max(1),
            caller,
            target,
            caller_nickname: caller_nickname.to_owned(),
            state: CallState::Ringing,
            requested_ms: now_ms,
            bridged_ms: None,
            media_key,
        };
        self.next_id = call.id + 1;
        self.by_device.insert(caller, call.id);
        self.by_device.insert(target, call.id);
        self.calls.insert(call.id, call.clone());
        self.version += 1;
        RequestOutcome::Ringing(call)
    }

    /// `callee` accepts the call ringing it. `caller_connected` says whether that call's
    /// caller is still connected (asked of presence by the caller of this function,
    /// after [`CallBook::ringing_for`]); a caller that is not ends the call.
    pub fn accept(&mut self, callee: Mac, caller_connected: bool, now_ms: i64) -> AcceptOutcome {
        self.forget_ended_ringing(now_ms);
        match self.call_of(callee).cloned() {
            Some(call) if call.state == CallState::Bridged => {
                AcceptOutcome::Refused(Refusal::AlreadyInCall)
            }
            Some(call) if call.target == callee => {
                if !caller_connected {
                    let ended = self.end(call.id, now_ms);
                    return AcceptOutcome::CallerGone(ended);
                }
                AcceptOutcome::Bridged(self.bridge(call.id, now_ms))
            }
            // The device is itself calling someone: nothing rings it.
            Some(_) => AcceptOutcome::NoPending,
            None if self.ended_ringing.iter().any(|e| e.target == callee) => {
                AcceptOutcome::CallerGone(None)
            }
            None => AcceptOutcome::NoPending,
        }
    }

    /// `device` left call `call` (goodbye, disconnect, a new hello, idle, an audio
    /// channel that failed). Nothing happens if the device is no longer in that call, so
    /// a late report about an earlier call never ends a later one.
    pub fn leave(&mut self, device: Mac, call: CallId, now_ms: i64) -> Option<Ended> {
        if self.by_device.get(&device) != Some(&call) {
            return None;
        }
        let ended = self.end(call, now_ms)?;
        Some(Ended {
            call: ended,
            cause: EndCause::PartyLeft,
            left: Some(device),
        })
    }

    /// Ends calls ringing for longer than `ring_timeout_ms`, and bridged calls older than
    /// `max_call_ms` (0: no limit).
    pub fn expire(&mut self, now_ms: i64, ring_timeout_ms: i64, max_call_ms: i64) -> Vec<Ended> {
        self.forget_ended_ringing(now_ms);
        let due: Vec<(CallId, EndCause)> = self
            .calls
            .values()
            .filter_map(|c| match c.state {
                CallState::Ringing if now_ms - c.requested_ms >= ring_timeout_ms => {
                    Some((c.id, EndCause::RingTimeout))
                }
                CallState::Bridged
                    if max_call_ms > 0
                        && now_ms - c.bridged_ms.unwrap_or(c.requested_ms) >= max_call_ms =>
                {
                    Some((c.id, EndCause::MaxDuration))
                }
                _ => None,
            })
            .collect();
        due.into_iter()
            .filter_map(|(id, cause)| {
                Some(Ended {
                    call: self.end(id, now_ms)?,
                    cause,
                    left: None,
                })
            })
            .collect()
    }

    /// When [`CallBook::expire`] next has something to do (Unix ms), if ever.
    pub fn next_deadline(&self, ring_timeout_ms: i64, max_call_ms: i64) -> Option<i64> {
        self.calls
            .values()
            .filter_map(|c| match c.state {
                CallState::Ringing => Some(c.requested_ms + ring_timeout_ms),
                CallState::Bridged if max_call_ms > 0 => {
                    Some(c.bridged_ms.unwrap_or(c.requested_ms) + max_call_ms)
                }
                CallState::Bridged => None,
            })
            .min()
    }

    fn bridge(&mut self, id: CallId, now_ms: i64) -> Call {
        let call = self
            .calls
            .get_mut(&id)
            .expect("bridged call is in the book");
        call.state = CallState::Bridged;
        call.bridged_ms = Some(now_ms);
        self.version += 1;
        call.clone()
    }

    /// Removes a call, remembering it for `caller_gone` if it was still ringing.
    fn end(&mut self, id: CallId, now_ms: i64) -> Option<Call> {
        let call = self.calls.remove(&id)?;
        for device in [call.caller, call.target] {
            if self.by_device.get(&device) == Some(&id) {
                self.by_device.remove(&device);
            }
        }
        if call.state == CallState::Ringing {
            if self.ended_ringing.len() >= ENDED_RINGING_MAX {
                self.ended_ringing.pop_front();
            }
            self.ended_ringing.push_back(EndedRinging {
                target: call.target,
                call: call.id,
                ended_ms: now_ms,
            });
        }
        self.version += 1;
        Some(call)
    }

    fn forget_ended_ringing(&mut self, now_ms: i64) {
        let before = self.ended_ringing.len();
        while self
            .ended_ringing
            .front()
            .is_some_and(|e| now_ms - e.ended_ms > ENDED_RINGING_TTL_MS)
        {
            self.ended_ringing.pop_front();
        }
        if self.ended_ringing.len() != before {
            self.version += 1;
        }
    }

    /// Checks the derived index against the calls (for tests and debugging).
    pub fn is_consistent(&self) -> bool {
        let mut expected = HashMap::new();
        for call in self.calls.values() {
            if call.caller == call.target
                || expected.insert(call.caller, call.id).is_some()
                || expected.insert(call.target, call.id).is_some()
            {
                return false;
            }
        }
        expected == self.by_device && self.calls.keys().all(|id| *id < self.next_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 100;
    const KEY: MediaKey = MediaKey([7; 16]);

    fn mac(n: u8) -> Mac {
        Mac::from_octets([0xaa, 0, 0, 0, 0, n])
    }

    fn ringing(book: &mut CallBook, caller: u8, target: u8, now: i64) -> Call {
        match book.request(mac(caller), mac(target), "奶奶", now, MAX, KEY) {
            RequestOutcome::Ringing(call) => call,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_request_rings_the_target_and_the_caller_hears_silence() {
        let mut book = CallBook::new();
        let call = ringing(&mut book, 1, 2, 1_000);
        assert_eq!(call.state, CallState::Ringing);
        assert_eq!(
            plan_request(&RequestOutcome::Ringing(call.clone())),
            vec![
                CallAction::Leg {
                    device: mac(1),
                    call: call.id,
                    peer: mac(2),
                    bridged: false
                },
                CallAction::Ring {
                    target: mac(2),
                    call: call.id,
                    caller_nickname: "奶奶".into()
                },
            ]
        );
        assert_eq!(book.call_of(mac(1)), Some(&call));
        assert_eq!(book.ringing_for(mac(2)), Some(&call));
        assert_eq!(book.ringing_for(mac(1)), None, "the caller is not rung");
        assert!(book.is_consistent());
    }

    #[test]
    fn accept_bridges_tells_the_caller_and_joins_both_legs() {
        let mut book = CallBook::new();
        let call = ringing(&mut book, 1, 2, 1_000);
        let AcceptOutcome::Bridged(bridged) = book.accept(mac(2), true, 3_000) else {
            panic!()
        };
        assert_eq!(bridged.id, call.id);
        assert_eq!(bridged.bridged_ms, Some(3_000));
        assert_eq!(
            plan_accept(&AcceptOutcome::Bridged(bridged.clone())),
            vec![
                CallAction::Accepted {
                    caller: mac(1),
                    callee: mac(2),
                    call: call.id
                },
                CallAction::Leg {
                    device: mac(2),
                    call: call.id,
                    peer: mac(1),
                    bridged: true
                },
                CallAction::Leg {
                    device: mac(1),
                    call: call.id,
                    peer: mac(2),
                    bridged: true
                },
            ]
        );
        // Accepting twice: the device is in a call now.
        assert_eq!(
            book.accept(mac(2), true, 3_001),
            AcceptOutcome::Refused(Refusal::AlreadyInCall)
        );
        assert!(book.is_consistent());
    }

    #[test]
    fn crossing_requests_bridge_at_once() {
        let mut book = CallBook::new();
        let call = ringing(&mut book, 1, 2, 1_000);
        let RequestOutcome::Bridged(bridged) = book.request(mac(2), mac(1), "", 1_500, MAX, KEY)
        else {
            panic!()
        };
        assert_eq!(
            (bridged.id, bridged.caller, bridged.target),
            (call.id, mac(1), mac(2))
        );
        let actions = plan_request(&RequestOutcome::Bridged(bridged));
        assert!(
            !actions
                .iter()
                .any(|a| matches!(a, CallAction::Accepted { .. } | CallAction::Ring { .. })),
            "a crossing call is neither announced nor accepted: {actions:?}"
        );
        assert_eq!(actions.len(), 2);
        assert!(book.is_consistent());
    }

    #[test]
    fn busy_devices_are_refused() {
        let mut book = CallBook::new();
        ringing(&mut book, 1, 2, 0);
        // The caller, or the ringing target, asked again or asked for by someone else.
        for (caller, target) in [(1, 3), (3, 1), (2, 3), (3, 2)] {
            assert_eq!(
                book.request(mac(caller), mac(target), "", 1, MAX, KEY),
                RequestOutcome::Refused(Refusal::PendingExists),
                "{caller} -> {target}"
            );
        }
        // The same request twice is not a crossing.
        assert_eq!(
            book.request(mac(1), mac(2), "", 1, MAX, KEY),
            RequestOutcome::Refused(Refusal::PendingExists)
        );
        book.accept(mac(2), true, 2);
        for (caller, target) in [(1, 3), (3, 1), (2, 3), (3, 2), (2, 1)] {
            assert_eq!(
                book.request(mac(caller), mac(target), "", 3, MAX, KEY),
                RequestOutcome::Refused(Refusal::AlreadyInCall),
                "{caller} -> {target}"
            );
        }
        assert_eq!(
            book.request(mac(4), mac(4), "", 3, MAX, KEY),
            RequestOutcome::Refused(Refusal::SameDevice)
        );
        assert!(book.is_consistent());
    }

    #[test]
    fn the_book_is_bounded() {
        let mut book = CallBook::new();
        for n in 0..3 {
            ringing(&mut book, 2 * n, 2 * n + 1, 0);
        }
        assert_eq!(
            book.request(mac(10), mac(11), "", 0, 3, KEY),
            RequestOutcome::Refused(Refusal::Full)
        );
    }

    #[test]
    fn accept_without_a_ringing_call() {
        let mut book = CallBook::new();
        assert_eq!(book.accept(mac(2), true, 0), AcceptOutcome::NoPending);
        // The caller accepting its own call: nothing rings it.
        ringing(&mut book, 1, 2, 0);
        assert_eq!(book.accept(mac(1), true, 0), AcceptOutcome::NoPending);
    }

    #[test]
    fn an_accept_after_the_caller_left_is_caller_gone() {
        let mut book = CallBook::new();
        let call = ringing(&mut book, 1, 2, 0);
        let ended = book.leave(mac(1), call.id, 1_000).unwrap();
        assert_eq!(ended.cause, EndCause::PartyLeft);
        assert!(ended.hang_up().is_empty(), "the ringing target has no leg");
        assert_eq!(
            book.accept(mac(2), true, 2_000),
            AcceptOutcome::CallerGone(None)
        );
        // Remembered for a while only.
        assert_eq!(
            book.accept(mac(2), true, 1_000 + ENDED_RINGING_TTL_MS + 1),
            AcceptOutcome::NoPending
        );
        assert!(book.is_consistent());
    }

    #[test]
    fn an_accept_whose_caller_is_disconnected_ends_the_call() {
        let mut book = CallBook::new();
        let call = ringing(&mut book, 1, 2, 0);
        let outcome = book.accept(mac(2), false, 10);
        assert_eq!(outcome, AcceptOutcome::CallerGone(Some(call.clone())));
        assert_eq!(
            plan_accept(&outcome),
            vec![CallAction::HangUp {
                device: mac(1),
                call: call.id
            }]
        );
        assert!(book.is_empty());
        assert!(book.is_consistent());
    }

    #[test]
    fn leaving_hangs_up_the_other_legs() {
        // A ringing target leaving: the caller (the only leg) is hung up.
        let mut book = CallBook::new();
        let call = ringing(&mut book, 1, 2, 0);
        let ended = book.leave(mac(2), call.id, 5).unwrap();
        assert_eq!(
            plan_end(&ended),
            vec![CallAction::HangUp {
                device: mac(1),
                call: call.id
            }]
        );
        // Bridged: whoever leaves, the other is hung up.
        for leaver in [1, 2] {
            let mut book = CallBook::new();
            let call = ringing(&mut book, 1, 2, 0);
            book.accept(mac(2), true, 1);
            let ended = book.leave(mac(leaver), call.id, 2).unwrap();
            let other = if leaver == 1 { 2 } else { 1 };
            assert_eq!(ended.hang_up(), vec![mac(other)]);
            assert!(book.is_empty());
            assert!(book.is_consistent());
        }
    }

    #[test]
    fn a_late_report_never_ends_a_later_call() {
        let mut book = CallBook::new();
        let first = ringing(&mut book, 1, 2, 0);
        book.leave(mac(1), first.id, 1).unwrap();
        let second = ringing(&mut book, 1, 2, 2);
        assert_ne!(first.id, second.id);
        assert_eq!(book.leave(mac(1), first.id, 3), None);
        assert_eq!(book.leave(mac(3), second.id, 3), None, "not a party");
        assert_eq!(book.call_of(mac(1)), Some(&second));
    }

    #[test]
    fn ringing_times_out_and_the_caller_is_hung_up() {
        let mut book = CallBook::new();
        let call = ringing(&mut book, 1, 2, 0);
        assert_eq!(book.next_deadline(60_000, 0), Some(60_000));
        assert!(book.expire(59_999, 60_000, 0).is_empty());
        let ended = book.expire(60_000, 60_000, 0);
        assert_eq!(ended.len(), 1);
        assert_eq!(ended[0].cause, EndCause::RingTimeout);
        assert_eq!(
            plan_end(&ended[0]),
            vec![CallAction::HangUp {
                device: mac(1),
                call: call.id
            }]
        );
        assert_eq!(book.next_deadline(60_000, 0), None);
        assert_eq!(
            book.accept(mac(2), true, 60_001),
            AcceptOutcome::CallerGone(None)
        );
    }

    #[test]
    fn bridged_calls_end_at_their_longest_duration_if_one_is_set() {
        let mut book = CallBook::new();
        let call = ringing(&mut book, 1, 2, 0);
        book.accept(mac(2), true, 1_000);
        assert!(book.expire(10_000_000, 60_000, 0).is_empty(), "no limit");
        assert_eq!(book.next_deadline(60_000, 5_000), Some(6_000));
        let ended = book.expire(6_000, 60_000, 5_000);
        assert_eq!(ended[0].cause, EndCause::MaxDuration);
        assert_eq!(
            plan_end(&ended[0]),
            vec![
                CallAction::HangUp {
                    device: mac(1),
                    call: call.id
                },
                CallAction::HangUp {
                    device: mac(2),
                    call: call.id
                }
            ]
        );
    }

    #[test]
    fn the_book_survives_json_with_its_index() {
        let mut book = CallBook::new();
        ringing(&mut book, 1, 2, 0);
        let call = ringing(&mut book, 3, 4, 0);
        book.accept(mac(4), true, 1);
        book.leave(mac(1), 1, 2);
        let copy = CallBook::from_json(&book.to_json()).unwrap();
        assert_eq!(copy, book);
        assert!(copy.is_consistent());
        assert_eq!(copy.call_of(mac(3)).map(|c| c.id), Some(call.id));
        assert_eq!(
            copy.clone().accept(mac(2), true, 3),
            AcceptOutcome::CallerGone(None)
        );
        assert!(CallBook::from_json(b"{").is_err());
    }

    #[test]
    fn the_media_key_is_kept_and_never_printed() {
        let mut book = CallBook::new();
        let call = ringing(&mut book, 1, 2, 0);
        assert_eq!(call.media_key, KEY);
        assert!(!format!("{call:?}").contains("07070707"), "{call:?}");
        let copy = CallBook::from_json(&book.to_json()).unwrap();
        assert_eq!(copy.get(call.id).unwrap().media_key, KEY);
    }

    #[test]
    fn versions_change_with_every_change_only() {
        let mut book = CallBook::new();
        let v0 = book.version();
        book.accept(mac(1), true, 0);
        assert_eq!(book.version(), v0, "a no-op keeps the version");
        let call = ringing(&mut book, 1, 2, 0);
        let v1 = book.version();
        assert!(v1 > v0);
        book.request(mac(1), mac(3), "", 0, MAX, KEY);
        assert_eq!(book.version(), v1, "a refusal changes nothing");
        book.leave(mac(1), call.id, 0);
        assert!(book.version() > v1);
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        #[derive(Debug, Clone)]
        enum Op {
            Request(u8, u8),
            Accept(u8, bool),
            Leave(u8, CallId),
            Expire(i64),
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                (0u8..6, 0u8..6).prop_map(|(a, b)| Op::Request(a, b)),
                (0u8..6, any::<bool>()).prop_map(|(a, c)| Op::Accept(a, c)),
                (0u8..6, 0u64..8).prop_map(|(a, id)| Op::Leave(a, id)),
                (0i64..3).prop_map(Op::Expire),
            ]
        }

        proptest! {
            /// Whatever happens, a device is in at most one call, the index matches the
            /// calls, a bridged call's parties are both legs, and every ended call hangs
            /// up only its own parties.
            #[test]
            fn the_rules_keep_the_book_consistent(ops in proptest::collection::vec(op(), 0..60)) {
                let mut book = CallBook::new();
                let mut now = 0i64;
                for op in ops {
                    now += 1_000;
                    let ended: Vec<Ended> = match op {
                        Op::Request(a, b) => {
                            let outcome = book.request(mac(a), mac(b), "n", now, 4, KEY);
                            for action in plan_request(&outcome) {
                                if let CallAction::Leg { device, call, .. } = action {
                                    prop_assert_eq!(book.call_of(device).map(|c| c.id), Some(call));
                                }
                            }
                            Vec::new()
                        }
                        Op::Accept(a, connected) => match book.accept(mac(a), connected, now) {
                            AcceptOutcome::Bridged(call) => {
                                prop_assert_eq!(call.target, mac(a));
                                Vec::new()
                            }
                            AcceptOutcome::CallerGone(Some(call)) => vec![Ended { call, cause: EndCause::CallerGone, left: None }],
                            _ => Vec::new(),
                        },
                        Op::Leave(a, id) => book.leave(mac(a), id, now).into_iter().collect(),
                        Op::Expire(t) => book.expire(now, 2_000 * (t + 1), 3_000 * t),
                    };
                    for e in &ended {
                        for device in e.hang_up() {
                            prop_assert!(e.call.role_of(device).is_some());
                            prop_assert!(book.call_of(device).is_none_or(|c| c.id != e.call.id));
                        }
                    }
                    prop_assert!(book.is_consistent());
                    let copy = CallBook::from_json(&book.to_json()).unwrap();
                    prop_assert!(copy.is_consistent());
                    prop_assert_eq!(&copy, &book);
                }
            }
        }
    }
}
