//! What the gateway does with a message the bus delivers to it, whichever broker the
//! bus is: one routing table for the embedded router and an external broker.
//!
//! * `devices/p2p/<mac_>`: to the device through the [`DeviceRegistry`], whether or not it
//!   subscribed. On an external broker every node receives these; a node that does not
//!   hold the device ignores it (`xiaozhi_bus_p2p_elsewhere_total`), the one that does
//!   delivers it.
//! * `xiaozhi/admin/commands[/<mac_>]`: to the admin executor's bounded queue as a
//!   [`BusCommand`].
//! * `xiaozhi/nodes/<this node>/commands` (scale-out): a command another node forwarded
//!   ([`super::forwarding`]), queued like the others but marked forwarded.
//! * `xiaozhi/nodes/<this node>/replies/<call>` (scale-out): the answer to a call this
//!   node's management API forwarded, handed to the waiting call.
//! * `xiaozhi/nodes/<this node>/calls` and `.../call-audio/<call>/<mac_>` (scale-out):
//!   device-calling actions for this node's devices and the audio of their calls, handed
//!   to [`CallTraffic`] (implemented by the calling service, which this layer does not
//!   know).
//! * `xiaozhi/events/push` (scale-out): another node queued a push request; its batch id
//!   goes to this node's push delivery, which sends the batch to the devices held here.

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc;
use tracing::warn;

use super::bus::BusCommand;
use super::forwarding::{self, PendingCalls};
use super::registry::DeviceRegistry;
use crate::metrics::Metrics;
use crate::protocol::topics::{self, NodeTopic};

/// Admin commands waiting for the executor before further ones are dropped (and counted).
pub const COMMAND_QUEUE: usize = 1024;

/// This node's part in a cluster of gateway nodes (external bus only).
pub struct NodeRole {
    pub node: String,
    pub calls: Arc<PendingCalls>,
    /// Where device-calling traffic for this node goes.
    pub call_traffic: Option<Arc<dyn CallTraffic>>,
    /// Where the batch ids of pushes queued on other nodes go (dropped when full: the
    /// delivery's sweep finds them anyway).
    pub push_batches: Option<mpsc::Sender<String>>,
}

/// Device-calling traffic another node sent to this one.
pub trait CallTraffic: Send + Sync + 'static {
    /// An action for one of this node's devices (JSON).
    fn action(&self, payload: Bytes);
    /// A frame of call audio for `mac`'s leg of call `call`.
    fn audio(&self, call: u64, mac: crate::protocol::mac::Mac, payload: Bytes);
}

/// Routes what the bus delivers.
pub struct Inbound {
    registry: Arc<DeviceRegistry>,
    commands: mpsc::Sender<BusCommand>,
    cluster: Option<NodeRole>,
    metrics: Arc<Metrics>,
}

impl Inbound {
    /// The router, and the queue of admin commands it fills (at most
    /// [`COMMAND_QUEUE`]; dropped and counted beyond, `admin_commands_dropped`).
    pub fn new(
        registry: Arc<DeviceRegistry>,
        cluster: Option<NodeRole>,
        metrics: Arc<Metrics>,
    ) -> (Inbound, mpsc::Receiver<BusCommand>) {
        let (commands, rx) = mpsc::channel(COMMAND_QUEUE);
        (
            Inbound {
                registry,
                commands,
                cluster,
                metrics,
            },
            rx,
        )
    }

    /// Handles one delivered publish.
    pub fn route(
        &self,
        topic: &str,
        payload: Bytes,
        response_topic: Option<String>,
        correlation_data: Option<Bytes>,
    ) {
        if let Some(mac) = topics::parse_p2p(topic) {
            if self.cluster.is_some() && self.registry.get(&mac).is_none() {
                Metrics::inc(&self.metrics.bus_p2p_elsewhere);
                return;
            }
            // Drops (device offline, queue full) are counted by the registry.
            let _ = self.registry.send(&mac, payload);
            return;
        }
        if topics::parse_admin_command(topic).is_some() {
            self.queue(BusCommand {
                topic: topic.to_owned(),
                payload,
                response_topic,
                correlation_data,
                forwarded_by: None,
            });
            return;
        }
        let Some(cluster) = &self.cluster else { return };
        if topic == topics::EVENTS_PUSH {
            if let Some(batches) = &cluster.push_batches
                && let Some(batch) = push_batch_elsewhere(&payload, &cluster.node)
            {
                let _ = batches.try_send(batch);
            }
            return;
        }
        match topics::parse_node_topic(&cluster.node, topic) {
            Some(NodeTopic::Commands) => match forwarding::decode(&payload) {
                Ok(command) => self.queue(command),
                Err(e) => {
                    Metrics::inc(&self.metrics.bus_forward_malformed);
                    warn!(error = %e, "forwarded admin command dropped");
                }
            },
            // Late replies (the call timed out) are simply not wanted any more.
            Some(NodeTopic::Reply(call)) => {
                cluster.calls.complete(call, payload);
            }
            Some(NodeTopic::Calls) => {
                if let Some(traffic) = &cluster.call_traffic {
                    traffic.action(payload);
                }
            }
            Some(NodeTopic::CallAudio { call, mac }) => {
                if let Some(traffic) = &cluster.call_traffic {
                    traffic.audio(call, mac, payload);
                }
            }
            None => {}
        }
    }

    fn queue(&self, command: BusCommand) {
        if self.commands.try_send(command).is_err() {
            Metrics::inc(&self.metrics.admin_commands_dropped);
        }
    }
}

/// The batch id of a `push_queued` event another node published (this node's own are
/// handed to its delivery directly).
fn push_batch_elsewhere(payload: &[u8], node: &str) -> Option<String> {
    let event: serde_json::Value = serde_json::from_slice(payload).ok()?;
    if event.get("node").and_then(serde_json::Value::as_str) == Some(node) {
        return None;
    }
    let batch = event.get("batch_id")?.as_str()?;
    (batch.len() <= 64).then(|| batch.to_owned())
}
