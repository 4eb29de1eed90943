//! Bounds on what users may hand edow: payload bytes and nesting, the shape of definitions, and what one step may
//! fan out to. Every entry point checks against one [`Limits`], so a hostile or careless input is refused with a
//! reason that names the bound instead of growing a workflow's state past what Kafka or the orchestrator can hold.
//!
//! The JSON checks run on the text before it is parsed: a depth scan is linear and uses no stack, so even a
//! megabyte of `[` cannot recurse anywhere.

use serde::{Deserialize, Serialize};

/// The configurable bounds, with the defaults documented in the README.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Largest JSON document accepted as a workflow input, signal payload or task output, in bytes.
    pub max_payload_bytes: usize,
    /// Deepest nesting of arrays and objects accepted in such a document.
    pub max_json_depth: usize,
    /// Most elements a map step may iterate over.
    pub max_map_items: usize,
    /// Highest `concurrency` of a map step.
    pub max_map_concurrency: usize,
    /// Most branches of a parallel step, task types of a copy step, or alternatives of a choice.
    pub max_branches: usize,
    /// Deepest nesting of step blocks in a definition (a sequence in a parallel branch in a map is 3).
    pub max_definition_depth: usize,
    /// Most steps in one definition, nested ones included.
    pub max_steps: usize,
    /// Deepest chain of child workflows (a workflow starting a child starting a child ...).
    pub max_child_depth: u32,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_payload_bytes: 256 * 1024,
            max_json_depth: 64,
            max_map_items: 10_000,
            max_map_concurrency: 1_000,
            max_branches: 1_000,
            max_definition_depth: 16,
            max_steps: 10_000,
            max_child_depth: 32,
        }
    }
}

/// Why a JSON payload was refused: the dead-letter reason and a message naming the bound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// `too_large` or `too_deep`.
    pub reason: &'static str,
    pub message: String,
}

impl Limits {
    /// Checks a JSON text against the byte and depth bounds; `what` names it in the message.
    pub fn check_json(&self, what: &str, text: &str) -> Result<(), Refusal> {
        if text.len() > self.max_payload_bytes {
            return Err(Refusal {
                reason: "too_large",
                message: format!(
                    "{what} is {} bytes; the limit is {} bytes (max_payload_bytes). Pass large data by \
                     reference (a URL or object key) instead",
                    text.len(),
                    self.max_payload_bytes
                ),
            });
        }
        let depth = json_depth(text);
        if depth > self.max_json_depth {
            return Err(Refusal {
                reason: "too_deep",
                message: format!(
                    "{what} nests arrays/objects {depth} deep; the limit is {} (max_json_depth)",
                    self.max_json_depth
                ),
            });
        }
        Ok(())
    }
}

/// The deepest nesting of `[` and `{` in a JSON text, ignoring brackets inside strings. Malformed text gets a
/// number too; parsing reports what is wrong with it.
pub fn json_depth(text: &str) -> usize {
    let (mut depth, mut deepest) = (0usize, 0usize);
    let (mut in_string, mut escaped) = (false, false);
    for byte in text.bytes() {
        if in_string {
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn depth_counts_brackets_outside_strings() {
        assert_eq!(json_depth("1"), 0);
        assert_eq!(json_depth("{}"), 1);
        assert_eq!(json_depth(r#"{"a":[1,{"b":[]}]}"#), 4);
        assert_eq!(json_depth(r#"{"a":"[[[[\"{{"}"#), 1);
        assert_eq!(json_depth(&"[".repeat(100_000)), 100_000);
    }

    #[test]
    fn over_limit_payloads_are_refused_with_the_bound() {
        let limits = Limits {
            max_payload_bytes: 10,
            max_json_depth: 2,
            ..Limits::default()
        };
        assert!(limits.check_json("input", "[[1]]").is_ok());
        let deep = limits.check_json("input", "[[[1]]]").unwrap_err();
        assert_eq!(deep.reason, "too_deep");
        assert!(deep.message.contains("limit is 2"), "{}", deep.message);
        let large = limits.check_json("input", "\"0123456789\"").unwrap_err();
        assert_eq!(large.reason, "too_large");
        assert!(large.message.contains("12 bytes"), "{}", large.message);
    }

    proptest! {
        #[test]
        fn depth_agrees_with_serde_json_on_generated_documents(depth in 0usize..100, width in 1usize..4) {
            let mut text = String::from("0");
            for level in 0..depth {
                text = if level % 2 == 0 {
                    format!("[{text}{}]", ",0".repeat(width - 1))
                } else {
                    format!("{{\"k\\\"[\":{text}}}")
                };
            }
            prop_assert_eq!(json_depth(&text), depth);
        }
    }
}
