//! Device MCP routing (PROTOCOL.md section 4): JSON-RPC 2.0 carried in `{"type":"mcp",
//! "payload":...}` messages.
//!
//! Three parties send requests to one device: the gateway itself (`initialize` and
//! `tools/list` right after connect), the management API (`tools/call` from manager-api)
//! and the speech server (through the conversation's WebSocket). They all share one id
//! space on the device, so every request the device sees carries an id this router
//! allocated, and the router remembers whom the answer belongs to. Two concurrent calls
//! can therefore never receive each other's results, whatever ids their callers chose.
//!
//! The router also keeps the device's tool cache, and answers the speech server's
//! `initialize` and `tools/list` from it (the server asks at every conversation; the
//! device is asked once per connection).
//!
//! Pure state: time comes in as `now` so that abandoned requests can expire.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// MCP protocol version the gateway speaks to devices (the Node gateway's).
pub const PROTOCOL_VERSION: &str = "2024-11-05";

/// A request the speech server sent that the device never answered is forgotten after
/// this long.
pub const UPSTREAM_REQUEST_TTL: Duration = Duration::from_secs(60);

/// Who is waiting for a device's answer.
#[derive(Debug, Clone, PartialEq)]
enum Origin {
    /// The gateway (its own setup, or the management API): the caller waits on this id.
    Gateway,
    /// The speech server, with the id it used.
    Upstream { id: Value, since: Instant },
}

/// What to do with an `mcp` payload from the device.
#[derive(Debug, Clone, PartialEq)]
pub enum DeviceReply {
    /// The answer to a gateway request: wake the waiter for `id`.
    Gateway {
        id: u64,
        result: Result<Value, McpError>,
    },
    /// The answer to a speech-server request, with the server's id restored: relay it.
    Upstream(Value),
    /// Anything else (notifications, the device's own requests): relay as is.
    Unsolicited(Value),
}

/// What to do with an `mcp` payload from the speech server.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct UpstreamRequest {
    /// Send this payload back to the server (answered from the cache).
    pub answer: Option<Value>,
    /// Send this payload to the device.
    pub to_device: Option<Value>,
}

/// A JSON-RPC error, or the router's own reasons a call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum McpError {
    #[error("device returned error {code}: {message}")]
    Rpc { code: i64, message: String },
    #[error("too many MCP requests in flight for this device")]
    TooManyPending,
}

/// The device's answers to `initialize` and `tools/list`, collected once per connection.
///
/// Tools are kept as compact JSON text, not as `serde_json::Value` trees: a device's tool
/// list lives as long as its connection, and as a tree it cost about 17 KB per device
/// (measured with 1,000 simulated devices), several times its text. It is parsed back
/// only when a speech server asks for it, once per conversation.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ToolCache {
    /// The device's `initialize` result, compact JSON (kept as text for the same reason).
    pub initialize: Option<Arc<str>>,
    /// Each tool's JSON object, compact, shared by every device that announced the same
    /// tool ([`super::interner`]).
    pub tools: Vec<Arc<str>>,
    /// `tools/list` paging finished (or stopped at the cap).
    pub complete: bool,
}

impl ToolCache {
    /// Adds one `tools/list` page; returns the cursor of the next page to ask for, if
    /// any. Paging stops at an empty page, a missing cursor, or when the page would take
    /// the cache past `cap` tools (the page is then left out, as the Node gateway does).
    pub fn add_page(&mut self, result: &Value, cap: usize) -> Option<String> {
        let tools = result.get("tools").and_then(Value::as_array);
        let page = tools.map(Vec::as_slice).unwrap_or_default();
        if page.is_empty() || self.tools.len() + page.len() > cap {
            self.complete = true;
            return None;
        }
        self.tools
            .extend(page.iter().map(|t| super::interner::intern(&t.to_string())));
        let next = result
            .get("nextCursor")
            .and_then(Value::as_str)
            .filter(|c| !c.is_empty())
            .map(str::to_owned);
        if next.is_none() {
            self.complete = true;
        }
        next
    }
}

impl ToolCache {
    /// The tools as a JSON array (for a `tools/list` answer).
    pub fn tools_value(&self) -> Value {
        Value::Array(
            self.tools
                .iter()
                .filter_map(|t| serde_json::from_str(t).ok())
                .collect(),
        )
    }

    /// The tools' names.
    pub fn tool_names(&self) -> Vec<String> {
        #[derive(serde::Deserialize)]
        struct Named {
            name: String,
        }
        self.tools
            .iter()
            .filter_map(|t| serde_json::from_str::<Named>(t).ok())
            .map(|n| n.name)
            .collect()
    }
}

/// The router of one device connection.
#[derive(Debug)]
pub struct McpRouter {
    next_id: u64,
    pending: HashMap<u64, Origin>,
    max_pending: usize,
    pub cache: ToolCache,
    /// The server's `initialize` was answered from the cache; its
    /// `notifications/initialized` is then ours to swallow.
    answered_initialize: bool,
}

impl McpRouter {
    pub fn new(max_pending: usize) -> Self {
        McpRouter {
            // Distinct from the small ids servers typically use, to make logs readable.
            next_id: 10_000,
            pending: HashMap::new(),
            max_pending,
            cache: ToolCache::default(),
            answered_initialize: false,
        }
    }

    fn allocate(&mut self, origin: Origin) -> Result<u64, McpError> {
        if self.pending.len() >= self.max_pending {
            return Err(McpError::TooManyPending);
        }
        let id = self.next_id;
        self.next_id += 1;
        self.pending.insert(id, origin);
        Ok(id)
    }

    /// A request from the gateway: returns its id and the payload to send the device.
    pub fn gateway_request(
        &mut self,
        method: &str,
        params: Option<Value>,
    ) -> Result<(u64, Value), McpError> {
        let id = self.allocate(Origin::Gateway)?;
        let mut payload = json!({"jsonrpc": "2.0", "id": id, "method": method});
        if let Some(params) = params {
            payload["params"] = params;
        }
        Ok((id, payload))
    }

    /// Forgets a gateway request whose caller gave up (timeout).
    pub fn cancel(&mut self, id: u64) {
        self.pending.remove(&id);
    }

    /// A notification from the gateway (no answer expected).
    pub fn notification(method: &str) -> Value {
        json!({"jsonrpc": "2.0", "method": method})
    }

    /// Routes a payload the device sent.
    pub fn on_device_payload(&mut self, payload: Value) -> DeviceReply {
        let is_response = payload.get("method").is_none()
            && (payload.get("result").is_some() || payload.get("error").is_some());
        let id = payload.get("id").and_then(Value::as_u64);
        let origin = match (is_response, id) {
            (true, Some(id)) => self.pending.remove(&id).map(|o| (id, o)),
            _ => None,
        };
        match origin {
            Some((id, Origin::Gateway)) => DeviceReply::Gateway {
                id,
                result: match payload.get("error") {
                    Some(error) => Err(McpError::Rpc {
                        code: error.get("code").and_then(Value::as_i64).unwrap_or(0),
                        message: error
                            .get("message")
                            .and_then(Value::as_str)
                            .unwrap_or("unknown error")
                            .to_owned(),
                    }),
                    None => Ok(payload.get("result").cloned().unwrap_or(Value::Null)),
                },
            },
            Some((_, Origin::Upstream { id, .. })) => {
                let mut payload = payload;
                payload["id"] = id;
                DeviceReply::Upstream(payload)
            }
            None => DeviceReply::Unsolicited(payload),
        }
    }

    /// Routes a payload the speech server sent. `now` stamps forwarded requests so that
    /// unanswered ones expire.
    pub fn on_upstream_payload(&mut self, payload: Value, now: Instant) -> UpstreamRequest {
        self.expire(now);
        let method = payload.get("method").and_then(Value::as_str).unwrap_or("");
        let id = payload.get("id").cloned().filter(|id| !id.is_null());
        match (method, id) {
            ("initialize", Some(id)) if self.cache.initialize.is_some() => {
                self.answered_initialize = true;
                let result = self
                    .cache
                    .initialize
                    .as_deref()
                    .and_then(|text| serde_json::from_str::<Value>(text).ok())
                    .unwrap_or(Value::Null);
                UpstreamRequest {
                    answer: Some(json!({"jsonrpc": "2.0", "id": id, "result": result})),
                    // The server's initialize carries settings for the device (e.g. the
                    // vision endpoint), so the device still receives it, as a request
                    // of ours whose answer nobody waits for.
                    to_device: self
                        .gateway_request("initialize", payload.get("params").cloned())
                        .ok()
                        .map(|(_, p)| p),
                }
            }
            ("tools/list", Some(id)) if self.cache.complete => UpstreamRequest {
                answer: Some(json!({
                    "jsonrpc": "2.0",
                    "id": id,
                    "result": {"tools": self.cache.tools_value()},
                })),
                to_device: None,
            },
            ("notifications/initialized", None) if self.answered_initialize => {
                UpstreamRequest::default()
            }
            (_, Some(id)) if !method.is_empty() => {
                match self.allocate(Origin::Upstream { id, since: now }) {
                    Ok(ours) => {
                        let mut payload = payload;
                        payload["id"] = json!(ours);
                        UpstreamRequest {
                            answer: None,
                            to_device: Some(payload),
                        }
                    }
                    Err(e) => UpstreamRequest {
                        answer: Some(json!({
                            "jsonrpc": "2.0",
                            "id": payload["id"],
                            "error": {"code": -32000, "message": e.to_string()},
                        })),
                        to_device: None,
                    },
                }
            }
            // Notifications and responses to the device's own requests.
            _ => UpstreamRequest {
                answer: None,
                to_device: Some(payload),
            },
        }
    }

    /// Drops speech-server requests the device never answered.
    fn expire(&mut self, now: Instant) {
        self.pending.retain(|_, origin| match origin {
            Origin::Upstream { since, .. } => now.duration_since(*since) < UPSTREAM_REQUEST_TTL,
            Origin::Gateway => true,
        });
    }

    /// Requests waiting for the device.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }
}

/// The gateway's `initialize` parameters.
pub fn initialize_params(client_name: &str, client_version: &str) -> Value {
    json!({
        "protocolVersion": PROTOCOL_VERSION,
        "capabilities": {},
        "clientInfo": {"name": client_name, "version": client_version},
    })
}

/// Wraps a JSON-RPC payload in the message devices read.
pub fn device_message(payload: &Value, session_id: Option<&str>) -> String {
    let mut message = json!({"type": "mcp", "payload": payload});
    if let Some(session_id) = session_id {
        message["session_id"] = json!(session_id);
    }
    message.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(id: u64, result: Value) -> Value {
        json!({"jsonrpc": "2.0", "id": id, "result": result})
    }

    #[test]
    fn concurrent_calls_get_their_own_answers() {
        let mut r = McpRouter::new(8);
        let (a, _) = r
            .gateway_request("tools/call", Some(json!({"name": "a"})))
            .unwrap();
        let now = Instant::now();
        // The server picks an id that could collide with anything.
        let up = r.on_upstream_payload(
            json!({"jsonrpc": "2.0", "id": a, "method": "tools/call", "params": {"name": "b"}}),
            now,
        );
        let to_device = up.to_device.unwrap();
        let b = to_device["id"].as_u64().unwrap();
        assert_ne!(a, b, "the device sees distinct ids");
        // Answers arrive in reverse order.
        assert_eq!(
            r.on_device_payload(result(b, json!("for b"))),
            DeviceReply::Upstream(json!({"jsonrpc": "2.0", "id": a, "result": "for b"}))
        );
        assert_eq!(
            r.on_device_payload(result(a, json!("for a"))),
            DeviceReply::Gateway {
                id: a,
                result: Ok(json!("for a"))
            }
        );
        // A repeated answer is no longer anyone's.
        assert!(matches!(
            r.on_device_payload(result(a, json!("again"))),
            DeviceReply::Unsolicited(_)
        ));
        assert_eq!(r.pending(), 0);
    }

    #[test]
    fn device_errors_reach_the_gateway_caller() {
        let mut r = McpRouter::new(8);
        let (id, payload) = r.gateway_request("tools/call", None).unwrap();
        assert_eq!(payload["method"], "tools/call");
        assert!(payload.get("params").is_none());
        let reply = json!({"jsonrpc": "2.0", "id": id, "error": {"code": -32601, "message": "no such tool"}});
        assert_eq!(
            r.on_device_payload(reply),
            DeviceReply::Gateway {
                id,
                result: Err(McpError::Rpc {
                    code: -32601,
                    message: "no such tool".into()
                })
            }
        );
    }

    #[test]
    fn in_flight_requests_are_bounded_and_expire() {
        let mut r = McpRouter::new(2);
        r.gateway_request("a", None).unwrap();
        let t0 = Instant::now();
        let up = r.on_upstream_payload(json!({"jsonrpc": "2.0", "id": 1, "method": "x"}), t0);
        assert!(up.to_device.is_some());
        assert_eq!(r.gateway_request("b", None), Err(McpError::TooManyPending));
        let refused = r.on_upstream_payload(json!({"jsonrpc": "2.0", "id": 2, "method": "y"}), t0);
        assert_eq!(refused.answer.unwrap()["error"]["code"], -32000);
        // The unanswered server request expires; gateway requests are cancelled by their callers.
        let later = t0 + UPSTREAM_REQUEST_TTL + Duration::from_secs(1);
        let ok = r.on_upstream_payload(json!({"jsonrpc": "2.0", "id": 3, "method": "z"}), later);
        assert!(ok.to_device.is_some());
        assert_eq!(r.pending(), 2);
    }

    #[test]
    fn server_setup_is_answered_from_the_cache() {
        let mut r = McpRouter::new(8);
        let now = Instant::now();
        // Before the cache is ready, everything goes to the device.
        let early = r.on_upstream_payload(
            json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}),
            now,
        );
        assert!(early.answer.is_none() && early.to_device.is_some());

        r.cache.initialize = Some(
            json!({"protocolVersion": PROTOCOL_VERSION, "serverInfo": {"name": "dev"}})
                .to_string()
                .as_str()
                .into(),
        );
        assert_eq!(
            r.cache
                .add_page(&json!({"tools": [{"name": "t1"}], "nextCursor": "c1"}), 32),
            Some("c1".into())
        );
        assert_eq!(
            r.cache.add_page(&json!({"tools": [{"name": "t2"}]}), 32),
            None
        );
        assert!(r.cache.complete);

        let init = r.on_upstream_payload(
            json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"capabilities": {"vision": {"url": "u"}}}}),
            now,
        );
        assert_eq!(init.answer.unwrap()["result"]["serverInfo"]["name"], "dev");
        let forwarded = init.to_device.unwrap();
        assert_eq!(forwarded["params"]["capabilities"]["vision"]["url"], "u");
        let ours = forwarded["id"].as_u64().unwrap();
        // The device's answer to that copy is swallowed by the gateway.
        assert!(matches!(
            r.on_device_payload(result(ours, json!({}))),
            DeviceReply::Gateway { .. }
        ));

        let swallowed = r.on_upstream_payload(
            json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
            now,
        );
        assert_eq!(swallowed, UpstreamRequest::default());

        let list = r.on_upstream_payload(
            json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list", "params": {"cursor": ""}}),
            now,
        );
        let answer = list.answer.unwrap();
        assert_eq!(answer["id"], 2);
        assert_eq!(
            answer["result"]["tools"],
            json!([{"name": "t1"}, {"name": "t2"}])
        );
        assert!(list.to_device.is_none());
    }

    #[test]
    fn paging_stops_at_the_cap_or_an_empty_page() {
        let mut cache = ToolCache::default();
        assert_eq!(
            cache.add_page(&json!({"tools": [1, 2], "nextCursor": "x"}), 3),
            Some("x".into())
        );
        assert_eq!(
            cache.add_page(&json!({"tools": [3, 4], "nextCursor": "y"}), 3),
            None
        );
        assert_eq!(cache.tools.len(), 2);
        assert_eq!(cache.tools_value(), json!([1, 2]));
        assert!(cache.complete);
        let mut empty = ToolCache::default();
        assert_eq!(empty.add_page(&json!({"tools": []}), 3), None);
        assert!(empty.complete);
        let mut junk = ToolCache::default();
        assert_eq!(junk.add_page(&json!("nonsense"), 3), None);
    }

    #[test]
    fn device_notifications_pass_through() {
        let mut r = McpRouter::new(4);
        let note = json!({"jsonrpc": "2.0", "method": "notifications/state_changed"});
        assert_eq!(
            r.on_device_payload(note.clone()),
            DeviceReply::Unsolicited(note)
        );
        // A device request that happens to use one of our ids is not a response.
        let (id, _) = r.gateway_request("x", None).unwrap();
        let req = json!({"jsonrpc": "2.0", "id": id, "method": "sampling/createMessage"});
        assert_eq!(
            r.on_device_payload(req.clone()),
            DeviceReply::Unsolicited(req)
        );
        assert_eq!(r.pending(), 1);
    }

    mod props {
        use super::*;
        use crate::control::{DeviceMessage, parse_device_message};
        use proptest::prelude::*;

        /// JSON values without floats (whose text form is not this module's business).
        fn json_value() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::from),
                any::<i64>().prop_map(Value::from),
                any::<String>().prop_map(Value::from),
            ];
            leaf.prop_recursive(3, 24, 4, |inner| {
                prop_oneof![
                    proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                    proptest::collection::btree_map("[a-z]{1,6}", inner, 0..4)
                        .prop_map(|m| Value::Object(m.into_iter().collect())),
                ]
            })
        }

        fn request_id() -> impl Strategy<Value = Value> {
            prop_oneof![
                any::<i64>().prop_map(Value::from),
                "[a-z0-9-]{1,8}".prop_map(Value::from),
            ]
        }

        proptest! {
            #[test]
            fn the_gateway_caller_gets_its_answer(
                method in "[a-z/]{1,20}",
                params in proptest::option::of(json_value()),
                result in json_value(),
                earlier in 0usize..5,
            ) {
                let mut r = McpRouter::new(8);
                for _ in 0..earlier {
                    r.gateway_request("x", None).unwrap();
                }
                let (id, payload) = r.gateway_request(&method, params.clone()).unwrap();
                prop_assert_eq!(payload["id"].as_u64(), Some(id));
                prop_assert_eq!(payload["method"].as_str(), Some(method.as_str()));
                prop_assert_eq!(payload.get("params"), params.as_ref());
                let reply = json!({"jsonrpc": "2.0", "id": id, "result": result});
                prop_assert_eq!(
                    r.on_device_payload(reply),
                    DeviceReply::Gateway { id, result: Ok(result) }
                );
                prop_assert_eq!(r.pending(), earlier);
            }

            #[test]
            fn the_servers_ids_come_back_in_any_order(ids in proptest::collection::vec(request_id(), 1..8)) {
                let mut r = McpRouter::new(8);
                let now = Instant::now();
                let mut ours = Vec::new();
                for id in &ids {
                    let up = r.on_upstream_payload(
                        json!({"jsonrpc": "2.0", "id": id, "method": "tools/call"}),
                        now,
                    );
                    prop_assert!(up.answer.is_none());
                    ours.push(up.to_device.unwrap()["id"].as_u64().unwrap());
                }
                let distinct: std::collections::HashSet<_> = ours.iter().collect();
                prop_assert_eq!(distinct.len(), ids.len(), "the device sees distinct ids");
                for (id, our) in ids.iter().zip(&ours).rev() {
                    prop_assert_eq!(
                        r.on_device_payload(json!({"jsonrpc": "2.0", "id": our, "result": {}})),
                        DeviceReply::Upstream(json!({"jsonrpc": "2.0", "id": id, "result": {}}))
                    );
                }
                prop_assert_eq!(r.pending(), 0);
            }

            #[test]
            fn device_messages_carry_their_payload(
                payload in json_value(),
                session_id in proptest::option::of("[a-z0-9-]{1,12}"),
            ) {
                let text = device_message(&payload, session_id.as_deref());
                let (message, value) = parse_device_message(text.as_bytes()).unwrap();
                prop_assert_eq!(message, DeviceMessage::Other { kind: "mcp".into(), session_id });
                prop_assert_eq!(&value["payload"], &payload);
            }

            #[test]
            fn tool_pages_read_back(
                names in proptest::collection::vec("[a-z_.]{1,16}", 1..10),
                schema in json_value(),
            ) {
                let tools: Vec<Value> = names
                    .iter()
                    .map(|n| json!({"name": n, "inputSchema": schema}))
                    .collect();
                let mut cache = ToolCache::default();
                prop_assert_eq!(cache.add_page(&json!({"tools": tools}), 32), None);
                prop_assert!(cache.complete);
                prop_assert_eq!(cache.tools_value(), Value::from(tools));
                prop_assert_eq!(cache.tool_names(), names);
            }
        }
    }
}
