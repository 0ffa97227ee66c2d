//! The turnstile: G0 trace → G1 auth → G2 rate limit → G3 input → G4 action matrix → durable DECISION →
//! executor → durable ACTION_EXECUTED + REQUEST_END → response. Every request, allowed or refused,
//! leaves its events in the audit chain before the client hears back.
//!
//! [`process`] runs `/process`; [`authorize_permission`] lets other routes (the trail) ask for a
//! permission-only action; composite steps run through [`steps`]. All three authorize through
//! [`authorize::authorize`] and make their events durable through [`commit`].

mod admission;
mod authorize;
mod decision;
mod execution;
mod steps;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{HeaderMap, StatusCode};
use opentelemetry::KeyValue;
use serde::Serialize;
use serde_json::{Value, json};
use utoipa::ToSchema;

use crate::app::App;
use crate::audit::anchor::Receipt;
use crate::audit::{Appended, EventType, PendingEvent, timestamp};
use crate::domain::TraceId;
use crate::error::{ApiError, Denial};
use crate::event::Fields;
use crate::executors::{ExecutorDef, ExecutorError};
use crate::gates::auth::{AuthRefusal, AuthenticatedKey};
use crate::gates::input;
use crate::gates::rate_limit::RateDecision;
use crate::policy::Principal;
use crate::reason::{Gate, ReasonCode};
use crate::telemetry;
use authorize::{Ask, Granted, Refusal, Stop, authorize};
use decision::{Decision, micros};
use execution::executor_of;

pub use admission::{Admitted, Allowed, Channel, Door, Running, admit};

/// How long a client is asked to wait when the shared rate limiter cannot be reached.
const LIMITER_RETRY_AFTER: Duration = Duration::from_secs(5);
/// How long a client is asked to wait when the action's executor is switched off.
const SWITCHED_OFF_RETRY_AFTER: Duration = Duration::from_secs(60);

/// The answer to an allowed, executed request.
#[derive(Debug, Serialize, ToSchema)]
pub struct ActionResult {
    pub trace_id: String,
    pub decision_id: String,
    /// Always `SUCCESS`; failures use the error body.
    pub status: &'static str,
    pub action: String,
    pub executor_id: String,
    /// What the executor returned.
    #[schema(value_type = Object)]
    pub result: Value,
    pub execution_time_ms: f64,
    /// SHA-256 of the policy files that decided.
    pub policy_revision: String,
    /// Where the request's DECISION event is in the audit trail: prove it with
    /// `GET /v1/audit/proofs/{decision_id}` and check it offline with the gateway's public key.
    pub receipt: Receipt,
}

/// What the HTTP layer hands to the turnstile for `/process`.
pub struct Incoming {
    pub trace_id: TraceId,
    pub headers: HeaderMap,
    pub client: IpAddr,
    pub body: Body,
}

/// Runs one `/process` request through the turnstile: G1 and G2 ([`admit`]), the envelope read and
/// parsed (G3's first half), the policy's half of G3 and G4 ([`Admitted::authorize`]), then the
/// executor ([`Allowed::execute`]).
#[tracing::instrument(skip_all, fields(trace_id = %req.trace_id))]
pub async fn process(app: &Arc<App>, req: Incoming) -> Result<ActionResult, ApiError> {
    let Incoming {
        trace_id,
        headers,
        client,
        body,
    } = req;
    let door = Door::new(
        trace_id,
        headers,
        client,
        Channel::Process,
        "POST",
        "/process",
    );
    let admitted = admit(app, door).await?;
    let (admitted, bytes) = admitted.read_json_body(body).await?;
    let envelope = match input::parse_envelope(&bytes) {
        Ok(envelope) => envelope,
        Err(refusal) => return Err(admitted.refuse_input(refusal).await),
    };
    let allowed = admitted
        .authorize(&envelope.action, &envelope.context, envelope.payload)
        .await?;
    allowed.execute(None).await
}

/// G1 and G2, recorded in `d`: the caller's key, within its tier's quota.
#[tracing::instrument(level = "debug", skip_all)]
async fn identify(
    app: &App,
    d: &mut Decision,
    headers: &HeaderMap,
    client: IpAddr,
) -> Result<AuthenticatedKey, Stop> {
    let key = authenticate(app, d, headers, client).await?;
    limit(app, d, key).await
}

/// G1 alone, recorded in `d`: the caller's key.
async fn authenticate(
    app: &App,
    d: &mut Decision,
    headers: &HeaderMap,
    client: IpAddr,
) -> Result<AuthenticatedKey, Stop> {
    let started = Instant::now();
    let now = timestamp(time::OffsetDateTime::now_utc());
    let refusal = match app.auth.authenticate(headers, client, &now).await {
        Ok(key) => {
            d.verdicts.record(&app.metrics, Gate::Auth, started, None);
            d.principal = Some(key.clone());
            return Ok(key);
        }
        Err(AuthRefusal::Store(e)) => {
            return Err(Stop::Failed(ApiError::internal(e, Some(&d.trace_id))));
        }
        Err(AuthRefusal::Throttled { retry_after }) => {
            let refusal = Refusal::new(
                Gate::Auth,
                ReasonCode::RateLimited,
                "too many refused keys from this address; retry later",
                Some(retry_after),
            );
            d.verdicts
                .record(&app.metrics, Gate::Auth, started, Some(&refusal.codes));
            return Err(Stop::Throttled(refusal));
        }
        Err(AuthRefusal::Denied {
            reason,
            message,
            presented,
        }) => {
            d.presented_key_id = presented.map(|k| k.to_string());
            Refusal::new(Gate::Auth, reason, message, None)
        }
    };
    d.verdicts
        .record(&app.metrics, Gate::Auth, started, Some(&refusal.codes));
    Err(refusal.into())
}

/// G2: the key's tier quota, from the in-process or the shared limiter.
async fn limit(
    app: &App,
    d: &mut Decision,
    key: AuthenticatedKey,
) -> Result<AuthenticatedKey, Stop> {
    let started = Instant::now();
    let policy = d.policy.clone();
    let (tier_name, tier) = policy.tier(&key.tier);
    let refusal = match app.limiter.check(&key.key_id, tier_name, tier).await {
        Ok(RateDecision::Allowed) => None,
        Ok(RateDecision::Limited { retry_after }) => Some(Refusal::new(
            Gate::RateLimit,
            ReasonCode::RateLimited,
            format!("rate limit of tier {tier_name} exceeded"),
            Some(retry_after),
        )),
        Err(e) if app.config.rate_limit_fail_open => {
            tracing::warn!(error = %e, "rate limiter unavailable; failing open as configured");
            None
        }
        Err(e) => {
            tracing::error!(error = %e, "rate limiter unavailable; failing closed");
            Some(Refusal::new(
                Gate::RateLimit,
                ReasonCode::RateLimitUnavailable,
                "the rate limiter is unavailable",
                Some(LIMITER_RETRY_AFTER),
            ))
        }
    };
    d.verdicts.record(
        &app.metrics,
        Gate::RateLimit,
        started,
        refusal.as_ref().map(|r| r.codes.as_slice()),
    );
    match refusal {
        Some(r) => Err(r.into()),
        None => Ok(key),
    }
}

fn principal_of(key: &AuthenticatedKey) -> Principal {
    Principal {
        role: key.role.clone(),
        contexts: key.contexts.clone(),
    }
}

/// The loaded executor of an authorized action. G3 admits only actions with an executor, and the policy
/// load checked it exists, so a miss is an internal error.
fn executor_for<'a>(
    app: &'a App,
    d: &Decision,
    granted: &Granted,
) -> Result<&'a ExecutorDef, ApiError> {
    executor_of(app, &granted.action).ok_or_else(|| {
        ApiError::internal(
            format!("action {} has no loaded executor", granted.action.name),
            Some(&d.trace_id),
        )
    })
}

/// The kill switch, after G4 allowed the action: a disabled executor turns the allow into a refusal
/// (503 `EXECUTOR_DISABLED`, recorded as a DENY of the action-matrix stage: the matrix allowed the
/// action, the operator's switch did not). Unreadable switches fail closed.
async fn switched_off(
    app: &App,
    d: &Decision,
    executor: &ExecutorDef,
) -> Result<Option<Refusal>, ApiError> {
    match app.switches.disabled(&executor.name).await {
        Ok(None) => Ok(None),
        Ok(Some(reason)) => Ok(Some(Refusal::new(
            Gate::ActionMatrix,
            ReasonCode::ExecutorDisabled,
            format!(
                "executor {} is disabled by an operator: {}",
                executor.name,
                decision::truncated(&reason)
            ),
            Some(SWITCHED_OFF_RETRY_AFTER),
        ))),
        Err(e) => {
            tracing::error!(error = %e, "executor switches unreadable; refusing to run");
            Err(ApiError::AuditUnavailable {
                trace_id: d.trace_id.clone(),
                decision_id: None,
                executed: false,
            })
        }
    }
}

/// REQUEST_START, DECISION (allow) and EXECUTOR_SELECTED, durable before the executor starts; returns
/// the DECISION's receipt.
#[tracing::instrument(level = "debug", skip_all)]
async fn commit_allow(
    app: &App,
    d: &Decision,
    granted: &Granted,
    executor: &ExecutorDef,
) -> Result<Option<Receipt>, ApiError> {
    // Made in story order: an event's id and time are taken when it is made.
    let allow = d.event("allow", Gate::ActionMatrix, &[]);
    let selected = Fields::new()
        .str("action", granted.action.name.as_str())
        .str("decision_id", &d.id.to_string())
        .opt_value("executor_facts", executor.audit_facts().as_ref())
        .str("executor_id", &executor.name)
        .str("executor_kind", &executor.kind)
        .uint(
            "timeout_ms",
            u64::try_from(executor.timeout.as_millis()).unwrap_or(u64::MAX),
        );
    let selected =
        PendingEvent::from_fields(EventType::ExecutorSelected, Some(&d.trace_id), selected);
    let appended = commit(
        app,
        d,
        vec![d.start_event(), allow, selected],
        Moment::Allow,
    )
    .await?;
    Ok(appended.receipt(DECISION_AT))
}

/// Where a request's DECISION is among the events committed with it: after REQUEST_START.
const DECISION_AT: usize = 1;

/// ACTION_EXECUTED and REQUEST_END, durable before the response (or, for a stream, before its end:
/// `streamed` when a chunk already went out, so the client's status is 200 whatever happened next).
#[tracing::instrument(level = "debug", skip_all)]
#[expect(
    clippy::too_many_arguments,
    reason = "one event from each part of the story"
)]
async fn commit_outcome(
    app: &App,
    d: &Decision,
    granted: &Granted,
    executor: &ExecutorDef,
    outcome: &Result<(Value, Value), ExecutorError>,
    status: &str,
    elapsed: Duration,
    streamed: bool,
) -> Result<(), ApiError> {
    let outcome_facts = outcome
        .as_ref()
        .ok()
        .and_then(|(result, _)| executor.outcome_facts(result));
    let error = outcome.as_ref().err().map(ToString::to_string);
    let executed = Fields::new()
        .str("action", granted.action.name.as_str())
        .str("decision_id", &d.id.to_string())
        .uint("duration_us", micros(elapsed))
        .opt_str("error", error.as_deref())
        .opt_value("executor_facts", executor.audit_facts().as_ref())
        .str("executor_id", &executor.name)
        .opt_value("outcome_facts", outcome_facts.as_ref())
        .opt_value("result", outcome.as_ref().ok().map(|(_, digest)| digest))
        .str("status", status);
    let executed =
        PendingEvent::from_fields(EventType::ActionExecuted, Some(&d.trace_id), executed);
    let (http_status, end) = match outcome {
        Ok(_) => (StatusCode::OK, "SUCCESS"),
        // A stream's status went out with its first chunk; a failure after it ends the stream.
        Err(_) if streamed => (StatusCode::OK, "EXECUTION_FAILED"),
        Err(e) => (execution_status(e), "EXECUTION_FAILED"),
    };
    let events = vec![executed, d.end_event(http_status, end)];
    commit(app, d, events, Moment::Outcome).await.map(drop)
}

fn execution_status(error: &ExecutorError) -> StatusCode {
    match error {
        ExecutorError::Failed(_) => ReasonCode::ExecutorFailed.status(),
        ExecutorError::Timeout(_) => ReasonCode::ExecutorTimeout.status(),
    }
}

/// The ActionResult, or the executor's failure.
fn answer(
    d: Decision,
    granted: &Granted,
    executor: &ExecutorDef,
    outcome: Result<(Value, Value), ExecutorError>,
    elapsed: Duration,
    receipt: Option<Receipt>,
) -> Result<ActionResult, ApiError> {
    match outcome {
        Ok((result, _)) => Ok(ActionResult {
            trace_id: d.trace_id.to_string(),
            decision_id: d.id.to_string(),
            status: "SUCCESS",
            action: granted.action.name.to_string(),
            executor_id: executor.name.clone(),
            result,
            execution_time_ms: (elapsed.as_secs_f64() * 1e6).round() / 1e3,
            policy_revision: d.policy.revision.clone(),
            receipt: receipt.ok_or_else(|| {
                ApiError::internal(
                    "the DECISION was committed without a place",
                    Some(&d.trace_id),
                )
            })?,
        }),
        Err(error) => Err(ApiError::ExecutionFailed {
            error,
            trace_id: d.trace_id,
            decision_id: d.id,
            action: granted.action.name.to_string(),
            executor_id: executor.name.clone(),
            receipt: receipt.map(Box::new),
        }),
    }
}

/// Which part of a request's story a commit makes durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Moment {
    /// START, DECISION (allow) and EXECUTOR_SELECTED, before the executor.
    Allow,
    /// ACTION_EXECUTED and REQUEST_END, after the executor ran.
    Outcome,
    /// START, DECISION (deny) and END of a refusal.
    Denial,
    /// START, DECISION (allow) and END of a permission route's read.
    Read,
}

impl Moment {
    fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Outcome => "outcome",
            Self::Denial => "denial",
            Self::Read => "read",
        }
    }
}

/// Appends `events` durably, or answers 503: nothing is acknowledged that the trail does not hold.
async fn commit(
    app: &App,
    d: &Decision,
    events: Vec<PendingEvent>,
    moment: Moment,
) -> Result<Appended, ApiError> {
    let started = Instant::now();
    let count = events.len();
    let written = app.audit.append(events).await;
    telemetry::record(
        || "audit commit".into(),
        started,
        || {
            vec![
                KeyValue::new("catraca.audit.moment", moment.as_str()),
                KeyValue::new(
                    "catraca.audit.events",
                    i64::try_from(count).unwrap_or(i64::MAX),
                ),
            ]
        },
        written.as_ref().err().map(|e| e as &dyn std::fmt::Display),
    );
    written.map_err(|e| {
        tracing::error!(error = %e, ?moment, "events not durable; answering 503");
        count_result(app, d.action_label(), "unavailable");
        ApiError::AuditUnavailable {
            trace_id: d.trace_id.clone(),
            decision_id: Some(d.id),
            executed: moment == Moment::Outcome,
        }
    })
}

/// The denial a refusal is answered with (its receipt is added once its DECISION is durable).
fn denial(d: &Decision, refusal: Refusal) -> Denial {
    let Refusal {
        gate,
        codes,
        message,
        retry_after,
        violations,
    } = refusal;
    Denial {
        gate,
        reason_codes: codes,
        message,
        trace_id: d.trace_id.clone(),
        decision_id: d.id,
        // Round up: a client that waits the advertised seconds must not be refused again.
        retry_after_secs: retry_after.map(|r| r.as_secs() + u64::from(r.subsec_nanos() > 0)),
        violations,
        receipt: None,
    }
}

/// Records REQUEST_START, DECISION (deny) and REQUEST_END durably; returns the refusal to answer.
#[tracing::instrument(level = "debug", skip_all)]
async fn refuse(app: &App, d: Decision, refusal: Refusal) -> ApiError {
    let mut denial = denial(&d, refusal);
    let events = vec![
        d.start_event(),
        d.event("deny", denial.gate, &denial.reason_codes),
        d.end_event(denial.status(), "DENIED"),
    ];
    match commit(app, &d, events, Moment::Denial).await {
        Ok(appended) => denial.receipt = appended.receipt(DECISION_AT),
        Err(e) => return e,
    }
    count_result(app, d.action_label(), "denied");
    ApiError::Denied(Box::new(denial))
}

/// A throttled address's refusal: answered at once and counted in the address's next
/// REQUESTS_THROTTLED summary (see [`crate::audit::ThrottledLedger`]) instead of three events.
fn summarise(
    app: &App,
    d: Decision,
    client: IpAddr,
    route: &'static str,
    refusal: Refusal,
) -> ApiError {
    let denial = denial(&d, refusal);
    app.throttled
        .note(client, &d.trace_id, route, &denial.reason_codes);
    count_result(app, d.action_label(), "denied");
    ApiError::Denied(Box::new(denial))
}

/// Authorizes a request for a permission-only action (e.g. `audit.read`) on another route: G1, G2 and
/// G4 (allowed in at least one context the key may use). Audited like `/process`: REQUEST_START,
/// DECISION and REQUEST_END are durable before the caller sees any data.
#[tracing::instrument(skip_all, fields(trace_id = %trace_id, route))]
pub async fn authorize_permission(
    app: &App,
    trace_id: &TraceId,
    headers: &HeaderMap,
    client: IpAddr,
    route: &'static str,
    action_name: &str,
) -> Result<AuthenticatedKey, ApiError> {
    let (d, key) =
        permission_gates(app, trace_id, headers, client, "GET", route, action_name).await?;
    let events = vec![
        d.start_event(),
        d.event("allow", Gate::ActionMatrix, &[]),
        d.end_event(StatusCode::OK, "SUCCESS"),
    ];
    commit(app, &d, events, Moment::Read).await?;
    Ok(key)
}

/// A change allowed by a permission-only action (e.g. `executors.switch`), not yet made.
pub struct AuthorizedChange {
    d: Decision,
    pub key: AuthenticatedKey,
    /// Whether START and the ALLOW are durable yet.
    recorded: bool,
}

/// Authorizes a change through G1, G2 and G4 like [`authorize_permission`]; nothing is written until
/// [`AuthorizedChange::record`] makes the ALLOW and the change's own event durable (before the change
/// takes effect), and [`AuthorizedChange::finish`] records how the request ended.
#[tracing::instrument(skip_all, fields(trace_id = %trace_id, route))]
pub async fn authorize_change(
    app: &App,
    trace_id: &TraceId,
    headers: &HeaderMap,
    client: IpAddr,
    route: &'static str,
    action_name: &str,
) -> Result<AuthorizedChange, ApiError> {
    let (d, key) =
        permission_gates(app, trace_id, headers, client, "POST", route, action_name).await?;
    Ok(AuthorizedChange {
        d,
        key,
        recorded: false,
    })
}

impl AuthorizedChange {
    /// REQUEST_START, DECISION (allow) and the change's own event (made by `change`), durable together.
    pub async fn record(
        &mut self,
        app: &App,
        change: impl FnOnce() -> Vec<PendingEvent>,
    ) -> Result<(), ApiError> {
        // Made in story order: an event's id and time are taken when it is made.
        let start = self.d.start_event();
        let allow = self.d.event("allow", Gate::ActionMatrix, &[]);
        let mut events = vec![start, allow];
        events.extend(change());
        commit(app, &self.d, events, Moment::Allow).await?;
        self.recorded = true;
        Ok(())
    }

    /// REQUEST_END with the status the client gets (with START and the ALLOW when no change was
    /// recorded, e.g. for a target that does not exist).
    pub async fn finish(self, app: &App, status: StatusCode) -> Result<(), ApiError> {
        let outcome = if status.is_success() {
            "SUCCESS"
        } else {
            "FAILED"
        };
        let mut events = Vec::with_capacity(3);
        if !self.recorded {
            events.push(self.d.start_event());
            events.push(self.d.event("allow", Gate::ActionMatrix, &[]));
        }
        events.push(self.d.end_event(status, outcome));
        let moment = if self.recorded {
            Moment::Outcome
        } else {
            Moment::Read
        };
        commit(app, &self.d, events, moment).await.map(drop)
    }

    pub fn trace_id(&self) -> &TraceId {
        &self.d.trace_id
    }

    /// Refuses the change for what it asks, after the matrix allowed its action (a key asked to grant
    /// more than it holds): the DECISION is a deny at the action matrix with `code`, durable before the
    /// refusal is answered. Only before [`Self::record`].
    pub async fn refuse(self, app: &App, code: ReasonCode, message: String) -> ApiError {
        debug_assert!(!self.recorded, "a recorded change is not refused");
        refuse(
            app,
            self.d,
            Refusal::new(Gate::ActionMatrix, code, message, None),
        )
        .await
    }
}

/// G1, G2 and G4 for a permission-only action; a refusal is recorded and answered here.
async fn permission_gates(
    app: &App,
    trace_id: &TraceId,
    headers: &HeaderMap,
    client: IpAddr,
    method: &'static str,
    route: &'static str,
    action_name: &str,
) -> Result<(Decision, AuthenticatedKey), ApiError> {
    let start = PendingEvent::new(
        EventType::RequestStart,
        Some(trace_id),
        json!({
            "method": method,
            "route": route,
            "channel": Channel::of_operator_route(route).as_str(),
            "client_addr": client.to_string(),
        }),
    );
    let policy = app.policy();
    let Some(action) = policy.action(action_name).cloned() else {
        return Err(ApiError::internal(
            format!("the policy defines no {action_name} action"),
            Some(trace_id),
        ));
    };
    let mut d = Decision::new(trace_id.clone(), start, policy.clone());
    d.facts.action = Some(action.name.to_string());
    let gates = async {
        let key = identify(app, &mut d, headers, client).await?;
        let ask = Ask::Permission { action };
        let principal = principal_of(&key);
        authorize(
            &app.metrics,
            &policy,
            trace_id,
            &principal,
            ask,
            &mut d.verdicts,
            &mut d.facts,
        )?;
        Ok::<_, Stop>(key)
    };
    match gates.await {
        Ok(key) => Ok((d, key)),
        Err(Stop::Refused(refusal)) => Err(refuse(app, d, refusal).await),
        Err(Stop::Throttled(refusal)) => Err(summarise(app, d, client, route, refusal)),
        Err(Stop::Failed(e)) => Err(e),
    }
}

fn count_result(app: &App, action: &str, status: &str) {
    app.metrics
        .action_results
        .with_label_values(&[action, status])
        .inc();
}
