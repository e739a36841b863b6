//! `fleetgate ballista`: a Ballista scheduler, or one of its executors,
//! that encodes and decodes plans with fleetgate's codecs (see
//! [`crate::access::distributed`]), so that principals' queries over the
//! policy views run on a cluster, over the same tables.
//!
//! Ballista authenticates nothing: whoever reaches a scheduler's or an
//! executor's port can run any plan, and an executor reads any file its
//! process can. They listen on loopback by default; on several hosts, put
//! them on a network only the nodes and executors reach.
//!
//! The scheduler plans each query (a principal's plan over its views, as
//! a node sent it) into stages; the executors run their tasks, reading
//! the tables' Parquet files from the store (`storage.uri`: a directory
//! every executor mounts at the same path, or S3), and exchange
//! intermediate results (shuffle files in their work directory, deleted a
//! minute after their job ends) over Arrow Flight.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use ballista_executor::executor_process::{ExecutorProcessConfig, start_executor_process};
use ballista_scheduler::cluster::BallistaCluster;
use ballista_scheduler::config::SchedulerConfig;
use ballista_scheduler::scheduler_process::{create_scheduler, start_grpc_service_with_listener};
use datafusion::execution::runtime_env::{RuntimeEnv, RuntimeEnvBuilder};
use datafusion::prelude::SessionConfig;
use datafusion_proto::protobuf::{LogicalPlanNode, PhysicalPlanNode};

use crate::access::distributed::{ExecCodec, PlanCodec};
use crate::config::Config;
use crate::store::StoreRoot;

#[derive(Debug, thiserror::Error)]
pub enum BallistaError {
    #[error("ballista: {0}")]
    Ballista(#[from] ballista_core::error::BallistaError),
    #[error("{0}: {1}")]
    Bind(SocketAddr, std::io::Error),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("{0}: {1}")]
    WorkDir(PathBuf, std::io::Error),
    #[error("an executor bound to {0} needs --advertise: the host others reach it at")]
    Unreachable(SocketAddr),
}

pub type Result<T, E = BallistaError> = std::result::Result<T, E>;

/// Seconds after a job finished that the scheduler has its executors
/// delete its shuffle files: they hold rows of the tables (pseudonymised,
/// as the views read them).
const FINISHED_JOB_DATA_SECS: u64 = 60;
/// Seconds an executor keeps a job directory nothing was written to, for
/// jobs the scheduler never reported finished (it died, the executor was
/// cut off). Longer than any query may run: a running job's earlier stages
/// are read by its later ones.
const ORPHANED_JOB_DATA_SECS: u64 = 3_600;

/// Runs a scheduler on `bind` (port 0 picks a free port) until the process
/// stops; `ready` is told the address it listens on.
pub async fn run_scheduler(bind: SocketAddr, ready: impl FnOnce(SocketAddr)) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(bind)
        .await
        .map_err(|e| BallistaError::Bind(bind, e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| BallistaError::Bind(bind, e))?;
    let config = SchedulerConfig {
        bind_host: addr.ip().to_string(),
        external_host: addr.ip().to_string(),
        bind_port: addr.port(),
        override_logical_codec: Some(Arc::new(PlanCodec::default())),
        override_physical_codec: Some(Arc::new(ExecCodec::default())),
        finished_job_data_clean_up_interval_seconds: FINISHED_JOB_DATA_SECS,
        ..SchedulerConfig::default()
    };
    let cluster = BallistaCluster::new_from_config(&config).await?;
    let scheduler =
        create_scheduler::<LogicalPlanNode, PhysicalPlanNode>(cluster, Arc::new(config)).await?;
    ready(addr);
    start_grpc_service_with_listener(listener, scheduler).await?;
    Ok(())
}

/// Where an executor listens and whom it serves (`fleetgate ballista executor`).
#[derive(Debug, Clone, clap::Args)]
pub struct ExecutorSettings {
    /// The scheduler's address.
    #[arg(long, default_value = "127.0.0.1:50050")]
    pub scheduler: SocketAddr,
    /// Where it listens: its Arrow Flight port (results, shuffle data);
    /// its gRPC port is --grpc-port, on the same address.
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub bind: SocketAddr,
    #[arg(long, default_value_t = 50052)]
    pub grpc_port: u16,
    /// The host the scheduler, the nodes and the other executors reach it
    /// at (default: --bind's address, which must then be a specific one).
    #[arg(long)]
    pub advertise: Option<String>,
    /// Tasks it runs at once.
    #[arg(long, default_value_t = 2)]
    pub cores: usize,
    /// Memory its tasks share before they spill to --work-dir, MiB.
    #[arg(long, default_value_t = 1024)]
    pub memory_mb: u64,
    /// Where its shuffle and spill files go (on a volume of its own: a
    /// query can fill it).
    #[arg(long, default_value = "./ballista")]
    pub work_dir: PathBuf,
}

/// Runs an executor until the process stops, reading the tables of the
/// store `config` names.
pub async fn run_executor(config: &Config, settings: ExecutorSettings) -> Result<()> {
    std::fs::create_dir_all(&settings.work_dir)
        .map_err(|e| BallistaError::WorkDir(settings.work_dir.clone(), e))?;
    let advertise = match &settings.advertise {
        Some(host) => host.clone(),
        None if settings.bind.ip().is_unspecified() => {
            return Err(BallistaError::Unreachable(settings.bind));
        }
        None => settings.bind.ip().to_string(),
    };
    let root = StoreRoot::from_config(&config.storage)?;
    let store = root.object_store_url()?;
    let spill_dir = settings.work_dir.clone();
    let runtime = Arc::new(
        move |_: &SessionConfig| -> datafusion::error::Result<Arc<RuntimeEnv>> {
            let runtime = RuntimeEnvBuilder::new()
                .with_temp_file_path(&spill_dir)
                .build()?;
            if let Some((url, store)) = &store {
                runtime.register_object_store(url, Arc::clone(store));
            }
            Ok(Arc::new(runtime))
        },
    );
    let process = ExecutorProcessConfig {
        bind_host: settings.bind.ip().to_string(),
        external_host: Some(advertise),
        port: settings.bind.port(),
        grpc_port: settings.grpc_port,
        scheduler_host: settings.scheduler.ip().to_string(),
        scheduler_port: settings.scheduler.port(),
        vcores: settings.cores,
        work_dir: Some(settings.work_dir.to_string_lossy().into_owned()),
        job_data_ttl_seconds: ORPHANED_JOB_DATA_SECS,
        job_data_clean_up_interval_seconds: FINISHED_JOB_DATA_SECS,
        memory_pool_size: Some(settings.memory_mb << 20),
        executor_heartbeat_interval_seconds: 5,
        override_logical_codec: Some(Arc::new(PlanCodec::default())),
        override_physical_codec: Some(Arc::new(ExecCodec::default())),
        override_runtime_producer: Some(runtime),
        ..ExecutorProcessConfig::default()
    };
    start_executor_process(Arc::new(process)).await?;
    Ok(())
}
