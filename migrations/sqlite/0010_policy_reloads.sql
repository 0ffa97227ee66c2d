-- A policy reload asked of every gateway on this database (`catraca policy reload`): each gateway reads
-- the highest id when it is nudged and at every key_refresh_ms, and reloads its policy files when the
-- id has grown since it last looked. Rows are only added.
CREATE TABLE policy_reloads (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    requested_at TEXT NOT NULL,
    requested_by TEXT NOT NULL,
    -- The revision of the files the command read, for the operator's record (each gateway reads its own).
    revision     TEXT NOT NULL
);
