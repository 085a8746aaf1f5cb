-- xiaozhi-gateway migration 0004 (MySQL 8 / MariaDB 10.11): an index for the device list
-- (GET /api/history/devices). Additive and safe to re-run.

-- The device list orders every device by its newest message. Without this index that is a
-- GROUP BY over the whole table with a row lookup per row for agent_id (MariaDB 10.11,
-- 1,000,000 rows, 1000 devices: 3.5-5 s per page). Led by (mac_address, created_at), it gives
-- each device's newest message with one index dive per device (a loose index scan, "Using
-- index for group-by"), and holds agent_id, so the listed devices' agents are read from it
-- too: 0.03 s per page. Built in about 1.6 s per million rows. Its cost on writes: the
-- writer's throughput (bench-history, 200,000 records into that table) did not change
-- measurably (34,600-38,800 records/s without it, 37,000-39,200 with it); one bulk
-- INSERT ... SELECT of 200,000 rows took 4.3-4.5 s without it and 5.7-6.0 s with it.
-- CREATE INDEX IF NOT EXISTS is MariaDB syntax; on MySQL 8 the migrator checks
-- information_schema.statistics and issues the plain CREATE INDEX only if absent (as for 0002).
CREATE INDEX IF NOT EXISTS idx_xz_mac_created_agent ON ai_agent_chat_history (mac_address, created_at, agent_id);
