//! Snapshots and their diff: what a run saw of each record (hashes over canonical JSON), and what is
//! new, changed or no longer seen against the previous complete run.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::event::{CanonicalError, canonical_json};
use crate::store::SnapshotRow;

fn canonical_hash(v: &Value) -> Result<String, CanonicalError> {
    Ok(hex::encode(Sha256::digest(canonical_json(v)?)))
}

/// Hash of the whole record and of each top-level field, both over canonical JSON (so key order and
/// whitespace of the source never count as a change). A record without a canonical form cannot be
/// compared faithfully, so it is an error rather than a hash of something else.
pub(super) fn snapshot_of(id: &str, record: &Value) -> Result<SnapshotRow, CanonicalError> {
    let fields: BTreeMap<&str, String> = match record.as_object() {
        Some(o) => o
            .iter()
            .map(|(k, v)| Ok((k.as_str(), canonical_hash(v)?)))
            .collect::<Result<_, CanonicalError>>()?,
        None => BTreeMap::new(),
    };
    Ok(SnapshotRow {
        record_id: id.to_owned(),
        content_hash: canonical_hash(record)?,
        field_hashes: serde_json::to_string(&fields).unwrap_or_default(),
    })
}

/// The top-level fields whose hashes differ. Stored hashes that do not parse are a damaged snapshot,
/// reported as such rather than as "every field changed".
fn changed_fields(before: &str, after: &str) -> Result<Vec<String>, String> {
    let parse = |s: &str| {
        serde_json::from_str::<BTreeMap<String, String>>(s)
            .map_err(|e| format!("stored field hashes do not parse: {e}"))
    };
    let (a, b) = (parse(before)?, parse(after)?);
    let names: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    Ok(names
        .into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .cloned()
        .collect())
}

/// A run's snapshot against its baseline, as the result reports it.
#[derive(Debug, Default, PartialEq)]
pub(super) struct Diff {
    /// Ids not in the baseline, in snapshot order.
    pub new: Vec<Value>,
    /// `{"id", "fields"}` of records whose content changed, naming the changed top-level fields.
    pub changed: Vec<Value>,
    /// Ids of the baseline the run did not see, sorted; empty unless the run is complete.
    pub not_seen: Vec<Value>,
}

impl Diff {
    /// Compares `snapshot` with `baseline` (empty when there is none). Only a complete run may say a
    /// record is gone; a partial one simply did not reach it.
    pub(super) fn between(
        baseline: &[SnapshotRow],
        snapshot: &[SnapshotRow],
        complete: bool,
    ) -> Result<Self, String> {
        let before: HashMap<&str, &SnapshotRow> =
            baseline.iter().map(|r| (r.record_id.as_str(), r)).collect();
        let mut new = Vec::new();
        let mut changed = Vec::new();
        for row in snapshot {
            match before.get(row.record_id.as_str()) {
                None => new.push(Value::String(row.record_id.clone())),
                Some(old) if old.content_hash != row.content_hash => changed.push(json!({
                    "id": row.record_id,
                    "fields": changed_fields(&old.field_hashes, &row.field_hashes)?,
                })),
                Some(_) => {}
            }
        }
        let not_seen: Vec<Value> = if complete {
            let now: BTreeSet<&str> = snapshot.iter().map(|r| r.record_id.as_str()).collect();
            let mut gone: Vec<&str> = before
                .keys()
                .copied()
                .filter(|id| !now.contains(id))
                .collect();
            gone.sort_unstable();
            gone.into_iter()
                .map(|id| Value::String(id.to_owned()))
                .collect()
        } else {
            Vec::new()
        };
        Ok(Self {
            new,
            changed,
            not_seen,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_hashes_name_what_changed() {
        let a = snapshot_of("x", &json!({"valor": 1, "objeto": "a", "gone": true})).unwrap();
        let b = snapshot_of("x", &json!({"objeto": "a", "valor": 2, "new": 1})).unwrap();
        assert_ne!(a.content_hash, b.content_hash);
        assert_eq!(
            changed_fields(&a.field_hashes, &b.field_hashes).unwrap(),
            ["gone", "new", "valor"]
        );
        let c = snapshot_of("x", &json!({"objeto": "a", "valor": 1, "gone": true})).unwrap();
        assert_eq!(a.content_hash, c.content_hash, "key order is not a change");
    }
}
