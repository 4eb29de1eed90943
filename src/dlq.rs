//! `edow dlq list|show|replay`: dead letters from the command line, as `/v1/dead-letters` serves them (see the
//! orchestrator's `dlq` module); `--output json` for scripts.

use anyhow::bail;
use edow_orchestrator::client::Client;
use edow_orchestrator::dlq::{Position, Selection, MAX_SELECTED};

use crate::output::Output;

#[derive(clap::Subcommand, Debug)]
pub enum Dlq {
    /// List dead letters, oldest first: origin topic, position, reason and error.
    List {
        /// The topic they came from (e.g. edow.triggers); default: every topic with dead letters.
        #[arg(long)]
        topic: Option<String>,
        /// Only this reason (error kind), e.g. unknown_workflow.
        #[arg(long)]
        reason: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Show one dead letter with its original record and triage facts.
    Show {
        /// The topic it came from.
        topic: String,
        /// Its partition in the dead-letter topic.
        partition: i32,
        /// Its offset in the dead-letter topic.
        offset: i64,
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Produce dead letters to the topic they came from again, byte for byte, with an edow.replay header.
    Replay {
        /// The topic they came from.
        #[arg(long)]
        topic: String,
        /// Only this reason (error kind).
        #[arg(long)]
        reason: Option<String>,
        /// One dead letter by its PARTITION:OFFSET in the dead-letter topic; repeatable.
        #[arg(long = "at", value_parser = parse_position)]
        at: Vec<Position>,
        /// Every dead letter of the topic (needed when neither --reason nor --at narrows it).
        #[arg(long)]
        all: bool,
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
}

fn parse_position(text: &str) -> Result<Position, String> {
    let (partition, offset) = text
        .split_once(':')
        .ok_or_else(|| format!("{text}: write PARTITION:OFFSET, e.g. 0:17"))?;
    Ok(Position {
        partition: partition
            .parse()
            .map_err(|_| format!("{text}: the partition is not a number"))?,
        offset: offset
            .parse()
            .map_err(|_| format!("{text}: the offset is not a number"))?,
    })
}

pub async fn run(client: &Client, command: Dlq) -> anyhow::Result<()> {
    match command {
        Dlq::List {
            topic,
            reason,
            limit,
            output,
        } => {
            let found = client
                .dead_letters_of(topic.as_deref(), reason.as_deref(), limit)
                .await?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&found)?),
                Output::Text => {
                    for s in &found {
                        println!(
                            "{} {}:{} key={} {}: {}",
                            s.origin_topic,
                            s.partition,
                            s.offset,
                            s.key.as_deref().unwrap_or("-"),
                            s.reason,
                            s.error
                        );
                    }
                    eprintln!("{} dead letters", found.len());
                }
            }
            Ok(())
        }
        Dlq::Show {
            topic,
            partition,
            offset,
            output,
        } => {
            let Some(letter) = client
                .dead_letter(&topic, Position { partition, offset })
                .await?
            else {
                bail!("no dead letter of {topic} at partition {partition} offset {offset}");
            };
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&letter)?),
                Output::Text => {
                    for (key, value) in letter.as_object().into_iter().flatten() {
                        println!("{key:<18} {value}");
                    }
                }
            }
            Ok(())
        }
        Dlq::Replay {
            topic,
            reason,
            at,
            all,
            output,
        } => {
            if reason.is_none() && at.is_empty() && !all {
                bail!("say which dead letters: --at PARTITION:OFFSET, --reason KIND, or --all");
            }
            let selection = Selection {
                reason,
                positions: (!at.is_empty()).then_some(at),
                limit: MAX_SELECTED,
            };
            let replayed = client.replay(&topic, &selection).await?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&replayed)?),
                Output::Text => {
                    println!(
                        "{}: replayed {} to {topic}",
                        replayed.replay_id,
                        replayed.replayed.len()
                    );
                    for (at, why) in &replayed.skipped {
                        println!("skipped {}:{}: {why}", at.partition, at.offset);
                    }
                }
            }
            Ok(())
        }
    }
}
