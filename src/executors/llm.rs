//! The `llm` kind: one chat completion on any OpenAI-compatible server (llama.cpp `llama-server`, vLLM,
//! Ollama, OpenAI), with the prompt rendered from a template file whose SHA-256 goes into the audit trail
//! and the result.
//!
//! Settings (the `[settings]` table of the executor file; anything else is refused):
//!
//! | setting | | |
//! |---|---|---|
//! | `base_url` | required | OpenAI-compatible API root, e.g. `http://127.0.0.1:8080/v1` |
//! | `model` | required | model name sent to the server |
//! | `api_key_env` | optional | NAME of the environment variable holding the key; absent, unset or empty = no key |
//! | `prompt_template` | required | template file, relative to the executors folder |
//! | `max_tokens` | optional | upper bound on generated tokens (sent as `max_tokens`) |
//! | `temperature` | optional | 0 to 2 |
//! | `max_retries` | 2 | retries after the first attempt, on 429, 5xx, transport errors and per-attempt timeouts |
//! | `retry_backoff_ms` | 500 | wait before the first retry, doubled for each further one |
//! | `request_timeout_ms` | 30000 | per attempt; the file's `timeout_ms` bounds the whole call |
//!
//! `CATRACA_LLM_BASE_URL` and `CATRACA_LLM_MODEL`, when set and not empty, override `base_url` and
//! `model` of **every** `llm` executor (point the gateway at another model server without editing files).
//! The key is read once, when the executor is built; ambient `OPENAI_*` variables are never used.
//!
//! Template files hold a `[system]` and a `[user]` section of plain text (lines starting with `#` before
//! the first section are comments). `{{field}}` is replaced by the payload's top-level `field`: strings
//! verbatim, other JSON values as compact JSON, a missing field as the empty string. Substituted text is
//! never scanned again, so a payload cannot inject placeholders.
//!
//! Result: `{"summary", "model", "prompt_sha256", "usage": {"prompt_tokens", "completion_tokens"}}`.
//!
//! HTTP: async-openai supplies the request and response types and the endpoint configuration
//! (`OpenAIConfig`), but the request is sent here, on one `reqwest` client per executor, because
//! async-openai's own `Client` (without its `middleware` feature) always wraps requests in a retry layer
//! of its own (3 retries, honouring any `Retry-After`) and reports a non-JSON error body without its
//! status. Sending it here keeps the retry count ours and bounded and the upstream status in every message.

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_openai::config::{Config as _, OpenAIConfig};
use async_openai::types::chat::{
    ChatCompletionRequestMessage, ChatCompletionRequestSystemMessageArgs,
    ChatCompletionRequestUserMessageArgs, CreateChatCompletionRequest,
    CreateChatCompletionRequestArgs, CreateChatCompletionResponse,
};
use async_trait::async_trait;
use prometheus::IntCounter;
use reqwest::StatusCode;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderValue, RETRY_AFTER};
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::{Executor, ExecutorCall, ExecutorError, ExecutorSpec};

/// Overrides `base_url` of every llm executor: one switch to another model server.
pub const BASE_URL_ENV: &str = "CATRACA_LLM_BASE_URL";
/// Overrides `model` of every llm executor.
pub const MODEL_ENV: &str = "CATRACA_LLM_MODEL";

/// Two retries ride out a model server restart or a short 429 burst, and cost at most three calls
/// when the upstream is really down.
const DEFAULT_MAX_RETRIES: u32 = 2;
/// More retries than this only hold a client past any sensible `timeout_ms`; a typo like 100 is refused.
const MAX_RETRIES_LIMIT: u32 = 10;
/// Half a second, doubled per retry (0.5 s, 1 s, ...): long enough for a 429 window to move on, short
/// enough that two retries fit well inside a two-minute executor timeout.
const DEFAULT_RETRY_BACKOFF_MS: u64 = 500;
/// No single wait (computed backoff or the upstream's `Retry-After`) exceeds this: a longer pause
/// is better spent failing and letting the client decide.
const MAX_RETRY_WAIT: Duration = Duration::from_secs(30);
/// Per attempt; the same as the registry's default whole-call timeout, so a file that sets neither
/// still gets one bounded attempt.
const DEFAULT_REQUEST_TIMEOUT_MS: u64 = 30_000;
/// Connection set-up is quick on any reachable server; failing it fast leaves time for a retry.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A completion of a few thousand tokens is tens of KiB; 4 MiB guards memory against a misbehaving
/// upstream without ever cutting a real answer.
const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;
/// Enough for the upstream's own error sentence; short enough for a response body and an audit event.
const DETAIL_CHARS: usize = 200;
/// The OpenAI chat completions route, appended to `base_url`.
const CHAT_PATH: &str = "/chat/completions";
/// Replaces the key wherever an upstream echoed it into an error.
const REDACTED: &str = "[redacted]";

/// The `[settings]` table, as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    base_url: String,
    model: String,
    #[serde(default)]
    api_key_env: Option<String>,
    prompt_template: String,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default = "default_max_retries")]
    max_retries: u32,
    #[serde(default = "default_retry_backoff_ms")]
    retry_backoff_ms: u64,
    #[serde(default = "default_request_timeout_ms")]
    request_timeout_ms: u64,
}

fn default_max_retries() -> u32 {
    DEFAULT_MAX_RETRIES
}
fn default_retry_backoff_ms() -> u64 {
    DEFAULT_RETRY_BACKOFF_MS
}
fn default_request_timeout_ms() -> u64 {
    DEFAULT_REQUEST_TIMEOUT_MS
}

/// An API key: kept out of `Debug` output, and scrubbed from every error message.
#[derive(Clone)]
struct ApiKey(String);

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

/// A parsed `[system]` + `[user]` template.
#[derive(Debug, Clone, PartialEq)]
struct PromptTemplate {
    system: Vec<Segment>,
    user: Vec<Segment>,
}

#[derive(Debug, Clone, PartialEq)]
enum Segment {
    Text(String),
    Field(String),
}

impl PromptTemplate {
    /// Parses a template file's text. Errors say what is wrong, with line numbers.
    fn parse(text: &str) -> Result<Self, String> {
        let mut system: Option<String> = None;
        let mut user: Option<String> = None;
        let mut current: Option<&str> = None;
        let mut body = String::new();
        let mut finish = |section: Option<&str>, body: &mut String| -> Result<(), String> {
            let Some(section) = section else {
                return Ok(());
            };
            let slot = if section == "system" {
                &mut system
            } else {
                &mut user
            };
            if slot.is_some() {
                return Err(format!("the [{section}] section appears twice"));
            }
            *slot = Some(body.trim().to_owned());
            body.clear();
            Ok(())
        };
        for (n, line) in text.lines().enumerate() {
            let header = match line.trim() {
                "[system]" => Some("system"),
                "[user]" => Some("user"),
                _ => None,
            };
            if let Some(section) = header {
                finish(current, &mut body)?;
                current = Some(section);
            } else if current.is_some() {
                body.push_str(line);
                body.push('\n');
            } else if !(line.trim().is_empty() || line.trim_start().starts_with('#')) {
                return Err(format!(
                    "line {}: text before the first section (start with [system])",
                    n + 1
                ));
            }
        }
        finish(current, &mut body)?;
        let section = |name: &str, text: Option<String>| match text {
            None => Err(format!("there is no [{name}] section")),
            Some(t) if t.is_empty() => Err(format!("the [{name}] section is empty")),
            Some(t) => split_placeholders(&t).map_err(|e| format!("[{name}] section: {e}")),
        };
        Ok(Self {
            system: section("system", system)?,
            user: section("user", user)?,
        })
    }

    fn render(&self, payload: &Value) -> (String, String) {
        (render(&self.system, payload), render(&self.user, payload))
    }
}

/// Splits section text into literal text and `{{field}}` placeholders.
fn split_placeholders(text: &str) -> Result<Vec<Segment>, String> {
    let mut segments = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("{{") {
        let line = text.len() - rest.len() + start;
        let line = text[..line].matches('\n').count() + 1;
        if start > 0 {
            segments.push(Segment::Text(rest[..start].to_owned()));
        }
        let after = &rest[start + 2..];
        let end = after
            .find("}}")
            .ok_or_else(|| format!("line {line} of the section: {{{{ is never closed with }}}}"))?;
        let name = after[..end].trim();
        let valid = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'));
        if !valid {
            return Err(format!(
                "line {line} of the section: {{{{{}}}}} is not a payload field name (letters, digits, '_', '-')",
                &after[..end]
            ));
        }
        segments.push(Segment::Field(name.to_owned()));
        rest = &after[end + 2..];
    }
    if !rest.is_empty() {
        segments.push(Segment::Text(rest.to_owned()));
    }
    Ok(segments)
}

fn render(segments: &[Segment], payload: &Value) -> String {
    let mut out = String::new();
    for segment in segments {
        match segment {
            Segment::Text(t) => out.push_str(t),
            Segment::Field(name) => match payload.get(name) {
                None => {}
                Some(Value::String(s)) => out.push_str(s),
                Some(other) => out.push_str(&other.to_string()),
            },
        }
    }
    out
}

/// Token counters of one executor, resolved once so a call only increments.
struct Tokens {
    prompt: IntCounter,
    completion: IntCounter,
}

/// A configured `llm` executor.
struct Llm {
    name: String,
    model: String,
    /// `base_url` + the chat completions path.
    url: String,
    /// From `OpenAIConfig::headers()`: `Authorization: Bearer …` (marked sensitive) when there is a key.
    headers: HeaderMap,
    key: Option<ApiKey>,
    http: reqwest::Client,
    template: PromptTemplate,
    template_path: String,
    prompt_sha256: String,
    max_tokens: Option<u32>,
    temperature: Option<f32>,
    max_retries: u32,
    retry_backoff: Duration,
    request_timeout: Duration,
    tokens: Option<Tokens>,
}

impl fmt::Debug for Llm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Llm")
            .field("name", &self.name)
            .field("model", &self.model)
            .field("url", &self.url)
            .field("key", &self.key)
            .field("prompt_template", &self.template_path)
            .field("prompt_sha256", &self.prompt_sha256)
            .field("max_retries", &self.max_retries)
            .field("request_timeout", &self.request_timeout)
            .finish_non_exhaustive()
    }
}

/// Builds an `llm` executor from its settings and the process environment.
pub(super) fn build(spec: &ExecutorSpec<'_>) -> Result<Arc<dyn Executor>, String> {
    let llm = build_with(spec, &crate::config::env_var)?;
    Ok(Arc::new(llm))
}

/// [`build`] with the environment lookup passed in, so tests can give a key without touching the
/// process environment.
fn build_with(
    spec: &ExecutorSpec<'_>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Llm, String> {
    let settings: Settings = toml::Value::Table(spec.settings.clone())
        .try_into()
        .map_err(|e: toml::de::Error| format!("llm settings: {}", e.message()))?;

    let set = |name: &str| env(name).filter(|v| !v.trim().is_empty());
    let base_url = set(BASE_URL_ENV).unwrap_or(settings.base_url);
    let base_url = parse_base_url(&base_url)?;
    let model = set(MODEL_ENV).unwrap_or(settings.model).trim().to_owned();
    if model.is_empty() {
        return Err("model must not be empty".into());
    }
    if let Some(t) = settings.temperature
        && !(0.0..=2.0).contains(&t)
    {
        return Err(format!("temperature must be between 0 and 2, got {t}"));
    }
    if settings.max_tokens == Some(0) {
        return Err("max_tokens must be positive".into());
    }
    if settings.max_retries > MAX_RETRIES_LIMIT {
        return Err(format!(
            "max_retries must be at most {MAX_RETRIES_LIMIT}, got {}",
            settings.max_retries
        ));
    }
    if settings.request_timeout_ms == 0 {
        return Err("request_timeout_ms must be positive".into());
    }
    if Duration::from_millis(settings.request_timeout_ms) >= spec.timeout {
        tracing::warn!(
            executor = spec.name,
            "request_timeout_ms is not below the file's timeout_ms: a slow attempt ends the whole call (504) and is never retried"
        );
    }

    let key = match &settings.api_key_env {
        None => None,
        Some(var) => {
            let valid = var.bytes().next().is_some_and(|b| !b.is_ascii_digit())
                && var.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
            if !valid {
                return Err(format!(
                    "api_key_env must name an environment variable (A-Z, 0-9, '_'), got {var:?}"
                ));
            }
            let key = set(var).map(|k| ApiKey(k.trim().to_owned()));
            if key.is_none() {
                tracing::warn!(executor = spec.name, variable = %var, "api_key_env is unset or empty: calling the model server without a key");
            }
            key
        }
    };

    let (template, template_path, prompt_sha256) =
        load_template(&spec.env.dir, &settings.prompt_template)?;

    // Explicit configuration: every field set here, so nothing ambient (OPENAI_BASE_URL,
    // OPENAI_API_KEY, OPENAI_ORG_ID, OPENAI_PROJECT_ID) reaches the request.
    let key_text = key.as_ref().map(|k| k.0.clone()).unwrap_or_default();
    // OpenAIConfig::headers() panics on a key that is not a valid header value: check first.
    if HeaderValue::from_str(&format!("Bearer {key_text}")).is_err() {
        return Err(format!(
            "the value of {} cannot be sent as a bearer token (control characters?)",
            settings
                .api_key_env
                .as_deref()
                .unwrap_or("the key variable")
        ));
    }
    let config = OpenAIConfig::new()
        .with_api_base(base_url)
        .with_api_key(key_text)
        .with_org_id("")
        .with_project_id("");
    let url = config.url(CHAT_PATH);
    let mut headers = config.headers();
    match (&key, headers.get_mut(AUTHORIZATION)) {
        // A local server needs no key; an empty `Bearer ` would only confuse proxies.
        (None, _) => {
            headers.remove(AUTHORIZATION);
        }
        (Some(_), Some(value)) => value.set_sensitive(true),
        (Some(_), None) => {}
    }

    let request_timeout = Duration::from_millis(settings.request_timeout_ms);
    let http = reqwest::Client::builder()
        .timeout(request_timeout)
        .connect_timeout(request_timeout.min(CONNECT_TIMEOUT))
        // An API endpoint has no business redirecting; following one could carry the key elsewhere.
        .redirect(reqwest::redirect::Policy::none())
        // The base URL says where the model server is; no ambient HTTP(S)_PROXY in between.
        .no_proxy()
        .user_agent(concat!("catraca/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| format!("building the HTTP client: {e}"))?;

    let tokens = spec.env.metrics.as_ref().map(|m| Tokens {
        prompt: m.llm_tokens.with_label_values(&[spec.name, "prompt"]),
        completion: m.llm_tokens.with_label_values(&[spec.name, "completion"]),
    });

    Ok(Llm {
        name: spec.name.to_owned(),
        model,
        url,
        headers,
        key,
        http,
        template,
        template_path,
        prompt_sha256,
        max_tokens: settings.max_tokens,
        temperature: settings.temperature,
        max_retries: settings.max_retries,
        retry_backoff: Duration::from_millis(settings.retry_backoff_ms),
        request_timeout,
        tokens,
    })
}

/// Checks `base_url` and drops a trailing slash (the chat path starts with one).
fn parse_base_url(raw: &str) -> Result<String, String> {
    let trimmed = raw.trim().trim_end_matches('/');
    let url = reqwest::Url::parse(trimmed)
        .map_err(|e| format!("base_url {trimmed:?} is not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("base_url {trimmed:?} must be http or https"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(
            "base_url must not carry credentials: name the key's variable in api_key_env".into(),
        );
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!(
            "base_url {trimmed:?} must not have a query or fragment"
        ));
    }
    Ok(trimmed.to_owned())
}

/// Reads and parses the template once; returns it, its path as written, and the SHA-256 of its bytes.
fn load_template(dir: &Path, relative: &str) -> Result<(PromptTemplate, String, String), String> {
    if relative.trim().is_empty() {
        return Err("prompt_template must name a file".into());
    }
    if Path::new(relative).is_absolute() {
        return Err(format!(
            "prompt_template {relative:?} must be relative to the executors folder"
        ));
    }
    let path = dir.join(relative);
    let bytes = std::fs::read(&path)
        .map_err(|e| format!("reading prompt template {}: {e}", path.display()))?;
    let prompt_sha256 = hex::encode(Sha256::digest(&bytes));
    let text = String::from_utf8(bytes)
        .map_err(|_| format!("prompt template {} is not UTF-8", path.display()))?;
    let template = PromptTemplate::parse(&text)
        .map_err(|e| format!("prompt template {}: {e}", path.display()))?;
    Ok((template, relative.to_owned(), prompt_sha256))
}

/// Why one attempt failed.
#[derive(Debug)]
enum AttemptError {
    /// The upstream answered with a non-success status.
    Status {
        status: StatusCode,
        detail: String,
        retry_after: Option<Duration>,
    },
    /// No answer: connection refused or reset, DNS, TLS...
    Unreachable(String),
    /// No complete answer within `request_timeout_ms`.
    TimedOut,
    /// A 2xx whose body is not a usable chat completion.
    NotCompletion(String),
    /// A body larger than [`MAX_BODY_BYTES`].
    TooLarge,
}

impl AttemptError {
    /// 429, 5xx and "no answer" may go away; other 4xx and bad bodies will not.
    fn retryable(&self) -> bool {
        match self {
            Self::Status { status, .. } => {
                *status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error()
            }
            Self::Unreachable(_) | Self::TimedOut => true,
            Self::NotCompletion(_) | Self::TooLarge => false,
        }
    }

    fn message(&self, request_timeout: Duration) -> String {
        match self {
            Self::Status { status, detail, .. } if detail.is_empty() => {
                format!("upstream answered {}", status.as_u16())
            }
            Self::Status { status, detail, .. } => {
                format!("upstream answered {}: {detail}", status.as_u16())
            }
            Self::Unreachable(cause) => format!("upstream unreachable: {cause}"),
            Self::TimedOut => format!(
                "upstream did not answer within {}ms",
                request_timeout.as_millis()
            ),
            Self::NotCompletion(why) => format!("upstream body is not a chat completion: {why}"),
            Self::TooLarge => format!("upstream body exceeds {MAX_BODY_BYTES} bytes"),
        }
    }
}

/// A reqwest failure as an attempt error; the URL is dropped (it names internal hosts) and the cause
/// chain kept (it says *why*: refused, reset, DNS).
fn transport_error(e: reqwest::Error) -> AttemptError {
    if e.is_timeout() {
        return AttemptError::TimedOut;
    }
    let e = e.without_url();
    let mut text = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    AttemptError::Unreachable(shorten(&text))
}

/// One line, no control characters, at most [`DETAIL_CHARS`] characters.
fn shorten(text: &str) -> String {
    let flat = text.split_whitespace().collect::<Vec<_>>().join(" ");
    let mut out: String = flat.chars().take(DETAIL_CHARS).collect();
    if flat.chars().count() > DETAIL_CHARS {
        out.push('…');
    }
    out
}

/// The useful sentence of an error body: OpenAI's `{"error": {"message"}}`, Ollama's
/// `{"error": "..."}`, a bare `{"message"}`, else the text itself (an HTML page is named, not quoted).
fn error_detail(body: &[u8]) -> String {
    if let Ok(v) = serde_json::from_slice::<Value>(body) {
        let message = v
            .pointer("/error/message")
            .or_else(|| v.get("error"))
            .or_else(|| v.get("message"))
            .and_then(Value::as_str);
        if let Some(m) = message {
            return shorten(m);
        }
    }
    let text = String::from_utf8_lossy(body);
    if text.trim_start().starts_with('<') {
        return "an HTML page".into();
    }
    shorten(&text)
}

/// Reads a body up to [`MAX_BODY_BYTES`].
async fn read_body(mut resp: reqwest::Response) -> Result<Vec<u8>, AttemptError> {
    if resp
        .content_length()
        .is_some_and(|n| n > MAX_BODY_BYTES as u64)
    {
        return Err(AttemptError::TooLarge);
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(transport_error)? {
        if body.len() + chunk.len() > MAX_BODY_BYTES {
            return Err(AttemptError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// `Retry-After` in seconds (the HTTP-date form is rare on APIs and ignored).
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get(RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
}

/// What a successful call yields.
struct Answer {
    text: String,
    model: String,
    prompt_tokens: u32,
    completion_tokens: u32,
}

impl Llm {
    fn request(&self, payload: &Value) -> Result<CreateChatCompletionRequest, String> {
        let (system, user) = self.template.render(payload);
        let messages: Vec<ChatCompletionRequestMessage> = vec![
            ChatCompletionRequestSystemMessageArgs::default()
                .content(system)
                .build()
                .map_err(|e| e.to_string())?
                .into(),
            ChatCompletionRequestUserMessageArgs::default()
                .content(user)
                .build()
                .map_err(|e| e.to_string())?
                .into(),
        ];
        let mut args = CreateChatCompletionRequestArgs::default();
        args.model(self.model.as_str()).messages(messages);
        if let Some(max) = self.max_tokens {
            // `max_tokens`, not `max_completion_tokens`: the field every OpenAI-compatible server
            // (llama.cpp, Ollama, vLLM) reads; async-openai marks it deprecated for OpenAI's o-series.
            args.max_tokens(max);
        }
        if let Some(t) = self.temperature {
            args.temperature(t);
        }
        args.build().map_err(|e| e.to_string())
    }

    /// One HTTP exchange under the client's per-attempt timeout.
    async fn attempt(&self, body: &[u8]) -> Result<Answer, AttemptError> {
        let resp = self
            .http
            .post(&self.url)
            .headers(self.headers.clone())
            .header(CONTENT_TYPE, "application/json")
            .body(body.to_vec())
            .send()
            .await
            .map_err(transport_error)?;
        let status = resp.status();
        let retry_after = retry_after(resp.headers());
        let bytes = read_body(resp).await?;
        if !status.is_success() {
            return Err(AttemptError::Status {
                status,
                detail: error_detail(&bytes),
                retry_after,
            });
        }
        let completion: CreateChatCompletionResponse = serde_json::from_slice(&bytes)
            .map_err(|e| AttemptError::NotCompletion(shorten(&e.to_string())))?;
        let choice = completion
            .choices
            .first()
            .ok_or_else(|| AttemptError::NotCompletion("it has no choices".into()))?;
        let text =
            choice.message.content.as_deref().ok_or_else(|| {
                AttemptError::NotCompletion("its first choice has no text".into())
            })?;
        let usage = completion.usage.as_ref();
        Ok(Answer {
            text: text.trim().to_owned(),
            model: if completion.model.trim().is_empty() {
                self.model.clone()
            } else {
                completion.model.clone()
            },
            prompt_tokens: usage.map_or(0, |u| u.prompt_tokens),
            completion_tokens: usage.map_or(0, |u| u.completion_tokens),
        })
    }

    /// The wait before retry number `retry` (1-based): the backoff doubled each time, at least the
    /// upstream's `Retry-After`, at most [`MAX_RETRY_WAIT`].
    fn wait_before(&self, retry: u32, error: &AttemptError) -> Duration {
        let doubled = self
            .retry_backoff
            .saturating_mul(2u32.saturating_pow(retry.saturating_sub(1)));
        let asked = match error {
            AttemptError::Status { retry_after, .. } => retry_after.unwrap_or_default(),
            _ => Duration::ZERO,
        };
        doubled.max(asked).min(MAX_RETRY_WAIT)
    }

    /// A message safe for clients and the audit trail: the key, should an upstream echo it, is cut out.
    fn scrub(&self, message: String) -> String {
        match &self.key {
            Some(ApiKey(k)) if !k.is_empty() && message.contains(k.as_str()) => {
                message.replace(k.as_str(), REDACTED)
            }
            _ => message,
        }
    }

    fn failure(&self, error: &AttemptError, attempts: u32) -> ExecutorError {
        let mut message = error.message(self.request_timeout);
        if attempts > 1 {
            message.push_str(&format!(" (gave up after {attempts} attempts)"));
        }
        ExecutorError::Failed(self.scrub(message))
    }
}

#[async_trait]
impl Executor for Llm {
    #[tracing::instrument(skip_all, fields(executor = %self.name, trace_id = %call.trace_id))]
    async fn execute(&self, call: ExecutorCall) -> Result<Value, ExecutorError> {
        let request = self
            .request(&call.payload)
            .map_err(|e| ExecutorError::Failed(format!("building the chat request: {e}")))?;
        let body = serde_json::to_vec(&request)
            .map_err(|e| ExecutorError::Failed(format!("encoding the chat request: {e}")))?;
        let mut attempts = 0u32;
        let answer = loop {
            attempts += 1;
            match self.attempt(&body).await {
                Ok(answer) => break answer,
                Err(e) if e.retryable() && attempts <= self.max_retries => {
                    let wait = self.wait_before(attempts, &e);
                    tracing::warn!(
                        attempt = attempts,
                        wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
                        error = %self.scrub(e.message(self.request_timeout)),
                        "model server attempt failed; retrying"
                    );
                    tokio::time::sleep(wait).await;
                }
                Err(e) => return Err(self.failure(&e, attempts)),
            }
        };
        if let Some(tokens) = &self.tokens {
            tokens.prompt.inc_by(u64::from(answer.prompt_tokens));
            tokens
                .completion
                .inc_by(u64::from(answer.completion_tokens));
        }
        tracing::debug!(
            attempts,
            prompt_tokens = answer.prompt_tokens,
            completion_tokens = answer.completion_tokens,
            "model server answered"
        );
        Ok(json!({
            "summary": answer.text,
            "model": answer.model,
            "prompt_sha256": self.prompt_sha256,
            "usage": {
                "prompt_tokens": answer.prompt_tokens,
                "completion_tokens": answer.completion_tokens,
            },
        }))
    }

    fn audit_facts(&self) -> Option<Value> {
        Some(json!({
            "model": self.model,
            "prompt_template": self.template_path,
            "prompt_sha256": self.prompt_sha256,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::executors::ExecutorEnv;

    const SECRET: &str = "sk-test-0123456789abcdef";

    fn template_dir(text: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("prompts")).unwrap();
        std::fs::write(dir.path().join("prompts/t.txt"), text).unwrap();
        dir
    }

    fn settings(extra: &str) -> toml::Table {
        let text = format!(
            "base_url = \"http://127.0.0.1:9/v1/\"\nmodel = \"m\"\nprompt_template = \"prompts/t.txt\"\n{extra}"
        );
        toml::from_str(&text).unwrap()
    }

    fn build_in(
        dir: &Path,
        settings: &toml::Table,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Llm, String> {
        let env_ = ExecutorEnv {
            dir: dir.to_path_buf(),
            ..ExecutorEnv::default()
        };
        let spec = ExecutorSpec {
            name: "t",
            settings,
            env: &env_,
            timeout: Duration::from_secs(120),
        };
        build_with(&spec, env)
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn key_env(name: &str) -> Option<String> {
        (name == "T_KEY").then(|| SECRET.to_owned())
    }

    #[test]
    fn a_template_renders_fields_and_never_rescans_them() {
        let t = PromptTemplate::parse(
            "# comment\n[system]\nSys {{ title }}\n\n[user]\nA={{text}} N={{n}} O={{obj}} M={{missing}}\n",
        )
        .unwrap();
        let payload = json!({"title": "T", "text": "{{title}}", "n": 3, "obj": {"a": [1, 2]}});
        let (system, user) = t.render(&payload);
        assert_eq!(system, "Sys T");
        assert_eq!(user, "A={{title}} N=3 O={\"a\":[1,2]} M=");
    }

    #[test]
    fn malformed_templates_are_refused_with_a_reason() {
        for (text, needle) in [
            ("[user]\nx", "no [system]"),
            ("[system]\nx", "no [user]"),
            ("[system]\n\n[user]\nx", "[system] section is empty"),
            ("[system]\na\n[user]\nb\n[user]\nc", "twice"),
            ("hello\n[system]\na\n[user]\nb", "before the first section"),
            ("[system]\na {{text\n[user]\nb", "never closed"),
            ("[system]\na\n[user]\nb {{a b}}", "not a payload field"),
        ] {
            let err = PromptTemplate::parse(text).unwrap_err();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
    }

    #[test]
    fn the_shipped_summarizer_prompt_parses_and_uses_text_and_title() {
        let text = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("executors/prompts/licitacoes.summarize.txt"),
        )
        .unwrap();
        let t = PromptTemplate::parse(&text).unwrap();
        let (system, user) =
            t.render(&json!({"title": "Pregão 12/2026", "text": "Aquisição de papel"}));
        assert!(system.contains("14.133/2021"), "{system}");
        assert!(
            user.contains("Pregão 12/2026") && user.contains("Aquisição de papel"),
            "{user}"
        );
    }

    #[test]
    fn build_reads_the_template_once_and_records_its_hash() {
        let text = "[system]\ns\n[user]\nu {{text}}\n";
        let dir = template_dir(text);
        let llm = build_in(dir.path(), &settings(""), &no_env).unwrap();
        let want = hex::encode(Sha256::digest(text.as_bytes()));
        assert_eq!(
            llm.audit_facts(),
            Some(json!({"model": "m", "prompt_template": "prompts/t.txt", "prompt_sha256": want}))
        );
        assert_eq!(llm.url, "http://127.0.0.1:9/v1/chat/completions");
        assert!(
            !llm.headers.contains_key(AUTHORIZATION),
            "no key, no header"
        );
    }

    #[test]
    fn defaults_are_two_retries_half_a_second_of_backoff_and_thirty_seconds_per_attempt() {
        let dir = template_dir("[system]\ns\n[user]\nu\n");
        let llm = build_in(dir.path(), &settings(""), &no_env).unwrap();
        // The README's defaults, written out: max_retries 2, retry_backoff_ms 500, request_timeout_ms 30000.
        assert_eq!(llm.max_retries, 2);
        assert_eq!(llm.retry_backoff, Duration::from_millis(500));
        assert_eq!(llm.request_timeout, Duration::from_millis(30_000));
    }

    #[test]
    fn a_missing_template_is_a_build_error_naming_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let err = build_in(dir.path(), &settings(""), &no_env).unwrap_err();
        assert!(err.contains("prompts/t.txt"), "{err}");
    }

    #[test]
    fn unknown_and_out_of_range_settings_are_refused() {
        let dir = template_dir("[system]\ns\n[user]\nu\n");
        for (extra, needle) in [
            ("temprature = 0.2", "unknown field `temprature`"),
            ("temperature = 3.0", "temperature"),
            ("max_retries = 100", "max_retries"),
            ("max_tokens = 0", "max_tokens"),
            ("request_timeout_ms = 0", "request_timeout_ms"),
            ("api_key_env = \"not a name\"", "api_key_env"),
        ] {
            let err = build_in(dir.path(), &settings(extra), &no_env).unwrap_err();
            assert!(err.contains(needle), "{extra}: {err}");
        }
        let mut bad_url = settings("");
        bad_url.insert("base_url".into(), "http://user:pw@host/v1".into());
        let err = build_in(dir.path(), &bad_url, &no_env).unwrap_err();
        assert!(err.contains("credentials") && !err.contains("pw"), "{err}");
    }

    #[test]
    fn environment_overrides_base_url_and_model() {
        let dir = template_dir("[system]\ns\n[user]\nu\n");
        let env = |name: &str| match name {
            BASE_URL_ENV => Some("http://10.0.0.5:11434/v1".to_owned()),
            MODEL_ENV => Some("llama3.1:8b".to_owned()),
            _ => None,
        };
        let llm = build_in(dir.path(), &settings(""), &env).unwrap();
        assert_eq!(llm.url, "http://10.0.0.5:11434/v1/chat/completions");
        assert_eq!(llm.model, "llama3.1:8b");
    }

    #[test]
    fn the_key_is_sent_as_bearer_but_never_shown() {
        let dir = template_dir("[system]\ns\n[user]\nu\n");
        let llm = build_in(dir.path(), &settings("api_key_env = \"T_KEY\""), &key_env).unwrap();

        let auth = &llm.headers[AUTHORIZATION];
        assert_eq!(auth.to_str().unwrap(), format!("Bearer {SECRET}"));
        assert!(auth.is_sensitive());
        assert!(!format!("{llm:?}").contains(SECRET), "{llm:?}");
        assert!(!format!("{:?}", llm.headers).contains(SECRET));
        assert!(!llm.audit_facts().unwrap().to_string().contains(SECRET));

        // An upstream that echoes the key into its error does not get it through to the client.
        let echoed = AttemptError::Status {
            status: StatusCode::UNAUTHORIZED,
            detail: error_detail(
                format!(r#"{{"error": {{"message": "Incorrect API key provided: {SECRET}"}}}}"#)
                    .as_bytes(),
            ),
            retry_after: None,
        };
        let ExecutorError::Failed(message) = llm.failure(&echoed, 1) else {
            panic!("a status failure is Failed");
        };
        assert!(
            message.starts_with("upstream answered 401: Incorrect API key"),
            "{message}"
        );
        assert!(!message.contains(SECRET), "{message}");
        assert!(message.contains(REDACTED), "{message}");
    }

    #[test]
    fn a_key_variable_that_is_unset_means_no_key() {
        let dir = template_dir("[system]\ns\n[user]\nu\n");
        let llm = build_in(
            dir.path(),
            &settings("api_key_env = \"UNSET_KEY\""),
            &no_env,
        )
        .unwrap();
        assert!(llm.key.is_none());
        assert!(!llm.headers.contains_key(AUTHORIZATION));
    }

    #[test]
    fn error_details_are_short_single_lines() {
        assert_eq!(
            error_detail(br#"{"error":"model not found"}"#),
            "model not found"
        );
        assert_eq!(
            error_detail(b"<html><body>Bad Gateway</body></html>"),
            "an HTML page"
        );
        assert_eq!(error_detail(b"line one\nline   two"), "line one line two");
        let long = "x".repeat(1000);
        assert_eq!(
            error_detail(long.as_bytes()).chars().count(),
            DETAIL_CHARS + 1
        );
    }

    #[test]
    fn only_rate_limits_server_errors_and_no_answer_are_retried() {
        let status = |code: u16| AttemptError::Status {
            status: StatusCode::from_u16(code).unwrap(),
            detail: String::new(),
            retry_after: None,
        };
        assert!(status(429).retryable());
        assert!(status(500).retryable());
        assert!(status(503).retryable());
        assert!(!status(400).retryable());
        assert!(!status(401).retryable());
        assert!(!status(404).retryable());
        assert!(AttemptError::TimedOut.retryable());
        assert!(AttemptError::Unreachable("refused".into()).retryable());
        assert!(!AttemptError::NotCompletion("x".into()).retryable());
    }

    #[test]
    fn backoff_doubles_honours_retry_after_and_is_capped() {
        let dir = template_dir("[system]\ns\n[user]\nu\n");
        let llm = build_in(dir.path(), &settings("retry_backoff_ms = 100"), &no_env).unwrap();
        let e = AttemptError::TimedOut;
        assert_eq!(llm.wait_before(1, &e), Duration::from_millis(100));
        assert_eq!(llm.wait_before(2, &e), Duration::from_millis(200));
        assert_eq!(llm.wait_before(3, &e), Duration::from_millis(400));
        // No wait exceeds the README's 30 s cap, computed or asked for.
        assert_eq!(llm.wait_before(40, &e), Duration::from_secs(30));
        let limited = AttemptError::Status {
            status: StatusCode::TOO_MANY_REQUESTS,
            detail: String::new(),
            retry_after: Some(Duration::from_secs(2)),
        };
        assert_eq!(llm.wait_before(1, &limited), Duration::from_secs(2));
        let greedy = AttemptError::Status {
            status: StatusCode::TOO_MANY_REQUESTS,
            detail: String::new(),
            retry_after: Some(Duration::from_secs(3600)),
        };
        assert_eq!(llm.wait_before(1, &greedy), Duration::from_secs(30));
    }

    #[test]
    fn the_request_carries_model_messages_and_limits() {
        let dir = template_dir("[system]\nS\n[user]\nU {{text}}\n");
        let llm = build_in(
            dir.path(),
            &settings("max_tokens = 64\ntemperature = 0.5"),
            &no_env,
        )
        .unwrap();
        let body = serde_json::to_value(llm.request(&json!({"text": "olá"})).unwrap()).unwrap();
        assert_eq!(body["model"], "m");
        assert_eq!(body["max_tokens"], 64);
        assert_eq!(body["temperature"], 0.5);
        assert_eq!(body["messages"][0]["role"], "system");
        assert_eq!(body["messages"][0]["content"], "S");
        assert_eq!(body["messages"][1]["role"], "user");
        assert_eq!(body["messages"][1]["content"], "U olá");
        assert!(body.get("stream").is_none());
    }
}
