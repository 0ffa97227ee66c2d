//! The application state: everything a request needs, built once from a configuration (store, executors,
//! policy, gates, audit writer), and the dev-mode policy reload that may swap its policy.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use serde_json::json;

use crate::audit::{AuditLog, EventType, PendingEvent, ThrottledLedger, WriterOptions, WriterTask};
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

/// Everything a request needs. Built once; the policy can be swapped by a dev-mode reload.
pub struct App {
    pub config: Config,
    pub store: Arc<dyn Store>,
    policy: RwLock<Arc<Policy>>,
    pub executors: Arc<Registry>,
    pub auth: AuthGate,
    pub limiter: Arc<dyn RateLimiter>,
    pub audit: AuditLog,
    /// Refusals of throttled addresses, written as REQUESTS_THROTTLED summaries.
    pub throttled: ThrottledLedger,
    /// Executors switched off by an operator, fresh within the key bound.
    pub switches: Arc<ExecutorSwitches>,
    pub metrics: Metrics,
    /// OpenTelemetry export, when `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
    pub telemetry: Option<Arc<Telemetry>>,
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
    let (registry, policy) = load_policy(&config, kinds, &env)?;
    let (audit, writer) = AuditLog::start(
        store.clone(),
        metrics.clone(),
        WriterOptions {
            instance_id: &config.instance_id,
            queue_capacity: config.audit_queue_capacity,
            batch_max: config.audit_batch_max,
            files_dir: Some(&config.audit_dir),
            file_max_bytes: config.audit_file_max_bytes,
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
    let nudges = crate::store::ChangeNudges::default();
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
        throttled: ThrottledLedger::default(),
        switches,
        metrics,
        telemetry: Telemetry::from_env(&config.instance_id)?,
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

/// Dev mode only: reloads the policy when its files change. A policy that fails to load is recorded
/// as POLICY_REJECTED and the old one keeps serving.
pub fn spawn_policy_reload(app: Arc<App>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let dir = app.config.policies_dir.clone();
        let mut seen = fingerprint(&dir);
        loop {
            tokio::time::sleep(RELOAD_POLL).await;
            let now = fingerprint(&dir);
            if now == seen {
                continue;
            }
            seen = now;
            let event = match Policy::load(&dir, |n| app.executors.contains(n)) {
                Ok(policy) if policy.revision == app.policy().revision => continue,
                Ok(policy) => {
                    tracing::info!(revision = %policy.revision, "policy reloaded");
                    let event = policy_loaded(&policy, app.config.mode, "reload");
                    app.replace_policy(policy);
                    event
                }
                Err(e) => {
                    tracing::error!(error = %e, "policy reload rejected; the previous policy keeps serving");
                    PendingEvent::new(
                        EventType::PolicyRejected,
                        None,
                        json!({
                            "error": e.to_string(),
                            "serving_revision": app.policy().revision,
                        }),
                    )
                }
            };
            if let Err(e) = app.audit.append(vec![event]).await {
                tracing::error!(error = %e, "could not audit the policy reload");
            }
        }
    })
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
