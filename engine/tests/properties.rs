//! Properties of the engine over random definitions (every step kind, nested) and random input orders:
//! deterministic replay, idempotence under duplicated inputs, bounded state, and consistent ends.

use std::collections::BTreeSet;

use edow_engine::{Command, Definition, EventKind, Failure, Instance, Outcome, Start, TaskOutcome};
use proptest::prelude::*;
use serde_json::{json, Value};

/// A step tree to render as YAML.
#[derive(Debug, Clone)]
enum Shape {
    Task,
    Sequence(Vec<Shape>),
    Parallel(Vec<Vec<Shape>>, u8),
    Map(Vec<Shape>, u8),
    Choice(Vec<Shape>, Vec<Shape>),
    Filter(Vec<Shape>, bool),
    Copy(u8, bool),
    Merge,
    Sleep,
    Wait(bool),
}

fn shape() -> impl Strategy<Value = Shape> {
    let leaf = prop_oneof![
        4 => Just(Shape::Task),
        1 => (1u8..3, any::<bool>()).prop_map(|(n, first)| Shape::Copy(n, first)),
        1 => Just(Shape::Merge),
        1 => Just(Shape::Sleep),
        1 => any::<bool>().prop_map(Shape::Wait),
    ];
    leaf.prop_recursive(2, 12, 3, |inner| {
        let block = prop::collection::vec(inner, 1..3);
        prop_oneof![
            block.clone().prop_map(Shape::Sequence),
            (prop::collection::vec(block.clone(), 1..4), 0u8..4)
                .prop_map(|(b, j)| Shape::Parallel(b, j)),
            (block.clone(), 1u8..3).prop_map(|(b, c)| Shape::Map(b, c)),
            (block.clone(), block.clone()).prop_map(|(a, b)| Shape::Choice(a, b)),
            (block, any::<bool>()).prop_map(|(b, end)| Shape::Filter(b, end)),
        ]
    })
}

struct Renderer {
    next: usize,
}

impl Renderer {
    fn name(&mut self) -> String {
        self.next += 1;
        format!("s{}", self.next)
    }

    fn block(&mut self, shapes: &[Shape]) -> String {
        let steps: Vec<String> = shapes.iter().map(|s| self.step(s)).collect();
        format!("[{}]", steps.join(", "))
    }

    fn step(&mut self, shape: &Shape) -> String {
        let name = self.name();
        let compensate = if self.next % 3 == 0 {
            ", compensate: undo.it"
        } else {
            ""
        };
        match shape {
            Shape::Task => format!(
                "{{name: {name}, task: t.{}, retry: {{max_attempts: 2, initial_backoff: 50ms}}{compensate}}}",
                self.next % 3
            ),
            Shape::Sequence(b) => format!("{{name: {name}, sequence: {}}}", self.block(b)),
            Shape::Parallel(branches, join) => {
                let join = match join {
                    0 => "all".to_string(),
                    1 => "any".to_string(),
                    n => (*n as usize).min(branches.len()).to_string(),
                };
                let rendered: Vec<String> = branches
                    .iter()
                    .enumerate()
                    .map(|(i, b)| format!("{{name: b{i}, steps: {}}}", self.block(b)))
                    .collect();
                format!("{{name: {name}, parallel: {{join: {join}, branches: [{}]}}}}", rendered.join(", "))
            }
            Shape::Map(b, c) => format!(
                "{{name: {name}, map: {{items: 'input.items', concurrency: {c}, steps: {}}}}}",
                self.block(b)
            ),
            Shape::Choice(a, b) => format!(
                "{{name: {name}, choice: [{{when: 'input.flag', steps: {}}}, {{otherwise: {}}}]}}",
                self.block(a),
                self.block(b)
            ),
            Shape::Filter(b, end) => format!(
                "{{name: {name}, filter: {{condition: 'input.pass', otherwise: {}, steps: {}}}}}",
                if *end { "end" } else { "skip" },
                self.block(b)
            ),
            Shape::Copy(n, first) => {
                let tasks: Vec<String> = (0..*n).map(|i| format!("c.{i}")).collect();
                format!("{{name: {name}, copy: {{tasks: [{}], first: {first}}}}}", tasks.join(", "))
            }
            Shape::Merge => format!("{{name: {name}, merge: '{{merged: input.flag}}'}}"),
            Shape::Sleep => format!("{{name: {name}, sleep: 100ms}}"),
            Shape::Wait(timeout) => {
                if *timeout {
                    format!("{{name: {name}, wait: {{signal: go, timeout: 200ms}}}}")
                } else {
                    format!("{{name: {name}, wait: {{signal: go}}}}")
                }
            }
        }
    }
}

fn definition(shapes: &[Shape]) -> Definition {
    let mut renderer = Renderer { next: 0 };
    let steps = renderer.block(shapes);
    let yaml = format!("name: random\ndeadline: 1h\nsteps: {steps}\n");
    Definition::parse("random.yaml", &yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"))
}

/// An input chosen by position among what is outstanding when it is applied.
#[derive(Debug, Clone)]
enum Input {
    Complete(usize),
    Fail(usize, bool),
    Stale,
    Advance(i64),
    Signal(u8),
    Cancel,
}

fn input() -> impl Strategy<Value = Input> {
    prop_oneof![
        6 => any::<usize>().prop_map(Input::Complete),
        2 => (any::<usize>(), any::<bool>()).prop_map(|(k, r)| Input::Fail(k, r)),
        1 => Just(Input::Stale),
        3 => (0i64..400).prop_map(Input::Advance),
        1 => (0u8..3).prop_map(Input::Signal),
        1 => Just(Input::Cancel),
    ]
}

struct Run {
    instance: Instance,
    commands: Vec<Command>,
    outstanding: Vec<String>,
    answered: BTreeSet<String>,
    max_state: usize,
}

impl Run {
    fn absorb(&mut self, commands: Vec<Command>) {
        for command in &commands {
            match command {
                Command::Dispatch(d) => self.outstanding.push(d.task_id.clone()),
                Command::StartChild { child_id, .. } => self.outstanding.push(child_id.clone()),
                _ => {}
            }
        }
        self.commands.extend(commands);
        let size = serde_json::to_string(&self.instance).unwrap().len();
        self.max_state = self.max_state.max(size);
    }
}

fn run(def: &Definition, inputs: &[Input], duplicate: bool) -> Run {
    let start = Start {
        workflow_id: "p".into(),
        workflow_version: 1,
        input: json!({"items": [1, 2, 3], "flag": true, "pass": true}),
        correlation_id: None,
        priority: 0,
        parent: None,
    };
    let (instance, commands) = Instance::start(def, start, 0);
    let mut run = Run {
        instance,
        commands: Vec::new(),
        outstanding: Vec::new(),
        answered: BTreeSet::new(),
        max_state: 0,
    };
    run.absorb(commands);
    let mut now: i64 = 0;
    for (n, input) in inputs.iter().enumerate() {
        now += 1;
        if let Input::Advance(ms) = input {
            now += ms;
        }
        // The concrete input, chosen once, then applied once or twice.
        let target = match input {
            Input::Complete(k) | Input::Fail(k, _) if !run.outstanding.is_empty() => {
                Some(run.outstanding[k % run.outstanding.len()].clone())
            }
            _ => None,
        };
        let times = if duplicate { 2 } else { 1 };
        for _ in 0..times {
            let commands = match (input, &target) {
                (Input::Complete(_) | Input::Fail(..), Some(task_id)) => {
                    let outcome = match input {
                        Input::Fail(_, retryable) => Outcome::Failed(Failure {
                            code: "boom".into(),
                            message: "boom".into(),
                            retryable: *retryable,
                        }),
                        _ => Outcome::Completed(json!({"from": task_id})),
                    };
                    run.answered.insert(task_id.clone());
                    run.instance.on_result(
                        def,
                        TaskOutcome {
                            task_id: task_id.clone(),
                            outcome,
                        },
                        now,
                    )
                }
                (Input::Complete(_) | Input::Fail(..) | Input::Stale, _) => run.instance.on_result(
                    def,
                    TaskOutcome {
                        task_id: format!("p/nothing/{n}"),
                        outcome: Outcome::Completed(Value::Null),
                    },
                    now,
                ),
                (Input::Advance(_), _) => run.instance.on_timer(def, now),
                (Input::Signal(i), _) => {
                    let name = ["go", "stop", "go"][*i as usize];
                    run.instance
                        .on_signal(def, &format!("sig-{n}"), name, json!({"n": n}), now)
                }
                (Input::Cancel, _) => {
                    run.instance
                        .on_cancel(def, &format!("cancel-{n}"), "random", now)
                }
            };
            run.absorb(commands);
        }
        // Keep answered ids out of the choices, so later inputs reach what is still running.
        let answered = run.answered.clone();
        run.outstanding.retain(|t| !answered.contains(t));
    }
    run
}

fn ends(commands: &[Command]) -> usize {
    commands
        .iter()
        .filter(|c| {
            matches!(c, Command::Emit(e) if matches!(
                e.kind,
                EventKind::WorkflowCompleted
                    | EventKind::WorkflowFailed
                    | EventKind::WorkflowCancelled
                    | EventKind::WorkflowCompensated
                    | EventKind::WorkflowFiltered
                    | EventKind::CompensationFailed
            ))
        })
        .count()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn replaying_the_same_inputs_gives_the_same_state_and_commands(
        shapes in prop::collection::vec(shape(), 1..4),
        inputs in prop::collection::vec(input(), 0..40),
    ) {
        let def = definition(&shapes);
        let first = run(&def, &inputs, false);
        let second = run(&def, &inputs, false);
        prop_assert_eq!(&first.instance, &second.instance);
        prop_assert_eq!(&first.commands, &second.commands);
        let json = serde_json::to_string(&first.instance).unwrap();
        let back: Instance = serde_json::from_str(&json).unwrap();
        prop_assert_eq!(back, first.instance);
    }

    #[test]
    fn duplicated_inputs_change_nothing(
        shapes in prop::collection::vec(shape(), 1..4),
        inputs in prop::collection::vec(input(), 0..40),
    ) {
        let def = definition(&shapes);
        let once = run(&def, &inputs, false);
        let twice = run(&def, &inputs, true);
        prop_assert_eq!(once.instance, twice.instance);
        prop_assert_eq!(once.commands, twice.commands);
    }

    #[test]
    fn state_is_bounded_and_ends_are_consistent(
        shapes in prop::collection::vec(shape(), 1..4),
        inputs in prop::collection::vec(input(), 0..80),
    ) {
        let def = definition(&shapes);
        let r = run(&def, &inputs, false);
        let end_events = ends(&r.commands);
        prop_assert!(end_events <= 1, "ended {} times", end_events);
        prop_assert_eq!(end_events == 1, r.instance.is_terminal());
        if r.instance.is_terminal() {
            prop_assert!(r.instance.running_steps().is_empty());
            prop_assert_eq!(r.instance.next_timer(), None);
        }
        // Proportional to the definition (map over 3 items), never to the number of inputs applied.
        let yaml_size = serde_json::to_string(&format!("{shapes:?}")).unwrap().len();
        prop_assert!(r.max_state < 20_000 + 60 * yaml_size, "state grew to {} bytes", r.max_state);
        // Every event id is unique.
        let ids: Vec<&String> = r.commands.iter().filter_map(|c| match c { Command::Emit(e) => Some(&e.event_id), _ => None }).collect();
        let unique: BTreeSet<&&String> = ids.iter().collect();
        prop_assert_eq!(unique.len(), ids.len());
    }
}
