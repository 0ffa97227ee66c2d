//! G3's envelope parser on arbitrary request bodies: it never panics, and what it accepts or refuses
//! agrees with a plain JSON parse of the same bytes, except that a repeated key is refused as malformed.

#![no_main]

use catraca::gates::input::parse_envelope;
use catraca::reason::ReasonCode;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|body: &[u8]| {
    let parsed = serde_json::from_slice::<Value>(body);
    match parse_envelope(body) {
        Ok(envelope) => {
            // Accepted: the body is a JSON object with exactly these fields (payload optional), and the
            // envelope carries their values unchanged.
            let Ok(Value::Object(obj)) = parsed else {
                panic!("accepted a body that is not a JSON object");
            };
            assert!(
                obj.keys()
                    .all(|k| matches!(k.as_str(), "action" | "context_id" | "payload")),
                "accepted a body with an unknown field"
            );
            assert_eq!(
                obj.get("action").and_then(Value::as_str),
                Some(envelope.action.as_str())
            );
            assert_eq!(
                obj.get("context_id").and_then(Value::as_str),
                Some(envelope.context.as_str())
            );
            let expected_payload = obj
                .get("payload")
                .cloned()
                .unwrap_or_else(|| Value::Object(serde_json::Map::new()));
            assert!(envelope.payload.is_object(), "the payload is not an object");
            assert_eq!(envelope.payload, expected_payload);
        }
        Err(refusal) => match parsed {
            // Not JSON: refused as malformed, and only then.
            Err(_) => assert_eq!(refusal.reason, ReasonCode::InputMalformedJson),
            // JSON that repeats a key (which a plain parse lets through, last one winning): refused as
            // malformed, naming the key.
            Ok(_) if refusal.reason == ReasonCode::InputMalformedJson => {
                assert!(
                    refusal.message.contains("duplicate key"),
                    "valid JSON refused as malformed: {}",
                    refusal.message
                );
            }
            // JSON of the wrong shape: refused as schema-invalid, naming at least one violation.
            Ok(_) => {
                assert_eq!(refusal.reason, ReasonCode::InputSchemaInvalid);
                assert!(
                    !refusal.violations.is_empty(),
                    "a schema refusal names no violation"
                );
            }
        },
    }
});
