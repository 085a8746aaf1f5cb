//! The MCP client of one connected device: the I/O around [`McpRouter`].
//!
//! Right after a device connects the gateway asks it `initialize` and pages through
//! `tools/list`, once per connection, and caches the answers; the speech server's own
//! `initialize` / `tools/list` at every conversation are then answered from the cache.
//! The management API's `tools/call` and the speech server's requests share the device
//! through the router, which gives every request a device-side id of its own.
//!
//! Calls wait on a oneshot with a timeout; a connection that ends fails every waiter at
//! once.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::{oneshot, watch};
use tracing::debug;

use super::DeviceOut;
use crate::protocol::mcp::{
    self, DeviceReply, McpError, McpRouter, ToolCache, UpstreamRequest, initialize_params,
};

/// Why a call to the device failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum McpCallError {
    #[error("device is not connected")]
    NotConnected,
    #[error("device did not answer within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Device(#[from] McpError),
}

/// Limits of the device MCP client.
#[derive(Debug, Clone)]
pub struct McpSettings {
    /// Run `initialize` and `tools/list` after connect.
    pub setup: bool,
    /// Most tools cached per device.
    pub max_tools: usize,
    /// Timeout of each setup request.
    pub setup_timeout: Duration,
    /// Requests in flight per device.
    pub max_pending: usize,
    /// `clientInfo` the gateway presents.
    pub client_name: String,
}

impl Default for McpSettings {
    fn default() -> Self {
        McpSettings {
            setup: true,
            max_tools: 32,
            setup_timeout: Duration::from_secs(10),
            max_pending: 64,
            client_name: "xiaozhi-gateway".into(),
        }
    }
}

type Waiter = oneshot::Sender<Result<Value, McpError>>;

struct State {
    router: McpRouter,
    waiters: HashMap<u64, Waiter>,
    closed: bool,
}

/// One device's MCP client.
pub struct DeviceMcp {
    out: DeviceOut,
    state: Mutex<State>,
    /// Becomes true when setup has finished (successfully or not).
    setup_done: watch::Sender<bool>,
}

impl DeviceMcp {
    pub fn new(out: DeviceOut, max_pending: usize) -> Self {
        DeviceMcp {
            out,
            state: Mutex::new(State {
                router: McpRouter::new(max_pending),
                waiters: HashMap::new(),
                closed: false,
            }),
            setup_done: watch::channel(false).0,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends a request to the device and waits for its result.
    pub async fn call(
        &self,
        method: &str,
        params: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, McpCallError> {
        let (tx, rx) = oneshot::channel();
        let (id, payload) = {
            let mut state = self.lock();
            if state.closed {
                return Err(McpCallError::NotConnected);
            }
            let (id, payload) = state.router.gateway_request(method, params)?;
            state.waiters.insert(id, tx);
            (id, payload)
        };
        if !self.out.send_json(mcp::device_message(&payload, None)) {
            self.forget(id);
            return Err(McpCallError::NotConnected);
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(result)) => result.map_err(McpCallError::from),
            Ok(Err(_closed)) => Err(McpCallError::NotConnected),
            Err(_) => {
                self.forget(id);
                Err(McpCallError::Timeout(timeout))
            }
        }
    }

    fn forget(&self, id: u64) {
        let mut state = self.lock();
        state.router.cancel(id);
        state.waiters.remove(&id);
    }

    /// Routes an `mcp` payload from the device. Returns the payload to relay to the
    /// speech server, if it is not the gateway's.
    pub fn on_device_payload(&self, payload: Value) -> Option<Value> {
        let mut state = self.lock();
        match state.router.on_device_payload(payload) {
            DeviceReply::Gateway { id, result } => {
                if let Some(waiter) = state.waiters.remove(&id) {
                    let _ = waiter.send(result);
                }
                None
            }
            DeviceReply::Upstream(payload) | DeviceReply::Unsolicited(payload) => Some(payload),
        }
    }

    /// Routes an `mcp` payload from the speech server: what goes to the device is sent
    /// here; the returned payload (an answer from the cache) goes back to the server.
    pub fn on_upstream_payload(&self, payload: Value) -> Option<Value> {
        let UpstreamRequest { answer, to_device } = {
            let mut state = self.lock();
            if state.closed {
                return None;
            }
            state.router.on_upstream_payload(payload, Instant::now())
        };
        if let Some(payload) = to_device {
            self.out.send_json(mcp::device_message(&payload, None));
        }
        answer
    }

    /// `initialize`, `notifications/initialized`, then `tools/list` page by page, as the
    /// Node gateway does. Failures end setup early (logged); the speech server's
    /// requests then go to the device itself.
    pub async fn setup(&self, settings: &McpSettings) {
        let result = self.run_setup(settings).await;
        if let Err(e) = &result {
            debug!(mac = %self.out.mac, error = %e, "device MCP setup stopped");
        }
        self.setup_done.send_replace(true);
    }

    async fn run_setup(&self, settings: &McpSettings) -> Result<(), McpCallError> {
        let version = env!("CARGO_PKG_VERSION");
        let init = self
            .call(
                "initialize",
                Some(initialize_params(&settings.client_name, version)),
                settings.setup_timeout,
            )
            .await?;
        self.lock().router.cache.initialize =
            Some(crate::protocol::interner::intern(&init.to_string()));
        self.out.send_json(mcp::device_message(
            &McpRouter::notification("notifications/initialized"),
            None,
        ));
        let mut cursor: Option<String> = None;
        loop {
            let params = match &cursor {
                Some(cursor) => serde_json::json!({ "cursor": cursor }),
                None => serde_json::json!({}),
            };
            let page = self
                .call("tools/list", Some(params), settings.setup_timeout)
                .await?;
            let next = self.lock().router.cache.add_page(&page, settings.max_tools);
            match next {
                Some(next) => cursor = Some(next),
                None => return Ok(()),
            }
        }
    }

    /// Waits until setup has finished (or `timeout`).
    pub async fn wait_setup(&self, timeout: Duration) -> bool {
        let mut rx = self.setup_done.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|done| *done))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// The cached `initialize` result and tools.
    pub fn cache(&self) -> ToolCache {
        self.lock().router.cache.clone()
    }

    /// The connection ended: every waiter fails now.
    pub fn close(&self) {
        let mut state = self.lock();
        state.closed = true;
        state.waiters.clear();
    }
}
