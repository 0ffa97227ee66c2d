-- Catraca schema, SQLite. Timestamps are UTC RFC 3339 text with six fractional digits (text order = time order).

CREATE TABLE api_keys (
    key_id       TEXT PRIMARY KEY NOT NULL,
    name         TEXT NOT NULL,
    role         TEXT NOT NULL,
    contexts     TEXT,              -- JSON array of context ids; NULL = every context
    tier         TEXT NOT NULL,
    secret_hash  TEXT NOT NULL,     -- argon2id PHC string; the secret itself is never stored
    created_at   TEXT NOT NULL,
    expires_at   TEXT,
    revoked_at   TEXT,
    rotated_from TEXT REFERENCES api_keys (key_id)
);

-- The audit trail: append-only, one hash chain per writer (chain_id), `body` = the exact hashed bytes.
CREATE TABLE audit_events (
    chain_id    TEXT NOT NULL,
    seq         INTEGER NOT NULL,
    event_id    TEXT NOT NULL UNIQUE,
    event_type  TEXT NOT NULL,
    trace_id    TEXT,
    occurred_at TEXT NOT NULL,
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

CREATE TRIGGER audit_events_no_update BEFORE UPDATE ON audit_events
BEGIN
    SELECT RAISE(ABORT, 'audit_events is append-only: UPDATE rejected');
END;
CREATE TRIGGER audit_events_no_delete BEFORE DELETE ON audit_events
BEGIN
    SELECT RAISE(ABORT, 'audit_events is append-only: DELETE rejected');
END;
