//! The MQTT side of the gateway: the bus (the embedded broker, or an external one) and
//! the connected devices' registry.
//!
//! Devices cannot be served by a stock broker: every device publishes to the one shared
//! topic `device-server`, so the publisher is only known from its connection, and current
//! firmware never subscribes to the topic it is sent messages on. So device connections
//! end in our own xiaozhi-aware front end (`crate::front_end`, a layer up: it hands
//! device messages to the session layer), which registers each device here
//! ([`registry`]), and the rumqttd router ([`bus`]) carries their traffic on
//! identity-bearing topics (`crate::protocol::topics`) to admin and integration clients.
//! Those connect to our own broker listener ([`clients`]; its rules, sans-IO, in
//! `client_rules`), which bridges each to the
//! router through a local link and checks every publish and subscription against the
//! user's role ([`acl`]): rumqttd's own listener has no ACLs.
//!
//! In scale-out mode the bus is an external broker instead ([`external`]), reached as an
//! MQTT client; [`backend`] picks one, and [`inbound`] routes what either delivers,
//! including what nodes send each other ([`forwarding`]).

pub mod acl;
pub mod backend;
pub mod bus;
mod client_rules;
pub mod clients;
pub mod external;
pub mod forwarding;
pub mod inbound;
pub mod registry;
