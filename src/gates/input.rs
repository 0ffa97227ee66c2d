//! G3: input. The media type ([`check_media_type`]), body size limit, well-formed JSON without duplicate
//! object keys and the `{action, context_id, payload}` envelope ([`read_body`], [`parse_envelope`]); then the policy's half ([`admit`]), which composite steps pass
//! too: a known action with an executor, a known context, and the payload valid against the action's
//! JSON Schema (compiled at load).

use std::fmt;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::http::HeaderMap;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

use crate::domain::ContextId;
use crate::policy::{Action, Policy, Violation};
use crate::reason::ReasonCode;
use crate::serve::BodyTimeout;

/// What a well-formed body asks for, before the policy has looked at it.
pub struct Envelope {
    pub action: String,
    pub context: String,
    pub payload: Value,
}

/// A request that passed G3.
pub struct ValidInput {
    pub action: Arc<Action>,
    pub context: ContextId,
    pub payload: Value,
}

/// Why G3 refused; `action` is the requested action when the policy knows it (for metrics).
pub struct InputRefusal {
    pub reason: ReasonCode,
    pub message: String,
    pub violations: Vec<Violation>,
    pub action: Option<Arc<Action>>,
    /// The action name the client sent, when the policy does not know it (for the audit trail).
    pub requested_action: Option<String>,
}

impl InputRefusal {
    pub fn new(reason: ReasonCode, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
            violations: vec![],
            action: None,
            requested_action: None,
        }
    }
}

/// The body must be declared `application/json` (parameters allowed, a charset only if UTF-8): a proxy or
/// a log that trusts the declared type must see what the gateway parses.
pub fn check_media_type(headers: &HeaderMap) -> Result<(), InputRefusal> {
    let declared = headers
        .get(axum::http::header::CONTENT_TYPE)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let refuse = |what: &str| {
        Err(InputRefusal::new(
            ReasonCode::InputUnsupportedMediaType,
            format!("{what}; send Content-Type: application/json"),
        ))
    };
    let Some(declared) = declared else {
        return refuse("the request has no Content-Type");
    };
    let mut parts = declared.split(';').map(str::trim);
    let essence = parts.next().unwrap_or_default();
    if !essence.eq_ignore_ascii_case("application/json") {
        return refuse(&format!("Content-Type {declared:?} is not JSON"));
    }
    for parameter in parts {
        if let Some((name, value)) = parameter.split_once('=')
            && name.trim().eq_ignore_ascii_case("charset")
        {
            let value = value.trim().trim_matches('"');
            if !value.eq_ignore_ascii_case("utf-8") && !value.eq_ignore_ascii_case("utf8") {
                return refuse(&format!(
                    "charset {value:?} is not UTF-8, which JSON requires"
                ));
            }
        }
    }
    Ok(())
}

/// Reads at most `limit` bytes; a declared or actual larger body is `INPUT_TOO_LARGE`, one that did not
/// arrive within the server's body timeout is `INPUT_TIMEOUT`.
pub async fn read_body(
    body: Body,
    content_length: Option<u64>,
    limit: usize,
) -> Result<Bytes, InputRefusal> {
    let too_large = || {
        InputRefusal::new(
            ReasonCode::InputTooLarge,
            format!("the request body is larger than {limit} bytes"),
        )
    };
    if content_length.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<LengthLimitError>() => Err(too_large()),
        // The timeout comes from the server's body wrapper, under axum's own body error.
        Err(e) => Err(match caused_by::<BodyTimeout>(&*e) {
            Some(timeout) => InputRefusal::new(ReasonCode::InputTimeout, timeout.to_string()),
            None => InputRefusal::new(
                ReasonCode::InputMalformedJson,
                format!("the request body could not be read: {e}"),
            ),
        }),
    }
}

/// The first error of type `E` in `error`'s source chain.
fn caused_by<'e, E: std::error::Error + 'static>(
    error: &'e (dyn std::error::Error + 'static),
) -> Option<&'e E> {
    std::iter::successors(Some(error), |e| e.source()).find_map(|e| e.downcast_ref::<E>())
}

fn violation(pointer: &str, message: &str) -> Violation {
    Violation {
        pointer: pointer.to_owned(),
        message: message.to_owned(),
    }
}

/// A JSON value whose objects may not repeat a key: with `{"action":"echo","action":"other"}` a proxy or
/// log reading the first key would see a different action from the one that runs.
struct UniqueKeys;

impl<'de> DeserializeSeed<'de> for UniqueKeys {
    type Value = Value;
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for UniqueKeys {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| E::custom("a number JSON cannot hold"))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
        while let Some(item) = seq.next_element_seed(UniqueKeys)? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut object = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if object.contains_key(&key) {
                return Err(de::Error::custom(format_args!("duplicate key {key:?}")));
            }
            let value = map.next_value_seed(UniqueKeys)?;
            object.insert(key, value);
        }
        Ok(Value::Object(object))
    }
}

/// Parses JSON text, refusing an object that repeats a key anywhere in it.
pub fn parse_strict_json(bytes: &[u8]) -> serde_json::Result<Value> {
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let value = UniqueKeys.deserialize(&mut deserializer)?;
    deserializer.end()?;
    Ok(value)
}

/// Parses the body as the `{action, context_id, payload}` envelope; a missing payload is `{}`.
pub fn parse_envelope(bytes: &[u8]) -> Result<Envelope, InputRefusal> {
    let mut value = parse_strict_json(bytes).map_err(|e| {
        InputRefusal::new(
            ReasonCode::InputMalformedJson,
            format!("the request body is not valid JSON: {e}"),
        )
    })?;
    let Some(obj) = value.as_object_mut() else {
        return Err(InputRefusal {
            violations: vec![violation("", "the body must be a JSON object")],
            ..InputRefusal::new(
                ReasonCode::InputSchemaInvalid,
                "the request body must be a JSON object",
            )
        });
    };
    let mut violations = Vec::new();
    for key in obj.keys() {
        if !matches!(key.as_str(), "action" | "context_id" | "payload") {
            violations.push(violation(
                &format!("/{}", key.replace('~', "~0").replace('/', "~1")),
                "unknown field; the body holds action, context_id and payload",
            ));
        }
    }
    let action = match obj.get("action") {
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => {
            violations.push(violation("/action", "must be a string"));
            None
        }
        None => {
            violations.push(violation("/action", "is required"));
            None
        }
    };
    let context = match obj.get("context_id") {
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => {
            violations.push(violation("/context_id", "must be a string"));
            None
        }
        None => {
            violations.push(violation("/context_id", "is required"));
            None
        }
    };
    let payload = match obj.remove("payload") {
        Some(p @ Value::Object(_)) => Some(p),
        Some(_) => {
            violations.push(violation("/payload", "must be a JSON object"));
            None
        }
        None => Some(Value::Object(serde_json::Map::new())),
    };
    let (Some(action), Some(context), Some(payload), true) =
        (action, context, payload, violations.is_empty())
    else {
        return Err(InputRefusal {
            violations,
            ..InputRefusal::new(
                ReasonCode::InputSchemaInvalid,
                "the request body does not match {action, context_id, payload}",
            )
        });
    };
    Ok(Envelope {
        action,
        context,
        payload,
    })
}

/// The policy's half of G3: the action exists and has an executor, the context exists, the payload
/// matches the action's schema.
pub fn admit(
    policy: &Policy,
    action: &str,
    context: &str,
    payload: Value,
) -> Result<ValidInput, InputRefusal> {
    let Some(action) = policy.action(action).cloned() else {
        return Err(InputRefusal {
            requested_action: Some(action.to_owned()),
            ..InputRefusal::new(
                ReasonCode::ActionUnknown,
                "the action is not defined in the policy",
            )
        });
    };
    if action.executor.is_none() {
        return Err(InputRefusal {
            requested_action: Some(action.name.to_string()),
            ..InputRefusal::new(
                ReasonCode::ActionUnknown,
                format!(
                    "{} is a permission for another route, not an action /process runs",
                    action.name
                ),
            )
        });
    }
    let context = match ContextId::parse(context) {
        Ok(c) if policy.has_context(c.as_str()) => c,
        _ => {
            return Err(InputRefusal {
                action: Some(action),
                ..InputRefusal::new(
                    ReasonCode::ContextUnknown,
                    "the context is not defined in the policy",
                )
            });
        }
    };
    if let Err(violations) = action.validate(&payload) {
        return Err(InputRefusal {
            message: format!(
                "the payload does not match the schema of {}: {}",
                action.name,
                violations
                    .iter()
                    .map(|v| v.pointer.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            violations,
            action: Some(action),
            reason: ReasonCode::InputSchemaInvalid,
            requested_action: None,
        });
    }
    Ok(ValidInput {
        action,
        context,
        payload,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(bytes: &str) -> InputRefusal {
        match parse_envelope(bytes.as_bytes()) {
            Ok(_) => panic!("{bytes} was accepted"),
            Err(r) => r,
        }
    }

    #[test]
    fn a_repeated_key_is_refused_naming_it_at_any_depth() {
        let top = refused(r#"{"action":"echo","action":"licitacoes.collect","context_id":"work"}"#);
        assert_eq!(top.reason, ReasonCode::InputMalformedJson);
        assert!(
            top.message.contains(r#"duplicate key "action""#),
            "{}",
            top.message
        );
        let deep = refused(
            r#"{"action":"echo","context_id":"work","payload":{"a":[{"x":1,"y":2,"x":3}]}}"#,
        );
        assert!(
            deep.message.contains(r#"duplicate key "x""#),
            "{}",
            deep.message
        );
    }

    #[test]
    fn distinct_keys_and_every_json_type_still_parse() {
        let v = parse_strict_json(
            r#"{"a":null,"b":true,"c":-1,"d":18446744073709551615,"e":1.5,"f":"\u00e9","g":[1,{"a":1}]}"#
                .as_bytes(),
        )
            .unwrap();
        assert_eq!(v["d"], serde_json::json!(u64::MAX));
        assert_eq!(v["f"], "é");
        assert_eq!(v["g"][1]["a"], 1);
        assert!(
            parse_strict_json(b"{} {}").is_err(),
            "trailing data is refused"
        );
    }

    #[test]
    fn only_json_media_types_pass() {
        let with = |ct: Option<&str>| {
            let mut h = HeaderMap::new();
            if let Some(ct) = ct {
                h.insert("content-type", ct.parse().unwrap());
            }
            check_media_type(&h).map_err(|r| r.reason)
        };
        assert_eq!(with(Some("application/json")), Ok(()));
        assert_eq!(with(Some("Application/JSON; charset=UTF-8")), Ok(()));
        for bad in [
            Some("text/plain"),
            Some("image/png"),
            Some("application/json; charset=latin1"),
            Some("application/x-www-form-urlencoded"),
            None,
        ] {
            assert_eq!(
                with(bad),
                Err(ReasonCode::InputUnsupportedMediaType),
                "{bad:?}"
            );
        }
    }
}
