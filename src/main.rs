//! `edow`: the user-facing command line. Registers the contracts with a schema registry and lists them; later
//! commands deploy definitions, start workflows and show their status.

use anyhow::Context;
use clap::{Parser, Subcommand};
use edow_schemas::contracts::fixed_topic_contracts;
use edow_schemas::topics::value_subject;
use edow_schemas::{Codec, Topics};

#[derive(Parser, Debug)]
#[command(version, about = "edow: a Kafka-native workflow orchestrator")]
struct Cli {
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
}

#[derive(Subcommand, Debug)]
enum SchemasAction {
    /// Register every fixed topic's contract (idempotent) and print subjects and ids.
    Register,
    /// Print the subjects of the fixed topics with their latest version and id.
    List,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let topics = Topics::new(cli.topic_prefix.clone());
    match cli.command {
        Command::Schemas { action } => schemas(&cli.registry, &topics, action).await,
    }
}

async fn schemas(registry: &str, topics: &Topics, action: SchemasAction) -> anyhow::Result<()> {
    let codec = Codec::new(registry)?;
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
