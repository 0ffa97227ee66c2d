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
///
/// Every event takes one or more (a request's events, its decision, the writer's checkpoints), so the
/// digits are written in place rather than through the formatting machinery, which cost several times
/// more; a year outside 0 to 9999 (never the clock's) takes the general path.
pub fn timestamp(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    let Some(year) = u32::try_from(t.year()).ok().filter(|y| *y <= 9999) else {
        return timestamp_formatted(t);
    };
    let mut text = *b"0000-00-00T00:00:00.000000Z";
    for (at, width, mut n) in [
        (0, 4, year),
        (5, 2, u32::from(u8::from(t.month()))),
        (8, 2, u32::from(t.day())),
        (11, 2, u32::from(t.hour())),
        (14, 2, u32::from(t.minute())),
        (17, 2, u32::from(t.second())),
        (20, 6, t.microsecond()),
    ] {
        for digit in text[at..at + width].iter_mut().rev() {
            *digit = b'0' + (n % 10) as u8;
            n /= 10;
        }
    }
    String::from_utf8(text.to_vec()).unwrap_or_else(|_| timestamp_formatted(t))
}

/// [`timestamp`] through `format!`: any year `time` holds.
fn timestamp_formatted(t: OffsetDateTime) -> String {
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

/// Microseconds since the Unix epoch of a trail timestamp (`YYYY-MM-DDTHH:MM:SS.ffffffZ`, or any RFC
/// 3339 time): the time as the SQLite trail indexes it. `None` for text that is not a time.
pub fn micros_of(text: &str) -> Option<i64> {
    if let Some(micros) = micros_of_trail_form(text.as_bytes()) {
        return Some(micros);
    }
    let t = OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).ok()?;
    i64::try_from(t.unix_timestamp_nanos() / 1_000).ok()
}

/// [`micros_of`] for the form [`timestamp`] writes, read by position (the writer converts every event's
/// time as it inserts it; a general RFC 3339 parse costs ten times more).
fn micros_of_trail_form(b: &[u8]) -> Option<i64> {
    let shape = b.len() == 27
        && [
            (4, b'-'),
            (7, b'-'),
            (10, b'T'),
            (13, b':'),
            (16, b':'),
            (19, b'.'),
            (26, b'Z'),
        ]
        .iter()
        .all(|&(at, c)| b[at] == c);
    if !shape {
        return None;
    }
    let number = |from: usize, to: usize| -> Option<u32> {
        b[from..to].iter().try_fold(0u32, |n, &d| {
            d.is_ascii_digit().then(|| n * 10 + u32::from(d - b'0'))
        })
    };
    let year = i32::try_from(number(0, 4)?).ok()?;
    let month = time::Month::try_from(u8::try_from(number(5, 7)?).ok()?).ok()?;
    let date =
        time::Date::from_calendar_date(year, month, u8::try_from(number(8, 10)?).ok()?).ok()?;
    let clock = time::Time::from_hms(
        u8::try_from(number(11, 13)?).ok()?,
        u8::try_from(number(14, 16)?).ok()?,
        u8::try_from(number(17, 19)?).ok()?,
    )
    .ok()?;
    let seconds = time::PrimitiveDateTime::new(date, clock)
        .assume_utc()
        .unix_timestamp();
    Some(seconds * 1_000_000 + i64::from(number(20, 26)?))
}

/// The trail timestamp of `micros` since the Unix epoch (the inverse of [`micros_of`]).
pub fn timestamp_of_micros(micros: i64) -> Option<String> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(micros) * 1_000)
        .ok()
        .map(timestamp)
}

/// An event as the service layer makes it: id, time and content fixed, chain position not yet known.
///
/// Its type-specific fields are put in canonical form here, in the task that makes the event: their
/// `"key":value` members in canonical order, and where each envelope member goes between them. The
/// audit log then writes the envelope around them ([`PendingEvent::prepare`], still in the caller's
/// task), so that sealing, in the one writer thread, only places the chain position and hashes.
#[derive(Debug, Clone)]
pub struct PendingEvent {
    pub event_id: Uuid,
    pub event_type: EventType,
    pub trace_id: Option<TraceId>,
    pub occurred_at: OffsetDateTime,
    /// Type-specific fields as given (envelope names dropped); `None` when a [`Fields`] builder wrote
    /// them straight into `members`.
    fields: Option<Map<String, Value>>,
    /// The fields as canonical members, or why they have no canonical form.
    members: Result<Members, CanonicalError>,
}

/// The type-specific fields in canonical form.
#[derive(Debug, Clone)]
struct Members {
    /// Each field's `"key":value`, in RFC 8785 key order, each followed by a comma.
    text: String,
    /// For each of [`ENVELOPE_ORDER`], the offset in `text` before which its member goes.
    slots: [usize; ENVELOPE_ORDER.len()],
}

/// The envelope members placed around the fields, in RFC 8785 order (ASCII keys: byte order). `hash`
/// is not among them: it is computed over the rest.
const ENVELOPE_ORDER: [&str; 8] = [
    "chain_id",
    "event_id",
    "event_type",
    "instance_id",
    "occurred_at",
    "prev_hash",
    "seq",
    "trace_id",
];

/// RFC 8785 orders an object's members by their keys' UTF-16 code units.
fn jcs_key_order(a: &str, b: &str) -> std::cmp::Ordering {
    if a.is_ascii() && b.is_ascii() {
        // One UTF-16 unit per byte: the same order, without transcoding.
        return a.cmp(b);
    }
    a.encode_utf16().cmp(b.encode_utf16())
}

/// A string as RFC 8785 writes it (see [`push_jcs_string`]).
#[cfg(test)]
fn jcs_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    push_jcs_string(&mut out, text);
    out
}

/// Appends `text` as RFC 8785 writes a string. serde_json escapes exactly what RFC 8785 (ECMAScript's
/// `JSON.stringify`) escapes, in the same form (`\b \t \n \f \r \" \\`, other controls as lowercase
/// `\u00xx`, nothing else); `a_string_is_written_as_the_canonicalizer_writes_it` holds it to that.
fn push_jcs_string(out: &mut String, text: &str) {
    if !text.bytes().any(|b| b < 0x20 || b == b'"' || b == b'\\') {
        // Nearly every string of the trail (ids, names, hashes): nothing to escape.
        out.push('"');
        out.push_str(text);
        out.push('"');
        return;
    }
    match serde_json::to_string(text) {
        Ok(escaped) => out.push_str(&escaped),
        Err(_) => unreachable!("a str always serialises"),
    }
}

/// `fields` in canonical form: each member written once, in key order, with the envelope's places
/// among them.
fn members(fields: &Map<String, Value>) -> Result<Members, CanonicalError> {
    let mut order: Vec<(&String, &Value)> = fields.iter().collect();
    // serde_json's map iterates in byte order of the keys (RFC 8785's order for ASCII keys); sorted
    // again only when that does not hold.
    if !order.is_sorted_by(|a, b| jcs_key_order(a.0, b.0).is_lt()) {
        order.sort_by(|a, b| jcs_key_order(a.0, b.0));
    }
    let mut text: Vec<u8> = Vec::with_capacity(64 * order.len());
    let mut slots = [0; ENVELOPE_ORDER.len()];
    let mut next = 0;
    for (key, value) in order {
        while next < ENVELOPE_ORDER.len() && jcs_key_order(ENVELOPE_ORDER[next], key).is_lt() {
            slots[next] = text.len();
            next += 1;
        }
        let mut name = String::with_capacity(key.len() + 2);
        push_jcs_string(&mut name, key);
        text.extend_from_slice(name.as_bytes());
        text.push(b':');
        write_canonical(&mut text, value)?;
        text.push(b',');
    }
    for slot in &mut slots[next..] {
        *slot = text.len();
    }
    let text = String::from_utf8(text).map_err(|e| CanonicalError(e.to_string()))?;
    Ok(Members { text, slots })
}

/// An event's type-specific fields written straight into canonical form, for the events every request
/// makes: no `Value` tree is built, sorted and walked again. Members are added in RFC 8785 key order
/// (the order their keys sort in as bytes; all keys here are ASCII), which debug builds check and the
/// tests hold against the canonicalizer; values are written as RFC 8785 writes them.
#[derive(Debug, Clone, Default)]
pub struct Fields {
    text: String,
    slots: [usize; ENVELOPE_ORDER.len()],
    /// Envelope members already placed.
    placed: usize,
    last_key: &'static str,
}

impl Fields {
    pub fn new() -> Self {
        Self {
            text: String::with_capacity(512),
            ..Self::default()
        }
    }

    /// Starts the member `key`: the envelope's members that sort before it go before it.
    fn key(&mut self, key: &'static str) {
        debug_assert!(
            self.last_key < key,
            "fields out of order: {key} after {}",
            self.last_key
        );
        debug_assert!(!ENVELOPE.contains(&key), "field {key} shadows the envelope");
        self.last_key = key;
        while self.placed < ENVELOPE_ORDER.len() && ENVELOPE_ORDER[self.placed] < key {
            self.slots[self.placed] = self.text.len();
            self.placed += 1;
        }
        self.text.push('"');
        self.text.push_str(key);
        self.text.push_str("\":");
    }

    /// A string member.
    pub fn str(mut self, key: &'static str, value: &str) -> Self {
        self.key(key);
        push_jcs_string(&mut self.text, value);
        self.text.push(',');
        self
    }

    /// A string member, `null` when absent.
    pub fn opt_str(self, key: &'static str, value: Option<&str>) -> Self {
        match value {
            Some(v) => self.str(key, v),
            None => self.raw(key, "null"),
        }
    }

    /// A whole-number member.
    pub fn uint(mut self, key: &'static str, value: u64) -> Self {
        if value > EXACT_INTEGER {
            // RFC 8785 writes numbers as doubles: past 2^53 the canonicalizer decides.
            return self.value(key, &Value::from(value));
        }
        self.key(key);
        push_u64(&mut self.text, value);
        self.text.push(',');
        self
    }

    /// A whole-number member, `null` when absent.
    pub fn opt_uint(self, key: &'static str, value: Option<u64>) -> Self {
        match value {
            Some(v) => self.uint(key, v),
            None => self.raw(key, "null"),
        }
    }

    /// An array of strings.
    pub fn strs<'a>(
        mut self,
        key: &'static str,
        values: impl IntoIterator<Item = &'a str>,
    ) -> Self {
        self.key(key);
        push_jcs_strings(&mut self.text, values);
        self.text.push(',');
        self
    }

    /// Any JSON value, put in canonical form (`null` when absent).
    pub fn value(mut self, key: &'static str, value: &Value) -> Self {
        let mut bytes = Vec::with_capacity(64);
        match write_canonical(&mut bytes, value).map(|()| String::from_utf8(bytes)) {
            Ok(Ok(text)) => {
                self.key(key);
                self.text.push_str(&text);
                self.text.push(',');
                self
            }
            // A value without a canonical form cannot be hashed; the event says so instead.
            _ => self.str(key, "(no canonical form)"),
        }
    }

    /// [`Fields::value`] of an optional value.
    pub fn opt_value(self, key: &'static str, value: Option<&Value>) -> Self {
        match value {
            Some(v) => self.value(key, v),
            None => self.raw(key, "null"),
        }
    }

    /// A member whose value is canonical JSON already (built with [`Canonical`]).
    pub fn raw(mut self, key: &'static str, canonical: &str) -> Self {
        self.key(key);
        self.text.push_str(canonical);
        self.text.push(',');
        self
    }

    fn into_members(mut self) -> Members {
        for slot in &mut self.slots[self.placed..] {
            *slot = self.text.len();
        }
        Members {
            text: self.text,
            slots: self.slots,
        }
    }
}

/// Canonical JSON of a small nested object, written member by member in key order (as [`Fields`]).
#[derive(Debug, Default)]
pub struct Canonical {
    text: String,
    last_key: &'static str,
}

impl Canonical {
    pub fn object() -> Self {
        Self {
            text: String::from("{"),
            last_key: "",
        }
    }

    fn key(&mut self, key: &'static str) {
        debug_assert!(
            self.last_key < key,
            "members out of order: {key} after {}",
            self.last_key
        );
        self.last_key = key;
        if self.text.len() > 1 {
            self.text.push(',');
        }
        self.text.push('"');
        self.text.push_str(key);
        self.text.push_str("\":");
    }

    pub fn str(mut self, key: &'static str, value: &str) -> Self {
        self.key(key);
        push_jcs_string(&mut self.text, value);
        self
    }

    pub fn uint(mut self, key: &'static str, value: u64) -> Self {
        self.key(key);
        if value > EXACT_INTEGER {
            let mut bytes = Vec::new();
            let _ = write_canonical(&mut bytes, &Value::from(value));
            self.text.push_str(&String::from_utf8_lossy(&bytes));
        } else {
            push_u64(&mut self.text, value);
        }
        self
    }

    pub fn strs<'a>(
        mut self,
        key: &'static str,
        values: impl IntoIterator<Item = &'a str>,
    ) -> Self {
        self.key(key);
        push_jcs_strings(&mut self.text, values);
        self
    }

    /// `null` when `values` is `None`.
    pub fn opt_strs<'a>(
        self,
        key: &'static str,
        values: Option<impl IntoIterator<Item = &'a str>>,
    ) -> Self {
        match values {
            Some(v) => self.strs(key, v),
            None => self.raw(key, "null"),
        }
    }

    pub fn raw(mut self, key: &'static str, canonical: &str) -> Self {
        self.key(key);
        self.text.push_str(canonical);
        self
    }

    pub fn finish(mut self) -> String {
        self.text.push('}');
        self.text
    }
}

/// A JSON array of canonical values, each already canonical text.
pub fn canonical_array<S: AsRef<str>>(items: impl IntoIterator<Item = S>) -> String {
    let mut text = String::from("[");
    for (i, item) in items.into_iter().enumerate() {
        if i > 0 {
            text.push(',');
        }
        text.push_str(item.as_ref());
    }
    text.push(']');
    text
}

fn push_jcs_strings<'a>(out: &mut String, values: impl IntoIterator<Item = &'a str>) {
    out.push('[');
    for (i, v) in values.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        push_jcs_string(out, v);
    }
    out.push(']');
}

/// Appends `n` in decimal, without the formatting machinery.
fn push_u64(out: &mut String, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend(digits[at..].iter().map(|&d| char::from(d)));
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
        let members = members(&fields);
        Self {
            event_id: Uuid::now_v7(),
            event_type,
            trace_id: trace_id.cloned(),
            occurred_at: OffsetDateTime::now_utc(),
            fields: Some(fields),
            members,
        }
    }

    /// An event whose fields were written by a [`Fields`] builder.
    pub fn from_fields(event_type: EventType, trace_id: Option<&TraceId>, fields: Fields) -> Self {
        Self {
            event_id: Uuid::now_v7(),
            event_type,
            trace_id: trace_id.cloned(),
            occurred_at: OffsetDateTime::now_utc(),
            fields: None,
            members: Ok(fields.into_members()),
        }
    }

    /// The type-specific fields.
    pub fn fields(&self) -> Map<String, Value> {
        if let Some(fields) = &self.fields {
            return fields.clone();
        }
        // Written by a builder: read back from their canonical text.
        let text = match &self.members {
            Ok(m) => format!("{{{}}}", m.text.strip_suffix(',').unwrap_or(&m.text)),
            Err(_) => return Map::new(),
        };
        serde_json::from_str(&text).unwrap_or_default()
    }

    /// Adds `extra` fields to this event before it is written (its id and time kept): a door that
    /// learns what a request is about after it arrived (the MCP method) says so in its REQUEST_START.
    pub fn add_fields(&mut self, extra: Map<String, Value>) {
        let mut fields = self.fields();
        for (name, value) in extra {
            if ENVELOPE.contains(&name.as_str()) {
                tracing::error!(field = %name, "event field shadows the envelope; dropped");
                continue;
            }
            fields.insert(name, value);
        }
        self.members = members(&fields);
        self.fields = Some(fields);
    }

    /// The event's canonical body for the chain `chain_id` of `instance_id`, all but its position
    /// (`prev_hash` and `seq`), which only the writer knows.
    pub fn prepare(
        self,
        chain_id: &str,
        instance_id: &str,
    ) -> Result<PreparedEvent, CanonicalError> {
        let members = self.members?;
        let event_id = self.event_id.to_string();
        let occurred_at = timestamp(self.occurred_at);
        let trace_id = self.trace_id.map(|t| t.as_str().to_owned());
        let mut text = String::with_capacity(members.text.len() + 256 + chain_id.len());
        text.push('{');
        let (mut at_prev, mut at_seq, mut from) = (0, 0, 0);
        for (key, &slot) in ENVELOPE_ORDER.iter().zip(&members.slots) {
            text.push_str(&members.text[from..slot]);
            from = slot;
            text.push('"');
            text.push_str(key);
            text.push_str("\":");
            match *key {
                "chain_id" => push_jcs_string(&mut text, chain_id),
                "event_id" => push_jcs_string(&mut text, &event_id),
                "event_type" => push_jcs_string(&mut text, self.event_type.as_str()),
                "instance_id" => push_jcs_string(&mut text, instance_id),
                "occurred_at" => push_jcs_string(&mut text, &occurred_at),
                "prev_hash" => {
                    text.push('"');
                    at_prev = text.len();
                    text.push('"');
                }
                "seq" => at_seq = text.len(),
                _ => match &trace_id {
                    Some(t) => push_jcs_string(&mut text, t),
                    None => text.push_str("null"),
                },
            }
            text.push(',');
        }
        text.push_str(&members.text[from..]);
        // Every member was followed by a comma; the last one closes the object instead.
        text.pop();
        text.push('}');
        Ok(PreparedEvent {
            event_type: self.event_type,
            event_id,
            trace_id,
            occurred_at,
            text,
            at_prev,
            at_seq,
        })
    }
}

/// An event whose canonical body is written but for its chain position: what the writer seals.
#[derive(Debug, Clone)]
pub struct PreparedEvent {
    pub event_type: EventType,
    event_id: String,
    trace_id: Option<String>,
    occurred_at: String,
    /// The body without the values of `prev_hash` (which goes at `at_prev`, inside its quotes) and
    /// `seq` (at `at_seq`).
    text: String,
    at_prev: usize,
    at_seq: usize,
}

impl PreparedEvent {
    /// Seals the event as event `seq` of `chain_id` (of `instance_id`, the names it was prepared with)
    /// after `prev_hash`: its body completed and the hash that links it.
    pub fn seal(self, chain_id: &str, instance_id: &str, seq: i64, prev_hash: &str) -> SealedEvent {
        let digits = seq.to_string();
        let mut body = String::with_capacity(self.text.len() + prev_hash.len() + digits.len());
        body.push_str(&self.text[..self.at_prev]);
        body.push_str(prev_hash);
        body.push_str(&self.text[self.at_prev..self.at_seq]);
        body.push_str(&digits);
        body.push_str(&self.text[self.at_seq..]);
        #[cfg(debug_assertions)]
        assert_canonical(&body);
        let hash = chain_hash(prev_hash, &body);
        SealedEvent {
            chain_id: chain_id.to_owned(),
            seq,
            event_id: self.event_id,
            event_type: self.event_type.as_str().to_owned(),
            trace_id: self.trace_id,
            occurred_at: self.occurred_at,
            instance_id: instance_id.to_owned(),
            prev_hash: prev_hash.to_owned(),
            hash,
            body,
        }
    }
}

/// Debug builds (every test) hold every sealed body to RFC 8785: read back and written again by the
/// canonicalizer, it must come out byte for byte the same. A builder member out of order, or a value
/// written differently, fails here.
#[cfg(debug_assertions)]
fn assert_canonical(body: &str) {
    let parsed: Value = match serde_json::from_str(body) {
        Ok(v) => v,
        Err(e) => panic!("a sealed body is not JSON ({e}): {body}"),
    };
    match serde_json_canonicalizer::to_string(&parsed) {
        Ok(again) => assert_eq!(again, body, "a sealed body is not in canonical form"),
        Err(e) => panic!("a sealed body has no canonical form ({e}): {body}"),
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
    hash_hex(&h.finalize().into())
}

/// A 32-byte hash as 64 lowercase hex digits (the trail reads and writes millions of these: one
/// allocation each, no formatting machinery).
pub fn hash_hex(hash: &[u8; 32]) -> String {
    let mut text = [0u8; 64];
    match hex::encode_to_slice(hash, &mut text) {
        Ok(()) => String::from_utf8(text.to_vec()).unwrap_or_default(),
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
    Ok(pending
        .prepare(chain_id, instance_id)?
        .seal(chain_id, instance_id, seq, prev_hash))
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
        let mut line = String::with_capacity(self.json_line_len());
        self.push_json_line(&mut line);
        line
    }

    /// The length of [`Self::json_line`]: the body, `,"hash":""` and `"}` and the line break.
    pub fn json_line_len(&self) -> usize {
        self.body.len() + self.hash.len() + 11
    }

    /// Appends [`Self::json_line`] to `out` (the writer builds a batch's lines in one buffer).
    pub fn push_json_line(&self, out: &mut String) {
        let open = self.body.strip_suffix('}').unwrap_or(&self.body);
        out.push_str(open);
        out.push_str(",\"hash\":\"");
        out.push_str(&self.hash);
        out.push_str("\"}\n");
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

/// Appends `value`'s RFC 8785 canonical JSON to `out`.
fn write_canonical(out: &mut Vec<u8>, value: &Value) -> Result<(), CanonicalError> {
    if written_alike(value) {
        return serde_json::to_writer(out, value).map_err(|e| CanonicalError(e.to_string()));
    }
    out.extend(serde_json_canonicalizer::to_vec(value).map_err(|e| CanonicalError(e.to_string()))?);
    Ok(())
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
    fn a_timestamp_and_its_microseconds_convert_both_ways() {
        let t = "2026-01-02T03:04:05.000007Z";
        let micros = micros_of(t).unwrap();
        assert_eq!(micros, 1_767_323_045_000_007);
        assert_eq!(timestamp_of_micros(micros).unwrap(), t);
        assert_eq!(micros_of("2026-01-02T00:04:05.000007-03:00"), Some(micros));
        assert_eq!(micros_of("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(micros_of("2026-01-02T03:04:05Z"), Some(micros - 7));
        assert_eq!(micros_of("2026-02-30T03:04:05.000007Z"), None);
        assert_eq!(micros_of("2026-01-02T03:04:05.00000xZ"), None);
        assert_eq!(micros_of("yesterday"), None);
        assert_eq!(micros_of(""), None);
    }

    #[test]
    fn a_timestamp_written_in_place_matches_the_formatted_one() {
        for t in [
            time::macros::datetime!(0000-01-01 00:00:00 UTC),
            time::macros::datetime!(1970-01-01 00:00:00 UTC),
            time::macros::datetime!(2026-12-31 23:59:59.999999 UTC),
            time::macros::datetime!(2026-07-04 09:08:07.000123 +03:00),
            time::macros::datetime!(9999-12-31 23:59:59.999999 UTC),
        ] {
            let utc = t.to_offset(time::UtcOffset::UTC);
            assert_eq!(timestamp(t), timestamp_formatted(utc), "{t}");
        }
        assert_eq!(
            timestamp(time::macros::datetime!(2026-07-04 09:08:07.000123 +03:00)),
            "2026-07-04T06:08:07.000123Z"
        );
    }

    #[test]
    fn timestamps_sort_as_text() {
        let a = timestamp(time::macros::datetime!(2026-01-02 03:04:05.000007 UTC));
        assert_eq!(a, "2026-01-02T03:04:05.000007Z");
        let b = timestamp(time::macros::datetime!(2026-01-02 03:04:05.1 UTC));
        assert!(a < b);
    }
}
