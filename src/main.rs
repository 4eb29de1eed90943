//! `edow`: the user-facing command line. Registers the contracts, deploys definitions, starts workflows, and
//! shows their status and lifecycle events, all through Kafka and the schema registry.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use edow_engine::Definition;
use edow_kafka::murmur2::partition_for;
use edow_kafka::{now_millis, produce_all, Kafka, Outgoing, TopicSpec};
use edow_schemas::contracts::{
    fixed_topic_contracts, DefinitionFormat, LifecycleEvent, SignalKind, WorkflowDefinition,
    WorkflowSignal, WorkflowState, WorkflowTrigger,
};
use edow_schemas::topics::value_subject;
use edow_schemas::{Codec, Topics};
use edow_telemetry::trace::TraceContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::{Message, Offset, TopicPartitionList};

mod bench;
mod load;

#[derive(Parser, Debug)]
#[command(version, about = "edow: a Kafka-native workflow orchestrator")]
struct Cli {
    /// Kafka bootstrap servers.
    #[arg(
        long,
        global = true,
        env = "EDOW_BOOTSTRAP_SERVERS",
        default_value = "127.0.0.1:9092"
    )]
    bootstrap_servers: String,
    /// Schema registry URL.
    #[arg(
        long,
        global = true,
        env = "EDOW_SCHEMA_REGISTRY_URL",
        default_value = "http://127.0.0.1:8081"
    )]
    registry: String,
    /// Prefix of every edow topic.
    #[arg(
        long,
        global = true,
        env = "EDOW_TOPIC_PREFIX",
        default_value = "edow."
    )]
    topic_prefix: String,
    /// Replication factor of the definitions topic when `deploy` has to create it.
    #[arg(
        long,
        global = true,
        env = "EDOW_REPLICATION_FACTOR",
        default_value_t = 1
    )]
    replication_factor: i32,
    /// A librdkafka setting over edow's own, as KEY=VALUE; repeat it, or comma-separate them in the variable.
    #[arg(
        long = "kafka-option",
        global = true,
        env = "EDOW_KAFKA_OPTIONS",
        value_delimiter = ',',
        value_parser = edow_kafka::args::parse_option
    )]
    kafka_options: Vec<(String, String)>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// The Avro contracts in the schema registry.
    Schemas {
        #[command(subcommand)]
        action: SchemasAction,
    },
    /// Validate workflow definitions (YAML or JSON) and deploy each as its next version.
    Deploy {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Start a workflow instance.
    Start {
        /// Name of a deployed workflow.
        name: String,
        /// Input, a JSON document.
        #[arg(long, default_value = "{}")]
        input: String,
        /// Instance id; starting an id that exists starts nothing. Default: a new id.
        #[arg(long)]
        id: Option<String>,
        /// Definition version to pin (default: the latest deployed).
        #[arg(long)]
        version: Option<i32>,
        #[arg(long)]
        correlation_id: Option<String>,
        /// The W3C trace context to start the workflow in (default: a new trace); every record of the workflow
        /// carries its trace id, printed on stderr.
        #[arg(long, env = "TRACEPARENT")]
        traceparent: Option<String>,
    },
    /// Send a named signal to a running instance (a wait step listening for it continues).
    Signal {
        id: String,
        name: String,
        /// Payload, a JSON document; the wait step's output.
        #[arg(long, default_value = "null")]
        payload: String,
    },
    /// Cancel a running instance: its completed steps are compensated, then it ends as cancelled.
    Cancel {
        id: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Show an instance's latest state from the changelog.
    Status { id: String },
    /// Start many instances at once, follow them to the end, and print progress and a latency summary.
    Load {
        /// Name of a deployed workflow.
        name: String,
        /// How many instances.
        #[arg(long, default_value_t = 100)]
        count: usize,
        /// Input of every instance, a JSON document; `{i}` is replaced by the instance's number.
        #[arg(long, default_value = r#"{"order": {i}}"#)]
        input: String,
        /// Prefix of the instance ids (`<prefix>-<i>`); default: the name and the time.
        #[arg(long)]
        id_prefix: Option<String>,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
        /// Only start them: produce the triggers and exit without following the instances.
        #[arg(long)]
        no_wait: bool,
        /// Follow the instances only until every one has started (its state is in the changelog then).
        #[arg(long, conflicts_with = "no_wait")]
        until_started: bool,
    },
    /// Measure edow against the raw Kafka ceiling on this cluster: closed loops at each in-flight level, with
    /// throughput, client-side latency percentiles and CPU per process (see scripts/bench, which starts a stack).
    Bench(bench::Bench),
    /// Print an instance's lifecycle events as they happen, until it ends.
    Watch {
        id: String,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
}

#[derive(Subcommand, Debug)]
enum SchemasAction {
    /// Register every fixed topic's contract (idempotent) and print subjects and ids.
    Register,
    /// Print the subjects of the fixed topics with their ids.
    List,
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli).await {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let topics = Topics::new(cli.topic_prefix.clone());
    let mut kafka = Kafka::new(cli.bootstrap_servers.clone());
    kafka.options = cli.kafka_options.clone();
    let codec = Codec::new(&cli.registry)?;
    match cli.command {
        Command::Schemas { action } => schemas(&codec, &cli.registry, &topics, action).await,
        Command::Deploy { files } => {
            for file in files {
                deploy(&kafka, &codec, &topics, &file, cli.replication_factor).await?;
            }
            Ok(())
        }
        Command::Start {
            name,
            input,
            id,
            version,
            correlation_id,
            traceparent,
        } => {
            let trace = match traceparent.as_deref().filter(|t| !t.trim().is_empty()) {
                Some(text) => TraceContext::parse(text, None).with_context(|| {
                    format!(
                        "--traceparent (or TRACEPARENT) is not a W3C traceparent: {text:?}; write \
                         00-<32 hex trace id>-<16 hex span id>-<2 hex flags>, or leave it out"
                    )
                })?,
                None => TraceContext::new_root(),
            };
            let id = start(
                &kafka,
                &codec,
                &topics,
                &name,
                &input,
                id,
                version,
                correlation_id,
                &trace,
            )
            .await?;
            println!("{id}");
            eprintln!("trace id {}", trace.trace_id_hex());
            Ok(())
        }
        Command::Load {
            name,
            count,
            input,
            id_prefix,
            timeout,
            no_wait,
            until_started,
        } => {
            let prefix = id_prefix.unwrap_or_else(|| format!("{name}-{:x}", now_millis()));
            let settings = load::Load {
                name,
                count,
                input,
                prefix,
                timeout: Duration::from_secs(timeout),
                no_wait,
                until_started,
            };
            load::run(&kafka, &codec, &topics, settings).await
        }
        Command::Bench(settings) => bench::run(&kafka, &codec, &topics, settings).await,
        Command::Signal { id, name, payload } => {
            signal(
                &kafka,
                &codec,
                &topics,
                &id,
                SignalKind::Signal,
                Some(name),
                &payload,
            )
            .await
        }
        Command::Cancel { id, reason } => {
            let payload = serde_json::Value::String(reason).to_string();
            signal(
                &kafka,
                &codec,
                &topics,
                &id,
                SignalKind::Cancel,
                None,
                &payload,
            )
            .await
        }
        Command::Status { id } => status(&kafka, &codec, &topics, &id).await,
        Command::Watch { id, timeout } => {
            watch(&kafka, &codec, &topics, &id, Duration::from_secs(timeout)).await
        }
    }
}

async fn schemas(
    codec: &Codec,
    registry: &str,
    topics: &Topics,
    action: SchemasAction,
) -> anyhow::Result<()> {
    println!("{:<32} {:<40} {:>4}", "SUBJECT", "CONTRACT", "ID");
    for (topic, name, schema) in fixed_topic_contracts(topics) {
        let subject = value_subject(&topic);
        let id = match action {
            SchemasAction::Register => codec
                .register_text(&subject, name, schema)
                .await
                .with_context(|| format!("registering {name} under {subject} at {registry}"))?,
            SchemasAction::List => {
                codec.lookup_text(&subject, schema).await.with_context(|| {
                    format!("looking up {subject} at {registry}; run `edow schemas register` first")
                })?
            }
        };
        println!("{subject:<32} {name:<40} {id:>4}");
    }
    Ok(())
}

/// Reads a blocking Kafka result on the blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(f).await?
}

async fn deploy(
    kafka: &Kafka,
    codec: &Codec,
    topics: &Topics,
    file: &PathBuf,
    replication_factor: i32,
) -> anyhow::Result<()> {
    let label = file.display().to_string();
    let source = std::fs::read_to_string(file).with_context(|| format!("reading {label}"))?;
    let definition = Definition::parse(&label, &source)?;
    let topic = topics.definitions();
    kafka
        .ensure_topics(&[TopicSpec::new(topic.clone(), 1, replication_factor).compacted()])
        .await?;
    let producer = kafka.producer()?;
    // A racing deploy may take the version this one picked: the first record of a key wins everywhere, so read
    // back, and take the next version if it was not ours.
    for _ in 0..10 {
        let catalog = DeployedCatalog::read(kafka, codec, &topic).await?;
        catalog.refuse_cycles(&definition)?;
        if let Some((version, latest)) = catalog.latest(&definition.name) {
            if latest == source {
                println!(
                    "{} version {version} is unchanged ({label})",
                    definition.name
                );
                return Ok(());
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
            source: source.clone(),
            description: definition.description.clone(),
            deployed_by: std::env::var("USER").ok(),
            deployed_at: now_millis(),
        };
        let payload = codec.encode(&topic, &record).await?;
        let written = produce_all(
            &producer,
            &[Outgoing {
                topic: topic.clone(),
                partition: Some(0),
                // A key of its own per deploy: compaction keeps the last record of a key, so racing deploys under
                // one key could leave the loser. Readers take the first record of a name and version.
                key: format!("{}:{version}:{}", definition.name, claim_id()).into_bytes(),
                payload: Some(payload),
                headers: Vec::new(),
            }],
        )
        .await?;
        let ours = written.first().map(|(_, offset)| *offset).unwrap_or(-1);
        let after = DeployedCatalog::read(kafka, codec, &topic).await?;
        match after.first_offset(&definition.name, version) {
            Some(offset) if offset == ours => {
                println!("deployed {} version {version} ({label})", definition.name);
                return Ok(());
            }
            _ => eprintln!(
                "{} version {version} was deployed by someone else at the same moment; trying the next version",
                definition.name
            ),
        }
    }
    bail!(
        "could not deploy {}: ten racing deploys took every version this one picked; try again",
        definition.name
    )
}

/// A claim id unique to this deploy attempt: time, process and a counter.
fn claim_id() -> String {
    static ATTEMPTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let attempt = ATTEMPTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{:x}-{:x}-{attempt}", now_millis(), std::process::id())
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
            blocking(move || kafka.read_to_end(&topic, 0, Offset::Beginning)).await?
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
                    bail!("could not read the deployed definitions to pick a version: {e}")
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
    fn refuse_cycles(&self, definition: &Definition) -> anyhow::Result<()> {
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
        let mut explored = std::collections::HashSet::new();
        if let Some(cycle) = find_cycle(&children, &mut path, &mut explored) {
            bail!(
                "{} would start a cycle of child workflows without end: {}; break the chain before deploying",
                definition.name,
                cycle.join(" -> ")
            );
        }
        Ok(())
    }
}

/// A path from `path[0]` back to itself through `children`, if any. Each definition is explored once
/// (`explored` holds those from which no path leads back), so a wide, layered catalog takes linear time.
fn find_cycle(
    children: &BTreeMap<String, Vec<String>>,
    path: &mut Vec<String>,
    explored: &mut std::collections::HashSet<String>,
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

#[allow(clippy::too_many_arguments)]
async fn start(
    kafka: &Kafka,
    codec: &Codec,
    topics: &Topics,
    name: &str,
    input: &str,
    id: Option<String>,
    version: Option<i32>,
    correlation_id: Option<String>,
    trace: &TraceContext,
) -> anyhow::Result<String> {
    serde_json::from_str::<serde_json::Value>(input)
        .with_context(|| format!("--input is not a JSON document: {input}"))?;
    let topic = topics.triggers();
    let partitions = {
        let (kafka, topic) = (kafka.clone(), topic.clone());
        blocking(move || kafka.partition_count(&topic)).await?
    };
    if partitions == 0 {
        bail!("topic {topic} does not exist; start the orchestrator first (it creates its topics)");
    }
    let id = id.unwrap_or_else(|| format!("{name}-{:x}-{:x}", now_millis(), std::process::id()));
    let trigger = WorkflowTrigger {
        workflow_id: id.clone(),
        workflow_name: name.to_string(),
        workflow_version: version,
        input: input.to_string(),
        idempotency_key: None,
        correlation_id,
        priority: 0,
        requested_at: now_millis(),
        attributes: Default::default(),
    };
    let payload = codec.encode(&topic, &trigger).await?;
    produce_all(
        &kafka.producer()?,
        &[Outgoing {
            topic,
            partition: None,
            key: id.as_bytes().to_vec(),
            payload: Some(payload),
            headers: trace.headers(),
        }],
    )
    .await?;
    Ok(id)
}

/// The partition of `topic` holding workflow `id`.
async fn home_partition(kafka: &Kafka, topic: &str, id: &str) -> anyhow::Result<i32> {
    let partitions = {
        let (kafka, topic) = (kafka.clone(), topic.to_string());
        blocking(move || kafka.partition_count(&topic)).await?
    };
    if partitions == 0 {
        bail!(
            "topic {topic} does not exist; is the orchestrator running with prefix of this topic?"
        );
    }
    Ok(partition_for(id.as_bytes(), partitions as i32))
}

async fn status(kafka: &Kafka, codec: &Codec, topics: &Topics, id: &str) -> anyhow::Result<()> {
    let topic = topics.state();
    let partition = home_partition(kafka, &topic, id).await?;
    let records = {
        let (kafka, topic) = (kafka.clone(), topic.clone());
        blocking(move || kafka.read_to_end(&topic, partition, Offset::Beginning)).await?
    };
    let latest = records
        .iter()
        .rev()
        .find(|r| r.key() == Some(id.as_bytes()));
    let Some(record) = latest.filter(|r| r.payload().is_some()) else {
        bail!("no workflow {id}: it was never started, not yet picked up, or purged");
    };
    let state: WorkflowState = codec.decode(record.payload()).await?;
    let engine: serde_json::Value = serde_json::from_str(&state.engine_state).unwrap_or_default();
    let instance: Option<edow_engine::Instance> =
        serde_json::from_value(engine["instance"].clone()).ok();
    println!("workflow   {}", state.workflow_id);
    println!(
        "definition {} version {}",
        state.workflow_name, state.workflow_version
    );
    println!("status     {:?}", state.status);
    for (step, doing) in instance.iter().flat_map(|i| i.running_steps()) {
        println!("step       {step}: {doing}");
    }
    println!("input      {}", state.input);
    if let Some(output) = &state.output {
        println!("output     {output}");
    }
    if let Some(error) = &state.error {
        println!("error      {error}");
    }
    println!("changes    {}", state.sequence);
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn signal(
    kafka: &Kafka,
    codec: &Codec,
    topics: &Topics,
    id: &str,
    kind: SignalKind,
    name: Option<String>,
    payload: &str,
) -> anyhow::Result<()> {
    serde_json::from_str::<serde_json::Value>(payload)
        .with_context(|| format!("--payload is not a JSON document: {payload}"))?;
    let topic = topics.signals();
    let signal = WorkflowSignal {
        signal_id: format!("{id}/{:x}-{:x}", now_millis(), std::process::id()),
        workflow_id: id.to_string(),
        kind,
        name,
        payload: payload.to_string(),
        correlation_id: None,
        sent_at: now_millis(),
    };
    let record = Outgoing {
        payload: Some(codec.encode(&topic, &signal).await?),
        topic,
        partition: None,
        key: id.as_bytes().to_vec(),
        headers: Vec::new(),
    };
    produce_all(&kafka.producer()?, &[record]).await?;
    println!("{}", signal.signal_id);
    Ok(())
}

async fn watch(
    kafka: &Kafka,
    codec: &Codec,
    topics: &Topics,
    id: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    let topic = topics.events();
    let partition = home_partition(kafka, &topic, id).await?;
    let consumer: StreamConsumer = kafka.group_consumer_config("edow-cli-watch").create()?;
    let mut assignment = TopicPartitionList::new();
    assignment.add_partition_offset(&topic, partition, Offset::Beginning)?;
    consumer.assign(&assignment)?;
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let msg = tokio::time::timeout_at(deadline, consumer.recv())
            .await
            .with_context(|| format!("workflow {id} did not end within {timeout:?}"))??;
        if msg.key() != Some(id.as_bytes()) {
            continue;
        }
        let event: LifecycleEvent = codec.decode(msg.payload()).await?;
        let step = event.step.as_deref().unwrap_or("");
        let attempt = event
            .attempt
            .map(|a| format!(" attempt {a}"))
            .unwrap_or_default();
        let detail = event.detail.as_deref().unwrap_or("");
        println!("{} {:?} {step}{attempt} {detail}", event.at, event.kind);
        if event.kind.ends_workflow() {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
