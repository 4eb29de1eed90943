//! The workflow state machine: one [`Instance`] per workflow, advanced by inputs (start, task result, timer,
//! signal, cancel) into commands (dispatch a task, emit a lifecycle event, start or cancel a child workflow,
//! report to a parent). Pure and deterministic: time comes in as an argument and jitter from a stable hash of the
//! task id, so replaying the same inputs yields the same state and the same commands.
//!
//! The running part of an instance is a tree of [`Node`]s that mirrors the part of the definition being run:
//! a [`Block`] runs a sequence of steps one after another; parallel branches, map iterations and nested
//! sequences are blocks inside nodes. Completed subtrees are dropped, leaving their output, so the state holds what
//! is running plus the outputs later steps may read — nothing like a history.
//!
//! Idempotent by construction: a result is applied only when it answers an attempt that is running; a duplicate,
//! a stale attempt, a signal id seen before, or anything after the workflow ended changes nothing.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::definition::{Definition, Join, Kind, Otherwise, RetryPolicy, Step};
use crate::expr;
use crate::redact::{Root, Secrets};

/// Milliseconds since the Unix epoch.
pub type Millis = i64;

/// Signal ids remembered for deduplication, and signals kept for a wait that has not started yet.
const SIGNAL_MEMORY: usize = 256;
const SIGNAL_BUFFER: usize = 100;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Status {
    Running,
    /// Failed or cancelled; undoing completed steps.
    Compensating,
    Completed,
    Failed,
    Cancelled,
    Compensated,
    CompensationFailed,
    /// Ended early by a filter: not a failure.
    Filtered,
}

/// Why a task attempt (or a step) failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    pub code: String,
    pub message: String,
    pub retryable: bool,
}

/// What a worker (or a child workflow) reported.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Outcome {
    Completed(Value),
    Failed(Failure),
}

/// A task result as the engine sees it; a child workflow's end arrives the same way, with its workflow id.
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
    /// The workflow that started this one as a child step.
    pub parent: Option<String>,
    /// How many ancestors this workflow has: 0 for a workflow started from outside.
    pub depth: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    WorkflowStarted,
    StepStarted,
    StepCompleted,
    StepFailed,
    StepRetried,
    Compensating,
    WorkflowCompleted,
    WorkflowFailed,
    WorkflowCancelled,
    WorkflowCompensated,
    WorkflowFiltered,
    CompensationFailed,
}

/// A task for the workers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Dispatch {
    /// `<workflow id>/<step path>/<attempt>`: the same attempt always has the same id.
    pub task_id: String,
    /// Path of the step: its name, prefixed by the map iterations it runs in (`ship_all[3]/ship`).
    pub step: String,
    pub task_type: String,
    pub attempt: u32,
    pub input: Value,
    /// Retries go to the task type's retry topic, behind new work.
    pub retry: bool,
    /// When the attempt counts as timed out.
    pub deadline: Option<Millis>,
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
    /// Start workflow `name` as `child_id`; its end comes back as a [`TaskOutcome`] with task id `child_id`.
    StartChild {
        child_id: String,
        name: String,
        version: Option<i32>,
        input: Value,
    },
    /// Cancel a child whose result is no longer wanted.
    CancelChild {
        child_id: String,
    },
    /// Tell the parent how this child ended.
    ReportToParent {
        parent_id: String,
        task_id: String,
        outcome: Outcome,
    },
}

/// Which steps a block runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum BlockOf {
    Root,
    /// The body of a sequence, map, or filter step.
    Body(String),
    /// Branch `i` of a parallel or choice step.
    Branch(String, usize),
    /// The steps a wait runs when it times out.
    OnTimeout(String),
}

/// A sequence of steps being run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Block {
    of: BlockOf,
    /// Path prefix of the steps inside: the map iterations they run in.
    prefix: String,
    index: usize,
    /// Output of the previous step (the block's input before the first).
    last: Value,
    /// Input of the step at `index` when it names a compensation (null otherwise), kept for that compensation.
    step_input: Value,
    /// Outputs of this block's completed steps, by name, for `steps.<name>` in expressions.
    outputs: BTreeMap<String, Value>,
    /// For a map iteration: its index and element.
    item: Option<(usize, Value)>,
    current: Option<Box<Node>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum TaskPhase {
    Running {
        task_id: String,
        deadline: Option<Millis>,
    },
    BackingOff {
        due: Millis,
    },
}

/// One task being attempted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskRun {
    /// The step whose policies apply.
    step: String,
    path: String,
    task_type: String,
    input: Value,
    attempt: u32,
    /// A compensation: its step's `compensate.retry` applies.
    undo: bool,
    timeout_ms: Option<u64>,
    phase: TaskPhase,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Slot<T> {
    Running(T),
    Done(Value),
    Failed(Failure),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Node {
    Task(TaskRun),
    /// A sequence, a chosen choice branch, a filter body, or a wait's timeout steps.
    Nested(Block),
    Parallel {
        step: String,
        slots: Vec<Slot<Block>>,
    },
    Map {
        step: String,
        path: String,
        items: Vec<Value>,
        next: usize,
        running: BTreeMap<usize, Block>,
        results: Vec<Option<Value>>,
    },
    Copy {
        step: String,
        slots: Vec<Slot<TaskRun>>,
    },
    Sleep {
        due: Millis,
        input: Value,
    },
    Wait {
        step: String,
        signal: String,
        due: Option<Millis>,
        prefix: String,
        input: Value,
    },
    Child {
        child_id: String,
    },
}

/// A completed step to undo if the workflow fails.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UndoEntry {
    step: String,
    path: String,
    task_type: String,
    input: Value,
    output: Value,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum End {
    Failed,
    Cancelled,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Undoing {
    end: End,
    current: TaskRun,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BufferedSignal {
    name: String,
    payload: Value,
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
    pub parent: Option<String>,
    /// Ancestors of this workflow (0: started from outside); children get one more.
    #[serde(default)]
    pub depth: u32,
    pub created_at: Millis,
    pub updated_at: Millis,
    /// The W3C trace context the workflow's records carry, as the driver stores it; opaque to the engine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_context: Option<String>,
    /// Changes applied; grows by one per input that changed the instance.
    pub sequence: i64,
    pub deadline_at: Option<Millis>,
    root: Option<Block>,
    undo_log: Vec<UndoEntry>,
    undoing: Option<Undoing>,
    seen_signals: VecDeque<String>,
    buffered: VecDeque<BufferedSignal>,
    /// Values found at the definition's sensitive paths, masked in what observers see.
    #[serde(default, skip_serializing_if = "Secrets::is_empty")]
    secrets: Secrets,
}

/// What a node (or block) came to after an input.
#[derive(Debug, Clone, PartialEq)]
enum Progress {
    Running,
    Done(Value),
    Failed(Failure),
    /// A filter ended the workflow early, with this output.
    Filtered(Value),
}

/// An input travelling down the tree.
enum Visit<'a> {
    Result(&'a TaskOutcome),
    Timer,
    Signal {
        name: &'a str,
        payload: &'a Value,
        consumed: bool,
    },
}

/// What the tree reads while it runs, and where its effects go.
struct Env<'a> {
    def: &'a Definition,
    wf: &'a str,
    input: &'a Value,
    now: Millis,
    commands: Vec<Command>,
    undo_log: &'a mut Vec<UndoEntry>,
    buffered: &'a mut VecDeque<BufferedSignal>,
}

impl Env<'_> {
    fn emit(
        &mut self,
        kind: EventKind,
        step: Option<&str>,
        attempt: Option<u32>,
        detail: Option<Value>,
    ) {
        self.commands
            .push(event(self.wf, kind, step, attempt, detail));
    }
}

fn event(
    wf: &str,
    kind: EventKind,
    step: Option<&str>,
    attempt: Option<u32>,
    detail: Option<Value>,
) -> Command {
    let mut event_id = format!("{wf}/{kind:?}");
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

/// The outputs and map item visible to expressions at some point of the tree: a chain up to the root block.
struct Scope<'a> {
    parent: Option<&'a Scope<'a>>,
    outputs: &'a BTreeMap<String, Value>,
    item: Option<&'a (usize, Value)>,
}

/// The document expressions are evaluated against.
fn context(scope: Option<&Scope<'_>>, previous: &Value, env: &Env<'_>) -> Value {
    context_of(scope, previous, env.input, env.wf, &env.def.name)
}

fn context_of(
    scope: Option<&Scope<'_>>,
    previous: &Value,
    input: &Value,
    wf: &str,
    name: &str,
) -> Value {
    let mut chain = Vec::new();
    let mut at = scope;
    while let Some(s) = at {
        chain.push(s);
        at = s.parent;
    }
    let mut steps = serde_json::Map::new();
    let mut item = None;
    for s in chain.iter().rev() {
        for (k, v) in s.outputs {
            steps.insert(k.clone(), v.clone());
        }
        if let Some(i) = s.item {
            item = Some(i);
        }
    }
    json!({
        "input": input,
        "steps": steps,
        "previous": previous,
        "item": item.map(|(_, v)| v.clone()),
        "index": item.map(|(i, _)| *i),
        "workflow": {"id": wf, "name": name},
    })
}

fn expression_failure(message: String) -> Failure {
    Failure {
        code: "expression".into(),
        message,
        retryable: false,
    }
}

/// Whether `value` serialises to more than `limit` bytes of JSON; stops counting past the limit.
pub fn json_exceeds(value: &Value, limit: usize) -> bool {
    struct Counter {
        left: usize,
    }
    impl std::io::Write for Counter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if buf.len() > self.left {
                return Err(std::io::Error::other("over the limit"));
            }
            self.left -= buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    serde_json::to_writer(&mut Counter { left: limit }, value).is_err()
}

fn too_large(code: &str, step: &str, what: &str, limit: usize) -> Failure {
    Failure {
        code: code.into(),
        message: format!(
            "the {what} of step '{step}' is over {limit} bytes of JSON (max_payload_bytes); pass large data by \
             reference"
        ),
        retryable: false,
    }
}

/// A composite step's output (a parallel's, a map's, a merge's) over the payload limit fails the step: what the
/// workflow carries on with stays bounded. Task outputs are checked by the driver before they get here.
fn bounded(progress: Progress, step: &Step, limit: usize) -> Progress {
    match progress {
        Progress::Done(output)
            if !matches!(step.kind, Kind::Task { .. }) && json_exceeds(&output, limit) =>
        {
            Progress::Failed(too_large("output_too_large", &step.name, "output", limit))
        }
        other => other,
    }
}

/// `now` plus `millis`, saturating: a duration of a thousand years is a timer that never fires, not an overflow.
fn later(now: Millis, millis: u128) -> Millis {
    now.saturating_add(Millis::try_from(millis).unwrap_or(Millis::MAX))
}

/// FNV-1a: a stable hash (unlike std's), so that jitter is the same in every build and on every replay.
fn stable_hash(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

impl TaskRun {
    fn start(
        step: &Step,
        path: String,
        task_type: String,
        input: Value,
        undo: bool,
        env: &mut Env<'_>,
    ) -> TaskRun {
        let mut run = TaskRun {
            step: step.name.clone(),
            path,
            task_type,
            input,
            attempt: 1,
            undo,
            timeout_ms: if undo {
                None
            } else {
                step.timeout
                    .map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX))
            },
            phase: TaskPhase::BackingOff { due: env.now },
        };
        run.dispatch(env);
        run
    }

    fn policy(&self, def: &Definition) -> RetryPolicy {
        let step = def.step(&self.step);
        if self.undo {
            step.compensate
                .as_ref()
                .and_then(|c| c.retry.clone())
                .or_else(|| def.retry.clone())
                .unwrap_or_default()
        } else {
            def.retry_policy(step)
        }
    }

    fn dispatch(&mut self, env: &mut Env<'_>) {
        let task_id = format!("{}/{}/{}", env.wf, self.path, self.attempt);
        let deadline = self.timeout_ms.map(|t| later(env.now, u128::from(t)));
        env.commands.push(Command::Dispatch(Dispatch {
            task_id: task_id.clone(),
            step: self.path.clone(),
            task_type: self.task_type.clone(),
            attempt: self.attempt,
            input: self.input.clone(),
            retry: self.attempt > 1,
            deadline,
        }));
        env.emit(
            EventKind::StepStarted,
            Some(&self.path),
            Some(self.attempt),
            None,
        );
        self.phase = TaskPhase::Running { task_id, deadline };
    }

    fn next_timer(&self) -> Option<Millis> {
        match &self.phase {
            TaskPhase::Running { deadline, .. } => *deadline,
            TaskPhase::BackingOff { due } => Some(*due),
        }
    }

    fn visit(&mut self, visit: &mut Visit<'_>, env: &mut Env<'_>) -> Option<Progress> {
        match (&self.phase, visit) {
            (TaskPhase::Running { task_id, .. }, Visit::Result(r)) if *task_id == r.task_id => {
                match &r.outcome {
                    Outcome::Completed(output) => Some(Progress::Done(output.clone())),
                    Outcome::Failed(failure) => Some(self.failed(failure.clone(), env)),
                }
            }
            (
                TaskPhase::Running {
                    deadline: Some(d), ..
                },
                Visit::Timer,
            ) if *d <= env.now => {
                let failure = Failure {
                    code: "timeout".into(),
                    message: format!(
                        "no result within {} ms",
                        self.timeout_ms.unwrap_or_default()
                    ),
                    retryable: true,
                };
                Some(self.failed(failure, env))
            }
            (TaskPhase::BackingOff { due }, Visit::Timer) if *due <= env.now => {
                self.attempt += 1;
                self.dispatch(env);
                Some(Progress::Running)
            }
            _ => None,
        }
    }

    fn failed(&mut self, failure: Failure, env: &mut Env<'_>) -> Progress {
        env.emit(
            EventKind::StepFailed,
            Some(&self.path),
            Some(self.attempt),
            serde_json::to_value(&failure).ok(),
        );
        let policy = self.policy(env.def);
        let never = policy.non_retryable.contains(&failure.code);
        if failure.retryable && !never && self.attempt < policy.max_attempts {
            let task_id = format!("{}/{}/{}", env.wf, self.path, self.attempt);
            let cap =
                u64::try_from(policy.backoff_cap(self.attempt).as_millis()).unwrap_or(u64::MAX - 1);
            let delay = stable_hash(&task_id) % (cap + 1);
            let due = later(env.now, u128::from(delay));
            env.emit(
                EventKind::StepRetried,
                Some(&self.path),
                Some(self.attempt + 1),
                Some(json!({"due_at": due, "backoff_ms": delay})),
            );
            self.phase = TaskPhase::BackingOff { due };
            return Progress::Running;
        }
        let why = if !failure.retryable {
            "a non-retryable error".to_string()
        } else if never {
            format!(
                "error code '{}', which its policy never retries",
                failure.code
            )
        } else {
            format!("{} attempts", self.attempt)
        };
        Progress::Failed(Failure {
            message: format!(
                "step '{}' failed after {why}: {}: {}",
                self.path, failure.code, failure.message
            ),
            retryable: false,
            code: failure.code,
        })
    }
}

impl Block {
    fn new(of: BlockOf, prefix: String, input: Value, item: Option<(usize, Value)>) -> Block {
        Block {
            of,
            prefix,
            index: 0,
            step_input: input.clone(),
            last: input,
            outputs: BTreeMap::new(),
            item,
            current: None,
        }
    }

    fn steps<'d>(&self, def: &'d Definition) -> &'d [Step] {
        match &self.of {
            BlockOf::Root => &def.steps,
            BlockOf::Body(name) => match &def.step(name).kind {
                Kind::Sequence { steps } | Kind::Map { steps, .. } | Kind::Filter { steps, .. } => {
                    steps
                }
                _ => &[],
            },
            BlockOf::Branch(name, i) => match &def.step(name).kind {
                Kind::Parallel { branches, .. } => branches.get(*i).map_or(&[], |b| &b.steps),
                Kind::Choice { branches } => branches.get(*i).map_or(&[], |b| &b.steps),
                _ => &[],
            },
            BlockOf::OnTimeout(name) => match &def.step(name).kind {
                Kind::Wait {
                    on_timeout: Some(steps),
                    ..
                } => steps,
                _ => &[],
            },
        }
    }

    /// Starts steps from `index` until one keeps running or the block ends.
    fn run(&mut self, parent: Option<&Scope<'_>>, env: &mut Env<'_>) -> Progress {
        loop {
            let steps = self.steps(env.def);
            let Some(step) = steps.get(self.index) else {
                return Progress::Done(self.last.clone());
            };
            let (node, progress) = {
                let scope = Scope {
                    parent,
                    outputs: &self.outputs,
                    item: self.item.as_ref(),
                };
                let input = match &step.input {
                    None => Ok(self.last.clone()),
                    Some(e) => expr::eval(e, &context(Some(&scope), &self.last, env)),
                };
                let limit = env.def.max_payload_bytes;
                match input {
                    Err(message) => (None, Progress::Failed(expression_failure(message))),
                    Ok(input) if json_exceeds(&input, limit) => {
                        let failure = too_large("input_too_large", &step.name, "input", limit);
                        (None, Progress::Failed(failure))
                    }
                    Ok(input) => {
                        // Kept only where a compensation will need it: one copy less of every payload.
                        self.step_input = if step.compensate.is_some() {
                            input.clone()
                        } else {
                            Value::Null
                        };
                        let path = format!("{}{}", self.prefix, step.name);
                        if !matches!(step.kind, Kind::Task { .. }) {
                            env.emit(EventKind::StepStarted, Some(&path), None, None);
                        }
                        start_node(step, path, &self.prefix, input, &scope, env)
                    }
                }
            };
            self.current = node.map(Box::new);
            match bounded(progress, step, env.def.max_payload_bytes) {
                Progress::Running => return Progress::Running,
                Progress::Done(output) => self.complete_step(output, env),
                Progress::Failed(failure) => return self.fail_step(failure, env),
                Progress::Filtered(output) => return Progress::Filtered(output),
            }
        }
    }

    fn complete_step(&mut self, output: Value, env: &mut Env<'_>) {
        let Some(step) = self.steps(env.def).get(self.index) else {
            return;
        };
        let path = format!("{}{}", self.prefix, step.name);
        let attempt = match self.current.as_deref() {
            Some(Node::Task(t)) => Some(t.attempt),
            _ => None,
        };
        env.emit(
            EventKind::StepCompleted,
            Some(&path),
            attempt,
            Some(output.clone()),
        );
        if let Some(compensation) = &step.compensate {
            env.undo_log.push(UndoEntry {
                step: step.name.clone(),
                path,
                task_type: compensation.task.clone(),
                input: self.step_input.clone(),
                output: output.clone(),
            });
        }
        self.outputs.insert(step.name.clone(), output.clone());
        self.last = output;
        self.index += 1;
        self.current = None;
    }

    fn fail_step(&mut self, failure: Failure, env: &mut Env<'_>) -> Progress {
        let step = self.steps(env.def).get(self.index);
        if let Some(step) = step.filter(|s| !matches!(s.kind, Kind::Task { .. })) {
            let path = format!("{}{}", self.prefix, step.name);
            env.emit(
                EventKind::StepFailed,
                Some(&path),
                None,
                serde_json::to_value(&failure).ok(),
            );
        }
        if let Some(node) = self.current.take() {
            cancel_children(&node, env);
        }
        Progress::Failed(failure)
    }

    fn visit(
        &mut self,
        visit: &mut Visit<'_>,
        parent: Option<&Scope<'_>>,
        env: &mut Env<'_>,
    ) -> Option<Progress> {
        let progress = {
            let Block {
                outputs,
                item,
                current,
                ..
            } = self;
            let current = current.as_mut()?;
            let scope = Scope {
                parent,
                outputs,
                item: item.as_ref(),
            };
            current.visit(visit, &scope, env)?
        };
        let limit = env.def.max_payload_bytes;
        let progress = match self.steps(env.def).get(self.index) {
            Some(step) => bounded(progress, step, limit),
            None => progress,
        };
        Some(match progress {
            Progress::Running => Progress::Running,
            Progress::Done(output) => {
                self.complete_step(output, env);
                self.run(parent, env)
            }
            Progress::Failed(failure) => self.fail_step(failure, env),
            Progress::Filtered(output) => Progress::Filtered(output),
        })
    }

    fn next_timer(&self) -> Option<Millis> {
        self.current.as_ref().and_then(|n| n.next_timer())
    }

    fn child_ids(&self, out: &mut Vec<String>) {
        if let Some(node) = &self.current {
            node.child_ids(out);
        }
    }
}

fn cancel_children(node: &Node, env: &mut Env<'_>) {
    let mut ids = Vec::new();
    node.child_ids(&mut ids);
    for child_id in ids {
        env.commands.push(Command::CancelChild { child_id });
    }
}

/// Starts a step; returns the node to keep (when it runs on) and where it is.
fn start_node(
    step: &Step,
    path: String,
    prefix: &str,
    input: Value,
    scope: &Scope<'_>,
    env: &mut Env<'_>,
) -> (Option<Node>, Progress) {
    let nested = |of: BlockOf, input: Value, env: &mut Env<'_>| {
        let mut block = Block::new(of, prefix.to_string(), input, None);
        match block.run(Some(scope), env) {
            Progress::Running => (Some(Node::Nested(block)), Progress::Running),
            other => (None, other),
        }
    };
    let eval =
        |e: &str, input: &Value, env: &Env<'_>| expr::eval(e, &context(Some(scope), input, env));
    match &step.kind {
        Kind::Task { task_type } => {
            let run = TaskRun::start(step, path, task_type.clone(), input, false, env);
            (Some(Node::Task(run)), Progress::Running)
        }
        Kind::Sequence { .. } => nested(BlockOf::Body(step.name.clone()), input, env),
        Kind::Parallel { branches, join } => {
            let mut slots = Vec::with_capacity(branches.len());
            for i in 0..branches.len() {
                let mut block = Block::new(
                    BlockOf::Branch(step.name.clone(), i),
                    prefix.to_string(),
                    input.clone(),
                    None,
                );
                slots.push(match block.run(Some(scope), env) {
                    Progress::Running => Slot::Running(block),
                    Progress::Done(v) => Slot::Done(v),
                    Progress::Failed(f) => Slot::Failed(f),
                    Progress::Filtered(v) => return (None, Progress::Filtered(v)),
                });
            }
            let progress = join_branches(step, *join, &mut slots, env);
            match progress {
                Progress::Running => (
                    Some(Node::Parallel {
                        step: step.name.clone(),
                        slots,
                    }),
                    Progress::Running,
                ),
                other => (None, other),
            }
        }
        Kind::Map { items, .. } => {
            let items = match eval(items, &input, env) {
                Ok(Value::Array(items)) if items.len() > env.def.max_map_items => {
                    let message = format!(
                        "map items has {} elements; at most {} are allowed (max_map_items): split the list \
                         over child workflows",
                        items.len(),
                        env.def.max_map_items
                    );
                    return (
                        None,
                        Progress::Failed(Failure {
                            code: "too_many_items".into(),
                            message,
                            retryable: false,
                        }),
                    );
                }
                Ok(Value::Array(items)) => items,
                Ok(other) => {
                    let message = format!("map items must be a list, got {other}");
                    return (
                        None,
                        Progress::Failed(Failure {
                            code: "invalid_items".into(),
                            message,
                            retryable: false,
                        }),
                    );
                }
                Err(message) => return (None, Progress::Failed(expression_failure(message))),
            };
            let mut node = Node::Map {
                step: step.name.clone(),
                results: vec![None; items.len()],
                items,
                path,
                next: 0,
                running: BTreeMap::new(),
            };
            match node.fill_map(Some(scope), env) {
                Progress::Running => (Some(node), Progress::Running),
                other => (None, other),
            }
        }
        Kind::Choice { branches } => {
            for (i, branch) in branches.iter().enumerate() {
                let taken = match &branch.when {
                    None => true,
                    Some(condition) => match eval(condition, &input, env) {
                        Ok(v) => expr::truthy(&v),
                        Err(message) => {
                            return (None, Progress::Failed(expression_failure(message)))
                        }
                    },
                };
                if taken {
                    return nested(BlockOf::Branch(step.name.clone(), i), input, env);
                }
            }
            (None, Progress::Done(input))
        }
        Kind::Filter {
            condition,
            steps,
            otherwise,
        } => match eval(condition, &input, env) {
            Err(message) => (None, Progress::Failed(expression_failure(message))),
            Ok(v) if expr::truthy(&v) => {
                if steps.is_empty() {
                    (None, Progress::Done(input))
                } else {
                    nested(BlockOf::Body(step.name.clone()), input, env)
                }
            }
            Ok(_) => match otherwise {
                Otherwise::Skip => (None, Progress::Done(input)),
                Otherwise::End => (None, Progress::Filtered(input)),
            },
        },
        Kind::Copy { tasks, .. } => {
            let slots = tasks
                .iter()
                .map(|t| {
                    Slot::Running(TaskRun::start(
                        step,
                        format!("{path}#{t}"),
                        t.clone(),
                        input.clone(),
                        false,
                        env,
                    ))
                })
                .collect();
            (
                Some(Node::Copy {
                    step: step.name.clone(),
                    slots,
                }),
                Progress::Running,
            )
        }
        Kind::Merge { expression } => match eval(expression, &input, env) {
            Ok(v) => (None, Progress::Done(v)),
            Err(message) => (None, Progress::Failed(expression_failure(message))),
        },
        Kind::Sleep { duration } => {
            let due = later(env.now, duration.as_millis());
            (Some(Node::Sleep { due, input }), Progress::Running)
        }
        Kind::Timer { at } => {
            let due = match eval(at, &input, env) {
                Ok(Value::Number(n)) => n.as_i64(),
                Ok(Value::String(s)) => humantime::parse_rfc3339_weak(&s)
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map(|d| Millis::try_from(d.as_millis()).unwrap_or(Millis::MAX)),
                _ => None,
            };
            match due {
                None => {
                    let message =
                        format!("timer `{at}` must give epoch milliseconds or an RFC 3339 time");
                    (
                        None,
                        Progress::Failed(Failure {
                            code: "invalid_time".into(),
                            message,
                            retryable: false,
                        }),
                    )
                }
                Some(due) if due <= env.now => (None, Progress::Done(input)),
                Some(due) => (Some(Node::Sleep { due, input }), Progress::Running),
            }
        }
        Kind::Wait {
            signal, timeout, ..
        } => {
            let buffered = env.buffered.iter().position(|s| s.name == *signal);
            if let Some(received) = buffered.and_then(|i| env.buffered.remove(i)) {
                return (None, Progress::Done(received.payload));
            }
            let due = timeout.map(|t| later(env.now, t.as_millis()));
            let wait = Node::Wait {
                step: step.name.clone(),
                signal: signal.clone(),
                due,
                prefix: prefix.to_string(),
                input,
            };
            (Some(wait), Progress::Running)
        }
        Kind::Workflow { name, version } => {
            let child_id = format!("{}/{path}", env.wf);
            env.commands.push(Command::StartChild {
                child_id: child_id.clone(),
                name: name.clone(),
                version: *version,
                input,
            });
            (Some(Node::Child { child_id }), Progress::Running)
        }
    }
}

/// Decides a parallel step by its join policy; abandons branches no longer needed.
fn join_branches(
    step: &Step,
    join: Join,
    slots: &mut [Slot<Block>],
    env: &mut Env<'_>,
) -> Progress {
    let Kind::Parallel { branches, .. } = &step.kind else {
        return Progress::Running;
    };
    let total = slots.len();
    let done = slots.iter().filter(|s| matches!(s, Slot::Done(_))).count();
    let failed: Vec<&Failure> = slots
        .iter()
        .filter_map(|s| match s {
            Slot::Failed(f) => Some(f),
            _ => None,
        })
        .collect();
    let needed = match join {
        Join::All => total,
        Join::Any => 1,
        Join::AtLeast(n) => n,
    };
    let outcome = if done >= needed {
        let mut outputs = serde_json::Map::new();
        for (slot, branch) in slots.iter().zip(branches) {
            if let Slot::Done(v) = slot {
                outputs.insert(branch.name.clone(), v.clone());
            }
        }
        if join == Join::Any {
            Progress::Done(
                outputs
                    .into_iter()
                    .next()
                    .map(|(_, v)| v)
                    .unwrap_or(Value::Null),
            )
        } else {
            Progress::Done(Value::Object(outputs))
        }
    } else if total - failed.len() < needed {
        let first = failed.first().map_or_else(
            || Failure {
                code: "join".into(),
                message: "not enough branches".into(),
                retryable: false,
            },
            |f| (*f).clone(),
        );
        Progress::Failed(Failure {
            message: format!(
                "parallel step '{}' needs {needed} of {total} branches and {} failed; first: {}",
                step.name,
                failed.len(),
                first.message
            ),
            ..first
        })
    } else {
        return Progress::Running;
    };
    for slot in slots.iter_mut() {
        if let Slot::Running(block) = slot {
            let mut ids = Vec::new();
            block.child_ids(&mut ids);
            for child_id in ids {
                env.commands.push(Command::CancelChild { child_id });
            }
            *slot = Slot::Failed(Failure {
                code: "abandoned".into(),
                message: "not needed".into(),
                retryable: false,
            });
        }
    }
    outcome
}

impl Node {
    fn visit(
        &mut self,
        visit: &mut Visit<'_>,
        scope: &Scope<'_>,
        env: &mut Env<'_>,
    ) -> Option<Progress> {
        match self {
            Node::Task(run) => run.visit(visit, env),
            Node::Nested(block) => block.visit(visit, Some(scope), env),
            Node::Parallel { step, slots } => {
                let mut changed = false;
                for slot in slots.iter_mut() {
                    if let Slot::Running(block) = slot {
                        if let Some(progress) = block.visit(visit, Some(scope), env) {
                            changed = true;
                            match progress {
                                Progress::Running => {}
                                Progress::Done(v) => *slot = Slot::Done(v),
                                Progress::Failed(f) => *slot = Slot::Failed(f),
                                Progress::Filtered(v) => return Some(Progress::Filtered(v)),
                            }
                        }
                    }
                }
                if !changed {
                    return None;
                }
                let step = env.def.step(step);
                let Kind::Parallel { join, .. } = &step.kind else {
                    return None;
                };
                Some(join_branches(step, *join, slots, env))
            }
            Node::Map {
                running, results, ..
            } => {
                let mut changed = false;
                let indexes: Vec<usize> = running.keys().copied().collect();
                for i in indexes {
                    let Some(block) = running.get_mut(&i) else {
                        continue;
                    };
                    let Some(progress) = block.visit(visit, Some(scope), env) else {
                        continue;
                    };
                    changed = true;
                    match progress {
                        Progress::Running => {}
                        Progress::Done(v) => {
                            if let Some(slot) = results.get_mut(i) {
                                *slot = Some(v);
                            }
                            running.remove(&i);
                        }
                        Progress::Failed(f) => {
                            for (_, block) in std::mem::take(running) {
                                let mut ids = Vec::new();
                                block.child_ids(&mut ids);
                                env.commands.extend(
                                    ids.into_iter()
                                        .map(|child_id| Command::CancelChild { child_id }),
                                );
                            }
                            return Some(Progress::Failed(f));
                        }
                        Progress::Filtered(v) => return Some(Progress::Filtered(v)),
                    }
                }
                if !changed {
                    return None;
                }
                Some(self.fill_map(Some(scope), env))
            }
            Node::Copy { step, slots } => {
                let mut changed = false;
                for slot in slots.iter_mut() {
                    if let Slot::Running(run) = slot {
                        if let Some(progress) = run.visit(visit, env) {
                            changed = true;
                            match progress {
                                Progress::Running => {}
                                Progress::Done(v) => *slot = Slot::Done(v),
                                Progress::Failed(f) => return Some(Progress::Failed(f)),
                                Progress::Filtered(v) => return Some(Progress::Filtered(v)),
                            }
                        }
                    }
                }
                if !changed {
                    return None;
                }
                let Kind::Copy { tasks, first } = &env.def.step(step).kind else {
                    return None;
                };
                let done: Vec<(&String, &Value)> = slots
                    .iter()
                    .zip(tasks)
                    .filter_map(|(s, t)| match s {
                        Slot::Done(v) => Some((t, v)),
                        _ => None,
                    })
                    .collect();
                if *first && !done.is_empty() {
                    Some(Progress::Done(done[0].1.clone()))
                } else if done.len() == tasks.len() {
                    Some(Progress::Done(Value::Object(
                        done.into_iter()
                            .map(|(t, v)| (t.clone(), v.clone()))
                            .collect(),
                    )))
                } else {
                    Some(Progress::Running)
                }
            }
            Node::Sleep { due, input } => match visit {
                Visit::Timer if *due <= env.now => Some(Progress::Done(input.clone())),
                _ => None,
            },
            Node::Wait {
                step,
                signal,
                due,
                prefix,
                input,
            } => match visit {
                Visit::Signal {
                    name,
                    payload,
                    consumed,
                } if !*consumed && *name == signal.as_str() => {
                    *consumed = true;
                    Some(Progress::Done((*payload).clone()))
                }
                Visit::Timer if due.is_some_and(|d| d <= env.now) => {
                    let step = env.def.step(step);
                    let Kind::Wait {
                        on_timeout,
                        timeout,
                        signal,
                        ..
                    } = &step.kind
                    else {
                        return None;
                    };
                    if on_timeout.is_some() {
                        // Timeout steps run in the wait's place.
                        let mut block = Block::new(
                            BlockOf::OnTimeout(step.name.clone()),
                            prefix.clone(),
                            input.clone(),
                            None,
                        );
                        let progress = block.run(Some(scope), env);
                        if progress == Progress::Running {
                            *self = Node::Nested(block);
                        }
                        Some(progress)
                    } else {
                        let t = timeout
                            .map(|t| humantime::format_duration(t).to_string())
                            .unwrap_or_default();
                        Some(Progress::Failed(Failure {
                            code: "timeout".into(),
                            message: format!("no signal '{signal}' within {t}"),
                            retryable: false,
                        }))
                    }
                }
                _ => None,
            },
            Node::Child { child_id } => match visit {
                Visit::Result(r) if r.task_id == *child_id => Some(match &r.outcome {
                    Outcome::Completed(v) => Progress::Done(v.clone()),
                    Outcome::Failed(f) => Progress::Failed(Failure {
                        message: format!("child workflow {child_id} failed: {}", f.message),
                        ..f.clone()
                    }),
                }),
                _ => None,
            },
        }
    }

    /// Starts map iterations up to the concurrency limit; Done when every element has its output.
    fn fill_map(&mut self, scope: Option<&Scope<'_>>, env: &mut Env<'_>) -> Progress {
        let Node::Map {
            step,
            path,
            items,
            next,
            running,
            results,
        } = self
        else {
            return Progress::Running;
        };
        let Kind::Map { concurrency, .. } = &env.def.step(step).kind else {
            return Progress::Running;
        };
        while running.len() < *concurrency && *next < items.len() {
            let i = *next;
            *next += 1;
            let Some(item) = items.get(i).cloned() else {
                break;
            };
            let mut block = Block::new(
                BlockOf::Body(step.clone()),
                format!("{path}[{i}]/"),
                item.clone(),
                Some((i, item)),
            );
            match block.run(scope, env) {
                Progress::Running => {
                    running.insert(i, block);
                }
                Progress::Done(v) => {
                    if let Some(slot) = results.get_mut(i) {
                        *slot = Some(v);
                    }
                }
                Progress::Failed(f) => return Progress::Failed(f),
                Progress::Filtered(v) => return Progress::Filtered(v),
            }
        }
        if running.is_empty() && *next >= items.len() {
            Progress::Done(Value::Array(
                results
                    .iter()
                    .map(|r| r.clone().unwrap_or(Value::Null))
                    .collect(),
            ))
        } else {
            Progress::Running
        }
    }

    fn next_timer(&self) -> Option<Millis> {
        match self {
            Node::Task(run) => run.next_timer(),
            Node::Nested(block) => block.next_timer(),
            Node::Parallel { slots, .. } => slots
                .iter()
                .filter_map(|s| match s {
                    Slot::Running(b) => b.next_timer(),
                    _ => None,
                })
                .min(),
            Node::Map { running, .. } => running.values().filter_map(Block::next_timer).min(),
            Node::Copy { slots, .. } => slots
                .iter()
                .filter_map(|s| match s {
                    Slot::Running(r) => r.next_timer(),
                    _ => None,
                })
                .min(),
            Node::Sleep { due, .. } => Some(*due),
            Node::Wait { due, .. } => *due,
            Node::Child { .. } => None,
        }
    }

    fn child_ids(&self, out: &mut Vec<String>) {
        match self {
            Node::Child { child_id } => out.push(child_id.clone()),
            Node::Nested(block) => block.child_ids(out),
            Node::Parallel { slots, .. } => slots.iter().for_each(|s| {
                if let Slot::Running(b) = s {
                    b.child_ids(out)
                }
            }),
            Node::Map { running, .. } => running.values().for_each(|b| b.child_ids(out)),
            _ => {}
        }
    }
}

/// An instance whose stored state does not fit the definition it is pinned to: the input was not applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("workflow {workflow_id}: its state does not match its definition: {message}")]
pub struct EngineError {
    pub workflow_id: String,
    pub message: String,
}

fn kind_name(kind: &Kind) -> &'static str {
    match kind {
        Kind::Task { .. } => "task",
        Kind::Sequence { .. } => "sequence",
        Kind::Parallel { .. } => "parallel",
        Kind::Map { .. } => "map",
        Kind::Choice { .. } => "choice",
        Kind::Filter { .. } => "filter",
        Kind::Copy { .. } => "copy",
        Kind::Merge { .. } => "merge",
        Kind::Sleep { .. } => "sleep",
        Kind::Timer { .. } => "timer",
        Kind::Wait { .. } => "wait",
        Kind::Workflow { .. } => "workflow",
    }
}

fn step_of<'d>(definition: &'d Definition, name: &str) -> Result<&'d Step, String> {
    definition
        .find_step(name)
        .ok_or_else(|| format!("it refers to step '{name}', which the definition does not have"))
}

fn conform_block(block: &Block, definition: &Definition) -> Result<(), String> {
    let steps: &[Step] = match &block.of {
        BlockOf::Root => &definition.steps,
        BlockOf::Body(name) => match &step_of(definition, name)?.kind {
            Kind::Sequence { steps } | Kind::Map { steps, .. } | Kind::Filter { steps, .. } => {
                steps
            }
            other => {
                return Err(format!(
                    "step '{name}' is a {}, not a block of steps",
                    kind_name(other)
                ))
            }
        },
        BlockOf::Branch(name, i) => match &step_of(definition, name)?.kind {
            Kind::Parallel { branches, .. } if *i < branches.len() => &branches[*i].steps,
            Kind::Choice { branches } if *i < branches.len() => &branches[*i].steps,
            other => {
                return Err(format!(
                    "step '{name}' ({}) has no branch {i}",
                    kind_name(other)
                ))
            }
        },
        BlockOf::OnTimeout(name) => match &step_of(definition, name)?.kind {
            Kind::Wait {
                on_timeout: Some(steps),
                ..
            } => steps,
            other => {
                return Err(format!(
                    "step '{name}' ({}) has no on_timeout steps",
                    kind_name(other)
                ))
            }
        },
    };
    let Some(node) = &block.current else {
        return Ok(());
    };
    let Some(step) = steps.get(block.index) else {
        return Err(format!(
            "a block runs its step {} but has only {} steps",
            block.index,
            steps.len()
        ));
    };
    let expected = match node.as_ref() {
        Node::Task(run) => {
            conform_task(run, definition)?;
            "task"
        }
        Node::Nested(inner) => {
            conform_block(inner, definition)?;
            return Ok(());
        }
        Node::Parallel { step: name, slots } => {
            match &step_of(definition, name)?.kind {
                Kind::Parallel { branches, .. } if branches.len() == slots.len() => {}
                _ => {
                    return Err(format!(
                        "parallel step '{name}' does not have {} branches",
                        slots.len()
                    ))
                }
            }
            for slot in slots {
                if let Slot::Running(b) = slot {
                    conform_block(b, definition)?;
                }
            }
            "parallel"
        }
        Node::Map {
            step: name,
            items,
            next,
            running,
            results,
            ..
        } => {
            if !matches!(step_of(definition, name)?.kind, Kind::Map { .. }) {
                return Err(format!("step '{name}' is not a map"));
            }
            let in_range = results.len() == items.len()
                && *next <= items.len()
                && running.keys().all(|i| *i < items.len());
            if !in_range {
                return Err(format!(
                    "map step '{name}' has iterations outside its items"
                ));
            }
            for b in running.values() {
                conform_block(b, definition)?;
            }
            "map"
        }
        Node::Copy { step: name, slots } => {
            match &step_of(definition, name)?.kind {
                Kind::Copy { tasks, .. } if tasks.len() == slots.len() => {}
                _ => {
                    return Err(format!(
                        "copy step '{name}' does not have {} tasks",
                        slots.len()
                    ))
                }
            }
            for slot in slots {
                if let Slot::Running(run) = slot {
                    conform_task(run, definition)?;
                }
            }
            "copy"
        }
        Node::Wait { step: name, .. } => {
            if !matches!(step_of(definition, name)?.kind, Kind::Wait { .. }) {
                return Err(format!("step '{name}' is not a wait"));
            }
            "wait"
        }
        Node::Sleep { .. } | Node::Child { .. } => return Ok(()),
    };
    let actual = kind_name(&step.kind);
    if actual != expected {
        return Err(format!(
            "step '{}' runs as a {expected} but the definition makes it a {actual}",
            step.name
        ));
    }
    Ok(())
}

fn conform_task(run: &TaskRun, definition: &Definition) -> Result<(), String> {
    step_of(definition, &run.step).map(|_| ())
}

impl Instance {
    /// Starts an instance of `definition` and runs it as far as it goes without waiting.
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
            parent: start.parent,
            depth: start.depth,
            created_at: now,
            updated_at: now,
            trace_context: None,
            sequence: 1,
            deadline_at: definition.deadline.map(|d| later(now, d.as_millis())),
            root: None,
            undo_log: Vec::new(),
            undoing: None,
            seen_signals: VecDeque::new(),
            buffered: VecDeque::new(),
            secrets: Secrets::default(),
        };
        instance
            .secrets
            .collect(&definition.sensitive, &Root::Input, &start.input);
        let mut commands = vec![event(
            &instance.workflow_id,
            EventKind::WorkflowStarted,
            None,
            None,
            None,
        )];
        if instance.depth > definition.max_child_depth {
            let message = format!(
                "child workflows are nested {} deep; at most {} are allowed (max_child_depth): a chain of \
                 workflows starting each other without end?",
                instance.depth, definition.max_child_depth
            );
            commands.extend(instance.abort("too_deep", message, now));
            return (instance, commands);
        }
        let mut root = Block::new(BlockOf::Root, String::new(), start.input, None);
        let (progress, more) = instance.with_env(definition, now, |env| root.run(None, env));
        commands.extend(more);
        instance.root = Some(root);
        commands.extend(instance.settle(definition, progress, now));
        let commands = instance.observed(definition, commands);
        (instance, commands)
    }

    /// Ends a running instance at once as failed, without compensation: for what the driver cannot carry on
    /// with (a state too large to persist, a child chain too deep). Running children are cancelled and a parent
    /// is told. An instance that has ended already is left as it is.
    pub fn abort(&mut self, code: &str, message: String, now: Millis) -> Vec<Command> {
        if self.is_terminal() {
            return Vec::new();
        }
        self.touch(now);
        let mut ids = Vec::new();
        if let Some(root) = self.root.take() {
            root.child_ids(&mut ids);
        }
        self.undo_log.clear();
        self.undoing = None;
        self.buffered.clear();
        let mut commands: Vec<Command> = ids
            .into_iter()
            .map(|child_id| Command::CancelChild { child_id })
            .collect();
        commands.extend(self.end_unsuccessfully(
            Status::Failed,
            EventKind::WorkflowFailed,
            code,
            message,
        ));
        self.scrub_commands(&mut commands);
        commands
    }

    /// Checks that this instance's running state fits `definition`: every step it refers to exists and is of
    /// the kind the state says, every index is in range. State read back from storage, or an instance whose
    /// definition changed under it, is checked before any input is applied, so the engine never acts on a tree
    /// that does not match.
    pub fn conforms(&self, definition: &Definition) -> Result<(), EngineError> {
        let fail = |message: String| EngineError {
            workflow_id: self.workflow_id.clone(),
            message,
        };
        if definition.name != self.workflow_name {
            return Err(fail(format!(
                "the instance is of workflow '{}' but was given definition '{}'",
                self.workflow_name, definition.name
            )));
        }
        if self.status == Status::Running && self.root.is_none() {
            return Err(fail("a running instance has no running steps".into()));
        }
        if let Some(root) = &self.root {
            conform_block(root, definition).map_err(fail)?;
        }
        if let Some(undoing) = &self.undoing {
            conform_task(&undoing.current, definition).map_err(fail)?;
        }
        for entry in &self.undo_log {
            if definition.find_step(&entry.step).is_none() {
                return Err(fail(format!(
                    "compensation of step '{}' refers to a step the definition does not have",
                    entry.step
                )));
            }
        }
        Ok(())
    }

    pub fn is_terminal(&self) -> bool {
        !matches!(self.status, Status::Running | Status::Compensating)
    }

    /// When this instance next needs [`Instance::on_timer`], if ever.
    pub fn next_timer(&self) -> Option<Millis> {
        match self.status {
            Status::Running => {
                let tree = self.root.as_ref().and_then(Block::next_timer);
                [tree, self.deadline_at].into_iter().flatten().min()
            }
            Status::Compensating => self.undoing.as_ref().and_then(|u| u.current.next_timer()),
            _ => None,
        }
    }

    /// Applies a task result (or a child workflow's end). Changes nothing unless it answers a running attempt.
    pub fn on_result(
        &mut self,
        definition: &Definition,
        result: TaskOutcome,
        now: Millis,
    ) -> Result<Vec<Command>, EngineError> {
        self.conforms(definition)?;
        let commands = self.apply(definition, &mut Visit::Result(&result), now);
        Ok(self.observed(definition, commands))
    }

    /// Fires what is due: retries, task timeouts, sleeps, wait timeouts, the deadline.
    pub fn on_timer(
        &mut self,
        definition: &Definition,
        now: Millis,
    ) -> Result<Vec<Command>, EngineError> {
        self.conforms(definition)?;
        let commands = self.fire(definition, now);
        Ok(self.observed(definition, commands))
    }

    fn fire(&mut self, definition: &Definition, now: Millis) -> Vec<Command> {
        if self.status == Status::Running && self.deadline_at.is_some_and(|d| d <= now) {
            self.touch(now);
            let deadline = definition
                .deadline
                .map(|d| humantime::format_duration(d).to_string())
                .unwrap_or_default();
            return self.begin_undo(
                definition,
                End::Failed,
                format!("the workflow's deadline of {deadline} passed"),
                now,
            );
        }
        self.apply(definition, &mut Visit::Timer, now)
    }

    /// Delivers a named signal: to a wait listening for it, or kept for a wait that comes later. A signal id seen
    /// before is ignored.
    pub fn on_signal(
        &mut self,
        definition: &Definition,
        signal_id: &str,
        name: &str,
        payload: Value,
        now: Millis,
    ) -> Result<Vec<Command>, EngineError> {
        self.conforms(definition)?;
        let commands = self.signal(definition, signal_id, name, payload, now);
        Ok(self.observed(definition, commands))
    }

    fn signal(
        &mut self,
        definition: &Definition,
        signal_id: &str,
        name: &str,
        payload: Value,
        now: Millis,
    ) -> Vec<Command> {
        if self.is_terminal() || !self.remember_signal(signal_id) {
            return Vec::new();
        }
        self.touch(now);
        self.secrets.collect(
            &definition.sensitive,
            &Root::Signal(name.to_string()),
            &payload,
        );
        let mut visit = Visit::Signal {
            name,
            payload: &payload,
            consumed: false,
        };
        let commands = if self.status == Status::Running {
            self.apply_running(definition, &mut visit, now)
        } else {
            Vec::new()
        };
        if let Visit::Signal {
            consumed: false, ..
        } = visit
        {
            if self.buffered.len() >= SIGNAL_BUFFER {
                self.buffered.pop_front();
            }
            self.buffered.push_back(BufferedSignal {
                name: name.to_string(),
                payload,
            });
        }
        commands
    }

    /// Cancels a running instance: its completed steps are compensated, then it ends as cancelled.
    pub fn on_cancel(
        &mut self,
        definition: &Definition,
        signal_id: &str,
        reason: &str,
        now: Millis,
    ) -> Result<Vec<Command>, EngineError> {
        self.conforms(definition)?;
        if self.status != Status::Running || !self.remember_signal(signal_id) {
            return Ok(Vec::new());
        }
        self.touch(now);
        let reason = if reason.is_empty() {
            "cancelled".to_string()
        } else {
            format!("cancelled: {reason}")
        };
        let commands = self.begin_undo(definition, End::Cancelled, reason, now);
        Ok(self.observed(definition, commands))
    }

    /// `value` as observers may see it: every sensitive value this instance has seen masked.
    pub fn redact(&self, value: &Value) -> Value {
        self.secrets.scrub(value)
    }

    /// `text` as observers may see it (see [`Instance::redact`]).
    pub fn redact_text(&self, text: &str) -> String {
        self.secrets.scrub_text(text)
    }

    /// Whether anything this instance shows is masked.
    pub fn has_secrets(&self) -> bool {
        !self.secrets.is_empty()
    }

    /// The commands of a change, after collecting the sensitive values that completed steps and the workflow's
    /// output brought, with their lifecycle event details and failure reports masked. Task inputs, child inputs
    /// and outputs reported to a parent stay real: workers and workflows act on them.
    fn observed(&mut self, definition: &Definition, mut commands: Vec<Command>) -> Vec<Command> {
        if definition.sensitive.is_empty() && self.secrets.is_empty() {
            return commands;
        }
        for command in &commands {
            let Command::Emit(Event {
                kind,
                step,
                detail: Some(detail),
                ..
            }) = command
            else {
                continue;
            };
            let root = match (kind, step) {
                (EventKind::StepCompleted, Some(path)) => {
                    let name = path.rsplit('/').next().unwrap_or(path);
                    Root::Step(name.to_string())
                }
                (EventKind::WorkflowCompleted | EventKind::WorkflowFiltered, None) => Root::Output,
                _ => continue,
            };
            self.secrets.collect(&definition.sensitive, &root, detail);
        }
        self.scrub_commands(&mut commands);
        commands
    }

    fn scrub_commands(&self, commands: &mut [Command]) {
        if self.secrets.is_empty() {
            return;
        }
        for command in commands {
            match command {
                Command::Emit(Event {
                    detail: Some(detail),
                    ..
                }) => self.secrets.scrub_in_place(detail),
                Command::ReportToParent {
                    outcome: Outcome::Failed(failure),
                    ..
                } => failure.message = self.secrets.scrub_text(&failure.message),
                _ => {}
            }
        }
    }

    fn remember_signal(&mut self, signal_id: &str) -> bool {
        if self.seen_signals.iter().any(|s| s == signal_id) {
            return false;
        }
        if self.seen_signals.len() >= SIGNAL_MEMORY {
            self.seen_signals.pop_front();
        }
        self.seen_signals.push_back(signal_id.to_string());
        true
    }

    fn touch(&mut self, now: Millis) {
        self.sequence = self.sequence.saturating_add(1);
        self.updated_at = now;
    }

    fn with_env<T>(
        &mut self,
        definition: &Definition,
        now: Millis,
        f: impl FnOnce(&mut Env<'_>) -> T,
    ) -> (T, Vec<Command>) {
        let mut env = Env {
            def: definition,
            wf: &self.workflow_id,
            input: &self.input,
            now,
            commands: Vec::new(),
            undo_log: &mut self.undo_log,
            buffered: &mut self.buffered,
        };
        let out = f(&mut env);
        (out, env.commands)
    }

    fn apply(
        &mut self,
        definition: &Definition,
        visit: &mut Visit<'_>,
        now: Millis,
    ) -> Vec<Command> {
        match self.status {
            Status::Running => self.apply_running(definition, visit, now),
            Status::Compensating => self.apply_undo(definition, visit, now),
            _ => Vec::new(),
        }
    }

    fn apply_running(
        &mut self,
        definition: &Definition,
        visit: &mut Visit<'_>,
        now: Millis,
    ) -> Vec<Command> {
        let Some(mut root) = self.root.take() else {
            return Vec::new();
        };
        let (progress, mut commands) =
            self.with_env(definition, now, |env| root.visit(visit, None, env));
        self.root = Some(root);
        if let Some(progress) = progress {
            self.touch(now);
            commands.extend(self.settle(definition, progress, now));
        }
        commands
    }

    /// Acts on where the whole tree is.
    fn settle(&mut self, definition: &Definition, progress: Progress, now: Millis) -> Vec<Command> {
        let mut commands = Vec::new();
        match progress {
            Progress::Running => {}
            Progress::Done(last) => {
                let output = match &definition.output {
                    None => Ok(last),
                    Some(e) => {
                        let no_outputs = BTreeMap::new();
                        let scope = Scope {
                            parent: None,
                            outputs: self.root.as_ref().map_or(&no_outputs, |r| &r.outputs),
                            item: None,
                        };
                        let context = context_of(
                            Some(&scope),
                            &last,
                            &self.input,
                            &self.workflow_id,
                            &definition.name,
                        );
                        expr::eval(e, &context)
                    }
                };
                let limit = definition.max_payload_bytes;
                let output = output.and_then(|o| {
                    if json_exceeds(&o, limit) {
                        Err(format!(
                            "it is over {limit} bytes (max_payload_bytes); output_too_large"
                        ))
                    } else {
                        Ok(o)
                    }
                });
                match output {
                    Ok(output) => {
                        commands.extend(self.end_successfully(
                            Status::Completed,
                            EventKind::WorkflowCompleted,
                            output,
                        ));
                    }
                    Err(message) => {
                        return self.begin_undo(
                            definition,
                            End::Failed,
                            format!("the workflow's output expression failed: {message}"),
                            now,
                        )
                    }
                }
            }
            Progress::Filtered(output) => {
                commands.extend(self.end_successfully(
                    Status::Filtered,
                    EventKind::WorkflowFiltered,
                    output,
                ));
            }
            Progress::Failed(failure) => {
                return self.begin_undo(definition, End::Failed, failure.message, now)
            }
        }
        commands
    }

    fn report(&self, outcome: Outcome) -> Vec<Command> {
        match &self.parent {
            Some(parent_id) => vec![Command::ReportToParent {
                parent_id: parent_id.clone(),
                task_id: self.workflow_id.clone(),
                outcome,
            }],
            None => Vec::new(),
        }
    }

    /// Stops the tree and undoes completed steps in reverse order; ends at once when there is nothing to undo.
    fn begin_undo(
        &mut self,
        definition: &Definition,
        end: End,
        error: String,
        now: Millis,
    ) -> Vec<Command> {
        let mut commands = Vec::new();
        if let Some(root) = self.root.take() {
            let mut ids = Vec::new();
            root.child_ids(&mut ids);
            commands.extend(
                ids.into_iter()
                    .map(|child_id| Command::CancelChild { child_id }),
            );
        }
        self.error = Some(error.clone());
        if self.undo_log.is_empty() {
            let (status, kind) = match end {
                End::Failed => (Status::Failed, EventKind::WorkflowFailed),
                End::Cancelled => (Status::Cancelled, EventKind::WorkflowCancelled),
            };
            commands.extend(self.end_unsuccessfully(status, kind, "workflow_failed", error));
            return commands;
        }
        self.status = Status::Compensating;
        commands.push(event(
            &self.workflow_id,
            EventKind::Compensating,
            None,
            None,
            Some(Value::String(error)),
        ));
        commands.extend(self.next_undo(definition, end, now));
        commands
    }

    /// Ends the instance with `status` and `output`: the end event, and the report to a parent.
    fn end_successfully(&mut self, status: Status, kind: EventKind, output: Value) -> Vec<Command> {
        self.root = None;
        self.status = status;
        self.output = Some(output.clone());
        let mut commands = vec![event(
            &self.workflow_id,
            kind,
            None,
            None,
            Some(output.clone()),
        )];
        commands.extend(self.report(Outcome::Completed(output)));
        commands
    }

    /// Ends the instance with `status`: the end event, and the report to a parent that it failed.
    fn end_unsuccessfully(
        &mut self,
        status: Status,
        kind: EventKind,
        code: &str,
        error: String,
    ) -> Vec<Command> {
        self.status = status;
        self.error = Some(error.clone());
        let mut commands = vec![event(
            &self.workflow_id,
            kind,
            None,
            None,
            Some(Value::String(error.clone())),
        )];
        commands.extend(self.report(Outcome::Failed(Failure {
            code: code.into(),
            message: error,
            retryable: false,
        })));
        commands
    }

    fn next_undo(&mut self, definition: &Definition, end: End, now: Millis) -> Vec<Command> {
        let Some(entry) = self.undo_log.pop() else {
            self.undoing = None;
            let (status, kind) = match end {
                End::Failed => (Status::Compensated, EventKind::WorkflowCompensated),
                End::Cancelled => (Status::Cancelled, EventKind::WorkflowCancelled),
            };
            let error = self.error.clone().unwrap_or_default();
            return self.end_unsuccessfully(status, kind, "workflow_failed", error);
        };
        let input = json!({"input": entry.input, "output": entry.output, "error": self.error});
        let step = definition.step(&entry.step).clone();
        let (run, commands) = self.with_env(definition, now, |env| {
            TaskRun::start(
                &step,
                format!("undo/{}", entry.path),
                entry.task_type.clone(),
                input,
                true,
                env,
            )
        });
        self.undoing = Some(Undoing { end, current: run });
        commands
    }

    fn apply_undo(
        &mut self,
        definition: &Definition,
        visit: &mut Visit<'_>,
        now: Millis,
    ) -> Vec<Command> {
        let Some(mut undoing) = self.undoing.take() else {
            return Vec::new();
        };
        let (progress, mut commands) =
            self.with_env(definition, now, |env| undoing.current.visit(visit, env));
        let end = undoing.end;
        let path = undoing.current.path.clone();
        let attempt = undoing.current.attempt;
        self.undoing = Some(undoing);
        let Some(progress) = progress else {
            return commands;
        };
        self.touch(now);
        match progress {
            Progress::Done(output) => {
                commands.push(event(
                    &self.workflow_id,
                    EventKind::StepCompleted,
                    Some(&path),
                    Some(attempt),
                    Some(output),
                ));
                commands.extend(self.next_undo(definition, end, now));
            }
            Progress::Failed(failure) => {
                self.undoing = None;
                let error = format!(
                    "{}; then compensation '{path}' failed: {}",
                    self.error.clone().unwrap_or_default(),
                    failure.message
                );
                commands.extend(self.end_unsuccessfully(
                    Status::CompensationFailed,
                    EventKind::CompensationFailed,
                    "compensation_failed",
                    error,
                ));
            }
            Progress::Running | Progress::Filtered(_) => {}
        }
        commands
    }

    /// The input of the running task attempt `task_id`, if that attempt is running. Lets a stored outbox leave
    /// task inputs out: they are in the tree already.
    pub fn running_task_input(&self, task_id: &str) -> Option<&Value> {
        fn in_run<'a>(run: &'a TaskRun, task_id: &str) -> Option<&'a Value> {
            match &run.phase {
                TaskPhase::Running { task_id: id, .. } if id == task_id => Some(&run.input),
                _ => None,
            }
        }
        fn in_node<'a>(node: &'a Node, task_id: &str) -> Option<&'a Value> {
            match node {
                Node::Task(run) => in_run(run, task_id),
                Node::Nested(b) => in_block(b, task_id),
                Node::Parallel { slots, .. } => slots.iter().find_map(|s| match s {
                    Slot::Running(b) => in_block(b, task_id),
                    _ => None,
                }),
                Node::Map { running, .. } => running.values().find_map(|b| in_block(b, task_id)),
                Node::Copy { slots, .. } => slots.iter().find_map(|s| match s {
                    Slot::Running(r) => in_run(r, task_id),
                    _ => None,
                }),
                Node::Sleep { .. } | Node::Wait { .. } | Node::Child { .. } => None,
            }
        }
        fn in_block<'a>(b: &'a Block, task_id: &str) -> Option<&'a Value> {
            b.current.as_deref().and_then(|n| in_node(n, task_id))
        }
        self.root
            .as_ref()
            .and_then(|b| in_block(b, task_id))
            .or_else(|| {
                self.undoing
                    .as_ref()
                    .and_then(|u| in_run(&u.current, task_id))
            })
    }

    /// Steps of the running tree, for status displays: (path, what it is doing).
    pub fn running_steps(&self) -> Vec<(String, String)> {
        fn walk(node: &Node, out: &mut Vec<(String, String)>) {
            match node {
                Node::Task(t) => out.push((
                    t.path.clone(),
                    match &t.phase {
                        TaskPhase::Running { .. } => format!("attempt {} running", t.attempt),
                        TaskPhase::BackingOff { due } => {
                            format!("attempt {} failed; retry at {due}", t.attempt)
                        }
                    },
                )),
                Node::Nested(b) => walk_block(b, out),
                Node::Parallel { slots, .. } => slots.iter().for_each(|s| {
                    if let Slot::Running(b) = s {
                        walk_block(b, out)
                    }
                }),
                Node::Map { running, .. } => running.values().for_each(|b| walk_block(b, out)),
                Node::Copy { slots, .. } => slots.iter().for_each(|s| {
                    if let Slot::Running(t) = s {
                        walk(&Node::Task(t.clone()), out)
                    }
                }),
                Node::Sleep { due, .. } => out.push(("sleep".into(), format!("until {due}"))),
                Node::Wait { step, signal, .. } => {
                    out.push((step.clone(), format!("waiting for signal '{signal}'")))
                }
                Node::Child { child_id } => {
                    out.push((child_id.clone(), "child workflow running".into()))
                }
            }
        }
        fn walk_block(b: &Block, out: &mut Vec<(String, String)>) {
            if let Some(n) = &b.current {
                walk(n, out)
            }
        }
        let mut out = Vec::new();
        if let Some(root) = &self.root {
            walk_block(root, &mut out);
        }
        if let Some(u) = &self.undoing {
            walk(&Node::Task(u.current.clone()), &mut out);
        }
        out
    }
}
