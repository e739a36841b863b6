//! A policy view as an optimisation barrier, so that a principal's
//! expressions only ever see rows of its view.
//!
//! A view that DataFusion inlines (`ViewTable`) becomes part of the
//! principal's plan, and the optimizers then move the principal's predicates
//! below the view's own filter and below a licensee's aggregate: a predicate
//! such as `1 / (CASE WHEN <condition> THEN 0 ELSE 1 END) = 1` then runs on
//! rows the view leaves out, and whether the query fails tells whether such a
//! row exists. Withholding the error text does not help; its status tells.
//!
//! [`PolicyView`] is never inlined: it returns no logical plan, so the
//! principal's plan holds an opaque scan of it, planned on its own in
//! [`PolicyView::scan`] and wrapped in [`BarrierExec`], which keeps every
//! `ExecutionPlan` default that refuses to let something pass: no parent or
//! dynamic filter, projection, sort or limit is pushed through it, and it
//! reports no statistics and no ordering of its input. So every expression
//! the principal writes is evaluated above the barrier, on the view's output.
//!
//! One exception keeps partition and row-group pruning: a predicate that
//! cannot fail on any row ([`infallible`]: `AND`, `OR`, `NOT` of comparisons
//! between a column and a literal of the column's own type, `IS [NOT] NULL`,
//! `IN` a list of such literals, a boolean column) over columns the view
//! passes through from its table unchanged is also applied inside the view.
//! Evaluated on any row, hidden or not, it can raise no error, and it
//! computes nothing from the view's own expressions; its result only decides
//! which rows the view's filter then sees, and it is applied above the
//! barrier again.

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;

use arrow::datatypes::{DataType, SchemaRef};
use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::Column;
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::error::Result;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::utils::conjunction;
use datafusion::logical_expr::{
    Expr, LogicalPlan, LogicalPlanBuilder, Operator, TableProviderFilterPushDown, TableType,
};
use datafusion::physical_expr::EquivalenceProperties;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, ExecutionPlanProperties, Partitioning,
    PhysicalExpr, PlanProperties, ReplaceChildrenOptions,
};

use crate::query::is_plain_comparison;

/// One table's view for one principal, planned apart from the principal's query.
#[derive(Debug)]
pub(crate) struct PolicyView {
    plan: LogicalPlan,
    schema: SchemaRef,
    /// Output columns that are a column of the view's table, passed through
    /// unchanged: the only ones an infallible predicate may be applied on
    /// inside the view.
    passed_through: HashSet<String>,
}

impl PolicyView {
    /// The view `plan` over a table whose columns are `table_columns`.
    pub(crate) fn new(plan: LogicalPlan, table_columns: &[String]) -> Self {
        let schema = Arc::new(plan.schema().as_arrow().clone());
        let passed_through = match &plan {
            LogicalPlan::Projection(projection) => projection
                .expr
                .iter()
                .filter_map(|e| match e {
                    Expr::Column(c) if table_columns.contains(&c.name) => Some(c.name.clone()),
                    _ => None,
                })
                .collect(),
            _ => HashSet::new(),
        };
        Self {
            plan,
            schema,
            passed_through,
        }
    }

    /// The view's plan and the columns it passes through, for a plan codec.
    pub(crate) fn parts(&self) -> (&LogicalPlan, &HashSet<String>) {
        (&self.plan, &self.passed_through)
    }

    /// The view [`PolicyView::parts`] described, decoded in another process.
    pub(crate) fn from_parts(plan: LogicalPlan, passed_through: HashSet<String>) -> Self {
        Self {
            schema: Arc::new(plan.schema().as_arrow().clone()),
            plan,
            passed_through,
        }
    }

    /// The type of `column` if the view passes it through unchanged.
    fn passed_through_type(&self, column: &Column) -> Option<&DataType> {
        if !self.passed_through.contains(&column.name) {
            return None;
        }
        self.schema
            .field_with_name(&column.name)
            .ok()
            .map(|f| f.data_type())
    }

    /// `column` as the view plan names it.
    fn own_column(&self, column: &Column) -> Result<Column> {
        let (qualifier, field) = self
            .plan
            .schema()
            .qualified_field_with_unqualified_name(&column.name)?;
        Ok(Column::from((qualifier, field)))
    }
}

#[async_trait]
impl TableProvider for PolicyView {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn table_type(&self) -> TableType {
        TableType::View
    }

    // get_logical_plan is left at its default (None): the view is never
    // inlined into the principal's plan.

    /// Inexact (applied inside and again above) for an infallible predicate
    /// on passed-through columns; every other predicate stays above.
    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> Result<Vec<TableProviderFilterPushDown>> {
        Ok(filters
            .iter()
            .map(|f| {
                if infallible(f, self) {
                    TableProviderFilterPushDown::Inexact
                } else {
                    TableProviderFilterPushDown::Unsupported
                }
            })
            .collect())
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let mut plan = LogicalPlanBuilder::from(self.plan.clone());
        let mut inside = Vec::new();
        // Checked again: only what supports_filters_pushdown accepts may pass.
        for filter in filters.iter().filter(|f| infallible(f, self)) {
            let renamed = filter
                .clone()
                .transform(|e| match e {
                    Expr::Column(c) => Ok(Transformed::yes(Expr::Column(self.own_column(&c)?))),
                    other => Ok(Transformed::no(other)),
                })?
                .data;
            inside.push(renamed);
        }
        if let Some(predicate) = conjunction(inside) {
            plan = plan.filter(predicate)?;
        }
        if let Some(projection) = projection {
            let schema = self.plan.schema();
            plan = plan.project(
                projection
                    .iter()
                    .map(|&i| Expr::Column(Column::from(schema.qualified_field(i)))),
            )?;
        }
        if let Some(limit) = limit {
            plan = plan.limit(0, Some(limit))?;
        }
        let input = state.create_physical_plan(&plan.build()?).await?;
        Ok(Arc::new(BarrierExec::new(input)))
    }
}

/// Whether `expr` is a predicate that raises no error on any row: `AND`,
/// `OR` and `NOT` of comparisons between a passed-through column and a
/// literal of exactly the column's (flat) type, `IS [NOT] NULL`, `IN` a list
/// of such literals, or a boolean column. No cast, function or arithmetic.
fn infallible(expr: &Expr, view: &PolicyView) -> bool {
    let column_and_literal = |column: &Expr, literal: &Expr| match (column, literal) {
        (Expr::Column(c), Expr::Literal(value, _)) => view
            .passed_through_type(c)
            .is_some_and(|t| flat(t) && *t == value.data_type()),
        _ => false,
    };
    match expr {
        Expr::BinaryExpr(binary) => match binary.op {
            Operator::And | Operator::Or => {
                infallible(&binary.left, view) && infallible(&binary.right, view)
            }
            op if is_plain_comparison(&op) => {
                column_and_literal(&binary.left, &binary.right)
                    || column_and_literal(&binary.right, &binary.left)
            }
            _ => false,
        },
        Expr::Not(inner) => infallible(inner, view),
        Expr::IsNull(inner) | Expr::IsNotNull(inner) => {
            matches!(&**inner, Expr::Column(c) if view.passed_through_type(c).is_some())
        }
        Expr::InList(list) => {
            !list.list.is_empty()
                && list
                    .list
                    .iter()
                    .all(|item| column_and_literal(&list.expr, item))
        }
        Expr::Column(c) => view.passed_through_type(c) == Some(&DataType::Boolean),
        _ => false,
    }
}

/// A type whose comparison kernels cannot fail.
fn flat(data_type: &DataType) -> bool {
    matches!(
        data_type,
        DataType::Boolean
            | DataType::Int8
            | DataType::Int16
            | DataType::Int32
            | DataType::Int64
            | DataType::UInt8
            | DataType::UInt16
            | DataType::UInt32
            | DataType::UInt64
            | DataType::Float32
            | DataType::Float64
            | DataType::Utf8
            | DataType::LargeUtf8
            | DataType::Utf8View
            | DataType::Date32
            | DataType::Date64
            | DataType::Timestamp(_, _)
    )
}

/// Passes its input's rows through and lets nothing above it reach below:
/// every optimizer hook (filter, projection, sort and limit pushdown,
/// statistics) is left at its refusing default, and its properties claim no
/// ordering, equivalence or partitioning of its input.
#[derive(Debug)]
pub(crate) struct BarrierExec {
    input: Arc<dyn ExecutionPlan>,
    properties: Arc<PlanProperties>,
}

impl BarrierExec {
    pub(crate) fn new(input: Arc<dyn ExecutionPlan>) -> Self {
        let properties = PlanProperties::new(
            EquivalenceProperties::new(input.schema()),
            Partitioning::UnknownPartitioning(input.output_partitioning().partition_count()),
            input.pipeline_behavior(),
            input.boundedness(),
        );
        Self {
            input,
            properties: Arc::new(properties),
        }
    }
}

impl DisplayAs for BarrierExec {
    fn fmt_as(&self, _: DisplayFormatType, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PolicyBarrierExec")
    }
}

impl ExecutionPlan for BarrierExec {
    fn name(&self) -> &str {
        "PolicyBarrierExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn replace_children(
        self: Arc<Self>,
        mut children: Vec<Arc<dyn ExecutionPlan>>,
        _options: ReplaceChildrenOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        match children.pop() {
            Some(input) if children.is_empty() => Ok(Arc::new(Self::new(input))),
            _ => datafusion::common::internal_err!("PolicyBarrierExec has exactly one child"),
        }
    }

    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        self.replace_children(
            children,
            ReplaceChildrenOptions::new(
                datafusion::physical_plan::ChildrenPropertiesMode::Recompute,
            ),
        )
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        self.input.execute(partition, context)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::logical_expr::{col, lit};
    use datafusion::prelude::SessionContext;

    async fn view() -> PolicyView {
        let ctx = SessionContext::new();
        let plan = ctx
            .sql("SELECT CAST(1 AS INT) AS seq, 'x' AS name, true AS flag")
            .await
            .expect("plan")
            .into_unoptimized_plan();
        let plan = LogicalPlanBuilder::from(plan)
            .project([
                col("seq"),
                col("name"),
                col("flag"),
                (col("seq") + lit(1)).alias("next"),
            ])
            .expect("project")
            .build()
            .expect("build");
        PolicyView::new(
            plan,
            &["seq".into(), "name".into(), "flag".into(), "next".into()],
        )
    }

    #[tokio::test]
    async fn only_infallible_predicates_on_passed_through_columns_go_inside() {
        let view = view().await;
        let inside = |e: Expr| infallible(&e, &view);
        assert!(inside(col("seq").eq(lit(5i32))));
        assert!(inside(
            col("seq").gt(lit(1i32)).and(col("name").not_eq(lit("y")))
        ));
        assert!(inside(col("seq").in_list(vec![lit(1i32), lit(2i32)], true)));
        assert!(inside(col("name").is_null().or(col("flag"))));
        assert!(inside(Expr::Not(Box::new(col("flag")))));
        // A literal of another type would need a cast; arithmetic can fail.
        assert!(!inside(col("seq").eq(lit(5i64))));
        assert!(!inside((col("seq") / lit(0i32)).eq(lit(1i32))));
        assert!(!inside(lit(1i32).eq(col("seq") / lit(0i32))));
        // A pattern may not compile.
        let pattern = |op| datafusion::logical_expr::binary_expr(col("name"), op, lit("("));
        assert!(!inside(pattern(Operator::RegexMatch)));
        assert!(!inside(pattern(Operator::LikeMatch)));
        // `next` is computed by the view, not passed through.
        assert!(!inside(col("next").eq(lit(2i32))));
        assert!(!inside(
            col("seq").eq(lit(1i32)).and(col("next").eq(lit(2i32)))
        ));
    }
}
