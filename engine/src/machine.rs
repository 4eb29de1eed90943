//! The workflow state machine: one [`Instance`] per workflow, advanced by inputs (start, task result, timer) into
//! commands (dispatch a task, emit a lifecycle event). Pure and deterministic: time comes in as an argument, jitter
//! comes from a hash of the task id, so replaying the same inputs yields the same state and the same commands.
//!
//! Idempotent by construction: a result is applied only when it answers the attempt currently running; a
//! duplicate, a stale attempt or a result after the workflow ended changes nothing and produces nothing.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::definition::Definition;

/// Milliseconds since the Unix epoch.
pub type Millis = i64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Status {
    Running,
    Completed,
    Failed,
}

/// Why a task attempt failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    pub code: String,
    pub message: String,
    pub retryable: bool,
}

/// What a worker reported for one attempt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Outcome {
    Completed(Value),
    Failed(Failure),
}

/// A task result as the engine sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskOutcome {
    pub task_id: String,
    pub outcome: Outcome,
}

/// A request to start an instance.
#[derive(Debug, Clone, PartialEq)]
pub struct Start {
    pub workflow_id: String,
    pub workflow_version: i32,
    pub input: Value,
    pub correlation_id: Option<String>,
    pub priority: i32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Phase {
    /// A task attempt is out with the workers.
    Running {
        task_id: String,
        dispatched_at: Millis,
    },
    /// The last attempt failed; the next is due at `due_at`.
    BackingOff { due_at: Millis, last_error: Failure },
}

/// The step an instance is at.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRun {
    pub index: usize,
    pub attempt: u32,
    pub input: Value,
    pub started_at: Millis,
    pub phase: Phase,
}

/// The state of one workflow instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Instance {
    pub workflow_id: String,
    pub workflow_name: String,
    pub workflow_version: i32,
    pub status: Status,
    pub input: Value,
    pub output: Option<Value>,
    pub error: Option<String>,
    pub correlation_id: Option<String>,
    pub priority: i32,
    pub created_at: Millis,
    pub updated_at: Millis,
    /// Inputs that changed this instance; grows by one per change.
    pub sequence: i64,
    pub current: Option<StepRun>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    WorkflowStarted,
    StepStarted,
    StepCompleted,
    StepFailed,
    StepRetried,
    WorkflowCompleted,
    WorkflowFailed,
}

/// A task for the workers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Dispatch {
    /// `<workflow id>/<step>/<attempt>`: the same attempt always has the same id.
    pub task_id: String,
    pub step: String,
    pub task_type: String,
    pub attempt: u32,
    pub input: Value,
    /// Retries go to the task type's retry topic, behind new work.
    pub retry: bool,
}

/// A lifecycle event for observers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Determined by the transition, so a re-emitted event has the same id.
    pub event_id: String,
    pub kind: EventKind,
    pub step: Option<String>,
    pub attempt: Option<u32>,
    pub detail: Option<Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Command {
    Dispatch(Dispatch),
    Emit(Event),
}

/// Deterministic task id of an attempt.
pub fn task_id(workflow_id: &str, step: &str, attempt: u32) -> String {
    format!("{workflow_id}/{step}/{attempt}")
}

/// FNV-1a: a stable hash (unlike std's), so that jitter is the same in every build and on every replay.
fn stable_hash(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

impl Instance {
    /// Starts an instance of `definition` and dispatches its first step.
    pub fn start(definition: &Definition, start: Start, now: Millis) -> (Instance, Vec<Command>) {
        let mut instance = Instance {
            workflow_id: start.workflow_id,
            workflow_name: definition.name.clone(),
            workflow_version: start.workflow_version,
            status: Status::Running,
            input: start.input.clone(),
            output: None,
            error: None,
            correlation_id: start.correlation_id,
            priority: start.priority,
            created_at: now,
            updated_at: now,
            sequence: 1,
            current: None,
        };
        let mut commands = vec![instance.event(EventKind::WorkflowStarted, None, None, None)];
        instance.begin_step(definition, 0, start.input, now, &mut commands);
        (instance, commands)
    }

    pub fn is_terminal(&self) -> bool {
        self.status != Status::Running
    }

    /// When this instance next needs [`Instance::on_timer`], if ever.
    pub fn next_timer(&self) -> Option<Millis> {
        match &self.current {
            Some(StepRun {
                phase: Phase::BackingOff { due_at, .. },
                ..
            }) if !self.is_terminal() => Some(*due_at),
            _ => None,
        }
    }

    /// Applies a task result. Returns no commands, and changes nothing, unless it answers the running attempt.
    pub fn on_result(
        &mut self,
        definition: &Definition,
        result: TaskOutcome,
        now: Millis,
    ) -> Vec<Command> {
        let Some(run) = self.current.clone() else {
            return Vec::new();
        };
        let answers_running_attempt = matches!(
            &run.phase,
            Phase::Running { task_id, .. } if *task_id == result.task_id
        );
        if self.is_terminal() || !answers_running_attempt {
            return Vec::new();
        }
        self.sequence += 1;
        self.updated_at = now;
        let step = definition.steps[run.index].name.clone();
        let mut commands = Vec::new();
        match result.outcome {
            Outcome::Completed(output) => {
                commands.push(self.event(
                    EventKind::StepCompleted,
                    Some(&step),
                    Some(run.attempt),
                    Some(output.clone()),
                ));
                if run.index + 1 < definition.steps.len() {
                    self.begin_step(definition, run.index + 1, output, now, &mut commands);
                } else {
                    self.current = None;
                    self.status = Status::Completed;
                    self.output = Some(output.clone());
                    commands.push(self.event(
                        EventKind::WorkflowCompleted,
                        None,
                        None,
                        Some(output),
                    ));
                }
            }
            Outcome::Failed(failure) => {
                let detail = serde_json::to_value(&failure).ok();
                commands.push(self.event(
                    EventKind::StepFailed,
                    Some(&step),
                    Some(run.attempt),
                    detail,
                ));
                let policy = definition.retry_policy(run.index);
                let may_retry = failure.retryable
                    && !policy.non_retryable.contains(&failure.code)
                    && run.attempt < policy.max_attempts;
                if may_retry {
                    let task_id = task_id(&self.workflow_id, &step, run.attempt);
                    let cap = policy.backoff_cap(run.attempt).as_millis() as u64;
                    let delay = (stable_hash(&task_id) % (cap + 1)) as Millis;
                    let due_at = now + delay;
                    commands.push(self.event(
                        EventKind::StepRetried,
                        Some(&step),
                        Some(run.attempt + 1),
                        Some(serde_json::json!({"due_at": due_at, "backoff_ms": delay})),
                    ));
                    self.current = Some(StepRun {
                        phase: Phase::BackingOff {
                            due_at,
                            last_error: failure,
                        },
                        ..run
                    });
                } else {
                    let why = if !failure.retryable {
                        "a non-retryable error".to_string()
                    } else if policy.non_retryable.contains(&failure.code) {
                        format!(
                            "error code '{}', which its policy never retries",
                            failure.code
                        )
                    } else {
                        format!("{} attempts", run.attempt)
                    };
                    let error = format!(
                        "step '{step}' failed after {why}: {}: {}",
                        failure.code, failure.message
                    );
                    self.current = None;
                    self.status = Status::Failed;
                    self.error = Some(error.clone());
                    commands.push(self.event(
                        EventKind::WorkflowFailed,
                        None,
                        None,
                        Some(Value::String(error)),
                    ));
                }
            }
        }
        commands
    }

    /// Fires a due retry. Returns no commands, and changes nothing, before the timer is due.
    pub fn on_timer(&mut self, definition: &Definition, now: Millis) -> Vec<Command> {
        match self.next_timer() {
            Some(due_at) if due_at <= now => {}
            _ => return Vec::new(),
        }
        let Some(run) = self.current.take() else {
            return Vec::new();
        };
        self.sequence += 1;
        self.updated_at = now;
        let attempt = run.attempt + 1;
        let mut commands = Vec::new();
        self.dispatch(definition, StepRun { attempt, ..run }, now, &mut commands);
        commands
    }

    fn begin_step(
        &mut self,
        definition: &Definition,
        index: usize,
        input: Value,
        now: Millis,
        commands: &mut Vec<Command>,
    ) {
        let run = StepRun {
            index,
            attempt: 1,
            input,
            started_at: now,
            phase: Phase::Running {
                task_id: String::new(),
                dispatched_at: now,
            },
        };
        self.dispatch(definition, run, now, commands);
    }

    /// Puts `run` out to the workers as its current attempt.
    fn dispatch(
        &mut self,
        definition: &Definition,
        mut run: StepRun,
        now: Millis,
        commands: &mut Vec<Command>,
    ) {
        let step = &definition.steps[run.index];
        let id = task_id(&self.workflow_id, &step.name, run.attempt);
        commands.push(Command::Dispatch(Dispatch {
            task_id: id.clone(),
            step: step.name.clone(),
            task_type: step.task.clone(),
            attempt: run.attempt,
            input: run.input.clone(),
            retry: run.attempt > 1,
        }));
        commands.push(self.event(
            EventKind::StepStarted,
            Some(&step.name),
            Some(run.attempt),
            None,
        ));
        run.phase = Phase::Running {
            task_id: id,
            dispatched_at: now,
        };
        self.current = Some(run);
    }

    fn event(
        &self,
        kind: EventKind,
        step: Option<&str>,
        attempt: Option<u32>,
        detail: Option<Value>,
    ) -> Command {
        let mut event_id = format!("{}/{kind:?}", self.workflow_id);
        if let Some(step) = step {
            event_id.push('/');
            event_id.push_str(step);
        }
        if let Some(attempt) = attempt {
            event_id.push_str(&format!("/{attempt}"));
        }
        Command::Emit(Event {
            event_id,
            kind,
            step: step.map(str::to_string),
            attempt,
            detail,
        })
    }
}
