//! The SQLite trail's writing half: one connection of its own (rusqlite, on the same bundled SQLite as
//! sqlx), used by the audit writer's thread directly, with cached prepared statements and one
//! `BEGIN IMMEDIATE … COMMIT` per group commit. Reads stay on sqlx's pool.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, Transaction, TransactionBehavior, params};

use super::{StoreError, TrailAppender, probe_event};
use crate::event::{SealedEvent, micros_of};

/// How long the writer waits for SQLite's write lock (the CLI may write while the server runs).
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Prepared statements kept per connection: the writer uses four.
const STATEMENT_CACHE: usize = 8;

const INSERT_EVENT: &str = "INSERT INTO audit_trail (chain_no, seq, at_us, trace_id, hash, body) \
                            VALUES (?1, ?2, ?3, ?4, ?5, ?6)";
const REGISTER_CHAIN: &str = "INSERT INTO audit_chains (chain_id, instance_id, opened_at) \
                              VALUES (?1, ?2, ?3) ON CONFLICT (chain_id) DO NOTHING";
const CHAIN_NO: &str = "SELECT chain_no FROM audit_chains WHERE chain_id = ?1";
const WRITE_PROBE: &str = "INSERT INTO write_probe (id, probed_at) VALUES (1, ?1) \
                           ON CONFLICT (id) DO UPDATE SET probed_at = excluded.probed_at";

/// The writing connection and the numbers of the chains it has written to.
pub(super) struct SqliteTrail {
    conn: Connection,
    /// `chain_id` → `audit_chains.chain_no`, remembered once a chain's row is committed.
    chain_nos: HashMap<String, i64>,
}

/// The trail's writing half, shared by the store (async callers, through a blocking task) and the audit
/// writer's thread (the only steady user, so the lock is uncontended).
pub(super) type SharedTrail = Arc<Mutex<SqliteTrail>>;

impl SqliteTrail {
    /// Opens the database file at `path` (which sqlx has created) for writing, with the durability the
    /// trail promises: WAL, `synchronous=FULL` (a committed batch survives a crash or a power loss).
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
        Ok(Arc::new(Mutex::new(Self {
            conn,
            chain_nos: HashMap::new(),
        })))
    }

    /// Appends `events` in one transaction, naming chains not seen before.
    pub(super) fn append(&mut self, events: &[SealedEvent]) -> Result<(), StoreError> {
        if events.is_empty() {
            return Ok(());
        }
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let registered = insert_events(&tx, &self.chain_nos, events)?;
        tx.commit()?;
        self.chain_nos.extend(registered);
        Ok(())
    }

    /// The audit tables take a row (their triggers and constraints), rolled back; then a committed
    /// write of a row of its own reaches the disk.
    pub(super) fn probe_write(&mut self) -> Result<(), StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        insert_events(&tx, &self.chain_nos, &[probe_event()])?;
        tx.rollback()?;
        let now = crate::event::timestamp(time::OffsetDateTime::now_utc());
        self.conn.prepare_cached(WRITE_PROBE)?.execute([now])?;
        Ok(())
    }
}

/// Inserts `events` within `tx`; returns the chains it registered, to be remembered once `tx` commits.
fn insert_events(
    tx: &Transaction<'_>,
    known: &HashMap<String, i64>,
    events: &[SealedEvent],
) -> Result<Vec<(String, i64)>, StoreError> {
    let mut registered: Vec<(String, i64)> = Vec::new();
    let mut insert = tx.prepare_cached(INSERT_EVENT)?;
    for run in events.chunk_by(|a, b| a.chain_id == b.chain_id) {
        let first = &run[0];
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
        for e in run {
            let mut hash = [0u8; 32];
            // A hash that is not hex (never one the writer made) is kept as its text's bytes.
            let stored: &[u8] = match hex::decode_to_slice(&e.hash, &mut hash) {
                Ok(()) => &hash,
                Err(_) => e.hash.as_bytes(),
            };
            // The search columns copy what the body says (a time that is not one sorts at 0, and
            // verification reports the event).
            let at_us = micros_of(&e.occurred_at).unwrap_or(0);
            insert.execute(params![chain_no, e.seq, at_us, e.trace_id, stored, e.body])?;
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
}
