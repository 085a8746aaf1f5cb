//! Limits that keep hostile or broken clients from crowding out everyone else.
//!
//! The gateway is the internet-facing edge of a fleet, so every listener bounds what one
//! peer can take: connections and CONNECT rate per source address ([`admission`]),
//! messages per device and datagrams per audio channel ([`token_bucket`]), and HTTP
//! bodies, headers and request time (in [`crate::http`]). Each refusal is counted in
//! [`crate::metrics`] and logged once per offender ([`offenders`]), so a flood shows up
//! as one warning and a climbing counter, not a log storm.
//!
//! Everything here is pure: time comes in as an argument, so the rules are unit-tested
//! without sleeping, and the drivers (accept loops, connection tasks, the UDP task) only
//! ask and act. Every limit and its default is listed in `docs/security.md`.

pub mod admission;
pub mod offenders;
pub mod token_bucket;

pub use admission::{Admission, AdmissionLimits, Refusal};
pub use offenders::OffenderLog;
pub use token_bucket::TokenBucket;
