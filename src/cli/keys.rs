//! `catraca keys ...`: create, list, revoke and rotate API keys; every change is audited.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;

use super::{KeysCommand, executor_env};
use crate::app;
use crate::audit::{AuditLog, WriterTask};
use crate::config::Config;
use crate::domain::{ContextId, KeyId, RoleName, TierName};
use crate::executors::Kinds;
use crate::keys::{self, KeyView, NewKey};
use crate::policy::Policy;
use crate::store::Store;

/// What key commands need: store, policy and an audit writer with its own chain.
async fn key_context(
    config: &Config,
) -> anyhow::Result<(Arc<dyn Store>, Policy, AuditLog, WriterTask)> {
    let store = app::open_store(config).await?;
    let (_, policy) = app::load_policy(config, &Kinds::builtin(), &executor_env(config))?;
    let (audit, writer) = super::command_audit(config, store.clone()).await?;
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

pub(super) async fn keys_command(config: Config, cmd: KeysCommand) -> anyhow::Result<ExitCode> {
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
                actor: "cli".to_owned(),
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
