//! `catraca audit verify | trace | export`: the trail as operators and auditors read it. The work is
//! in `crate::audit`; this file prints.

use std::io::Write as _;
use std::process::ExitCode;

use anyhow::Context as _;

use super::{AuditCommand, ExportFormat};
use crate::app;
use crate::audit::anchor::{self, PublicKey};
use crate::audit::anchored::Anchors;
use crate::audit::export::{self, Export};
use crate::audit::proof::{self, DecisionProof};
use crate::audit::{CHECKPOINTS_FILE, timeline, verify};
use crate::config::Config;

pub(super) async fn audit_command(config: &Config, cmd: AuditCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        AuditCommand::Verify {
            file,
            against_files,
            quiet,
            public_key,
            checkpoints,
        } => {
            let progress = |n: u64| {
                if !quiet {
                    eprintln!("audit verify: {n} events checked ...");
                }
            };
            let (what, mut report) = match &file {
                Some(path) => (
                    path.display().to_string(),
                    verify::verify_file(path, progress)
                        .with_context(|| format!("reading {}", path.display()))?,
                ),
                None => {
                    let store = app::open_store(config).await?;
                    let anchors = anchors_of(
                        config,
                        public_key.as_deref(),
                        checkpoints,
                        against_files.as_deref(),
                    )?;
                    match &anchors {
                        Some(a) if !quiet => eprintln!(
                            "audit verify: checkpoints checked with {} ({} outside the database)",
                            a.key.as_str(),
                            a.outside
                                .iter()
                                .map(|p| p.display().to_string())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                        Some(_) => {}
                        None => eprintln!(
                            "audit verify: no public key (--public-key, or CATRACA_AUDIT_SIGNING_KEY): \
                             the chains are verified, their checkpoints are not"
                        ),
                    }
                    let report = verify::verify_store_anchored(
                        store.as_ref(),
                        anchors.as_ref(),
                        verify::PAGE,
                        progress,
                    )
                    .await?;
                    // Kept for the console's chains page; a verdict that cannot be kept is still printed.
                    if let Err(e) = store.record_verification(&report.summary("cli")).await {
                        eprintln!(
                            "audit verify: the result could not be recorded in the store: {e}"
                        );
                    }
                    (config.database_url.to_string(), report)
                }
            };
            let mut what = what;
            if let Some(dir) = against_files.as_deref()
                && report.finding.is_none()
            {
                let store = app::open_store(config).await?;
                let compared = verify::compare_with_files(store.as_ref(), dir, progress)
                    .await
                    .with_context(|| format!("comparing with {}", dir.display()))?;
                what = format!(
                    "{what}; {} events of {} chains in {} compared",
                    compared.events,
                    compared.chains,
                    dir.display()
                );
                report.finding = compared.finding;
                report.elapsed += compared.elapsed;
            }
            let seconds = report.elapsed.as_secs_f64();
            let summary = format!(
                "{} chains, {} events, {seconds:.2}s, {:.0} events/s ({what})",
                report.chains,
                report.events,
                report.events as f64 / seconds.max(1e-9)
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
        AuditCommand::Prove { decision_id } => {
            let store = app::open_store(config).await?;
            let key = anchor::signing_key_if_any(config)?
                .map(|k| k.public().clone())
                .context("no checkpoint signing key is configured (CATRACA_AUDIT_SIGNING_KEY)")?;
            match proof::prove(store.as_ref(), &key, &decision_id).await {
                Ok(proof) => {
                    println!("{}", serde_json::to_string_pretty(&proof)?);
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    eprintln!("audit prove: {e}");
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        AuditCommand::VerifyReceipt { file, public_key } => {
            let key = PublicKey::from_text_or_file(&public_key)?;
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let proof: DecisionProof = serde_json::from_str(&text)
                .with_context(|| format!("{} is not a decision proof", file.display()))?;
            match proof::verify_offline(&proof, &key) {
                Ok(v) => {
                    let field = |name: &str| {
                        v.event
                            .get(name)
                            .and_then(serde_json::Value::as_str)
                            .unwrap_or("-")
                            .to_owned()
                    };
                    println!(
                        "receipt verified: decision {} ({}) of trace {} at chain {} seq {}, under policy \
                         revision {}, at {}; covered by a checkpoint of {} events signed by {}",
                        field("decision_id"),
                        field("effect"),
                        field("trace_id"),
                        v.chain_id,
                        v.seq,
                        field("policy_revision"),
                        field("occurred_at"),
                        v.tree_size,
                        key.as_str()
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    println!("receipt NOT verified: {e}");
                    Ok(ExitCode::from(2))
                }
            }
        }
        AuditCommand::PublicKey => {
            let key = anchor::signing_key_if_any(config)?
                .context("no checkpoint signing key is configured (CATRACA_AUDIT_SIGNING_KEY)")?;
            println!("{}", key.public().as_str());
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Keygen { out, name } => {
            let public = anchor::write_new_key(&out, &name)?;
            eprintln!(
                "private key written to {} (keep it off the database's machine's backups)",
                out.display()
            );
            println!("{}", public.as_str());
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Trace {
            trace_id,
            run_id,
            json,
        } => {
            let store = app::open_store(config).await?;
            let trace_id = match (trace_id, run_id) {
                (Some(trace_id), _) => trace_id,
                (None, Some(run_id)) => match store.collector_run_trace(&run_id).await? {
                    Some(trace_id) => {
                        eprintln!("collector run {run_id} was made by request {trace_id}");
                        trace_id
                    }
                    None => {
                        eprintln!("no collector run {run_id} with a known request");
                        return Ok(ExitCode::FAILURE);
                    }
                },
                (None, None) => anyhow::bail!("give a trace id or --run-id RUN_ID"),
            };
            let events = store.events_for_trace(&trace_id).await?;
            if json {
                let list: Vec<_> = events.iter().map(|e| e.to_json()).collect();
                println!(
                    "{}",
                    serde_json::json!({"trace_id": trace_id, "events": list})
                );
            } else {
                print!("{}", timeline::render(&trace_id, &events));
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
            let mut export = Export::new(&since, until.as_deref())?;
            let store = app::open_store(config).await?;
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            if matches!(format, ExportFormat::Csv) {
                writeln!(out, "{}", export::CSV_HEADER)?;
            }
            loop {
                let page = export.next_page(store.as_ref()).await?;
                if page.is_empty() {
                    break;
                }
                for e in &page {
                    match format {
                        ExportFormat::Jsonl => out.write_all(e.json_line().as_bytes())?,
                        ExportFormat::Csv => writeln!(out, "{}", export::csv_line(e))?,
                    }
                }
            }
            out.flush()?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The key and the outside copies `verify` holds checkpoints to: `--public-key`, else the configured
/// signing key's public half; the `--checkpoints` files, then the checkpoints files of the folder
/// compared with and of the audit folder, when present. `None` when no key is known.
fn anchors_of(
    config: &Config,
    public_key: Option<&str>,
    mut outside: Vec<std::path::PathBuf>,
    against_files: Option<&std::path::Path>,
) -> anyhow::Result<Option<Anchors>> {
    let key = match public_key {
        Some(k) => Some(PublicKey::from_text_or_file(k)?),
        None => anchor::signing_key_if_any(config)?.map(|k| k.public().clone()),
    };
    let Some(key) = key else { return Ok(None) };
    for dir in against_files
        .into_iter()
        .chain([config.audit_dir.as_path()])
    {
        let path = dir.join(CHECKPOINTS_FILE);
        let seen = outside.iter().any(|p| same_file(p, &path));
        if path.is_file() && !seen {
            outside.push(path);
        }
    }
    Ok(Some(Anchors { key, outside }))
}

fn same_file(a: &std::path::Path, b: &std::path::Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}
