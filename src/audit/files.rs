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
//!
//! Several processes may write to one folder (the CLI's commands while a gateway runs, or gateways that
//! share it). Appends are whole `O_APPEND` writes; rotation happens under an exclusive lock on
//! `.audit.rotate.lock`, after checking that the live file is still the one this process holds; a writer
//! that finds the live file rotated by another process reopens it; a part is compressed only after a
//! grace period, so a write that began before the rename is in it; a compression is claimed by creating
//! its temporary file exclusively.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead as _, BufReader, Read as _, Seek as _, SeekFrom, Write as _};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use flate2::Compression;
use flate2::read::MultiGzDecoder;
use flate2::write::GzEncoder;
use time::OffsetDateTime;

use crate::event::SealedEvent;

/// Bytes read at a time when looking for a chain's last line from the end of a file.
const TAIL_CHUNK: u64 = 64 * 1024;
/// Suffix of a compression in progress; a leftover one (a crash) is removed and the part redone.
const PARTIAL: &str = ".partial";
/// Time between a part's rotation and its compression: a write that another process began before the
/// rename lands in the part first.
const GRACE: Duration = Duration::from_secs(2);
/// A temporary compression file older than this was left by a crash.
const STALE_PARTIAL: Duration = Duration::from_secs(600);
/// Held (exclusively) while the live file is rotated; made at the first rotation.
const ROTATE_LOCK: &str = ".audit.rotate.lock";

/// The live file and where rotated parts go to be compressed.
pub struct TrailFiles {
    dir: PathBuf,
    max_bytes: u64,
    open: Option<LiveFile>,
    compressor: Option<Compressor>,
}

/// The compressing thread and its queue of rotated parts (with when each was rotated).
type Compressor = (mpsc::Sender<(PathBuf, Instant)>, JoinHandle<()>);

struct LiveFile {
    day: String,
    file: File,
    /// Device and inode of the open file: the live name pointing elsewhere means another process
    /// rotated it.
    id: (u64, u64),
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

/// Puts the calling thread at idle priority (Linux's `SCHED_IDLE`, lowest `nice`), so that it runs on
/// what requests leave of the CPU: under full load compression waits, and catches up when the load
/// drops. Where the system refuses, the thread keeps its priority.
fn idle_priority() {
    use thread_priority::{
        NormalThreadSchedulePolicy, ThreadPriority, ThreadSchedulePolicy,
        set_thread_priority_and_policy, thread_native_id,
    };
    let idle = ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Idle);
    if let Err(e) = set_thread_priority_and_policy(thread_native_id(), ThreadPriority::Min, idle) {
        tracing::debug!(error = ?e, "the compressing thread keeps its priority");
    }
}

impl TrailFiles {
    /// Creates the folder if needed, finishes what a crash left (parts not yet compressed, live files of
    /// past days) and starts the compressing thread; files are opened on the first append.
    pub fn open(dir: &Path, max_bytes: u64) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let (tx, rx) = mpsc::channel::<(PathBuf, Instant)>();
        let worker = std::thread::Builder::new()
            .name("catraca-audit-gzip".into())
            .spawn(move || {
                idle_priority();
                for (path, rotated_at) in rx {
                    std::thread::sleep(GRACE.saturating_sub(rotated_at.elapsed()));
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
        let today = day_of(OffsetDateTime::now_utc());
        let left = |name: &str| {
            name.ends_with(PARTIAL)
                || (name.ends_with(".jsonl") && (part_of(name).is_some() || !name.contains(&today)))
        };
        let any_left = std::fs::read_dir(&self.dir)?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .any(|n| n.starts_with("audit.") && left(&n));
        if !any_left {
            return Ok(());
        }
        let lock = self.rotation_lock()?;
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            let stale = entry
                .metadata()?
                .modified()?
                .elapsed()
                .is_ok_and(|age| age > STALE_PARTIAL);
            if name.starts_with("audit.") && name.ends_with(PARTIAL) && stale {
                remove_if_present(&self.dir.join(&name))?;
            }
        }
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
                    remove_if_present(&path)?;
                } else {
                    self.send(path);
                }
            }
        }
        drop(lock);
        Ok(())
    }

    /// The folder's rotation lock, held until the returned file is dropped.
    fn rotation_lock(&self) -> io::Result<File> {
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.dir.join(ROTATE_LOCK))?;
        lock.lock()?;
        Ok(lock)
    }

    /// Renames `day`'s live file to the day's next part and queues it for compression (with the
    /// rotation lock held). Another process having rotated it first is not an error.
    fn retire(&mut self, day: &str) -> io::Result<()> {
        let next = trail_names(&self.dir)?
            .iter()
            .filter_map(|n| part_of(n).filter(|(d, _)| *d == day).map(|(_, n)| n))
            .max()
            .unwrap_or(0)
            + 1;
        let part = self.dir.join(format!("audit.{day}.{next:04}.jsonl"));
        match std::fs::rename(self.dir.join(live_name(day)), &part) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            other => other?,
        }
        // Not synced here: the part reaches the disk as its compressed copy, which the compressing
        // thread syncs (with the folder) a few seconds later, so the sixteen uncompressed megabytes are
        // never written back at all, and a rotation costs the writer a rename rather than a sync that
        // would also hold up the database's syncs on the same disk. A power cut in those seconds can
        // leave the part short; the database, synced at every commit, still holds every event.
        self.send(part);
        Ok(())
    }

    fn send(&self, path: PathBuf) {
        if let Some((tx, _)) = &self.compressor {
            let _ = tx.send((path, Instant::now()));
        }
    }

    /// Appends `sealed` as lines of the live file in one write, rotating it first when the day has
    /// changed or the lines would take it past the size limit. A file left ending mid-line (a torn write
    /// on power loss) gets its line ended first, so the new lines stay whole.
    pub fn append(&mut self, sealed: &[SealedEvent]) -> io::Result<()> {
        if sealed.is_empty() {
            return Ok(());
        }
        let room: usize = sealed.iter().map(SealedEvent::json_line_len).sum();
        let mut lines = String::with_capacity(room);
        for e in sealed {
            e.push_json_line(&mut lines);
        }
        let day = day_of(OffsetDateTime::now_utc());
        // Where the live name points now: another process may have rotated the file this one holds.
        let current = match std::fs::metadata(self.dir.join(live_name(&day))) {
            Ok(m) => Some(m),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        let holds_live = |live: &LiveFile| {
            live.day == day
                && current
                    .as_ref()
                    .is_some_and(|m| (m.dev(), m.ino()) == live.id)
        };
        if self.open.as_ref().is_some_and(|live| !holds_live(live)) {
            if let Some(live) = self.open.take()
                && live.day != day
            {
                // The day ended: its live file becomes a part (unless another process did it).
                let lock = self.rotation_lock()?;
                self.retire(&live.day)?;
                drop(lock);
            }
            return self.append(sealed);
        }
        let size = current.as_ref().map_or(0, std::fs::Metadata::len);
        if self.open.is_some() && size > 0 && size + lines.len() as u64 > self.max_bytes {
            let lock = self.rotation_lock()?;
            // Decided again under the lock: another process may have rotated it meanwhile.
            let still = std::fs::metadata(self.dir.join(live_name(&day)))
                .ok()
                .filter(|m| {
                    self.open
                        .as_ref()
                        .is_some_and(|l| (m.dev(), m.ino()) == l.id)
                });
            if still.is_some_and(|m| m.len() + lines.len() as u64 > self.max_bytes)
                && let Some(live) = self.open.take()
            {
                drop(live);
                self.retire(&day)?;
            }
            drop(lock);
            self.open = None;
            return self.append(sealed);
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
            let m = file.metadata()?;
            self.open = Some(LiveFile {
                day: day.clone(),
                file,
                id: (m.dev(), m.ino()),
            });
            if m.len() > 0 && m.len() + lines.len() as u64 > self.max_bytes {
                // Opened full (another process filled it): rotate before writing.
                return self.append(sealed);
            }
        }
        let Some(live) = self.open.as_mut() else {
            unreachable!("opened above");
        };
        let before = live.file.metadata()?.len();
        if let Err(e) = live.file.write_all(lines.as_bytes()) {
            // A write cut short (a full disk) is taken back, so no half line stays behind, unless
            // another process wrote after it; the next append then reopens the file and ends the half
            // line first.
            let untouched = live
                .file
                .metadata()
                .is_ok_and(|m| m.len() <= before + lines.len() as u64);
            if !untouched || live.file.set_len(before).is_err() {
                self.open = None;
            }
            return Err(e);
        }
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
/// removes the part. A part another process is compressing (its temporary file exists) or has compressed
/// (the part is gone) is left to it.
pub fn compress(part: &Path) -> io::Result<()> {
    let mut gz_name = part.as_os_str().to_owned();
    gz_name.push(".gz");
    let gz = PathBuf::from(gz_name);
    let mut partial_name = gz.as_os_str().to_owned();
    partial_name.push(PARTIAL);
    let partial = PathBuf::from(partial_name);
    let mut source = match File::open(part) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        other => other?,
    };
    let claimed = match OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&partial)
    {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(()),
        other => other?,
    };
    let written = (|| {
        let mut encoder = GzEncoder::new(claimed, Compression::fast());
        io::copy(&mut source, &mut encoder)?;
        encoder.finish()?.sync_all()?;
        std::fs::rename(&partial, &gz)
    })();
    if let Err(e) = written {
        // Not left claimed: the next start (or rotation) tries again.
        let _ = std::fs::remove_file(&partial);
        return Err(e);
    }
    if let Some(dir) = part.parent() {
        File::open(dir)?.sync_all()?;
    }
    remove_if_present(part)
}

fn remove_if_present(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// The trail's files in `dir` in the order they were written (a day's rotated parts, then its live
/// file; days in order), each part once: a part whose compressed copy is in place is read from it (the
/// uncompressed one is about to be removed).
pub fn trail_paths(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut names = trail_names(dir)?;
    names.sort();
    let compressed: std::collections::HashSet<String> = names
        .iter()
        .filter_map(|n| n.strip_suffix(".gz").map(str::to_owned))
        .collect();
    Ok(names
        .into_iter()
        .filter(|n| !compressed.contains(n))
        .map(|n| dir.join(n))
        .collect())
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
        // A temporary file of a compression a crash cut short (old: no process is writing it).
        let torn = dir
            .path()
            .join(format!("audit.{day}.0002.jsonl.gz.partial"));
        std::fs::write(&torn, b"torn").unwrap();
        let an_hour_ago = std::time::SystemTime::now() - Duration::from_secs(3600);
        File::options()
            .write(true)
            .open(&torn)
            .unwrap()
            .set_modified(an_hour_ago)
            .unwrap();
        let mut files = TrailFiles::open(dir.path(), 4096).unwrap();
        files.finish().unwrap();
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n != ROTATE_LOCK)
            .collect();
        names.sort_unstable();
        assert_eq!(names, vec![format!("audit.{day}.0001.jsonl.gz")]);
        assert_eq!(files.last_seq_of("a.1").unwrap(), Some(2));
    }

    #[test]
    fn two_writers_sharing_a_folder_lose_and_repeat_nothing_across_their_rotations() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (chain("a.1", 60), chain("b.1", 60));
        // Two processes' writers: each rotates files the other holds open.
        let mut first = TrailFiles::open(dir.path(), 3000).unwrap();
        let mut second = TrailFiles::open(dir.path(), 3000).unwrap();
        for (x, y) in a.chunks(2).zip(b.chunks(2)) {
            first.append(x).unwrap();
            second.append(y).unwrap();
        }
        first.finish().unwrap();
        second.finish().unwrap();

        let mut names = trail_names(dir.path()).unwrap();
        names.sort_unstable();
        assert!(names.len() > 4, "{names:?}");
        assert!(
            names
                .iter()
                .all(|n| n.ends_with(".gz") || part_of(n).is_none()),
            "{names:?}"
        );
        let mut seen: std::collections::HashMap<String, Vec<i64>> = Default::default();
        for name in &names {
            for line in open_lines(&dir.path().join(name)).unwrap().lines() {
                let v: serde_json::Value = serde_json::from_str(&line.unwrap()).unwrap();
                seen.entry(v["chain_id"].as_str().unwrap().to_owned())
                    .or_default()
                    .push(v["seq"].as_i64().unwrap());
            }
        }
        let all: Vec<i64> = (1..=60).collect();
        assert_eq!(seen["a.1"], all);
        assert_eq!(seen["b.1"], all);
    }
}
