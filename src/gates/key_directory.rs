//! The key rows G1 reads, cached in memory so an allowed request reads no row, and kept fresh by watching
//! the store's key revision: a counter that every change to the keys table moves (a trigger), whichever
//! process made the change (this gateway, another instance, the CLI).
//!
//! The bound: a change committed at time t is seen by every instance before t + `refresh` + one revision
//! read (100 ms by default). Rows are tagged with the generation they were read under and a change
//! starts a new generation, so a row read just before a revocation is never used after it is seen. When
//! the revision cannot be read (the store is down or slow) for [`STALE_AFTER_REFRESHES`] refreshes
//! (300 ms by default), the cache is not trusted: every request reads its row again, and fails closed if the store
//! does, so a broken watcher cannot stretch the bound.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use dashmap::DashMap;

use crate::domain::KeyId;
use crate::store::{KeyRecord, Store, StoreError};
use crate::watch::Watched;
pub use crate::watch::{DEFAULT_REFRESH, STALE_AFTER_REFRESHES};

/// Rows kept at most; past it the cache starts over (keys in use are read back one by one).
const MAX_CACHED_KEYS: usize = 50_000;

struct Cached {
    record: Arc<KeyRecord>,
    generation: u64,
}

/// Key rows by key id, fresh within the stated bound.
pub struct KeyDirectory {
    store: Arc<dyn Store>,
    entries: DashMap<KeyId, Cached>,
    refresh: Duration,
    watch: Mutex<Watch>,
}

/// What the watcher last saw. Read and written under one lock, so a request never pairs a fresh
/// confirmation with the generation before it.
#[derive(Clone, Copy)]
struct Watch {
    /// The last revision read, and when that read started; `None` until the first read succeeds.
    seen: Option<(i64, Instant)>,
    /// Moves with every revision change; rows read under an older one are not used.
    generation: u64,
}

impl KeyDirectory {
    pub fn new(store: Arc<dyn Store>, refresh: Duration) -> Self {
        Self {
            store,
            entries: DashMap::new(),
            refresh,
            watch: Mutex::new(Watch {
                seen: None,
                generation: 0,
            }),
        }
    }

    /// The longest a committed key change can go unnoticed by this instance.
    pub fn bound(&self) -> Duration {
        self.refresh * STALE_AFTER_REFRESHES
    }

    fn watch(&self) -> Watch {
        *self
            .watch
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The row of `key_id`, from memory when the cache is trusted, else from the store.
    pub async fn get(&self, key_id: &KeyId) -> Result<Option<Arc<KeyRecord>>, StoreError> {
        let watch = self.watch();
        let generation = watch.generation;
        let trusted = watch
            .seen
            .is_some_and(|(_, at)| at.elapsed() < self.bound());
        if trusted
            && let Some(hit) = self.entries.get(key_id)
            && hit.generation == generation
        {
            return Ok(Some(hit.record.clone()));
        }
        let Some(record) = self.store.get_key(key_id).await? else {
            // Unknown ids are not remembered: a stranger's guesses must not fill memory.
            return Ok(None);
        };
        let record = Arc::new(record);
        if self.entries.len() >= MAX_CACHED_KEYS {
            self.entries.clear();
        }
        self.entries.insert(
            key_id.clone(),
            Cached {
                record: record.clone(),
                generation,
            },
        );
        Ok(Some(record))
    }

    /// Reads the revision once; a change starts a new generation (every cached row is read again).
    pub async fn refresh(&self) -> Result<(), StoreError> {
        // Stamped with when the read started: a read that began before a change may not see it.
        let asked = Instant::now();
        let revision = self.store.key_revision().await?;
        let changed = {
            let mut watch = self
                .watch
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            // The first read starts a generation too: rows read before it were never confirmed.
            let changed = watch.seen.is_none_or(|(last, _)| last != revision);
            if changed {
                watch.generation += 1;
            }
            watch.seen = Some((revision, asked));
            changed
        };
        if changed {
            self.entries.clear();
        }
        Ok(())
    }
}

#[async_trait]
impl Watched for KeyDirectory {
    const WHAT: &'static str = "key revision";
    async fn refresh(&self) -> Result<(), StoreError> {
        KeyDirectory::refresh(self).await
    }
}
