//! `/v1/definitions`: deploy a definition (YAML, or JSON by content type) as its next version; list them.

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::{Api, ApiError};

/// `POST /v1/definitions`: 201 with the version deployed, or 200 when the latest version has the same text.
pub async fn deploy(
    State(api): State<Api>,
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
    let deployed = api.client.deploy(label, source, Some("api".into())).await?;
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
    let mut names: BTreeMap<String, Vec<i32>> = BTreeMap::new();
    for (name, version) in api.client.definitions().await?.into_keys() {
        names.entry(name).or_default().push(version);
    }
    let definitions: Vec<_> = names
        .into_iter()
        .map(|(name, versions)| json!({"name": name, "latest": versions.last(), "versions": versions}))
        .collect();
    Ok(Json(json!({"definitions": definitions})).into_response())
}

/// `GET /v1/definitions/{name}`: every version of `name` with its text.
pub async fn get(State(api): State<Api>, Path(name): Path<String>) -> Result<Response, ApiError> {
    let versions: Vec<_> = api
        .client
        .definitions()
        .await?
        .into_iter()
        .filter(|((n, _), _)| *n == name)
        .map(|((_, version), source)| json!({"version": version, "source": source}))
        .collect();
    if versions.is_empty() {
        return Err(ApiError::not_found(
            "name",
            format!("no definition {name} is deployed"),
        ));
    }
    Ok(Json(json!({"name": name, "versions": versions})).into_response())
}
