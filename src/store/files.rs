//! One version of a Delta table as the plain Parquet files it names, for
//! this node's queries and for plans that leave this process (distributed
//! queries on Ballista).
//!
//! [`TableFiles`] holds what that version's log says (each file's path,
//! size and partition values) and plans DataFusion's own Parquet scan over
//! exactly those files: a Ballista scheduler can split it into tasks, which
//! delta-rs's scan node it cannot decode, and on one node it reads the same
//! rows with less work per batch (no file-id column, partition values as
//! DataFusion's own). Before any file is opened, the log's statistics skip
//! those a query's filters rule out (not carried to other processes, whose
//! executors prune by footer). It is only correct for tables written
//! without deletion vectors or column mapping, which is how fleetgate
//! writes them (delta-rs writes neither), and whose columns end with the
//! partition columns, which a table created before the WAL columns were
//! added to it does not (they were appended after); it refuses any other.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use arrow::array::{ArrayRef, AsArray};
use arrow::datatypes::{DataType, Field, FieldRef, Int64Type, Schema, SchemaRef, TimeUnit};
use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::pruning::PruningStatistics;
use datafusion::common::{Column, DFSchema, ScalarValue};
use datafusion::datasource::TableType;
use datafusion::datasource::listing::PartitionedFile;
use datafusion::datasource::physical_plan::parquet::CachedParquetFileReaderFactory;
use datafusion::datasource::physical_plan::{FileGroup, FileScanConfigBuilder, ParquetSource};
use datafusion::datasource::source::DataSourceExec;
use datafusion::datasource::table_schema::TableSchema;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::object_store::ObjectStoreUrl;
use datafusion::logical_expr::utils::conjunction;
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_optimizer::pruning::PruningPredicateBuilder;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::empty::EmptyExec;
use deltalake::DeltaTable;
use deltalake::kernel::{EagerSnapshot, LogicalFileView};
use object_store::ObjectMeta;
use object_store::path::Path as ObjectPath;
use serde::{Deserialize, Serialize};

use super::delta::{self, PARTITION_COLUMNS, StoreRoot};
use super::{PartitionKey, Result as StoreResult, StoreError};

/// How many rows a scanned file holds, as the log counts them: every row
/// the file holds (no deletion vector hides one). Attached to each file of
/// a scan (`PartitionedFile::extensions`) whose log gives its count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowCount(pub u64);

/// A table version's files, scanned as Parquet.
#[derive(Debug)]
pub struct TableFiles {
    schema: SchemaRef,
    listing: Listing,
    /// The version's log, whose statistics skip files before any is
    /// opened; `None` for a listing another process sent, or some files.
    log: Option<EagerSnapshot>,
}

/// What a plan that scans a [`TableFiles`] carries to other processes.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Listing {
    /// The object store the paths are in: `file://` or `s3://bucket`.
    store: String,
    files: Vec<File>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct File {
    /// Path within `store`.
    path: String,
    size: u64,
    /// The partition values as the log writes them, in the order of
    /// [`PARTITION_COLUMNS`]; `None` for a null value.
    partition: Vec<Option<String>>,
    /// How many rows the file holds, from the log's statistics.
    #[serde(default)]
    rows: Option<u64>,
}

impl TableFiles {
    /// The files of `table`, the table `name` under `root` at the version
    /// it was loaded at, with the columns `schema` (the version's, as the
    /// log or the Delta provider gives them), whose last columns must be the
    /// [`PARTITION_COLUMNS`].
    pub fn new(
        root: &StoreRoot,
        name: &str,
        table: &DeltaTable,
        schema: SchemaRef,
    ) -> StoreResult<Self> {
        let snapshot = table.snapshot()?;
        // Column mapping names a file's columns apart from the table's.
        let mapped = snapshot.schema().fields().any(|f| {
            f.metadata()
                .keys()
                .any(|k| k.starts_with("delta.columnMapping"))
        });
        if mapped {
            return Err(not_plain(
                name,
                "its columns are mapped (delta.columnMapping)",
            ));
        }
        let mut files = Self::with_files(root, name, schema, snapshot.log_data().iter())?;
        files.log = Some(snapshot.snapshot().clone());
        Ok(files)
    }

    /// [`TableFiles::new`] of only `files`, some of the table's.
    pub fn with_files(
        root: &StoreRoot,
        name: &str,
        schema: SchemaRef,
        files: impl Iterator<Item = LogicalFileView>,
    ) -> StoreResult<Self> {
        if !ends_with_partition_columns(&schema) {
            return Err(not_plain(
                name,
                &format!("its columns do not end with {PARTITION_COLUMNS:?}"),
            ));
        }
        let url = root.table_url(name)?;
        let (store, base) = match url.scheme() {
            "file" => ("file://".to_owned(), url.path().to_owned()),
            _ => (
                format!("{}://{}", url.scheme(), url.host_str().unwrap_or_default()),
                url.path().to_owned(),
            ),
        };
        let base = ObjectPath::from_url_path(&base)
            .map_err(|e| StoreError::Uri(format!("table {name}: {e}")))?;
        let files = files
            .map(|file| {
                // A deletion vector hides rows the file still holds.
                if file.deletion_vector_descriptor().is_some() {
                    return Err(not_plain(name, "a file has a deletion vector"));
                }
                let size = u64::try_from(file.size())
                    .map_err(|_| not_plain(name, "the log gives a file a negative size"))?;
                let values = file.partition_values_map();
                Ok(File {
                    path: base
                        .parts()
                        .chain(file.object_store_path().parts())
                        .collect::<ObjectPath>()
                        .to_string(),
                    size,
                    partition: PARTITION_COLUMNS
                        .iter()
                        .map(|c| values.get(*c).cloned().flatten())
                        .collect(),
                    rows: file.num_records().and_then(|n| u64::try_from(n).ok()),
                })
            })
            .collect::<StoreResult<_>>()?;
        Ok(Self {
            schema,
            listing: Listing { store, files },
            log: None,
        })
    }

    /// What [`TableFiles::decode`] takes back.
    pub fn encode(&self) -> Result<Vec<u8>> {
        serde_json::to_vec(&self.listing).map_err(|e| DataFusionError::External(Box::new(e)))
    }

    /// The provider [`TableFiles::encode`] wrote, with the columns `schema`.
    pub fn decode(bytes: &[u8], schema: SchemaRef) -> Result<Self> {
        let listing: Listing =
            serde_json::from_slice(bytes).map_err(|e| DataFusionError::External(Box::new(e)))?;
        let partitioned = ends_with_partition_columns(&schema);
        let complete = listing
            .files
            .iter()
            .all(|f| f.partition.len() == PARTITION_COLUMNS.len());
        if !partitioned || !complete {
            return Err(DataFusionError::Plan(
                "a table's files arrived without their partition columns".into(),
            ));
        }
        Ok(Self {
            schema,
            listing,
            log: None,
        })
    }

    /// Which files the log's statistics say may hold rows `predicate`
    /// keeps, in listing order; `None` when there is no log or predicate.
    ///
    /// The log's timestamp statistics are truncated to milliseconds; every
    /// time fleetgate stores is a whole millisecond (the schemas take
    /// milliseconds), so a truncated maximum is the true one.
    fn kept_by_log(&self, predicate: Option<&Arc<dyn PhysicalExpr>>) -> Option<Vec<bool>> {
        let (Some(log), Some(predicate)) = (&self.log, predicate) else {
            return None;
        };
        // A predicate the statistics cannot answer, or fail to, keeps
        // every file.
        let pruning = PruningPredicateBuilder::new()
            .with_file_schema(Arc::clone(&self.schema))
            .build(Arc::clone(predicate))?;
        let kept = pruning.prune(log).ok()?;
        // The log and the listing name the same files in the same order.
        (kept.len() == self.listing.files.len()).then_some(kept)
    }

    /// The earliest time any row of each hour partition holds in any of
    /// `columns` (timestamps, none of which may be null), by the log's
    /// statistics: a partition maps to `None` where a file's statistics are
    /// missing. `None` without a log, for a column that may be null, or for
    /// a file whose partition values name no hour.
    ///
    /// The log's timestamp statistics are truncated to milliseconds, so a
    /// minimum is never later than the true one.
    pub fn earliest_rows(&self, columns: &[&str]) -> Option<BTreeMap<PartitionKey, Option<i64>>> {
        let log = self.log.as_ref()?;
        let files = &self.listing.files;
        if columns.is_empty() || log.num_containers() != files.len() {
            return None;
        }
        let mut earliest = vec![Some(i64::MAX); files.len()];
        for name in columns {
            // The table's schema says no row holds a null there (Delta
            // writers must refuse one), so the minimum is every row's bound.
            // (delta-rs cannot give the log's null counts of a timestamp.)
            if self.schema.field_with_name(name).ok()?.is_nullable() {
                return None;
            }
            let mins = log
                .min_values(&Column::new_unqualified(*name))
                .and_then(|mins| millis(&mins))?;
            for (earliest, min) in earliest.iter_mut().zip(mins) {
                *earliest = earliest.zip(min).map(|(a, b)| a.min(b));
            }
        }
        // Most files share their partition's values: each is parsed once.
        let mut keys: HashMap<&[Option<String>], PartitionKey> = HashMap::new();
        let mut by_partition: BTreeMap<PartitionKey, Option<i64>> = BTreeMap::new();
        for (file, earliest) in files.iter().zip(earliest) {
            let key = match keys.get(file.partition.as_slice()) {
                Some(key) => *key,
                None => {
                    let [Some(date), Some(hour)] = file.partition.as_slice() else {
                        return None;
                    };
                    let key = delta::partition_of_values(date, hour)?;
                    keys.insert(&file.partition, key);
                    key
                }
            };
            by_partition
                .entry(key)
                .and_modify(|e| *e = e.zip(earliest).map(|(a, b)| a.min(b)))
                .or_insert(earliest);
        }
        Some(by_partition)
    }

    /// The columns the files hold, and the partition columns after them.
    fn split_schema(&self) -> (SchemaRef, Vec<FieldRef>) {
        let fields = self.schema.fields();
        let at = fields.len() - PARTITION_COLUMNS.len();
        let file: Vec<Field> = fields[..at].iter().map(|f| f.as_ref().clone()).collect();
        (Arc::new(Schema::new(file)), fields[at..].to_vec())
    }
}

#[async_trait]
impl TableProvider for TableFiles {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    /// Every filter prunes files and row groups where it can, and is
    /// applied again above the scan.
    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> Result<Vec<TableProviderFilterPushDown>> {
        Ok(vec![TableProviderFilterPushDown::Inexact; filters.len()])
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let (file_schema, partition_fields) = self.split_schema();
        let predicate = conjunction(filters.iter().cloned())
            .map(|p| {
                let df_schema = DFSchema::try_from(self.schema.as_ref().clone())?;
                state.create_physical_expr(p, &df_schema)
            })
            .transpose()?;
        let kept = self.kept_by_log(predicate.as_ref());
        let mut files = Vec::with_capacity(self.listing.files.len());
        for (i, file) in self.listing.files.iter().enumerate() {
            if kept.as_ref().is_some_and(|kept| !kept[i]) {
                continue;
            }
            let mut values = Vec::with_capacity(partition_fields.len());
            for (field, value) in partition_fields.iter().zip(&file.partition) {
                values.push(match value {
                    Some(text) => ScalarValue::try_from_string(text.clone(), field.data_type())?,
                    None => ScalarValue::try_from(field.data_type())?,
                });
            }
            let meta = ObjectMeta {
                location: ObjectPath::parse(&file.path)
                    .map_err(|e| DataFusionError::External(Box::new(e)))?,
                last_modified: chrono::DateTime::UNIX_EPOCH,
                size: file.size,
                e_tag: None,
                version: None,
            };
            let mut scanned = PartitionedFile::new_from_meta(meta).with_partition_values(values);
            if let Some(rows) = file.rows {
                scanned.extensions.insert(RowCount(rows));
            }
            files.push(scanned);
        }
        let mut options = state.table_options().parquet.clone();
        // The types the files were written with (Utf8, Binary), as the
        // Delta provider reads them.
        options.global.schema_force_view_types = false;
        let table_schema = TableSchema::builder(file_schema)
            .with_table_partition_cols(partition_fields)
            .build();
        let store_url = ObjectStoreUrl::parse(&self.listing.store)?;
        // Footers through the session's cache (the node's, for a query).
        let footers = CachedParquetFileReaderFactory::new(
            state.runtime_env().object_store(&store_url)?,
            state.runtime_env().cache_manager.get_file_metadata_cache(),
        );
        let mut source = ParquetSource::new(table_schema)
            .with_table_parquet_options(options)
            .with_parquet_file_reader_factory(Arc::new(footers));
        if let Some(predicate) = predicate {
            source = source.with_predicate(predicate);
        }
        if files.is_empty() {
            let schema = match projection {
                Some(columns) => Arc::new(self.schema.project(columns)?),
                None => self.schema(),
            };
            return Ok(Arc::new(EmptyExec::new(schema)));
        }
        // A scheduler makes a task of each group.
        let count = state
            .config_options()
            .execution
            .target_partitions
            .clamp(1, files.len());
        let mut groups = vec![Vec::new(); count];
        for (i, file) in files.into_iter().enumerate() {
            groups[i % count].push(file);
        }
        let groups = groups.into_iter().map(FileGroup::new).collect();
        let config = FileScanConfigBuilder::new(store_url, Arc::new(source))
            .with_file_groups(groups)
            .with_projection_indices(projection.cloned())?
            .with_limit(limit)
            .build();
        Ok(DataSourceExec::from_data_source(config))
    }
}

/// Whether `schema`'s last columns are the [`PARTITION_COLUMNS`].
fn ends_with_partition_columns(schema: &Schema) -> bool {
    let fields = schema.fields();
    fields.len() >= PARTITION_COLUMNS.len()
        && fields[fields.len() - PARTITION_COLUMNS.len()..]
            .iter()
            .map(|f| f.name().as_str())
            .eq(PARTITION_COLUMNS)
}

/// Each of `timestamps`' values in milliseconds, rounded down; `None` for
/// an array that holds no timestamps.
fn millis(timestamps: &ArrayRef) -> Option<Vec<Option<i64>>> {
    let DataType::Timestamp(unit, _) = timestamps.data_type() else {
        return None;
    };
    let raw = arrow::compute::cast(timestamps, &DataType::Int64).ok()?;
    let to_ms = |v: i64| match unit {
        TimeUnit::Second => v.checked_mul(1000),
        TimeUnit::Millisecond => Some(v),
        TimeUnit::Microsecond => Some(v.div_euclid(1000)),
        TimeUnit::Nanosecond => Some(v.div_euclid(1_000_000)),
    };
    Some(
        raw.as_primitive::<Int64Type>()
            .iter()
            .map(|v| v.and_then(to_ms))
            .collect(),
    )
}

fn not_plain(table: &str, reason: &str) -> StoreError {
    StoreError::NotPlainFiles(format!("table {table}: {reason}"))
}

#[cfg(test)]
mod tests {
    use arrow::array::{Int64Array, RecordBatch, TimestampMillisecondArray};
    use arrow::datatypes::DataType;
    use datafusion::logical_expr::{col, lit};
    use datafusion::physical_plan::displayable;
    use datafusion::prelude::SessionContext;

    use super::*;
    use crate::store::{PartitionKey, append, block_on, delta};

    /// Each hour partition's earliest row time is the least of its files'
    /// minimums over every column asked for; a column that may be null
    /// proves nothing.
    #[test]
    fn the_log_gives_each_partition_its_earliest_row_time() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = StoreRoot::local(dir.path()).expect("root");
        let time = || DataType::Timestamp(arrow::datatypes::TimeUnit::Millisecond, None);
        let schema = |received_at_may_be_null: bool| -> SchemaRef {
            Arc::new(Schema::new(vec![
                Field::new("ts", time(), false),
                Field::new("received_at", time(), received_at_may_be_null),
            ]))
        };
        let hour = 1_780_000_000_000 / 3_600_000 * 3_600_000;
        // (ts, received_at) of each file's two rows, the first two files in
        // one hour, the third in the next.
        let files = [
            [(hour + 500, hour + 900), (hour + 700, hour + 800)],
            [(hour + 600, hour + 300), (hour + 650, hour + 400)],
            [
                (hour + 3_600_400, hour + 3_600_200),
                (hour + 3_600_500, hour + 3_600_900),
            ],
        ];
        for (table, nullable) in [("charging", false), ("rtti", true)] {
            let schema = schema(nullable);
            for rows in files {
                let batch = RecordBatch::try_new(
                    Arc::clone(&schema),
                    vec![
                        Arc::new(TimestampMillisecondArray::from(
                            rows.iter().map(|r| r.0).collect::<Vec<_>>(),
                        )),
                        Arc::new(TimestampMillisecondArray::from(
                            rows.iter().map(|r| r.1).collect::<Vec<_>>(),
                        )),
                    ],
                )
                .expect("batch");
                let key = PartitionKey::from_millis(rows[0].0);
                append(&root, table, &schema, &[(key, batch)], 1).expect("append");
            }
        }
        let earliest_in = |table: &str, columns: &[&str]| {
            block_on(async {
                let table_name = table;
                let table = delta::open(&root, table_name).await?.expect("a table");
                let schema = table.snapshot()?.snapshot().arrow_schema();
                let files = TableFiles::new(&root, table_name, &table, schema)?;
                Ok::<_, StoreError>(files.earliest_rows(columns))
            })
            .expect("listing")
        };
        let earliest = |columns: &[&str]| earliest_in("charging", columns);
        let first = PartitionKey::from_millis(hour);
        let second = PartitionKey::from_millis(hour + 3_600_000);
        assert_eq!(
            earliest(&["ts", "received_at"]),
            Some(BTreeMap::from([
                (first, Some(hour + 300)),
                (second, Some(hour + 3_600_200))
            ]))
        );
        assert_eq!(
            earliest(&["ts"]),
            Some(BTreeMap::from([
                (first, Some(hour + 500)),
                (second, Some(hour + 3_600_400))
            ]))
        );
        assert_eq!(earliest(&[]), None);
        // The same files, where received_at may be null.
        assert_eq!(earliest_in("rtti", &["ts", "received_at"]), None);
        assert!(earliest_in("rtti", &["ts"]).is_some());
    }

    /// A file whose log statistics rule out a query's filter is not in its
    /// scan at all: two files of one hour, times 1–2 and 10–11 (a column
    /// the log keeps statistics of), and a filter on times above 5 scans
    /// only the second.
    #[test]
    fn the_log_statistics_skip_files_before_any_is_opened() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = StoreRoot::local(dir.path()).expect("root");
        let schema: SchemaRef =
            Arc::new(Schema::new(vec![Field::new("ts", DataType::Int64, false)]));
        let hour = PartitionKey::from_millis(1_780_000_000_000);
        for times in [[1, 2], [10, 11]] {
            let batch = RecordBatch::try_new(
                Arc::clone(&schema),
                vec![Arc::new(Int64Array::from(times.to_vec()))],
            )
            .expect("batch");
            append(&root, "charging", &schema, &[(hour, batch)], 1).expect("append");
        }
        let scanned = |filters: Vec<Expr>| {
            block_on(async {
                let table = delta::open(&root, "charging").await?.expect("a table");
                let columns = table.snapshot()?.snapshot().arrow_schema();
                let files = TableFiles::new(&root, "charging", &table, columns)?;
                let ctx = SessionContext::new();
                let plan = files.scan(&ctx.state(), None, &filters, None).await?;
                let shown = displayable(plan.as_ref()).indent(true).to_string();
                Ok::<_, StoreError>(shown.matches(".parquet").count())
            })
            .expect("scan")
        };
        assert_eq!(scanned(Vec::new()), 2);
        assert_eq!(scanned(vec![col("ts").gt(lit(5i64))]), 1);
        assert_eq!(scanned(vec![col("ts").gt(lit(50i64))]), 0);
    }
}
