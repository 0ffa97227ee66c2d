//! The kill switch: an executor switched off by an operator is refused on every request within the
//! watch bound (503 EXECUTOR_DISABLED, nothing runs), switched on again the same way; every switch is
//! audited with who and why.

use std::time::{Duration, Instant};

use catraca::executors::switches;
use serde_json::{Value, json};

use crate::binary::Cli;
use crate::helpers::{TestApp, echo, event_types, reasons, spawn_app};

/// Sends `body` until the answer's status is `want`; no request sent later than `changed` + the bound
/// may get another status. Returns the answer's trace id and body.
async fn status_within_bound(
    app: &TestApp,
    key: &str,
    body: &Value,
    want: u16,
    changed: Instant,
) -> (String, Value) {
    let bound = app.app.auth.keys().bound();
    loop {
        let sent = changed.elapsed();
        let resp = app.process(Some(key), body).await;
        let trace = resp.headers()["x-trace-id"].to_str().unwrap().to_owned();
        let (status, answer) = reasons(resp).await;
        if status == want {
            return (trace, answer);
        }
        assert!(
            sent <= bound,
            "answered {status} to a request sent {sent:?} after the switch; the bound is {bound:?}: {answer}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The EXECUTOR_SWITCHED events in the whole trail.
async fn switch_events(app: &TestApp) -> Vec<Value> {
    let mut out = vec![];
    for chain in app.app.store.chains().await.unwrap() {
        for e in app
            .app
            .store
            .chain_events(&chain.chain_id, 0, 10_000)
            .await
            .unwrap()
        {
            if e.event_type == "EXECUTOR_SWITCHED" {
                out.push(e.to_json());
            }
        }
    }
    out
}

#[tokio::test]
async fn an_executor_disabled_from_the_cli_is_refused_within_the_bound_then_enabled_again() {
    // Arrange
    let app = spawn_app().await;
    let key = app.admin_key().await;
    assert_eq!(app.process(Some(&key), &echo("x")).await.status(), 200);
    let cli = Cli::for_app(&app);

    // Act: the operator switches echo off.
    cli.run(&["executors", "disable", "echo", "--reason", "incident 42"]);
    let disabled = Instant::now();

    // Assert: refused within the bound, 503 EXECUTOR_DISABLED with the reason, recorded as a DENY and
    // with no ALLOW or execution in the request's story.
    let (trace, body) = status_within_bound(&app, &key, &echo("x"), 503, disabled).await;
    let resp = app.process(Some(&key), &echo("x")).await;
    assert_eq!(
        resp.headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap()),
        Some("60"),
        "a refused client is told when to ask again"
    );
    assert_eq!(body["reason_codes"], json!(["EXECUTOR_DISABLED"]), "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("incident 42"),
        "{body}"
    );
    let story: Vec<Value> = app
        .events(&trace)
        .await
        .iter()
        .map(|e| e["event_type"].clone())
        .collect();
    assert_eq!(
        story,
        json!(["REQUEST_START", "DECISION", "REQUEST_END"])
            .as_array()
            .unwrap()
            .clone()
    );
    let decision = app.decision(&trace).await;
    assert_eq!(decision["effect"], "deny", "{decision}");
    assert_eq!(
        decision["reason_codes"],
        json!(["EXECUTOR_DISABLED"]),
        "{decision}"
    );
    for _ in 0..3 {
        assert_eq!(app.process(Some(&key), &echo("x")).await.status(), 503);
    }

    // Act and assert: switched on again, it runs within the bound.
    cli.run(&[
        "executors",
        "enable",
        "echo",
        "--reason",
        "incident 42 over",
    ]);
    let enabled = Instant::now();
    status_within_bound(&app, &key, &echo("x"), 200, enabled).await;

    // Both switches are in the trail with who and why.
    let switched = switch_events(&app).await;
    let states: Vec<(&str, &str)> = switched
        .iter()
        .map(|e| (e["state"].as_str().unwrap(), e["reason"].as_str().unwrap()))
        .collect();
    assert_eq!(
        states,
        [("disabled", "incident 42"), ("enabled", "incident 42 over")]
    );
    assert!(
        switched
            .iter()
            .all(|e| e["actor"].as_str().unwrap().starts_with("cli:") && e["executor"] == "echo"),
        "{switched:?}"
    );
}

#[tokio::test]
async fn a_disabled_executor_never_runs() {
    // Arrange: an executor that counts its calls.
    let app = spawn_app().await;
    let key = app.admin_key().await;
    let counted = json!({"action": "test.counted", "context_id": "work", "payload": {}});
    assert_eq!(app.process(Some(&key), &counted).await.status(), 200);
    assert_eq!(app.calls.count(), 1);

    // Act: switched off through the same service the CLI uses.
    switches::switch(
        app.app.store.as_ref(),
        &app.app.audit,
        "counted",
        true,
        "test",
        "maintenance",
    )
    .await
    .unwrap();
    let disabled = Instant::now();
    status_within_bound(&app, &key, &counted, 503, disabled).await;
    let calls_at_refusal = app.calls.count();

    // Assert: from the first refusal on, no call reaches it.
    for _ in 0..5 {
        assert_eq!(app.process(Some(&key), &counted).await.status(), 503);
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(app.calls.count(), calls_at_refusal);
}

#[tokio::test]
async fn disabling_an_unknown_executor_is_an_error_naming_the_known_ones() {
    let app = spawn_app().await;
    let out = Cli::for_app(&app).output(&["executors", "disable", "nope", "--reason", "x"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no executor named \"nope\"") && err.contains("echo"),
        "{err}"
    );
    assert!(switch_events(&app).await.is_empty(), "nothing was switched");
}

/// POST /v1/executors/{name}/{verb} with `body`, as `key`.
async fn switch_over_http(
    app: &TestApp,
    key: &str,
    name: &str,
    verb: &str,
    body: &str,
) -> (u16, String, Value) {
    let resp = app
        .client
        .post(app.url(&format!("/v1/executors/{name}/{verb}")))
        .header("x-api-key", key)
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .unwrap();
    let trace = resp.headers()["x-trace-id"].to_str().unwrap().to_owned();
    let (status, answer) = reasons(resp).await;
    (status, trace, answer)
}

#[tokio::test]
async fn an_admin_switches_an_executor_over_http_and_the_switch_is_in_the_request_s_story() {
    // Arrange
    let app = spawn_app().await;
    let admin = app.admin_key().await;
    assert_eq!(app.process(Some(&admin), &echo("x")).await.status(), 200);

    // Act
    let (status, trace, answer) = switch_over_http(
        &app,
        &admin,
        "echo",
        "disable",
        r#"{"reason": "incident 43"}"#,
    )
    .await;
    let disabled = Instant::now();

    // Assert: switched, answered with the bound, refused within it.
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["state"], "disabled");
    assert_eq!(answer["reason"], "incident 43");
    let bound = app.app.auth.keys().bound();
    assert_eq!(answer["bound_ms"], bound.as_millis() as u64);
    let admin_id = crate::helpers::key_id(&admin);
    assert_eq!(answer["changed_by"], format!("key:{admin_id}"));
    let (_, refused) = status_within_bound(&app, &admin, &echo("x"), 503, disabled).await;
    assert_eq!(refused["reason_codes"], json!(["EXECUTOR_DISABLED"]));

    // The switch request's own story: the ALLOW and the switch durable before it took effect.
    let story = app.events(&trace).await;
    let types = event_types(&story);
    assert_eq!(
        types,
        [
            "REQUEST_START",
            "DECISION",
            "EXECUTOR_SWITCHED",
            "REQUEST_END"
        ]
    );
    assert_eq!(story[0]["method"], "POST");
    assert_eq!(story[1]["effect"], "allow");
    assert_eq!(story[2]["actor"], format!("key:{admin_id}"));
    assert_eq!(story[3]["status"], 200);

    // And on again.
    let (status, _, _) = switch_over_http(&app, &admin, "echo", "enable", "").await;
    assert_eq!(status, 200);
    status_within_bound(&app, &admin, &echo("x"), 200, Instant::now()).await;
}

#[tokio::test]
async fn switching_over_http_is_refused_without_the_permission_a_reason_or_a_known_executor() {
    let app = spawn_app().await;
    let admin = app.admin_key().await;
    let analyst = app
        .key(crate::helpers::KeySpec {
            role: "analyst",
            ..crate::helpers::KeySpec::default()
        })
        .await;

    // An analyst may not: 403, recorded as a DENY.
    let (status, trace, answer) =
        switch_over_http(&app, &analyst, "echo", "disable", r#"{"reason": "x"}"#).await;
    assert_eq!(status, 403, "{answer}");
    assert_eq!(app.decision(&trace).await["effect"], "deny");

    // Disabling needs a reason: 400 before any gate.
    let (status, _, answer) = switch_over_http(&app, &admin, "echo", "disable", "{}").await;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(answer["reason_codes"], json!(["MALFORMED_REQUEST"]));

    // An unknown executor: 404, and the request is still in the trail.
    let (status, trace, answer) =
        switch_over_http(&app, &admin, "nope", "disable", r#"{"reason": "x"}"#).await;
    assert_eq!(status, 404, "{answer}");
    let types: Vec<Value> = app
        .events(&trace)
        .await
        .iter()
        .map(|e| e["event_type"].clone())
        .collect();
    assert_eq!(
        types,
        [
            json!("REQUEST_START"),
            json!("DECISION"),
            json!("REQUEST_END")
        ]
    );

    // Nothing was switched.
    assert!(switch_events(&app).await.is_empty());
    assert_eq!(app.process(Some(&admin), &echo("x")).await.status(), 200);
}
