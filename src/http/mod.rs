//! HTTP routes. Handlers are thin: extract, call one service function, map the result. Refusals of the
//! request itself live in [`front_door`]; the OpenAPI document in [`openapi`].

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use opentelemetry::KeyValue;
use serde::Serialize;
use serde_json::{Value, json};
use tower_http::catch_panic::CatchPanicLayer;
use tracing::Instrument as _;
use utoipa::ToSchema;

use crate::app::App;
use crate::audit::timestamp;
use crate::domain::TraceId;
use crate::error::{ApiError, ErrorBody};
use crate::gates::trace;
use crate::telemetry;
use crate::turnstile::{self, ActionResult, Incoming};
use front_door::Client;

mod audit;
mod console;
mod front_door;
mod keys;
mod mcp;
mod openai;
pub mod openapi;
mod switches;

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
    /// `ok` or the failure, per dependency (`database`, `audit`, `rate_limiter`).
    #[schema(value_type = Object)]
    pub checks: Value,
    /// The revision of the policy in force (SHA-256 of its files), as in every decision: a fleet whose
    /// instances all report the same one decides by the same rules.
    pub policy_revision: String,
}

pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/process", post(process_action))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/v1/audit/traces/{trace_id}", get(audit::get_trace))
        .route("/v1/audit/decisions", get(audit::decisions))
        .route("/v1/audit/chains", get(audit::chains))
        .route("/v1/audit/proofs/{decision_id}", get(audit::decision_proof))
        .route("/v1/audit/public-key", get(audit::public_key))
        .route("/v1/executors/{name}/disable", post(switches::disable))
        .route("/v1/executors/{name}/enable", post(switches::enable))
        .route("/v1/keys", get(keys::list).post(keys::create))
        .route("/v1/keys/{key_id}/revoke", post(keys::revoke))
        .route("/v1/keys/{key_id}/rotate", post(keys::rotate))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/models", get(openai::models))
        .route("/console", get(console::index))
        .route("/console/{file}", get(console::file))
        .route("/openapi.json", get(openapi_json))
        .merge(mcp::router(app.clone()))
        .fallback(front_door::not_found)
        // After every route: it applies to the routes registered before it.
        .method_not_allowed_fallback(front_door::method_not_allowed)
        .layer(middleware::from_fn(front_door::limit_headers))
        // Inside `observe`, so that a panic's answer is completed with the trace id like any other.
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(middleware::from_fn_with_state(app.clone(), observe))
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
            "/v1/audit/decisions" => "/v1/audit/decisions",
            "/v1/audit/chains" => "/v1/audit/chains",
            "/v1/audit/proofs/{decision_id}" => "/v1/audit/proofs/{decision_id}",
            "/v1/audit/public-key" => "/v1/audit/public-key",
            "/v1/executors/{name}/disable" => "/v1/executors/{name}/disable",
            "/v1/executors/{name}/enable" => "/v1/executors/{name}/enable",
            "/v1/keys" => "/v1/keys",
            "/v1/keys/{key_id}/revoke" => "/v1/keys/{key_id}/revoke",
            "/v1/keys/{key_id}/rotate" => "/v1/keys/{key_id}/rotate",
            "/v1/chat/completions" => "/v1/chat/completions",
            "/v1/models" => "/v1/models",
            "/mcp" => "/mcp",
            "/console" => "/console",
            "/console/{file}" => "/console/{file}",
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
    // Probes and scrapes log nothing and are not traced: they would bury the requests in spans, and
    // a log span costs a few hundred nanoseconds of a /health answer's few microseconds.
    let probe = matches!(route, "/health" | "/ready" | "/metrics");
    // Every log line written while serving the request carries its trace id: the span is at ERROR
    // level so that no log filter that lets a line through drops the span (at INFO, `CATRACA_LOG=warn`
    // wrote the request's warnings without it).
    let span = if probe {
        tracing::Span::none()
    } else {
        tracing::error_span!("request", trace_id = trace_id.as_str())
    };
    let traced = app.telemetry.as_ref().filter(|_| !probe).map(|t| {
        let traceparent = req
            .headers()
            .get(trace::TRACEPARENT)
            .and_then(|v| v.to_str().ok());
        (t, t.start(&trace_id, traceparent))
    });
    let mut response = match &traced {
        None => next.run(req).instrument(span).await,
        Some((_, current)) => {
            telemetry::within(Some(current.clone()), next.run(req).instrument(span)).await
        }
    };
    if response.extensions().get::<Panicked>().is_some() {
        response = ApiError::internal("a handler panicked", Some(&trace_id)).into_response();
    }
    if let Ok(v) = HeaderValue::from_str(trace_id.as_str()) {
        response.headers_mut().insert(trace::X_TRACE_ID, v);
    }
    if let Some((telemetry, current)) = &traced {
        let attributes = vec![
            KeyValue::new("http.request.method", method),
            KeyValue::new("http.route", route),
        ];
        let status = response.status().as_u16();
        telemetry.finish(current, format!("{method} {route}"), attributes, status);
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

/// Marks the answer to a panic, which `observe` replaces with the error body carrying the trace id.
#[derive(Debug, Clone, Copy)]
struct Panicked;

fn panic_response(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let mut response = StatusCode::INTERNAL_SERVER_ERROR.into_response();
    response.extensions_mut().insert(Panicked);
    response
}

/// Runs an action through the gates and its executor.
#[utoipa::path(
    post,
    path = "/process",
    security(("api_key" = []), ("bearer" = [])),
    params(
        ("traceparent" = Option<String>, Header, nullable = false, description = "W3C trace context; its trace id is used when well-formed"),
        ("X-Trace-Id" = Option<String>, Header, nullable = false, description = "The client's trace id (8 to 64 of A-Z a-z 0-9 . _ -), used when there is no well-formed traceparent; anything else is replaced")
    ),
    responses(
        (status = 200, description = "Executed", body = ActionResult),
        (status = 400, description = "INPUT_MALFORMED_JSON (including a duplicate key), ACTION_UNKNOWN, CONTEXT_UNKNOWN", body = ErrorBody),
        (status = 401, description = "AUTH_MISSING_KEY, AUTH_INVALID_KEY, AUTH_KEY_REVOKED, AUTH_KEY_EXPIRED", body = ErrorBody),
        (status = 403, description = "NO_MATCHING_RULE, ACTION_FORBIDDEN, CONTEXT_FORBIDDEN, POLICY_EVAL_ERROR, STEP_DEPTH_EXCEEDED or a deny rule's own code", body = ErrorBody),
        (status = 408, description = "INPUT_TIMEOUT: the body did not arrive within http_body_timeout_secs", body = ErrorBody),
        (status = 413, description = "INPUT_TOO_LARGE", body = ErrorBody),
        (status = 415, description = "INPUT_UNSUPPORTED_MEDIA_TYPE: a Content-Type other than application/json", body = ErrorBody),
        (status = 422, description = "INPUT_SCHEMA_INVALID, with violations", body = ErrorBody),
        (status = 429, description = "RATE_LIMITED: the key's quota, or too many failed keys from this address", body = ErrorBody),
        (status = 502, description = "EXECUTOR_FAILED", body = ErrorBody),
        (status = 503, description = "AUDIT_UNAVAILABLE, RATE_LIMIT_UNAVAILABLE, EXECUTOR_DISABLED (the action's executor is switched off), or TOO_MANY_CONNECTIONS (any route, at the connection cap)", body = ErrorBody),
        (status = 504, description = "EXECUTOR_TIMEOUT", body = ErrorBody)
    )
)]
async fn process_action(
    State(app): State<Arc<App>>,
    Client(client): Client,
    Extension(trace_id): Extension<TraceId>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<ActionResult>, ApiError> {
    let incoming = Incoming {
        trace_id,
        headers,
        client,
        body,
    };
    // Boxed: the turnstile's future is large, and axum boxes this handler's future again.
    Box::pin(turnstile::process(&app, incoming)).await.map(Json)
}

/// Liveness.
#[utoipa::path(get, path = "/health", responses((status = 200, description = "The process is up", body = Health)))]
async fn health() -> Json<Health> {
    Json(Health {
        status: "ok",
        version: env!("CARGO_PKG_VERSION"),
        timestamp: timestamp(time::OffsetDateTime::now_utc()),
    })
}

/// Readiness: the database answers, the audit writer can write right now, and the rate limiter can
/// decide (or fails open).
#[utoipa::path(get, path = "/ready", responses(
    (status = 200, description = "Every dependency answers", body = Readiness),
    (status = 503, description = "A dependency does not answer; `checks` names it", body = Readiness)
))]
async fn ready(State(app): State<Arc<App>>) -> (StatusCode, Json<Readiness>) {
    let database = app.store.ping().await.map_err(|e| e.to_string());
    let audit = app.audit.probe().await.map_err(|e| e.to_string());
    let limiter = app.limiter.probe().await.map_err(|e| e.to_string());
    // A limiter failing open still serves every request; failing closed, it refuses them all.
    let ok =
        database.is_ok() && audit.is_ok() && (limiter.is_ok() || app.config.rate_limit_fail_open);
    let show = |r: Result<(), String>| r.err().unwrap_or_else(|| "ok".to_owned());
    let limiter = match limiter {
        Err(e) if app.config.rate_limit_fail_open => format!("{e} (failing open)"),
        other => show(other),
    };
    let body = Readiness {
        status: if ok { "ready" } else { "unavailable" },
        checks: json!({ "database": show(database), "audit": show(audit), "rate_limiter": limiter }),
        policy_revision: app.policy().revision.clone(),
    };
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body))
}

/// Prometheus text format.
#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
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

/// This document, for the policy in force.
#[utoipa::path(get, path = "/openapi.json", responses((status = 200, description = "OpenAPI 3.1", body = Object)))]
async fn openapi_json(
    State(app): State<Arc<App>>,
    Extension(trace_id): Extension<TraceId>,
) -> Result<Json<Value>, ApiError> {
    openapi::document(&app.policy())
        .map(Json)
        .map_err(|e| ApiError::internal(e, Some(&trace_id)))
}
