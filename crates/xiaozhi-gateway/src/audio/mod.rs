//! The UDP audio channel: one port served by a socket per core (shards, steered by
//! connection id), each with its table of channels keyed by connection id, and the
//! per-conversation handles sessions use.
//!
//! * [`socket`] owns each shard's receive side: it routes each datagram by connection id
//!   to its [`crate::protocol::audio_channel::UplinkChannel`], which applies the sequence
//!   and address rules and decrypts; accepted frames go to the conversation's bounded
//!   uplink queue.
//! * [`batch`] moves datagrams many per system call (`recvmmsg`, `sendmmsg`), and
//!   queues sealed downlink datagrams for the socket task.
//! * [`channel`] is what a session holds: the lease on a connection id, the uplink
//!   receiver and the downlink sender (sealer + the device's current address).
//! * [`frame_slab`] gives frames that leave their task an owner without an allocation
//!   per frame.
//! * [`quic`] is the other transport a channel can have (the `quic` extension): its own
//!   endpoint and port, plugged into the same [`AudioChannel`] and `Downlink`.
//!
//! Two channels of a device-to-device call on this node are *spliced*: the receive task
//! seals each accepted frame of one straight into the other's downlink, in the batch it
//! arrived in, so call audio takes no task hop and no allocation, and no frame is held
//! decrypted beyond its re-sealing.
//!
//! Architecture invariant: the audio path never parses JSON, and every drop on it is
//! counted by reason.

pub mod batch;
pub mod channel;
pub mod frame_slab;
pub mod quic;
pub mod socket;

pub use channel::{AudioChannel, Downlink, SpliceTarget, UplinkFrame};
pub use socket::{AudioSocket, AudioSocketHandle};
