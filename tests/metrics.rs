//! `/metrics` of every binary, scraped after a run and checked against what happened in it: workflows started
//! and ended, failures and retries by code, dead letters by reason, records per topic, batches, restores, worker
//! tasks and slots, consumer lag per partition, and the registry's requests and schemas.

mod common;

use std::time::{Duration, Instant};

use common::{ended, http_client, wait_ready, Cluster, Scrape, PARTITIONS};
use edow_testkit::free_port;
use serde_json::json;

const METERED: &str = r#"
name: metered
retry: { max_attempts: 3, initial_backoff: 50ms, max_backoff: 100ms }
steps:
  - { name: first, task: meter.ok }
  - { name: second, task: meter.flaky }
"#;

const RUNS: usize = 12;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint_reports_what_happened() {
    let cluster = Cluster::start();
    let http = format!("127.0.0.1:{}", free_port());
    let metrics = format!("127.0.0.1:{}", free_port());
    // Statistics every 500 ms, so that the lag reported catches up with the commits within the test.
    let stats = "statistics.interval.ms=500";
    let _orchestrator = cluster.orchestrator_with(&["--http-addr", &http, "--kafka-option", stats]);
    cluster.wait_for_topics();
    wait_ready(&http).await;
    let _worker = cluster.worker_with(
        "metered",
        &["meter.ok=echo", "meter.flaky=fail:1"],
        8,
        &["--metrics-addr", &metrics, "--kafka-option", stats],
    );
    cluster.deploy(METERED);

    let workflows: Vec<(String, String)> = (0..RUNS)
        .map(|i| (format!("metered-{i}"), json!({"n": i}).to_string()))
        .collect();
    cluster.start_many("metered", &workflows).await;
    cluster
        .start_many("no-such-workflow", &[("stray".into(), "{}".into())])
        .await;
    let mut events = cluster.events();
    events
        .until(Duration::from_secs(90), |seen| ended(seen) >= RUNS)
        .await;

    // Counters are bumped when the changelog write is acknowledged, a moment after the events are out.
    let orchestrator = eventually(&http, |m| {
        m.sum("edow_workflows_ended_total", &[("workflow", "metered")]) >= RUNS as f64
            && m.sum(
                "edow_dead_letters_total",
                &[("topic", "edow.triggers"), ("reason", "unknown_workflow")],
            ) >= 1.0
            && lag_settled(m, "edow-orchestrator", "edow.results")
    })
    .await;
    let runs = RUNS as f64;
    let metered = [("workflow", "metered")];
    assert_eq!(
        orchestrator.sum("edow_workflows_started_total", &metered),
        runs
    );
    let completed = [("workflow", "metered"), ("status", "completed")];
    assert_eq!(
        orchestrator.sum("edow_workflows_ended_total", &completed),
        runs
    );
    assert_eq!(
        orchestrator.sum("edow_workflows_ended_total", &metered),
        runs
    );
    assert_eq!(
        orchestrator.sum("edow_workflow_duration_seconds_count", &completed),
        runs
    );
    assert!(orchestrator.sum("edow_workflow_duration_seconds_sum", &completed) > 0.0);
    // meter.flaky fails its first attempt in every workflow, and is retried once.
    let injected = [("workflow", "metered"), ("code", "injected_failure")];
    assert_eq!(
        orchestrator.sum("edow_step_failures_total", &injected),
        runs
    );
    assert_eq!(orchestrator.sum("edow_step_retries_total", &injected), runs);
    assert_eq!(
        orchestrator.sum(
            "edow_dead_letters_total",
            &[("topic", "edow.triggers"), ("reason", "unknown_workflow")]
        ),
        1.0
    );
    // Inputs: every trigger, and three results per workflow (first, and second twice).
    let triggers = orchestrator.sum("edow_records_consumed_total", &[("topic", "edow.triggers")]);
    let results = orchestrator.sum("edow_records_consumed_total", &[("topic", "edow.results")]);
    assert_eq!(triggers, runs + 1.0);
    assert_eq!(results, 3.0 * runs);
    assert_eq!(
        orchestrator.sum("edow_orchestrator_batch_inputs_sum", &[]),
        triggers + results,
        "every input consumed went through a batch"
    );
    let produce = [("stage", "produce")];
    assert!(orchestrator.sum("edow_orchestrator_batch_stage_seconds_count", &produce) >= 1.0);
    // Tasks: first once, second twice per workflow (the retry on its retry topic).
    let tasks = orchestrator.sum(
        "edow_records_produced_total",
        &[("topic", "edow.tasks.meter.ok")],
    ) + orchestrator.sum(
        "edow_records_produced_total",
        &[("topic", "edow.tasks.meter.flaky")],
    ) + orchestrator.sum(
        "edow_records_produced_total",
        &[("topic", "edow.tasks.meter.flaky.retry")],
    );
    assert_eq!(tasks, 3.0 * runs, "{}", orchestrator.text);
    assert_eq!(
        orchestrator.sum("edow_restore_duration_seconds_count", &[]),
        f64::from(PARTITIONS),
        "one restore per partition"
    );
    assert_eq!(
        orchestrator.series("edow_workflows_in_flight", &[]),
        PARTITIONS as usize
    );
    assert_eq!(
        orchestrator.sum("edow_workflows_in_flight", &[]),
        0.0,
        "all ended"
    );
    for topic in ["edow.triggers", "edow.results", "edow.signals"] {
        let group = [("group", "edow-orchestrator"), ("topic", topic)];
        assert_eq!(
            orchestrator.series("edow_consumer_lag_records", &group),
            PARTITIONS as usize,
            "lag of every partition of {topic}:\n{}",
            orchestrator.text
        );
    }

    let worker = eventually(&metrics, |m| {
        lag_settled(m, "edow-workers", "edow.tasks.meter.ok")
    })
    .await;
    let ok = [("task_type", "meter.ok")];
    let flaky = [("task_type", "meter.flaky")];
    assert_eq!(
        worker.sum(
            "edow_tasks_total",
            &[("task_type", "meter.ok"), ("outcome", "completed")]
        ),
        runs
    );
    assert_eq!(
        worker.sum(
            "edow_tasks_total",
            &[("task_type", "meter.flaky"), ("outcome", "completed")]
        ),
        runs
    );
    assert_eq!(
        worker.sum(
            "edow_tasks_total",
            &[("task_type", "meter.flaky"), ("outcome", "failed")]
        ),
        runs
    );
    assert_eq!(
        worker.sum(
            "edow_task_failures_total",
            &[("task_type", "meter.flaky"), ("code", "injected_failure")]
        ),
        runs
    );
    assert_eq!(worker.sum("edow_task_retries_total", &flaky), runs);
    assert_eq!(worker.sum("edow_task_retries_total", &ok), 0.0);
    assert_eq!(
        worker.sum("edow_task_execution_seconds_count", &flaky),
        2.0 * runs
    );
    assert_eq!(
        worker.sum("edow_task_schedule_to_start_seconds_count", &ok),
        runs
    );
    assert_eq!(
        worker.sum("edow_records_produced_total", &[("topic", "edow.results")]),
        3.0 * runs
    );
    assert_eq!(worker.sum("edow_worker_tasks_in_flight", &[]), 0.0);
    assert_eq!(worker.sum("edow_worker_free_slots", &[]), 8.0);
    assert_eq!(
        worker.series(
            "edow_consumer_lag_records",
            &[
                ("group", "edow-workers"),
                ("topic", "edow.tasks.meter.flaky.retry")
            ]
        ),
        PARTITIONS as usize
    );

    let registry = Scrape::fetch(cluster.registry.url().trim_start_matches("http://")).await;
    assert_eq!(
        registry.sum("edow_registry_schemas", &[]),
        distinct_schema_ids(&cluster.registry.url()).await as f64,
        "{}",
        registry.text
    );
    assert!(
        registry.sum(
            "edow_registry_requests_total",
            &[("method", "POST"), ("status", "200")]
        ) >= 1.0
    );
    assert_eq!(
        registry.series("edow_workflows_started_total", &[]),
        0,
        "the registry exports its own metrics only"
    );

    let health = http_client()
        .get(format!("http://{metrics}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_listener_address_stops_the_start_with_a_clear_error() {
    let cluster = Cluster::start();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let mut orchestrator = cluster.orchestrator_with(&["--http-addr", &addr]);
    let log = common::log_after_exit(&mut orchestrator).await;
    assert!(
        log.contains(&format!("binding the http listener to {addr}")),
        "{log}"
    );
}

/// Scrapes `addr` until `done` holds; panics with the last scrape after 30 s.
async fn eventually(addr: &str, done: impl Fn(&Scrape) -> bool) -> Scrape {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let scrape = Scrape::fetch(addr).await;
        if done(&scrape) {
            return scrape;
        }
        assert!(
            Instant::now() < deadline,
            "not reached; last scrape:\n{}",
            scrape.text
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Every partition of `topic` reports `group`'s lag, and all of it is 0: everything consumed was committed.
fn lag_settled(scrape: &Scrape, group: &str, topic: &str) -> bool {
    let labels = [("group", group), ("topic", topic)];
    scrape.series("edow_consumer_lag_records", &labels) == PARTITIONS as usize
        && scrape.sum("edow_consumer_lag_records", &labels) == 0.0
}

/// How many schema ids the registry's subjects use, asked through its REST API.
async fn distinct_schema_ids(url: &str) -> usize {
    let client = http_client();
    let subjects: Vec<String> = client
        .get(format!("{url}/subjects"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut ids = std::collections::BTreeSet::new();
    for subject in subjects {
        let versions: Vec<u32> = client
            .get(format!("{url}/subjects/{subject}/versions"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        for version in versions {
            let schema: serde_json::Value = client
                .get(format!("{url}/subjects/{subject}/versions/{version}"))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            ids.insert(schema["id"].as_u64().unwrap());
        }
    }
    ids.len()
}
