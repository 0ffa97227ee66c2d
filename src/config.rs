//! One typed configuration: `catraca.toml` (optional) overridden by `CATRACA_*` environment variables.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;
use std::{fmt, str::FromStr};

use anyhow::Context as _;
use serde::Deserialize;

/// Parses `.env` text: `KEY=VALUE` lines, optional `export `, `#` comments, values optionally quoted.
fn parse_dotenv(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let value = value.trim();
        let unquoted = [('"', '"'), ('\'', '\'')]
            .iter()
            .find_map(|(a, b)| value.strip_prefix(*a).and_then(|v| v.strip_suffix(*b)))
            .unwrap_or(value);
        out.insert(key.trim().to_owned(), unquoted.to_owned());
    }
    out
}

/// A variable from the process environment, else from `.env` in the working directory (read once).
/// Secrets such as LLM API keys come from here, never from files in the repository. The environment is
/// never modified.
pub fn env_var(name: &str) -> Option<String> {
    static DOTENV: OnceLock<BTreeMap<String, String>> = OnceLock::new();
    std::env::var(name).ok().or_else(|| {
        DOTENV
            .get_or_init(|| {
                std::fs::read_to_string(".env")
                    .map(|t| parse_dotenv(&t))
                    .unwrap_or_default()
            })
            .get(name)
            .cloned()
    })
}

/// Where the gateway runs; decides start-up conveniences and policy hot reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Dev,
    Staging,
    Prod,
}

impl FromStr for Mode {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s {
            "dev" => Ok(Self::Dev),
            "staging" => Ok(Self::Staging),
            "prod" => Ok(Self::Prod),
            other => anyhow::bail!("mode must be dev, staging or prod, got {other:?}"),
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Dev => "dev",
            Self::Staging => "staging",
            Self::Prod => "prod",
        })
    }
}

/// Size at which the live JSON Lines file of the trail is rotated and compressed (`audit_file_max_bytes`).
pub const DEFAULT_AUDIT_FILE_MAX_BYTES: u64 = 16 * 1024 * 1024;

/// How often each gateway reads the key revision and the executor switches (`key_refresh_ms`).
pub const DEFAULT_KEY_REFRESH: Duration = Duration::from_millis(100);

/// How the process log is written on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines, coloured only when stderr is a terminal.
    Text,
    /// One JSON object per line; lines written while serving a request carry its `trace_id`.
    Json,
}

impl FromStr for LogFormat {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => anyhow::bail!("log format must be text or json, got {other:?}"),
        }
    }
}

/// A value that must never reach a log line: `Debug` and `Display` print `<redacted>`.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A database URL; may hold a password, so it prints with the password masked.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct DatabaseUrl(Secret);

impl DatabaseUrl {
    pub fn new(s: impl Into<String>) -> Self {
        Self(Secret::new(s))
    }
    pub fn expose(&self) -> &str {
        self.0.expose()
    }
    pub fn is_postgres(&self) -> bool {
        let s = self.expose();
        s.starts_with("postgres://") || s.starts_with("postgresql://")
    }
    pub fn is_sqlite(&self) -> bool {
        self.expose().starts_with("sqlite:")
    }
}

/// Masks `user:password@` as `user:***@`.
fn mask_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (authority, tail) = rest.split_once('/').map_or((rest, ""), |(a, t)| (a, t));
    let Some((userinfo, host)) = authority.rsplit_once('@') else {
        return url.to_owned();
    };
    let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
    let slash = if rest.contains('/') { "/" } else { "" };
    format!("{scheme}://{user}:***@{host}{slash}{tail}")
}

impl fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&mask_password(self.expose()))
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DatabaseUrl({self})")
    }
}

/// The file form: every field optional, unknown keys rejected.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<SocketAddr>,
    database_url: Option<DatabaseUrl>,
    redis_url: Option<DatabaseUrl>,
    policies_dir: Option<PathBuf>,
    executors_dir: Option<PathBuf>,
    audit_dir: Option<PathBuf>,
    mode: Option<Mode>,
    instance_id: Option<String>,
    log: Option<String>,
    log_format: Option<LogFormat>,
    body_limit_bytes: Option<usize>,
    auth_cache_ttl_secs: Option<u64>,
    auth_failures_per_minute: Option<u32>,
    audit_queue_capacity: Option<usize>,
    audit_batch_max: Option<usize>,
    audit_file_max_bytes: Option<u64>,
    rate_limit_fail_open: Option<bool>,
    argon2_concurrency: Option<usize>,
    key_refresh_ms: Option<u64>,
    throttle_summary_secs: Option<u64>,
    trusted_proxies: Option<Vec<String>>,
    http_header_timeout_secs: Option<u64>,
    http_body_timeout_secs: Option<u64>,
    http_idle_timeout_secs: Option<u64>,
    max_connections: Option<usize>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    behind_tls_proxy: Option<bool>,
    postgres_max_connections: Option<u32>,
    postgres_statement_timeout_ms: Option<u64>,
    audit_signing_key: Option<String>,
    witness_url: Option<String>,
    checkpoint_interval_ms: Option<u64>,
    checkpoint_max_events: Option<u64>,
}

/// Limits of the HTTP front door: how long a connection may take to send its headers, its body, or
/// nothing at all between requests, and how many connections may be open at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// From the first byte of a request (or the connection's start) to the end of its headers.
    pub header_timeout: Duration,
    /// From the end of the headers to the end of the body.
    pub body_timeout: Duration,
    /// How long a keep-alive connection may sit between requests.
    pub idle_timeout: Duration,
    /// Connections open at once; past it a new connection is answered 503 and closed.
    pub max_connections: usize,
}

/// Settings of executor files that one variable overrides for every executor of a kind, so the
/// gateway can point at another model server or data source without editing files. Read from the
/// environment only (`catraca.toml` has no such keys); a variable that is unset or empty changes nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecutorOverrides {
    /// `CATRACA_LLM_BASE_URL`: `base_url` of every `llm` executor (blank counts as unset).
    pub llm_base_url: Option<String>,
    /// `CATRACA_LLM_MODEL`: `model` of every `llm` executor (blank counts as unset).
    pub llm_model: Option<String>,
    /// `CATRACA_PNCP_BASE_URL`: `base_url` of every PNCP collector (it points at `…/api/consulta`).
    pub pncp_base_url: Option<String>,
}

impl ExecutorOverrides {
    fn from_env(env: &impl Fn(&str) -> Option<String>) -> Self {
        let not_blank = |name: &str| env(name).filter(|v| !v.trim().is_empty());
        Self {
            llm_base_url: not_blank("CATRACA_LLM_BASE_URL"),
            llm_model: not_blank("CATRACA_LLM_MODEL"),
            pncp_base_url: env("CATRACA_PNCP_BASE_URL").filter(|v| !v.is_empty()),
        }
    }
}

/// The resolved configuration the gateway runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub database_url: DatabaseUrl,
    pub redis_url: Option<DatabaseUrl>,
    pub policies_dir: PathBuf,
    pub executors_dir: PathBuf,
    pub audit_dir: PathBuf,
    pub mode: Mode,
    pub instance_id: String,
    pub log: String,
    pub log_format: LogFormat,
    /// Largest accepted `/process` body; 1 MiB holds any realistic procurement text while bounding memory.
    pub body_limit_bytes: usize,
    /// How long a verified key skips argon2. Revocation does not depend on it: the key row (and its
    /// `revoked_at`) is kept fresh by the key directory within `key_refresh`'s bound.
    pub auth_cache_ttl: Duration,
    /// Failed key verifications allowed per client address per minute before argon2 stops running for it.
    pub auth_failures_per_minute: u32,
    /// Bound of the audit queue; full means requests wait (push back), never that events are dropped.
    pub audit_queue_capacity: usize,
    /// Most events one group commit writes in a single transaction.
    pub audit_batch_max: usize,
    /// Size at which the live JSON Lines file is rotated and its part compressed (gzip).
    pub audit_file_max_bytes: u64,
    /// Whether a shared rate limiter that cannot be reached lets requests through (default: deny).
    pub rate_limit_fail_open: bool,
    /// Executor settings overridden from the environment; executors get them through `ExecutorEnv`.
    pub executor_overrides: ExecutorOverrides,
    /// Argon2 verifications that may run at once; each holds its own reused 19 MiB of memory.
    pub argon2_concurrency: usize,
    /// How often the key revision is read; key changes by any process are seen within it (and never
    /// later than three of it, past which cached keys are not used).
    pub key_refresh: Duration,
    /// How often refusals of a throttled address are written as one `REQUESTS_THROTTLED` summary.
    pub throttle_summary_interval: Duration,
    /// Peers whose `X-Forwarded-For` names the client; every other peer is the client itself.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    pub http: HttpLimits,
    /// `CATRACA_TLS_CERT` and `CATRACA_TLS_KEY`: serve HTTPS with this certificate chain and key (PEM),
    /// reloaded when the files change.
    pub tls: Option<TlsFiles>,
    /// `CATRACA_BEHIND_TLS_PROXY`: the gateway sits behind a proxy that terminates TLS, so `prod` mode
    /// may listen on a non-loopback address without TLS of its own.
    pub behind_tls_proxy: bool,
    /// The PostgreSQL pool's size and statement timeout (`postgres_max_connections`,
    /// `postgres_statement_timeout_ms`); SQLite ignores them.
    pub postgres: PgSettings,
    /// `CATRACA_AUDIT_SIGNING_KEY`: the key that signs audit checkpoints, or a file holding it.
    pub audit_signing_key: Option<KeySource>,
    /// `CATRACA_WITNESS_URL`: every signed checkpoint is POSTed there too.
    pub witness_url: Option<String>,
    /// A chain's head is signed at least this often while it grows (`checkpoint_interval_ms`, 1 s)…
    pub checkpoint_interval: Duration,
    /// …and after at most this many events (`checkpoint_max_events`, 10 000), and when its writer stops.
    pub checkpoint_max_events: u64,
}

/// A secret given as itself or as the path of a file: shown only as a path, never as its value.
#[derive(Clone, PartialEq, Eq)]
pub struct KeySource(String);

impl KeySource {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.starts_with("PRIVATE+") {
            f.write_str("KeySource(***)")
        } else {
            write!(f, "KeySource({:?})", self.0)
        }
    }
}

/// How a PostgreSQL store's pool is sized and its statements bounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PgSettings {
    /// Connections the pool opens at most (`postgres_max_connections`).
    pub max_connections: u32,
    /// The server cancels a statement running longer (`postgres_statement_timeout_ms`).
    pub statement_timeout: Duration,
}

impl Default for PgSettings {
    fn default() -> Self {
        Self {
            max_connections: 16,
            statement_timeout: Duration::from_secs(30),
        }
    }
}

/// The PEM files HTTPS is served with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The certificate chain, leaf first.
    pub cert: PathBuf,
    /// The private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// A trusted proxy: a CIDR (`10.0.0.0/8`) or a single address (`192.0.2.7`).
fn parse_proxy(text: &str) -> anyhow::Result<ipnet::IpNet> {
    text.parse::<ipnet::IpNet>()
        .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .map_err(|_| anyhow::anyhow!("trusted_proxies: {text:?} is neither a CIDR nor an address"))
}

/// Default body limit: 1 MiB.
const DEFAULT_BODY_LIMIT: usize = 1024 * 1024;

impl Config {
    /// Reads `path` (else `CATRACA_CONFIG`, else `catraca.toml` if it exists), then applies `CATRACA_*`.
    pub fn load(path: Option<&Path>) -> anyhow::Result<Self> {
        // Like every other setting, CATRACA_CONFIG may come from the environment or from `.env`.
        let file = match path {
            Some(p) => Some(p.to_path_buf()),
            None => env_var("CATRACA_CONFIG")
                .filter(|p| !p.is_empty())
                .map(PathBuf::from)
                .or_else(|| Some(PathBuf::from("catraca.toml")).filter(|p| p.exists())),
        };
        let parsed = match &file {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("reading {}", p.display()))?;
                toml::from_str::<FileConfig>(&text)
                    .with_context(|| format!("parsing {}", p.display()))?
            }
            None => FileConfig::default(),
        };
        Self::resolve(parsed, env_var)
    }

    /// Refuses what `prod` must not do: answer plain HTTP on an address other machines reach, unless
    /// a TLS-terminating proxy sits in front (`behind_tls_proxy`).
    pub fn check_exposure(&self) -> anyhow::Result<()> {
        if self.mode == Mode::Prod
            && self.tls.is_none()
            && !self.behind_tls_proxy
            && !self.listen.ip().is_loopback()
        {
            anyhow::bail!(
                "prod mode listens on {} only with TLS: set CATRACA_TLS_CERT and CATRACA_TLS_KEY, \
                 listen on a loopback address, or, behind a proxy that terminates TLS, set \
                 CATRACA_BEHIND_TLS_PROXY=true",
                self.listen
            );
        }
        Ok(())
    }

    /// Defaults for everything, as if no file and no variable were present; used by tests.
    pub fn defaults() -> Self {
        // Resolving an empty file with no environment cannot fail: every default parses.
        match Self::resolve(FileConfig::default(), |_| None) {
            Ok(c) => c,
            Err(e) => unreachable!("built-in defaults are valid: {e}"),
        }
    }

    fn resolve(file: FileConfig, env: impl Fn(&str) -> Option<String>) -> anyhow::Result<Self> {
        fn parsed<T: FromStr>(
            env: &impl Fn(&str) -> Option<String>,
            name: &str,
        ) -> anyhow::Result<Option<T>>
        where
            T::Err: fmt::Display,
        {
            env(name)
                .filter(|v| !v.is_empty())
                .map(|v| {
                    v.parse::<T>()
                        .map_err(|e| anyhow::anyhow!("{name}={v:?}: {e}"))
                })
                .transpose()
        }
        let text = |name: &str| env(name).filter(|v| !v.is_empty());

        let mode = parsed(&env, "CATRACA_MODE")?
            .or(file.mode)
            .unwrap_or(Mode::Dev);
        let instance_id = text("CATRACA_INSTANCE_ID")
            .or(file.instance_id)
            .or_else(|| env("HOSTNAME").filter(|h| !h.is_empty()))
            .unwrap_or_else(|| "catraca".to_owned());
        if instance_id.len() > 64 || instance_id.contains(char::is_whitespace) {
            anyhow::bail!(
                "instance id {instance_id:?} must be at most 64 characters without spaces"
            );
        }
        let config = Self {
            listen: parsed(&env, "CATRACA_LISTEN")?
                .or(file.listen)
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8000))),
            database_url: text("CATRACA_DATABASE_URL")
                .map(DatabaseUrl::new)
                .or(file.database_url)
                .unwrap_or_else(|| DatabaseUrl::new("sqlite://data/catraca.db")),
            redis_url: text("CATRACA_REDIS_URL")
                .map(DatabaseUrl::new)
                .or(file.redis_url),
            policies_dir: text("CATRACA_POLICIES_DIR")
                .map(PathBuf::from)
                .or(file.policies_dir)
                .unwrap_or_else(|| "policies".into()),
            executors_dir: text("CATRACA_EXECUTORS_DIR")
                .map(PathBuf::from)
                .or(file.executors_dir)
                .unwrap_or_else(|| "executors".into()),
            audit_dir: text("CATRACA_AUDIT_DIR")
                .map(PathBuf::from)
                .or(file.audit_dir)
                .unwrap_or_else(|| "data/audit".into()),
            mode,
            instance_id,
            log: text("CATRACA_LOG")
                .or(file.log)
                .unwrap_or_else(|| "info".to_owned()),
            log_format: parsed(&env, "CATRACA_LOG_FORMAT")?
                .or(file.log_format)
                .unwrap_or(LogFormat::Text),
            body_limit_bytes: file.body_limit_bytes.unwrap_or(DEFAULT_BODY_LIMIT),
            auth_cache_ttl: Duration::from_secs(file.auth_cache_ttl_secs.unwrap_or(60)),
            auth_failures_per_minute: file.auth_failures_per_minute.unwrap_or(30),
            audit_queue_capacity: file.audit_queue_capacity.unwrap_or(10_000),
            audit_batch_max: file.audit_batch_max.unwrap_or(1_000),
            audit_file_max_bytes: file
                .audit_file_max_bytes
                .unwrap_or(DEFAULT_AUDIT_FILE_MAX_BYTES),
            rate_limit_fail_open: file.rate_limit_fail_open.unwrap_or(false),
            executor_overrides: ExecutorOverrides::from_env(&env),
            argon2_concurrency: file.argon2_concurrency.unwrap_or(2),
            key_refresh: file
                .key_refresh_ms
                .map_or(DEFAULT_KEY_REFRESH, Duration::from_millis),
            throttle_summary_interval: Duration::from_secs(
                file.throttle_summary_secs.unwrap_or(10),
            ),
            trusted_proxies: file
                .trusted_proxies
                .unwrap_or_default()
                .iter()
                .map(|p| parse_proxy(p))
                .collect::<anyhow::Result<_>>()?,
            http: HttpLimits {
                header_timeout: Duration::from_secs(file.http_header_timeout_secs.unwrap_or(10)),
                body_timeout: Duration::from_secs(file.http_body_timeout_secs.unwrap_or(30)),
                idle_timeout: Duration::from_secs(file.http_idle_timeout_secs.unwrap_or(60)),
                max_connections: file.max_connections.unwrap_or(1024),
            },
            tls: match (
                text("CATRACA_TLS_CERT")
                    .map(PathBuf::from)
                    .or(file.tls_cert),
                text("CATRACA_TLS_KEY").map(PathBuf::from).or(file.tls_key),
            ) {
                (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
                (None, None) => None,
                _ => anyhow::bail!(
                    "CATRACA_TLS_CERT and CATRACA_TLS_KEY (tls_cert, tls_key) go together: set both or neither"
                ),
            },
            behind_tls_proxy: parsed(&env, "CATRACA_BEHIND_TLS_PROXY")?
                .or(file.behind_tls_proxy)
                .unwrap_or(false),
            postgres: {
                let default = PgSettings::default();
                PgSettings {
                    max_connections: file
                        .postgres_max_connections
                        .unwrap_or(default.max_connections),
                    statement_timeout: file
                        .postgres_statement_timeout_ms
                        .map_or(default.statement_timeout, Duration::from_millis),
                }
            },
            audit_signing_key: text("CATRACA_AUDIT_SIGNING_KEY")
                .or(file.audit_signing_key)
                .map(KeySource::new),
            witness_url: text("CATRACA_WITNESS_URL").or(file.witness_url),
            checkpoint_interval: Duration::from_millis(
                file.checkpoint_interval_ms.unwrap_or(1_000),
            ),
            checkpoint_max_events: file.checkpoint_max_events.unwrap_or(10_000),
        };
        if !config.database_url.is_sqlite() && !config.database_url.is_postgres() {
            anyhow::bail!(
                "CATRACA_DATABASE_URL must start with sqlite: or postgres://, got {}",
                config.database_url
            );
        }
        if config.audit_queue_capacity == 0 || config.audit_batch_max == 0 {
            anyhow::bail!("audit_queue_capacity and audit_batch_max must be positive");
        }
        if config.argon2_concurrency == 0
            || config.http.max_connections == 0
            || config.key_refresh.is_zero()
            || config.postgres.max_connections == 0
            || config.postgres.statement_timeout.is_zero()
            || config.checkpoint_interval.is_zero()
            || config.checkpoint_max_events == 0
        {
            anyhow::bail!(
                "argon2_concurrency, max_connections, key_refresh_ms, postgres_max_connections, \
                 postgres_statement_timeout_ms, checkpoint_interval_ms and checkpoint_max_events must be positive"
            );
        }
        let http = config.http;
        if [
            http.header_timeout,
            http.body_timeout,
            http.idle_timeout,
            config.throttle_summary_interval,
        ]
        .contains(&Duration::ZERO)
        {
            anyhow::bail!("http_*_timeout_secs and throttle_summary_secs must be positive");
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_files_go_together_and_a_proxy_may_terminate_tls() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, v)| (*v).to_owned())
            }
        };
        let both = Config::resolve(
            FileConfig::default(),
            env(&[("CATRACA_TLS_CERT", "c.pem"), ("CATRACA_TLS_KEY", "k.pem")]),
        )
        .unwrap();
        assert_eq!(
            both.tls,
            Some(TlsFiles {
                cert: "c.pem".into(),
                key: "k.pem".into()
            })
        );
        let err = Config::resolve(FileConfig::default(), env(&[("CATRACA_TLS_CERT", "c.pem")]))
            .unwrap_err();
        assert!(err.to_string().contains("CATRACA_TLS_KEY"), "{err}");
        let proxied = Config::resolve(
            FileConfig::default(),
            env(&[("CATRACA_BEHIND_TLS_PROXY", "true")]),
        )
        .unwrap();
        assert!(proxied.behind_tls_proxy && proxied.tls.is_none());
    }

    #[test]
    fn environment_overrides_the_file() {
        let file: FileConfig =
            toml::from_str("listen = \"127.0.0.1:9000\"\nmode = \"prod\"\n").unwrap();
        let cfg = Config::resolve(file, |name| {
            (name == "CATRACA_LISTEN").then(|| "127.0.0.1:9100".to_owned())
        })
        .unwrap();
        assert_eq!(cfg.listen.port(), 9100);
        assert_eq!(cfg.mode, Mode::Prod);
    }

    #[test]
    fn defaults_are_the_ones_the_readme_lists() {
        let c = Config::resolve(FileConfig::default(), |_| None).unwrap();
        assert_eq!(c.listen, "127.0.0.1:8000".parse().unwrap());
        assert_eq!(c.database_url.expose(), "sqlite://data/catraca.db");
        assert!(c.redis_url.is_none());
        assert_eq!(c.policies_dir, Path::new("policies"));
        assert_eq!(c.executors_dir, Path::new("executors"));
        assert_eq!(c.audit_dir, Path::new("data/audit"));
        assert_eq!(c.mode, Mode::Dev);
        assert_eq!(c.log, "info");
        assert_eq!(c.body_limit_bytes, 1_048_576);
        assert_eq!(c.auth_cache_ttl, Duration::from_secs(60));
        assert_eq!(c.auth_failures_per_minute, 30);
        assert_eq!(c.audit_queue_capacity, 10_000);
        assert_eq!(c.audit_batch_max, 1_000);
        assert!(!c.rate_limit_fail_open);
        assert_eq!(c.argon2_concurrency, 2);
        assert_eq!(c.key_refresh, Duration::from_millis(100));
        assert_eq!(c.throttle_summary_interval, Duration::from_secs(10));
        assert!(c.trusted_proxies.is_empty());
        assert_eq!(
            c.http,
            HttpLimits {
                header_timeout: Duration::from_secs(10),
                body_timeout: Duration::from_secs(30),
                idle_timeout: Duration::from_secs(60),
                max_connections: 1024,
            }
        );
    }

    #[test]
    fn trusted_proxies_are_cidrs_or_addresses() {
        let file: FileConfig =
            toml::from_str("trusted_proxies = [\"10.0.0.0/8\", \"::1\"]\n").unwrap();
        let cfg = Config::resolve(file, |_| None).unwrap();
        assert_eq!(cfg.trusted_proxies.len(), 2);
        let bad: FileConfig = toml::from_str("trusted_proxies = [\"10.0.0.0/33\"]\n").unwrap();
        let err = Config::resolve(bad, |_| None).unwrap_err().to_string();
        assert!(
            err.contains("trusted_proxies") && err.contains("10.0.0.0/33"),
            "{err}"
        );
    }

    #[test]
    fn executor_overrides_come_from_their_variables_when_not_empty() {
        let cfg = Config::resolve(FileConfig::default(), |name| match name {
            "CATRACA_LLM_BASE_URL" => Some("http://10.0.0.5:11434/v1".to_owned()),
            "CATRACA_LLM_MODEL" => Some("  ".to_owned()),
            "CATRACA_PNCP_BASE_URL" => Some("http://127.0.0.1:9/api/consulta".to_owned()),
            _ => None,
        })
        .unwrap();
        let overrides = cfg.executor_overrides;
        assert_eq!(
            overrides.llm_base_url.as_deref(),
            Some("http://10.0.0.5:11434/v1")
        );
        assert_eq!(overrides.llm_model, None, "a blank model overrides nothing");
        assert_eq!(
            overrides.pncp_base_url.as_deref(),
            Some("http://127.0.0.1:9/api/consulta")
        );
        let none = Config::resolve(FileConfig::default(), |name| {
            (name == "CATRACA_PNCP_BASE_URL").then(String::new)
        })
        .unwrap();
        assert_eq!(none.executor_overrides, ExecutorOverrides::default());
    }

    #[test]
    fn dotenv_lines_are_parsed_like_a_shell_would() {
        let vars = parse_dotenv(
            "# secrets\nCATRACA_LLM_API_KEY=\"sk-abc=def\"\nexport MODEL='qwen'\n\nBROKEN\nPLAIN = value \n",
        );
        assert_eq!(vars["CATRACA_LLM_API_KEY"], "sk-abc=def");
        assert_eq!(vars["MODEL"], "qwen");
        assert_eq!(vars["PLAIN"], "value");
        assert!(!vars.contains_key("BROKEN"));
    }

    #[test]
    fn an_unknown_file_key_is_an_error_naming_the_file_and_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gateway.toml");
        std::fs::write(&path, "listne = \"127.0.0.1:9000\"\n").unwrap();
        let err = format!("{:#}", Config::load(Some(&path)).unwrap_err());
        assert!(err.contains(&path.display().to_string()), "{err}");
        assert!(err.contains("listne"), "{err}");
    }

    #[test]
    fn a_file_that_cannot_be_read_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing.toml");
        let err = format!("{:#}", Config::load(Some(&path)).unwrap_err());
        assert!(err.contains(&path.display().to_string()), "{err}");
    }

    #[test]
    fn bad_environment_values_name_the_variable() {
        let err = Config::resolve(FileConfig::default(), |name| {
            (name == "CATRACA_MODE").then(|| "production".to_owned())
        })
        .unwrap_err();
        assert!(err.to_string().contains("CATRACA_MODE"), "{err}");
        let err = Config::resolve(FileConfig::default(), |name| {
            (name == "CATRACA_LISTEN").then(|| "localhost".to_owned())
        })
        .unwrap_err();
        assert!(err.to_string().contains("CATRACA_LISTEN"), "{err}");
        let err = Config::resolve(FileConfig::default(), |name| {
            (name == "CATRACA_DATABASE_URL").then(|| "mysql://db/catraca".to_owned())
        })
        .unwrap_err();
        assert!(err.to_string().contains("CATRACA_DATABASE_URL"), "{err}");
    }

    #[test]
    fn database_urls_print_without_their_password() {
        let url = DatabaseUrl::new("postgres://app:hunter2@db:5432/catraca");
        assert_eq!(url.to_string(), "postgres://app:***@db:5432/catraca");
        assert!(!format!("{url:?}").contains("hunter2"));
        assert_eq!(
            DatabaseUrl::new("sqlite://data/catraca.db").to_string(),
            "sqlite://data/catraca.db"
        );
    }
}
