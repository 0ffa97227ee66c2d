//! Shared state a gateway keeps fresh by reading the store at a fixed interval (key rows, executor
//! switches), so changes made by any process reach every instance within a stated bound without a read
//! per request.

use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Notify;

use crate::store::StoreError;

/// Past this many intervals without a successful read, watched state is not trusted: requests read the
/// store themselves (and fail closed with it), so a stalled watcher cannot stretch the bound.
pub const STALE_AFTER_REFRESHES: u32 = 3;
/// How often watched state is read unless `key_refresh_ms` says otherwise.
pub use crate::config::DEFAULT_KEY_REFRESH as DEFAULT_REFRESH;

/// State read again from the store every interval.
#[async_trait]
pub trait Watched: Send + Sync + 'static {
    /// What is watched, for the log.
    const WHAT: &'static str;
    /// Reads the state once.
    async fn refresh(&self) -> Result<(), StoreError>;
}

/// Reads `watched` every `period`, and at once when `nudge` is notified (a change the store pushed),
/// until it is dropped; logs once when reads start failing and once when they recover.
pub fn spawn_watcher<T: Watched>(watched: &Arc<T>, period: Duration, nudge: Arc<Notify>) {
    let weak: Weak<T> = Arc::downgrade(watched);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = nudge.notified() => tick.reset(),
            }
            let Some(watched) = weak.upgrade() else {
                return;
            };
            let read =
                tokio::time::timeout(period * STALE_AFTER_REFRESHES, watched.refresh()).await;
            match read {
                Ok(Ok(())) => {
                    if failing {
                        tracing::info!(what = T::WHAT, "watched state readable again");
                    }
                    failing = false;
                }
                Ok(Err(e)) if !failing => {
                    failing = true;
                    tracing::warn!(what = T::WHAT, error = %e, "watched state unreadable: read per request until it is back");
                }
                Err(_) if !failing => {
                    failing = true;
                    tracing::warn!(
                        what = T::WHAT,
                        "watched state read timed out: read per request until it is back"
                    );
                }
                _ => {}
            }
        }
    });
}
