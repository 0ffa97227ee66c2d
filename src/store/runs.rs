//! Runs: how the SQLite trail stores events. A run is a stretch of consecutive events of one chain,
//! written by one group commit, kept as one row: the hashes side by side and the canonical bodies one
//! per line (RFC 8785 JSON holds no raw line break, so a line break ends a body without ambiguity).
//! Every event stays addressable by `(chain, seq)`, by trace and by time, and verifiable on its own:
//! its bytes are stored exactly as they were hashed.
//!
//! One row per run instead of one per event is most of what a group commit costs SQLite: a commit of
//! thirty events inserts one row (and one entry per trace) instead of thirty rows and ninety index
//! entries, and writes a third fewer pages to the log.
//!
//! Runs are bounded in events ([`MAX_RUN`]) and in the time between their earliest and latest event
//! ([`MAX_SPAN_US`]), so that a run is cheap to read for one of its events and a reader by time knows
//! how far before a moment a run holding it may start.

use std::collections::BTreeSet;

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

/// The runs `events` (of one chain, consecutive, in order) are stored as.
pub fn runs_of(events: &[SealedEvent]) -> Vec<NewRun> {
    let mut runs: Vec<NewRun> = Vec::new();
    let mut span = (i64::MAX, i64::MIN);
    for e in events {
        let at = micros_of(&e.occurred_at).unwrap_or(0);
        let fits = runs.last().is_some_and(|r| {
            (r.count as usize) < MAX_RUN
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
}
