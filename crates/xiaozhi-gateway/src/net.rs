//! Binding the gateway's sockets, with errors that say which setting to change.
//!
//! Every listener (device MQTT, the broker listener, HTTP, UDP audio, QUIC) is bound
//! through here, so a busy port always fails the start with the address, the setting
//! that moves it and its environment variable. This module sits below every driver: it
//! knows sockets and settings' names, nothing of what is served on them.

use std::net::SocketAddr;

use tokio::net::TcpListener;

/// A listener could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen for {what} on {addr}: {source}; change {setting} (environment: {env})", env = env_name(setting))]
pub struct BindError {
    pub what: &'static str,
    pub addr: SocketAddr,
    pub setting: &'static str,
    #[source]
    pub source: std::io::Error,
}

/// `udp.listen` -> `XZ_UDP__LISTEN`.
fn env_name(setting: &str) -> String {
    format!(
        "{}{}",
        crate::config::ENV_PREFIX,
        setting.to_uppercase().replace('.', "__")
    )
}

/// Binds a TCP listener, with an error that says which setting to change.
pub async fn bind_tcp(
    addr: SocketAddr,
    what: &'static str,
    setting: &'static str,
) -> Result<TcpListener, BindError> {
    let err = |source| BindError {
        what,
        addr,
        setting,
        source,
    };
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .map_err(err)?;
    // As `TcpListener::bind` does: a restarted gateway can bind while old connections
    // linger in TIME_WAIT.
    #[cfg(unix)]
    socket.set_reuseaddr(true).map_err(err)?;
    socket.bind(addr).map_err(err)?;
    socket.listen(LISTEN_BACKLOG).map_err(err)
}

/// Accept queue of every TCP listener (the kernel caps it at `net.core.somaxconn`). A
/// fleet reconnecting after a restart, or a connect storm, must not overflow it while the
/// accept loop catches up: an overflowing queue drops handshakes from every address
/// alike, the well-behaved ones included.
pub const LISTEN_BACKLOG: u32 = 4096;

/// A non-blocking UDP socket bound to `addr` with the requested kernel buffers: audio lost
/// to a full buffer is lost for good, and the default (about 200 KB) overflows at a
/// thousand talking devices whenever the reader is a few milliseconds late. The sizes are
/// requests; the kernel caps them (`net.core.rmem_max` / `wmem_max`). Used by the UDP
/// audio socket, the QUIC endpoint and the load tool's QUIC clients.
pub fn bind_udp(
    addr: SocketAddr,
    recv_buffer: usize,
    send_buffer: usize,
) -> std::io::Result<std::net::UdpSocket> {
    let domain = if addr.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let sock = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    let _ = sock.set_recv_buffer_size(recv_buffer);
    let _ = sock.set_send_buffer_size(send_buffer);
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    Ok(sock.into())
}
