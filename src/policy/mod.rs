//! Policies: roles (with inheritance), contexts, rate-limit tiers, actions (executor + input schema) and
//! allow/deny rules, loaded from `policies/*.toml` and identified by a revision hash over the loaded files.

mod matrix;
pub mod testcases;
mod tier;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use sha2::{Digest, Sha256};

pub use matrix::{EvalError, MatrixDecision, Principal};
pub use tier::Tier;
use tier::TierFile;

use crate::domain::{ActionName, ContextId, RoleName, TierName};

/// Why a policy could not be loaded; the message names the file and the offending item.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PolicyError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, PolicyError> {
    Err(PolicyError(msg.into()))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    default_tier: Option<TierName>,
    #[serde(default)]
    roles: BTreeMap<RoleName, RoleDef>,
    #[serde(default)]
    contexts: BTreeMap<ContextId, ContextDef>,
    #[serde(default)]
    tiers: BTreeMap<TierName, TierFile>,
    #[serde(default)]
    actions: BTreeMap<ActionName, ActionFile>,
    #[serde(default)]
    rules: Vec<RuleFile>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RoleDef {
    #[serde(default)]
    #[expect(
        dead_code,
        reason = "documentation for policy readers; parsed so unknown keys stay errors"
    )]
    description: String,
    #[serde(default)]
    inherits: Vec<RoleName>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ContextDef {
    #[serde(default)]
    #[expect(
        dead_code,
        reason = "documentation for policy readers; parsed so unknown keys stay errors"
    )]
    description: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ActionFile {
    #[serde(default)]
    description: String,
    /// The executor that runs the action; none for permission-only actions such as `audit.read`.
    executor: Option<String>,
    /// Path of a JSON Schema (draft 2020-12) for the payload, relative to the policies folder.
    input_schema: Option<PathBuf>,
    /// Exposed as a model of the OpenAI facade under the action's name (`GET /v1/models`,
    /// `POST /v1/chat/completions`); needs an executor.
    #[serde(default)]
    model: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Effect {
    Allow,
    Deny,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    id: String,
    effect: Effect,
    #[serde(default)]
    #[expect(
        dead_code,
        reason = "documentation for policy readers; parsed so unknown keys stay errors"
    )]
    description: String,
    roles: Vec<String>,
    contexts: Vec<String>,
    actions: Vec<String>,
    reason_code: Option<String>,
    #[serde(default)]
    when: Vec<matrix::Condition>,
}

/// A compiled action.
pub struct Action {
    pub name: ActionName,
    pub description: String,
    pub executor: Option<String>,
    schema: Option<jsonschema::Validator>,
    /// The payload's JSON Schema as written, for the OpenAPI document; `None` takes any object.
    pub input_schema: Option<serde_json::Value>,
    /// Exposed as a model of the OpenAI facade (`model = true`).
    pub model: bool,
}

/// One schema violation: where in the request it is and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct Violation {
    /// JSON pointer into the request body, e.g. `/payload/message`.
    pub pointer: String,
    pub message: String,
}

/// Most violations reported for one payload; a pathological payload must not produce a huge error body.
const MAX_VIOLATIONS: usize = 20;

impl Action {
    /// Validates `payload` against the action's schema; pointers are rooted at the request body.
    pub fn validate(&self, payload: &serde_json::Value) -> Result<(), Vec<Violation>> {
        let Some(schema) = &self.schema else {
            return Ok(());
        };
        let violations: Vec<Violation> = schema
            .iter_errors(payload)
            .take(MAX_VIOLATIONS)
            .map(|e| Violation {
                pointer: format!("/payload{}", e.instance_path()),
                message: e.to_string(),
            })
            .collect();
        if violations.is_empty() {
            Ok(())
        } else {
            Err(violations)
        }
    }
}

/// A loaded, validated policy. Immutable; a reload builds a new one.
pub struct Policy {
    /// SHA-256 (hex) over the loaded files' paths and bytes.
    pub revision: String,
    /// The loaded files, relative to the policies folder, in hashing order.
    pub files: Vec<String>,
    roles: BTreeMap<RoleName, RoleDef>,
    /// Each role with every role it inherits from, itself included.
    effective_roles: HashMap<RoleName, BTreeSet<RoleName>>,
    contexts: BTreeMap<ContextId, ContextDef>,
    tiers: BTreeMap<TierName, Tier>,
    default_tier: TierName,
    actions: BTreeMap<ActionName, Arc<Action>>,
    rules: Vec<matrix::Rule>,
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policy")
            .field("revision", &self.revision)
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl Policy {
    /// Loads every `*.toml` in `dir` (not recursing into `tests/` or `schemas/`). `executor_exists`
    /// says whether an executor name is registered, so an action naming a missing one fails here.
    pub fn load(dir: &Path, executor_exists: impl Fn(&str) -> bool) -> Result<Self, PolicyError> {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| PolicyError(format!("reading policies folder {}: {e}", dir.display())))?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "toml"))
            .collect();
        paths.sort();
        if paths.is_empty() {
            return err(format!("no *.toml policy file in {}", dir.display()));
        }
        let mut hashed: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        let mut merged = PolicyFile::default();
        for path in &paths {
            let bytes = std::fs::read(path)
                .map_err(|e| PolicyError(format!("reading {}: {e}", path.display())))?;
            let text = std::str::from_utf8(&bytes)
                .map_err(|_| PolicyError(format!("{} is not UTF-8", path.display())))?;
            let file: PolicyFile = toml::from_str(text)
                .map_err(|e| PolicyError(format!("{}: {e}", path.display())))?;
            merge(&mut merged, file, path)?;
            hashed.insert(relative(dir, path), bytes);
        }
        Self::build(dir, merged, hashed, executor_exists)
    }

    fn build(
        dir: &Path,
        file: PolicyFile,
        mut hashed: BTreeMap<String, Vec<u8>>,
        executor_exists: impl Fn(&str) -> bool,
    ) -> Result<Self, PolicyError> {
        let effective_roles = resolve_roles(&file.roles)?;
        let tiers = file
            .tiers
            .iter()
            .map(|(name, raw)| Ok((name.clone(), Tier::parse(name, raw)?)))
            .collect::<Result<BTreeMap<_, _>, PolicyError>>()?;
        let default_tier = file
            .default_tier
            .unwrap_or_else(|| TierName::parse("standard").unwrap_or_else(|_| unreachable!()));
        if !tiers.contains_key(&default_tier) {
            return err(format!("default_tier {default_tier} is not a defined tier"));
        }
        let mut actions = BTreeMap::new();
        for (name, def) in file.actions {
            if let Some(executor) = &def.executor
                && !executor_exists(executor)
            {
                return err(format!(
                    "action {name} names executor {executor:?}, which is not defined in the executors folder"
                ));
            }
            if def.model && def.executor.is_none() {
                return err(format!(
                    "action {name} is exposed as a model but has no executor to run it"
                ));
            }
            let schema = match &def.input_schema {
                Some(rel) => {
                    let path = dir.join(rel);
                    let bytes = std::fs::read(&path).map_err(|e| {
                        PolicyError(format!(
                            "action {name}: reading schema {}: {e}",
                            path.display()
                        ))
                    })?;
                    let value: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| {
                        PolicyError(format!(
                            "action {name}: schema {} is not JSON: {e}",
                            path.display()
                        ))
                    })?;
                    // Formats are asserted, not only annotated: a payload the schema calls a `date`
                    // must be one before an executor sends it upstream, and the OpenAPI document
                    // promises clients exactly what this validator checks.
                    let validator = jsonschema::draft202012::options()
                        .should_validate_formats(true)
                        .build(&value)
                        .map_err(|e| {
                            PolicyError(format!(
                                "action {name}: schema {} is invalid: {e}",
                                path.display()
                            ))
                        })?;
                    hashed.insert(relative(dir, &path), bytes);
                    Some((validator, value))
                }
                None => None,
            };
            let (schema, input_schema) = schema.unzip();
            let action = Action {
                name: name.clone(),
                description: def.description,
                executor: def.executor,
                schema,
                input_schema,
                model: def.model,
            };
            actions.insert(name, Arc::new(action));
        }
        let known = matrix::Names {
            roles: file.roles.keys().map(|r| r.as_str()).collect(),
            contexts: file.contexts.keys().map(|c| c.as_str()).collect(),
            actions: actions.keys().map(|a| a.as_str()).collect(),
        };
        let mut seen_ids = BTreeSet::new();
        let mut rules = Vec::with_capacity(file.rules.len());
        for rule in file.rules {
            if !seen_ids.insert(rule.id.clone()) {
                return err(format!("rule id {:?} is used twice", rule.id));
            }
            rules.push(matrix::Rule::compile(rule, &known)?);
        }
        let mut digest = Sha256::new();
        for (path, bytes) in &hashed {
            // Path, NUL, length, bytes: unambiguous, so moving text between files changes the revision.
            digest.update(path.as_bytes());
            digest.update([0]);
            digest.update((bytes.len() as u64).to_be_bytes());
            digest.update(bytes);
        }
        Ok(Self {
            revision: hex::encode(digest.finalize()),
            files: hashed.into_keys().collect(),
            roles: file.roles,
            effective_roles,
            contexts: file.contexts,
            tiers,
            default_tier,
            actions,
            rules,
        })
    }

    pub fn action(&self, name: &str) -> Option<&Arc<Action>> {
        ActionName::parse(name)
            .ok()
            .and_then(|n| self.actions.get(&n))
    }

    pub fn actions(&self) -> impl Iterator<Item = &Arc<Action>> {
        self.actions.values()
    }

    pub fn has_context(&self, name: &str) -> bool {
        ContextId::parse(name).is_ok_and(|c| self.contexts.contains_key(&c))
    }

    pub fn has_role(&self, name: &RoleName) -> bool {
        self.roles.contains_key(name)
    }

    pub fn roles(&self) -> impl Iterator<Item = &RoleName> {
        self.roles.keys()
    }

    pub fn contexts(&self) -> impl Iterator<Item = &ContextId> {
        self.contexts.keys()
    }

    /// The tier's definition; a key whose tier was removed from the policy falls back to the default
    /// tier rather than to no limit at all.
    pub fn tier(&self, name: &TierName) -> (&TierName, &Tier) {
        match self.tiers.get_key_value(name) {
            Some(found) => found,
            None => self
                .tiers
                .get_key_value(&self.default_tier)
                .unwrap_or_else(|| unreachable!("default tier checked at load")),
        }
    }

    pub fn tiers(&self) -> impl Iterator<Item = (&TierName, &Tier)> {
        self.tiers.iter()
    }

    pub fn has_tier(&self, name: &TierName) -> bool {
        self.tiers.contains_key(name)
    }

    /// Whether a key of role `holder` may grant role `granted` in `contexts` (`None`: every context)
    /// without granting more than it holds (see [`matrix::role_within`]); the reason when it may not.
    pub fn role_within(
        &self,
        granted: &RoleName,
        holder: &RoleName,
        contexts: Option<&BTreeSet<ContextId>>,
    ) -> Result<(), String> {
        match contexts {
            Some(c) => matrix::role_within(self, granted, holder, c),
            None => matrix::role_within(self, granted, holder, self.contexts.keys()),
        }
    }

    /// G4: the action matrix. Default deny, deny overrides allow, any evaluation error denies.
    pub fn evaluate(
        &self,
        principal: &Principal,
        context: &ContextId,
        action: &ActionName,
        payload: &serde_json::Value,
    ) -> MatrixDecision {
        matrix::evaluate(self, principal, context, action, payload)
    }
}

fn relative(dir: &Path, path: &Path) -> String {
    path.strip_prefix(dir)
        .unwrap_or(path)
        .to_string_lossy()
        .replace('\\', "/")
}

fn merge(into: &mut PolicyFile, file: PolicyFile, path: &Path) -> Result<(), PolicyError> {
    fn merge_map<K: Ord + std::fmt::Display, V>(
        into: &mut BTreeMap<K, V>,
        from: BTreeMap<K, V>,
        what: &str,
        path: &Path,
    ) -> Result<(), PolicyError> {
        for (k, v) in from {
            if into.contains_key(&k) {
                return err(format!("{}: {what} {k} is defined twice", path.display()));
            }
            into.insert(k, v);
        }
        Ok(())
    }
    if let Some(tier) = file.default_tier {
        if into.default_tier.is_some() {
            return err(format!("{}: default_tier is set twice", path.display()));
        }
        into.default_tier = Some(tier);
    }
    merge_map(&mut into.roles, file.roles, "role", path)?;
    merge_map(&mut into.contexts, file.contexts, "context", path)?;
    merge_map(&mut into.tiers, file.tiers, "tier", path)?;
    merge_map(&mut into.actions, file.actions, "action", path)?;
    into.rules.extend(file.rules);
    Ok(())
}

/// Expands inheritance; an unknown parent or a cycle is a load error naming the role.
fn resolve_roles(
    roles: &BTreeMap<RoleName, RoleDef>,
) -> Result<HashMap<RoleName, BTreeSet<RoleName>>, PolicyError> {
    fn visit(
        role: &RoleName,
        roles: &BTreeMap<RoleName, RoleDef>,
        path: &mut Vec<RoleName>,
        out: &mut BTreeSet<RoleName>,
    ) -> Result<(), PolicyError> {
        if path.contains(role) {
            let cycle: Vec<&str> = path.iter().map(|r| r.as_str()).collect();
            return err(format!(
                "role inheritance cycle: {} -> {role}",
                cycle.join(" -> ")
            ));
        }
        let Some(def) = roles.get(role) else {
            let from = path.last().map_or("?", |r| r.as_str());
            return err(format!("role {from} inherits unknown role {role}"));
        };
        out.insert(role.clone());
        path.push(role.clone());
        for parent in &def.inherits {
            visit(parent, roles, path, out)?;
        }
        path.pop();
        Ok(())
    }
    let mut effective = HashMap::new();
    for role in roles.keys() {
        let mut set = BTreeSet::new();
        visit(role, roles, &mut Vec::new(), &mut set)?;
        effective.insert(role.clone(), set);
    }
    Ok(effective)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) {
        std::fs::write(dir.join(name), text).unwrap();
    }

    const BASE: &str = r#"
[roles.analyst]
[roles.admin]
inherits = ["analyst"]
[contexts.work]
[tiers.standard]
per_second = 1
burst = 1
[actions.echo]
executor = "echo"
"#;

    #[test]
    fn loads_and_hashes_the_files() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a.toml", BASE);
        let p = Policy::load(dir.path(), |e| e == "echo").unwrap();
        assert_eq!(p.revision.len(), 64);
        assert_eq!(p.files, vec!["a.toml"]);
        write(dir.path(), "a.toml", &format!("{BASE}\n# comment\n"));
        let q = Policy::load(dir.path(), |e| e == "echo").unwrap();
        assert_ne!(
            p.revision, q.revision,
            "any byte change makes a new revision"
        );
    }

    #[test]
    fn an_action_naming_a_missing_executor_fails_to_load_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a.toml", BASE);
        let e = Policy::load(dir.path(), |_| false).unwrap_err();
        assert!(
            e.0.contains("action echo") && e.0.contains("\"echo\""),
            "{e}"
        );
    }

    #[test]
    fn inheritance_cycles_and_unknown_parents_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "a.toml",
            "[tiers.standard]\nunlimited = true\n[roles.clerk]\ninherits=[\"chief\"]\n[roles.chief]\ninherits=[\"clerk\"]\n",
        );
        let e = Policy::load(dir.path(), |_| true).unwrap_err();
        assert!(
            e.0.contains("cycle") && e.0.contains("clerk") && e.0.contains("chief"),
            "{e}"
        );
        write(
            dir.path(),
            "a.toml",
            "[tiers.standard]\nunlimited = true\n[roles.clerk]\ninherits=[\"ghost\"]\n",
        );
        let e = Policy::load(dir.path(), |_| true).unwrap_err();
        assert!(e.0.contains("ghost") && e.0.contains("clerk"), "{e}");
    }

    #[test]
    fn rules_naming_undefined_things_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "a.toml",
            &format!(
                "{BASE}\n[[rules]]\nid=\"r\"\neffect=\"allow\"\nroles=[\"analyst\"]\ncontexts=[\"wrok\"]\nactions=[\"echo\"]\n"
            ),
        );
        let e = Policy::load(dir.path(), |_| true).unwrap_err();
        assert!(e.0.contains("wrok"), "{e}");
    }

    #[test]
    fn a_duplicate_definition_across_files_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a.toml", BASE);
        write(dir.path(), "b.toml", "[contexts.work]\n");
        let e = Policy::load(dir.path(), |_| true).unwrap_err();
        assert!(e.0.contains("b.toml") && e.0.contains("work"), "{e}");
    }

    #[test]
    fn schema_violations_point_into_the_request_body() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "s.json",
            r#"{"type":"object","properties":{"message":{"type":"string"}},"required":["message"]}"#,
        );
        write(
            dir.path(),
            "a.toml",
            &BASE.replace(
                "executor = \"echo\"",
                "executor = \"echo\"\ninput_schema = \"s.json\"",
            ),
        );
        let p = Policy::load(dir.path(), |_| true).unwrap();
        let action = p.action("echo").unwrap();
        assert!(
            action
                .validate(&serde_json::json!({"message": "hi"}))
                .is_ok()
        );
        let v = action
            .validate(&serde_json::json!({"message": 42}))
            .unwrap_err();
        assert_eq!(v[0].pointer, "/payload/message");
        assert!(
            p.files.contains(&"s.json".to_owned()),
            "schemas are part of the revision"
        );
    }

    #[test]
    fn remote_schema_references_are_not_fetched() {
        // A loopback listener stands in for the remote host: a fetch, even a failing one, would have
        // to connect to it first.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let reference = format!("http://{}/schema.json", listener.local_addr().unwrap());
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "remote.json",
            &format!(r#"{{"type":"object","properties":{{"a":{{"$ref":"{reference}"}}}}}}"#),
        );
        write(
            dir.path(),
            "a.toml",
            &BASE.replace(
                "executor = \"echo\"",
                "executor = \"echo\"\ninput_schema = \"remote.json\"",
            ),
        );

        let result = Policy::load(dir.path(), |_| true);

        let Err(e) = result else {
            panic!("a schema with a remote $ref loaded");
        };
        assert!(
            e.0.contains("remote.json") || e.0.contains(&reference),
            "the refusal names neither the schema file nor the reference: {e}"
        );
        match listener.accept() {
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(err) => panic!("the listener failed: {err}"),
            Ok((_, from)) => panic!("loading the policy connected to {reference} (from {from})"),
        }
    }

    #[test]
    fn an_unknown_key_in_a_policy_file_is_an_error_naming_the_file_and_the_key() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a.toml", BASE);
        write(
            dir.path(),
            "b.toml",
            "[contexts.home]\ndescripton = \"typo\"\n",
        );
        let e = Policy::load(dir.path(), |_| true).unwrap_err();
        assert!(e.0.contains("b.toml"), "{e}");
        assert!(e.0.contains("descripton"), "{e}");
    }
}
