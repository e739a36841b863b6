//! loadgen against a real fleetgate server (in process, port 0, temp dir):
//! runs finish by themselves, count what was acknowledged, and `verify`
//! finds every acknowledged record exactly once, and notices when one is
//! missing or duplicated.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use fleetgate::config::Config;
use fleetgate::schema::Stream;
use loadgen::fleet::Mix;
use loadgen::report::{self, Report};
use loadgen::run::{self, Outcome, Progress, RunConfig, Stop};
use loadgen::verify::{self, Manifest, StoreLocation};
use rumqttc::QoS;

fn server_config(dir: &Path) -> Config {
    let mut config = Config::isolated(dir);
    config.storage.roll_age_ms = 200;
    config.pipeline.workers = 2;
    config
}

fn run_config(port: u16, stop: Stop) -> RunConfig {
    RunConfig {
        host: "127.0.0.1".into(),
        port,
        vehicles: 40,
        connections: 4,
        qos: QoS::AtLeastOnce,
        stop,
        rate: None,
        records_per_publish: 2,
        inflight: 50,
        // Every stream often enough that each is checked record by record.
        mix: Mix {
            rtti: 4,
            diagnostics: 2,
            charging: 2,
            teleservice: 2,
        },
        seed: 11,
        drain_timeout: Duration::from_secs(60),
    }
}

fn drive(config: &RunConfig) -> Outcome {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(run::run(config, "TESTRN", Arc::new(Progress::default())))
        .expect("run")
}

fn manifest(config: &RunConfig, outcome: &Outcome) -> Manifest {
    Manifest {
        run_tag: outcome.run_tag.clone(),
        vehicles: config.vehicles,
        started_ms: outcome.started_ms,
        finished_ms: outcome.finished_ms,
        sent_by_stream: outcome.sent_by_stream,
        acks: outcome.acks.clone(),
    }
}

fn check(manifest: &Manifest, config: &Config) -> verify::Verdict {
    let store = StoreLocation {
        store: fleetgate::store::StoreRoot::local(&config.storage.data_dir).expect("store"),
        key_file: config.storage.key_file.clone(),
        vault: verify::VaultLocation::File(config.storage.vault_file.clone()),
    };
    tokio::runtime::Runtime::new()
        .expect("runtime")
        .block_on(verify::verify(manifest, &store))
        .expect("verify runs")
}

fn verdict_of(verdict: &verify::Verdict, stream: Stream) -> &verify::StreamVerdict {
    verdict
        .streams
        .iter()
        .find(|s| s.stream == stream.name())
        .expect("stream verdict")
}

#[test]
fn an_acknowledged_run_is_stored_exactly_once_and_verify_notices_tampering() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = server_config(dir.path());
    let server = fleetgate::ops::server::start(&config).expect("server starts");
    let run = run_config(server.mqtt_addr().port(), Stop::Publishes(2_000));
    let outcome = drive(&run);
    assert!(outcome.errors.is_empty(), "{:?}", outcome.errors);
    assert_eq!(outcome.publishes_sent, 2_000);
    assert_eq!(outcome.publishes_acked, 2_000);
    assert_eq!(outcome.records_acked, 4_000);
    assert_eq!(outcome.latency_us.len(), 2_000);
    server.shutdown().expect("clean shutdown");

    let manifest = manifest(&run, &outcome);
    let verdict = check(&manifest, &config);
    assert!(verdict.ok, "{verdict:#?}");
    for stream in Stream::ALL {
        let v = verdict_of(&verdict, stream);
        let expected_method = if stream == Stream::Rtti {
            "count"
        } else {
            "exact"
        };
        assert_eq!(v.method, expected_method);
        assert!(v.acked > 0, "{stream:?} was exercised");
        assert_eq!(v.stored, v.acked, "{v:?}");
        assert_eq!((v.missing, v.duplicated), (0, 0));
    }

    // An acknowledgement the store never saw is reported missing.
    let mut claimed = manifest.clone();
    claimed.acks.add(Stream::Charging, 0, 1_000_000, 1);
    let verdict = check(&claimed, &config);
    assert!(!verdict.ok);
    let charging = verdict_of(&verdict, Stream::Charging);
    assert_eq!(charging.missing, 1);
    assert_eq!(charging.missing_examples, vec![(0, 1_000_000)]);

    // A copy of a file that no commit names is not part of the table.
    let file = files_with_extension(&config.storage.data_dir.join("diagnostics"), "parquet")
        .into_iter()
        .next()
        .expect("a diagnostics file");
    std::fs::copy(&file, file.with_file_name("part-copy.parquet")).expect("copy");
    assert!(
        check(&manifest, &config).ok,
        "a stray file is read by no one"
    );

    // Rows committed twice show up as duplicates.
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
        std::fs::File::open(&file).expect("open"),
    )
    .expect("parquet")
    .build()
    .expect("reader");
    let batches: Vec<arrow::array::RecordBatch> =
        reader.collect::<Result<_, _>>().expect("batches");
    let first_ts = batches[0]
        .column_by_name("ts")
        .and_then(|c| arrow::compute::cast(c, &arrow::datatypes::DataType::Int64).ok())
        .expect("ts");
    let first_ts = first_ts
        .as_any()
        .downcast_ref::<arrow::array::Int64Array>()
        .expect("int64")
        .value(0);
    // Microseconds in a Delta table's files.
    let partition = fleetgate::store::PartitionKey::from_millis(first_ts / 1000);
    let parts: Vec<_> = batches.into_iter().map(|b| (partition, b)).collect();
    let root = fleetgate::store::StoreRoot::local(&config.storage.data_dir).expect("root");
    fleetgate::store::append(&root, "diagnostics", &parts[0].1.schema(), &parts, 3)
        .expect("commit again");
    let verdict = check(&manifest, &config);
    assert!(!verdict.ok);
    assert!(verdict_of(&verdict, Stream::Diagnostics).duplicated > 0);
}

#[test]
fn open_loop_and_qos0_runs_stop_by_themselves_and_write_their_reports() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = server_config(dir.path());
    let server = fleetgate::ops::server::start(&config).expect("server starts");
    let mut run = run_config(server.mqtt_addr().port(), Stop::Publishes(300));
    run.rate = Some(1_000.0);
    let outcome = drive(&run);
    assert_eq!(outcome.publishes_acked, 300, "{:?}", outcome.errors);
    assert_eq!(outcome.latency_us.len(), 300);

    let report = Report::new(&run, &outcome);
    assert!(report.mode.contains("open loop"), "{}", report.mode);
    assert_eq!(report.publishes_unacked, 0);
    let svg = dir.path().join("latency.svg");
    report::latency_svg(&outcome.latency_us, "test", &svg).expect("plot");
    let drawn = std::fs::read_to_string(&svg).expect("svg");
    assert!(
        drawn.contains("<svg") && drawn.contains("<polyline"),
        "{drawn}"
    );
    assert!(report.text().contains("p99.9"));

    let mut qos0 = run_config(
        server.mqtt_addr().port(),
        Stop::Duration(Duration::from_millis(300)),
    );
    qos0.qos = QoS::AtMostOnce;
    qos0.rate = Some(500.0);
    let outcome = drive(&qos0);
    assert!(outcome.publishes_sent > 0);
    assert_eq!(outcome.publishes_acked, 0);
    assert_eq!(outcome.latency_us.len(), outcome.publishes_sent);
    server.shutdown().expect("clean shutdown");
}

fn files_with_extension(dir: &Path, extension: &str) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).expect("read_dir").flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == extension) {
                out.push(path);
            }
        }
    }
    out
}

/// `loadgen analysts` over a stored run: every statement of the benchmark
/// suite answers through Flight SQL (arrow-rs's client), as twice as many
/// operator principals at once as may query at once, with no error.
#[test]
fn analysts_run_the_whole_suite_through_flight_sql() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = server_config(dir.path());
    let server = fleetgate::ops::server::start(&config).expect("server starts");
    let outcome = drive(&run_config(server.mqtt_addr().port(), Stop::Publishes(200)));
    assert_eq!(outcome.publishes_acked, 200, "{:?}", outcome.errors);
    let suite_file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/queries.sql");
    let suite = loadgen::queries::parse_suite(&std::fs::read_to_string(suite_file).expect("suite"));
    assert!(suite.len() >= 12, "{} statements", suite.len());
    let analysts = loadgen::analysts::Analysts {
        flight_addr: server.flight_sql_addr(),
        admin_addr: server.admin_addr(),
        admin_token: std::fs::read_to_string(&config.admin.token_file)
            .expect("admin token")
            .trim()
            .to_owned(),
        purpose: "operations".into(),
        // Twice as many as may run at once: some wait for a turn.
        clients: 2 * config.access.max_concurrent_queries as usize,
        // Each client runs the suite once and stops.
        duration: Duration::ZERO,
    };
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let report = rt
        .block_on(loadgen::analysts::run(&analysts, &suite))
        .expect("analysts");
    assert_eq!(report.errors, 0, "{:?}", report.first_error);
    assert_eq!(
        report.queries,
        (analysts.clients * suite.len()) as u64,
        "{report:?}"
    );
    server.shutdown().expect("clean shutdown");
}

/// `loadgen followers` beside a run: every follower gets every charging
/// record the run sent, once, with its receipt → delivered latency.
#[test]
fn followers_receive_every_row_of_their_tables_live() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = server_config(dir.path());
    let server = fleetgate::ops::server::start(&config).expect("server starts");
    let followers = loadgen::followers::Followers {
        admin_addr: server.admin_addr(),
        admin_token: std::fs::read_to_string(&config.admin.token_file)
            .expect("admin token")
            .trim()
            .to_owned(),
        tables: "charging".into(),
        purpose: "operations".into(),
        followers: 3,
        duration: Duration::from_secs(10),
    };
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let following = rt.spawn(async move { loadgen::followers::run(&followers).await });
    // The streams are open well before the first record is stored.
    std::thread::sleep(Duration::from_secs(2));
    let outcome = drive(&run_config(server.mqtt_addr().port(), Stop::Publishes(200)));
    assert_eq!(outcome.publishes_acked, 200, "{:?}", outcome.errors);
    let report = rt
        .block_on(following)
        .expect("followers task")
        .expect("followers");
    let charging = outcome.sent_by_stream[Stream::Charging.index()].records;
    assert!(charging > 0);
    assert_eq!(report.errors, 0, "{:?}", report.first_error);
    assert_eq!(report.rows, 3 * charging, "{report:?}");
    assert!(
        report.latency.p99_ms >= report.latency.p50_ms && report.latency.max_ms > 0.0,
        "{report:?}"
    );
    server.shutdown().expect("clean shutdown");
}
