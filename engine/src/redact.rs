//! Redaction of what a definition marks sensitive (`sensitive: [input.card.number, steps.charge.token]`).
//!
//! The engine keeps the real values: workers, child workflows and later steps need them. What it shows observers
//! goes through [`Secrets::scrub`]: lifecycle event details, and (through [`crate::Instance::redact`]) the
//! input, output and error that displays read from the state. The values found at the marked paths are collected
//! as they arrive — the input at start, a step's output when it completes, a signal's payload, the workflow's
//! output — and masked wherever they appear later: a leaf equal to one, and inside longer strings each
//! occurrence of one of at least [`MIN_SUBSTRING`] characters. A value copied into another step's output or into
//! an error message is masked there too, which a mask by path alone would miss.
//!
//! Collection is bounded ([`MAX_SECRETS`] values, [`MAX_SECRET_BYTES`] in all). Past the bound the instance masks
//! every string and number it shows: losing precision is better than showing a value it was told to hide.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// What a masked value is shown as.
pub const MASK: &str = "***";
/// Shortest collected value masked inside longer strings; shorter ones only where a whole leaf equals them, so a
/// marked `"12"` does not turn every `12` inside every message into `***`.
pub const MIN_SUBSTRING: usize = 4;
/// Most values an instance collects.
pub const MAX_SECRETS: usize = 256;
/// Most bytes of collected values an instance keeps.
pub const MAX_SECRET_BYTES: usize = 64 * 1024;
/// Most paths a definition marks, and most segments in one.
pub const MAX_PATHS: usize = 64;
const MAX_SEGMENTS: usize = 32;

/// Where a marked path starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Root {
    Input,
    Output,
    /// The output of every step with this name (in each map iteration it runs in).
    Step(String),
    /// The payload of every signal with this name.
    Signal(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    /// An object's field, or an array's element when it is a number.
    Key(String),
    /// Every element or field.
    Any,
}

/// One path of a definition's `sensitive:` list, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SensitivePath {
    pub root: Root,
    segments: Vec<Segment>,
    text: String,
}

impl SensitivePath {
    /// Parses `input.a.b`, `output.x`, `steps.NAME.a`, `signals.NAME.a`; `*` or `[*]` is every element, `[2]` or
    /// `.2` one element of an array.
    pub fn parse(text: &str) -> Result<SensitivePath, String> {
        let mut parts = Vec::new();
        for part in text.split('.') {
            let (key, brackets) = match part.find('[') {
                Some(at) => part.split_at(at),
                None => (part, ""),
            };
            if !key.is_empty() || brackets.is_empty() {
                parts.push(key.to_string());
            }
            let mut rest = brackets;
            while !rest.is_empty() {
                let inner = rest
                    .strip_prefix('[')
                    .and_then(|r| r.split_once(']'))
                    .filter(|(inner, _)| *inner == "*" || inner.parse::<usize>().is_ok());
                let Some((inner, after)) = inner else {
                    return Err(format!(
                        "`{text}`: `{part}` has a bracket that is not `[*]` or `[<index>]`"
                    ));
                };
                parts.push(inner.to_string());
                rest = after;
            }
        }
        if let Some(empty) = parts.iter().position(String::is_empty) {
            return Err(format!(
                "`{text}`: segment {} is empty (two dots, or a dot at an end?)",
                empty + 1
            ));
        }
        if parts.len() > MAX_SEGMENTS {
            return Err(format!(
                "`{text}` has {} segments; at most {MAX_SEGMENTS} are allowed",
                parts.len()
            ));
        }
        let mut parts = parts.into_iter();
        let root = match parts.next().as_deref() {
            Some("input") => Root::Input,
            Some("output") => Root::Output,
            Some(kind @ ("steps" | "signals")) => {
                let Some(name) = parts.next() else {
                    return Err(format!("`{text}`: name the {kind} after `{kind}.`"));
                };
                if kind == "steps" {
                    Root::Step(name)
                } else {
                    Root::Signal(name)
                }
            }
            _ => {
                return Err(format!(
                    "`{text}` starts with neither input, output, steps.<name> nor signals.<name>"
                ))
            }
        };
        let segments = parts
            .map(|p| {
                if p == "*" {
                    Segment::Any
                } else {
                    Segment::Key(p)
                }
            })
            .collect();
        Ok(SensitivePath {
            root,
            segments,
            text: text.to_string(),
        })
    }

    /// The path as the definition wrote it.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Adds the string and number leaves found at this path in `value` (the document of the path's root).
    fn collect(&self, value: &Value, into: &mut Secrets) {
        fn walk(value: &Value, segments: &[Segment], into: &mut Secrets) {
            let Some((first, rest)) = segments.split_first() else {
                leaves(value, into);
                return;
            };
            match (first, value) {
                (Segment::Key(k), Value::Object(map)) => {
                    if let Some(v) = map.get(k) {
                        walk(v, rest, into)
                    }
                }
                (Segment::Key(k), Value::Array(items)) => {
                    if let Some(v) = k.parse::<usize>().ok().and_then(|i| items.get(i)) {
                        walk(v, rest, into)
                    }
                }
                (Segment::Any, Value::Object(map)) => {
                    map.values().for_each(|v| walk(v, rest, into))
                }
                (Segment::Any, Value::Array(items)) => {
                    items.iter().for_each(|v| walk(v, rest, into))
                }
                _ => {}
            }
        }
        fn leaves(value: &Value, into: &mut Secrets) {
            match value {
                Value::String(s) => into.add(s.clone()),
                Value::Number(n) => into.add(n.to_string()),
                Value::Array(items) => items.iter().for_each(|v| leaves(v, into)),
                Value::Object(map) => map.values().for_each(|v| leaves(v, into)),
                Value::Bool(_) | Value::Null => {}
            }
        }
        walk(value, &self.segments, into)
    }
}

/// The sensitive values an instance has seen.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Secrets {
    values: Vec<String>,
    /// More was marked than is kept: every leaf is masked.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    overflowed: bool,
}

impl Secrets {
    pub fn is_empty(&self) -> bool {
        self.values.is_empty() && !self.overflowed
    }

    fn add(&mut self, value: String) {
        if value.is_empty() || self.values.contains(&value) {
            return;
        }
        let bytes: usize = self.values.iter().map(String::len).sum();
        if self.values.len() >= MAX_SECRETS || bytes + value.len() > MAX_SECRET_BYTES {
            self.overflowed = true;
            return;
        }
        self.values.push(value);
    }

    /// Collects what `paths` rooted at `root` find in `document`.
    pub fn collect(&mut self, paths: &[SensitivePath], root: &Root, document: &Value) {
        for path in paths.iter().filter(|p| &p.root == root) {
            path.collect(document, self);
        }
    }

    /// `value` with every collected value masked.
    pub fn scrub(&self, value: &Value) -> Value {
        if self.is_empty() {
            return value.clone();
        }
        let mut value = value.clone();
        self.scrub_in_place(&mut value);
        value
    }

    pub fn scrub_in_place(&self, value: &mut Value) {
        if self.is_empty() {
            return;
        }
        match value {
            Value::String(s) => {
                if let Some(masked) = self.masked_text(s) {
                    *s = masked;
                }
            }
            Value::Number(n) => {
                if self.overflowed || self.values.contains(&n.to_string()) {
                    *value = Value::String(MASK.into());
                }
            }
            Value::Array(items) => items.iter_mut().for_each(|v| self.scrub_in_place(v)),
            Value::Object(map) => map.values_mut().for_each(|v| self.scrub_in_place(v)),
            Value::Bool(_) | Value::Null => {}
        }
    }

    /// `text` with every collected value masked.
    pub fn scrub_text(&self, text: &str) -> String {
        self.masked_text(text).unwrap_or_else(|| text.to_string())
    }

    /// The masked text, when anything in `text` is masked.
    fn masked_text(&self, text: &str) -> Option<String> {
        if self.overflowed {
            return Some(MASK.into());
        }
        if self.values.iter().any(|v| v == text) {
            return Some(MASK.into());
        }
        let mut out: Option<String> = None;
        // Longest first, so a value containing a shorter one is masked whole.
        let mut long: Vec<&String> = self
            .values
            .iter()
            .filter(|v| v.chars().count() >= MIN_SUBSTRING)
            .collect();
        long.sort_by_key(|v| std::cmp::Reverse(v.len()));
        for secret in long {
            let current = out.as_deref().unwrap_or(text);
            if current.contains(secret.as_str()) {
                out = Some(current.replace(secret.as_str(), MASK));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn paths(texts: &[&str]) -> Vec<SensitivePath> {
        texts
            .iter()
            .map(|t| SensitivePath::parse(t).unwrap())
            .collect()
    }

    #[test]
    fn parses_roots_wildcards_and_indexes_and_names_what_is_wrong() {
        let p = SensitivePath::parse("steps.charge.cards[*].number").unwrap();
        assert_eq!(p.root, Root::Step("charge".into()));
        assert_eq!(
            p.segments,
            vec![
                Segment::Key("cards".into()),
                Segment::Any,
                Segment::Key("number".into())
            ]
        );
        assert_eq!(
            SensitivePath::parse("signals.approve").unwrap().root,
            Root::Signal("approve".into())
        );
        for (bad, says) in [
            ("body.card", "starts with neither"),
            ("input..card", "segment 2 is empty"),
            ("input.card.", "segment 3 is empty"),
            ("steps", "name the steps"),
            ("input.cards[x]", "bracket"),
            ("input.cards[1", "bracket"),
        ] {
            let e = SensitivePath::parse(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
        let long = format!("input{}", ".a".repeat(40));
        assert!(SensitivePath::parse(&long)
            .unwrap_err()
            .contains("segments"));
    }

    #[test]
    fn collects_leaves_at_the_paths_and_masks_them_wherever_they_appear() {
        let input = json!({
            "card": {"number": "4111111111111111", "cvv": 123},
            "cards": [{"number": "5500000000000004"}, {"number": "340000000000009"}],
            "name": "Ada",
        });
        let mut secrets = Secrets::default();
        secrets.collect(
            &paths(&["input.card", "input.cards[*].number", "steps.charge.token"]),
            &Root::Input,
            &input,
        );
        let shown = secrets.scrub(&json!({
            "echo": input,
            "message": "card 4111111111111111 declined; try 5500000000000004",
            "quantity": 123,
            "note": "123 items",
        }));
        assert_eq!(shown["echo"]["card"]["number"], "***");
        assert_eq!(shown["echo"]["card"]["cvv"], "***");
        assert_eq!(shown["echo"]["cards"][1]["number"], "***");
        assert_eq!(shown["echo"]["name"], "Ada");
        assert_eq!(shown["message"], "card *** declined; try ***");
        // A short value is masked as a whole leaf, not inside text.
        assert_eq!(shown["quantity"], "***");
        assert_eq!(shown["note"], "123 items");
        let mut step = Secrets::default();
        step.collect(
            &paths(&["steps.charge.token"]),
            &Root::Step("charge".into()),
            &json!({"token": "tok_abc"}),
        );
        assert_eq!(step.scrub_text("got tok_abc back"), "got *** back");
    }

    #[test]
    fn past_the_bound_everything_is_masked() {
        let many: Vec<Value> = (0..MAX_SECRETS + 1)
            .map(|i| json!(format!("v{i:04}")))
            .collect();
        let mut secrets = Secrets::default();
        secrets.collect(&paths(&["input"]), &Root::Input, &Value::Array(many));
        assert_eq!(
            secrets.scrub(&json!({"a": "plain", "n": 1, "b": true})),
            json!({"a": "***", "n": "***", "b": true})
        );
    }

    proptest! {
        /// Whatever the document, no marked value of at least MIN_SUBSTRING characters survives a scrub.
        #[test]
        fn no_marked_value_survives(
            secret in "[a-z0-9]{4,12}",
            before in "[ a-z]{0,8}",
            after in "[ a-z]{0,8}",
            depth in 0usize..4,
        ) {
            let mut secrets = Secrets::default();
            secrets.collect(&paths(&["input.s"]), &Root::Input, &json!({"s": secret}));
            let mut doc = json!(format!("{before}{secret}{after}"));
            for _ in 0..depth {
                doc = json!({"k": [doc, secret.clone()]});
            }
            let shown = secrets.scrub(&doc).to_string();
            prop_assert!(!shown.contains(&secret), "{shown}");
        }
    }
}
