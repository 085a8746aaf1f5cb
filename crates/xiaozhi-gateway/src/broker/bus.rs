//! The bus: an embedded rumqttd router, the broker listener for admin and integration
//! clients, and the gateway's own link into it.
//!
//! * [`Bus::publish`], [`Bus::publish_retained`] and [`Bus::publish_reply`] put gateway
//!   traffic on the bus. They never block the caller: messages go through a bounded queue
//!   to one publisher thread (rumqttd's local link sends to the router with a blocking
//!   channel), and a full queue drops and counts. The gateway's link is not subject to the
//!   broker-listener ACL.
//! * A subscriber task takes everything published to `devices/p2p/+` and the admin
//!   command topics (`xiaozhi/admin/commands[/<mac_>]`) and hands it to
//!   [`Inbound::route`], which delivers to devices and queues commands.
//! * [`Bus`] and [`Inbound`] are the whole interface the rest of the gateway sees; the
//!   external broker of scale-out mode ([`super::external`]) implements the same two.
//! * The broker listener is ours ([`super::clients`]), not rumqttd's: it authenticates
//!   clients against `broker.users` only (device credentials never work there) and checks
//!   every publish and subscription against the user's role ([`super::acl`]).
//!
//! What rumqttd 0.20's router does with what we send it (checked by tests/it/broker_acl.rs):
//! MQTT 5 publish properties (response topic, correlation data, user properties) are kept
//! in its commit log and reach every subscriber, local links included; retained publishes
//! are stored (an empty payload clears them) and sent, with the retain flag, to every new
//! non-shared subscription whatever its v5 retain-handling option.
//!
//! rumqttd has no shutdown API: the broker listener is ours and stops with the gateway's
//! other listeners ([`crate::lifecycle`]: stop accepting, then each client closes with its
//! will published); the subscriber task is aborted; the router thread lives as long as
//! the process (FIELD-NOTES section 3).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use rumqttd::local::{LinkBuilder, LinkRx, LinkTx};
use rumqttd::protocol::{Packet, Publish, PublishProperties};
use rumqttd::{Notification, RouterConfig};
use serde::Deserialize;
use tokio::sync::mpsc::{self, error::TrySendError};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::clients::{BrokerListener, ListenerSettings, MAX_CLIENTS, RouterPort};
use super::inbound::Inbound;
use crate::config::BrokerConfig;
use crate::lifecycle::Lifecycle;
use crate::metrics::Metrics;
use crate::net::{BindError, bind_tcp};
use crate::protocol::topics;

/// The built-in router tunables (`broker-config/router.toml`).
const DEFAULT_ROUTER_TOML: &str = include_str!("../../../../broker-config/router.toml");

/// Name of the gateway's own link into the router. Broker-listener clients can never
/// take it over: their router-side ids carry their role (`admin:<id>`).
const GATEWAY_LINK_ID: &str = "xiaozhi-gateway";

/// Publishes the publisher thread hands the router in one batch.
const PUBLISH_BATCH: usize = 256;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Tunables {
    router: RouterConfig,
    listener: ListenerTunables,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListenerTunables {
    connection_timeout_ms: u16,
    max_payload_size: usize,
    max_inflight_count: usize,
    next_connection_delay_ms: u64,
}

/// Why the broker could not start.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("broker tunables {path}: {reason}")]
    Tunables { path: String, reason: String },
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error("cannot open the gateway's link into the broker router: {0}")]
    Link(String),
    #[error("broker listener TLS (broker.tls_cert / broker.tls_key): {0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error(transparent)]
    External(#[from] super::external::ExternalBusError),
}

/// An admin command published by an admin bus client on `xiaozhi/admin/commands` or
/// `xiaozhi/admin/commands/<mac_>` ([`topics::parse_admin_command`] tells which), or
/// forwarded by another gateway node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BusCommand {
    pub topic: String,
    pub payload: Bytes,
    /// MQTT 5 response topic, when the publisher set one.
    pub response_topic: Option<String>,
    /// MQTT 5 correlation data, when the publisher set it; echo it with
    /// [`Bus::publish_reply`].
    pub correlation_data: Option<Bytes>,
    /// The node that received it and forwarded it here ([`crate::admin::forward`]): run
    /// it here, never forward it again, and reply to `response_topic` as given.
    pub forwarded_by: Option<String>,
}

/// One outgoing message, as queued for whichever broker the bus is.
pub(crate) struct BusMessage {
    pub(crate) topic: String,
    pub(crate) payload: Bytes,
    pub(crate) retain: bool,
    pub(crate) correlation_data: Option<Bytes>,
}

impl BusMessage {
    fn into_packet(self) -> Packet {
        let publish = Publish::new(Bytes::from(self.topic), self.payload, self.retain);
        let properties = self.correlation_data.map(|c| PublishProperties {
            correlation_data: Some(c),
            ..Default::default()
        });
        Packet::Publish(publish, properties)
    }
}

/// A cheap, cloneable handle for publishing onto the bus (QoS 0, from the gateway's own
/// link, which no ACL applies to).
#[derive(Clone)]
pub struct Bus {
    tx: mpsc::Sender<BusMessage>,
    metrics: Arc<Metrics>,
}

impl Bus {
    /// A handle onto the queue a bus backend drains.
    pub(crate) fn new(tx: mpsc::Sender<BusMessage>, metrics: Arc<Metrics>) -> Bus {
        Bus { tx, metrics }
    }

    /// Queues a publish; drops and counts it if the queue is full.
    pub fn publish(&self, topic: String, payload: Bytes) {
        self.enqueue(BusMessage {
            topic,
            payload,
            retain: false,
            correlation_data: None,
        });
    }

    /// Queues a retained publish: the router keeps the last one per topic and sends it to
    /// every later subscriber. An empty payload clears the topic's retained message.
    pub fn publish_retained(&self, topic: String, payload: Bytes) {
        self.enqueue(BusMessage {
            topic,
            payload,
            retain: true,
            correlation_data: None,
        });
    }

    /// Queues a reply carrying the request's MQTT 5 correlation data (when it had any):
    /// MQTT 5 subscribers get it as the publish's correlation data property, 3.1.1
    /// subscribers just the payload.
    pub fn publish_reply(&self, topic: String, payload: Bytes, correlation_data: Option<Bytes>) {
        self.enqueue(BusMessage {
            topic,
            payload,
            retain: false,
            correlation_data,
        });
    }

    fn enqueue(&self, msg: BusMessage) {
        match self.tx.try_send(msg) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Closed(_)) => {
                Metrics::inc(&self.metrics.bus_dropped)
            }
        }
    }
}

/// The running embedded broker.
pub struct EmbeddedBroker {
    /// Publishing handle.
    pub bus: Bus,
    /// Where the broker listener accepts admin/integration clients.
    pub listen_addr: SocketAddr,
    /// Where it accepts them over TLS, when configured, and the certificate it uses.
    pub tls_addr: Option<SocketAddr>,
    pub tls_cert: Option<Arc<crate::tls::ReloadingCert>>,
    subscriber: JoinHandle<()>,
}

impl EmbeddedBroker {
    /// Starts the router, the broker listener (as part of `life`) and the gateway's
    /// link; what the bus delivers goes to `inbound`.
    pub async fn start(
        config: &BrokerConfig,
        inbound: Inbound,
        metrics: Arc<Metrics>,
        life: &Lifecycle,
    ) -> Result<EmbeddedBroker, BrokerError> {
        let tunables = load_tunables(config.router_config.as_deref())?;
        let listener = bind_tcp(config.listen, "broker listener", "broker.listen").await?;
        let listen_addr = listener.local_addr().map_err(|source| BindError {
            what: "broker listener",
            addr: config.listen,
            setting: "broker.listen",
            source,
        })?;
        let tls = match config.tls() {
            Some((cert, key)) => {
                let reloading = crate::tls::ReloadingCert::load(cert, key)?;
                let acceptor = reloading.acceptor()?;
                let l = bind_tcp(
                    config.tls_listen,
                    "broker listener over TLS",
                    "broker.tls_listen",
                )
                .await?;
                let addr = l.local_addr().map_err(|source| BindError {
                    what: "broker listener over TLS",
                    addr: config.tls_listen,
                    setting: "broker.tls_listen",
                    source,
                })?;
                Some((l, acceptor, reloading, addr))
            }
            None => None,
        };
        let router_tx = rumqttd::Router::new(0, tunables.router).spawn();

        let open_tx = router_tx.clone();
        let busy_tx = router_tx.clone();
        let port = RouterPort {
            open: Box::new(move |client_id: &str, clean: bool| {
                LinkBuilder::new(client_id, open_tx.clone())
                    .clean_session(clean)
                    .dynamic_filters(true)
                    .build()
                    .map_err(|e| e.to_string())
            }),
            busy: Box::new(move || busy_tx.is_full()),
        };
        let settings = ListenerSettings {
            connection_timeout: Duration::from_millis(
                tunables.listener.connection_timeout_ms.into(),
            ),
            max_payload_size: tunables.listener.max_payload_size,
            max_batch: tunables.listener.max_inflight_count.max(1),
            next_connection_delay: Duration::from_millis(
                tunables.listener.next_connection_delay_ms,
            ),
            max_clients: MAX_CLIENTS,
            tls_handshake_timeout: Duration::from_secs(config.tls_handshake_timeout_secs),
        };

        let (link_tx, link_rx) = tokio::task::spawn_blocking(move || {
            let (mut tx, rx, _connack) = LinkBuilder::new(GATEWAY_LINK_ID, router_tx)
                .dynamic_filters(true)
                .build()
                .map_err(|e| BrokerError::Link(e.to_string()))?;
            for filter in [
                topics::P2P_FILTER,
                topics::ADMIN_COMMANDS,
                topics::ADMIN_COMMANDS_FILTER,
            ] {
                tx.subscribe(filter)
                    .map_err(|e| BrokerError::Link(e.to_string()))?;
            }
            Ok::<_, BrokerError>((tx, rx))
        })
        .await
        .map_err(|e| BrokerError::Link(e.to_string()))??;

        let (tx, rx) = mpsc::channel::<BusMessage>(config.publish_queue);
        std::thread::Builder::new()
            .name("bus-publisher".into())
            .spawn(move || publish_loop(rx, link_tx))
            .map_err(|e| BrokerError::Link(e.to_string()))?;

        let subscriber = tokio::spawn(deliver(link_rx, inbound));

        // Clients last, so the gateway's subscriptions exist before their first publish.
        let clients = BrokerListener::new(settings, &config.users, port, metrics.clone());
        life.spawn(clients.clone().run(listener, None, life.clone()));
        info!(%listen_addr, "broker listener for admin/integration clients");
        let (tls_addr, tls_cert) = match tls {
            Some((l, acceptor, reloading, addr)) => {
                info!(%addr, "broker listener over TLS");
                life.spawn(clients.run(l, Some(acceptor), life.clone()));
                (Some(addr), Some(reloading))
            }
            None => (None, None),
        };
        Ok(EmbeddedBroker {
            bus: Bus::new(tx, metrics),
            listen_addr,
            tls_addr,
            tls_cert,
            subscriber,
        })
    }

    /// Stops delivering bus messages (the broker listener stops with its lifecycle).
    pub fn stop(&self) {
        self.subscriber.abort();
    }
}

impl Drop for EmbeddedBroker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The publisher thread: hands queued messages to the router, a batch per router event.
fn publish_loop(mut rx: mpsc::Receiver<BusMessage>, mut link_tx: LinkTx) {
    while let Some(first) = rx.blocking_recv() {
        let mut last = first.into_packet();
        {
            let mut buffer = link_tx.buffer();
            for _ in 1..PUBLISH_BATCH {
                let Ok(next) = rx.try_recv() else { break };
                buffer.push_back(std::mem::replace(&mut last, next.into_packet()));
            }
        }
        // `send` is an async fn without await points (it notifies the router with a
        // blocking channel send, fine on this thread): it completes on first poll.
        match link_tx.send(last).now_or_never() {
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                warn!(error = %e, "bus publisher lost the router; stopping");
                break;
            }
            None => {
                warn!("bus publisher: router link send did not complete; stopping");
                break;
            }
        }
    }
}

fn load_tunables(path: Option<&Path>) -> Result<Tunables, BrokerError> {
    let (name, text) = match path {
        Some(p) => (
            p.display().to_string(),
            std::fs::read_to_string(p).map_err(|e| BrokerError::Tunables {
                path: p.display().to_string(),
                reason: e.to_string(),
            })?,
        ),
        None => (
            "<built-in broker-config/router.toml>".to_owned(),
            DEFAULT_ROUTER_TOML.to_owned(),
        ),
    };
    use figment::providers::Format;
    figment::Figment::from(figment::providers::Toml::string(&text))
        .extract()
        .map_err(|e| BrokerError::Tunables {
            path: name,
            reason: e.to_string(),
        })
}

/// Hands everything the gateway's link receives to [`Inbound::route`].
async fn deliver(mut link_rx: LinkRx, inbound: Inbound) {
    loop {
        match link_rx.next().await {
            Ok(Some(Notification::Forward(forward))) => {
                let publish = forward.publish;
                let Ok(topic) = std::str::from_utf8(&publish.topic) else {
                    continue;
                };
                let (response_topic, correlation_data) = forward
                    .properties
                    .map(|p| (p.response_topic, p.correlation_data))
                    .unwrap_or_default();
                inbound.route(topic, publish.payload, response_topic, correlation_data);
            }
            // Without this the router stops scheduling the link (FIELD-NOTES section 3).
            Ok(Some(Notification::Unschedule)) => {
                if link_rx.wake().await.is_err() {
                    break;
                }
            }
            Ok(_) => {}
            Err(e) => {
                warn!(error = %e, "bus subscriber lost the router");
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_tunables_parse() {
        let t = load_tunables(None).unwrap();
        assert_eq!(t.router.max_segment_size, 262_144);
    }
}
