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
//!    protocol level byte ([`super::client_rules::sniff_connect`]); 3.1 and anything else get a CONNACK
//!    "unacceptable protocol version" and are closed.
//! 2. Username and password checked against `broker.users` in constant time; refusals get
//!    a proper CONNACK (3.1.1: 4 bad credentials / 5 not authorised; 5: 0x86 / 0x87).
//! 3. A local link to the router (built on the blocking pool), whose CONNACK is passed on.
//!    Router-side client ids carry the role (`admin:<id>`), so a client can never take
//!    over the gateway's own link or another role's session (whose subscriptions were
//!    granted to a different role). Empty client ids get `broker-<n>` (clean sessions only).
//! 4. Both ways pumped: client packets -> ACL ([`super::client_rules`], pure) -> router;
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
    ConnAck, Connect, ConnectProperties, ConnectReturnCode, Disconnect, DisconnectReasonCode,
    LastWill, LastWillProperties, Login, Packet,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::acl::{self, Refusal};
use super::client_rules::{
    ClientState, Codec, ConnectRefusal, Credential, Outcome, Refused, Sniff, Violation,
    authenticate, client_identity, decode, disconnect_v5, on_client_packet, sniff_connect,
    will_publish,
};
use crate::config::BrokerUser;
use crate::lifecycle::Lifecycle;
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

    /// Accepts clients until `life` says stop accepting; each client is served in a
    /// task of `life` and closes when `life` closes connections (its will published,
    /// an MQTT 5 client told the server is shutting down).
    pub async fn run(
        self: Arc<Self>,
        listener: TcpListener,
        tls: Option<TlsAcceptor>,
        life: Lifecycle,
    ) {
        while let Some(accepted) = life.until_stopped(listener.accept()).await {
            match accepted {
                Ok((stream, peer)) => {
                    let Ok(slot) = self.slots.clone().try_acquire_owned() else {
                        Metrics::inc(&self.metrics.broker_connections_refused_limit);
                        debug!(%peer, "broker listener full; socket closed");
                        continue;
                    };
                    let _ = stream.set_nodelay(true);
                    life.spawn(self.clone().serve(
                        stream,
                        tls.clone(),
                        peer,
                        slot,
                        life.close_signal(),
                    ));
                    if !self.settings.next_connection_delay.is_zero() {
                        tokio::time::sleep(self.settings.next_connection_delay).await;
                    }
                }
                Err(e) => {
                    // Out of file descriptors and the like: do not spin.
                    warn!(error = %e, "broker listener cannot accept");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    async fn serve(
        self: Arc<Self>,
        stream: TcpStream,
        tls: Option<TlsAcceptor>,
        peer: SocketAddr,
        _slot: OwnedSemaphorePermit,
        close: CancellationToken,
    ) {
        // Until the client is admitted, closing just drops the socket; the pump itself
        // ends on `close` with the will and a DISCONNECT.
        let Some(admitted) = close
            .run_until_cancelled(self.handshake(stream, tls, peer))
            .await
            .flatten()
        else {
            return;
        };
        let (mut stream, mut rbuf, codec, accepted) = admitted;
        Metrics::inc(&self.metrics.broker_connects);
        let _connected = ConnectedGauge::up(&self.metrics);
        let end = self
            .pump(&mut stream, &mut rbuf, &codec, peer, accepted, &close)
            .await;
        let _ = stream.shutdown().await;
        debug!(%peer, ?end, "broker client gone");
    }

    /// TLS (if any), CONNECT and admission; `None` when the client is refused or gone.
    async fn handshake(
        self: &Arc<Self>,
        stream: TcpStream,
        tls: Option<TlsAcceptor>,
        peer: SocketAddr,
    ) -> Option<(ClientIo, BytesMut, Codec, Accepted)> {
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
                        return None;
                    }
                    Err(_) => {
                        Metrics::inc(&self.metrics.broker_connections_timed_out);
                        debug!(%peer, "broker client TLS handshake timed out");
                        return None;
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
                return None;
            }
            Ok(Err(HandshakeError::Closed)) => return None,
            Ok(Err(HandshakeError::UnsupportedLevel(level))) => {
                Metrics::inc(&self.metrics.broker_protocol_errors);
                info!(%peer, level, "broker client refused: unsupported MQTT version");
                let ack = ConnAck {
                    session_present: false,
                    code: ConnectReturnCode::RefusedProtocolVersion,
                };
                let _ =
                    write_packets(&mut stream, &Codec::V4(V4), [Packet::ConnAck(ack, None)]).await;
                return None;
            }
            Ok(Err(e)) => {
                Metrics::inc(&self.metrics.broker_protocol_errors);
                debug!(%peer, error = %e, "broker client sent no valid CONNECT");
                return None;
            }
        };
        let Packet::Connect(connect, props, will, will_props, login) = connect else {
            Metrics::inc(&self.metrics.broker_protocol_errors);
            return None;
        };
        let accepted = self
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
            .await?;
        Some((stream, rbuf, codec, accepted))
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
        close: &CancellationToken,
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
                                    to_client.push(match p {
                                        Some(p) => Packet::Disconnect(d, Some(p)),
                                        None => disconnect_v5(d.reason_code, "disconnected by the broker"),
                                    });
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
                _ = close.cancelled() => break End::Shutdown,
            }
        };

        match &end {
            End::ClientDisconnect { publish_will } => c.link.close(*publish_will),
            End::RouterGone => {
                // Taken over by a new connection with the same id (or the router is
                // gone): our connection id may already be someone else's.
                c.link.abandon();
                if codec.is_v5() {
                    let bye = disconnect_v5(
                        DisconnectReasonCode::SessionTakenOver,
                        "session taken over by a new connection",
                    );
                    let _ = write_packets(stream, &codec, [bye]).await;
                }
            }
            End::RouterDisconnected => c.link.abandon(),
            End::Shutdown => {
                // Gone without a DISCONNECT of its own, as far as its subscribers can
                // tell: the will goes out.
                c.link.close(true);
                if codec.is_v5() {
                    let bye = disconnect_v5(
                        DisconnectReasonCode::ServerShuttingDown,
                        "server shutting down",
                    );
                    let _ = write_packets(stream, &codec, [bye]).await;
                }
            }
            End::Closed => c.link.close(true),
            End::KeepAliveTimeout => {
                Metrics::inc(&self.metrics.broker_connections_timed_out);
                c.link.close(true);
                if codec.is_v5() {
                    let bye =
                        disconnect_v5(DisconnectReasonCode::KeepAliveTimeout, "keep-alive timeout");
                    let _ = write_packets(stream, &codec, [bye]).await;
                }
            }
            End::Violation(v) => {
                Metrics::inc(&self.metrics.broker_protocol_errors);
                info!(%peer, username = c.username, client_id = c.client_id, error = %v, "broker client closed for a protocol error");
                c.link.close(true);
                if codec.is_v5() {
                    let bye = disconnect_v5(v.reason_code(), &v.to_string());
                    let _ = write_packets(stream, &codec, [bye]).await;
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
    /// The gateway is shutting down.
    Shutdown,
}

/// The client's sending half into the router. Dropping it while still open (a client
/// cancelled mid-admission at shutdown, or a panic) publishes the will and disconnects, so the router
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
