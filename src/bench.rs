//! `edow bench`: edow against the raw Kafka ceiling on the same broker, in one run, as closed loops that keep a
//! fixed number of requests in flight.
//!
//! The raw ceiling is a relay round trip: the client produces a 200-byte keyed record, a consumer group (in this
//! process, with edow's client settings) reads it and produces it to a second topic, committing as a worker does,
//! and the client reads it back. edow's figure is a workflow (by default three echo steps) from producing its
//! trigger to reading its end event. Both are timed by the client, so they include everything a user waits for.
//!
//! Raw and edow alternate level by level, so that each pair meets the broker in the same state.
//!
//! CPU per process is read from `/proc/PID/stat` for the pids named with `--pid NAME=PID` (the bench process itself
//! is always counted, as `client`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use edow_kafka::{future_record, now_millis, Kafka, Outgoing, TopicSpec};
use edow_schemas::contracts::{LifecycleEvent, WorkflowTrigger};
use edow_schemas::{Codec, Topics};
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::producer::FutureProducer;
use rdkafka::{Message, Offset, TopicPartitionList};
use serde::Serialize;

use crate::load::{quantile, tail};

#[derive(clap::Args, Debug)]
pub struct Bench {
    /// In-flight levels, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64,256")]
    pub levels: Vec<usize>,
    /// Seconds measured per level, after the warm-up.
    #[arg(long = "seconds", value_name = "SECONDS", default_value = "10", value_parser = parse_seconds)]
    pub duration: Duration,
    /// Seconds of warm-up per level, not measured.
    #[arg(long, value_name = "SECONDS", default_value = "2", value_parser = parse_seconds)]
    pub warmup: Duration,
    /// A deployed workflow whose tasks workers serve.
    #[arg(long, default_value = "bench")]
    pub workflow: String,
    /// Steps of that workflow (for steps/s and the per-step figures).
    #[arg(long, default_value_t = 3)]
    pub steps: usize,
    /// Input of every workflow, a JSON document.
    #[arg(long, default_value = r#"{"order": 1}"#)]
    pub input: String,
    /// A process to report CPU for, as NAME=PID; repeat it.
    #[arg(long = "pid", value_parser = parse_pid)]
    pub pids: Vec<(String, u32)>,
    /// Label of the run, in the JSON and the chart.
    #[arg(long, default_value = "edow bench")]
    pub label: String,
    /// Write the figures as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write an SVG chart of latency against throughput here.
    #[arg(long)]
    pub svg: Option<PathBuf>,
    /// Measure edow only, not the raw relay.
    #[arg(long)]
    pub skip_raw: bool,
}

/// Whole seconds.
fn parse_seconds(text: &str) -> Result<Duration, String> {
    text.parse::<u64>()
        .map(Duration::from_secs)
        .map_err(|_| format!("'{text}' is not a whole number of seconds"))
}

/// A `NAME=PID` argument.
fn parse_pid(text: &str) -> Result<(String, u32), String> {
    let (name, pid) = text
        .split_once('=')
        .ok_or_else(|| format!("'{text}' is not NAME=PID"))?;
    let pid = pid
        .parse()
        .map_err(|_| format!("'{pid}' in '{text}' is not a process id"))?;
    Ok((name.to_string(), pid))
}

/// Figures of one closed loop at one level.
#[derive(Debug, Clone, Serialize)]
pub struct Level {
    pub in_flight: usize,
    /// Round trips (raw) or workflows (edow) completed per second.
    pub per_second: f64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    /// Percent of one core, per process, while the level ran.
    pub cpu_percent: BTreeMap<String, f64>,
}

#[derive(Debug, Serialize)]
struct Report {
    label: String,
    workflow: String,
    steps: usize,
    raw: Vec<Level>,
    edow: Vec<Level>,
}

pub async fn run(
    kafka: &Kafka,
    codec: &Codec,
    topics: &Topics,
    mut bench: Bench,
) -> anyhow::Result<()> {
    serde_json::from_str::<serde_json::Value>(&bench.input)
        .with_context(|| format!("--input is not a JSON document: {}", bench.input))?;
    // At least a second is measured: per-second figures divide by it.
    bench.duration = bench.duration.max(Duration::from_secs(1));
    if bench.levels.is_empty() || bench.levels.contains(&0) {
        bail!("--levels must list in-flight counts of at least 1, e.g. 1,16,64,256");
    }
    let partitions = i32::try_from(kafka.partition_count(&topics.triggers())?).unwrap_or(i32::MAX);
    if partitions <= 0 {
        bail!(
            "topic {} does not exist; start the orchestrator first",
            topics.triggers()
        );
    }
    // Raw and edow alternate level by level: the in-memory broker slows as it holds more records (measured:
    // the same raw level run four times in a row fell from 4,068 to 1,746 round trips/s), so each pair is
    // measured against a broker in the same state.
    let relay = match bench.skip_raw {
        true => None,
        false => Some(Relay::start(kafka, topics, partitions).await?),
    };
    let mut client = EdowClient::start(kafka, codec, topics, partitions).await?;
    let (mut raw, mut edow) = (Vec::new(), Vec::new());
    for &level in &bench.levels {
        if let Some(relay) = &relay {
            let figures = relay.closed_loop(level, &bench).await?;
            print_level("raw", &figures, None, 1);
            raw.push(figures);
        }
        let figures = client.closed_loop(level, &bench).await?;
        let ceiling = raw.iter().find(|r| r.in_flight == level);
        print_level("edow", &figures, ceiling, bench.steps);
        edow.push(figures);
    }
    if let Some(relay) = relay {
        relay.stop();
    }
    let report = Report {
        label: bench.label.clone(),
        workflow: bench.workflow.clone(),
        steps: bench.steps,
        raw,
        edow,
    };
    print_table(&report);
    if let Some(path) = &bench.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    if let Some(path) = &bench.svg {
        std::fs::write(path, chart(&report))
            .with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// Latencies and completions of one level, counted only after the warm-up.
struct Window {
    began: Instant,
    measure_from: Instant,
    ends_at: Instant,
    latencies_us: Vec<u64>,
    cpu_before: Vec<(String, u64)>,
}

impl Window {
    fn new(bench: &Bench) -> Window {
        let began = Instant::now();
        Window {
            began,
            measure_from: began + bench.warmup,
            ends_at: began + bench.warmup + bench.duration,
            latencies_us: Vec::new(),
            cpu_before: Vec::new(),
        }
    }

    fn record(&mut self, sent: Instant, pids: &[(String, u32)]) {
        let now = Instant::now();
        if now >= self.measure_from && sent >= self.measure_from && now < self.ends_at {
            if self.latencies_us.is_empty() && self.cpu_before.is_empty() {
                self.cpu_before = cpu_ticks(pids);
            }
            self.latencies_us
                .push(now.duration_since(sent).as_micros() as u64);
        }
    }

    fn over(&self) -> bool {
        Instant::now() >= self.ends_at
    }

    fn figures(mut self, in_flight: usize, pids: &[(String, u32)]) -> Level {
        let measured = self
            .ends_at
            .duration_since(self.measure_from.max(self.began));
        let cpu_after = cpu_ticks(pids);
        let ticks_per_second = 100.0; // USER_HZ on Linux
        let cpu_percent = cpu_after
            .iter()
            .filter_map(|(name, after)| {
                let before = self.cpu_before.iter().find(|(n, _)| n == name)?.1;
                let seconds = after.saturating_sub(before) as f64 / ticks_per_second;
                Some((name.clone(), 100.0 * seconds / measured.as_secs_f64()))
            })
            .collect();
        self.latencies_us.sort_unstable();
        let q = |q: f64| quantile(&self.latencies_us, q) as f64 / 1000.0;
        Level {
            in_flight,
            per_second: self.latencies_us.len() as f64 / measured.as_secs_f64(),
            p50_ms: q(0.5),
            p95_ms: q(0.95),
            p99_ms: q(0.99),
            cpu_percent,
        }
    }
}

/// User plus system CPU ticks of each named process, and of this one as `client`.
fn cpu_ticks(pids: &[(String, u32)]) -> Vec<(String, u64)> {
    let read = |path: String| -> Option<u64> {
        let stat = std::fs::read_to_string(path).ok()?;
        // The command name may hold spaces: fields count from after its closing parenthesis.
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
    };
    let mut ticks: Vec<(String, u64)> = pids
        .iter()
        .filter_map(|(name, pid)| Some((name.clone(), read(format!("/proc/{pid}/stat"))?)))
        .collect();
    if let Some(own) = read("/proc/self/stat".into()) {
        ticks.push(("client".into(), own));
    }
    ticks
}

/// Sends a record without waiting for its acknowledgement; a failed delivery fails the run.
fn send(producer: &FutureProducer, record: &Outgoing) -> anyhow::Result<()> {
    let delivery = producer
        .send_result(future_record(record))
        .map_err(|(e, _)| e)
        .context("producing")?;
    tokio::spawn(async move {
        if let Ok(Err((e, _))) = delivery.await {
            tracing::error!("a bench record was not delivered: {e}");
        }
    });
    Ok(())
}

/// The raw ceiling's relay: a consumer group that forwards every record of `relay-in` to `relay-out`.
struct Relay {
    kafka: Kafka,
    input: String,
    output: String,
    partitions: i32,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start(kafka: &Kafka, topics: &Topics, partitions: i32) -> anyhow::Result<Relay> {
        let input = format!("{}bench.relay-in", topics.prefix());
        let output = format!("{}bench.relay-out", topics.prefix());
        kafka
            .ensure_topics(&[
                TopicSpec::new(input.clone(), partitions, 1),
                TopicSpec::new(output.clone(), partitions, 1),
            ])
            .await?;
        let consumer: StreamConsumer = kafka
            .group_consumer_config("edow-bench-relay")
            .create()
            .context("creating the relay's consumer")?;
        consumer.subscribe(&[&input])?;
        let producer = kafka.producer()?;
        let (in_topic, out_topic) = (input.clone(), output.clone());
        let task = tokio::spawn(async move {
            // Highest acknowledged offset per partition, committed every 100 ms as the worker does.
            let acked: Arc<Mutex<HashMap<i32, i64>>> = Arc::default();
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tokio::select! {
                    message = consumer.recv() => {
                        let Ok(message) = message else { continue };
                        let record = Outgoing {
                            topic: out_topic.clone(),
                            partition: None,
                            key: message.key().unwrap_or_default().to_vec(),
                            payload: message.payload().map(<[u8]>::to_vec),
                            headers: Vec::new(),
                        };
                        let (partition, offset) = (message.partition(), message.offset());
                        let Ok(delivery) = producer.send_result(future_record(&record)) else { continue };
                        let acked = acked.clone();
                        tokio::spawn(async move {
                            if let Ok(Ok(_)) = delivery.await {
                                let mut acked = acked.lock().unwrap_or_else(|e| e.into_inner());
                                let at = acked.entry(partition).or_insert(offset);
                                *at = (*at).max(offset);
                            }
                        });
                    }
                    _ = tick.tick() => {
                        let done: Vec<(i32, i64)> = acked
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .drain()
                            .collect();
                        if done.is_empty() {
                            continue;
                        }
                        let mut list = TopicPartitionList::new();
                        for (partition, offset) in done {
                            let _ = list.add_partition_offset(
                                &in_topic,
                                partition,
                                Offset::Offset(offset + 1),
                            );
                        }
                        let _ = consumer.commit(&list, CommitMode::Async);
                    }
                }
            }
        });
        Ok(Relay {
            kafka: kafka.clone(),
            input,
            output,
            partitions,
            task,
        })
    }

    async fn closed_loop(&self, level: usize, bench: &Bench) -> anyhow::Result<Level> {
        let returns = tail(&self.kafka, &self.output, self.partitions)?;
        let producer = self.kafka.producer()?;
        let run = now_millis();
        let record = |n: usize| {
            let key = format!("raw-{run}-{n}");
            let mut payload = key.clone().into_bytes();
            payload.resize(200, b'.');
            Outgoing {
                topic: self.input.clone(),
                partition: None,
                key: key.into_bytes(),
                payload: Some(payload),
                headers: Vec::new(),
            }
        };
        // The first round trip also waits for the relay's group to form.
        let mut sent: HashMap<Vec<u8>, Instant> = HashMap::new();
        let probe = record(0);
        send(&producer, &probe)?;
        wait_for(
            &returns,
            |key| key == probe.key.as_slice(),
            Duration::from_secs(60),
        )
        .await
        .context("the relay did not answer within 60 s")?;
        let mut window = Window::new(bench);
        let mut next = 1;
        for _ in 0..level {
            let r = record(next);
            next += 1;
            sent.insert(r.key.clone(), Instant::now());
            send(&producer, &r)?;
        }
        while !window.over() {
            let message = match tokio::time::timeout(Duration::from_secs(30), returns.recv()).await
            {
                Ok(message) => message?,
                Err(_) => bail!("no relayed record came back within 30 s at {level} in flight"),
            };
            let Some(at) = message.key().and_then(|k| sent.remove(k)) else {
                continue;
            };
            window.record(at, &bench.pids);
            let r = record(next);
            next += 1;
            sent.insert(r.key.clone(), Instant::now());
            send(&producer, &r)?;
        }
        Ok(window.figures(level, &bench.pids))
    }

    fn stop(self) {
        self.task.abort();
    }
}

/// Reads `consumer` until a record's key satisfies `wanted`.
async fn wait_for(
    consumer: &StreamConsumer,
    wanted: impl Fn(&[u8]) -> bool,
    within: Duration,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let message = tokio::time::timeout_at(deadline, consumer.recv()).await??;
        if message.key().is_some_and(&wanted) {
            return Ok(());
        }
    }
}

/// Starts workflows and reads their end events.
struct EdowClient<'a> {
    codec: &'a Codec,
    topics: &'a Topics,
    events: StreamConsumer,
    producer: FutureProducer,
}

impl<'a> EdowClient<'a> {
    async fn start(
        kafka: &'a Kafka,
        codec: &'a Codec,
        topics: &'a Topics,
        partitions: i32,
    ) -> anyhow::Result<EdowClient<'a>> {
        let events = tail(kafka, &topics.events(), partitions)?;
        Ok(EdowClient {
            codec,
            topics,
            events,
            producer: kafka.producer()?,
        })
    }

    async fn trigger(&self, id: &str, bench: &Bench) -> anyhow::Result<Outgoing> {
        let topic = self.topics.triggers();
        let trigger = WorkflowTrigger {
            workflow_id: id.to_string(),
            workflow_name: bench.workflow.clone(),
            workflow_version: None,
            input: bench.input.clone(),
            idempotency_key: None,
            correlation_id: None,
            priority: 0,
            requested_at: now_millis(),
            attributes: Default::default(),
        };
        Ok(Outgoing {
            payload: Some(self.codec.encode(&topic, &trigger).await?),
            topic,
            partition: None,
            key: id.as_bytes().to_vec(),
            headers: Vec::new(),
        })
    }

    /// The id of the workflow whose end `message` reports, if it ended successfully; a failed one fails the run.
    async fn ended(
        &self,
        message: &rdkafka::message::BorrowedMessage<'_>,
    ) -> anyhow::Result<Option<String>> {
        let event: LifecycleEvent = self.codec.decode(message.payload()).await?;
        if !event.kind.ends_workflow() {
            return Ok(None);
        }
        if !event.kind.is_success() {
            bail!(
                "bench workflow {} ended as {:?}: {}",
                event.workflow_id,
                event.kind,
                event.detail.unwrap_or_default()
            );
        }
        Ok(Some(event.workflow_id))
    }

    async fn closed_loop(&mut self, level: usize, bench: &Bench) -> anyhow::Result<Level> {
        let run = now_millis();
        let mut sent: HashMap<String, Instant> = HashMap::new();
        let mut counted: HashSet<String> = HashSet::new();
        // A first workflow warms the definition cache, the task topics and the workers' groups.
        let probe = format!("bench-{run}-probe");
        send(&self.producer, &self.trigger(&probe, bench).await?)?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        loop {
            let message = tokio::time::timeout_at(deadline, self.events.recv())
                .await
                .context("the first bench workflow did not end within 120 s; is the workflow deployed and served?")??;
            if self.ended(&message).await?.as_deref() == Some(probe.as_str()) {
                break;
            }
        }
        let mut window = Window::new(bench);
        let mut next = 0;
        for _ in 0..level {
            let id = format!("bench-{run}-{next}");
            next += 1;
            let record = self.trigger(&id, bench).await?;
            sent.insert(id, Instant::now());
            send(&self.producer, &record)?;
        }
        while !window.over() {
            let message =
                match tokio::time::timeout(Duration::from_secs(60), self.events.recv()).await {
                    Ok(message) => message?,
                    Err(_) => bail!("no workflow ended within 60 s at {level} in flight"),
                };
            let Some(id) = self.ended(&message).await? else {
                continue;
            };
            let Some(at) = sent.remove(&id) else {
                continue;
            };
            if !counted.insert(id) {
                continue;
            }
            window.record(at, &bench.pids);
            let id = format!("bench-{run}-{next}");
            next += 1;
            let record = self.trigger(&id, bench).await?;
            sent.insert(id, Instant::now());
            send(&self.producer, &record)?;
        }
        Ok(window.figures(level, &bench.pids))
    }
}

fn print_level(what: &str, level: &Level, ceiling: Option<&Level>, steps: usize) {
    let cpu: Vec<String> = level
        .cpu_percent
        .iter()
        .map(|(name, percent)| format!("{name} {percent:.0}%"))
        .collect();
    let against = ceiling.map_or(String::new(), |raw| {
        format!(
            "; per step {:.2}x the raw round trip p50, steps/s {:.0}% of raw round trips/s",
            level.p50_ms / steps.max(1) as f64 / raw.p50_ms,
            100.0 * level.per_second * steps as f64 / raw.per_second
        )
    });
    println!(
        "{what:>4} {:>4} in flight: {:>8.0}/s  p50 {:>7.1} ms  p95 {:>7.1} ms  p99 {:>7.1} ms  cpu: {}{against}",
        level.in_flight,
        level.per_second,
        level.p50_ms,
        level.p95_ms,
        level.p99_ms,
        cpu.join(", ")
    );
}

fn print_table(report: &Report) {
    println!();
    println!(
        "| in flight | raw round trips/s | raw p50 ms | edow workflows/s | edow steps/s | edow p50 / p95 / p99 ms | per-step overhead vs raw p50 | steps/s vs raw |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for level in &report.edow {
        let raw = report.raw.iter().find(|r| r.in_flight == level.in_flight);
        let steps = report.steps.max(1) as f64;
        let (raw_rate, raw_p50, overhead, ratio) = match raw {
            Some(raw) => (
                format!("{:.0}", raw.per_second),
                format!("{:.1}", raw.p50_ms),
                format!("{:.2}x", level.p50_ms / steps / raw.p50_ms),
                format!("{:.0}%", 100.0 * level.per_second * steps / raw.per_second),
            ),
            None => ("-".into(), "-".into(), "-".into(), "-".into()),
        };
        println!(
            "| {} | {raw_rate} | {raw_p50} | {:.0} | {:.0} | {:.1} / {:.1} / {:.1} | {overhead} | {ratio} |",
            level.in_flight,
            level.per_second,
            level.per_second * steps,
            level.p50_ms,
            level.p95_ms,
            level.p99_ms
        );
    }
}

/// An SVG chart of p50 latency against throughput (steps or round trips per second), one line per series.
fn chart(report: &Report) -> String {
    let steps = report.steps.max(1) as f64;
    // (name, colour, (x, y) points)
    type Series<'a> = (&'a str, &'a str, Vec<(f64, f64)>);
    let series: Vec<Series> = vec![
        (
            "raw round trip",
            "#1f77b4",
            report
                .raw
                .iter()
                .map(|l| (l.per_second, l.p50_ms))
                .collect(),
        ),
        (
            "edow step (workflow p50 / steps)",
            "#d62728",
            report
                .edow
                .iter()
                .map(|l| (l.per_second * steps, l.p50_ms / steps))
                .collect(),
        ),
    ];
    let (width, height, margin) = (720.0, 420.0, 60.0);
    let max_x = series
        .iter()
        .flat_map(|s| s.2.iter().map(|p| p.0))
        .fold(1.0_f64, f64::max)
        * 1.1;
    let max_y = series
        .iter()
        .flat_map(|s| s.2.iter().map(|p| p.1))
        .fold(1.0_f64, f64::max)
        * 1.1;
    let x = |v: f64| margin + v / max_x * (width - 2.0 * margin);
    let y = |v: f64| height - margin - v / max_y * (height - 2.0 * margin);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{margin}\" y=\"24\" font-size=\"14\">{} - p50 latency against throughput</text>\n\
         <line x1=\"{margin}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n\
         <line x1=\"{margin}\" y1=\"{margin}\" x2=\"{margin}\" y2=\"{}\" stroke=\"black\"/>\n\
         <text x=\"{}\" y=\"{}\" text-anchor=\"middle\">per second (round trips / steps)</text>\n\
         <text x=\"16\" y=\"{}\" transform=\"rotate(-90 16 {})\" text-anchor=\"middle\">p50 ms (per round trip / per step)</text>\n",
        xml_escape(&report.label),
        height - margin,
        width - margin,
        height - margin,
        height - margin,
        width / 2.0,
        height - 20.0,
        height / 2.0,
        height / 2.0,
    );
    for i in 0..=4 {
        let (vx, vy) = (max_x * i as f64 / 4.0, max_y * i as f64 / 4.0);
        svg.push_str(&format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{vx:.0}</text>\n<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{vy:.1}</text>\n",
            x(vx),
            height - margin + 16.0,
            margin - 6.0,
            y(vy) + 4.0
        ));
    }
    for (n, (name, colour, points)) in series.iter().enumerate() {
        let path: Vec<String> = points
            .iter()
            .map(|(px, py)| format!("{:.1},{:.1}", x(*px), y(*py)))
            .collect();
        svg.push_str(&format!(
            "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\" points=\"{}\"/>\n",
            path.join(" ")
        ));
        for (px, py) in points {
            svg.push_str(&format!(
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{colour}\"/>\n",
                x(*px),
                y(*py)
            ));
        }
        svg.push_str(&format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" fill=\"{colour}\">{}</text>\n",
            width - margin - 220.0,
            margin + 16.0 * n as f64,
            xml_escape(name)
        ));
    }
    svg.push_str("</svg>\n");
    svg
}

fn xml_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn level(in_flight: usize, per_second: f64, p50_ms: f64) -> Level {
        Level {
            in_flight,
            per_second,
            p50_ms,
            p95_ms: p50_ms,
            p99_ms: p50_ms,
            cpu_percent: BTreeMap::new(),
        }
    }

    #[test]
    fn the_chart_plots_each_level_and_escapes_the_label() {
        let report = Report {
            label: "memory <broker>".into(),
            workflow: "bench".into(),
            steps: 3,
            raw: vec![level(1, 150.0, 6.5), level(16, 2_000.0, 8.0)],
            edow: vec![level(1, 20.0, 45.0), level(16, 200.0, 80.0)],
        };
        let svg = chart(&report);
        assert!(svg.contains("memory &lt;broker&gt;"));
        assert_eq!(svg.matches("<circle").count(), 4);
        assert_eq!(svg.matches("<polyline").count(), 2);
    }

    #[test]
    fn cpu_ticks_include_this_process() {
        let ticks = cpu_ticks(&[("nobody".into(), u32::MAX)]);
        assert_eq!(ticks.len(), 1);
        assert_eq!(ticks[0].0, "client");
    }
}
