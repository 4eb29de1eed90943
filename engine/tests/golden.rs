//! Golden histories: one readable file per pattern in `tests/golden/`. Each `.yaml` holds a definition, an input
//! and a list of inputs (results, failures, clock advances, signals, cancels); the engine's commands after each
//! input and the final state are rendered as text and compared with the `.golden` file beside it.
//! `EDOW_UPDATE_GOLDEN=1 cargo test -p edow-engine --test golden` rewrites the files; review the diff.

use std::path::Path;

use edow_engine::{Command, Definition, Failure, Instance, Outcome, Start, TaskOutcome};
use serde::Deserialize;
use serde_json::Value;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct History {
    definition: String,
    input: Value,
    #[serde(default)]
    parent: Option<String>,
    #[serde(default)]
    inputs: Vec<Input>,
}

/// One input; exactly one field is set.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Input {
    /// A task (or child workflow) completed: `[task id, output]`.
    result: Option<(String, Value)>,
    /// A task failed: `[task id, code, retryable]`.
    fail: Option<(String, String, bool)>,
    /// The clock moves on by this many milliseconds, and due timers fire.
    advance: Option<i64>,
    /// A signal: `[signal id, name, payload]`.
    signal: Option<(String, String, Value)>,
    /// A cancel request with this signal id.
    cancel: Option<String>,
}

const WF: &str = "wf";

fn render(commands: &[Command], out: &mut String) {
    for command in commands {
        let line = match command {
            Command::Dispatch(d) => format!(
                "dispatch {} {} {}{}",
                d.task_id,
                d.task_type,
                d.input,
                d.deadline
                    .map(|t| format!(" deadline {t}"))
                    .unwrap_or_default()
            ),
            Command::Emit(e) => format!(
                "event {:?}{}{}",
                e.kind,
                e.step.as_ref().map(|s| format!(" {s}")).unwrap_or_default(),
                e.detail
                    .as_ref()
                    .map(|d| format!(" {d}"))
                    .unwrap_or_default()
            ),
            Command::StartChild {
                child_id,
                name,
                input,
                ..
            } => format!("start child {child_id} ({name}) {input}"),
            Command::CancelChild { child_id } => format!("cancel child {child_id}"),
            Command::ReportToParent {
                parent_id,
                task_id,
                outcome,
            } => {
                format!("report to {parent_id} as {task_id}: {outcome:?}")
            }
        };
        out.push_str("  ");
        out.push_str(&line);
        out.push('\n');
    }
}

fn run(history: &History) -> String {
    let definition = Definition::parse("golden", &history.definition).expect("valid definition");
    let mut now = 1_000;
    let mut out = String::new();
    out.push_str(&format!("> start {}\n", history.input));
    let start = Start {
        workflow_id: WF.into(),
        workflow_version: 1,
        input: history.input.clone(),
        correlation_id: None,
        priority: 0,
        parent: history.parent.clone(),
        depth: 0,
    };
    let (mut instance, commands) = Instance::start(&definition, start, now);
    render(&commands, &mut out);
    for input in &history.inputs {
        now += 1;
        let commands = match input {
            Input {
                result: Some((task_id, output)),
                ..
            } => {
                out.push_str(&format!("> result {task_id} {output}\n"));
                let outcome = Outcome::Completed(output.clone());
                instance
                    .on_result(
                        &definition,
                        TaskOutcome {
                            task_id: task_id.clone(),
                            outcome,
                        },
                        now,
                    )
                    .unwrap()
            }
            Input {
                fail: Some((task_id, code, retryable)),
                ..
            } => {
                out.push_str(&format!(
                    "> fail {task_id} {code}{}\n",
                    if *retryable { " (retryable)" } else { "" }
                ));
                let outcome = Outcome::Failed(Failure {
                    code: code.clone(),
                    message: format!("{code} happened"),
                    retryable: *retryable,
                });
                instance
                    .on_result(
                        &definition,
                        TaskOutcome {
                            task_id: task_id.clone(),
                            outcome,
                        },
                        now,
                    )
                    .unwrap()
            }
            Input {
                advance: Some(ms), ..
            } => {
                now += ms;
                out.push_str(&format!("> clock +{ms} ms = {now}\n"));
                instance.on_timer(&definition, now).unwrap()
            }
            Input {
                signal: Some((id, name, payload)),
                ..
            } => {
                out.push_str(&format!("> signal {name} ({id}) {payload}\n"));
                instance
                    .on_signal(&definition, id, name, payload.clone(), now)
                    .unwrap()
            }
            Input {
                cancel: Some(id), ..
            } => {
                out.push_str(&format!("> cancel ({id})\n"));
                instance
                    .on_cancel(&definition, id, "by the test", now)
                    .unwrap()
            }
            _ => panic!("an input sets exactly one of result, fail, advance, signal, cancel"),
        };
        render(&commands, &mut out);
    }
    out.push_str(&format!("= status {:?}\n", instance.status));
    if let Some(output) = &instance.output {
        out.push_str(&format!("= output {output}\n"));
    }
    if let Some(error) = &instance.error {
        out.push_str(&format!("= error {error}\n"));
    }
    for (step, doing) in instance.running_steps() {
        out.push_str(&format!("= running {step}: {doing}\n"));
    }
    if let Some(t) = instance.next_timer() {
        out.push_str(&format!("= next timer {t}\n"));
    }
    // The state survives its serialisation, as it does through the changelog.
    let back: Instance = serde_json::from_str(&serde_json::to_string(&instance).unwrap()).unwrap();
    assert_eq!(back, instance);
    out
}

#[test]
fn every_pattern_matches_its_golden_history() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let update = std::env::var("EDOW_UPDATE_GOLDEN").is_ok();
    let mut checked = 0;
    let mut entries: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for path in entries
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
    {
        let history: History = serde_yaml_ng::from_str(&std::fs::read_to_string(&path).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let rendered = run(&history);
        let golden = path.with_extension("golden");
        if update {
            std::fs::write(&golden, &rendered).unwrap();
        } else {
            let expected = std::fs::read_to_string(&golden).unwrap_or_else(|_| {
                panic!(
                    "{} is missing; run with EDOW_UPDATE_GOLDEN=1",
                    golden.display()
                )
            });
            assert_eq!(
                rendered,
                expected,
                "{} differs from its golden history",
                path.display()
            );
        }
        checked += 1;
    }
    assert!(checked >= 12, "only {checked} golden histories");
}
