//! `xiaozhi-gateway demo` (a gateway, a mock speech server and talking devices, to try the
//! console) and `xiaozhi-gateway mock-upstream` (the mock xiaozhi-server on its own, to try
//! or measure the `xiaozhi` pipeline without a real one).

use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use xiaozhi_gateway::config::Config;
use xiaozhi_gateway::server::{Gateway, shutdown_signal};

use crate::simulator::demo::{DemoDevice, demo_dialogue};
use crate::simulator::device::DeviceCredentials;
use crate::simulator::upstream::{MockUpstream, MockUpstreamConfig};

#[derive(Args)]
pub struct DemoArgs {
    /// Simulated devices.
    #[arg(long, default_value_t = 3)]
    devices: u32,
    /// Turns per conversation.
    #[arg(long, default_value_t = 2)]
    turns: u32,
    /// Seconds each device pauses between conversations.
    #[arg(long, default_value_t = 20)]
    pause: u64,
}

#[derive(Args)]
pub struct MockUpstreamArgs {
    /// Address to listen on; the URL to configure is ws://ADDR/xiaozhi/v1/.
    #[arg(long, default_value = "127.0.0.1:8000")]
    listen: std::net::SocketAddr,
    /// Verify the gateway's bearer token with this secret (xiaozhi-server's server.auth_key).
    #[arg(long, env = "XZ_PIPELINE__XIAOZHI__AUTH_KEY", hide_env_values = true)]
    auth_key: Option<String>,
    /// Uplink frames that make one user turn.
    #[arg(long, default_value_t = 5)]
    frames_per_turn: u32,
    /// Reply frames per turn.
    #[arg(long, default_value_t = 5)]
    reply_frames: u32,
    /// Pace reply frames at the frame duration (as xiaozhi-server does) instead of
    /// sending them at once.
    #[arg(long)]
    paced: bool,
}

pub async fn demo(mut config: Config, args: DemoArgs) -> ExitCode {
    const FRAMES_PER_TURN: u32 = 10;
    let mock = match MockUpstream::start_on(
        ([127, 0, 0, 1], 0).into(),
        MockUpstreamConfig {
            frames_per_turn: FRAMES_PER_TURN,
            reply_frames: 10,
            paced: true,
            dialogue: demo_dialogue(),
            ..MockUpstreamConfig::default()
        },
    )
    .await
    {
        Ok(m) => m,
        Err(e) => {
            eprintln!("error: cannot start the mock speech server: {e}");
            return ExitCode::FAILURE;
        }
    };
    let defaults = Config::default();
    if config.history.database_url == defaults.history.database_url {
        config.history.database_url = "sqlite://xiaozhi-demo/history.db".into();
    }
    if config.history.journal_dir == defaults.history.journal_dir {
        config.history.journal_dir = "xiaozhi-demo/journal".into();
    }
    config.history.enabled = true;
    let token = config
        .history
        .api_token
        .get_or_insert_with(|| hex::encode(rand::random::<[u8; 16]>()))
        .clone();
    // The demo's devices sign with the configured key, or one made up for this run.
    let key = config
        .auth
        .signature_key
        .get_or_insert_with(|| format!("Demo-{}", hex::encode(rand::random::<[u8; 16]>())))
        .clone();
    config.auth.allow_unsigned = false;
    config.pipeline.kind = xiaozhi_gateway::config::PipelineKind::Xiaozhi;
    config.pipeline.xiaozhi.urls = vec![mock.url.clone()];
    let gateway = match Gateway::start(config).await {
        Ok(g) => g,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut http = gateway.addrs.http;
    if http.ip().is_unspecified() {
        http.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let mut mqtt = gateway.addrs.mqtt;
    if mqtt.ip().is_unspecified() {
        mqtt.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let stop = tokio_util::sync::CancellationToken::new();
    let mut devices = tokio::task::JoinSet::new();
    for n in 0..args.devices {
        let mac = DeviceCredentials::nth_mac(n);
        let device = DemoDevice {
            mqtt,
            credentials: DeviceCredentials::for_mac(mac, "GID_demo", Some(key.as_bytes())),
            turns: args.turns.max(1),
            frames_per_turn: FRAMES_PER_TURN,
            pause: Duration::from_secs(args.pause) + Duration::from_millis(u64::from(n) * 1500),
            reconnect_after: Duration::from_secs(15),
        };
        devices.spawn(device.run(stop.clone()));
    }
    println!();
    println!("  console:  http://{http}/console/");
    println!("  token:    {token}");
    println!(
        "  devices:  {} talking (MQTT {mqtt}), mock speech server {}",
        args.devices, mock.url
    );
    println!();
    println!("  Stop with Ctrl-C.");
    shutdown_signal().await;
    stop.cancel();
    while devices.join_next().await.is_some() {}
    gateway.shutdown().await;
    mock.stop().await;
    ExitCode::SUCCESS
}

pub async fn mock_upstream(args: MockUpstreamArgs) -> ExitCode {
    let config = MockUpstreamConfig {
        auth_key: args.auth_key,
        frames_per_turn: args.frames_per_turn,
        reply_frames: args.reply_frames,
        paced: args.paced,
        stamp_frames: true,
        ..MockUpstreamConfig::default()
    };
    let mock = match MockUpstream::start_on(args.listen, config).await {
        Ok(mock) => mock,
        Err(e) => {
            eprintln!(
                "error: cannot listen on {}: {e} (change --listen)",
                args.listen
            );
            return ExitCode::FAILURE;
        }
    };
    println!(
        "mock xiaozhi-server listening; configure pipeline.xiaozhi.urls = [\"{}\"]",
        mock.url
    );
    shutdown_signal().await;
    mock.stop().await;
    let seen = mock.observed();
    println!(
        "connections {}, refused {}, turns {}, uplink frames {}",
        seen.connections,
        seen.rejected.len(),
        seen.turns,
        seen.uplink_frames
    );
    ExitCode::SUCCESS
}
