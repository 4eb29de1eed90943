//! `orchestrator`: drives edow workflows from triggers and task results; state in a compacted changelog topic.

use std::time::Duration;

use clap::Parser;
use edow_kafka::args::ClusterArgs;

#[derive(Parser, Debug)]
#[command(version, about = "edow orchestrator")]
struct Args {
    #[command(flatten)]
    cluster: ClusterArgs,
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
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    edow_kafka::process::init_logging();
    let args = Args::parse();
    let config = edow_orchestrator::Config {
        kafka: args.cluster.kafka(),
        topics: args.cluster.topics(),
        registry_url: args.cluster.registry,
        partitions: args.cluster.partitions,
        task_partitions: args.cluster.task_partitions,
        replication_factor: args.cluster.replication_factor,
        group: args.group,
        max_batch: args.max_batch,
        tick: Duration::from_millis(50),
    };
    edow_orchestrator::run(config, edow_kafka::process::shutdown_signal()).await
}
