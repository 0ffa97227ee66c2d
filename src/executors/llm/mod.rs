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
//! | `mode` | `template` | `template`: a prompt rendered from the payload; `chat`: the client's own messages (the OpenAI facade) |
//! | `prompt_template` | template mode | template file, relative to the executors folder |
//! | `system_prompt` | optional, chat mode | text file sent first, before the client's messages |
//! | `max_tokens` | optional | upper bound on generated tokens (sent as `max_tokens`) |
//! | `temperature` | optional | 0 to 2 |
//! | `max_retries` | 2 | retries after the first attempt, on 429, 5xx, transport errors and per-attempt timeouts |
//! | `retry_backoff_ms` | 500 | wait before the first retry, doubled for each further one |
//! | `request_timeout_ms` | 30000 | per attempt; the file's `timeout_ms` bounds the whole call |
//!
//! `CATRACA_LLM_BASE_URL` and `CATRACA_LLM_MODEL`, when set and not empty, override `base_url` and
//! `model` of **every** `llm` executor (point the gateway at another model server without editing files);
//! the configuration reads them and hands them over in `ExecutorEnv::overrides`.
//! The key is read once, when the executor is built; ambient `OPENAI_*` variables are never used.
//!
//! Template files hold a `[system]` and a `[user]` section of plain text (lines starting with `#` before
//! the first section are comments). `{{field}}` is replaced by the payload's top-level `field`: strings
//! verbatim, other JSON values as compact JSON, a missing field as the empty string. Substituted text is
//! never scanned again, so a payload cannot inject placeholders.
//!
//! Result: `{"summary", "model", "prompt_sha256", "usage": {"prompt_tokens", "completion_tokens"}}`.
//!
//! Chat mode sends the payload's `messages` after the system prompt, with the payload's sampling
//! parameters ([`CHAT_PARAMETERS`]; `max_tokens` capped by the executor's, `temperature` defaulting to
//! it), and answers the upstream's `chat.completion` with `model` set to the action and the gateway's
//! facts under `catraca`. When the call has a stream sink, the upstream is asked to stream (with usage)
//! and each chunk is relayed as it comes (`stream.rs` assembles the completion the chunks make).
//!
//! Files: `settings.rs` (the table, checked and resolved), `prompt.rs` (templates and system prompts),
//! `client.rs` (the chat client behind the [`ChatClient`] trait: HTTP, retries, streams, error messages
//! without the key), `stream.rs` (a streamed completion put back together), and this one, the
//! executor: build the request, ask the client, count tokens, shape the result.

mod client;
mod prompt;
mod settings;
mod stream;

use std::fmt;
use std::sync::Arc;

use async_openai::types::chat::{
    ChatCompletionRequestMessage, ChatCompletionRequestSystemMessageArgs,
    ChatCompletionRequestUserMessageArgs, CreateChatCompletionRequest,
    CreateChatCompletionRequestArgs,
};
use async_trait::async_trait;
use prometheus::IntCounter;
use serde_json::{Value, json};

use self::client::{ChatClient, HttpChat};
use self::prompt::{PromptTemplate, SystemPrompt, load_system_prompt, load_template};
use self::settings::{PromptFile, Settings};
use super::{Executor, ExecutorCall, ExecutorError, ExecutorSpec};

/// Token counters of one executor, resolved once so a call only increments.
struct Tokens {
    prompt: IntCounter,
    completion: IntCounter,
}

/// What the executor sends the model server.
enum Prompt {
    /// A prompt rendered from the payload's fields (`mode = "template"`).
    Template(PromptTemplate),
    /// The client's messages after the executor's own system prompt, if any (`mode = "chat"`).
    Chat(Option<SystemPrompt>),
}

/// A chat request's sampling parameters passed from the client's payload to the model server (when
/// the action's input schema admitted them); anything else in the payload stays here.
const CHAT_PARAMETERS: [&str; 9] = [
    "temperature",
    "top_p",
    "max_tokens",
    "max_completion_tokens",
    "stop",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "user",
];

/// Longest model name an upstream may put in the trail.
const MAX_MODEL_NAME: usize = 128;

/// A configured `llm` executor.
struct Llm {
    name: String,
    model: String,
    client: Arc<dyn ChatClient>,
    prompt: Prompt,
    /// The prompt file as written in the settings (none for a chat executor without a system prompt).
    prompt_path: Option<String>,
    /// SHA-256 of the prompt file (template or system prompt), in the trail and the result.
    prompt_sha256: Option<String>,
    review_notice: Option<String>,
    max_tokens: Option<u32>,
    temperature: Option<f32>,
    tokens: Option<Tokens>,
}

impl fmt::Debug for Llm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Llm")
            .field("name", &self.name)
            .field("model", &self.model)
            .field("client", &self.client)
            .field("prompt", &self.prompt_path)
            .field("prompt_sha256", &self.prompt_sha256)
            .finish_non_exhaustive()
    }
}

/// Builds an `llm` executor from its settings, the configuration's overrides and, for the key, the
/// environment (or `.env`).
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
    let settings = Settings::resolve(
        spec.settings,
        spec.name,
        spec.timeout,
        &spec.env.overrides,
        env,
    )?;
    let (prompt, prompt_path, prompt_sha256) = match &settings.prompt {
        PromptFile::Template(path) => {
            let loaded = load_template(&spec.env.dir, path)?;
            (
                Prompt::Template(loaded.template),
                Some(loaded.path),
                Some(loaded.sha256),
            )
        }
        PromptFile::System(None) => (Prompt::Chat(None), None, None),
        PromptFile::System(Some(path)) => {
            let loaded = load_system_prompt(&spec.env.dir, path)?;
            let (path, sha256) = (loaded.path.clone(), loaded.sha256.clone());
            (Prompt::Chat(Some(loaded)), Some(path), Some(sha256))
        }
    };
    let client = HttpChat::new(&settings)?;
    let tokens = spec.env.metrics.as_ref().map(|m| Tokens {
        prompt: m.llm_tokens.with_label_values(&[spec.name, "prompt"]),
        completion: m.llm_tokens.with_label_values(&[spec.name, "completion"]),
    });
    Ok(Llm {
        name: spec.name.to_owned(),
        model: settings.model,
        client: Arc::new(client),
        prompt,
        prompt_path,
        prompt_sha256,
        review_notice: settings.review_notice,
        max_tokens: settings.max_tokens,
        temperature: settings.temperature,
        tokens,
    })
}

impl Llm {
    /// Template mode's request: the prompt rendered from the payload.
    fn request(
        &self,
        template: &PromptTemplate,
        payload: &Value,
    ) -> Result<CreateChatCompletionRequest, String> {
        let (system, user) = template.render(payload);
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

    /// Chat mode's request: the system prompt, the client's messages, its sampling parameters within
    /// the executor's `max_tokens` (a cap) and `temperature` (a default).
    fn chat_body(
        &self,
        system: Option<&SystemPrompt>,
        payload: &Value,
        stream: bool,
    ) -> Result<Value, String> {
        let Some(client_messages) = payload.get("messages").and_then(Value::as_array) else {
            return Err("the payload has no messages list".into());
        };
        let mut messages = Vec::with_capacity(client_messages.len() + 1);
        if let Some(system) = system {
            messages.push(json!({"role": "system", "content": system.text}));
        }
        messages.extend(client_messages.iter().cloned());
        let mut body = serde_json::Map::new();
        body.insert("model".into(), Value::from(self.model.as_str()));
        body.insert("messages".into(), Value::Array(messages));
        for name in CHAT_PARAMETERS {
            if let Some(value) = payload.get(name).filter(|v| !v.is_null()) {
                body.insert(name.into(), value.clone());
            }
        }
        if let Some(cap) = self.max_tokens {
            // Whatever the action's schema admits, the cap holds: a value that is not a whole number
            // within it is sent as the cap.
            for name in ["max_tokens", "max_completion_tokens"] {
                let Some(asked) = body.get(name) else {
                    continue;
                };
                if super::whole_number(asked).is_none_or(|n| n == 0 || n > u64::from(cap)) {
                    body.insert(name.into(), Value::from(cap));
                }
            }
            if !body.contains_key("max_tokens") && !body.contains_key("max_completion_tokens") {
                body.insert("max_tokens".into(), Value::from(cap));
            }
        }
        if let Some(t) = self.temperature {
            // The value as written (0.2), not its f32 widened to f64 (0.20000000298...).
            let written = t.to_string().parse::<f64>().unwrap_or(f64::from(t));
            body.entry("temperature")
                .or_insert_with(|| Value::from(written));
        }
        if stream {
            body.insert("stream".into(), Value::Bool(true));
            // Always asked of the upstream: the trail and the metrics count every stream's tokens.
            body.insert("stream_options".into(), json!({"include_usage": true}));
        }
        Ok(Value::Object(body))
    }

    fn count_tokens(&self, prompt: u64, completion: u64) {
        if let Some(tokens) = &self.tokens {
            tokens.prompt.inc_by(prompt);
            tokens.completion.inc_by(completion);
        }
    }

    /// Template mode: one completion of the rendered prompt, shaped as the summary result.
    async fn summarise(
        &self,
        template: &PromptTemplate,
        call: &ExecutorCall,
    ) -> Result<Value, ExecutorError> {
        let request = self
            .request(template, &call.payload)
            .map_err(|e| ExecutorError::Failed(format!("building the chat request: {e}")))?;
        let answer = self.client.complete(&request).await?;
        self.count_tokens(
            u64::from(answer.prompt_tokens),
            u64::from(answer.completion_tokens),
        );
        let mut result = json!({
            "summary": answer.text,
            "model": answer.model,
            "prompt_sha256": self.prompt_sha256,
            "usage": {
                "prompt_tokens": answer.prompt_tokens,
                "completion_tokens": answer.completion_tokens,
            },
        });
        // The notice travels with the result, so whoever reads the summary reads it too; the result's
        // digest in ACTION_EXECUTED proves it was sent.
        if let Some(notice) = &self.review_notice {
            result["review_notice"] = Value::String(notice.clone());
        }
        Ok(result)
    }

    /// Chat mode: the client's conversation, answered as an OpenAI `chat.completion` whose `model` is
    /// the action the client asked for; what the gateway adds goes under `catraca`.
    async fn chat(
        &self,
        system: Option<&SystemPrompt>,
        call: &ExecutorCall,
    ) -> Result<Value, ExecutorError> {
        let body = self
            .chat_body(system, &call.payload, call.stream.is_some())
            .map_err(|e| ExecutorError::Failed(format!("building the chat request: {e}")))?;
        let shown = call.action.as_str();
        let mut completion = self.client.chat(&body, call.stream.as_ref(), shown).await?;
        let usage = |name: &str| {
            completion
                .pointer(&format!("/usage/{name}"))
                .and_then(Value::as_u64)
                .unwrap_or(0)
        };
        self.count_tokens(usage("prompt_tokens"), usage("completion_tokens"));
        let upstream_model = completion
            .get("model")
            .and_then(Value::as_str)
            .filter(|m| !m.trim().is_empty())
            .unwrap_or(&self.model)
            .to_owned();
        let mut catraca = serde_json::Map::new();
        catraca.insert("upstream_model".into(), Value::from(upstream_model));
        if let Some(sha) = &self.prompt_sha256 {
            catraca.insert("prompt_sha256".into(), Value::from(sha.as_str()));
        }
        if let Some(notice) = &self.review_notice {
            catraca.insert("review_notice".into(), Value::from(notice.as_str()));
        }
        if let Value::Object(fields) = &mut completion {
            fields.insert("model".into(), Value::from(shown));
            fields.insert("catraca".into(), Value::Object(catraca));
        }
        Ok(completion)
    }
}

#[async_trait]
impl Executor for Llm {
    #[tracing::instrument(skip_all, fields(executor = %self.name, trace_id = %call.trace_id))]
    async fn execute(&self, call: ExecutorCall) -> Result<Value, ExecutorError> {
        match &self.prompt {
            Prompt::Template(template) => self.summarise(template, &call).await,
            Prompt::Chat(system) => self.chat(system.as_ref(), &call).await,
        }
    }

    fn audit_facts(&self) -> Option<Value> {
        Some(match self.prompt {
            Prompt::Template(_) => json!({
                "model": self.model,
                "prompt_template": self.prompt_path,
                "prompt_sha256": self.prompt_sha256,
            }),
            Prompt::Chat(_) => json!({
                "model": self.model,
                "mode": "chat",
                "system_prompt": self.prompt_path,
                "prompt_sha256": self.prompt_sha256,
            }),
        })
    }

    /// The model that answered and the tokens it counted (never the text): the upstream's own words,
    /// so only whole token counts and a short model name are kept.
    fn outcome_facts(&self, result: &Value) -> Option<Value> {
        let model: Option<String> = result
            .pointer("/catraca/upstream_model")
            .or_else(|| result.get("model"))
            .and_then(Value::as_str)
            .map(|m| m.chars().take(MAX_MODEL_NAME).collect());
        let mut usage = serde_json::Map::new();
        for name in ["prompt_tokens", "completion_tokens", "total_tokens"] {
            if let Some(n) = result
                .pointer(&format!("/usage/{name}"))
                .and_then(Value::as_u64)
            {
                usage.insert(name.into(), Value::from(n));
            }
        }
        Some(json!({ "model": model, "usage": usage }))
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use sha2::{Digest, Sha256};

    use super::client::Answer;
    use super::*;
    use crate::executors::ChunkSink;
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
    }

    #[test]
    fn a_missing_template_is_a_build_error_naming_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let err = build_in(dir.path(), &settings(""), &no_env).unwrap_err();
        assert!(err.contains("prompts/t.txt"), "{err}");
    }

    #[test]
    fn the_key_never_reaches_the_executor_debug_or_audit_facts() {
        let dir = template_dir("[system]\ns\n[user]\nu\n");
        let key_env = |name: &str| (name == "T_KEY").then(|| SECRET.to_owned());
        let llm = build_in(dir.path(), &settings("api_key_env = \"T_KEY\""), &key_env).unwrap();
        assert!(!format!("{llm:?}").contains(SECRET), "{llm:?}");
        assert!(!llm.audit_facts().unwrap().to_string().contains(SECRET));
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
        let Prompt::Template(template) = &llm.prompt else {
            panic!("a template executor")
        };
        let body =
            serde_json::to_value(llm.request(template, &json!({"text": "olá"})).unwrap()).unwrap();
        assert_eq!(body["model"], "m");
        assert_eq!(body["max_tokens"], 64);
        assert_eq!(body["temperature"], 0.5);
        assert_eq!(body["messages"][0]["role"], "system");
        assert_eq!(body["messages"][0]["content"], "S");
        assert_eq!(body["messages"][1]["role"], "user");
        assert_eq!(body["messages"][1]["content"], "U olá");
        assert!(body.get("stream").is_none());
    }

    /// A model server stand-in: remembers the request, answers with a fixed completion.
    #[derive(Debug, Default)]
    struct Scripted {
        seen: std::sync::Mutex<Option<CreateChatCompletionRequest>>,
        seen_chat: std::sync::Mutex<Option<Value>>,
    }

    #[async_trait]
    impl ChatClient for Scripted {
        async fn complete(
            &self,
            request: &CreateChatCompletionRequest,
        ) -> Result<Answer, ExecutorError> {
            *self.seen.lock().unwrap() = Some(request.clone());
            Ok(Answer {
                text: "resumo".into(),
                model: "served-model".into(),
                prompt_tokens: 7,
                completion_tokens: 3,
            })
        }

        async fn chat(
            &self,
            body: &Value,
            relay: Option<&ChunkSink>,
            shown_model: &str,
        ) -> Result<Value, ExecutorError> {
            *self.seen_chat.lock().unwrap() = Some(body.clone());
            if let Some(relay) = relay {
                relay
                    .send(json!({"object": "chat.completion.chunk", "model": shown_model}))
                    .await?;
            }
            Ok(json!({
                "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "served-model",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "oi"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 11, "completion_tokens": 2, "total_tokens": 13},
            }))
        }
    }

    fn chat_call(payload: Value, stream: Option<ChunkSink>) -> ExecutorCall {
        ExecutorCall {
            trace_id: crate::domain::TraceId::generate(),
            decision_id: uuid::Uuid::now_v7(),
            action: crate::domain::ActionName::parse("assistant").unwrap(),
            context: crate::domain::ContextId::parse("work").unwrap(),
            payload,
            steps: None,
            stream,
        }
    }

    fn chat_settings(extra: &str) -> toml::Table {
        let text = format!(
            "base_url = \"http://127.0.0.1:9/v1/\"\nmodel = \"m\"\nmode = \"chat\"\n{extra}"
        );
        toml::from_str(&text).unwrap()
    }

    #[test]
    fn chat_mode_takes_a_system_prompt_not_a_template() {
        let dir = template_dir("[system]\ns\n[user]\nu\n");
        let err = build_in(
            dir.path(),
            &chat_settings("prompt_template = \"prompts/t.txt\""),
            &no_env,
        )
        .unwrap_err();
        assert!(err.contains("system_prompt"), "{err}");
        std::fs::write(dir.path().join("prompts/s.txt"), "# comment\nSeja breve.\n").unwrap();
        let llm = build_in(
            dir.path(),
            &chat_settings("system_prompt = \"prompts/s.txt\""),
            &no_env,
        )
        .unwrap();
        let want = hex::encode(Sha256::digest(b"# comment\nSeja breve.\n"));
        assert_eq!(
            llm.audit_facts(),
            Some(
                json!({"model": "m", "mode": "chat", "system_prompt": "prompts/s.txt", "prompt_sha256": want})
            )
        );
    }

    #[tokio::test]
    async fn chat_mode_sends_the_system_prompt_first_and_caps_the_clients_parameters() {
        let dir = template_dir("[system]\ns\n[user]\nu\n");
        std::fs::write(dir.path().join("prompts/s.txt"), "Seja breve.").unwrap();
        let mut llm = build_in(
            dir.path(),
            &chat_settings(
                "system_prompt = \"prompts/s.txt\"\nmax_tokens = 100\ntemperature = 0.2",
            ),
            &no_env,
        )
        .unwrap();
        let scripted = Arc::new(Scripted::default());
        llm.client = scripted.clone();
        let payload = json!({
            "messages": [{"role": "user", "content": "Oi"}],
            "max_tokens": 5000,
            "top_p": 0.9,
            "logit_bias": {"1": 5},
        });

        let result = llm.execute(chat_call(payload, None)).await.unwrap();

        let sent = scripted.seen_chat.lock().unwrap().clone().unwrap();
        assert_eq!(sent["model"], "m");
        assert_eq!(
            sent["messages"][0],
            json!({"role": "system", "content": "Seja breve."})
        );
        assert_eq!(
            sent["messages"][1],
            json!({"role": "user", "content": "Oi"})
        );
        assert_eq!(
            sent["max_tokens"], 100,
            "the executor's max_tokens caps the client's"
        );
        assert_eq!(
            sent["temperature"], 0.2,
            "the executor's temperature is the default"
        );
        assert_eq!(sent["top_p"], 0.9);
        assert!(
            sent.get("logit_bias").is_none(),
            "only sampling parameters pass"
        );
        let body = llm
            .chat_body(
                None,
                &json!({"messages": [], "max_tokens": "100000"}),
                false,
            )
            .unwrap();
        assert_eq!(
            body["max_tokens"], 100,
            "a cap holds whatever the schema admitted"
        );
        let body = llm
            .chat_body(
                None,
                &json!({"messages": [], "max_completion_tokens": 7.5}),
                false,
            )
            .unwrap();
        assert_eq!(body["max_completion_tokens"], 100);
        assert!(body.get("max_tokens").is_none());
        assert!(sent.get("stream").is_none());
        assert_eq!(
            result["model"], "assistant",
            "the model the client asked for"
        );
        assert_eq!(result["catraca"]["upstream_model"], "served-model");
        assert_eq!(result["choices"][0]["message"]["content"], "oi");
        assert_eq!(
            llm.outcome_facts(&result),
            Some(
                json!({"model": "served-model", "usage": {"prompt_tokens": 11, "completion_tokens": 2, "total_tokens": 13}})
            )
        );
    }

    #[tokio::test]
    async fn a_streamed_chat_asks_the_upstream_for_usage_and_relays_its_chunks() {
        let dir = template_dir("[system]\ns\n[user]\nu\n");
        let mut llm = build_in(dir.path(), &chat_settings(""), &no_env).unwrap();
        let scripted = Arc::new(Scripted::default());
        llm.client = scripted.clone();
        let (sink, mut chunks) = ChunkSink::channel(4);
        let payload = json!({"messages": [{"role": "user", "content": "Oi"}], "max_tokens": 7});

        llm.execute(chat_call(payload, Some(sink.clone())))
            .await
            .unwrap();

        let sent = scripted.seen_chat.lock().unwrap().clone().unwrap();
        assert_eq!(sent["stream"], true);
        assert_eq!(sent["stream_options"], json!({"include_usage": true}));
        assert_eq!(sent["max_tokens"], 7);
        assert_eq!(
            sent["messages"].as_array().unwrap().len(),
            1,
            "no system prompt"
        );
        assert_eq!(sink.sent(), 1);
        assert_eq!(chunks.recv().await.unwrap()["model"], "assistant");
    }

    #[tokio::test]
    async fn the_result_names_the_answer_its_model_the_prompt_hash_and_usage() {
        let dir = template_dir("[system]\nS\n[user]\nU {{text}}\n");
        let mut llm = build_in(dir.path(), &settings(""), &no_env).unwrap();
        let scripted = Arc::new(Scripted::default());
        llm.client = scripted.clone();
        let call = ExecutorCall {
            trace_id: crate::domain::TraceId::generate(),
            decision_id: uuid::Uuid::now_v7(),
            action: crate::domain::ActionName::parse("t").unwrap(),
            context: crate::domain::ContextId::parse("work").unwrap(),
            payload: json!({"text": "edital"}),
            steps: None,
            stream: None,
        };

        let result = llm.execute(call).await.unwrap();

        assert_eq!(
            result,
            json!({
                "summary": "resumo",
                "model": "served-model",
                "prompt_sha256": llm.prompt_sha256.clone().unwrap(),
                "usage": {"prompt_tokens": 7, "completion_tokens": 3},
            })
        );
        let seen = scripted.seen.lock().unwrap().clone().unwrap();
        let sent = serde_json::to_value(seen).unwrap();
        assert_eq!(sent["messages"][1]["content"], "U edital");
    }
}
