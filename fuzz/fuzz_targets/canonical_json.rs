//! The audit trail's canonical JSON on arbitrary JSON: the fast path (serde_json's own writer, for
//! values it writes as RFC 8785 does) gives exactly the canonicalizer's bytes, or the same error.

#![no_main]

use catraca::event::canonical_json;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let Ok(value) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let ours = canonical_json(&value).ok();
    let reference = serde_json_canonicalizer::to_vec(&value).ok();
    assert_eq!(ours, reference, "canonical JSON differs for {value}");
});
