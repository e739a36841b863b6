//! The `fleetgate` command: `serve` runs the server, `sql` queries the store.
//! Wiring only; every capability lives in the library.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use fleetgate::config::{Config, SinkKind};
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
    /// Crypto-shred a vehicle: delete its secrets, so its stored rows can no
    /// longer be linked to its VIN nor its encrypted fields read.
    Erase {
        #[arg(long)]
        vin: String,
    },
    /// Show or set a vehicle's consent and SIM state.
    Consent {
        #[arg(long)]
        vin: String,
        #[arg(long)]
        smart_maintenance: Option<bool>,
        #[arg(long)]
        product_quality: Option<bool>,
        #[arg(long)]
        sim_active: Option<bool>,
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
            let server = fleetgate::server::start(&config)?;
            println!(
                "fleetgate listening on mqtt://{} (MQTT 5: {}), metrics on http://{}/metrics, data in {}",
                server.mqtt_addr(),
                server.mqtt5_addr(),
                server.admin_addr(),
                server.data_dir().display()
            );
            runtime.block_on(shutdown_signal())?;
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
            let retention = fleetgate::retention::Retention::load(
                config.retention.rules_file.as_deref(),
                &registry,
            )?;
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
    use fleetgate::pseudo::KeyRing;
    use fleetgate::vault::Vault;
    if let AdminAction::Retention { dry_run } = action {
        return retention(config, dry_run);
    }
    let keys = KeyRing::load_or_create(&config.storage.key_file)?;
    let vault = Vault::open(&config.storage.vault_file, &keys)
        .context("cannot open the vault (is the server running? it holds the vault open)")?;
    match action {
        AdminAction::Erase { vin } => {
            let erased = vault.erase(&vin)?;
            println!(
                "{}",
                if erased {
                    "erased"
                } else {
                    "no secrets held for this vehicle"
                }
            );
        }
        // Handled above: retention needs no vault.
        AdminAction::Retention { .. } => {}
        AdminAction::Consent {
            vin,
            smart_maintenance,
            product_quality,
            sim_active,
        } => {
            let mut consent = vault.consent(&vin)?;
            consent.smart_maintenance = smart_maintenance.unwrap_or(consent.smart_maintenance);
            consent.product_quality = product_quality.unwrap_or(consent.product_quality);
            consent.sim_active = sim_active.unwrap_or(consent.sim_active);
            if smart_maintenance.is_some() || product_quality.is_some() || sim_active.is_some() {
                vault.set_consent(&vin, consent)?;
            }
            println!("{consent:?}");
        }
    }
    Ok(())
}

/// `admin retention`: one sweep now, printed; with `dry_run`, nothing deleted or audited.
fn retention(config: &Config, dry_run: bool) -> anyhow::Result<()> {
    use fleetgate::retention::{self, Retention};
    let registry = fleetgate::schema::Registry::load_from(config.storage.schema_dir.as_deref())?;
    let rules = Retention::load(config.retention.rules_file.as_deref(), &registry)?;
    let now = fleetgate::ingest::now_ms();
    let run = retention::SweepRun {
        now_ms: now,
        since_ms: None,
        zstd_level: config.storage.zstd_level,
        dry_run,
    };
    let deletions = retention::sweep(&config.storage.data_dir, &rules, run)?;
    if !dry_run {
        retention::audit(&config.retention.audit_file, now, &deletions)?;
    }
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

async fn shutdown_signal() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot listen for SIGTERM")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("cannot listen for SIGINT")?,
        _ = term.recv() => {}
    }
    Ok(())
}
