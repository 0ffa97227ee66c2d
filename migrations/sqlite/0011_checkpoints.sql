-- Signed checkpoints of the audit chains: each row is a C2SP signed note committing to the first `size`
-- events of `chain_id` (their RFC 6962 Merkle root), signed with the gateway's audit key, which the
-- database never holds. The note is the record; the other columns only find it. A chain's last
-- checkpoint (its writer stopped) carries the extension line `closed`, so it may share its size with
-- the checkpoint before it. The same notes are appended to checkpoints.ndjson in the audit folder and
-- may be sent to a witness: copies kept away from this database are what a verification holds it to.
CREATE TABLE audit_checkpoints (
    id        INTEGER PRIMARY KEY,
    chain_id  TEXT NOT NULL,
    size      INTEGER NOT NULL,
    signed_at TEXT NOT NULL,
    note      TEXT NOT NULL
);
CREATE INDEX audit_checkpoints_by_chain ON audit_checkpoints (chain_id, size);

CREATE TRIGGER audit_checkpoints_no_update BEFORE UPDATE ON audit_checkpoints
BEGIN
    SELECT RAISE(ABORT, 'audit_checkpoints is append-only: UPDATE rejected');
END;
CREATE TRIGGER audit_checkpoints_no_delete BEFORE DELETE ON audit_checkpoints
BEGIN
    SELECT RAISE(ABORT, 'audit_checkpoints is append-only: DELETE rejected');
END;
