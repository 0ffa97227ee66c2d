//! Routes other than /process: health, readiness, metrics, OpenAPI, unknown routes, trace ids.

use std::time::{Duration, Instant};

use catraca::config::Mode;
use serde_json::{Value, json};

use crate::helpers::{echo, spawn_app, spawn_app_with};
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
        "/v1/audit/decisions",
        "/v1/audit/chains",
        "/v1/keys",
        "/v1/keys/{key_id}/revoke",
        "/v1/keys/{key_id}/rotate",
        "/console",
        "/console/{file}",
        "/openapi.json",
    ] {
        assert!(doc["paths"].get(path).is_some(), "{path} missing");
    }
    assert!(doc["components"]["schemas"].get("ActionResult").is_some());
    assert!(doc["components"]["schemas"].get("ErrorBody").is_some());
}

#[tokio::test]
async fn openapi_offers_a_new_key_only_the_loaded_policy_s_roles_contexts_and_tiers() {
    let app = spawn_app().await;
    let doc: Value = app.get_json("/openapi.json").await;
    let create = &doc["components"]["schemas"]["CreateKey"]["properties"];
    let policy = app.app.policy();
    let roles: Vec<&str> = policy.roles().map(|r| r.as_str()).collect();
    let contexts: Vec<&str> = policy.contexts().map(|c| c.as_str()).collect();
    assert!(
        roles.contains(&"admin") && roles.contains(&"digester"),
        "{roles:?}"
    );
    assert_eq!(create["role"]["enum"], json!(roles));
    assert_eq!(create["contexts"]["items"]["enum"], json!(contexts));
    let tiers = create["tier"]["enum"].as_array().unwrap();
    assert!(tiers.contains(&json!("standard")) && tiers.contains(&Value::Null));
    assert_eq!(
        doc["components"]["schemas"]["CreateKey"]["additionalProperties"],
        false
    );
}

#[tokio::test]
async fn openapi_names_both_ways_of_presenting_a_key_on_the_routes_that_need_one() {
    let app = spawn_app().await;
    let doc: Value = app.get_json("/openapi.json").await;
    let schemes = &doc["components"]["securitySchemes"];
    assert_eq!(schemes["api_key"]["type"], "apiKey");
    assert_eq!(schemes["api_key"]["in"], "header");
    assert_eq!(schemes["api_key"]["name"], "X-API-Key");
    assert_eq!(schemes["bearer"]["type"], "http");
    assert_eq!(schemes["bearer"]["scheme"], "bearer");
    let either = json!([{ "api_key": [] }, { "bearer": [] }]);
    assert_eq!(doc["paths"]["/process"]["post"]["security"], either);
    for (path, method) in [
        ("/v1/audit/traces/{trace_id}", "get"),
        ("/v1/audit/decisions", "get"),
        ("/v1/audit/chains", "get"),
        ("/v1/keys", "get"),
        ("/v1/keys", "post"),
        ("/v1/keys/{key_id}/revoke", "post"),
        ("/v1/keys/{key_id}/rotate", "post"),
    ] {
        assert_eq!(doc["paths"][path][method]["security"], either, "{path}");
    }
    assert!(doc["paths"]["/console"]["get"].get("security").is_none());
    assert!(doc["paths"]["/health"]["get"].get("security").is_none());
}

#[tokio::test]
async fn openapi_lists_every_status_and_header_a_route_answers_with() {
    let app = spawn_app().await;
    let doc: Value = app.get_json("/openapi.json").await;
    let process = &doc["paths"]["/process"]["post"]["responses"];
    for status in [
        "200", "400", "401", "403", "405", "408", "413", "415", "422", "429", "431", "500", "502",
        "503", "504",
    ] {
        assert!(process.get(status).is_some(), "/process lacks {status}");
    }
    let trace = &doc["paths"]["/v1/audit/traces/{trace_id}"]["get"]["responses"];
    for status in [
        "200", "400", "401", "403", "404", "405", "429", "431", "503",
    ] {
        assert!(trace.get(status).is_some(), "the trail lacks {status}");
    }
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            for (status, response) in operation["responses"].as_object().unwrap() {
                let headers = &response["headers"];
                assert_eq!(
                    headers["X-Trace-Id"]["required"], true,
                    "{method} {path} {status} lacks X-Trace-Id"
                );
                let needs = match status.as_str() {
                    "401" => Some("WWW-Authenticate"),
                    "405" => Some("Allow"),
                    "429" | "503" => Some("Retry-After"),
                    _ => None,
                };
                if let Some(name) = needs {
                    assert!(
                        headers.get(name).is_some(),
                        "{method} {path} {status} lacks {name}"
                    );
                }
            }
            for status in ["405", "431", "503"] {
                assert!(
                    operation["responses"].get(status).is_some(),
                    "{method} {path} lacks {status}"
                );
            }
        }
    }
    // /ready's own 503 body, or the front door's error body for the connection cap.
    let ready_503 = &doc["paths"]["/ready"]["get"]["responses"]["503"]["content"]["application/json"]
        ["schema"]["oneOf"];
    assert_eq!(ready_503.as_array().unwrap().len(), 2, "{ready_503}");
}

#[tokio::test]
async fn openapi_describes_the_process_body_as_one_branch_per_runnable_action() {
    let app = spawn_app().await;
    let doc: Value = app.get_json("/openapi.json").await;
    let schemas = &doc["components"]["schemas"];
    assert_eq!(
        doc["paths"]["/process"]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"],
        "#/components/schemas/ProcessBody"
    );
    let mut actions: Vec<String> = schemas["ProcessBody"]["oneOf"]
        .as_array()
        .unwrap()
        .iter()
        .map(|branch| {
            let reference = branch["$ref"].as_str().unwrap();
            let name = reference.strip_prefix("#/components/schemas/").unwrap();
            schemas[name]["properties"]["action"]["const"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    actions.sort();
    // The example policy's actions and the test policy's, but not the permission `audit.read`.
    assert_eq!(
        actions,
        [
            "assistant",
            "echo",
            "licitacoes.collect",
            "licitacoes.digest",
            "licitacoes.summarize",
            "test.broken",
            "test.chain",
            "test.counted",
            "test.eval",
            "test.forbidden",
        ]
    );
    assert_eq!(
        schemas["ProcessBody"]["discriminator"]["propertyName"],
        "action"
    );
    assert_eq!(schemas["ContextId"]["enum"], json!(["partner", "work"]));
    let echo = &schemas["Process.echo"];
    assert_eq!(echo["additionalProperties"], false);
    assert_eq!(echo["required"], json!(["action", "context_id", "payload"]));
    assert_eq!(
        echo["properties"]["payload"]["$ref"],
        "#/components/schemas/Payload.echo"
    );
    // The action's own schema, as the policy folder holds it (less its `$schema`).
    assert_eq!(schemas["Payload.echo"]["required"], json!(["message"]));
    assert!(schemas["Payload.echo"].get("$schema").is_none());
    assert_eq!(
        schemas["Payload.licitacoes.collect"]["properties"]["data_inicial"]["format"],
        "date"
    );
    // An action without a schema takes any object, and `{}` when the payload is left out.
    let counted = &schemas["Process.test.counted"];
    assert_eq!(counted["properties"]["payload"], json!({"type": "object"}));
    assert_eq!(counted["required"], json!(["action", "context_id"]));
}

#[tokio::test]
async fn a_policy_reload_in_dev_mode_shows_in_the_openapi_document() {
    let app = spawn_app_with(|c| c.mode = Mode::Dev).await;
    // Served before the edit (which also lets the reload task take its first look at the folder).
    let doc: Value = app.get_json("/openapi.json").await;
    assert!(doc["components"]["schemas"].get("Process.echo").is_some());
    assert!(
        doc["components"]["schemas"]
            .get("Process.echo.again")
            .is_none()
    );
    let policies = app.dir.path().join("policies");
    std::fs::write(
        policies.join("zz-more.toml"),
        "[actions.\"echo.again\"]\nexecutor = \"echo\"\ninput_schema = \"schemas/echo.json\"\n",
    )
    .unwrap();
    // The reload looks every 2 s; a loaded machine may take longer.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let doc: Value = app.get_json("/openapi.json").await;
        if doc["components"]["schemas"]
            .get("Process.echo.again")
            .is_some()
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the reloaded action never showed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
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

/// The status, `X-Trace-Id` header and JSON body of a response that must be the documented error body.
async fn error_answer(resp: reqwest::Response) -> (u16, reqwest::header::HeaderMap, Value) {
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    assert_eq!(
        headers["content-type"], "application/json",
        "status {status} is not the JSON error body"
    );
    let body: Value = resp.json().await.unwrap();
    assert_eq!(
        body["trace_id"],
        headers["x-trace-id"].to_str().unwrap(),
        "{body}"
    );
    (status, headers, body)
}

#[tokio::test]
async fn a_method_a_route_does_not_take_gets_a_json_405_with_allow() {
    let app = spawn_app().await;
    let (status, headers, body) =
        error_answer(app.client.get(app.url("/process")).send().await.unwrap()).await;
    assert_eq!(status, 405);
    assert_eq!(headers["allow"], "POST");
    assert_eq!(body["error"], "REQUEST_REJECTED");
    assert_eq!(body["reason_codes"], json!(["METHOD_NOT_ALLOWED"]));
    let (status, headers, _) =
        error_answer(app.client.delete(app.url("/health")).send().await.unwrap()).await;
    assert_eq!(status, 405);
    assert_eq!(headers["allow"], "GET,HEAD");
}

#[tokio::test]
async fn too_many_headers_or_too_many_header_bytes_get_a_json_431() {
    let app = spawn_app().await;
    let mut many = app.client.get(app.url("/health"));
    for i in 0..70 {
        many = many.header(format!("x-extra-{i}"), "1");
    }
    let (status, _, body) = error_answer(many.send().await.unwrap()).await;
    assert_eq!(status, 431);
    assert_eq!(body["reason_codes"], json!(["HEADERS_TOO_LARGE"]));
    let big = app
        .client
        .get(app.url("/health"))
        .header("x-big", "a".repeat(20 * 1024))
        .send()
        .await
        .unwrap();
    let (status, _, body) = error_answer(big).await;
    assert_eq!(status, 431);
    assert_eq!(body["error"], "REQUEST_REJECTED");
    // Below both limits, the route answers.
    let mut fine = app.client.get(app.url("/health"));
    for i in 0..40 {
        fine = fine.header(format!("x-extra-{i}"), "a".repeat(200));
    }
    assert_eq!(fine.send().await.unwrap().status(), 200);
}

#[tokio::test]
async fn a_path_that_is_not_utf8_gets_a_json_400() {
    let app = spawn_app().await;
    let key = app.admin_key().await;
    let resp = app
        .client
        .get(app.url("/v1/audit/traces/%FF%FEabcdefgh"))
        .header("x-api-key", &key)
        .send()
        .await
        .unwrap();
    let (status, _, body) = error_answer(resp).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"], "REQUEST_REJECTED");
    assert_eq!(body["reason_codes"], json!(["MALFORMED_REQUEST"]));
}

#[tokio::test]
async fn a_401_challenges_for_a_bearer_key_and_says_when_the_key_was_refused() {
    let app = spawn_app().await;
    let missing = app.process(None, &echo("x")).await;
    assert_eq!(missing.status(), 401);
    assert_eq!(
        missing.headers()["www-authenticate"],
        r#"Bearer realm="catraca""#
    );
    error_answer(missing).await;
    let refused = app.process(Some("ck_nosuchkey_secret"), &echo("x")).await;
    assert_eq!(refused.status(), 401);
    assert_eq!(
        refused.headers()["www-authenticate"],
        r#"Bearer realm="catraca", error="invalid_token""#
    );
    error_answer(refused).await;
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
