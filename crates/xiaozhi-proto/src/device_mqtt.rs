//! The state machine of one device's MQTT 3.1.1 connection, without the socket.
//!
//! The driver (`xiaozhi_gateway::front_end`) frames packets with `rumqttc::mqttbytes`,
//! hands each one here as a [`DevicePacket`] with the current time, performs the returned
//! [`Action`]s in order (writing each [`Reply`] as the packet it names), and sleeps until
//! [`DeviceMqttConnection::deadline`]. Everything the firmware relies on, and everything a
//! hostile client might try, is decided here:
//! * CONNECT must come first and within the connect timeout; credentials are checked
//!   before any CONNACK is sent (the Node gateway acknowledges first, then checks);
//! * keep-alive is enforced at 1.5x the client's value;
//! * PUBLISH at QoS 0 and 1 to the uplink topic is accepted (QoS 1 acknowledged);
//!   other topics are dropped and counted, QoS 2 ends the connection;
//! * SUBSCRIBE succeeds only for the device's own `devices/p2p/<mac_>` (older firmware
//!   subscribes; newer firmware never does and gets its messages anyway).
//!
//! The packet types are this module's own, holding only what the rules read, so the rules
//! need no MQTT library (and the framing library's runtime stays out of this crate).

use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::credentials::{AuthError, DeviceIdentity, Verifier};

/// MQTT quality of service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Qos {
    AtMostOnce,
    AtLeastOnce,
    ExactlyOnce,
}

/// A packet from a device, with what the rules read of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DevicePacket {
    Connect {
        client_id: String,
        username: Option<String>,
        password: Option<String>,
        /// Seconds; 0 asks for none.
        keep_alive: u16,
    },
    Publish {
        topic: String,
        qos: Qos,
        pkid: u16,
        payload: Bytes,
    },
    Subscribe {
        pkid: u16,
        filters: Vec<String>,
    },
    Unsubscribe {
        pkid: u16,
    },
    PingReq,
    Disconnect,
    /// PUBACK, PUBREC, PUBREL or PUBCOMP: we publish at QoS 0, so they match nothing.
    Acknowledgement,
    /// CONNACK, SUBACK, UNSUBACK or PINGRESP: only a server sends those.
    ServerOnly,
}

/// The CONNACK return codes the gateway sends (MQTT 3.1.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnAckCode {
    Accepted,
    /// 2: identifier rejected.
    BadClientId,
    /// 4: bad user name or password.
    BadUserNamePassword,
}

/// A packet to write to the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    ConnAck(ConnAckCode),
    PubAck(u16),
    /// One entry per filter: granted (at QoS 0) or refused.
    SubAck {
        pkid: u16,
        granted: Vec<bool>,
    },
    UnsubAck(u16),
    PingResp,
}

/// Static settings of the device front end that the state machine needs.
#[derive(Debug, Clone)]
pub struct DeviceMqttSettings {
    /// How long a client may take from TCP accept to CONNECT.
    pub connect_timeout: Duration,
    /// Keep-alive applied when a client asks for 0 (none): a silent connection must
    /// still be found out eventually.
    pub default_keep_alive: Duration,
    /// The one topic devices publish to (`device-server`).
    pub uplink_topic: String,
}

/// Why a connection ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    ConnectTimeout,
    KeepAliveTimeout,
    AuthFailed(AuthError),
    ProtocolViolation(&'static str),
    ClientDisconnect,
}

impl CloseReason {
    /// Counter label.
    pub fn label(&self) -> &'static str {
        match self {
            CloseReason::ConnectTimeout => "connect_timeout",
            CloseReason::KeepAliveTimeout => "keep_alive_timeout",
            CloseReason::AuthFailed(_) => "auth_failed",
            CloseReason::ProtocolViolation(_) => "protocol_violation",
            CloseReason::ClientDisconnect => "client_disconnect",
        }
    }
}

/// Something the driver must do, in the order given.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Write this packet to the client.
    Send(Reply),
    /// The client proved who it is; register it (replacing an older connection)
    /// before the CONNACK that follows is written.
    Authenticated {
        identity: DeviceIdentity,
        keep_alive: Duration,
    },
    /// The device published this payload on the uplink topic.
    Uplink(Bytes),
    /// A packet was ignored; count it under this label.
    Dropped(&'static str),
    /// Close the connection (after writing any packets queued before this action).
    Close(CloseReason),
}

#[derive(Debug)]
enum State {
    AwaitingConnect {
        deadline: Instant,
    },
    Connected {
        own_topic: String,
        keep_alive: Duration,
        deadline: Instant,
    },
    Closed,
}

/// One device connection's protocol state.
#[derive(Debug)]
pub struct DeviceMqttConnection {
    state: State,
}

impl DeviceMqttConnection {
    /// A freshly accepted connection, waiting for CONNECT.
    pub fn new(settings: &DeviceMqttSettings, now: Instant) -> Self {
        DeviceMqttConnection {
            state: State::AwaitingConnect {
                deadline: after(now, settings.connect_timeout),
            },
        }
    }

    /// When [`handle_timeout`](Self::handle_timeout) must next be called, if ever.
    pub fn deadline(&self) -> Option<Instant> {
        match &self.state {
            State::AwaitingConnect { deadline } | State::Connected { deadline, .. } => {
                Some(*deadline)
            }
            State::Closed => None,
        }
    }

    /// Whether the connection has ended.
    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed)
    }

    /// Checks deadlines.
    pub fn handle_timeout(&mut self, now: Instant, out: &mut Vec<Action>) {
        let reason = match &self.state {
            State::AwaitingConnect { deadline } if now >= *deadline => CloseReason::ConnectTimeout,
            State::Connected { deadline, .. } if now >= *deadline => CloseReason::KeepAliveTimeout,
            _ => return,
        };
        self.close(reason, out);
    }

    /// A packet could not be framed or parsed: the connection cannot continue, since the
    /// byte stream has lost its framing.
    pub fn handle_malformed(&mut self, out: &mut Vec<Action>) {
        self.close(CloseReason::ProtocolViolation("malformed packet"), out);
    }

    /// Handles one complete packet from the client.
    pub fn handle_packet(
        &mut self,
        packet: DevicePacket,
        now: Instant,
        settings: &DeviceMqttSettings,
        verifier: &Verifier,
        out: &mut Vec<Action>,
    ) {
        match &mut self.state {
            State::Closed => {}
            State::AwaitingConnect { .. } => match packet {
                DevicePacket::Connect {
                    client_id,
                    username,
                    password,
                    keep_alive,
                } => match verifier.verify(&client_id, username.as_deref(), password.as_deref()) {
                    Ok(identity) => {
                        let keep_alive = match keep_alive {
                            0 => settings.default_keep_alive,
                            secs => Duration::from_secs(u64::from(secs)),
                        };
                        let own_topic = crate::topics::p2p(&identity.mac);
                        self.state = State::Connected {
                            own_topic,
                            keep_alive,
                            deadline: after(now, grace(keep_alive)),
                        };
                        out.push(Action::Authenticated {
                            identity,
                            keep_alive,
                        });
                        out.push(Action::Send(Reply::ConnAck(ConnAckCode::Accepted)));
                    }
                    Err(e) => {
                        let code = match e.connack_code() {
                            0x02 => ConnAckCode::BadClientId,
                            _ => ConnAckCode::BadUserNamePassword,
                        };
                        out.push(Action::Send(Reply::ConnAck(code)));
                        self.close(CloseReason::AuthFailed(e), out);
                    }
                },
                _ => self.close(
                    CloseReason::ProtocolViolation("first packet was not CONNECT"),
                    out,
                ),
            },
            State::Connected {
                own_topic,
                keep_alive,
                deadline,
            } => {
                // Any control packet from the client counts as keep-alive activity.
                *deadline = after(now, grace(*keep_alive));
                match packet {
                    DevicePacket::Publish {
                        topic,
                        qos,
                        pkid,
                        payload,
                    } => {
                        if qos == Qos::ExactlyOnce {
                            self.close(
                                CloseReason::ProtocolViolation("QoS 2 publish is not supported"),
                                out,
                            );
                            return;
                        }
                        if topic == settings.uplink_topic {
                            out.push(Action::Uplink(payload));
                        } else {
                            out.push(Action::Dropped("foreign_topic"));
                        }
                        if qos == Qos::AtLeastOnce {
                            out.push(Action::Send(Reply::PubAck(pkid)));
                        }
                    }
                    DevicePacket::Subscribe { pkid, filters } => {
                        let granted = filters.iter().map(|f| f == own_topic).collect();
                        out.push(Action::Send(Reply::SubAck { pkid, granted }));
                    }
                    DevicePacket::Unsubscribe { pkid } => {
                        out.push(Action::Send(Reply::UnsubAck(pkid)));
                    }
                    DevicePacket::PingReq => out.push(Action::Send(Reply::PingResp)),
                    DevicePacket::Disconnect => self.close(CloseReason::ClientDisconnect, out),
                    DevicePacket::Acknowledgement => out.push(Action::Dropped("unexpected_ack")),
                    DevicePacket::Connect { .. } => {
                        self.close(CloseReason::ProtocolViolation("second CONNECT"), out)
                    }
                    DevicePacket::ServerOnly => self.close(
                        CloseReason::ProtocolViolation("server-only packet from client"),
                        out,
                    ),
                }
            }
        }
    }

    fn close(&mut self, reason: CloseReason, out: &mut Vec<Action>) {
        if !self.is_closed() {
            self.state = State::Closed;
            out.push(Action::Close(reason));
        }
    }
}

/// The firmware expects a server to allow 1.5x its keep-alive before dropping it.
fn grace(keep_alive: Duration) -> Duration {
    keep_alive.saturating_add(keep_alive / 2)
}

/// `now + timeout`, or a deadline that never comes when the timeout is beyond what the
/// clock can hold. The timeouts come from config, which only checks that they are not
/// zero, and `Instant + Duration` panics on overflow: `mqtt.connect_timeout_secs =
/// 9223372036854775807` killed every connection task at accept
/// (`fuzz/regressions/config/`).
fn after(now: Instant, timeout: Duration) -> Instant {
    const NEVER: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
    now.checked_add(timeout)
        .or_else(|| now.checked_add(NEVER))
        .unwrap_or(now)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::credentials::{sign, username_for_ip};

    const KEY: &[u8] = b"k";
    const CLIENT_ID: &str = "GID_test@@@aa_bb_cc_dd_ee_ff@@@uuid-1";

    fn settings() -> DeviceMqttSettings {
        DeviceMqttSettings {
            connect_timeout: Duration::from_secs(10),
            default_keep_alive: Duration::from_secs(240),
            uplink_topic: "device-server".into(),
        }
    }

    fn verifier() -> Verifier {
        Verifier::Signed { key: KEY.to_vec() }
    }

    fn connect(keep_alive: u16, password: Option<String>) -> DevicePacket {
        let username = username_for_ip("192.0.2.1");
        DevicePacket::Connect {
            client_id: CLIENT_ID.into(),
            password: Some(password.unwrap_or_else(|| sign(KEY, CLIENT_ID, &username))),
            username: Some(username),
            keep_alive,
        }
    }

    fn publish(topic: &str, qos: Qos, pkid: u16, payload: &'static [u8]) -> DevicePacket {
        DevicePacket::Publish {
            topic: topic.into(),
            qos,
            pkid,
            payload: Bytes::from_static(payload),
        }
    }

    fn connected(now: Instant) -> DeviceMqttConnection {
        let mut c = DeviceMqttConnection::new(&settings(), now);
        let mut out = vec![];
        c.handle_packet(connect(60, None), now, &settings(), &verifier(), &mut out);
        assert!(matches!(out[0], Action::Authenticated { .. }));
        assert_eq!(out[1], Action::Send(Reply::ConnAck(ConnAckCode::Accepted)));
        c
    }

    fn feed(c: &mut DeviceMqttConnection, p: DevicePacket, now: Instant) -> Vec<Action> {
        let mut out = vec![];
        c.handle_packet(p, now, &settings(), &verifier(), &mut out);
        out
    }

    #[test]
    fn bad_password_gets_connack_4_then_close_and_no_registration() {
        let now = Instant::now();
        let mut c = DeviceMqttConnection::new(&settings(), now);
        let out = feed(&mut c, connect(60, Some("d3Jvbmc=".into())), now);
        assert_eq!(
            out[0],
            Action::Send(Reply::ConnAck(ConnAckCode::BadUserNamePassword))
        );
        assert_eq!(
            out[1],
            Action::Close(CloseReason::AuthFailed(AuthError::BadSignature))
        );
        assert_eq!(out.len(), 2);
    }

    #[test]
    fn connect_must_come_first_and_in_time() {
        let now = Instant::now();
        let mut c = DeviceMqttConnection::new(&settings(), now);
        assert_eq!(
            feed(&mut c, DevicePacket::PingReq, now),
            vec![Action::Close(CloseReason::ProtocolViolation(
                "first packet was not CONNECT"
            ))]
        );
        let mut c = DeviceMqttConnection::new(&settings(), now);
        let mut out = vec![];
        c.handle_timeout(now + Duration::from_secs(9), &mut out);
        assert!(out.is_empty());
        c.handle_timeout(now + Duration::from_secs(10), &mut out);
        assert_eq!(out, vec![Action::Close(CloseReason::ConnectTimeout)]);
    }

    #[test]
    fn keep_alive_is_enforced_at_one_and_a_half_times() {
        let now = Instant::now();
        let mut c = connected(now);
        assert_eq!(c.deadline(), Some(now + Duration::from_secs(90)));
        let later = now + Duration::from_secs(50);
        assert_eq!(
            feed(&mut c, DevicePacket::PingReq, later),
            vec![Action::Send(Reply::PingResp)]
        );
        assert_eq!(c.deadline(), Some(later + Duration::from_secs(90)));
        let mut out = vec![];
        c.handle_timeout(later + Duration::from_secs(90), &mut out);
        assert_eq!(out, vec![Action::Close(CloseReason::KeepAliveTimeout)]);
    }

    #[test]
    fn publishes_qos0_and_qos1_on_uplink_topic_only() {
        let now = Instant::now();
        let mut c = connected(now);
        let out = feed(
            &mut c,
            publish("device-server", Qos::AtMostOnce, 0, b"{}"),
            now,
        );
        assert_eq!(out, vec![Action::Uplink(Bytes::from_static(b"{}"))]);
        assert_eq!(
            feed(
                &mut c,
                publish("device-server", Qos::AtLeastOnce, 9, b"x"),
                now
            ),
            vec![
                Action::Uplink(Bytes::from_static(b"x")),
                Action::Send(Reply::PubAck(9))
            ]
        );
        let out = feed(
            &mut c,
            publish("devices/p2p/other", Qos::AtMostOnce, 0, b"x"),
            now,
        );
        assert_eq!(out, vec![Action::Dropped("foreign_topic")]);
        assert!(matches!(
            feed(
                &mut c,
                publish("device-server", Qos::ExactlyOnce, 1, b"x"),
                now
            )[..],
            [Action::Close(CloseReason::ProtocolViolation(_))]
        ));
    }

    #[test]
    fn subscribe_only_to_own_topic() {
        let now = Instant::now();
        let mut c = connected(now);
        let s = DevicePacket::Subscribe {
            pkid: 3,
            filters: vec![
                "devices/p2p/aa_bb_cc_dd_ee_ff".into(),
                "devices/p2p/11_22_33_44_55_66".into(),
                "#".into(),
            ],
        };
        assert_eq!(
            feed(&mut c, s, now),
            vec![Action::Send(Reply::SubAck {
                pkid: 3,
                granted: vec![true, false, false]
            })]
        );
        assert_eq!(
            feed(&mut c, DevicePacket::Unsubscribe { pkid: 4 }, now),
            vec![Action::Send(Reply::UnsubAck(4))]
        );
    }

    #[test]
    fn stray_acknowledgements_are_dropped_and_server_packets_close() {
        let now = Instant::now();
        let mut c = connected(now);
        assert_eq!(
            feed(&mut c, DevicePacket::Acknowledgement, now),
            vec![Action::Dropped("unexpected_ack")]
        );
        assert!(matches!(
            feed(&mut c, connect(60, None), now)[..],
            [Action::Close(CloseReason::ProtocolViolation(
                "second CONNECT"
            ))]
        ));
        let mut c = connected(now);
        assert!(matches!(
            feed(&mut c, DevicePacket::ServerOnly, now)[..],
            [Action::Close(CloseReason::ProtocolViolation(_))]
        ));
        assert!(c.is_closed());
        // A closed connection ignores everything after.
        assert!(feed(&mut c, DevicePacket::PingReq, now).is_empty());
        let mut c = connected(now);
        assert_eq!(
            feed(&mut c, DevicePacket::Disconnect, now),
            vec![Action::Close(CloseReason::ClientDisconnect)]
        );
    }

    #[test]
    fn timeouts_beyond_the_clock_never_expire_instead_of_panicking() {
        let huge = DeviceMqttSettings {
            connect_timeout: Duration::from_secs(i64::MAX as u64),
            default_keep_alive: Duration::MAX,
            ..settings()
        };
        let now = Instant::now();
        let mut c = DeviceMqttConnection::new(&huge, now);
        let year = Duration::from_secs(365 * 24 * 3600);
        assert!(c.deadline().unwrap() > now + year);
        let mut out = vec![];
        c.handle_packet(connect(0, None), now, &huge, &verifier(), &mut out);
        assert!(matches!(out[0], Action::Authenticated { .. }));
        assert!(c.deadline().unwrap() > now + year);
        c.handle_timeout(now + year, &mut out);
        assert!(!c.is_closed());
    }

    #[test]
    fn zero_keep_alive_uses_the_server_default() {
        let now = Instant::now();
        let mut c = DeviceMqttConnection::new(&settings(), now);
        let out = feed(&mut c, connect(0, None), now);
        assert!(
            matches!(&out[0], Action::Authenticated { keep_alive, .. } if *keep_alive == Duration::from_secs(240))
        );
        assert_eq!(c.deadline(), Some(now + Duration::from_secs(360)));
    }
}
