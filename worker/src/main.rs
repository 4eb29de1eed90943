//! `worker`: runs edow tasks of the types it serves and publishes their results.

use std::collections::HashMap;
use std::time::Duration;

use clap::Parser;
use edow_kafka::args::{ClusterArgs, LogArgs};

#[derive(Parser, Debug)]
#[command(version, about = "edow worker")]
struct Args {
    /// A task type and its handler, repeatable: TYPE=HANDLER with HANDLER one of echo, trail, sleep:DURATION,
    /// fail:N, fail:always, http:URL, exec:COMMAND.
    #[arg(long = "task", value_name = "TYPE=HANDLER", required = true)]
    tasks: Vec<String>,
    /// A header a type's http handler sends with every request, its value a secret read from a variable or a
    /// file for each request: TYPE:NAME=env:VARIABLE or TYPE:NAME=file:PATH (e.g.
    /// payment.charge:Authorization=file:/etc/edow/payments-token); repeatable. Never the value itself.
    #[arg(long = "http-header", value_name = "TYPE:NAME=SOURCE")]
    http_headers: Vec<String>,
    /// A circuit breaker for a task type, repeatable: TYPE, or TYPE:KEY=VALUE,... with consecutive (retryable
    /// failures in a row that open it; 5), failure_rate (share of failures within window that opens it; 0.5),
    /// min_calls (20), window (30s), open_for (10s), probes (tasks tried while half-open; 1). While open, the
    /// type's partitions are paused and its tasks wait in Kafka.
    #[arg(long = "circuit-breaker", value_name = "TYPE[:KEY=VALUE,...]")]
    circuit_breakers: Vec<String>,
    #[command(flatten)]
    cluster: ClusterArgs,
    #[command(flatten)]
    log: LogArgs,
    #[command(flatten)]
    blobs: edow_blobs::args::BlobArgs,
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
    /// Largest task output, in bytes of JSON; a larger one fails the task with the non-retryable code
    /// output_too_large (http and exec stop reading past it).
    #[arg(long, env = "EDOW_MAX_OUTPUT_BYTES", default_value_t = edow_worker::handlers::DEFAULT_MAX_OUTPUT_BYTES)]
    max_output_bytes: usize,
    /// Largest task input; a larger one fails the task (input_too_large) and is dead-lettered.
    #[arg(long, env = "EDOW_MAX_INPUT_BYTES", default_value_t = 1024 * 1024)]
    max_input_bytes: usize,
    /// The consumer's max.poll.interval.ms (default: the task timeout plus 60 s). The worker polls while tasks
    /// run, so only a wedged worker is evicted; never below the session timeout.
    #[arg(long, env = "EDOW_MAX_POLL_INTERVAL", value_parser = humantime::parse_duration)]
    max_poll_interval: Option<Duration>,
    /// On shutdown, how long running tasks may take to finish and publish before they are left to be redelivered.
    #[arg(long, env = "EDOW_SHUTDOWN_GRACE", default_value = "30s", value_parser = humantime::parse_duration)]
    shutdown_grace: Duration,
    /// Results remembered to answer redelivered tasks without running them again: at most this many...
    #[arg(long, env = "EDOW_ANSWERED_MAX_ENTRIES", default_value_t = 100_000)]
    answered_max_entries: usize,
    /// ...taking at most this many bytes.
    #[arg(long, env = "EDOW_ANSWERED_MAX_BYTES", default_value_t = 64 * 1024 * 1024)]
    answered_max_bytes: usize,
    /// Where to serve /metrics and /healthz (e.g. 0.0.0.0:9090); nothing is served without it.
    #[arg(long, env = "EDOW_METRICS_ADDR")]
    metrics_addr: Option<std::net::SocketAddr>,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let settings = args.cluster.kafka_settings.settings().unwrap_or_default();
    edow_kafka::settings::exit_on_error(run(args).await, &settings);
}

async fn run(args: Args) -> anyhow::Result<()> {
    edow_kafka::process::init_logging(args.log.log_format);
    let _spans = edow_telemetry::trace::init_export("edow-worker")?;
    let blobs = args.blobs.open()?;
    let limits = edow_worker::handlers::HandlerLimits {
        timeout: args.task_timeout,
        // With a blob store, what a handler returns may be up to its limit: the part over the threshold is
        // stored, and the result must still fit --max-output-bytes.
        max_output_bytes: blobs.as_ref().map_or(args.max_output_bytes, |b| {
            b.max_bytes().max(args.max_output_bytes)
        }),
    };
    let mut headers: HashMap<String, Vec<edow_worker::handlers::SecretHeader>> = HashMap::new();
    for spec in &args.http_headers {
        let (task_type, header) = spec.split_once(':').ok_or_else(|| {
            anyhow::anyhow!(
                "--http-header {spec}: write TYPE:NAME=env:VARIABLE or TYPE:NAME=file:PATH"
            )
        })?;
        let header = edow_worker::handlers::SecretHeader::parse(header)
            .map_err(|e| anyhow::anyhow!("--http-header for {task_type}: {e}"))?;
        headers
            .entry(task_type.to_string())
            .or_default()
            .push(header);
    }
    let mut handlers = HashMap::new();
    for spec in &args.tasks {
        let (task_type, handler) = spec.split_once('=').ok_or_else(|| {
            anyhow::anyhow!("--task {spec}: write TYPE=HANDLER, e.g. --task payment.charge=echo")
        })?;
        let secrets = headers.remove(task_type).unwrap_or_default();
        let handler = edow_worker::handlers::builtin_with_headers(handler, &limits, secrets)
            .map_err(|e| anyhow::anyhow!("--task {spec}: {e}"))?;
        handlers.insert(task_type.to_string(), handler);
    }
    if let Some(task_type) = headers.keys().next() {
        anyhow::bail!("--http-header names {task_type}, which no --task serves");
    }
    let worker_id = args.worker_id.unwrap_or_else(|| {
        let host = std::fs::read_to_string("/etc/hostname").unwrap_or_else(|_| "worker".into());
        format!("{}-{}", host.trim(), std::process::id())
    });
    let mut breakers = HashMap::new();
    for spec in &args.circuit_breakers {
        let (task_type, policy) =
            edow_worker::breaker::BreakerPolicy::parse(spec).map_err(anyhow::Error::msg)?;
        if breakers.insert(task_type.clone(), policy).is_some() {
            anyhow::bail!("--circuit-breaker {task_type} is given twice; keep one");
        }
    }
    let config = edow_worker::Config {
        kafka: args.cluster.kafka()?,
        topics: args.cluster.topics(),
        registry_url: args.cluster.registry,
        group: args.group,
        worker_id,
        handlers,
        concurrency: args.concurrency,
        task_timeout: args.task_timeout,
        limits: edow_worker::Limits {
            max_output_bytes: args.max_output_bytes,
            max_input_bytes: args.max_input_bytes,
            answered_entries: args.answered_max_entries,
            answered_bytes: args.answered_max_bytes,
        },
        max_poll_interval: args.max_poll_interval,
        shutdown_grace: args.shutdown_grace,
        metrics_addr: args.metrics_addr,
        publish_attempt_timeout: Duration::from_secs(40),
        partitions: args.cluster.partitions,
        task_partitions: args.cluster.task_partitions,
        replication_factor: args.cluster.replication_factor,
        blobs,
        breakers,
    };
    edow_worker::run(config, edow_kafka::process::shutdown_signal()).await
}
