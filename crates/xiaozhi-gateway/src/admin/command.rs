//! Admin commands as bytes: parsing a command published on
//! `xiaozhi/admin/commands[/<mac_>]`, and building its reply. Sans-IO: no bus, no
//! devices; the executor ([`super::executor`]) does the I/O.
//!
//! A command is a JSON object:
//!
//! ```json
//! {"request_id": "r-1", "command": "mcp", "payload": {"method": "tools/list"}, "timeout_ms": 5000}
//! ```
//!
//! | command | topic | fields |
//! | --- | --- | --- |
//! | `mcp` | device | `payload`: JSON-RPC request (`method`, optional `params`) |
//! | `status` | device | - |
//! | `goodbye` | device | - (ends the running conversation) |
//! | `kick` | device | optional `reason` (disconnects the device) |
//! | `list_online` | fleet | optional `filter` (`state`, `node`, `group`, `mac_prefix`, `after`, `limit`) |
//! | `push` | device or fleet | `payload`: a push request (`kind`, its fields; on the fleet topic also `to`, `group` or `"fleet": true`; see `protocol::push`) |
//!
//! Optional in every command: `timeout_ms`, and `reply_to` (a topic for the reply, for
//! MQTT 3.1.1 clients that cannot set an MQTT 5 response topic).
//!
//! Every command gets exactly one reply: `{"request_id", "ok": true, "result", "node",
//! "elapsed_ms"}` or `{"request_id", "ok": false, "error": {"code", "message"}, ...}`.

use std::time::Duration;

use serde::Serialize;
use serde_json::{Value, json};

use crate::presence::PresenceQuery;
use crate::protocol::mac::Mac;

/// Topic of fleet commands (no device).
pub const FLEET_TOPIC: &str = crate::protocol::topics::ADMIN_COMMANDS;
/// Longest request id accepted (it becomes a topic level).
pub const MAX_REQUEST_ID: usize = 128;
/// Longest timeout a command may ask for.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a command failed; the `code` of an error reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// The payload is not a JSON object.
    MalformedJson,
    /// A field is missing or has the wrong type.
    InvalidCommand,
    /// `command` names nothing this gateway does.
    UnknownCommand,
    /// A device command on the fleet topic or the reverse, or a bad MAC in the topic.
    WrongTopic,
    /// The device is not connected to this gateway.
    DeviceOffline,
    /// The device did not answer in time.
    DeviceTimeout,
    /// The device answered with a JSON-RPC error.
    DeviceError,
    /// `goodbye` for a device that is not in a conversation.
    NoConversation,
    /// Too many commands in flight; try again.
    Busy,
    /// The presence store could not be read.
    PresenceUnavailable,
    /// The node that holds the device did not answer a forwarded command in time.
    NodeUnreachable,
    /// `push` named a device the gateway does not know (or a target with no devices).
    UnknownDevice,
    /// `push` would pass `push.max_per_device` or `push.max_queued`.
    QueueFull,
    /// `push` could not reach its queue (the database), or pushes are off.
    Unavailable,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::MalformedJson => "malformed_json",
            ErrorCode::InvalidCommand => "invalid_command",
            ErrorCode::UnknownCommand => "unknown_command",
            ErrorCode::WrongTopic => "wrong_topic",
            ErrorCode::DeviceOffline => "device_offline",
            ErrorCode::DeviceTimeout => "device_timeout",
            ErrorCode::DeviceError => "device_error",
            ErrorCode::NoConversation => "no_conversation",
            ErrorCode::Busy => "busy",
            ErrorCode::PresenceUnavailable => "presence_unavailable",
            ErrorCode::NodeUnreachable => "node_unreachable",
            ErrorCode::UnknownDevice => "unknown_device",
            ErrorCode::QueueFull => "queue_full",
            ErrorCode::Unavailable => "unavailable",
        }
    }

    /// The code an error reply names.
    pub fn parse(code: &str) -> Option<ErrorCode> {
        ErrorCode::ALL.into_iter().find(|c| c.as_str() == code)
    }

    const ALL: [ErrorCode; 14] = [
        ErrorCode::MalformedJson,
        ErrorCode::InvalidCommand,
        ErrorCode::UnknownCommand,
        ErrorCode::WrongTopic,
        ErrorCode::DeviceOffline,
        ErrorCode::DeviceTimeout,
        ErrorCode::DeviceError,
        ErrorCode::NoConversation,
        ErrorCode::Busy,
        ErrorCode::PresenceUnavailable,
        ErrorCode::NodeUnreachable,
        ErrorCode::UnknownDevice,
        ErrorCode::QueueFull,
        ErrorCode::Unavailable,
    ];
}

/// A failed command: the code and a message for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandError {
    pub code: ErrorCode,
    pub message: String,
}

impl CommandError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        CommandError {
            code,
            message: message.into(),
        }
    }
}

/// What to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    Mcp {
        method: String,
        params: Option<Value>,
    },
    Status,
    Goodbye,
    Kick {
        reason: Option<String>,
    },
    ListOnline(PresenceQuery),
    /// A push request (`payload`), for the topic's device or the targets it names.
    Push(Value),
}

impl Command {
    pub fn name(&self) -> &'static str {
        match self {
            Command::Mcp { .. } => "mcp",
            Command::Status => "status",
            Command::Goodbye => "goodbye",
            Command::Kick { .. } => "kick",
            Command::ListOnline(_) => "list_online",
            Command::Push(_) => "push",
        }
    }
}

/// A parsed command.
#[derive(Debug, Clone, PartialEq)]
pub struct AdminRequest {
    pub request_id: String,
    /// The device from the topic (device commands).
    pub device: Option<Mac>,
    pub command: Command,
    /// How long to wait for the device, if the command said.
    pub timeout: Option<Duration>,
    /// Where the reply should go (`reply_to`): the MQTT 3.1.1 client's way of naming a
    /// response topic. Checked by the executor like an MQTT 5 response topic.
    pub reply_to: Option<String>,
}

/// A command that could not be parsed, with the request id if one was readable (so the
/// error reply can still be addressed to it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    pub request_id: Option<String>,
    pub error: CommandError,
}

/// Whether a request id can be a topic level (`xiaozhi/admin/replies/<request_id>`).
pub fn valid_request_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_REQUEST_ID
        && !id
            .chars()
            .any(|c| matches!(c, '/' | '+' | '#' | '\0') || c.is_control())
}

/// Parses a command published on `topic`.
pub fn parse(topic: &str, payload: &[u8]) -> Result<AdminRequest, Rejected> {
    let device = match crate::protocol::topics::parse_admin_command(topic) {
        Some(device) => device,
        None => {
            return Err(Rejected {
                request_id: request_id_of(payload),
                error: CommandError::new(
                    ErrorCode::WrongTopic,
                    format!(
                        "{topic}: want {FLEET_TOPIC} or {FLEET_TOPIC}/<mac_> (lowercase, '_' between octets)"
                    ),
                ),
            });
        }
    };
    let json: Value = serde_json::from_slice(payload).map_err(|e| Rejected {
        request_id: None,
        error: CommandError::new(ErrorCode::MalformedJson, format!("not JSON: {e}")),
    })?;
    let Value::Object(obj) = json else {
        return Err(Rejected {
            request_id: None,
            error: CommandError::new(
                ErrorCode::MalformedJson,
                "the command must be a JSON object",
            ),
        });
    };
    let reject = |request_id: Option<String>, code, message: String| Rejected {
        request_id,
        error: CommandError::new(code, message),
    };
    let request_id = match obj.get("request_id") {
        Some(Value::String(id)) if valid_request_id(id) => id.clone(),
        Some(Value::String(_)) => {
            return Err(reject(
                None,
                ErrorCode::InvalidCommand,
                format!(
                    "request_id must be 1-{MAX_REQUEST_ID} characters without '/', '+', '#' or control characters"
                ),
            ));
        }
        _ => {
            return Err(reject(
                None,
                ErrorCode::InvalidCommand,
                "request_id (a string) is required".into(),
            ));
        }
    };
    let rid = || Some(request_id.clone());
    let Some(name) = obj.get("command").and_then(Value::as_str) else {
        return Err(reject(
            rid(),
            ErrorCode::InvalidCommand,
            "command (a string) is required".into(),
        ));
    };
    let timeout = match obj.get("timeout_ms") {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_u64() {
            Some(ms) if ms > 0 => Some(Duration::from_millis(ms).min(MAX_TIMEOUT)),
            _ => {
                return Err(reject(
                    rid(),
                    ErrorCode::InvalidCommand,
                    "timeout_ms must be a positive integer".into(),
                ));
            }
        },
    };
    let reply_to = match obj.get("reply_to") {
        None | Some(Value::Null) => None,
        Some(Value::String(t)) if !t.is_empty() && t.len() <= 256 => Some(t.clone()),
        Some(_) => {
            return Err(reject(
                rid(),
                ErrorCode::InvalidCommand,
                "reply_to must be a topic name (1-256 characters)".into(),
            ));
        }
    };
    let command = match name {
        "mcp" => {
            let payload = obj.get("payload");
            let Some(method) = payload
                .and_then(|p| p.get("method"))
                .and_then(Value::as_str)
                .filter(|m| !m.is_empty())
            else {
                return Err(reject(
                    rid(),
                    ErrorCode::InvalidCommand,
                    "mcp needs payload.method, e.g. {\"method\":\"tools/list\"}".into(),
                ));
            };
            let params = payload.and_then(|p| p.get("params")).cloned();
            if params
                .as_ref()
                .is_some_and(|p| !p.is_object() && !p.is_array())
            {
                return Err(reject(
                    rid(),
                    ErrorCode::InvalidCommand,
                    "payload.params must be an object or an array".into(),
                ));
            }
            Command::Mcp {
                method: method.to_owned(),
                params,
            }
        }
        "status" => Command::Status,
        "goodbye" => Command::Goodbye,
        "kick" => Command::Kick {
            reason: obj
                .get("reason")
                .and_then(Value::as_str)
                .map(|r| r.chars().take(200).collect()),
        },
        "list_online" => {
            let filter = obj.get("filter").cloned().unwrap_or(Value::Null);
            let query = if filter.is_null() {
                PresenceQuery::default()
            } else {
                serde_json::from_value::<PresenceQuery>(filter)
                    .map_err(|e| reject(rid(), ErrorCode::InvalidCommand, format!("filter: {e}")))?
            };
            Command::ListOnline(query)
        }
        "push" => match obj.get("payload") {
            Some(p @ Value::Object(_)) => Command::Push(p.clone()),
            _ => {
                return Err(reject(
                    rid(),
                    ErrorCode::InvalidCommand,
                    "push needs payload, a push request, e.g. {\"kind\":\"alert\",\"status\":\"...\",\"message\":\"...\"}".into(),
                ));
            }
        },
        other => {
            return Err(reject(
                rid(),
                ErrorCode::UnknownCommand,
                format!(
                    "unknown command {:?}; known: mcp, status, goodbye, kick, list_online, push",
                    other.chars().take(64).collect::<String>()
                ),
            ));
        }
    };
    let fleet = matches!(command, Command::ListOnline(_));
    if matches!(command, Command::Push(_)) {
        // Either topic: the device's, or the fleet's with the targets in the payload.
        return Ok(AdminRequest {
            request_id,
            device,
            command,
            timeout,
            reply_to,
        });
    }
    match (fleet, device) {
        (true, Some(_)) => Err(reject(
            rid(),
            ErrorCode::WrongTopic,
            format!("{name} is a fleet command: publish it on {FLEET_TOPIC}"),
        )),
        (false, None) => Err(reject(
            rid(),
            ErrorCode::WrongTopic,
            format!("{name} is a device command: publish it on {FLEET_TOPIC}/<mac_>"),
        )),
        _ => Ok(AdminRequest {
            request_id,
            device,
            command,
            timeout,
            reply_to,
        }),
    }
}

/// Best effort: the request id of a payload that failed to parse for another reason.
fn request_id_of(payload: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(payload).ok()?;
    let id = v.get("request_id")?.as_str()?;
    valid_request_id(id).then(|| id.to_owned())
}

#[derive(Serialize)]
struct Reply<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    request_id: Option<&'a str>,
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    result: Option<&'a Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<Value>,
    node: &'a str,
    /// The node that received the command and forwarded it here (scale-out).
    #[serde(skip_serializing_if = "Option::is_none")]
    via: Option<&'a str>,
    elapsed_ms: u64,
}

/// The reply to a command that succeeded, run by `node` (forwarded there by `via`).
pub fn ok_reply(
    request_id: &str,
    result: &Value,
    node: &str,
    via: Option<&str>,
    elapsed: Duration,
) -> Vec<u8> {
    serde_json::to_vec(&Reply {
        request_id: Some(request_id),
        ok: true,
        result: Some(result),
        error: None,
        node,
        via,
        elapsed_ms: elapsed.as_millis() as u64,
    })
    .unwrap_or_default()
}

/// The reply to a command that failed, as [`ok_reply`].
pub fn error_reply(
    request_id: Option<&str>,
    error: &CommandError,
    node: &str,
    via: Option<&str>,
    elapsed: Duration,
) -> Vec<u8> {
    serde_json::to_vec(&Reply {
        request_id,
        ok: false,
        result: None,
        error: Some(json!({"code": error.code.as_str(), "message": error.message})),
        node,
        via,
        elapsed_ms: elapsed.as_millis() as u64,
    })
    .unwrap_or_default()
}

/// The outcome a reply reports (what [`ok_reply`] or [`error_reply`] wrote), as another
/// node's answer to a forwarded call is read.
pub fn parse_reply(payload: &[u8]) -> Result<Value, CommandError> {
    let unreadable = || {
        CommandError::new(
            ErrorCode::NodeUnreachable,
            "unreadable reply from the device's node",
        )
    };
    let reply: Value = serde_json::from_slice(payload).map_err(|_| unreadable())?;
    match reply.get("ok").and_then(Value::as_bool) {
        Some(true) => Ok(reply.get("result").cloned().unwrap_or(Value::Null)),
        Some(false) => {
            let error = reply.get("error").ok_or_else(unreadable)?;
            let code = error
                .get("code")
                .and_then(Value::as_str)
                .and_then(ErrorCode::parse)
                .ok_or_else(unreadable)?;
            let message = error.get("message").and_then(Value::as_str).unwrap_or("");
            Err(CommandError::new(code, message))
        }
        None => Err(unreadable()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_read_back_as_what_they_report() {
        let t = Duration::from_millis(3);
        let ok = ok_reply("r", &json!({"x": 1}), "gw-b", Some("gw-a"), t);
        assert_eq!(parse_reply(&ok), Ok(json!({"x": 1})));
        for code in ErrorCode::ALL {
            let e = CommandError::new(code, "why");
            assert_eq!(
                parse_reply(&error_reply(Some("r"), &e, "gw-b", None, t)),
                Err(e)
            );
        }
        for bad in [
            &b"x"[..],
            b"{}",
            br#"{"ok":false}"#,
            br#"{"ok":false,"error":{"code":"nope"}}"#,
        ] {
            assert_eq!(
                parse_reply(bad).unwrap_err().code,
                ErrorCode::NodeUnreachable
            );
        }
    }

    const DEV: &str = "xiaozhi/admin/commands/aa_bb_cc_dd_ee_ff";

    fn code(r: Result<AdminRequest, Rejected>) -> (Option<String>, &'static str) {
        let e = r.unwrap_err();
        (e.request_id, e.error.code.as_str())
    }

    #[test]
    fn parses_every_command() {
        let r = parse(
            DEV,
            br#"{"request_id":"r1","command":"mcp","payload":{"jsonrpc":"2.0","method":"tools/call","params":{"name":"x"}},"timeout_ms":700}"#,
        )
        .unwrap();
        assert_eq!(r.request_id, "r1");
        assert_eq!(r.device.unwrap().to_string(), "aa_bb_cc_dd_ee_ff");
        assert_eq!(
            r.command,
            Command::Mcp {
                method: "tools/call".into(),
                params: Some(json!({"name": "x"}))
            }
        );
        assert_eq!(r.timeout, Some(Duration::from_millis(700)));
        assert_eq!(r.reply_to, None);
        let r = parse(
            DEV,
            br#"{"request_id":"a","command":"status","reply_to":"ops/r"}"#,
        );
        assert_eq!(r.unwrap().reply_to.as_deref(), Some("ops/r"));
        assert_eq!(
            code(parse(
                DEV,
                br#"{"request_id":"a","command":"status","reply_to":7}"#
            )),
            (Some("a".into()), "invalid_command")
        );
        for (c, want) in [("status", Command::Status), ("goodbye", Command::Goodbye)] {
            let r = parse(
                DEV,
                format!(r#"{{"request_id":"a","command":"{c}"}}"#).as_bytes(),
            );
            assert_eq!(r.unwrap().command, want);
        }
        let r = parse(
            DEV,
            br#"{"request_id":"a","command":"kick","reason":"maintenance"}"#,
        );
        assert_eq!(
            r.unwrap().command,
            Command::Kick {
                reason: Some("maintenance".into())
            }
        );
        let r = parse(
            FLEET_TOPIC,
            br#"{"request_id":"a","command":"list_online","filter":{"state":"in_session","limit":5}}"#,
        )
        .unwrap();
        let Command::ListOnline(q) = r.command else {
            panic!("not list_online")
        };
        assert_eq!(q.state, Some(crate::presence::PresenceState::InSession));
        assert_eq!(q.page_size(), 5);
        assert!(r.device.is_none());
    }

    #[test]
    fn every_failure_has_a_code() {
        assert_eq!(code(parse(DEV, b"{nope")), (None, "malformed_json"));
        assert_eq!(code(parse(DEV, b"[1]")), (None, "malformed_json"));
        assert_eq!(
            code(parse(DEV, br#"{"command":"status"}"#)),
            (None, "invalid_command")
        );
        assert_eq!(
            code(parse(DEV, br#"{"request_id":"a/b","command":"status"}"#)),
            (None, "invalid_command")
        );
        assert_eq!(
            code(parse(DEV, br#"{"request_id":"a"}"#)),
            (Some("a".into()), "invalid_command")
        );
        assert_eq!(
            code(parse(DEV, br#"{"request_id":"a","command":"reboot"}"#)),
            (Some("a".into()), "unknown_command")
        );
        assert_eq!(
            code(parse(
                DEV,
                br#"{"request_id":"a","command":"mcp","payload":{}}"#
            )),
            (Some("a".into()), "invalid_command")
        );
        assert_eq!(
            code(parse(
                DEV,
                br#"{"request_id":"a","command":"status","timeout_ms":-1}"#
            )),
            (Some("a".into()), "invalid_command")
        );
        assert_eq!(
            code(parse(DEV, br#"{"request_id":"a","command":"list_online"}"#)),
            (Some("a".into()), "wrong_topic")
        );
        assert_eq!(
            code(parse(
                FLEET_TOPIC,
                br#"{"request_id":"a","command":"status"}"#
            )),
            (Some("a".into()), "wrong_topic")
        );
        assert_eq!(
            code(parse(
                "xiaozhi/admin/commands/not-a-mac",
                br#"{"request_id":"a","command":"status"}"#
            )),
            (Some("a".into()), "wrong_topic")
        );
        assert_eq!(
            code(parse(
                FLEET_TOPIC,
                br#"{"request_id":"a","command":"list_online","filter":{"colour":"red"}}"#
            )),
            (Some("a".into()), "invalid_command")
        );
    }

    #[test]
    fn timeouts_are_capped() {
        let r = parse(
            DEV,
            br#"{"request_id":"a","command":"status","timeout_ms":999999999}"#,
        );
        assert_eq!(r.unwrap().timeout, Some(MAX_TIMEOUT));
    }

    #[test]
    fn replies_carry_code_and_request_id() {
        let ok: Value = serde_json::from_slice(&ok_reply(
            "r1",
            &json!({"x": 1}),
            "n1",
            None,
            Duration::from_millis(3),
        ))
        .unwrap();
        assert_eq!(
            ok,
            json!({"request_id": "r1", "ok": true, "result": {"x": 1}, "node": "n1", "elapsed_ms": 3})
        );
        let err: Value = serde_json::from_slice(&error_reply(
            None,
            &CommandError::new(ErrorCode::MalformedJson, "bad"),
            "n1",
            Some("n0"),
            Duration::ZERO,
        ))
        .unwrap();
        assert_eq!(err["ok"], false);
        assert_eq!(err["error"]["code"], "malformed_json");
        assert!(err.get("request_id").is_none());
        assert_eq!(
            err["via"], "n0",
            "forwarded replies name the node that forwarded"
        );
        assert!(ok.get("via").is_none());
    }
}
