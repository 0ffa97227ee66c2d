//! The action matrix (G4): rules over (role, context, action, payload conditions).
//! Default deny, deny overrides allow, any evaluation error denies; the decision names its rules.

use std::collections::BTreeSet;

use serde::Deserialize;
use serde_json::Value;

use super::{Effect, Policy, PolicyError, RuleFile};
use crate::domain::{ActionName, ContextId, RoleName};
use crate::reason::ReasonCode;

/// Who is asking: what the key grants, as the matrix sees it.
#[derive(Debug, Clone)]
pub struct Principal {
    pub role: RoleName,
    /// Contexts the key may act in; `None` means every context the policy defines.
    pub contexts: Option<BTreeSet<ContextId>>,
}

/// The matrix's verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MatrixDecision {
    pub allowed: bool,
    pub reason_codes: Vec<ReasonCode>,
    /// Ids of the rules that decided: the matching deny rules, else the matching allow rules.
    pub determining_rules: Vec<String>,
}

/// A rule could not be evaluated; the request is denied with `POLICY_EVAL_ERROR`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("rule {rule}: {message}")]
pub struct EvalError {
    pub rule: String,
    pub message: String,
}

/// Pseudo-rule id for a refusal that comes from the key's own context list, not from a policy rule.
pub const KEY_CONTEXTS_RULE: &str = "key.contexts";

pub(super) struct Names<'a> {
    pub roles: BTreeSet<&'a str>,
    pub contexts: BTreeSet<&'a str>,
    pub actions: BTreeSet<&'a str>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Pattern {
    Any,
    Exact(String),
    /// `licitacoes.*` matches every action starting with `licitacoes.`.
    Prefix(String),
}

impl Pattern {
    fn compile(
        raw: &str,
        kind: &str,
        known: &BTreeSet<&str>,
        rule: &str,
    ) -> Result<Self, PolicyError> {
        if raw == "*" {
            return Ok(Self::Any);
        }
        if let Some(prefix) = raw.strip_suffix('*') {
            if prefix.is_empty()
                || prefix.contains('*')
                || !known.iter().any(|k| k.starts_with(prefix))
            {
                return Err(PolicyError(format!(
                    "rule {rule}: {kind} pattern {raw:?} matches no defined {kind}"
                )));
            }
            return Ok(Self::Prefix(prefix.to_owned()));
        }
        if !known.contains(raw) {
            return Err(PolicyError(format!(
                "rule {rule}: {kind} {raw:?} is not defined in the policy"
            )));
        }
        Ok(Self::Exact(raw.to_owned()))
    }

    fn matches(&self, value: &str) -> bool {
        match self {
            Self::Any => true,
            Self::Exact(s) => s == value,
            Self::Prefix(p) => value.starts_with(p.as_str()),
        }
    }
}

/// A condition on the payload. Exactly one operator is set. A missing field makes the condition
/// false (the rule does not apply); a field of the wrong type is an evaluation error.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Condition {
    pointer: String,
    equals: Option<Value>,
    one_of: Option<Vec<Value>>,
    /// Holds when the string (characters) or array is at most this long.
    max_length: Option<usize>,
    /// Holds when the string (characters) or array is at least this long.
    min_length: Option<usize>,
    /// Holds when the number is at most this.
    max: Option<f64>,
    /// Holds when the number is at least this.
    min: Option<f64>,
}

impl Condition {
    fn check(&self, rule: &str) -> Result<(), PolicyError> {
        let ops = [
            self.equals.is_some(),
            self.one_of.is_some(),
            self.max_length.is_some(),
            self.min_length.is_some(),
            self.max.is_some(),
            self.min.is_some(),
        ];
        if ops.iter().filter(|set| **set).count() != 1 {
            return Err(PolicyError(format!(
                "rule {rule}: each `when` condition needs exactly one of equals, one_of, max_length, min_length, max, min"
            )));
        }
        if !(self.pointer.is_empty() || self.pointer.starts_with('/')) {
            return Err(PolicyError(format!(
                "rule {rule}: pointer {:?} is not a JSON pointer",
                self.pointer
            )));
        }
        Ok(())
    }

    fn holds(&self, payload: &Value) -> Result<bool, String> {
        let Some(value) = payload.pointer(&self.pointer) else {
            return Ok(false);
        };
        if let Some(expected) = &self.equals {
            return Ok(value == expected);
        }
        if let Some(options) = &self.one_of {
            return Ok(options.contains(value));
        }
        if let Some(limit) = self.max_length.or(self.min_length) {
            let len = match value {
                Value::String(s) => s.chars().count(),
                Value::Array(a) => a.len(),
                other => {
                    return Err(format!(
                        "a length condition needs a string or array at {}, found {}",
                        self.pointer,
                        type_name(other)
                    ));
                }
            };
            return Ok(if self.max_length.is_some() {
                len <= limit
            } else {
                len >= limit
            });
        }
        if let Some(limit) = self.max.or(self.min) {
            let Some(n) = value.as_f64() else {
                return Err(format!(
                    "a numeric condition needs a number at {}, found {}",
                    self.pointer,
                    type_name(value)
                ));
            };
            return Ok(if self.max.is_some() {
                n <= limit
            } else {
                n >= limit
            });
        }
        Err("condition without operator".to_owned())
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// A compiled rule.
#[derive(Debug)]
pub(super) struct Rule {
    id: String,
    effect: Effect,
    roles: Vec<Pattern>,
    contexts: Vec<Pattern>,
    actions: Vec<Pattern>,
    /// What a matching deny rule refuses with (`ACTION_FORBIDDEN` unless the rule names its own).
    reason_code: ReasonCode,
    when: Vec<Condition>,
}

fn is_reason_code(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
}

impl Rule {
    pub(super) fn compile(raw: RuleFile, known: &Names<'_>) -> Result<Self, PolicyError> {
        let id = raw.id;
        if crate::domain::ActionName::parse(&id).is_err() {
            return Err(PolicyError(format!(
                "rule id {id:?} must be a lowercase identifier"
            )));
        }
        let compile = |raws: &[String], kind: &str, names: &BTreeSet<&str>| {
            if raws.is_empty() {
                return Err(PolicyError(format!(
                    "rule {id}: {kind}s is empty; use [\"*\"] to mean every {kind}"
                )));
            }
            raws.iter()
                .map(|r| Pattern::compile(r, kind, names, &id))
                .collect::<Result<Vec<_>, _>>()
        };
        let roles = compile(&raw.roles, "role", &known.roles)?;
        let contexts = compile(&raw.contexts, "context", &known.contexts)?;
        let actions = compile(&raw.actions, "action", &known.actions)?;
        if let Some(code) = &raw.reason_code {
            if raw.effect == Effect::Allow {
                return Err(PolicyError(format!(
                    "rule {id}: reason_code only applies to deny rules"
                )));
            }
            if !is_reason_code(code) {
                return Err(PolicyError(format!(
                    "rule {id}: reason_code {code:?} must be UPPER_SNAKE_CASE"
                )));
            }
        }
        for c in &raw.when {
            c.check(&id)?;
        }
        Ok(Self {
            id,
            effect: raw.effect,
            roles,
            contexts,
            actions,
            reason_code: raw
                .reason_code
                .as_deref()
                .map_or(ReasonCode::ActionForbidden, ReasonCode::for_rule),
            when: raw.when,
        })
    }

    /// Whether the rule names one of `roles`, `context` and `action` (its conditions aside).
    fn scope_holds(
        &self,
        roles: &BTreeSet<RoleName>,
        context: &ContextId,
        action: &ActionName,
    ) -> bool {
        roles
            .iter()
            .any(|r| self.roles.iter().any(|p| p.matches(r.as_str())))
            && self.contexts.iter().any(|p| p.matches(context.as_str()))
            && self.actions.iter().any(|p| p.matches(action.as_str()))
    }

    /// Whether the rule applies; `Err` when one of its conditions cannot be evaluated.
    fn applies(
        &self,
        roles: &BTreeSet<RoleName>,
        context: &ContextId,
        action: &ActionName,
        payload: &Value,
    ) -> Result<bool, EvalError> {
        if !self.scope_holds(roles, context, action) {
            return Ok(false);
        }
        for condition in &self.when {
            let holds = condition.holds(payload).map_err(|message| EvalError {
                rule: self.id.clone(),
                message,
            })?;
            if !holds {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

fn deny(reason: ReasonCode, rules: Vec<String>) -> MatrixDecision {
    MatrixDecision {
        allowed: false,
        reason_codes: vec![reason],
        determining_rules: rules,
    }
}

/// Whether a key of role `holder` may hand out a key of role `granted` in `contexts` without handing
/// out more than it holds (the caller compares the keys' own contexts, tier and expiry). For every
/// action and every context in `contexts`, wherever an allow rule could let `granted` act (whatever
/// its conditions), `holder` is allowed too: by that same rule, or by one without conditions; and every
/// deny rule that binds `holder` there binds `granted` as well, so `granted` escapes no refusal
/// `holder` meets. On refusal, says where `granted` would exceed `holder`.
pub(super) fn role_within<'a>(
    policy: &Policy,
    granted: &RoleName,
    holder: &RoleName,
    contexts: impl IntoIterator<Item = &'a ContextId>,
) -> Result<(), String> {
    let (Some(granted_roles), Some(holder_roles)) = (
        policy.effective_roles.get(granted),
        policy.effective_roles.get(holder),
    ) else {
        return Err(format!(
            "role {granted} or {holder} is not defined in the policy"
        ));
    };
    let contexts: Vec<&ContextId> = contexts.into_iter().collect();
    for action in policy.actions.keys() {
        for &context in &contexts {
            let granted_allows: Vec<&Rule> = policy
                .rules
                .iter()
                .filter(|r| {
                    r.effect == Effect::Allow && r.scope_holds(granted_roles, context, action)
                })
                .collect();
            if granted_allows.is_empty() {
                continue;
            }
            let holder_always = policy.rules.iter().any(|r| {
                r.effect == Effect::Allow
                    && r.when.is_empty()
                    && r.scope_holds(holder_roles, context, action)
            });
            if !holder_always
                && let Some(r) = granted_allows
                    .iter()
                    .find(|r| !r.scope_holds(holder_roles, context, action))
            {
                return Err(format!(
                    "rule {} allows role {granted} {action} in {context}, which role {holder} may not always do",
                    r.id
                ));
            }
            if let Some(d) = policy.rules.iter().find(|r| {
                r.effect == Effect::Deny
                    && r.scope_holds(holder_roles, context, action)
                    && !r.scope_holds(granted_roles, context, action)
            }) {
                return Err(format!(
                    "deny rule {} refuses role {holder} {action} in {context} but not role {granted}",
                    d.id
                ));
            }
        }
    }
    Ok(())
}

pub(super) fn evaluate(
    policy: &Policy,
    principal: &Principal,
    context: &ContextId,
    action: &ActionName,
    payload: &Value,
) -> MatrixDecision {
    let Some(roles) = policy.effective_roles.get(&principal.role) else {
        // The key's role was removed from the policy after the key was made: cannot evaluate, deny.
        return deny(ReasonCode::PolicyEvalError, vec![]);
    };
    if let Some(allowed) = &principal.contexts
        && !allowed.contains(context)
    {
        return deny(
            ReasonCode::ContextForbidden,
            vec![KEY_CONTEXTS_RULE.to_owned()],
        );
    }
    let mut denies: Vec<&Rule> = Vec::new();
    let mut allows: Vec<&Rule> = Vec::new();
    for rule in &policy.rules {
        match rule.applies(roles, context, action, payload) {
            Ok(true) if rule.effect == Effect::Deny => denies.push(rule),
            Ok(true) => allows.push(rule),
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(error = %e, "policy evaluation error");
                return deny(ReasonCode::PolicyEvalError, vec![e.rule]);
            }
        }
    }
    if !denies.is_empty() {
        let mut codes: Vec<ReasonCode> = Vec::new();
        for rule in &denies {
            if !codes.contains(&rule.reason_code) {
                codes.push(rule.reason_code.clone());
            }
        }
        return MatrixDecision {
            allowed: false,
            reason_codes: codes,
            determining_rules: denies.iter().map(|r| r.id.clone()).collect(),
        };
    }
    if !allows.is_empty() {
        return MatrixDecision {
            allowed: true,
            reason_codes: vec![],
            determining_rules: allows.iter().map(|r| r.id.clone()).collect(),
        };
    }
    deny(ReasonCode::NoMatchingRule, vec![])
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn policy(rules: &str) -> Policy {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("p.toml"),
            format!(
                r#"
[roles.analyst]
[roles.admin]
inherits = ["analyst"]
[contexts.work]
[contexts.partner]
[tiers.standard]
unlimited = true
[actions.echo]
executor = "echo"
[actions."lic.collect"]
executor = "echo"
[actions."lic.summarize"]
executor = "echo"
{rules}"#
            ),
        )
        .unwrap();
        Policy::load(dir.path(), |_| true).unwrap()
    }

    fn who(role: &str) -> Principal {
        Principal {
            role: RoleName::parse(role).unwrap(),
            contexts: None,
        }
    }

    fn eval(p: &Policy, role: &str, ctx: &str, action: &str, payload: Value) -> MatrixDecision {
        p.evaluate(
            &who(role),
            &ContextId::parse(ctx).unwrap(),
            &ActionName::parse(action).unwrap(),
            &payload,
        )
    }

    const RULES: &str = r#"
[[rules]]
id = "analysts-summarize"
effect = "allow"
roles = ["analyst"]
contexts = ["*"]
actions = ["lic.summarize", "echo"]

[[rules]]
id = "admins-collect"
effect = "allow"
roles = ["admin"]
contexts = ["work"]
actions = ["lic.*"]

[[rules]]
id = "partner-echo-only"
effect = "deny"
roles = ["*"]
contexts = ["partner"]
actions = ["lic.*"]
reason_code = "CONTEXT_FORBIDDEN"
"#;

    #[test]
    fn nothing_matching_is_denied_by_default() {
        let p = policy(RULES);
        let d = eval(&p, "analyst", "work", "lic.collect", json!({}));
        assert_eq!(d, deny(ReasonCode::NoMatchingRule, vec![]));
    }

    #[test]
    fn inherited_roles_gain_their_parents_rules() {
        let p = policy(RULES);
        let d = eval(&p, "admin", "work", "echo", json!({}));
        assert!(d.allowed);
        assert_eq!(d.determining_rules, vec!["analysts-summarize"]);
    }

    #[test]
    fn deny_overrides_allow_and_names_its_rule() {
        let p = policy(RULES);
        let d = eval(&p, "admin", "partner", "lic.summarize", json!({}));
        assert!(!d.allowed);
        assert_eq!(d.reason_codes, vec![ReasonCode::ContextForbidden]);
        assert_eq!(d.determining_rules, vec!["partner-echo-only"]);
        assert!(eval(&p, "admin", "partner", "echo", json!({})).allowed);
    }

    #[test]
    fn a_key_limited_to_some_contexts_is_refused_elsewhere() {
        let p = policy(RULES);
        let principal = Principal {
            role: RoleName::parse("admin").unwrap(),
            contexts: Some([ContextId::parse("partner").unwrap()].into()),
        };
        let d = p.evaluate(
            &principal,
            &ContextId::parse("work").unwrap(),
            &ActionName::parse("echo").unwrap(),
            &json!({}),
        );
        assert_eq!(d.reason_codes, vec![ReasonCode::ContextForbidden]);
        assert_eq!(d.determining_rules, vec![KEY_CONTEXTS_RULE]);
    }

    #[test]
    fn conditions_apply_and_a_type_error_denies_with_eval_error() {
        let p = policy(&format!(
            "{RULES}\n[[rules]]\nid = \"long-text\"\neffect = \"deny\"\nroles = [\"*\"]\ncontexts = [\"*\"]\nactions = [\"lic.summarize\"]\nreason_code = \"TEXT_TOO_LONG\"\n[[rules.when]]\npointer = \"/text\"\nmin_length = 4\n"
        ));
        let d = eval(
            &p,
            "analyst",
            "work",
            "lic.summarize",
            json!({"text": "abcdef"}),
        );
        assert_eq!(d.reason_codes, vec![ReasonCode::for_rule("TEXT_TOO_LONG")]);
        let d = eval(
            &p,
            "analyst",
            "work",
            "lic.summarize",
            json!({"text": "ab"}),
        );
        assert!(d.allowed);
        let d = eval(&p, "analyst", "work", "lic.summarize", json!({"text": 7}));
        assert_eq!(
            d,
            deny(ReasonCode::PolicyEvalError, vec!["long-text".to_owned()])
        );
    }

    #[test]
    fn an_unknown_role_cannot_be_evaluated_and_is_denied() {
        let p = policy(RULES);
        let d = eval(&p, "ghost", "work", "echo", json!({}));
        assert_eq!(d.reason_codes, vec![ReasonCode::PolicyEvalError]);
    }

    fn within(p: &Policy, granted: &str, holder: &str, contexts: &[&str]) -> Result<(), String> {
        let role = |r: &str| RoleName::parse(r).unwrap();
        let contexts: BTreeSet<ContextId> = contexts
            .iter()
            .map(|c| ContextId::parse(c).unwrap())
            .collect();
        p.role_within(&role(granted), &role(holder), Some(&contexts))
    }

    #[test]
    fn a_role_is_within_one_that_is_allowed_all_it_is_allowed() {
        let p = policy(
            r#"
[[rules]]
id = "all-echo"
effect = "allow"
roles = ["analyst"]
contexts = ["*"]
actions = ["echo"]
[[rules]]
id = "admins-collect"
effect = "allow"
roles = ["admin"]
contexts = ["work"]
actions = ["lic.*"]
"#,
        );
        // The same rule allows both (admin inherits analyst).
        assert_eq!(within(&p, "analyst", "admin", &["work", "partner"]), Ok(()));
        let up = within(&p, "admin", "analyst", &["work"]).unwrap_err();
        assert!(up.contains("admins-collect"), "{up}");
        // Where the stronger role's extra rule does not reach, it grants nothing more.
        assert_eq!(within(&p, "admin", "analyst", &["partner"]), Ok(()));
    }

    #[test]
    fn a_conditional_allow_covers_only_the_same_rule() {
        let p = policy(
            r#"
[roles.guest]
[[rules]]
id = "guests-echo-small"
effect = "allow"
roles = ["guest"]
contexts = ["work"]
actions = ["echo"]
[[rules.when]]
pointer = "/n"
max = 3
[[rules]]
id = "analysts-echo-big"
effect = "allow"
roles = ["analyst"]
contexts = ["work"]
actions = ["echo"]
[[rules.when]]
pointer = "/n"
min = 100
[[rules]]
id = "admins-echo"
effect = "allow"
roles = ["admin"]
contexts = ["work"]
actions = ["echo"]
"#,
        );
        let e = within(&p, "guest", "analyst", &["work"]).unwrap_err();
        assert!(e.contains("guests-echo-small"), "{e}");
        // An allow without conditions covers any condition.
        assert_eq!(within(&p, "guest", "admin", &["work"]), Ok(()));
    }

    #[test]
    fn a_deny_that_binds_the_holder_must_bind_what_it_grants() {
        let p = policy(
            r#"
[roles.guest]
[[rules]]
id = "everyone-echoes"
effect = "allow"
roles = ["*"]
contexts = ["*"]
actions = ["echo"]
[[rules]]
id = "no-echo-for-admins-at-partners"
effect = "deny"
roles = ["admin"]
contexts = ["partner"]
actions = ["echo"]
"#,
        );
        let e = within(&p, "guest", "admin", &["partner"]).unwrap_err();
        assert!(e.contains("no-echo-for-admins-at-partners"), "{e}");
        assert_eq!(within(&p, "guest", "admin", &["work"]), Ok(()));
        // A deny binding the granted role too is met by both.
        assert_eq!(within(&p, "analyst", "admin", &["work"]), Ok(()));
    }
}
