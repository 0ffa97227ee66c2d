//! Keys over HTTP, governed like every other request. With `keys.manage` (the example policy: `admin`):
//! `GET /v1/keys` lists them (never a secret), `POST /v1/keys/{key_id}/revoke` (body
//! `{"reason": "..."}`) revokes one. With `keys.create`: `POST /v1/keys` makes a key and
//! `POST /v1/keys/{key_id}/rotate` replaces one, answering the new secret once. A key hands out no more
//! than it holds ([`keys::grants_within`]): asking for more is refused with 403 `ACTION_FORBIDDEN`,
//! audited as a deny. Every change is audited (KEY_CREATED, KEY_REVOKED; actor `key:<key_id>`, under
//! the request's trace id) before it is stored, as after the CLI's `catraca keys ...`; a revoked or
//! rotated key is refused by every gateway within the revocation bound.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use utoipa::ToSchema;

use super::front_door::{Client, PathParam};
use super::switches::reason_of;
use crate::app::App;
use crate::audit::timestamp;
use crate::domain::{ApiKey, ContextId, KeyId, RoleName, TierName, TraceId};
use crate::error::{ApiError, ErrorBody};
use crate::keys::{self, KeyError, KeyView, NewKey};
use crate::reason::ReasonCode;
use crate::store::KeyRecord;
use crate::turnstile::{self, AuthorizedChange};
use crate::watch::STALE_AFTER_REFRESHES;

/// The permission-only action that governs listing and revoking keys.
const KEYS_ACTION: &str = "keys.manage";
/// The permission-only action that governs making keys (creating, rotating).
const CREATE_ACTION: &str = "keys.create";
/// Largest body a key request may have.
const MAX_BODY: usize = 16 * 1024;

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
    let id = match active_key(&app, &key_id).await {
        Ok(Some(k)) => k.key_id,
        Ok(None) => return Err(fail(&app, change, StatusCode::NOT_FOUND, not_found()).await),
        Err(e) => {
            let error = ApiError::internal(e, Some(&trace_id));
            return Err(fail(&app, change, StatusCode::INTERNAL_SERVER_ERROR, error).await);
        }
    };
    let actor = format!("key:{}", change.key.key_id);
    change
        .record(&app, || {
            vec![keys::revoked_event(&id, &reason, &actor, Some(&trace_id))]
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

/// What `POST /v1/keys` asks for: the CLI's `keys create` options.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateKey {
    /// A name for people, 1 to 128 characters, not all spaces.
    #[schema(min_length = 1, max_length = 128, pattern = "\\S")]
    pub name: String,
    /// A role the loaded policy defines.
    pub role: String,
    /// Contexts (of the loaded policy) the key may act in; omitted or empty: every context.
    #[serde(default)]
    pub contexts: Vec<String>,
    /// A tier the loaded policy defines (default: the policy's default tier).
    pub tier: Option<String>,
    /// Lifetime such as `90d`, `12h`, `30m`, `45s`; omitted: no expiry.
    #[schema(pattern = "^[1-9][0-9]{0,5}[dhms]$")]
    pub expires_in: Option<String>,
}

/// What `POST /v1/keys/{key_id}/rotate` may ask for.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RotateKey {
    /// The replacement's lifetime such as `90d`; omitted: no expiry.
    #[schema(pattern = "^[1-9][0-9]{0,5}[dhms]$")]
    pub expires_in: Option<String>,
}

/// A key just made: its secret, shown this once, and what the CLI's `--json` prints.
#[derive(Debug, Serialize, ToSchema)]
pub struct IssuedKey {
    /// `ck_<key_id>_<secret>`: shown only in this answer.
    pub key: String,
    pub key_id: String,
    pub name: String,
    pub role: String,
    /// `["*"]` for every context.
    pub contexts: Vec<String>,
    pub tier: String,
    pub created_at: String,
    pub expires_at: Option<String>,
    /// The key this one replaces (rotation).
    pub rotated_from: Option<String>,
    /// `key:<key_id>` of the key that asked.
    pub created_by: String,
    pub trace_id: String,
}

impl IssuedKey {
    fn of(record: &KeyRecord, key: &ApiKey, actor: String, trace_id: &TraceId) -> Self {
        let view = KeyView::of(record, Some(key));
        Self {
            key: view.key.unwrap_or_default(),
            key_id: view.key_id,
            name: view.name,
            role: view.role,
            contexts: view.contexts,
            tier: view.tier,
            created_at: view.created_at,
            expires_at: view.expires_at,
            rotated_from: view.rotated_from,
            created_by: actor,
            trace_id: trace_id.to_string(),
        }
    }
}

fn rejected(trace_id: &TraceId, message: String) -> ApiError {
    ApiError::Rejected {
        reason: ReasonCode::MalformedRequest,
        message,
        trace_id: Some(trace_id.clone()),
    }
}

/// The JSON body of a key request; an empty body reads as `{}` when `T` allows it.
async fn body_of<T: serde::de::DeserializeOwned>(
    body: Body,
    trace_id: &TraceId,
    shape: &str,
) -> Result<T, ApiError> {
    let bytes = axum::body::to_bytes(body, MAX_BODY).await.map_err(|_| {
        rejected(
            trace_id,
            format!("the body must be JSON of at most {MAX_BODY} bytes"),
        )
    })?;
    let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        &bytes
    };
    serde_json::from_slice(bytes)
        .map_err(|e| rejected(trace_id, format!("the body must be {shape}: {e}")))
}

/// The key template `ask` describes, its names and lifetime read (400 when they cannot be).
fn template_of(ask: CreateKey, actor: &str, trace_id: &TraceId) -> Result<NewKey, ApiError> {
    let bad = |e: String| rejected(trace_id, e);
    Ok(NewKey {
        name: ask.name,
        role: RoleName::parse(&ask.role).map_err(|e| bad(e.to_string()))?,
        contexts: ask
            .contexts
            .iter()
            .map(|c| ContextId::parse(c))
            .collect::<Result<_, _>>()
            .map_err(|e| bad(e.to_string()))?,
        tier: ask
            .tier
            .as_deref()
            .map(TierName::parse)
            .transpose()
            .map_err(|e| bad(e.to_string()))?,
        expires_in: lifetime(ask.expires_in.as_deref(), trace_id)?,
        actor: actor.to_owned(),
    })
}

fn lifetime(
    text: Option<&str>,
    trace_id: &TraceId,
) -> Result<Option<std::time::Duration>, ApiError> {
    text.map(keys::parse_duration)
        .transpose()
        .map_err(|e| rejected(trace_id, format!("expires_in: {e}")))
}

/// The key `key_id` names when it is well-formed, stored and not revoked.
async fn active_key(
    app: &App,
    key_id: &str,
) -> Result<Option<KeyRecord>, crate::store::StoreError> {
    let Ok(id) = KeyId::parse(key_id) else {
        return Ok(None);
    };
    Ok(app
        .store
        .get_key(&id)
        .await?
        .filter(|k| k.revoked_at.is_none()))
}

/// Ends an allowed change that could not be made: its REQUEST_END, then `error`.
async fn fail(
    app: &App,
    change: AuthorizedChange,
    status: StatusCode,
    error: ApiError,
) -> ApiError {
    match change.finish(app, status).await {
        Ok(()) => error,
        Err(unrecorded) => unrecorded,
    }
}

/// A refused or failed key preparation, answered after its REQUEST_END.
async fn failed_draft(
    app: &App,
    change: AuthorizedChange,
    e: KeyError,
    trace_id: &TraceId,
) -> ApiError {
    match e {
        KeyError::Invalid(message) => {
            fail(
                app,
                change,
                StatusCode::BAD_REQUEST,
                rejected(trace_id, message),
            )
            .await
        }
        other => {
            let error = ApiError::internal(other, Some(trace_id));
            fail(app, change, StatusCode::INTERNAL_SERVER_ERROR, error).await
        }
    }
}

/// Checks that the asking key grants no more than it holds; a refusal is a recorded deny.
async fn within_grant(
    app: &App,
    change: AuthorizedChange,
    granted: &KeyRecord,
    trace_id: &TraceId,
) -> Result<AuthorizedChange, ApiError> {
    let holder = match app.store.get_key(&change.key.key_id).await {
        Ok(Some(holder)) => holder,
        Ok(None) => {
            let error = ApiError::internal("the asking key is not in the store", Some(trace_id));
            return Err(fail(app, change, StatusCode::INTERNAL_SERVER_ERROR, error).await);
        }
        Err(e) => {
            let error = ApiError::internal(e, Some(trace_id));
            return Err(fail(app, change, StatusCode::INTERNAL_SERVER_ERROR, error).await);
        }
    };
    match keys::grants_within(&app.policy(), &holder, granted) {
        Ok(()) => Ok(change),
        Err(why) => Err(change
            .refuse(
                app,
                ReasonCode::ActionForbidden,
                format!("a key may not grant more than it holds: {why}"),
            )
            .await),
    }
}

/// Hashes the new key's secret on a blocking thread (argon2).
async fn sealed(key: ApiKey, mut record: KeyRecord) -> Result<(ApiKey, KeyRecord), KeyError> {
    tokio::task::spawn_blocking(move || {
        keys::seal_secret(&key, &mut record)?;
        Ok((key, record))
    })
    .await
    .map_err(|e| KeyError::Invalid(format!("hashing the secret stopped: {e}")))?
}

/// Make a key; needs a key whose role may `keys.create`, and grants no more than that key holds.
#[utoipa::path(
    post,
    path = "/v1/keys",
    security(("api_key" = []), ("bearer" = [])),
    request_body(content = CreateKey, description = "The key to make", content_type = "application/json"),
    responses(
        (status = 201, description = "Made; `key` is shown only in this answer", body = IssuedKey),
        (status = 400, description = "MALFORMED_REQUEST: the body cannot be read, or names a role, context or tier the policy lacks", body = ErrorBody),
        (status = 401, description = "AUTH_MISSING_KEY, AUTH_INVALID_KEY, AUTH_KEY_REVOKED, AUTH_KEY_EXPIRED", body = ErrorBody),
        (status = 403, description = "The key's role may not keys.create, or ACTION_FORBIDDEN: the new key would hold more than the asking key (role, contexts, tier or expiry)", body = ErrorBody),
        (status = 429, description = "RATE_LIMITED: the key's quota, or too many failed keys from this address", body = ErrorBody),
        (status = 503, description = "AUDIT_UNAVAILABLE or RATE_LIMIT_UNAVAILABLE", body = ErrorBody)
    )
)]
pub(super) async fn create(
    State(app): State<Arc<App>>,
    Client(client): Client,
    axum::Extension(trace_id): axum::Extension<TraceId>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<IssuedKey>), ApiError> {
    let ask: CreateKey = body_of(body, &trace_id, "{\"name\": ..., \"role\": ...}").await?;
    let change =
        turnstile::authorize_change(&app, &trace_id, &headers, client, "/v1/keys", CREATE_ACTION)
            .await?;
    let actor = format!("key:{}", change.key.key_id);
    let template = match template_of(ask, &actor, &trace_id) {
        Ok(t) => t,
        Err(e) => return Err(fail(&app, change, StatusCode::BAD_REQUEST, e).await),
    };
    let (key, record) = match keys::draft(&template, &app.policy()) {
        Ok(drafted) => drafted,
        Err(e) => return Err(failed_draft(&app, change, e, &trace_id).await),
    };
    let mut change = within_grant(&app, change, &record, &trace_id).await?;
    let (key, record) = match sealed(key, record).await {
        Ok(sealed) => sealed,
        Err(e) => return Err(failed_draft(&app, change, e, &trace_id).await),
    };
    change
        .record(&app, || {
            vec![keys::created_event(&record, &actor, Some(&trace_id))]
        })
        .await?;
    if let Err(e) = app.store.insert_key(&record).await {
        tracing::error!(error = %e, "key creation recorded but not stored");
        let error = ApiError::internal(e, Some(&trace_id));
        return Err(fail(&app, change, StatusCode::INTERNAL_SERVER_ERROR, error).await);
    }
    change.finish(&app, StatusCode::CREATED).await?;
    Ok((
        StatusCode::CREATED,
        Json(IssuedKey::of(&record, &key, actor, &trace_id)),
    ))
}

/// Replace a key with a new one of the same name, role, contexts and tier, revoking it; needs a key
/// whose role may `keys.create` and that holds at least what the rotated key holds.
#[utoipa::path(
    post,
    path = "/v1/keys/{key_id}/rotate",
    security(("api_key" = []), ("bearer" = [])),
    params(("key_id" = String, Path, description = "The key's id (16 lowercase hex characters)")),
    request_body(content = RotateKey, description = "The replacement's lifetime (optional; an empty body is `{}`)", content_type = "application/json"),
    responses(
        (status = 200, description = "Rotated; `key` is shown only in this answer, and every gateway refuses the old key within the revocation bound", body = IssuedKey),
        (status = 400, description = "MALFORMED_REQUEST: the body cannot be read", body = ErrorBody),
        (status = 401, description = "AUTH_MISSING_KEY, AUTH_INVALID_KEY, AUTH_KEY_REVOKED, AUTH_KEY_EXPIRED", body = ErrorBody),
        (status = 403, description = "The key's role may not keys.create, or ACTION_FORBIDDEN: the rotated key holds more than the asking key", body = ErrorBody),
        (status = 404, description = "NOT_FOUND: no active key with this id", body = ErrorBody),
        (status = 429, description = "RATE_LIMITED: the key's quota, or too many failed keys from this address", body = ErrorBody),
        (status = 503, description = "AUDIT_UNAVAILABLE or RATE_LIMIT_UNAVAILABLE", body = ErrorBody)
    )
)]
pub(super) async fn rotate(
    State(app): State<Arc<App>>,
    Client(client): Client,
    axum::Extension(trace_id): axum::Extension<TraceId>,
    PathParam(key_id): PathParam<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<IssuedKey>, ApiError> {
    let ask: RotateKey = body_of(body, &trace_id, "{\"expires_in\": ...} or empty").await?;
    let expires_in = lifetime(ask.expires_in.as_deref(), &trace_id)?;
    let route = "/v1/keys/{key_id}/rotate";
    let change =
        turnstile::authorize_change(&app, &trace_id, &headers, client, route, CREATE_ACTION)
            .await?;
    let not_found = || ApiError::NotFound {
        message: format!("no active key with id {key_id:?}"),
        trace_id: Some(trace_id.clone()),
    };
    let old = match active_key(&app, &key_id).await {
        Ok(Some(k)) => k,
        Ok(None) => return Err(fail(&app, change, StatusCode::NOT_FOUND, not_found()).await),
        Err(e) => {
            let error = ApiError::internal(e, Some(&trace_id));
            return Err(fail(&app, change, StatusCode::INTERNAL_SERVER_ERROR, error).await);
        }
    };
    let actor = format!("key:{}", change.key.key_id);
    let (key, record) = match keys::replacement(&old, expires_in, &app.policy(), &actor) {
        Ok(drafted) => drafted,
        Err(e) => return Err(failed_draft(&app, change, e, &trace_id).await),
    };
    let mut change = within_grant(&app, change, &record, &trace_id).await?;
    let (key, record) = match sealed(key, record).await {
        Ok(sealed) => sealed,
        Err(e) => return Err(failed_draft(&app, change, e, &trace_id).await),
    };
    change
        .record(&app, || {
            keys::rotated_events(&old.key_id, &record, &actor, Some(&trace_id))
        })
        .await?;
    let now = timestamp(OffsetDateTime::now_utc());
    match app.store.rotate_key(&old.key_id, &record, &now).await {
        Ok(true) => change.finish(&app, StatusCode::OK).await?,
        // Revoked or rotated by someone else between the check and now: theirs stands.
        Ok(false) => return Err(fail(&app, change, StatusCode::NOT_FOUND, not_found()).await),
        Err(e) => {
            tracing::error!(error = %e, "key rotation recorded but not stored");
            let error = ApiError::internal(e, Some(&trace_id));
            return Err(fail(&app, change, StatusCode::INTERNAL_SERVER_ERROR, error).await);
        }
    }
    Ok(Json(IssuedKey::of(&record, &key, actor, &trace_id)))
}
