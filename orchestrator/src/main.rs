//! `orchestrator`: drives edow workflows from triggers and task results; state in a compacted changelog topic.

use std::time::Duration;

use clap::Parser;
use edow_kafka::Kafka;
use edow_schemas::Topics;

#[derive(Parser, Debug)]
#[command(version, about = "edow orchestrator")]
struct Args {
    /// Kafka bootstrap servers.
    #[arg(long, env = "EDOW_BOOTSTRAP_SERVERS", default_value = "127.0.0.1:9092")]
    bootstrap_servers: String,
    /// Schema registry URL.
    #[arg(
        long,
        env = "EDOW_SCHEMA_REGISTRY_URL",
        default_value = "http://127.0.0.1:8081"
    )]
    registry: String,
    /// Prefix of every edow topic.
    #[arg(long, env = "EDOW_TOPIC_PREFIX", default_value = "edow.")]
    topic_prefix: String,
    /// Partitions of the triggers, signals, results, state and events topics (fixed once created).
    #[arg(long, env = "EDOW_PARTITIONS", default_value_t = 6)]
    partitions: i32,
    /// Partitions of each task topic created.
    #[arg(long, env = "EDOW_TASK_PARTITIONS", default_value_t = 6)]
    task_partitions: i32,
    /// Replication factor of the topics created.
    #[arg(long, env = "EDOW_REPLICATION_FACTOR", default_value_t = 1)]
    replication_factor: i32,
    /// Consumer group of the orchestrator instances.
    #[arg(
        long,
        env = "EDOW_ORCHESTRATOR_GROUP",
        default_value = "edow-orchestrator"
    )]
    group: String,
    /// Most inputs applied per batch.
    #[arg(long, env = "EDOW_MAX_BATCH", default_value_t = 500)]
    max_batch: usize,
    /// Consumer group session timeout in milliseconds: how long a dead instance keeps its partitions.
    #[arg(long, env = "EDOW_SESSION_TIMEOUT_MS", default_value_t = 6000)]
    session_timeout_ms: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    edow_kafka::process::init_logging();
    let args = Args::parse();
    let mut kafka = Kafka::new(args.bootstrap_servers);
    kafka.session_timeout = Duration::from_millis(args.session_timeout_ms);
    let config = edow_orchestrator::Config {
        kafka,
        registry_url: args.registry,
        topics: Topics::new(args.topic_prefix),
        partitions: args.partitions,
        task_partitions: args.task_partitions,
        replication_factor: args.replication_factor,
        group: args.group,
        max_batch: args.max_batch,
        tick: Duration::from_millis(50),
    };
    edow_orchestrator::run(config, edow_kafka::process::shutdown_signal()).await
}
