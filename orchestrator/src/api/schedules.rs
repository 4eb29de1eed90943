//! `/v1/schedules`: create or replace a cron schedule, list them (with their next fire time and how far each has
//! fired), delete one (see [`crate::schedules`]).

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use edow_kafka::now_millis;
use edow_schemas::contracts::Schedule;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{parse_body, Api, ApiError};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ScheduleBody {
    name: String,
    workflow: String,
    version: Option<i32>,
    cron: String,
    time_zone: Option<String>,
    input: Option<Value>,
    catch_up: Option<String>,
    /// How far back missed fire times are caught up, e.g. "1h".
    window: Option<String>,
}

/// `POST /v1/schedules`: 201 with the schedule's next fire times.
pub async fn create(State(api): State<Api>, body: Bytes) -> Result<Response, ApiError> {
    let body: ScheduleBody = parse_body(&body)?;
    let window_ms = match &body.window {
        Some(text) => humantime::parse_duration(text)
            .map_err(|e| ApiError::bad("window", format!("{text}: {e} (e.g. 30m, 1h)")))?
            .as_millis()
            .min(i64::MAX as u128) as i64,
        None => 3_600_000,
    };
    let record = Schedule {
        name: body.name,
        workflow_name: body.workflow,
        workflow_version: body.version,
        cron: body.cron,
        time_zone: body.time_zone.unwrap_or_else(|| "UTC".into()),
        input: body.input.unwrap_or_else(|| json!({})).to_string(),
        catch_up: body.catch_up.unwrap_or_else(|| "skip".into()),
        catch_up_window_ms: window_ms,
        source: "api".into(),
        created_at: now_millis(),
        fired_through: None,
    };
    let checked = api.client.put_schedule(record).await?;
    let mut next = Vec::new();
    let mut at = now_millis();
    while next.len() < 3 {
        let Some(fire) = checked.next_after(at) else {
            break;
        };
        next.push(fire);
        at = fire;
    }
    let body = json!({"name": checked.record.name, "next_fire_times": next});
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

/// `GET /v1/schedules`.
pub async fn list(State(api): State<Api>) -> Result<Response, ApiError> {
    Ok(Json(json!({"schedules": api.schedules.list()})).into_response())
}

/// `DELETE /v1/schedules/{name}`.
pub async fn delete(
    State(api): State<Api>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    // The live table trails the topic by a moment: a schedule created just now is looked for in the topic.
    if !api.schedules.contains(&name) && !api.client.schedules().await?.contains(&name) {
        return Err(ApiError::not_found("name", format!("no schedule {name}")));
    }
    api.client.delete_schedule(&name).await?;
    Ok(Json(json!({"deleted": name})).into_response())
}
