//! Prometheus text exposition of [`super::Metrics`] (placeholder; being written).

use super::Metrics;

/// The `GET /metrics` body.
pub fn render(_metrics: &Metrics) -> String {
    String::new()
}
