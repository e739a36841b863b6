//! The `fleetgate` command: `serve` runs the server, `sql` queries the store.
//! Wiring only; every capability lives in the library.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use fleetgate::config::{Config, SinkKind};
use fleetgate::events::{self, ConsentKind, EventRequest, VehicleEvent};
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
        /// What to do with publishes; `discard` measures the broker's ceiling
        /// and stores nothing (overrides pipeline.sink).
        #[arg(long, value_enum)]
        sink: Option<SinkKind>,
    },
    /// Run one SQL statement over the store and print the result.
    Sql {
        #[command(flatten)]
        common: CommonArgs,
        /// Output format.
        #[arg(long, value_enum, default_value = "table")]
        format: OutputFormat,
        /// The SQL statement, e.g. "SELECT count(*) FROM rtti".
        statement: String,
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

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| EnvFilter::new("info,rumqttd=warn")),
        )
        .with_writer(std::io::stderr)
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
            sink,
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
            if let Some(sink) = sink {
                config.pipeline.sink = sink;
            }
            let signals = ShutdownSignals::listen(&runtime)?;
            let server = fleetgate::server::start(&config)?;
            println!(
                "fleetgate listening on mqtt://{} (MQTT 5: {}), metrics on http://{}/metrics, data in {}",
                server.mqtt_addr(),
                server.mqtt5_addr(),
                server.admin_addr(),
                server.data_dir().display()
            );
            runtime.block_on(signals.recv());
            tracing::info!("shutting down: storing everything received");
            server.shutdown()?;
            Ok(())
        }
        Command::Sql {
            common,
            format,
            statement,
        } => {
            let config = common.load()?;
            let registry =
                fleetgate::schema::Registry::load_from(config.storage.schema_dir.as_deref())?;
            let retention = fleetgate::retention::Retention::current(&config.retention, &registry)?;
            let text = runtime.block_on(async {
                let ctx = query::session_at(
                    &config.storage.data_dir,
                    &registry,
                    &retention,
                    fleetgate::ingest::now_ms(),
                )
                .await?;
                let batches = query::run(&ctx, &statement).await?;
                query::format(&batches, format)
            })?;
            println!("{text}");
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

fn admin(config: &Config, action: AdminAction) -> anyhow::Result<()> {
    use fleetgate::privacy::{PrivacySettings, PrivacyShared};
    use fleetgate::pseudo::KeyRing;
    use fleetgate::vault::Vault;
    let (vin, event) = match action {
        AdminAction::Retention { dry_run } => return retention(config, dry_run),
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
    let keys = KeyRing::load_or_create(&config.storage.key_file)?;
    let vault = Vault::open(&config.storage.vault_file, &keys).context(
        "cannot open the vault (is the server running? it holds the vault open; use POST /admin/events)",
    )?;
    let privacy = PrivacyShared::new(
        keys,
        vault,
        PrivacySettings {
            key_epoch_days: config.privacy.key_epoch_days,
            max_trip: std::time::Duration::from_secs(
                u64::from(config.privacy.max_trip_minutes) * 60,
            ),
        },
    );
    match event {
        Some(request) => {
            let effect = events::apply(
                &privacy,
                &config.retention,
                &request,
                fleetgate::ingest::now_ms(),
            )?;
            println!("{}: {effect}", request.event.name());
        }
        None => println!("{:?}", privacy.vault.consent(&vin)?),
    }
    Ok(())
}

/// `admin retention`: one sweep now, printed; with `dry_run`, nothing deleted or audited.
fn retention(config: &Config, dry_run: bool) -> anyhow::Result<()> {
    use fleetgate::retention::{self, Retention};
    let registry = fleetgate::schema::Registry::load_from(config.storage.schema_dir.as_deref())?;
    let rules = Retention::current(&config.retention, &registry)?;
    let run = retention::SweepRun {
        now_ms: fleetgate::ingest::now_ms(),
        since_ms: None,
        zstd_level: config.storage.zstd_level,
        dry_run,
    };
    let deletions =
        retention::sweep_and_record(&config.storage.data_dir, &rules, &config.retention, run)?;
    let verb = if dry_run { "would delete" } else { "deleted" };
    for d in &deletions {
        println!(
            "{verb} {}/{} ({}): {} rows in {} files, expired under {}",
            d.table,
            d.partition,
            d.action,
            d.rows,
            d.files,
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
