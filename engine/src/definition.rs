//! Workflow definitions: the YAML (or JSON) a user deploys, parsed strictly and validated before anything runs,
//! with errors that name the file and the field.
//!
//! A definition is a tree: a sequence of steps, some of which hold sequences of their own (parallel branches, map
//! bodies, choice branches, filter bodies, wait timeouts). A tree has no cycles and no step that cannot be
//! reached by construction; validation rejects what still could be wrong: duplicate names, unknown references,
//! bad expressions, choice alternatives after one that always matches, a workflow starting itself as a child.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

use crate::expr;
use crate::limits::Limits;
use crate::redact::{Root, SensitivePath, MAX_PATHS};

/// A parsed, validated workflow definition.
#[derive(Debug, Clone, PartialEq)]
pub struct Definition {
    pub name: String,
    pub description: Option<String>,
    /// Retry policy of every task that does not set its own.
    pub retry: Option<RetryPolicy>,
    /// Longest an instance may run; past it, it fails (and compensates).
    pub deadline: Option<Duration>,
    /// Expression for the workflow's output; default: the last step's output.
    pub output: Option<String>,
    pub steps: Vec<Step>,
    /// Most elements a map step of this definition may iterate over (from the [`Limits`] it was parsed with).
    pub max_map_items: usize,
    /// Largest JSON value a step may produce or be given (from the [`Limits`] it was parsed with).
    pub max_payload_bytes: usize,
    /// Deepest chain of child workflows an instance of this definition may be part of.
    pub max_child_depth: u32,
    /// How a webhook's body names the instance it starts.
    pub hook: Option<Hook>,
    /// When the orchestrator starts instances by itself.
    pub schedule: Option<DefinitionSchedule>,
    /// The schedule's catch-up window, parsed.
    pub schedule_window: Option<Duration>,
    /// Paths whose values observers see masked (see [`crate::redact`]).
    pub sensitive: Vec<SensitivePath>,
    by_name: BTreeMap<String, Step>,
}

/// A schedule declared by a definition (`schedule:`): the orchestrator starts the workflow's latest version at
/// each fire time of `cron`. Checked here for shape; the cron text and the zone are checked at deploy.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DefinitionSchedule {
    /// 5 fields, or 6 with seconds first.
    pub cron: String,
    #[serde(default)]
    pub time_zone: Option<String>,
    #[serde(default)]
    pub input: Option<serde_json::Value>,
    /// skip (default), one or all.
    #[serde(default)]
    pub catch_up: Option<String>,
    /// How far back missed fire times are caught up (default 1h).
    #[serde(default)]
    pub window: Option<String>,
}

/// A webhook's settings (`hook:`): `id` is an expression over `{body, headers}` whose value (a string or a
/// number) is the instance's id, so that a webhook its sender delivers again starts nothing new.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hook {
    pub id: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub name: String,
    pub kind: Kind,
    /// Expression for the step's input; default: the previous step's output (the block's input for the first).
    pub input: Option<String>,
    pub retry: Option<RetryPolicy>,
    /// For tasks: an attempt without a result by then fails as retryable `timeout`.
    pub timeout: Option<Duration>,
    /// Undo task run if the workflow fails or is cancelled after this step completed.
    pub compensate: Option<Compensation>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Compensation {
    pub task: String,
    pub retry: Option<RetryPolicy>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Kind {
    Task {
        task_type: String,
    },
    Sequence {
        steps: Vec<Step>,
    },
    Parallel {
        branches: Vec<Branch>,
        join: Join,
    },
    /// The sharder: the body for each element of `items`, at most `concurrency` at once; outputs in order.
    Map {
        items: String,
        steps: Vec<Step>,
        concurrency: usize,
    },
    /// The splitter: the first branch whose condition holds (or `otherwise`); none: the input passes through.
    Choice {
        branches: Vec<ChoiceBranch>,
    },
    /// Runs `steps` (or passes the input on) when `condition` holds; otherwise skips them or ends the workflow.
    Filter {
        condition: String,
        steps: Vec<Step>,
        otherwise: Otherwise,
    },
    /// The copier: the same input to several task types; output keyed by type, or the first result.
    Copy {
        tasks: Vec<String>,
        first: bool,
    },
    /// The merger: an expression over the earlier outputs.
    Merge {
        expression: String,
    },
    Sleep {
        duration: Duration,
    },
    /// Until an absolute time: an expression giving epoch milliseconds or an RFC 3339 time.
    Timer {
        at: String,
    },
    Wait {
        signal: String,
        timeout: Option<Duration>,
        on_timeout: Option<Vec<Step>>,
    },
    /// A child workflow; its output is this step's output.
    Workflow {
        name: String,
        version: Option<i32>,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Branch {
    pub name: String,
    pub steps: Vec<Step>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ChoiceBranch {
    /// `None` for `otherwise`.
    pub when: Option<String>,
    pub steps: Vec<Step>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Join {
    All,
    /// The first branch to succeed wins; the others are abandoned.
    Any,
    /// Done when this many branches succeed.
    AtLeast(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Otherwise {
    Skip,
    End,
}

/// When and how often a failed task is tried again: exponential backoff with full jitter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    /// Attempts in all, the first included; 1 means no retry.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Backoff cap before jitter for the first retry.
    #[serde(default = "default_initial_backoff", with = "duration_text")]
    pub initial_backoff: Duration,
    /// Growth of the cap per retry.
    #[serde(default = "default_multiplier")]
    pub multiplier: f64,
    /// Largest backoff.
    #[serde(default = "default_max_backoff", with = "duration_text")]
    pub max_backoff: Duration,
    /// Error codes that are never retried.
    #[serde(default)]
    pub non_retryable: Vec<String>,
}

fn default_max_attempts() -> u32 {
    3
}
fn default_initial_backoff() -> Duration {
    Duration::from_secs(1)
}
fn default_multiplier() -> f64 {
    2.0
}
fn default_max_backoff() -> Duration {
    Duration::from_secs(60)
}

impl Default for RetryPolicy {
    fn default() -> RetryPolicy {
        RetryPolicy {
            max_attempts: default_max_attempts(),
            initial_backoff: default_initial_backoff(),
            multiplier: default_multiplier(),
            max_backoff: default_max_backoff(),
            non_retryable: Vec::new(),
        }
    }
}

mod duration_text {
    use super::*;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        parse(&String::deserialize(d)?).map_err(serde::de::Error::custom)
    }

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }
}

fn parse(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text)
        .map_err(|e| format!("invalid duration '{text}': {e} (write e.g. 500ms, 2s, 1m)"))
}

impl RetryPolicy {
    fn validate(&self) -> Result<(), String> {
        if self.max_attempts == 0 {
            return Err("max_attempts must be at least 1 (1 means no retry)".into());
        }
        if !(self.multiplier >= 1.0 && self.multiplier.is_finite()) {
            return Err(format!(
                "multiplier must be a number >= 1, got {}",
                self.multiplier
            ));
        }
        if self.max_backoff < self.initial_backoff {
            return Err("max_backoff must not be smaller than initial_backoff".into());
        }
        Ok(())
    }

    /// The backoff cap before retry number `retry` (1 for the first retry): `initial * multiplier^(retry-1)`,
    /// at most `max_backoff`.
    pub fn backoff_cap(&self, retry: u32) -> Duration {
        let factor = self.multiplier.powi(retry.saturating_sub(1).min(64) as i32);
        let cap = self.initial_backoff.as_secs_f64() * factor;
        Duration::try_from_secs_f64(cap.min(self.max_backoff.as_secs_f64()))
            .unwrap_or(self.max_backoff)
    }
}

/// A definition that cannot be deployed, with where and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{source_name}: {field}: {message}")]
pub struct DefinitionError {
    /// File name or other label of the definition's source.
    pub source_name: String,
    /// Path of the offending field, e.g. `steps[2].name`.
    pub field: String,
    pub message: String,
}

// The YAML shapes. Each step names exactly one kind; `deny_unknown_fields` turns typos into errors.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDefinition {
    name: String,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    retry: Option<RetryPolicy>,
    #[serde(default)]
    deadline: Option<String>,
    #[serde(default)]
    output: Option<String>,
    #[serde(default)]
    hook: Option<Hook>,
    #[serde(default)]
    schedule: Option<DefinitionSchedule>,
    #[serde(default)]
    sensitive: Vec<String>,
    steps: Vec<RawStep>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    name: String,
    task: Option<String>,
    sequence: Option<Vec<RawStep>>,
    parallel: Option<RawParallel>,
    map: Option<RawMap>,
    choice: Option<Vec<RawChoice>>,
    filter: Option<RawFilter>,
    copy: Option<RawCopy>,
    merge: Option<String>,
    sleep: Option<String>,
    timer: Option<String>,
    wait: Option<RawWait>,
    workflow: Option<RawWorkflow>,
    input: Option<String>,
    retry: Option<RetryPolicy>,
    timeout: Option<String>,
    compensate: Option<RawCompensate>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawParallel {
    branches: Vec<RawBranch>,
    #[serde(default)]
    join: Option<RawJoin>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBranch {
    name: String,
    steps: Vec<RawStep>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawJoin {
    Count(usize),
    Word(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMap {
    items: String,
    steps: Vec<RawStep>,
    #[serde(default)]
    concurrency: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawChoice {
    when: Option<String>,
    steps: Option<Vec<RawStep>>,
    otherwise: Option<Vec<RawStep>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFilter {
    condition: String,
    #[serde(default)]
    steps: Vec<RawStep>,
    #[serde(default)]
    otherwise: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCopy {
    tasks: Vec<String>,
    #[serde(default)]
    first: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWait {
    signal: String,
    #[serde(default)]
    timeout: Option<String>,
    #[serde(default)]
    on_timeout: Option<Vec<RawStep>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWorkflow {
    name: String,
    #[serde(default)]
    version: Option<i32>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawCompensate {
    Task(String),
    Full(RawCompensation),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCompensation {
    task: String,
    #[serde(default)]
    retry: Option<RetryPolicy>,
}

/// The `sensitive:` list, parsed, each path rooted at a step or signal the definition has.
fn sensitive_paths(
    texts: &[String],
    steps: &BTreeMap<String, Step>,
) -> Result<Vec<SensitivePath>, Invalid> {
    if texts.len() > MAX_PATHS {
        return Err((
            "sensitive".into(),
            format!(
                "{} paths are marked; at most {MAX_PATHS} are allowed",
                texts.len()
            ),
        ));
    }
    let mut paths = Vec::new();
    for (i, text) in texts.iter().enumerate() {
        let field = format!("sensitive[{i}]");
        let path = SensitivePath::parse(text).map_err(|m| (field.clone(), m))?;
        match &path.root {
            Root::Step(name) if !steps.contains_key(name) => {
                return Err((field, format!("`{text}` names step '{name}', which this definition does not have")))
            }
            Root::Signal(name)
                if !steps
                    .values()
                    .any(|s| matches!(&s.kind, Kind::Wait { signal, .. } if signal == name)) =>
            {
                return Err((field, format!("`{text}` names signal '{name}', which no wait step of this definition waits for")))
            }
            _ => {}
        }
        paths.push(path);
    }
    Ok(paths)
}

/// Characters allowed in names that end up in topic names and ids.
fn valid_identifier(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 200
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

type Invalid = (String, String);

struct Builder<'a> {
    workflow: &'a str,
    names: BTreeMap<String, String>,
    references: Vec<(String, String)>,
    limits: &'a Limits,
    /// Blocks open around the step being built.
    depth: usize,
}

impl Builder<'_> {
    fn expression(&mut self, field: &str, text: &str) -> Result<String, Invalid> {
        let references = expr::check(text).map_err(|e| {
            (
                field.to_string(),
                format!("invalid expression `{text}`: {e}"),
            )
        })?;
        for name in references {
            self.references.push((field.to_string(), name));
        }
        Ok(text.to_string())
    }

    fn identifier(field: &str, what: &str, value: &str) -> Result<(), Invalid> {
        if valid_identifier(value) {
            Ok(())
        } else {
            Err((
                field.to_string(),
                format!("'{value}' is not a valid {what}: use letters, digits, '.', '_' and '-'"),
            ))
        }
    }

    fn block(
        &mut self,
        field: &str,
        raw: Vec<RawStep>,
        may_be_empty: bool,
    ) -> Result<Vec<Step>, Invalid> {
        if raw.is_empty() && !may_be_empty {
            return Err((field.to_string(), "needs at least one step".into()));
        }
        if self.depth >= self.limits.max_definition_depth {
            return Err((
                field.to_string(),
                format!(
                    "steps are nested more than {} deep (max_definition_depth); split the workflow into child \
                     workflows",
                    self.limits.max_definition_depth
                ),
            ));
        }
        self.depth += 1;
        let steps = raw
            .into_iter()
            .enumerate()
            .map(|(i, step)| self.step(&format!("{field}[{i}]"), step))
            .collect();
        self.depth -= 1;
        steps
    }

    /// Refuses a list longer than `limit`, naming the field and the bound.
    fn at_most(
        field: &str,
        what: &str,
        count: usize,
        limit: usize,
        bound: &str,
    ) -> Result<(), Invalid> {
        if count > limit {
            return Err((
                field.to_string(),
                format!("{count} {what}; at most {limit} are allowed ({bound})"),
            ));
        }
        Ok(())
    }

    fn step(&mut self, at: &str, raw: RawStep) -> Result<Step, Invalid> {
        Builder::identifier(&format!("{at}.name"), "step name", &raw.name)?;
        if self.names.len() >= self.limits.max_steps {
            return Err((
                at.to_string(),
                format!(
                    "the definition has more than {} steps (max_steps); split it into child workflows",
                    self.limits.max_steps
                ),
            ));
        }
        if let Some(first) = self.names.insert(raw.name.clone(), at.to_string()) {
            return Err((
                format!("{at}.name"),
                format!(
                    "duplicate step name '{}' (also {first}.name); step names must be unique",
                    raw.name
                ),
            ));
        }
        let given: Vec<&str> = [
            ("task", raw.task.is_some()),
            ("sequence", raw.sequence.is_some()),
            ("parallel", raw.parallel.is_some()),
            ("map", raw.map.is_some()),
            ("choice", raw.choice.is_some()),
            ("filter", raw.filter.is_some()),
            ("copy", raw.copy.is_some()),
            ("merge", raw.merge.is_some()),
            ("sleep", raw.sleep.is_some()),
            ("timer", raw.timer.is_some()),
            ("wait", raw.wait.is_some()),
            ("workflow", raw.workflow.is_some()),
        ]
        .into_iter()
        .filter(|(_, set)| *set)
        .map(|(k, _)| k)
        .collect();
        if given.len() != 1 {
            return Err((
                at.to_string(),
                format!(
                    "a step needs exactly one of task, sequence, parallel, map, choice, filter, copy, merge, sleep, \
                     timer, wait, workflow; '{}' has {}",
                    raw.name,
                    if given.is_empty() { "none".to_string() } else { given.join(" and ") }
                ),
            ));
        }
        let kind = given[0];
        let kind = match kind {
            "task" => {
                let task_type = raw.task.unwrap();
                Builder::identifier(&format!("{at}.task"), "task type", &task_type)?;
                Kind::Task { task_type }
            }
            "sequence" => Kind::Sequence {
                steps: self.block(&format!("{at}.sequence"), raw.sequence.unwrap(), false)?,
            },
            "parallel" => {
                let p = raw.parallel.unwrap();
                let field = format!("{at}.parallel");
                if p.branches.is_empty() {
                    return Err((
                        format!("{field}.branches"),
                        "needs at least one branch".into(),
                    ));
                }
                let count = p.branches.len();
                let bound = "max_branches";
                Builder::at_most(
                    &format!("{field}.branches"),
                    "branches",
                    count,
                    self.limits.max_branches,
                    bound,
                )?;
                let join = match p.join {
                    None => Join::All,
                    Some(RawJoin::Word(w)) if w == "all" => Join::All,
                    Some(RawJoin::Word(w)) if w == "any" => Join::Any,
                    Some(RawJoin::Count(n)) if (1..=count).contains(&n) => Join::AtLeast(n),
                    Some(RawJoin::Count(n)) => {
                        return Err((
                            format!("{field}.join"),
                            format!("join {n} is not between 1 and the {count} branches"),
                        ))
                    }
                    Some(RawJoin::Word(w)) => {
                        return Err((
                            format!("{field}.join"),
                            format!("join '{w}' is not all, any, or a number of branches"),
                        ))
                    }
                };
                let mut seen = HashSet::new();
                let mut branches = Vec::new();
                for (i, b) in p.branches.into_iter().enumerate() {
                    let bf = format!("{field}.branches[{i}]");
                    Builder::identifier(&format!("{bf}.name"), "branch name", &b.name)?;
                    if !seen.insert(b.name.clone()) {
                        return Err((
                            format!("{bf}.name"),
                            format!("duplicate branch name '{}'", b.name),
                        ));
                    }
                    branches.push(Branch {
                        name: b.name,
                        steps: self.block(&format!("{bf}.steps"), b.steps, false)?,
                    });
                }
                Kind::Parallel { branches, join }
            }
            "map" => {
                let m = raw.map.unwrap();
                let field = format!("{at}.map");
                let concurrency = m.concurrency.unwrap_or(10);
                if concurrency == 0 {
                    return Err((format!("{field}.concurrency"), "must be at least 1".into()));
                }
                if concurrency > self.limits.max_map_concurrency {
                    return Err((
                        format!("{field}.concurrency"),
                        format!(
                            "concurrency {concurrency} is above the limit of {} (max_map_concurrency)",
                            self.limits.max_map_concurrency
                        ),
                    ));
                }
                Kind::Map {
                    items: self.expression(&format!("{field}.items"), &m.items)?,
                    steps: self.block(&format!("{field}.steps"), m.steps, false)?,
                    concurrency,
                }
            }
            "choice" => {
                let alternatives = raw.choice.unwrap();
                let field = format!("{at}.choice");
                if alternatives.is_empty() {
                    return Err((field, "needs at least one alternative".into()));
                }
                let (count, bound) = (alternatives.len(), "max_branches");
                Builder::at_most(
                    &field,
                    "alternatives",
                    count,
                    self.limits.max_branches,
                    bound,
                )?;
                let last = alternatives.len() - 1;
                let mut branches = Vec::new();
                let mut always_taken: Option<usize> = None;
                for (i, alternative) in alternatives.into_iter().enumerate() {
                    let af = format!("{field}[{i}]");
                    if let Some(earlier) = always_taken {
                        return Err((
                            af,
                            format!("unreachable: alternative {earlier} always matches, so nothing after it runs"),
                        ));
                    }
                    let branch = match (alternative.when, alternative.steps, alternative.otherwise) {
                        (Some(when), Some(steps), None) => {
                            if expr::is_literal_true(&when) {
                                always_taken = Some(i);
                            }
                            ChoiceBranch {
                                when: Some(self.expression(&format!("{af}.when"), &when)?),
                                steps: self.block(&format!("{af}.steps"), steps, false)?,
                            }
                        }
                        (None, None, Some(steps)) if i == last => ChoiceBranch {
                            when: None,
                            steps: self.block(&format!("{af}.otherwise"), steps, false)?,
                        },
                        (None, None, Some(_)) => {
                            return Err((af, "otherwise must be the last alternative; the ones after it are unreachable".into()))
                        }
                        _ => {
                            return Err((
                                af,
                                "an alternative is either {when: EXPRESSION, steps: [...]} or {otherwise: [...]}".into(),
                            ))
                        }
                    };
                    branches.push(branch);
                }
                Kind::Choice { branches }
            }
            "filter" => {
                let f = raw.filter.unwrap();
                let field = format!("{at}.filter");
                let otherwise = match f.otherwise.as_deref() {
                    None | Some("skip") => Otherwise::Skip,
                    Some("end") => Otherwise::End,
                    Some(other) => {
                        return Err((
                            format!("{field}.otherwise"),
                            format!("'{other}' is not skip or end"),
                        ))
                    }
                };
                Kind::Filter {
                    condition: self.expression(&format!("{field}.condition"), &f.condition)?,
                    steps: self.block(&format!("{field}.steps"), f.steps, true)?,
                    otherwise,
                }
            }
            "copy" => {
                let c = raw.copy.unwrap();
                let field = format!("{at}.copy.tasks");
                if c.tasks.is_empty() {
                    return Err((field, "needs at least one task type".into()));
                }
                let (count, bound) = (c.tasks.len(), "max_branches");
                Builder::at_most(&field, "task types", count, self.limits.max_branches, bound)?;
                let mut seen = HashSet::new();
                for (i, t) in c.tasks.iter().enumerate() {
                    Builder::identifier(&format!("{field}[{i}]"), "task type", t)?;
                    if !seen.insert(t) {
                        return Err((
                            format!("{field}[{i}]"),
                            format!("task type '{t}' is listed twice"),
                        ));
                    }
                }
                Kind::Copy {
                    tasks: c.tasks,
                    first: c.first,
                }
            }
            "merge" => Kind::Merge {
                expression: self.expression(&format!("{at}.merge"), &raw.merge.unwrap())?,
            },
            "sleep" => Kind::Sleep {
                duration: parse(&raw.sleep.unwrap()).map_err(|m| (format!("{at}.sleep"), m))?,
            },
            "timer" => Kind::Timer {
                at: self.expression(&format!("{at}.timer"), &raw.timer.unwrap())?,
            },
            "wait" => {
                let w = raw.wait.unwrap();
                let field = format!("{at}.wait");
                Builder::identifier(&format!("{field}.signal"), "signal name", &w.signal)?;
                let timeout = match w.timeout {
                    Some(t) => Some(parse(&t).map_err(|m| (format!("{field}.timeout"), m))?),
                    None => None,
                };
                if w.on_timeout.is_some() && timeout.is_none() {
                    return Err((
                        format!("{field}.on_timeout"),
                        "on_timeout needs a timeout".into(),
                    ));
                }
                let on_timeout = match w.on_timeout {
                    Some(steps) => {
                        Some(self.block(&format!("{field}.on_timeout"), steps, false)?)
                    }
                    None => None,
                };
                Kind::Wait {
                    signal: w.signal,
                    timeout,
                    on_timeout,
                }
            }
            "workflow" => {
                let child = raw.workflow.unwrap();
                Builder::identifier(&format!("{at}.workflow.name"), "workflow name", &child.name)?;
                if child.name == self.workflow {
                    return Err((
                        format!("{at}.workflow.name"),
                        format!(
                            "workflow '{}' starts itself as a child: a cycle without end",
                            child.name
                        ),
                    ));
                }
                Kind::Workflow {
                    name: child.name,
                    version: child.version,
                }
            }
            _ => unreachable!("kinds are listed above"),
        };
        let timeout = match raw.timeout {
            Some(t) => {
                if !matches!(kind, Kind::Task { .. } | Kind::Copy { .. }) {
                    return Err((
                        format!("{at}.timeout"),
                        "timeout applies to task and copy steps; a wait has its own timeout, and the workflow a deadline"
                            .into(),
                    ));
                }
                Some(parse(&t).map_err(|m| (format!("{at}.timeout"), m))?)
            }
            None => None,
        };
        if let Some(policy) = &raw.retry {
            policy.validate().map_err(|m| (format!("{at}.retry"), m))?;
        }
        let compensate = match raw.compensate {
            None => None,
            Some(RawCompensate::Task(task)) => Some(Compensation { task, retry: None }),
            Some(RawCompensate::Full(c)) => Some(Compensation {
                task: c.task,
                retry: c.retry,
            }),
        };
        if let Some(c) = &compensate {
            Builder::identifier(&format!("{at}.compensate"), "task type", &c.task)?;
            if let Some(policy) = &c.retry {
                policy
                    .validate()
                    .map_err(|m| (format!("{at}.compensate.retry"), m))?;
            }
        }
        let input = match raw.input {
            Some(text) => Some(self.expression(&format!("{at}.input"), &text)?),
            None => None,
        };
        Ok(Step {
            name: raw.name,
            kind,
            input,
            retry: raw.retry,
            timeout,
            compensate,
        })
    }
}

fn index_steps(steps: &[Step], out: &mut BTreeMap<String, Step>) {
    for step in steps {
        out.insert(step.name.clone(), step.clone());
        for block in step.blocks() {
            index_steps(block, out);
        }
    }
}

impl Step {
    /// The step sequences nested in this step.
    pub fn blocks(&self) -> Vec<&[Step]> {
        match &self.kind {
            Kind::Sequence { steps } | Kind::Map { steps, .. } | Kind::Filter { steps, .. } => {
                vec![steps]
            }
            Kind::Parallel { branches, .. } => {
                branches.iter().map(|b| b.steps.as_slice()).collect()
            }
            Kind::Choice { branches } => branches.iter().map(|b| b.steps.as_slice()).collect(),
            Kind::Wait {
                on_timeout: Some(steps),
                ..
            } => vec![steps],
            _ => Vec::new(),
        }
    }
}

impl Definition {
    /// Parses and validates YAML (JSON is YAML too). `source_name` labels errors, e.g. the file name.
    pub fn parse(source_name: &str, text: &str) -> Result<Definition, DefinitionError> {
        Definition::parse_with_limits(source_name, text, &Limits::default())
    }

    /// [`Definition::parse`] with other bounds than the defaults.
    pub fn parse_with_limits(
        source_name: &str,
        text: &str,
        limits: &Limits,
    ) -> Result<Definition, DefinitionError> {
        let fail = |field: String, message: String| DefinitionError {
            source_name: source_name.to_string(),
            field,
            message,
        };
        let raw: RawDefinition = serde_yaml_ng::from_str(text).map_err(|e| {
            let message = e.to_string();
            // serde_yaml_ng prefixes the path of the field ("steps[1]: missing field `task`").
            match message.split_once(": ") {
                Some((path, rest)) if !path.contains(' ') => {
                    fail(path.to_string(), rest.to_string())
                }
                _ => fail("definition".to_string(), message),
            }
        })?;
        Builder::identifier("name", "workflow name", &raw.name).map_err(|(f, m)| fail(f, m))?;
        if let Some(policy) = &raw.retry {
            policy.validate().map_err(|m| fail("retry".into(), m))?;
        }
        let deadline = match &raw.deadline {
            Some(d) => Some(parse(d).map_err(|m| fail("deadline".into(), m))?),
            None => None,
        };
        let mut builder = Builder {
            workflow: &raw.name,
            names: BTreeMap::new(),
            references: Vec::new(),
            limits,
            depth: 0,
        };
        let steps = builder
            .block("steps", raw.steps, false)
            .map_err(|(f, m)| fail(f, m))?;
        let output = match &raw.output {
            Some(text) => Some(
                builder
                    .expression("output", text)
                    .map_err(|(f, m)| fail(f, m))?,
            ),
            None => None,
        };
        if let Some(hook) = &raw.hook {
            let references = expr::check(&hook.id).map_err(|e| {
                fail(
                    "hook.id".into(),
                    format!("invalid expression `{}`: {e}", hook.id),
                )
            })?;
            if let Some(step) = references.first() {
                return Err(fail(
                    "hook.id".into(),
                    format!("reads steps.{step}; a hook's id is taken from the request: use body.<field>"),
                ));
            }
        }
        let schedule_window = match raw.schedule.as_ref().and_then(|s| s.window.as_deref()) {
            Some(text) => Some(parse(text).map_err(|m| fail("schedule.window".into(), m))?),
            None => None,
        };
        for (field, name) in &builder.references {
            if !builder.names.contains_key(name) {
                return Err(fail(
                    field.clone(),
                    format!("refers to steps.{name}, but no step is named '{name}'"),
                ));
            }
        }
        let mut by_name = BTreeMap::new();
        index_steps(&steps, &mut by_name);
        let sensitive = sensitive_paths(&raw.sensitive, &by_name).map_err(|(f, m)| fail(f, m))?;
        Ok(Definition {
            name: raw.name,
            description: raw.description,
            retry: raw.retry,
            deadline,
            output,
            steps,
            max_map_items: limits.max_map_items,
            max_payload_bytes: limits.max_payload_bytes,
            max_child_depth: limits.max_child_depth,
            hook: raw.hook,
            schedule: raw.schedule,
            schedule_window,
            sensitive,
            by_name,
        })
    }

    /// The step named `name` (names are unique in a definition), if there is one.
    pub fn find_step(&self, name: &str) -> Option<&Step> {
        self.by_name.get(name)
    }

    /// The step named `name`. Only for names the engine has checked exist (see `machine::Instance::conforms`);
    /// an unchecked name falls back to the first step rather than panicking.
    pub(crate) fn step(&self, name: &str) -> &Step {
        debug_assert!(
            self.by_name.contains_key(name),
            "unchecked step name {name}"
        );
        self.by_name.get(name).unwrap_or(&self.steps[0])
    }

    /// The retry policy in force for tasks of `step`.
    pub fn retry_policy(&self, step: &Step) -> RetryPolicy {
        step.retry
            .clone()
            .or_else(|| self.retry.clone())
            .unwrap_or_default()
    }

    /// Names of the workflows this definition starts as children.
    pub fn child_workflows(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .by_name
            .values()
            .filter_map(|s| match &s.kind {
                Kind::Workflow { name, .. } => Some(name.clone()),
                _ => None,
            })
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// Every task type this definition may dispatch (tasks, copies, compensations).
    pub fn task_types(&self) -> Vec<String> {
        let mut types: Vec<String> = self
            .by_name
            .values()
            .flat_map(|s| {
                let mut t = match &s.kind {
                    Kind::Task { task_type } => vec![task_type.clone()],
                    Kind::Copy { tasks, .. } => tasks.clone(),
                    _ => Vec::new(),
                };
                t.extend(s.compensate.iter().map(|c| c.task.clone()));
                t
            })
            .collect();
        types.sort();
        types.dedup();
        types
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ORDER: &str = r#"
name: order
retry: { max_attempts: 4, initial_backoff: 200ms, max_backoff: 5s }
steps:
  - name: reserve
    task: inventory.reserve
    compensate: inventory.release
  - name: charge
    task: payment.charge
    input: "{order: input.order, reservation: steps.reserve}"
    retry: { max_attempts: 2, initial_backoff: 1s, non_retryable: [card_declined] }
    compensate: { task: payment.refund, retry: { max_attempts: 10 } }
  - name: ship
    task: shipping.ship
    timeout: 30s
"#;

    #[test]
    fn parses_a_sequence_with_policies_mappings_and_compensations() {
        let d = Definition::parse("order.yaml", ORDER).unwrap();
        assert_eq!(d.steps.len(), 3);
        assert_eq!(d.retry_policy(d.step("reserve")).max_attempts, 4);
        assert_eq!(
            d.retry_policy(d.step("charge")).non_retryable,
            vec!["card_declined"]
        );
        assert_eq!(
            d.step("charge").compensate.as_ref().unwrap().task,
            "payment.refund"
        );
        assert_eq!(d.step("ship").timeout, Some(Duration::from_secs(30)));
        assert_eq!(
            d.task_types(),
            vec![
                "inventory.release",
                "inventory.reserve",
                "payment.charge",
                "payment.refund",
                "shipping.ship"
            ]
        );
    }

    #[test]
    fn parses_every_step_kind() {
        let d = Definition::parse(
            "all.yaml",
            r#"
name: all
deadline: 1h
output: "steps.merged"
steps:
  - name: fan
    parallel:
      join: 2
      branches:
        - { name: a, steps: [{ name: a1, task: t.a }] }
        - { name: b, steps: [{ name: b1, task: t.b }] }
        - { name: c, steps: [{ name: c1, task: t.c }] }
  - name: each
    map: { items: "input.items", concurrency: 2, steps: [{ name: item, task: t.item }] }
  - name: route
    choice:
      - { when: "input.big", steps: [{ name: big, task: t.big }] }
      - { otherwise: [{ name: small, task: t.small }] }
  - { name: only_paid, filter: { condition: "input.paid", otherwise: end } }
  - { name: copies, copy: { tasks: [t.x, t.y], first: true } }
  - { name: merged, merge: "{fan: steps.fan, each: steps.each}" }
  - { name: nap, sleep: 2s }
  - { name: alarm, timer: "input.at" }
  - { name: approval, wait: { signal: approve, timeout: 1d, on_timeout: [{ name: escalate, task: t.esc }] } }
  - { name: child, workflow: { name: other } }
  - { name: inner, sequence: [{ name: s1, task: t.s }] }
"#,
        )
        .unwrap();
        assert_eq!(d.steps.len(), 11);
        assert!(matches!(
            d.step("fan").kind,
            Kind::Parallel {
                join: Join::AtLeast(2),
                ..
            }
        ));
        assert!(matches!(
            d.step("only_paid").kind,
            Kind::Filter {
                otherwise: Otherwise::End,
                ..
            }
        ));
        assert_eq!(d.step("escalate").name, "escalate");
    }

    fn error_of(text: &str) -> DefinitionError {
        Definition::parse("bad.yaml", text).unwrap_err()
    }

    #[test]
    fn a_missing_field_names_the_file_and_field() {
        let e = error_of("name: x\nsteps:\n  - task: a\n");
        assert_eq!(e.source_name, "bad.yaml");
        assert_eq!(e.field, "steps[0]");
        assert!(e.message.contains("missing field `name`"), "{e}");
        assert!(e.to_string().starts_with("bad.yaml: steps[0]: "), "{e}");
        let e = error_of("name: x\nsteps:\n  - name: a\n");
        assert!(e.message.contains("exactly one of task"), "{e}");
    }

    #[test]
    fn duplicate_step_names_are_refused_anywhere_in_the_tree() {
        let e = error_of("name: x\nsteps:\n  - {name: a, task: t}\n  - {name: s, sequence: [{name: a, task: u}]}\n");
        assert_eq!(e.field, "steps[1].sequence[0].name");
        assert!(
            e.message.contains("duplicate step name 'a'") && e.message.contains("steps[0]"),
            "{e}"
        );
    }

    #[test]
    fn unknown_references_bad_expressions_and_unreachable_alternatives_are_refused() {
        let e = error_of("name: x\nsteps:\n  - {name: a, task: t, input: 'steps.nope.id'}\n");
        assert_eq!(e.field, "steps[0].input");
        assert!(e.message.contains("no step is named 'nope'"), "{e}");
        let e = error_of("name: x\nsteps:\n  - {name: a, merge: 'input.['}\n");
        assert!(e.message.contains("invalid expression"), "{e}");
        let e = error_of(
            "name: x\nsteps:\n  - name: c\n    choice:\n      - {when: '`true`', steps: [{name: a, task: t}]}\n      - {otherwise: [{name: b, task: t}]}\n",
        );
        assert_eq!(e.field, "steps[0].choice[1]");
        assert!(e.message.contains("unreachable"), "{e}");
        let e = error_of(
            "name: x\nsteps:\n  - name: c\n    choice:\n      - {otherwise: [{name: b, task: t}]}\n      - {when: 'input.a', steps: [{name: a, task: t}]}\n",
        );
        assert!(e.message.contains("last alternative"), "{e}");
        let e = error_of("name: x\nsteps:\n  - {name: me, workflow: {name: x}}\n");
        assert!(e.message.contains("cycle"), "{e}");
    }

    #[test]
    fn unknown_fields_and_bad_values_are_refused() {
        assert!(error_of("name: x\nstepz: []\n")
            .message
            .contains("unknown field"));
        assert_eq!(error_of("name: x\nsteps: []\n").field, "steps");
        assert_eq!(
            error_of("name: 'a b'\nsteps: [{name: a, task: t}]\n").field,
            "name"
        );
        assert_eq!(
            error_of("name: x\nsteps: [{name: a, task: 't/x'}]\n").field,
            "steps[0].task"
        );
        let e = error_of("name: x\nsteps: [{name: a, task: t, retry: {initial_backoff: soon}}]\n");
        assert!(e.message.contains("invalid duration 'soon'"), "{e}");
        let e = error_of("name: x\nsteps: [{name: a, task: t, retry: {max_attempts: 0}}]\n");
        assert_eq!(e.field, "steps[0].retry");
        let e = error_of("name: x\nsteps: [{name: p, parallel: {join: 3, branches: [{name: a, steps: [{name: a1, task: t}]}]}}]\n");
        assert_eq!(e.field, "steps[0].parallel.join");
        let e = error_of("name: x\nsteps: [{name: s, sleep: 1s, timeout: 2s}]\n");
        assert_eq!(e.field, "steps[0].timeout");
        assert!(error_of("just text").message.contains("invalid type"));
    }

    #[test]
    fn backoff_grows_exponentially_up_to_the_cap() {
        let p = RetryPolicy {
            initial_backoff: Duration::from_millis(100),
            multiplier: 2.0,
            max_backoff: Duration::from_millis(500),
            ..RetryPolicy::default()
        };
        let caps: Vec<u128> = (1..=5).map(|r| p.backoff_cap(r).as_millis()).collect();
        assert_eq!(caps, vec![100, 200, 400, 500, 500]);
    }

    #[test]
    fn a_hook_names_its_id_expression_and_may_not_read_steps() {
        let ok = "name: h\nhook: { id: body.order_id }\nsteps: [{ name: a, task: t }]\n";
        let parsed = Definition::parse("h.yaml", ok).unwrap();
        assert_eq!(parsed.hook.unwrap().id, "body.order_id");
        let bad = error_of("name: h\nhook: { id: 'body.[' }\nsteps: [{ name: a, task: t }]\n");
        assert_eq!(bad.field, "hook.id");
        let steps = error_of("name: h\nhook: { id: steps.a.id }\nsteps: [{ name: a, task: t }]\n");
        assert!(steps.message.contains("body.<field>"), "{}", steps.message);
        let typo = error_of("name: h\nhook: { key: body.id }\nsteps: [{ name: a, task: t }]\n");
        assert!(typo.message.contains("key"), "{}", typo.message);
    }
}
