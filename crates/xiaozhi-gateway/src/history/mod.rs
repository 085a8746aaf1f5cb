//! Chat history: recording conversations, storing them, querying them.
//!
//! * [`opus_packets`]: an utterance's Opus frames in one buffer (no allocation per
//!   frame).
//! * [`recorder`]: per conversation, turns relayed traffic (stt, tts sentences, tool
//!   calls, uplink and downlink Opus) into [`record::ChatRecord`]s.
//! * [`writer`]: one task behind a bounded queue that batches records into
//!   transactions, applies each device's `chat_history_conf`, has audio decoded
//!   ([`audio`]) on low-priority threads ([`decoder`]) and falls back to the on-disk
//!   [`journal`] while the database is away.
//! * [`store`]: manager-api's tables in MySQL/MariaDB, or the same schema in SQLite.
//! * [`query`]: reading it back for the history API (keyset-paged, both backends).

pub mod audio;
pub mod decoder;
pub mod journal;
pub mod opus_packets;
pub mod query;
pub mod record;
pub mod recorder;
pub mod retention;
pub mod store;
pub mod writer;
