//! The SQLite trail's writing half: one connection of its own (rusqlite, on the same bundled SQLite as
//! sqlx), used by the audit writer's thread directly, with cached prepared statements and one
//! `BEGIN IMMEDIATE … COMMIT` per group commit, in which each chain's events become runs (see
//! [`super::runs`]). Reads stay on sqlx's pool.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, Transaction, TransactionBehavior, params};

use super::runs::{Packer, runs_of};
use super::{CheckpointRecord, StoreError, TrailAppender, probe_event};
use crate::event::SealedEvent;

/// How long the writer waits for SQLite's write lock (the CLI may write while the server runs).
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Prepared statements kept per connection: the writer uses six.
const STATEMENT_CACHE: usize = 8;
/// Pages of SQLite's cache for the writing connection (negative: KiB): the right edges of the trail's
/// trees (its keys grow with time) and the chains table stay in memory, so a commit reads nothing back
/// from the disk. More would only hold pages the writer never reads again, and fill up as the trail
/// grows (it did: a 16 MiB cache was most of the gateway's growth in its first minute).
const CACHE_KIB: i64 = 2 * 1024;

/// Log pages after which a commit copies the log into the database file (SQLite's default is 1000).
/// The copy and its sync run inside that commit, so every request queued behind it waits: half the
/// pages, twice as often, halves the wait and took the p99 of `/process` at half its saturated rate
/// from about 6.5 ms to under 5 ms here (scripts/bench.sh), for no throughput the noise could show.
const CHECKPOINT_PAGES: i64 = 512;

const INSERT_RUN: &str = "INSERT INTO audit_runs (pos, n, at_min, hashes, bodies, size) \
                          VALUES (?1, ?2, ?3, ?4, ?5, ?6)";
const INSERT_TRACE: &str = "INSERT OR IGNORE INTO audit_run_traces (trace_id, pos) VALUES (?1, ?2)";
const REGISTER_CHAIN: &str = "INSERT INTO audit_chains (chain_id, instance_id, opened_at) \
                              VALUES (?1, ?2, ?3) ON CONFLICT (chain_id) DO NOTHING";
const CHAIN_NO: &str = "SELECT chain_no FROM audit_chains WHERE chain_id = ?1";
const INSERT_CHECKPOINT: &str =
    "INSERT INTO audit_checkpoints (chain_id, size, signed_at, note) VALUES (?1, ?2, ?3, ?4)";
const WRITE_PROBE: &str = "INSERT INTO write_probe (id, probed_at) VALUES (1, ?1) \
                           ON CONFLICT (id) DO UPDATE SET probed_at = excluded.probed_at";

/// The writing connection and the numbers of the chains it has written to.
pub(super) struct SqliteTrail {
    /// `None` once the store is closed.
    conn: Option<Connection>,
    /// `chain_id` → `audit_chains.chain_no`, remembered once a chain's row is committed.
    chain_nos: HashMap<String, i64>,
    packer: Packer,
}

/// The trail's writing half, shared by the store (async callers, through a blocking task) and the audit
/// writer's thread (the only steady user, so the lock is uncontended).
pub(super) type SharedTrail = Arc<Mutex<SqliteTrail>>;

impl SqliteTrail {
    /// Opens the database file at `path` (which sqlx has created) for writing, with the durability the
    /// trail promises: WAL, `synchronous=FULL` (a committed group survives a crash or a power loss).
    pub(super) fn open(path: &Path) -> Result<SharedTrail, StoreError> {
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(path, flags)?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Corrupt(format!(
                "the database at {} cannot use WAL (journal mode {mode})",
                path.display()
            )));
        }
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.pragma_update(None, "cache_size", -CACHE_KIB)?;
        conn.pragma_update(None, "wal_autocheckpoint", CHECKPOINT_PAGES)?;
        Ok(Arc::new(Mutex::new(Self {
            conn: Some(conn),
            chain_nos: HashMap::new(),
            packer: Packer::default(),
        })))
    }

    /// Closes the writing connection (SQLite folds the write-ahead log back into the database file).
    pub(super) fn close(&mut self) {
        if let Some(conn) = self.conn.take()
            && let Err((_, e)) = conn.close()
        {
            tracing::warn!(error = %e, "the trail's connection did not close cleanly");
        }
    }

    /// Appends `events` in one transaction, as runs, naming chains not seen before.
    pub(super) fn append(&mut self, events: &[SealedEvent]) -> Result<(), StoreError> {
        if events.is_empty() {
            return Ok(());
        }
        let tx = open(&mut self.conn)?.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let registered = insert_events(&tx, &self.chain_nos, &mut self.packer, events)?;
        tx.commit()?;
        self.chain_nos.extend(registered);
        Ok(())
    }

    /// The audit tables take a row (their triggers and constraints), rolled back; then a committed
    /// write of a row of its own reaches the disk.
    pub(super) fn probe_write(&mut self) -> Result<(), StoreError> {
        let tx = open(&mut self.conn)?.transaction_with_behavior(TransactionBehavior::Immediate)?;
        insert_events(&tx, &self.chain_nos, &mut self.packer, &[probe_event()])?;
        tx.rollback()?;
        let now = crate::event::timestamp(time::OffsetDateTime::now_utc());
        open(&mut self.conn)?
            .prepare_cached(WRITE_PROBE)?
            .execute([now])?;
        Ok(())
    }
}

impl SqliteTrail {
    /// Stores a signed checkpoint, committed on its own.
    pub(super) fn append_checkpoint(&mut self, c: &CheckpointRecord) -> Result<(), StoreError> {
        open(&mut self.conn)?
            .prepare_cached(INSERT_CHECKPOINT)?
            .execute(params![c.chain_id, c.size, c.signed_at, c.note])?;
        Ok(())
    }
}

/// The connection in `conn`, unless the store was closed (then writes fail as the pool's reads do).
fn open(conn: &mut Option<Connection>) -> Result<&mut Connection, StoreError> {
    conn.as_mut()
        .ok_or(StoreError::Database(sqlx::Error::PoolClosed))
}

/// Inserts `events` as runs within `tx`; returns the chains it registered, to be remembered once `tx`
/// commits.
fn insert_events(
    tx: &Transaction<'_>,
    known: &HashMap<String, i64>,
    packer: &mut Packer,
    events: &[SealedEvent],
) -> Result<Vec<(String, i64)>, StoreError> {
    let mut registered: Vec<(String, i64)> = Vec::new();
    let mut insert_run = tx.prepare_cached(INSERT_RUN)?;
    let mut insert_trace = tx.prepare_cached(INSERT_TRACE)?;
    for chain in events.chunk_by(|a, b| a.chain_id == b.chain_id) {
        let first = &chain[0];
        let chain_no = match known.get(&first.chain_id) {
            Some(&n) => n,
            None => match registered.iter().find(|(id, _)| *id == first.chain_id) {
                Some(&(_, n)) => n,
                None => {
                    let n = register_chain(tx, first)?;
                    registered.push((first.chain_id.clone(), n));
                    n
                }
            },
        };
        for run in runs_of(chain) {
            let pos = run
                .position_in(chain_no, &first.chain_id)
                .map_err(StoreError::Corrupt)?;
            let size = i64::try_from(run.bodies.len()).unwrap_or(i64::MAX);
            let packed = packer.pack(&run.bodies).map_err(StoreError::Corrupt)?;
            insert_run.execute(params![
                pos, run.count, run.at_min, run.hashes, packed, size
            ])?;
            for trace in &run.traces {
                insert_trace.execute(params![trace, pos])?;
            }
        }
    }
    Ok(registered)
}

/// The number of `first`'s chain, naming the chain in `audit_chains` if it is new.
fn register_chain(tx: &Transaction<'_>, first: &SealedEvent) -> Result<i64, StoreError> {
    tx.prepare_cached(REGISTER_CHAIN)?.execute(params![
        first.chain_id,
        first.instance_id,
        first.occurred_at
    ])?;
    Ok(tx
        .prepare_cached(CHAIN_NO)?
        .query_row([&first.chain_id], |r| r.get(0))?)
}

/// The audit writer's appender: the shared writing half, locked per call.
pub(super) struct SqliteAppender(pub(super) SharedTrail);

impl SqliteAppender {
    fn trail(&self) -> std::sync::MutexGuard<'_, SqliteTrail> {
        // A panic while holding the lock leaves no half transaction: rusqlite rolls back on drop.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl TrailAppender for SqliteAppender {
    fn append(&mut self, events: &[SealedEvent]) -> Result<(), StoreError> {
        self.trail().append(events)
    }

    fn probe_write(&mut self) -> Result<(), StoreError> {
        self.trail().probe_write()
    }

    fn append_checkpoint(&mut self, checkpoint: &CheckpointRecord) -> Result<(), StoreError> {
        self.trail().append_checkpoint(checkpoint)
    }
}
