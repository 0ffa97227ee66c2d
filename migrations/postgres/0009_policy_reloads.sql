-- A policy reload asked of every gateway on this database (`catraca policy reload`): pushed to the
-- listening gateways by the change trigger of migration 8 (payload `policy_reloads`), and read by every
-- gateway at each key_refresh_ms as the fallback. A gateway reloads its policy files when the highest id
-- has grown since it last looked. Rows are only added.
CREATE TABLE policy_reloads (
    id           BIGSERIAL PRIMARY KEY,
    requested_at TEXT NOT NULL,
    requested_by TEXT NOT NULL,
    -- The revision of the files the command read, for the operator's record (each gateway reads its own).
    revision     TEXT NOT NULL
);

CREATE TRIGGER policy_reloads_notify AFTER INSERT ON policy_reloads
    FOR EACH STATEMENT EXECUTE FUNCTION notify_change();
