//! Aggregates grouped by hour partition, computed a run of rows at a time
//! instead of a row at a time.
//!
//! Every row a file holds has the file's `date` and `hour`, and a scan's
//! batches each come from one file, so an aggregate grouped by partition
//! columns (`GROUP BY date, hour`) sees long runs of rows with the same
//! key (a filter above the scan may join batches of several files: then
//! several runs a batch). DataFusion's hash aggregate still hashes and compares every row's
//! key (half the time of such a query over 1.8 M rows). A physical
//! optimizer rule replaces that aggregate, when its keys are partition
//! columns of a file scan below it and its functions keep a state of fixed
//! size per group (`count`; `sum`, `avg`, `min`, `max` of numbers and
//! times; none `DISTINCT`, filtered or ordered), with [`RunAggregateExec`]:
//! it splits each batch into runs of equal keys, looks each
//! run's key up once, and hands the hash aggregate's own group accumulators
//! the batch with each row's group, so states and answers are theirs; its
//! groups count against the query's memory pool as the hash aggregate's
//! do. It
//! is correct for any order of rows, only fast for runs; it evaluates the
//! same expressions on the same rows at the same place in the plan, so it
//! sits where the aggregate sat,
//! above any policy barrier.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use arrow::array::{ArrayRef, RecordBatch};
use arrow::datatypes::SchemaRef;
use datafusion::common::config::ConfigOptions;
use datafusion::common::tree_node::{Transformed, TransformedResult, TreeNode, TreeNodeRecursion};
use datafusion::common::{Result, ScalarValue, internal_err};
use datafusion::datasource::physical_plan::FileScanConfig;
use datafusion::datasource::source::DataSourceExec;
use datafusion::execution::memory_pool::MemoryConsumer;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::{EmitTo, GroupsAccumulator};
use datafusion::physical_expr::aggregate::AggregateFunctionExpr;
use datafusion::physical_expr::expressions::Column;
use datafusion::physical_optimizer::PhysicalOptimizerRule;
use datafusion::physical_plan::aggregates::{AggregateExec, AggregateMode};
use datafusion::physical_plan::filter::FilterExec;
use datafusion::physical_plan::metrics::{BaselineMetrics, ExecutionPlanMetricsSet, MetricsSet};
use datafusion::physical_plan::projection::ProjectionExec;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::union::UnionExec;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, InputDistributionRequirements, InputOrderMode,
    PhysicalExpr, PlanProperties, ReplaceChildrenOptions,
};
use futures::StreamExt;

use super::{SeeThrough, passes_rows};

/// Aggregate functions whose state has a fixed size per group.
const FIXED_STATE: [&str; 5] = ["count", "sum", "avg", "min", "max"];

/// The rule; see the module's documentation.
#[derive(Debug)]
pub(crate) struct PartitionGroups {
    see_through: SeeThrough,
}

impl PartitionGroups {
    pub(crate) fn new(see_through: SeeThrough) -> Self {
        Self { see_through }
    }

    /// `node` as a [`RunAggregateExec`], when it is an aggregate of raw
    /// rows grouped by partition columns with fixed-size states.
    fn by_runs(&self, node: &Arc<dyn ExecutionPlan>) -> Option<Arc<dyn ExecutionPlan>> {
        let aggregate = node.downcast_ref::<AggregateExec>()?;
        let partial = match aggregate.mode() {
            AggregateMode::Partial => true,
            AggregateMode::Single => false,
            _ => return None,
        };
        let group_by = aggregate.group_expr();
        // Each function's state per group a few numbers: count, or the
        // others of a number (a string's min would hold the string).
        let fixed = aggregate.aggr_expr().iter().all(|a| {
            FIXED_STATE.contains(&a.fun().name())
                && (a.fun().name() == "count" || a.field().data_type().is_primitive())
                && !a.is_distinct()
                && a.order_bys().is_empty()
                && a.groups_accumulator_supported()
        });
        if !group_by.is_single()
            || group_by.is_empty()
            || !fixed
            || aggregate.filter_expr().iter().any(Option::is_some)
            || aggregate.limit_options().is_some()
            || aggregate.input_order_mode() != &InputOrderMode::Linear
        {
            return None;
        }
        let mut keys = Vec::with_capacity(group_by.expr().len());
        for (expr, _) in group_by.expr() {
            let column = expr.downcast_ref::<Column>()?;
            if !self.is_partition_column(aggregate.input(), column.index()) {
                return None;
            }
            keys.push(column.clone());
        }
        Some(Arc::new(RunAggregateExec {
            partial,
            keys,
            aggregates: aggregate.aggr_expr().to_vec(),
            aggregate: Arc::clone(node),
            metrics: ExecutionPlanMetricsSet::new(),
        }))
    }

    /// Whether column `index` of `plan`'s output is a partition column of
    /// the file scan it comes from.
    fn is_partition_column(&self, plan: &Arc<dyn ExecutionPlan>, index: usize) -> bool {
        if let Some(source) = plan.downcast_ref::<DataSourceExec>() {
            let Some(scan) = source.data_source().downcast_ref::<FileScanConfig>() else {
                return false;
            };
            let file_columns = scan.file_schema().fields().len();
            let table_index = match scan.file_source.projection() {
                Some(projection) => projection
                    .iter()
                    .nth(index)
                    .and_then(|p| p.expr.downcast_ref::<Column>().map(Column::index)),
                None => Some(index),
            };
            return table_index.is_some_and(|i| i >= file_columns);
        }
        if let Some(filter) = plan.downcast_ref::<FilterExec>() {
            let index = match filter.projection() {
                Some(columns) => columns.get(index).copied(),
                None => Some(index),
            };
            return index.is_some_and(|i| self.is_partition_column(filter.input(), i));
        }
        if let Some(projection) = plan.downcast_ref::<ProjectionExec>() {
            let column = projection
                .projection_expr()
                .iter()
                .nth(index)
                .and_then(|p| p.expr.downcast_ref::<Column>().map(Column::index));
            return column.is_some_and(|i| self.is_partition_column(projection.input(), i));
        }
        if let Some(union) = plan.downcast_ref::<UnionExec>() {
            return union
                .inputs()
                .iter()
                .all(|branch| self.is_partition_column(branch, index));
        }
        let passes_rows = passes_rows(plan.as_ref(), self.see_through);
        match plan.children()[..] {
            [input] if passes_rows => self.is_partition_column(input, index),
            _ => false,
        }
    }
}

impl PhysicalOptimizerRule for PartitionGroups {
    fn optimize(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        _config: &ConfigOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        plan.transform_up(|node| {
            Ok(match self.by_runs(&node) {
                Some(runs) => Transformed::yes(runs),
                None => Transformed::no(node),
            })
        })
        .data()
    }

    fn name(&self) -> &str {
        "partition_groups"
    }

    fn schema_check(&self) -> bool {
        true
    }
}

/// An aggregate of raw rows that looks up the group of each run of rows
/// with equal keys once. `partial`: it emits the accumulators' states for
/// a final aggregate above, as a `Partial` aggregate does, one output
/// partition per input partition; otherwise their values, as a `Single`
/// one does. Everything but how it runs is the aggregate it replaces
/// (`aggregate`): its input, schema, properties and required distribution.
#[derive(Debug)]
pub(crate) struct RunAggregateExec {
    partial: bool,
    keys: Vec<Column>,
    aggregates: Vec<Arc<AggregateFunctionExpr>>,
    aggregate: Arc<dyn ExecutionPlan>,
    metrics: ExecutionPlanMetricsSet,
}

impl DisplayAs for RunAggregateExec {
    fn fmt_as(&self, _: DisplayFormatType, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let keys: Vec<String> = self.keys.iter().map(ToString::to_string).collect();
        let aggregates: Vec<&str> = self.aggregates.iter().map(|a| a.name()).collect();
        write!(
            f,
            "RunAggregateExec: mode={}, gby=[{}], aggr=[{}]",
            if self.partial { "Partial" } else { "Single" },
            keys.join(", "),
            aggregates.join(", ")
        )
    }
}

impl ExecutionPlan for RunAggregateExec {
    fn name(&self) -> &str {
        "RunAggregateExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        self.aggregate.properties()
    }

    fn input_distribution_requirements(&self) -> InputDistributionRequirements {
        self.aggregate.input_distribution_requirements()
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        self.aggregate.children()
    }

    fn apply_expressions(
        &self,
        f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        for key in &self.keys {
            let key: Arc<dyn PhysicalExpr> = Arc::new(key.clone());
            if f(&key)? == TreeNodeRecursion::Stop {
                return Ok(TreeNodeRecursion::Stop);
            }
        }
        for aggregate in &self.aggregates {
            for argument in aggregate.expressions() {
                if f(&argument)? == TreeNodeRecursion::Stop {
                    return Ok(TreeNodeRecursion::Stop);
                }
            }
        }
        Ok(TreeNodeRecursion::Continue)
    }

    fn replace_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
        options: ReplaceChildrenOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let aggregate = Arc::clone(&self.aggregate).replace_children(children, options)?;
        Ok(Arc::new(Self {
            partial: self.partial,
            keys: self.keys.clone(),
            aggregates: self.aggregates.clone(),
            aggregate,
            metrics: ExecutionPlanMetricsSet::new(),
        }))
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

    fn metrics(&self) -> Option<MetricsSet> {
        Some(self.metrics.clone_inner())
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        let [input] = self.aggregate.children()[..] else {
            return internal_err!("RunAggregateExec has exactly one input");
        };
        // The groups' memory counts against the query's pool, as the hash
        // aggregate's does: over it, the query fails with the pool's error.
        let reservation = MemoryConsumer::new(format!("RunAggregateExec[{partition}]"))
            .register(context.memory_pool());
        let mut input = input.execute(partition, context)?;
        let mut groups = Groups::new(self)?;
        let metrics = BaselineMetrics::new(&self.metrics, partition);
        let output = futures::stream::once(async move {
            while let Some(batch) = input.next().await {
                let batch = batch?;
                let _timer = metrics.elapsed_compute().timer();
                groups.add(&batch)?;
                reservation.try_resize(groups.size())?;
            }
            let _timer = metrics.elapsed_compute().timer();
            let out = groups.emit()?;
            metrics.record_output(out.num_rows());
            Ok(out)
        });
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            self.aggregate.schema(),
            output,
        )))
    }
}

/// One partition's groups: each key's index, and per aggregate the
/// accumulator DataFusion's hash aggregate uses, which holds every group.
struct Groups {
    keys: Vec<Column>,
    aggregates: Vec<Arc<AggregateFunctionExpr>>,
    accumulators: Vec<Box<dyn GroupsAccumulator>>,
    partial: bool,
    schema: SchemaRef,
    /// Each group's key, in the order of its index.
    groups: Vec<Vec<ScalarValue>>,
    index_of: HashMap<Vec<ScalarValue>, usize>,
    /// Each row's group index, for the batch being added.
    row_groups: Vec<usize>,
}

impl Groups {
    fn new(exec: &RunAggregateExec) -> Result<Self> {
        Ok(Self {
            keys: exec.keys.clone(),
            aggregates: exec.aggregates.clone(),
            accumulators: exec
                .aggregates
                .iter()
                .map(|a| a.create_groups_accumulator())
                .collect::<Result<_>>()?,
            partial: exec.partial,
            schema: exec.aggregate.schema(),
            groups: Vec::new(),
            index_of: HashMap::new(),
            row_groups: Vec::new(),
        })
    }

    /// Feeds `batch`'s rows to their groups: a key is looked up once per
    /// run of rows that share it, not once per row.
    fn add(&mut self, batch: &RecordBatch) -> Result<()> {
        let rows = batch.num_rows();
        if rows == 0 {
            return Ok(());
        }
        let keys: Vec<ArrayRef> = self
            .keys
            .iter()
            .map(|k| k.evaluate(batch)?.into_array(rows))
            .collect::<Result<_>>()?;
        self.row_groups.clear();
        for run in arrow::compute::partition(&keys)?.ranges() {
            let key: Vec<ScalarValue> = keys
                .iter()
                .map(|k| ScalarValue::try_from_array(k, run.start))
                .collect::<Result<_>>()?;
            let index = match self.index_of.get(&key) {
                Some(&index) => index,
                None => {
                    let index = self.groups.len();
                    self.index_of.insert(key.clone(), index);
                    self.groups.push(key);
                    index
                }
            };
            self.row_groups
                .extend(std::iter::repeat_n(index, run.len()));
        }
        for (aggregate, accumulator) in self.aggregates.iter().zip(&mut self.accumulators) {
            let arguments: Vec<ArrayRef> = aggregate
                .expressions()
                .iter()
                .map(|e| e.evaluate(batch)?.into_array(rows))
                .collect::<Result<_>>()?;
            accumulator.update_batch(&arguments, &self.row_groups, None, self.groups.len())?;
        }
        Ok(())
    }

    /// Bytes the groups hold: their keys and every accumulator.
    fn size(&self) -> usize {
        let key = self.keys.len() * std::mem::size_of::<ScalarValue>();
        let keys = self.groups.len() * (2 * key + std::mem::size_of::<usize>());
        keys + self.accumulators.iter().map(|a| a.size()).sum::<usize>()
    }

    /// One row per group: its key, then each aggregate's state (partial)
    /// or value.
    fn emit(&mut self) -> Result<RecordBatch> {
        let fields = self.schema.fields();
        let mut columns: Vec<ArrayRef> = Vec::with_capacity(fields.len());
        for (k, field) in fields.iter().take(self.keys.len()).enumerate() {
            columns.push(if self.groups.is_empty() {
                arrow::array::new_empty_array(field.data_type())
            } else {
                ScalarValue::iter_to_array(self.groups.iter().map(|key| key[k].clone()))?
            });
        }
        for accumulator in &mut self.accumulators {
            if self.partial {
                columns.extend(accumulator.state(EmitTo::All)?);
            } else {
                columns.push(accumulator.evaluate(EmitTo::All)?);
            }
        }
        self.groups.clear();
        self.index_of.clear();
        Ok(RecordBatch::try_new(Arc::clone(&self.schema), columns)?)
    }
}
