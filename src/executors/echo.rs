//! The `echo` kind: returns its payload. For smoke tests, benchmarks and timeout drills: a payload
//! `delay_ms` (capped by the `max_delay_ms` setting, default 0 = ignored) simulates a slow upstream.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;

use super::{Executor, ExecutorCall, ExecutorError, ExecutorSpec};

struct Echo {
    max_delay: Duration,
}

pub(super) fn build(spec: &ExecutorSpec<'_>) -> Result<Arc<dyn Executor>, String> {
    let mut max_delay_ms = 0u64;
    for (key, value) in spec.settings {
        match (key.as_str(), value) {
            ("max_delay_ms", toml::Value::Integer(n)) if *n >= 0 => max_delay_ms = *n as u64,
            ("max_delay_ms", _) => return Err("max_delay_ms must be a non-negative integer".into()),
            (other, _) => return Err(format!("unknown echo setting {other:?}")),
        }
    }
    Ok(Arc::new(Echo {
        max_delay: Duration::from_millis(max_delay_ms),
    }))
}

#[async_trait]
impl Executor for Echo {
    // Debug level: echo is the benchmark's executor, and a span per call at the default level would be
    // measured along with the gateway.
    #[tracing::instrument(level = "debug", skip_all, fields(action = %call.action, trace_id = %call.trace_id))]
    async fn execute(&self, call: ExecutorCall) -> Result<Value, ExecutorError> {
        let requested = call
            .payload
            .get("delay_ms")
            .and_then(super::whole_number)
            .map(Duration::from_millis)
            .unwrap_or_default();
        let delay = requested.min(self.max_delay);
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        Ok(call.payload)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_setting_is_refused_naming_it() {
        let mut t = toml::Table::new();
        t.insert("max_dealy_ms".into(), toml::Value::Integer(5));
        let env = super::super::ExecutorEnv::default();
        let spec = ExecutorSpec {
            name: "echo",
            settings: &t,
            env: &env,
            timeout: std::time::Duration::from_secs(1),
        };
        let Err(err) = build(&spec) else {
            panic!("an unknown setting was accepted");
        };
        assert!(err.contains("max_dealy_ms"), "{err}");
    }
}
