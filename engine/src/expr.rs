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

/// Checks that `expression` parses; returns the names it reads as `steps.<name>`.
pub fn check(expression: &str) -> Result<Vec<String>, String> {
    let compiled = jmespath::compile(expression).map_err(|e| e.to_string())?;
    let mut references = Vec::new();
    collect_step_references(compiled.as_ast(), &mut references);
    references.sort();
    references.dedup();
    Ok(references)
}

/// Evaluates `expression` against `context`.
pub fn eval(expression: &str, context: &Value) -> Result<Value, String> {
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
