-- xiaozhi-gateway migration 0005 (MySQL 8 / MariaDB 10.11): the push queue
-- (crates/xiaozhi-gateway/src/push/). Additive and safe to re-run.

-- One row per device and push. A request for several devices (a list, a group, the fleet)
-- writes one row per device, all with the request's batch id, in one transaction.
-- A node delivers a row only after claiming it (state queued -> sending, node = its id) with
-- one conditional UPDATE, so a push is sent once however many nodes share the database.
CREATE TABLE IF NOT EXISTS xz_push
(
    id          CHAR(32)     NOT NULL COMMENT 'push id (128 random bits, hex)' PRIMARY KEY,
    batch_id    CHAR(32)     NOT NULL COMMENT 'the request that queued it',
    mac_address VARCHAR(32)  NOT NULL COMMENT 'aa:bb:cc:dd:ee:ff',
    kind        VARCHAR(16)  NOT NULL COMMENT 'notify, wake, custom, alert, reboot',
    fields      MEDIUMTEXT   NOT NULL COMMENT 'the kind''s fields (JSON)',
    state       VARCHAR(16)  NOT NULL COMMENT 'queued, sending, sent, delivered, expired, failed',
    error       VARCHAR(512) NULL COMMENT 'why it failed',
    node        VARCHAR(128) NULL COMMENT 'the node that claimed it',
    source      VARCHAR(16)  NOT NULL COMMENT 'http, mqtt, redis, cli',
    created_ms  BIGINT       NOT NULL COMMENT 'queued at (Unix ms)',
    expires_ms  BIGINT       NOT NULL COMMENT 'not delivered after (Unix ms)',
    updated_ms  BIGINT       NOT NULL COMMENT 'last state change (Unix ms)'
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COMMENT 'xiaozhi-gateway: pushes to devices';

-- A device's waiting pushes, oldest first (delivery on connect), and the per-device bound.
-- CREATE INDEX IF NOT EXISTS is MariaDB syntax; on MySQL 8 the migrator checks
-- information_schema.statistics and issues the plain CREATE INDEX only if absent (as for 0002).
CREATE INDEX IF NOT EXISTS idx_xz_push_mac_state ON xz_push (mac_address, state, created_ms);
-- The expiry sweep and the fleet-wide bound.
CREATE INDEX IF NOT EXISTS idx_xz_push_state_expires ON xz_push (state, expires_ms);
-- A request's pushes.
CREATE INDEX IF NOT EXISTS idx_xz_push_batch ON xz_push (batch_id);
