//! The subcommands of the `xiaozhi-gateway` binary that drive a gateway from outside, so
//! the binary's `main.rs` only parses, loads the configuration and dispatches: the
//! operator's admin commands ([`admin`]) and pushes ([`push`]), the demo and the mock speech server ([`demo`]),
//! the simulator's command ([`simulate`]) and the chat-history writer's benchmark
//! ([`bench_history`]). The other measuring subcommands are [`crate::bench::command`] and
//! [`crate::soak::command`].

pub mod admin;
pub mod bench_history;
pub mod demo;
pub mod push;
pub mod simulate;
