//! Workflow definitions: the YAML (or JSON) a user deploys, parsed strictly and validated before anything runs,
//! with errors that name the file and the field.

use std::collections::HashMap;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

/// A parsed, validated workflow definition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Definition {
    /// Name instances are started by.
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    /// Retry policy for every step that does not set its own.
    #[serde(default)]
    pub retry: Option<RetryPolicy>,
    pub steps: Vec<Step>,
}

/// One step of a sequence: a task run by a worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    pub name: String,
    /// Task type; tasks go to the topic `<prefix>tasks.<task>`.
    pub task: String,
    #[serde(default)]
    pub retry: Option<RetryPolicy>,
}

/// When and how often a failed task is tried again: exponential backoff with full jitter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    /// Attempts in all, the first included; 1 means no retry.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Backoff cap before jitter for the first retry.
    #[serde(
        default = "default_initial_backoff",
        deserialize_with = "duration",
        serialize_with = "serialize_duration"
    )]
    pub initial_backoff: Duration,
    /// Growth of the cap per retry.
    #[serde(default = "default_multiplier")]
    pub multiplier: f64,
    /// Largest backoff.
    #[serde(
        default = "default_max_backoff",
        deserialize_with = "duration",
        serialize_with = "serialize_duration"
    )]
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

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    humantime::parse_duration(&text).map_err(|e| {
        serde::de::Error::custom(format!(
            "invalid duration '{text}': {e} (write e.g. 500ms, 2s, 1m)"
        ))
    })
}

fn serialize_duration<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_duration(*d).to_string())
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

/// Characters allowed in names that end up in topic names and ids.
fn valid_identifier(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 200
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

impl Definition {
    /// Parses and validates YAML (JSON is YAML too). `source_name` labels errors, e.g. the file name.
    pub fn parse(source_name: &str, text: &str) -> Result<Definition, DefinitionError> {
        let definition: Definition = serde_yaml_ng::from_str(text).map_err(|e| {
            let message = e.to_string();
            // serde_yaml_ng prefixes the path of the field ("steps[1]: missing field `task`").
            let (field, message) = match message.split_once(": ") {
                Some((path, rest)) if !path.contains(' ') => (path.to_string(), rest.to_string()),
                _ => ("definition".to_string(), message),
            };
            DefinitionError {
                source_name: source_name.to_string(),
                field,
                message,
            }
        })?;
        definition.validate(source_name)?;
        Ok(definition)
    }

    fn validate(&self, source_name: &str) -> Result<(), DefinitionError> {
        let fail = |field: String, message: String| DefinitionError {
            source_name: source_name.to_string(),
            field,
            message,
        };
        if !valid_identifier(&self.name) {
            return Err(fail(
                "name".into(),
                format!(
                    "'{}' is not a valid workflow name: use letters, digits, '.', '_' and '-'",
                    self.name
                ),
            ));
        }
        if self.steps.is_empty() {
            return Err(fail(
                "steps".into(),
                "a workflow needs at least one step".into(),
            ));
        }
        if let Some(policy) = &self.retry {
            policy.validate().map_err(|m| fail("retry".into(), m))?;
        }
        let mut seen: HashMap<&str, usize> = HashMap::new();
        for (i, step) in self.steps.iter().enumerate() {
            if !valid_identifier(&step.name) {
                return Err(fail(
                    format!("steps[{i}].name"),
                    format!(
                        "'{}' is not a valid step name: use letters, digits, '.', '_' and '-'",
                        step.name
                    ),
                ));
            }
            if let Some(first) = seen.insert(&step.name, i) {
                return Err(fail(
                    format!("steps[{i}].name"),
                    format!(
                        "duplicate step name '{}' (also steps[{first}].name); step names must be unique",
                        step.name
                    ),
                ));
            }
            if !valid_identifier(&step.task) {
                return Err(fail(
                    format!("steps[{i}].task"),
                    format!(
                        "'{}' is not a valid task type: use letters, digits, '.', '_' and '-'",
                        step.task
                    ),
                ));
            }
            if let Some(policy) = &step.retry {
                policy
                    .validate()
                    .map_err(|m| fail(format!("steps[{i}].retry"), m))?;
            }
        }
        Ok(())
    }

    /// The retry policy in force for step `index`.
    pub fn retry_policy(&self, index: usize) -> RetryPolicy {
        self.steps[index]
            .retry
            .clone()
            .or_else(|| self.retry.clone())
            .unwrap_or_default()
    }
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
        Duration::from_secs_f64(cap.min(self.max_backoff.as_secs_f64()))
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
  - name: charge
    task: payment.charge
    retry: { max_attempts: 2, initial_backoff: 1s, non_retryable: [card_declined] }
  - name: ship
    task: shipping.ship
"#;

    #[test]
    fn parses_a_sequence_with_policies() {
        let d = Definition::parse("order.yaml", ORDER).unwrap();
        assert_eq!(d.steps.len(), 3);
        assert_eq!(d.retry_policy(0).max_attempts, 4);
        assert_eq!(
            d.retry_policy(0).initial_backoff,
            Duration::from_millis(200)
        );
        assert_eq!(d.retry_policy(1).max_attempts, 2);
        assert_eq!(d.retry_policy(1).non_retryable, vec!["card_declined"]);
        assert_eq!(d.retry_policy(1).max_backoff, Duration::from_secs(60));
    }

    fn error_of(text: &str) -> DefinitionError {
        Definition::parse("bad.yaml", text).unwrap_err()
    }

    #[test]
    fn a_missing_field_names_the_file_and_field() {
        let e = error_of("name: x\nsteps:\n  - name: a\n");
        assert_eq!(e.source_name, "bad.yaml");
        assert_eq!(e.field, "steps[0]");
        assert!(e.message.contains("missing field `task`"), "{e}");
        assert!(e.to_string().starts_with("bad.yaml: steps[0]: "), "{e}");
    }

    #[test]
    fn duplicate_step_names_are_refused() {
        let e = error_of("name: x\nsteps:\n  - {name: a, task: t}\n  - {name: b, task: t}\n  - {name: a, task: u}\n");
        assert_eq!(e.field, "steps[2].name");
        assert!(e.message.contains("duplicate step name 'a'"), "{e}");
        assert!(e.message.contains("steps[0]"), "{e}");
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
}
