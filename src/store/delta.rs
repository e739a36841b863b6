//! Where each table lives and how it is opened: one Delta Lake table per
//! stream plus the dead letters, under the store's root directory, each
//! partitioned by `date` (DATE) and `hour` (INT) of its rows' time.
//!
//! The Delta transaction log is the only truth about which Parquet files
//! belong to a table: a file is part of it once a commit names it, and a
//! reader (fleetgate, DuckDB, Polars, Spark) sees one consistent version.
//! Every writer commit also records, per WAL shard, the last entry it
//! holds (Delta's application transactions: app id = shard, version = WAL
//! sequence number), which is how recovery knows exactly what is stored.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{ArrayRef, Date32Array, Int32Array, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use deltalake::kernel::engine::arrow_conversion::TryIntoKernel;
use deltalake::kernel::{Add, StructField, StructType};
use deltalake::{DeltaTable, DeltaTableBuilder, DeltaTableError};
use object_store::aws::AmazonS3Builder;
use object_store::client::SpawnedReqwestConnector;
use object_store::{ClientOptions, ObjectStore, RetryConfig};
use url::Url;

use super::{Result, StoreError, io_error};
use crate::config::StorageConfig;
use crate::core::fsio;
use crate::core::table::PartitionKey;

/// The partition columns of every table, in SQL and in the Delta log.
pub const PARTITION_COLUMNS: [&str; 2] = ["date", "hour"];

/// Columns that carry per-file statistics in the Delta log: times and the
/// WAL entry only, so that no identifier, pseudonym or measured value is
/// copied into the log, which outlives the files it describes (see
/// `delta.logRetentionDuration`). Live streams skip files by `wal_entry`.
const STATS_COLUMNS: &str = "ts,received_at,wal_entry";

/// Table properties set when a table is created.
fn table_properties() -> HashMap<String, Option<String>> {
    [
        ("delta.dataSkippingStatsColumns", STATS_COLUMNS),
        // A checkpoint every 100 commits keeps opening a table cheap.
        ("delta.checkpointInterval", "100"),
        // The log of commits (paths, partition values, time statistics) is
        // kept for a day after a checkpoint supersedes it (the retention
        // sweep removes it sooner; without sweeps, the writers look for
        // expired log files with each checkpoint they write).
        ("delta.logRetentionDuration", "interval 1 day"),
        // A writer's commits only add files (blind appends): a DELETE or
        // OPTIMIZE running meanwhile need not fail on them.
        ("delta.isolationLevel", "WriteSerializable"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), Some(v.to_owned())))
    .collect()
}

/// The root under which every table lives: `<root>/<table>/`, on local
/// disk or in an S3 bucket.
#[derive(Clone)]
pub struct StoreRoot {
    location: Location,
}

#[derive(Clone)]
enum Location {
    Local(PathBuf),
    /// `s3://bucket/prefix/`, and the bucket's store.
    ObjectStore {
        url: Url,
        store: Arc<dyn ObjectStore>,
    },
}

impl std::fmt::Debug for StoreRoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.location {
            Location::Local(dir) => write!(f, "{}", dir.display()),
            Location::ObjectStore { url, .. } => write!(f, "{url}"),
        }
    }
}

impl StoreRoot {
    /// A store on local disk under `dir` (made absolute).
    pub fn local(dir: &Path) -> Result<Self> {
        let dir = std::path::absolute(dir).map_err(io_error(dir))?;
        Ok(Self {
            location: Location::Local(dir),
        })
    }

    /// The store `[storage]` names: `uri`, or `data_dir` on local disk.
    pub fn from_config(storage: &StorageConfig) -> Result<Self> {
        let Some(uri) = &storage.uri else {
            return Self::local(&storage.data_dir);
        };
        let mut url =
            Url::parse(uri).map_err(|e| StoreError::Uri(format!("does not parse: {e}")))?;
        if !url.username().is_empty() || url.password().is_some() {
            // Not echoed: the URI holds a secret.
            return Err(StoreError::Uri(
                "holds credentials: they belong in [storage.s3] or the environment".into(),
            ));
        }
        if url.scheme() == "file" {
            // A directory every node mounts (one disk, or a shared file system).
            return Self::local(Path::new(url.path()));
        }
        if url.scheme() != "s3" {
            return Err(StoreError::Uri(format!(
                "{uri}: only s3:// and file:// are supported (or no uri: under data_dir)"
            )));
        }
        let bucket = url
            .host_str()
            .filter(|b| !b.is_empty())
            .ok_or_else(|| StoreError::Uri(format!("{uri}: no bucket")))?
            .to_owned();
        if !url.path().ends_with('/') {
            url.set_path(&format!("{}/", url.path()));
        }
        let s3 = &storage.s3;
        let env = |name: &str| std::env::var(name).ok();
        let (Some(key), Some(secret)) = (
            s3.access_key_id
                .clone()
                .or_else(|| env("AWS_ACCESS_KEY_ID")),
            s3.secret_access_key
                .clone()
                .or_else(|| env("AWS_SECRET_ACCESS_KEY")),
        ) else {
            return Err(StoreError::Uri(format!(
                "{uri}: no credentials (storage.s3.access_key_id and secret_access_key, \
                 or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
            )));
        };
        let timeout = std::time::Duration::from_millis(s3.request_timeout_ms);
        let mut builder = AmazonS3Builder::new()
            .with_http_connector(SpawnedReqwestConnector::new(store_io()?))
            .with_bucket_name(bucket)
            .with_region(&s3.region)
            .with_access_key_id(key)
            .with_secret_access_key(secret)
            .with_retry(RetryConfig {
                max_retries: s3.max_retries,
                retry_timeout: timeout * (s3.max_retries as u32 + 1),
                ..RetryConfig::default()
            })
            .with_client_options(
                ClientOptions::new()
                    .with_allow_http(s3.allow_http)
                    .with_timeout(timeout)
                    .with_connect_timeout(timeout.min(std::time::Duration::from_secs(5))),
            );
        if let Some(endpoint) = &s3.endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        let store = builder
            .build()
            .map_err(|e| StoreError::Uri(format!("{uri}: {e}")))?;
        register_s3_log_stores();
        Ok(Self {
            location: Location::ObjectStore {
                url,
                store: Arc::new(store),
            },
        })
    }

    /// A root at `url` (`s3://bucket/prefix/`) in `store`: tests that
    /// watch what the tables ask of a bucket.
    #[cfg(test)]
    pub(crate) fn in_store(url: Url, store: Arc<dyn ObjectStore>) -> Self {
        register_s3_log_stores();
        Self {
            location: Location::ObjectStore { url, store },
        }
    }

    /// The root directory, on local disk; `None` on an object store.
    pub fn local_dir(&self) -> Option<&Path> {
        match &self.location {
            Location::Local(dir) => Some(dir),
            Location::ObjectStore { .. } => None,
        }
    }

    /// The bucket's store and the key prefix of the root (`""` or
    /// `"some/prefix/"`); `None` on local disk.
    pub fn object_store(&self) -> Option<(Arc<dyn ObjectStore>, String)> {
        match &self.location {
            Location::Local(_) => None,
            Location::ObjectStore { url, store } => {
                Some((store.clone(), url.path().trim_start_matches('/').to_owned()))
            }
        }
    }

    /// The bucket's URL (`s3://bucket`) and store, for a DataFusion
    /// runtime that reads the tables' files; `None` on local disk, which
    /// every runtime reads already.
    pub fn object_store_url(&self) -> Result<Option<(Url, Arc<dyn ObjectStore>)>> {
        match &self.location {
            Location::Local(_) => Ok(None),
            Location::ObjectStore { url, store } => {
                let bucket = format!("{}://{}", url.scheme(), url.host_str().unwrap_or_default());
                let bucket =
                    Url::parse(&bucket).map_err(|e| StoreError::Uri(format!("{bucket}: {e}")))?;
                Ok(Some((bucket, Arc::clone(store))))
            }
        }
    }

    /// The directory of a table on local disk; `None` on an object store.
    pub fn table_dir(&self, table: &str) -> Option<PathBuf> {
        match &self.location {
            Location::Local(dir) => Some(dir.join(table)),
            Location::ObjectStore { .. } => None,
        }
    }

    /// The URL of a table, as delta-rs names it.
    pub fn table_url(&self, table: &str) -> Result<Url> {
        match &self.location {
            Location::Local(dir) => {
                let dir = dir.join(table);
                Url::from_directory_path(&dir).map_err(|()| StoreError::Location(dir))
            }
            Location::ObjectStore { url, .. } => url
                .join(&format!("{table}/"))
                .map_err(|e| StoreError::Uri(format!("{url}{table}: {e}"))),
        }
    }

    /// A builder of the table, with this root's object store.
    fn builder(&self, table: &str) -> Result<DeltaTableBuilder> {
        let url = self.table_url(table)?;
        let builder = DeltaTableBuilder::from_url(url.clone())?;
        Ok(match &self.location {
            Location::Local(_) => builder,
            Location::ObjectStore { store, .. } => builder.with_storage_backend(store.clone(), url),
        })
    }

    /// Whether the table has a commit or checkpoint yet (a table being
    /// created has its log directory first): one listing.
    async fn has_table(&self, table: &str) -> Result<bool> {
        match &self.location {
            Location::Local(dir) => Ok(has_commit(&dir.join(table).join("_delta_log"))),
            Location::ObjectStore { url, store } => {
                let prefix = object_store::path::Path::from(format!(
                    "{}{table}/_delta_log/",
                    url.path().trim_start_matches('/')
                ));
                let listed = store
                    .list_with_delimiter(Some(&prefix))
                    .await
                    .map_err(|e| StoreError::Delta(Box::new(e.into())))?;
                Ok(listed.objects.iter().any(|o| {
                    o.location
                        .extension()
                        .is_some_and(|e| e == "json" || e == "parquet")
                }))
            }
        }
    }
}

/// The runtime every object store request's network I/O runs on, whichever
/// runtime sends it. A pooled connection is driven by a task of the runtime
/// that opened it, and one store is used from many: each table's commit
/// thread has a runtime of its own, the WAL copies (which acknowledgements
/// wait for) theirs, the queries theirs. Without this, a request sent over
/// a connection a commit thread's runtime opened waited until that commit
/// thread ran again, and failed once its runtime was gone (reqwest#2501).
/// Made by the first store opened (at start-up, on the main thread, whose
/// priority its threads keep; a failed start is tried again by the next),
/// and never dropped.
fn store_io() -> Result<tokio::runtime::Handle> {
    static IO: std::sync::Mutex<Option<tokio::runtime::Runtime>> = std::sync::Mutex::new(None);
    let mut io = IO.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(runtime) = io.as_ref() {
        return Ok(runtime.handle().clone());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("store-io")
        .enable_all()
        .build()
        .map_err(io_error(Path::new("object store I/O runtime")))?;
    let handle = runtime.handle().clone();
    *io = Some(runtime);
    Ok(handle)
}

/// delta-rs opens an `s3://` table through a log store made for the
/// scheme; ours is its default one over the store we hand it (commits by
/// conditional PUT), which needs no AWS SDK.
fn register_s3_log_stores() {
    static REGISTERED: std::sync::Once = std::sync::Once::new();
    REGISTERED.call_once(|| {
        if let Ok(scheme) = Url::parse("s3://") {
            deltalake::logstore::logstore_factories().insert(scheme, Arc::new(S3LogStores));
        }
    });
}

struct S3LogStores;

impl deltalake::logstore::LogStoreFactory for S3LogStores {
    fn with_options(
        &self,
        prefixed: deltalake::logstore::ObjectStoreRef,
        root: deltalake::logstore::ObjectStoreRef,
        location: &Url,
        options: &deltalake::logstore::StorageConfig,
    ) -> deltalake::DeltaResult<Arc<dyn deltalake::logstore::LogStore>> {
        Ok(deltalake::logstore::default_logstore(
            prefixed, root, location, options,
        ))
    }
}

/// The columns after a file's own that say where each row came from: the
/// application id of the WAL shard whose entry held it ([`wal_app_id`]) and
/// that entry's sequence number. Live subscribers follow a table by them
/// (see `access::live`); NULL for rows that came through no WAL (fixtures,
/// converted tables).
pub const WAL_COLUMNS: [&str; 2] = ["wal_app", "wal_entry"];

/// The Delta schema of a table: its file schema, the [`WAL_COLUMNS`], then
/// `date` and `hour`.
pub fn table_schema(file_schema: &SchemaRef) -> SchemaRef {
    let mut fields: Vec<_> = file_schema.fields().iter().cloned().collect();
    fields.extend(
        [
            Field::new(WAL_COLUMNS[0], DataType::Utf8, true),
            Field::new(WAL_COLUMNS[1], DataType::Int64, true),
            Field::new(PARTITION_COLUMNS[0], DataType::Date32, true),
            Field::new(PARTITION_COLUMNS[1], DataType::Int32, true),
        ]
        .map(Arc::new),
    );
    Arc::new(Schema::new(fields))
}

/// `batch` as the table stores it: with the WAL entry that held it (its
/// shard's application id and its sequence number, if any) and its
/// partition's `date` and `hour` columns appended, as the Delta writer
/// splits and names files by them.
pub fn stored_rows(
    batch: &RecordBatch,
    partition: PartitionKey,
    wal: Option<(&str, u64)>,
) -> Result<RecordBatch> {
    let (days, hour) = partition.to_parts();
    let rows = batch.num_rows();
    let mut columns: Vec<ArrayRef> = batch.columns().to_vec();
    let (app, entry) = match wal {
        Some((app, seq)) => (Some(app), Some(i64::try_from(seq).unwrap_or(i64::MAX))),
        None => (None, None),
    };
    columns.push(Arc::new(StringArray::from(vec![app; rows])));
    columns.push(Arc::new(Int64Array::from(vec![entry; rows])));
    columns.push(Arc::new(Date32Array::from(vec![days; rows])));
    columns.push(Arc::new(Int32Array::from(vec![i32::from(hour); rows])));
    Ok(RecordBatch::try_new(
        table_schema(&batch.schema()),
        columns,
    )?)
}

/// A partition's values as the Delta log writes them: `YYYY-MM-DD` and the hour.
pub fn partition_values(key: PartitionKey) -> (String, u8) {
    let (days, hour) = key.to_parts();
    let date = chrono::NaiveDate::from_ymd_opt(1970, 1, 1)
        .and_then(|epoch| epoch.checked_add_signed(chrono::Duration::days(days.into())))
        .unwrap_or_default();
    (date.format("%Y-%m-%d").to_string(), hour)
}

/// The partition whose values the Delta log writes as `date` and `hour`
/// ([`partition_values`]); `None` for values no partition has.
pub fn partition_of_values(date: &str, hour: &str) -> Option<PartitionKey> {
    let date = chrono::NaiveDate::parse_from_str(date, "%Y-%m-%d").ok()?;
    let days = (date - chrono::NaiveDate::from_ymd_opt(1970, 1, 1)?).num_days();
    PartitionKey::from_parts(i32::try_from(days).ok()?, hour.parse().ok()?)
}

/// What every WAL shard's application id starts with.
const WAL_APP_PREFIX: &str = "fleetgate-wal-";

/// What the application ids of `node`'s WAL shards start with: one node on
/// its own has the empty name; each node of a cluster its own
/// (`cluster.node_id`), so that two nodes' shard 0 are never taken for one.
pub fn wal_app_prefix(node: &str) -> String {
    if node.is_empty() {
        WAL_APP_PREFIX.to_owned()
    } else {
        format!("{WAL_APP_PREFIX}{node}-")
    }
}

/// The WAL shards of one node: its name and how many it runs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeShards {
    pub node: String,
    pub count: u16,
}

impl NodeShards {
    /// The application id of shard `shard`.
    pub fn app(&self, shard: u16) -> String {
        wal_app_id(&self.node, shard)
    }

    /// The shard whose application id is `app`, if it is one of this node's.
    pub fn shard_of(&self, app: &str) -> Option<u16> {
        app.strip_prefix(&wal_app_prefix(&self.node))?.parse().ok()
    }
}

/// The application id under which commits record how far they hold a WAL
/// shard of `node`.
pub fn wal_app_id(node: &str, shard: u16) -> String {
    format!("{}{shard}", wal_app_prefix(node))
}

/// The table `name` under `root`, at its latest version; `None` if none
/// was created there.
pub async fn open(root: &StoreRoot, name: &str) -> Result<Option<DeltaTable>> {
    if !root.has_table(name).await? {
        return Ok(None);
    }
    let mut attempts = 0;
    loop {
        let mut table = root.builder(name)?.build()?;
        match table.load().await {
            Ok(()) => return Ok(Some(table)),
            Err(DeltaTableError::NotATable(_)) => return Ok(None),
            // The sweep's log cleanup removed a commit or checkpoint between
            // this reader's listing of the log and its reading of it: a new
            // listing finds the checkpoint that replaced it.
            Err(e) if attempts < LOG_RACE_RETRIES && is_missing_log_file(&e) => attempts += 1,
            Err(e) => return Err(e.into()),
        }
    }
}

/// How often [`open`] lists the log again after a log file it listed went.
const LOG_RACE_RETRIES: u32 = 3;

/// Whether `e` says a file of the transaction log was not there.
fn is_missing_log_file(e: &DeltaTableError) -> bool {
    let text = e.to_string();
    text.contains("_delta_log") && (text.contains("not found") || text.contains("File not found"))
}

/// Whether a local log directory holds a commit or checkpoint yet (a
/// table being created has the directory first).
fn has_commit(log_dir: &Path) -> bool {
    std::fs::read_dir(log_dir).is_ok_and(|entries| {
        entries.flatten().any(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            !name.starts_with('.') && (name.ends_with(".json") || name.ends_with(".parquet"))
        })
    })
}

/// The table `name` under `root`, created empty with `file_schema` if it
/// does not exist.
pub async fn open_or_create(
    root: &StoreRoot,
    name: &str,
    file_schema: &SchemaRef,
) -> Result<DeltaTable> {
    if let Some(table) = open(root, name).await? {
        return with_wal_columns(table).await;
    }
    if let Some(dir) = root.table_dir(name) {
        fsio::create_dir_all(&dir).map_err(io_error(&dir))?;
    }
    let schema: StructType = table_schema(file_schema).as_ref().try_into_kernel()?;
    let columns: Vec<StructField> = schema.fields().cloned().collect();
    // Built, not loaded: loading an empty location logs an error.
    let table = root
        .builder(name)?
        .build()?
        .create()
        .with_table_name(name)
        .with_columns(columns)
        .with_partition_columns(PARTITION_COLUMNS)
        .with_configuration(table_properties())
        .await;
    match table {
        Ok(table) => Ok(table),
        // Another process (a node of the cluster) created it first, between
        // the open above and this create: open what it created. delta-rs
        // says so with VersionAlreadyExists, or with a generic "already
        // exists" when it saw the other's commit before writing its own.
        Err(e) => match open(root, name).await? {
            Some(table) => with_wal_columns(table).await,
            None => Err(e.into()),
        },
    }
}

/// `table` with the [`WAL_COLUMNS`], added (with their statistics) if it
/// was created before rows carried them: the Delta writer would drop
/// them from every batch otherwise. Older rows hold NULL there.
async fn with_wal_columns(table: DeltaTable) -> Result<DeltaTable> {
    let schema = table.snapshot()?.schema();
    if WAL_COLUMNS
        .iter()
        .all(|column| schema.field(column).is_some())
    {
        return Ok(table);
    }
    let wal = Arc::new(Schema::new(vec![
        Field::new(WAL_COLUMNS[0], DataType::Utf8, true),
        Field::new(WAL_COLUMNS[1], DataType::Int64, true),
    ]));
    let wal: StructType = wal.as_ref().try_into_kernel()?;
    let table = table
        .add_columns()
        .with_fields(wal.fields().cloned().collect::<Vec<StructField>>())
        .await?;
    let stats = HashMap::from([(
        "delta.dataSkippingStatsColumns".to_owned(),
        STATS_COLUMNS.to_owned(),
    )]);
    Ok(table.set_tbl_properties().with_properties(stats).await?)
}

/// The tables under `root` that hold Parquet files but no Delta log: a
/// data directory of an older version, which must be converted first
/// (VACUUM would take such files for a failed write's and delete them).
pub fn unconverted(root: &StoreRoot) -> Vec<String> {
    crate::core::table::Table::all()
        .map(|t| t.name())
        .filter(|name| {
            root.table_dir(name)
                .is_some_and(|dir| !has_commit(&dir.join("_delta_log")) && holds_parquet(&dir))
        })
        .map(str::to_owned)
        .collect()
}

fn holds_parquet(dir: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    entries.flatten().any(|e| {
        let path = e.path();
        match path.is_dir() {
            true => holds_parquet(&path),
            false => path.extension().is_some_and(|x| x == "parquet"),
        }
    })
}

/// Converts every table of [`unconverted`] in place: one Delta commit
/// naming its Parquet files, with `date` and `hour` read from their
/// directories and this store's table properties. Returns each table
/// converted with its number of files.
pub fn convert_all(root: &StoreRoot) -> Result<Vec<(String, usize)>> {
    super::block_on(async {
        let mut converted = Vec::new();
        for name in unconverted(root) {
            let url = root.table_url(&name)?;
            let partitions = [
                StructField::new(
                    PARTITION_COLUMNS[0],
                    deltalake::kernel::DataType::DATE,
                    true,
                ),
                StructField::new(
                    PARTITION_COLUMNS[1],
                    deltalake::kernel::DataType::INTEGER,
                    true,
                ),
            ];
            let table = deltalake::operations::convert_to_delta::ConvertToDeltaBuilder::new()
                .with_location(url.to_string())
                .with_partition_schema(partitions)
                .with_table_name(name.clone())
                .with_configuration(table_properties())
                .await?;
            let files = table.snapshot()?.log_data().num_files();
            if let Ok(dir) = url.to_file_path() {
                sync_log(&dir, table.version().unwrap_or(0))?;
            }
            converted.push((name, files));
        }
        Ok(converted)
    })
}

/// Drops the commits before the table's current version from its log: a
/// checkpoint at that version, then every log file before it that is
/// [`HISTORY_KEPT_MS`] old by `now_ms`. A DELETE commit records its
/// predicate (a deletion request's pseudonyms, a legal hold's selection),
/// which must not outlive the rows it deleted; from the next commit on,
/// this removes it.
pub async fn forget_history(table: &DeltaTable, now_ms: i64) -> Result<()> {
    let version = table.snapshot()?.version();
    deltalake::checkpoints::create_checkpoint(table, None).await?;
    deltalake::checkpoints::cleanup_expired_logs_for(
        version,
        table.log_store().as_ref(),
        now_ms - HISTORY_KEPT_MS,
        None,
    )
    .await?;
    Ok(())
}

/// Log files younger than this stay: a writer reads the newest version
/// just before it commits the next one, and a version it could aim at must
/// never be deleted under it (a commit to a deleted version would succeed
/// and be read by no one).
pub const HISTORY_KEPT_MS: i64 = 60_000;

/// Makes durable what changed under a local table directory since
/// `since_ms`: every file changed since, and every directory. DELETE,
/// OPTIMIZE, VACUUM and checkpoints write through a store without fsync.
pub fn sync_tree(dir: &Path, since_ms: i64) -> Result<()> {
    let since = std::time::UNIX_EPOCH + std::time::Duration::from_millis(since_ms.max(0) as u64);
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    for entry in entries {
        let path = entry.map_err(io_error(dir))?.path();
        let meta = std::fs::metadata(&path).map_err(io_error(&path))?;
        if meta.is_dir() {
            sync_tree(&path, since_ms)?;
        } else if meta.modified().is_ok_and(|m| m >= since) {
            fsio::sync_file(&path).map_err(io_error(&path))?;
        }
    }
    fsio::sync_dir(dir).map_err(io_error(dir))
}

/// The last WAL entry of the shard whose application id is `app` that a
/// commit to `table` holds, if any.
pub async fn stored_through(table: &DeltaTable, app: &str) -> Result<Option<u64>> {
    let version = table
        .snapshot()?
        .transaction_version(table.log_store().as_ref(), app)
        .await?;
    Ok(version.and_then(|v| u64::try_from(v).ok()))
}

/// Makes the data files a local commit is about to add durable, with
/// their directories, before the commit names them. A local object store
/// writes without fsync; without this a power cut could lose rows whose WAL
/// entries are already released.
pub fn sync_files(table_dir: &Path, adds: &[Add]) -> Result<()> {
    let mut dirs = std::collections::BTreeSet::new();
    for add in adds {
        let relative = percent_encoding::percent_decode_str(&add.path).decode_utf8_lossy();
        let path = table_dir.join(relative.as_ref());
        fsio::sync_file(&path).map_err(io_error(&path))?;
        let mut dir = fsio::parent_dir(&path);
        while dir.starts_with(table_dir) && dirs.insert(dir.to_owned()) && dir != table_dir {
            dir = fsio::parent_dir(dir);
        }
    }
    for dir in dirs {
        fsio::sync_dir(&dir).map_err(io_error(&dir))?;
    }
    Ok(())
}

/// Makes a local commit durable: its file in the log, and the log directory.
pub fn sync_log(table_dir: &Path, version: u64) -> Result<()> {
    let log_dir = table_dir.join("_delta_log");
    let commit = log_dir.join(format!("{version:020}.json"));
    fsio::sync_file(&commit).map_err(io_error(&commit))?;
    fsio::sync_dir(&log_dir).map_err(io_error(&log_dir))?;
    fsio::sync_dir(table_dir).map_err(io_error(table_dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Nodes starting together each find no table and create it: every
    /// one of them ends up with the one table, none with an error.
    #[test]
    fn writers_creating_one_table_at_once_all_get_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = StoreRoot::local(dir.path()).expect("root");
        let schema = Arc::new(Schema::new(vec![Field::new("seq", DataType::Int64, false)]));
        let barrier = std::sync::Barrier::new(6);
        std::thread::scope(|scope| {
            let creating: Vec<_> = (0..6)
                .map(|_| {
                    scope.spawn(|| {
                        barrier.wait();
                        super::super::block_on(open_or_create(&root, "charging", &schema))
                            .map(|table| table.version())
                    })
                })
                .collect();
            for thread in creating {
                let version = thread.join().expect("thread").expect("the table");
                assert!(version.is_some());
            }
        });
    }
}
