//! The broker listener: admin and integration clients, terminated in our own code.
//!
//! rumqttd's own listener authenticates a client and then lets it publish and subscribe
//! to anything: it has no ACLs and no publish hook, and its TLS accept loop has no
//! handshake timeout. So each client is served here instead and bridged to the router
//! through a rumqttd *local link* of its own, with every PUBLISH, SUBSCRIBE and will
//! checked against the user's role ([`super::acl`]) before the router sees it.
//!
//! Per client, in its own task (so a silent socket delays nobody else):
//!
//! 1. CONNECT within `connection_timeout_ms`. MQTT 3.1.1 and 5 are told apart by the
//!    protocol level byte ([`sniff_connect`]); 3.1 and anything else get a CONNACK
//!    "unacceptable protocol version" and are closed.
//! 2. Username and password checked against `broker.users` in constant time; refusals get
//!    a proper CONNACK (3.1.1: 4 bad credentials / 5 not authorised; 5: 0x86 / 0x87).
//! 3. A local link to the router (built on the blocking pool), whose CONNACK is passed on.
//!    Router-side client ids carry the role (`admin:<id>`), so a client can never take
//!    over the gateway's own link or another role's session (whose subscriptions were
//!    granted to a different role). Empty client ids get `broker-<n>` (clean sessions only).
//! 4. Both ways pumped: client packets -> ACL ([`on_client_packet`], pure) -> router;
//!    router notifications -> client. Refused QoS 1 publishes are still acknowledged and
//!    refused QoS 2 flows completed here, so clients never hang; refused SUBSCRIBEs are
//!    answered here with failure codes.
//!
//! Decisions worth knowing:
//!
//! * Keep-alive 0 is accepted (MQTT allows it; rumqttd does not) and then no read timeout
//!   applies: only authenticated users can hold such a connection, and the client cap
//!   bounds them. Otherwise a client silent for 1.5 x keep-alive is closed.
//! * Wills are published here, not by the router: rumqttd's router only fires a will when
//!   its own listener sends it an internal event local links cannot send. On a close
//!   without DISCONNECT (or a v5 DISCONNECT 0x04) the will goes out through the client's
//!   link, then the link is disconnected; the v5 will delay is not honoured (sent at
//!   once). A client taken over by a new connection with the same id loses its will.
//! * PINGREQ and UNSUBSCRIBE are answered here (rumqttd sends no UNSUBACK for a filter
//!   that was not subscribed, which would hang the client); the UNSUBSCRIBE still goes to
//!   the router. Acks written here may overtake the router's acks of earlier packets.
//! * v5 topic aliases are not offered (the router's CONNACK is rewritten to advertise
//!   none), so every PUBLISH names its topic and the ACL sees it; a client using one
//!   anyway is disconnected.
//! * rumqttd's codecs can panic on some packet types a client should never send (for
//!   example CONNACK to the 5.0 decoder): packet types are checked first, and decoding
//!   runs under `catch_unwind`, so no client bytes can take a task down unnoticed.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use futures_util::FutureExt;
use rumqttd::Notification;
use rumqttd::local::{LinkError, LinkRx, LinkTx};
use rumqttd::protocol::v4::V4;
use rumqttd::protocol::v5::V5;
use rumqttd::protocol::{
    self as mqtt, ConnAck, Connect, ConnectProperties, ConnectReturnCode, Disconnect,
    DisconnectReasonCode, LastWill, LastWillProperties, Login, Packet, PingResp, Protocol, PubAck,
    PubAckReason, PubComp, PubCompReason, PubRec, PubRecReason, Publish, PublishProperties, SubAck,
    SubscribeReasonCode, UnsubAck, UnsubAckReason,
};
use sha2::{Digest, Sha256};
use subtle::{ConditionallySelectable, ConstantTimeEq};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use super::acl::{self, Refusal};
use crate::config::{BrokerRole, BrokerUser};
use crate::metrics::Metrics;

/// Broker-listener sockets open at once (before and after CONNECT); more are closed at
/// once and counted.
pub const MAX_CLIENTS: usize = 10_000;

/// A client's byte stream: plain TCP or TLS.
pub trait ClientStream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> ClientStream for T {}
type ClientIo = Box<dyn ClientStream>;

/// How long a write to a client may take before the client is considered gone.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// Bytes asked of the socket per read.
const READ_CHUNK: usize = 8 * 1024;

/// Router notifications written to a client in one batch.
const WRITE_BATCH: usize = 128;

/// How the listener behaves (from the broker tunables).
#[derive(Debug, Clone)]
pub struct ListenerSettings {
    /// Time a client has to send CONNECT.
    pub connection_timeout: Duration,
    /// Largest packet (remaining length) a client may send.
    pub max_payload_size: usize,
    /// Most packets handed to the router in one batch.
    pub max_batch: usize,
    /// Pause after each accepted socket.
    pub next_connection_delay: Duration,
    /// Sockets open at once.
    pub max_clients: usize,
    /// Time a TLS client has to finish its handshake (before the CONNECT timeout starts).
    pub tls_handshake_timeout: Duration,
}

/// Opens a local link into the router for `(router_client_id, clean_session)`, or says
/// why not. Blocks until the router answers: call it on the blocking pool.
pub type OpenLink =
    Box<dyn Fn(&str, bool) -> Result<(LinkTx, LinkRx, Notification), String> + Send + Sync>;

/// True while the router's inbound channel is full (a send would block the thread).
pub type RouterBusy = Box<dyn Fn() -> bool + Send + Sync>;

/// What this module needs from the router. rumqttd's router sender has a private element
/// type, so it stays in the closures [`super::bus`] builds and never appears here.
pub struct RouterPort {
    pub open: OpenLink,
    pub busy: RouterBusy,
}

/// The broker listener's shared state; [`BrokerListener::run`] is its accept loop.
pub struct BrokerListener {
    settings: ListenerSettings,
    credentials: Vec<Credential>,
    router: RouterPort,
    metrics: Arc<Metrics>,
    slots: Arc<Semaphore>,
    next_assigned_id: AtomicU64,
}

impl BrokerListener {
    pub fn new(
        settings: ListenerSettings,
        users: &[BrokerUser],
        router: RouterPort,
        metrics: Arc<Metrics>,
    ) -> Arc<BrokerListener> {
        Arc::new(BrokerListener {
            slots: Arc::new(Semaphore::new(settings.max_clients)),
            settings,
            credentials: users.iter().map(Credential::new).collect(),
            router,
            metrics,
            next_assigned_id: AtomicU64::new(1),
        })
    }

    /// Accepts clients until the future is dropped (the broker aborts its task), which
    /// also ends every client task: they live in a `JoinSet` owned by this future.
    pub async fn run(self: Arc<Self>, listener: TcpListener, tls: Option<TlsAcceptor>) {
        let mut clients = JoinSet::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let Ok(slot) = self.slots.clone().try_acquire_owned() else {
                            Metrics::inc(&self.metrics.broker_connections_refused_limit);
                            debug!(%peer, "broker listener full; socket closed");
                            continue;
                        };
                        let _ = stream.set_nodelay(true);
                        clients.spawn(self.clone().serve(stream, tls.clone(), peer, slot));
                        if !self.settings.next_connection_delay.is_zero() {
                            tokio::time::sleep(self.settings.next_connection_delay).await;
                        }
                    }
                    Err(e) => {
                        // Out of file descriptors and the like: do not spin.
                        warn!(error = %e, "broker listener cannot accept");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                Some(_) = clients.join_next(), if !clients.is_empty() => {}
            }
        }
    }

    async fn serve(
        self: Arc<Self>,
        stream: TcpStream,
        tls: Option<TlsAcceptor>,
        peer: SocketAddr,
        _slot: OwnedSemaphorePermit,
    ) {
        // The handshake runs here, in the client's own task and under a timeout, so a
        // client that never sends a ClientHello delays nobody (rumqttd's own TLS accept
        // loop has neither).
        let mut stream: ClientIo = match tls {
            None => Box::new(stream),
            Some(acceptor) => {
                match tokio::time::timeout(
                    self.settings.tls_handshake_timeout,
                    acceptor.accept(stream),
                )
                .await
                {
                    Ok(Ok(s)) => Box::new(s),
                    Ok(Err(e)) => {
                        Metrics::inc(&self.metrics.broker_protocol_errors);
                        debug!(%peer, error = %e, "broker client TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        Metrics::inc(&self.metrics.broker_connections_timed_out);
                        debug!(%peer, "broker client TLS handshake timed out");
                        return;
                    }
                }
            }
        };
        let mut rbuf = BytesMut::with_capacity(READ_CHUNK);
        let handshake = tokio::time::timeout(
            self.settings.connection_timeout,
            read_connect(&mut stream, &mut rbuf, self.settings.max_payload_size),
        )
        .await;
        let (codec, connect) = match handshake {
            Ok(Ok(v)) => v,
            Err(_) => {
                Metrics::inc(&self.metrics.broker_connections_timed_out);
                debug!(%peer, "broker client sent no CONNECT in time");
                return;
            }
            Ok(Err(HandshakeError::Closed)) => return,
            Ok(Err(HandshakeError::UnsupportedLevel(level))) => {
                Metrics::inc(&self.metrics.broker_protocol_errors);
                info!(%peer, level, "broker client refused: unsupported MQTT version");
                let ack = ConnAck {
                    session_present: false,
                    code: ConnectReturnCode::RefusedProtocolVersion,
                };
                let _ =
                    write_packets(&mut stream, &Codec::V4(V4), [Packet::ConnAck(ack, None)]).await;
                return;
            }
            Ok(Err(e)) => {
                Metrics::inc(&self.metrics.broker_protocol_errors);
                debug!(%peer, error = %e, "broker client sent no valid CONNECT");
                return;
            }
        };
        let Packet::Connect(connect, props, will, will_props, login) = connect else {
            Metrics::inc(&self.metrics.broker_protocol_errors);
            return;
        };
        let Some(accepted) = self
            .admit(
                &mut stream,
                &codec,
                peer,
                connect,
                props,
                will,
                will_props,
                login,
            )
            .await
        else {
            return;
        };
        Metrics::inc(&self.metrics.broker_connects);
        let _connected = ConnectedGauge::up(&self.metrics);
        let end = self
            .pump(&mut stream, &mut rbuf, &codec, peer, accepted)
            .await;
        let _ = stream.shutdown().await;
        debug!(%peer, ?end, "broker client gone");
    }

    /// Authenticates the CONNECT, checks its will, opens the router link and answers.
    #[allow(clippy::too_many_arguments)]
    async fn admit(
        self: &Arc<Self>,
        stream: &mut ClientIo,
        codec: &Codec,
        peer: SocketAddr,
        connect: Connect,
        props: Option<ConnectProperties>,
        will: Option<LastWill>,
        will_props: Option<LastWillProperties>,
        login: Option<Login>,
    ) -> Option<Accepted> {
        let refuse = |refusal: ConnectRefusal| {
            Packet::ConnAck(
                ConnAck {
                    session_present: false,
                    code: refusal.code(codec.is_v5()),
                },
                None,
            )
        };
        let client_id = connect.client_id.clone();

        let role = login
            .as_ref()
            .and_then(|l| authenticate(&self.credentials, &l.username, &l.password));
        let username = login.map(|l| l.username).unwrap_or_default();
        let Some(role) = role else {
            Metrics::inc(&self.metrics.broker_auth_refused);
            let why = if username.is_empty() {
                ConnectRefusal::NoCredentials
            } else {
                ConnectRefusal::BadCredentials
            };
            info!(%peer, username, client_id, "broker client refused: bad or missing credentials");
            let _ = write_packets(stream, codec, [refuse(why)]).await;
            return None;
        };

        if props
            .as_ref()
            .is_some_and(|p| p.authentication_method.is_some())
        {
            Metrics::inc(&self.metrics.broker_auth_refused);
            info!(%peer, username, client_id, "broker client refused: enhanced authentication is not supported");
            let _ = write_packets(stream, codec, [refuse(ConnectRefusal::AuthMethod)]).await;
            return None;
        }

        let (client_id, assigned, router_id) = match client_identity(
            role,
            &connect.client_id,
            connect.clean_session,
            || self.next_assigned_id.fetch_add(1, Ordering::Relaxed),
        ) {
            Ok(v) => v,
            Err(()) => {
                Metrics::inc(&self.metrics.broker_protocol_errors);
                info!(%peer, username, client_id, "broker client refused: client id not usable");
                let _ = write_packets(stream, codec, [refuse(ConnectRefusal::ClientId)]).await;
                return None;
            }
        };

        let will = match will {
            Some(will) => {
                let topic = std::str::from_utf8(&will.topic).unwrap_or("");
                if let Err(refusal) = acl::may_publish(role, topic) {
                    Metrics::inc(&self.metrics.broker_publish_refused);
                    warn!(%peer, username, client_id, topic, reason = refusal.label(), "broker client refused: will topic not allowed");
                    let _ = write_packets(stream, codec, [refuse(ConnectRefusal::WillTopic)]).await;
                    return None;
                }
                Some(will_publish(will, will_props))
            }
            None => None,
        };

        let me = self.clone();
        let clean = connect.clean_session;
        let link = tokio::task::spawn_blocking(move || (me.router.open)(&router_id, clean)).await;
        let (link_tx, link_rx, notification) = match link {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                warn!(%peer, username, client_id, error = %e, "broker client refused: the router did not take the connection (router.max_connections?)");
                let _ = write_packets(stream, codec, [refuse(ConnectRefusal::Unavailable)]).await;
                return None;
            }
            Err(e) => {
                warn!(%peer, error = %e, "broker link task failed");
                return None;
            }
        };
        let mut link = RouterLink {
            tx: link_tx,
            will,
            open: true,
        };

        let connack = match Option::<Packet>::from(notification) {
            Some(Packet::ConnAck(ack, ack_props)) => {
                let ack_props = codec.is_v5().then(|| {
                    let mut p = ack_props.unwrap_or_default();
                    // No topic aliases: every PUBLISH must name its topic for the ACL.
                    p.topic_alias_max = None;
                    p.assigned_client_identifier = assigned.then(|| client_id.clone());
                    p
                });
                Packet::ConnAck(ack, ack_props)
            }
            _ => {
                warn!(%peer, "the router answered a new link without CONNACK");
                let _ = write_packets(stream, codec, [refuse(ConnectRefusal::Unavailable)]).await;
                return None;
            }
        };
        if write_packets(stream, codec, [connack]).await.is_err() {
            link.close(true);
            return None;
        }
        info!(
            %peer,
            username,
            client_id,
            role = acl::role_name(role),
            mqtt = if codec.is_v5() { "5" } else { "3.1.1" },
            keep_alive = connect.keep_alive,
            "broker client connected"
        );
        Some(Accepted {
            link,
            link_rx,
            state: ClientState::new(role, codec.is_v5()),
            username,
            client_id,
            keep_alive: connect.keep_alive,
            warned: false,
        })
    }

    /// Moves packets both ways until the client or the router ends the connection.
    async fn pump(
        &self,
        stream: &mut ClientIo,
        rbuf: &mut BytesMut,
        codec: &Codec,
        peer: SocketAddr,
        mut c: Accepted,
    ) -> End {
        let mut codec = codec.clone();
        let keep_alive =
            (c.keep_alive > 0).then(|| Duration::from_millis(u64::from(c.keep_alive) * 1500));
        let mut last_packet = Instant::now();
        let mut to_router: Vec<Packet> = Vec::new();
        let mut to_client: Vec<Packet> = Vec::new();

        // Packets already read behind the CONNECT.
        let mut pending_read = !rbuf.is_empty();
        let end = loop {
            let read_ready = async {
                if pending_read {
                    return Ok(usize::MAX);
                }
                if rbuf.capacity() - rbuf.len() < READ_CHUNK / 2 {
                    rbuf.reserve(READ_CHUNK);
                }
                stream.read_buf(rbuf).await
            };
            let idle = async {
                match keep_alive {
                    Some(ka) => tokio::time::sleep_until(last_packet + ka).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                read = read_ready => {
                    pending_read = false;
                    match read {
                        Ok(0) => break End::Closed,
                        Ok(_) => {}
                        Err(_) => break End::Closed,
                    }
                    let mut outcome_end = None;
                    loop {
                        let packet = match decode(&mut codec, rbuf, self.settings.max_payload_size) {
                            Ok(Some(p)) => p,
                            Ok(None) => break,
                            Err(v) => {
                                outcome_end = Some(End::Violation(v));
                                break;
                            }
                        };
                        last_packet = Instant::now();
                        match on_client_packet(&mut c.state, packet) {
                            Outcome::Forward(p) => to_router.push(p),
                            Outcome::Reply(p) => to_client.push(p),
                            Outcome::Unsubscribe(f, ack) => {
                                to_router.push(f);
                                to_client.push(Packet::UnsubAck(ack, None));
                            }
                            Outcome::Refused { reply, kind, subject, refusal } => {
                                self.report_refusal(&mut c, peer, kind, &subject, refusal);
                                to_client.extend(reply);
                            }
                            Outcome::Disconnect { publish_will } => {
                                outcome_end = Some(End::ClientDisconnect { publish_will });
                                break;
                            }
                            Outcome::Close(v) => {
                                outcome_end = Some(End::Violation(v));
                                break;
                            }
                        }
                        if to_router.len() >= self.settings.max_batch
                            && let Err(e) = c.link.send(&self.router.busy, &mut to_router).await
                        {
                            debug!(error = %e, "router link closed");
                            outcome_end = Some(End::RouterGone);
                            break;
                        }
                    }
                    if !to_router.is_empty()
                        && let Err(e) = c.link.send(&self.router.busy, &mut to_router).await
                    {
                        debug!(error = %e, "router link closed");
                        outcome_end.get_or_insert(End::RouterGone);
                    }
                    if !to_client.is_empty()
                        && write_packets(stream, &codec, to_client.drain(..)).await.is_err()
                    {
                        outcome_end.get_or_insert(End::Closed);
                    }
                    if let Some(end) = outcome_end {
                        break end;
                    }
                }
                notification = c.link_rx.next() => {
                    let mut next = Some(notification);
                    let mut wake = false;
                    let mut stop = None;
                    let mut count = 0;
                    while let Some(n) = next.take() {
                        match n {
                            Ok(Some(Notification::Unschedule)) => wake = true,
                            Ok(Some(Notification::Disconnect(d, p))) => {
                                if codec.is_v5() {
                                    to_client.push(Packet::Disconnect(d, p));
                                }
                                stop = Some(End::RouterDisconnected);
                                break;
                            }
                            Ok(Some(n)) => match Option::<Packet>::from(n) {
                                // UNSUBSCRIBEs are answered in on_client_packet.
                                Some(Packet::UnsubAck(..)) | None => {}
                                Some(p) => to_client.push(p),
                            },
                            Ok(None) => {}
                            Err(_) => {
                                stop = Some(End::RouterGone);
                                break;
                            }
                        }
                        count += 1;
                        if count < WRITE_BATCH {
                            next = c.link_rx.next().now_or_never();
                        }
                    }
                    if !to_client.is_empty()
                        && write_packets(stream, &codec, to_client.drain(..)).await.is_err()
                    {
                        stop.get_or_insert(End::Closed);
                    }
                    if let Some(end) = stop {
                        break end;
                    }
                    if wake && c.link_rx.wake().await.is_err() {
                        break End::RouterGone;
                    }
                }
                _ = idle => break End::KeepAliveTimeout,
            }
        };

        match &end {
            End::ClientDisconnect { publish_will } => c.link.close(*publish_will),
            End::RouterGone => {
                // Taken over by a new connection with the same id (or the router is
                // gone): our connection id may already be someone else's.
                c.link.abandon();
                if codec.is_v5() {
                    let d = Disconnect {
                        reason_code: DisconnectReasonCode::SessionTakenOver,
                    };
                    let _ = write_packets(stream, &codec, [Packet::Disconnect(d, None)]).await;
                }
            }
            End::RouterDisconnected => c.link.abandon(),
            End::Closed => c.link.close(true),
            End::KeepAliveTimeout => {
                Metrics::inc(&self.metrics.broker_connections_timed_out);
                c.link.close(true);
                if codec.is_v5() {
                    let d = Disconnect {
                        reason_code: DisconnectReasonCode::KeepAliveTimeout,
                    };
                    let _ = write_packets(stream, &codec, [Packet::Disconnect(d, None)]).await;
                }
            }
            End::Violation(v) => {
                Metrics::inc(&self.metrics.broker_protocol_errors);
                info!(%peer, username = c.username, client_id = c.client_id, error = %v, "broker client closed for a protocol error");
                c.link.close(true);
                if codec.is_v5() {
                    let d = Disconnect {
                        reason_code: v.reason_code(),
                    };
                    let _ = write_packets(stream, &codec, [Packet::Disconnect(d, None)]).await;
                }
            }
        }
        end
    }

    fn report_refusal(
        &self,
        c: &mut Accepted,
        peer: SocketAddr,
        kind: Refused,
        subject: &str,
        refusal: Refusal,
    ) {
        let counter = match kind {
            Refused::Publish => &self.metrics.broker_publish_refused,
            Refused::Subscribe => &self.metrics.broker_subscribe_refused,
        };
        Metrics::inc(counter);
        let what = match kind {
            Refused::Publish => "publish",
            Refused::Subscribe => "subscribe",
        };
        if c.warned {
            debug!(%peer, username = c.username, client_id = c.client_id, what, subject, reason = refusal.label(), "broker client refused");
        } else {
            c.warned = true;
            warn!(%peer, username = c.username, client_id = c.client_id, what, subject, reason = refusal.label(), detail = %refusal, "broker client refused (further refusals on this connection are logged at debug)");
        }
    }
}

/// Counts a client in `broker_clients_connected` for as long as it lives (task aborts
/// included).
struct ConnectedGauge<'a>(&'a Metrics);

impl<'a> ConnectedGauge<'a> {
    fn up(metrics: &'a Metrics) -> Self {
        Metrics::inc(&metrics.broker_clients_connected);
        ConnectedGauge(metrics)
    }
}

impl Drop for ConnectedGauge<'_> {
    fn drop(&mut self) {
        Metrics::dec(&self.0.broker_clients_connected);
    }
}

/// An authenticated client with its router link.
struct Accepted {
    link: RouterLink,
    link_rx: LinkRx,
    state: ClientState,
    username: String,
    client_id: String,
    keep_alive: u16,
    warned: bool,
}

/// Why a client connection ended.
#[derive(Debug)]
enum End {
    ClientDisconnect {
        publish_will: bool,
    },
    Closed,
    KeepAliveTimeout,
    Violation(Violation),
    /// The router dropped the link (session taken over).
    RouterGone,
    /// The router disconnected the client (for example a malformed publish).
    RouterDisconnected,
}

/// The client's sending half into the router. Dropping it while still open (the task
/// aborted at shutdown, or a panic) publishes the will and disconnects, so the router
/// always frees the connection and a reconnect with the same id works.
struct RouterLink {
    tx: LinkTx,
    will: Option<Packet>,
    open: bool,
}

impl RouterLink {
    /// Hands `packets` to the router in one batch (one router event), emptying the vec.
    async fn send(
        &mut self,
        busy: &RouterBusy,
        packets: &mut Vec<Packet>,
    ) -> Result<(), LinkError> {
        // `LinkTx::send` notifies the router with a blocking channel send: wait for room
        // so that never parks a runtime thread.
        while busy() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let Some(last) = packets.pop() else {
            return Ok(());
        };
        self.tx.buffer().extend(packets.drain(..));
        self.tx.send(last).await.map(drop)
    }

    /// Publishes the will if asked (and there is one), then disconnects the link.
    fn close(&mut self, publish_will: bool) {
        if !std::mem::take(&mut self.open) {
            return;
        }
        if let Some(will) = self.will.take()
            && publish_will
        {
            self.tx.buffer().push_back(will);
        }
        let bye = Packet::Disconnect(
            Disconnect {
                reason_code: DisconnectReasonCode::NormalDisconnection,
            },
            None,
        );
        // `send` has no await point: it completes on first poll.
        let _ = self.tx.send(bye).now_or_never();
    }

    /// The router already dropped this link: send it nothing more.
    fn abandon(&mut self) {
        self.open = false;
    }
}

impl Drop for RouterLink {
    fn drop(&mut self) {
        self.close(true);
    }
}

/// A will as the publish the router will get.
fn will_publish(will: LastWill, props: Option<LastWillProperties>) -> Packet {
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

// ---------------------------------------------------------------------------------------
// Sans-IO: protocol detection, credentials, client ids, per-packet decisions.
// ---------------------------------------------------------------------------------------

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
struct Credential {
    username: [u8; 32],
    password: [u8; 32],
    role: BrokerRole,
}

impl Credential {
    fn new(user: &BrokerUser) -> Credential {
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
fn authenticate(users: &[Credential], username: &str, password: &str) -> Option<BrokerRole> {
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
fn client_identity(
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
enum ConnectRefusal {
    NoCredentials,
    BadCredentials,
    AuthMethod,
    ClientId,
    WillTopic,
    Unavailable,
}

impl ConnectRefusal {
    /// The CONNACK code for this refusal in MQTT 3.1.1 or 5.
    fn code(self, v5: bool) -> ConnectReturnCode {
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
    fn reason_code(&self) -> DisconnectReasonCode {
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
enum Codec {
    V4(V4),
    V5(V5),
}

impl Codec {
    fn is_v5(&self) -> bool {
        matches!(self, Codec::V5(_))
    }

    fn write(&self, packet: Packet, out: &mut BytesMut) -> Result<usize, mqtt::Error> {
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
fn decode(codec: &mut Codec, buf: &mut BytesMut, max: usize) -> Result<Option<Packet>, Violation> {
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

/// The same packet without MQTT 5 properties, for 3.1.1 clients.
fn without_properties(packet: Packet) -> Packet {
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
fn qos_and_pkid(publish: &Publish) -> (u8, u16) {
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
struct ClientState {
    role: BrokerRole,
    v5: bool,
    /// Packet ids of refused QoS 2 publishes whose PUBREL is answered here (at most 65,536).
    refused_qos2: HashSet<u16>,
}

impl ClientState {
    fn new(role: BrokerRole, v5: bool) -> ClientState {
        ClientState {
            role,
            v5,
            refused_qos2: HashSet::new(),
        }
    }
}

/// Which kind of request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refused {
    Publish,
    Subscribe,
}

/// What to do with one packet from a connected client.
#[derive(Debug)]
enum Outcome {
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
fn on_client_packet(state: &mut ClientState, packet: Packet) -> Outcome {
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

// ---------------------------------------------------------------------------------------
// I/O helpers.
// ---------------------------------------------------------------------------------------

#[derive(Debug, thiserror::Error)]
enum HandshakeError {
    #[error("closed before CONNECT")]
    Closed,
    #[error("not an MQTT CONNECT")]
    NotConnect,
    #[error("unsupported MQTT protocol level {0}")]
    UnsupportedLevel(u8),
    #[error(transparent)]
    Violation(#[from] Violation),
}

/// Reads the CONNECT (the caller bounds the time), choosing the codec from its protocol
/// level. Bytes after the CONNECT stay in `buf`.
async fn read_connect(
    stream: &mut ClientIo,
    buf: &mut BytesMut,
    max: usize,
) -> Result<(Codec, Packet), HandshakeError> {
    let mut codec = None;
    loop {
        if codec.is_none() {
            codec = match sniff_connect(buf) {
                Sniff::Incomplete => None,
                Sniff::NotConnect => return Err(HandshakeError::NotConnect),
                Sniff::Level(4) => Some(Codec::V4(V4)),
                Sniff::Level(5) => Some(Codec::V5(V5)),
                Sniff::Level(other) => return Err(HandshakeError::UnsupportedLevel(other)),
            };
        }
        if let Some(c) = codec.as_mut()
            && let Some(packet) = decode(c, buf, max)?
        {
            return Ok((codec.expect("set above"), packet));
        }
        if buf.capacity() - buf.len() < 64 {
            buf.reserve(READ_CHUNK);
        }
        match stream.read_buf(buf).await {
            Ok(0) | Err(_) => return Err(HandshakeError::Closed),
            Ok(_) => {}
        }
    }
}

/// Encodes and writes packets in one write, within [`WRITE_TIMEOUT`].
async fn write_packets(
    stream: &mut ClientIo,
    codec: &Codec,
    packets: impl IntoIterator<Item = Packet>,
) -> std::io::Result<()> {
    let mut out = BytesMut::new();
    for packet in packets {
        // Encoding our own and the router's packets: a failure (or an encoder panic)
        // is a bug, not the client's doing; close rather than take the task down.
        let encoded = catch_unwind(AssertUnwindSafe(|| codec.write(packet, &mut out)));
        if !matches!(encoded, Ok(Ok(_))) {
            return Err(std::io::Error::other(
                "cannot encode a packet for the client",
            ));
        }
    }
    match tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(&out)).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "client does not read",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
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
}
