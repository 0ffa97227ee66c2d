-- The trail's search columns, written by the writer instead of read from the body. `trace_id` and
-- `occurred_at` were virtual columns (`body ->> ...`): every insert parsed the body's JSON twice, once
-- per index, about a quarter of SQLite's work per event. Now the writer stores them as it inserts:
-- `trace_id` as text (what `audit trace` looks up), and the time as `at_us`, microseconds since the Unix
-- epoch (an 8-byte integer in its index instead of a 27-character text). The body stays the exact hashed
-- bytes; the columns are copies of what it says, and `catraca audit verify` checks that they agree.

CREATE TABLE audit_trail_new (
    id       INTEGER PRIMARY KEY,  -- write order
    chain_no INTEGER NOT NULL REFERENCES audit_chains (chain_no),
    seq      INTEGER NOT NULL,
    at_us    INTEGER NOT NULL,     -- occurred_at, microseconds since 1970-01-01T00:00:00Z
    trace_id TEXT,                 -- the body's trace_id
    hash     BLOB NOT NULL,        -- SHA-256(prev_hash ‖ body), 32 bytes
    body     TEXT NOT NULL         -- RFC 8785 canonical JSON: the exact hashed bytes
);

-- Existing trails carried over byte for byte. The time is `YYYY-MM-DDTHH:MM:SS.ffffffZ`; a body whose
-- time cannot be read (damage, which verification reports) sorts at 0.
INSERT INTO audit_trail_new (id, chain_no, seq, at_us, trace_id, hash, body)
SELECT id, chain_no, seq,
       coalesce(unixepoch(body ->> '$.occurred_at') * 1000000
                + CAST(substr(body ->> '$.occurred_at', 21, 6) AS INTEGER), 0),
       body ->> '$.trace_id', hash, body
FROM audit_trail ORDER BY id;

DROP VIEW audit_events;
DROP TABLE audit_trail;
ALTER TABLE audit_trail_new RENAME TO audit_trail;

CREATE UNIQUE INDEX audit_trail_position ON audit_trail (chain_no, seq);
CREATE INDEX audit_trail_by_trace ON audit_trail (trace_id) WHERE trace_id IS NOT NULL;
CREATE INDEX audit_trail_by_time ON audit_trail (at_us);

CREATE TRIGGER audit_trail_no_update BEFORE UPDATE ON audit_trail
BEGIN
    SELECT RAISE(ABORT, 'audit_trail is append-only: UPDATE rejected');
END;
CREATE TRIGGER audit_trail_no_delete BEFORE DELETE ON audit_trail
BEGIN
    SELECT RAISE(ABORT, 'audit_trail is append-only: DELETE rejected');
END;

CREATE VIEW audit_events AS
SELECT c.chain_id,
       t.seq,
       t.body ->> '$.event_id'    AS event_id,
       t.body ->> '$.event_type'  AS event_type,
       t.trace_id,
       t.body ->> '$.occurred_at' AS occurred_at,
       t.body ->> '$.instance_id' AS instance_id,
       t.body ->> '$.prev_hash'   AS prev_hash,
       lower(hex(t.hash))         AS hash,
       t.body
FROM audit_trail t JOIN audit_chains c ON c.chain_no = t.chain_no;
