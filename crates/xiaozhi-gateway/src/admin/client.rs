//! A small admin client for the bus: sends commands and waits for their replies. The
//! `devices` and `cmd` CLI commands use it, and so do tests and the command latency
//! benchmark.
//!
//! It is an ordinary MQTT 3.1.1 client (rumqttc) on the broker listener: every command
//! names `xiaozhi/admin/replies/<client id>` as its `reply_to`, the client subscribes to
//! that one topic, and replies are matched to requests by request id (`<client id>-<n>`).
//! One reply topic per client, not per request, keeps the router's topic table small.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::{AsyncClient, ConnectReturnCode, Event, MqttOptions, Packet, QoS};
use serde_json::Value;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::protocol::mac::Mac;
use crate::protocol::topics;

/// Why a command could not be sent or answered.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the broker listener at {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error(
        "the broker listener refused the login ({0}); check the username and password in broker.users"
    )]
    Refused(String),
    #[error("the broker listener did not answer within {0:?}")]
    ConnectTimeout(Duration),
    #[error("no reply within {0:?} (is the gateway's admin.enabled on?)")]
    NoReply(Duration),
    #[error("the connection to the broker listener ended")]
    Closed,
    #[error("{0}")]
    Mqtt(String),
}

type Waiters = Arc<Mutex<HashMap<String, oneshot::Sender<Value>>>>;

/// A connected admin client.
pub struct AdminClient {
    client: AsyncClient,
    waiters: Waiters,
    prefix: String,
    next: AtomicU64,
    task: JoinHandle<()>,
}

impl AdminClient {
    /// Connects, subscribes to the reply topics, and waits until both are acknowledged.
    pub async fn connect(
        host: &str,
        port: u16,
        username: &str,
        password: &str,
        timeout: Duration,
    ) -> Result<AdminClient, ClientError> {
        let client_id = format!("xz-admin-{}-{}", std::process::id(), rand::random::<u32>());
        let mut opts = MqttOptions::new(&client_id, host, port);
        // An empty username logs in anonymously (external brokers that allow it).
        if !username.is_empty() {
            opts.set_credentials(username, password);
        }
        opts.set_keep_alive(Duration::from_secs(30));
        opts.set_max_packet_size(16 << 20, 16 << 20);
        let (client, mut eventloop) = AsyncClient::new(opts, 64);
        // Small request/response messages: no Nagle (delayed ACKs cost 40 ms a hop).
        let mut network = rumqttc::NetworkOptions::new();
        network.set_tcp_nodelay(true);
        eventloop.set_network_options(network);
        let addr = format!("{host}:{port}");

        // Until the SUBACK arrives, errors end the connection attempt.
        let ready = async {
            client
                .subscribe(
                    format!("{}+", topics::ADMIN_REPLIES_PREFIX),
                    QoS::AtMostOnce,
                )
                .await
                .map_err(|e| ClientError::Mqtt(e.to_string()))?;
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(ack)))
                        if ack.code != ConnectReturnCode::Success =>
                    {
                        return Err(ClientError::Refused(format!("{:?}", ack.code)));
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => return Ok(()),
                    Ok(_) => {}
                    Err(rumqttc::ConnectionError::ConnectionRefused(code)) => {
                        return Err(ClientError::Refused(format!("{code:?}")));
                    }
                    Err(e) => {
                        return Err(ClientError::Connect {
                            addr: addr.clone(),
                            reason: e.to_string(),
                        });
                    }
                }
            }
        };
        tokio::time::timeout(timeout, ready)
            .await
            .map_err(|_| ClientError::ConnectTimeout(timeout))??;

        let waiters: Waiters = Arc::default();
        let task = tokio::spawn(pump(eventloop, waiters.clone()));
        Ok(AdminClient {
            client,
            waiters,
            prefix: client_id,
            next: AtomicU64::new(1),
            task,
        })
    }

    /// Sends a command (a JSON object without `request_id`) to one device (`Some`) or
    /// the fleet (`None`) and waits for the reply.
    pub async fn request(
        &self,
        device: Option<&Mac>,
        mut command: Value,
        timeout: Duration,
    ) -> Result<Value, ClientError> {
        let request_id = format!(
            "{}-{}",
            self.prefix,
            self.next.fetch_add(1, Ordering::Relaxed)
        );
        command["request_id"] = Value::from(request_id.clone());
        command["reply_to"] = Value::from(reply_topic(&self.prefix));
        let (tx, rx) = oneshot::channel();
        self.lock().insert(request_id.clone(), tx);
        let topic = match device {
            Some(mac) => topics::admin_command(mac),
            None => topics::ADMIN_COMMANDS.to_owned(),
        };
        if let Err(e) = self
            .client
            .publish(topic, QoS::AtLeastOnce, false, command.to_string())
            .await
        {
            self.lock().remove(&request_id);
            return Err(ClientError::Mqtt(e.to_string()));
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(_)) => Err(ClientError::Closed),
            Err(_) => {
                self.lock().remove(&request_id);
                Err(ClientError::NoReply(timeout))
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, oneshot::Sender<Value>>> {
        self.waiters.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Disconnects cleanly.
    pub async fn disconnect(self) {
        let _ = self.client.disconnect().await;
        let _ = tokio::time::timeout(Duration::from_secs(1), self.task).await;
    }
}

fn reply_topic(client_id: &str) -> String {
    format!("{}{client_id}", topics::ADMIN_REPLIES_PREFIX)
}

async fn pump(mut eventloop: rumqttc::EventLoop, waiters: Waiters) {
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let Ok(reply) = serde_json::from_slice::<Value>(&p.payload) else {
                    continue;
                };
                let Some(id) = reply.get("request_id").and_then(Value::as_str) else {
                    continue;
                };
                let waiter = waiters.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
                if let Some(waiter) = waiter {
                    let _ = waiter.send(reply);
                }
            }
            Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => break,
            Ok(_) => {}
            Err(_) => break,
        }
    }
    // Dropping the waiters tells every pending request the connection is gone.
    waiters.lock().unwrap_or_else(|p| p.into_inner()).clear();
}
