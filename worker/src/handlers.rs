//! Task handlers: the [`Handler`] trait a Rust user implements, and the built-ins usable without writing Rust —
//! `echo`, `sleep`, `fail` and `trail` for tests and demos, `http` (POST the input to a URL) and `exec` (run a
//! command with JSON on stdin and stdout).

use std::future::Future;
use std::pin::Pin;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

/// A task as a handler sees it.
#[derive(Debug, Clone)]
pub struct Task {
    /// Deterministic per attempt; use it as the idempotency key of side effects.
    pub task_id: String,
    pub workflow_id: String,
    pub step: String,
    pub task_type: String,
    pub attempt: u32,
    pub input: Value,
}

/// Why a task failed; `retryable` says whether another attempt may succeed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandlerError {
    pub code: String,
    pub message: String,
    pub retryable: bool,
}

impl HandlerError {
    pub fn retryable(code: impl Into<String>, message: impl Into<String>) -> HandlerError {
        HandlerError {
            code: code.into(),
            message: message.into(),
            retryable: true,
        }
    }

    pub fn permanent(code: impl Into<String>, message: impl Into<String>) -> HandlerError {
        HandlerError {
            code: code.into(),
            message: message.into(),
            retryable: false,
        }
    }
}

pub type HandlerFuture = Pin<Box<dyn Future<Output = Result<Value, HandlerError>> + Send>>;

/// Runs tasks of one type. The output becomes the next step's input.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, task: Task) -> HandlerFuture;
}

/// Returns the input unchanged.
pub struct Echo;

impl Handler for Echo {
    fn handle(&self, task: Task) -> HandlerFuture {
        Box::pin(async move { Ok(task.input) })
    }
}

/// Waits, then returns the input unchanged.
pub struct Sleep(pub Duration);

impl Handler for Sleep {
    fn handle(&self, task: Task) -> HandlerFuture {
        let delay = self.0;
        Box::pin(async move {
            tokio::time::sleep(delay).await;
            Ok(task.input)
        })
    }
}

/// Fails the first `times` attempts of every task with a retryable error, then echoes; `None` fails always.
pub struct Fail {
    pub times: Option<u32>,
}

impl Handler for Fail {
    fn handle(&self, task: Task) -> HandlerFuture {
        let fails = self.times.is_none_or(|n| task.attempt <= n);
        Box::pin(async move {
            if fails {
                Err(HandlerError::retryable(
                    "injected_failure",
                    format!(
                        "fail handler: attempt {} of {} fails by design",
                        task.attempt, task.task_id
                    ),
                ))
            } else {
                Ok(task.input)
            }
        })
    }
}

/// Appends `{task_type, step, attempt}` to the input's `trail` array: shows data flowing through steps.
pub struct Trail;

impl Handler for Trail {
    fn handle(&self, task: Task) -> HandlerFuture {
        Box::pin(async move {
            let mut output = match task.input {
                Value::Object(map) => map,
                other => serde_json::Map::from_iter([("input".to_string(), other)]),
            };
            let entry =
                json!({"task_type": task.task_type, "step": task.step, "attempt": task.attempt});
            match output.get_mut("trail") {
                Some(Value::Array(trail)) => trail.push(entry),
                _ => {
                    output.insert("trail".into(), json!([entry]));
                }
            }
            Ok(Value::Object(output))
        })
    }
}

/// POSTs the input as JSON; a 2xx body is the output. 5xx, timeouts and connection errors are retryable,
/// 4xx are not.
pub struct Http {
    pub url: String,
    pub client: reqwest::Client,
}

impl Http {
    pub fn new(url: &str, timeout: Duration) -> anyhow::Result<Http> {
        Ok(Http {
            url: url.to_string(),
            client: reqwest::Client::builder().timeout(timeout).build()?,
        })
    }
}

impl Handler for Http {
    fn handle(&self, task: Task) -> HandlerFuture {
        let request = self
            .client
            .post(&self.url)
            .header("idempotency-key", task.task_id.clone())
            .header("content-type", "application/json")
            .body(task.input.to_string());
        let url = self.url.clone();
        Box::pin(async move {
            let response = request.send().await.map_err(|e| {
                let code = if e.is_timeout() {
                    "timeout"
                } else {
                    "unreachable"
                };
                HandlerError::retryable(code, format!("POST {url}: {e}"))
            })?;
            let status = response.status();
            let body = response.text().await.map_err(|e| {
                HandlerError::retryable("unreadable_response", format!("POST {url}: {e}"))
            })?;
            if status.is_success() {
                if body.trim().is_empty() {
                    return Ok(Value::Null);
                }
                serde_json::from_str(&body).map_err(|e| {
                    HandlerError::permanent(
                        "invalid_output",
                        format!("POST {url} answered {status} with a body that is not JSON: {e}"),
                    )
                })
            } else {
                let code = format!("http_{}", status.as_u16());
                let message = format!("POST {url} answered {status}: {}", truncate(&body, 500));
                if status.is_server_error() || status.as_u16() == 429 || status.as_u16() == 408 {
                    Err(HandlerError::retryable(code, message))
                } else {
                    Err(HandlerError::permanent(code, message))
                }
            }
        })
    }
}

/// Runs a command with the input as JSON on stdin; its stdout, JSON, is the output. A non-zero exit is a
/// retryable failure with code `exit_<status>` (a step's retry policy may list codes never to retry).
pub struct Exec {
    pub program: String,
    pub args: Vec<String>,
}

impl Handler for Exec {
    fn handle(&self, task: Task) -> HandlerFuture {
        let mut command = tokio::process::Command::new(&self.program);
        command
            .args(&self.args)
            .env("EDOW_TASK_ID", &task.task_id)
            .env("EDOW_WORKFLOW_ID", &task.workflow_id)
            .env("EDOW_STEP", &task.step)
            .env("EDOW_ATTEMPT", task.attempt.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let program = self.program.clone();
        Box::pin(async move {
            let mut child = command.spawn().map_err(|e| {
                HandlerError::permanent("exec_failed", format!("starting {program}: {e}"))
            })?;
            if let Some(mut stdin) = child.stdin.take() {
                // A command that does not read its input is fine: ignore a closed pipe.
                let _ = stdin.write_all(task.input.to_string().as_bytes()).await;
            }
            let output = child.wait_with_output().await.map_err(|e| {
                HandlerError::retryable("exec_failed", format!("running {program}: {e}"))
            })?;
            if !output.status.success() {
                let code = output
                    .status
                    .code()
                    .map_or("killed".to_string(), |c| format!("exit_{c}"));
                let stderr = String::from_utf8_lossy(&output.stderr);
                return Err(HandlerError::retryable(
                    code,
                    format!("{program} failed: {}", truncate(stderr.trim(), 500)),
                ));
            }
            let stdout = String::from_utf8_lossy(&output.stdout);
            if stdout.trim().is_empty() {
                return Ok(Value::Null);
            }
            serde_json::from_str(&stdout).map_err(|e| {
                HandlerError::permanent(
                    "invalid_output",
                    format!("{program} printed something that is not JSON: {e}"),
                )
            })
        })
    }
}

fn truncate(text: &str, max: usize) -> &str {
    match text.char_indices().nth(max) {
        Some((i, _)) => &text[..i],
        None => text,
    }
}

/// Builds a built-in handler from its spec: `echo`, `trail`, `sleep:200ms`, `fail:2`, `fail:always`,
/// `http:URL`, `exec:PROGRAM ARGS...`.
pub fn builtin(spec: &str, http_timeout: Duration) -> anyhow::Result<Arc<dyn Handler>> {
    let (name, arg) = match spec.split_once(':') {
        Some((name, arg)) => (name, Some(arg)),
        None => (spec, None),
    };
    let handler: Arc<dyn Handler> = match (name, arg) {
        ("echo", None) => Arc::new(Echo),
        ("trail", None) => Arc::new(Trail),
        ("sleep", Some(d)) => Arc::new(Sleep(
            humantime::parse_duration(d).map_err(|e| anyhow::anyhow!("sleep:{d}: {e} (write e.g. sleep:200ms)"))?,
        )),
        ("fail", Some("always")) => Arc::new(Fail { times: None }),
        ("fail", Some(n)) => Arc::new(Fail {
            times: Some(n.parse().map_err(|_| anyhow::anyhow!("fail:{n}: write fail:N (fail N attempts) or fail:always"))?),
        }),
        ("http", Some(url)) if url.starts_with("http://") || url.starts_with("https://") => {
            Arc::new(Http::new(url, http_timeout)?)
        }
        ("exec", Some(command)) if !command.trim().is_empty() => {
            let mut words = command.split_whitespace().map(str::to_string);
            let program = words.next().expect("checked non-empty");
            Arc::new(Exec { program, args: words.collect() })
        }
        _ => anyhow::bail!(
            "unknown handler '{spec}': use echo, trail, sleep:DURATION, fail:N, fail:always, http:URL or exec:COMMAND"
        ),
    };
    Ok(handler)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(attempt: u32, input: Value) -> Task {
        Task {
            task_id: format!("w/s/{attempt}"),
            workflow_id: "w".into(),
            step: "s".into(),
            task_type: "t".into(),
            attempt,
            input,
        }
    }

    #[tokio::test]
    async fn fail_fails_the_first_attempts_then_echoes() {
        let h = builtin("fail:2", Duration::from_secs(1)).unwrap();
        assert!(h.handle(task(1, json!(1))).await.unwrap_err().retryable);
        assert!(h.handle(task(2, json!(1))).await.is_err());
        assert_eq!(h.handle(task(3, json!(1))).await.unwrap(), json!(1));
        let always = builtin("fail:always", Duration::from_secs(1)).unwrap();
        assert!(always.handle(task(9, json!(1))).await.is_err());
    }

    #[tokio::test]
    async fn trail_appends_to_the_input() {
        let h = builtin("trail", Duration::from_secs(1)).unwrap();
        let out = h.handle(task(1, json!({"order": 1}))).await.unwrap();
        let out = h.handle(task(2, out)).await.unwrap();
        assert_eq!(out["order"], 1);
        assert_eq!(out["trail"].as_array().unwrap().len(), 2);
        assert_eq!(out["trail"][1]["attempt"], 2);
    }

    #[tokio::test]
    async fn exec_pipes_json_and_reports_exit_codes() {
        let cat = builtin("exec:cat", Duration::from_secs(1)).unwrap();
        assert_eq!(
            cat.handle(task(1, json!({"a": [1, 2]}))).await.unwrap(),
            json!({"a": [1, 2]})
        );
        let failing =
            builtin("exec:sh -c exit_3_is_not_a_command", Duration::from_secs(1)).unwrap();
        let err = failing.handle(task(1, json!(null))).await.unwrap_err();
        assert_eq!(err.code, "exit_127");
        let not_json = builtin("exec:echo hello", Duration::from_secs(1)).unwrap();
        let err = not_json.handle(task(1, json!(null))).await.unwrap_err();
        assert_eq!(
            (err.code.as_str(), err.retryable),
            ("invalid_output", false)
        );
    }

    #[tokio::test]
    async fn http_maps_statuses_to_retryable_or_not() {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        tokio::spawn(async move {
            for status in ["200 OK", "503 Service Unavailable", "400 Bad Request"] {
                let (mut socket, _) = listener.accept().await.unwrap();
                let mut buf = vec![0u8; 4096];
                let _ = socket.read(&mut buf).await;
                let body = r#"{"ok":true}"#;
                let response = format!(
                    "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                socket.write_all(response.as_bytes()).await.unwrap();
            }
        });
        let h = Http {
            url: url.clone(),
            client: reqwest::Client::builder().no_proxy().build().unwrap(),
        };
        assert_eq!(
            h.handle(task(1, json!(1))).await.unwrap(),
            json!({"ok": true})
        );
        let err = h.handle(task(1, json!(1))).await.unwrap_err();
        assert_eq!((err.code.as_str(), err.retryable), ("http_503", true));
        let err = h.handle(task(1, json!(1))).await.unwrap_err();
        assert_eq!((err.code.as_str(), err.retryable), ("http_400", false));
    }

    #[test]
    fn bad_specs_say_what_is_allowed() {
        let err = builtin("teleport", Duration::from_secs(1))
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("echo") && err.contains("exec:COMMAND"),
            "{err}"
        );
        assert!(builtin("sleep:soon", Duration::from_secs(1)).is_err());
        assert!(builtin("http:ftp://x", Duration::from_secs(1)).is_err());
    }
}
