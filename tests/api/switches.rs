//! The kill switch: an executor switched off by an operator is refused on every request within the
//! watch bound (503 EXECUTOR_DISABLED, nothing runs), switched on again the same way; every switch is
//! audited with who and why.

use std::time::{Duration, Instant};

use catraca::executors::switches;
use serde_json::{Value, json};

use crate::binary::Cli;
use crate::helpers::{TestApp, echo, reasons, spawn_app};

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
