//! Arrow Flight SQL for BI tools and notebooks (ADBC, JDBC, `pyarrow.flight`):
//! the same principals, purposes, policy, bounds and query audit as
//! `POST /sql`, over gRPC on `admin.flight_sql_addr`.
//!
//! Every call carries the principal's token as `authorization: Bearer …`
//! and the purpose as `x-fleetgate-purpose`; both are checked on every
//! call, so a ticket (which carries only the statement) gives nothing a
//! client could not ask for anyway. Statements and prepared statements
//! (parameters `$1`, `$2`, … bound to one row of values, which the handle
//! then carries) are planned when described (refusals come back there, and
//! are audited) and run, audited, when fetched (a statement without
//! parameters runs the plan its flight info's description made, if fetched
//! by the same caller within a second of that description's start); the
//! answer is streamed as
//! it is computed, under `/sql`'s time limit and memory pool (the batches
//! on their way, at most two per call plus the transport's window, are
//! outside the pool).
//! Catalog, schema and table listings show the principal's own views and
//! nothing else. Work runs on the query runtime ([`crate::ops::queries`]);
//! a client that goes away ends its query.
//!
//! The endpoint speaks plain HTTP/2 (h2c), like `/sql` speaks plain HTTP:
//! it binds loopback by default; put a TLS proxy in front to expose it.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, LazyLock};

use arrow::array::RecordBatch;
use arrow::datatypes::{Schema, SchemaRef};
use arrow::ipc::writer::IpcWriteOptions;
use arrow_flight::decode::FlightRecordBatchStream;
use arrow_flight::encode::{DictionaryHandling, FlightDataEncoderBuilder};
use arrow_flight::error::FlightError;
use arrow_flight::flight_service_server::FlightServiceServer;
use arrow_flight::sql::metadata::{SqlInfoData, SqlInfoDataBuilder};
use arrow_flight::sql::server::{FlightSqlService, PeekableFlightDataStream};
use arrow_flight::sql::{
    ActionClosePreparedStatementRequest, ActionCreatePreparedStatementRequest,
    ActionCreatePreparedStatementResult, CommandGetCatalogs, CommandGetDbSchemas,
    CommandGetSqlInfo, CommandGetTableTypes, CommandGetTables, CommandPreparedStatementQuery,
    CommandStatementQuery, DoPutPreparedStatementResult, ProstMessageExt, SqlInfo,
    TicketStatementQuery,
};
use arrow_flight::{
    Action, FlightDescriptor, FlightEndpoint, FlightInfo, IpcMessage, SchemaAsIpc, Ticket,
};
use bytes::Bytes;
use datafusion::common::{ParamValues, ScalarValue};
use futures::{Stream, StreamExt};
use hmac::{Hmac, Mac};
use prost::Message;
use sha2::Sha256;
use tokio::sync::oneshot;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};

use crate::access::registry::Principal;
use crate::access::{AccessEnv, AccessError, Described, Ending};
use crate::metrics::Metrics;
use crate::ops::queries::QueryRuntime;
use crate::ops::served::{self, ServeError, Served};

#[derive(Debug, thiserror::Error)]
pub enum FlightSqlError {
    #[error(transparent)]
    Serve(#[from] ServeError),
    #[error("no random key for Flight SQL statement handles: {0}")]
    Random(String),
}

/// The header that names the purpose of every call.
pub const PURPOSE_HEADER: &str = "x-fleetgate-purpose";

/// Binds `addr` and serves Flight SQL on a thread of its own until stopped;
/// queries run on `queries`.
pub fn spawn(
    addr: SocketAddr,
    access: Arc<AccessEnv>,
    queries: QueryRuntime,
    metrics: Arc<Metrics>,
) -> Result<Served, FlightSqlError> {
    let service = FlightSqlEndpoint {
        access,
        queries,
        metrics,
        handle_key: HandleKey::random()?,
    };
    Ok(served::spawn(
        "Flight SQL",
        "flight-sql",
        addr,
        move |listener, stopped| serve(listener, service, stopped),
    )?)
}

async fn serve(
    listener: tokio::net::TcpListener,
    service: FlightSqlEndpoint,
    stopped: oneshot::Receiver<()>,
) {
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let shutdown = async move {
        let _ = stopped.await;
    };
    let served = tonic::transport::Server::builder()
        // A client that vanished without closing is noticed, and its
        // queries end.
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(10)))
        .add_service(FlightServiceServer::new(service))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    if let Err(e) = served {
        tracing::error!(error = %e, "Flight SQL stopped");
    }
}

/// What every call reads.
struct FlightSqlEndpoint {
    access: Arc<AccessEnv>,
    queries: QueryRuntime,
    /// Counts the fetches that ran a described plan.
    metrics: Arc<Metrics>,
    /// Signs the statement handles this process hands out (random per run):
    /// a handle it did not sign is refused before anything in it is read.
    handle_key: HandleKey,
}

type DataStream = Pin<Box<dyn Stream<Item = Result<arrow_flight::FlightData, Status>> + Send>>;

/// Who asks and why: from the call's headers.
struct Caller {
    principal: Principal,
    purpose: String,
}

impl FlightSqlEndpoint {
    /// The caller of a request, from its bearer token and purpose header.
    fn caller(&self, metadata: &MetadataMap) -> Result<Caller, Status> {
        let token = metadata
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or_else(|| {
                Status::unauthenticated("send the principal's token as `authorization: Bearer …`")
            })?;
        let principal = self.access.authenticate(token).map_err(|e| status(&e))?;
        let purpose = metadata
            .get(PURPOSE_HEADER)
            .ok_or_else(|| {
                Status::invalid_argument(format!(
                    "name the purpose of the query in the `{PURPOSE_HEADER}` header"
                ))
            })?
            // Not ASCII: no purpose's name; refused (and audited) as invalid.
            .to_str()
            .unwrap_or("(not ASCII)")
            .to_owned();
        Ok(Caller { principal, purpose })
    }

    /// Runs `work` on the query runtime.
    async fn on_queries<T: Send + 'static>(
        &self,
        work: impl std::future::Future<Output = Result<T, AccessError>> + Send + 'static,
    ) -> Result<T, Status> {
        match self.queries.run(work).await {
            Ok(outcome) => outcome.map_err(|e| status(&e)),
            Err(e) => {
                tracing::error!(error = %e, "Flight SQL query task failed");
                Err(Status::internal("the query failed"))
            }
        }
    }

    /// The columns `statement` answers with for the caller, exactly as its
    /// answer is sent (dictionaries stay dictionaries), and its open
    /// parameters.
    async fn describe(
        &self,
        caller: Caller,
        statement: Statement,
        keep_plan: bool,
    ) -> Result<Described, Status> {
        let access = Arc::clone(&self.access);
        self.on_queries(async move {
            let values = statement.values().map_err(AccessError::Invalid)?;
            access
                .schema_of(
                    &caller.principal,
                    &caller.purpose,
                    &statement.sql,
                    values,
                    keep_plan,
                    crate::core::clock::now_ms(),
                )
                .await
        })
        .await
    }

    /// A FlightInfo whose one endpoint's ticket runs `statement` for `caller`.
    async fn statement_info(
        &self,
        request: Request<FlightDescriptor>,
        caller: Caller,
        statement: Statement,
    ) -> Result<Response<FlightInfo>, Status> {
        // Its plan waits for the fetch of the ticket below.
        let described = self.describe(caller, statement.clone(), true).await?;
        if !described.parameters.fields().is_empty() {
            return Err(Status::invalid_argument(
                "the statement has parameters ($1, $2, …): prepare it and bind their values",
            ));
        }
        let ticket = TicketStatementQuery {
            statement_handle: statement.handle(&self.handle_key)?,
        };
        info(
            &described.columns,
            ticket.as_any().encode_to_vec(),
            request.into_inner(),
        )
    }

    /// A FlightInfo for a listing `command` with the columns `schema`: its
    /// ticket is the command itself, answered by the matching `do_get_*`.
    fn listing_info(
        &self,
        request: Request<FlightDescriptor>,
        schema: &Schema,
        command: Vec<u8>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.caller(request.metadata())?;
        info(schema, command, request.into_inner())
    }

    /// The caller's views: (name, columns).
    async fn views(&self, metadata: &MetadataMap) -> Result<Vec<(String, SchemaRef)>, Status> {
        let caller = self.caller(metadata)?;
        let access = Arc::clone(&self.access);
        self.on_queries(async move {
            access
                .views(
                    &caller.principal,
                    &caller.purpose,
                    crate::core::clock::now_ms(),
                )
                .await
        })
        .await
    }
}

/// A FlightInfo for `descriptor` with one endpoint on this server.
fn info(
    schema: &Schema,
    ticket: Vec<u8>,
    descriptor: FlightDescriptor,
) -> Result<Response<FlightInfo>, Status> {
    let info = FlightInfo::new()
        .try_with_schema(schema)
        .map_err(|e| Status::internal(format!("encoding the schema: {e}")))?
        .with_endpoint(FlightEndpoint::new().with_ticket(Ticket::new(ticket)))
        .with_descriptor(descriptor);
    Ok(Response::new(info))
}

/// `batch` (one listing) as a Flight data stream.
fn one_batch(
    schema: SchemaRef,
    batch: Result<arrow::array::RecordBatch, FlightError>,
) -> Response<DataStream> {
    let data = FlightDataEncoderBuilder::new()
        .with_schema(schema)
        .build(futures::stream::once(async move { batch }))
        .map(|item| item.map_err(Status::from));
    Response::new(Box::pin(data))
}

/// An access error as a gRPC status: unauthenticated, permission denied
/// (the message names the rule), invalid argument, resource exhausted.
fn status(e: &AccessError) -> Status {
    match e {
        AccessError::UnknownPrincipal => Status::unauthenticated(e.to_string()),
        AccessError::Refused(_) => Status::permission_denied(e.to_string()),
        AccessError::Invalid(_) | AccessError::DataFusion(_) => {
            Status::invalid_argument(e.to_string())
        }
        AccessError::Limit(_) => Status::resource_exhausted(e.to_string()),
        _ => {
            tracing::error!(error = %e, "Flight SQL request failed");
            Status::internal("the request failed; the server log says why")
        }
    }
}

/// What GetSqlInfo answers.
static SQL_INFO: LazyLock<Option<SqlInfoData>> = LazyLock::new(|| {
    let mut builder = SqlInfoDataBuilder::new();
    builder.append(SqlInfo::FlightSqlServerName, "fleetgate");
    builder.append(SqlInfo::FlightSqlServerVersion, env!("CARGO_PKG_VERSION"));
    builder.append(SqlInfo::FlightSqlServerArrowVersion, "1.3");
    builder.append(SqlInfo::FlightSqlServerReadOnly, true);
    builder.append(SqlInfo::FlightSqlServerTransaction, 0_i32);
    builder.build().ok()
});

fn sql_info() -> Result<&'static SqlInfoData, Status> {
    SQL_INFO
        .as_ref()
        .ok_or_else(|| Status::internal("server information could not be built"))
}

/// The catalog and schema the principal's views live in, as SQL names them.
const CATALOG: &str = "datafusion";
const SCHEMA: &str = "public";
/// The one kind of table a principal sees.
const TABLE_TYPE: &str = "TABLE";

#[tonic::async_trait]
impl FlightSqlService for FlightSqlEndpoint {
    type FlightService = FlightSqlEndpoint;

    async fn get_flight_info_statement(
        &self,
        query: CommandStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let caller = self.caller(request.metadata())?;
        self.statement_info(request, caller, Statement::text(query.query))
            .await
    }

    async fn get_flight_info_prepared_statement(
        &self,
        command: CommandPreparedStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let caller = self.caller(request.metadata())?;
        let statement =
            Statement::from_handle(&command.prepared_statement_handle, &self.handle_key)?;
        self.statement_info(request, caller, statement).await
    }

    async fn do_get_statement(
        &self,
        ticket: TicketStatementQuery,
        request: Request<Ticket>,
    ) -> Result<Response<DataStream>, Status> {
        let caller = self.caller(request.metadata())?;
        let statement = Statement::from_handle(&ticket.statement_handle, &self.handle_key)?;
        let (started_tx, started) = oneshot::channel();
        let (batches_tx, batches) = tokio::sync::mpsc::channel(ANSWER_BATCHES_AHEAD);
        self.queries.spawn(answer(
            Arc::clone(&self.access),
            Arc::clone(&self.metrics),
            caller,
            statement,
            started_tx,
            batches_tx,
        ));
        let (schema, request_id) = started
            .await
            .map_err(|_| Status::internal("the query failed"))?
            .map_err(|e| status(&e))?;
        // The task says when the answer is complete; a channel that closes
        // without that (a panic, a shutdown) is an error, not a short answer.
        let batches = futures::stream::unfold(Some(batches), |batches| async move {
            let mut batches = batches?;
            match batches.recv().await {
                Some(Piece::Batch(batch)) => Some((Ok(batch), Some(batches))),
                Some(Piece::Failed(status)) => {
                    Some((Err(FlightError::Tonic(Box::new(status))), None))
                }
                Some(Piece::End) => None,
                None => Some((
                    Err(FlightError::Tonic(Box::new(Status::internal(
                        "the query ended unexpectedly",
                    )))),
                    None,
                )),
            }
        });
        // Dictionaries are sent as they are: expanding them would make the
        // answer sent larger than the answer the memory bound counted.
        let data = FlightDataEncoderBuilder::new()
            .with_dictionary_handling(DictionaryHandling::Resend)
            .with_schema(schema)
            .build(batches)
            .map(|item| item.map_err(Status::from));
        let mut response = Response::new(Box::pin(data) as DataStream);
        if let Ok(id) = request_id.parse() {
            response.metadata_mut().insert("x-request-id", id);
        }
        Ok(response)
    }

    async fn do_action_create_prepared_statement(
        &self,
        query: ActionCreatePreparedStatementRequest,
        request: Request<Action>,
    ) -> Result<ActionCreatePreparedStatementResult, Status> {
        let caller = self.caller(request.metadata())?;
        let statement = Statement::text(query.query);
        let described = self.describe(caller, statement.clone(), false).await?;
        // Stateless: the handle is the statement (and, once bound, its
        // values), checked again whenever it is described or run; no plan
        // waits for it (one waits for the fetch its flight info names).
        Ok(ActionCreatePreparedStatementResult {
            prepared_statement_handle: statement.handle(&self.handle_key)?,
            dataset_schema: schema_message(&described.columns)?,
            parameter_schema: schema_message(&described.parameters)?,
        })
    }

    async fn do_action_close_prepared_statement(
        &self,
        _query: ActionClosePreparedStatementRequest,
        request: Request<Action>,
    ) -> Result<(), Status> {
        self.caller(request.metadata())?;
        Ok(())
    }

    async fn do_put_prepared_statement_query(
        &self,
        query: CommandPreparedStatementQuery,
        request: Request<PeekableFlightDataStream>,
    ) -> Result<DoPutPreparedStatementResult, Status> {
        self.caller(request.metadata())?;
        let statement = Statement::from_handle(&query.prepared_statement_handle, &self.handle_key)?;
        let data = request
            .into_inner()
            .map(|item| item.map_err(FlightError::from));
        let mut sent = FlightRecordBatchStream::new_from_flight_data(data);
        let mut values: Option<RecordBatch> = None;
        // One row of values, read no further than that.
        while let Some(batch) = sent.next().await {
            let batch = batch.map_err(|e| Status::invalid_argument(format!("parameters: {e}")))?;
            if batch.num_rows() == 0 {
                continue;
            }
            if values.is_some() || batch.num_rows() > 1 {
                return Err(Status::invalid_argument(
                    "more than one row of parameter values: a statement runs with one row",
                ));
            }
            if batch.num_columns() > MAX_PARAMETERS
                || batch.get_array_memory_size() > MAX_VALUES_BYTES
            {
                return Err(Status::invalid_argument(format!(
                    "at most {MAX_PARAMETERS} parameters and {MAX_VALUES_BYTES} bytes of values"
                )));
            }
            values = Some(batch);
        }
        let Some(values) = values else {
            return Err(Status::invalid_argument("no parameter values were sent"));
        };
        let bound = Statement {
            sql: statement.sql,
            values: Some(values),
        };
        Ok(DoPutPreparedStatementResult {
            prepared_statement_handle: Some(bound.handle(&self.handle_key)?),
        })
    }

    async fn get_flight_info_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let command = query.as_any().encode_to_vec();
        self.listing_info(request, &query.into_builder().schema(), command)
    }

    async fn do_get_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<Ticket>,
    ) -> Result<Response<DataStream>, Status> {
        self.caller(request.metadata())?;
        let mut builder = query.into_builder();
        builder.append(CATALOG);
        Ok(one_batch(builder.schema(), builder.build()))
    }

    async fn get_flight_info_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let command = query.as_any().encode_to_vec();
        self.listing_info(request, &query.into_builder().schema(), command)
    }

    async fn do_get_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<Ticket>,
    ) -> Result<Response<DataStream>, Status> {
        self.caller(request.metadata())?;
        let mut builder = query.into_builder();
        builder.append(CATALOG, SCHEMA);
        Ok(one_batch(builder.schema(), builder.build()))
    }

    async fn get_flight_info_tables(
        &self,
        query: CommandGetTables,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let command = query.as_any().encode_to_vec();
        self.listing_info(request, &query.into_builder().schema(), command)
    }

    async fn do_get_tables(
        &self,
        query: CommandGetTables,
        request: Request<Ticket>,
    ) -> Result<Response<DataStream>, Status> {
        let views = self.views(request.metadata()).await?;
        let mut builder = query.into_builder();
        for (name, schema) in views {
            builder
                .append(CATALOG, SCHEMA, &name, TABLE_TYPE, &schema)
                .map_err(|e| Status::internal(format!("listing the tables: {e}")))?;
        }
        Ok(one_batch(builder.schema(), builder.build()))
    }

    async fn get_flight_info_table_types(
        &self,
        query: CommandGetTableTypes,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let command = query.as_any().encode_to_vec();
        self.listing_info(request, &query.into_builder().schema(), command)
    }

    async fn do_get_table_types(
        &self,
        query: CommandGetTableTypes,
        request: Request<Ticket>,
    ) -> Result<Response<DataStream>, Status> {
        self.caller(request.metadata())?;
        let mut builder = query.into_builder();
        builder.append(TABLE_TYPE);
        Ok(one_batch(builder.schema(), builder.build()))
    }

    async fn get_flight_info_sql_info(
        &self,
        query: CommandGetSqlInfo,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let command = query.as_any().encode_to_vec();
        self.listing_info(request, &query.into_builder(sql_info()?).schema(), command)
    }

    async fn do_get_sql_info(
        &self,
        query: CommandGetSqlInfo,
        request: Request<Ticket>,
    ) -> Result<Response<DataStream>, Status> {
        self.caller(request.metadata())?;
        let builder = query.into_builder(sql_info()?);
        Ok(one_batch(builder.schema(), builder.build()))
    }

    async fn register_sql_info(&self, _id: i32, _result: &SqlInfo) {}
}

/// Batches a query may compute ahead of what the client has read.
const ANSWER_BATCHES_AHEAD: usize = 2;

/// What the task running a query hands to the call.
enum Piece {
    Batch(RecordBatch),
    /// The answer failed: the client gets this instead of more rows.
    Failed(Status),
    /// Every row was handed over.
    End,
}

/// Runs `statement` for `caller` on the query runtime and hands its answer
/// to the call: first its columns (or why it was refused) through
/// `started`, then its batches through `batches`, as fast as the client
/// reads them and within the query's time limit. A client that goes away,
/// before or during the answer, ends the query (its DataFusion stream is
/// dropped); the audit says how many rows were handed over and why it
/// stopped, also when this task panics or is dropped at shutdown.
async fn answer(
    access: Arc<AccessEnv>,
    metrics: Arc<Metrics>,
    caller: Caller,
    statement: Statement,
    started: oneshot::Sender<Result<(SchemaRef, String), AccessError>>,
    batches: tokio::sync::mpsc::Sender<Piece>,
) {
    let mut started = started;
    let values = match statement.values() {
        Ok(values) => values,
        Err(e) => {
            let _ = started.send(Err(AccessError::Invalid(e)));
            return;
        }
    };
    let now_ms = crate::core::clock::now_ms();
    let starting = access.query_stream(
        &caller.principal,
        &caller.purpose,
        &statement.sql,
        values,
        now_ms,
    );
    let answer = tokio::select! {
        answer = starting => answer,
        // Gone while the query waited for its turn or was planned: dropping
        // it there leaves nothing to audit but the refusal it never got.
        () = started.closed() => return,
    };
    let answer = match answer {
        Ok(answer) => answer,
        Err(e) => {
            let _ = started.send(Err(e));
            return;
        }
    };
    if answer.described {
        metrics
            .flight_sql_plans_reused
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    let mut delivery = Delivery {
        access: Arc::clone(&access),
        answer: Some(answer),
        ending: Ending::Abandoned,
    };
    let Some(answer) = delivery.answer.as_mut() else {
        return;
    };
    let columns = (Arc::clone(&answer.schema), answer.request_id.clone());
    if started.send(Ok(columns)).is_err() {
        delivery.ending = Ending::ClientGone;
        return;
    }
    let deadline = answer.deadline();
    delivery.ending = loop {
        let next = tokio::select! {
            next = answer.next() => next,
            () = batches.closed() => break Ending::ClientGone,
        };
        let (piece, rows) = match next {
            None => (Piece::End, 0),
            Some(Ok(batch)) => {
                let rows = batch.num_rows();
                (Piece::Batch(batch), rows)
            }
            Some(Err(e)) => {
                // Best effort: the client may not read any more.
                let _ = batches.try_send(Piece::Failed(status(&e)));
                break Ending::Failed(e);
            }
        };
        let end = matches!(piece, Piece::End);
        match tokio::time::timeout_at(deadline, batches.send(piece)).await {
            Err(_) => break Ending::Failed(answer.timed_out()),
            Ok(Err(_)) => break Ending::ClientGone,
            Ok(Ok(())) if end => break Ending::Complete,
            Ok(Ok(())) => answer.sent(rows),
        }
    };
}

/// A streamed answer on its way: its closing audit line is written when it
/// is dropped, however the task delivering it ended.
struct Delivery {
    access: Arc<AccessEnv>,
    answer: Option<crate::access::StreamingAnswer>,
    ending: Ending,
}

impl Drop for Delivery {
    fn drop(&mut self) {
        if let Some(answer) = self.answer.take() {
            let ending = std::mem::replace(&mut self.ending, Ending::Abandoned);
            if let Err(e) = self.access.finish(answer, ending) {
                tracing::error!(error = %e, "Flight SQL: the closing audit line could not be written");
            }
        }
    }
}

/// Most parameters a prepared statement may bind.
const MAX_PARAMETERS: usize = 1_024;
/// Most bytes of parameter values (in memory) one execution may bind.
const MAX_VALUES_BYTES: usize = 1 << 20;

/// The key statement handles are signed with (HMAC-SHA256).
struct HandleKey([u8; 32]);

impl HandleKey {
    fn random() -> Result<Self, FlightSqlError> {
        let mut key = [0u8; 32];
        // Fail closed: a guessable key would let a client forge handles.
        getrandom::fill(&mut key).map_err(|e| FlightSqlError::Random(e.to_string()))?;
        Ok(Self(key))
    }

    fn tag(&self, payload: &[u8]) -> Result<[u8; 32], Status> {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.0)
            .map_err(|_| Status::internal("the handle key"))?;
        mac.update(payload);
        Ok(mac.finalize().into_bytes().into())
    }

    fn verify(&self, tag: &[u8], payload: &[u8]) -> bool {
        <Hmac<Sha256> as Mac>::new_from_slice(&self.0)
            .map(|mut mac| {
                mac.update(payload);
                mac.verify_slice(tag).is_ok()
            })
            .unwrap_or(false)
    }
}

/// A statement as a ticket or prepared-statement handle carries it: its
/// text, and the values bound to its parameters, if any. The client holds
/// it; nothing in it is trusted, it is checked again at every use.
#[derive(Clone)]
struct Statement {
    sql: String,
    /// One row: the value of `$1` in the first column, and so on.
    values: Option<RecordBatch>,
}

/// The first byte of a handle that carries values: no statement text
/// begins with it.
const WITH_VALUES: u8 = 0;

impl Statement {
    fn text(sql: String) -> Self {
        Self { sql, values: None }
    }

    /// The handle: an HMAC tag of what follows, then the text alone, or
    /// [`WITH_VALUES`], the text's length (u32, little-endian), the text and
    /// the values as an Arrow IPC stream.
    fn handle(&self, key: &HandleKey) -> Result<Bytes, Status> {
        let mut payload = Vec::new();
        match &self.values {
            None => payload.extend_from_slice(self.sql.as_bytes()),
            Some(values) => {
                let length = u32::try_from(self.sql.len())
                    .map_err(|_| Status::invalid_argument("the statement is too long"))?;
                payload.push(WITH_VALUES);
                payload.extend_from_slice(&length.to_le_bytes());
                payload.extend_from_slice(self.sql.as_bytes());
                let encoding = |e: arrow::error::ArrowError| {
                    Status::invalid_argument(format!("parameter values: {e}"))
                };
                let mut writer =
                    arrow::ipc::writer::StreamWriter::try_new(&mut payload, &values.schema())
                        .map_err(encoding)?;
                writer.write(values).map_err(encoding)?;
                writer.finish().map_err(encoding)?;
            }
        }
        let mut handle = key.tag(&payload)?.to_vec();
        handle.extend_from_slice(&payload);
        Ok(Bytes::from(handle))
    }

    /// The statement of a handle this process signed; any other is refused
    /// before its content is read.
    fn from_handle(handle: &Bytes, key: &HandleKey) -> Result<Self, Status> {
        let invalid = || {
            Status::invalid_argument(
                "the statement handle is not one this server handed out (handles last one run \
                 of the server: prepare the statement again)",
            )
        };
        if handle.len() < 32 || !key.verify(&handle[..32], &handle[32..]) {
            return Err(invalid());
        }
        let payload = handle.slice(32..);
        if payload.first() != Some(&WITH_VALUES) {
            let sql = String::from_utf8(payload.to_vec()).map_err(|_| invalid())?;
            return Ok(Self::text(sql));
        }
        let length = payload
            .get(1..5)
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .map(u32::from_le_bytes)
            .ok_or_else(invalid)? as usize;
        let sql = payload.get(5..5 + length).ok_or_else(invalid)?;
        let sql = String::from_utf8(sql.to_vec()).map_err(|_| invalid())?;
        let ipc = payload.slice(5 + length..);
        let mut reader = arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(ipc), None)
            .map_err(|_| invalid())?;
        let values = reader.next().ok_or_else(invalid)?.map_err(|_| invalid())?;
        if values.num_rows() != 1 {
            return Err(invalid());
        }
        Ok(Self {
            sql,
            values: Some(values),
        })
    }

    /// The bound values as DataFusion takes them (`$1` first).
    fn values(&self) -> Result<Option<ParamValues>, String> {
        let Some(values) = &self.values else {
            return Ok(None);
        };
        let mut list = Vec::with_capacity(values.num_columns());
        for column in values.columns() {
            list.push(
                ScalarValue::try_from_array(column, 0)
                    .map_err(|e| format!("parameter values: {e}"))?,
            );
        }
        Ok(Some(ParamValues::from(list)))
    }
}

/// `schema` as the IPC message a prepared statement's result carries.
fn schema_message(schema: &Schema) -> Result<Bytes, Status> {
    let IpcMessage(message) = SchemaAsIpc::new(schema, &IpcWriteOptions::default())
        .try_into()
        .map_err(|e| Status::internal(format!("encoding the schema: {e}")))?;
    Ok(message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::Int64Array;

    fn bound(sql: &str, value: i64) -> Statement {
        let values = RecordBatch::try_from_iter([(
            "$1",
            Arc::new(Int64Array::from(vec![value])) as arrow::array::ArrayRef,
        )])
        .expect("batch");
        Statement {
            sql: sql.into(),
            values: Some(values),
        }
    }

    #[test]
    fn handles_round_trip_and_only_signed_ones_are_read() {
        let key = HandleKey::random().expect("key");
        let plain = Statement::text("SELECT 1".into());
        let back = Statement::from_handle(&plain.handle(&key).expect("handle"), &key)
            .expect("signed plain handle");
        assert_eq!(
            (back.sql.as_str(), back.values.is_none()),
            ("SELECT 1", true)
        );

        let with_values = bound("SELECT $1", 7);
        let handle = with_values.handle(&key).expect("handle");
        let back = Statement::from_handle(&handle, &key).expect("signed bound handle");
        assert_eq!(back.sql, "SELECT $1");
        assert_eq!(
            back.values().expect("values").map(|v| format!("{v:?}")),
            with_values
                .values()
                .expect("values")
                .map(|v| format!("{v:?}"))
        );

        // Another run's key, one flipped byte, a forged length: all refused unread.
        let other = HandleKey::random().expect("key");
        assert!(Statement::from_handle(&handle, &other).is_err());
        let mut tampered = handle.to_vec();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert!(Statement::from_handle(&Bytes::from(tampered), &key).is_err());
        let mut forged = vec![0u8; 32];
        forged.extend_from_slice(&[WITH_VALUES, 0xff, 0xff, 0xff, 0x7f]);
        forged.extend_from_slice(&[0xff; 64]);
        assert!(Statement::from_handle(&Bytes::from(forged), &key).is_err());
        assert!(Statement::from_handle(&Bytes::from_static(b"short"), &key).is_err());
    }
}
