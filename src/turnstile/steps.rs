//! Composite steps: each step is an action re-authorized for the same principal, context and policy
//! through the one authorization path, run by its executor, and recorded as STEP_EXECUTED.

use std::sync::Arc;
use std::time::Instant;

use serde_json::{Value, json};
use uuid::Uuid;

use super::authorize::{Ask, Stop, authorize};
use super::decision::{Decision, Facts, Verdicts, micros, truncated};
use super::execution::{count_execution, executor_of, with_digest};
use crate::app::App;
use crate::audit::{EventType, PendingEvent, canonical_digest};
use crate::domain::{ActionName, ContextId, TraceId};
use crate::executors::{ExecutorCall, StepError, StepRunner};
use crate::policy::{Policy, Principal};
use crate::reason::ReasonCode;

/// How deep composites may nest (a composite step running a composite ...); deeper is refused, so a
/// composite naming itself cannot loop.
const MAX_STEP_DEPTH: usize = 4;

/// Runs the steps of a composite for one allowed request: same principal, context and policy.
#[derive(Clone)]
pub(super) struct StepContext {
    app: Arc<App>,
    policy: Arc<Policy>,
    trace_id: TraceId,
    decision_id: Uuid,
    principal: Principal,
    context: ContextId,
    /// How deeply nested the executor that runs these steps is (0: the request's own executor).
    depth: usize,
}

/// What one step learned on its way, for its STEP_EXECUTED event.
struct StepFacts {
    facts: Facts,
    executor_id: Option<String>,
    executor_facts: Option<Value>,
}

impl StepContext {
    /// The request's own level: the executor its ALLOW selected.
    pub(super) fn root(
        app: &Arc<App>,
        d: &Decision,
        principal: Principal,
        context: &ContextId,
    ) -> Self {
        Self {
            app: app.clone(),
            policy: d.policy.clone(),
            trace_id: d.trace_id.clone(),
            decision_id: d.id,
            principal,
            context: context.clone(),
            depth: 0,
        }
    }

    /// What an executor at this level is asked, with a runner one level deeper for its own steps.
    pub(super) fn call(&self, action: &ActionName, payload: Value) -> ExecutorCall {
        ExecutorCall {
            trace_id: self.trace_id.clone(),
            decision_id: self.decision_id,
            action: action.clone(),
            context: self.context.clone(),
            payload,
            steps: Some(Arc::new(Self {
                depth: self.depth + 1,
                ..self.clone()
            })),
            stream: None,
        }
    }

    /// Authorizes and runs one step.
    async fn run(
        &self,
        action: &str,
        payload: Value,
        seen: &mut StepFacts,
    ) -> Result<(Value, Value), StepError> {
        let refused = |reason_codes: Vec<ReasonCode>| StepError::Refused {
            action: action.to_owned(),
            reason_codes,
        };
        // Recorded even when the step is refused; authorize() records the same digest when it admits.
        let digest = canonical_digest(&payload).map_err(|e| {
            tracing::error!(error = %e, "step payload without a canonical form");
            refused(vec![ReasonCode::InternalError])
        })?;
        seen.facts.payload_digest = Some(digest);
        if self.depth >= MAX_STEP_DEPTH {
            return Err(refused(vec![ReasonCode::StepDepthExceeded]));
        }
        let ask = Ask::Run {
            action,
            context: self.context.as_str(),
            payload,
            started: Instant::now(),
        };
        let granted = match authorize(
            &self.app.metrics,
            &self.policy,
            &self.trace_id,
            &self.principal,
            ask,
            &mut Verdicts::default(),
            &mut seen.facts,
        ) {
            Ok(granted) => granted,
            Err(Stop::Refused(refusal) | Stop::Throttled(refusal)) => {
                return Err(refused(refusal.codes));
            }
            Err(Stop::Failed(e)) => {
                tracing::error!(error = %e, "step could not be authorized");
                return Err(refused(vec![ReasonCode::InternalError]));
            }
        };
        let Some(executor) = executor_of(&self.app, &granted.action) else {
            return Err(refused(vec![ReasonCode::ActionUnknown]));
        };
        seen.executor_id = Some(executor.name.clone());
        match self.app.switches.disabled(&executor.name).await {
            Ok(None) => {}
            Ok(Some(_)) => return Err(refused(vec![ReasonCode::ExecutorDisabled])),
            Err(e) => {
                tracing::error!(error = %e, "executor switches unreadable; the step is refused");
                return Err(refused(vec![ReasonCode::InternalError]));
            }
        }
        seen.executor_facts = executor.audit_facts();
        let started = Instant::now();
        let result = executor
            .run(self.call(&granted.action.name, granted.payload))
            .await;
        let result = result.and_then(with_digest);
        count_execution(&self.app, &executor.name, &result, started.elapsed());
        result.map_err(|error| StepError::Failed {
            action: action.to_owned(),
            error,
        })
    }
}

#[async_trait::async_trait]
impl StepRunner for StepContext {
    #[tracing::instrument(
        level = "debug",
        skip_all,
        fields(trace_id = %self.trace_id, step = index, depth = self.depth)
    )]
    async fn run_step(
        &self,
        index: usize,
        action: &str,
        payload: Value,
    ) -> Result<Value, StepError> {
        let started = Instant::now();
        let mut seen = StepFacts {
            facts: Facts::default(),
            executor_id: None,
            executor_facts: None,
        };
        let outcome = self.run(action, payload, &mut seen).await;
        let result = outcome.as_ref().ok().map(|(_, digest)| digest.clone());
        let outcome = outcome.map(|(value, _)| value);
        let (status, codes, error) = match &outcome {
            Ok(_) => ("success", vec![], None),
            Err(StepError::Refused { reason_codes, .. }) => ("refused", reason_codes.clone(), None),
            Err(StepError::Failed { error, .. }) => {
                (error.status(), vec![], Some(error.to_string()))
            }
            Err(StepError::Unaudited { .. }) => ("unaudited", vec![], None),
        };
        let event = PendingEvent::new(
            EventType::StepExecuted,
            Some(&self.trace_id),
            json!({
                "decision_id": self.decision_id.to_string(),
                "step": index,
                "depth": self.depth,
                "action": truncated(action),
                "executor_id": seen.executor_id,
                "status": status,
                "reason_codes": codes,
                "determining_rules": seen.facts.rules,
                "duration_us": micros(started.elapsed()),
                "payload": seen.facts.payload_digest,
                "result": result,
                "error": error,
                "executor_facts": seen.executor_facts,
            }),
        );
        if let Err(e) = self.app.audit.append(vec![event]).await {
            tracing::error!(error = %e, "step not durable; the composite stops");
            return Err(StepError::Unaudited {
                action: action.to_owned(),
            });
        }
        outcome
    }
}
