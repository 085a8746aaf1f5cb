//! The device's MCP server, as the xiaozhi firmware implements it (`mcp_server.cc`),
//! without I/O: [`SimMcpServer::handle`] takes the JSON-RPC payload of a `{"type":"mcp"}`
//! message and says what the device answers.
//!
//! Faithful to the firmware where a gateway could notice:
//! * a request needs `"jsonrpc":"2.0"`, a string `method`, an object (or absent)
//!   `params` and a numeric `id`, otherwise it is dropped without an answer; so are
//!   `notifications/*`;
//! * the reply id is the request id as the C `int` cJSON makes of it;
//! * `tools/list` pages by a cursor that is the name of the first tool of the next page
//!   (the firmware pages by payload size, the simulator by [`SimMcpServer::page_size`]),
//!   skips user-only tools unless `withUserTools` is true, and an unknown cursor yields
//!   the firmware's (odd) "payload size limit" error;
//! * `tools/call` checks arguments against the tool's properties with the firmware's
//!   messages and JSON-RPC error codes (-32602 for bad calls, unknown tools included;
//!   -32601 for unknown methods; -32603 for a tool that fails while running);
//! * a successful call is `{"content":[{"type":"text","text":...}],"isError":false}`.
//!
//! Simulator-only tools: `self.test.echo`, `self.test.sleep` (answered late, so two calls
//! can be answered out of order) and `self.test.fail` (answers with `"isError":true`,
//! which the firmware itself never sends).

use std::time::Duration;

use serde_json::{Map, Value, json};

/// MCP protocol version the firmware announces.
pub const PROTOCOL_VERSION: &str = "2024-11-05";

/// JSON-RPC error: method not found (unknown `method`).
pub const METHOD_NOT_FOUND: i64 = -32601;
/// JSON-RPC error: invalid params (missing/invalid arguments, unknown tool).
pub const INVALID_PARAMS: i64 = -32602;
/// JSON-RPC error: internal error (a tool failed while running; `tools/list` found
/// nothing to list).
pub const INTERNAL_ERROR: i64 = -32603;

/// What the device does with one MCP payload.
#[derive(Debug, Clone, PartialEq)]
pub enum McpOutcome {
    /// Publish this JSON-RPC payload now.
    Reply(Value),
    /// Publish this JSON-RPC payload after the delay (other requests are answered
    /// meanwhile).
    ReplyAfter(Duration, Value),
    /// No answer (notifications, malformed requests).
    Ignore,
}

/// Type of a tool argument, as the firmware's `PropertyType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PropertyKind {
    Boolean,
    Integer,
    String,
}

/// One tool argument, as the firmware's `Property`.
#[derive(Debug, Clone, PartialEq)]
pub struct SimProperty {
    pub name: String,
    pub kind: PropertyKind,
    /// A property with a default is optional.
    pub default: Option<Value>,
    /// Integer range, inclusive.
    pub min: Option<i64>,
    pub max: Option<i64>,
}

impl SimProperty {
    pub fn new(name: &str, kind: PropertyKind) -> Self {
        SimProperty {
            name: name.to_owned(),
            kind,
            default: None,
            min: None,
            max: None,
        }
    }

    pub fn boolean(name: &str) -> Self {
        Self::new(name, PropertyKind::Boolean)
    }

    pub fn integer(name: &str) -> Self {
        Self::new(name, PropertyKind::Integer)
    }

    pub fn string(name: &str) -> Self {
        Self::new(name, PropertyKind::String)
    }

    /// Inclusive integer range.
    pub fn range(mut self, min: i64, max: i64) -> Self {
        self.min = Some(min);
        self.max = Some(max);
        self
    }

    /// Makes the property optional with this default.
    pub fn default_value(mut self, value: Value) -> Self {
        self.default = Some(value);
        self
    }

    /// The property's JSON schema, as `Property::to_json`.
    fn schema(&self) -> Value {
        let mut s = Map::new();
        let kind = match self.kind {
            PropertyKind::Boolean => "boolean",
            PropertyKind::Integer => "integer",
            PropertyKind::String => "string",
        };
        s.insert("type".into(), kind.into());
        if let Some(d) = &self.default {
            s.insert("default".into(), d.clone());
        }
        if self.kind == PropertyKind::Integer {
            if let Some(min) = self.min {
                s.insert("minimum".into(), min.into());
            }
            if let Some(max) = self.max {
                s.insert("maximum".into(), max.into());
            }
        }
        Value::Object(s)
    }

    /// The argument's value from `arguments`, checked as `DoToolCall` does.
    /// `Ok(None)`: absent, and the property has no default.
    fn take(&self, arguments: Option<&Map<String, Value>>) -> Result<Option<Value>, String> {
        let value = arguments.and_then(|a| a.get(&self.name));
        let found = match (self.kind, value) {
            (PropertyKind::Boolean, Some(v @ Value::Bool(_))) => Some(v.clone()),
            (PropertyKind::Integer, Some(v)) if v.is_number() => {
                let n = c_int(v);
                if let Some(min) = self.min
                    && n < min
                {
                    return Err(format!(
                        "Property '{}': value {n} is below minimum {min}",
                        self.name
                    ));
                }
                if let Some(max) = self.max
                    && n > max
                {
                    return Err(format!(
                        "Property '{}': value {n} exceeds maximum {max}",
                        self.name
                    ));
                }
                Some(Value::from(n))
            }
            (PropertyKind::String, Some(v @ Value::String(_))) => Some(v.clone()),
            (_, Some(_)) => return Err(format!("Invalid type for argument: {}", self.name)),
            (_, None) => None,
        };
        match found {
            Some(v) => Ok(Some(v)),
            None => match &self.default {
                Some(d) => Ok(Some(d.clone())),
                None => Err(format!("Missing required argument: {}", self.name)),
            },
        }
    }
}

/// What a tool does when called.
#[derive(Debug, Clone, PartialEq)]
pub enum ToolAction {
    /// `self.get_device_status`: the device state as a JSON string.
    DeviceStatus,
    /// `self.audio_speaker.set_volume`: sets the volume from argument `volume`.
    SetVolume,
    /// `self.get_system_info`: board, chip and firmware as a JSON string.
    SystemInfo,
    /// `self.screen.get_info`: screen size as a JSON string.
    ScreenInfo,
    /// Returns argument `text`.
    Echo,
    /// Answers after argument `ms` milliseconds.
    Sleep,
    /// Answers `"isError":true` with argument `message`.
    Fail,
    /// Answers a fixed text.
    Text(String),
    /// Fails while running: a JSON-RPC error -32603 with this message (as a firmware
    /// tool that returns an error).
    Error(String),
}

/// One tool.
#[derive(Debug, Clone, PartialEq)]
pub struct SimTool {
    pub name: String,
    pub description: String,
    pub properties: Vec<SimProperty>,
    /// Listed only when `tools/list` asks `withUserTools` (the firmware's
    /// `AddUserOnlyTool`), with `"annotations":{"audience":["user"]}`.
    pub user_only: bool,
    pub action: ToolAction,
}

impl SimTool {
    pub fn new(
        name: &str,
        description: &str,
        properties: Vec<SimProperty>,
        action: ToolAction,
    ) -> Self {
        SimTool {
            name: name.to_owned(),
            description: description.to_owned(),
            properties,
            user_only: false,
            action,
        }
    }

    /// Marks the tool user-only.
    pub fn user_only(mut self) -> Self {
        self.user_only = true;
        self
    }

    /// The tool's `tools/list` entry, as `McpTool::to_json`.
    pub fn to_json(&self) -> Value {
        let properties: Map<String, Value> = self
            .properties
            .iter()
            .map(|p| (p.name.clone(), p.schema()))
            .collect();
        let mut schema = json!({"type": "object", "properties": properties});
        let required: Vec<&str> = self
            .properties
            .iter()
            .filter(|p| p.default.is_none())
            .map(|p| p.name.as_str())
            .collect();
        if !required.is_empty() {
            schema["required"] = json!(required);
        }
        let mut tool = json!({
            "name": self.name,
            "description": self.description,
            "inputSchema": schema,
        });
        if self.user_only {
            tool["annotations"] = json!({"audience": ["user"]});
        }
        tool
    }
}

/// The tools a simulated device offers unless told otherwise.
pub fn default_tools() -> Vec<SimTool> {
    vec![
        SimTool::new(
            "self.get_device_status",
            "Provides the real-time information of the device, including the current status of the audio speaker, screen, battery, network, etc.",
            vec![],
            ToolAction::DeviceStatus,
        ),
        SimTool::new(
            "self.audio_speaker.set_volume",
            "Set the volume of the audio speaker. If the current volume is unknown, you must call `self.get_device_status` tool first and then call this tool.",
            vec![SimProperty::integer("volume").range(0, 100)],
            ToolAction::SetVolume,
        ),
        SimTool::new(
            "self.get_system_info",
            "Get the system information",
            vec![],
            ToolAction::SystemInfo,
        ),
        SimTool::new(
            "self.screen.get_info",
            "Information about the screen, including width, height, etc.",
            vec![],
            ToolAction::ScreenInfo,
        ),
        SimTool::new(
            "self.test.echo",
            "Returns `text` unchanged (simulator).",
            vec![SimProperty::string("text")],
            ToolAction::Echo,
        ),
        SimTool::new(
            "self.test.sleep",
            "Answers after `ms` milliseconds (simulator).",
            vec![SimProperty::integer("ms").range(0, 600_000)],
            ToolAction::Sleep,
        ),
        SimTool::new(
            "self.test.fail",
            "Answers with isError true (simulator).",
            vec![SimProperty::string("message").default_value(json!("simulated failure"))],
            ToolAction::Fail,
        ),
    ]
}

/// The simulated device's MCP server and the device state its tools touch.
#[derive(Debug, Clone)]
pub struct SimMcpServer {
    /// `serverInfo.name` (the firmware's `BOARD_NAME`).
    pub board_name: String,
    /// `serverInfo.version` (the firmware's app version).
    pub firmware_version: String,
    /// Tools per `tools/list` page (at least 1).
    pub page_size: usize,
    /// Shown by `self.get_system_info`.
    pub mac: String,
    tools: Vec<SimTool>,
    volume: u8,
    vision: Option<Value>,
}

impl Default for SimMcpServer {
    fn default() -> Self {
        Self::with_tools(default_tools())
    }
}

impl SimMcpServer {
    /// The default tools, 2 per page, volume 70.
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with_tools(tools: Vec<SimTool>) -> Self {
        let mut server = SimMcpServer {
            board_name: "bread-compact-wifi".into(),
            firmware_version: "1.9.4".into(),
            page_size: 2,
            mac: String::new(),
            tools: Vec::new(),
            volume: 70,
            vision: None,
        };
        for t in tools {
            server.add_tool(t);
        }
        server
    }

    /// Adds a tool at the end; a tool whose name is taken is ignored (as the firmware).
    pub fn add_tool(&mut self, tool: SimTool) {
        if !self.tools.iter().any(|t| t.name == tool.name) {
            self.tools.push(tool);
        }
    }

    /// Removes a tool by name; whether it was there.
    pub fn remove_tool(&mut self, name: &str) -> bool {
        let before = self.tools.len();
        self.tools.retain(|t| t.name != name);
        self.tools.len() != before
    }

    pub fn tools(&self) -> &[SimTool] {
        &self.tools
    }

    /// Speaker volume, 0..=100.
    pub fn volume(&self) -> u8 {
        self.volume
    }

    pub fn set_volume(&mut self, volume: u8) {
        self.volume = volume.min(100);
    }

    /// `params.capabilities.vision` of the last `initialize` that carried one with a
    /// string `url` (the firmware hands it to the camera).
    pub fn vision(&self) -> Option<Value> {
        self.vision.clone()
    }

    /// The device's answer to one JSON-RPC payload.
    pub fn handle(&mut self, payload: &Value) -> McpOutcome {
        if payload.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
            return McpOutcome::Ignore;
        }
        let Some(method) = payload.get("method").and_then(Value::as_str) else {
            return McpOutcome::Ignore;
        };
        if method.starts_with("notifications") {
            return McpOutcome::Ignore;
        }
        let params = payload.get("params");
        if params.is_some_and(|p| !p.is_object()) {
            return McpOutcome::Ignore;
        }
        let params = params.and_then(Value::as_object);
        let Some(id) = payload.get("id").filter(|v| v.is_number()).map(c_int) else {
            return McpOutcome::Ignore;
        };
        match method {
            "initialize" => {
                if let Some(vision) = params
                    .and_then(|p| p.get("capabilities"))
                    .and_then(|c| c.get("vision"))
                    .filter(|v| v.is_object() && v.get("url").is_some_and(Value::is_string))
                {
                    self.vision = Some(vision.clone());
                }
                McpOutcome::Reply(result(
                    id,
                    json!({
                        "protocolVersion": PROTOCOL_VERSION,
                        "capabilities": {"tools": {}},
                        "serverInfo": {"name": self.board_name, "version": self.firmware_version},
                    }),
                ))
            }
            "tools/list" => {
                let cursor = params
                    .and_then(|p| p.get("cursor"))
                    .and_then(Value::as_str)
                    .unwrap_or("");
                let with_user = params
                    .and_then(|p| p.get("withUserTools"))
                    .and_then(Value::as_bool)
                    .unwrap_or(false);
                McpOutcome::Reply(self.tools_list(id, cursor, with_user))
            }
            "tools/call" => self.tools_call(id, params),
            other => McpOutcome::Reply(error(
                id,
                METHOD_NOT_FOUND,
                &format!("Method not implemented: {other}"),
            )),
        }
    }

    fn tools_list(&self, id: i64, cursor: &str, with_user: bool) -> Value {
        let page_size = self.page_size.max(1);
        let mut found = cursor.is_empty();
        let mut page = Vec::new();
        let mut next = None;
        for tool in &self.tools {
            if !found {
                if tool.name == cursor {
                    found = true;
                } else {
                    continue;
                }
            }
            if tool.user_only && !with_user {
                continue;
            }
            if page.len() == page_size {
                next = Some(tool.name.clone());
                break;
            }
            page.push(tool.to_json());
        }
        if page.is_empty() && !self.tools.is_empty() {
            // The firmware's message when a page ends up empty (an unknown cursor, or
            // only user-only tools left).
            return error(
                id,
                INTERNAL_ERROR,
                &format!(
                    "Failed to add tool {} because of payload size limit",
                    next.unwrap_or_default()
                ),
            );
        }
        let mut list = json!({"tools": page});
        if let Some(next) = next {
            list["nextCursor"] = next.into();
        }
        result(id, list)
    }

    fn tools_call(&mut self, id: i64, params: Option<&Map<String, Value>>) -> McpOutcome {
        let reply_error = |code, message: &str| McpOutcome::Reply(error(id, code, message));
        let Some(params) = params else {
            return reply_error(INVALID_PARAMS, "Missing params");
        };
        let Some(name) = params.get("name").and_then(Value::as_str) else {
            return reply_error(INVALID_PARAMS, "Missing tool name");
        };
        let arguments = match params.get("arguments") {
            None => None,
            Some(Value::Object(a)) => Some(a),
            Some(_) => return reply_error(INVALID_PARAMS, "Invalid arguments: expected object"),
        };
        let Some(tool) = self.tools.iter().find(|t| t.name == name) else {
            return reply_error(INVALID_PARAMS, &format!("Unknown tool: {name}"));
        };
        let mut args = Map::new();
        for p in &tool.properties {
            match p.take(arguments) {
                Ok(Some(v)) => {
                    args.insert(p.name.clone(), v);
                }
                Ok(None) => {}
                Err(message) => return reply_error(INVALID_PARAMS, &message),
            }
        }
        let int = |k: &str| args.get(k).and_then(Value::as_i64);
        let text = |k: &str| args.get(k).and_then(Value::as_str).map(str::to_owned);
        let action = tool.action.clone();
        match action {
            ToolAction::DeviceStatus => McpOutcome::Reply(text_result(id, &self.device_status())),
            ToolAction::SetVolume => match int("volume") {
                Some(v) => {
                    self.volume = v.clamp(0, 100) as u8;
                    McpOutcome::Reply(text_result(id, "true"))
                }
                None => reply_error(INVALID_PARAMS, "Missing required argument: volume"),
            },
            ToolAction::SystemInfo => McpOutcome::Reply(text_result(id, &self.system_info())),
            ToolAction::ScreenInfo => McpOutcome::Reply(text_result(
                id,
                &json!({"width": 240, "height": 240, "monochrome": false}).to_string(),
            )),
            ToolAction::Echo => {
                McpOutcome::Reply(text_result(id, &text("text").unwrap_or_default()))
            }
            ToolAction::Sleep => {
                let ms = int("ms").unwrap_or(0).max(0) as u64;
                McpOutcome::ReplyAfter(
                    Duration::from_millis(ms),
                    text_result(id, &format!("slept {ms} ms")),
                )
            }
            ToolAction::Fail => McpOutcome::Reply(result(
                id,
                json!({
                    "content": [{"type": "text", "text": text("message").unwrap_or_default()}],
                    "isError": true,
                }),
            )),
            ToolAction::Text(t) => McpOutcome::Reply(text_result(id, &t)),
            ToolAction::Error(message) => reply_error(INTERNAL_ERROR, &message),
        }
    }

    /// What `self.get_device_status` reports.
    pub fn device_status(&self) -> String {
        json!({
            "audio_speaker": {"volume": self.volume},
            "screen": {"brightness": 100, "theme": "light"},
            "network": {"type": "wifi", "ssid": "sim", "signal": "strong"},
        })
        .to_string()
    }

    fn system_info(&self) -> String {
        json!({
            "version": 2,
            "flash_size": 16_777_216,
            "chip_model_name": "esp32s3",
            "mac_address": self.mac,
            "application": {"name": "xiaozhi", "version": self.firmware_version},
            "board": {"type": self.board_name, "name": self.board_name},
        })
        .to_string()
    }
}

/// A number as cJSON's `valueint`: the double truncated and saturated to a C `int`.
fn c_int(v: &Value) -> i64 {
    let (lo, hi) = (i64::from(i32::MIN), i64::from(i32::MAX));
    match v.as_i64() {
        Some(i) => i.clamp(lo, hi),
        None => match v.as_f64() {
            // `as` saturates (and maps NaN to 0).
            Some(f) => i64::from(f as i32),
            None => hi, // u64 beyond i64
        },
    }
}

fn result(id: i64, result: Value) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "result": result})
}

fn error(id: i64, code: i64, message: &str) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}})
}

fn text_result(id: i64, text: &str) -> Value {
    result(
        id,
        json!({"content": [{"type": "text", "text": text}], "isError": false}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(id: i64, method: &str, params: Value) -> Value {
        json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params})
    }

    fn reply(out: McpOutcome) -> Value {
        match out {
            McpOutcome::Reply(v) => v,
            other => panic!("expected a reply, got {other:?}"),
        }
    }

    fn call(s: &mut SimMcpServer, id: i64, name: &str, args: Value) -> Value {
        reply(s.handle(&req(
            id,
            "tools/call",
            json!({"name": name, "arguments": args}),
        )))
    }

    fn text_of(v: &Value) -> &str {
        v["result"]["content"][0]["text"]
            .as_str()
            .expect("text content")
    }

    #[test]
    fn initialize_reports_server_info_and_records_vision() {
        let mut s = SimMcpServer::new();
        let r = reply(s.handle(&req(1, "initialize", json!({"capabilities": {}}))));
        assert_eq!(
            r,
            json!({"jsonrpc": "2.0", "id": 1, "result": {
                "protocolVersion": "2024-11-05",
                "capabilities": {"tools": {}},
                "serverInfo": {"name": "bread-compact-wifi", "version": "1.9.4"},
            }})
        );
        assert_eq!(s.vision(), None);

        let vision = json!({"url": "http://vision.example/explain", "token": "t0k"});
        let r = reply(s.handle(&req(
            2,
            "initialize",
            json!({"protocolVersion": "2024-11-05", "capabilities": {"vision": vision}}),
        )));
        assert_eq!(r["id"], 2);
        assert_eq!(s.vision(), Some(vision.clone()));

        // Without params, or with a vision lacking a url: answered, vision kept.
        let r = reply(s.handle(&json!({"jsonrpc": "2.0", "id": 3, "method": "initialize"})));
        assert_eq!(r["result"]["protocolVersion"], PROTOCOL_VERSION);
        s.handle(&req(
            4,
            "initialize",
            json!({"capabilities": {"vision": {"token": "x"}}}),
        ));
        assert_eq!(s.vision(), Some(vision));
    }

    #[test]
    fn tools_list_pages_by_count_with_cursor() {
        let mut s = SimMcpServer::new();
        let names = |r: &Value| -> Vec<String> {
            r["result"]["tools"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t["name"].as_str().unwrap().to_owned())
                .collect()
        };
        let mut all = Vec::new();
        let mut cursor = String::new();
        let mut pages = 0;
        loop {
            let r = reply(s.handle(&req(pages, "tools/list", json!({"cursor": cursor}))));
            assert_eq!(r["id"], pages);
            pages += 1;
            let page = names(&r);
            assert!(!page.is_empty() && page.len() <= 2);
            all.extend(page);
            match r["result"].get("nextCursor") {
                Some(c) => cursor = c.as_str().unwrap().to_owned(),
                None => break,
            }
            // The cursor names the next page's first tool.
            assert_eq!(
                names(&reply(s.handle(&req(
                    99,
                    "tools/list",
                    json!({"cursor": cursor})
                ))))[0],
                cursor
            );
        }
        let expected: Vec<String> = default_tools().into_iter().map(|t| t.name).collect();
        assert!(expected.len() >= 5);
        assert_eq!(all, expected);
        assert_eq!(pages as usize, expected.len().div_ceil(2));

        // No params at all: the first page.
        let r = reply(s.handle(&json!({"jsonrpc": "2.0", "id": 7, "method": "tools/list"})));
        assert_eq!(
            names(&r),
            ["self.get_device_status", "self.audio_speaker.set_volume"]
        );
        assert_eq!(r["result"]["nextCursor"], "self.get_system_info");

        // One page holds everything: no nextCursor.
        s.page_size = 100;
        let r = reply(s.handle(&req(8, "tools/list", json!({}))));
        assert_eq!(names(&r), expected);
        assert!(r["result"].get("nextCursor").is_none());
    }

    #[test]
    fn tools_list_schema_and_user_only_tools() {
        let mut s = SimMcpServer::with_tools(vec![
            SimTool::new(
                "a",
                "A",
                vec![SimProperty::integer("n").range(1, 5)],
                ToolAction::Echo,
            ),
            SimTool::new("u", "U", vec![], ToolAction::Echo).user_only(),
            SimTool::new(
                "b",
                "B",
                vec![
                    SimProperty::string("s").default_value(json!("x")),
                    SimProperty::boolean("f"),
                ],
                ToolAction::Echo,
            ),
        ]);
        s.page_size = 10;
        let r = reply(s.handle(&req(1, "tools/list", json!({}))));
        let tools = r["result"]["tools"].as_array().unwrap();
        assert_eq!(tools.len(), 2);
        assert_eq!(
            tools[0],
            json!({"name": "a", "description": "A", "inputSchema": {
                "type": "object",
                "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 5}},
                "required": ["n"],
            }})
        );
        assert_eq!(
            tools[1]["inputSchema"],
            json!({"type": "object", "properties": {
                "s": {"type": "string", "default": "x"},
                "f": {"type": "boolean"},
            }, "required": ["f"]})
        );
        let r = reply(s.handle(&req(2, "tools/list", json!({"withUserTools": true}))));
        let tools = r["result"]["tools"].as_array().unwrap();
        assert_eq!(tools.len(), 3);
        assert_eq!(tools[1]["annotations"], json!({"audience": ["user"]}));
    }

    #[test]
    fn tools_list_unknown_cursor_is_the_firmware_error() {
        let mut s = SimMcpServer::new();
        let r = reply(s.handle(&req(5, "tools/list", json!({"cursor": "nope"}))));
        assert_eq!(r["id"], 5);
        assert_eq!(r["error"]["code"], INTERNAL_ERROR);
        assert!(r.get("result").is_none());

        // A device without tools lists an empty page.
        let mut empty = SimMcpServer::with_tools(vec![]);
        let r = reply(empty.handle(&req(6, "tools/list", json!({}))));
        assert_eq!(r["result"], json!({"tools": []}));
    }

    #[test]
    fn set_volume_changes_device_status() {
        let mut s = SimMcpServer::new();
        let status = call(&mut s, 1, "self.get_device_status", json!({}));
        assert_eq!(status["result"]["isError"], false);
        let parsed: Value = serde_json::from_str(text_of(&status)).unwrap();
        assert_eq!(parsed["audio_speaker"]["volume"], 70);
        assert_eq!(parsed["network"]["type"], "wifi");

        let r = call(
            &mut s,
            2,
            "self.audio_speaker.set_volume",
            json!({"volume": 35}),
        );
        assert_eq!(
            r,
            json!({"jsonrpc": "2.0", "id": 2, "result": {
                "content": [{"type": "text", "text": "true"}], "isError": false,
            }})
        );
        assert_eq!(s.volume(), 35);
        let status = call(&mut s, 3, "self.get_device_status", json!({}));
        let parsed: Value = serde_json::from_str(text_of(&status)).unwrap();
        assert_eq!(parsed["audio_speaker"]["volume"], 35);
    }

    #[test]
    fn set_volume_argument_errors() {
        let mut s = SimMcpServer::new();
        let r = call(
            &mut s,
            1,
            "self.audio_speaker.set_volume",
            json!({"volume": 101}),
        );
        assert_eq!(r["error"]["code"], INVALID_PARAMS);
        assert_eq!(
            r["error"]["message"],
            "Property 'volume': value 101 exceeds maximum 100"
        );
        let r = call(
            &mut s,
            2,
            "self.audio_speaker.set_volume",
            json!({"volume": -1}),
        );
        assert_eq!(
            r["error"]["message"],
            "Property 'volume': value -1 is below minimum 0"
        );
        let r = call(&mut s, 3, "self.audio_speaker.set_volume", json!({}));
        assert_eq!(r["error"]["message"], "Missing required argument: volume");
        let r = call(
            &mut s,
            4,
            "self.audio_speaker.set_volume",
            json!({"volume": "50"}),
        );
        assert_eq!(r["error"]["message"], "Invalid type for argument: volume");
        assert_eq!(s.volume(), 70);
        // A fractional number is truncated, as cJSON's valueint.
        call(
            &mut s,
            5,
            "self.audio_speaker.set_volume",
            json!({"volume": 42.9}),
        );
        assert_eq!(s.volume(), 42);
    }

    #[test]
    fn info_echo_sleep_fail() {
        let mut s = SimMcpServer::new();
        s.mac = "02_5a_00_00_00_01".into();
        let r = call(&mut s, 1, "self.get_system_info", json!({}));
        let info: Value = serde_json::from_str(text_of(&r)).unwrap();
        assert_eq!(info["mac_address"], "02_5a_00_00_00_01");
        let r = call(&mut s, 2, "self.screen.get_info", json!({}));
        let screen: Value = serde_json::from_str(text_of(&r)).unwrap();
        assert_eq!(screen["width"], 240);

        let r = call(&mut s, 3, "self.test.echo", json!({"text": "héllo \"q\""}));
        assert_eq!(text_of(&r), "héllo \"q\"");

        let out = s.handle(&req(
            4,
            "tools/call",
            json!({"name": "self.test.sleep", "arguments": {"ms": 250}}),
        ));
        match out {
            McpOutcome::ReplyAfter(d, v) => {
                assert_eq!(d, Duration::from_millis(250));
                assert_eq!(v["id"], 4);
                assert_eq!(v["result"]["isError"], false);
            }
            other => panic!("expected a late reply, got {other:?}"),
        }

        let r = call(&mut s, 5, "self.test.fail", json!({}));
        assert_eq!(r["result"]["isError"], true);
        assert_eq!(text_of(&r), "simulated failure");
    }

    #[test]
    fn call_errors() {
        let mut s = SimMcpServer::new();
        let r = call(&mut s, 1, "self.nope", json!({}));
        assert_eq!(
            r,
            json!({"jsonrpc": "2.0", "id": 1, "error": {"code": -32602, "message": "Unknown tool: self.nope"}})
        );
        let r = reply(s.handle(&json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call"})));
        assert_eq!(r["error"]["message"], "Missing params");
        let r = reply(s.handle(&req(3, "tools/call", json!({"arguments": {}}))));
        assert_eq!(r["error"]["message"], "Missing tool name");
        let r = reply(s.handle(&req(
            4,
            "tools/call",
            json!({"name": "self.test.echo", "arguments": [1]}),
        )));
        assert_eq!(r["error"]["message"], "Invalid arguments: expected object");
        // Arguments may be left out when every property has a default.
        let r = reply(s.handle(&req(
            5,
            "tools/call",
            json!({"name": "self.get_device_status"}),
        )));
        assert_eq!(r["result"]["isError"], false);

        s.add_tool(SimTool::new(
            "boom",
            "",
            vec![],
            ToolAction::Error("broken".into()),
        ));
        let r = call(&mut s, 6, "boom", json!({}));
        assert_eq!(
            r["error"],
            json!({"code": INTERNAL_ERROR, "message": "broken"})
        );
        s.add_tool(SimTool::new(
            "fixed",
            "",
            vec![],
            ToolAction::Text("ok".into()),
        ));
        assert_eq!(text_of(&call(&mut s, 7, "fixed", json!({}))), "ok");
    }

    #[test]
    fn unknown_method() {
        let mut s = SimMcpServer::new();
        let r = reply(s.handle(&req(9, "resources/list", json!({}))));
        assert_eq!(
            r,
            json!({"jsonrpc": "2.0", "id": 9, "error": {"code": -32601, "message": "Method not implemented: resources/list"}})
        );
        // `ping` is not implemented by the firmware either.
        let r = reply(s.handle(&json!({"jsonrpc": "2.0", "id": 10, "method": "ping"})));
        assert_eq!(r["error"]["code"], METHOD_NOT_FOUND);
    }

    #[test]
    fn notifications_and_malformed_requests_are_ignored() {
        let mut s = SimMcpServer::new();
        for payload in [
            json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
            json!({"jsonrpc": "2.0", "id": 1, "method": "notifications/cancelled", "params": {}}),
            json!({"id": 1, "method": "initialize"}),
            json!({"jsonrpc": "1.0", "id": 1, "method": "initialize"}),
            json!({"jsonrpc": "2.0", "id": 1}),
            json!({"jsonrpc": "2.0", "id": 1, "method": 5}),
            json!({"jsonrpc": "2.0", "method": "initialize"}),
            json!({"jsonrpc": "2.0", "id": "1", "method": "initialize"}),
            json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": []}),
            json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": null}),
            json!({"jsonrpc": "2.0", "id": 1, "result": {}}),
            json!("not an object"),
        ] {
            assert_eq!(s.handle(&payload), McpOutcome::Ignore, "{payload}");
        }
    }

    #[test]
    fn ids_are_c_ints() {
        let mut s = SimMcpServer::new();
        let r = reply(s.handle(&json!({"jsonrpc": "2.0", "id": 7.8, "method": "initialize"})));
        assert_eq!(r["id"], 7);
        let r =
            reply(s.handle(&json!({"jsonrpc": "2.0", "id": 1u64 << 40, "method": "initialize"})));
        assert_eq!(r["id"], i32::MAX);
    }

    #[test]
    fn duplicate_tools_are_ignored_and_removable() {
        let mut s = SimMcpServer::new();
        let n = s.tools().len();
        s.add_tool(SimTool::new(
            "self.test.echo",
            "again",
            vec![],
            ToolAction::Text("x".into()),
        ));
        assert_eq!(s.tools().len(), n);
        assert!(s.remove_tool("self.test.echo"));
        assert!(!s.remove_tool("self.test.echo"));
        assert_eq!(s.tools().len(), n - 1);
    }
}
