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
//! Files: `settings.rs` (the table, checked and resolved), `prompt.rs` (templates), `client.rs` (the
//! chat client behind the [`ChatClient`] trait: HTTP, retries, error messages without the key), and
//! this one, the executor: render the prompt, ask the client, count tokens, shape the result.

mod client;
mod prompt;
mod settings;

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
use self::prompt::{PromptTemplate, load_template};
use self::settings::Settings;
use super::{Executor, ExecutorCall, ExecutorError, ExecutorSpec};

/// Token counters of one executor, resolved once so a call only increments.
struct Tokens {
    prompt: IntCounter,
    completion: IntCounter,
}

/// A configured `llm` executor.
struct Llm {
    name: String,
    model: String,
    client: Arc<dyn ChatClient>,
    template: PromptTemplate,
    template_path: String,
    prompt_sha256: String,
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
            .field("prompt_template", &self.template_path)
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
    let template = load_template(&spec.env.dir, &settings.prompt_template)?;
    let client = HttpChat::new(&settings)?;
    let tokens = spec.env.metrics.as_ref().map(|m| Tokens {
        prompt: m.llm_tokens.with_label_values(&[spec.name, "prompt"]),
        completion: m.llm_tokens.with_label_values(&[spec.name, "completion"]),
    });
    Ok(Llm {
        name: spec.name.to_owned(),
        model: settings.model,
        client: Arc::new(client),
        template: template.template,
        template_path: template.path,
        prompt_sha256: template.sha256,
        review_notice: settings.review_notice,
        max_tokens: settings.max_tokens,
        temperature: settings.temperature,
        tokens,
    })
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
}

#[async_trait]
impl Executor for Llm {
    #[tracing::instrument(skip_all, fields(executor = %self.name, trace_id = %call.trace_id))]
    async fn execute(&self, call: ExecutorCall) -> Result<Value, ExecutorError> {
        let request = self
            .request(&call.payload)
            .map_err(|e| ExecutorError::Failed(format!("building the chat request: {e}")))?;
        let answer = self.client.complete(&request).await?;
        if let Some(tokens) = &self.tokens {
            tokens.prompt.inc_by(u64::from(answer.prompt_tokens));
            tokens
                .completion
                .inc_by(u64::from(answer.completion_tokens));
        }
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
    use std::path::Path;
    use std::time::Duration;

    use sha2::{Digest, Sha256};

    use super::client::Answer;
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

    /// A model server stand-in: remembers the request, answers with a fixed completion.
    #[derive(Debug, Default)]
    struct Scripted {
        seen: std::sync::Mutex<Option<CreateChatCompletionRequest>>,
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
        };

        let result = llm.execute(call).await.unwrap();

        assert_eq!(
            result,
            json!({
                "summary": "resumo",
                "model": "served-model",
                "prompt_sha256": llm.prompt_sha256,
                "usage": {"prompt_tokens": 7, "completion_tokens": 3},
            })
        );
        let seen = scripted.seen.lock().unwrap().clone().unwrap();
        let sent = serde_json::to_value(seen).unwrap();
        assert_eq!(sent["messages"][1]["content"], "U edital");
    }
}
