//! The `fleetgate` command: `serve` runs the server, `sql` queries the store.
//! Wiring only; every capability lives in the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use fleetgate::access::export::ExportFormat;
use fleetgate::access::registry::{self, PrincipalKind, Role};
use fleetgate::access::{AccessEnv, Engine};
use fleetgate::config::{Config, SinkKind};
use fleetgate::lifecycle::events::{self, ConsentKind, EventRequest, VehicleEvent};
use fleetgate::ops::ballista;
use fleetgate::privacy::stage::PrivacyShared;
use fleetgate::query::{self, OutputFormat};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "fleetgate",
    version,
    about = "Connected-car telemetry: MQTT in, lawful SQL out"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the broker and the pipeline until SIGINT or SIGTERM.
    Serve {
        #[command(flatten)]
        common: CommonArgs,
        /// Where MQTT 3.1.1 clients connect (port 0 picks a free port).
        #[arg(long)]
        mqtt_addr: Option<SocketAddr>,
        /// Where MQTT 5 clients connect (port 0 picks a free port).
        #[arg(long)]
        mqtt5_addr: Option<SocketAddr>,
        /// Where GET /metrics answers (port 0 picks a free port).
        #[arg(long)]
        admin_addr: Option<SocketAddr>,
        /// Where Arrow Flight SQL answers (port 0 picks a free port).
        #[arg(long)]
        flight_sql_addr: Option<SocketAddr>,
        /// What to do with publishes; `discard` measures the broker's ceiling
        /// and stores nothing (overrides pipeline.sink).
        #[arg(long, value_enum)]
        sink: Option<SinkKind>,
        /// This node's name in a cluster (overrides cluster.node_id).
        #[arg(long)]
        node_id: Option<String>,
    },
    /// Run one SQL statement over the store as a principal, for a purpose,
    /// under the Data Act policy, and print the result.
    Sql {
        #[command(flatten)]
        common: CommonArgs,
        /// Output format.
        #[arg(long, value_enum, default_value = "table")]
        format: OutputFormat,
        /// The principal the query runs as (see `fleetgate access`).
        #[arg(long = "as", default_value = registry::OPERATOR)]
        principal: String,
        /// The purpose of the query (schemas/purposes.toml).
        #[arg(long, default_value = "operations")]
        purpose: String,
        /// Where it runs: here, or on the Ballista cluster whose scheduler
        /// access.ballista_scheduler (or --scheduler) names.
        #[arg(long, value_enum, default_value = "local")]
        engine: EngineArg,
        /// The Ballista scheduler, df://host:port (overrides access.ballista_scheduler).
        #[arg(long)]
        scheduler: Option<String>,
        /// The SQL statement, e.g. "SELECT count(*) FROM rtti".
        statement: String,
    },
    /// Run a Ballista scheduler or executor for distributed queries
    /// (`engine = ballista`), until SIGINT or SIGTERM.
    Ballista {
        #[command(subcommand)]
        role: BallistaRole,
    },
    /// Write all of a user's data (Data Act Art. 4) with a metadata file.
    Export {
        #[command(flatten)]
        common: CommonArgs,
        /// The user (principal id).
        #[arg(long)]
        user: String,
        /// Directory to write into.
        #[arg(long)]
        out: PathBuf,
        #[arg(long, value_enum, default_value = "parquet")]
        format: ExportFormat,
    },
    /// Principals, vehicle transfers and grants, while the server is
    /// stopped (on a running server: the /admin HTTP routes).
    Access {
        #[command(flatten)]
        common: CommonArgs,
        #[command(subcommand)]
        action: AccessAction,
    },
    /// Vehicle passwords for the plain MQTT listeners (`broker.credentials_file`);
    /// works while the server runs, which picks changes up at the next CONNECT.
    Vehicle {
        #[command(flatten)]
        common: CommonArgs,
        #[command(subcommand)]
        action: VehicleAction,
    },
    /// Print every stream's fields (type, unit, privacy class, storage) as Markdown.
    Schema {
        #[command(flatten)]
        common: CommonArgs,
    },
    /// Privacy administration on the vault, while the server is stopped.
    Admin {
        #[command(flatten)]
        common: CommonArgs,
        #[command(subcommand)]
        action: AdminAction,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum EngineArg {
    Local,
    Ballista,
}

#[derive(Subcommand)]
enum BallistaRole {
    /// Plans queries into stages and hands their tasks to executors.
    Scheduler {
        /// Where it listens (gRPC); port 0 picks a free port.
        #[arg(long, default_value = "127.0.0.1:50050")]
        bind: SocketAddr,
    },
    /// Runs tasks, reading the store the configuration names.
    Executor {
        #[command(flatten)]
        common: CommonArgs,
        #[command(flatten)]
        settings: ballista::ExecutorSettings,
    },
}

#[derive(Subcommand)]
enum AdminAction {
    /// Apply a vehicle event (sale, account deletion, erasure request, SIM,
    /// consent) to the vault and audit it, as `POST /admin/events` does on a
    /// running server.
    Event {
        #[arg(long)]
        vin: String,
        #[arg(long, value_enum)]
        event: VehicleEvent,
        /// The consent a consent_given or consent_withdrawn event changes.
        #[arg(long, value_enum)]
        consent: Option<ConsentKind>,
        /// The case, charging session, analysis or legal hold the event names.
        #[arg(long)]
        id: Option<String>,
        /// The case a legal hold is limited to.
        #[arg(long)]
        case_id: Option<String>,
    },
    /// Show a vehicle's consent and SIM state.
    Consent {
        #[arg(long)]
        vin: String,
    },
    /// Delete every hour partition whose rows have all expired under the
    /// retention rules, and record each deletion in the audit file.
    Retention {
        /// Only list what would be deleted and why; delete nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Compact the closed hour partitions now (the server's sweep does so
    /// every sweep interval): their small files become few large ones.
    Compact {
        /// Also the partitions still open (the current hour): for a
        /// benchmark or a stopped server.
        #[arg(long)]
        all: bool,
    },
    /// Turn the table directories of an older version (Parquet files in
    /// date=/hour= directories, no Delta log) into Delta tables, in place.
    Convert,
}

#[derive(Subcommand)]
enum VehicleAction {
    /// Issue the vehicle a new password (printed once; replaces any earlier one).
    Credential {
        #[arg(long)]
        vin: String,
    },
    /// Revoke the vehicle's password: its next CONNECT is refused.
    Revoke {
        #[arg(long)]
        vin: String,
    },
}

#[derive(Subcommand)]
enum AccessAction {
    /// Add a principal and print its bearer token (shown only once).
    Principal {
        id: String,
        #[arg(long, value_enum)]
        kind: PrincipalKind,
        /// Third parties: what they do, which bounds what they can be granted.
        #[arg(long, value_enum)]
        role: Option<Role>,
        /// Third parties: established in the EEA.
        #[arg(long)]
        eea: bool,
        /// Third parties: a gatekeeper (Art. 5(3)), which can receive no grant.
        #[arg(long)]
        gatekeeper: bool,
    },
    /// A user holds a vehicle from `--at` (default now, unless another user
    /// holds it: then `--at` is needed); its previous holder's tenure ends then.
    Transfer {
        #[arg(long)]
        user: String,
        #[arg(long)]
        vin: String,
        /// RFC 3339 time or milliseconds since the epoch.
        #[arg(long, value_parser = parse_time)]
        at: Option<i64>,
    },
    /// A user grants a third party streams of one vehicle for one purpose.
    Grant {
        #[arg(long)]
        user: String,
        #[arg(long)]
        to: String,
        #[arg(long)]
        vin: String,
        /// Comma-separated streams, e.g. teleservice,diagnostics.
        #[arg(long, value_delimiter = ',')]
        streams: Vec<String>,
        #[arg(long)]
        purpose: String,
        /// Start of the granted period (default now).
        #[arg(long, value_parser = parse_time)]
        from: Option<i64>,
        /// End of the granted period (default open).
        #[arg(long, value_parser = parse_time)]
        until: Option<i64>,
    },
    /// Revoke a grant: it stops at the recipient's next query.
    Revoke { grant: String },
    /// Print the registry (token hashes left out).
    List,
}

/// RFC 3339 or integer milliseconds since the epoch.
fn parse_time(text: &str) -> Result<i64, String> {
    text.parse::<i64>().or_else(|_| {
        chrono::DateTime::parse_from_rfc3339(text)
            .map(|t| t.timestamp_millis())
            .map_err(|e| format!("{text:?}: neither milliseconds nor RFC 3339 ({e})"))
    })
}

#[derive(clap::Args)]
struct CommonArgs {
    /// Configuration file (see fleetgate.toml); defaults apply without one.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Data directory, overriding storage.data_dir.
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

impl CommonArgs {
    fn load(&self) -> anyhow::Result<Config> {
        let mut config = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        if let Some(dir) = &self.data_dir {
            config.storage.data_dir = dir.clone();
        }
        Ok(config)
    }
}

/// mimalloc: per-thread free lists, where glibc's malloc and free took
/// 14 % of the server's CPU under load (perf, flat-out ingest).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// What is logged unless RUST_LOG says otherwise. Ballista's scheduler and
/// executors log every plan they run, with its literals, at info.
const DEFAULT_LOG_FILTER: &str = "info,rumqttd=warn,buoyant_kernel=warn,deltalake_core=warn,\
     ballista_scheduler=warn,ballista_executor=warn,ballista_core=warn";

fn main() -> anyhow::Result<()> {
    fleetgate::core::fsio::restrict_new_files();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG_FILTER)),
        )
        .with_writer(|| fleetgate::privacy::log::Redacting(std::io::stderr()))
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    match cli.command {
        Command::Serve {
            common,
            mqtt_addr,
            mqtt5_addr,
            admin_addr,
            flight_sql_addr,
            sink,
            node_id,
        } => {
            let mut config = common.load()?;
            if let Some(addr) = mqtt_addr {
                config.broker.mqtt_addr = addr;
            }
            if let Some(addr) = mqtt5_addr {
                config.broker.mqtt5_addr = addr;
            }
            if let Some(addr) = admin_addr {
                config.admin.http_addr = addr;
            }
            if let Some(addr) = flight_sql_addr {
                config.admin.flight_sql_addr = addr;
            }
            if let Some(sink) = sink {
                config.pipeline.sink = sink;
            }
            if let Some(node_id) = node_id {
                config.cluster.node_id = node_id;
            }
            let signals = ShutdownSignals::listen(&runtime)?;
            let server = fleetgate::ops::server::start(&config)?;
            let tls = server
                .tls_addr()
                .map(|a| format!(", mqtts://{a} (client certificates)"))
                .unwrap_or_default();
            println!(
                "fleetgate listening on mqtt://{} (MQTT 5: {}){tls}, metrics on http://{}/metrics, Flight SQL on grpc://{}, data in {}, admin token in {}",
                server.mqtt_addr(),
                server.mqtt5_addr(),
                server.admin_addr(),
                server.flight_sql_addr(),
                server.data_dir().display(),
                config.admin.token_file.display()
            );
            runtime.block_on(signals.recv());
            tracing::info!("shutting down: storing everything received");
            server.shutdown()?;
            Ok(())
        }
        Command::Sql {
            common,
            format,
            principal,
            purpose,
            engine,
            scheduler,
            statement,
        } => {
            let mut config = common.load()?;
            stored_somewhere(&config)?;
            if scheduler.is_some() {
                config.access.ballista_scheduler = scheduler;
            }
            let engine = match engine {
                EngineArg::Local => Engine::Local,
                EngineArg::Ballista => Engine::Ballista,
            };
            let env = AccessEnv::new(&config, None)?;
            let as_principal = env.principal(&principal)?;
            let needs_vault = as_principal.kind != PrincipalKind::Operator
                || env
                    .purposes
                    .check(&purpose, as_principal.kind)
                    .is_ok_and(|p| !p.reveals.is_empty());
            let env = if needs_vault {
                AccessEnv::new(&config, Some(open_privacy(&config)?))?
            } else {
                env
            };
            let text = runtime.block_on(async {
                let answer = env
                    .query_on(
                        engine,
                        &as_principal,
                        &purpose,
                        &statement,
                        fleetgate::core::clock::now_ms(),
                    )
                    .await?;
                anyhow::Ok(query::format(&answer.batches, format)?)
            })?;
            // CSV and NDJSON end in a newline already: one more would read
            // as an empty record.
            match text.ends_with('\n') {
                true => print!("{text}"),
                false => println!("{text}"),
            }
            Ok(())
        }
        Command::Ballista { role } => {
            match role {
                BallistaRole::Scheduler { bind } => {
                    let signals = ShutdownSignals::listen(&runtime)?;
                    let run = ballista::run_scheduler(bind, |addr| {
                        println!("ballista scheduler listening on df://{addr}")
                    });
                    runtime.block_on(async {
                        tokio::select! {
                            outcome = run => outcome.map_err(anyhow::Error::from),
                            () = signals.recv() => Ok(()),
                        }
                    })
                }
                // The executor stops on SIGINT or SIGTERM itself: it tells
                // the scheduler and deletes its shuffle files first.
                BallistaRole::Executor { common, settings } => {
                    let config = common.load()?;
                    Ok(runtime.block_on(ballista::run_executor(&config, settings))?)
                }
            }
        }
        Command::Export {
            common,
            user,
            out,
            format,
        } => {
            let config = common.load()?;
            stored_somewhere(&config)?;
            let env = AccessEnv::new(&config, Some(open_privacy(&config)?))?;
            let user = env.principal(&user)?;
            let export = runtime.block_on(env.export(&user, fleetgate::core::clock::now_ms()))?;
            for path in export.write_dir(&out, format)? {
                println!("{}", path.display());
            }
            Ok(())
        }
        Command::Access { common, action } => access(&common.load()?, action),
        Command::Vehicle { common, action } => {
            let config = common.load()?;
            let path = config
                .broker
                .credentials_file
                .clone()
                .context("broker.credentials_file is not set in the configuration")?;
            let plane = fleetgate::control::ControlPlane::from_config(&config)?;
            let store = fleetgate::control::documents::Document::at(
                plane.as_ref(),
                fleetgate::ingest::auth::CREDENTIALS,
                path,
            );
            let keys =
                fleetgate::privacy::pseudo::KeyRing::load_or_create(&config.storage.key_file)?;
            let tag_key = keys.redaction_key();
            match action {
                VehicleAction::Credential { vin } => {
                    let now = fleetgate::core::clock::now_ms();
                    println!(
                        "{}",
                        fleetgate::ingest::auth::issue(&store, &tag_key, &vin, now)?
                    );
                }
                VehicleAction::Revoke { vin } => {
                    let revoked = fleetgate::ingest::auth::revoke(&store, &tag_key, &vin)?;
                    println!(
                        "{}",
                        if revoked {
                            "revoked"
                        } else {
                            "no password held"
                        }
                    );
                }
            }
            Ok(())
        }
        Command::Schema { common } => {
            let config = common.load()?;
            let registry =
                fleetgate::schema::Registry::load_from(config.storage.schema_dir.as_deref())?;
            print!("{}", registry.markdown());
            Ok(())
        }
        Command::Admin { common, action } => admin(&common.load()?, action),
    }
}

/// Fails when the store is a local directory that is not there: most often
/// a mistyped path, whose tables would otherwise read as empty.
fn stored_somewhere(config: &Config) -> anyhow::Result<()> {
    let root = fleetgate::store::StoreRoot::from_config(&config.storage)?;
    if let Some(dir) = root.local_dir()
        && !dir.is_dir()
    {
        anyhow::bail!(
            "no data directory at {}: nothing was stored there (storage.data_dir, or --data-dir)",
            dir.display()
        );
    }
    Ok(())
}

/// The vault and keys, which only one process may hold open.
fn open_privacy(config: &Config) -> anyhow::Result<Arc<PrivacyShared>> {
    PrivacyShared::open(config).context(
        "cannot open the vault (is the server running? it holds the vault open; use its HTTP routes)",
    )
}

fn access(config: &Config, action: AccessAction) -> anyhow::Result<()> {
    let now = fleetgate::core::clock::now_ms();
    // Changes audit the VIN's keyed tag, so they open the vault; listing does not.
    let env = || -> anyhow::Result<AccessEnv> {
        Ok(AccessEnv::new(config, Some(open_privacy(config)?))?)
    };
    match action {
        AccessAction::List => {
            let mut registry = AccessEnv::new(config, None)?.registry()?;
            for p in &mut registry.principals {
                p.token_sha256.clear();
            }
            println!("{}", serde_json::to_string_pretty(&registry)?);
        }
        AccessAction::Principal {
            id,
            kind,
            role,
            eea,
            gatekeeper,
        } => println!(
            "{}",
            env()?.add_principal(&id, kind, role, eea, gatekeeper, now)?
        ),
        AccessAction::Transfer { user, vin, at } => {
            let at = env()?.transfer_from(&user, &vin, at, now)?;
            println!("{user} holds the vehicle from {at}");
        }
        AccessAction::Grant {
            user,
            to,
            vin,
            streams,
            purpose,
            from,
            until,
        } => {
            let request = registry::GrantRequest {
                user,
                recipient: to,
                vin,
                streams,
                purpose,
                from_ms: from,
                until_ms: until,
            };
            println!("{}", env()?.give_grant(request, now)?);
        }
        AccessAction::Revoke { grant } => {
            let revoked = env()?.revoke_grant(&grant, None, now)?;
            println!(
                "{grant}: {}",
                if revoked {
                    "revoked"
                } else {
                    "already revoked"
                }
            );
        }
    }
    Ok(())
}

fn admin(config: &Config, action: AdminAction) -> anyhow::Result<()> {
    let (vin, event) = match action {
        AdminAction::Retention { dry_run } => return retention(config, dry_run),
        AdminAction::Convert => return convert(config),
        AdminAction::Compact { all } => return compact(config, all),
        AdminAction::Consent { vin } => (vin, None),
        AdminAction::Event {
            vin,
            event,
            consent,
            id,
            case_id,
        } => (
            vin.clone(),
            Some(EventRequest {
                event,
                vin,
                consent,
                id,
                case_id,
            }),
        ),
    };
    let privacy = open_privacy(config)?;
    match event {
        Some(request) => {
            let now = fleetgate::core::clock::now_ms();
            // Tenures and grants end first: a legal hold may refuse the
            // erasure, never the end of the old holder's access.
            if let Some(ending) = fleetgate::access::registry::Ending::of(request.event)
                && fleetgate::privacy::pseudo::is_vin(&request.vin)
            {
                AccessEnv::new(config, Some(privacy.clone()))?.end_holding(
                    &request.vin,
                    ending,
                    now,
                )?;
            }
            let state = fleetgate::lifecycle::requests::LifecycleState::open(config)?;
            let effect = events::apply(&privacy, &state, &request, now)?;
            println!("{}: {effect}", request.event.name());
        }
        None => println!("{:?}", privacy.vault.consent(&vin)?),
    }
    Ok(())
}

/// `admin compact`: one compaction now, timed.
fn compact(config: &Config, all: bool) -> anyhow::Result<()> {
    let root = fleetgate::store::StoreRoot::from_config(&config.storage)?;
    let now_ms = fleetgate::core::clock::now_ms();
    // Two hours on, every partition up to the current one counts as closed.
    let as_of = if all { now_ms + 2 * 3_600_000 } else { now_ms };
    let settings = fleetgate::store::Compaction::from_config(&config.storage);
    let started = std::time::Instant::now();
    let replaced = fleetgate::store::compact(&root, as_of, settings)?;
    println!(
        "compacted: {replaced} small files replaced in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `admin convert`: every table directory of an older version becomes a
/// Delta table over the same files; refused while the write-ahead log
/// holds entries (the older version recovers them, on a clean stop).
fn convert(config: &Config) -> anyhow::Result<()> {
    let pending = fleetgate::wal::inspect(&config.wal_dir())?.entry_count();
    if pending > 0 {
        anyhow::bail!(
            "the write-ahead log holds {pending} entries the older version has not stored: \
             start and stop it once (a clean stop stores them), then convert"
        );
    }
    let root = fleetgate::store::StoreRoot::local(&config.storage.data_dir)?;
    for (table, files) in fleetgate::store::delta::convert_all(&root)? {
        println!("{table}: a Delta table over its {files} files");
    }
    // The older version's record of swept files' WAL entries: the tables'
    // transactions take its place.
    let settled = config.storage.data_dir.join("_wal_settled.json");
    if settled.exists() {
        std::fs::remove_file(&settled)?;
    }
    Ok(())
}

/// `admin retention`: one sweep now, printed; with `dry_run`, nothing deleted or audited.
fn retention(config: &Config, dry_run: bool) -> anyhow::Result<()> {
    use fleetgate::lifecycle::retention::{self, Retention};
    let registry = fleetgate::schema::Registry::load_from(config.storage.schema_dir.as_deref())?;
    let state = fleetgate::lifecycle::requests::LifecycleState::open(config)?;
    let rules = Retention::current(config.retention.rules_file.as_deref(), &state, &registry)?;
    let root = fleetgate::store::StoreRoot::from_config(&config.storage)?;
    // Requests stay active while rows older than them wait to be stored:
    // in this node's write-ahead log (a stopped or crashed server's, which
    // its next start stores), and in a cluster in nodes' WAL copies (as in
    // the server's sweep).
    let wal_holds_rows = fleetgate::wal::holds_entries(&config.wal_dir())?;
    let unstored_since_ms = if wal_holds_rows {
        Some(i64::MIN)
    } else if !config.cluster.control_plane.is_empty() && config.cluster.copy_wal {
        let copies = fleetgate::wal::copies::Copies::new(root.wal_copies()?, "");
        Some(copies.oldest_ms()?.unwrap_or(i64::MAX))
    } else {
        None
    };
    let run = retention::SweepRun {
        now_ms: fleetgate::core::clock::now_ms(),
        max_clock_skew_ms: config.pipeline.max_clock_skew_ms,
        vacuum_grace_ms: config.storage.vacuum_grace_ms,
        dry_run,
        unstored_since_ms,
    };
    let deletions = retention::sweep_and_record(&root, &rules, &state, run)?;
    let verb = if dry_run { "would delete" } else { "deleted" };
    for d in &deletions {
        println!(
            "{verb} {}/{} ({}): {} rows, expired under {}",
            d.table,
            d.partition,
            d.action,
            d.rows,
            d.rules.join(", ")
        );
    }
    let outcome = if dry_run {
        "would be deleted"
    } else {
        "deleted"
    };
    let rows: u64 = deletions.iter().map(|d| d.rows).sum();
    println!("{outcome}: {rows} rows ({} deletions)", deletions.len());
    Ok(())
}

/// SIGINT and SIGTERM, listened for from the moment this returns: before
/// the server announces itself, so a signal right after the announcement
/// still gets a clean shutdown instead of the default kill.
struct ShutdownSignals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

impl ShutdownSignals {
    fn listen(runtime: &tokio::runtime::Runtime) -> anyhow::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        let _context = runtime.enter();
        Ok(Self {
            interrupt: signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?,
            terminate: signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?,
        })
    }

    async fn recv(mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
    }
}
