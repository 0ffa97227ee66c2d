//! Reading the trail over HTTP, for keys whose role the policy allows `audit.read`: one request's
//! events, recent decisions and the chains' state. Each read is audited like any request; the work is
//! in `crate::audit_read`.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;
use serde_json::Value;

use super::front_door::{Client, PathParam, QueryParams};
use crate::app::App;
use crate::audit_read::{self, ChainsState, DecisionPage, DecisionQuery};
use crate::domain::TraceId;
use crate::error::{ApiError, ErrorBody};

/// Events of one request, in chain order, with the timeline `catraca audit trace` prints; needs a key
/// whose role may `audit.read`.
#[utoipa::path(
    get,
    path = "/v1/audit/traces/{trace_id}",
    security(("api_key" = []), ("bearer" = [])),
    params(("trace_id" = String, Path, description = "The request's trace id", pattern = "^[A-Za-z0-9._-]{8,64}$")),
    responses(
        (status = 200, description = "The events, in chain order, and their timeline as text", body = Object),
        (status = 400, description = "MALFORMED_REQUEST: the path cannot be read", body = ErrorBody),
        (status = 401, description = "AUTH_MISSING_KEY, AUTH_INVALID_KEY, AUTH_KEY_REVOKED, AUTH_KEY_EXPIRED", body = ErrorBody),
        (status = 403, description = "The key's role may not audit.read", body = ErrorBody),
        (status = 404, description = "NOT_FOUND: no events for this trace id", body = ErrorBody),
        (status = 429, description = "RATE_LIMITED: the key's quota, or too many failed keys from this address", body = ErrorBody),
        (status = 503, description = "AUDIT_UNAVAILABLE or RATE_LIMIT_UNAVAILABLE", body = ErrorBody)
    )
)]
pub(super) async fn get_trace(
    State(app): State<Arc<App>>,
    Client(client): Client,
    axum::Extension(trace_id): axum::Extension<TraceId>,
    PathParam(wanted): PathParam<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    audit_read::trace_events(&app, &trace_id, &headers, client, &wanted)
        .await
        .map(Json)
}

/// Recent decisions, newest first, filtered; a page examines at most 20 000 events and `next` goes on
/// from where it stopped. Needs a key whose role may `audit.read`.
#[utoipa::path(
    get,
    path = "/v1/audit/decisions",
    security(("api_key" = []), ("bearer" = [])),
    params(DecisionQuery),
    responses(
        (status = 200, description = "A page of decisions, newest first", body = DecisionPage),
        (status = 400, description = "MALFORMED_REQUEST: a parameter cannot be read, limit out of range or an unknown cursor", body = ErrorBody),
        (status = 401, description = "AUTH_MISSING_KEY, AUTH_INVALID_KEY, AUTH_KEY_REVOKED, AUTH_KEY_EXPIRED", body = ErrorBody),
        (status = 403, description = "The key's role may not audit.read", body = ErrorBody),
        (status = 429, description = "RATE_LIMITED: the key's quota, or too many failed keys from this address", body = ErrorBody),
        (status = 503, description = "AUDIT_UNAVAILABLE or RATE_LIMIT_UNAVAILABLE", body = ErrorBody)
    )
)]
pub(super) async fn decisions(
    State(app): State<Arc<App>>,
    Client(client): Client,
    axum::Extension(trace_id): axum::Extension<TraceId>,
    QueryParams(query): QueryParams<DecisionQuery>,
    headers: HeaderMap,
) -> Result<Json<DecisionPage>, ApiError> {
    audit_read::decisions(&app, &trace_id, &headers, client, &query)
        .await
        .map(Json)
}

/// The chains of the trail and what the last `catraca audit verify` found; needs a key whose role may
/// `audit.read`.
#[utoipa::path(
    get,
    path = "/v1/audit/chains",
    security(("api_key" = []), ("bearer" = [])),
    responses(
        (status = 200, description = "The chains, oldest first, and the last verification", body = ChainsState),
        (status = 401, description = "AUTH_MISSING_KEY, AUTH_INVALID_KEY, AUTH_KEY_REVOKED, AUTH_KEY_EXPIRED", body = ErrorBody),
        (status = 403, description = "The key's role may not audit.read", body = ErrorBody),
        (status = 429, description = "RATE_LIMITED: the key's quota, or too many failed keys from this address", body = ErrorBody),
        (status = 503, description = "AUDIT_UNAVAILABLE or RATE_LIMIT_UNAVAILABLE", body = ErrorBody)
    )
)]
pub(super) async fn chains(
    State(app): State<Arc<App>>,
    Client(client): Client,
    axum::Extension(trace_id): axum::Extension<TraceId>,
    headers: HeaderMap,
) -> Result<Json<ChainsState>, ApiError> {
    audit_read::chains(&app, &trace_id, &headers, client)
        .await
        .map(Json)
}
