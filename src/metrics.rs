//! Counters of what the pipeline received, stored and rejected, per stream.
//!
//! Counters are atomics, added to once per batch by the stage that owns the
//! number, never per record under a lock. A snapshot is logged at shutdown and
//! is what the later `/metrics` endpoint exposes.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use hdrhistogram::Histogram;

use serde::Serialize;

use crate::core::reject::RejectCode;
use crate::schema::Stream;

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
    /// Rows deleted from disk by the retention sweep.
    pub rows_expired: AtomicU64,
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
    /// Time of receipt to the Parquet commit that made a row queryable, in ms, per row.
    pub receipt_to_queryable_ms: Mutex<Histogram<u64>>,
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
            receipt_to_queryable_ms: histogram(),
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

    /// The drop of a gate needing `consent` (one of `core::consent::Consent::NAMES`).
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
    /// Payload bytes of the publishes those records came in.
    pub bytes_received: AtomicU64,
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
    /// Publishes thrown away unread by the discard sink (benchmarks only).
    pub publishes_discarded: AtomicU64,
    /// Seconds in which one connection hit `broker.max_publishes_per_second`
    /// (counted by the patched broker).
    pub publish_rate_limited: Arc<AtomicU64>,
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
    pub receipt_to_queryable_ms: Quantiles,
}

/// Sums over all streams, for rates.
#[derive(Debug, Clone, Copy, Default)]
pub struct Totals {
    pub received: u64,
    pub stored: u64,
    pub rejected: u64,
    pub dropped: u64,
    pub discarded: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StreamSnapshot {
    pub stream: &'static str,
    pub received: u64,
    pub bytes_received: u64,
    pub stored: u64,
    pub files: u64,
    pub bytes: u64,
    pub rejected: Vec<(&'static str, u64)>,
    pub dropped_by_policy: Vec<(&'static str, u64)>,
}

impl Metrics {
    /// The counters of a table by name: a stream's or the dead letters'.
    pub fn table(&self, name: &str) -> Option<&TableCounters> {
        if name == crate::core::table::DEAD_LETTERS {
            return Some(&self.dead_letters);
        }
        Stream::from_name(name).map(|s| &self.stream(s).table)
    }

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
                        bytes_received: c.bytes_received.load(Relaxed),
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
            receipt_to_queryable_ms: Quantiles::of(&self.wal.receipt_to_queryable_ms),
        }
    }

    pub fn totals(&self) -> Totals {
        let mut t = Totals {
            discarded: self.publishes_discarded.load(Relaxed),
            ..Totals::default()
        };
        for s in &self.streams {
            t.received += s.records_received.load(Relaxed);
            t.stored += s.table.rows_stored.load(Relaxed);
            t.rejected += RejectCode::ALL
                .iter()
                .map(|c| s.rejected.0[c.index()].load(Relaxed))
                .sum::<u64>();
            t.dropped += PolicyDrop::ALL
                .iter()
                .map(|r| s.dropped_by_policy.get(*r))
                .sum::<u64>();
        }
        t.rejected += RejectCode::ALL
            .iter()
            .map(|c| self.unrouted.0[c.index()].load(Relaxed))
            .sum::<u64>();
        t
    }

    /// The counters in the Prometheus text exposition format. Names end in
    /// their unit; labels are few (stream or table, reason, queue).
    pub fn prometheus(&self, queues: &[(String, usize)]) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let mut family = |name: &str, kind: &str, help: &str, samples: Vec<(String, f64)>| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, value) in samples {
                let _ = writeln!(out, "{name}{labels} {value}");
            }
        };
        let per_stream = |f: &dyn Fn(&StreamCounters) -> u64| {
            Stream::ALL
                .iter()
                .map(|s| {
                    (
                        format!("{{stream=\"{}\"}}", s.name()),
                        f(self.stream(*s)) as f64,
                    )
                })
                .collect()
        };
        family(
            "fleetgate_records_received_total",
            "counter",
            "Records received, valid or not.",
            per_stream(&|c| c.records_received.load(Relaxed)),
        );
        family(
            "fleetgate_payload_bytes_received_total",
            "counter",
            "Payload bytes of the publishes received, valid or not.",
            per_stream(&|c| c.bytes_received.load(Relaxed)),
        );
        family(
            "fleetgate_mqtt_publish_rate_limited_total",
            "counter",
            "Seconds in which a connection hit broker.max_publishes_per_second and was held back.",
            vec![(
                String::new(),
                self.publish_rate_limited.load(Relaxed) as f64,
            )],
        );
        family(
            "fleetgate_publishes_discarded_total",
            "counter",
            "Publishes discarded unread by the benchmark sink (pipeline.sink = \"discard\").",
            vec![(String::new(), self.publishes_discarded.load(Relaxed) as f64)],
        );
        family(
            "fleetgate_records_stored_total",
            "counter",
            "Rows in committed Parquet files.",
            per_stream(&|c| c.table.rows_stored.load(Relaxed)),
        );
        let mut rejected = Vec::new();
        for s in Stream::ALL {
            for code in RejectCode::ALL {
                let n = self.stream(s).rejected.0[code.index()].load(Relaxed);
                rejected.push((
                    format!("{{stream=\"{}\",reason=\"{}\"}}", s.name(), code.as_str()),
                    n as f64,
                ));
            }
        }
        for code in RejectCode::ALL {
            let n = self.unrouted.0[code.index()].load(Relaxed);
            rejected.push((
                format!("{{stream=\"none\",reason=\"{}\"}}", code.as_str()),
                n as f64,
            ));
        }
        family(
            "fleetgate_records_rejected_total",
            "counter",
            "Records dead-lettered, by reason.",
            rejected,
        );
        let mut dropped = Vec::new();
        for s in Stream::ALL {
            for r in PolicyDrop::ALL {
                let n = self.stream(s).dropped_by_policy.get(r);
                dropped.push((
                    format!("{{stream=\"{}\",reason=\"{}\"}}", s.name(), r.as_str()),
                    n as f64,
                ));
            }
        }
        family(
            "fleetgate_records_dropped_by_policy_total",
            "counter",
            "Valid records not stored because a privacy policy says so.",
            dropped,
        );
        let tables: Vec<(&str, &TableCounters)> = Stream::ALL
            .iter()
            .map(|s| (s.name(), &self.stream(*s).table))
            .chain([(crate::core::table::DEAD_LETTERS, &self.dead_letters)])
            .collect();
        let per_table = |f: &dyn Fn(&TableCounters) -> u64| {
            tables
                .iter()
                .map(|(name, t)| (format!("{{table=\"{name}\"}}"), f(t) as f64))
                .collect()
        };
        family(
            "fleetgate_parquet_files_total",
            "counter",
            "Parquet files committed.",
            per_table(&|t| t.files_committed.load(Relaxed)),
        );
        family(
            "fleetgate_parquet_bytes_total",
            "counter",
            "Bytes of Parquet files committed.",
            per_table(&|t| t.bytes_committed.load(Relaxed)),
        );
        family(
            "fleetgate_rows_expired_total",
            "counter",
            "Rows deleted from disk by the retention sweep.",
            per_table(&|t| t.rows_expired.load(Relaxed)),
        );
        family(
            "fleetgate_write_errors_rows_total",
            "counter",
            "Rows whose write failed and was retried.",
            per_table(&|t| t.rows_delayed_by_write_errors.load(Relaxed)),
        );
        family(
            "fleetgate_writer_held_bytes",
            "gauge",
            "Bytes of uncommitted rows a table writer holds.",
            per_table(&|t| t.held_bytes.load(Relaxed)),
        );
        family(
            "fleetgate_queue_depth",
            "gauge",
            "Items waiting in a pipeline queue.",
            queues
                .iter()
                .map(|(q, n)| (format!("{{queue=\"{q}\"}}"), *n as f64))
                .collect(),
        );
        family(
            "fleetgate_wal_syncs_total",
            "counter",
            "WAL group commits (fsyncs).",
            vec![(String::new(), self.wal.syncs.load(Relaxed) as f64)],
        );
        family(
            "fleetgate_wal_bytes_total",
            "counter",
            "Bytes made durable in the WAL.",
            vec![(String::new(), self.wal.bytes_synced.load(Relaxed) as f64)],
        );
        family(
            "fleetgate_wal_errors_total",
            "counter",
            "Failed WAL appends and fsyncs.",
            vec![(String::new(), self.wal.errors.load(Relaxed) as f64)],
        );
        family(
            "fleetgate_wal_entries_replayed_total",
            "counter",
            "WAL entries written again at start-up.",
            vec![(
                String::new(),
                self.wal.entries_replayed.load(Relaxed) as f64,
            )],
        );
        let quantiles = |h: &Mutex<Histogram<u64>>, scale: f64| -> Vec<(String, f64)> {
            let Ok(h) = h.lock() else { return Vec::new() };
            let mut v: Vec<(String, f64)> = [0.5, 0.9, 0.99, 0.999]
                .iter()
                .map(|q| {
                    (
                        format!("{{quantile=\"{q}\"}}"),
                        h.value_at_quantile(*q) as f64 * scale,
                    )
                })
                .collect();
            v.push(("_count".to_owned(), h.len() as f64));
            v
        };
        let summary = |name: &str, help: &str, samples: Vec<(String, f64)>| {
            let mut text = format!("# HELP {name} {help}\n# TYPE {name} summary\n");
            for (labels, value) in samples {
                if labels == "_count" {
                    text.push_str(&format!("{name}_count {value}\n"));
                } else {
                    text.push_str(&format!("{name}{labels} {value}\n"));
                }
            }
            text
        };
        out.push_str(&summary(
            "fleetgate_wal_fsync_seconds",
            "Duration of WAL fsyncs.",
            quantiles(&self.wal.fsync_micros, 1e-6),
        ));
        out.push_str(&summary(
            "fleetgate_receipt_to_durable_seconds",
            "Time from receipt to the WAL fsync holding a row.",
            quantiles(&self.wal.receipt_to_durable_ms, 1e-3),
        ));
        out.push_str(&summary(
            "fleetgate_receipt_to_queryable_seconds",
            "Time from receipt to the Parquet commit holding a row.",
            quantiles(&self.wal.receipt_to_queryable_ms, 1e-3),
        ));
        out
    }

    /// One info line per stream, fields first.
    pub fn log(&self) {
        let snap = self.snapshot();
        for s in &snap.streams {
            tracing::info!(
                stream = s.stream,
                received = s.received,
                bytes_received = s.bytes_received,
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
            publishes_discarded = self.publishes_discarded.load(Relaxed),
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
            receipt_to_queryable_ms = ?snap.receipt_to_queryable_ms,
            "write-ahead log totals"
        );
    }
}
