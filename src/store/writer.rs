//! The writer of one table: a named thread that receives record batches,
//! appends them to one open Parquet file per hour partition, and commits a
//! file when it reaches `roll_rows` rows, `roll_bytes` bytes or `roll_age`.
//!
//! Commit = write the footer (naming the WAL entries the file holds), fsync
//! the file, rename it from its hidden in-progress name to
//! `part-<run>-<n>.parquet`, fsync the directory. Only then are its rows
//! counted as stored and its WAL entries released. A failed write or commit
//! loses nothing: the file's batches are kept and written again after a
//! back-off, until the disk accepts them. This thread never decodes or
//! pseudonymises; it only stores what the workers built.

use std::collections::HashMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use crossbeam::channel::{Receiver, RecvTimeoutError};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;

use super::{IN_PROGRESS_SUFFIX, PARQUET_EXTENSION, PartitionKey, Result, StoreError, io_error};
use crate::core::fsio;
use crate::wal::{self, EntryId, Tracker};

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
    pub dir: PathBuf,
    pub schema: SchemaRef,
    pub roll_rows: usize,
    pub roll_bytes: usize,
    pub roll_age: Duration,
    pub max_open_files: usize,
    /// Most bytes of uncommitted rows this writer holds before it commits
    /// early or, when writes fail, stops taking batches.
    pub memory_budget_bytes: usize,
    pub zstd_level: i32,
    /// Distinguishes this server run's file names from earlier runs'.
    pub run_id: String,
    /// Key-value metadata written into every file's footer.
    pub metadata: Vec<(String, String)>,
}

/// Reported to the caller after each commit.
#[derive(Debug, Clone)]
pub struct Commit {
    pub rows: usize,
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

struct OpenFile {
    writer: ArrowWriter<File>,
    in_progress: PathBuf,
    committed: PathBuf,
    rows: usize,
    opened: Instant,
    /// What the file holds, kept until it is committed so a failure loses nothing.
    batches: Vec<TableBatch>,
    /// Memory those batches take, kept as a running sum: summing it afresh
    /// for every batch received cost a tenth of the server's CPU.
    held_bytes: usize,
}

struct TableWriter {
    settings: WriterSettings,
    properties: WriterProperties,
    open: HashMap<PartitionKey, OpenFile>,
    next_file: u64,
    listener: Arc<dyn CommitListener>,
    tracker: Arc<Tracker>,
    retry: Vec<TableBatch>,
    retry_delay: Duration,
    retry_at: Instant,
}

/// Removes in-progress files a crash left behind; they were never committed.
fn remove_in_progress(dir: &Path) -> Result<usize> {
    let mut removed = 0;
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(io_error(dir)(e)),
    };
    for entry in entries {
        let path = entry.map_err(io_error(dir))?.path();
        if path.is_dir() {
            removed += remove_in_progress(&path)?;
        } else if path.extension().is_some_and(|e| e == IN_PROGRESS_SUFFIX) {
            fs::remove_file(&path).map_err(io_error(&path))?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// Starts the writer thread of one table. It runs until every sender of `rx`
/// is dropped, then commits what it holds and returns.
pub fn spawn_writer(
    settings: WriterSettings,
    rx: Receiver<TableBatch>,
    listener: Arc<dyn CommitListener>,
    tracker: Arc<Tracker>,
) -> Result<JoinHandle<()>> {
    let removed = remove_in_progress(&settings.dir)?;
    if removed > 0 {
        tracing::warn!(table = %settings.table, files = removed, "removed uncommitted files of an earlier run");
    }
    let properties =
        writer_properties(settings.zstd_level, settings.roll_rows, &settings.metadata)?;
    let name = format!("writer-{}", settings.table);
    let mut writer = TableWriter {
        settings,
        properties,
        open: HashMap::new(),
        next_file: 0,
        listener,
        tracker,
        retry: Vec::new(),
        retry_delay: FIRST_RETRY_DELAY,
        retry_at: Instant::now(),
    };
    std::thread::Builder::new()
        .name(name)
        .spawn(move || writer.run(rx))
        .map_err(io_error(Path::new("writer thread")))
}

impl TableWriter {
    fn run(&mut self, rx: Receiver<TableBatch>) {
        let tick = (self.settings.roll_age / 4)
            .clamp(Duration::from_millis(10), Duration::from_millis(250));
        loop {
            self.enforce_budget();
            self.listener.holding(self.held_bytes());
            if self.held_bytes() > self.settings.memory_budget_bytes {
                // Only batches that failed to write are left: take nothing new
                // until the disk accepts them, so the pipeline behind waits.
                std::thread::sleep(
                    self.retry_at
                        .saturating_duration_since(Instant::now())
                        .max(tick),
                );
                self.retry_due();
                continue;
            }
            match rx.recv_timeout(tick) {
                Ok(first) => {
                    self.append(first);
                    while self.held_bytes() <= self.settings.memory_budget_bytes {
                        match rx.try_recv() {
                            Ok(next) => self.append(next),
                            Err(_) => break,
                        }
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            self.commit_aged();
            self.retry_due();
        }
        // Shutting down: commit everything, retrying failed writes until they
        // succeed, so nothing received is left behind.
        loop {
            let all: Vec<PartitionKey> = self.open.keys().copied().collect();
            for key in all {
                self.commit(key);
            }
            if self.retry.is_empty() {
                break;
            }
            std::thread::sleep(self.retry_at.saturating_duration_since(Instant::now()));
            self.retry_due();
        }
    }

    /// Memory held for rows not yet committed: open files and failed batches.
    fn held_bytes(&self) -> usize {
        self.open.values().map(|f| f.held_bytes).sum::<usize>()
            + self
                .retry
                .iter()
                .map(|b| b.batch.get_array_memory_size())
                .sum::<usize>()
    }

    /// Commits the largest open files while the writer holds more than its budget.
    fn enforce_budget(&mut self) {
        while self.held_bytes() > self.settings.memory_budget_bytes {
            let largest = self
                .open
                .iter()
                .max_by_key(|(_, f)| f.held_bytes)
                .map(|(k, _)| *k);
            match largest {
                Some(key) => self.commit(key),
                None => break,
            }
        }
    }

    fn retry_due(&mut self) {
        if self.retry.is_empty() || Instant::now() < self.retry_at {
            return;
        }
        let batches = std::mem::take(&mut self.retry);
        let failed_before = batches.len();
        for batch in batches {
            self.append(batch);
        }
        if self.retry.is_empty() {
            self.retry_delay = FIRST_RETRY_DELAY;
        } else if self.retry.len() >= failed_before {
            tracing::warn!(table = %self.settings.table, batches = self.retry.len(), "writing failed batches again failed; backing off");
        }
    }

    /// Keeps batches whose write failed, to be written again after a back-off.
    fn keep_for_retry(&mut self, batches: Vec<TableBatch>, error: &StoreError) {
        let rows = batches.iter().map(|b| b.batch.num_rows()).sum();
        self.listener.failed(error, rows);
        self.retry.extend(batches);
        self.retry_at = Instant::now() + self.retry_delay;
        self.retry_delay = (self.retry_delay * 2).min(MAX_RETRY_DELAY);
    }

    fn append(&mut self, table_batch: TableBatch) {
        let partition = table_batch.partition;
        let rows = table_batch.batch.num_rows();
        if rows == 0 {
            self.tracker.covered(&[table_batch.wal]);
            return;
        }
        if !self.open.contains_key(&partition) {
            if self.open.len() >= self.settings.max_open_files {
                self.commit_oldest();
            }
            match self.open_file(partition) {
                Ok(file) => {
                    self.open.insert(partition, file);
                }
                Err(e) => {
                    self.keep_for_retry(vec![table_batch], &e);
                    return;
                }
            }
        }
        let Some(file) = self.open.get_mut(&partition) else {
            return;
        };
        if let Err(e) = file.writer.write(&table_batch.batch) {
            let mut batches = self.abandon(partition);
            batches.push(table_batch);
            self.keep_for_retry(batches, &e.into());
            return;
        }
        file.rows += rows;
        file.held_bytes += table_batch.batch.get_array_memory_size();
        file.batches.push(table_batch);
        let bytes = file.writer.bytes_written() + file.writer.in_progress_size();
        if file.rows >= self.settings.roll_rows || bytes >= self.settings.roll_bytes {
            self.commit(partition);
        }
    }

    fn open_file(&mut self, partition: PartitionKey) -> Result<OpenFile> {
        let dir = self.settings.dir.join(partition.relative_dir());
        if !dir.exists() {
            fsio::create_dir_all(&dir).map_err(io_error(&dir))?;
            // Make the new directory entries durable up to the table directory.
            let mut d = dir.as_path();
            while let Some(parent) = d.parent() {
                fsio::sync_dir(parent).map_err(io_error(parent))?;
                if parent == self.settings.dir {
                    break;
                }
                d = parent;
            }
        }
        self.next_file += 1;
        let stem = format!("part-{}-{:06}", self.settings.run_id, self.next_file);
        let committed = dir.join(format!("{stem}.{PARQUET_EXTENSION}"));
        let in_progress = dir.join(format!(".{stem}.{PARQUET_EXTENSION}.{IN_PROGRESS_SUFFIX}"));
        let file = fsio::create(&in_progress).map_err(io_error(&in_progress))?;
        let writer = ArrowWriter::try_new(
            file,
            self.settings.schema.clone(),
            Some(self.properties.clone()),
        )?;
        Ok(OpenFile {
            writer,
            in_progress,
            committed,
            rows: 0,
            opened: Instant::now(),
            batches: Vec::new(),
            held_bytes: 0,
        })
    }

    fn commit_aged(&mut self) {
        let age = self.settings.roll_age;
        let due: Vec<PartitionKey> = self
            .open
            .iter()
            .filter(|(_, f)| f.opened.elapsed() >= age)
            .map(|(k, _)| *k)
            .collect();
        for key in due {
            self.commit(key);
        }
    }

    fn commit_oldest(&mut self) {
        if let Some(key) = self
            .open
            .iter()
            .min_by_key(|(_, f)| f.opened)
            .map(|(k, _)| *k)
        {
            self.commit(key);
        }
    }

    fn commit(&mut self, partition: PartitionKey) {
        let Some(file) = self.open.remove(&partition) else {
            return;
        };
        let in_progress = file.in_progress.clone();
        match finish(file) {
            Ok((commit, batches)) => {
                let entries: Vec<EntryId> = batches.iter().map(|b| b.wal).collect();
                self.tracker.covered(&entries);
                self.listener.committed(&commit, &batches);
            }
            Err((e, batches)) => {
                let _ = fs::remove_file(&in_progress);
                self.keep_for_retry(batches, &e);
            }
        }
    }

    /// Drops an open file that cannot be completed; returns what it held.
    fn abandon(&mut self, partition: PartitionKey) -> Vec<TableBatch> {
        match self.open.remove(&partition) {
            Some(file) => {
                let _ = fs::remove_file(&file.in_progress);
                file.batches
            }
            None => Vec::new(),
        }
    }
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

/// Writes the footer, fsyncs, renames into place and fsyncs the directory.
/// Returns the batches the file holds, with the commit or with the error.
fn finish(
    file: OpenFile,
) -> std::result::Result<(Commit, Vec<TableBatch>), (StoreError, Vec<TableBatch>)> {
    let OpenFile {
        mut writer,
        in_progress,
        committed,
        rows,
        batches,
        ..
    } = file;
    let entries: Vec<EntryId> = batches.iter().map(|b| b.wal).collect();
    writer.append_key_value_metadata(KeyValue::new(
        wal::FOOTER_KEY.to_owned(),
        wal::footer_value(&entries),
    ));
    match commit_file(writer, &in_progress, &committed, rows) {
        Ok(commit) => Ok((commit, batches)),
        Err(e) => Err((e, batches)),
    }
}

fn commit_file(
    writer: ArrowWriter<File>,
    in_progress: &Path,
    committed: &Path,
    rows: usize,
) -> Result<Commit> {
    let file = writer.into_inner()?;
    file.sync_all().map_err(io_error(in_progress))?;
    let bytes = file.metadata().map_err(io_error(in_progress))?.len();
    drop(file);
    fsio::rename_durably(in_progress, committed).map_err(io_error(committed))?;
    Ok(Commit { rows, bytes })
}
