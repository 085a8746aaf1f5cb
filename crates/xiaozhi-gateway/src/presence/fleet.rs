//! The fleet view (sans-IO): every device presence remembers, connected or offline,
//! with counts, as the web console's `GET /api/console/fleet` shows it
//! (`docs/console-api.md`).
//!
//! The stores only gather the live records ([`PresenceStore::fleet`]); filtering,
//! counting and paging happen here, in [`fleet_page`], so both backends answer alike.
//! One pass over the records counts and filters; only the page itself is sorted (a
//! selection of the first `limit` MACs), so a fleet of 10,000 costs a linear scan.
//!
//! [`PresenceStore::fleet`]: super::PresenceStore::fleet

use std::cmp::Ordering;

use serde::{Deserialize, Serialize};

use super::{DEFAULT_PAGE, MAX_PAGE, PresenceRecord, PresenceState};

/// Longest search text accepted (in characters).
pub const MAX_SEARCH: usize = 64;

/// Which devices a fleet page holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FleetQuery {
    /// Only this state (`offline` included); none: every state.
    pub state: Option<PresenceState>,
    /// Case-insensitive text matched anywhere in the MAC, client id, group, node, remote
    /// address, board and firmware. Surrounding white space is ignored; empty matches
    /// everything. See [`check_search`] for its limit.
    pub q: Option<String>,
    /// Offline devices last seen before this unix ms are left out of the listing and of
    /// [`FleetCounts::offline`].
    pub since_ms: Option<i64>,
    /// Keyset paging: only MACs (colon form) sorting after this one.
    pub after: Option<String>,
    /// Page size; 0 means the default (100); capped at 1000.
    pub limit: usize,
}

impl FleetQuery {
    /// The page size to use.
    pub fn page_size(&self) -> usize {
        match self.limit {
            0 => DEFAULT_PAGE,
            n => n.min(MAX_PAGE),
        }
    }
}

/// Whether `q` is an acceptable search text; the error says why not.
pub fn check_search(q: &str) -> Result<(), String> {
    if q.chars().count() > MAX_SEARCH {
        return Err(format!("q is longer than {MAX_SEARCH} characters"));
    }
    Ok(())
}

/// How many devices are in each state, over the whole fleet.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetCounts {
    /// Online or in a session.
    pub connected: usize,
    /// In a session (also counted in `connected`).
    pub in_session: usize,
    /// In a device-to-device call (also counted in `connected`).
    #[serde(default)]
    pub in_call: usize,
    /// Offline and remembered (not before `since_ms`, when given).
    pub offline: usize,
}

/// One page of the fleet, sorted by MAC.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetPage {
    /// The whole fleet, whatever the filters and paging (`since_ms` aside).
    pub counts: FleetCounts,
    /// Devices matching the filters, over all pages.
    pub total: usize,
    pub devices: Vec<PresenceRecord>,
    /// Pass as `after` for the next page; none (`null`) on the last page.
    pub next: Option<String>,
}

/// The search text, prepared once per page.
struct Search {
    /// Lowercase.
    needle: String,
}

impl Search {
    fn new(q: Option<&str>) -> Option<Search> {
        let needle = q?.trim();
        (!needle.is_empty()).then(|| Search {
            needle: needle.to_lowercase(),
        })
    }

    fn found_in(&self, haystack: &str) -> bool {
        if self.needle.is_ascii() {
            // The common case, without allocating: ASCII bytes never match inside a
            // multi-byte character, so comparing bytes is exact.
            let needle = self.needle.as_bytes();
            haystack.len() >= needle.len()
                && haystack
                    .as_bytes()
                    .windows(needle.len())
                    .any(|window| window.eq_ignore_ascii_case(needle))
        } else {
            haystack.to_lowercase().contains(&self.needle)
        }
    }

    fn matches(&self, record: &PresenceRecord) -> bool {
        [
            record.mac_address.as_str(),
            &record.client_id,
            &record.group,
            &record.node,
            &record.remote,
        ]
        .into_iter()
        .chain(record.board.as_deref())
        .chain(record.firmware.as_deref())
        .any(|field| self.found_in(field))
    }
}

/// Whether an offline record is old enough to leave out (`since_ms`).
fn forgotten(record: &PresenceRecord, since_ms: Option<i64>) -> bool {
    record.state == PresenceState::Offline && since_ms.is_some_and(|s| record.last_seen_ms < s)
}

fn by_mac(a: &&PresenceRecord, b: &&PresenceRecord) -> Ordering {
    a.mac_address.cmp(&b.mac_address)
}

/// The fleet page `query` asks for, from every live record a store holds (in any
/// order, each MAC once; expired entries must already be left out). Only the records of
/// the page are cloned.
pub fn fleet_page<'a>(
    records: impl IntoIterator<Item = &'a PresenceRecord>,
    query: &FleetQuery,
) -> FleetPage {
    let search = Search::new(query.q.as_deref());
    let after = query.after.as_deref().map(str::to_ascii_lowercase);
    let mut counts = FleetCounts::default();
    let mut total = 0;
    // Matching records past the cursor: the page is the first of them by MAC.
    let mut candidates: Vec<&PresenceRecord> = Vec::new();
    for record in records {
        if forgotten(record, query.since_ms) {
            continue;
        }
        match record.state {
            PresenceState::Offline => counts.offline += 1,
            PresenceState::Online => counts.connected += 1,
            PresenceState::InSession => {
                counts.connected += 1;
                counts.in_session += 1;
            }
            PresenceState::InCall => {
                counts.connected += 1;
                counts.in_call += 1;
            }
        }
        let matches = query.state.is_none_or(|s| s == record.state)
            && search.as_ref().is_none_or(|s| s.matches(record));
        if !matches {
            continue;
        }
        total += 1;
        if after
            .as_deref()
            .is_none_or(|after| record.mac_address.as_str() > after)
        {
            candidates.push(record);
        }
    }

    let size = query.page_size();
    let more = candidates.len() > size;
    if more {
        // The `size` smallest MACs in front, in no particular order.
        candidates.select_nth_unstable_by(size, by_mac);
        candidates.truncate(size);
    }
    candidates.sort_unstable_by(by_mac);
    let devices: Vec<PresenceRecord> = candidates.into_iter().cloned().collect();
    let next = if more {
        devices.last().map(|r| r.mac_address.clone())
    } else {
        None
    };
    FleetPage {
        counts,
        total,
        devices,
        next,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mac(i: usize) -> String {
        format!("aa:bb:cc:dd:{:02x}:{:02x}", i / 256, i % 256)
    }

    fn record(i: usize, state: PresenceState) -> PresenceRecord {
        PresenceRecord {
            mac_address: mac(i),
            state,
            node: "gateway-1".into(),
            client_id: format!("GID_test@@@{}@@@uuid", mac(i).replace(':', "_")),
            group: "GID_test".into(),
            remote: "10.0.0.7:51012".into(),
            board: None,
            firmware: None,
            session_id: None,
            session_since_ms: None,
            call_peer: None,
            call_bridged: None,
            connected_at_ms: 1_000,
            last_seen_ms: 10_000,
        }
    }

    /// 0..10 online, 10..13 in session, 13..20 offline (last seen 13_000..20_000).
    fn fleet() -> Vec<PresenceRecord> {
        let mut records: Vec<PresenceRecord> = (0..20)
            .rev()
            .map(|i| {
                let state = match i {
                    0..10 => PresenceState::Online,
                    10..13 => PresenceState::InSession,
                    _ => PresenceState::Offline,
                };
                let mut r = record(i, state);
                if state == PresenceState::Offline {
                    r.last_seen_ms = i as i64 * 1_000;
                }
                r
            })
            .collect();
        records[3].board = Some("ESP32-S3-Box".into());
        records[4].firmware = Some("1.6.2".into());
        records
    }

    fn macs(page: &FleetPage) -> Vec<String> {
        page.devices.iter().map(|r| r.mac_address.clone()).collect()
    }

    fn query() -> FleetQuery {
        FleetQuery::default()
    }

    #[test]
    fn lists_every_state_sorted_with_counts() {
        let records = fleet();
        let page = fleet_page(&records, &query());
        assert_eq!(
            page.counts,
            FleetCounts {
                connected: 13,
                in_session: 3,
                in_call: 0,
                offline: 7
            }
        );
        assert_eq!(page.total, 20);
        assert_eq!(macs(&page), (0..20).map(mac).collect::<Vec<_>>());
        assert_eq!(page.next, None);
        assert_eq!(fleet_page(&[], &query()), FleetPage::default());
    }

    #[test]
    fn state_filter_narrows_the_listing_not_the_counts() {
        let records = fleet();
        for (state, expected) in [
            (PresenceState::Online, 0..10),
            (PresenceState::InSession, 10..13),
            (PresenceState::Offline, 13..20),
        ] {
            let page = fleet_page(
                &records,
                &FleetQuery {
                    state: Some(state),
                    ..query()
                },
            );
            assert_eq!(macs(&page), expected.clone().map(mac).collect::<Vec<_>>());
            assert_eq!(page.total, expected.len());
            assert_eq!(page.counts, fleet_page(&records, &query()).counts);
        }
    }

    #[test]
    fn search_is_case_insensitive_over_every_text_field() {
        let records = fleet();
        let search = |q: &str| {
            let page = fleet_page(
                &records,
                &FleetQuery {
                    q: Some(q.into()),
                    ..query()
                },
            );
            assert_eq!(page.counts.connected, 13, "counts ignore q");
            assert_eq!(page.total, page.devices.len());
            macs(&page)
        };
        // records[3] is mac 16, records[4] is mac 15 (built in reverse).
        assert_eq!(search("esp32-s3"), vec![mac(16)]);
        assert_eq!(search("  BOX "), vec![mac(16)]);
        assert_eq!(search("1.6.2"), vec![mac(15)]);
        assert_eq!(search("AA:BB:CC:DD:00:0A"), vec![mac(10)]);
        assert_eq!(search("aa_bb_cc_dd_00_0b"), vec![mac(11)]);
        assert_eq!(search("gid_TEST").len(), 20);
        assert_eq!(search("gateway-1").len(), 20);
        assert_eq!(search("10.0.0.7:51012").len(), 20);
        assert!(search("gateway-2").is_empty());
        assert!(search("a much longer text than any field holds at all").is_empty());
        // Empty (or blank) text filters nothing.
        assert_eq!(search("").len(), 20);
        assert_eq!(search("   ").len(), 20);

        let mut unicode = fleet();
        unicode[0].board = Some("Überboard".into());
        let page = fleet_page(
            &unicode,
            &FleetQuery {
                q: Some("üBER".into()),
                ..query()
            },
        );
        assert_eq!(macs(&page), vec![mac(19)]);
    }

    #[test]
    fn since_ms_leaves_out_old_offline_devices_from_listing_and_counts() {
        let mut records = fleet();
        // An old connected device stays: since_ms is about offline devices only.
        records[19].last_seen_ms = 1;
        let page = fleet_page(
            &records,
            &FleetQuery {
                since_ms: Some(17_000),
                ..query()
            },
        );
        assert_eq!(
            page.counts,
            FleetCounts {
                connected: 13,
                in_session: 3,
                in_call: 0,
                offline: 3
            }
        );
        assert_eq!(page.total, 16);
        assert_eq!(
            macs(&page),
            (0..13).chain(17..20).map(mac).collect::<Vec<_>>()
        );
        let offline = fleet_page(
            &records,
            &FleetQuery {
                state: Some(PresenceState::Offline),
                since_ms: Some(17_000),
                q: Some("aa:bb".into()),
                ..query()
            },
        );
        assert_eq!(macs(&offline), (17..20).map(mac).collect::<Vec<_>>());
        assert_eq!(offline.counts.offline, 3);
    }

    #[test]
    fn pages_follow_the_cursor() {
        let records = fleet();
        let mut q = FleetQuery {
            limit: 6,
            ..query()
        };
        let mut pages = Vec::new();
        loop {
            let page = fleet_page(&records, &q);
            assert_eq!(page.total, 20);
            assert_eq!(page.counts.offline, 7);
            pages.push(macs(&page));
            match page.next {
                Some(next) => {
                    assert_eq!(Some(&next), pages.last().unwrap().last());
                    q.after = Some(next);
                }
                None => break,
            }
        }
        assert_eq!(
            pages.iter().map(Vec::len).collect::<Vec<_>>(),
            vec![6, 6, 6, 2]
        );
        assert_eq!(pages.concat(), (0..20).map(mac).collect::<Vec<_>>());

        // An exactly full last page has no `next`.
        let full = fleet_page(
            &records,
            &FleetQuery {
                limit: 20,
                ..query()
            },
        );
        assert_eq!((full.devices.len(), full.next), (20, None));
        // The cursor need not be stored, and may be in upper case.
        let upper = fleet_page(
            &records,
            &FleetQuery {
                after: Some(mac(4).to_ascii_uppercase()),
                limit: 2,
                ..query()
            },
        );
        assert_eq!(macs(&upper), vec![mac(5), mac(6)]);
        assert_eq!(upper.next, Some(mac(6)));
        let past = fleet_page(
            &records,
            &FleetQuery {
                after: Some("ff:ff:ff:ff:ff:ff".into()),
                ..query()
            },
        );
        assert_eq!((past.devices.len(), past.next, past.total), (0, None, 20));
        // Paging composes with filters.
        let offline = fleet_page(
            &records,
            &FleetQuery {
                state: Some(PresenceState::Offline),
                after: Some(mac(14)),
                limit: 2,
                ..query()
            },
        );
        assert_eq!(macs(&offline), vec![mac(15), mac(16)]);
        assert_eq!((offline.total, offline.next), (7, Some(mac(16))));
    }

    #[test]
    fn page_sizes_default_and_cap() {
        assert_eq!(query().page_size(), DEFAULT_PAGE);
        let of = |limit| FleetQuery { limit, ..query() }.page_size();
        assert_eq!(of(7), 7);
        assert_eq!(of(MAX_PAGE + 1), MAX_PAGE);
        let records: Vec<_> = (0..MAX_PAGE + 5)
            .map(|i| record(i, PresenceState::Online))
            .collect();
        let page = fleet_page(&records, &query());
        assert_eq!(page.devices.len(), DEFAULT_PAGE);
        assert_eq!(page.next, Some(mac(DEFAULT_PAGE - 1)));
        let page = fleet_page(
            &records,
            &FleetQuery {
                limit: 5000,
                ..query()
            },
        );
        assert_eq!((page.devices.len(), page.total), (MAX_PAGE, MAX_PAGE + 5));
    }

    #[test]
    fn search_limit() {
        assert!(check_search(&"x".repeat(MAX_SEARCH)).is_ok());
        assert!(check_search(&"é".repeat(MAX_SEARCH)).is_ok(), "characters");
        let e = check_search(&"x".repeat(MAX_SEARCH + 1)).unwrap_err();
        assert!(e.contains("q ") && e.contains("64"), "{e}");
    }

    #[test]
    fn serializes_as_the_console_api_says() {
        let mut records = fleet();
        records.truncate(1);
        let page = fleet_page(
            &records,
            &FleetQuery {
                limit: 1,
                ..query()
            },
        );
        let json = serde_json::to_value(&page).unwrap();
        assert_eq!(
            json["counts"],
            serde_json::json!({"connected": 0, "in_session": 0, "in_call": 0, "offline": 1})
        );
        assert_eq!(json["total"], 1);
        assert_eq!(json["next"], serde_json::Value::Null);
        let device = &json["devices"][0];
        assert_eq!(device["mac_address"], mac(19));
        assert_eq!(device["state"], "offline");
        assert!(device.get("board").is_none(), "absent when unknown");
        let keys: Vec<&str> = json
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(keys.len(), 4);
    }
}
