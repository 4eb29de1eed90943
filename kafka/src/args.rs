//! Command-line and environment settings every edow runtime binary shares: where the cluster and the registry
//! are, the topic prefix, and the shape of the topics it creates.

use std::time::Duration;

use edow_schemas::Topics;

use crate::Kafka;

#[derive(clap::Args, Debug, Clone)]
pub struct ClusterArgs {
    /// Kafka bootstrap servers.
    #[arg(long, env = "EDOW_BOOTSTRAP_SERVERS", default_value = "127.0.0.1:9092")]
    pub bootstrap_servers: String,
    /// Schema registry URL.
    #[arg(
        long,
        env = "EDOW_SCHEMA_REGISTRY_URL",
        default_value = "http://127.0.0.1:8081"
    )]
    pub registry: String,
    /// Prefix of every edow topic.
    #[arg(long, env = "EDOW_TOPIC_PREFIX", default_value = "edow.")]
    pub topic_prefix: String,
    /// Partitions of the triggers, signals, results, state and events topics when created (fixed after).
    #[arg(long, env = "EDOW_PARTITIONS", default_value_t = 6)]
    pub partitions: i32,
    /// Partitions of each task topic when created.
    #[arg(long, env = "EDOW_TASK_PARTITIONS", default_value_t = 6)]
    pub task_partitions: i32,
    /// Replication factor of the topics created.
    #[arg(long, env = "EDOW_REPLICATION_FACTOR", default_value_t = 1)]
    pub replication_factor: i32,
    /// Consumer group session timeout in milliseconds: how long a dead member keeps its partitions.
    #[arg(long, env = "EDOW_SESSION_TIMEOUT_MS", default_value_t = 6000)]
    pub session_timeout_ms: u64,
    #[command(flatten)]
    pub kafka_settings: crate::settings::KafkaArgs,
}

/// How a runtime binary logs.
#[derive(clap::Args, Debug, Clone)]
pub struct LogArgs {
    /// Log format: text (human-readable, one line per event with its span fields) or json (one object per line,
    /// with the current span's fields: workflow_id, task_id, correlation_id, trace_id).
    #[arg(long, env = "EDOW_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

impl ClusterArgs {
    /// The cluster's client settings, with the operator's from the properties file, the environment and flags.
    pub fn kafka(&self) -> anyhow::Result<Kafka> {
        let mut kafka = Kafka::new(self.bootstrap_servers.clone());
        kafka.session_timeout = Duration::from_millis(self.session_timeout_ms);
        kafka.options = self.kafka_settings.settings()?;
        Ok(kafka)
    }

    pub fn topics(&self) -> Topics {
        Topics::new(self.topic_prefix.clone())
    }
}
