//! The on-disk journal: where records wait while the database is unreachable or slow.
//!
//! An append-only file of entries, each `[magic u8][length u32 LE][crc32 u32 LE][JSON
//! batch]`, fsynced on append, so a record the writer has taken survives a crash or a
//! restart. Entries are read back in order from an offset, so a long journal is replayed
//! in chunks; the file is emptied only once everything in it is in the database.
//! Replaying an entry twice is harmless: records carry ids the store deduplicates.
//! A torn entry at the end (a crash mid-append) is detected and cut off.

use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use super::record::ChatRecord;

const MAGIC: u8 = 0xC7;
const HEADER: usize = 9;
/// Largest entry accepted when reading (a corrupt length must not allocate gigabytes).
const MAX_ENTRY: usize = 256 << 20;

/// The journal file.
pub struct Journal {
    path: PathBuf,
    file: File,
    len: u64,
}

/// What a read returned: records and the offset after them.
pub struct Chunk {
    pub records: Vec<ChatRecord>,
    pub next: u64,
}

impl Journal {
    /// Opens (creating) the journal in `dir`, cutting off a torn last entry.
    pub fn open(dir: &Path) -> io::Result<Journal> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("history.journal");
        let file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&path)?;
        let mut journal = Journal { path, file, len: 0 };
        let valid = journal.valid_prefix()?;
        let actual = journal.file.metadata()?.len();
        if valid < actual {
            tracing::warn!(
                path = %journal.path.display(),
                valid,
                actual,
                "history journal ends with a torn entry; cutting it off"
            );
            journal.file.set_len(valid)?;
        }
        journal.len = valid;
        Ok(journal)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes in the journal.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends a batch and syncs it to disk.
    pub fn append(&mut self, records: &[ChatRecord]) -> io::Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        let payload = serde_json::to_vec(records).map_err(io::Error::other)?;
        let mut entry = Vec::with_capacity(HEADER + payload.len());
        entry.push(MAGIC);
        entry.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        entry.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        entry.extend_from_slice(&payload);
        self.file.write_all(&entry)?;
        self.file.sync_data()?;
        self.len += entry.len() as u64;
        Ok(())
    }

    /// Reads whole entries from `offset` until at least `max_records` records (or the
    /// end).
    pub fn read_from(&self, offset: u64, max_records: usize) -> io::Result<Chunk> {
        let mut reader = BufReader::new(&self.file);
        reader.seek(SeekFrom::Start(offset))?;
        let mut records = Vec::new();
        let mut next = offset;
        while next < self.len && records.len() < max_records {
            match read_entry(&mut reader)? {
                Some((batch, size)) => {
                    records.extend(batch);
                    next += size;
                }
                None => break,
            }
        }
        Ok(Chunk { records, next })
    }

    /// Empties the journal (everything in it is stored).
    pub fn clear(&mut self) -> io::Result<()> {
        self.file.set_len(0)?;
        self.file.sync_all()?;
        self.len = 0;
        Ok(())
    }

    fn valid_prefix(&self) -> io::Result<u64> {
        let mut reader = BufReader::new(&self.file);
        reader.seek(SeekFrom::Start(0))?;
        let mut valid = 0;
        while let Some((_, size)) = read_entry(&mut reader)? {
            valid += size;
        }
        Ok(valid)
    }
}

/// Reads one entry; `None` at the end or at a torn / corrupt entry.
fn read_entry(reader: &mut impl Read) -> io::Result<Option<(Vec<ChatRecord>, u64)>> {
    let mut header = [0u8; HEADER];
    if !read_full(reader, &mut header)? || header[0] != MAGIC {
        return Ok(None);
    }
    let len = u32::from_le_bytes(header[1..5].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(header[5..9].try_into().expect("4 bytes"));
    if len > MAX_ENTRY {
        return Ok(None);
    }
    let mut payload = vec![0u8; len];
    if !read_full(reader, &mut payload)? || crc32fast::hash(&payload) != crc {
        return Ok(None);
    }
    match serde_json::from_slice::<Vec<ChatRecord>>(&payload) {
        Ok(records) => Ok(Some((records, (HEADER + len) as u64))),
        Err(_) => Ok(None),
    }
}

/// Fills `buf`; false at a clean or torn end of file.
fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<bool> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => return Ok(false),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::record::ChatType;

    fn record(n: u32) -> ChatRecord {
        ChatRecord::new(
            "aa:bb:cc:dd:ee:ff".into(),
            "s".into(),
            ChatType::User,
            format!("utterance {n}"),
            None,
            1_700_000_000_000 + i64::from(n),
        )
    }

    #[test]
    fn entries_come_back_in_order_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path()).unwrap();
        assert!(j.is_empty());
        j.append(&[record(1), record(2)]).unwrap();
        j.append(&[record(3)]).unwrap();
        drop(j);
        let j = Journal::open(dir.path()).unwrap();
        let first = j.read_from(0, 2).unwrap();
        assert_eq!(first.records.len(), 2);
        let rest = j.read_from(first.next, 100).unwrap();
        let contents: Vec<_> = first
            .records
            .iter()
            .chain(&rest.records)
            .map(|r| r.content.clone())
            .collect();
        assert_eq!(contents, ["utterance 1", "utterance 2", "utterance 3"]);
        assert_eq!(rest.next, j.len());
    }

    #[test]
    fn a_torn_tail_is_cut_and_the_rest_kept() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path()).unwrap();
        j.append(&[record(1)]).unwrap();
        let good = j.len();
        j.append(&[record(2)]).unwrap();
        drop(j);
        // A crash mid-append: the last entry loses its end.
        let path = dir.path().join("history.journal");
        let full = std::fs::metadata(&path).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(full - 3)
            .unwrap();
        let mut j = Journal::open(dir.path()).unwrap();
        assert_eq!(j.len(), good);
        assert_eq!(j.read_from(0, 10).unwrap().records.len(), 1);
        // Appends continue after the valid prefix.
        j.append(&[record(3)]).unwrap();
        let all = j.read_from(0, 10).unwrap().records;
        assert_eq!(
            all.iter().map(|r| r.content.as_str()).collect::<Vec<_>>(),
            ["utterance 1", "utterance 3"]
        );
        j.clear().unwrap();
        assert!(j.is_empty() && j.read_from(0, 10).unwrap().records.is_empty());
    }

    #[test]
    fn garbage_is_not_read_as_records() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("history.journal"),
            b"\xC7\xff\xff\xff\x7fjunkjunk",
        )
        .unwrap();
        let j = Journal::open(dir.path()).unwrap();
        assert!(j.is_empty());
    }
}
