//! The bus on an external MQTT broker (EMQX, Mosquitto): scale-out mode.
//!
//! The gateway is then an ordinary client of the broker (rumqttc), and the broker does
//! the distributed work. Two tasks, both owned by [`ExternalBus`]:
//!
//! * The **driver** keeps the connection: it polls rumqttc's event loop, reconnects with
//!   doubling backoff (up to `bus.reconnect_max_secs`), subscribes again after every
//!   CONNACK (the session is clean, so a restarted broker loses nothing we rely on), and
//!   hands every publish it receives to [`Inbound::route`], the same routing the
//!   embedded broker uses. MQTT 5 is tried first; in `auto` mode a broker that refuses
//!   version 5 is spoken to in 3.1.1 from then on (commands then carry their reply
//!   address in `reply_to`, since 3.1.1 has no response topic).
//! * The **pump** takes the gateway's outgoing messages from the [`Bus`] queue and
//!   hands them to the client. While the broker is away the client's own small request
//!   channel fills, the pump waits, the bounded bus queue fills behind it, and further
//!   messages are dropped and counted (`xiaozhi_bus_drops_total`); `xiaozhi_bus_queued`
//!   shows the backlog and `xiaozhi_bus_disconnects_total` the gaps. Nothing blocks the
//!   device paths.
//!
//! Subscriptions ([`subscriptions`]): `devices/p2p/+` (each node delivers what is for its
//! own devices), the two admin command topics through the shared subscription
//! `$share/<bus.share_group>/...` (each command reaches one node, which forwards it if
//! needed: [`crate::admin::forward`]), and the node's own `xiaozhi/nodes/<node>/...`.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::bus::{Bus, BusMessage};
use super::inbound::Inbound;
use crate::config::{BusConfig, BusProtocol};
use crate::metrics::Metrics;
use crate::protocol::topics;

/// Requests rumqttc buffers between the pump and the connection.
const CLIENT_CHANNEL: usize = 256;

/// First pause before reconnecting; doubles up to `bus.reconnect_max_secs`.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);

/// Seconds the client waits for the broker's CONNACK.
const CONNECT_TIMEOUT_SECS: u64 = 5;

/// Largest packet taken from the broker (admin commands and MCP payloads are small).
const MAX_INCOMING_PACKET: usize = 1 << 20;

/// TCP settings of the broker connection. No Nagle: commands and replies are small
/// messages that must not wait for the previous one's ACK (with Nagle on, a forwarded
/// command's round trip measured 88 ms instead of under 1 ms: delayed ACKs).
fn network_options() -> rumqttc::NetworkOptions {
    let mut options = rumqttc::NetworkOptions::new();
    options.set_tcp_nodelay(true);
    options.set_connection_timeout(CONNECT_TIMEOUT_SECS);
    options
}

/// Why the external bus could not start.
#[derive(Debug, thiserror::Error)]
pub enum ExternalBusError {
    #[error("bus.url {url:?}: {reason}")]
    Url { url: String, reason: String },
}

/// The filters a node subscribes to.
pub fn subscriptions(node: &str, share_group: &str) -> Vec<String> {
    vec![
        topics::P2P_FILTER.to_owned(),
        topics::shared(share_group, topics::ADMIN_COMMANDS),
        topics::shared(share_group, topics::ADMIN_COMMANDS_FILTER),
        topics::node_commands(node),
        topics::node_replies_filter(node),
        topics::node_calls(node),
        topics::node_call_audio_filter(node),
        topics::EVENTS_PUSH.to_owned(),
    ]
}

/// The running connection to the external broker.
pub struct ExternalBus {
    /// Publishing handle.
    pub bus: Bus,
    /// `host:port` of the broker, for logs and operators.
    pub broker: String,
    driver: JoinHandle<()>,
    pump: JoinHandle<()>,
}

impl ExternalBus {
    /// Starts connecting (in the background: a broker that is away at start is retried
    /// like one that goes away later).
    pub fn start(
        config: &BusConfig,
        node: &str,
        queue: usize,
        inbound: Inbound,
        metrics: Arc<Metrics>,
    ) -> Result<ExternalBus, ExternalBusError> {
        let (host, port) = config
            .broker_address()
            .map_err(|reason| ExternalBusError::Url {
                url: config.url.clone(),
                reason,
            })?;
        let (tx, rx) = mpsc::channel(queue);
        let (client_tx, client_rx) = watch::channel(None);
        let settings = Settings {
            host: host.clone(),
            port,
            client_id: format!("xiaozhi-gateway-{node}"),
            credentials: config.username.clone().map(|u| {
                let p = config.password.clone().unwrap_or_default();
                (u, p)
            }),
            keep_alive: Duration::from_secs(config.keep_alive_secs),
            reconnect_max: Duration::from_secs(config.reconnect_max_secs).max(FIRST_BACKOFF),
            filters: subscriptions(node, &config.share_group),
        };
        let driver = tokio::spawn(drive(
            settings,
            config.protocol,
            client_tx,
            inbound,
            metrics.clone(),
        ));
        let pump = tokio::spawn(pump(rx, client_rx, metrics.clone()));
        let broker = format!("{host}:{port}");
        info!(%broker, node, "bus on an external MQTT broker");
        Ok(ExternalBus {
            bus: Bus::new(tx, metrics),
            broker,
            driver,
            pump,
        })
    }

    /// Stops talking to the broker.
    pub fn stop(&self) {
        self.driver.abort();
        self.pump.abort();
    }
}

impl Drop for ExternalBus {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Settings {
    host: String,
    port: u16,
    client_id: String,
    credentials: Option<(String, String)>,
    keep_alive: Duration,
    reconnect_max: Duration,
    filters: Vec<String>,
}

/// A connected (or connecting) client of either MQTT version.
#[derive(Clone)]
enum Client {
    V5(rumqttc::v5::AsyncClient),
    V311(rumqttc::AsyncClient),
}

impl Client {
    async fn publish(&self, msg: BusMessage) -> bool {
        match self {
            Client::V5(c) => {
                use rumqttc::v5::mqttbytes::QoS;
                use rumqttc::v5::mqttbytes::v5::PublishProperties;
                // No properties encode as an empty property block, as a plain publish.
                let properties = PublishProperties {
                    correlation_data: msg.correlation_data,
                    ..Default::default()
                };
                c.publish_with_properties(
                    msg.topic,
                    QoS::AtMostOnce,
                    msg.retain,
                    msg.payload,
                    properties,
                )
                .await
                .is_ok()
            }
            Client::V311(c) => c
                .publish_bytes(msg.topic, rumqttc::QoS::AtMostOnce, msg.retain, msg.payload)
                .await
                .is_ok(),
        }
    }
}

/// Hands queued messages to the current client.
async fn pump(
    mut rx: mpsc::Receiver<BusMessage>,
    mut client: watch::Receiver<Option<Client>>,
    metrics: Arc<Metrics>,
) {
    while let Some(msg) = rx.recv().await {
        Metrics::set(&metrics.bus_queued, rx.len() as u64);
        let current = loop {
            if let Some(c) = client.borrow_and_update().clone() {
                break c;
            }
            if client.changed().await.is_err() {
                return;
            }
        };
        if !current.publish(msg).await {
            // The client was replaced (protocol fallback) while this one waited.
            Metrics::inc(&metrics.bus_dropped);
        }
    }
}

/// What ended one client's life.
enum SessionEnd {
    /// The broker refused MQTT 5: speak 3.1.1.
    FallBack,
}

/// Keeps a client connected for the life of the gateway.
async fn drive(
    settings: Settings,
    protocol: BusProtocol,
    client: watch::Sender<Option<Client>>,
    inbound: Inbound,
    metrics: Arc<Metrics>,
) {
    let mut v5 = protocol != BusProtocol::V311;
    loop {
        let end = if v5 {
            drive_v5(
                &settings,
                protocol == BusProtocol::Auto,
                &client,
                &inbound,
                &metrics,
            )
            .await
        } else {
            drive_v311(&settings, &client, &inbound, &metrics).await
        };
        match end {
            SessionEnd::FallBack => {
                warn!(broker = %format!("{}:{}", settings.host, settings.port), "the bus broker refused MQTT 5; speaking MQTT 3.1.1 (admin replies then go to reply_to or xiaozhi/admin/replies/<request_id>)");
                v5 = false;
            }
        }
    }
}

/// Doubling pauses between reconnects, reset by a successful connection.
struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    fn new(max: Duration) -> Self {
        Backoff {
            next: FIRST_BACKOFF,
            max,
        }
    }

    fn reset(&mut self) {
        self.next = FIRST_BACKOFF;
    }

    async fn pause(&mut self) {
        tokio::time::sleep(self.next).await;
        self.next = (self.next * 2).min(self.max);
    }
}

/// Bookkeeping shared by both versions when the connection comes and goes.
struct Link<'a> {
    connected: bool,
    backoff: Backoff,
    settings: &'a Settings,
    metrics: &'a Metrics,
}

impl<'a> Link<'a> {
    fn new(settings: &'a Settings, metrics: &'a Metrics) -> Self {
        Link {
            connected: false,
            backoff: Backoff::new(settings.reconnect_max),
            settings,
            metrics,
        }
    }

    fn up(&mut self, version: &str) {
        self.connected = true;
        self.backoff.reset();
        Metrics::set(&self.metrics.bus_connected, 1);
        info!(broker = %format!("{}:{}", self.settings.host, self.settings.port), version, "bus broker connected");
    }

    async fn down(&mut self, error: String) {
        if self.connected {
            warn!(broker = %format!("{}:{}", self.settings.host, self.settings.port), %error, "bus broker connection lost; reconnecting");
        } else {
            warn!(broker = %format!("{}:{}", self.settings.host, self.settings.port), %error, "bus broker not reachable; retrying");
        }
        self.connected = false;
        Metrics::set(&self.metrics.bus_connected, 0);
        Metrics::inc(&self.metrics.bus_disconnects);
        self.backoff.pause().await;
    }
}

async fn drive_v5(
    settings: &Settings,
    may_fall_back: bool,
    client: &watch::Sender<Option<Client>>,
    inbound: &Inbound,
    metrics: &Metrics,
) -> SessionEnd {
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode, Filter, Packet};
    use rumqttc::v5::{AsyncClient, ConnectionError, Event, MqttOptions};

    let mut options = MqttOptions::new(&settings.client_id, &settings.host, settings.port);
    options
        .set_keep_alive(settings.keep_alive)
        .set_clean_start(true)
        .set_connection_timeout(CONNECT_TIMEOUT_SECS)
        .set_max_packet_size(Some(MAX_INCOMING_PACKET as u32))
        .set_network_options(network_options());
    if let Some((u, p)) = &settings.credentials {
        options.set_credentials(u, p);
    }
    let (c, mut events) = AsyncClient::new(options, CLIENT_CHANNEL);
    client.send_replace(Some(Client::V5(c.clone())));
    let mut link = Link::new(settings, metrics);
    let mut ever_connected = false;
    loop {
        match events.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                ever_connected = true;
                link.up("5");
                let filters: Vec<Filter> = settings
                    .filters
                    .iter()
                    .map(|f| Filter::new(f.clone(), QoS::AtMostOnce))
                    .collect();
                let c = c.clone();
                // From another task: the request waits for channel room that only this
                // loop's polling makes.
                tokio::spawn(async move { c.subscribe_many(filters).await });
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let Ok(topic) = std::str::from_utf8(&p.topic) else {
                    continue;
                };
                let (response_topic, correlation_data) = p
                    .properties
                    .map(|props| (props.response_topic, props.correlation_data))
                    .unwrap_or_default();
                inbound.route(topic, p.payload, response_topic, correlation_data);
            }
            Ok(_) => {}
            Err(e) => {
                let refused_v5 = matches!(
                    e,
                    ConnectionError::ConnectionRefused(
                        ConnectReturnCode::UnsupportedProtocolVersion
                    )
                ) || (!ever_connected
                    && matches!(
                        e,
                        ConnectionError::MqttState(_) | ConnectionError::NotConnAck(_)
                    ));
                if may_fall_back && refused_v5 {
                    // A refused connection, like any other (the counter's meaning).
                    Metrics::inc(&metrics.bus_disconnects);
                    client.send_replace(None);
                    return SessionEnd::FallBack;
                }
                link.down(e.to_string()).await;
            }
        }
    }
}

async fn drive_v311(
    settings: &Settings,
    client: &watch::Sender<Option<Client>>,
    inbound: &Inbound,
    metrics: &Metrics,
) -> SessionEnd {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, SubscribeFilter};

    let mut options = MqttOptions::new(&settings.client_id, &settings.host, settings.port);
    options
        .set_keep_alive(settings.keep_alive)
        .set_clean_session(true)
        .set_max_packet_size(MAX_INCOMING_PACKET, MAX_INCOMING_PACKET);
    if let Some((u, p)) = &settings.credentials {
        options.set_credentials(u, p);
    }
    let (c, mut events) = AsyncClient::new(options, CLIENT_CHANNEL);
    events.set_network_options(network_options());
    client.send_replace(Some(Client::V311(c.clone())));
    let mut link = Link::new(settings, metrics);
    loop {
        match events.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                link.up("3.1.1");
                let filters: Vec<SubscribeFilter> = settings
                    .filters
                    .iter()
                    .map(|f| SubscribeFilter::new(f.clone(), QoS::AtMostOnce))
                    .collect();
                let c = c.clone();
                tokio::spawn(async move { c.subscribe_many(filters).await });
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                inbound.route(&p.topic, Bytes::clone(&p.payload), None, None);
            }
            Ok(_) => {}
            Err(e) => link.down(e.to_string()).await,
        }
    }
}
