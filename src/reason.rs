//! The gates that can refuse a request and the reason codes they refuse with. A reason code decides its
//! HTTP status through one exhaustive match, so a new code cannot compile without a status.

use std::fmt;
use std::sync::Arc;

use axum::http::StatusCode;
use serde::{Serialize, Serializer};

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

/// Why a request was refused or failed: the `reason_codes` of every error body, DECISION event and
/// gate metric.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReasonCode {
    AuthMissingKey,
    AuthInvalidKey,
    AuthKeyRevoked,
    AuthKeyExpired,
    /// A key over its tier's quota, or an address over its failed-attempt limit.
    RateLimited,
    RateLimitUnavailable,
    InputTooLarge,
    InputMalformedJson,
    /// A `Content-Type` other than `application/json`.
    InputUnsupportedMediaType,
    /// The body did not arrive within the body-read timeout.
    InputTimeout,
    ActionUnknown,
    ContextUnknown,
    InputSchemaInvalid,
    NoMatchingRule,
    ActionForbidden,
    ContextForbidden,
    PolicyEvalError,
    /// A composite nested deeper than the step bound.
    StepDepthExceeded,
    AuditUnavailable,
    ExecutorFailed,
    ExecutorTimeout,
    /// The action's executor is switched off by an operator (`catraca executors disable`).
    ExecutorDisabled,
    NotFound,
    /// A route that exists, asked with another method.
    MethodNotAllowed,
    /// Request headers past the gateway's limits.
    HeadersTooLarge,
    /// A request line or path the gateway cannot read (e.g. invalid UTF-8 after percent-decoding).
    MalformedRequest,
    /// The gateway holds as many connections as it is configured to; a new one is answered and closed.
    TooManyConnections,
    InternalError,
    /// A deny rule's own `reason_code` (UPPER_SNAKE_CASE, checked at policy load); always a 403.
    Rule(Arc<str>),
}

impl ReasonCode {
    /// The action matrix's own codes, which a deny rule may also name as its `reason_code`.
    const MATRIX: [Self; 4] = [
        Self::NoMatchingRule,
        Self::ActionForbidden,
        Self::ContextForbidden,
        Self::PolicyEvalError,
    ];

    /// The code a deny rule names: the matrix's own code of that name, else a rule-defined code.
    pub fn for_rule(code: &str) -> Self {
        Self::MATRIX
            .into_iter()
            .find(|c| c.as_str() == code)
            .unwrap_or_else(|| Self::Rule(code.into()))
    }

    pub fn as_str(&self) -> &str {
        match self {
            Self::AuthMissingKey => "AUTH_MISSING_KEY",
            Self::AuthInvalidKey => "AUTH_INVALID_KEY",
            Self::AuthKeyRevoked => "AUTH_KEY_REVOKED",
            Self::AuthKeyExpired => "AUTH_KEY_EXPIRED",
            Self::RateLimited => "RATE_LIMITED",
            Self::RateLimitUnavailable => "RATE_LIMIT_UNAVAILABLE",
            Self::InputTooLarge => "INPUT_TOO_LARGE",
            Self::InputMalformedJson => "INPUT_MALFORMED_JSON",
            Self::InputUnsupportedMediaType => "INPUT_UNSUPPORTED_MEDIA_TYPE",
            Self::InputTimeout => "INPUT_TIMEOUT",
            Self::ActionUnknown => "ACTION_UNKNOWN",
            Self::ContextUnknown => "CONTEXT_UNKNOWN",
            Self::InputSchemaInvalid => "INPUT_SCHEMA_INVALID",
            Self::NoMatchingRule => "NO_MATCHING_RULE",
            Self::ActionForbidden => "ACTION_FORBIDDEN",
            Self::ContextForbidden => "CONTEXT_FORBIDDEN",
            Self::PolicyEvalError => "POLICY_EVAL_ERROR",
            Self::StepDepthExceeded => "STEP_DEPTH_EXCEEDED",
            Self::AuditUnavailable => "AUDIT_UNAVAILABLE",
            Self::ExecutorFailed => "EXECUTOR_FAILED",
            Self::ExecutorTimeout => "EXECUTOR_TIMEOUT",
            Self::ExecutorDisabled => "EXECUTOR_DISABLED",
            Self::NotFound => "NOT_FOUND",
            Self::MethodNotAllowed => "METHOD_NOT_ALLOWED",
            Self::HeadersTooLarge => "HEADERS_TOO_LARGE",
            Self::MalformedRequest => "MALFORMED_REQUEST",
            Self::TooManyConnections => "TOO_MANY_CONNECTIONS",
            Self::InternalError => "INTERNAL_ERROR",
            Self::Rule(code) => code,
        }
    }

    /// The HTTP status a response refused or failed for this reason carries.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::AuthMissingKey
            | Self::AuthInvalidKey
            | Self::AuthKeyRevoked
            | Self::AuthKeyExpired => StatusCode::UNAUTHORIZED,
            Self::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            Self::RateLimitUnavailable
            | Self::AuditUnavailable
            | Self::TooManyConnections
            | Self::ExecutorDisabled => StatusCode::SERVICE_UNAVAILABLE,
            Self::InputUnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::InputTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Self::MalformedRequest => StatusCode::BAD_REQUEST,
            Self::InputTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::InputMalformedJson | Self::ActionUnknown | Self::ContextUnknown => {
                StatusCode::BAD_REQUEST
            }
            Self::InputSchemaInvalid => StatusCode::UNPROCESSABLE_ENTITY,
            Self::NoMatchingRule
            | Self::ActionForbidden
            | Self::ContextForbidden
            | Self::PolicyEvalError
            | Self::StepDepthExceeded
            | Self::Rule(_) => StatusCode::FORBIDDEN,
            Self::ExecutorFailed => StatusCode::BAD_GATEWAY,
            Self::ExecutorTimeout => StatusCode::GATEWAY_TIMEOUT,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::InternalError => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl fmt::Display for ReasonCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for ReasonCode {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_code_has_the_status_of_the_contract() {
        let cases = [
            (ReasonCode::AuthMissingKey, 401),
            (ReasonCode::AuthKeyExpired, 401),
            (ReasonCode::RateLimited, 429),
            (ReasonCode::RateLimitUnavailable, 503),
            (ReasonCode::InputTooLarge, 413),
            (ReasonCode::InputMalformedJson, 400),
            (ReasonCode::InputUnsupportedMediaType, 415),
            (ReasonCode::InputTimeout, 408),
            (ReasonCode::MethodNotAllowed, 405),
            (ReasonCode::HeadersTooLarge, 431),
            (ReasonCode::MalformedRequest, 400),
            (ReasonCode::TooManyConnections, 503),
            (ReasonCode::ExecutorDisabled, 503),
            (ReasonCode::ContextUnknown, 400),
            (ReasonCode::InputSchemaInvalid, 422),
            (ReasonCode::NoMatchingRule, 403),
            (ReasonCode::PolicyEvalError, 403),
            (ReasonCode::AuditUnavailable, 503),
            (ReasonCode::ExecutorFailed, 502),
            (ReasonCode::ExecutorTimeout, 504),
        ];
        for (code, status) in cases {
            assert_eq!(code.status().as_u16(), status, "{code}");
        }
    }

    #[test]
    fn a_rule_code_is_the_matrix_code_of_that_name_or_its_own_403() {
        assert_eq!(
            ReasonCode::for_rule("CONTEXT_FORBIDDEN"),
            ReasonCode::ContextForbidden
        );
        let own = ReasonCode::for_rule("N_TOO_LARGE");
        assert_eq!(own.as_str(), "N_TOO_LARGE");
        assert_eq!(own.status(), StatusCode::FORBIDDEN);
        // Another gate's code named by a rule stays a matrix refusal: 403, not 429.
        assert_eq!(
            ReasonCode::for_rule("RATE_LIMITED").status(),
            StatusCode::FORBIDDEN
        );
    }
}
