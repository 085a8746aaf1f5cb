//! Batched datagram I/O for the audio socket: many datagrams per system call.
//!
//! On loopback and on real networks alike, a lean UDP server spends most of its CPU in
//! the kernel, much of it entering and leaving system calls and waking up. Devices send
//! in bursts (every device's 60 ms frames land in the same event-loop turn when the
//! socket is busy), so one `recvmmsg` takes up to [`BATCH`] datagrams, and the downlink
//! datagrams that conversations produce in one turn leave in one `sendmmsg`
//! ([`SendQueue`]). Elsewhere than Linux both fall back to one call per datagram.
//!
//! The send queue is bounded in datagrams; a full queue drops and counts (the caller
//! decides which counter), it never blocks a conversation. Its storage is two reusable
//! byte arenas (one being filled by conversations, one being sent by the socket task),
//! so steady-state sending allocates nothing.

use std::io;
use std::net::SocketAddr;
use std::sync::{Mutex, PoisonError};

use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::Notify;

use crate::protocol::datagram::MAX_DATAGRAM_LEN;

/// nix's preallocated `mmsghdr` array, made movable between threads.
#[cfg(target_os = "linux")]
struct Headers(nix::sys::socket::MultiHeaders<nix::sys::socket::SockaddrStorage>);

// SAFETY: `MultiHeaders` is not `Send` only because it holds raw pointers: into its own
// heap-allocated address array (which moves with it), and into the I/O buffers of the
// last call (stale between calls, overwritten before the next one, never read). It is
// only ever used through `&mut self`, so moving it to another thread is sound.
#[cfg(target_os = "linux")]
unsafe impl Send for Headers {}

#[cfg(target_os = "linux")]
impl Headers {
    fn new() -> Self {
        Headers(nix::sys::socket::MultiHeaders::preallocate(BATCH, None))
    }
}

/// Datagrams per system call.
pub const BATCH: usize = 32;

/// Bytes reserved per received datagram: one more than the largest accepted, so an
/// oversized datagram is seen as oversized rather than silently truncated.
const SLOT: usize = MAX_DATAGRAM_LEN + 1;

/// Buffers for receiving up to [`BATCH`] datagrams at once.
pub struct RecvBatch {
    buf: Vec<u8>,
    lens: [usize; BATCH],
    from: [Option<SocketAddr>; BATCH],
    #[cfg(target_os = "linux")]
    headers: Headers,
}

impl Default for RecvBatch {
    fn default() -> Self {
        Self::new()
    }
}

impl RecvBatch {
    pub fn new() -> Self {
        RecvBatch {
            buf: vec![0; SLOT * BATCH],
            lens: [0; BATCH],
            from: [None; BATCH],
            #[cfg(target_os = "linux")]
            headers: Headers::new(),
        }
    }

    /// Receives what is waiting (up to [`BATCH`]) without blocking; `WouldBlock` when
    /// nothing is. Clears the socket's readiness on `WouldBlock`, as tokio requires.
    pub fn recv(&mut self, socket: &UdpSocket) -> io::Result<usize> {
        socket.try_io(Interest::READABLE, || self.recv_now(socket))
    }

    #[cfg(target_os = "linux")]
    fn recv_now(&mut self, socket: &UdpSocket) -> io::Result<usize> {
        use std::io::IoSliceMut;
        use std::os::fd::AsRawFd;

        use nix::sys::socket::{MsgFlags, SockaddrLike, recvmmsg};

        let mut slots = self.buf.chunks_exact_mut(SLOT);
        let mut iovs: [[IoSliceMut<'_>; 1]; BATCH] = std::array::from_fn(|_| {
            // `buf` holds exactly BATCH slots, so there is one for every iovec.
            [IoSliceMut::new(slots.next().unwrap_or_default())]
        });
        let results = recvmmsg(
            socket.as_raw_fd(),
            &mut self.headers.0,
            iovs.iter_mut(),
            MsgFlags::MSG_DONTWAIT,
            None,
        )
        .map_err(io::Error::from)?;
        let mut n = 0;
        for (i, msg) in results.enumerate() {
            self.lens[i] = msg.bytes;
            self.from[i] = msg
                .address
                .and_then(|a: nix::sys::socket::SockaddrStorage| {
                    if let Some(v4) = a.as_sockaddr_in() {
                        Some(SocketAddr::from(std::net::SocketAddrV4::from(*v4)))
                    } else {
                        a.as_sockaddr_in6()
                            .map(|v6| SocketAddr::from(std::net::SocketAddrV6::from(*v6)))
                    }
                    .filter(|_| a.len() > 0)
                });
            n = i + 1;
        }
        Ok(n)
    }

    #[cfg(not(target_os = "linux"))]
    fn recv_now(&mut self, socket: &UdpSocket) -> io::Result<usize> {
        let (len, from) = socket.try_recv_from(&mut self.buf[..SLOT])?;
        self.lens[0] = len;
        self.from[0] = Some(from);
        Ok(1)
    }

    /// Datagram `i` of the last [`RecvBatch::recv`] and its sender (`None` if the kernel
    /// gave no address, which UDP never does).
    pub fn datagram(&mut self, i: usize) -> (&mut [u8], Option<SocketAddr>) {
        let len = self.lens[i].min(SLOT);
        let from = self.from[i];
        (&mut self.buf[i * SLOT..i * SLOT + len], from)
    }
}

/// Downlink datagrams waiting for the socket task.
#[derive(Default)]
struct Pending {
    bytes: Vec<u8>,
    items: Vec<(SocketAddr, usize, usize)>,
}

/// A bounded queue of sealed downlink datagrams, sent in batches by the socket task.
pub struct SendQueue {
    pending: Mutex<Pending>,
    ready: Notify,
    capacity: usize,
}

/// The queue already holds its capacity; the datagram was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueFull;

impl SendQueue {
    /// A queue of at most `capacity` datagrams.
    pub fn new(capacity: usize) -> Self {
        SendQueue {
            pending: Mutex::new(Pending::default()),
            ready: Notify::new(),
            capacity: capacity.max(1),
        }
    }

    /// Queues one datagram to `to`.
    pub fn push(&self, to: SocketAddr, datagram: &[u8]) -> Result<(), QueueFull> {
        let was_empty = {
            let mut p = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
            if p.items.len() >= self.capacity {
                return Err(QueueFull);
            }
            let start = p.bytes.len();
            p.bytes.extend_from_slice(datagram);
            p.items.push((to, start, datagram.len()));
            p.items.len() == 1
        };
        if was_empty {
            self.ready.notify_one();
        }
        Ok(())
    }

    /// Waits until something has been queued.
    pub async fn ready(&self) {
        self.ready.notified().await;
    }
}

/// The socket task's side of a [`SendQueue`]: takes what is queued and sends it.
pub struct SendBatch {
    sending: Pending,
    #[cfg(target_os = "linux")]
    headers: Headers,
}

/// What one flush did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Flushed {
    pub datagrams: u64,
    pub bytes: u64,
    pub errors: u64,
}

impl Default for SendBatch {
    fn default() -> Self {
        Self::new()
    }
}

impl SendBatch {
    pub fn new() -> Self {
        SendBatch {
            sending: Pending::default(),
            #[cfg(target_os = "linux")]
            headers: Headers::new(),
        }
    }

    /// Sends everything queued so far, waiting for the socket to become writable when
    /// its buffer is full. A datagram the kernel refuses (other than for a full buffer)
    /// is counted in `errors` and skipped.
    pub async fn flush(&mut self, queue: &SendQueue, socket: &UdpSocket) -> Flushed {
        {
            let mut p = queue.pending.lock().unwrap_or_else(PoisonError::into_inner);
            std::mem::swap(&mut *p, &mut self.sending);
        }
        let mut done = Flushed::default();
        let mut next = 0;
        while next < self.sending.items.len() {
            match socket.try_io(Interest::WRITABLE, || self.send_now(socket, next)) {
                Ok(sent) => {
                    for &(_, _, len) in &self.sending.items[next..next + sent] {
                        done.datagrams += 1;
                        done.bytes += len as u64;
                    }
                    next += sent.max(1);
                    if sent == 0 {
                        done.errors += 1;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if socket.writable().await.is_err() {
                        done.errors += (self.sending.items.len() - next) as u64;
                        break;
                    }
                }
                Err(_) => {
                    // The first datagram of the batch was refused (e.g. no route); the
                    // rest go in the next call.
                    done.errors += 1;
                    next += 1;
                }
            }
        }
        self.sending.bytes.clear();
        self.sending.items.clear();
        done
    }

    #[cfg(target_os = "linux")]
    fn send_now(&mut self, socket: &UdpSocket, from: usize) -> io::Result<usize> {
        use std::io::IoSlice;
        use std::os::fd::AsRawFd;

        use nix::sys::socket::{MsgFlags, SockaddrStorage, sendmmsg};

        let items = &self.sending.items[from..(from + BATCH).min(self.sending.items.len())];
        let bytes = &self.sending.bytes;
        let mut iovs: [[IoSlice<'_>; 1]; BATCH] = std::array::from_fn(|_| [IoSlice::new(&[])]);
        let mut addrs: [Option<SockaddrStorage>; BATCH] = [None; BATCH];
        for (i, &(to, start, len)) in items.iter().enumerate() {
            iovs[i] = [IoSlice::new(&bytes[start..start + len])];
            addrs[i] = Some(SockaddrStorage::from(to));
        }
        let n = items.len();
        let results = sendmmsg(
            socket.as_raw_fd(),
            &mut self.headers.0,
            iovs[..n].iter(),
            &addrs[..n],
            [],
            MsgFlags::MSG_DONTWAIT,
        )
        .map_err(io::Error::from)?;
        Ok(results.count())
    }

    #[cfg(not(target_os = "linux"))]
    fn send_now(&mut self, socket: &UdpSocket, from: usize) -> io::Result<usize> {
        let (to, start, len) = self.sending.items[from];
        socket.try_send_to(&self.sending.bytes[start..start + len], to)?;
        Ok(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_burst_is_received_in_one_batch_and_echoed_in_one_flush() {
        let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let a = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        for i in 0..20u8 {
            let c = if i % 2 == 0 { &a } else { &b };
            c.send_to(&[i; 40], server.local_addr().unwrap())
                .await
                .unwrap();
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        server.readable().await.unwrap();
        let mut batch = RecvBatch::new();
        let n = batch.recv(&server).unwrap();
        assert_eq!(n, 20);
        let queue = SendQueue::new(64);
        for i in 0..n {
            let (d, from) = batch.datagram(i);
            assert_eq!(d, &[i as u8; 40][..]);
            let from = from.unwrap();
            let want = if i % 2 == 0 { &a } else { &b };
            assert_eq!(from, want.local_addr().unwrap());
            queue.push(from, d).unwrap();
        }
        assert!(matches!(batch.recv(&server), Err(e) if e.kind() == io::ErrorKind::WouldBlock));
        let mut sender = SendBatch::new();
        let flushed = sender.flush(&queue, &server).await;
        assert_eq!(
            flushed,
            Flushed {
                datagrams: 20,
                bytes: 800,
                errors: 0
            }
        );
        let mut buf = [0u8; 64];
        for i in (0..20u8).step_by(2) {
            let (len, _) = a.recv_from(&mut buf).await.unwrap();
            assert_eq!(&buf[..len], &[i; 40][..]);
        }
        for i in (1..20u8).step_by(2) {
            let (len, _) = b.recv_from(&mut buf).await.unwrap();
            assert_eq!(&buf[..len], &[i; 40][..]);
        }
    }

    #[tokio::test]
    async fn a_full_queue_refuses_and_oversized_datagrams_are_seen_whole() {
        let queue = SendQueue::new(2);
        let to: SocketAddr = "127.0.0.1:9".parse().unwrap();
        assert!(queue.push(to, b"x").is_ok());
        assert!(queue.push(to, b"y").is_ok());
        assert_eq!(queue.push(to, b"z"), Err(QueueFull));

        let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let c = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        c.send_to(
            &vec![7u8; MAX_DATAGRAM_LEN + 100],
            server.local_addr().unwrap(),
        )
        .await
        .unwrap();
        server.readable().await.unwrap();
        let mut batch = RecvBatch::new();
        assert_eq!(batch.recv(&server).unwrap(), 1);
        // Truncated to one byte more than the maximum, so it is dropped as oversized.
        assert_eq!(batch.datagram(0).0.len(), MAX_DATAGRAM_LEN + 1);
    }

    #[tokio::test]
    async fn a_refused_destination_does_not_stop_the_rest() {
        let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let ok = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let queue = SendQueue::new(8);
        // Port 0 is not a valid destination: the kernel refuses that one datagram.
        queue.push("127.0.0.1:0".parse().unwrap(), b"bad").unwrap();
        queue.push(ok.local_addr().unwrap(), b"good").unwrap();
        let flushed = SendBatch::new().flush(&queue, &server).await;
        assert_eq!(flushed.datagrams, 1);
        assert_eq!(flushed.errors, 1);
        let mut buf = [0u8; 8];
        let (len, _) = ok.recv_from(&mut buf).await.unwrap();
        assert_eq!(&buf[..len], b"good");
    }
}
