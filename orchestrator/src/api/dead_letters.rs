//! `/v1/dead-letters`: list by origin topic and reason, show one with its original record, replay a selection to
//! its origin topic byte for byte (see [`crate::dlq`]).

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;

use super::{limit_param, only_params, parse_body, Api, ApiError};
use crate::dlq::{Position, Selection, MAX_LISTED, MAX_SELECTED};

const DEFAULT_LIMIT: usize = 100;

/// `GET /v1/dead-letters?topic=&reason=&limit=`: oldest first; without a topic, every dead-letter topic's.
pub async fn list(
    State(api): State<Api>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    only_params(&query, &["topic", "reason", "limit"])?;
    let limit = limit_param(&query, MAX_LISTED, DEFAULT_LIMIT)?;
    let found = api
        .client
        .dead_letters_of(
            query.get("topic").map(String::as_str),
            query.get("reason").map(String::as_str),
            limit,
        )
        .await?;
    Ok(Json(json!({"dead_letters": found})).into_response())
}

/// `GET /v1/dead-letters/{topic}/{partition}/{offset}`: `topic` is the origin topic.
pub async fn show(
    State(api): State<Api>,
    Path((topic, partition, offset)): Path<(String, String, String)>,
) -> Result<Response, ApiError> {
    let partition: i32 = partition
        .parse()
        .map_err(|_| ApiError::bad("partition", "a partition number"))?;
    let offset: i64 = offset
        .parse()
        .map_err(|_| ApiError::bad("offset", "an offset"))?;
    match api
        .client
        .dead_letter(&topic, Position { partition, offset })
        .await?
    {
        Some(letter) => Ok(Json(letter).into_response()),
        None => Err(ApiError::not_found(
            "offset",
            format!("no dead letter of {topic} at partition {partition} offset {offset}"),
        )),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplayBody {
    topic: String,
    offsets: Option<Vec<Position>>,
    reason: Option<String>,
}

/// `POST /v1/dead-letters/replay` with `{topic, offsets?, reason?}`: the selected dead letters (all of the topic
/// when neither is given) go back to `topic`.
pub async fn replay(State(api): State<Api>, body: Bytes) -> Result<Response, ApiError> {
    let body: ReplayBody = parse_body(&body)?;
    if body
        .offsets
        .as_ref()
        .is_some_and(|o| o.is_empty() || o.len() > MAX_SELECTED)
    {
        return Err(ApiError::bad(
            "offsets",
            format!("from 1 to {MAX_SELECTED} positions, or leave it out"),
        ));
    }
    let selection = Selection {
        reason: body.reason,
        positions: body.offsets,
        limit: MAX_SELECTED,
    };
    let replayed = api.client.replay(&body.topic, &selection).await?;
    let skipped: Vec<_> = replayed
        .skipped
        .iter()
        .map(|(at, why)| json!({"partition": at.partition, "offset": at.offset, "why": why}))
        .collect();
    Ok(Json(json!({
        "replay_id": replayed.replay_id,
        "replayed": replayed.replayed,
        "skipped": skipped,
    }))
    .into_response())
}
