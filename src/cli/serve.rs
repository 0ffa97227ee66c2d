//! `catraca serve`: the gateway until SIGINT or SIGTERM, then a drained, flushed shutdown.

use std::process::ExitCode;

use crate::app;
use crate::config::Config;
use crate::executors::Kinds;
use crate::startup::Server;

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

pub(super) async fn serve(config: Config) -> anyhow::Result<ExitCode> {
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
