//! A TCP proxy that can be cut, put between the gateway and a dependency (the database,
//! Redis, the speech server) to take the dependency away on cue.
//!
//! Stopping the real MariaDB or Redis would need privileges and would disturb other users
//! of the machine; a proxy takes one dependency away from one gateway only. While cut,
//! the proxy resets every live connection (as a crashed server or a dropped route does)
//! and resets new ones right after accepting them, so clients see `ECONNRESET` at once
//! rather than a hang. Restored, it passes bytes again. The listening socket stays bound
//! throughout, so the port cannot be taken by anyone else in between.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::debug;

/// How long the proxy waits for the real server to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// What a proxy has done so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ProxyStats {
    /// Connections passed through to the server.
    pub passed: u64,
    /// Connections reset on arrival because the proxy was cut.
    pub refused: u64,
    /// Live connections reset by a cut.
    pub cut: u64,
    /// Connections open now.
    pub live: u64,
}

#[derive(Default)]
struct Counters {
    passed: AtomicU64,
    refused: AtomicU64,
    cut: AtomicU64,
    live: AtomicU64,
}

/// A running proxy. Dropping it stops accepting and closes its connections.
pub struct FaultProxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    /// Where the proxy forwards to.
    pub target: SocketAddr,
    name: &'static str,
    /// `true` while passing, `false` while cut.
    up: watch::Sender<bool>,
    counters: Arc<Counters>,
    accept: JoinHandle<()>,
}

impl FaultProxy {
    /// Binds 127.0.0.1 on a free port, forwarding to `target`; starts passing.
    pub async fn start(name: &'static str, target: SocketAddr) -> io::Result<FaultProxy> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let up = watch::Sender::new(true);
        let counters = Arc::new(Counters::default());
        let accept = tokio::spawn(accept_loop(
            listener,
            target,
            up.subscribe(),
            counters.clone(),
        ));
        Ok(FaultProxy {
            addr,
            target,
            name,
            up,
            counters,
            accept,
        })
    }

    /// Cuts: resets every live connection and every new one until [`restore`](Self::restore).
    pub fn cut(&self) {
        debug!(proxy = self.name, "cut");
        self.up.send_replace(false);
    }

    /// Passes connections again.
    pub fn restore(&self) {
        debug!(proxy = self.name, "restored");
        self.up.send_replace(true);
    }

    pub fn is_cut(&self) -> bool {
        !*self.up.borrow()
    }

    pub fn stats(&self) -> ProxyStats {
        let c = &self.counters;
        ProxyStats {
            passed: c.passed.load(Ordering::Relaxed),
            refused: c.refused.load(Ordering::Relaxed),
            cut: c.cut.load(Ordering::Relaxed),
            live: c.live.load(Ordering::Relaxed),
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
        // Live connections end too: their tasks see the cut.
        self.up.send_replace(false);
    }
}

/// Closes with RST instead of FIN, as a crashed peer's kernel would.
fn reset(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}

async fn accept_loop(
    listener: TcpListener,
    target: SocketAddr,
    up: watch::Receiver<bool>,
    counters: Arc<Counters>,
) {
    loop {
        let (client, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                debug!(error = %e, "fault proxy: accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        if !*up.borrow() {
            counters.refused.fetch_add(1, Ordering::Relaxed);
            reset(client);
            continue;
        }
        tokio::spawn(pass(client, target, up.clone(), counters.clone()));
    }
}

/// One connection: connect to the target, copy both ways until either side closes or
/// the proxy is cut.
async fn pass(
    mut client: TcpStream,
    target: SocketAddr,
    mut up: watch::Receiver<bool>,
    counters: Arc<Counters>,
) {
    let server = tokio::select! {
        _ = up.wait_for(|&u| !u) => None,
        r = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target)) => r.ok().and_then(Result::ok),
    };
    let Some(mut server) = server else {
        counters.refused.fetch_add(1, Ordering::Relaxed);
        reset(client);
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    counters.passed.fetch_add(1, Ordering::Relaxed);
    counters.live.fetch_add(1, Ordering::Relaxed);
    let cut = tokio::select! {
        _ = up.wait_for(|&u| !u) => true,
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => false,
    };
    counters.live.fetch_sub(1, Ordering::Relaxed);
    if cut {
        counters.cut.fetch_add(1, Ordering::Relaxed);
        reset(client);
        reset(server);
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// An echo server on a free port.
    async fn echo_server() -> SocketAddr {
        let l = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        addr
    }

    async fn round_trip(s: &mut TcpStream) -> io::Result<()> {
        s.write_all(b"ping").await?;
        let mut buf = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf))
            .await
            .map_err(|_| io::Error::other("timeout"))??;
        assert_eq!(&buf, b"ping");
        Ok(())
    }

    #[tokio::test]
    async fn passes_cuts_and_passes_again() {
        let proxy = FaultProxy::start("test", echo_server().await)
            .await
            .unwrap();
        let mut a = TcpStream::connect(proxy.addr).await.unwrap();
        round_trip(&mut a).await.unwrap();

        proxy.cut();
        assert!(proxy.is_cut());
        // The live connection is reset...
        let mut buf = [0u8; 4];
        let r = tokio::time::timeout(Duration::from_secs(5), a.read(&mut buf))
            .await
            .unwrap();
        assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
        // ...and a new one does not get through.
        let mut b = TcpStream::connect(proxy.addr).await.unwrap();
        assert!(round_trip(&mut b).await.is_err());

        proxy.restore();
        let mut c = TcpStream::connect(proxy.addr).await.unwrap();
        round_trip(&mut c).await.unwrap();
        let stats = proxy.stats();
        assert_eq!(stats.passed, 2);
        assert_eq!(stats.refused, 1);
        assert_eq!(stats.cut, 1);
        assert_eq!(stats.live, 1);
    }
}
