//! Compatibility levels and verdicts, with the semantics of Confluent Schema Registry: BACKWARD means the new
//! schema reads data written with the old one, FORWARD the reverse, FULL both; the `_TRANSITIVE` forms check every
//! earlier version instead of only the latest. Only full compatibility counts: apache-avro's `Partial` (an enum
//! losing a symbol the reader has no default for, a union narrowing) is incompatible, as Java Avro says too.

use std::fmt;
use std::str::FromStr;

use apache_avro::schema_compatibility::{Compatibility, SchemaCompatibility};
use apache_avro::Schema;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    None,
    Backward,
    Forward,
    Full,
    BackwardTransitive,
    ForwardTransitive,
    FullTransitive,
}

impl Level {
    pub const DEFAULT: Level = Level::Backward;

    pub fn as_str(self) -> &'static str {
        match self {
            Level::None => "NONE",
            Level::Backward => "BACKWARD",
            Level::Forward => "FORWARD",
            Level::Full => "FULL",
            Level::BackwardTransitive => "BACKWARD_TRANSITIVE",
            Level::ForwardTransitive => "FORWARD_TRANSITIVE",
            Level::FullTransitive => "FULL_TRANSITIVE",
        }
    }

    /// Whether every earlier version is checked, not only the latest.
    pub fn is_transitive(self) -> bool {
        matches!(
            self,
            Level::BackwardTransitive | Level::ForwardTransitive | Level::FullTransitive
        )
    }

    fn checks_backward(self) -> bool {
        matches!(
            self,
            Level::Backward | Level::Full | Level::BackwardTransitive | Level::FullTransitive
        )
    }

    fn checks_forward(self) -> bool {
        matches!(
            self,
            Level::Forward | Level::Full | Level::ForwardTransitive | Level::FullTransitive
        )
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidLevel(pub String);

impl fmt::Display for InvalidLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Invalid compatibility level '{}'. Valid values are NONE, BACKWARD, FORWARD, FULL, \
             BACKWARD_TRANSITIVE, FORWARD_TRANSITIVE and FULL_TRANSITIVE",
            self.0
        )
    }
}

impl FromStr for Level {
    type Err = InvalidLevel;

    fn from_str(s: &str) -> Result<Level, InvalidLevel> {
        Ok(match s.trim().to_ascii_uppercase().as_str() {
            "NONE" => Level::None,
            "BACKWARD" => Level::Backward,
            "FORWARD" => Level::Forward,
            "FULL" => Level::Full,
            "BACKWARD_TRANSITIVE" => Level::BackwardTransitive,
            "FORWARD_TRANSITIVE" => Level::ForwardTransitive,
            "FULL_TRANSITIVE" => Level::FullTransitive,
            _ => return Err(InvalidLevel(s.to_string())),
        })
    }
}

/// One earlier version to check a candidate against.
pub struct Existing<'a> {
    pub version: u32,
    pub schema: &'a Schema,
}

/// Checks `candidate` against `existing` (ascending by version) under `level`; returns the reasons it is
/// incompatible, empty when compatible.
pub fn check(level: Level, candidate: &Schema, existing: &[Existing<'_>]) -> Vec<String> {
    let against: &[Existing<'_>] = if level.is_transitive() {
        existing
    } else {
        existing.last().map(std::slice::from_ref).unwrap_or(&[])
    };
    let mut problems = Vec::new();
    for old in against {
        if level.checks_backward() {
            if let Err(why) = fully_readable(old.schema, candidate) {
                problems.push(format!(
                    "new schema cannot read data written with version {} ({level}): {why}",
                    old.version
                ));
            }
        }
        if level.checks_forward() {
            if let Err(why) = fully_readable(candidate, old.schema) {
                problems.push(format!(
                    "version {} cannot read data written with the new schema ({level}): {why}",
                    old.version
                ));
            }
        }
    }
    problems
}

/// Whether every datum written with `writer` can be read with `reader`.
fn fully_readable(writer: &Schema, reader: &Schema) -> Result<(), String> {
    // Both schemas came from clients; a panic in apache-avro must cost this request, not the registry.
    let verdict = std::panic::catch_unwind(|| SchemaCompatibility::can_read(writer, reader))
        .map_err(|_| "the Avro compatibility check failed on these schemas".to_string())?;
    match verdict {
        Ok(Compatibility::Full) => Ok(()),
        Ok(Compatibility::Partial) => Err(
            "only some data would resolve: an enum lost a symbol the reader has no default for, \
             or a union lost a branch"
                .to_string(),
        ),
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(fields: &str) -> Schema {
        Schema::parse_str(&format!(
            r#"{{"type":"record","name":"Order","namespace":"t","fields":[{fields}]}}"#
        ))
        .unwrap()
    }

    const BASE: &str = r#"{"name":"id","type":"string"},{"name":"qty","type":"int"}"#;

    /// (description, new fields, backward ok, forward ok)
    const CASES: &[(&str, &str, bool, bool)] = &[
        ("identical", BASE, true, true),
        (
            "add optional field with default",
            r#"{"name":"id","type":"string"},{"name":"qty","type":"int"},{"name":"note","type":["null","string"],"default":null}"#,
            true,
            true,
        ),
        (
            "add required field without default",
            r#"{"name":"id","type":"string"},{"name":"qty","type":"int"},{"name":"note","type":"string"}"#,
            false,
            true,
        ),
        (
            "remove a field without default",
            r#"{"name":"id","type":"string"}"#,
            true,
            false,
        ),
        (
            "promote int to long",
            r#"{"name":"id","type":"string"},{"name":"qty","type":"long"}"#,
            true,
            false,
        ),
        (
            "change string to int",
            r#"{"name":"id","type":"int"},{"name":"qty","type":"int"}"#,
            false,
            false,
        ),
    ];

    #[test]
    fn field_changes_get_confluents_verdicts_at_every_level() {
        let old = record(BASE);
        for (what, fields, backward, forward) in CASES {
            let new = record(fields);
            let existing = [Existing {
                version: 1,
                schema: &old,
            }];
            for level in [
                Level::None,
                Level::Backward,
                Level::Forward,
                Level::Full,
                Level::BackwardTransitive,
                Level::ForwardTransitive,
                Level::FullTransitive,
            ] {
                let expected = match level {
                    Level::None => true,
                    Level::Backward | Level::BackwardTransitive => *backward,
                    Level::Forward | Level::ForwardTransitive => *forward,
                    Level::Full | Level::FullTransitive => *backward && *forward,
                };
                let problems = check(level, &new, &existing);
                assert_eq!(
                    problems.is_empty(),
                    expected,
                    "{what} under {level}: {problems:?}"
                );
            }
        }
    }

    fn enum_schema(symbols: &str, default: Option<&str>) -> Schema {
        let default = default
            .map(|d| format!(r#","default":"{d}""#))
            .unwrap_or_default();
        Schema::parse_str(&format!(
            r#"{{"type":"enum","name":"Status","symbols":[{symbols}]{default}}}"#
        ))
        .unwrap()
    }

    #[test]
    fn enum_symbol_removal_is_backward_incompatible_unless_reader_has_default() {
        let old = enum_schema(r#""A","B","C""#, None);
        let fewer = enum_schema(r#""A","B""#, None);
        let existing = [Existing {
            version: 1,
            schema: &old,
        }];
        assert!(!check(Level::Backward, &fewer, &existing).is_empty());
        assert!(check(Level::Forward, &fewer, &existing).is_empty());

        let fewer_with_default = enum_schema(r#""A","B""#, Some("A"));
        assert!(check(Level::Backward, &fewer_with_default, &existing).is_empty());
    }

    #[test]
    fn union_narrowing_is_backward_incompatible() {
        let old = record(r#"{"name":"v","type":["null","string","int"]}"#);
        let narrower = record(r#"{"name":"v","type":["null","string"]}"#);
        let existing = [Existing {
            version: 1,
            schema: &old,
        }];
        assert!(!check(Level::Backward, &narrower, &existing).is_empty());
        assert!(check(Level::Forward, &narrower, &existing).is_empty());
    }

    #[test]
    fn transitive_levels_check_every_earlier_version() {
        // v1 -> v2 drops `qty`; v3 re-adds `qty` as a string with a default: compatible with v2 only.
        let v1 = record(BASE);
        let v2 = record(r#"{"name":"id","type":"string"}"#);
        let v3 =
            record(r#"{"name":"id","type":"string"},{"name":"qty","type":"string","default":"0"}"#);
        let existing = [
            Existing {
                version: 1,
                schema: &v1,
            },
            Existing {
                version: 2,
                schema: &v2,
            },
        ];
        assert!(check(Level::Backward, &v3, &existing).is_empty());
        let problems = check(Level::BackwardTransitive, &v3, &existing);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("version 1"), "{problems:?}");
    }

    #[test]
    fn levels_parse_case_insensitively_and_reject_others() {
        assert_eq!(
            "full_transitive".parse::<Level>(),
            Ok(Level::FullTransitive)
        );
        let err = "SIDEWAYS".parse::<Level>().unwrap_err();
        assert!(err.to_string().contains("SIDEWAYS"));
    }
}
