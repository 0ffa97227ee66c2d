//! `catraca policy check`, `test` and `reload`: load executors and policies as `serve` would, report
//! problems, run the policy test cases, ask every gateway on the database to reload its policy files.

use std::process::ExitCode;

use anyhow::Context as _;

use super::{PolicyCommand, executor_env};
use crate::app;
use crate::config::Config;
use crate::executors::Kinds;
use crate::policy::testcases;

pub(super) async fn policy_command(
    config: &Config,
    cmd: PolicyCommand,
) -> anyhow::Result<ExitCode> {
    let (registry, policy) = app::load_policy(config, &Kinds::builtin(), &executor_env(config))?;
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
        PolicyCommand::Reload => {
            let store = app::open_store(config).await?;
            let at = crate::event::timestamp(time::OffsetDateTime::now_utc());
            let request = store
                .request_policy_reload(&at, &super::actor(), &policy.revision)
                .await
                .context("asking the gateways to reload their policy")?;
            println!(
                "policy reload {request} asked (this machine's files: revision {}); every gateway on {} \
                 reloads its files within {} ms and reports its revision on /ready",
                policy.revision,
                config.database_url,
                config.key_refresh.as_millis()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}
