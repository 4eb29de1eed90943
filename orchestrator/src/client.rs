//! Writing to edow through Kafka, as the CLI and the HTTP API do: start a workflow (a trigger), signal or cancel
//! one (a signal), deploy a definition (a record on the definitions topic). Every check a request can fail is
//! made here, before anything is produced, and reported as [`ClientError::Invalid`] naming the field; what the
//! cluster fails is [`ClientError::Unavailable`].

use std::collections::{BTreeMap, HashSet};

use edow_engine::{Definition, Limits};
use edow_kafka::{now_millis, produce_all, Kafka, Outgoing, TopicSpec};
use edow_schemas::contracts::{
    DefinitionFormat, SignalKind, WorkflowDefinition, WorkflowSignal, WorkflowTrigger,
};
use edow_schemas::{Codec, Topics};
use edow_telemetry::trace::TraceContext;
use rdkafka::producer::FutureProducer;
use rdkafka::{Message, Offset};

/// Why a request was not carried out.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The request is wrong: `field` names what, `message` what to do.
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    /// Kafka or the registry could not take it; trying again later may work.
    #[error("{0:#}")]
    Unavailable(anyhow::Error),
}

impl ClientError {
    pub fn invalid(field: &str, message: impl Into<String>) -> ClientError {
        ClientError::Invalid {
            field: field.to_string(),
            message: message.into(),
        }
    }
}

impl From<anyhow::Error> for ClientError {
    fn from(e: anyhow::Error) -> ClientError {
        ClientError::Unavailable(e)
    }
}

impl From<edow_schemas::CodecError> for ClientError {
    fn from(e: edow_schemas::CodecError) -> ClientError {
        ClientError::Unavailable(e.into())
    }
}

/// Longest name, correlation id, signal name or reason accepted, in bytes.
const MAX_TEXT_BYTES: usize = 1024;

/// How requests reach the cluster.
#[derive(Clone)]
pub struct Client {
    pub kafka: Kafka,
    pub producer: FutureProducer,
    pub codec: std::sync::Arc<Codec>,
    pub topics: Topics,
    pub limits: Limits,
    pub replication_factor: i32,
    /// Opens workflow data sealed at rest (see [`crate::sealing`]).
    pub keys: Option<std::sync::Arc<edow_auth::sealing::Keyring>>,
    /// Where inputs and signal payloads over its threshold are stored by reference; `None`: the limits refuse
    /// them.
    pub blobs: Option<edow_blobs::Blobs>,
}

/// A workflow to start.
#[derive(Debug, Clone, Default)]
pub struct StartRequest {
    pub name: String,
    pub version: Option<i32>,
    /// Default: derived from the idempotency key when there is one, else new.
    pub id: Option<String>,
    /// JSON text.
    pub input: String,
    pub correlation_id: Option<String>,
    pub idempotency_key: Option<String>,
    /// Default: a new trace.
    pub trace: Option<TraceContext>,
    pub attributes: std::collections::HashMap<String, String>,
}

/// A workflow started: its id and the trace its records carry.
#[derive(Debug, Clone)]
pub struct Started {
    pub id: String,
    pub trace_id: String,
}

/// A definition deployed, or found unchanged.
#[derive(Debug, Clone)]
pub struct Deployed {
    pub name: String,
    pub version: i32,
    pub unchanged: bool,
}

impl Client {
    /// Produces the trigger of `request`. Starting an id that exists starts nothing (the orchestrator drops it),
    /// so a retried request is harmless; with an idempotency key and no id, the id is derived from the key.
    pub async fn start(&self, request: StartRequest) -> Result<Started, ClientError> {
        check_text("name", &request.name)?;
        if let Some(version) = request.version {
            if version < 1 {
                return Err(ClientError::invalid("version", "versions start at 1"));
            }
        }
        if let Some(correlation_id) = &request.correlation_id {
            check_text("correlation_id", correlation_id)?;
        }
        if let Some(key) = &request.idempotency_key {
            check_text("idempotency_key", key)?;
        }
        let id = match (&request.id, &request.idempotency_key) {
            (Some(id), _) => id.clone(),
            (None, Some(key)) => format!("{}-{:016x}", request.name, stable_hash(key)),
            (None, None) => new_id(&request.name),
        };
        check_workflow_id("id", &id)?;
        let input = self.payload("input", &id, request.input).await?;
        let trace = request.trace.unwrap_or_else(TraceContext::new_root);
        let topic = self.topics.triggers();
        let trigger = WorkflowTrigger {
            workflow_id: id.clone(),
            workflow_name: request.name,
            workflow_version: request.version,
            input,
            idempotency_key: request.idempotency_key,
            correlation_id: request.correlation_id,
            priority: 0,
            requested_at: now_millis(),
            attributes: request.attributes,
        };
        let payload = self.codec.encode(&topic, &trigger).await?;
        let record = Outgoing {
            topic,
            partition: None,
            key: id.as_bytes().to_vec(),
            payload: Some(payload),
            headers: trace.headers(),
        };
        produce_all(&self.producer, &[record]).await?;
        Ok(Started {
            id,
            trace_id: trace.trace_id_hex(),
        })
    }

    /// Produces a signal (`kind` signal with `name`, or cancel) for workflow `id`; returns the signal id.
    pub async fn signal(
        &self,
        id: &str,
        kind: SignalKind,
        name: Option<String>,
        payload: &str,
        trace: Option<TraceContext>,
    ) -> Result<String, ClientError> {
        check_workflow_id("id", id)?;
        if let Some(name) = &name {
            check_text("name", name)?;
        }
        let payload = self.payload("payload", id, payload.to_string()).await?;
        let topic = self.topics.signals();
        let signal = WorkflowSignal {
            signal_id: format!("{id}/{}", new_id("signal")),
            workflow_id: id.to_string(),
            kind,
            name,
            payload,
            correlation_id: None,
            sent_at: now_millis(),
        };
        let record = Outgoing {
            payload: Some(self.codec.encode(&topic, &signal).await?),
            topic,
            partition: None,
            key: id.as_bytes().to_vec(),
            // Without the caller's context, none: the workflow's records keep the workflow's own trace.
            headers: trace.map(|t| t.headers()).unwrap_or_default(),
        };
        produce_all(&self.producer, &[record]).await?;
        Ok(signal.signal_id)
    }

    /// `text` (JSON) as a record may carry it for workflow `owner`: within the limits, with what is over the
    /// blob threshold stored by reference when there is a blob store.
    async fn payload(&self, field: &str, owner: &str, text: String) -> Result<String, ClientError> {
        let blobs = self.blobs.as_ref().filter(|b| text.len() > b.threshold());
        let Some(blobs) = blobs else {
            self.limits
                .check_json(field, &text)
                .map_err(|r| ClientError::invalid(field, r.message))?;
            serde_json::from_str::<serde_json::Value>(&text)
                .map_err(|e| ClientError::invalid(field, format!("not a JSON document: {e}")))?;
            return Ok(text);
        };
        if text.len() > blobs.max_bytes() {
            return Err(ClientError::invalid(
                field,
                format!(
                    "{} bytes, over the blob store's limit of {} bytes (--blob-max-bytes)",
                    text.len(),
                    blobs.max_bytes()
                ),
            ));
        }
        // Depth first: parsing a hostile nesting is what the depth limit prevents.
        let depth = edow_engine::limits::json_depth(&text);
        if depth > self.limits.max_json_depth {
            return Err(ClientError::invalid(
                field,
                format!(
                    "nests arrays/objects {depth} deep; the limit is {} (max_json_depth)",
                    self.limits.max_json_depth
                ),
            ));
        }
        let value: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| ClientError::invalid(field, format!("not a JSON document: {e}")))?;
        let stored = blobs.offload(owner, value).await.map_err(|e| match e {
            edow_blobs::BlobError::Invalid(message) => ClientError::invalid(field, message),
            unavailable => ClientError::Unavailable(unavailable.into()),
        })?;
        let text = stored.to_string();
        self.limits
            .check_json(field, &text)
            .map_err(|r| ClientError::invalid(field, r.message))?;
        Ok(text)
    }

    /// Validates `source` (YAML, or JSON when `label` ends in `.json`) and publishes it as the next version of its
    /// name, unless the latest version has the same text.
    pub async fn deploy(
        &self,
        label: &str,
        source: &str,
        deployed_by: Option<String>,
    ) -> Result<Deployed, ClientError> {
        let definition = Definition::parse(label, source)
            .map_err(|e| ClientError::invalid("definition", format!("{e:#}")))?;
        // Checked before anything is published: a definition is deployed with a schedule that works or not at all.
        let schedule = match &definition.schedule {
            Some(declared) => Some(crate::schedules::of_definition(&definition, declared)?),
            None => None,
        };
        let topic = self.topics.definitions();
        self.kafka
            .ensure_topics(&[TopicSpec::new(topic.clone(), 1, self.replication_factor).compacted()])
            .await?;
        // A racing deploy may take the version this one picked: the first record of a key wins everywhere, so
        // read back, and take the next version if it was not ours.
        for _ in 0..10 {
            let catalog = DeployedCatalog::read(&self.kafka, &self.codec, &topic).await?;
            catalog.refuse_cycles(&definition)?;
            if let Some((version, latest)) = catalog.latest(&definition.name) {
                if latest == source {
                    // A retry after a deploy whose schedule write failed: the schedule is written again.
                    self.deploy_schedule(&definition.name, schedule).await?;
                    return Ok(Deployed {
                        name: definition.name,
                        version,
                        unchanged: true,
                    });
                }
            }
            let version = catalog.next_version(&definition.name);
            let format = if label.ends_with(".json") {
                DefinitionFormat::Json
            } else {
                DefinitionFormat::Yaml
            };
            let record = WorkflowDefinition {
                name: definition.name.clone(),
                version,
                format,
                source: source.to_string(),
                description: definition.description.clone(),
                deployed_by: deployed_by.clone(),
                deployed_at: now_millis(),
            };
            let payload = self.codec.encode(&topic, &record).await?;
            let written = produce_all(
                &self.producer,
                &[Outgoing {
                    topic: topic.clone(),
                    partition: Some(0),
                    // A key of its own per deploy: compaction keeps the last record of a key, so racing deploys
                    // under one key could leave the loser. Readers take the first record of a name and version.
                    key: format!("{}:{version}:{}", definition.name, new_id("claim")).into_bytes(),
                    payload: Some(payload),
                    headers: Vec::new(),
                }],
            )
            .await?;
            let ours = written.first().map(|(_, offset)| *offset).unwrap_or(-1);
            let after = DeployedCatalog::read(&self.kafka, &self.codec, &topic).await?;
            if after.first_offset(&definition.name, version) == Some(ours) {
                self.deploy_schedule(&definition.name, schedule).await?;
                return Ok(Deployed {
                    name: definition.name,
                    version,
                    unchanged: false,
                });
            }
            tracing::info!(
                name = %definition.name,
                version,
                "deployed by someone else at the same moment; trying the next version"
            );
        }
        Err(ClientError::Unavailable(anyhow::anyhow!(
            "could not deploy {}: ten racing deploys took every version this one picked; try again",
            definition.name
        )))
    }

    /// Every deployed version: (name, version) -> source (`None` when it no longer decodes).
    pub async fn definitions(
        &self,
    ) -> Result<BTreeMap<(String, i32), Option<String>>, ClientError> {
        let catalog =
            DeployedCatalog::read(&self.kafka, &self.codec, &self.topics.definitions()).await?;
        Ok(catalog
            .versions
            .into_iter()
            .map(|(key, (_, source))| (key, source))
            .collect())
    }
}

/// The deployed versions of one workflow name, oldest first.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DefinitionVersions {
    pub name: String,
    pub latest: i32,
    pub versions: Vec<i32>,
}

/// One deployed version's text; `None` when its record no longer decodes.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DefinitionSource {
    pub version: i32,
    pub source: Option<String>,
}

impl Client {
    /// Every deployed name with its versions, by name.
    pub async fn definition_names(&self) -> Result<Vec<DefinitionVersions>, ClientError> {
        let mut names: BTreeMap<String, Vec<i32>> = BTreeMap::new();
        for (name, version) in self.definitions().await?.into_keys() {
            names.entry(name).or_default().push(version);
        }
        Ok(names
            .into_iter()
            .map(|(name, versions)| DefinitionVersions {
                latest: versions.last().copied().unwrap_or_default(),
                name,
                versions,
            })
            .collect())
    }

    /// Every version of `name`, oldest first, with its text.
    pub async fn definition_versions(
        &self,
        name: &str,
    ) -> Result<Vec<DefinitionSource>, ClientError> {
        Ok(self
            .definitions()
            .await?
            .into_iter()
            .filter(|((n, _), _)| n == name)
            .map(|((_, version), source)| DefinitionSource { version, source })
            .collect())
    }
}

/// A new id: `prefix`, time, process and a counter.
pub fn new_id(prefix: &str) -> String {
    static ATTEMPTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let attempt = ATTEMPTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!(
        "{prefix}-{:x}-{:x}-{attempt:x}",
        now_millis(),
        std::process::id()
    )
}

/// FNV-1a: the same key gives the same id in every process and release.
fn stable_hash(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn check_text(field: &str, text: &str) -> Result<(), ClientError> {
    if text.trim().is_empty() {
        return Err(ClientError::invalid(field, "must not be empty"));
    }
    if text.len() > MAX_TEXT_BYTES {
        return Err(ClientError::invalid(
            field,
            format!("{} bytes, over the limit of {MAX_TEXT_BYTES}", text.len()),
        ));
    }
    Ok(())
}

fn check_workflow_id(field: &str, id: &str) -> Result<(), ClientError> {
    match crate::workflow_id_problem(id) {
        Some(problem) => Err(ClientError::invalid(field, problem)),
        None => Ok(()),
    }
}

/// What the definitions topic holds, first record of each key winning, as the orchestrators read it.
struct DeployedCatalog {
    /// (name, version) -> (offset of the first record, its source)
    versions: BTreeMap<(String, i32), (i64, Option<String>)>,
}

impl DeployedCatalog {
    async fn read(kafka: &Kafka, codec: &Codec, topic: &str) -> anyhow::Result<DeployedCatalog> {
        let records = {
            let (kafka, topic) = (kafka.clone(), topic.to_string());
            tokio::task::spawn_blocking(move || kafka.read_to_end(&topic, 0, Offset::Beginning))
                .await??
        };
        let mut versions = BTreeMap::new();
        for record in &records {
            // Versions are taken by key, so a record that no longer decodes still holds its version.
            // `name:version`, or `name:version:claim` since deploys claim keys of their own.
            let Some((name, version)) = record
                .key()
                .and_then(|k| std::str::from_utf8(k).ok())
                .map(|k| k.split(':'))
                .and_then(|mut parts| {
                    let name = parts.next()?.to_string();
                    Some((name, parts.next()?.parse::<i32>().ok()?))
                })
            else {
                continue;
            };
            if versions.contains_key(&(name.clone(), version)) || record.payload().is_none() {
                continue;
            }
            let source = match codec.decode::<WorkflowDefinition>(record.payload()).await {
                Ok(deployed) => Some(deployed.source),
                Err(e) if e.is_transient() => {
                    anyhow::bail!("could not read the deployed definitions: {e}")
                }
                Err(_) => None,
            };
            versions.insert((name, version), (record.offset(), source));
        }
        Ok(DeployedCatalog { versions })
    }

    fn latest(&self, name: &str) -> Option<(i32, String)> {
        self.versions
            .iter()
            .rev()
            .find(|((n, _), _)| n == name)
            .and_then(|((_, v), (_, source))| Some((*v, source.clone()?)))
    }

    fn next_version(&self, name: &str) -> i32 {
        self.versions
            .keys()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| *v)
            .max()
            .map_or(1, |v| v.saturating_add(1))
    }

    fn first_offset(&self, name: &str, version: i32) -> Option<i64> {
        self.versions
            .get(&(name.to_string(), version))
            .map(|(offset, _)| *offset)
    }

    /// Refuses `definition` when its children, through the latest deployed versions, lead back to it.
    fn refuse_cycles(&self, definition: &Definition) -> Result<(), ClientError> {
        let mut children: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for ((name, _), (_, source)) in &self.versions {
            if let Some(parsed) = source
                .as_deref()
                .and_then(|s| Definition::parse(name, s).ok())
            {
                // Later versions come later in the map and replace earlier ones.
                children.insert(name.clone(), parsed.child_workflows());
            }
        }
        children.insert(definition.name.clone(), definition.child_workflows());
        let mut path = vec![definition.name.clone()];
        let mut explored = HashSet::new();
        if let Some(cycle) = find_cycle(&children, &mut path, &mut explored) {
            return Err(ClientError::invalid(
                "definition",
                format!(
                    "{} would start a cycle of child workflows without end: {}; break the chain before deploying",
                    definition.name,
                    cycle.join(" -> ")
                ),
            ));
        }
        Ok(())
    }
}

/// A path from `path[0]` back to itself through `children`, if any. Each definition is explored once
/// (`explored` holds those from which no path leads back), so a wide, layered catalog takes linear time.
fn find_cycle(
    children: &BTreeMap<String, Vec<String>>,
    path: &mut Vec<String>,
    explored: &mut HashSet<String>,
) -> Option<Vec<String>> {
    let last = path.last()?.clone();
    for child in children.get(&last).into_iter().flatten() {
        if *child == path[0] {
            let mut cycle = path.clone();
            cycle.push(child.clone());
            return Some(cycle);
        }
        if path.contains(child) || explored.contains(child) {
            continue;
        }
        path.push(child.clone());
        if let Some(cycle) = find_cycle(children, path, explored) {
            return Some(cycle);
        }
        path.pop();
    }
    explored.insert(last);
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MAX_WORKFLOW_ID_BYTES;

    #[test]
    fn ids_from_one_idempotency_key_agree() {
        assert_eq!(stable_hash("order-7"), stable_hash("order-7"));
        assert_ne!(stable_hash("order-7"), stable_hash("order-8"));
    }

    #[test]
    fn bad_ids_and_texts_name_their_field() {
        let err = check_workflow_id("id", "__edow.marker").unwrap_err();
        assert!(err.to_string().starts_with("id: "), "{err}");
        assert!(check_workflow_id("id", &"x".repeat(MAX_WORKFLOW_ID_BYTES + 1)).is_err());
        assert!(check_text("name", " ").is_err());
    }

    fn graph(edges: &[(&str, &[&str])]) -> BTreeMap<String, Vec<String>> {
        edges
            .iter()
            .map(|(from, to)| (from.to_string(), to.iter().map(|t| t.to_string()).collect()))
            .collect()
    }

    fn cycle_from(children: &BTreeMap<String, Vec<String>>, start: &str) -> Option<Vec<String>> {
        let mut explored = std::collections::HashSet::new();
        find_cycle(children, &mut vec![start.to_string()], &mut explored)
    }

    #[test]
    fn a_chain_of_children_back_to_the_start_is_a_cycle() {
        let children = graph(&[("a", &["b"]), ("b", &["c", "d"]), ("d", &["a"])]);
        assert_eq!(cycle_from(&children, "a").unwrap(), ["a", "b", "d", "a"]);
        assert_eq!(cycle_from(&children, "c"), None);
    }

    #[test]
    fn a_wide_layered_catalog_is_searched_in_linear_time() {
        // 60 layers of two definitions, each starting both of the next layer: 2^60 paths, 120 nodes.
        let mut children = BTreeMap::new();
        for layer in 0..60 {
            let next = vec![format!("l{}a", layer + 1), format!("l{}b", layer + 1)];
            children.insert(format!("l{layer}a"), next.clone());
            children.insert(format!("l{layer}b"), next);
        }
        children.insert(
            "start".to_string(),
            vec!["l0a".to_string(), "l0b".to_string()],
        );
        assert_eq!(cycle_from(&children, "start"), None);
    }
}
