//! Every gate's refusals: status, body, reason code and headers; and the executor outcomes after ALLOW.

use serde_json::{Value, json};

use crate::helpers::{KeySpec, echo, reasons, spawn_app};

fn assert_denial(status: u16, body: &Value, want_status: u16, gate: &str, code: &str) {
    assert_eq!(status, want_status, "{body}");
    assert_eq!(body["error"], "GATE_DENIED", "{body}");
    assert_eq!(body["gate"], gate, "{body}");
    assert_eq!(body["reason_codes"], json!([code]), "{body}");
    assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));
    assert_eq!(body["trace_id"].as_str().unwrap().len(), 32, "{body}");
    assert!(body["decision_id"].as_str().is_some(), "{body}");
}

#[tokio::test]
async fn an_allowed_echo_returns_the_action_result() {
    let app = spawn_app().await;
    let key = app.admin_key().await;

    let resp = app.process(Some(&key), &echo("olá")).await;

    assert_eq!(resp.status(), 200);
    let trace = resp.headers()["x-trace-id"].to_str().unwrap().to_owned();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["status"], "SUCCESS");
    assert_eq!(body["trace_id"], trace.as_str());
    assert_eq!(body["action"], "echo");
    assert_eq!(body["executor_id"], "echo");
    assert_eq!(body["result"], json!({"message": "olá"}));
    assert_eq!(body["policy_revision"], app.app.policy().revision.as_str());
    assert!(body["execution_time_ms"].as_f64().is_some());
}

#[tokio::test]
async fn a_missing_key_is_refused_with_www_authenticate() {
    let app = spawn_app().await;
    let resp = app.process(None, &echo("x")).await;
    assert!(resp.headers().contains_key("www-authenticate"));
    let (status, body) = reasons(resp).await;
    assert_denial(status, &body, 401, "auth", "AUTH_MISSING_KEY");
}

#[tokio::test]
async fn malformed_unknown_and_wrong_keys_are_invalid() {
    let app = spawn_app().await;
    let good = app.admin_key().await;
    let wrong_secret = format!(
        "{}{}",
        &good[..good.len() - 1],
        if good.ends_with('0') { '1' } else { '0' }
    );
    for key in [
        "not-a-key".to_owned(),
        format!("ck_0123456789abcdef_{}", "a".repeat(64)),
        wrong_secret,
    ] {
        let (status, body) = reasons(app.process(Some(&key), &echo("x")).await).await;
        assert_denial(status, &body, 401, "auth", "AUTH_INVALID_KEY");
    }
    // Bearer works as well as X-API-Key.
    let resp = app
        .client
        .post(app.url("/process"))
        .bearer_auth(&good)
        .json(&echo("x"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn a_burst_meets_429_with_retry_after() {
    let app = spawn_app().await;
    let key = app
        .key(KeySpec {
            tier: "standard",
            ..KeySpec::default()
        })
        .await;
    let mut limited = None;
    // The standard tier allows a burst of 10; 30 back-to-back requests must cross it.
    for _ in 0..30 {
        let resp = app.process(Some(&key), &echo("x")).await;
        if resp.status() == 429 {
            limited = Some(resp);
            break;
        }
        assert_eq!(resp.status(), 200);
    }
    let resp = limited.expect("the burst was never limited");
    let retry: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry >= 1);
    let (status, body) = reasons(resp).await;
    assert_denial(status, &body, 429, "rate_limit", "RATE_LIMITED");
}

#[tokio::test]
async fn an_unlimited_key_still_passes_the_rate_gate_and_is_audited() {
    let app = spawn_app().await;
    let key = app.admin_key().await;
    for _ in 0..40 {
        assert_eq!(app.process(Some(&key), &echo("x")).await.status(), 200);
    }
    let resp = app.process(Some(&key), &echo("x")).await;
    let trace = resp.headers()["x-trace-id"].to_str().unwrap().to_owned();
    let events = app.events(&trace).await;
    let decision = events
        .iter()
        .find(|e| e["event_type"] == "DECISION")
        .unwrap();
    assert_eq!(decision["gates"][1]["gate"], "rate_limit");
    assert_eq!(decision["gates"][1]["verdict"], "allow");
    assert_eq!(decision["principal"]["tier"], "unlimited");
}

#[tokio::test]
async fn an_oversized_body_is_refused_with_413() {
    let app = spawn_app().await;
    let key = app.admin_key().await;
    let big = "x".repeat(1024 * 1024 + 1);
    let (status, body) = reasons(app.process(Some(&key), &echo(&big)).await).await;
    assert_denial(status, &body, 413, "input", "INPUT_TOO_LARGE");
}

#[tokio::test]
async fn malformed_json_is_refused_with_400() {
    let app = spawn_app().await;
    let key = app.admin_key().await;
    let (status, body) = reasons(app.process_raw(Some(&key), "{not json").await).await;
    assert_denial(status, &body, 400, "input", "INPUT_MALFORMED_JSON");
}

#[tokio::test]
async fn unknown_actions_and_contexts_are_refused_with_400() {
    let app = spawn_app().await;
    let key = app.admin_key().await;
    let body = json!({"action": "licitacoes.delete", "context_id": "work", "payload": {}});
    let (status, b) = reasons(app.process(Some(&key), &body).await).await;
    assert_denial(status, &b, 400, "input", "ACTION_UNKNOWN");
    // A permission-only action is not something /process runs.
    let body = json!({"action": "audit.read", "context_id": "work", "payload": {}});
    let (status, b) = reasons(app.process(Some(&key), &body).await).await;
    assert_denial(status, &b, 400, "input", "ACTION_UNKNOWN");
    let body = json!({"action": "echo", "context_id": "home", "payload": {"message": "x"}});
    let (status, b) = reasons(app.process(Some(&key), &body).await).await;
    assert_denial(status, &b, 400, "input", "CONTEXT_UNKNOWN");
}

#[tokio::test]
async fn a_schema_error_names_its_pointer() {
    let app = spawn_app().await;
    let key = app.admin_key().await;
    let body = json!({"action": "echo", "context_id": "work", "payload": {"message": 42}});
    let (status, b) = reasons(app.process(Some(&key), &body).await).await;
    assert_denial(status, &b, 422, "input", "INPUT_SCHEMA_INVALID");
    assert_eq!(b["violations"][0]["pointer"], "/payload/message", "{b}");
    // The envelope itself is checked too.
    let (status, b) = reasons(
        app.process(Some(&key), &json!({"context_id": "work"}))
            .await,
    )
    .await;
    assert_denial(status, &b, 422, "input", "INPUT_SCHEMA_INVALID");
    assert_eq!(b["violations"][0]["pointer"], "/action", "{b}");
}

#[tokio::test]
async fn nothing_allowed_means_denied_by_default() {
    let app = spawn_app().await;
    let analyst = app.role_key("analyst").await;
    let body = json!({"action": "licitacoes.collect", "context_id": "work", "payload": {
        "source": "pncp", "endpoint": "publicacao", "data_inicial": "2026-01-01",
        "data_final": "2026-01-02", "modalidade": 6}});
    let (status, b) = reasons(app.process(Some(&analyst), &body).await).await;
    assert_denial(status, &b, 403, "action_matrix", "NO_MATCHING_RULE");
}

#[tokio::test]
async fn deny_overrides_allow_and_the_decision_names_the_rule() {
    // The summariser echoes here: this test is about the matrix, not the model.
    let app = crate::helpers::spawn_app_with(|c| {
        std::fs::write(
            c.executors_dir.join("summarizer.toml"),
            "name = \"summarizer\"\nkind = \"echo\"\n",
        )
        .unwrap();
    })
    .await;
    let admin = app.admin_key().await;
    let body = json!({"action": "licitacoes.summarize", "context_id": "partner", "payload": {"text": "t"}});
    let resp = app.process(Some(&admin), &body).await;
    let trace = resp.headers()["x-trace-id"].to_str().unwrap().to_owned();
    let (status, b) = reasons(resp).await;
    assert_denial(status, &b, 403, "action_matrix", "CONTEXT_FORBIDDEN");
    let events = app.events(&trace).await;
    let decision = events
        .iter()
        .find(|e| e["event_type"] == "DECISION")
        .unwrap();
    assert_eq!(decision["determining_rules"], json!(["partner-echo-only"]));
    // The same admin is allowed in work: the allow rule is real, the deny overrode it.
    let body =
        json!({"action": "licitacoes.summarize", "context_id": "work", "payload": {"text": "t"}});
    assert_eq!(app.process(Some(&admin), &body).await.status(), 200);
}

#[tokio::test]
async fn a_deny_rule_without_its_own_code_says_action_forbidden() {
    let app = spawn_app().await;
    let admin = app.admin_key().await;
    let body = json!({"action": "test.forbidden", "context_id": "work", "payload": {}});
    let (status, b) = reasons(app.process(Some(&admin), &body).await).await;
    assert_denial(status, &b, 403, "action_matrix", "ACTION_FORBIDDEN");
}

#[tokio::test]
async fn a_rule_s_own_reason_code_and_an_evaluation_error_both_deny() {
    let app = spawn_app().await;
    let admin = app.admin_key().await;
    let body = json!({"action": "test.eval", "context_id": "work", "payload": {"n": 11}});
    let (status, b) = reasons(app.process(Some(&admin), &body).await).await;
    assert_denial(status, &b, 403, "action_matrix", "N_TOO_LARGE");
    let body = json!({"action": "test.eval", "context_id": "work", "payload": {"n": 3}});
    assert_eq!(app.process(Some(&admin), &body).await.status(), 200);
    // A string where the rule compares numbers cannot be evaluated: denied, never allowed.
    let body = json!({"action": "test.eval", "context_id": "work", "payload": {"n": "eleven"}});
    let (status, b) = reasons(app.process(Some(&admin), &body).await).await;
    assert_denial(status, &b, 403, "action_matrix", "POLICY_EVAL_ERROR");
}

#[tokio::test]
async fn a_key_limited_to_one_context_is_refused_in_another() {
    let app = spawn_app().await;
    let key = app
        .key(KeySpec {
            contexts: &["partner"],
            ..KeySpec::default()
        })
        .await;
    let (status, b) = reasons(app.process(Some(&key), &echo("x")).await).await;
    assert_denial(status, &b, 403, "action_matrix", "CONTEXT_FORBIDDEN");
    let partner = json!({"action": "echo", "context_id": "partner", "payload": {"message": "x"}});
    assert_eq!(app.process(Some(&key), &partner).await.status(), 200);
}

#[tokio::test]
async fn an_executor_failure_is_a_502_and_a_timeout_a_504() {
    let app = spawn_app().await;
    let key = app.admin_key().await;

    let body = json!({"action": "test.broken", "context_id": "work", "payload": {}});
    let (status, b) = reasons(app.process(Some(&key), &body).await).await;
    assert_eq!(status, 502, "{b}");
    assert_eq!(b["error"], "EXECUTION_FAILED");
    assert_eq!(b["reason_codes"], json!(["EXECUTOR_FAILED"]));
    assert_eq!(b["executor_id"], "broken");
    assert!(
        b["message"]
            .as_str()
            .unwrap()
            .contains("upstream answered 500")
    );
    assert_eq!(app.calls.count(), 1);

    // The example echo executor times out after 1 s; this payload asks it to take 3 s.
    let body = json!({"action": "echo", "context_id": "work", "payload": {"message": "slow", "delay_ms": 3000}});
    let resp = app.process(Some(&key), &body).await;
    let trace = resp.headers()["x-trace-id"].to_str().unwrap().to_owned();
    let (status, b) = reasons(resp).await;
    assert_eq!(status, 504, "{b}");
    assert_eq!(b["reason_codes"], json!(["EXECUTOR_TIMEOUT"]));
    let events = app.events(&trace).await;
    let executed = events
        .iter()
        .find(|e| e["event_type"] == "ACTION_EXECUTED")
        .unwrap();
    assert_eq!(executed["status"], "timeout");
    let end = events.last().unwrap();
    assert_eq!(end["event_type"], "REQUEST_END");
    assert_eq!(end["status"], 504);
}

#[tokio::test]
async fn an_unreachable_shared_limiter_fails_closed_unless_configured_open() {
    // Nothing listens on port 1 of the loopback: the shared limiter is really unreachable.
    let closed = |c: &mut catraca::config::Config| {
        c.redis_url = Some(catraca::config::DatabaseUrl::new("redis://127.0.0.1:1"))
    };
    let app = crate::helpers::spawn_app_with(closed).await;
    let key = app
        .key(KeySpec {
            tier: "standard",
            ..KeySpec::default()
        })
        .await;
    let resp = app.process(Some(&key), &echo("x")).await;
    assert!(resp.headers().contains_key("retry-after"));
    let (status, body) = reasons(resp).await;
    assert_denial(status, &body, 503, "rate_limit", "RATE_LIMIT_UNAVAILABLE");

    let app = crate::helpers::spawn_app_with(|c| {
        closed(c);
        c.rate_limit_fail_open = true;
    })
    .await;
    let key = app
        .key(KeySpec {
            tier: "standard",
            ..KeySpec::default()
        })
        .await;
    assert_eq!(app.process(Some(&key), &echo("x")).await.status(), 200);
}

#[tokio::test]
#[ignore = "needs Redis at CATRACA_TEST_REDIS_URL"]
async fn two_gateways_sharing_redis_share_one_quota() {
    let redis = std::env::var("CATRACA_TEST_REDIS_URL")
        .expect("CATRACA_TEST_REDIS_URL must name a Redis server for this test");
    let with_redis = |c: &mut catraca::config::Config| {
        c.redis_url = Some(catraca::config::DatabaseUrl::new(redis.clone()))
    };
    let first = crate::helpers::spawn_app_with(with_redis).await;
    let db = first.db_url();
    let second = crate::helpers::spawn_app_with(|c| {
        with_redis(c);
        c.database_url = catraca::config::DatabaseUrl::new(db.clone());
    })
    .await;
    let key = first
        .key(KeySpec {
            tier: "standard",
            ..KeySpec::default()
        })
        .await;
    // The standard tier allows a burst of 10. Eight requests to each instance stay under it locally,
    // so only a shared quota can refuse any of them.
    let mut statuses = Vec::new();
    for _ in 0..8 {
        statuses.push(
            first
                .process(Some(&key), &echo("x"))
                .await
                .status()
                .as_u16(),
        );
        statuses.push(
            second
                .process(Some(&key), &echo("x"))
                .await
                .status()
                .as_u16(),
        );
    }
    let allowed = statuses.iter().filter(|s| **s == 200).count();
    let limited = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!(allowed + limited, 16, "{statuses:?}");
    assert!(
        (10..=11).contains(&allowed),
        "one quota of burst 10 for both: {statuses:?}"
    );
}
