//! The exactly-once check: every turn the fleet heard complete has its records in the
//! database once, and nothing is there twice.
//!
//! The simulated devices know what the gateway must have recorded: a turn whose `stt`
//! and `tts stop` a device heard left a user row (the `stt` text) and an assistant row
//! (the sentence text), under the device's MAC and the session id of its hello (see
//! `history::recorder`). A turn cut short by a fault, or by the end of the run, may or
//! may not have left its rows; either is fine, twice is not. The comparison is a merge
//! of two lists sorted by session id, so an hour of conversations is checked without
//! holding the table in memory.

use std::cmp::Ordering;
use std::collections::HashMap;

use futures_util::TryStreamExt as _;
use sqlx::Row as _;

/// `ai_agent_chat_history.chat_type` of what the user said.
pub const USER: u8 = 1;
/// `ai_agent_chat_history.chat_type` of what the assistant said.
pub const ASSISTANT: u8 = 2;

/// What one conversation must (and may) have left in the database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpectedConversation {
    pub session_id: String,
    /// Colon form, as the recorder writes it.
    pub mac: String,
    /// Records of turns heard complete: (chat_type, content), each exactly once.
    pub required: Vec<(u8, String)>,
    /// Records of turns cut short: (chat_type, content), at most once.
    pub allowed: Vec<(u8, String)>,
}

/// One row of `ai_agent_chat_history`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRow {
    pub session_id: String,
    pub mac: String,
    pub chat_type: u8,
    pub content: String,
}

/// The outcome of the check.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Tally {
    /// Conversations with at least one turn attempted.
    pub conversations: u64,
    pub records_expected: u64,
    /// Rows found for the fleet's conversations, plus unexpected ones.
    pub records_stored: u64,
    /// Required records not found.
    pub missing: u64,
    /// Rows beyond what any turn accounts for: a required record found twice, or a
    /// cut-short turn's record found twice.
    pub duplicated: u64,
    /// Records of cut-short turns that were stored (once): fine.
    pub partial_stored: u64,
    /// Rows no turn of that conversation could have produced (another content, another
    /// MAC, or a session the fleet never had).
    pub unexpected: u64,
    /// The first few problems, for the report.
    pub examples: Vec<String>,
}

const EXAMPLES: usize = 20;

impl Tally {
    /// Whether every required record is there once and nothing is there twice.
    pub fn exactly_once(&self) -> bool {
        self.missing == 0 && self.duplicated == 0
    }

    fn example(&mut self, text: impl FnOnce() -> String) {
        if self.examples.len() < EXAMPLES {
            self.examples.push(text());
        }
    }

    /// Compares one conversation with its rows (all of the same session id).
    pub fn conversation(&mut self, expected: &ExpectedConversation, rows: &[StoredRow]) {
        self.conversations += 1;
        self.records_expected += expected.required.len() as u64;
        // (mac, chat_type, content) -> (required, allowed, found)
        let mut want: HashMap<(&str, u8, &str), (u64, u64, u64)> = HashMap::new();
        for (t, c) in &expected.required {
            want.entry((expected.mac.as_str(), *t, c.as_str()))
                .or_default()
                .0 += 1;
        }
        for (t, c) in &expected.allowed {
            want.entry((expected.mac.as_str(), *t, c.as_str()))
                .or_default()
                .1 += 1;
        }
        for row in rows {
            self.records_stored += 1;
            match want.get_mut(&(row.mac.as_str(), row.chat_type, row.content.as_str())) {
                Some(slot) => slot.2 += 1,
                None => {
                    self.unexpected += 1;
                    self.example(|| {
                        format!(
                            "unexpected row in session {} ({}): type {} {:?}",
                            row.session_id, row.mac, row.chat_type, row.content
                        )
                    });
                }
            }
        }
        let mut problems = Vec::new();
        for ((_, chat_type, content), (required, allowed, found)) in &want {
            let missing = required.saturating_sub(*found);
            let duplicated = found.saturating_sub(required + allowed);
            self.missing += missing;
            self.duplicated += duplicated;
            self.partial_stored += found.saturating_sub(*required).min(*allowed);
            if missing > 0 {
                problems.push(format!("{missing} missing: type {chat_type} {content:?}"));
            }
            if duplicated > 0 {
                problems.push(format!(
                    "{duplicated} duplicated: type {chat_type} {content:?} stored {found} times"
                ));
            }
        }
        problems.sort();
        for p in problems {
            self.example(|| format!("session {} ({}): {p}", expected.session_id, expected.mac));
        }
    }

    /// Rows of a session the fleet never had.
    fn stray(&mut self, rows: &[StoredRow]) {
        self.records_stored += rows.len() as u64;
        self.unexpected += rows.len() as u64;
        if let Some(r) = rows.first() {
            self.example(|| {
                format!(
                    "{} row(s) of unknown session {} ({})",
                    rows.len(),
                    r.session_id,
                    r.mac
                )
            });
        }
    }
}

/// The comparison as a merge: rows are pushed in session order (as bytes), the expected
/// conversations are walked alongside in the same order.
pub struct Merge<'a> {
    expected: std::iter::Peekable<std::slice::Iter<'a, ExpectedConversation>>,
    group: Vec<StoredRow>,
    tally: Tally,
}

impl<'a> Merge<'a> {
    /// `expected` must be sorted by session id (as bytes), one entry per session.
    pub fn new(expected: &'a [ExpectedConversation]) -> Self {
        Merge {
            expected: expected.iter().peekable(),
            group: Vec::new(),
            tally: Tally::default(),
        }
    }

    /// The next row, in session order.
    pub fn push(&mut self, row: StoredRow) {
        if self
            .group
            .first()
            .is_some_and(|first| first.session_id != row.session_id)
        {
            self.flush();
        }
        self.group.push(row);
    }

    fn flush(&mut self) {
        let Some(first) = self.group.first() else {
            return;
        };
        let session = first.session_id.as_bytes();
        while let Some(c) = self
            .expected
            .next_if(|c| c.session_id.as_bytes().cmp(session) == Ordering::Less)
        {
            self.tally.conversation(c, &[]);
        }
        match self
            .expected
            .next_if(|c| c.session_id.as_bytes() == session)
        {
            Some(c) => self.tally.conversation(c, &self.group),
            None => self.tally.stray(&self.group),
        }
        self.group.clear();
    }

    /// No more rows: the result.
    pub fn finish(mut self) -> Tally {
        self.flush();
        for c in self.expected.by_ref() {
            self.tally.conversation(c, &[]);
        }
        self.tally
    }
}

/// Checks `expected` (sorted by session id as bytes, one entry per session) against
/// `rows` (sorted the same way); a read error stops the check.
pub fn check<E>(
    expected: &[ExpectedConversation],
    rows: impl IntoIterator<Item = Result<StoredRow, E>>,
) -> Result<Tally, E> {
    let mut merge = Merge::new(expected);
    for row in rows {
        merge.push(row?);
    }
    Ok(merge.finish())
}

/// Reads every chat-history row of the soak's database, sorted by session id as bytes,
/// and checks it against `expected` (which must be sorted the same way). Rows are
/// streamed, never all held.
pub async fn check_database(
    pool: &sqlx::MySqlPool,
    expected: &[ExpectedConversation],
) -> Result<Tally, sqlx::Error> {
    let mut merge = Merge::new(expected);
    let mut rows = sqlx::query(
        "SELECT session_id, mac_address, chat_type, content FROM ai_agent_chat_history \
         ORDER BY CAST(session_id AS BINARY), id",
    )
    .fetch(pool);
    while let Some(r) = rows.try_next().await? {
        let text = |i: usize| -> Result<String, sqlx::Error> {
            Ok(r.try_get::<Option<String>, _>(i)?.unwrap_or_default())
        };
        merge.push(StoredRow {
            session_id: text(0)?,
            mac: text(1)?,
            chat_type: r.try_get::<Option<i8>, _>(2)?.map_or(0, |t| t as u8),
            content: text(3)?,
        });
    }
    Ok(merge.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conv(
        session: &str,
        required: &[(u8, &str)],
        allowed: &[(u8, &str)],
    ) -> ExpectedConversation {
        let own = |v: &[(u8, &str)]| v.iter().map(|(t, c)| (*t, c.to_string())).collect();
        ExpectedConversation {
            session_id: session.into(),
            mac: "02:5a:00:00:00:01".into(),
            required: own(required),
            allowed: own(allowed),
        }
    }

    fn row(session: &str, chat_type: u8, content: &str) -> Result<StoredRow, ()> {
        Ok(StoredRow {
            session_id: session.into(),
            mac: "02:5a:00:00:00:01".into(),
            chat_type,
            content: content.into(),
        })
    }

    #[test]
    fn all_present_once_passes() {
        let expected = [
            conv("a", &[(USER, "turn 1"), (ASSISTANT, "reply 1")], &[]),
            conv(
                "b",
                &[(USER, "turn 1"), (ASSISTANT, "reply 1")],
                &[(USER, "turn 2"), (ASSISTANT, "reply 2")],
            ),
        ];
        let rows = [
            row("a", USER, "turn 1"),
            row("a", ASSISTANT, "reply 1"),
            row("b", USER, "turn 1"),
            row("b", ASSISTANT, "reply 1"),
            row("b", USER, "turn 2"),
        ];
        let t = check(&expected, rows).unwrap();
        assert!(t.exactly_once(), "{t:?}");
        assert_eq!(t.conversations, 2);
        assert_eq!(t.records_expected, 4);
        assert_eq!(t.records_stored, 5);
        assert_eq!(t.partial_stored, 1);
        assert_eq!(t.unexpected, 0);
    }

    #[test]
    fn missing_and_duplicated_are_counted() {
        let expected = [
            conv("a", &[(USER, "turn 1"), (ASSISTANT, "reply 1")], &[]),
            conv("c", &[(USER, "turn 1")], &[(ASSISTANT, "reply 1")]),
        ];
        let rows = [
            row("a", USER, "turn 1"),
            row("a", USER, "turn 1"),
            row("b", USER, "turn 9"),
            row("c", ASSISTANT, "reply 1"),
            row("c", ASSISTANT, "reply 1"),
        ];
        let t = check(&expected, rows).unwrap();
        assert!(!t.exactly_once());
        // a: reply 1 missing, turn 1 twice; c: turn 1 missing, reply 1 twice (once allowed).
        assert_eq!(t.missing, 2);
        assert_eq!(t.duplicated, 2);
        assert_eq!(t.partial_stored, 1);
        // b is a session nobody had.
        assert_eq!(t.unexpected, 1);
        assert!(
            t.examples.iter().any(|e| e.contains("unknown session b")),
            "{:?}",
            t.examples
        );
        assert!(t.examples.iter().any(|e| e.contains("missing")));
    }

    #[test]
    fn the_same_text_twice_in_a_session_is_expected_twice() {
        let expected = [conv("a", &[(USER, "hi"), (USER, "hi")], &[(USER, "hi")])];
        let t = check(&expected, [row("a", USER, "hi"), row("a", USER, "hi")]).unwrap();
        assert!(t.exactly_once(), "{t:?}");
        let t = check(&expected, (0..4).map(|_| row("a", USER, "hi"))).unwrap();
        assert_eq!(t.duplicated, 1);
    }

    #[test]
    fn another_mac_or_content_is_unexpected() {
        let expected = [conv("a", &[(USER, "turn 1")], &[])];
        let mut other = row("a", USER, "turn 1").unwrap();
        other.mac = "02:5a:00:00:00:02".into();
        let t = check(&expected, [Ok::<_, ()>(other)]).unwrap();
        assert_eq!((t.missing, t.unexpected), (1, 1));
    }

    #[test]
    fn read_errors_stop_the_check() {
        let expected = [conv("a", &[(USER, "turn 1")], &[])];
        assert_eq!(
            check(&expected, [row("a", USER, "turn 1"), Err(())]),
            Err(())
        );
    }

    #[test]
    fn nothing_against_nothing_passes() {
        let t = check::<()>(&[], []).unwrap();
        assert!(t.exactly_once());
        assert_eq!(t.conversations, 0);
    }
}
