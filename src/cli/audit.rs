//! `catraca audit verify | trace | export`: the trail as operators and auditors read it. The work is
//! in `crate::audit`; this file prints.

use std::io::Write as _;
use std::process::ExitCode;

use anyhow::Context as _;

use super::{AuditCommand, ExportFormat};
use crate::app;
use crate::audit::export::{self, Export};
use crate::audit::{timeline, verify};
use crate::config::Config;

pub(super) async fn audit_command(config: &Config, cmd: AuditCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        AuditCommand::Verify {
            file,
            against_files,
            quiet,
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
                    let report = verify::verify_store(store.as_ref(), progress).await?;
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
