//! Wires the parts together and owns their lifetimes: [`Gateway::start`] binds every
//! listener (failing with an error that names the port and the setting that moves it),
//! and [`Gateway::shutdown`] takes it down in an order that lets live conversations say
//! goodbye: stop accepting, end conversations (goodbyes queued), let connections flush
//! their queues and close, then stop the rest, all within `shutdown.grace_secs`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::audio::AudioSocket;
use crate::broker::backend::BusBackend;
use crate::broker::bus::BrokerError;
use crate::broker::registry::DeviceRegistry;
use crate::config::{Config, PipelineKind};
use crate::device_link::mcp::McpSettings;
use crate::front_end::FrontEnd;
use crate::lifecycle::Lifecycle;
use crate::metrics::Metrics;
use crate::net::{BindError, bind_tcp};
use crate::pipeline::Pipeline;
use crate::pipeline::echo::EchoPipeline;
use crate::pipeline::xiaozhi::XiaozhiPipeline;
use crate::presence::hints::DeviceHints;
use crate::presence::tracker::{PresenceTracker, TrackerSettings, TrackerTask};
use crate::presence::{PresenceStore, Ttls};
use crate::protocol::device_mqtt::DeviceMqttSettings;
use crate::session::directory::DeviceDirectory;
use crate::session::{SessionDeps, SessionManager};

/// Binds the QUIC audio endpoint with the configured or a self-signed certificate.
fn bind_quic(
    config: &Config,
    metrics: Arc<Metrics>,
) -> Result<
    (
        crate::audio::quic::QuicEndpoint,
        crate::audio::quic::QuicHandle,
        Option<Arc<crate::tls::ReloadingCert>>,
    ),
    StartError,
> {
    use crate::audio::quic::cert::ServerIdentity;
    let (identity, reloading) = match (&config.quic.cert_path, &config.quic.key_path) {
        (Some(cert), Some(key)) => {
            let reloading = crate::tls::ReloadingCert::load(cert, key)
                .map_err(|e| StartError::QuicCert(e.to_string()))?;
            (ServerIdentity::Files(reloading.clone()), Some(reloading))
        }
        _ => (
            ServerIdentity::generate(&config.udp.public_host)
                .map_err(|e| StartError::QuicCert(e.to_string()))?,
            None,
        ),
    };
    let (endpoint, handle) = crate::audio::quic::QuicEndpoint::bind(
        crate::audio::quic::endpoint::QuicSettings {
            listen: config.quic.listen,
            public_port: config.quic.public_port,
            identity,
            token_ttl: Duration::from_secs(config.quic.token_ttl_secs),
            uplink_queue: config.udp.uplink_queue,
            recv_buffer_bytes: config.udp.recv_buffer_bytes,
            send_buffer_bytes: config.udp.send_buffer_bytes,
            max_connections: config.quic.max_connections,
            rate: config.udp.channel_rate,
            burst: config.udp.channel_burst,
            control_rate: config.mqtt.message_rate,
            control_burst: config.mqtt.message_burst,
        },
        metrics,
    )?;
    Ok((endpoint, handle, reloading))
}

/// Checks that a TCP address can be bound (for listeners that bind it themselves) and
/// resolves port 0 to a concrete free port.
pub fn check_tcp_bind(
    addr: SocketAddr,
    what: &'static str,
    setting: &'static str,
) -> Result<SocketAddr, BindError> {
    let l = std::net::TcpListener::bind(addr).map_err(|source| BindError {
        what,
        addr,
        setting,
        source,
    })?;
    l.local_addr().map_err(|source| BindError {
        what,
        addr,
        setting,
        source,
    })
}

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("device TLS (mqtt.tls_cert / mqtt.tls_key): {0}")]
    Tls(String),
    #[error("QUIC certificate (quic.cert_path / quic.key_path): {0}")]
    QuicCert(String),
    #[error("chat history (history.*): {0}")]
    History(String),
    #[error("presence (presence.*): {0}")]
    Presence(String),
    #[error("OTA (ota.mqtt_endpoint / ota.mqtt_tls): {0}")]
    Ota(#[from] crate::http::ota::EndpointError),
}

/// The addresses actually bound (ports resolved).
#[derive(Debug, Clone, Copy)]
pub struct BoundAddrs {
    pub mqtt: SocketAddr,
    pub mqtt_tls: Option<SocketAddr>,
    /// The embedded broker's listener for admin clients (`None` on an external bus).
    pub broker: Option<SocketAddr>,
    /// The broker listener over TLS, when configured.
    pub broker_tls: Option<SocketAddr>,
    pub udp: SocketAddr,
    /// The QUIC audio endpoint, when `quic.enabled`.
    pub quic: Option<SocketAddr>,
    pub http: SocketAddr,
}

/// A running gateway.
pub struct Gateway {
    pub addrs: BoundAddrs,
    pub metrics: Arc<Metrics>,
    pub registry: Arc<DeviceRegistry>,
    /// What each connected device is doing (status, MCP, conversation).
    pub directory: Arc<DeviceDirectory>,
    /// This node's presence writer (and the store readers use).
    pub presence: PresenceTracker,
    /// Pushes to devices (`push.enabled`).
    pub push: Option<Arc<crate::push::PushService>>,
    presence_task: Option<TrackerTask>,
    /// Every stored chat-history record, for live consumers.
    pub history_events: tokio::sync::broadcast::Sender<crate::history::writer::StoredEvent>,
    history_stop: CancellationToken,
    history_task: Option<JoinHandle<()>>,
    sessions: SessionManager,
    broker: BusBackend,
    /// The device MQTT (plain and TLS), QUIC and broker listeners and their connections.
    listeners: Lifecycle,
    /// The HTTP listener and its connections, stopped last.
    http: Lifecycle,
    stop_rest: CancellationToken,
    background: Vec<JoinHandle<()>>,
    grace: Duration,
}

/// Source addresses the device listener's admission table remembers at most (about
/// 100 bytes each).
const ADMISSION_MAX_SOURCES: usize = 100_000;

impl Gateway {
    /// Binds everything and starts serving.
    pub async fn start(config: Config) -> Result<Gateway, StartError> {
        for warning in config.warnings() {
            warn!("{warning}");
        }
        let metrics = Arc::new(Metrics::default());
        let registry = Arc::new(DeviceRegistry::new(
            config.mqtt.outbound_queue,
            metrics.clone(),
        ));

        let mqtt_listener = bind_tcp(config.mqtt.listen, "device MQTT", "mqtt.listen").await?;
        let tls = match config.device_tls() {
            Some((cert, key)) => {
                let reloading = crate::tls::ReloadingCert::load(cert, key)
                    .map_err(|e| StartError::Tls(e.to_string()))?;
                let acceptor = reloading
                    .acceptor()
                    .map_err(|e| StartError::Tls(e.to_string()))?;
                let l = bind_tcp(
                    config.mqtt.tls_listen,
                    "device MQTT over TLS",
                    "mqtt.tls_listen",
                )
                .await?;
                Some((l, acceptor, reloading))
            }
            None => None,
        };
        let (audio_socket, audio) = AudioSocket::bind(
            crate::audio::socket::SocketOptions {
                listen: config.udp.listen,
                shards: config.udp.effective_shards(),
                recv_buffer: config.udp.recv_buffer_bytes,
                send_buffer: config.udp.send_buffer_bytes,
            },
            crate::audio::socket::ChannelLimits {
                uplink_queue: config.udp.uplink_queue,
                rate: config.udp.channel_rate,
                burst: config.udp.channel_burst,
            },
            metrics.clone(),
        )?;
        let quic = match config.quic.enabled {
            true => Some(bind_quic(&config, metrics.clone())?),
            false => None,
        };
        let http_listener = bind_tcp(config.http.listen, "HTTP", "http.listen").await?;
        // Device calling: the legs' switchboard and the service's queues exist before the
        // bus, which delivers other nodes' call traffic to them.
        let call_legs = Arc::new(crate::session::call_leg::CallLegs::new(metrics.clone()));
        let (call_events, call_actions, call_inputs) = crate::calls::channels();
        let external_bus = config.bus.mode == crate::config::BusMode::External;
        let call_traffic: Option<Arc<dyn crate::broker::inbound::CallTraffic>> =
            (external_bus && config.calls.enabled).then(|| {
                Arc::new(crate::calls::cluster::ClusterInbound {
                    legs: call_legs.clone(),
                    actions: call_actions,
                    metrics: metrics.clone(),
                }) as Arc<dyn crate::broker::inbound::CallTraffic>
            });
        // Every listener stops the same way (crate::lifecycle): the device-facing ones and
        // the broker listener as one, HTTP last.
        let listeners = Lifecycle::new();
        let http_life = Lifecycle::new();
        // Pushes queued on other nodes: their batch ids, from the bus to this node's
        // delivery.
        let (push_batches, remote_push_batches) =
            tokio::sync::mpsc::channel(crate::push::delivery::HINT_QUEUE);
        let (broker, bus_commands, pending_calls) = BusBackend::start(
            &config,
            registry.clone(),
            call_traffic,
            (external_bus && config.push.enabled).then_some(push_batches),
            metrics.clone(),
            &listeners,
        )
        .await?;
        if external_bus {
            call_legs.connect_cluster(broker.bus().clone(), config.node.id.clone());
        }

        let udp_addr = audio.local_addr();
        let pipeline: Arc<dyn Pipeline> = match config.pipeline_kind() {
            PipelineKind::Xiaozhi => Arc::new(XiaozhiPipeline::new(
                config.pipeline.xiaozhi.clone(),
                metrics.clone(),
            )),
            PipelineKind::Echo | PipelineKind::Auto => Arc::new(EchoPipeline::new(
                config.pipeline.echo.clone(),
                metrics.clone(),
            )),
        };
        let (history_events, _) = tokio::sync::broadcast::channel(1024);
        let history_stop = CancellationToken::new();
        let history = match config.history.enabled {
            true => Some(
                start_history(
                    &config,
                    metrics.clone(),
                    history_events.clone(),
                    history_stop.clone(),
                )
                .await?,
            ),
            false => None,
        };
        let (history, history_task, history_store) = match history {
            Some((handle, task, store)) => (Some(handle), Some(task), Some(store)),
            None => (None, None, None),
        };
        let hints = Arc::new(DeviceHints::default());
        let (presence, presence_task) = start_presence(
            &config,
            hints.clone(),
            broker.bus().clone(),
            history_store.clone(),
            metrics.clone(),
        )
        .await?;
        let directory = Arc::new(DeviceDirectory::new(Some(presence.clone())));
        let events = crate::events::EventPublisher::new(broker.bus().clone(), &config.node.id);
        let sessions = SessionManager::start(SessionDeps {
            pipeline,
            audio,
            quic: quic.as_ref().map(|(_, handle, _)| handle.clone()),
            transports: crate::session::TransportPolicy {
                udp_aead: config.transport.udp_aead,
                require_authenticated: config
                    .transport
                    .require_authenticated
                    .iter()
                    .cloned()
                    .collect(),
            },
            sink: registry.clone(),
            metrics: metrics.clone(),
            udp_public_host: config.udp.public_host.clone(),
            udp_public_port: if config.udp.public_port == 0 {
                udp_addr.port()
            } else {
                config.udp.public_port
            },
            idle_timeout: config.udp_idle_timeout(),
            directory: directory.clone(),
            history,
            history_max_utterance_ms: config.history.max_utterance_secs.saturating_mul(1000),
            events: Some(events.clone()),
            call_legs: call_legs.clone(),
            call_events: config.calls.enabled.then_some(call_events),
            mcp: McpSettings {
                setup: config.mcp.setup,
                max_tools: config.mcp.max_tools,
                setup_timeout: Duration::from_secs(config.mcp.timeout_secs),
                max_pending: config.mcp.max_pending,
                ..McpSettings::default()
            },
        });

        let calls = match config.calls.enabled {
            true => Some(start_calls(
                &config,
                sessions.clone(),
                directory.clone(),
                registry.clone(),
                presence.clone(),
                call_legs.clone(),
                broker.bus().clone(),
                metrics.clone(),
            )?),
            false => None,
        };

        let front_end = Arc::new(FrontEnd {
            settings: DeviceMqttSettings {
                connect_timeout: Duration::from_secs(config.mqtt.connect_timeout_secs),
                default_keep_alive: Duration::from_secs(config.mqtt.default_keep_alive_secs),
                uplink_topic: config.mqtt.uplink_topic.clone(),
            },
            verifier: config.verifier(),
            max_packet_bytes: config.mqtt.max_packet_bytes,
            tls_handshake_timeout: Duration::from_secs(config.mqtt.tls_handshake_timeout_secs),
            registry: registry.clone(),
            bus: broker.bus().clone(),
            sessions: sessions.clone(),
            metrics: metrics.clone(),
            permits: Arc::new(Semaphore::new(config.mqtt.max_connections)),
            admission: crate::limits::admission::SharedAdmission::new(
                crate::limits::AdmissionLimits {
                    max_per_source: config.mqtt.max_connections_per_source,
                    connect_rate: config.mqtt.connect_rate_per_source,
                    connect_burst: config.mqtt.connect_burst_per_source,
                    max_sources: ADMISSION_MAX_SOURCES,
                },
            ),
            message_rate: config.mqtt.message_rate,
            message_burst: config.mqtt.message_burst,
        });

        let stop_rest = CancellationToken::new();
        let mut background = Vec::new();

        let addrs = BoundAddrs {
            mqtt: mqtt_listener.local_addr().map_err(|source| BindError {
                what: "device MQTT",
                addr: config.mqtt.listen,
                setting: "mqtt.listen",
                source,
            })?,
            mqtt_tls: tls.as_ref().and_then(|(l, _, _)| l.local_addr().ok()),
            broker: broker.listen_addr(),
            broker_tls: broker.tls_addr(),
            udp: udp_addr,
            quic: quic.as_ref().map(|(_, handle, _)| handle.local_addr()),
            http: http_listener.local_addr().map_err(|source| BindError {
                what: "HTTP",
                addr: config.http.listen,
                setting: "http.listen",
                source,
            })?,
        };
        // Devices provisioned here must reach a listener that speaks what the firmware
        // will assume from the port (TLS exactly on 8883): refuse to start otherwise.
        let ota_endpoint = if config.ota.enabled {
            crate::http::ota::ota_endpoint(
                &config,
                crate::http::ota::MqttPorts {
                    plain: addrs.mqtt.port(),
                    tls: addrs.mqtt_tls.map(|a| a.port()),
                },
            )?
        } else {
            String::new()
        };

        listeners.spawn(
            front_end
                .clone()
                .run_listener(mqtt_listener, None, listeners.clone()),
        );
        let mut reloadable = Vec::new();
        if let Some(cert) = broker.tls_cert() {
            reloadable.push(("broker listener over TLS", cert));
        }
        if let Some((listener, acceptor, reloading)) = tls {
            reloadable.push(("device MQTT over TLS", reloading));
            listeners.spawn(front_end.clone().run_listener(
                listener,
                Some(acceptor),
                listeners.clone(),
            ));
        }
        let quic_endpoint = quic.map(|(endpoint, _, cert)| {
            if let Some(cert) = cert {
                reloadable.push(("QUIC audio endpoint", cert));
            }
            endpoint
        });
        background.push(tokio::spawn(crate::tls::watch(
            reloadable,
            crate::tls::WATCH_INTERVAL,
            metrics.clone(),
            stop_rest.clone(),
        )));
        background.push(tokio::spawn(audio_socket.run(stop_rest.clone())));
        if let Some(endpoint) = quic_endpoint {
            listeners.spawn(endpoint.run(listeners.clone()));
        }
        if let Some(store) = &history_store {
            let retention = crate::history::retention::Retention {
                audio_days: config.history.retention_audio_days,
                text_days: config.history.retention_text_days,
                utc_offset_minutes: config.history.utc_offset_minutes,
            };
            background.push(tokio::spawn(crate::history::retention::run_periodically(
                store.clone(),
                retention,
                Duration::from_secs(3600),
                stop_rest.clone(),
            )));
        }
        let push = match config.push.enabled {
            true => {
                let clip_base_url = config.push.clip_base_url.clone().unwrap_or_else(|| {
                    let host = &config.udp.public_host;
                    let host = match host.contains(':') && !host.starts_with('[') {
                        true => format!("[{host}]"),
                        false => host.clone(),
                    };
                    format!("http://{host}:{}", addrs.http.port())
                });
                let (service, delivery, hints) = start_push(
                    &config,
                    clip_base_url,
                    history_store.clone(),
                    directory.clone(),
                    registry.clone(),
                    presence.clone(),
                    events.clone(),
                    metrics.clone(),
                )
                .await?;
                background.push(tokio::spawn(delivery.run(
                    hints,
                    remote_push_batches,
                    stop_rest.clone(),
                )));
                if let Some(url) = &config.push.redis_rpc_url {
                    background.push(tokio::spawn(crate::push::redis_rpc::run(
                        url.clone(),
                        config.push.redis_rpc_key.clone(),
                        service.clone(),
                        stop_rest.clone(),
                    )));
                }
                Some(service)
            }
            false => None,
        };
        // Admin commands run the same way from the bus and from the HTTP API.
        let admin = Arc::new(crate::admin::executor::AdminDeps {
            push: push.clone(),
            bus: broker.bus().clone(),
            directory: directory.clone(),
            registry: registry.clone(),
            sessions: sessions.clone(),
            presence: presence.clone(),
            metrics: metrics.clone(),
            node: config.node.id.clone(),
            command_timeout: Duration::from_millis(config.admin.command_timeout_ms),
            max_in_flight: config.admin.max_in_flight,
            permits: Arc::new(tokio::sync::Semaphore::new(config.admin.max_in_flight)),
            forwarder: pending_calls.map(|calls| {
                Arc::new(crate::admin::forward::Forwarder::new(
                    config.node.id.clone(),
                    broker.bus().clone(),
                    presence.clone(),
                    calls,
                    metrics.clone(),
                    Duration::from_millis(config.presence.timeout_ms),
                ))
            }),
        });
        // Forwarded commands come in on the same queue: in a cluster every node needs the
        // same `admin.enabled`, or commands forwarded to a node without it go unanswered.
        if config.admin.enabled {
            background.push(tokio::spawn(crate::admin::executor::run(
                admin.clone(),
                bus_commands,
                listeners.stop_signal(),
            )));
        }
        background.push(tokio::spawn(events.clone().forward_chat(
            history_events.subscribe(),
            metrics.clone(),
            stop_rest.clone(),
        )));
        if let Some(calls) = &calls {
            background.push(tokio::spawn(
                calls.clone().run(call_inputs, stop_rest.clone()),
            ));
        }
        let http_metrics = metrics.clone();
        let http_limits = crate::http::serve::ServeLimits {
            max_connections: config.http.max_connections,
            header_timeout: Duration::from_secs(config.http.header_timeout_secs),
        };
        let app = crate::http::router(crate::http::HttpState {
            metrics: metrics.clone(),
            directory: directory.clone(),
            config: Arc::new(config.clone()),
            ota_endpoint,
            history: history_store,
            history_events: history_events.clone(),
            hints,
            presence: presence.clone(),
            admin: admin.clone(),
            events: events.clone(),
            tickets: Default::default(),
            calls,
            push: push.clone(),
        });
        http_life.spawn(crate::http::serve::serve(
            http_listener,
            app,
            http_limits,
            http_metrics,
            http_life.clone(),
        ));

        info!(
            mqtt = %addrs.mqtt,
            mqtt_tls = ?addrs.mqtt_tls,
            broker = %addrs.broker.map_or_else(|| format!("external {}", config.bus.url), |a| a.to_string()),
            broker_tls = ?addrs.broker_tls,
            udp = %addrs.udp,
            udp_announced = %format!("{}:{}", config.udp.public_host, if config.udp.public_port == 0 { udp_addr.port() } else { config.udp.public_port }),
            quic = ?addrs.quic,
            http = %addrs.http,
            node = %config.node.id,
            "xiaozhi-gateway serving"
        );
        Ok(Gateway {
            addrs,
            metrics,
            registry,
            directory,
            presence,
            push,
            presence_task: Some(presence_task),
            history_events,
            history_stop,
            history_task,
            sessions,
            broker,
            listeners,
            http: http_life,
            stop_rest,
            background,
            grace: Duration::from_secs(config.shutdown.grace_secs),
        })
    }

    /// Graceful shutdown: goodbye to live conversations, listeners closed, connections
    /// flushed, everything stopped within the grace period.
    pub async fn shutdown(self) {
        // `validate` bounds the grace period at a year; saturate anyway rather than
        // trust every caller of `Gateway::start` to have validated.
        let now = tokio::time::Instant::now();
        let deadline = now
            .checked_add(self.grace)
            .unwrap_or_else(|| now + Duration::from_secs(365 * 24 * 3600));
        info!("shutting down");
        self.listeners.begin_shutdown(deadline);
        self.broker.stop();
        if tokio::time::timeout_at(deadline, self.sessions.shutdown())
            .await
            .is_err()
        {
            warn!("conversations did not all end within the grace period");
        }
        self.listeners.close_connections();
        if !self.listeners.wait().await {
            warn!("device and broker connections did not all close within the grace period");
        }
        // The devices' offline records are written while the store still answers.
        if let Some(task) = self.presence_task
            && tokio::time::timeout_at(deadline, task.shutdown())
                .await
                .is_err()
        {
            warn!("presence did not finish writing within the grace period");
        }
        // Everything recorded is written (or journaled) before the process ends.
        self.history_stop.cancel();
        if let Some(task) = self.history_task
            && tokio::time::timeout_at(deadline, task).await.is_err()
        {
            warn!(
                "chat history did not finish writing within the grace period; the journal keeps the rest"
            );
        }
        self.http.begin_shutdown(deadline);
        self.http.close_connections();
        self.stop_rest.cancel();
        if !self.http.wait().await {
            warn!("HTTP connections did not all close within the grace period");
        }
        for task in self.background {
            if tokio::time::timeout_at(deadline, task).await.is_err() {
                break;
            }
        }
        info!("stopped");
    }
}

/// The calling service: its book in Redis when the bus is external and presence is in
/// Redis (a cluster, where the two devices of a call may be on different nodes), in
/// memory otherwise.
#[allow(clippy::too_many_arguments)]
fn start_calls(
    config: &Config,
    sessions: SessionManager,
    directory: Arc<DeviceDirectory>,
    registry: Arc<DeviceRegistry>,
    presence: PresenceTracker,
    legs: Arc<crate::session::call_leg::CallLegs>,
    bus: crate::broker::bus::Bus,
    metrics: Arc<Metrics>,
) -> Result<Arc<crate::calls::CallService>, StartError> {
    let timeout = Duration::from_millis(config.presence.timeout_ms);
    let shared = config.bus.mode == crate::config::BusMode::External;
    let store = match (&config.presence.redis_url, shared) {
        (Some(url), true) => {
            crate::calls::store::CallStore::redis(url, &config.presence.key_prefix, timeout)
                .map_err(|e| {
                    StartError::Presence(format!(
                        "call book: {e} (presence.redis_url = {})",
                        crate::config::redact_url(url)
                    ))
                })?
        }
        _ => crate::calls::store::CallStore::memory(),
    };
    if shared && !store.is_shared() {
        warn!(
            "calls: the bus is external but presence.redis_url is not set, so each node keeps its own call book: calls between devices on different nodes are refused as offline"
        );
    }
    let c = &config.calls;
    Ok(crate::calls::CallService::new(crate::calls::CallDeps {
        settings: crate::calls::CallSettings {
            ring_timeout: Duration::from_secs(c.ring_timeout_secs),
            max_call: Duration::from_secs(c.max_call_secs),
            max_calls: c.max_calls,
            wake_timeout: Duration::from_secs(c.wake_timeout_secs),
            lookup_timeout: timeout,
        },
        cluster: store.is_shared(),
        store,
        node: config.node.id.clone(),
        sessions,
        directory,
        sink: registry,
        presence,
        legs,
        bus,
        metrics,
    }))
}

/// Opens the presence store (Redis when `presence.redis_url` is set, else memory) and
/// starts its writer. Redis being down now is not an error: the gateway serves devices
/// and writes their state when Redis answers.
async fn start_presence(
    config: &Config,
    hints: Arc<DeviceHints>,
    bus: crate::broker::bus::Bus,
    history: Option<crate::history::store::Store>,
    metrics: Arc<Metrics>,
) -> Result<(PresenceTracker, TrackerTask), StartError> {
    let p = &config.presence;
    let timeout = Duration::from_millis(p.timeout_ms);
    let store: Arc<dyn PresenceStore> = match &p.redis_url {
        Some(url) => Arc::new(
            crate::presence::redis::RedisPresence::connect(url, &p.key_prefix, timeout)
                .await
                .map_err(|e| {
                    StartError::Presence(format!(
                        "{e} (presence.redis_url = {})",
                        crate::config::redact_url(url)
                    ))
                })?,
        ),
        None => Arc::new(crate::presence::memory::MemoryPresence::new()),
    };
    info!(backend = store.backend(), node = %config.node.id, "device presence");
    let settings = TrackerSettings {
        node: config.node.id.clone(),
        ttls: Ttls {
            connected: Duration::from_secs(p.ttl_secs),
            offline: Duration::from_secs(p.offline_retention_secs),
        },
        heartbeat: Duration::from_secs(p.heartbeat_secs),
        timeout,
        touch_throttle: Duration::from_secs(p.last_connected_throttle_secs),
        utc_offset_minutes: config.history.utc_offset_minutes,
    };
    Ok(PresenceTracker::start(
        settings,
        store,
        hints,
        Some(bus),
        history,
        metrics,
    ))
}

/// Opens the chat-history store and journal and starts the writer. A database that is
/// unreachable now is not an error: records wait in the journal until it is there.
async fn start_history(
    config: &Config,
    metrics: Arc<Metrics>,
    events: tokio::sync::broadcast::Sender<crate::history::writer::StoredEvent>,
    stop: CancellationToken,
) -> Result<
    (
        crate::history::writer::HistoryHandle,
        JoinHandle<()>,
        crate::history::store::Store,
    ),
    StartError,
> {
    use crate::history::{journal::Journal, store::Store, writer};
    let h = &config.history;
    if let Some(path) = h
        .database_url
        .strip_prefix("sqlite://")
        .or_else(|| h.database_url.strip_prefix("sqlite:"))
        && let Some(parent) = std::path::Path::new(path.split('?').next().unwrap_or(path)).parent()
        && !parent.as_os_str().is_empty()
    {
        std::fs::create_dir_all(parent).map_err(|e| {
            StartError::History(format!(
                "cannot create {}: {e} (history.database_url)",
                parent.display()
            ))
        })?;
    }
    let timeout = Duration::from_millis(h.write_timeout_ms);
    let store = Store::connect(&h.database_url, timeout)
        .await
        .map_err(|e| StartError::History(format!("{e} (history.database_url)")))?;
    match tokio::time::timeout(timeout, store.migrate()).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            warn!(error = %e, "chat-history schema not checked yet (database unavailable?); will retry")
        }
        Err(_) => warn!("chat-history database did not answer in time; will retry"),
    }
    let journal = Journal::open(&h.journal_dir).map_err(|e| {
        StartError::History(format!(
            "journal in {}: {e} (history.journal_dir)",
            h.journal_dir.display()
        ))
    })?;
    info!(backend = store.backend(), journal = %journal.path().display(), "chat history recording");
    let settings = writer::WriterSettings {
        queue: h.queue,
        batch: h.batch,
        write_timeout: timeout,
        retry_interval: Duration::from_secs(h.retry_secs),
        mode: h.mode,
        utc_offset_minutes: h.utc_offset_minutes,
        decode_threads: h.decode_threads,
    };
    let (handle, task) =
        writer::HistoryWriter::start(store.clone(), journal, settings, metrics, events, stop)
            .map_err(|e| StartError::History(format!("cannot start the decoding threads: {e}")))?;
    Ok((handle, task, store))
}

/// Opens the push queue (in the history database; in memory, with a warning, when
/// chat history is off) and builds the push service and its delivery task.
#[allow(clippy::too_many_arguments)]
async fn start_push(
    config: &Config,
    clip_base_url: String,
    history_store: Option<crate::history::store::Store>,
    directory: Arc<DeviceDirectory>,
    registry: Arc<crate::broker::registry::DeviceRegistry>,
    presence: PresenceTracker,
    events: crate::events::EventPublisher,
    metrics: Arc<Metrics>,
) -> Result<
    (
        Arc<crate::push::PushService>,
        crate::push::delivery::Delivery,
        tokio::sync::mpsc::Receiver<crate::push::delivery::Hint>,
    ),
    StartError,
> {
    use crate::push::{PushService, delivery::Delivery, store::PushStore};
    let store = match history_store {
        Some(store) => store,
        None => {
            let store = crate::history::store::Store::memory()
                .await
                .map_err(|e| StartError::History(format!("in-memory push queue: {e}")))?;
            store
                .migrate()
                .await
                .map_err(|e| StartError::History(format!("in-memory push queue: {e}")))?;
            warn!(
                "chat history is off (history.enabled = false): pushes are queued in memory and lost on restart"
            );
            store
        }
    };
    let store = PushStore::new(store);
    let (hints_tx, hints_rx) = tokio::sync::mpsc::channel(crate::push::delivery::HINT_QUEUE);
    let service = Arc::new(PushService::new(
        store.clone(),
        presence,
        events.clone(),
        metrics.clone(),
        config.push.clone(),
        hints_tx,
        clip_base_url,
    ));
    let delivery = Delivery {
        store,
        directory,
        registry,
        events,
        metrics,
        settings: config.push.clone(),
        node: config.node.id.clone(),
    };
    Ok((service, delivery, hints_rx))
}

/// Resolves at the signal that asks the gateway to stop: SIGINT (Ctrl-C) or SIGTERM (what
/// `docker stop` and systemd send). `serve` and `demo` wait on it, then call
/// [`Gateway::shutdown`].
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
