//! The orchestrator's HTTP API end to end: deploy, start (with an idempotency key), read, list and page, signal
//! and cancel, from two instances, against the real broker; bad requests get 4xx naming the field. The CLI's
//! reads answer what the API answers, and an instance that turns ready has indexed what existed before it.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::{http_client, wait_ready, Cluster};
use edow_testkit::free_port;
use serde_json::{json, Value};

const APPROVAL: &str = r#"
name: api-approval
steps:
  - { name: submit, task: api.echo }
  - name: decision
    wait: { signal: approve, timeout: 1h }
  - { name: publish, task: api.echo }
"#;

const QUICK: &str = r#"
name: api-quick
steps:
  - { name: only, task: api.echo }
"#;

const HOOKED: &str = r#"
name: api-hooked
hook: { id: body.order_id }
steps:
  - { name: only, task: api.echo }
"#;

struct Api {
    base: String,
    client: reqwest::Client,
}

impl Api {
    fn new(addr: &str) -> Api {
        Api {
            base: format!("http://{addr}"),
            client: http_client(),
        }
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> (u16, Value) {
        let response = request.send().await.expect("the API answers");
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        let body =
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({status}): {text}"));
        (status, body)
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        self.send(self.client.get(format!("{}{path}", self.base)))
            .await
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.send(self.client.post(format!("{}{path}", self.base)).json(&body))
            .await
    }

    async fn post_text(&self, path: &str, body: &str) -> (u16, Value) {
        let request = self
            .client
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/yaml")
            .body(body.to_string());
        self.send(request).await
    }

    /// GETs `path` until `done` holds; panics with the last answer after 30 s.
    async fn until(&self, path: &str, done: impl Fn(u16, &Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (status, body) = self.get(path).await;
            if done(status, &body) {
                return body;
            }
            assert!(Instant::now() < deadline, "{path}: {status} {body}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn field(body: &Value) -> &str {
    body["error"]["field"]
        .as_str()
        .unwrap_or_else(|| panic!("no error field in {body}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_drives_and_reads_workflows_from_any_instance() {
    let cluster = Cluster::start();
    let (a, b) = (
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    );
    let _first = cluster.orchestrator_with(&["--http-addr", &a]);
    cluster.wait_for_topics();
    let _second = cluster.orchestrator_with(&["--http-addr", &b]);
    let _worker = cluster.worker("api", &["api.echo=echo"], 8);
    let (api, other) = (Api::new(&a), Api::new(&b));
    wait_ready(&a).await;
    wait_ready(&b).await;

    // Deploy through the API; the same text again is no new version; a bad definition names what is wrong.
    let (status, deployed) = api.post_text("/v1/definitions", APPROVAL).await;
    assert_eq!(
        (status, &deployed["version"]),
        (201, &json!(1)),
        "{deployed}"
    );
    let (status, again) = api.post_text("/v1/definitions", APPROVAL).await;
    assert_eq!((status, &again["unchanged"]), (200, &json!(true)));
    assert_eq!(api.post_text("/v1/definitions", QUICK).await.0, 201);
    let (status, refused) = api
        .post_text("/v1/definitions", "name: broken\nsteps: []\n")
        .await;
    assert_eq!((status, field(&refused)), (400, "definition"), "{refused}");
    let (_, listed) = other.get("/v1/definitions").await;
    let names: Vec<&str> = listed["definitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"api-approval") && names.contains(&"api-quick"),
        "{listed}"
    );
    let (_, versions) = api.get("/v1/definitions/api-approval").await;
    assert_eq!(versions["versions"][0]["source"], APPROVAL);
    let (status, missing) = api.get("/v1/definitions/nothing-here").await;
    assert_eq!((status, field(&missing)), (404, "name"));

    // Start with an idempotency key: the same key answers the same id and starts one workflow.
    let start = |key: &'static str| {
        let request = api
            .client
            .post(format!("{}/v1/workflows", api.base))
            .header("idempotency-key", key)
            .json(
                &json!({"name": "api-approval", "input": {"doc": 7}, "correlation_id": "case-7"}),
            );
        api.send(request)
    };
    let (status, started) = start("doc-7").await;
    assert_eq!(status, 202, "{started}");
    let id = started["id"].as_str().unwrap().to_string();
    assert_eq!(started["location"], format!("/v1/workflows/{id}"));
    assert_eq!(start("doc-7").await.1["id"], id.as_str());

    // Read it from the other instance, whichever owns its partition: waiting at the signal.
    let path = format!("/v1/workflows/{id}");
    let waiting = other
        .until(&path, |s, b| {
            s == 200 && b["running_steps"][0]["step"] == "decision"
        })
        .await;
    assert_eq!(waiting["status"], "Running");
    assert_eq!(waiting["correlation_id"], "case-7");
    assert_eq!(waiting["input"], json!({"doc": 7}));
    assert_eq!(waiting["running_steps"][0]["step"], "decision", "{waiting}");
    assert_eq!(waiting["history"][0]["kind"], "WorkflowStarted");

    let (status, sent) = api
        .post(&format!("{path}/signals/approve"), json!({"by": "alice"}))
        .await;
    assert_eq!(status, 202, "{sent}");
    let done = api.until(&path, |_, b| b["status"] == "Completed").await;
    // The wait step's output is the signal's payload, which the last step echoes.
    assert_eq!(done["output"], json!({"by": "alice"}), "{done}");
    let kinds: Vec<&str> = done["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds.iter().filter(|k| **k == "WorkflowStarted").count(),
        1,
        "one start for two requests: {kinds:?}"
    );
    assert_eq!(kinds.last(), Some(&"WorkflowCompleted"));

    // Cancel another one.
    let (_, second) = api
        .post(
            "/v1/workflows",
            json!({"name": "api-approval", "id": "doc-8"}),
        )
        .await;
    assert_eq!(second["id"], "doc-8");
    other.until("/v1/workflows/doc-8", |s, _| s == 200).await;
    let (status, _) = other
        .post("/v1/workflows/doc-8/cancel", json!({"reason": "withdrawn"}))
        .await;
    assert_eq!(status, 202);
    api.until("/v1/workflows/doc-8", |_, b| b["status"] == "Cancelled")
        .await;

    // Search and pages: five quick ones, two per page, each seen once.
    for i in 0..5 {
        let (status, _) = api
            .post(
                "/v1/workflows",
                json!({"name": "api-quick", "id": format!("quick-{i}")}),
            )
            .await;
        assert_eq!(status, 202);
    }
    api.until("/v1/workflows?name=api-quick&status=Completed", |_, b| {
        b["workflows"].as_array().is_some_and(|w| w.len() == 5)
    })
    .await;
    // Each instance's index follows the topics on its own: wait until the one paged through has them all too.
    other
        .until("/v1/workflows?name=api-quick&status=Completed", |_, b| {
            b["workflows"].as_array().is_some_and(|w| w.len() == 5)
        })
        .await;
    let mut seen = BTreeSet::new();
    let mut query = "/v1/workflows?name=api-quick&limit=2".to_string();
    for _ in 0..5 {
        let (status, page) = other.get(&query).await;
        assert_eq!(status, 200, "{page}");
        for workflow in page["workflows"].as_array().unwrap() {
            assert!(
                seen.insert(workflow["id"].as_str().unwrap().to_string()),
                "twice: {workflow}"
            );
        }
        match page["next_cursor"].as_str() {
            Some(cursor) => query = format!("/v1/workflows?name=api-quick&limit=2&cursor={cursor}"),
            None => break,
        }
    }
    assert_eq!(seen.len(), 5, "{seen:?}");
    let (_, by_correlation) = api.get("/v1/workflows?correlation_id=case-7").await;
    assert_eq!(by_correlation["workflows"].as_array().unwrap().len(), 1);
    let (_, cancelled) = api.get("/v1/workflows?status=cancelled").await;
    assert_eq!(cancelled["workflows"][0]["id"], "doc-8");

    // Bad requests: 4xx with the field, never a 500.
    for (body, expected) in [
        (json!({"input": {}}), "body"),
        (json!({"name": "api-quick", "colour": "red"}), "body"),
        (json!({"name": "api-quick", "version": 0}), "version"),
        (json!({"name": "api-quick", "id": "__edow.partition"}), "id"),
        (json!({"name": ""}), "name"),
        (
            json!({"name": "api-quick", "input": {"deep": (0..100).fold(json!(1), |v, _| json!([v]))}}),
            "input",
        ),
    ] {
        let (status, refused) = api.post("/v1/workflows", body.clone()).await;
        assert_eq!(
            (status, field(&refused)),
            (400, expected),
            "{body}: {refused}"
        );
    }
    for (query, expected) in [
        ("status=Sleeping", "status"),
        ("limit=0", "limit"),
        ("cursor=zz", "cursor"),
        ("from=yesterday", "from"),
        ("colour=red", "colour"),
    ] {
        let (status, refused) = api.get(&format!("/v1/workflows?{query}")).await;
        assert_eq!(
            (status, field(&refused)),
            (400, expected),
            "{query}: {refused}"
        );
    }
    let (status, refused) = api.get("/v1/workflows/never-started").await;
    assert_eq!((status, field(&refused)), (404, "id"));
    let (status, refused) = api.get("/v1/nothing").await;
    assert_eq!((status, field(&refused)), (404, "path"));
    // axum's own refusals are JSON too: a method not served, a body past the limit.
    let (status, refused) = api
        .send(api.client.delete(format!("{}/v1/workflows", api.base)))
        .await;
    assert_eq!((status, field(&refused)), (405, "method"));
    let huge = "x".repeat(3 * 1024 * 1024);
    let (status, refused) = api
        .post("/v1/workflows", json!({"name": "api-quick", "input": huge}))
        .await;
    assert_eq!((status, field(&refused)), (413, "body"), "{refused}");

    // Webhooks: the id comes from the body, so the same delivery twice starts one workflow.
    assert_eq!(api.post_text("/v1/definitions", HOOKED).await.0, 201);
    let delivery = json!({"order_id": "A-17", "total": 12});
    let (status, hooked) = other.post("/v1/hooks/api-hooked", delivery.clone()).await;
    assert_eq!(status, 202, "{hooked}");
    assert_eq!(hooked["id"], "api-hooked:A-17");
    assert_eq!(
        api.post("/v1/hooks/api-hooked", delivery).await.1["id"],
        "api-hooked:A-17"
    );
    let done = api
        .until("/v1/workflows/api-hooked%3AA-17", |_, b| {
            b["status"] == "Completed"
        })
        .await;
    assert_eq!(done["input"], json!({"order_id": "A-17", "total": 12}));
    let starts = done["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "WorkflowStarted")
        .count();
    assert_eq!(starts, 1);
    let (status, refused) = api.post("/v1/hooks/api-hooked", json!({"total": 1})).await;
    assert_eq!(
        (status, field(&refused)),
        (400, "body"),
        "no order_id: {refused}"
    );
    let (status, refused) = api.post("/v1/hooks/not-deployed", json!({})).await;
    assert_eq!((status, field(&refused)), (404, "workflow"));
    let (status, refused) = api.post_text("/v1/hooks/api-hooked", "{not json").await;
    assert_eq!((status, field(&refused)), (400, "body"));

    // The OpenAPI document describes every route used here.
    let (status, openapi) = api.get("/v1/openapi.json").await;
    assert_eq!(status, 200);
    for path in [
        "/v1/workflows",
        "/v1/workflows/{id}",
        "/v1/workflows/{id}/signals/{name}",
        "/v1/workflows/{id}/cancel",
        "/v1/definitions",
        "/v1/definitions/{name}",
        "/v1/hooks/{workflow}",
    ] {
        assert!(openapi["paths"][path].is_object(), "{path} undocumented");
    }

    cli_reads_match_the_api(&cluster, &api, &id).await;

    // A new instance is ready only once its index holds what the topics held when it started: no 404 after
    // readiness for a workflow that existed before.
    let c = format!("127.0.0.1:{}", free_port());
    let _third = cluster.orchestrator_with(&["--http-addr", &c]);
    wait_ready(&c).await;
    let late = Api::new(&c);
    let (status, quick) = late.get("/v1/workflows?name=api-quick").await;
    assert_eq!(status, 200);
    // The five quick ones and the one the CLI started.
    assert_eq!(quick["workflows"].as_array().unwrap().len(), 6, "{quick}");
    let (status, cancelled) = late.get("/v1/workflows/doc-8").await;
    assert_eq!((status, &cancelled["status"]), (200, &json!("Cancelled")));
}

/// Every read of the API is in the CLI too, in the same JSON with `--output json`.
async fn cli_reads_match_the_api(cluster: &Cluster, api: &Api, id: &str) {
    let json_of = |args: &[&str]| -> Value {
        let (ok, out, err) = cluster.cli(args);
        assert!(ok, "edow {args:?}: {err}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("edow {args:?}: {e}: {out}"))
    };
    let ids = |body: &Value| -> BTreeSet<String> {
        body["workflows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w["id"].as_str().unwrap().to_string())
            .collect()
    };
    let listed = json_of(&["list", "--name", "api-quick", "--output", "json"]);
    let (_, from_api) = api.get("/v1/workflows?name=api-quick").await;
    assert_eq!(ids(&listed), ids(&from_api));
    assert_eq!(ids(&listed).len(), 5);
    let cancelled = json_of(&["list", "--status", "cancelled", "--output", "json"]);
    assert_eq!(ids(&cancelled), BTreeSet::from(["doc-8".to_string()]));
    let (ok, _, err) = cluster.cli(&["list", "--status", "Sleeping"]);
    assert!(!ok && err.contains("--status"), "{err}");

    let shown = json_of(&["status", id, "--history", "--output", "json"]);
    let (_, from_api) = api.get(&format!("/v1/workflows/{id}")).await;
    for key in [
        "id",
        "name",
        "version",
        "status",
        "input",
        "output",
        "correlation_id",
    ] {
        assert_eq!(shown[key], from_api[key], "{key}: {shown} vs {from_api}");
    }
    assert_eq!(shown["history"], from_api["history"]);
    let (ok, text, err) = cluster.cli(&["status", id, "--history"]);
    assert!(ok, "{err}");
    assert!(
        text.contains("Completed") && text.contains("WorkflowStarted"),
        "{text}"
    );

    let definitions = json_of(&["definitions", "--output", "json"]);
    let (_, from_api) = api.get("/v1/definitions").await;
    assert_eq!(definitions, from_api);
    let approval = json_of(&["definitions", "api-approval", "--output", "json"]);
    assert_eq!(approval["versions"][0]["source"], APPROVAL);
    let (ok, _, err) = cluster.cli(&["definitions", "nothing-here"]);
    assert!(!ok && err.contains("no definition nothing-here"), "{err}");

    let started = json_of(&["start", "api-quick", "--id", "cli-1", "--output", "json"]);
    assert_eq!(started["id"], "cli-1");
    assert_eq!(started["trace_id"].as_str().map(str::len), Some(32));
    let signalled = json_of(&["signal", "cli-1", "nudge", "--output", "json"]);
    assert!(signalled["signal_id"].is_string(), "{signalled}");
}
