//! The admin HTTP endpoint: `GET /metrics` in the Prometheus text format,
//! `POST /admin/events` for vehicle events (see [`crate::events`]), plus a
//! periodic one-line throughput summary in the log.
//!
//! It runs on its own thread with a single-threaded tokio runtime, so it
//! never competes with the pipeline's threads. It has no authentication:
//! keep it on loopback or behind your own access control.

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use tokio::sync::oneshot;

use crate::config::RetentionConfig;
use crate::events::{self, EventError, EventRequest};
use crate::metrics::Metrics;
use crate::privacy::PrivacyShared;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("admin HTTP on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start the admin HTTP thread: {0}")]
    Thread(std::io::Error),
}

/// A queue whose depth `/metrics` reports.
pub struct Queue {
    pub name: String,
    pub depth: Box<dyn Fn() -> usize + Send + Sync>,
}

/// What the endpoint reads.
pub struct AdminState {
    pub metrics: Arc<Metrics>,
    pub queues: Vec<Queue>,
    /// The vault vehicle events change.
    pub privacy: Arc<PrivacyShared>,
    /// Where vehicle events are audited and deletion requests kept.
    pub retention: RetentionConfig,
}

/// The running endpoint; dropping it without `stop` leaves it running.
pub struct AdminHttp {
    pub addr: SocketAddr,
    stop: oneshot::Sender<()>,
    thread: JoinHandle<()>,
}

impl AdminHttp {
    /// Stops serving and waits for the thread.
    pub fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.thread.join();
    }
}

/// Binds `addr` and serves until stopped; logs a throughput line every
/// `summary_every` (none when zero).
pub fn spawn(
    addr: SocketAddr,
    state: AdminState,
    summary_every: Duration,
) -> Result<AdminHttp, HttpError> {
    let listener =
        std::net::TcpListener::bind(addr).map_err(|source| HttpError::Bind { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| HttpError::Bind { addr, source })?;
    listener
        .set_nonblocking(true)
        .map_err(|source| HttpError::Bind { addr, source })?;
    let (stop, stopped) = oneshot::channel::<()>();
    let state = Arc::new(state);
    let thread = std::thread::Builder::new()
        .name("admin-http".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = %e, "admin HTTP runtime");
                    return;
                }
            };
            runtime.block_on(serve(listener, state, stopped, summary_every));
        })
        .map_err(HttpError::Thread)?;
    Ok(AdminHttp {
        addr: bound,
        stop,
        thread,
    })
}

async fn serve(
    listener: std::net::TcpListener,
    state: Arc<AdminState>,
    stopped: oneshot::Receiver<()>,
    summary_every: Duration,
) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "admin HTTP listener");
            return;
        }
    };
    if !summary_every.is_zero() {
        tokio::spawn(summaries(state.metrics.clone(), summary_every));
    }
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/admin/events", post(vehicle_event))
        .with_state(state);
    let shutdown = async {
        let _ = stopped.await;
    };
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
    {
        tracing::error!(error = %e, "admin HTTP stopped");
    }
}

async fn metrics(State(state): State<Arc<AdminState>>) -> impl IntoResponse {
    let queues: Vec<(String, usize)> = state
        .queues
        .iter()
        .map(|q| (q.name.clone(), (q.depth)()))
        .collect();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.prometheus(&queues),
    )
}

/// Applies one vehicle event; 400 for a bad request, 501 for an event
/// fleetgate cannot act on yet, 500 if the vault or audit log fails.
async fn vehicle_event(
    State(state): State<Arc<AdminState>>,
    Json(request): Json<EventRequest>,
) -> impl IntoResponse {
    let outcome = events::apply(
        &state.privacy,
        &state.retention,
        &request,
        crate::ingest::now_ms(),
    );
    match outcome {
        Ok(effect) => (
            StatusCode::OK,
            Json(serde_json::json!({ "event": request.event.name(), "effect": effect })),
        ),
        Err(e) => {
            let status = match e {
                EventError::InvalidVin
                | EventError::ConsentMissing(_)
                | EventError::IdMissing(_) => StatusCode::BAD_REQUEST,
                EventError::LegalHold(_) => StatusCode::CONFLICT,
                EventError::Vault(_) | EventError::Audit { .. } | EventError::Request(_) => {
                    tracing::error!(error = %e, event = request.event.name(), "vehicle event failed");
                    StatusCode::INTERNAL_SERVER_ERROR
                }
            };
            (status, Json(serde_json::json!({ "error": e.to_string() })))
        }
    }
}

/// One info line per interval: rates since the previous line.
async fn summaries(metrics: Arc<Metrics>, every: Duration) {
    let mut ticker = tokio::time::interval(every);
    ticker.tick().await;
    let mut last = metrics.totals();
    loop {
        ticker.tick().await;
        let now = metrics.totals();
        let secs = every.as_secs_f64();
        let snap = metrics.snapshot();
        tracing::info!(
            received_per_s = ((now.received - last.received) as f64 / secs).round(),
            stored_per_s = ((now.stored - last.stored) as f64 / secs).round(),
            rejected = now.rejected - last.rejected,
            dropped_by_policy = now.dropped - last.dropped,
            discarded_per_s = ((now.discarded - last.discarded) as f64 / secs).round(),
            durable_p99_ms = snap.receipt_to_durable_ms.p99,
            queryable_p99_ms = snap.receipt_to_queryable_ms.p99,
            "throughput"
        );
        last = now;
    }
}
