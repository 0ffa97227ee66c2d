//! The JSON Lines copy of the trail in `CATRACA_AUDIT_DIR`, one canonical event per line. The writer
//! appends to the live file, `audit.<YYYY-MM-DD>.jsonl`; when it passes `audit_file_max_bytes`, or the
//! UTC day ends, it is renamed to the day's next part, `audit.<YYYY-MM-DD>.<NNNN>.jsonl`, and compressed
//! to `audit.<YYYY-MM-DD>.<NNNN>.jsonl.gz` by a background thread (the uncompressed part is removed
//! only once the compressed one is synced and in place). Names sort in write order: a day's parts by
//! number, then its live file.
//!
//! The writer appends each committed batch itself, in one `write` before any of the batch's requests is
//! answered, so a killed process loses nothing it acknowledged (the kernel holds what was written). At
//! start the previous chain of the instance is brought level with the database, which covers what a
//! crash between the commit and the write, or a machine that lost power, left behind: after any crash the
//! files and the database hold the same events. A compression cut short by a crash is redone at start.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead as _, BufReader, Read as _, Seek as _, SeekFrom, Write as _};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;

use flate2::Compression;
use flate2::read::MultiGzDecoder;
use flate2::write::GzEncoder;
use time::OffsetDateTime;

use crate::event::SealedEvent;

/// Bytes read at a time when looking for a chain's last line from the end of a file.
const TAIL_CHUNK: u64 = 64 * 1024;
/// Suffix of a compression in progress; a leftover one (a crash) is removed and the part redone.
const PARTIAL: &str = ".partial";

/// The live file and where rotated parts go to be compressed.
pub struct TrailFiles {
    dir: PathBuf,
    max_bytes: u64,
    open: Option<LiveFile>,
    compressor: Option<(mpsc::Sender<PathBuf>, JoinHandle<()>)>,
}

struct LiveFile {
    day: String,
    file: File,
    len: u64,
}

/// The UTC day of `at`, `YYYY-MM-DD`.
fn day_of(at: OffsetDateTime) -> String {
    let d = at.to_offset(time::UtcOffset::UTC).date();
    format!("{:04}-{:02}-{:02}", d.year(), u8::from(d.month()), d.day())
}

/// `audit.<day>.jsonl`, the live file of `day`.
fn live_name(day: &str) -> String {
    format!("audit.{day}.jsonl")
}

/// Whether `name` is a file of the trail (live, rotated or compressed).
pub fn is_trail_file(name: &str) -> bool {
    name.starts_with("audit.") && (name.ends_with(".jsonl") || name.ends_with(".jsonl.gz"))
}

/// The part number of a rotated file's name (`audit.<day>.<NNNN>.jsonl[.gz]`) and its day.
fn part_of(name: &str) -> Option<(&str, u32)> {
    let rest = name.strip_prefix("audit.")?;
    let rest = rest
        .strip_suffix(".jsonl.gz")
        .or_else(|| rest.strip_suffix(".jsonl"))?;
    let (day, n) = rest.rsplit_once('.')?;
    if n.len() != 4 || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((day, n.parse().ok()?))
}

fn trail_names(dir: &Path) -> io::Result<Vec<String>> {
    Ok(std::fs::read_dir(dir)?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| is_trail_file(n))
        .collect())
}

impl TrailFiles {
    /// Creates the folder if needed, finishes what a crash left (parts not yet compressed, live files of
    /// past days) and starts the compressing thread; files are opened on the first append.
    pub fn open(dir: &Path, max_bytes: u64) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let (tx, rx) = mpsc::channel::<PathBuf>();
        let worker = std::thread::Builder::new()
            .name("catraca-audit-gzip".into())
            .spawn(move || {
                for path in rx {
                    if let Err(e) = compress(&path) {
                        tracing::warn!(file = %path.display(), error = %e, "rotated audit file not compressed; retried at the next start");
                    }
                }
            })?;
        let mut files = Self {
            dir: dir.to_owned(),
            max_bytes: max_bytes.max(1),
            open: None,
            compressor: Some((tx, worker)),
        };
        files.finish_rotations()?;
        Ok(files)
    }

    fn finish_rotations(&mut self) -> io::Result<()> {
        for entry in std::fs::read_dir(&self.dir)? {
            let Ok(name) = entry?.file_name().into_string() else {
                continue;
            };
            if name.starts_with("audit.") && name.ends_with(PARTIAL) {
                std::fs::remove_file(self.dir.join(&name))?;
            }
        }
        let today = day_of(OffsetDateTime::now_utc());
        let mut names = trail_names(&self.dir)?;
        names.sort_unstable();
        for name in &names {
            if let Some(day) = name
                .strip_prefix("audit.")
                .and_then(|r| r.strip_suffix(".jsonl"))
                .filter(|d| part_of(name).is_none() && *d != today)
            {
                self.retire(day)?;
            } else if name.ends_with(".jsonl") && part_of(name).is_some() {
                let path = self.dir.join(name);
                if names.contains(&format!("{name}.gz")) {
                    // Compressed and synced before the crash; only the removal was left.
                    std::fs::remove_file(&path)?;
                } else {
                    self.send(path);
                }
            }
        }
        Ok(())
    }

    /// Renames `day`'s live file to the day's next part and queues it for compression.
    fn retire(&mut self, day: &str) -> io::Result<()> {
        let next = trail_names(&self.dir)?
            .iter()
            .filter_map(|n| part_of(n).filter(|(d, _)| *d == day).map(|(_, n)| n))
            .max()
            .unwrap_or(0)
            + 1;
        let part = self.dir.join(format!("audit.{day}.{next:04}.jsonl"));
        std::fs::rename(self.dir.join(live_name(day)), &part)?;
        File::open(&self.dir)?.sync_all()?;
        self.send(part);
        Ok(())
    }

    fn send(&self, path: PathBuf) {
        if let Some((tx, _)) = &self.compressor {
            let _ = tx.send(path);
        }
    }

    /// Appends `sealed` as lines of the live file in one write, rotating it first when the day has
    /// changed or the lines would take it past the size limit. A file left ending mid-line (a torn write
    /// on power loss) gets its line ended first, so the new lines stay whole.
    pub fn append(&mut self, sealed: &[SealedEvent]) -> io::Result<()> {
        if sealed.is_empty() {
            return Ok(());
        }
        let mut lines = String::with_capacity(sealed.len() * 768);
        for e in sealed {
            lines.push_str(&e.json_line());
        }
        let day = day_of(OffsetDateTime::now_utc());
        let rotate = self.open.as_ref().is_some_and(|live| {
            live.day != day || (live.len > 0 && live.len + lines.len() as u64 > self.max_bytes)
        });
        if rotate && let Some(live) = self.open.take() {
            live.file.sync_data()?;
            drop(live.file);
            self.retire(&live.day)?;
        }
        if self.open.is_none() {
            let mut file = OpenOptions::new()
                .create(true)
                .read(true)
                .append(true)
                .open(self.dir.join(live_name(&day)))?;
            if !ends_with_newline(&mut file)? {
                file.write_all(b"\n")?;
            }
            let len = file.metadata()?.len();
            self.open = Some(LiveFile { day, file, len });
        }
        let Some(live) = self.open.as_mut() else {
            unreachable!("opened above");
        };
        if let Err(e) = live.file.write_all(lines.as_bytes()) {
            // A write cut short (a full disk) is taken back, so no half line stays behind; should that
            // fail too, the next append reopens the file and ends the half line first.
            if live.file.set_len(live.len).is_err() {
                self.open = None;
            }
            return Err(e);
        }
        live.len += lines.len() as u64;
        Ok(())
    }

    /// Makes what was appended durable and waits for queued compressions (at shutdown).
    pub fn finish(&mut self) -> io::Result<()> {
        let synced = self.sync();
        if let Some((tx, worker)) = self.compressor.take() {
            drop(tx);
            let _ = worker.join();
        }
        synced
    }

    /// Makes what was appended durable.
    pub fn sync(&mut self) -> io::Result<()> {
        match self.open.as_mut() {
            Some(live) => live.file.sync_data(),
            None => Ok(()),
        }
    }

    /// The highest `seq` of `chain_id` found in the files, looking from the newest file's end.
    pub fn last_seq_of(&self, chain_id: &str) -> io::Result<Option<i64>> {
        let needle = format!("\"chain_id\":\"{chain_id}\"");
        let mut names = trail_names(&self.dir)?;
        names.sort_unstable_by(|a, b| b.cmp(a));
        for name in names {
            let path = self.dir.join(&name);
            let found = if name.ends_with(".gz") {
                last_seq_in_gz(&path, &needle)
            } else {
                match last_seq_in(&path, &needle) {
                    // Compressed and removed since the folder was listed: read the compressed part.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        last_seq_in_gz(&self.dir.join(format!("{name}.gz")), &needle)
                    }
                    other => other,
                }
            };
            if let Some(seq) = found? {
                return Ok(Some(seq));
            }
        }
        Ok(None)
    }
}

/// Compresses a rotated part to `<part>.gz` (written under a temporary name, synced, then renamed) and
/// removes the part.
pub fn compress(part: &Path) -> io::Result<()> {
    let mut gz_name = part.as_os_str().to_owned();
    gz_name.push(".gz");
    let gz = PathBuf::from(gz_name);
    let mut partial_name = gz.as_os_str().to_owned();
    partial_name.push(PARTIAL);
    let partial = PathBuf::from(partial_name);
    let mut encoder = GzEncoder::new(File::create(&partial)?, Compression::fast());
    io::copy(&mut File::open(part)?, &mut encoder)?;
    encoder.finish()?.sync_all()?;
    std::fs::rename(&partial, &gz)?;
    if let Some(dir) = part.parent() {
        File::open(dir)?.sync_all()?;
    }
    std::fs::remove_file(part)
}

/// A reader of a trail file's lines, decompressing `.gz` files.
pub fn open_lines(path: &Path) -> io::Result<Box<dyn io::BufRead>> {
    let file = File::open(path)?;
    Ok(if path.extension().is_some_and(|e| e == "gz") {
        Box::new(BufReader::new(MultiGzDecoder::new(file)))
    } else {
        Box::new(BufReader::new(file))
    })
}

/// The `seq` of the last whole line containing `needle` in a compressed part, read from the start.
fn last_seq_in_gz(path: &Path, needle: &str) -> io::Result<Option<i64>> {
    let mut last = None;
    for line in open_lines(path)?.split(b'\n') {
        if let Some(seq) = seq_if_match(&line?, needle) {
            last = Some(seq);
        }
    }
    Ok(last)
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
        let mut files = TrailFiles::open(dir.path(), 1 << 30).unwrap();
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
        let mut files = TrailFiles::open(dir.path(), 1 << 30).unwrap();
        files.append(&a[..1]).unwrap();
        let path = dir
            .path()
            .join(live_name(&day_of(OffsetDateTime::now_utc())));
        OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"{\"chain_id\":\"a.1\",\"se")
            .unwrap();
        let mut reopened = TrailFiles::open(dir.path(), 1 << 30).unwrap();
        reopened.append(&a[1..]).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert_eq!(lines[1], "{\"chain_id\":\"a.1\",\"se");
        assert_eq!(reopened.last_seq_of("a.1").unwrap(), Some(3));
    }

    #[test]
    fn a_file_past_its_limit_is_rotated_compressed_and_still_read() {
        let dir = tempfile::tempdir().unwrap();
        let a = chain("a.1", 12);
        let b = chain("b.1", 2);
        let mut files = TrailFiles::open(dir.path(), 4096).unwrap();
        files.append(&b).unwrap();
        for batch in a.chunks(3) {
            files.append(batch).unwrap();
        }
        files.finish().unwrap();

        let mut names = trail_names(dir.path()).unwrap();
        names.sort_unstable();
        let day = day_of(OffsetDateTime::now_utc());
        let parts: Vec<&String> = names.iter().filter(|n| n.ends_with(".gz")).collect();
        assert!(parts.len() >= 3, "{names:?}");
        assert_eq!(parts[0], &format!("audit.{day}.0001.jsonl.gz"));
        assert_eq!(names.last(), Some(&live_name(&day)), "{names:?}");
        assert_eq!(
            parts.len() + 1,
            names.len(),
            "no uncompressed part is left: {names:?}"
        );
        // Every event, once, in write order, across the compressed parts and the live file.
        let mut lines = Vec::new();
        for name in &names {
            for line in open_lines(&dir.path().join(name)).unwrap().lines() {
                lines.push(line.unwrap());
            }
        }
        let written: Vec<String> = b
            .iter()
            .chain(&a)
            .map(|e| e.json_line().trim_end().to_owned())
            .collect();
        assert_eq!(lines, written);
        // A chain whose last line sits in a compressed part is still found.
        let reopened = TrailFiles::open(dir.path(), 4096).unwrap();
        assert_eq!(reopened.last_seq_of("b.1").unwrap(), Some(2));
        assert_eq!(reopened.last_seq_of("a.1").unwrap(), Some(12));
    }

    #[test]
    fn a_part_left_uncompressed_by_a_crash_is_compressed_at_the_next_start() {
        let dir = tempfile::tempdir().unwrap();
        let day = day_of(OffsetDateTime::now_utc());
        let part = dir.path().join(format!("audit.{day}.0001.jsonl"));
        std::fs::write(
            &part,
            chain("a.1", 2)
                .iter()
                .map(SealedEvent::json_line)
                .collect::<String>(),
        )
        .unwrap();
        std::fs::write(
            dir.path()
                .join(format!("audit.{day}.0002.jsonl.gz.partial")),
            b"torn",
        )
        .unwrap();
        let mut files = TrailFiles::open(dir.path(), 4096).unwrap();
        files.finish().unwrap();
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort_unstable();
        assert_eq!(names, vec![format!("audit.{day}.0001.jsonl.gz")]);
        assert_eq!(files.last_seq_of("a.1").unwrap(), Some(2));
    }
}
