//! xiaozhi-gateway: the device edge for ESP32 voice assistants running xiaozhi firmware.
//! This crate is the service: drivers, stores, pipelines, HTTP and the bus around the
//! sans-IO core ([`protocol`], the `xiaozhi-proto` crate). The tools (simulator, bench,
//! soak) are the `xiaozhi-tools` crate, which depends on this one and never the other way
//! round; the workspace's root package holds the `xiaozhi-gateway` binary and the
//! end-to-end tests.
//!
//! How data flows:
//! * Devices hold an MQTT connection to the **device front end** ([`front_end`]),
//!   which authenticates them, frames their JSON and maps it onto the **bus**
//!   ([`broker::bus`], an embedded rumqttd router) on identity-bearing topics.
//! * Device JSON also goes to the **session manager** ([`session`]): a `hello` opens a
//!   conversation, which gets an encrypted UDP **audio channel** ([`audio`], or QUIC:
//!   [`audio::quic`]) and a **speech pipeline** ([`pipeline`]: echo, or a xiaozhi-server
//!   upstream). A conversation may become a leg of a device-to-device call ([`calls`]),
//!   its audio then going to the other device instead.
//! * Uplink audio flows device -> UDP socket -> channel table -> pipeline; downlink
//!   audio flows pipeline -> sealer -> UDP socket -> device. The audio path never
//!   parses JSON.
//! * Everything that decides something about bytes, and the rules of conversations,
//!   lives in the sans-IO [`protocol`] core (the `xiaozhi-proto` crate); the tasks that
//!   own sockets are thin drivers around it.
//! * [`presence`] tells everyone (Redis or memory, and the bus) which devices are
//!   offline, online or in a conversation; [`admin`] runs admin commands from the bus and
//!   publishes the gateway's events.
//! * [`history`] records relayed conversations as manager-api's chat history.
//! * [`http`] serves health checks, the management and calling APIs, history and the
//!   console; [`metrics`] holds every counter; [`config`] is the one typed configuration;
//!   [`limits`] and [`tls`] bound and secure what peers may do.
//! * [`server`] wires it all together and owns shutdown; every listener stops the same
//!   way ([`lifecycle`]), within one grace period.

pub mod admin;
pub mod audio;
pub mod broker;
pub mod calls;
pub mod config;
pub mod device_link;
pub mod events;
pub mod front_end;
pub mod history;
pub mod http;
pub mod lifecycle;
pub mod limits;
pub mod metrics;
pub mod net;
pub mod pipeline;
pub mod presence;
pub mod protocol;
pub mod push;
pub mod server;
pub mod session;
pub mod tls;
