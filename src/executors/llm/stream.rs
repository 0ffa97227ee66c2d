//! A streamed chat completion put back together: the chunks (`chat.completion.chunk`) an upstream
//! sends are relayed to the client as they come, and assembled here into the one completion the
//! executor returns, whose digest the trail keeps and whose usage the metrics count.

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

/// Most choices one stream may carry (`n`): each is a string being built.
const MAX_CHOICES: usize = 16;

/// One choice as its deltas arrive.
#[derive(Default)]
struct Choice {
    role: Option<String>,
    content: String,
    finish_reason: Option<Value>,
}

/// The completion the chunks of one stream make.
#[derive(Default)]
pub(super) struct Assembly {
    id: Option<Value>,
    created: Option<Value>,
    model: Option<Value>,
    choices: BTreeMap<u64, Choice>,
    usage: Option<Value>,
}

impl Assembly {
    /// Adds one chunk: its text deltas, finish reasons and, in the last chunk, the usage. An error
    /// says why the chunk is not one.
    pub(super) fn add(&mut self, chunk: &Value) -> Result<(), String> {
        let not_chunk = |why: &str| format!("a stream chunk {why}");
        let Some(fields) = chunk.as_object() else {
            return Err(not_chunk("is not a JSON object"));
        };
        for (name, slot) in [
            ("id", &mut self.id),
            ("created", &mut self.created),
            ("model", &mut self.model),
        ] {
            if slot.is_none() {
                *slot = fields.get(name).cloned();
            }
        }
        if let Some(usage) = fields.get("usage").filter(|u| u.is_object()) {
            self.usage = Some(usage.clone());
        }
        let choices = match fields.get("choices") {
            None | Some(Value::Null) => return Ok(()),
            Some(Value::Array(choices)) => choices,
            Some(_) => return Err(not_chunk("has choices that are not a list")),
        };
        for choice in choices {
            let index = choice.get("index").and_then(Value::as_u64).unwrap_or(0);
            if !self.choices.contains_key(&index) && self.choices.len() >= MAX_CHOICES {
                return Err(not_chunk("has more choices than a completion may"));
            }
            let entry = self.choices.entry(index).or_default();
            if let Some(delta) = choice.get("delta") {
                if let Some(role) = delta.get("role").and_then(Value::as_str) {
                    entry.role = Some(role.to_owned());
                }
                if let Some(text) = delta.get("content").and_then(Value::as_str) {
                    entry.content.push_str(text);
                }
            }
            if let Some(reason) = choice.get("finish_reason").filter(|r| !r.is_null()) {
                entry.finish_reason = Some(reason.clone());
            }
        }
        Ok(())
    }

    /// The completion, once the stream said `[DONE]`; a stream without any choice is not one.
    pub(super) fn finish(self) -> Result<Value, String> {
        if self.choices.is_empty() {
            return Err("the stream carried no choice".into());
        }
        let choices: Vec<Value> = self
            .choices
            .into_iter()
            .map(|(index, c)| {
                json!({
                    "index": index,
                    "message": {
                        "role": c.role.unwrap_or_else(|| "assistant".to_owned()),
                        "content": c.content,
                    },
                    "finish_reason": c.finish_reason,
                })
            })
            .collect();
        let mut completion = Map::new();
        completion.insert("id".into(), self.id.unwrap_or(Value::Null));
        completion.insert("object".into(), Value::from("chat.completion"));
        completion.insert("created".into(), self.created.unwrap_or(Value::Null));
        completion.insert("model".into(), self.model.unwrap_or(Value::Null));
        completion.insert("choices".into(), Value::Array(choices));
        completion.insert("usage".into(), self.usage.unwrap_or(Value::Null));
        Ok(Value::Object(completion))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(index: u64, delta: Value, finish: Value) -> Value {
        json!({
            "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7, "model": "m",
            "choices": [{"index": index, "delta": delta, "finish_reason": finish}],
        })
    }

    #[test]
    fn deltas_make_the_message_and_the_last_chunk_brings_usage() {
        let mut a = Assembly::default();
        a.add(&chunk(0, json!({"role": "assistant"}), Value::Null))
            .unwrap();
        a.add(&chunk(0, json!({"content": "Olá, "}), Value::Null))
            .unwrap();
        a.add(&chunk(0, json!({"content": "mundo"}), Value::Null))
            .unwrap();
        a.add(&chunk(0, json!({}), json!("stop"))).unwrap();
        a.add(&json!({"id": "chatcmpl-1", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}))
            .unwrap();
        let done = a.finish().unwrap();
        assert_eq!(done["object"], "chat.completion");
        assert_eq!(done["id"], "chatcmpl-1");
        assert_eq!(done["choices"][0]["message"]["content"], "Olá, mundo");
        assert_eq!(done["choices"][0]["message"]["role"], "assistant");
        assert_eq!(done["choices"][0]["finish_reason"], "stop");
        assert_eq!(done["usage"]["total_tokens"], 5);
    }

    #[test]
    fn a_stream_without_choices_or_with_a_malformed_chunk_is_refused() {
        assert!(Assembly::default().finish().is_err());
        let mut a = Assembly::default();
        assert!(a.add(&json!("text")).is_err());
        assert!(a.add(&json!({"choices": {"0": 1}})).is_err());
    }

    #[test]
    fn choices_are_bounded() {
        let mut a = Assembly::default();
        for i in 0..MAX_CHOICES as u64 {
            a.add(&chunk(i, json!({"content": "x"}), Value::Null))
                .unwrap();
        }
        assert!(
            a.add(&chunk(
                MAX_CHOICES as u64,
                json!({"content": "x"}),
                Value::Null
            ))
            .is_err()
        );
    }
}
