-- The trail, compact. An event's row held ten columns of which nine repeated its body (the hashed
-- canonical JSON, which names the chain, seq, event id and type, trace, time, instance and previous hash),
-- a 40-character chain id in the row and again in the primary key's index, the hash as 64 hex characters,
-- and an index on event_id that nothing queried: about 1.35 KB per event.
--
-- Now: each chain is named once (audit_chains) and referred to by number; a row keeps the hashed bytes and
-- the 32-byte hash; the trace and the time, which the trail is searched by, are read from the body
-- (virtual columns, stored only in their indexes). Every event stays addressable by (chain, seq), by
-- trace and by time, and `audit_events` lives on as a read-only view with the old columns for anyone who
-- queries the database directly.

CREATE TABLE audit_chains (
    chain_no    INTEGER PRIMARY KEY,
    chain_id    TEXT NOT NULL UNIQUE,
    instance_id TEXT NOT NULL,
    opened_at   TEXT NOT NULL
);
-- An instance's latest chain, looked up at start-up.
CREATE INDEX audit_chains_by_instance ON audit_chains (instance_id, opened_at);

CREATE TABLE audit_trail (
    id          INTEGER PRIMARY KEY,  -- write order
    chain_no    INTEGER NOT NULL REFERENCES audit_chains (chain_no),
    seq         INTEGER NOT NULL,
    hash        BLOB NOT NULL,        -- SHA-256(prev_hash ‖ body), 32 bytes
    body        TEXT NOT NULL,        -- RFC 8785 canonical JSON: the exact hashed bytes
    trace_id    TEXT GENERATED ALWAYS AS (body ->> '$.trace_id') VIRTUAL,
    occurred_at TEXT GENERATED ALWAYS AS (body ->> '$.occurred_at') VIRTUAL
);
CREATE UNIQUE INDEX audit_trail_position ON audit_trail (chain_no, seq);
CREATE INDEX audit_trail_by_trace ON audit_trail (trace_id) WHERE trace_id IS NOT NULL;
CREATE INDEX audit_trail_by_time ON audit_trail (occurred_at);

-- Existing trails carried over byte for byte (a hash that is not hex is kept as its text's bytes, so
-- verification still reports the damage instead of the migration failing).
INSERT INTO audit_chains (chain_id, instance_id, opened_at)
SELECT chain_id, MIN(instance_id), MIN(occurred_at)
FROM audit_events GROUP BY chain_id ORDER BY MIN(occurred_at), chain_id;

INSERT INTO audit_trail (chain_no, seq, hash, body)
SELECT c.chain_no, e.seq, coalesce(unhex(e.hash), CAST(e.hash AS BLOB)), e.body
FROM audit_events e JOIN audit_chains c ON c.chain_id = e.chain_id
ORDER BY e.occurred_at, c.chain_no, e.seq;

DROP TABLE audit_events;

CREATE TRIGGER audit_trail_no_update BEFORE UPDATE ON audit_trail
BEGIN
    SELECT RAISE(ABORT, 'audit_trail is append-only: UPDATE rejected');
END;
CREATE TRIGGER audit_trail_no_delete BEFORE DELETE ON audit_trail
BEGIN
    SELECT RAISE(ABORT, 'audit_trail is append-only: DELETE rejected');
END;
CREATE TRIGGER audit_chains_no_update BEFORE UPDATE ON audit_chains
BEGIN
    SELECT RAISE(ABORT, 'audit_chains is append-only: UPDATE rejected');
END;
CREATE TRIGGER audit_chains_no_delete BEFORE DELETE ON audit_chains
BEGIN
    SELECT RAISE(ABORT, 'audit_chains is append-only: DELETE rejected');
END;

CREATE VIEW audit_events AS
SELECT c.chain_id,
       t.seq,
       t.body ->> '$.event_id'    AS event_id,
       t.body ->> '$.event_type'  AS event_type,
       t.trace_id,
       t.occurred_at,
       t.body ->> '$.instance_id' AS instance_id,
       t.body ->> '$.prev_hash'   AS prev_hash,
       lower(hex(t.hash))         AS hash,
       t.body
FROM audit_trail t JOIN audit_chains c ON c.chain_no = t.chain_no;
