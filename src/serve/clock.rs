//! A connection's clock: which wait it is in (for its headers, for its next request) and when that
//! wait runs out. Hyper's own header timer also runs while a kept-alive connection waits for its next
//! request, so it cannot give the idle wait a limit of its own; this clock gives each its own.
//!
//! The phases: from the connection's start, and from the first byte after an idle spell, the client
//! has the header timeout to finish a request's headers; while requests are in flight nothing runs out
//! here (the body has its own deadline, the handler its own timeouts); once the last response has
//! been sent, the idle timeout runs until the next request's first byte.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// `after` from now; a limit too large to add (a configured billion seconds) is "never" instead of a
/// panic.
pub(super) fn deadline(after: Duration) -> Instant {
    // Thirty years: what tokio itself takes for "never".
    const NEVER: Duration = Duration::from_secs(86_400 * 365 * 30);
    Instant::now() + after.min(NEVER)
}

/// What a connection without a request in flight is waiting for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Wait {
    /// The rest of a request's headers (or, on a new connection, its first byte).
    Headers,
    /// The next request on a kept-alive connection.
    Idle,
}

#[derive(Debug, Clone, Copy)]
struct Phase {
    in_flight: usize,
    wait: Wait,
    /// `None` while a request is in flight.
    deadline: Option<Instant>,
}

/// One connection's clock, shared by its socket, its requests and its watchdog.
///
/// Nothing is notified when the phase changes (that would wake the watchdog and re-arm a timer two or
/// three times per request, a sixth of `/health`'s throughput): the watchdog looks at the phase when
/// its sleep ends, and sleeps at most a header timeout at a time. A deadline only ever moves earlier
/// when the first byte after an idle spell starts a header wait, due a header timeout after that byte,
/// which is never before the watchdog looks again.
#[derive(Clone)]
pub(super) struct Clock {
    phase: Arc<Mutex<Phase>>,
    header_timeout: Duration,
    idle_timeout: Duration,
}

impl Clock {
    /// A clock for a connection accepted now: its headers are due within `header_timeout`.
    pub(super) fn start(header_timeout: Duration, idle_timeout: Duration) -> Self {
        let phase = Phase {
            in_flight: 0,
            wait: Wait::Headers,
            deadline: Some(deadline(header_timeout)),
        };
        Self {
            phase: Arc::new(Mutex::new(phase)),
            header_timeout,
            idle_timeout,
        }
    }

    fn with<R>(&self, change: impl FnOnce(&mut Phase) -> R) -> R {
        let mut phase = match self.phase.lock() {
            Ok(p) => p,
            Err(poisoned) => poisoned.into_inner(),
        };
        change(&mut phase)
    }

    /// Bytes arrived: after an idle spell they start a request, whose headers are now due.
    fn bytes_arrived(&self) {
        self.with(|p| {
            if p.in_flight == 0 && p.wait == Wait::Idle {
                p.wait = Wait::Headers;
                p.deadline = Some(deadline(self.header_timeout));
            }
        });
    }

    /// A request's headers are in: nothing runs out until its response has been sent.
    pub(super) fn request_started(&self) -> InFlight {
        self.with(|p| {
            p.in_flight += 1;
            p.deadline = None;
        });
        InFlight(self.clone())
    }

    /// Whether a request is being handled or answered now.
    pub(super) fn is_busy(&self) -> bool {
        self.with(|p| p.in_flight > 0)
    }

    /// Resolves when the current wait runs out, with the wait that did.
    pub(super) async fn expired(&self) -> Wait {
        loop {
            let (wait, due) = self.with(|p| (p.wait, p.deadline));
            if due.is_some_and(|d| d <= Instant::now()) {
                return wait;
            }
            let look_again = deadline(self.header_timeout);
            tokio::time::sleep_until(due.map_or(look_again, |d| d.min(look_again))).await;
        }
    }
}

/// A request in flight; dropped when its response has been sent (or abandoned), which starts the idle
/// wait once no other request is in flight.
pub(super) struct InFlight(Clock);

impl Drop for InFlight {
    fn drop(&mut self) {
        let idle_timeout = self.0.idle_timeout;
        self.0.with(|p| {
            p.in_flight = p.in_flight.saturating_sub(1);
            if p.in_flight == 0 {
                p.wait = Wait::Idle;
                p.deadline = Some(deadline(idle_timeout));
            }
        });
    }
}

/// The accepted socket, telling its clock when bytes arrive.
pub(super) struct Watched {
    stream: TcpStream,
    clock: Clock,
}

impl Watched {
    pub(super) fn new(stream: TcpStream, clock: Clock) -> Self {
        Self { stream, clock }
    }
}

impl AsyncRead for Watched {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let read = Pin::new(&mut this.stream).poll_read(cx, buf);
        if matches!(read, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.clock.bytes_arrived();
        }
        read
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADERS: Duration = Duration::from_millis(100);
    // Far apart, so a loaded machine cannot mistake one wait for the other.
    const IDLE: Duration = Duration::from_secs(2);

    #[tokio::test]
    async fn a_new_connection_has_the_header_timeout() {
        let started = Instant::now();
        let clock = Clock::start(HEADERS, IDLE);
        assert_eq!(clock.expired().await, Wait::Headers);
        let waited = started.elapsed();
        assert!(waited >= HEADERS && waited < IDLE, "{waited:?}");
    }

    #[tokio::test]
    async fn nothing_runs_out_while_a_request_is_in_flight_and_idle_follows_its_answer() {
        let clock = Clock::start(HEADERS, IDLE);
        let request = clock.request_started();
        let watch = tokio::spawn({
            let clock = clock.clone();
            async move { (clock.expired().await, Instant::now()) }
        });
        tokio::time::sleep(HEADERS * 5).await;
        assert!(clock.is_busy());
        assert!(!watch.is_finished(), "a wait ran out during a request");
        let answered = Instant::now();
        drop(request);
        let (wait, at) = watch.await.unwrap();
        assert_eq!(wait, Wait::Idle);
        assert!(at - answered >= IDLE, "{:?}", at - answered);
        assert!(!clock.is_busy());
    }

    #[tokio::test]
    async fn the_first_byte_after_idle_starts_the_header_timeout() {
        let clock = Clock::start(HEADERS, IDLE);
        drop(clock.request_started());
        let byte = Instant::now();
        clock.bytes_arrived();
        assert_eq!(clock.expired().await, Wait::Headers);
        let waited = byte.elapsed();
        assert!(waited >= HEADERS && waited < IDLE, "{waited:?}");
    }
}
