//! Keys over HTTP, for keys whose role the policy allows `keys.manage` (the example policy: `admin`):
//! `GET /v1/keys` lists them (never a secret), `POST /v1/keys/{key_id}/revoke` (body
//! `{"reason": "..."}`) revokes one. The revocation is audited as KEY_REVOKED (actor `key:<key_id>`,
//! under the request's trace id) before it is stored, and every gateway refuses the key within the
//! revocation bound, as after `catraca keys revoke`.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use serde::Serialize;
use time::OffsetDateTime;
use utoipa::ToSchema;

use super::front_door::{Client, PathParam};
use super::switches::reason_of;
use crate::app::App;
use crate::audit::timestamp;
use crate::domain::{KeyId, TraceId};
use crate::error::{ApiError, ErrorBody};
use crate::keys::{self, KeyView};
use crate::turnstile;
use crate::watch::STALE_AFTER_REFRESHES;

/// The permission-only action that governs key management.
const KEYS_ACTION: &str = "keys.manage";

/// Every key, without secrets.
#[derive(Debug, Serialize, ToSchema)]
pub struct KeyList {
    #[schema(value_type = Vec<Object>)]
    pub keys: Vec<KeyView>,
}

/// A key revoked, and when every gateway refuses it at the latest.
#[derive(Debug, Serialize, ToSchema)]
pub struct Revoked {
    pub key_id: String,
    pub revoked_at: String,
    /// `key:<key_id>` of the key that asked.
    pub revoked_by: String,
    pub reason: String,
    /// Every gateway refuses the key within this many milliseconds.
    pub bound_ms: u64,
    pub trace_id: String,
}

/// Every key (active, expired and revoked), without secrets; needs a key whose role may `keys.manage`.
#[utoipa::path(
    get,
    path = "/v1/keys",
    security(("api_key" = []), ("bearer" = [])),
    responses(
        (status = 200, description = "The keys, without secrets", body = KeyList),
        (status = 401, description = "AUTH_MISSING_KEY, AUTH_INVALID_KEY, AUTH_KEY_REVOKED, AUTH_KEY_EXPIRED", body = ErrorBody),
        (status = 403, description = "The key's role may not keys.manage", body = ErrorBody),
        (status = 429, description = "RATE_LIMITED: the key's quota, or too many failed keys from this address", body = ErrorBody),
        (status = 503, description = "AUDIT_UNAVAILABLE or RATE_LIMIT_UNAVAILABLE", body = ErrorBody)
    )
)]
pub(super) async fn list(
    State(app): State<Arc<App>>,
    Client(client): Client,
    axum::Extension(trace_id): axum::Extension<TraceId>,
    headers: HeaderMap,
) -> Result<Json<KeyList>, ApiError> {
    turnstile::authorize_permission(&app, &trace_id, &headers, client, "/v1/keys", KEYS_ACTION)
        .await?;
    let records = app
        .store
        .list_keys()
        .await
        .map_err(|e| ApiError::internal(e, Some(&trace_id)))?;
    Ok(Json(KeyList {
        keys: records.iter().map(|r| KeyView::of(r, None)).collect(),
    }))
}

/// Revoke a key on every gateway; needs a key whose role may `keys.manage`.
#[utoipa::path(
    post,
    path = "/v1/keys/{key_id}/revoke",
    security(("api_key" = []), ("bearer" = [])),
    params(("key_id" = String, Path, description = "The key's id (16 lowercase hex characters)")),
    request_body(content = super::switches::ReasonBody, description = "Why (required)", content_type = "application/json"),
    responses(
        (status = 200, description = "Revoked; every gateway refuses the key within bound_ms", body = Revoked),
        (status = 400, description = "MALFORMED_REQUEST: the body is not {\"reason\": \"...\"} or the path cannot be read", body = ErrorBody),
        (status = 401, description = "AUTH_MISSING_KEY, AUTH_INVALID_KEY, AUTH_KEY_REVOKED, AUTH_KEY_EXPIRED", body = ErrorBody),
        (status = 403, description = "The key's role may not keys.manage", body = ErrorBody),
        (status = 404, description = "NOT_FOUND: no active key with this id", body = ErrorBody),
        (status = 429, description = "RATE_LIMITED: the key's quota, or too many failed keys from this address", body = ErrorBody),
        (status = 503, description = "AUDIT_UNAVAILABLE or RATE_LIMIT_UNAVAILABLE", body = ErrorBody)
    )
)]
pub(super) async fn revoke(
    State(app): State<Arc<App>>,
    Client(client): Client,
    axum::Extension(trace_id): axum::Extension<TraceId>,
    PathParam(key_id): PathParam<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Revoked>, ApiError> {
    let reason = reason_of(body, true, &trace_id).await?;
    let route = "/v1/keys/{key_id}/revoke";
    let mut change =
        turnstile::authorize_change(&app, &trace_id, &headers, client, route, KEYS_ACTION).await?;
    let not_found = || ApiError::NotFound {
        message: format!("no active key with id {key_id:?}"),
        trace_id: Some(trace_id.clone()),
    };
    let active = match KeyId::parse(&key_id) {
        Ok(id) => match app.store.get_key(&id).await {
            Ok(Some(k)) if k.revoked_at.is_none() => Some(id),
            Ok(_) => None,
            Err(e) => {
                change
                    .finish(&app, StatusCode::INTERNAL_SERVER_ERROR)
                    .await?;
                return Err(ApiError::internal(e, Some(&trace_id)));
            }
        },
        Err(_) => None,
    };
    let Some(id) = active else {
        change.finish(&app, StatusCode::NOT_FOUND).await?;
        return Err(not_found());
    };
    let actor = format!("key:{}", change.key.key_id);
    change
        .record(&app, || {
            keys::revoked_event(&id, &reason, &actor, Some(&trace_id))
        })
        .await?;
    let now = timestamp(OffsetDateTime::now_utc());
    match app.store.revoke_key(&id, &now).await {
        Ok(true) => change.finish(&app, StatusCode::OK).await?,
        // Revoked by someone else between the check and now: theirs stands.
        Ok(false) => {
            change.finish(&app, StatusCode::NOT_FOUND).await?;
            return Err(not_found());
        }
        Err(e) => {
            tracing::error!(error = %e, "key revocation recorded but not stored");
            change
                .finish(&app, StatusCode::INTERNAL_SERVER_ERROR)
                .await?;
            return Err(ApiError::internal(e, Some(&trace_id)));
        }
    }
    let bound = app.config.key_refresh * STALE_AFTER_REFRESHES;
    Ok(Json(Revoked {
        key_id: id.to_string(),
        revoked_at: now,
        revoked_by: actor,
        reason,
        bound_ms: u64::try_from(bound.as_millis()).unwrap_or(u64::MAX),
        trace_id: trace_id.to_string(),
    }))
}
