-- xiaozhi-gateway migration 0006 (MySQL 8 / MariaDB 10.11): clips uploaded for notify pushes
-- (crates/xiaozhi-gateway/src/push/clip.rs), served at GET /push/clips/<id>.ogg. Additive and
-- safe to re-run.

-- Mono Ogg Opus, as the firmware's notify player takes it. In the database rather than on a
-- node's disk, so every node of a cluster serves every clip and a restart keeps them until
-- expires_ms.
CREATE TABLE IF NOT EXISTS xz_push_clip
(
    id          CHAR(32)    NOT NULL COMMENT 'clip id (128 random bits, hex): the unguessable part of its URL' PRIMARY KEY,
    content     MEDIUMBLOB  NOT NULL COMMENT 'mono Ogg Opus',
    duration_ms BIGINT      NOT NULL COMMENT 'length',
    source      VARCHAR(16) NOT NULL COMMENT 'what was uploaded: ogg_opus, wav, mp3',
    created_ms  BIGINT      NOT NULL COMMENT 'uploaded at (Unix ms)',
    expires_ms  BIGINT      NOT NULL COMMENT 'not served after (Unix ms)'
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COMMENT 'xiaozhi-gateway: clips for notify pushes';

-- CREATE INDEX IF NOT EXISTS is MariaDB syntax; on MySQL 8 the migrator checks
-- information_schema.statistics and issues the plain CREATE INDEX only if absent (as for 0002).
CREATE INDEX IF NOT EXISTS idx_xz_push_clip_expires ON xz_push_clip (expires_ms);
