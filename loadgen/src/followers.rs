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
    let (mut events, mut errors, mut first_error) = (0, 0, None);
    for task in tasks {
        let outcome = task
            .await
            .map_err(|e| FollowersError::Task(e.to_string()))?;
        latencies
            .add(&outcome.latencies)
            .map_err(|e| FollowersError::Task(e.to_string()))?;
        events += outcome.events;
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
    let mut pending = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).await.map_err(text)? == 0 {
            return Ok(());
        }
        let size = usize::from_str_radix(line.trim(), 16).map_err(|e| e.to_string())?;
        if size == 0 {
            return Ok(());
        }
        let mut chunk = vec![0; size + 2];
        reader.read_exact(&mut chunk).await.map_err(text)?;
        chunk.truncate(size);
        pending.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = pending.find("\n\n") {
            let block: String = pending.drain(..end + 2).collect();
            record(&block, outcome);
        }
    }
}

/// Records the rows of one `rows` event.
fn record(block: &str, outcome: &mut Outcome) {
    if !block.lines().any(|l| l == "event: rows") {
        return;
    }
    let now_ms = chrono::Utc::now().timestamp_millis();
    let Some(data) = block.lines().find_map(|l| l.strip_prefix("data: ")) else {
        return;
    };
    let Ok(event) = serde_json::from_str::<serde_json::Value>(data) else {
        return;
    };
    outcome.events += 1;
    for row in event["rows"].as_array().into_iter().flatten() {
        let received = row["received_at"]
            .as_str()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok());
        if let Some(received) = received {
            let micros = (now_ms - received.timestamp_millis()).max(0) as u64 * 1000;
            outcome.latencies.saturating_record(micros.max(1));
        }
    }
}

fn histogram() -> Result<Histogram<u64>, FollowersError> {
    crate::run::new_histogram().map_err(|e| FollowersError::Histogram(e.to_string()))
}
