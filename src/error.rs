//! The one error type of the service: every refusal and failure becomes the documented JSON body with
//! its status and headers. Unexpected errors become a generic 500 whose detail goes to the log only.
//! It sits below the turnstile and the HTTP routes, which both speak it.

use crate::audit::anchor::Receipt;
use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::domain::TraceId;
use crate::executors::ExecutorError;
use crate::policy::Violation;
use crate::reason::{Gate, ReasonCode};

/// A gate's refusal: everything the denial body and the DECISION event need.
#[derive(Debug)]
pub struct Denial {
    pub gate: Gate,
    /// Never empty: the first code decides the status.
    pub reason_codes: Vec<ReasonCode>,
    pub message: String,
    pub trace_id: TraceId,
    pub decision_id: Uuid,
    pub retry_after_secs: Option<u64>,
    pub violations: Vec<Violation>,
    /// Where the refusal's DECISION is in the trail; `None` for a refusal summarised instead of
    /// recorded one by one (a throttled address).
    pub receipt: Option<Receipt>,
}

fn codes_text(codes: &[ReasonCode]) -> String {
    codes
        .iter()
        .map(ReasonCode::as_str)
        .collect::<Vec<_>>()
        .join(",")
}

impl Denial {
    pub fn status(&self) -> StatusCode {
        self.reason_codes
            .first()
            .map_or(StatusCode::FORBIDDEN, ReasonCode::status)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// A gate refused the request.
    #[error("denied by {}: {}", .0.gate.as_str(), codes_text(&.0.reason_codes))]
    Denied(Box<Denial>),
    /// The executor failed or timed out after ALLOW.
    #[error("execution failed: {error}")]
    ExecutionFailed {
        error: ExecutorError,
        trace_id: TraceId,
        decision_id: Uuid,
        action: String,
        executor_id: String,
        /// Where the request's DECISION (allow) is in the trail (boxed: errors travel by value).
        receipt: Option<Box<Receipt>>,
    },
    /// The audit store cannot write: nothing runs unaudited. `executed` when the action had already
    /// run (its ALLOW was recorded) and only its outcome could not be.
    #[error("audit unavailable")]
    AuditUnavailable {
        trace_id: TraceId,
        decision_id: Option<Uuid>,
        executed: bool,
    },
    #[error("not found: {message}")]
    NotFound {
        message: String,
        trace_id: Option<TraceId>,
    },
    /// Refused before any gate, because of the request itself: a method the route does not take
    /// (`METHOD_NOT_ALLOWED`), headers past the front door's limits (`HEADERS_TOO_LARGE`) or a path
    /// that cannot be read (`MALFORMED_REQUEST`). `reason` decides the status.
    #[error("rejected ({reason}): {message}")]
    Rejected {
        reason: ReasonCode,
        message: String,
        trace_id: Option<TraceId>,
    },
    /// Anything unexpected; the detail is logged, the client sees a generic message.
    #[error("internal: {detail}")]
    Internal {
        detail: String,
        trace_id: Option<TraceId>,
    },
}

impl ApiError {
    pub fn internal(detail: impl std::fmt::Display, trace_id: Option<&TraceId>) -> Self {
        Self::Internal {
            detail: detail.to_string(),
            trace_id: trace_id.cloned(),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::Denied(d) => d.status(),
            Self::ExecutionFailed { error, .. } => execution_reason(error).status(),
            Self::AuditUnavailable { .. } => ReasonCode::AuditUnavailable.status(),
            Self::NotFound { .. } => ReasonCode::NotFound.status(),
            Self::Rejected { reason, .. } => reason.status(),
            Self::Internal { .. } => ReasonCode::InternalError.status(),
        }
    }
}

/// The reason code of an executor failure after ALLOW.
fn execution_reason(error: &ExecutorError) -> ReasonCode {
    match error {
        ExecutorError::Failed(_) => ReasonCode::ExecutorFailed,
        ExecutorError::Timeout(_) => ReasonCode::ExecutorTimeout,
    }
}

/// The body of every refusal and failure.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// `GATE_DENIED`, `EXECUTION_FAILED`, `SERVICE_UNAVAILABLE`, `NOT_FOUND`, `REQUEST_REJECTED` (the
    /// request itself: method, headers or path; `reason_codes` says which), `INTERNAL_ERROR` or
    /// `TOO_MANY_CONNECTIONS` (written by the connection loop at its cap).
    pub error: &'static str,
    /// The refusing gate (`auth`, `rate_limit`, `input`, `action_matrix`), or `audit`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub gate: Option<&'static str>,
    #[schema(value_type = Vec<String>)]
    pub reason_codes: Vec<ReasonCode>,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub trace_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub decision_id: Option<String>,
    /// For `INPUT_SCHEMA_INVALID`: each failing JSON pointer and why.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub violations: Vec<Violation>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub action: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub executor_id: Option<String>,
    /// Where the request's DECISION event is in the audit trail (every recorded refusal, and an
    /// execution failure): prove it with `GET /v1/audit/proofs/{decision_id}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub receipt: Option<Receipt>,
}

/// How an error is answered, apart from its body: the status and the headers that go with it.
pub struct Head {
    pub status: StatusCode,
    /// `Retry-After`, in seconds.
    pub retry_after: Option<u64>,
    /// `WWW-Authenticate`, on a 401.
    pub authenticate: Option<&'static str>,
}

impl Head {
    /// The response: this status and these headers with `body` (the error's own, or a facade's shape
    /// of it).
    pub fn respond(self, body: impl IntoResponse) -> Response {
        let mut response = (self.status, body).into_response();
        let headers = response.headers_mut();
        if let Some(secs) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if let Some(challenge) = self.authenticate {
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(challenge),
            );
        }
        response
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (head, body) = self.answer();
        head.respond(Json(body))
    }
}

impl ApiError {
    /// How this error is answered; routes with a body shape of their own (the OpenAI facade) start
    /// from here.
    pub fn answer(self) -> (Head, ErrorBody) {
        let status = self.status();
        let mut retry_after = None;
        let mut authenticate = None;
        let body = match self {
            Self::Denied(d) => {
                retry_after = d.retry_after_secs;
                if status == StatusCode::UNAUTHORIZED {
                    authenticate = Some(bearer_challenge(&d.reason_codes));
                }
                ErrorBody {
                    error: "GATE_DENIED",
                    gate: Some(d.gate.as_str()),
                    reason_codes: d.reason_codes,
                    message: d.message,
                    trace_id: Some(d.trace_id.to_string()),
                    decision_id: Some(d.decision_id.to_string()),
                    violations: d.violations,
                    action: None,
                    executor_id: None,
                    receipt: d.receipt,
                }
            }
            Self::ExecutionFailed {
                error,
                trace_id,
                decision_id,
                action,
                executor_id,
                receipt,
            } => ErrorBody {
                error: "EXECUTION_FAILED",
                gate: None,
                reason_codes: vec![execution_reason(&error)],
                message: format!("executor {executor_id} failed: {error}"),
                trace_id: Some(trace_id.to_string()),
                decision_id: Some(decision_id.to_string()),
                violations: vec![],
                action: Some(action),
                executor_id: Some(executor_id),
                receipt: receipt.map(|r| *r),
            },
            Self::AuditUnavailable {
                trace_id,
                decision_id,
                executed,
            } => {
                // Clients should retry later; the audit store usually recovers within seconds.
                retry_after = Some(5);
                ErrorBody {
                    error: "SERVICE_UNAVAILABLE",
                    gate: Some("audit"),
                    reason_codes: vec![ReasonCode::AuditUnavailable],
                    message: if executed {
                        // Not "nothing ran": a client must not retry an action that did run as if
                        // it had not.
                        "the action ran, but the audit trail cannot record its outcome right now; \
                         its ALLOW is recorded under this trace id"
                    } else {
                        "the audit trail cannot record this request right now; nothing was executed"
                    }
                    .to_owned(),
                    trace_id: Some(trace_id.to_string()),
                    decision_id: decision_id.map(|d| d.to_string()),
                    violations: vec![],
                    action: None,
                    executor_id: None,
                    receipt: None,
                }
            }
            Self::NotFound { message, trace_id } => ErrorBody {
                error: "NOT_FOUND",
                gate: None,
                reason_codes: vec![ReasonCode::NotFound],
                message,
                trace_id: trace_id.map(|t| t.to_string()),
                decision_id: None,
                violations: vec![],
                action: None,
                executor_id: None,
                receipt: None,
            },
            Self::Rejected {
                reason,
                message,
                trace_id,
            } => ErrorBody {
                error: "REQUEST_REJECTED",
                gate: None,
                reason_codes: vec![reason],
                message,
                trace_id: trace_id.map(|t| t.to_string()),
                decision_id: None,
                violations: vec![],
                action: None,
                executor_id: None,
                receipt: None,
            },
            Self::Internal { detail, trace_id } => {
                tracing::error!(%detail, trace_id = ?trace_id.as_ref().map(TraceId::as_str), "internal error");
                ErrorBody {
                    error: "INTERNAL_ERROR",
                    gate: None,
                    reason_codes: vec![ReasonCode::InternalError],
                    message: "internal error; the operator can find details by trace id".to_owned(),
                    trace_id: trace_id.map(|t| t.to_string()),
                    decision_id: None,
                    violations: vec![],
                    action: None,
                    executor_id: None,
                    receipt: None,
                }
            }
        };
        let head = Head {
            status,
            retry_after,
            authenticate,
        };
        (head, body)
    }
}

/// The `WWW-Authenticate` challenge of a 401 (RFC 6750, section 3): a request without a key gets the
/// bare challenge; a key that was presented but not accepted adds `error="invalid_token"`, so a client
/// can tell "send a key" from "this key will not do" without parsing the body.
fn bearer_challenge(codes: &[ReasonCode]) -> &'static str {
    if codes.first() == Some(&ReasonCode::AuthMissingKey) {
        r#"Bearer realm="catraca""#
    } else {
        r#"Bearer realm="catraca", error="invalid_token""#
    }
}
