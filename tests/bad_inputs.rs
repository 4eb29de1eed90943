//! The bad-input suite: while 100 good workflows run, every class of hostile or careless input is sent. The good
//! workflows all complete, the orchestrator and the worker keep running (same pids), and every bad input ends
//! visibly: a dead letter with its reason, a failed workflow with its reason, or a refused deploy.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::{ended, Cluster};
use edow_kafka::{now_millis, produce_all, Outgoing};
use edow_schemas::contracts::{
    DeadLetter, LifecycleKind, SignalKind, TaskResult, TaskStatus, WorkflowSignal, WorkflowState,
    WorkflowTrigger,
};
use edow_schemas::Topics;
use rdkafka::Message;

const GOOD: usize = 100;

fn trigger(id: &str, name: &str, input: String) -> WorkflowTrigger {
    WorkflowTrigger {
        workflow_id: id.into(),
        workflow_name: name.into(),
        workflow_version: None,
        input,
        idempotency_key: None,
        correlation_id: None,
        priority: 0,
        requested_at: now_millis(),
        attributes: Default::default(),
    }
}

fn record(topic: &str, key: &str, payload: Vec<u8>) -> Outgoing {
    Outgoing {
        topic: topic.to_string(),
        partition: None,
        key: key.as_bytes().to_vec(),
        payload: Some(payload),
        headers: Vec::new(),
    }
}

/// The trigger record of `id`, a `name` workflow with `input`, keyed by its id.
async fn trigger_record(
    codec: &edow_schemas::Codec,
    topic: &str,
    id: &str,
    name: &str,
    input: String,
) -> Outgoing {
    let payload = codec
        .encode(topic, &trigger(id, name, input))
        .await
        .unwrap();
    record(topic, id, payload)
}

/// Dead letters of `topic` by record key, waiting until `keys` are all there.
async fn dead_letters(
    cluster: &Cluster,
    topic: &str,
    keys: &[&str],
) -> HashMap<String, DeadLetter> {
    let dlq = Topics::dead_letters(topic);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut letters = HashMap::new();
        // The dead-letter topic may not exist yet.
        for r in common::read_topic(cluster, &dlq).await.unwrap_or_default() {
            let letter: DeadLetter = cluster.codec.decode(r.payload()).await.unwrap();
            let key =
                String::from_utf8_lossy(letter.key.as_deref().unwrap_or_default()).into_owned();
            letters.insert(key, letter);
        }
        if keys.iter().all(|k| letters.contains_key(*k)) {
            return letters;
        }
        assert!(
            Instant::now() < deadline,
            "dead letters of {topic}: expected {keys:?}, got {:?}",
            letters.keys().collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Waits until the changelog holds a record under each of `keys`.
async fn wait_for_changelog_keys(cluster: &Cluster, keys: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut found = Vec::new();
        let state = cluster.topics.state();
        for r in common::read_topic(cluster, &state)
            .await
            .unwrap_or_default()
        {
            let key = String::from_utf8_lossy(r.key().unwrap_or_default()).into_owned();
            if keys.contains(&key.as_str()) && r.payload().is_some() {
                let _: WorkflowState = cluster.codec.decode(r.payload()).await.unwrap();
                found.push(key);
            }
        }
        if keys.iter().all(|k| found.iter().any(|f| f == k)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the changelog has no record of {keys:?}; found {found:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_class_of_bad_input_ends_visibly_while_good_workflows_complete() {
    let cluster = Cluster::start();
    let mut orchestrator = cluster.orchestrator();
    cluster.wait_for_topics();
    let mut worker = cluster.worker(
        "w1",
        &[
            "fine.a=echo",
            "fine.b=echo",
            "fine.c=echo",
            "hoard.echo=echo",
            // A task whose handler answers with 2 MB of JSON (a string of spaces).
            r#"big.out=exec:printf "%2000000s" x"#,
        ],
        16,
    );
    let pids = (orchestrator.process().pid(), worker.process().pid());

    cluster.deploy(
        "name: fine\nsteps:\n  - { name: a, task: fine.a }\n  - { name: b, task: fine.b }\n  - { name: c, task: fine.c }\n",
    );
    cluster.deploy(
        "name: bigmap\nsteps:\n  - name: all\n    map: { items: input.items, concurrency: 1000, steps: [{ name: one, task: fine.a }] }\n",
    );
    cluster.deploy("name: manual\nsteps:\n  - { name: op, task: manual.op }\n");
    cluster.deploy("name: waiter\nsteps:\n  - { name: w, wait: { signal: go } }\n");
    cluster.deploy("name: orphan\nsteps:\n  - { name: kid, workflow: { name: never-deployed } }\n");
    cluster.deploy("name: bigout\nsteps:\n  - { name: out, task: big.out }\n");
    cluster.deploy(
        "name: hoard\nsteps:\n  - { name: a, task: hoard.echo }\n  - { name: b, task: hoard.echo }\n  - { name: c, task: hoard.echo }\n  - { name: d, task: hoard.echo }\n",
    );

    // A map at concurrency 100,000 is refused at deploy, naming the field.
    let file = std::env::temp_dir().join(format!("greedy-{}.yaml", now_millis()));
    std::fs::write(
        &file,
        "name: greedy\nsteps:\n  - name: all\n    map: { items: input.items, concurrency: 100000, steps: [{ name: one, task: fine.a }] }\n",
    )
    .unwrap();
    let (ok, out, err) = cluster.cli(&["deploy", file.to_str().unwrap()]);
    let _ = std::fs::remove_file(&file);
    assert!(!ok, "a concurrency of 100000 must be refused: {out}");
    assert!(
        err.contains("steps[0].map.concurrency") && err.contains("max_map_concurrency"),
        "{err}"
    );

    // Two racing deploys of one name both land, on distinct versions.
    let race: Vec<_> = (0..2)
        .map(|i| {
            let file = std::env::temp_dir().join(format!("race-{i}-{}.yaml", now_millis()));
            std::fs::write(
                &file,
                format!("name: race\nsteps:\n  - {{ name: op{i}, task: fine.a }}\n"),
            )
            .unwrap();
            let args = ["deploy".to_string(), file.to_str().unwrap().to_string()];
            let env: Vec<_> = [
                ("EDOW_BOOTSTRAP_SERVERS", cluster.broker.bootstrap_servers()),
                ("EDOW_SCHEMA_REGISTRY_URL", cluster.registry.url()),
                ("EDOW_PARTITIONS", common::PARTITIONS.to_string()),
            ]
            .into();
            std::process::Command::new(env!("CARGO_BIN_EXE_edow"))
                .args(args)
                .envs(env)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut versions = Vec::new();
    for child in race {
        let output = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let version = stdout
            .split("version ")
            .nth(1)
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<i32>().ok())
            .unwrap_or_else(|| panic!("no version in {stdout}"));
        versions.push(version);
    }
    versions.sort();
    assert_eq!(versions, [1, 2], "racing deploys take distinct versions");

    // Signals that arrive before their workflow's trigger are kept for it: a named one, and a cancel.
    let signals = cluster.topics.signals();
    let early = |id: &str, kind, name: Option<&str>, payload: &str| WorkflowSignal {
        signal_id: format!("{id}-early"),
        workflow_id: id.into(),
        kind,
        name: name.map(str::to_string),
        payload: payload.into(),
        correlation_id: None,
        sent_at: now_millis(),
    };
    let early_signals = [
        early(
            "early-1",
            SignalKind::Signal,
            Some("go"),
            r#"{"by":"early"}"#,
        ),
        early("early-2", SignalKind::Cancel, None, r#""changed my mind""#),
    ];
    let mut records = Vec::new();
    for signal in &early_signals {
        let payload = cluster.codec.encode(&signals, signal).await.unwrap();
        records.push(record(&signals, &signal.workflow_id, payload));
    }
    produce_all(&cluster.kafka.producer().unwrap(), &records)
        .await
        .unwrap();
    wait_for_changelog_keys(&cluster, &["early-1", "early-2"]).await;
    let early_triggers = [("early-1", "waiter"), ("early-2", "fine")];
    let mut records = Vec::new();
    for (id, name) in early_triggers {
        let triggers = cluster.topics.triggers();
        records.push(trigger_record(&cluster.codec, &triggers, id, name, "{}".into()).await);
    }
    produce_all(&cluster.kafka.producer().unwrap(), &records)
        .await
        .unwrap();

    // The good workflows.
    let good: Vec<(String, String)> = (0..GOOD)
        .map(|i| (format!("good-{i}"), format!(r#"{{"n":{i}}}"#)))
        .collect();
    cluster.start_many("fine", &good).await;

    // Bad triggers.
    let triggers = cluster.topics.triggers();
    let codec = &cluster.codec;
    let big = format!(r#"{{"blob":"{}"}}"#, "x".repeat(400 * 1024));
    let deep = format!("{}1{}", "[".repeat(120), "]".repeat(120));
    let items: Vec<usize> = (0..20_000).collect();
    let map_input = serde_json::json!({ "items": items }).to_string();
    let hoard_input = format!(r#"{{"blob":"{}"}}"#, "h".repeat(200 * 1024));
    let bad_triggers = vec![
        trigger_record(codec, &triggers, "big-input", "fine", big).await,
        trigger_record(codec, &triggers, "deep-input", "fine", deep).await,
        record(
            &triggers,
            "garbage-trigger",
            b"\x00\xff\xfe garbage".to_vec(),
        ),
        trigger_record(codec, &triggers, "unknown-wf", "nope", "{}".into()).await,
        trigger_record(codec, &triggers, "__edow.forged", "fine", "{}".into()).await,
        trigger_record(codec, &triggers, "map-20k", "bigmap", map_input).await,
        trigger_record(codec, &triggers, "manual-1", "manual", "{}".into()).await,
        trigger_record(codec, &triggers, "hoard-1", "hoard", hoard_input).await,
        trigger_record(codec, &triggers, "bigout-1", "bigout", "{}".into()).await,
        trigger_record(codec, &triggers, "orphan-1", "orphan", "{}".into()).await,
        {
            // Claims to be a child of a good workflow, to report into it when it ends.
            let mut forged = trigger("forged-child", "fine", "{}".into());
            forged
                .attributes
                .insert("edow.parent".into(), "good-3".into());
            record(
                &triggers,
                "forged-child",
                codec.encode(&triggers, &forged).await.unwrap(),
            )
        },
        // Nearly a broker message: its dead letter cannot hold it whole.
        record(&triggers, "huge-garbage", vec![b'g'; 950 * 1024]),
    ];
    let producer = cluster.kafka.producer().unwrap();
    produce_all(&producer, &bad_triggers).await.unwrap();

    // Garbage on results and signals, and an oversized signal payload.
    let results = cluster.topics.results();
    let huge_signal = WorkflowSignal {
        signal_id: "huge-signal".into(),
        workflow_id: "good-1".into(),
        kind: edow_schemas::contracts::SignalKind::Signal,
        name: Some("go".into()),
        payload: format!("\"{}\"", "s".repeat(300 * 1024)),
        correlation_id: None,
        sent_at: now_millis(),
    };
    produce_all(
        &producer,
        &[
            record(&results, "garbage-result", vec![0, 0, 0, 0]),
            record(&signals, "garbage-signal", b"not avro at all".to_vec()),
            record(
                &signals,
                "good-1",
                codec.encode(&signals, &huge_signal).await.unwrap(),
            ),
        ],
    )
    .await
    .unwrap();

    // A task output over the payload limit fails its step, not the loop.
    let mut events = cluster.events();
    events
        .until(Duration::from_secs(60), |seen| {
            seen.iter()
                .any(|e| e.workflow_id == "manual-1" && e.kind == LifecycleKind::StepStarted)
        })
        .await;
    let oversized = TaskResult {
        task_id: "manual-1/op/1".into(),
        workflow_id: "manual-1".into(),
        step: "op".into(),
        attempt: 1,
        status: TaskStatus::Completed,
        output: Some(format!("\"{}\"", "o".repeat(300 * 1024))),
        error: None,
        worker_id: "hostile".into(),
        started_at: now_millis(),
        finished_at: now_millis(),
    };
    produce_all(
        &producer,
        &[record(
            &results,
            "manual-1",
            codec.encode(&results, &oversized).await.unwrap(),
        )],
    )
    .await
    .unwrap();

    // Everything ends: the 100 good ones, the five bad ones that started (map, manual, hoard, orphan, bigout),
    // the early two.
    events
        .until(Duration::from_secs(120), |seen| ended(seen) >= GOOD + 7)
        .await;
    let of = |id: &str| -> Vec<LifecycleKind> {
        events
            .seen
            .iter()
            .filter(|e| e.workflow_id == id)
            .map(|e| e.kind)
            .collect()
    };
    assert_eq!(
        of("early-1"),
        [
            LifecycleKind::WorkflowStarted,
            LifecycleKind::StepStarted,
            LifecycleKind::StepCompleted,
            LifecycleKind::WorkflowCompleted
        ]
    );
    let early_output = events.per_workflow(LifecycleKind::WorkflowCompleted)["early-1"][0]
        .detail
        .clone();
    assert_eq!(early_output.as_deref(), Some(r#"{"by":"early"}"#));
    assert_eq!(
        of("early-2"),
        [
            LifecycleKind::WorkflowStarted,
            LifecycleKind::WorkflowCancelled
        ],
        "cancelled before anything ran"
    );
    let completed = events.per_workflow(LifecycleKind::WorkflowCompleted);
    for (id, _) in &good {
        assert_eq!(
            completed.get(id).map(Vec::len),
            Some(1),
            "{id} completes once"
        );
    }
    let failed = events.per_workflow(LifecycleKind::WorkflowFailed);
    let failure = |id: &str| -> String {
        let events = failed
            .get(id)
            .unwrap_or_else(|| panic!("{id} did not fail: {:?}", events.count_by_kind()));
        assert_eq!(events.len(), 1);
        events[0].detail.clone().unwrap_or_default()
    };
    let map = failure("map-20k");
    assert!(
        map.contains("20000 elements") && map.contains("max_map_items"),
        "{map}"
    );
    let manual = failure("manual-1");
    assert!(
        manual.contains("output_too_large") && manual.contains("max_payload_bytes"),
        "{manual}"
    );
    let bigout = failure("bigout-1");
    assert!(bigout.contains("output_too_large"), "{bigout}");
    let attempts = events
        .seen
        .iter()
        .filter(|e| e.workflow_id == "bigout-1" && e.kind == LifecycleKind::StepStarted)
        .count();
    assert_eq!(attempts, 1, "an output over the limit is not retried");
    let orphan = failure("orphan-1");
    assert!(
        orphan.contains("could not start") && orphan.contains("never-deployed"),
        "{orphan}"
    );
    let hoard = failure("hoard-1");
    assert!(
        hoard.contains("state_too_large") && hoard.contains("max_record_bytes"),
        "{hoard}"
    );
    assert!(
        !events.seen.iter().any(|e| e.workflow_id == "map-20k"
            && e.kind == LifecycleKind::StepStarted
            && e.step.as_deref() != Some("all")),
        "no map iteration was dispatched"
    );

    // Every bad record is a dead letter with its reason.
    let letters = dead_letters(
        &cluster,
        &triggers,
        &[
            "big-input",
            "deep-input",
            "garbage-trigger",
            "unknown-wf",
            "__edow.forged",
            "orphan-1/kid",
            "forged-child",
            "huge-garbage",
        ],
    )
    .await;
    let reason = |key: &str| (letters[key].error_kind.clone(), letters[key].error.clone());
    let (kind, error) = reason("big-input");
    assert_eq!(kind, "too_large");
    assert!(error.contains("max_payload_bytes"), "{error}");
    let (kind, error) = reason("deep-input");
    assert_eq!(kind, "too_deep");
    assert!(error.contains("120 deep"), "{error}");
    assert_eq!(reason("garbage-trigger").0, "unknown_schema");
    assert_eq!(reason("unknown-wf").0, "unknown_workflow");
    assert_eq!(reason("__edow.forged").0, "invalid");
    assert_eq!(reason("orphan-1/kid").0, "unknown_workflow");
    let (kind, error) = reason("forged-child");
    assert_eq!(kind, "invalid");
    assert!(
        error.contains("good-3") && error.contains("edow.parent"),
        "{error}"
    );
    let (kind, error) = reason("huge-garbage");
    assert_eq!(kind, "not_framed");
    assert!(error.contains("too large to keep here"), "{error}");
    assert!(letters["huge-garbage"].value.is_none());
    let letters = dead_letters(&cluster, &results, &["garbage-result"]).await;
    assert_eq!(letters["garbage-result"].error_kind, "not_framed");
    let letters = dead_letters(&cluster, &signals, &["garbage-signal", "good-1"]).await;
    assert_eq!(letters["garbage-signal"].error_kind, "not_framed");
    assert_eq!(letters["good-1"].error_kind, "too_large");

    // Nothing died, nothing restarted.
    assert!(
        orchestrator.process().is_running(),
        "{}",
        orchestrator.log()
    );
    assert!(worker.process().is_running(), "{}", worker.log());
    assert_eq!((orchestrator.process().pid(), worker.process().pid()), pids);
    assert!(
        !orchestrator.log().contains("panicked"),
        "{}",
        orchestrator.log()
    );
}
