//! A request's story as the turnstile builds it: each gate's verdict (counted in the metrics as it is
//! recorded), who asked for what, and the events that make it durable.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use opentelemetry::KeyValue;
use serde_json::Value;
use uuid::Uuid;

use crate::audit::{EventType, PendingEvent};
use crate::domain::ContextId;
use crate::domain::TraceId;
use crate::event::{Canonical, Fields, canonical_array};
use crate::gates::auth::AuthenticatedKey;
use crate::metrics::Metrics;
use crate::policy::Policy;
use crate::reason::{Gate, ReasonCode};
use crate::telemetry;

/// Longest request-supplied text kept in an audit event (e.g. an unknown action name).
const MAX_AUDITED_TEXT: usize = 128;

pub(super) fn truncated(s: &str) -> String {
    s.chars().take(MAX_AUDITED_TEXT).collect()
}

pub(super) fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// One gate's verdict as recorded in the DECISION event.
struct Verdict {
    gate: Gate,
    allowed: bool,
    duration: Duration,
    reason_codes: Vec<ReasonCode>,
}

/// The gates' verdicts in the order they ran.
#[derive(Default)]
pub(super) struct Verdicts(Vec<Verdict>);

impl Verdicts {
    /// Records `gate`'s verdict (refused with `denied`, else allowed) and counts it in the metrics.
    pub(super) fn record(
        &mut self,
        metrics: &Metrics,
        gate: Gate,
        started: Instant,
        denied: Option<&[ReasonCode]>,
    ) {
        let duration = started.elapsed();
        metrics
            .gate_duration
            .with_label_values(&[gate.as_str()])
            .observe(duration.as_secs_f64());
        match denied {
            None => metrics
                .gate_decisions
                .with_label_values(&[gate.as_str(), "allow", "none"])
                .inc(),
            Some(codes) => {
                for code in codes {
                    metrics
                        .gate_decisions
                        .with_label_values(&[gate.as_str(), "deny", code.as_str()])
                        .inc();
                }
            }
        }
        telemetry::record(
            || Cow::Owned(format!("gate {}", gate.as_str())),
            started,
            || {
                let mut attributes = vec![
                    KeyValue::new("catraca.gate", gate.as_str()),
                    KeyValue::new(
                        "catraca.verdict",
                        if denied.is_some() { "deny" } else { "allow" },
                    ),
                ];
                if let Some(codes) = denied {
                    let codes: Vec<&str> = codes.iter().map(ReasonCode::as_str).collect();
                    attributes.push(KeyValue::new("catraca.reason_codes", codes.join(",")));
                }
                attributes
            },
            None,
        );
        self.0.push(Verdict {
            gate,
            allowed: denied.is_none(),
            duration,
            reason_codes: denied.map(<[ReasonCode]>::to_vec).unwrap_or_default(),
        });
    }

    /// The verdicts as the DECISION's `gates`, in canonical JSON.
    fn canonical(&self) -> String {
        canonical_array(self.0.iter().map(|v| {
            Canonical::object()
                .uint("duration_us", micros(v.duration))
                .str("gate", v.gate.as_str())
                .strs(
                    "reason_codes",
                    v.reason_codes.iter().map(ReasonCode::as_str),
                )
                .str("verdict", if v.allowed { "allow" } else { "deny" })
                .finish()
        }))
    }
}

/// What the request is now known to be about, for the DECISION and STEP_EXECUTED events.
#[derive(Default)]
pub(super) struct Facts {
    /// The action, when the policy knows it.
    pub action: Option<String>,
    /// The action name the client sent, when the policy does not know it (truncated).
    pub requested_action: Option<String>,
    pub context: Option<String>,
    /// Size and SHA-256 of the payload's canonical JSON.
    pub payload_digest: Option<Value>,
    /// The rules that decided.
    pub rules: Vec<String>,
}

/// The request's story so far; becomes the DECISION event.
pub(super) struct Decision {
    pub id: Uuid,
    pub trace_id: TraceId,
    started: Instant,
    start_event: PendingEvent,
    pub policy: Arc<Policy>,
    pub verdicts: Verdicts,
    pub principal: Option<AuthenticatedKey>,
    pub presented_key_id: Option<String>,
    pub facts: Facts,
}

impl Decision {
    /// A request's story before any gate has run; `start` is its REQUEST_START event.
    pub(super) fn new(trace_id: TraceId, start: PendingEvent, policy: Arc<Policy>) -> Self {
        Self {
            id: Uuid::now_v7(),
            trace_id,
            started: Instant::now(),
            start_event: start,
            policy,
            verdicts: Verdicts(Vec::with_capacity(Gate::ALL.len())),
            principal: None,
            presented_key_id: None,
            facts: Facts::default(),
        }
    }

    /// REQUEST_START, written together with the decision.
    pub(super) fn start_event(&self) -> PendingEvent {
        self.start_event.clone()
    }

    /// Adds `details` to REQUEST_START; only before anything of the story is written.
    pub(super) fn add_to_start(&mut self, details: serde_json::Map<String, Value>) {
        self.start_event.add_fields(details);
    }

    /// The DECISION event: `effect` (`allow` or `deny`) by `gate` for `reason_codes`.
    pub(super) fn event(
        &self,
        effect: &str,
        gate: Gate,
        reason_codes: &[ReasonCode],
    ) -> PendingEvent {
        let principal = self.principal.as_ref().map_or_else(
            || "null".to_owned(),
            |p| {
                Canonical::object()
                    .opt_strs(
                        "contexts",
                        p.contexts.as_ref().map(|c| c.iter().map(ContextId::as_str)),
                    )
                    .str("key_id", p.key_id.as_str())
                    .str("name", &p.name)
                    .str("role", p.role.as_str())
                    .str("tier", p.tier.as_str())
                    .finish()
            },
        );
        // Members in canonical (key) order.
        let fields = Fields::new()
            .opt_str("action", self.facts.action.as_deref())
            .opt_str("context_id", self.facts.context.as_deref())
            .str("decision_id", &self.id.to_string())
            .strs(
                "determining_rules",
                self.facts.rules.iter().map(String::as_str),
            )
            .str("effect", effect)
            .str("gate", gate.as_str())
            .raw("gates", &self.verdicts.canonical())
            .opt_value("payload", self.facts.payload_digest.as_ref())
            .str("policy_revision", &self.policy.revision)
            .opt_str("presented_key_id", self.presented_key_id.as_deref())
            .raw("principal", &principal)
            .strs("reason_codes", reason_codes.iter().map(ReasonCode::as_str))
            .opt_str("requested_action", self.facts.requested_action.as_deref());
        PendingEvent::from_fields(EventType::Decision, Some(&self.trace_id), fields)
    }

    /// REQUEST_END with the status the client gets and its outcome.
    pub(super) fn end_event(&self, status: StatusCode, outcome: &str) -> PendingEvent {
        let fields = Fields::new()
            .str("decision_id", &self.id.to_string())
            .uint("duration_us", micros(self.started.elapsed()))
            .str("outcome", outcome)
            .uint("status", u64::from(status.as_u16()));
        PendingEvent::from_fields(EventType::RequestEnd, Some(&self.trace_id), fields)
    }

    /// The action as a metric label: only names the policy knows.
    pub(super) fn action_label(&self) -> &str {
        self.facts.action.as_deref().unwrap_or("unknown")
    }
}
