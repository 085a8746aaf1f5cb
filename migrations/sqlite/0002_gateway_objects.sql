-- xiaozhi-gateway migration 0002 (SQLite): objects owned by the gateway only. Safe to re-run.

-- Journal replay ledger: a journal record id is inserted in the same transaction as the
-- chat rows it produced, so replaying the journal after a crash never duplicates rows.
-- NOT NULL is explicit: in SQLite a non-INTEGER PRIMARY KEY column would otherwise accept NULL.
CREATE TABLE IF NOT EXISTS xz_chat_applied
(
    record_id   TEXT NOT NULL PRIMARY KEY,
    history_id  INTEGER NULL,
    applied_at  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%d %H:%M:%f','now'))
);

-- Same name as on MySQL/MariaDB; unique in SQLite's index namespace.
CREATE INDEX IF NOT EXISTS idx_xz_mac_session_created ON ai_agent_chat_history (mac_address, session_id, created_at);

-- One row per (mac_address, session_id).
-- chat_type: 1 = user (ASR), 2 = assistant (TTS), 3 = tool call / tool result.
-- IF NOT EXISTS keeps an existing view as it is: a later change to it needs DROP VIEW IF EXISTS first.
CREATE VIEW IF NOT EXISTS v_chat_summary AS
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
