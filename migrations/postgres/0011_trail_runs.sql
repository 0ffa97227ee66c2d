-- The trail in runs, as SQLite keeps it (its migrations 7 and 9). A run is a stretch of consecutive
-- events of one chain written by one group commit, kept as one row: their hashes side by side (32 bytes
-- each), their canonical bodies one per line (RFC 8785 JSON holds no raw line break). A commit of thirty
-- events inserts one row and one entry per trace instead of thirty rows and a hundred and twenty index
-- entries; a run's bodies, one long text, are compressed by PostgreSQL itself (TOAST), where one event's
-- body never was (too short). Every event stays addressable by (chain, seq), by trace and by time, and
-- verifiable on its own: its bytes are stored exactly as they were hashed.
--
-- Each chain is named once (audit_chains) and referred to by number. A run's position is
-- chain_no * 2^40 + the seq of its first event, so a chain's runs sort together and the run holding an
-- event is the last one at or before its position. `at_min` is its earliest event's time (microseconds
-- since 1970-01-01T00:00:00Z); the writer keeps a run's events within 50 ms of it, so a reader by time
-- knows how far back to look. `audit_events` lives on as a read-only view with one row per event and the
-- old columns, for anyone who queries the database directly.

CREATE TABLE audit_chains (
    chain_no    BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    chain_id    TEXT COLLATE "C" NOT NULL UNIQUE,
    instance_id TEXT NOT NULL,
    opened_at   TEXT COLLATE "C" NOT NULL
);
-- An instance's latest chain, looked up at start-up.
CREATE INDEX audit_chains_by_instance ON audit_chains (instance_id, opened_at);

CREATE TABLE audit_runs (
    pos    BIGINT PRIMARY KEY,     -- chain_no * 2^40 + seq of the first event
    n      BIGINT NOT NULL,        -- events in the run: seq .. seq + n - 1
    at_min BIGINT NOT NULL,        -- earliest occurred_at among them, microseconds since the epoch
    hashes BYTEA NOT NULL,         -- SHA-256(prev_hash ‖ body) of each, 32 bytes each, in seq order
    bodies TEXT NOT NULL           -- each one's RFC 8785 canonical JSON (the hashed bytes) and a line break
);
CREATE INDEX audit_runs_by_time ON audit_runs (at_min);
-- A run's bodies (tens of kilobytes of JSON repeating its keys, chain, instance and hashes) compress
-- several times: with LZ4 where the server has it (ten times the speed of the default, for the same
-- size here, and the compression is part of every commit), and kept in the row where they fit, which
-- spares each commit rows and index entries in a side table.
ALTER TABLE audit_runs ALTER COLUMN bodies SET STORAGE MAIN;
DO $$
BEGIN
    ALTER TABLE audit_runs ALTER COLUMN bodies SET COMPRESSION lz4;
EXCEPTION WHEN others THEN
    RAISE NOTICE 'this server has no LZ4: run bodies use its default compression';
END;
$$;

-- Which runs hold events of a trace.
CREATE TABLE audit_run_traces (
    trace_id TEXT COLLATE "C" NOT NULL,
    pos      BIGINT NOT NULL,
    PRIMARY KEY (trace_id, pos)
);

-- Existing trails carried over byte for byte, each event a run of one. A time or a hash that cannot be
-- read (damage, which verification reports) becomes 0 or the bytes of its text.
CREATE FUNCTION pg_temp.trail_micros(t TEXT) RETURNS BIGINT LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF t !~ '^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?Z$' THEN
        RETURN 0;
    END IF;
    RETURN (extract(epoch FROM t::timestamptz) * 1000000)::BIGINT;
EXCEPTION WHEN others THEN
    RETURN 0;
END;
$$;

INSERT INTO audit_chains (chain_id, instance_id, opened_at)
SELECT chain_id, (array_agg(instance_id ORDER BY seq))[1], min(occurred_at)
FROM audit_events GROUP BY chain_id ORDER BY min(occurred_at), chain_id;

INSERT INTO audit_runs (pos, n, at_min, hashes, bodies)
SELECT c.chain_no * 1099511627776 + e.seq, 1, pg_temp.trail_micros(e.occurred_at),
       CASE WHEN e.hash ~ '^[0-9a-f]{64}$' THEN decode(e.hash, 'hex') ELSE convert_to(e.hash, 'UTF8') END,
       e.body || E'\n'
FROM audit_events e JOIN audit_chains c ON c.chain_id = e.chain_id;

INSERT INTO audit_run_traces (trace_id, pos)
SELECT e.trace_id, c.chain_no * 1099511627776 + e.seq
FROM audit_events e JOIN audit_chains c ON c.chain_id = e.chain_id
WHERE e.trace_id IS NOT NULL;

DROP TABLE audit_events;
DROP FUNCTION audit_events_append_only();

CREATE FUNCTION audit_trail_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only: % rejected', TG_TABLE_NAME, TG_OP;
END;
$$;
-- Whole statements are refused, whether or not they would touch a row.
CREATE TRIGGER audit_chains_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON audit_chains
    FOR EACH STATEMENT EXECUTE FUNCTION audit_trail_append_only();
CREATE TRIGGER audit_runs_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON audit_runs
    FOR EACH STATEMENT EXECUTE FUNCTION audit_trail_append_only();
CREATE TRIGGER audit_run_traces_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON audit_run_traces
    FOR EACH STATEMENT EXECUTE FUNCTION audit_trail_append_only();

-- One row per event, as the trail was stored before: each run's bodies split at their line breaks.
CREATE VIEW audit_events AS
SELECT c.chain_id,
       (r.pos & 1099511627775) + e.i - 1                            AS seq,
       j.body ->> 'event_id'                                        AS event_id,
       j.body ->> 'event_type'                                      AS event_type,
       j.body ->> 'trace_id'                                        AS trace_id,
       j.body ->> 'occurred_at'                                     AS occurred_at,
       j.body ->> 'instance_id'                                     AS instance_id,
       j.body ->> 'prev_hash'                                       AS prev_hash,
       encode(substring(r.hashes FROM 32 * (e.i::INT - 1) + 1 FOR 32), 'hex') AS hash,
       e.body
FROM audit_runs r
JOIN audit_chains c ON c.chain_no = r.pos >> 40
CROSS JOIN LATERAL unnest(string_to_array(left(r.bodies, -1), E'\n')) WITH ORDINALITY AS e (body, i)
CROSS JOIN LATERAL (SELECT e.body::jsonb AS body) j;
