//! Runs: how both stores keep the trail. A run is a stretch of consecutive events of one chain,
//! written by one group commit, kept as one row: the hashes side by side and the canonical bodies one
//! per line (RFC 8785 JSON holds no raw line break, so a line break ends a body without ambiguity).
//! Every event stays addressable by `(chain, seq)`, by trace and by time, and verifiable on its own:
//! its bytes are stored exactly as they were hashed.
//!
//! One row per run instead of one per event is most of what a group commit costs: a commit of
//! thirty events inserts one row (and one entry per trace) instead of thirty rows and ninety index
//! entries, and writes a third fewer pages to the log.
//!
//! Runs are bounded in events ([`MAX_RUN`]) and in the time between their earliest and latest event
//! ([`MAX_SPAN_US`]), so that a run is cheap to read for one of its events and a reader by time knows
//! how far before a moment a run holding it may start.
//!
//! SQLite stores a run's bodies compressed ([`Packer`]): zlib (RFC 1950) at its fastest level, with their
//! length beside them, the form the `sqlite3` shell's `sqlar_uncompress(bodies, size)` reads. Bodies of
//! one run repeat their keys, chain, instance, trace and the previous event's hash, so they shrink about
//! six times; the database grows by a third of what it did, and every commit writes and syncs fewer
//! pages of log, which is what a commit waits for. Runs written before migration 12 stay as they were
//! (text, no length) and are read as such ([`unpack`]). PostgreSQL keeps them as text and compresses
//! them itself (a run's bodies are long enough for it; one event's never were).

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::io::Read as _;

use flate2::read::ZlibDecoder;
use flate2::{Compress, Compression, FlushCompress, Status};

use crate::event::{SealedEvent, hash_hex, micros_of, timestamp_of_micros};

/// Most events in one run: a lookup of one event reads its whole run.
pub const MAX_RUN: usize = 128;
/// Most time between the earliest and the latest event of a run, in microseconds. A reader by time
/// starts this much before the moment it wants. Events of one commit are made within a few
/// milliseconds of each other; a request's REQUEST_START made long before its decision (a slow body)
/// starts a run of its own.
pub const MAX_SPAN_US: i64 = 50_000;
/// A run's position: `chain_no × 2^40 + seq` of its first event. 2^40 events per chain is eleven years
/// at three thousand events a second; the writer opens a new chain before that.
pub const SEQ_BITS: u32 = 40;
/// Largest seq a chain may reach in this layout.
pub const MAX_SEQ: i64 = (1 << SEQ_BITS) - 1;

/// Bodies the writer puts in one run at most: a run is closed before an event would take it past this
/// (an event larger on its own is a run of its own). Events hold digests, not payloads, so a run of
/// [`MAX_RUN`] events is tens of kilobytes.
pub const RUN_BYTES: usize = 1 << 20;
/// Most bytes a stored run's bodies may inflate to. A run claiming more (damage, or a planted bomb) is
/// read as damaged rather than inflated.
pub const MAX_RUN_BYTES: i64 = 64 << 20;
/// Most bytes the runs of one page of a read may claim together ([`page_budget`]): 256 runs of
/// [`RUN_BYTES`]. Runs past it are read as damaged rather than inflated, so a page of planted bombs
/// cannot take a reader's memory.
pub const PAGE_BYTES: i64 = 256 << 20;
/// Bytes set aside before a packed run is inflated: more than a run of the writer's usually holds.
const PACKED_ROOM: i64 = 1 << 20;

/// Packs runs' bodies: zlib at its fastest level (their length goes in the `size` column). One deflate
/// state serves every run of the writer: a fresh one would allocate and clear its tables for each.
pub struct Packer(Compress);

impl Default for Packer {
    fn default() -> Self {
        Self(Compress::new(Compression::fast(), true))
    }
}

impl Packer {
    /// The stored form of `bodies`, or why deflate refused them (never seen: it takes any bytes).
    pub fn pack(&mut self, bodies: &str) -> Result<Vec<u8>, String> {
        let input = bodies.as_bytes();
        self.0.reset();
        let mut out = Vec::with_capacity(input.len() / 3 + 64);
        loop {
            let read =
                usize::try_from(self.0.total_in()).map_or(input.len(), |n| n.min(input.len()));
            match self
                .0
                .compress_vec(&input[read..], &mut out, FlushCompress::Finish)
            {
                Ok(Status::StreamEnd) => return Ok(out),
                Ok(_) => out.reserve(out.capacity().max(64)),
                Err(e) => return Err(format!("bodies not compressed: {e}")),
            }
        }
    }
}

/// A run's bodies as stored: text (runs written before migration 12, `size` NULL), or
/// [`Packer::pack`]ed bodies of `size` bytes. What does not inflate to exactly `size` bytes of UTF-8 is
/// an error naming why.
pub fn unpack(stored: &[u8], size: Option<i64>) -> Result<Cow<'_, str>, String> {
    let Some(size) = size else {
        return std::str::from_utf8(stored)
            .map(Cow::Borrowed)
            .map_err(|e| format!("bodies are not UTF-8 ({e})"));
    };
    if !(0..=MAX_RUN_BYTES).contains(&size) {
        return Err(format!("a compressed run claims {size} bytes"));
    }
    // Read one byte past the claim: more than it says is damage too.
    let limit = u64::try_from(size).unwrap_or(0) + 1;
    // Room for what a run of the writer's holds; a larger claim grows as the bytes really come, so a
    // small row lying about its size costs nothing up front.
    let mut out = Vec::with_capacity(usize::try_from(size.min(PACKED_ROOM)).unwrap_or(0));
    ZlibDecoder::new(stored)
        .take(limit)
        .read_to_end(&mut out)
        .map_err(|e| format!("a compressed run does not inflate ({e})"))?;
    if i64::try_from(out.len()) != Ok(size) {
        return Err(format!(
            "a compressed run inflates to {} bytes, not the {size} it claims",
            out.len()
        ));
    }
    String::from_utf8(out)
        .map(Cow::Owned)
        .map_err(|e| format!("a compressed run is not UTF-8 ({e})"))
}

/// Whether bodies read from a run hold no more events than a run may ([`MAX_RUN`]): checked before
/// any event is made of them, so a run of millions of empty lines is damage, not millions of events.
pub fn within_a_run(bodies: &str) -> Result<(), String> {
    let lines = bodies.bytes().filter(|&b| b == b'\n').count();
    if lines > MAX_RUN {
        return Err(format!(
            "a run holding {lines} bodies, more than a run may ({MAX_RUN})"
        ));
    }
    Ok(())
}

/// Which runs of a page may be inflated: in order, while the sizes they claim add up to at most
/// [`PAGE_BYTES`]. Each run is given as stored: its bodies and their unpacked size (none for text, whose
/// stored length is its size).
pub fn page_budget<'a>(runs: impl IntoIterator<Item = (&'a [u8], Option<i64>)>) -> Vec<bool> {
    let mut total: i64 = 0;
    runs.into_iter()
        .map(|(stored, size)| {
            let claim = size.unwrap_or_else(|| i64::try_from(stored.len()).unwrap_or(i64::MAX));
            total = total.saturating_add(claim.max(0));
            total <= PAGE_BYTES
        })
        .collect()
}

/// A stored run's bodies as a read takes them: unpacked and no more than a run may hold; or, for a run
/// that is damaged or past its page's budget ([`page_budget`]), one body saying why (its hash, the
/// run's count and time then disagree with it, and verification names the run).
pub fn readable_bodies(stored: &[u8], size: Option<i64>, in_budget: bool) -> Cow<'_, str> {
    let bodies = if in_budget {
        unpack(stored, size).and_then(|b| within_a_run(&b).map(|()| b))
    } else {
        Err(format!(
            "a run claiming {} bytes past what one read may inflate ({PAGE_BYTES})",
            size.unwrap_or(0)
        ))
    };
    bodies.unwrap_or_else(|why| format!("({why})").into())
}

/// The position of event `seq` of chain `chain_no`.
pub fn position(chain_no: i64, seq: i64) -> i64 {
    (chain_no << SEQ_BITS) + seq
}

/// The chain number and seq of a position.
pub fn split_position(pos: i64) -> (i64, i64) {
    (pos >> SEQ_BITS, pos & MAX_SEQ)
}

/// A run as it is written: its first event's seq, its events' earliest time, hashes, bodies and the
/// traces it holds.
#[derive(Debug, PartialEq, Eq)]
pub struct NewRun {
    pub first_seq: i64,
    pub count: i64,
    pub at_min: i64,
    pub hashes: Vec<u8>,
    pub bodies: String,
    pub traces: BTreeSet<String>,
}

impl NewRun {
    /// Where the run goes in chain `chain_no` (`chain_id`): refused past the last seq a position holds.
    pub fn position_in(&self, chain_no: i64, chain_id: &str) -> Result<i64, String> {
        if !(1..=MAX_SEQ).contains(&self.first_seq) || self.first_seq + self.count - 1 > MAX_SEQ {
            return Err(format!(
                "chain {chain_id} is full (at most {MAX_SEQ} events): restart to open a new chain"
            ));
        }
        Ok(position(chain_no, self.first_seq))
    }
}

/// The runs `events` (of one chain, consecutive, in order) are stored as.
pub fn runs_of(events: &[SealedEvent]) -> Vec<NewRun> {
    let mut runs: Vec<NewRun> = Vec::new();
    let mut span = (i64::MAX, i64::MIN);
    for e in events {
        let at = micros_of(&e.occurred_at).unwrap_or(0);
        let fits = runs.last().is_some_and(|r| {
            (r.count as usize) < MAX_RUN
                && r.bodies.len() + e.body.len() < RUN_BYTES
                && at.max(span.1) - at.min(span.0) <= MAX_SPAN_US
                && r.first_seq + r.count == e.seq
        });
        if !fits {
            runs.push(NewRun {
                first_seq: e.seq,
                count: 0,
                at_min: at,
                hashes: Vec::with_capacity(32 * 8),
                bodies: String::with_capacity(1024 * 8),
                traces: BTreeSet::new(),
            });
            span = (at, at);
        }
        let Some(run) = runs.last_mut() else {
            unreachable!("a run was just made")
        };
        span = (span.0.min(at), span.1.max(at));
        run.at_min = span.0;
        run.count += 1;
        let mut hash = [0u8; 32];
        // A hash that is not hex (never one the writer made) is kept as its text's bytes; the run's
        // hashes then do not split evenly and verification reports it.
        match hex::decode_to_slice(&e.hash, &mut hash) {
            Ok(()) => run.hashes.extend_from_slice(&hash),
            Err(_) => run.hashes.extend_from_slice(e.hash.as_bytes()),
        }
        run.bodies.push_str(&e.body);
        run.bodies.push('\n');
        if let Some(t) = &e.trace_id {
            run.traces.insert(t.clone());
        }
    }
    runs
}

/// The events of a stored run of `chain_id` starting at `first_seq`. A run whose parts disagree (a
/// count that is not the number of bodies, hashes that do not split evenly: damage) still yields what
/// it holds, one event per body, each with the hash found at its place (or none), so that
/// verification names the damage instead of a read failing.
pub fn events_of_run(
    chain_id: &str,
    first_seq: i64,
    hashes: &[u8],
    bodies: &str,
) -> Vec<SealedEvent> {
    let lines: Vec<&str> = bodies
        .strip_suffix('\n')
        .unwrap_or(bodies)
        .split('\n')
        .collect();
    let even = hashes.len() == 32 * lines.len();
    lines
        .iter()
        .enumerate()
        .map(|(i, body)| {
            let hash = if even {
                let mut one = [0u8; 32];
                one.copy_from_slice(&hashes[32 * i..32 * (i + 1)]);
                hash_hex(&one)
            } else if lines.len() == 1 {
                // A single event's hash kept as the bytes of a text that was not hex.
                String::from_utf8_lossy(hashes).into_owned()
            } else {
                String::new()
            };
            SealedEvent::from_stored(
                chain_id.to_owned(),
                first_seq + i as i64,
                hash,
                (*body).to_owned(),
            )
        })
        .collect()
}

/// Orders events as the trail is read by time: time, then chain, then position.
pub fn time_order(a: &SealedEvent, b: &SealedEvent) -> std::cmp::Ordering {
    (&a.occurred_at, &a.chain_id, a.seq).cmp(&(&b.occurred_at, &b.chain_id, b.seq))
}

/// The microseconds of an event's time as the trail orders it (0 for a time that cannot be read).
pub fn at_of(e: &SealedEvent) -> i64 {
    micros_of(&e.occurred_at).unwrap_or(0)
}

/// The trail timestamp of `micros` (the text of the number when it is out of range).
pub fn time_text(micros: i64) -> String {
    timestamp_of_micros(micros).unwrap_or_else(|| micros.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    use flate2::write::ZlibEncoder;

    use crate::event::{EventType, GENESIS_HASH, PendingEvent, seal};

    fn chain(n: i64, gap_us: &[(i64, i64)]) -> Vec<SealedEvent> {
        let mut prev = GENESIS_HASH.to_owned();
        let start = time::macros::datetime!(2026-01-02 03:04:05 UTC);
        (1..=n)
            .map(|seq| {
                let mut e = PendingEvent::new(
                    EventType::RequestStart,
                    None,
                    serde_json::json!({"n": seq, "text": "line\nbreak"}),
                );
                let shift = gap_us
                    .iter()
                    .filter(|(at, _)| *at <= seq)
                    .map(|(_, us)| us)
                    .sum::<i64>();
                e.occurred_at = start + time::Duration::microseconds(shift + seq);
                let s = seal(e, "c", "i", seq, &prev).unwrap();
                prev.clone_from(&s.hash);
                s
            })
            .collect()
    }

    #[test]
    fn a_run_gives_back_its_events_byte_for_byte() {
        let events = chain(5, &[]);
        let runs = runs_of(&events);
        assert_eq!(runs.len(), 1);
        let r = &runs[0];
        assert_eq!((r.first_seq, r.count, r.hashes.len()), (1, 5, 160));
        assert!(
            !events[0].body.contains('\n'),
            "a line break inside a string is escaped in canonical JSON"
        );
        assert_eq!(
            events_of_run("c", r.first_seq, &r.hashes, &r.bodies),
            events
        );
    }

    #[test]
    fn runs_are_bounded_in_events_and_in_time() {
        let events = chain(300, &[(200, MAX_SPAN_US + 1)]);
        let runs = runs_of(&events);
        let sizes: Vec<i64> = runs.iter().map(|r| r.count).collect();
        assert_eq!(
            sizes,
            [128, 71, 101],
            "128 at most; a new run where time jumps"
        );
        let firsts: Vec<i64> = runs.iter().map(|r| r.first_seq).collect();
        assert_eq!(firsts, [1, 129, 200]);
        let back: Vec<SealedEvent> = runs
            .iter()
            .flat_map(|r| events_of_run("c", r.first_seq, &r.hashes, &r.bodies))
            .collect();
        assert_eq!(back, events);
    }

    #[test]
    fn a_damaged_run_still_gives_one_event_per_body() {
        let events = chain(3, &[]);
        let r = &runs_of(&events)[0];
        let short = &r.hashes[..64];
        let back = events_of_run("c", 1, short, &r.bodies);
        assert_eq!(back.len(), 3);
        assert!(back.iter().all(|e| e.hash.is_empty()));
        let mut extra = r.bodies.clone();
        extra.push_str("{}\n");
        assert_eq!(events_of_run("c", 1, &r.hashes, &extra).len(), 4);
    }

    #[test]
    fn positions_keep_chain_and_seq_apart() {
        assert_eq!(split_position(position(7, 12)), (7, 12));
        assert!(position(7, MAX_SEQ) < position(8, 1));
    }

    #[test]
    fn packed_bodies_come_back_byte_for_byte_and_smaller() {
        let r = &runs_of(&chain(40, &[]))[0];
        let mut packer = Packer::default();
        let packed = packer.pack(&r.bodies).unwrap();
        assert!(
            packed.len() * 3 < r.bodies.len(),
            "{} bytes packed from {}",
            packed.len(),
            r.bodies.len()
        );
        let size = Some(r.bodies.len() as i64);
        assert_eq!(unpack(&packed, size).unwrap(), r.bodies);
        // Bodies stored before compression (no size) are read as the text they are.
        assert_eq!(unpack(r.bodies.as_bytes(), None).unwrap(), r.bodies);
        // The packer's state carries nothing from one run to the next.
        let other = &runs_of(&chain(3, &[]))[0];
        let packed_other = packer.pack(&other.bodies).unwrap();
        assert_eq!(packed_other, Packer::default().pack(&other.bodies).unwrap());
        assert_eq!(packer.pack(&r.bodies).unwrap(), packed);
        let empty = packer.pack("").unwrap();
        assert_eq!(unpack(&empty, Some(0)).unwrap(), "");
    }

    #[test]
    fn a_damaged_or_lying_packed_run_is_an_error_not_a_guess() {
        let bodies = runs_of(&chain(10, &[])).remove(0).bodies;
        let packed = Packer::default().pack(&bodies).unwrap();
        let size = bodies.len() as i64;
        let mut flipped = packed.clone();
        let mid = flipped.len() / 2;
        flipped[mid] ^= 0x40;
        assert!(
            unpack(&flipped, Some(size)).is_err(),
            "the checksum catches a flipped byte"
        );
        assert!(
            unpack(&packed, Some(size - 1))
                .unwrap_err()
                .contains("not the")
        );
        assert!(
            unpack(&packed, Some(size + 1))
                .unwrap_err()
                .contains("not the")
        );
        assert!(
            unpack(&packed, Some(MAX_RUN_BYTES + 1))
                .unwrap_err()
                .contains("claims")
        );
        assert!(unpack(&packed[..packed.len() - 3], Some(size)).is_err());
        // A bomb (kilobytes that would inflate to 16 MiB) stops one byte past the claim.
        let mut z = ZlibEncoder::new(Vec::new(), Compression::best());
        for _ in 0..16 {
            z.write_all(&[b'a'; 1 << 20]).unwrap();
        }
        let bomb = z.finish().unwrap();
        assert!(bomb.len() < 64 << 10);
        assert!(
            unpack(&bomb, Some(1000))
                .unwrap_err()
                .contains("not the 1000")
        );
    }

    #[test]
    fn a_run_is_closed_before_its_bodies_pass_a_mebibyte() {
        let big = "x".repeat(300_000);
        let mut prev = GENESIS_HASH.to_owned();
        // One moment for all: only their size may close a run (a slow build once spread them past a
        // run's 50 ms).
        let at = time::macros::datetime!(2026-01-02 03:04:05 UTC);
        let events: Vec<SealedEvent> = (1..=8)
            .map(|seq| {
                let mut e = PendingEvent::new(
                    EventType::RequestStart,
                    None,
                    serde_json::json!({ "text": big }),
                );
                e.occurred_at = at;
                let s = seal(e, "c", "i", seq, &prev).unwrap();
                prev.clone_from(&s.hash);
                s
            })
            .collect();
        let runs = runs_of(&events);
        assert_eq!(runs.iter().map(|r| r.count).collect::<Vec<_>>(), [3, 3, 2]);
        assert!(runs.iter().all(|r| r.bodies.len() < RUN_BYTES));
        // One event larger than a run's share is a run of its own.
        let huge = PendingEvent::new(
            EventType::RequestStart,
            None,
            serde_json::json!({ "text": "y".repeat(RUN_BYTES) }),
        );
        let huge = seal(huge, "c", "i", 9, &prev).unwrap();
        let mut with_huge = events.clone();
        with_huge.push(huge);
        assert_eq!(runs_of(&with_huge).last().map(|r| r.count), Some(1));
    }

    #[test]
    fn a_read_inflates_no_more_bodies_than_runs_and_pages_may_hold() {
        assert!(within_a_run(&"{}\n".repeat(MAX_RUN)).is_ok());
        let flood = "\n".repeat(MAX_RUN + 1);
        assert!(
            within_a_run(&flood)
                .unwrap_err()
                .contains("more than a run may")
        );
        let third = PAGE_BYTES / 3;
        let claims = |sizes: &[i64]| page_budget(sizes.iter().map(|&n| (&[][..], Some(n))));
        assert_eq!(
            claims(&[third, third, third, 2, 1, -5]),
            [true, true, true, false, false, false]
        );
        assert_eq!(claims(&[i64::MAX, 1]), [false, false]);
        // Text runs claim their stored length.
        assert_eq!(page_budget([(&b"{}\n"[..], None)]), [true]);
    }
}
