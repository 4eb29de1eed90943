//! Task handlers: the [`Handler`] trait a Rust user implements, and the built-ins usable without writing Rust —
//! `echo`, `sleep`, `fail` and `trail` for tests and demos, `http` (POST the input to a URL, [`http`]) and `exec`
//! (run a command with JSON on stdin and stdout, [`exec`]). Also the output limit every handler is held to.

mod exec;
mod http;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

pub use exec::Exec;
pub use http::{Http, SecretHeader, SecretSource};

/// Default bound of a task's output: 256 KiB of JSON.
pub const DEFAULT_MAX_OUTPUT_BYTES: usize = 256 * 1024;

/// What the built-in handlers are held to.
#[derive(Debug, Clone, Copy)]
pub struct HandlerLimits {
    /// `http` requests and `exec` commands running longer fail with the retryable code `timeout`.
    pub timeout: Duration,
    /// Largest output, in bytes of JSON; `http` and `exec` stop reading past it.
    pub max_output_bytes: usize,
}

impl Default for HandlerLimits {
    fn default() -> Self {
        HandlerLimits {
            timeout: Duration::from_secs(300),
            max_output_bytes: DEFAULT_MAX_OUTPUT_BYTES,
        }
    }
}

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
    /// The worker's `process` span for this task: what a handler calling out passes on (`traceparent`).
    pub trace: Option<edow_telemetry::trace::TraceContext>,
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

/// The failure of an output over the limit: not retryable (the same input gives the same output).
pub fn output_too_large(what: impl std::fmt::Display, limit: usize) -> HandlerError {
    HandlerError::permanent(
        "output_too_large",
        format!("{what}, over the output limit of {limit} bytes (worker --max-output-bytes)"),
    )
}

/// `output` as JSON text, or `output_too_large` when it is longer than `limit` bytes.
pub fn encode_output(output: &Value, limit: usize) -> Result<String, HandlerError> {
    let text = output.to_string();
    if text.len() > limit {
        return Err(output_too_large(
            format_args!("the handler's output is {} bytes of JSON", text.len()),
            limit,
        ));
    }
    Ok(text)
}

/// Aborts a spawned task when dropped (e.g. when the future that spawned it is dropped on a timeout).
pub(crate) struct AbortOnDrop<T>(pub tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The first `max` characters of `text`.
pub(crate) fn truncate(text: &str, max: usize) -> &str {
    match text.char_indices().nth(max) {
        Some((i, _)) => &text[..i],
        None => text,
    }
}

/// Builds a built-in handler from its spec: `echo`, `trail`, `sleep:200ms`, `fail:2`, `fail:always`,
/// `http:URL`, `exec:PROGRAM ARGS...`.
pub fn builtin(spec: &str, limits: &HandlerLimits) -> anyhow::Result<Arc<dyn Handler>> {
    builtin_with_headers(spec, limits, Vec::new())
}

/// [`builtin`], an `http` handler sending `headers` with every request (other handlers take none).
pub fn builtin_with_headers(
    spec: &str,
    limits: &HandlerLimits,
    headers: Vec<SecretHeader>,
) -> anyhow::Result<Arc<dyn Handler>> {
    if !headers.is_empty() && !spec.starts_with("http:") {
        anyhow::bail!("only http handlers send headers; '{spec}' is not one");
    }
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
            Arc::new(Http::new(url, limits, headers)?)
        }
        ("exec", Some(command)) if !command.trim().is_empty() => {
            let mut words = command.split_whitespace().map(str::to_string);
            let program = words.next().expect("checked non-empty");
            Arc::new(Exec {
                program,
                args: words.collect(),
                timeout: limits.timeout,
                max_output_bytes: limits.max_output_bytes,
            })
        }
        _ => anyhow::bail!(
            "unknown handler '{spec}': use echo, trail, sleep:DURATION, fail:N, fail:always, http:URL or exec:COMMAND"
        ),
    };
    Ok(handler)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn task(attempt: u32, input: Value) -> Task {
        Task {
            task_id: format!("w/s/{attempt}"),
            workflow_id: "w".into(),
            step: "s".into(),
            task_type: "t".into(),
            attempt,
            input,
            trace: None,
        }
    }

    pub(crate) fn limits(timeout: Duration, max_output_bytes: usize) -> HandlerLimits {
        HandlerLimits {
            timeout,
            max_output_bytes,
        }
    }

    fn short() -> HandlerLimits {
        limits(Duration::from_secs(1), DEFAULT_MAX_OUTPUT_BYTES)
    }

    #[tokio::test]
    async fn fail_fails_the_first_attempts_then_echoes() {
        let h = builtin("fail:2", &short()).unwrap();
        assert!(h.handle(task(1, json!(1))).await.unwrap_err().retryable);
        assert!(h.handle(task(2, json!(1))).await.is_err());
        assert_eq!(h.handle(task(3, json!(1))).await.unwrap(), json!(1));
        let always = builtin("fail:always", &short()).unwrap();
        assert!(always.handle(task(9, json!(1))).await.is_err());
    }

    #[tokio::test]
    async fn trail_appends_to_the_input() {
        let h = builtin("trail", &short()).unwrap();
        let out = h.handle(task(1, json!({"order": 1}))).await.unwrap();
        let out = h.handle(task(2, out)).await.unwrap();
        assert_eq!(out["order"], 1);
        assert_eq!(out["trail"].as_array().unwrap().len(), 2);
        assert_eq!(out["trail"][1]["attempt"], 2);
    }

    #[test]
    fn an_output_over_the_limit_fails_without_retry_naming_size_and_limit() {
        let big = json!("x".repeat(2 * 1024 * 1024));
        let err = encode_output(&big, DEFAULT_MAX_OUTPUT_BYTES).unwrap_err();
        assert_eq!(
            (err.code.as_str(), err.retryable),
            ("output_too_large", false)
        );
        assert!(
            err.message.contains("2097154 bytes") && err.message.contains("262144 bytes"),
            "{}",
            err.message
        );
        let at_limit = json!("x".repeat(DEFAULT_MAX_OUTPUT_BYTES - 2));
        assert_eq!(
            encode_output(&at_limit, DEFAULT_MAX_OUTPUT_BYTES)
                .unwrap()
                .len(),
            DEFAULT_MAX_OUTPUT_BYTES
        );
    }

    #[test]
    fn bad_specs_say_what_is_allowed() {
        let err = builtin("teleport", &short()).err().unwrap().to_string();
        assert!(
            err.contains("echo") && err.contains("exec:COMMAND"),
            "{err}"
        );
        assert!(builtin("sleep:soon", &short()).is_err());
        assert!(builtin("http:ftp://x", &short()).is_err());
    }
}
