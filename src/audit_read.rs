//! Reading the trail back: one request's events for `GET /v1/audit/traces/{trace_id}`.

use std::net::IpAddr;

use axum::http::HeaderMap;
use serde_json::{Value, json};

use crate::app::App;
use crate::domain::TraceId;
use crate::error::ApiError;
use crate::turnstile::authorize_permission;

/// The permission the policy must grant to read the trail.
pub const AUDIT_READ: &str = "audit.read";

/// Events of `wanted`, in chain order, for a caller allowed `audit.read`.
pub async fn trace_events(
    app: &App,
    trace_id: &TraceId,
    headers: &HeaderMap,
    client: IpAddr,
    wanted: &str,
) -> Result<Value, ApiError> {
    authorize_permission(
        app,
        trace_id,
        headers,
        client,
        "/v1/audit/traces/{trace_id}",
        AUDIT_READ,
    )
    .await?;
    let events = app
        .store
        .events_for_trace(wanted)
        .await
        .map_err(|e| ApiError::internal(e, Some(trace_id)))?;
    if events.is_empty() {
        return Err(ApiError::NotFound {
            message: "no audit events for this trace id".to_owned(),
            trace_id: Some(trace_id.clone()),
        });
    }
    Ok(json!({
        "trace_id": wanted,
        "events": events.iter().map(|e| e.to_json()).collect::<Vec<_>>(),
    }))
}
