//! G2 shared across instances: GCRA in one atomic Redis script, so N gateways sharing a Redis never
//! allow N times a key's quota. Used when `CATRACA_REDIS_URL` is set. The clock is Redis's own (`TIME`),
//! so instances with skewed clocks still agree. Unreachable Redis is reported to the gate, which fails
//! closed unless `rate_limit_fail_open` is set.

use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::rate_limit::{RateDecision, RateLimitUnavailable, RateLimiter};
use crate::domain::{KeyId, TierName};
use crate::policy::Tier;

/// GCRA: `tat` (theoretical arrival time, µs) per key; a request is allowed when `tat + interval -
/// burst * interval <= now`. Returns {allowed, wait_us}.
const GCRA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = interval * tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + interval
local allow_at = new_tat - tolerance
if allow_at > now then
  return {0, allow_at - now}
end
redis.call('SET', KEYS[1], new_tat, 'PX', math.ceil((tolerance + interval) / 1000))
return {1, 0}
";

/// A rate decision waits at most this long for Redis: the gate is on every request's path.
const REDIS_TIMEOUT: Duration = Duration::from_millis(250);

pub struct RedisLimiter {
    client: redis::Client,
    script: redis::Script,
    /// Connected on first use and reconnected by the manager; `None` until Redis first answers.
    conn: tokio::sync::Mutex<Option<ConnectionManager>>,
}

impl RedisLimiter {
    /// Parses the URL; connects lazily, so a gateway can start while Redis is down (and fail closed).
    pub fn new(url: &str) -> Result<Self, redis::RedisError> {
        Ok(Self {
            client: redis::Client::open(url)?,
            script: redis::Script::new(GCRA),
            conn: tokio::sync::Mutex::new(None),
        })
    }

    async fn connection(&self) -> Result<ConnectionManager, RateLimitUnavailable> {
        let mut slot = self.conn.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(REDIS_TIMEOUT)
            .set_response_timeout(REDIS_TIMEOUT)
            .set_number_of_retries(1);
        let c = self
            .client
            .get_connection_manager_with_config(config)
            .await
            .map_err(|e| RateLimitUnavailable(format!("redis: {e}")))?;
        *slot = Some(c.clone());
        Ok(c)
    }
}

#[async_trait]
impl RateLimiter for RedisLimiter {
    async fn check(
        &self,
        key: &KeyId,
        tier_name: &TierName,
        tier: &Tier,
    ) -> Result<RateDecision, RateLimitUnavailable> {
        let Tier::Limited { per_second, burst } = *tier else {
            return Ok(RateDecision::Allowed);
        };
        let interval_us = 1_000_000 / u64::from(per_second.get());
        let decision = async {
            let mut conn = self.connection().await?;
            self.script
                .key(format!("catraca:rl:{tier_name}:{key}"))
                .arg(interval_us)
                .arg(burst.get())
                .invoke_async::<(i64, i64)>(&mut conn)
                .await
                .map_err(|e| RateLimitUnavailable(format!("redis: {e}")))
        };
        let (allowed, wait_us) = tokio::time::timeout(REDIS_TIMEOUT * 2, decision)
            .await
            .map_err(|_| RateLimitUnavailable("redis did not answer in time".into()))??;
        Ok(if allowed == 1 {
            RateDecision::Allowed
        } else {
            RateDecision::Limited {
                retry_after: Duration::from_micros(u64::try_from(wait_us).unwrap_or(0)),
            }
        })
    }

    async fn probe(&self) -> Result<(), RateLimitUnavailable> {
        let ping = async {
            let mut conn = self.connection().await?;
            redis::cmd("PING")
                .query_async::<String>(&mut conn)
                .await
                .map(drop)
                .map_err(|e| RateLimitUnavailable(format!("redis: {e}")))
        };
        tokio::time::timeout(REDIS_TIMEOUT * 2, ping)
            .await
            .map_err(|_| RateLimitUnavailable("redis did not answer in time".into()))?
    }
}
