//! Graceful shutdown of a worker, end to end: SIGTERM while tasks run; the worker takes no new task, lets the
//! running ones finish, publishes their results, commits and leaves the group, so a worker that takes over
//! runs none of them again.

mod common;

use std::time::{Duration, Instant};

use common::{results, Cluster};
use edow_schemas::contracts::{LifecycleKind, TaskStatus};

const DRAIN: &str = "name: drain
steps:
  - { name: slow, task: drain.slow }
  - { name: after, task: drain.fast }
";
const RUNNING: usize = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_running_tasks_finish_publish_and_commit() {
    let cluster = Cluster::start();
    let _orchestrator = cluster.orchestrator();
    cluster.wait_for_topics();
    cluster.deploy(DRAIN);
    let mut first = cluster.worker("first", &["drain.slow=sleep:4s", "drain.fast=echo"], 8);
    let ids: Vec<(String, String)> = (0..RUNNING)
        .map(|i| (format!("drain-{i}"), "{}".to_string()))
        .collect();
    cluster.start_many("drain", &ids).await;
    let mut events = cluster.events();
    events
        .until(Duration::from_secs(60), |seen| {
            seen.iter()
                .filter(|e| {
                    e.kind == LifecycleKind::StepStarted && e.step.as_deref() == Some("slow")
                })
                .count()
                >= RUNNING
        })
        .await;
    // The slow tasks are running in the first worker now.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let asked = Instant::now();
    assert!(
        first.process().terminate(Duration::from_secs(30)),
        "a clean exit:\n{}",
        first.log()
    );
    let took = asked.elapsed();
    let log = first.log();
    assert!(
        log.contains("shutting down: finishing running tasks"),
        "{log}"
    );
    assert!(!log.contains("abandoning them"), "{log}");
    assert!(
        took >= Duration::from_secs(2),
        "it waited for the running tasks: {took:?}"
    );

    // Each slow task has one result, from the first worker, completed.
    let slow: Vec<_> = results(&cluster)
        .await
        .into_iter()
        .filter(|r| r.step == "slow")
        .collect();
    assert_eq!(slow.len(), RUNNING, "{slow:?}");
    assert!(
        slow.iter().all(|r| r.status == TaskStatus::Completed),
        "{slow:?}"
    );

    // A worker that takes over finishes the workflows without running a slow task again: they were committed.
    let second = cluster.worker("second", &["drain.slow=sleep:4s", "drain.fast=echo"], 8);
    events
        .until(Duration::from_secs(60), |seen| {
            seen.iter()
                .filter(|e| e.kind == LifecycleKind::WorkflowCompleted)
                .count()
                >= RUNNING
        })
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let slow_again = results(&cluster)
        .await
        .into_iter()
        .filter(|r| r.step == "slow")
        .count();
    assert_eq!(
        slow_again,
        RUNNING,
        "a slow task ran again:\n{}",
        second.log()
    );
    eprintln!("SIGTERM with {RUNNING} tasks running: the worker exited cleanly after {took:?}, none redelivered");
}
