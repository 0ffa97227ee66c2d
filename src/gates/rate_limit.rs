//! G2: per-key rate limit with the quota of the key's tier. In-process `governor` (GCRA) by default;
//! the trait lets a shared limiter take its place for several instances.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use dashmap::DashMap;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter as Gcra};

use crate::domain::{KeyId, TierName};
use crate::policy::Tier;

/// The limiter's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateDecision {
    Allowed,
    Limited { retry_after: Duration },
}

/// The limiter could not decide (a shared backend is unreachable).
#[derive(Debug, thiserror::Error)]
#[error("rate limiter unavailable: {0}")]
pub struct RateLimitUnavailable(pub String);

#[async_trait]
pub trait RateLimiter: Send + Sync + 'static {
    async fn check(
        &self,
        key: &KeyId,
        tier_name: &TierName,
        tier: &Tier,
    ) -> Result<RateDecision, RateLimitUnavailable>;

    /// Whether the limiter can decide right now (for `/ready` and the circuit's probe). An in-process
    /// limiter always can.
    async fn probe(&self) -> Result<(), RateLimitUnavailable> {
        Ok(())
    }
}

/// One GCRA limiter per tier, keyed by key id; rebuilt when a reload changes the tier's quota.
#[derive(Default)]
pub struct InProcessLimiter {
    tiers: DashMap<TierName, (Tier, Arc<DefaultKeyedRateLimiter<KeyId>>)>,
}

#[async_trait]
impl RateLimiter for InProcessLimiter {
    async fn check(
        &self,
        key: &KeyId,
        tier_name: &TierName,
        tier: &Tier,
    ) -> Result<RateDecision, RateLimitUnavailable> {
        let Tier::Limited { per_second, burst } = *tier else {
            return Ok(RateDecision::Allowed);
        };
        let quota = Quota::per_second(per_second).allow_burst(burst);
        let limiter = {
            let mut entry = self
                .tiers
                .entry(tier_name.clone())
                .or_insert_with(|| (*tier, Arc::new(Gcra::keyed(quota))));
            if entry.0 != *tier {
                *entry = (*tier, Arc::new(Gcra::keyed(quota)));
            }
            entry.1.clone()
        };
        Ok(match limiter.check_key(key) {
            Ok(()) => RateDecision::Allowed,
            Err(not_until) => RateDecision::Limited {
                retry_after: not_until.wait_time_from(DefaultClock::default().now()),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;

    use super::*;

    #[tokio::test]
    async fn a_burst_is_allowed_then_limited_per_key() {
        let limiter = InProcessLimiter::default();
        let tier = Tier::Limited {
            per_second: NonZeroU32::new(1).unwrap(),
            burst: NonZeroU32::new(3).unwrap(),
        };
        let name = TierName::parse("standard").unwrap();
        let a = KeyId::parse("00000000000000aa").unwrap();
        let b = KeyId::parse("00000000000000bb").unwrap();
        for _ in 0..3 {
            assert_eq!(
                limiter.check(&a, &name, &tier).await.unwrap(),
                RateDecision::Allowed
            );
        }
        assert!(matches!(
            limiter.check(&a, &name, &tier).await.unwrap(),
            RateDecision::Limited { .. }
        ));
        assert_eq!(
            limiter.check(&b, &name, &tier).await.unwrap(),
            RateDecision::Allowed
        );
    }

    #[tokio::test]
    async fn unlimited_tiers_always_pass() {
        let limiter = InProcessLimiter::default();
        let tier = Tier::Unlimited;
        let name = TierName::parse("unlimited").unwrap();
        let k = KeyId::parse("00000000000000aa").unwrap();
        for _ in 0..1000 {
            assert_eq!(
                limiter.check(&k, &name, &tier).await.unwrap(),
                RateDecision::Allowed
            );
        }
    }
}
