//! The bus: an embedded rumqttd router, its MQTT listener for admin and integration
//! clients, and the gateway's own link into it.
//!
//! * [`Bus::publish`] puts device traffic on identity-bearing topics. It never blocks the
//!   caller: messages go through a bounded queue to one publisher thread (rumqttd's local
//!   link sends to the router with a blocking channel), and a full queue drops and counts.
//! * A subscriber task takes everything published to `devices/p2p/+` and delivers it to
//!   the device through the [`DeviceRegistry`], whether or not the device subscribed.
//! * The listener authenticates clients against `broker.users` only, so device
//!   credentials never work there.
//!
//! rumqttd has no shutdown API: the listener task is owned here and aborted, the router
//! thread lives as long as the process (FIELD-NOTES section 3).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};

use bytes::Bytes;
use rumqttd::local::{LinkBuilder, LinkRx};
use rumqttd::{ConnectionSettings, Notification, RouterConfig, ServerSettings};
use serde::Deserialize;
use subtle::ConstantTimeEq;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::registry::DeviceRegistry;
use super::topics;
use crate::config::{BrokerConfig, BrokerUser};
use crate::metrics::Metrics;
use crate::server::{BindError, check_tcp_bind};

/// The built-in router tunables (`broker-config/router.toml`).
const DEFAULT_ROUTER_TOML: &str = include_str!("../../broker-config/router.toml");

/// Name of the gateway's own link into the router.
const GATEWAY_LINK_ID: &str = "xiaozhi-gateway";

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
}

struct BusMessage {
    topic: String,
    payload: Bytes,
}

/// A cheap, cloneable handle for publishing onto the bus.
#[derive(Clone)]
pub struct Bus {
    tx: SyncSender<BusMessage>,
    metrics: Arc<Metrics>,
}

impl Bus {
    /// Queues a QoS 0 publish; drops and counts it if the queue is full.
    pub fn publish(&self, topic: String, payload: Bytes) {
        match self.tx.try_send(BusMessage { topic, payload }) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
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
    listener: JoinHandle<()>,
    subscriber: JoinHandle<()>,
}

impl EmbeddedBroker {
    /// Starts the router, the broker listener and the gateway's link.
    pub async fn start(
        config: &BrokerConfig,
        registry: Arc<DeviceRegistry>,
        metrics: Arc<Metrics>,
    ) -> Result<EmbeddedBroker, BrokerError> {
        let tunables = load_tunables(config.router_config.as_deref())?;
        let router_tx = rumqttd::Router::new(0, tunables.router).spawn();

        // rumqttd binds inside `start` and reports failure only in a log line, so check
        // the port here first (and resolve port 0 to a concrete one).
        let listen_addr = check_tcp_bind(config.listen, "broker listener", "broker.listen")?;
        let users = Arc::new(config.users.clone());
        let mut connections = ConnectionSettings {
            connection_timeout_ms: tunables.listener.connection_timeout_ms,
            max_payload_size: tunables.listener.max_payload_size,
            max_inflight_count: tunables.listener.max_inflight_count,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        };
        connections.set_auth_handler(move |_client_id, username, password| {
            let users = users.clone();
            async move { broker_user_matches(&users, &username, &password) }
        });
        let settings = ServerSettings {
            name: "broker".into(),
            listen: listen_addr,
            tls: None,
            next_connection_delay_ms: tunables.listener.next_connection_delay_ms,
            connections,
        };
        let mut server =
            rumqttd::Server::new(settings, router_tx.clone(), rumqttd::protocol::v4::V4);
        let listener = tokio::spawn(async move {
            if let Err(e) = server.start(rumqttd::LinkType::Remote).await {
                tracing::error!(error = %e, "broker listener stopped");
            }
        });
        info!(%listen_addr, "broker listener for admin/integration clients");

        let (link_tx, link_rx) = tokio::task::spawn_blocking(move || {
            let (mut tx, rx, _connack) = LinkBuilder::new(GATEWAY_LINK_ID, router_tx)
                .dynamic_filters(true)
                .build()
                .map_err(|e| BrokerError::Link(e.to_string()))?;
            tx.subscribe(topics::P2P_FILTER)
                .map_err(|e| BrokerError::Link(e.to_string()))?;
            Ok::<_, BrokerError>((tx, rx))
        })
        .await
        .map_err(|e| BrokerError::Link(e.to_string()))??;

        let (tx, rx) = sync_channel::<BusMessage>(config.publish_queue);
        std::thread::Builder::new()
            .name("bus-publisher".into())
            .spawn(move || {
                let mut link_tx = link_tx;
                while let Ok(msg) = rx.recv() {
                    if let Err(e) = link_tx.publish(msg.topic, msg.payload) {
                        warn!(error = %e, "bus publisher lost the router; stopping");
                        break;
                    }
                }
            })
            .map_err(|e| BrokerError::Link(e.to_string()))?;

        let subscriber = tokio::spawn(deliver_p2p(link_rx, registry));
        Ok(EmbeddedBroker {
            bus: Bus { tx, metrics },
            listen_addr,
            listener,
            subscriber,
        })
    }

    /// Stops accepting broker clients and delivering bus messages.
    pub fn stop(&self) {
        self.listener.abort();
        self.subscriber.abort();
    }
}

impl Drop for EmbeddedBroker {
    fn drop(&mut self) {
        self.stop();
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

fn broker_user_matches(users: &[BrokerUser], username: &str, password: &str) -> bool {
    // Compare against every user so timing does not reveal which usernames exist.
    let mut ok = false;
    for user in users {
        let name = user.username.as_bytes().ct_eq(username.as_bytes());
        let pass = user.password.as_bytes().ct_eq(password.as_bytes());
        ok |= bool::from(name & pass);
    }
    if !ok {
        debug!(username, "broker client refused");
    }
    ok
}

/// Delivers everything published on `devices/p2p/+` to the addressed device.
async fn deliver_p2p(mut link_rx: LinkRx, registry: Arc<DeviceRegistry>) {
    loop {
        match link_rx.next().await {
            Ok(Some(Notification::Forward(forward))) => {
                let publish = forward.publish;
                let Some(mac) = std::str::from_utf8(&publish.topic)
                    .ok()
                    .and_then(topics::parse_p2p)
                else {
                    continue;
                };
                // Drops (device offline, queue full) are counted by the registry.
                let _ = registry.send(&mac, publish.payload);
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

    #[test]
    fn user_match_needs_both_fields() {
        let users = vec![BrokerUser {
            username: "admin".into(),
            password: "pw".into(),
            role: Default::default(),
        }];
        assert!(broker_user_matches(&users, "admin", "pw"));
        assert!(!broker_user_matches(&users, "admin", "PW"));
        assert!(!broker_user_matches(&users, "other", "pw"));
        assert!(!broker_user_matches(&[], "", ""));
    }
}
