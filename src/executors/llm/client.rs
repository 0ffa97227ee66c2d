//! The chat client: one chat completion on an OpenAI-compatible server, with bounded retries.
//!
//! async-openai supplies the request and response types and the endpoint configuration
//! (`OpenAIConfig`), but the request is sent here, on one `reqwest` client per executor, because
//! async-openai's own `Client` (without its `middleware` feature) always wraps requests in a retry layer
//! of its own (3 retries, honouring any `Retry-After`) and reports a non-JSON error body without its
//! status. Sending it here keeps the retry count ours and bounded and the upstream status in every message.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_openai::config::{Config as _, OpenAIConfig};
use async_openai::types::chat::{CreateChatCompletionRequest, CreateChatCompletionResponse};
use async_trait::async_trait;
use eventsource_stream::Eventsource as _;
use futures_util::StreamExt as _;
use reqwest::StatusCode;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderValue, RETRY_AFTER};
use serde_json::Value;

use super::settings::{ApiKey, REDACTED, Settings};
use super::stream::Assembly;
use crate::executors::{ChunkSink, ExecutorError, upstream_trace_headers};

/// No single wait (computed backoff or the upstream's `Retry-After`) exceeds this: a longer pause
/// is better spent failing and letting the client decide.
const MAX_RETRY_WAIT: Duration = Duration::from_secs(30);
/// Connection set-up is quick on any reachable server; failing it fast leaves time for a retry.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A completion of a few thousand tokens is tens of KiB; 4 MiB guards memory against a misbehaving
/// upstream without ever cutting a real answer.
const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;
/// Enough for the upstream's own error sentence; short enough for a response body and an audit event.
const DETAIL_CHARS: usize = 200;
/// The OpenAI chat completions route, appended to `base_url`.
const CHAT_PATH: &str = "/chat/completions";

/// What the `llm` executor needs of a model server: one chat completion. The HTTP implementation is
/// [`HttpChat`]; tests put a stand-in here.
#[async_trait]
pub trait ChatClient: fmt::Debug + Send + Sync {
    /// Sends `request` (retrying as configured) and returns the first choice's text. A failure is
    /// [`ExecutorError::Failed`] with a message safe for clients and the audit trail (never the key).
    async fn complete(
        &self,
        request: &CreateChatCompletionRequest,
    ) -> Result<Answer, ExecutorError>;

    /// Chat mode: sends `body` (a chat request as the executor shaped it) and returns the upstream's
    /// completion as JSON. With `relay`, asks for a stream (with usage) and relays each chunk, its
    /// `model` shown as `shown_model`, as it comes; the result is then the completion the chunks make.
    /// Retries happen only before the first chunk is relayed.
    async fn chat(
        &self,
        body: &Value,
        relay: Option<&ChunkSink>,
        shown_model: &str,
    ) -> Result<Value, ExecutorError>;
}

/// What a successful completion yields.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub text: String,
    /// The model the server says answered, else the one asked for.
    pub model: String,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
}

/// The chat client over HTTP: explicit base URL, key and timeouts, nothing ambient.
pub struct HttpChat {
    /// `base_url` + the chat completions path.
    url: String,
    /// From `OpenAIConfig::headers()`: `Authorization: Bearer …` (marked sensitive) when there is a key.
    headers: HeaderMap,
    key: Option<ApiKey>,
    http: reqwest::Client,
    max_retries: u32,
    retry_backoff: Duration,
    request_timeout: Duration,
    call_timeout: Duration,
}

impl fmt::Debug for HttpChat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpChat")
            .field("url", &self.url)
            .field("key", &self.key)
            .field("max_retries", &self.max_retries)
            .field("request_timeout", &self.request_timeout)
            .finish_non_exhaustive()
    }
}

impl HttpChat {
    /// A client for the server, key and retry settings of `settings`.
    pub(super) fn new(settings: &Settings) -> Result<Self, String> {
        // Explicit configuration: every field set here, so nothing ambient (OPENAI_BASE_URL,
        // OPENAI_API_KEY, OPENAI_ORG_ID, OPENAI_PROJECT_ID) reaches the request.
        let key_text = settings
            .key
            .as_ref()
            .map(|k| k.0.clone())
            .unwrap_or_default();
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
            .with_api_base(settings.base_url.as_str())
            .with_api_key(key_text)
            .with_org_id("")
            .with_project_id("");
        let url = config.url(CHAT_PATH);
        let mut headers = config.headers();
        match (&settings.key, headers.get_mut(AUTHORIZATION)) {
            // A local server needs no key; an empty `Bearer ` would only confuse proxies.
            (None, _) => {
                headers.remove(AUTHORIZATION);
            }
            (Some(_), Some(value)) => value.set_sensitive(true),
            (Some(_), None) => {}
        }

        let request_timeout = settings.request_timeout;
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
        Ok(Self {
            url,
            headers,
            key: settings.key.clone(),
            http,
            max_retries: settings.max_retries,
            retry_backoff: settings.retry_backoff,
            request_timeout,
            call_timeout: settings.call_timeout,
        })
    }

    /// One HTTP exchange under the client's per-attempt timeout.
    async fn attempt(&self, body: &[u8], asked_model: &str) -> Result<Answer, AttemptError> {
        let bytes = read_body(self.send(body, false).await?).await?;
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
                asked_model.to_owned()
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

impl HttpChat {
    /// Runs `attempt` until it succeeds, fails for good, or the retries are spent; `may_retry` says
    /// whether a retry is still possible (not once a stream's chunk reached the client).
    async fn retrying<T, F, Fut>(
        &self,
        mut attempt: F,
        may_retry: impl Fn() -> bool,
    ) -> Result<T, ExecutorError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, AttemptError>>,
    {
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            match attempt().await {
                Ok(answer) => {
                    tracing::debug!(attempts, "model server answered");
                    return Ok(answer);
                }
                Err(e) if e.retryable() && attempts <= self.max_retries && may_retry() => {
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
        }
    }

    /// Sends `body` to the chat completions route under the per-attempt timeout; a stream's body may
    /// take the whole call's time, its answer starting within the per-attempt timeout.
    async fn send(&self, body: &[u8], stream: bool) -> Result<reqwest::Response, AttemptError> {
        let mut request = self
            .http
            .post(&self.url)
            .headers(self.headers.clone())
            .header(CONTENT_TYPE, "application/json")
            .headers(upstream_trace_headers())
            .body(body.to_vec());
        if stream {
            request = request.timeout(self.call_timeout);
        }
        let resp = tokio::time::timeout(self.request_timeout, request.send())
            .await
            .map_err(|_| AttemptError::TimedOut)?
            .map_err(transport_error)?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let retry_after = retry_after(resp.headers());
        let bytes = read_body(resp).await?;
        Err(AttemptError::Status {
            status,
            detail: error_detail(&bytes),
            retry_after,
        })
    }

    /// One chat-mode exchange without a stream: the upstream's completion, which must have a choice.
    async fn attempt_json(&self, body: &[u8]) -> Result<Value, AttemptError> {
        let bytes = read_body(self.send(body, false).await?).await?;
        let completion: Value = serde_json::from_slice(&bytes)
            .map_err(|e| AttemptError::NotCompletion(shorten(&e.to_string())))?;
        if completion
            .get("choices")
            .and_then(Value::as_array)
            .is_none_or(Vec::is_empty)
        {
            return Err(AttemptError::NotCompletion("it has no choices".into()));
        }
        Ok(completion)
    }

    /// One chat-mode exchange as a stream of server-sent events, each chunk relayed as it comes.
    async fn attempt_stream(
        &self,
        body: &[u8],
        relay: &ChunkSink,
        shown_model: &str,
    ) -> Result<Value, AttemptError> {
        let resp = self.send(body, true).await?;
        // The bytes are counted as they arrive, before the event parser buffers them: an upstream
        // that never ends a line cannot grow memory past the limit.
        let too_large = Arc::new(AtomicBool::new(false));
        let flag = too_large.clone();
        let bounded = resp.bytes_stream().scan(0usize, move |received, chunk| {
            if let Ok(bytes) = &chunk {
                *received += bytes.len();
                if *received > MAX_BODY_BYTES {
                    flag.store(true, Ordering::Relaxed);
                    return std::future::ready(None);
                }
            }
            std::future::ready(Some(chunk))
        });
        let mut events = Box::pin(bounded.eventsource());
        let mut assembly = Assembly::default();
        loop {
            // Each chunk within the per-attempt timeout of the one before.
            let next = tokio::time::timeout(self.request_timeout, events.next())
                .await
                .map_err(|_| AttemptError::TimedOut)?;
            let Some(event) = next else { break };
            let event = event.map_err(|e| match e {
                eventsource_stream::EventStreamError::Transport(e) => transport_error(e),
                other => AttemptError::NotCompletion(shorten(&other.to_string())),
            })?;
            if event.data.trim() == "[DONE]" {
                return assembly.finish().map_err(AttemptError::NotCompletion);
            }
            let mut chunk: Value = serde_json::from_str(&event.data)
                .map_err(|e| AttemptError::NotCompletion(shorten(&e.to_string())))?;
            if let Some(detail) = chunk.get("error") {
                return Err(AttemptError::StreamError(error_detail(
                    detail.to_string().as_bytes(),
                )));
            }
            assembly.add(&chunk).map_err(AttemptError::NotCompletion)?;
            if let Some(model) = chunk.get_mut("model") {
                *model = Value::String(shown_model.to_owned());
            }
            relay.send(chunk).await.map_err(AttemptError::ClientGone)?;
        }
        if too_large.load(Ordering::Relaxed) {
            return Err(AttemptError::TooLarge);
        }
        Err(AttemptError::NotCompletion(
            "the stream ended without data: [DONE]".into(),
        ))
    }
}

#[async_trait]
impl ChatClient for HttpChat {
    async fn complete(
        &self,
        request: &CreateChatCompletionRequest,
    ) -> Result<Answer, ExecutorError> {
        let body = serde_json::to_vec(request)
            .map_err(|e| ExecutorError::Failed(format!("encoding the chat request: {e}")))?;
        let answer = self
            .retrying(|| self.attempt(&body, &request.model), || true)
            .await?;
        tracing::debug!(
            prompt_tokens = answer.prompt_tokens,
            completion_tokens = answer.completion_tokens,
            "completion received"
        );
        Ok(answer)
    }

    async fn chat(
        &self,
        body: &Value,
        relay: Option<&ChunkSink>,
        shown_model: &str,
    ) -> Result<Value, ExecutorError> {
        let bytes = serde_json::to_vec(body)
            .map_err(|e| ExecutorError::Failed(format!("encoding the chat request: {e}")))?;
        match relay {
            None => self.retrying(|| self.attempt_json(&bytes), || true).await,
            Some(relay) => {
                self.retrying(
                    || self.attempt_stream(&bytes, relay, shown_model),
                    || relay.sent() == 0,
                )
                .await
            }
        }
    }
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
    /// A stream that reported an error in one of its events.
    StreamError(String),
    /// The client closed its stream: nothing more to relay.
    ClientGone(ExecutorError),
}

impl AttemptError {
    /// 429, 5xx and "no answer" may go away; other 4xx and bad bodies will not.
    fn retryable(&self) -> bool {
        match self {
            Self::Status { status, .. } => {
                *status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error()
            }
            Self::Unreachable(_) | Self::TimedOut => true,
            Self::NotCompletion(_)
            | Self::TooLarge
            | Self::StreamError(_)
            | Self::ClientGone(_) => false,
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
            Self::StreamError(detail) => format!("upstream stream failed: {detail}"),
            Self::ClientGone(e) => e.to_string(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ExecutorOverrides;

    const SECRET: &str = "sk-test-0123456789abcdef";

    fn client(extra: &str, env: &dyn Fn(&str) -> Option<String>) -> HttpChat {
        let text = format!(
            "base_url = \"http://127.0.0.1:9/v1/\"\nmodel = \"m\"\nprompt_template = \"prompts/t.txt\"\n{extra}"
        );
        let settings = Settings::resolve(
            &toml::from_str(&text).unwrap(),
            "t",
            Duration::from_secs(120),
            &ExecutorOverrides::default(),
            env,
        )
        .unwrap();
        HttpChat::new(&settings).unwrap()
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn the_chat_path_is_appended_and_no_key_means_no_header() {
        let chat = client("", &no_env);
        assert_eq!(chat.url, "http://127.0.0.1:9/v1/chat/completions");
        assert!(
            !chat.headers.contains_key(AUTHORIZATION),
            "no key, no header"
        );
    }

    #[test]
    fn the_key_is_sent_as_bearer_but_never_shown() {
        let key_env = |name: &str| (name == "T_KEY").then(|| SECRET.to_owned());
        let chat = client("api_key_env = \"T_KEY\"", &key_env);

        let auth = &chat.headers[AUTHORIZATION];
        assert_eq!(auth.to_str().unwrap(), format!("Bearer {SECRET}"));
        assert!(auth.is_sensitive());
        assert!(!format!("{chat:?}").contains(SECRET), "{chat:?}");
        assert!(!format!("{:?}", chat.headers).contains(SECRET));

        // An upstream that echoes the key into its error does not get it through to the client.
        let echoed = AttemptError::Status {
            status: StatusCode::UNAUTHORIZED,
            detail: error_detail(
                format!(r#"{{"error": {{"message": "Incorrect API key provided: {SECRET}"}}}}"#)
                    .as_bytes(),
            ),
            retry_after: None,
        };
        let ExecutorError::Failed(message) = chat.failure(&echoed, 1) else {
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
        let chat = client("retry_backoff_ms = 100", &no_env);
        let e = AttemptError::TimedOut;
        assert_eq!(chat.wait_before(1, &e), Duration::from_millis(100));
        assert_eq!(chat.wait_before(2, &e), Duration::from_millis(200));
        assert_eq!(chat.wait_before(3, &e), Duration::from_millis(400));
        // No wait exceeds the README's 30 s cap, computed or asked for.
        assert_eq!(chat.wait_before(40, &e), Duration::from_secs(30));
        let limited = AttemptError::Status {
            status: StatusCode::TOO_MANY_REQUESTS,
            detail: String::new(),
            retry_after: Some(Duration::from_secs(2)),
        };
        assert_eq!(chat.wait_before(1, &limited), Duration::from_secs(2));
        let greedy = AttemptError::Status {
            status: StatusCode::TOO_MANY_REQUESTS,
            detail: String::new(),
            retry_after: Some(Duration::from_secs(3600)),
        };
        assert_eq!(chat.wait_before(1, &greedy), Duration::from_secs(30));
    }
}
