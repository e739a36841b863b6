//! The writer of one table: two named threads. `writer-<table>` receives
//! record batches and holds them until they reach `roll_rows` rows,
//! `roll_bytes` bytes, `max_open_files` hour partitions or `roll_age`;
//! `commit-<table>` then commits them to the table's Delta log while the
//! first goes on receiving, so a commit never stalls the workers, whose WAL
//! fsyncs decide the acknowledgements. Only the memory budget does.
//!
//! Commit = write one zstd Parquet file per hour partition held, fsync them
//! (on local disk), commit them to the Delta log in one version that also
//! records, per WAL shard, the last entry it holds, fsync the log. Only then
//! are the rows counted as stored and their WAL entries released. A failed
//! write or commit loses nothing: the batches stay held and are written
//! again after a back-off, until the store accepts them; a file a failed
//! commit left behind is named by no version, so no reader sees it, and
//! vacuum removes it. Commits of one table run one at a time, in the order
//! received. These threads never decode or pseudonymise; they only store
//! what the workers built.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use crossbeam::channel::{Receiver, Sender, bounded};
use deltalake::DeltaTable;
use deltalake::kernel::transaction::{CommitBuilder, CommitProperties};
use deltalake::kernel::{Action, Transaction};
use deltalake::protocol::{DeltaOperation, SaveMode};
use deltalake::table::config::TablePropertiesExt;
use deltalake::writer::{DeltaWriter, RecordBatchWriter};
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;

use super::delta::{self, PARTITION_COLUMNS, StoreRoot};
use super::{PartitionKey, Result, StoreError, io_error};
use crate::core::fence::Fence;
use crate::core::priority;
use crate::wal::{EntryId, Tracker};

/// Rows of one hour partition on their way to a table writer, with the WAL
/// entry that holds them.
#[derive(Debug, Clone)]
pub struct TableBatch {
    pub partition: PartitionKey,
    pub batch: RecordBatch,
    pub wal: EntryId,
}

/// What a table writer needs to know.
#[derive(Debug, Clone)]
pub struct WriterSettings {
    pub table: String,
    /// The node whose WAL shards this writer commits (`cluster.node_id`).
    pub node: String,
    pub root: StoreRoot,
    /// The columns of the table's files (the partition columns come on top).
    pub schema: SchemaRef,
    pub roll_rows: usize,
    pub roll_bytes: usize,
    pub roll_age: Duration,
    /// Most hour partitions one commit writes (late records spread over many).
    pub max_open_files: usize,
    /// Most bytes of uncommitted rows this writer holds (the roll being
    /// committed and the one being gathered). At half of it a roll is due;
    /// over it, the writer takes no batches until its commit is done. Rows
    /// are counted as Arrow holds them: a commit briefly needs about as
    /// much again to join and encode its roll.
    pub memory_budget_bytes: usize,
    pub zstd_level: i32,
    /// Key-value metadata written into every file's footer.
    pub metadata: Vec<(String, String)>,
    /// In a cluster: asked just before each commit, which is refused (and
    /// retried later) unless it holds; when its epoch moved since the last
    /// commit, what another node stored meanwhile is dropped first.
    pub fence: Option<Arc<dyn Fence>>,
}

/// Reported to the caller after each commit.
#[derive(Debug, Clone)]
pub struct Commit {
    pub rows: usize,
    pub files: usize,
    pub bytes: u64,
}

/// Called after every commit, and after every failed write with its error.
pub trait CommitListener: Send + Sync {
    fn committed(&self, commit: &Commit, batches: &[TableBatch]);
    /// A write failed; `rows_delayed` rows will be written again after a back-off.
    fn failed(&self, error: &StoreError, rows_delayed: usize);
    /// The bytes of uncommitted rows the writer holds now.
    fn holding(&self, bytes: usize);
}

/// First wait before writing failed batches again; doubles up to [`MAX_RETRY_DELAY`].
const FIRST_RETRY_DELAY: Duration = Duration::from_millis(200);
const MAX_RETRY_DELAY: Duration = Duration::from_secs(30);
/// Longest a commit may take before it counts as failed (a store that
/// stopped answering).
const COMMIT_TIMEOUT: Duration = Duration::from_secs(120);

/// Rows received and not yet committed, in the order received.
#[derive(Default)]
struct Held {
    batches: Vec<TableBatch>,
    rows: usize,
    /// Memory the batches take, kept as a running sum.
    bytes: usize,
    partitions: HashSet<PartitionKey>,
    since: Option<Instant>,
}

impl Held {
    fn push(&mut self, table_batch: TableBatch) {
        self.rows += table_batch.batch.num_rows();
        self.bytes += table_batch.batch.get_array_memory_size();
        self.partitions.insert(table_batch.partition);
        self.since.get_or_insert_with(Instant::now);
        self.batches.push(table_batch);
    }
}

/// The receiving half of a table writer: takes batches from the workers
/// and gathers them until a roll is due, then hands them to its committer.
/// It keeps taking batches while a commit runs, so a slow Parquet encode or
/// object store never stalls the workers (whose WAL fsyncs decide the
/// acknowledgements); only the memory budget does.
struct TableWriter {
    settings: WriterSettings,
    held: Held,
    /// Bytes of the batches the committer holds; `None` while it is idle.
    committing: Option<usize>,
    to_committer: Sender<Held>,
    committed: Receiver<()>,
    listener: Arc<dyn CommitListener>,
    tracker: Arc<Tracker>,
}

/// The committing half of a table writer, on its own thread: writes each
/// set of held batches as one Delta commit, retrying with back-off until the
/// store takes it, and only then takes the next.
struct Committer {
    settings: WriterSettings,
    properties: WriterProperties,
    runtime: tokio::runtime::Runtime,
    /// The open table; `None` until opened, and again after a failed commit.
    table: Option<DeltaTable>,
    listener: Arc<dyn CommitListener>,
    tracker: Arc<Tracker>,
    failing: bool,
    retry_delay: Duration,
    retry_at: Instant,
    /// The fence's epoch at the last commit (`None`: none yet).
    fence_epoch: Option<u64>,
}

/// Starts the writer of one table: a thread that receives, and one that
/// commits. It runs until every sender of `rx` is dropped, then commits
/// what it holds and returns.
pub fn spawn_writer(
    settings: WriterSettings,
    rx: Receiver<TableBatch>,
    listener: Arc<dyn CommitListener>,
    tracker: Arc<Tracker>,
) -> Result<JoinHandle<()>> {
    let properties =
        writer_properties(settings.zstd_level, settings.roll_rows, &settings.metadata)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(io_error(std::path::Path::new("writer runtime")))?;
    let (to_committer, held_rx) = bounded::<Held>(1);
    let (committed_tx, committed) = bounded::<()>(1);
    let committer = Committer {
        settings: settings.clone(),
        properties,
        runtime,
        table: None,
        listener: listener.clone(),
        tracker: tracker.clone(),
        failing: false,
        retry_delay: FIRST_RETRY_DELAY,
        retry_at: Instant::now(),
        fence_epoch: None,
    };
    let committer = std::thread::Builder::new()
        .name(format!("commit-{}", settings.table))
        .spawn(move || {
            // Parquet encoding and Delta commits decide how soon rows are
            // queryable, not how long a vehicle waits for its PUBACK.
            priority::run_nicer(priority::STORE_NICENESS);
            committer.run(held_rx, committed_tx)
        })
        .map_err(io_error(std::path::Path::new("commit thread")))?;
    let name = format!("writer-{}", settings.table);
    let mut writer = TableWriter {
        settings,
        held: Held::default(),
        committing: None,
        to_committer,
        committed,
        listener,
        tracker,
    };
    std::thread::Builder::new()
        .name(name)
        .spawn(move || {
            writer.run(rx);
            let table = writer.settings.table.clone();
            writer.listener.holding(0);
            drop(writer);
            if let Err(panic) = committer.join() {
                // The writer's own join then reports it, as a panic of the
                // writer thread always did: the server stops with an error.
                tracing::error!(%table, "the table's commit thread panicked; its rows stay in the WAL");
                std::panic::resume_unwind(panic);
            }
        })
        .map_err(io_error(std::path::Path::new("writer thread")))
}

impl TableWriter {
    fn run(&mut self, rx: Receiver<TableBatch>) {
        let tick = (self.settings.roll_age / 4)
            .clamp(Duration::from_millis(10), Duration::from_millis(250));
        let committed = self.committed.clone();
        loop {
            self.listener.holding(self.bytes());
            let too_many_files = self.committing.is_some()
                && self.held.partitions.len() > self.settings.max_open_files;
            if self.bytes() > self.settings.memory_budget_bytes || too_many_files {
                // Over budget (or over `max_open_files` while a commit
                // runs): commit now, or, while a commit runs (or keeps
                // failing), take nothing new, so the pipeline behind waits.
                if self.committing.is_none() {
                    self.hand_over();
                } else if !self.wait_for_commit() {
                    return;
                }
                continue;
            }
            crossbeam::select! {
                recv(rx) -> batch => match batch {
                    Ok(first) => {
                        self.append(first);
                        while self.bytes() <= self.settings.memory_budget_bytes {
                            match rx.try_recv() {
                                Ok(next) => self.append(next),
                                Err(_) => break,
                            }
                        }
                    }
                    Err(_) => break,
                },
                recv(committed) -> done => match done {
                    Ok(()) => self.committing = None,
                    Err(_) => return,
                },
                default(tick) => {}
            }
            if self.committing.is_none() && self.roll_due() {
                self.hand_over();
            }
        }
        // Shutting down: the committer commits everything, retrying until
        // it succeeds, so nothing received is left behind.
        if !self.held.batches.is_empty() && self.wait_for_commit() {
            self.hand_over();
        }
    }

    /// Bytes of uncommitted rows held here and by the committer.
    fn bytes(&self) -> usize {
        self.held.bytes + self.committing.unwrap_or(0)
    }

    /// Waits until the committer is idle; false if it is gone.
    fn wait_for_commit(&mut self) -> bool {
        if self.committing.is_some() && self.committed.recv().is_err() {
            tracing::error!(table = %self.settings.table, "the table's commit thread is gone; its rows stay in the WAL");
            return false;
        }
        self.committing = None;
        true
    }

    fn roll_due(&self) -> bool {
        let held = &self.held;
        let Some(since) = held.since else {
            return false;
        };
        // Half the budget: the next roll is gathered while this one commits.
        held.rows >= self.settings.roll_rows
            || held.bytes >= self.settings.roll_bytes
            || held.bytes >= self.settings.memory_budget_bytes / 2
            || held.partitions.len() > self.settings.max_open_files
            || since.elapsed() >= self.settings.roll_age
    }

    fn append(&mut self, table_batch: TableBatch) {
        if table_batch.batch.num_rows() == 0 {
            self.tracker.covered(&[table_batch.wal]);
            return;
        }
        self.held.push(table_batch);
    }

    /// Gives everything held to the (idle) committer.
    fn hand_over(&mut self) {
        if self.held.batches.is_empty() {
            return;
        }
        let held = std::mem::take(&mut self.held);
        let bytes = held.bytes;
        match self.to_committer.send(held) {
            Ok(()) => self.committing = Some(bytes),
            Err(_) => {
                tracing::error!(table = %self.settings.table, "the table's commit thread is gone; its rows stay in the WAL");
            }
        }
    }
}

impl Committer {
    fn run(mut self, held: Receiver<Held>, committed: Sender<()>) {
        for mut held in held {
            while !held.batches.is_empty() {
                std::thread::sleep(self.retry_at.saturating_duration_since(Instant::now()));
                self.commit(&mut held);
            }
            if committed.send(()).is_err() {
                return;
            }
        }
    }

    /// After a failed attempt: drops the held batches that a commit holds
    /// after all (its write landed, its answer was lost: an S3 response
    /// cut off, a failed fsync after the commit), so that the next attempt
    /// cannot store them twice. A commit holds every batch of a shard up to
    /// its recorded entry. Returns false if the table could not be asked,
    /// which counts as another failed attempt.
    fn drop_landed(&mut self, held: &mut Held) -> bool {
        let shards: std::collections::BTreeSet<u16> =
            held.batches.iter().map(|b| b.wal.shard).collect();
        let settings = &self.settings;
        let asked = self.runtime.block_on(async {
            let mut through = BTreeMap::new();
            if let Some(table) = delta::open(&settings.root, &settings.table).await? {
                for shard in shards {
                    let app = delta::wal_app_id(&settings.node, shard);
                    if let Some(seq) = delta::stored_through(&table, &app).await? {
                        through.insert(shard, seq);
                    }
                }
            }
            Ok::<_, StoreError>(through)
        });
        let through = match asked {
            Ok(through) => through,
            Err(e) => {
                self.back_off(&e, held.rows);
                return false;
            }
        };
        let (landed, pending): (Vec<TableBatch>, Vec<TableBatch>) =
            std::mem::take(&mut held.batches)
                .into_iter()
                .partition(|b| {
                    through
                        .get(&b.wal.shard)
                        .is_some_and(|&seq| b.wal.seq <= seq)
                });
        let since = held.since;
        *held = Held::default();
        for batch in pending {
            held.push(batch);
        }
        held.since = since.or(held.since);
        if !landed.is_empty() {
            tracing::warn!(table = %self.settings.table, batches = landed.len(), "a commit reported as failed had landed; its batches are not written again");
            let entries: Vec<EntryId> = landed.iter().map(|b| b.wal).collect();
            self.tracker.covered(&entries);
            let commit = Commit {
                rows: landed.iter().map(|b| b.batch.num_rows()).sum(),
                files: 0,
                bytes: 0,
            };
            self.listener.committed(&commit, &landed);
        }
        true
    }

    /// Counts a failed attempt and schedules the next.
    fn back_off(&mut self, error: &StoreError, rows_delayed: usize) {
        if self.failing {
            tracing::warn!(table = %self.settings.table, %error, "writing held batches again failed; backing off");
        }
        self.listener.failed(error, rows_delayed);
        self.failing = true;
        self.retry_at = Instant::now() + self.retry_delay;
        self.retry_delay = (self.retry_delay * 2).min(MAX_RETRY_DELAY);
    }

    /// Commits everything `held` holds and empties it; on failure keeps it
    /// for the next attempt.
    fn commit(&mut self, held: &mut Held) {
        // After a failed attempt, or once the node took its name back after
        // losing it (another node may have stored these entries meanwhile):
        // first drop what the table holds already.
        let epoch = self.settings.fence.as_ref().map(|fence| fence.epoch());
        let fence_moved = epoch.is_some() && epoch != self.fence_epoch;
        let recheck = (self.failing && self.table.is_none()) || fence_moved;
        if recheck && !self.drop_landed(held) {
            return;
        }
        if held.batches.is_empty() {
            return;
        }
        let table = self.table.take();
        let settings = &self.settings;
        let batches = &held.batches;
        let properties = &self.properties;
        let runtime = &self.runtime;
        // A panic inside the object store or Delta writer (seen: a buffered
        // upload polled after a failed write) fails this attempt like an
        // error would; the batches stay held and the thread lives on.
        let attempt = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let attempt = async {
                let table = match table {
                    Some(table) => table,
                    None => {
                        delta::open_or_create(&settings.root, &settings.table, &settings.schema)
                            .await?
                    }
                };
                let apps: BTreeMap<u16, String> = batches
                    .iter()
                    .map(|b| (b.wal.shard, delta::wal_app_id(&settings.node, b.wal.shard)))
                    .collect();
                let parts = batches.iter().map(|b| {
                    let app = apps.get(&b.wal.shard).map(String::as_str);
                    (b.partition, &b.batch, app.map(|app| (app, b.wal.seq)))
                });
                let transactions = wal_transactions(&apps, batches);
                let fence = settings.fence.as_deref().zip(epoch);
                write_and_commit(table, properties, parts, transactions, fence).await
            };
            runtime.block_on(async { tokio::time::timeout(COMMIT_TIMEOUT, attempt).await })
        }));
        let outcome = match attempt {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(_elapsed)) => Err(StoreError::TimedOut(COMMIT_TIMEOUT)),
            Err(_panic) => Err(StoreError::Panicked),
        };
        match outcome {
            Ok((table, commit)) => {
                self.table = Some(table);
                self.fence_epoch = epoch;
                let held = std::mem::take(held);
                let entries: Vec<EntryId> = held.batches.iter().map(|b| b.wal).collect();
                self.tracker.covered(&entries);
                self.listener.committed(&commit, &held.batches);
                self.failing = false;
                self.retry_delay = FIRST_RETRY_DELAY;
            }
            Err(e) => {
                // Whatever the failed attempt left running (uploads) goes with its runtime.
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(fresh) => self.runtime = fresh,
                    Err(error) => tracing::warn!(%error, "cannot renew the writer's runtime"),
                }
                self.back_off(&e, held.rows);
            }
        }
    }
}

/// Per WAL shard, the last entry `batches` hold, as Delta application
/// transactions under the shards' application ids `apps`.
fn wal_transactions(apps: &BTreeMap<u16, String>, batches: &[TableBatch]) -> Vec<Transaction> {
    let mut through: BTreeMap<u16, u64> = BTreeMap::new();
    for b in batches {
        let seq = through.entry(b.wal.shard).or_default();
        *seq = (*seq).max(b.wal.seq);
    }
    through
        .into_iter()
        .map(|(shard, seq)| {
            Transaction::new(
                apps.get(&shard).cloned().unwrap_or_default(),
                i64::try_from(seq).unwrap_or(i64::MAX),
            )
        })
        .collect()
}

/// Writes `parts` (rows, their hour and the WAL entry that held them) as
/// one Parquet file per hour partition and commits them
/// to `table` as one version, with `transactions`. Returns the table.
async fn write_and_commit<'a>(
    mut table: DeltaTable,
    properties: &WriterProperties,
    parts: impl Iterator<Item = (PartitionKey, &'a RecordBatch, Option<(&'a str, u64)>)>,
    transactions: Vec<Transaction>,
    fence: Option<(&dyn Fence, u64)>,
) -> Result<(DeltaTable, Commit)> {
    // One write per hour partition: the Delta writer validates and splits
    // every batch it is given, which costs more than the copy that joins
    // the many small batches of a roll.
    let mut partitions: BTreeMap<PartitionKey, Vec<RecordBatch>> = BTreeMap::new();
    let mut rows = 0;
    for (partition, batch, wal) in parts {
        rows += batch.num_rows();
        partitions
            .entry(partition)
            .or_default()
            .push(delta::stored_rows(batch, partition, wal)?);
    }
    let mut writer =
        RecordBatchWriter::for_table(&table)?.with_writer_properties(properties.clone());
    for mut batches in partitions.into_values() {
        let joined = match batches.len() {
            0 => continue,
            1 => batches.swap_remove(0),
            _ => arrow::compute::concat_batches(&batches[0].schema(), &batches)?,
        };
        writer.write(joined).await?;
    }
    let adds = writer.flush().await?;
    let local_dir = table.table_url().to_file_path().ok();
    if let Some(dir) = &local_dir {
        delta::sync_files(dir, &adds)?;
    }
    let commit = Commit {
        rows,
        files: adds.len(),
        bytes: adds
            .iter()
            .map(|a| u64::try_from(a.size).unwrap_or(0))
            .sum(),
    };
    // The newest version, just before committing the next: never one a
    // log cleanup may have removed (see `delta::HISTORY_KEPT_MS`).
    table.update_incremental(None).await?;
    // The lease still held, and not lost and taken back since the batches
    // were checked against the table (another node may have stored them).
    if fence.is_some_and(|(fence, epoch)| !fence.holds() || fence.epoch() != epoch) {
        return Err(StoreError::Fenced);
    }
    let operation = DeltaOperation::Write {
        mode: SaveMode::Append,
        partition_by: Some(PARTITION_COLUMNS.map(String::from).to_vec()),
        predicate: None,
    };
    let snapshot = table.snapshot()?;
    let cleanup = cleans_log(
        snapshot.version(),
        snapshot.table_config().checkpoint_interval().get(),
    );
    let finalized = CommitBuilder::from(
        CommitProperties::default()
            .with_application_transactions(transactions)
            // Otherwise as the table says (`delta.enableExpiredLogCleanup`).
            .with_cleanup_expired_logs((!cleanup).then_some(false)),
    )
    .with_actions(adds.into_iter().map(Action::Add).collect())
    .build(Some(snapshot), table.log_store(), operation)
    .await?;
    let version = finalized.version();
    if let Some(dir) = &local_dir {
        delta::sync_log(dir, version)?;
    }
    // The table stays at the version read before this commit: the next
    // commit reads the newest one first anyway.
    Ok((table, commit))
}

/// Whether the commit after `read_version` looks for expired log files (a
/// listing of the whole log): only the one that writes the interval's
/// checkpoint (delta-rs writes it at the versions `v` with `v + 1` a
/// multiple of `checkpoint_interval`), so that an expired file waits at most
/// one interval of commits, instead of every commit listing the log.
fn cleans_log(read_version: u64, checkpoint_interval: u64) -> bool {
    (read_version + 2).is_multiple_of(checkpoint_interval)
}

/// Writes `parts` of table `name` (files of `schema`) under `root` as one
/// commit, creating the table if needed: for fixtures, benchmarks and
/// conversion, outside a running server.
pub fn append(
    root: &StoreRoot,
    name: &str,
    schema: &SchemaRef,
    parts: &[(PartitionKey, RecordBatch)],
    zstd_level: i32,
) -> Result<Commit> {
    let properties = writer_properties(zstd_level, 1 << 20, &[])?;
    super::block_on(async {
        let table = delta::open_or_create(root, name, schema).await?;
        let parts = parts.iter().map(|(p, b)| (*p, b, None));
        let (_, commit) = write_and_commit(table, &properties, parts, Vec::new(), None).await?;
        Ok(commit)
    })
}

/// How a table's Parquet files are encoded: zstd at `zstd_level`, row
/// groups of at most `roll_rows` (capped at 2^20) rows, `metadata` in the
/// footer.
pub fn writer_properties(
    zstd_level: i32,
    roll_rows: usize,
    metadata: &[(String, String)],
) -> Result<WriterProperties> {
    let level = ZstdLevel::try_new(zstd_level)?;
    Ok(WriterProperties::builder()
        .set_compression(Compression::ZSTD(level))
        .set_max_row_group_row_count(Some(roll_rows.min(1 << 20)))
        .set_created_by(format!("fleetgate {}", env!("CARGO_PKG_VERSION")))
        .set_key_value_metadata(Some(
            metadata
                .iter()
                .map(|(k, v)| KeyValue::new(k.clone(), v.clone()))
                .collect(),
        ))
        .build())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

    use arrow::array::Int64Array;
    use arrow::datatypes::{DataType, Field, Schema};
    use parquet::file::reader::{FileReader, SerializedFileReader};

    use super::*;

    /// A fence that always holds, with an epoch the test moves.
    #[derive(Debug, Default)]
    struct Epoch(AtomicU64);

    impl Fence for Epoch {
        fn holds(&self) -> bool {
            true
        }
        fn epoch(&self) -> u64 {
            self.0.load(Ordering::SeqCst)
        }
    }

    /// Counts committed rows.
    #[derive(Default)]
    struct Rows(AtomicUsize);

    impl CommitListener for Rows {
        fn committed(&self, commit: &Commit, _: &[TableBatch]) {
            self.0.fetch_add(commit.rows, Ordering::SeqCst);
        }
        fn failed(&self, _: &StoreError, _: usize) {}
        fn holding(&self, _: usize) {}
    }

    fn settings(
        root: &StoreRoot,
        roll_rows: usize,
        fence: Option<Arc<dyn Fence>>,
    ) -> WriterSettings {
        WriterSettings {
            table: "charging".into(),
            node: "node-1".into(),
            root: root.clone(),
            schema: Arc::new(Schema::new(vec![Field::new("seq", DataType::Int64, false)])),
            roll_rows,
            roll_bytes: 1 << 30,
            roll_age: Duration::from_secs(3600),
            max_open_files: 8,
            memory_budget_bytes: 1 << 30,
            zstd_level: 1,
            metadata: Vec::new(),
            fence,
        }
    }

    fn entry(seq: u64) -> TableBatch {
        let schema = Arc::new(Schema::new(vec![Field::new("seq", DataType::Int64, false)]));
        let rows = Int64Array::from(vec![i64::try_from(seq).expect("seq")]);
        TableBatch {
            partition: PartitionKey::from_millis(1_795_506_305_000),
            batch: RecordBatch::try_new(schema, vec![Arc::new(rows)]).expect("batch"),
            wal: EntryId { shard: 0, seq },
        }
    }

    fn wait_for_rows(rows: &Rows, n: usize) {
        for _ in 0..3000 {
            if rows.0.load(Ordering::SeqCst) >= n {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("{n} rows never committed");
    }

    /// Rows in the table's current files.
    fn rows_in(root: &StoreRoot) -> i64 {
        let table = crate::store::block_on(async {
            delta::open(root, "charging")
                .await?
                .ok_or(StoreError::Panicked)
        })
        .expect("table");
        table
            .get_file_uris()
            .expect("files")
            .map(|uri| {
                let path = url::Url::parse(&uri)
                    .ok()
                    .and_then(|u| u.to_file_path().ok())
                    .unwrap_or_else(|| uri.into());
                let file = std::fs::File::open(path).expect("file");
                SerializedFileReader::new(file)
                    .expect("parquet")
                    .metadata()
                    .file_metadata()
                    .num_rows()
            })
            .sum()
    }

    /// An in-memory bucket that counts the listings of log directories.
    #[derive(Debug, Default)]
    struct ListCounting {
        inner: object_store::memory::InMemory,
        log_listings: AtomicUsize,
    }

    impl ListCounting {
        fn count(&self, prefix: Option<&object_store::path::Path>) {
            if prefix.is_some_and(|p| p.as_ref().contains("_delta_log")) {
                self.log_listings.fetch_add(1, Ordering::SeqCst);
            }
        }
    }

    impl std::fmt::Display for ListCounting {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "ListCounting({})", self.inner)
        }
    }

    #[async_trait::async_trait]
    impl object_store::ObjectStore for ListCounting {
        async fn put_opts(
            &self,
            location: &object_store::path::Path,
            payload: object_store::PutPayload,
            opts: object_store::PutOptions,
        ) -> object_store::Result<object_store::PutResult> {
            self.inner.put_opts(location, payload, opts).await
        }

        async fn put_multipart_opts(
            &self,
            location: &object_store::path::Path,
            opts: object_store::PutMultipartOptions,
        ) -> object_store::Result<Box<dyn object_store::MultipartUpload>> {
            self.inner.put_multipart_opts(location, opts).await
        }

        async fn get_opts(
            &self,
            location: &object_store::path::Path,
            options: object_store::GetOptions,
        ) -> object_store::Result<object_store::GetResult> {
            self.inner.get_opts(location, options).await
        }

        fn delete_stream(
            &self,
            locations: futures::stream::BoxStream<
                'static,
                object_store::Result<object_store::path::Path>,
            >,
        ) -> futures::stream::BoxStream<'static, object_store::Result<object_store::path::Path>>
        {
            self.inner.delete_stream(locations)
        }

        fn list(
            &self,
            prefix: Option<&object_store::path::Path>,
        ) -> futures::stream::BoxStream<'static, object_store::Result<object_store::ObjectMeta>>
        {
            self.count(prefix);
            self.inner.list(prefix)
        }

        fn list_with_offset(
            &self,
            prefix: Option<&object_store::path::Path>,
            offset: &object_store::path::Path,
        ) -> futures::stream::BoxStream<'static, object_store::Result<object_store::ObjectMeta>>
        {
            self.count(prefix);
            self.inner.list_with_offset(prefix, offset)
        }

        async fn list_with_delimiter(
            &self,
            prefix: Option<&object_store::path::Path>,
        ) -> object_store::Result<object_store::ListResult> {
            self.count(prefix);
            self.inner.list_with_delimiter(prefix).await
        }

        async fn copy_opts(
            &self,
            from: &object_store::path::Path,
            to: &object_store::path::Path,
            options: object_store::CopyOptions,
        ) -> object_store::Result<()> {
            self.inner.copy_opts(from, to, options).await
        }
    }

    /// In a bucket, a listing is a request, billed, and the slowest part of
    /// reading a log. A writer committing roll after roll, alone on its
    /// table, lists the log three times per commit: to read the newest
    /// version before it commits, for delta-rs's check that none came
    /// after it, and to read the version it wrote. Looking for expired log
    /// files (a fourth) waits for the commit that writes a checkpoint.
    #[test]
    fn a_commit_lists_the_log_three_times() {
        let bucket = Arc::new(ListCounting::default());
        let url = url::Url::parse("s3://fleet/data/").expect("url");
        let root = StoreRoot::in_store(url, bucket.clone());
        let (tx, rx) = crossbeam::channel::bounded(16);
        let rows = Arc::new(Rows::default());
        let writer = spawn_writer(settings(&root, 1, None), rx, rows.clone(), Arc::default())
            .expect("writer");
        tx.send(entry(0)).expect("send");
        wait_for_rows(&rows, 1);
        let before = bucket.log_listings.load(Ordering::SeqCst);
        let commits = 5;
        for seq in 1..=commits {
            tx.send(entry(seq)).expect("send");
            wait_for_rows(&rows, usize::try_from(seq).expect("seq") + 1);
        }
        let listings = bucket.log_listings.load(Ordering::SeqCst) - before;
        drop(tx);
        writer.join().expect("writer");
        assert_eq!(
            listings,
            3 * usize::try_from(commits).expect("commits"),
            "log listings for {commits} commits"
        );
    }

    /// The commit that writes the checkpoint (version 99, 199, ... at an
    /// interval of 100) looks for expired log files; the others do not.
    #[test]
    fn the_log_is_cleaned_with_each_checkpoint() {
        let cleaning: Vec<u64> = (0..400).filter(|&read| cleans_log(read, 100)).collect();
        assert_eq!(cleaning, vec![98, 198, 298, 398], "read versions");
        assert!(cleans_log(0, 2) && !cleans_log(1, 2) && cleans_log(2, 2));
    }

    /// A node held an entry, waiting for its roll, when it lost the lease on
    /// its name; another node stored the entry from its copies; the node
    /// took its name back and its roll came due. Its commit must not store
    /// the entry again, although its own last commit went fine (nothing
    /// failed that would have made it look).
    #[test]
    fn a_writer_that_took_its_name_back_drops_what_another_node_stored() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = StoreRoot::local(dir.path()).expect("root");
        let fence = Arc::new(Epoch(AtomicU64::new(1)));
        let (to_node, node_rx) = crossbeam::channel::bounded(16);
        let rows = Arc::new(Rows::default());
        let tracker = Arc::new(Tracker::default());
        let node = spawn_writer(
            settings(&root, 2, Some(fence.clone())),
            node_rx,
            rows.clone(),
            tracker.clone(),
        )
        .expect("writer");
        for seq in [0, 1] {
            to_node.send(entry(seq)).expect("send");
        }
        wait_for_rows(&rows, 2);
        to_node.send(entry(2)).expect("send");

        // Another node stores entry 2 under this node's name.
        let (to_other, other_rx) = crossbeam::channel::bounded(16);
        let other = spawn_writer(
            settings(&root, 1, None),
            other_rx,
            Arc::new(Rows::default()),
            Arc::default(),
        )
        .expect("writer");
        to_other.send(entry(2)).expect("send");
        drop(to_other);
        other.join().expect("other writer");
        assert_eq!(rows_in(&root), 3);

        fence.0.store(2, Ordering::SeqCst);
        to_node.send(entry(3)).expect("send");
        drop(to_node);
        node.join().expect("writer");
        assert_eq!(rows_in(&root), 4, "entries 0 to 3, each once");
    }
}
