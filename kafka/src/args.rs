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
    /// A librdkafka setting over edow's own, as KEY=VALUE, for every client (e.g. security.protocol=SSL,
    /// linger.ms=0); repeat it, or comma-separate them in the environment variable.
    #[arg(long = "kafka-option", env = "EDOW_KAFKA_OPTIONS", value_delimiter = ',', value_parser = parse_option)]
    pub kafka_options: Vec<(String, String)>,
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

/// librdkafka settings edow's guarantees rest on: an operator may not change them.
const FIXED_OPTIONS: [&str; 8] = [
    "bootstrap.servers",
    "group.id",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "enable.idempotence",
    "acks",
    "partitioner",
    "isolation.level",
];

/// A `KEY=VALUE` librdkafka setting; an empty text (an empty variable) sets nothing.
pub fn parse_option(text: &str) -> Result<(String, String), String> {
    if text.trim().is_empty() {
        return Ok((String::new(), String::new()));
    }
    if let Some(key) = text
        .split_once('=')
        .map(|(k, _)| k.trim())
        .filter(|k| FIXED_OPTIONS.contains(k))
    {
        return Err(format!(
            "'{key}' is set by edow and cannot be changed: exactly-once processing depends on it (bootstrap \
             servers have their own option)"
        ));
    }
    match text.split_once('=') {
        Some((key, value)) if !key.trim().is_empty() => {
            Ok((key.trim().to_string(), value.trim().to_string()))
        }
        _ => Err(format!(
            "'{text}' is not a librdkafka setting of the form KEY=VALUE (e.g. linger.ms=0)"
        )),
    }
}

impl ClusterArgs {
    pub fn kafka(&self) -> Kafka {
        let mut kafka = Kafka::new(self.bootstrap_servers.clone());
        kafka.session_timeout = Duration::from_millis(self.session_timeout_ms);
        kafka.options = self.kafka_options.clone();
        kafka
    }

    pub fn topics(&self) -> Topics {
        Topics::new(self.topic_prefix.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::parse_option;

    #[test]
    fn options_are_key_value_and_guarantees_cannot_be_changed() {
        assert_eq!(
            parse_option(" linger.ms = 0 ").unwrap(),
            ("linger.ms".to_string(), "0".to_string())
        );
        assert_eq!(parse_option("").unwrap().0, "");
        assert!(parse_option("linger.ms").is_err());
        assert!(parse_option("=5").is_err());
        let refused = parse_option("enable.auto.commit=true").unwrap_err();
        assert!(refused.contains("enable.auto.commit"), "{refused}");
        assert!(parse_option("acks=1").is_err());
    }
}
