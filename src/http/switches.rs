//! The kill switch over HTTP: `POST /v1/executors/{name}/disable` (body `{"reason": "..."}`) and
//! `POST /v1/executors/{name}/enable`, for keys whose role the policy allows `executors.switch` (the
//! example policy: `admin`). The same switch as `catraca executors disable|enable`: audited as
//! EXECUTOR_SWITCHED (actor `key:<key_id>`, under the request's trace id) before it is stored, honoured
//! by every gateway within the watch bound.

use std::net::IpAddr;
use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;

use super::front_door::{Client, PathParam};
use crate::app::App;
use crate::domain::TraceId;
use crate::error::ApiError;
use crate::executors::switches;
use crate::reason::ReasonCode;
use crate::turnstile;
use crate::watch::STALE_AFTER_REFRESHES;

/// The permission-only action that governs switching.
const SWITCH_ACTION: &str = "executors.switch";
/// Largest body read: a reason, not a document.
const MAX_BODY: usize = 16 * 1024;

/// The body of a change that must say why (disabling an executor, revoking a key). Describes the body
/// in the OpenAPI document; [`reason_of`] reads it, with a message for each way it can be wrong.
#[derive(Debug, ToSchema)]
#[expect(
    dead_code,
    reason = "a schema for the document; the body is read by reason_of"
)]
pub struct ReasonBody {
    /// Why; at least one character that is not a space, at most 500.
    #[schema(min_length = 1, max_length = 500, pattern = "\\S")]
    pub reason: String,
}

/// A switch made, and when every gateway honours it at the latest.
#[derive(Debug, Serialize, ToSchema)]
pub struct SwitchAnswer {
    pub executor: String,
    /// `disabled` or `enabled`.
    pub state: &'static str,
    pub changed_at: String,
    /// `key:<key_id>` of the key that asked.
    pub changed_by: String,
    pub reason: String,
    /// Every gateway refuses (or runs again) the executor's actions within this many milliseconds.
    pub bound_ms: u64,
    pub trace_id: String,
}

/// The reason in `{"reason": "..."}`; required to disable (and to revoke a key).
pub(super) async fn reason_of(
    body: Body,
    required: bool,
    trace_id: &TraceId,
) -> Result<String, ApiError> {
    let rejected = |message: String| ApiError::Rejected {
        reason: ReasonCode::MalformedRequest,
        message,
        trace_id: Some(trace_id.clone()),
    };
    let bytes = axum::body::to_bytes(body, MAX_BODY)
        .await
        .map_err(|_| rejected(format!("the body must be JSON of at most {MAX_BODY} bytes")))?;
    let reason = if bytes.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        match serde_json::from_slice::<Value>(&bytes) {
            Ok(Value::Object(map)) => match map.get("reason") {
                None | Some(Value::Null) => None,
                Some(Value::String(r)) => Some(r.trim().to_owned()),
                Some(_) => return Err(rejected("reason must be a string".into())),
            },
            _ => return Err(rejected(r#"the body must be {"reason": "..."}"#.into())),
        }
    };
    match reason.filter(|r| !r.is_empty()) {
        Some(r) if r.chars().count() <= 500 => Ok(r),
        Some(_) => Err(rejected("reason must be at most 500 characters".into())),
        None if required => Err(rejected("say why: {\"reason\": \"...\"}".into())),
        None => Ok("enabled".into()),
    }
}

async fn switch(
    app: &Arc<App>,
    trace_id: &TraceId,
    client: IpAddr,
    headers: &HeaderMap,
    name: &str,
    disabled: bool,
    body: Body,
) -> Result<Json<SwitchAnswer>, ApiError> {
    let reason = reason_of(body, disabled, trace_id).await?;
    let route = if disabled {
        "/v1/executors/{name}/disable"
    } else {
        "/v1/executors/{name}/enable"
    };
    let mut change =
        turnstile::authorize_change(app, trace_id, headers, client, route, SWITCH_ACTION).await?;
    if app.executors.get(name).is_none() {
        change.finish(app, StatusCode::NOT_FOUND).await?;
        return Err(ApiError::NotFound {
            message: format!("no executor named {name:?} is loaded"),
            trace_id: Some(trace_id.clone()),
        });
    }
    let actor = format!("key:{}", change.key.key_id);
    let made = switches::new_switch(name, disabled, &actor, &reason);
    change
        .record(app, || {
            vec![switches::switched_event(&made, Some(trace_id))]
        })
        .await?;
    if let Err(e) = app.store.set_executor_switch(&made).await {
        tracing::error!(error = %e, "executor switch recorded but not stored");
        change.finish(app, StatusCode::SERVICE_UNAVAILABLE).await?;
        return Err(ApiError::AuditUnavailable {
            trace_id: trace_id.clone(),
            decision_id: None,
            executed: false,
        });
    }
    change.finish(app, StatusCode::OK).await?;
    let bound = app.config.key_refresh * STALE_AFTER_REFRESHES;
    Ok(Json(SwitchAnswer {
        executor: made.executor,
        state: if disabled { "disabled" } else { "enabled" },
        changed_at: made.changed_at,
        changed_by: made.changed_by,
        reason: made.reason,
        bound_ms: u64::try_from(bound.as_millis()).unwrap_or(u64::MAX),
        trace_id: trace_id.to_string(),
    }))
}

/// Switch an executor off on every gateway; needs a key whose role may `executors.switch`.
#[utoipa::path(
    post,
    path = "/v1/executors/{name}/disable",
    security(("api_key" = []), ("bearer" = [])),
    params(("name" = String, Path, description = "A loaded executor's name")),
    request_body(content = ReasonBody, description = "Why (required)", content_type = "application/json"),
    responses(
        (status = 200, description = "Switched; every gateway refuses its actions within bound_ms", body = SwitchAnswer),
        (status = 400, description = "MALFORMED_REQUEST: the body is not {\"reason\": \"...\"} or the path cannot be read", body = crate::error::ErrorBody),
        (status = 401, description = "AUTH_MISSING_KEY, AUTH_INVALID_KEY, AUTH_KEY_REVOKED, AUTH_KEY_EXPIRED", body = crate::error::ErrorBody),
        (status = 403, description = "The key's role may not executors.switch", body = crate::error::ErrorBody),
        (status = 404, description = "NOT_FOUND: no executor of that name is loaded", body = crate::error::ErrorBody),
        (status = 429, description = "RATE_LIMITED: the key's quota, or too many failed keys from this address", body = crate::error::ErrorBody),
        (status = 503, description = "AUDIT_UNAVAILABLE or RATE_LIMIT_UNAVAILABLE", body = crate::error::ErrorBody)
    )
)]
pub(super) async fn disable(
    State(app): State<Arc<App>>,
    Client(client): Client,
    axum::Extension(trace_id): axum::Extension<TraceId>,
    PathParam(name): PathParam<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<SwitchAnswer>, ApiError> {
    switch(&app, &trace_id, client, &headers, &name, true, body).await
}

/// Switch an executor on again; needs a key whose role may `executors.switch`.
#[utoipa::path(
    post,
    path = "/v1/executors/{name}/enable",
    security(("api_key" = []), ("bearer" = [])),
    params(("name" = String, Path, description = "A loaded executor's name")),
    request_body(content = Object, description = r#"{"reason": "why"} (optional)"#, content_type = "application/json"),
    responses(
        (status = 200, description = "Switched; every gateway runs its actions again within bound_ms", body = SwitchAnswer),
        (status = 400, description = "MALFORMED_REQUEST: the body is not {\"reason\": \"...\"} or the path cannot be read", body = crate::error::ErrorBody),
        (status = 401, description = "AUTH_MISSING_KEY, AUTH_INVALID_KEY, AUTH_KEY_REVOKED, AUTH_KEY_EXPIRED", body = crate::error::ErrorBody),
        (status = 403, description = "The key's role may not executors.switch", body = crate::error::ErrorBody),
        (status = 404, description = "NOT_FOUND: no executor of that name is loaded", body = crate::error::ErrorBody),
        (status = 429, description = "RATE_LIMITED: the key's quota, or too many failed keys from this address", body = crate::error::ErrorBody),
        (status = 503, description = "AUDIT_UNAVAILABLE or RATE_LIMIT_UNAVAILABLE", body = crate::error::ErrorBody)
    )
)]
pub(super) async fn enable(
    State(app): State<Arc<App>>,
    Client(client): Client,
    axum::Extension(trace_id): axum::Extension<TraceId>,
    PathParam(name): PathParam<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<SwitchAnswer>, ApiError> {
    switch(&app, &trace_id, client, &headers, &name, false, body).await
}
