//! The rules of a device's conversations, without tasks, channels or a clock: which
//! conversation a device message belongs to, when a hello starts one (and replaces the
//! device's current one), when one ends and why, and what the device hears then.
//!
//! The gateway's session manager (`xiaozhi_gateway::session::manager`) is the driver: it
//! classifies each device message ([`crate::control::parse_device_message`]), feeds it
//! here with the connection's generation, and performs the returned [`Decision`]s
//! (starting a conversation task, handing a message to one, telling one to end), keeping
//! only the channels of each conversation, keyed by its serial. Every rule below is
//! decided here and tested here:
//!
//! * A hello must be [`HELLO_VERSION`] over `udp` (the transport QUIC-capable firmware
//!   still announces); any other is refused with an alert and changes nothing.
//! * A hello while the gateway shuts down is ignored (the device is about to lose its
//!   connection anyway).
//! * A valid hello ends the device's current conversation ([`EndReason::Replaced`],
//!   nothing said to the device) and starts a new one with a new serial.
//! * `goodbye` ends the current conversation without an answer (PROTOCOL.md section 4),
//!   whatever session id it names, including none or an empty one; `udp_timeout` (sent
//!   by some firmware forks) ends it and the device hears goodbye.
//! * Everything else goes to the current conversation, or is counted as having none.
//!   A message from a conversation's own QUIC control stream goes to that conversation
//!   only: once a newer hello replaced it, its stream's messages are stale.
//! * The device's MQTT connection ending ends the conversation of *that* connection
//!   only: a device that reconnected before its old connection was found dead keeps the
//!   conversation it started on the new one.
//! * A conversation with no audio either way for `udp.idle_timeout_secs` ends
//!   ([`idle_end`]; the driver reads the clock and the channel's last activity).
//! * A conversation is told to end once; the first reason wins.
//! * Serials only grow, so a conversation task's late "ended" never removes its
//!   successor.

use std::collections::HashMap;

use crate::control::{DeviceMessage, HELLO_VERSION, UDP_TIMEOUT};
use crate::mac::Mac;

/// Why a conversation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndReason {
    /// The device said goodbye.
    DeviceGoodbye,
    /// The device's MQTT connection ended.
    DeviceDisconnected,
    /// The device said hello again.
    Replaced,
    /// No audio either way for `udp.idle_timeout_secs`.
    Idle,
    /// The pipeline ended it.
    PipelineFinished,
    /// The pipeline failed.
    PipelineFailed(String),
    /// The gateway is shutting down.
    Shutdown,
    /// An admin ended it (`goodbye` command).
    Admin,
    /// The device closed its QUIC connection (or lost it).
    DeviceClosedTransport,
    /// The device reported that its audio channel timed out (`{"type":"udp_timeout"}`,
    /// sent by some firmware forks): the speech server's conversation is closed and the
    /// device told, as the Node gateway does.
    DeviceUdpTimeout,
    /// The device call this conversation carried ended (the other party left, nobody
    /// answered, the longest call duration passed).
    CallEnded,
}

impl EndReason {
    /// Whether the device should be told (`goodbye`): only when we end it and the device
    /// is still there to hear it. A QUIC connection that ended may have been lost rather
    /// than closed, so the device hears it over MQTT too.
    pub fn tell_device(&self) -> bool {
        matches!(
            self,
            EndReason::Idle
                | EndReason::PipelineFinished
                | EndReason::PipelineFailed(_)
                | EndReason::Shutdown
                | EndReason::Admin
                | EndReason::DeviceClosedTransport
                | EndReason::DeviceUdpTimeout
                | EndReason::CallEnded
        )
    }

    /// Whether the device itself went away (or its channel did): a call it is being
    /// rung for ends. A replacing hello does not count: a rung device says hello to take
    /// the call.
    pub fn is_departure(&self) -> bool {
        matches!(
            self,
            EndReason::DeviceGoodbye
                | EndReason::DeviceDisconnected
                | EndReason::Idle
                | EndReason::DeviceClosedTransport
                | EndReason::DeviceUdpTimeout
        )
    }

    /// Metric label.
    pub fn label(&self) -> &'static str {
        match self {
            EndReason::DeviceGoodbye => "device_goodbye",
            EndReason::DeviceDisconnected => "device_disconnected",
            EndReason::Replaced => "replaced",
            EndReason::Idle => "idle",
            EndReason::PipelineFinished => "pipeline_finished",
            EndReason::PipelineFailed(_) => "pipeline_failed",
            EndReason::Shutdown => "shutdown",
            EndReason::Admin => "admin",
            EndReason::DeviceClosedTransport => "device_closed_transport",
            EndReason::DeviceUdpTimeout => "device_udp_timeout",
            EndReason::CallEnded => "call_ended",
        }
    }
}

/// What the driver must do, in the order given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Start the conversation `serial` for the hello just fed in.
    Start { serial: u64 },
    /// Tell conversation `serial` to end, for `reason`.
    End { serial: u64, reason: EndReason },
    /// Conversation `serial` no longer belongs to the device (a newer hello replaced it):
    /// drop what routes messages to it. Its task still runs to its end and reports it.
    Detach { serial: u64 },
    /// Hand the message just fed in to conversation `serial`.
    Forward { serial: u64 },
    /// The hello was refused: send the device an alert saying why (and count it).
    RefuseHello { why: String },
    /// A hello arrived while the gateway shuts down: ignored (counted).
    HelloDuringShutdown,
    /// The message belongs to no conversation: dropped (counted).
    NoConversation,
}

/// Which of a device's inputs a message came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// The device's MQTT connection.
    Mqtt,
    /// The QUIC control stream of conversation `serial`.
    Stream { serial: u64 },
}

#[derive(Debug, Clone, Copy)]
struct Live {
    serial: u64,
    /// The device connection the conversation was started on.
    generation: u64,
    /// An end was decided (the first reason wins).
    ending: bool,
}

/// The conversations of every device on this node: at most one each.
#[derive(Debug)]
pub struct Conversations {
    live: HashMap<Mac, Live>,
    next_serial: u64,
    shutting_down: bool,
}

impl Default for Conversations {
    fn default() -> Self {
        Conversations::new()
    }
}

impl Conversations {
    pub fn new() -> Conversations {
        Conversations {
            live: HashMap::new(),
            // Serials start at 1, so 0 never names a conversation.
            next_serial: 1,
            shutting_down: false,
        }
    }

    /// Conversations that have not yet reported their end.
    pub fn len(&self) -> usize {
        self.live.len()
    }

    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }

    /// The device's conversation, unless it was told to end (for requests that only a
    /// running conversation can take, such as becoming a call leg).
    pub fn running(&self, mac: &Mac) -> Option<u64> {
        self.live
            .get(mac)
            .filter(|l| !l.ending)
            .map(|live| live.serial)
    }

    /// A device message, as [`crate::control::parse_device_message`] classified it.
    pub fn on_message(
        &mut self,
        mac: Mac,
        generation: u64,
        via: Via,
        message: &DeviceMessage,
        out: &mut Vec<Decision>,
    ) {
        if let Via::Stream { serial } = via
            && self.live.get(&mac).is_none_or(|l| l.serial != serial)
        {
            out.push(Decision::NoConversation);
            return;
        }
        match message {
            DeviceMessage::Hello(hello) => {
                if hello.version != HELLO_VERSION || hello.transport != "udp" {
                    out.push(Decision::RefuseHello {
                        why: format!(
                            "unsupported hello (version {}, transport {:?}): this gateway speaks version {HELLO_VERSION} over udp",
                            hello.version, hello.transport
                        ),
                    });
                    return;
                }
                if self.shutting_down {
                    out.push(Decision::HelloDuringShutdown);
                    return;
                }
                if let Some(mut old) = self.live.remove(&mac) {
                    end(&mut old, EndReason::Replaced, out);
                    out.push(Decision::Detach { serial: old.serial });
                }
                let serial = self.next_serial;
                self.next_serial += 1;
                self.live.insert(
                    mac,
                    Live {
                        serial,
                        generation,
                        ending: false,
                    },
                );
                out.push(Decision::Start { serial });
            }
            DeviceMessage::Goodbye { .. } => {
                if let Some(live) = self.live.get_mut(&mac) {
                    end(live, EndReason::DeviceGoodbye, out);
                }
            }
            DeviceMessage::Other { kind, .. } if kind == UDP_TIMEOUT => {
                match self.live.get_mut(&mac) {
                    Some(live) => end(live, EndReason::DeviceUdpTimeout, out),
                    None => out.push(Decision::NoConversation),
                }
            }
            _ => out.push(match self.live.get(&mac) {
                Some(live) => Decision::Forward {
                    serial: live.serial,
                },
                None => Decision::NoConversation,
            }),
        }
    }

    /// The device connection `generation` ended.
    pub fn on_disconnected(&mut self, mac: Mac, generation: u64, out: &mut Vec<Decision>) {
        if let Some(live) = self
            .live
            .get_mut(&mac)
            .filter(|l| l.generation == generation)
        {
            end(live, EndReason::DeviceDisconnected, out);
        }
    }

    /// Conversation `serial`'s task finished. Returns whether it was still the device's
    /// conversation (else a newer one replaced it and stays).
    pub fn on_ended(&mut self, mac: Mac, serial: u64) -> bool {
        let current = self.live.get(&mac).is_some_and(|l| l.serial == serial);
        if current {
            self.live.remove(&mac);
        }
        current
    }

    /// An admin asks to end the device's conversation. Returns whether there was one
    /// still running to end.
    pub fn on_end_requested(&mut self, mac: Mac, out: &mut Vec<Decision>) -> bool {
        match self.live.get_mut(&mac).filter(|l| !l.ending) {
            Some(live) => {
                end(live, EndReason::Admin, out);
                true
            }
            None => false,
        }
    }

    /// The gateway shuts down: every conversation ends and no new one starts.
    pub fn on_shutdown(&mut self, out: &mut Vec<Decision>) {
        self.shutting_down = true;
        for live in self.live.values_mut() {
            end(live, EndReason::Shutdown, out);
        }
    }
}

/// The idle rule, with the clock read by the caller: a conversation (or call leg) with no
/// audio either way for `timeout_ms` ends with [`EndReason::Idle`]. Times are
/// milliseconds on one monotonic clock; a last activity stamped after `now_ms` was read
/// counts as no idle time, never as a huge one.
pub fn idle_end(last_activity_ms: u64, now_ms: u64, timeout_ms: u64) -> Option<EndReason> {
    (now_ms.saturating_sub(last_activity_ms) >= timeout_ms).then_some(EndReason::Idle)
}

/// Decides `reason` for `live` unless an end was decided before.
fn end(live: &mut Live, reason: EndReason, out: &mut Vec<Decision>) {
    if !live.ending {
        live.ending = true;
        out.push(Decision::End {
            serial: live.serial,
            reason,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::parse_device_message;

    const A: Mac = Mac::from_octets([0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0x01]);
    const B: Mac = Mac::from_octets([0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0x02]);

    fn message(json: &str) -> DeviceMessage {
        parse_device_message(json.as_bytes()).unwrap().0
    }

    fn hello() -> DeviceMessage {
        message(
            r#"{"type":"hello","version":3,"transport":"udp","audio_params":{"format":"opus","sample_rate":16000,"channels":1,"frame_duration":60}}"#,
        )
    }

    fn feed(
        c: &mut Conversations,
        mac: Mac,
        generation: u64,
        json: &DeviceMessage,
    ) -> Vec<Decision> {
        let mut out = Vec::new();
        c.on_message(mac, generation, Via::Mqtt, json, &mut out);
        out
    }

    #[test]
    fn a_hello_starts_a_conversation_and_a_second_replaces_it_silently() {
        let mut c = Conversations::new();
        assert_eq!(
            feed(&mut c, A, 1, &hello()),
            [Decision::Start { serial: 1 }]
        );
        assert_eq!(c.running(&A), Some(1));
        assert_eq!(
            feed(&mut c, A, 1, &hello()),
            [
                Decision::End {
                    serial: 1,
                    reason: EndReason::Replaced
                },
                Decision::Detach { serial: 1 },
                Decision::Start { serial: 2 },
            ]
        );
        assert!(!EndReason::Replaced.tell_device());
        // The replaced task's late end leaves its successor alone.
        assert!(!c.on_ended(A, 1));
        assert_eq!(c.running(&A), Some(2));
        assert!(c.on_ended(A, 2));
        assert!(c.is_empty());
    }

    #[test]
    fn hellos_of_another_version_or_transport_are_refused_and_change_nothing() {
        let mut c = Conversations::new();
        feed(&mut c, A, 1, &hello());
        for json in [
            r#"{"type":"hello","version":2,"transport":"udp","audio_params":{"format":"opus","sample_rate":16000,"channels":1,"frame_duration":60}}"#,
            r#"{"type":"hello","version":3,"transport":"websocket","audio_params":{"format":"opus","sample_rate":16000,"channels":1,"frame_duration":60}}"#,
        ] {
            let out = feed(&mut c, A, 1, &message(json));
            assert!(
                matches!(&out[..], [Decision::RefuseHello { why }] if why.contains("version 3 over udp")),
                "{out:?}"
            );
        }
        assert_eq!(c.running(&A), Some(1));
    }

    #[test]
    fn goodbye_ends_without_an_answer_whatever_session_id_it_names() {
        for json in [
            r#"{"type":"goodbye","session_id":"s-1"}"#,
            r#"{"type":"goodbye","session_id":""}"#,
            r#"{"type":"goodbye"}"#,
            r#"{"type":"goodbye","session_id":"someone-else"}"#,
        ] {
            let mut c = Conversations::new();
            feed(&mut c, A, 1, &hello());
            assert_eq!(
                feed(&mut c, A, 1, &message(json)),
                [Decision::End {
                    serial: 1,
                    reason: EndReason::DeviceGoodbye
                }],
                "{json}"
            );
            assert!(!EndReason::DeviceGoodbye.tell_device());
            // Said twice: the first end stands.
            assert!(feed(&mut c, A, 1, &message(json)).is_empty());
        }
        // A goodbye with no conversation is nothing at all.
        let mut c = Conversations::new();
        assert!(feed(&mut c, A, 1, &message(r#"{"type":"goodbye"}"#)).is_empty());
    }

    #[test]
    fn udp_timeout_ends_the_conversation_and_the_device_hears_it() {
        let mut c = Conversations::new();
        let timeout = message(r#"{"type":"udp_timeout"}"#);
        assert_eq!(feed(&mut c, A, 1, &timeout), [Decision::NoConversation]);
        feed(&mut c, A, 1, &hello());
        assert_eq!(
            feed(&mut c, A, 1, &timeout),
            [Decision::End {
                serial: 1,
                reason: EndReason::DeviceUdpTimeout
            }]
        );
        assert!(EndReason::DeviceUdpTimeout.tell_device());
    }

    #[test]
    fn other_messages_go_to_the_devices_own_conversation_or_nowhere() {
        let mut c = Conversations::new();
        let listen = message(r#"{"type":"listen","state":"detect","text":"hi"}"#);
        assert_eq!(feed(&mut c, A, 1, &listen), [Decision::NoConversation]);
        feed(&mut c, A, 1, &hello());
        feed(&mut c, B, 7, &hello());
        assert_eq!(
            feed(&mut c, A, 1, &listen),
            [Decision::Forward { serial: 1 }]
        );
        assert_eq!(
            feed(&mut c, B, 7, &listen),
            [Decision::Forward { serial: 2 }]
        );
        // Still forwarded while it ends: the conversation may be handing over.
        c.on_end_requested(A, &mut Vec::new());
        assert_eq!(
            feed(&mut c, A, 1, &listen),
            [Decision::Forward { serial: 1 }]
        );
    }

    #[test]
    fn a_stream_speaks_for_its_own_conversation_only() {
        let mut c = Conversations::new();
        let listen = message(r#"{"type":"listen","state":"start"}"#);
        feed(&mut c, A, 1, &hello());
        let mut out = Vec::new();
        c.on_message(A, 1, Via::Stream { serial: 1 }, &listen, &mut out);
        assert_eq!(out, [Decision::Forward { serial: 1 }]);
        feed(&mut c, A, 1, &hello());
        let mut out = Vec::new();
        c.on_message(A, 1, Via::Stream { serial: 1 }, &listen, &mut out);
        c.on_message(A, 1, Via::Stream { serial: 1 }, &hello(), &mut out);
        assert_eq!(out, [Decision::NoConversation, Decision::NoConversation]);
        assert_eq!(c.running(&A), Some(2));
    }

    #[test]
    fn a_disconnect_ends_only_the_conversation_of_that_connection() {
        let mut c = Conversations::new();
        feed(&mut c, A, 1, &hello());
        // The device reconnected (generation 2) and said hello before connection 1 was
        // found dead.
        feed(&mut c, A, 2, &hello());
        let mut out = Vec::new();
        c.on_disconnected(A, 1, &mut out);
        assert!(out.is_empty());
        c.on_disconnected(A, 2, &mut out);
        assert_eq!(
            out,
            [Decision::End {
                serial: 2,
                reason: EndReason::DeviceDisconnected
            }]
        );
        assert!(!EndReason::DeviceDisconnected.tell_device());
        assert_eq!(c.running(&A), None);
    }

    #[test]
    fn admin_ends_a_running_conversation_once() {
        let mut c = Conversations::new();
        let mut out = Vec::new();
        assert!(!c.on_end_requested(A, &mut out));
        feed(&mut c, A, 1, &hello());
        assert!(c.on_end_requested(A, &mut out));
        assert!(!c.on_end_requested(A, &mut out));
        assert_eq!(
            out,
            [Decision::End {
                serial: 1,
                reason: EndReason::Admin
            }]
        );
        assert!(EndReason::Admin.tell_device());
    }

    #[test]
    fn no_audio_for_the_timeout_ends_a_conversation_as_idle() {
        // Activity at 1,000 ms, timeout 5,000 ms.
        assert_eq!(idle_end(1_000, 1_000, 5_000), None);
        assert_eq!(idle_end(1_000, 5_999, 5_000), None);
        assert_eq!(idle_end(1_000, 6_000, 5_000), Some(EndReason::Idle));
        assert_eq!(idle_end(1_000, u64::MAX, 5_000), Some(EndReason::Idle));
        // Audio stamped after the clock was read: not idle, and no overflow.
        assert_eq!(idle_end(9_000, 8_000, 5_000), None);
        // Never any audio: idle once the timeout has passed since the channel's start.
        assert_eq!(idle_end(0, 4_999, 5_000), None);
        assert_eq!(idle_end(0, 5_000, 5_000), Some(EndReason::Idle));
    }

    #[test]
    fn shutdown_ends_everything_and_refuses_new_hellos() {
        let mut c = Conversations::new();
        feed(&mut c, A, 1, &hello());
        feed(&mut c, B, 1, &hello());
        feed(&mut c, B, 1, &message(r#"{"type":"goodbye"}"#));
        let mut out = Vec::new();
        c.on_shutdown(&mut out);
        // B was already ending: only A is told.
        assert_eq!(
            out,
            [Decision::End {
                serial: 1,
                reason: EndReason::Shutdown
            }]
        );
        assert_eq!(
            feed(&mut c, A, 1, &hello()),
            [Decision::HelloDuringShutdown]
        );
        assert_eq!(c.len(), 2);
        c.on_ended(A, 1);
        c.on_ended(B, 2);
        assert!(c.is_empty());
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        #[derive(Debug, Clone)]
        enum Step {
            Hello(usize, u64),
            Goodbye(usize),
            Listen(usize),
            Stream(usize, u64),
            Gone(usize, u64),
            Ended(usize, u64),
            Admin(usize),
            Shutdown,
        }

        fn step() -> impl Strategy<Value = Step> {
            let mac = 0usize..3;
            let n = 0u64..4;
            prop_oneof![
                4 => (mac.clone(), n.clone()).prop_map(|(m, g)| Step::Hello(m, g)),
                2 => mac.clone().prop_map(Step::Goodbye),
                2 => mac.clone().prop_map(Step::Listen),
                1 => (mac.clone(), n.clone()).prop_map(|(m, s)| Step::Stream(m, s)),
                2 => (mac.clone(), n.clone()).prop_map(|(m, g)| Step::Gone(m, g)),
                2 => (mac.clone(), 0u64..12).prop_map(|(m, s)| Step::Ended(m, s)),
                1 => mac.prop_map(Step::Admin),
                1 => Just(Step::Shutdown),
            ]
        }

        proptest! {
            /// Whatever devices do: serials grow, each conversation is told to end at
            /// most once and only after it started, messages reach only started
            /// conversations, and nothing starts after shutdown.
            #[test]
            fn every_sequence_keeps_the_invariants(steps in proptest::collection::vec(step(), 0..80)) {
                let macs = [A, B, Mac::from_octets([1, 2, 3, 4, 5, 6])];
                let mut c = Conversations::new();
                let mut started = Vec::new();
                let mut ended = std::collections::HashSet::new();
                let mut shut = false;
                for s in steps {
                    let mut out = Vec::new();
                    match s {
                        Step::Hello(m, g) => c.on_message(macs[m], g, Via::Mqtt, &hello(), &mut out),
                        Step::Goodbye(m) => c.on_message(macs[m], 0, Via::Mqtt, &message(r#"{"type":"goodbye"}"#), &mut out),
                        Step::Listen(m) => c.on_message(macs[m], 0, Via::Mqtt, &message(r#"{"type":"listen","state":"start"}"#), &mut out),
                        Step::Stream(m, serial) => c.on_message(macs[m], 0, Via::Stream { serial }, &message(r#"{"type":"abort"}"#), &mut out),
                        Step::Gone(m, g) => c.on_disconnected(macs[m], g, &mut out),
                        Step::Ended(m, serial) => { c.on_ended(macs[m], serial); }
                        Step::Admin(m) => { c.on_end_requested(macs[m], &mut out); }
                        Step::Shutdown => { shut = true; c.on_shutdown(&mut out); }
                    }
                    for d in out {
                        match d {
                            Decision::Start { serial } => {
                                prop_assert!(!shut, "started after shutdown");
                                prop_assert!(started.last().is_none_or(|&l| serial > l));
                                started.push(serial);
                            }
                            Decision::End { serial, .. } => {
                                prop_assert!(started.contains(&serial));
                                prop_assert!(ended.insert(serial), "ended twice: {}", serial);
                            }
                            Decision::Forward { serial } | Decision::Detach { serial } => {
                                prop_assert!(started.contains(&serial));
                            }
                            _ => {}
                        }
                    }
                    prop_assert!(c.len() <= macs.len());
                }
            }
        }
    }
}
