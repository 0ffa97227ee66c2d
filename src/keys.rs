//! Key lifecycle: create, revoke, rotate. Every change is audited (KEY_CREATED, KEY_REVOKED) before it
//! is stored, so there is never a usable key the trail does not know about.

use std::collections::BTreeSet;
use std::time::Duration;

use std::sync::{Arc, Mutex};

use argon2::password_hash::{Output, PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use serde::Serialize;
use serde_json::json;
use time::OffsetDateTime;

use crate::audit::{AuditError, AuditLog, EventType, PendingEvent, timestamp};
use crate::domain::{ApiKey, ContextId, KeyId, RoleName, TierName, TraceId};
use crate::policy::Policy;
use crate::store::{KeyRecord, Store, StoreError};

/// Hashes a new key's secret as an argon2id PHC string (library defaults: 19 MiB, t=2, p=1, OWASP's
/// recommended floor).
pub fn hash_secret(secret: &str) -> Result<String, String> {
    let mut salt = [0u8; 16];
    getrandom::fill(&mut salt).map_err(|e| e.to_string())?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| e.to_string())?;
    Argon2::default()
        .hash_password(secret.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

/// Whether `secret` is the one `phc` (an argon2id PHC string) was made from; a malformed hash never
/// verifies. Allocates the hash's memory for this one call; the gateway's request path uses
/// [`SecretVerifier`] instead.
pub fn verify_secret(secret: &str, phc: &str) -> bool {
    PasswordHash::new(phc).is_ok_and(|parsed| {
        Argon2::default()
            .verify_password(secret.as_bytes(), &parsed)
            .is_ok()
    })
}

/// Argon2 verification with bounded cost: at most `concurrency` runs at once, each on memory taken from
/// a pool and returned after, so a flood of guesses can neither queue unbounded blocking threads nor
/// leave the allocator holding a 19 MiB block per thread that ever verified (the 1.7 GB seen under a
/// flood before). Peak argon2 memory is `concurrency` × the largest stored hash's memory cost.
pub struct SecretVerifier {
    permits: Arc<tokio::sync::Semaphore>,
    memory: Arc<Mutex<Vec<Vec<Block>>>>,
}

/// The right to run one verification; holding it is what bounds concurrency.
pub struct VerifyPermit {
    _permit: tokio::sync::OwnedSemaphorePermit,
    memory: Arc<Mutex<Vec<Vec<Block>>>>,
}

impl SecretVerifier {
    pub fn new(concurrency: usize) -> Self {
        Self {
            permits: Arc::new(tokio::sync::Semaphore::new(concurrency.max(1))),
            memory: Arc::new(Mutex::new(Vec::new())),
        }
    }

    /// Waits for a free slot. The caller re-checks anything that may have changed while it waited.
    pub async fn permit(&self) -> VerifyPermit {
        let permit = match self.permits.clone().acquire_owned().await {
            Ok(p) => p,
            // The semaphore is never closed.
            Err(_) => unreachable!("the argon2 semaphore is never closed"),
        };
        VerifyPermit {
            _permit: permit,
            memory: self.memory.clone(),
        }
    }
}

impl VerifyPermit {
    /// Verifies `secret` against `phc` on a blocking thread, with pooled memory.
    pub async fn verify(self, secret: String, phc: String) -> bool {
        tokio::task::spawn_blocking(move || {
            let mut blocks = self.take_memory();
            let ok = verify_into(&secret, &phc, &mut blocks);
            self.give_back(blocks);
            ok
        })
        .await
        .unwrap_or(false)
    }

    fn take_memory(&self) -> Vec<Block> {
        self.memory
            .lock()
            .map(|mut pool| pool.pop().unwrap_or_default())
            .unwrap_or_default()
    }

    fn give_back(&self, blocks: Vec<Block>) {
        if let Ok(mut pool) = self.memory.lock() {
            pool.push(blocks);
        }
    }
}

/// Verifies with caller-owned memory, grown to the hash's memory cost if needed.
fn verify_into(secret: &str, phc: &str, blocks: &mut Vec<Block>) -> bool {
    let Ok(parsed) = PasswordHash::new(phc) else {
        return false;
    };
    let (Ok(algorithm), Ok(params), Some(expected), Some(salt)) = (
        Algorithm::try_from(parsed.algorithm),
        Params::try_from(&parsed),
        parsed.hash,
        parsed.salt,
    ) else {
        return false;
    };
    let version = parsed
        .version
        .and_then(|v| Version::try_from(v).ok())
        .unwrap_or_default();
    let mut salt_bytes = [0u8; 64];
    let Ok(salt) = salt.decode_b64(&mut salt_bytes) else {
        return false;
    };
    let needed = params.block_count();
    if blocks.len() < needed {
        blocks.resize(needed, Block::default());
    }
    let mut out = vec![0u8; expected.len()];
    let argon = Argon2::new(algorithm, version, params);
    if argon
        .hash_password_into_with_memory(secret.as_bytes(), salt, &mut out, &mut blocks[..needed])
        .is_err()
    {
        return false;
    }
    // `Output`'s equality is constant-time.
    Output::new(&out).is_ok_and(|got| got == expected)
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{0}")]
    Invalid(String),
    #[error("no active key {0}")]
    NotFound(KeyId),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Audit(#[from] AuditError),
}

/// What `keys create` asks for.
#[derive(Debug, Clone)]
pub struct NewKey {
    pub name: String,
    pub role: RoleName,
    /// Empty = every context.
    pub contexts: Vec<ContextId>,
    pub tier: Option<TierName>,
    pub expires_in: Option<Duration>,
    /// Who asked (`cli`, `serve:dev-bootstrap`, `key:<key_id>`), for the trail.
    pub actor: String,
}

/// A key as shown to operators (never the secret, except `key` right after creation).
#[derive(Debug, Serialize)]
pub struct KeyView {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    pub key_id: String,
    pub name: String,
    pub role: String,
    pub contexts: Vec<String>,
    pub tier: String,
    pub created_at: String,
    pub expires_at: Option<String>,
    pub revoked_at: Option<String>,
    pub rotated_from: Option<String>,
}

impl KeyView {
    pub fn of(record: &KeyRecord, key: Option<&ApiKey>) -> Self {
        Self {
            key: key.map(ApiKey::expose),
            key_id: record.key_id.to_string(),
            name: record.name.clone(),
            role: record.role.to_string(),
            contexts: record.contexts.as_ref().map_or_else(
                || vec!["*".to_owned()],
                |c| c.iter().map(ToString::to_string).collect(),
            ),
            tier: record.tier.to_string(),
            created_at: record.created_at.clone(),
            expires_at: record.expires_at.clone(),
            revoked_at: record.revoked_at.clone(),
            rotated_from: record.rotated_from.as_ref().map(ToString::to_string),
        }
    }
}

/// Parses `90d`, `12h`, `30m` or `45s`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?}: expected a number followed by d, h, m or s"))?;
    let secs = match unit {
        "d" => n.checked_mul(86_400),
        "h" => n.checked_mul(3_600),
        "m" => n.checked_mul(60),
        "s" => Some(n),
        _ => return Err(format!("{s:?}: the unit must be d, h, m or s")),
    }
    .filter(|&secs| secs > 0)
    .ok_or_else(|| format!("{s:?} must be positive and not absurdly large"))?;
    Ok(Duration::from_secs(secs))
}

fn new_record(
    key: &ApiKey,
    template: &NewKey,
    policy: &Policy,
    now: OffsetDateTime,
) -> Result<KeyRecord, KeyError> {
    if template.name.trim().is_empty() || template.name.chars().count() > 128 {
        return Err(KeyError::Invalid(
            "a key name is 1 to 128 characters".into(),
        ));
    }
    if !policy.has_role(&template.role) {
        return Err(KeyError::Invalid(format!(
            "role {} is not defined in the policy",
            template.role
        )));
    }
    for c in &template.contexts {
        if !policy.has_context(c.as_str()) {
            return Err(KeyError::Invalid(format!(
                "context {c} is not defined in the policy"
            )));
        }
    }
    let tier = match &template.tier {
        Some(t) if policy.has_tier(t) => t.clone(),
        Some(t) => {
            return Err(KeyError::Invalid(format!(
                "tier {t} is not defined in the policy"
            )));
        }
        None => policy
            .tier(&TierName::parse("standard").unwrap_or_else(|_| unreachable!()))
            .0
            .clone(),
    };
    let expires_at = template
        .expires_in
        .map(|d| {
            time::Duration::try_from(d)
                .ok()
                .and_then(|d| now.checked_add(d))
                .map(timestamp)
                .ok_or_else(|| KeyError::Invalid("expiry is too far in the future".into()))
        })
        .transpose()?;
    Ok(KeyRecord {
        key_id: key.key_id().clone(),
        name: template.name.trim().to_owned(),
        role: template.role.clone(),
        contexts: (!template.contexts.is_empty())
            .then(|| template.contexts.iter().cloned().collect::<BTreeSet<_>>()),
        tier,
        secret_hash: String::new(),
        created_at: timestamp(now),
        expires_at,
        revoked_at: None,
        rotated_from: None,
    })
}

/// KEY_CREATED: the new key as stored (never its secret or hash), who made it and, over HTTP, under
/// which request.
pub fn created_event(record: &KeyRecord, actor: &str, trace_id: Option<&TraceId>) -> PendingEvent {
    PendingEvent::new(
        EventType::KeyCreated,
        trace_id,
        json!({
            "key_id": record.key_id,
            "name": record.name,
            "role": record.role,
            "contexts": record.contexts,
            "tier": record.tier,
            "expires_at": record.expires_at,
            "rotated_from": record.rotated_from,
            "actor": actor,
        }),
    )
}

/// KEY_REVOKED: which key, why and by whom (`cli`, or `key:<key_id>` under the request's trace id).
pub fn revoked_event(
    key_id: &KeyId,
    reason: &str,
    actor: &str,
    trace_id: Option<&TraceId>,
) -> PendingEvent {
    PendingEvent::new(
        EventType::KeyRevoked,
        trace_id,
        json!({ "key_id": key_id, "reason": reason, "actor": actor }),
    )
}

/// A new key as `template` asks, checked against the policy, its secret not yet hashed (see
/// [`seal_secret`]): nothing audited or stored.
pub fn draft(template: &NewKey, policy: &Policy) -> Result<(ApiKey, KeyRecord), KeyError> {
    let key = ApiKey::generate().map_err(|e| KeyError::Invalid(format!("no randomness: {e}")))?;
    let record = new_record(&key, template, policy, OffsetDateTime::now_utc())?;
    Ok((key, record))
}

/// Puts the hash of `key`'s secret in its record: argon2, tens of milliseconds of CPU (a blocking
/// thread's work when serving).
pub fn seal_secret(key: &ApiKey, record: &mut KeyRecord) -> Result<(), KeyError> {
    record.secret_hash = hash_secret(key.secret()).map_err(KeyError::Invalid)?;
    Ok(())
}

/// [`draft`] and [`seal_secret`].
pub fn prepare(template: &NewKey, policy: &Policy) -> Result<(ApiKey, KeyRecord), KeyError> {
    let (key, mut record) = draft(template, policy)?;
    seal_secret(&key, &mut record)?;
    Ok((key, record))
}

/// Creates a key; the returned [`ApiKey`] is the only time its secret exists outside a hash.
pub async fn create(
    store: &dyn Store,
    audit: &AuditLog,
    policy: &Policy,
    template: &NewKey,
) -> Result<(ApiKey, KeyRecord), KeyError> {
    let (key, record) = prepare(template, policy)?;
    audit
        .append(vec![created_event(&record, &template.actor, None)])
        .await?;
    store.insert_key(&record).await?;
    Ok((key, record))
}

/// What a key may hand out when it creates or rotates a key: no more than it holds. The new key's
/// contexts lie within the holder's (a key limited to some contexts cannot make one for every
/// context); its role grants nothing the holder's role is not granted in those contexts, and escapes
/// no deny rule the holder meets (see [`Policy::role_within`]); its tier allows no more requests (an
/// unlimited tier only from an unlimited key; otherwise neither the rate nor the burst higher); and,
/// when the holder expires, it expires no later. On refusal, says which of these it breaks.
pub fn grants_within(
    policy: &Policy,
    holder: &KeyRecord,
    granted: &KeyRecord,
) -> Result<(), String> {
    if let Some(mine) = &holder.contexts {
        match &granted.contexts {
            None => {
                return Err(format!(
                    "a key limited to contexts {} cannot make one for every context",
                    names(mine)
                ));
            }
            Some(theirs) if !theirs.is_subset(mine) => {
                return Err(format!(
                    "contexts {} are not all among this key's {}",
                    names(theirs),
                    names(mine)
                ));
            }
            Some(_) => {}
        }
    }
    policy.role_within(&granted.role, &holder.role, granted.contexts.as_ref())?;
    let (_, mine) = policy.tier(&holder.tier);
    let (_, theirs) = policy.tier(&granted.tier);
    if !theirs.within(mine) {
        return Err(format!(
            "tier {} allows more requests than this key's tier {}",
            granted.tier, holder.tier
        ));
    }
    if let Some(mine) = &holder.expires_at {
        let later = granted
            .expires_at
            .as_ref()
            .is_none_or(|theirs| crate::event::micros_of(theirs) > crate::event::micros_of(mine));
        if later {
            return Err(format!(
                "this key expires at {mine}: the new key must expire no later (give expires_in)"
            ));
        }
    }
    Ok(())
}

fn names(contexts: &BTreeSet<ContextId>) -> String {
    contexts
        .iter()
        .map(ContextId::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Revokes a key; every instance refuses it within the key directory's bound
/// (see `crate::gates::key_directory`).
pub async fn revoke(
    store: &dyn Store,
    audit: &AuditLog,
    key_id: &KeyId,
    actor: &str,
) -> Result<(), KeyError> {
    match store.get_key(key_id).await? {
        Some(k) if k.revoked_at.is_none() => {}
        _ => return Err(KeyError::NotFound(key_id.clone())),
    }
    audit
        .append(vec![revoked_event(key_id, "revoked", actor, None)])
        .await?;
    let now = timestamp(OffsetDateTime::now_utc());
    if !store.revoke_key(key_id, &now).await? {
        return Err(KeyError::NotFound(key_id.clone()));
    }
    Ok(())
}

/// The replacement of `old`: a new key of the same name, role, contexts and tier, marked as rotated
/// from it, not yet audited or stored, its secret not yet hashed (see [`seal_secret`]). The remaining
/// lifetime is not carried over: it starts afresh without expiry unless `expires_in` is given.
pub fn replacement(
    old: &KeyRecord,
    expires_in: Option<Duration>,
    policy: &Policy,
    actor: &str,
) -> Result<(ApiKey, KeyRecord), KeyError> {
    let template = NewKey {
        name: old.name.clone(),
        role: old.role.clone(),
        contexts: old.contexts.iter().flatten().cloned().collect(),
        tier: Some(old.tier.clone()),
        expires_in,
        actor: actor.to_owned(),
    };
    let (key, mut record) = draft(&template, policy)?;
    record.rotated_from = Some(old.key_id.clone());
    Ok((key, record))
}

/// KEY_CREATED for the replacement and KEY_REVOKED (`rotated`) for the key it replaces.
pub fn rotated_events(
    old: &KeyId,
    replacement: &KeyRecord,
    actor: &str,
    trace_id: Option<&TraceId>,
) -> Vec<PendingEvent> {
    vec![
        created_event(replacement, actor, trace_id),
        revoked_event(old, "rotated", actor, trace_id),
    ]
}

/// Replaces a key with a new one of the same name, role, contexts and tier (see [`replacement`]),
/// revoking the old one in the same transaction.
pub async fn rotate(
    store: &dyn Store,
    audit: &AuditLog,
    policy: &Policy,
    key_id: &KeyId,
    expires_in: Option<Duration>,
    actor: &str,
) -> Result<(ApiKey, KeyRecord), KeyError> {
    let old = match store.get_key(key_id).await? {
        Some(k) if k.revoked_at.is_none() => k,
        _ => return Err(KeyError::NotFound(key_id.clone())),
    };
    let (key, mut record) = replacement(&old, expires_in, policy, actor)?;
    seal_secret(&key, &mut record)?;
    audit
        .append(rotated_events(&old.key_id, &record, actor, None))
        .await?;
    let now = timestamp(OffsetDateTime::now_utc());
    if !store.rotate_key(&old.key_id, &record, &now).await? {
        return Err(KeyError::NotFound(key_id.clone()));
    }
    Ok((key, record))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_verifies_only_against_its_own_hash() {
        let phc = hash_secret("s3cret").unwrap();
        assert!(phc.starts_with("$argon2id$"));
        let mut blocks = Vec::new();
        assert!(
            verify_into("s3cret", &phc, &mut blocks),
            "pooled memory verifies"
        );
        assert!(
            !verify_into("s3cres", &phc, &mut blocks),
            "and refuses another secret"
        );
        assert!(!verify_into("s3cret", "$argon2id$garbage", &mut blocks));
        assert!(verify_secret("s3cret", &phc));
        assert!(!verify_secret("s3cres", &phc));
        assert!(!verify_secret("s3cret", "not a phc string"));
    }

    #[test]
    fn durations_take_days_hours_minutes_and_seconds() {
        assert_eq!(
            parse_duration("90d").unwrap(),
            Duration::from_secs(90 * 86_400)
        );
        assert_eq!(parse_duration("12h").unwrap(), Duration::from_secs(43_200));
        assert_eq!(parse_duration("1s").unwrap(), Duration::from_secs(1));
        // Each refusal quotes what was given; a wrong or missing unit names the units it takes.
        for (bad, needle) in [
            ("", "d, h, m or s"),
            ("d", "d, h, m or s"),
            ("10", "d, h, m or s"),
            ("10w", "d, h, m or s"),
            ("-1d", "d, h, m or s"),
            ("0d", "positive"),
            ("99999999999999999999d", "d, h, m or s"),
        ] {
            let err = parse_duration(bad).expect_err(bad);
            assert!(err.contains(&format!("{bad:?}")), "{bad:?}: {err}");
            assert!(err.contains(needle), "{bad:?}: {err}");
        }
    }
}
