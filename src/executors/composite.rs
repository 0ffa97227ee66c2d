//! The `composite` kind: ordered steps, each naming an action that is re-authorized through the
//! action matrix for the same principal and context and audited as STEP_EXECUTED. A step's payload is
//! built from constants and JSON pointers into the composite's input (`/input/...`), earlier steps'
//! outputs (`/steps/<name>/...`) and, for a `for_each` step, the current element (`/item/...`).
//! `mode = "fail_fast"` stops at the first failed step; `"continue"` runs the rest and returns a
//! partial result naming the failed steps.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::{Executor, ExecutorCall, ExecutorError, ExecutorSpec, StepError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Mode {
    FailFast,
    Continue,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    mode: Mode,
    steps: Vec<Step>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Step {
    name: String,
    action: String,
    /// Constant fields of the step's payload.
    #[serde(default)]
    payload: toml::Table,
    /// Target field (JSON pointer in the step's payload) <- source JSON pointer.
    #[serde(default)]
    from: BTreeMap<String, String>,
    /// Run once per element of the array at this pointer.
    for_each: Option<String>,
    /// Most elements a `for_each` step runs for; a pointer in `max_items_from` may lower it.
    #[serde(default = "default_max_items")]
    max_items: usize,
    max_items_from: Option<String>,
}

/// A `for_each` step runs at most this many times unless the file says otherwise: each run may be an
/// LLM call, and a digest should stay a digest.
fn default_max_items() -> usize {
    10
}

struct Composite {
    settings: Settings,
}

pub(super) fn build(spec: &ExecutorSpec<'_>) -> Result<Arc<dyn Executor>, String> {
    let settings: Settings = spec
        .settings
        .clone()
        .try_into()
        .map_err(|e: toml::de::Error| format!("composite settings: {}", e.message()))?;
    if settings.steps.is_empty() {
        return Err("a composite needs at least one step".into());
    }
    let mut names = std::collections::BTreeSet::new();
    for step in &settings.steps {
        if !names.insert(step.name.as_str()) {
            return Err(format!("step name {:?} is used twice", step.name));
        }
        for pointer in step.from.keys().chain(step.from.values()) {
            if !pointer.starts_with('/') {
                return Err(format!(
                    "step {}: {pointer:?} is not a JSON pointer",
                    step.name
                ));
            }
        }
    }
    Ok(Arc::new(Composite { settings }))
}

/// Sets `value` at `pointer` inside `target`, creating objects on the way.
fn set_pointer(target: &mut Value, pointer: &str, value: Value) {
    let mut here = target;
    let parts: Vec<String> = pointer
        .split('/')
        .skip(1)
        .map(|p| p.replace("~1", "/").replace("~0", "~"))
        .collect();
    for (i, part) in parts.iter().enumerate() {
        if !here.is_object() {
            *here = Value::Object(Map::new());
        }
        let Value::Object(map) = here else { return };
        if i + 1 == parts.len() {
            map.insert(part.clone(), value);
            return;
        }
        here = map
            .entry(part.clone())
            .or_insert_with(|| Value::Object(Map::new()));
    }
}

fn step_payload(step: &Step, scope: &Value) -> Value {
    let mut payload = serde_json::to_value(&step.payload).unwrap_or_else(|_| json!({}));
    for (target, source) in &step.from {
        // A missing source leaves the field out; the step's schema then says what is missing.
        if let Some(v) = scope.pointer(source) {
            set_pointer(&mut payload, target, v.clone());
        }
    }
    payload
}

fn step_status(e: &StepError) -> &'static str {
    match e {
        StepError::Refused { .. } => "refused",
        StepError::Failed { .. } => "failed",
        StepError::Unaudited { .. } => "unaudited",
    }
}

#[async_trait]
impl Executor for Composite {
    #[tracing::instrument(skip_all, fields(action = %call.action, trace_id = %call.trace_id))]
    async fn execute(&self, call: ExecutorCall) -> Result<Value, ExecutorError> {
        let Some(runner) = call.steps.clone() else {
            return Err(ExecutorError::Failed(
                "a composite runs only inside the gateway, where steps can be authorized".into(),
            ));
        };
        let mut scope = json!({ "input": call.payload, "steps": {} });
        let mut report = Vec::new();
        let mut failed = Vec::new();
        let mut index = 0usize;
        'steps: for step in &self.settings.steps {
            let items: Option<Vec<Value>> = match &step.for_each {
                None => None,
                Some(pointer) => {
                    let limit = step
                        .max_items_from
                        .as_deref()
                        .and_then(|p| scope.pointer(p))
                        .and_then(super::whole_number)
                        .map_or(step.max_items, |n| (n as usize).min(step.max_items));
                    Some(
                        scope
                            .pointer(pointer)
                            .and_then(Value::as_array)
                            .map(|a| a.iter().take(limit).cloned().collect())
                            .unwrap_or_default(),
                    )
                }
            };
            let runs: Vec<Option<Value>> = match items {
                None => vec![None],
                Some(list) => list.into_iter().map(Some).collect(),
            };
            let each = step.for_each.is_some();
            let mut outputs = Vec::new();
            for item in runs {
                index += 1;
                let mut local = scope.clone();
                if let Some(item) = item {
                    local["item"] = item;
                }
                let payload = step_payload(step, &local);
                match runner.run_step(index, &step.action, payload).await {
                    Ok(out) => {
                        report.push(json!({"step": index, "name": step.name, "action": step.action, "status": "success"}));
                        outputs.push(out);
                    }
                    Err(e) => {
                        report.push(json!({
                            "step": index, "name": step.name, "action": step.action,
                            "status": step_status(&e), "error": e.to_string(),
                        }));
                        if !failed.contains(&step.name) {
                            failed.push(step.name.clone());
                        }
                        if matches!(e, StepError::Unaudited { .. }) {
                            return Err(ExecutorError::Failed(e.to_string()));
                        }
                        if self.settings.mode == Mode::FailFast {
                            break 'steps;
                        }
                    }
                }
            }
            let output = if each {
                Value::Array(outputs)
            } else {
                outputs.pop().unwrap_or(Value::Null)
            };
            scope["steps"][step.name.as_str()] = output;
        }
        Ok(json!({
            "complete": failed.is_empty(),
            "failed_steps": failed,
            "steps": report,
            "outputs": scope["steps"],
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_are_built_from_constants_and_pointers() {
        let step: Step = toml::from_str(
            r#"
name = "s"
action = "a"
payload = { source = "pncp" }
from = { "/text" = "/item/objeto", "/nested/uf" = "/input/uf", "/absent" = "/input/nothing" }
"#,
        )
        .unwrap();
        let scope = json!({"input": {"uf": "SP"}, "item": {"objeto": "Pregão"}});
        assert_eq!(
            step_payload(&step, &scope),
            json!({"source": "pncp", "text": "Pregão", "nested": {"uf": "SP"}})
        );
    }
}
