//! Live followers: N principals each following a running server's live
//! stream (`GET /live`, Server-Sent Events) for a while, the latency of
//! every delivered row recorded from receipt to delivery: the row's
//! `received_at` (the server's clock when the record arrived) against this
//! process's clock when the event is read, on the same machine. Run it
//! beside `loadgen run` to see what live access costs ingest.
//!
//! Each follower is an operator principal of its own (registered through
//! the admin routes), so that the per-principal bound counts each apart.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::analysts::{AnalystsError, add_operator};

#[derive(Debug, thiserror::Error)]
pub enum FollowersError {
    #[error(transparent)]
    Register(#[from] AnalystsError),
    #[error("a follower task failed: {0}")]
    Task(String),
    #[error("latency histogram: {0}")]
    Histogram(String),
}

/// Where, what and how long the followers follow.
pub struct Followers {
    pub admin_addr: SocketAddr,
    pub admin_token: String,
    /// The tables, comma-separated, as `GET /live?tables=` takes them.
    pub tables: String,
    pub purpose: String,
    pub followers: usize,
    pub duration: Duration,
}

/// What the followers measured.
#[derive(Debug, Serialize)]
pub struct FollowersReport {
    pub followers: usize,
    pub tables: String,
    pub seconds: f64,
    /// Rows delivered to all followers together.
    pub rows: u64,
    pub rows_per_second: f64,
    /// `rows` events (one per table and step).
    pub events: u64,
    /// `rows` events whose data was not an object with an array of row
    /// objects: their rows are not counted.
    pub unreadable_events: u64,
    /// Followers that could not open, or whose stream broke off.
    pub errors: u64,
    pub first_error: Option<String>,
    /// Receipt → delivered, per row.
    #[serde(flatten)]
    pub latency: crate::run::LatencySummary,
}

/// Runs `followers.followers` live streams until the time is up.
pub async fn run(followers: &Followers) -> Result<FollowersReport, FollowersError> {
    let run_tag = fastrand::u32(..);
    let mut tokens = Vec::new();
    for i in 0..followers.followers {
        tokens.push(add_operator(
            followers.admin_addr,
            &followers.admin_token,
            &format!("loadgen-follower-{run_tag:08x}-{i}"),
        )?);
    }
    let started = Instant::now();
    let deadline = tokio::time::Instant::from_std(started + followers.duration);
    let mut tasks = Vec::new();
    for token in tokens {
        let request = format!(
            "GET /live?tables={} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {token}\r\n\
             x-fleetgate-purpose: {}\r\nAccept: text/event-stream\r\n\r\n",
            followers.tables, followers.admin_addr, followers.purpose
        );
        let latencies = histogram()?;
        tasks.push(tokio::spawn(follow(
            followers.admin_addr,
            request,
            deadline,
            latencies,
        )));
    }
    let mut latencies = histogram()?;
    let (mut events, mut unreadable_events, mut errors, mut first_error) = (0, 0, 0, None);
    for task in tasks {
        let outcome = task
            .await
            .map_err(|e| FollowersError::Task(e.to_string()))?;
        latencies
            .add(&outcome.latencies)
            .map_err(|e| FollowersError::Task(e.to_string()))?;
        events += outcome.events;
        unreadable_events += outcome.unreadable_events;
        if let Some(error) = outcome.error {
            errors += 1;
            first_error.get_or_insert(error);
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(FollowersReport {
        followers: followers.followers,
        tables: followers.tables.clone(),
        seconds,
        rows: latencies.len(),
        rows_per_second: latencies.len() as f64 / seconds,
        events,
        unreadable_events,
        errors,
        first_error,
        latency: (&latencies).into(),
    })
}

/// One follower's delivered rows (µs from receipt) and events, and what
/// ended it early, if anything.
struct Outcome {
    latencies: Histogram<u64>,
    events: u64,
    unreadable_events: u64,
    error: Option<String>,
}

/// Follows one stream until `deadline`.
async fn follow(
    addr: SocketAddr,
    request: String,
    deadline: tokio::time::Instant,
    latencies: Histogram<u64>,
) -> Outcome {
    let mut outcome = Outcome {
        latencies,
        events: 0,
        unreadable_events: 0,
        error: None,
    };
    let reading = read_stream(addr, request, &mut outcome);
    match tokio::time::timeout_at(deadline, reading).await {
        Err(_elapsed) => {}
        Ok(Ok(())) => outcome.error = Some("the server ended the stream".into()),
        Ok(Err(e)) => outcome.error = Some(e),
    }
    outcome
}

/// Reads an SSE response (HTTP/1.1, chunked) and records every row.
async fn read_stream(
    addr: SocketAddr,
    request: String,
    outcome: &mut Outcome,
) -> Result<(), String> {
    let text = |e: std::io::Error| e.to_string();
    let mut stream = TcpStream::connect(addr).await.map_err(text)?;
    stream.set_nodelay(true).map_err(text)?;
    stream.write_all(request.as_bytes()).await.map_err(text)?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).await.map_err(text)?;
    if !line.starts_with("HTTP/1.1 200") {
        return Err(format!("refused: {}", line.trim()));
    }
    loop {
        line.clear();
        reader.read_line(&mut line).await.map_err(text)?;
        if line == "\r\n" || line.is_empty() {
            break;
        }
    }
    let mut blocks = SseBlocks::default();
    loop {
        line.clear();
        if reader.read_line(&mut line).await.map_err(text)? == 0 {
            return Ok(());
        }
        let size = usize::from_str_radix(line.trim(), 16).map_err(|e| e.to_string())?;
        if size == 0 {
            return Ok(());
        }
        if size > MAX_CHUNK_BYTES {
            return Err(format!("a chunk of {size} bytes, over {MAX_CHUNK_BYTES}"));
        }
        // The chunk and the CRLF after it.
        reader
            .read_exact(blocks.tail(size + 2))
            .await
            .map_err(text)?;
        blocks.end_chunk()?;
        let now_ms = chrono::Utc::now().timestamp_millis();
        blocks.take(|block| record(block, now_ms, outcome));
    }
}

/// Longest chunk read: the server writes one per event, and a step's
/// answer is bounded by the query memory limit.
const MAX_CHUNK_BYTES: usize = 1 << 30;

/// The bytes of an event stream read so far, cut into its blocks (events,
/// each ending in an empty line) as they complete. fleetgate writes an
/// event per chunk, but a proxy between may cut an event into several or
/// join several into one: each byte is searched once and moved once either
/// way.
#[derive(Default)]
struct SseBlocks {
    pending: Vec<u8>,
    /// How much of `pending` is known to hold no block's end.
    searched: usize,
}

impl SseBlocks {
    /// `len` new bytes at the end, to read into.
    fn tail(&mut self, len: usize) -> &mut [u8] {
        let start = self.pending.len();
        self.pending.resize(start + len, 0);
        &mut self.pending[start..]
    }

    /// Ends the chunk just read into [`Self::tail`]: drops the CRLF that
    /// closes it, which must be there.
    fn end_chunk(&mut self) -> Result<(), String> {
        if !self.pending.ends_with(b"\r\n") {
            return Err("a chunk without its closing CRLF".into());
        }
        self.pending.truncate(self.pending.len() - 2);
        Ok(())
    }

    /// Hands `each` every complete block, in order, and keeps the rest.
    fn take(&mut self, mut each: impl FnMut(&[u8])) {
        let mut start = 0;
        self.searched = self.searched.min(self.pending.len());
        while let Some(end) = memchr::memmem::find(&self.pending[self.searched..], b"\n\n") {
            let end = self.searched + end + 2;
            each(&self.pending[start..end]);
            start = end;
            self.searched = end;
        }
        self.pending.drain(..start);
        // The last byte may be the first of a block's end.
        self.searched = self.pending.len().saturating_sub(1);
    }
}

/// A `rows` event's data: the only field read is each row's receipt time.
#[derive(serde::Deserialize)]
struct RowsEvent {
    rows: Vec<RowReceived>,
}

/// A delivered row, of which only `received_at` is read.
#[derive(serde::Deserialize)]
struct RowReceived {
    #[serde(default)]
    received_at: ReceivedAt,
}

/// A row's `received_at` in milliseconds since the epoch, when it is an
/// RFC 3339 string; a row without one (or with anything else there) is
/// counted as delivered but not timed.
#[derive(Default)]
struct ReceivedAt(Option<i64>);

impl<'de> serde::Deserialize<'de> for ReceivedAt {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = ReceivedAt;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_str<E>(self, text: &str) -> Result<ReceivedAt, E> {
                let at = chrono::DateTime::parse_from_rfc3339(text).ok();
                Ok(ReceivedAt(at.map(|at| at.timestamp_millis())))
            }
            fn visit_bool<E>(self, _: bool) -> Result<ReceivedAt, E> {
                Ok(ReceivedAt(None))
            }
            fn visit_i64<E>(self, _: i64) -> Result<ReceivedAt, E> {
                Ok(ReceivedAt(None))
            }
            fn visit_u64<E>(self, _: u64) -> Result<ReceivedAt, E> {
                Ok(ReceivedAt(None))
            }
            fn visit_f64<E>(self, _: f64) -> Result<ReceivedAt, E> {
                Ok(ReceivedAt(None))
            }
            fn visit_unit<E>(self) -> Result<ReceivedAt, E> {
                Ok(ReceivedAt(None))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                seq: A,
            ) -> Result<ReceivedAt, A::Error> {
                serde::de::IgnoredAny.visit_seq(seq)?;
                Ok(ReceivedAt(None))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<ReceivedAt, A::Error> {
                serde::de::IgnoredAny.visit_map(map)?;
                Ok(ReceivedAt(None))
            }
        }
        deserializer.deserialize_any(Visit)
    }
}

/// Records the rows of one block if it is a `rows` event, as delivered at
/// `now_ms`.
fn record(block: &[u8], now_ms: i64, outcome: &mut Outcome) {
    let mut lines = block
        .split(|&b| b == b'\n')
        .map(|line| line.strip_suffix(b"\r").unwrap_or(line));
    if !lines.clone().any(|l| l == b"event: rows") {
        return;
    }
    let Some(data) = lines.find_map(|l| l.strip_prefix(b"data: ")) else {
        return;
    };
    let Ok(event) = serde_json::from_slice::<RowsEvent>(data) else {
        outcome.unreadable_events += 1;
        return;
    };
    outcome.events += 1;
    for row in event.rows {
        if let ReceivedAt(Some(received_ms)) = row.received_at {
            let micros = (now_ms - received_ms).max(0) as u64 * 1000;
            outcome.latencies.saturating_record(micros.max(1));
        }
    }
}

fn histogram() -> Result<Histogram<u64>, FollowersError> {
    crate::run::new_histogram().map_err(|e| FollowersError::Histogram(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome() -> Outcome {
        Outcome {
            latencies: histogram().expect("histogram"),
            events: 0,
            unreadable_events: 0,
            error: None,
        }
    }

    /// Feeds `stream` to an [`SseBlocks`] in chunks of `size` bytes.
    fn blocks_of(stream: &[u8], size: usize) -> Vec<Vec<u8>> {
        let mut blocks = SseBlocks::default();
        let mut seen = Vec::new();
        for chunk in stream.chunks(size) {
            let tail = blocks.tail(chunk.len() + 2);
            tail[..chunk.len()].copy_from_slice(chunk);
            tail[chunk.len()..].copy_from_slice(b"\r\n");
            blocks.end_chunk().expect("a whole chunk");
            blocks.take(|block| seen.push(block.to_vec()));
        }
        seen
    }

    #[test]
    fn blocks_come_whole_however_the_chunks_cut_them() {
        let stream = b"event: start\ndata: {}\n\nevent: rows\nid: p1\ndata: {\"rows\":[]}\n\n: ping\n\nevent: rows\ndata: {";
        let whole = blocks_of(stream, stream.len());
        assert_eq!(
            whole,
            vec![
                b"event: start\ndata: {}\n\n".to_vec(),
                b"event: rows\nid: p1\ndata: {\"rows\":[]}\n\n".to_vec(),
                b": ping\n\n".to_vec(),
            ]
        );
        for size in 1..stream.len() {
            assert_eq!(blocks_of(stream, size), whole, "chunks of {size} bytes");
        }
    }

    #[test]
    fn a_rows_event_times_every_row_with_a_receipt_time_and_counts_the_rest() {
        let mut outcome = outcome();
        let now_ms = chrono::DateTime::parse_from_rfc3339("2026-12-02T05:00:00.250Z")
            .expect("time")
            .timestamp_millis();
        // Timed: a plain and an escaped time. Delivered, not timed: none, null,
        // a number, an object.
        let rows = r#"[{"received_at":"2026-12-02T05:00:00.000Z","soc_pct":1.5},
            {"soc_pct":2},{"received_at":null},{"received_at":1764651600000},
            {"received_at":{"at":1}},{"received_at":"2026-12-02T05:00:00.000\u005a"}]"#
            .replace('\n', "");
        let block =
            format!("event: rows\r\nid: p\r\ndata: {{\"table\":\"charging\",\"rows\":{rows}}}\n\n");
        record(block.as_bytes(), now_ms, &mut outcome);
        assert_eq!((outcome.events, outcome.unreadable_events), (1, 0));
        assert_eq!(outcome.latencies.len(), 2);
        assert!(
            outcome
                .latencies
                .equivalent(outcome.latencies.max(), 250_000)
        );
        // Any other event records nothing.
        record(
            b"event: position\nid: p\ndata: {}\n\n",
            now_ms,
            &mut outcome,
        );
        assert_eq!((outcome.events, outcome.latencies.len()), (1, 2));
        // Rows that are not an array of objects: counted, not timed.
        for data in [
            r#"{"rows":7}"#,
            r#"{"rows":[1]}"#,
            r#"{"table":"charging"}"#,
        ] {
            let block = format!("event: rows\ndata: {data}\n\n");
            record(block.as_bytes(), now_ms, &mut outcome);
        }
        assert_eq!((outcome.events, outcome.unreadable_events), (1, 3));
        assert_eq!(outcome.latencies.len(), 2);
    }
}
