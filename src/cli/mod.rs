//! The `catraca` command line. Each command builds what it needs from the one typed configuration;
//! the commands of each group live in a file of their own (`serve`, `keys`, `policy`, `audit`).

mod audit;
mod executors;
mod keys;
mod policy;
mod seed;
mod serve;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::app;
use crate::config::{Config, LogFormat};
use crate::executors::ExecutorEnv;

#[derive(Debug, Parser)]
#[command(name = "catraca", version, about = "A governed agent gateway")]
pub struct Cli {
    /// Configuration file (default: CATRACA_CONFIG, else ./catraca.toml when present). CATRACA_*
    /// variables override it.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Migrate the database, load policies and executors, serve HTTP.
    Serve,
    /// Apply database migrations only.
    Migrate,
    /// Create, list, revoke and rotate API keys (each change is audited).
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Validate policies or run their test cases.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Verify, trace and export the audit trail.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// The kill switch: disable or enable an executor on every gateway (each switch is audited).
    #[command(subcommand)]
    Executors(ExecutorsCommand),
    /// Fill an EMPTY store with synthetic keys (none can sign in) and request stories, through the audit
    /// writer, to reproduce the trail's scale figures (scripts/scale.sh). Refused on a store in use.
    Seed {
        #[arg(long, default_value_t = 100_000)]
        keys: usize,
        #[arg(long, default_value_t = 10_000_000)]
        events: u64,
    },
}

#[derive(Debug, Subcommand)]
enum ExecutorsCommand {
    /// Refuse the actions of executor NAME (503 EXECUTOR_DISABLED) on every gateway within the bound.
    Disable {
        name: String,
        /// Why (recorded in the trail and shown to refused clients).
        #[arg(long)]
        reason: String,
    },
    /// Let executor NAME run again.
    Enable {
        name: String,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Each loaded executor and its switch.
    List,
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Verify every hash chain in the database (or JSON Lines files), and hold each to its signed
    /// checkpoints. Exit 0 when intact; 3 hash mismatch, 4 gap, 5 reordering, 6 truncation, 7 broken
    /// link, 8 database and files differ, 9 checkpoint mismatch, 10 bad checkpoint, 11 missing
    /// checkpoint, 12 events after a closing checkpoint, 1 could not verify.
    Verify {
        /// Verify this JSON Lines file (.jsonl or .jsonl.gz), or every trail file of this folder in
        /// write order, instead of the database.
        #[arg(long, conflicts_with = "against_files")]
        file: Option<PathBuf>,
        /// After verifying the database, compare it with the JSON Lines files of this folder: any
        /// event missing from either, or different, is named (exit 8).
        #[arg(long, value_name = "DIR")]
        against_files: Option<PathBuf>,
        /// Print only the summary line.
        #[arg(long)]
        quiet: bool,
        /// The checkpoints' public key (or a file holding it); by default the public half of the
        /// configured signing key.
        #[arg(long, value_name = "KEY")]
        public_key: Option<String>,
        /// A copy of checkpoints.ndjson kept away from the database (repeatable); the audit folder's own
        /// is always read when present.
        #[arg(long, value_name = "FILE")]
        checkpoints: Vec<PathBuf>,
    },
    /// Print the proof that the trail holds a decision (its receipt, DECISION event, signed checkpoint
    /// and inclusion proof) as JSON, for `verify-receipt`.
    Prove { decision_id: String },
    /// Check a decision's proof offline (no database, no server): the checkpoint's signature, the
    /// event's hash and its inclusion under the checkpoint. Exit 0 when genuine, 2 when not.
    VerifyReceipt {
        /// The proof, as `prove` or `GET /v1/audit/proofs/{decision_id}` gave it.
        file: PathBuf,
        /// The gateway's checkpoint public key (or a file holding it).
        #[arg(long, value_name = "KEY")]
        public_key: String,
    },
    /// Print the public key of the configured checkpoint signing key.
    PublicKey,
    /// Make a checkpoint signing key: the private key goes to FILE (readable by its owner only), the
    /// public key is printed.
    Keygen {
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// The name the key signs under.
        #[arg(long, default_value = "catraca")]
        name: String,
    },
    /// Every event of one request, in chain order.
    Trace {
        #[arg(required_unless_present = "run_id")]
        trace_id: Option<String>,
        /// Find the request that made this collector run (its `run_id`) instead.
        #[arg(long, conflicts_with = "trace_id")]
        run_id: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Stream events with since <= occurred_at < until, for auditors.
    Export {
        /// RFC 3339 time or YYYY-MM-DD (UTC midnight).
        #[arg(long)]
        since: String,
        /// RFC 3339 time or YYYY-MM-DD (default: now).
        #[arg(long)]
        until: Option<String>,
        #[arg(long, value_enum, default_value_t = ExportFormat::Jsonl)]
        format: ExportFormat,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum ExportFormat {
    Jsonl,
    Csv,
}

#[derive(Debug, Subcommand)]
enum KeysCommand {
    /// Create a key and print it once.
    Create(CreateArgs),
    /// List keys (never their secrets).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key; it is refused from the next request on.
    Revoke { key_id: String },
    /// Replace a key with a new one (same name, role, contexts, tier) and revoke the old one.
    Rotate {
        key_id: String,
        /// Lifetime of the new key, e.g. 90d, 12h.
        #[arg(long)]
        expires_in: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
struct CreateArgs {
    #[arg(long)]
    name: String,
    #[arg(long)]
    role: String,
    /// Context the key may act in; repeat for several; none = every context.
    #[arg(long = "context")]
    contexts: Vec<String>,
    /// Rate-limit tier (default: the policy's default tier).
    #[arg(long)]
    tier: Option<String>,
    /// Lifetime, e.g. 90d, 12h, 30m.
    #[arg(long)]
    expires_in: Option<String>,
    /// Print a JSON object (the key in field `key`) instead of the bare key.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// Load executors and policies and report problems.
    Check,
    /// Run the cases in <policies>/tests/*.toml.
    Test,
    /// Ask every gateway on the database to reload its policy files (once this machine's files load):
    /// pushed at once on PostgreSQL, honoured within key_refresh_ms everywhere. Each gateway reads its
    /// own files, reports the revision on /ready and records POLICY_LOADED (or POLICY_REJECTED).
    Reload,
}

/// The process log on stderr: text (coloured only on a terminal) or one JSON object per line, where
/// lines written while serving a request carry its `trace_id` (the request span's field). A failed write
/// (stderr closed or full) is dropped, never an error of the request that logged it.
fn init_logging(filter: &str, format: LogFormat) {
    use std::io::IsTerminal as _;
    let mut env_filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // The MCP SDK logs three INFO lines per stateless request; its warnings are what an operator
    // needs, unless the filter asks for more of it by name.
    if !filter.contains("rmcp")
        && let Ok(quiet) = "rmcp=warn".parse()
    {
        env_filter = env_filter.add_directive(quiet);
    }
    let filter = env_filter;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
    };
}

/// An audit writer with a chain of its own for a command that changes governed state (keys, switches).
async fn command_audit(
    config: &Config,
    store: std::sync::Arc<dyn crate::store::Store>,
) -> anyhow::Result<(crate::audit::AuditLog, crate::audit::WriterTask)> {
    let metrics = crate::metrics::Metrics::new()?;
    let checkpoints = crate::audit::Checkpointing::from_config(config, &metrics)?;
    crate::audit::AuditLog::start(
        store,
        metrics,
        crate::audit::WriterOptions {
            instance_id: &config.instance_id,
            queue_capacity: 16,
            batch_max: 16,
            files_dir: Some(&config.audit_dir),
            file_max_bytes: config.audit_file_max_bytes,
            checkpoints,
        },
    )
    .await
}

/// Who ran a command that changes governed state: the CLI and the operating-system user running it.
fn actor() -> String {
    let user = ["USER", "LOGNAME"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|u| !u.is_empty()))
        .unwrap_or_else(|| "unknown".to_owned());
    format!("cli:{user}")
}

/// What commands that load executor files without serving give them: no database or metrics, the
/// configuration's overrides (so `policy check` builds executors exactly as `serve` would).
fn executor_env(config: &Config) -> ExecutorEnv {
    ExecutorEnv {
        overrides: config.executor_overrides.clone(),
        ..ExecutorEnv::default()
    }
}

/// Runs the command line; the exit code is the process's.
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let config = Config::load(cli.config.as_deref())?;
    init_logging(&config.log, config.log_format);
    match cli.command {
        Command::Serve => serve::serve(config).await,
        Command::Migrate => {
            app::open_store(&config).await?;
            eprintln!("migrations applied to {}", config.database_url);
            Ok(ExitCode::SUCCESS)
        }
        Command::Keys(cmd) => keys::keys_command(config, cmd).await,
        Command::Policy(cmd) => policy::policy_command(&config, cmd).await,
        Command::Audit(cmd) => audit::audit_command(&config, cmd).await,
        Command::Executors(cmd) => executors::executors_command(config, cmd).await,
        Command::Seed { keys, events } => seed::seed(&config, keys, events).await,
    }
}
