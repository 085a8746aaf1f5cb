//! The `xiaozhi` pipeline: each conversation is relayed over its own WebSocket to an
//! existing xiaozhi-server, exactly as the Node.js MQTT gateway does (PROTOCOL.md
//! section 6), so the server needs no change.
//!
//! * [`upstreams`]: which server a conversation goes to (round robin, skipping recent
//!   failures).
//! * this file: opening a conversation: connect (TCP, optional TLS, WebSocket upgrade
//!   with the device headers and token), send the hello, wait for the server's, all
//!   within `connect_timeout_ms`. Each failure is classified, counted and turned into
//!   a message the device can show.
//! * [`relay`]: the running conversation, both directions.

pub mod audio_queue;
pub mod relay;
pub mod upstreams;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// Bytes tungstenite reads from an upstream at a time.
const UPSTREAM_READ_BUFFER: usize = 4096;

/// Bytes tungstenite gathers before writing to an upstream without a flush.
const UPSTREAM_WRITE_BUFFER: usize = 4096;
use tokio_tungstenite::tungstenite::{self, Message};
use tracing::{debug, warn};

use self::relay::XiaozhiConversation;
use self::upstreams::Upstreams;
use super::{OpenRequest, Opened, Pipeline, PipelineError};
use crate::config::XiaozhiConfig;
use crate::metrics::Metrics;
use crate::protocol::upstream::{self, ServerHello};

/// A byte stream a WebSocket runs over (TCP or TLS).
pub trait UpstreamIo: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> UpstreamIo for T {}

/// The WebSocket to one upstream.
pub type UpstreamSocket = WebSocketStream<Box<dyn UpstreamIo>>;

/// Why a conversation could not be opened upstream. The message is what the device
/// shows; the label is the metric.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectError {
    #[error("speech server refused the connection: {0}")]
    Refused(String),
    #[error("speech server did not answer within {0:?}")]
    Timeout(Duration),
    #[error("speech server rejected the gateway's credentials ({0})")]
    Auth(String),
    #[error("speech server WebSocket handshake failed: {0}")]
    Handshake(String),
    #[error("{0}")]
    Hello(String),
}

impl ConnectError {
    fn count(&self, m: &Metrics) {
        Metrics::inc(match self {
            ConnectError::Refused(_) => &m.upstream_failed_refused,
            ConnectError::Timeout(_) => &m.upstream_failed_timeout,
            ConnectError::Auth(_) => &m.upstream_failed_auth,
            ConnectError::Handshake(_) => &m.upstream_failed_handshake,
            ConnectError::Hello(_) => &m.upstream_failed_hello,
        });
    }
}

/// The pipeline: shared by all conversations.
pub struct XiaozhiPipeline {
    config: XiaozhiConfig,
    upstreams: Upstreams,
    tls: TlsConnector,
    metrics: Arc<Metrics>,
}

impl XiaozhiPipeline {
    /// `config.urls` must have passed config validation.
    pub fn new(config: XiaozhiConfig, metrics: Arc<Metrics>) -> Self {
        let urls = config
            .urls
            .iter()
            .map(|u| upstream::gateway_url(u).unwrap_or_else(|_| u.clone()))
            .collect();
        let upstreams = Upstreams::new(urls, Duration::from_secs(config.retry_after_secs));
        let mut roots = tokio_rustls::rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let tls = tokio_rustls::rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        XiaozhiPipeline {
            config,
            upstreams,
            tls: TlsConnector::from(Arc::new(tls)),
            metrics,
        }
    }

    /// Buffers sized for this protocol (JSON of a few KB, Opus frames of ~150 bytes):
    /// tungstenite's 128 KiB read buffer is allocated up front per connection, which
    /// made every conversation cost ~130 KB more than it needs (measured: 500 talking
    /// devices through an upstream, 217 KB -> see docs/benchmarks.md). Larger messages
    /// still arrive whole: the buffer grows up to `max_message_bytes`.
    fn ws_config(&self) -> WebSocketConfig {
        WebSocketConfig::default()
            .read_buffer_size(UPSTREAM_READ_BUFFER)
            .write_buffer_size(UPSTREAM_WRITE_BUFFER)
            .max_message_size(Some(self.config.max_message_bytes))
            .max_frame_size(Some(self.config.max_message_bytes))
    }

    /// Connects to one upstream and completes the WebSocket upgrade.
    async fn connect(
        &self,
        url: &str,
        request: &OpenRequest,
    ) -> Result<UpstreamSocket, ConnectError> {
        let mut http = url
            .into_client_request()
            .map_err(|e| ConnectError::Handshake(e.to_string()))?;
        let unix = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let headers = upstream::request_headers(
            &request.device,
            self.config.auth_key.as_deref().map(str::as_bytes),
            unix,
            request.remote.map(|r| r.ip()),
        );
        for (name, value) in headers {
            let value = HeaderValue::from_str(&value)
                .map_err(|e| ConnectError::Handshake(e.to_string()))?;
            http.headers_mut().insert(name, value);
        }
        let uri = http.uri().clone();
        let host = uri.host().unwrap_or_default().to_owned();
        let tls = uri.scheme_str() == Some("wss");
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let tcp = TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| ConnectError::Refused(format!("{host}:{port}: {e}")))?;
        let _ = tcp.set_nodelay(true);
        let io: Box<dyn UpstreamIo> = if tls {
            let name = ServerName::try_from(host.clone())
                .map_err(|e| ConnectError::Handshake(format!("{host}: {e}")))?;
            Box::new(
                self.tls
                    .connect(name, tcp)
                    .await
                    .map_err(|e| ConnectError::Handshake(format!("TLS: {e}")))?,
            )
        } else {
            Box::new(tcp)
        };
        let (ws, _response) =
            tokio_tungstenite::client_async_with_config(http, io, Some(self.ws_config()))
                .await
                .map_err(|e| match e {
                    tungstenite::Error::Http(response)
                        if matches!(response.status().as_u16(), 401 | 403) =>
                    {
                        ConnectError::Auth(format!("HTTP {}", response.status().as_u16()))
                    }
                    other => ConnectError::Handshake(other.to_string()),
                })?;
        Ok(ws)
    }

    /// Sends our hello and waits for the server's.
    async fn exchange_hello(
        ws: &mut UpstreamSocket,
        request: &OpenRequest,
    ) -> Result<ServerHello, ConnectError> {
        ws.send(Message::text(upstream::upstream_hello(&request.hello)))
            .await
            .map_err(|e| ConnectError::Hello(format!("speech server connection failed: {e}")))?;
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(text))) => {
                    return upstream::parse_server_hello(&text, &request.hello.audio_params)
                        .map_err(|e| match e {
                            // xiaozhi-server accepts the upgrade, then refuses a bad token
                            // in plain text ("认证失败": authentication failed) and closes.
                            upstream::ServerHelloError::NotJson => {
                                let text: String = text.chars().take(80).collect();
                                if text.contains("认证") || text.to_lowercase().contains("auth") {
                                    ConnectError::Auth(format!("it said {text:?}"))
                                } else {
                                    ConnectError::Hello(format!(
                                        "the speech server sent {text:?} instead of a hello"
                                    ))
                                }
                            }
                            other => ConnectError::Hello(other.to_string()),
                        });
                }
                Some(Ok(Message::Close(frame))) => {
                    let why = frame
                        .map(|f| format!("{} {}", f.code, f.reason))
                        .unwrap_or_default();
                    return Err(ConnectError::Hello(format!(
                        "speech server closed the connection before its hello {why}"
                    )));
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => {
                    return Err(ConnectError::Hello(format!(
                        "speech server connection failed: {e}"
                    )));
                }
                None => {
                    return Err(ConnectError::Hello(
                        "speech server closed the connection before its hello".into(),
                    ));
                }
            }
        }
    }
}

#[async_trait]
impl Pipeline for XiaozhiPipeline {
    fn name(&self) -> &'static str {
        "xiaozhi"
    }

    async fn open(&self, request: OpenRequest) -> Result<Opened, PipelineError> {
        let budget = Duration::from_millis(self.config.connect_timeout_ms);
        let deadline = tokio::time::Instant::now() + budget;
        let mut last_error = ConnectError::Timeout(budget);
        for index in self.upstreams.plan(Instant::now()) {
            let url = self.upstreams.url(index);
            let attempt = async {
                let mut ws = self.connect(url, &request).await?;
                let hello = Self::exchange_hello(&mut ws, &request).await?;
                Ok::<_, ConnectError>((ws, hello))
            };
            let started = Instant::now();
            let result = tokio::time::timeout_at(deadline, attempt)
                .await
                .unwrap_or(Err(ConnectError::Timeout(budget)));
            match result {
                Ok((ws, hello)) => {
                    self.upstreams.succeeded(index);
                    Metrics::inc(&self.metrics.upstream_connects);
                    Metrics::observe(&self.metrics.histograms.upstream_connect, started.elapsed());
                    debug!(url, session_id = %hello.session_id, "upstream conversation opened");
                    return Ok(Opened {
                        session_id: hello.session_id,
                        downlink_audio: hello.audio_params,
                        conversation: Box::new(XiaozhiConversation::new(
                            ws,
                            self.config.audio_buffer_frames,
                            self.metrics.clone(),
                        )),
                    });
                }
                Err(e) => {
                    e.count(&self.metrics);
                    warn!(url, error = %e, "upstream failed");
                    self.upstreams.failed(index, Instant::now());
                    let out_of_time = matches!(e, ConnectError::Timeout(_));
                    last_error = e;
                    if out_of_time || tokio::time::Instant::now() >= deadline {
                        break;
                    }
                }
            }
        }
        Err(PipelineError {
            message: last_error.to_string(),
        })
    }
}
