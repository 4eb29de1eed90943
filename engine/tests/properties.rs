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
        depth: 0,
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
                    run.instance
                        .on_result(
                            def,
                            TaskOutcome {
                                task_id: task_id.clone(),
                                outcome,
                            },
                            now,
                        )
                        .unwrap()
                }
                (Input::Complete(_) | Input::Fail(..) | Input::Stale, _) => run
                    .instance
                    .on_result(
                        def,
                        TaskOutcome {
                            task_id: format!("p/nothing/{n}"),
                            outcome: Outcome::Completed(Value::Null),
                        },
                        now,
                    )
                    .unwrap(),
                (Input::Advance(_), _) => run.instance.on_timer(def, now).unwrap(),
                (Input::Signal(i), _) => {
                    let name = ["go", "stop", "go"][*i as usize];
                    run.instance
                        .on_signal(def, &format!("sig-{n}"), name, json!({"n": n}), now)
                        .unwrap()
                }
                (Input::Cancel, _) => run
                    .instance
                    .on_cancel(def, &format!("cancel-{n}"), "random", now)
                    .unwrap(),
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

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// What happens when a definition changes under running instances (a racing deploy, a corrupted record):
    /// the engine refuses or applies, and never panics.
    #[test]
    fn an_instance_given_another_definition_is_refused_or_applied_never_panics(
        shapes in prop::collection::vec(shape(), 1..4),
        other in prop::collection::vec(shape(), 1..4),
        inputs in prop::collection::vec(input(), 0..30),
        more in prop::collection::vec(input(), 1..10),
    ) {
        let def = definition(&shapes);
        let wrong = definition(&other);
        let mut r = run(&def, &inputs, false);
        let consistent = r.instance.conforms(&wrong).is_ok();
        let mut now = 1_000_000;
        for (n, input) in more.iter().enumerate() {
            now += 500;
            let outcome = match input {
                Input::Advance(_) => r.instance.on_timer(&wrong, now),
                Input::Signal(_) => r.instance.on_signal(&wrong, &format!("x{n}"), "go", json!(1), now),
                Input::Cancel => r.instance.on_cancel(&wrong, &format!("c{n}"), "x", now),
                _ => {
                    let task_id = r.outstanding.first().cloned().unwrap_or_default();
                    r.instance.on_result(&wrong, TaskOutcome { task_id, outcome: Outcome::Completed(json!(n)) }, now)
                }
            };
            // A refusal leaves the instance as it was, so the next input meets the same check.
            prop_assert_eq!(outcome.is_ok(), consistent);
            if !consistent { break; }
        }
    }

    /// The definition parser takes arbitrary text (it is read from a topic anyone may write to) without a panic.
    #[test]
    fn the_definition_parser_takes_arbitrary_text(text in ".{0,400}") {
        let _ = Definition::parse("fuzz.yaml", &text);
    }

    /// And mangled versions of real definitions, which get much further into validation than random text.
    #[test]
    fn the_definition_parser_takes_mangled_definitions(
        shapes in prop::collection::vec(shape(), 1..3),
        cut in any::<prop::sample::Index>(),
        junk in "[\\[\\]{}:,'\" a-z0-9-]{0,12}",
    ) {
        let mut renderer = Renderer { next: 0 };
        let yaml = format!("name: random\nsteps: {}\n", renderer.block(&shapes));
        let at = cut.index(yaml.len());
        let mangled = format!("{}{junk}{}", &yaml[..at], &yaml[at..]);
        let _ = Definition::parse("fuzz.yaml", &mangled);
    }

    /// Stored engine state is read from the changelog; arbitrary JSON must not panic the deserializer.
    #[test]
    fn stored_state_of_arbitrary_json_is_refused_not_panicked(text in "[\\[\\]{}:,\"a-zA-Z0-9_ ]{0,300}") {
        let _ = serde_json::from_str::<Instance>(&text);
    }
}

#[test]
fn definition_limits_name_the_field() {
    let wide = format!(
        "name: wide\nsteps:\n  - name: fan\n    parallel:\n      branches: [{}]\n",
        (0..1001)
            .map(|i| format!("{{name: b{i}, steps: [{{name: t{i}, task: t}}]}}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let e = Definition::parse("wide.yaml", &wide).unwrap_err();
    assert_eq!(e.field, "steps[0].parallel.branches");
    assert!(e.message.contains("at most 1000"), "{e}");

    let greedy = "name: greedy\nsteps:\n  - name: all\n    map: { items: input.items, concurrency: 100000, steps: [{ name: one, task: t }] }\n";
    let e = Definition::parse("greedy.yaml", greedy).unwrap_err();
    assert_eq!(e.field, "steps[0].map.concurrency");
    assert!(e.message.contains("max_map_concurrency"), "{e}");

    let mut deep = String::from("{name: leaf, task: t}");
    for level in 0..20 {
        deep = format!("{{name: n{level}, sequence: [{deep}]}}");
    }
    let e = Definition::parse("deep.yaml", &format!("name: deep\nsteps: [{deep}]\n")).unwrap_err();
    assert!(e.message.contains("max_definition_depth"), "{e}");
}

#[test]
fn a_map_over_more_items_than_the_limit_fails_its_step() {
    let def = Definition::parse_with_limits(
        "map.yaml",
        "name: m\nsteps:\n  - name: all\n    map: { items: input.items, concurrency: 1000, steps: [{ name: one, task: t }] }\n",
        &edow_engine::Limits { max_map_items: 100, ..Default::default() },
    )
    .unwrap();
    let start = Start {
        workflow_id: "m1".into(),
        workflow_version: 1,
        input: json!({"items": (0..101).collect::<Vec<_>>()}),
        correlation_id: None,
        priority: 0,
        parent: None,
        depth: 0,
    };
    let (instance, commands) = Instance::start(&def, start, 0);
    assert!(instance.is_terminal());
    assert!(!commands.iter().any(|c| matches!(c, Command::Dispatch(_))));
    let error = instance.error.unwrap();
    assert!(
        error.contains("max_map_items") && error.contains("at most 100"),
        "{error}"
    );
}

#[test]
fn a_child_nested_past_the_limit_fails_and_reports_to_its_parent() {
    let def = Definition::parse("c.yaml", "name: c\nsteps: [{ name: one, task: t }]\n").unwrap();
    let start = Start {
        workflow_id: "p/c".into(),
        workflow_version: 1,
        input: json!({}),
        correlation_id: None,
        priority: 0,
        parent: Some("p".into()),
        depth: 33,
    };
    let (instance, commands) = Instance::start(&def, start, 0);
    assert!(instance.is_terminal());
    assert!(!commands.iter().any(|c| matches!(c, Command::Dispatch(_))));
    let reported = commands.iter().any(|c| matches!(c,
        Command::ReportToParent { parent_id, outcome: Outcome::Failed(f), .. } if parent_id == "p" && f.code == "too_deep"));
    assert!(reported, "{commands:?}");
}

#[test]
fn a_composite_output_over_the_payload_limit_fails_its_step() {
    let def = Definition::parse_with_limits(
        "fan.yaml",
        "name: fan\nsteps:\n  - name: both\n    parallel:\n      branches:\n        - { name: l, steps: [{ name: a, task: t.a }] }\n        - { name: r, steps: [{ name: b, task: t.b }] }\n",
        &edow_engine::Limits { max_payload_bytes: 1_000, ..Default::default() },
    )
    .unwrap();
    let start = Start {
        workflow_id: "f1".into(),
        workflow_version: 1,
        input: json!({}),
        correlation_id: None,
        priority: 0,
        parent: None,
        depth: 0,
    };
    let (mut instance, _) = Instance::start(&def, start, 0);
    let big = json!("x".repeat(600));
    for task in ["f1/a/1", "f1/b/1"] {
        let outcome = TaskOutcome {
            task_id: task.into(),
            outcome: Outcome::Completed(big.clone()),
        };
        instance.on_result(&def, outcome, 1).unwrap();
    }
    assert!(instance.is_terminal());
    let error = instance.error.clone().unwrap();
    assert!(
        error.contains("step 'both'") && error.contains("max_payload_bytes"),
        "{error}"
    );
    assert!(instance.output.is_none());
}
