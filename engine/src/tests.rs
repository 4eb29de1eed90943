//! Engine behaviour: sequences, retries with backoff, idempotence, determinism under random inputs.

use proptest::prelude::*;
use serde_json::{json, Value};

use crate::*;

fn definition() -> Definition {
    Definition::parse(
        "order.yaml",
        r#"
name: order
retry: { max_attempts: 3, initial_backoff: 100ms, max_backoff: 1s }
steps:
  - { name: reserve, task: inventory.reserve }
  - { name: charge, task: payment.charge, retry: { max_attempts: 2, initial_backoff: 1s, non_retryable: [card_declined] } }
  - { name: ship, task: shipping.ship }
"#,
    )
    .unwrap()
}

fn start(id: &str) -> Start {
    Start {
        workflow_id: id.into(),
        workflow_version: 1,
        input: json!({"order": id}),
        correlation_id: None,
        priority: 0,
        parent: None,
        depth: 0,
    }
}

fn dispatches(commands: &[Command]) -> Vec<&Dispatch> {
    commands
        .iter()
        .filter_map(|c| match c {
            Command::Dispatch(d) => Some(d),
            _ => None,
        })
        .collect()
}

fn kinds(commands: &[Command]) -> Vec<EventKind> {
    commands
        .iter()
        .filter_map(|c| match c {
            Command::Emit(e) => Some(e.kind),
            _ => None,
        })
        .collect()
}

fn completed(task_id: &str, output: Value) -> TaskOutcome {
    TaskOutcome {
        task_id: task_id.into(),
        outcome: Outcome::Completed(output),
    }
}

fn failed(task_id: &str, code: &str, retryable: bool) -> TaskOutcome {
    TaskOutcome {
        task_id: task_id.into(),
        outcome: Outcome::Failed(Failure {
            code: code.into(),
            message: format!("{code} happened"),
            retryable,
        }),
    }
}

#[test]
fn a_sequence_chains_each_output_into_the_next_input() {
    let d = definition();
    let (mut wf, commands) = Instance::start(&d, start("w1"), 1_000);
    assert_eq!(
        kinds(&commands),
        vec![EventKind::WorkflowStarted, EventKind::StepStarted]
    );
    let first = dispatches(&commands)[0].clone();
    assert_eq!(first.task_id, "w1/reserve/1");
    assert_eq!(first.task_type, "inventory.reserve");
    assert_eq!(first.input, json!({"order": "w1"}));
    assert!(!first.retry);

    let commands = wf
        .on_result(
            &d,
            completed("w1/reserve/1", json!({"reserved": true})),
            1_010,
        )
        .unwrap();
    assert_eq!(
        kinds(&commands),
        vec![EventKind::StepCompleted, EventKind::StepStarted]
    );
    assert_eq!(dispatches(&commands)[0].input, json!({"reserved": true}));

    let commands = wf
        .on_result(&d, completed("w1/charge/1", json!({"charged": 5})), 1_020)
        .unwrap();
    assert_eq!(dispatches(&commands)[0].input, json!({"charged": 5}));
    let commands = wf
        .on_result(&d, completed("w1/ship/1", json!({"shipped": "T-1"})), 1_030)
        .unwrap();
    assert_eq!(
        kinds(&commands),
        vec![EventKind::StepCompleted, EventKind::WorkflowCompleted]
    );
    assert_eq!(wf.status, Status::Completed);
    assert_eq!(wf.output, Some(json!({"shipped": "T-1"})));
    assert_eq!(wf.sequence, 4);
    assert!(wf.running_steps().is_empty());
}

#[test]
fn duplicate_stale_and_late_results_change_nothing() {
    let d = definition();
    let (mut wf, _) = Instance::start(&d, start("w1"), 0);
    wf.on_result(&d, completed("w1/reserve/1", json!(1)), 1)
        .unwrap();
    let before = wf.clone();
    assert!(wf
        .on_result(&d, completed("w1/reserve/1", json!(1)), 2)
        .unwrap()
        .is_empty());
    assert!(wf
        .on_result(&d, completed("w1/charge/7", json!(1)), 2)
        .unwrap()
        .is_empty());
    assert!(wf
        .on_result(&d, completed("other/charge/1", json!(1)), 2)
        .unwrap()
        .is_empty());
    assert_eq!(wf, before);
    wf.on_result(&d, completed("w1/charge/1", json!(2)), 3)
        .unwrap();
    wf.on_result(&d, completed("w1/ship/1", json!(3)), 4)
        .unwrap();
    let done = wf.clone();
    assert!(wf
        .on_result(&d, completed("w1/ship/1", json!(3)), 5)
        .unwrap()
        .is_empty());
    assert!(wf.on_timer(&d, 10_000).unwrap().is_empty());
    assert_eq!(wf, done);
}

#[test]
fn retryable_failures_back_off_then_retry_on_the_retry_topic() {
    let d = definition();
    let (mut wf, _) = Instance::start(&d, start("w1"), 0);
    let commands = wf
        .on_result(&d, failed("w1/reserve/1", "timeout", true), 100)
        .unwrap();
    assert_eq!(
        kinds(&commands),
        vec![EventKind::StepFailed, EventKind::StepRetried]
    );
    assert!(dispatches(&commands).is_empty());
    let due = wf.next_timer().expect("a retry timer");
    assert!(
        (100..=200).contains(&due),
        "full jitter within the 100ms cap: {due}"
    );

    // The old attempt's result, arriving late, is ignored while backing off.
    assert!(wf
        .on_result(&d, completed("w1/reserve/1", json!(1)), 101)
        .unwrap()
        .is_empty());
    assert!(wf.on_timer(&d, due - 1).unwrap().is_empty());
    let commands = wf.on_timer(&d, due).unwrap();
    let retry = dispatches(&commands)[0].clone();
    assert_eq!(
        (retry.task_id.as_str(), retry.attempt, retry.retry),
        ("w1/reserve/2", 2, true)
    );
    assert_eq!(
        retry.input,
        json!({"order": "w1"}),
        "a retry gets the same input"
    );

    wf.on_result(&d, failed("w1/reserve/2", "timeout", true), 300)
        .unwrap();
    let due = wf.next_timer().unwrap();
    assert!((300..=500).contains(&due), "second cap is 200ms: {due}");
    wf.on_timer(&d, due).unwrap();
    let commands = wf
        .on_result(&d, failed("w1/reserve/3", "timeout", true), 600)
        .unwrap();
    assert_eq!(
        kinds(&commands),
        vec![EventKind::StepFailed, EventKind::WorkflowFailed]
    );
    assert_eq!(wf.status, Status::Failed);
    let error = wf.error.clone().unwrap();
    assert!(
        error.contains("reserve") && error.contains("3 attempts") && error.contains("timeout"),
        "{error}"
    );
}

#[test]
fn non_retryable_errors_fail_at_once() {
    let d = definition();
    let (mut wf, _) = Instance::start(&d, start("w1"), 0);
    wf.on_result(&d, completed("w1/reserve/1", json!(1)), 1)
        .unwrap();
    wf.on_result(&d, failed("w1/charge/1", "card_declined", true), 2)
        .unwrap();
    assert_eq!(wf.status, Status::Failed);
    assert!(wf.error.as_ref().unwrap().contains("never retries"));

    let (mut wf, _) = Instance::start(&d, start("w2"), 0);
    wf.on_result(&d, failed("w2/reserve/1", "bad_input", false), 2)
        .unwrap();
    assert_eq!(wf.status, Status::Failed);
    assert!(wf.error.as_ref().unwrap().contains("non-retryable"));
}

#[test]
fn event_ids_are_unique_per_transition_and_stable() {
    let d = definition();
    let (mut wf, mut all) = Instance::start(&d, start("w1"), 0);
    all.extend(
        wf.on_result(&d, failed("w1/reserve/1", "x", true), 1)
            .unwrap(),
    );
    let due = wf.next_timer().unwrap();
    all.extend(wf.on_timer(&d, due).unwrap());
    all.extend(
        wf.on_result(&d, completed("w1/reserve/2", json!(1)), 500)
            .unwrap(),
    );
    let ids: Vec<String> = all
        .iter()
        .filter_map(|c| match c {
            Command::Emit(e) => Some(e.event_id.clone()),
            _ => None,
        })
        .collect();
    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), ids.len(), "{ids:?}");
    assert!(ids.contains(&"w1/WorkflowStarted".to_string()));
    assert!(ids.contains(&"w1/StepRetried/reserve/2".to_string()));
}

/// One input in a random history: a result for (step index, attempt) or a timer at an offset.
#[derive(Debug, Clone)]
enum Input {
    Result {
        step: usize,
        attempt: u32,
        ok: bool,
        retryable: bool,
    },
    Timer {
        advance: i64,
    },
}

fn input() -> impl Strategy<Value = Input> {
    prop_oneof![
        (0usize..3, 1u32..4, any::<bool>(), any::<bool>()).prop_map(
            |(step, attempt, ok, retryable)| {
                Input::Result {
                    step,
                    attempt,
                    ok,
                    retryable,
                }
            }
        ),
        (0i64..2_000).prop_map(|advance| Input::Timer { advance }),
    ]
}

fn run(history: &[Input], duplicate_each: bool) -> (Instance, Vec<Command>) {
    let d = definition();
    let steps = ["reserve", "charge", "ship"];
    let (mut wf, mut commands) = Instance::start(&d, start("p"), 0);
    let mut now = 0;
    for item in history {
        let times = if duplicate_each { 2 } else { 1 };
        match item {
            Input::Result {
                step,
                attempt,
                ok,
                retryable,
            } => {
                now += 1;
                let id = format!("p/{}/{attempt}", steps[*step]);
                let result = if *ok {
                    completed(&id, json!({"from": id}))
                } else {
                    failed(&id, "boom", *retryable)
                };
                for _ in 0..times {
                    commands.extend(wf.on_result(&d, result.clone(), now).unwrap());
                }
            }
            Input::Timer { advance } => {
                now += advance;
                for _ in 0..times {
                    commands.extend(wf.on_timer(&d, now).unwrap());
                }
            }
        }
    }
    (wf, commands)
}

proptest! {
    #[test]
    fn replaying_the_same_inputs_gives_the_same_state_and_commands(history in prop::collection::vec(input(), 0..40)) {
        let first = run(&history, false);
        let second = run(&history, false);
        prop_assert_eq!(&first, &second);
        // The state survives its own serialisation, as it does through the changelog.
        let json = serde_json::to_string(&first.0).unwrap();
        let back: Instance = serde_json::from_str(&json).unwrap();
        prop_assert_eq!(back, first.0);
    }

    #[test]
    fn duplicated_inputs_change_nothing(history in prop::collection::vec(input(), 0..40)) {
        let once = run(&history, false);
        let twice = run(&history, true);
        prop_assert_eq!(once, twice);
    }

    #[test]
    fn state_stays_bounded_and_commands_follow_the_status(history in prop::collection::vec(input(), 0..60)) {
        let (wf, commands) = run(&history, false);
        let completions = kinds(&commands).iter().filter(|k| matches!(k, EventKind::WorkflowCompleted | EventKind::WorkflowFailed)).count();
        prop_assert!(completions <= 1);
        prop_assert_eq!(completions == 1, wf.is_terminal());
        prop_assert_eq!(wf.running_steps().is_empty(), wf.is_terminal());
        let json = serde_json::to_string(&wf).unwrap();
        prop_assert!(json.len() < 1_000, "state grew to {} bytes", json.len());
    }
}

#[test]
fn sensitive_values_are_masked_in_events_but_reach_tasks_and_later_steps() {
    let d = Definition::parse(
        "pay.yaml",
        r#"
name: pay
sensitive: [input.card.number, steps.charge.token]
steps:
  - { name: charge, task: payment.charge, input: "input.card" }
  - { name: receipt, task: mail.receipt, input: "{token: steps.charge.token, to: input.email}" }
  - { name: audit, task: audit.log, retry: { max_attempts: 1 } }
"#,
    )
    .unwrap();
    let mut s = start("p1");
    s.input = json!({"card": {"number": "4111111111111111"}, "email": "ada@example.com"});
    let (mut wf, commands) = Instance::start(&d, s, 1_000);
    assert_eq!(dispatches(&commands)[0].input["number"], "4111111111111111");
    let commands = wf
        .on_result(
            &d,
            completed(
                "p1/charge/1",
                json!({"token": "tok_9f8e7d", "card": "4111111111111111"}),
            ),
            2_000,
        )
        .unwrap();
    let event = |commands: &[Command], kind: EventKind| -> Value {
        commands
            .iter()
            .find_map(|c| match c {
                Command::Emit(e) if e.kind == kind => e.detail.clone(),
                _ => None,
            })
            .unwrap()
    };
    assert_eq!(
        event(&commands, EventKind::StepCompleted),
        json!({"token": "***", "card": "***"})
    );
    // The next task gets the real token.
    assert_eq!(dispatches(&commands)[0].input["token"], "tok_9f8e7d");
    let commands = wf
        .on_result(&d, completed("p1/receipt/1", json!({"sent": true})), 3_000)
        .unwrap();
    assert_eq!(dispatches(&commands)[0].input, json!({"sent": true}));
    // A worker echoing a secret in an error message: masked in the event and in the workflow's error.
    let commands = wf
        .on_result(
            &d,
            TaskOutcome {
                task_id: "p1/audit/1".into(),
                outcome: Outcome::Failed(Failure {
                    code: "bad".into(),
                    message: "refused tok_9f8e7d for card 4111111111111111".into(),
                    retryable: false,
                }),
            },
            4_000,
        )
        .unwrap();
    assert_eq!(
        event(&commands, EventKind::StepFailed)["message"],
        "refused *** for card ***"
    );
    let shown = format!("{commands:?}");
    assert!(
        !shown.contains("tok_9f8e7d") && !shown.contains("4111111111111111"),
        "{shown}"
    );
    let error = wf.error.clone().unwrap();
    assert!(
        error.contains("tok_9f8e7d"),
        "the state keeps the truth: {error}"
    );
    assert!(!wf.redact_text(&error).contains("tok_9f8e7d"));
    assert_eq!(wf.redact(&wf.input)["card"]["number"], "***");
    assert_eq!(wf.redact(&wf.input)["email"], "ada@example.com");
    // The collected values survive the round trip through storage.
    let back: Instance = serde_json::from_value(serde_json::to_value(&wf).unwrap()).unwrap();
    assert_eq!(back.redact(&back.input)["card"]["number"], "***");
}

#[test]
fn sensitive_paths_must_name_what_the_definition_has() {
    for (list, says) in [
        ("[steps.nope.token]", "names step 'nope'"),
        ("[signals.go.code]", "names signal 'go'"),
        ("[card.number]", "starts with neither"),
    ] {
        let text = format!("name: x\nsensitive: {list}\nsteps:\n  - {{ name: a, task: t }}\n");
        let e = Definition::parse("x.yaml", &text).unwrap_err();
        assert!(e.field.starts_with("sensitive[0]"), "{e:?}");
        assert!(e.message.contains(says), "{e:?}");
    }
}
