//! The broker listener's rules, without sockets: what a client's first bytes say, who a
//! user is, what a client id becomes in the router, and what happens to each packet of a
//! connected client.
//!
//! Kept apart from [`super::clients`] (the accept loop and the per-client pump) so every
//! decision can be tested with packets in and packets out, as
//! [`crate::protocol::device_mqtt`] does for device connections.

use std::collections::HashSet;
use std::panic::{AssertUnwindSafe, catch_unwind};

use bytes::BytesMut;
use rumqttd::protocol::v4::V4;
use rumqttd::protocol::v5::V5;
use rumqttd::protocol::{
    self as mqtt, ConnectReturnCode, Disconnect, DisconnectProperties, DisconnectReasonCode,
    LastWill, LastWillProperties, Packet, PingResp, Protocol, PubAck, PubAckReason, PubComp,
    PubCompReason, PubRec, PubRecReason, Publish, PublishProperties, SubAck, SubscribeReasonCode,
    UnsubAck, UnsubAckReason,
};
use sha2::{Digest, Sha256};
use subtle::{ConditionallySelectable, ConstantTimeEq};

use super::acl::{self, Refusal};
use crate::config::{BrokerRole, BrokerUser};

/// A will as the publish the router will get.
pub(super) fn will_publish(will: LastWill, props: Option<LastWillProperties>) -> Packet {
    let props = props.map(|p| PublishProperties {
        payload_format_indicator: p.payload_format_indicator,
        message_expiry_interval: p.message_expiry_interval,
        response_topic: p.response_topic,
        correlation_data: p.correlation_data,
        user_properties: p.user_properties,
        content_type: p.content_type,
        ..Default::default()
    });
    // Local links publish at QoS 0; subscribers get it at their subscription's QoS.
    Packet::Publish(Publish::new(will.topic, will.message, will.retain), props)
}

/// What the first bytes of a connection say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sniff {
    /// Not enough bytes yet.
    Incomplete,
    /// An MQTT CONNECT with this protocol level (3 = 3.1 "MQIsdp", 4 = 3.1.1, 5 = 5.0).
    Level(u8),
    /// Not an MQTT CONNECT.
    NotConnect,
}

/// Reads the protocol level of the CONNECT at the start of `buf`.
pub fn sniff_connect(buf: &[u8]) -> Sniff {
    let Some(&first) = buf.first() else {
        return Sniff::Incomplete;
    };
    if first != 0x10 {
        return Sniff::NotConnect;
    }
    // Remaining length: 1 to 4 bytes, 7 bits each.
    let mut pos = 1;
    loop {
        let Some(&b) = buf.get(pos) else {
            return Sniff::Incomplete;
        };
        pos += 1;
        if b & 0x80 == 0 {
            break;
        }
        if pos == 5 {
            return Sniff::NotConnect;
        }
    }
    let Some(name_len) = buf.get(pos..pos + 2) else {
        return Sniff::Incomplete;
    };
    let name_len = usize::from(u16::from_be_bytes([name_len[0], name_len[1]]));
    if name_len != 4 && name_len != 6 {
        return Sniff::NotConnect;
    }
    let name_start = pos + 2;
    let Some(name) = buf.get(name_start..name_start + name_len) else {
        return Sniff::Incomplete;
    };
    if name != b"MQTT" && name != b"MQIsdp" {
        return Sniff::NotConnect;
    }
    match buf.get(name_start + name_len) {
        Some(&level) => Sniff::Level(level),
        None => Sniff::Incomplete,
    }
}

/// A configured user, hashed so comparisons take the same time whatever the lengths.
pub(super) struct Credential {
    username: [u8; 32],
    password: [u8; 32],
    role: BrokerRole,
}

impl Credential {
    pub(super) fn new(user: &BrokerUser) -> Credential {
        Credential {
            username: Sha256::digest(user.username.as_bytes()).into(),
            password: Sha256::digest(user.password.as_bytes()).into(),
            role: user.role,
        }
    }
}

/// The role of the user with this username and password, if any. Every user is compared,
/// in constant time, so timing reveals neither which usernames exist nor how much of a
/// password matched.
pub(super) fn authenticate(
    users: &[Credential],
    username: &str,
    password: &str,
) -> Option<BrokerRole> {
    let name: [u8; 32] = Sha256::digest(username.as_bytes()).into();
    let pass: [u8; 32] = Sha256::digest(password.as_bytes()).into();
    let mut found = subtle::Choice::from(0);
    let mut index = 0u32;
    for (i, user) in users.iter().enumerate() {
        let hit = user.username.ct_eq(&name) & user.password.ct_eq(&pass);
        index.conditional_assign(&(i as u32), hit & !found);
        found |= hit;
    }
    bool::from(found).then(|| users[index as usize].role)
}

/// The client id a client goes by, whether it was assigned, and the id its link has in the
/// router (`<role>:<id>`, assigned ones `<role>=<n>`, so neither can collide with the
/// gateway's link, another role's session or each other). `Err` for ids the router would
/// refuse (`+ $ # /`) and for an empty id on a persistent session.
pub(super) fn client_identity(
    role: BrokerRole,
    client_id: &str,
    clean_session: bool,
    next: impl FnOnce() -> u64,
) -> Result<(String, bool, String), ()> {
    let role = acl::role_name(role);
    if client_id.is_empty() {
        if !clean_session {
            return Err(());
        }
        let n = next();
        return Ok((format!("broker-{n}"), true, format!("{role}={n}")));
    }
    if client_id.contains(['+', '$', '#', '/']) {
        return Err(());
    }
    Ok((client_id.to_owned(), false, format!("{role}:{client_id}")))
}

/// Why a CONNECT is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ConnectRefusal {
    NoCredentials,
    BadCredentials,
    AuthMethod,
    ClientId,
    WillTopic,
    Unavailable,
}

impl ConnectRefusal {
    /// The CONNACK code for this refusal in MQTT 3.1.1 or 5.
    pub(super) fn code(self, v5: bool) -> ConnectReturnCode {
        use ConnectReturnCode as C;
        match (self, v5) {
            (ConnectRefusal::NoCredentials | ConnectRefusal::WillTopic, _) => C::NotAuthorized,
            (ConnectRefusal::BadCredentials, _) => C::BadUserNamePassword,
            (ConnectRefusal::AuthMethod, true) => C::BadAuthenticationMethod,
            (ConnectRefusal::AuthMethod, false) => C::NotAuthorized,
            (ConnectRefusal::ClientId, _) => C::ClientIdentifierNotValid,
            (ConnectRefusal::Unavailable, true) => C::ServerUnavailable,
            (ConnectRefusal::Unavailable, false) => C::ServiceUnavailable,
        }
    }
}

/// A client broke the protocol: the connection is closed (and counted).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    #[error("malformed packet: {0}")]
    Malformed(String),
    #[error("packet larger than the listener's max_payload_size")]
    TooLarge,
    #[error("packet type {0} may not be sent by a client")]
    ForbiddenPacket(u8),
    #[error("second CONNECT")]
    SecondConnect,
    #[error("topic alias used though none was offered")]
    TopicAlias,
}

impl Violation {
    pub(super) fn reason_code(&self) -> DisconnectReasonCode {
        match self {
            Violation::Malformed(_) => DisconnectReasonCode::MalformedPacket,
            Violation::TooLarge => DisconnectReasonCode::PacketTooLarge,
            Violation::TopicAlias => DisconnectReasonCode::TopicAliasInvalid,
            Violation::ForbiddenPacket(_) | Violation::SecondConnect => {
                DisconnectReasonCode::ProtocolError
            }
        }
    }
}

/// rumqttd's two codecs behind one type.
#[derive(Debug, Clone)]
pub(super) enum Codec {
    V4(V4),
    V5(V5),
}

impl Codec {
    pub(super) fn is_v5(&self) -> bool {
        matches!(self, Codec::V5(_))
    }

    pub(super) fn write(&self, packet: Packet, out: &mut BytesMut) -> Result<usize, mqtt::Error> {
        match self {
            // The 3.1.1 encoder panics on anything carrying properties.
            Codec::V4(c) => c.write(without_properties(packet), out),
            Codec::V5(c) => c.write(packet, out),
        }
    }
}

/// Decodes the next whole packet from `buf`, or `None` if more bytes are needed. Never
/// panics: packet types only servers send are refused before rumqttd's decoder sees them
/// (its 5.0 decoder panics on some), and the decoder runs under `catch_unwind`.
pub(super) fn decode(
    codec: &mut Codec,
    buf: &mut BytesMut,
    max: usize,
) -> Result<Option<Packet>, Violation> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    let kind = first >> 4;
    // CONNECT, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP, SUBSCRIBE, UNSUBSCRIBE, PINGREQ,
    // DISCONNECT. (AUTH, 15, is not supported.)
    if !matches!(kind, 1 | 3..=8 | 10 | 12 | 14) {
        return Err(Violation::ForbiddenPacket(kind));
    }
    let result = catch_unwind(AssertUnwindSafe(|| match codec {
        Codec::V4(c) => c.read_mut(buf, max),
        Codec::V5(c) => c.read_mut(buf, max),
    }));
    match result {
        Ok(Ok(packet)) => Ok(Some(packet)),
        Ok(Err(mqtt::Error::InsufficientBytes(n))) => {
            buf.reserve(n);
            Ok(None)
        }
        Ok(Err(mqtt::Error::PayloadSizeLimitExceeded(_))) => Err(Violation::TooLarge),
        Ok(Err(e)) => Err(Violation::Malformed(e.to_string())),
        Err(_) => Err(Violation::Malformed("decoder panicked".into())),
    }
}

/// The DISCONNECT an MQTT 5 client is sent when the server ends its connection, with a
/// reason string. The string is not decoration: rumqttd 0.20's encoder writes a
/// DISCONNECT that has a reason code and no properties as remaining length 1 followed by
/// two bytes, and one with an empty property set as `E0 00` (the code lost), so clients
/// read a broken stream or a normal disconnection. With a property it writes the packet
/// right.
pub(super) fn disconnect_v5(reason_code: DisconnectReasonCode, why: &str) -> Packet {
    let why = if why.is_empty() { "disconnected" } else { why };
    Packet::Disconnect(
        Disconnect { reason_code },
        Some(DisconnectProperties {
            session_expiry_interval: None,
            reason_string: Some(why.to_owned()),
            user_properties: Vec::new(),
            server_reference: None,
        }),
    )
}

/// The same packet without MQTT 5 properties, for 3.1.1 clients.
pub(super) fn without_properties(packet: Packet) -> Packet {
    match packet {
        Packet::Connect(c, _, w, _, l) => Packet::Connect(c, None, w, None, l),
        Packet::ConnAck(p, _) => Packet::ConnAck(p, None),
        Packet::Publish(p, _) => Packet::Publish(p, None),
        Packet::PubAck(p, _) => Packet::PubAck(p, None),
        Packet::PubRec(p, _) => Packet::PubRec(p, None),
        Packet::PubRel(p, _) => Packet::PubRel(p, None),
        Packet::PubComp(p, _) => Packet::PubComp(p, None),
        Packet::Subscribe(p, _) => Packet::Subscribe(p, None),
        Packet::SubAck(p, _) => Packet::SubAck(p, None),
        Packet::Unsubscribe(p, _) => Packet::Unsubscribe(p, None),
        Packet::UnsubAck(p, _) => Packet::UnsubAck(p, None),
        Packet::Disconnect(p, _) => Packet::Disconnect(p, None),
        other => other,
    }
}

/// QoS and packet id of a publish (rumqttd keeps both crate-private; its wire-independent
/// serialisation carries them in the first three bytes).
pub(super) fn qos_and_pkid(publish: &Publish) -> (u8, u16) {
    let mut head = publish.clone();
    head.payload = Default::default();
    let bytes = head.serialize();
    (
        (bytes[0] >> 1) & 0b11,
        u16::from_be_bytes([bytes[1], bytes[2]]),
    )
}

/// What a client may do, and the QoS 2 flows answered here.
#[derive(Debug)]
pub(super) struct ClientState {
    role: BrokerRole,
    v5: bool,
    /// Packet ids of refused QoS 2 publishes whose PUBREL is answered here (at most 65,536).
    refused_qos2: HashSet<u16>,
}

impl ClientState {
    pub(super) fn new(role: BrokerRole, v5: bool) -> ClientState {
        ClientState {
            role,
            v5,
            refused_qos2: HashSet::new(),
        }
    }
}

/// Which kind of request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refused {
    Publish,
    Subscribe,
}

/// What to do with one packet from a connected client.
#[derive(Debug)]
pub(super) enum Outcome {
    /// Hand it to the router.
    Forward(Packet),
    /// Answer it here.
    Reply(Packet),
    /// Hand the UNSUBSCRIBE to the router and answer it here.
    Unsubscribe(Packet, UnsubAck),
    /// Refused by the ACL; send `reply` (if any) and count and log it.
    Refused {
        reply: Option<Packet>,
        kind: Refused,
        subject: String,
        refusal: Refusal,
    },
    /// The client said goodbye.
    Disconnect { publish_will: bool },
    /// Close the connection.
    Close(Violation),
}

/// Decides what happens to one packet from a connected client.
pub(super) fn on_client_packet(state: &mut ClientState, packet: Packet) -> Outcome {
    match packet {
        Packet::Publish(publish, props) => {
            if props.as_ref().is_some_and(|p| p.topic_alias.is_some()) {
                return Outcome::Close(Violation::TopicAlias);
            }
            let topic = std::str::from_utf8(&publish.topic);
            let verdict = match topic {
                Ok(topic) => acl::may_publish(state.role, topic),
                Err(_) => Err(Refusal::InvalidTopic),
            };
            match verdict {
                Ok(()) => {
                    if !state.refused_qos2.is_empty() {
                        // The client reused a refused QoS 2 id: that flow is over.
                        let (_, pkid) = qos_and_pkid(&publish);
                        state.refused_qos2.remove(&pkid);
                    }
                    Outcome::Forward(Packet::Publish(publish, props))
                }
                Err(refusal) => {
                    let (qos, pkid) = qos_and_pkid(&publish);
                    let reply = match qos {
                        1 => Some(Packet::PubAck(
                            PubAck {
                                pkid,
                                reason: if state.v5 {
                                    PubAckReason::NotAuthorized
                                } else {
                                    PubAckReason::Success
                                },
                            },
                            None,
                        )),
                        2 => {
                            state.refused_qos2.insert(pkid);
                            Some(Packet::PubRec(
                                PubRec {
                                    pkid,
                                    reason: if state.v5 {
                                        PubRecReason::NotAuthorized
                                    } else {
                                        PubRecReason::Success
                                    },
                                },
                                None,
                            ))
                        }
                        _ => None,
                    };
                    Outcome::Refused {
                        reply,
                        kind: Refused::Publish,
                        subject: String::from_utf8_lossy(&publish.topic).into_owned(),
                        refusal,
                    }
                }
            }
        }
        Packet::PubRel(pubrel, _) => {
            if state.refused_qos2.remove(&pubrel.pkid) {
                let comp = PubComp {
                    pkid: pubrel.pkid,
                    reason: PubCompReason::Success,
                };
                Outcome::Reply(Packet::PubComp(comp, None))
            } else {
                // rumqttd's router only takes a PUBREL without properties.
                Outcome::Forward(Packet::PubRel(pubrel, None))
            }
        }
        Packet::Subscribe(subscribe, props) => {
            let refused = subscribe.filters.iter().find_map(|f| {
                acl::may_subscribe(state.role, &f.path)
                    .err()
                    .map(|r| (f, r))
            });
            match refused {
                None => Outcome::Forward(Packet::Subscribe(subscribe, props)),
                Some((filter, refusal)) => {
                    let code = if state.v5 {
                        SubscribeReasonCode::NotAuthorized
                    } else {
                        SubscribeReasonCode::Failure
                    };
                    let ack = SubAck {
                        pkid: subscribe.pkid,
                        return_codes: vec![code; subscribe.filters.len()],
                    };
                    Outcome::Refused {
                        reply: Some(Packet::SubAck(ack, None)),
                        kind: Refused::Subscribe,
                        subject: filter.path.clone(),
                        refusal,
                    }
                }
            }
        }
        Packet::Unsubscribe(unsubscribe, props) => {
            let ack = UnsubAck {
                pkid: unsubscribe.pkid,
                reasons: vec![UnsubAckReason::Success; unsubscribe.filters.len()],
            };
            Outcome::Unsubscribe(Packet::Unsubscribe(unsubscribe, props), ack)
        }
        Packet::PubAck(..) | Packet::PubRec(..) | Packet::PubComp(..) => Outcome::Forward(packet),
        Packet::PingReq(_) => Outcome::Reply(Packet::PingResp(PingResp)),
        Packet::Disconnect(d, _) => Outcome::Disconnect {
            publish_will: state.v5
                && d.reason_code == DisconnectReasonCode::DisconnectWithWillMessage,
        },
        Packet::Connect(..) => Outcome::Close(Violation::SecondConnect),
        Packet::ConnAck(..) => Outcome::Close(Violation::ForbiddenPacket(2)),
        Packet::SubAck(..) => Outcome::Close(Violation::ForbiddenPacket(9)),
        Packet::UnsubAck(..) => Outcome::Close(Violation::ForbiddenPacket(11)),
        Packet::PingResp(_) => Outcome::Close(Violation::ForbiddenPacket(13)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use rumqttd::protocol::ConnAck;
    use rumqttd::protocol::{Filter, PubRel, PubRelReason, QoS, RetainForwardRule, Subscribe};

    fn connect_bytes(name: &[u8], level: u8) -> Vec<u8> {
        let mut v = vec![0x10, 0];
        v.extend_from_slice(&(name.len() as u16).to_be_bytes());
        v.extend_from_slice(name);
        v.push(level);
        v.extend_from_slice(&[0x02, 0, 60, 0, 0]);
        v[1] = (v.len() - 2) as u8;
        v
    }

    #[test]
    fn sniffs_protocol_levels() {
        let v4 = connect_bytes(b"MQTT", 4);
        assert_eq!(sniff_connect(&v4), Sniff::Level(4));
        assert_eq!(sniff_connect(&connect_bytes(b"MQTT", 5)), Sniff::Level(5));
        assert_eq!(sniff_connect(&connect_bytes(b"MQIsdp", 3)), Sniff::Level(3));
        for n in 0..9 {
            assert_eq!(sniff_connect(&v4[..n]), Sniff::Incomplete, "{n} bytes");
        }
        assert_eq!(sniff_connect(b"GET / HTTP/1.1"), Sniff::NotConnect);
        assert_eq!(sniff_connect(&[0x30, 0]), Sniff::NotConnect);
        assert_eq!(sniff_connect(&connect_bytes(b"MQTX", 4)), Sniff::NotConnect);
        assert_eq!(sniff_connect(&connect_bytes(b"MQ", 4)), Sniff::NotConnect);
        // Remaining length longer than four bytes.
        assert_eq!(
            sniff_connect(&[0x10, 0xff, 0xff, 0xff, 0xff, 0x01]),
            Sniff::NotConnect
        );
        // Multi-byte remaining length.
        let mut long = vec![0x10, 0x80, 0x01, 0, 4];
        long.extend_from_slice(b"MQTT");
        long.push(5);
        assert_eq!(sniff_connect(&long), Sniff::Level(5));
    }

    fn creds() -> Vec<Credential> {
        [
            ("admin", "pw", BrokerRole::Admin),
            ("watch", "pw2", BrokerRole::Observer),
        ]
        .iter()
        .map(|(u, p, r)| {
            Credential::new(&BrokerUser {
                username: (*u).into(),
                password: (*p).into(),
                role: *r,
            })
        })
        .collect()
    }

    #[test]
    fn authentication_needs_both_fields_and_returns_the_role() {
        let users = creds();
        assert_eq!(authenticate(&users, "admin", "pw"), Some(BrokerRole::Admin));
        assert_eq!(
            authenticate(&users, "watch", "pw2"),
            Some(BrokerRole::Observer)
        );
        assert_eq!(authenticate(&users, "admin", "PW"), None);
        assert_eq!(authenticate(&users, "admin", "pw2"), None);
        assert_eq!(authenticate(&users, "other", "pw"), None);
        assert_eq!(authenticate(&users, "", ""), None);
        assert_eq!(authenticate(&[], "", ""), None);
    }

    #[test]
    fn client_ids_are_namespaced_by_role() {
        let next = || 7;
        assert_eq!(
            client_identity(BrokerRole::Admin, "tool", true, next),
            Ok(("tool".into(), false, "admin:tool".into()))
        );
        assert_eq!(
            client_identity(BrokerRole::Observer, "tool", false, next),
            Ok(("tool".into(), false, "observer:tool".into()))
        );
        assert_eq!(
            client_identity(BrokerRole::Admin, "", true, next),
            Ok(("broker-7".into(), true, "admin=7".into()))
        );
        assert_eq!(client_identity(BrokerRole::Admin, "", false, next), Err(()));
        for bad in ["a/b", "a+", "#", "$x"] {
            assert_eq!(client_identity(BrokerRole::Admin, bad, true, next), Err(()));
        }
        // The gateway's own link id can never be produced.
        assert_ne!(
            client_identity(BrokerRole::Admin, "xiaozhi-gateway", true, next)
                .unwrap()
                .2,
            "xiaozhi-gateway"
        );
    }

    #[test]
    fn connack_codes_exist_in_each_version() {
        let all = [
            ConnectRefusal::NoCredentials,
            ConnectRefusal::BadCredentials,
            ConnectRefusal::AuthMethod,
            ConnectRefusal::ClientId,
            ConnectRefusal::WillTopic,
            ConnectRefusal::Unavailable,
        ];
        for r in all {
            for (codec, v5) in [(Codec::V4(V4), false), (Codec::V5(V5), true)] {
                let ack = ConnAck {
                    session_present: false,
                    code: r.code(v5),
                };
                let mut out = BytesMut::new();
                // The encoders panic on codes their version lacks.
                let ok = catch_unwind(AssertUnwindSafe(|| {
                    codec.write(Packet::ConnAck(ack, None), &mut out)
                }));
                assert!(matches!(ok, Ok(Ok(_))), "{r:?} v5={v5}");
            }
        }
        assert_eq!(
            ConnectRefusal::BadCredentials.code(false),
            ConnectReturnCode::BadUserNamePassword
        );
        assert_eq!(
            ConnectRefusal::NoCredentials.code(true),
            ConnectReturnCode::NotAuthorized
        );
    }

    /// A publish with QoS and packet id, built through the public wire-independent form.
    fn publish(topic: &str, qos: u8, pkid: u16) -> Publish {
        let mut raw = vec![0x30 | (qos << 1)];
        raw.extend_from_slice(&pkid.to_be_bytes());
        raw.extend_from_slice(&(topic.len() as u16).to_be_bytes());
        raw.extend_from_slice(topic.as_bytes());
        raw.extend_from_slice(b"payload");
        Publish::deserialize(Bytes::from(raw))
    }

    #[test]
    fn qos_and_pkid_read_back() {
        assert_eq!(qos_and_pkid(&publish("a", 0, 0)), (0, 0));
        assert_eq!(qos_and_pkid(&publish("a", 1, 513)), (1, 513));
        assert_eq!(qos_and_pkid(&publish("a", 2, 65535)), (2, 65535));
    }

    const CMD: &str = "xiaozhi/admin/commands/aa_bb_cc_dd_ee_ff";

    #[test]
    fn allowed_publishes_are_forwarded_unchanged() {
        let mut s = ClientState::new(BrokerRole::Admin, false);
        let p = publish(CMD, 1, 5);
        match on_client_packet(&mut s, Packet::Publish(p.clone(), None)) {
            Outcome::Forward(Packet::Publish(q, None)) => assert_eq!(q, p),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn refused_publishes_are_acked_by_qos() {
        for v5 in [false, true] {
            let mut s = ClientState::new(BrokerRole::Observer, v5);
            let out = on_client_packet(&mut s, Packet::Publish(publish(CMD, 0, 0), None));
            assert!(
                matches!(
                    out,
                    Outcome::Refused {
                        reply: None,
                        kind: Refused::Publish,
                        refusal: Refusal::ReadOnly,
                        ..
                    }
                ),
                "{out:?}"
            );

            let out = on_client_packet(&mut s, Packet::Publish(publish(CMD, 1, 9), None));
            let Outcome::Refused {
                reply: Some(Packet::PubAck(ack, None)),
                subject,
                ..
            } = out
            else {
                panic!("{out:?}")
            };
            assert_eq!(subject, CMD);
            assert_eq!(ack.pkid, 9);
            let want = if v5 {
                PubAckReason::NotAuthorized
            } else {
                PubAckReason::Success
            };
            assert_eq!(ack.reason, want);

            let out = on_client_packet(&mut s, Packet::Publish(publish(CMD, 2, 10), None));
            let Outcome::Refused {
                reply: Some(Packet::PubRec(rec, None)),
                ..
            } = out
            else {
                panic!("{out:?}")
            };
            assert_eq!(rec.pkid, 10);
            let want = if v5 {
                PubRecReason::NotAuthorized
            } else {
                PubRecReason::Success
            };
            assert_eq!(rec.reason, want);

            // Its PUBREL is completed here and never reaches the router...
            let rel = PubRel {
                pkid: 10,
                reason: PubRelReason::Success,
            };
            let out = on_client_packet(&mut s, Packet::PubRel(rel.clone(), None));
            assert!(
                matches!(
                    out,
                    Outcome::Reply(Packet::PubComp(PubComp { pkid: 10, .. }, None))
                ),
                "{out:?}"
            );
            // ...once: another PUBREL with that id belongs to the router.
            let out = on_client_packet(&mut s, Packet::PubRel(rel, None));
            assert!(
                matches!(
                    out,
                    Outcome::Forward(Packet::PubRel(PubRel { pkid: 10, .. }, None))
                ),
                "{out:?}"
            );
        }
    }

    #[test]
    fn a_reused_packet_id_ends_the_refused_flow() {
        let mut s = ClientState::new(BrokerRole::Admin, true);
        let _ = on_client_packet(
            &mut s,
            Packet::Publish(publish("xiaozhi/devices/x", 2, 3), None),
        );
        assert!(s.refused_qos2.contains(&3));
        let out = on_client_packet(&mut s, Packet::Publish(publish(CMD, 2, 3), None));
        assert!(matches!(out, Outcome::Forward(_)));
        assert!(s.refused_qos2.is_empty());
        let rel = PubRel {
            pkid: 3,
            reason: PubRelReason::Success,
        };
        assert!(matches!(
            on_client_packet(&mut s, Packet::PubRel(rel, None)),
            Outcome::Forward(_)
        ));
    }

    #[test]
    fn topic_aliases_close_the_connection() {
        let mut s = ClientState::new(BrokerRole::Admin, true);
        let props = PublishProperties {
            topic_alias: Some(1),
            ..Default::default()
        };
        let out = on_client_packet(&mut s, Packet::Publish(publish(CMD, 0, 0), Some(props)));
        assert!(matches!(out, Outcome::Close(Violation::TopicAlias)));
    }

    fn subscribe(filters: &[&str]) -> Packet {
        Packet::Subscribe(
            Subscribe {
                pkid: 4,
                filters: filters
                    .iter()
                    .map(|f| Filter {
                        path: (*f).into(),
                        qos: QoS::AtLeastOnce,
                        nolocal: false,
                        preserve_retain: false,
                        retain_forward_rule: RetainForwardRule::OnEverySubscribe,
                    })
                    .collect(),
            },
            None,
        )
    }

    #[test]
    fn a_subscribe_with_any_refused_filter_is_answered_here() {
        for (v5, code) in [
            (false, SubscribeReasonCode::Failure),
            (true, SubscribeReasonCode::NotAuthorized),
        ] {
            let mut s = ClientState::new(BrokerRole::Observer, v5);
            let out = on_client_packet(&mut s, subscribe(&["xiaozhi/devices/#", "#"]));
            let Outcome::Refused {
                reply: Some(Packet::SubAck(ack, None)),
                kind,
                subject,
                refusal,
            } = out
            else {
                panic!("{out:?}")
            };
            assert_eq!(kind, Refused::Subscribe);
            assert_eq!(subject, "#");
            assert_eq!(refusal, Refusal::OutsideObserverScope);
            assert_eq!(ack.pkid, 4);
            assert_eq!(ack.return_codes, vec![code; 2]);

            // Allowed subscriptions go to the router as the client asked (retain options
            // included).
            let sub = subscribe(&["xiaozhi/devices/#"]);
            match on_client_packet(&mut s, sub.clone()) {
                Outcome::Forward(p) => assert_eq!(p, sub),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn housekeeping_packets() {
        let mut s = ClientState::new(BrokerRole::Observer, false);
        assert!(matches!(
            on_client_packet(&mut s, Packet::PingReq(mqtt::PingReq)),
            Outcome::Reply(Packet::PingResp(_))
        ));
        let unsub = Packet::Unsubscribe(
            mqtt::Unsubscribe {
                pkid: 8,
                filters: vec!["a".into(), "b".into()],
            },
            None,
        );
        let Outcome::Unsubscribe(Packet::Unsubscribe(..), ack) = on_client_packet(&mut s, unsub)
        else {
            panic!()
        };
        assert_eq!((ack.pkid, ack.reasons.len()), (8, 2));
        let bye = |code| Packet::Disconnect(Disconnect { reason_code: code }, None);
        assert!(matches!(
            on_client_packet(&mut s, bye(DisconnectReasonCode::DisconnectWithWillMessage)),
            Outcome::Disconnect {
                publish_will: false
            }
        ));
        let mut s5 = ClientState::new(BrokerRole::Observer, true);
        assert!(matches!(
            on_client_packet(
                &mut s5,
                bye(DisconnectReasonCode::DisconnectWithWillMessage)
            ),
            Outcome::Disconnect { publish_will: true }
        ));
        assert!(matches!(
            on_client_packet(&mut s5, bye(DisconnectReasonCode::NormalDisconnection)),
            Outcome::Disconnect {
                publish_will: false
            }
        ));
        let ack = ConnAck {
            session_present: false,
            code: ConnectReturnCode::Success,
        };
        assert!(matches!(
            on_client_packet(&mut s5, Packet::ConnAck(ack, None)),
            Outcome::Close(_)
        ));
    }

    #[test]
    fn decoding_refuses_server_packets_and_oversize() {
        for codec in [Codec::V4(V4), Codec::V5(V5)] {
            for kind in [0u8, 2, 9, 11, 13, 15] {
                let mut c = codec.clone();
                let mut buf = BytesMut::from(&[kind << 4, 2, 0, 0][..]);
                assert_eq!(
                    decode(&mut c, &mut buf, 1024),
                    Err(Violation::ForbiddenPacket(kind))
                );
            }
            let mut c = codec.clone();
            let mut buf = BytesMut::from(&[0x30, 0xff, 0x7f][..]);
            assert_eq!(decode(&mut c, &mut buf, 1024), Err(Violation::TooLarge));
            let mut c = codec.clone();
            let mut buf = BytesMut::from(&[0x30, 10, 0][..]);
            assert_eq!(decode(&mut c, &mut buf, 1024), Ok(None), "needs more bytes");
        }
    }

    proptest::proptest! {
        /// No client bytes make the decoders panic through `decode`.
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..64)) {
            for codec in [Codec::V4(V4), Codec::V5(V5)] {
                let mut c = codec;
                let mut buf = BytesMut::from(&bytes[..]);
                for _ in 0..8 {
                    match decode(&mut c, &mut buf, 1024) {
                        Ok(Some(_)) => continue,
                        _ => break,
                    }
                }
            }
            let _ = sniff_connect(&bytes);
        }

        /// Well-framed packets of every type a client may send, with random flags and
        /// bodies: the decoders' inner parsers see them all.
        #[test]
        fn decode_never_panics_on_framed_packets(
            kind in proptest::sample::select(vec![1u8, 3, 4, 5, 6, 7, 8, 10, 12, 14]),
            flags in 0u8..16,
            body in proptest::collection::vec(proptest::num::u8::ANY, 0..100),
        ) {
            for codec in [Codec::V4(V4), Codec::V5(V5)] {
                let mut c = codec;
                let mut buf = BytesMut::new();
                buf.extend_from_slice(&[(kind << 4) | flags, body.len() as u8]);
                buf.extend_from_slice(&body);
                let _ = decode(&mut c, &mut buf, 1024);
            }
        }
    }

    #[test]
    fn a_v5_disconnect_carries_its_reason_code_on_the_wire() {
        for code in [
            DisconnectReasonCode::ServerShuttingDown,
            DisconnectReasonCode::KeepAliveTimeout,
            DisconnectReasonCode::SessionTakenOver,
            DisconnectReasonCode::ProtocolError,
        ] {
            let mut out = BytesMut::new();
            Codec::V5(V5)
                .write(disconnect_v5(code, "why"), &mut out)
                .unwrap();
            // Fixed header, remaining length, reason code, properties.
            assert_eq!(out[0], 0xE0);
            assert_eq!(usize::from(out[1]), out.len() - 2, "{out:?}");
            let mut codec = Codec::V5(V5);
            let mut buf = out.clone();
            // Read back as a client would (the server-side decoder refuses DISCONNECT
            // from a server only by packet type, which this bypasses).
            let back = match &mut codec {
                Codec::V5(c) => c.read_mut(&mut buf, 1024).unwrap(),
                Codec::V4(_) => unreachable!(),
            };
            assert!(buf.is_empty(), "the whole packet is read");
            match back {
                Packet::Disconnect(d, _) => assert_eq!(d.reason_code, code),
                other => panic!("{other:?}"),
            }
        }
    }
}
