-- What `catraca audit verify` found each time it checked the store, so the console can show the last
-- summary. Written by the verifier, never by the gateway; kept apart from the trail (it is a report about
-- the trail, not part of it).
CREATE TABLE audit_verifications (
    id          BIGSERIAL PRIMARY KEY,
    verified_at TEXT NOT NULL,
    ok          BOOLEAN NOT NULL,
    chains      BIGINT NOT NULL,
    events      BIGINT NOT NULL,
    duration_ms BIGINT NOT NULL,
    -- The first problem found (`problem at chain C seq N: message`); NULL when intact.
    finding     TEXT,
    -- Who ran it (`cli`).
    source      TEXT NOT NULL
);
