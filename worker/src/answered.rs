//! The worker's memory of task ids: results it computed recently (bounded in entries AND bytes, oldest
//! forgotten first), so a redelivered task is answered again without running twice, and the attempts running now,
//! so a second delivery of a running task waits for that attempt's result instead of starting another run or
//! being acknowledged without one. A running entry is cleared by its [`Attempt`] however the attempt ends: with a
//! result, or dropped (an error path or a panic), in which case a waiter gets no result and runs the task itself.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use edow_schemas::contracts::TaskResult;
use tokio::sync::watch;

/// How an attempt ended, as a waiting duplicate sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Finished {
    pub result: TaskResult,
    /// Whether the broker acknowledged the result; if not, whoever waited publishes it.
    pub published: bool,
}

type Outcome = watch::Receiver<Option<Finished>>;

struct Inner {
    results: HashMap<String, (TaskResult, usize)>,
    order: VecDeque<String>,
    bytes: usize,
    running: HashMap<String, (u64, Outcome)>,
    attempts: u64,
}

/// Shared by every task of a worker.
pub struct Answered {
    inner: Mutex<Inner>,
    max_entries: usize,
    max_bytes: usize,
}

/// What to do with a delivered task id.
pub enum Begin {
    /// Answered before: publish this result again.
    Answered(TaskResult),
    /// Running here now: wait for that attempt.
    Running(Wait),
    /// Unknown: run it, and report through the attempt.
    Start(Attempt),
}

/// A second delivery waiting for the attempt that is running.
pub struct Wait(Outcome);

impl Wait {
    /// The attempt's outcome; `None` if it ended without a result (then run the task).
    pub async fn outcome(mut self) -> Option<Finished> {
        match self.0.wait_for(Option::is_some).await {
            Ok(finished) => finished.clone(),
            Err(_) => None,
        }
    }
}

/// The right to run a task id; clears the running entry when finished or dropped.
pub struct Attempt {
    answered: Arc<Answered>,
    task_id: String,
    id: u64,
    tx: watch::Sender<Option<Finished>>,
}

impl Attempt {
    /// Remembers the result and hands it to the deliveries waiting for it.
    pub fn finish(self, result: TaskResult, published: bool) {
        {
            let mut inner = self.answered.lock();
            inner.clear_running(&self.task_id, self.id);
            self.answered.remember_locked(&mut inner, result.clone());
        }
        self.tx.send_replace(Some(Finished { result, published }));
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        // After `finish` this finds nothing to clear; otherwise the waiters see the sender go without a result.
        self.answered.lock().clear_running(&self.task_id, self.id);
    }
}

impl Inner {
    fn clear_running(&mut self, task_id: &str, id: u64) {
        if self.running.get(task_id).is_some_and(|(i, _)| *i == id) {
            self.running.remove(task_id);
        }
    }
}

/// Bytes a remembered result takes, roughly: its strings (the id twice: key and value) plus a fixed overhead.
pub fn result_bytes(result: &TaskResult) -> usize {
    2 * result.task_id.len()
        + result.workflow_id.len()
        + result.step.len()
        + result.worker_id.len()
        + result.output.as_ref().map_or(0, String::len)
        + result
            .error
            .as_ref()
            .map_or(0, |e| e.code.len() + e.message.len())
        + 160
}

impl Answered {
    pub fn new(max_entries: usize, max_bytes: usize) -> Arc<Answered> {
        Arc::new(Answered {
            inner: Mutex::new(Inner {
                results: HashMap::new(),
                order: VecDeque::new(),
                bytes: 0,
                running: HashMap::new(),
                attempts: 0,
            }),
            max_entries,
            max_bytes,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn begin(self: &Arc<Self>, task_id: &str) -> Begin {
        let mut inner = self.lock();
        if let Some((result, _)) = inner.results.get(task_id) {
            return Begin::Answered(result.clone());
        }
        if let Some((_, outcome)) = inner.running.get(task_id) {
            return Begin::Running(Wait(outcome.clone()));
        }
        inner.attempts += 1;
        let id = inner.attempts;
        let (tx, rx) = watch::channel(None);
        inner.running.insert(task_id.to_string(), (id, rx));
        Begin::Start(Attempt {
            answered: self.clone(),
            task_id: task_id.to_string(),
            id,
            tx,
        })
    }

    /// Remembers a result (e.g. one answered from elsewhere); a result bigger than the byte bound is not kept.
    pub fn remember(&self, result: TaskResult) {
        let mut inner = self.lock();
        self.remember_locked(&mut inner, result);
    }

    fn remember_locked(&self, inner: &mut Inner, result: TaskResult) {
        let size = result_bytes(&result);
        if size > self.max_bytes || self.max_entries == 0 {
            return;
        }
        let task_id = result.task_id.clone();
        match inner.results.insert(task_id.clone(), (result, size)) {
            Some((_, old)) => inner.bytes -= old,
            None => inner.order.push_back(task_id),
        }
        inner.bytes += size;
        while inner.results.len() > self.max_entries || inner.bytes > self.max_bytes {
            let Some(oldest) = inner.order.pop_front() else {
                break;
            };
            if let Some((_, size)) = inner.results.remove(&oldest) {
                inner.bytes -= size;
            }
        }
    }

    /// (remembered results, their bytes, attempts running).
    pub fn usage(&self) -> (usize, usize, usize) {
        let inner = self.lock();
        (inner.results.len(), inner.bytes, inner.running.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edow_schemas::contracts::TaskStatus;
    use std::time::Duration;

    fn result(id: &str, output_bytes: usize) -> TaskResult {
        TaskResult {
            task_id: id.into(),
            workflow_id: "w".into(),
            step: "s".into(),
            attempt: 1,
            status: TaskStatus::Completed,
            output: Some("x".repeat(output_bytes)),
            error: None,
            worker_id: "w1".into(),
            started_at: 0,
            finished_at: 0,
        }
    }

    fn start(a: &Arc<Answered>, id: &str) -> Attempt {
        match a.begin(id) {
            Begin::Start(attempt) => attempt,
            _ => panic!("{id} should start"),
        }
    }

    #[test]
    fn bounded_in_entries_oldest_first() {
        let a = Answered::new(3, usize::MAX);
        for i in 0..5 {
            a.remember(result(&format!("t{i}"), 1));
        }
        assert_eq!(a.usage().0, 3);
        assert!(matches!(a.begin("t0"), Begin::Start(_)), "t0 was forgotten");
        assert!(matches!(a.begin("t4"), Begin::Answered(r) if r.task_id == "t4"));
    }

    #[test]
    fn bounded_in_bytes_and_a_result_over_the_bound_is_not_kept() {
        let one = result_bytes(&result("t0", 1000));
        let a = Answered::new(1000, 3 * one);
        for i in 0..10 {
            a.remember(result(&format!("t{i}"), 1000));
        }
        let (entries, bytes, _) = a.usage();
        assert_eq!(entries, 3);
        assert!(bytes <= 3 * one, "{bytes} over {}", 3 * one);
        a.remember(result("huge", 10 * one));
        assert!(matches!(a.begin("huge"), Begin::Start(_)));
        assert_eq!(a.usage().0, 3, "the huge result evicted nothing");
        // Remembering an id again replaces it without counting it twice.
        a.remember(result("t9", 1000));
        assert_eq!(a.usage().1, bytes);
    }

    #[tokio::test]
    async fn a_duplicate_of_a_running_task_waits_for_its_result() {
        let a = Answered::new(10, 1 << 20);
        let attempt = start(&a, "t");
        let Begin::Running(wait) = a.begin("t") else {
            panic!("the second delivery must wait")
        };
        let waiter = tokio::spawn(wait.outcome());
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "no result yet, so no answer");
        attempt.finish(result("t", 2), false);
        let finished = waiter.await.unwrap().expect("the attempt's result");
        assert_eq!(
            (finished.result.task_id.as_str(), finished.published),
            ("t", false)
        );
        assert!(matches!(a.begin("t"), Begin::Answered(_)));
        assert_eq!(a.usage().2, 0, "no longer running");
    }

    #[tokio::test]
    async fn an_attempt_dropped_without_result_clears_running_and_releases_waiters() {
        let a = Answered::new(10, 1 << 20);
        let attempt = start(&a, "t");
        let Begin::Running(wait) = a.begin("t") else {
            panic!()
        };
        // As a panicking task would: the attempt is dropped during unwinding.
        let task = tokio::spawn(async move {
            let _attempt = attempt;
            panic!("handler bug");
        });
        assert!(task.await.unwrap_err().is_panic());
        assert_eq!(wait.outcome().await, None);
        assert_eq!(a.usage().2, 0);
        assert!(
            matches!(a.begin("t"), Begin::Start(_)),
            "the next delivery runs it"
        );
    }
}
