//! What a verification reports: the first damage found, its kind and where.

/// Kinds of damage, each with its own exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Problem {
    /// An event's bytes do not hash to its stored hash, or its columns disagree with its bytes.
    HashMismatch,
    /// Events are missing inside a chain.
    Gap,
    /// Events are stored out of order.
    Reorder,
    /// A chain lost its head or its tail (a later chain, or a signed checkpoint, says it was longer).
    Truncation,
    /// An event does not link to the one before it, or a chain does not link to its predecessor.
    BrokenLink,
    /// The database and the JSON Lines files disagree: an event missing from one, or different.
    FilesDiffer,
    /// A chain's events do not hash to the root of its signed checkpoint: it was rewritten.
    CheckpointMismatch,
    /// A checkpoint does not open with the public key: forged, altered or signed by another key.
    BadCheckpoint,
    /// A checkpoint kept outside the database is not in it: deleted, or the database rolled back.
    MissingCheckpoint,
    /// Events follow a chain's closing checkpoint: appended after its writer stopped.
    Unanchored,
}

impl Problem {
    pub fn exit_code(self) -> u8 {
        match self {
            Self::HashMismatch => 3,
            Self::Gap => 4,
            Self::Reorder => 5,
            Self::Truncation => 6,
            Self::BrokenLink => 7,
            Self::FilesDiffer => 8,
            Self::CheckpointMismatch => 9,
            Self::BadCheckpoint => 10,
            Self::MissingCheckpoint => 11,
            Self::Unanchored => 12,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::HashMismatch => "hash mismatch",
            Self::Gap => "gap",
            Self::Reorder => "reordering",
            Self::Truncation => "truncation",
            Self::BrokenLink => "broken link",
            Self::FilesDiffer => "database and files differ",
            Self::CheckpointMismatch => "checkpoint mismatch",
            Self::BadCheckpoint => "bad checkpoint",
            Self::MissingCheckpoint => "missing checkpoint",
            Self::Unanchored => "events after the closing checkpoint",
        }
    }
}

/// The first damage found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub problem: Problem,
    pub chain_id: String,
    pub seq: i64,
    pub message: String,
}

/// A finding of `problem` at `(chain_id, seq)`.
pub(super) fn finding(
    problem: Problem,
    chain_id: &str,
    seq: i64,
    message: impl Into<String>,
) -> Finding {
    Finding {
        problem,
        chain_id: chain_id.to_owned(),
        seq,
        message: message.into(),
    }
}
