//! The sans-IO protocol core of xiaozhi-gateway: everything the gateway knows about bytes
//! on the wire, with no sockets, no tasks and no clock of its own.
//!
//! Each module takes bytes or events (plus `now` where time matters) and returns values
//! or actions; the gateway's I/O drivers (`xiaozhi_gateway::front_end`, `broker`, `audio`,
//! `session`) are thin loops around them. That keeps every rule the firmware depends on
//! (credentials, the device MQTT connection, the UDP header and ciphers, sequence and
//! address rules, QUIC framing, the JSON control messages, upstream framing, the call rules) unit-testable with plain
//! values.
//!
//! A crate of its own so the compiler keeps that promise: it depends on no async runtime
//! and no network crate (the gateway's `tests/it/architecture.rs` checks its whole
//! dependency tree against Cargo.lock), and nothing in it reads the system clock, sleeps
//! or spawns (checked in the same test). The simulator and the load tools use it as the
//! gateway does, so both sides of every test speak through the same rules.

pub mod audio_channel;
pub mod call_book;
pub mod cipher;
pub mod control;
pub mod credentials;
pub mod datagram;
pub mod device_mqtt;
pub mod encryption;
pub mod gcm_channel;
pub mod interner;
pub mod mac;
pub mod mcp;
pub mod negotiation;
pub mod opus;
pub mod push;
pub mod quic_framing;
pub mod replay_window;
pub mod session;
pub mod topics;
pub mod upstream;
