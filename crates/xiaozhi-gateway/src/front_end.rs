//! The device-facing MQTT 3.1.1 listener: one task per TCP (or TLS) connection, each a
//! thin driver around [`DeviceMqttConnection`].
//!
//! A connection task reads bytes into a buffer it owns, frames packets with
//! `rumqttc::mqttbytes` (check-then-parse: an incomplete packet is a normal state), feeds
//! them to the state machine and performs its actions. After CONNECT it registers the
//! device, so server messages (from sessions or from bus clients on `devices/p2p/<mac_>`)
//! reach it through its bounded outbound queue. Device publishes go to the bus on
//! `xiaozhi/devices/<mac_>/up` and to the session manager; everything delivered to the
//! device is mirrored on `xiaozhi/devices/<mac_>/down`.
//!
//! A malformed packet ends that connection only. Connections are capped by a semaphore
//! (`mqtt.max_connections`) and per source address ([`crate::limits::admission`]: open
//! connections and CONNECT rate), both checked in the accept loop so a storm costs a
//! `close()` per socket and nothing more. A device's publishes pass a token bucket
//! (`mqtt.message_rate`); the excess is dropped and counted, and each offender is
//! logged once. TLS handshakes run in the connection task, with a timeout, so a silent
//! client never delays the accept loop; the certificate comes from a
//! [`crate::tls::ReloadingCert`], so new handshakes pick up a renewed one.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4::{
    ConnAck, ConnectReturnCode, Packet, PubAck, Publish, SubAck, SubscribeReasonCode, UnsubAck,
};
use rumqttc::mqttbytes::{Error as FrameError, QoS};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::broker::bus::Bus;
use crate::broker::registry::{DeviceHandle, DeviceRegistry, Outbound};
use crate::lifecycle::Lifecycle;
use crate::limits::TokenBucket;
use crate::limits::admission::{Refusal, SharedAdmission};
use crate::metrics::Metrics;
use crate::protocol::control;
use crate::protocol::credentials::{AuthError, Verifier};
use crate::protocol::device_mqtt::{
    Action, CloseReason, ConnAckCode, DeviceMqttConnection, DeviceMqttSettings, DevicePacket, Qos,
    Reply,
};
use crate::protocol::topics;
use crate::session::SessionManager;

/// Read buffer of a connection between packets (control messages fit; an MCP tool list
/// grows it for as long as it takes to arrive).
const READ_BUFFER_IDLE: usize = 512;
/// A read buffer larger than this is replaced by a fresh idle one once empty.
const READ_BUFFER_KEEP: usize = READ_BUFFER_IDLE;
/// Spare room below which a read first reserves [`READ_GROW`] more bytes.
const READ_MIN_SPARE: usize = 128;
const READ_GROW: usize = 2048;
/// Write buffer of a connection between writes, and the size beyond which it is
/// replaced once written.
const WRITE_BUFFER_IDLE: usize = 256;
const WRITE_BUFFER_KEEP: usize = 4096;

/// Largest packet accepted before CONNECT: a firmware CONNECT (client id, username,
/// password) is about 200 bytes, so a stranger cannot make a connection buffer more.
pub const MAX_CONNECT_BYTES: usize = 4096;

/// Everything a connection task needs, shared by all of them.
pub struct FrontEnd {
    pub settings: DeviceMqttSettings,
    pub verifier: Verifier,
    pub max_packet_bytes: usize,
    pub tls_handshake_timeout: Duration,
    pub registry: Arc<DeviceRegistry>,
    pub bus: Bus,
    pub sessions: SessionManager,
    pub metrics: Arc<Metrics>,
    /// Caps concurrent connections (authenticated or not).
    pub permits: Arc<Semaphore>,
    /// Per-source-address connection count and CONNECT rate.
    pub admission: SharedAdmission,
    /// Publishes per second a device may send, and its burst (`mqtt.message_rate`).
    pub message_rate: u32,
    pub message_burst: u32,
}

/// Per-connection state the driver keeps beside the protocol state machine: the rules
/// that are about this peer's behaviour rather than MQTT.
struct PeerLimits {
    /// The device's publish rate.
    messages: TokenBucket,
    /// Already warned about a foreign topic / about the message rate.
    warned_foreign_topic: bool,
    warned_rate: bool,
}

impl FrontEnd {
    /// Accepts connections until `stop_accepting` fires. Connection tasks are spawned on
    /// `tracker` and end when `close_connections` fires (after draining their queue).
    pub async fn run_listener(
        self: Arc<Self>,
        listener: TcpListener,
        tls: Option<TlsAcceptor>,
        life: Lifecycle,
    ) {
        while let Some((stream, remote)) = life.accept(&listener, "device MQTT").await {
            let slot = match self.admission.admit(remote.ip()) {
                Ok(slot) => slot,
                Err((why, first)) => {
                    Metrics::inc(match why {
                        Refusal::TooManyFromSource => &self.metrics.connections_refused_per_source,
                        Refusal::ConnectRate => &self.metrics.connections_refused_rate,
                    });
                    if first {
                        warn!(%remote, why = why.label(), "device connections from this address refused; further refusals are counted (xiaozhi_device_connections_closed_total), not logged");
                    }
                    continue;
                }
            };
            let Ok(permit) = self.permits.clone().try_acquire_owned() else {
                Metrics::inc(&self.metrics.connections_refused_limit);
                debug!(%remote, "connection refused: mqtt.max_connections reached");
                continue;
            };
            let _ = stream.set_nodelay(true);
            let this = self.clone();
            let tls = tls.clone();
            let close = life.close_signal();
            let span = info_span!("device", %remote, mac = tracing::field::Empty);
            life.spawn(
                async move {
                    let _permit = permit;
                    let _slot = slot;
                    match tls {
                        None => this.serve(stream, remote, close).await,
                        // Boxed so a plain connection's task is not sized for TLS state.
                        Some(acceptor) => {
                            Box::pin(this.serve_tls(acceptor, stream, remote, close)).await
                        }
                    }
                }
                .instrument(span),
            );
        }
    }

    async fn serve_tls(
        &self,
        acceptor: TlsAcceptor,
        stream: TcpStream,
        remote: SocketAddr,
        close: CancellationToken,
    ) {
        let handshake = tokio::time::timeout(self.tls_handshake_timeout, acceptor.accept(stream));
        let stream = tokio::select! {
            _ = close.cancelled() => return,
            r = handshake => match r {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    Metrics::inc(&self.metrics.connections_protocol_errors);
                    debug!(error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    Metrics::inc(&self.metrics.connections_timed_out);
                    debug!("TLS handshake timed out");
                    return;
                }
            },
        };
        self.serve(stream, remote, close).await
    }

    /// Drives one connection to its end.
    async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        stream: S,
        remote: SocketAddr,
        close: CancellationToken,
    ) {
        let (mut reader, mut writer) = tokio::io::split(stream);
        let mut conn = DeviceMqttConnection::new(&self.settings, Instant::now());
        let mut rbuf = BytesMut::with_capacity(READ_BUFFER_IDLE);
        let mut wbuf = BytesMut::with_capacity(WRITE_BUFFER_IDLE);
        let mut actions = Vec::with_capacity(4);
        let mut limits = PeerLimits {
            messages: TokenBucket::new(self.message_rate, self.message_burst, Instant::now()),
            warned_foreign_topic: false,
            warned_rate: false,
        };
        let mut device: Option<(DeviceHandle, mpsc::Receiver<Outbound>)> = None;
        let mut end: Option<String> = None;

        while end.is_none() {
            // Frame and handle every complete packet already buffered.
            // Before CONNECT a peer is anonymous: it may make us buffer a CONNECT's worth
            // of bytes, not a full packet's.
            let max_packet = if device.is_some() {
                self.max_packet_bytes
            } else {
                self.max_packet_bytes.min(MAX_CONNECT_BYTES)
            };
            loop {
                match Packet::read(&mut rbuf, max_packet) {
                    Ok(packet) => conn.handle_packet(
                        device_packet(packet),
                        Instant::now(),
                        &self.settings,
                        &self.verifier,
                        &mut actions,
                    ),
                    Err(FrameError::InsufficientBytes(_)) => break,
                    Err(e) => {
                        debug!(error = %e, "malformed MQTT packet");
                        conn.handle_malformed(&mut actions);
                    }
                }
                // Boxed: its state lives only while packets are handled, instead of
                // enlarging every idle connection's task.
                end = Box::pin(self.perform(
                    &mut actions,
                    &mut wbuf,
                    &mut device,
                    remote,
                    &mut limits,
                ))
                .await;
                if end.is_some() {
                    break;
                }
            }
            if !wbuf.is_empty() && writer.write_all(&wbuf).await.is_err() {
                end.get_or_insert_with(|| "write failed".into());
            }
            wbuf.clear();
            if end.is_some() {
                break;
            }

            // Idle connections dominate a fleet, so buffers stay small between packets: a
            // buffer a large packet grew is let go once it is empty, and reads reserve
            // room in chunks only while a packet is arriving.
            if rbuf.is_empty() && rbuf.capacity() > READ_BUFFER_KEEP {
                rbuf = BytesMut::with_capacity(READ_BUFFER_IDLE);
            }
            if rbuf.capacity() - rbuf.len() < READ_MIN_SPARE {
                rbuf.reserve(READ_GROW);
            }
            if wbuf.capacity() > WRITE_BUFFER_KEEP {
                wbuf = BytesMut::with_capacity(WRITE_BUFFER_IDLE);
            }
            let deadline = conn.deadline().map(tokio::time::Instant::from_std);
            tokio::select! {
                read = reader.read_buf(&mut rbuf) => match read {
                    Ok(0) => end = Some("closed by device".into()),
                    Ok(_) => {}
                    Err(e) => end = Some(format!("read error: {e}")),
                },
                Some(out) = recv_outbound(&mut device) => {
                    match out {
                        Outbound::Publish(payload) => self.write_publish(&device, payload, &mut wbuf),
                        Outbound::Close(reason) => end = Some(reason.to_owned()),
                    }
                    // Batch whatever else is already queued into the same write.
                    while end.is_none() {
                        match device.as_mut().map(|(_, rx)| rx.try_recv()) {
                            Some(Ok(Outbound::Publish(payload))) => self.write_publish(&device, payload, &mut wbuf),
                            Some(Ok(Outbound::Close(reason))) => end = Some(reason.to_owned()),
                            _ => break,
                        }
                    }
                    if !wbuf.is_empty() && writer.write_all(&wbuf).await.is_err() {
                        end.get_or_insert_with(|| "write failed".into());
                    }
                    wbuf.clear();
                },
                _ = sleep_until_opt(deadline) => {
                    conn.handle_timeout(Instant::now(), &mut actions);
                    end = Box::pin(self.perform(&mut actions, &mut wbuf, &mut device, remote, &mut limits)).await;
                },
                _ = close.cancelled() => {
                    // Shutdown: deliver what sessions queued (their goodbyes), then close.
                    while let Some(Ok(Outbound::Publish(payload))) = device.as_mut().map(|(_, rx)| rx.try_recv()) {
                        self.write_publish(&device, payload, &mut wbuf);
                    }
                    end = Some("gateway shutting down".into());
                },
            }
        }
        if !wbuf.is_empty() {
            let _ = writer.write_all(&wbuf).await;
        }
        let _ = writer.flush().await;
        let _ = writer.shutdown().await;

        let reason = end.unwrap_or_default();
        if let Some((handle, _)) = device {
            let mac = handle.identity.mac;
            self.registry.unregister(&mac, handle.generation);
            self.sessions.device_gone(mac, handle.generation).await;
            info!(%reason, "device disconnected");
        } else {
            debug!(%reason, "connection closed before CONNECT");
        }
    }

    fn write_publish(
        &self,
        device: &Option<(DeviceHandle, mpsc::Receiver<Outbound>)>,
        payload: Bytes,
        wbuf: &mut BytesMut,
    ) {
        let Some((handle, _)) = device else { return };
        let mac = &handle.identity.mac;
        let mirrored = match control::redact_for_bus(&payload) {
            Some(redacted) => Bytes::from(redacted),
            None => payload.clone(),
        };
        self.bus.publish(topics::device_down(mac), mirrored);
        let publish = Publish::from_bytes(topics::p2p(mac), QoS::AtMostOnce, payload);
        // Packets we build are always within the limit; `usize::MAX` skips the check.
        let _ = Packet::Publish(publish).write(wbuf, usize::MAX);
        Metrics::inc(&self.metrics.mqtt_messages_out);
    }

    /// Performs queued actions; returns the reason the connection must end, if any.
    async fn perform(
        &self,
        actions: &mut Vec<Action>,
        wbuf: &mut BytesMut,
        device: &mut Option<(DeviceHandle, mpsc::Receiver<Outbound>)>,
        remote: SocketAddr,
        limits: &mut PeerLimits,
    ) -> Option<String> {
        let mut end = None;
        for action in actions.drain(..) {
            match action {
                Action::Send(reply) => {
                    let _ = wire_packet(reply).write(wbuf, usize::MAX);
                }
                Action::Authenticated {
                    identity,
                    keep_alive,
                } => {
                    tracing::Span::current().record("mac", tracing::field::display(identity.mac));
                    let (handle, rx) = self.registry.register(identity, remote);
                    Metrics::inc(&self.metrics.device_connects);
                    info!(client_id = %handle.identity.client_id, keep_alive_secs = keep_alive.as_secs(), "device connected");
                    self.sessions
                        .device_connected(handle.identity.clone(), handle.generation, remote)
                        .await;
                    *device = Some((handle, rx));
                }
                Action::Uplink(payload) => {
                    Metrics::inc(&self.metrics.mqtt_messages_in);
                    if !limits.messages.try_take(Instant::now()) {
                        Metrics::inc(&self.metrics.mqtt_dropped_rate_limited);
                        if !std::mem::replace(&mut limits.warned_rate, true) {
                            warn!(
                                rate = self.message_rate,
                                burst = self.message_burst,
                                "device publishes faster than mqtt.message_rate; the excess is dropped (counted in xiaozhi_mqtt_drops_total, logged once per connection)"
                            );
                        }
                        continue;
                    }
                    if let Some((handle, _)) = device.as_ref() {
                        self.bus
                            .publish(topics::device_up(&handle.identity.mac), payload.clone());
                        self.sessions
                            .device_message(handle.identity.clone(), handle.generation, payload)
                            .await;
                    }
                }
                Action::Dropped(label) => {
                    match label {
                        "foreign_topic" => {
                            Metrics::inc(&self.metrics.mqtt_dropped_foreign_topic);
                            // Firmware never does this: say so once per connection.
                            if !std::mem::replace(&mut limits.warned_foreign_topic, true) {
                                warn!(
                                    "device published to a topic other than the uplink topic; dropped (further ones on this connection are logged at debug)"
                                );
                            } else {
                                debug!(label, "device packet dropped");
                            }
                        }
                        _ => {
                            debug!(label, "device packet dropped");
                            Metrics::inc(&self.metrics.mqtt_dropped_unexpected_ack)
                        }
                    }
                }
                Action::Close(reason) => {
                    self.count_close(&reason);
                    end = Some(match reason {
                        CloseReason::AuthFailed(e) => format!("refused: {e}"),
                        CloseReason::ProtocolViolation(what) => {
                            format!("protocol violation: {what}")
                        }
                        other => other.label().replace('_', " "),
                    });
                }
            }
        }
        end
    }

    fn count_close(&self, reason: &CloseReason) {
        let m = &self.metrics;
        match reason {
            CloseReason::AuthFailed(AuthError::MalformedClientId) => {
                Metrics::inc(&m.auth_failed_client_id)
            }
            CloseReason::AuthFailed(AuthError::BadSignature) => {
                Metrics::inc(&m.auth_failed_signature)
            }
            CloseReason::AuthFailed(_) => Metrics::inc(&m.auth_failed_credentials),
            CloseReason::ConnectTimeout | CloseReason::KeepAliveTimeout => {
                Metrics::inc(&m.connections_timed_out)
            }
            CloseReason::ProtocolViolation(_) => Metrics::inc(&m.connections_protocol_errors),
            CloseReason::ClientDisconnect => {}
        }
        if let CloseReason::AuthFailed(e) = reason {
            info!(reason = e.label(), "device refused");
        }
    }
}

async fn recv_outbound(
    device: &mut Option<(DeviceHandle, mpsc::Receiver<Outbound>)>,
) -> Option<Outbound> {
    match device {
        Some((_, rx)) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// What the state machine reads of a framed packet (strings and payload moved, not
/// copied). Public for the fuzz harness, which drives the rules through the same glue.
pub fn device_packet(packet: Packet) -> DevicePacket {
    match packet {
        Packet::Connect(connect) => {
            let (username, password) = match connect.login {
                Some(login) => (Some(login.username), Some(login.password)),
                None => (None, None),
            };
            DevicePacket::Connect {
                client_id: connect.client_id,
                username,
                password,
                keep_alive: connect.keep_alive,
            }
        }
        Packet::Publish(publish) => DevicePacket::Publish {
            topic: publish.topic,
            qos: match publish.qos {
                QoS::AtMostOnce => Qos::AtMostOnce,
                QoS::AtLeastOnce => Qos::AtLeastOnce,
                QoS::ExactlyOnce => Qos::ExactlyOnce,
            },
            pkid: publish.pkid,
            payload: publish.payload,
        },
        Packet::Subscribe(subscribe) => DevicePacket::Subscribe {
            pkid: subscribe.pkid,
            filters: subscribe.filters.into_iter().map(|f| f.path).collect(),
        },
        Packet::Unsubscribe(unsubscribe) => DevicePacket::Unsubscribe {
            pkid: unsubscribe.pkid,
        },
        Packet::PingReq => DevicePacket::PingReq,
        Packet::Disconnect => DevicePacket::Disconnect,
        Packet::PubAck(_) | Packet::PubRec(_) | Packet::PubRel(_) | Packet::PubComp(_) => {
            DevicePacket::Acknowledgement
        }
        Packet::ConnAck(_) | Packet::SubAck(_) | Packet::UnsubAck(_) | Packet::PingResp => {
            DevicePacket::ServerOnly
        }
    }
}

/// The packet a reply of the state machine is written as.
pub fn wire_packet(reply: Reply) -> Packet {
    match reply {
        Reply::ConnAck(code) => Packet::ConnAck(ConnAck::new(
            match code {
                ConnAckCode::Accepted => ConnectReturnCode::Success,
                ConnAckCode::BadClientId => ConnectReturnCode::BadClientId,
                ConnAckCode::BadUserNamePassword => ConnectReturnCode::BadUserNamePassword,
            },
            false,
        )),
        Reply::PubAck(pkid) => Packet::PubAck(PubAck::new(pkid)),
        Reply::SubAck { pkid, granted } => Packet::SubAck(SubAck::new(
            pkid,
            granted
                .into_iter()
                .map(|ok| match ok {
                    true => SubscribeReasonCode::Success(QoS::AtMostOnce),
                    false => SubscribeReasonCode::Failure,
                })
                .collect(),
        )),
        Reply::UnsubAck(pkid) => Packet::UnsubAck(UnsubAck::new(pkid)),
        Reply::PingResp => Packet::PingResp,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttc::mqttbytes::v4::{
        Connect, Login, PubComp, Subscribe, SubscribeFilter, Unsubscribe,
    };

    #[test]
    fn framed_packets_reach_the_rules_with_what_they_carry() {
        let mut connect = Connect::new("GID@@@aa_bb_cc_dd_ee_ff@@@u");
        connect.keep_alive = 90;
        connect.login = Some(Login::new("user", "pass"));
        assert_eq!(
            device_packet(Packet::Connect(connect)),
            DevicePacket::Connect {
                client_id: "GID@@@aa_bb_cc_dd_ee_ff@@@u".into(),
                username: Some("user".into()),
                password: Some("pass".into()),
                keep_alive: 90,
            }
        );
        assert!(matches!(
            device_packet(Packet::Connect(Connect::new("x"))),
            DevicePacket::Connect {
                username: None,
                password: None,
                ..
            }
        ));
        let mut publish = Publish::new("device-server", QoS::AtLeastOnce, b"{}".to_vec());
        publish.pkid = 7;
        assert_eq!(
            device_packet(Packet::Publish(publish)),
            DevicePacket::Publish {
                topic: "device-server".into(),
                qos: Qos::AtLeastOnce,
                pkid: 7,
                payload: Bytes::from_static(b"{}"),
            }
        );
        let mut subscribe = Subscribe::new_many([
            SubscribeFilter::new("a".into(), QoS::AtMostOnce),
            SubscribeFilter::new("b".into(), QoS::ExactlyOnce),
        ]);
        subscribe.pkid = 3;
        assert_eq!(
            device_packet(Packet::Subscribe(subscribe)),
            DevicePacket::Subscribe {
                pkid: 3,
                filters: vec!["a".into(), "b".into()]
            }
        );
        let mut unsubscribe = Unsubscribe::new("a");
        unsubscribe.pkid = 4;
        assert_eq!(
            device_packet(Packet::Unsubscribe(unsubscribe)),
            DevicePacket::Unsubscribe { pkid: 4 }
        );
        assert_eq!(device_packet(Packet::PingReq), DevicePacket::PingReq);
        assert_eq!(device_packet(Packet::Disconnect), DevicePacket::Disconnect);
        assert_eq!(
            device_packet(Packet::PubComp(PubComp::new(1))),
            DevicePacket::Acknowledgement
        );
        assert_eq!(device_packet(Packet::PingResp), DevicePacket::ServerOnly);
    }

    #[test]
    fn replies_are_written_as_the_packets_they_name() {
        let bytes = |reply| {
            let mut out = BytesMut::new();
            wire_packet(reply).write(&mut out, usize::MAX).unwrap();
            out.to_vec()
        };
        assert_eq!(
            bytes(Reply::ConnAck(ConnAckCode::Accepted)),
            [0x20, 2, 0, 0]
        );
        assert_eq!(
            bytes(Reply::ConnAck(ConnAckCode::BadClientId)),
            [0x20, 2, 0, 2]
        );
        assert_eq!(
            bytes(Reply::ConnAck(ConnAckCode::BadUserNamePassword)),
            [0x20, 2, 0, 4]
        );
        assert_eq!(bytes(Reply::PubAck(9)), [0x40, 2, 0, 9]);
        assert_eq!(
            bytes(Reply::SubAck {
                pkid: 3,
                granted: vec![true, false]
            }),
            [0x90, 4, 0, 3, 0x00, 0x80]
        );
        assert_eq!(bytes(Reply::UnsubAck(4)), [0xb0, 2, 0, 4]);
        assert_eq!(bytes(Reply::PingResp), [0xd0, 0]);
    }
}
