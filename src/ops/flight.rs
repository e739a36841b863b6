//! Arrow Flight SQL for BI tools and notebooks (ADBC, JDBC, `pyarrow.flight`):
//! the same principals, purposes, policy, bounds and query audit as
//! `POST /sql`, over gRPC on `admin.flight_sql_addr`.
//!
//! Every call carries the principal's token as `authorization: Bearer …`
//! and the purpose as `x-fleetgate-purpose`; both are checked on every
//! call, so a ticket (which carries only the statement) gives nothing a
//! client could not ask for anyway. Statements and parameterless prepared
//! statements are planned when described (refusals come back there, and
//! are audited) and run, audited, when fetched; the answer is bounded by
//! `access.query_memory_mb` like `/sql`'s and sent in Flight batches.
//! Catalog, schema and table listings show the principal's own views and
//! nothing else. Work runs on the query runtime ([`crate::ops::queries`]);
//! a client that goes away cancels its query.
//!
//! The endpoint speaks plain HTTP/2 (h2c), like `/sql` speaks plain HTTP:
//! it binds loopback by default; put a TLS proxy in front to expose it.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, LazyLock};
use std::thread::JoinHandle;

use arrow::datatypes::{Schema, SchemaRef};
use arrow::ipc::writer::IpcWriteOptions;
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
use futures::{Stream, StreamExt};
use prost::Message;
use tokio::sync::oneshot;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};

use crate::access::registry::Principal;
use crate::access::{AccessEnv, AccessError};
use crate::ops::queries::QueryRuntime;

#[derive(Debug, thiserror::Error)]
pub enum FlightSqlError {
    #[error("Flight SQL on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start the Flight SQL thread: {0}")]
    Thread(std::io::Error),
}

/// The header that names the purpose of every call.
pub const PURPOSE_HEADER: &str = "x-fleetgate-purpose";

/// The running endpoint; dropping it stops serving without waiting.
pub struct FlightSql {
    pub addr: SocketAddr,
    stop: oneshot::Sender<()>,
    thread: JoinHandle<()>,
}

impl FlightSql {
    /// Stops serving and waits for the thread.
    pub fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.thread.join();
    }
}

/// Binds `addr` and serves Flight SQL on a thread of its own until stopped;
/// queries run on `queries`.
pub fn spawn(
    addr: SocketAddr,
    access: Arc<AccessEnv>,
    queries: QueryRuntime,
) -> Result<FlightSql, FlightSqlError> {
    let listener = std::net::TcpListener::bind(addr)
        .map_err(|source| FlightSqlError::Bind { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| FlightSqlError::Bind { addr, source })?;
    listener
        .set_nonblocking(true)
        .map_err(|source| FlightSqlError::Bind { addr, source })?;
    let (stop, stopped) = oneshot::channel::<()>();
    let service = FlightSqlEndpoint { access, queries };
    let thread = std::thread::Builder::new()
        .name("flight-sql".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = %e, "Flight SQL runtime");
                    return;
                }
            };
            runtime.block_on(serve(listener, service, stopped));
        })
        .map_err(FlightSqlError::Thread)?;
    Ok(FlightSql {
        addr: bound,
        stop,
        thread,
    })
}

async fn serve(
    listener: std::net::TcpListener,
    service: FlightSqlEndpoint,
    stopped: oneshot::Receiver<()>,
) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "Flight SQL listener");
            return;
        }
    };
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let stopped = futures::FutureExt::shared(stopped);
    let shutdown = {
        let stopped = stopped.clone();
        async move {
            let _ = stopped.await;
        }
    };
    let serving = tonic::transport::Server::builder()
        .add_service(FlightServiceServer::new(service))
        .serve_with_incoming_shutdown(incoming, shutdown);
    // A client that neither reads nor closes must not hold up a shutdown.
    let deadline = async move {
        let _ = stopped.await;
        tokio::time::sleep(STOP_GRACE).await;
    };
    tokio::select! {
        served = serving => {
            if let Err(e) = served {
                tracing::error!(error = %e, "Flight SQL stopped");
            }
        }
        () = deadline => {
            tracing::warn!("Flight SQL clients still connected at shutdown: closed");
        }
    }
}

/// How long a shutdown waits for Flight SQL calls under way.
const STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// What every call reads.
struct FlightSqlEndpoint {
    access: Arc<AccessEnv>,
    queries: QueryRuntime,
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

    /// The columns `sql` answers with for the caller, exactly as its answer
    /// is sent (dictionaries stay dictionaries).
    async fn describe(&self, caller: Caller, sql: String) -> Result<SchemaRef, Status> {
        let access = Arc::clone(&self.access);
        self.on_queries(async move {
            access
                .schema_of(
                    &caller.principal,
                    &caller.purpose,
                    &sql,
                    crate::core::clock::now_ms(),
                )
                .await
        })
        .await
    }

    /// A FlightInfo whose one endpoint's ticket runs `sql`.
    async fn statement_info(
        &self,
        request: Request<FlightDescriptor>,
        sql: String,
    ) -> Result<Response<FlightInfo>, Status> {
        let caller = self.caller(request.metadata())?;
        let schema = self.describe(caller, sql.clone()).await?;
        let ticket = TicketStatementQuery {
            statement_handle: Bytes::from(sql),
        };
        info(
            &schema,
            ticket.as_any().encode_to_vec(),
            request.into_inner(),
        )
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
        self.statement_info(request, query.query).await
    }

    async fn get_flight_info_prepared_statement(
        &self,
        command: CommandPreparedStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let sql = statement_text(&command.prepared_statement_handle)?;
        self.statement_info(request, sql).await
    }

    async fn do_get_statement(
        &self,
        ticket: TicketStatementQuery,
        request: Request<Ticket>,
    ) -> Result<Response<DataStream>, Status> {
        let caller = self.caller(request.metadata())?;
        let sql = statement_text(&ticket.statement_handle)?;
        let access = Arc::clone(&self.access);
        let answer = self
            .on_queries(async move {
                access
                    .query(
                        &caller.principal,
                        &caller.purpose,
                        &sql,
                        crate::core::clock::now_ms(),
                    )
                    .await
            })
            .await?;
        // The answer (and with it its count against the principal's
        // running requests) lives until the stream is sent or dropped.
        let mut held = answer;
        let schema = Arc::clone(&held.schema);
        let request_id = held.request_id.clone();
        let batches = std::mem::take(&mut held.batches);
        let batches = futures::stream::iter(batches).map(move |batch| {
            let _ = &held;
            Ok(batch)
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
        let schema = self.describe(caller, query.query.clone()).await?;
        let IpcMessage(dataset_schema) = SchemaAsIpc::new(&schema, &IpcWriteOptions::default())
            .try_into()
            .map_err(|e| Status::internal(format!("encoding the schema: {e}")))?;
        // Stateless: the handle is the statement, checked again whenever it runs.
        Ok(ActionCreatePreparedStatementResult {
            prepared_statement_handle: Bytes::from(query.query),
            dataset_schema,
            parameter_schema: Bytes::new(),
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
        _query: CommandPreparedStatementQuery,
        _request: Request<PeekableFlightDataStream>,
    ) -> Result<DoPutPreparedStatementResult, Status> {
        Err(Status::unimplemented(
            "parameters ($1, ?) are not supported: write the values into the statement",
        ))
    }

    async fn get_flight_info_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.caller(request.metadata())?;
        let schema = query.into_builder().schema();
        info(
            &schema,
            query.as_any().encode_to_vec(),
            request.into_inner(),
        )
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
        self.caller(request.metadata())?;
        let schema = query.clone().into_builder().schema();
        info(
            &schema,
            query.as_any().encode_to_vec(),
            request.into_inner(),
        )
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
        self.caller(request.metadata())?;
        let schema = query.clone().into_builder().schema();
        info(
            &schema,
            query.as_any().encode_to_vec(),
            request.into_inner(),
        )
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
        self.caller(request.metadata())?;
        let schema = query.into_builder().schema();
        info(
            &schema,
            query.as_any().encode_to_vec(),
            request.into_inner(),
        )
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
        self.caller(request.metadata())?;
        let schema = query.clone().into_builder(sql_info()?).schema();
        info(
            &schema,
            query.as_any().encode_to_vec(),
            request.into_inner(),
        )
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

/// The statement a ticket or prepared-statement handle carries.
fn statement_text(handle: &Bytes) -> Result<String, Status> {
    String::from_utf8(handle.to_vec())
        .map_err(|_| Status::invalid_argument("the statement handle is not a statement"))
}
