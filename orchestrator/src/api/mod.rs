//! The orchestrator's HTTP API under `/v1`, JSON in and out, described by `/v1/openapi.json`. Any instance
//! answers any request: writes go through the Kafka topics ([`crate::client`]), reads come from the visibility
//! index ([`crate::visibility`]). A request that is wrong gets a 4xx whose JSON body names the field; what the
//! cluster cannot do right now is a 503; nothing a client sends makes a 500. Who may do what is `auth`'s.

pub mod auth;
mod dead_letters;
mod definitions;
mod hooks;
mod schedules;
mod workflows;

use std::collections::HashMap;

use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use edow_telemetry::trace::TraceContext;
use serde_json::json;

use crate::client::{Client, ClientError};
use crate::visibility::Visibility;

/// What every handler shares.
#[derive(Clone)]
pub struct Api {
    pub client: Client,
    pub visibility: Visibility,
    pub hooks: hooks::HookCache,
    pub schedules: crate::schedules::Table,
    pub auth: auth::Auth,
}

/// The `/v1` routes.
pub fn routes(api: Api) -> Router {
    // Payloads are bounded by the engine's limits; a body past twice that (JSON escapes) is refused unread.
    // With a blob store, payloads may be up to its limit before they are stored.
    let payload_limit = match &api.client.blobs {
        Some(blobs) => blobs.max_bytes().max(api.client.limits.max_payload_bytes),
        None => api.client.limits.max_payload_bytes,
    };
    let body_limit = payload_limit * 2 + 64 * 1024;
    Router::new()
        .route("/v1/openapi.json", get(openapi))
        .route("/v1/workflows", post(workflows::start).get(workflows::list))
        .route("/v1/workflows/{id}", get(workflows::get))
        .route("/v1/workflows/{id}/signals/{name}", post(workflows::signal))
        .route("/v1/workflows/{id}/cancel", post(workflows::cancel))
        .route(
            "/v1/definitions",
            post(definitions::deploy).get(definitions::list),
        )
        .route("/v1/definitions/{name}", get(definitions::get))
        .route("/v1/hooks/{workflow}", post(hooks::hook))
        .route(
            "/v1/schedules",
            post(schedules::create).get(schedules::list),
        )
        .route(
            "/v1/schedules/{name}",
            axum::routing::delete(schedules::delete),
        )
        .route("/v1/dead-letters", get(dead_letters::list))
        .route("/v1/dead-letters/replay", post(dead_letters::replay))
        .route(
            "/v1/dead-letters/{topic}/{partition}/{offset}",
            get(dead_letters::show),
        )
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "path",
                "no such endpoint; see /v1/openapi.json",
            )
        })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method",
                "this endpoint does not take that method; see /v1/openapi.json",
            )
        })
        .layer(axum::middleware::from_fn_with_state(
            api.auth.clone(),
            auth::authenticate,
        ))
        .layer(axum::middleware::map_response(json_errors))
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(api)
}

const OPENAPI: &str = include_str!("openapi.json");

/// Turns the plain-text refusals of axum's own extractors (a path or query that does not parse, a body over the
/// limit) into the API's JSON errors.
async fn json_errors(response: Response) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get("content-type")
        .and_then(|c| c.to_str().ok())
        .is_some_and(|c| c.starts_with("application/json"));
    if !status.is_client_error() || is_json {
        return response;
    }
    let body = axum::body::to_bytes(response.into_body(), 4096)
        .await
        .unwrap_or_default();
    let message = String::from_utf8_lossy(&body).trim().to_string();
    let field = if status == StatusCode::PAYLOAD_TOO_LARGE {
        "body"
    } else {
        "request"
    };
    ApiError::new(status, field, message).into_response()
}

async fn openapi() -> Response {
    ([("content-type", "application/json")], OPENAPI).into_response()
}

/// A refused request: its status and a JSON body naming the field.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    field: String,
    message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, field: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            field: field.to_string(),
            message: message.into(),
        }
    }

    pub fn bad(field: &str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, field, message)
    }

    pub fn not_found(field: &str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, field, message)
    }

    /// The index or the cluster failed: 503, the request may be tried again.
    pub fn unavailable(e: impl std::fmt::Display) -> ApiError {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "", format!("{e:#}"))
    }
}

impl From<ClientError> for ApiError {
    fn from(e: ClientError) -> ApiError {
        match e {
            ClientError::Invalid { field, message } => ApiError::bad(&field, message),
            ClientError::Unavailable(e) => ApiError::unavailable(e),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {
            "status": self.status.as_u16(),
            "field": self.field,
            "message": self.message,
        }});
        (self.status, Json(body)).into_response()
    }
}

/// The body as `T`, or a 400 naming what is wrong with it.
pub fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return serde_json::from_str("{}")
            .map_err(|e| ApiError::bad("body", format!("a JSON body is required: {e}")));
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad("body", format!("not the JSON expected: {e}")))
}

/// Refuses a query parameter other than `known`, naming it.
pub fn only_params(query: &HashMap<String, String>, known: &[&str]) -> Result<(), ApiError> {
    match query.keys().find(|k| !known.contains(&k.as_str())) {
        Some(unknown) => Err(ApiError::bad(
            unknown,
            format!("unknown parameter; use {}", known.join(", ")),
        )),
        None => Ok(()),
    }
}

/// The `limit` parameter: 1 to `max`, `default` when absent.
pub fn limit_param(
    query: &HashMap<String, String>,
    max: usize,
    default: usize,
) -> Result<usize, ApiError> {
    match query.get("limit") {
        Some(limit) => limit
            .parse::<usize>()
            .ok()
            .filter(|l| (1..=max).contains(l))
            .ok_or_else(|| ApiError::bad("limit", format!("a number from 1 to {max}"))),
        None => Ok(default),
    }
}

/// The caller's trace context from its `traceparent`/`tracestate` headers, if valid.
pub fn trace_of(headers: &HeaderMap) -> Option<TraceContext> {
    let parent = headers.get("traceparent")?.to_str().ok()?;
    let state = headers.get("tracestate").and_then(|s| s.to_str().ok());
    TraceContext::parse(parent, state)
}

/// `text` as one percent-encoded path segment (workflow ids may hold `/`).
pub fn path_segment(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// Runs a read of the index off the async threads.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(ApiError::unavailable)?
        .map_err(ApiError::unavailable)
}
