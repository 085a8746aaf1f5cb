//! Presence tracker (placeholder).
