//! The sans-IO protocol core: everything the gateway knows about bytes on the wire,
//! with no sockets, no tasks and no clock of its own.
//!
//! Each submodule takes bytes or events (plus `now` where time matters) and returns values
//! or actions; the I/O drivers in [`crate::broker`], [`crate::audio`] and
//! [`crate::session`] are thin loops around them. That keeps every rule the firmware
//! depends on (credentials, UDP header and cipher, sequence and address rules, the MQTT
//! connection state machine, the JSON control messages) unit-testable with plain values.
//!
//! Nothing in here may perform I/O, spawn, sleep or read the system clock.

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
pub mod quic_framing;
pub mod replay_window;
pub mod topics;
pub mod upstream;
