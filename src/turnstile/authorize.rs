//! The one authorization path for a known principal: G3's policy half and G4. `/process`, composite
//! steps and permission routes all pass here, so every caller (and the next one) gets the same checks,
//! the same gate metrics and the same recorded verdicts.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::decision::{Facts, Verdicts, truncated};
use crate::audit::canonical_digest;
use crate::domain::{ContextId, TraceId};
use crate::error::ApiError;
use crate::gates::input::{self, InputRefusal};
use crate::gates::matrix;
use crate::metrics::Metrics;
use crate::policy::{Action, MatrixDecision, Policy, Principal, Violation};
use crate::reason::{Gate, ReasonCode};

/// What a principal asks for once G1 and G2 let it in.
pub(super) enum Ask<'a> {
    /// An action with an executor, in one context, with a payload: `/process` and composite steps.
    /// G3 is timed from `started` (for `/process`, when its body began to be read).
    Run {
        action: &'a str,
        context: &'a str,
        payload: Value,
        started: Instant,
    },
    /// A permission-only action (such as `audit.read`) in any context the key may use: other routes.
    Permission { action: Arc<Action> },
}

/// An authorized request.
pub(super) struct Granted {
    pub action: Arc<Action>,
    pub context: ContextId,
    pub payload: Value,
}

/// A gate's refusal before it becomes a [`crate::error::Denial`].
pub(super) struct Refusal {
    pub gate: Gate,
    pub codes: Vec<ReasonCode>,
    pub message: String,
    pub retry_after: Option<Duration>,
    pub violations: Vec<Violation>,
}

impl Refusal {
    pub(super) fn new(
        gate: Gate,
        code: ReasonCode,
        message: impl Into<String>,
        retry_after: Option<Duration>,
    ) -> Self {
        Self {
            gate,
            codes: vec![code],
            message: message.into(),
            retry_after,
            violations: vec![],
        }
    }
}

/// Why the turnstile stopped before any executor ran.
pub(super) enum Stop {
    /// A gate refused: recorded as a DENY and answered with its reason codes.
    Refused(Refusal),
    /// G1 refused an address past its failure budget: answered like a refusal but counted in the
    /// address's REQUESTS_THROTTLED summary instead of written in full.
    Throttled(Refusal),
    /// Something broke (the key store, the policy): answered as an internal error, nothing runs.
    Failed(ApiError),
}

impl From<Refusal> for Stop {
    fn from(r: Refusal) -> Self {
        Self::Refused(r)
    }
}

/// Records G3's refusal and turns it into a [`Stop`].
pub(super) fn input_refused(
    metrics: &Metrics,
    verdicts: &mut Verdicts,
    facts: &mut Facts,
    started: Instant,
    refusal: InputRefusal,
) -> Stop {
    facts.action = refusal.action.as_ref().map(|a| a.name.to_string());
    facts.requested_action = refusal.requested_action.as_deref().map(truncated);
    let codes = vec![refusal.reason];
    verdicts.record(metrics, Gate::Input, started, Some(&codes));
    Stop::Refused(Refusal {
        gate: Gate::Input,
        codes,
        message: refusal.message,
        retry_after: None,
        violations: refusal.violations,
    })
}

/// G3's policy half (for [`Ask::Run`]) and G4 for `principal`, each verdict recorded in `verdicts` and
/// what was learned in `facts`.
pub(super) fn authorize(
    metrics: &Metrics,
    policy: &Policy,
    trace_id: &TraceId,
    principal: &Principal,
    ask: Ask<'_>,
    verdicts: &mut Verdicts,
    facts: &mut Facts,
) -> Result<Granted, Stop> {
    match ask {
        Ask::Run {
            action,
            context,
            payload,
            started,
        } => {
            let valid = input::admit(policy, action, context, payload)
                .map_err(|r| input_refused(metrics, verdicts, facts, started, r))?;
            // What the trail keeps of the payload; a payload without a canonical form is our fault,
            // not the client's, and nothing runs that the trail cannot describe.
            let digest = canonical_digest(&valid.payload)
                .map_err(|e| Stop::Failed(ApiError::internal(e, Some(trace_id))))?;
            verdicts.record(metrics, Gate::Input, started, None);
            facts.action = Some(valid.action.name.to_string());
            facts.context = Some(valid.context.to_string());
            facts.payload_digest = Some(digest);
            let started = Instant::now();
            let verdict = policy.evaluate(
                principal,
                &valid.context,
                &valid.action.name,
                &valid.payload,
            );
            let message = format!(
                "role {} may not run {} in context {}",
                principal.role, valid.action.name, valid.context
            );
            let asked = Granted {
                action: valid.action,
                context: valid.context,
                payload: valid.payload,
            };
            settle(
                metrics,
                verdicts,
                facts,
                started,
                verdict,
                Some(asked),
                message,
            )
        }
        Ask::Permission { action } => {
            facts.action = Some(action.name.to_string());
            let started = Instant::now();
            let (context, verdict) = matrix::decide_any_context(policy, principal, &action.name);
            facts.context = context.as_ref().map(ToString::to_string);
            let message = format!("role {} may not {}", principal.role, action.name);
            let asked = context.map(|context| Granted {
                action,
                context,
                payload: Value::Object(serde_json::Map::new()),
            });
            settle(metrics, verdicts, facts, started, verdict, asked, message)
        }
    }
}

/// Records G4's verdict: the request as `asked` when allowed, else a refusal with `message`.
fn settle(
    metrics: &Metrics,
    verdicts: &mut Verdicts,
    facts: &mut Facts,
    started: Instant,
    verdict: MatrixDecision,
    asked: Option<Granted>,
    message: String,
) -> Result<Granted, Stop> {
    facts.rules = verdict.determining_rules;
    match asked {
        Some(granted) if verdict.allowed => {
            verdicts.record(metrics, Gate::ActionMatrix, started, None);
            Ok(granted)
        }
        _ => {
            verdicts.record(
                metrics,
                Gate::ActionMatrix,
                started,
                Some(&verdict.reason_codes),
            );
            Err(Stop::Refused(Refusal {
                gate: Gate::ActionMatrix,
                codes: verdict.reason_codes,
                message,
                retry_after: None,
                violations: vec![],
            }))
        }
    }
}
