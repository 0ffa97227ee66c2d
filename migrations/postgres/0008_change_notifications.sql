-- Changes every gateway must honour are pushed as well as polled: each statement that changes the keys
-- or the executor switches notifies `catraca_changes` (payload: the table's name) when it commits, and
-- a gateway listening reads the change at once. Polling every key_refresh_ms stays the bound's guarantee
-- (a gateway whose listening connection is down still honours every change within it).

CREATE FUNCTION notify_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('catraca_changes', TG_TABLE_NAME);
    RETURN NULL;
END;
$$;

CREATE TRIGGER api_keys_notify AFTER INSERT OR UPDATE OR DELETE ON api_keys
    FOR EACH STATEMENT EXECUTE FUNCTION notify_change();

CREATE TRIGGER executor_switches_notify AFTER INSERT OR UPDATE OR DELETE ON executor_switches
    FOR EACH STATEMENT EXECUTE FUNCTION notify_change();
