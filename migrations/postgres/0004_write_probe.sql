-- One row `/ready` rewrites (at most once a second per gateway) to prove that a committed write reaches
-- the disk now: a full disk or a read-only file system fails it, where a rolled-back insert did not.

CREATE TABLE write_probe (
    id        INTEGER PRIMARY KEY CHECK (id = 1),
    probed_at TEXT NOT NULL
);
