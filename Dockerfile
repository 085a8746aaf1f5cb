# syntax=docker/dockerfile:1
# Multi-stage build of xiaozhi-gateway: a Rust builder, then a small Debian runtime.
#   docker build -t xiaozhi-gateway .
# docker-compose.yml builds and runs it with MySQL, Redis, Prometheus and Grafana.

FROM rust:1.95-bookworm AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends libopus-dev pkg-config \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Dependencies first, so source edits do not rebuild them.
COPY Cargo.toml Cargo.lock ./
COPY crates/xiaozhi-proto/Cargo.toml crates/xiaozhi-proto/
COPY crates/xiaozhi-gateway/Cargo.toml crates/xiaozhi-gateway/
COPY crates/xiaozhi-tools/Cargo.toml crates/xiaozhi-tools/
RUN mkdir -p src crates/xiaozhi-proto/src crates/xiaozhi-gateway/src crates/xiaozhi-tools/src \
    && echo 'fn main() {}' > src/main.rs \
    && touch crates/xiaozhi-proto/src/lib.rs crates/xiaozhi-gateway/src/lib.rs crates/xiaozhi-tools/src/lib.rs \
    && cargo build --release --locked || true
COPY . .
RUN touch src/main.rs crates/xiaozhi-proto/src/lib.rs crates/xiaozhi-gateway/src/lib.rs crates/xiaozhi-tools/src/lib.rs \
    && cargo build --release --locked --bin xiaozhi-gateway

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends libopus0 ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --home /var/lib/xiaozhi --create-home xiaozhi
COPY --from=build /src/target/release/xiaozhi-gateway /usr/local/bin/xiaozhi-gateway
USER xiaozhi
WORKDIR /var/lib/xiaozhi
# Device MQTT, device MQTT over TLS, UDP audio, HTTP, broker listener.
EXPOSE 1883/tcp 8883/tcp 8884/udp 8007/tcp 1884/tcp
ENV XZ_LOG__FORMAT=json \
    XZ_HISTORY__JOURNAL_DIR=/var/lib/xiaozhi \
    XZ_HISTORY__DATABASE_URL=sqlite:///var/lib/xiaozhi/history.db
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD curl -fsS http://127.0.0.1:8007/healthz > /dev/null || exit 1
ENTRYPOINT ["xiaozhi-gateway"]
CMD ["serve"]
