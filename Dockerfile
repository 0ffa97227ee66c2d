# syntax=docker/dockerfile:1
# Catraca gateway: multi-stage build (Rust toolchain only in the builder), small non-root runtime.
#
#   docker build -t catraca:local .        (or: docker-compose build)

# ---- builder ---------------------------------------------------------------------------------------
FROM rust:1-bookworm AS builder
WORKDIR /src
# The whole context (see .dockerignore: no target/, data/, .git). sqlx embeds migrations/ at compile
# time and SQLite is bundled (built with the image's gcc), so no other system library is needed.
COPY . .
RUN cargo build --release --locked --bin catraca \
 && install -D -m 0755 target/release/catraca /out/catraca

# ---- runtime ---------------------------------------------------------------------------------------
FROM debian:bookworm-slim AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system catraca \
 && useradd --system --gid catraca --home-dir /app --no-create-home --shell /usr/sbin/nologin catraca

WORKDIR /app
COPY --from=builder /out/catraca /usr/local/bin/catraca
# Policies and executors are configuration read at start: owned by root, read-only for the service.
COPY policies/ /app/policies/
COPY executors/ /app/executors/
# Only data/ (SQLite database when no PostgreSQL is configured, audit JSON Lines) is writable.
RUN mkdir -p /app/data/audit && chown -R catraca:catraca /app/data

ENV CATRACA_LISTEN=0.0.0.0:8000 \
    CATRACA_MODE=prod \
    CATRACA_POLICIES_DIR=/app/policies \
    CATRACA_EXECUTORS_DIR=/app/executors \
    CATRACA_AUDIT_DIR=/app/data/audit
# CATRACA_DATABASE_URL keeps its default sqlite://data/catraca.db (= /app/data/catraca.db); compose sets
# postgres://... instead.

USER catraca
EXPOSE 8000
VOLUME ["/app/data"]
# No curl in the image: bash's /dev/tcp asks GET /ready.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/8000 && printf 'GET /ready HTTP/1.0\\r\\nHost: localhost\\r\\n\\r\\n' >&3 && head -n1 <&3 | grep -q ' 200 '"]
CMD ["catraca", "serve"]
