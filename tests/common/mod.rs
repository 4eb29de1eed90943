//! End-to-end harness: a real broker and registry, the real orchestrator and worker binaries, the real CLI, and
//! a reader of the lifecycle events topic to assert on what users would see.

#![allow(dead_code)]

use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};

use edow_kafka::{now_millis, produce_all, Kafka, Outgoing};
use edow_schemas::contracts::{LifecycleEvent, LifecycleKind, WorkflowTrigger};
use edow_schemas::{Codec, Topics};
use edow_testkit::{Binary, Broker, Registry};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::{Message, Offset, TopicPartitionList};

pub const PARTITIONS: i32 = 4;

/// The SASL users of a secured cluster: one per kind of process, as production gives each its own ACLs.
pub const PRINCIPALS: [&str; 5] = [
    "edow-orchestrator",
    "edow-worker",
    edow_testkit::REGISTRY_PRINCIPAL,
    "edow-cli",
    "edow-test",
];

/// The users of a secured cluster's registry: (role, name, password); the first is what edow's processes use.
pub const REGISTRY_USERS: [(&str, &str, &str); 2] = [
    ("admin", "edow", "registry-admin-pw-4d1c"),
    ("read", "dashboard", "registry-read-pw-a8e2"),
];

/// How the test itself reaches `registry`: as its admin, trusting its certificate, when it is secured.
fn registry_access(registry: &Registry) -> edow_schemas::codec::RegistryAccess {
    let Some(ca) = registry.ca() else {
        return Default::default();
    };
    let (_, user, password) = REGISTRY_USERS[0];
    edow_schemas::codec::RegistryAccess {
        basic_auth: Some((user.to_string(), password.to_string())),
        ca_pem: Some(std::fs::read(ca).unwrap()),
    }
}

/// A test password per principal, different for each.
pub fn password_for(principal: &str) -> &'static str {
    match principal {
        "edow-orchestrator" => "orchestrator-pw-1f4e",
        "edow-worker" => "worker-pw-93ab",
        "edow-registry" => "registry-pw-5c2d",
        "edow-cli" => "cli-pw-77e0",
        _ => "test-pw-0b1d",
    }
}

pub struct Cluster {
    pub broker: Broker,
    pub registry: Registry,
    pub kafka: Kafka,
    pub codec: Codec,
    pub topics: Topics,
    dir: tempfile::TempDir,
}

impl Cluster {
    pub fn start() -> Cluster {
        Cluster::with_broker(Broker::start())
    }

    /// A cluster whose broker keeps its data in sqlite, so that it can be restarted.
    pub fn start_durable() -> Cluster {
        Cluster::with_broker(Broker::start_durable())
    }

    /// A cluster whose broker is reached over TLS only (through stunnel) and requires SASL SCRAM-SHA-512: every
    /// process gets the settings as `EDOW_KAFKA_*` variables and logs in as its own principal ([`PRINCIPALS`]).
    pub fn start_secured() -> Cluster {
        let users: Vec<(&str, &str)> = PRINCIPALS
            .iter()
            .map(|name| (*name, password_for(name)))
            .collect();
        let broker = Broker::start_secured(true, &users);
        let registry = Registry::start_secured(&broker, &REGISTRY_USERS);
        Cluster::with(broker, registry)
    }

    fn with_broker(broker: Broker) -> Cluster {
        let registry = Registry::start(&broker);
        Cluster::with(broker, registry)
    }

    fn with(broker: Broker, registry: Registry) -> Cluster {
        let mut kafka = Kafka::new(broker.bootstrap_servers());
        kafka.options = broker.client_settings();
        if let Some(password) = broker.password_of("edow-test") {
            kafka
                .options
                .push(("sasl.username".into(), "edow-test".into()));
            kafka.options.push(("sasl.password".into(), password));
        }
        let codec = Codec::with_access(&registry.url(), &registry_access(&registry)).unwrap();
        Cluster {
            broker,
            registry,
            kafka,
            codec,
            topics: Topics::default(),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// What every process gets, logged in to a secured broker as `principal`.
    fn env_as(&self, principal: &str) -> Vec<(&'static str, String)> {
        let mut env = vec![
            ("EDOW_BOOTSTRAP_SERVERS", self.broker.bootstrap_servers()),
            ("EDOW_SCHEMA_REGISTRY_URL", self.registry.url()),
            ("EDOW_PARTITIONS", PARTITIONS.to_string()),
            ("EDOW_TASK_PARTITIONS", PARTITIONS.to_string()),
        ];
        for (key, value) in self.broker.client_settings() {
            let name = match key.as_str() {
                "security.protocol" => "EDOW_KAFKA_SECURITY_PROTOCOL",
                "ssl.ca.location" => "EDOW_KAFKA_SSL_CA_LOCATION",
                "sasl.mechanism" => "EDOW_KAFKA_SASL_MECHANISM",
                other => panic!("no variable for {other}"),
            };
            env.push((name, value));
        }
        if let Some(password) = self.broker.password_of(principal) {
            env.push(("EDOW_KAFKA_SASL_USERNAME", principal.to_string()));
            env.push(("EDOW_KAFKA_SASL_PASSWORD", password));
        }
        if let Some(ca) = self.registry.ca() {
            // edow's processes register their contracts: the registry's admin.
            let (_, user, password) = REGISTRY_USERS[0];
            env.push(("EDOW_SCHEMA_REGISTRY_CA_LOCATION", ca.display().to_string()));
            env.push((
                "EDOW_SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO",
                format!("{user}:{password}"),
            ));
        }
        env
    }

    /// The environment of a process that is none of the usual ones.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        self.env_as("edow-cli")
    }

    pub fn orchestrator(&self) -> Binary {
        self.orchestrator_with(&[])
    }

    /// An orchestrator with extra command-line arguments.
    pub fn orchestrator_with(&self, args: &[&str]) -> Binary {
        self.orchestrator_with_env(args, &[])
    }

    /// An orchestrator with extra command-line arguments and environment.
    pub fn orchestrator_with_env(&self, args: &[&str], env: &[(&'static str, String)]) -> Binary {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let mut all = self.env_as("edow-orchestrator");
        all.extend(env.iter().cloned());
        Binary::start("edow-orchestrator", "orchestrator", &args, &all)
    }

    /// A worker serving `tasks` (TYPE=HANDLER), ready once it has joined its group.
    pub fn worker(&self, id: &str, tasks: &[&str], concurrency: usize) -> Binary {
        self.worker_with(id, tasks, concurrency, &[])
    }

    /// A [`Cluster::worker`] with extra command-line arguments.
    pub fn worker_with(
        &self,
        id: &str,
        tasks: &[&str],
        concurrency: usize,
        extra: &[&str],
    ) -> Binary {
        self.worker_with_env(id, tasks, concurrency, extra, &[])
    }

    /// A [`Cluster::worker`] with extra command-line arguments and environment.
    pub fn worker_with_env(
        &self,
        id: &str,
        tasks: &[&str],
        concurrency: usize,
        extra: &[&str],
        extra_env: &[(&'static str, String)],
    ) -> Binary {
        let mut args = vec!["--worker-id".to_string(), id.to_string()];
        args.extend(extra.iter().map(|a| a.to_string()));
        args.extend(["--concurrency".to_string(), concurrency.to_string()]);
        for task in tasks {
            args.extend(["--task".to_string(), task.to_string()]);
        }
        let mut env = self.env_as("edow-worker");
        env.push(("RUST_LOG", "info,edow_worker=debug".into()));
        env.extend(extra_env.iter().cloned());
        Binary::start("edow-worker", "worker", &args, &env)
    }

    /// Runs the CLI; returns (success, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (bool, String, String) {
        let output = Command::new(env!("CARGO_BIN_EXE_edow"))
            .args(args)
            .envs(self.env())
            .output()
            .expect("running edow");
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }

    /// Deploys a definition given as YAML text; panics with the CLI's output if it fails.
    pub fn deploy(&self, yaml: &str) -> String {
        let file = self.dir.path().join(format!("def-{}.yaml", now_millis()));
        std::fs::write(&file, yaml).unwrap();
        let (ok, out, err) = self.cli(&["deploy", file.to_str().unwrap()]);
        assert!(ok, "deploy failed: {out}{err}");
        out
    }

    /// Waits until the orchestrator has created its topics.
    pub fn wait_for_topics(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self
            .kafka
            .partition_count(&self.topics.triggers())
            .unwrap_or(0)
            == 0
            || self
                .kafka
                .partition_count(&self.topics.definitions())
                .unwrap_or(0)
                == 0
        {
            assert!(
                Instant::now() < deadline,
                "the orchestrator did not create its topics"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Produces one trigger per (id, input) straight to the triggers topic.
    pub async fn start_many(&self, name: &str, workflows: &[(String, String)]) {
        let topic = self.topics.triggers();
        let mut records = Vec::new();
        for (id, input) in workflows {
            let trigger = WorkflowTrigger {
                workflow_id: id.clone(),
                workflow_name: name.to_string(),
                workflow_version: None,
                input: input.clone(),
                idempotency_key: None,
                correlation_id: Some(format!("corr-{id}")),
                priority: 0,
                requested_at: now_millis(),
                attributes: Default::default(),
            };
            records.push(Outgoing {
                topic: topic.clone(),
                partition: None,
                key: id.as_bytes().to_vec(),
                payload: Some(self.codec.encode(&topic, &trigger).await.unwrap()),
                headers: Vec::new(),
            });
        }
        produce_all(&self.kafka.producer().unwrap(), &records)
            .await
            .unwrap();
    }

    /// A reader of every lifecycle event from the beginning.
    pub fn events(&self) -> Events<'_> {
        events_reader(&self.kafka, &self.codec, &self.topics)
    }
}

/// A reader of every lifecycle event from the beginning, borrowing only `codec` (so the cluster stays free to
/// be changed, e.g. its broker restarted).
pub fn events_reader<'a>(kafka: &Kafka, codec: &'a Codec, topics: &Topics) -> Events<'a> {
    let consumer: StreamConsumer = kafka
        .group_consumer_config(&format!("test-events-{}", now_millis()))
        .create()
        .unwrap();
    let mut list = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        list.add_partition_offset(&topics.events(), p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&list).unwrap();
    Events {
        consumer,
        codec,
        seen: Vec::new(),
    }
}

pub struct Events<'a> {
    consumer: StreamConsumer,
    codec: &'a Codec,
    pub seen: Vec<LifecycleEvent>,
}

impl Events<'_> {
    /// Reads events until `done(seen)` holds; panics after `timeout` with a summary.
    pub async fn until(&mut self, timeout: Duration, done: impl Fn(&[LifecycleEvent]) -> bool) {
        let deadline = tokio::time::Instant::now() + timeout;
        while !done(&self.seen) {
            match tokio::time::timeout_at(deadline, self.consumer.recv()).await {
                Ok(Ok(msg)) => {
                    let event: LifecycleEvent = self.codec.decode(msg.payload()).await.unwrap();
                    self.seen.push(event);
                }
                // A broker restart shows up as transient errors; the consumer reconnects by itself.
                Ok(Err(e)) => {
                    eprintln!("reading events: {e}; going on");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(_) => panic!(
                    "timed out after {timeout:?}; {} events seen, {:?}",
                    self.seen.len(),
                    self.count_by_kind()
                ),
            }
        }
    }

    /// Reads whatever else arrives within `quiet`.
    pub async fn drain(&mut self, quiet: Duration) {
        while let Ok(Ok(msg)) = tokio::time::timeout(quiet, self.consumer.recv()).await {
            let event: LifecycleEvent = self.codec.decode(msg.payload()).await.unwrap();
            self.seen.push(event);
        }
    }

    pub fn count_by_kind(&self) -> HashMap<String, usize> {
        let mut counts = HashMap::new();
        for e in &self.seen {
            *counts.entry(format!("{:?}", e.kind)).or_default() += 1;
        }
        counts
    }

    /// Events of `kind`, per workflow id.
    pub fn per_workflow(&self, kind: LifecycleKind) -> HashMap<String, Vec<&LifecycleEvent>> {
        let mut map: HashMap<String, Vec<&LifecycleEvent>> = HashMap::new();
        for e in self.seen.iter().filter(|e| e.kind == kind) {
            map.entry(e.workflow_id.clone()).or_default().push(e);
        }
        map
    }
}

/// Waits until `process`'s log contains `text`; panics with the log after `timeout`.
pub async fn wait_for_log(process: &Binary, text: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while !process.log().contains(text) {
        assert!(
            Instant::now() < deadline,
            "no '{text}' within {timeout:?} in:\n{}",
            process.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every record of every partition of `topic`, from the beginning; an error when it cannot be read (it may not
/// exist yet).
pub async fn read_topic(
    cluster: &Cluster,
    topic: &str,
) -> anyhow::Result<Vec<rdkafka::message::OwnedMessage>> {
    let mut records = Vec::new();
    for p in 0..PARTITIONS {
        let (kafka, topic) = (cluster.kafka.clone(), topic.to_string());
        records.extend(
            tokio::task::spawn_blocking(move || kafka.read_to_end(&topic, p, Offset::Beginning))
                .await??,
        );
    }
    Ok(records)
}

/// Every task result published so far.
pub async fn results(cluster: &Cluster) -> Vec<edow_schemas::contracts::TaskResult> {
    let mut results = Vec::new();
    for record in read_topic(cluster, &cluster.topics.results())
        .await
        .unwrap()
    {
        results.push(cluster.codec.decode(record.payload()).await.unwrap());
    }
    results
}

pub fn ended(events: &[LifecycleEvent]) -> usize {
    events.iter().filter(|e| e.kind.ends_workflow()).count()
}

/// One scrape of a `/metrics` endpoint in the Prometheus text format.
pub struct Scrape {
    /// (metric name, labels, value) of every sample.
    samples: Vec<(String, std::collections::BTreeMap<String, String>, f64)>,
    pub text: String,
}

impl Scrape {
    /// Fetches `http://{addr}/metrics`; panics when it does not answer 200 in the text format.
    pub async fn fetch(addr: &str) -> Scrape {
        let response = http_client()
            .get(format!("http://{addr}/metrics"))
            .send()
            .await
            .unwrap_or_else(|e| panic!("scraping {addr}: {e}"));
        assert_eq!(response.status(), 200, "scraping {addr}");
        let content_type = response.headers()["content-type"]
            .to_str()
            .unwrap()
            .to_string();
        assert!(
            content_type.starts_with("text/plain; version=0.0.4"),
            "{content_type}"
        );
        Scrape::parse(&response.text().await.unwrap())
    }

    pub fn parse(text: &str) -> Scrape {
        let mut samples = Vec::new();
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        {
            let (series, value) = line.rsplit_once(' ').expect("a sample line");
            let value: f64 = value.parse().unwrap_or_else(|_| panic!("value of {line}"));
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let labels = labels
                .split("\",")
                .filter(|pair| !pair.is_empty())
                .map(|pair| {
                    let (key, value) = pair.split_once('=').expect("label=value");
                    (key.to_string(), value.trim_matches('"').to_string())
                })
                .collect();
            samples.push((name.to_string(), labels, value));
        }
        Scrape {
            samples,
            text: text.to_string(),
        }
    }

    /// The sum of every sample of `name` whose labels include `labels`; 0 when there is none.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).map(|(_, v)| v).sum()
    }

    /// How many series of `name` have labels including `labels`.
    pub fn series(&self, name: &str, labels: &[(&str, &str)]) -> usize {
        self.matching(name, labels).count()
    }

    /// The labels and value of every matching sample.
    pub fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = (&'a std::collections::BTreeMap<String, String>, f64)> + 'a {
        self.samples
            .iter()
            .filter(move |(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, l, v)| (l, *v))
    }
}

/// An HTTP client for the processes' listeners (loopback: no proxy).
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        // A connection per request: a pooled one the server is closing fails the next request on it (a race of
        // keep-alive, not of edow).
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// Waits up to 30 s for `process` to exit (a start refused) and returns its log; panics if it keeps running.
pub async fn log_after_exit(process: &mut edow_testkit::Binary) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    while process.process().is_running() {
        assert!(
            Instant::now() < deadline,
            "it kept running:\n{}",
            process.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    process.log()
}

/// Waits until `/readyz` answers 200 (the first assignment restored); it must answer 503 or 200 meanwhile.
pub async fn wait_ready(addr: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(response) = http_client()
            .get(format!("http://{addr}/readyz"))
            .send()
            .await
        {
            match response.status().as_u16() {
                200 => return,
                503 => {}
                other => panic!("/readyz answered {other}"),
            }
        }
        assert!(Instant::now() < deadline, "{addr} never became ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
