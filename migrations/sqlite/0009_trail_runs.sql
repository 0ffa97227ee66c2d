-- The trail in runs. A run is a stretch of consecutive events of one chain written by one group commit,
-- kept as one row: their hashes side by side, their canonical bodies one per line (RFC 8785 JSON holds no
-- raw line break). One row per commit instead of one per event is most of what a group commit costs:
-- a commit of thirty events inserts one row and one entry per trace instead of thirty rows and ninety
-- index entries, and no body is parsed to fill a column. Every event stays addressable by (chain, seq),
-- by trace and by time, and verifiable on its own: its bytes are stored exactly as they were hashed.
--
-- A run's position is chain_no * 2^40 + the seq of its first event, so a chain's runs sort together and
-- the run holding an event is the last one at or before its position. `at_min` is its earliest event's
-- time (microseconds since 1970-01-01T00:00:00Z); the writer keeps a run's events within 50 ms of it, so
-- a reader by time knows how far back to look. `audit_events` lives on as a read-only view with one row
-- per event, for anyone who queries the database directly.

CREATE TABLE audit_runs (
    pos    INTEGER PRIMARY KEY,    -- chain_no * 2^40 + seq of the first event
    n      INTEGER NOT NULL,       -- events in the run: seq .. seq + n - 1
    at_min INTEGER NOT NULL,       -- earliest occurred_at among them, microseconds since the epoch
    hashes BLOB NOT NULL,          -- SHA-256(prev_hash ‖ body) of each, 32 bytes each, in seq order
    bodies TEXT NOT NULL           -- each one's RFC 8785 canonical JSON (the hashed bytes) and a line break
);
CREATE INDEX audit_runs_by_time ON audit_runs (at_min);

-- Which runs hold events of a trace.
CREATE TABLE audit_run_traces (
    trace_id TEXT NOT NULL,
    pos      INTEGER NOT NULL,
    PRIMARY KEY (trace_id, pos)
) WITHOUT ROWID;

-- Existing trails carried over byte for byte, each event a run of one. A time that cannot be read
-- (damage, which verification reports) sorts at 0.
INSERT INTO audit_runs (pos, n, at_min, hashes, bodies)
SELECT chain_no * 1099511627776 + seq, 1,
       coalesce(unixepoch(occurred_at) * 1000000 + CAST(substr(occurred_at, 21, 6) AS INTEGER), 0),
       hash, body || char(10)
FROM audit_trail ORDER BY id;

INSERT OR IGNORE INTO audit_run_traces (trace_id, pos)
SELECT trace_id, chain_no * 1099511627776 + seq FROM audit_trail WHERE trace_id IS NOT NULL;

DROP VIEW audit_events;
DROP TABLE audit_trail;

CREATE TRIGGER audit_runs_no_update BEFORE UPDATE ON audit_runs
BEGIN
    SELECT RAISE(ABORT, 'audit_runs is append-only: UPDATE rejected');
END;
CREATE TRIGGER audit_runs_no_delete BEFORE DELETE ON audit_runs
BEGIN
    SELECT RAISE(ABORT, 'audit_runs is append-only: DELETE rejected');
END;
CREATE TRIGGER audit_run_traces_no_update BEFORE UPDATE ON audit_run_traces
BEGIN
    SELECT RAISE(ABORT, 'audit_run_traces is append-only: UPDATE rejected');
END;
CREATE TRIGGER audit_run_traces_no_delete BEFORE DELETE ON audit_run_traces
BEGIN
    SELECT RAISE(ABORT, 'audit_run_traces is append-only: DELETE rejected');
END;

-- One row per event, as the trail was stored before: each run's bodies split at their line breaks.
CREATE VIEW audit_events AS
WITH RECURSIVE events (pos, i, body, rest, hashes) AS (
    SELECT pos, 0, substr(bodies, 1, instr(bodies, char(10)) - 1),
           substr(bodies, instr(bodies, char(10)) + 1), hashes
    FROM audit_runs
    UNION ALL
    SELECT pos, i + 1, substr(rest, 1, instr(rest, char(10)) - 1),
           substr(rest, instr(rest, char(10)) + 1), hashes
    FROM events WHERE instr(rest, char(10)) > 0
)
SELECT c.chain_id,
       e.pos % 1099511627776 + e.i             AS seq,
       e.body ->> '$.event_id'                  AS event_id,
       e.body ->> '$.event_type'                AS event_type,
       e.body ->> '$.trace_id'                  AS trace_id,
       e.body ->> '$.occurred_at'               AS occurred_at,
       e.body ->> '$.instance_id'               AS instance_id,
       e.body ->> '$.prev_hash'                 AS prev_hash,
       lower(hex(substr(e.hashes, 32 * e.i + 1, 32))) AS hash,
       e.body
FROM events e JOIN audit_chains c ON c.chain_no = e.pos / 1099511627776;
