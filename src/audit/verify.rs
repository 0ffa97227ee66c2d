//! `catraca audit verify`: recompute every hash from the stored bytes, check contiguous `seq`, each
//! `prev_hash` link, that stored columns agree with the hashed bytes, and that chains link across
//! restarts (each CHAIN_OPENED names the previous chain's last event). The first problem is reported
//! with its `(chain_id, seq)` and a distinct exit code per kind.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::io::BufRead;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use time::OffsetDateTime;

use super::anchored::{self, Anchors, ChainAnchors};
use super::finding::finding;
pub use super::finding::{Finding, Problem};
use crate::audit::{files, timestamp};
use crate::event::{GENESIS_HASH, SealedEvent, chain_hash, map_in_two};
use crate::store::{Store, StoreError, Verification};

/// What a verification saw.
#[derive(Debug, Default)]
pub struct Report {
    pub chains: usize,
    pub events: u64,
    pub elapsed: Duration,
    /// `None` when everything is intact.
    pub finding: Option<Finding>,
}

impl Report {
    /// What the store keeps of this report (the console's last verification).
    pub fn summary(&self, source: &str) -> Verification {
        Verification {
            verified_at: timestamp(OffsetDateTime::now_utc()),
            ok: self.finding.is_none(),
            chains: i64::try_from(self.chains).unwrap_or(i64::MAX),
            events: i64::try_from(self.events).unwrap_or(i64::MAX),
            duration_ms: i64::try_from(self.elapsed.as_millis()).unwrap_or(i64::MAX),
            finding: self.finding.as_ref().map(|f| {
                format!(
                    "{} at chain {} seq {}: {}",
                    f.problem.as_str(),
                    f.chain_id,
                    f.seq,
                    f.message
                )
            }),
            source: source.to_owned(),
        }
    }
}

/// A chain's claim, in its CHAIN_OPENED, about where its predecessor ended.
#[derive(Debug, Clone)]
struct Claim {
    chain_id: String,
    previous_chain_id: String,
    previous_seq: i64,
    previous_hash: String,
}

/// What verification reads of an event's hashed bytes: the envelope and, in a CHAIN_OPENED, the claim
/// about the previous chain. Borrowed where no unescaping is needed; every other member is skipped
/// without being built.
#[derive(serde::Deserialize)]
struct Hashed<'a> {
    #[serde(borrow, default)]
    chain_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    prev_hash: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    event_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    event_type: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    occurred_at: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    instance_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    trace_id: Option<Cow<'a, str>>,
    #[serde(default)]
    seq: Option<Value>,
    #[serde(borrow, default)]
    previous_chain_id: Option<Cow<'a, str>>,
    #[serde(default)]
    previous_seq: Option<Value>,
    #[serde(borrow, default)]
    previous_hash: Option<Cow<'a, str>>,
}

/// Checks the events of one chain in stored order.
struct ChainChecker {
    chain_id: String,
    /// Where the next event should be; `None` until the first event is seen.
    expected: Option<i64>,
    last_hash: Option<String>,
    /// Whether the chain must start at seq 1 (database) or may start anywhere (a rotated file).
    must_start_at_one: bool,
    /// Positions later chains claim, filled in as they pass.
    wanted: HashMap<i64, Option<String>>,
    last_seq: i64,
    /// The first seq seen (a file's chain may begin mid-way).
    first_seq: Option<i64>,
    /// The chain's signed checkpoints, when it is held to them.
    anchors: Option<ChainAnchors>,
}

impl ChainChecker {
    fn new(chain_id: &str, must_start_at_one: bool, wanted: impl IntoIterator<Item = i64>) -> Self {
        Self {
            chain_id: chain_id.to_owned(),
            expected: None,
            last_hash: None,
            must_start_at_one,
            wanted: wanted.into_iter().map(|s| (s, None)).collect(),
            last_seq: 0,
            first_seq: None,
            anchors: None,
        }
    }

    /// Checks one event; returns the CHAIN_OPENED claim it carries, if any.
    fn check(&mut self, e: &SealedEvent) -> Result<Option<Claim>, Finding> {
        let inspected = inspect(&self.chain_id, e)?;
        self.follow(e, inspected)
    }

    /// Checks a page of events in order, each event's own checks spread over two threads; the first
    /// problem in chain order is the one reported, as if the events had been checked one by one.
    fn check_page(&mut self, page: &[SealedEvent], seen: &mut u64) -> Result<(), Finding> {
        let chain_id = self.chain_id.as_str();
        let inspected = map_in_two(page, |e| inspect(chain_id, e));
        for (e, inspected) in page.iter().zip(inspected) {
            *seen += 1;
            self.follow(e, inspected?)?;
        }
        Ok(())
    }

    /// The checks that need the events before this one: position, links, a chain's first event.
    fn follow(&mut self, e: &SealedEvent, inspected: Inspected) -> Result<Option<Claim>, Finding> {
        let at = |problem, msg: String| finding(problem, &self.chain_id, e.seq, msg);
        if self.last_hash.is_some() && self.last_seq == i64::MAX {
            return Err(at(
                Problem::Reorder,
                "an event follows the largest possible seq: the chain's seq was forged".into(),
            ));
        }
        match self.expected {
            None if self.must_start_at_one && e.seq != 1 => {
                return Err(at(
                    Problem::Truncation,
                    format!(
                        "the chain starts at seq {} instead of 1: its head was removed",
                        e.seq
                    ),
                ));
            }
            Some(expected) if e.seq < expected => {
                return Err(at(
                    Problem::Reorder,
                    format!(
                        "seq {} comes after seq {}: events are out of order",
                        e.seq,
                        expected.saturating_sub(1)
                    ),
                ));
            }
            Some(expected) if e.seq > expected => {
                return Err(finding(
                    Problem::Gap,
                    &self.chain_id,
                    expected,
                    format!("events {expected}..{} are missing", e.seq.saturating_sub(1)),
                ));
            }
            _ => {}
        }
        if let Some(last) = &self.last_hash
            && *last != e.prev_hash
        {
            return Err(finding(
                Problem::BrokenLink,
                &self.chain_id,
                e.seq.saturating_sub(1),
                format!(
                    "event {} does not link to event {}: event {} was replaced or forged",
                    e.seq,
                    e.seq.saturating_sub(1),
                    e.seq.saturating_sub(1)
                ),
            ));
        }
        let mut claim = None;
        if e.seq == 1 {
            if e.event_type != "CHAIN_OPENED" {
                return Err(at(
                    Problem::Truncation,
                    "the chain's first event is not CHAIN_OPENED: its head was replaced".into(),
                ));
            }
            let previous_hash = inspected.previous_hash.as_deref();
            if e.prev_hash != previous_hash.unwrap_or(GENESIS_HASH) {
                return Err(at(
                    Problem::BrokenLink,
                    "CHAIN_OPENED's prev_hash is not the previous chain's last hash".into(),
                ));
            }
            if let (Some(chain), Some(seq), Some(hash)) = (
                inspected.previous_chain_id.as_deref(),
                inspected.previous_seq,
                previous_hash,
            ) {
                claim = Some(Claim {
                    chain_id: e.chain_id.clone(),
                    previous_chain_id: chain.to_owned(),
                    previous_seq: seq,
                    previous_hash: hash.to_owned(),
                });
            }
        }
        if let Some(slot) = self.wanted.get_mut(&e.seq) {
            *slot = Some(e.hash.clone());
        }
        // A forged line may carry any seq, up to i64::MAX: saturate rather than overflow.
        if let Some(anchors) = self.anchors.as_mut() {
            anchors.follow(&self.chain_id, e.seq, &e.hash);
        }
        self.expected = Some(e.seq.saturating_add(1));
        self.last_hash = Some(e.hash.clone());
        self.last_seq = e.seq;
        self.first_seq.get_or_insert(e.seq);
        Ok(claim)
    }
}

/// What an event's own checks keep for the checks that follow: a CHAIN_OPENED's claim.
#[derive(Default)]
struct Inspected {
    previous_chain_id: Option<String>,
    previous_seq: Option<i64>,
    previous_hash: Option<String>,
}

/// The checks an event passes on its own: its bytes hash to its hash, its columns agree with its bytes,
/// and it sits where its bytes say.
fn inspect(chain_id: &str, e: &SealedEvent) -> Result<Inspected, Finding> {
    let at = |problem, msg: String| finding(problem, chain_id, e.seq, msg);
    if chain_hash(&e.prev_hash, &e.body) != e.hash {
        return Err(at(
            Problem::HashMismatch,
            "the event's bytes do not hash to its stored hash: the event was altered".into(),
        ));
    }
    let body: Hashed<'_> = serde_json::from_str(&e.body).map_err(|err| {
        at(
            Problem::HashMismatch,
            format!("the stored bytes are not an event's JSON: {err}"),
        )
    })?;
    if body.chain_id.as_deref() != Some(e.chain_id.as_str())
        || body.prev_hash.as_deref() != Some(e.prev_hash.as_str())
        || body.event_id.as_deref() != Some(e.event_id.as_str())
        || body.event_type.as_deref() != Some(e.event_type.as_str())
        || body.occurred_at.as_deref() != Some(e.occurred_at.as_str())
        || body.instance_id.as_deref() != Some(e.instance_id.as_str())
        || body.trace_id.as_deref() != e.trace_id.as_deref()
    {
        return Err(at(
            Problem::HashMismatch,
            "a stored column disagrees with the hashed bytes: the row was edited".into(),
        ));
    }
    let own_seq = body.seq.as_ref().and_then(Value::as_i64);
    if own_seq != Some(e.seq) {
        return Err(at(
            Problem::Reorder,
            format!(
                "position {} holds the event hashed as seq {}: events were moved",
                e.seq,
                own_seq.map_or_else(|| "?".to_owned(), |s| s.to_string())
            ),
        ));
    }
    if e.seq != 1 {
        return Ok(Inspected::default());
    }
    Ok(Inspected {
        previous_chain_id: body.previous_chain_id.map(Cow::into_owned),
        previous_seq: body.previous_seq.as_ref().and_then(Value::as_i64),
        previous_hash: body.previous_hash.map(Cow::into_owned),
    })
}

/// Checks that each claim points at an existing event with the claimed hash.
fn check_claims(claims: &[Claim], chains: &HashMap<String, ChainChecker>) -> Option<Finding> {
    for c in claims {
        let Some(prev) = chains.get(&c.previous_chain_id) else {
            return Some(finding(
                Problem::Truncation,
                &c.previous_chain_id,
                c.previous_seq,
                format!(
                    "chain {} names this chain as its predecessor, but it is gone",
                    c.chain_id
                ),
            ));
        };
        match prev.wanted.get(&c.previous_seq).cloned().flatten() {
            None => {
                return Some(finding(
                    Problem::Truncation,
                    &c.previous_chain_id,
                    prev.last_seq + 1,
                    format!(
                        "chain {} says this chain reached seq {}, but it ends at {}: its tail was removed",
                        c.chain_id, c.previous_seq, prev.last_seq
                    ),
                ));
            }
            Some(hash) if hash != c.previous_hash => {
                return Some(finding(
                    Problem::BrokenLink,
                    &c.chain_id,
                    1,
                    format!(
                        "CHAIN_OPENED names {}:{} with a hash that event does not have",
                        c.previous_chain_id, c.previous_seq
                    ),
                ));
            }
            Some(_) => {}
        }
    }
    None
}

/// Events read per page; bounds memory whatever the size of the trail.
pub const PAGE: i64 = 10_000;
/// How often progress is reported.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// Verifies every chain in the store. `progress` is called about once a second with the events so far.
pub async fn verify_store(
    store: &dyn Store,
    progress: impl FnMut(u64),
) -> Result<Report, StoreError> {
    verify_store_in_pages(store, PAGE, progress).await
}

/// [`verify_store`], reading at most `page` events at a time (the result does not depend on it).
pub async fn verify_store_in_pages(
    store: &dyn Store,
    page: i64,
    progress: impl FnMut(u64),
) -> Result<Report, StoreError> {
    verify_store_anchored(store, None, page, progress).await
}

/// [`verify_store_in_pages`], also holding every chain to its signed checkpoints and to the copies of
/// them kept outside the database (see [`super::anchored`]), when `anchors` says with which key.
pub async fn verify_store_anchored(
    store: &dyn Store,
    anchors: Option<&Anchors>,
    page: i64,
    mut progress: impl FnMut(u64),
) -> Result<Report, StoreError> {
    let page = page.max(1);
    let started = Instant::now();
    let chains = store.chains().await?;
    let mut gathered = match anchors {
        Some(a) => Some(anchored::gather(store, a).await?),
        None => None,
    };
    if let Some(bad) = gathered.as_mut().and_then(|g| g.bad.take()) {
        return Ok(Report {
            chains: chains.len(),
            finding: Some(bad),
            elapsed: started.elapsed(),
            ..Report::default()
        });
    }
    // First pass: every chain's CHAIN_OPENED claim, so the second pass knows which positions to keep.
    let mut claims = Vec::new();
    for info in &chains {
        let first = store.chain_events(&info.chain_id, 0, 1).await?;
        if let Some(e) = first.first()
            && e.seq == 1
            && let Ok(Some(claim)) = ChainChecker::new(&info.chain_id, true, []).check(e)
        {
            claims.push(claim);
        }
    }
    let mut wanted: HashMap<&str, Vec<i64>> = HashMap::new();
    for c in &claims {
        wanted
            .entry(c.previous_chain_id.as_str())
            .or_default()
            .push(c.previous_seq);
    }
    let mut report = Report {
        chains: chains.len(),
        ..Report::default()
    };
    let mut checkers = HashMap::new();
    let mut anchored_findings = Vec::new();
    let mut last_progress = Instant::now();
    for info in &chains {
        let mut checker = ChainChecker::new(
            &info.chain_id,
            true,
            wanted
                .get(info.chain_id.as_str())
                .cloned()
                .unwrap_or_default(),
        );
        if let Some(g) = gathered.as_mut() {
            checker.anchors = Some(g.chains.remove(&info.chain_id).unwrap_or_default());
        }
        let mut batch = read_pair(store, &info.chain_id, 0, page).await?;
        loop {
            // The next two pages are read (two reads at once, on the store's side) while these are
            // checked on a blocking thread.
            let Batch { events, next } = batch;
            let read_next = async {
                match next {
                    Some(lo) => read_pair(store, &info.chain_id, lo, page).await.map(Some),
                    None => Ok(None),
                }
            };
            let mut seen = report.events;
            let check_these = tokio::task::spawn_blocking(move || {
                let checked = checker.check_page(&events, &mut seen);
                (checker, seen, checked)
            });
            let following = read_next.await;
            let (back, seen, checked) = match check_these.await {
                Ok(done) => done,
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                Err(e) => return Err(StoreError::Corrupt(format!("verification stopped: {e}"))),
            };
            checker = back;
            report.events = seen;
            if let Err(f) = checked {
                report.finding = Some(f);
                report.elapsed = started.elapsed();
                return Ok(report);
            }
            if last_progress.elapsed() >= PROGRESS_EVERY {
                progress(report.events);
                last_progress = Instant::now();
            }
            match following? {
                Some(following) => batch = following,
                None => break,
            }
        }
        if let Some(f) = checker
            .anchors
            .as_ref()
            .and_then(|a| a.finish(&info.chain_id, checker.last_seq))
        {
            anchored_findings.push(f);
        }
        checkers.insert(info.chain_id.clone(), checker);
    }
    report.finding = check_claims(&claims, &checkers).or(anchored_findings.into_iter().next());
    if let Some(g) = gathered {
        // Checkpoints of chains the database does not hold at all, then copies it lacks.
        let mut gone: Vec<_> = g.chains.into_iter().collect();
        gone.sort_by(|a, b| a.0.cmp(&b.0));
        report.finding = report
            .finding
            .or_else(|| gone.first().and_then(|(chain, a)| a.finish(chain, 0)))
            .or(g.missing);
    }
    report.elapsed = started.elapsed();
    Ok(report)
}

/// Two consecutive ranges of a chain's events, and where the next two start (`None`: the chain ends).
struct Batch {
    events: Vec<SealedEvent>,
    next: Option<i64>,
}

/// The events with `lo < seq <= lo + 2 × page`, read as two ranges at once. Empty ranges before far-off
/// events (a forged seq) are skipped rather than walked.
async fn read_pair(
    store: &dyn Store,
    chain_id: &str,
    lo: i64,
    page: i64,
) -> Result<Batch, StoreError> {
    let mid = lo.saturating_add(page);
    let (first, second) = tokio::join!(
        read_range(store, chain_id, lo, page),
        read_range(store, chain_id, mid, page)
    );
    let (mut events, _) = first?;
    let (rest, beyond) = second?;
    events.extend(rest);
    let next = beyond.map(|b| b.resume_at(mid.saturating_add(page)));
    Ok(Batch { events, next })
}

/// What lies past a range: a stored event (its seq) or, when the range filled its read, possibly more.
enum Beyond {
    At(i64),
    Unknown,
}

impl Beyond {
    /// Where reading goes on after a range ending at `hi`.
    fn resume_at(self, hi: i64) -> i64 {
        match self {
            Self::At(seq) => hi.max(seq - 1),
            Self::Unknown => hi,
        }
    }
}

/// The events with `lo < seq <= lo + page`, and what lies past them (`None`: nothing).
async fn read_range(
    store: &dyn Store,
    chain_id: &str,
    lo: i64,
    page: i64,
) -> Result<(Vec<SealedEvent>, Option<Beyond>), StoreError> {
    // At most `page` distinct positions fall in the range, so a read of `page` events from `lo` holds
    // them all (stores return a chain's events in seq order).
    let mut events = store.chain_events(chain_id, lo, page).await?;
    let hi = lo.saturating_add(page);
    let full = events.len() as i64 == page;
    let inside = events.partition_point(|e| e.seq <= hi);
    let beyond = match events.get(inside) {
        Some(e) => Some(Beyond::At(e.seq)),
        None if full => Some(Beyond::Unknown),
        None => None,
    };
    events.truncate(inside);
    Ok((events, beyond))
}

/// Rebuilds a stored event from a JSON Lines record: the hashed bytes are the canonical JSON of the
/// record without `hash`.
pub fn event_from_line(line: &str) -> Result<SealedEvent, String> {
    let mut value: Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    let obj = value.as_object_mut().ok_or("not a JSON object")?;
    let hash = match obj.remove("hash") {
        Some(Value::String(h)) => h,
        _ => return Err("no hash".into()),
    };
    let text = |k: &str| obj.get(k).and_then(Value::as_str).map(str::to_owned);
    let event = SealedEvent {
        chain_id: text("chain_id").ok_or("no chain_id")?,
        seq: obj.get("seq").and_then(Value::as_i64).ok_or("no seq")?,
        event_id: text("event_id").unwrap_or_default(),
        event_type: text("event_type").unwrap_or_default(),
        trace_id: text("trace_id"),
        occurred_at: text("occurred_at").unwrap_or_default(),
        instance_id: text("instance_id").unwrap_or_default(),
        prev_hash: text("prev_hash").unwrap_or_default(),
        hash,
        body: crate::event::canonical_text(&value).map_err(|e| e.to_string())?,
    };
    Ok(event)
}

/// Verifies one JSON Lines file (a rotated part may be gzip-compressed: `.jsonl.gz`) or, given a folder,
/// every file of the trail in it in the order they were written ([`files::trail_paths`]): each chain
/// across the files it spans. A chain may begin mid-way (its earlier files may be archived). Each
/// CHAIN_OPENED's claim about its predecessor is checked when what is read holds the predecessor's
/// events from the claimed one or earlier, so files cut short (a tail lost to a crash, the last lines
/// removed) are a truncation; links to chains that are not in what is read are not checked.
pub fn verify_file(path: &Path, mut progress: impl FnMut(u64)) -> std::io::Result<Report> {
    let started = Instant::now();
    let paths = if path.is_dir() {
        files::trail_paths(path)?
    } else {
        vec![path.to_path_buf()]
    };
    // First pass: the claims, so the second knows which positions of each chain to keep.
    let claims = claims_in_files(&paths)?;
    let mut wanted: HashMap<&str, Vec<i64>> = HashMap::new();
    for c in &claims {
        wanted
            .entry(c.previous_chain_id.as_str())
            .or_default()
            .push(c.previous_seq);
    }
    let mut checkers: BTreeMap<String, ChainChecker> = BTreeMap::new();
    let mut report = Report::default();
    let mut last_progress = Instant::now();
    for read in events_in_files(&paths) {
        let (at, event) = read?;
        report.events += 1;
        let event = match event {
            Ok(e) => e,
            Err(why) => {
                report.finding = Some(finding(
                    Problem::HashMismatch,
                    "?",
                    0,
                    format!("{at}: {why}"),
                ));
                break;
            }
        };
        let checker = checkers.entry(event.chain_id.clone()).or_insert_with(|| {
            let wanted = wanted.get(event.chain_id.as_str()).cloned();
            ChainChecker::new(&event.chain_id, false, wanted.unwrap_or_default())
        });
        if let Err(f) = checker.check(&event) {
            report.finding = Some(f);
            break;
        }
        if last_progress.elapsed() >= PROGRESS_EVERY {
            progress(report.events);
            last_progress = Instant::now();
        }
    }
    if report.finding.is_none() {
        // A claim is checked where the predecessor's events from the claimed one on were read.
        let present: Vec<Claim> = claims
            .into_iter()
            .filter(|c| {
                checkers
                    .get(&c.previous_chain_id)
                    .and_then(|p| p.first_seq)
                    .is_some_and(|first| first <= c.previous_seq)
            })
            .collect();
        let checkers: HashMap<String, ChainChecker> = checkers.into_iter().collect();
        report.finding = check_claims(&present, &checkers);
        report.chains = checkers.len();
    } else {
        report.chains = checkers.len();
    }
    report.elapsed = started.elapsed();
    Ok(report)
}

/// Compares the database with the trail files in `dir` (read in write order, compressed parts
/// included): every event of each chain the files hold, from the first one they hold (earlier files may
/// be archived), must be in both, in the same order, with the same bytes and hash; and every chain of an
/// instance the files hold, opened since the files' earliest event, must be in the files. The first
/// difference is reported ([`Problem::FilesDiffer`]), naming the event and which side lacks it.
pub async fn compare_with_files(
    store: &dyn Store,
    dir: &Path,
    mut progress: impl FnMut(u64),
) -> anyhow::Result<Report> {
    let started = Instant::now();
    let mut report = Report::default();
    let mut cursors: HashMap<String, DbCursor> = HashMap::new();
    let mut instances: HashSet<String> = HashSet::new();
    let mut earliest: Option<String> = None;
    let mut last_progress = Instant::now();
    let differ =
        |chain: &str, seq: i64, msg: String| finding(Problem::FilesDiffer, chain, seq, msg);
    for read in events_in_files(&files::trail_paths(dir)?) {
        let (at, e) = read?;
        report.events += 1;
        let e = match e {
            Ok(e) => e,
            Err(why) => {
                report.finding = Some(differ("?", 0, format!("{at}: {why}")));
                break;
            }
        };
        instances.insert(e.instance_id.clone());
        if earliest.as_ref().is_none_or(|t| e.occurred_at < *t) {
            earliest = Some(e.occurred_at.clone());
        }
        let cursor = cursors
            .entry(e.chain_id.clone())
            .or_insert_with(|| DbCursor::from(e.seq - 1));
        if e.seq <= cursor.compared {
            report.finding = Some(differ(
                &e.chain_id,
                e.seq,
                format!(
                    "event {} is in the files twice or out of order ({at})",
                    e.seq
                ),
            ));
            break;
        }
        let next = cursor.next(store, &e.chain_id).await?;
        let problem = match next {
            Some(d) if d.seq < e.seq => Some(differ(
                &e.chain_id,
                d.seq,
                format!(
                    "event {} is in the database but not in the files (they go on at {})",
                    d.seq, e.seq
                ),
            )),
            Some(d) if d.seq == e.seq && (d.hash != e.hash || d.body != e.body) => Some(differ(
                &e.chain_id,
                e.seq,
                format!(
                    "event {} differs between the database and the files ({at})",
                    e.seq
                ),
            )),
            Some(d) if d.seq == e.seq => None,
            _ => Some(differ(
                &e.chain_id,
                e.seq,
                format!(
                    "event {} is in the files ({at}) but not in the database",
                    e.seq
                ),
            )),
        };
        if let Some(f) = problem {
            report.finding = Some(f);
            break;
        }
        cursor.consume();
        if last_progress.elapsed() >= PROGRESS_EVERY {
            progress(report.events);
            last_progress = Instant::now();
        }
    }
    report.chains = cursors.len();
    if report.finding.is_none() {
        report.finding =
            missing_from_files(store, &mut cursors, &instances, earliest.as_deref()).await?;
    }
    report.elapsed = started.elapsed();
    Ok(report)
}

/// What the database holds that the files lack once they are read to their end: the rest of each chain
/// they hold, and chains of their instances they do not hold at all (opened since `earliest`).
async fn missing_from_files(
    store: &dyn Store,
    cursors: &mut HashMap<String, DbCursor>,
    instances: &HashSet<String>,
    earliest: Option<&str>,
) -> Result<Option<Finding>, StoreError> {
    let mut chains: Vec<&String> = cursors.keys().collect();
    chains.sort();
    let mut left = None;
    for chain in chains {
        let cursor = cursors.get(chain).map(|c| c.compared);
        if let Some(after) = cursor
            && let Some(d) = store
                .chain_events(chain, after, 1)
                .await?
                .into_iter()
                .next()
        {
            left = Some(finding(
                Problem::FilesDiffer,
                chain,
                d.seq,
                format!(
                    "event {} is in the database but not in the files (they end at {after})",
                    d.seq
                ),
            ));
            break;
        }
    }
    if left.is_some() {
        return Ok(left);
    }
    let Some(earliest) = earliest else {
        return Ok(None);
    };
    for info in store.chains().await? {
        if cursors.contains_key(&info.chain_id) || info.first_at.as_str() < earliest {
            continue;
        }
        let Some(first) = store
            .chain_events(&info.chain_id, 0, 1)
            .await?
            .into_iter()
            .next()
        else {
            continue;
        };
        if instances.contains(&first.instance_id) {
            return Ok(Some(finding(
                Problem::FilesDiffer,
                &info.chain_id,
                first.seq,
                format!(
                    "chain {} of instance {} ({} events) is in the database but not in the files",
                    info.chain_id, first.instance_id, info.events
                ),
            )));
        }
    }
    Ok(None)
}

/// A chain's events in the database, read a page at a time, behind the files' reading.
struct DbCursor {
    /// The last seq compared (or before the first the files hold).
    compared: i64,
    page: VecDeque<SealedEvent>,
    /// The last seq read from the database.
    read_to: i64,
    ended: bool,
}

impl DbCursor {
    fn from(before: i64) -> Self {
        Self {
            compared: before,
            page: VecDeque::new(),
            read_to: before,
            ended: false,
        }
    }

    /// The database's next event after the last compared one, if any.
    async fn next(
        &mut self,
        store: &dyn Store,
        chain: &str,
    ) -> Result<Option<&SealedEvent>, StoreError> {
        if self.page.is_empty() && !self.ended {
            let page = store.chain_events(chain, self.read_to, PAGE).await?;
            self.ended = (page.len() as i64) < PAGE;
            if let Some(last) = page.last() {
                self.read_to = last.seq;
            }
            self.page = page.into();
        }
        Ok(self.page.front())
    }

    /// The front event matched the files' line.
    fn consume(&mut self) {
        if let Some(e) = self.page.pop_front() {
            self.compared = e.seq;
        }
    }
}

/// Each event of `paths`' lines in order (blank lines skipped): where it stands (`<file> line <n>`) and
/// what reading it gave.
fn events_in_files(
    paths: &[std::path::PathBuf],
) -> impl Iterator<Item = std::io::Result<(String, Result<SealedEvent, String>)>> + '_ {
    paths.iter().flat_map(|path| {
        let name = path
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        let lines: Box<dyn Iterator<Item = std::io::Result<String>>> = match files::open_lines(path)
        {
            Ok(reader) => Box::new(reader.lines()),
            Err(e) => Box::new(std::iter::once(Err(e))),
        };
        lines
            .enumerate()
            .filter(|(_, line)| !line.as_ref().is_ok_and(|l| l.trim().is_empty()))
            .map(move |(n, line)| {
                line.map(|l| (format!("{name} line {}", n + 1), event_from_line(&l)))
            })
    })
}

/// The CHAIN_OPENED claims of `paths`' lines (lines that do not read as events are left to the second
/// pass, which names them).
fn claims_in_files(paths: &[std::path::PathBuf]) -> std::io::Result<Vec<Claim>> {
    let mut claims = Vec::new();
    for path in paths {
        for line in files::open_lines(path)?.lines() {
            let line = line?;
            if !line.contains("\"CHAIN_OPENED\"") {
                continue;
            }
            if let Ok(e) = event_from_line(&line)
                && e.seq == 1
                && let Ok(Some(claim)) = ChainChecker::new(&e.chain_id, false, []).check(&e)
            {
                claims.push(claim);
            }
        }
    }
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A JSON Lines record of `chain` at `seq` after `prev`, with `extra` members; returns it and its hash.
    fn line(chain: &str, seq: i64, prev: &str, event_type: &str, extra: Value) -> (String, String) {
        let mut event = serde_json::json!({
            "chain_id": chain, "seq": seq, "prev_hash": prev, "event_type": event_type,
            "event_id": format!("{chain}-{seq}"), "occurred_at": "2026-12-06T10:00:00.000000Z",
            "instance_id": "i",
        });
        if let (Value::Object(e), Value::Object(x)) = (&mut event, extra) {
            e.extend(x);
        }
        let hash = chain_hash(prev, &crate::event::canonical_text(&event).unwrap());
        event["hash"] = Value::String(hash.clone());
        (format!("{event}\n"), hash)
    }

    #[test]
    fn a_claim_is_checked_only_where_the_predecessor_is_read_from_the_claimed_event_or_earlier() {
        // Chain a (1..5), and chain b opened while a ran (a CLI command beside a gateway), naming a's
        // seq 3; a's first three events went into an earlier part.
        let mut a = vec![(GENESIS_HASH.to_owned(), String::new())];
        for seq in 1..=5 {
            let kind = if seq == 1 {
                "CHAIN_OPENED"
            } else {
                "POLICY_LOADED"
            };
            let prev = a.last().unwrap().0.clone();
            let (text, hash) = line("a", seq, &prev, kind, serde_json::json!({}));
            a.push((hash, text));
        }
        let claim = serde_json::json!({
            "previous_chain_id": "a", "previous_seq": 3, "previous_hash": a[3].0,
        });
        let (b1, _) = line("b", 1, &a[3].0, "CHAIN_OPENED", claim);
        let dir = tempfile::tempdir().unwrap();
        let earlier = format!("{}{}{}", a[1].1, a[2].1, a[3].1);
        let later = format!("{b1}{}{}", a[4].1, a[5].1);
        std::fs::write(dir.path().join("audit.2026-12-06.0001.jsonl"), earlier).unwrap();
        std::fs::write(dir.path().join("audit.2026-12-06.jsonl"), later.clone()).unwrap();

        // The later part alone: a begins at 4, past the claim, which is not checked.
        let alone = verify_file(&dir.path().join("audit.2026-12-06.jsonl"), |_| {}).unwrap();
        // The folder: a is read from 1, the claim holds.
        let folder = verify_file(dir.path(), |_| {}).unwrap();
        // The earlier part cut after a's seq 2: the claimed event is gone from what is read.
        std::fs::write(
            dir.path().join("audit.2026-12-06.0001.jsonl"),
            format!("{}{}", a[1].1, a[2].1),
        )
        .unwrap();
        std::fs::write(dir.path().join("audit.2026-12-06.jsonl"), b1).unwrap();
        let cut = verify_file(dir.path(), |_| {}).unwrap();

        assert!(alone.finding.is_none(), "{:?}", alone.finding);
        assert!(folder.finding.is_none(), "{:?}", folder.finding);
        assert_eq!((folder.chains, folder.events), (2, 6));
        let finding = cut.finding.expect("a's tail is gone");
        assert_eq!(
            (finding.problem, finding.chain_id.as_str(), finding.seq),
            (Problem::Truncation, "a", 3)
        );
    }

    #[test]
    fn a_forged_line_at_the_largest_seq_is_a_finding_not_a_panic() {
        // Correctly hashed lines (anyone can compute the hashes) whose seq jumps to i64::MAX and on.
        let mut prev = GENESIS_HASH.to_owned();
        let mut lines = String::new();
        for seq in [i64::MAX - 1, i64::MAX, i64::MAX] {
            let mut event = serde_json::json!({
                "chain_id": "forged", "seq": seq, "event_type": "POLICY_LOADED", "prev_hash": prev,
            });
            let body = crate::event::canonical_text(&event).unwrap();
            prev = chain_hash(&prev, &body);
            event["hash"] = Value::String(prev.clone());
            lines.push_str(&event.to_string());
            lines.push('\n');
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        std::fs::write(&path, lines).unwrap();

        let report = verify_file(&path, |_| {}).unwrap();

        // Canonical JSON cannot hold such a seq exactly, so the row disagrees with its own bytes.
        let finding = report.finding.expect("a forged seq is a finding");
        assert_eq!(finding.problem, Problem::HashMismatch, "{finding:?}");
    }
}
