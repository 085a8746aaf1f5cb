//! The load tool and its reference points, for `xiaozhi-gateway bench`.
//!
//! Benchmarks of a voice gateway are easy to get wrong: on loopback the kernel's
//! per-datagram work dominates, absolute CPU figures move 2x between machines of the same
//! kind, and a saturated load generator looks exactly like a slow server. So this module
//! measures side by side and reports its own health:
//! * [`load`]: N simulated firmware devices (MQTT hello, connected UDP sockets, AES-CTR,
//!   the firmware's downlink checks) paced in batches, with no timer and no allocation
//!   per datagram; it reports its own lateness next to the target's figures.
//! * [`floor`]: the least any server can do for this protocol (one thread, one socket,
//!   the same socket calls and cipher work per datagram as the gateway and nothing else).
//! * [`relay_floor`]: the least a relay of this protocol to xiaozhi-server can do (the
//!   floor's MQTT side, one WebSocket per conversation, no queues between tasks).
//! * [`echo_upstream`]: a lean xiaozhi-server stand-in that echoes audio, so the gateway
//!   (or the Node.js gateway) can be measured through an upstream.
//! * [`procstat`]: CPU (user and kernel) and RSS of any process, from `/proc`.
//! * [`commands`]: admin command round trips through the bus, direct and forwarded
//!   between nodes.
//! * [`calls`]: device-to-device calls: pairs connected through the management API,
//!   talking both ways; device-to-device latency and the gateways' CPU per call.
//! * [`history`]: the chat-history writer's sustained throughput against a real
//!   database, and `--fill` for a big realistic history to measure the API against.

pub mod calls;
pub mod command;
pub mod commands;
pub mod echo_upstream;
pub mod floor;
pub mod histogram;
pub mod history;
pub mod load;
pub mod procstat;
pub mod push;
pub mod relay_floor;
