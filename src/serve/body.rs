//! The request body under a deadline: every byte of it must arrive within the body timeout after the
//! headers, so a client that trickles (or stops sending) its body cannot hold a handler forever.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::{Body, Bytes, Frame, Incoming, SizeHint};
use tokio::time::{Instant, Sleep};

/// Any error a body may yield; the form axum's `Body::new` accepts.
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body did not arrive in time. The input gate finds it in a read error's source chain and
/// answers `INPUT_TIMEOUT` (408).
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the request body did not arrive within {} s", .0.as_secs_f64())]
pub struct BodyTimeout(pub Duration);

/// A request body that fails with [`BodyTimeout`] once its deadline passes before its end.
pub(super) struct TimedBody {
    inner: Incoming,
    deadline: Instant,
    limit: Duration,
    /// Made on the first wait only: most bodies (empty ones, small ones already buffered) never wait.
    sleep: Option<Pin<Box<Sleep>>>,
    /// Set once the body has been read to its end (or had none).
    finished: Arc<AtomicBool>,
}

impl TimedBody {
    /// `limit` runs from now, which is when the headers have been read. `finished` tells the server
    /// whether the handler read the whole body.
    pub(super) fn new(inner: Incoming, limit: Duration, finished: Arc<AtomicBool>) -> Self {
        finished.store(inner.is_end_stream(), Ordering::Release);
        Self {
            inner,
            deadline: super::clock::deadline(limit),
            limit,
            sleep: None,
            finished,
        }
    }
}

impl Body for TimedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            if frame.is_none() || this.inner.is_end_stream() {
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
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
