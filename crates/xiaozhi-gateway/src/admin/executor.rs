//! Runs admin commands taken from the bus and publishes one reply for each.
//!
//! The broker listener has already checked that the publisher is an admin (only admins
//! may publish on `xiaozhi/admin/commands/...`). Each command runs in its own task,
//! at most `admin.max_in_flight` at once (beyond that: a `busy` reply, never a queue that
//! grows), and every path ends in a reply:
//!
//! * MQTT 5 publishers that set a response topic get the reply there, with their
//!   correlation data; the response topic must be one an admin may publish to (so a
//!   command cannot make the gateway write on a gateway-owned topic) or lie under
//!   `xiaozhi/admin/replies/`.
//! * Otherwise the reply goes to `xiaozhi/admin/replies/<request_id>`, and a command
//!   without a usable request id gets its error on `xiaozhi/admin/errors`.
//!
//! With an external bus (scale-out) a device command for a device another node holds
//! is sent on to that node ([`super::forward`]), which replies in this node's place.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{Value, json};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use super::command::{self, AdminRequest, Command, CommandError, ErrorCode};
use super::forward::{CallError, Forwarder};
use crate::broker::acl;
use crate::broker::bus::{Bus, BusCommand};
use crate::broker::registry::DeviceRegistry;
use crate::config::BrokerRole;
use crate::device_link::mcp::McpCallError;
use crate::metrics::Metrics;
use crate::presence::tracker::PresenceTracker;
use crate::presence::{PresenceRecord, PresenceState};
use crate::protocol::mac::Mac;
use crate::protocol::mcp::McpError;
use crate::protocol::topics;
use crate::session::SessionManager;
use crate::session::directory::DeviceDirectory;

/// What commands act on.
#[derive(Clone)]
pub struct AdminDeps {
    pub bus: Bus,
    pub directory: Arc<DeviceDirectory>,
    pub registry: Arc<DeviceRegistry>,
    pub sessions: SessionManager,
    pub presence: PresenceTracker,
    pub metrics: Arc<Metrics>,
    pub node: String,
    /// Default wait for the device.
    pub command_timeout: Duration,
    pub max_in_flight: usize,
    /// Commands in flight, from MQTT and HTTP together (at most `max_in_flight`).
    pub permits: Arc<Semaphore>,
    /// Scale-out only: sends commands on to the node that holds the device.
    pub forwarder: Option<Arc<Forwarder>>,
    /// Pushes (none: `push.enabled = false`).
    pub push: Option<Arc<crate::push::PushService>>,
}

/// Extra time a forwarded call waits beyond the command's own timeout: the owner answers
/// a device timeout itself, and that answer needs its hop back.
const FORWARD_MARGIN: Duration = Duration::from_secs(1);

/// Takes commands until stopped, then waits (briefly) for those in flight.
pub async fn run(
    deps: Arc<AdminDeps>,
    mut commands: mpsc::Receiver<BusCommand>,
    stop: CancellationToken,
) {
    let tasks = TaskTracker::new();
    loop {
        let msg = tokio::select! {
            _ = stop.cancelled() => break,
            msg = commands.recv() => match msg {
                Some(m) => m,
                None => break,
            },
        };
        let started = Instant::now();
        let mut to = ReplyTo::of(&msg);
        let request = match command::parse(&msg.topic, &msg.payload) {
            Ok(r) => {
                if to.response_topic.is_none() {
                    to.response_topic = r.reply_to.clone().filter(|t| allowed_or_warn(t));
                }
                r
            }
            Err(rejected) => {
                let id = rejected.request_id.as_deref();
                info!(topic = %msg.topic, code = rejected.error.code.as_str(), error = %rejected.error.message, "admin command refused");
                deps.reply_error(&to, id, &rejected.error, started);
                continue;
            }
        };
        let Some(permit) = deps.permit() else {
            let e = deps.busy();
            deps.reply_error(&to, Some(&request.request_id), &e, started);
            continue;
        };
        let deps = deps.clone();
        tasks.spawn(async move {
            let _permit = permit;
            if msg.forwarded_by.is_none()
                && let Some(owner) = deps.owner_elsewhere(&request).await
                && let Some(forwarder) = &deps.forwarder
            {
                let reply_topic = deps.reply_topic(&to, Some(&request.request_id));
                if forwarder.forward(&owner, &msg, &reply_topic) {
                    info!(command = request.command.name(), request_id = %request.request_id, %owner, "admin command forwarded to the device's node");
                    return;
                }
            }
            let name = request.command.name();
            let device = request.device.map(|m| m.colon()).unwrap_or_default();
            let result = deps.execute(&request).await;
            let ms = started.elapsed().as_millis() as u64;
            match result {
                Ok(value) => {
                    info!(command = name, device, request_id = %request.request_id, ms, "admin command done");
                    Metrics::inc(&deps.metrics.admin_commands_ok);
                    deps.reply(&to, Some(&request.request_id), command::ok_reply(&request.request_id, &value, &deps.node, to.via.as_deref(), started.elapsed()));
                }
                Err(e) => {
                    info!(command = name, device, request_id = %request.request_id, ms, code = e.code.as_str(), error = %e.message, "admin command failed");
                    deps.reply_error(&to, Some(&request.request_id), &e, started);
                }
            }
        });
    }
    tasks.close();
    let _ = tokio::time::timeout(Duration::from_secs(2), tasks.wait()).await;
}

/// Where a reply goes.
struct ReplyTo {
    response_topic: Option<String>,
    correlation_data: Option<Bytes>,
    /// The node that forwarded the command here, named in the reply.
    via: Option<String>,
}

impl ReplyTo {
    fn of(msg: &BusCommand) -> ReplyTo {
        // A forwarded command's reply address was checked by the node that forwarded it
        // (or is that node's own reply topic).
        let response_topic = match msg.forwarded_by {
            Some(_) => msg.response_topic.clone(),
            None => msg.response_topic.clone().filter(|t| allowed_or_warn(t)),
        };
        ReplyTo {
            response_topic,
            correlation_data: msg.correlation_data.clone(),
            via: msg.forwarded_by.clone(),
        }
    }
}

fn allowed_or_warn(topic: &str) -> bool {
    let ok = response_topic_allowed(topic);
    if !ok {
        warn!(%topic, "admin command's reply topic refused (gateway, device or command topic); replying on the default topic");
    }
    ok
}

/// A reply may go under `xiaozhi/admin/replies/`, or to a topic an admin may publish to
/// outside the gateway's namespaces: never to a device (`devices/p2p/...`) or back onto a
/// command topic (the gateway would read its own reply as a command).
fn response_topic_allowed(topic: &str) -> bool {
    let under_replies = topic
        .strip_prefix(topics::ADMIN_REPLIES_PREFIX)
        .is_some_and(|rest| !rest.is_empty() && !rest.contains(['+', '#']));
    let outside = !topic.starts_with("xiaozhi/")
        && !topic.starts_with("devices/")
        && acl::may_publish(BrokerRole::Admin, topic).is_ok();
    under_replies || outside
}

impl AdminDeps {
    /// A slot for one command, if fewer than `max_in_flight` are running.
    fn permit(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.permits.clone().try_acquire_owned().ok()
    }

    fn busy(&self) -> CommandError {
        CommandError::new(
            ErrorCode::Busy,
            format!(
                "more than {} commands in flight; try again",
                self.max_in_flight
            ),
        )
    }

    /// The other node that holds the device of a device command (scale-out only).
    async fn owner_elsewhere(&self, request: &AdminRequest) -> Option<String> {
        let forwarder = self.forwarder.as_ref()?;
        // A push is queued in the shared database; the device's node delivers it.
        if matches!(request.command, Command::Push(_)) {
            return None;
        }
        let mac = request.device?;
        if self.directory.get(&mac).is_some() {
            return None;
        }
        forwarder.owner_elsewhere(mac).await
    }

    /// Runs one command for a caller that waits for the result (the HTTP APIs), under
    /// the same in-flight limit, counters and logs as commands from the bus. `payload`
    /// is the command as JSON (what `request` was parsed from), for forwarding it to the
    /// device's node in a cluster.
    pub async fn run_now(
        &self,
        request: &AdminRequest,
        payload: &[u8],
        via: &'static str,
    ) -> Result<Value, CommandError> {
        let started = Instant::now();
        let name = request.command.name();
        let device = request.device.map(|m| m.colon()).unwrap_or_default();
        let result = match self.permit() {
            Some(_permit) => match self.owner_elsewhere(request).await {
                Some(owner) => self.call_owner(&owner, request, payload).await,
                None => self.execute(request).await,
            },
            None => Err(self.busy()),
        };
        let ms = started.elapsed().as_millis() as u64;
        match &result {
            Ok(_) => {
                info!(command = name, device, via, request_id = %request.request_id, ms, "admin command done");
                Metrics::inc(&self.metrics.admin_commands_ok);
            }
            Err(e) => {
                info!(command = name, device, via, request_id = %request.request_id, ms, code = e.code.as_str(), error = %e.message, "admin command failed");
                Metrics::inc(&self.metrics.admin_commands_failed);
            }
        }
        result
    }

    /// Runs a command on the node that holds its device and reads that node's reply.
    async fn call_owner(
        &self,
        owner: &str,
        request: &AdminRequest,
        payload: &[u8],
    ) -> Result<Value, CommandError> {
        let Some((forwarder, mac)) = self.forwarder.as_ref().zip(request.device) else {
            return self.execute(request).await;
        };
        let timeout = request.timeout.unwrap_or(self.command_timeout) + FORWARD_MARGIN;
        let topic = topics::admin_command(&mac);
        match forwarder.call(owner, &topic, payload, timeout).await {
            Ok(reply) => command::parse_reply(&reply),
            Err(CallError::Busy) => Err(self.busy()),
            Err(e) => Err(CommandError::new(ErrorCode::NodeUnreachable, e.to_string())),
        }
    }

    /// Where a reply goes: the response topic, else the request's reply topic, else the
    /// errors topic.
    fn reply_topic(&self, to: &ReplyTo, request_id: Option<&str>) -> String {
        match (&to.response_topic, request_id) {
            (Some(t), _) => t.clone(),
            (None, Some(id)) => {
                topics::admin_reply(id).unwrap_or_else(|| topics::ADMIN_ERRORS.to_owned())
            }
            (None, None) => topics::ADMIN_ERRORS.to_owned(),
        }
    }

    fn reply(&self, to: &ReplyTo, request_id: Option<&str>, payload: Vec<u8>) {
        let topic = self.reply_topic(to, request_id);
        self.bus
            .publish_reply(topic, Bytes::from(payload), to.correlation_data.clone());
    }

    fn reply_error(
        &self,
        to: &ReplyTo,
        request_id: Option<&str>,
        e: &CommandError,
        started: Instant,
    ) {
        Metrics::inc(&self.metrics.admin_commands_failed);
        self.reply(
            to,
            request_id,
            command::error_reply(
                request_id,
                e,
                &self.node,
                to.via.as_deref(),
                started.elapsed(),
            ),
        );
    }

    async fn execute(&self, request: &AdminRequest) -> Result<Value, CommandError> {
        let timeout = request.timeout.unwrap_or(self.command_timeout);
        match (&request.command, request.device) {
            (Command::ListOnline(query), _) => {
                let page = tokio::time::timeout(timeout, self.presence.store().list(query))
                    .await
                    .map_err(|_| {
                        CommandError::new(
                            ErrorCode::PresenceUnavailable,
                            "presence store did not answer in time",
                        )
                    })?
                    .map_err(|e| {
                        CommandError::new(ErrorCode::PresenceUnavailable, e.to_string())
                    })?;
                Ok(serde_json::to_value(page).unwrap_or(Value::Null))
            }
            (Command::Push(body), device) => self.push(body, device).await,
            (command, Some(mac)) => self.device_command(command, mac, timeout).await,
            (_, None) => Err(CommandError::new(
                ErrorCode::WrongTopic,
                "device command without a device",
            )),
        }
    }

    async fn push(&self, body: &Value, device: Option<Mac>) -> Result<Value, CommandError> {
        let Some(push) = &self.push else {
            return Err(CommandError::new(
                ErrorCode::Unavailable,
                "pushes are off on this gateway (push.enabled = false)",
            ));
        };
        match push.submit(body, device, "mqtt").await {
            Ok(submitted) => Ok(serde_json::to_value(submitted).unwrap_or(Value::Null)),
            Err(e) => {
                use crate::push::PushError;
                let code = match e {
                    PushError::Invalid(_) | PushError::Clip(_) => ErrorCode::InvalidCommand,
                    PushError::UnknownDevice(_) | PushError::NoDevices => ErrorCode::UnknownDevice,
                    PushError::QueueFull(_) => ErrorCode::QueueFull,
                    PushError::Unavailable(_) => ErrorCode::Unavailable,
                };
                Err(CommandError::new(code, e.to_string()))
            }
        }
    }

    async fn device_command(
        &self,
        command: &Command,
        mac: Mac,
        timeout: Duration,
    ) -> Result<Value, CommandError> {
        let offline = || {
            CommandError::new(
                ErrorCode::DeviceOffline,
                format!("{} is not connected to this gateway", mac.colon()),
            )
        };
        match command {
            Command::Status => self.status(mac, timeout).await,
            Command::Mcp { method, params } => {
                let mcp = self.directory.mcp(&mac).ok_or_else(offline)?;
                match mcp.call(method, params.clone(), timeout).await {
                    Ok(result) => Ok(result),
                    Err(McpCallError::NotConnected) => Err(offline()),
                    Err(McpCallError::Timeout(t)) => Err(CommandError::new(
                        ErrorCode::DeviceTimeout,
                        format!("device did not answer within {} ms", t.as_millis()),
                    )),
                    Err(McpCallError::Device(McpError::Rpc { code, message })) => {
                        Err(CommandError::new(
                            ErrorCode::DeviceError,
                            format!("device returned JSON-RPC error {code}: {message}"),
                        ))
                    }
                    Err(McpCallError::Device(McpError::TooManyPending)) => Err(CommandError::new(
                        ErrorCode::Busy,
                        "too many MCP requests in flight for this device",
                    )),
                }
            }
            Command::Goodbye => {
                if self.directory.get(&mac).is_none() {
                    return Err(offline());
                }
                match self.sessions.end_conversation(mac).await {
                    true => Ok(json!({"ended": true})),
                    false => Err(CommandError::new(
                        ErrorCode::NoConversation,
                        "the device is not in a conversation",
                    )),
                }
            }
            Command::Kick { reason } => {
                if !self.registry.close(&mac, "kicked by an admin") {
                    return Err(offline());
                }
                warn!(mac = %mac, reason = reason.as_deref().unwrap_or(""), "device kicked by an admin");
                Ok(json!({"kicked": true}))
            }
            Command::ListOnline(_) => Err(CommandError::new(
                ErrorCode::WrongTopic,
                "list_online is a fleet command",
            )),
            Command::Push(body) => self.push(body, Some(mac)).await,
        }
    }

    /// The device's presence: the store's view (any node), else this node's own.
    async fn status(&self, mac: Mac, timeout: Duration) -> Result<Value, CommandError> {
        let colon = mac.colon();
        let stored = tokio::time::timeout(timeout, self.presence.store().get(&colon)).await;
        let record: Option<PresenceRecord> = match stored {
            Ok(Ok(r)) => r.or_else(|| self.presence.local(&colon)),
            other => match self.presence.local(&colon) {
                Some(r) => Some(r),
                None if self.directory.get(&mac).is_none() => {
                    // Not here; the store cannot tell about other nodes.
                    let why = match other {
                        Ok(Err(e)) => e.to_string(),
                        _ => "presence store did not answer in time".into(),
                    };
                    return Err(CommandError::new(ErrorCode::PresenceUnavailable, why));
                }
                None => None,
            },
        };
        let mut value = match record {
            Some(r) => serde_json::to_value(r).unwrap_or(Value::Null),
            None => json!({"mac_address": colon, "state": PresenceState::Offline}),
        };
        if let Some(entry) = self.directory.get(&mac) {
            let cache = entry.mcp.cache();
            value["tools"] = json!(cache.tool_names());
        }
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::response_topic_allowed;

    #[test]
    fn replies_never_reach_devices_commands_or_gateway_topics() {
        assert!(response_topic_allowed("ops/replies/1"));
        assert!(response_topic_allowed("xiaozhi/admin/replies/abc"));
        for bad in [
            "xiaozhi/admin/replies/",
            "xiaozhi/admin/replies/+",
            "xiaozhi/admin/commands",
            "xiaozhi/admin/commands/aa_bb_cc_dd_ee_ff",
            "devices/p2p/aa_bb_cc_dd_ee_ff",
            "xiaozhi/devices/aa_bb_cc_dd_ee_ff/presence",
            "device-server",
            "ops/#",
        ] {
            assert!(!response_topic_allowed(bad), "{bad}");
        }
    }
}
