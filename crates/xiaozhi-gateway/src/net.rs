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
    let sock = udp_socket(addr, recv_buffer, send_buffer)?;
    sock.bind(&addr.into())?;
    Ok(sock.into())
}

/// An unbound non-blocking UDP socket of `addr`'s family with the requested buffers.
fn udp_socket(
    addr: SocketAddr,
    recv_buffer: usize,
    send_buffer: usize,
) -> std::io::Result<socket2::Socket> {
    let domain = if addr.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let sock = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    let _ = sock.set_recv_buffer_size(recv_buffer);
    let _ = sock.set_send_buffer_size(send_buffer);
    sock.set_nonblocking(true)?;
    Ok(sock)
}

/// `count` UDP sockets on one address (`SO_REUSEPORT`), each datagram delivered to the
/// socket whose index is the big-endian `u32` at `steer_offset` of its payload modulo
/// `count` (a classic BPF program on the group). Datagrams too short to hold that field
/// go to socket 0.
///
/// The audio path uses it to shard by connection id: the id is chosen so that its
/// channel's datagrams land on the socket whose task holds the channel, whatever address
/// or port the device's NAT gives it (hashing the 4-tuple, the kernel's default, would
/// move a channel to another socket on every NAT rebinding).
///
/// A busy port still fails: the address is first bound by a plain socket, which any
/// other socket on it refuses, `SO_REUSEPORT` or not; only then is the group bound (on
/// the port the probe got, for port 0). With `count` 1 this is [`bind_udp`].
#[cfg(target_os = "linux")]
pub fn bind_udp_steered(
    addr: SocketAddr,
    count: usize,
    steer_offset: u32,
    recv_buffer: usize,
    send_buffer: usize,
) -> std::io::Result<Vec<std::net::UdpSocket>> {
    use nix::sys::socket::{setsockopt, sockopt};

    if count <= 1 {
        return Ok(vec![bind_udp(addr, recv_buffer, send_buffer)?]);
    }
    let modulus = u32::try_from(count).map_err(|_| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "too many UDP shards")
    })?;
    let addr = std::net::UdpSocket::bind(addr)?.local_addr()?;
    let mut sockets = Vec::with_capacity(count);
    for _ in 0..count {
        let sock = udp_socket(addr, recv_buffer, send_buffer)?;
        setsockopt(&sock, sockopt::ReusePort, &true).map_err(std::io::Error::from)?;
        sock.bind(&addr.into())?;
        sockets.push(std::net::UdpSocket::from(sock));
    }
    let filter = steering_filter(steer_offset, modulus);
    let program = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_ptr().cast_mut(),
    };
    setsockopt(&sockets[0], sockopt::AttachReusePortCbpf, &program)
        .map_err(std::io::Error::from)?;
    Ok(sockets)
}

/// Elsewhere than Linux there is no steering: one socket.
#[cfg(not(target_os = "linux"))]
pub fn bind_udp_steered(
    addr: SocketAddr,
    _count: usize,
    _steer_offset: u32,
    recv_buffer: usize,
    send_buffer: usize,
) -> std::io::Result<Vec<std::net::UdpSocket>> {
    Ok(vec![bind_udp(addr, recv_buffer, send_buffer)?])
}

/// `A = payload[offset..offset + 4]` (big-endian; a short datagram ends the program
/// with 0), `A %= modulus`, return `A`: the index of the socket in the group.
#[cfg(target_os = "linux")]
fn steering_filter(offset: u32, modulus: u32) -> [libc::sock_filter; 3] {
    let op = |code: u32, k: u32| libc::sock_filter {
        // The BPF opcode constants are all below 0x100.
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    };
    [
        op(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, offset),
        op(libc::BPF_ALU | libc::BPF_MOD | libc::BPF_K, modulus),
        op(libc::BPF_RET | libc::BPF_A, 0),
    ]
}

#[cfg(test)]
#[cfg(target_os = "linux")]
mod tests {
    use std::net::UdpSocket;
    use std::time::Duration;

    use super::*;

    fn datagram(steer: u32) -> [u8; 16] {
        let mut d = [0u8; 16];
        d[4..8].copy_from_slice(&steer.to_be_bytes());
        d[8..12].copy_from_slice(&steer.to_le_bytes());
        d
    }

    /// What each socket of the group has received: the steering values.
    fn drain(sockets: &[UdpSocket]) -> Vec<Vec<u32>> {
        sockets
            .iter()
            .map(|s| {
                s.set_nonblocking(false).unwrap();
                s.set_read_timeout(Some(Duration::from_millis(200)))
                    .unwrap();
                let mut got = Vec::new();
                let mut buf = [0u8; 64];
                while let Ok(n) = s.recv(&mut buf) {
                    got.push(if n >= 8 {
                        u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]])
                    } else {
                        u32::MAX
                    });
                }
                got
            })
            .collect()
    }

    #[test]
    fn each_datagram_reaches_the_socket_its_steering_field_names() {
        let sockets =
            bind_udp_steered("127.0.0.1:0".parse().unwrap(), 3, 4, 1 << 16, 1 << 16).unwrap();
        assert_eq!(sockets.len(), 3);
        let addr = sockets[0].local_addr().unwrap();
        assert_ne!(addr.port(), 0);
        assert!(sockets.iter().all(|s| s.local_addr().unwrap() == addr));
        // From several source ports, so the kernel's 4-tuple hash would scatter them.
        let clients: Vec<UdpSocket> = (0..4)
            .map(|_| UdpSocket::bind("127.0.0.1:0").unwrap())
            .collect();
        let steers = [0u32, 1, 2, 3, 4, 5, 7, 0xffff_ffff, 0x8000_0001, 1000];
        for (i, steer) in steers.iter().enumerate() {
            clients[i % clients.len()]
                .send_to(&datagram(*steer), addr)
                .unwrap();
        }
        // Too short to hold the field: socket 0.
        clients[1].send_to(&[1, 2, 3], addr).unwrap();
        let got = drain(&sockets);
        for (index, received) in got.iter().enumerate() {
            let mut expected: Vec<u32> = steers
                .iter()
                .copied()
                .filter(|s| (*s % 3) as usize == index)
                .collect();
            if index == 0 {
                expected.push(u32::MAX);
            }
            let mut received = received.clone();
            received.sort_unstable();
            expected.sort_unstable();
            assert_eq!(received, expected, "socket {index}");
        }
    }

    #[test]
    fn a_busy_port_is_refused_whoever_holds_it() {
        let plain = UdpSocket::bind("127.0.0.1:0").unwrap();
        let err =
            bind_udp_steered(plain.local_addr().unwrap(), 2, 4, 1 << 16, 1 << 16).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
        // Another gateway's group (SO_REUSEPORT) does not let a second one join it.
        let group =
            bind_udp_steered("127.0.0.1:0".parse().unwrap(), 2, 4, 1 << 16, 1 << 16).unwrap();
        let err =
            bind_udp_steered(group[0].local_addr().unwrap(), 2, 4, 1 << 16, 1 << 16).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
    }

    #[test]
    fn one_socket_needs_no_group() {
        let sockets =
            bind_udp_steered("127.0.0.1:0".parse().unwrap(), 1, 4, 1 << 16, 1 << 16).unwrap();
        assert_eq!(sockets.len(), 1);
        // A plain socket: the port is not open to a SO_REUSEPORT group.
        let err =
            bind_udp_steered(sockets[0].local_addr().unwrap(), 2, 4, 1 << 16, 1 << 16).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
    }
}
