-- xiaozhi-gateway migration 0006 (SQLite): clips uploaded for notify pushes
-- (crates/xiaozhi-gateway/src/push/clip.rs), served at GET /push/clips/<id>.ogg. Safe to re-run.

-- Mono Ogg Opus, as the firmware's notify player takes it. In the database rather than on a
-- node's disk, so every node of a cluster serves every clip and a restart keeps them until
-- expires_ms. Times are Unix milliseconds.
CREATE TABLE IF NOT EXISTS xz_push_clip
(
    id          TEXT    NOT NULL PRIMARY KEY,
    content     BLOB    NOT NULL,
    duration_ms INTEGER NOT NULL,
    source      TEXT    NOT NULL,
    created_ms  INTEGER NOT NULL,
    expires_ms  INTEGER NOT NULL
);

CREATE INDEX IF NOT EXISTS idx_xz_push_clip_expires ON xz_push_clip (expires_ms);
