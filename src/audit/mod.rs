//! The audit trail: canonical events, the per-writer hash chain, the group-committing writer, and
//! reading it back (verify, timeline, export).

pub mod anchor;
pub mod anchored;
pub mod export;
mod files;
mod finding;
pub mod proof;
mod throttled;
pub mod timeline;
pub mod verify;
mod witness;
mod writer;

pub use crate::event::{
    CanonicalError, EventType, GENESIS_HASH, PendingEvent, SealedEvent, canonical_digest,
    canonical_json, chain_hash, seal, timestamp,
};
pub use throttled::ThrottledLedger;
pub use writer::{
    Appended, AuditError, AuditLog, CHECKPOINTS_FILE, Checkpointing, WriterOptions, WriterTask,
};
