//! The writer of one table: a named thread that receives record batches,
//! appends them to one open Parquet file per hour partition, and commits a
//! file when it reaches `roll_rows` rows, `roll_bytes` bytes or `roll_age`.
//!
//! Commit = write the footer, fsync the file, rename it from its hidden
//! in-progress name to `part-<run>-<n>.parquet`, fsync the directory. Only
//! then are its rows counted as stored. This thread never decodes or
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

/// Rows of one hour partition on their way to a table writer.
#[derive(Debug)]
pub struct TableBatch {
    pub partition: PartitionKey,
    pub batch: RecordBatch,
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
    fn committed(&self, commit: &Commit);
    fn failed(&self, error: &StoreError, rows_lost: usize);
}

struct OpenFile {
    writer: ArrowWriter<File>,
    in_progress: PathBuf,
    committed: PathBuf,
    rows: usize,
    opened: Instant,
}

struct TableWriter {
    settings: WriterSettings,
    properties: WriterProperties,
    open: HashMap<PartitionKey, OpenFile>,
    next_file: u64,
    listener: Arc<dyn CommitListener>,
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
) -> Result<JoinHandle<()>> {
    let removed = remove_in_progress(&settings.dir)?;
    if removed > 0 {
        tracing::warn!(table = %settings.table, files = removed, "removed uncommitted files of an earlier run");
    }
    let level = ZstdLevel::try_new(settings.zstd_level)?;
    let properties = WriterProperties::builder()
        .set_compression(Compression::ZSTD(level))
        .set_max_row_group_row_count(Some(settings.roll_rows.min(1 << 20)))
        .set_created_by(format!("fleetgate {}", env!("CARGO_PKG_VERSION")))
        .set_key_value_metadata(Some(
            settings
                .metadata
                .iter()
                .map(|(k, v)| KeyValue::new(k.clone(), v.clone()))
                .collect(),
        ))
        .build();
    let name = format!("writer-{}", settings.table);
    let mut writer = TableWriter {
        settings,
        properties,
        open: HashMap::new(),
        next_file: 0,
        listener,
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
            match rx.recv_timeout(tick) {
                Ok(first) => {
                    self.append(first);
                    while let Ok(next) = rx.try_recv() {
                        self.append(next);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            self.commit_aged();
        }
        let all: Vec<PartitionKey> = self.open.keys().copied().collect();
        for key in all {
            self.commit(key);
        }
    }

    fn append(&mut self, TableBatch { partition, batch }: TableBatch) {
        let rows = batch.num_rows();
        if rows == 0 {
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
                    self.listener.failed(&e, rows);
                    return;
                }
            }
        }
        let Some(file) = self.open.get_mut(&partition) else {
            return;
        };
        if let Err(e) = file.writer.write(&batch) {
            let lost = file.rows + rows;
            self.abandon(partition);
            self.listener.failed(&e.into(), lost);
            return;
        }
        file.rows += rows;
        let bytes = file.writer.bytes_written() + file.writer.in_progress_size();
        if file.rows >= self.settings.roll_rows || bytes >= self.settings.roll_bytes {
            self.commit(partition);
        }
    }

    fn open_file(&mut self, partition: PartitionKey) -> Result<OpenFile> {
        let dir = self.settings.dir.join(partition.relative_dir());
        if !dir.exists() {
            fs::create_dir_all(&dir).map_err(io_error(&dir))?;
            // Make the new directory entries durable up to the table directory.
            let mut d = dir.as_path();
            while let Some(parent) = d.parent() {
                sync_dir(parent)?;
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
        let file = File::create(&in_progress).map_err(io_error(&in_progress))?;
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
        let rows = file.rows;
        let in_progress = file.in_progress.clone();
        match finish(file) {
            Ok(commit) => self.listener.committed(&commit),
            Err(e) => {
                let _ = fs::remove_file(&in_progress);
                self.listener.failed(&e, rows);
            }
        }
    }

    fn abandon(&mut self, partition: PartitionKey) {
        if let Some(file) = self.open.remove(&partition) {
            let _ = fs::remove_file(&file.in_progress);
        }
    }
}

/// Writes the footer, fsyncs, renames into place and fsyncs the directory.
fn finish(file: OpenFile) -> Result<Commit> {
    let OpenFile {
        writer,
        in_progress,
        committed,
        rows,
        ..
    } = file;
    let file = writer.into_inner()?;
    file.sync_all().map_err(io_error(&in_progress))?;
    let bytes = file.metadata().map_err(io_error(&in_progress))?.len();
    drop(file);
    fs::rename(&in_progress, &committed).map_err(io_error(&committed))?;
    if let Some(dir) = committed.parent() {
        sync_dir(dir)?;
    }
    Ok(Commit { rows, bytes })
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error(dir))
}
