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
use crate::audit::anchor::ORIGIN_PREFIX;
use crate::audit::proof::{self, DecisionProof, ProofError};
use crate::audit_read::{self, AUDIT_READ, ChainsState, DecisionPage, DecisionQuery};
use crate::domain::TraceId;
use crate::error::{ApiError, ErrorBody};
use crate::turnstile::authorize_permission;

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

/// The key that signs the gateway's checkpoints.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct PublicKeyBody {
    /// A C2SP signed-note verifier key, `<name>+<key id>+<base64 Ed25519 key>`.
    pub public_key: String,
    pub algorithm: &'static str,
    /// Every checkpoint's origin line is this followed by its chain's id.
    pub origin_prefix: &'static str,
}

/// The public key of the gateway's signed checkpoints: what an auditor keeps, away from the database,
/// to check checkpoints and decision proofs offline. Open to anyone, like any public key.
#[utoipa::path(
    get,
    path = "/v1/audit/public-key",
    responses((status = 200, description = "The checkpoints' verifier key", body = PublicKeyBody))
)]
pub(super) async fn public_key(State(app): State<Arc<App>>) -> Json<PublicKeyBody> {
    Json(PublicKeyBody {
        public_key: app.audit_public_key.as_str().to_owned(),
        algorithm: "ed25519",
        origin_prefix: ORIGIN_PREFIX,
    })
}

/// The proof that the trail holds a decision: its DECISION event as hashed, its receipt, the newest
/// signed checkpoint of its chain and the RFC 6962 inclusion proof up to that checkpoint's root. Check
/// it offline with `catraca audit verify-receipt FILE --public-key KEY`. Needs a key whose role may
/// `audit.read`.
#[utoipa::path(
    get,
    path = "/v1/audit/proofs/{decision_id}",
    security(("api_key" = []), ("bearer" = [])),
    params(("decision_id" = String, Path, description = "The decision id an answer carried")),
    responses(
        (status = 200, description = "The decision's proof", body = DecisionProof),
        (status = 400, description = "MALFORMED_REQUEST: the path cannot be read", body = ErrorBody),
        (status = 401, description = "AUTH_MISSING_KEY, AUTH_INVALID_KEY, AUTH_KEY_REVOKED, AUTH_KEY_EXPIRED", body = ErrorBody),
        (status = 403, description = "The key's role may not audit.read", body = ErrorBody),
        (status = 404, description = "NOT_FOUND: no such decision, or not yet covered by a checkpoint (they follow within a second)", body = ErrorBody),
        (status = 429, description = "RATE_LIMITED: the key's quota, or too many failed keys from this address", body = ErrorBody),
        (status = 500, description = "INTERNAL_ERROR: the trail does not match its signed checkpoint", body = ErrorBody),
        (status = 503, description = "AUDIT_UNAVAILABLE or RATE_LIMIT_UNAVAILABLE", body = ErrorBody)
    )
)]
pub(super) async fn decision_proof(
    State(app): State<Arc<App>>,
    Client(client): Client,
    axum::Extension(trace_id): axum::Extension<TraceId>,
    PathParam(decision_id): PathParam<String>,
    headers: HeaderMap,
) -> Result<Json<DecisionProof>, ApiError> {
    authorize_permission(
        &app,
        &trace_id,
        &headers,
        client,
        "/v1/audit/proofs/{decision_id}",
        AUDIT_READ,
    )
    .await?;
    match proof::prove(app.store.as_ref(), &app.audit_public_key, &decision_id).await {
        Ok(proof) => Ok(Json(proof)),
        Err(e @ (ProofError::NotFound | ProofError::NotYetSigned(_))) => Err(ApiError::NotFound {
            message: e.to_string(),
            trace_id: Some(trace_id),
        }),
        Err(e) => Err(ApiError::internal(e, Some(&trace_id))),
    }
}
