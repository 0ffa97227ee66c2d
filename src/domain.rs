//! Domain newtypes: the only way into the core is through their `parse`, so a value that exists is valid.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Why a value was refused by a `parse`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ParseError(pub String);

/// Length in hex characters of a key id: 8 random bytes, enough to never collide in one deployment.
pub const KEY_ID_HEX_LEN: usize = 16;
/// Length in hex characters of a key secret: 32 random bytes (256 bits), beyond any online guessing.
pub const KEY_SECRET_HEX_LEN: usize = 64;
const KEY_PREFIX: &str = "ck_";

fn is_lower_hex(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The public half of an API key; safe to log, store and show.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct KeyId(String);

impl KeyId {
    /// Accepts exactly [`KEY_ID_HEX_LEN`] lowercase hex characters.
    pub fn parse(s: &str) -> Result<Self, ParseError> {
        if s.len() == KEY_ID_HEX_LEN && is_lower_hex(s) {
            Ok(Self(s.to_owned()))
        } else {
            Err(ParseError(format!(
                "a key id is {KEY_ID_HEX_LEN} lowercase hex characters, got {s:?}"
            )))
        }
    }

    /// A fresh random key id.
    pub fn generate() -> Result<Self, getrandom::Error> {
        let mut bytes = [0u8; KEY_ID_HEX_LEN / 2];
        getrandom::fill(&mut bytes)?;
        Ok(Self(hex::encode(bytes)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A full API key as presented by a client: `ck_<key_id>_<secret>`.
///
/// `Debug` and `Display` never show the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey {
    key_id: KeyId,
    secret: String,
}

impl ApiKey {
    pub fn parse(s: &str) -> Result<Self, ParseError> {
        let malformed = || ParseError("an API key looks like ck_<key_id>_<secret>".to_owned());
        let rest = s.strip_prefix(KEY_PREFIX).ok_or_else(malformed)?;
        let (id, secret) = rest.split_once('_').ok_or_else(malformed)?;
        let key_id = KeyId::parse(id).map_err(|_| malformed())?;
        if secret.len() != KEY_SECRET_HEX_LEN || !is_lower_hex(secret) {
            return Err(malformed());
        }
        Ok(Self {
            key_id,
            secret: secret.to_owned(),
        })
    }

    /// A fresh key with a random id and secret.
    pub fn generate() -> Result<Self, getrandom::Error> {
        let mut secret = [0u8; KEY_SECRET_HEX_LEN / 2];
        getrandom::fill(&mut secret)?;
        Ok(Self {
            key_id: KeyId::generate()?,
            secret: hex::encode(secret),
        })
    }

    pub fn key_id(&self) -> &KeyId {
        &self.key_id
    }

    /// The secret half; only the argon2 hasher and the one-time print of a new key may read it.
    pub fn secret(&self) -> &str {
        &self.secret
    }

    /// The full key text, to be shown exactly once when the key is created.
    pub fn expose(&self) -> String {
        format!("{KEY_PREFIX}{}_{}", self.key_id, self.secret)
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiKey({KEY_PREFIX}{}_<redacted>)", self.key_id)
    }
}

/// Names of actions, contexts, roles, tiers, executors and rules share one shape: a short identifier
/// that is safe as a metric label and a log field.
fn parse_name(kind: &str, s: &str) -> Result<String, ParseError> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.bytes().next().is_some_and(|b| b.is_ascii_lowercase())
        && s.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
        });
    if ok {
        Ok(s.to_owned())
    } else {
        Err(ParseError(format!(
            "{kind} {s:?} must start with a lowercase letter and hold only a-z, 0-9, '.', '_' or '-' (at most 64)"
        )))
    }
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            pub fn parse(s: &str) -> Result<Self, ParseError> {
                parse_name($kind, s).map(Self)
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::parse(&s).map_err(serde::de::Error::custom)
            }
        }
    };
}

name_type!(
    /// An action a client may ask for, e.g. `licitacoes.summarize`.
    ActionName,
    "action"
);
name_type!(
    /// A context (tenant, workspace) a request runs in, e.g. `work`.
    ContextId,
    "context"
);
name_type!(
    /// A role held by a key, e.g. `analyst`.
    RoleName,
    "role"
);
name_type!(
    /// A rate-limit tier, e.g. `standard`.
    TierName,
    "tier"
);

/// The id that ties together every event and response of one request.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct TraceId(String);

impl TraceId {
    /// Longest client-supplied trace id accepted; W3C ids are 32, UUIDs 36.
    const MAX_LEN: usize = 64;
    /// Shortest accepted, so that a trace id keeps enough entropy to be unique.
    const MIN_LEN: usize = 8;

    /// A client-supplied `X-Trace-Id`: 8 to 64 characters of `[A-Za-z0-9._-]`, not all zeros.
    pub fn parse(s: &str) -> Result<Self, ParseError> {
        let ok = (Self::MIN_LEN..=Self::MAX_LEN).contains(&s.len())
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
            && !s.bytes().all(|b| matches!(b, b'0' | b'-'));
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(ParseError(format!("malformed trace id {s:?}")))
        }
    }

    /// The trace id inside a W3C `traceparent` header (`00-<32 hex>-<16 hex>-<2 hex>`).
    pub fn from_traceparent(header: &str) -> Result<Self, ParseError> {
        let bad = || ParseError(format!("malformed traceparent {header:?}"));
        let mut parts = header.trim().split('-');
        let (Some(version), Some(trace), Some(span), Some(flags), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(bad());
        };
        let hex_of = |s: &str, n: usize| s.len() == n && is_lower_hex(s);
        if !hex_of(version, 2)
            || version == "ff"
            || !hex_of(trace, 32)
            || !hex_of(span, 16)
            || !hex_of(flags, 2)
            || trace.bytes().all(|b| b == b'0')
            || span.bytes().all(|b| b == b'0')
        {
            return Err(bad());
        }
        Ok(Self(trace.to_owned()))
    }

    /// A new trace id: a UUIDv7 in 32 hex characters, so ids sort by time and fit W3C trace context.
    pub fn generate() -> Self {
        Self(uuid::Uuid::now_v7().simple().to_string())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_key_round_trips_and_hides_its_secret() {
        let key = ApiKey::generate().unwrap();
        let text = key.expose();
        let parsed = ApiKey::parse(&text).unwrap();
        assert_eq!(parsed, key);
        assert!(!format!("{parsed:?}").contains(parsed.secret()));
    }

    #[test]
    fn api_key_rejects_wrong_shapes() {
        let secret = "a".repeat(KEY_SECRET_HEX_LEN);
        for bad in [
            String::new(),
            "ck_".to_owned(),
            format!("ck_0123456789abcdef{secret}"),
            format!("ck_0123456789ABCDEF_{secret}"),
            format!("ck_0123456789abcde_{secret}"),
            format!("xk_0123456789abcdef_{secret}"),
            format!("ck_0123456789abcdef_{}", &secret[1..]),
            format!("ck_0123456789abcdef_{secret}_"),
        ] {
            assert!(ApiKey::parse(&bad).is_err(), "accepted {bad:?}");
        }
        assert!(ApiKey::parse(&format!("ck_0123456789abcdef_{secret}")).is_ok());
    }

    #[test]
    fn names_accept_identifiers_and_refuse_labels_that_could_explode() {
        assert!(ActionName::parse("licitacoes.summarize").is_ok());
        assert!(ContextId::parse("work").is_ok());
        for bad in ["", "Work", "1abc", "a b", "a/b", &"a".repeat(65)] {
            assert!(ActionName::parse(bad).is_err(), "accepted {bad:?}");
        }
    }

    #[test]
    fn trace_id_comes_from_a_valid_traceparent_only() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(
            TraceId::from_traceparent(tp).unwrap().as_str(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "garbage",
        ] {
            assert!(TraceId::from_traceparent(bad).is_err(), "accepted {bad:?}");
        }
    }

    #[test]
    fn client_trace_ids_are_bounded_and_plain() {
        assert!(TraceId::parse("req-2026-11-22-abc").is_ok());
        for bad in [
            "short",
            "has space inside",
            "00000000",
            &"x".repeat(65),
            "a\nbcdefghi",
        ] {
            assert!(TraceId::parse(bad).is_err(), "accepted {bad:?}");
        }
        assert_eq!(TraceId::generate().as_str().len(), 32);
    }
}
