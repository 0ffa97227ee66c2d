-- Executors an operator switched off (`catraca executors disable NAME --reason R`): every gateway reads
-- this small table every `key_refresh_ms` and refuses their actions with 503 EXECUTOR_DISABLED. A row
-- stays when the executor is enabled again, with the last change's time, actor and reason.

CREATE TABLE executor_switches (
    executor   TEXT PRIMARY KEY NOT NULL,
    disabled   BOOLEAN NOT NULL,
    changed_at TEXT NOT NULL,
    changed_by TEXT NOT NULL,
    reason     TEXT NOT NULL
);
