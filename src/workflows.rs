//! `edow list`, `edow status` and `edow definitions`: the reads of `/v1/workflows` and `/v1/definitions` from the
//! command line, in the same JSON shape with `--output json`. They need no orchestrator: the CLI builds a one-off
//! visibility index (the orchestrator's own code, in a temporary file) from `edow.state`, and from `edow.events`
//! for a workflow's history, as the topics are now.

use anyhow::{bail, Context};
use edow_kafka::murmur2::partition_for;
use edow_orchestrator::client::Client;
use edow_orchestrator::visibility::{
    self, described, parse_instant, status_named, EventRow, Filter, WorkflowRow, STATUSES,
};
use serde_json::json;

use crate::output::Output;

/// Most workflows one `edow list` prints.
const MAX_LISTED: usize = 100_000;

#[derive(clap::Args, Debug)]
pub struct ListArgs {
    /// Only instances of this workflow.
    #[arg(long)]
    name: Option<String>,
    /// Only this status: Running, Completed, Failed, Cancelled, Compensating, Compensated, CompensationFailed,
    /// Filtered (any case).
    #[arg(long)]
    status: Option<String>,
    #[arg(long)]
    correlation_id: Option<String>,
    /// Started at or after: epoch ms or RFC 3339 (2026-11-23T10:00:00Z).
    #[arg(long)]
    from: Option<String>,
    /// Started before: epoch ms or RFC 3339.
    #[arg(long)]
    to: Option<String>,
    /// Most workflows printed, newest first.
    #[arg(long, default_value_t = 100)]
    limit: usize,
    #[arg(long, value_enum, default_value_t = Output::Text)]
    output: Output,
}

/// The partition count of the state topic, or a clear error when the orchestrator has not made it yet.
async fn state_partitions(client: &Client) -> anyhow::Result<i32> {
    let topic = client.topics.state();
    let count = {
        let (kafka, topic) = (client.kafka.clone(), topic.clone());
        tokio::task::spawn_blocking(move || kafka.partition_count(&topic)).await??
    };
    if count == 0 {
        bail!("topic {topic} does not exist; start the orchestrator first (it creates its topics), or check --topic-prefix");
    }
    i32::try_from(count).context("the state topic's partition count")
}

fn instant(flag: &str, text: &Option<String>) -> anyhow::Result<Option<i64>> {
    text.as_deref()
        .map(|t| {
            parse_instant(t).with_context(|| {
                format!("{flag} {t:?}: give epoch milliseconds or an RFC 3339 time (2026-11-23T10:00:00Z)")
            })
        })
        .transpose()
}

pub async fn list(client: &Client, args: ListArgs) -> anyhow::Result<()> {
    if !(1..=MAX_LISTED).contains(&args.limit) {
        bail!("--limit {}: give 1 to {MAX_LISTED}", args.limit);
    }
    let status = match &args.status {
        Some(text) => Some(
            status_named(text)
                .with_context(|| format!("--status {text:?}: one of {}", STATUSES.join(", ")))?
                .to_string(),
        ),
        None => None,
    };
    let filter = Filter {
        name: args.name.clone(),
        status,
        correlation_id: args.correlation_id.clone(),
        from: instant("--from", &args.from)?,
        to: instant("--to", &args.to)?,
        after: None,
        limit: args.limit,
    };
    let partitions: Vec<i32> = (0..state_partitions(client).await?).collect();
    let index = visibility::snapshot(
        &client.kafka,
        &client.codec,
        client.keys.as_deref(),
        &client.topics,
        &partitions,
        false,
        None,
    )
    .await?;
    let rows = tokio::task::spawn_blocking(move || index.list(&filter)).await??;
    args.output
        .print(&json!({ "workflows": rows }), |_| print_rows(&rows))
}

fn print_rows(rows: &[WorkflowRow]) {
    println!(
        "{:<40} {:<24} {:>7} {:<18} {:<24}",
        "ID", "NAME", "VERSION", "STATUS", "STARTED"
    );
    for row in rows {
        println!(
            "{:<40} {:<24} {:>7} {:<18} {:<24}",
            row.id,
            row.name,
            row.version,
            row.status,
            rfc3339(row.created_at)
        );
    }
    eprintln!("{} workflows", rows.len());
}

fn rfc3339(epoch_ms: i64) -> String {
    // humantime writes years up to 9999 only (its Display fails past them).
    const YEAR_10000_MS: i64 = 253_402_300_800_000;
    u64::try_from(epoch_ms)
        .ok()
        .filter(|_| epoch_ms < YEAR_10000_MS)
        .map(|ms| {
            humantime::format_rfc3339_millis(
                std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms),
            )
            .to_string()
        })
        .unwrap_or_else(|| epoch_ms.to_string())
}

/// `edow status ID`: the latest state from the changelog, with the lifecycle events when `history`.
pub async fn status(
    client: &Client,
    id: &str,
    history: bool,
    output: Output,
) -> anyhow::Result<()> {
    let partition = partition_for(id.as_bytes(), state_partitions(client).await?);
    let index = visibility::snapshot(
        &client.kafka,
        &client.codec,
        client.keys.as_deref(),
        &client.topics,
        &[partition],
        history,
        Some(id),
    )
    .await?;
    let lookup = id.to_string();
    let found = tokio::task::spawn_blocking(move || index.get(&lookup)).await??;
    let Some((workflow, events)) = found else {
        bail!("no workflow {id}: it was never started, not yet picked up, or purged");
    };
    output.print(&described(&workflow, &events), |_| {
        print_workflow(&workflow, history.then_some(&events[..]))
    })
}

fn print_workflow(workflow: &WorkflowRow, history: Option<&[EventRow]>) {
    println!("workflow   {}", workflow.id);
    println!("definition {} version {}", workflow.name, workflow.version);
    println!("status     {}", workflow.status);
    if let Some(correlation_id) = &workflow.correlation_id {
        println!("correlation {correlation_id}");
    }
    for step in &workflow.running_steps {
        println!("step       {}: {}", step.step, step.doing);
    }
    println!("input      {}", workflow.input);
    if let Some(output) = &workflow.output {
        println!("output     {output}");
    }
    if let Some(error) = &workflow.error {
        println!("error      {error}");
    }
    println!("started    {}", rfc3339(workflow.created_at));
    println!("updated    {}", rfc3339(workflow.updated_at));
    for event in history.into_iter().flatten() {
        let attempt = event
            .attempt
            .map(|a| format!(" attempt {a}"))
            .unwrap_or_default();
        let detail = event
            .detail
            .as_ref()
            .map(|d| format!(" {d}"))
            .unwrap_or_default();
        println!(
            "event      {} {} {}{attempt}{detail}",
            rfc3339(event.at),
            event.kind,
            event.step.as_deref().unwrap_or("")
        );
    }
}

/// `edow definitions [NAME]`: every deployed name with its versions, or every version of NAME with its text.
pub async fn definitions(
    client: &Client,
    name: Option<String>,
    output: Output,
) -> anyhow::Result<()> {
    let Some(name) = name else {
        let names = client.definition_names().await?;
        return output.print(&json!({ "definitions": names }), |_| {
            println!("{:<32} {:>6} VERSIONS", "NAME", "LATEST");
            for d in &names {
                let versions: Vec<String> = d.versions.iter().map(i32::to_string).collect();
                println!("{:<32} {:>6} {}", d.name, d.latest, versions.join(","));
            }
        });
    };
    let versions = client.definition_versions(&name).await?;
    if versions.is_empty() {
        bail!("no definition {name} is deployed; `edow definitions` lists those that are");
    }
    let body = json!({"name": name, "versions": versions});
    output.print(&body, |_| {
        for deployed in &versions {
            println!("--- {name} version {}", deployed.version);
            println!(
                "{}",
                deployed
                    .source
                    .as_deref()
                    .unwrap_or("(this version no longer decodes)")
                    .trim_end()
            );
        }
    })
}
