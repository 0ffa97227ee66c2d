//! The `catraca` command line. Each command builds what it needs from the one typed configuration.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};

use crate::app;
use crate::audit::{AuditLog, WriterOptions};
use crate::config::Config;
use crate::domain::{ContextId, KeyId, RoleName, TierName};
use crate::executors::Kinds;
use crate::keys::{self, KeyView, NewKey};
use crate::metrics::Metrics;
use crate::policy::testcases;
use crate::startup::Server;

#[derive(Debug, Parser)]
#[command(name = "catraca", version, about = "A governed agent gateway")]
pub struct Cli {
    /// Configuration file (default: ./catraca.toml when present). CATRACA_* variables override it.
    #[arg(long, global = true, env = "CATRACA_CONFIG")]
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
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Verify every hash chain in the database (or one JSON Lines file). Exit 0 when intact; 3 hash
    /// mismatch, 4 gap, 5 reordering, 6 truncation, 7 broken link, 1 could not verify.
    Verify {
        /// Verify this JSON Lines file instead of the database.
        #[arg(long)]
        file: Option<PathBuf>,
        /// Print only the summary line.
        #[arg(long)]
        quiet: bool,
    },
    /// Every event of one request, in chain order.
    Trace {
        trace_id: String,
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
}

fn init_logging(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Runs the command line; the exit code is the process's.
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let config = Config::load(cli.config.as_deref())?;
    init_logging(&config.log);
    match cli.command {
        Command::Serve => serve(config).await,
        Command::Migrate => {
            app::open_store(&config).await?;
            eprintln!("migrations applied to {}", config.database_url);
            Ok(ExitCode::SUCCESS)
        }
        Command::Keys(cmd) => keys_command(config, cmd).await,
        Command::Policy(cmd) => policy_command(&config, cmd),
        Command::Audit(cmd) => audit_command(&config, cmd).await,
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
    tracing::info!("shutting down: draining requests and flushing the audit trail");
}

async fn serve(config: Config) -> anyhow::Result<ExitCode> {
    let server = Server::bind(config, Kinds::builtin()).await?;
    let addr = server.local_addr()?;
    let app = server.app.clone();
    tracing::info!(
        %addr,
        mode = %app.config.mode,
        database = %app.config.database_url,
        policy_revision = %app.policy().revision,
        chain_id = %app.audit.chain_id(),
        "catraca listening"
    );
    if let Some(key) = app::bootstrap_dev_key(&app).await? {
        eprintln!(
            "\n  dev mode: created an admin key (shown once, store it now):\n\n    {}\n\n  try: curl -s http://{addr}/process -H 'X-API-Key: {}' -H 'Content-Type: application/json' -d '{{\"action\":\"echo\",\"context_id\":\"work\",\"payload\":{{\"message\":\"olá\"}}}}'\n",
            key.expose(),
            key.expose()
        );
    }
    drop(app);
    server.run(shutdown_signal()).await?;
    Ok(ExitCode::SUCCESS)
}

/// What key commands need: store, policy and an audit writer with its own chain.
async fn key_context(
    config: &Config,
) -> anyhow::Result<(
    std::sync::Arc<dyn crate::store::Store>,
    crate::policy::Policy,
    AuditLog,
    crate::audit::WriterTask,
)> {
    let store = app::open_store(config).await?;
    let (_, policy) = app::load_policy(config, &Kinds::builtin(), &Default::default())?;
    let (audit, writer) = AuditLog::start(
        store.clone(),
        Metrics::new()?,
        WriterOptions {
            instance_id: &config.instance_id,
            queue_capacity: 16,
            batch_max: 16,
            files_dir: Some(&config.audit_dir),
        },
    )
    .await?;
    Ok((store, policy, audit, writer))
}

fn print_key(view: &KeyView, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(view)?);
    } else if let Some(key) = &view.key {
        println!("{key}");
        eprintln!(
            "key {} ({}, role {}, tier {}) created; the line above is shown only once",
            view.key_id, view.name, view.role, view.tier
        );
    }
    Ok(())
}

async fn keys_command(config: Config, cmd: KeysCommand) -> anyhow::Result<ExitCode> {
    if let KeysCommand::List { json } = cmd {
        let store = app::open_store(&config).await?;
        let list = store.list_keys().await?;
        let views: Vec<KeyView> = list.iter().map(|k| KeyView::of(k, None)).collect();
        if json {
            println!("{}", serde_json::to_string(&views)?);
        } else {
            println!(
                "{:<16}  {:<20}  {:<10}  {:<10}  {:<12}  STATE",
                "KEY_ID", "NAME", "ROLE", "TIER", "CONTEXTS"
            );
            for v in views {
                let state = match (&v.revoked_at, &v.expires_at) {
                    (Some(at), _) => format!("revoked {at}"),
                    (None, Some(exp)) => format!("expires {exp}"),
                    (None, None) => "active".to_owned(),
                };
                println!(
                    "{:<16}  {:<20}  {:<10}  {:<10}  {:<12}  {state}",
                    v.key_id,
                    v.name,
                    v.role,
                    v.tier,
                    v.contexts.join(",")
                );
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    let (store, policy, audit, writer) = key_context(&config).await?;
    let result = match cmd {
        KeysCommand::Create(args) => {
            let template = NewKey {
                name: args.name,
                role: RoleName::parse(&args.role)?,
                contexts: args
                    .contexts
                    .iter()
                    .map(|c| ContextId::parse(c))
                    .collect::<Result<_, _>>()?,
                tier: args.tier.as_deref().map(TierName::parse).transpose()?,
                expires_in: args
                    .expires_in
                    .as_deref()
                    .map(keys::parse_duration)
                    .transpose()
                    .map_err(anyhow::Error::msg)?,
                actor: "cli",
            };
            keys::create(store.as_ref(), &audit, &policy, &template)
                .await
                .map(|(key, record)| print_key(&KeyView::of(&record, Some(&key)), args.json))
        }
        KeysCommand::Revoke { key_id } => {
            let id = KeyId::parse(&key_id)?;
            keys::revoke(store.as_ref(), &audit, &id, "cli")
                .await
                .map(|()| {
                    eprintln!("key {id} revoked");
                    Ok(())
                })
        }
        KeysCommand::Rotate {
            key_id,
            expires_in,
            json,
        } => {
            let id = KeyId::parse(&key_id)?;
            let expires_in = expires_in
                .as_deref()
                .map(keys::parse_duration)
                .transpose()
                .map_err(anyhow::Error::msg)?;
            keys::rotate(store.as_ref(), &audit, &policy, &id, expires_in, "cli")
                .await
                .map(|(key, record)| {
                    eprintln!("key {id} revoked; its replacement:");
                    print_key(&KeyView::of(&record, Some(&key)), json)
                })
        }
        KeysCommand::List { .. } => Ok(Ok(())),
    };
    drop(audit);
    writer.finish().await;
    result.context("key command failed")??;
    Ok(ExitCode::SUCCESS)
}

fn policy_command(config: &Config, cmd: PolicyCommand) -> anyhow::Result<ExitCode> {
    let (registry, policy) = app::load_policy(config, &Kinds::builtin(), &Default::default())?;
    match cmd {
        PolicyCommand::Check => {
            println!(
                "policy ok: revision {} ({} files, {} actions, executors: {})",
                policy.revision,
                policy.files.len(),
                policy.actions().count(),
                registry.names().collect::<Vec<_>>().join(", ")
            );
            Ok(ExitCode::SUCCESS)
        }
        PolicyCommand::Test => {
            let dir = config.policies_dir.join("tests");
            let results = testcases::run(&policy, &dir)?;
            let failed = results.iter().filter(|r| r.failure.is_some()).count();
            for r in &results {
                match &r.failure {
                    None => println!("ok    {} :: {}", r.file, r.name),
                    Some(why) => println!("FAIL  {} :: {}\n      {why}", r.file, r.name),
                }
            }
            println!(
                "{} passed, {failed} failed (policy revision {})",
                results.len() - failed,
                policy.revision
            );
            if results.is_empty() {
                eprintln!("no policy test cases found in {}", dir.display());
                return Ok(ExitCode::FAILURE);
            }
            Ok(if failed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

/// Parses `2026-11-22` (UTC midnight) or an RFC 3339 time into the trail's timestamp form.
fn parse_time(s: &str) -> anyhow::Result<String> {
    use time::format_description::well_known::Rfc3339;
    let t = if let Ok(t) = time::OffsetDateTime::parse(s, &Rfc3339) {
        t
    } else {
        let format = time::macros::format_description!("[year]-[month]-[day]");
        time::Date::parse(s, &format)
            .map(|d| d.midnight().assume_utc())
            .map_err(|_| anyhow::anyhow!("{s:?} is neither YYYY-MM-DD nor an RFC 3339 time"))?
    };
    Ok(crate::audit::timestamp(t))
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

/// Events exported per page: memory stays flat however long the period.
const EXPORT_PAGE: i64 = 5_000;

async fn audit_command(config: &Config, cmd: AuditCommand) -> anyhow::Result<ExitCode> {
    use crate::audit::verify;
    use std::io::Write as _;
    match cmd {
        AuditCommand::Verify { file, quiet } => {
            let progress = |n: u64| {
                if !quiet {
                    eprintln!("audit verify: {n} events checked ...");
                }
            };
            let (what, report) = match &file {
                Some(path) => (
                    path.display().to_string(),
                    verify::verify_file(path, progress)
                        .with_context(|| format!("reading {}", path.display()))?,
                ),
                None => {
                    let store = app::open_store(config).await?;
                    (
                        config.database_url.to_string(),
                        verify::verify_store(store.as_ref(), progress).await?,
                    )
                }
            };
            let summary = format!(
                "{} chains, {} events, {:.2}s ({what})",
                report.chains,
                report.events,
                report.elapsed.as_secs_f64()
            );
            match report.finding {
                None => {
                    println!("audit verify: intact: {summary}");
                    Ok(ExitCode::SUCCESS)
                }
                Some(f) => {
                    println!(
                        "audit verify: FAILED ({}) at chain {} seq {}: {}; checked {summary}",
                        f.problem.as_str(),
                        f.chain_id,
                        f.seq,
                        f.message
                    );
                    Ok(ExitCode::from(f.problem.exit_code()))
                }
            }
        }
        AuditCommand::Trace { trace_id, json } => {
            let store = app::open_store(config).await?;
            let events = store.events_for_trace(&trace_id).await?;
            if json {
                let list: Vec<_> = events.iter().map(|e| e.to_json()).collect();
                println!(
                    "{}",
                    serde_json::json!({"trace_id": trace_id, "events": list})
                );
            } else {
                print!("{}", crate::audit::timeline::render(&trace_id, &events));
            }
            Ok(if events.is_empty() {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        AuditCommand::Export {
            since,
            until,
            format,
        } => {
            let since = parse_time(&since)?;
            let until = match until {
                Some(u) => parse_time(&u)?,
                None => crate::audit::timestamp(time::OffsetDateTime::now_utc()),
            };
            let store = app::open_store(config).await?;
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            if matches!(format, ExportFormat::Csv) {
                writeln!(
                    out,
                    "occurred_at,chain_id,seq,event_type,trace_id,event_id,prev_hash,hash,body"
                )?;
            }
            let mut cursor: Option<(String, String, i64)> = None;
            loop {
                let page = store
                    .events_between(
                        &since,
                        &until,
                        cursor
                            .as_ref()
                            .map(|(a, c, s)| (a.as_str(), c.as_str(), *s)),
                        EXPORT_PAGE,
                    )
                    .await?;
                for e in &page {
                    match format {
                        ExportFormat::Jsonl => out.write_all(e.json_line().as_bytes())?,
                        ExportFormat::Csv => writeln!(
                            out,
                            "{},{},{},{},{},{},{},{},{}",
                            e.occurred_at,
                            csv_field(&e.chain_id),
                            e.seq,
                            e.event_type,
                            csv_field(e.trace_id.as_deref().unwrap_or("")),
                            e.event_id,
                            e.prev_hash,
                            e.hash,
                            csv_field(&e.body)
                        )?,
                    }
                }
                match page.last() {
                    Some(last) if page.len() as i64 == EXPORT_PAGE => {
                        cursor = Some((last.occurred_at.clone(), last.chain_id.clone(), last.seq));
                    }
                    _ => break,
                }
            }
            out.flush()?;
            Ok(ExitCode::SUCCESS)
        }
    }
}
