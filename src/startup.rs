//! Start-up: a server that builds the application, binds its own listener (port 0 in tests), serves
//! the HTTP routes and shuts down cleanly, flushing the audit writer.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;

use crate::app::{self, App};
use crate::audit::WriterTask;
use crate::config::{Config, Mode};
use crate::executors::Kinds;

/// A built application bound to its listener.
pub struct Server {
    pub app: Arc<App>,
    listener: tokio::net::TcpListener,
    writer: WriterTask,
}

impl Server {
    /// Builds the app and binds `config.listen` (port 0 picks a free port).
    pub async fn bind(config: Config, kinds: Kinds) -> anyhow::Result<Self> {
        let listen = config.listen;
        let (app, writer) = app::build(config, &kinds).await?;
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding {listen}"))?;
        Ok(Self {
            app,
            listener,
            writer,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` resolves, then drains connections and flushes the audit writer.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let Self {
            app,
            listener,
            writer,
        } = self;
        let reload = (app.config.mode == Mode::Dev).then(|| app::spawn_policy_reload(app.clone()));
        let router = crate::http::router(app.clone());
        let served = axum::serve(
            listener,
            router.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(shutdown)
        .await;
        if let Some(task) = reload {
            task.abort();
            let _ = task.await;
        }
        // The last handle to the audit log goes with the app; the writer then drains and stops.
        drop(app);
        writer.finish().await;
        served.context("serving HTTP")
    }
}
