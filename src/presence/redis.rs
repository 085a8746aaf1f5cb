//! Redis presence (placeholder until the backend lands).
