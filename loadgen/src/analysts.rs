//! Concurrent analysts: the query suite run by N principals at once through
//! fleetgate's Flight SQL endpoint, each client through the whole suite
//! once and on in a loop until the time is up, every query's latency
//! recorded. Run it beside `loadgen run` to see
//! what queries cost ingest, and ingest what it costs queries.
//!
//! Each client is an operator principal of its own, registered through the
//! admin routes (`POST /admin/principals` with the admin token), so that the
//! server's per-principal limit counts each client separately.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use arrow_flight::sql::client::FlightSqlServiceClient;
use futures::TryStreamExt;
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::queries::Query;

#[derive(Debug, thiserror::Error)]
pub enum AnalystsError {
    #[error("registering a principal at {addr}: {reason}")]
    Admin { addr: SocketAddr, reason: String },
    #[error("connecting to Flight SQL at {addr}: {reason}")]
    Connect { addr: SocketAddr, reason: String },
    #[error("the suite has no statements")]
    EmptySuite,
    #[error("a client task failed: {0}")]
    Task(String),
    #[error("latency histogram: {0}")]
    Histogram(String),
}

/// Where and how long the analysts query.
pub struct Analysts {
    pub flight_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub admin_token: String,
    pub purpose: String,
    pub clients: usize,
    pub duration: Duration,
}

/// What the analysts measured.
#[derive(Debug, Serialize)]
pub struct AnalystsReport {
    pub clients: usize,
    pub seconds: f64,
    pub queries: u64,
    pub queries_per_second: f64,
    pub errors: u64,
    /// The first error's text, to tell a refusal or a limit from a failure.
    pub first_error: Option<String>,
    #[serde(flatten)]
    pub latency: crate::run::LatencySummary,
}

/// Runs the suite as `analysts.clients` principals at once.
pub async fn run(analysts: &Analysts, suite: &[Query]) -> Result<AnalystsReport, AnalystsError> {
    if suite.is_empty() {
        return Err(AnalystsError::EmptySuite);
    }
    let run_tag = fastrand::u32(..);
    let mut clients = Vec::new();
    for i in 0..analysts.clients {
        let token = add_operator(
            analysts.admin_addr,
            &analysts.admin_token,
            &format!("loadgen-analyst-{run_tag:08x}-{i}"),
        )?;
        let mut client = connect(analysts.flight_addr).await?;
        client.set_token(token);
        client.set_header("x-fleetgate-purpose", analysts.purpose.clone());
        clients.push(client);
    }
    let started = Instant::now();
    let deadline = started + analysts.duration;
    let mut tasks = Vec::new();
    for (i, client) in clients.into_iter().enumerate() {
        let suite = suite.to_vec();
        let latencies = histogram()?;
        tasks.push(tokio::spawn(analyst(client, suite, i, deadline, latencies)));
    }
    let mut latencies = histogram()?;
    let mut errors = 0;
    let mut first_error = None;
    for task in tasks {
        let outcome = task.await.map_err(|e| AnalystsError::Task(e.to_string()))?;
        latencies
            .add(&outcome.latencies)
            .map_err(|e| AnalystsError::Task(e.to_string()))?;
        errors += outcome.errors;
        if first_error.is_none() {
            first_error = outcome.first_error;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(AnalystsReport {
        clients: analysts.clients,
        seconds,
        queries: latencies.len(),
        queries_per_second: latencies.len() as f64 / seconds,
        errors,
        first_error,
        latency: (&latencies).into(),
    })
}

/// One client's answered queries (µs) and errors.
struct Outcome {
    latencies: Histogram<u64>,
    errors: u64,
    first_error: Option<String>,
}

/// Runs the suite in a loop, from statement `offset` on: once through, and
/// on until `deadline`.
async fn analyst(
    mut client: FlightSqlServiceClient<tonic::transport::Channel>,
    suite: Vec<Query>,
    offset: usize,
    deadline: Instant,
    latencies: Histogram<u64>,
) -> Outcome {
    let mut outcome = Outcome {
        latencies,
        errors: 0,
        first_error: None,
    };
    let mut next = offset;
    while next < offset + suite.len() || Instant::now() < deadline {
        let query = &suite[next % suite.len()];
        next += 1;
        let started = Instant::now();
        match one_query(&mut client, &query.sql).await {
            Ok(_rows) => {
                let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
                outcome.latencies.saturating_record(micros.max(1));
            }
            Err(e) => {
                outcome.errors += 1;
                outcome
                    .first_error
                    .get_or_insert_with(|| format!("{}: {e}", query.name));
            }
        }
    }
    outcome
}

/// Plans, fetches and counts one statement's rows.
async fn one_query(
    client: &mut FlightSqlServiceClient<tonic::transport::Channel>,
    sql: &str,
) -> Result<usize, arrow_flight::error::FlightError> {
    let info = client.execute(sql.to_owned(), None).await?;
    let mut rows = 0;
    for endpoint in info.endpoint {
        let Some(ticket) = endpoint.ticket else {
            continue;
        };
        let mut batches = client.do_get(ticket).await?;
        while let Some(batch) = batches.try_next().await? {
            rows += batch.num_rows();
        }
    }
    Ok(rows)
}

async fn connect(
    addr: SocketAddr,
) -> Result<FlightSqlServiceClient<tonic::transport::Channel>, AnalystsError> {
    let failed = |e: &dyn std::fmt::Display| AnalystsError::Connect {
        addr,
        reason: e.to_string(),
    };
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| failed(&e))?
        .connect()
        .await
        .map_err(|e| failed(&e))?;
    Ok(FlightSqlServiceClient::new(channel))
}

fn histogram() -> Result<Histogram<u64>, AnalystsError> {
    crate::run::new_histogram().map_err(|e| AnalystsError::Histogram(e.to_string()))
}

/// Registers an operator principal through the admin routes; its token.
pub(crate) fn add_operator(
    addr: SocketAddr,
    admin_token: &str,
    id: &str,
) -> Result<String, AnalystsError> {
    let failed = |reason: String| AnalystsError::Admin { addr, reason };
    let body = format!(r#"{{"id":"{id}","kind":"operator"}}"#);
    let request = format!(
        "POST /admin/principals HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {admin_token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut stream = std::net::TcpStream::connect(addr).map_err(|e| failed(e.to_string()))?;
    stream
        .write_all(request.as_bytes())
        .map_err(|e| failed(e.to_string()))?;
    let mut answer = String::new();
    stream
        .read_to_string(&mut answer)
        .map_err(|e| failed(e.to_string()))?;
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .ok_or_else(|| failed("no HTTP answer".into()))?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(failed(head.lines().next().unwrap_or_default().to_owned()));
    }
    let answer: serde_json::Value =
        serde_json::from_str(body).map_err(|e| failed(format!("answer: {e}")))?;
    answer["token"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| failed("the answer has no token".into()))
}
