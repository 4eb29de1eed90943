//! The worker under adverse conditions, end to end: results that cannot be published for a while (the registry
//! gone mid-run) are published once it is back and every workflow completes without restarting the worker; a
//! broker frozen under a saturated worker (assignment lost, publishes abandoned, partitions paused) loses no
//! workflow; an output over the limit fails its step without retry; a full worker with a slow handler stays in
//! its group (it polls while paused); and records that are garbage, of an unknown schema, not JSON, or whose
//! output overflows the limit through `exec` never stall the worker.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{ended, wait_for_log, Cluster, PARTITIONS};
use edow_kafka::{produce_all, Outgoing};
use edow_schemas::contracts::{DeadLetter, LifecycleKind, TaskRequested, TaskResult, TaskStatus};
use edow_schemas::Topics;
use edow_testkit::{workspace_binary, Binary, Process};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};

/// A worker with extra command-line arguments (the common harness only sets tasks and concurrency).
fn worker(cluster: &Cluster, id: &str, tasks: &[&str], extra: &[&str]) -> Binary {
    let mut args = vec!["--worker-id".to_string(), id.to_string()];
    for task in tasks {
        args.extend(["--task".to_string(), task.to_string()]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let env = vec![
        ("EDOW_BOOTSTRAP_SERVERS", cluster.broker.bootstrap_servers()),
        ("EDOW_SCHEMA_REGISTRY_URL", cluster.registry.url()),
        ("EDOW_PARTITIONS", PARTITIONS.to_string()),
        ("EDOW_TASK_PARTITIONS", PARTITIONS.to_string()),
        ("RUST_LOG", "info,edow_worker=debug".into()),
    ];
    Binary::start("edow-worker", "worker", &args, &env)
}

/// A registry serving on `port` (where the cluster's was), reading the same schemas topic.
fn registry_on(cluster: &Cluster, port: u16, dir: &std::path::Path) -> Process {
    let binary = workspace_binary("edow-registry", "edow-registry");
    let args = vec![
        "--listen".to_string(),
        format!("127.0.0.1:{port}"),
        "--bootstrap-servers".into(),
        cluster.broker.bootstrap_servers(),
    ];
    let mut process = Process::spawn(
        "edow-registry (restarted)",
        &binary,
        &args,
        dir,
        dir.join("registry.log"),
    );
    process.wait_for_port(
        SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_secs(60),
    );
    process
}

fn count(log: &str, text: &str) -> usize {
    log.lines().filter(|l| l.contains(text)).count()
}

async fn wait_for_count(process: &Binary, text: &str, n: usize, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while count(&process.log(), text) < n {
        assert!(
            Instant::now() < deadline,
            "fewer than {n} '{text}' within {timeout:?} in:\n{}",
            process.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn assert_each_completed_once(events: &common::Events<'_>, expected: usize) {
    let completed = events.per_workflow(LifecycleKind::WorkflowCompleted);
    assert_eq!(completed.len(), expected, "{:?}", events.count_by_kind());
    for (id, list) in completed {
        assert_eq!(list.len(), 1, "{id} completed {} times", list.len());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_that_cannot_be_published_are_retried_until_the_registry_is_back() {
    const N: usize = 20;
    let mut cluster = Cluster::start();
    let _orchestrator = cluster.orchestrator();
    cluster.wait_for_topics();
    cluster.deploy("name: slow\nsteps:\n  - { name: op, task: slow.op }\n");
    let mut worker = worker(
        &cluster,
        "w1",
        &["slow.op=sleep:4s"],
        &["--concurrency", "32"],
    );
    let pid = worker.process().pid();
    wait_for_log(&worker, "partitions assigned", Duration::from_secs(60)).await;
    let workflows: Vec<(String, String)> = (0..N)
        .map(|i| (format!("slow-{i}"), format!("{{\"n\":{i}}}")))
        .collect();
    cluster.start_many("slow", &workflows).await;

    // Every task is running and none has answered yet: this worker has never encoded a result, so it needs
    // the registry to publish one. Take the registry away.
    wait_for_count(&worker, "task started", N, Duration::from_secs(60)).await;
    assert_eq!(
        common::results(&cluster).await.len(),
        0,
        "no result before the outage"
    );
    let port: u16 = cluster
        .registry
        .url()
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    cluster.registry.process().kill();
    let outage = Instant::now();
    wait_for_log(
        &worker,
        "publishing the result failed, retrying",
        Duration::from_secs(30),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;

    // A new registry on the same address, serving the same schemas from the broker.
    let dir = tempfile::tempdir().unwrap();
    let _registry = registry_on(&cluster, port, dir.path());
    let back = Instant::now();
    let mut events = cluster.events();
    events
        .until(Duration::from_secs(90), |seen| ended(seen) >= N)
        .await;
    let recovered = back.elapsed();
    events.drain(Duration::from_secs(1)).await;
    assert_each_completed_once(&events, N);
    assert!(
        worker.process().is_running() && worker.process().pid() == pid,
        "the same worker process answered"
    );
    let log = worker.log();
    let retried = count(&log, "result published after retrying");
    assert_eq!(
        retried, N,
        "every result went out after failed attempts:\n{log}"
    );
    let results = common::results(&cluster).await;
    let mut per_task: HashMap<&str, usize> = HashMap::new();
    for r in &results {
        assert_eq!(r.status, TaskStatus::Completed, "{r:?}");
        *per_task.entry(r.task_id.as_str()).or_default() += 1;
    }
    assert_eq!(per_task.len(), N, "{results:?}");
    eprintln!(
        "registry outage {:?}: {} failed publish log lines; all {N} workflows completed {:?} after the registry came back",
        back - outage,
        count(&log, "publishing the result failed"),
        recovered
    );
}

/// Serves every request with a 200 and a JSON string body of `bytes` bytes.
async fn big_body_server(bytes: usize) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/", listener.local_addr().unwrap());
    let body = format!("\"{}\"", "b".repeat(bytes - 2));
    tokio::spawn(async move {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            let body = body.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                let _ = socket.read(&mut buf).await;
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = socket.write_all(head.as_bytes()).await;
                let _ = socket.write_all(body.as_bytes()).await;
            });
        }
    });
    url
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_megabyte_output_fails_the_step_as_output_too_large_without_retry() {
    let cluster = Cluster::start();
    let _orchestrator = cluster.orchestrator();
    cluster.wait_for_topics();
    let url = big_body_server(2_000_000).await;
    let _worker = worker(&cluster, "w1", &[&format!("big.op=http:{url}")], &[]);
    cluster.deploy(
        "name: big\nretry: { max_attempts: 3, initial_backoff: 100ms }\nsteps:\n  - { name: op, task: big.op }\n",
    );
    let (ok, _, err) = cluster.cli(&["start", "big", "--id", "big-1", "--input", "{}"]);
    assert!(ok, "{err}");

    let mut events = cluster.events();
    events
        .until(Duration::from_secs(60), |seen| ended(seen) >= 1)
        .await;
    events.drain(Duration::from_secs(1)).await;
    assert!(
        events
            .seen
            .iter()
            .any(|e| e.kind == LifecycleKind::WorkflowFailed),
        "{:?}",
        events.count_by_kind()
    );
    let starts = events
        .seen
        .iter()
        .filter(|e| e.kind == LifecycleKind::StepStarted)
        .count();
    assert_eq!(starts, 1, "not retried: {:?}", events.count_by_kind());
    let results = common::results(&cluster).await;
    assert_eq!(results.len(), 1, "{results:?}");
    let error = results[0].error.as_ref().expect("a failure");
    assert_eq!(results[0].status, TaskStatus::Failed);
    assert_eq!(
        (error.code.as_str(), error.retryable),
        ("output_too_large", false)
    );
    assert!(
        error.message.contains("2000000 bytes") && error.message.contains("262144 bytes"),
        "names the size and the default limit: {}",
        error.message
    );
    assert!(results[0].output.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_worker_with_a_slow_handler_keeps_polling_and_stays_in_its_group() {
    const N: usize = 2;
    let cluster = Cluster::start();
    let _orchestrator = cluster.orchestrator();
    cluster.wait_for_topics();
    cluster.deploy("name: slow\nsteps:\n  - { name: op, task: slow.op }\n");
    // Each task takes longer than max.poll.interval: a worker that stops polling while busy is evicted.
    let worker = worker(
        &cluster,
        "w1",
        &["slow.op=sleep:9s"],
        &[
            "--concurrency",
            "1",
            "--max-poll-interval",
            "6s",
            "--task-timeout",
            "60s",
        ],
    );
    wait_for_log(&worker, "partitions assigned", Duration::from_secs(60)).await;
    let workflows: Vec<(String, String)> = (0..N)
        .map(|i| (format!("slow-{i}"), "{}".to_string()))
        .collect();
    cluster.start_many("slow", &workflows).await;
    let mut events = cluster.events();
    events
        .until(Duration::from_secs(90), |seen| ended(seen) >= N)
        .await;
    events.drain(Duration::from_secs(1)).await;
    assert_each_completed_once(&events, N);

    let log = worker.log();
    assert!(
        log.contains("max_poll_interval=6s"),
        "the configured interval is used:\n{log}"
    );
    assert!(
        log.contains("partitions paused"),
        "saturated, the worker paused:\n{log}"
    );
    assert_eq!(
        count(&log, "partitions assigned"),
        1,
        "one assignment:\n{log}"
    );
    assert_eq!(
        count(&log, "partitions revoked"),
        0,
        "never evicted:\n{log}"
    );
    assert!(
        !log.contains("consuming tasks:"),
        "no consumer error:\n{log}"
    );
    let results = common::results(&cluster).await;
    assert_eq!(results.len(), N, "each task ran once: {results:?}");
}

fn task(id: &str, input: String) -> TaskRequested {
    TaskRequested {
        task_id: format!("{id}/op/1"),
        workflow_id: id.into(),
        workflow_name: "none".into(),
        workflow_version: 1,
        step: "op".into(),
        task_type: "cat.op".into(),
        attempt: 1,
        input,
        deadline_at: None,
        priority: 0,
        correlation_id: None,
        requested_at: 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_unknown_non_json_and_overflowing_task_records_never_stall_the_worker() {
    let cluster = Cluster::start();
    let mut worker = worker(
        &cluster,
        "w1",
        &["cat.op=exec:cat"],
        &["--concurrency", "4", "--max-output-bytes", "65536"],
    );
    wait_for_log(&worker, "partitions assigned", Duration::from_secs(60)).await;
    let topic = cluster.topics.tasks("cat.op");
    let record = |key: &str, payload: Vec<u8>| Outgoing {
        topic: topic.clone(),
        partition: Some(0),
        key: key.as_bytes().to_vec(),
        payload: Some(payload),
        headers: Vec::new(),
    };
    let encode = |t: TaskRequested| {
        let (codec, topic) = (&cluster.codec, topic.clone());
        async move { codec.encode(&topic, &t).await.unwrap() }
    };
    // About 0.9 MB of JSON through `cat`: far over the 64 KiB output limit and the 64 KiB pipe buffer.
    let big = format!("{{\"blob\":\"{}\"}}", "c".repeat(900_000));
    let records = vec![
        record("garbage", b"definitely not avro".to_vec()),
        record("unknown", vec![0, 0x7f, 0xff, 0xff, 0xf0, 1, 2, 3]),
        record("notjson", encode(task("notjson", "{not json".into())).await),
        record("big", encode(task("big", big)).await),
        record("fine", encode(task("fine", r#"{"ok":1}"#.into())).await),
    ];
    let started = Instant::now();
    produce_all(&cluster.kafka.producer().unwrap(), &records)
        .await
        .unwrap();

    // Every record is answered, and the group's offset moves past all of them.
    let reader: BaseConsumer = cluster
        .kafka
        .group_consumer_config("edow-workers")
        .create()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut list = TopicPartitionList::new();
        list.add_partition(&topic, 0);
        let committed = reader
            .committed_offsets(list, Duration::from_secs(5))
            .ok()
            .and_then(|l| l.find_partition(&topic, 0).map(|e| e.offset()));
        if committed == Some(Offset::Offset(5)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "offset not committed past the bad records ({committed:?}):\n{}",
            worker.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let elapsed = started.elapsed();

    let mut results: HashMap<String, TaskResult> = HashMap::new();
    for r in common::results(&cluster).await {
        results.insert(r.workflow_id.clone(), r);
    }
    assert_eq!(results.len(), 3, "{results:?}");
    let code = |id: &str| {
        let e = results[id].error.as_ref().unwrap();
        (e.code.clone(), e.retryable)
    };
    assert_eq!(code("notjson"), ("invalid_input".to_string(), false));
    assert_eq!(code("big"), ("output_too_large".to_string(), false));
    assert!(
        results["big"]
            .error
            .as_ref()
            .unwrap()
            .message
            .contains("65536 bytes"),
        "{:?}",
        results["big"]
    );
    assert_eq!(results["fine"].output.as_deref(), Some(r#"{"ok":1}"#));

    let mut kinds: HashMap<String, String> = HashMap::new();
    for letter in common::read_topic(&cluster, &Topics::dead_letters(&topic))
        .await
        .unwrap()
    {
        let letter: DeadLetter = cluster.codec.decode(letter.payload()).await.unwrap();
        let key = String::from_utf8(letter.key.clone().unwrap()).unwrap();
        kinds.insert(key, letter.error_kind.clone());
    }
    assert_eq!(
        kinds,
        HashMap::from([
            ("garbage".to_string(), "not_framed".to_string()),
            ("unknown".to_string(), "unknown_schema".to_string()),
            ("notjson".to_string(), "invalid_input".to_string()),
        ])
    );
    eprintln!("5 task records (3 poison, one 0.9 MB through exec:cat) answered and committed in {elapsed:?}");
    // And it still shuts down cleanly on SIGTERM.
    assert!(
        worker.process().terminate(Duration::from_secs(30)),
        "a clean exit:\n{}",
        worker.log()
    );
    assert!(worker
        .log()
        .contains("shutting down: finishing running tasks"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_frozen_under_a_saturated_worker_loses_no_workflow() {
    const N: usize = 24;
    let mut cluster = Cluster::start();
    let _orchestrator = cluster.orchestrator();
    cluster.wait_for_topics();
    cluster.deploy(
        "name: steps\nsteps:\n  - { name: one, task: work.op }\n  - { name: two, task: work.op }\n",
    );
    let mut worker = worker(
        &cluster,
        "w1",
        &["work.op=sleep:2s"],
        &["--concurrency", "8"],
    );
    let pid = worker.process().pid();
    wait_for_log(&worker, "partitions assigned", Duration::from_secs(60)).await;
    let workflows: Vec<(String, String)> = (0..N)
        .map(|i| (format!("steps-{i}"), "{}".to_string()))
        .collect();
    cluster.start_many("steps", &workflows).await;
    // Freeze the broker while every permit is busy: the group session expires (the assignment is lost), the
    // running tasks' publishes fail and stop while no partition is assigned, then the partitions come back.
    wait_for_log(&worker, "partitions paused", Duration::from_secs(60)).await;
    let broker = cluster.broker.process().pid().to_string();
    let signal = |sig: &str| {
        let status = std::process::Command::new("kill")
            .args([sig, &broker])
            .status()
            .unwrap();
        assert!(status.success(), "kill {sig} {broker}");
    };
    signal("-STOP");
    let frozen = Instant::now();
    wait_for_count(
        &worker,
        "stopped publishing the result",
        1,
        Duration::from_secs(60),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    signal("-CONT");
    let thawed = Instant::now();

    let mut events = cluster.events();
    events
        .until(Duration::from_secs(120), |seen| ended(seen) >= N)
        .await;
    let recovered = thawed.elapsed();
    events.drain(Duration::from_secs(1)).await;
    assert_each_completed_once(&events, N);
    assert!(
        worker.process().is_running() && worker.process().pid() == pid,
        "the same worker process answered"
    );
    let log = worker.log();
    assert!(
        log.contains("partitions revoked"),
        "the assignment was lost:\n{log}"
    );
    eprintln!(
        "broker frozen {:?} under a saturated worker ({} results abandoned on revoke, {} answered again from memory); \
         all {N} workflows completed {recovered:?} after it thawed",
        thawed - frozen,
        count(&log, "stopped publishing the result"),
        count(&log, "redelivered task already answered"),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_fast_tasks_keeps_a_saturated_worker_fetching_at_full_speed() {
    // Far more tasks than permits, each done in an instant: the worker is saturated the whole burst. It used to
    // pause its partitions whenever the last permit was taken and resume them whenever one freed; librdkafka
    // drops what it fetched ahead on pause and fetches again on resume, so every task cost a fetch round trip
    // (thousands of tasks took minutes, some partitions starved). Flow control must not cost a round trip a task.
    const N: usize = 3000;
    let cluster = Cluster::start();
    let _orchestrator = cluster.orchestrator();
    cluster.wait_for_topics();
    cluster.deploy("name: burst\nsteps:\n  - { name: op, task: burst.op }\n");
    let worker = worker(&cluster, "w1", &["burst.op=echo"], &["--concurrency", "4"]);
    wait_for_log(&worker, "partitions assigned", Duration::from_secs(60)).await;
    let workflows: Vec<(String, String)> = (0..N)
        .map(|i| (format!("burst-{i}"), format!("{{\"n\":{i}}}")))
        .collect();
    let began = Instant::now();
    cluster.start_many("burst", &workflows).await;
    let mut events = cluster.events();
    events
        .until(Duration::from_secs(120), |seen| ended(seen) >= N)
        .await;
    let took = began.elapsed();
    events.drain(Duration::from_secs(1)).await;
    assert_each_completed_once(&events, N);
    let log = worker.log();
    eprintln!(
        "{N} one-step workflows through a worker with 4 permits in {took:?} ({:.0}/s; paused {} times)",
        N as f64 / took.as_secs_f64(),
        count(&log, "partitions paused"),
    );
    // Here: about 5 s and no pause; with a pause and resume per permit taken and freed, about 750 pauses and
    // 30 s (100 tasks/s). A pause is for handlers that keep every permit busy for a while, not for a burst.
    let paused = count(&log, "partitions paused");
    assert!(
        paused <= 10,
        "the worker paused {paused} times for {N} echo tasks: its flow control costs a fetch per task"
    );
    assert!(
        took < Duration::from_secs(20),
        "{N} echo tasks took {took:?}"
    );
}
