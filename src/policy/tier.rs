//! Rate-limit tiers: parsed once at policy load into a [`Tier`] that cannot be invalid, so the limiters
//! never re-check a quota.

use std::num::NonZeroU32;

use serde::Deserialize;

use super::{PolicyError, err};
use crate::domain::TierName;

/// A rate-limit tier as written in a policy file; checked into a [`Tier`] at load.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct TierFile {
    #[serde(default)]
    per_second: u32,
    #[serde(default)]
    burst: u32,
    #[serde(default)]
    unlimited: bool,
}

/// A rate-limit tier: a sustained rate with a burst, or unlimited (the gate still runs and is audited).
/// Made only by the policy load, so a limiter never meets a tier without a usable quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    Unlimited,
    Limited {
        per_second: NonZeroU32,
        burst: NonZeroU32,
    },
}

impl Tier {
    pub(super) fn parse(name: &TierName, file: &TierFile) -> Result<Self, PolicyError> {
        if file.unlimited {
            return Ok(Self::Unlimited);
        }
        match (
            NonZeroU32::new(file.per_second),
            NonZeroU32::new(file.burst),
        ) {
            (Some(per_second), Some(burst)) => Ok(Self::Limited { per_second, burst }),
            _ => err(format!(
                "tier {name}: set per_second and burst (both > 0), or unlimited = true"
            )),
        }
    }
}
