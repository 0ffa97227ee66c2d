//! G1: API keys. `X-API-Key: <key>` or `Authorization: Bearer <key>`, looked up by key id and verified
//! against an argon2id hash. A verification is cached for a short TTL (keyed by the SHA-256 of the
//! presented key) so argon2 runs once per key per TTL; concurrent misses for one key share one argon2
//! run.
//!
//! A stranger's guesses cost the server little: every refused credential (missing, malformed, unknown
//! key id, wrong secret, revoked, expired) drains the client address's failure budget, and an address
//! without budget is refused before the key row is read or argon2 runs, and again when a queued
//! verification gets its turn. Argon2 itself runs at most `argon2_concurrency` at a time on pooled memory
//! ([`SecretVerifier`]), so argon2 runs per address stay within the budget plus that cap.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use dashmap::DashMap;
use sha2::{Digest, Sha256};

use crate::domain::{ApiKey, ContextId, KeyId, RoleName, TierName};
use crate::gates::key_directory::KeyDirectory;
use crate::keys::SecretVerifier;
use crate::reason::ReasonCode;
use crate::store::{KeyRecord, Store, StoreError};

/// An authenticated caller.
#[derive(Debug, Clone)]
pub struct AuthenticatedKey {
    pub key_id: KeyId,
    pub name: String,
    pub role: RoleName,
    pub contexts: Option<BTreeSet<ContextId>>,
    pub tier: TierName,
}

/// Why G1 refused.
#[derive(Debug)]
pub enum AuthRefusal {
    /// A reason code of the auth gate; `presented` is the key id when the key was well-formed.
    Denied {
        reason: ReasonCode,
        message: &'static str,
        presented: Option<KeyId>,
    },
    /// Too many refused credentials from this address; neither the store nor argon2 was asked.
    Throttled {
        retry_after: Duration,
    },
    Store(StoreError),
}

/// The presented key from `X-API-Key` or `Authorization: Bearer`.
fn presented_key(headers: &HeaderMap) -> Option<&str> {
    if let Some(v) = headers.get("x-api-key").and_then(|v| v.to_str().ok()) {
        return Some(v.trim());
    }
    let auth = headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = auth.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

#[derive(Clone)]
struct Verified {
    key_id: KeyId,
    /// The hash the secret was verified against; a changed hash invalidates the entry.
    secret_hash: Arc<str>,
    at: Instant,
}

/// A token bucket per client address, drained only by failures: `per_minute` failures, refilled
/// evenly over a minute.
struct FailureLimiter {
    per_minute: f64,
    buckets: DashMap<IpAddr, (f64, Instant)>,
}

/// Past this many tracked addresses, full buckets (addresses that stopped failing) are forgotten.
const MAX_TRACKED_ADDRESSES: usize = 100_000;

impl FailureLimiter {
    fn refilled(&self, tokens: f64, since: Instant, now: Instant) -> f64 {
        (tokens + now.duration_since(since).as_secs_f64() * self.per_minute / 60.0)
            .min(self.per_minute)
    }

    /// How long this address must wait before another verification, if it must.
    fn blocked(&self, ip: IpAddr) -> Option<Duration> {
        let now = Instant::now();
        let (tokens, since) = *self.buckets.get(&ip)?;
        let tokens = self.refilled(tokens, since, now);
        (tokens < 1.0).then(|| Duration::from_secs_f64((1.0 - tokens) * 60.0 / self.per_minute))
    }

    fn record_failure(&self, ip: IpAddr) {
        let now = Instant::now();
        if self.buckets.len() > MAX_TRACKED_ADDRESSES {
            let full = self.per_minute;
            self.buckets
                .retain(|_, (tokens, since)| self.refilled(*tokens, *since, now) < full);
        }
        let mut entry = self.buckets.entry(ip).or_insert((self.per_minute, now));
        let tokens = self.refilled(entry.0, entry.1, now);
        *entry = ((tokens - 1.0).max(0.0), now);
    }
}

/// The auth gate with its caches.
pub struct AuthGate {
    keys: Arc<KeyDirectory>,
    ttl: Duration,
    cache: DashMap<[u8; 32], Verified>,
    /// One lock per key id, so concurrent cache misses for one key run argon2 once.
    inflight: DashMap<KeyId, Arc<tokio::sync::Mutex<()>>>,
    failures: FailureLimiter,
    verifier: SecretVerifier,
    argon2_runs: AtomicU64,
}

impl AuthGate {
    pub fn new(
        store: Arc<dyn Store>,
        ttl: Duration,
        failures_per_minute: u32,
        argon2_concurrency: usize,
        key_refresh: Duration,
    ) -> Self {
        Self {
            keys: Arc::new(KeyDirectory::new(store, key_refresh)),
            ttl,
            cache: DashMap::new(),
            inflight: DashMap::new(),
            failures: FailureLimiter {
                per_minute: f64::from(failures_per_minute.max(1)),
                buckets: DashMap::new(),
            },
            verifier: SecretVerifier::new(argon2_concurrency),
            argon2_runs: AtomicU64::new(0),
        }
    }

    /// The key rows this gate reads; its watcher must run for the cache to be used.
    pub fn keys(&self) -> &Arc<KeyDirectory> {
        &self.keys
    }

    /// How many argon2 verifications this gate has run (to show the cache works).
    pub fn argon2_runs(&self) -> u64 {
        self.argon2_runs.load(Ordering::Relaxed)
    }

    fn cached(&self, digest: &[u8; 32], record: &KeyRecord) -> bool {
        self.cache.get(digest).is_some_and(|v| {
            v.key_id == record.key_id
                && *v.secret_hash == *record.secret_hash
                && v.at.elapsed() < self.ttl
        })
    }

    /// Refuses `refusal` for `client`, draining its failure budget; once the budget is gone the
    /// refusal is the throttle's.
    fn refused(&self, client: IpAddr, refusal: AuthRefusal) -> AuthRefusal {
        self.failures.record_failure(client);
        refusal
    }

    fn throttled(&self, client: IpAddr) -> Result<(), AuthRefusal> {
        match self.failures.blocked(client) {
            Some(retry_after) => Err(AuthRefusal::Throttled { retry_after }),
            None => Ok(()),
        }
    }

    pub async fn authenticate(
        &self,
        headers: &HeaderMap,
        client: IpAddr,
        now: &str,
    ) -> Result<AuthenticatedKey, AuthRefusal> {
        let Some(text) = presented_key(headers).filter(|t| !t.is_empty()) else {
            self.throttled(client)?;
            return Err(self.refused(
                client,
                AuthRefusal::Denied {
                    reason: ReasonCode::AuthMissingKey,
                    message: "send the API key in X-API-Key or Authorization: Bearer",
                    presented: None,
                },
            ));
        };
        let invalid = |presented: Option<KeyId>| AuthRefusal::Denied {
            reason: ReasonCode::AuthInvalidKey,
            message: "the API key is not valid",
            presented,
        };
        let digest: [u8; 32] = Sha256::digest(text.as_bytes()).into();
        // A key this gateway has verified before (its digest is known, even if its TTL ran out) passes
        // even from a throttled address: a client behind the same NAT as a guesser keeps working, and a
        // guesser cannot present a digest without the key. Anything else from a throttled address
        // stops here.
        let known = self.cache.contains_key(&digest);
        if !known {
            self.throttled(client)?;
        }
        let Ok(key) = ApiKey::parse(text) else {
            return Err(self.refused(client, invalid(None)));
        };
        let record = self
            .keys
            .get(key.key_id())
            .await
            .map_err(AuthRefusal::Store)?;
        let Some(record) = record else {
            return Err(self.refused(client, invalid(Some(key.key_id().clone()))));
        };
        if !self.cached(&digest, &record) {
            if !known {
                self.throttled(client)?;
            }
            let lock = self
                .inflight
                .entry(record.key_id.clone())
                .or_default()
                .clone();
            let _guard = lock.lock().await;
            // Another request may have verified this key while we waited for the lock.
            if !self.cached(&digest, &record) {
                let permit = self.verifier.permit().await;
                // The budget may have run out while this verification waited its turn.
                if !known {
                    self.throttled(client)?;
                }
                self.argon2_runs.fetch_add(1, Ordering::Relaxed);
                let ok = permit
                    .verify(key.secret().to_owned(), record.secret_hash.clone())
                    .await;
                if !ok {
                    return Err(self.refused(client, invalid(Some(record.key_id.clone()))));
                }
                self.cache.insert(
                    digest,
                    Verified {
                        key_id: record.key_id.clone(),
                        secret_hash: record.secret_hash.as_str().into(),
                        at: Instant::now(),
                    },
                );
            }
        }
        // The row is at most the key directory's bound old, so a revoke by any process counts within it.
        if record.revoked_at.is_some() {
            return Err(self.refused(
                client,
                AuthRefusal::Denied {
                    reason: ReasonCode::AuthKeyRevoked,
                    message: "the API key was revoked",
                    presented: Some(record.key_id.clone()),
                },
            ));
        }
        if record.expires_at.as_deref().is_some_and(|exp| exp <= now) {
            return Err(self.refused(
                client,
                AuthRefusal::Denied {
                    reason: ReasonCode::AuthKeyExpired,
                    message: "the API key has expired",
                    presented: Some(record.key_id.clone()),
                },
            ));
        }
        Ok(AuthenticatedKey {
            key_id: record.key_id.clone(),
            name: record.name.clone(),
            role: record.role.clone(),
            contexts: record.contexts.clone(),
            tier: record.tier.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_read_from_either_header() {
        let mut h = HeaderMap::new();
        h.insert("authorization", "Bearer abc".parse().unwrap());
        assert_eq!(presented_key(&h), Some("abc"));
        h.insert("x-api-key", "xyz".parse().unwrap());
        assert_eq!(presented_key(&h), Some("xyz"));
        let mut basic = HeaderMap::new();
        basic.insert("authorization", "Basic abc".parse().unwrap());
        assert_eq!(presented_key(&basic), None);
    }

    #[test]
    fn failures_block_an_address_until_the_bucket_refills() {
        let limiter = FailureLimiter {
            per_minute: 2.0,
            buckets: DashMap::new(),
        };
        let ip: IpAddr = [127, 0, 0, 9].into();
        assert!(limiter.blocked(ip).is_none());
        limiter.record_failure(ip);
        assert!(limiter.blocked(ip).is_none());
        limiter.record_failure(ip);
        let wait = limiter.blocked(ip).unwrap();
        assert!(wait > Duration::from_secs(25) && wait <= Duration::from_secs(30));
        let other: IpAddr = [127, 0, 0, 10].into();
        assert!(
            limiter.blocked(other).is_none(),
            "other addresses are unaffected"
        );
    }
}
