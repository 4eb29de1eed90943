//! `/v1/definitions`: deploy a definition (YAML, or JSON by content type) as its next version; list them.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde_json::json;

use super::auth::Principal;
use super::{Api, ApiError};

/// `POST /v1/definitions`: 201 with the version deployed, or 200 when the latest version has the same text.
pub async fn deploy(
    State(api): State<Api>,
    principal: Option<Extension<Principal>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let source = std::str::from_utf8(&body)
        .map_err(|_| ApiError::bad("body", "a definition is UTF-8 YAML or JSON text"))?;
    let json = headers
        .get("content-type")
        .and_then(|c| c.to_str().ok())
        .is_some_and(|c| c.starts_with("application/json"));
    let label = if json { "request.json" } else { "request.yaml" };
    let deployed_by = match principal {
        Some(Extension(principal)) if api.auth.is_on() => format!("api:{}", principal.name),
        _ => "api".to_string(),
    };
    let deployed = api.client.deploy(label, source, Some(deployed_by)).await?;
    let status = if deployed.unchanged {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    let body = json!({"name": deployed.name, "version": deployed.version, "unchanged": deployed.unchanged});
    Ok((status, Json(body)).into_response())
}

/// `GET /v1/definitions`: every name with its versions.
pub async fn list(State(api): State<Api>) -> Result<Response, ApiError> {
    let definitions = api.client.definition_names().await?;
    Ok(Json(json!({"definitions": definitions})).into_response())
}

/// `GET /v1/definitions/{name}`: every version of `name` with its text.
pub async fn get(State(api): State<Api>, Path(name): Path<String>) -> Result<Response, ApiError> {
    let versions = api.client.definition_versions(&name).await?;
    if versions.is_empty() {
        return Err(ApiError::not_found(
            "name",
            format!("no definition {name} is deployed"),
        ));
    }
    Ok(Json(json!({"name": name, "versions": versions})).into_response())
}
