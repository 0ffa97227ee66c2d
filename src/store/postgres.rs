//! PostgreSQL store: for several instances sharing one audit database (each instance keeps its own chain).

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use sqlx::{Connection as _, PgConnection, PgPool, Postgres, QueryBuilder, SqlSafeStr};

use super::rows::{KeyRow, Sightings};
use super::run_reads;
use super::runs::runs_of;
use super::{
    ChainInfo, ChainTail, ChangeNudges, CheckpointRecord, CollectorRun, ExecutorSwitch, KeyRecord,
    LockHolder, PgSettings, SNAPSHOT_CHUNK, SnapshotRow, Store, StoreError, TrailAppender,
    Verification, contexts_to_text, probe_event,
};
use crate::domain::KeyId;
use crate::event::SealedEvent;

pub struct PgStore {
    pool: PgPool,
    /// How the pool's connections are made: the audit writer opens its own the same way.
    options: PgConnectOptions,
    chain_nos: ChainNos,
}

/// Longest the audit writer waits to open its connection; a server that does not answer by then is
/// unavailable, and the writer tries again with its next batch.
const WRITER_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The audit writer's connection, unused this long, is pinged before its next write: one the server
/// dropped while it was idle (a restart, an operator, a proxy's timeout) is replaced before it fails
/// a batch. Under load it is never idle that long, and commits take no extra round trip.
const WRITER_IDLE_CHECK: Duration = Duration::from_secs(1);

fn migrator() -> Migrator {
    Migrator::with_migrations(vec![
        Migration::new(
            1,
            "init".into(),
            MigrationType::Simple,
            include_str!("../../migrations/postgres/0001_init.sql").into_sql_str(),
            false,
        ),
        Migration::new(
            2,
            "collector".into(),
            MigrationType::Simple,
            include_str!("../../migrations/postgres/0002_collector.sql").into_sql_str(),
            false,
        ),
        Migration::new(
            3,
            "key revision".into(),
            MigrationType::Simple,
            include_str!("../../migrations/postgres/0003_key_revision.sql").into_sql_str(),
            false,
        ),
        Migration::new(
            4,
            "write probe".into(),
            MigrationType::Simple,
            include_str!("../../migrations/postgres/0004_write_probe.sql").into_sql_str(),
            false,
        ),
        Migration::new(
            5,
            "executor switches".into(),
            MigrationType::Simple,
            include_str!("../../migrations/postgres/0005_executor_switches.sql").into_sql_str(),
            false,
        ),
        Migration::new(
            6,
            "collector run trace".into(),
            MigrationType::Simple,
            include_str!("../../migrations/postgres/0006_collector_run_trace.sql").into_sql_str(),
            false,
        ),
        Migration::new(
            7,
            "verifications".into(),
            MigrationType::Simple,
            include_str!("../../migrations/postgres/0007_verifications.sql").into_sql_str(),
            false,
        ),
        Migration::new(
            8,
            "change notifications".into(),
            MigrationType::Simple,
            include_str!("../../migrations/postgres/0008_change_notifications.sql").into_sql_str(),
            false,
        ),
        Migration::new(
            9,
            "policy reloads".into(),
            MigrationType::Simple,
            include_str!("../../migrations/postgres/0009_policy_reloads.sql").into_sql_str(),
            false,
        ),
        Migration::new(
            10,
            "checkpoints".into(),
            MigrationType::Simple,
            include_str!("../../migrations/postgres/0010_checkpoints.sql").into_sql_str(),
            false,
        ),
        Migration::new(
            11,
            "trail runs".into(),
            MigrationType::Simple,
            include_str!("../../migrations/postgres/0011_trail_runs.sql").into_sql_str(),
            false,
        ),
    ])
}

/// A group commit's runs and their traces, in one statement (atomic by itself: no BEGIN/COMMIT round
/// trips), each column bound as one array whatever the number of runs.
const INSERT_RUNS: &str = "WITH runs AS ( \
         INSERT INTO audit_runs (pos, n, at_min, hashes, bodies) \
         SELECT * FROM unnest($1::BIGINT[], $2::BIGINT[], $3::BIGINT[], $4::BYTEA[], $5::TEXT[])) \
     INSERT INTO audit_run_traces (trace_id, pos) \
     SELECT * FROM unnest($6::TEXT[], $7::BIGINT[]) ON CONFLICT DO NOTHING";

/// The number of a chain, naming it in `audit_chains` if it is new.
const CHAIN_NO: &str = "WITH named AS ( \
         INSERT INTO audit_chains (chain_id, instance_id, opened_at) VALUES ($1, $2, $3) \
         ON CONFLICT (chain_id) DO NOTHING RETURNING chain_no) \
     SELECT chain_no FROM named UNION ALL \
     SELECT chain_no FROM audit_chains WHERE chain_id = $1 LIMIT 1";

/// A read of runs: [`RunRow`]'s columns from the runs joined with their chains (`r`, `c`), followed by
/// the rest of the query. Bodies are text here (PostgreSQL compresses them itself), with no size.
macro_rules! select_runs {
    ($rest:literal) => {
        concat!(
            "SELECT r.at_min, r.n, c.chain_id, r.pos, r.hashes, convert_to(r.bodies, 'UTF8'), \
                    NULL::BIGINT \
             FROM audit_runs r JOIN audit_chains c ON c.chain_no = r.pos >> 40 ",
            $rest
        )
    };
}

/// Numbers of the chains this process has named (a chain's number never changes).
type ChainNos = Arc<Mutex<HashMap<String, i64>>>;

/// The channel the change triggers notify (migration 8).
const CHANGES_CHANNEL: &str = "catraca_changes";

/// Pause before listening again after the listening connection failed.
const LISTEN_RETRY: Duration = Duration::from_secs(1);

impl PgStore {
    /// A pool with the default [`PgSettings`].
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::connect_with(url, &PgSettings::default()).await
    }

    /// A pool of at most `settings.max_connections` less one (the audit writer's own connection is
    /// the one), each statement cancelled by the server past `settings.statement_timeout`.
    pub async fn connect_with(url: &str, settings: &PgSettings) -> Result<Self, StoreError> {
        let timeout_ms = settings.statement_timeout.as_millis().max(1).to_string();
        let options =
            PgConnectOptions::from_str(url)?.options([("statement_timeout", timeout_ms.as_str())]);
        let pool = PgPoolOptions::new()
            .max_connections(settings.max_connections.saturating_sub(1).max(1))
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options.clone())
            .await?;
        Ok(Self {
            pool,
            options,
            chain_nos: ChainNos::default(),
        })
    }
}

/// Appends `events` as runs, in one statement, naming chains not seen before (remembered in `known`).
async fn append_on(
    conn: &mut PgConnection,
    known: &ChainNos,
    events: &[SealedEvent],
) -> Result<(), StoreError> {
    if events.is_empty() {
        return Ok(());
    }
    let (mut pos, mut n, mut at_min, mut hashes, mut bodies) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut trace_ids, mut trace_pos) = (Vec::new(), Vec::new());
    for chain in events.chunk_by(|a, b| a.chain_id == b.chain_id) {
        let first = &chain[0];
        let chain_no = chain_no(conn, known, first).await?;
        for run in runs_of(chain) {
            let at = run
                .position_in(chain_no, &first.chain_id)
                .map_err(StoreError::Corrupt)?;
            for trace in run.traces {
                trace_ids.push(trace);
                trace_pos.push(at);
            }
            pos.push(at);
            n.push(run.count);
            at_min.push(run.at_min);
            hashes.push(run.hashes);
            bodies.push(run.bodies);
        }
    }
    sqlx::query(INSERT_RUNS)
        .bind(pos)
        .bind(n)
        .bind(at_min)
        .bind(hashes)
        .bind(bodies)
        .bind(trace_ids)
        .bind(trace_pos)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// The number of `first`'s chain, from `known` or the database (naming the chain if it is new).
async fn chain_no(
    conn: &mut PgConnection,
    known: &ChainNos,
    first: &SealedEvent,
) -> Result<i64, StoreError> {
    let remembered = known
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get(&first.chain_id)
        .copied();
    if let Some(n) = remembered {
        return Ok(n);
    }
    let n: i64 = sqlx::query_scalar(CHAIN_NO)
        .bind(&first.chain_id)
        .bind(&first.instance_id)
        .bind(&first.occurred_at)
        .fetch_one(&mut *conn)
        .await?;
    known
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(first.chain_id.clone(), n);
    Ok(n)
}

/// Appends `events` on a connection of `pool`.
async fn append_with(
    pool: &PgPool,
    known: &ChainNos,
    events: &[SealedEvent],
) -> Result<(), StoreError> {
    let mut conn = pool.acquire().await?;
    append_on(&mut conn, known, events).await
}

/// Listens on [`CHANGES_CHANNEL`] and wakes the watcher of each table that changed; returns when the
/// listening connection fails. Everything is read once on (re)connecting: what changed while nobody
/// listened is not missed.
async fn listen_for_changes(pool: &PgPool, to: &ChangeNudges) -> Result<(), sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(CHANGES_CHANNEL).await?;
    to.keys.notify_one();
    to.switches.notify_one();
    to.policy.notify_one();
    loop {
        let change = listener.recv().await?;
        match change.payload() {
            "api_keys" => to.keys.notify_one(),
            "executor_switches" => to.switches.notify_one(),
            "policy_reloads" => to.policy.notify_one(),
            _ => {}
        }
    }
}

/// The audit table takes a row (its triggers and constraints), rolled back; then a committed write
/// reaches the disk.
async fn probe_on(conn: &mut PgConnection) -> Result<(), StoreError> {
    let mut tx = conn.begin().await?;
    // A chain named here is rolled back with the rest: it is not remembered.
    append_on(&mut tx, &ChainNos::default(), &[probe_event()]).await?;
    tx.rollback().await?;
    sqlx::query(
        "INSERT INTO write_probe (id, probed_at) VALUES (1, $1) \
         ON CONFLICT (id) DO UPDATE SET probed_at = excluded.probed_at",
    )
    .bind(crate::event::timestamp(time::OffsetDateTime::now_utc()))
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// The audit writer's appender: a connection of its own, used only by the writer's thread, so that a
/// group commit is one statement and one round trip (a pooled connection is first pinged on every
/// acquire, a second round trip per commit). The connection belongs to a single-threaded runtime
/// that the writer's thread drives itself while it waits: its replies are read as they arrive, not
/// when a busy worker of the server's runtime next polls for I/O.
struct PgAppender {
    link: WriterLink,
    chain_nos: ChainNos,
    /// `None` only while the appender is dropped.
    runtime: Option<tokio::runtime::Runtime>,
}

/// The writer's connection: opened on first use; after any failure it is dropped (it may be broken,
/// or inside a transaction it cannot finish) and the next write opens a new one, so the writer
/// recovers by itself once the server is back.
struct WriterLink {
    options: PgConnectOptions,
    conn: Option<PgConnection>,
    /// When the connection last did its work.
    last_used: Instant,
}

impl WriterLink {
    /// The connection, on `runtime`: opened now if there is none, or if it was idle past
    /// [`WRITER_IDLE_CHECK`] and no longer answers.
    fn connection(
        &mut self,
        runtime: &tokio::runtime::Runtime,
    ) -> Result<&mut PgConnection, StoreError> {
        if self.last_used.elapsed() >= WRITER_IDLE_CHECK
            && let Some(conn) = self.conn.as_mut()
            && runtime.block_on(conn.ping()).is_err()
        {
            self.conn = None;
        }
        if self.conn.is_none() {
            let opened = runtime.block_on(async {
                tokio::time::timeout(
                    WRITER_CONNECT_TIMEOUT,
                    PgConnection::connect_with(&self.options),
                )
                .await
                .map_err(|_| sqlx::Error::PoolTimedOut)?
            })?;
            self.conn = Some(opened);
        }
        self.conn
            .as_mut()
            .ok_or(StoreError::Database(sqlx::Error::PoolClosed))
    }

    /// `result` of work on the connection; a failure drops the connection.
    fn kept<T>(&mut self, result: Result<T, StoreError>) -> Result<T, StoreError> {
        match &result {
            Ok(_) => self.last_used = Instant::now(),
            Err(_) => self.conn = None,
        }
        result
    }
}

/// The appender's runtime, unless it is being dropped.
fn running(
    runtime: &Option<tokio::runtime::Runtime>,
) -> Result<&tokio::runtime::Runtime, StoreError> {
    runtime
        .as_ref()
        .ok_or(StoreError::Database(sqlx::Error::PoolClosed))
}

impl Drop for PgAppender {
    fn drop(&mut self) {
        // The socket first, then its runtime, let go without waiting: the appender may be dropped in
        // async code, where a runtime must not block.
        self.link.conn = None;
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl TrailAppender for PgAppender {
    fn append(&mut self, events: &[SealedEvent]) -> Result<(), StoreError> {
        let runtime = running(&self.runtime)?;
        let conn = self.link.connection(runtime)?;
        let result = runtime.block_on(append_on(conn, &self.chain_nos, events));
        self.link.kept(result)
    }

    fn probe_write(&mut self) -> Result<(), StoreError> {
        let runtime = running(&self.runtime)?;
        let conn = self.link.connection(runtime)?;
        let result = runtime.block_on(probe_on(conn));
        self.link.kept(result)
    }

    fn append_checkpoint(&mut self, checkpoint: &CheckpointRecord) -> Result<(), StoreError> {
        let runtime = running(&self.runtime)?;
        let conn = self.link.connection(runtime)?;
        let result = runtime.block_on(checkpoint_on(conn, checkpoint));
        self.link.kept(result)
    }
}

async fn checkpoint_on(conn: &mut PgConnection, c: &CheckpointRecord) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO audit_checkpoints (chain_id, size, signed_at, note) VALUES ($1, $2, $3, $4)",
    )
    .bind(&c.chain_id)
    .bind(c.size)
    .bind(&c.signed_at)
    .bind(&c.note)
    .execute(conn)
    .await?;
    Ok(())
}

run_reads::run_source!(PgStore);

#[async_trait]
impl Store for PgStore {
    #[tracing::instrument(level = "debug", skip_all)]
    async fn migrate(&self) -> Result<(), StoreError> {
        migrator().run(&self.pool).await?;
        Ok(())
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn close(&self) {
        self.pool.close().await;
    }

    fn push_changes(&self, to: ChangeNudges) {
        let pool = self.pool.clone();
        tokio::spawn(async move {
            let mut failing = false;
            loop {
                if let Err(e) = listen_for_changes(&pool, &to).await
                    && !failing
                {
                    tracing::warn!(error = %e, "not listening for key and switch changes; polling only until it is back");
                }
                failing = true;
                tokio::time::sleep(LISTEN_RETRY).await;
            }
        });
    }

    #[tracing::instrument(level = "debug", skip_all, fields(key_id = %k.key_id))]
    async fn insert_key(&self, k: &KeyRecord) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO api_keys (key_id, name, role, contexts, tier, secret_hash, created_at, expires_at, revoked_at, rotated_from) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        )
        .bind(k.key_id.as_str())
        .bind(&k.name)
        .bind(k.role.as_str())
        .bind(contexts_to_text(&k.contexts))
        .bind(k.tier.as_str())
        .bind(&k.secret_hash)
        .bind(&k.created_at)
        .bind(&k.expires_at)
        .bind(&k.revoked_at)
        .bind(k.rotated_from.as_ref().map(|r| r.as_str()))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    #[tracing::instrument(level = "debug", skip_all, fields(key_id = %key_id))]
    async fn get_key(&self, key_id: &KeyId) -> Result<Option<KeyRecord>, StoreError> {
        let row: Option<KeyRow> = sqlx::query_as(
            "SELECT key_id, name, role, contexts, tier, secret_hash, created_at, expires_at, revoked_at, rotated_from \
             FROM api_keys WHERE key_id = $1",
        )
        .bind(key_id.as_str())
        .fetch_optional(&self.pool)
        .await?;
        row.map(KeyRow::into_record).transpose()
    }

    async fn key_revision(&self) -> Result<i64, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT revision FROM key_revision WHERE id = 1")
                .fetch_one(&self.pool)
                .await?,
        )
    }

    async fn request_policy_reload(
        &self,
        at: &str,
        by: &str,
        revision: &str,
    ) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar(
            "INSERT INTO policy_reloads (requested_at, requested_by, revision) VALUES ($1, $2, $3) RETURNING id",
        )
        .bind(at)
        .bind(by)
        .bind(revision)
        .fetch_one(&self.pool)
        .await?)
    }

    async fn policy_reload_requested(&self) -> Result<i64, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT COALESCE(MAX(id), 0) FROM policy_reloads")
                .fetch_one(&self.pool)
                .await?,
        )
    }

    async fn set_executor_switch(&self, switch: &ExecutorSwitch) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO executor_switches (executor, disabled, changed_at, changed_by, reason) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (executor) DO UPDATE SET disabled = excluded.disabled, \
             changed_at = excluded.changed_at, changed_by = excluded.changed_by, reason = excluded.reason",
        )
        .bind(&switch.executor)
        .bind(switch.disabled)
        .bind(&switch.changed_at)
        .bind(&switch.changed_by)
        .bind(&switch.reason)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn executor_switches(&self) -> Result<Vec<ExecutorSwitch>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT executor, disabled, changed_at, changed_by, reason FROM executor_switches \
             ORDER BY executor",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    async fn collector_run_trace(&self, run_id: &str) -> Result<Option<String>, StoreError> {
        let trace: Option<Option<String>> =
            sqlx::query_scalar("SELECT trace_id FROM collector_runs WHERE run_id = $1")
                .bind(run_id)
                .fetch_optional(&self.pool)
                .await?;
        Ok(trace.flatten())
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn list_keys(&self) -> Result<Vec<KeyRecord>, StoreError> {
        let rows: Vec<KeyRow> = sqlx::query_as(
            "SELECT key_id, name, role, contexts, tier, secret_hash, created_at, expires_at, revoked_at, rotated_from \
             FROM api_keys ORDER BY created_at, key_id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(KeyRow::into_record).collect()
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn count_keys(&self) -> Result<i64, StoreError> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM api_keys")
            .fetch_one(&self.pool)
            .await?;
        Ok(n)
    }

    #[tracing::instrument(level = "debug", skip_all, fields(key_id = %key_id))]
    async fn revoke_key(&self, key_id: &KeyId, at: &str) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE api_keys SET revoked_at = $1 WHERE key_id = $2 AND revoked_at IS NULL",
        )
        .bind(at)
        .bind(key_id.as_str())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    #[tracing::instrument(level = "debug", skip_all, fields(old = %old, new = %new.key_id))]
    async fn rotate_key(&self, old: &KeyId, new: &KeyRecord, at: &str) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query(
            "UPDATE api_keys SET revoked_at = $1 WHERE key_id = $2 AND revoked_at IS NULL",
        )
        .bind(at)
        .bind(old.as_str())
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() != 1 {
            tx.rollback().await?;
            return Ok(false);
        }
        sqlx::query(
            "INSERT INTO api_keys (key_id, name, role, contexts, tier, secret_hash, created_at, expires_at, revoked_at, rotated_from) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        )
        .bind(new.key_id.as_str())
        .bind(&new.name)
        .bind(new.role.as_str())
        .bind(contexts_to_text(&new.contexts))
        .bind(new.tier.as_str())
        .bind(&new.secret_hash)
        .bind(&new.created_at)
        .bind(&new.expires_at)
        .bind(&new.revoked_at)
        .bind(new.rotated_from.as_ref().map(|r| r.as_str()))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    fn appender(&self) -> Result<Box<dyn TrailAppender>, StoreError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| StoreError::Database(sqlx::Error::Io(e)))?;
        Ok(Box::new(PgAppender {
            link: WriterLink {
                options: self.options.clone(),
                conn: None,
                last_used: Instant::now(),
            },
            chain_nos: self.chain_nos.clone(),
            runtime: Some(runtime),
        }))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(events = events.len()))]
    async fn append_events(&self, events: &[SealedEvent]) -> Result<(), StoreError> {
        append_with(&self.pool, &self.chain_nos, events).await
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn probe_write(&self) -> Result<(), StoreError> {
        probe_on(&mut *self.pool.acquire().await?).await
    }

    #[tracing::instrument(level = "debug", skip_all, fields(instance_id = instance_id))]
    async fn latest_chain_tail(&self, instance_id: &str) -> Result<Option<ChainTail>, StoreError> {
        run_reads::latest_chain_tail(self, instance_id).await
    }

    #[tracing::instrument(level = "debug", skip_all, fields(trace_id = trace_id))]
    async fn events_for_trace(&self, trace_id: &str) -> Result<Vec<SealedEvent>, StoreError> {
        run_reads::events_for_trace(self, trace_id).await
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn events_before(
        &self,
        before: Option<(&str, &str, i64)>,
        limit: i64,
    ) -> Result<Vec<SealedEvent>, StoreError> {
        run_reads::events_before(self, before, limit).await
    }

    async fn record_verification(&self, found: &Verification) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO audit_verifications (verified_at, ok, chains, events, duration_ms, finding, source) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&found.verified_at)
        .bind(found.ok)
        .bind(found.chains)
        .bind(found.events)
        .bind(found.duration_ms)
        .bind(&found.finding)
        .bind(&found.source)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn last_verification(&self) -> Result<Option<Verification>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT verified_at, ok, chains, events, duration_ms, finding, source \
             FROM audit_verifications ORDER BY id DESC LIMIT 1",
        )
        .fetch_optional(&self.pool)
        .await?)
    }

    async fn chains(&self) -> Result<Vec<ChainInfo>, StoreError> {
        Ok(sqlx::query_as(
            // The last seq of each chain from its last run, one index lookup each.
            "SELECT chain_id, events, first_at FROM ( \
                 SELECT c.chain_id, c.opened_at AS first_at, \
                        (SELECT (r.pos & 1099511627775) + r.n - 1 FROM audit_runs r \
                         WHERE r.pos >= c.chain_no << 40 AND r.pos < (c.chain_no + 1) << 40 \
                         ORDER BY r.pos DESC LIMIT 1) AS events \
                 FROM audit_chains c) chains \
             WHERE events IS NOT NULL ORDER BY first_at, chain_id",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    #[tracing::instrument(level = "debug", skip_all, fields(chain_id = chain_id, after_seq = after_seq, limit = limit))]
    async fn chain_events(
        &self,
        chain_id: &str,
        after_seq: i64,
        limit: i64,
    ) -> Result<Vec<SealedEvent>, StoreError> {
        run_reads::chain_events(self, chain_id, after_seq, limit).await
    }

    async fn append_checkpoint(&self, checkpoint: &CheckpointRecord) -> Result<(), StoreError> {
        checkpoint_on(&mut *self.pool.acquire().await?, checkpoint).await
    }

    async fn checkpoints(&self) -> Result<Vec<CheckpointRecord>, StoreError> {
        let rows: Vec<CheckpointRecord> = sqlx::query_as(
            "SELECT chain_id, size, signed_at, note FROM audit_checkpoints \
             ORDER BY chain_id, size, id",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }

    async fn latest_checkpoint(
        &self,
        chain_id: &str,
        covering: i64,
    ) -> Result<Option<CheckpointRecord>, StoreError> {
        let row: Option<CheckpointRecord> = sqlx::query_as(
            "SELECT chain_id, size, signed_at, note FROM audit_checkpoints \
             WHERE chain_id = $1 AND size >= $2 ORDER BY size DESC, id DESC LIMIT 1",
        )
        .bind(chain_id)
        .bind(covering)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row)
    }

    async fn chain_hashes(
        &self,
        chain_id: &str,
        after_seq: i64,
        limit: i64,
    ) -> Result<Vec<(i64, String)>, StoreError> {
        run_reads::chain_hashes(self, chain_id, after_seq, limit).await
    }

    #[tracing::instrument(level = "debug", skip_all, fields(source = source, query_key = query_key, run_id = run_id))]
    async fn acquire_collector_lock(
        &self,
        source: &str,
        query_key: &str,
        run_id: &str,
        now: &str,
        expires_at: &str,
    ) -> Result<Option<LockHolder>, StoreError> {
        sqlx::query(
            "DELETE FROM collector_locks WHERE source = $1 AND query_key = $2 AND expires_at < $3",
        )
        .bind(source)
        .bind(query_key)
        .bind(now)
        .execute(&self.pool)
        .await?;
        let taken = sqlx::query(
            "INSERT INTO collector_locks (source, query_key, run_id, acquired_at, expires_at) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (source, query_key) DO NOTHING",
        )
        .bind(source)
        .bind(query_key)
        .bind(run_id)
        .bind(now)
        .bind(expires_at)
        .execute(&self.pool)
        .await?;
        if taken.rows_affected() == 1 {
            return Ok(None);
        }
        let holder: Option<LockHolder> = sqlx::query_as(
            "SELECT run_id, acquired_at FROM collector_locks WHERE source = $1 AND query_key = $2",
        )
        .bind(source)
        .bind(query_key)
        .fetch_optional(&self.pool)
        .await?;
        // Released between our insert and this read: report it as busy anyway; the caller retries.
        Ok(Some(holder.unwrap_or_else(|| LockHolder {
            run_id: "?".into(),
            acquired_at: now.into(),
        })))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(source = source, query_key = query_key, run_id = run_id))]
    async fn release_collector_lock(
        &self,
        source: &str,
        query_key: &str,
        run_id: &str,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "DELETE FROM collector_locks WHERE source = $1 AND query_key = $2 AND run_id = $3",
        )
        .bind(source)
        .bind(query_key)
        .bind(run_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    #[tracing::instrument(level = "debug", skip_all, fields(source = source, query_key = query_key))]
    async fn collector_baseline(
        &self,
        source: &str,
        query_key: &str,
    ) -> Result<Option<(String, Vec<SnapshotRow>)>, StoreError> {
        let run_id: Option<String> = sqlx::query_scalar(
            "SELECT run_id FROM collector_runs WHERE source = $1 AND query_key = $2 AND complete = 1 \
             ORDER BY finished_at DESC, run_id DESC LIMIT 1",
        )
        .bind(source)
        .bind(query_key)
        .fetch_optional(&self.pool)
        .await?;
        let Some(run_id) = run_id else {
            return Ok(None);
        };
        let rows: Vec<SnapshotRow> = sqlx::query_as(
            "SELECT record_id, content_hash, field_hashes FROM collector_snapshots WHERE run_id = $1",
        )
        .bind(&run_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(Some((run_id, rows)))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(run_id = %run.run_id, complete = run.complete, items = run.items))]
    async fn save_collector_run(
        &self,
        run: &CollectorRun,
        snapshot: &[SnapshotRow],
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO collector_runs (run_id, source, query_key, started_at, finished_at, complete, pages, items, errors, trace_id) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        )
        .bind(&run.run_id)
        .bind(&run.source)
        .bind(&run.query_key)
        .bind(&run.started_at)
        .bind(&run.finished_at)
        .bind(i64::from(run.complete))
        .bind(run.pages)
        .bind(run.items)
        .bind(&run.errors)
        .bind(&run.trace_id)
        .execute(&mut *tx)
        .await?;
        if run.complete {
            for chunk in snapshot.chunks(SNAPSHOT_CHUNK) {
                let mut qb: QueryBuilder<Postgres> = QueryBuilder::new(
                    "INSERT INTO collector_snapshots (run_id, record_id, content_hash, field_hashes) ",
                );
                qb.push_values(chunk, |mut b, r| {
                    b.push_bind(run.run_id.clone())
                        .push_bind(r.record_id.clone())
                        .push_bind(r.content_hash.clone())
                        .push_bind(r.field_hashes.clone());
                });
                qb.build().execute(&mut *tx).await?;
                let mut qb: QueryBuilder<Postgres> = QueryBuilder::new(
                    "INSERT INTO collector_records (source, record_id, content_hash, first_seen, last_seen) ",
                );
                qb.push_values(chunk, |mut b, r| {
                    b.push_bind(run.source.clone())
                        .push_bind(r.record_id.clone())
                        .push_bind(r.content_hash.clone())
                        .push_bind(run.finished_at.clone())
                        .push_bind(run.finished_at.clone());
                });
                qb.push(
                    " ON CONFLICT (source, record_id) DO UPDATE SET \
                     content_hash = excluded.content_hash, last_seen = excluded.last_seen",
                );
                qb.build().execute(&mut *tx).await?;
            }
        }
        tx.commit().await?;
        Ok(())
    }

    #[tracing::instrument(level = "debug", skip_all, fields(source = source, record_id = record_id))]
    async fn record_sightings(
        &self,
        source: &str,
        record_id: &str,
    ) -> Result<Option<(String, String)>, StoreError> {
        let seen: Option<Sightings> = sqlx::query_as(
            "SELECT first_seen, last_seen FROM collector_records WHERE source = $1 AND record_id = $2",
        )
        .bind(source)
        .bind(record_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(seen.map(|s| (s.first_seen, s.last_seen)))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(since = since, until = until, limit = limit))]
    async fn events_between(
        &self,
        since: &str,
        until: &str,
        after: Option<(&str, &str, i64)>,
        limit: i64,
    ) -> Result<Vec<SealedEvent>, StoreError> {
        run_reads::events_between(self, since, until, after, limit).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::verify::verify_store;
    use crate::domain::TraceId;
    use crate::store::run_reads::old_chain as chain;

    /// A fresh, empty database on the server named by `CATRACA_TEST_POSTGRES_URL`.
    async fn fresh_database() -> String {
        let base = std::env::var("CATRACA_TEST_POSTGRES_URL")
            .expect("CATRACA_TEST_POSTGRES_URL must name a PostgreSQL server for this test");
        let name = format!("catraca_test_{}", uuid::Uuid::now_v7().simple());
        let mut admin = sqlx::PgConnection::connect(&base).await.unwrap();
        // The name is generated above from a UUID, never from input.
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut admin)
            .await
            .unwrap();
        let (prefix, _) = base.rsplit_once('/').unwrap();
        format!("{prefix}/{name}")
    }

    /// Drops, from the server's side, every connection to the store's database but the one asking.
    async fn drop_other_connections(store: &PgStore) {
        sqlx::query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid()",
        )
        .execute(&store.pool)
        .await
        .unwrap();
    }

    #[tokio::test(flavor = "multi_thread")]
    #[ignore = "needs PostgreSQL at CATRACA_TEST_POSTGRES_URL"]
    async fn the_writer_replaces_a_connection_the_server_dropped() {
        let store = PgStore::connect(&fresh_database().await).await.unwrap();
        store.migrate().await.unwrap();
        let events = chain("w.a", 6, &TraceId::generate());
        let mut appender = Some(store.appender().unwrap());
        // The writer's thread is not the runtime's: each write runs on a blocking thread.
        let mut append = async |from: usize, to: usize| {
            let mut writer = appender.take().unwrap();
            let batch = events[from..to].to_vec();
            let (writer, written) = tokio::task::spawn_blocking(move || {
                let written = writer.append(&batch);
                (writer, written)
            })
            .await
            .unwrap();
            appender = Some(writer);
            written
        };
        append(0, 2).await.unwrap();

        // Dropped while idle: found out before the next write, which commits on a new connection.
        drop_other_connections(&store).await;
        tokio::time::sleep(WRITER_IDLE_CHECK + Duration::from_millis(100)).await;
        append(2, 4).await.unwrap();

        // Dropped between two writes under load: that write fails (its requests fail closed) and the
        // next one, with the same events, commits on a new connection.
        drop_other_connections(&store).await;
        assert!(append(4, 6).await.is_err());
        append(4, 6).await.unwrap();

        assert_eq!(store.chain_events("w.a", 0, 10).await.unwrap(), events);
    }

    #[tokio::test]
    #[ignore = "needs PostgreSQL at CATRACA_TEST_POSTGRES_URL"]
    async fn a_trail_in_the_old_layout_is_carried_over_byte_for_byte() {
        let store = PgStore::connect(&fresh_database().await).await.unwrap();
        let before_runs = migrator()
            .iter()
            .filter(|m| m.version < 11)
            .cloned()
            .collect();
        Migrator::with_migrations(before_runs)
            .run(&store.pool)
            .await
            .unwrap();
        let trace = TraceId::generate();
        let (a, b) = (chain("old.a", 4, &trace), chain("old.b", 2, &trace));
        let mut damaged = chain("old.d", 2, &trace);
        damaged[1].occurred_at = "yesterday".into();
        damaged[1].hash = "not hex".into();
        for e in a.iter().chain(&b).chain(&damaged) {
            sqlx::query(
                "INSERT INTO audit_events (chain_id, seq, event_id, event_type, trace_id, occurred_at, \
                 instance_id, prev_hash, hash, body) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
            )
            .bind(&e.chain_id)
            .bind(e.seq)
            .bind(&e.event_id)
            .bind(&e.event_type)
            .bind(&e.trace_id)
            .bind(&e.occurred_at)
            .bind(&e.instance_id)
            .bind(&e.prev_hash)
            .bind(&e.hash)
            .bind(&e.body)
            .execute(&store.pool)
            .await
            .unwrap();
        }

        store.migrate().await.unwrap();

        assert_eq!(store.chain_events("old.a", 0, 10).await.unwrap(), a);
        assert_eq!(store.chain_events("old.b", 0, 10).await.unwrap(), b);
        let traced: Vec<SealedEvent> = a[1..].iter().chain(&b[1..]).cloned().collect();
        let mut found = store.events_for_trace(trace.as_str()).await.unwrap();
        found.retain(|e| e.chain_id != "old.d");
        assert_eq!(found, traced);
        // The damage is carried over as damage: verification still names it.
        let report = verify_store(&store, |_| {}).await.unwrap();
        let finding = report.finding.expect("the damaged chain is reported");
        assert_eq!(
            (finding.chain_id.as_str(), finding.seq),
            ("old.d", 2),
            "{finding:?}"
        );
        let tail = store.latest_chain_tail("old").await.unwrap().unwrap();
        assert_eq!(tail.chain_id, "old.d");

        // New chains continue in runs; the old columns live on as a view over old runs and new.
        let next = chain("new.c", 3, &trace);
        store.append_events(&next).await.unwrap();
        assert_eq!(store.chain_events("new.c", 1, 10).await.unwrap(), next[1..]);
        let runs: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM audit_runs r JOIN audit_chains c ON c.chain_no = r.pos >> 40 \
             WHERE c.chain_id = 'new.c'",
        )
        .fetch_one(&store.pool)
        .await
        .unwrap();
        assert_eq!(runs, 1);
        for e in [&a[2], &next[2]] {
            let row: (String, String, String, String, String) = sqlx::query_as(
                "SELECT hash, prev_hash, event_id, event_type, body FROM audit_events \
                 WHERE chain_id = $1 AND seq = $2",
            )
            .bind(&e.chain_id)
            .bind(e.seq)
            .fetch_one(&store.pool)
            .await
            .unwrap();
            assert_eq!(
                row,
                (
                    e.hash.clone(),
                    e.prev_hash.clone(),
                    e.event_id.clone(),
                    e.event_type.clone(),
                    e.body.clone()
                )
            );
        }
    }
}
