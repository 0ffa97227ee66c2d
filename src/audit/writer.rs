//! The audit writer: one task owns this process's hash chain, group-commits queued events to the store
//! (one transaction for many requests), then mirrors them to JSON Lines files. Callers wait for the
//! commit; a failed commit is reported to every caller of the batch, so nothing proceeds unaudited.

use std::io::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::sync::{mpsc, oneshot};
use tracing_appender::non_blocking::{NonBlocking, NonBlockingBuilder, WorkerGuard};
use tracing_appender::rolling::{RollingFileAppender, Rotation};

use crate::event::{CanonicalError, EventType, GENESIS_HASH, PendingEvent, SealedEvent, seal};
use crate::metrics::Metrics;
use crate::store::{Store, StoreError};

/// Longest a request waits for room in a full queue before it fails closed with `AUDIT_UNAVAILABLE`.
const ENQUEUE_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a request waits for its batch to commit; a store hung longer than this is unavailable.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(30);

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
}

/// Where the writer reports whether a command's events are durable.
type Ack = oneshot::Sender<Result<(), AuditError>>;

enum Command {
    Append {
        events: Vec<PendingEvent>,
        done: Ack,
    },
    Probe {
        done: Ack,
    },
}

/// The handle the rest of the process uses to write audit events. Cheap to clone.
#[derive(Clone)]
pub struct AuditLog {
    tx: mpsc::Sender<Command>,
    healthy: Arc<AtomicBool>,
    chain_id: Arc<str>,
    metrics: Metrics,
}

/// Settings of the writer.
pub struct WriterOptions<'a> {
    pub instance_id: &'a str,
    pub queue_capacity: usize,
    pub batch_max: usize,
    /// Folder for `audit.<date>.jsonl`; `None` writes no files.
    pub files_dir: Option<&'a Path>,
}

/// Keeps the writer task and the file worker alive; awaiting it flushes everything.
pub struct WriterTask {
    join: tokio::task::JoinHandle<()>,
}

impl WriterTask {
    /// Waits until every queued event is written and the files are flushed (all handles dropped).
    pub async fn finish(self) {
        if let Err(e) = self.join.await {
            tracing::error!(error = %e, "audit writer task failed");
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
    fn seal_all(&self, events: Vec<PendingEvent>) -> Result<Vec<SealedEvent>, CanonicalError> {
        let mut prev = self.prev_hash.clone();
        let mut out = Vec::with_capacity(events.len());
        for (seq, e) in (self.next_seq..).zip(events) {
            let sealed = seal(e, &self.chain_id, &self.instance_id, seq, &prev)?;
            prev.clone_from(&sealed.hash);
            out.push(sealed);
        }
        Ok(out)
    }

    fn advance(&mut self, sealed: &[SealedEvent]) {
        if let Some(last) = sealed.last() {
            self.next_seq = last.seq + 1;
            self.prev_hash.clone_from(&last.hash);
        }
    }
}

fn open_files(dir: &Path) -> anyhow::Result<(NonBlocking, WorkerGuard)> {
    std::fs::create_dir_all(dir)?;
    let appender = RollingFileAppender::builder()
        .rotation(Rotation::DAILY)
        .filename_prefix("audit")
        .filename_suffix("jsonl")
        .build(dir)?;
    // Non-lossy: when the file worker lags, the writer waits instead of dropping lines.
    Ok(NonBlockingBuilder::default()
        .lossy(false)
        .thread_name("catraca-audit-files")
        .finish(appender))
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
        let files = opts.files_dir.map(open_files).transpose()?;
        let sealed = state.seal_all(vec![opened])?;
        store.append_events(&sealed).await?;
        state.advance(&sealed);
        metrics
            .audit_events
            .with_label_values(&[EventType::ChainOpened.as_str()])
            .inc();
        let (mut file, guard) = match files {
            Some((f, g)) => (Some(f), Some(g)),
            None => (None, None),
        };
        if let Some(f) = file.as_mut() {
            write_lines(f, &sealed);
        }

        let (tx, rx) = mpsc::channel(opts.queue_capacity);
        let healthy = Arc::new(AtomicBool::new(true));
        let log = Self {
            tx,
            healthy: healthy.clone(),
            chain_id: chain_id.into(),
            metrics: metrics.clone(),
        };
        let writer = Writer {
            store,
            metrics,
            healthy,
            state,
            file,
            _guard: guard,
            batch_max: opts.batch_max,
        };
        let join = tokio::spawn(writer.run(rx));
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

    /// Makes `events` durable, in order and contiguous in the chain; returns once committed.
    pub async fn append(&self, events: Vec<PendingEvent>) -> Result<(), AuditError> {
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

    async fn wait(
        &self,
        wait: oneshot::Receiver<Result<(), AuditError>>,
    ) -> Result<(), AuditError> {
        match tokio::time::timeout(COMMIT_TIMEOUT, wait).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(AuditError::Stopped),
            Err(_) => Err(AuditError::Timeout),
        }
    }
}

/// Appends a committed batch to the JSON Lines file in one write (one hand-off to the file thread).
fn write_lines(file: &mut NonBlocking, sealed: &[SealedEvent]) {
    let lines: String = sealed.iter().map(SealedEvent::json_line).collect();
    if let Err(err) = file.write_all(lines.as_bytes()) {
        tracing::error!(error = %err, "could not append audit events to the JSON Lines file");
    }
}

struct Writer {
    store: Arc<dyn Store>,
    metrics: Metrics,
    healthy: Arc<AtomicBool>,
    state: ChainState,
    file: Option<NonBlocking>,
    _guard: Option<WorkerGuard>,
    batch_max: usize,
}

impl Writer {
    async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        while let Some(first) = rx.recv().await {
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
                self.commit(appends).await;
            }
            if !probes.is_empty() {
                let result = self.store.probe_append().await.map_err(store_error);
                self.healthy.store(result.is_ok(), Ordering::Relaxed);
                for done in probes {
                    let _ = done.send(result.clone());
                }
            }
        }
        tracing::info!(chain_id = %self.state.chain_id, "audit writer stopped");
    }

    async fn commit(&mut self, appends: Vec<(Vec<PendingEvent>, Ack)>) {
        let mut events = Vec::new();
        let mut waiters = Vec::with_capacity(appends.len());
        for (batch, done) in appends {
            events.extend(batch);
            waiters.push(done);
        }
        let types: Vec<EventType> = events.iter().map(|e| e.event_type).collect();
        let result = match self.state.seal_all(events) {
            Ok(sealed) => {
                let started = Instant::now();
                let written = self.store.append_events(&sealed).await;
                self.metrics
                    .audit_flush_duration
                    .observe(started.elapsed().as_secs_f64());
                written.map(|()| sealed).map_err(store_error)
            }
            Err(e) => Err(AuditError::Store(format!("event not serialisable: {e}"))),
        };
        match result {
            Ok(sealed) => {
                self.state.advance(&sealed);
                self.healthy.store(true, Ordering::Relaxed);
                for t in types {
                    self.metrics
                        .audit_events
                        .with_label_values(&[t.as_str()])
                        .inc();
                }
                if let Some(file) = self.file.as_mut() {
                    write_lines(file, &sealed);
                }
                for done in waiters {
                    let _ = done.send(Ok(()));
                }
            }
            Err(e) => {
                self.metrics.audit_write_failures.inc();
                self.healthy.store(false, Ordering::Relaxed);
                tracing::error!(error = %e, "audit batch not written; its requests fail closed");
                for done in waiters {
                    let _ = done.send(Err(e.clone()));
                }
            }
        }
    }
}

fn store_error(e: StoreError) -> AuditError {
    AuditError::Store(e.to_string())
}
