//! The Data Act query layer: who may query what, for which purpose,
//! enforced in the plan.
//!
//! A query names its principal (a bearer token over HTTP, `--as` on the
//! CLI) and its purpose. The purpose is checked against
//! `schemas/purposes.toml` ([`purpose`]); the principal gets a session whose
//! tables are views written for it ([`policy`]): filtered to its vehicles,
//! tenure and grants, masked, re-pseudonymised or aggregated; statements
//! that write, define or set anything are refused, and so is EXPLAIN for
//! everyone but the operator. Principals, tenures and grants live in the
//! access registry ([`registry`]); every query and export, answered or
//! refused, is written to the query audit log ([`audit`]) before its answer
//! leaves. [`export`] gives a user all of their vehicles' data (Art. 4);
//! [`dictionary`] says what every table holds and for how long.
//! Every query and export is bounded in text, nesting, memory, time and
//! concurrency ([`limits`], settings in `[access]`).

pub mod account;
pub mod audit;
mod barrier;
mod described;
pub mod dictionary;
pub mod distributed;
pub mod export;
pub(crate) mod limits;
pub mod live;
pub mod policy;
pub mod purpose;
pub mod registry;

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arrow::array::RecordBatch;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::common::ParamValues;
use datafusion::common::config::Dialect;
use datafusion::error::DataFusionError;
use datafusion::execution::context::{SQLOptions, SessionState};
use datafusion::execution::memory_pool::{MemoryConsumer, MemoryPool};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::LogicalPlan;
use datafusion::physical_plan::execute_stream;
use datafusion::prelude::DataFrame;
use futures::StreamExt;

use crate::config::{AccessConfig, Config, RetentionConfig};
use crate::control::ControlPlane;
use crate::control::documents::Document;
use crate::lifecycle::requests::LifecycleState;
use crate::lifecycle::retention::{Retention, RetentionError};
use crate::privacy::stage::PrivacyShared;
use crate::schema::{Registry, SchemaError};
use policy::{PolicyInputs, PolicySession, Scope};
use purpose::Purposes;
use registry::{AccessRegistry, Principal, PrincipalKind};

#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    /// The policy refuses: the message names the rule.
    #[error("refused: {0}")]
    Refused(String),
    #[error("no principal with that token or id")]
    UnknownPrincipal,
    #[error("invalid: {0}")]
    Invalid(String),
    /// A statement or query over one of the bounds in `[access]`.
    #[error("limit: {0}")]
    Limit(String),
    #[error(
        "this principal's views need the vault, which the running server holds open: use POST /sql"
    )]
    VaultNeeded,
    /// A part of the server a request needs is not running.
    #[error("unavailable: {0}")]
    Unavailable(String),
    #[error("query audit log {0}")]
    Audit(String),
    #[error(transparent)]
    Registry(#[from] crate::control::ControlError),
    #[error(transparent)]
    Vault(#[from] crate::privacy::vault::VaultError),
    #[error(transparent)]
    Schema(#[from] SchemaError),
    #[error(transparent)]
    Retention(#[from] RetentionError),
    #[error(transparent)]
    Query(#[from] crate::query::QueryError),
    #[error(transparent)]
    DataFusion(#[from] DataFusionError),
    #[error("writing the export: {0}")]
    Export(String),
}

pub type Result<T, E = AccessError> = std::result::Result<T, E>;

/// Where a principal's query runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Engine {
    /// On this node's query threads.
    #[default]
    Local,
    /// On the Ballista cluster `access.ballista_scheduler` names, over
    /// the same views (see [`distributed`]).
    Ballista,
}

/// Everything a query or an access change needs.
pub struct AccessEnv {
    /// The tables, kept between queries.
    pub tables: crate::store::Snapshots,
    pub schemas: Arc<Registry>,
    pub retention: RetentionConfig,
    /// Deletion requests and legal holds: every query leaves out their rows.
    pub lifecycle: LifecycleState,
    /// Principals, tenures and grants: this node's file, or the control
    /// plane's document that every node of a cluster reads.
    registry: Document,
    pub settings: AccessConfig,
    pub purposes: Purposes,
    /// The vault and keys: users' and third parties' views need them.
    pub privacy: Option<Arc<PrivacyShared>>,
    /// One permit per query or export that may run at once.
    slots: Arc<tokio::sync::Semaphore>,
    /// Requests running now, and answers not yet dropped, per principal id.
    running: Arc<Mutex<HashMap<String, u32>>>,
    /// Live streams open, per principal id.
    live_running: live::LiveCounts,
    /// One permit per live stream that may be open at once.
    live_slots: Arc<tokio::sync::Semaphore>,
    /// The task that reads the tables' logs for live streams.
    follower: Arc<live::Follower>,
    /// The work of principals' queries and live streams, the follower
    /// included: the query pool runs and tracks that work here, and waits
    /// for all of it before it stops.
    query_tasks: tokio_util::task::TaskTracker,
    /// WAL shards whose commits live streams follow (this node's workers).
    wal_shards: crate::store::delta::NodeShards,
    /// Plans made to describe a statement, for its run.
    described: Arc<described::DescribedPlans>,
}

/// A query's answer as it is computed; see [`AccessEnv::query_stream`].
pub struct StreamingAnswer {
    pub request_id: String,
    /// The answer's columns, also when it has no rows.
    pub schema: SchemaRef,
    /// Whether it runs the plan its statement's description made.
    pub described: bool,
    stream: SendableRecordBatchStream,
    deadline: tokio::time::Instant,
    limit: Duration,
    kind: PrincipalKind,
    memory_mb: u32,
    /// Rows handed out so far.
    rows: u64,
    /// Principal, purpose, tables and decision, for the closing audit line.
    audit: (Principal, String, Vec<String>, String),
    _running: RunningQuery,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl StreamingAnswer {
    /// The next batch; `None` once all were handed out. An error ends the
    /// answer: the time limit, memory, or an engine error (whose text only
    /// the operator sees).
    pub async fn next(&mut self) -> Option<Result<RecordBatch>> {
        match tokio::time::timeout_at(self.deadline, self.stream.next()).await {
            Err(_) => Some(Err(timed_out(self.limit))),
            Ok(None) => None,
            Ok(Some(Ok(batch))) => Some(Ok(batch)),
            Ok(Some(Err(e))) => Some(Err(limits::running_error(self.kind, e, self.memory_mb))),
        }
    }

    /// When the query's time is up: handing a batch to a client that does
    /// not read must end by then too.
    pub fn deadline(&self) -> tokio::time::Instant {
        self.deadline
    }

    /// The error an answer ends with when its time is up.
    pub fn timed_out(&self) -> AccessError {
        timed_out(self.limit)
    }

    /// Counts `rows` handed to the client's transport.
    pub fn sent(&mut self, rows: usize) {
        self.rows += rows as u64;
    }
}

/// How a streamed answer ended, for its closing audit line.
#[derive(Debug)]
pub enum Ending {
    /// Every row was handed to the client.
    Complete,
    /// The client closed or cancelled its call.
    ClientGone,
    /// The query failed or ran out of time (the audit keeps only the kind
    /// of an engine error, as for any query).
    Failed(AccessError),
    /// The task delivering it ended without saying how (a panic, shutdown).
    Abandoned,
}

/// The decision a stream's closing audit line records: its treatments if
/// every row went, otherwise why it stopped.
fn ending_outcome(ending: Ending, treatments: &str) -> Result<String> {
    let cut_short = |why: &str| AccessError::Invalid(format!("not every row was sent: {why}"));
    match ending {
        Ending::Complete => Ok(treatments.to_owned()),
        Ending::ClientGone => Err(cut_short("the client went away")),
        Ending::Abandoned => Err(cut_short("the query task ended unexpectedly")),
        Ending::Failed(e) => Err(e),
    }
}

/// `values` cast to the types the statement's placeholders take (a client
/// sends a 64-bit integer where the column holds 32 bits, say).
fn typed_as_expected(plan: &LogicalPlan, values: ParamValues) -> Result<ParamValues> {
    let ParamValues::List(list) = values else {
        return Ok(values);
    };
    let expected = plan.get_parameter_types()?;
    let mut typed = Vec::with_capacity(list.len());
    for (index, mut value) in list.into_iter().enumerate() {
        let id = format!("${}", index + 1);
        if let Some(Some(data_type)) = expected.get(&id)
            && value.value.data_type() != *data_type
        {
            // Arrow's cast error quotes the value: name its type only.
            let given = value.value.data_type();
            value.value = value.value.cast_to(data_type).map_err(|_| {
                AccessError::Invalid(format!(
                    "parameter {id} is not a {data_type}: a {given} value that does not cast to it"
                ))
            })?;
        }
        typed.push(value);
    }
    Ok(ParamValues::List(typed))
}

fn timed_out(limit: Duration) -> AccessError {
    AccessError::Limit(format!(
        "the query ran longer than {} ms and was cancelled (access.query_timeout_ms)",
        limit.as_millis()
    ))
}

/// What a statement answers with, before it runs.
#[derive(Debug)]
pub struct Described {
    /// The answer's columns.
    pub columns: SchemaRef,
    /// The parameters still open ($1, $2, …), in order; none once bound.
    pub parameters: SchemaRef,
}

/// What may become of a statement's parameters ($1, $2, …).
enum Parameters {
    /// None may appear: SQL over HTTP and the CLI take no values.
    None,
    /// They may stay open: the statement is only described.
    Unbound,
    /// Their values.
    Bound(ParamValues),
}

/// A statement checked and planned for its principal, ready to run.
struct Planned {
    state: SessionState,
    plan: LogicalPlan,
    /// `table:treatment` of every view it reads, for the audit.
    treatments: String,
}

/// One running request of a principal, counted in [`AccessEnv`] until dropped.
pub struct RunningQuery {
    running: Arc<Mutex<HashMap<String, u32>>>,
    principal: String,
}

impl RunningQuery {
    fn start(
        running: &Arc<Mutex<HashMap<String, u32>>>,
        principal: &str,
        most: u32,
    ) -> Result<Self> {
        Self::start_as(
            running,
            principal,
            most,
            "requests running",
            "access.max_queries_per_principal",
        )
    }

    /// Counts one more of `principal`'s `what` in `running`, or refuses it
    /// if it has `most` already (the bound `setting` sets).
    fn start_as(
        running: &Arc<Mutex<HashMap<String, u32>>>,
        principal: &str,
        most: u32,
        what: &str,
        setting: &str,
    ) -> Result<Self> {
        let mut counts = running
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let count = counts.entry(principal.to_owned()).or_insert(0);
        if *count >= most {
            return Err(AccessError::Limit(format!(
                "this principal already has {count} {what}; at most {most} may run \
                 at once ({setting})"
            )));
        }
        *count += 1;
        Ok(Self {
            running: Arc::clone(running),
            principal: principal.to_owned(),
        })
    }
}

impl std::fmt::Debug for RunningQuery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningQuery")
            .field("principal", &self.principal)
            .finish()
    }
}

impl Drop for RunningQuery {
    fn drop(&mut self) {
        let mut counts = self
            .running
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(count) = counts.get_mut(&self.principal) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                counts.remove(&self.principal);
            }
        }
    }
}

/// A query's answer.
#[derive(Debug)]
pub struct Answer {
    pub request_id: String,
    /// The answer's columns, also when it has no rows.
    pub schema: SchemaRef,
    pub batches: Vec<RecordBatch>,
    /// The answer counts as one of its principal's running requests until
    /// it is dropped: a client that never reads its answers can hold no more
    /// than `access.max_queries_per_principal` of them.
    _running: RunningQuery,
}

impl AccessEnv {
    pub fn new(config: &Config, privacy: Option<Arc<PrivacyShared>>) -> Result<Self> {
        let plane = ControlPlane::from_config(config)?;
        Ok(Self {
            lifecycle: LifecycleState::new(&config.retention, plane.as_ref()),
            registry: Document::at(
                plane.as_ref(),
                "access-registry",
                config.access.registry_file.clone(),
            ),
            tables: crate::store::Snapshots::new(
                crate::store::StoreRoot::from_config(&config.storage)
                    .map_err(crate::query::QueryError::from)?,
            ),
            schemas: Registry::load_from(config.storage.schema_dir.as_deref())?,
            retention: config.retention.clone(),
            settings: config.access.clone(),
            purposes: Purposes::built_in()?,
            privacy,
            slots: Arc::new(tokio::sync::Semaphore::new(
                config.access.max_concurrent_queries as usize,
            )),
            running: Arc::new(Mutex::new(HashMap::new())),
            described: Arc::new(described::DescribedPlans::for_config(
                config.storage.vacuum_grace_ms,
                config.access.query_timeout_ms,
            )),
            live_running: live::LiveCounts::default(),
            live_slots: Arc::new(tokio::sync::Semaphore::new(
                config.access.max_live_streams as usize,
            )),
            follower: Arc::default(),
            query_tasks: tokio_util::task::TaskTracker::new(),
            wal_shards: crate::store::delta::NodeShards {
                node: config.cluster.node_id.clone(),
                count: u16::try_from(config.worker_count()).unwrap_or(u16::MAX),
            },
        })
    }

    /// The tracker of principals' work: the pool that runs queries and
    /// live streams tracks them here, beside the follower their steps read.
    pub fn query_tasks(&self) -> tokio_util::task::TaskTracker {
        self.query_tasks.clone()
    }

    pub fn registry(&self) -> Result<AccessRegistry> {
        Ok(self.registry.load()?)
    }

    /// Applies `change` to the registry durably and audits it (with the
    /// VIN's keyed tag when `vin` is given, never the VIN).
    fn change<R: Send>(
        &self,
        what: &str,
        vin: Option<&str>,
        now_ms: i64,
        change: impl FnOnce(&mut AccessRegistry) -> Result<R> + Send,
    ) -> Result<R> {
        let outcome = self.registry.update(change)??;
        // No plan made under the registry before runs after the change.
        self.described.clear();
        let tag = match (vin, &self.privacy) {
            (Some(vin), Some(privacy)) => Some(crate::privacy::pseudo::vin_tag(
                &privacy.keys.redaction_key(),
                vin,
            )),
            _ => None,
        };
        let line = serde_json::json!({
            "at": rfc3339(now_ms),
            "action": "access_change",
            "change": what,
            "vehicle": tag,
        });
        crate::lifecycle::retention::append_audit(&self.retention.audit_file, &[line]).map_err(
            |e| AccessError::Audit(format!("{}: {e}", self.retention.audit_file.display())),
        )?;
        Ok(outcome)
    }

    /// Adds a principal; returns its bearer token, which is kept nowhere.
    pub fn add_principal(
        &self,
        id: &str,
        kind: PrincipalKind,
        role: Option<registry::Role>,
        eea: bool,
        gatekeeper: bool,
        now_ms: i64,
    ) -> Result<String> {
        let (principal, token) = registry::new_principal(id, kind, role, eea, gatekeeper, now_ms)?;
        let what = format!("principal {id} added ({})", kind.name());
        self.change(&what, None, now_ms, |r| r.add_principal(principal))?;
        Ok(token)
    }

    /// `user` holds `vin` from `at_ms`; the previous holder's tenure ends then.
    pub fn transfer(&self, user: &str, vin: &str, at_ms: i64, now_ms: i64) -> Result<()> {
        self.transfer_from(user, vin, Some(at_ms), now_ms)
            .map(|_| ())
    }

    /// [`Self::transfer`] from `at_ms`, which may default to now only while
    /// nobody else holds the vehicle: a change of hands registered late,
    /// without its time, would give the previous holder the new holder's
    /// rows up to now. Returns when the user's tenure starts.
    pub fn transfer_from(
        &self,
        user: &str,
        vin: &str,
        at_ms: Option<i64>,
        now_ms: i64,
    ) -> Result<i64> {
        let what = format!("vehicle transferred to {user}");
        self.change(&what, Some(vin), now_ms, |r| {
            let held_by_another = r
                .tenures
                .iter()
                .any(|t| t.vin == vin && t.user != user && t.until_ms.is_none_or(|u| u > now_ms));
            let at = match at_ms {
                Some(at) => at,
                None if held_by_another => {
                    return Err(AccessError::Invalid(
                        "another user holds the vehicle: give the time it changed hands \
                         (at_ms, --at), or send its vehicle_sold event first"
                            .into(),
                    ));
                }
                None => now_ms,
            };
            r.transfer(user, vin, at).map(|()| at)
        })
    }

    /// A `vehicle_sold`, `account_deleted` or `erasure_requested` event at
    /// `now_ms`: ends tenures and revokes grants (see
    /// [`AccessRegistry::end_holding`]), audited. Call it before the event
    /// erases the vehicle's secrets, so that access ends even when a legal
    /// hold refuses the erasure. Returns the users whose holding ended.
    pub fn end_holding(
        &self,
        vin: &str,
        ending: registry::Ending,
        now_ms: i64,
    ) -> Result<Vec<String>> {
        // A vehicle the registry never names: nothing to change or audit,
        // and its VIN is not written into the registry after its erasure.
        let current = self.registry()?;
        if !current.tenures.iter().any(|t| t.vin == vin)
            && !current.grants.iter().any(|g| g.vin == vin)
        {
            return Ok(Vec::new());
        }
        let what = match ending {
            registry::Ending::Sale => "vehicle sold: its tenures ended, its grants revoked",
            registry::Ending::AccountDeletion => {
                "account deleted: its holders' tenures ended, their grants revoked"
            }
            registry::Ending::Erasure => "vehicle erased: earlier holders cut off its new identity",
        };
        self.change(what, Some(vin), now_ms, |r| {
            Ok(r.end_holding(vin, ending, now_ms))
        })
    }

    /// Records a user's grant to a third party, checked against the
    /// recipient, its role, the purpose and the user's tenure; returns its id.
    pub fn give_grant(&self, request: registry::GrantRequest, now_ms: i64) -> Result<String> {
        let what = format!("grant to {} for {}", request.recipient, request.purpose);
        let vin = request.vin.clone();
        self.change(&what, Some(&vin), now_ms, |r| {
            r.grant(
                request,
                |p| {
                    self.purposes
                        .check(p, PrincipalKind::ThirdParty)
                        .map(|_| ())
                },
                now_ms,
            )
        })
    }

    /// Revokes a grant from now on; with `by_user`, only if that user gave it.
    /// False if it was revoked already.
    pub fn revoke_grant(&self, id: &str, by_user: Option<&str>, now_ms: i64) -> Result<bool> {
        self.change(&format!("{id} revoked"), None, now_ms, |r| {
            let giver = r.grants.iter().find(|g| g.id == id).map(|g| g.user.clone());
            if let (Some(user), Some(giver)) = (by_user, giver)
                && user != giver
            {
                return Err(AccessError::Refused(format!(
                    "{id} was given by another user; only its giver may revoke it"
                )));
            }
            r.revoke(id, now_ms)
        })
    }

    /// The data dictionary of every table, under the rules in force (the
    /// rules only: deletion requests and holds are no one's business here).
    pub fn dictionary(&self) -> Result<serde_json::Value> {
        let retention = Retention::load(self.retention.rules_file.as_deref(), &self.schemas)?;
        Ok(dictionary::build(&self.schemas, &retention))
    }

    /// The principal named `id` (the CLI's `--as`).
    pub fn principal(&self, id: &str) -> Result<Principal> {
        self.registry()?
            .principal(id)
            .ok_or(AccessError::UnknownPrincipal)
    }

    /// The principal holding `token` (HTTP bearer authentication).
    pub fn authenticate(&self, token: &str) -> Result<Principal> {
        self.registry()?
            .by_token(token)
            .cloned()
            .ok_or(AccessError::UnknownPrincipal)
    }

    /// The principal's session for `purpose`, whose operators and answer
    /// may reserve `memory_mb` MiB.
    async fn session(
        &self,
        principal: &Principal,
        purpose: &str,
        now_ms: i64,
        memory_mb: u32,
    ) -> Result<PolicySession> {
        self.session_with(
            principal,
            purpose,
            now_ms,
            memory_mb,
            Scope::Every,
            Engine::Local,
        )
        .await
    }

    /// [`Self::session`], holding the tables `scope` says.
    async fn session_with(
        &self,
        principal: &Principal,
        purpose: &str,
        now_ms: i64,
        memory_mb: u32,
        scope: Scope<'_>,
        engine: Engine,
    ) -> Result<PolicySession> {
        let purpose = self.purposes.check(purpose, principal.kind)?;
        let registry = self.registry()?;
        let retention = Retention::current(
            self.retention.rules_file.as_deref(),
            &self.lifecycle,
            &self.schemas,
        )?;
        let inputs = PolicyInputs {
            tables: &self.tables,
            schemas: &self.schemas,
            retention: &retention,
            access: &registry,
            privacy: self.privacy.as_deref(),
            audit_dir: &self.settings.audit_dir,
            audit_keep_ms: i64::from(self.settings.audit_retention_days) * DAY_MS,
            min_group: self.settings.min_group_vehicles,
            now_ms,
            memory_limit: memory_mb as usize * 1024 * 1024,
            scope,
            distributed: engine == Engine::Ballista,
        };
        policy::session(&inputs, principal, purpose).await
    }

    /// Runs `sql` as `principal` for `purpose`, audited.
    pub async fn query(
        &self,
        principal: &Principal,
        purpose: &str,
        sql: &str,
        now_ms: i64,
    ) -> Result<Answer> {
        self.query_on(Engine::Local, principal, purpose, sql, now_ms)
            .await
    }

    /// [`Self::query`], run by `engine`.
    pub async fn query_on(
        &self,
        engine: Engine,
        principal: &Principal,
        purpose: &str,
        sql: &str,
        now_ms: i64,
    ) -> Result<Answer> {
        let request_id = request_id();
        let mut tables = Vec::new();
        let outcome = match self.start(principal) {
            Ok(running) => self
                .bounded(self.run(engine, principal, purpose, sql, now_ms, &mut tables))
                .await
                .map(|(schema, batches, decision)| (schema, batches, decision, running)),
            Err(e) => Err(e),
        };
        let (decision, rows) = match &outcome {
            Ok((_, batches, decision, _)) => (
                decision.clone(),
                Some(batches.iter().map(|b| b.num_rows() as u64).sum()),
            ),
            Err(_) => (String::new(), None),
        };
        let action = match engine {
            Engine::Local => "query",
            Engine::Ballista => "query_ballista",
        };
        self.audit(
            &request_id,
            principal,
            purpose,
            action,
            &tables,
            outcome.as_ref().map(|_| decision),
            rows,
            now_ms,
        )?;
        outcome.map(|(schema, batches, _, running)| Answer {
            request_id,
            schema,
            batches,
            _running: running,
        })
    }

    /// Runs `sql` as `principal` for `purpose` and hands out its answer as
    /// it is computed (Flight SQL), instead of whole. The query holds its
    /// slot and its principal's turn until the answer is finished or
    /// dropped, and `access.query_timeout_ms` covers it to its last batch.
    /// The audit gets its line, with the decision, before the first batch
    /// leaves, and a second one (`delivered`, the rows sent) when it ends:
    /// see [`AccessEnv::finish`]. A plain statement the same principal has
    /// just described for the same purpose runs the plan that description
    /// made ([`described`]).
    pub async fn query_stream(
        &self,
        principal: &Principal,
        purpose: &str,
        sql: &str,
        parameters: Option<ParamValues>,
        now_ms: i64,
    ) -> Result<StreamingAnswer> {
        let request_id = request_id();
        let mut tables = Vec::new();
        let limit = Duration::from_millis(self.settings.query_timeout_ms);
        let deadline = tokio::time::Instant::now() + limit;
        let starting = async {
            let running = self.start(principal)?;
            let slot = Arc::clone(&self.slots)
                .acquire_owned()
                .await
                .map_err(|_| AccessError::Limit("the query layer is closed".into()))?;
            let described = match parameters {
                None => self.described.take(principal, purpose, sql),
                Some(_) => None,
            };
            let reused = described.is_some();
            let (treatments, stream) = match described {
                Some(described) => {
                    tables = described.tables;
                    let stream = execute_stream(described.plan, described.task);
                    (described.treatments, stream)
                }
                None => {
                    let parameters = parameters.map_or(Parameters::None, Parameters::Bound);
                    let planned = self
                        .plan(principal, purpose, sql, parameters, now_ms, &mut tables)
                        .await?;
                    let stream = DataFrame::new(planned.state, planned.plan)
                        .execute_stream()
                        .await;
                    (planned.treatments, stream)
                }
            };
            let stream = stream.map_err(|e| {
                limits::running_error(principal.kind, e, self.settings.query_memory_mb)
            })?;
            Ok::<_, AccessError>((running, slot, treatments, stream, reused))
        };
        let started = match tokio::time::timeout_at(deadline, starting).await {
            Ok(started) => started,
            Err(_) => Err(timed_out(limit)),
        };
        self.audit(
            &request_id,
            principal,
            purpose,
            "query",
            &tables,
            started
                .as_ref()
                .map(|(_, _, treatments, _, _)| treatments.clone()),
            None,
            now_ms,
        )?;
        let (running, slot, treatments, stream, described) = started?;
        Ok(StreamingAnswer {
            request_id,
            schema: stream.schema(),
            described,
            stream,
            deadline,
            limit,
            kind: principal.kind,
            memory_mb: self.settings.query_memory_mb,
            rows: 0,
            audit: (principal.clone(), purpose.to_owned(), tables, treatments),
            _running: running,
            _slot: slot,
        })
    }

    /// Ends a streamed answer: audits the rows it handed to the client and,
    /// unless all were, why it stopped.
    pub fn finish(&self, answer: StreamingAnswer, ending: Ending) -> Result<()> {
        let (principal, purpose, tables, treatments) = &answer.audit;
        let outcome = ending_outcome(ending, treatments);
        self.audit(
            &answer.request_id,
            principal,
            purpose,
            "delivered",
            tables,
            outcome.as_ref().map(String::clone),
            Some(answer.rows),
            crate::core::clock::now_ms(),
        )
    }

    async fn run(
        &self,
        engine: Engine,
        principal: &Principal,
        purpose: &str,
        sql: &str,
        now_ms: i64,
        tables: &mut Vec<String>,
    ) -> Result<(SchemaRef, Vec<RecordBatch>, String)> {
        let scheduler = match engine {
            Engine::Local => None,
            Engine::Ballista => {
                Some(self.settings.ballista_scheduler.as_deref().ok_or_else(|| {
                    AccessError::Invalid(
                        "engine ballista: this node has no access.ballista_scheduler".into(),
                    )
                })?)
            }
        };
        let mut planned = self
            .plan_on(
                engine,
                principal,
                purpose,
                sql,
                Parameters::None,
                now_ms,
                tables,
            )
            .await?;
        if let Some(scheduler) = scheduler {
            // A plan the optimizer found empty is answered here: Ballista's
            // planner would answer it without its columns.
            let empty = matches!(
                planned.state.optimize(&planned.plan)?,
                LogicalPlan::EmptyRelation(_)
            );
            if !empty {
                planned.state = distributed::on_cluster(planned.state, scheduler)?;
            }
        }
        let pool = Arc::clone(&planned.state.runtime_env().memory_pool);
        let (schema, batches) = collect_bounded(
            DataFrame::new(planned.state, planned.plan),
            &pool,
            principal.kind,
            self.settings.query_memory_mb,
        )
        .await?;
        Ok((schema, batches, planned.treatments))
    }

    /// Checks `sql` against every bound and rule and plans it over the
    /// principal's views, without running it. `tables` collects the names
    /// the audit line gets.
    async fn plan(
        &self,
        principal: &Principal,
        purpose: &str,
        sql: &str,
        parameters: Parameters,
        now_ms: i64,
        tables: &mut Vec<String>,
    ) -> Result<Planned> {
        self.plan_on(
            Engine::Local,
            principal,
            purpose,
            sql,
            parameters,
            now_ms,
            tables,
        )
        .await
    }

    /// [`Self::plan`], with the views planned for `engine`.
    #[allow(clippy::too_many_arguments)]
    async fn plan_on(
        &self,
        engine: Engine,
        principal: &Principal,
        purpose: &str,
        sql: &str,
        parameters: Parameters,
        now_ms: i64,
        tables: &mut Vec<String>,
    ) -> Result<Planned> {
        // Who asks and why are refused (and audited as refusals) before
        // what they wrote is read.
        let checked = self.purposes.check(purpose, principal.kind)?;
        if engine == Engine::Ballista {
            policy::distributable(principal, checked)?;
        }
        limits::check_text(sql, self.settings.max_statement_bytes)?;
        // The parser's state is large: dropped before anything is awaited.
        let (statement, named) = {
            let parser = policy::parser();
            let statement = parser.sql_to_statement(sql, &Dialect::Generic)?;
            limits::check_shape(&statement)?;
            let named = policy::tables_named(&parser, &statement)?;
            (statement, named)
        };
        let scope = named.as_ref().map_or(Scope::Every, Scope::Named);
        let memory_mb = self.settings.query_memory_mb;
        let session = self
            .session_with(principal, purpose, now_ms, memory_mb, scope, engine)
            .await?;
        let state = session.ctx.state();
        let mut treatments = Vec::new();
        for reference in state.resolve_table_references(&statement)? {
            if reference.schema().is_some_and(|s| s != "public") {
                continue;
            }
            let name = reference.table().to_owned();
            if let Some(reason) = session.hidden.get(&name) {
                tables.push(name.clone());
                return Err(AccessError::Refused(format!("table {name}: {reason}")));
            }
            // A name the session does not know stays out of the audit (planning
            // fails on it): only the session's own table names are written there.
            let Some(treatment) = session.treatments.get(&name) else {
                continue;
            };
            treatments.push(format!("{name}:{}", treatment.name()));
            tables.push(name);
        }
        let plan = state.statement_to_plan(statement).await?;
        // Before any value is bound: binding would unwrap a PREPARE.
        SQLOptions::new()
            .with_allow_ddl(false)
            .with_allow_dml(false)
            .with_allow_statements(false)
            .verify_plan(&plan)
            .map_err(|e| AccessError::Refused(format!("access is read-only: {e}")))?;
        let plan = match parameters {
            Parameters::Bound(values) => {
                let values = typed_as_expected(&plan, values)?;
                plan.with_param_values(values)
                    .map_err(|e| AccessError::Invalid(format!("parameters: {e}")))?
            }
            Parameters::None if !plan.get_parameter_types()?.is_empty() => {
                return Err(AccessError::Invalid(
                    "parameters ($1, $2, …) need a prepared statement (Flight SQL); here, \
                     write the values into the statement"
                        .into(),
                ));
            }
            Parameters::None | Parameters::Unbound => plan,
        };
        if principal.kind != PrincipalKind::Operator
            && matches!(plan, LogicalPlan::Explain(_) | LogicalPlan::Analyze(_))
        {
            return Err(AccessError::Refused(
                "EXPLAIN is open to the operator only: a plan shows the policy's filters".into(),
            ));
        }
        treatments.sort();
        treatments.dedup();
        Ok(Planned {
            state,
            plan,
            treatments: treatments.join(","),
        })
    }

    /// The columns `sql` would answer with for `principal`, and the
    /// parameters it takes, checked and planned exactly as a query would be,
    /// but not run (Flight SQL asks before it fetches). `parameters` are the
    /// values bound so far, if any; without them the statement may keep its
    /// placeholders (a prepared statement being created). A refusal is
    /// audited like a query's; a statement that plans is audited when it runs.
    /// `keep_plan`: a statement without parameters keeps its plan for the
    /// run that follows ([`described`]; [`AccessEnv::query_stream`]).
    pub async fn schema_of(
        &self,
        principal: &Principal,
        purpose: &str,
        sql: &str,
        parameters: Option<ParamValues>,
        keep_plan: bool,
        now_ms: i64,
    ) -> Result<Described> {
        let since = std::time::Instant::now();
        let mut tables = Vec::new();
        let outcome = match self.start(principal) {
            Ok(_running) => {
                self.bounded(async {
                    let reusable = keep_plan && parameters.is_none();
                    let parameters = parameters.map_or(Parameters::Unbound, Parameters::Bound);
                    let planned = self
                        .plan(principal, purpose, sql, parameters, now_ms, &mut tables)
                        .await?;
                    let mut wanted: Vec<(usize, String, DataType)> = Vec::new();
                    for (id, data_type) in planned.plan.get_parameter_types()? {
                        let position = id
                            .strip_prefix('$')
                            .and_then(|n| n.parse::<usize>().ok())
                            .ok_or_else(|| {
                            AccessError::Invalid(format!(
                                "parameter {id}: write parameters as $1, $2, …"
                            ))
                        })?;
                        wanted.push((position, id, data_type.unwrap_or(DataType::Null)));
                    }
                    wanted.sort_by_key(|(position, _, _)| *position);
                    if wanted
                        .iter()
                        .enumerate()
                        .any(|(i, (position, _, _))| *position != i + 1)
                    {
                        return Err(AccessError::Invalid(
                            "parameters must be numbered $1, $2, … without gaps".into(),
                        ));
                    }
                    let parameters = Arc::new(Schema::new(
                        wanted
                            .into_iter()
                            .map(|(_, id, data_type)| Field::new(id, data_type, true))
                            .collect::<Vec<_>>(),
                    ));
                    // Placeholders still open: the columns as the logical
                    // plan types them (a physical plan needs the values).
                    let columns = if parameters.fields().is_empty() {
                        let task = Arc::new(TaskContext::from(&planned.state));
                        let plan = DataFrame::new(planned.state, planned.plan)
                            .create_physical_plan()
                            .await
                            .map_err(|e| {
                                limits::running_error(
                                    principal.kind,
                                    e,
                                    self.settings.query_memory_mb,
                                )
                            })?;
                        let columns = plan.schema();
                        if reusable {
                            let plan = described::Reusable {
                                plan,
                                task,
                                treatments: planned.treatments,
                                tables: tables.clone(),
                            };
                            self.described.keep(principal, purpose, sql, since, plan);
                        }
                        columns
                    } else {
                        Arc::clone(planned.plan.schema().inner())
                    };
                    Ok(Described {
                        columns,
                        parameters,
                    })
                })
                .await
            }
            Err(e) => Err(e),
        };
        match outcome {
            Ok(described) => Ok(described),
            Err(e) => {
                let request_id = request_id();
                self.audit(
                    &request_id,
                    principal,
                    purpose,
                    "query",
                    &tables,
                    Err(&e),
                    None,
                    now_ms,
                )?;
                Err(e)
            }
        }
    }

    /// Drops the plans kept for the runs of statements described before
    /// (see [`AccessEnv::schema_of`]): after a vehicle event, and at each
    /// maintenance tick.
    pub fn forget_described(&self) {
        self.described.clear();
    }

    /// The tables `principal` may query for `purpose`, each with its
    /// columns: its views and nothing else (hidden tables are left out).
    pub async fn views(
        &self,
        principal: &Principal,
        purpose: &str,
        now_ms: i64,
    ) -> Result<Vec<(String, SchemaRef)>> {
        let listing = async {
            let session = self
                .session(principal, purpose, now_ms, self.settings.query_memory_mb)
                .await?;
            let mut views = Vec::new();
            for name in session.treatments.keys() {
                let provider = session.ctx.table_provider(name.as_str()).await?;
                views.push((name.clone(), provider.schema()));
            }
            Ok(views)
        };
        let outcome = match self.start(principal) {
            Ok(_running) => self.bounded(listing).await,
            Err(e) => Err(e),
        };
        // A refused listing is audited like a refused query; a listing
        // carries names and types, no rows, and is not.
        if let Err(e) = &outcome {
            self.audit(
                &request_id(),
                principal,
                purpose,
                "list",
                &[],
                Err(e),
                None,
                now_ms,
            )?;
        }
        outcome
    }

    /// Counts one more running request of `principal`, or refuses it at
    /// once if it already has `access.max_queries_per_principal`, so that one
    /// client cannot take every slot.
    fn start(&self, principal: &Principal) -> Result<RunningQuery> {
        RunningQuery::start(
            &self.running,
            &principal.id,
            self.settings.max_queries_per_principal,
        )
    }

    /// Runs `work` of a request counted by [`Self::start`] when a slot is
    /// free, cancelled (dropped, which stops its DataFusion tasks) once
    /// `access.query_timeout_ms` has passed, waiting for the slot included.
    async fn bounded<T>(&self, work: impl Future<Output = Result<T>>) -> Result<T> {
        let limit = Duration::from_millis(self.settings.query_timeout_ms);
        let turn = async {
            let _slot = self
                .slots
                .acquire()
                .await
                .map_err(|_| AccessError::Limit("the query layer is closed".into()))?;
            work.await
        };
        match tokio::time::timeout(limit, turn).await {
            Ok(outcome) => outcome,
            Err(_) => Err(timed_out(limit)),
        }
    }

    /// Writes one audit line; an audit that cannot be written fails the request.
    #[allow(clippy::too_many_arguments)]
    fn audit(
        &self,
        request_id: &str,
        principal: &Principal,
        purpose: &str,
        action: &str,
        tables: &[String],
        decision: Result<String, &AccessError>,
        rows: Option<u64>,
        now_ms: i64,
    ) -> Result<()> {
        let (decision, reason) = match decision {
            Ok(decision) => (decision, None),
            Err(AccessError::Refused(reason)) => ("refuse".to_owned(), Some(reason.clone())),
            // Engine errors can quote values; the audit keeps only their kind.
            Err(AccessError::DataFusion(_)) => ("error".to_owned(), Some("SQL error".to_owned())),
            Err(other) => ("error".to_owned(), Some(other.to_string())),
        };
        let record = audit::AuditRecord {
            at: rfc3339(now_ms).unwrap_or_default(),
            request_id: request_id.to_owned(),
            principal: principal.id.clone(),
            principal_kind: principal.kind.name().to_owned(),
            // Only a catalogue-shaped name is written; anything else was refused.
            purpose: if purpose::is_name(purpose) {
                purpose.to_owned()
            } else {
                "(invalid)".to_owned()
            },
            action: action.to_owned(),
            tables: tables.join(","),
            decision,
            reason,
            rows,
        };
        audit::append(&self.settings.audit_dir, now_ms, &record)
    }

    /// Deletes query audit files past their retention.
    pub fn expire_audit(&self, now_ms: i64) -> Result<Vec<PathBuf>> {
        audit::expire(
            &self.settings.audit_dir,
            now_ms,
            i64::from(self.settings.audit_retention_days) * DAY_MS,
        )
    }
}

/// Runs `df` and reads its answer batch by batch, reserving each batch in
/// the session's memory `pool`: the answer counts against the same bound as
/// the operators that made it. An error while running keeps its text from
/// everyone but the operator (see [`limits::running_error`]).
async fn collect_bounded(
    df: DataFrame,
    pool: &Arc<dyn MemoryPool>,
    kind: PrincipalKind,
    memory_mb: u32,
) -> Result<(SchemaRef, Vec<RecordBatch>)> {
    let running = |e| limits::running_error(kind, e, memory_mb);
    let answer = MemoryConsumer::new("fleetgate answer").register(pool);
    let mut stream = df.execute_stream().await.map_err(running)?;
    let schema = stream.schema();
    let mut batches = Vec::new();
    while let Some(batch) = stream.next().await {
        let batch = compact_views(batch.map_err(running)?)?;
        answer
            .try_grow(batch.get_array_memory_size())
            .map_err(running)?;
        batches.push(batch);
    }
    Ok((schema, batches))
}

/// `batch` with its string and binary views copied out of the buffers they
/// point into: a few rows a view keeps of a large page would otherwise hold
/// (and count against the bound) the whole page, so whether an answer fits
/// would depend on the rows the view hides.
fn compact_views(batch: RecordBatch) -> Result<RecordBatch> {
    use arrow::array::{ArrayRef, AsArray};
    use arrow::datatypes::DataType;
    let is_view = |c: &ArrayRef| matches!(c.data_type(), DataType::Utf8View | DataType::BinaryView);
    if !batch.columns().iter().any(is_view) {
        return Ok(batch);
    }
    let columns: Vec<ArrayRef> = batch
        .columns()
        .iter()
        .map(|c| match c.data_type() {
            DataType::Utf8View => Arc::new(c.as_string_view().gc()) as ArrayRef,
            DataType::BinaryView => Arc::new(c.as_binary_view().gc()) as ArrayRef,
            _ => Arc::clone(c),
        })
        .collect();
    Ok(RecordBatch::try_new(batch.schema(), columns).map_err(DataFusionError::from)?)
}

const DAY_MS: i64 = 86_400_000;

fn rfc3339(ms: i64) -> Option<String> {
    chrono::DateTime::from_timestamp_millis(ms).map(|t| t.to_rfc3339())
}

fn request_id() -> String {
    let mut bytes = [0u8; 8];
    // An id only has to be unique in practice; the clock stands in if the
    // OS random source fails.
    if getrandom::fill(&mut bytes).is_err() {
        bytes = crate::core::clock::now_ms().to_le_bytes();
    }
    hex::encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_principal_at_its_limit_is_refused_until_one_of_its_requests_ends() {
        let running = Arc::new(Mutex::new(HashMap::new()));
        let first = RunningQuery::start(&running, "alice", 2).expect("first");
        let second = RunningQuery::start(&running, "alice", 2).expect("second");
        let third = RunningQuery::start(&running, "alice", 2);
        assert!(
            matches!(&third, Err(AccessError::Limit(m)) if m.contains("max_queries_per_principal")),
            "{:?}",
            third.err()
        );
        // Another principal is not held back by alice's requests.
        let bob = RunningQuery::start(&running, "bob", 2).expect("bob");
        drop(first);
        let again = RunningQuery::start(&running, "alice", 2).expect("a slot freed");
        drop((second, again, bob));
        assert!(
            running.lock().expect("lock").is_empty(),
            "no count left behind"
        );
    }
}
