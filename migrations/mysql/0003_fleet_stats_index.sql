-- xiaozhi-gateway migration 0003 (MySQL 8 / MariaDB 10.11): an index for the fleet statistics
-- (GET /api/history/stats). Additive and safe to re-run.

-- Every other index on ai_agent_chat_history leads with the device, agent, session or audio id,
-- so a time range over all devices would read the whole table. This one leads with created_at
-- and holds every column the fleet statistics read (device, session, type, audio id), so they
-- read the range from the index alone. MariaDB 10.11, 1,000,000 rows, the last 30 days asked
-- for: over a year of history, 1.0 s per statement without it and 0.1 s with it; with all
-- rows in the 30 days, 1.5 s and 0.8 s.
-- CREATE INDEX IF NOT EXISTS is MariaDB syntax; on MySQL 8 the migrator checks
-- information_schema.statistics and issues the plain CREATE INDEX only if absent (as for 0002).
CREATE INDEX IF NOT EXISTS idx_xz_created_mac_session ON ai_agent_chat_history (created_at, mac_address, session_id, chat_type, audio_id);
