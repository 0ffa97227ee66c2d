//! Refusals of the request itself, before any gate: an unknown route (404), a method the route does
//! not take (405), headers past the front door's limits (431) and a path that cannot be read (400).
//! Each answers with the documented JSON body and, through `observe`, the `X-Trace-Id` header.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::{ConnectInfo, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Extension, extract};
use serde::de::DeserializeOwned;

use crate::app::App;
use crate::domain::TraceId;
use crate::error::ApiError;
use crate::gates::client::client_address;
use crate::reason::ReasonCode;

/// Most header fields a request may carry. hyper refuses more than 100 by itself (its parser's fixed
/// array) with a bare 431 and no body; 64 keeps a JSON answer for everything between, and is three
/// times what a browser or an SDK sends.
pub const MAX_HEADER_COUNT: usize = 64;

/// Most bytes of header names and values together. 16 KiB is what Node and common proxies allow;
/// hyper's own bound is its read buffer for the whole request head (8 KiB + 100 × 4 KiB ≈ 408 KiB),
/// past which it answers a bare 431, as it answers a bare 414 to a request target over 64 KiB and a
/// bare 400 to a request line or header it cannot parse. Those three never reach the router, so they
/// stay without a body; everything between these limits and hyper's gets the JSON 431.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;

/// Answers 431 `HEADERS_TOO_LARGE` to a request past [`MAX_HEADER_COUNT`] or [`MAX_HEADER_BYTES`]
/// before any handler or gate runs.
pub async fn limit_headers(
    Extension(trace_id): Extension<TraceId>,
    req: Request,
    next: Next,
) -> Response {
    let headers = req.headers();
    let bytes: usize = headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len())
        .sum();
    if headers.len() > MAX_HEADER_COUNT || bytes > MAX_HEADER_BYTES {
        return ApiError::Rejected {
            reason: ReasonCode::HeadersTooLarge,
            message: format!(
                "the request carries {} header fields, {bytes} bytes; at most {MAX_HEADER_COUNT} \
                 fields and {MAX_HEADER_BYTES} bytes are accepted",
                headers.len()
            ),
            trace_id: Some(trace_id),
        }
        .into_response();
    }
    next.run(req).await
}

/// A path that matches no route.
pub async fn not_found(Extension(trace_id): Extension<TraceId>) -> ApiError {
    ApiError::NotFound {
        message: "no such route; see /openapi.json".to_owned(),
        trace_id: Some(trace_id),
    }
}

/// A route asked with a method it does not take; axum adds the `Allow` header listing those it does.
pub async fn method_not_allowed(Extension(trace_id): Extension<TraceId>) -> ApiError {
    ApiError::Rejected {
        reason: ReasonCode::MethodNotAllowed,
        message: "this route does not take this method; Allow lists the ones it does".to_owned(),
        trace_id: Some(trace_id),
    }
}

/// axum's `Path`, refusing with the documented JSON body: 400 `MALFORMED_REQUEST` for a segment that
/// cannot be read (e.g. invalid UTF-8 once percent-decoded) instead of axum's plain-text answer.
pub struct PathParam<T>(pub T);

impl<S, T> FromRequestParts<S> for PathParam<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let trace_id = parts.extensions.get::<TraceId>().cloned();
        match extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(extract::Path(value)) => Ok(Self(value)),
            // A route whose template and extractor disagree is the gateway's fault, not the client's.
            Err(rejection) if rejection.status().is_server_error() => {
                Err(ApiError::internal(rejection.body_text(), trace_id.as_ref()))
            }
            Err(rejection) => Err(ApiError::Rejected {
                reason: ReasonCode::MalformedRequest,
                message: format!("the request path cannot be read: {}", rejection.body_text()),
                trace_id,
            }),
        }
    }
}

/// axum's `Query`, refusing with the documented JSON body: 400 `MALFORMED_REQUEST` for a query string
/// that does not read as the parameters (an unknown value, a number that is not one).
pub struct QueryParams<T>(pub T);

impl<S, T> FromRequestParts<S> for QueryParams<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let trace_id = parts.extensions.get::<TraceId>().cloned();
        extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|extract::Query(value)| Self(value))
            .map_err(|rejection| ApiError::Rejected {
                reason: ReasonCode::MalformedRequest,
                message: format!("the query string cannot be read: {}", rejection.body_text()),
                trace_id,
            })
    }
}

/// The client's address as the gates see it: the socket's peer, or the first untrusted hop of
/// `X-Forwarded-For` when the peer is a trusted proxy (see `crate::gates::client`).
#[derive(Debug, Clone, Copy)]
pub struct Client(pub IpAddr);

impl FromRequestParts<Arc<App>> for Client {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        app: &Arc<App>,
    ) -> Result<Self, Self::Rejection> {
        let Some(ConnectInfo(peer)) = parts.extensions.get::<ConnectInfo<SocketAddr>>() else {
            let trace_id = parts.extensions.get::<TraceId>();
            return Err(ApiError::internal(
                "no peer address on the connection",
                trace_id,
            ));
        };
        Ok(Self(client_address(
            peer.ip(),
            &parts.headers,
            &app.config.trusted_proxies,
        )))
    }
}
