//! The JSON Lines verifier's line parser on arbitrary lines: it never panics, and an event it rebuilds
//! carries the line's own fields, with the hashed bytes in canonical form and without `hash`.

#![no_main]

use catraca::audit::verify::event_from_line;
use catraca::event::canonical_text;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    // The verifier reads a file line by line as UTF-8; other bytes never reach the parser.
    let Ok(line) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(event) = event_from_line(line) else {
        return;
    };
    let Ok(Value::Object(record)) = serde_json::from_str::<Value>(line) else {
        panic!("rebuilt an event from a line that is not a JSON object");
    };
    assert_eq!(
        record.get("hash").and_then(Value::as_str),
        Some(event.hash.as_str())
    );
    assert_eq!(
        record.get("chain_id").and_then(Value::as_str),
        Some(event.chain_id.as_str())
    );
    assert_eq!(record.get("seq").and_then(Value::as_i64), Some(event.seq));
    let Ok(Value::Object(body)) = serde_json::from_str::<Value>(&event.body) else {
        panic!("the hashed bytes are not a JSON object: {:?}", event.body);
    };
    assert!(!body.contains_key("hash"), "the hashed bytes hold the hash");
    assert_eq!(
        body.len(),
        record.len() - 1,
        "the hashed bytes lost or gained a field"
    );
    // Canonical form is a fixed point: a trail written from these bytes verifies the same way again.
    let again = canonical_text(&Value::Object(body));
    assert_eq!(
        again.as_deref().ok(),
        Some(event.body.as_str()),
        "canonical form is not stable"
    );
});
