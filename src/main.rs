//! `edow`: the user-facing command line. Registers the contracts, deploys definitions, starts workflows, and
//! shows their status and lifecycle events, all through Kafka and the schema registry.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use edow_kafka::murmur2::partition_for;
use edow_kafka::{now_millis, Kafka};
use edow_orchestrator::client::{Client, StartRequest};
use edow_schemas::contracts::{fixed_topic_contracts, LifecycleEvent, SignalKind};
use edow_schemas::topics::value_subject;
use edow_schemas::{Codec, Topics};
use edow_telemetry::trace::TraceContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::{Message, Offset, TopicPartitionList};

mod bench;
mod dlq;
mod load;
mod output;
mod schedule;
mod workflows;

use output::Output;

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
    #[command(flatten)]
    kafka_settings: edow_kafka::settings::KafkaArgs,
    #[command(flatten)]
    encryption: edow_orchestrator::sealing::EncryptionArgs,
    /// Inputs and signal payloads over the threshold go to this blob store (the orchestrator's and workers').
    #[command(flatten)]
    blobs: edow_blobs::args::BlobArgs,
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
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Deployed definitions: every name with its versions, or every version of NAME with its text.
    Definitions {
        name: Option<String>,
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Start a workflow instance.
    Start {
        /// Name of a deployed workflow.
        name: String,
        /// Input, a JSON document; @FILE reads it from a file, - from stdin (large inputs go to the blob store).
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
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Send a named signal to a running instance (a wait step listening for it continues).
    Signal {
        id: String,
        name: String,
        /// Payload, a JSON document (@FILE: from a file, -: from stdin); the wait step's output.
        #[arg(long, default_value = "null")]
        payload: String,
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Cancel a running instance: its completed steps are compensated, then it ends as cancelled.
    Cancel {
        id: String,
        #[arg(long, default_value = "")]
        reason: String,
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Show an instance's latest state from the changelog, with its running steps.
    Status {
        id: String,
        /// Also its lifecycle events, oldest first (reads the workflow's events partition).
        #[arg(long)]
        history: bool,
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// List workflows of every partition, newest first, filtered by name, status, correlation id and start time.
    List(workflows::ListArgs),
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
    /// Dead letters: list, show, replay.
    #[command(subcommand)]
    Dlq(dlq::Dlq),
    /// Cron schedules: create, list, delete.
    #[command(subcommand)]
    Schedule(schedule::ScheduleCommand),
    /// API tokens: `edow token new --role operator --name ci` prints a new token and its line for the
    /// orchestrator's --api-tokens file (which keeps only the token's SHA-256).
    #[command(subcommand)]
    Token(TokenCommand),
    /// Encryption keys: `edow key new --id k2` prints a line for the --encryption-keys file (put it first to
    /// seal with it; keep the old lines until nothing sealed with them is left).
    #[command(subcommand)]
    Key(KeyCommand),
    /// Print an instance's lifecycle events as they happen, until it ends.
    Watch {
        id: String,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
}

#[derive(Subcommand, Debug)]
enum TokenCommand {
    /// Make a new random token: the token itself (give it to the caller, once) and the line to add to the
    /// token file.
    New {
        /// viewer (reads), operator (also starts, signals, cancels, replays), admin (also deploys, schedules).
        #[arg(long)]
        role: String,
        /// Who holds it, as logs and `deployed_by` name it.
        #[arg(long, default_value = "token")]
        name: String,
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
}

#[derive(Subcommand, Debug)]
enum KeyCommand {
    /// Make a new random 256-bit key and print its key file line.
    New {
        /// The key's id, recorded with every value it seals.
        #[arg(long)]
        id: String,
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
    let settings = cli.kafka_settings.settings().unwrap_or_default();
    if let Err(e) = run(cli).await {
        eprintln!(
            "error: {}",
            edow_kafka::settings::scrub(&format!("{e:#}"), &settings)
        );
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let topics = Topics::new(cli.topic_prefix.clone());
    let mut kafka = Kafka::new(cli.bootstrap_servers.clone());
    kafka.options = cli.kafka_settings.settings()?;
    let codec = Arc::new(Codec::new(&cli.registry)?);
    let client = Client {
        kafka: kafka.clone(),
        producer: kafka.producer()?,
        codec: codec.clone(),
        topics: topics.clone(),
        limits: edow_engine::Limits::default(),
        replication_factor: cli.replication_factor,
        keys: cli.encryption.keyring()?,
        blobs: cli.blobs.open()?,
    };
    match cli.command {
        Command::Schemas { action } => schemas(&codec, &cli.registry, &topics, action).await,
        Command::Deploy { files, output } => {
            let mut deployed = Vec::new();
            for file in files {
                deployed.push(deploy(&client, &file, output).await?);
            }
            if output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&deployed)?);
            }
            Ok(())
        }
        Command::Definitions { name, output } => {
            workflows::definitions(&client, name, output).await
        }
        Command::List(args) => workflows::list(&client, args).await,
        Command::Start {
            name,
            input,
            id,
            version,
            correlation_id,
            traceparent,
            output,
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
            let request = StartRequest {
                name,
                version,
                id,
                input: json_argument("--input", input)?,
                correlation_id,
                trace: Some(trace.clone()),
                ..StartRequest::default()
            };
            let id = start(&client, request).await?;
            let trace_id = trace.trace_id_hex();
            output.print(&serde_json::json!({"id": id, "trace_id": trace_id}), |_| {
                println!("{id}");
                eprintln!("trace id {trace_id}");
            })
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
        Command::Signal {
            id,
            name,
            payload,
            output,
        } => {
            let signal_id = client
                .signal(
                    &id,
                    SignalKind::Signal,
                    Some(name),
                    &json_argument("--payload", payload)?,
                    None,
                )
                .await?;
            print_signal_id(&signal_id, output)
        }
        Command::Cancel { id, reason, output } => {
            let payload = serde_json::Value::String(reason).to_string();
            let signal_id = client
                .signal(&id, SignalKind::Cancel, None, &payload, None)
                .await?;
            print_signal_id(&signal_id, output)
        }
        Command::Dlq(command) => dlq::run(&client, command).await,
        Command::Token(TokenCommand::New { role, name, output }) => new_token(&role, &name, output),
        Command::Key(KeyCommand::New { id }) => {
            println!("{}", edow_auth::sealing::new_key_line(&id)?);
            eprintln!(
                "add the line to the --encryption-keys file of the orchestrator and of the CLI"
            );
            Ok(())
        }
        Command::Schedule(command) => schedule::run(&client, command).await,
        Command::Status {
            id,
            history,
            output,
        } => workflows::status(&client, &id, history, output).await,
        Command::Watch { id, timeout } => watch(&client, &id, Duration::from_secs(timeout)).await,
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

fn new_token(role: &str, name: &str, output: Output) -> anyhow::Result<()> {
    use edow_orchestrator::api::auth;
    let role = auth::Role::parse(role)
        .with_context(|| format!("--role {role:?}: one of viewer, operator, admin"))?;
    if name.is_empty() || name.len() > 64 || !name.bytes().all(|b| b.is_ascii_graphic()) {
        bail!("--name {name:?}: 1 to 64 visible characters, no spaces");
    }
    let (token, line) = auth::new_token(role, name)?;
    output.print(&serde_json::json!({"token": token, "line": line}), |_| {
        println!("token  {token}");
        println!("line   {line}");
        eprintln!(
            "add the line to the orchestrator's --api-tokens file; the token is shown only now"
        );
    })
}

/// A JSON argument as given, or read from the file it names with `@FILE`, or from stdin for `-` (curl's
/// convention): inputs too large for a command line.
fn json_argument(flag: &str, value: String) -> anyhow::Result<String> {
    use std::io::Read;
    if value == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .with_context(|| format!("{flag} -: cannot read stdin as UTF-8 text"))?;
        return Ok(text);
    }
    match value.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("{flag} @{path}: cannot read the file as UTF-8 text")),
        None => Ok(value),
    }
}

fn print_signal_id(signal_id: &str, output: Output) -> anyhow::Result<()> {
    output.print(&serde_json::json!({ "signal_id": signal_id }), |_| {
        println!("{signal_id}")
    })
}

/// Deploys one file, printing what happened unless the output is JSON (the caller prints all files then).
async fn deploy(
    client: &Client,
    file: &PathBuf,
    output: Output,
) -> anyhow::Result<serde_json::Value> {
    let label = file.display().to_string();
    let source = std::fs::read_to_string(file).with_context(|| format!("reading {label}"))?;
    let deployed = client
        .deploy(&label, &source, std::env::var("USER").ok())
        .await?;
    let answer = serde_json::json!({
        "file": label, "name": deployed.name, "version": deployed.version, "unchanged": deployed.unchanged,
    });
    if output == Output::Json {
        return Ok(answer);
    }
    if deployed.unchanged {
        println!(
            "{} version {} is unchanged ({label})",
            deployed.name, deployed.version
        );
    } else {
        println!(
            "deployed {} version {} ({label})",
            deployed.name, deployed.version
        );
    }
    Ok(answer)
}

/// Starts a workflow through `client`, once the orchestrator has made its topics.
async fn start(client: &Client, request: StartRequest) -> anyhow::Result<String> {
    let topic = client.topics.triggers();
    let partitions = {
        let (kafka, topic) = (client.kafka.clone(), topic.clone());
        blocking(move || kafka.partition_count(&topic)).await?
    };
    if partitions == 0 {
        bail!("topic {topic} does not exist; start the orchestrator first (it creates its topics)");
    }
    Ok(client.start(request).await?.id)
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

async fn watch(client: &Client, id: &str, timeout: Duration) -> anyhow::Result<()> {
    let (kafka, codec) = (&client.kafka, &client.codec);
    let topic = client.topics.events();
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
        let detail = match event.detail.clone() {
            Some(detail) => edow_orchestrator::sealing::open_text(
                client.keys.as_deref(),
                &event.event_id,
                "detail",
                detail,
            )
            .unwrap_or_else(|e| format!("[unreadable: {e}]")),
            None => String::new(),
        };
        println!("{} {:?} {step}{attempt} {detail}", event.at, event.kind);
        if event.kind.ends_workflow() {
            return Ok(());
        }
    }
}
