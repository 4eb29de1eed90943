//! The registry against a real broker: the Confluent REST API, its errors, restarts, a second instance, and
//! schema_registry_converter as the client.

use std::time::Duration;

use edow_testkit::{Broker, Registry};
use reqwest::Method;
use serde_json::{json, Value};

const ORDER_V1: &str =
    r#"{"type":"record","name":"Order","namespace":"t","fields":[{"name":"id","type":"string"}]}"#;
const ORDER_V2: &str = r#"{"type":"record","name":"Order","namespace":"t","fields":[{"name":"id","type":"string"},{"name":"note","type":["null","string"],"default":null}]}"#;
const ORDER_REQUIRED: &str = r#"{"type":"record","name":"Order","namespace":"t","fields":[{"name":"id","type":"string"},{"name":"qty","type":"int"}]}"#;
const PAYMENT: &str = r#"{"type":"record","name":"Payment","namespace":"t","fields":[{"name":"amount","type":"long"}]}"#;

#[derive(Clone)]
struct Api {
    client: reqwest::Client,
    base: String,
}

impl Api {
    fn new(registry: &Registry) -> Api {
        Api {
            client: reqwest::Client::builder().no_proxy().build().unwrap(),
            base: registry.url(),
        }
    }

    async fn call(&self, method: Method, path: &str, body: Option<&str>) -> (u16, Value) {
        let mut request = self
            .client
            .request(method, format!("{}{path}", self.base))
            .header("content-type", "application/vnd.schemaregistry.v1+json");
        if let Some(body) = body {
            request = request.body(body.to_string());
        }
        let response = request.send().await.expect("registry answers");
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_string());
        let text = response.text().await.unwrap();
        assert_eq!(
            content_type.as_deref(),
            Some("application/vnd.schemaregistry.v1+json"),
            "{path}: {text}"
        );
        let value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}: {text}"));
        (status, value)
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        self.call(Method::GET, path, None).await
    }

    async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.call(Method::POST, path, Some(&body.to_string())).await
    }

    async fn register(&self, subject: &str, schema: &str) -> (u16, Value) {
        self.post(
            &format!("/subjects/{subject}/versions"),
            &json!({"schema": schema}),
        )
        .await
    }
}

fn assert_error(got: (u16, Value), status: u16, code: u64) {
    assert_eq!(got.0, status, "{:?}", got.1);
    assert_eq!(got.1["error_code"], code, "{:?}", got.1);
    assert!(
        got.1["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{:?}",
        got.1
    );
}

#[tokio::test]
async fn api_answers_like_confluent() {
    let broker = Broker::start();
    let registry = Registry::start(&broker);
    let api = Api::new(&registry);

    assert_eq!(api.get("/subjects").await, (200, json!([])));
    assert_eq!(api.get("/schemas/types").await, (200, json!(["AVRO"])));
    assert_eq!(
        api.get("/config").await,
        (200, json!({"compatibilityLevel": "BACKWARD"}))
    );

    // Registration is idempotent, ids are global and whitespace does not make a new schema.
    assert_eq!(
        api.register("orders-value", ORDER_V1).await,
        (200, json!({"id": 1}))
    );
    assert_eq!(
        api.register("orders-value", ORDER_V1).await,
        (200, json!({"id": 1}))
    );
    let spaced = ORDER_V1.replace(',', " ,\n ");
    assert_eq!(
        api.register("orders-value", &spaced).await,
        (200, json!({"id": 1}))
    );
    assert_eq!(
        api.register("archive-value", ORDER_V1).await,
        (200, json!({"id": 1}))
    );
    assert_eq!(
        api.register("orders-value", ORDER_V2).await,
        (200, json!({"id": 2}))
    );
    assert_eq!(
        api.register("payments-value", PAYMENT).await,
        (200, json!({"id": 3}))
    );

    assert_eq!(
        api.get("/subjects").await,
        (
            200,
            json!(["archive-value", "orders-value", "payments-value"])
        )
    );
    assert_eq!(
        api.get("/subjects/orders-value/versions").await,
        (200, json!([1, 2]))
    );
    for latest in ["latest", "-1", "2"] {
        let (status, body) = api
            .get(&format!("/subjects/orders-value/versions/{latest}"))
            .await;
        assert_eq!(status, 200);
        assert_eq!(body["subject"], "orders-value");
        assert_eq!(
            (body["version"].clone(), body["id"].clone()),
            (json!(2), json!(2))
        );
        let schema: Value = serde_json::from_str(body["schema"].as_str().unwrap()).unwrap();
        assert_eq!(schema, serde_json::from_str::<Value>(ORDER_V2).unwrap());
    }
    let (status, raw) = api.get("/subjects/orders-value/versions/1/schema").await;
    assert_eq!(
        (status, raw),
        (200, serde_json::from_str(ORDER_V1).unwrap())
    );
    let (status, by_id) = api.get("/schemas/ids/3").await;
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_str::<Value>(by_id["schema"].as_str().unwrap()).unwrap(),
        serde_json::from_str::<Value>(PAYMENT).unwrap()
    );
    assert_eq!(
        api.get("/schemas/ids/1/versions").await,
        (
            200,
            json!([{"subject": "archive-value", "version": 1}, {"subject": "orders-value", "version": 1}])
        )
    );

    // Lookup under a subject.
    let (status, found) = api
        .post(
            "/subjects/orders-value?deleted=false",
            &json!({"schema": ORDER_V1}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        (found["version"].clone(), found["id"].clone()),
        (json!(1), json!(1))
    );
    assert_error(
        api.post("/subjects/orders-value", &json!({"schema": PAYMENT}))
            .await,
        404,
        40403,
    );

    // Compatibility: a required field without default is not BACKWARD compatible.
    let verbose = api
        .post(
            "/compatibility/subjects/orders-value/versions/latest?verbose=true",
            &json!({"schema": ORDER_REQUIRED}),
        )
        .await;
    assert_eq!(verbose.0, 200);
    assert_eq!(verbose.1["is_compatible"], false);
    assert!(
        verbose.1["messages"][0].as_str().unwrap().contains("qty"),
        "{:?}",
        verbose.1
    );
    assert_eq!(
        api.post(
            "/compatibility/subjects/orders-value/versions",
            &json!({"schema": ORDER_V2})
        )
        .await,
        (200, json!({"is_compatible": true}))
    );
    assert_eq!(
        api.post(
            "/compatibility/subjects/new-subject/versions",
            &json!({"schema": PAYMENT})
        )
        .await,
        (200, json!({"is_compatible": true}))
    );
    let refused = api.register("orders-value", ORDER_REQUIRED).await;
    assert_error(refused.clone(), 409, 409);
    assert!(refused.1["message"]
        .as_str()
        .unwrap()
        .contains("incompatible"));

    // Config: per subject overrides global; NONE lets anything in.
    assert_error(api.get("/config/orders-value").await, 404, 40408);
    assert_eq!(
        api.get("/config/orders-value?defaultToGlobal=true").await,
        (200, json!({"compatibilityLevel": "BACKWARD"}))
    );
    assert_eq!(
        api.call(
            Method::PUT,
            "/config/orders-value",
            Some(r#"{"compatibility":"none"}"#)
        )
        .await,
        (200, json!({"compatibility": "NONE"}))
    );
    assert_eq!(
        api.get("/config/orders-value").await,
        (200, json!({"compatibilityLevel": "NONE"}))
    );
    assert_eq!(
        api.register("orders-value", ORDER_REQUIRED).await,
        (200, json!({"id": 4}))
    );
    assert_eq!(
        api.call(Method::DELETE, "/config/orders-value", None).await,
        (200, json!({"compatibilityLevel": "NONE"}))
    );
    assert_eq!(
        api.call(
            Method::PUT,
            "/config",
            Some(r#"{"compatibility":"FULL_TRANSITIVE"}"#)
        )
        .await,
        (200, json!({"compatibility": "FULL_TRANSITIVE"}))
    );
    assert_eq!(
        api.get("/config").await,
        (200, json!({"compatibilityLevel": "FULL_TRANSITIVE"}))
    );

    // Deletion: soft first, then permanent; a soft-deleted subject is listed only with ?deleted=true.
    assert_error(
        api.call(
            Method::DELETE,
            "/subjects/payments-value?permanent=true",
            None,
        )
        .await,
        404,
        40405,
    );
    assert_eq!(
        api.call(Method::DELETE, "/subjects/payments-value", None)
            .await,
        (200, json!([1]))
    );
    assert_eq!(
        api.get("/subjects").await,
        (200, json!(["archive-value", "orders-value"]))
    );
    assert_eq!(
        api.get("/subjects?deleted=true").await,
        (
            200,
            json!(["archive-value", "orders-value", "payments-value"])
        )
    );
    assert_error(
        api.get("/subjects/payments-value/versions").await,
        404,
        40401,
    );
    // A deleted schema stays readable by id: old records still decode.
    assert_eq!(api.get("/schemas/ids/3").await.0, 200);
    assert_eq!(
        api.call(
            Method::DELETE,
            "/subjects/payments-value?permanent=true",
            None
        )
        .await,
        (200, json!([1]))
    );
    assert_eq!(
        api.get("/subjects?deleted=true").await,
        (200, json!(["archive-value", "orders-value"]))
    );
    assert_eq!(
        api.call(Method::DELETE, "/subjects/orders-value/versions/1", None)
            .await,
        (200, json!(1))
    );
    assert_eq!(
        api.get("/subjects/orders-value/versions").await,
        (200, json!([2, 3]))
    );
}

#[tokio::test]
async fn bad_input_gets_confluent_errors_and_never_a_500() {
    let broker = Broker::start();
    let registry = Registry::start(&broker);
    let api = Api::new(&registry);
    api.register("orders-value", ORDER_V1).await;

    let order_body = json!({"schema": ORDER_V1}).to_string();
    let deep_body = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let cases: Vec<(Method, &str, Option<&str>, u16, u64)> = vec![
        (
            Method::POST,
            "/subjects/orders-value/versions",
            Some("{not json"),
            400,
            400,
        ),
        (
            Method::POST,
            "/subjects/orders-value/versions",
            Some(r#"{"schema": 5}"#),
            422,
            422,
        ),
        (
            Method::POST,
            "/subjects/orders-value/versions",
            Some("{}"),
            422,
            42201,
        ),
        (
            Method::POST,
            "/subjects/orders-value/versions",
            Some(r#"{"schema":"{\"type\":\"recordd\"}"}"#),
            422,
            42201,
        ),
        (
            Method::POST,
            "/subjects/orders-value/versions",
            Some(r#"{"schema":"not even json"}"#),
            422,
            42201,
        ),
        (
            Method::POST,
            "/subjects/orders-value/versions",
            Some(
                r#"{"schema":"{\"type\":\"record\",\"name\":\"X\",\"fields\":[{\"name\":\"a\",\"type\":\"Missing\"}]}"}"#,
            ),
            422,
            42201,
        ),
        (
            Method::POST,
            "/subjects/orders-value/versions",
            Some(r#"{"schema":"syntax = \"proto3\";","schemaType":"PROTOBUF"}"#),
            422,
            42201,
        ),
        // apache-avro panics on this one instead of returning an error.
        (
            Method::POST,
            "/subjects/orders-value/versions",
            Some(
                r#"{"schema":"{\"type\":\"record\",\"name\":\"R\",\"fields\":[{\"name\":\"x\",\"type\":{\"type\":\"map\",\"values\":\"int\",\"precision\":{}},\"default\":{\"a\":\"b\"}}]}"}"#,
            ),
            422,
            42201,
        ),
        (
            Method::POST,
            "/subjects/orders-value/versions",
            Some(deep_body.as_str()),
            400,
            400,
        ),
        (Method::GET, "/subjects/nope/versions", None, 404, 40401),
        (Method::GET, "/subjects/nope/versions/1", None, 404, 40401),
        (
            Method::GET,
            "/subjects/orders-value/versions/9",
            None,
            404,
            40402,
        ),
        (
            Method::GET,
            "/subjects/orders-value/versions/zero",
            None,
            422,
            42202,
        ),
        (
            Method::GET,
            "/subjects/orders-value/versions/0",
            None,
            422,
            42202,
        ),
        (Method::GET, "/schemas/ids/999", None, 404, 40403),
        (Method::GET, "/schemas/ids/abc", None, 404, 40403),
        (
            Method::POST,
            "/subjects/nope",
            Some(order_body.as_str()),
            404,
            40401,
        ),
        (
            Method::POST,
            "/compatibility/subjects/nope/versions/latest",
            Some(order_body.as_str()),
            404,
            40401,
        ),
        (
            Method::POST,
            "/compatibility/subjects/orders-value/versions/7",
            Some(order_body.as_str()),
            404,
            40402,
        ),
        (
            Method::PUT,
            "/config",
            Some(r#"{"compatibility":"SIDEWAYS"}"#),
            422,
            42203,
        ),
        (
            Method::PUT,
            "/config/orders-value",
            Some(r#"{"compatibility":""}"#),
            422,
            42203,
        ),
        (Method::PUT, "/config", Some("{}"), 422, 42203),
        (Method::DELETE, "/subjects/nope", None, 404, 40401),
        (Method::GET, "/no/such/endpoint", None, 404, 404),
        (Method::PATCH, "/subjects", None, 405, 405),
    ];
    for (method, path, body, status, code) in cases {
        let got = api.call(method.clone(), path, body).await;
        assert_eq!(
            (got.0, got.1["error_code"].as_u64()),
            (status, Some(code)),
            "{method} {path} {body:?}: {:?}",
            got.1
        );
    }
    // Still serving, nothing lost.
    assert_eq!(api.get("/subjects").await, (200, json!(["orders-value"])));
}

#[tokio::test]
async fn schemas_survive_restarts_and_are_shared_between_instances() {
    let broker = Broker::start();
    let mut first = Registry::start(&broker);
    let api = Api::new(&first);
    assert_eq!(
        api.register("orders-value", ORDER_V1).await,
        (200, json!({"id": 1}))
    );
    assert_eq!(
        api.register("orders-value", ORDER_V2).await,
        (200, json!({"id": 2}))
    );
    api.call(
        Method::PUT,
        "/config/orders-value",
        Some(r#"{"compatibility":"FULL"}"#),
    )
    .await;
    assert!(
        first.process().terminate(Duration::from_secs(10)),
        "clean shutdown on SIGTERM"
    );

    let second = Registry::start(&broker);
    let api = Api::new(&second);
    assert_eq!(
        api.get("/subjects/orders-value/versions").await,
        (200, json!([1, 2]))
    );
    assert_eq!(
        api.get("/subjects/orders-value/versions/1").await.1["id"],
        1
    );
    assert_eq!(
        api.get("/config/orders-value").await,
        (200, json!({"compatibilityLevel": "FULL"}))
    );
    assert_eq!(
        api.register("payments-value", PAYMENT).await,
        (200, json!({"id": 3}))
    );

    // A third instance alongside: both register different schemas at once; every id is distinct and both agree.
    let third = Registry::start(&broker);
    let other = Api::new(&third);
    let schemas: Vec<String> = (0..8)
        .map(|i| {
            format!(
                r#"{{"type":"record","name":"R{i}","namespace":"race","fields":[{{"name":"f","type":"int"}}]}}"#
            )
        })
        .collect();
    let mut tasks = Vec::new();
    for (i, schema) in schemas.iter().enumerate() {
        let target = if i % 2 == 0 {
            api.clone()
        } else {
            other.clone()
        };
        let schema = schema.clone();
        tasks.push(tokio::spawn(async move {
            target.register(&format!("race-{i}-value"), &schema).await
        }));
    }
    let mut results = Vec::new();
    for task in tasks {
        results.push(task.await.unwrap());
    }
    let mut ids: Vec<u64> = results
        .iter()
        .map(|(status, body)| {
            assert_eq!(*status, 200, "{body:?}");
            body["id"].as_u64().unwrap()
        })
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), schemas.len(), "ids must be unique: {results:?}");
    for (i, schema) in schemas.iter().enumerate() {
        for instance in [&api, &other] {
            let (status, found) = instance
                .post(
                    &format!("/subjects/race-{i}-value"),
                    &json!({"schema": schema}),
                )
                .await;
            assert_eq!(status, 200, "{found:?}");
            assert_eq!(found["id"], results[i].1["id"]);
        }
    }
    drop(first);
}

#[tokio::test]
async fn schema_registry_converter_works_as_the_client() {
    use edow_schemas::contracts::{WorkflowTrigger, ALL};
    use edow_schemas::Codec;
    use schema_registry_converter::async_impl::schema_registry::{
        get_all_subjects, get_schema_by_id, SrSettings,
    };

    let broker = Broker::start();
    let registry = Registry::start(&broker);
    let codec = Codec::new(&registry.url()).unwrap();
    let trigger = WorkflowTrigger {
        workflow_id: "order-7".into(),
        workflow_name: "order".into(),
        workflow_version: None,
        input: r#"{"sku":"A1"}"#.into(),
        idempotency_key: Some("k".into()),
        correlation_id: None,
        priority: 0,
        requested_at: 1_700_000_000_000,
        attributes: Default::default(),
    };
    let bytes = codec.encode("edow.triggers", &trigger).await.unwrap();
    assert_eq!(bytes[0], 0, "magic byte");
    assert_eq!(u32::from_be_bytes(bytes[1..5].try_into().unwrap()), 1);
    let back: WorkflowTrigger = codec.decode(Some(&bytes)).await.unwrap();
    assert_eq!(back, trigger);

    let settings = SrSettings::new_builder(registry.url())
        .no_proxy()
        .build()
        .unwrap();
    assert_eq!(
        get_all_subjects(&settings).await.unwrap(),
        vec!["edow.triggers-value".to_string()]
    );
    let fetched = get_schema_by_id(1, &settings).await.unwrap();
    let (_, text) = ALL
        .iter()
        .find(|(n, _)| n.ends_with("WorkflowTrigger"))
        .unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(&fetched.schema).unwrap(),
        serde_json::from_str::<Value>(text).unwrap()
    );
}
