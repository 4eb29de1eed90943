//! Several registry instances racing to register schemas against one real broker (issue 7): every client must
//! be answered with an id whose schema is the one it sent, on every instance, and still after deletions,
//! restarts and the broker's compaction of the schemas topic.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use edow_testkit::{broker_binary, free_port, workspace_binary, Broker, Process};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use reqwest::Method;
use serde_json::{json, Value};

const TOPIC: &str = "_schemas";

/// A directory removed when dropped.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new(what: &str) -> ScratchDir {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!(
            "edow-registry-race-{what}-{}-{n}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        ScratchDir(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A broker with sqlite storage, so that the schemas topic survives a restart and is really compacted.
/// Started here rather than in edow-testkit, whose brokers keep their data in memory.
struct DurableBroker {
    process: Option<Process>,
    port: u16,
    dir: ScratchDir,
}

impl DurableBroker {
    fn start() -> DurableBroker {
        let mut broker = DurableBroker {
            process: None,
            port: free_port(),
            dir: ScratchDir::new("broker"),
        };
        broker.run();
        broker
    }

    fn run(&mut self) {
        let binary = broker_binary();
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let mut args = vec![
            "broker".to_string(),
            "--listener-url".into(),
            url.clone(),
            "--advertised-listener-url".into(),
            url,
            // The sqlite path is taken relative to the working directory, the scratch dir.
            "--storage-engine".into(),
            "sqlite://broker.db?maintenance_interval=1s".into(),
        ];
        if binary.to_string_lossy().contains("nisshi-0.8") {
            args.extend(["--group-initial-rebalance-delay".into(), "100ms".into()]);
        }
        let log = self.dir.path().join("broker.log");
        let mut process = Process::spawn("nisshi broker", &binary, &args, self.dir.path(), log);
        process.wait_for_port(
            SocketAddr::from(([127, 0, 0, 1], self.port)),
            Duration::from_secs(30),
        );
        self.process = Some(process);
    }

    fn restart(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.terminate(Duration::from_secs(10));
        }
        self.run();
    }

    fn bootstrap_servers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

/// An `edow-registry` process against any bootstrap address.
struct Instance {
    /// Owned so that dropping the instance stops the process.
    _process: Process,
    port: u16,
    _dir: ScratchDir,
}

impl Instance {
    fn start(bootstrap: &str) -> Instance {
        let binary = workspace_binary("edow-registry", "edow-registry");
        let dir = ScratchDir::new("registry");
        let port = free_port();
        let args = vec![
            "--listen".to_string(),
            format!("127.0.0.1:{port}"),
            "--bootstrap-servers".into(),
            bootstrap.to_string(),
            "--topic".into(),
            TOPIC.into(),
        ];
        let log = dir.path().join("registry.log");
        let mut process = Process::spawn("edow-registry", &binary, &args, dir.path(), log);
        process.wait_for_port(
            SocketAddr::from(([127, 0, 0, 1], port)),
            Duration::from_secs(60),
        );
        Instance {
            _process: process,
            port,
            _dir: dir,
        }
    }

    fn api(&self) -> Api {
        Api {
            client: reqwest::Client::builder().no_proxy().build().unwrap(),
            base: format!("http://127.0.0.1:{}", self.port),
        }
    }
}

fn start_instances(bootstrap: &str, n: usize) -> Vec<Instance> {
    (0..n).map(|_| Instance::start(bootstrap)).collect()
}

#[derive(Clone)]
struct Api {
    client: reqwest::Client,
    base: String,
}

impl Api {
    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut request = self
            .client
            .request(method, format!("{}{path}", self.base))
            .header("content-type", "application/vnd.schemaregistry.v1+json");
        if let Some(body) = body {
            request = request.body(body.to_string());
        }
        let response = request.send().await.expect("registry answers");
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        let value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}: {text}"));
        (status, value)
    }
}

/// Schemas that differ from one another but are all mutually compatible, so that one subject takes any of
/// them in any order under the default BACKWARD level.
fn schema(i: usize) -> String {
    format!(
        r#"{{"type":"record","name":"Race","namespace":"t","fields":[{{"name":"f{i}","type":["null","int"],"default":null}}]}}"#
    )
}

/// Compatible with every [`schema`]; registered concurrently under several subjects.
const SHARED: &str = r#"{"type":"record","name":"Race","namespace":"t","fields":[]}"#;

fn same_schema(a: &str, b: &str) -> bool {
    serde_json::from_str::<Value>(a).unwrap() == serde_json::from_str::<Value>(b).unwrap()
}

/// One client's registration and the id it was answered with.
#[derive(Debug, Clone)]
struct Answer {
    subject: String,
    schema: String,
    id: u64,
}

/// Registers every (subject, schema) at once, request `i` going to instance `i % n`, and returns the answers.
async fn race(apis: &[Api], registrations: Vec<(String, String)>) -> Vec<Answer> {
    let tasks: Vec<_> = registrations
        .into_iter()
        .enumerate()
        .map(|(i, (subject, schema))| {
            let api = apis[i % apis.len()].clone();
            tokio::spawn(async move {
                let (status, body) = api
                    .call(
                        Method::POST,
                        &format!("/subjects/{subject}/versions"),
                        Some(json!({ "schema": schema })),
                    )
                    .await;
                assert_eq!(status, 200, "registering under {subject}: {body}");
                let id = body["id"].as_u64().unwrap_or_else(|| panic!("{body}"));
                Answer {
                    subject,
                    schema,
                    id,
                }
            })
        })
        .collect();
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await.unwrap());
    }
    answers
}

/// Every answered id resolves, on every instance, to the schema its client sent; the subject lists it under
/// that id; distinct schemas have distinct ids and one schema has one id.
async fn check_answers(apis: &[Api], answers: &[Answer]) {
    let mut ids_by_schema: HashMap<String, BTreeSet<u64>> = HashMap::new();
    let mut schemas_by_id: BTreeMap<u64, BTreeSet<String>> = BTreeMap::new();
    for a in answers {
        let canonical = serde_json::from_str::<Value>(&a.schema)
            .unwrap()
            .to_string();
        ids_by_schema
            .entry(canonical.clone())
            .or_default()
            .insert(a.id);
        schemas_by_id.entry(a.id).or_default().insert(canonical);
    }
    let shared_ids: Vec<_> = schemas_by_id.iter().filter(|(_, s)| s.len() > 1).collect();
    assert!(
        shared_ids.is_empty(),
        "ids answered for more than one schema: {shared_ids:?}"
    );
    let split: Vec<_> = ids_by_schema.iter().filter(|(_, i)| i.len() > 1).collect();
    assert!(
        split.is_empty(),
        "schemas answered with several ids: {split:?}"
    );

    let mut wrong = Vec::new();
    for (n, api) in apis.iter().enumerate() {
        for a in answers {
            let (status, body) = api
                .call(Method::GET, &format!("/schemas/ids/{}", a.id), None)
                .await;
            let stored = body["schema"].as_str().unwrap_or_default();
            if status != 200 || !same_schema(stored, &a.schema) {
                wrong.push(format!(
                    "instance {n}: id {} for {} resolves to {status} {body}",
                    a.id, a.subject
                ));
            }
            let (status, found) = api
                .call(
                    Method::POST,
                    &format!("/subjects/{}?deleted=true", a.subject),
                    Some(json!({ "schema": a.schema })),
                )
                .await;
            if status != 200 || found["id"].as_u64() != Some(a.id) {
                wrong.push(format!(
                    "instance {n}: {} looks the schema up as {status} {found}, answered id {}",
                    a.subject, a.id
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {} checks failed:\n{}",
        wrong.len(),
        answers.len() * apis.len() * 2,
        wrong.join("\n")
    );
}

/// The schemas topic as the broker holds it now: (key, value) per record, in order; and the offset after the
/// last record, which exceeds the number of records by what compaction removed.
fn read_topic(bootstrap: &str) -> (Vec<(Value, Option<Value>)>, i64) {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "registry-race-test")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let (_, high) = consumer
        .fetch_watermarks(TOPIC, 0, Duration::from_secs(10))
        .unwrap();
    let mut assignment = TopicPartitionList::new();
    assignment
        .add_partition_offset(TOPIC, 0, Offset::Beginning)
        .unwrap();
    consumer.assign(&assignment).unwrap();
    let mut records = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut next = 0;
    while next < high {
        assert!(Instant::now() < deadline, "reading {TOPIC} up to {high}");
        let Some(message) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let message = message.unwrap();
        next = message.offset() + 1;
        let key = serde_json::from_slice(message.key().unwrap_or_default()).unwrap();
        let value = message
            .payload()
            .map(|v| serde_json::from_slice(v).unwrap());
        records.push((key, value));
    }
    (records, high)
}

/// Claims in the log for a (subject, version) that some other claim also asked for: the races that happened.
fn contested_claims(records: &[(Value, Option<Value>)]) -> usize {
    let mut claims: HashMap<(String, u64), usize> = HashMap::new();
    for (key, _) in records {
        if key["keytype"] == "SCHEMA" {
            *claims
                .entry((
                    key["subject"].as_str().unwrap().to_string(),
                    key["version"].as_u64().unwrap(),
                ))
                .or_default() += 1;
        }
    }
    claims.values().filter(|&&n| n > 1).map(|n| n - 1).sum()
}

/// `instances` registries on a fresh in-memory broker race 100 distinct schemas spread over `subjects`
/// subjects, plus, when `shared`, one more schema registered twice under every subject; then every answer is
/// checked on every instance, and every subject lists one version per distinct schema.
async fn race_on_a_fresh_broker(instances: usize, subjects: usize, shared: bool) {
    let broker = Broker::start();
    let running = start_instances(&broker.bootstrap_servers(), instances);
    let apis: Vec<Api> = running.iter().map(Instance::api).collect();

    let subject = |i: usize| format!("race-{}-value", i % subjects);
    let mut registrations: Vec<(String, String)> =
        (0..100).map(|i| (subject(i), schema(i))).collect();
    if shared {
        // Interleaved with the others, so that they race too.
        for i in 0..2 * subjects {
            registrations.insert(i * 100 / (2 * subjects), (subject(i), SHARED.to_string()));
        }
    }
    let count = registrations.len();
    let started = Instant::now();
    let answers = race(&apis, registrations).await;
    let raced = started.elapsed();
    check_answers(&apis, &answers).await;
    let shared_ids: BTreeSet<u64> = answers
        .iter()
        .filter(|a| a.schema == SHARED)
        .map(|a| a.id)
        .collect();
    assert!(shared_ids.len() <= 1, "one schema, one id: {shared_ids:?}");

    let per_subject = 100 / subjects + usize::from(shared);
    for api in &apis {
        for s in 0..subjects {
            let (status, versions) = api
                .call(
                    Method::GET,
                    &format!("/subjects/{}/versions", subject(s)),
                    None,
                )
                .await;
            assert_eq!(
                (status, versions),
                (200, json!((1..=per_subject).collect::<Vec<_>>())),
                "{}",
                subject(s)
            );
        }
    }
    let contested = contested_claims(&read_topic(&broker.bootstrap_servers()).0);
    eprintln!(
        "{count} registrations on {instances} instances under {subjects} subject(s) in {raced:?}; \
         {contested} claims lost a race"
    );
    // Two instances spread over several subjects race only for ids, a few times a run; elsewhere dozens of
    // claims lose, and none losing would mean the test no longer exercises the race.
    if subjects == 1 || instances > 2 {
        assert!(contested > 0, "the instances never raced");
    }
}

#[tokio::test]
async fn two_instances_racing_under_one_subject_answer_each_client_with_its_own_schema() {
    race_on_a_fresh_broker(2, 1, false).await;
}

#[tokio::test]
async fn three_instances_racing_under_one_subject_answer_each_client_with_its_own_schema() {
    race_on_a_fresh_broker(3, 1, false).await;
}

#[tokio::test]
async fn two_instances_racing_over_several_subjects_answer_each_client_with_its_own_schema() {
    race_on_a_fresh_broker(2, 5, false).await;
}

#[tokio::test]
async fn three_instances_racing_over_several_subjects_and_one_shared_schema_agree_on_every_id() {
    race_on_a_fresh_broker(3, 5, true).await;
}

#[tokio::test]
async fn answers_survive_deletions_restarts_and_compaction() {
    let mut broker = DurableBroker::start();
    let bootstrap = broker.bootstrap_servers();
    let instances = start_instances(&bootstrap, 2);
    let apis: Vec<Api> = instances.iter().map(Instance::api).collect();

    let started = Instant::now();
    let answers = race(
        &apis,
        (0..100)
            .map(|i| (format!("durable-{}-value", i % 3), schema(i)))
            .collect(),
    )
    .await;
    eprintln!(
        "100 registrations on 2 instances, sqlite storage, in {:?}",
        started.elapsed()
    );
    check_answers(&apis, &answers).await;

    // Delete a subject permanently and soft-delete a version of another: no id may be freed or remapped.
    let (status, deleted) = apis[0]
        .call(Method::DELETE, "/subjects/durable-0-value", None)
        .await;
    assert_eq!(status, 200, "{deleted}");
    let (status, purged) = apis[1]
        .call(
            Method::DELETE,
            "/subjects/durable-0-value?permanent=true",
            None,
        )
        .await;
    assert_eq!((status, &purged), (200, &deleted));
    let (status, _) = apis[0]
        .call(Method::DELETE, "/subjects/durable-1-value/versions/1", None)
        .await;
    assert_eq!(status, 200);
    // Still checked below, the soft-deleted version included: its id keeps its schema.
    let kept: Vec<Answer> = answers
        .iter()
        .filter(|a| a.subject != "durable-0-value")
        .cloned()
        .collect();

    // Every registration wrote a NOOP under one key, and a permanent deletion follows a soft one under one key;
    // compaction leaves one of each. Waiting until it has shows that the registries restarted below read a
    // compacted log. The broker compacts every second here, so this is quick.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (records, end) = loop {
        let (records, end) = read_topic(&bootstrap);
        let noops = records
            .iter()
            .filter(|(k, _)| k["keytype"] == "NOOP")
            .count();
        if noops <= 1 {
            break (records, end);
        }
        assert!(
            Instant::now() < deadline,
            "the broker did not compact {TOPIC}: {noops} NOOPs"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert!(
        end - records.len() as i64 >= 100,
        "{} records left of {end}",
        records.len()
    );
    eprintln!(
        "compaction left {} records of {end}; {} claims lost a race",
        records.len(),
        contested_claims(&records)
    );
    drop(instances);
    broker.restart();

    let instances = start_instances(&bootstrap, 3);
    let apis: Vec<Api> = instances.iter().map(Instance::api).collect();
    check_answers(&apis, &kept).await;
    for api in &apis {
        // The permanently deleted subject is gone, its ids are not: they still mean their schemas.
        let (status, subjects) = api.call(Method::GET, "/subjects?deleted=true", None).await;
        assert_eq!(
            (status, subjects),
            (200, json!(["durable-1-value", "durable-2-value"]))
        );
        for a in answers.iter().filter(|a| a.subject == "durable-0-value") {
            let (status, body) = api
                .call(Method::GET, &format!("/schemas/ids/{}", a.id), None)
                .await;
            assert_eq!(status, 200);
            assert!(same_schema(body["schema"].as_str().unwrap(), &a.schema));
        }
        for (query, listed) in [("", false), ("?deleted=true", true)] {
            let (status, versions) = api
                .call(
                    Method::GET,
                    &format!("/subjects/durable-1-value/versions{query}"),
                    None,
                )
                .await;
            assert_eq!(status, 200);
            assert_eq!(versions.as_array().unwrap().contains(&json!(1)), listed);
        }
    }

    // New registrations after all that, again racing: new schemas get new ids, a purged schema its old one.
    let purged_answer = answers
        .iter()
        .find(|a| a.subject == "durable-0-value")
        .unwrap()
        .clone();
    let mut registrations: Vec<(String, String)> = (100..130)
        .map(|i| (format!("durable-{}-value", i % 3), schema(i)))
        .collect();
    registrations.push((purged_answer.subject.clone(), purged_answer.schema.clone()));
    let again = race(&apis, registrations).await;
    let old_ids: BTreeSet<u64> = answers.iter().map(|a| a.id).collect();
    for a in &again {
        if a.schema == purged_answer.schema {
            assert_eq!(a.id, purged_answer.id);
        } else {
            assert!(!old_ids.contains(&a.id), "id {} given out twice", a.id);
        }
    }
    let mut everything = kept;
    everything.extend(again);
    check_answers(&apis, &everything).await;
    eprintln!("whole durable scenario in {:?}", started.elapsed());
}
