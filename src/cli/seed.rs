//! `catraca seed`: fills an empty store with synthetic keys and request stories, through the audit
//! writer's own code (sealing, group commit, the store's inserts), so the scale figures of the trail
//! (`scripts/scale.sh`) can be reproduced without hours of HTTP traffic. Refused on a store that already
//! holds keys or audit events: seeded stories never mix with a real trail.

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::{Context as _, bail};
use serde_json::json;

use crate::app;
use crate::audit::{AuditLog, EventType, PendingEvent, WriterOptions, timestamp};
use crate::config::Config;
use crate::domain::{KeyId, RoleName, TierName, TraceId};
use crate::metrics::Metrics;
use crate::store::{KeyRecord, Store};

/// Events of one seeded story: an allowed request's START, DECISION, EXECUTOR_SELECTED, ACTION_EXECUTED
/// and END.
const STORY: u64 = 5;
/// Stories appended at once (each waits for its group commit, like a request).
const IN_FLIGHT: usize = 512;
/// Keys inserted per progress line.
const KEYS_REPORT: usize = 10_000;

pub(super) async fn seed(config: &Config, keys: usize, events: u64) -> anyhow::Result<ExitCode> {
    let store = app::open_store(config).await?;
    if store.count_keys().await? > 0 || !store.chains().await?.is_empty() {
        bail!(
            "catraca seed fills an empty store only; this one already holds keys or audit events"
        );
    }
    let started = Instant::now();
    let key_ids = seed_keys(store.as_ref(), keys).await?;
    let keys_took = started.elapsed();

    let started = Instant::now();
    let metrics = Metrics::new()?;
    let checkpoints = crate::audit::Checkpointing::from_config(config, &metrics)?;
    let (audit, writer) = AuditLog::start(
        store.clone(),
        metrics,
        WriterOptions {
            instance_id: &config.instance_id,
            queue_capacity: IN_FLIGHT * 2,
            batch_max: 5_000,
            files_dir: None,
            file_max_bytes: config.audit_file_max_bytes,
            checkpoints,
        },
    )
    .await?;
    let stories = events.div_ceil(STORY);
    let next = Arc::new(AtomicU64::new(0));
    let key_ids = Arc::new(key_ids);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..IN_FLIGHT {
        let (audit, next, key_ids) = (audit.clone(), next.clone(), key_ids.clone());
        tasks.spawn(async move {
            let mut sample = None;
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= stories {
                    return Ok::<_, anyhow::Error>(sample);
                }
                let key = &key_ids[(n as usize) % key_ids.len().max(1)];
                let trace = TraceId::generate();
                audit.append(story(&trace, key, n)).await?;
                if n == stories / 2 {
                    sample = Some(trace);
                }
                if n > 0 && n % 200_000 == 0 {
                    eprintln!("catraca seed: {} events ...", n * STORY);
                }
            }
        });
    }
    let mut sample = None;
    while let Some(done) = tasks.join_next().await {
        if let Some(trace) = done.context("a seeding task failed")?? {
            sample = Some(trace);
        }
    }
    drop(audit);
    writer.finish().await;
    let took = started.elapsed().as_secs_f64();
    println!(
        "{}",
        json!({
            "keys": keys,
            "keys_seconds": keys_took.as_secs_f64(),
            "events": stories * STORY,
            "events_seconds": took,
            "events_per_second": (stories * STORY) as f64 / took.max(1e-9),
            "sample_trace_id": sample.map(|t| t.to_string()),
        })
    );
    Ok(ExitCode::SUCCESS)
}

/// Inserts `n` keys sharing one argon2 hash of a secret that is thrown away: real rows the key directory
/// loads and looks up, none of which can sign in.
async fn seed_keys(store: &dyn Store, n: usize) -> anyhow::Result<Vec<String>> {
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    let secret_hash = crate::keys::hash_secret(&hex::encode(secret)).map_err(anyhow::Error::msg)?;
    let now = timestamp(time::OffsetDateTime::now_utc());
    let role = RoleName::parse("analyst").map_err(|e| anyhow::anyhow!("{e}"))?;
    let tier = TierName::parse("standard").map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        let key_id = KeyId::generate().map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
        ids.push(key_id.to_string());
        store
            .insert_key(&KeyRecord {
                key_id,
                name: format!("seed-{i}"),
                role: role.clone(),
                contexts: None,
                tier: tier.clone(),
                secret_hash: secret_hash.clone(),
                created_at: now.clone(),
                expires_at: None,
                revoked_at: None,
                rotated_from: None,
            })
            .await?;
        if (i + 1) % KEYS_REPORT == 0 {
            eprintln!("catraca seed: {} keys ...", i + 1);
        }
    }
    Ok(ids)
}

/// An allowed echo request's story, with the members and sizes the turnstile writes.
fn story(trace: &TraceId, key_id: &str, n: u64) -> Vec<PendingEvent> {
    let decision_id = uuid::Uuid::now_v7().to_string();
    let digest = json!({"sha256": format!("{:064x}", u128::from(n as u32)), "size_bytes": 23});
    let start = PendingEvent::new(
        EventType::RequestStart,
        Some(trace),
        json!({"method": "POST", "route": "/process", "client_addr": "127.0.0.1", "content_length": 71}),
    );
    let gate = |name: &str, us: u64| json!({"gate": name, "verdict": "allow", "reason_codes": [], "duration_us": us});
    let decision = PendingEvent::new(
        EventType::Decision,
        Some(trace),
        json!({
            "action": "echo", "context_id": "work", "decision_id": decision_id,
            "determining_rules": ["everyone-echoes"], "effect": "allow", "gate": "action_matrix",
            "gates": [gate("auth", 12), gate("rate_limit", 2), gate("input", 80), gate("action_matrix", 4)],
            "payload": digest, "policy_revision": format!("{:064x}", 7),
            "presented_key_id": null,
            "principal": {"contexts": null, "key_id": key_id, "name": "seed", "role": "analyst", "tier": "standard"},
            "reason_codes": [], "requested_action": null,
        }),
    );
    let selected = PendingEvent::new(
        EventType::ExecutorSelected,
        Some(trace),
        json!({"action": "echo", "decision_id": decision_id, "executor_facts": null,
               "executor_id": "echo", "executor_kind": "echo", "timeout_ms": 1000}),
    );
    let executed = PendingEvent::new(
        EventType::ActionExecuted,
        Some(trace),
        json!({"action": "echo", "decision_id": decision_id, "duration_us": 30, "error": null,
               "executor_facts": null, "executor_id": "echo", "result": digest, "status": "success"}),
    );
    let end = PendingEvent::new(
        EventType::RequestEnd,
        Some(trace),
        json!({"decision_id": decision_id, "duration_us": 900, "outcome": "SUCCESS", "status": 200}),
    );
    vec![start, decision, selected, executed, end]
}
