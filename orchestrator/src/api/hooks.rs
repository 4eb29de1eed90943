//! `POST /v1/hooks/{workflow}`: any JSON body becomes the input of a new instance of `workflow`. The instance id
//! comes from the definition's `hook: {id: EXPRESSION}` evaluated over `{body, headers}` (as `<workflow>:<value>`),
//! so a webhook its sender delivers again starts nothing new; without a `hook`, from an `Idempotency-Key` header,
//! else a new id. For a hook with a secret only what is signed counts: the expression sees the body but no
//! headers, and without a `hook` the id comes from the body's digest (see `auth`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use axum::Json;
use edow_engine::Definition;
use serde_json::{json, Value};

use super::auth::{Delivery, PeerCertificate};
use super::{path_segment, trace_of, Api, ApiError};
use crate::client::StartRequest;

/// How long a definition's hook settings are reused before the definitions topic is read again.
const CACHE_FOR: Duration = Duration::from_secs(5);
/// Most definitions cached.
const CACHE_ENTRIES: usize = 1_000;

/// The latest definition of each workflow name recently asked for.
#[derive(Clone, Default)]
pub struct HookCache(Arc<Mutex<HashMap<String, Cached>>>);

/// A definition, and when it was read.
type Cached = (Instant, Arc<Definition>);

impl HookCache {
    fn get(&self, name: &str) -> Option<Arc<Definition>> {
        let cache = self.0.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .get(name)
            .filter(|(at, _)| at.elapsed() < CACHE_FOR)
            .map(|(_, d)| d.clone())
    }

    fn put(&self, name: &str, definition: Arc<Definition>) {
        let mut cache = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= CACHE_ENTRIES {
            cache.retain(|_, (at, _)| at.elapsed() < CACHE_FOR);
            if cache.len() >= CACHE_ENTRIES {
                cache.clear();
            }
        }
        cache.insert(name.to_string(), (Instant::now(), definition));
    }
}

async fn latest(api: &Api, name: &str) -> Result<Arc<Definition>, ApiError> {
    if let Some(definition) = api.hooks.get(name) {
        return Ok(definition);
    }
    let latest = api
        .client
        .definitions()
        .await?
        .into_iter()
        .filter(|((n, _), _)| n == name)
        .filter_map(|(_, source)| source)
        .next_back();
    let Some(source) = latest else {
        return Err(ApiError::not_found(
            "workflow",
            format!("no workflow {name} is deployed; deploy it first"),
        ));
    };
    let definition = Definition::parse_with_limits(name, &source, &api.client.limits)
        .map(Arc::new)
        .map_err(|e| ApiError::unavailable(format!("the deployed {name} does not parse: {e}")))?;
    api.hooks.put(name, definition.clone());
    Ok(definition)
}

pub async fn hook(
    State(api): State<Api>,
    Path(workflow): Path<String>,
    Extension(PeerCertificate(certificate)): Extension<PeerCertificate>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    // Before anything else, so that an unsigned delivery costs no read of the cluster.
    let delivery = api
        .auth
        .check_hook(&workflow, &headers, certificate.as_ref(), &body)?;
    let signed_body = match &delivery {
        Delivery::Signed { body_digest } => Some(body_digest.clone()),
        Delivery::Trusted => None,
    };
    let text =
        std::str::from_utf8(&body).map_err(|_| ApiError::bad("body", "must be UTF-8 JSON"))?;
    api.client
        .limits
        .check_json("the webhook's body", text)
        .map_err(|r| ApiError::bad("body", r.message))?;
    let payload: Value =
        serde_json::from_str(text).map_err(|e| ApiError::bad("body", format!("not JSON: {e}")))?;
    let definition = latest(&api, &workflow).await?;
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let id = match &definition.hook {
        Some(hook) if signed_body.is_some() && reads_headers(&hook.id) => {
            return Err(ApiError::bad(
                "hook",
                format!(
                    "hook {workflow} is signed, and a signature covers the body only: its id expression `{}` may \
                     not read headers (a replay could change them); take the id from the body",
                    hook.id
                ),
            ));
        }
        Some(hook) => {
            // Headers are not signed: a signed hook's id must not depend on them.
            let visible: serde_json::Map<String, Value> = headers
                .iter()
                .filter(|_| signed_body.is_none())
                .filter_map(|(k, v)| {
                    Some((
                        k.as_str().to_string(),
                        Value::String(v.to_str().ok()?.to_string()),
                    ))
                })
                .collect();
            let context = json!({"body": payload, "headers": visible});
            let value = edow_engine::expr::eval(&hook.id, &context).map_err(|e| {
                ApiError::bad(
                    "body",
                    format!("the hook's id expression `{}` failed: {e}", hook.id),
                )
            })?;
            let value = match value {
                Value::String(s) if !s.is_empty() => s,
                Value::Number(n) => n.to_string(),
                other => {
                    return Err(ApiError::bad(
                        "body",
                        format!(
                            "the hook's id expression `{}` gave {other}; it must give a non-empty string or a number",
                            hook.id
                        ),
                    ))
                }
            };
            Some(format!("{workflow}:{value}"))
        }
        // The same signed delivery again (a replay, or the sender's retry) is the same instance.
        None => signed_body
            .as_ref()
            .map(|digest| format!("{workflow}:body-{}", &digest[..digest.len().min(32)])),
    };
    let started = api
        .client
        .start(StartRequest {
            name: workflow,
            id,
            input: text.to_string(),
            correlation_id: header("x-correlation-id"),
            idempotency_key: header("idempotency-key").filter(|_| signed_body.is_none()),
            trace: trace_of(&headers),
            ..StartRequest::default()
        })
        .await?;
    let location = format!("/v1/workflows/{}", path_segment(&started.id));
    let body = json!({"id": started.id, "trace_id": started.trace_id, "location": location});
    Ok((StatusCode::ACCEPTED, [("location", location)], Json(body)).into_response())
}

/// Whether `expression` reads the request's `headers` (the root field, not a `*.headers*` of the body).
fn reads_headers(expression: &str) -> bool {
    let identifier = |c: char| c.is_ascii_alphanumeric() || c == '_';
    expression.match_indices("headers").any(|(at, word)| {
        let before = expression[..at].chars().next_back();
        let after = expression[at + word.len()..].chars().next();
        before.is_none_or(|c| !identifier(c) && c != '.' && c != '"')
            && after.is_none_or(|c| !identifier(c))
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_the_root_headers_field_counts_as_reading_headers() {
        for reads in [
            "headers.\"x-id\"",
            "join('-', [body.a, headers.x])",
            "headers",
        ] {
            assert!(super::reads_headers(reads), "{reads}");
        }
        for not in [
            "body.headers_hash",
            "body.headers",
            "body.order_id",
            "myheaders",
        ] {
            assert!(!super::reads_headers(not), "{not}");
        }
    }
}
