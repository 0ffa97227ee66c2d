//! Start-up: a server that builds the application, binds its own listener (port 0 in tests), serves
//! the HTTP routes and shuts down cleanly, flushing the audit writer.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;

use crate::app::{self, App};
use crate::audit::WriterTask;
use crate::config::Config;
use crate::executors::Kinds;
use crate::serve;

/// A built application bound to its listener.
pub struct Server {
    pub app: Arc<App>,
    listener: tokio::net::TcpListener,
    writer: WriterTask,
    tls: Option<serve::Tls>,
}

impl Server {
    /// Builds the app and binds `config.listen` (port 0 picks a free port). Refuses, before anything
    /// else, to serve plain HTTP where `prod` must not (see [`Config::check_exposure`]) and TLS files
    /// that cannot be used.
    pub async fn bind(config: Config, kinds: Kinds) -> anyhow::Result<Self> {
        config.check_exposure()?;
        let tls = config.tls.as_ref().map(serve::Tls::load).transpose()?;
        let listen = config.listen;
        let (app, writer) = app::build(config, &kinds).await?;
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding {listen}"))?;
        Ok(Self {
            app,
            listener,
            writer,
            tls,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` resolves, then drains connections (see [`serve::serve`]) and flushes the
    /// audit writer.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let Self {
            app,
            listener,
            writer,
            tls,
        } = self;
        let reload = app::spawn_policy_reload(app.clone());
        let summaries = app::spawn_throttle_summaries(app.clone());
        let router = crate::http::router(app.clone());
        let refused = {
            let app = app.clone();
            // Counted like any unrouted 503, so dashboards see refusals at the cap with no new series.
            move || {
                app.metrics
                    .requests_total
                    .with_label_values(&["unmatched", "other", "503"])
                    .inc();
            }
        };
        serve::serve(listener, router, app.config.http, tls, refused, shutdown).await;
        for task in [reload, summaries] {
            task.abort();
            let _ = task.await;
        }
        // Refusals counted since the last interval are written before the trail closes.
        app::flush_throttled(&app).await;
        // Spans of the last requests reach the collector (bounded: a dead collector does not hold the
        // shutdown).
        if let Some(telemetry) = app.telemetry.clone() {
            let _ = tokio::task::spawn_blocking(move || {
                telemetry.shutdown(std::time::Duration::from_secs(5));
            })
            .await;
        }
        // The last handle to the audit log goes with the app; the writer then drains and stops.
        let store = app.store.clone();
        drop(app);
        writer.finish().await;
        // Then the store's connections close before the process (or the caller) moves on: a task still
        // holding the store must not keep the database open behind a stopped gateway.
        store.close().await;
        Ok(())
    }
}
