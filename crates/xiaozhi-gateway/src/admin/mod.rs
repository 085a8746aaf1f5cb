//! Operating the fleet over MQTT: admin commands in, one reply each out (the gateway's
//! events on the bus are `crate::events`, a layer down, since conversations publish
//! them).
//!
//! * [`command`]: the command and reply formats (sans-IO).
//! * [`executor`]: takes commands from the bus, acts on devices (MCP calls, ending a
//!   conversation, disconnecting, presence queries) and publishes replies.
//! * [`forward`]: scale-out: commands sent on to the node that holds the device.
//!
//! Who may send commands is decided at the broker listener (roles, see
//! [`crate::broker::acl`]), before a command reaches the bus.

pub mod client;
pub mod command;
pub mod executor;
pub mod forward;
