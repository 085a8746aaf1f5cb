-- xiaozhi-gateway migration 0005 (SQLite): the push queue (crates/xiaozhi-gateway/src/push/).
-- Safe to re-run.

-- One row per device and push. A request for several devices (a list, a group, the fleet)
-- writes one row per device, all with the request's batch id, in one transaction.
-- state: queued, sending, sent, delivered, expired, failed. Times are Unix milliseconds.
-- A node delivers a row only after claiming it (state queued -> sending, node = its id) with
-- one conditional UPDATE, so a push is sent once however many nodes share the database.
CREATE TABLE IF NOT EXISTS xz_push
(
    id          TEXT    NOT NULL PRIMARY KEY,
    batch_id    TEXT    NOT NULL,
    mac_address TEXT    NOT NULL,
    kind        TEXT    NOT NULL,
    fields      TEXT    NOT NULL,
    state       TEXT    NOT NULL,
    error       TEXT    NULL,
    node        TEXT    NULL,
    source      TEXT    NOT NULL,
    created_ms  INTEGER NOT NULL,
    expires_ms  INTEGER NOT NULL,
    updated_ms  INTEGER NOT NULL
);

-- A device's waiting pushes, oldest first (delivery on connect), and the per-device bound.
CREATE INDEX IF NOT EXISTS idx_xz_push_mac_state ON xz_push (mac_address, state, created_ms);
-- The expiry sweep and the fleet-wide bound.
CREATE INDEX IF NOT EXISTS idx_xz_push_state_expires ON xz_push (state, expires_ms);
-- A request's pushes.
CREATE INDEX IF NOT EXISTS idx_xz_push_batch ON xz_push (batch_id);
