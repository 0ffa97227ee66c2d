//! The application state: everything a request needs, built once from a configuration (store, executors,
//! policy, gates, audit writer), and the policy reload that may swap its policy (on SIGHUP, when
//! `catraca policy reload` asks every gateway on the database, and in dev mode when its files change).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use serde_json::json;

use crate::audit::anchor::PublicKey;
use crate::audit::{
    AuditLog, Checkpointing, EventType, PendingEvent, ThrottledLedger, WriterOptions, WriterTask,
};
use crate::config::{Config, Mode};
use crate::domain::{ApiKey, RoleName, TierName};
use crate::executors::switches::ExecutorSwitches;
use crate::executors::{ExecutorEnv, Kinds, Registry};
use crate::gates::auth::AuthGate;
use crate::gates::limiter_breaker::Breaker;
use crate::gates::rate_limit::{InProcessLimiter, RateLimiter};
use crate::gates::rate_limit_redis::RedisLimiter;
use crate::keys::{self, NewKey};
use crate::metrics::Metrics;
use crate::policy::Policy;
use crate::store::{self, Store};
use crate::telemetry::Telemetry;

/// Everything a request needs. Built once; the policy can be swapped by a reload.
pub struct App {
    pub config: Config,
    pub store: Arc<dyn Store>,
    policy: RwLock<Arc<Policy>>,
    pub executors: Arc<Registry>,
    pub auth: AuthGate,
    pub limiter: Arc<dyn RateLimiter>,
    pub audit: AuditLog,
    /// The public half of the key that signs this gateway's checkpoints.
    pub audit_public_key: PublicKey,
    /// Refusals of throttled addresses, written as REQUESTS_THROTTLED summaries.
    pub throttled: ThrottledLedger,
    /// Executors switched off by an operator, fresh within the key bound.
    pub switches: Arc<ExecutorSwitches>,
    pub metrics: Metrics,
    /// OpenTelemetry export, when `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
    pub telemetry: Option<Arc<Telemetry>>,
    /// Policy reloads asked through the store.
    reloads: ReloadRequests,
}

/// The policy reloads asked of every gateway on the database (`catraca policy reload`): the latest one
/// this gateway has honoured, and the nudge the store pushes when one is asked.
struct ReloadRequests {
    honoured: AtomicI64,
    asked: Arc<tokio::sync::Notify>,
}

impl App {
    /// The policy in force; a request keeps the one it started with.
    pub fn policy(&self) -> Arc<Policy> {
        match self.policy.read() {
            Ok(p) => p.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn replace_policy(&self, policy: Policy) {
        let policy = Arc::new(policy);
        match self.policy.write() {
            Ok(mut p) => *p = policy,
            Err(poisoned) => *poisoned.into_inner() = policy,
        }
    }
}

/// Loads executors, then the policy checked against them.
pub fn load_policy(
    config: &Config,
    kinds: &Kinds,
    env: &ExecutorEnv,
) -> anyhow::Result<(Registry, Policy)> {
    let registry = Registry::load(&config.executors_dir, kinds, env)?;
    let policy = Policy::load(&config.policies_dir, |name| registry.contains(name))?;
    Ok((registry, policy))
}

/// Opens the store and applies migrations.
pub async fn open_store(config: &Config) -> anyhow::Result<Arc<dyn Store>> {
    let store = store::connect_with(&config.database_url, &config.postgres)
        .await
        .with_context(|| format!("opening {}", config.database_url))?;
    store.migrate().await.context("applying migrations")?;
    Ok(store)
}

/// Builds the application: store, executors, policy, audit writer. Writes POLICY_LOADED.
pub async fn build(config: Config, kinds: &Kinds) -> anyhow::Result<(Arc<App>, WriterTask)> {
    let store = open_store(&config).await?;
    let metrics = Metrics::new()?;
    let env = ExecutorEnv {
        store: Some(store.clone()),
        metrics: Some(metrics.clone()),
        dir: config.executors_dir.clone(),
        overrides: config.executor_overrides.clone(),
    };
    // Read before the files: a reload asked from now on is one this gateway has not seen.
    let reloads = ReloadRequests {
        honoured: AtomicI64::new(
            store
                .policy_reload_requested()
                .await
                .context("reading the policy reload requests")?,
        ),
        asked: Arc::default(),
    };
    let (registry, policy) = load_policy(&config, kinds, &env)?;
    let checkpoints = Checkpointing::from_config(&config, &metrics)?;
    let audit_public_key = checkpoints.key.public().clone();
    let (audit, writer) = AuditLog::start(
        store.clone(),
        metrics.clone(),
        WriterOptions {
            instance_id: &config.instance_id,
            queue_capacity: config.audit_queue_capacity,
            batch_max: config.audit_batch_max,
            files_dir: Some(&config.audit_dir),
            file_max_bytes: config.audit_file_max_bytes,
            checkpoints,
        },
    )
    .await
    .context("starting the audit writer")?;
    audit
        .append(vec![policy_loaded(&policy, config.mode, "start")])
        .await?;
    let auth = AuthGate::new(
        store.clone(),
        config.auth_cache_ttl,
        config.auth_failures_per_minute,
        config.argon2_concurrency,
        config.key_refresh,
    );
    auth.keys()
        .refresh()
        .await
        .context("reading the key revision")?;
    let nudges = crate::store::ChangeNudges {
        policy: reloads.asked.clone(),
        ..Default::default()
    };
    crate::watch::spawn_watcher(auth.keys(), config.key_refresh, nudges.keys.clone());
    let switches = Arc::new(ExecutorSwitches::new(store.clone(), config.key_refresh));
    switches
        .refresh()
        .await
        .context("reading the executor switches")?;
    crate::watch::spawn_watcher(&switches, config.key_refresh, nudges.switches.clone());
    store.push_changes(nudges);
    // One limiter shared by every instance when Redis is configured, behind a circuit so a dead Redis
    // costs milliseconds per request; else each instance its own, which is always available.
    let limiter: Arc<dyn RateLimiter> = match &config.redis_url {
        Some(url) => Arc::new(Breaker::new(
            Arc::new(
                RedisLimiter::new(url.expose())
                    .with_context(|| format!("CATRACA_REDIS_URL {url} is not a Redis URL"))?,
            ),
            metrics.rate_limiter_available.clone(),
        )),
        None => {
            metrics.rate_limiter_available.set(1);
            Arc::new(InProcessLimiter::default())
        }
    };
    let app = App {
        store,
        policy: RwLock::new(Arc::new(policy)),
        executors: Arc::new(registry),
        auth,
        limiter,
        audit,
        audit_public_key,
        throttled: ThrottledLedger::default(),
        switches,
        metrics,
        telemetry: Telemetry::from_env(&config.instance_id)?,
        reloads,
        config,
    };
    Ok((Arc::new(app), writer))
}

fn policy_loaded(policy: &Policy, mode: Mode, trigger: &str) -> PendingEvent {
    PendingEvent::new(
        EventType::PolicyLoaded,
        None,
        json!({
            "policy_revision": policy.revision,
            "files": policy.files,
            "mode": mode.to_string(),
            "trigger": trigger,
        }),
    )
}

/// In dev mode with no key at all, creates one admin key so a newcomer's first `curl` works.
pub async fn bootstrap_dev_key(app: &App) -> anyhow::Result<Option<ApiKey>> {
    if app.config.mode != Mode::Dev || app.store.count_keys().await? > 0 {
        return Ok(None);
    }
    let template = NewKey {
        name: "dev-admin".to_owned(),
        role: RoleName::parse("admin")?,
        contexts: vec![],
        tier: Some(TierName::parse("standard")?).filter(|t| app.policy().has_tier(t)),
        expires_in: None,
        actor: "serve:dev-bootstrap".to_owned(),
    };
    let (key, _) = keys::create(app.store.as_ref(), &app.audit, &app.policy(), &template).await?;
    Ok(Some(key))
}

/// How often dev mode looks for edited policy files.
const RELOAD_POLL: Duration = Duration::from_secs(2);

/// Names, sizes and modification times of the policy files: cheap to compute, changes on any edit.
fn fingerprint(dir: &Path) -> Vec<(PathBuf, u64, Option<SystemTime>)> {
    fn walk(dir: &Path, out: &mut Vec<(PathBuf, u64, Option<SystemTime>)>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, out);
            } else if let Ok(meta) = entry.metadata() {
                out.push((path, meta.len(), meta.modified().ok()));
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, &mut out);
    out.sort();
    out
}

/// Reloads the policy from its files when asked: on SIGHUP, when `catraca policy reload` asks every
/// gateway on the database (pushed by the store where it can, else read every `key_refresh_ms`), and in
/// dev mode whenever the files change. The new policy is recorded as POLICY_LOADED; one that fails to
/// load as POLICY_REJECTED, and the old one keeps serving. A request keeps the policy it started with,
/// so none is decided by a mix of two.
pub fn spawn_policy_reload(app: Arc<App>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let dev = app.config.mode == Mode::Dev;
        let dir = app.config.policies_dir.clone();
        let mut files = fingerprint(&dir);
        let mut files_tick = tokio::time::interval(RELOAD_POLL);
        let mut asked_tick = tokio::time::interval(app.config.key_refresh);
        asked_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut hangup = Hangup::listen();
        let mut unreadable = false;
        loop {
            let trigger = tokio::select! {
                _ = files_tick.tick(), if dev => {
                    let now = fingerprint(&dir);
                    if now == files {
                        continue;
                    }
                    files = now;
                    // The name dev-mode reloads have always had in the trail.
                    "reload"
                }
                _ = asked_tick.tick() => "request",
                () = app.reloads.asked.notified() => "request",
                () = hangup.recv() => "signal",
            };
            if trigger == "request" {
                match app.store.policy_reload_requested().await {
                    Ok(latest) => {
                        unreadable = false;
                        if latest <= app.reloads.honoured.swap(latest, Ordering::Relaxed) {
                            continue;
                        }
                    }
                    Err(e) => {
                        if !unreadable {
                            tracing::warn!(error = %e, "cannot read the policy reload requests; retrying every key_refresh_ms");
                        }
                        unreadable = true;
                        continue;
                    }
                }
            }
            reload_policy(&app, trigger).await;
        }
    })
}

/// Loads the policy files again and swaps the policy in force when they load and differ, auditing the
/// outcome.
async fn reload_policy(app: &App, trigger: &str) {
    let dir = app.config.policies_dir.clone();
    let event = match Policy::load(&dir, |n| app.executors.contains(n)) {
        Ok(policy) if policy.revision == app.policy().revision => {
            tracing::info!(revision = %policy.revision, trigger, "policy reload: the files are unchanged");
            return;
        }
        Ok(policy) => {
            tracing::info!(revision = %policy.revision, trigger, "policy reloaded");
            let event = policy_loaded(&policy, app.config.mode, trigger);
            app.replace_policy(policy);
            event
        }
        Err(e) => {
            tracing::error!(error = %e, trigger, "policy reload rejected; the previous policy keeps serving");
            PendingEvent::new(
                EventType::PolicyRejected,
                None,
                json!({
                    "error": e.to_string(),
                    "serving_revision": app.policy().revision,
                    "trigger": trigger,
                }),
            )
        }
    };
    if let Err(e) = app.audit.append(vec![event]).await {
        tracing::error!(error = %e, "could not audit the policy reload");
    }
}

/// SIGHUP, the conventional "read your configuration again"; never fires where it cannot be listened
/// for.
struct Hangup(Option<tokio::signal::unix::Signal>);

impl Hangup {
    fn listen() -> Self {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(signal) => Self(Some(signal)),
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGHUP: policy reloads by signal are off");
                Self(None)
            }
        }
    }

    async fn recv(&mut self) {
        let received = match &mut self.0 {
            Some(signal) => signal.recv().await,
            None => None,
        };
        if received.is_none() {
            self.0 = None;
            std::future::pending::<()>().await;
        }
    }
}

/// Writes the pending REQUESTS_THROTTLED summaries; at every interval and once more at shutdown.
pub async fn flush_throttled(app: &App) {
    let events = app.throttled.drain();
    if events.is_empty() {
        return;
    }
    if let Err(e) = app.audit.append(events).await {
        tracing::error!(error = %e, "could not write the REQUESTS_THROTTLED summaries");
    }
}

/// Flushes the throttled-refusal summaries every `throttle_summary_interval`.
pub fn spawn_throttle_summaries(app: Arc<App>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(app.config.throttle_summary_interval);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        every.tick().await;
        loop {
            every.tick().await;
            flush_throttled(&app).await;
        }
    })
}
