-- A counter that moves on every change to api_keys, so each gateway can cache keys and notice a
-- revocation, rotation or new key (by the CLI or another instance) with one tiny read per interval.

CREATE TABLE key_revision (
    id       INTEGER PRIMARY KEY NOT NULL CHECK (id = 1),
    revision INTEGER NOT NULL
);
INSERT INTO key_revision (id, revision) VALUES (1, 0);

CREATE TRIGGER api_keys_inserted AFTER INSERT ON api_keys
BEGIN
    UPDATE key_revision SET revision = revision + 1 WHERE id = 1;
END;
CREATE TRIGGER api_keys_updated AFTER UPDATE ON api_keys
BEGIN
    UPDATE key_revision SET revision = revision + 1 WHERE id = 1;
END;
CREATE TRIGGER api_keys_deleted AFTER DELETE ON api_keys
BEGIN
    UPDATE key_revision SET revision = revision + 1 WHERE id = 1;
END;
