//! The audit writer: one thread owns this process's hash chain, group-commits queued events to the store
//! (one transaction for many requests), then appends them to the JSON Lines files. Callers wait for both;
//! a failed commit or file write is reported to every caller of the batch (503 `AUDIT_UNAVAILABLE`), so
//! nothing proceeds unaudited.
//!
//! The writer is an OS thread of its own rather than a task: it holds the store's [`TrailAppender`]
//! (for SQLite, a connection with prepared statements) and runs the whole group commit (seal, insert,
//! commit, file write, acknowledgements) without handing anything to another thread on the way.
//!
//! The writer outlives any store or file failure (a full disk, a read-only file system, a lost
//! connection, a lock): a failed commit leaves the chain where it was, so the next batch takes the same
//! places; a failed file write leaves the files behind the database, and the next batch first copies the
//! missing events from the database. Requests fail closed while it lasts and succeed again as soon as the
//! store and the disk do, without a restart.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::sync::{mpsc, oneshot};

use super::anchor::{CheckpointRecord, Frontier, Receipt, SigningKey, leaf};
use super::files::TrailFiles;
use super::witness::Witness;
use crate::config::Config;
use crate::event::{EventType, GENESIS_HASH, PendingEvent, PreparedEvent, SealedEvent};
use crate::metrics::Metrics;
use crate::store::{Store, StoreError, TrailAppender};

/// Longest a request waits for room in a full queue before it fails closed with `AUDIT_UNAVAILABLE`.
const ENQUEUE_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a request waits for its batch to commit; a store hung longer than this is unavailable.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(30);
/// Events read from the database at a time when the files are brought level.
const LEVEL_PAGE: i64 = 1_000;
/// At most one real write probe this often; `/ready` callers in between share its answer.
const PROBE_EVERY: Duration = Duration::from_secs(1);

/// Why events could not be made durable.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AuditError {
    #[error("audit store refused the write: {0}")]
    Store(String),
    #[error("audit queue is full")]
    QueueFull,
    #[error("audit writer is not running")]
    Stopped,
    #[error("audit commit did not finish in time")]
    Timeout,
    #[error("audit files could not be written: {0}")]
    Files(String),
}

/// Where the writer reports whether a command's events are durable, and where they went.
type Ack = oneshot::Sender<Result<Appended, AuditError>>;
/// Where the writer reports whether a probe reached the disk.
type ProbeAck = oneshot::Sender<Result<(), AuditError>>;

enum Command {
    Append {
        events: Vec<PreparedEvent>,
        done: Ack,
    },
    Probe {
        done: ProbeAck,
    },
}

/// Where one append's events went: its chain, the first one's seq, and each one's hash in order.
#[derive(Debug, Clone)]
pub struct Appended {
    pub chain_id: Arc<str>,
    pub first_seq: i64,
    pub hashes: Vec<String>,
}

impl Appended {
    /// The receipt of the `i`-th event of the append.
    pub fn receipt(&self, i: usize) -> Option<Receipt> {
        Some(Receipt {
            chain_id: self.chain_id.to_string(),
            seq: self.first_seq + i64::try_from(i).ok()?,
            hash: self.hashes.get(i)?.clone(),
        })
    }
}

/// How the writer signs its chain's head: with `key`, every `interval` while the chain grows, after at
/// most `max_events` events, and when it stops; each checkpoint stored, appended to the files'
/// `checkpoints.ndjson` and offered to the witness.
#[derive(Clone)]
pub struct Checkpointing {
    pub key: SigningKey,
    pub interval: Duration,
    pub max_events: u64,
    pub witness: Option<Witness>,
}

impl Checkpointing {
    /// The configuration's key (see [`super::anchor::signing_key`]) and cadence, and its witness
    /// started on the current runtime.
    pub fn from_config(config: &Config, metrics: &Metrics) -> anyhow::Result<Self> {
        Ok(Self {
            key: super::anchor::signing_key(config)?,
            interval: config.checkpoint_interval,
            max_events: config.checkpoint_max_events,
            witness: config
                .witness_url
                .as_deref()
                .map(|url| Witness::start(url, metrics.clone()))
                .transpose()?,
        })
    }
}

/// The handle the rest of the process uses to write audit events. Cheap to clone.
#[derive(Clone)]
pub struct AuditLog {
    tx: mpsc::Sender<Command>,
    healthy: Arc<AtomicBool>,
    chain_id: Arc<str>,
    instance_id: Arc<str>,
    metrics: Metrics,
}

/// Settings of the writer.
pub struct WriterOptions<'a> {
    pub instance_id: &'a str,
    pub queue_capacity: usize,
    pub batch_max: usize,
    /// Folder for `audit.<date>.jsonl`; `None` writes no files.
    pub files_dir: Option<&'a Path>,
    /// Size at which the live JSON Lines file is rotated and compressed.
    pub file_max_bytes: u64,
    pub checkpoints: Checkpointing,
}

/// Keeps the writer thread alive; awaiting it writes everything queued and syncs the files.
pub struct WriterTask {
    join: std::thread::JoinHandle<()>,
}

impl WriterTask {
    /// Waits until every queued event is written and the files are flushed (all handles dropped).
    pub async fn finish(self) {
        let joined = tokio::task::spawn_blocking(move || self.join.join()).await;
        if !matches!(joined, Ok(Ok(()))) {
            tracing::error!("audit writer thread failed");
        }
    }
}

struct ChainState {
    chain_id: String,
    instance_id: String,
    next_seq: i64,
    prev_hash: String,
}

impl ChainState {
    /// Seals `events` after the current tail without moving it; the tail moves only after the commit.
    fn seal_all(&self, events: Vec<PreparedEvent>) -> Vec<SealedEvent> {
        let mut out: Vec<SealedEvent> = Vec::with_capacity(events.len());
        for (seq, e) in (self.next_seq..).zip(events) {
            let prev = out
                .last()
                .map_or(self.prev_hash.as_str(), |p| p.hash.as_str());
            let sealed = e.seal(&self.chain_id, &self.instance_id, seq, prev);
            out.push(sealed);
        }
        out
    }

    fn advance(&mut self, sealed: &[SealedEvent]) {
        if let Some(last) = sealed.last() {
            self.next_seq = last.seq + 1;
            self.prev_hash.clone_from(&last.hash);
        }
    }
}

impl AuditLog {
    /// Opens this process's chain (CHAIN_OPENED, linked to the instance's previous chain) and starts
    /// the writer. Fails if the store cannot take the first event: a gateway that cannot audit must
    /// not start.
    pub async fn start(
        store: Arc<dyn Store>,
        metrics: Metrics,
        opts: WriterOptions<'_>,
    ) -> anyhow::Result<(Self, WriterTask)> {
        let boot = uuid::Uuid::now_v7().simple().to_string();
        let chain_id = format!("{}.{boot}", opts.instance_id);
        let previous = store.latest_chain_tail(opts.instance_id).await?;
        let previous_tail = previous.clone();
        let opened = PendingEvent::new(
            EventType::ChainOpened,
            None,
            json!({
                "version": env!("CARGO_PKG_VERSION"),
                "previous_chain_id": previous.as_ref().map(|p| p.chain_id.clone()),
                "previous_seq": previous.as_ref().map(|p| p.seq),
                "previous_hash": previous.as_ref().map(|p| p.hash.clone()),
            }),
        );
        let mut state = ChainState {
            chain_id: chain_id.clone(),
            instance_id: opts.instance_id.to_owned(),
            next_seq: 1,
            prev_hash: previous.map_or_else(|| GENESIS_HASH.to_owned(), |p| p.hash),
        };
        let mut files = opts
            .files_dir
            .map(|dir| TrailFiles::open(dir, opts.file_max_bytes))
            .transpose()?;
        if let (Some(files), Some(previous)) = (files.as_mut(), previous_tail.as_ref()) {
            level_files(files, store.as_ref(), &previous.chain_id, previous.seq).await?;
        }
        let sealed = state.seal_all(vec![opened.prepare(&chain_id, opts.instance_id)?]);
        store.append_events(&sealed).await?;
        state.advance(&sealed);
        let mut anchor = Anchor {
            opts: opts.checkpoints,
            frontier: Frontier::default(),
            signed: 0,
            last_signed: Instant::now(),
            file: opts.files_dir.map(|dir| dir.join(CHECKPOINTS_FILE)),
        };
        anchor.grow(&sealed);
        metrics
            .audit_events
            .with_label_values(&[EventType::ChainOpened.as_str()])
            .inc();
        if let Some(f) = files.as_mut() {
            f.append(&sealed)?;
        }

        let appender = store.appender()?;
        let (tx, rx) = mpsc::channel(opts.queue_capacity);
        let healthy = Arc::new(AtomicBool::new(true));
        let log = Self {
            tx,
            healthy: healthy.clone(),
            chain_id: chain_id.into(),
            instance_id: opts.instance_id.into(),
            metrics: metrics.clone(),
        };
        let writer = Writer {
            chain: log.chain_id.clone(),
            store,
            appender,
            runtime: tokio::runtime::Handle::current(),
            metrics,
            healthy,
            state,
            files,
            files_dir: opts.files_dir.map(Path::to_owned),
            files_behind: false,
            last_probe: None,
            batch_max: opts.batch_max,
            anchor,
        };
        let join = std::thread::Builder::new()
            .name("catraca-audit".into())
            .spawn(move || writer.run(rx))?;
        Ok((log, WriterTask { join }))
    }

    /// The chain this process writes.
    pub fn chain_id(&self) -> &str {
        &self.chain_id
    }

    /// Whether the last write (or probe) succeeded.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Makes `events` durable, in order and contiguous in the chain; returns once committed, with
    /// where they went.
    ///
    /// Their canonical bodies are written here, in the caller's task, so that the one writer thread
    /// only places each in the chain and hashes it.
    pub async fn append(&self, events: Vec<PendingEvent>) -> Result<Appended, AuditError> {
        let events = events
            .into_iter()
            .map(|e| e.prepare(&self.chain_id, &self.instance_id))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| AuditError::Store(format!("event not serialisable: {e}")))?;
        let (done, wait) = oneshot::channel();
        self.send(Command::Append { events, done }).await?;
        self.wait(wait).await
    }

    /// Asks the writer to prove the store accepts writes now (used by `/ready`).
    pub async fn probe(&self) -> Result<(), AuditError> {
        let (done, wait) = oneshot::channel();
        self.send(Command::Probe { done }).await?;
        self.wait(wait).await
    }

    async fn send(&self, cmd: Command) -> Result<(), AuditError> {
        let sent = tokio::time::timeout(ENQUEUE_TIMEOUT, self.tx.send(cmd)).await;
        self.metrics
            .audit_queue_depth
            .set((self.tx.max_capacity() - self.tx.capacity()) as i64);
        match sent {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(AuditError::Stopped),
            Err(_) => Err(AuditError::QueueFull),
        }
    }

    async fn wait<T>(
        &self,
        wait: oneshot::Receiver<Result<T, AuditError>>,
    ) -> Result<T, AuditError> {
        match tokio::time::timeout(COMMIT_TIMEOUT, wait).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(AuditError::Stopped),
            Err(_) => Err(AuditError::Timeout),
        }
    }
}

/// Brings the files level with the database for `chain_id` up to `last_seq`: the events the files lack
/// (after a crash between a commit and its file write, or lost with the page cache) are copied from the
/// database, in order.
async fn level_files(
    files: &mut TrailFiles,
    store: &dyn Store,
    chain_id: &str,
    last_seq: i64,
) -> anyhow::Result<()> {
    let mut have = files.last_seq_of(chain_id)?.unwrap_or(0);
    let missing = last_seq - have;
    while have < last_seq {
        let events = store.chain_events(chain_id, have, LEVEL_PAGE).await?;
        let Some(last) = events.last() else { break };
        have = last.seq;
        files.append(&events)?;
    }
    if missing > 0 {
        tracing::warn!(
            chain_id,
            events = missing,
            "audit files were behind the database (a crash); brought level"
        );
    }
    Ok(())
}

struct Writer {
    /// The chain this writer seals, as the receipts name it.
    chain: Arc<str>,
    /// Reads (catching the files up) go through the store's async API, driven by `runtime`.
    store: Arc<dyn Store>,
    appender: Box<dyn TrailAppender>,
    runtime: tokio::runtime::Handle,
    metrics: Metrics,
    healthy: Arc<AtomicBool>,
    state: ChainState,
    files: Option<TrailFiles>,
    files_dir: Option<std::path::PathBuf>,
    /// Whether a file write failed since the files last matched the database; they are caught up
    /// before the next batch is acknowledged.
    files_behind: bool,
    /// When the store and the disk last proved writable (shared by `/ready` callers within
    /// [`PROBE_EVERY`]); cleared by any failed batch.
    last_probe: Option<Instant>,
    batch_max: usize,
    anchor: Anchor,
}

/// The checkpoints file, in the audit folder beside the trail files.
pub const CHECKPOINTS_FILE: &str = "checkpoints.ndjson";

/// The writer's checkpoints: its chain's Merkle right edge and when it was last signed.
struct Anchor {
    opts: Checkpointing,
    frontier: Frontier,
    /// Events the last stored checkpoint covers.
    signed: u64,
    last_signed: Instant,
    /// `checkpoints.ndjson` in the audit folder, if the writer keeps files.
    file: Option<std::path::PathBuf>,
}

impl Anchor {
    /// Adds committed events to the tree.
    fn grow(&mut self, sealed: &[SealedEvent]) {
        for e in sealed {
            // The writer made these hashes: always 64 hex digits.
            if let Some(l) = leaf(&e.hash)
                && let Err(err) = self.frontier.push(l)
            {
                tracing::error!(error = %err, "the checkpoint tree could not take an event");
            }
        }
    }

    /// How long until unsigned events must be signed; `None` when everything is signed.
    fn due_in(&self) -> Option<Duration> {
        (self.frontier.size() > self.signed).then(|| {
            self.opts
                .interval
                .saturating_sub(self.last_signed.elapsed())
        })
    }

    fn is_due(&self) -> bool {
        let unsigned = self.frontier.size().saturating_sub(self.signed);
        unsigned >= self.opts.max_events
            || (unsigned > 0 && self.last_signed.elapsed() >= self.opts.interval)
    }
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        loop {
            let first = match (self.anchor.due_in(), rx.try_recv()) {
                (_, Ok(cmd)) => Some(cmd),
                (_, Err(mpsc::error::TryRecvError::Disconnected)) => None,
                (None, Err(mpsc::error::TryRecvError::Empty)) => rx.blocking_recv(),
                // Nothing queued and events unsigned: wait at most until their checkpoint is due (a
                // timer only when the queue is empty, never under load).
                (Some(wait), Err(mpsc::error::TryRecvError::Empty)) => {
                    // Built inside the runtime: a timer needs its context.
                    let next = self
                        .runtime
                        .block_on(async { tokio::time::timeout(wait, rx.recv()).await });
                    match next {
                        Ok(cmd) => cmd,
                        Err(_) => {
                            self.checkpoint(false);
                            continue;
                        }
                    }
                }
            };
            let Some(first) = first else { break };
            // Group commit: everything already queued (up to batch_max events) goes in one transaction.
            let mut appends = Vec::new();
            let mut probes = Vec::new();
            let mut count = 0;
            let mut next = Some(first);
            while let Some(cmd) = next.take() {
                match cmd {
                    Command::Append { events, done } => {
                        count += events.len();
                        appends.push((events, done));
                    }
                    Command::Probe { done } => probes.push(done),
                }
                if count < self.batch_max {
                    next = rx.try_recv().ok();
                }
            }
            self.metrics.audit_queue_depth.set(rx.len() as i64);
            if !appends.is_empty() {
                self.commit(appends);
                if self.anchor.is_due() {
                    self.checkpoint(false);
                }
            }
            if !probes.is_empty() {
                let result = self.probe();
                for done in probes {
                    let _ = done.send(result.clone());
                }
            }
        }
        self.checkpoint(true);
        if let Some(files) = self.files.as_mut()
            && let Err(e) = files.finish()
        {
            tracing::error!(error = %e, "audit files could not be synced at shutdown");
        }
        tracing::info!(chain_id = %self.state.chain_id, "audit writer stopped");
    }

    fn commit(&mut self, appends: Vec<(Vec<PreparedEvent>, Ack)>) {
        let mut events = Vec::new();
        let mut waiters = Vec::with_capacity(appends.len());
        for (batch, done) in appends {
            waiters.push((events.len(), batch.len(), done));
            events.extend(batch);
        }
        // Events of each type (indexed by the type's discriminant), counted once the batch commits.
        let mut counts = [0u64; EventType::ALL.len()];
        for e in &events {
            counts[e.event_type as usize] += 1;
        }
        let sealed = self.state.seal_all(events);
        let started = Instant::now();
        let written = self.appender.append(&sealed);
        self.metrics
            .audit_flush_duration
            .observe(started.elapsed().as_secs_f64());
        let result = written.map(|()| sealed).map_err(store_error);
        match result {
            Ok(sealed) => {
                self.state.advance(&sealed);
                self.anchor.grow(&sealed);
                // One lookup of the labelled counter per type in the batch rather than per event.
                for t in EventType::ALL {
                    let n = counts[t as usize];
                    if n > 0 {
                        self.metrics
                            .audit_events
                            .with_label_values(&[t.as_str()])
                            .inc_by(n);
                    }
                }
                let filed = self.write_files(&sealed);
                if let Err(e) = &filed {
                    self.last_probe = None;
                    self.metrics.audit_write_failures.inc();
                    tracing::error!(error = %e, "audit batch committed but not written to the files; its requests fail closed");
                }
                self.healthy.store(filed.is_ok(), Ordering::Relaxed);
                // The batch is done with: each caller takes its own events' hashes, moved, not copied.
                let first_seq = sealed.first().map_or(0, |e| e.seq);
                let mut hashes = sealed.into_iter().map(|e| e.hash);
                for (from, count, done) in waiters {
                    let mine: Vec<String> = hashes.by_ref().take(count).collect();
                    let placed = filed.clone().map(|()| Appended {
                        chain_id: self.chain.clone(),
                        first_seq: first_seq + i64::try_from(from).unwrap_or(i64::MAX),
                        hashes: mine,
                    });
                    let _ = done.send(placed);
                }
            }
            Err(e) => {
                self.last_probe = None;
                self.metrics.audit_write_failures.inc();
                self.healthy.store(false, Ordering::Relaxed);
                tracing::error!(error = %e, "audit batch not written; its requests fail closed");
                for (_, _, done) in waiters {
                    let _ = done.send(Err(e.clone()));
                }
            }
        }
    }
}

impl Writer {
    /// Signs the chain's head and keeps the checkpoint: in the store, then in the checkpoints file,
    /// then offered to the witness. `closed` marks the chain's last one (its writer is stopping). A
    /// failure is logged and tried again at the next interval; requests are not held up by it (their
    /// events are durable already, and a later checkpoint covers them).
    fn checkpoint(&mut self, closed: bool) {
        let anchor = &mut self.anchor;
        anchor.last_signed = Instant::now();
        let size = anchor.frontier.size();
        if size == 0 || (!closed && size == anchor.signed) {
            return;
        }
        let chain_id = self.state.chain_id.as_str();
        let signed = anchor
            .frontier
            .root()
            .and_then(|root| anchor.opts.key.sign(chain_id, size, root, closed));
        let note = match signed {
            Ok(note) => note,
            Err(e) => {
                tracing::error!(error = %e, chain_id, size, "checkpoint not signed");
                return;
            }
        };
        let record = CheckpointRecord {
            chain_id: chain_id.to_owned(),
            size: i64::try_from(size).unwrap_or(i64::MAX),
            signed_at: crate::event::timestamp(time::OffsetDateTime::now_utc()),
            note,
        };
        if let Err(e) = self.appender.append_checkpoint(&record) {
            tracing::error!(error = %e, chain_id, size, "checkpoint not stored; signing again at the next interval");
            return;
        }
        anchor.signed = size;
        self.metrics.checkpoints.inc();
        if let Some(path) = anchor.file.as_deref()
            && let Err(e) = append_line(path, &record)
        {
            tracing::error!(error = %e, path = %path.display(), "checkpoint stored but not appended to the checkpoints file");
        }
        if let Some(witness) = &anchor.opts.witness {
            witness.offer(record.note);
        }
    }

    /// Appends a committed batch to the files, first copying from the database whatever an earlier
    /// failed write left out.
    fn write_files(&mut self, sealed: &[SealedEvent]) -> Result<(), AuditError> {
        let Some(first) = sealed.first() else {
            return Ok(());
        };
        self.catch_up_files(first.seq)?;
        let Some(files) = self.files.as_mut() else {
            return Ok(());
        };
        files.append(sealed).map_err(|e| {
            self.files_behind = true;
            AuditError::Files(e.to_string())
        })
    }

    /// After a failed file write, copies this chain's events below `until` that the files lack from
    /// the database (where the files really end is read from them, so nothing is written twice).
    fn catch_up_files(&mut self, until: i64) -> Result<(), AuditError> {
        let Some(files) = self.files.as_mut() else {
            return Ok(());
        };
        if !self.files_behind {
            return Ok(());
        }
        let chain_id = self.state.chain_id.as_str();
        let files_error = |e: std::io::Error| AuditError::Files(e.to_string());
        let mut have = files
            .last_seq_of(chain_id)
            .map_err(files_error)?
            .unwrap_or(0);
        let from = have + 1;
        while have < until - 1 {
            let limit = LEVEL_PAGE.min(until - 1 - have);
            let events = self
                .runtime
                .block_on(self.store.chain_events(chain_id, have, limit))
                .map_err(store_error)?;
            let Some(last) = events.last() else { break };
            have = last.seq;
            files.append(&events).map_err(files_error)?;
        }
        self.files_behind = false;
        tracing::info!(
            chain_id,
            from_seq = from,
            "audit files caught up with the database"
        );
        Ok(())
    }

    /// Proves the store and the files take a durable write now, at most once per [`PROBE_EVERY`].
    fn probe(&mut self) -> Result<(), AuditError> {
        // A success is shared for a while; a failure is not, so recovery shows at the next ask.
        if self.last_probe.is_some_and(|at| at.elapsed() < PROBE_EVERY) {
            return Ok(());
        }
        let mut result = self.appender.probe_write().map_err(store_error);
        if result.is_ok()
            && let Some(dir) = self.files_dir.as_deref()
        {
            result = probe_dir(dir).map_err(|e| AuditError::Files(e.to_string()));
        }
        if result.is_ok() {
            // Writable again: catch the files up now rather than with the next request.
            result = self.catch_up_files(self.state.next_seq);
        }
        self.healthy.store(result.is_ok(), Ordering::Relaxed);
        self.last_probe = result.is_ok().then(Instant::now);
        result
    }
}

/// Appends `record` to the checkpoints file as one JSON line, synced.
fn append_line(path: &Path, record: &CheckpointRecord) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut line = serde_json::to_vec(record)?;
    line.push(b'\n');
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    file.write_all(&line)?;
    file.sync_data()
}

/// Writes, syncs and removes a small file in `dir`: fails when the disk is full or read-only.
fn probe_dir(dir: &Path) -> std::io::Result<()> {
    use std::io::Write as _;
    let path = dir.join(".catraca-write-probe");
    let outcome = std::fs::File::create(&path).and_then(|mut f| {
        f.write_all(&[0u8; 4096])?;
        f.sync_all()
    });
    let _ = std::fs::remove_file(&path);
    outcome
}

fn store_error(e: StoreError) -> AuditError {
    AuditError::Store(e.to_string())
}
