//! `edow-registry`: a Confluent-compatible schema registry server backed by a compacted Kafka topic.

use std::net::SocketAddr;

use clap::Parser;
use tracing_subscriber::EnvFilter;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Confluent-compatible Avro schema registry storing its schemas in Kafka"
)]
struct Args {
    /// Address to serve the REST API on.
    #[arg(long, env = "EDOW_REGISTRY_LISTEN", default_value = "127.0.0.1:8081")]
    listen: SocketAddr,
    /// Kafka bootstrap servers (host:port[,host:port]).
    #[arg(long, env = "EDOW_BOOTSTRAP_SERVERS", default_value = "127.0.0.1:9092")]
    bootstrap_servers: String,
    /// Compacted single-partition topic the schemas are stored in.
    #[arg(long, env = "EDOW_REGISTRY_TOPIC", default_value = "_schemas")]
    topic: String,
    /// Replication factor used when the topic has to be created.
    #[arg(long, env = "EDOW_REGISTRY_REPLICATION_FACTOR", default_value_t = 1)]
    replication_factor: i32,
    #[command(flatten)]
    kafka: edow_kafka::settings::KafkaArgs,
    /// Users for HTTP basic auth: a file of `ROLE SHA256-OF-PASSWORD USER` lines, roles read (reads, lookups,
    /// compatibility checks) and admin (also register, delete, configure); read again when it changes.
    #[arg(long, env = "EDOW_REGISTRY_USERS_FILE")]
    users: Option<std::path::PathBuf>,
    /// Serve without users on a non-loopback address, because something in front of it authenticates.
    #[arg(long, env = "EDOW_REGISTRY_ALLOW_UNAUTHENTICATED")]
    allow_unauthenticated: bool,
    /// Serve https: a PEM certificate chain (with --tls-key, its PKCS#8 private key in PEM).
    #[arg(long, env = "EDOW_REGISTRY_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,
    #[arg(long, env = "EDOW_REGISTRY_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let settings = args.kafka.settings().unwrap_or_default();
    edow_kafka::settings::exit_on_error(run(args).await, &settings);
}

async fn run(args: Args) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    let config = edow_registry::Config {
        listen: args.listen,
        bootstrap_servers: args.bootstrap_servers,
        kafka_options: args.kafka.settings()?,
        topic: args.topic,
        replication_factor: args.replication_factor,
        users: args.users,
        allow_unauthenticated: args.allow_unauthenticated,
        tls: args
            .tls_cert
            .zip(args.tls_key)
            .map(|(cert, key)| edow_telemetry::http::TlsFiles {
                cert,
                key,
                client_ca: None,
            }),
    };
    edow_registry::serve(config, shutdown_signal()).await
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing the SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
}
