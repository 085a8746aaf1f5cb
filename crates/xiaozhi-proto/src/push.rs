//! Pushes: messages for a device nobody is talking to (a reminder, an announcement, "say
//! this"), as the gateway takes them in and as the firmware reads them. Sans-IO: the
//! request JSON in, the device's message bytes out; the queue, the clock and the sending
//! are the gateway's (`push/` in the service).
//!
//! What the firmware (78/xiaozhi-esp32, `Application::OnIncomingJson`) does with each
//! kind, which decides what the gateway promises:
//!
//! | kind | the device gets | firmware | acknowledged |
//! | --- | --- | --- | --- |
//! | `notify` | `{"type":"notify","audio_url","subtitles"?}` | downloads the URL (http/https, mono Ogg Opus only) and plays it, only while idle | no |
//! | `wake` | MCP `tools/call` `self.remote_wakeup` (or `self.wakeup`) `{reason}` | opens a conversation and hands `reason` to the speech server | the tool's `true` |
//! | `custom` | `{"type":"custom","payload":{...}}` | shown with `CONFIG_RECEIVE_CUSTOM_MESSAGE` (off by default) | no |
//! | `alert` | `{"type":"alert","status","message","emotion"}` | shows it in any state | no |
//! | `reboot` | `{"type":"system","command":"reboot"}` | reboots | no |
//!
//! No message carries a session id: the firmware dispatches on `type` alone.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::mac::Mac;

/// The MCP tools a `wake` push calls, in the order they are tried: the calling forks'
/// name first, then the one proposed upstream.
pub const WAKE_TOOLS: [&str; 2] = ["self.remote_wakeup", "self.wakeup"];

/// Longest `reason` of a wake push, in characters (it becomes the device's first
/// utterance to the speech server).
pub const MAX_REASON_CHARS: usize = 500;
/// Most subtitles of a notify push.
pub const MAX_SUBTITLES: usize = 200;
/// Longest group name accepted as a target.
pub const MAX_GROUP_CHARS: usize = 128;

/// What a push does on the device.
#[derive(Debug, Clone, PartialEq)]
pub enum PushKind {
    Notify {
        audio_url: String,
        subtitles: Vec<Subtitle>,
    },
    Wake {
        reason: String,
    },
    Custom {
        payload: Map<String, Value>,
    },
    Alert {
        status: String,
        message: String,
        emotion: String,
    },
    Reboot,
}

/// One subtitle of a notify push: shown from `start_ms` into the audio.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subtitle {
    pub start_ms: u64,
    pub text: String,
}

/// Who a push is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Devices(Vec<Mac>),
    /// Every device of a manager-api group (the client id's `GROUP@@@` part).
    Group(String),
    /// Every device the gateway knows.
    Fleet,
}

/// When a push stops being worth delivering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// This many seconds after it was queued.
    Ttl(u64),
    /// At this Unix time, in milliseconds.
    At(i64),
}

/// A push as asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct PushRequest {
    pub kind: PushKind,
    pub target: Target,
    /// `None`: the gateway's default time to live.
    pub expiry: Option<Expiry>,
}

/// Where a push is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PushState {
    /// Waiting for its device to be connected and idle.
    Queued,
    /// A node has taken it and is sending it now.
    Sending,
    /// Written to the device's connection (the firmware does not acknowledge).
    Sent,
    /// The device acknowledged it (`wake`: the tool answered `true`).
    Delivered,
    /// Its `expires_at` passed before it could be sent.
    Expired,
    /// The device refused it or could not be reached for it; `error` says why.
    Failed,
}

impl PushState {
    pub const ALL: [PushState; 6] = [
        PushState::Queued,
        PushState::Sending,
        PushState::Sent,
        PushState::Delivered,
        PushState::Expired,
        PushState::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            PushState::Queued => "queued",
            PushState::Sending => "sending",
            PushState::Sent => "sent",
            PushState::Delivered => "delivered",
            PushState::Expired => "expired",
            PushState::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<PushState> {
        PushState::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// Whether nothing more happens to a push in this state.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            PushState::Sent | PushState::Delivered | PushState::Expired | PushState::Failed
        )
    }
}

/// Why a push request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct InvalidPush {
    /// The field at fault (`kind`, `audio_url`, `to`, ...).
    pub field: &'static str,
    pub message: String,
}

fn invalid(field: &'static str, message: impl Into<String>) -> InvalidPush {
    InvalidPush {
        field,
        message: message.into(),
    }
}

/// The bounds a request is checked against.
#[derive(Debug, Clone, Copy)]
pub struct PushLimits {
    /// Largest message a device is sent (the JSON on its topic), in bytes.
    pub max_message_bytes: usize,
    /// Most devices one request may name in `to`.
    pub max_devices: usize,
    /// Longest time to live a request may ask for, in seconds.
    pub max_ttl_secs: u64,
}

impl Default for PushLimits {
    fn default() -> Self {
        PushLimits {
            max_message_bytes: 16 * 1024,
            max_devices: 10_000,
            max_ttl_secs: 30 * 24 * 3600,
        }
    }
}

impl PushKind {
    pub fn name(&self) -> &'static str {
        match self {
            PushKind::Notify { .. } => "notify",
            PushKind::Wake { .. } => "wake",
            PushKind::Custom { .. } => "custom",
            PushKind::Alert { .. } => "alert",
            PushKind::Reboot => "reboot",
        }
    }

    /// The JSON the device is sent on its topic, exactly as the firmware reads it; `None`
    /// for `wake`, which is an MCP call ([`wake_call`]).
    pub fn device_message(&self) -> Option<Value> {
        Some(match self {
            PushKind::Notify {
                audio_url,
                subtitles,
            } => {
                let mut m = json!({"type": "notify", "audio_url": audio_url});
                if !subtitles.is_empty() {
                    m["subtitles"] = json!(subtitles);
                }
                m
            }
            PushKind::Wake { .. } => return None,
            PushKind::Custom { payload } => json!({"type": "custom", "payload": payload}),
            PushKind::Alert {
                status,
                message,
                emotion,
            } => json!({"type": "alert", "status": status, "message": message, "emotion": emotion}),
            PushKind::Reboot => json!({"type": "system", "command": "reboot"}),
        })
    }

    /// The kind's fields as stored (`kind` aside): what [`PushKind::from_stored`] reads back.
    pub fn to_stored(&self) -> Value {
        match self {
            PushKind::Wake { reason } => json!({"reason": reason}),
            other => {
                let mut m = other.device_message().unwrap_or(Value::Null);
                if let Some(obj) = m.as_object_mut() {
                    obj.remove("type");
                }
                m
            }
        }
    }

    /// A kind read back from its name and stored fields.
    pub fn from_stored(kind: &str, fields: &Value) -> Result<PushKind, InvalidPush> {
        let obj = fields
            .as_object()
            .ok_or_else(|| invalid("kind", "stored push fields are not an object"))?;
        parse_kind(
            kind,
            obj,
            &PushLimits {
                max_message_bytes: usize::MAX,
                ..PushLimits::default()
            },
        )
    }
}

/// The arguments of the MCP `tools/call` a wake push makes with `tool`.
pub fn wake_call(tool: &str, reason: &str) -> Value {
    json!({"name": tool, "arguments": {"reason": reason}})
}

/// Whether a wake tool's MCP result is the firmware's acknowledgement: a result whose
/// text is `true` (how the firmware returns a tool's boolean) and not an error.
pub fn wake_acknowledged(result: &Value) -> bool {
    if result.get("isError").and_then(Value::as_bool) == Some(true) {
        return false;
    }
    result
        .get("content")
        .and_then(Value::as_array)
        .and_then(|c| c.first())
        .and_then(|c| c.get("text"))
        .and_then(Value::as_str)
        .is_some_and(|t| t.trim() == "true")
}

/// The wake tool to call: the first of [`WAKE_TOOLS`] among the device's tool names.
pub fn wake_tool<'a>(tools: impl IntoIterator<Item = &'a str>) -> Option<&'static str> {
    let names: Vec<&str> = tools.into_iter().collect();
    WAKE_TOOLS.into_iter().find(|t| names.contains(t))
}

/// Parses and checks a push request:
///
/// ```json
/// {"kind": "notify", "to": "aa:bb:cc:dd:ee:ff", "audio_url": "https://...",
///  "subtitles": [{"start_ms": 0, "text": "..."}], "ttl_secs": 3600}
/// ```
///
/// Exactly one target: `to` (a MAC or a list of MACs, colon, dash or underscore form),
/// `group`, or `"fleet": true`. `device` (set by the caller from a topic or URL) stands
/// for `to`. Optional: `ttl_secs` or `expires_at` (Unix milliseconds).
pub fn parse_request(
    body: &Value,
    device: Option<Mac>,
    limits: &PushLimits,
) -> Result<PushRequest, InvalidPush> {
    let obj = body
        .as_object()
        .ok_or_else(|| invalid("body", "a push is a JSON object"))?;
    let kind_name = obj.get("kind").and_then(Value::as_str).ok_or_else(|| {
        invalid(
            "kind",
            "kind (notify, wake, custom, alert or reboot) is required",
        )
    })?;
    let kind = parse_kind(kind_name, obj, limits)?;
    let target = parse_target(obj, device, limits)?;
    let expiry = match (obj.get("ttl_secs"), obj.get("expires_at")) {
        (Some(_), Some(_)) => {
            return Err(invalid("ttl_secs", "give ttl_secs or expires_at, not both"));
        }
        (Some(ttl), None) => match ttl.as_u64() {
            Some(s) if s > 0 && s <= limits.max_ttl_secs => Some(Expiry::Ttl(s)),
            _ => {
                return Err(invalid(
                    "ttl_secs",
                    format!("ttl_secs must be 1-{} seconds", limits.max_ttl_secs),
                ));
            }
        },
        (None, Some(at)) => match at.as_i64() {
            Some(ms) if ms > 0 => Some(Expiry::At(ms)),
            _ => {
                return Err(invalid(
                    "expires_at",
                    "expires_at must be a Unix time in milliseconds",
                ));
            }
        },
        (None, None) => None,
    };
    Ok(PushRequest {
        kind,
        target,
        expiry,
    })
}

/// The expiry of a push queued at `now_ms`, in Unix milliseconds: past, or beyond the
/// longest time to live, is refused (nothing is queued that could never be delivered).
pub fn expires_at_ms(
    expiry: Option<Expiry>,
    now_ms: i64,
    default_ttl_secs: u64,
    limits: &PushLimits,
) -> Result<i64, InvalidPush> {
    let max = now_ms.saturating_add((limits.max_ttl_secs as i64).saturating_mul(1000));
    match expiry.unwrap_or(Expiry::Ttl(default_ttl_secs)) {
        Expiry::Ttl(s) => Ok(now_ms
            .saturating_add((s as i64).saturating_mul(1000))
            .min(max)),
        Expiry::At(at) if at <= now_ms => Err(invalid(
            "expires_at",
            format!("expires_at {at} is not in the future (now {now_ms})"),
        )),
        Expiry::At(at) if at > max => Err(invalid(
            "expires_at",
            format!(
                "expires_at is beyond the longest time to live ({} s)",
                limits.max_ttl_secs
            ),
        )),
        Expiry::At(at) => Ok(at),
    }
}

fn parse_target(
    obj: &Map<String, Value>,
    device: Option<Mac>,
    limits: &PushLimits,
) -> Result<Target, InvalidPush> {
    let to = obj.get("to").filter(|v| !v.is_null());
    let group = obj.get("group").filter(|v| !v.is_null());
    let fleet = obj.get("fleet").filter(|v| !v.is_null());
    let given = [
        device.is_some(),
        to.is_some(),
        group.is_some(),
        fleet.is_some(),
    ];
    if given.iter().filter(|g| **g).count() != 1 {
        return Err(invalid(
            "to",
            "name exactly one target: to (a MAC or a list), group, or \"fleet\": true",
        ));
    }
    if let Some(mac) = device {
        return Ok(Target::Devices(vec![mac]));
    }
    let parse_mac = |v: &Value| -> Result<Mac, InvalidPush> {
        let s = v
            .as_str()
            .ok_or_else(|| invalid("to", "to holds MAC addresses as strings"))?;
        s.replace('-', ":")
            .parse::<Mac>()
            .map_err(|_| invalid("to", format!("{s:?} is not a MAC address")))
    };
    if let Some(to) = to {
        let mut macs = match to {
            Value::Array(list) => list.iter().map(parse_mac).collect::<Result<Vec<_>, _>>()?,
            one => vec![parse_mac(one)?],
        };
        macs.sort_unstable();
        macs.dedup();
        if macs.is_empty() {
            return Err(invalid("to", "to is an empty list"));
        }
        if macs.len() > limits.max_devices {
            return Err(invalid(
                "to",
                format!(
                    "to names {} devices; at most {} (use group or fleet)",
                    macs.len(),
                    limits.max_devices
                ),
            ));
        }
        return Ok(Target::Devices(macs));
    }
    if let Some(group) = group {
        return match group.as_str() {
            Some(g) if !g.is_empty() && g.chars().count() <= MAX_GROUP_CHARS => {
                Ok(Target::Group(g.to_owned()))
            }
            _ => Err(invalid(
                "group",
                format!("group must be a name of 1-{MAX_GROUP_CHARS} characters"),
            )),
        };
    }
    match fleet {
        Some(Value::Bool(true)) => Ok(Target::Fleet),
        _ => Err(invalid("fleet", "fleet must be true")),
    }
}

fn string_field(
    obj: &Map<String, Value>,
    field: &'static str,
    kind: &str,
) -> Result<String, InvalidPush> {
    match obj.get(field) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        _ => Err(invalid(
            field,
            format!("{kind} needs {field} (a non-empty string)"),
        )),
    }
}

fn parse_kind(
    name: &str,
    obj: &Map<String, Value>,
    limits: &PushLimits,
) -> Result<PushKind, InvalidPush> {
    let kind = match name {
        "notify" => {
            let audio_url = string_field(obj, "audio_url", "notify")?;
            check_audio_url(&audio_url)?;
            let subtitles = match obj.get("subtitles") {
                None | Some(Value::Null) => Vec::new(),
                Some(Value::Array(list)) => {
                    if list.len() > MAX_SUBTITLES {
                        return Err(invalid(
                            "subtitles",
                            format!("at most {MAX_SUBTITLES} subtitles"),
                        ));
                    }
                    let mut subs = list
                        .iter()
                        .map(|s| {
                            serde_json::from_value::<Subtitle>(s.clone()).map_err(|_| {
                                invalid(
                                    "subtitles",
                                    "each subtitle is {\"start_ms\": <ms>, \"text\": \"...\"}",
                                )
                            })
                        })
                        .collect::<Result<Vec<_>, _>>()?;
                    // The firmware sorts them too; sending them sorted shows intent.
                    subs.sort_by_key(|s| s.start_ms);
                    subs
                }
                Some(_) => {
                    return Err(invalid(
                        "subtitles",
                        "subtitles must be a list (the firmware drops the whole message otherwise)",
                    ));
                }
            };
            PushKind::Notify {
                audio_url,
                subtitles,
            }
        }
        "wake" => {
            let reason = string_field(obj, "reason", "wake")?;
            if reason.chars().count() > MAX_REASON_CHARS {
                return Err(invalid(
                    "reason",
                    format!("reason is longer than {MAX_REASON_CHARS} characters"),
                ));
            }
            PushKind::Wake { reason }
        }
        "custom" => match obj.get("payload") {
            Some(Value::Object(p)) => PushKind::Custom { payload: p.clone() },
            _ => {
                return Err(invalid("payload", "custom needs payload (a JSON object)"));
            }
        },
        "alert" => PushKind::Alert {
            status: string_field(obj, "status", "alert")?,
            message: string_field(obj, "message", "alert")?,
            emotion: match obj.get("emotion") {
                None | Some(Value::Null) => "neutral".to_owned(),
                Some(Value::String(e)) if !e.is_empty() => e.clone(),
                Some(_) => {
                    return Err(invalid("emotion", "emotion must be a non-empty string"));
                }
            },
        },
        "reboot" => PushKind::Reboot,
        other => {
            return Err(invalid(
                "kind",
                format!(
                    "unknown kind {:?}; known: notify, wake, custom, alert, reboot",
                    other.chars().take(32).collect::<String>()
                ),
            ));
        }
    };
    let size = match kind.device_message() {
        Some(m) => m.to_string().len(),
        None => kind.to_stored().to_string().len(),
    };
    if size > limits.max_message_bytes {
        return Err(invalid(
            "body",
            format!(
                "the device message would be {size} bytes; at most {} (push.max_message_bytes)",
                limits.max_message_bytes
            ),
        ));
    }
    Ok(kind)
}

/// Translates the official gateway's Redis RPC, `{"method": "forward", "clientId": "<client
/// id or MAC>", "params": {<the message for the device>}}` (78/xiaozhi-esp32
/// `docs/notify.md`), into a push request: `params` is the message the device would get,
/// so its `type` names the kind (`notify`, `alert`, `custom`, `system` `reboot`, or an
/// `mcp` `tools/call` of a wake tool). `ttl_secs` and `expires_at` beside `method` carry
/// over. The translated request is then checked like any other.
pub fn from_forward_rpc(rpc: &Value) -> Result<Value, InvalidPush> {
    let obj = rpc
        .as_object()
        .ok_or_else(|| invalid("body", "the RPC is a JSON object"))?;
    if obj.get("method").and_then(Value::as_str) != Some("forward") {
        return Err(invalid("method", "method must be \"forward\""));
    }
    let client_id = obj
        .get("clientId")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid("clientId", "clientId (a string) is required"))?;
    let parts: Vec<&str> = client_id.split("@@@").collect();
    let mac_text = match parts.as_slice() {
        [mac] | [_, mac] | [_, mac, _] => *mac,
        _ => "",
    };
    let mac: Mac = mac_text.replace('-', ":").parse().map_err(|_| {
        invalid(
            "clientId",
            format!("no MAC address in clientId {client_id:?}"),
        )
    })?;
    let params = obj
        .get("params")
        .and_then(Value::as_object)
        .ok_or_else(|| invalid("params", "params (the message for the device) is required"))?;
    let mut body = match params.get("type").and_then(Value::as_str) {
        Some(kind @ ("notify" | "alert" | "custom")) => {
            let mut body = params.clone();
            body.remove("type");
            body.insert("kind".into(), kind.into());
            body
        }
        Some("system") if params.get("command").and_then(Value::as_str) == Some("reboot") => {
            Map::from_iter([("kind".to_owned(), Value::from("reboot"))])
        }
        Some("mcp") => {
            let call = &params["payload"];
            let tool = call["params"]["name"].as_str().unwrap_or_default();
            if call["method"] != "tools/call" || !WAKE_TOOLS.contains(&tool) {
                return Err(invalid(
                    "params",
                    "an mcp message is pushed only as a wake (tools/call of self.remote_wakeup)",
                ));
            }
            let reason = call["params"]["arguments"]["reason"].clone();
            Map::from_iter([
                ("kind".to_owned(), Value::from("wake")),
                ("reason".to_owned(), reason),
            ])
        }
        other => {
            return Err(invalid(
                "params",
                format!(
                    "params.type {:?} cannot be pushed; known: notify, alert, custom, system (reboot), mcp (wake)",
                    other.unwrap_or("")
                ),
            ));
        }
    };
    body.insert("to".into(), mac.colon().into());
    for key in ["ttl_secs", "expires_at"] {
        if let Some(v) = obj.get(key) {
            body.insert(key.into(), v.clone());
        }
    }
    Ok(Value::Object(body))
}

/// The firmware fetches `audio_url` itself with its own HTTP client: only `http://` and
/// `https://` with a host, no spaces or control characters.
pub fn check_audio_url(url: &str) -> Result<(), InvalidPush> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or_else(|| {
            invalid(
                "audio_url",
                "audio_url must start with http:// or https:// (the firmware fetches nothing else)",
            )
        })?;
    let host = rest.split(['/', '?', '#']).next().unwrap_or("");
    if host.is_empty() || host.starts_with(':') {
        return Err(invalid("audio_url", "audio_url has no host"));
    }
    if url.len() > 2048 || url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(invalid(
            "audio_url",
            "audio_url must be at most 2048 characters without spaces",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mac() -> Mac {
        "aa:bb:cc:dd:ee:01".parse().unwrap()
    }

    fn parse(v: Value) -> Result<PushRequest, InvalidPush> {
        parse_request(&v, None, &PushLimits::default())
    }

    #[test]
    fn each_kind_becomes_the_message_the_firmware_reads() {
        let cases = [
            (
                json!({"kind": "notify", "to": "aa:bb:cc:dd:ee:01", "audio_url": "https://x.example/a.ogg",
                       "subtitles": [{"start_ms": 900, "text": "b"}, {"start_ms": 0, "text": "a"}]}),
                json!({"type": "notify", "audio_url": "https://x.example/a.ogg",
                       "subtitles": [{"start_ms": 0, "text": "a"}, {"start_ms": 900, "text": "b"}]}),
            ),
            (
                json!({"kind": "notify", "to": "aa:bb:cc:dd:ee:01", "audio_url": "http://10.0.0.1:8080/a.ogg"}),
                json!({"type": "notify", "audio_url": "http://10.0.0.1:8080/a.ogg"}),
            ),
            (
                json!({"kind": "custom", "to": "aa:bb:cc:dd:ee:01", "payload": {"a": [1, 2]}}),
                json!({"type": "custom", "payload": {"a": [1, 2]}}),
            ),
            (
                json!({"kind": "alert", "to": "aa:bb:cc:dd:ee:01", "status": "Reminder", "message": "Water the plants"}),
                json!({"type": "alert", "status": "Reminder", "message": "Water the plants", "emotion": "neutral"}),
            ),
            (
                json!({"kind": "reboot", "to": "aa:bb:cc:dd:ee:01"}),
                json!({"type": "system", "command": "reboot"}),
            ),
        ];
        for (request, want) in cases {
            let push = parse(request).unwrap();
            assert_eq!(push.kind.device_message().unwrap(), want);
            // What is stored reads back as the same kind.
            let back = PushKind::from_stored(push.kind.name(), &push.kind.to_stored()).unwrap();
            assert_eq!(back, push.kind);
        }
        let wake =
            parse(json!({"kind": "wake", "to": "aa:bb:cc:dd:ee:01", "reason": "Say good morning"}))
                .unwrap();
        assert_eq!(wake.kind.device_message(), None);
        assert_eq!(
            PushKind::from_stored("wake", &wake.kind.to_stored()).unwrap(),
            wake.kind
        );
        assert_eq!(
            wake_call("self.remote_wakeup", "Say good morning"),
            json!({"name": "self.remote_wakeup", "arguments": {"reason": "Say good morning"}})
        );
    }

    #[test]
    fn targets() {
        let p = parse(json!({"kind": "reboot", "to": ["AA-BB-CC-DD-EE-02", "aa:bb:cc:dd:ee:01", "aa_bb_cc_dd_ee_02"]}))
            .unwrap();
        assert_eq!(
            p.target,
            Target::Devices(vec![
                "aa:bb:cc:dd:ee:01".parse().unwrap(),
                "aa:bb:cc:dd:ee:02".parse().unwrap()
            ])
        );
        assert_eq!(
            parse(json!({"kind": "reboot", "group": "GID_test"}))
                .unwrap()
                .target,
            Target::Group("GID_test".into())
        );
        assert_eq!(
            parse(json!({"kind": "reboot", "fleet": true}))
                .unwrap()
                .target,
            Target::Fleet
        );
        let from_topic = parse_request(
            &json!({"kind": "reboot"}),
            Some(mac()),
            &PushLimits::default(),
        )
        .unwrap();
        assert_eq!(from_topic.target, Target::Devices(vec![mac()]));
        for bad in [
            json!({"kind": "reboot"}),
            json!({"kind": "reboot", "to": "aa:bb:cc:dd:ee:01", "fleet": true}),
            json!({"kind": "reboot", "to": []}),
            json!({"kind": "reboot", "to": "not-a-mac"}),
            json!({"kind": "reboot", "to": [1]}),
            json!({"kind": "reboot", "fleet": false}),
            json!({"kind": "reboot", "group": ""}),
        ] {
            assert!(parse(bad.clone()).is_err(), "{bad}");
        }
        let limits = PushLimits {
            max_devices: 1,
            ..PushLimits::default()
        };
        let too_many = json!({"kind": "reboot", "to": ["aa:bb:cc:dd:ee:01", "aa:bb:cc:dd:ee:02"]});
        assert_eq!(
            parse_request(&too_many, None, &limits).unwrap_err().field,
            "to"
        );
    }

    #[test]
    fn bad_fields_name_themselves() {
        let to = "aa:bb:cc:dd:ee:01";
        for (body, field) in [
            (json!({"to": to}), "kind"),
            (json!({"kind": "sing", "to": to}), "kind"),
            (json!({"kind": "notify", "to": to}), "audio_url"),
            (
                json!({"kind": "notify", "to": to, "audio_url": "ftp://x/a.ogg"}),
                "audio_url",
            ),
            (
                json!({"kind": "notify", "to": to, "audio_url": "https://"}),
                "audio_url",
            ),
            (
                json!({"kind": "notify", "to": to, "audio_url": "https://x/a b.ogg"}),
                "audio_url",
            ),
            (
                json!({"kind": "notify", "to": to, "audio_url": "https://x/a.ogg", "subtitles": {}}),
                "subtitles",
            ),
            (
                json!({"kind": "notify", "to": to, "audio_url": "https://x/a.ogg", "subtitles": [{"text": "a"}]}),
                "subtitles",
            ),
            (json!({"kind": "wake", "to": to}), "reason"),
            (
                json!({"kind": "wake", "to": to, "reason": "x".repeat(MAX_REASON_CHARS + 1)}),
                "reason",
            ),
            (
                json!({"kind": "custom", "to": to, "payload": [1]}),
                "payload",
            ),
            (json!({"kind": "alert", "to": to, "message": "m"}), "status"),
            (
                json!({"kind": "alert", "to": to, "status": "s", "message": "m", "emotion": 3}),
                "emotion",
            ),
            (
                json!({"kind": "reboot", "to": to, "ttl_secs": 0}),
                "ttl_secs",
            ),
            (
                json!({"kind": "reboot", "to": to, "ttl_secs": 1, "expires_at": 5}),
                "ttl_secs",
            ),
            (
                json!({"kind": "reboot", "to": to, "expires_at": "tomorrow"}),
                "expires_at",
            ),
            (
                json!({"kind": "custom", "to": to, "payload": {"x": "y".repeat(20_000)}}),
                "body",
            ),
            (json!([1]), "body"),
        ] {
            assert_eq!(parse(body.clone()).unwrap_err().field, field, "{body}");
        }
    }

    #[test]
    fn expiry_is_resolved_against_now() {
        let limits = PushLimits::default();
        let now = 1_000_000;
        assert_eq!(expires_at_ms(None, now, 60, &limits).unwrap(), now + 60_000);
        assert_eq!(
            expires_at_ms(Some(Expiry::Ttl(5)), now, 60, &limits).unwrap(),
            now + 5_000
        );
        assert_eq!(
            expires_at_ms(Some(Expiry::At(now + 1)), now, 60, &limits).unwrap(),
            now + 1
        );
        assert!(expires_at_ms(Some(Expiry::At(now)), now, 60, &limits).is_err());
        let far = now + (limits.max_ttl_secs as i64) * 1000 + 1;
        assert!(expires_at_ms(Some(Expiry::At(far)), now, 60, &limits).is_err());
    }

    #[test]
    fn wake_acknowledgement_and_tool_choice() {
        assert!(wake_acknowledged(
            &json!({"content": [{"type": "text", "text": "true"}]})
        ));
        assert!(!wake_acknowledged(
            &json!({"content": [{"type": "text", "text": "false"}]})
        ));
        assert!(!wake_acknowledged(
            &json!({"content": [{"type": "text", "text": "true"}], "isError": true})
        ));
        assert!(!wake_acknowledged(&json!({})));
        assert_eq!(
            wake_tool(["self.get_device_status", "self.wakeup"]),
            Some("self.wakeup")
        );
        assert_eq!(
            wake_tool(["self.wakeup", "self.remote_wakeup"]),
            Some("self.remote_wakeup")
        );
        assert_eq!(wake_tool(["self.get_device_status"]), None);
    }

    #[test]
    fn the_official_gateways_forward_rpc_becomes_a_push() {
        let limits = PushLimits::default();
        let cases = [
            (
                json!({"method": "forward", "clientId": "GID_test@@@aa_bb_cc_dd_ee_01@@@aa_bb_cc_dd_ee_01",
                       "params": {"type": "notify", "audio_url": "https://x/a.ogg", "subtitles": [{"start_ms": 0, "text": "a"}]}}),
                json!({"type": "notify", "audio_url": "https://x/a.ogg", "subtitles": [{"start_ms": 0, "text": "a"}]}),
            ),
            (
                json!({"method": "forward", "clientId": "aa:bb:cc:dd:ee:01",
                       "params": {"type": "alert", "status": "s", "message": "m", "emotion": "sad"}}),
                json!({"type": "alert", "status": "s", "message": "m", "emotion": "sad"}),
            ),
            (
                json!({"method": "forward", "clientId": "AA-BB-CC-DD-EE-01", "params": {"type": "system", "command": "reboot"}}),
                json!({"type": "system", "command": "reboot"}),
            ),
        ];
        for (rpc, message) in cases {
            let body = from_forward_rpc(&rpc).unwrap();
            let push = parse_request(&body, None, &limits).unwrap();
            assert_eq!(push.target, Target::Devices(vec![mac()]));
            assert_eq!(push.kind.device_message().unwrap(), message);
        }
        let wake = json!({"method": "forward", "clientId": "aa_bb_cc_dd_ee_01", "ttl_secs": 60,
            "params": {"type": "mcp", "payload": {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                "params": {"name": "self.remote_wakeup", "arguments": {"reason": "hi"}}}}});
        let push = parse_request(&from_forward_rpc(&wake).unwrap(), None, &limits).unwrap();
        assert_eq!(
            push.kind,
            PushKind::Wake {
                reason: "hi".into()
            }
        );
        assert_eq!(push.expiry, Some(Expiry::Ttl(60)));
        for (bad, field) in [
            (
                json!({"method": "kick", "clientId": "aa:bb:cc:dd:ee:01", "params": {}}),
                "method",
            ),
            (
                json!({"method": "forward", "clientId": "x@@@y", "params": {"type": "alert"}}),
                "clientId",
            ),
            (
                json!({"method": "forward", "clientId": "aa:bb:cc:dd:ee:01"}),
                "params",
            ),
            (
                json!({"method": "forward", "clientId": "aa:bb:cc:dd:ee:01", "params": {"type": "hello"}}),
                "params",
            ),
            (
                json!({"method": "forward", "clientId": "aa:bb:cc:dd:ee:01",
                    "params": {"type": "mcp", "payload": {"method": "tools/call", "params": {"name": "self.reboot"}}}}),
                "params",
            ),
        ] {
            assert_eq!(from_forward_rpc(&bad).unwrap_err().field, field, "{bad}");
        }
    }

    #[test]
    fn states_round_trip_and_know_which_are_final() {
        for s in PushState::ALL {
            assert_eq!(PushState::parse(s.as_str()), Some(s));
        }
        assert!(!PushState::Queued.is_final() && !PushState::Sending.is_final());
        assert!(PushState::Sent.is_final() && PushState::Expired.is_final());
    }
}
