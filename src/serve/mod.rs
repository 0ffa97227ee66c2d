//! The HTTP front door: the accept loop under the router, with the limits of [`HttpLimits`]. Each
//! connection holds one of `max_connections` permits; past them a connection is answered 503
//! `TOO_MANY_CONNECTIONS` and closed. A connection has the header timeout to send a request's headers
//! and the idle timeout to start its next one; a request's body must arrive within the body timeout
//! (else the input gate answers 408 `INPUT_TIMEOUT`). Slow or silent connections are closed, so they
//! cannot hold descriptors or permits that legitimate clients need.
//!
//! With [`Tls`], connections are HTTPS: the handshake must end within the header timeout (it counts
//! as the start of the first request), then HTTP/2 or HTTP/1.1 as ALPN chose; HTTP/2 streams share the
//! connection's clock and permit.
//!
//! It knows nothing of routes: `startup` hands it the router.

mod body;
mod clock;
mod refuse;
mod tls;

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
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulConnection;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;
use tower_service::Service as _;

pub use body::BodyTimeout;
use body::{Leftover, TimedBody};
use clock::{Clock, InFlight, Wait, Watched};
pub use tls::{RELOAD_EVERY as TLS_RELOAD_EVERY, Tls};

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

/// Requests one HTTP/2 connection may have in flight at once.
const MAX_STREAMS: u32 = 64;

/// Most bytes of an HTTP/2 request's headers, past which the stream is refused: well above what the
/// front door answers with a JSON 431 (`MAX_HEADER_BYTES`), as hyper's HTTP/1 buffer is.
const MAX_H2_HEADER_LIST: u32 = 256 * 1024;

/// Serves `router` on `listener` until `shutdown` resolves. Then it stops accepting, closes connections
/// with no request in flight, lets requests in flight finish for at most [`DRAIN_LIMIT`] and returns.
/// `on_refused` is called for each connection refused at the cap (for metrics).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: HttpLimits,
    tls: Option<Tls>,
    on_refused: impl Fn(),
    shutdown: impl Future<Output = ()>,
) {
    // Dropped (and so stopped) when serving ends.
    let _watching = tls.clone().map(|t| AbortOnDrop(tokio::spawn(t.watch())));
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
                    tls: tls.as_ref().map(|t| t.acceptor.clone()),
                };
                // Boxed: the connection's future is large, and a spawn moves it more than once.
                connections.spawn(Box::pin(connection.run(stream)));
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
    /// The handshake of an HTTPS connection.
    tls: Option<tokio_rustls::TlsAcceptor>,
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
        let peer = self.peer;
        let stream = Watched::new(stream, clock.clone());
        let Some(acceptor) = self.tls.take() else {
            let connection = http1_builder().serve_connection(TokioIo::new(stream), service);
            self.drive(connection, &clock).await;
            return;
        };
        // The handshake is the start of the first request: it has the header timeout, like headers.
        let handshake = tokio::select! {
            done = acceptor.accept(stream) => done,
            _ = clock.expired() => {
                tracing::debug!(%peer, "closing a connection whose TLS handshake did not end within {header_timeout:?}");
                return;
            }
            () = stopping(&mut self.stop) => return,
        };
        let stream = match handshake {
            Ok(stream) => stream,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                return;
            }
        };
        if stream.get_ref().1.alpn_protocol() == Some(tls::H2) {
            let connection = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .max_concurrent_streams(MAX_STREAMS)
                .max_header_list_size(MAX_H2_HEADER_LIST)
                .serve_connection(TokioIo::new(stream), service);
            self.drive(connection, &clock).await;
        } else {
            let connection = http1_builder().serve_connection(TokioIo::new(stream), service);
            self.drive(connection, &clock).await;
        }
    }
}

/// The HTTP/1.1 connection builder. Hyper's header timer would also run while a kept-alive
/// connection waits for its next request, so the connection's clock times both waits instead.
fn http1_builder() -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder.keep_alive(true).header_read_timeout(None);
    builder
}

impl Connection {
    /// Serves `connection` until it ends, its clock runs out, or the server stops (then a request in
    /// flight is finished first).
    async fn drive<C>(mut self, connection: C, clock: &Clock)
    where
        C: GracefulConnection,
        C::Error: std::fmt::Display,
    {
        let (peer, limits) = (self.peer, self.limits);
        let mut connection = std::pin::pin!(connection);
        tokio::select! {
            ended = connection.as_mut() => {
                if let Err(e) = ended {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
            }
            wait = clock.expired() => match wait {
                Wait::Headers => tracing::debug!(
                    %peer, "closing a connection whose request headers did not arrive within {:?}", limits.header_timeout
                ),
                Wait::Idle => tracing::debug!(
                    %peer, "closing a connection idle for {:?}", limits.idle_timeout
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
        // The permit goes back before the socket closes (with `connection`, after this), so a client
        // that sees this connection close and connects again finds it free.
        drop(self.permit);
    }
}

/// Aborts its task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
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
