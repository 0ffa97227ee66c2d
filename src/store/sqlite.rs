//! SQLite store: the embedded default. WAL with `synchronous=FULL`, so a committed batch survives a crash.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{QueryBuilder, SqlSafeStr, Sqlite, SqlitePool};

use super::rows::{KeyRow, Sightings};
use super::run_reads;
use super::sqlite_trail::{SharedTrail, SqliteAppender, SqliteTrail};
use super::{
    ChainInfo, ChainTail, CheckpointRecord, CollectorRun, ExecutorSwitch, KeyRecord, LockHolder,
    SNAPSHOT_CHUNK, SnapshotRow, Store, StoreError, TrailAppender, Verification, contexts_to_text,
};
use crate::domain::KeyId;
use crate::event::SealedEvent;

/// How long a connection waits for SQLite's write lock (the CLI may write while the server runs).
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

pub struct SqliteStore {
    pool: SqlitePool,
    /// The trail's writing half: a connection of its own for the audit writer's thread (SQLite has
    /// one writer at a time anyway, and readers in WAL mode never wait for it).
    trail: SharedTrail,
}

fn migrator() -> Migrator {
    Migrator::with_migrations(migrations())
}

fn migrations() -> Vec<Migration> {
    vec![
        Migration::new(
            1,
            "init".into(),
            MigrationType::Simple,
            include_str!("../../migrations/sqlite/0001_init.sql").into_sql_str(),
            false,
        ),
        Migration::new(
            2,
            "collector".into(),
            MigrationType::Simple,
            include_str!("../../migrations/sqlite/0002_collector.sql").into_sql_str(),
            false,
        ),
        Migration::new(
            3,
            "key revision".into(),
            MigrationType::Simple,
            include_str!("../../migrations/sqlite/0003_key_revision.sql").into_sql_str(),
            false,
        ),
        Migration::new(
            4,
            "write probe".into(),
            MigrationType::Simple,
            include_str!("../../migrations/sqlite/0004_write_probe.sql").into_sql_str(),
            false,
        ),
        Migration::new(
            5,
            "executor switches".into(),
            MigrationType::Simple,
            include_str!("../../migrations/sqlite/0005_executor_switches.sql").into_sql_str(),
            false,
        ),
        Migration::new(
            6,
            "collector run trace".into(),
            MigrationType::Simple,
            include_str!("../../migrations/sqlite/0006_collector_run_trace.sql").into_sql_str(),
            false,
        ),
        Migration::new(
            7,
            "compact trail".into(),
            MigrationType::Simple,
            include_str!("../../migrations/sqlite/0007_compact_trail.sql").into_sql_str(),
            false,
        ),
        Migration::new(
            8,
            "verifications".into(),
            MigrationType::Simple,
            include_str!("../../migrations/sqlite/0008_verifications.sql").into_sql_str(),
            false,
        ),
        Migration::new(
            9,
            "trail runs".into(),
            MigrationType::Simple,
            include_str!("../../migrations/sqlite/0009_trail_runs.sql").into_sql_str(),
            false,
        ),
        Migration::new(
            10,
            "policy reloads".into(),
            MigrationType::Simple,
            include_str!("../../migrations/sqlite/0010_policy_reloads.sql").into_sql_str(),
            false,
        ),
        Migration::new(
            11,
            "checkpoints".into(),
            MigrationType::Simple,
            include_str!("../../migrations/sqlite/0011_checkpoints.sql").into_sql_str(),
            false,
        ),
        Migration::new(
            12,
            "packed runs".into(),
            MigrationType::Simple,
            include_str!("../../migrations/sqlite/0012_packed_runs.sql").into_sql_str(),
            false,
        ),
    ]
}

/// A read of runs: `SELECT` of [`RunRow`]'s columns from the runs joined with their chains (`r`, `c`),
/// followed by the rest of the query.
macro_rules! select_runs {
    ($rest:literal) => {
        concat!(
            "SELECT r.at_min, r.n, c.chain_id, r.pos, r.hashes, CAST(r.bodies AS BLOB), r.size \
             FROM audit_runs r JOIN audit_chains c ON c.chain_no = r.pos >> 40 ",
            $rest
        )
    };
}

/// Runs a write of the trail's own connection on a blocking thread.
async fn blocking(
    write: impl FnOnce() -> Result<(), StoreError> + Send + 'static,
) -> Result<(), StoreError> {
    tokio::task::spawn_blocking(write)
        .await
        .map_err(|e| StoreError::Corrupt(format!("trail write stopped: {e}")))?
}

impl SqliteStore {
    /// Opens (creating the file and its folder if needed) the database at `url`.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(BUSY_TIMEOUT);
        if options.get_filename() == Path::new(":memory:") || url.contains("mode=memory") {
            // The trail must outlive the process, and its writer opens the file a second time.
            return Err(StoreError::Corrupt(
                "an in-memory SQLite database cannot hold the audit trail: name a file".into(),
            ));
        }
        if let Some(parent) = options.get_filename().parent()
            && !parent.as_os_str().is_empty()
        {
            std::fs::create_dir_all(parent).map_err(|e| {
                StoreError::Corrupt(format!(
                    "creating database folder {}: {e}",
                    parent.display()
                ))
            })?;
        }
        // Readers run in parallel in WAL mode; the audit writer is the only steady writer.
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options.clone())
            .await?;
        let trail = SqliteTrail::open(options.get_filename())?;
        Ok(Self { pool, trail })
    }
}

run_reads::run_source!(SqliteStore);

#[async_trait]
impl Store for SqliteStore {
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
        let trail = self.trail.clone();
        let _ = tokio::task::spawn_blocking(move || {
            trail
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .close();
        })
        .await;
    }

    #[tracing::instrument(level = "debug", skip_all, fields(key_id = %k.key_id))]
    async fn insert_key(&self, k: &KeyRecord) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO api_keys (key_id, name, role, contexts, tier, secret_hash, created_at, expires_at, revoked_at, rotated_from) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
             FROM api_keys WHERE key_id = ?",
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
            "INSERT INTO policy_reloads (requested_at, requested_by, revision) VALUES (?, ?, ?) RETURNING id",
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
             VALUES (?, ?, ?, ?, ?) ON CONFLICT (executor) DO UPDATE SET disabled = excluded.disabled, \
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
            sqlx::query_scalar("SELECT trace_id FROM collector_runs WHERE run_id = ?")
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
            "UPDATE api_keys SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL",
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
            "UPDATE api_keys SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL",
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
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
        Ok(Box::new(SqliteAppender(self.trail.clone())))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(events = events.len()))]
    async fn append_events(&self, events: &[SealedEvent]) -> Result<(), StoreError> {
        let mut appender = SqliteAppender(self.trail.clone());
        let events = events.to_vec();
        blocking(move || appender.append(&events)).await
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn probe_write(&self) -> Result<(), StoreError> {
        let mut appender = SqliteAppender(self.trail.clone());
        blocking(move || appender.probe_write()).await
    }

    async fn append_checkpoint(&self, checkpoint: &CheckpointRecord) -> Result<(), StoreError> {
        let mut appender = SqliteAppender(self.trail.clone());
        let checkpoint = checkpoint.clone();
        blocking(move || appender.append_checkpoint(&checkpoint)).await
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
             WHERE chain_id = ? AND size >= ? ORDER BY size DESC, id DESC LIMIT 1",
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
             VALUES (?, ?, ?, ?, ?, ?, ?)",
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
                 FROM audit_chains c) \
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
            "DELETE FROM collector_locks WHERE source = ? AND query_key = ? AND expires_at < ?",
        )
        .bind(source)
        .bind(query_key)
        .bind(now)
        .execute(&self.pool)
        .await?;
        let taken = sqlx::query(
            "INSERT INTO collector_locks (source, query_key, run_id, acquired_at, expires_at) \
             VALUES (?, ?, ?, ?, ?) ON CONFLICT (source, query_key) DO NOTHING",
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
            "SELECT run_id, acquired_at FROM collector_locks WHERE source = ? AND query_key = ?",
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
            "DELETE FROM collector_locks WHERE source = ? AND query_key = ? AND run_id = ?",
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
            "SELECT run_id FROM collector_runs WHERE source = ? AND query_key = ? AND complete = 1 \
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
            "SELECT record_id, content_hash, field_hashes FROM collector_snapshots WHERE run_id = ?",
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
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
                let mut qb: QueryBuilder<Sqlite> = QueryBuilder::new(
                    "INSERT INTO collector_snapshots (run_id, record_id, content_hash, field_hashes) ",
                );
                qb.push_values(chunk, |mut b, r| {
                    b.push_bind(run.run_id.clone())
                        .push_bind(r.record_id.clone())
                        .push_bind(r.content_hash.clone())
                        .push_bind(r.field_hashes.clone());
                });
                qb.build().execute(&mut *tx).await?;
                let mut qb: QueryBuilder<Sqlite> = QueryBuilder::new(
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
            "SELECT first_seen, last_seen FROM collector_records WHERE source = ? AND record_id = ?",
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
    use crate::event::{EventType, PendingEvent, seal};
    use crate::store::run_reads::old_chain as chain;

    #[tokio::test]
    async fn a_chain_is_read_page_by_page_past_runs_and_past_a_forged_far_off_seq() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/pages.db", dir.path().display());
        let store = SqliteStore::connect(&url).await.unwrap();
        store.migrate().await.unwrap();
        let trace = TraceId::generate();
        let mut events = chain("c", 300, &trace);
        // An event forged a million places further on: readers must still reach it.
        let far = PendingEvent::new(EventType::RequestStart, Some(&trace), serde_json::json!({}));
        events.push(seal(far, "c", "old", 1_000_000, &events[299].hash).unwrap());
        store.append_events(&events).await.unwrap();
        let seqs = |page: &[SealedEvent]| page.iter().map(|e| e.seq).collect::<Vec<_>>();

        assert_eq!(
            seqs(&store.chain_events("c", 0, 10).await.unwrap()),
            (1..=10).collect::<Vec<_>>()
        );
        assert_eq!(
            seqs(&store.chain_events("c", 295, 10).await.unwrap()),
            vec![296, 297, 298, 299, 300, 1_000_000]
        );
        assert_eq!(
            seqs(&store.chain_events("c", 300, 5).await.unwrap()),
            vec![1_000_000]
        );
        // Pages that straddle runs give every event once, in order, and the hashes read alone agree.
        let (mut read, mut after) = (Vec::new(), 0);
        loop {
            let page = store.chain_events("c", after, 7).await.unwrap();
            let hashes = store.chain_hashes("c", after, 7).await.unwrap();
            assert_eq!(
                hashes,
                page.iter()
                    .map(|e| (e.seq, e.hash.clone()))
                    .collect::<Vec<_>>()
            );
            let Some(last) = page.last() else { break };
            after = last.seq;
            read.extend(page);
        }
        assert_eq!(read, events);
    }

    #[tokio::test]
    async fn a_trail_in_the_old_layout_is_carried_over_byte_for_byte() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/old.db", dir.path().display());
        let store = SqliteStore::connect(&url).await.unwrap();
        let before_compaction = migrations().into_iter().filter(|m| m.version < 7);
        Migrator::with_migrations(before_compaction.collect())
            .run(&store.pool)
            .await
            .unwrap();
        let trace = TraceId::generate();
        let (a, b) = (chain("old.a", 4, &trace), chain("old.b", 2, &trace));
        for e in a.iter().chain(&b) {
            sqlx::query(
                "INSERT INTO audit_events (chain_id, seq, event_id, event_type, trace_id, occurred_at, \
                 instance_id, prev_hash, hash, body) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
        assert_eq!(
            store.events_for_trace(trace.as_str()).await.unwrap(),
            traced
        );
        let tail = store.latest_chain_tail("old").await.unwrap().unwrap();
        assert_eq!((tail.chain_id.as_str(), tail.seq), ("old.b", 2));
        assert_eq!(tail.hash, b[1].hash);
        let report = verify_store(&store, |_| {}).await.unwrap();
        assert_eq!((report.finding, report.events), (None, 6));
        // The new chain continues on the new layout, its bodies packed.
        let next = chain("new.c", 3, &trace);
        store.append_events(&next).await.unwrap();
        assert_eq!(store.chain_events("new.c", 1, 10).await.unwrap(), next[1..]);
        let (packed,): (i64,) = sqlx::query_as(
            "SELECT COUNT(*) FROM audit_runs WHERE size IS NOT NULL AND typeof(bodies) = 'blob'",
        )
        .fetch_one(&store.pool)
        .await
        .unwrap();
        assert_eq!(packed, 1);
        store.close().await;

        // The old columns live on as a view, over old runs and packed ones alike, wherever
        // `sqlar_uncompress` exists (the sqlite3 shell's function, made here as the shell makes it).
        let file = dir.path().join("old.db");
        let conn = rusqlite::Connection::open(&file).unwrap();
        conn.create_scalar_function(
            "sqlar_uncompress",
            2,
            rusqlite::functions::FunctionFlags::SQLITE_UTF8,
            |ctx| {
                let (data, size): (Vec<u8>, i64) = (ctx.get(0)?, ctx.get(1)?);
                if i64::try_from(data.len()) == Ok(size) {
                    return Ok(data);
                }
                let mut out = Vec::new();
                std::io::Read::read_to_end(
                    &mut flate2::read::ZlibDecoder::new(&data[..]),
                    &mut out,
                )
                .map_err(|e| rusqlite::Error::UserFunctionError(e.into()))?;
                Ok(out)
            },
        )
        .unwrap();
        let row = |chain: &str, seq: i64| {
            conn.query_row(
                "SELECT hash, prev_hash, event_type, body FROM audit_events WHERE chain_id = ?1 AND seq = ?2",
                rusqlite::params![chain, seq],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .unwrap()
        };
        for e in [&a[2], &next[2]] {
            let (hash, prev_hash, event_type, body): (String, String, String, String) =
                row(&e.chain_id, e.seq);
            assert_eq!(
                (hash, prev_hash, event_type, body),
                (
                    e.hash.clone(),
                    e.prev_hash.clone(),
                    e.event_type.clone(),
                    e.body.clone()
                )
            );
        }
    }
}
