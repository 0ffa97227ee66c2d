//! The turnstile: G0 trace → G1 auth → G2 rate limit → G3 input → G4 action matrix → durable DECISION →
//! executor → durable ACTION_EXECUTED + REQUEST_END → response. Every request, allowed or refused,
//! leaves its events in the audit chain before the client hears back.

pub mod auth;
pub mod input;
pub mod rate_limit;
pub mod rate_limit_redis;
pub mod trace;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{HeaderMap, StatusCode};
use serde::Serialize;
use serde_json::{Value, json};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::app::App;
use crate::audit::{EventType, PendingEvent, digest_of, timestamp};
use crate::domain::ContextId;
use crate::domain::TraceId;
use crate::executors::{ExecutorCall, ExecutorError, StepError, StepRunner};
use crate::http::error::ApiError;
use crate::policy::{Policy, Principal, Violation};
use auth::{AuthRefusal, AuthenticatedKey};
use rate_limit::RateDecision;

/// The gates that can refuse a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    Auth,
    RateLimit,
    Input,
    ActionMatrix,
}

impl Gate {
    pub const ALL: [Self; 4] = [Self::Auth, Self::RateLimit, Self::Input, Self::ActionMatrix];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auth => "auth",
            Self::RateLimit => "rate_limit",
            Self::Input => "input",
            Self::ActionMatrix => "action_matrix",
        }
    }
}

/// A gate's refusal: everything the denial body and the DECISION event need.
#[derive(Debug)]
pub struct Denial {
    pub gate: Gate,
    pub reason_codes: Vec<String>,
    pub message: String,
    pub trace_id: TraceId,
    pub decision_id: Uuid,
    pub retry_after_secs: Option<u64>,
    pub violations: Vec<Violation>,
}

impl Denial {
    pub fn status(&self) -> StatusCode {
        let first = self.reason_codes.first().map_or("", String::as_str);
        match (self.gate, first) {
            (Gate::Auth, "RATE_LIMITED") | (Gate::RateLimit, "RATE_LIMITED") => {
                StatusCode::TOO_MANY_REQUESTS
            }
            (Gate::Auth, _) => StatusCode::UNAUTHORIZED,
            (Gate::RateLimit, _) => StatusCode::SERVICE_UNAVAILABLE,
            (Gate::Input, "INPUT_TOO_LARGE") => StatusCode::PAYLOAD_TOO_LARGE,
            (Gate::Input, "INPUT_SCHEMA_INVALID") => StatusCode::UNPROCESSABLE_ENTITY,
            (Gate::Input, _) => StatusCode::BAD_REQUEST,
            (Gate::ActionMatrix, _) => StatusCode::FORBIDDEN,
        }
    }
}

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
}

/// What the HTTP layer hands to the turnstile.
pub struct Incoming {
    pub trace_id: TraceId,
    pub headers: HeaderMap,
    pub client: IpAddr,
    pub body: Body,
}

/// One gate's verdict as recorded in the DECISION event.
struct Verdict {
    gate: Gate,
    allowed: bool,
    duration: Duration,
    reason_codes: Vec<String>,
}

/// The request's story so far; becomes the DECISION event.
struct Decision {
    id: Uuid,
    trace_id: TraceId,
    started: Instant,
    start_event: PendingEvent,
    policy: Arc<Policy>,
    verdicts: Vec<Verdict>,
    principal: Option<AuthenticatedKey>,
    presented_key_id: Option<String>,
    action: Option<String>,
    requested_action: Option<String>,
    context: Option<String>,
    payload_digest: Option<Value>,
    rules: Vec<String>,
}

/// Longest request-supplied text kept in an audit event (e.g. an unknown action name).
const MAX_AUDITED_TEXT: usize = 128;

impl Decision {
    /// A request's story before any gate has run.
    fn new(trace_id: TraceId, start_event: PendingEvent, policy: Arc<Policy>) -> Self {
        Self {
            id: Uuid::now_v7(),
            trace_id,
            started: Instant::now(),
            start_event,
            policy,
            verdicts: Vec::with_capacity(Gate::ALL.len()),
            principal: None,
            presented_key_id: None,
            action: None,
            requested_action: None,
            context: None,
            payload_digest: None,
            rules: vec![],
        }
    }
}

/// Counts one executor call in the metrics; returns its status (`success`, `failed`, `timeout`).
fn count_execution(
    app: &App,
    executor: &str,
    outcome: &Result<Value, ExecutorError>,
    elapsed: Duration,
) -> &'static str {
    let status = outcome
        .as_ref()
        .map_or_else(ExecutorError::status, |_| "success");
    app.metrics
        .executor_calls
        .with_label_values(&[executor, status])
        .inc();
    app.metrics
        .executor_duration
        .with_label_values(&[executor])
        .observe(elapsed.as_secs_f64());
    status
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

impl Decision {
    fn record(&mut self, app: &App, gate: Gate, started: Instant, denied: Option<&[String]>) {
        let duration = started.elapsed();
        app.metrics
            .gate_duration
            .with_label_values(&[gate.as_str()])
            .observe(duration.as_secs_f64());
        match denied {
            None => app
                .metrics
                .gate_decisions
                .with_label_values(&[gate.as_str(), "allow", "none"])
                .inc(),
            Some(codes) => {
                for code in codes {
                    app.metrics
                        .gate_decisions
                        .with_label_values(&[gate.as_str(), "deny", code])
                        .inc();
                }
            }
        }
        self.verdicts.push(Verdict {
            gate,
            allowed: denied.is_none(),
            duration,
            reason_codes: denied.map(<[String]>::to_vec).unwrap_or_default(),
        });
    }

    fn event(&self, effect: &str, gate: Gate, reason_codes: &[String]) -> PendingEvent {
        let principal = self.principal.as_ref().map(|p| {
            json!({
                "key_id": p.key_id,
                "name": p.name,
                "role": p.role,
                "contexts": p.contexts,
                "tier": p.tier,
            })
        });
        let gates: Vec<Value> = self
            .verdicts
            .iter()
            .map(|v| {
                json!({
                    "gate": v.gate.as_str(),
                    "verdict": if v.allowed { "allow" } else { "deny" },
                    "duration_us": micros(v.duration),
                    "reason_codes": v.reason_codes,
                })
            })
            .collect();
        PendingEvent::new(
            EventType::Decision,
            Some(&self.trace_id),
            json!({
                "decision_id": self.id.to_string(),
                "effect": effect,
                "gate": gate.as_str(),
                "reason_codes": reason_codes,
                "determining_rules": self.rules,
                "policy_revision": self.policy.revision,
                "gates": gates,
                "principal": principal,
                "presented_key_id": self.presented_key_id,
                "action": self.action,
                "requested_action": self.requested_action,
                "context_id": self.context,
                "payload": self.payload_digest,
            }),
        )
    }

    fn end_event(&self, status: StatusCode, outcome: &str) -> PendingEvent {
        PendingEvent::new(
            EventType::RequestEnd,
            Some(&self.trace_id),
            json!({
                "decision_id": self.id.to_string(),
                "status": status.as_u16(),
                "outcome": outcome,
                "duration_us": micros(self.started.elapsed()),
            }),
        )
    }

    fn action_label(&self) -> &str {
        self.action.as_deref().unwrap_or("unknown")
    }
}

fn truncated(s: &str) -> String {
    s.chars().take(MAX_AUDITED_TEXT).collect()
}

/// A gate's refusal before it becomes a [`Denial`].
struct Refused {
    gate: Gate,
    codes: Vec<String>,
    message: String,
    retry_after: Option<Duration>,
}

impl Refused {
    fn new(
        gate: Gate,
        code: &str,
        message: impl Into<String>,
        retry_after: Option<Duration>,
    ) -> Self {
        Self {
            gate,
            codes: vec![code.to_owned()],
            message: message.into(),
            retry_after,
        }
    }
}

/// G1 and G2, recorded in `d`. `Err(Ok(refused))` is a refusal, `Err(Err(e))` an internal failure.
async fn authenticate_and_limit(
    app: &App,
    d: &mut Decision,
    headers: &HeaderMap,
    client: IpAddr,
) -> Result<AuthenticatedKey, Result<Refused, ApiError>> {
    let t = Instant::now();
    let now = timestamp(time::OffsetDateTime::now_utc());
    let key = match app.auth.authenticate(headers, client, &now).await {
        Ok(key) => key,
        Err(AuthRefusal::Store(e)) => return Err(Err(ApiError::internal(e, Some(&d.trace_id)))),
        Err(AuthRefusal::Throttled { retry_after }) => {
            let r = Refused::new(
                Gate::Auth,
                "RATE_LIMITED",
                "too many failed key attempts from this address; retry later",
                Some(retry_after),
            );
            d.record(app, Gate::Auth, t, Some(&r.codes));
            return Err(Ok(r));
        }
        Err(AuthRefusal::Denied {
            reason,
            message,
            presented,
        }) => {
            d.presented_key_id = presented.map(|k| k.to_string());
            let r = Refused::new(Gate::Auth, reason, message, None);
            d.record(app, Gate::Auth, t, Some(&r.codes));
            return Err(Ok(r));
        }
    };
    d.record(app, Gate::Auth, t, None);
    d.principal = Some(key.clone());

    let t = Instant::now();
    let policy = d.policy.clone();
    let (tier_name, tier) = policy.tier(&key.tier);
    let refused = match app.limiter.check(&key.key_id, tier_name, tier).await {
        Ok(RateDecision::Allowed) => None,
        Ok(RateDecision::Limited { retry_after }) => Some(Refused::new(
            Gate::RateLimit,
            "RATE_LIMITED",
            format!("rate limit of tier {tier_name} exceeded"),
            Some(retry_after),
        )),
        Err(e) if app.config.rate_limit_fail_open => {
            tracing::warn!(error = %e, "rate limiter unavailable; failing open as configured");
            None
        }
        Err(e) => {
            tracing::error!(error = %e, "rate limiter unavailable; failing closed");
            Some(Refused::new(
                Gate::RateLimit,
                "RATE_LIMIT_UNAVAILABLE",
                "the rate limiter is unavailable",
                Some(Duration::from_secs(5)),
            ))
        }
    };
    d.record(
        app,
        Gate::RateLimit,
        t,
        refused.as_ref().map(|r| r.codes.as_slice()),
    );
    match refused {
        Some(r) => Err(Ok(r)),
        None => Ok(key),
    }
}

/// Runs one `/process` request through the turnstile.
#[tracing::instrument(skip_all, fields(trace_id = %req.trace_id))]
pub async fn process(app: &Arc<App>, req: Incoming) -> Result<ActionResult, ApiError> {
    let Incoming {
        trace_id,
        headers,
        client,
        body,
    } = req;
    let content_length = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let start_event = PendingEvent::new(
        EventType::RequestStart,
        Some(&trace_id),
        json!({
            "method": "POST",
            "route": "/process",
            "client_addr": client.to_string(),
            "content_length": content_length,
        }),
    );
    let mut d = Decision::new(trace_id, start_event, app.policy());

    let key = match authenticate_and_limit(app, &mut d, &headers, client).await {
        Ok(key) => key,
        Err(Ok(r)) => {
            return refuse(app, d, r.gate, r.codes, &r.message, r.retry_after, vec![]).await;
        }
        Err(Err(e)) => return Err(e),
    };

    // G3 input
    let t = Instant::now();
    let input = match input::read_body(body, content_length, app.config.body_limit_bytes).await {
        Ok(bytes) => input::validate(&d.policy, &bytes),
        Err(refusal) => Err(refusal),
    };
    let input = match input {
        Ok(input) => input,
        Err(refusal) => {
            d.action = refusal.action.as_ref().map(|a| a.name.to_string());
            d.requested_action = refusal.requested_action.as_deref().map(truncated);
            let codes = vec![refusal.reason.to_owned()];
            d.record(app, Gate::Input, t, Some(&codes));
            return refuse(
                app,
                d,
                Gate::Input,
                codes,
                &refusal.message,
                None,
                refusal.violations,
            )
            .await;
        }
    };
    d.record(app, Gate::Input, t, None);
    d.action = Some(input.action.name.to_string());
    d.context = Some(input.context.to_string());
    d.payload_digest = Some(input.payload_digest.clone());

    // G4 action matrix
    let t = Instant::now();
    let principal = Principal {
        role: key.role.clone(),
        contexts: key.contexts.clone(),
    };
    let verdict = d.policy.evaluate(
        &principal,
        &input.context,
        &input.action.name,
        &input.payload,
    );
    d.rules = verdict.determining_rules.clone();
    if !verdict.allowed {
        d.record(app, Gate::ActionMatrix, t, Some(&verdict.reason_codes));
        let message = format!(
            "role {} may not run {} in context {}",
            key.role, input.action.name, input.context
        );
        return refuse(
            app,
            d,
            Gate::ActionMatrix,
            verdict.reason_codes,
            &message,
            None,
            vec![],
        )
        .await;
    }
    d.record(app, Gate::ActionMatrix, t, None);

    // G3 admits only actions with an executor, and the policy load checked the executor exists.
    let Some(executor) = input
        .action
        .executor
        .as_deref()
        .and_then(|name| app.executors.get(name))
    else {
        return Err(ApiError::internal(
            format!("action {} has no loaded executor", input.action.name),
            Some(&d.trace_id),
        ));
    };

    // ALLOW: durable before the executor starts.
    let allow = d.event("allow", Gate::ActionMatrix, &[]);
    let selected = PendingEvent::new(
        EventType::ExecutorSelected,
        Some(&d.trace_id),
        json!({
            "decision_id": d.id.to_string(),
            "action": input.action.name,
            "executor_id": executor.name,
            "executor_kind": executor.kind,
            "timeout_ms": u64::try_from(executor.timeout.as_millis()).unwrap_or(u64::MAX),
            "executor_facts": executor.audit_facts(),
        }),
    );
    let start = d.start_event.clone();
    if let Err(e) = app.audit.append(vec![start, allow, selected]).await {
        tracing::error!(error = %e, "ALLOW not durable; refusing to execute");
        count_result(app, d.action_label(), "unavailable");
        return Err(ApiError::AuditUnavailable {
            trace_id: d.trace_id,
            decision_id: Some(d.id),
        });
    }

    let t = Instant::now();
    let outcome = executor
        .run(ExecutorCall {
            trace_id: d.trace_id.clone(),
            decision_id: d.id,
            action: input.action.name.clone(),
            context: input.context.clone(),
            payload: input.payload,
            steps: Some(Arc::new(StepContext {
                app: app.clone(),
                policy: d.policy.clone(),
                trace_id: d.trace_id.clone(),
                decision_id: d.id,
                principal: principal.clone(),
                context: input.context.clone(),
                depth: 1,
            })),
        })
        .await;
    let elapsed = t.elapsed();
    let status_label = count_execution(app, &executor.name, &outcome, elapsed);
    let http_status = match &outcome {
        Ok(_) => StatusCode::OK,
        Err(ExecutorError::Timeout(_)) => StatusCode::GATEWAY_TIMEOUT,
        Err(ExecutorError::Failed(_)) => StatusCode::BAD_GATEWAY,
    };
    let result_digest = outcome
        .as_ref()
        .ok()
        .map(|v| digest_of(&serde_json_canonicalizer::to_vec(v).unwrap_or_default()));
    let executed = PendingEvent::new(
        EventType::ActionExecuted,
        Some(&d.trace_id),
        json!({
            "decision_id": d.id.to_string(),
            "action": input.action.name,
            "executor_id": executor.name,
            "status": status_label,
            "duration_us": micros(elapsed),
            "result": result_digest,
            "error": outcome.as_ref().err().map(ToString::to_string),
            "executor_facts": executor.audit_facts(),
        }),
    );
    let end = d.end_event(
        http_status,
        if outcome.is_ok() {
            "SUCCESS"
        } else {
            "EXECUTION_FAILED"
        },
    );
    if let Err(e) = app.audit.append(vec![executed, end]).await {
        tracing::error!(error = %e, "execution outcome not durable; answering 503");
        count_result(app, d.action_label(), "unavailable");
        return Err(ApiError::AuditUnavailable {
            trace_id: d.trace_id,
            decision_id: Some(d.id),
        });
    }
    count_result(app, d.action_label(), status_label);
    match outcome {
        Ok(result) => Ok(ActionResult {
            trace_id: d.trace_id.to_string(),
            decision_id: d.id.to_string(),
            status: "SUCCESS",
            action: input.action.name.to_string(),
            executor_id: executor.name.clone(),
            result,
            execution_time_ms: (elapsed.as_secs_f64() * 1e6).round() / 1e3,
            policy_revision: d.policy.revision.clone(),
        }),
        Err(e) => Err(ApiError::ExecutionFailed {
            reason: if matches!(e, ExecutorError::Timeout(_)) {
                "EXECUTOR_TIMEOUT"
            } else {
                "EXECUTOR_FAILED"
            },
            message: format!("executor {} failed: {e}", executor.name),
            trace_id: d.trace_id,
            decision_id: d.id,
            action: input.action.name.to_string(),
            executor_id: executor.name.clone(),
        }),
    }
}

fn count_result(app: &App, action: &str, status: &str) {
    app.metrics
        .action_results
        .with_label_values(&[action, status])
        .inc();
}

/// Records REQUEST_START, DECISION (deny) and REQUEST_END durably, then returns the refusal.
async fn refuse(
    app: &App,
    d: Decision,
    gate: Gate,
    reason_codes: Vec<String>,
    message: &str,
    retry_after: Option<Duration>,
    violations: Vec<Violation>,
) -> Result<ActionResult, ApiError> {
    let denial = Denial {
        gate,
        reason_codes,
        message: message.to_owned(),
        trace_id: d.trace_id.clone(),
        decision_id: d.id,
        // Round up: a client that waits the advertised seconds must not be refused again.
        retry_after_secs: retry_after.map(|r| r.as_secs() + u64::from(r.subsec_nanos() > 0)),
        violations,
    };
    let decision = d.event("deny", gate, &denial.reason_codes);
    let end = d.end_event(denial.status(), "DENIED");
    let start = d.start_event.clone();
    if let Err(e) = app.audit.append(vec![start, decision, end]).await {
        tracing::error!(error = %e, "denial not durable; answering 503");
        count_result(app, d.action_label(), "unavailable");
        return Err(ApiError::AuditUnavailable {
            trace_id: d.trace_id,
            decision_id: Some(d.id),
        });
    }
    count_result(app, d.action_label(), "denied");
    Err(ApiError::Denied(Box::new(denial)))
}

/// Authorizes a request for a permission-only action (e.g. `audit.read`) on another route: G1, G2 and
/// G4 (allowed in at least one context the key may use). Audited like `/process`: REQUEST_START,
/// DECISION and REQUEST_END are durable before the caller sees any data.
pub async fn authorize_permission(
    app: &App,
    trace_id: &TraceId,
    headers: &HeaderMap,
    client: IpAddr,
    route: &'static str,
    action_name: &str,
) -> Result<AuthenticatedKey, ApiError> {
    let start_event = PendingEvent::new(
        EventType::RequestStart,
        Some(trace_id),
        json!({ "method": "GET", "route": route, "client_addr": client.to_string() }),
    );
    let policy = app.policy();
    let Some(action) = policy.action(action_name).cloned() else {
        return Err(ApiError::internal(
            format!("the policy defines no {action_name} action"),
            Some(trace_id),
        ));
    };
    let mut d = Decision::new(trace_id.clone(), start_event, policy);
    d.action = Some(action.name.to_string());
    let key = match authenticate_and_limit(app, &mut d, headers, client).await {
        Ok(key) => key,
        Err(Ok(r)) => {
            return Err(deny_only(app, d, r.gate, r.codes, &r.message, r.retry_after).await);
        }
        Err(Err(e)) => return Err(e),
    };

    let t = Instant::now();
    let principal = Principal {
        role: key.role.clone(),
        contexts: key.contexts.clone(),
    };
    let empty = Value::Object(serde_json::Map::new());
    let mut last = None;
    for context in d.policy.contexts().cloned().collect::<Vec<_>>() {
        let verdict = d
            .policy
            .evaluate(&principal, &context, &action.name, &empty);
        if verdict.allowed {
            d.context = Some(context.to_string());
            last = Some(verdict);
            break;
        }
        if last.is_none()
            || verdict.reason_codes.first().map(String::as_str) != Some("CONTEXT_FORBIDDEN")
        {
            last = Some(verdict);
        }
    }
    let verdict = last.unwrap_or_else(|| crate::policy::MatrixDecision {
        allowed: false,
        reason_codes: vec!["NO_MATCHING_RULE".to_owned()],
        determining_rules: vec![],
    });
    d.rules = verdict.determining_rules.clone();
    if !verdict.allowed {
        d.record(app, Gate::ActionMatrix, t, Some(&verdict.reason_codes));
        let message = format!("role {} may not {}", key.role, action.name);
        return Err(deny_only(
            app,
            d,
            Gate::ActionMatrix,
            verdict.reason_codes,
            &message,
            None,
        )
        .await);
    }
    d.record(app, Gate::ActionMatrix, t, None);
    let allow = d.event("allow", Gate::ActionMatrix, &[]);
    let end = d.end_event(StatusCode::OK, "SUCCESS");
    let start = d.start_event.clone();
    if let Err(e) = app.audit.append(vec![start, allow, end]).await {
        tracing::error!(error = %e, "audit read not durable; refusing");
        return Err(ApiError::AuditUnavailable {
            trace_id: d.trace_id,
            decision_id: Some(d.id),
        });
    }
    Ok(key)
}

/// [`refuse`] for routes that do not return an ActionResult.
async fn deny_only(
    app: &App,
    d: Decision,
    gate: Gate,
    codes: Vec<String>,
    message: &str,
    retry_after: Option<Duration>,
) -> ApiError {
    match refuse(app, d, gate, codes, message, retry_after, vec![]).await {
        Err(e) => e,
        Ok(_) => ApiError::internal("a refusal produced a result", None),
    }
}

/// How deep composites may nest (a composite step running a composite ...); deeper is refused, so a
/// composite naming itself cannot loop.
const MAX_STEP_DEPTH: usize = 4;

/// Runs the steps of a composite for one allowed request: same principal, context and policy.
struct StepContext {
    app: Arc<App>,
    policy: Arc<Policy>,
    trace_id: TraceId,
    decision_id: Uuid,
    principal: Principal,
    context: ContextId,
    depth: usize,
}

#[async_trait::async_trait]
impl StepRunner for StepContext {
    async fn run_step(
        &self,
        index: usize,
        action: &str,
        payload: Value,
    ) -> Result<Value, StepError> {
        let started = Instant::now();
        let refused = |codes: &[&str]| StepError::Refused {
            action: action.to_owned(),
            reason_codes: codes.iter().map(|c| (*c).to_owned()).collect(),
        };
        let payload_digest =
            digest_of(&serde_json_canonicalizer::to_vec(&payload).unwrap_or_default());
        let mut rules = Vec::new();
        let mut executor_id = None;
        let mut facts = None;
        let outcome: Result<Value, StepError> = 'run: {
            let Some(act) = self.policy.action(action).filter(|a| a.executor.is_some()) else {
                break 'run Err(refused(&["ACTION_UNKNOWN"]));
            };
            if self.depth >= MAX_STEP_DEPTH {
                break 'run Err(refused(&["STEP_DEPTH_EXCEEDED"]));
            }
            if act.validate(&payload).is_err() {
                break 'run Err(refused(&["INPUT_SCHEMA_INVALID"]));
            }
            let verdict = self
                .policy
                .evaluate(&self.principal, &self.context, &act.name, &payload);
            rules = verdict.determining_rules.clone();
            if !verdict.allowed {
                break 'run Err(StepError::Refused {
                    action: action.to_owned(),
                    reason_codes: verdict.reason_codes,
                });
            }
            let Some(executor) = act
                .executor
                .as_deref()
                .and_then(|n| self.app.executors.get(n))
            else {
                break 'run Err(refused(&["ACTION_UNKNOWN"]));
            };
            executor_id = Some(executor.name.clone());
            facts = executor.audit_facts();
            let t = Instant::now();
            let result = executor
                .run(ExecutorCall {
                    trace_id: self.trace_id.clone(),
                    decision_id: self.decision_id,
                    action: act.name.clone(),
                    context: self.context.clone(),
                    payload,
                    steps: Some(Arc::new(StepContext {
                        app: self.app.clone(),
                        policy: self.policy.clone(),
                        trace_id: self.trace_id.clone(),
                        decision_id: self.decision_id,
                        principal: self.principal.clone(),
                        context: self.context.clone(),
                        depth: self.depth + 1,
                    })),
                })
                .await;
            count_execution(&self.app, &executor.name, &result, t.elapsed());
            result.map_err(|error| StepError::Failed {
                action: action.to_owned(),
                error,
            })
        };
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
                "executor_id": executor_id,
                "status": status,
                "reason_codes": codes,
                "determining_rules": rules,
                "duration_us": micros(started.elapsed()),
                "payload": payload_digest,
                "result": outcome.as_ref().ok().map(|v| digest_of(&serde_json_canonicalizer::to_vec(v).unwrap_or_default())),
                "error": error,
                "executor_facts": facts,
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
