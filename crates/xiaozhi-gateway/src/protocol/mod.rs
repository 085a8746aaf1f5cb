//! The protocol core, as the rest of the gateway names it: the `xiaozhi-proto` crate,
//! re-exported, so `crate::protocol::mac::Mac` and friends read the same wherever a rule
//! lives. The rules themselves are in `crates/xiaozhi-proto/`, a crate of its own so that
//! nothing in them can reach for a socket, a runtime or the clock.

pub use xiaozhi_proto::*;
