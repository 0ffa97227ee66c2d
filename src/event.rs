//! Audit events: what the service layer builds (`PendingEvent`), what the chain seals (`SealedEvent`),
//! and the hashes that link them. Plain data below the store and the audit writer, which both use it.

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::domain::TraceId;

/// The canonical event types of the audit trail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventType {
    RequestStart,
    Decision,
    ExecutorSelected,
    StepExecuted,
    ActionExecuted,
    RequestEnd,
    PolicyLoaded,
    PolicyRejected,
    KeyCreated,
    KeyRevoked,
    ChainOpened,
    /// A bounded summary of a throttled address's refusals over one interval.
    RequestsThrottled,
    /// An executor switched off or on by an operator: who, why, the new state.
    ExecutorSwitched,
}

impl EventType {
    pub const ALL: [Self; 13] = [
        Self::RequestStart,
        Self::Decision,
        Self::ExecutorSelected,
        Self::StepExecuted,
        Self::ActionExecuted,
        Self::RequestEnd,
        Self::PolicyLoaded,
        Self::PolicyRejected,
        Self::KeyCreated,
        Self::KeyRevoked,
        Self::ChainOpened,
        Self::RequestsThrottled,
        Self::ExecutorSwitched,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::RequestStart => "REQUEST_START",
            Self::Decision => "DECISION",
            Self::ExecutorSelected => "EXECUTOR_SELECTED",
            Self::StepExecuted => "STEP_EXECUTED",
            Self::ActionExecuted => "ACTION_EXECUTED",
            Self::RequestEnd => "REQUEST_END",
            Self::PolicyLoaded => "POLICY_LOADED",
            Self::PolicyRejected => "POLICY_REJECTED",
            Self::KeyCreated => "KEY_CREATED",
            Self::KeyRevoked => "KEY_REVOKED",
            Self::ChainOpened => "CHAIN_OPENED",
            Self::RequestsThrottled => "REQUESTS_THROTTLED",
            Self::ExecutorSwitched => "EXECUTOR_SWITCHED",
        }
    }
}

/// `prev_hash` of the first event of the first chain of an instance.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Timestamps are UTC RFC 3339 with exactly six fractional digits, so text order is time order in
/// every store and in the files.
pub fn timestamp(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.microsecond()
    )
}

/// An event as the service layer makes it: id, time and content fixed, chain position not yet known.
///
/// Its type-specific fields are put in canonical form here, in the task that makes the event, one
/// `"key":value` member each: sealing (in the one writer task) then only merges them with the envelope's
/// members in canonical key order, hashes, and never walks the event's JSON again.
#[derive(Debug, Clone)]
pub struct PendingEvent {
    pub event_id: Uuid,
    pub event_type: EventType,
    pub trace_id: Option<TraceId>,
    pub occurred_at: OffsetDateTime,
    /// Type-specific fields; envelope names are dropped.
    fields: Map<String, Value>,
    /// `fields` as canonical members, or why they have no canonical form.
    members: Result<Vec<Member>, CanonicalError>,
}

/// One `"key":value` of a canonical object, with the key it sorts by.
#[derive(Debug, Clone)]
struct Member {
    key: String,
    text: String,
}

/// RFC 8785 orders an object's members by their keys' UTF-16 code units.
fn jcs_key_order(a: &str, b: &str) -> std::cmp::Ordering {
    a.encode_utf16().cmp(b.encode_utf16())
}

/// A string as RFC 8785 writes it. serde_json escapes exactly what RFC 8785 (ECMAScript's
/// `JSON.stringify`) escapes, in the same form (`\b \t \n \f \r \" \\`, other controls as lowercase
/// `\u00xx`, nothing else); `a_string_is_written_as_the_canonicalizer_writes_it` holds it to that.
fn jcs_string(text: &str) -> String {
    serde_json::to_string(text).unwrap_or_else(|_| unreachable!("a str always serialises"))
}

fn member(key: &str, value: &Value) -> Result<Member, CanonicalError> {
    let value = canonical_text(value)?;
    let mut text = jcs_string(key);
    text.push(':');
    text.push_str(&value);
    Ok(Member {
        key: key.to_owned(),
        text,
    })
}

impl PendingEvent {
    pub fn new(event_type: EventType, trace_id: Option<&TraceId>, fields: Value) -> Self {
        let mut fields = match fields {
            Value::Object(map) => map,
            Value::Null => Map::new(),
            other => {
                let mut m = Map::new();
                m.insert("data".to_owned(), other);
                m
            }
        };
        for name in ENVELOPE {
            if fields.remove(name).is_some() {
                tracing::error!(field = name, "event field shadows the envelope; dropped");
            }
        }
        let members = fields.iter().map(|(k, v)| member(k, v)).collect();
        Self {
            event_id: Uuid::now_v7(),
            event_type,
            trace_id: trace_id.cloned(),
            occurred_at: OffsetDateTime::now_utc(),
            fields,
            members,
        }
    }

    /// The type-specific fields.
    pub fn fields(&self) -> &Map<String, Value> {
        &self.fields
    }

    /// Adds `extra` fields to this event before it is written (its id and time kept): a door that
    /// learns what a request is about after it arrived (the MCP method) says so in its REQUEST_START.
    pub fn add_fields(&mut self, extra: Map<String, Value>) {
        for (name, value) in extra {
            if ENVELOPE.contains(&name.as_str()) {
                tracing::error!(field = %name, "event field shadows the envelope; dropped");
                continue;
            }
            self.fields.insert(name, value);
        }
        self.members = self.fields.iter().map(|(k, v)| member(k, v)).collect();
    }
}

/// An event with its place in a chain; `body` holds the exact bytes that were hashed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedEvent {
    pub chain_id: String,
    pub seq: i64,
    pub event_id: String,
    pub event_type: String,
    pub trace_id: Option<String>,
    pub occurred_at: String,
    pub instance_id: String,
    pub prev_hash: String,
    pub hash: String,
    /// RFC 8785 canonical JSON of the event without `hash`.
    pub body: String,
}

/// `hash = SHA-256(prev_hash ‖ body)`, hex.
pub fn chain_hash(prev_hash: &str, body: &str) -> String {
    let mut h = Sha256::new();
    h.update(prev_hash.as_bytes());
    h.update(body.as_bytes());
    let mut text = [0u8; 64];
    // A 32-byte digest always fills 64 hex digits, which are ASCII.
    match hex::encode_to_slice(h.finalize(), &mut text) {
        Ok(()) => text.iter().map(|&b| char::from(b)).collect(),
        Err(_) => unreachable!("32 bytes are 64 hex digits"),
    }
}

/// Envelope names; type-specific fields may not shadow them.
const ENVELOPE: [&str; 9] = [
    "event_id",
    "chain_id",
    "seq",
    "prev_hash",
    "hash",
    "event_type",
    "trace_id",
    "occurred_at",
    "instance_id",
];

/// Seals `pending` as event `seq` of `chain_id` after `prev_hash`: its canonical JSON (the envelope's
/// members merged with the prepared ones in key order) and the hash that links it.
pub fn seal(
    pending: PendingEvent,
    chain_id: &str,
    instance_id: &str,
    seq: i64,
    prev_hash: &str,
) -> Result<SealedEvent, CanonicalError> {
    let mut members = pending.members?;
    let event_id = pending.event_id.to_string();
    let occurred_at = timestamp(pending.occurred_at);
    let trace_id = pending.trace_id.map(|t| t.as_str().to_owned());
    let event_type = pending.event_type.as_str();
    let envelope = |key: &str, text: String| Member {
        key: key.to_owned(),
        text: format!("\"{key}\":{text}"),
    };
    members.extend([
        envelope("event_id", jcs_string(&event_id)),
        envelope("chain_id", jcs_string(chain_id)),
        envelope("seq", seq.to_string()),
        envelope("prev_hash", jcs_string(prev_hash)),
        envelope("event_type", jcs_string(event_type)),
        envelope(
            "trace_id",
            trace_id
                .as_deref()
                .map_or_else(|| "null".to_owned(), jcs_string),
        ),
        envelope("occurred_at", jcs_string(&occurred_at)),
        envelope("instance_id", jcs_string(instance_id)),
    ]);
    members.sort_unstable_by(|a, b| jcs_key_order(&a.key, &b.key));
    let mut body =
        String::with_capacity(members.iter().map(|m| m.text.len() + 1).sum::<usize>() + 2);
    body.push('{');
    for (i, m) in members.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str(&m.text);
    }
    body.push('}');
    let hash = chain_hash(prev_hash, &body);
    Ok(SealedEvent {
        chain_id: chain_id.to_owned(),
        seq,
        event_id,
        event_type: event_type.to_owned(),
        trace_id,
        occurred_at,
        instance_id: instance_id.to_owned(),
        prev_hash: prev_hash.to_owned(),
        hash,
        body,
    })
}

impl SealedEvent {
    /// An event read back from a store that keeps only its position, hash and hashed bytes: the other
    /// envelope fields are read from `body`. Bytes that are not an event's JSON leave them empty (a
    /// verifier then reports the damage; nothing here fails).
    pub fn from_stored(chain_id: String, seq: i64, hash: String, body: String) -> Self {
        let envelope: StoredEnvelope<'_> = serde_json::from_str(&body).unwrap_or_default();
        let text =
            |v: Option<std::borrow::Cow<'_, str>>| v.map(|c| c.into_owned()).unwrap_or_default();
        let event_id = text(envelope.event_id);
        let event_type = text(envelope.event_type);
        let trace_id = envelope.trace_id.map(|c| c.into_owned());
        let occurred_at = text(envelope.occurred_at);
        let instance_id = text(envelope.instance_id);
        let prev_hash = text(envelope.prev_hash);
        Self {
            chain_id,
            seq,
            event_id,
            event_type,
            trace_id,
            occurred_at,
            instance_id,
            prev_hash,
            hash,
            body,
        }
    }

    /// The JSON Lines form: the stored bytes with `"hash"` appended as the last member (no re-parsing on
    /// the hot path; a verifier drops `hash` and re-canonicalises, which gives back `body`).
    pub fn json_line(&self) -> String {
        let open = self.body.strip_suffix('}').unwrap_or(&self.body);
        format!("{open},\"hash\":\"{}\"}}\n", self.hash)
    }

    /// The event as a JSON object, `hash` included: the form of API answers.
    pub fn to_json(&self) -> Value {
        let mut v: Value = serde_json::from_str(&self.body).unwrap_or(Value::Null);
        if let Value::Object(map) = &mut v {
            map.insert("hash".into(), Value::String(self.hash.clone()));
        }
        v
    }
}

/// The envelope members of an event's body, borrowed where no unescaping is needed; the type-specific
/// members are skipped without being built.
#[derive(Default, serde::Deserialize)]
#[serde(default)]
struct StoredEnvelope<'a> {
    #[serde(borrow)]
    event_id: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    event_type: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    trace_id: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    occurred_at: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    instance_id: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    prev_hash: Option<std::borrow::Cow<'a, str>>,
}

/// Fewest items worth a second thread in [`map_in_two`].
const TWO_THREADS_FROM: usize = 512;

/// `items.iter().map(f)`, the second half on a helper thread when there are enough items: the per-event
/// work of reading and verifying long runs of the trail (parsing, hashing) on both cores, in order.
pub fn map_in_two<T: Sync, U: Send>(items: &[T], f: impl Fn(&T) -> U + Sync) -> Vec<U> {
    if items.len() < TWO_THREADS_FROM {
        return items.iter().map(&f).collect();
    }
    let (first, second) = items.split_at(items.len() / 2);
    std::thread::scope(|scope| {
        let helper = scope.spawn(|| second.iter().map(&f).collect::<Vec<_>>());
        let mut all: Vec<U> = first.iter().map(&f).collect();
        all.extend(
            helper
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
        );
        all
    })
}

/// A JSON value that has no RFC 8785 canonical form, so no digest can stand for it.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the value cannot be put in canonical JSON: {0}")]
pub struct CanonicalError(String);

/// A value's RFC 8785 canonical JSON: the one form in which values are hashed, so key order and
/// whitespace never change a hash.
pub fn canonical_json(value: &Value) -> Result<Vec<u8>, CanonicalError> {
    if written_alike(value) {
        // Nearly every event field: the same bytes at a fraction of the cost (the canonicalizer
        // re-sorts every object and formats every number through f64).
        return serde_json::to_vec(value).map_err(|e| CanonicalError(e.to_string()));
    }
    serde_json_canonicalizer::to_vec(value).map_err(|e| CanonicalError(e.to_string()))
}

/// Largest integer RFC 8785 writes as itself: it formats numbers as ECMAScript doubles, so past 2^53
/// an integer may come out rounded.
const EXACT_INTEGER: u64 = 1 << 53;

/// Whether serde_json writes `value` byte for byte as RFC 8785 does: strings are escaped alike (see
/// [`jcs_string`]); integers up to 2^53 in magnitude are plain digits in both; an object's members
/// come out of serde_json's map in byte order of their keys, which is RFC 8785's UTF-16 order when
/// the keys are ASCII. Other numbers (fractions, exponents, large integers) and other keys go through
/// the canonicalizer.
fn written_alike(value: &Value) -> bool {
    match value {
        Value::Null | Value::Bool(_) | Value::String(_) => true,
        Value::Number(n) => n
            .as_u64()
            .map(|u| u <= EXACT_INTEGER)
            .or_else(|| n.as_i64().map(|i| i.unsigned_abs() <= EXACT_INTEGER))
            .unwrap_or(false),
        Value::Array(items) => items.iter().all(written_alike),
        Value::Object(map) => map.iter().all(|(k, v)| k.is_ascii() && written_alike(v)),
    }
}

/// [`canonical_json`] as text (canonical JSON is UTF-8): the exact bytes an event's hash covers.
pub fn canonical_text(value: &Value) -> Result<String, CanonicalError> {
    String::from_utf8(canonical_json(value)?).map_err(|e| CanonicalError(e.to_string()))
}

/// Size and SHA-256 of a value's canonical JSON: what the trail keeps of payloads and results instead of
/// their text. A value without a canonical form is an error, never the digest of something else.
pub fn canonical_digest(value: &Value) -> Result<Value, CanonicalError> {
    let bytes = canonical_json(value)?;
    Ok(serde_json::json!({
        "size_bytes": bytes.len(),
        "sha256": hex::encode(Sha256::digest(&bytes)),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealing_hashes_the_stored_bytes_and_links_to_the_previous_hash() {
        let trace = TraceId::generate();
        let e = PendingEvent::new(
            EventType::Decision,
            Some(&trace),
            serde_json::json!({"effect": "deny", "b": 1, "a": [2, 1]}),
        );
        let s = seal(e, "c1", "i1", 7, GENESIS_HASH).unwrap();
        assert_eq!(s.hash, chain_hash(GENESIS_HASH, &s.body));
        assert!(
            s.body.starts_with("{\"a\":[2,1],\"b\":1,"),
            "keys are sorted: {}",
            s.body
        );
        let parsed: Value = serde_json::from_str(&s.body).unwrap();
        assert_eq!(parsed["seq"], 7);
        assert_eq!(parsed["trace_id"], trace.as_str());
        assert!(parsed.get("hash").is_none());
    }

    #[test]
    fn a_json_line_is_the_event_with_its_hash() {
        let e = PendingEvent::new(
            EventType::RequestEnd,
            None,
            serde_json::json!({"status": 200}),
        );
        let s = seal(e, "c", "i", 1, GENESIS_HASH).unwrap();
        let line = s.json_line();
        assert!(line.ends_with("}\n"));
        let parsed: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(parsed, s.to_json());
    }

    #[test]
    fn fields_cannot_forge_the_envelope() {
        let e = PendingEvent::new(
            EventType::RequestEnd,
            None,
            serde_json::json!({"seq": 99, "hash": "x"}),
        );
        let s = seal(e, "c", "i", 1, GENESIS_HASH).unwrap();
        let parsed: Value = serde_json::from_str(&s.body).unwrap();
        assert_eq!(parsed["seq"], 1);
    }

    /// The body sealing builds from prepared members is byte for byte the canonical JSON of the whole
    /// event, as the canonicalizer writes it (what `audit verify` recomputes).
    #[test]
    fn a_sealed_body_is_the_canonical_json_of_the_whole_event() {
        let trace = TraceId::generate();
        let cases = [
            serde_json::json!({}),
            serde_json::json!({"z": 1, "a": {"y": [3, {"b": null, "a": true}], "x": "é\u{1F600}\n\u{1}"},
                               "mid": -12, "éclair": "ü", "\u{10000}": 1, "\u{FFFF}": 2, "Z": 0.5, "f": 1e-7}),
            serde_json::json!({"payload": {"size_bytes": 41, "sha256": "ab"}, "gates": [{"gate": "auth", "us": 12}]}),
        ];
        for (i, fields) in cases.into_iter().enumerate() {
            let e = PendingEvent::new(EventType::Decision, Some(&trace), fields.clone());
            let (event_id, occurred_at) = (e.event_id.to_string(), timestamp(e.occurred_at));
            let chain = format!("inst\u{e9}-{i}.0190");
            let s = seal(e, &chain, "inst\u{e9}", 42, GENESIS_HASH).unwrap();
            let mut whole = fields.as_object().unwrap().clone();
            for (k, v) in [
                ("event_id", Value::from(event_id)),
                ("chain_id", Value::from(chain.clone())),
                ("seq", Value::from(42)),
                ("prev_hash", Value::from(GENESIS_HASH)),
                ("event_type", Value::from("DECISION")),
                ("trace_id", Value::from(trace.as_str())),
                ("occurred_at", Value::from(occurred_at)),
                ("instance_id", Value::from("inst\u{e9}")),
            ] {
                whole.insert(k.to_owned(), v);
            }
            assert_eq!(
                s.body,
                canonical_text(&Value::Object(whole)).unwrap(),
                "case {i}"
            );
        }
    }

    #[test]
    fn the_fast_path_writes_what_the_canonicalizer_writes_and_leaves_it_what_it_cannot() {
        let every_char: String = (0u32..0x3000).filter_map(char::from_u32).collect();
        let exact = EXACT_INTEGER;
        let alike = [
            serde_json::json!(null),
            serde_json::json!([
                true,
                false,
                0,
                -0,
                1,
                -1,
                exact,
                -(exact as i64),
                "",
                every_char
            ]),
            serde_json::json!({"b": {"z": [1, {"y": "\u{1F600}\u{2028}\"\\"}], "a": null}, "A": 2, "_": 3, "~": 4}),
            serde_json::json!({"payload": {"size_bytes": 12, "sha256": "ab"}, "gates": [{"gate": "auth", "duration_us": 17}]}),
        ];
        for v in &alike {
            assert!(written_alike(v), "{v}");
            assert_eq!(
                canonical_json(v).unwrap(),
                serde_json_canonicalizer::to_vec(v).unwrap(),
                "{v}"
            );
        }
        // Each of these would be written differently by serde_json: they take the canonicalizer.
        let different = [
            serde_json::json!(exact + 1),
            serde_json::json!(-(exact as i64) - 1),
            serde_json::json!(u64::MAX),
            serde_json::json!(1.5),
            serde_json::json!(1e21),
            serde_json::json!([1, 2.0]),
            serde_json::json!({"é": 1, "e": 2}),
            serde_json::json!({"\u{FB01}": 1, "\u{1F600}": 2}),
        ];
        for v in &different {
            assert!(!written_alike(v), "{v}");
            assert_eq!(
                canonical_json(v).unwrap(),
                serde_json_canonicalizer::to_vec(v).unwrap()
            );
        }
        assert_ne!(
            serde_json::to_vec(&different[0]).unwrap(),
            serde_json_canonicalizer::to_vec(&different[0]).unwrap(),
            "2^53 + 1 is where the two writers part"
        );
        assert_ne!(
            serde_json::to_vec(&different[7]).unwrap(),
            serde_json_canonicalizer::to_vec(&different[7]).unwrap(),
            "byte order and UTF-16 order part outside ASCII"
        );
    }

    #[test]
    fn a_string_is_written_as_the_canonicalizer_writes_it() {
        let mut every: String = (0u32..0x3000).filter_map(char::from_u32).collect();
        every.extend([
            '\u{2028}',
            '\u{2029}',
            '\u{FEFF}',
            '\u{FFFF}',
            '\u{10FFFF}',
            '\u{1F600}',
        ]);
        for c in every.chars() {
            let text = format!("a{c}b\"\\{c}");
            assert_eq!(
                jcs_string(&text),
                canonical_text(&Value::String(text.clone())).unwrap(),
                "U+{:04X}",
                c as u32
            );
        }
    }

    #[test]
    fn timestamps_sort_as_text() {
        let a = timestamp(time::macros::datetime!(2026-01-02 03:04:05.000007 UTC));
        assert_eq!(a, "2026-01-02T03:04:05.000007Z");
        let b = timestamp(time::macros::datetime!(2026-01-02 03:04:05.1 UTC));
        assert!(a < b);
    }
}
