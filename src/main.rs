//! The `fleetgate` command: `serve` runs the server, `sql` queries the store.
//! Wiring only; every capability lives in the library.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use fleetgate::config::Config;
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
    Schema,
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
        } => {
            let mut config = common.load()?;
            if let Some(addr) = mqtt_addr {
                config.broker.mqtt_addr = addr;
            }
            if let Some(addr) = mqtt5_addr {
                config.broker.mqtt5_addr = addr;
            }
            let server = fleetgate::server::start(&config)?;
            println!(
                "fleetgate listening on mqtt://{} (MQTT 5: {}), data in {}",
                server.mqtt_addr(),
                server.mqtt5_addr(),
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
            let text = runtime.block_on(async {
                let ctx = query::session(&config.storage.data_dir).await?;
                let batches = query::run(&ctx, &statement).await?;
                query::format(&batches, format)
            })?;
            println!("{text}");
            Ok(())
        }
        Command::Schema => {
            print!("{}", fleetgate::schema::Registry::load()?.markdown());
            Ok(())
        }
    }
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
