//! How rows become values, by column name, the same for both backends: what `#[derive(sqlx::FromRow)]`
//! would write (sqlx's `macros` feature is not enabled, so it is written out here).

use std::collections::BTreeSet;

use sqlx::{ColumnIndex, Decode, FromRow, Row, Type};

use super::{
    ChainInfo, CheckpointRecord, KeyRecord, LockHolder, SnapshotRow, StoreError, Verification,
};
use crate::domain::{ContextId, KeyId, RoleName, TierName};

/// The text columns of an `api_keys` row, before their values are parsed into a [`KeyRecord`].
pub(super) struct KeyRow {
    key_id: String,
    name: String,
    role: String,
    /// JSON array of context ids; `NULL` = every context.
    contexts: Option<String>,
    tier: String,
    secret_hash: String,
    created_at: String,
    expires_at: Option<String>,
    revoked_at: Option<String>,
    rotated_from: Option<String>,
}

impl<'r, R: Row> FromRow<'r, R> for KeyRow
where
    &'r str: ColumnIndex<R>,
    String: Decode<'r, R::Database> + Type<R::Database>,
{
    fn from_row(row: &'r R) -> sqlx::Result<Self> {
        Ok(Self {
            key_id: row.try_get("key_id")?,
            name: row.try_get("name")?,
            role: row.try_get("role")?,
            contexts: row.try_get("contexts")?,
            tier: row.try_get("tier")?,
            secret_hash: row.try_get("secret_hash")?,
            created_at: row.try_get("created_at")?,
            expires_at: row.try_get("expires_at")?,
            revoked_at: row.try_get("revoked_at")?,
            rotated_from: row.try_get("rotated_from")?,
        })
    }
}

impl KeyRow {
    /// The stored key, its names parsed; a value no parser accepts is [`StoreError::Corrupt`].
    pub(super) fn into_record(self) -> Result<KeyRecord, StoreError> {
        let key_id = self.key_id;
        let bad = |what: &str, e: crate::domain::ParseError| {
            StoreError::Corrupt(format!("key {key_id}: {what}: {e}"))
        };
        let contexts = match self.contexts {
            None => None,
            Some(text) => {
                let list: Vec<String> = serde_json::from_str(&text)
                    .map_err(|e| StoreError::Corrupt(format!("key {key_id}: contexts: {e}")))?;
                Some(
                    list.iter()
                        .map(|c| ContextId::parse(c))
                        .collect::<Result<BTreeSet<_>, _>>()
                        .map_err(|e| bad("contexts", e))?,
                )
            }
        };
        Ok(KeyRecord {
            key_id: KeyId::parse(&key_id).map_err(|e| bad("key_id", e))?,
            role: RoleName::parse(&self.role).map_err(|e| bad("role", e))?,
            tier: TierName::parse(&self.tier).map_err(|e| bad("tier", e))?,
            rotated_from: self
                .rotated_from
                .map(|r| KeyId::parse(&r))
                .transpose()
                .map_err(|e| bad("rotated_from", e))?,
            name: self.name,
            contexts,
            secret_hash: self.secret_hash,
            created_at: self.created_at,
            expires_at: self.expires_at,
            revoked_at: self.revoked_at,
        })
    }
}

impl<'r, R: Row> FromRow<'r, R> for ChainInfo
where
    &'r str: ColumnIndex<R>,
    String: Decode<'r, R::Database> + Type<R::Database>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
{
    fn from_row(row: &'r R) -> sqlx::Result<Self> {
        Ok(Self {
            chain_id: row.try_get("chain_id")?,
            events: row.try_get("events")?,
            first_at: row.try_get("first_at")?,
        })
    }
}

impl<'r, R: Row> FromRow<'r, R> for CheckpointRecord
where
    &'r str: ColumnIndex<R>,
    String: Decode<'r, R::Database> + Type<R::Database>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
{
    fn from_row(row: &'r R) -> sqlx::Result<Self> {
        Ok(Self {
            chain_id: row.try_get("chain_id")?,
            size: row.try_get("size")?,
            signed_at: row.try_get("signed_at")?,
            note: row.try_get("note")?,
        })
    }
}

impl<'r, R: Row> FromRow<'r, R> for Verification
where
    &'r str: ColumnIndex<R>,
    String: Decode<'r, R::Database> + Type<R::Database>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
    bool: Decode<'r, R::Database> + Type<R::Database>,
{
    fn from_row(row: &'r R) -> sqlx::Result<Self> {
        Ok(Self {
            verified_at: row.try_get("verified_at")?,
            ok: row.try_get("ok")?,
            chains: row.try_get("chains")?,
            events: row.try_get("events")?,
            duration_ms: row.try_get("duration_ms")?,
            finding: row.try_get("finding")?,
            source: row.try_get("source")?,
        })
    }
}

impl<'r, R: Row> FromRow<'r, R> for LockHolder
where
    &'r str: ColumnIndex<R>,
    String: Decode<'r, R::Database> + Type<R::Database>,
{
    fn from_row(row: &'r R) -> sqlx::Result<Self> {
        Ok(Self {
            run_id: row.try_get("run_id")?,
            acquired_at: row.try_get("acquired_at")?,
        })
    }
}

impl<'r, R: Row> FromRow<'r, R> for SnapshotRow
where
    &'r str: ColumnIndex<R>,
    String: Decode<'r, R::Database> + Type<R::Database>,
{
    fn from_row(row: &'r R) -> sqlx::Result<Self> {
        Ok(Self {
            record_id: row.try_get("record_id")?,
            content_hash: row.try_get("content_hash")?,
            field_hashes: row.try_get("field_hashes")?,
        })
    }
}

/// When a record was first and last seen in complete runs (a `collector_records` row).
pub(super) struct Sightings {
    pub first_seen: String,
    pub last_seen: String,
}

impl<'r, R: Row> FromRow<'r, R> for Sightings
where
    &'r str: ColumnIndex<R>,
    String: Decode<'r, R::Database> + Type<R::Database>,
{
    fn from_row(row: &'r R) -> sqlx::Result<Self> {
        Ok(Self {
            first_seen: row.try_get("first_seen")?,
            last_seen: row.try_get("last_seen")?,
        })
    }
}

impl<'r, R: Row> FromRow<'r, R> for super::ExecutorSwitch
where
    &'r str: ColumnIndex<R>,
    String: Decode<'r, R::Database> + Type<R::Database>,
    bool: Decode<'r, R::Database> + Type<R::Database>,
{
    fn from_row(row: &'r R) -> sqlx::Result<Self> {
        Ok(Self {
            executor: row.try_get("executor")?,
            disabled: row.try_get("disabled")?,
            changed_at: row.try_get("changed_at")?,
            changed_by: row.try_get("changed_by")?,
            reason: row.try_get("reason")?,
        })
    }
}
