//! The `[settings]` table of an `llm` executor file: parsed, checked and resolved against the
//! configuration's overrides and the key's environment variable, once, when the executor is built.

use std::fmt;
use std::time::Duration;

use serde::Deserialize;

use crate::config::ExecutorOverrides;

/// Two retries ride out a model server restart or a short 429 burst, and cost at most three calls
/// when the upstream is really down.
pub(super) const DEFAULT_MAX_RETRIES: u32 = 2;
/// More retries than this only hold a client past any sensible `timeout_ms`; a typo like 100 is refused.
const MAX_RETRIES_LIMIT: u32 = 10;
/// Half a second, doubled per retry (0.5 s, 1 s, ...): long enough for a 429 window to move on, short
/// enough that two retries fit well inside a two-minute executor timeout.
const DEFAULT_RETRY_BACKOFF_MS: u64 = 500;
/// Per attempt; the same as the registry's default whole-call timeout, so a file that sets neither
/// still gets one bounded attempt.
pub(super) const DEFAULT_REQUEST_TIMEOUT_MS: u64 = 30_000;
/// Replaces the key wherever it would otherwise be shown.
pub(super) const REDACTED: &str = "[redacted]";

/// Longest `review_notice` accepted: a notice, not a document.
const MAX_REVIEW_NOTICE_CHARS: usize = 1_000;

/// The `[settings]` table, as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSettings {
    base_url: String,
    model: String,
    #[serde(default)]
    api_key_env: Option<String>,
    #[serde(default)]
    mode: Mode,
    #[serde(default)]
    prompt_template: Option<String>,
    #[serde(default)]
    system_prompt: Option<String>,
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
    #[serde(default)]
    review_notice: Option<String>,
}

/// What an `llm` executor sends the model server.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum Mode {
    /// A prompt rendered from `prompt_template` with the payload's fields (`/process` actions such as
    /// `licitacoes.summarize`).
    #[default]
    Template,
    /// The client's own `messages` and sampling parameters (the OpenAI facade), after the executor's
    /// `system_prompt` when it has one.
    Chat,
}

/// The prompt an executor's mode needs, as written (relative to the executors folder).
#[derive(Debug)]
pub(super) enum PromptFile {
    Template(String),
    /// Chat mode's own system prompt, if any.
    System(Option<String>),
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
pub(super) struct ApiKey(pub(super) String);

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

/// The settings an `llm` executor runs with: overrides applied, every value checked.
#[derive(Debug)]
pub(super) struct Settings {
    /// The API root without a trailing slash (the chat path starts with one).
    pub base_url: String,
    pub model: String,
    /// The variable named by `api_key_env`, for messages about its value.
    pub api_key_env: Option<String>,
    /// `None` when no variable is named, or it is unset or empty.
    pub key: Option<ApiKey>,
    /// As written: relative to the executors folder.
    pub prompt: PromptFile,
    pub max_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub max_retries: u32,
    pub retry_backoff: Duration,
    pub request_timeout: Duration,
    /// The file's `timeout_ms`: what bounds a whole streamed answer (each of its chunks is bounded by
    /// `request_timeout`).
    pub call_timeout: Duration,
    /// Returned with every result (`review_notice`): what a person must know before relying on it.
    pub review_notice: Option<String>,
}

impl Settings {
    /// Parses and checks the table of executor `name`, whose whole call may take `timeout`. The
    /// configuration's overrides replace `base_url` and `model`; `env` reads the key's variable.
    pub(super) fn resolve(
        table: &toml::Table,
        name: &str,
        timeout: Duration,
        overrides: &ExecutorOverrides,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, String> {
        let file: FileSettings = toml::Value::Table(table.clone())
            .try_into()
            .map_err(|e: toml::de::Error| format!("llm settings: {}", e.message()))?;

        let base_url = overrides.llm_base_url.clone().unwrap_or(file.base_url);
        let base_url = parse_base_url(&base_url)?;
        let model = overrides
            .llm_model
            .clone()
            .unwrap_or(file.model)
            .trim()
            .to_owned();
        if model.is_empty() {
            return Err("model must not be empty".into());
        }
        if let Some(t) = file.temperature
            && !(0.0..=2.0).contains(&t)
        {
            return Err(format!("temperature must be between 0 and 2, got {t}"));
        }
        if file.max_tokens == Some(0) {
            return Err("max_tokens must be positive".into());
        }
        if file.max_retries > MAX_RETRIES_LIMIT {
            return Err(format!(
                "max_retries must be at most {MAX_RETRIES_LIMIT}, got {}",
                file.max_retries
            ));
        }
        if file.request_timeout_ms == 0 {
            return Err("request_timeout_ms must be positive".into());
        }
        if Duration::from_millis(file.request_timeout_ms) >= timeout {
            tracing::warn!(
                executor = name,
                "request_timeout_ms is not below the file's timeout_ms: a slow attempt ends the whole call (504) and is never retried"
            );
        }
        let review_notice = file
            .review_notice
            .map(|n| n.trim().to_owned())
            .filter(|n| !n.is_empty());
        if review_notice
            .as_ref()
            .is_some_and(|n| n.chars().count() > MAX_REVIEW_NOTICE_CHARS)
        {
            return Err(format!(
                "review_notice must be at most {MAX_REVIEW_NOTICE_CHARS} characters"
            ));
        }
        let prompt = match (file.mode, file.prompt_template, file.system_prompt) {
            (Mode::Template, Some(template), None) => PromptFile::Template(template),
            (Mode::Template, None, _) => {
                return Err("prompt_template is required (or mode = \"chat\")".into());
            }
            (Mode::Template, Some(_), Some(_)) => {
                return Err(
                    "system_prompt is for mode = \"chat\"; a template has its own [system] section"
                        .into(),
                );
            }
            (Mode::Chat, None, system) => PromptFile::System(system),
            (Mode::Chat, Some(_), _) => {
                return Err("prompt_template is for mode = \"template\"; chat mode sends the client's messages (use system_prompt)".into());
            }
        };
        let key = match &file.api_key_env {
            None => None,
            Some(var) => read_key(var, name, env)?,
        };
        Ok(Self {
            base_url,
            model,
            api_key_env: file.api_key_env,
            key,
            prompt,
            max_tokens: file.max_tokens,
            temperature: file.temperature,
            max_retries: file.max_retries,
            retry_backoff: Duration::from_millis(file.retry_backoff_ms),
            request_timeout: Duration::from_millis(file.request_timeout_ms),
            call_timeout: timeout,
            review_notice,
        })
    }
}

/// Reads the key from the variable `var` names; unset or blank is no key (a local server needs none).
fn read_key(
    var: &str,
    executor: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<ApiKey>, String> {
    let valid = var.bytes().next().is_some_and(|b| !b.is_ascii_digit())
        && var.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if !valid {
        // Not echoed: a value that is not a variable's name may be the key itself, pasted there.
        return Err(format!(
            "api_key_env must name an environment variable (A-Z, 0-9, '_'), not hold the key; \
             its value ({} characters, not shown) is not such a name",
            var.chars().count()
        ));
    }
    let key = env(var)
        .filter(|v| !v.trim().is_empty())
        .map(|k| ApiKey(k.trim().to_owned()));
    if key.is_none() {
        // The name is not echoed either: a key made only of letters, digits and '_' passes as a name,
        // and pasted there, it would be the "variable" this line prints. The executor's file names it.
        tracing::warn!(
            executor,
            "the variable api_key_env names is unset or empty: calling the model server without a key"
        );
    }
    Ok(key)
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

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "sk-test-0123456789abcdef";

    fn table(extra: &str) -> toml::Table {
        let text = format!(
            "base_url = \"http://127.0.0.1:9/v1/\"\nmodel = \"m\"\nprompt_template = \"prompts/t.txt\"\n{extra}"
        );
        toml::from_str(&text).unwrap()
    }

    fn resolve(
        table: &toml::Table,
        overrides: &ExecutorOverrides,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Settings, String> {
        Settings::resolve(table, "t", Duration::from_secs(120), overrides, env)
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn a_review_notice_is_trimmed_blank_means_none_and_a_long_one_is_an_error() {
        let notice = |text: &str| {
            resolve(
                &table(&format!("review_notice = {text:?}")),
                &ExecutorOverrides::default(),
                &no_env,
            )
            .map(|s| s.review_notice)
        };
        assert_eq!(notice("  revise  ").unwrap().as_deref(), Some("revise"));
        assert_eq!(notice("   ").unwrap(), None);
        assert_eq!(
            notice(&"é".repeat(1_000))
                .unwrap()
                .map(|n| n.chars().count()),
            Some(1_000)
        );
        let err = notice(&"é".repeat(1_001)).unwrap_err();
        assert!(err.contains("at most 1000 characters"), "{err}");
    }

    #[test]
    fn defaults_are_two_retries_half_a_second_of_backoff_and_thirty_seconds_per_attempt() {
        let s = resolve(&table(""), &ExecutorOverrides::default(), &no_env).unwrap();
        assert_eq!(s.base_url, "http://127.0.0.1:9/v1");
        // The README's defaults, written out: max_retries 2, retry_backoff_ms 500, request_timeout_ms 30000.
        assert_eq!(s.max_retries, 2);
        assert_eq!(s.retry_backoff, Duration::from_millis(500));
        assert_eq!(s.request_timeout, Duration::from_millis(30_000));
    }

    #[test]
    fn unknown_and_out_of_range_settings_are_refused() {
        for (extra, needle) in [
            ("temprature = 0.2", "unknown field `temprature`"),
            ("temperature = 3.0", "temperature"),
            ("max_retries = 100", "max_retries"),
            ("max_tokens = 0", "max_tokens"),
            ("request_timeout_ms = 0", "request_timeout_ms"),
            ("api_key_env = \"not a name\"", "api_key_env"),
        ] {
            let err = resolve(&table(extra), &ExecutorOverrides::default(), &no_env).unwrap_err();
            assert!(err.contains(needle), "{extra}: {err}");
        }
        let mut bad_url = table("");
        bad_url.insert("base_url".into(), "http://user:pw@host/v1".into());
        let err = resolve(&bad_url, &ExecutorOverrides::default(), &no_env).unwrap_err();
        assert!(err.contains("credentials") && !err.contains("pw"), "{err}");
    }

    #[test]
    fn configured_overrides_replace_base_url_and_model() {
        let overrides = ExecutorOverrides {
            llm_base_url: Some("http://10.0.0.5:11434/v1".to_owned()),
            llm_model: Some("llama3.1:8b".to_owned()),
            ..ExecutorOverrides::default()
        };
        let s = resolve(&table(""), &overrides, &no_env).unwrap();
        assert_eq!(s.base_url, "http://10.0.0.5:11434/v1");
        assert_eq!(s.model, "llama3.1:8b");
    }

    #[test]
    fn the_key_is_read_from_the_named_variable_and_never_shown() {
        let env = |name: &str| (name == "T_KEY").then(|| format!(" {SECRET} "));
        let s = resolve(
            &table("api_key_env = \"T_KEY\""),
            &ExecutorOverrides::default(),
            &env,
        )
        .unwrap();
        assert_eq!(s.key.as_ref().map(|k| k.0.as_str()), Some(SECRET));
        assert!(!format!("{s:?}").contains(SECRET), "{s:?}");
    }

    #[test]
    fn a_key_pasted_where_its_variable_is_named_is_refused_and_not_shown() {
        let refused = resolve(
            &table(&format!("api_key_env = {SECRET:?}")),
            &ExecutorOverrides::default(),
            &no_env,
        )
        .unwrap_err();
        assert!(refused.contains("api_key_env"), "{refused}");
        assert!(!refused.contains(SECRET), "{refused}");
    }

    #[test]
    fn a_key_variable_that_is_unset_means_no_key() {
        let s = resolve(
            &table("api_key_env = \"UNSET_KEY\""),
            &ExecutorOverrides::default(),
            &no_env,
        )
        .unwrap();
        assert!(s.key.is_none());
    }
}
