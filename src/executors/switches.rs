//! The kill switch: executors an operator switched off (`catraca executors disable NAME --reason R`),
//! read by every gateway every `key_refresh_ms`, so a switch takes effect on every instance within the
//! same bound as a key revocation (see [`crate::watch`]) without a restart. Actions of a disabled
//! executor, and composite steps that would run it, are refused with 503 `EXECUTOR_DISABLED`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use crate::store::{ExecutorSwitch, Store, StoreError};
use crate::watch::{STALE_AFTER_REFRESHES, Watched};

/// Disabled executors and why, fresh within the watch bound.
pub struct ExecutorSwitches {
    store: Arc<dyn Store>,
    refresh: Duration,
    state: Mutex<Seen>,
}

#[derive(Clone, Default)]
struct Seen {
    /// Disabled executor name → the operator's reason.
    disabled: Arc<HashMap<String, String>>,
    /// When the read behind `disabled` started; `None` before the first read.
    at: Option<Instant>,
}

impl ExecutorSwitches {
    pub fn new(store: Arc<dyn Store>, refresh: Duration) -> Self {
        Self {
            store,
            refresh,
            state: Mutex::new(Seen::default()),
        }
    }

    fn seen(&self) -> Seen {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Reads the switches once.
    pub async fn refresh(&self) -> Result<(), StoreError> {
        let asked = Instant::now();
        let disabled: HashMap<String, String> = self
            .store
            .executor_switches()
            .await?
            .into_iter()
            .filter(|s| s.disabled)
            .map(|s| (s.executor, s.reason))
            .collect();
        *self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Seen {
            disabled: Arc::new(disabled),
            at: Some(asked),
        };
        Ok(())
    }

    /// Why `executor` is disabled, or `None` when it may run. Answers from memory while the last read
    /// is within the bound, else reads the store first (failing with it).
    pub async fn disabled(&self, executor: &str) -> Result<Option<String>, StoreError> {
        let mut seen = self.seen();
        if seen
            .at
            .is_none_or(|at| at.elapsed() >= self.refresh * STALE_AFTER_REFRESHES)
        {
            self.refresh().await?;
            seen = self.seen();
        }
        Ok(seen.disabled.get(executor).cloned())
    }
}

#[async_trait]
impl Watched for ExecutorSwitches {
    const WHAT: &'static str = "executor switches";
    async fn refresh(&self) -> Result<(), StoreError> {
        ExecutorSwitches::refresh(self).await
    }
}

/// Why a switch was not made.
#[derive(Debug, thiserror::Error)]
pub enum SwitchError {
    #[error("the switch could not be audited, so it was not made: {0}")]
    Audit(#[from] crate::audit::AuditError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A switch of `executor` off (`disabled`) or on, made now by `actor` for `reason`.
pub fn new_switch(executor: &str, disabled: bool, actor: &str, reason: &str) -> ExecutorSwitch {
    ExecutorSwitch {
        executor: executor.to_owned(),
        disabled,
        changed_at: crate::audit::timestamp(time::OffsetDateTime::now_utc()),
        changed_by: actor.to_owned(),
        reason: reason.to_owned(),
    }
}

/// The EXECUTOR_SWITCHED event of `switch`, under the request that made it when there is one.
pub fn switched_event(
    switch: &ExecutorSwitch,
    trace_id: Option<&crate::domain::TraceId>,
) -> crate::audit::PendingEvent {
    crate::audit::PendingEvent::new(
        crate::audit::EventType::ExecutorSwitched,
        trace_id,
        serde_json::json!({
            "executor": switch.executor,
            "state": if switch.disabled { "disabled" } else { "enabled" },
            "reason": switch.reason,
            "actor": switch.changed_by,
        }),
    )
}

/// Switches `executor` off (`disabled`) or on, for `reason`, by `actor`: audited as EXECUTOR_SWITCHED
/// before it is stored, so no switch takes effect that the trail does not know about. Every gateway
/// honours it within the watch bound.
pub async fn switch(
    store: &dyn Store,
    audit: &crate::audit::AuditLog,
    executor: &str,
    disabled: bool,
    actor: &str,
    reason: &str,
) -> Result<ExecutorSwitch, SwitchError> {
    let switch = new_switch(executor, disabled, actor, reason);
    audit.append(vec![switched_event(&switch, None)]).await?;
    store.set_executor_switch(&switch).await?;
    Ok(switch)
}
