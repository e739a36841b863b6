//! The write-ahead log: every batch a worker builds is appended here, and
//! group-committed with fsync, before a table writer may rely on it.
//!
//! Each worker shard owns its log (`<wal_dir>/shard-<i>/`), so appends take no
//! lock. The log holds what the store will hold, after pseudonymisation, never
//! a raw identifier. A segment is a header (magic, creation time) and frames:
//!
//! ```text
//! len u32 LE | crc32 u32 LE (of body) | body: seq u64 | table u8 | days i32 | hour u8 | lz4(Arrow IPC stream)
//! ```
//!
//! The body is an LZ4 block with its length before it. LZ4 costs a fraction
//! of zstd's CPU on a frame of a few dozen rows, and the log is short-lived,
//! so the bytes it saves do not matter. Segments written before (magic
//! `FGWAL001`) hold zstd bodies and are still read.
//!
//! Each commit to a Delta table records, per shard, the last entry it holds
//! (see [`crate::store::delta`]); recovery replays every entry no commit
//! holds, so replay is idempotent. A segment is deleted only when every
//! entry in it is committed: [`Tracker`] knows which are still pending.
//! A torn or corrupt tail of the newest segment is cut off with a warning
//! naming the offset; corruption anywhere else stops start-up unless
//! `wal.skip_corrupt` is set.
//!
//! In a cluster each group commit is also copied to the shared store before
//! it counts as durable ([`copies`]).

pub mod copies;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use arrow::error::ArrowError;
use arrow::ipc::reader::StreamReader;
use arrow::ipc::writer::{
    DictionaryTracker, IpcDataGenerator, IpcWriteContext, IpcWriteOptions, StreamWriter,
    write_message,
};

use crate::core::fence::Fence;
use crate::core::fsio;
use crate::core::table::{PartitionKey, Table};
use copies::{Copies, KeptCopy};

const MAGIC: &[u8; 8] = b"FGWAL002";
/// Segments and copies of the releases that compressed bodies with zstd.
const MAGIC_ZSTD: &[u8; 8] = b"FGWAL001";
const HEADER_BYTES: usize = 16;
const FRAME_HEADER_BYTES: usize = 8;
const BODY_HEADER_BYTES: usize = 8 + 1 + 4 + 1;
/// Largest frame accepted when reading: anything larger is corruption.
const MAX_FRAME_BYTES: usize = 1 << 30;

/// How the bodies of a segment are compressed, from its magic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Codec {
    Lz4,
    /// Read only: segments left by an older release.
    Zstd,
}

impl Codec {
    fn of_segment(bytes: &[u8]) -> Option<Self> {
        match bytes.get(..MAGIC.len())? {
            m if m == MAGIC => Some(Self::Lz4),
            m if m == MAGIC_ZSTD => Some(Self::Zstd),
            _ => None,
        }
    }

    fn decompress(self, compressed: &[u8]) -> std::result::Result<Vec<u8>, String> {
        match self {
            Self::Lz4 => {
                let (size, block) =
                    lz4_flex::block::uncompressed_size(compressed).map_err(|e| e.to_string())?;
                // LZ4 expands at most 255-fold: a larger claim is corruption,
                // and must not become an allocation.
                if size > block.len().saturating_mul(255) {
                    return Err(format!(
                        "LZ4 block claims {size} bytes from {}",
                        block.len()
                    ));
                }
                lz4_flex::block::decompress(block, size).map_err(|e| e.to_string())
            }
            Self::Zstd => zstd::stream::decode_all(compressed).map_err(|e| e.to_string()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WalError {
    #[error("WAL {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "WAL {path} is corrupt at offset {offset}: {reason} (set wal.skip_corrupt = true to skip the rest of that segment)"
    )]
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
    #[error("WAL entry encoding: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
    #[error("the WAL tracker's lock is poisoned: no segment is deleted until restart")]
    TrackerPoisoned,
    #[error(
        "WAL {path} holds entries written as node {recorded:?}, and this start is node \
         {configured:?}: they would be stored again under the new name. Start once more as \
         {recorded:?} and stop cleanly (which stores everything the WAL holds), then change \
         cluster.node_id"
    )]
    OtherNode {
        path: PathBuf,
        recorded: String,
        configured: String,
    },
    #[error("WAL copy in the store ({key}): {source}")]
    Copy { key: String, source: std::io::Error },
    #[error(
        "WAL copy in the store ({key}) is damaged: {reason} (set wal.skip_corrupt = true to \
         leave it out)"
    )]
    CopyCorrupt { key: String, reason: String },
}

pub type Result<T, E = WalError> = std::result::Result<T, E>;

/// The file in the WAL directory naming the node (`cluster.node_id`) its
/// entries were written as; absent: the unnamed node of a single server.
const NODE_FILE: &str = "node-id";

/// Claims the WAL directory `dir` for `node`. The tables record how far
/// they hold each shard under the node's name, so entries written as one
/// node and replayed as another would all look unstored: refused while
/// `recovered` holds any entry and the name differs.
pub fn claim_for_node(dir: &Path, node: &str, recovered: &Recovered) -> Result<()> {
    let path = dir.join(NODE_FILE);
    let recorded = match fs::read_to_string(&path) {
        Ok(text) => text.trim().to_owned(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(io_err(&path)(e)),
    };
    if recorded == node {
        return Ok(());
    }
    if recovered.entry_count() > 0 {
        return Err(WalError::OtherNode {
            path: dir.to_owned(),
            recorded,
            configured: node.to_owned(),
        });
    }
    fsio::create_dir_all(dir).map_err(io_err(dir))?;
    fsio::replace(&path, node.as_bytes()).map_err(io_err(&path))
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> WalError + '_ {
    move |source| WalError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Names one WAL entry: the shard that wrote it and its sequence number there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EntryId {
    pub shard: u16,
    pub seq: u64,
}

/// One batch of rows of one table partition, as logged.
#[derive(Debug, Clone)]
pub struct Entry {
    pub id: EntryId,
    pub table: Table,
    pub partition: PartitionKey,
    pub batch: RecordBatch,
}

/// Settings of the log, from `[wal]`.
#[derive(Debug, Clone)]
pub struct WalSettings {
    pub dir: PathBuf,
    pub segment_bytes: u64,
    pub fsync_interval: Duration,
    pub fsync_bytes: usize,
    /// See [`ShardWal::rotate_if_old`].
    pub max_segment_age: Duration,
    /// In a cluster: where each group commit is copied before it counts as
    /// durable ([`copies`]).
    pub copies: Option<Copies>,
    /// In a cluster: no copy is written, so nothing is acknowledged, while
    /// the node may not act under its name (another may be storing its WAL).
    pub fence: Option<Arc<dyn Fence>>,
}

/// Which entries are appended but not yet in a committed Parquet file, per shard.
#[derive(Debug, Default)]
pub struct Tracker {
    pending: Mutex<HashMap<u16, BTreeSet<u64>>>,
}

impl Tracker {
    /// Marks an entry as appended; call before handing its batch to a writer.
    pub fn register(&self, id: EntryId) {
        if let Ok(mut p) = self.pending.lock() {
            p.entry(id.shard).or_default().insert(id.seq);
        }
    }

    /// Marks entries as held by a committed, fsync'd Parquet file.
    pub fn covered(&self, ids: &[EntryId]) {
        if let Ok(mut p) = self.pending.lock() {
            for id in ids {
                if let Some(set) = p.get_mut(&id.shard) {
                    set.remove(&id.seq);
                }
            }
        }
    }

    /// The lowest pending sequence number of a shard (`None`: none pending).
    /// Fails closed: once a thread panicked holding the lock, nobody knows
    /// which entries are pending, and the answer is an error, never `None`.
    pub fn lowest_pending(&self, shard: u16) -> Result<Option<u64>> {
        self.pending
            .lock()
            .map(|p| p.get(&shard).and_then(|s| s.first().copied()))
            .map_err(|_| WalError::TrackerPoisoned)
    }

    /// Number of entries still pending, over all shards.
    pub fn pending_count(&self) -> usize {
        self.pending
            .lock()
            .map_or(0, |p| p.values().map(BTreeSet::len).sum())
    }
}

/// A sealed segment: no more appends, deleted once every entry is covered.
#[derive(Debug, Clone)]
struct Segment {
    path: PathBuf,
    last_seq: Option<u64>,
}

/// The log of one worker shard.
pub struct ShardWal {
    shard: u16,
    dir: PathBuf,
    settings: WalSettings,
    tracker: Arc<Tracker>,
    sealed: Vec<Segment>,
    active: File,
    active_path: PathBuf,
    active_created: Instant,
    active_last_seq: Option<u64>,
    /// Bytes of complete frames in the active segment, header included.
    active_len: u64,
    next_seq: u64,
    unsynced_bytes: usize,
    first_unsynced: Option<Instant>,
    /// A write or fsync of the active segment failed and no new segment
    /// could be started yet: the next append starts one first, since the
    /// failed file's page cache cannot be trusted.
    retired: bool,
    /// In a cluster: the copies of this shard's group commits.
    copies: Option<ShardCopies>,
    ipc: IpcFrames,
}

/// The end of an Arrow IPC stream: the continuation marker and a zero length.
const IPC_END_OF_STREAM: [u8; 8] = [0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0, 0];

/// Writes the Arrow IPC stream of each frame: the table's schema message,
/// the batch, the end marker. A table's schema message is encoded once and
/// copied into each of its frames (encoding it anew cost more than the
/// batch of a few dozen rows); the bytes are those of a `StreamWriter`.
#[derive(Default)]
struct IpcFrames {
    /// Per table, the schema last seen and its encoded message; `None` for
    /// a schema with dictionaries, whose frames a `StreamWriter` writes.
    schemas: HashMap<Table, (SchemaRef, Option<Vec<u8>>)>,
    context: IpcWriteContext,
}

impl IpcFrames {
    fn stream(&mut self, table: Table, batch: &RecordBatch) -> Result<Vec<u8>, ArrowError> {
        let schema = batch.schema();
        let options = IpcWriteOptions::default();
        let known = matches!(
            self.schemas.get(&table),
            Some((seen, _)) if Arc::ptr_eq(seen, &schema) || seen == &schema
        );
        if !known {
            let mut dictionaries = DictionaryTracker::new(false);
            let encoded = IpcDataGenerator::default().schema_to_bytes_with_dictionary_tracker(
                &schema,
                &mut dictionaries,
                &options,
            );
            let message = match dictionaries.dict_id().is_empty() {
                true => {
                    let mut bytes = Vec::new();
                    write_message(&mut bytes, encoded, &options)?;
                    Some(bytes)
                }
                false => None,
            };
            self.schemas.insert(table, (Arc::clone(&schema), message));
        }
        let Some((_, Some(schema_message))) = self.schemas.get(&table) else {
            let mut ipc = Vec::new();
            let mut writer = StreamWriter::try_new(&mut ipc, &schema)?;
            writer.write(batch)?;
            writer.finish()?;
            drop(writer);
            return Ok(ipc);
        };
        let mut ipc = schema_message.clone();
        let (_, encoded) = IpcDataGenerator::default().encode(
            batch,
            &mut DictionaryTracker::new(false),
            &options,
            &mut self.context,
        )?;
        write_message(&mut ipc, encoded, &options)?;
        ipc.extend_from_slice(&IPC_END_OF_STREAM);
        Ok(ipc)
    }
}

/// The copies of one shard's group commits: the frames appended since the
/// last copy, and the copies written (or tried) and not yet deleted.
struct ShardCopies {
    copies: Copies,
    frames: Vec<u8>,
    first_seq: Option<u64>,
    kept: Vec<KeptCopy>,
    /// After a failed copy: not tried again before this.
    retry_at: Option<Instant>,
    retry_delay: Duration,
}

/// The first wait before a failed copy is tried again; it doubles up to the most.
const COPY_RETRY_FIRST: Duration = Duration::from_millis(100);
const COPY_RETRY_MAX: Duration = Duration::from_secs(5);

/// What a sync made durable, for the caller's measurements.
#[derive(Debug, Clone, Copy)]
pub struct Synced {
    pub bytes: usize,
    /// The fsync and, in a cluster, the copy.
    pub took: Duration,
    /// The copy to the store alone, when there is one.
    pub copy_took: Option<Duration>,
    /// Entries are still not durable as promised (their copy is due): the
    /// fsync happened, the acknowledgement waits.
    pub pending: bool,
}

impl ShardWal {
    /// Opens shard `shard`'s log, continuing after what recovery found, in a new segment.
    pub fn open(
        settings: &WalSettings,
        shard: u16,
        recovered: Option<&RecoveredShard>,
        tracker: Arc<Tracker>,
    ) -> Result<Self> {
        let dir = shard_dir(&settings.dir, shard);
        fsio::create_dir_all(&dir).map_err(io_err(&dir))?;
        let sealed = recovered.map(|r| r.segments.clone()).unwrap_or_default();
        let next_seq = recovered.map_or(0, |r| r.next_seq);
        let (active, active_path) = new_segment(&dir, next_seq)?;
        Ok(Self {
            shard,
            dir,
            settings: settings.clone(),
            tracker,
            sealed,
            active,
            active_path,
            active_created: Instant::now(),
            active_last_seq: None,
            active_len: HEADER_BYTES as u64,
            next_seq,
            unsynced_bytes: 0,
            first_unsynced: None,
            retired: false,
            copies: settings.copies.clone().map(|copies| ShardCopies {
                copies,
                frames: Vec::new(),
                first_seq: None,
                kept: recovered.map(|r| r.copies.clone()).unwrap_or_default(),
                retry_at: None,
                retry_delay: COPY_RETRY_FIRST,
            }),
            ipc: IpcFrames::default(),
        })
    }

    /// Appends one batch and registers it as pending. Written with one
    /// `write` call; on failure the segment is cut back to its last complete
    /// frame and a fresh segment is started, so no torn frame stays behind.
    pub fn append(
        &mut self,
        table: Table,
        partition: PartitionKey,
        batch: &RecordBatch,
    ) -> Result<EntryId> {
        let id = EntryId {
            shard: self.shard,
            seq: self.next_seq,
        };
        let ipc = self.ipc.stream(table, batch)?;
        let frame = encode_frame(id.seq, table, partition, &ipc);
        if self.retired {
            self.rotate()?;
            self.retired = false;
        }
        if let Err(e) = self.active.write_all(&frame) {
            self.recover_from_write_error();
            return Err(io_err(&self.active_path)(e));
        }
        if let Some(copies) = &mut self.copies {
            copies.frames.extend_from_slice(&frame);
            copies.first_seq.get_or_insert(id.seq);
        }
        self.next_seq += 1;
        self.active_len += frame.len() as u64;
        self.active_last_seq = Some(id.seq);
        self.unsynced_bytes += frame.len();
        self.first_unsynced.get_or_insert_with(Instant::now);
        self.tracker.register(id);
        Ok(id)
    }

    /// Whether unsynced appends have waited `fsync_interval` or reached `fsync_bytes`.
    pub fn sync_due(&self) -> bool {
        self.unsynced_bytes >= self.settings.fsync_bytes
            || self
                .first_unsynced
                .is_some_and(|t| t.elapsed() >= self.settings.fsync_interval)
            || self.copy_pending()
    }

    /// Whether appended entries are not yet durable as promised: not
    /// fsync'd, or (in a cluster) not yet copied to the store, or the node
    /// may not act under its name just now (then nothing is acknowledged,
    /// copies or not).
    pub fn has_unsynced(&self) -> bool {
        self.first_unsynced.is_some() || self.copy_pending() || self.fenced()
    }

    /// Bytes of entries waiting for their copy to the store.
    pub fn copy_backlog_bytes(&self) -> usize {
        self.copies.as_ref().map_or(0, |c| c.frames.len())
    }

    fn fenced(&self) -> bool {
        self.settings.fence.as_ref().is_some_and(|f| !f.holds())
    }

    fn copy_pending(&self) -> bool {
        self.copies.as_ref().is_some_and(|c| c.first_seq.is_some())
    }

    /// How long until a sync is due, for the worker's wait.
    pub fn until_sync_due(&self) -> Duration {
        self.first_unsynced
            .map_or(self.settings.fsync_interval, |t| {
                self.settings.fsync_interval.saturating_sub(t.elapsed())
            })
    }

    /// fsyncs the active segment (group commit), copies the entries not
    /// yet copied to the store (in a cluster), then rotates the segment if
    /// it is full.
    ///
    /// After a failed fsync the entries since the last good one are not
    /// durable here and never will be (the segment is closed, nothing is
    /// synced again on it): they no longer count as unsynced, and the
    /// caller vouches for them otherwise (the worker waits for the tables).
    ///
    /// A copy is made whatever the fsync did, and one that fails (or may
    /// not be made: the node's fence does not hold) stays due, with all
    /// that is appended meanwhile, and is tried again after a back-off: the
    /// copies of a shard never skip an entry, so whoever stores them can
    /// trust that they hold every entry up to their last. Until it is made,
    /// [`Self::has_unsynced`] stays true.
    pub fn sync(&mut self) -> Result<Option<Synced>> {
        if !self.has_unsynced() {
            return Ok(None);
        }
        if self.first_unsynced.is_none() && !self.copy_pending() {
            // Fenced with nothing appended: nothing to do.
            return Ok(None);
        }
        let fsyncing = self.first_unsynced.is_some();
        let start = Instant::now();
        let fsynced = match fsyncing {
            true => self.active.sync_data(),
            false => Ok(()),
        };
        let bytes = std::mem::take(&mut self.unsynced_bytes);
        self.first_unsynced = None;
        let copied = self.copy_unsynced();
        if let Err(e) = fsynced {
            // After a failed fsync the page cache cannot be trusted: never
            // append to this file again.
            self.retire_active();
            return Err(io_err(&self.active_path)(e));
        }
        let copy_took = copied?;
        if !fsyncing && copy_took.is_none() {
            // A copy still due (back-off, or fenced): nothing happened.
            return Ok(None);
        }
        let synced = Synced {
            bytes,
            took: start.elapsed(),
            copy_took,
            pending: self.has_unsynced(),
        };
        if self.active_len >= self.settings.segment_bytes {
            self.rotate()?;
        }
        Ok(Some(synced))
    }

    /// Writes every entry not yet copied to the store as one copy, when
    /// this log keeps copies, its fence holds and no back-off runs; returns
    /// how long that took.
    fn copy_unsynced(&mut self) -> Result<Option<Duration>> {
        let Some(copies) = &mut self.copies else {
            return Ok(None);
        };
        let (Some(first), Some(last)) = (copies.first_seq, self.next_seq.checked_sub(1)) else {
            return Ok(None);
        };
        let fence = self.settings.fence.as_ref();
        let epoch = fence.map(|f| f.epoch());
        let fenced = fence.is_some_and(|f| !f.holds());
        if fenced || copies.retry_at.is_some_and(|at| Instant::now() < at) {
            return Ok(None);
        }
        let start = Instant::now();
        let (kept, written) = copies.copies.put(self.shard, first, last, &copies.frames);
        // Kept even when the write failed: it may have landed all the same
        // (an answer lost), and deleting a copy that is not there is no error.
        copies.kept.push(kept);
        if let Err(e) = written {
            copies.retry_at = Some(Instant::now() + copies.retry_delay);
            copies.retry_delay = (copies.retry_delay * 2).min(COPY_RETRY_MAX);
            return Err(e);
        }
        // A write that took so long that the node lost its name meanwhile
        // (another may have acted for it) does not count: made again later.
        if fence.is_some_and(|f| !f.holds() || Some(f.epoch()) != epoch) {
            return Ok(None);
        }
        copies.retry_at = None;
        copies.retry_delay = COPY_RETRY_FIRST;
        copies.frames.clear();
        copies.first_seq = None;
        Ok(Some(start.elapsed()))
    }

    /// Seals the active segment once it is `max_segment_age` old, holds an
    /// entry and is fully synced, so that [`Self::truncate_covered`] can
    /// delete it once its entries are in Parquet: at any traffic, a row
    /// stays in the log not much longer than that.
    pub fn rotate_if_old(&mut self) -> Result<()> {
        if self.active_last_seq.is_some()
            && self.first_unsynced.is_none()
            && self.active_created.elapsed() >= self.settings.max_segment_age
        {
            self.rotate()?;
        }
        Ok(())
    }

    /// Deletes sealed segments whose every entry is in a committed file.
    pub fn truncate_covered(&mut self) -> Result<usize> {
        let watermark = self
            .tracker
            .lowest_pending(self.shard)?
            .unwrap_or(self.next_seq);
        let mut removed = 0;
        while let Some(segment) = self.sealed.first() {
            if segment.last_seq.is_some_and(|last| last >= watermark) {
                break;
            }
            fs::remove_file(&segment.path).map_err(io_err(&segment.path))?;
            self.sealed.remove(0);
            removed += 1;
        }
        if removed > 0 {
            sync_dir(&self.dir)?;
        }
        if let Some(copies) = &mut self.copies {
            let covered = copies
                .kept
                .iter()
                .take_while(|c| c.last_seq < watermark)
                .count();
            if covered > 0 {
                copies.copies.delete(&copies.kept[..covered])?;
                copies.kept.drain(..covered);
            }
        }
        Ok(removed)
    }

    /// The sequence number of the last entry appended, if any.
    pub fn last_seq(&self) -> Option<u64> {
        self.next_seq.checked_sub(1)
    }

    /// Whether every entry of this shard up to `seq` is in a committed
    /// Parquet file.
    pub fn covered_through(&self, seq: u64) -> Result<bool> {
        Ok(self
            .tracker
            .lowest_pending(self.shard)?
            .is_none_or(|lowest| lowest > seq))
    }

    /// Seals the active segment and deletes every covered one, so a clean
    /// shutdown leaves no entry in the log: only the fresh, empty segment
    /// rotate() opened, whose name carries the numbering on to the next run.
    /// Entry ids are never reused, so that a footer of an earlier run is
    /// never taken for an entry of a later one.
    pub fn close(mut self) -> Result<()> {
        self.sync()?;
        self.rotate()?;
        self.truncate_covered()?;
        Ok(())
    }

    fn rotate(&mut self) -> Result<()> {
        let (file, path) = new_segment(&self.dir, self.next_seq)?;
        let old = std::mem::replace(&mut self.active_path, path);
        self.active = file;
        self.active_created = Instant::now();
        self.sealed.push(Segment {
            path: old,
            last_seq: self.active_last_seq.take(),
        });
        self.active_len = HEADER_BYTES as u64;
        Ok(())
    }

    fn recover_from_write_error(&mut self) {
        let _ = self.active.set_len(self.active_len);
        self.retire_active();
    }

    /// Starts a new segment now if it can, or else before the next append.
    fn retire_active(&mut self) {
        self.retired = self.rotate().is_err();
    }
}

fn shard_dir(wal_dir: &Path, shard: u16) -> PathBuf {
    wal_dir.join(format!("shard-{shard:03}"))
}

fn new_segment(dir: &Path, first_seq: u64) -> Result<(File, PathBuf)> {
    // A second segment starting at the same sequence (nothing appended in
    // between) gets a suffix so names stay unique and ordered.
    let mut n = 0;
    let path = loop {
        let p = dir.join(format!("{first_seq:020}-{n:03}.wal"));
        if !p.exists() {
            break p;
        }
        n += 1;
    };
    let mut file = fsio::private_options()
        .create_new(true)
        .write(true)
        .open(&path)
        .map_err(io_err(&path))?;
    let mut header = [0u8; HEADER_BYTES];
    header[..8].copy_from_slice(MAGIC);
    header[8..].copy_from_slice(&crate::core::clock::now_ms().to_le_bytes());
    file.write_all(&header).map_err(io_err(&path))?;
    file.sync_all().map_err(io_err(&path))?;
    sync_dir(dir)?;
    Ok((file, path))
}

fn sync_dir(dir: &Path) -> Result<()> {
    fsio::sync_dir(dir).map_err(io_err(dir))
}

/// A frame around `ipc`, the Arrow IPC stream of one entry's batch.
fn encode_frame(seq: u64, table: Table, partition: PartitionKey, ipc: &[u8]) -> Vec<u8> {
    let compressed = lz4_flex::block::compress_prepend_size(ipc);
    let (days, hour) = partition.to_parts();
    let mut body = Vec::with_capacity(BODY_HEADER_BYTES + compressed.len());
    body.extend_from_slice(&seq.to_le_bytes());
    body.push(table.index() as u8);
    body.extend_from_slice(&days.to_le_bytes());
    body.push(hour);
    body.extend_from_slice(&compressed);
    let mut frame = Vec::with_capacity(FRAME_HEADER_BYTES + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
    frame.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    frame.extend_from_slice(&body);
    frame
}

fn decode_body(
    body: &[u8],
    codec: Codec,
) -> std::result::Result<(u64, Table, PartitionKey, RecordBatch), String> {
    if body.len() < BODY_HEADER_BYTES {
        return Err("frame body too short".into());
    }
    let seq = u64::from_le_bytes(body[0..8].try_into().map_err(|_| "seq")?);
    let table = Table::from_index(body[8].into()).ok_or("unknown table")?;
    let days = i32::from_le_bytes(body[9..13].try_into().map_err(|_| "days")?);
    let partition = PartitionKey::from_parts(days, body[13]).ok_or("bad partition")?;
    let ipc = codec.decompress(&body[BODY_HEADER_BYTES..])?;
    let mut reader = StreamReader::try_new(ipc.as_slice(), None).map_err(|e| e.to_string())?;
    let batch = reader
        .next()
        .ok_or("no batch in entry")?
        .map_err(|e| e.to_string())?;
    Ok((seq, table, partition, batch))
}

/// What recovery found in one shard's directory.
#[derive(Debug, Default)]
pub struct RecoveredShard {
    pub entries: Vec<Entry>,
    segments: Vec<Segment>,
    /// Copies of the entries in the store, not yet deleted (in a cluster).
    copies: Vec<KeptCopy>,
    pub next_seq: u64,
    /// Creation time of the oldest segment holding an entry, in ms since the epoch.
    pub oldest_ms: Option<i64>,
}

/// Everything in the WAL directory, per shard.
#[derive(Debug, Default)]
pub struct Recovered {
    pub shards: BTreeMap<u16, RecoveredShard>,
}

impl Recovered {
    pub fn entry_count(&self) -> usize {
        self.shards.values().map(|s| s.entries.len()).sum()
    }

    pub fn oldest_ms(&self) -> Option<i64> {
        self.shards.values().filter_map(|s| s.oldest_ms).min()
    }
}

/// Reads every segment of every shard. Cuts a torn or corrupt tail off the
/// newest segment of a shard (logged with its offset); any other corruption
/// is an error unless `skip_corrupt`, in which case the rest of that segment
/// is skipped with an error logged.
pub fn recover(wal_dir: &Path, skip_corrupt: bool) -> Result<Recovered> {
    read_dir(wal_dir, Mode::Recover { skip_corrupt })
}

/// Reads every complete entry without changing anything, stopping at the
/// first bad frame of a segment: for looking at the log of a running server.
pub fn inspect(wal_dir: &Path) -> Result<Recovered> {
    read_dir(wal_dir, Mode::Inspect)
}

/// Whether any segment under `wal_dir` holds an entry (more than its
/// header), without reading one: a clean stop leaves none, a crash before
/// the tables had every entry leaves some. Entries already in their tables
/// but not truncated yet count too.
pub fn holds_entries(wal_dir: &Path) -> Result<bool> {
    let Ok(shard_dirs) = fs::read_dir(wal_dir) else {
        return Ok(false);
    };
    for shard_dir in shard_dirs {
        let shard_dir = shard_dir.map_err(io_err(wal_dir))?.path();
        let Ok(segments) = fs::read_dir(&shard_dir) else {
            continue;
        };
        for segment in segments {
            let path = segment.map_err(io_err(&shard_dir))?.path();
            if path.extension().is_some_and(|e| e == "wal")
                && fs::metadata(&path).map_err(io_err(&path))?.len() > HEADER_BYTES as u64
            {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

#[derive(Debug, Clone, Copy)]
enum Mode {
    Recover { skip_corrupt: bool },
    Inspect,
}

fn read_dir(wal_dir: &Path, mode: Mode) -> Result<Recovered> {
    let mut recovered = Recovered::default();
    let Ok(shard_dirs) = fs::read_dir(wal_dir) else {
        return Ok(recovered);
    };
    for entry in shard_dirs {
        let path = entry.map_err(io_err(wal_dir))?.path();
        let Some(shard) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("shard-"))
            .and_then(|n| n.parse::<u16>().ok())
        else {
            continue;
        };
        recovered
            .shards
            .insert(shard, recover_shard(&path, shard, mode)?);
    }
    Ok(recovered)
}

fn recover_shard(dir: &Path, shard: u16, mode: Mode) -> Result<RecoveredShard> {
    let mut paths: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(io_err(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "wal"))
        .collect();
    paths.sort();
    let mut out = RecoveredShard::default();
    for (i, path) in paths.iter().enumerate() {
        let newest = i + 1 == paths.len();
        // The name carries the numbering on, even through a segment that
        // holds nothing (what a clean stop leaves).
        if let Some(first_seq) = segment_first_seq(path) {
            out.next_seq = out.next_seq.max(first_seq);
        }
        let (created_ms, entries) = read_segment(path, shard, newest, mode)?;
        if let Some(ms) = created_ms.filter(|_| !entries.is_empty()) {
            out.oldest_ms = Some(out.oldest_ms.map_or(ms, |o: i64| o.min(ms)));
        }
        let last_seq = entries.last().map(|e| e.id.seq);
        if let Some(last) = last_seq {
            out.next_seq = out.next_seq.max(last + 1);
        }
        out.entries.extend(entries);
        out.segments.push(Segment {
            path: path.clone(),
            last_seq,
        });
    }
    Ok(out)
}

/// The first sequence number a segment was opened with, from its name.
fn segment_first_seq(path: &Path) -> Option<u64> {
    path.file_stem()?.to_str()?.split('-').next()?.parse().ok()
}

/// Reads one segment: (creation time, entries).
fn read_segment(
    path: &Path,
    shard: u16,
    newest: bool,
    mode: Mode,
) -> Result<(Option<i64>, Vec<Entry>)> {
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(io_err(path))?;
    if bytes.len() < HEADER_BYTES {
        if matches!(mode, Mode::Inspect) {
            return Ok((None, Vec::new()));
        }
        // A crash while the header was written: nothing was ever appended.
        tracing::warn!(path = %path.display(), "WAL segment without a complete header; removing it");
        fs::remove_file(path).map_err(io_err(path))?;
        return Ok((None, Vec::new()));
    }
    let Some(codec) = Codec::of_segment(&bytes) else {
        return Err(WalError::Corrupt {
            path: path.to_owned(),
            offset: 0,
            reason: "not a fleetgate WAL segment of this release or an older one".into(),
        });
    };
    let created_ms = i64::from_le_bytes(bytes[8..16].try_into().unwrap_or_default());
    let mut entries = Vec::new();
    let mut offset = HEADER_BYTES;
    while offset < bytes.len() {
        match read_frame(&bytes[offset..]) {
            Ok((len, body)) => match decode_body(body, codec) {
                Err(_) if matches!(mode, Mode::Inspect) => break,
                Ok((seq, table, partition, batch)) => {
                    entries.push(Entry {
                        id: EntryId { shard, seq },
                        table,
                        partition,
                        batch,
                    });
                    offset += len;
                }
                Err(reason) => {
                    return Err(WalError::Corrupt {
                        path: path.to_owned(),
                        offset: offset as u64,
                        reason: format!("checksum matches but the entry does not decode: {reason}"),
                    });
                }
            },
            Err(_) if matches!(mode, Mode::Inspect) => break,
            Err(reason) => {
                let skip_corrupt = matches!(mode, Mode::Recover { skip_corrupt: true });
                let torn_tail = newest && is_tail(&bytes[offset..]);
                if torn_tail {
                    tracing::warn!(path = %path.display(), offset, %reason, "cutting a torn WAL tail");
                    let file = OpenOptions::new()
                        .write(true)
                        .open(path)
                        .map_err(io_err(path))?;
                    file.set_len(offset as u64).map_err(io_err(path))?;
                    file.sync_all().map_err(io_err(path))?;
                } else if skip_corrupt {
                    tracing::error!(path = %path.display(), offset, %reason, "skipping the rest of a corrupt WAL segment");
                } else {
                    return Err(WalError::Corrupt {
                        path: path.to_owned(),
                        offset: offset as u64,
                        reason,
                    });
                }
                break;
            }
        }
    }
    Ok((Some(created_ms), entries))
}

/// A complete, checksummed frame at the start of `bytes`: (frame length, body).
fn read_frame(bytes: &[u8]) -> std::result::Result<(usize, &[u8]), String> {
    if bytes.len() < FRAME_HEADER_BYTES {
        return Err("incomplete frame header".into());
    }
    let len = u32::from_le_bytes(bytes[0..4].try_into().map_err(|_| "len")?) as usize;
    let crc = u32::from_le_bytes(bytes[4..8].try_into().map_err(|_| "crc")?);
    if len < BODY_HEADER_BYTES {
        return Err(format!("frame of {len} bytes is too short"));
    }
    if len > MAX_FRAME_BYTES || FRAME_HEADER_BYTES + len > bytes.len() {
        return Err(format!(
            "frame of {len} bytes runs past the end of the segment"
        ));
    }
    let body = &bytes[FRAME_HEADER_BYTES..FRAME_HEADER_BYTES + len];
    if crc32fast::hash(body) != crc {
        return Err("checksum mismatch".into());
    }
    Ok((FRAME_HEADER_BYTES + len, body))
}

/// Whether a bad frame is the torn end of the log rather than damage in its
/// middle: nothing after it parses as a frame.
fn is_tail(rest: &[u8]) -> bool {
    (1..rest.len()).all(|start| read_frame(&rest[start..]).is_err())
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};

    fn settings(dir: &Path, segment_bytes: u64) -> WalSettings {
        WalSettings {
            dir: dir.to_owned(),
            segment_bytes,
            fsync_interval: Duration::from_millis(5),
            fsync_bytes: 1 << 20,
            max_segment_age: Duration::from_secs(3600),
            copies: None,
            fence: None,
        }
    }

    /// Appends `batch(n)` to `wal` as dead letters of the test's hour.
    fn append_dead_letters(wal: &mut ShardWal, n: i64) -> EntryId {
        wal.append(
            Table::DeadLetters,
            PartitionKey::from_millis(PARTITION_MS),
            &batch(n),
        )
        .expect("append")
    }

    fn batch(n: i64) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("seq", DataType::Int64, false),
            Field::new("vehicle_id", DataType::Utf8, false),
        ]));
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(Int64Array::from(vec![n, n + 1])),
                Arc::new(StringArray::from(vec!["a", "b"])),
            ],
        )
        .expect("batch")
    }

    const PARTITION_MS: i64 = 1_795_506_305_000;

    /// Appends `n` batches and syncs; returns the log (not closed: a crash).
    fn write(dir: &Path, n: i64, segment_bytes: u64, tracker: Arc<Tracker>) -> ShardWal {
        let mut wal =
            ShardWal::open(&settings(dir, segment_bytes), 0, None, tracker).expect("open");
        for i in 0..n {
            wal.append(
                Table::Stream(crate::schema::Stream::Rtti),
                PartitionKey::from_millis(PARTITION_MS),
                &batch(i * 10),
            )
            .expect("append");
        }
        wal.sync().expect("sync");
        wal
    }

    fn only_segment(dir: &Path) -> PathBuf {
        let shard = shard_dir(dir, 0);
        let mut segments: Vec<_> = fs::read_dir(&shard)
            .expect("shard dir")
            .map(|e| e.expect("entry").path())
            .collect();
        segments.sort();
        segments.remove(0)
    }

    #[test]
    fn entries_survive_a_crash_with_their_content() {
        let dir = tempfile::tempdir().expect("tempdir");
        drop(write(dir.path(), 3, 1 << 30, Arc::default()));
        let recovered = recover(dir.path(), false).expect("recover");
        let shard = &recovered.shards[&0];
        assert_eq!(shard.entries.len(), 3);
        assert_eq!(shard.next_seq, 3);
        for (i, entry) in shard.entries.iter().enumerate() {
            assert_eq!(
                entry.id,
                EntryId {
                    shard: 0,
                    seq: i as u64
                }
            );
            assert_eq!(entry.batch, batch(i as i64 * 10));
            assert_eq!(entry.partition, PartitionKey::from_millis(PARTITION_MS));
            assert_eq!(entry.table, Table::Stream(crate::schema::Stream::Rtti));
        }
    }

    /// A segment as the releases before LZ4 wrote it: `FGWAL001`, zstd bodies.
    fn as_zstd_segment(lz4_segment: &[u8]) -> Vec<u8> {
        let mut out = MAGIC_ZSTD.to_vec();
        out.extend_from_slice(&lz4_segment[MAGIC.len()..HEADER_BYTES]);
        let mut offset = HEADER_BYTES;
        while offset < lz4_segment.len() {
            let (len, body) = read_frame(&lz4_segment[offset..]).expect("frame");
            let ipc = Codec::Lz4
                .decompress(&body[BODY_HEADER_BYTES..])
                .expect("lz4");
            let mut zstd_body = body[..BODY_HEADER_BYTES].to_vec();
            zstd_body.extend_from_slice(&zstd::bulk::compress(&ipc, 1).expect("zstd"));
            out.extend_from_slice(&(zstd_body.len() as u32).to_le_bytes());
            out.extend_from_slice(&crc32fast::hash(&zstd_body).to_le_bytes());
            out.extend_from_slice(&zstd_body);
            offset += len;
        }
        out
    }

    #[test]
    fn a_segment_of_an_older_release_with_zstd_bodies_is_replayed() {
        let dir = tempfile::tempdir().expect("tempdir");
        drop(write(dir.path(), 3, 1 << 30, Arc::default()));
        let path = only_segment(dir.path());
        let old = as_zstd_segment(&fs::read(&path).expect("read"));
        fs::write(&path, old).expect("write the old segment");
        let recovered = recover(dir.path(), false).expect("recover");
        let shard = &recovered.shards[&0];
        assert_eq!(shard.entries.len(), 3);
        for (i, entry) in shard.entries.iter().enumerate() {
            assert_eq!(entry.batch, batch(i as i64 * 10));
        }
    }

    #[test]
    fn an_lz4_body_claiming_more_than_lz4_can_expand_is_corrupt_not_an_allocation() {
        let mut block = (u32::MAX).to_le_bytes().to_vec();
        block.extend_from_slice(&[0x10, b'x']);
        let error = Codec::Lz4.decompress(&block).expect_err("refused");
        assert!(error.contains("claims 4294967295 bytes"), "{error}");
    }

    #[test]
    fn a_frames_ipc_stream_is_the_bytes_a_stream_writer_writes() {
        let streamed = |batch: &RecordBatch| {
            let mut ipc = Vec::new();
            let mut writer = StreamWriter::try_new(&mut ipc, &batch.schema()).expect("writer");
            writer.write(batch).expect("write");
            writer.finish().expect("finish");
            drop(writer);
            ipc
        };
        let mut frames = IpcFrames::default();
        let table = Table::Stream(crate::schema::Stream::Rtti);
        for n in [0, 10, 20] {
            let ipc = frames.stream(table, &batch(n)).expect("ipc");
            assert_eq!(ipc, streamed(&batch(n)), "the schema message is reused");
        }
        let dictionary = RecordBatch::try_from_iter([(
            "d",
            Arc::new(
                ["a", "b", "a"]
                    .into_iter()
                    .collect::<arrow::array::DictionaryArray<arrow::datatypes::Int32Type>>(),
            ) as arrow::array::ArrayRef,
        )])
        .expect("batch");
        let ipc = frames.stream(table, &dictionary).expect("ipc");
        assert_eq!(
            ipc,
            streamed(&dictionary),
            "a new schema, with dictionaries"
        );
        let read = StreamReader::try_new(ipc.as_slice(), None)
            .expect("reader")
            .next()
            .expect("a batch")
            .expect("decoded");
        assert_eq!(read, dictionary);
    }

    #[test]
    fn a_torn_tail_is_cut_off_and_the_rest_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        drop(write(dir.path(), 2, 1 << 30, Arc::default()));
        let path = only_segment(dir.path());
        let good_len = fs::metadata(&path).expect("stat").len();
        let ipc = IpcFrames::default()
            .stream(Table::DeadLetters, &batch(0))
            .expect("ipc");
        let frame = encode_frame(
            2,
            Table::DeadLetters,
            PartitionKey::from_millis(PARTITION_MS),
            &ipc,
        );
        let mut file = OpenOptions::new().append(true).open(&path).expect("open");
        file.write_all(&frame[..frame.len() / 2])
            .expect("torn write");
        drop(file);
        let recovered = recover(dir.path(), false).expect("a torn tail is not an error");
        assert_eq!(recovered.shards[&0].entries.len(), 2);
        assert_eq!(fs::metadata(&path).expect("stat").len(), good_len);
    }

    #[test]
    fn a_bad_checksum_in_the_middle_stops_recovery_unless_skipped() {
        let dir = tempfile::tempdir().expect("tempdir");
        drop(write(dir.path(), 3, 1 << 30, Arc::default()));
        let path = only_segment(dir.path());
        let mut bytes = fs::read(&path).expect("read");
        let first_len = u32::from_le_bytes(bytes[16..20].try_into().expect("len")) as usize;
        let second = HEADER_BYTES + FRAME_HEADER_BYTES + first_len;
        bytes[second + FRAME_HEADER_BYTES + 3] ^= 0xff;
        fs::write(&path, &bytes).expect("write");
        match recover(dir.path(), false) {
            Err(WalError::Corrupt { offset, .. }) => assert_eq!(offset, second as u64),
            other => panic!("expected corruption at {second}, got {other:?}"),
        }
        let skipped = recover(dir.path(), true).expect("skip");
        assert_eq!(skipped.shards[&0].entries.len(), 1);
    }

    #[test]
    fn a_bad_checksum_at_the_end_is_a_torn_tail() {
        let dir = tempfile::tempdir().expect("tempdir");
        drop(write(dir.path(), 2, 1 << 30, Arc::default()));
        let path = only_segment(dir.path());
        let mut bytes = fs::read(&path).expect("read");
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        fs::write(&path, &bytes).expect("write");
        assert_eq!(
            recover(dir.path(), false).expect("recover").shards[&0]
                .entries
                .len(),
            1
        );
    }

    #[test]
    fn a_log_holds_entries_from_its_first_append_until_a_clean_stop() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(!holds_entries(dir.path()).expect("no log yet"));
        let tracker = Arc::new(Tracker::default());
        let mut wal =
            ShardWal::open(&settings(dir.path(), 1 << 20), 0, None, tracker.clone()).expect("open");
        assert!(!holds_entries(dir.path()).expect("an empty segment"));
        let id = append_dead_letters(&mut wal, 0);
        wal.sync().expect("sync");
        assert!(holds_entries(dir.path()).expect("an entry"));
        tracker.covered(&[id]);
        wal.close().expect("close");
        assert!(!holds_entries(dir.path()).expect("a clean stop"));
    }

    #[test]
    fn segments_are_deleted_only_once_every_entry_is_committed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tracker = Arc::new(Tracker::default());
        // A tiny segment size: every sync seals its segment.
        let mut wal =
            ShardWal::open(&settings(dir.path(), 1), 0, None, tracker.clone()).expect("open");
        let mut ids = Vec::new();
        for i in 0..2 {
            ids.push(append_dead_letters(&mut wal, i));
            wal.sync().expect("sync");
        }
        let segments = || fs::read_dir(shard_dir(dir.path(), 0)).expect("dir").count();
        assert_eq!(segments(), 3, "two sealed, one active");
        assert_eq!(wal.truncate_covered().expect("truncate"), 0);
        tracker.covered(&ids[1..]);
        assert_eq!(
            wal.truncate_covered().expect("truncate"),
            0,
            "entry 0 still pending"
        );
        tracker.covered(&ids[..1]);
        assert_eq!(wal.truncate_covered().expect("truncate"), 2);
        wal.close().expect("close");
        assert_eq!(
            segments(),
            1,
            "a closed, fully committed log keeps one empty segment"
        );
        assert_eq!(
            recover(dir.path(), false).expect("recover").entry_count(),
            0
        );
    }

    /// Ids are never reused: after a clean close, which leaves no entry,
    /// the next run numbers on, so a footer of this run cannot be taken
    /// for an entry of the next.
    #[test]
    fn numbering_continues_after_a_clean_close() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tracker = Arc::new(Tracker::default());
        let mut wal = write(dir.path(), 2, 1 << 30, tracker.clone());
        tracker.covered(&[EntryId { shard: 0, seq: 0 }, EntryId { shard: 0, seq: 1 }]);
        wal.truncate_covered().expect("truncate");
        wal.close().expect("close");
        let recovered = recover(dir.path(), false).expect("recover");
        assert_eq!(recovered.entry_count(), 0, "a clean close leaves no entry");
        assert_eq!(recovered.oldest_ms(), None, "no segment holds an entry");
        let mut wal = ShardWal::open(
            &settings(dir.path(), 1 << 30),
            0,
            recovered.shards.get(&0),
            Arc::new(Tracker::default()),
        )
        .expect("reopen");
        let id = append_dead_letters(&mut wal, 0);
        assert_eq!(id.seq, 2);
    }

    #[test]
    fn a_poisoned_tracker_keeps_every_segment() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tracker = Arc::new(Tracker::default());
        let mut wal =
            ShardWal::open(&settings(dir.path(), 1), 0, None, tracker.clone()).expect("open");
        for i in 0..2 {
            append_dead_letters(&mut wal, i);
            wal.sync().expect("sync");
        }
        // A thread that panics while holding the lock poisons it: from then
        // on nobody knows which entries are pending.
        let poisoner = tracker.clone();
        let _ = std::thread::spawn(move || {
            let _held = poisoner.pending.lock();
            panic!("poison the tracker");
        })
        .join();
        let segments = || fs::read_dir(shard_dir(dir.path(), 0)).expect("dir").count();
        assert!(wal.truncate_covered().is_err(), "truncation must refuse");
        assert_eq!(segments(), 3, "no sealed segment was deleted");
    }

    #[test]
    fn a_reopened_log_continues_its_numbering() {
        let dir = tempfile::tempdir().expect("tempdir");
        drop(write(dir.path(), 2, 1 << 30, Arc::default()));
        let recovered = recover(dir.path(), false).expect("recover");
        let tracker = Arc::new(Tracker::default());
        let mut wal = ShardWal::open(
            &settings(dir.path(), 1 << 30),
            0,
            recovered.shards.get(&0),
            tracker,
        )
        .expect("open");
        let id = append_dead_letters(&mut wal, 0);
        assert_eq!(id.seq, 2);
    }
}
