//! Compaction: once an hour partition is closed (its hour is over and the
//! writers' roll age has passed), its small files, one per writer roll, are
//! rewritten into few large ones, in a commit that removes the small files
//! from the table as it adds the large ones. A reader sees either version,
//! never both or neither; the removed files stay on disk for queries
//! already reading them until VACUUM (see the retention sweep).
//!
//! The vehicle streams that carry a per-vehicle sequence number
//! (`vehicle_id` and `seq` columns: teleservice, diagnostics, charging) are
//! rewritten sorted by vehicle, time and sequence number, and keep one row
//! of each vehicle's `(ts, seq)`, the first received: a record a vehicle
//! sent twice (it re-sends what got no PUBACK, to the node it reconnects
//! to, which may be another) is stored once from then on. RTTI (no vehicle,
//! no sequence number stored) is rewritten sorted by band of latitude, then
//! time: the way traffic queries select it (road cells, areas), with its
//! time columns still in runs that compress; every probe is kept.
//! The dead letters are rewritten in order of arrival. Each file a
//! rewrite adds is tagged, so a partition is rewritten again only when new
//! files reach it. A rewrite writes the table's own column types: every
//! reader then takes the file's strings as they are, with no cast.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use arrow::datatypes::DataType;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::prelude::{SessionConfig, SessionContext};
use deltalake::DeltaTable;
use deltalake::kernel::transaction::{CommitBuilder, CommitProperties};
use deltalake::kernel::{Action, LogicalFileView};
use deltalake::protocol::DeltaOperation;
use deltalake::writer::{DeltaWriter, RecordBatchWriter};
use futures::StreamExt;

use super::delta::{self, StoreRoot};
use super::{PartitionKey, Result, StoreError, Table, TableFiles, writer_properties};

/// How compaction writes.
#[derive(Debug, Clone, Copy)]
pub struct Compaction {
    pub target_bytes: u64,
    pub zstd_level: i32,
}

impl Compaction {
    /// As `[storage]` says.
    pub fn from_config(storage: &crate::config::StorageConfig) -> Self {
        Self {
            target_bytes: storage.compact_target_bytes,
            zstd_level: storage.zstd_level,
        }
    }
}

/// An hour partition is closed this long after its hour ends: the writers
/// commit what they hold within their roll age, far less than this.
const CLOSED_AFTER_MS: i64 = 5 * 60 * 1000;

/// The tag on a file a sorting rewrite added (Delta `add.tags`).
const REWRITTEN_TAG: &str = "fleetgate.sorted";

/// How a table's closed partitions are rewritten, by the columns it has.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Rewrite {
    /// Sorted by [`RECORD_KEY`], one row per record.
    Records,
    /// Sorted by band of latitude ([`BANDS_PER_DEGREE`]), then time,
    /// every row kept.
    Positions,
    /// In order of arrival ([`ARRIVAL_COLUMNS`]), every row kept.
    Arrival,
}

/// The columns a record is known by, when a table has them all: the order
/// a rewrite sorts by.
const RECORD_KEY: [&str; 3] = ["vehicle_id", "ts", "seq"];

/// A table of positions without a record key (RTTI) is sorted by bands of
/// latitude this many to a degree (0.01°, about 1.1 km), then by time and
/// time of receipt: a page's statistics then span a band or two, so a query
/// for an area skips the pages of other bands, while the times and WAL
/// entries stay in runs within a band and compress nearly as well as
/// unsorted (sorted by latitude, longitude and time instead, the table grew
/// by a quarter).
const BANDS_PER_DEGREE: u32 = 100;

/// The columns [`Rewrite::Positions`] sorts by.
const POSITION_COLUMNS: [&str; 4] = ["latitude", "ts", "wal_app", "wal_entry"];

/// The columns [`Rewrite::Arrival`] sorts by, those of them a table has
/// (`record_index`, a record's place in its publish: dead letters only).
const ARRIVAL_COLUMNS: [&str; 4] = ["received_at", "wal_app", "wal_entry", "record_index"];

impl Rewrite {
    /// The rewrite a table with the columns of `schema` gets.
    fn of(schema: &arrow::datatypes::Schema) -> Self {
        let has_all = |columns: &[&str]| columns.iter().all(|c| schema.field_with_name(c).is_ok());
        if has_all(&RECORD_KEY) {
            Self::Records
        } else if has_all(&POSITION_COLUMNS) {
            Self::Positions
        } else {
            Self::Arrival
        }
    }
}

/// Columns that differ between two copies of one record: when and through
/// which WAL entry each copy was received.
const COPY_COLUMNS: [&str; 3] = ["received_at", "wal_app", "wal_entry"];

/// Memory a sorting rewrite may hold before it spills to temporary files.
const REWRITE_MEMORY_BYTES: usize = 256 << 20;

/// Compacts the closed hour partitions of every table at `now_ms`; returns
/// how many small files were replaced.
pub fn compact(root: &StoreRoot, now_ms: i64, settings: Compaction) -> Result<u64> {
    let started_ms = crate::core::clock::now_ms();
    super::block_on(async {
        let mut replaced = 0;
        // The partition still open: its hour, or the one before within the margin.
        let open = delta::partition_values(PartitionKey::from_millis(now_ms - CLOSED_AFTER_MS));
        for table in Table::all() {
            let Some(delta_table) = delta::open(root, table.name()).await? else {
                continue;
            };
            let schema = delta_table.snapshot()?.snapshot().arrow_schema();
            let rewrite = Rewrite::of(&schema);
            replaced +=
                rewrite_closed(root, table.name(), delta_table, &open, rewrite, settings).await?;
            // The rewritten files and their commits, on local disk.
            if let Some(dir) = root.table_dir(table.name()) {
                delta::sync_tree(&dir, started_ms - 2_000)?;
            }
        }
        Ok(replaced)
    })
}

/// Rewrites as `rewrite` says every partition before `open` that holds a
/// file no rewrite made; one commit per partition.
async fn rewrite_closed(
    root: &StoreRoot,
    name: &str,
    delta_table: DeltaTable,
    open: &(String, u8),
    rewrite: Rewrite,
    settings: Compaction,
) -> Result<u64> {
    let mut partitions: BTreeMap<(String, u8), Vec<LogicalFileView>> = BTreeMap::new();
    for file in delta_table.snapshot()?.log_data().iter() {
        let values = file.partition_values_map();
        let date = values.get("date").cloned().flatten().unwrap_or_default();
        let hour = values
            .get("hour")
            .cloned()
            .flatten()
            .and_then(|h| h.parse().ok())
            .unwrap_or_default();
        if (date.as_str(), hour) < (open.0.as_str(), open.1) {
            partitions.entry((date, hour)).or_default().push(file);
        }
    }
    let mut replaced = 0;
    for ((date, hour), files) in partitions {
        // Tags are read through the Add action: the file view has no
        // accessor for them.
        #[allow(deprecated)]
        let rewritten = |f: &LogicalFileView| {
            f.add_action()
                .tags
                .is_some_and(|tags| tags.contains_key(REWRITTEN_TAG))
        };
        if files.iter().all(rewritten) {
            continue;
        }
        let removed = files.len() as u64;
        let predicate = format!("date = '{date}' AND hour = {hour}");
        rewrite_partition(
            root,
            name,
            &delta_table,
            files,
            predicate,
            rewrite,
            settings,
        )
        .await?;
        replaced += removed;
    }
    Ok(replaced)
}

/// Replaces `files` (one partition's) by their rows as `rewrite` orders
/// them, in one commit that changes no data.
async fn rewrite_partition(
    root: &StoreRoot,
    name: &str,
    delta_table: &DeltaTable,
    files: Vec<LogicalFileView>,
    predicate: String,
    rewrite: Rewrite,
    settings: Compaction,
) -> Result<()> {
    let snapshot = delta_table.snapshot()?;
    let schema = snapshot.snapshot().arrow_schema();
    let removes: Vec<Action> = files
        .iter()
        .map(|f| Action::Remove(f.remove_action(false)))
        .collect();
    let part = TableFiles::with_files(root, name, Arc::clone(&schema), files.into_iter())?;
    let runtime = RuntimeEnvBuilder::new()
        .with_memory_limit(REWRITE_MEMORY_BYTES, 1.0)
        .build_arc()?;
    let ctx = SessionContext::new_with_config_rt(SessionConfig::new(), runtime);
    if let Some((bucket, store)) = root.object_store_url()? {
        ctx.register_object_store(&bucket, store);
    }
    ctx.register_table("part", Arc::new(part))?;
    let columns: Vec<String> = schema
        .fields()
        .iter()
        .map(|f| identifier(f.name()))
        .collect();
    let sql = match rewrite {
        Rewrite::Records => {
            // One record: rows equal in every column but those of the copy
            // and the encrypted ones (sealed with a nonce of their own per
            // copy). Two records a vehicle sent under one (ts, seq) differ
            // elsewhere and stay.
            let same: Vec<String> = schema
                .fields()
                .iter()
                .filter(|f| !COPY_COLUMNS.contains(&f.name().as_str()))
                .filter(|f| !matches!(f.data_type(), DataType::Binary | DataType::LargeBinary))
                .map(|f| identifier(f.name()))
                .collect();
            format!(
                "SELECT {columns} FROM (SELECT *, row_number() OVER (PARTITION BY {same} \
                 ORDER BY received_at, wal_app, wal_entry) AS fleetgate_copy FROM part) \
                 WHERE fleetgate_copy = 1 ORDER BY {key}",
                columns = columns.join(", "),
                same = same.join(", "),
                key = RECORD_KEY.map(identifier).join(", ")
            )
        }
        Rewrite::Positions => format!(
            "SELECT {columns} FROM part ORDER BY floor({latitude} * {BANDS_PER_DEGREE}), {times}",
            columns = columns.join(", "),
            latitude = identifier(POSITION_COLUMNS[0]),
            times = POSITION_COLUMNS[1..]
                .iter()
                .map(|c| identifier(c))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Rewrite::Arrival => {
            let arrival: Vec<String> = ARRIVAL_COLUMNS
                .iter()
                .filter(|c| schema.field_with_name(c).is_ok())
                .map(|c| identifier(c))
                .collect();
            // Every table has `received_at` ([`crate::schema`]).
            format!(
                "SELECT {columns} FROM part ORDER BY {order}",
                columns = columns.join(", "),
                order = arrival.join(", ")
            )
        }
    };
    let mut rows = ctx.sql(&sql).await?.execute_stream().await?;
    let properties = writer_properties(settings.zstd_level, 1 << 20, &[])?;
    // One file per partition: a rolling writer would upload in the
    // background, holding far more than the rewrite's memory bound.
    let mut writer = RecordBatchWriter::for_table(delta_table)?.with_writer_properties(properties);
    while let Some(batch) = rows.next().await {
        writer.write(batch?).await?;
    }
    let tag: HashMap<String, Option<String>> =
        HashMap::from([(REWRITTEN_TAG.to_owned(), Some("true".to_owned()))]);
    let adds = writer.flush().await?;
    let local_dir = delta_table.table_url().to_file_path().ok();
    if let Some(dir) = &local_dir {
        delta::sync_files(dir, &adds)?;
    }
    let mut actions: Vec<Action> = adds
        .into_iter()
        .map(|mut add| {
            add.data_change = false;
            add.tags = Some(tag.clone());
            Action::Add(add)
        })
        .collect();
    actions.extend(removes);
    let operation = DeltaOperation::Optimize {
        predicate: Some(predicate),
        target_size: i64::try_from(settings.target_bytes).unwrap_or(i64::MAX),
    };
    let finalized = CommitBuilder::from(CommitProperties::default())
        .with_actions(actions)
        .build(Some(snapshot), delta_table.log_store(), operation)
        .await
        .map_err(StoreError::from)?;
    if let Some(dir) = &local_dir {
        delta::sync_log(dir, finalized.version())?;
    }
    Ok(())
}

/// `name` as a quoted SQL identifier.
fn identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}
