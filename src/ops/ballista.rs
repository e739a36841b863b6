//! `fleetgate ballista`: a Ballista scheduler, or one of its executors,
//! that encodes and decodes plans with fleetgate's codecs (see
//! [`crate::access::distributed`]), so that principals' queries over the
//! policy views run on a cluster, over the same tables.
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
}

pub type Result<T, E = BallistaError> = std::result::Result<T, E>;

/// Seconds an executor keeps a finished job's shuffle files: they hold
/// rows of the tables (pseudonymised, as the views read them).
const JOB_DATA_KEEP_SECS: u64 = 60;

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
        finished_job_data_clean_up_interval_seconds: JOB_DATA_KEEP_SECS,
        ..SchedulerConfig::default()
    };
    let cluster = BallistaCluster::new_from_config(&config).await?;
    let scheduler =
        create_scheduler::<LogicalPlanNode, PhysicalPlanNode>(cluster, Arc::new(config)).await?;
    ready(addr);
    start_grpc_service_with_listener(listener, scheduler).await?;
    Ok(())
}

/// Where an executor listens and whom it serves.
#[derive(Debug, Clone)]
pub struct ExecutorSettings {
    /// The scheduler's address.
    pub scheduler: SocketAddr,
    /// The address others reach this executor at (its Arrow Flight port;
    /// its gRPC port is `grpc_port`).
    pub bind: SocketAddr,
    pub grpc_port: u16,
    /// Tasks it runs at once.
    pub cores: usize,
    /// Where its shuffle files go.
    pub work_dir: PathBuf,
}

/// Runs an executor until the process stops, reading the tables of the
/// store `config` names.
pub async fn run_executor(config: &Config, settings: ExecutorSettings) -> Result<()> {
    std::fs::create_dir_all(&settings.work_dir)
        .map_err(|e| BallistaError::WorkDir(settings.work_dir.clone(), e))?;
    let root = StoreRoot::from_config(&config.storage)?;
    let store = root.object_store_url()?;
    let runtime = Arc::new(
        move |_: &SessionConfig| -> datafusion::error::Result<Arc<RuntimeEnv>> {
            let runtime = RuntimeEnvBuilder::new().build()?;
            if let Some((url, store)) = &store {
                runtime.register_object_store(url, Arc::clone(store));
            }
            Ok(Arc::new(runtime))
        },
    );
    let process = ExecutorProcessConfig {
        bind_host: settings.bind.ip().to_string(),
        external_host: Some(settings.bind.ip().to_string()),
        port: settings.bind.port(),
        grpc_port: settings.grpc_port,
        scheduler_host: settings.scheduler.ip().to_string(),
        scheduler_port: settings.scheduler.port(),
        vcores: settings.cores,
        work_dir: Some(settings.work_dir.to_string_lossy().into_owned()),
        job_data_ttl_seconds: JOB_DATA_KEEP_SECS,
        job_data_clean_up_interval_seconds: JOB_DATA_KEEP_SECS,
        executor_heartbeat_interval_seconds: 5,
        override_logical_codec: Some(Arc::new(PlanCodec::default())),
        override_physical_codec: Some(Arc::new(ExecCodec::default())),
        override_runtime_producer: Some(runtime),
        ..ExecutorProcessConfig::default()
    };
    start_executor_process(Arc::new(process)).await?;
    Ok(())
}
