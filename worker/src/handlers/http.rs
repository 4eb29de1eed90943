//! The `http` handler: POSTs the task's input as JSON and takes a 2xx body as the output. It reads at most the
//! output limit plus one chunk of a body (nothing at all when `content-length` already says it is too large).

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
}

impl Http {
    pub fn new(url: &str, limits: &HandlerLimits) -> anyhow::Result<Http> {
        Ok(Http {
            url: url.to_string(),
            client: reqwest::Client::builder().timeout(limits.timeout).build()?,
            max_output_bytes: limits.max_output_bytes,
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
        Box::pin(async move {
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
        }
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
