//! Executors: what runs after an ALLOW. Each file in `executors/` defines one executor of a kind; the
//! registry runs them under their timeout in a task of their own, so a panic or a hang stays contained.

mod collector;
mod composite;
mod echo;
mod llm;
pub mod switches;

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use opentelemetry::KeyValue;
use serde::Deserialize;
use serde_json::Value;
use tracing::Instrument as _;

use crate::config::ExecutorOverrides;
use crate::domain::{ActionName, ContextId, TraceId};
use crate::metrics::Metrics;
use crate::reason::ReasonCode;
use crate::store::Store;
use crate::telemetry;

/// What an executor is asked to do.
#[derive(Clone)]
pub struct ExecutorCall {
    pub trace_id: TraceId,
    pub decision_id: uuid::Uuid,
    pub action: ActionName,
    pub context: ContextId,
    pub payload: Value,
    /// Runs another action for the same principal and context, re-authorized and audited as a step
    /// (what composites are made of).
    pub steps: Option<Arc<dyn StepRunner>>,
    /// Where to relay the answer's chunks as they come, when the client asked for a stream (the
    /// OpenAI facade's `stream: true`). An executor that cannot stream ignores it and returns its
    /// whole result.
    pub stream: Option<ChunkSink>,
}

/// The client's end of a streamed answer: chunks go out as the executor produces them, under
/// back-pressure (a bounded channel), and sending fails once the client has gone.
#[derive(Clone, Debug)]
pub struct ChunkSink {
    chunks: tokio::sync::mpsc::Sender<Value>,
    sent: Arc<AtomicUsize>,
}

impl ChunkSink {
    /// A sink and the receiver its chunks arrive at; at most `capacity` chunks wait unread.
    pub fn channel(capacity: usize) -> (Self, tokio::sync::mpsc::Receiver<Value>) {
        let (chunks, rx) = tokio::sync::mpsc::channel(capacity.max(1));
        let sink = Self {
            chunks,
            sent: Arc::new(AtomicUsize::new(0)),
        };
        (sink, rx)
    }

    /// Relays one chunk; fails once the client has closed the stream (the executor should stop).
    pub async fn send(&self, chunk: Value) -> Result<(), ExecutorError> {
        self.chunks.send(chunk).await.map_err(|_| {
            ExecutorError::Failed("the client closed the stream before its end".to_owned())
        })?;
        self.sent.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// How many chunks were relayed so far: once one was, the client has its answer's status (200).
    pub fn sent(&self) -> usize {
        self.sent.load(Ordering::Relaxed)
    }
}

impl std::fmt::Debug for ExecutorCall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecutorCall")
            .field("trace_id", &self.trace_id)
            .field("decision_id", &self.decision_id)
            .field("action", &self.action)
            .field("context", &self.context)
            .finish_non_exhaustive()
    }
}

/// Why a step did not produce a result.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StepError {
    /// The action matrix (or the input gate) refused the step for this principal.
    #[error("step {action} refused: {}", codes_text(reason_codes))]
    Refused {
        action: String,
        reason_codes: Vec<ReasonCode>,
    },
    /// The step's executor failed or timed out.
    #[error("step {action} failed: {error}")]
    Failed {
        action: String,
        error: ExecutorError,
    },
    /// The step could not be recorded: nothing more may run.
    #[error("step {action} could not be audited")]
    Unaudited { action: String },
}

/// A payload's whole number as an action schema's `"type": "integer"` admits it: `8` and also `8.0`
/// (JSON Schema counts a number without a fractional part as an integer, so the input gate lets it
/// through and an executor must read it too).
pub(crate) fn whole_number(value: &Value) -> Option<u64> {
    value.as_u64().or_else(|| {
        value
            .as_f64()
            .filter(|f| f.fract() == 0.0 && (0.0..=u64::MAX as f64).contains(f))
            .map(|f| f as u64)
    })
}

fn codes_text(codes: &[ReasonCode]) -> String {
    codes
        .iter()
        .map(ReasonCode::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Runs one step of a composite through the matrix and its executor, recording STEP_EXECUTED.
#[async_trait]
pub trait StepRunner: Send + Sync {
    async fn run_step(
        &self,
        index: usize,
        action: &str,
        payload: Value,
    ) -> Result<Value, StepError>;
}

/// What executor kinds may use besides their settings.
#[derive(Clone, Default)]
pub struct ExecutorEnv {
    /// The database (collector snapshots, run locks); `None` in commands that only check files.
    pub store: Option<Arc<dyn Store>>,
    /// The gateway's metrics; `None` outside a running gateway.
    pub metrics: Option<Metrics>,
    /// The executors folder: relative paths in settings (prompt templates) resolve here.
    pub dir: PathBuf,
    /// Settings the configuration overrides for every executor of a kind (`CATRACA_LLM_BASE_URL`,
    /// `CATRACA_LLM_MODEL`, `CATRACA_PNCP_BASE_URL`): executors never read those variables themselves.
    pub overrides: ExecutorOverrides,
}

/// One executor file's name and settings, as a kind factory sees them.
pub struct ExecutorSpec<'a> {
    pub name: &'a str,
    pub settings: &'a toml::Table,
    pub env: &'a ExecutorEnv,
    /// The file's `timeout_ms`: how long one call may take in all.
    pub timeout: Duration,
}

/// How an executor failed. Messages reach clients and the audit trail: never put a secret in one.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ExecutorError {
    #[error("{0}")]
    Failed(String),
    #[error("no answer within {}ms", .0.as_millis())]
    Timeout(Duration),
}

impl ExecutorError {
    /// The status of this failure in metrics and audit events (`failed` or `timeout`).
    pub fn status(&self) -> &'static str {
        match self {
            Self::Failed(_) => "failed",
            Self::Timeout(_) => "timeout",
        }
    }
}

/// One replaceable kind of work (echo, llm, collector, composite).
#[async_trait]
pub trait Executor: Send + Sync + 'static {
    async fn execute(&self, call: ExecutorCall) -> Result<Value, ExecutorError>;

    /// Facts about this executor the audit trail should carry in EXECUTOR_SELECTED and
    /// ACTION_EXECUTED (e.g. a prompt template's SHA-256 and the model); never secrets.
    fn audit_facts(&self) -> Option<Value> {
        None
    }

    /// Facts about one call's `result` for its ACTION_EXECUTED event (e.g. the model that answered
    /// and its token usage), read from the result the executor itself shaped; never secrets.
    fn outcome_facts(&self, _result: &Value) -> Option<Value> {
        None
    }
}

/// Builds an executor of one kind from the `[settings]` table of its file.
pub type KindFactory =
    Arc<dyn Fn(&ExecutorSpec<'_>) -> Result<Arc<dyn Executor>, String> + Send + Sync>;

/// The kinds this build can run. Library users may register more.
#[derive(Clone)]
pub struct Kinds {
    factories: BTreeMap<String, KindFactory>,
}

impl Kinds {
    /// The kinds shipped with Catraca.
    pub fn builtin() -> Self {
        let mut kinds = Self {
            factories: BTreeMap::new(),
        };
        kinds.register("echo", Arc::new(echo::build));
        kinds.register("llm", Arc::new(llm::build));
        kinds.register("collector", Arc::new(collector::build));
        kinds.register("composite", Arc::new(composite::build));
        kinds
    }

    pub fn register(&mut self, kind: &str, factory: KindFactory) {
        self.factories.insert(kind.to_owned(), factory);
    }

    fn names(&self) -> String {
        self.factories
            .keys()
            .cloned()
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Default executor timeout when a file sets none: long enough for an LLM answer, short enough that a
/// hung upstream does not hold a client forever.
const DEFAULT_TIMEOUT_MS: u64 = 30_000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExecutorFile {
    name: String,
    kind: String,
    #[serde(default)]
    description: String,
    timeout_ms: Option<u64>,
    #[serde(default)]
    settings: toml::Table,
}

/// A loaded executor.
pub struct ExecutorDef {
    pub name: String,
    pub kind: String,
    pub description: String,
    pub timeout: Duration,
    /// The file it came from, relative to the executors folder.
    pub file: String,
    executor: Arc<dyn Executor>,
}

/// Every executor of the `executors/` folder.
#[derive(Default)]
pub struct Registry {
    executors: BTreeMap<String, ExecutorDef>,
}

impl Registry {
    /// Loads `dir/*.toml`. A file naming a kind this build lacks is an error naming the file and kind.
    pub fn load(dir: &Path, kinds: &Kinds, env: &ExecutorEnv) -> anyhow::Result<Self> {
        let env = ExecutorEnv {
            dir: dir.to_path_buf(),
            ..env.clone()
        };
        let mut paths: Vec<_> = std::fs::read_dir(dir)
            .map_err(|e| anyhow::anyhow!("reading executors folder {}: {e}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "toml"))
            .collect();
        paths.sort();
        let mut executors = BTreeMap::new();
        for path in paths {
            let file_name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let text = std::fs::read_to_string(&path)
                .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
            let file: ExecutorFile =
                toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            if crate::domain::ActionName::parse(&file.name).is_err() {
                anyhow::bail!(
                    "{}: executor name {:?} must be a lowercase identifier",
                    path.display(),
                    file.name
                );
            }
            let factory = kinds.factories.get(&file.kind).ok_or_else(|| {
                anyhow::anyhow!(
                    "{}: executor {:?} has kind {:?}, which this build does not provide (known kinds: {})",
                    path.display(),
                    file.name,
                    file.kind,
                    kinds.names()
                )
            })?;
            let timeout_ms = file.timeout_ms.unwrap_or(DEFAULT_TIMEOUT_MS);
            if timeout_ms == 0 {
                anyhow::bail!("{}: timeout_ms must be positive", path.display());
            }
            let spec = ExecutorSpec {
                name: &file.name,
                settings: &file.settings,
                env: &env,
                timeout: Duration::from_millis(timeout_ms),
            };
            let executor = factory(&spec).map_err(|e| {
                anyhow::anyhow!("{}: executor {:?}: {e}", path.display(), file.name)
            })?;
            let def = ExecutorDef {
                name: file.name.clone(),
                kind: file.kind,
                description: file.description,
                timeout: Duration::from_millis(timeout_ms),
                file: file_name,
                executor,
            };
            if executors.insert(file.name.clone(), def).is_some() {
                anyhow::bail!("executor {:?} is defined twice", file.name);
            }
        }
        Ok(Self { executors })
    }

    pub fn get(&self, name: &str) -> Option<&ExecutorDef> {
        self.executors.get(name)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.executors.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.executors.keys().map(String::as_str)
    }
}

impl ExecutorDef {
    /// See [`Executor::audit_facts`].
    pub fn audit_facts(&self) -> Option<Value> {
        self.executor.audit_facts()
    }

    /// See [`Executor::outcome_facts`].
    pub fn outcome_facts(&self, result: &Value) -> Option<Value> {
        self.executor.outcome_facts(result)
    }

    /// Runs the executor in its own task under its timeout; on timeout the task is aborted.
    pub async fn run(&self, call: ExecutorCall) -> Result<Value, ExecutorError> {
        let span = telemetry::Open::new();
        let action = span.traced().then(|| call.action.to_string());
        let result = self.run_traced(call, span.inside()).await;
        span.end(
            || Cow::Owned(format!("executor {}", self.name)),
            || {
                vec![
                    KeyValue::new("catraca.executor", self.name.clone()),
                    KeyValue::new("catraca.executor.kind", self.kind.clone()),
                    KeyValue::new("catraca.action", action.unwrap_or_default()),
                ]
            },
            result.as_ref().err().map(|e| e as &dyn std::fmt::Display),
        );
        result
    }

    /// The executor's own task, under its timeout; its upstream calls carry `traceparent` when
    /// `inside` is a traced span.
    async fn run_traced(
        &self,
        call: ExecutorCall,
        inside: Option<telemetry::Current>,
    ) -> Result<Value, ExecutorError> {
        let executor = self.executor.clone();
        // The task carries the request's log span (its lines keep the trace id) and its trace.
        let task = tokio::spawn(telemetry::within(
            inside,
            Box::pin(async move { executor.execute(call).await }).in_current_span(),
        ));
        let abort = task.abort_handle();
        match tokio::time::timeout(self.timeout, task).await {
            Ok(Ok(result)) => result,
            Ok(Err(join)) => {
                tracing::error!(executor = %self.name, error = %join, "executor task failed");
                Err(ExecutorError::Failed(format!(
                    "executor {} stopped unexpectedly",
                    self.name
                )))
            }
            Err(_) => {
                abort.abort();
                Err(ExecutorError::Timeout(self.timeout))
            }
        }
    }
}

/// `traceparent` naming the running executor's span, for its upstream calls (empty when the request
/// is not traced).
pub fn upstream_trace_headers() -> reqwest::header::HeaderMap {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(value) =
        telemetry::traceparent().and_then(|t| reqwest::header::HeaderValue::from_str(&t).ok())
    {
        headers.insert("traceparent", value);
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_whole_number_may_be_written_with_a_zero_fraction() {
        assert_eq!(whole_number(&serde_json::json!(8)), Some(8));
        assert_eq!(whole_number(&serde_json::json!(8.0)), Some(8));
        assert_eq!(whole_number(&serde_json::json!(8.5)), None);
        assert_eq!(whole_number(&serde_json::json!(-1)), None);
        assert_eq!(whole_number(&serde_json::json!("8")), None);
    }

    fn folder(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        dir
    }

    fn load_error(files: &[(&str, &str)]) -> String {
        let dir = folder(files);
        match Registry::load(dir.path(), &Kinds::builtin(), &ExecutorEnv::default()) {
            Ok(_) => panic!("{files:?} loaded"),
            Err(e) => format!("{e:#}"),
        }
    }

    #[test]
    fn an_unknown_setting_fails_naming_the_file_and_the_setting() {
        for (file, text, setting) in [
            (
                "typo.toml",
                "name = \"typo\"\nkind = \"echo\"\n[settings]\nmax_dealy_ms = 5\n",
                "max_dealy_ms",
            ),
            (
                "pncp-typo.toml",
                "name = \"pncp_typo\"\nkind = \"collector\"\n[settings]\nsource = \"pncp\"\nbase_url = \"http://127.0.0.1:9\"\npage_sise = 10\n",
                "page_sise",
            ),
        ] {
            let err = load_error(&[(file, text)]);
            assert!(err.contains(file), "{err}");
            assert!(err.contains(setting), "{err}");
        }
    }

    #[test]
    fn a_kind_this_build_lacks_fails_naming_the_file_and_the_kind() {
        let err = load_error(&[("mystery.toml", "name = \"mystery\"\nkind = \"quantum\"\n")]);
        assert!(err.contains("mystery.toml"), "{err}");
        assert!(err.contains("quantum"), "{err}");
    }

    #[test]
    fn an_unknown_top_level_key_fails_naming_the_file_and_the_key() {
        let err = load_error(&[(
            "late.toml",
            "name = \"late\"\nkind = \"echo\"\ntimeout = 5\n",
        )]);
        assert!(err.contains("late.toml"), "{err}");
        assert!(err.contains("timeout"), "{err}");
    }

    #[test]
    fn timeout_ms_defaults_to_thirty_seconds() {
        let dir = folder(&[("e.toml", "name = \"e\"\nkind = \"echo\"\n")]);
        let registry =
            Registry::load(dir.path(), &Kinds::builtin(), &ExecutorEnv::default()).unwrap();
        // The README's default: 30 000 ms for the whole call.
        assert_eq!(
            registry.get("e").unwrap().timeout,
            Duration::from_millis(30_000)
        );
    }
}
