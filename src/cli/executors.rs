//! `catraca executors ...`: the kill switch. `disable NAME --reason R` refuses the actions of an
//! executor on every gateway within the watch bound (503 `EXECUTOR_DISABLED`), `enable NAME` lets them
//! run again, `list` shows each loaded executor's state. Every switch is audited (EXECUTOR_SWITCHED).

use std::process::ExitCode;

use anyhow::Context as _;

use super::{ExecutorsCommand, executor_env};
use crate::app;
use crate::config::Config;
use crate::executors::Kinds;
use crate::executors::switches;

pub(super) async fn executors_command(
    config: Config,
    cmd: ExecutorsCommand,
) -> anyhow::Result<ExitCode> {
    let (registry, _) = app::load_policy(&config, &Kinds::builtin(), &executor_env(&config))?;
    let store = app::open_store(&config).await?;
    let (name, disabled, reason) = match cmd {
        ExecutorsCommand::List => {
            let switched = store.executor_switches().await?;
            println!("{:<20}  {:<9}  CHANGED", "EXECUTOR", "STATE");
            let mut names: Vec<&str> = registry.names().collect();
            names.sort_unstable();
            for name in names {
                match switched.iter().find(|s| s.executor == name) {
                    Some(s) => println!(
                        "{name:<20}  {:<9}  {} by {}: {}",
                        if s.disabled { "disabled" } else { "enabled" },
                        s.changed_at,
                        s.changed_by,
                        s.reason
                    ),
                    None => println!("{name:<20}  {:<9}  never switched", "enabled"),
                }
            }
            return Ok(ExitCode::SUCCESS);
        }
        ExecutorsCommand::Disable { name, reason } => (name, true, reason),
        ExecutorsCommand::Enable { name, reason } => {
            (name, false, reason.unwrap_or_else(|| "enabled".to_owned()))
        }
    };
    if registry.get(&name).is_none() {
        let mut known: Vec<&str> = registry.names().collect();
        known.sort_unstable();
        anyhow::bail!(
            "no executor named {name:?} in {} (known: {})",
            config.executors_dir.display(),
            known.join(", ")
        );
    }
    if reason.trim().is_empty() {
        anyhow::bail!("--reason must say why");
    }
    let (audit, writer) = super::command_audit(&config, store.clone()).await?;
    let actor = super::actor();
    let result = switches::switch(store.as_ref(), &audit, &name, disabled, &actor, &reason).await;
    drop(audit);
    writer.finish().await;
    result.context("executor switch failed")?;
    eprintln!(
        "executor {name} {} by {actor}; every gateway honours it within {} ms",
        if disabled { "disabled" } else { "enabled" },
        (config.key_refresh * crate::watch::STALE_AFTER_REFRESHES).as_millis()
    );
    Ok(ExitCode::SUCCESS)
}
