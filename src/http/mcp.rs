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

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
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
use super::openai::CONTEXT_HEADER;
use crate::app::App;
use crate::domain::TraceId;
use crate::error::ApiError;
use crate::reason::ReasonCode;
use crate::turnstile::{ActionResult, Channel, Door, admit, recognize};

/// The route, as REQUEST_START records it.
const ROUTE: &str = "/mcp";
/// Longest SDK refusal text kept in the error body.
const MAX_SDK_MESSAGE: usize = 200;
/// Longest tool name kept in REQUEST_START (an unknown one is the client's text).
const MAX_TOOL_NAME: usize = 128;

/// The `/mcp` route: the SDK's Streamable HTTP server behind the gateway's key check.
pub fn router(app: Arc<App>) -> Router<Arc<App>> {
    let config = StreamableHttpServerConfig::default()
        .with_legacy_session_mode(false)
        .with_json_response(true)
        .with_max_request_body_bytes(app.config.body_limit_bytes)
        // Every request needs a bearer key, which a rebound page cannot send; the Host a deployment
        // is reached by (behind a proxy, by any name) is not the SDK's to police.
        .disable_allowed_hosts();
    let handler_app = app.clone();
    let sdk = StreamableHttpService::new(
        move || {
            Ok(Gateway {
                app: handler_app.clone(),
            })
        },
        Arc::new(NeverSessionManager::default()),
        config,
    );
    Router::new()
        .route_service(ROUTE, sdk)
        .layer(middleware::from_fn_with_state(app, guard))
}

/// Checks the key of every request before the SDK reads it, hands the client's address to the tool
/// handlers, and gives the SDK's own refusals the gateway's error body.
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
    if let Err(e) = recognize(&app, door).await {
        return e.into_response();
    }
    request.extensions_mut().insert(client);
    let response = next.run(request).await;
    sdk_refusal(response, &trace_id).await
}

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

/// The MCP server's handler: one per request (the server is stateless), sharing the gateway.
#[derive(Clone)]
struct Gateway {
    app: Arc<App>,
}

/// What a tool handler knows of the HTTP request that carried the message.
struct Carrier {
    trace_id: TraceId,
    headers: HeaderMap,
    client: std::net::IpAddr,
}

fn carrier(ctx: &RequestContext<RoleServer>) -> Result<Carrier, ErrorData> {
    let parts = ctx
        .extensions
        .get::<Parts>()
        .ok_or_else(|| ErrorData::internal_error("the HTTP request is missing", None))?;
    let trace_id = parts
        .extensions
        .get::<TraceId>()
        .cloned()
        .ok_or_else(|| ErrorData::internal_error("the request has no trace id", None))?;
    let client = parts
        .extensions
        .get::<Client>()
        .ok_or_else(|| ErrorData::internal_error("the request has no client address", None))?;
    Ok(Carrier {
        trace_id,
        headers: parts.headers.clone(),
        client: client.0,
    })
}

/// A refusal before any tool ran, as a JSON-RPC error (for `tools/list`).
fn protocol_refusal(e: ApiError) -> ErrorData {
    let (head, body) = e.answer();
    let data = json!({
        "status": head.status.as_u16(),
        "reason_codes": body.reason_codes,
        "trace_id": body.trace_id,
        "decision_id": body.decision_id,
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
    result.meta = Some(MetaObject(meta));
    result
}

impl Gateway {
    async fn list(&self, carrier: Carrier) -> Result<Vec<Tool>, ApiError> {
        let asked = carrier
            .headers
            .get(CONTEXT_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let door = Door::new(
            carrier.trace_id,
            carrier.headers,
            carrier.client,
            Channel::Mcp,
            "POST",
            ROUTE,
        )
        .with_detail("mcp_method", Value::from("tools/list"));
        let admitted = admit(&self.app, door).await?;
        let listed = admitted
            .context(asked.as_deref())
            .and_then(|context| Ok((admitted.runnable(&context, |_| true)?, context)));
        let (actions, context) = match listed {
            Ok(listed) => listed,
            Err(refusal) => return Err(admitted.refuse_input(refusal).await),
        };
        admitted.record_listing(&context).await?;
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
        app: Arc<App>,
        carrier: Carrier,
        tool: String,
        request_id: Value,
        arguments: Option<JsonObject>,
    ) -> Result<ActionResult, ApiError> {
        let asked = carrier
            .headers
            .get(CONTEXT_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let door = Door::new(
            carrier.trace_id,
            carrier.headers,
            carrier.client,
            Channel::Mcp,
            "POST",
            ROUTE,
        )
        .with_detail("mcp_method", Value::from("tools/call"))
        .with_detail(
            "tool",
            Value::from(tool.chars().take(MAX_TOOL_NAME).collect::<String>()),
        )
        .with_detail("request_id", request_id);
        let admitted = admit(&app, door).await?;
        let context = match admitted.context(asked.as_deref()) {
            Ok(context) => context,
            Err(refusal) => return Err(admitted.refuse_input(refusal).await),
        };
        let payload = Value::Object(arguments.unwrap_or_default());
        let allowed = admitted.authorize(&tool, &context, payload).await?;
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
        let carrier = carrier(&ctx)?;
        let tools = self.list(carrier).await.map_err(protocol_refusal)?;
        Ok(ListToolsResult::with_all_items(tools))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let carrier = carrier(&ctx)?;
        let request_id = serde_json::to_value(&ctx.id).unwrap_or(Value::Null);
        // In a task of its own: a client that goes away does not cut the story between its ALLOW
        // and its outcome.
        let run = tokio::spawn(Self::call(
            self.app.clone(),
            carrier,
            request.name.to_string(),
            request_id,
            request.arguments,
        ));
        let result = match run.await {
            Ok(Ok(done)) => tool_result(done),
            Ok(Err(e)) => tool_error(e),
            Err(join) => tool_error(ApiError::internal(
                format!("the tool call stopped unexpectedly: {join}"),
                None,
            )),
        };
        Ok(result.into())
    }
}
