//! A circuit around a shared rate limiter. When the limiter (Redis) fails, waiting on it per request
//! costs every request its timeout (half a second) and throughput falls to concurrency ÷ timeout. So
//! after [`OPEN_AFTER`] consecutive failures the circuit opens: requests get the limiter's failure at once
//! (refused, or passed when `rate_limit_fail_open` is set), one background probe asks the limiter every
//! [`PROBE_EVERY`], and the first answer closes the circuit. `catraca_rate_limiter_available` and `/ready`
//! show the state.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use prometheus::IntGauge;

use super::rate_limit::{RateDecision, RateLimitUnavailable, RateLimiter};
use crate::domain::{KeyId, TierName};
use crate::policy::Tier;

/// Consecutive failures that open the circuit: two, so one lost packet does not, and a dead limiter
/// costs at most two timeouts before answers take microseconds again.
const OPEN_AFTER: u32 = 2;

/// How often an open circuit probes the limiter; the longest a recovered limiter goes unused.
const PROBE_EVERY: Duration = Duration::from_millis(250);

struct State {
    open: AtomicBool,
    failures: AtomicU32,
    probing: AtomicBool,
    last_error: Mutex<String>,
    available: IntGauge,
}

impl State {
    fn set_open(&self, open: bool) {
        self.open.store(open, Ordering::Release);
        self.available.set(i64::from(!open));
    }

    fn last_error(&self) -> String {
        match self.last_error.lock() {
            Ok(e) => e.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

/// A [`RateLimiter`] that stops waiting on its inner limiter while that one is failing.
pub struct Breaker {
    inner: Arc<dyn RateLimiter>,
    state: Arc<State>,
}

impl Breaker {
    pub fn new(inner: Arc<dyn RateLimiter>, available: IntGauge) -> Self {
        available.set(1);
        Self {
            inner,
            state: Arc::new(State {
                open: AtomicBool::new(false),
                failures: AtomicU32::new(0),
                probing: AtomicBool::new(false),
                last_error: Mutex::new(String::new()),
                available,
            }),
        }
    }

    fn failed(&self, error: &RateLimitUnavailable) {
        if let Ok(mut last) = self.state.last_error.lock() {
            *last = error.0.clone();
        }
        let failures = self.state.failures.fetch_add(1, Ordering::AcqRel) + 1;
        if failures >= OPEN_AFTER && !self.state.open.load(Ordering::Acquire) {
            tracing::error!(error = %error, "rate limiter failing; circuit open, probing in the background");
            self.state.set_open(true);
            self.spawn_probe();
        }
    }

    fn succeeded(&self) {
        self.state.failures.store(0, Ordering::Release);
    }

    /// One probe task at a time; it ends when the limiter answers.
    fn spawn_probe(&self) {
        if self.state.probing.swap(true, Ordering::AcqRel) {
            return;
        }
        let inner = self.inner.clone();
        let state = self.state.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(PROBE_EVERY).await;
                match inner.probe().await {
                    Ok(()) => {
                        tracing::info!("rate limiter answers again; circuit closed");
                        state.failures.store(0, Ordering::Release);
                        state.set_open(false);
                        break;
                    }
                    Err(e) => {
                        if let Ok(mut last) = state.last_error.lock() {
                            *last = e.0;
                        }
                    }
                }
            }
            state.probing.store(false, Ordering::Release);
        });
    }
}

#[async_trait]
impl RateLimiter for Breaker {
    async fn check(
        &self,
        key: &KeyId,
        tier_name: &TierName,
        tier: &Tier,
    ) -> Result<RateDecision, RateLimitUnavailable> {
        if self.state.open.load(Ordering::Acquire) {
            return Err(RateLimitUnavailable(format!(
                "circuit open after repeated failures (last: {})",
                self.state.last_error()
            )));
        }
        let decision = self.inner.check(key, tier_name, tier).await;
        match &decision {
            Ok(_) => self.succeeded(),
            Err(e) => self.failed(e),
        }
        decision
    }

    async fn probe(&self) -> Result<(), RateLimitUnavailable> {
        if self.state.open.load(Ordering::Acquire) {
            return Err(RateLimitUnavailable(self.state.last_error()));
        }
        let answer = self.inner.probe().await;
        match &answer {
            Ok(()) => self.succeeded(),
            Err(e) => self.failed(e),
        }
        answer
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    /// A limiter that fails while `down` is set, counting the calls that reached it.
    #[derive(Default)]
    struct Flaky {
        down: AtomicBool,
        calls: AtomicUsize,
    }

    #[async_trait]
    impl RateLimiter for Flaky {
        async fn check(
            &self,
            _: &KeyId,
            _: &TierName,
            _: &Tier,
        ) -> Result<RateDecision, RateLimitUnavailable> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            self.probe().await.map(|()| RateDecision::Allowed)
        }
        async fn probe(&self) -> Result<(), RateLimitUnavailable> {
            if self.down.load(Ordering::SeqCst) {
                Err(RateLimitUnavailable("down".into()))
            } else {
                Ok(())
            }
        }
    }

    #[tokio::test]
    async fn the_circuit_opens_after_failures_and_closes_when_the_limiter_answers() {
        let flaky = Arc::new(Flaky::default());
        let gauge = IntGauge::new("available", "test").unwrap();
        let breaker = Breaker::new(flaky.clone(), gauge.clone());
        let (key, tier_name) = (
            KeyId::parse("00000000000000aa").unwrap(),
            TierName::parse("standard").unwrap(),
        );
        let tier = Tier::Unlimited;
        assert!(breaker.check(&key, &tier_name, &tier).await.is_ok());
        assert_eq!(gauge.get(), 1);

        flaky.down.store(true, Ordering::SeqCst);
        for _ in 0..10 {
            assert!(breaker.check(&key, &tier_name, &tier).await.is_err());
        }
        assert_eq!(
            flaky.calls.load(Ordering::SeqCst),
            1 + OPEN_AFTER as usize,
            "once open, requests no longer wait on the limiter"
        );
        assert_eq!(gauge.get(), 0);
        assert!(breaker.probe().await.is_err());

        flaky.down.store(false, Ordering::SeqCst);
        tokio::time::sleep(PROBE_EVERY * 4).await;
        assert_eq!(gauge.get(), 1, "the background probe closed the circuit");
        assert!(breaker.check(&key, &tier_name, &tier).await.is_ok());
    }
}
