//! The agent facades through the real gateway: the OpenAI-compatible endpoint (models, completions,
//! streams, refusals in OpenAI's shape) against a stand-in model server on loopback, and the MCP server
//! spoken to as JSON-RPC over HTTP. The official Python SDKs drive both in `scripts/sdk_test.sh`.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{Value, json};

use crate::helpers::{KeySpec, TestApp, event_types, spawn_app_with};

/// A stand-in OpenAI-compatible server: answers `ANSWER` whole, or streamed in words with a usage
/// chunk, `pause` between chunks; remembers what it was sent.
#[derive(Default)]
struct Upstream {
    seen: Mutex<Vec<Value>>,
    pause: Mutex<Duration>,
    status: Mutex<Option<u16>>,
}

/// The events of an allowed, executed request, in order.
const ALLOWED_STORY: [&str; 5] = [
    "REQUEST_START",
    "DECISION",
    "EXECUTOR_SELECTED",
    "ACTION_EXECUTED",
    "REQUEST_END",
];

const ANSWER: &str = "Pregão eletrônico é a modalidade para bens e serviços comuns.";

async fn upstream_chat(State(up): State<Arc<Upstream>>, Json(body): Json<Value>) -> Response {
    up.seen.lock().unwrap().push(body.clone());
    if let Some(status) = *up.status.lock().unwrap() {
        let status = axum::http::StatusCode::from_u16(status).unwrap();
        return (
            status,
            Json(json!({"error": {"message": "bad request upstream"}})),
        )
            .into_response();
    }
    let usage = json!({"prompt_tokens": 40, "completion_tokens": 12, "total_tokens": 52});
    if body["stream"] != true {
        let pause = *up.pause.lock().unwrap();
        tokio::time::sleep(pause * 5).await;
        return Json(json!({
            "id": "chatcmpl-up", "object": "chat.completion", "created": 1, "model": "up-7b",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": ANSWER}, "finish_reason": "stop"}],
            "usage": usage,
        }))
        .into_response();
    }
    let pause = *up.pause.lock().unwrap();
    let mut events: Vec<Value> = vec![json!({"role": "assistant", "content": ""})];
    let words: Vec<String> = ANSWER.split_inclusive(' ').map(str::to_owned).collect();
    events.extend(words.into_iter().map(|w| json!({ "content": w })));
    let stream = async_stream(events, usage, pause);
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .body(Body::from_stream(stream))
        .unwrap()
}

/// The SSE frames of a streamed answer: one delta each, the finish, the usage, `[DONE]`.
fn async_stream(
    deltas: Vec<Value>,
    usage: Value,
    pause: Duration,
) -> impl futures_util::Stream<Item = Result<String, std::convert::Infallible>> {
    let chunk = |choices: Value, usage: Value| {
        format!(
            "data: {}\n\n",
            json!({"id": "chatcmpl-up", "object": "chat.completion.chunk", "created": 1, "model": "up-7b", "choices": choices, "usage": usage})
        )
    };
    let mut frames: Vec<String> = deltas
        .into_iter()
        .map(|d| {
            chunk(
                json!([{"index": 0, "delta": d, "finish_reason": null}]),
                Value::Null,
            )
        })
        .collect();
    frames.push(chunk(
        json!([{"index": 0, "delta": {}, "finish_reason": "stop"}]),
        Value::Null,
    ));
    frames.push(chunk(json!([]), usage));
    frames.push("data: [DONE]\n\n".to_owned());
    futures_util::stream::unfold(frames.into_iter(), move |mut frames| async move {
        let frame = frames.next()?;
        tokio::time::sleep(pause).await;
        Some((Ok(frame), frames))
    })
}

async fn start_upstream() -> (String, Arc<Upstream>) {
    let up = Arc::new(Upstream::default());
    let router = Router::new()
        .route("/v1/chat/completions", post(upstream_chat))
        .with_state(up.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    (format!("http://{addr}/v1"), up)
}

/// A gateway whose `llm` executors (the example assistant among them) call the stand-in.
async fn gateway() -> (TestApp, Arc<Upstream>) {
    let (base_url, up) = start_upstream().await;
    let app = spawn_app_with(|config| {
        config.executor_overrides.llm_base_url = Some(base_url);
    })
    .await;
    (app, up)
}

async fn key(app: &TestApp, role: &str, contexts: &'static [&'static str]) -> String {
    app.key(KeySpec {
        role,
        contexts,
        ..KeySpec::default()
    })
    .await
}

fn question(max_tokens: u32) -> Value {
    json!({
        "model": "assistant",
        "messages": [{"role": "user", "content": "O que é pregão? (pergunta secreta 7731)"}],
        "max_tokens": max_tokens,
    })
}

async fn chat(app: &TestApp, key: Option<&str>, body: &Value) -> reqwest::Response {
    let mut request = app.client.post(app.url("/v1/chat/completions")).json(body);
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    request.send().await.unwrap()
}

fn trace_of(response: &reqwest::Response) -> String {
    response.headers()["x-trace-id"]
        .to_str()
        .unwrap()
        .to_owned()
}

/// The `data:` payloads of a server-sent event stream, in order.
fn sse_data(text: &str) -> Vec<String> {
    text.split("\n\n")
        .filter_map(|frame| frame.strip_prefix("data: "))
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn models_are_exactly_what_the_key_may_use_in_its_context() {
    let (app, _up) = gateway().await;
    let analyst = key(&app, "analyst", &["work"]).await;
    let auditor = key(&app, "auditor", &["work"]).await;
    let admin = key(&app, "admin", &[]).await;
    let models = |key: String, context: Option<&'static str>| {
        let mut request = app.client.get(app.url("/v1/models")).bearer_auth(key);
        if let Some(context) = context {
            request = request.header("X-Catraca-Context", context);
        }
        async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            (status, response.json::<Value>().await.unwrap())
        }
    };

    let (status, list) = models(analyst.clone(), None).await;
    assert_eq!(status, 200, "{list}");
    assert_eq!(list["object"], "list");
    assert_eq!(list["data"][0]["id"], "assistant");
    assert_eq!(list["data"].as_array().unwrap().len(), 1, "{list}");
    let (_, list) = models(auditor, None).await;
    assert_eq!(list["data"], json!([]), "an auditor may use no model");
    let (_, list) = models(admin.clone(), Some("partner")).await;
    assert_eq!(
        list["data"],
        json!([]),
        "the partner context denies the assistant"
    );
    let (_, list) = models(admin.clone(), Some("work")).await;
    assert_eq!(list["data"][0]["id"], "assistant");

    // A context the key may not use is refused by the matrix, not listed as allowed and empty.
    let (status, body) = models(analyst.clone(), Some("partner")).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"]["code"], "CONTEXT_FORBIDDEN");
    let decision = app
        .decision(body["error"]["trace_id"].as_str().unwrap())
        .await;
    assert_eq!(decision["effect"], "deny");

    // A key for every context must name one; an unknown context is refused.
    let (status, body) = models(admin.clone(), None).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "CONTEXT_UNKNOWN");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("X-Catraca-Context")
    );
    let (status, body) = models(admin, Some("nowhere")).await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (400, &json!("CONTEXT_UNKNOWN"))
    );

    let response = app
        .client
        .get(app.url("/v1/models"))
        .bearer_auth(&analyst)
        .send()
        .await
        .unwrap();
    let events = app.events(&trace_of(&response)).await;
    assert_eq!(
        event_types(&events),
        ["REQUEST_START", "DECISION", "REQUEST_END"]
    );
    assert_eq!(events[0]["channel"], "openai");
    assert_eq!(events[0]["route"], "/v1/models");
    assert_eq!(events[1]["effect"], "allow");
    assert_eq!(events[1]["context_id"], "work");
}

#[tokio::test]
async fn a_completion_passes_the_gates_and_leaves_its_story_without_the_messages() {
    let (app, up) = gateway().await;
    let analyst = key(&app, "analyst", &["work"]).await;

    let response = chat(&app, Some(&analyst), &question(64)).await;
    assert_eq!(response.status(), 200);
    let trace = trace_of(&response);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], "assistant");
    assert_eq!(body["choices"][0]["message"]["content"], ANSWER);
    assert_eq!(body["usage"]["total_tokens"], 52);
    assert_eq!(body["catraca"]["trace_id"], trace.as_str());
    assert_eq!(body["catraca"]["upstream_model"], "up-7b");
    let decision = app.decision(&trace).await;
    assert_eq!(body["catraca"]["receipt"]["seq"], decision["seq"]);
    assert_eq!(body["catraca"]["receipt"]["hash"], decision["hash"]);

    // The executor's system prompt first, then the client's message; its max_tokens passed.
    let sent = up.seen.lock().unwrap()[0].clone();
    assert_eq!(sent["messages"][0]["role"], "system");
    assert_eq!(sent["messages"][1]["role"], "user");
    assert_eq!(sent["max_tokens"], 64);
    assert!(sent.get("stream").is_none());

    let events = app.events(&trace).await;
    assert_eq!(event_types(&events), ALLOWED_STORY);
    assert_eq!(events[0]["channel"], "openai");
    assert_eq!(events[0]["route"], "/v1/chat/completions");
    assert_eq!(events[1]["effect"], "allow");
    assert_eq!(events[1]["action"], "assistant");
    assert!(events[1]["payload"]["sha256"].is_string(), "{}", events[1]);
    let facts = &events[2]["executor_facts"];
    assert_eq!(facts["mode"], "chat");
    assert_eq!(facts["system_prompt"], "prompts/assistant.system.txt");
    assert_eq!(facts["prompt_sha256"].as_str().unwrap().len(), 64);
    let outcome = &events[3]["outcome_facts"];
    assert_eq!(outcome["model"], "up-7b");
    assert_eq!(outcome["usage"]["prompt_tokens"], 40);
    assert_eq!(outcome["usage"]["completion_tokens"], 12);
    assert_eq!(events[4]["status"], 200);
    let trail = serde_json::to_string(&events).unwrap();
    assert!(
        !trail.contains("7731"),
        "the client's messages never reach the trail"
    );
    assert!(!trail.contains("Pregão eletrônico é"), "nor the answer");

    // The same counters as /process.
    let metrics = app.get_text("/metrics").await;
    assert!(
        metrics.contains(r#"catraca_action_results_total{action="assistant",status="success"} 1"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn refusals_have_openai_error_shape_with_the_reason_code_and_the_gateway_status() {
    let (app, up) = gateway().await;
    let analyst = key(&app, "analyst", &["work"]).await;
    let auditor = key(&app, "auditor", &["work"]).await;

    let refused = |response: reqwest::Response| async move {
        let status = response.status().as_u16();
        let trace = trace_of(&response);
        let challenge = response.headers().get(header::WWW_AUTHENTICATE).cloned();
        let body: Value = response.json().await.unwrap();
        (status, trace, challenge, body)
    };

    let (status, trace, _, body) = refused(chat(&app, Some(&auditor), &question(64)).await).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"]["code"], "NO_MATCHING_RULE");
    assert_eq!(body["error"]["type"], "permission_error");
    assert_eq!(body["error"]["param"], Value::Null);
    assert_eq!(body["error"]["trace_id"], trace.as_str());
    let decision = app.decision(&trace).await;
    assert_eq!(decision["effect"], "deny");
    assert_eq!(decision["reason_codes"], json!(["NO_MATCHING_RULE"]));
    assert_eq!(body["error"]["receipt"]["hash"], decision["hash"]);

    let (status, _, challenge, body) = refused(chat(&app, None, &question(64)).await).await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (401, &json!("AUTH_MISSING_KEY"))
    );
    assert_eq!(body["error"]["type"], "authentication_error");
    assert!(challenge.is_some(), "a 401 carries WWW-Authenticate");

    let (status, _, _, body) = refused(chat(&app, Some(&analyst), &question(5000)).await).await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (422, &json!("INPUT_SCHEMA_INVALID"))
    );
    assert_eq!(body["error"]["param"], "max_tokens");

    let mut not_a_model = question(64);
    not_a_model["model"] = json!("echo");
    let (status, trace, _, body) = refused(chat(&app, Some(&analyst), &not_a_model).await).await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (400, &json!("ACTION_UNKNOWN"))
    );
    assert_eq!(app.decision(&trace).await["action"], "echo");
    let mut unknown = question(64);
    unknown["model"] = json!("gpt-4o");
    let (status, trace, _, body) = refused(chat(&app, Some(&analyst), &unknown).await).await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (400, &json!("ACTION_UNKNOWN"))
    );
    assert_eq!(app.decision(&trace).await["requested_action"], "gpt-4o");

    let response = app
        .client
        .post(app.url("/v1/chat/completions"))
        .bearer_auth(&analyst)
        .header(header::CONTENT_TYPE, "application/json")
        .body("{\"model\": ")
        .send()
        .await
        .unwrap();
    let (status, _, _, body) = refused(response).await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (400, &json!("INPUT_MALFORMED_JSON"))
    );

    assert!(
        up.seen.lock().unwrap().is_empty(),
        "no refusal reached the model"
    );
}

#[tokio::test]
async fn a_stream_relays_the_chunks_and_its_outcome_is_durable_before_done() {
    let (app, up) = gateway().await;
    let analyst = key(&app, "analyst", &["work"]).await;
    let mut body = question(64);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});

    let response = chat(&app, Some(&analyst), &body).await;
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let trace = trace_of(&response);
    let text = response.text().await.unwrap();
    // Read the trail the moment [DONE] arrived: the outcome must already be there.
    let events = app.events(&trace).await;

    let data = sse_data(&text);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{text}");
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let content: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(content, ANSWER);
    assert!(chunks.iter().all(|c| c["model"] == "assistant"));
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["total_tokens"], 52);

    let sent = up.seen.lock().unwrap()[0].clone();
    assert_eq!(sent["stream"], true);
    assert_eq!(sent["stream_options"]["include_usage"], true);
    assert_eq!(event_types(&events), ALLOWED_STORY);
    assert_eq!(events[3]["status"], "success");
    assert_eq!(events[3]["outcome_facts"]["usage"]["completion_tokens"], 12);
    assert_eq!(events[4]["status"], 200);

    // Without include_usage, no chunk carries the usage the gateway asked the upstream for.
    body["stream_options"] = json!(null);
    let text = chat(&app, Some(&analyst), &body)
        .await
        .text()
        .await
        .unwrap();
    let data = sse_data(&text);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    assert!(!text.contains("total_tokens"), "{text}");
}

#[tokio::test]
async fn a_client_that_leaves_mid_stream_still_leaves_its_whole_story() {
    let (app, up) = gateway().await;
    *up.pause.lock().unwrap() = Duration::from_millis(100);
    let analyst = key(&app, "analyst", &["work"]).await;
    let mut body = question(64);
    body["stream"] = json!(true);

    let mut response = chat(&app, Some(&analyst), &body).await;
    assert_eq!(response.status(), 200);
    let trace = trace_of(&response);
    assert!(response.chunk().await.unwrap().is_some(), "a first chunk");
    drop(response);

    let mut events = Vec::new();
    for _ in 0..100 {
        events = app.events(&trace).await;
        if events.iter().any(|e| e["event_type"] == "REQUEST_END") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(event_types(&events), ALLOWED_STORY);
    assert_eq!(events[3]["status"], "failed");
    assert!(
        events[3]["error"]
            .as_str()
            .unwrap()
            .contains("closed the stream"),
        "{}",
        events[3]
    );
    assert_eq!(events[4]["status"], 200, "the client had its 200 already");
    assert_eq!(events[4]["outcome"], "EXECUTION_FAILED");
}

#[tokio::test]
async fn a_client_that_gives_up_on_a_completion_still_leaves_its_whole_story() {
    let (app, up) = gateway().await;
    *up.pause.lock().unwrap() = Duration::from_millis(100);
    let analyst = key(&app, "analyst", &["work"]).await;
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(150))
        .build()
        .unwrap();
    let trace = "giving-up-on-a-completion-0001";
    let sent = impatient
        .post(app.url("/v1/chat/completions"))
        .bearer_auth(&analyst)
        .header("X-Trace-Id", trace)
        .json(&question(64))
        .send()
        .await;
    assert!(sent.is_err(), "the client gave up before the answer");

    let mut events = Vec::new();
    for _ in 0..100 {
        events = app.events(trace).await;
        if events.iter().any(|e| e["event_type"] == "REQUEST_END") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(event_types(&events), ALLOWED_STORY);
    assert_eq!(
        events[3]["status"], "success",
        "the model answered; the trail says so"
    );
}

#[tokio::test]
async fn an_upstream_failure_before_any_chunk_is_an_error_status_not_a_stream() {
    let (app, up) = gateway().await;
    *up.status.lock().unwrap() = Some(400);
    let analyst = key(&app, "analyst", &["work"]).await;
    let mut body = question(64);
    body["stream"] = json!(true);

    let response = chat(&app, Some(&analyst), &body).await;
    assert_eq!(response.status(), 502);
    let trace = trace_of(&response);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "EXECUTOR_FAILED");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("bad request upstream")
    );
    let events = app.events(&trace).await;
    assert_eq!(events[3]["status"], "failed");
    assert_eq!(events[4]["status"], 502);
}

#[tokio::test]
async fn process_records_its_channel() {
    let (app, _up) = gateway().await;
    let analyst = key(&app, "analyst", &["work"]).await;
    let response = app
        .process(Some(&analyst), &crate::helpers::echo("olá"))
        .await;
    assert_eq!(response.status(), 200);
    let events = app.events(&trace_of(&response)).await;
    assert_eq!(events[0]["channel"], "process");
}

/// One MCP message to `/mcp` as a Streamable HTTP client sends it.
async fn mcp(app: &TestApp, key: Option<&str>, message: Value) -> reqwest::Response {
    let mut request = app
        .client
        .post(app.url("/mcp"))
        .header(header::ACCEPT, "application/json, text/event-stream")
        .header("MCP-Protocol-Version", "2025-11-25")
        .json(&message);
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    request.send().await.unwrap()
}

fn call(id: u64, tool: &str, arguments: Value) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {"name": tool, "arguments": arguments}})
}

/// `tools/list` for `key`: the sorted tool names, the answer and its trace id.
async fn tools(app: &TestApp, key: &str) -> (Vec<String>, Value, String) {
    let list = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"});
    let response = mcp(app, Some(key), list).await;
    let trace = trace_of(&response);
    let body: Value = response.json().await.unwrap();
    let mut names: Vec<String> = body["result"]["tools"]
        .as_array()
        .unwrap_or_else(|| panic!("{body}"))
        .iter()
        .map(|t| t["name"].as_str().unwrap().to_owned())
        .collect();
    names.sort();
    (names, body, trace)
}

#[tokio::test]
async fn mcp_lists_the_keys_tools_and_calls_them_through_the_gates() {
    let (app, _up) = gateway().await;
    let analyst = key(&app, "analyst", &["work"]).await;
    let auditor = key(&app, "auditor", &["work"]).await;

    let initialize = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {},
        "clientInfo": {"name": "facades-test", "version": "1"}}});
    let response = mcp(&app, Some(&analyst), initialize).await;
    assert_eq!(response.status(), 200);
    assert!(
        response.headers().get("mcp-session-id").is_none(),
        "stateless"
    );
    let init: Value = response.json().await.unwrap();
    assert_eq!(init["result"]["serverInfo"]["name"], "catraca");

    let (names, body, trace) = tools(&app, &analyst).await;
    assert_eq!(names, ["assistant", "echo", "licitacoes.summarize"]);
    let echo = body["result"]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "echo")
        .unwrap();
    assert_eq!(echo["inputSchema"]["required"], json!(["message"]));
    let events = app.events(&trace).await;
    assert_eq!(events[0]["channel"], "mcp");
    assert_eq!(events[0]["mcp_method"], "tools/list");
    let (names, _, _) = tools(&app, &auditor).await;
    assert_eq!(names, ["echo"]);

    let response = mcp(
        &app,
        Some(&analyst),
        call(3, "echo", json!({"message": "olá"})),
    )
    .await;
    let trace = trace_of(&response);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["result"]["isError"], false, "{body}");
    assert_eq!(
        body["result"]["structuredContent"],
        json!({"message": "olá"})
    );
    assert_eq!(
        body["result"]["_meta"]["io.catraca/trace_id"],
        trace.as_str()
    );
    let events = app.events(&trace).await;
    assert_eq!(event_types(&events), ALLOWED_STORY);
    assert_eq!(events[0]["channel"], "mcp");
    assert_eq!(events[0]["tool"], "echo");
    assert_eq!(events[0]["request_id"], 3);

    // A refusal and a schema violation are tool errors naming their codes and trace id.
    let response = mcp(
        &app,
        Some(&analyst),
        call(
            4,
            "licitacoes.collect",
            json!({"source": "pncp", "endpoint": "publicacao", "data_inicial": "2026-01-01", "data_final": "2026-01-02", "modalidade": 6}),
        ),
    )
    .await;
    let trace = trace_of(&response);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["result"]["isError"], true, "{body}");
    let text = body["result"]["content"][0]["text"].as_str().unwrap();
    assert!(
        text.contains("NO_MATCHING_RULE") && text.contains(&trace),
        "{text}"
    );
    assert_eq!(app.decision(&trace).await["effect"], "deny");
    let body: Value = mcp(&app, Some(&analyst), call(5, "echo", json!({})))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(body["result"]["isError"], true);
    assert_eq!(
        body["result"]["structuredContent"]["reason_codes"],
        json!(["INPUT_SCHEMA_INVALID"])
    );

    // A permission is not a tool, even for a key that holds it.
    let auditor = key(&app, "auditor", &["work"]).await;
    let body: Value = mcp(&app, Some(&auditor), call(6, "audit.read", json!({})))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(body["result"]["isError"], true, "{body}");
    assert_eq!(
        body["result"]["structuredContent"]["reason_codes"],
        json!(["ACTION_UNKNOWN"])
    );

    // The client's request id is recorded, cut short.
    let long_id = "x".repeat(10_000);
    let mut message = call(0, "echo", json!({"message": "olá"}));
    message["id"] = json!(long_id);
    let response = mcp(&app, Some(&analyst), message).await;
    let trace = trace_of(&response);
    let start = &app.events(&trace).await[0];
    assert_eq!(start["request_id"].as_str().unwrap().len(), 128);
}

#[tokio::test]
async fn every_mcp_request_counts_against_the_keys_quota_once() {
    let (app, _up) = gateway().await;
    // The standard tier: 5 a second, a burst of 10.
    let analyst = app
        .key(KeySpec {
            role: "analyst",
            tier: "standard",
            contexts: &["work"],
            ..KeySpec::default()
        })
        .await;
    let ping = json!({"jsonrpc": "2.0", "id": 1, "method": "ping"});
    let mut statuses = Vec::new();
    for _ in 0..12 {
        statuses.push(
            mcp(&app, Some(&analyst), ping.clone())
                .await
                .status()
                .as_u16(),
        );
    }
    assert_eq!(statuses[..10], [200; 10], "{statuses:?}");
    assert_eq!(statuses[11], 429, "{statuses:?}");
}

#[tokio::test]
async fn mcp_refuses_without_a_key_and_answers_its_own_refusals_in_the_gateway_body() {
    let (app, _up) = gateway().await;
    let response = mcp(
        &app,
        None,
        json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}),
    )
    .await;
    assert_eq!(response.status(), 401);
    let trace = trace_of(&response);
    assert!(response.headers().contains_key(header::WWW_AUTHENTICATE));
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["reason_codes"], json!(["AUTH_MISSING_KEY"]));
    let events = app.events(&trace).await;
    assert_eq!(events[0]["channel"], "mcp");
    assert_eq!(events[1]["effect"], "deny");

    let analyst = key(&app, "analyst", &["work"]).await;
    let response = app
        .client
        .get(app.url("/mcp"))
        .bearer_auth(&analyst)
        .header(header::ACCEPT, "text/event-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 405);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["reason_codes"], json!(["METHOD_NOT_ALLOWED"]));
}
