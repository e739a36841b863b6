//! Configuration: the serde structs behind `fleetgate.toml`, their defaults and
//! their validation.
//!
//! The file shipped at the repository root shows every key with its default; a
//! unit test keeps it equal to [`Config::default`]. Unknown keys are rejected so a
//! typo never silently falls back to a default. Nothing here starts anything.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Errors of loading or validating a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("invalid config: {0}")]
    Invalid(String),
}

pub type Result<T, E = ConfigError> = std::result::Result<T, E>;

/// The whole configuration of a fleetgate server.
#[derive(Debug, Clone, PartialEq, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub broker: BrokerConfig,
    pub storage: StorageConfig,
    pub pipeline: PipelineConfig,
    pub wal: WalConfig,
    pub privacy: PrivacyConfig,
    pub admin: AdminConfig,
    pub retention: RetentionConfig,
    pub access: AccessConfig,
    pub cluster: ClusterConfig,
}

/// Several nodes sharing one store and one control plane (`src/control`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// This node's name, unique among the nodes sharing the tables: its
    /// WAL shards commit to Delta under `fleetgate-wal-<node_id>-<shard>`, and it holds the
    /// maintenance lease under it. Empty = the single node of embedded mode.
    pub node_id: String,
    /// PostgreSQL connection string of the shared control plane (vault,
    /// registry, deletion requests, holds, credentials, maintenance lease),
    /// e.g. `host=/run/postgresql dbname=fleetgate`; empty = embedded (the
    /// redb vault of `storage.vault_file` and the files named elsewhere).
    pub control_plane: String,
    /// How long a lease lasts unless its holder renews it, seconds: the
    /// maintenance lease (the longest another node waits before it takes
    /// over a dead holder's retention sweep and compaction), and each node's
    /// lease on its name (how long after a node died its WAL copies wait
    /// before another node stores them; a node stops committing a third of
    /// this before its lease can lapse).
    pub lease_secs: u64,
    /// With a control plane: copy each WAL group commit to the store
    /// (`<storage.uri>/_fleetgate_wal/`) before acknowledging it, so that
    /// what was acknowledged survives the loss of the node and its disk.
    pub copy_wal: bool,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            node_id: String::new(),
            control_plane: String::new(),
            lease_secs: 30,
            copy_wal: true,
        }
    }
}

/// Retention rules and the background sweep.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// A rules file replacing the built-in `schemas/retention.toml`.
    pub rules_file: Option<PathBuf>,
    /// Seconds between sweeps that delete expired partitions; 0 = no sweep.
    pub sweep_interval_secs: u64,
    /// Where every deletion is recorded (JSON lines, never the data itself).
    pub audit_file: PathBuf,
    /// Pending deletion requests from events (case closed, session ended).
    pub requests_file: PathBuf,
    /// Legal holds in force.
    pub holds_file: PathBuf,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            rules_file: None,
            sweep_interval_secs: 300,
            audit_file: PathBuf::from("./audit/deletions.jsonl"),
            requests_file: PathBuf::from("./audit/deletion-requests.json"),
            holds_file: PathBuf::from("./audit/legal-holds.json"),
        }
    }
}

/// The Data Act query layer: principals, grants, the query audit log.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AccessConfig {
    /// Principals, tenures and grants (JSON, changed atomically).
    pub registry_file: PathBuf,
    /// The query audit log: one JSON-lines file per UTC day.
    pub audit_dir: PathBuf,
    /// Days a query audit file is kept.
    pub audit_retention_days: u32,
    /// Smallest number of distinct vehicles in a licensee's result group (k).
    pub min_group_vehicles: u32,
    /// Longest SQL statement a principal may send, in bytes.
    pub max_statement_bytes: usize,
    /// Memory one query may reserve (hash tables, sorts, joins, its answer), MiB.
    pub query_memory_mb: u32,
    /// Memory one user export (all of a user's rows, sorted) may reserve, MiB.
    pub export_memory_mb: u32,
    /// A query or export still running after this many milliseconds is cancelled.
    pub query_timeout_ms: u64,
    /// Queries and exports run at once; more wait for a turn within their timeout.
    pub max_concurrent_queries: u32,
    /// Requests one principal may have running at once (queries, exports,
    /// Flight SQL plans and listings); one more is refused at once.
    pub max_queries_per_principal: u32,
    /// Threads of the runtime `/sql` and `/export` run on, apart from ingest and `/metrics`.
    pub query_threads: u32,
    /// How often live access reads the tables' logs for new commits, ms.
    pub live_poll_ms: u64,
    /// Live streams (`GET /live`) open at once; one more is refused.
    pub max_live_streams: u32,
    /// Live streams one principal may have open at once; one more is refused.
    pub max_live_per_principal: u32,
    /// An open live stream that handed rows over writes a `delivered` audit
    /// line for them at most this often, ms (and one when it ends).
    pub live_audit_interval_ms: u64,
    /// The Ballista scheduler (`df://host:port`) that queries asking for
    /// `engine = "ballista"` run on; none: such queries are refused.
    pub ballista_scheduler: Option<String>,
}

impl Default for AccessConfig {
    fn default() -> Self {
        Self {
            registry_file: PathBuf::from("./access/registry.json"),
            audit_dir: PathBuf::from("./audit/queries"),
            audit_retention_days: 365,
            min_group_vehicles: 5,
            max_statement_bytes: 65_536,
            query_memory_mb: 256,
            export_memory_mb: 1_024,
            query_timeout_ms: 30_000,
            max_concurrent_queries: 4,
            max_queries_per_principal: 2,
            query_threads: 1,
            live_poll_ms: 250,
            max_live_streams: 256,
            max_live_per_principal: 4,
            live_audit_interval_ms: 60_000,
            ballista_scheduler: None,
        }
    }
}

/// The HTTP endpoint (metrics, the `/admin` routes, `/sql`, `/export`,
/// `/grants`) and the Flight SQL endpoint.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Where `GET /metrics` answers; port 0 picks a free port.
    pub http_addr: SocketAddr,
    /// Where Arrow Flight SQL (gRPC, plain HTTP/2) answers principals; port 0
    /// picks a free port.
    pub flight_sql_addr: SocketAddr,
    /// Seconds between throughput summary lines in the log; 0 = none.
    pub summary_interval_secs: u64,
    /// The token every `/admin` route requires (`Authorization: Bearer`),
    /// created on first start, mode 0600; outside the data directory.
    pub token_file: PathBuf,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            http_addr: SocketAddr::from(([127, 0, 0, 1], 9464)),
            flight_sql_addr: SocketAddr::from(([127, 0, 0, 1], 32010)),
            summary_interval_secs: 10,
            token_file: PathBuf::from("./keys/admin.token"),
        }
    }
}

/// Key rotation and trip pseudonyms.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrivacyConfig {
    /// Pseudonym keys rotate every this many days, by record time; 0 = never.
    pub key_epoch_days: u32,
    /// An RTTI trip id lasts at most this long, even within one ignition cycle.
    pub max_trip_minutes: u32,
}

impl Default for PrivacyConfig {
    fn default() -> Self {
        Self {
            key_epoch_days: 30,
            max_trip_minutes: 30,
        }
    }
}

/// The write-ahead log.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WalConfig {
    /// Directory of the log; `None` is `<data_dir>/_wal`.
    pub dir: Option<PathBuf>,
    pub fsync_interval_ms: u64,
    pub fsync_bytes: usize,
    pub segment_bytes: u64,
    /// A segment that holds entries is sealed at this age, so that it can be
    /// deleted once they are in Parquet, however little traffic there is.
    pub max_segment_age_ms: u64,
    pub skip_corrupt: bool,
}

impl Default for WalConfig {
    fn default() -> Self {
        Self {
            dir: None,
            fsync_interval_ms: 5,
            fsync_bytes: 1024 * 1024,
            segment_bytes: 64 * 1024 * 1024,
            max_segment_age_ms: 3_600_000,
            skip_corrupt: false,
        }
    }
}

/// The embedded MQTT broker.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerConfig {
    pub mqtt_addr: SocketAddr,
    pub mqtt5_addr: SocketAddr,
    pub max_packet_bytes: usize,
    pub max_connections: usize,
    pub connect_timeout_ms: u16,
    pub segment_bytes: usize,
    pub segment_count: usize,
    /// MQTT 3.1.1 over TLS with vehicle client certificates; off when unset.
    pub tls: Option<TlsListenerConfig>,
    /// Vehicle passwords required on the plain listeners; none when unset.
    pub credentials_file: Option<PathBuf>,
    /// The plain (unencrypted) listeners may bind a non-loopback address.
    pub plain_remote: bool,
    /// Publishes per second one connection may make; beyond, the broker holds
    /// it back until the next second. 0: no limit.
    pub max_publishes_per_second: u32,
    /// When a QoS 1 publish is acknowledged.
    pub acknowledge: Acknowledge,
    /// With `acknowledge = "durable"`, the most PUBACKs one connection may
    /// have waiting for durability before the broker holds it back.
    pub max_held_acks: usize,
}

/// When the broker sends a QoS 1 publish its PUBACK.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Acknowledge {
    /// Once the record is in an fsync'd write-ahead log: nothing
    /// acknowledged is lost in a crash. The WAL fsyncs as soon as there is
    /// anything to sync (group commit with no added wait).
    Durable,
    /// When the broker has the publish in memory (rumqttd's own behaviour):
    /// a crash loses what was acknowledged but not yet in the WAL. The WAL
    /// fsyncs by `wal.fsync_interval_ms` and `wal.fsync_bytes`. For
    /// comparison in benchmarks.
    Received,
}

/// The TLS listener: the server's certificate and key, and the CA whose
/// signature a vehicle's client certificate must carry. The certificate's
/// subject organisation (O) must be the vehicle's VIN.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsListenerConfig {
    pub addr: SocketAddr,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub client_ca_file: PathBuf,
}

/// Where and how data is stored.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    pub data_dir: PathBuf,
    pub key_file: PathBuf,
    pub vault_file: PathBuf,
    /// Directory of stream schemas replacing the built-in ones; `None` = built in.
    pub schema_dir: Option<PathBuf>,
    /// A table writer commits what it holds at `roll_rows` rows,
    /// `roll_bytes` bytes of held Arrow memory, `roll_age_ms` after the
    /// oldest held row arrived, or once it holds `max_open_files` hour
    /// partitions (one file each per commit).
    pub roll_rows: usize,
    pub roll_bytes: usize,
    pub roll_age_ms: u64,
    pub max_open_files: usize,
    /// Bytes of uncommitted rows all table writers together may hold.
    pub memory_budget_bytes: usize,
    pub zstd_level: i32,
    /// How long a file that a deletion (retention, erasure) or compaction
    /// removed from a table stays on disk for the queries already reading
    /// it, before VACUUM deletes it; at least `access.query_timeout_ms`.
    pub vacuum_grace_ms: i64,
    /// The target size each compaction commit records; a rewrite writes a
    /// closed hour partition's rows as one file.
    pub compact_target_bytes: u64,
    /// Where the tables live: `None` = under `data_dir` on local disk, or
    /// `s3://bucket/prefix` on an S3 object store (see `[storage.s3]`).
    /// The write-ahead log stays under `data_dir` either way.
    pub uri: Option<String>,
    pub s3: S3Config,
}

/// The S3 object store of `storage.uri = "s3://…"`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct S3Config {
    /// `None`: AWS's endpoint for the region; set for MinIO, Ceph, moto.
    pub endpoint: Option<String>,
    pub region: String,
    /// Credentials; `None` takes AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY
    /// from the environment (never from instance metadata).
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    /// Allow `http://` endpoints (a test server on loopback).
    pub allow_http: bool,
    /// Per request: time limit, and retries before an error reaches the writer.
    pub request_timeout_ms: u64,
    pub max_retries: usize,
}

impl Default for S3Config {
    fn default() -> Self {
        Self {
            endpoint: None,
            region: "us-east-1".to_owned(),
            access_key_id: None,
            secret_access_key: None,
            allow_http: false,
            request_timeout_ms: 30_000,
            max_retries: 3,
        }
    }
}

/// The decode/validate/pseudonymise stage.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    pub sink: SinkKind,
    pub workers: usize,
    pub queue_capacity: usize,
    pub max_payload_bytes: usize,
    pub max_records_per_publish: usize,
    pub dead_letter_payload_bytes: usize,
    pub max_clock_skew_ms: i64,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            mqtt_addr: SocketAddr::from(([127, 0, 0, 1], 1883)),
            mqtt5_addr: SocketAddr::from(([127, 0, 0, 1], 1884)),
            max_packet_bytes: 1024 * 1024,
            max_connections: 10_000,
            connect_timeout_ms: 5_000,
            segment_bytes: 8 * 1024 * 1024,
            segment_count: 4,
            tls: None,
            credentials_file: None,
            plain_remote: false,
            max_publishes_per_second: 0,
            acknowledge: Acknowledge::Durable,
            max_held_acks: 1024,
        }
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./data"),
            key_file: PathBuf::from("./keys/root.key"),
            vault_file: PathBuf::from("./keys/vault.redb"),
            schema_dir: None,
            roll_rows: 1_000_000,
            roll_bytes: 16 * 1024 * 1024,
            roll_age_ms: 1_000,
            max_open_files: 64,
            memory_budget_bytes: 256 * 1024 * 1024,
            zstd_level: 3,
            vacuum_grace_ms: 10 * 60 * 1000,
            compact_target_bytes: 128 * 1024 * 1024,
            uri: None,
            s3: S3Config::default(),
        }
    }
}

/// What happens to the publishes the broker delivers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SinkKind {
    /// Decode, validate, pseudonymise, log and store them.
    #[default]
    Store,
    /// Count and drop them unread: the broker's ceiling, for benchmarks.
    Discard,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            sink: SinkKind::Store,
            workers: 0,
            queue_capacity: 1024,
            max_payload_bytes: 256 * 1024,
            max_records_per_publish: 10_000,
            dead_letter_payload_bytes: 4096,
            max_clock_skew_ms: 24 * 3600 * 1000,
        }
    }
}

impl Config {
    /// Reads a TOML file; keys it leaves out keep their defaults.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        })
    }

    /// Parses TOML text; keys it leaves out keep their defaults.
    pub fn from_toml(text: &str) -> std::result::Result<Self, toml::de::Error> {
        toml::from_str(text)
    }

    /// Checks what serde cannot: ranges and relations between keys.
    pub fn validate(&self) -> Result<()> {
        let invalid = |msg: String| Err(ConfigError::Invalid(msg));
        let s = &self.storage;
        let p = &self.pipeline;
        let b = &self.broker;
        if s.roll_rows == 0 || s.roll_bytes == 0 || s.roll_age_ms == 0 {
            return invalid("storage.roll_rows, roll_bytes and roll_age_ms must be > 0".into());
        }
        if s.max_open_files == 0 {
            return invalid("storage.max_open_files must be > 0".into());
        }
        if !b.plain_remote
            && [b.mqtt_addr, b.mqtt5_addr]
                .iter()
                .any(|a| !a.ip().is_loopback())
        {
            return invalid(
                "broker.mqtt_addr and mqtt5_addr carry unencrypted MQTT: they bind loopback \
                 unless broker.plain_remote = true (remote vehicles belong on broker.tls)"
                    .into(),
            );
        }
        let a = &self.access;
        if a.min_group_vehicles < 2 {
            return invalid("access.min_group_vehicles must be at least 2".into());
        }
        if a.max_statement_bytes == 0
            || a.query_memory_mb == 0
            || a.export_memory_mb == 0
            || a.query_timeout_ms == 0
            || a.max_concurrent_queries == 0
            || a.max_queries_per_principal == 0
            || a.query_threads == 0
            || a.live_poll_ms == 0
            || a.max_live_per_principal == 0
            || a.live_audit_interval_ms == 0
        {
            return invalid(
                "access.max_statement_bytes, query_memory_mb, export_memory_mb, \
                 query_timeout_ms, max_concurrent_queries, max_queries_per_principal, \
                 query_threads, live_poll_ms, max_live_per_principal and \
                 live_audit_interval_ms must be > 0"
                    .into(),
            );
        }
        if s.vacuum_grace_ms < i64::try_from(a.query_timeout_ms).unwrap_or(i64::MAX) {
            return invalid(
                "storage.vacuum_grace_ms must be at least access.query_timeout_ms: a running \
                 query may still read the files a deletion removed"
                    .into(),
            );
        }
        if let Some(scheduler) = &a.ballista_scheduler {
            let url = url::Url::parse(scheduler).ok();
            let usable = url.as_ref().is_some_and(|u| {
                u.scheme() == "df" && u.host_str().is_some() && u.port().is_some()
            });
            if !usable {
                return invalid(format!(
                    "access.ballista_scheduler {scheduler:?} is not df://host:port"
                ));
            }
        }
        let c = &self.cluster;
        if !c.node_id.is_empty()
            && (c.node_id.len() > 64
                || !c
                    .node_id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
        {
            return invalid(format!(
                "cluster.node_id {:?} may hold only letters, digits, '-' and '_', at most 64",
                c.node_id
            ));
        }
        if !c.control_plane.is_empty() && c.node_id.is_empty() {
            return invalid(
                "cluster.control_plane is set but cluster.node_id is not: every node sharing \
                 the control plane needs a name of its own"
                    .into(),
            );
        }
        if c.lease_secs == 0 || c.lease_secs > 86_400 {
            return invalid("cluster.lease_secs must be between 1 and 86400 (a day)".into());
        }
        if s.compact_target_bytes == 0 {
            return invalid("storage.compact_target_bytes must be > 0".into());
        }
        if !(1..=22).contains(&s.zstd_level) {
            return invalid(format!(
                "storage.zstd_level {} is not in 1..=22",
                s.zstd_level
            ));
        }
        if p.queue_capacity == 0 || p.max_records_per_publish == 0 {
            return invalid(
                "pipeline.queue_capacity and max_records_per_publish must be > 0".into(),
            );
        }
        if p.max_clock_skew_ms < 0 {
            return invalid("pipeline.max_clock_skew_ms must be >= 0".into());
        }
        if b.max_packet_bytes <= p.max_payload_bytes {
            return invalid(format!(
                "broker.max_packet_bytes ({}) must exceed pipeline.max_payload_bytes ({}), \
                 or oversize payloads close the connection instead of being dead-lettered",
                b.max_packet_bytes, p.max_payload_bytes
            ));
        }
        if self.wal.fsync_interval_ms == 0
            || self.wal.segment_bytes == 0
            || self.wal.max_segment_age_ms == 0
        {
            return invalid(
                "wal.fsync_interval_ms, wal.segment_bytes and wal.max_segment_age_ms must be > 0"
                    .into(),
            );
        }
        if b.segment_bytes == 0 || b.segment_count == 0 {
            return invalid("broker.segment_bytes and segment_count must be > 0".into());
        }
        // Keys, the admin token, the vehicles' password hashes and the
        // registry (the account link: VINs in clear) never travel with the data.
        let mut private = vec![
            ("storage.key_file", &s.key_file),
            ("storage.vault_file", &s.vault_file),
            ("admin.token_file", &self.admin.token_file),
            ("access.registry_file", &self.access.registry_file),
        ];
        if let Some(credentials) = &b.credentials_file {
            private.push(("broker.credentials_file", credentials));
        }
        for (key, path) in private {
            if inside(path, &s.data_dir) {
                return invalid(format!(
                    "{key} {} lies inside storage.data_dir {}: keep keys, credentials and \
                     VINs apart from the data",
                    path.display(),
                    s.data_dir.display()
                ));
            }
        }
        if self.privacy.max_trip_minutes == 0 {
            return invalid("privacy.max_trip_minutes must be > 0".into());
        }
        Ok(())
    }

    /// The defaults, made to run beside any other instance: every listener
    /// on a port the OS picks (port 0, loopback), data, keys, admin token,
    /// audit and registry under `dir`. Tests, benchmarks and embedders start from this.
    pub fn isolated(dir: &Path) -> Self {
        let mut config = Config::default();
        let any_port = SocketAddr::from(([127, 0, 0, 1], 0));
        config.broker.mqtt_addr = any_port;
        config.broker.mqtt5_addr = any_port;
        config.admin.http_addr = any_port;
        config.admin.flight_sql_addr = any_port;
        config.admin.token_file = dir.join("keys/admin.token");
        config.storage.data_dir = dir.join("data");
        config.storage.key_file = dir.join("keys/root.key");
        config.storage.vault_file = dir.join("keys/vault.redb");
        config.retention.audit_file = dir.join("audit/deletions.jsonl");
        config.retention.requests_file = dir.join("audit/deletion-requests.json");
        config.retention.holds_file = dir.join("audit/legal-holds.json");
        config.access.registry_file = dir.join("access/registry.json");
        config.access.audit_dir = dir.join("audit/queries");
        config
    }

    /// Directory of the write-ahead log.
    pub fn wal_dir(&self) -> PathBuf {
        self.wal
            .dir
            .clone()
            .unwrap_or_else(|| self.storage.data_dir.join("_wal"))
    }

    /// Number of worker threads, resolving 0 to the number of cores.
    pub fn worker_count(&self) -> usize {
        match self.pipeline.workers {
            0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
            n => n,
        }
    }
}

/// Compares lexically after making both absolute, so `./data/../keys` is not
/// mistaken for a path inside `./data`.
fn inside(key_file: &Path, data_dir: &Path) -> bool {
    let absolute = |p: &Path| -> PathBuf {
        let joined = if p.is_absolute() {
            p.to_owned()
        } else {
            std::env::current_dir().unwrap_or_default().join(p)
        };
        let mut out = PathBuf::new();
        for part in joined.components() {
            match part {
                std::path::Component::ParentDir => {
                    out.pop();
                }
                std::path::Component::CurDir => {}
                other => out.push(other),
            }
        }
        out
    };
    absolute(key_file).starts_with(absolute(data_dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_file_is_exactly_the_defaults() {
        let shipped = include_str!("../fleetgate.toml");
        let parsed = Config::from_toml(shipped).expect("shipped config parses");
        assert_eq!(parsed, Config::default());
        parsed.validate().expect("defaults are valid");
    }

    #[test]
    fn unknown_key_is_an_error_naming_it() {
        let err = Config::from_toml("[storage]\nroll_rowz = 5\n").expect_err("must fail");
        assert!(err.to_string().contains("roll_rowz"), "{err}");
    }

    #[test]
    fn partial_file_keeps_other_defaults() {
        let cfg = Config::from_toml("[storage]\nroll_rows = 5\n").expect("parses");
        assert_eq!(cfg.storage.roll_rows, 5);
        assert_eq!(cfg.broker, BrokerConfig::default());
    }

    #[test]
    fn a_ballista_scheduler_is_a_df_url_with_host_and_port() {
        let with = |scheduler: &str| {
            let mut cfg = Config::default();
            cfg.access.ballista_scheduler = Some(scheduler.to_owned());
            cfg.validate()
        };
        assert!(with("df://10.0.0.9:50050").is_ok());
        for wrong in [
            "http://10.0.0.9:50050",
            "df://10.0.0.9",
            "10.0.0.9:50050",
            "df://",
        ] {
            let error = with(wrong).expect_err(wrong).to_string();
            assert!(error.contains("df://host:port"), "{wrong}: {error}");
        }
    }

    #[test]
    fn key_inside_data_dir_is_refused() {
        let mut cfg = Config::default();
        cfg.storage.key_file = PathBuf::from("./data/keys/k");
        assert!(cfg.validate().is_err());
        cfg.storage.key_file = PathBuf::from("./data/../keys/k");
        assert!(cfg.validate().is_ok());
    }

    #[test]
    fn key_files_inside_the_data_dir_are_refused() {
        let refused = |cfg: Config, key: &str| {
            let err = cfg.validate().expect_err(key);
            assert!(err.to_string().contains(key), "{err}");
        };
        let mut cfg = Config::default();
        cfg.storage.vault_file = PathBuf::from("./data/vault.redb");
        refused(cfg, "storage.vault_file");
        let mut cfg = Config::default();
        cfg.admin.token_file = PathBuf::from("./data/admin.token");
        refused(cfg, "admin.token_file");
    }

    /// The access registry holds VINs in clear and the credential store a
    /// password hash per vehicle: neither travels with the data.
    #[test]
    fn files_holding_vins_or_credentials_inside_the_data_dir_are_refused() {
        let refused = |cfg: Config, key: &str| {
            let err = cfg.validate().expect_err(key);
            assert!(err.to_string().contains(key), "{err}");
        };
        let mut cfg = Config::default();
        cfg.access.registry_file = PathBuf::from("./data/access/registry.json");
        refused(cfg, "access.registry_file");
        let mut cfg = Config::default();
        cfg.broker.credentials_file = Some(PathBuf::from("./data/credentials.json"));
        refused(cfg, "broker.credentials_file");
        let mut cfg = Config::default();
        cfg.broker.credentials_file = Some(PathBuf::from("./keys/credentials.json"));
        cfg.validate().expect("beside the keys");
    }

    #[test]
    fn packet_limit_must_exceed_payload_limit() {
        let mut cfg = Config::default();
        cfg.broker.max_packet_bytes = cfg.pipeline.max_payload_bytes;
        assert!(cfg.validate().is_err());
    }
}
