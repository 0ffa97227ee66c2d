//! The `llm` executor through the real gateway, against a stand-in OpenAI-compatible server on loopback
//! whose answers each test queues: success, timeouts, 429, 5xx, 4xx, bodies that are not completions.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::helpers::{TestApp, echo, reasons, spawn_app, spawn_app_with};
use crate::prom::sample;

/// One answer of the stand-in server.
#[derive(Clone)]
enum Reply {
    /// A well-formed chat completion.
    Completion {
        text: &'static str,
        model: &'static str,
        prompt_tokens: u32,
        completion_tokens: u32,
    },
    /// Any status, content type and body.
    Raw {
        status: u16,
        content_type: &'static str,
        body: &'static str,
    },
    /// Waits, then answers.
    Slow(Duration, Box<Reply>),
    /// A 429 whose `Retry-After` asks for this many seconds.
    Limited { retry_after_secs: u64 },
}

fn completion(text: &'static str) -> Reply {
    Reply::Completion {
        text,
        model: "stand-in-7b-q4",
        prompt_tokens: 321,
        completion_tokens: 45,
    }
}

/// What the stand-in received.
struct Seen {
    body: Value,
    authorization: Option<String>,
    at: Instant,
}

#[derive(Default)]
struct Script {
    /// Answers in order; the last one repeats for every further request.
    replies: Mutex<VecDeque<Reply>>,
    seen: Mutex<Vec<Seen>>,
}

/// A stand-in for llama.cpp / vLLM / OpenAI: POST /v1/chat/completions on a loopback port.
struct Upstream {
    addr: SocketAddr,
    script: Arc<Script>,
}

impl Upstream {
    async fn start(replies: Vec<Reply>) -> Self {
        let script = Arc::new(Script {
            replies: Mutex::new(replies.into()),
            seen: Mutex::default(),
        });
        let router = Router::new()
            .route("/v1/chat/completions", post(chat_completions))
            .with_state(script.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router).await });
        Self { addr, script }
    }

    fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    fn calls(&self) -> usize {
        self.script.seen.lock().unwrap().len()
    }

    fn request(&self, index: usize) -> Value {
        self.script.seen.lock().unwrap()[index].body.clone()
    }

    /// When the request `index` arrived.
    fn arrival(&self, index: usize) -> Instant {
        self.script.seen.lock().unwrap()[index].at
    }

    fn authorization(&self, index: usize) -> Option<String> {
        self.script.seen.lock().unwrap()[index]
            .authorization
            .clone()
    }
}

async fn chat_completions(
    State(script): State<Arc<Script>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    script.seen.lock().unwrap().push(Seen {
        body,
        authorization: headers
            .get(header::AUTHORIZATION)
            .map(|v| v.to_str().unwrap().to_owned()),
        at: Instant::now(),
    });
    let mut reply = {
        let mut replies = script.replies.lock().unwrap();
        if replies.len() > 1 {
            replies.pop_front()
        } else {
            replies.front().cloned()
        }
    }
    .expect("the test queued no reply");
    while let Reply::Slow(wait, next) = reply {
        tokio::time::sleep(wait).await;
        reply = *next;
    }
    match reply {
        Reply::Completion {
            text,
            model,
            prompt_tokens,
            completion_tokens,
        } => Json(json!({
            "id": "chatcmpl-standin",
            "object": "chat.completion",
            "created": 1_767_225_600,
            "model": model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop"
            }],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens
            }
        }))
        .into_response(),
        Reply::Raw {
            status,
            content_type,
            body,
        } => (
            StatusCode::from_u16(status).unwrap(),
            [(header::CONTENT_TYPE, content_type)],
            body,
        )
            .into_response(),
        Reply::Limited { retry_after_secs } => (
            StatusCode::TOO_MANY_REQUESTS,
            [
                (header::CONTENT_TYPE, "application/json".to_owned()),
                (header::RETRY_AFTER, retry_after_secs.to_string()),
            ],
            r#"{"error":{"message":"slow down","type":"rate_limit_error"}}"#,
        )
            .into_response(),
        Reply::Slow(..) => unreachable!("unwrapped above"),
    }
}

/// The test action: no schema, run by the stand-in executor; the example policy's
/// `admins-everything` rule lets an admin run it.
const POLICY: &str = r#"
[actions."test.llm"]
description = "The llm executor against the stand-in server."
executor = "standin"
"#;

/// A gateway whose `standin` executor (the shipped summarizer prompt) calls `base_url`.
async fn gateway(base_url: &str, timeout_ms: u64, extra_settings: &str) -> TestApp {
    let file = format!(
        r#"name = "standin"
kind = "llm"
timeout_ms = {timeout_ms}

[settings]
base_url = "{base_url}"
model = "stand-in-7b"
prompt_template = "prompts/licitacoes.summarize.txt"
max_tokens = 128
temperature = 0.2
retry_backoff_ms = 10
{extra_settings}
"#
    );
    spawn_app_with(move |config| {
        std::fs::write(config.executors_dir.join("standin.toml"), file).unwrap();
        std::fs::write(config.policies_dir.join("zz-llm.toml"), POLICY).unwrap();
    })
    .await
}

fn summarize(text: &str) -> Value {
    json!({
        "action": "test.llm",
        "context_id": "work",
        "payload": {"title": "Pregão Eletrônico 12/2026", "text": text}
    })
}

/// SHA-256 of the shipped prompt, which the gateway copied into its executors folder.
fn shipped_prompt_sha256() -> String {
    let bytes = std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("executors/prompts/licitacoes.summarize.txt"),
    )
    .unwrap();
    hex::encode(Sha256::digest(bytes))
}

fn assert_execution_failed(status: u16, body: &Value, want_status: u16, code: &str) -> String {
    assert_eq!(status, want_status, "{body}");
    assert_eq!(body["error"], "EXECUTION_FAILED", "{body}");
    assert_eq!(body["reason_codes"], json!([code]), "{body}");
    assert_eq!(body["executor_id"], "standin", "{body}");
    body["message"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn a_review_notice_travels_with_every_result_and_the_prompt_asks_for_evidence() {
    // Arrange: an executor with the procurement team's notice.
    let upstream = Upstream::start(vec![completion("Objeto: papel A4.")]).await;
    let notice = "Gerado por modelo; revise antes de decidir.";
    let app = gateway(
        &upstream.base_url(),
        5_000,
        &format!("review_notice = \"{notice}\""),
    )
    .await;
    let key = app.admin_key().await;

    // Act
    let resp = app
        .process(Some(&key), &summarize("Aquisição de papel A4."))
        .await;

    // Assert: the notice is in the result, beside the summary; the shipped prompt tells the model its
    // output is reviewed by a person and that every point of attention comes with its evidence.
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["result"]["review_notice"], notice, "{body}");
    assert_eq!(body["result"]["summary"], "Objeto: papel A4.");
    let system = upstream.request(0)["messages"][0]["content"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(system.contains("revisará"), "{system}");
    assert!(system.contains("evidência"), "{system}");
}

#[tokio::test]
async fn the_shipped_summarizer_carries_a_review_notice() {
    let file = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("executors/summarizer.toml"),
    )
    .unwrap();
    let parsed: toml::Table = toml::from_str(&file).unwrap();
    let notice = parsed["settings"]["review_notice"].as_str().unwrap();
    assert!(notice.contains("revisado por uma pessoa"), "{notice}");
}

#[tokio::test]
async fn a_summary_comes_back_with_model_prompt_hash_and_usage_and_is_audited() {
    // Arrange
    let upstream = Upstream::start(vec![completion(
        "\nObjeto: aquisição de papel A4. Valor estimado: R$ 50.000,00.\n",
    )])
    .await;
    let app = gateway(&upstream.base_url(), 5_000, "").await;
    let key = app.admin_key().await;
    let sha = shipped_prompt_sha256();

    // Act
    let resp = app
        .process(
            Some(&key),
            &summarize("Aquisição de 500 resmas de papel A4, valor estimado R$ 50.000,00."),
        )
        .await;

    // Assert: the documented result, exactly.
    assert_eq!(resp.status(), 200);
    let trace = resp.headers()["x-trace-id"].to_str().unwrap().to_owned();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["executor_id"], "standin");
    assert_eq!(
        body["result"],
        json!({
            "summary": "Objeto: aquisição de papel A4. Valor estimado: R$ 50.000,00.",
            "model": "stand-in-7b-q4",
            "prompt_sha256": sha,
            "usage": {"prompt_tokens": 321, "completion_tokens": 45}
        })
    );

    // The prompt was rendered from the payload and sent once, without a key (none configured).
    assert_eq!(upstream.calls(), 1);
    let sent = upstream.request(0);
    assert_eq!(sent["model"], "stand-in-7b");
    assert_eq!(sent["max_tokens"], 128);
    assert_eq!(sent["messages"][0]["role"], "system");
    assert!(
        sent["messages"][0]["content"]
            .as_str()
            .unwrap()
            .contains("Lei nº 14.133/2021"),
        "{sent}"
    );
    assert_eq!(sent["messages"][1]["role"], "user");
    let user = sent["messages"][1]["content"].as_str().unwrap();
    assert!(
        user.contains("Aquisição de 500 resmas de papel A4, valor estimado R$ 50.000,00."),
        "{user}"
    );
    assert!(user.contains("Título: Pregão Eletrônico 12/2026"), "{user}");
    assert!(!user.contains("{{"), "every placeholder rendered: {user}");
    assert_eq!(upstream.authorization(0), None);

    // Tokens are counted per executor and kind.
    let metrics = app.get_text("/metrics").await;
    for (kind, count) in [("prompt", 321.0), ("completion", 45.0)] {
        assert_eq!(
            sample(
                &metrics,
                "catraca_llm_tokens_total",
                &[("executor", "standin"), ("kind", kind)]
            ),
            Some(count),
            "{metrics}"
        );
    }

    // The audit trail names the model and the prompt's hash, before and after execution.
    let events = app.events(&trace).await;
    let facts = json!({
        "model": "stand-in-7b",
        "prompt_template": "prompts/licitacoes.summarize.txt",
        "prompt_sha256": sha
    });
    for event_type in ["EXECUTOR_SELECTED", "ACTION_EXECUTED"] {
        let event = events
            .iter()
            .find(|e| e["event_type"] == event_type)
            .unwrap_or_else(|| panic!("no {event_type} in {events:?}"));
        assert_eq!(event["executor_facts"], facts, "{event_type}: {event}");
    }
}

#[tokio::test]
async fn a_model_server_slower_than_the_executor_timeout_is_a_504() {
    // Arrange: the whole call may take 300 ms; the server answers after 30 s.
    let upstream = Upstream::start(vec![Reply::Slow(
        Duration::from_secs(30),
        Box::new(completion("tarde demais")),
    )])
    .await;
    let app = gateway(&upstream.base_url(), 300, "").await;
    let key = app.admin_key().await;
    // The key verified once, so argon2 is not in the measured time.
    assert_eq!(app.process(Some(&key), &echo("x")).await.status(), 200);

    // Act
    let started = Instant::now();
    let resp = app.process(Some(&key), &summarize("texto")).await;

    // Assert: cut at the executor's timeout, long before the upstream would have answered (the bound
    // leaves room for a loaded machine).
    let (status, body) = reasons(resp).await;
    assert_execution_failed(status, &body, 504, "EXECUTOR_TIMEOUT");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the gateway waited for the upstream: {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_rate_limited_call_is_retried_and_then_succeeds() {
    // Arrange
    let upstream = Upstream::start(vec![
        Reply::Raw {
            status: 429,
            content_type: "application/json",
            body: r#"{"error":{"message":"too many requests","type":"rate_limit_error"}}"#,
        },
        completion("Resumo após a espera."),
    ])
    .await;
    let app = gateway(&upstream.base_url(), 5_000, "").await;
    let key = app.admin_key().await;

    // Act
    let resp = app.process(Some(&key), &summarize("texto")).await;

    // Assert
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["result"]["summary"], "Resumo após a espera.");
    assert_eq!(upstream.calls(), 2);
    assert_eq!(
        upstream.request(0),
        upstream.request(1),
        "the same request, resent"
    );
}

#[tokio::test]
async fn a_server_error_is_retried_max_retries_times_then_reported_as_502_naming_the_status() {
    // Arrange: every answer is a plain-text 500.
    let upstream = Upstream::start(vec![Reply::Raw {
        status: 500,
        content_type: "text/plain",
        body: "model crashed: out of memory",
    }])
    .await;
    let app = gateway(&upstream.base_url(), 5_000, "max_retries = 2").await;
    let key = app.admin_key().await;

    // Act
    let resp = app.process(Some(&key), &summarize("texto")).await;

    // Assert: one attempt plus two retries, then a 502 that says what the upstream said.
    let (status, body) = reasons(resp).await;
    let message = assert_execution_failed(status, &body, 502, "EXECUTOR_FAILED");
    assert!(message.contains("upstream answered 500"), "{message}");
    assert!(
        message.contains("model crashed: out of memory"),
        "{message}"
    );
    assert_eq!(upstream.calls(), 3);
}

#[tokio::test]
async fn without_max_retries_a_failing_call_is_retried_twice() {
    // Arrange: no max_retries in the file; the README's default is 2 retries.
    let upstream = Upstream::start(vec![Reply::Raw {
        status: 503,
        content_type: "text/plain",
        body: "loading model",
    }])
    .await;
    let app = gateway(&upstream.base_url(), 5_000, "").await;
    let key = app.admin_key().await;

    // Act
    let resp = app.process(Some(&key), &summarize("texto")).await;

    // Assert: the first attempt and two retries, then a 502 naming the upstream status.
    let (status, body) = reasons(resp).await;
    let message = assert_execution_failed(status, &body, 502, "EXECUTOR_FAILED");
    assert!(message.contains("upstream answered 503"), "{message}");
    assert_eq!(upstream.calls(), 3);
}

#[tokio::test]
async fn a_retry_waits_at_least_the_upstream_s_retry_after() {
    // Arrange: the backoff alone would wait 10 ms; the upstream asks for one second.
    let upstream = Upstream::start(vec![
        Reply::Limited {
            retry_after_secs: 1,
        },
        completion("Resumo depois de esperar."),
    ])
    .await;
    let app = gateway(&upstream.base_url(), 10_000, "max_retries = 1").await;
    let key = app.admin_key().await;

    // Act
    let resp = app.process(Some(&key), &summarize("texto")).await;

    // Assert
    assert_eq!(resp.status(), 200);
    assert_eq!(upstream.calls(), 2);
    let waited = upstream.arrival(1) - upstream.arrival(0);
    assert!(
        waited >= Duration::from_secs(1),
        "retried after {waited:?}, before the upstream's Retry-After of 1 s"
    );
}

#[tokio::test]
async fn a_client_error_is_reported_at_once_without_retrying() {
    // Arrange
    let upstream = Upstream::start(vec![Reply::Raw {
        status: 404,
        content_type: "application/json",
        body: r#"{"error":{"message":"model 'stand-in-7b' not found","type":"invalid_request_error"}}"#,
    }])
    .await;
    let app = gateway(&upstream.base_url(), 5_000, "max_retries = 2").await;
    let key = app.admin_key().await;

    // Act
    let resp = app.process(Some(&key), &summarize("texto")).await;

    // Assert
    let (status, body) = reasons(resp).await;
    let message = assert_execution_failed(status, &body, 502, "EXECUTOR_FAILED");
    assert!(
        message.contains("upstream answered 404: model 'stand-in-7b' not found"),
        "{message}"
    );
    assert_eq!(upstream.calls(), 1);
}

#[tokio::test]
async fn a_body_that_is_not_a_chat_completion_is_a_502_naming_it() {
    // Arrange: 200, but not a completion (a proxy's page, a wrong route, a truncated answer...).
    let upstream = Upstream::start(vec![Reply::Raw {
        status: 200,
        content_type: "application/json",
        body: r#"{"status": "ok", "choices": "none"}"#,
    }])
    .await;
    let app = gateway(&upstream.base_url(), 5_000, "").await;
    let key = app.admin_key().await;

    // Act
    let resp = app.process(Some(&key), &summarize("texto")).await;

    // Assert
    let (status, body) = reasons(resp).await;
    let message = assert_execution_failed(status, &body, 502, "EXECUTOR_FAILED");
    assert!(
        message.contains("upstream body is not a chat completion"),
        "{message}"
    );
    assert_eq!(upstream.calls(), 1, "a bad body is not retried");
}

#[tokio::test]
async fn a_slow_attempt_is_cut_by_the_request_timeout_and_retried() {
    // Arrange: 200 ms per attempt, one retry, a generous whole-call timeout.
    let upstream = Upstream::start(vec![Reply::Slow(
        Duration::from_secs(1),
        Box::new(completion("tarde demais")),
    )])
    .await;
    let app = gateway(
        &upstream.base_url(),
        5_000,
        "max_retries = 1\nrequest_timeout_ms = 200",
    )
    .await;
    let key = app.admin_key().await;

    // Act
    let resp = app.process(Some(&key), &summarize("texto")).await;

    // Assert
    // A 502 after the retry, not the whole call's 504: each attempt was cut on its own.
    let (status, body) = reasons(resp).await;
    assert_execution_failed(status, &body, 502, "EXECUTOR_FAILED");
    assert_eq!(upstream.calls(), 2);
}

#[tokio::test]
async fn an_unreachable_model_server_is_retried_then_reported() {
    // Arrange: a port that was just free, so nothing listens on it.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let base_url = format!("http://{}/v1", closed.local_addr().unwrap());
    drop(closed);
    let app = gateway(&base_url, 5_000, "max_retries = 1").await;
    let key = app.admin_key().await;

    // Act
    let resp = app.process(Some(&key), &summarize("texto")).await;

    // Assert: the cause is named, the internal address is not.
    let (status, body) = reasons(resp).await;
    let message = assert_execution_failed(status, &body, 502, "EXECUTOR_FAILED");
    assert!(message.contains("upstream unreachable"), "{message}");
    assert!(message.contains("gave up after 2 attempts"), "{message}");
    assert!(!message.contains(&base_url), "{message}");
}

#[tokio::test]
async fn the_shipped_summarizer_loads_with_its_prompt_hash() {
    // Arrange / Act: the example executors folder, as shipped.
    let app = spawn_app().await;

    // Assert
    let summarizer = app.app.executors.get("summarizer").unwrap();
    assert_eq!(summarizer.kind, "llm");
    let facts = summarizer.audit_facts().unwrap();
    assert_eq!(facts["prompt_template"], "prompts/licitacoes.summarize.txt");
    assert_eq!(facts["prompt_sha256"], shipped_prompt_sha256().as_str());
}
