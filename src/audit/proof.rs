//! Proofs that the trail holds a decision: the DECISION event as it was hashed, its receipt, a signed
//! checkpoint of its chain and the RFC 6962 inclusion proof that leads from the event to that
//! checkpoint's root. [`prove`] builds one from the store (for `GET /v1/audit/proofs/{decision_id}` and
//! `catraca audit prove`); [`verify_offline`] checks one with nothing but the public key.

use std::cell::RefCell;
use std::collections::HashMap;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tlog_tiles::{Hash, HashReader};

use super::anchor::{Frontier, PublicKey, Receipt, leaf};
use crate::event::{chain_hash, timestamp_of_micros};
use crate::store::{Store, StoreError};

/// Hashes read from the store at a time while a subtree is summed.
const HASH_PAGE: i64 = 10_000;
/// Events read at a time while the DECISION is looked for.
const SEARCH_PAGE: i64 = 2_000;
/// Where a DECISION is looked for, around the time its id carries (a UUIDv7 holds the millisecond it
/// was made; the DECISION event follows it within the request's gates): first close by, then wider.
const SEARCH_WINDOWS_MS: [(i64, i64); 2] = [(-2_000, 5_000), (5_000, 300_000)];

/// A decision's receipt with what proves it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DecisionProof {
    pub receipt: Receipt,
    /// The DECISION event exactly as hashed: `hash = SHA-256(prev_hash ‖ body)`. The body names the
    /// decision, the key, the action and the policy revision that decided.
    pub event: ProvenEvent,
    /// The event's leaf in its chain's tree: `seq - 1`.
    pub leaf_index: u64,
    /// The checkpoint's tree size.
    pub tree_size: u64,
    /// The signed checkpoint (a C2SP signed note) the proof leads to.
    pub checkpoint: String,
    /// The RFC 6962 inclusion proof: base64 hashes, from the leaf's sibling up.
    pub inclusion_proof: Vec<String>,
}

/// An event as it was hashed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ProvenEvent {
    pub prev_hash: String,
    /// RFC 8785 canonical JSON of the event without `hash`.
    pub body: String,
}

/// Why no proof was made.
#[derive(Debug, thiserror::Error)]
pub enum ProofError {
    #[error("no DECISION with this decision id is in the trail")]
    NotFound,
    #[error(
        "the decision is not yet covered by a signed checkpoint of chain {0}; checkpoints follow within a second"
    )]
    NotYetSigned(String),
    #[error("the trail does not match its signed checkpoint: {0}")]
    Broken(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What an offline check of a proof established.
#[derive(Debug, Clone)]
pub struct Verified {
    pub chain_id: String,
    pub seq: i64,
    pub tree_size: u64,
    /// The DECISION event's body, parsed.
    pub event: Value,
}

/// The proof of the DECISION `decision_id` against the newest signed checkpoint of its chain.
pub async fn prove(
    store: &dyn Store,
    key: &PublicKey,
    decision_id: &str,
) -> Result<DecisionProof, ProofError> {
    let event = find_decision(store, decision_id).await?;
    let Some(checkpoint) = store.latest_checkpoint(&event.chain_id, event.seq).await? else {
        return Err(ProofError::NotYetSigned(event.chain_id));
    };
    let opened = key
        .open(&checkpoint.note)
        .map_err(|e| ProofError::Broken(format!("the checkpoint does not open: {e}")))?;
    let (size, index) = (opened.size, leaf_index(event.seq)?);
    // First pass: which subtree hashes the proof needs (the crate asks for them all at once).
    let asked = Recorder::default();
    tlog_tiles::prove_record(size, index, &asked).map_err(broken)?;
    let mut known = HashMap::new();
    for stored in asked.0.into_inner() {
        let (level, k) = tlog_tiles::split_stored_hash_index(stored);
        known.insert(
            stored,
            subtree_root(store, &event.chain_id, level, k).await?,
        );
    }
    let proof = tlog_tiles::prove_record(size, index, &Known(known)).map_err(broken)?;
    let receipt = Receipt {
        chain_id: event.chain_id.clone(),
        seq: event.seq,
        hash: event.hash.clone(),
    };
    let built = DecisionProof {
        receipt,
        event: ProvenEvent {
            prev_hash: event.prev_hash,
            body: event.body,
        },
        leaf_index: index,
        tree_size: size,
        checkpoint: checkpoint.note,
        inclusion_proof: proof.iter().map(|h| BASE64.encode(h.0)).collect(),
    };
    // What the database holds must lead to what was signed: otherwise the trail was altered.
    verify_offline(&built, key).map_err(ProofError::Broken)?;
    Ok(built)
}

/// Checks `proof` with nothing but the public key: the checkpoint's signature, the event's hash, the
/// receipt's agreement with both, and the inclusion proof up to the checkpoint's root.
pub fn verify_offline(proof: &DecisionProof, key: &PublicKey) -> Result<Verified, String> {
    let opened = key
        .open(&proof.checkpoint)
        .map_err(|e| format!("checkpoint: {e}"))?;
    let r = &proof.receipt;
    if opened.chain_id != r.chain_id {
        return Err(format!(
            "the checkpoint is of chain {}, the receipt of chain {}",
            opened.chain_id, r.chain_id
        ));
    }
    if opened.size != proof.tree_size {
        return Err(format!(
            "the checkpoint holds {} events, the proof says {}",
            opened.size, proof.tree_size
        ));
    }
    let hash = chain_hash(&proof.event.prev_hash, &proof.event.body);
    if hash != r.hash {
        return Err("the event does not hash to the receipt's hash".to_owned());
    }
    let event: Value = serde_json::from_str(&proof.event.body)
        .map_err(|e| format!("the event's body is not JSON: {e}"))?;
    let claims = (
        event.get("chain_id").and_then(Value::as_str),
        event.get("seq").and_then(Value::as_i64),
        event.get("prev_hash").and_then(Value::as_str),
        event.get("event_type").and_then(Value::as_str),
    );
    if claims
        != (
            Some(r.chain_id.as_str()),
            Some(r.seq),
            Some(proof.event.prev_hash.as_str()),
            Some("DECISION"),
        )
    {
        return Err(
            "the event is not the receipt's DECISION (its chain, seq or type differ)".to_owned(),
        );
    }
    if leaf_index(r.seq).map_err(|e| e.to_string())? != proof.leaf_index {
        return Err("the leaf index is not the receipt's seq - 1".to_owned());
    }
    let path = proof
        .inclusion_proof
        .iter()
        .map(|h| Hash::parse_hash(h).map_err(|e| format!("inclusion proof: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    let l = leaf(&r.hash).ok_or("the receipt's hash is not 64 hex digits")?;
    tlog_tiles::check_record(&path, opened.size, opened.root, proof.leaf_index, l)
        .map_err(|e| format!("the inclusion proof does not lead to the checkpoint's root ({e})"))?;
    Ok(Verified {
        chain_id: r.chain_id.clone(),
        seq: r.seq,
        tree_size: opened.size,
        event,
    })
}

fn leaf_index(seq: i64) -> Result<u64, ProofError> {
    u64::try_from(seq - 1).map_err(|_| ProofError::Broken(format!("seq {seq} has no leaf")))
}

fn broken(e: tlog_tiles::Error) -> ProofError {
    ProofError::Broken(e.to_string())
}

/// The DECISION event whose body names `decision_id`.
async fn find_decision(
    store: &dyn Store,
    decision_id: &str,
) -> Result<crate::event::SealedEvent, ProofError> {
    let id = uuid::Uuid::parse_str(decision_id).map_err(|_| ProofError::NotFound)?;
    let Some(made) = id.get_timestamp() else {
        return Err(ProofError::NotFound);
    };
    let (secs, nanos) = made.to_unix();
    let made_ms =
        i64::try_from(secs).unwrap_or(i64::MAX / 2_000) * 1_000 + i64::from(nanos / 1_000_000);
    let needle = format!("\"decision_id\":\"{decision_id}\"");
    for (from, to) in SEARCH_WINDOWS_MS {
        let (Some(since), Some(until)) = (
            timestamp_of_micros((made_ms + from) * 1_000),
            timestamp_of_micros((made_ms + to) * 1_000),
        ) else {
            return Err(ProofError::NotFound);
        };
        let mut after: Option<(String, String, i64)> = None;
        loop {
            let page = store
                .events_between(
                    &since,
                    &until,
                    after.as_ref().map(|(a, c, s)| (a.as_str(), c.as_str(), *s)),
                    SEARCH_PAGE,
                )
                .await?;
            if let Some(found) = page
                .iter()
                .find(|e| e.event_type == "DECISION" && e.body.contains(&needle))
            {
                return Ok(found.clone());
            }
            match page.last() {
                Some(last) if page.len() as i64 == SEARCH_PAGE => {
                    after = Some((last.occurred_at.clone(), last.chain_id.clone(), last.seq));
                }
                _ => break,
            }
        }
    }
    Err(ProofError::NotFound)
}

/// The hash of the complete subtree at `level` with index `k`: the root of leaves
/// `k·2^level .. (k+1)·2^level`, summed from the events' hashes.
async fn subtree_root(
    store: &dyn Store,
    chain_id: &str,
    level: u8,
    k: u64,
) -> Result<Hash, ProofError> {
    let width = 1u64 << level;
    let first = k * width;
    let mut tree = Frontier::default();
    let mut after =
        i64::try_from(first).map_err(|_| ProofError::Broken("tree too large".into()))?;
    while tree.size() < width {
        let left = i64::try_from(width - tree.size()).unwrap_or(HASH_PAGE);
        let page = store
            .chain_hashes(chain_id, after, left.min(HASH_PAGE))
            .await?;
        if page.is_empty() {
            return Err(ProofError::Broken(format!(
                "chain {chain_id} ends at seq {after}, before its checkpoint"
            )));
        }
        for (seq, hash) in page {
            if seq != after + 1 {
                return Err(ProofError::Broken(format!(
                    "chain {chain_id} lacks seq {}",
                    after + 1
                )));
            }
            let l = leaf(&hash).ok_or_else(|| {
                ProofError::Broken(format!("event {seq} of {chain_id} has a malformed hash"))
            })?;
            tree.push(l)
                .map_err(|e| ProofError::Broken(e.to_string()))?;
            after = seq;
        }
    }
    tree.root().map_err(|e| ProofError::Broken(e.to_string()))
}

/// Answers any hash with zeros and remembers what was asked.
#[derive(Default)]
struct Recorder(RefCell<Vec<u64>>);

impl HashReader for Recorder {
    fn read_hashes(&self, indexes: &[u64]) -> Result<Vec<Hash>, tlog_tiles::Error> {
        self.0.borrow_mut().extend_from_slice(indexes);
        Ok(vec![Hash([0; 32]); indexes.len()])
    }
}

/// Answers the hashes it was given.
struct Known(HashMap<u64, Hash>);

impl HashReader for Known {
    fn read_hashes(&self, indexes: &[u64]) -> Result<Vec<Hash>, tlog_tiles::Error> {
        indexes
            .iter()
            .map(|i| {
                self.0
                    .get(i)
                    .copied()
                    .ok_or(tlog_tiles::Error::IndexesNotInTree)
            })
            .collect()
    }
}
