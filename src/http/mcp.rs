//! The MCP server at `/mcp` (Streamable HTTP, by the official Rust SDK `rmcp`): every action a key may
//! run in its context is a tool, and every tool call goes through the turnstile like `/process`.
//!
//! * **Stateless.** Each POST carries its key and is answered on its own (JSON responses); the server
//!   keeps no session, so no client can hold memory here by opening sessions and leaving them idle (the
//!   protocol's 2026-07-28 revision drops sessions altogether). GET and DELETE are answered 405.
//! * **Authentication** by the same bearer key, checked on every POST before the SDK reads the message
//!   (a refusal is the usual 401 body, recorded); `tools/list` and `tools/call` then pass G1 and G2
//!   like any request, with `channel: "mcp"`, the MCP method, the tool and the request id in
//!   REQUEST_START.
//! * **`tools/list`** is exactly the actions with an executor that the key may run in its context
//!   (`X-Catraca-Context`, else the key's only one), each with its description and JSON Schema.
//! * **`tools/call`** runs G3 (the action's schema), G4 and the executor. A refusal or an executor's
//!   failure is a tool result with `isError: true` whose text names the reason codes and the trace id,
//!   not a protocol error, so an agent can read why and carry on.
//! * The SDK's own refusals of the request itself (no `Accept` for JSON and events, a body over the
//!   limit, a body that is not JSON) are given the gateway's JSON error body and reason code.

use std::sync::{Arc, Mutex};

use axum::extract::{Request, State};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json, Router};
use http_body_util::BodyExt as _;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, Implementation,
    JsonObject, ListToolsResult, MetaObject, PaginatedRequestParams, ServerCapabilities,
    ServerConfig, Tool,
};
use rmcp::service::RequestContext;
use rmcp::transport::streamable_http_server::session::never::NeverSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{ErrorData, RoleServer, ServerHandler};
use serde_json::{Map, Value, json};

use super::front_door::Client;
use super::openai::asked_context;
use crate::app::App;
use crate::domain::TraceId;
use crate::error::ApiError;
use crate::reason::ReasonCode;
use crate::turnstile::{ActionResult, Admitted, Channel, Door, admit};

/// The route, as REQUEST_START records it.
const ROUTE: &str = "/mcp";
/// Longest SDK refusal text kept in the error body.
const MAX_SDK_MESSAGE: usize = 200;
/// Longest client text (a tool name, a request id) kept in REQUEST_START.
const MAX_CLIENT_TEXT: usize = 128;

/// The `/mcp` route: the SDK's Streamable HTTP server behind the gateway's key check.
pub fn router(app: Arc<App>) -> Router<Arc<App>> {
    let config = StreamableHttpServerConfig::default()
        .with_legacy_session_mode(false)
        .with_json_response(true)
        .with_max_request_body_bytes(app.config.body_limit_bytes)
        // Every request needs a bearer key, which a rebound page cannot send; the Host a deployment
        // is reached by (behind a proxy, by any name) is not the SDK's to police.
        .disable_allowed_hosts();
    let sdk = StreamableHttpService::new(
        || Ok(Gateway),
        Arc::new(NeverSessionManager::default()),
        config,
    );
    Router::new()
        .route_service(ROUTE, sdk)
        .layer(middleware::from_fn_with_state(app, guard))
}

/// Admits every request (G1 and G2, once per POST, a refusal recorded and answered with the usual
/// body) before the SDK reads it, hands the admission to the handler of the message it carries, and
/// gives the SDK's own refusals the gateway's error body.
async fn guard(
    State(app): State<Arc<App>>,
    client: Client,
    Extension(trace_id): Extension<TraceId>,
    mut request: Request,
    next: Next,
) -> Response {
    let method: &'static str = match *request.method() {
        axum::http::Method::POST => "POST",
        axum::http::Method::GET => "GET",
        axum::http::Method::DELETE => "DELETE",
        _ => "other",
    };
    let door = Door::new(
        trace_id.clone(),
        request.headers().clone(),
        client.0,
        Channel::Mcp,
        method,
        ROUTE,
    );
    match admit(&app, door).await {
        Ok(admitted) => {
            request
                .extensions_mut()
                .insert(Pending(Arc::new(Mutex::new(Some(admitted)))));
        }
        Err(e) => return e.into_response(),
    }
    let response = next.run(request).await;
    sdk_refusal(response, &trace_id).await
}

/// A request's admission (its key passed G1 and G2; nothing written yet), carried through the SDK to
/// the handler of its message. A handshake or a notification leaves it unused: nothing to record.
#[derive(Clone)]
struct Pending(Arc<Mutex<Option<Admitted>>>);

/// The SDK answers a request it cannot take (405, 406, 413, 415) in plain text; the gateway answers
/// every refusal with its JSON body and a reason code, keeping the SDK's status.
async fn sdk_refusal(response: Response, trace_id: &TraceId) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !status.is_client_error() || is_json {
        return response;
    }
    let reason = match status {
        StatusCode::METHOD_NOT_ALLOWED => ReasonCode::MethodNotAllowed,
        StatusCode::PAYLOAD_TOO_LARGE => ReasonCode::InputTooLarge,
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ReasonCode::InputUnsupportedMediaType,
        _ => ReasonCode::MalformedRequest,
    };
    let allow = response.headers().get(header::ALLOW).cloned();
    let text = match response.into_body().collect().await {
        Ok(body) => String::from_utf8_lossy(&body.to_bytes()).into_owned(),
        Err(_) => String::new(),
    };
    let message: String = text.trim().chars().take(MAX_SDK_MESSAGE).collect();
    let (mut head, body) = ApiError::Rejected {
        reason,
        message: format!("the MCP endpoint refused the request: {message}"),
        trace_id: Some(trace_id.clone()),
    }
    .answer();
    head.status = status;
    let mut response = head.respond(Json(body));
    if let Some(allow) = allow {
        response.headers_mut().insert(header::ALLOW, allow);
    }
    response
}

/// The MCP server's handler, one per request (the server is stateless): each message works on the
/// admission its request carries.
#[derive(Clone)]
struct Gateway;

/// The admission of the request that carried this message, and the context it asks for.
fn admission(ctx: &RequestContext<RoleServer>) -> Result<(Admitted, Option<String>), ErrorData> {
    let parts = ctx
        .extensions
        .get::<Parts>()
        .ok_or_else(|| ErrorData::internal_error("the HTTP request is missing", None))?;
    let admitted = parts
        .extensions
        .get::<Pending>()
        .and_then(|pending| pending.0.lock().ok()?.take())
        .ok_or_else(|| {
            ErrorData::invalid_request("one request per HTTP message: send each on its own", None)
        })?;
    Ok((admitted, asked_context(&parts.headers)))
}

/// What REQUEST_START says of an MCP message: its method and, for a call, the tool and request id
/// (both cut short: they are the client's text).
fn details(method: &str, tool: Option<&str>, request_id: Option<Value>) -> Map<String, Value> {
    let short = |text: &str| Value::from(text.chars().take(MAX_CLIENT_TEXT).collect::<String>());
    let mut details = Map::new();
    details.insert("mcp_method".into(), Value::from(method));
    if let Some(tool) = tool {
        details.insert("tool".into(), short(tool));
    }
    match request_id {
        Some(Value::String(id)) => {
            details.insert("request_id".into(), short(&id));
        }
        Some(id @ Value::Number(_)) => {
            details.insert("request_id".into(), id);
        }
        _ => {}
    }
    details
}

/// A refusal before any tool ran, as a JSON-RPC error (for `tools/list`).
fn protocol_refusal(e: ApiError) -> ErrorData {
    let (head, body) = e.answer();
    let data = json!({
        "status": head.status.as_u16(),
        "reason_codes": body.reason_codes,
        "trace_id": body.trace_id,
        "decision_id": body.decision_id,
        "receipt": body.receipt,
    });
    ErrorData::invalid_request(body.message, Some(data))
}

/// A refusal or failure as a tool result with `isError`: the text names the reason codes and the
/// trace id, `structuredContent` carries the gateway's error body.
fn tool_error(e: ApiError) -> CallToolResult {
    let (head, body) = e.answer();
    let codes: Vec<&str> = body.reason_codes.iter().map(ReasonCode::as_str).collect();
    let mut text = format!("{} ({}): {}", body.error, codes.join(", "), body.message);
    if let Some(trace_id) = &body.trace_id {
        text.push_str(&format!(" [trace_id {trace_id}]"));
    }
    let mut structured = serde_json::to_value(&body).unwrap_or(Value::Null);
    if let Value::Object(fields) = &mut structured {
        fields.insert("status".into(), Value::from(head.status.as_u16()));
    }
    let mut result = CallToolResult::error(vec![ContentBlock::text(text)]);
    result.structured_content = Some(structured);
    result
}

/// An executed tool's result: its JSON as text, as `structuredContent` when it is an object, and the
/// trail's ids under `_meta`.
fn tool_result(done: ActionResult) -> CallToolResult {
    let mut result = match done.result {
        Value::Object(_) => CallToolResult::structured(done.result),
        other => CallToolResult::success(vec![ContentBlock::text(other.to_string())]),
    };
    let mut meta = Map::new();
    meta.insert("io.catraca/trace_id".into(), Value::from(done.trace_id));
    meta.insert(
        "io.catraca/decision_id".into(),
        Value::from(done.decision_id),
    );
    meta.insert(
        "io.catraca/policy_revision".into(),
        Value::from(done.policy_revision),
    );
    meta.insert(
        "io.catraca/receipt".into(),
        serde_json::to_value(&done.receipt).unwrap_or(Value::Null),
    );
    result.meta = Some(MetaObject(meta));
    result
}

impl Gateway {
    async fn list(mut admitted: Admitted, asked: Option<String>) -> Result<Vec<Tool>, ApiError> {
        admitted.add_details(details("tools/list", None, None));
        let actions = admitted.list(asked.as_deref(), |_| true).await?;
        Ok(actions
            .iter()
            .map(|action| {
                let schema = match &action.input_schema {
                    Some(Value::Object(schema)) => schema.clone(),
                    _ => {
                        let mut any = JsonObject::new();
                        any.insert("type".into(), Value::from("object"));
                        any
                    }
                };
                Tool::new(
                    action.name.to_string(),
                    action.description.clone(),
                    Arc::new(schema),
                )
            })
            .collect())
    }

    async fn call(
        mut admitted: Admitted,
        asked: Option<String>,
        request: CallToolRequestParams,
        request_id: Value,
    ) -> Result<ActionResult, ApiError> {
        admitted.add_details(details("tools/call", Some(&request.name), Some(request_id)));
        let context = match admitted.context(asked.as_deref()) {
            Ok(context) => context,
            Err(refusal) => return Err(admitted.refuse_input(refusal).await),
        };
        let payload = Value::Object(request.arguments.unwrap_or_default());
        let allowed = admitted.authorize(&request.name, &context, payload).await?;
        // The story runs in a task of its own: a client that goes away cannot cut it.
        allowed.execute(None).await
    }
}

impl ServerHandler for Gateway {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("catraca", env!("CARGO_PKG_VERSION")))
            .with_instructions(
                "Catraca, a governed gateway: the tools are the actions your key may run in its \
                 context; every call passes the gateway's gates and is recorded in its audit trail. \
                 A refused or failed call is a tool error naming its reason codes and trace id.",
            )
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        let (admitted, asked) = admission(&ctx)?;
        let tools = Self::list(admitted, asked)
            .await
            .map_err(protocol_refusal)?;
        Ok(ListToolsResult::with_all_items(tools))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let (admitted, asked) = admission(&ctx)?;
        let request_id = serde_json::to_value(&ctx.id).unwrap_or(Value::Null);
        let result = match Self::call(admitted, asked, request, request_id).await {
            Ok(done) => tool_result(done),
            Err(e) => tool_error(e),
        };
        Ok(result.into())
    }
}
