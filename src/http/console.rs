//! The operators' console at `/console`: three files embedded in the binary (no build step, no CDN),
//! sent with a Content-Security-Policy that allows nothing but this origin. The page signs in with an
//! API key kept in the browser session and reads the trail through the audited `/v1/audit/*` routes
//! (and, for admins, `/v1/keys`); it holds no authority of its own.

use axum::Extension;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};

use super::front_door::PathParam;
use crate::domain::TraceId;
use crate::error::ApiError;

const INDEX: &str = include_str!("../../assets/console/index.html");
const SCRIPT: &str = include_str!("../../assets/console/app.js");
const STYLE: &str = include_str!("../../assets/console/console.css");

/// Scripts, styles and requests from this origin only; no inline code, no frames, no forms posted.
const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                      img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(POLICY),
            ),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
            (
                header::REFERRER_POLICY,
                HeaderValue::from_static("no-referrer"),
            ),
            // The files change only with the binary; a new version must not meet an old script.
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        body,
    )
        .into_response()
}

/// The console's page.
#[utoipa::path(get, path = "/console", responses((status = 200, description = "The operators' console (HTML)", content_type = "text/html")))]
pub(super) async fn index() -> Response {
    asset("text/html; charset=utf-8", INDEX)
}

/// The console's script and style sheet.
#[utoipa::path(
    get,
    path = "/console/{file}",
    params(("file" = String, Path, description = "app.js or console.css")),
    responses(
        (status = 200, description = "The file", content(("text/javascript"), ("text/css"))),
        (status = 400, description = "MALFORMED_REQUEST: the path cannot be read", body = crate::error::ErrorBody),
        (status = 404, description = "NOT_FOUND: no such file", body = crate::error::ErrorBody)
    )
)]
pub(super) async fn file(
    Extension(trace_id): Extension<TraceId>,
    PathParam(name): PathParam<String>,
) -> Result<Response, ApiError> {
    match name.as_str() {
        "app.js" => Ok(asset("text/javascript; charset=utf-8", SCRIPT)),
        "console.css" => Ok(asset("text/css; charset=utf-8", STYLE)),
        _ => Err(ApiError::NotFound {
            message: "the console has app.js and console.css".to_owned(),
            trace_id: Some(trace_id),
        }),
    }
}
