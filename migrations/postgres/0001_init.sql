-- Catraca schema, PostgreSQL. Same shape as the SQLite schema so both stores keep identical bytes.

CREATE TABLE api_keys (
    key_id       TEXT PRIMARY KEY NOT NULL,
    name         TEXT NOT NULL,
    role         TEXT NOT NULL,
    contexts     TEXT,
    tier         TEXT NOT NULL,
    secret_hash  TEXT NOT NULL,
    created_at   TEXT NOT NULL,
    expires_at   TEXT,
    revoked_at   TEXT,
    rotated_from TEXT REFERENCES api_keys (key_id)
);

CREATE TABLE audit_events (
    chain_id    TEXT COLLATE "C" NOT NULL,
    seq         BIGINT NOT NULL,
    event_id    TEXT NOT NULL UNIQUE,
    event_type  TEXT NOT NULL,
    trace_id    TEXT,
    occurred_at TEXT COLLATE "C" NOT NULL,
    instance_id TEXT NOT NULL,
    prev_hash   TEXT NOT NULL,
    hash        TEXT NOT NULL,
    body        TEXT NOT NULL,
    PRIMARY KEY (chain_id, seq)
);
CREATE INDEX audit_events_by_trace ON audit_events (trace_id);
CREATE INDEX audit_events_by_time ON audit_events (occurred_at);
-- Partial: only CHAIN_OPENED rows pay for it (the lookup of an instance's previous chain at start-up).
CREATE INDEX audit_events_chain_opened ON audit_events (instance_id, occurred_at)
    WHERE event_type = 'CHAIN_OPENED';

CREATE FUNCTION audit_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_events is append-only: % rejected', TG_OP;
END;
$$;
CREATE TRIGGER audit_events_no_update BEFORE UPDATE OR DELETE ON audit_events
    FOR EACH ROW EXECUTE FUNCTION audit_events_append_only();
CREATE TRIGGER audit_events_no_truncate BEFORE TRUNCATE ON audit_events
    FOR EACH STATEMENT EXECUTE FUNCTION audit_events_append_only();
