//! Large payloads by reference, end to end on a local blob store: a 5 MB input (started through the CLI from a
//! file), a 5 MB task output and a 2 MB signal payload (through the API) each travel as a reference, every record
//! stays small, the workers' handlers see the whole values, a reference copied into another workflow reads
//! nothing, and purging the workflow deletes its blobs.

mod common;

use std::time::{Duration, Instant};

use common::{http_client, wait_ready, Cluster};
use edow_testkit::free_port;
use rdkafka::{Message, Offset};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

const BIG: usize = 5_000_000;
const NOTES: usize = 2_000_000;

const DOCS: &str = r#"
name: big-docs
steps:
  - name: make
    task: doc.make
    input: "{text: input.text}"
  - name: measure
    task: doc.count
    input: "{document: steps.make.document}"
  - name: review
    wait: { signal: review, timeout: 1h }
  - name: recount
    task: doc.count
    input: "{notes: steps.review.notes}"
output: "{made_from: steps.make.input_a, measured: steps.measure, recounted: steps.recount}"
"#;

/// Counts the a, b and r characters of its input: what the handler saw, not what the record carried.
const COUNT: &str = r#"input=$(cat)
a=$(printf %s "$input" | tr -cd a | wc -c)
b=$(printf %s "$input" | tr -cd b | wc -c)
r=$(printf %s "$input" | tr -cd r | wc -c)
printf '{"a":%d,"b":%d,"r":%d}' "$a" "$b" "$r"
"#;

/// Answers a task whose input holds 5 MB of `a` with 5 MB of `b`.
const MAKE: &str = r#"a=$(tr -cd a | wc -c)
printf '{"input_a":%d,"document":"' "$a"
head -c 5000000 /dev/zero | tr '\0' b
printf '"}'
"#;

async fn get(url: &str) -> Value {
    let response = http_client()
        .get(url)
        .send()
        .await
        .expect("the API answers");
    let text = response.text().await.unwrap();
    serde_json::from_str(&text)
        .unwrap_or_else(|_| panic!("not JSON: {}", &text[..text.len().min(500)]))
}

/// GETs `url` until `done` holds; panics with the last answer after 90 s.
async fn until(url: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let body = get(url).await;
        if done(&body) {
            return body;
        }
        assert!(Instant::now() < deadline, "{url}: {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn owner_dir(blobs: &std::path::Path, workflow_id: &str) -> std::path::PathBuf {
    let hash: String = Sha256::digest(workflow_id.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    blobs.join(hash)
}

fn is_reference(value: &Value) -> bool {
    value.get("$edow_blob").is_some_and(Value::is_string)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_megabytes_travel_by_reference_and_are_purged_with_their_workflow() {
    let cluster = Cluster::start();
    let dir = tempfile::tempdir().unwrap();
    let blobs = dir.path().join("blobs");
    let store = blobs.to_str().unwrap().to_string();
    std::fs::write(dir.path().join("make.sh"), MAKE).unwrap();
    std::fs::write(dir.path().join("count.sh"), COUNT).unwrap();

    let http = format!("127.0.0.1:{}", free_port());
    let orchestrator = cluster.orchestrator_with(&[
        "--http-addr",
        &http,
        "--blob-store",
        &store,
        "--ended-retention",
        "8s",
    ]);
    cluster.wait_for_topics();
    let make = format!("doc.make=exec:sh {}", dir.path().join("make.sh").display());
    let count = format!(
        "doc.count=exec:sh {}",
        dir.path().join("count.sh").display()
    );
    let worker = cluster.worker_with("docs", &[&make, &count], 4, &["--blob-store", &store]);
    wait_ready(&http).await;
    cluster.deploy(DOCS);

    // A 5 MB input, from a file: far over the payload limit, so only a reference can carry it.
    let input = dir.path().join("input.json");
    std::fs::write(&input, json!({"text": "a".repeat(BIG)}).to_string()).unwrap();
    let input_arg = format!("@{}", input.display());
    let (ok, out, err) = cluster.cli(&[
        "--blob-store",
        &store,
        "start",
        "big-docs",
        "--id",
        "doc-1",
        "--input",
        &input_arg,
    ]);
    assert!(ok, "start: {out}{err}");
    let url = format!("http://{http}/v1/workflows/doc-1");
    let waiting = until(&url, |b| {
        b["running_steps"][0]["step"] == "review" || b["status"] == "Failed"
    })
    .await;
    assert!(is_reference(&waiting["input"]["text"]), "{waiting}");

    // A reference copied into another workflow's input reads nothing: the step fails, naming why.
    let stolen = json!({"text": waiting["input"]["text"]});
    let started = http_client()
        .post(format!("http://{http}/v1/workflows"))
        .json(&json!({"name": "big-docs", "id": "doc-thief", "input": stolen}))
        .send()
        .await
        .unwrap();
    assert_eq!(started.status(), 202);

    // A 2 MB signal payload through the API.
    let sent = http_client()
        .post(format!("{url}/signals/review"))
        .json(&json!({"notes": "r".repeat(NOTES)}))
        .send()
        .await
        .unwrap();
    assert_eq!(sent.status(), 202, "{}", sent.text().await.unwrap());
    let done = until(&url, |b| {
        b["status"] == "Completed" || b["status"] == "Failed"
    })
    .await;
    assert_eq!(done["status"], "Completed", "{done}");
    // What the handlers saw were the whole values.
    assert_eq!(done["output"]["made_from"], BIG, "{done}");
    assert_eq!(done["output"]["measured"]["b"], BIG, "{done}");
    assert_eq!(done["output"]["recounted"]["r"], NOTES, "{done}");
    // (Looked at before its retention of 8 s is over.)
    let stored = std::fs::read_dir(owner_dir(&blobs, "doc-1"))
        .unwrap()
        .count();
    assert!(
        stored >= 3,
        "input, output and signal payload are stored: {stored}"
    );

    let thief = until(&format!("http://{http}/v1/workflows/doc-thief"), |b| {
        b["status"] == "Failed" || b["status"] == "Completed"
    })
    .await;
    assert_eq!(thief["status"], "Failed", "{thief}");
    assert!(
        thief.to_string().contains("another workflow"),
        "the failure names the foreign reference: {thief}"
    );

    // Every record stayed small: the values travelled in the blob store.
    let kafka = cluster.kafka.clone();
    let largest = tokio::task::spawn_blocking(move || {
        let mut largest = (0, String::new());
        for topic in kafka.topic_names().unwrap() {
            for partition in 0..kafka.partition_count(&topic).unwrap() as i32 {
                for record in kafka
                    .read_to_end(&topic, partition, Offset::Beginning)
                    .unwrap()
                {
                    let size = record.payload().map_or(0, <[u8]>::len);
                    if size > largest.0 {
                        largest = (size, topic.clone());
                    }
                }
            }
        }
        largest
    })
    .await
    .unwrap();
    assert!(largest.0 < 100 * 1024, "a record of {largest:?} bytes");

    // Purged after its retention, the workflow's blobs go too.
    let deadline = Instant::now() + Duration::from_secs(60);
    while owner_dir(&blobs, "doc-1").exists() {
        assert!(
            Instant::now() < deadline,
            "doc-1's blobs are still there after its purge:\n{}",
            orchestrator.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for log in [orchestrator.log(), worker.log()] {
        assert!(!log.contains(&"a".repeat(1000)), "a log holds the value");
    }
}
