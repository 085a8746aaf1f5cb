//! The one typed configuration: built-in defaults < TOML file (`--config`) < environment
//! (`XZ_SECTION__KEY`, e.g. `XZ_AUTH__SIGNATURE_KEY`).
//!
//! Loading ([`Config::load`]) either yields a config that every part of the gateway can
//! trust, or one error that names the setting and the bad value. Semantic checks live in
//! [`Config::validate`]; warnings that must be printed at every start (unsigned auth, a
//! loopback UDP host) come from [`Config::warnings`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

use crate::protocol::credentials::Verifier;

/// Everything the gateway can be told.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub node: NodeConfig,
    pub auth: AuthConfig,
    pub mqtt: MqttConfig,
    pub broker: BrokerConfig,
    pub bus: BusConfig,
    pub udp: UdpConfig,
    pub transport: TransportConfig,
    pub quic: QuicConfig,
    pub http: HttpConfig,
    pub pipeline: PipelineConfig,
    pub mcp: McpConfig,
    pub management: ManagementConfig,
    pub calls: CallsConfig,
    pub push: PushConfig,
    pub ota: OtaConfig,
    pub history: HistoryConfig,
    pub presence: PresenceConfig,
    pub admin: AdminConfig,
    pub log: LogConfig,
    pub shutdown: ShutdownConfig,
}

/// The longest duration any setting may name, in seconds (one year).
const MAX_DURATION_SECS: u64 = 365 * 24 * 3600;

/// This gateway node.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// Name of this node in logs, presence records and bus topics (unique per node; the
    /// host name by default).
    pub id: String,
}

/// Where the bus is: the embedded broker (one node) or an external MQTT broker that
/// several gateway nodes share (scale-out).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BusMode {
    /// rumqttd inside this process, with our broker listener for admin clients.
    #[default]
    Embedded,
    /// An existing broker (EMQX, Mosquitto) reached as an MQTT client.
    External,
}

/// Which MQTT version the gateway speaks to an external broker.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BusProtocol {
    /// MQTT 5, falling back to 3.1.1 when the broker refuses 5.
    #[default]
    Auto,
    V5,
    V311,
}

/// The bus (`[bus]`): embedded by default; `mode = "external"` for scale-out.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BusConfig {
    pub mode: BusMode,
    /// The external broker, `mqtt://host:port` (external mode only).
    pub url: String,
    pub username: Option<String>,
    pub password: Option<String>,
    pub protocol: BusProtocol,
    /// Shared-subscription group of the gateway nodes: each admin command reaches one
    /// node of the group, which runs it or forwards it to the device's node.
    pub share_group: String,
    /// MQTT keep-alive towards the external broker, in seconds.
    pub keep_alive_secs: u64,
    /// Longest pause between reconnect attempts, in seconds (backoff doubles up to it).
    pub reconnect_max_secs: u64,
}

impl std::fmt::Debug for BusConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BusConfig")
            .field("mode", &self.mode)
            .field("url", &self.url)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("protocol", &self.protocol)
            .field("share_group", &self.share_group)
            .field("keep_alive_secs", &self.keep_alive_secs)
            .field("reconnect_max_secs", &self.reconnect_max_secs)
            .finish()
    }
}

impl Default for BusConfig {
    fn default() -> Self {
        BusConfig {
            mode: BusMode::Embedded,
            url: "mqtt://127.0.0.1:1883".into(),
            username: None,
            password: None,
            protocol: BusProtocol::Auto,
            share_group: "xiaozhi-gateway".into(),
            keep_alive_secs: 30,
            reconnect_max_secs: 10,
        }
    }
}

impl BusConfig {
    /// Host and port of `url` (`mqtt://host:port`, `mqtt://[v6]:port`; port 1883 when
    /// absent).
    pub fn broker_address(&self) -> Result<(String, u16), String> {
        let rest = self
            .url
            .strip_prefix("mqtt://")
            .or_else(|| self.url.strip_prefix("tcp://"))
            .ok_or("want mqtt://host:port (TLS to the bus broker is not supported yet)")?
            .trim_end_matches('/');
        let (host, port) = match rest.strip_prefix('[') {
            Some(v6) => {
                let (host, after) = v6.split_once(']').ok_or("unclosed '[' in the host")?;
                (host, after.strip_prefix(':'))
            }
            None => match rest.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (rest, None),
            },
        };
        if host.is_empty() || host.contains(['/', '@', ':', '[', ']']) && !rest.starts_with('[') {
            return Err("want mqtt://host:port".into());
        }
        let port = match port {
            None => 1883,
            Some(p) => match p.parse::<u16>() {
                Ok(port) if port > 0 => port,
                _ => return Err(format!("bad port {p:?}")),
            },
        };
        Ok((host.to_owned(), port))
    }
}

/// The host name, as a node id: what a node is called unless `node.id` says otherwise.
fn host_node_id() -> String {
    let name = nix::unistd::gethostname()
        .ok()
        .and_then(|n| n.into_string().ok())
        .unwrap_or_default();
    let id: String = name
        .chars()
        .map(|c| if valid_node_id_char(c) { c } else { '-' })
        .take(64)
        .collect();
    if id.is_empty() {
        "gateway-1".into()
    } else {
        id
    }
}

fn valid_node_id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')
}

/// Whether `id` can name a node: 1-64 of `A-Z a-z 0-9 - _ .` (it is a topic level and a
/// Redis key part).
pub fn valid_node_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.chars().all(valid_node_id_char)
}

/// Device authentication.
#[derive(Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// manager-api's `server.mqtt_signature_key`: device passwords are HMACs under it.
    pub signature_key: Option<String>,
    /// Development only: with no signature key, accept any non-empty password.
    pub allow_unsigned: bool,
}

impl std::fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthConfig")
            .field(
                "signature_key",
                &self.signature_key.as_ref().map(|_| "<redacted>"),
            )
            .field("allow_unsigned", &self.allow_unsigned)
            .finish()
    }
}

/// The device-facing MQTT front end.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// Plain MQTT for devices.
    pub listen: SocketAddr,
    /// MQTT over TLS for devices; served only when `tls_cert` and `tls_key` are set.
    pub tls_listen: SocketAddr,
    /// PEM certificate chain for `tls_listen`.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for `tls_listen`.
    pub tls_key: Option<PathBuf>,
    /// Seconds a TLS client may take to finish its handshake.
    pub tls_handshake_timeout_secs: u64,
    /// Seconds from TCP accept to CONNECT.
    pub connect_timeout_secs: u64,
    /// Keep-alive applied when a device asks for none.
    pub default_keep_alive_secs: u64,
    /// Largest MQTT packet accepted from a device; larger ones end the connection.
    pub max_packet_bytes: usize,
    /// Most device connections at once; further ones are refused.
    pub max_connections: usize,
    /// Most device connections open at once from one source address (IPv4 address or
    /// IPv6 /64); 0 = no limit.
    pub max_connections_per_source: u32,
    /// New connections per second from one source address, after a burst of
    /// `connect_burst_per_source`; 0 = no limit.
    pub connect_rate_per_source: u32,
    pub connect_burst_per_source: u32,
    /// Messages per second one device may publish, after a burst of `message_burst`;
    /// further ones are dropped and counted; 0 = no limit.
    pub message_rate: u32,
    pub message_burst: u32,
    /// Messages queued for one device before further ones are dropped (and counted).
    pub outbound_queue: usize,
    /// The topic devices publish to.
    pub uplink_topic: String,
}

/// The embedded broker (rumqttd) and its listener for admin/integration clients.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerConfig {
    /// MQTT listener for admin and integration clients (loopback by default).
    pub listen: SocketAddr,
    /// The same listener over TLS; served only when `tls_cert` and `tls_key` are set.
    pub tls_listen: SocketAddr,
    /// PEM certificate chain and private key for `tls_listen` (reloaded on SIGHUP or
    /// when the files change).
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Seconds a TLS client may take to finish its handshake.
    pub tls_handshake_timeout_secs: u64,
    /// Router tunables (TOML); the built-in `broker-config/router.toml` when unset.
    pub router_config: Option<PathBuf>,
    /// Users allowed on the broker listener. Device credentials never work there.
    pub users: Vec<BrokerUser>,
    /// Messages queued for the bus before further ones are dropped (and counted).
    pub publish_queue: usize,
}

/// A broker-listener user.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerUser {
    pub username: String,
    pub password: String,
    /// What the user may do on the bus (default `admin`).
    #[serde(default)]
    pub role: BrokerRole,
}

/// A broker-listener user's rights.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BrokerRole {
    /// Sends admin commands, publishes to devices, reads every topic.
    #[default]
    Admin,
    /// Reads device and gateway events (`xiaozhi/devices/#`, `xiaozhi/events/#`) only.
    Observer,
}

impl std::fmt::Debug for BrokerUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "BrokerUser({:?}, <redacted>, {:?})",
            self.username, self.role
        )
    }
}

/// The UDP audio socket.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UdpConfig {
    /// Where the audio socket listens.
    pub listen: SocketAddr,
    /// Host or IP announced to devices in the hello: the address devices can reach.
    /// There is no reliable way to guess it, so it is explicit.
    pub public_host: String,
    /// Port announced in the hello; 0 means the port actually bound.
    pub public_port: u16,
    /// Kernel receive buffer (SO_RCVBUF) to ask for: audio lost to a full buffer is lost
    /// for good.
    pub recv_buffer_bytes: usize,
    /// Kernel send buffer (SO_SNDBUF).
    pub send_buffer_bytes: usize,
    /// A conversation with no audio either way for this long is ended.
    pub idle_timeout_secs: u64,
    /// Uplink frames queued per conversation before further ones are dropped.
    pub uplink_queue: usize,
    /// Datagrams per second one audio channel may send (a device sends about 17 at
    /// 60 ms frames), after a burst of `channel_burst`; further ones are dropped before
    /// decryption and counted; 0 = no limit.
    pub channel_rate: u32,
    pub channel_burst: u32,
    /// Sockets and receive tasks serving the audio port (`SO_REUSEPORT`, steered by
    /// connection id; Linux only, elsewhere always 1). 0: one per core the process may
    /// run on.
    pub shards: usize,
}

/// The most UDP shards: far beyond any core count that helps, and it bounds what a typo
/// can open.
pub const MAX_UDP_SHARDS: usize = 256;

impl UdpConfig {
    /// How many shards to bind: `shards`, or one per core the process may run on (its
    /// CPU affinity, as `taskset` sets it).
    pub fn effective_shards(&self) -> usize {
        match self.shards {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
        .min(MAX_UDP_SHARDS)
    }
}

/// Which audio transports are offered to devices that announce them in their hello
/// (docs/transports.md). Stock firmware announces none and always gets AES-128-CTR.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TransportConfig {
    /// Offer AES-128-GCM over the UDP audio port to devices whose hello has
    /// `features.udp_aead = true`.
    pub udp_aead: bool,
    /// Device groups (the client id's `GROUP@@@` part) that must use an authenticated
    /// transport: a hello from them that announces neither `udp_aead` nor `quic` (or
    /// only one this gateway does not offer) is refused with an alert instead of getting
    /// AES-128-CTR.
    pub require_authenticated: Vec<String>,
}

impl Default for TransportConfig {
    fn default() -> Self {
        TransportConfig {
            udp_aead: true,
            require_authenticated: Vec::new(),
        }
    }
}

/// The QUIC audio transport, for devices whose hello has `features.quic = true`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QuicConfig {
    /// Off by default: it opens another UDP port.
    pub enabled: bool,
    /// Where the QUIC endpoint listens (its own UDP port).
    pub listen: SocketAddr,
    /// Port announced in the hello; 0 means the port actually bound. The host is
    /// `udp.public_host`.
    pub public_port: u16,
    /// PEM certificate chain and key; both empty: a self-signed certificate is made at
    /// start-up (devices pin the SHA-256 the hello carries, so no CA is needed).
    pub cert_path: Option<PathBuf>,
    pub key_path: Option<PathBuf>,
    /// How long the session token in a hello stays good.
    pub token_ttl_secs: u64,
    /// QUIC connections open at once (attached or not); further ones are refused.
    pub max_connections: usize,
}

impl Default for QuicConfig {
    fn default() -> Self {
        QuicConfig {
            enabled: false,
            listen: ([0, 0, 0, 0], 8885).into(),
            public_port: 0,
            cert_path: None,
            key_path: None,
            token_ttl_secs: 30,
            max_connections: 20_000,
        }
    }
}

/// The HTTP server.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    pub listen: SocketAddr,
    /// Largest request body accepted, in bytes (413 beyond it).
    pub max_body_bytes: usize,
    /// Seconds a client may take to send a request's headers (slow clients are closed).
    pub header_timeout_secs: u64,
    /// Seconds a handler may take to produce its response (408 beyond it). Streaming
    /// bodies (exports) and WebSocket upgrades only need their headers in this time.
    pub request_timeout_secs: u64,
    /// Largest WebSocket message accepted from a `/ws/admin` client, in bytes.
    pub ws_max_message_bytes: usize,
    /// Most HTTP connections open at once; further ones are closed on accept and
    /// counted.
    pub max_connections: usize,
}

/// Which speech pipeline conversations use.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    /// `auto` (xiaozhi when `pipeline.xiaozhi.urls` is set, else echo), `echo` or
    /// `xiaozhi`.
    pub kind: PipelineKind,
    pub echo: EchoConfig,
    pub xiaozhi: XiaozhiConfig,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PipelineKind {
    Auto,
    Echo,
    Xiaozhi,
}

/// The xiaozhi-server upstream: one WebSocket per conversation.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct XiaozhiConfig {
    /// WebSocket URLs of xiaozhi-server, e.g. `ws://127.0.0.1:8000/xiaozhi/v1/`
    /// (`?from=mqtt_gateway` is appended). Each conversation picks one in turn, skipping
    /// those that failed recently.
    pub urls: Vec<String>,
    /// xiaozhi-server's `server.auth_key`: when set, each connection carries the HMAC
    /// bearer token it verifies.
    pub auth_key: Option<String>,
    /// Time to connect and get the server's hello, over all upstreams tried.
    pub connect_timeout_ms: u64,
    /// An upstream that failed is skipped for this long (unless all have failed).
    pub retry_after_secs: u64,
    /// Uplink audio frames buffered per conversation while the upstream is slow; the
    /// oldest are dropped (and counted) beyond this.
    pub audio_buffer_frames: usize,
    /// Largest WebSocket message accepted from the upstream.
    pub max_message_bytes: usize,
}

impl std::fmt::Debug for XiaozhiConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XiaozhiConfig")
            .field("urls", &self.urls)
            .field("auth_key", &self.auth_key.as_ref().map(|_| "<redacted>"))
            .field("connect_timeout_ms", &self.connect_timeout_ms)
            .field("retry_after_secs", &self.retry_after_secs)
            .field("audio_buffer_frames", &self.audio_buffer_frames)
            .field("max_message_bytes", &self.max_message_bytes)
            .finish()
    }
}

impl Default for XiaozhiConfig {
    fn default() -> Self {
        XiaozhiConfig {
            urls: Vec::new(),
            auth_key: None,
            connect_timeout_ms: 5_000,
            retry_after_secs: 30,
            audio_buffer_frames: 50,
            max_message_bytes: 1 << 20,
        }
    }
}

/// Device MCP: the gateway's own `initialize` / `tools/list` after each connect.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct McpConfig {
    /// Ask each device for its tools right after it connects and answer the speech
    /// server's `initialize` / `tools/list` from that cache.
    pub setup: bool,
    /// Most tools cached per device (the Node gateway's limit is 32).
    pub max_tools: usize,
    /// Timeout of each setup request, in seconds.
    pub timeout_secs: u64,
    /// MCP requests in flight per device.
    pub max_pending: usize,
}

impl Default for McpConfig {
    fn default() -> Self {
        McpConfig {
            setup: true,
            max_tools: 32,
            timeout_secs: 10,
            max_pending: 64,
        }
    }
}

/// The Node gateway's management API on the HTTP port (manager-api calls it).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ManagementConfig {
    /// Serve `/api/devices/status` and `/api/commands/{clientId}` (needs
    /// `auth.signature_key`: the daily bearer token is derived from it).
    pub enabled: bool,
    /// How long a command waits for the device, in seconds (manager-api expects 5).
    pub command_timeout_secs: u64,
}

impl Default for ManagementConfig {
    fn default() -> Self {
        ManagementConfig {
            enabled: true,
            command_timeout_secs: 5,
        }
    }
}

/// Device-to-device calling (`/api/call/request`, `/api/call/accept` on the management
/// API).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CallsConfig {
    /// Serve the calling endpoints (with the management API).
    pub enabled: bool,
    /// How long a call rings before it gives up and the caller hears goodbye (the Node
    /// gateway's 60 s).
    pub ring_timeout_secs: u64,
    /// Longest bridged call, in seconds; 0: no limit.
    pub max_call_secs: u64,
    /// Most calls (ringing and bridged) at once, over the cluster.
    pub max_calls: usize,
    /// How long a target may take to answer the MCP wake-up, in seconds.
    pub wake_timeout_secs: u64,
}

impl Default for CallsConfig {
    fn default() -> Self {
        CallsConfig {
            enabled: true,
            ring_timeout_secs: 60,
            max_call_secs: 3600,
            max_calls: 10_000,
            wake_timeout_secs: 5,
        }
    }
}

/// Pushes to devices (`push/`): notify, wake, custom, alert, reboot, kept until the
/// device is connected and idle.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PushConfig {
    /// Take pushes (HTTP API, MQTT admin command, CLI) and deliver them.
    pub enabled: bool,
    /// How long a push waits for its device when the request does not say, in seconds.
    pub default_ttl_secs: u64,
    /// Longest time to live a request may ask for, in seconds.
    pub max_ttl_secs: u64,
    /// Most pushes waiting for one device; a request that would go beyond is refused.
    pub max_per_device: u64,
    /// Most pushes waiting across the fleet; a request that would go beyond is refused.
    pub max_queued: u64,
    /// Most devices one request may list in `to` (use `group` or `fleet` beyond).
    pub max_devices_per_request: usize,
    /// Pushes this node sends per second at most (a fleet push is paced by it, so it
    /// never crowds out conversations).
    pub rate_per_sec: u32,
    /// Wait this long after a device connects before delivering (the firmware takes its
    /// first seconds to start up and ignores a notify until it is idle), in ms.
    pub settle_ms: u64,
    /// After a notify, the device's next notify or wake waits this long (the firmware
    /// ignores a notify while it is playing one and does not say when it is done), in
    /// seconds.
    pub notify_gap_secs: u64,
    /// How long a wake waits for the device's acknowledgement, in ms.
    pub wake_timeout_ms: u64,
    /// Largest message sent to a device, in bytes.
    pub max_message_bytes: usize,
    /// How often every node looks for waiting pushes of its idle devices and expires
    /// those past `expires_at`, in seconds.
    pub sweep_secs: u64,
    /// Take the official gateway's Redis RPC (`{"method":"forward",...}`) from this
    /// Redis; unset: off.
    pub redis_rpc_url: Option<String>,
    /// The list the RPC requests are `RPUSH`ed to.
    pub redis_rpc_key: String,
    /// Largest clip upload (`POST /api/push/clips`), in bytes.
    pub max_clip_bytes: usize,
    /// Longest clip, in seconds.
    pub max_clip_secs: u64,
    /// How long an uploaded clip is served, in seconds.
    pub clip_ttl_secs: u64,
    /// The address devices fetch clips from, e.g. `https://gw.example.com` (no trailing
    /// slash); unset: `http://<udp.public_host>:<the HTTP port>`.
    pub clip_base_url: Option<String>,
}

impl std::fmt::Debug for PushConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PushConfig")
            .field("enabled", &self.enabled)
            .field("rate_per_sec", &self.rate_per_sec)
            .field("max_queued", &self.max_queued)
            .field(
                "redis_rpc_url",
                &self.redis_rpc_url.as_deref().map(redact_url),
            )
            .field("redis_rpc_key", &self.redis_rpc_key)
            .finish_non_exhaustive()
    }
}

impl Default for PushConfig {
    fn default() -> Self {
        PushConfig {
            enabled: true,
            default_ttl_secs: 24 * 3600,
            max_ttl_secs: 30 * 24 * 3600,
            max_per_device: 32,
            max_queued: 100_000,
            max_devices_per_request: 10_000,
            rate_per_sec: 500,
            settle_ms: 1_500,
            notify_gap_secs: 15,
            wake_timeout_ms: 5_000,
            max_message_bytes: 16 * 1024,
            sweep_secs: 5,
            redis_rpc_url: None,
            redis_rpc_key: "xiaozhi:push:rpc".into(),
            max_clip_bytes: 8 * 1024 * 1024,
            max_clip_secs: 300,
            clip_ttl_secs: 7 * 24 * 3600,
            clip_base_url: None,
        }
    }
}

/// What is recorded for devices manager-api does not manage (`history.mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecordMode {
    Off,
    Text,
    Audio,
}

/// Chat history: what is recorded and where it is stored.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HistoryConfig {
    /// Record conversations relayed through a speech server.
    pub enabled: bool,
    /// `sqlite://path` (created if missing; the default) or
    /// `mysql://user:password@host:3306/database` (manager-api's database).
    pub database_url: String,
    /// Directory of the journal that holds records while the database is away.
    pub journal_dir: PathBuf,
    /// For devices manager-api does not manage (no `ai_device`/`ai_agent` tables):
    /// `off`, `text` or `audio` (text and audio). Managed devices follow their agent's
    /// `chat_history_conf`.
    pub mode: RecordMode,
    /// Time zone of `created_at`, minutes east of UTC (manager-api deployments usually
    /// run in Asia/Shanghai: 480).
    pub utc_offset_minutes: i32,
    /// Records waiting for the writer.
    pub queue: usize,
    /// Records per transaction at most.
    pub batch: usize,
    /// A write slower than this goes to the journal, in ms.
    pub write_timeout_ms: u64,
    /// How often the journal is retried while the database is away, in seconds.
    pub retry_secs: u64,
    /// Most audio kept per utterance, in seconds.
    pub max_utterance_secs: u64,
    /// Threads that decode recorded Opus to WAV, at low priority (see
    /// `history::decoder`); default: half the cores, at least one.
    pub decode_threads: usize,
    /// Bearer token of the history API and the `/ws/admin` feed; unset: they are off.
    pub api_token: Option<String>,
    /// Delete audio older than this many days (0: keep forever).
    pub retention_audio_days: u32,
    /// Delete text rows older than this many days (0: keep forever).
    pub retention_text_days: u32,
}

/// Where device presence is kept.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PresenceConfig {
    /// `redis://host:6379/0` for Redis (production, several nodes); unset: in memory.
    pub redis_url: Option<String>,
    /// Prefix of every Redis key (several deployments can share one Redis).
    pub key_prefix: String,
    /// How often this node refreshes its devices' entries, in seconds.
    pub heartbeat_secs: u64,
    /// A connected device's entry expires this long after its node's last heartbeat,
    /// in seconds (a crashed node's devices turn offline on their own).
    pub ttl_secs: u64,
    /// How long an offline device's entry (its last seen) is kept, in seconds.
    pub offline_retention_secs: u64,
    /// Timeout of each presence store round trip, in ms (Redis down must not stall).
    pub timeout_ms: u64,
    /// Update manager-api's `ai_device.last_connected_at` at most this often per device,
    /// in seconds (0: never).
    pub last_connected_throttle_secs: u64,
}

impl std::fmt::Debug for PresenceConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PresenceConfig")
            .field("redis_url", &self.redis_url.as_deref().map(redact_url))
            .field("key_prefix", &self.key_prefix)
            .field("heartbeat_secs", &self.heartbeat_secs)
            .field("ttl_secs", &self.ttl_secs)
            .finish_non_exhaustive()
    }
}

impl Default for PresenceConfig {
    fn default() -> Self {
        PresenceConfig {
            redis_url: None,
            key_prefix: "xiaozhi:".into(),
            heartbeat_secs: 30,
            ttl_secs: 90,
            offline_retention_secs: 7 * 24 * 3600,
            timeout_ms: 2_000,
            last_connected_throttle_secs: 300,
        }
    }
}

/// Admin commands over MQTT (`xiaozhi/admin/commands/...`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Take commands from the bus.
    pub enabled: bool,
    /// How long a command waits for the device, in ms.
    pub command_timeout_ms: u64,
    /// Commands running at once; further ones get a `busy` error reply.
    pub max_in_flight: usize,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            enabled: true,
            command_timeout_ms: 5_000,
            max_in_flight: 256,
        }
    }
}

impl std::fmt::Debug for HistoryConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HistoryConfig")
            .field("enabled", &self.enabled)
            .field("database_url", &redact_url(&self.database_url))
            .field("journal_dir", &self.journal_dir)
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

impl Default for HistoryConfig {
    fn default() -> Self {
        HistoryConfig {
            enabled: true,
            database_url: "sqlite://data/history.db".into(),
            journal_dir: PathBuf::from("data"),
            mode: RecordMode::Audio,
            utc_offset_minutes: 480,
            queue: 10_000,
            batch: 256,
            write_timeout_ms: 5_000,
            retry_secs: 5,
            max_utterance_secs: 120,
            decode_threads: std::thread::available_parallelism()
                .map_or(1, |n| (n.get() / 2).max(1)),
            api_token: None,
            retention_audio_days: 0,
            retention_text_days: 0,
        }
    }
}

/// A database URL with its password replaced, for logs and `config check`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((userinfo, host)) = rest.split_once('@') else {
        return url.to_owned();
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:<redacted>@{host}"),
        None => url.to_owned(),
    }
}

/// The optional OTA endpoint that hands devices their MQTT settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OtaConfig {
    /// Serve `POST /xiaozhi/ota/`.
    pub enabled: bool,
    /// `host` or `host:port` devices connect to for MQTT; default `udp.public_host`. The
    /// port, when not given, is the listener's that `mqtt_tls` picks.
    pub mqtt_endpoint: Option<String>,
    /// Point devices at the TLS listener. The firmware uses TLS exactly when the port is
    /// 8883, so the endpoint's port must be 8883 with this on and must not be without.
    pub mqtt_tls: bool,
    /// Client id group when the request names no board (`GID_default`, as manager-api).
    pub group: String,
    /// Firmware block: the version and URL devices compare against their own.
    pub firmware_version: String,
    pub firmware_url: String,
    /// `server_time.timezone_offset`, minutes east of UTC.
    pub timezone_offset_minutes: i32,
}

impl Default for OtaConfig {
    fn default() -> Self {
        OtaConfig {
            enabled: false,
            mqtt_endpoint: None,
            mqtt_tls: false,
            group: "GID_default".into(),
            firmware_version: String::new(),
            firmware_url: String::new(),
            timezone_offset_minutes: 0,
        }
    }
}

/// The echo pipeline: plays the device's own audio back.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EchoConfig {
    /// In `auto`/`manual` listening, a turn is played back after `listen stop` or after
    /// this much audio, whichever comes first.
    pub max_turn_secs: u64,
    /// In `realtime` listening, frames are echoed as they arrive and the turn ends
    /// (`tts stop`) after this much silence.
    pub realtime_idle_ms: u64,
}

/// Logging.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `human` or `json`.
    pub format: LogFormat,
    /// A tracing filter, e.g. `info` or `xiaozhi_gateway=debug,info`. `RUST_LOG` wins.
    pub level: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Human,
    Json,
}

/// Graceful shutdown.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// Upper bound on the time from SIGINT/SIGTERM to exit.
    pub grace_secs: u64,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig { id: host_node_id() }
    }
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            listen: ([0, 0, 0, 0], 1883).into(),
            tls_listen: ([0, 0, 0, 0], 8883).into(),
            tls_cert: None,
            tls_key: None,
            tls_handshake_timeout_secs: 10,
            connect_timeout_secs: 10,
            default_keep_alive_secs: 240,
            max_packet_bytes: 128 * 1024,
            max_connections: 20_000,
            max_connections_per_source: 1_000,
            connect_rate_per_source: 50,
            connect_burst_per_source: 500,
            message_rate: 20,
            message_burst: 200,
            outbound_queue: 256,
            uplink_topic: "device-server".into(),
        }
    }
}

impl BrokerConfig {
    /// The broker listener's TLS certificate and key, when both are set.
    pub fn tls(&self) -> Option<(&Path, &Path)> {
        Some((self.tls_cert.as_deref()?, self.tls_key.as_deref()?))
    }
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            listen: ([127, 0, 0, 1], 1884).into(),
            tls_listen: ([127, 0, 0, 1], 8885).into(),
            tls_cert: None,
            tls_key: None,
            tls_handshake_timeout_secs: 10,
            router_config: None,
            users: Vec::new(),
            publish_queue: 16_384,
        }
    }
}

impl Default for UdpConfig {
    fn default() -> Self {
        UdpConfig {
            listen: ([0, 0, 0, 0], 8884).into(),
            public_host: "127.0.0.1".into(),
            public_port: 0,
            recv_buffer_bytes: 8 * 1024 * 1024,
            send_buffer_bytes: 4 * 1024 * 1024,
            idle_timeout_secs: 180,
            uplink_queue: 64,
            channel_rate: 100,
            channel_burst: 250,
            shards: 0,
        }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: ([0, 0, 0, 0], 8007).into(),
            max_body_bytes: 1024 * 1024,
            header_timeout_secs: 10,
            request_timeout_secs: 30,
            ws_max_message_bytes: 64 * 1024,
            max_connections: 4_096,
        }
    }
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            kind: PipelineKind::Auto,
            echo: EchoConfig::default(),
            xiaozhi: XiaozhiConfig::default(),
        }
    }
}

impl Default for EchoConfig {
    fn default() -> Self {
        EchoConfig {
            max_turn_secs: 4,
            realtime_idle_ms: 600,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Human,
            level: "info".into(),
        }
    }
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig { grace_secs: 5 }
    }
}

/// Why a configuration cannot be used. Each names the setting to change.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path} cannot be read: {source}")]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid configuration: {0}")]
    Parse(#[source] Box<figment::Error>),
    #[error("invalid configuration: {key} = {value:?}: {reason}")]
    Invalid {
        key: String,
        value: String,
        reason: String,
    },
}

/// Environment variable prefix: `XZ_UDP__PUBLIC_HOST` sets `udp.public_host`.
pub const ENV_PREFIX: &str = "XZ_";

/// The signature key's environment variable, read verbatim (never parsed as a number).
pub const SIGNATURE_KEY_ENV: &str = "XZ_AUTH__SIGNATURE_KEY";

impl Config {
    /// Loads defaults, then `file` (if given), then `XZ_*` environment variables, then
    /// `overrides` (from the command line), and validates the result.
    pub fn load(file: Option<&Path>, overrides: Figment) -> Result<Config, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            // Figment silently skips a missing file; a typo in --config must not.
            std::fs::metadata(path).map_err(|source| ConfigError::File {
                path: path.to_owned(),
                source,
            })?;
            figment = figment.merge(Toml::file_exact(path));
        }
        // `XZ_CONFIG` names the file and `XZ_ADMIN_USERNAME` / `XZ_ADMIN_PASSWORD` the
        // broker login of the admin CLI commands (flags), not settings.
        figment = figment.merge(Env::prefixed(ENV_PREFIX).split("__").ignore(&[
            "config",
            "admin_username",
            "admin_password",
        ]));
        // Figment parses environment values ("0123" becomes the number 123); a secret
        // must stay exactly the bytes the operator wrote.
        if let Ok(raw) = std::env::var(SIGNATURE_KEY_ENV) {
            figment = figment.merge(Serialized::default("auth.signature_key", raw));
        }
        Self::from_figment(figment.merge(overrides))
    }

    /// Extracts and validates a config from any figment (used by tests too).
    pub fn from_figment(figment: Figment) -> Result<Config, ConfigError> {
        let config: Config = figment
            .extract()
            .map_err(|e| describe_extract_error(&figment, e))?;
        config.validate()?;
        Ok(config)
    }

    /// Semantic checks that types alone cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid =
            |key: &str, value: &dyn std::fmt::Display, reason: &str| ConfigError::Invalid {
                key: key.to_owned(),
                value: value.to_string(),
                reason: reason.to_owned(),
            };
        match (&self.auth.signature_key, self.auth.allow_unsigned) {
            (Some(k), _) if k.is_empty() => {
                return Err(invalid(
                    "auth.signature_key",
                    &"",
                    "must not be empty; unset it and set auth.allow_unsigned = true for development",
                ));
            }
            (None, false) => {
                return Err(invalid(
                    "auth.signature_key",
                    &"<unset>",
                    "required (manager-api's server.mqtt_signature_key); set XZ_AUTH__SIGNATURE_KEY, or auth.allow_unsigned = true (or --dev) for development only",
                ));
            }
            _ => {}
        }
        if !valid_node_id(&self.node.id) {
            return Err(invalid(
                "node.id",
                &self.node.id,
                "1-64 characters of A-Z a-z 0-9 - _ . (it names the node in bus topics and Redis keys)",
            ));
        }
        if self.bus.mode == BusMode::External {
            if let Err(reason) = self.bus.broker_address() {
                return Err(invalid("bus.url", &self.bus.url, &reason));
            }
            if !valid_node_id(&self.bus.share_group) {
                return Err(invalid(
                    "bus.share_group",
                    &self.bus.share_group,
                    "1-64 characters of A-Z a-z 0-9 - _ . (a shared-subscription group name)",
                ));
            }
            if !(5..=65_535).contains(&self.bus.keep_alive_secs) {
                return Err(invalid(
                    "bus.keep_alive_secs",
                    &self.bus.keep_alive_secs,
                    "5 to 65535 seconds",
                ));
            }
        }
        for (i, url) in self.pipeline.xiaozhi.urls.iter().enumerate() {
            if let Err(e) = crate::protocol::upstream::gateway_url(url) {
                return Err(invalid(
                    &format!("pipeline.xiaozhi.urls[{i}]"),
                    url,
                    &e.to_string(),
                ));
            }
        }
        if self.pipeline.kind == PipelineKind::Xiaozhi && self.pipeline.xiaozhi.urls.is_empty() {
            return Err(invalid(
                "pipeline.xiaozhi.urls",
                &"[]",
                "pipeline.kind = \"xiaozhi\" needs at least one xiaozhi-server URL, e.g. ws://127.0.0.1:8000/xiaozhi/v1/",
            ));
        }
        {
            let url = &self.history.database_url;
            if !(url.starts_with("sqlite:")
                || url.starts_with("mysql://")
                || url.starts_with("mariadb://"))
            {
                return Err(invalid(
                    "history.database_url",
                    &redact_url(url),
                    "must start with sqlite:// or mysql://",
                ));
            }
        }
        if self.quic.cert_path.is_some() != self.quic.key_path.is_some() {
            return Err(invalid(
                "quic.cert_path",
                &format!(
                    "{:?} / key_path {:?}",
                    self.quic.cert_path, self.quic.key_path
                ),
                "set both quic.cert_path and quic.key_path, or neither (a self-signed certificate is made)",
            ));
        }
        if self.udp.public_host.trim().is_empty() {
            return Err(invalid(
                "udp.public_host",
                &self.udp.public_host,
                "devices need a host or IP to send audio to",
            ));
        }
        for (key, value) in [
            ("mqtt.connect_timeout_secs", self.mqtt.connect_timeout_secs),
            (
                "mqtt.default_keep_alive_secs",
                self.mqtt.default_keep_alive_secs,
            ),
            (
                "mqtt.tls_handshake_timeout_secs",
                self.mqtt.tls_handshake_timeout_secs,
            ),
            ("udp.idle_timeout_secs", self.udp.idle_timeout_secs),
            ("quic.token_ttl_secs", self.quic.token_ttl_secs),
            (
                "pipeline.echo.max_turn_secs",
                self.pipeline.echo.max_turn_secs,
            ),
            (
                "pipeline.echo.realtime_idle_ms",
                self.pipeline.echo.realtime_idle_ms,
            ),
            ("shutdown.grace_secs", self.shutdown.grace_secs),
            (
                "pipeline.xiaozhi.connect_timeout_ms",
                self.pipeline.xiaozhi.connect_timeout_ms,
            ),
            ("mcp.timeout_secs", self.mcp.timeout_secs),
            ("history.write_timeout_ms", self.history.write_timeout_ms),
            ("history.retry_secs", self.history.retry_secs),
            (
                "history.max_utterance_secs",
                self.history.max_utterance_secs,
            ),
            (
                "management.command_timeout_secs",
                self.management.command_timeout_secs,
            ),
            ("presence.heartbeat_secs", self.presence.heartbeat_secs),
            ("presence.ttl_secs", self.presence.ttl_secs),
            (
                "presence.offline_retention_secs",
                self.presence.offline_retention_secs,
            ),
            ("presence.timeout_ms", self.presence.timeout_ms),
            ("admin.command_timeout_ms", self.admin.command_timeout_ms),
            ("http.header_timeout_secs", self.http.header_timeout_secs),
            (
                "broker.tls_handshake_timeout_secs",
                self.broker.tls_handshake_timeout_secs,
            ),
            ("http.request_timeout_secs", self.http.request_timeout_secs),
            ("bus.reconnect_max_secs", self.bus.reconnect_max_secs),
            ("calls.ring_timeout_secs", self.calls.ring_timeout_secs),
            ("calls.wake_timeout_secs", self.calls.wake_timeout_secs),
            ("push.default_ttl_secs", self.push.default_ttl_secs),
            ("push.max_ttl_secs", self.push.max_ttl_secs),
            ("push.wake_timeout_ms", self.push.wake_timeout_ms),
            ("push.sweep_secs", self.push.sweep_secs),
            ("push.max_per_device", self.push.max_per_device),
            ("push.max_queued", self.push.max_queued),
            ("push.rate_per_sec", u64::from(self.push.rate_per_sec)),
            ("push.max_clip_secs", self.push.max_clip_secs),
            ("push.clip_ttl_secs", self.push.clip_ttl_secs),
        ] {
            if value == 0 {
                return Err(invalid(key, &value, "must be greater than 0"));
            }
            // Durations are added to clocks: a huge one would overflow them (found by the
            // `config` fuzz target). A year is far beyond any sane setting.
            let max = if key.ends_with("_ms") {
                MAX_DURATION_SECS * 1000
            } else {
                MAX_DURATION_SECS
            };
            if value > max {
                return Err(invalid(key, &value, &format!("at most {max} (one year)")));
            }
        }
        for (key, value) in [
            ("mqtt.max_packet_bytes", self.mqtt.max_packet_bytes),
            ("mqtt.max_connections", self.mqtt.max_connections),
            ("mqtt.outbound_queue", self.mqtt.outbound_queue),
            ("broker.publish_queue", self.broker.publish_queue),
            ("udp.uplink_queue", self.udp.uplink_queue),
            ("quic.max_connections", self.quic.max_connections),
            ("calls.max_calls", self.calls.max_calls),
            (
                "push.max_devices_per_request",
                self.push.max_devices_per_request,
            ),
            ("push.max_message_bytes", self.push.max_message_bytes),
            ("push.max_clip_bytes", self.push.max_clip_bytes),
            (
                "pipeline.xiaozhi.audio_buffer_frames",
                self.pipeline.xiaozhi.audio_buffer_frames,
            ),
            (
                "pipeline.xiaozhi.max_message_bytes",
                self.pipeline.xiaozhi.max_message_bytes,
            ),
            ("mcp.max_tools", self.mcp.max_tools),
            ("history.queue", self.history.queue),
            ("history.batch", self.history.batch),
            ("history.decode_threads", self.history.decode_threads),
            ("mcp.max_pending", self.mcp.max_pending),
            ("admin.max_in_flight", self.admin.max_in_flight),
            ("http.max_body_bytes", self.http.max_body_bytes),
            ("http.ws_max_message_bytes", self.http.ws_max_message_bytes),
            ("http.max_connections", self.http.max_connections),
        ] {
            if value == 0 {
                return Err(invalid(key, &value, "must be greater than 0"));
            }
        }
        if self.udp.shards > MAX_UDP_SHARDS {
            return Err(invalid(
                "udp.shards",
                &self.udp.shards,
                "at most 256 (0: one per core)",
            ));
        }
        if self.mqtt.max_packet_bytes > 16 * 1024 * 1024 {
            return Err(invalid(
                "mqtt.max_packet_bytes",
                &self.mqtt.max_packet_bytes,
                "at most 16 MiB",
            ));
        }
        if self.calls.max_call_secs > MAX_DURATION_SECS {
            return Err(invalid(
                "calls.max_call_secs",
                &self.calls.max_call_secs,
                &format!("at most {MAX_DURATION_SECS} (one year), or 0 for no limit"),
            ));
        }
        if self.presence.ttl_secs <= self.presence.heartbeat_secs {
            return Err(invalid(
                "presence.ttl_secs",
                &self.presence.ttl_secs,
                "must be longer than presence.heartbeat_secs (three heartbeats is a good choice), or live devices expire between heartbeats",
            ));
        }
        if let Some(url) = &self.presence.redis_url
            && !url.starts_with("redis://")
        {
            return Err(invalid(
                "presence.redis_url",
                &redact_url(url),
                "must start with redis://, e.g. redis://127.0.0.1:6379/0 (TLS to Redis is not built in)",
            ));
        }
        if let Some(url) = &self.push.redis_rpc_url
            && !url.starts_with("redis://")
        {
            return Err(invalid(
                "push.redis_rpc_url",
                &redact_url(url),
                "must start with redis://, e.g. redis://127.0.0.1:6379/0",
            ));
        }
        if let Some(base) = &self.push.clip_base_url
            && !(base.starts_with("http://") || base.starts_with("https://"))
        {
            return Err(invalid(
                "push.clip_base_url",
                base,
                "must start with http:// or https:// (the firmware fetches nothing else)",
            ));
        }
        if self.push.redis_rpc_key.is_empty() {
            return Err(invalid(
                "push.redis_rpc_key",
                &"\"\"",
                "must name a Redis list",
            ));
        }
        for (i, user) in self.broker.users.iter().enumerate() {
            if user.username.is_empty() || user.password.is_empty() {
                return Err(invalid(
                    &format!("broker.users[{i}]"),
                    &user.username,
                    "username and password must not be empty",
                ));
            }
        }
        for (section, cert, key) in [
            ("mqtt", &self.mqtt.tls_cert, &self.mqtt.tls_key),
            ("broker", &self.broker.tls_cert, &self.broker.tls_key),
        ] {
            match (cert, key) {
                (Some(_), None) => {
                    return Err(invalid(
                        &format!("{section}.tls_key"),
                        &"<unset>",
                        &format!("required when {section}.tls_cert is set"),
                    ));
                }
                (None, Some(_)) => {
                    return Err(invalid(
                        &format!("{section}.tls_cert"),
                        &"<unset>",
                        &format!("required when {section}.tls_key is set"),
                    ));
                }
                _ => {}
            }
        }
        for user in &self.broker.users {
            if user.username.is_empty() || user.password.is_empty() {
                return Err(invalid(
                    "broker.users",
                    &user.username,
                    "every broker user needs a username and a password",
                ));
            }
        }
        Ok(())
    }

    /// Things that work but that an operator must be told about at every start.
    pub fn warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        if self.auth.signature_key.is_none() {
            w.push("auth.allow_unsigned is on and no signature key is set: ANY device password is accepted. Development only.".to_owned());
        }
        if is_loopback_host(&self.udp.public_host) {
            w.push(format!(
                "udp.public_host = {:?} is a loopback address: only devices on this machine (simulators) can send audio. Set XZ_UDP__PUBLIC_HOST to an address devices can reach.",
                self.udp.public_host
            ));
        }
        if self.broker.users.is_empty() {
            w.push("broker.users is empty: the broker listener refuses every client.".to_owned());
        }
        if let Some(key) = &self.auth.signature_key
            && let Some(why) = weak_signature_key(key)
        {
            w.push(format!(
                "auth.signature_key is weak ({why}): it signs every device password and the management API's daily token. Choose a long random key in manager-api and here."
            ));
        }
        if !self.transport.require_authenticated.is_empty()
            && !self.transport.udp_aead
            && !self.quic.enabled
        {
            w.push(format!(
                "transport.require_authenticated lists {:?} but neither transport.udp_aead nor quic.enabled is on: every hello from those groups is refused.",
                self.transport.require_authenticated
            ));
        }
        if self.management.enabled && self.auth.signature_key.is_none() {
            w.push("the management API (/api/devices/status, /api/commands) is off: its bearer token is derived from auth.signature_key, which is not set.".to_owned());
        }
        if self.pipeline_kind() == PipelineKind::Xiaozhi && self.pipeline.xiaozhi.auth_key.is_none()
        {
            w.push("pipeline.xiaozhi.auth_key is not set: connections to xiaozhi-server carry no token (fine only if its server.auth.enabled is false).".to_owned());
        }
        w
    }

    /// The pipeline to run: `auto` resolves to `xiaozhi` when upstream URLs are set.
    pub fn pipeline_kind(&self) -> PipelineKind {
        match self.pipeline.kind {
            PipelineKind::Auto if self.pipeline.xiaozhi.urls.is_empty() => PipelineKind::Echo,
            PipelineKind::Auto => PipelineKind::Xiaozhi,
            kind => kind,
        }
    }

    /// The device password verifier this config asks for.
    pub fn verifier(&self) -> Verifier {
        match &self.auth.signature_key {
            Some(key) => Verifier::Signed {
                key: key.as_bytes().to_vec(),
            },
            None => Verifier::Unsigned,
        }
    }

    /// Whether device TLS is configured.
    pub fn device_tls(&self) -> Option<(&Path, &Path)> {
        Some((
            self.mqtt.tls_cert.as_deref()?,
            self.mqtt.tls_key.as_deref()?,
        ))
    }

    pub fn udp_idle_timeout(&self) -> Duration {
        Duration::from_secs(self.udp.idle_timeout_secs)
    }
}

/// Why a signature key is weak, by the Node gateway's rules (which refuses to start its
/// management API with such a key; we warn instead).
pub fn weak_signature_key(key: &str) -> Option<&'static str> {
    if key.chars().count() < 8 {
        return Some("shorter than 8 characters");
    }
    if !key.chars().any(|c| c.is_ascii_uppercase()) {
        return Some("no upper-case letter");
    }
    if !key.chars().any(|c| c.is_ascii_lowercase()) {
        return Some("no lower-case letter");
    }
    let lower = key.to_lowercase();
    ["test", "1234", "admin", "password", "qwerty", "xiaozhi"]
        .into_iter()
        .find(|w| lower.contains(w))
        .map(|_| "contains a common word or sequence")
}

/// Turns figment's error into one that names the key, the bad value and where it came
/// from (some serde errors, such as a bad socket address, do not mention the value).
fn describe_extract_error(figment: &Figment, error: figment::Error) -> ConfigError {
    let Some(first) = error.clone().into_iter().next() else {
        return ConfigError::Parse(Box::new(error));
    };
    if first.path.is_empty() {
        return ConfigError::Parse(Box::new(first));
    }
    let key = first.path.join(".").to_lowercase();
    let value = match figment.find_value(&key) {
        Ok(figment::value::Value::String(_, s)) => s,
        Ok(v) => serde_json::to_string(&v).unwrap_or_else(|_| format!("{v:?}")),
        Err(_) => "<missing>".to_owned(),
    };
    let source = first
        .metadata
        .as_ref()
        .map(|m| format!(" (from {})", m.name))
        .unwrap_or_default();
    ConfigError::Invalid {
        key,
        value,
        reason: format!("{}{source}", first.kind),
    }
}

fn is_loopback_host(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail closures return figment::Error
mod tests {
    use super::*;

    fn base() -> Figment {
        Figment::from(Serialized::defaults(Config::default()))
            .merge(Serialized::default("auth.signature_key", "k"))
    }

    #[test]
    fn bus_urls_name_a_host_and_port() {
        let addr = |url: &str| {
            BusConfig {
                url: url.into(),
                ..BusConfig::default()
            }
            .broker_address()
        };
        assert_eq!(addr("mqtt://emqx:1884"), Ok(("emqx".into(), 1884)));
        assert_eq!(addr("mqtt://10.0.0.5"), Ok(("10.0.0.5".into(), 1883)));
        assert_eq!(addr("tcp://h:1/"), Ok(("h".into(), 1)));
        assert_eq!(addr("mqtt://[::1]:1885"), Ok(("::1".into(), 1885)));
        assert_eq!(addr("mqtt://[::1]"), Ok(("::1".into(), 1883)));
        for bad in [
            "emqx:1883",
            "mqtts://emqx:8883",
            "mqtt://",
            "mqtt://:1883",
            "mqtt://h:0",
            "mqtt://h:99999",
            "mqtt://u@h:1883",
            "mqtt://h:1883/x",
            "mqtt://[::1",
        ] {
            assert!(addr(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn node_ids_are_topic_levels_and_external_mode_checks_its_settings() {
        assert!(valid_node_id(&NodeConfig::default().id));
        for bad in ["", "a/b", "a+b", "#", "a b", &"x".repeat(65)] {
            let err = Config::from_figment(base().merge(Serialized::default("node.id", bad)))
                .unwrap_err();
            assert!(err.to_string().contains("node.id"), "{bad}: {err}");
        }
        let external = || base().merge(Serialized::default("bus.mode", "external"));
        assert!(Config::from_figment(external()).is_ok());
        let err = Config::from_figment(external().merge(Serialized::default("bus.url", "x")))
            .unwrap_err();
        assert!(err.to_string().contains("bus.url"), "{err}");
        let err =
            Config::from_figment(external().merge(Serialized::default("bus.share_group", "a/b")))
                .unwrap_err();
        assert!(err.to_string().contains("bus.share_group"), "{err}");
        // Embedded mode does not care about the external broker's settings.
        assert!(Config::from_figment(base().merge(Serialized::default("bus.url", "x"))).is_ok());
    }

    #[test]
    fn defaults_need_a_key_or_explicit_unsigned_mode() {
        let err = Config::from_figment(Figment::from(Serialized::defaults(Config::default())))
            .unwrap_err();
        assert!(err.to_string().contains("auth.signature_key"), "{err}");
        let unsigned = Config::from_figment(
            Figment::from(Serialized::defaults(Config::default()))
                .merge(Serialized::default("auth.allow_unsigned", true)),
        )
        .unwrap();
        assert!(matches!(unsigned.verifier(), Verifier::Unsigned));
        assert!(
            unsigned
                .warnings()
                .iter()
                .any(|w| w.contains("ANY device password"))
        );
        assert!(unsigned.warnings().iter().any(|w| w.contains("loopback")));
    }

    #[test]
    fn toml_then_env_override_in_order() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("gw.toml", "[udp]\npublic_host = \"198.51.100.7\"\nidle_timeout_secs = 30\n[auth]\nsignature_key = \"from-file\"\n")?;
            jail.set_env("XZ_UDP__IDLE_TIMEOUT_SECS", "45");
            let c = Config::load(Some(Path::new("gw.toml")), Figment::new()).unwrap();
            assert_eq!(c.udp.public_host, "198.51.100.7");
            assert_eq!(c.udp.idle_timeout_secs, 45);
            assert_eq!(c.auth.signature_key.as_deref(), Some("from-file"));
            assert!(
                c.warnings().is_empty() || !c.warnings().iter().any(|w| w.contains("loopback"))
            );
            Ok(())
        });
    }

    #[test]
    fn bad_values_name_the_key_and_value() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("XZ_AUTH__SIGNATURE_KEY", "k");
            jail.set_env("XZ_UDP__LISTEN", "not-an-address");
            let err = Config::load(None, Figment::new()).unwrap_err().to_string();
            assert!(
                err.contains("not-an-address") && err.contains("listen"),
                "{err}"
            );
            Ok(())
        });
        let err =
            Config::from_figment(base().merge(Serialized::default("mqtt.max_connections", 0)))
                .unwrap_err()
                .to_string();
        assert!(
            err.contains("mqtt.max_connections") && err.contains('0'),
            "{err}"
        );
        let err =
            Config::from_figment(base().merge(Serialized::default("mqtt.tls_cert", "/x.pem")))
                .unwrap_err()
                .to_string();
        assert!(err.contains("mqtt.tls_key"), "{err}");
    }

    #[test]
    fn unknown_keys_and_missing_files_are_errors() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("typo.toml", "[udp]\npublic_hots = \"x\"\n")?;
            let err = Config::load(Some(Path::new("typo.toml")), Figment::new())
                .unwrap_err()
                .to_string();
            assert!(err.contains("public_hots"), "{err}");
            let err = Config::load(Some(Path::new("missing.toml")), Figment::new())
                .unwrap_err()
                .to_string();
            assert!(err.contains("missing.toml"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn env_secrets_stay_verbatim_and_config_var_is_not_a_setting() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("XZ_AUTH__SIGNATURE_KEY", "0123");
            jail.set_env("XZ_CONFIG", "somewhere.toml");
            let c = Config::load(None, Figment::new()).unwrap();
            assert_eq!(c.auth.signature_key.as_deref(), Some("0123"));
            Ok(())
        });
    }
}
