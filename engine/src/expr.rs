//! Conditions and data mapping, in JMESPath (the `jmespath` crate of the JMESPath project).
//!
//! Why JMESPath: every expression in a definition maps JSON to JSON (a step's input from the workflow input and
//! earlier outputs, the workflow's output, a list to map over) or tests JSON (a condition is true when its result
//! is truthy); JMESPath is exactly a JSON-to-JSON language, has a specification with a compliance suite, no side
//! effects and no clock (the engine stays deterministic), is familiar from the AWS CLI's `--query`, and builds in
//! seconds. CEL reads more naturally for comparisons but is a typed language built around protobuf values, and its
//! Rust interpreter is a much heavier build.
//!
//! Expressions see one document: `{input, steps, previous, item, index, workflow}` (see `machine`).

use jmespath::ast::Ast;
use serde_json::Value;

/// Longest expression accepted, in bytes.
pub const MAX_EXPRESSION_BYTES: usize = 1024;
/// Deepest nesting of brackets and `!` accepted in an expression.
pub const MAX_EXPRESSION_NESTING: usize = 32;
/// Most operators (`.`, `|`, `&`, `[`, `(`, `{`, `,`, comparisons) in one expression. The parser recurses per
/// chained operator: measured, about 250 overflow a 2 MiB stack in a debug build.
pub const MAX_EXPRESSION_OPERATORS: usize = 100;

/// Refuses expressions whose size could exhaust the parser's stack (it recurses per nesting level and per
/// chained operator) before they reach it.
fn check_shape(expression: &str) -> Result<(), String> {
    if expression.len() > MAX_EXPRESSION_BYTES {
        return Err(format!(
            "the expression is {} bytes; at most {MAX_EXPRESSION_BYTES} are accepted",
            expression.len()
        ));
    }
    let (mut depth, mut deepest, mut negations, mut operators) = (0usize, 0usize, 0usize, 0usize);
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for c in expression.chars() {
        if let Some(q) = quote {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                _ if c == q => quote = None,
                _ => {}
            }
            continue;
        }
        match c {
            '\'' | '"' | '`' => quote = Some(c),
            '(' | '[' | '{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            ')' | ']' | '}' => depth = depth.saturating_sub(1),
            '!' => negations += 1,
            _ => {}
        }
        if matches!(c, '.' | '|' | '&' | '[' | '(' | '{' | ',' | '<' | '>' | '=') {
            operators += 1;
        }
    }
    if operators > MAX_EXPRESSION_OPERATORS {
        return Err(format!(
            "the expression has {operators} operators; at most {MAX_EXPRESSION_OPERATORS} are accepted"
        ));
    }
    if deepest + negations > MAX_EXPRESSION_NESTING {
        return Err(format!(
            "the expression nests brackets and negations {} deep; at most {MAX_EXPRESSION_NESTING} are accepted",
            deepest + negations
        ));
    }
    Ok(())
}

/// Checks that `expression` parses; returns the names it reads as `steps.<name>`.
pub fn check(expression: &str) -> Result<Vec<String>, String> {
    check_shape(expression)?;
    let compiled = jmespath::compile(expression).map_err(|e| e.to_string())?;
    let mut references = Vec::new();
    collect_step_references(compiled.as_ast(), &mut references);
    references.sort();
    references.dedup();
    Ok(references)
}

/// Evaluates `expression` against `context`.
pub fn eval(expression: &str, context: &Value) -> Result<Value, String> {
    check_shape(expression)?;
    let compiled = jmespath::compile(expression).map_err(|e| e.to_string())?;
    let result = compiled
        .search(context)
        .map_err(|e| format!("evaluating `{expression}`: {e}"))?;
    serde_json::to_value(&*result).map_err(|e| format!("evaluating `{expression}`: {e}"))
}

/// JMESPath truthiness: false, null, empty strings, lists and objects are false; everything else is true.
pub fn truthy(value: &Value) -> bool {
    match value {
        Value::Null | Value::Bool(false) => false,
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
        _ => true,
    }
}

/// Whether `expression` is the literal `true`, which makes any later alternative unreachable.
pub fn is_literal_true(expression: &str) -> bool {
    jmespath::compile(expression)
        .map(|c| matches!(c.as_ast(), Ast::Literal { value, .. } if value.is_truthy() && value.is_boolean()))
        .unwrap_or(false)
}

fn collect_step_references(ast: &Ast, out: &mut Vec<String>) {
    if let Ast::Subexpr { lhs, rhs, .. } = ast {
        if let (Ast::Field { name: outer, .. }, Ast::Field { name, .. }) =
            (lhs.as_ref(), rhs.as_ref())
        {
            if outer == "steps" {
                out.push(name.clone());
            }
        }
    }
    match ast {
        Ast::Comparison { lhs, rhs, .. }
        | Ast::Projection { lhs, rhs, .. }
        | Ast::And { lhs, rhs, .. }
        | Ast::Or { lhs, rhs, .. }
        | Ast::Subexpr { lhs, rhs, .. } => {
            collect_step_references(lhs, out);
            collect_step_references(rhs, out);
        }
        Ast::Condition {
            predicate, then, ..
        } => {
            collect_step_references(predicate, out);
            collect_step_references(then, out);
        }
        Ast::Expref { ast, .. } => collect_step_references(ast, out),
        Ast::Flatten { node, .. } | Ast::Not { node, .. } | Ast::ObjectValues { node, .. } => {
            collect_step_references(node, out)
        }
        Ast::Function { args, .. } => args.iter().for_each(|a| collect_step_references(a, out)),
        Ast::MultiList { elements, .. } => elements
            .iter()
            .for_each(|a| collect_step_references(a, out)),
        Ast::MultiHash { elements, .. } => elements
            .iter()
            .for_each(|kv| collect_step_references(&kv.value, out)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn maps_and_tests_json() {
        let ctx =
            json!({"input": {"amount": 120, "items": [1, 2]}, "steps": {"charge": {"id": "c-1"}}});
        assert_eq!(
            eval("{amount: input.amount, charge: steps.charge.id}", &ctx).unwrap(),
            json!({"amount": 120, "charge": "c-1"})
        );
        assert!(truthy(&eval("input.amount > `100`", &ctx).unwrap()));
        assert!(!truthy(&eval("input.missing", &ctx).unwrap()));
        assert_eq!(eval("length(input.items)", &ctx).unwrap(), json!(2));
    }

    #[test]
    fn finds_step_references_and_rejects_bad_syntax() {
        let mut refs = check("{a: steps.reserve.id, b: [steps.charge][0], c: input.x}").unwrap();
        refs.sort();
        assert_eq!(refs, vec!["charge", "reserve"]);
        assert!(check("input.[").is_err());
        assert!(is_literal_true("`true`"));
        assert!(!is_literal_true("input.ok"));
    }
}

#[cfg(test)]
mod shape_tests {
    use super::*;

    /// The parser recurses; the largest expressions accepted must parse and run on a 2 MiB stack (a tokio
    /// worker's default) in a debug build.
    #[test]
    fn the_largest_accepted_expressions_fit_a_small_stack() {
        let deep = format!("{}input{}", "(".repeat(32), ")".repeat(32));
        let ops = MAX_EXPRESSION_OPERATORS;
        let chain = format!("input{}", ".a".repeat(ops));
        let pipes = format!("input{}", " | a".repeat(ops));
        let ors = format!("input{}", "||a".repeat(ops / 2));
        let handle = std::thread::Builder::new()
            .stack_size(2 * 1024 * 1024)
            .spawn(move || {
                for expression in [deep, chain, pipes, ors] {
                    assert!(expression.len() <= MAX_EXPRESSION_BYTES);
                    check(&expression).unwrap();
                    eval(&expression, &serde_json::json!({"input": {"a": 1}})).unwrap();
                }
            })
            .unwrap();
        handle.join().unwrap();
    }

    #[test]
    fn too_long_or_too_deep_expressions_are_refused() {
        assert!(check(&"a.".repeat(600)).unwrap_err().contains("bytes"));
        assert!(check(&format!("a{}", ".b".repeat(101)))
            .unwrap_err()
            .contains("operators"));
        assert!(check(&format!("{}a{}", "(".repeat(40), ")".repeat(40)))
            .unwrap_err()
            .contains("deep"));
        assert!(check(&"!".repeat(40)).unwrap_err().contains("deep"));
        assert!(
            check("'((((((((((((((((((((((((((((((((((('").is_ok(),
            "brackets in a literal do not count"
        );
    }
}
