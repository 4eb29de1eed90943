//! `orchestrator`: drives edow workflows from triggers and task results; state in a compacted changelog topic.

use std::time::Duration;

use clap::Parser;
use edow_engine::Limits;
use edow_kafka::args::{ClusterArgs, LogArgs};

#[derive(Parser, Debug)]
#[command(version, about = "edow orchestrator")]
struct Args {
    #[command(flatten)]
    cluster: ClusterArgs,
    #[command(flatten)]
    log: LogArgs,
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
    /// Largest JSON payload (workflow input, signal payload, task output) in bytes.
    #[arg(long, env = "EDOW_MAX_PAYLOAD_BYTES", default_value_t = Limits::default().max_payload_bytes)]
    max_payload_bytes: usize,
    /// Deepest nesting of arrays and objects in a JSON payload.
    #[arg(long, env = "EDOW_MAX_JSON_DEPTH", default_value_t = Limits::default().max_json_depth)]
    max_json_depth: usize,
    /// Most elements a map step may iterate over.
    #[arg(long, env = "EDOW_MAX_MAP_ITEMS", default_value_t = Limits::default().max_map_items)]
    max_map_items: usize,
    /// How long an ended workflow stays in the changelog before it is purged (e.g. 7d, 12h).
    #[arg(long, env = "EDOW_ENDED_RETENTION", default_value = "7d", value_parser = humantime::parse_duration)]
    ended_retention: Duration,
    /// Most ended workflows remembered per partition; the oldest beyond it are purged early.
    #[arg(long, env = "EDOW_MAX_ENDED_PER_PARTITION", default_value_t = 100_000)]
    max_ended_per_partition: usize,
    /// Largest record produced, in bytes; keep it below the broker's message.max.bytes.
    #[arg(long, env = "EDOW_MAX_RECORD_BYTES", default_value_t = 900 * 1024)]
    max_record_bytes: usize,
    /// Where to serve the API (/v1), /metrics, /healthz and /readyz (e.g. 0.0.0.0:8080); nothing is served without it.
    #[arg(long, env = "EDOW_HTTP_ADDR")]
    http_addr: Option<std::net::SocketAddr>,
    /// The API's visibility index (SQLite file); kept, a restart resumes it. Default: a file of this process's
    /// own in the temporary directory, rebuilt from the topics at every start.
    #[arg(long, env = "EDOW_VISIBILITY_PATH")]
    visibility_path: Option<std::path::PathBuf>,
    /// How long ended workflows stay in the visibility index (e.g. 7d).
    #[arg(long, env = "EDOW_VISIBILITY_RETENTION", default_value = "7d", value_parser = humantime::parse_duration)]
    visibility_retention: Duration,
    /// The API's bearer tokens: a file of `ROLE SHA256-HEX [NAME]` lines (roles viewer, operator, admin), read
    /// again when it changes. Without it the API takes every request, which only a loopback address allows.
    #[arg(long, env = "EDOW_API_TOKENS_FILE")]
    api_tokens: Option<std::path::PathBuf>,
    /// A directory holding one secret per webhook, in a file named after its workflow; deliveries to such a
    /// hook must be signed (X-Hub-Signature-256 or Edow-Signature).
    #[arg(long, env = "EDOW_HOOK_SECRETS_DIR")]
    hook_secrets: Option<std::path::PathBuf>,
    /// Serve the listener with TLS: this PEM certificate chain (with --http-tls-key).
    #[arg(long, env = "EDOW_HTTP_TLS_CERT", requires = "http_tls_key")]
    http_tls_cert: Option<std::path::PathBuf>,
    /// The PEM private key of --http-tls-cert.
    #[arg(long, env = "EDOW_HTTP_TLS_KEY", requires = "http_tls_cert")]
    http_tls_key: Option<std::path::PathBuf>,
    /// Take only clients with a certificate this PEM CA signed (mTLS); a certificate's subject O=viewer,
    /// O=operator or O=admin is its role. Needs --http-tls-cert.
    #[arg(long, env = "EDOW_HTTP_TLS_CLIENT_CA", requires = "http_tls_cert")]
    http_tls_client_ca: Option<std::path::PathBuf>,
    /// Serve the API on a non-loopback address without tokens, because something in front of it authenticates.
    #[arg(long, env = "EDOW_API_ALLOW_UNAUTHENTICATED")]
    api_allow_unauthenticated: bool,
    #[command(flatten)]
    encryption: edow_orchestrator::sealing::EncryptionArgs,
    #[command(flatten)]
    blobs: edow_blobs::args::BlobArgs,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let settings = args.cluster.kafka_settings.settings().unwrap_or_default();
    edow_kafka::settings::exit_on_error(run(args).await, &settings);
}

async fn run(args: Args) -> anyhow::Result<()> {
    edow_kafka::process::init_logging(args.log.log_format);
    let _spans = edow_telemetry::trace::init_export("edow-orchestrator")?;
    let mut config = edow_orchestrator::Config::new(
        args.cluster.kafka()?,
        args.cluster.registry.clone(),
        args.cluster.topics(),
    );
    config.partitions = args.cluster.partitions;
    config.task_partitions = args.cluster.task_partitions;
    config.replication_factor = args.cluster.replication_factor;
    config.group = args.group;
    config.max_batch = args.max_batch;
    config.limits = Limits {
        max_payload_bytes: args.max_payload_bytes,
        max_json_depth: args.max_json_depth,
        max_map_items: args.max_map_items,
        ..Limits::default()
    };
    config.blobs = args.blobs.open()?;
    config.ended_retention = args.ended_retention;
    config.max_ended_per_partition = args.max_ended_per_partition;
    config.max_record_bytes = args.max_record_bytes;
    config.http_addr = args.http_addr;
    config.visibility_path = args.visibility_path;
    config.visibility_retention = args.visibility_retention;
    config.api_tokens = args.api_tokens;
    config.hook_secrets = args.hook_secrets;
    config.api_allow_unauthenticated = args.api_allow_unauthenticated;
    config.http_tls = args
        .http_tls_cert
        .zip(args.http_tls_key)
        .map(|(cert, key)| edow_telemetry::http::TlsFiles {
            cert,
            key,
            client_ca: args.http_tls_client_ca,
        });
    config.keys = args.encryption.keyring()?;
    edow_orchestrator::run(config, edow_kafka::process::shutdown_signal()).await
}
