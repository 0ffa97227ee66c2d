//! Every gate's refusals: status, body, reason code and headers; and the executor outcomes after ALLOW.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::helpers::{KeySpec, echo, reasons, spawn_app, spawn_app_with};
use crate::prom::sample;

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

/// The example policy's quota for `tier`: `(per_second, burst)`, read from the shipped policy file.
fn example_tier(tier: &str) -> (u32, u32) {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/policies/catraca.toml"
    ))
    .unwrap();
    let policy: toml::Table = text.parse().unwrap();
    let quota = &policy["tiers"][tier];
    let int = |field: &str| u32::try_from(quota[field].as_integer().unwrap()).unwrap();
    (int("per_second"), int("burst"))
}

/// `Retry-After` as whole seconds.
fn retry_after(resp: &reqwest::Response) -> u64 {
    resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

/// The one gate verdict of `gate` in a DECISION event.
fn verdict<'a>(decision: &'a Value, gate: &str) -> &'a Value {
    decision["gates"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["gate"] == gate)
        .unwrap_or_else(|| panic!("no {gate} verdict in {decision}"))
}

#[tokio::test]
async fn a_burst_beyond_the_tier_meets_429_with_retry_after_the_next_slot() {
    // Arrange: a key of the example policy's standard tier.
    let app = spawn_app().await;
    let key = app
        .key(KeySpec {
            tier: "standard",
            ..KeySpec::default()
        })
        .await;
    let (per_second, burst) = example_tier("standard");
    // Once the burst is spent, quota for one more request returns every 1/per_second s; Retry-After
    // is in whole seconds, rounded up so that waiting it is always enough.
    let next_slot = Duration::from_secs(1) / per_second;
    let want_retry_after = next_slot.as_secs() + u64::from(next_slot.subsec_nanos() > 0);

    // Act: back-to-back requests until one is limited.
    let started = Instant::now();
    let mut allowed = 0u32;
    let mut limited = None;
    for _ in 0..burst * 3 {
        let resp = app.process(Some(&key), &echo("x")).await;
        if resp.status() == 429 {
            limited = Some(resp);
            break;
        }
        assert_eq!(resp.status(), 200);
        allowed += 1;
    }
    let elapsed = started.elapsed();

    // Assert: the burst passed, no more than the quota refilled meanwhile, then 429 naming the wait.
    let resp = limited.expect("the burst was never limited");
    assert!(allowed >= burst, "only {allowed} of a burst of {burst}");
    let refilled = (elapsed.as_secs_f64() * f64::from(per_second)).ceil() as u32;
    assert!(
        allowed <= burst + refilled,
        "{allowed} allowed in {elapsed:?} with burst {burst} and {per_second}/s"
    );
    assert_eq!(retry_after(&resp), want_retry_after);
    let (status, body) = reasons(resp).await;
    assert_denial(status, &body, 429, "rate_limit", "RATE_LIMITED");

    // Waiting the advertised time is enough.
    tokio::time::sleep(Duration::from_secs(want_retry_after)).await;
    assert_eq!(app.process(Some(&key), &echo("x")).await.status(), 200);
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
    let decision = app.decision(&trace).await;
    assert_eq!(verdict(&decision, "rate_limit")["verdict"], "allow");
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
    let app = spawn_app_with(|c| {
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
    let decision = app.decision(&trace).await;
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

/// A shared limiter nobody answers for: nothing listens on port 1 of the loopback.
fn unreachable_redis(c: &mut catraca::config::Config) {
    c.redis_url = Some(catraca::config::DatabaseUrl::new("redis://127.0.0.1:1"));
}

fn counted() -> Value {
    json!({"action": "test.counted", "context_id": "work", "payload": {}})
}

#[tokio::test]
async fn an_unreachable_shared_limiter_fails_closed_and_nothing_runs() {
    // Arrange
    let app = spawn_app_with(unreachable_redis).await;
    let key = app
        .key(KeySpec {
            tier: "standard",
            ..KeySpec::default()
        })
        .await;

    // Act
    let resp = app.process(Some(&key), &counted()).await;

    // Assert: 503 with Retry-After, audited as a deny by the rate gate, and the executor never ran.
    let trace = resp.headers()["x-trace-id"].to_str().unwrap().to_owned();
    assert_eq!(
        retry_after(&resp),
        5,
        "the README's Retry-After for RATE_LIMIT_UNAVAILABLE"
    );
    let (status, body) = reasons(resp).await;
    assert_denial(status, &body, 503, "rate_limit", "RATE_LIMIT_UNAVAILABLE");
    assert_eq!(
        app.calls.count(),
        0,
        "the executor ran without a rate decision"
    );
    let decision = app.decision(&trace).await;
    assert_eq!(decision["effect"], "deny", "{decision}");
    assert_eq!(decision["gate"], "rate_limit", "{decision}");
    assert_eq!(
        decision["reason_codes"],
        json!(["RATE_LIMIT_UNAVAILABLE"]),
        "{decision}"
    );
    assert_eq!(verdict(&decision, "rate_limit")["verdict"], "deny");
}

#[tokio::test]
async fn an_unreachable_shared_limiter_configured_open_lets_the_request_run_and_audits_it() {
    // Arrange
    let app = spawn_app_with(|c| {
        unreachable_redis(c);
        c.rate_limit_fail_open = true;
    })
    .await;
    let key = app
        .key(KeySpec {
            tier: "standard",
            ..KeySpec::default()
        })
        .await;

    // Act
    let resp = app.process(Some(&key), &counted()).await;

    // Assert: allowed, executed once, and the DECISION says the rate gate let it through.
    assert_eq!(resp.status(), 200);
    let trace = resp.headers()["x-trace-id"].to_str().unwrap().to_owned();
    assert_eq!(app.calls.count(), 1);
    let decision = app.decision(&trace).await;
    assert_eq!(decision["effect"], "allow", "{decision}");
    assert_eq!(verdict(&decision, "rate_limit")["verdict"], "allow");
    let kinds: Vec<Value> = app
        .events(&trace)
        .await
        .iter()
        .map(|e| e["event_type"].clone())
        .collect();
    assert!(
        kinds.contains(&json!("ACTION_EXECUTED")),
        "the execution is audited: {kinds:?}"
    );
    let metrics = app.get_text("/metrics").await;
    assert_eq!(
        sample(
            &metrics,
            "catraca_gate_decisions_total",
            &[
                ("gate", "rate_limit"),
                ("decision", "allow"),
                ("reason", "none")
            ]
        ),
        Some(1.0),
        "{metrics}"
    );
}

/// A tier slow enough that its refill during the test stays well below the number of requests.
const TRICKLE_TIER: &str = "[tiers.trickle]\nper_second = 1\nburst = 10\n";

#[tokio::test]
#[ignore = "needs Redis at CATRACA_TEST_REDIS_URL"]
async fn two_gateways_sharing_redis_share_one_quota() {
    // Arrange: two gateways on one database and one Redis, and a key of a 1/s tier with a burst of 10.
    let redis = std::env::var("CATRACA_TEST_REDIS_URL")
        .expect("CATRACA_TEST_REDIS_URL must name a Redis server for this test");
    let with_redis = |c: &mut catraca::config::Config| {
        c.redis_url = Some(catraca::config::DatabaseUrl::new(redis.clone()));
        std::fs::write(c.policies_dir.join("zz-trickle.toml"), TRICKLE_TIER).unwrap();
    };
    let first = spawn_app_with(with_redis).await;
    let db = first.db_url();
    let second = spawn_app_with(|c| {
        with_redis(c);
        c.database_url = catraca::config::DatabaseUrl::new(db.clone());
    })
    .await;
    let key = first
        .key(KeySpec {
            tier: "trickle",
            ..KeySpec::default()
        })
        .await;
    let (burst, per_second) = (10, 1.0);

    // Act: twelve requests to each. Each instance alone would allow at least its burst of ten (20 in
    // all); one shared quota allows the burst plus what refills while the test runs.
    let started = Instant::now();
    let mut statuses = Vec::new();
    let mut retry_afters = Vec::new();
    for _ in 0..12 {
        for app in [&first, &second] {
            let resp = app.process(Some(&key), &echo("x")).await;
            if resp.status() == 429 {
                retry_afters.push(retry_after(&resp));
            }
            statuses.push(resp.status().as_u16());
        }
    }
    let elapsed = started.elapsed();

    // Assert
    let allowed = statuses.iter().filter(|s| **s == 200).count();
    let limited = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!(allowed + limited, 24, "{statuses:?}");
    let refilled = (elapsed.as_secs_f64() * per_second).ceil() as usize;
    assert!(
        (burst..=burst + refilled).contains(&allowed),
        "one quota of burst {burst} at 1/s for both over {elapsed:?}: {statuses:?}"
    );
    assert!(
        burst + refilled < 20,
        "the requests took {elapsed:?}: too slow to tell one shared quota from two"
    );
    // At 1/s the next slot is at most one second away.
    assert!(
        retry_afters.iter().all(|r| *r == 1),
        "Retry-After of a 1/s tier: {retry_afters:?}"
    );
}
