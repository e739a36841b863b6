//! The HTTP endpoint: `GET /metrics` in the Prometheus text format,
//! `POST /admin/events` for vehicle events (see [`crate::lifecycle::events`]),
//! `/admin/principals`, `/admin/transfers` and `/admin/grants` for the
//! access registry, a periodic one-line throughput summary in the log, and
//! for principals (bearer token): `POST /sql` and `GET /export` through
//! the Data Act policy (see [`crate::access`]), `POST /grants`,
//! `DELETE /grants/{id}` for users to give and revoke grants, `GET /live`
//! to follow their views as rows arrive, `GET /account` for a user's
//! vehicles and grants, `GET /dictionary`, the data dictionary, and the
//! user's web page, `GET /portal` ([`crate::ops::portal`]).
//!
//! It runs on its own thread with a single-threaded tokio runtime
//! ([`crate::ops::served`]), so it
//! never competes with the pipeline's threads. `/sql` and `/export` run on
//! the query runtime ([`crate::ops::queries`]), so a query never holds up
//! `/metrics`, the admin routes or ingest. The `/admin`
//! routes answer a loopback peer that presents the admin token
//! ([`crate::ops::admin_token`]) as its bearer token: behind a reverse proxy
//! on the same host every peer is loopback, so the token is what protects
//! them, and a page in a browser (DNS rebinding) cannot send the header.
//! `/metrics`, `/dictionary` and the portal's files have no
//! authentication: they carry counters, descriptions and code only.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, prometheus_text};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tokio::sync::oneshot;

use crate::access::registry::{GrantRequest, PrincipalKind, Role};
use crate::access::{AccessEnv, AccessError};
use crate::ingest::auth::{AuthCounters, Credentials, Refusal};
use crate::lifecycle::events::{self, EventError, EventRequest};
use crate::metrics::{Metrics, encode_family, unlabelled};
use crate::ops::admin_token::AdminToken;
use crate::ops::queries::QueryRuntime;
use crate::ops::served::{self, ServeError, Served};
use crate::privacy::stage::PrivacyShared;
use crate::query::OutputFormat;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error(transparent)]
    Serve(#[from] ServeError),
}

/// A queue whose depth `/metrics` reports.
pub struct Queue {
    pub name: String,
    pub depth: Box<dyn Fn() -> usize + Send + Sync>,
}

/// The pipeline's queues, as the `fleetgate_queue_depth` gauge.
struct QueueDepths(Vec<Queue>);

impl std::fmt::Debug for QueueDepths {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|q| &q.name))
            .finish()
    }
}

impl Collector for QueueDepths {
    fn encode(&self, mut out: DescriptorEncoder) -> std::fmt::Result {
        let samples = self
            .0
            .iter()
            .map(|q| (vec![("queue", q.name.clone())], (q.depth)() as u64));
        encode_family(
            &mut out,
            "queue_depth",
            "Items waiting in a pipeline queue.",
            MetricType::Gauge,
            samples,
        )
    }
}

/// The CONNECT counters of the password-checked listeners.
struct ConnectCounters(Arc<Credentials>);

impl std::fmt::Debug for ConnectCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ConnectCounters")
    }
}

impl Collector for ConnectCounters {
    fn encode(&self, mut out: DescriptorEncoder) -> std::fmt::Result {
        use std::sync::atomic::Ordering::Relaxed;
        let counters: &AuthCounters = &self.0.counters;
        encode_family(
            &mut out,
            "mqtt_connects_accepted",
            "CONNECTs whose password was right.",
            MetricType::Counter,
            unlabelled(counters.accepted.load(Relaxed)),
        )?;
        let refused = Refusal::ALL.iter().map(|&refusal| {
            (
                vec![("reason", refusal.as_str().to_owned())],
                counters.refused[refusal as usize].load(Relaxed),
            )
        });
        encode_family(
            &mut out,
            "mqtt_connects_refused",
            "CONNECTs refused, by reason.",
            MetricType::Counter,
            refused,
        )
    }
}

/// What `/metrics` serves, read at each scrape: the pipeline's counters and
/// latency histograms, its queues' depths, and the CONNECT counters when
/// the plain listeners check passwords. Every name starts `fleetgate_`.
pub fn exposition(
    metrics: Arc<Metrics>,
    queues: Vec<Queue>,
    credentials: Option<Arc<Credentials>>,
) -> Registry {
    let mut registry = Registry::with_prefix("fleetgate");
    registry.register_collector(Box::new(metrics));
    registry.register_collector(Box::new(QueueDepths(queues)));
    if let Some(credentials) = credentials {
        registry.register_collector(Box::new(ConnectCounters(credentials)));
    }
    registry
}

/// What the endpoint reads.
pub struct AdminState {
    pub metrics: Arc<Metrics>,
    /// What `/metrics` serves (see [`exposition`]).
    pub exposition: Registry,
    /// The vault vehicle events change.
    pub privacy: Arc<PrivacyShared>,
    /// Where vehicle events are audited and deletion requests kept.
    pub lifecycle: crate::lifecycle::requests::LifecycleState,
    /// Principals, grants and the policy `/sql` and `/export` run under.
    pub access: Arc<AccessEnv>,
    /// The vehicle credential store, when the plain listeners need passwords.
    pub credentials: Option<Arc<Credentials>>,
    /// What every `/admin` route requires as its bearer token.
    pub admin_token: AdminToken,
}

/// Binds `addr` and serves until stopped; logs a throughput line every
/// `summary_every` (none when zero).
pub fn spawn(
    addr: SocketAddr,
    state: AdminState,
    queries: QueryRuntime,
    summary_every: Duration,
) -> Result<Served, HttpError> {
    let state = Arc::new(state);
    Ok(served::spawn(
        "admin HTTP",
        "admin-http",
        addr,
        move |listener, stopped| serve(listener, state, queries, stopped, summary_every),
    )?)
}

async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AdminState>,
    queries: QueryRuntime,
    stopped: oneshot::Receiver<()>,
    summary_every: Duration,
) {
    let stopping = futures::FutureExt::shared(futures::FutureExt::boxed(async move {
        let _ = stopped.await;
    }));
    if !summary_every.is_zero() {
        tokio::spawn(summaries(state.metrics.clone(), summary_every));
    }
    // The admin routes need a loopback peer and the admin token, so that
    // exposing the port for /sql, /export and /grants exposes nothing else.
    let admin = Router::new()
        .route("/admin/events", post(vehicle_event))
        .route("/admin/principals", post(add_principal))
        .route("/admin/transfers", post(transfer))
        .route("/admin/grants", post(grant))
        .route("/admin/grants/{id}", delete(revoke))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            admin_only,
        ));
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/health", get(health))
        .route("/grants", post(user_grant))
        .route("/grants/{id}", delete(user_revoke))
        .route("/sql", post(sql))
        .route("/export", get(export))
        .route("/dictionary", get(dictionary))
        .route("/live", get(live))
        .route("/account", get(account))
        .route("/portal", get(crate::ops::portal::page))
        .route("/portal/portal.js", get(crate::ops::portal::script))
        .route("/portal/portal.css", get(crate::ops::portal::style))
        .merge(admin)
        .layer(axum::Extension(queries))
        .layer(axum::Extension(Stopping(stopping.clone())))
        .with_state(state);
    let app = app.into_make_service_with_connect_info::<SocketAddr>();
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(stopping)
        .await
    {
        tracing::error!(error = %e, "admin HTTP stopped");
    }
}

/// Resolves when the endpoint stops: live streams end then, so that the
/// graceful shutdown does not wait for them.
#[derive(Clone)]
struct Stopping(futures::future::Shared<futures::future::BoxFuture<'static, ()>>);

/// For a load balancer's health check: 200 while this node takes
/// publishes and acknowledges them; 503 while, in a cluster, it may not act
/// under its name (it would hold its vehicles' publishes unacknowledged), so
/// that their next connections go to another node.
async fn health(State(state): State<Arc<AdminState>>) -> Response {
    match state
        .metrics
        .fenced
        .load(std::sync::atomic::Ordering::Relaxed)
    {
        false => (StatusCode::OK, "ok\n").into_response(),
        true => (
            StatusCode::SERVICE_UNAVAILABLE,
            "fenced: this node lost the lease on its name\n",
        )
            .into_response(),
    }
}

async fn metrics(State(state): State<Arc<AdminState>>) -> Response {
    let mut text = String::new();
    match prometheus_text::encode(&mut text, &state.exposition) {
        Ok(()) => (
            [(header::CONTENT_TYPE, prometheus_text::CONTENT_TYPE)],
            text,
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// Lets a request through to an admin route only from a loopback peer (403
/// otherwise) that presents the admin token as its bearer token (401
/// otherwise; a principal's token is not it).
async fn admin_only(
    State(state): State<Arc<AdminState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if !peer.ip().is_loopback() {
        let refusal = serde_json::json!({ "error": "the admin routes answer loopback only" });
        return (StatusCode::FORBIDDEN, Json(refusal)).into_response();
    }
    let presented = bearer_token(request.headers());
    if !presented.is_some_and(|token| state.admin_token.matches(token)) {
        let refusal = serde_json::json!({
            "error": "the admin routes need the admin token (admin.token_file) as Authorization: Bearer"
        });
        return (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            Json(refusal),
        )
            .into_response();
    }
    next.run(request).await
}

/// The request's `Authorization: Bearer` token, if it has one.
fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

/// Applies one vehicle event; 400 for a bad request, 501 for an event
/// fleetgate cannot act on yet, 500 if the vault or audit log fails.
async fn vehicle_event(
    State(state): State<Arc<AdminState>>,
    Json(request): Json<EventRequest>,
) -> impl IntoResponse {
    let now = crate::core::clock::now_ms();
    // Tenures and grants end first: a legal hold may refuse the erasure,
    // never the end of the old holder's access.
    if let Some(ending) = crate::access::registry::Ending::of(request.event)
        && crate::privacy::pseudo::is_vin(&request.vin)
        && let Err(e) = state.access.end_holding(&request.vin, ending, now)
    {
        tracing::error!(error = %e, event = request.event.name(), "vehicle event failed");
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(serde_json::json!({ "error": e.to_string() })),
        );
    }
    let outcome = events::apply(&state.privacy, &state.lifecycle, &request, now);
    // No plan made before the event runs after it.
    state.access.forget_described();
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

/// An access error as an HTTP answer: 401 unknown principal, 403 refused
/// (the body names the rule), 400 bad request, SQL or over a bound, 500
/// otherwise.
fn access_error(e: &AccessError) -> Response {
    let status = match e {
        AccessError::UnknownPrincipal => StatusCode::UNAUTHORIZED,
        AccessError::Refused(_) => StatusCode::FORBIDDEN,
        AccessError::Invalid(_) | AccessError::DataFusion(_) | AccessError::Limit(_) => {
            StatusCode::BAD_REQUEST
        }
        AccessError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        _ => {
            tracing::error!(error = %e, "access request failed");
            StatusCode::INTERNAL_SERVER_ERROR
        }
    };
    (status, Json(serde_json::json!({ "error": e.to_string() }))).into_response()
}

/// The principal of the request's `Authorization: Bearer` token.
fn bearer(
    state: &AdminState,
    headers: &HeaderMap,
) -> Result<crate::access::registry::Principal, AccessError> {
    let token = bearer_token(headers).ok_or(AccessError::UnknownPrincipal)?;
    state.access.authenticate(token)
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SqlRequest {
    sql: String,
    purpose: String,
    #[serde(default)]
    format: ResultFormat,
    /// `local` (the default) or `ballista`: the cluster
    /// `access.ballista_scheduler` names.
    #[serde(default)]
    engine: crate::access::Engine,
}

/// How `POST /sql` answers.
#[derive(Debug, Clone, Copy, Default, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
enum ResultFormat {
    #[default]
    Json,
    Csv,
    /// Arrow IPC stream.
    Arrow,
}

/// Runs `work` on the query runtime; a task that panicked is a 500.
async fn run_query<T: Send + 'static>(
    queries: &QueryRuntime,
    work: impl std::future::Future<Output = Result<T, AccessError>> + Send + 'static,
) -> Result<T, Response> {
    match queries.run(work).await {
        Ok(Ok(done)) => Ok(done),
        Ok(Err(e)) => Err(access_error(&e)),
        Err(e) => {
            tracing::error!(error = %e, "query task failed");
            let body = serde_json::json!({ "error": "the query failed" });
            Err((StatusCode::INTERNAL_SERVER_ERROR, Json(body)).into_response())
        }
    }
}

/// Runs one statement as the bearer's principal for the named purpose.
async fn sql(
    State(state): State<Arc<AdminState>>,
    axum::Extension(queries): axum::Extension<QueryRuntime>,
    headers: HeaderMap,
    Json(request): Json<SqlRequest>,
) -> Response {
    let principal = match bearer(&state, &headers) {
        Ok(p) => p,
        Err(e) => return access_error(&e),
    };
    let SqlRequest {
        sql,
        purpose,
        format,
        engine,
    } = request;
    let access = Arc::clone(&state.access);
    // Made into text on the query pool too, and within the query memory
    // bound: an answer small as Arrow can be a large text.
    let job = async move {
        let now_ms = crate::core::clock::now_ms();
        let answer = access
            .query_on(engine, &principal, &purpose, &sql, now_ms)
            .await?;
        let most_bytes = (access.settings.query_memory_mb as usize) << 20;
        let text = |format| {
            crate::query::format_within(&answer.batches, format, most_bytes).map_err(|e| match e {
                crate::query::QueryError::TooLarge { .. } => AccessError::Limit(format!(
                    "{e}, the query memory bound (access.query_memory_mb): select fewer rows \
                     or columns, or ask for format arrow"
                )),
                e => AccessError::Query(e),
            })
        };
        let body = match format {
            ResultFormat::Json => ("application/json", text(OutputFormat::Json)?.into_bytes()),
            ResultFormat::Csv => ("text/csv", text(OutputFormat::Csv)?.into_bytes()),
            ResultFormat::Arrow => (
                "application/vnd.apache.arrow.stream",
                arrow_ipc(&answer.batches).map_err(AccessError::Query)?,
            ),
        };
        Ok((answer.request_id.clone(), body))
    };
    let (request_id, (content_type, bytes)) = match run_query(&queries, job).await {
        Ok(answered) => answered,
        Err(response) => return response,
    };
    (
        [
            (header::CONTENT_TYPE, content_type.to_owned()),
            (header::HeaderName::from_static("x-request-id"), request_id),
        ],
        bytes,
    )
        .into_response()
}

fn arrow_ipc(batches: &[arrow::array::RecordBatch]) -> Result<Vec<u8>, crate::query::QueryError> {
    let schema = batches
        .first()
        .map(|b| b.schema())
        .unwrap_or_else(|| Arc::new(arrow::datatypes::Schema::empty()));
    let mut writer = arrow::ipc::writer::StreamWriter::try_new(Vec::new(), &schema)?;
    for batch in batches {
        writer.write(batch)?;
    }
    writer.finish()?;
    Ok(writer.into_inner()?)
}

/// The bearer's Art. 4 export as one JSON document.
async fn export(
    State(state): State<Arc<AdminState>>,
    axum::Extension(queries): axum::Extension<QueryRuntime>,
    headers: HeaderMap,
) -> Response {
    bearer_json(&state, &queries, &headers, |access, user| async move {
        access
            .export(&user, crate::core::clock::now_ms())
            .await?
            .to_json()
    })
    .await
}

/// Runs `work` for the bearer's principal on the query runtime; its JSON
/// document, or the error's status and text.
async fn bearer_json<F, Fut>(
    state: &AdminState,
    queries: &QueryRuntime,
    headers: &HeaderMap,
    work: F,
) -> Response
where
    F: FnOnce(Arc<AccessEnv>, crate::access::registry::Principal) -> Fut,
    Fut: std::future::Future<Output = Result<serde_json::Value, AccessError>> + Send + 'static,
{
    let principal = match bearer(state, headers) {
        Ok(principal) => principal,
        Err(e) => return access_error(&e),
    };
    match run_query(queries, work(Arc::clone(&state.access), principal)).await {
        Ok(document) => Json(document).into_response(),
        Err(response) => response,
    }
}

/// The bearer user's account: vehicles held, grants given, last reads.
async fn account(
    State(state): State<Arc<AdminState>>,
    axum::Extension(queries): axum::Extension<QueryRuntime>,
    headers: HeaderMap,
) -> Response {
    bearer_json(&state, &queries, &headers, |access, user| async move {
        access.account(&user, crate::core::clock::now_ms()).await
    })
    .await
}

/// The data dictionary: what each table holds, how it is treated, how
/// long it is kept. Open to all, like the schemas it is made from: it
/// describes, and holds no data.
async fn dictionary(State(state): State<Arc<AdminState>>) -> Response {
    match state.access.dictionary() {
        Ok(document) => Json(document).into_response(),
        Err(e) => {
            // Anyone may ask: the reason (a path, say) goes to the log only.
            tracing::error!(error = %e, "the data dictionary");
            let body = serde_json::json!({ "error": "the data dictionary is unavailable" });
            (StatusCode::INTERNAL_SERVER_ERROR, Json(body)).into_response()
        }
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct LiveRequest {
    /// The tables to follow, comma-separated.
    tables: String,
    /// The purpose, if not in the `x-fleetgate-purpose` header.
    purpose: Option<String>,
    /// Where to resume, if not in the `Last-Event-ID` header.
    from: Option<String>,
}

/// A live stream of the bearer's views as Server-Sent Events: `start`,
/// then `rows` (a table's new rows as JSON objects) and `position` (new
/// commits with nothing for this view), each with the position as its id,
/// and `end` with the reason when the policy or an error ends it. A client
/// resumes with `Last-Event-ID` (browsers send it on reconnecting).
async fn live(
    State(state): State<Arc<AdminState>>,
    axum::Extension(queries): axum::Extension<QueryRuntime>,
    axum::Extension(Stopping(stopping)): axum::Extension<Stopping>,
    headers: HeaderMap,
    axum::extract::Query(request): axum::extract::Query<LiveRequest>,
) -> Response {
    use axum::response::sse::{KeepAlive, Sse};
    let principal = match bearer(&state, &headers) {
        Ok(p) => p,
        Err(e) => return access_error(&e),
    };
    let header_text = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let purpose = request
        .purpose
        .or_else(|| header_text("x-fleetgate-purpose"))
        .unwrap_or_default();
    let from = header_text("last-event-id").or(request.from);
    let mut tables: Vec<String> = request
        .tables
        .split(',')
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty())
        .collect();
    tables.sort();
    tables.dedup();
    let access = Arc::clone(&state.access);
    let job = async move {
        access
            .open_live(
                &principal,
                &purpose,
                &tables,
                from.as_deref(),
                crate::core::clock::now_ms(),
            )
            .await
    };
    let stream = match run_query(&queries, job).await {
        Ok(stream) => stream,
        Err(response) => return response,
    };
    // Two events in flight: a client that does not read holds up only itself.
    let (sender, receiver) = tokio::sync::mpsc::channel(2);
    let access = Arc::clone(&state.access);
    queries.spawn(async move { access.run_live(stream, sender).await });
    let events = futures::stream::unfold(receiver, |mut receiver| async move {
        let event = receiver.recv().await?;
        Some((
            Ok::<_, std::convert::Infallible>(sse_event(event)),
            receiver,
        ))
    });
    let events = futures::StreamExt::take_until(events, stopping);
    Sse::new(events)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

/// One live event in the SSE format (JSON data, the position as id).
fn sse_event(event: crate::access::live::LiveEvent) -> axum::response::sse::Event {
    use crate::access::live::LiveEvent;
    use axum::response::sse::Event;
    match event {
        LiveEvent::Started {
            request_id,
            tables,
            position,
        } => Event::default()
            .event("start")
            .id(position)
            .data(serde_json::json!({ "request_id": request_id, "tables": tables }).to_string()),
        LiveEvent::Rows {
            table,
            rows_json,
            position,
        } => Event::default()
            .event("rows")
            .id(position)
            .data(format!(r#"{{"table":"{table}","rows":{rows_json}}}"#)),
        LiveEvent::Moved { position } => Event::default().event("position").id(position).data("{}"),
        LiveEvent::Ended { reason } => Event::default()
            .event("end")
            .data(serde_json::json!({ "reason": reason }).to_string()),
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PrincipalRequest {
    id: String,
    kind: PrincipalKind,
    role: Option<Role>,
    #[serde(default)]
    eea: bool,
    #[serde(default)]
    gatekeeper: bool,
}

/// Adds a principal; the answer holds its bearer token, shown only once.
async fn add_principal(
    State(state): State<Arc<AdminState>>,
    Json(request): Json<PrincipalRequest>,
) -> Response {
    let added = state.access.add_principal(
        &request.id,
        request.kind,
        request.role,
        request.eea,
        request.gatekeeper,
        crate::core::clock::now_ms(),
    );
    match added {
        Ok(token) => Json(serde_json::json!({ "id": request.id, "token": token })).into_response(),
        Err(e) => access_error(&e),
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TransferRequest {
    user: String,
    vin: String,
    /// When the user starts holding the vehicle; default now, unless
    /// another user holds it.
    at_ms: Option<i64>,
}

/// The user holds the vehicle from `at_ms`; the previous holder's tenure ends.
async fn transfer(
    State(state): State<Arc<AdminState>>,
    Json(request): Json<TransferRequest>,
) -> Response {
    let now = crate::core::clock::now_ms();
    match state
        .access
        .transfer_from(&request.user, &request.vin, request.at_ms, now)
    {
        Ok(at) => Json(serde_json::json!({ "user": request.user, "from_ms": at })).into_response(),
        Err(e) => access_error(&e),
    }
}

/// Records a grant on a user's behalf (admin).
async fn grant(
    State(state): State<Arc<AdminState>>,
    Json(request): Json<GrantRequest>,
) -> Response {
    grant_answer(
        state
            .access
            .give_grant(request, crate::core::clock::now_ms()),
    )
}

fn grant_answer(given: Result<String, AccessError>) -> Response {
    match given {
        Ok(id) => Json(serde_json::json!({ "grant": id })).into_response(),
        Err(e) => access_error(&e),
    }
}

/// Revokes a grant (admin); it stops at the recipient's next query.
async fn revoke(State(state): State<Arc<AdminState>>, Path(id): Path<String>) -> Response {
    revoke_answer(
        &id,
        state
            .access
            .revoke_grant(&id, None, crate::core::clock::now_ms()),
    )
}

fn revoke_answer(id: &str, revoked: Result<bool, AccessError>) -> Response {
    match revoked {
        Ok(revoked) => Json(serde_json::json!({ "grant": id, "revoked": revoked })).into_response(),
        Err(e) => access_error(&e),
    }
}

/// A grant as the user gives it: `user` is the bearer.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct UserGrant {
    recipient: String,
    vin: String,
    streams: Vec<String>,
    purpose: String,
    from_ms: Option<i64>,
    until_ms: Option<i64>,
}

/// The bearer, who must be a user.
fn bearer_user(
    state: &AdminState,
    headers: &HeaderMap,
) -> Result<crate::access::registry::Principal, AccessError> {
    let principal = bearer(state, headers)?;
    if principal.kind != PrincipalKind::User {
        return Err(AccessError::Refused(
            "grants are given and revoked by users (Data Act Art. 5)".into(),
        ));
    }
    Ok(principal)
}

/// A user grants a third party data of one of their vehicles (Art. 5).
async fn user_grant(
    State(state): State<Arc<AdminState>>,
    headers: HeaderMap,
    Json(request): Json<UserGrant>,
) -> Response {
    let given = bearer_user(&state, &headers).and_then(|user| {
        let request = GrantRequest {
            user: user.id,
            recipient: request.recipient,
            vin: request.vin,
            streams: request.streams,
            purpose: request.purpose,
            from_ms: request.from_ms,
            until_ms: request.until_ms,
        };
        state
            .access
            .give_grant(request, crate::core::clock::now_ms())
    });
    grant_answer(given)
}

/// A user revokes a grant they gave.
async fn user_revoke(
    State(state): State<Arc<AdminState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let revoked = bearer_user(&state, &headers).and_then(|user| {
        state
            .access
            .revoke_grant(&id, Some(&user.id), crate::core::clock::now_ms())
    });
    revoke_answer(&id, revoked)
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
