//! `xiaozhi-gateway push`: queue a push (notify, wake, custom, alert, reboot) for one
//! device, a list, a group or the fleet, through the MQTT admin command `push`, as any
//! admin client sends it. The reply (batch id, each device's push id) is printed; the
//! pushes' states are on `GET /api/push` and the bus (`xiaozhi/devices/<mac_>/push`).

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, ValueEnum};
use serde_json::{Map, Value, json};
use xiaozhi_gateway::config::Config;
use xiaozhi_gateway::protocol::mac::Mac;

use super::admin::{AdminArgs, admin_client};

/// What the push does on the device.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum PushKindArg {
    /// Download and play `--audio-url` (mono Ogg Opus), with optional subtitles.
    Notify,
    /// Wake the device with `--reason`, which it hands to its speech server.
    Wake,
    /// Any JSON object (`--payload`), for firmware built with custom messages.
    Custom,
    /// Show `--status` and `--message` (with `--emotion`).
    Alert,
    /// Reboot the device.
    Reboot,
}

#[derive(Args)]
pub struct PushArgs {
    #[command(flatten)]
    admin: AdminArgs,
    /// What to push.
    kind: PushKindArg,
    /// A device (repeat for a list).
    #[arg(long = "to", value_name = "MAC")]
    to: Vec<Mac>,
    /// Every device of this client-id group.
    #[arg(long, conflicts_with_all = ["to", "fleet"])]
    group: Option<String>,
    /// Every device the gateway knows.
    #[arg(long, conflicts_with_all = ["to", "group"])]
    fleet: bool,
    /// notify: the clip's URL (http or https).
    #[arg(long)]
    audio_url: Option<String>,
    /// notify: a subtitle shown from this point of the clip, `MS:TEXT` (repeat).
    #[arg(long = "subtitle", value_name = "MS:TEXT")]
    subtitles: Vec<String>,
    /// wake: what the device tells its speech server.
    #[arg(long)]
    reason: Option<String>,
    /// alert: the title.
    #[arg(long)]
    status: Option<String>,
    /// alert: the text.
    #[arg(long)]
    message: Option<String>,
    /// alert: the emotion shown (default neutral).
    #[arg(long)]
    emotion: Option<String>,
    /// custom: the JSON object sent as `payload`.
    #[arg(long, value_name = "JSON")]
    payload: Option<String>,
    /// Give up on devices that are not reached within this many seconds (default:
    /// push.default_ttl_secs).
    #[arg(long)]
    ttl_secs: Option<u64>,
}

/// The push request the arguments describe (checked again, fully, by the gateway).
pub fn request_of(args: &PushArgs) -> Result<Value, String> {
    let mut body = Map::new();
    let kind = match args.kind {
        PushKindArg::Notify => "notify",
        PushKindArg::Wake => "wake",
        PushKindArg::Custom => "custom",
        PushKindArg::Alert => "alert",
        PushKindArg::Reboot => "reboot",
    };
    body.insert("kind".into(), kind.into());
    match (args.to.as_slice(), &args.group, args.fleet) {
        ([], None, false) => {
            return Err("name the devices: --to MAC (repeatable), --group or --fleet".into());
        }
        ([one], None, false) => {
            body.insert("to".into(), one.colon().into());
        }
        (many, None, false) => {
            body.insert(
                "to".into(),
                many.iter().map(Mac::colon).collect::<Vec<_>>().into(),
            );
        }
        (_, Some(group), _) => {
            body.insert("group".into(), group.clone().into());
        }
        (_, None, true) => {
            body.insert("fleet".into(), true.into());
        }
    }
    let mut put = |key: &str, value: &Option<String>| {
        if let Some(v) = value {
            body.insert(key.into(), v.clone().into());
        }
    };
    put("audio_url", &args.audio_url);
    put("reason", &args.reason);
    put("status", &args.status);
    put("message", &args.message);
    put("emotion", &args.emotion);
    if !args.subtitles.is_empty() {
        let subtitles = args
            .subtitles
            .iter()
            .map(|s| {
                let (ms, text) = s
                    .split_once(':')
                    .ok_or_else(|| format!("--subtitle {s:?}: want MS:TEXT"))?;
                let ms: u64 = ms
                    .trim()
                    .parse()
                    .map_err(|_| format!("--subtitle {s:?}: {ms:?} is not milliseconds"))?;
                Ok(json!({"start_ms": ms, "text": text}))
            })
            .collect::<Result<Vec<_>, String>>()?;
        body.insert("subtitles".into(), subtitles.into());
    }
    if let Some(payload) = &args.payload {
        let payload: Value =
            serde_json::from_str(payload).map_err(|e| format!("--payload is not JSON: {e}"))?;
        body.insert("payload".into(), payload);
    }
    if let Some(ttl) = args.ttl_secs {
        body.insert("ttl_secs".into(), ttl.into());
    }
    Ok(Value::Object(body))
}

/// `push`: exit 0 when queued, 1 when the gateway refused it, 2 when it could not be
/// asked.
pub async fn push(config: &Config, args: PushArgs) -> ExitCode {
    let request = match request_of(&args) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let client = match admin_client(config, &args.admin).await {
        Ok(c) => c,
        Err(code) => return code,
    };
    let timeout = Duration::from_millis(args.admin.timeout_ms);
    let reply = client
        .request(
            None,
            json!({"command": "push", "payload": request}),
            timeout,
        )
        .await;
    client.disconnect().await;
    let reply = match reply {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    if args.admin.json {
        println!("{reply}");
    }
    if reply["ok"] != true {
        eprintln!(
            "error: {}: {}",
            reply["error"]["code"].as_str().unwrap_or("?"),
            reply["error"]["message"].as_str().unwrap_or("")
        );
        return ExitCode::FAILURE;
    }
    if !args.admin.json {
        let result = &reply["result"];
        println!(
            "queued {} push(es) of kind {}, batch {}",
            result["devices"],
            result["kind"].as_str().unwrap_or(""),
            result["batch_id"].as_str().unwrap_or("")
        );
        for p in result["pushes"].as_array().into_iter().flatten() {
            println!(
                "  {}  {}",
                p["mac_address"].as_str().unwrap_or(""),
                p["id"].as_str().unwrap_or("")
            );
        }
    }
    ExitCode::SUCCESS
}
