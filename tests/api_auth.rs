//! The API locked: bearer tokens by role (the 401/403 matrix), signed webhooks, the open probes, and the refusal
//! to serve an unauthenticated API beyond loopback; against the real broker, with tokens made by `edow token new`.

mod common;

use std::time::{Duration, Instant};

use common::{http_client, log_after_exit, wait_ready, Cluster};
use edow_testkit::free_port;
use hmac::{Hmac, KeyInit, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

const QUICK: &str = "name: locked-quick\nsteps:\n  - { name: only, task: locked.echo }\n";
const SIGNED_HOOK: &str =
    "name: locked-signed\nhook: { id: body.order_id }\nsteps:\n  - { name: only, task: locked.echo }\n";
const OPEN_HOOK: &str =
    "name: locked-open\nhook: { id: body.order_id }\nsteps:\n  - { name: only, task: locked.echo }\n";
/// A hook with a secret and no `hook.id`: its deliveries are named by their body.
const SIGNED_NO_ID: &str = "name: locked-noid\nsteps:\n  - { name: only, task: locked.echo }\n";
const HOOK_SECRET: &str = "whsec-test-1234";

struct Caller {
    base: String,
    token: Option<String>,
}

impl Caller {
    async fn call(&self, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
        let client = http_client();
        let url = format!("{}{path}", self.base);
        let mut request = match method {
            "GET" => client.get(&url),
            "POST" => client.post(&url),
            "DELETE" => client.delete(&url),
            other => panic!("{other}"),
        };
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            let kind = if body.starts_with('{') {
                "application/json"
            } else {
                "application/yaml"
            };
            request = request.header("content-type", kind).body(body.to_string());
        }
        let response = request.send().await.expect("the API answers");
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }
}

fn token(cluster: &Cluster, role: &str) -> (String, String) {
    let (ok, out, err) = cluster.cli(&[
        "token", "new", "--role", role, "--name", role, "--output", "json",
    ]);
    assert!(ok, "{err}");
    let made: Value = serde_json::from_str(&out).unwrap();
    (
        made["token"].as_str().unwrap().to_string(),
        made["line"].as_str().unwrap().to_string(),
    )
}

/// HMAC-SHA256 of `message` under `secret`, in hex.
fn hmac_hex(secret: &str, message: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(message.as_bytes());
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// GitHub's `X-Hub-Signature-256` value for `body`.
fn github_signature(secret: &str, body: &str) -> String {
    format!("sha256={}", hmac_hex(secret, body))
}

/// The `Edow-Signature` header (Stripe's style) of `body` signed at `t` with the hook secret.
fn stripe_signature(t: u64, body: &str) -> [(&'static str, String); 1] {
    let hex = hmac_hex(HOOK_SECRET, &format!("{t}.{body}"));
    [("edow-signature", format!("t={t},v1={hex}"))]
}

async fn hook(base: &str, workflow: &str, body: &str, headers: &[(&str, String)]) -> (u16, Value) {
    let mut request = http_client()
        .post(format!("{base}/v1/hooks/{workflow}"))
        .header("content-type", "application/json")
        .body(body.to_string());
    for (name, value) in headers {
        request = request.header(*name, value);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_roles_and_signed_hooks_guard_every_route() {
    let cluster = Cluster::start();
    let dir = tempfile::tempdir().unwrap();
    let (viewer, viewer_line) = token(&cluster, "viewer");
    let (operator, operator_line) = token(&cluster, "operator");
    let (admin, admin_line) = token(&cluster, "admin");
    let tokens = dir.path().join("tokens");
    std::fs::write(
        &tokens,
        format!("# roles\n{viewer_line}\n{operator_line}\n{admin_line}\n"),
    )
    .unwrap();
    let secrets = dir.path().join("hooks");
    std::fs::create_dir(&secrets).unwrap();
    std::fs::write(secrets.join("locked-signed"), format!("{HOOK_SECRET}\n")).unwrap();
    std::fs::write(secrets.join("locked-noid"), HOOK_SECRET).unwrap();

    let addr = format!("127.0.0.1:{}", free_port());
    let _orchestrator = cluster.orchestrator_with(&[
        "--http-addr",
        &addr,
        "--api-tokens",
        tokens.to_str().unwrap(),
        "--hook-secrets",
        secrets.to_str().unwrap(),
    ]);
    cluster.wait_for_topics();
    let _worker = cluster.worker("locked", &["locked.echo=echo"], 4);
    wait_ready(&addr).await;
    let base = format!("http://{addr}");
    let as_who = |token: Option<&str>| Caller {
        base: base.clone(),
        token: token.map(str::to_string),
    };
    let (nobody, wrong) = (as_who(None), as_who(Some("edow_not-a-real-token")));
    let (viewer, operator, admin) = (
        as_who(Some(&viewer)),
        as_who(Some(&operator)),
        as_who(Some(&admin)),
    );

    // Open to all: probes, metrics, the API's description.
    for path in ["/healthz", "/readyz", "/metrics", "/v1/openapi.json"] {
        assert_eq!(nobody.call("GET", path, None).await.0, 200, "{path}");
    }

    // Deploy needs admin.
    let (status, body) = operator.call("POST", "/v1/definitions", Some(QUICK)).await;
    assert_eq!(
        (status, &body["error"]["field"]),
        (403, &json!("Authorization")),
        "{body}"
    );
    for definition in [QUICK, SIGNED_HOOK, OPEN_HOOK, SIGNED_NO_ID] {
        let (status, body) = admin
            .call("POST", "/v1/definitions", Some(definition))
            .await;
        assert_eq!(status, 201, "{body}");
    }

    // The matrix: (method, path, body, least role), each tried by every caller.
    let start = r#"{"name": "locked-quick", "id": "locked-1"}"#;
    let schedule =
        r#"{"name": "locked-every-hour", "workflow": "locked-quick", "cron": "0 * * * *"}"#;
    let routes: [(&str, &str, Option<&str>, usize); 12] = [
        ("GET", "/v1/workflows", None, 1),
        ("GET", "/v1/workflows/locked-0", None, 1),
        ("GET", "/v1/dead-letters/edow.triggers/0/0", None, 1),
        (
            "POST",
            "/v1/workflows/locked-1/signals/nudge",
            Some("{}"),
            2,
        ),
        ("GET", "/v1/definitions", None, 1),
        ("GET", "/v1/schedules", None, 1),
        ("GET", "/v1/dead-letters", None, 1),
        ("POST", "/v1/workflows", Some(start), 2),
        ("POST", "/v1/workflows/locked-1/cancel", Some("{}"), 2),
        (
            "POST",
            "/v1/dead-letters/replay",
            Some(r#"{"topic": "edow.triggers", "reason": "none_such"}"#),
            2,
        ),
        ("POST", "/v1/schedules", Some(schedule), 3),
        ("DELETE", "/v1/schedules/locked-every-hour", None, 3),
    ];
    for (method, path, body, least) in routes {
        for (rank, caller) in [
            (0, &nobody),
            (0, &wrong),
            (1, &viewer),
            (2, &operator),
            (3, &admin),
        ] {
            let (status, answer) = caller.call(method, path, body).await;
            let expected_refusal = match rank {
                0 => Some(401),
                r if r < least => Some(403),
                _ => None,
            };
            match expected_refusal {
                Some(code) => {
                    assert_eq!(status, code, "{method} {path} as rank {rank}: {answer}");
                    assert_eq!(answer["error"]["field"], "Authorization", "{answer}");
                }
                // Let in: whatever the handler answers (a 404 for what does not exist), but no refusal.
                None => assert!(
                    ![401, 403].contains(&status),
                    "{method} {path} as rank {rank} was refused: {status} {answer}"
                ),
            }
        }
    }
    let (status, listed) = viewer.call("GET", "/v1/definitions", None).await;
    assert_eq!(status, 200);
    assert!(listed.to_string().contains("locked-quick"), "{listed}");

    // Signed hook: unsigned, wrongly signed and stale deliveries are refused; GitHub- and Stripe-style pass.
    let delivery = r#"{"order_id": "S-1"}"#;
    let (status, body) = hook(&base, "locked-signed", delivery, &[]).await;
    assert_eq!(
        (status, &body["error"]["field"]),
        (401, &json!("X-Hub-Signature-256")),
        "{body}"
    );
    let forged = github_signature("not-the-secret", delivery);
    assert_eq!(
        hook(
            &base,
            "locked-signed",
            delivery,
            &[("x-hub-signature-256", forged)]
        )
        .await
        .0,
        401
    );
    // A token does not stand in for a signature.
    assert_eq!(
        hook(
            &base,
            "locked-signed",
            delivery,
            &[(
                "authorization",
                format!("Bearer {}", admin.token.clone().unwrap())
            )]
        )
        .await
        .0,
        401
    );
    let signed = github_signature(HOOK_SECRET, delivery);
    let signed_only = [("x-hub-signature-256", signed.clone())];
    let (status, body) = hook(&base, "locked-signed", delivery, &signed_only).await;
    assert_eq!(
        (status, &body["id"]),
        (202, &json!("locked-signed:S-1")),
        "{body}"
    );
    // A replay with headers of its own (unsigned) is the same instance: nothing but the body chooses the id.
    let replay = [
        ("x-hub-signature-256", signed),
        ("idempotency-key", "replayed-1".to_string()),
    ];
    let (status, body) = hook(&base, "locked-signed", delivery, &replay).await;
    assert_eq!(
        (status, &body["id"]),
        (202, &json!("locked-signed:S-1")),
        "{body}"
    );
    let second = r#"{"order_id": "S-2"}"#;
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let (status, body) = hook(&base, "locked-signed", second, &stripe_signature(t, second)).await;
    assert_eq!(status, 202, "{body}");

    // Without hook.id, a signed delivery is named by its body: the sender's retry, signed again with a later
    // timestamp, is the same instance; a delivery signed ten minutes ago is refused.
    let order = r#"{"order": 42}"#;
    let (status, first) = hook(
        &base,
        "locked-noid",
        order,
        &stripe_signature(t - 20, order),
    )
    .await;
    assert_eq!(status, 202, "{first}");
    let (status, retry) = hook(&base, "locked-noid", order, &stripe_signature(t, order)).await;
    assert_eq!(status, 202, "{retry}");
    assert_eq!(first["id"], retry["id"]);
    assert!(
        first["id"]
            .as_str()
            .unwrap()
            .starts_with("locked-noid:body-"),
        "{first}"
    );
    let other = r#"{"order": 43}"#;
    let (status, different) = hook(&base, "locked-noid", other, &stripe_signature(t, other)).await;
    assert_eq!(status, 202, "{different}");
    assert_ne!(
        different["id"], first["id"],
        "another body is another delivery"
    );
    let (status, stale) = hook(
        &base,
        "locked-noid",
        order,
        &stripe_signature(t - 600, order),
    )
    .await;
    assert_eq!(
        (status, &stale["error"]["field"]),
        (401, &json!("Edow-Signature")),
        "{stale}"
    );

    // A hook without a secret takes an operator's token, and nothing less.
    let open = r#"{"order_id": "O-1"}"#;
    assert_eq!(hook(&base, "locked-open", open, &[]).await.0, 401);
    let as_viewer = [(
        "authorization",
        format!("Bearer {}", viewer.token.clone().unwrap()),
    )];
    assert_eq!(hook(&base, "locked-open", open, &as_viewer).await.0, 403);
    let as_operator = [(
        "authorization",
        format!("Bearer {}", operator.token.clone().unwrap()),
    )];
    assert_eq!(hook(&base, "locked-open", open, &as_operator).await.0, 202);
    // A hook name that tries to leave the secrets directory is a hook without a secret: an operator's token
    // passes it (to a 404, no such workflow), where a secret found would have asked for a signature (401).
    let (status, body) = hook(&base, "..%2Fhooks%2Flocked-signed", open, &as_operator).await;
    assert_eq!(
        (status, &body["error"]["field"]),
        (404, &json!("workflow")),
        "{body}"
    );

    // What was let in ran: the viewer sees them complete.
    for id in [
        "locked-1",
        "locked-signed:S-1",
        "locked-signed:S-2",
        "locked-open:O-1",
    ] {
        let path = format!("/v1/workflows/{}", id.replace(':', "%3A"));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (status, body) = viewer.call("GET", &path, None).await;
            // locked-1 may have been cancelled by the matrix before it completed.
            if status == 200 && (body["status"] == "Completed" || body["status"] == "Cancelled") {
                break;
            }
            assert!(Instant::now() < deadline, "{id}: {status} {body}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // A rotated token file takes effect without a restart: the viewer's token is revoked.
    std::fs::write(&tokens, format!("{operator_line}\n{admin_line}\n")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while viewer.call("GET", "/v1/workflows", None).await.0 != 401 {
        assert!(
            Instant::now() < deadline,
            "the revoked viewer token still works"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(admin.call("GET", "/v1/workflows", None).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unauthenticated_api_is_refused_beyond_loopback() {
    let cluster = Cluster::start();
    let addr = format!("0.0.0.0:{}", free_port());
    let mut orchestrator = cluster.orchestrator_with(&["--http-addr", &addr]);
    let log = log_after_exit(&mut orchestrator).await;
    assert!(
        log.contains("refusing to serve the API on 0.0.0.0") && log.contains("--api-tokens"),
        "{log}"
    );
    // A bad token file is refused at start too, naming the line.
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "admin my-plain-token\n").unwrap();
    let local = format!("127.0.0.1:{}", free_port());
    let mut orchestrator = cluster.orchestrator_with(&[
        "--http-addr",
        &local,
        "--api-tokens",
        tokens.to_str().unwrap(),
    ]);
    let log = log_after_exit(&mut orchestrator).await;
    assert!(log.contains("line 1") && log.contains("SHA-256"), "{log}");
}

/// A client presenting `identity` (a certificate and its key), trusting `ca`.
fn tls_client(
    ca: &std::path::Path,
    identity: Option<(&std::path::Path, &std::path::Path)>,
) -> reqwest::Client {
    let mut builder = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(10))
        .add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(ca).unwrap()).unwrap());
    if let Some((cert, key)) = identity {
        let identity = reqwest::Identity::from_pkcs8_pem(
            &std::fs::read(cert).unwrap(),
            &std::fs::read(key).unwrap(),
        )
        .unwrap();
        builder = builder.identity(identity);
    }
    builder.build().unwrap()
}

async fn call_tls(
    client: &reqwest::Client,
    method: &str,
    url: &str,
    body: Option<&str>,
) -> (u16, Value) {
    let request = match method {
        "GET" => client.get(url),
        "POST" => client.post(url),
        other => panic!("{other}"),
    };
    let request = match body {
        Some(body) if body.starts_with('{') => request
            .header("content-type", "application/json")
            .body(body.to_string()),
        Some(body) => request
            .header("content-type", "application/yaml")
            .body(body.to_string()),
        None => request,
    };
    let response = request
        .send()
        .await
        .unwrap_or_else(|e| panic!("{method} {url}: {e:?}"));
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// mTLS: the listener serves https and takes only clients whose certificate its client CA signed, on a
/// non-loopback address without tokens (the certificates authenticate); a certificate's `O=` is its role.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_authenticate_by_their_role() {
    let cluster = Cluster::start();
    let dir = tempfile::tempdir().unwrap();
    let ca = edow_testkit::TestCa::new(dir.path(), "edow");
    let (server_cert, server_key) = ca.issue("server", "/CN=orchestrator");
    let (dash, dash_key) = ca.issue("dash", "/CN=dash/O=viewer");
    let (ops, ops_key) = ca.issue("ops", "/CN=ops/O=Acme/O=operator");
    let (deployer, deployer_key) = ca.issue("deployer", "/CN=deployer/O=admin");
    let (stranger, stranger_key) = ca.issue("stranger", "/CN=stranger/O=Acme");
    let rogue = edow_testkit::TestCa::new(dir.path(), "rogue");
    let (mallory, mallory_key) = rogue.issue("mallory", "/CN=mallory/O=admin");

    let port = free_port();
    let _orchestrator = cluster.orchestrator_with(&[
        "--http-addr",
        &format!("0.0.0.0:{port}"),
        "--http-tls-cert",
        server_cert.to_str().unwrap(),
        "--http-tls-key",
        server_key.to_str().unwrap(),
        "--http-tls-client-ca",
        ca.cert.to_str().unwrap(),
    ]);
    cluster.wait_for_topics();
    let _worker = cluster.worker("locked", &["locked.echo=echo"], 4);
    let base = format!("https://127.0.0.1:{port}");
    let as_who =
        |cert: &std::path::Path, key: &std::path::Path| tls_client(&ca.cert, Some((cert, key)));
    let (viewer, operator, admin, nobody) = (
        as_who(&dash, &dash_key),
        as_who(&ops, &ops_key),
        as_who(&deployer, &deployer_key),
        as_who(&stranger, &stranger_key),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(response) = viewer.get(format!("{base}/readyz")).send().await {
            if response.status() == 200 {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the https listener never became ready"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // No certificate, one of another CA, or plain http: no connection at all, not even to the probes.
    for (what, client) in [
        ("no certificate", tls_client(&ca.cert, None)),
        (
            "another CA's certificate",
            tls_client(&ca.cert, Some((&mallory, &mallory_key))),
        ),
    ] {
        let refused = client.get(format!("{base}/healthz")).send().await;
        assert!(refused.is_err(), "{what}: {refused:?}");
    }
    let plain = http_client()
        .get(format!("http://127.0.0.1:{port}/healthz"))
        .send()
        .await;
    assert!(
        plain.map_or(true, |r| r.status() != 200),
        "plain http is served"
    );

    // A verified certificate without a role is authenticated but allowed nothing.
    let (status, body) = call_tls(&nobody, "GET", &format!("{base}/v1/workflows"), None).await;
    assert_eq!(
        (status, &body["error"]["field"]),
        (403, &json!("certificate")),
        "{body}"
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("CN=stranger"),
        "{body}"
    );

    // The role matrix by certificate.
    let definitions = format!("{base}/v1/definitions");
    assert_eq!(
        call_tls(&viewer, "GET", &format!("{base}/v1/workflows"), None)
            .await
            .0,
        200
    );
    assert_eq!(
        call_tls(&operator, "POST", &definitions, Some(QUICK))
            .await
            .0,
        403
    );
    let (status, body) = call_tls(&admin, "POST", &definitions, Some(QUICK)).await;
    assert_eq!(status, 201, "{body}");
    let start = r#"{"name": "locked-quick", "id": "mtls-1"}"#;
    let workflows = format!("{base}/v1/workflows");
    assert_eq!(
        call_tls(&viewer, "POST", &workflows, Some(start)).await.0,
        403
    );
    let (status, body) = call_tls(&operator, "POST", &workflows, Some(start)).await;
    assert_eq!(status, 202, "{body}");
    // A hook without a secret takes an operator's certificate.
    let hook = format!("{base}/v1/hooks/locked-quick");
    assert_eq!(
        call_tls(&viewer, "POST", &hook, Some(r#"{"n": 1}"#))
            .await
            .0,
        403
    );
    assert_eq!(
        call_tls(&operator, "POST", &hook, Some(r#"{"n": 1}"#))
            .await
            .0,
        202
    );

    // What the operator started runs to the end, read back over the same listener.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = call_tls(&viewer, "GET", &format!("{workflows}/mtls-1"), None).await;
        if status == 200 && body["status"] == "Completed" {
            break;
        }
        assert!(Instant::now() < deadline, "mtls-1 did not complete: {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
