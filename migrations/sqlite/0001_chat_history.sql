-- xiaozhi-gateway migration 0001 (SQLite): the manager-api chat history schema, SQLite flavour.
-- Mirrors migrations/mysql/0001_chat_history.sql (manager-api 202505022134 + 202512192245 + 202603311200).
-- Timestamps are TEXT 'YYYY-MM-DD HH:MM:SS.mmm' so they sort correctly as strings.
-- Note: defaults use 'now' = UTC. MySQL has ON UPDATE CURRENT_TIMESTAMP(3) for updated_at,
-- SQLite has no equivalent: the application sets updated_at itself when it updates a row.
-- Index names are already table-prefixed, so they are unique in SQLite's per-schema index namespace.

CREATE TABLE IF NOT EXISTS ai_agent_chat_history
(
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    mac_address TEXT,
    agent_id    TEXT,
    session_id  TEXT,
    chat_type   INTEGER,
    content     TEXT,
    audio_id    TEXT,
    created_at  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%d %H:%M:%f','now')),
    updated_at  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%d %H:%M:%f','now'))
);

CREATE INDEX IF NOT EXISTS idx_ai_agent_chat_history_mac ON ai_agent_chat_history (mac_address);

CREATE INDEX IF NOT EXISTS idx_ai_agent_chat_history_session_id ON ai_agent_chat_history (session_id);

CREATE INDEX IF NOT EXISTS idx_ai_agent_chat_history_agent_id ON ai_agent_chat_history (agent_id);

CREATE INDEX IF NOT EXISTS idx_ai_agent_chat_history_agent_session_created ON ai_agent_chat_history (agent_id, session_id, created_at);

CREATE INDEX IF NOT EXISTS idx_ai_agent_chat_history_audio_id ON ai_agent_chat_history (audio_id);

-- NOT NULL is explicit: in SQLite a non-INTEGER PRIMARY KEY column would otherwise accept NULL.
CREATE TABLE IF NOT EXISTS ai_agent_chat_audio
(
    id          TEXT NOT NULL PRIMARY KEY,
    audio       BLOB
);
