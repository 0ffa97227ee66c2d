-- Collector state: one run per (source, query) at a time across instances, runs, snapshots, records.

CREATE TABLE collector_locks (
    source      TEXT COLLATE "C" NOT NULL,
    query_key   TEXT NOT NULL,
    run_id      TEXT NOT NULL,
    acquired_at TEXT NOT NULL,
    expires_at  TEXT NOT NULL,      -- a crashed holder's lock lapses after the executor's timeout
    PRIMARY KEY (source, query_key)
);

CREATE TABLE collector_runs (
    run_id      TEXT PRIMARY KEY NOT NULL,
    source      TEXT COLLATE "C" NOT NULL,
    query_key   TEXT NOT NULL,
    started_at  TEXT NOT NULL,
    finished_at TEXT COLLATE "C" NOT NULL,
    complete    BIGINT NOT NULL,   -- 1 only when every page was read; only complete runs are baselines
    pages       BIGINT NOT NULL,
    items       BIGINT NOT NULL,
    errors      TEXT NOT NULL       -- JSON array
);
CREATE INDEX collector_runs_baseline ON collector_runs (source, query_key, complete, finished_at);

-- What one run saw: per record, the hash of its canonical JSON and of each top-level field.
CREATE TABLE collector_snapshots (
    run_id       TEXT NOT NULL REFERENCES collector_runs (run_id),
    record_id    TEXT NOT NULL,
    content_hash TEXT NOT NULL,
    field_hashes TEXT NOT NULL,     -- JSON object: field name -> SHA-256 of its canonical JSON
    PRIMARY KEY (run_id, record_id)
);

-- Every record ever seen in a complete run of a source, with first and last sighting.
CREATE TABLE collector_records (
    source       TEXT NOT NULL,
    record_id    TEXT NOT NULL,
    content_hash TEXT NOT NULL,
    first_seen   TEXT NOT NULL,
    last_seen    TEXT NOT NULL,
    PRIMARY KEY (source, record_id)
);
