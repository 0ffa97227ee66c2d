//! The HTTP front door: the accept loop under the router, with the limits of [`HttpLimits`]. Each
//! connection holds one of `max_connections` permits; past them a connection is answered 503
//! `TOO_MANY_CONNECTIONS` and closed. A connection has the header timeout to send a request's headers
//! and the idle timeout to start its next one; a request's body must arrive within the body timeout
//! (else the input gate answers 408 `INPUT_TIMEOUT`). Slow or silent connections are closed, so they
//! cannot hold descriptors or permits that legitimate clients need.
//!
//! It knows nothing of routes: `startup` hands it the router.

mod body;
mod clock;
mod refuse;

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::Request;
use hyper::body::{Body, Bytes, Frame, Incoming, SizeHint};
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;
use tower_service::Service as _;

pub use body::BodyTimeout;
use body::{Leftover, TimedBody};
use clock::{Clock, InFlight, Wait, Watched};

use crate::config::HttpLimits;

/// How long shutdown waits for requests in flight before closing their connections anyway. Below the
/// 30 s most supervisors (systemd, Kubernetes) allow before killing the process, leaving time to flush
/// the audit trail afterwards.
pub const DRAIN_LIMIT: Duration = Duration::from_secs(20);

/// Pause after an accept error that is not one connection's own (out of descriptors, mostly): such an
/// error clears only when some connection closes, so retrying at once would spin, while a long pause
/// would keep clients out after descriptors are free again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Refusals being written at once. Each is a few hundred bytes under a short deadline; past this many
/// a connection over the cap is closed without an answer rather than holding yet another descriptor.
const REFUSALS_AT_ONCE: usize = 64;

/// Serves `router` on `listener` until `shutdown` resolves. Then it stops accepting, closes connections
/// with no request in flight, lets requests in flight finish for at most [`DRAIN_LIMIT`] and returns.
/// `on_refused` is called for each connection refused at the cap (for metrics).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: HttpLimits,
    on_refused: impl Fn(),
    shutdown: impl Future<Output = ()>,
) {
    // More permits than a semaphore holds would be more connections than any system has descriptors.
    let permits = Arc::new(Semaphore::new(
        limits.max_connections.min(Semaphore::MAX_PERMITS),
    ));
    let refusals = Arc::new(Semaphore::new(REFUSALS_AT_ONCE));
    let (stop, stopped) = watch::channel(false);
    let mut connections = JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            Some(ended) = connections.join_next(), if !connections.is_empty() => {
                if let Err(e) = ended
                    && e.is_panic()
                {
                    tracing::error!(error = %e, "a connection task panicked");
                }
                continue;
            }
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            // The peer gave up before it was accepted; nothing is wrong with the listener.
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "cannot accept connections; retrying shortly");
                tokio::select! {
                    () = &mut shutdown => break,
                    () = tokio::time::sleep(ACCEPT_BACKOFF) => continue,
                }
            }
        };
        match permits.clone().try_acquire_owned() {
            Ok(permit) => {
                let connection = Connection {
                    router: router.clone(),
                    limits,
                    peer,
                    stop: stopped.clone(),
                    permit,
                };
                connections.spawn(connection.run(stream));
            }
            Err(_) => {
                on_refused();
                match refusals.clone().try_acquire_owned() {
                    Ok(permit) => {
                        connections.spawn(refuse::too_many_connections(stream, permit));
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "closing a connection over the cap unanswered")
                    }
                }
            }
        }
    }
    // New connections now meet a closed port rather than a loop that no longer accepts.
    drop(listener);
    stop.send_replace(true);
    let drained = tokio::time::timeout(DRAIN_LIMIT, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            connections = connections.len(),
            "requests still in flight after {DRAIN_LIMIT:?}; closing their connections"
        );
        connections.shutdown().await;
    }
}

/// Errors of one incoming connection, not of the listener.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// One accepted connection and what it needs to be served.
struct Connection {
    router: Router,
    limits: HttpLimits,
    peer: SocketAddr,
    stop: watch::Receiver<bool>,
    /// Held while the connection is open: one of `max_connections`.
    permit: OwnedSemaphorePermit,
}

impl Connection {
    async fn run(mut self, stream: TcpStream) {
        let HttpLimits {
            header_timeout,
            body_timeout,
            idle_timeout,
            ..
        } = self.limits;
        let clock = Clock::start(header_timeout, idle_timeout);
        let service = {
            let (router, clock, peer) = (self.router.clone(), clock.clone(), self.peer);
            service_fn(move |request: Request<Incoming>| {
                let in_flight = clock.request_started();
                let finished = Arc::new(AtomicBool::new(false));
                let leftover = Leftover::default();
                let mut request = request.map(|body| {
                    axum::body::Body::new(TimedBody::new(
                        body,
                        body_timeout,
                        finished.clone(),
                        leftover.clone(),
                    ))
                });
                request.extensions_mut().insert(ConnectInfo(peer));
                let mut router = router.clone();
                async move {
                    let mut response = router.call(request).await?;
                    // Answered without reading the whole body (a refusal before the input gate, an
                    // unknown route): a short rest is read here so that the connection can take the
                    // next request; otherwise say so and close it rather than let the client send its
                    // next request into a connection that is going away.
                    let rest = leftover
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .take();
                    let drained = match rest {
                        Some(rest) if !finished.load(Ordering::Acquire) => body::drain(rest).await,
                        _ => false,
                    };
                    if !finished.load(Ordering::Acquire) && !drained {
                        response
                            .headers_mut()
                            .insert(header::CONNECTION, HeaderValue::from_static("close"));
                    }
                    Ok::<_, Infallible>(response.map(|body| Answer {
                        body,
                        _in_flight: in_flight,
                    }))
                }
            })
        };
        // Hyper's header timer would also run while a kept-alive connection waits for its next
        // request, so the clock times both waits instead.
        let connection = http1::Builder::new()
            .keep_alive(true)
            .header_read_timeout(None)
            .serve_connection(TokioIo::new(Watched::new(stream, clock.clone())), service);
        let mut connection = Box::pin(connection);
        let peer = self.peer;
        tokio::select! {
            ended = connection.as_mut() => {
                if let Err(e) = ended {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
            }
            wait = clock.expired() => match wait {
                Wait::Headers => tracing::debug!(
                    %peer, "closing a connection whose request headers did not arrive within {header_timeout:?}"
                ),
                Wait::Idle => tracing::debug!(
                    %peer, "closing a connection idle for {idle_timeout:?}"
                ),
            },
            () = stopping(&mut self.stop) => {
                // Shutting down: a connection with no request in flight is owed nothing and closes
                // now; one with a request finishes it (the server bounds the wait) and then closes.
                if clock.is_busy() {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.as_mut().await;
                }
            }
        }
        // The permit goes back before the socket closes, so a client that sees this connection
        // close and connects again finds it free.
        drop(self.permit);
        drop(connection);
    }
}

/// Resolves when the server shuts down (or is gone).
async fn stopping(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

/// A response body that keeps its request counted as in flight until the body has been sent.
struct Answer {
    body: axum::body::Body,
    _in_flight: InFlight,
}

impl Body for Answer {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
