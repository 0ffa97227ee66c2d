//! The OpenAI-compatible facade: `POST /v1/chat/completions` and `GET /v1/models`, so that any OpenAI
//! SDK or agent framework can be pointed at the gateway with a base URL and a key.
//!
//! A model is an action the policy exposes with `model = true`; a chat request runs it through the same
//! turnstile as `/process` (G1 to G4, the ALLOW durable before the executor, the outcome durable before
//! the answer), recorded with `channel: "openai"`. The action's payload is the request body without
//! `model`, `stream` and `stream_options`, so its input schema and its rules' conditions bound the
//! messages and the sampling parameters. A stream relays the executor's chunks as they come and sends
//! `data: [DONE]` only once ACTION_EXECUTED and REQUEST_END are durable. Refusals keep the gateway's
//! status and carry its reason code as OpenAI's `error.code`.

use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Serialize;
use serde_json::{Map, Value, json};
use tokio::sync::mpsc;
use utoipa::ToSchema;

use super::front_door::Client;
use crate::domain::TraceId;
use crate::error::ApiError;
use crate::executors::ChunkSink;
use crate::gates::input::{self, InputRefusal};
use crate::policy::Violation;
use crate::reason::ReasonCode;
use crate::turnstile::{ActionResult, Channel, Door, Running, admit};

/// The header naming the context a facade's request acts in.
pub const CONTEXT_HEADER: &str = "x-catraca-context";
/// Chunks that may wait for a slow client before the executor is held back.
const STREAM_BUFFER: usize = 32;

/// OpenAI's error body: `{"error": {...}}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct OpenAiError {
    pub error: OpenAiErrorDetail,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct OpenAiErrorDetail {
    pub message: String,
    /// `invalid_request_error`, `authentication_error`, `permission_error`, `not_found_error`,
    /// `rate_limit_error`, `server_error` or `service_unavailable_error`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The gateway's first reason code, e.g. `NO_MATCHING_RULE`.
    pub code: String,
    /// The first failing parameter of an `INPUT_SCHEMA_INVALID` (e.g. `messages[0].content`), else
    /// null.
    pub param: Option<String>,
    /// Every reason code, as `/process` would list them.
    pub reason_codes: Vec<String>,
    pub trace_id: Option<String>,
    pub decision_id: Option<String>,
    /// Where the refusal's DECISION is in the audit trail (as in `/process`'s error body).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub receipt: Option<crate::audit::anchor::Receipt>,
}

/// One server-sent event of a streamed completion.
#[derive(Debug, ToSchema)]
#[expect(
    dead_code,
    reason = "describes the stream in the OpenAPI document; the stream itself is written as text"
)]
pub struct StreamEvent {
    /// A `chat.completion.chunk` as JSON, `{"error": {...}}` after a failure, or `[DONE]` once the
    /// outcome is durable.
    pub data: String,
}

/// The list `GET /v1/models` answers.
#[derive(Debug, Serialize, ToSchema)]
pub struct ModelList {
    /// Always `list`.
    pub object: &'static str,
    pub data: Vec<Model>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Model {
    /// The action's name: what `model` names in a chat request.
    pub id: String,
    /// Always `model`.
    pub object: &'static str,
    /// Always 0: a model here is a policy entry, not a release.
    pub created: u64,
    /// Always `catraca`.
    pub owned_by: &'static str,
    pub description: String,
}

/// The gateway's error in OpenAI's shape, with the gateway's status and headers.
pub struct Refused(pub ApiError);

impl From<ApiError> for Refused {
    fn from(e: ApiError) -> Self {
        Self(e)
    }
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        let (head, body) = self.0.answer();
        let detail = error_detail(head.status, body);
        head.respond(Json(OpenAiError { error: detail }))
    }
}

fn error_detail(status: StatusCode, body: crate::error::ErrorBody) -> OpenAiErrorDetail {
    let kind = match status.as_u16() {
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        429 => "rate_limit_error",
        503 => "service_unavailable_error",
        500..=599 => "server_error",
        _ => "invalid_request_error",
    };
    let codes: Vec<String> = body
        .reason_codes
        .iter()
        .map(|c| c.as_str().to_owned())
        .collect();
    OpenAiErrorDetail {
        message: body.message,
        kind,
        code: codes.first().cloned().unwrap_or_default(),
        param: body.violations.first().map(|v| param(&v.pointer)),
        reason_codes: codes,
        trace_id: body.trace_id,
        decision_id: body.decision_id,
        receipt: body.receipt,
    }
}

/// A violation's JSON pointer as OpenAI names a parameter: `/payload/messages/0/content` (the
/// payload is the body without `model` and `stream`) is `messages[0].content`.
fn param(pointer: &str) -> String {
    let path = pointer.strip_prefix("/payload").unwrap_or(pointer);
    let mut out = String::new();
    for token in path.split('/').skip(1) {
        let token = token.replace("~1", "/").replace("~0", "~");
        if !token.is_empty() && token.bytes().all(|b| b.is_ascii_digit()) {
            out.push_str(&format!("[{token}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(&token);
        }
    }
    out
}

/// The context the client named in `X-Catraca-Context`, if any (the OpenAI facade's and the MCP
/// server's).
pub(super) fn asked_context(headers: &HeaderMap) -> Option<String> {
    headers
        .get(CONTEXT_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// Lists the models this key may use in its context.
#[utoipa::path(
    get,
    path = "/v1/models",
    security(("api_key" = []), ("bearer" = [])),
    params(("X-Catraca-Context" = Option<String>, Header, nullable = false, description = "The context to list for; default: the key's only context")),
    responses(
        (status = 200, description = "The models (actions exposed with `model = true`) the key may use in the context", body = ModelList),
        (status = 400, description = "CONTEXT_UNKNOWN: an unknown context, or none named for a key with several", body = OpenAiError),
        (status = 401, description = "AUTH_MISSING_KEY, AUTH_INVALID_KEY, AUTH_KEY_REVOKED, AUTH_KEY_EXPIRED", body = OpenAiError),
        (status = 403, description = "CONTEXT_FORBIDDEN: a context this key may not act in", body = OpenAiError),
        (status = 429, description = "RATE_LIMITED", body = OpenAiError),
        (status = 503, description = "AUDIT_UNAVAILABLE, RATE_LIMIT_UNAVAILABLE", body = OpenAiError)
    )
)]
pub async fn models(
    State(app): State<Arc<crate::app::App>>,
    Client(client): Client,
    Extension(trace_id): Extension<TraceId>,
    headers: HeaderMap,
) -> Result<Json<ModelList>, Refused> {
    let asked = asked_context(&headers);
    let door = Door::new(
        trace_id,
        headers,
        client,
        Channel::OpenAi,
        "GET",
        "/v1/models",
    );
    let models = admit(&app, door)
        .await?
        .list(asked.as_deref(), |a| a.model)
        .await?;
    let data = models
        .iter()
        .map(|a| Model {
            id: a.name.to_string(),
            object: "model",
            created: 0,
            owned_by: "catraca",
            description: a.description.clone(),
        })
        .collect();
    Ok(Json(ModelList {
        object: "list",
        data,
    }))
}

/// What a chat request asks of the facade itself; the rest of the body is the action's payload.
struct ChatRequest {
    model: String,
    stream: bool,
    include_usage: bool,
    payload: Value,
}

/// Reads a chat request body: a JSON object (no duplicate keys) whose `model` is a string; `stream`
/// and `stream_options` are the facade's, everything else goes to the action as its payload.
fn parse_chat(bytes: &[u8]) -> Result<ChatRequest, InputRefusal> {
    let value = input::parse_strict_json(bytes).map_err(|e| {
        InputRefusal::new(
            ReasonCode::InputMalformedJson,
            format!("the request body is not valid JSON: {e}"),
        )
    })?;
    let invalid = |pointer: &str, message: &str| InputRefusal {
        violations: vec![Violation {
            pointer: pointer.to_owned(),
            message: message.to_owned(),
        }],
        ..InputRefusal::new(ReasonCode::InputSchemaInvalid, message)
    };
    let Value::Object(mut fields) = value else {
        return Err(invalid("", "the body must be a JSON object"));
    };
    let model = match fields.remove("model") {
        Some(Value::String(model)) => model,
        _ => return Err(invalid("/model", "model must be a string naming a model")),
    };
    let stream = match fields.remove("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(stream)) => stream,
        Some(_) => return Err(invalid("/stream", "stream must be a boolean")),
    };
    let include_usage = match fields.remove("stream_options") {
        None | Some(Value::Null) => false,
        Some(Value::Object(options)) => match options.get("include_usage") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => {
                return Err(invalid(
                    "/stream_options/include_usage",
                    "include_usage must be a boolean",
                ));
            }
        },
        Some(_) => {
            return Err(invalid(
                "/stream_options",
                "stream_options must be an object",
            ));
        }
    };
    Ok(ChatRequest {
        model,
        stream,
        include_usage,
        payload: Value::Object(fields),
    })
}

/// Runs a chat completion through the turnstile, answered whole or as a stream.
#[utoipa::path(
    post,
    path = "/v1/chat/completions",
    security(("api_key" = []), ("bearer" = [])),
    params(
        ("X-Catraca-Context" = Option<String>, Header, nullable = false, description = "The context the request acts in; default: the key's only context"),
        ("X-Trace-Id" = Option<String>, Header, nullable = false, description = "The client's trace id, as for /process")
    ),
    request_body(content = Object, description = "An OpenAI chat request: `model` (a model from GET /v1/models), `stream`, `stream_options.include_usage`; every other field is the model action's payload, checked by its input schema (e.g. `messages`, `max_tokens`, `temperature`)", content_type = "application/json"),
    responses(
        (status = 200, description = "A `chat.completion` object, or with `stream: true` server-sent `chat.completion.chunk` events ending in `data: [DONE]` once the outcome is durable (a failure after the first chunk is an event `{\"error\": {...}}` and no `[DONE]`)", content((Object = "application/json"), (StreamEvent = "text/event-stream"))),
        (status = 400, description = "INPUT_MALFORMED_JSON, ACTION_UNKNOWN (not a model), CONTEXT_UNKNOWN", body = OpenAiError),
        (status = 401, description = "AUTH_MISSING_KEY, AUTH_INVALID_KEY, AUTH_KEY_REVOKED, AUTH_KEY_EXPIRED", body = OpenAiError),
        (status = 403, description = "NO_MATCHING_RULE, ACTION_FORBIDDEN, CONTEXT_FORBIDDEN, POLICY_EVAL_ERROR or a deny rule's own code", body = OpenAiError),
        (status = 408, description = "INPUT_TIMEOUT", body = OpenAiError),
        (status = 413, description = "INPUT_TOO_LARGE", body = OpenAiError),
        (status = 415, description = "INPUT_UNSUPPORTED_MEDIA_TYPE", body = OpenAiError),
        (status = 422, description = "INPUT_SCHEMA_INVALID (`param` names the first failing pointer)", body = OpenAiError),
        (status = 429, description = "RATE_LIMITED", body = OpenAiError),
        (status = 502, description = "EXECUTOR_FAILED", body = OpenAiError),
        (status = 503, description = "AUDIT_UNAVAILABLE, RATE_LIMIT_UNAVAILABLE, EXECUTOR_DISABLED", body = OpenAiError),
        (status = 504, description = "EXECUTOR_TIMEOUT", body = OpenAiError)
    )
)]
pub async fn chat_completions(
    State(app): State<Arc<crate::app::App>>,
    Client(client): Client,
    Extension(trace_id): Extension<TraceId>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Refused> {
    chat(&app, trace_id, headers, client, body).await
}

async fn chat(
    app: &Arc<crate::app::App>,
    trace_id: TraceId,
    headers: HeaderMap,
    client: IpAddr,
    body: Body,
) -> Result<Response, Refused> {
    let asked = asked_context(&headers);
    let door = Door::new(
        trace_id,
        headers,
        client,
        Channel::OpenAi,
        "POST",
        "/v1/chat/completions",
    );
    let admitted = admit(app, door).await?;
    let (admitted, bytes) = admitted.read_json_body(body).await?;
    let request = parse_chat(&bytes).and_then(|request| {
        // An action the policy does not offer as a model is not one here, whatever else it is.
        match admitted.policy().action(&request.model) {
            Some(action) if !action.model => Err(InputRefusal {
                action: Some(action.clone()),
                ..InputRefusal::new(
                    ReasonCode::ActionUnknown,
                    format!("{} is not a model this gateway offers", request.model),
                )
            }),
            _ => Ok(request),
        }
    });
    let context = request.and_then(|request| Ok((admitted.context(asked.as_deref())?, request)));
    let (context, request) = match context {
        Ok(asked) => asked,
        Err(refusal) => return Err(admitted.refuse_input(refusal).await.into()),
    };
    let allowed = admitted
        .authorize(&request.model, &context, request.payload)
        .await?;
    if !request.stream {
        let result = allowed.execute(None).await?;
        return Ok(Json(completion(result)).into_response());
    }
    let (sink, mut chunks) = ChunkSink::channel(STREAM_BUFFER);
    // The story runs in its own task: a client that goes away mid-stream stops the relay, not the
    // commit of ACTION_EXECUTED and REQUEST_END.
    let mut running = allowed.start(Some(sink));
    // The status goes out with the first chunk; a story that ends before one is answered whole.
    let first = tokio::select! {
        biased;
        Some(chunk) = chunks.recv() => First::Chunk(chunk),
        ended = &mut running => First::Ended(ended),
    };
    let frames = match first {
        First::Chunk(chunk) => Frames::relaying(chunk, chunks, running, request.include_usage),
        First::Ended(Ok(result)) => Frames::whole(result, request.include_usage),
        First::Ended(Err(e)) => return Err(e.into()),
    };
    Ok(event_stream(frames))
}

/// What a stream's first wait brought: a chunk (the answer streams) or the end (it never did).
enum First {
    Chunk(Value),
    Ended(Result<ActionResult, ApiError>),
}

/// The events of one stream, in order.
struct Frames {
    /// Events ready to send.
    ready: std::collections::VecDeque<Bytes>,
    chunks: Option<mpsc::Receiver<Value>>,
    done: Option<Running>,
    include_usage: bool,
}

impl Frames {
    fn relaying(
        first: Value,
        chunks: mpsc::Receiver<Value>,
        done: Running,
        include_usage: bool,
    ) -> Self {
        let mut frames = Self {
            ready: Default::default(),
            chunks: Some(chunks),
            done: Some(done),
            include_usage,
        };
        frames.push_chunk(first);
        frames
    }

    /// A stream made from a whole result (an executor that does not stream): one chunk with the
    /// whole message, the usage when asked, and `[DONE]` (the outcome is already durable).
    fn whole(result: ActionResult, include_usage: bool) -> Self {
        let completion = completion(result);
        let mut frames = Self {
            ready: Default::default(),
            chunks: None,
            done: None,
            include_usage,
        };
        let choices: Vec<Value> = completion
            .get("choices")
            .and_then(Value::as_array)
            .map(|choices| {
                choices
                    .iter()
                    .map(|c| {
                        json!({
                            "index": c.get("index").cloned().unwrap_or(Value::from(0)),
                            "delta": c.get("message").cloned().unwrap_or(Value::Null),
                            "finish_reason": c.get("finish_reason").cloned().unwrap_or(Value::Null),
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        let mut chunk = json!({
            "id": completion.get("id"),
            "object": "chat.completion.chunk",
            "created": completion.get("created"),
            "model": completion.get("model"),
            "choices": choices,
        });
        frames.push_chunk(chunk.clone());
        if let Some(usage) = completion.get("usage").filter(|u| u.is_object()) {
            chunk["choices"] = json!([]);
            chunk["usage"] = usage.clone();
            frames.push_chunk(chunk);
        }
        frames
            .ready
            .push_back(Bytes::from_static(b"data: [DONE]\n\n"));
        frames
    }

    /// Queues one relayed chunk; the usage-only chunk goes out only when the client asked for it.
    fn push_chunk(&mut self, mut chunk: Value) {
        let usage_only = chunk
            .get("choices")
            .and_then(Value::as_array)
            .is_some_and(Vec::is_empty)
            && chunk.get("usage").is_some_and(Value::is_object);
        if usage_only && !self.include_usage {
            return;
        }
        if !self.include_usage
            && let Some(fields) = chunk.as_object_mut()
        {
            fields.remove("usage");
        }
        self.ready.push_back(data(&chunk));
    }

    /// The next event, or `None` when the stream is over.
    async fn next(&mut self) -> Option<Bytes> {
        loop {
            if let Some(frame) = self.ready.pop_front() {
                return Some(frame);
            }
            if let Some(chunks) = &mut self.chunks {
                match chunks.recv().await {
                    Some(chunk) => self.push_chunk(chunk),
                    None => self.chunks = None,
                }
                continue;
            }
            let done = self.done.take()?;
            let end = match done.await {
                Ok(_) => Bytes::from_static(b"data: [DONE]\n\n"),
                Err(e) => {
                    let (head, body) = e.answer();
                    data(&json!({ "error": error_detail(head.status, body) }))
                }
            };
            return Some(end);
        }
    }
}

fn data(value: &Value) -> Bytes {
    Bytes::from(format!("data: {value}\n\n"))
}

fn event_stream(frames: Frames) -> Response {
    let stream = futures_util::stream::unfold(frames, |mut frames| async move {
        let frame = frames.next().await?;
        Some((Ok::<_, Infallible>(frame), frames))
    });
    let mut response = Response::new(Body::from_stream(stream));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // Proxies (nginx) must pass events on as they come.
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

/// The `chat.completion` a result answers: a chat-mode executor's result is one already; any other
/// action's result becomes the assistant's message, as JSON text. The gateway's own facts go under
/// `catraca`.
fn completion(result: ActionResult) -> Value {
    let ActionResult {
        trace_id,
        decision_id,
        action,
        result,
        policy_revision,
        receipt,
        ..
    } = result;
    let mut completion = match result {
        Value::Object(fields) if fields.get("choices").is_some_and(Value::is_array) => fields,
        other => {
            let mut fields = Map::new();
            fields.insert("id".into(), Value::from(format!("chatcmpl-{decision_id}")));
            fields.insert("object".into(), Value::from("chat.completion"));
            fields.insert(
                "created".into(),
                Value::from(time::OffsetDateTime::now_utc().unix_timestamp()),
            );
            fields.insert(
                "choices".into(),
                json!([{
                    "index": 0,
                    "message": {"role": "assistant", "content": other.to_string()},
                    "finish_reason": "stop",
                }]),
            );
            fields.insert("usage".into(), Value::Null);
            fields
        }
    };
    completion.insert("model".into(), Value::from(action));
    let catraca = completion
        .entry("catraca")
        .or_insert_with(|| Value::Object(Map::new()));
    if let Value::Object(catraca) = catraca {
        catraca.insert("trace_id".into(), Value::from(trace_id));
        catraca.insert("decision_id".into(), Value::from(decision_id));
        catraca.insert("policy_revision".into(), Value::from(policy_revision));
        catraca.insert(
            "receipt".into(),
            serde_json::to_value(receipt).unwrap_or(Value::Null),
        );
    }
    Value::Object(completion)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_facade_keeps_model_and_stream_and_passes_the_rest_as_payload() {
        let r = parse_chat(
            br#"{"model":"assistant","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"oi"}],"max_tokens":9}"#,
        )
        .unwrap_or_else(|_| panic!("parsed"));
        assert_eq!(r.model, "assistant");
        assert!(r.stream && r.include_usage);
        assert_eq!(
            r.payload,
            json!({"messages":[{"role":"user","content":"oi"}],"max_tokens":9})
        );
    }

    #[test]
    fn a_chat_body_without_a_model_or_with_bad_stream_options_is_refused_with_its_pointer() {
        for (body, pointer) in [
            (&br#"{"messages":[]}"#[..], "/model"),
            (br#"{"model":1}"#, "/model"),
            (br#"{"model":"m","stream":"yes"}"#, "/stream"),
            (br#"{"model":"m","stream_options":[]}"#, "/stream_options"),
            (br#"[]"#, ""),
        ] {
            match parse_chat(body) {
                Ok(_) => panic!("{body:?} parsed"),
                Err(refusal) => {
                    assert_eq!(refusal.reason, ReasonCode::InputSchemaInvalid);
                    assert_eq!(refusal.violations[0].pointer, pointer);
                }
            }
        }
        let Err(refusal) = parse_chat(br#"{"model":"m","model":"n"}"#) else {
            panic!("a duplicate key parsed")
        };
        assert_eq!(refusal.reason, ReasonCode::InputMalformedJson);
    }

    #[test]
    fn a_violations_pointer_is_named_as_openai_names_a_parameter() {
        assert_eq!(param("/payload/max_tokens"), "max_tokens");
        assert_eq!(param("/payload/messages/0/content"), "messages[0].content");
        assert_eq!(param("/model"), "model");
        assert_eq!(param("/payload/a~1b"), "a/b");
        assert_eq!(param(""), "");
    }

    #[test]
    fn a_usage_chunk_goes_out_only_when_asked() {
        let usage = json!({"choices": [], "usage": {"total_tokens": 3}});
        let text = json!({"choices": [{"index": 0, "delta": {"content": "a"}}], "usage": null});
        for include_usage in [false, true] {
            let mut frames = Frames {
                ready: Default::default(),
                chunks: None,
                done: None,
                include_usage,
            };
            frames.push_chunk(text.clone());
            frames.push_chunk(usage.clone());
            assert_eq!(frames.ready.len(), if include_usage { 2 } else { 1 });
        }
    }
}
