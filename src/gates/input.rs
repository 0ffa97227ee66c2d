//! G3: input. Body size limit, well-formed JSON and the `{action, context_id, payload}` envelope
//! ([`read_body`], [`parse_envelope`]); then the policy's half ([`admit`]), which composite steps pass
//! too: a known action with an executor, a known context, and the payload valid against the action's
//! JSON Schema (compiled at load).

use std::sync::Arc;

use axum::body::{Body, Bytes};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde_json::Value;

use crate::domain::ContextId;
use crate::policy::{Action, Policy, Violation};
use crate::reason::ReasonCode;

/// What a well-formed body asks for, before the policy has looked at it.
pub struct Envelope {
    pub action: String,
    pub context: String,
    pub payload: Value,
}

/// A request that passed G3.
pub struct ValidInput {
    pub action: Arc<Action>,
    pub context: ContextId,
    pub payload: Value,
}

/// Why G3 refused; `action` is the requested action when the policy knows it (for metrics).
pub struct InputRefusal {
    pub reason: ReasonCode,
    pub message: String,
    pub violations: Vec<Violation>,
    pub action: Option<Arc<Action>>,
    /// The action name the client sent, when the policy does not know it (for the audit trail).
    pub requested_action: Option<String>,
}

impl InputRefusal {
    fn new(reason: ReasonCode, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
            violations: vec![],
            action: None,
            requested_action: None,
        }
    }
}

/// Reads at most `limit` bytes; a declared or actual larger body is `INPUT_TOO_LARGE`.
pub async fn read_body(
    body: Body,
    content_length: Option<u64>,
    limit: usize,
) -> Result<Bytes, InputRefusal> {
    let too_large = || {
        InputRefusal::new(
            ReasonCode::InputTooLarge,
            format!("the request body is larger than {limit} bytes"),
        )
    };
    if content_length.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<LengthLimitError>() => Err(too_large()),
        Err(e) => Err(InputRefusal::new(
            ReasonCode::InputMalformedJson,
            format!("the request body could not be read: {e}"),
        )),
    }
}

fn violation(pointer: &str, message: &str) -> Violation {
    Violation {
        pointer: pointer.to_owned(),
        message: message.to_owned(),
    }
}

/// Parses the body as the `{action, context_id, payload}` envelope; a missing payload is `{}`.
pub fn parse_envelope(bytes: &[u8]) -> Result<Envelope, InputRefusal> {
    let mut value: Value = serde_json::from_slice(bytes).map_err(|e| {
        InputRefusal::new(
            ReasonCode::InputMalformedJson,
            format!("the request body is not valid JSON: {e}"),
        )
    })?;
    let Some(obj) = value.as_object_mut() else {
        return Err(InputRefusal {
            violations: vec![violation("", "the body must be a JSON object")],
            ..InputRefusal::new(
                ReasonCode::InputSchemaInvalid,
                "the request body must be a JSON object",
            )
        });
    };
    let mut violations = Vec::new();
    for key in obj.keys() {
        if !matches!(key.as_str(), "action" | "context_id" | "payload") {
            violations.push(violation(
                &format!("/{}", key.replace('~', "~0").replace('/', "~1")),
                "unknown field; the body holds action, context_id and payload",
            ));
        }
    }
    let action = match obj.get("action") {
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => {
            violations.push(violation("/action", "must be a string"));
            None
        }
        None => {
            violations.push(violation("/action", "is required"));
            None
        }
    };
    let context = match obj.get("context_id") {
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => {
            violations.push(violation("/context_id", "must be a string"));
            None
        }
        None => {
            violations.push(violation("/context_id", "is required"));
            None
        }
    };
    let payload = match obj.remove("payload") {
        Some(p @ Value::Object(_)) => Some(p),
        Some(_) => {
            violations.push(violation("/payload", "must be a JSON object"));
            None
        }
        None => Some(Value::Object(serde_json::Map::new())),
    };
    let (Some(action), Some(context), Some(payload), true) =
        (action, context, payload, violations.is_empty())
    else {
        return Err(InputRefusal {
            violations,
            ..InputRefusal::new(
                ReasonCode::InputSchemaInvalid,
                "the request body does not match {action, context_id, payload}",
            )
        });
    };
    Ok(Envelope {
        action,
        context,
        payload,
    })
}

/// The policy's half of G3: the action exists and has an executor, the context exists, the payload
/// matches the action's schema.
pub fn admit(
    policy: &Policy,
    action: &str,
    context: &str,
    payload: Value,
) -> Result<ValidInput, InputRefusal> {
    let Some(action) = policy.action(action).cloned() else {
        return Err(InputRefusal {
            requested_action: Some(action.to_owned()),
            ..InputRefusal::new(
                ReasonCode::ActionUnknown,
                "the action is not defined in the policy",
            )
        });
    };
    if action.executor.is_none() {
        return Err(InputRefusal {
            requested_action: Some(action.name.to_string()),
            ..InputRefusal::new(
                ReasonCode::ActionUnknown,
                format!(
                    "{} is a permission for another route, not an action /process runs",
                    action.name
                ),
            )
        });
    }
    let context = match ContextId::parse(context) {
        Ok(c) if policy.has_context(c.as_str()) => c,
        _ => {
            return Err(InputRefusal {
                action: Some(action),
                ..InputRefusal::new(
                    ReasonCode::ContextUnknown,
                    "the context is not defined in the policy",
                )
            });
        }
    };
    if let Err(violations) = action.validate(&payload) {
        return Err(InputRefusal {
            message: format!(
                "the payload does not match the schema of {}: {}",
                action.name,
                violations
                    .iter()
                    .map(|v| v.pointer.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            violations,
            action: Some(action),
            reason: ReasonCode::InputSchemaInvalid,
            requested_action: None,
        });
    }
    Ok(ValidInput {
        action,
        context,
        payload,
    })
}
