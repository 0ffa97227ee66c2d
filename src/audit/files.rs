//! The JSON Lines copy of the trail: `audit.<YYYY-MM-DD>.jsonl` in `CATRACA_AUDIT_DIR`, one canonical
//! event per line, a new file each UTC day. The writer appends each committed batch itself, in one
//! `write` before any of the batch's requests is answered, so a killed process loses nothing it
//! acknowledged (the kernel holds what was written). At start the previous chain of the instance is
//! brought level with the database, which covers what a crash between the commit and the write, or a
//! machine that lost power, left behind: after any crash the files and the database hold the same events.

use std::fs::{File, OpenOptions};
use std::io::{self, Read as _, Seek as _, SeekFrom, Write as _};
use std::path::{Path, PathBuf};

use time::OffsetDateTime;

use crate::event::SealedEvent;

/// Bytes read at a time when looking for a chain's last line from the end of a file.
const TAIL_CHUNK: u64 = 64 * 1024;

/// The open day file and where new lines go.
pub struct TrailFiles {
    dir: PathBuf,
    open: Option<(String, File)>,
}

/// `audit.<date>.jsonl` for the UTC day of `at`.
fn file_name(at: OffsetDateTime) -> String {
    let d = at.to_offset(time::UtcOffset::UTC).date();
    format!(
        "audit.{:04}-{:02}-{:02}.jsonl",
        d.year(),
        u8::from(d.month()),
        d.day()
    )
}

impl TrailFiles {
    /// Creates the folder if needed; files are opened on the first append.
    pub fn open(dir: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        Ok(Self {
            dir: dir.to_owned(),
            open: None,
        })
    }

    /// Appends `sealed` as lines of today's file in one write. A file left ending mid-line (a torn write
    /// on power loss) gets its line ended first, so the new lines stay whole.
    pub fn append(&mut self, sealed: &[SealedEvent]) -> io::Result<()> {
        if sealed.is_empty() {
            return Ok(());
        }
        let mut lines = String::with_capacity(sealed.len() * 768);
        for e in sealed {
            lines.push_str(&e.json_line());
        }
        let name = file_name(OffsetDateTime::now_utc());
        if self.open.as_ref().is_none_or(|(open, _)| *open != name) {
            let path = self.dir.join(&name);
            let mut file = OpenOptions::new()
                .create(true)
                .read(true)
                .append(true)
                .open(&path)?;
            if !ends_with_newline(&mut file)? {
                file.write_all(b"\n")?;
            }
            self.open = Some((name, file));
        }
        let Some((_, file)) = self.open.as_mut() else {
            unreachable!("opened above");
        };
        let before = file.metadata()?.len();
        if let Err(e) = file.write_all(lines.as_bytes()) {
            // A write cut short (a full disk) is taken back, so no half line stays behind; should that
            // fail too, the next append reopens the file and ends the half line first.
            if file.set_len(before).is_err() {
                self.open = None;
            }
            return Err(e);
        }
        Ok(())
    }

    /// Makes what was appended durable (at shutdown).
    pub fn sync(&mut self) -> io::Result<()> {
        match self.open.as_mut() {
            Some((_, file)) => file.sync_data(),
            None => Ok(()),
        }
    }

    /// The highest `seq` of `chain_id` found in the files, looking from the newest file's end.
    pub fn last_seq_of(&self, chain_id: &str) -> io::Result<Option<i64>> {
        let needle = format!("\"chain_id\":\"{chain_id}\"");
        let mut names: Vec<String> = std::fs::read_dir(&self.dir)?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.starts_with("audit.") && n.ends_with(".jsonl"))
            .collect();
        names.sort_unstable_by(|a, b| b.cmp(a));
        for name in names {
            if let Some(seq) = last_seq_in(&self.dir.join(name), &needle)? {
                return Ok(Some(seq));
            }
        }
        Ok(None)
    }
}

fn ends_with_newline(file: &mut File) -> io::Result<bool> {
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok(true);
    }
    let mut last = [0u8; 1];
    let mut reader = file.try_clone()?;
    reader.seek(SeekFrom::Start(len - 1))?;
    reader.read_exact(&mut last)?;
    Ok(last[0] == b'\n')
}

/// Reads `path` backwards in chunks and returns the `seq` of the last whole line containing `needle`.
fn last_seq_in(path: &Path, needle: &str) -> io::Result<Option<i64>> {
    let mut file = File::open(path)?;
    let mut end = file.metadata()?.len();
    // Bytes after the last newline seen so far (the start of a line that continues in `carry`).
    let mut carry: Vec<u8> = Vec::new();
    while end > 0 {
        let start = end.saturating_sub(TAIL_CHUNK);
        let mut chunk = vec![0u8; usize::try_from(end - start).unwrap_or(0)];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(&mut chunk)?;
        chunk.extend_from_slice(&carry);
        // Every line but the first of this chunk is whole (the first may begin in the previous chunk).
        let first_break = if start == 0 {
            None
        } else {
            chunk.iter().position(|&b| b == b'\n')
        };
        let whole = first_break.map_or(&chunk[..], |i| &chunk[i + 1..]);
        for line in whole.rsplit(|&b| b == b'\n') {
            if let Some(seq) = seq_if_match(line, needle) {
                return Ok(Some(seq));
            }
        }
        carry = first_break.map_or_else(Vec::new, |i| chunk[..=i].to_vec());
        end = start;
    }
    Ok(None)
}

fn seq_if_match(line: &[u8], needle: &str) -> Option<i64> {
    let text = std::str::from_utf8(line).ok()?;
    if !text.contains(needle) {
        return None;
    }
    let value: serde_json::Value = serde_json::from_str(text).ok()?;
    value.get("seq")?.as_i64()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{EventType, GENESIS_HASH, PendingEvent, seal};

    fn chain(chain_id: &str, n: i64) -> Vec<SealedEvent> {
        let mut prev = GENESIS_HASH.to_owned();
        (1..=n)
            .map(|seq| {
                let e = PendingEvent::new(
                    EventType::RequestStart,
                    None,
                    serde_json::json!({"pad": "x".repeat(900)}),
                );
                let s = seal(e, chain_id, "i", seq, &prev).unwrap();
                prev.clone_from(&s.hash);
                s
            })
            .collect()
    }

    #[test]
    fn the_last_seq_of_a_chain_is_found_across_chunks_and_interleaved_chains() {
        let dir = tempfile::tempdir().unwrap();
        let mut files = TrailFiles::open(dir.path()).unwrap();
        let a = chain("a.1", 200);
        let b = chain("b.1", 150);
        files.append(&a[..120]).unwrap();
        files.append(&b).unwrap();
        files.append(&a[120..170]).unwrap();
        files.append(&b[..3]).unwrap();
        assert_eq!(files.last_seq_of("a.1").unwrap(), Some(170));
        assert_eq!(files.last_seq_of("b.1").unwrap(), Some(3));
        assert_eq!(files.last_seq_of("c.1").unwrap(), None);
    }

    #[test]
    fn a_torn_last_line_is_ended_before_new_lines() {
        let dir = tempfile::tempdir().unwrap();
        let a = chain("a.1", 3);
        let mut files = TrailFiles::open(dir.path()).unwrap();
        files.append(&a[..1]).unwrap();
        let path = dir.path().join(file_name(OffsetDateTime::now_utc()));
        OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"{\"chain_id\":\"a.1\",\"se")
            .unwrap();
        let mut reopened = TrailFiles::open(dir.path()).unwrap();
        reopened.append(&a[1..]).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert_eq!(lines[1], "{\"chain_id\":\"a.1\",\"se");
        assert_eq!(reopened.last_seq_of("a.1").unwrap(), Some(3));
    }
}
