//! Storage behind one trait: SQLite (embedded default) and PostgreSQL (multi-instance), picked once from
//! the URL scheme. Storage writes what it is given; ids and timestamps are made in the service layer.

mod postgres;
mod rows;
mod run_reads;
mod runs;
mod sqlite;
mod sqlite_trail;

use std::collections::BTreeSet;
use std::sync::Arc;

use async_trait::async_trait;

pub use crate::audit::anchor::CheckpointRecord;

pub use postgres::PgStore;
pub use sqlite::SqliteStore;

use crate::config::DatabaseUrl;
pub use crate::config::PgSettings;
use crate::domain::{ContextId, KeyId, RoleName, TierName};
use crate::event::SealedEvent;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("stored data is invalid: {0}")]
    Corrupt(String),
}

/// An API key as stored: everything but the secret, which exists only as an argon2id hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    pub key_id: KeyId,
    pub name: String,
    pub role: RoleName,
    /// `None` = every context of the policy.
    pub contexts: Option<BTreeSet<ContextId>>,
    pub tier: TierName,
    pub secret_hash: String,
    pub created_at: String,
    pub expires_at: Option<String>,
    pub revoked_at: Option<String>,
    pub rotated_from: Option<KeyId>,
}

/// The last event of a chain: where the next chain of the same instance links to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainTail {
    pub chain_id: String,
    pub seq: i64,
    pub hash: String,
}

/// A collector run as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CollectorRun {
    pub run_id: String,
    pub source: String,
    pub query_key: String,
    pub started_at: String,
    pub finished_at: String,
    /// Every page was read; only complete runs become baselines.
    pub complete: bool,
    pub pages: i64,
    pub items: i64,
    /// JSON array of the errors met.
    pub errors: String,
    /// The request that made the run.
    pub trace_id: Option<String>,
}

/// What a run saw of one record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotRow {
    pub record_id: String,
    pub content_hash: String,
    /// JSON object: top-level field name -> SHA-256 of its canonical JSON.
    pub field_hashes: String,
}

/// Who holds a collector lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockHolder {
    pub run_id: String,
    pub acquired_at: String,
}

/// An operator's switch of one executor (the last one made).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecutorSwitch {
    pub executor: String,
    pub disabled: bool,
    pub changed_at: String,
    pub changed_by: String,
    pub reason: String,
}

/// Summary of one chain, for verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainInfo {
    pub chain_id: String,
    /// Events in the chain (SQLite reads it as the chain's last `seq`, which is the same number for an
    /// intact chain; verification finds any difference itself).
    pub events: i64,
    pub first_at: String,
}

/// What one `catraca audit verify` of the store found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verification {
    pub verified_at: String,
    pub ok: bool,
    pub chains: i64,
    pub events: i64,
    pub duration_ms: i64,
    /// The first problem found; `None` when the trail is intact.
    pub finding: Option<String>,
    /// Who ran it (`cli`).
    pub source: String,
}

/// The audit writer's hold on a store, used on the writer's own thread: appends and write probes run
/// there synchronously, with prepared statements, one transaction per group commit and no hand-off to
/// another thread per statement.
pub trait TrailAppender: Send {
    /// Appends a batch of sealed events in one transaction (one fsync for the whole batch).
    fn append(&mut self, events: &[SealedEvent]) -> Result<(), StoreError>;
    /// Proves a committed write reaches the disk right now (the audit tables take a row, rolled back;
    /// a row of its own is rewritten and committed).
    fn probe_write(&mut self) -> Result<(), StoreError>;
    /// Stores a signed checkpoint (committed on its own).
    fn append_checkpoint(&mut self, checkpoint: &CheckpointRecord) -> Result<(), StoreError>;
}

/// Wakes the watchers of shared state (key rows, executor switches) when the store tells of a change,
/// ahead of their next interval.
#[derive(Debug, Clone, Default)]
pub struct ChangeNudges {
    pub keys: Arc<tokio::sync::Notify>,
    pub switches: Arc<tokio::sync::Notify>,
    /// A policy reload asked of every gateway (`catraca policy reload`).
    pub policy: Arc<tokio::sync::Notify>,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Applies the embedded migrations of this backend.
    async fn migrate(&self) -> Result<(), StoreError>;
    /// Cheap round trip for readiness.
    async fn ping(&self) -> Result<(), StoreError>;
    /// Closes the store's connections and waits until they are closed, so the database is left whole
    /// when the process ends (a SQLite database folds its write-ahead log back in). Reads after it fail.
    async fn close(&self) {}
    /// Wakes `to` whenever another process changes keys or switches, as far as this backend can tell
    /// (PostgreSQL: LISTEN/NOTIFY, on a task of its own, reconnecting); the default tells nothing and
    /// the watchers' polling alone keeps the bound.
    fn push_changes(&self, to: ChangeNudges) {
        let _ = to;
    }

    async fn insert_key(&self, key: &KeyRecord) -> Result<(), StoreError>;
    async fn get_key(&self, key_id: &KeyId) -> Result<Option<KeyRecord>, StoreError>;
    /// The trace id of the request that made collector run `run_id`, if it is known.
    async fn collector_run_trace(&self, run_id: &str) -> Result<Option<String>, StoreError>;
    /// Records an executor switched off or on (the row keeps the last change).
    async fn set_executor_switch(&self, switch: &ExecutorSwitch) -> Result<(), StoreError>;
    /// Every executor an operator ever switched, with its current state.
    async fn executor_switches(&self) -> Result<Vec<ExecutorSwitch>, StoreError>;
    /// A counter that moves on every change to the keys table, by any process.
    async fn key_revision(&self) -> Result<i64, StoreError>;
    /// Asks every gateway on this database to reload its policy files; returns the request's number.
    async fn request_policy_reload(
        &self,
        at: &str,
        by: &str,
        revision: &str,
    ) -> Result<i64, StoreError>;
    /// The number of the latest policy reload asked (0 when none was).
    async fn policy_reload_requested(&self) -> Result<i64, StoreError>;
    async fn list_keys(&self) -> Result<Vec<KeyRecord>, StoreError>;
    async fn count_keys(&self) -> Result<i64, StoreError>;
    /// Marks the key revoked at `at`; `false` when it does not exist or was already revoked.
    async fn revoke_key(&self, key_id: &KeyId, at: &str) -> Result<bool, StoreError>;
    /// Inserts `new` and revokes `old` in one transaction; `false` (nothing written) when `old` is not
    /// an active key.
    async fn rotate_key(&self, old: &KeyId, new: &KeyRecord, at: &str) -> Result<bool, StoreError>;

    /// The audit writer's appender (see [`TrailAppender`]); call it from within the runtime.
    fn appender(&self) -> Result<Box<dyn TrailAppender>, StoreError>;
    /// Appends a batch of sealed events in one transaction, as [`TrailAppender::append`] does, from
    /// async code (tools and tests; the gateway writes through its audit writer).
    async fn append_events(&self, events: &[SealedEvent]) -> Result<(), StoreError>;
    /// [`TrailAppender::probe_write`] from async code.
    async fn probe_write(&self) -> Result<(), StoreError>;
    /// [`TrailAppender::append_checkpoint`] from async code.
    async fn append_checkpoint(&self, checkpoint: &CheckpointRecord) -> Result<(), StoreError>;
    /// Every stored checkpoint: by chain, then size, then in the order stored.
    async fn checkpoints(&self) -> Result<Vec<CheckpointRecord>, StoreError>;
    /// The checkpoint of `chain_id` with the most events, if it holds at least `covering` of them.
    async fn latest_checkpoint(
        &self,
        chain_id: &str,
        covering: i64,
    ) -> Result<Option<CheckpointRecord>, StoreError>;
    /// `(seq, hash)` of `chain_id`'s events after `after_seq`, in seq order, at most `limit` (what a
    /// Merkle proof reads: no bodies).
    async fn chain_hashes(
        &self,
        chain_id: &str,
        after_seq: i64,
        limit: i64,
    ) -> Result<Vec<(i64, String)>, StoreError>;
    /// Tail of the most recently opened chain of `instance_id`.
    async fn latest_chain_tail(&self, instance_id: &str) -> Result<Option<ChainTail>, StoreError>;
    /// Events of one request, in chain order.
    async fn events_for_trace(&self, trace_id: &str) -> Result<Vec<SealedEvent>, StoreError>;
    /// Events before the position `(occurred_at, chain_id, seq)` (from the newest when `None`), newest
    /// first, at most `limit` (for reading recent decisions page by page).
    async fn events_before(
        &self,
        before: Option<(&str, &str, i64)>,
        limit: i64,
    ) -> Result<Vec<SealedEvent>, StoreError>;
    /// Keeps what a verification of the store found.
    async fn record_verification(&self, found: &Verification) -> Result<(), StoreError>;
    /// The most recent verification of the store, if any.
    async fn last_verification(&self) -> Result<Option<Verification>, StoreError>;
    /// Every chain, oldest first.
    async fn chains(&self) -> Result<Vec<ChainInfo>, StoreError>;
    /// Events of `chain_id` with `seq > after_seq`, in order, at most `limit`.
    async fn chain_events(
        &self,
        chain_id: &str,
        after_seq: i64,
        limit: i64,
    ) -> Result<Vec<SealedEvent>, StoreError>;
    /// Takes the run lock of `(source, query_key)` unless a live one exists (expired locks are
    /// cleared first); `Some(holder)` when another run holds it. Shared by every instance.
    async fn acquire_collector_lock(
        &self,
        source: &str,
        query_key: &str,
        run_id: &str,
        now: &str,
        expires_at: &str,
    ) -> Result<Option<LockHolder>, StoreError>;
    async fn release_collector_lock(
        &self,
        source: &str,
        query_key: &str,
        run_id: &str,
    ) -> Result<(), StoreError>;
    /// The snapshot of the latest complete run of `(source, query_key)`.
    async fn collector_baseline(
        &self,
        source: &str,
        query_key: &str,
    ) -> Result<Option<(String, Vec<SnapshotRow>)>, StoreError>;
    /// Stores a run; a complete run also stores its snapshot and updates first/last sightings.
    async fn save_collector_run(
        &self,
        run: &CollectorRun,
        snapshot: &[SnapshotRow],
    ) -> Result<(), StoreError>;
    /// First and last sighting of a record in complete runs of `source`.
    async fn record_sightings(
        &self,
        source: &str,
        record_id: &str,
    ) -> Result<Option<(String, String)>, StoreError>;

    /// Events with `since <= occurred_at < until`, ordered by time then chain position, after the
    /// cursor `(occurred_at, chain_id, seq)`, at most `limit` (for streaming exports).
    async fn events_between(
        &self,
        since: &str,
        until: &str,
        after: Option<(&str, &str, i64)>,
        limit: i64,
    ) -> Result<Vec<SealedEvent>, StoreError>;
}

/// Opens the store named by the URL scheme.
pub async fn connect(url: &DatabaseUrl) -> Result<Arc<dyn Store>, StoreError> {
    connect_with(url, &PgSettings::default()).await
}

/// [`connect`], a PostgreSQL pool sized and bounded by `pg`.
pub async fn connect_with(
    url: &DatabaseUrl,
    pg: &PgSettings,
) -> Result<Arc<dyn Store>, StoreError> {
    if url.is_postgres() {
        Ok(Arc::new(PgStore::connect_with(url.expose(), pg).await?))
    } else {
        Ok(Arc::new(SqliteStore::connect(url.expose()).await?))
    }
}

fn contexts_to_text(contexts: &Option<BTreeSet<ContextId>>) -> Option<String> {
    contexts.as_ref().map(|set| {
        serde_json::Value::from(set.iter().map(|c| c.as_str()).collect::<Vec<_>>()).to_string()
    })
}

/// Rows per multi-row snapshot INSERT: 4 columns each, far below either backend's parameter limit.
const SNAPSHOT_CHUNK: usize = 1_000;

/// A row that only exists inside the rolled-back part of the write probe (a chain of its own name,
/// which no writer's `instance.boot` chain id can take).
fn probe_event() -> SealedEvent {
    SealedEvent {
        chain_id: "probe".into(),
        seq: 1,
        event_id: format!("probe-{}", uuid::Uuid::now_v7()),
        event_type: "PROBE".into(),
        trace_id: None,
        occurred_at: crate::event::timestamp(time::OffsetDateTime::now_utc()),
        instance_id: "probe".into(),
        prev_hash: String::new(),
        hash: String::new(),
        body: "{}".into(),
    }
}
