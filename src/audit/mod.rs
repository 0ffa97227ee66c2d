//! The audit trail: canonical events, the per-writer hash chain, the group-committing writer, and
//! reading it back (verify, timeline, export).

mod event;
pub mod export;
pub mod timeline;
pub mod verify;
mod writer;

pub use event::{
    EventType, GENESIS_HASH, PendingEvent, SealedEvent, chain_hash, digest_of, seal, timestamp,
};
pub use writer::{AuditError, AuditLog, WriterOptions, WriterTask};
