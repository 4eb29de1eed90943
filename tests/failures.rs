//! Failures: retries with backoff on the retry topic, exhausted attempts failing the workflow with its error
//! visible in `edow status`, and bad inputs going to the dead-letter topic while good ones keep flowing.

mod common;

use std::time::Duration;

use common::{ended, Cluster};
use edow_kafka::{produce_all, Outgoing};
use edow_schemas::contracts::{DeadLetter, LifecycleKind, WorkflowTrigger};
use edow_schemas::Topics;
use rdkafka::message::Headers;
use rdkafka::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_back_off_then_succeed_and_exhausted_attempts_fail_the_workflow() {
    let cluster = Cluster::start();
    let _orchestrator = cluster.orchestrator();
    cluster.wait_for_topics();
    let _worker = cluster.worker("w1", &["flaky.op=fail:2", "broken.op=fail:always"], 8);
    cluster.deploy(
        "name: flaky\nretry: { max_attempts: 3, initial_backoff: 300ms, max_backoff: 2s }\nsteps:\n  - { name: op, task: flaky.op }\n",
    );
    cluster.deploy(
        "name: broken\nsteps:\n  - { name: op, task: broken.op, retry: { max_attempts: 3, initial_backoff: 100ms } }\n",
    );
    let (ok, out, err) =
        cluster.cli(&["start", "flaky", "--id", "flaky-1", "--input", r#"{"x":1}"#]);
    assert!(ok && out.trim() == "flaky-1", "{out}{err}");
    let (ok, _, err) = cluster.cli(&["start", "broken", "--id", "broken-1"]);
    assert!(ok, "{err}");

    let mut events = cluster.events();
    events
        .until(Duration::from_secs(60), |seen| ended(seen) >= 2)
        .await;

    let flaky: Vec<_> = events
        .seen
        .iter()
        .filter(|e| e.workflow_id == "flaky-1")
        .collect();
    let retried: Vec<_> = flaky
        .iter()
        .filter(|e| e.kind == LifecycleKind::StepRetried)
        .collect();
    assert_eq!(retried.len(), 2, "two backoffs: {flaky:?}");
    for retry in &retried {
        let detail: serde_json::Value =
            serde_json::from_str(retry.detail.as_deref().unwrap()).unwrap();
        let backoff = detail["backoff_ms"].as_i64().unwrap();
        assert!(
            (0..=600).contains(&backoff),
            "full jitter under the cap: {backoff}"
        );
    }
    let done = flaky
        .iter()
        .find(|e| e.kind == LifecycleKind::WorkflowCompleted)
        .expect("flaky completed");
    assert_eq!(done.detail.as_deref(), Some(r#"{"x":1}"#));
    let starts: Vec<i32> = flaky
        .iter()
        .filter(|e| e.kind == LifecycleKind::StepStarted)
        .map(|e| e.attempt.unwrap())
        .collect();
    assert_eq!(starts, [1, 2, 3]);

    // Retries went to the retry topic.
    let retry_topic = cluster.topics.task_retries("flaky.op");
    let on_retry_topic = common::read_topic(&cluster, &retry_topic).await.unwrap();
    assert_eq!(on_retry_topic.len(), 2);

    assert!(events
        .seen
        .iter()
        .any(|e| e.workflow_id == "broken-1" && e.kind == LifecycleKind::WorkflowFailed));
    let (ok, status, err) = cluster.cli(&["status", "broken-1"]);
    assert!(ok, "{err}");
    assert!(status.contains("Failed"), "{status}");
    assert!(
        status.contains("failed after 3 attempts") && status.contains("injected_failure"),
        "{status}"
    );
    let (ok, _, err) = cluster.cli(&["status", "never-started"]);
    assert!(!ok && err.contains("no workflow never-started"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_are_dead_lettered_with_their_reason_and_good_ones_keep_flowing() {
    let cluster = Cluster::start();
    let _orchestrator = cluster.orchestrator();
    cluster.wait_for_topics();
    let _worker = cluster.worker("w1", &["ok.op=echo"], 8);
    cluster.deploy("name: fine\nsteps:\n  - { name: op, task: ok.op }\n");

    let topic = cluster.topics.triggers();
    let trigger = |id: &str, name: &str, input: &str| WorkflowTrigger {
        workflow_id: id.into(),
        workflow_name: name.into(),
        workflow_version: None,
        input: input.into(),
        idempotency_key: None,
        correlation_id: None,
        priority: 0,
        requested_at: 0,
        attributes: Default::default(),
    };
    let encode = |t: WorkflowTrigger| {
        let topic = topic.clone();
        let codec = &cluster.codec;
        async move { codec.encode(&topic, &t).await.unwrap() }
    };
    let record = |key: &str, payload: Vec<u8>| Outgoing {
        topic: topic.clone(),
        partition: None,
        key: key.as_bytes().to_vec(),
        payload: Some(payload),
        headers: vec![("traceparent", b"00-abc-def-01".to_vec())],
    };
    let bad = vec![
        record(
            "bad-unknown",
            encode(trigger("bad-unknown", "nope", "{}")).await,
        ),
        record("bad-json", br#"{"workflow_id":"bad-json"}"#.to_vec()),
        record("bad-schema", vec![0, 0, 0, 0x7f, 0x01, 2, 3]),
        record(
            "bad-input",
            encode(trigger("bad-input", "fine", "{not json")).await,
        ),
        record(
            "good-1",
            encode(trigger("good-1", "fine", r#"{"ok":true}"#)).await,
        ),
    ];
    produce_all(&cluster.kafka.producer().unwrap(), &bad)
        .await
        .unwrap();

    let mut events = cluster.events();
    events
        .until(Duration::from_secs(60), |seen| ended(seen) >= 1)
        .await;
    assert!(events
        .seen
        .iter()
        .any(|e| e.workflow_id == "good-1" && e.kind == LifecycleKind::WorkflowCompleted));

    let dlq = Topics::dead_letters(&topic);
    let mut letters = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while letters.len() < 4 {
        assert!(
            std::time::Instant::now() < deadline,
            "only {} dead letters",
            letters.len()
        );
        letters.clear();
        for r in common::read_topic(&cluster, &dlq).await.unwrap() {
            let header = |name: &str| {
                r.headers()
                    .and_then(|h| h.iter().find(|x| x.key == name).and_then(|x| x.value))
                    .map(|v| String::from_utf8_lossy(v).into_owned())
            };
            assert_eq!(
                header("edow.dlq.origin-topic").as_deref(),
                Some(topic.as_str())
            );
            assert!(header("edow.dlq.error").is_some() && header("edow.dlq.failed-at").is_some());
            let letter: DeadLetter = cluster.codec.decode(r.payload()).await.unwrap();
            letters.push(letter);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let kind_of = |key: &str| {
        let letter = letters
            .iter()
            .find(|l| l.key.as_deref() == Some(key.as_bytes()))
            .unwrap_or_else(|| panic!("no dead letter for {key}: {letters:?}"));
        assert_eq!(letter.origin_topic, topic);
        assert_eq!(letter.service, "orchestrator");
        assert_eq!(
            letter.headers.get("traceparent").map(|b| b.0.as_slice()),
            Some(&b"00-abc-def-01"[..]),
            "original headers are kept"
        );
        (
            letter.error_kind.clone(),
            letter.error.clone(),
            letter.value.clone(),
        )
    };
    let (kind, error, _) = kind_of("bad-unknown");
    assert_eq!(kind, "unknown_workflow");
    assert!(
        error.contains("'nope'") && error.contains("edow deploy"),
        "{error}"
    );
    let (kind, error, value) = kind_of("bad-json");
    assert_eq!(kind, "not_framed");
    assert!(error.contains("Confluent wire format"), "{error}");
    assert_eq!(
        value.as_deref(),
        Some(&br#"{"workflow_id":"bad-json"}"#[..]),
        "kept byte for byte"
    );
    let (kind, error, _) = kind_of("bad-schema");
    assert_eq!(kind, "unknown_schema");
    assert!(error.contains("32513"), "{error}");
    let (kind, error, _) = kind_of("bad-input");
    assert_eq!(kind, "invalid");
    assert!(error.contains("not a JSON document"), "{error}");
    assert_eq!(letters.len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_task_is_answered_from_memory_not_run_twice() {
    use edow_schemas::contracts::TaskRequested;

    let cluster = Cluster::start();
    let _worker = cluster.worker("w1", &["once.op=sleep:200ms"], 4);
    let topic = cluster.topics.tasks("once.op");
    let task = TaskRequested {
        task_id: "dup-1/op/1".into(),
        workflow_id: "dup-1".into(),
        workflow_name: "none".into(),
        workflow_version: 1,
        step: "op".into(),
        task_type: "once.op".into(),
        attempt: 1,
        input: r#"{"v":1}"#.into(),
        deadline_at: None,
        priority: 0,
        correlation_id: None,
        requested_at: 0,
    };
    // Wait for the worker to create its topics, then deliver the same task twice, some time apart.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while cluster.kafka.partition_count(&topic).unwrap_or(0) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the worker did not create {topic}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let record = Outgoing {
        topic: topic.clone(),
        partition: None,
        key: b"dup-1".to_vec(),
        payload: Some(cluster.codec.encode(&topic, &task).await.unwrap()),
        headers: Vec::new(),
    };
    let producer = cluster.kafka.producer().unwrap();
    produce_all(&producer, std::slice::from_ref(&record))
        .await
        .unwrap();
    // The second delivery comes after the first was answered.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while common::results(&cluster).await.is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the first delivery was not answered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    produce_all(&producer, &[record]).await.unwrap();

    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let results = loop {
        let results = common::results(&cluster).await;
        if results.len() >= 2 || std::time::Instant::now() > deadline {
            break results;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        results.len(),
        2,
        "both deliveries are answered: {results:?}"
    );
    assert_eq!(
        results[0], results[1],
        "the second answer is the first, not a second run"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_count_that_differs_from_the_existing_topics_is_a_clear_startup_error() {
    let cluster = Cluster::start();
    let _first = cluster.orchestrator();
    cluster.wait_for_topics();
    let output = std::process::Command::new(edow_testkit::workspace_binary(
        "edow-orchestrator",
        "orchestrator",
    ))
    .args(["--partitions", "7"])
    .env("EDOW_BOOTSTRAP_SERVERS", cluster.broker.bootstrap_servers())
    .env("EDOW_SCHEMA_REGISTRY_URL", cluster.registry.url())
    .output()
    .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("has 4 partitions but 7 are configured"),
        "{stderr}"
    );
}
