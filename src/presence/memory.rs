//! In-memory presence (placeholder until the backend lands).
