//! One version of a Delta table as the plain Parquet files it names, for
//! plans that leave this process (distributed queries on Ballista).
//!
//! delta-rs's own provider plans a scan node of its own, which no other
//! process can decode. [`TableFiles`] holds what that version's log says
//! (each file's path, size and partition values) and plans DataFusion's
//! own Parquet scan over exactly those files, which a Ballista scheduler
//! splits into tasks and its executors run. It is only correct for tables
//! written without deletion vectors or column mapping, which is how
//! fleetgate writes them (delta-rs writes neither).

use std::sync::Arc;

use arrow::datatypes::{Field, FieldRef, Schema, SchemaRef};
use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::{DFSchema, ScalarValue};
use datafusion::datasource::TableType;
use datafusion::datasource::listing::PartitionedFile;
use datafusion::datasource::physical_plan::{FileGroup, FileScanConfigBuilder, ParquetSource};
use datafusion::datasource::source::DataSourceExec;
use datafusion::datasource::table_schema::TableSchema;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::object_store::ObjectStoreUrl;
use datafusion::logical_expr::utils::conjunction;
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::empty::EmptyExec;
use deltalake::DeltaTable;
use deltalake::kernel::LogicalFileView;
use object_store::ObjectMeta;
use object_store::path::Path as ObjectPath;
use serde::{Deserialize, Serialize};

use super::delta::{PARTITION_COLUMNS, StoreRoot};
use super::{Result as StoreResult, StoreError};

/// A table version's files, scanned as Parquet.
#[derive(Debug)]
pub struct TableFiles {
    schema: SchemaRef,
    listing: Listing,
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
}

impl TableFiles {
    /// The files of `table`, the table `name` under `root` at the version
    /// it was loaded at, with the columns `schema` (the Delta provider's,
    /// whose last columns are the [`PARTITION_COLUMNS`]).
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
        Self::with_files(root, name, schema, snapshot.log_data().iter())
    }

    /// [`TableFiles::new`] of only `files`, some of the table's.
    pub fn with_files(
        root: &StoreRoot,
        name: &str,
        schema: SchemaRef,
        files: impl Iterator<Item = LogicalFileView>,
    ) -> StoreResult<Self> {
        let partitioned = schema.fields().len() >= PARTITION_COLUMNS.len()
            && schema.fields()[schema.fields().len() - PARTITION_COLUMNS.len()..]
                .iter()
                .map(|f| f.name().as_str())
                .eq(PARTITION_COLUMNS);
        if !partitioned {
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
                })
            })
            .collect::<StoreResult<_>>()?;
        Ok(Self {
            schema,
            listing: Listing { store, files },
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
        let fields = schema.fields();
        let partitioned = fields.len() >= PARTITION_COLUMNS.len()
            && fields[fields.len() - PARTITION_COLUMNS.len()..]
                .iter()
                .map(|f| f.name().as_str())
                .eq(PARTITION_COLUMNS);
        let complete = listing
            .files
            .iter()
            .all(|f| f.partition.len() == PARTITION_COLUMNS.len());
        if !partitioned || !complete {
            return Err(DataFusionError::Plan(
                "a table's files arrived without their partition columns".into(),
            ));
        }
        Ok(Self { schema, listing })
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
        let mut files = Vec::with_capacity(self.listing.files.len());
        for file in &self.listing.files {
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
            files.push(PartitionedFile::new_from_meta(meta).with_partition_values(values));
        }
        let mut options = state.table_options().parquet.clone();
        // The types the files were written with (Utf8, Binary), as the
        // Delta provider reads them.
        options.global.schema_force_view_types = false;
        let table_schema = TableSchema::builder(file_schema)
            .with_table_partition_cols(partition_fields)
            .build();
        let mut source = ParquetSource::new(table_schema).with_table_parquet_options(options);
        if let Some(predicate) = conjunction(filters.iter().cloned()) {
            let df_schema = DFSchema::try_from(self.schema.as_ref().clone())?;
            source = source.with_predicate(state.create_physical_expr(predicate, &df_schema)?);
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
        let config = FileScanConfigBuilder::new(
            ObjectStoreUrl::parse(&self.listing.store)?,
            Arc::new(source),
        )
        .with_file_groups(groups)
        .with_projection_indices(projection.cloned())?
        .with_limit(limit)
        .build();
        Ok(DataSourceExec::from_data_source(config))
    }
}

fn not_plain(table: &str, reason: &str) -> StoreError {
    StoreError::NotPlainFiles(format!("table {table}: {reason}"))
}
