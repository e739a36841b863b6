//! The run report: counts, rates and the latency distribution, written as
//! text for people, as JSON for scripts, and as an SVG percentile plot.

use std::path::Path;

use fleetgate::schema::Stream;
use hdrhistogram::Histogram;
use plotters::prelude::*;
use serde::Serialize;

use crate::run::{Outcome, RunConfig, Stop};
use crate::verify::Verdict;

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot draw the latency plot: {0}")]
    Plot(String),
}

#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    /// What was timed.
    pub measures: &'static str,
    pub count: u64,
    pub mean_us: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct StreamLine {
    pub stream: &'static str,
    pub publishes: u64,
    pub records: u64,
    pub bytes: u64,
}

/// Everything a run reports.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub run_tag: String,
    pub started: String,
    pub target: String,
    pub qos: u8,
    pub vehicles: u32,
    pub connections: u32,
    pub records_per_publish: u32,
    /// "count N", "duration S s", each with "open loop at R/s" or "closed loop".
    pub mode: String,
    pub elapsed_s: f64,
    pub publishes_sent: u64,
    pub publishes_acked: u64,
    /// QoS 1 publishes sent but never acknowledged within the drain timeout.
    pub publishes_unacked: u64,
    pub records_sent: u64,
    pub records_acked: u64,
    pub errors: Vec<String>,
    /// Acknowledged (QoS 1) or written (QoS 0) publishes per second.
    pub publishes_per_s: f64,
    pub records_per_s: f64,
    pub bytes_per_s: f64,
    pub mean_payload_bytes: f64,
    pub by_stream: Vec<StreamLine>,
    pub latency: Latency,
    pub verify: Option<Verdict>,
}

impl Report {
    pub fn new(config: &RunConfig, outcome: &Outcome) -> Self {
        let qos1 = config.qos != rumqttc::QoS::AtMostOnce;
        let secs = outcome.elapsed.as_secs_f64().max(1e-9);
        let bytes: u64 = outcome.sent_by_stream.iter().map(|t| t.bytes).sum();
        let (done_publishes, done_records) = if qos1 {
            (outcome.publishes_acked, outcome.records_acked)
        } else {
            (outcome.publishes_sent, outcome.records_sent)
        };
        let stop = match config.stop {
            Stop::Publishes(n) => format!("count {n}"),
            Stop::Duration(d) => format!("duration {} s", d.as_secs_f64()),
        };
        let pace = match config.rate {
            Some(r) => format!("open loop at {r} publishes/s"),
            None => format!("closed loop, {} in flight per connection", config.inflight),
        };
        let h = &outcome.latency_us;
        Self {
            run_tag: outcome.run_tag.clone(),
            started: chrono::DateTime::from_timestamp_millis(outcome.started_ms)
                .map(|t| t.to_rfc3339())
                .unwrap_or_default(),
            target: format!("{}:{}", config.host, config.port),
            qos: if qos1 { 1 } else { 0 },
            vehicles: config.vehicles,
            connections: config.connections,
            records_per_publish: config.records_per_publish,
            mode: format!("{stop}, {pace}"),
            elapsed_s: secs,
            publishes_sent: outcome.publishes_sent,
            publishes_acked: outcome.publishes_acked,
            publishes_unacked: if qos1 {
                outcome.publishes_sent - outcome.publishes_acked
            } else {
                0
            },
            records_sent: outcome.records_sent,
            records_acked: outcome.records_acked,
            errors: outcome.errors.clone(),
            publishes_per_s: done_publishes as f64 / secs,
            records_per_s: done_records as f64 / secs,
            bytes_per_s: bytes as f64
                * (done_publishes as f64 / outcome.publishes_sent.max(1) as f64)
                / secs,
            mean_payload_bytes: bytes as f64 / outcome.publishes_sent.max(1) as f64,
            by_stream: Stream::ALL
                .iter()
                .map(|s| {
                    let t = outcome.sent_by_stream[s.index()];
                    StreamLine {
                        stream: s.name(),
                        publishes: t.publishes,
                        records: t.records,
                        bytes: t.bytes,
                    }
                })
                .collect(),
            latency: Latency {
                measures: match (qos1, config.rate.is_some()) {
                    (true, true) => "due time to PUBACK (open loop)",
                    (true, false) => "publish call to PUBACK",
                    (false, true) => "due time to socket write (QoS 0, open loop)",
                    (false, false) => "publish call to socket write (QoS 0)",
                },
                count: h.len(),
                mean_us: h.mean(),
                p50_us: h.value_at_quantile(0.5),
                p90_us: h.value_at_quantile(0.9),
                p99_us: h.value_at_quantile(0.99),
                p999_us: h.value_at_quantile(0.999),
                max_us: h.max(),
            },
            verify: None,
        }
    }

    /// The report as a few lines of text.
    pub fn text(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let ms = |us: u64| us as f64 / 1000.0;
        let _ = writeln!(
            out,
            "loadgen run {} against {} ({})",
            self.run_tag, self.target, self.started
        );
        let _ = writeln!(
            out,
            "  {} vehicles over {} connections, QoS {}, {} record(s) per publish, {}",
            self.vehicles, self.connections, self.qos, self.records_per_publish, self.mode
        );
        let _ = writeln!(
            out,
            "  sent {} publishes ({} records), acked {}, unacked {}, errors {}",
            self.publishes_sent,
            self.records_sent,
            self.publishes_acked,
            self.publishes_unacked,
            self.errors.len()
        );
        let _ = writeln!(
            out,
            "  {:.1} s: {:.0} publishes/s, {:.0} records/s, {:.1} MB/s, {:.0} bytes per publish",
            self.elapsed_s,
            self.publishes_per_s,
            self.records_per_s,
            self.bytes_per_s / 1e6,
            self.mean_payload_bytes
        );
        let l = &self.latency;
        let _ = writeln!(
            out,
            "  latency ({}): p50 {:.3} ms, p90 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms, max {:.3} ms",
            l.measures,
            ms(l.p50_us),
            ms(l.p90_us),
            ms(l.p99_us),
            ms(l.p999_us),
            ms(l.max_us)
        );
        for s in &self.by_stream {
            let _ = writeln!(
                out,
                "  {:<12} {:>10} records {:>12} bytes",
                s.stream, s.records, s.bytes
            );
        }
        for e in &self.errors {
            let _ = writeln!(out, "  error: {e}");
        }
        if let Some(v) = &self.verify {
            let _ = writeln!(out, "  verify: {}", if v.ok { "OK" } else { "FAILED" });
            for s in &v.streams {
                let _ = writeln!(
                    out,
                    "    {:<12} {:<5} acked {:>9} stored {:>9} missing {:>6} duplicated {:>6} stored-unacked {:>6}{}",
                    s.stream,
                    s.method,
                    s.acked,
                    s.stored,
                    s.missing,
                    s.duplicated,
                    s.stored_unacked,
                    if s.missing_examples.is_empty() {
                        String::new()
                    } else {
                        format!(" e.g. (vehicle, seq) {:?}", s.missing_examples)
                    }
                );
            }
        }
        out
    }
}

/// Writes `text` to `path`.
pub fn write(path: &Path, text: &str) -> Result<(), ReportError> {
    std::fs::write(path, text).map_err(|source| ReportError::Write {
        path: path.display().to_string(),
        source,
    })
}

/// Highest percentile the plot shows: 99.9999 %.
const PLOT_NINES: f64 = 6.0;

/// Draws the latency percentile distribution (HdrHistogram style: the x
/// axis counts nines, so the tail gets the room it deserves) as SVG.
pub fn latency_svg(
    histogram: &Histogram<u64>,
    title: &str,
    path: &Path,
) -> Result<(), ReportError> {
    let plot_error = |e: &dyn std::fmt::Display| ReportError::Plot(e.to_string());
    let points: Vec<(f64, f64)> = histogram
        .iter_quantiles(1)
        .map(|v| {
            let q = v.quantile_iterated_to();
            let nines = if q >= 1.0 {
                PLOT_NINES
            } else {
                (1.0 / (1.0 - q)).log10().min(PLOT_NINES)
            };
            (nines, v.value_iterated_to() as f64 / 1000.0)
        })
        .collect();
    let top = points.iter().map(|p| p.1).fold(0.0, f64::max).max(0.001) * 1.1;
    let root = SVGBackend::new(path, (900, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| plot_error(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(20)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..PLOT_NINES, 0.0..top)
        .map_err(|e| plot_error(&e))?;
    chart
        .configure_mesh()
        .x_labels(PLOT_NINES as usize + 1)
        .x_label_formatter(&|nines| {
            format!("{}%", ((1.0 - 10f64.powf(-nines)) * 1e6).round() / 1e4)
        })
        .x_desc("percentile")
        .y_desc("latency (ms)")
        .draw()
        .map_err(|e| plot_error(&e))?;
    chart
        .draw_series(LineSeries::new(points, BLUE.stroke_width(2)))
        .map_err(|e| plot_error(&e))?;
    root.present().map_err(|e| plot_error(&e))?;
    Ok(())
}
