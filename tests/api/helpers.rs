//! Test harness: a real gateway on a loopback port with a fresh SQLite database and audit folder.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use catraca::app::App;
use catraca::config::{Config, DatabaseUrl, Mode};
use catraca::domain::{ApiKey, ContextId, KeyId, RoleName, TierName};
use catraca::executors::{Executor, ExecutorCall, ExecutorError, Kinds};
use catraca::keys::{self, NewKey};
use catraca::startup::Server;
use serde_json::Value;
use tokio::sync::oneshot;

/// Everything logged during the test run, by every target at every level down to `trace` (all tests
/// share one subscriber), so a test can show what never reaches any log.
pub fn captured_logs() -> String {
    String::from_utf8_lossy(&log_buffer().lock().unwrap()).into_owned()
}

fn log_buffer() -> &'static Arc<Mutex<Vec<u8>>> {
    static BUF: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    BUF.get_or_init(|| Arc::new(Mutex::new(Vec::new())))
}

#[derive(Clone)]
struct BufWriter(Arc<Mutex<Vec<u8>>>);

impl Write for BufWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn init_logs() {
    static INIT: OnceLock<()> = OnceLock::new();
    INIT.get_or_init(|| {
        let buf = log_buffer().clone();
        let _ = tracing_subscriber::fmt()
            .with_env_filter("trace")
            .with_ansi(false)
            .with_writer(move || BufWriter(buf.clone()))
            .try_init();
    });
}

/// Calls made to the test executors, so a test can prove an executor did or did not run; and a hold
/// on the `counting` executor, so a test can act while an action runs.
#[derive(Clone, Default)]
pub struct Calls(Arc<AtomicUsize>, Arc<Hold>);

#[derive(Default)]
pub struct Hold {
    armed: AtomicBool,
    release: tokio::sync::Notify,
}

impl Calls {
    pub fn count(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }

    /// The next runs of the `counting` executor wait inside it, counted, until [`Calls::release`].
    pub fn hold(&self) {
        self.1.armed.store(true, Ordering::SeqCst);
    }

    /// Lets a held run finish, and holds no more.
    pub fn release(&self) {
        self.1.armed.store(false, Ordering::SeqCst);
        self.1.release.notify_one();
    }
}

/// A stand-in for an upstream that answers with an error (the kind an LLM server or the PNCP API
/// gives): counts its calls, then fails.
struct Failing(Calls);

#[async_trait]
impl Executor for Failing {
    async fn execute(&self, _call: ExecutorCall) -> Result<Value, ExecutorError> {
        self.0.0.fetch_add(1, Ordering::SeqCst);
        Err(ExecutorError::Failed("upstream answered 500".into()))
    }
}

/// Counts its calls and echoes the payload.
struct Counting(Calls);

#[async_trait]
impl Executor for Counting {
    async fn execute(&self, call: ExecutorCall) -> Result<Value, ExecutorError> {
        self.0.0.fetch_add(1, Ordering::SeqCst);
        if self.0.1.armed.load(Ordering::SeqCst) {
            self.0.1.release.notified().await;
        }
        Ok(call.payload)
    }
}

/// Extra policy for tests: actions on the test executors and rules that need no example policy change.
const TEST_POLICY: &str = r#"
[actions."test.broken"]
executor = "broken"

[actions."test.counted"]
executor = "counted"

[actions."test.forbidden"]
executor = "echo"

[actions."test.eval"]
executor = "echo"

[actions."test.chain"]
executor = "chain"

[roles.digester]
description = "May digest and collect, but not summarise: for step re-authorization tests."

[[rules]]
id = "digesters-digest"
effect = "allow"
roles = ["digester"]
contexts = ["work"]
actions = ["licitacoes.digest", "licitacoes.collect"]

[[rules]]
id = "operators-make-keys"
effect = "allow"
description = "Operators may make keys, within what they hold: for the escalation tests."
roles = ["operator"]
contexts = ["*"]
actions = ["keys.create"]

[[rules]]
id = "nobody-forbidden"
effect = "deny"
roles = ["*"]
contexts = ["*"]
actions = ["test.forbidden"]

[[rules]]
id = "small-n-only"
effect = "deny"
roles = ["*"]
contexts = ["*"]
actions = ["test.eval"]
reason_code = "N_TOO_LARGE"

[[rules.when]]
pointer = "/n"
min = 10
"#;

/// A composite whose first step fails (the `broken` executor) and whose second echoes the input.
pub const CHAIN_COMPOSITE: &str = r#"
name = "chain"
kind = "composite"
timeout_ms = 5000
[settings]
mode = "continue"
[[settings.steps]]
name = "first"
action = "test.broken"
[[settings.steps]]
name = "second"
action = "echo"
from = { "/message" = "/input/message" }
"#;

pub struct TestApp {
    pub addr: SocketAddr,
    pub app: Arc<App>,
    pub client: reqwest::Client,
    pub dir: tempfile::TempDir,
    pub calls: Calls,
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

/// Copies a folder tree (policies, executors) into a test's own folder.
/// The `event_type` of each event of a story, in order.
pub fn event_types(events: &[Value]) -> Vec<&str> {
    events
        .iter()
        .map(|e| e["event_type"].as_str().unwrap())
        .collect()
}

pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// A path in the checkout.
pub fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// Starts a gateway with the example policy plus the test actions, on a fresh SQLite file.
pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

pub async fn spawn_app_with(adjust: impl FnOnce(&mut Config)) -> TestApp {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies");
    copy_dir(&repo("policies"), &policies);
    std::fs::write(policies.join("zz-tests.toml"), TEST_POLICY).unwrap();
    let executors = dir.path().join("executors");
    copy_dir(&repo("executors"), &executors);
    std::fs::write(
        executors.join("broken.toml"),
        "name = \"broken\"\nkind = \"failing\"\ntimeout_ms = 1000\n",
    )
    .unwrap();
    std::fs::write(executors.join("chain.toml"), CHAIN_COMPOSITE).unwrap();
    std::fs::write(
        executors.join("counted.toml"),
        "name = \"counted\"\nkind = \"counting\"\ntimeout_ms = 1000\n",
    )
    .unwrap();

    let mut config = Config::defaults();
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.database_url = DatabaseUrl::new(format!(
        "sqlite://{}",
        dir.path().join("catraca.db").display()
    ));
    config.policies_dir = policies;
    config.executors_dir = executors;
    config.audit_dir = dir.path().join("audit");
    config.mode = Mode::Staging;
    config.instance_id = "test".into();
    adjust(&mut config);

    let calls = Calls::default();
    let mut kinds = Kinds::builtin();
    let c = calls.clone();
    kinds.register(
        "failing",
        Arc::new(move |_| Ok(Arc::new(Failing(c.clone())) as Arc<dyn Executor>)),
    );
    let c = calls.clone();
    kinds.register(
        "counting",
        Arc::new(move |_| Ok(Arc::new(Counting(c.clone())) as Arc<dyn Executor>)),
    );

    let server = Server::bind(config, kinds).await.expect("gateway starts");
    let addr = server.local_addr().unwrap();
    let app = server.app.clone();
    let (tx, rx) = oneshot::channel::<()>();
    let handle = tokio::spawn(server.run(async {
        let _ = rx.await;
    }));
    TestApp {
        addr,
        app,
        client: reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap(),
        dir,
        calls,
        shutdown: Some(tx),
        server: Some(handle),
    }
}

/// Options for a test key.
pub struct KeySpec<'a> {
    pub role: &'a str,
    pub tier: &'a str,
    pub contexts: &'a [&'a str],
    pub expires_in: Option<Duration>,
}

impl Default for KeySpec<'_> {
    fn default() -> Self {
        Self {
            role: "admin",
            tier: "unlimited",
            contexts: &[],
            expires_in: None,
        }
    }
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn db_url(&self) -> String {
        format!("sqlite://{}", self.dir.path().join("catraca.db").display())
    }

    /// Runs `statements` on the test gateway's SQLite database from a connection of its own, as an
    /// operator with a database shell would (the gateway is not told).
    pub async fn raw_sql(&self, statements: &[&str]) {
        use sqlx::{ConnectOptions, Connection, Executor};
        let options: sqlx::sqlite::SqliteConnectOptions = self.db_url().parse().unwrap();
        let mut conn = options.connect().await.unwrap();
        for statement in statements {
            conn.execute(sqlx::AssertSqlSafe((*statement).to_owned()))
                .await
                .unwrap();
        }
        conn.close().await.unwrap();
    }

    /// Creates a key through the same service the CLI uses; returns the full key text.
    pub async fn key(&self, spec: KeySpec<'_>) -> String {
        let template = NewKey {
            name: format!("test-{}", spec.role),
            role: RoleName::parse(spec.role).unwrap(),
            contexts: spec
                .contexts
                .iter()
                .map(|c| ContextId::parse(c).unwrap())
                .collect(),
            tier: Some(TierName::parse(spec.tier).unwrap()),
            expires_in: spec.expires_in,
            actor: "test".to_owned(),
        };
        let (key, _) = keys::create(
            self.app.store.as_ref(),
            &self.app.audit,
            &self.app.policy(),
            &template,
        )
        .await
        .unwrap();
        key.expose()
    }

    pub async fn admin_key(&self) -> String {
        self.key(KeySpec::default()).await
    }

    pub async fn role_key(&self, role: &str) -> String {
        self.key(KeySpec {
            role,
            ..KeySpec::default()
        })
        .await
    }

    /// GET `path` as text (e.g. `/metrics`).
    pub async fn get_text(&self, path: &str) -> String {
        self.client
            .get(self.url(path))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// GET `path` as JSON.
    pub async fn get_json(&self, path: &str) -> Value {
        self.client
            .get(self.url(path))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// POST /process with an optional key and a JSON body.
    pub async fn process(&self, key: Option<&str>, body: &Value) -> reqwest::Response {
        self.process_raw(key, body.to_string()).await
    }

    pub async fn process_raw(
        &self,
        key: Option<&str>,
        body: impl Into<reqwest::Body>,
    ) -> reqwest::Response {
        let mut req = self
            .client
            .post(self.url("/process"))
            .header("content-type", "application/json")
            .body(body);
        if let Some(k) = key {
            req = req.header("x-api-key", k);
        }
        req.send().await.unwrap()
    }

    /// Sends one echo request per key, all at once; their statuses, in the keys' order.
    pub async fn process_all_at_once(&self, keys: Vec<String>) -> Vec<u16> {
        let tasks: Vec<_> = keys
            .into_iter()
            .map(|key| {
                let request = self
                    .client
                    .post(self.url("/process"))
                    .header("x-api-key", key)
                    .json(&echo("x"));
                tokio::spawn(async move { request.send().await.unwrap().status().as_u16() })
            })
            .collect();
        let mut statuses = Vec::new();
        for t in tasks {
            statuses.push(t.await.unwrap());
        }
        statuses
    }

    /// The audit events of one request, in chain order, as stored.
    pub async fn events(&self, trace_id: &str) -> Vec<Value> {
        self.app
            .store
            .events_for_trace(trace_id)
            .await
            .unwrap()
            .iter()
            .map(|e| e.to_json())
            .collect()
    }

    /// The DECISION event of the request `trace`.
    pub async fn decision(&self, trace: &str) -> Value {
        self.events(trace)
            .await
            .into_iter()
            .find(|e| e["event_type"] == "DECISION")
            .unwrap_or_else(|| panic!("no DECISION for trace {trace}"))
    }

    /// Stops the server and waits until the audit writer has flushed; returns the test's folder.
    pub async fn stop(mut self) -> tempfile::TempDir {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let server = self.server.take();
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
        drop(self);
        if let Some(s) = server {
            s.await.unwrap().unwrap();
        }
        dir
    }
}

/// A denial body's reason codes.
pub async fn reasons(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.unwrap();
    (status, body)
}

pub fn echo(message: &str) -> Value {
    serde_json::json!({"action": "echo", "context_id": "work", "payload": {"message": message}})
}

/// The key id of a full key text.
pub fn key_id(key: &str) -> KeyId {
    ApiKey::parse(key).unwrap().key_id().clone()
}

/// A well-formed key that was never issued.
pub fn unissued_key() -> String {
    ApiKey::generate().unwrap().expose()
}

/// `key`'s id with another secret.
pub fn wrong_secret_for(key: &str) -> String {
    let other = ApiKey::generate().unwrap();
    format!("ck_{}_{}", key_id(key), other.secret())
}
