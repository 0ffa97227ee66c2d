//! The audit trail as the request path writes it: events, order, chain links, fail-closed behaviour.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use catraca::audit::verify::verify_store;
use catraca::audit::{SealedEvent, chain_hash};
use serde_json::{Value, json};
use sqlx::Connection;

use crate::helpers::{
    TestApp, captured_logs, echo, event_types as types, reasons, spawn_app, spawn_app_with,
};

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

async fn assert_chain_intact(app: &TestApp) {
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

/// `GET /ready`: status and body.
async fn ready(app: &TestApp) -> (u16, Value) {
    let resp = app.client.get(app.url("/ready")).send().await.unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap())
}

const FULL_STORY: [&str; 5] = [
    "REQUEST_START",
    "DECISION",
    "EXECUTOR_SELECTED",
    "ACTION_EXECUTED",
    "REQUEST_END",
];

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

    assert_eq!(types(&events), FULL_STORY);
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
    let (status, healthy) = ready(&app).await;
    assert_eq!(status, 200, "{healthy}");

    // Make the store refuse audit inserts, as a full disk or a read-only file would.
    let mut conn = sqlx::SqliteConnection::connect(&app.db_url())
        .await
        .unwrap();
    sqlx::query(
        "CREATE TRIGGER test_store_full BEFORE INSERT ON audit_runs \
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
    let (status, unready) = ready(&app).await;
    assert_eq!(status, 503, "{unready}");
    assert_ne!(
        unready["checks"]["audit"], healthy["checks"]["audit"],
        "the body names the audit as the failing part: {unready}"
    );
    assert_eq!(
        unready["checks"]["database"], healthy["checks"]["database"],
        "the database still answers: {unready}"
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
    assert_eq!(ready(&app).await, (200, healthy));
    assert_eq!(app.process(Some(&key), &counted).await.status(), 200);
    assert_eq!(app.calls.count(), 2);
    assert_chain_intact(&app).await;
}

#[tokio::test]
async fn the_audit_table_rejects_update_and_delete() {
    let app = spawn_app().await;
    // A request, so that every table of the trail has rows for the triggers to guard.
    assert_eq!(app.process(None, &echo("x")).await.status(), 401);
    let mut conn = sqlx::SqliteConnection::connect(&app.db_url())
        .await
        .unwrap();
    for statement in [
        "UPDATE audit_runs SET bodies = '{}'",
        "DELETE FROM audit_runs",
        "UPDATE audit_run_traces SET pos = 0",
        "DELETE FROM audit_run_traces",
        "UPDATE audit_chains SET chain_id = 'x'",
        "DELETE FROM audit_chains",
    ] {
        let refused = sqlx::query(statement).execute(&mut conn).await.unwrap_err();
        assert!(
            refused.to_string().contains("append-only"),
            "{statement}: {refused}"
        );
    }
}

#[tokio::test]
async fn a_stopped_gateway_has_closed_its_database_and_folded_its_log_back_in() {
    let app = spawn_app().await;
    let key = app.admin_key().await;
    assert_eq!(app.process(Some(&key), &echo("x")).await.status(), 200);
    let dir = app.stop().await;
    // SQLite removes the write-ahead log when the last connection closes: none may outlive the
    // gateway (a backup or a copy of the file taken next must be the whole database).
    let wal = dir.path().join("catraca.db-wal");
    assert!(
        !wal.exists(),
        "{} is still there: a connection outlived the gateway",
        wal.display()
    );
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
    let mut in_db: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for chain in store.chains().await.unwrap() {
        let events = store
            .chain_events(&chain.chain_id, 0, 1_000_000)
            .await
            .unwrap();
        in_db.insert(
            chain.chain_id,
            events.iter().map(SealedEvent::to_json).collect(),
        );
    }
    let dir = app.stop().await;
    // Daily files, oldest first; within a chain, lines must follow the chain's order, each exactly once.
    // The trail's files (the checkpoints file beside them is not one).
    let mut files = walk(&dir.path().join("audit"));
    files.retain(|p| {
        p.file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("audit.")
    });
    files.sort();
    let mut in_files: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for path in files {
        for line in std::fs::read_to_string(path).unwrap().lines() {
            let v: Value = serde_json::from_str(line).unwrap();
            in_files
                .entry(v["chain_id"].as_str().unwrap().to_owned())
                .or_default()
                .push(v);
        }
    }
    assert!(in_db.values().map(Vec::len).sum::<usize>() > 30);
    assert_eq!(
        in_db.keys().collect::<Vec<_>>(),
        in_files.keys().collect::<Vec<_>>(),
        "the same chains"
    );
    for (chain, events) in &in_db {
        let lines = &in_files[chain];
        let first_difference = events.iter().zip(lines).position(|(a, b)| a != b);
        assert!(
            events.len() == lines.len() && first_difference.is_none(),
            "chain {chain}: {} events in the database, {} lines in the files, first difference at {first_difference:?}",
            events.len(),
            lines.len()
        );
    }
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

#[tokio::test]
async fn reading_a_trace_is_itself_audited_for_the_reader() {
    let app = spawn_app().await;
    let admin = app.admin_key().await;
    let auditor = app.role_key("auditor").await;
    let analyst = app.role_key("analyst").await;
    let resp = app.process(Some(&admin), &echo("x")).await;
    let wanted = resp.headers()["x-trace-id"].to_str().unwrap().to_owned();
    let read = |key: &str, trace: &str| {
        app.client
            .get(app.url(&format!("/v1/audit/traces/{wanted}")))
            .header("x-api-key", key)
            .header("x-trace-id", trace)
            .send()
    };

    assert_eq!(
        read(&auditor, "audit-read-allowed").await.unwrap().status(),
        200
    );
    assert_eq!(
        read(&analyst, "audit-read-refused").await.unwrap().status(),
        403
    );

    let allowed = app.events("audit-read-allowed").await;
    assert_eq!(
        types(&allowed),
        ["REQUEST_START", "DECISION", "REQUEST_END"]
    );
    assert_linked(&allowed);
    assert!(
        allowed[0]["route"]
            .as_str()
            .unwrap()
            .starts_with("/v1/audit/traces/"),
        "{}",
        allowed[0]
    );
    assert_eq!(allowed[1]["effect"], "allow");
    assert_eq!(allowed[1]["action"], "audit.read");
    assert_eq!(allowed[1]["principal"]["role"], "auditor");
    assert_eq!(
        allowed[1]["principal"]["key_id"],
        auditor.split('_').nth(1).unwrap()
    );
    assert_eq!(allowed[2]["status"], 200);
    let refused = app.events("audit-read-refused").await;
    assert_eq!(
        types(&refused),
        ["REQUEST_START", "DECISION", "REQUEST_END"]
    );
    assert_eq!(refused[1]["effect"], "deny");
    assert_eq!(refused[1]["principal"]["role"], "analyst");
    assert_eq!(refused[2]["status"], 403);
}

#[tokio::test]
async fn when_the_outcome_cannot_be_recorded_after_the_executor_ran_the_client_gets_503_not_the_result()
 {
    let app = spawn_app().await;
    let key = app.admin_key().await;
    let counted = json!({"action": "test.counted", "context_id": "work", "payload": {}});
    // The executor is held inside its run; meanwhile the store starts refusing every event, as if the
    // disk filled up while the action ran.
    app.calls.hold();
    let request = app
        .client
        .post(app.url("/process"))
        .header("x-api-key", &key)
        .header("x-trace-id", "outcome-lost-0001")
        .json(&counted)
        .send();
    let request = tokio::spawn(request);
    let deadline = Instant::now() + Duration::from_secs(10);
    while app.calls.count() == 0 {
        assert!(Instant::now() < deadline, "the executor never ran");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut conn = sqlx::SqliteConnection::connect(&app.db_url())
        .await
        .unwrap();
    sqlx::query(
        "CREATE TRIGGER test_outcome_refused BEFORE INSERT ON audit_runs \
         BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    app.calls.release();
    let resp = request.await.unwrap().unwrap();

    let retry_after = resp.headers().get("retry-after").cloned();
    let (status, body) = reasons(resp).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"], "SERVICE_UNAVAILABLE");
    assert_eq!(body["gate"], "audit");
    assert_eq!(body["reason_codes"], json!(["AUDIT_UNAVAILABLE"]));
    assert_retry_after(retry_after.as_ref());
    assert!(body.get("result").is_none(), "no result leaves: {body}");
    assert_eq!(app.calls.count(), 1, "the executor did run");
    let message = body["message"].as_str().unwrap();
    assert!(
        !message.contains("nothing was executed") && message.contains("ran"),
        "a client must not be told an action that ran did not: {message}"
    );
    let events = app.events("outcome-lost-0001").await;
    assert_eq!(
        types(&events)[..3],
        ["REQUEST_START", "DECISION", "EXECUTOR_SELECTED"],
        "the ALLOW was durable before the executor ran"
    );
    assert!(
        !events
            .iter()
            .any(|e| e["event_type"] == "ACTION_EXECUTED" || e["status"] == 200),
        "nothing in the trail says this request succeeded: {events:?}"
    );

    sqlx::query("DROP TRIGGER test_outcome_refused")
        .execute(&mut conn)
        .await
        .unwrap();
    assert_eq!(app.process(Some(&key), &counted).await.status(), 200);
    assert_chain_intact(&app).await;
}

/// `Retry-After` as the README gives it for a 503 from the audit: 5 seconds.
fn assert_retry_after(value: Option<&reqwest::header::HeaderValue>) {
    let value = value.expect("a 503 from the audit carries Retry-After");
    assert_eq!(
        value.to_str().unwrap(),
        "5",
        "Retry-After of AUDIT_UNAVAILABLE"
    );
}

/// One answer to a request sent while the audit writer was blocked.
struct Answer {
    trace: String,
    status: u16,
    retry_after: Option<reqwest::header::HeaderValue>,
    body: Value,
    waited: Duration,
}

#[tokio::test]
async fn a_full_audit_queue_makes_requests_wait_then_503_and_drops_nothing_it_answered() {
    const CAPACITY: usize = 2;
    const REQUESTS: usize = 10;
    let app = spawn_app_with(|c| c.audit_queue_capacity = CAPACITY).await;
    let key = app.admin_key().await;
    let counted = json!({"action": "test.counted", "context_id": "work", "payload": {}});
    // Warm the key's verification so the requests below reach the audit at once.
    assert_eq!(app.process(Some(&key), &counted).await.status(), 200);

    // Another process holds SQLite's write lock: the writer blocks on its batch and the queue fills.
    let mut lock = sqlx::SqliteConnection::connect(&app.db_url())
        .await
        .unwrap();
    sqlx::query("BEGIN EXCLUSIVE")
        .execute(&mut lock)
        .await
        .unwrap();
    let (tx, mut answers) = tokio::sync::mpsc::unbounded_channel();
    for i in 0..REQUESTS {
        let request = app
            .client
            .post(app.url("/process"))
            .header("x-api-key", &key)
            .header("x-trace-id", format!("queue-full-{i:04}"))
            .json(&counted);
        let tx = tx.clone();
        tokio::spawn(async move {
            let sent = Instant::now();
            let resp = request.send().await.unwrap();
            let waited = sent.elapsed();
            let trace = resp.headers()["x-trace-id"].to_str().unwrap().to_owned();
            let status = resp.status().as_u16();
            let retry_after = resp.headers().get("retry-after").cloned();
            let body = resp.json().await.unwrap();
            let _ = tx.send(Answer {
                trace,
                status,
                retry_after,
                body,
                waited,
            });
        });
    }
    drop(tx);
    let full = format!("catraca_audit_queue_depth {CAPACITY}\n");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !app.get_text("/metrics").await.contains(&full) {
        assert!(Instant::now() < deadline, "the audit queue never filled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Hold the lock until the first answer, then let the writer go on.
    let first = tokio::time::timeout(Duration::from_secs(60), answers.recv())
        .await
        .expect("an answer while the queue is full")
        .unwrap();
    sqlx::query("ROLLBACK").execute(&mut lock).await.unwrap();
    let mut all = vec![first];
    while let Some(answer) = tokio::time::timeout(Duration::from_secs(60), answers.recv())
        .await
        .expect("every request is answered")
    {
        all.push(answer);
    }

    assert_eq!(all.len(), REQUESTS);
    let refused: Vec<&Answer> = all.iter().filter(|a| a.status == 503).collect();
    let served: Vec<&Answer> = all.iter().filter(|a| a.status == 200).collect();
    assert_eq!(refused.len() + served.len(), REQUESTS, "only 200 or 503");
    assert!(!refused.is_empty(), "the full queue pushed back");
    assert!(
        !served.is_empty(),
        "requests queued when the lock went were served"
    );
    for a in &refused {
        assert_eq!(
            a.body["reason_codes"],
            json!(["AUDIT_UNAVAILABLE"]),
            "{}",
            a.body
        );
        assert_retry_after(a.retry_after.as_ref());
        assert!(
            a.waited >= Duration::from_secs(1),
            "{} was refused after {:?}: requests wait for room before failing",
            a.trace,
            a.waited
        );
        let events = app.events(&a.trace).await;
        assert!(
            !events.iter().any(|e| e["event_type"] == "ACTION_EXECUTED"),
            "{} was refused but executed",
            a.trace
        );
    }
    for a in &served {
        assert_eq!(
            types(&app.events(&a.trace).await),
            FULL_STORY,
            "{}",
            a.trace
        );
    }
    assert_eq!(
        app.calls.count(),
        1 + served.len(),
        "the executor ran for the served requests only"
    );
    let report = verify_store(app.app.store.as_ref(), |_| {}).await.unwrap();
    assert_eq!(report.finding, None);
}
