//! The OpenAPI 3.1 document: generated from the handlers and types, then completed with what depends
//! on every route alike (the front door's refusals, the response headers) and on the loaded policy (the
//! `/process` body as a union over its runnable actions, each with its own payload schema). It is built
//! per request from the policy in force, so a dev-mode reload shows at once.

use serde_json::{Map, Value, json};
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::front_door::{MAX_HEADER_BYTES, MAX_HEADER_COUNT};
use crate::error::ErrorBody;
use crate::policy::{Action, Policy};
use crate::turnstile::ActionResult;

/// The name of the `X-API-Key` security scheme.
const API_KEY_SCHEME: &str = "api_key";
/// The name of the `Authorization: Bearer` security scheme.
const BEARER_SCHEME: &str = "bearer";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Catraca",
        description = "A governed agent gateway: gates, executors and a hash-chained audit trail. \
            Every response carries X-Trace-Id; every refusal is the ErrorBody with that trace id."
    ),
    paths(
        super::process_action,
        super::health,
        super::ready,
        super::metrics,
        super::audit::get_trace,
        super::audit::decisions,
        super::audit::chains,
        super::audit::decision_proof,
        super::audit::public_key,
        super::switches::disable,
        super::switches::enable,
        super::keys::list,
        super::keys::create,
        super::keys::revoke,
        super::keys::rotate,
        super::console::index,
        super::console::file,
        super::openai::models,
        super::openai::chat_completions,
        super::openapi_json
    ),
    components(schemas(
        ActionResult,
        ErrorBody,
        super::Health,
        super::Readiness,
        super::switches::SwitchAnswer,
        super::switches::ReasonBody,
        super::keys::KeyList,
        super::keys::Revoked,
        super::keys::CreateKey,
        super::keys::RotateKey,
        super::keys::IssuedKey,
        crate::audit_read::DecisionPage,
        crate::audit_read::DecisionRow,
        crate::audit_read::ChainsState,
        crate::audit_read::ChainRow,
        crate::audit_read::VerificationRow,
        crate::audit::anchor::Receipt,
        crate::audit::proof::DecisionProof,
        crate::audit::proof::ProvenEvent,
        super::audit::PublicKeyBody,
        super::openai::OpenAiError,
        super::openai::OpenAiErrorDetail,
        super::openai::ModelList,
        super::openai::Model,
        super::openai::StreamEvent
    )),
    modifiers(&SecuritySchemes)
)]
struct ApiDoc;

/// The two ways of presenting a key: `X-API-Key: <key>` or `Authorization: Bearer <key>`.
struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            API_KEY_SCHEME,
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                "X-API-Key",
                "An API key `ck_<key_id>_<secret>`, as `catraca keys create` prints it.",
            ))),
        );
        components.add_security_scheme(
            BEARER_SCHEME,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("ck_<key_id>_<secret>")
                    .description(Some("The same API key, as `Authorization: Bearer <key>`."))
                    .build(),
            ),
        );
    }
}

/// The document for `policy`: the generated part, completed.
pub fn document(policy: &Policy) -> Result<Value, serde_json::Error> {
    let mut doc = ApiDoc::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_owned();
    let mut doc = serde_json::to_value(doc)?;
    if let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) {
        for operation in paths
            .values_mut()
            .filter_map(Value::as_object_mut)
            .flat_map(|item| item.values_mut())
            .filter_map(Value::as_object_mut)
        {
            if let Some(responses) = operation
                .get_mut("responses")
                .and_then(Value::as_object_mut)
            {
                add_front_door_responses(responses);
                add_response_headers(responses);
            }
        }
        if let Some(post) = paths
            .get_mut("/process")
            .and_then(|p| p.get_mut("post"))
            .and_then(Value::as_object_mut)
        {
            post.insert("requestBody".to_owned(), process_request_body());
        }
        if let Some(post) = paths
            .get_mut("/v1/chat/completions")
            .and_then(|p| p.get_mut("post"))
            .and_then(Value::as_object_mut)
        {
            post.insert("requestBody".to_owned(), chat_request_body());
        }
        // The context header names one of the policy's contexts.
        let contexts: Vec<&str> = policy.contexts().map(|c| c.as_str()).collect();
        for (path, method) in [("/v1/models", "get"), ("/v1/chat/completions", "post")] {
            let parameters = paths
                .get_mut(path)
                .and_then(|p| p.get_mut(method))
                .and_then(|o| o.get_mut("parameters"))
                .and_then(Value::as_array_mut);
            for parameter in parameters.into_iter().flatten() {
                if parameter["name"] == "X-Catraca-Context" {
                    parameter["schema"] = json!({ "type": "string", "enum": contexts });
                }
            }
        }
    }
    if let Some(schemas) = doc
        .get_mut("components")
        .and_then(|c| c.get_mut("schemas"))
        .and_then(Value::as_object_mut)
    {
        schemas.extend(process_body_schemas(policy));
        schemas.extend(chat_body_schemas(policy));
        if let Some(create) = schemas.get_mut("CreateKey") {
            name_policy_values(create, policy);
        }
    }
    Ok(doc)
}

/// The roles, contexts and tiers a new key may name: the loaded policy's.
fn name_policy_values(create: &mut Value, policy: &Policy) {
    let roles: Vec<&str> = policy.roles().map(|r| r.as_str()).collect();
    let contexts: Vec<&str> = policy.contexts().map(|c| c.as_str()).collect();
    let mut tiers: Vec<Value> = policy.tiers().map(|(t, _)| json!(t.as_str())).collect();
    tiers.push(Value::Null);
    let properties = &mut create["properties"];
    properties["role"]["enum"] = json!(roles);
    properties["contexts"]["items"] = json!({ "type": "string", "enum": contexts });
    properties["tier"]["enum"] = Value::Array(tiers);
}

fn error_ref() -> Value {
    json!({ "$ref": "#/components/schemas/ErrorBody" })
}

fn error_content() -> Value {
    json!({ "application/json": { "schema": error_ref() } })
}

/// Refusals every route can give, whatever it does: a method it does not take, headers past the front
/// door's limits, the connection cap, an unexpected fault.
fn add_front_door_responses(responses: &mut Map<String, Value>) {
    let common = [
        (
            "405",
            "METHOD_NOT_ALLOWED: the path exists, not with this method (answered to the other methods \
             of this path; `Allow` lists the ones it takes)"
                .to_owned(),
        ),
        (
            "431",
            format!(
                "HEADERS_TOO_LARGE: more than {MAX_HEADER_COUNT} header fields or {MAX_HEADER_BYTES} \
                 bytes of them"
            ),
        ),
        (
            "500",
            "INTERNAL_ERROR: an unexpected fault; the operator finds its detail by trace id".to_owned(),
        ),
        (
            "503",
            "TOO_MANY_CONNECTIONS: the gateway holds as many connections as it is configured to"
                .to_owned(),
        ),
    ];
    for (status, description) in common {
        match responses.get_mut(status).and_then(Value::as_object_mut) {
            None => {
                responses.insert(
                    status.to_owned(),
                    json!({ "description": description, "content": error_content() }),
                );
            }
            Some(existing) => widen_response(existing, &description),
        }
    }
}

/// A status the route documents already, which the front door may also answer with the error body:
/// both descriptions, and the route's own body or the error body.
fn widen_response(response: &mut Map<String, Value>, description: &str) {
    let before = response
        .get("description")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    if !before.contains(description) {
        let joined = if before.is_empty() {
            description.to_owned()
        } else {
            format!("{before}; or {description}")
        };
        response.insert("description".to_owned(), Value::String(joined));
    }
    let Some(schema) = response
        .get_mut("content")
        .and_then(|c| c.get_mut("application/json"))
        .and_then(|m| m.get_mut("schema"))
    else {
        response.insert("content".to_owned(), error_content());
        return;
    };
    let has_error_body = *schema == error_ref()
        || schema
            .get("oneOf")
            .and_then(Value::as_array)
            .is_some_and(|branches| branches.contains(&error_ref()));
    if !has_error_body {
        *schema = json!({ "oneOf": [schema.take(), error_ref()] });
    }
}

/// `X-Trace-Id` on every response; `WWW-Authenticate` on 401; `Retry-After` on 429 (always) and 503
/// (when the gateway can tell); `Allow` on 405.
fn add_response_headers(responses: &mut Map<String, Value>) {
    for (status, response) in responses.iter_mut() {
        let Some(response) = response.as_object_mut() else {
            continue;
        };
        let mut headers = Map::new();
        headers.insert(
            "X-Trace-Id".to_owned(),
            json!({
                "description": "The request's trace id: the client's `traceparent` or `X-Trace-Id` \
                    when well-formed, else a new one. Every audit event of the request carries it.",
                "required": true,
                "schema": { "type": "string", "pattern": "^[A-Za-z0-9._-]{8,64}$" }
            }),
        );
        match status.as_str() {
            "401" => {
                headers.insert(
                    "WWW-Authenticate".to_owned(),
                    json!({
                        "description": "`Bearer realm=\"catraca\"`, with `error=\"invalid_token\"` \
                            when a key was presented but refused (RFC 6750).",
                        "required": true,
                        "schema": { "type": "string" }
                    }),
                );
            }
            "429" | "503" => {
                headers.insert(
                    "Retry-After".to_owned(),
                    json!({
                        "description": "Seconds to wait before trying again.",
                        "required": status == "429",
                        "schema": { "type": "integer", "minimum": 0 }
                    }),
                );
            }
            "405" => {
                headers.insert(
                    "Allow".to_owned(),
                    json!({
                        "description": "The methods this path takes.",
                        "required": true,
                        "schema": { "type": "string" }
                    }),
                );
            }
            _ => {}
        }
        response.insert("headers".to_owned(), Value::Object(headers));
    }
}

fn process_request_body() -> Value {
    json!({
        "description": "One of the loaded policy's runnable actions, in one of its contexts, with a \
            payload valid against that action's JSON Schema (draft 2020-12, formats asserted).",
        "required": true,
        "content": {
            "application/json": { "schema": { "$ref": "#/components/schemas/ProcessBody" } }
        }
    })
}

fn chat_request_body() -> Value {
    json!({
        "description": "An OpenAI chat request for one of the models the loaded policy offers \
            (actions with `model = true`): `model`, `stream`, `stream_options.include_usage`, and the \
            fields of that action's payload schema (its messages and sampling parameters).",
        "required": true,
        "content": {
            "application/json": { "schema": { "$ref": "#/components/schemas/ChatBody" } }
        }
    })
}

/// `ChatBody`: a `oneOf` with one branch per model (`Chat.<action>`): the action's payload schema with
/// the facade's own fields added (`model`, its name; `stream`; `stream_options`).
fn chat_body_schemas(policy: &Policy) -> Map<String, Value> {
    let mut schemas = Map::new();
    let facade = json!({
        "stream": { "type": ["boolean", "null"], "description": "Answer as server-sent events." },
        "stream_options": {
            "type": ["object", "null"],
            "properties": {
                "include_usage": {
                    "type": ["boolean", "null"],
                    "description": "A last chunk with the token usage."
                }
            }
        }
    });
    let mut branches = Vec::new();
    for action in policy.actions().filter(|a| a.model && a.executor.is_some()) {
        let name = action.name.as_str();
        let mut schema = match &action.input_schema {
            Some(Value::Object(schema)) => schema.clone(),
            _ => json!({ "type": "object" })
                .as_object()
                .cloned()
                .unwrap_or_default(),
        };
        schema.remove("$schema");
        schema.remove("examples");
        let properties = schema
            .entry("properties")
            .or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(properties) = properties {
            properties.insert("model".to_owned(), json!({ "const": name }));
            if let Value::Object(extra) = &facade {
                properties.extend(extra.clone());
            }
        }
        let required = schema
            .entry("required")
            .or_insert_with(|| Value::Array(vec![]));
        if let Value::Array(required) = required {
            required.insert(0, Value::from("model"));
        }
        schema.insert(
            "description".to_owned(),
            Value::from(format!("model {name}: {}", action.description)),
        );
        let branch = format!("Chat.{name}");
        branches.push(json!({ "$ref": format!("#/components/schemas/{branch}") }));
        schemas.insert(branch, Value::Object(schema));
    }
    let body = if branches.is_empty() {
        json!({
            "type": "object",
            "description": "The loaded policy offers no model.",
            "properties": { "model": { "type": "string" } },
            "required": ["model"]
        })
    } else {
        json!({ "oneOf": branches })
    };
    schemas.insert("ChatBody".to_owned(), body);
    schemas
}

/// `ProcessBody`: a `oneOf` with one branch per runnable action (`Process.<action>`, discriminated by
/// `action`), each naming its payload schema (`Payload.<action>`) and the policy's contexts
/// (`ContextId`). A policy without runnable actions or contexts admits no request; its body is
/// described as the bare envelope.
fn process_body_schemas(policy: &Policy) -> Map<String, Value> {
    let mut schemas = Map::new();
    let contexts: Vec<&str> = policy.contexts().map(|c| c.as_str()).collect();
    let runnable: Vec<&Action> = policy
        .actions()
        .filter(|a| a.executor.is_some())
        .map(|a| &**a)
        .collect();
    if contexts.is_empty() || runnable.is_empty() {
        schemas.insert(
            "ProcessBody".to_owned(),
            json!({
                "type": "object",
                "description": "The loaded policy defines no runnable action or no context.",
                "properties": {
                    "action": { "type": "string" },
                    "context_id": { "type": "string" },
                    "payload": { "type": "object" }
                },
                "required": ["action", "context_id"],
                "additionalProperties": false
            }),
        );
        return schemas;
    }
    schemas.insert(
        "ContextId".to_owned(),
        json!({
            "type": "string",
            "description": "A context defined in the loaded policy.",
            "enum": contexts
        }),
    );
    let mut branches = Vec::new();
    let mut mapping = Map::new();
    for action in runnable {
        let name = action.name.as_str();
        let branch = format!("Process.{name}");
        let branch_ref = format!("#/components/schemas/{branch}");
        let payload = payload_schema(action, &mut schemas);
        // The turnstile reads a missing payload as `{}`; it is required exactly when `{}` is refused.
        let mut required = vec!["action", "context_id"];
        if action.validate(&json!({})).is_err() {
            required.push("payload");
        }
        schemas.insert(
            branch,
            json!({
                "type": "object",
                "title": name,
                "description": action.description,
                "properties": {
                    "action": { "type": "string", "const": name },
                    "context_id": { "$ref": "#/components/schemas/ContextId" },
                    "payload": payload
                },
                "required": required,
                "additionalProperties": false
            }),
        );
        branches.push(json!({ "$ref": branch_ref }));
        mapping.insert(name.to_owned(), Value::String(branch_ref));
    }
    schemas.insert(
        "ProcessBody".to_owned(),
        json!({
            "description": "A request for one of the loaded policy's runnable actions.",
            "oneOf": branches,
            "discriminator": { "propertyName": "action", "mapping": mapping }
        }),
    );
    schemas
}

/// The schema of an action's payload: a reference to `Payload.<action>` (its own schema, with local
/// `$ref`s re-rooted there), or any object for an action without a schema. The turnstile takes only
/// objects, so a schema that does not say `type: object` is narrowed to one.
fn payload_schema(action: &Action, schemas: &mut Map<String, Value>) -> Value {
    let Some(schema) = &action.input_schema else {
        return json!({ "type": "object" });
    };
    let component = format!("Payload.{}", action.name.as_str());
    let mut schema = schema.clone();
    if let Some(obj) = schema.as_object_mut() {
        // The document's dialect is OpenAPI's (2020-12); a `$schema` belongs to a root, not here.
        obj.remove("$schema");
        if !obj.contains_key("$id") {
            reroot_refs(&mut schema, &format!("#/components/schemas/{component}"));
        }
    }
    let is_object = schema.get("type") == Some(&json!("object"));
    schemas.insert(component.clone(), schema);
    let reference = json!({ "$ref": format!("#/components/schemas/{component}") });
    if is_object {
        reference
    } else {
        json!({ "type": "object", "allOf": [reference] })
    }
}

/// Rewrites `$ref`s local to the action's schema file (`#/$defs/x`) so they resolve where the schema
/// now sits in the document (`#/components/schemas/Payload.a/$defs/x`).
fn reroot_refs(value: &mut Value, root: &str) {
    match value {
        Value::Object(obj) => {
            for (key, child) in obj.iter_mut() {
                match child {
                    Value::String(target) if key == "$ref" && target.starts_with('#') => {
                        *target = format!("{root}{}", &target[1..]);
                    }
                    _ => reroot_refs(child, root),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|v| reroot_refs(v, root)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_refs_are_rerooted_and_others_left_alone() {
        let mut schema = json!({
            "$defs": { "d": { "type": "string" } },
            "properties": {
                "a": { "$ref": "#/$defs/d" },
                "b": { "items": [{ "$ref": "#" }] },
                "c": { "$ref": "https://example.org/s.json" }
            }
        });
        reroot_refs(&mut schema, "#/components/schemas/Payload.x");
        assert_eq!(
            schema["properties"]["a"]["$ref"],
            "#/components/schemas/Payload.x/$defs/d"
        );
        assert_eq!(
            schema["properties"]["b"]["items"][0]["$ref"],
            "#/components/schemas/Payload.x"
        );
        assert_eq!(
            schema["properties"]["c"]["$ref"],
            "https://example.org/s.json"
        );
    }

    #[test]
    fn a_route_status_the_front_door_shares_keeps_both_bodies() {
        let mut response = json!({
            "description": "dependency down",
            "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Readiness" } } }
        });
        let obj = response.as_object_mut().unwrap();
        widen_response(obj, "TOO_MANY_CONNECTIONS");
        widen_response(obj, "TOO_MANY_CONNECTIONS");
        assert_eq!(
            response["description"],
            "dependency down; or TOO_MANY_CONNECTIONS"
        );
        assert_eq!(
            response["content"]["application/json"]["schema"]["oneOf"],
            json!([{ "$ref": "#/components/schemas/Readiness" }, error_ref()])
        );
    }
}
