//! G4: the action matrix. For one context (`/process`, composite steps) it is [`Policy::evaluate`];
//! this file adds the choice for permission-only actions on other routes (such as `audit.read`), which
//! may be allowed in any context the key may use.

use serde_json::Value;

use crate::domain::{ActionName, ContextId};
use crate::policy::{MatrixDecision, Policy, Principal};
use crate::reason::ReasonCode;

/// The first context (in policy order) where the matrix allows `action` with an empty payload, and that
/// verdict; else no context and the most telling refusal (a rule's refusal over the key's own
/// context list, which would otherwise hide it).
pub fn decide_any_context(
    policy: &Policy,
    principal: &Principal,
    action: &ActionName,
) -> (Option<ContextId>, MatrixDecision) {
    let empty = Value::Object(serde_json::Map::new());
    let mut refusal: Option<MatrixDecision> = None;
    for context in policy.contexts() {
        let verdict = policy.evaluate(principal, context, action, &empty);
        if verdict.allowed {
            return (Some(context.clone()), verdict);
        }
        let key_contexts_only = verdict.reason_codes.first() == Some(&ReasonCode::ContextForbidden);
        if refusal.is_none() || !key_contexts_only {
            refusal = Some(verdict);
        }
    }
    let refusal = refusal.unwrap_or_else(|| MatrixDecision {
        allowed: false,
        reason_codes: vec![ReasonCode::NoMatchingRule],
        determining_rules: vec![],
    });
    (None, refusal)
}
