//! `/v1/workflows`: start (202, through the triggers topic), read and list (from the visibility index), signal and
//! cancel (through the signals topic).

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use edow_schemas::contracts::SignalKind;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{
    blocking, limit_param, only_params, parse_body, path_segment, trace_of, Api, ApiError,
};
use crate::client::StartRequest;
use crate::visibility::{described, parse_instant, status_named, Filter, STATUSES};

/// Most workflows per page.
const MAX_PAGE: usize = 1000;
const DEFAULT_PAGE: usize = 100;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StartBody {
    name: String,
    version: Option<i32>,
    id: Option<String>,
    #[serde(default)]
    input: Option<Value>,
    correlation_id: Option<String>,
}

/// `POST /v1/workflows`: 202 with the id and where to read it; the same `Idempotency-Key` (or id) starts one.
pub async fn start(
    State(api): State<Api>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let body: StartBody = parse_body(&body)?;
    let idempotency_key = match headers.get("idempotency-key") {
        Some(key) => Some(
            key.to_str()
                .map_err(|_| ApiError::bad("Idempotency-Key", "must be visible ASCII"))?
                .to_string(),
        ),
        None => None,
    };
    let started = api
        .client
        .start(StartRequest {
            name: body.name,
            version: body.version,
            id: body.id,
            input: body.input.unwrap_or_else(|| json!({})).to_string(),
            correlation_id: body.correlation_id,
            idempotency_key,
            trace: trace_of(&headers),
            attributes: HashMap::new(),
        })
        .await?;
    let location = format!("/v1/workflows/{}", path_segment(&started.id));
    let body = json!({"id": started.id, "trace_id": started.trace_id, "location": location});
    Ok((StatusCode::ACCEPTED, [("location", location)], Json(body)).into_response())
}

/// `GET /v1/workflows/{id}`: the workflow and its lifecycle events, from the index.
pub async fn get(State(api): State<Api>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let index = api.visibility.clone();
    let lookup = id.clone();
    let found = blocking(move || index.get(&lookup)).await?;
    let Some((workflow, events)) = found else {
        return Err(ApiError::not_found(
            "id",
            format!(
                "no workflow {id} in the index: never started, started a moment ago and not indexed yet, or past \
                 its retention"
            ),
        ));
    };
    Ok(Json(described(&workflow, &events)).into_response())
}

/// `GET /v1/workflows?name=&status=&correlation_id=&from=&to=&cursor=&limit=`: newest first, paginated.
pub async fn list(
    State(api): State<Api>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    only_params(
        &query,
        &[
            "name",
            "status",
            "correlation_id",
            "from",
            "to",
            "cursor",
            "limit",
        ],
    )?;
    let status = match query.get("status") {
        Some(status) => Some(
            status_named(status)
                .ok_or_else(|| ApiError::bad("status", format!("one of {}", STATUSES.join(", "))))?
                .to_string(),
        ),
        None => None,
    };
    let limit = limit_param(&query, MAX_PAGE, DEFAULT_PAGE)?;
    let filter = Filter {
        name: query.get("name").cloned(),
        status,
        correlation_id: query.get("correlation_id").cloned(),
        from: query.get("from").map(|t| instant("from", t)).transpose()?,
        to: query.get("to").map(|t| instant("to", t)).transpose()?,
        after: query.get("cursor").map(|c| cursor(c)).transpose()?,
        limit,
    };
    let index = api.visibility.clone();
    let rows = blocking(move || index.list(&filter)).await?;
    let next_cursor = (rows.len() == limit)
        .then(|| rows.last().map(|r| encode_cursor(r.created_at, &r.id)))
        .flatten();
    Ok(Json(json!({"workflows": rows, "next_cursor": next_cursor})).into_response())
}

/// An instant given as epoch milliseconds or RFC 3339.
fn instant(field: &str, text: &str) -> Result<i64, ApiError> {
    parse_instant(text).ok_or_else(|| {
        ApiError::bad(
            field,
            "epoch milliseconds or an RFC 3339 time (2026-11-23T10:00:00Z)",
        )
    })
}

/// The opaque cursor of a page: the last row's creation time and id, hex-encoded.
fn encode_cursor(created_at: i64, id: &str) -> String {
    format!("{created_at}:{id}")
        .bytes()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn cursor(text: &str) -> Result<(i64, String), ApiError> {
    let bad = || {
        ApiError::bad(
            "cursor",
            "not a cursor this API gave; pass next_cursor as it came",
        )
    };
    if text.len() % 2 != 0 || text.len() > 4096 {
        return Err(bad());
    }
    let bytes = (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2).ok_or_else(bad)?, 16).map_err(|_| bad()))
        .collect::<Result<Vec<u8>, _>>()?;
    let decoded = String::from_utf8(bytes).map_err(|_| bad())?;
    let (created_at, id) = decoded.split_once(':').ok_or_else(bad)?;
    Ok((created_at.parse().map_err(|_| bad())?, id.to_string()))
}

/// `POST /v1/workflows/{id}/signals/{name}` with the payload as body (none: null).
pub async fn signal(
    State(api): State<Api>,
    Path((id, name)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let payload = if body.iter().all(u8::is_ascii_whitespace) {
        "null".to_string()
    } else {
        std::str::from_utf8(&body)
            .map_err(|_| ApiError::bad("body", "the payload must be UTF-8 JSON"))?
            .to_string()
    };
    let signal_id = api
        .client
        .signal(
            &id,
            SignalKind::Signal,
            Some(name),
            &payload,
            trace_of(&headers),
        )
        .await?;
    Ok((StatusCode::ACCEPTED, Json(json!({"signal_id": signal_id}))).into_response())
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct CancelBody {
    reason: Option<String>,
}

/// `POST /v1/workflows/{id}/cancel` with an optional `{reason}`.
pub async fn cancel(
    State(api): State<Api>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let body: CancelBody = parse_body(&body)?;
    let reason = body
        .reason
        .unwrap_or_else(|| "cancelled through the API".into());
    let payload = Value::String(reason).to_string();
    let signal_id = api
        .client
        .signal(&id, SignalKind::Cancel, None, &payload, trace_of(&headers))
        .await?;
    Ok((StatusCode::ACCEPTED, Json(json!({"signal_id": signal_id}))).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_foreign_ones_are_refused() {
        let encoded = encode_cursor(1_700_000_000_000, "order/7:x");
        assert_eq!(
            cursor(&encoded).unwrap(),
            (1_700_000_000_000, "order/7:x".to_string())
        );
        for bad in ["zz", "abc", "00", &"ab".repeat(3000)] {
            assert!(cursor(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn instants_are_epoch_ms_or_rfc3339() {
        assert_eq!(instant("from", "1000").unwrap(), 1000);
        assert_eq!(instant("from", "1970-01-01T00:00:01Z").unwrap(), 1000);
        assert!(instant("from", "yesterday").is_err());
    }
}
