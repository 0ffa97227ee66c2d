//! The repository's example policy over arbitrary JSON payloads: G3's admission (action, context, JSON
//! Schema) and G4's action matrix for every action × context × principal never panic, and the matrix
//! decides the same way twice.

#![no_main]

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::LazyLock;

use catraca::domain::{ActionName, ContextId, RoleName};
use catraca::gates::input::admit;
use catraca::policy::{Policy, Principal};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

/// The example policy, loaded once; every executor name is taken as registered (the matrix and the
/// schemas do not depend on which executors exist).
static POLICY: LazyLock<Policy> = LazyLock::new(|| {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
    match Policy::load(&dir, |_| true) {
        Ok(policy) => policy,
        Err(e) => panic!("the example policy in {} does not load: {e}", dir.display()),
    }
});

/// Context names admission is asked about besides the policy's own: one well-formed but undefined, one
/// that is not a context name at all.
const OTHER_CONTEXTS: [&str; 2] = ["elsewhere", "Not A Context/../"];

/// The example policy's roles, and one it does not define (a key whose role was removed since).
const ROLES: [&str; 5] = ["analyst", "operator", "admin", "auditor", "removed-role"];

fn name<T, E: std::fmt::Display>(parsed: Result<T, E>, what: &str) -> T {
    match parsed {
        Ok(n) => n,
        Err(e) => panic!("{what}: {e}"),
    }
}

fn principals(policy: &Policy) -> Vec<Principal> {
    // A key limited to one context, so the matrix also refuses for the key's own context list.
    let one: BTreeSet<ContextId> = policy.contexts().take(1).cloned().collect();
    ROLES
        .iter()
        .flat_map(|role| {
            let role = name(RoleName::parse(role), "role");
            [
                Principal {
                    role: role.clone(),
                    contexts: None,
                },
                Principal {
                    role,
                    contexts: Some(one.clone()),
                },
            ]
        })
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let Ok(payload) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let policy = &*POLICY;
    let contexts: Vec<&ContextId> = policy.contexts().collect();

    // G3, the policy's half: every action (with an executor or not) in every context, known or not.
    for action in policy.actions() {
        let context_names = contexts
            .iter()
            .map(|c| c.as_str())
            .chain(OTHER_CONTEXTS.iter().copied());
        for context in context_names {
            let admitted = admit(policy, action.name.as_str(), context, payload.clone());
            if let Ok(input) = admitted {
                assert!(
                    action.executor.is_some(),
                    "admitted a permission-only action"
                );
                assert!(policy.has_context(input.context.as_str()));
                assert_eq!(input.payload, payload, "admission changed the payload");
                assert!(action.validate(&payload).is_ok());
            }
        }
    }
    let unknown = admit(policy, "no.such.action", "work", payload.clone());
    assert!(
        unknown.is_err(),
        "admitted an action the policy does not define"
    );

    // G4: the matrix for every action × context × principal, each decided twice.
    let principals = principals(policy);
    let actions: Vec<ActionName> = policy.actions().map(|a| a.name.clone()).collect();
    for action in &actions {
        for context in &contexts {
            for principal in &principals {
                let first = policy.evaluate(principal, context, action, &payload);
                let second = policy.evaluate(principal, context, action, &payload);
                assert_eq!(first, second, "the matrix decided twice differently");
                if first.allowed {
                    assert!(first.reason_codes.is_empty(), "an allow with reason codes");
                    assert!(
                        !first.determining_rules.is_empty(),
                        "an allow names no rule"
                    );
                } else {
                    assert!(
                        !first.reason_codes.is_empty(),
                        "a deny without a reason code"
                    );
                }
            }
        }
    }
});
