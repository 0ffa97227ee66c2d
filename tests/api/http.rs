//! Routes other than /process: health, readiness, metrics, OpenAPI, unknown routes, trace ids.

use serde_json::Value;

use crate::helpers::{echo, spawn_app};
use crate::prom::sample;

#[tokio::test]
async fn health_answers_with_version_and_time() {
    let app = spawn_app().await;
    let body: Value = app.get_json("/health").await;
    assert_eq!(body["status"], "ok");
    assert_eq!(body["version"], env!("CARGO_PKG_VERSION"));
    assert!(body["timestamp"].as_str().unwrap().ends_with('Z'));
}

#[tokio::test]
async fn openapi_is_generated_and_describes_every_route() {
    let app = spawn_app().await;
    let doc: Value = app.get_json("/openapi.json").await;
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
    for path in [
        "/process",
        "/health",
        "/ready",
        "/metrics",
        "/v1/audit/traces/{trace_id}",
        "/openapi.json",
    ] {
        assert!(doc["paths"].get(path).is_some(), "{path} missing");
    }
    assert!(
        doc["paths"]["/process"]["post"]["responses"]
            .get("422")
            .is_some()
    );
    assert!(doc["components"]["schemas"].get("ActionResult").is_some());
}

#[tokio::test]
async fn an_unknown_route_gets_a_json_404_with_a_trace_id() {
    let app = spawn_app().await;
    let resp = app.client.get(app.url("/nope")).send().await.unwrap();
    assert_eq!(resp.status(), 404);
    let trace = resp.headers()["x-trace-id"].to_str().unwrap().to_owned();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "NOT_FOUND");
    assert_eq!(body["trace_id"], trace.as_str());
}

#[tokio::test]
async fn a_client_trace_id_is_echoed_and_a_malformed_one_replaced() {
    let app = spawn_app().await;
    let resp = app
        .client
        .get(app.url("/health"))
        .header("x-trace-id", "client-abc-123")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-trace-id"], "client-abc-123");
    let resp = app
        .client
        .get(app.url("/health"))
        .header("x-trace-id", "bad id")
        .send()
        .await
        .unwrap();
    let got = resp.headers()["x-trace-id"].to_str().unwrap();
    assert_ne!(got, "bad id");
    assert_eq!(got.len(), 32);
}

#[tokio::test]
async fn the_metric_catalogue_is_exported() {
    let app = spawn_app().await;
    let key = app.admin_key().await;
    app.process(Some(&key), &echo("x")).await;
    app.process(None, &echo("x")).await;
    let text = app.get_text("/metrics").await;
    for name in [
        "catraca_requests_total{",
        "catraca_request_duration_seconds_bucket{",
        "catraca_gate_decisions_total{",
        "catraca_gate_duration_seconds_bucket{",
        "catraca_executor_calls_total{",
        "catraca_executor_duration_seconds_bucket{",
        "catraca_action_results_total{",
        "catraca_audit_events_total{",
        "catraca_audit_write_failures_total ",
        "catraca_audit_flush_duration_seconds_bucket{",
        "catraca_audit_queue_depth ",
        "catraca_build_info{version=",
    ] {
        assert!(text.contains(name), "{name} missing from /metrics");
    }
    assert_eq!(
        sample(
            &text,
            "catraca_gate_decisions_total",
            &[
                ("gate", "auth"),
                ("decision", "deny"),
                ("reason", "AUTH_MISSING_KEY")
            ]
        ),
        Some(1.0),
        "{text}"
    );
}

#[tokio::test]
async fn random_actions_contexts_and_paths_do_not_grow_the_series() {
    let app = spawn_app().await;
    let key = app.admin_key().await;
    let flood = |round: usize| {
        let app = &app;
        let key = key.clone();
        async move {
            for i in 0..40 {
                let n = round * 1000 + i;
                let body = serde_json::json!({"action": format!("random.a{n}"), "context_id": format!("c{n}"), "payload": {}});
                app.process(Some(&key), &body).await;
                let body = serde_json::json!({"action": "echo", "context_id": format!("c{n}"), "payload": {"message": "x"}});
                app.process(Some(&key), &body).await;
                app.client
                    .get(app.url(&format!("/random/{n}")))
                    .send()
                    .await
                    .unwrap();
                app.client
                    .get(app.url(&format!("/v1/audit/traces/t{n}xxxxxxx")))
                    .send()
                    .await
                    .unwrap();
            }
        }
    };
    flood(1).await;
    let after_first = app.app.metrics.series_count();
    flood(2).await;
    let after_second = app.app.metrics.series_count();
    assert_eq!(
        after_first, after_second,
        "new request data made new series"
    );
    let text = app.get_text("/metrics").await;
    assert!(!text.contains("random"), "request data leaked into labels");
    assert!(text.contains(r#"action="unknown""#));
}
