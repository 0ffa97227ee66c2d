//! `catraca policy test`: cases in `policies/tests/*.toml` run through the input and matrix gates
//! (G3 schema and G4) exactly as a request would, and compared with the expected effect and reasons.

use std::collections::BTreeSet;
use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use super::{Effect, Policy, PolicyError, Principal};
use crate::domain::{ActionName, ContextId, RoleName};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CaseFile {
    #[serde(default, rename = "case")]
    cases: Vec<Case>,
}

/// One expectation about the policy.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    pub name: String,
    role: RoleName,
    /// Contexts of the key; absent means every context.
    key_contexts: Option<Vec<ContextId>>,
    action: String,
    context: String,
    #[serde(default = "empty_object")]
    payload: Value,
    expect: Effect,
    /// When given, the decision's reason codes must equal these.
    reason_codes: Option<Vec<String>>,
    /// When given, the determining rules must equal these.
    rules: Option<Vec<String>>,
}

fn empty_object() -> Value {
    Value::Object(serde_json::Map::new())
}

/// The outcome of one case.
#[derive(Debug)]
pub struct CaseResult {
    pub file: String,
    pub name: String,
    /// `None` when the case passed, else what differed.
    pub failure: Option<String>,
}

/// What the gates decided for a case.
struct Outcome {
    effect: Effect,
    reason_codes: Vec<String>,
    rules: Vec<String>,
}

fn decide(policy: &Policy, case: &Case) -> Outcome {
    let refused = |code: &str| Outcome {
        effect: Effect::Deny,
        reason_codes: vec![code.to_owned()],
        rules: vec![],
    };
    let Some(action) = policy.action(&case.action) else {
        return refused("ACTION_UNKNOWN");
    };
    let Ok(context) = ContextId::parse(&case.context) else {
        return refused("CONTEXT_UNKNOWN");
    };
    if !policy.has_context(context.as_str()) {
        return refused("CONTEXT_UNKNOWN");
    }
    if action.validate(&case.payload).is_err() {
        return refused("INPUT_SCHEMA_INVALID");
    }
    let principal = Principal {
        role: case.role.clone(),
        contexts: case
            .key_contexts
            .as_ref()
            .map(|c| c.iter().cloned().collect::<BTreeSet<_>>()),
    };
    let name: &ActionName = &action.name;
    let d = policy.evaluate(&principal, &context, name, &case.payload);
    Outcome {
        effect: if d.allowed {
            Effect::Allow
        } else {
            Effect::Deny
        },
        reason_codes: d.reason_codes.iter().map(ToString::to_string).collect(),
        rules: d.determining_rules,
    }
}

/// Runs every case file in `dir`, in file-name order.
pub fn run(policy: &Policy, dir: &Path) -> Result<Vec<CaseResult>, PolicyError> {
    let mut paths: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| PolicyError(format!("reading {}: {e}", dir.display())))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    paths.sort();
    let mut results = Vec::new();
    for path in paths {
        let text = std::fs::read_to_string(&path)
            .map_err(|e| PolicyError(format!("reading {}: {e}", path.display())))?;
        let file: CaseFile =
            toml::from_str(&text).map_err(|e| PolicyError(format!("{}: {e}", path.display())))?;
        let file_name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        for case in file.cases {
            let got = decide(policy, &case);
            let mut problems = Vec::new();
            if got.effect != case.expect {
                problems.push(format!(
                    "expected {:?}, got {:?} ({})",
                    case.expect,
                    got.effect,
                    got.reason_codes.join(", ")
                ));
            }
            if let Some(codes) = &case.reason_codes
                && *codes != got.reason_codes
            {
                problems.push(format!(
                    "expected reason codes {codes:?}, got {:?}",
                    got.reason_codes
                ));
            }
            if let Some(rules) = &case.rules
                && *rules != got.rules
            {
                problems.push(format!("expected rules {rules:?}, got {:?}", got.rules));
            }
            results.push(CaseResult {
                file: file_name.clone(),
                name: case.name,
                failure: (!problems.is_empty()).then(|| problems.join("; ")),
            });
        }
    }
    Ok(results)
}
