//! `edow load`: starts many instances of a workflow, follows their lifecycle events to the end, and reports
//! progress, outcomes and latencies (per step, from dispatch to completion, and end to end) as the
//! orchestrator timed them.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::Context;
use edow_kafka::{now_millis, produce_all, Kafka, Outgoing};
use edow_schemas::contracts::{LifecycleEvent, LifecycleKind, WorkflowTrigger};
use edow_schemas::{Codec, Topics};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::{Message, Offset, TopicPartitionList};

pub struct Load {
    pub name: String,
    pub count: usize,
    pub input: String,
    pub prefix: String,
    pub timeout: Duration,
    /// Only start the instances; do not follow them to their end.
    pub no_wait: bool,
    /// Follow them only until every one has started (its state is in the changelog then).
    pub until_started: bool,
}

/// The value at quantile `q` of sorted `values` (nearest rank).
pub fn quantile<T: Copy + Default>(sorted: &[T], q: f64) -> T {
    if sorted.is_empty() {
        return T::default();
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// A consumer reading `topic` from its current end on every partition, outside any group: it sees only what is
/// written from now on.
pub fn tail(kafka: &Kafka, topic: &str, partitions: i32) -> anyhow::Result<StreamConsumer> {
    let consumer: StreamConsumer = kafka.group_consumer_config("edow-cli-tail").create()?;
    let mut assignment = TopicPartitionList::new();
    for p in 0..partitions {
        let (_, high) = consumer.fetch_watermarks(topic, p, Duration::from_secs(10))?;
        assignment.add_partition_offset(topic, p, Offset::Offset(high))?;
    }
    consumer.assign(&assignment)?;
    Ok(consumer)
}

pub async fn run(kafka: &Kafka, codec: &Codec, topics: &Topics, load: Load) -> anyhow::Result<()> {
    let events_topic = topics.events();
    let partitions = kafka.partition_count(&events_topic)?;
    anyhow::ensure!(
        partitions > 0,
        "topic {events_topic} does not exist; start the orchestrator first"
    );
    // Follow from the current end, so that only this run's events are read.
    let partitions = i32::try_from(partitions).unwrap_or(i32::MAX);
    let consumer = tail(kafka, &events_topic, partitions)?;

    let ids: Vec<String> = (0..load.count)
        .map(|i| format!("{}-{i}", load.prefix))
        .collect();
    let wanted: HashSet<&str> = ids.iter().map(String::as_str).collect();
    let triggers = topics.triggers();
    let mut records = Vec::with_capacity(ids.len());
    for (i, id) in ids.iter().enumerate() {
        let input = load.input.replace("{i}", &i.to_string());
        serde_json::from_str::<serde_json::Value>(&input)
            .with_context(|| format!("--input is not a JSON document: {input}"))?;
        let trigger = WorkflowTrigger {
            workflow_id: id.clone(),
            workflow_name: load.name.clone(),
            workflow_version: None,
            input,
            idempotency_key: None,
            correlation_id: Some(load.prefix.clone()),
            priority: 0,
            requested_at: now_millis(),
            attributes: Default::default(),
        };
        records.push(Outgoing {
            topic: triggers.clone(),
            partition: None,
            key: id.as_bytes().to_vec(),
            payload: Some(codec.encode(&triggers, &trigger).await?),
            headers: Vec::new(),
        });
    }
    let began = Instant::now();
    produce_all(&kafka.producer()?, &records).await?;
    println!(
        "started {} instances of {} in {:?}",
        load.count,
        load.name,
        began.elapsed()
    );
    if load.no_wait {
        return Ok(());
    }

    let mut step_started: HashMap<(String, String, i32), i64> = HashMap::new();
    let mut step_latency: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    let mut workflow_started: HashMap<String, i64> = HashMap::new();
    let mut end_to_end = Vec::new();
    let (mut completed, mut failed, mut retries) = (0usize, 0usize, 0usize);
    let mut started = HashSet::new();
    let mut last_report = Instant::now();
    let deadline = tokio::time::Instant::now() + load.timeout;
    while completed + failed < load.count {
        if load.until_started && started.len() == load.count {
            println!("all {} started in {:?}", load.count, began.elapsed());
            return Ok(());
        }
        let msg = tokio::time::timeout_at(deadline, consumer.recv())
            .await
            .with_context(|| {
                format!(
                    "{} of {} instances ended within {:?}",
                    completed + failed,
                    load.count,
                    load.timeout
                )
            })??;
        let event: LifecycleEvent = codec.decode(msg.payload()).await?;
        if !wanted.contains(event.workflow_id.as_str()) {
            continue;
        }
        let step_key = |e: &LifecycleEvent| {
            (
                e.workflow_id.clone(),
                e.step.clone().unwrap_or_default(),
                e.attempt.unwrap_or(0),
            )
        };
        match event.kind {
            LifecycleKind::WorkflowStarted => {
                started.insert(event.workflow_id.clone());
                workflow_started.insert(event.workflow_id.clone(), event.at);
            }
            LifecycleKind::StepStarted => {
                step_started.insert(step_key(&event), event.at);
            }
            LifecycleKind::StepCompleted => {
                if let Some(start) = step_started.remove(&step_key(&event)) {
                    step_latency
                        .entry(event.step.clone().unwrap_or_default())
                        .or_default()
                        .push(event.at - start);
                }
            }
            LifecycleKind::StepRetried => retries += 1,
            kind if kind.ends_workflow() => {
                if kind.is_success() {
                    completed += 1;
                } else {
                    failed += 1;
                }
                if let Some(start) = workflow_started.remove(&event.workflow_id) {
                    end_to_end.push(event.at - start);
                }
            }
            _ => {}
        }
        if last_report.elapsed() >= Duration::from_secs(1) {
            println!(
                "  {:>6.1}s  completed {completed:>5}  failed {failed:>4}  running {:>5}",
                began.elapsed().as_secs_f64(),
                load.count - completed - failed
            );
            last_report = Instant::now();
        }
    }
    let took = began.elapsed();
    println!();
    println!(
        "completed {completed}, failed {failed}, retries {retries}, in {:.2}s ({:.0} workflows/s)",
        took.as_secs_f64(),
        load.count as f64 / took.as_secs_f64()
    );
    println!(
        "{:<24} {:>8} {:>8} {:>8}",
        "latency (ms)", "p50", "p99", "max"
    );
    for (step, values) in &mut step_latency {
        values.sort_unstable();
        println!(
            "{:<24} {:>8} {:>8} {:>8}",
            format!("step {step}"),
            quantile(values, 0.5),
            quantile(values, 0.99),
            values.last().copied().unwrap_or(0)
        );
    }
    end_to_end.sort_unstable();
    println!(
        "{:<24} {:>8} {:>8} {:>8}",
        "workflow end to end",
        quantile(&end_to_end, 0.5),
        quantile(&end_to_end, 0.99),
        end_to_end.last().copied().unwrap_or(0)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::quantile;

    #[test]
    fn quantiles_use_the_nearest_rank() {
        let values: Vec<i64> = (1..=100).collect();
        assert_eq!(quantile(&values, 0.5), 50);
        assert_eq!(quantile(&values, 0.99), 99);
        assert_eq!(quantile(&values, 0.95), 95);
        assert_eq!(quantile(&[7], 0.99), 7);
        assert_eq!(quantile::<i64>(&[], 0.5), 0);
    }
}
