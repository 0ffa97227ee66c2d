//! The request body under a deadline: every byte of it must arrive within the body timeout after the
//! headers, so a client that trickles (or stops sending) its body cannot hold a handler forever.
//!
//! A body its handler left unread (a refusal before the input gate, an unknown route) is handed back
//! when the handler drops it, so the server can read the small rest of it and keep the connection
//! alive instead of closing it after every such answer ([`drain`]).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use std::sync::Mutex;

use http_body_util::BodyExt as _;
use hyper::body::{Body, Bytes, Frame, Incoming, SizeHint};
use tokio::time::{Instant, Sleep};

/// Most bytes of an unread body read after the answer so that the connection can stay open: what one
/// or two TCP segments hold, usually in hand already. A longer rest is not worth reading for a request
/// that was refused; the connection is closed instead.
const DRAIN_MAX: u64 = 64 * 1024;
/// Longest wait for an unread body's rest (within the body's own deadline).
const DRAIN_WAIT: Duration = Duration::from_millis(500);

/// Where a handler's unread body comes back to the server.
pub(super) type Leftover = Arc<Mutex<Option<TimedBody>>>;

/// Any error a body may yield; the form axum's `Body::new` accepts.
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body did not arrive in time. The input gate finds it in a read error's source chain and
/// answers `INPUT_TIMEOUT` (408).
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the request body did not arrive within {} s", .0.as_secs_f64())]
pub struct BodyTimeout(pub Duration);

/// A request body that fails with [`BodyTimeout`] once its deadline passes before its end.
pub(super) struct TimedBody {
    /// Taken only when the body goes back to the server unread (on drop).
    inner: Option<Incoming>,
    deadline: Instant,
    limit: Duration,
    /// Made on the first wait only: most bodies (empty ones, small ones already buffered) never wait.
    sleep: Option<Pin<Box<Sleep>>>,
    /// Set once the body has been read to its end (or had none).
    finished: Arc<AtomicBool>,
    /// Where the body goes when dropped unread; `None` once there (or for the server's own reads).
    leftover: Option<Leftover>,
}

impl TimedBody {
    /// `limit` runs from now, which is when the headers have been read. `finished` tells the server
    /// whether the handler read the whole body.
    pub(super) fn new(
        inner: Incoming,
        limit: Duration,
        finished: Arc<AtomicBool>,
        leftover: Leftover,
    ) -> Self {
        finished.store(inner.is_end_stream(), Ordering::Release);
        Self {
            inner: Some(inner),
            deadline: super::clock::deadline(limit),
            limit,
            sleep: None,
            finished,
            leftover: Some(leftover),
        }
    }
}

impl Drop for TimedBody {
    fn drop(&mut self) {
        if self.finished.load(Ordering::Acquire) {
            return;
        }
        if let (Some(leftover), Some(inner)) = (self.leftover.take(), self.inner.take()) {
            let rest = Self {
                inner: Some(inner),
                deadline: self.deadline,
                limit: self.limit,
                sleep: None,
                finished: self.finished.clone(),
                leftover: None,
            };
            *leftover
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(rest);
        }
    }
}

/// Reads and discards what is left of an unread body (at most [`DRAIN_MAX`] bytes, announced by its
/// length, within [`DRAIN_WAIT`] and its own deadline); `true` when it reached its end, so that the
/// connection can take the next request.
pub(super) async fn drain(mut body: TimedBody) -> bool {
    if body
        .size_hint()
        .upper()
        .is_none_or(|upper| upper > DRAIN_MAX)
    {
        return false;
    }
    let read = async {
        let mut seen = 0u64;
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else { return false };
            seen += frame.data_ref().map_or(0, |d| d.len() as u64);
            if seen > DRAIN_MAX {
                return false;
            }
        }
        true
    };
    tokio::time::timeout(DRAIN_WAIT, read)
        .await
        .unwrap_or(false)
}

impl Body for TimedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        if let Poll::Ready(frame) = Pin::new(&mut *inner).poll_frame(cx) {
            if frame.is_none() || inner.is_end_stream() {
                this.finished.store(true, Ordering::Release);
            }
            return Poll::Ready(frame.map(|f| f.map_err(BoxError::from)));
        }
        let deadline = this.deadline;
        let sleep = this
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyTimeout(this.limit))))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Incoming::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Incoming::size_hint)
    }
}
