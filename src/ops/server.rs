//! Wiring of a running server: broker → ingest → worker shards (with their
//! write-ahead logs) → table writers, started in that order's reverse and
//! stopped in its order.
//!
//! [`start`] first recovers: it reads the WAL, asks the Delta tables which
//! entries their commits hold (their WAL transactions), and hands the
//! writers exactly the rest.
//! [`ServerHandle::shutdown`] stops ingest at the drain barrier, lets every
//! worker empty its queue and every writer commit its open files, then
//! closes the logs, which leaves them empty. Nothing here decodes,
//! validates or writes; it only connects the stages.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam::channel::{Sender, bounded};

use crate::access::{AccessEnv, AccessError};
use crate::config::{Acknowledge, Config, ConfigError, SinkKind};
use crate::control::ControlPlane;
use crate::control::documents::Document;
use crate::control::lease::{self, Claim, Lease};
use crate::core::fence::Fence;
use crate::core::priority;
use crate::ingest::auth::{CREDENTIALS, Credentials};
use crate::ingest::durable::DurableFrontier;
use crate::ingest::{broker, link as ingest};
use crate::lifecycle::requests::LifecycleState;
use crate::lifecycle::retention::{self, Retention, RetentionError};
use crate::metrics::{Metrics, MetricsSnapshot};
use crate::ops::admin_token::{AdminToken, AdminTokenError};
use crate::ops::flight::{self, FlightSqlError};
use crate::ops::http::{self, AdminState, HttpError, Queue};
use crate::ops::queries::QueryPool;
use crate::ops::served::Served;
use crate::ops::takeover::{NodeClaim, Takeover};
use crate::pipeline::decode::Limits;
use crate::pipeline::worker::{PipelineError, WorkerContext, spawn_worker};
use crate::privacy::stage::PrivacyShared;
use crate::privacy::vault::VaultError;
use crate::schema::{Registry, SchemaError};
use crate::store::{
    StoreError, StoreRoot, Table, TableBatch, TableListener, WriterSettings, spawn_writer,
};
use crate::wal::copies::Copies;
use crate::wal::{self, ShardWal, Tracker, WalError, WalSettings};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Schema(#[from] SchemaError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Broker(#[from] broker::BrokerError),
    #[error(transparent)]
    Ingest(#[from] ingest::IngestError),
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    #[error(transparent)]
    Wal(#[from] WalError),
    #[error(transparent)]
    Vault(#[from] VaultError),
    #[error(transparent)]
    ControlPlane(#[from] crate::control::ControlError),
    #[error(transparent)]
    Http(#[from] HttpError),
    #[error(transparent)]
    FlightSql(#[from] FlightSqlError),
    #[error("cannot start the query runtime: {0}")]
    QueryRuntime(std::io::Error),
    #[error(transparent)]
    Retention(#[from] RetentionError),
    #[error(transparent)]
    Access(#[from] AccessError),
    #[error(transparent)]
    AdminToken(#[from] AdminTokenError),
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start the retention thread: {0}")]
    RetentionThread(std::io::Error),
    #[error("thread {0} panicked")]
    Panicked(String),
    #[error("WAL directory {path}: {source}")]
    WalDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("WAL directory {path} is in use by another fleetgate process")]
    WalInUse { path: PathBuf },
    #[error(
        "cluster.node_id {node:?} is in use: its lease is renewed by {holder:?}, another \
         running process (every node needs a name of its own)"
    )]
    NodeInUse { node: String, holder: String },
    #[error(
        "gave up storing node {0:?}'s WAL copies: the lease on its name was not held for a \
         whole term (it came back, or the control plane is unreachable); its writers stay fenced"
    )]
    TakeoverAbandoned(String),
}

pub type Result<T, E = ServerError> = std::result::Result<T, E>;

/// A running fleetgate server.
pub struct ServerHandle {
    mqtt_addr: SocketAddr,
    link_client_id: String,
    mqtt5_addr: SocketAddr,
    tls_addr: Option<SocketAddr>,
    data_dir: PathBuf,
    stop: Arc<AtomicBool>,
    ingest: JoinHandle<()>,
    workers: Vec<JoinHandle<ShardWal>>,
    writers: Vec<JoinHandle<()>>,
    metrics: Arc<Metrics>,
    tracker: Arc<Tracker>,
    privacy: Arc<PrivacyShared>,
    admin: Served,
    flight_sql: Served,
    /// Dropped after both front-ends stopped.
    queries: QueryPool,
    retention: Option<Sweeper>,
    /// In a cluster: the lease on this node's name, released last.
    node_claim: Option<NodeClaim>,
}

/// The background retention sweep; dropping `stop` ends it.
struct Sweeper {
    stop: crossbeam::channel::Sender<()>,
    thread: JoinHandle<()>,
}

/// Descriptors kept for files, the HTTP and query front-ends, beside the
/// broker's connections.
const DESCRIPTORS_BESIDES_CONNECTIONS: u64 = 512;

/// Raises the open-file limit as far as the system allows, and says so
/// when it still cannot hold `broker.max_connections` vehicles.
fn warn_if_too_few_descriptors(config: &Config) {
    let Some(limit) = crate::core::fsio::raise_open_file_limit() else {
        return;
    };
    let wanted = config.broker.max_connections as u64 + DESCRIPTORS_BESIDES_CONNECTIONS;
    if limit < wanted {
        tracing::warn!(
            limit,
            max_connections = config.broker.max_connections,
            "the open-file limit is below broker.max_connections + {DESCRIPTORS_BESIDES_CONNECTIONS}: \
             connections past it are refused; raise the hard limit (LimitNOFILE= or ulimit -Hn)"
        );
    }
}

/// Starts every stage; returns once the broker accepts connections.
///
/// The steps, in order: open what holds state (schemas, rules, vault, the
/// store), read what the WAL and the tables hold, start the table writers,
/// hand them what only the WAL holds, start the worker shards, the query
/// front-ends and the sweep, and last the broker with its ingest link.
pub fn start(config: &Config) -> Result<ServerHandle> {
    config.validate()?;
    // First, so that a port in use stops start-up before it does anything.
    let listeners = broker::Listeners::bind(&config.broker)?;
    crate::core::fsio::restrict_new_files();
    warn_if_too_few_descriptors(config);
    let registry = Registry::load_from(config.storage.schema_dir.as_deref())?;
    let retention = Retention::load(config.retention.rules_file.as_deref(), &registry)?;
    let privacy = PrivacyShared::open(config)?;
    let data_dir = config.storage.data_dir.clone();
    crate::core::fsio::create_dir_all(&data_dir).map_err(|source| ServerError::DataDir {
        path: data_dir.clone(),
        source,
    })?;
    let metrics = Arc::new(Metrics::default());
    let root = StoreRoot::from_config(&config.storage)?;
    let unconverted = crate::store::delta::unconverted(&root);
    if !unconverted.is_empty() {
        return Err(StoreError::NotConverted(unconverted).into());
    }

    // In a cluster: this node's name is its own before its WAL is read.
    let plane = ControlPlane::from_config(config)?;
    let node_claim = match &plane {
        Some(plane) => Some(NodeClaim::take(config, plane.clone(), metrics.clone())?),
        None => None,
    };
    // Every node of a cluster reads the copies (to store a dead node's, and
    // so that no deletion request retires while they wait); only those
    // with `copy_wal` write their own.
    let all_copies = match &plane {
        Some(_) => Some(Copies::new(
            root.wal_copies().map_err(|source| ServerError::WalDir {
                path: PathBuf::from("_fleetgate_wal"),
                source,
            })?,
            &config.cluster.node_id,
        )),
        None => None,
    };
    let fence = node_claim.as_ref().map(NodeClaim::fence);
    let wal_settings = WalSettings {
        dir: config.wal_dir(),
        segment_bytes: config.wal.segment_bytes,
        fsync_interval: Duration::from_millis(config.wal.fsync_interval_ms),
        fsync_bytes: config.wal.fsync_bytes,
        max_segment_age: Duration::from_millis(config.wal.max_segment_age_ms),
        copies: all_copies.clone().filter(|_| config.cluster.copy_wal),
        fence: fence.clone(),
    };
    let recovery = Recovery::read(config, &root, &wal_settings)?;
    let tracker = Arc::new(Tracker::default());
    let mut queues = Vec::new();
    let writers = start_writers(
        config,
        &root,
        &registry,
        &metrics,
        &tracker,
        &mut queues,
        fence,
    )?;
    recovery.replay(&tracker, &writers.senders, &metrics);
    let shard_count = recovery.shard_count(config);
    let workers = start_workers(
        config,
        WorkerContext {
            registry,
            limits: Limits {
                max_payload_bytes: config.pipeline.max_payload_bytes,
                max_records_per_publish: config.pipeline.max_records_per_publish,
                max_clock_skew_ms: config.pipeline.max_clock_skew_ms,
            },
            dead_letter_payload_bytes: config.pipeline.dead_letter_payload_bytes,
            privacy: privacy.clone(),
            metrics: metrics.clone(),
            writers: writers.senders,
            frontier: Arc::new(DurableFrontier::new(shard_count)),
            sync_immediately: config.broker.acknowledge == Acknowledge::Durable,
        },
        shard_count,
        &recovery,
        &wal_settings,
        &tracker,
        &mut queues,
    )?;

    let access = Arc::new(AccessEnv::new(config, Some(privacy.clone()))?);
    let credentials = match &config.broker.credentials_file {
        Some(path) => {
            let store = Document::at(plane.as_ref(), CREDENTIALS, path.clone());
            Some(Arc::new(Credentials::new(
                store,
                privacy.keys.redaction_key(),
            )))
        }
        None => None,
    };
    let admin_token = AdminToken::load_or_create(&config.admin.token_file)?;
    let queries = QueryPool::start(
        config.access.query_threads,
        access.query_tasks(),
        Duration::from_millis(config.access.query_timeout_ms),
    )
    .map_err(ServerError::QueryRuntime)?;
    let flight_sql = flight::spawn(
        config.admin.flight_sql_addr,
        access.clone(),
        queries.handle(),
        metrics.clone(),
    )?;
    let admin = http::spawn(
        config.admin.http_addr,
        AdminState {
            metrics: metrics.clone(),
            exposition: http::exposition(metrics.clone(), queues, credentials.clone()),
            privacy: privacy.clone(),
            lifecycle: access.lifecycle.clone(),
            access: access.clone(),
            credentials: credentials.clone(),
            admin_token,
        },
        queries.handle(),
        Duration::from_secs(config.admin.summary_interval_secs),
    )?;
    let lifecycle = access.lifecycle.clone();
    let retention = match config.retention.sweep_interval_secs {
        0 => None,
        secs => Some(spawn_sweeper(
            retention,
            access,
            SweepSettings {
                root: root.clone(),
                lifecycle,
                vacuum_grace_ms: config.storage.vacuum_grace_ms,
                compaction: crate::store::Compaction::from_config(&config.storage),
                max_clock_skew_ms: config.pipeline.max_clock_skew_ms,
                every: Duration::from_secs(secs),
                lease: maintenance_lease(config, plane.as_ref()),
                takeover: match (&plane, &all_copies) {
                    (Some(plane), Some(copies)) => Some(Takeover::new(
                        config,
                        root.clone(),
                        copies.clone(),
                        plane.clone(),
                        metrics.clone(),
                    )),
                    _ => None,
                },
            },
            metrics.clone(),
        )?),
    };

    // The patched broker reserves the link's client id for the in-process
    // link (vendor/rumqttd/PATCHED.md); it is random per run as well, so that
    // no client can even aim at it.
    let link_client_id = format!(
        "fleetgate-ingest-{:016x}",
        crate::core::clock::random_nonce()
    );
    let embedded = broker::start(
        &config.broker,
        listeners,
        &link_client_id,
        credentials.clone(),
        metrics.publish_rate_limited.clone(),
    )?;
    let stop = Arc::new(AtomicBool::new(false));
    let sink = match config.pipeline.sink {
        SinkKind::Store => ingest::Sink::Shards(workers.senders),
        SinkKind::Discard => {
            tracing::warn!(
                "pipeline.sink = \"discard\": publishes are counted and dropped, nothing is stored"
            );
            ingest::Sink::Discard(metrics.clone())
        }
    };
    let ingest = ingest::spawn(
        embedded.link_tx,
        embedded.link_rx,
        sink,
        workers.frontier,
        stop.clone(),
    )?;
    tracing::info!(
        mqtt = %embedded.mqtt_addr,
        mqtt5 = %embedded.mqtt5_addr,
        admin = %admin.addr,
        flight_sql = %flight_sql.addr,
        data_dir = %data_dir.display(),
        workers = workers.handles.len(),
        "fleetgate is running"
    );
    Ok(ServerHandle {
        mqtt_addr: embedded.mqtt_addr,
        link_client_id,
        mqtt5_addr: embedded.mqtt5_addr,
        tls_addr: embedded.tls_addr,
        data_dir,
        stop,
        ingest,
        workers: workers.handles,
        writers: writers.handles,
        metrics,
        tracker,
        privacy,
        admin,
        flight_sql,
        queries,
        retention,
        node_claim,
    })
}

/// What an unclean stop left: the WAL's entries, and how far each table
/// holds each shard's entries (the Delta transactions of its commits).
pub(super) struct Recovery {
    pub(super) recovered: wal::Recovered,
    stored: HashMap<(Table, u16), u64>,
}

impl Recovery {
    /// Reads the WAL (and in a cluster its copies in the store) and the
    /// tables, before any writer commits.
    fn read(config: &Config, root: &StoreRoot, settings: &WalSettings) -> Result<Self> {
        let mut recovered = wal::recover(&settings.dir, config.wal.skip_corrupt)?;
        wal::claim_for_node(&settings.dir, &config.cluster.node_id, &recovered)?;
        if let Some(copies) = &settings.copies {
            // What this node acknowledged before its disk was lost.
            recovered.merge_copies(copies.read(config.wal.skip_corrupt)?);
        }
        Self::of(config, root, recovered)
    }

    /// What `recovered` holds that the tables do not, for the node
    /// `config.cluster.node_id`.
    pub(super) fn of(
        config: &Config,
        root: &StoreRoot,
        mut recovered: wal::Recovered,
    ) -> Result<Self> {
        let shard_ids: Vec<u16> = (0..config.worker_count())
            .filter_map(|i| u16::try_from(i).ok())
            .chain(recovered.shards.keys().copied())
            .collect();
        let stored = crate::store::block_on(crate::store::stored_through(
            root,
            &config.cluster.node_id,
            &shard_ids,
        ))?;
        // A shard numbers on past every entry a table holds, even when its log
        // is gone (a new disk): a reused number would read as stored.
        for (&(_, shard), &seq) in &stored {
            let log = recovered.shards.entry(shard).or_default();
            log.next_seq = log.next_seq.max(seq + 1);
        }
        Ok(Self { recovered, stored })
    }

    /// Hands the running writers whatever the log holds that no commit holds.
    pub(super) fn replay(
        &self,
        tracker: &Tracker,
        writers: &[Sender<TableBatch>],
        metrics: &Metrics,
    ) {
        let entries = self.recovered.entry_count();
        if entries == 0 {
            return;
        }
        let mut replayed = 0u64;
        for entry in self.recovered.shards.values().flat_map(|s| &s.entries) {
            let stored_through = self.stored.get(&(entry.table, entry.id.shard));
            if stored_through.is_some_and(|&seq| entry.id.seq <= seq) {
                continue;
            }
            tracker.register(entry.id);
            // The writers run already; a send fails only if one panicked.
            let _ = writers[entry.table.index()].send(TableBatch {
                partition: entry.partition,
                batch: entry.batch.clone(),
                wal: entry.id,
            });
            replayed += 1;
        }
        metrics
            .wal
            .entries_replayed
            .fetch_add(replayed, Ordering::Relaxed);
        tracing::warn!(
            entries,
            replayed,
            already_stored = entries as u64 - replayed,
            "recovered the write-ahead log of an unclean stop"
        );
    }

    /// How many worker shards run: those configured, or more when a log
    /// written by more workers still holds entries (each shard is owned by
    /// a worker until it holds none).
    fn shard_count(&self, config: &Config) -> usize {
        let recovered_shards = self
            .recovered
            .shards
            .iter()
            .filter(|(_, s)| !s.entries.is_empty())
            .map(|(shard, _)| usize::from(*shard) + 1)
            .max()
            .unwrap_or(0);
        config.worker_count().max(recovered_shards)
    }
}

/// The table writers: their threads, and their senders at each table's index.
pub(super) struct Writers {
    pub(super) handles: Vec<JoinHandle<()>>,
    pub(super) senders: Vec<Sender<TableBatch>>,
}

/// Starts one writer thread per table, committing as the node
/// `config.cluster.node_id` while `fence` (in a cluster) holds.
pub(super) fn start_writers(
    config: &Config,
    root: &StoreRoot,
    registry: &Registry,
    metrics: &Arc<Metrics>,
    tracker: &Arc<Tracker>,
    queues: &mut Vec<Queue>,
    fence: Option<Arc<dyn Fence>>,
) -> Result<Writers> {
    let storage = &config.storage;
    let mut handles = Vec::new();
    let mut senders = Vec::new();
    for (table, schema) in registry.tables() {
        let (tx, rx) = bounded(config.pipeline.queue_capacity);
        queues.push(depth(format!("writer-{}", table.name()), &rx));
        let mut metadata = vec![("fleetgate.table".to_owned(), table.name().to_owned())];
        if let Table::Stream(stream) = table {
            let version = registry.get(stream).version;
            metadata.push(("fleetgate.schema_version".to_owned(), version.to_string()));
        }
        let settings = WriterSettings {
            table: table.name().to_owned(),
            node: config.cluster.node_id.clone(),
            root: root.clone(),
            schema,
            roll_rows: storage.roll_rows,
            roll_bytes: storage.roll_bytes,
            roll_age: Duration::from_millis(storage.roll_age_ms),
            max_open_files: storage.max_open_files,
            memory_budget_bytes: storage.memory_budget_bytes / Table::COUNT,
            zstd_level: storage.zstd_level,
            metadata,
            fence: fence.clone(),
        };
        handles.push(spawn_writer(
            settings,
            rx,
            TableListener::new(metrics.clone(), table),
            tracker.clone(),
        )?);
        senders.push(tx);
    }
    Ok(Writers { handles, senders })
}

/// The worker shards: their threads, the senders ingest feeds them by, and
/// the frontier they report durability to.
struct Workers {
    handles: Vec<JoinHandle<ShardWal>>,
    senders: Vec<Sender<ingest::Inbound>>,
    frontier: Arc<DurableFrontier>,
}

/// Starts `shard_count` workers, each with its shard's write-ahead log. The
/// workers hold the only writer senders after this, so the writers stop
/// when they do.
fn start_workers(
    config: &Config,
    context: WorkerContext,
    shard_count: usize,
    recovery: &Recovery,
    wal_settings: &WalSettings,
    tracker: &Arc<Tracker>,
    queues: &mut Vec<Queue>,
) -> Result<Workers> {
    let frontier = context.frontier.clone();
    let mut handles = Vec::new();
    let mut senders = Vec::new();
    for index in 0..shard_count {
        let shard = u16::try_from(index).unwrap_or(u16::MAX);
        let log = ShardWal::open(
            wal_settings,
            shard,
            recovery.recovered.shards.get(&shard),
            tracker.clone(),
        )?;
        let (tx, rx) = bounded(config.pipeline.queue_capacity);
        queues.push(depth(format!("worker-{index}"), &rx));
        handles.push(spawn_worker(index, context.clone(), rx, log)?);
        senders.push(tx);
    }
    Ok(Workers {
        handles,
        senders,
        frontier,
    })
}

/// This node's claim on the maintenance lease, when it shares the tables
/// through the control plane `plane`.
fn maintenance_lease(
    config: &Config,
    plane: Option<&Arc<ControlPlane>>,
) -> Option<(Lease, Duration)> {
    let cluster = &config.cluster;
    let term = Duration::from_secs(cluster.lease_secs);
    let lease = Lease::new(plane?.clone(), lease::MAINTENANCE, &cluster.node_id, term);
    Some((lease, term))
}

/// Where and how often the background sweep runs.
struct SweepSettings {
    root: StoreRoot,
    lifecycle: LifecycleState,
    vacuum_grace_ms: i64,
    compaction: crate::store::Compaction,
    max_clock_skew_ms: i64,
    every: Duration,
    /// In a cluster: this node's claim on the maintenance lease, and its term.
    lease: Option<(Lease, Duration)>,
    /// In a cluster with WAL copies: storing those of dead nodes.
    takeover: Option<Takeover>,
}

/// Every `every`, with the real clock: deletes what has expired, auditing
/// each deletion and counting its rows, and compacts the closed hour
/// partitions, while this node holds the maintenance lease (always, alone);
/// expires this node's query audit files.
fn spawn_sweeper(
    retention: Retention,
    access: Arc<AccessEnv>,
    settings: SweepSettings,
    metrics: Arc<Metrics>,
) -> Result<Sweeper> {
    let (stop, stopped) = bounded::<()>(0);
    let SweepSettings {
        root,
        lifecycle,
        vacuum_grace_ms,
        compaction,
        max_clock_skew_ms,
        every,
        lease,
        takeover,
    } = settings;
    // A holder renews its lease well within its term.
    let tick = lease
        .as_ref()
        .map_or(every, |(_, term)| every.min(*term / 3));
    let thread = std::thread::Builder::new()
        .name("retention".into())
        .spawn(move || {
            // Compaction and deletions can wait for the ingest path.
            priority::run_nicer(priority::STORE_NICENESS);
            let claim = lease.map(|(lease, _)| Claim::new(lease));
            let mut held = false;
            // Whether this node may maintain the tables now, by `ask`ing
            // the lease; a change is logged and shown in /metrics.
            let mut may_maintain = |ask: fn(&Claim) -> crate::control::Result<bool>| {
                let holds = match &claim {
                    None => true,
                    Some(claim) => ask(claim).unwrap_or_else(|error| {
                        tracing::warn!(%error, "cannot renew the maintenance lease");
                        false
                    }),
                };
                if holds != held {
                    held = holds;
                    metrics
                        .maintenance_lease_held
                        .store(u64::from(held), Ordering::Relaxed);
                    if claim.is_some() {
                        tracing::info!(held, "maintenance lease (retention sweep, compaction)");
                    }
                }
                holds
            };
            let mut next_sweep = Instant::now() + every;
            while let Err(crossbeam::channel::RecvTimeoutError::Timeout) =
                stopped.recv_timeout(tick)
            {
                let holds = may_maintain(Claim::renew);
                if holds && let Some(takeover) = &takeover {
                    takeover.run();
                }
                if Instant::now() < next_sweep {
                    continue;
                }
                next_sweep = Instant::now() + every;
                let now_ms = crate::core::clock::now_ms();
                // Storing a dead node's WAL may have outlasted the trust in
                // the renewal above: the lease may have moved since.
                if holds && may_maintain(Claim::confirm) {
                    let run = retention::SweepRun {
                        now_ms,
                        max_clock_skew_ms,
                        vacuum_grace_ms,
                        dry_run: false,
                        unstored_since_ms: takeover.as_ref().map(Takeover::oldest_copy_ms),
                    };
                    maintain(&retention, &root, &lifecycle, &metrics, run, compaction);
                }
                // On every node, whether it swept or not: the kept table
                // versions, footers and described plans go, with what they
                // say of files a sweep on any node deleted.
                access.tables.forget();
                access.forget_described();
                match access.expire_audit(now_ms) {
                    Ok(files) if !files.is_empty() => {
                        tracing::info!(files = files.len(), "expired query audit files deleted");
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::error!(error = %e, "query audit expiry failed; will try again")
                    }
                }
            }
            if held
                && let Some(claim) = &claim
                && let Err(error) = claim.lease().release()
            {
                tracing::warn!(%error, "cannot release the maintenance lease; it lapses");
            }
        })
        .map_err(ServerError::RetentionThread)?;
    Ok(Sweeper { stop, thread })
}

/// One run of the shared tables' maintenance: the retention sweep, then
/// compaction of the closed hour partitions.
fn maintain(
    retention: &Retention,
    root: &StoreRoot,
    lifecycle: &LifecycleState,
    metrics: &Metrics,
    run: retention::SweepRun,
    compaction: crate::store::Compaction,
) {
    let swept = retention
        .clone()
        .with_state(lifecycle)
        .and_then(|rules| retention::sweep_and_record(root, &rules, lifecycle, run));
    match swept {
        Ok(deletions) => {
            for d in &deletions {
                if let Some(counters) = metrics.table(&d.table) {
                    counters.rows_expired.fetch_add(d.rows, Ordering::Relaxed);
                }
                tracing::info!(table = %d.table, partition = %d.partition, action = d.action, rows = d.rows, "expired rows deleted");
            }
        }
        Err(e) => tracing::error!(error = %e, "retention sweep failed; will try again"),
    }
    match crate::store::compact(root, run.now_ms, compaction) {
        Ok(files) if files > 0 => {
            tracing::info!(files, "small files of closed hour partitions compacted");
        }
        Ok(_) => {}
        Err(e) => tracing::error!(error = %e, "compaction failed; will try again"),
    }
}

/// A queue-depth gauge reading a clone of the queue's receiving end.
fn depth<T: Send + 'static>(name: String, rx: &crossbeam::channel::Receiver<T>) -> Queue {
    let rx = rx.clone();
    Queue {
        name,
        depth: Box::new(move || rx.len()),
    }
}

impl ServerHandle {
    /// Where MQTT 3.1.1 clients connect.
    pub fn mqtt_addr(&self) -> SocketAddr {
        self.mqtt_addr
    }

    /// The client id of fleetgate's in-process link to its broker (random per
    /// run); no network client can use it.
    pub fn link_client_id(&self) -> &str {
        &self.link_client_id
    }

    /// Where MQTT 5 clients connect.
    pub fn mqtt5_addr(&self) -> SocketAddr {
        self.mqtt5_addr
    }

    /// Where vehicles with client certificates connect, if configured.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls_addr
    }

    pub fn data_dir(&self) -> &std::path::Path {
        &self.data_dir
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Where `GET /metrics` answers.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.addr
    }

    /// Where Arrow Flight SQL answers.
    pub fn flight_sql_addr(&self) -> SocketAddr {
        self.flight_sql.addr
    }

    /// Keys, vault and the admin actions on them: erasure, consent.
    pub fn privacy(&self) -> &Arc<PrivacyShared> {
        &self.privacy
    }

    /// Stores everything acknowledged before this call, then stops every
    /// stage and returns the final counters. The broker's threads end with
    /// the process.
    pub fn shutdown(self) -> Result<MetricsSnapshot> {
        self.stop.store(true, Ordering::Relaxed);
        // Told first so that it starts no sweep while the rest stops; a
        // sweep under way ends (a commit is whole) and is joined below.
        let retention = self.retention.map(|sweeper| {
            drop(sweeper.stop);
            sweeper.thread
        });
        join("ingest", self.ingest)?;
        let mut logs = Vec::new();
        for w in self.workers {
            logs.push(join("worker", w)?);
        }
        for w in self.writers {
            join("writer", w)?;
        }
        // Every writer has committed, so every entry is covered: the logs empty.
        for log in logs {
            log.close()?;
        }
        self.admin.stop();
        self.flight_sql.stop();
        // After the front-ends: their clients are gone, so the queries and
        // streams still on the pool end, and it waits for them.
        drop(self.queries);
        if let Some(sweeper) = retention {
            join("retention", sweeper)?;
        }
        let pending = self.tracker.pending_count();
        if pending > 0 {
            tracing::error!(
                entries = pending,
                "WAL entries not in Parquet at shutdown; kept for the next start"
            );
        }
        if let Some(claim) = self.node_claim {
            claim.release();
        }
        self.metrics.log();
        Ok(self.metrics.snapshot())
    }
}

fn join<T>(name: &str, handle: JoinHandle<T>) -> Result<T> {
    handle
        .join()
        .map_err(|_| ServerError::Panicked(name.to_owned()))
}
