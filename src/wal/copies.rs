//! Copies of the log's group commits in the shared store, so that what a
//! cluster node acknowledged outlives the node and its disk.
//!
//! After each fsync of a shard's log, the frames that fsync made durable are
//! written once more, as one object, to
//! `<store>/_fleetgate_wal/<node>/shard-<i>/<first seq>-<last seq>.wal`
//! (a segment header, then the same frames as the segment), and only then
//! does the group commit count as done, so only then are its publishes
//! acknowledged. A copy is deleted once the tables hold every entry in it,
//! as a segment is. Whoever reads a node's copies (the node itself after
//! losing its disk, or another node once the dead one's lease lapsed)
//! replays what no table holds, under the dead node's name, so that Delta's
//! transaction identifiers still store each entry at most once.
//!
//! Where the copies are written (a directory or an object store) is the
//! store's business: [`CopyStore`].

use std::collections::BTreeSet;
use std::sync::Arc;

use super::{
    Codec, EntryId, HEADER_BYTES, MAGIC, Recovered, RecoveredShard, Result, WalError, decode_body,
    read_frame,
};
use crate::core::table::Table;

/// Where copies live: keys are `/`-separated paths below the copies' root.
pub trait CopyStore: Send + Sync {
    /// Stores `bytes` under `key`, whole and durably, before returning.
    fn put(&self, key: &str, bytes: Vec<u8>) -> std::io::Result<()>;
    /// Every key below `prefix` (a `/`-terminated path, or empty for all),
    /// with the time it was written, in ms since the epoch.
    fn list(&self, prefix: &str) -> std::io::Result<Vec<(String, i64)>>;
    fn get(&self, key: &str) -> std::io::Result<Vec<u8>>;
    /// Deletes `keys`; a key already gone is no error.
    fn delete(&self, keys: &[String]) -> std::io::Result<()>;
}

/// The copies of one node's log.
#[derive(Clone)]
pub struct Copies {
    store: Arc<dyn CopyStore>,
    node: String,
}

impl std::fmt::Debug for Copies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Copies({})", self.node)
    }
}

/// A copy written and not yet deleted: its key and last entry.
#[derive(Debug, Clone)]
pub(super) struct KeptCopy {
    pub(super) key: String,
    pub(super) last_seq: u64,
}

impl Copies {
    pub fn new(store: Arc<dyn CopyStore>, node: &str) -> Self {
        Self {
            store,
            node: node.to_owned(),
        }
    }

    /// The copies of another node, in the same store.
    pub fn of(&self, node: &str) -> Self {
        Self::new(self.store.clone(), node)
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// The nodes that have copies in the store (this one included).
    pub fn nodes(&self) -> Result<BTreeSet<String>> {
        let keys = self.store.list("").map_err(copy_err("(listing)"))?;
        Ok(keys
            .iter()
            .filter_map(|(key, _)| key.split_once('/').map(|(node, _)| node.to_owned()))
            .collect())
    }

    /// When the oldest copy of any node still in the store was written:
    /// what some node acknowledged and no table holds yet is no older.
    pub fn oldest_ms(&self) -> Result<Option<i64>> {
        let keys = self.store.list("").map_err(copy_err("(listing)"))?;
        Ok(keys.iter().map(|(_, written_ms)| *written_ms).min())
    }

    /// Writes the frames of entries `first..=last` of `shard` as one copy;
    /// returns its key whether or not the write succeeded.
    pub(super) fn put(
        &self,
        shard: u16,
        first: u64,
        last: u64,
        frames: &[u8],
    ) -> (KeptCopy, Result<()>) {
        let key = format!("{}/shard-{shard:03}/{first:020}-{last:020}.wal", self.node);
        let mut bytes = Vec::with_capacity(HEADER_BYTES + frames.len());
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&crate::core::clock::now_ms().to_le_bytes());
        bytes.extend_from_slice(frames);
        let written = self.store.put(&key, bytes).map_err(copy_err(&key));
        let kept = KeptCopy {
            key,
            last_seq: last,
        };
        (kept, written)
    }

    pub(super) fn delete(&self, copies: &[KeptCopy]) -> Result<()> {
        let keys: Vec<String> = copies.iter().map(|c| c.key.clone()).collect();
        self.store
            .delete(&keys)
            .map_err(copy_err(&format!("{}/…", self.node)))
    }

    /// Deletes the copies `recovered` was read from (once the tables hold
    /// their entries), and no copy written since.
    pub fn forget(&self, recovered: &Recovered) -> Result<()> {
        let copies: Vec<KeptCopy> = recovered
            .shards
            .values()
            .flat_map(|s| s.copies.iter().cloned())
            .collect();
        if copies.is_empty() {
            return Ok(());
        }
        self.delete(&copies)
    }

    /// Every entry of every copy of this node, per shard, in order, with
    /// the copies they came from. A copy is written whole or not at all, so
    /// any damage in one is an error, never a torn tail; with
    /// `skip_corrupt` (`wal.skip_corrupt`) a damaged copy is logged and left
    /// out instead, and kept in the store for inspection.
    pub fn read(&self, skip_corrupt: bool) -> Result<Recovered> {
        let prefix = format!("{}/", self.node);
        let mut keys: Vec<String> = self
            .store
            .list(&prefix)
            .map_err(copy_err(&self.node))?
            .into_iter()
            .map(|(key, _)| key)
            .collect();
        keys.sort();
        let mut recovered = Recovered::default();
        for key in keys {
            let Some((shard, last)) = parse_key(&key[prefix.len()..]) else {
                continue;
            };
            let bytes = self.store.get(&key).map_err(copy_err(&key))?;
            let (created_ms, entries) = match decode_copy(&bytes, shard) {
                Ok(decoded) => decoded,
                Err(reason) if skip_corrupt => {
                    tracing::error!(%key, %reason, "skipping a damaged WAL copy");
                    continue;
                }
                Err(reason) => return Err(WalError::CopyCorrupt { key, reason }),
            };
            let log = recovered.shards.entry(shard).or_default();
            log.next_seq = log.next_seq.max(last + 1);
            if !entries.is_empty() {
                log.oldest_ms = Some(log.oldest_ms.map_or(created_ms, |o| o.min(created_ms)));
            }
            log.entries.extend(entries);
            log.copies.push(KeptCopy {
                key,
                last_seq: last,
            });
        }
        // A copy reported failed may have landed all the same, and the one
        // made again holds its entries too: each entry once.
        for log in recovered.shards.values_mut() {
            log.entries.sort_by_key(|e| e.id.seq);
            log.entries.dedup_by_key(|e| e.id.seq);
        }
        Ok(recovered)
    }
}

impl Recovered {
    /// Adds what `copies` hold and this log does not (its disk was lost, or
    /// it is another node's): entries in sequence order, each once.
    pub fn merge_copies(&mut self, copies: Recovered) {
        for (shard, copied) in copies.shards {
            let log = self.shards.entry(shard).or_default();
            merge_shard(log, copied);
        }
    }
}

fn merge_shard(log: &mut RecoveredShard, copied: RecoveredShard) {
    let held: BTreeSet<u64> = log.entries.iter().map(|e| e.id.seq).collect();
    log.entries.extend(
        copied
            .entries
            .into_iter()
            .filter(|e| !held.contains(&e.id.seq)),
    );
    log.entries.sort_by_key(|e| e.id.seq);
    log.entries.dedup_by_key(|e| e.id.seq);
    log.next_seq = log.next_seq.max(copied.next_seq);
    log.oldest_ms = match (log.oldest_ms, copied.oldest_ms) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    log.copies.extend(copied.copies);
}

/// `shard-<i>/<first>-<last>.wal` → (shard, last).
fn parse_key(rest: &str) -> Option<(u16, u64)> {
    let (shard, name) = rest.split_once('/')?;
    let shard = shard.strip_prefix("shard-")?.parse().ok()?;
    let (_, last) = name.strip_suffix(".wal")?.split_once('-')?;
    Some((shard, last.parse().ok()?))
}

fn decode_copy(bytes: &[u8], shard: u16) -> std::result::Result<(i64, Vec<super::Entry>), String> {
    let codec = match Codec::of_segment(bytes) {
        Some(codec) if bytes.len() >= HEADER_BYTES => codec,
        _ => return Err("not a fleetgate WAL copy of this release or an older one".into()),
    };
    let created_ms = i64::from_le_bytes(bytes[8..16].try_into().map_err(|_| "header")?);
    let mut entries = Vec::new();
    let mut offset = HEADER_BYTES;
    while offset < bytes.len() {
        let (len, body) =
            read_frame(&bytes[offset..]).map_err(|reason| format!("offset {offset}: {reason}"))?;
        let (seq, table, partition, batch): (u64, Table, _, _) =
            decode_body(body, codec).map_err(|reason| format!("offset {offset}: {reason}"))?;
        entries.push(super::Entry {
            id: EntryId { shard, seq },
            table,
            partition,
            batch,
        });
        offset += len;
    }
    Ok((created_ms, entries))
}

fn copy_err(key: &str) -> impl FnOnce(std::io::Error) -> WalError + '_ {
    move |source| WalError::Copy {
        key: key.to_owned(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::Path;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use arrow::array::{Int64Array, RecordBatch};
    use arrow::datatypes::{DataType, Field, Schema};

    use super::*;
    use crate::core::table::PartitionKey;
    use crate::wal::{EntryId, ShardWal, Tracker, WalSettings, recover};

    /// A store in memory that can be made to fail.
    #[derive(Default)]
    struct Memory {
        objects: Mutex<BTreeMap<String, Vec<u8>>>,
        failing: AtomicBool,
        /// Writes land, and are reported failed (an answer lost).
        landing: AtomicBool,
    }

    impl CopyStore for Memory {
        fn put(&self, key: &str, bytes: Vec<u8>) -> std::io::Result<()> {
            if self.failing.load(Ordering::Relaxed) {
                return Err(std::io::Error::other("store unreachable"));
            }
            if self.landing.load(Ordering::Relaxed) {
                let mut objects = self.objects.lock().expect("store lock");
                objects.insert(key.to_owned(), bytes);
                return Err(std::io::Error::other("answer lost"));
            }
            self.objects
                .lock()
                .expect("store lock")
                .insert(key.to_owned(), bytes);
            Ok(())
        }
        fn list(&self, prefix: &str) -> std::io::Result<Vec<(String, i64)>> {
            let objects = self.objects.lock().expect("store lock");
            Ok(objects
                .keys()
                .filter(|k| k.starts_with(prefix))
                .map(|k| (k.clone(), 0))
                .collect())
        }
        fn get(&self, key: &str) -> std::io::Result<Vec<u8>> {
            let objects = self.objects.lock().expect("store lock");
            objects
                .get(key)
                .cloned()
                .ok_or(std::io::ErrorKind::NotFound.into())
        }
        fn delete(&self, keys: &[String]) -> std::io::Result<()> {
            let mut objects = self.objects.lock().expect("store lock");
            keys.iter().for_each(|k| drop(objects.remove(k)));
            Ok(())
        }
    }

    fn settings(dir: &Path, copies: &Copies) -> WalSettings {
        WalSettings {
            dir: dir.to_owned(),
            segment_bytes: 1 << 30,
            fsync_interval: Duration::from_millis(5),
            fsync_bytes: 1 << 20,
            max_segment_age: Duration::from_secs(3600),
            copies: Some(copies.clone()),
            fence: None,
        }
    }

    fn batch(n: i64) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![Field::new("seq", DataType::Int64, false)]));
        RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from(vec![n]))]).expect("batch")
    }

    fn append(wal: &mut ShardWal, n: i64) -> EntryId {
        wal.append(
            Table::DeadLetters,
            PartitionKey::from_millis(1_795_506_305_000),
            &batch(n),
        )
        .expect("append")
    }

    /// Every group commit is in the store once `sync` returns: with the
    /// node's disk gone, the copies alone give back every synced entry.
    #[test]
    fn the_copies_alone_give_back_every_synced_entry() {
        let store = Arc::new(Memory::default());
        let copies = Copies::new(store.clone(), "node-1");
        let disk = tempfile::tempdir().expect("tempdir");
        let mut wal =
            ShardWal::open(&settings(disk.path(), &copies), 3, None, Arc::default()).expect("open");
        append(&mut wal, 10);
        append(&mut wal, 11);
        wal.sync().expect("sync");
        append(&mut wal, 12);
        wal.sync().expect("sync");
        drop(wal);
        drop(disk);

        assert_eq!(
            store.list("").expect("list").len(),
            2,
            "one copy per group commit"
        );
        assert_eq!(
            copies.nodes().expect("nodes"),
            BTreeSet::from(["node-1".to_owned()])
        );
        let recovered = copies.read(false).expect("read");
        let shard = &recovered.shards[&3];
        assert_eq!(shard.next_seq, 3);
        let seqs: Vec<u64> = shard.entries.iter().map(|e| e.id.seq).collect();
        assert_eq!(seqs, [0, 1, 2]);
        assert_eq!(shard.entries[2].batch, batch(12));
        assert_eq!(shard.entries[2].id.shard, 3);
        assert!(
            copies
                .of("node-2")
                .read(false)
                .expect("read")
                .shards
                .is_empty()
        );
    }

    /// A copy is deleted once the tables hold all its entries, as a segment
    /// is. A copy not written fails the sync and stays due: the entries in
    /// it count as unsynced (nothing is acknowledged) until a later copy
    /// holds them, with what came after, so the copies never skip one.
    #[test]
    fn copies_go_once_committed_and_a_failed_copy_is_made_again() {
        let store = Arc::new(Memory::default());
        let copies = Copies::new(store.clone(), "node-1");
        let disk = tempfile::tempdir().expect("tempdir");
        let tracker = Arc::new(Tracker::default());
        let mut wal = ShardWal::open(&settings(disk.path(), &copies), 0, None, tracker.clone())
            .expect("open");
        let first = append(&mut wal, 1);
        wal.sync().expect("sync");
        let second = append(&mut wal, 2);
        wal.sync().expect("sync");
        tracker.covered(&[first]);
        wal.truncate_covered().expect("truncate");
        assert_eq!(
            store.list("").expect("list").len(),
            1,
            "the first copy is gone"
        );
        tracker.covered(&[second]);
        wal.truncate_covered().expect("truncate");
        assert!(store.list("").expect("list").is_empty());

        store.failing.store(true, Ordering::Relaxed);
        append(&mut wal, 3);
        assert!(matches!(wal.sync(), Err(WalError::Copy { .. })));
        assert!(
            wal.has_unsynced(),
            "not durable as promised: not acknowledged"
        );
        store.failing.store(false, Ordering::Relaxed);
        append(&mut wal, 4);
        sync_until_copied(&mut wal);
        let seqs: Vec<u64> = copies.read(false).expect("read").shards[&0]
            .entries
            .iter()
            .map(|e| e.id.seq)
            .collect();
        assert_eq!(seqs, [2, 3], "the failed entry is copied with the next");
    }

    /// A copy reported failed that landed all the same, and the one made
    /// again with the next entries: read back, each entry once.
    #[test]
    fn a_copy_that_landed_although_it_failed_is_read_once() {
        let store = Arc::new(Memory::default());
        let copies = Copies::new(store.clone(), "node-1");
        let disk = tempfile::tempdir().expect("tempdir");
        let mut wal =
            ShardWal::open(&settings(disk.path(), &copies), 0, None, Arc::default()).expect("open");
        store.landing.store(true, Ordering::Relaxed);
        append(&mut wal, 1);
        assert!(wal.sync().is_err());
        store.landing.store(false, Ordering::Relaxed);
        append(&mut wal, 2);
        sync_until_copied(&mut wal);
        assert_eq!(store.list("").expect("list").len(), 2);
        let seqs: Vec<u64> = copies.read(false).expect("read").shards[&0]
            .entries
            .iter()
            .map(|e| e.id.seq)
            .collect();
        assert_eq!(seqs, [0, 1]);
    }

    /// Syncs until every entry is copied (a failed copy waits out its back-off).
    fn sync_until_copied(wal: &mut ShardWal) {
        for _ in 0..500 {
            if !wal.has_unsynced() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
            let _ = wal.sync();
        }
        panic!("the copy was never made");
    }

    /// A fence that a test holds or drops.
    #[derive(Debug, Default)]
    struct Switch(AtomicBool);

    impl crate::core::fence::Fence for Switch {
        fn holds(&self) -> bool {
            self.0.load(Ordering::Relaxed)
        }
        fn epoch(&self) -> u64 {
            0
        }
    }

    /// While the node may not act under its name, its log writes no copy,
    /// so it acknowledges nothing; once it may, one copy holds all it took.
    #[test]
    fn a_fenced_log_copies_nothing_until_its_fence_holds() {
        let store = Arc::new(Memory::default());
        let copies = Copies::new(store.clone(), "node-1");
        let disk = tempfile::tempdir().expect("tempdir");
        let fence = Arc::new(Switch::default());
        let mut settings = settings(disk.path(), &copies);
        settings.fence = Some(fence.clone());
        let mut wal = ShardWal::open(&settings, 0, None, Arc::default()).expect("open");
        append(&mut wal, 1);
        wal.sync().expect("fsync");
        append(&mut wal, 2);
        wal.sync().expect("fsync");
        assert!(store.list("").expect("list").is_empty());
        assert!(wal.has_unsynced());
        fence.0.store(true, Ordering::Relaxed);
        wal.sync().expect("sync");
        assert!(!wal.has_unsynced());
        assert_eq!(store.list("").expect("list").len(), 1);
        assert_eq!(copies.read(false).expect("read").entry_count(), 2);
    }

    /// Without copies too, a node that may not act under its name
    /// acknowledges nothing: its entries count as unsynced until it may.
    #[test]
    fn a_fenced_log_without_copies_acknowledges_nothing() {
        let disk = tempfile::tempdir().expect("tempdir");
        let fence = Arc::new(Switch::default());
        let copies = Copies::new(Arc::new(Memory::default()), "node-1");
        let mut settings = settings(disk.path(), &copies);
        settings.copies = None;
        settings.fence = Some(fence.clone());
        let mut wal = ShardWal::open(&settings, 0, None, Arc::default()).expect("open");
        append(&mut wal, 1);
        wal.sync().expect("fsync");
        assert!(wal.has_unsynced());
        fence.0.store(true, Ordering::Relaxed);
        assert!(!wal.has_unsynced());
    }

    /// A disk that survived and its copies hold the same entries: merged,
    /// each entry once, in order.
    #[test]
    fn a_log_and_its_copies_merge_into_each_entry_once() {
        let store = Arc::new(Memory::default());
        let copies = Copies::new(store, "node-1");
        let disk = tempfile::tempdir().expect("tempdir");
        let mut wal =
            ShardWal::open(&settings(disk.path(), &copies), 0, None, Arc::default()).expect("open");
        for n in 0..3 {
            append(&mut wal, n);
            wal.sync().expect("sync");
        }
        drop(wal);
        let mut recovered = recover(disk.path(), false).expect("recover");
        recovered.merge_copies(copies.read(false).expect("read"));
        let shard = &recovered.shards[&0];
        let seqs: Vec<u64> = shard.entries.iter().map(|e| e.id.seq).collect();
        assert_eq!(seqs, [0, 1, 2]);
        assert_eq!(shard.next_seq, 3);
    }
}
