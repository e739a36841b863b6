//! `loadgen`: drive a simulated fleet against fleetgate, report what it
//! measured, verify the store, and time the query suite. See the README's
//! "Benchmarks" section.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};
use fleetgate::store::StoreRoot;
use loadgen::fleet::{self, Mix};
use loadgen::report::{self, Report};
use loadgen::run::{self, Progress, RunConfig, Stop};
use loadgen::verify::{self, Manifest, StoreLocation, VaultLocation, Verdict};
use rumqttc::QoS;

/// mimalloc, as fleetgate's binary: loadgen runs on the cores it measures,
/// and its publishes allocate a record's JSON each.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(version, about = "Fleet simulator and benchmark driver for fleetgate")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Publish a simulated fleet's telemetry and report throughput and latency.
    Run(RunArgs),
    /// Check a finished run's acknowledged records against a stopped server's store.
    Verify {
        /// The run's acked.json (in its --out directory).
        manifest: PathBuf,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Time a SQL suite over a data directory, cold and hot, as JSON.
    Queries {
        /// Suite file: statements after `-- name: <name>` lines.
        #[arg(long, default_value = "scripts/queries.sql")]
        suite: PathBuf,
        #[arg(long, default_value = "./data")]
        data_dir: PathBuf,
        /// Hot runs per query after the cold one.
        #[arg(long, default_value_t = 5)]
        hot_runs: usize,
    },
    /// Run a SQL suite as N concurrent principals through a running
    /// server's Flight SQL endpoint for a while; latency and rate as JSON.
    Analysts {
        /// Suite file: statements after `-- name: <name>` lines.
        #[arg(long, default_value = "scripts/queries.sql")]
        suite: PathBuf,
        #[arg(long, default_value = "127.0.0.1:32010")]
        flight_addr: std::net::SocketAddr,
        /// The HTTP endpoint whose admin routes register the principals.
        #[arg(long, default_value = "127.0.0.1:9464")]
        admin_addr: std::net::SocketAddr,
        #[arg(long, default_value = "./keys/admin.token")]
        admin_token: PathBuf,
        #[arg(long, default_value = "operations")]
        purpose: String,
        /// Principals querying at once, each on its own connection.
        #[arg(long, default_value_t = 8)]
        clients: usize,
        /// Seconds to go on querying; each client runs the suite once in any case.
        #[arg(long, default_value_t = 30.0)]
        duration: f64,
    },
    /// Follow a running server's live streams as N principals for a while;
    /// receipt → delivered latency of every row as JSON.
    Followers {
        /// The HTTP endpoint: admin routes and `GET /live`.
        #[arg(long, default_value = "127.0.0.1:9464")]
        admin_addr: std::net::SocketAddr,
        #[arg(long, default_value = "./keys/admin.token")]
        admin_token: PathBuf,
        /// Tables each follower follows, comma-separated.
        #[arg(long, default_value = "charging")]
        tables: String,
        #[arg(long, default_value = "operations")]
        purpose: String,
        /// Principals following at once, each on its own connection.
        #[arg(long, default_value_t = 1)]
        followers: usize,
        /// Seconds to follow.
        #[arg(long, default_value_t = 30.0)]
        duration: f64,
    },
    /// Connect N vehicles one connection each, from as many loopback
    /// addresses, hold them (idle or publishing now and then), and report
    /// the accept rate and the server's memory per connection as JSON.
    Connections {
        #[arg(long, default_value = "127.0.0.1:1883")]
        server: std::net::SocketAddr,
        #[arg(long, default_value_t = 1000)]
        vehicles: u32,
        /// CONNECTs in flight at once.
        #[arg(long, default_value_t = 256)]
        parallel: usize,
        /// Seconds to hold the connections once all have answered.
        #[arg(long, default_value_t = 10.0)]
        hold: f64,
        /// Each vehicle publishes one QoS 1 record every this many seconds
        /// (0: idle, keep-alive pings only).
        #[arg(long, default_value_t = 0.0)]
        every: f64,
        #[arg(long, default_value_t = 60)]
        keep_alive: u16,
        /// The broker's process id, to report its resident set per connection.
        #[arg(long)]
        server_pid: Option<u32>,
        /// A file written once every vehicle has answered (connect figures, JSON).
        #[arg(long)]
        ready_file: Option<PathBuf>,
        /// Relative weights of rtti, diagnostics, charging, teleservice publishes.
        #[arg(long, default_value = "90,5,3,2", value_parser = parse_mix)]
        mix: Mix,
        #[arg(long)]
        seed: Option<u64>,
        /// Threads of the client runtime.
        #[arg(long, default_value_t = 2)]
        threads: usize,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 1883)]
    port: u16,
    #[arg(long, default_value_t = 10_000)]
    vehicles: u32,
    #[arg(long, default_value_t = 8)]
    connections: u32,
    /// 0 (at most once) or 1 (at least once).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=1))]
    qos: u8,
    /// Stop after this many publishes in all.
    #[arg(long, conflicts_with = "duration")]
    count: Option<u64>,
    /// Stop after this many seconds (default 30 when --count is not given).
    #[arg(long)]
    duration: Option<f64>,
    /// Publishes per second over all connections, on an open-loop schedule;
    /// without it each connection publishes as fast as --inflight allows.
    #[arg(long)]
    rate: Option<f64>,
    /// Records per publish (a JSON array when above 1).
    #[arg(long, default_value_t = 1)]
    records_per_publish: u32,
    /// Unacknowledged QoS 1 publishes per connection.
    #[arg(long, default_value_t = 200)]
    inflight: u16,
    /// Relative weights of rtti, diagnostics, charging, teleservice publishes.
    #[arg(long, default_value = "90,5,3,2", value_parser = parse_mix)]
    mix: Mix,
    #[arg(long)]
    seed: Option<u64>,
    /// Seconds to wait for outstanding acks after the last publish.
    #[arg(long, default_value_t = 30.0)]
    drain_timeout: f64,
    /// Threads of the client runtime.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Where report.txt, report.json, latency.svg and acked.json go.
    #[arg(long, default_value = "./loadgen-out")]
    out: PathBuf,
    /// After the run, wait for the server to stop and verify that every
    /// acknowledged record is stored exactly once.
    #[arg(long)]
    verify: bool,
    /// How long --verify waits for the server to release its vault.
    #[arg(long, default_value_t = 300.0)]
    verify_wait: f64,
    #[command(flatten)]
    store: StoreArgs,
}

/// Where the server keeps its data and keys (as in its config).
#[derive(clap::Args)]
struct StoreArgs {
    /// A node's configuration file (its tables, key file, and vault or
    /// control plane); relative paths in it are read from the current
    /// directory, as the node reads them. Overrides the three below.
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long, default_value = "./data")]
    data_dir: PathBuf,
    #[arg(long, default_value = "./keys/root.key")]
    key_file: PathBuf,
    #[arg(long, default_value = "./keys/vault.redb")]
    vault_file: PathBuf,
}

impl StoreArgs {
    fn location(&self) -> anyhow::Result<StoreLocation> {
        let Some(path) = &self.config else {
            return Ok(StoreLocation {
                store: StoreRoot::local(&self.data_dir)?,
                key_file: self.key_file.clone(),
                vault: VaultLocation::File(self.vault_file.clone()),
            });
        };
        let config = fleetgate::config::Config::from_file(path)?;
        let vault = match config.cluster.control_plane.as_str() {
            "" => VaultLocation::File(config.storage.vault_file.clone()),
            url => VaultLocation::ControlPlane(url.to_owned()),
        };
        Ok(StoreLocation {
            store: StoreRoot::from_config(&config.storage)?,
            key_file: config.storage.key_file.clone(),
            vault,
        })
    }
}

fn parse_mix(s: &str) -> Result<Mix, String> {
    let weights: Vec<u32> = s
        .split(',')
        .map(|w| w.trim().parse::<u32>().map_err(|e| format!("{w:?}: {e}")))
        .collect::<Result<_, _>>()?;
    match weights[..] {
        [rtti, diagnostics, charging, teleservice] if weights.iter().any(|&w| w > 0) => Ok(Mix {
            rtti,
            diagnostics,
            charging,
            teleservice,
        }),
        _ => Err("four weights, rtti,diagnostics,charging,teleservice, not all zero".into()),
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => run_command(args),
        Command::Verify { manifest, store } => {
            let manifest = verify::load_manifest(&manifest)?;
            let verdict = runtime(1)?.block_on(verify::verify(&manifest, &store.location()?))?;
            println!("{}", serde_json::to_string_pretty(&verdict)?);
            anyhow::ensure!(
                verdict.ok,
                "some acknowledged records are missing or duplicated"
            );
            Ok(())
        }
        Command::Queries {
            suite,
            data_dir,
            hot_runs,
        } => {
            let text = std::fs::read_to_string(&suite)
                .with_context(|| format!("reading {}", suite.display()))?;
            let suite = loadgen::queries::parse_suite(&text);
            let timings =
                runtime(2)?.block_on(loadgen::queries::time_suite(&data_dir, &suite, hot_runs))?;
            println!("{}", serde_json::to_string_pretty(&timings)?);
            Ok(())
        }
        Command::Analysts {
            suite,
            flight_addr,
            admin_addr,
            admin_token,
            purpose,
            clients,
            duration,
        } => {
            let text = std::fs::read_to_string(&suite)
                .with_context(|| format!("reading {}", suite.display()))?;
            let suite = loadgen::queries::parse_suite(&text);
            let admin_token = std::fs::read_to_string(&admin_token)
                .with_context(|| format!("reading {}", admin_token.display()))?
                .trim()
                .to_owned();
            let analysts = loadgen::analysts::Analysts {
                flight_addr,
                admin_addr,
                admin_token,
                purpose,
                clients: clients.max(1),
                duration: Duration::from_secs_f64(duration),
            };
            let report = runtime(2)?.block_on(loadgen::analysts::run(&analysts, &suite))?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(())
        }
        Command::Followers {
            admin_addr,
            admin_token,
            tables,
            purpose,
            followers,
            duration,
        } => {
            let admin_token = std::fs::read_to_string(&admin_token)
                .with_context(|| format!("reading {}", admin_token.display()))?
                .trim()
                .to_owned();
            let followers = loadgen::followers::Followers {
                admin_addr,
                admin_token,
                tables,
                purpose,
                followers: followers.max(1),
                duration: Duration::from_secs_f64(duration),
            };
            let report = runtime(1)?.block_on(loadgen::followers::run(&followers))?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(())
        }
        Command::Connections {
            server,
            vehicles,
            parallel,
            hold,
            every,
            keep_alive,
            server_pid,
            ready_file,
            mix,
            seed,
            threads,
        } => {
            let connections = loadgen::connections::Connections {
                server,
                vehicles,
                parallel,
                hold: Duration::from_secs_f64(hold.max(0.0)),
                every: (every > 0.0).then(|| Duration::from_secs_f64(every)),
                keep_alive_secs: keep_alive,
                server_pid,
                ready_file,
                mix,
                seed: seed.unwrap_or_else(|| fastrand::u64(..)),
            };
            let report = runtime(threads)?.block_on(loadgen::connections::run(&connections))?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(())
        }
    }
}

fn runtime(threads: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn run_command(args: RunArgs) -> anyhow::Result<()> {
    let seed = args.seed.unwrap_or_else(|| fastrand::u64(..));
    let config = RunConfig {
        host: args.host,
        port: args.port,
        vehicles: args.vehicles,
        connections: args.connections,
        qos: if args.qos == 0 {
            QoS::AtMostOnce
        } else {
            QoS::AtLeastOnce
        },
        stop: match (args.count, args.duration) {
            (Some(n), _) => Stop::Publishes(n),
            (None, d) => Stop::Duration(Duration::from_secs_f64(d.unwrap_or(30.0))),
        },
        rate: args.rate.filter(|r| *r > 0.0),
        records_per_publish: args.records_per_publish.max(1),
        inflight: args.inflight,
        mix: args.mix,
        seed,
        drain_timeout: Duration::from_secs_f64(args.drain_timeout),
    };
    let run_tag = fleet::run_tag(&mut fastrand::Rng::with_seed(seed));
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let rt = runtime(args.threads)?;
    let progress = Arc::new(Progress::default());
    let ticker = rt.spawn(progress_line(progress.clone()));
    let outcome = rt.block_on(run::run(&config, &run_tag, progress))?;
    ticker.abort();
    eprintln!();

    let mut report = Report::new(&config, &outcome);
    let manifest = Manifest {
        run_tag: outcome.run_tag.clone(),
        vehicles: config.vehicles,
        started_ms: outcome.started_ms,
        finished_ms: outcome.finished_ms,
        sent_by_stream: outcome.sent_by_stream,
        acks: outcome.acks,
    };
    report::write(
        &args.out.join("acked.json"),
        &serde_json::to_string(&manifest)?,
    )?;
    report::latency_svg(
        &outcome.latency_us,
        &format!(
            "{} — {} ({} vehicles, QoS {}, {:.0} records/s)",
            report.latency.measures, report.mode, report.vehicles, report.qos, report.records_per_s
        ),
        &args.out.join("latency.svg"),
    )?;
    if args.verify {
        let verdict = rt.block_on(verify_when_stopped(
            &manifest,
            &args.store.location()?,
            args.verify_wait,
        ))?;
        report.verify = Some(verdict);
    }
    report::write(
        &args.out.join("report.json"),
        &serde_json::to_string_pretty(&report)?,
    )?;
    let text = report.text();
    report::write(&args.out.join("report.txt"), &text)?;
    print!("{text}");
    println!("  report: {}", args.out.display());
    if report.verify.as_ref().is_some_and(|v| !v.ok) {
        anyhow::bail!("verification failed: acknowledged records are missing or duplicated");
    }
    Ok(())
}

/// Verifies once the server has released its vault (it holds a lock on it
/// while running), waiting at most `wait_secs`.
async fn verify_when_stopped(
    manifest: &Manifest,
    store: &StoreLocation,
    wait_secs: f64,
) -> anyhow::Result<Verdict> {
    let deadline = Instant::now() + Duration::from_secs_f64(wait_secs);
    let mut told = false;
    loop {
        match verify::verify(manifest, store).await {
            Ok(verdict) => return Ok(verdict),
            Err(verify::VerifyError::Vault(e)) if Instant::now() < deadline => {
                if !told {
                    eprintln!("verify: waiting for the server to stop and release its vault ({e})");
                    told = true;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// A progress line on stderr, once a second.
async fn progress_line(progress: Arc<Progress>) {
    let start = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    let mut last_acked = 0;
    loop {
        ticker.tick().await;
        let acked = progress.acked.load(Relaxed);
        eprint!(
            "\r{:>5.0} s  sent {:>10}  acked {:>10}  {:>8} acks/s  errors {}   ",
            start.elapsed().as_secs_f64(),
            progress.sent.load(Relaxed),
            acked,
            acked - last_acked,
            progress.errors.load(Relaxed)
        );
        last_acked = acked;
    }
}
