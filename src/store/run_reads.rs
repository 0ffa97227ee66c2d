//! Reading a trail kept in runs (see [`super::runs`]), the same for both backends: each backend says how
//! to fetch a page of runs ([`RunSource`]), and the walks here turn pages of runs into the events asked
//! for, by chain and seq, by trace and by time.

use async_trait::async_trait;

use super::runs::{
    MAX_SEQ, MAX_SPAN_US, at_of, events_of_run, page_budget, readable_bodies, split_position,
    time_order, time_text,
};
use super::{ChainTail, StoreError};
use crate::event::{SealedEvent, map_in_two, micros_of};

/// A stored run: its earliest time, event count, chain, position, hashes, bodies as stored (packed, or
/// text) and their unpacked size (none for text).
pub type RunRow = (i64, i64, String, i64, Vec<u8>, Vec<u8>, Option<i64>);

/// Rows read at a time when runs are walked by time or along a chain.
pub const RUN_PAGE: i64 = 256;

/// How a backend fetches runs; every answer is at most [`RUN_PAGE`] rows.
#[async_trait]
pub trait RunSource: Sync {
    /// Where reading `limit` events of `chain_id` after `after_seq` goes, as positions (see
    /// [`RunSpan`]); `None` for a chain the store does not know.
    async fn span_after(
        &self,
        chain_id: &str,
        after_seq: i64,
        limit: i64,
    ) -> Result<Option<RunSpan>, StoreError>;
    /// Runs at positions in `[from, to)`, by position.
    async fn runs_within(&self, from: i64, to: i64) -> Result<Vec<RunRow>, StoreError>;
    /// Positions and hashes of the runs at positions in `[from, to)`, by position.
    async fn hashes_within(&self, from: i64, to: i64) -> Result<Vec<(i64, Vec<u8>)>, StoreError>;
    /// Runs whose `(at_min, pos)` is before `key`, latest first.
    async fn runs_before(&self, key: (i64, i64)) -> Result<Vec<RunRow>, StoreError>;
    /// Runs whose `(at_min, pos)` is after `key` and that start before `until`, earliest first.
    async fn runs_after(&self, key: (i64, i64), until: i64) -> Result<Vec<RunRow>, StoreError>;
    /// Every run holding an event of `trace_id`.
    async fn runs_of_trace(&self, trace_id: &str) -> Result<Vec<RunRow>, StoreError>;
    /// The last run of the chain `instance_id` opened last.
    async fn last_run_of_instance(&self, instance_id: &str) -> Result<Vec<RunRow>, StoreError>;
}

/// Implements [`RunSource`] for a store with a `pool` field, in SQL both backends read (parameters
/// `$n`, bound in order); `select_runs!`, defined by the backend where this is used, starts a read of
/// [`RunRow`]'s columns from the runs `r` joined with their chains `c`.
macro_rules! run_source {
    ($store:ty) => {
        #[async_trait::async_trait]
        impl $crate::store::run_reads::RunSource for $store {
            async fn span_after(
                &self,
                chain_id: &str,
                after_seq: i64,
                limit: i64,
            ) -> Result<Option<$crate::store::run_reads::RunSpan>, StoreError> {
                use $crate::store::runs::position;
                let Some(chain_no): Option<i64> =
                    sqlx::query_scalar("SELECT chain_no FROM audit_chains WHERE chain_id = $1")
                        .bind(chain_id)
                        .fetch_optional(&self.pool)
                        .await?
                else {
                    return Ok(None);
                };
                let next = $crate::store::run_reads::next_seq(after_seq);
                let holding: Option<i64> = sqlx::query_scalar(
                    "SELECT max(pos) FROM audit_runs WHERE pos >= $1 AND pos <= $2",
                )
                .bind(position(chain_no, 0))
                .bind(position(chain_no, next))
                .fetch_one(&self.pool)
                .await?;
                Ok(Some($crate::store::run_reads::RunSpan::new(
                    chain_no, after_seq, limit, holding,
                )))
            }

            async fn runs_within(
                &self,
                from: i64,
                to: i64,
            ) -> Result<Vec<$crate::store::run_reads::RunRow>, StoreError> {
                Ok(sqlx::query_as(select_runs!(
                    "WHERE r.pos >= $1 AND r.pos < $2 ORDER BY r.pos LIMIT $3"
                ))
                .bind(from)
                .bind(to)
                .bind($crate::store::run_reads::RUN_PAGE)
                .fetch_all(&self.pool)
                .await?)
            }

            async fn hashes_within(
                &self,
                from: i64,
                to: i64,
            ) -> Result<Vec<(i64, Vec<u8>)>, StoreError> {
                Ok(sqlx::query_as(
                    "SELECT pos, hashes FROM audit_runs WHERE pos >= $1 AND pos < $2 \
                     ORDER BY pos LIMIT $3",
                )
                .bind(from)
                .bind(to)
                .bind($crate::store::run_reads::RUN_PAGE)
                .fetch_all(&self.pool)
                .await?)
            }

            async fn runs_before(
                &self,
                key: (i64, i64),
            ) -> Result<Vec<$crate::store::run_reads::RunRow>, StoreError> {
                Ok(sqlx::query_as(select_runs!(
                    "WHERE (r.at_min, r.pos) < ($1, $2) \
                     ORDER BY r.at_min DESC, r.pos DESC LIMIT $3"
                ))
                .bind(key.0)
                .bind(key.1)
                .bind($crate::store::run_reads::RUN_PAGE)
                .fetch_all(&self.pool)
                .await?)
            }

            async fn runs_after(
                &self,
                key: (i64, i64),
                until: i64,
            ) -> Result<Vec<$crate::store::run_reads::RunRow>, StoreError> {
                Ok(sqlx::query_as(select_runs!(
                    "WHERE (r.at_min, r.pos) > ($1, $2) AND r.at_min < $3 \
                     ORDER BY r.at_min, r.pos LIMIT $4"
                ))
                .bind(key.0)
                .bind(key.1)
                .bind(until)
                .bind($crate::store::run_reads::RUN_PAGE)
                .fetch_all(&self.pool)
                .await?)
            }

            async fn runs_of_trace(
                &self,
                trace_id: &str,
            ) -> Result<Vec<$crate::store::run_reads::RunRow>, StoreError> {
                Ok(sqlx::query_as(select_runs!(
                    "WHERE r.pos IN (SELECT pos FROM audit_run_traces WHERE trace_id = $1)"
                ))
                .bind(trace_id)
                .fetch_all(&self.pool)
                .await?)
            }

            async fn last_run_of_instance(
                &self,
                instance_id: &str,
            ) -> Result<Vec<$crate::store::run_reads::RunRow>, StoreError> {
                Ok(sqlx::query_as(select_runs!(
                    "WHERE c.chain_no = (SELECT chain_no FROM audit_chains WHERE instance_id = $1 \
                                         ORDER BY opened_at DESC, chain_id DESC LIMIT 1) \
                       AND r.pos >= c.chain_no << 40 AND r.pos < (c.chain_no + 1) << 40 \
                     ORDER BY r.pos DESC LIMIT 1"
                ))
                .bind(instance_id)
                .fetch_all(&self.pool)
                .await?)
            }
        }
    };
}
pub(super) use run_source;

/// The events of `rows`, in the rows' order, read on both cores when there are many. A run's count or
/// earliest time that disagrees with what its bodies say is shown on its first event (its id or time
/// then disagree with its bytes), so that verification reports it there.
pub fn expand(rows: &[RunRow]) -> Vec<SealedEvent> {
    let budget = page_budget(rows.iter().map(|r| (r.5.as_slice(), r.6)));
    let rows: Vec<(&RunRow, bool)> = rows.iter().zip(budget).collect();
    let events = map_in_two(
        &rows,
        |((at_min, n, chain_id, pos, hashes, bodies, size), in_budget)| {
            let (_, first_seq) = split_position(*pos);
            let bodies = readable_bodies(bodies, *size, *in_budget);
            let mut events = events_of_run(chain_id, first_seq, hashes, &bodies);
            let at = events.iter().map(at_of).min();
            let events_len = events.len();
            let count_agrees = i64::try_from(events_len) == Ok(*n);
            if let Some(first) = events.first_mut() {
                if at != Some(*at_min) {
                    first.occurred_at = time_text(*at_min);
                }
                if !count_agrees {
                    // Not the identity its bytes give it: verification names the row as edited.
                    first.event_id = format!("(a run of {n} events holding {})", events_len);
                }
            }
            events
        },
    );
    events.into_iter().flatten().collect()
}

/// A time bound of a query as the trail's time column holds it.
fn micros(at: &str) -> Result<i64, StoreError> {
    micros_of(at).ok_or_else(|| StoreError::Corrupt(format!("not a time: {at:?}")))
}

/// Positions of runs to read, `[from, end)`, most likely all wanted before `likely_end`: from the run
/// that holds the next event (it may start before it), through the runs starting at or before the
/// last seq wanted (where the events sought are, unless seqs were forged apart), then on to the chain's
/// end. (A page of runs read without the middle bound was expanded whole for a few events, then mostly
/// dropped: verification expanded three times the events it checked.)
pub struct RunSpan {
    pub from: i64,
    pub likely_end: i64,
    pub end: i64,
}

impl RunSpan {
    /// The span of chain `chain_no` after `after_seq` for `limit` events, given the position of the
    /// run holding the next event (if any).
    pub fn new(chain_no: i64, after_seq: i64, limit: i64, holding: Option<i64>) -> Self {
        let last = after_seq.saturating_add(limit.max(0)).clamp(0, MAX_SEQ);
        Self {
            from: holding.unwrap_or(super::runs::position(chain_no, next_seq(after_seq))),
            likely_end: super::runs::position(chain_no, last) + 1,
            end: super::runs::position(chain_no + 1, 0),
        }
    }

    /// The end of the next read from `from`.
    fn upto(&self) -> i64 {
        if self.from < self.likely_end {
            self.likely_end
        } else {
            self.end
        }
    }

    /// Moves past a read that returned `rows` rows, the last at `last`; false at the chain's end.
    fn advance(&mut self, rows: usize, last: Option<i64>) -> bool {
        match last {
            Some(last) if rows as i64 == RUN_PAGE => {
                self.from = last + 1;
                true
            }
            _ if self.from < self.likely_end => {
                self.from = self.likely_end;
                true
            }
            _ => false,
        }
    }
}

/// The seq after `after_seq`, within the seqs a position holds.
pub fn next_seq(after_seq: i64) -> i64 {
    after_seq.clamp(0, MAX_SEQ - 1) + 1
}

/// Up to `limit` events of `chain_id` after `after_seq`, in order.
pub async fn chain_events(
    src: &impl RunSource,
    chain_id: &str,
    after_seq: i64,
    limit: i64,
) -> Result<Vec<SealedEvent>, StoreError> {
    let Some(mut span) = src.span_after(chain_id, after_seq, limit).await? else {
        return Ok(Vec::new());
    };
    let limit = usize::try_from(limit.max(0)).unwrap_or(usize::MAX);
    let mut events: Vec<SealedEvent> = Vec::new();
    while events.len() < limit {
        let rows = src.runs_within(span.from, span.upto()).await?;
        events.extend(expand(&rows).into_iter().filter(|e| e.seq > after_seq));
        if !span.advance(rows.len(), rows.last().map(|r| r.3)) {
            break;
        }
    }
    events.truncate(limit);
    Ok(events)
}

/// Up to `limit` seqs and hashes of `chain_id` after `after_seq`, in order.
pub async fn chain_hashes(
    src: &impl RunSource,
    chain_id: &str,
    after_seq: i64,
    limit: i64,
) -> Result<Vec<(i64, String)>, StoreError> {
    let Some(mut span) = src.span_after(chain_id, after_seq, limit).await? else {
        return Ok(Vec::new());
    };
    let limit = usize::try_from(limit.max(0)).unwrap_or(usize::MAX);
    let mut found = Vec::new();
    while found.len() < limit {
        let rows = src.hashes_within(span.from, span.upto()).await?;
        for (pos, hashes) in &rows {
            let first = pos & MAX_SEQ;
            for (seq, hash) in (first..).zip(hashes.chunks(32)) {
                if seq > after_seq && found.len() < limit {
                    found.push((seq, hex::encode(hash)));
                }
            }
        }
        if !span.advance(rows.len(), rows.last().map(|r| r.0)) {
            break;
        }
    }
    Ok(found)
}

/// The last event of the chain `instance_id` opened last.
pub async fn latest_chain_tail(
    src: &impl RunSource,
    instance_id: &str,
) -> Result<Option<ChainTail>, StoreError> {
    let rows = src.last_run_of_instance(instance_id).await?;
    Ok(expand(&rows).pop().map(|last| ChainTail {
        chain_id: last.chain_id,
        seq: last.seq,
        hash: last.hash,
    }))
}

/// Every event of `trace_id`, by time.
pub async fn events_for_trace(
    src: &impl RunSource,
    trace_id: &str,
) -> Result<Vec<SealedEvent>, StoreError> {
    let rows = src.runs_of_trace(trace_id).await?;
    let mut events: Vec<SealedEvent> = expand(&rows)
        .into_iter()
        .filter(|e| e.trace_id.as_deref() == Some(trace_id))
        .collect();
    events.sort_by(time_order);
    Ok(events)
}

/// Up to `limit` events before the cursor `(time, chain, seq)` (or the latest), latest first.
pub async fn events_before(
    src: &impl RunSource,
    before: Option<(&str, &str, i64)>,
    limit: i64,
) -> Result<Vec<SealedEvent>, StoreError> {
    let limit = usize::try_from(limit.max(0)).unwrap_or(usize::MAX);
    let cursor = before.map(|(at, chain, seq)| (at.to_owned(), chain.to_owned(), seq));
    // Runs newest first by their earliest time, from the cursor's moment down. An unread run starts no
    // later than the last one read, so it holds nothing later than that start plus the longest span of
    // a run: what was gathered past that is final.
    let mut key = match before {
        Some((at, _, _)) => (micros(at)?, i64::MAX),
        None => (i64::MAX, i64::MAX),
    };
    let mut found: Vec<SealedEvent> = Vec::new();
    loop {
        let rows = src.runs_before(key).await?;
        let done = (rows.len() as i64) < RUN_PAGE;
        found.extend(expand(&rows).into_iter().filter(|e| {
            cursor.as_ref().is_none_or(|(at, chain, seq)| {
                (&e.occurred_at, &e.chain_id, e.seq) < (at, chain, *seq)
            })
        }));
        let horizon = match rows.last() {
            Some(last) if !done => last.0.saturating_add(MAX_SPAN_US),
            _ => i64::MIN,
        };
        let ready = found.iter().filter(|e| at_of(e) > horizon).count();
        if done || ready >= limit {
            found.retain(|e| at_of(e) > horizon);
            found.sort_by(|a, b| time_order(b, a));
            found.truncate(limit);
            return Ok(found);
        }
        if let Some(last) = rows.last() {
            key = (last.0, last.3);
        }
    }
}

/// Up to `limit` events from `since` (inclusive) to `until` (exclusive), after the cursor
/// `(time, chain, seq)` if any, earliest first.
pub async fn events_between(
    src: &impl RunSource,
    since: &str,
    until: &str,
    after: Option<(&str, &str, i64)>,
    limit: i64,
) -> Result<Vec<SealedEvent>, StoreError> {
    let limit = usize::try_from(limit.max(0)).unwrap_or(usize::MAX);
    let (since_us, until_us) = (micros(since)?, micros(until)?);
    let cursor = after.map(|(at, chain, seq)| (at.to_owned(), chain.to_owned(), seq));
    let lower = match after {
        Some((at, _, _)) => micros(at)?.max(since_us),
        None => since_us,
    };
    // Runs oldest first by their earliest time, from the longest span of a run before the first moment
    // wanted. An unread run starts no earlier than the last one read, so what was gathered before that
    // start is final.
    let mut key = (lower.saturating_sub(MAX_SPAN_US + 1), i64::MAX);
    let mut found: Vec<SealedEvent> = Vec::new();
    loop {
        let rows = src.runs_after(key, until_us).await?;
        let done = (rows.len() as i64) < RUN_PAGE;
        found.extend(expand(&rows).into_iter().filter(|e| {
            let at = at_of(e);
            at >= since_us
                && at < until_us
                && cursor.as_ref().is_none_or(|(at, chain, seq)| {
                    (&e.occurred_at, &e.chain_id, e.seq) > (at, chain, *seq)
                })
        }));
        let horizon = match rows.last() {
            Some(last) if !done => last.0,
            _ => i64::MAX,
        };
        let ready = found.iter().filter(|e| at_of(e) < horizon).count();
        if done || ready >= limit {
            found.retain(|e| at_of(e) < horizon);
            found.sort_by(time_order);
            found.truncate(limit);
            return Ok(found);
        }
        if let Some(last) = rows.last() {
            key = (last.0, last.3);
        }
    }
}

/// A chain `chain_id` of `n` events of the instance `old`, all but the first of `trace`: a trail as an
/// older layout held it, for the tests of carrying one over.
#[cfg(test)]
pub fn old_chain(chain_id: &str, n: i64, trace: &crate::domain::TraceId) -> Vec<SealedEvent> {
    let mut prev = crate::event::GENESIS_HASH.to_owned();
    (1..=n)
        .map(|seq| {
            let (kind, trace) = if seq == 1 {
                (crate::event::EventType::ChainOpened, None)
            } else {
                (crate::event::EventType::RequestStart, Some(trace))
            };
            let e = crate::event::PendingEvent::new(
                kind,
                trace,
                serde_json::json!({"n": seq, "text": "é\"x"}),
            );
            let s = crate::event::seal(e, chain_id, "old", seq, &prev).unwrap();
            prev.clone_from(&s.hash);
            s
        })
        .collect()
}
