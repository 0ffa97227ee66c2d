-- A counter that moves on every change to api_keys, so each gateway can cache keys and notice a
-- revocation, rotation or new key (by the CLI or another instance) with one tiny read per interval.

CREATE TABLE key_revision (
    id       INTEGER PRIMARY KEY CHECK (id = 1),
    revision BIGINT NOT NULL
);
INSERT INTO key_revision (id, revision) VALUES (1, 0);

CREATE FUNCTION api_keys_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE key_revision SET revision = revision + 1 WHERE id = 1;
    RETURN NULL;
END;
$$;

CREATE TRIGGER api_keys_changed AFTER INSERT OR UPDATE OR DELETE ON api_keys
    FOR EACH STATEMENT EXECUTE FUNCTION api_keys_changed();
