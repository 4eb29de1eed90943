//! Every metric edow exports, by name, in one place: what each binary counts is defined here and nowhere else, so
//! that the names, units, labels and buckets stay consistent and the Grafana dashboard (`deploy/grafana`) can be
//! checked against one list.
//!
//! Conventions (Prometheus'): names start with `edow_`, carry their base unit (`_seconds`, `_records`), counters
//! end in `_total`, histograms have explicit buckets. Label values that come from outside (error codes a worker
//! sends, workflow names) pass through [`Cardinality::bounded`], so a hostile or buggy client cannot grow the
//! registry without bound.

use std::collections::HashSet;
use std::sync::{LazyLock, Mutex};

use prometheus::core::Collector;
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

/// The registry every edow metric is registered in; `/metrics` renders it.
pub static REGISTRY: LazyLock<Registry> = LazyLock::new(Registry::new);

/// Batch stages and Kafka round trips: 0.5 ms to 10 s.
const STAGE_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// One task: 1 ms to an hour.
const TASK_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
    3600.0,
];
/// One workflow, start to end: 10 ms to a week.
const WORKFLOW_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
    14_400.0, 86_400.0, 604_800.0,
];
/// Inputs per orchestrator batch.
const BATCH_SIZE_BUCKETS: &[f64] = &[1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0];
/// Restoring one partition: 10 ms to 5 minutes.
const RESTORE_BUCKETS: &[f64] = &[
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

fn register<C: Collector + Clone + 'static>(collector: C) -> C {
    // A name registered twice is a programming error in this file, caught by the unit test that touches every
    // metric; it is logged rather than allowed to take the process down.
    if let Err(e) = REGISTRY.register(Box::new(collector.clone())) {
        tracing::error!("registering a metric: {e}");
    }
    collector
}

fn counter(name: &str, help: &str) -> IntCounter {
    register(IntCounter::new(name, help).expect("a valid metric name"))
}

fn counters(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register(IntCounterVec::new(Opts::new(name, help), labels).expect("a valid metric name"))
}

fn gauge(name: &str, help: &str) -> IntGauge {
    register(IntGauge::new(name, help).expect("a valid metric name"))
}

fn gauges(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    register(IntGaugeVec::new(Opts::new(name, help), labels).expect("a valid metric name"))
}

fn histogram(name: &str, help: &str, buckets: &[f64]) -> Histogram {
    let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
    register(Histogram::with_opts(opts).expect("a valid metric name"))
}

fn histograms(name: &str, help: &str, labels: &[&str], buckets: &[f64]) -> HistogramVec {
    let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
    register(HistogramVec::new(opts, labels).expect("a valid metric name"))
}

// --- Kafka edges, every binary ---------------------------------------------------------------------------------

pub static RECORDS_CONSUMED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counters(
        "edow_records_consumed_total",
        "Records consumed, by topic.",
        &["topic"],
    )
});
pub static RECORDS_PRODUCED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counters(
        "edow_records_produced_total",
        "Records produced and acknowledged by the broker, by topic.",
        &["topic"],
    )
});
pub static DEAD_LETTERS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counters(
        "edow_dead_letters_total",
        "Records dead-lettered, by the topic they came from and the reason (error kind).",
        &["topic", "reason"],
    )
});
/// The name of [`CONSUMER_LAG`], which autoscalers (k8s/autoscaling) scale workers on.
pub const CONSUMER_LAG_NAME: &str = "edow_consumer_lag_records";
pub static CONSUMER_LAG: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    gauges(
        CONSUMER_LAG_NAME,
        "High watermark minus committed offset of each partition this process's consumer group member owns \
         (librdkafka statistics, as the lag exporters compute it).",
        &["group", "topic", "partition"],
    )
});

// --- Orchestrator ------------------------------------------------------------------------------------------------

pub static WORKFLOWS_STARTED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counters(
        "edow_workflows_started_total",
        "Workflows started, by workflow name.",
        &["workflow"],
    )
});
pub static WORKFLOWS_ENDED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counters(
        "edow_workflows_ended_total",
        "Workflows ended, by workflow name and status (completed, failed, cancelled, compensated, \
         compensation_failed, filtered).",
        &["workflow", "status"],
    )
});
pub static WORKFLOW_DURATION: LazyLock<HistogramVec> = LazyLock::new(|| {
    histograms(
        "edow_workflow_duration_seconds",
        "Time from a workflow's start to its end, by workflow name and status.",
        &["workflow", "status"],
        WORKFLOW_BUCKETS,
    )
});
pub static STEP_FAILURES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counters(
        "edow_step_failures_total",
        "Step attempts that failed, by workflow name and error code (including timeouts the orchestrator ruled).",
        &["workflow", "code"],
    )
});
pub static STEP_RETRIES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counters(
        "edow_step_retries_total",
        "Step retries scheduled, by workflow name and the error code of the failed attempt.",
        &["workflow", "code"],
    )
});
pub static BATCH_INPUTS: LazyLock<Histogram> = LazyLock::new(|| {
    histogram(
        "edow_orchestrator_batch_inputs",
        "Inputs (triggers, signals, results) applied per orchestrator batch.",
        BATCH_SIZE_BUCKETS,
    )
});
pub static BATCH_STAGE: LazyLock<HistogramVec> = LazyLock::new(|| {
    histograms(
        "edow_orchestrator_batch_stage_seconds",
        "Time per batch stage: decode, apply, produce (the acknowledged changelog write), commit.",
        &["stage"],
        STAGE_BUCKETS,
    )
});
pub static REGISTRY_STALLS: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "edow_orchestrator_registry_stalls_total",
        "Batches rewound because the schema registry stayed unreachable.",
    )
});
pub static RESTORE_DURATION: LazyLock<Histogram> = LazyLock::new(|| {
    histogram(
        "edow_restore_duration_seconds",
        "Time to restore one partition from the changelog, read to taken over.",
        RESTORE_BUCKETS,
    )
});
pub static WORKFLOWS_RESTORED: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "edow_workflows_restored_total",
        "Workflows read back from the changelog by partition restores.",
    )
});
pub static WORKFLOWS_IN_FLIGHT: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    gauges(
        "edow_workflows_in_flight",
        "Running workflows held, per owned partition.",
        &["partition"],
    )
});

// --- Worker ------------------------------------------------------------------------------------------------------

pub static TASKS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counters(
        "edow_tasks_total",
        "Tasks a worker answered, by task type and outcome (completed, failed, dead_lettered, answered_again).",
        &["task_type", "outcome"],
    )
});
pub static TASK_FAILURES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counters(
        "edow_task_failures_total",
        "Task attempts a handler failed, by task type and error code.",
        &["task_type", "code"],
    )
});
pub static TASK_RETRIES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counters(
        "edow_task_retries_total",
        "Task attempts run that were retries (attempt 2 or later), by task type.",
        &["task_type"],
    )
});
pub static TASK_EXECUTION: LazyLock<HistogramVec> = LazyLock::new(|| {
    histograms(
        "edow_task_execution_seconds",
        "Time a handler ran, by task type.",
        &["task_type"],
        TASK_BUCKETS,
    )
});
pub static TASK_SCHEDULE_TO_START: LazyLock<HistogramVec> = LazyLock::new(|| {
    histograms(
        "edow_task_schedule_to_start_seconds",
        "Time from the orchestrator requesting a task to a handler starting it, by task type.",
        &["task_type"],
        TASK_BUCKETS,
    )
});
pub static WORKER_IN_FLIGHT: LazyLock<IntGauge> = LazyLock::new(|| {
    gauge(
        "edow_worker_tasks_in_flight",
        "Tasks this worker is running.",
    )
});
pub static WORKER_FREE_SLOTS: LazyLock<IntGauge> = LazyLock::new(|| {
    gauge(
        "edow_worker_free_slots",
        "Tasks this worker could start now (concurrency minus running).",
    )
});
pub static CIRCUIT_STATE: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    gauges(
        "edow_circuit_state",
        "The circuit breaker of each task type this worker serves with one: 0 closed (tasks run), 1 open (its \
         partitions are paused), 2 half-open (probing).",
        &["task_type"],
    )
});

// --- Schema registry ---------------------------------------------------------------------------------------------

pub static REGISTRY_REQUESTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counters(
        "edow_registry_requests_total",
        "Schema registry HTTP requests, by method and status code.",
        &["method", "status"],
    )
});
pub static REGISTRY_SCHEMAS: LazyLock<IntGauge> = LazyLock::new(|| {
    gauge(
        "edow_registry_schemas",
        "Schemas (distinct ids) the registry holds.",
    )
});

/// The binaries that export metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exporter {
    Orchestrator,
    Worker,
    Registry,
}

/// Every metric `exporter` exports (touching each registers it).
pub fn collectors(exporter: Exporter) -> Vec<&'static dyn Collector> {
    let kafka: [&'static dyn Collector; 4] = [
        &*RECORDS_CONSUMED,
        &*RECORDS_PRODUCED,
        &*DEAD_LETTERS,
        &*CONSUMER_LAG,
    ];
    match exporter {
        Exporter::Orchestrator => {
            let own: [&'static dyn Collector; 11] = [
                &*WORKFLOWS_STARTED,
                &*WORKFLOWS_ENDED,
                &*WORKFLOW_DURATION,
                &*STEP_FAILURES,
                &*STEP_RETRIES,
                &*BATCH_INPUTS,
                &*BATCH_STAGE,
                &*REGISTRY_STALLS,
                &*RESTORE_DURATION,
                &*WORKFLOWS_RESTORED,
                &*WORKFLOWS_IN_FLIGHT,
            ];
            kafka.into_iter().chain(own).collect()
        }
        Exporter::Worker => {
            let own: [&'static dyn Collector; 8] = [
                &*TASKS,
                &*TASK_FAILURES,
                &*TASK_RETRIES,
                &*TASK_EXECUTION,
                &*TASK_SCHEDULE_TO_START,
                &*WORKER_IN_FLIGHT,
                &*WORKER_FREE_SLOTS,
                &*CIRCUIT_STATE,
            ];
            kafka.into_iter().chain(own).collect()
        }
        Exporter::Registry => vec![&*REGISTRY_REQUESTS, &*REGISTRY_SCHEMAS],
    }
}

/// Registers every metric of `exporter` at start: those without labels then render at 0 from the first scrape,
/// so that a dashboard tells "nothing happened" from "not exported" (labelled ones appear with their first
/// label values, as with every Prometheus client).
pub fn init(exporter: Exporter) {
    collectors(exporter);
}

/// The name of every metric family `exporter` exports.
pub fn names(exporter: Exporter) -> Vec<String> {
    collectors(exporter)
        .iter()
        .flat_map(|c| c.desc())
        .map(|d| d.fq_name.clone())
        .collect()
}

/// The registry in the Prometheus text exposition format.
pub fn render() -> String {
    let encoder = prometheus::TextEncoder::new();
    encoder
        .encode_to_string(&REGISTRY.gather())
        .unwrap_or_else(|e| format!("# rendering metrics failed: {e}\n"))
}

/// Most distinct values one label takes from outside input; the rest are reported as [`OTHER`].
pub const MAX_LABEL_VALUES: usize = 200;
/// Longest label value kept, in bytes.
pub const MAX_LABEL_BYTES: usize = 64;
/// The label value standing for every value past [`MAX_LABEL_VALUES`].
pub const OTHER: &str = "_other";

/// The values one kind of label has taken so far. Error codes and workflow names come from records that anyone
/// with write access to a topic can produce; each distinct value is a new time series, so past a bound they are
/// folded into [`OTHER`].
pub struct Cardinality {
    seen: Mutex<HashSet<String>>,
}

/// Error codes, as workers and the engine report them.
pub static CODES: LazyLock<Cardinality> = LazyLock::new(Cardinality::new);
/// Workflow names.
pub static WORKFLOW_NAMES: LazyLock<Cardinality> = LazyLock::new(Cardinality::new);
/// Task types.
pub static TASK_TYPES: LazyLock<Cardinality> = LazyLock::new(Cardinality::new);

impl Cardinality {
    pub fn new() -> Cardinality {
        Cardinality {
            seen: Mutex::new(HashSet::new()),
        }
    }

    /// `value` itself (cut to [`MAX_LABEL_BYTES`]) while fewer than [`MAX_LABEL_VALUES`] distinct values were seen,
    /// or it is one of them; [`OTHER`] otherwise.
    pub fn bounded(&self, value: &str) -> String {
        let mut end = value.len().min(MAX_LABEL_BYTES);
        while !value.is_char_boundary(end) {
            end -= 1;
        }
        let value = &value[..end];
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.contains(value) {
            return value.to_string();
        }
        if seen.len() < MAX_LABEL_VALUES {
            seen.insert(value.to_string());
            return value.to_string();
        }
        OTHER.to_string()
    }
}

impl Default for Cardinality {
    fn default() -> Self {
        Cardinality::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_registers_once_and_renders_with_its_prefix() {
        init(Exporter::Orchestrator);
        init(Exporter::Orchestrator);
        init(Exporter::Worker);
        init(Exporter::Registry);
        RECORDS_CONSUMED.with_label_values(&["t"]).inc();
        BATCH_INPUTS.observe(3.0);
        let text = render();
        let names: HashSet<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        assert!(names.iter().all(|n| n.starts_with("edow_")), "{names:?}");
        for name in [
            "edow_records_consumed_total",
            "edow_orchestrator_batch_inputs",
            "edow_orchestrator_registry_stalls_total",
            "edow_workflows_restored_total",
            "edow_worker_free_slots",
            "edow_registry_schemas",
        ] {
            assert!(names.contains(name), "{name} missing from {names:?}");
        }
        assert!(text.contains("edow_records_consumed_total{topic=\"t\"} 1"));
        assert!(text.contains("edow_orchestrator_batch_inputs_bucket{le=\"5\"} 1"));
    }

    #[test]
    fn label_values_from_outside_are_bounded() {
        let codes = Cardinality::new();
        for i in 0..MAX_LABEL_VALUES {
            assert_eq!(codes.bounded(&format!("code{i}")), format!("code{i}"));
        }
        assert_eq!(codes.bounded("one_too_many"), OTHER);
        assert_eq!(codes.bounded("code7"), "code7", "known values stay");
        let long = "é".repeat(100);
        let cut = Cardinality::new().bounded(&long);
        assert!(cut.len() <= MAX_LABEL_BYTES && long.starts_with(&cut));
    }
}
