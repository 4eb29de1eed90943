//! The Confluent Schema Registry REST API over a [`SchemaLog`]: the endpoints Kafka clients use, with
//! Confluent's status codes and `{"error_code", "message"}` bodies. Bad input always gets a 4xx naming what is
//! wrong; 5xx is kept for a broker that cannot be written to.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::compat::Level;
use crate::log::SchemaLog;
use crate::store::{
    CanonicalSchema, ConfigValue, DeletionValue, LogKey, Refusal, Registration, SchemaValue,
};

const CONTENT_TYPE: &str = "application/vnd.schemaregistry.v1+json";
/// How long a registration keeps planning again after losing races to other instances' claims.
const REGISTRATION_DEADLINE: std::time::Duration = std::time::Duration::from_secs(20);

pub struct AppState {
    pub log: SchemaLog,
    /// Serialises this instance's writes so a plan and its append are not interleaved with another request's.
    writer: tokio::sync::Mutex<()>,
}

impl AppState {
    pub fn new(log: SchemaLog) -> Arc<AppState> {
        Arc::new(AppState {
            log,
            writer: tokio::sync::Mutex::new(()),
        })
    }
}

type Shared = State<Arc<AppState>>;
type Params = Query<HashMap<String, String>>;
type ApiResult = Result<Response, ApiError>;

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/", get(|| async { ok(json!({})) }))
        .route("/subjects", get(list_subjects))
        .route("/schemas/types", get(|| async { ok(json!(["AVRO"])) }))
        .route("/schemas/ids/{id}", get(schema_by_id))
        .route("/schemas/ids/{id}/schema", get(raw_schema_by_id))
        .route("/schemas/ids/{id}/versions", get(schema_usages))
        .route("/subjects/{subject}", post(lookup).delete(delete_subject))
        .route(
            "/subjects/{subject}/versions",
            get(list_versions).post(register),
        )
        .route(
            "/subjects/{subject}/versions/{version}",
            get(get_version).delete(delete_version),
        )
        .route(
            "/subjects/{subject}/versions/{version}/schema",
            get(get_version_schema),
        )
        .route(
            "/compatibility/subjects/{subject}/versions",
            post(check_against_all),
        )
        .route(
            "/compatibility/subjects/{subject}/versions/{version}",
            post(check_against_version),
        )
        .route(
            "/config",
            get(get_global_config)
                .put(put_global_config)
                .delete(delete_global_config),
        )
        .route(
            "/config/{subject}",
            get(get_subject_config)
                .put(put_subject_config)
                .delete(delete_subject_config),
        )
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, 404, "HTTP 404 Not Found") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                405,
                "HTTP 405 Method Not Allowed",
            )
        })
        .layer(axum::middleware::from_fn(count_requests))
        .with_state(state)
}

/// Adds every request to `edow_registry_requests_total`.
async fn count_requests(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let method = match request.method().as_str() {
        known @ ("GET" | "POST" | "PUT" | "DELETE" | "HEAD") => known.to_string(),
        // Methods are any token a client sends; one label value stands for the rest.
        _ => "other".to_string(),
    };
    let response = next.run(request).await;
    edow_telemetry::metrics::REGISTRY_REQUESTS
        .with_label_values(&[method.as_str(), response.status().as_str()])
        .inc();
    response
}

/// `/metrics`: the registry's metrics in the Prometheus text format.
async fn metrics(State(state): Shared) -> Response {
    let schemas = state.log.read().schema_count();
    edow_telemetry::metrics::REGISTRY_SCHEMAS.set(schemas as i64);
    (
        [(header::CONTENT_TYPE, edow_telemetry::http::TEXT_FORMAT)],
        edow_telemetry::metrics::render(),
    )
        .into_response()
}

fn ok(body: Value) -> Response {
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], body.to_string()).into_response()
}

#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: u32,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: u32, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    fn subject_not_found(subject: &str) -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            40401,
            format!("Subject '{subject}' not found."),
        )
    }

    fn version_not_found(subject: &str, version: Option<u32>) -> ApiError {
        let which = version.map_or("latest".to_string(), |v| v.to_string());
        ApiError::new(
            StatusCode::NOT_FOUND,
            40402,
            format!("Version {which} not found for subject '{subject}'."),
        )
    }

    fn schema_not_found(what: impl std::fmt::Display) -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            40403,
            format!("Schema {what} not found"),
        )
    }

    fn invalid_schema(why: impl std::fmt::Display) -> ApiError {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            42201,
            format!("Invalid schema: {why}"),
        )
    }

    fn invalid_level(why: impl std::fmt::Display) -> ApiError {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, 42203, why.to_string())
    }

    fn store(e: anyhow::Error) -> ApiError {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            50001,
            format!("Error in the backend data store: {e:#}"),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error_code": self.code, "message": self.message});
        (
            self.status,
            [(header::CONTENT_TYPE, CONTENT_TYPE)],
            body.to_string(),
        )
            .into_response()
    }
}

fn flag(params: &HashMap<String, String>, name: &str) -> bool {
    params
        .get(name)
        .is_some_and(|v| v.eq_ignore_ascii_case("true"))
}

/// Parses a request body; malformed JSON is Confluent's 400, a body of the wrong shape its 422.
fn parse_body<T: DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            400,
            format!("Request body is not valid JSON: {e}"),
        )
    })?;
    serde_json::from_value(value).map_err(|e| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            422,
            format!("Unrecognizable request body: {e}"),
        )
    })
}

/// `latest`, `-1` or a version number in [1, 2^31-1]; `None` means latest.
fn parse_version(raw: &str) -> Result<Option<u32>, ApiError> {
    if raw == "latest" || raw == "-1" {
        return Ok(None);
    }
    match raw.parse::<u32>() {
        Ok(v) if (1..=i32::MAX as u32).contains(&v) => Ok(Some(v)),
        _ => Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            42202,
            format!(
                "The specified version '{raw}' is not a valid version id. Allowed values are between \
                 [1, 2^31-1] and the string \"latest\""
            ),
        )),
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SchemaRequest {
    schema: Option<String>,
    schema_type: Option<String>,
    #[serde(default)]
    references: Vec<Value>,
}

impl SchemaRequest {
    fn canonical(&self) -> Result<CanonicalSchema, ApiError> {
        if let Some(kind) = &self.schema_type {
            if !kind.eq_ignore_ascii_case("AVRO") {
                return Err(ApiError::invalid_schema(format!(
                    "schemaType {kind} is not supported by this registry; only AVRO is"
                )));
            }
        }
        if !self.references.is_empty() {
            return Err(ApiError::invalid_schema(
                "schema references are not supported by this registry; inline the referenced types",
            ));
        }
        let text = self
            .schema
            .as_deref()
            .filter(|s| !s.trim().is_empty())
            .ok_or_else(|| ApiError::invalid_schema("the request has no \"schema\""))?;
        CanonicalSchema::parse(text).map_err(ApiError::invalid_schema)
    }
}

/// The schema a request body carries, checked.
fn schema_from(body: &Bytes) -> Result<CanonicalSchema, ApiError> {
    parse_body::<SchemaRequest>(body)?.canonical()
}

fn version_body(subject: &str, version: u32, id: u32, schema: &str) -> Value {
    json!({"subject": subject, "version": version, "id": id, "schema": schema})
}

async fn list_subjects(State(s): Shared, Query(q): Params) -> ApiResult {
    Ok(ok(json!(s.log.read().subjects(flag(&q, "deleted")))))
}

fn parse_id(raw: &str) -> Result<u32, ApiError> {
    raw.parse()
        .map_err(|_| ApiError::schema_not_found(format!("id '{raw}'")))
}

/// The schema with id `id`. An id this instance has not applied yet may have just been given out by another
/// instance to a producer whose records a consumer is now decoding, so a miss reads up to the log's end first.
async fn schema_for_id(s: &AppState, id: u32) -> Result<Arc<CanonicalSchema>, ApiError> {
    if let Some(schema) = s.log.read().schema(id) {
        return Ok(schema.clone());
    }
    s.log.sync().await.map_err(ApiError::store)?;
    s.log
        .read()
        .schema(id)
        .cloned()
        .ok_or_else(|| ApiError::schema_not_found(id))
}

async fn schema_by_id(State(s): Shared, Path(id): Path<String>) -> ApiResult {
    let schema = schema_for_id(&s, parse_id(&id)?).await?;
    Ok(ok(json!({"schema": schema.text})))
}

async fn raw_schema_by_id(State(s): Shared, Path(id): Path<String>) -> ApiResult {
    let schema = schema_for_id(&s, parse_id(&id)?).await?;
    Ok(ok(serde_json::from_str(&schema.text).unwrap_or(Value::Null)))
}

async fn schema_usages(State(s): Shared, Path(id): Path<String>) -> ApiResult {
    let id = parse_id(&id)?;
    let store = s.log.read();
    if store.schema(id).is_none() {
        return Err(ApiError::schema_not_found(id));
    }
    let usages: Vec<Value> = store
        .usages(id)
        .into_iter()
        .map(|(subject, version)| json!({"subject": subject, "version": version}))
        .collect();
    Ok(ok(json!(usages)))
}

async fn list_versions(
    State(s): Shared,
    Path(subject): Path<String>,
    Query(q): Params,
) -> ApiResult {
    let store = s.log.read();
    let versions = store
        .versions(&subject, flag(&q, "deleted"))
        .ok_or_else(|| ApiError::subject_not_found(&subject))?;
    Ok(ok(json!(versions
        .iter()
        .map(|(v, _)| v)
        .collect::<Vec<_>>())))
}

/// The version `version` (None: latest) of `subject` with its schema, or the Confluent error for what is missing.
fn find_version(
    s: &AppState,
    subject: &str,
    version: Option<u32>,
    deleted: bool,
) -> Result<(u32, u32, Arc<CanonicalSchema>), ApiError> {
    let store = s.log.read();
    store
        .versions(subject, deleted)
        .ok_or_else(|| ApiError::subject_not_found(subject))?;
    let (v, entry) = store
        .version(subject, version, deleted)
        .ok_or_else(|| ApiError::version_not_found(subject, version))?;
    let schema = store
        .schema(entry.id)
        .ok_or_else(|| ApiError::schema_not_found(entry.id))?;
    Ok((v, entry.id, schema.clone()))
}

async fn get_version(
    State(s): Shared,
    Path((subject, version)): Path<(String, String)>,
    Query(q): Params,
) -> ApiResult {
    let (v, id, schema) =
        find_version(&s, &subject, parse_version(&version)?, flag(&q, "deleted"))?;
    Ok(ok(version_body(&subject, v, id, &schema.text)))
}

async fn get_version_schema(
    State(s): Shared,
    Path((subject, version)): Path<(String, String)>,
    Query(q): Params,
) -> ApiResult {
    let (_, _, schema) = find_version(&s, &subject, parse_version(&version)?, flag(&q, "deleted"))?;
    Ok(ok(serde_json::from_str(&schema.text).unwrap_or(Value::Null)))
}

async fn lookup(
    State(s): Shared,
    Path(subject): Path<String>,
    Query(q): Params,
    body: Bytes,
) -> ApiResult {
    let schema = schema_from(&body)?;
    let deleted = flag(&q, "deleted");
    // Like an id, the schema may have just been registered through another instance.
    if s.log.read().lookup(&subject, &schema, deleted).is_none() {
        s.log.sync().await.map_err(ApiError::store)?;
    }
    let store = s.log.read();
    store
        .versions(&subject, deleted)
        .ok_or_else(|| ApiError::subject_not_found(&subject))?;
    let (version, id) = store
        .lookup(&subject, &schema, deleted)
        .ok_or_else(|| ApiError::schema_not_found(format!("under subject '{subject}'")))?;
    Ok(ok(version_body(&subject, version, id, &schema.text)))
}

async fn register(State(s): Shared, Path(subject): Path<String>, body: Bytes) -> ApiResult {
    let schema = schema_from(&body)?;
    let _writer = s.writer.lock().await;
    let deadline = tokio::time::Instant::now() + REGISTRATION_DEADLINE;
    // The offset of the last record this instance wrote and has applied. A plan made now has seen the log up
    // to it, and no other claim is planned on it, so it makes the claim's key unique.
    let mut seen = s.log.sync().await.map_err(ApiError::store)?;
    let mut claims = 0;
    loop {
        let plan = s.log.read().plan_registration(&subject, &schema);
        let (id, version) = match plan {
            // The only answer: the id the log gave this schema, never the id a claim asked for.
            Ok(Registration::Existing { id, version }) => {
                if claims > 0 {
                    tracing::info!(%subject, version, id, claims, "registered schema");
                }
                return Ok(ok(json!({"id": id})));
            }
            Ok(Registration::New { id, version }) => (id, version),
            Err(Refusal::Incompatible(problems)) => {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    409,
                    format!(
                    "Schema being registered is incompatible with an earlier schema for subject \
                         \"{subject}\", details: {problems:?}"
                ),
                ))
            }
            Err(Refusal::OutOfNumbers(why)) => {
                return Err(ApiError::store(anyhow::anyhow!(
                    "cannot register under {subject}: {why}"
                )))
            }
        };
        if tokio::time::Instant::now() > deadline {
            return Err(ApiError::store(anyhow::anyhow!(
                "other registry instances kept claiming the same ids or versions for \
                 {REGISTRATION_DEADLINE:?}; try again"
            )));
        }
        let value = SchemaValue {
            subject: subject.clone(),
            version,
            id,
            schema: schema.text.clone(),
            deleted: false,
            schema_type: None,
        };
        seen = s
            .log
            .append(&LogKey::claim(&subject, version, seen), Some(&value))
            .await
            .map_err(ApiError::store)?;
        claims += 1;
        // Everything up to the claim is applied now, so the next plan finds it if it won; a loser plans again
        // from there without another NOOP.
    }
}

/// Soft-deletes or permanently deletes the given versions of a subject. Ids stay bound to their schemas.
async fn delete_versions(
    s: &AppState,
    subject: &str,
    versions: &[(u32, u32)],
    permanent: bool,
) -> Result<(), ApiError> {
    for &(version, id) in versions {
        let value = DeletionValue {
            subject: subject.to_string(),
            version,
            id,
            permanent,
        };
        s.log
            .append(&LogKey::delete_version(subject, version), Some(&value))
            .await
            .map_err(ApiError::store)?;
    }
    Ok(())
}

async fn delete_subject(
    State(s): Shared,
    Path(subject): Path<String>,
    Query(q): Params,
) -> ApiResult {
    let permanent = flag(&q, "permanent");
    let _writer = s.writer.lock().await;
    s.log.sync().await.map_err(ApiError::store)?;
    let all = s
        .log
        .read()
        .versions(&subject, true)
        .ok_or_else(|| ApiError::subject_not_found(&subject))?;
    let live: Vec<(u32, u32)> = all
        .iter()
        .filter(|(_, e)| !e.deleted)
        .map(|(v, e)| (*v, e.id))
        .collect();
    let targets: Vec<(u32, u32)> = if permanent {
        if !live.is_empty() {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                40405,
                format!(
                    "Subject '{subject}' was not deleted first before being permanently deleted"
                ),
            ));
        }
        all.iter().map(|(v, e)| (*v, e.id)).collect()
    } else {
        if live.is_empty() {
            return Err(ApiError::subject_not_found(&subject));
        }
        live
    };
    delete_versions(&s, &subject, &targets, permanent).await?;
    Ok(ok(json!(targets
        .iter()
        .map(|(v, _)| v)
        .collect::<Vec<_>>())))
}

async fn delete_version(
    State(s): Shared,
    Path((subject, version)): Path<(String, String)>,
    Query(q): Params,
) -> ApiResult {
    let permanent = flag(&q, "permanent");
    let version = parse_version(&version)?;
    let _writer = s.writer.lock().await;
    s.log.sync().await.map_err(ApiError::store)?;
    let found = {
        let store = s.log.read();
        store
            .versions(&subject, true)
            .ok_or_else(|| ApiError::subject_not_found(&subject))?;
        store.version(&subject, version, permanent)
    };
    let (v, entry) = found.ok_or_else(|| ApiError::version_not_found(&subject, version))?;
    if permanent && !entry.deleted {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            40407,
            format!(
                "Subject '{subject}' Version {v} was not deleted first before being permanently deleted"
            ),
        ));
    }
    delete_versions(&s, &subject, &[(v, entry.id)], permanent).await?;
    Ok(ok(json!(v)))
}

fn compatibility_body(problems: Vec<String>, verbose: bool) -> Response {
    if verbose {
        ok(json!({"is_compatible": problems.is_empty(), "messages": problems}))
    } else {
        ok(json!({"is_compatible": problems.is_empty()}))
    }
}

async fn check_against_all(
    State(s): Shared,
    Path(subject): Path<String>,
    Query(q): Params,
    body: Bytes,
) -> ApiResult {
    let schema = schema_from(&body)?;
    let store = s.log.read();
    let problems =
        store.incompatibilities(&subject, &schema, store.effective_level(&subject), None);
    Ok(compatibility_body(problems, flag(&q, "verbose")))
}

async fn check_against_version(
    State(s): Shared,
    Path((subject, version)): Path<(String, String)>,
    Query(q): Params,
    body: Bytes,
) -> ApiResult {
    let version = parse_version(&version)?;
    let schema = schema_from(&body)?;
    let (v, _, _) = find_version(&s, &subject, version, false)?;
    let store = s.log.read();
    let level = store.effective_level(&subject);
    let problems = store.incompatibilities(&subject, &schema, level, Some(v));
    Ok(compatibility_body(problems, flag(&q, "verbose")))
}

#[derive(Deserialize)]
struct ConfigRequest {
    compatibility: Option<String>,
}

fn parse_level(body: &Bytes) -> Result<Level, ApiError> {
    let request: ConfigRequest = parse_body(body)?;
    let raw = request
        .compatibility
        .ok_or_else(|| ApiError::invalid_level("The request has no \"compatibility\" level"))?;
    raw.parse::<Level>().map_err(ApiError::invalid_level)
}

async fn write_config(
    s: &AppState,
    subject: Option<&str>,
    level: Option<Level>,
) -> Result<(), ApiError> {
    let key = LogKey::Config {
        subject: subject.map(str::to_string),
        magic: 0,
    };
    let value = level.map(|l| ConfigValue {
        compatibility_level: l.as_str().to_string(),
    });
    s.log
        .append(&key, value.as_ref())
        .await
        .map_err(ApiError::store)?;
    Ok(())
}

async fn get_global_config(State(s): Shared) -> ApiResult {
    Ok(ok(
        json!({"compatibilityLevel": s.log.read().global_level().as_str()}),
    ))
}

async fn put_global_config(State(s): Shared, body: Bytes) -> ApiResult {
    let level = parse_level(&body)?;
    write_config(&s, None, Some(level)).await?;
    Ok(ok(json!({"compatibility": level.as_str()})))
}

async fn delete_global_config(State(s): Shared) -> ApiResult {
    let previous = s.log.read().global_level();
    write_config(&s, None, None).await?;
    Ok(ok(json!({"compatibilityLevel": previous.as_str()})))
}

async fn get_subject_config(
    State(s): Shared,
    Path(subject): Path<String>,
    Query(q): Params,
) -> ApiResult {
    let store = s.log.read();
    let level = match store.subject_level(&subject) {
        Some(level) => level,
        None if flag(&q, "defaultToGlobal") => store.global_level(),
        None => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                40408,
                format!("Subject '{subject}' does not have subject-level compatibility configured"),
            ))
        }
    };
    Ok(ok(json!({"compatibilityLevel": level.as_str()})))
}

async fn put_subject_config(
    State(s): Shared,
    Path(subject): Path<String>,
    body: Bytes,
) -> ApiResult {
    let level = parse_level(&body)?;
    write_config(&s, Some(&subject), Some(level)).await?;
    Ok(ok(json!({"compatibility": level.as_str()})))
}

async fn delete_subject_config(State(s): Shared, Path(subject): Path<String>) -> ApiResult {
    let previous = s.log.read().subject_level(&subject).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            40408,
            format!("Subject '{subject}' does not have subject-level compatibility configured"),
        )
    })?;
    write_config(&s, Some(&subject), None).await?;
    Ok(ok(json!({"compatibilityLevel": previous.as_str()})))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse_like_confluent() {
        assert_eq!(parse_version("latest").unwrap(), None);
        assert_eq!(parse_version("-1").unwrap(), None);
        assert_eq!(parse_version("7").unwrap(), Some(7));
        for bad in ["0", "-2", "abc", "2147483648"] {
            assert_eq!(parse_version(bad).unwrap_err().code, 42202, "{bad}");
        }
    }

    #[test]
    fn bodies_are_checked_before_anything_else() {
        let err = parse_body::<SchemaRequest>(&Bytes::from_static(b"{not json")).unwrap_err();
        assert_eq!((err.status, err.code), (StatusCode::BAD_REQUEST, 400));
        let request: SchemaRequest = parse_body(&Bytes::from_static(b"{}")).unwrap();
        assert_eq!(request.canonical().unwrap_err().code, 42201);
        let request: SchemaRequest =
            parse_body(&Bytes::from_static(br#"{"schema":"{\"type\":\"nope\"}"}"#)).unwrap();
        assert_eq!(request.canonical().unwrap_err().code, 42201);
        let request: SchemaRequest = parse_body(&Bytes::from_static(
            br#"{"schema":"\"string\"","schemaType":"PROTOBUF"}"#,
        ))
        .unwrap();
        assert!(request
            .canonical()
            .unwrap_err()
            .message
            .contains("PROTOBUF"));
    }
}
