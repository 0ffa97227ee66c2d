//! The audit trail as the request path writes it: events, order, chain links, fail-closed behaviour.

use std::collections::BTreeSet;

use catraca::audit::chain_hash;
use serde_json::{Value, json};
use sqlx::Connection;

use crate::helpers::{captured_logs, echo, reasons, spawn_app};

fn types(events: &[Value]) -> Vec<&str> {
    events
        .iter()
        .map(|e| e["event_type"].as_str().unwrap())
        .collect()
}

/// Checks hashes and links over `events` (consecutive events of one chain).
fn assert_linked(events: &[Value]) {
    for pair in events.windows(2) {
        assert_eq!(pair[0]["chain_id"], pair[1]["chain_id"]);
        assert_eq!(
            pair[1]["seq"].as_i64().unwrap(),
            pair[0]["seq"].as_i64().unwrap() + 1,
            "seq is contiguous"
        );
        assert_eq!(
            pair[1]["prev_hash"], pair[0]["hash"],
            "each event links to the one before"
        );
    }
}

async fn assert_chain_intact(app: &crate::helpers::TestApp) {
    let store = &app.app.store;
    for chain in store.chains().await.unwrap() {
        let events = store
            .chain_events(&chain.chain_id, 0, 1_000_000)
            .await
            .unwrap();
        assert_eq!(events.len() as i64, chain.events);
        for (i, e) in events.iter().enumerate() {
            assert_eq!(e.seq, i as i64 + 1);
            assert_eq!(
                e.hash,
                chain_hash(&e.prev_hash, &e.body),
                "stored bytes are the hashed bytes"
            );
            if i > 0 {
                assert_eq!(e.prev_hash, events[i - 1].hash);
            }
        }
    }
}

#[tokio::test]
async fn an_allowed_request_leaves_five_linked_events_in_order() {
    let app = spawn_app().await;
    let key = app.admin_key().await;
    let resp = app
        .client
        .post(app.url("/process"))
        .header("x-api-key", &key)
        .header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .json(&echo("olá"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["x-trace-id"],
        "4bf92f3577b34da6a3ce929d0e0e4736"
    );

    let events = app.events("4bf92f3577b34da6a3ce929d0e0e4736").await;

    assert_eq!(
        types(&events),
        [
            "REQUEST_START",
            "DECISION",
            "EXECUTOR_SELECTED",
            "ACTION_EXECUTED",
            "REQUEST_END"
        ]
    );
    assert_linked(&events);
    let decision = &events[1];
    assert_eq!(decision["effect"], "allow");
    assert_eq!(
        decision["determining_rules"],
        json!(["everyone-echoes", "admins-everything"])
    );
    assert_eq!(
        decision["policy_revision"],
        app.app.policy().revision.as_str()
    );
    let gates: Vec<&str> = decision["gates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["gate"].as_str().unwrap())
        .collect();
    assert_eq!(gates, ["auth", "rate_limit", "input", "action_matrix"]);
    assert!(decision["gates"][0]["duration_us"].is_u64());
    assert_eq!(decision["principal"]["role"], "admin");
    assert_eq!(
        decision["payload"]["size_bytes"], 18,
        "canonical {{\"message\":\"olá\"}}"
    );
    assert_eq!(decision["payload"]["sha256"].as_str().unwrap().len(), 64);
    assert!(
        !events.iter().any(|e| e.to_string().contains("olá")),
        "payload text is never stored"
    );
    assert_eq!(events[4]["status"], 200);
    assert_chain_intact(&app).await;
}

#[tokio::test]
async fn a_denied_request_leaves_three_linked_events() {
    let app = spawn_app().await;
    let resp = app
        .client
        .post(app.url("/process"))
        .header("x-trace-id", "deny-trace-0001")
        .json(&echo("x"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let events = app.events("deny-trace-0001").await;
    assert_eq!(types(&events), ["REQUEST_START", "DECISION", "REQUEST_END"]);
    assert_linked(&events);
    assert_eq!(events[1]["effect"], "deny");
    assert_eq!(events[1]["gate"], "auth");
    assert_eq!(events[1]["reason_codes"], json!(["AUTH_MISSING_KEY"]));
    assert_eq!(events[2]["status"], 401);
    assert_chain_intact(&app).await;
}

#[tokio::test]
async fn when_the_audit_store_cannot_write_nothing_executes_and_ready_fails_until_it_recovers() {
    let app = spawn_app().await;
    let key = app.admin_key().await;
    let counted = json!({"action": "test.counted", "context_id": "work", "payload": {}});
    assert_eq!(app.process(Some(&key), &counted).await.status(), 200);
    assert_eq!(app.calls.count(), 1);

    // Make the store refuse audit inserts, as a full disk or a read-only file would.
    let mut conn = sqlx::SqliteConnection::connect(&app.db_url())
        .await
        .unwrap();
    sqlx::query(
        "CREATE TRIGGER test_store_full BEFORE INSERT ON audit_events \
         BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END",
    )
    .execute(&mut conn)
    .await
    .unwrap();

    let (status, body) = reasons(app.process(Some(&key), &counted).await).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["reason_codes"], json!(["AUDIT_UNAVAILABLE"]));
    assert_eq!(app.calls.count(), 1, "the executor did not run");
    let (status, _) = reasons(app.process(None, &counted).await).await;
    assert_eq!(
        status, 503,
        "a refusal that cannot be recorded is not sent either"
    );
    assert_eq!(
        app.client
            .get(app.url("/ready"))
            .send()
            .await
            .unwrap()
            .status(),
        503
    );
    let metrics = app.get_text("/metrics").await;
    assert!(
        metrics.contains("catraca_audit_write_failures_total 2"),
        "{metrics}"
    );

    sqlx::query("DROP TRIGGER test_store_full")
        .execute(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        app.client
            .get(app.url("/ready"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(app.process(Some(&key), &counted).await.status(), 200);
    assert_eq!(app.calls.count(), 2);
    assert_chain_intact(&app).await;
}

#[tokio::test]
async fn the_audit_table_rejects_update_and_delete() {
    let app = spawn_app().await;
    let mut conn = sqlx::SqliteConnection::connect(&app.db_url())
        .await
        .unwrap();
    let update = sqlx::query("UPDATE audit_events SET body = '{}'")
        .execute(&mut conn)
        .await
        .unwrap_err();
    assert!(update.to_string().contains("append-only"), "{update}");
    let delete = sqlx::query("DELETE FROM audit_events")
        .execute(&mut conn)
        .await
        .unwrap_err();
    assert!(delete.to_string().contains("append-only"), "{delete}");
}

#[tokio::test]
async fn no_key_secret_reaches_the_database_the_files_or_the_logs() {
    let app = spawn_app().await;
    let key = app.admin_key().await;
    let secret = key.rsplit('_').next().unwrap().to_owned();
    assert_eq!(app.process(Some(&key), &echo("x")).await.status(), 200);
    let wrong = format!("{}{}", &key[..key.len() - 4], "ffff");
    let wrong_secret = wrong.rsplit('_').next().unwrap().to_owned();
    assert_eq!(app.process(Some(&wrong), &echo("x")).await.status(), 401);
    let dir = app.stop().await;

    let mut haystacks: Vec<(String, Vec<u8>)> = vec![("logs".into(), captured_logs().into_bytes())];
    for entry in walk(dir.path()) {
        // SQLite's -wal and -shm files may disappear as the last connection closes.
        if let Ok(bytes) = std::fs::read(&entry) {
            haystacks.push((entry.display().to_string(), bytes));
        }
    }
    assert!(
        haystacks.iter().any(|(p, _)| p.ends_with(".jsonl")),
        "audit files exist"
    );
    for (place, bytes) in &haystacks {
        let text = String::from_utf8_lossy(bytes);
        assert!(!text.contains(&secret), "the secret is in {place}");
        assert!(
            !text.contains(&wrong_secret),
            "a presented secret is in {place}"
        );
    }
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let p = entry.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[tokio::test]
async fn the_json_lines_files_hold_the_same_events_as_the_database() {
    let app = spawn_app().await;
    let key = app.admin_key().await;
    for i in 0..5 {
        app.process(Some(&key), &echo(&format!("m{i}"))).await;
        app.process(None, &echo("x")).await;
    }
    let store = app.app.store.clone();
    let mut in_db = BTreeSet::new();
    for chain in store.chains().await.unwrap() {
        for e in store
            .chain_events(&chain.chain_id, 0, 1_000_000)
            .await
            .unwrap()
        {
            in_db.insert(e.to_json().to_string());
        }
    }
    let dir = app.stop().await;
    let mut in_files = BTreeSet::new();
    for path in walk(&dir.path().join("audit")) {
        for line in std::fs::read_to_string(path).unwrap().lines() {
            let v: Value = serde_json::from_str(line).unwrap();
            in_files.insert(v.to_string());
        }
    }
    assert!(in_db.len() > 30);
    assert_eq!(in_db, in_files);
}

#[tokio::test]
async fn the_trace_route_serves_auditors_only() {
    let app = spawn_app().await;
    let admin = app.admin_key().await;
    let auditor = app.role_key("auditor").await;
    let analyst = app.role_key("analyst").await;
    let resp = app.process(Some(&admin), &echo("x")).await;
    let trace = resp.headers()["x-trace-id"].to_str().unwrap().to_owned();
    let get = |key: String, t: String| {
        let req = app
            .client
            .get(app.url(&format!("/v1/audit/traces/{t}")))
            .header("x-api-key", key);
        async move { req.send().await.unwrap() }
    };

    let resp = get(auditor.clone(), trace.clone()).await;
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(types(body["events"].as_array().unwrap()).len(), 5);

    let (status, body) = reasons(get(analyst, trace.clone()).await).await;
    assert_eq!(
        (status, body["reason_codes"][0].as_str()),
        (403, Some("NO_MATCHING_RULE"))
    );

    let (status, _) = reasons(get(auditor, "no-such-trace-123".into()).await).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn a_broken_policy_edit_in_dev_is_rejected_and_the_old_policy_keeps_serving() {
    let app = crate::helpers::spawn_app_with(|c| c.mode = catraca::config::Mode::Dev).await;
    let key = app.admin_key().await;
    let before = app.app.policy().revision.clone();
    let file = app.app.config.policies_dir.join("zz-broken.toml");
    std::fs::write(&file, "[[rules]]\nid = \"x\"\neffect = \"maybe\"\n").unwrap();

    let rejected = wait_for_event(&app, "POLICY_REJECTED").await;
    assert!(
        rejected["error"]
            .as_str()
            .unwrap()
            .contains("zz-broken.toml"),
        "{rejected}"
    );
    assert_eq!(rejected["serving_revision"], before.as_str());
    let resp = app.process(Some(&key), &echo("x")).await;
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["policy_revision"], before.as_str());

    std::fs::write(&file, "# fixed\n").unwrap();
    let loaded = wait_for_event(&app, "POLICY_LOADED\",\"files").await;
    assert_ne!(loaded["policy_revision"], before.as_str());
    assert_eq!(loaded["trigger"], "reload");
    assert_eq!(
        app.app.policy().revision,
        loaded["policy_revision"].as_str().unwrap()
    );
}

/// Polls the chain (bounded: 10 s) for the newest event whose stored bytes contain `needle`.
async fn wait_for_event(app: &crate::helpers::TestApp, needle: &str) -> Value {
    let chain = app.app.audit.chain_id().to_owned();
    for _ in 0..100 {
        let events = app
            .app
            .store
            .chain_events(&chain, 0, 100_000)
            .await
            .unwrap();
        if let Some(e) = events
            .iter()
            .rev()
            .find(|e| e.body.contains(needle) && !e.body.contains("\"trigger\":\"start\""))
        {
            return e.to_json();
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("no event containing {needle} within 10 s");
}
