//! The MQTT side of the gateway: the embedded broker (the bus) and the device-facing
//! front end in front of it.
//!
//! Devices cannot be served by a stock broker: every device publishes to the one shared
//! topic `device-server`, so the publisher is only known from its connection, and current
//! firmware never subscribes to the topic it is sent messages on. So device connections
//! end in our own xiaozhi-aware front end ([`front_end`]), which knows who each device is,
//! and the rumqttd router behind it ([`bus`]) carries their traffic on identity-bearing
//! topics ([`topics`]) to admin and integration clients. Those connect to our own broker
//! listener ([`clients`]), which bridges each to the router through a local link and
//! checks every publish and subscription against the user's role ([`acl`]): rumqttd's
//! own listener has no ACLs.
//!
//! In scale-out mode the bus is an external broker instead ([`external`]), reached as an
//! MQTT client; [`backend`] picks one, and [`inbound`] routes what either delivers.

pub mod acl;
pub mod backend;
pub mod bus;
pub mod clients;
pub mod external;
pub mod front_end;
pub mod inbound;
pub mod registry;
pub mod topics;
