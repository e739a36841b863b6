//! Counters of what the pipeline received, stored and rejected, per stream.
//!
//! Counters are atomics, added to once per batch by the stage that owns the
//! number, never per record under a lock. A snapshot is logged at shutdown;
//! `/metrics` reads them at each scrape through [`Metrics`]'s
//! `prometheus_client` collector: counters, gauges, and the latency
//! histograms as Prometheus histograms (buckets add up across nodes, which
//! quantiles do not).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use hdrhistogram::Histogram;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use serde::Serialize;

use crate::core::reject::RejectCode;
use crate::core::table::Table;
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
    /// Duration of each copy of a group commit to the store (cluster), in microseconds.
    pub copy_micros: Mutex<Histogram<u64>>,
    /// Time of receipt to the fsync that made a row durable, in milliseconds, per row.
    pub receipt_to_durable_ms: Mutex<Histogram<u64>>,
    /// Time of receipt to the Parquet commit that made a row queryable, in ms, per row.
    pub receipt_to_queryable_ms: Mutex<Histogram<u64>>,
}

/// The largest latency a histogram tells apart: a day, in its unit's
/// smallest step (µs or ms). `saturating_record` clamps anything above to
/// it and, unlike `record`, never grows the histogram: one made by
/// `Histogram::new` would clamp every value past its first 2,048 units
/// (2 s of ms, 2 ms of µs) down to 2.
const HISTOGRAM_HIGHEST_MS: u64 = 86_400_000;
const HISTOGRAM_HIGHEST_US: u64 = 86_400_000_000;

impl Default for WalCounters {
    fn default() -> Self {
        let histogram = |highest| {
            Mutex::new(
                Histogram::new_with_bounds(1, highest, 3)
                    .expect("1 to a day at 3 significant figures is in range"),
            )
        };
        Self {
            bytes_synced: AtomicU64::default(),
            syncs: AtomicU64::default(),
            errors: AtomicU64::default(),
            entries_replayed: AtomicU64::default(),
            fsync_micros: histogram(HISTOGRAM_HIGHEST_US),
            copy_micros: histogram(HISTOGRAM_HIGHEST_US),
            receipt_to_durable_ms: histogram(HISTOGRAM_HIGHEST_MS),
            receipt_to_queryable_ms: histogram(HISTOGRAM_HIGHEST_MS),
        }
    }
}

/// Records, into `histogram`, how long before `now_ms` each row of
/// `receipts` (times of receipt, ms) was received. Rows come in order of
/// receipt, many in the same millisecond: the runs of equal times are
/// counted first, and the lock is held for one step per run, not per row.
pub fn record_since_receipt<'a>(
    histogram: &Mutex<Histogram<u64>>,
    now_ms: i64,
    receipts: impl IntoIterator<Item = &'a [i64]>,
) {
    let mut runs: Vec<(i64, u64)> = Vec::new();
    for times in receipts {
        for &t in times {
            match runs.last_mut() {
                Some((time, rows)) if *time == t => *rows += 1,
                _ => runs.push((t, 1)),
            }
        }
    }
    if let Ok(mut h) = histogram.lock() {
        for (t, rows) in runs {
            h.saturating_record_n((now_ms - t).max(0) as u64, rows);
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
    /// The vehicle's charge history is switched off (L1082-1084).
    ChargeHistoryOff,
}

impl PolicyDrop {
    pub const ALL: [PolicyDrop; 4] = [
        PolicyDrop::ConsentSmartMaintenance,
        PolicyDrop::ConsentProductQuality,
        PolicyDrop::SimDeactivated,
        PolicyDrop::ChargeHistoryOff,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            PolicyDrop::ConsentSmartMaintenance => "no_consent_smart_maintenance",
            PolicyDrop::ConsentProductQuality => "no_consent_product_quality",
            PolicyDrop::SimDeactivated => "sim_deactivated",
            PolicyDrop::ChargeHistoryOff => "charge_history_off",
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
    /// Publishes whose topic names no stream, not stored because a policy
    /// says so (the VIN in their topic has its SIM off).
    pub unrouted_dropped: PolicyCounters,
    pub dead_letters: TableCounters,
    pub wal: WalCounters,
    /// Publishes thrown away unread by the discard sink (benchmarks only).
    pub publishes_discarded: AtomicU64,
    /// Flight SQL fetches that ran the plan their description made.
    pub flight_sql_plans_reused: AtomicU64,
    /// Seconds in which one connection hit `broker.max_publishes_per_second`
    /// (counted by the patched broker).
    pub publish_rate_limited: Arc<AtomicU64>,
    /// 1 while this node holds the maintenance lease (always, alone).
    pub maintenance_lease_held: AtomicU64,
    /// In a cluster: 1 while this node can trust it holds the lease on its
    /// name, without which its writers do not commit.
    pub node_lease_held: AtomicU64,
    /// In a cluster: true while the node may not act under its name
    /// (`/health` answers 503).
    pub fenced: AtomicBool,
}

/// A point-in-time copy of the counters.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MetricsSnapshot {
    pub streams: Vec<StreamSnapshot>,
    pub unrouted_rejected: Vec<(&'static str, u64)>,
    pub unrouted_dropped: Vec<(&'static str, u64)>,
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
        Table::from_name(name).map(|t| self.table_of(t))
    }

    /// The counters of a table.
    pub fn table_of(&self, table: Table) -> &TableCounters {
        match table {
            Table::Stream(s) => &self.stream(s).table,
            Table::DeadLetters => &self.dead_letters,
        }
    }

    pub fn stream(&self, stream: Stream) -> &StreamCounters {
        &self.streams[stream.index()]
    }

    pub fn snapshot(&self) -> MetricsSnapshot {
        let delayed = Table::all()
            .map(|t| self.table_of(t).rows_delayed_by_write_errors.load(Relaxed))
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
            unrouted_dropped: self.unrouted_dropped.snapshot(),
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
        t.dropped += PolicyDrop::ALL
            .iter()
            .map(|r| self.unrouted_dropped.get(*r))
            .sum::<u64>();
        t
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
            unrouted_dropped = ?snap.unrouted_dropped,
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

/// One sample of a counter or gauge family: its labels and value.
type Sample = (Vec<(&'static str, String)>, u64);

/// Writes one counter or gauge family (`name` without `fleetgate_` and,
/// for a counter, without `_total`, which the encoder adds).
pub fn encode_family(
    out: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    samples: impl IntoIterator<Item = Sample>,
) -> std::fmt::Result {
    let mut family = out.encode_descriptor(name, help, None, kind)?;
    for (labels, value) in samples {
        let mut sample = family.encode_family(&labels)?;
        encode_value(&mut sample, kind, value)?;
    }
    Ok(())
}

/// One unlabelled sample.
pub fn unlabelled(value: u64) -> [Sample; 1] {
    [(Vec::new(), value)]
}

fn encode_value(sample: &mut MetricEncoder, kind: MetricType, value: u64) -> std::fmt::Result {
    match kind {
        MetricType::Counter => sample.encode_counter::<NoLabelSet, _, u64>(&value, None),
        _ => sample.encode_gauge(&value),
    }
}

/// Upper bounds of the latency buckets, in seconds: ten per decade
/// (1, 1.25, 1.6, 2, 2.5, 3.2, 4, 5, 6.3, 8 × 10^e, steps of 25-28 %) from
/// `10^from` to `10^to`, so that a quantile read from the buckets is within
/// one step.
fn bucket_bounds(from: i32, to: i32) -> Vec<f64> {
    const STEPS: [&str; 10] = ["1", "1.25", "1.6", "2", "2.5", "3.2", "4", "5", "6.3", "8"];
    // Parsed from decimal text, so that a bound prints as written (0.16,
    // not the 0.16000000000000003 that 1.6 × 0.1 makes).
    let bound = |m: &str, e: i32| format!("{m}e{e}").parse().unwrap_or(f64::INFINITY);
    (from..to)
        .flat_map(|e| STEPS.iter().map(move |m| bound(m, e)))
        .chain([bound("1", to)])
        .collect()
}

/// Writes an hdrhistogram of values in units of `unit_s` seconds as a
/// Prometheus histogram over `bounds`; values above the last bound count in
/// `+Inf` only. Each recorded value counts as the lowest value it stands
/// for (exact below 2,048 units, within 0.1 % above), in its bucket and in
/// the sum, which is summed in integers so that it never goes down.
fn encode_histogram(
    out: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    histogram: &Mutex<Histogram<u64>>,
    unit_s: f64,
    bounds: &[f64],
) -> std::fmt::Result {
    let mut per_bucket = vec![0u64; bounds.len()];
    let (sum, count) = match histogram.lock() {
        Ok(h) => {
            let mut sum_units: u128 = 0;
            for value in h.iter_recorded() {
                let units = h.lowest_equivalent(value.value_iterated_to());
                sum_units += u128::from(units) * u128::from(value.count_at_value());
                let seconds = units as f64 * unit_s;
                let bucket = bounds.partition_point(|&bound| bound < seconds);
                if let Some(n) = per_bucket.get_mut(bucket) {
                    *n += value.count_at_value();
                }
            }
            (sum_units as f64 * unit_s, h.len())
        }
        // A panic while recording: the metric reads empty, not stale.
        Err(_) => (0.0, 0),
    };
    let buckets: Vec<(f64, u64)> = bounds.iter().copied().zip(per_bucket).collect();
    out.encode_descriptor(name, help, None, MetricType::Histogram)?
        .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
}

impl Collector for Metrics {
    fn encode(&self, mut out: DescriptorEncoder) -> std::fmt::Result {
        use MetricType::{Counter, Gauge};
        let per_stream = |f: &dyn Fn(&StreamCounters) -> u64| -> Vec<Sample> {
            Stream::ALL
                .iter()
                .map(|&s| (vec![("stream", s.name().to_owned())], f(self.stream(s))))
                .collect()
        };
        let per_table = |f: &dyn Fn(&TableCounters) -> u64| -> Vec<Sample> {
            Table::all()
                .map(|t| (vec![("table", t.name().to_owned())], f(self.table_of(t))))
                .collect()
        };
        let out = &mut out;
        encode_family(
            out,
            "records_received",
            "Records received, valid or not.",
            Counter,
            per_stream(&|c| c.records_received.load(Relaxed)),
        )?;
        encode_family(
            out,
            "payload_bytes_received",
            "Payload bytes of the publishes received, valid or not.",
            Counter,
            per_stream(&|c| c.bytes_received.load(Relaxed)),
        )?;
        encode_family(
            out,
            "mqtt_publish_rate_limited",
            "Seconds in which a connection hit broker.max_publishes_per_second and was held back.",
            Counter,
            unlabelled(self.publish_rate_limited.load(Relaxed)),
        )?;
        encode_family(
            out,
            "maintenance_lease_held",
            "1 while this node holds the lease of the retention sweep and compaction.",
            Gauge,
            unlabelled(self.maintenance_lease_held.load(Relaxed)),
        )?;
        encode_family(
            out,
            "node_lease_held",
            "In a cluster: 1 while this node holds the lease on its node_id (its table commits wait otherwise).",
            Gauge,
            unlabelled(self.node_lease_held.load(Relaxed)),
        )?;
        encode_family(
            out,
            "flight_sql_plans_reused",
            "Flight SQL fetches that ran the plan their statement's description made, not planned again.",
            Counter,
            unlabelled(self.flight_sql_plans_reused.load(Relaxed)),
        )?;
        encode_family(
            out,
            "publishes_discarded",
            "Publishes discarded unread by the benchmark sink (pipeline.sink = \"discard\").",
            Counter,
            unlabelled(self.publishes_discarded.load(Relaxed)),
        )?;
        encode_family(
            out,
            "records_stored",
            "Rows in committed Parquet files.",
            Counter,
            per_stream(&|c| c.table.rows_stored.load(Relaxed)),
        )?;
        let stream_labels = Stream::ALL
            .iter()
            .map(|s| (s.name(), &self.stream(*s).rejected))
            .chain([("none", &self.unrouted)]);
        let rejected = stream_labels.flat_map(|(stream, counters)| {
            RejectCode::ALL.iter().map(move |code| {
                (
                    vec![
                        ("stream", stream.to_owned()),
                        ("reason", code.as_str().to_owned()),
                    ],
                    counters.0[code.index()].load(Relaxed),
                )
            })
        });
        encode_family(
            out,
            "records_rejected",
            "Records dead-lettered, by reason.",
            Counter,
            rejected,
        )?;
        let dropped_labels = Stream::ALL
            .iter()
            .map(|s| (s.name(), &self.stream(*s).dropped_by_policy))
            .chain([("none", &self.unrouted_dropped)]);
        let dropped = dropped_labels.flat_map(|(stream, counters)| {
            PolicyDrop::ALL.iter().map(move |&r| {
                (
                    vec![
                        ("stream", stream.to_owned()),
                        ("reason", r.as_str().to_owned()),
                    ],
                    counters.get(r),
                )
            })
        });
        encode_family(
            out,
            "records_dropped_by_policy",
            "Valid records not stored because a privacy policy says so.",
            Counter,
            dropped,
        )?;
        encode_family(
            out,
            "parquet_files",
            "Parquet files committed.",
            Counter,
            per_table(&|t| t.files_committed.load(Relaxed)),
        )?;
        encode_family(
            out,
            "parquet_bytes",
            "Bytes of Parquet files committed.",
            Counter,
            per_table(&|t| t.bytes_committed.load(Relaxed)),
        )?;
        encode_family(
            out,
            "rows_expired",
            "Rows deleted from disk by the retention sweep.",
            Counter,
            per_table(&|t| t.rows_expired.load(Relaxed)),
        )?;
        encode_family(
            out,
            "write_errors_rows",
            "Rows whose write failed and was retried.",
            Counter,
            per_table(&|t| t.rows_delayed_by_write_errors.load(Relaxed)),
        )?;
        encode_family(
            out,
            "writer_held_bytes",
            "Bytes of uncommitted rows a table writer holds.",
            Gauge,
            per_table(&|t| t.held_bytes.load(Relaxed)),
        )?;
        encode_family(
            out,
            "wal_syncs",
            "WAL group commits (fsyncs).",
            Counter,
            unlabelled(self.wal.syncs.load(Relaxed)),
        )?;
        encode_family(
            out,
            "wal_bytes",
            "Bytes made durable in the WAL.",
            Counter,
            unlabelled(self.wal.bytes_synced.load(Relaxed)),
        )?;
        encode_family(
            out,
            "wal_errors",
            "Failed WAL appends and fsyncs.",
            Counter,
            unlabelled(self.wal.errors.load(Relaxed)),
        )?;
        encode_family(
            out,
            "wal_entries_replayed",
            "WAL entries written again at start-up.",
            Counter,
            unlabelled(self.wal.entries_replayed.load(Relaxed)),
        )?;
        encode_histogram(
            out,
            "wal_fsync_seconds",
            "Duration of WAL fsyncs.",
            &self.wal.fsync_micros,
            1e-6,
            &bucket_bounds(-5, 1),
        )?;
        encode_histogram(
            out,
            "wal_copy_seconds",
            "Duration of copying a WAL group commit to the shared store (cluster mode).",
            &self.wal.copy_micros,
            1e-6,
            &bucket_bounds(-5, 1),
        )?;
        let latency_bounds = bucket_bounds(-3, 2);
        encode_histogram(
            out,
            "receipt_to_durable_seconds",
            "Time from receipt to the WAL fsync holding a row.",
            &self.wal.receipt_to_durable_ms,
            1e-3,
            &latency_bounds,
        )?;
        encode_histogram(
            out,
            "receipt_to_queryable_seconds",
            "Time from receipt to the Delta commit holding a row.",
            &self.wal.receipt_to_queryable_ms,
            1e-3,
            &latency_bounds,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scrape(metrics: Metrics) -> String {
        let mut registry = prometheus_client::registry::Registry::with_prefix("fleetgate");
        registry.register_collector(Box::new(metrics));
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &registry)
            .expect("encodes");
        text
    }

    #[test]
    fn every_row_of_every_batch_is_recorded_once_with_its_age() {
        let wal = WalCounters::default();
        let first = [100, 100, 100, 250, 250, 100];
        let second = [250, 900, 1_200];
        record_since_receipt(&wal.receipt_to_durable_ms, 1_000, [&first[..], &second[..]]);
        let h = wal.receipt_to_durable_ms.lock().expect("lock");
        assert_eq!(h.len(), 9);
        // Received 900 ms, 750 ms and 100 ms before: 4, 3 and 1 rows; a
        // time of receipt after `now` (another node's clock) counts as 0.
        assert_eq!(h.count_at(900), 4);
        assert_eq!(h.count_at(750), 3);
        assert_eq!(h.count_at(100), 1);
        assert_eq!(h.min(), 0);
    }

    #[test]
    fn counters_carry_their_labels_and_total_suffix() {
        let metrics = Metrics::default();
        metrics
            .stream(Stream::Rtti)
            .table
            .rows_stored
            .fetch_add(7, Relaxed);
        metrics.dead_letters.held_bytes.store(42, Relaxed);
        let text = scrape(metrics);
        assert!(
            text.contains("# TYPE fleetgate_records_stored_total counter\n"),
            "{text}"
        );
        assert!(
            text.contains("fleetgate_records_stored_total{stream=\"rtti\"} 7\n"),
            "{text}"
        );
        assert!(
            text.contains("fleetgate_writer_held_bytes{table=\"dead_letters\"} 42\n"),
            "{text}"
        );
    }

    #[test]
    fn a_latency_lands_in_the_first_bucket_that_holds_it() {
        let metrics = Metrics::default();
        if let Ok(mut h) = metrics.wal.receipt_to_durable_ms.lock() {
            // As the pipeline records: saturating, never failing.
            h.saturating_record(3);
            h.saturating_record(3);
            h.saturating_record(900_000);
        }
        let text = scrape(metrics);
        let bucket = |le: &str| {
            let line = format!("fleetgate_receipt_to_durable_seconds_bucket{{le=\"{le}\"}} ");
            text.lines()
                .find_map(|l| l.strip_prefix(line.as_str()))
                .unwrap_or_else(|| panic!("no bucket {le} in\n{text}"))
                .to_owned()
        };
        // 3 ms is above 2.5 ms and within 3.2 ms; 900 s is past every bound.
        assert_eq!(bucket("0.0025"), "0");
        assert_eq!(bucket("0.0032"), "2");
        assert_eq!(bucket("0.16"), "2");
        assert_eq!(bucket("100"), "2");
        assert_eq!(bucket("+Inf"), "3");
        assert!(
            text.contains("fleetgate_receipt_to_durable_seconds_count 3\n"),
            "{text}"
        );
    }
}
