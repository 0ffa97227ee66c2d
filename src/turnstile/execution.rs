//! Running an authorized action: its loaded executor, the digest the trail keeps of its result, and
//! the call counted in the metrics. Shared by `/process` and composite steps.

use std::time::Duration;

use serde_json::Value;

use crate::app::App;
use crate::audit::canonical_digest;
use crate::executors::{ExecutorDef, ExecutorError};
use crate::policy::Action;

/// The loaded executor of `action`, if it has one.
pub(super) fn executor_of<'a>(app: &'a App, action: &Action) -> Option<&'a ExecutorDef> {
    action
        .executor
        .as_deref()
        .and_then(|name| app.executors.get(name))
}

/// A result with the digest the trail keeps of it. A result without a canonical form cannot be recorded
/// faithfully, so it counts as the executor's failure.
pub(super) fn with_digest(result: Value) -> Result<(Value, Value), ExecutorError> {
    match canonical_digest(&result) {
        Ok(digest) => Ok((result, digest)),
        Err(e) => Err(ExecutorError::Failed(e.to_string())),
    }
}

/// Counts one executor call in the metrics; returns its status (`success`, `failed`, `timeout`).
pub(super) fn count_execution<T>(
    app: &App,
    executor: &str,
    outcome: &Result<T, ExecutorError>,
    elapsed: Duration,
) -> &'static str {
    let status = outcome
        .as_ref()
        .map_or_else(ExecutorError::status, |_| "success");
    app.metrics
        .executor_calls
        .with_label_values(&[executor, status])
        .inc();
    app.metrics
        .executor_duration
        .with_label_values(&[executor])
        .observe(elapsed.as_secs_f64());
    status
}
