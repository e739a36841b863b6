//! Counters of what the pipeline received, stored and rejected, per stream.
//!
//! Counters are atomics, added to once per batch by the stage that owns the
//! number, never per record under a lock. A snapshot is logged at shutdown and
//! is what the later `/metrics` endpoint exposes.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use hdrhistogram::Histogram;

use serde::Serialize;

use crate::dead_letter::RejectCode;
use crate::schema::Stream;
use crate::store::{Commit, CommitListener, StoreError};

/// Counts of one table's committed files.
#[derive(Debug, Default)]
pub struct TableCounters {
    pub rows_stored: AtomicU64,
    pub files_committed: AtomicU64,
    pub bytes_committed: AtomicU64,
    /// Rows whose write failed and was retried after a back-off.
    pub rows_delayed_by_write_errors: AtomicU64,
    /// Bytes of uncommitted rows the writer holds, and the most it ever held.
    pub held_bytes: AtomicU64,
    pub held_bytes_peak: AtomicU64,
}

/// Counters and latencies of the write-ahead log.
#[derive(Debug)]
pub struct WalCounters {
    pub bytes_synced: AtomicU64,
    pub syncs: AtomicU64,
    pub errors: AtomicU64,
    pub entries_replayed: AtomicU64,
    /// Duration of each fsync, in microseconds.
    pub fsync_micros: Mutex<Histogram<u64>>,
    /// Time of receipt to the fsync that made a row durable, in milliseconds, per row.
    pub receipt_to_durable_ms: Mutex<Histogram<u64>>,
}

impl Default for WalCounters {
    fn default() -> Self {
        let histogram =
            || Mutex::new(Histogram::new(3).expect("3 significant figures is in range"));
        Self {
            bytes_synced: AtomicU64::default(),
            syncs: AtomicU64::default(),
            errors: AtomicU64::default(),
            entries_replayed: AtomicU64::default(),
            fsync_micros: histogram(),
            receipt_to_durable_ms: histogram(),
        }
    }
}

/// Quantiles of a histogram.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Quantiles {
    pub count: u64,
    pub p50: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

impl Quantiles {
    fn of(h: &Mutex<Histogram<u64>>) -> Self {
        match h.lock() {
            Ok(h) => Quantiles {
                count: h.len(),
                p50: h.value_at_quantile(0.5),
                p99: h.value_at_quantile(0.99),
                p999: h.value_at_quantile(0.999),
                max: h.max(),
            },
            Err(_) => Quantiles {
                count: 0,
                p50: 0,
                p99: 0,
                p999: 0,
                max: 0,
            },
        }
    }
}

/// Rejections by reason code.
#[derive(Debug, Default)]
pub struct RejectCounters([AtomicU64; RejectCode::ALL.len()]);

impl RejectCounters {
    pub fn add(&self, code: RejectCode, n: u64) {
        self.0[code.index()].fetch_add(n, Relaxed);
    }

    fn snapshot(&self) -> Vec<(&'static str, u64)> {
        RejectCode::ALL
            .iter()
            .map(|c| (c.as_str(), self.0[c.index()].load(Relaxed)))
            .filter(|(_, n)| *n > 0)
            .collect()
    }
}

/// Why a valid record was not stored: a privacy policy, not an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyDrop {
    /// A gated record without the Smart Maintenance consent.
    ConsentSmartMaintenance,
    /// A gated record without the Product Quality consent.
    ConsentProductQuality,
    /// The vehicle's SIM is deactivated: collection stops (§1.6, §8.8).
    SimDeactivated,
}

impl PolicyDrop {
    pub const ALL: [PolicyDrop; 3] = [
        PolicyDrop::ConsentSmartMaintenance,
        PolicyDrop::ConsentProductQuality,
        PolicyDrop::SimDeactivated,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            PolicyDrop::ConsentSmartMaintenance => "no_consent_smart_maintenance",
            PolicyDrop::ConsentProductQuality => "no_consent_product_quality",
            PolicyDrop::SimDeactivated => "sim_deactivated",
        }
    }

    /// The drop of a gate needing `consent` (one of `vault::Consent::NAMES`).
    pub fn for_consent(consent: &str) -> Self {
        match consent {
            "product_quality" => PolicyDrop::ConsentProductQuality,
            _ => PolicyDrop::ConsentSmartMaintenance,
        }
    }
}

/// Records dropped by policy, by reason.
#[derive(Debug, Default)]
pub struct PolicyCounters([AtomicU64; PolicyDrop::ALL.len()]);

impl PolicyCounters {
    pub fn add(&self, reason: PolicyDrop, n: u64) {
        self.0[reason as usize].fetch_add(n, Relaxed);
    }

    pub fn get(&self, reason: PolicyDrop) -> u64 {
        self.0[reason as usize].load(Relaxed)
    }

    fn snapshot(&self) -> Vec<(&'static str, u64)> {
        PolicyDrop::ALL
            .iter()
            .map(|r| (r.as_str(), self.get(*r)))
            .filter(|(_, n)| *n > 0)
            .collect()
    }
}

#[derive(Debug, Default)]
pub struct StreamCounters {
    /// Records decoded from publishes on this stream, valid or not.
    pub records_received: AtomicU64,
    pub rejected: RejectCounters,
    /// Valid records not stored because a policy says so; not dead letters.
    pub dropped_by_policy: PolicyCounters,
    pub table: TableCounters,
}

/// All counters of a running server.
#[derive(Debug, Default)]
pub struct Metrics {
    pub streams: [StreamCounters; Stream::ALL.len()],
    /// Rejections of publishes whose topic names no stream.
    pub unrouted: RejectCounters,
    pub dead_letters: TableCounters,
    pub wal: WalCounters,
}

/// A point-in-time copy of the counters.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MetricsSnapshot {
    pub streams: Vec<StreamSnapshot>,
    pub unrouted_rejected: Vec<(&'static str, u64)>,
    pub dead_letters_stored: u64,
    pub rows_delayed_by_write_errors: u64,
    pub wal_syncs: u64,
    pub wal_bytes_synced: u64,
    pub wal_errors: u64,
    pub wal_entries_replayed: u64,
    pub wal_fsync_micros: Quantiles,
    pub receipt_to_durable_ms: Quantiles,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StreamSnapshot {
    pub stream: &'static str,
    pub received: u64,
    pub stored: u64,
    pub files: u64,
    pub bytes: u64,
    pub rejected: Vec<(&'static str, u64)>,
    pub dropped_by_policy: Vec<(&'static str, u64)>,
}

impl Metrics {
    pub fn stream(&self, stream: Stream) -> &StreamCounters {
        &self.streams[stream.index()]
    }

    pub fn snapshot(&self) -> MetricsSnapshot {
        let delayed = self
            .streams
            .iter()
            .map(|s| &s.table)
            .chain([&self.dead_letters])
            .map(|t| t.rows_delayed_by_write_errors.load(Relaxed))
            .sum();
        MetricsSnapshot {
            streams: Stream::ALL
                .iter()
                .map(|&s| {
                    let c = self.stream(s);
                    StreamSnapshot {
                        stream: s.name(),
                        received: c.records_received.load(Relaxed),
                        stored: c.table.rows_stored.load(Relaxed),
                        files: c.table.files_committed.load(Relaxed),
                        bytes: c.table.bytes_committed.load(Relaxed),
                        rejected: c.rejected.snapshot(),
                        dropped_by_policy: c.dropped_by_policy.snapshot(),
                    }
                })
                .collect(),
            unrouted_rejected: self.unrouted.snapshot(),
            dead_letters_stored: self.dead_letters.rows_stored.load(Relaxed),
            rows_delayed_by_write_errors: delayed,
            wal_syncs: self.wal.syncs.load(Relaxed),
            wal_bytes_synced: self.wal.bytes_synced.load(Relaxed),
            wal_errors: self.wal.errors.load(Relaxed),
            wal_entries_replayed: self.wal.entries_replayed.load(Relaxed),
            wal_fsync_micros: Quantiles::of(&self.wal.fsync_micros),
            receipt_to_durable_ms: Quantiles::of(&self.wal.receipt_to_durable_ms),
        }
    }

    /// One info line per stream, fields first.
    pub fn log(&self) {
        let snap = self.snapshot();
        for s in &snap.streams {
            tracing::info!(
                stream = s.stream,
                received = s.received,
                stored = s.stored,
                files = s.files,
                bytes = s.bytes,
                rejected = ?s.rejected,
                dropped_by_policy = ?s.dropped_by_policy,
                "stream totals"
            );
        }
        tracing::info!(
            unrouted_rejected = ?snap.unrouted_rejected,
            dead_letters_stored = snap.dead_letters_stored,
            rows_delayed_by_write_errors = snap.rows_delayed_by_write_errors,
            "pipeline totals"
        );
        tracing::info!(
            syncs = snap.wal_syncs,
            bytes = snap.wal_bytes_synced,
            errors = snap.wal_errors,
            replayed = snap.wal_entries_replayed,
            fsync_us = ?snap.wal_fsync_micros,
            receipt_to_durable_ms = ?snap.receipt_to_durable_ms,
            "write-ahead log totals"
        );
    }
}

/// Feeds a table writer's commits into the counters of its table.
pub struct TableListener {
    metrics: Arc<Metrics>,
    table: Option<Stream>,
}

impl TableListener {
    /// `None` is the dead-letter table.
    pub fn new(metrics: Arc<Metrics>, table: Option<Stream>) -> Arc<Self> {
        Arc::new(Self { metrics, table })
    }

    fn counters(&self) -> &TableCounters {
        match self.table {
            Some(s) => &self.metrics.stream(s).table,
            None => &self.metrics.dead_letters,
        }
    }
}

impl CommitListener for TableListener {
    fn committed(&self, commit: &Commit) {
        let c = self.counters();
        c.rows_stored.fetch_add(commit.rows as u64, Relaxed);
        c.files_committed.fetch_add(1, Relaxed);
        c.bytes_committed.fetch_add(commit.bytes, Relaxed);
    }

    fn holding(&self, bytes: usize) {
        let c = self.counters();
        c.held_bytes.store(bytes as u64, Relaxed);
        c.held_bytes_peak.fetch_max(bytes as u64, Relaxed);
    }

    fn failed(&self, error: &StoreError, rows_delayed: usize) {
        let table = self.table.map_or(crate::dead_letter::TABLE, Stream::name);
        tracing::error!(table, rows_delayed, %error, "write failed; will write these rows again");
        self.counters()
            .rows_delayed_by_write_errors
            .fetch_add(rows_delayed as u64, Relaxed);
    }
}
