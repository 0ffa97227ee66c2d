//! HTTP routes. Handlers are thin: extract, call one service function, map the result.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{ConnectInfo, MatchedPath, Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde::Serialize;
use serde_json::{Value, json};
use tower_http::catch_panic::CatchPanicLayer;
use utoipa::{OpenApi, ToSchema};

use crate::app::App;
use crate::audit::timestamp;
use crate::domain::TraceId;
use crate::error::{ApiError, ErrorBody};
use crate::gates::trace;
use crate::turnstile::{self, ActionResult, Incoming};

/// The body of `POST /process` (parsed by the input gate, described here for OpenAPI).
#[derive(Debug, Serialize, ToSchema)]
pub struct ProcessBody {
    /// An action defined in the policy, e.g. `echo`.
    pub action: String,
    /// A context defined in the policy, e.g. `work`.
    pub context_id: String,
    /// Validated against the action's JSON Schema.
    #[schema(value_type = Object)]
    pub payload: Value,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    pub status: &'static str,
    pub version: &'static str,
    pub timestamp: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Readiness {
    /// `ready` or `unavailable`.
    pub status: &'static str,
    /// `ok` or the failure, per dependency (`database`, `audit`).
    #[schema(value_type = Object)]
    pub checks: Value,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Catraca",
        description = "A governed agent gateway: gates, executors and a hash-chained audit trail."
    ),
    paths(process_action, health, ready, metrics, get_trace, openapi_json),
    components(schemas(ProcessBody, ActionResult, ErrorBody, Health, Readiness))
)]
struct ApiDoc;

/// The OpenAPI 3.1 description, generated from the handlers and types.
pub fn openapi() -> utoipa::openapi::OpenApi {
    let mut doc = ApiDoc::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_owned();
    doc
}

pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/process", post(process_action))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/v1/audit/traces/{trace_id}", get(get_trace))
        .route("/openapi.json", get(openapi_json))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(app.clone(), observe))
        .layer(CatchPanicLayer::custom(panic_response))
        .with_state(app)
}

/// G0 and request metrics: every response carries `X-Trace-Id` and is counted by route template.
async fn observe(State(app): State<Arc<App>>, mut req: Request, next: Next) -> Response {
    let started = Instant::now();
    let trace_id = trace::trace_id_of(req.headers());
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| match p.as_str() {
            "/process" => "/process",
            "/health" => "/health",
            "/ready" => "/ready",
            "/metrics" => "/metrics",
            "/v1/audit/traces/{trace_id}" => "/v1/audit/traces/{trace_id}",
            "/openapi.json" => "/openapi.json",
            _ => "other",
        });
    let method = match *req.method() {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::HEAD => "HEAD",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        _ => "other",
    };
    req.extensions_mut().insert(trace_id.clone());
    let mut response = next.run(req).await;
    if let Ok(v) = HeaderValue::from_str(trace_id.as_str()) {
        response.headers_mut().insert(trace::X_TRACE_ID, v);
    }
    app.metrics
        .requests_total
        .with_label_values(&[route, method, response.status().as_str()])
        .inc();
    app.metrics
        .request_duration
        .with_label_values(&[route])
        .observe(started.elapsed().as_secs_f64());
    response
}

fn panic_response(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    tracing::error!("a handler panicked; answering 500");
    ApiError::internal("handler panicked", None).into_response()
}

async fn not_found(Extension(trace_id): Extension<TraceId>) -> ApiError {
    ApiError::NotFound {
        message: "no such route; see /openapi.json".to_owned(),
        trace_id: Some(trace_id),
    }
}

/// Runs an action through the gates and its executor.
#[utoipa::path(
    post,
    path = "/process",
    request_body = ProcessBody,
    params(
        ("X-API-Key" = Option<String>, Header, description = "API key ck_<key_id>_<secret> (or Authorization: Bearer)"),
        ("traceparent" = Option<String>, Header, description = "W3C trace context; its trace id is used"),
        ("X-Trace-Id" = Option<String>, Header, description = "Client trace id when no traceparent")
    ),
    responses(
        (status = 200, description = "Executed", body = ActionResult),
        (status = 400, description = "INPUT_MALFORMED_JSON, ACTION_UNKNOWN, CONTEXT_UNKNOWN", body = ErrorBody),
        (status = 401, description = "AUTH_MISSING_KEY, AUTH_INVALID_KEY, AUTH_KEY_REVOKED, AUTH_KEY_EXPIRED", body = ErrorBody),
        (status = 403, description = "NO_MATCHING_RULE, ACTION_FORBIDDEN, CONTEXT_FORBIDDEN, POLICY_EVAL_ERROR or a rule's code", body = ErrorBody),
        (status = 413, description = "INPUT_TOO_LARGE", body = ErrorBody),
        (status = 422, description = "INPUT_SCHEMA_INVALID, with violations", body = ErrorBody),
        (status = 429, description = "RATE_LIMITED, with Retry-After", body = ErrorBody),
        (status = 502, description = "EXECUTOR_FAILED", body = ErrorBody),
        (status = 503, description = "AUDIT_UNAVAILABLE or RATE_LIMIT_UNAVAILABLE", body = ErrorBody),
        (status = 504, description = "EXECUTOR_TIMEOUT", body = ErrorBody)
    )
)]
async fn process_action(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Extension(trace_id): Extension<TraceId>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<ActionResult>, ApiError> {
    let incoming = Incoming {
        trace_id,
        headers,
        client: peer.ip(),
        body,
    };
    turnstile::process(&app, incoming).await.map(Json)
}

/// Liveness.
#[utoipa::path(get, path = "/health", responses((status = 200, body = Health)))]
async fn health() -> Json<Health> {
    Json(Health {
        status: "ok",
        version: env!("CARGO_PKG_VERSION"),
        timestamp: timestamp(time::OffsetDateTime::now_utc()),
    })
}

/// Readiness: the database answers and the audit writer can write right now.
#[utoipa::path(get, path = "/ready", responses(
    (status = 200, body = Readiness),
    (status = 503, body = Readiness)
))]
async fn ready(State(app): State<Arc<App>>) -> (StatusCode, Json<Readiness>) {
    let database = app.store.ping().await.map_err(|e| e.to_string());
    let audit = app.audit.probe().await.map_err(|e| e.to_string());
    let ok = database.is_ok() && audit.is_ok();
    let show = |r: Result<(), String>| r.err().unwrap_or_else(|| "ok".to_owned());
    let body = Readiness {
        status: if ok { "ready" } else { "unavailable" },
        checks: json!({ "database": show(database), "audit": show(audit) }),
    };
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body))
}

/// Prometheus text format.
#[utoipa::path(get, path = "/metrics", responses((status = 200, content_type = "text/plain")))]
async fn metrics(State(app): State<Arc<App>>) -> Result<Response, ApiError> {
    let text = app
        .metrics
        .render()
        .map_err(|e| ApiError::internal(e, None))?;
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        text,
    )
        .into_response())
}

/// Events of one request, in chain order; needs a key whose role may `audit.read`.
#[utoipa::path(
    get,
    path = "/v1/audit/traces/{trace_id}",
    params(("trace_id" = String, Path, description = "The request's trace id")),
    responses(
        (status = 200, description = "The events, in chain order", body = Object),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody)
    )
)]
async fn get_trace(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Extension(trace_id): Extension<TraceId>,
    Path(wanted): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    crate::audit_read::trace_events(&app, &trace_id, &headers, peer.ip(), &wanted)
        .await
        .map(Json)
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", responses((status = 200, body = Object)))]
async fn openapi_json() -> Json<utoipa::openapi::OpenApi> {
    Json(openapi())
}
