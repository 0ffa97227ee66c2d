-- Runs keep their bodies compressed: zlib (RFC 1950) at its fastest level, and `size`, the length of the
-- bodies it inflates to. Bodies of one run repeat their keys, chain, instance, trace and each other's
-- hashes, so they shrink about six times, and a group commit writes and syncs fewer pages of log. The
-- hashes are unchanged: each event is still verified against the exact bytes that were hashed, once
-- inflated. Runs written before this migration keep their text and have no size; readers take both.
ALTER TABLE audit_runs ADD COLUMN size INTEGER;

-- The view of one row per event inflates compressed runs with `sqlar_uncompress(data, size)`, the
-- function the sqlite3 shell provides (the same zlib form and length it reads). Elsewhere, read the
-- events with `catraca audit export` or `trace`, or inflate `bodies` with any zlib library.
DROP VIEW audit_events;
CREATE VIEW audit_events AS
WITH RECURSIVE runs (pos, bodies, hashes) AS (
    SELECT pos,
           CASE WHEN size IS NULL THEN bodies ELSE CAST(sqlar_uncompress(bodies, size) AS TEXT) END,
           hashes
    FROM audit_runs
), events (pos, i, body, rest, hashes) AS (
    SELECT pos, 0, substr(bodies, 1, instr(bodies, char(10)) - 1),
           substr(bodies, instr(bodies, char(10)) + 1), hashes
    FROM runs
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
