//! `xiaozhi-gateway devices` and `xiaozhi-gateway cmd`: an operator's admin commands over
//! MQTT, as any admin client sends them (`list_online`, `status`, `goodbye`, `kick`,
//! `mcp`, ...), to the embedded broker listener or, in a cluster, the external broker.
//! The replies are printed as a table or as JSON.

use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use xiaozhi_gateway::admin::client::AdminClient;
use xiaozhi_gateway::config::Config;
use xiaozhi_gateway::protocol::mac::Mac;

#[derive(Args)]
pub struct AdminArgs {
    /// Broker address (default: broker.listen from the config, or with
    /// `bus.mode = "external"` the broker in bus.url).
    #[arg(long)]
    broker: Option<std::net::SocketAddr>,
    /// Broker user (default: the first admin in broker.users).
    #[arg(long, env = "XZ_ADMIN_USERNAME")]
    username: Option<String>,
    #[arg(long, env = "XZ_ADMIN_PASSWORD", hide_env_values = true)]
    password: Option<String>,
    /// How long to wait for the reply, in ms.
    #[arg(long, default_value_t = 10_000)]
    pub(crate) timeout_ms: u64,
    /// Print the raw JSON reply.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Args)]
pub struct DevicesArgs {
    #[command(flatten)]
    admin: AdminArgs,
    /// Only devices in this state: online or in_session.
    #[arg(long)]
    state: Option<String>,
    /// Only devices on this gateway node.
    #[arg(long)]
    node: Option<String>,
    /// Only devices of this client-id group.
    #[arg(long)]
    group: Option<String>,
}

#[derive(Args)]
pub struct CmdArgs {
    #[command(flatten)]
    admin: AdminArgs,
    /// The device's MAC (aa:bb:cc:dd:ee:ff or aa_bb_cc_dd_ee_ff).
    mac: Mac,
    /// status, goodbye, kick, mcp (or any command the gateway knows).
    command: String,
    /// For mcp: the JSON-RPC request (`{"method":...,"params":...}`); for others: extra
    /// fields of the command as a JSON object (e.g. `{"reason":"maintenance"}`).
    #[arg(value_name = "JSON")]
    payload: Option<String>,
}

pub(crate) async fn admin_client(
    config: &Config,
    args: &AdminArgs,
) -> Result<AdminClient, ExitCode> {
    let external = config.bus.mode == xiaozhi_gateway::config::BusMode::External;
    // Where admins connect: --broker, else the external bus broker, else the embedded
    // broker listener.
    let (host, port) = match (args.broker, external) {
        (Some(addr), _) => (addr.ip().to_string(), addr.port()),
        (None, true) => match config.bus.broker_address() {
            Ok(hp) => hp,
            Err(e) => {
                eprintln!("error: bus.url {:?}: {e}", config.bus.url);
                return Err(ExitCode::from(2));
            }
        },
        (None, false) => {
            let mut addr = config.broker.listen;
            if addr.ip().is_unspecified() {
                addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
            }
            (addr.ip().to_string(), addr.port())
        }
    };
    let from_config = config
        .broker
        .users
        .iter()
        .find(|u| u.role == xiaozhi_gateway::config::BrokerRole::Admin)
        .map(|u| (u.username.clone(), u.password.clone()));
    // On an external broker: the broker's own users; this node's bus login, or none
    // (anonymous), when no admin is named.
    let from_bus = external.then(|| {
        (
            config.bus.username.clone().unwrap_or_default(),
            config.bus.password.clone().unwrap_or_default(),
        )
    });
    let (Some(username), Some(password)) = (
        args.username
            .clone()
            .or_else(|| from_config.as_ref().map(|u| u.0.clone()))
            .or_else(|| from_bus.as_ref().map(|u| u.0.clone())),
        args.password
            .clone()
            .or_else(|| from_config.as_ref().map(|u| u.1.clone()))
            .or_else(|| from_bus.as_ref().map(|u| u.1.clone())),
    ) else {
        eprintln!(
            "error: no broker user: pass --username/--password (XZ_ADMIN_USERNAME/XZ_ADMIN_PASSWORD) or add an admin to broker.users"
        );
        return Err(ExitCode::from(2));
    };
    AdminClient::connect(&host, port, &username, &password, Duration::from_secs(5))
        .await
        .map_err(|e| {
            eprintln!("error: {e}");
            ExitCode::from(2)
        })
}

/// `devices`: every connected device, page by page.
pub async fn devices(config: &Config, args: DevicesArgs) -> ExitCode {
    let client = match admin_client(config, &args.admin).await {
        Ok(c) => c,
        Err(code) => return code,
    };
    let timeout = Duration::from_millis(args.admin.timeout_ms);
    let mut after: Option<String> = None;
    let mut all = Vec::new();
    loop {
        let filter = serde_json::json!({
            "state": args.state, "node": args.node, "group": args.group,
            "after": after, "limit": 1000,
        });
        let filter: serde_json::Map<String, serde_json::Value> = filter
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(_, v)| !v.is_null())
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let reply = match client
            .request(
                None,
                serde_json::json!({"command": "list_online", "filter": filter}),
                timeout,
            )
            .await
        {
            Ok(r) => r,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
        };
        if reply["ok"] != true {
            eprintln!("error: {}", reply["error"]);
            return ExitCode::FAILURE;
        }
        let result = &reply["result"];
        all.extend(result["devices"].as_array().cloned().unwrap_or_default());
        match result["next"].as_str() {
            Some(next) => after = Some(next.to_owned()),
            None => break,
        }
    }
    client.disconnect().await;
    if args.admin.json {
        println!("{}", serde_json::Value::Array(all));
        return ExitCode::SUCCESS;
    }
    println!(
        "{:<18} {:<10} {:<14} {:<16} {:<22} {:<9} SESSION",
        "MAC", "STATE", "NODE", "GROUP", "REMOTE", "SINCE"
    );
    let now = xiaozhi_gateway::history::record::now_ms();
    for d in &all {
        let since = d["session_since_ms"]
            .as_i64()
            .or(d["connected_at_ms"].as_i64())
            .map(|t| format_age(now - t))
            .unwrap_or_default();
        println!(
            "{:<18} {:<10} {:<14} {:<16} {:<22} {:<9} {}",
            d["mac_address"].as_str().unwrap_or(""),
            d["state"].as_str().unwrap_or(""),
            d["node"].as_str().unwrap_or(""),
            d["group"].as_str().unwrap_or(""),
            d["remote"].as_str().unwrap_or(""),
            since,
            d["session_id"].as_str().unwrap_or(""),
        );
    }
    let in_session = all.iter().filter(|d| d["state"] == "in_session").count();
    let in_call = all.iter().filter(|d| d["state"] == "in_call").count();
    println!(
        "{} connected, {} in a conversation, {} in a device call",
        all.len(),
        in_session,
        in_call
    );
    ExitCode::SUCCESS
}

fn format_age(ms: i64) -> String {
    let s = (ms / 1000).max(0);
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        _ => format!("{}h{}m", s / 3600, (s % 3600) / 60),
    }
}

/// `cmd`: one admin command, its reply on stdout; exit 0 on success, 1 on an error reply.
pub async fn cmd(config: &Config, args: CmdArgs) -> ExitCode {
    let extra = match args
        .payload
        .as_deref()
        .map(serde_json::from_str::<serde_json::Value>)
    {
        None => None,
        Some(Ok(v)) if v.is_object() => Some(v),
        Some(Ok(_)) => {
            eprintln!("error: the JSON argument must be an object");
            return ExitCode::from(2);
        }
        Some(Err(e)) => {
            eprintln!("error: the JSON argument is not JSON: {e}");
            return ExitCode::from(2);
        }
    };
    let mut command = serde_json::json!({"command": args.command});
    match (args.command.as_str(), extra) {
        ("mcp", Some(payload)) => command["payload"] = payload,
        ("mcp", None) => {
            eprintln!("error: mcp needs a JSON-RPC request, e.g. '{{\"method\":\"tools/list\"}}'");
            return ExitCode::from(2);
        }
        (_, Some(serde_json::Value::Object(fields))) => {
            for (k, v) in fields {
                command[k] = v;
            }
        }
        _ => {}
    }
    let client = match admin_client(config, &args.admin).await {
        Ok(c) => c,
        Err(code) => return code,
    };
    let timeout = Duration::from_millis(args.admin.timeout_ms);
    let reply = client.request(Some(&args.mac), command, timeout).await;
    client.disconnect().await;
    match reply {
        Ok(reply) => {
            let ok = reply["ok"] == true;
            if args.admin.json {
                println!("{reply}");
            } else if ok {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&reply["result"]).unwrap_or_default()
                );
            } else {
                eprintln!(
                    "error: {}: {}",
                    reply["error"]["code"].as_str().unwrap_or("?"),
                    reply["error"]["message"].as_str().unwrap_or("")
                );
            }
            if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}
