//! The `exec` handler: runs a command in its own process group with the task's input as JSON on stdin, and takes
//! its stdout, JSON, as the output. Stdin is written while stdout and stderr are read (a command that echoes a
//! large input cannot deadlock on a full pipe); stdout is read up to the output limit plus one byte and stderr is
//! drained keeping its head; past the limit or the timeout the whole group is killed.

use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use super::{output_too_large, truncate, AbortOnDrop, Handler, HandlerError, HandlerFuture, Task};

/// Bytes of stderr kept for a failure message (the rest is read and dropped).
const STDERR_KEPT: usize = 4096;

/// Runs a command with the input as JSON on stdin; its stdout, JSON, is the output. A non-zero exit is a
/// retryable failure with code `exit_<status>` (a step's retry policy may list codes never to retry).
pub struct Exec {
    pub program: String,
    pub args: Vec<String>,
    /// Longer runs are killed and fail with the retryable code `timeout`.
    pub timeout: Duration,
    /// More stdout than this kills the command and fails the task with `output_too_large`.
    pub max_output_bytes: usize,
}

/// Kills a process group when dropped, unless its leader was reaped (after which its id may be reused).
struct GroupKiller(Option<u32>);

impl GroupKiller {
    fn kill(&mut self) {
        if let Some(pid) = self.0.take() {
            // SAFETY: kill(2) on the group of a child we have not reaped, so the id is still ours.
            unsafe {
                libc::kill(-(pid as libc::pid_t), libc::SIGKILL);
            }
        }
    }
}

impl Drop for GroupKiller {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Reads everything; `Err(())` once more than `limit` bytes came (having read `limit + 1`).
async fn read_capped(
    reader: impl AsyncRead + Unpin,
    limit: usize,
) -> std::io::Result<Result<Vec<u8>, ()>> {
    let mut out = Vec::new();
    reader.take(limit as u64 + 1).read_to_end(&mut out).await?;
    Ok(if out.len() > limit { Err(()) } else { Ok(out) })
}

/// Reads to the end, keeping the first `keep` bytes.
async fn read_head(mut reader: impl AsyncRead + Unpin, keep: usize) -> Vec<u8> {
    let mut head = Vec::new();
    let mut buf = vec![0u8; 8192];
    while let Ok(n) = reader.read(&mut buf).await {
        if n == 0 {
            break;
        }
        let room = keep.saturating_sub(head.len());
        head.extend_from_slice(&buf[..n.min(room)]);
    }
    head
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
            .process_group(0)
            .kill_on_drop(true);
        // The W3C variables the OpenTelemetry SDKs read for a process's parent context.
        if let Some(trace) = &task.trace {
            command.env("TRACEPARENT", trace.traceparent());
            if let Some(state) = &trace.state {
                command.env("TRACESTATE", state);
            }
        }
        let program = self.program.clone();
        let (timeout, limit) = (self.timeout, self.max_output_bytes);
        Box::pin(async move {
            let mut child = command.spawn().map_err(|e| {
                HandlerError::permanent("exec_failed", format!("starting {program}: {e}"))
            })?;
            let mut group = GroupKiller(child.id());
            let stdin = child.stdin.take();
            let stdout = child.stdout.take().expect("stdout is piped");
            let stderr = child.stderr.take().expect("stderr is piped");
            let input = task.input.to_string().into_bytes();
            let _writer = AbortOnDrop(tokio::spawn(async move {
                if let Some(mut stdin) = stdin {
                    // A command that does not read its input is fine: ignore a closed pipe.
                    let _ = stdin.write_all(&input).await;
                    let _ = stdin.shutdown().await;
                }
            }));
            let mut errors = AbortOnDrop(tokio::spawn(read_head(stderr, STDERR_KEPT)));
            let run = async {
                match read_capped(stdout, limit).await {
                    Ok(Ok(out)) => Ok((out, child.wait().await)),
                    Ok(Err(())) => Err(output_too_large(
                        format_args!("{program} printed over {limit} bytes on stdout (killed)"),
                        limit,
                    )),
                    Err(e) => Err(HandlerError::retryable(
                        "exec_failed",
                        format!("reading the output of {program}: {e}"),
                    )),
                }
            };
            let outcome = tokio::time::timeout(timeout, run).await;
            let (stdout, status) = match outcome {
                Ok(Ok((stdout, Ok(status)))) => {
                    // Reaped: the group id may be reused from now on.
                    group.0 = None;
                    (stdout, status)
                }
                failed => {
                    group.kill();
                    let _ = child.kill().await;
                    return Err(match failed {
                        Err(_) => HandlerError::retryable(
                            "timeout",
                            format!("{program} ran longer than {timeout:?} (killed)"),
                        ),
                        Ok(Err(e)) => e,
                        Ok(Ok((_, Err(e)))) => HandlerError::retryable(
                            "exec_failed",
                            format!("running {program}: {e}"),
                        ),
                        Ok(Ok((_, Ok(_)))) => unreachable!("matched above"),
                    });
                }
            };
            if !status.success() {
                let stderr = tokio::time::timeout(Duration::from_secs(1), &mut errors.0)
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .unwrap_or_default();
                let code = status
                    .code()
                    .map_or("killed".to_string(), |c| format!("exit_{c}"));
                let stderr = String::from_utf8_lossy(&stderr);
                return Err(HandlerError::retryable(
                    code,
                    format!("{program} failed: {}", truncate(stderr.trim(), 500)),
                ));
            }
            if stdout.iter().all(u8::is_ascii_whitespace) {
                return Ok(Value::Null);
            }
            serde_json::from_slice(&stdout).map_err(|e| {
                HandlerError::permanent(
                    "invalid_output",
                    format!("{program} printed something that is not JSON: {e}"),
                )
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handlers::builtin;
    use crate::handlers::tests::{limits, task};
    use serde_json::json;
    use std::time::Instant;

    #[tokio::test]
    async fn exec_pipes_json_and_reports_exit_codes() {
        let l = limits(Duration::from_secs(5), 1024);
        let cat = builtin("exec:cat", &l).unwrap();
        assert_eq!(
            cat.handle(task(1, json!({"a": [1, 2]}))).await.unwrap(),
            json!({"a": [1, 2]})
        );
        let failing = builtin("exec:sh -c exit_3_is_not_a_command", &l).unwrap();
        let err = failing.handle(task(1, json!(null))).await.unwrap_err();
        assert_eq!(err.code, "exit_127");
        assert!(
            err.message.contains("not found"),
            "stderr is kept: {}",
            err.message
        );
        let not_json = builtin("exec:echo hello", &l).unwrap();
        let err = not_json.handle(task(1, json!(null))).await.unwrap_err();
        assert_eq!(
            (err.code.as_str(), err.retryable),
            ("invalid_output", false)
        );
    }

    #[tokio::test]
    async fn a_megabyte_through_cat_round_trips_without_deadlock() {
        let input = json!({ "blob": "y".repeat(1024 * 1024) });
        let cat = builtin(
            "exec:cat",
            &limits(Duration::from_secs(20), 2 * 1024 * 1024),
        )
        .unwrap();
        let out = tokio::time::timeout(Duration::from_secs(20), cat.handle(task(1, input.clone())))
            .await
            .expect("writing stdin while reading stdout: no deadlock");
        assert_eq!(out.unwrap(), input);
    }

    #[tokio::test]
    async fn stdout_over_the_limit_kills_the_command_and_fails_without_retry() {
        let input = json!({ "blob": "y".repeat(1024 * 1024) });
        let cat = builtin("exec:cat", &limits(Duration::from_secs(20), 64 * 1024)).unwrap();
        let started = Instant::now();
        let err = tokio::time::timeout(Duration::from_secs(20), cat.handle(task(1, input)))
            .await
            .expect("no deadlock")
            .unwrap_err();
        assert_eq!(
            (err.code.as_str(), err.retryable),
            ("output_too_large", false)
        );
        assert!(err.message.contains("65536 bytes"), "{}", err.message);
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn a_command_over_its_timeout_is_killed_with_its_children() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("survived");
        let script = dir.path().join("slow.sh");
        // The grandchild would write the marker if it outlived the kill.
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\n(sleep 1; touch {}) &\nsleep 30\n",
                marker.display()
            ),
        )
        .unwrap();
        let slow = Exec {
            program: "sh".into(),
            args: vec![script.display().to_string()],
            timeout: Duration::from_millis(300),
            max_output_bytes: 1024,
        };
        let started = Instant::now();
        let err = slow.handle(task(1, json!(null))).await.unwrap_err();
        assert_eq!((err.code.as_str(), err.retryable), ("timeout", true));
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(!marker.exists(), "the command's group was killed");
    }
}
