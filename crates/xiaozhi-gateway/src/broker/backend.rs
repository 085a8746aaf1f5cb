//! Which broker carries the bus: the embedded one (one node, the default) or an external
//! one shared by several gateway nodes (scale-out). The rest of the gateway sees only
//! the [`Bus`] handle for publishing and the command queue [`Inbound`] fills; this enum
//! starts and stops whichever broker the config names.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::mpsc;

use super::bus::{BrokerError, Bus, BusCommand, EmbeddedBroker};
use super::external::ExternalBus;
use super::forwarding::PendingCalls;
use super::inbound::{CallTraffic, Inbound, NodeRole};
use super::registry::DeviceRegistry;
use crate::config::{BusMode, Config};
use crate::lifecycle::Lifecycle;
use crate::metrics::Metrics;

/// The running bus.
pub enum BusBackend {
    Embedded(EmbeddedBroker),
    External(ExternalBus),
}

impl BusBackend {
    /// Starts the configured broker (the embedded one's listener as part of `life`).
    /// Returns the admin command queue and, on an external broker, the calls waiting for
    /// other nodes' replies.
    pub async fn start(
        config: &Config,
        registry: Arc<DeviceRegistry>,
        call_traffic: Option<Arc<dyn CallTraffic>>,
        push_batches: Option<mpsc::Sender<String>>,
        metrics: Arc<Metrics>,
        life: &Lifecycle,
    ) -> Result<
        (
            BusBackend,
            mpsc::Receiver<BusCommand>,
            Option<Arc<PendingCalls>>,
        ),
        BrokerError,
    > {
        match config.bus.mode {
            BusMode::Embedded => {
                let (inbound, commands) = Inbound::new(registry, None, metrics.clone());
                let broker = EmbeddedBroker::start(&config.broker, inbound, metrics, life).await?;
                Ok((BusBackend::Embedded(broker), commands, None))
            }
            BusMode::External => {
                let calls = Arc::new(PendingCalls::default());
                let role = NodeRole {
                    node: config.node.id.clone(),
                    calls: calls.clone(),
                    call_traffic,
                    push_batches,
                };
                let (inbound, commands) = Inbound::new(registry, Some(role), metrics.clone());
                let bus = ExternalBus::start(
                    &config.bus,
                    &config.node.id,
                    config.broker.publish_queue,
                    inbound,
                    metrics,
                )?;
                Ok((BusBackend::External(bus), commands, Some(calls)))
            }
        }
    }

    /// The publishing handle.
    pub fn bus(&self) -> &Bus {
        match self {
            BusBackend::Embedded(b) => &b.bus,
            BusBackend::External(b) => &b.bus,
        }
    }

    /// The embedded broker's listener for admin clients (none with an external broker:
    /// admins use that broker).
    pub fn listen_addr(&self) -> Option<SocketAddr> {
        match self {
            BusBackend::Embedded(b) => Some(b.listen_addr),
            BusBackend::External(_) => None,
        }
    }

    /// The embedded broker's listener over TLS, when configured.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        match self {
            BusBackend::Embedded(b) => b.tls_addr,
            BusBackend::External(_) => None,
        }
    }

    /// The certificate of the embedded broker's TLS listener, for reloading.
    pub fn tls_cert(&self) -> Option<Arc<crate::tls::ReloadingCert>> {
        match self {
            BusBackend::Embedded(b) => b.tls_cert.clone(),
            BusBackend::External(_) => None,
        }
    }

    /// Stops the broker side's deliveries (its listener stops with its lifecycle).
    pub fn stop(&self) {
        match self {
            BusBackend::Embedded(b) => b.stop(),
            BusBackend::External(b) => b.stop(),
        }
    }
}
