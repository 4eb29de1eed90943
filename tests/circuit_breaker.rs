//! A circuit breaker per task type, end to end: a downstream that fails for 10 s opens the breaker of the type
//! that calls it, its tasks wait in Kafka (paused partitions) instead of burning their attempts, half-open probes
//! find it back, and every workflow completes; its states show as `edow_circuit_state`. The same outage without
//! a breaker exhausts the attempts of the workflows (the retry policy gives them about 2 s).

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Cluster, Scrape};
use edow_schemas::contracts::LifecycleKind;
use edow_testkit::free_port;

const WORKFLOWS: usize = 20;
const OUTAGE: Duration = Duration::from_secs(10);

/// Four attempts within about 2 s: without a breaker, a 10 s outage fails the workflow.
const PAY: &str = "name: breaker-pay
retry: { max_attempts: 4, initial_backoff: 300ms, multiplier: 2, max_backoff: 1s }
steps:
  - { name: pay, task: breaker.pay }
";

/// A downstream answering 503 until `OUTAGE` after it starts, then 200; counts the requests it fails.
async fn flaky_downstream() -> (String, Arc<AtomicUsize>) {
    let failed = Arc::new(AtomicUsize::new(0));
    let until = Instant::now() + OUTAGE;
    let counter = failed.clone();
    let app = axum::Router::new().route(
        "/pay",
        axum::routing::post(move || {
            let counter = counter.clone();
            async move {
                if Instant::now() < until {
                    counter.fetch_add(1, Ordering::SeqCst);
                    (
                        axum::http::StatusCode::SERVICE_UNAVAILABLE,
                        "down".to_string(),
                    )
                } else {
                    (axum::http::StatusCode::OK, r#"{"paid": true}"#.to_string())
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/pay", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, failed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_opens_the_breaker_and_no_workflow_exhausts_its_attempts() {
    let cluster = Cluster::start();
    let _orchestrator = cluster.orchestrator();
    cluster.wait_for_topics();
    cluster.deploy(PAY);
    let (url, failed) = flaky_downstream().await;
    let metrics = format!("127.0.0.1:{}", free_port());
    let task = format!("breaker.pay=http:{url}");
    let worker = cluster.worker_with(
        "guarded",
        &[&task],
        4,
        &[
            "--circuit-breaker",
            "breaker.pay:consecutive=3,open_for=2s,probes=1",
            "--metrics-addr",
            &metrics,
        ],
    );
    let started = Instant::now();
    let ids: Vec<(String, String)> = (0..WORKFLOWS)
        .map(|i| (format!("guarded-{i}"), format!(r#"{{"n": {i}}}"#)))
        .collect();
    cluster.start_many("breaker-pay", &ids).await;

    // During the outage the breaker is open or probing, never closed for long.
    let mut states = Vec::new();
    while started.elapsed() < OUTAGE - Duration::from_secs(1) {
        let scrape = Scrape::fetch(&metrics).await;
        states.push(scrape.sum("edow_circuit_state", &[("task_type", "breaker.pay")]));
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(states.contains(&1.0), "never open: {states:?}");
    let mut events = cluster.events();
    events
        .until(Duration::from_secs(60), |seen| {
            seen.iter().filter(|e| e.kind.ends_workflow()).count() >= WORKFLOWS
        })
        .await;
    let failures: Vec<_> = events
        .seen
        .iter()
        .filter(|e| e.kind.ends_workflow() && e.kind != LifecycleKind::WorkflowCompleted)
        .map(|e| format!("{} {:?}: {:?}", e.workflow_id, e.kind, e.detail))
        .collect();
    assert!(failures.is_empty(), "{failures:?}\n{}", worker.log());
    // Tasks waited in Kafka: far fewer calls failed than the attempts the workflows had (20 x 4).
    let calls_failed = failed.load(Ordering::SeqCst);
    assert!(
        calls_failed < WORKFLOWS,
        "{calls_failed} calls during the outage"
    );
    let log = worker.log();
    assert!(log.contains("circuit breaker opened"), "{log}");
    assert!(log.contains("circuit breaker closed"), "{log}");
    let closed = Scrape::fetch(&metrics).await;
    assert_eq!(
        closed.sum("edow_circuit_state", &[("task_type", "breaker.pay")]),
        0.0
    );
    eprintln!(
        "outage {OUTAGE:?}: {calls_failed} calls failed, breaker states {states:?}, all {WORKFLOWS} completed {:?} after the start",
        started.elapsed()
    );
}

/// The control: the same outage and retry policy without a breaker fails workflows, so the test above shows the
/// breaker at work and not a lenient policy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_breaker_the_same_outage_exhausts_attempts() {
    let cluster = Cluster::start();
    let _orchestrator = cluster.orchestrator();
    cluster.wait_for_topics();
    cluster.deploy(PAY);
    let (url, _) = flaky_downstream().await;
    let task = format!("breaker.pay=http:{url}");
    let _worker = cluster.worker("unguarded", &[&task], 4);
    let ids: Vec<(String, String)> = (0..5)
        .map(|i| (format!("unguarded-{i}"), "{}".to_string()))
        .collect();
    cluster.start_many("breaker-pay", &ids).await;
    let mut events = cluster.events();
    events
        .until(Duration::from_secs(60), |seen| {
            seen.iter().filter(|e| e.kind.ends_workflow()).count() >= 5
        })
        .await;
    let failed = events
        .seen
        .iter()
        .filter(|e| e.kind == LifecycleKind::WorkflowFailed)
        .count();
    assert_eq!(failed, 5, "{:?}", events.count_by_kind());
}
