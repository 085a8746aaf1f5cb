-- xiaozhi-gateway migration 0002 (MySQL 8 / MariaDB 10.11): objects owned by the gateway only.
-- Everything here is additive and safe to re-run.

-- Journal replay ledger: a journal record id is inserted in the same transaction as the
-- chat rows it produced, so replaying the journal after a crash never duplicates rows.
CREATE TABLE IF NOT EXISTS xz_chat_applied
(
    record_id   CHAR(32) NOT NULL COMMENT 'gateway journal record id' PRIMARY KEY,
    history_id  BIGINT NULL COMMENT 'ai_agent_chat_history.id written for this record (NULL if none)',
    applied_at  DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3) COMMENT 'when the record was applied'
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COMMENT 'xiaozhi-gateway: applied journal records';

-- Lookup index for per-device sessions (manager-api only indexes agent_id, session_id, created_at).
-- CREATE INDEX IF NOT EXISTS is MariaDB syntax (10.1.4+); MySQL 8 rejects it. On MySQL the Rust
-- migrator does not send this statement as written: it checks information_schema.statistics
-- (table_schema = DATABASE(), table_name = 'ai_agent_chat_history',
-- index_name = 'idx_xz_mac_session_created') and issues the plain CREATE INDEX only if absent.
CREATE INDEX IF NOT EXISTS idx_xz_mac_session_created ON ai_agent_chat_history (mac_address, session_id, created_at);

-- One row per (mac_address, session_id).
-- chat_type: 1 = user (ASR), 2 = assistant (TTS), 3 = tool call / tool result (xiaozhi-server reportHandle.py).
-- Counts use COUNT(...) so every count column is BIGINT (SUM would give DECIMAL on MySQL).
-- agent_id uses MAX() so the view is valid under ONLY_FULL_GROUP_BY.
-- SQL SECURITY INVOKER: the view does not depend on the migrating account continuing to exist.
CREATE OR REPLACE SQL SECURITY INVOKER VIEW v_chat_summary AS
SELECT
    h.mac_address                                   AS mac_address,
    h.session_id                                    AS session_id,
    MAX(h.agent_id)                                 AS agent_id,
    MIN(h.created_at)                               AS first_message_at,
    MAX(h.created_at)                               AS last_message_at,
    COUNT(CASE WHEN h.chat_type = 1 THEN 1 END)     AS user_messages,
    COUNT(CASE WHEN h.chat_type = 2 THEN 1 END)     AS assistant_messages,
    COUNT(CASE WHEN h.chat_type = 3 THEN 1 END)     AS tool_messages,
    COUNT(*)                                        AS total_messages,
    COUNT(h.audio_id)                               AS audio_messages
FROM ai_agent_chat_history h
GROUP BY h.mac_address, h.session_id;
