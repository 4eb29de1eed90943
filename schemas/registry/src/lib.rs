//! edow's schema registry: the Confluent Schema Registry REST API for Avro, stored in a compacted Kafka topic so
//! that a restarted registry, or a second instance, serves every schema under the same ids.

pub mod api;
pub mod compat;
pub mod log;
pub mod store;

use std::net::SocketAddr;

use anyhow::Context;

/// Where the registry listens and keeps its schemas.
#[derive(Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub bootstrap_servers: String,
    /// The operator's librdkafka settings (security, tuning); their secrets are never shown.
    pub kafka_options: Vec<(String, String)>,
    pub topic: String,
    pub replication_factor: i32,
}

/// Reads the schemas log, then serves the API until `shutdown` resolves. The listener is bound only once the
/// log has been read, so a client that can connect sees every schema registered before.
pub async fn serve(
    config: Config,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let log = log::SchemaLog::open(
        &config.bootstrap_servers,
        &config.kafka_options,
        &config.topic,
        config.replication_factor,
    )
    .await
    .with_context(|| {
        format!(
            "opening the schemas topic {} on {}",
            config.topic, config.bootstrap_servers
        )
    })?;
    edow_telemetry::metrics::init(edow_telemetry::metrics::Exporter::Registry);
    let app = api::router(api::AppState::new(log));
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    tracing::info!(listen = %config.listen, topic = %config.topic, "schema registry serving");
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .context("serving HTTP")
}
