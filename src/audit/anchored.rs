//! Verification against signed checkpoints: what `catraca audit verify` adds to the chains' own checks.
//!
//! Every checkpoint (those in the database, and copies kept outside it: `checkpoints.ndjson` files) must
//! open with the public key; every chain's events must hash, leaf by leaf, to the root of each of its
//! checkpoints; a chain must hold at least the events its checkpoints cover (a cut tail, or a database
//! restored from an older copy); no event may follow a chain's closing checkpoint (a forged append after
//! its writer stopped); and every checkpoint kept outside must also be in the database.

use std::collections::{HashMap, VecDeque};
use std::io::BufRead as _;
use std::path::{Path, PathBuf};

use tlog_tiles::Hash;

use super::anchor::{CheckpointRecord, Frontier, PublicKey, leaf};
use super::finding::{Finding, Problem, finding};
use crate::store::{Store, StoreError};

/// The checkpoints a verification holds the trail to.
pub struct Anchors {
    pub key: PublicKey,
    /// `checkpoints.ndjson` files kept away from the database.
    pub outside: Vec<PathBuf>,
}

/// One signed checkpoint of a chain, opened.
#[derive(Debug, Clone)]
struct Promise {
    size: u64,
    root: Hash,
    closed: bool,
    /// Where it was read (`database`, or a file).
    from: String,
}

/// A chain's checkpoints, checked as its events pass.
#[derive(Debug, Default)]
pub struct ChainAnchors {
    tree: Frontier,
    /// By size, smallest first.
    due: VecDeque<Promise>,
    /// The size of a closing checkpoint already passed.
    closed_at: Option<u64>,
    /// The first disagreement with a checkpoint, reported after the chains' own checks (which name
    /// the first broken event where they can).
    found: Option<Finding>,
}

impl ChainAnchors {
    /// Takes the next event of the chain (already checked in its place and links).
    pub fn follow(&mut self, chain_id: &str, seq: i64, hash: &str) {
        if self.found.is_none()
            && let Err(f) = self.compare(chain_id, seq, hash)
        {
            self.found = Some(f);
        }
    }

    fn compare(&mut self, chain_id: &str, seq: i64, hash: &str) -> Result<(), Finding> {
        if let Some(size) = self.closed_at {
            return Err(finding(
                Problem::Unanchored,
                chain_id,
                seq,
                format!(
                    "event {seq} follows the chain's closing checkpoint of {size} events (its writer had \
                     stopped): an append after it was forged"
                ),
            ));
        }
        let Some(l) = leaf(hash) else {
            return Err(finding(
                Problem::HashMismatch,
                chain_id,
                seq,
                "the event's hash is not 64 hex digits",
            ));
        };
        self.tree
            .push(l)
            .map_err(|e| finding(Problem::CheckpointMismatch, chain_id, seq, e.to_string()))?;
        while self.due.front().is_some_and(|p| p.size <= self.tree.size()) {
            let Some(p) = self.due.pop_front() else { break };
            let root = self
                .tree
                .root()
                .map_err(|e| finding(Problem::CheckpointMismatch, chain_id, seq, e.to_string()))?;
            if root != p.root {
                return Err(finding(
                    Problem::CheckpointMismatch,
                    chain_id,
                    seq,
                    format!(
                        "events 1..{} do not hash to the root of their signed checkpoint ({}): the chain \
                         was rewritten",
                        p.size, p.from
                    ),
                ));
            }
            if p.closed {
                self.closed_at = Some(p.size);
            }
        }
        Ok(())
    }

    /// After the chain's last event (`last_seq`): the first disagreement, or a checkpoint covering
    /// more than the chain holds (a cut tail).
    pub fn finish(&self, chain_id: &str, last_seq: i64) -> Option<Finding> {
        if let Some(f) = &self.found {
            return Some(f.clone());
        }
        let p = self.due.back()?;
        Some(finding(
            Problem::Truncation,
            chain_id,
            last_seq + 1,
            format!(
                "a signed checkpoint ({}) covers {} events, but the chain ends at seq {last_seq}: its \
                 tail was cut, or the database was restored from an older copy",
                p.size, p.from
            ),
        ))
    }
}

/// Every chain's checkpoints, and what was found before any event was read.
pub struct Gathered {
    pub chains: HashMap<String, ChainAnchors>,
    /// A checkpoint that does not open (forged, or signed by another key).
    pub bad: Option<Finding>,
    /// A checkpoint kept outside that the database lacks.
    pub missing: Option<Finding>,
}

/// Reads and opens the store's checkpoints and the outside copies.
pub async fn gather(store: &dyn Store, anchors: &Anchors) -> Result<Gathered, StoreError> {
    let stored = store.checkpoints().await?;
    let mut gathered = Gathered {
        chains: HashMap::new(),
        bad: None,
        missing: None,
    };
    let in_database: std::collections::HashSet<&str> =
        stored.iter().map(|c| c.note.as_str()).collect();
    let mut all: Vec<(String, CheckpointRecord)> = stored
        .iter()
        .map(|c| ("the database".to_owned(), c.clone()))
        .collect();
    for path in &anchors.outside {
        match read_outside(path) {
            Ok(records) => {
                for (line, c) in records {
                    if gathered.missing.is_none() && !in_database.contains(c.note.as_str()) {
                        gathered.missing = Some(finding(
                            Problem::MissingCheckpoint,
                            &c.chain_id,
                            c.size,
                            format!(
                                "the checkpoint of {} events at {}:{line} is not in the database: it was \
                                 deleted, or the database was restored from an older copy",
                                c.size,
                                path.display()
                            ),
                        ));
                    }
                    all.push((format!("{}:{line}", path.display()), c));
                }
            }
            Err(e) => {
                gathered.bad.get_or_insert(finding(
                    Problem::BadCheckpoint,
                    "",
                    0,
                    format!("{} cannot be read: {e}", path.display()),
                ));
            }
        }
    }
    for (from, c) in all {
        match anchors.key.open(&c.note) {
            Ok(opened)
                if opened.chain_id == c.chain_id && i64::try_from(opened.size) == Ok(c.size) =>
            {
                gathered
                    .chains
                    .entry(opened.chain_id)
                    .or_default()
                    .due
                    .push_back(Promise {
                        size: opened.size,
                        root: opened.root,
                        closed: opened.closed,
                        from,
                    });
            }
            Ok(_) => {
                gathered.bad.get_or_insert(finding(
                    Problem::BadCheckpoint,
                    &c.chain_id,
                    c.size,
                    format!("the checkpoint in {from} names another chain or size than its row"),
                ));
            }
            Err(e) => {
                gathered.bad.get_or_insert(finding(
                    Problem::BadCheckpoint,
                    &c.chain_id,
                    c.size,
                    format!(
                        "the checkpoint of {} events in {from} is not genuine: {e}",
                        c.size
                    ),
                ));
            }
        }
    }
    for chain in gathered.chains.values_mut() {
        chain
            .due
            .make_contiguous()
            .sort_by_key(|p| (p.size, p.closed));
    }
    Ok(gathered)
}

/// The records of a `checkpoints.ndjson` file, with their line numbers.
fn read_outside(path: &Path) -> std::io::Result<Vec<(usize, CheckpointRecord)>> {
    let reader = std::io::BufReader::new(std::fs::File::open(path)?);
    let mut records = Vec::new();
    for (n, line) in reader.lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let record = serde_json::from_str(&line).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("line {}: {e}", n + 1),
            )
        })?;
        records.push((n + 1, record));
    }
    Ok(records)
}
