//! The S3 backend against a real S3-compatible server (moto's, started here on a free port; installed by
//! `scripts/install-s3`): values go by reference and come back, a reference is refused to another workflow, and
//! purging deletes only the purged workflow's objects.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

/// The server, stopped by its pid when the test ends, passed or failed.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn server_bin() -> String {
    std::env::var("EDOW_S3_SERVER_BIN").unwrap_or_else(|_| {
        let cache = std::env::var("EDOW_CACHE_DIR").unwrap_or_else(|_| {
            format!("{}/.cache/edow", std::env::var("HOME").unwrap_or_default())
        });
        let bin = format!("{cache}/moto-5.2.5/bin/moto_server");
        assert!(
            std::path::Path::new(&bin).exists(),
            "no S3 test server: run scripts/install-s3 (or set EDOW_S3_SERVER_BIN)"
        );
        bin
    })
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn start_server() -> (Server, String) {
    let port = free_port();
    let child = Command::new(server_bin())
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting moto_server");
    let server = Server(child);
    let endpoint = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(60);
    // Creating the bucket is the readiness check (moto takes any credentials).
    loop {
        match reqwest::Client::new()
            .put(format!("{endpoint}/edow-test"))
            .send()
            .await
        {
            Ok(response) if response.status().is_success() => break,
            _ if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(200)).await,
            other => panic!("the S3 server did not come up at {endpoint}: {other:?}"),
        }
    }
    (server, endpoint)
}

#[tokio::test]
async fn values_go_to_s3_by_reference_and_are_purged() {
    let (_server, endpoint) = start_server().await;
    // The standard variables, as an operator sets them; the setting itself names only the bucket and prefix.
    std::env::set_var("AWS_ENDPOINT", &endpoint);
    std::env::set_var("AWS_ALLOW_HTTP", "true");
    std::env::set_var("AWS_REGION", "us-east-1");
    std::env::set_var("AWS_ACCESS_KEY_ID", "edow-test");
    std::env::set_var("AWS_SECRET_ACCESS_KEY", "edow-test-secret");
    let blobs = edow_blobs::store::open("s3://edow-test/edow/blobs", 1024, 16 << 20).unwrap();

    let value = json!({"status": "ok", "document": "d".repeat(3_000_000)});
    let stored = blobs.offload("wf-s3", value.clone()).await.unwrap();
    assert_eq!(stored["status"], "ok");
    assert!(edow_blobs::is_reference(&stored["document"]), "{stored}");
    let other = blobs
        .offload("wf-other", json!("o".repeat(5000)))
        .await
        .unwrap();
    assert_eq!(blobs.resolve("wf-s3", stored.clone()).await.unwrap(), value);
    let foreign = blobs.resolve("wf-other", stored.clone()).await.unwrap_err();
    assert!(
        foreign.to_string().contains("another workflow"),
        "{foreign}"
    );

    // The object sits under the prefix, as the bucket's own listing shows.
    let listing = reqwest::get(format!(
        "{endpoint}/edow-test?list-type=2&prefix=edow/blobs/"
    ))
    .await
    .unwrap()
    .text()
    .await
    .unwrap();
    assert_eq!(listing.matches("<Key>").count(), 2, "{listing}");

    assert_eq!(blobs.purge("wf-s3").await.unwrap(), 1);
    let gone = blobs.resolve("wf-s3", stored).await.unwrap_err();
    assert!(gone.to_string().contains("purged"), "{gone}");
    assert_eq!(
        blobs.resolve("wf-other", other).await.unwrap(),
        json!("o".repeat(5000)),
        "another workflow's blobs stay"
    );
}
