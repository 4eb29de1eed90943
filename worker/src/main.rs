//! `worker`: runs edow tasks of the types it serves and publishes their results.

use std::collections::HashMap;
use std::time::Duration;

use clap::Parser;
use edow_kafka::args::ClusterArgs;

#[derive(Parser, Debug)]
#[command(version, about = "edow worker")]
struct Args {
    /// A task type and its handler, repeatable: TYPE=HANDLER with HANDLER one of echo, trail, sleep:DURATION,
    /// fail:N, fail:always, http:URL, exec:COMMAND.
    #[arg(long = "task", value_name = "TYPE=HANDLER", required = true)]
    tasks: Vec<String>,
    #[command(flatten)]
    cluster: ClusterArgs,
    /// Consumer group of the workers.
    #[arg(long, env = "EDOW_WORKER_GROUP", default_value = "edow-workers")]
    group: String,
    /// This worker's id in results and logs (default: host name and pid).
    #[arg(long, env = "EDOW_WORKER_ID")]
    worker_id: Option<String>,
    /// Tasks run at once.
    #[arg(long, env = "EDOW_WORKER_CONCURRENCY", default_value_t = 32)]
    concurrency: usize,
    /// Longest a handler may run before the attempt fails as a retryable timeout.
    #[arg(long, env = "EDOW_TASK_TIMEOUT", default_value = "5m", value_parser = humantime::parse_duration)]
    task_timeout: Duration,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    edow_kafka::process::init_logging();
    let args = Args::parse();
    let mut handlers = HashMap::new();
    for spec in &args.tasks {
        let (task_type, handler) = spec.split_once('=').ok_or_else(|| {
            anyhow::anyhow!("--task {spec}: write TYPE=HANDLER, e.g. --task payment.charge=echo")
        })?;
        let handler = edow_worker::handlers::builtin(handler, args.task_timeout)
            .map_err(|e| anyhow::anyhow!("--task {spec}: {e}"))?;
        handlers.insert(task_type.to_string(), handler);
    }
    let worker_id = args.worker_id.unwrap_or_else(|| {
        let host = std::fs::read_to_string("/etc/hostname").unwrap_or_else(|_| "worker".into());
        format!("{}-{}", host.trim(), std::process::id())
    });
    let config = edow_worker::Config {
        kafka: args.cluster.kafka(),
        topics: args.cluster.topics(),
        registry_url: args.cluster.registry,
        group: args.group,
        worker_id,
        handlers,
        concurrency: args.concurrency,
        task_timeout: args.task_timeout,
        partitions: args.cluster.partitions,
        task_partitions: args.cluster.task_partitions,
        replication_factor: args.cluster.replication_factor,
    };
    edow_worker::run(config, edow_kafka::process::shutdown_signal()).await
}
