//! Large payloads by reference (the claim check). A JSON value whose text is over the threshold (64 KiB by
//! default) is written to a blob store and replaced in the record by a reference,
//! `{"$edow_blob": "OWNER/SHA256", "bytes": N}`; whoever needs the value (a worker's handler) resolves it. The
//! orchestrator never resolves: it passes references on like any other value, so its state and the changelog
//! stay small.
//!
//! - Keys are `sha256(owning workflow id)/sha256(value)`: writing a value again (a retried task, a redelivered
//!   request) writes the same key, and purging a workflow deletes one prefix.
//! - A reference is resolved only for its owner or a descendant (a child workflow, whose id extends its
//!   parent's with `/`), so a reference copied into another workflow's input reads nothing.
//! - What is read is checked against the hash in its key, and bounded in count, size and nesting.
//!
//! Backends ([`store`]): a local directory, or S3-compatible storage; settings ([`args`]).

pub mod args;
pub mod store;

use std::sync::Arc;

use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// The field that marks a reference.
pub const REFERENCE_FIELD: &str = "$edow_blob";
/// Values whose JSON is longer are stored by reference, unless configured otherwise.
pub const DEFAULT_THRESHOLD: usize = 64 * 1024;
/// Longest value stored or read, unless configured otherwise.
pub const DEFAULT_MAX_BYTES: usize = 64 * 1024 * 1024;
/// Most references resolved in one value, and how deeply a stored value may hold references itself.
const MAX_REFERENCES: usize = 256;
const MAX_NESTING: usize = 4;
/// A field smaller than this is never worth a reference (a reference is about 150 bytes).
const SMALLEST_SPILLED: usize = 512;

/// Why a value could not be stored or resolved.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// The value or reference is at fault (too large, malformed, foreign, missing, altered): trying again will
    /// not help.
    #[error("{0}")]
    Invalid(String),
    /// The store did not answer or refused: trying again later may work.
    #[error("the blob store {location} failed: {source}")]
    Unavailable {
        location: String,
        #[source]
        source: object_store::Error,
    },
}

/// A blob store and the sizes that decide what goes into it.
#[derive(Clone)]
pub struct Blobs {
    store: Arc<dyn ObjectStore>,
    /// Where the store is, for messages (no credentials).
    location: String,
    threshold: usize,
    max_bytes: usize,
}

impl std::fmt::Debug for Blobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Blobs")
            .field("location", &self.location)
            .field("threshold", &self.threshold)
            .field("max_bytes", &self.max_bytes)
            .finish()
    }
}

impl Blobs {
    pub fn new(
        store: Arc<dyn ObjectStore>,
        location: String,
        threshold: usize,
        max_bytes: usize,
    ) -> Blobs {
        Blobs {
            store,
            location,
            threshold,
            max_bytes: max_bytes.max(threshold),
        }
    }

    /// JSON texts longer than this are stored by reference.
    pub fn threshold(&self) -> usize {
        self.threshold
    }

    /// Longest JSON text a value may have before it is stored, and longest resolved.
    pub fn max_bytes(&self) -> usize {
        self.max_bytes
    }

    pub fn location(&self) -> &str {
        &self.location
    }

    /// `value` with references in place of what made its JSON longer than the threshold: the largest fields of
    /// an object first (so small fields stay readable by expressions), the whole value when that is not enough
    /// or it is not an object. Values within the threshold come back unchanged.
    pub async fn offload(&self, owner: &str, value: Value) -> Result<Value, BlobError> {
        let length = json_len(&value);
        if length <= self.threshold {
            return Ok(value);
        }
        if length > self.max_bytes {
            return Err(BlobError::Invalid(format!(
                "the value is {length} bytes of JSON, over the blob store's limit of {} bytes (max blob bytes)",
                self.max_bytes
            )));
        }
        let Value::Object(mut fields) = value else {
            return self.put(owner, &value).await;
        };
        let mut by_size: Vec<(usize, String)> = fields
            .iter()
            .filter(|(_, v)| !is_reference(v))
            .map(|(k, v)| (json_len(v), k.clone()))
            .filter(|(size, _)| *size >= SMALLEST_SPILLED)
            .collect();
        by_size.sort_unstable_by(|a, b| b.cmp(a));
        let mut total = length;
        for (size, name) in by_size {
            if total <= self.threshold {
                break;
            }
            let Some(field) = fields.get(&name) else {
                continue;
            };
            let reference = self.put(owner, field).await?;
            total = total - size + json_len(&reference);
            fields.insert(name, reference);
        }
        let value = Value::Object(fields);
        if total <= self.threshold {
            Ok(value)
        } else {
            // Many small fields: the whole object goes.
            self.put(owner, &value).await
        }
    }

    /// `value` with every reference in it replaced by what it refers to, read for workflow `reader`.
    pub async fn resolve(&self, reader: &str, value: Value) -> Result<Value, BlobError> {
        let mut budget = Budget {
            references: MAX_REFERENCES,
            bytes: self.max_bytes,
        };
        self.resolve_within(reader, value, &mut budget, 0).await
    }

    /// Whether `value` holds a reference anywhere.
    pub fn refers(value: &Value) -> bool {
        match value {
            Value::Object(fields) => is_reference(value) || fields.values().any(Blobs::refers),
            Value::Array(items) => items.iter().any(Blobs::refers),
            _ => false,
        }
    }

    fn resolve_within<'a>(
        &'a self,
        reader: &'a str,
        value: Value,
        budget: &'a mut Budget,
        nesting: usize,
    ) -> futures_util::future::BoxFuture<'a, Result<Value, BlobError>> {
        Box::pin(async move {
            if !Blobs::refers(&value) {
                return Ok(value);
            }
            if let Some(key) = reference_key(&value) {
                if nesting >= MAX_NESTING {
                    return Err(BlobError::Invalid(format!(
                        "blob references are nested more than {MAX_NESTING} deep"
                    )));
                }
                let key = key.to_string();
                let fetched = self.get(reader, &key, budget).await?;
                return self
                    .resolve_within(reader, fetched, budget, nesting + 1)
                    .await;
            }
            match value {
                Value::Object(fields) => {
                    let mut resolved = Map::with_capacity(fields.len());
                    for (name, field) in fields {
                        let field = self.resolve_within(reader, field, budget, nesting).await?;
                        resolved.insert(name, field);
                    }
                    Ok(Value::Object(resolved))
                }
                Value::Array(items) => {
                    let mut resolved = Vec::with_capacity(items.len());
                    for item in items {
                        resolved.push(self.resolve_within(reader, item, budget, nesting).await?);
                    }
                    Ok(Value::Array(resolved))
                }
                other => Ok(other),
            }
        })
    }

    /// Deletes every value stored for workflow `owner`; returns how many.
    pub async fn purge(&self, owner: &str) -> Result<usize, BlobError> {
        use futures_util::StreamExt;
        let prefix = Path::from(sha256_hex(owner.as_bytes()));
        let mut listed = self.store.list(Some(&prefix));
        let mut deleted = 0;
        while let Some(meta) = listed.next().await {
            let meta = meta.map_err(|e| self.unavailable(e))?;
            match self.store.delete(&meta.location).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => deleted += 1,
                Err(e) => return Err(self.unavailable(e)),
            }
        }
        Ok(deleted)
    }

    async fn put(&self, owner: &str, value: &Value) -> Result<Value, BlobError> {
        let text = value.to_string();
        let key = format!(
            "{}/{}",
            sha256_hex(owner.as_bytes()),
            sha256_hex(text.as_bytes())
        );
        let bytes = text.len();
        self.store
            .put(&Path::from(key.as_str()), PutPayload::from(text))
            .await
            .map_err(|e| self.unavailable(e))?;
        tracing::debug!(workflow_id = %owner, key = %key, bytes, "value stored by reference");
        Ok(reference(&key, bytes))
    }

    async fn get(&self, reader: &str, key: &str, budget: &mut Budget) -> Result<Value, BlobError> {
        let (owner, hash) = parse_key(key)?;
        if !owned_by(reader, owner) {
            return Err(BlobError::Invalid(format!(
                "blob {key} belongs to another workflow; a reference is read only by the workflow that stored \
                 it and its children"
            )));
        }
        if budget.references == 0 {
            return Err(BlobError::Invalid(format!(
                "more than {MAX_REFERENCES} blob references in one value"
            )));
        }
        budget.references -= 1;
        let path = Path::from(key);
        let found = match self.store.get(&path).await {
            Ok(found) => found,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(BlobError::Invalid(format!(
                    "blob {key} is not in the blob store {}: it was purged with its workflow, or never stored \
                     there (do every process's --blob-store settings point at the same store?)",
                    self.location
                )))
            }
            Err(e) => return Err(self.unavailable(e)),
        };
        let size = usize::try_from(found.meta.size).unwrap_or(usize::MAX);
        if size > budget.bytes {
            return Err(BlobError::Invalid(format!(
                "blob {key} is {size} bytes; with the rest of the value that is over the limit of {} bytes \
                 (max blob bytes)",
                self.max_bytes
            )));
        }
        budget.bytes -= size;
        let bytes = found.bytes().await.map_err(|e| self.unavailable(e))?;
        if sha256_hex(&bytes) != hash {
            return Err(BlobError::Invalid(format!(
                "blob {key} does not match the hash in its name: the store's copy was altered"
            )));
        }
        serde_json::from_slice(&bytes)
            .map_err(|e| BlobError::Invalid(format!("blob {key} is not JSON: {e}")))
    }

    fn unavailable(&self, source: object_store::Error) -> BlobError {
        BlobError::Unavailable {
            location: self.location.clone(),
            source,
        }
    }
}

struct Budget {
    references: usize,
    bytes: usize,
}

/// The reference to a stored value of `bytes` bytes under `key`.
pub fn reference(key: &str, bytes: usize) -> Value {
    serde_json::json!({ REFERENCE_FIELD: key, "bytes": bytes })
}

/// Whether `value` is a reference (an object whose only fields are the marker and its size).
pub fn is_reference(value: &Value) -> bool {
    reference_key(value).is_some()
}

fn reference_key(value: &Value) -> Option<&str> {
    let fields = value.as_object()?;
    let key = fields.get(REFERENCE_FIELD)?.as_str()?;
    fields
        .keys()
        .all(|k| k == REFERENCE_FIELD || k == "bytes")
        .then_some(key)
}

/// The owner and content hashes of a key, when it is well-formed.
fn parse_key(key: &str) -> Result<(&str, &str), BlobError> {
    let hex64 =
        |s: &str| s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    match key.split_once('/') {
        Some((owner, hash)) if hex64(owner) && hex64(hash) => Ok((owner, hash)),
        _ => Err(BlobError::Invalid(format!(
            "{key:?} is not a blob key (OWNER/SHA256, two lower-case SHA-256 hex digests)"
        ))),
    }
}

/// Whether workflow `reader` may read what `owner_hash` stored: it is the owner, or a descendant of it.
fn owned_by(reader: &str, owner_hash: &str) -> bool {
    let mut candidate = reader;
    loop {
        if sha256_hex(candidate.as_bytes()) == owner_hash {
            return true;
        }
        match candidate.rsplit_once('/') {
            Some((parent, _)) => candidate = parent,
            None => return false,
        }
    }
}

/// Length of `value`'s compact JSON text, without building it.
pub fn json_len(value: &Value) -> usize {
    struct Counter(usize);
    impl std::io::Write for Counter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut counter = Counter(0);
    match serde_json::to_writer(&mut counter, value) {
        Ok(()) => counter.0,
        Err(_) => usize::MAX,
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn blobs(dir: &std::path::Path, threshold: usize) -> Blobs {
        store::open(dir.to_str().unwrap(), threshold, 1 << 20).unwrap()
    }

    #[tokio::test]
    async fn large_fields_go_by_reference_and_come_back() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = blobs(dir.path(), 1024);
        let document = "x".repeat(5000);
        let value = json!({"status": "ok", "document": document, "small": [1, 2, 3]});
        let stored = blobs.offload("wf-1", value.clone()).await.unwrap();
        assert_eq!(stored["status"], "ok", "small fields stay readable");
        assert!(is_reference(&stored["document"]), "{stored}");
        assert!(json_len(&stored) <= 1024);
        assert_eq!(blobs.resolve("wf-1", stored.clone()).await.unwrap(), value);
        // A child reads its parent's values; nobody else does.
        assert_eq!(
            blobs.resolve("wf-1/steps/a", stored.clone()).await.unwrap(),
            value
        );
        let foreign = blobs.resolve("wf-2", stored.clone()).await.unwrap_err();
        assert!(
            foreign.to_string().contains("another workflow"),
            "{foreign}"
        );
        assert_eq!(blobs.purge("wf-1").await.unwrap(), 1);
        let purged = blobs.resolve("wf-1", stored).await.unwrap_err();
        assert!(purged.to_string().contains("purged"), "{purged}");
    }

    #[tokio::test]
    async fn values_within_the_threshold_are_untouched_and_oversized_ones_refused() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = blobs(dir.path(), 1024);
        let small = json!({"a": "b"});
        assert_eq!(blobs.offload("w", small.clone()).await.unwrap(), small);
        let huge = json!("y".repeat(2 << 20));
        let refused = blobs.offload("w", huge).await.unwrap_err();
        assert!(matches!(refused, BlobError::Invalid(_)), "{refused}");
        // A large scalar or many small fields go whole.
        let scalar = blobs.offload("w", json!("z".repeat(4000))).await.unwrap();
        assert!(is_reference(&scalar));
        let many: Map<String, Value> = (0..500).map(|i| (format!("f{i}"), json!(i))).collect();
        let whole = blobs
            .offload("w", Value::Object(many.clone()))
            .await
            .unwrap();
        assert!(is_reference(&whole), "{whole}");
        assert_eq!(
            blobs.resolve("w", whole).await.unwrap(),
            Value::Object(many)
        );
    }

    #[tokio::test]
    async fn hostile_references_are_refused_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = blobs(dir.path(), 1024);
        for key in [
            "../../etc/passwd",
            "",
            "a/b",
            &format!("{}/..", "0".repeat(64)),
        ] {
            let err = blobs
                .resolve("w", json!({"x": reference(key, 1)}))
                .await
                .unwrap_err();
            assert!(err.to_string().contains("not a blob key"), "{key}: {err}");
        }
        // An altered blob is detected.
        let stored = blobs.offload("w", json!("q".repeat(4000))).await.unwrap();
        let key = stored[REFERENCE_FIELD].as_str().unwrap();
        std::fs::write(dir.path().join(key), "\"tampered\"").unwrap();
        let err = blobs.resolve("w", stored).await.unwrap_err();
        assert!(err.to_string().contains("altered"), "{err}");
        // A well-formed key of nothing stored.
        let owner = sha256_hex(b"w");
        let nested = json!({"deep": reference(&format!("{owner}/{}", "0".repeat(64)), 1)});
        assert!(blobs.resolve("w", nested).await.is_err());
    }

    #[test]
    fn json_len_is_the_length_of_the_text() {
        let value = json!({"a": [1, "two", null], "b": {"c": 1.5}});
        assert_eq!(json_len(&value), value.to_string().len());
    }
}
