//! Wiring of a running server: broker → ingest → worker shards → table
//! writers, started in that order's reverse and stopped in its order.
//!
//! [`start`] returns a [`ServerHandle`]; [`ServerHandle::shutdown`] stops
//! ingest at the drain barrier, lets every worker empty its queue and every
//! writer commit its open files, and returns the final counters. Nothing
//! here decodes, validates or writes; it only connects the stages.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam::channel::bounded;

use crate::config::{Config, ConfigError};
use crate::decode::Limits;
use crate::metrics::{Metrics, MetricsSnapshot, TableListener};
use crate::pipeline::{PipelineError, WorkerContext, spawn_worker};
use crate::pseudo::{PseudoError, Pseudonymiser};
use crate::schema::{Registry, SchemaError, Stream};
use crate::store::{StoreError, WriterSettings, spawn_writer, table_dir};
use crate::{broker, dead_letter, ingest};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Schema(#[from] SchemaError),
    #[error(transparent)]
    Pseudo(#[from] PseudoError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Broker(#[from] broker::BrokerError),
    #[error(transparent)]
    Ingest(#[from] ingest::IngestError),
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("thread {0} panicked")]
    Panicked(String),
}

pub type Result<T, E = ServerError> = std::result::Result<T, E>;

/// A running fleetgate server.
pub struct ServerHandle {
    mqtt_addr: SocketAddr,
    mqtt5_addr: SocketAddr,
    data_dir: PathBuf,
    stop: Arc<AtomicBool>,
    ingest: JoinHandle<()>,
    workers: Vec<JoinHandle<()>>,
    writers: Vec<JoinHandle<()>>,
    metrics: Arc<Metrics>,
}

/// Starts every stage; returns once the broker accepts connections.
pub fn start(config: &Config) -> Result<ServerHandle> {
    config.validate()?;
    let registry = Registry::load()?;
    let pseudonymiser = Pseudonymiser::load_or_create(&config.storage.key_file)?;
    let data_dir = config.storage.data_dir.clone();
    std::fs::create_dir_all(&data_dir).map_err(|source| ServerError::DataDir {
        path: data_dir.clone(),
        source,
    })?;
    let metrics = Arc::new(Metrics::default());
    let run_id = format!("{:013}", ingest::now_ms());
    let storage = &config.storage;
    let writer_settings = |table: &str, schema, metadata| WriterSettings {
        table: table.to_owned(),
        dir: table_dir(&data_dir, table),
        schema,
        roll_rows: storage.roll_rows,
        roll_bytes: storage.roll_bytes,
        roll_age: Duration::from_millis(storage.roll_age_ms),
        max_open_files: storage.max_open_files,
        zstd_level: storage.zstd_level,
        run_id: run_id.clone(),
        metadata,
    };
    let queue = config.pipeline.queue_capacity;

    let mut writers = Vec::new();
    let mut stream_writers = Vec::new();
    for stream in Stream::ALL {
        let schema = registry.get(stream);
        let (tx, rx) = bounded(queue);
        let metadata = vec![
            ("fleetgate.table".to_owned(), stream.name().to_owned()),
            (
                "fleetgate.schema_version".to_owned(),
                schema.version.to_string(),
            ),
        ];
        writers.push(spawn_writer(
            writer_settings(stream.name(), schema.arrow.clone(), metadata),
            rx,
            TableListener::new(metrics.clone(), Some(stream)),
        )?);
        stream_writers.push(tx);
    }
    let (dead_letter_writer, rx) = bounded(queue);
    writers.push(spawn_writer(
        writer_settings(
            dead_letter::TABLE,
            dead_letter::arrow_schema(),
            vec![("fleetgate.table".to_owned(), dead_letter::TABLE.to_owned())],
        ),
        rx,
        TableListener::new(metrics.clone(), None),
    )?);

    let context = WorkerContext {
        registry,
        limits: Limits {
            max_payload_bytes: config.pipeline.max_payload_bytes,
            max_records_per_publish: config.pipeline.max_records_per_publish,
            max_clock_skew_ms: config.pipeline.max_clock_skew_ms,
        },
        dead_letter_payload_bytes: config.pipeline.dead_letter_payload_bytes,
        pseudonymiser,
        metrics: metrics.clone(),
        stream_writers,
        dead_letter_writer,
    };
    let mut shards = Vec::new();
    let mut workers = Vec::new();
    for index in 0..config.worker_count() {
        let (tx, rx) = bounded(queue);
        workers.push(spawn_worker(index, context.clone(), rx)?);
        shards.push(tx);
    }
    // The workers now hold the only writer senders, so the writers stop when they do.
    drop(context);

    let embedded = broker::start(&config.broker, "fleetgate-ingest")?;
    let stop = Arc::new(AtomicBool::new(false));
    let ingest = ingest::spawn(embedded.link_tx, embedded.link_rx, shards, stop.clone())?;
    tracing::info!(
        mqtt = %embedded.mqtt_addr,
        mqtt5 = %embedded.mqtt5_addr,
        data_dir = %data_dir.display(),
        workers = workers.len(),
        "fleetgate is running"
    );
    Ok(ServerHandle {
        mqtt_addr: embedded.mqtt_addr,
        mqtt5_addr: embedded.mqtt5_addr,
        data_dir,
        stop,
        ingest,
        workers,
        writers,
        metrics,
    })
}

impl ServerHandle {
    /// Where MQTT 3.1.1 clients connect.
    pub fn mqtt_addr(&self) -> SocketAddr {
        self.mqtt_addr
    }

    /// Where MQTT 5 clients connect.
    pub fn mqtt5_addr(&self) -> SocketAddr {
        self.mqtt5_addr
    }

    pub fn data_dir(&self) -> &std::path::Path {
        &self.data_dir
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Stores everything acknowledged before this call, then stops every
    /// stage and returns the final counters. The broker's threads end with
    /// the process.
    pub fn shutdown(self) -> Result<MetricsSnapshot> {
        self.stop.store(true, Ordering::Relaxed);
        join("ingest", self.ingest)?;
        for w in self.workers {
            join("worker", w)?;
        }
        for w in self.writers {
            join("writer", w)?;
        }
        self.metrics.log();
        Ok(self.metrics.snapshot())
    }
}

fn join(name: &str, handle: JoinHandle<()>) -> Result<()> {
    handle
        .join()
        .map_err(|_| ServerError::Panicked(name.to_owned()))
}
