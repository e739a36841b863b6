//! Bounds on what one principal's statement may cost: its text, its
//! nesting, its memory and its time (the settings are in `[access]`).
//!
//! A flat chain such as `1+1+…` is parsed in a loop but is as deep as it is
//! long, and every later pass (table resolution, type coercion, the
//! optimizers, the physical planner, evaluation, and finally dropping the
//! tree) walks it recursively. So the text is bounded before it is parsed
//! (bytes and tokens: no tree deeper than half the tokens can be built), and
//! the nesting and the number of tables and SELECTs right after, before
//! anything else walks the tree.

use std::ops::ControlFlow;

use datafusion::error::DataFusionError;
use datafusion::sql::parser::Statement;
use datafusion::sql::sqlparser::ast::{Expr, Query, Select, TableFactor, Visit, Visitor};
use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::tokenizer::{Token, Tokenizer};

use super::registry::PrincipalKind;
use super::{AccessError, Result};

/// Most tokens in one statement (whitespace and comments not counted).
pub(crate) const MAX_TOKENS: usize = 4_096;
/// Deepest nesting of expressions and subqueries in one statement: half of
/// what a 2 MiB thread (a tokio worker's default, where the CLI's query
/// partitions run) survives in an unoptimised build.
pub(crate) const MAX_DEPTH: usize = 128;
/// Most tables and SELECTs one statement reads: each makes the plan wider
/// and deeper, and planning one is not cancellable.
pub(crate) const MAX_RELATIONS: usize = 64;

/// Refuses a statement too long to parse, before the parser builds its tree.
pub(crate) fn check_text(sql: &str, max_bytes: usize) -> Result<()> {
    if sql.len() > max_bytes {
        return Err(AccessError::Limit(format!(
            "the statement has {} bytes; at most {max_bytes} are accepted (access.max_statement_bytes)",
            sql.len()
        )));
    }
    let tokens = Tokenizer::new(&GenericDialect {}, sql)
        .tokenize()
        .map_err(|e| AccessError::Invalid(format!("SQL: {e}")))?;
    let counted = tokens
        .iter()
        .filter(|t| !matches!(t, Token::Whitespace(_)))
        .count();
    if counted > MAX_TOKENS {
        return Err(AccessError::Limit(format!(
            "the statement has {counted} tokens; at most {MAX_TOKENS} are accepted"
        )));
    }
    Ok(())
}

/// Refuses a parsed statement whose expressions and subqueries nest deeper
/// than [`MAX_DEPTH`], or that reads more than [`MAX_RELATIONS`] tables and
/// SELECTs. The visitor stops at either bound, so it never recurses deeper
/// itself.
pub(crate) fn check_shape(statement: &Statement) -> Result<()> {
    let over = match statement {
        Statement::Statement(inner) => inner.visit(&mut Shape::default()).break_value(),
        Statement::Explain(explain) => return check_shape(&explain.statement),
        // COPY, CREATE EXTERNAL TABLE and RESET are refused as not read-only.
        Statement::CreateExternalTable(_) | Statement::CopyTo(_) | Statement::Reset(_) => None,
    };
    match over {
        None => Ok(()),
        Some(Over::Depth) => Err(AccessError::Limit(format!(
            "an expression or subquery is nested deeper than {MAX_DEPTH} levels \
             (a chain such as 1+1+… counts one level per operator)"
        ))),
        Some(Over::Relations) => Err(AccessError::Limit(format!(
            "the statement reads more than {MAX_RELATIONS} tables and SELECTs \
             (each join, subquery, CTE and UNION branch counts)"
        ))),
    }
}

/// Which bound a statement went over.
enum Over {
    Depth,
    Relations,
}

/// The nesting depth reached so far and the tables and SELECTs seen.
#[derive(Default)]
struct Shape {
    depth: usize,
    relations: usize,
}

impl Shape {
    fn enter(&mut self) -> ControlFlow<Over> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            ControlFlow::Break(Over::Depth)
        } else {
            ControlFlow::Continue(())
        }
    }

    fn leave(&mut self) -> ControlFlow<Over> {
        self.depth = self.depth.saturating_sub(1);
        ControlFlow::Continue(())
    }

    fn relation(&mut self) -> ControlFlow<Over> {
        self.relations += 1;
        if self.relations > MAX_RELATIONS {
            ControlFlow::Break(Over::Relations)
        } else {
            ControlFlow::Continue(())
        }
    }
}

impl Visitor for Shape {
    type Break = Over;

    fn pre_visit_expr(&mut self, _: &Expr) -> ControlFlow<Over> {
        self.enter()
    }

    fn post_visit_expr(&mut self, _: &Expr) -> ControlFlow<Over> {
        self.leave()
    }

    fn pre_visit_query(&mut self, _: &Query) -> ControlFlow<Over> {
        self.enter()
    }

    fn post_visit_query(&mut self, _: &Query) -> ControlFlow<Over> {
        self.leave()
    }

    fn pre_visit_select(&mut self, _: &Select) -> ControlFlow<Over> {
        self.relation()
    }

    fn pre_visit_table_factor(&mut self, _: &TableFactor) -> ControlFlow<Over> {
        self.relation()
    }
}

/// An engine error while running. Running out of memory gets a clear
/// error; any other error's text stays with the operator, because it can
/// quote a value.
pub(crate) fn running_error(
    kind: PrincipalKind,
    e: DataFusionError,
    memory_mb: u32,
) -> AccessError {
    if is_out_of_memory(&e) {
        return AccessError::Limit(format!(
            "resources exhausted: the query needs more than the {memory_mb} MiB of memory \
             it may use"
        ));
    }
    match kind {
        PrincipalKind::Operator => AccessError::DataFusion(e),
        _ => AccessError::Invalid("the query failed while running (details withheld)".into()),
    }
}

fn is_out_of_memory(e: &DataFusionError) -> bool {
    matches!(e.find_root(), DataFusionError::ResourcesExhausted(_))
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::sql::parser::DFParser;

    fn parsed(sql: &str) -> Statement {
        DFParser::parse_sql(sql)
            .expect("parses")
            .pop_front()
            .expect("one statement")
    }

    #[test]
    fn length_tokens_and_depth_are_bounded() {
        assert!(check_text("SELECT 1", 100).is_ok());
        let long = format!("SELECT 1{}", " ".repeat(200));
        assert!(
            matches!(check_text(&long, 100), Err(AccessError::Limit(m)) if m.contains("bytes"))
        );
        let many = format!("SELECT 1{}", "+1".repeat(MAX_TOKENS));
        assert!(
            matches!(check_text(&many, 1 << 20), Err(AccessError::Limit(m)) if m.contains("tokens"))
        );
        let chain = |n: usize| parsed(&format!("SELECT 1{}", "+1".repeat(n)));
        assert!(check_shape(&chain(MAX_DEPTH - 2)).is_ok());
        assert!(
            matches!(check_shape(&chain(MAX_DEPTH + 1)), Err(AccessError::Limit(m)) if m.contains("nested"))
        );
        let explained = parsed(&format!("EXPLAIN SELECT 1{}", "+1".repeat(MAX_DEPTH + 1)));
        assert!(check_shape(&explained).is_err());
    }

    #[test]
    fn tables_and_selects_are_counted() {
        let joined = |n: usize| {
            let tables: Vec<String> = (0..n).map(|i| format!("t t{i}")).collect();
            parsed(&format!("SELECT count(*) FROM {}", tables.join(", ")))
        };
        // One SELECT and n tables.
        assert!(check_shape(&joined(MAX_RELATIONS - 1)).is_ok());
        assert!(
            matches!(check_shape(&joined(MAX_RELATIONS)), Err(AccessError::Limit(m)) if m.contains("tables"))
        );
        let unions = vec!["SELECT 1"; MAX_RELATIONS + 1].join(" UNION ");
        assert!(check_shape(&parsed(&unions)).is_err());
    }
}
