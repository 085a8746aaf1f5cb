//! xiaozhi-tools: what tests, measures and demonstrates the gateway from outside, kept
//! out of the service so that nothing the gateway runs can reach for it (the compiler
//! keeps this: `xiaozhi-gateway`, the service, does not depend on this crate).
//!
//! * [`simulator`] speaks exactly as the firmware does (MQTT, hello, encrypted UDP or
//!   QUIC audio, MCP, calls), and plays a xiaozhi-server upstream, for tests, the demo and
//!   load; it uses the same sans-IO core as the gateway.
//! * [`bench`] measures: load (devices, packets/s, latency percentiles, CPU and memory),
//!   connects, calls, admin commands, the chat-history writer, and the relay floors.
//! * [`soak`] runs a gateway process for hours under churn and faults and reports its
//!   memory, latency and errors over time.
//! * [`cli`] holds the binary's subcommands that drive a gateway from outside (admin
//!   commands, the demo, the mock speech server, the simulator, the history benchmark),
//!   so the binary's `main.rs` stays a thin dispatcher.

pub mod bench;
pub mod cli;
pub mod simulator;
pub mod soak;
