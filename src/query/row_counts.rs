//! `count(*)` of rows that differ only in columns a query does not read,
//! answered from the row count the Delta log gives each file, without
//! opening one.
//!
//! A physical optimizer rule. Every row of a file has the file's partition
//! values (`date`, `hour`), so a plan that reads nothing but partition
//! columns makes, from each file, as many identical rows as the file holds:
//! one row and a count stand for them all ([`Block`]). Below an aggregate
//! that groups by columns and only counts rows (`count(*)`, `count(1)`, no
//! `DISTINCT`, no `FILTER`), such a plan is run on each file's one row
//! instead of its rows, and the aggregate's output is built from the
//! counts. The plan may filter its rows on partition columns, rename
//! them, and join branches with `UNION ALL`: a retention view reads the
//! hours within every rule whole and filters the others by each row's
//! time, so such a count takes the whole hours' counts from the log and
//! counts the others' rows. Where a branch reads a file column (a row's
//! time, a vehicle a deletion request or hold names), holds a file the log
//! has no count for, a limit, or a node this rule does not know, that
//! branch runs as before; so does the whole plan when a filter or
//! projection above the union is not one the rule can evaluate.
//!
//! Nodes the session names as see-through pass every row of their one
//! input unchanged (a principal's policy barrier). Above one, only
//! expressions that cannot fail, vary or wait ([`infallible`]: comparisons
//! of columns and literals) are evaluated, while the plan is made, on one
//! row per file that has rows and that the nodes below kept: they meet no
//! row the view leaves out, raise no error, and give what they would have
//! given on each of that file's rows. Any other expression (arithmetic, a
//! function, a subquery) leaves the plan as it was.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, Int64Array, RecordBatch, RecordBatchOptions};
use arrow::datatypes::{DataType, Schema, SchemaRef};
use datafusion::common::config::ConfigOptions;
use datafusion::common::tree_node::{Transformed, TransformedResult, TreeNode};
use datafusion::common::{Result, ScalarValue, internal_err};
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::datasource::physical_plan::FileScanConfig;
use datafusion::datasource::source::DataSourceExec;
use datafusion::logical_expr::Operator;
use datafusion::physical_expr::expressions::{
    BinaryExpr, Column, InListExpr, IsNotNullExpr, IsNullExpr, Literal, NotExpr,
};
use datafusion::physical_expr::utils::{collect_columns, reassign_expr_columns};
use datafusion::physical_optimizer::PhysicalOptimizerRule;
use datafusion::physical_plan::aggregates::{AggregateExec, AggregateMode};
use datafusion::physical_plan::empty::EmptyExec;
use datafusion::physical_plan::filter::FilterExec;
use datafusion::physical_plan::projection::ProjectionExec;
use datafusion::physical_plan::union::UnionExec;
use datafusion::physical_plan::{
    ChildrenPropertiesMode, ExecutionPlan, Partitioning, PhysicalExpr, ReplaceChildrenOptions,
};

use super::{SeeThrough, passes_rows};
use crate::store::RowCount;

/// The rule; see the module's documentation.
#[derive(Debug)]
pub(crate) struct RowCountsFromLog {
    see_through: SeeThrough,
}

/// `rows` identical rows of a plan's output, as one row.
struct Block {
    row: RecordBatch,
    rows: u64,
}

impl RowCountsFromLog {
    pub(crate) fn new(see_through: SeeThrough) -> Self {
        Self { see_through }
    }

    /// The totals `node` would compute, as a one-batch source with its
    /// schema, or as a union of branches some of which are counted
    /// ([`Self::counted_by_branch`]); `None` when it is not a count over
    /// [`Block`]s.
    fn counted(&self, node: &Arc<dyn ExecutionPlan>) -> Result<Option<Arc<dyn ExecutionPlan>>> {
        let Some(aggregate) = node.downcast_ref::<AggregateExec>() else {
            return Ok(None);
        };
        // The counts come out in one partition (or one per branch): only
        // where no aggregate above relies on a hash partitioning of them.
        let hashed = matches!(
            aggregate.properties().output_partitioning(),
            Partitioning::Hash(..)
        );
        if !counts_rows_only(aggregate) || hashed {
            return Ok(None);
        }
        let schema = aggregate.schema();
        let keys = aggregate.group_expr().expr();
        let aggregates = aggregate.aggr_expr().len();
        let counts_typed = schema.fields().len() == keys.len() + aggregates
            && schema.fields()[keys.len()..]
                .iter()
                .all(|f| f.data_type() == &DataType::Int64);
        if !counts_typed || keys.iter().any(|(expr, _)| !expr.is::<Column>()) {
            return Ok(None);
        }
        let Some(blocks) = self.blocks(aggregate.input())? else {
            return self.counted_by_branch(aggregate);
        };
        let mut totals: HashMap<Vec<ScalarValue>, i64> = HashMap::new();
        for block in blocks {
            let mut values = Vec::with_capacity(keys.len());
            for (expr, _) in keys {
                let value = expr.evaluate(&block.row)?.into_array(1)?;
                values.push(ScalarValue::try_from_array(&value, 0)?);
            }
            let total = totals.entry(values).or_default();
            let sum = i64::try_from(block.rows)
                .ok()
                .and_then(|rows| total.checked_add(rows));
            let Some(sum) = sum else {
                return Ok(None);
            };
            *total = sum;
        }
        // No grouping: one row, zero when there are no rows.
        let groups: Vec<(Vec<ScalarValue>, i64)> = if keys.is_empty() {
            vec![(Vec::new(), totals.into_values().sum())]
        } else {
            totals.into_iter().collect()
        };
        let mut columns: Vec<ArrayRef> = Vec::with_capacity(schema.fields().len());
        for (k, field) in schema.fields()[..keys.len()].iter().enumerate() {
            columns.push(if groups.is_empty() {
                arrow::array::new_empty_array(field.data_type())
            } else {
                ScalarValue::iter_to_array(groups.iter().map(|(values, _)| values[k].clone()))?
            });
        }
        let counts: ArrayRef =
            Arc::new(Int64Array::from_iter_values(groups.iter().map(|(_, n)| *n)));
        columns.extend(std::iter::repeat_n(counts, aggregates));
        let batch = RecordBatch::try_new(Arc::clone(&schema), columns)?;
        Ok(Some(MemorySourceConfig::try_new_exec(
            &[vec![batch]],
            schema,
            None,
        )?))
    }

    /// A partial count over branches joined by `UNION ALL`, where only some
    /// are [`Block`]s: as the branches' own partial counts, those of blocks
    /// built from them, each branch under its own copy of the nodes between
    /// (filters, projections, a barrier), which take each row alone. The
    /// final aggregate above adds partial counts of any origin. Nothing of
    /// the aggregate moves below a see-through node but column references
    /// and counts, which evaluate nothing on a row; a copied filter stays
    /// above its barrier.
    fn counted_by_branch(
        &self,
        aggregate: &AggregateExec,
    ) -> Result<Option<Arc<dyn ExecutionPlan>>> {
        if !matches!(aggregate.mode(), AggregateMode::Partial) {
            return Ok(None);
        }
        // The nodes between the aggregate and the union, top first.
        let mut between = Vec::new();
        let mut input = aggregate.input();
        let union = loop {
            if let Some(union) = input.downcast_ref::<UnionExec>() {
                break union;
            }
            match input.children()[..] {
                [child] if input.fetch().is_none() && self.per_branch(input.as_ref()) => {
                    between.push(Arc::clone(input));
                    input = child;
                }
                _ => return Ok(None),
            }
        };
        let mut branches = Vec::with_capacity(union.inputs().len());
        let mut any_counted = false;
        for branch in union.inputs() {
            // Each branch under its own copy of those nodes (its barrier).
            let mut branch = Arc::clone(branch);
            for node in between.iter().rev() {
                let recompute = ReplaceChildrenOptions::new(ChildrenPropertiesMode::Recompute);
                branch = Arc::clone(node).replace_children(vec![branch], recompute)?;
            }
            let partial: Arc<dyn ExecutionPlan> = Arc::new(AggregateExec::try_new(
                AggregateMode::Partial,
                aggregate.group_expr().clone(),
                aggregate.aggr_expr().to_vec(),
                aggregate.filter_expr().to_vec(),
                Arc::clone(&branch),
                branch.schema(),
            )?);
            match self.counted(&partial)? {
                Some(counted) => {
                    any_counted = true;
                    branches.push(counted);
                }
                None => branches.push(partial),
            }
        }
        if !any_counted {
            return Ok(None);
        }
        Ok(Some(UnionExec::try_new(branches)?))
    }

    /// Whether `plan`, above a union, can be applied to each branch
    /// instead: the union's rows pass it, or a filter or projection takes
    /// them alone.
    fn per_branch(&self, plan: &dyn ExecutionPlan) -> bool {
        plan.is::<FilterExec>() || plan.is::<ProjectionExec>() || self.passes_rows(plan)
    }

    /// Whether `plan` passes every row of its one input unchanged.
    fn passes_rows(&self, plan: &dyn ExecutionPlan) -> bool {
        passes_rows(plan, self.see_through)
    }

    /// `plan`'s output as [`Block`]s, when it is made of nodes this rule
    /// can run on one row; `None` otherwise.
    fn blocks(&self, plan: &Arc<dyn ExecutionPlan>) -> Result<Option<Vec<Block>>> {
        if plan.fetch().is_some() {
            return Ok(None);
        }
        if plan.is::<EmptyExec>() {
            return Ok(Some(Vec::new()));
        }
        if let Some(source) = plan.downcast_ref::<DataSourceExec>() {
            return match source.data_source().downcast_ref::<FileScanConfig>() {
                Some(scan) => scan_blocks(scan),
                None => Ok(None),
            };
        }
        if let Some(filter) = plan.downcast_ref::<FilterExec>() {
            if !infallible(filter.predicate()) {
                return Ok(None);
            }
            let Some(blocks) = self.blocks(filter.input())? else {
                return Ok(None);
            };
            let mut kept = Vec::with_capacity(blocks.len());
            for block in blocks {
                if !holds(filter.predicate(), &block.row)? {
                    continue;
                }
                let row = match filter.projection() {
                    Some(columns) => block.row.project(columns)?,
                    None => block.row,
                };
                kept.push(Block {
                    row,
                    rows: block.rows,
                });
            }
            return Ok(Some(kept));
        }
        if let Some(projection) = plan.downcast_ref::<ProjectionExec>() {
            let renames = projection
                .projection_expr()
                .iter()
                .all(|p| p.expr.is::<Column>() || p.expr.is::<Literal>());
            if !renames {
                return Ok(None);
            }
            let Some(blocks) = self.blocks(projection.input())? else {
                return Ok(None);
            };
            let projector = projection
                .projection_expr()
                .make_projector(&projection.input().schema())?;
            let mut projected = Vec::with_capacity(blocks.len());
            for block in blocks {
                let row = projector.project_batch(&block.row)?;
                projected.push(Block {
                    row,
                    rows: block.rows,
                });
            }
            return Ok(Some(projected));
        }
        if let Some(union) = plan.downcast_ref::<UnionExec>() {
            let schema = union.schema();
            let mut all = Vec::new();
            for branch in union.inputs() {
                let Some(blocks) = self.blocks(branch)? else {
                    return Ok(None);
                };
                for block in blocks {
                    let row = one_row(&schema, block.row.columns().to_vec())?;
                    all.push(Block {
                        row,
                        rows: block.rows,
                    });
                }
            }
            return Ok(Some(all));
        }
        match plan.children()[..] {
            [input] if self.passes_rows(plan.as_ref()) => self.blocks(input),
            _ => Ok(None),
        }
    }
}

impl PhysicalOptimizerRule for RowCountsFromLog {
    fn optimize(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        _config: &ConfigOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        plan.transform_up(|node| {
            Ok(match self.counted(&node)? {
                Some(counted) => Transformed::yes(counted),
                None => Transformed::no(node),
            })
        })
        .data()
    }

    fn name(&self) -> &str {
        "row_counts_from_log"
    }

    fn schema_check(&self) -> bool {
        true
    }
}

/// Whether `aggregate` reads raw rows and only counts them: `count` of
/// non-null literals, not distinct, unfiltered, grouped once, no limit.
fn counts_rows_only(aggregate: &AggregateExec) -> bool {
    let raw = matches!(
        aggregate.mode(),
        AggregateMode::Partial | AggregateMode::Single
    );
    let grouped_once = aggregate.group_expr().is_single();
    let unfiltered = aggregate.filter_expr().iter().all(Option::is_none);
    let counts = aggregate.aggr_expr().iter().all(|a| {
        a.fun().name() == "count"
            && !a.is_distinct()
            && a.expressions().iter().all(|e| {
                e.downcast_ref::<Literal>()
                    .is_some_and(|l| !l.value().is_null())
            })
    });
    raw && grouped_once && unfiltered && counts && aggregate.limit_options().is_none()
}

/// Each file `scan` reads, once (a file split into byte ranges is in it
/// several times), as a [`Block`] of the scan's output; `None` when the
/// scan reads a file column, limits its rows, has a predicate on a file
/// column, or a file has no exact row count. A file with no rows makes no
/// block (nothing is evaluated on it).
fn scan_blocks(scan: &FileScanConfig) -> Result<Option<Vec<Block>>> {
    if scan.limit.is_some() {
        return Ok(None);
    }
    let file_columns = scan.file_schema().fields().len();
    let partitions = scan.table_partition_cols();
    // The projected columns, as indexes of partition values.
    let projected: Option<Vec<usize>> = match scan.file_source.projection() {
        Some(projection) => projection
            .iter()
            .map(|p| {
                p.expr
                    .downcast_ref::<Column>()
                    .and_then(|c| c.index().checked_sub(file_columns))
            })
            .collect(),
        None => (file_columns == 0).then(|| (0..partitions.len()).collect()),
    };
    let Some(projected) = projected else {
        return Ok(None);
    };
    // The scan's predicate only prunes; on partition columns it is exact,
    // and is evaluated on a row of the partition values.
    let partition_schema: SchemaRef = Arc::new(Schema::new(partitions.clone()));
    let predicate = match scan.file_source.filter() {
        None => None,
        Some(predicate) => {
            let on_partitions = collect_columns(&predicate)
                .iter()
                .all(|c| c.index() >= file_columns);
            if !on_partitions || !infallible(&predicate) {
                return Ok(None);
            }
            match reassign_expr_columns(predicate, &partition_schema) {
                Ok(predicate) => Some(predicate),
                Err(_) => return Ok(None),
            }
        }
    };
    let output: SchemaRef = scan.projected_schema()?;
    // A file split into byte ranges is in the scan once per range (a log
    // names a path once, so no file is also listed whole).
    let mut ranged = HashSet::new();
    let mut blocks = Vec::new();
    for file in scan.file_groups.iter().flat_map(|group| group.iter()) {
        let Some(&RowCount(rows)) = file.extensions.get::<RowCount>() else {
            return Ok(None);
        };
        let again = file.range.is_some() && !ranged.insert(file.object_meta.location.as_ref());
        if again || rows == 0 {
            continue;
        }
        if file.partition_values.len() != partitions.len() {
            return Ok(None);
        }
        let values = |indexes: &mut dyn Iterator<Item = usize>| -> Result<Vec<ArrayRef>> {
            indexes
                .map(|i| match file.partition_values.get(i) {
                    Some(value) => value.to_array(),
                    None => internal_err!("a file lacks partition value {i}"),
                })
                .collect()
        };
        if let Some(predicate) = &predicate {
            let row = one_row(&partition_schema, values(&mut (0..partitions.len()))?)?;
            if !holds(predicate, &row)? {
                continue;
            }
        }
        let row = one_row(&output, values(&mut projected.iter().copied())?)?;
        blocks.push(Block { row, rows });
    }
    Ok(Some(blocks))
}

/// A batch of one row, which may have no columns.
fn one_row(schema: &SchemaRef, columns: Vec<ArrayRef>) -> Result<RecordBatch> {
    let options = RecordBatchOptions::new().with_row_count(Some(1));
    Ok(RecordBatch::try_new_with_options(
        Arc::clone(schema),
        columns,
        &options,
    )?)
}

/// Whether `predicate` is true on the one row of `row`.
fn holds(predicate: &Arc<dyn PhysicalExpr>, row: &RecordBatch) -> Result<bool> {
    let value = predicate.evaluate(row)?.into_array(1)?;
    let value = value.as_boolean_opt();
    Ok(value.is_some_and(|v| v.is_valid(0) && v.value(0)))
}

/// Whether `op` compares two values of one type, which cannot fail: `=`,
/// `<>`, `<`, `<=`, `>`, `>=`, `IS [NOT] DISTINCT FROM` (no pattern match,
/// whose pattern may not compile).
pub(crate) fn is_plain_comparison(op: &Operator) -> bool {
    matches!(
        op,
        Operator::Eq
            | Operator::NotEq
            | Operator::Lt
            | Operator::LtEq
            | Operator::Gt
            | Operator::GtEq
            | Operator::IsDistinctFrom
            | Operator::IsNotDistinctFrom
    )
}

/// Whether `expr` is made only of what cannot fail, change between rows
/// or runs, or wait for another plan: columns, literals, comparisons,
/// `AND`, `OR`, `NOT`, `IS [NOT] NULL` and `IN` a list of literals. It is
/// evaluated while the plan is made, on one row per file: no arithmetic
/// (which can fail on a row the plan would never reach), no function
/// (`random()`), no subquery (not run yet), no dynamic filter.
fn infallible(expr: &Arc<dyn PhysicalExpr>) -> bool {
    if expr.is::<Column>() || expr.is::<Literal>() {
        return true;
    }
    if let Some(binary) = expr.downcast_ref::<BinaryExpr>() {
        let op = binary.op();
        let logic = matches!(op, Operator::And | Operator::Or);
        return (logic || is_plain_comparison(op))
            && infallible(binary.left())
            && infallible(binary.right());
    }
    if let Some(not) = expr.downcast_ref::<NotExpr>() {
        return infallible(not.arg());
    }
    if let Some(is_null) = expr.downcast_ref::<IsNullExpr>() {
        return infallible(is_null.arg());
    }
    if let Some(is_not_null) = expr.downcast_ref::<IsNotNullExpr>() {
        return infallible(is_not_null.arg());
    }
    if let Some(in_list) = expr.downcast_ref::<InListExpr>() {
        return infallible(in_list.expr()) && in_list.list().iter().all(|e| e.is::<Literal>());
    }
    false
}
