//! The `http` handler: POSTs the task's input as JSON and takes a 2xx body as the output. It reads at most the
//! output limit plus one chunk of a body (nothing at all when `content-length` already says it is too large).
//! Headers a downstream needs (an `Authorization`, an API key) come from a file or a variable, read for every
//! request so a rotated secret takes effect at once; they are marked sensitive and never logged.

use serde_json::Value;

use super::{
    output_too_large, truncate, Handler, HandlerError, HandlerFuture, HandlerLimits, Task,
};

/// Bytes of an error response's body kept for the failure message.
const ERROR_BODY_KEPT: usize = 4096;

/// POSTs the input as JSON; a 2xx body is the output. 5xx, 408, 429, timeouts and connection errors are
/// retryable, other 4xx are not, and so is a body over the output limit.
pub struct Http {
    pub url: String,
    pub client: reqwest::Client,
    pub max_output_bytes: usize,
    pub headers: Vec<SecretHeader>,
}

/// A header whose value is a secret, sent with every request.
#[derive(Debug, Clone)]
pub struct SecretHeader {
    pub name: reqwest::header::HeaderName,
    pub source: SecretSource,
}

/// Where a secret is read from: never the command line, where every local user sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    Env(String),
    File(std::path::PathBuf),
}

/// Largest secret read from a file.
const MAX_SECRET_BYTES: u64 = 16 * 1024;

impl SecretHeader {
    /// `NAME=env:VARIABLE` or `NAME=file:PATH`.
    pub fn parse(spec: &str) -> anyhow::Result<SecretHeader> {
        let (name, source) = spec.split_once('=').ok_or_else(|| {
            anyhow::anyhow!("write NAME=env:VARIABLE or NAME=file:PATH, e.g. Authorization=file:/etc/edow/token")
        })?;
        let name = reqwest::header::HeaderName::from_bytes(name.trim().as_bytes())
            .map_err(|_| anyhow::anyhow!("'{}' is not a header name", name.trim()))?;
        let source = match source.split_once(':') {
            Some(("env", var)) if !var.is_empty() => SecretSource::Env(var.to_string()),
            Some(("file", path)) if !path.is_empty() => SecretSource::File(path.into()),
            _ => anyhow::bail!(
                "the value of {name} comes from env:VARIABLE or file:PATH, never from the flag itself (every local \
                 user can read a process's flags)"
            ),
        };
        Ok(SecretHeader { name, source })
    }

    /// The value now, marked sensitive; a retryable failure naming where it should be, never what it is.
    async fn value(&self) -> Result<reqwest::header::HeaderValue, HandlerError> {
        let unavailable = |why: String| {
            HandlerError::retryable("secret_unavailable", format!("header {}: {why}", self.name))
        };
        let text = match &self.source {
            SecretSource::Env(var) => std::env::var(var)
                .map_err(|_| unavailable(format!("the variable {var} is not set")))?,
            SecretSource::File(path) => {
                use tokio::io::AsyncReadExt;
                let file = tokio::fs::File::open(path)
                    .await
                    .map_err(|e| unavailable(format!("reading {}: {e}", path.display())))?;
                let mut bytes = Vec::new();
                file.take(MAX_SECRET_BYTES + 1)
                    .read_to_end(&mut bytes)
                    .await
                    .map_err(|e| unavailable(format!("reading {}: {e}", path.display())))?;
                if bytes.len() as u64 > MAX_SECRET_BYTES {
                    return Err(unavailable(format!(
                        "{} is over {MAX_SECRET_BYTES} bytes",
                        path.display()
                    )));
                }
                String::from_utf8(bytes)
                    .map_err(|_| unavailable(format!("{} is not UTF-8", path.display())))?
            }
        };
        let mut value = reqwest::header::HeaderValue::from_str(text.trim())
            .map_err(|_| unavailable("the secret is not a valid header value".into()))?;
        value.set_sensitive(true);
        Ok(value)
    }
}

impl Http {
    pub fn new(
        url: &str,
        limits: &HandlerLimits,
        headers: Vec<SecretHeader>,
    ) -> anyhow::Result<Http> {
        let mut client = reqwest::Client::builder().timeout(limits.timeout);
        if !headers.is_empty() {
            // A redirect elsewhere would carry the secret headers there (reqwest strips only Authorization).
            client = client.redirect(reqwest::redirect::Policy::none());
        }
        Ok(Http {
            url: url.to_string(),
            client: client.build()?,
            max_output_bytes: limits.max_output_bytes,
            headers,
        })
    }
}

/// Reads a body up to `limit` bytes; `Err(read)` as soon as it is longer (`read` bytes were taken, over `limit`).
async fn read_capped(
    response: &mut reqwest::Response,
    limit: usize,
) -> Result<Result<Vec<u8>, usize>, reqwest::Error> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        if body.len() + chunk.len() > limit {
            return Ok(Err(body.len() + chunk.len()));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Ok(body))
}

impl Handler for Http {
    fn handle(&self, task: Task) -> HandlerFuture {
        let mut request = self
            .client
            .post(&self.url)
            .header("idempotency-key", task.task_id.clone())
            .header("content-type", "application/json")
            .body(task.input.to_string());
        // The service called continues the workflow's trace below the worker's span.
        for (name, value) in task.trace.iter().flat_map(|t| t.headers()) {
            request = request.header(name, value);
        }
        let url = self.url.clone();
        let limit = self.max_output_bytes;
        let secrets = self.headers.clone();
        Box::pin(async move {
            for secret in &secrets {
                request = request.header(secret.name.clone(), secret.value().await?);
            }
            let unreadable = |e: reqwest::Error| {
                let code = if e.is_timeout() {
                    "timeout"
                } else {
                    "unreadable_response"
                };
                HandlerError::retryable(code, format!("POST {url}: {e}"))
            };
            let mut response = request.send().await.map_err(|e| {
                let code = if e.is_timeout() {
                    "timeout"
                } else {
                    "unreachable"
                };
                HandlerError::retryable(code, format!("POST {url}: {e}"))
            })?;
            let status = response.status();
            if !status.is_success() {
                let head = match read_capped(&mut response, ERROR_BODY_KEPT).await {
                    Ok(Ok(body)) => String::from_utf8_lossy(&body).into_owned(),
                    Ok(Err(_)) => "(a body over 4 KiB)".to_string(),
                    Err(e) => format!("(body unreadable: {e})"),
                };
                let code = format!("http_{}", status.as_u16());
                let message = format!("POST {url} answered {status}: {}", truncate(&head, 500));
                return if status.is_server_error()
                    || status.as_u16() == 429
                    || status.as_u16() == 408
                {
                    Err(HandlerError::retryable(code, message))
                } else {
                    Err(HandlerError::permanent(code, message))
                };
            }
            if let Some(length) = response.content_length().filter(|n| *n > limit as u64) {
                return Err(output_too_large(
                    format_args!("POST {url} answered {status} with a body of {length} bytes"),
                    limit,
                ));
            }
            let body = match read_capped(&mut response, limit)
                .await
                .map_err(unreadable)?
            {
                Ok(body) => body,
                Err(read) => {
                    return Err(output_too_large(
                        format_args!(
                            "POST {url} answered {status} with a body of over {read} bytes"
                        ),
                        limit,
                    ))
                }
            };
            if body.iter().all(u8::is_ascii_whitespace) {
                return Ok(Value::Null);
            }
            serde_json::from_slice(&body).map_err(|e| {
                HandlerError::permanent(
                    "invalid_output",
                    format!("POST {url} answered {status} with a body that is not JSON: {e}"),
                )
            })
        })
    }
}

/// For tests: a server answering each connection in turn with one of `responses` (status line, body).
#[cfg(test)]
pub(crate) async fn serve(responses: Vec<(&'static str, String)>, chunked: bool) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/", listener.local_addr().unwrap());
    tokio::spawn(async move {
        for (status, body) in responses {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let _ = socket.read(&mut buf).await;
            let head = if chunked {
                format!(
                    "HTTP/1.1 {status}\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
                )
            } else {
                format!(
                    "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                )
            };
            let _ = socket.write_all(head.as_bytes()).await;
            if chunked {
                for piece in body.as_bytes().chunks(16 * 1024) {
                    let _ = socket
                        .write_all(format!("{:x}\r\n", piece.len()).as_bytes())
                        .await;
                    let _ = socket.write_all(piece).await;
                    let _ = socket.write_all(b"\r\n").await;
                }
                let _ = socket.write_all(b"0\r\n\r\n").await;
            } else {
                let _ = socket.write_all(body.as_bytes()).await;
            }
        }
    });
    url
}

/// A server answering `count` requests with `{}` and keeping each request's head, for tests.
#[cfg(test)]
async fn serve_capturing(count: usize) -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/", listener.local_addr().unwrap());
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let keep = seen.clone();
    tokio::spawn(async move {
        for _ in 0..count {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            let mut buf = vec![0u8; 8192];
            let n = socket.read(&mut buf).await.unwrap_or(0);
            keep.lock()
                .unwrap()
                .push(String::from_utf8_lossy(&buf[..n]).into_owned());
            let _ = socket
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}")
                .await;
        }
    });
    (url, seen)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handlers::tests::task;
    use serde_json::json;
    use std::time::Duration;

    fn handler(url: &str, max_output_bytes: usize) -> Http {
        Http {
            url: url.to_string(),
            client: reqwest::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap(),
            max_output_bytes,
            headers: Vec::new(),
        }
    }

    #[tokio::test]
    async fn secret_headers_come_from_files_and_variables_and_are_read_each_time() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "Bearer first\n").unwrap();
        std::env::set_var("EDOW_TEST_API_KEY", "key-1");
        let (url, requests) = serve_capturing(3).await;
        let mut h = handler(&url, 1024);
        h.headers = vec![
            SecretHeader::parse(&format!("Authorization=file:{}", token.display())).unwrap(),
            SecretHeader::parse("X-Api-Key=env:EDOW_TEST_API_KEY").unwrap(),
        ];
        h.handle(task(1, json!(1))).await.unwrap();
        std::fs::write(&token, "Bearer rotated").unwrap();
        h.handle(task(2, json!(1))).await.unwrap();
        let seen = requests.lock().unwrap().clone();
        assert!(
            seen[0].contains("authorization: Bearer first\r\n"),
            "{}",
            seen[0]
        );
        assert!(seen[0].contains("x-api-key: key-1\r\n"), "{}", seen[0]);
        assert!(
            seen[1].contains("authorization: Bearer rotated\r\n"),
            "{}",
            seen[1]
        );
        // A secret gone missing fails the attempt (retryable), naming the source and not a value.
        std::fs::remove_file(&token).unwrap();
        let err = h.handle(task(3, json!(1))).await.unwrap_err();
        assert_eq!(
            (err.code.as_str(), err.retryable),
            ("secret_unavailable", true)
        );
        assert!(
            err.message.contains("token") && !err.message.contains("rotated"),
            "{}",
            err.message
        );
        // A literal value on the flag is refused.
        let err = SecretHeader::parse("Authorization=Bearer abc")
            .unwrap_err()
            .to_string();
        assert!(err.contains("env:VARIABLE or file:PATH"), "{err}");
        assert!(!format!("{:?}", h.headers).contains("rotated"));
    }

    #[tokio::test]
    async fn http_maps_statuses_to_retryable_or_not() {
        let ok = r#"{"ok":true}"#.to_string();
        let url = serve(
            vec![
                ("200 OK", ok.clone()),
                ("503 Service Unavailable", ok.clone()),
                ("400 Bad Request", ok),
            ],
            false,
        )
        .await;
        let h = handler(&url, 1024);
        assert_eq!(
            h.handle(task(1, json!(1))).await.unwrap(),
            json!({"ok": true})
        );
        let err = h.handle(task(1, json!(1))).await.unwrap_err();
        assert_eq!((err.code.as_str(), err.retryable), ("http_503", true));
        let err = h.handle(task(1, json!(1))).await.unwrap_err();
        assert_eq!((err.code.as_str(), err.retryable), ("http_400", false));
    }

    #[tokio::test]
    async fn a_body_over_the_output_limit_fails_without_retry() {
        let big = format!("\"{}\"", "x".repeat(2_000_000));
        let url = serve(vec![("200 OK", big.clone())], false).await;
        let h = handler(&url, 64 * 1024);
        let err = h.handle(task(1, json!(1))).await.unwrap_err();
        assert_eq!(
            (err.code.as_str(), err.retryable),
            ("output_too_large", false)
        );
        assert!(
            err.message.contains("2000002 bytes") && err.message.contains("65536 bytes"),
            "content-length names the size: {}",
            err.message
        );
        // Without a content-length the body is read in chunks, and no further than the limit.
        let url = serve(vec![("200 OK", big)], true).await;
        let h = handler(&url, 64 * 1024);
        let err = h.handle(task(1, json!(1))).await.unwrap_err();
        assert_eq!(err.code, "output_too_large", "{}", err.message);
        assert!(err.message.contains("65536 bytes"), "{}", err.message);
    }
}
