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
    /// Whether this tier allows no more than `other`: unlimited only within unlimited; otherwise
    /// neither the rate nor the burst higher.
    pub fn within(&self, other: &Self) -> bool {
        match (self, other) {
            (_, Self::Unlimited) => true,
            (Self::Unlimited, Self::Limited { .. }) => false,
            (
                Self::Limited { per_second, burst },
                Self::Limited {
                    per_second: their_rate,
                    burst: their_burst,
                },
            ) => per_second <= their_rate && burst <= their_burst,
        }
    }

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

#[cfg(test)]
mod tests {
    use super::*;

    fn limited(per_second: u32, burst: u32) -> Tier {
        Tier::Limited {
            per_second: NonZeroU32::new(per_second).unwrap(),
            burst: NonZeroU32::new(burst).unwrap(),
        }
    }

    #[test]
    fn a_tier_is_within_another_when_it_allows_no_more() {
        assert!(limited(5, 10).within(&limited(5, 10)));
        assert!(limited(5, 10).within(&limited(50, 100)));
        assert!(limited(5, 10).within(&Tier::Unlimited));
        assert!(Tier::Unlimited.within(&Tier::Unlimited));
        assert!(!Tier::Unlimited.within(&limited(50, 100)));
        // Neither the rate nor the burst may be higher.
        assert!(!limited(6, 10).within(&limited(5, 10)));
        assert!(!limited(5, 11).within(&limited(5, 10)));
    }
}
