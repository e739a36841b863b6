//! The `fleetgate` binary as a user runs it: `serve` on port 0 prints where it
//! listens, SIGTERM stores everything received and exits 0, and `sql` prints
//! the rows in each output format. Also: a config file with an unknown key
//! is refused with the key named, `admin retention` lists (dry run) and
//! deletes expired partitions, and `access`, `sql --as` and `export` give a
//! user their own data.

mod common;

use std::process::Command;

use common::*;
use fleetgate::schema::Stream;

/// A socket to the MQTT port at `addr` that has sent `bytes` (packets
/// written by hand) and waits up to 10 s for each answer.
fn raw_mqtt(addr: std::net::SocketAddr, bytes: &[u8]) -> std::net::TcpStream {
    use std::io::Write;
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    stream.write_all(bytes).expect("packets");
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .expect("timeout");
    stream
}

/// Runs the binary in `cwd`, which must succeed, and returns what it printed.
fn fleetgate(cwd: &std::path::Path, args: &[&std::ffi::OsStr]) -> String {
    let out = Command::new(BIN)
        .current_dir(cwd)
        .args(args)
        .output()
        .expect("run fleetgate");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf8")
}

fn sql(dir: &std::path::Path, format: &str, statement: &str) -> String {
    let data = dir.join("data");
    fleetgate(
        dir,
        &[
            "sql".as_ref(),
            "--data-dir".as_ref(),
            data.as_os_str(),
            "--format".as_ref(),
            format.as_ref(),
            statement.as_ref(),
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_stores_everything_on_sigterm_and_sql_reads_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = ServeProcess::spawn(dir.path(), "");
    // A TCP probe (a load balancer's or orchestrator's health check) opens
    // the MQTT port and closes it without a word.
    drop(std::net::TcpStream::connect(server.addr).expect("probe"));
    // A vehicle that loses its network after connecting: its socket is
    // reset (closed with the CONNACK unread, Linux sends a RST).
    let vehicle = raw_mqtt(
        server.addr,
        b"\x10\x11\x00\x04MQTT\x04\x02\x00\x3c\x00\x05reset",
    );
    let mut connack = [0u8; 4];
    assert_eq!(vehicle.peek(&mut connack).expect("CONNACK"), 4);
    assert_eq!(connack, [0x20, 0x02, 0x00, 0x00], "accepted");
    drop(vehicle);
    // Clients that break the protocol: a PUBACK for a publish never sent,
    // and a client id no client may use. The broker closes each connection;
    // that is the client's fault, a warning.
    for (packets, what) in [
        (
            &b"\x10\x11\x00\x04MQTT\x04\x02\x00\x3c\x00\x05stray\x40\x02\x00\x07"[..],
            "Unsolicited/ooo ack",
        ),
        (
            &b"\x10\x0f\x00\x04MQTT\x04\x02\x00\x3c\x00\x03a/b"[..],
            "Invalid client_id",
        ),
    ] {
        let mut client = raw_mqtt(server.addr, packets);
        std::io::Read::read_to_end(&mut client, &mut Vec::new())
            .unwrap_or_else(|e| panic!("{what}: the broker closes the connection: {e}"));
        wait_for(|| {
            std::fs::read_to_string(dir.path().join("serve.log")).is_ok_and(|log| {
                log.lines()
                    .any(|l| l.contains(" WARN ") && l.contains(what))
            })
        });
    }
    let (_, bytes) = examples(Stream::Charging, "valid").remove(0);
    let vin = records(&bytes)[0]["vin"].as_str().expect("vin").to_owned();
    publish_all(server.addr, &[(format!("vehicles/{vin}/charging"), bytes)]).await;
    // The README's first publish: mosquitto_pub sends DISCONNECT and closes
    // its socket at once, so the router hears of the end twice.
    let (topic, probe) = rtti_probe(&vin, fleetgate::core::clock::now_ms());
    let published = Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &server.addr.port().to_string(),
            "-q",
            "1",
        ])
        .args(["-t", &topic, "-m"])
        .arg(String::from_utf8(probe).expect("JSON is text"))
        .status()
        .expect("mosquitto_pub runs (apt-get install mosquitto-clients)");
    assert!(published.success());
    server.terminate();
    let log = std::fs::read_to_string(dir.path().join("serve.log")).expect("log");
    assert!(
        log.contains("stream totals"),
        "the log is the server's: {log}"
    );
    for secret in [vin.as_str(), "SE-CHG-00048213"] {
        assert!(!log.contains(secret), "{secret} in the log");
    }
    // A clean start, a vehicle that connects, publishes and disconnects, a
    // probe, a vehicle gone without a word, a client breaking the protocol,
    // and a clean stop are not errors.
    let errors: Vec<&str> = log.lines().filter(|l| l.contains("ERROR")).collect();
    assert!(errors.is_empty(), "error lines in a clean run: {errors:#?}");

    // Default root key and vault are in ./keys, outside the default ./data.
    assert!(dir.path().join("keys/root.key").is_file());
    assert!(dir.path().join("keys/vault.redb").is_file());
    let csv = sql(
        dir.path(),
        "csv",
        "SELECT seq, event, soc_pct FROM charging ORDER BY seq",
    );
    assert_eq!(
        csv,
        "seq,event,soc_pct\n880,start,18.0\n881,progress,62.5\n882,end,80.0\n"
    );
    let json = sql(
        dir.path(),
        "json",
        "SELECT seq, energy_kwh FROM charging WHERE date = DATE '2026-11-22' AND hour = 16 ORDER BY seq",
    );
    let parsed: serde_json::Value = serde_json::from_str(&json).expect("json output");
    assert_eq!(
        parsed,
        serde_json::json!([{"seq": 880}, {"seq": 881, "energy_kwh": 31.4}, {"seq": 882, "energy_kwh": 41.9}])
    );
    let table = sql(
        dir.path(),
        "table",
        "SELECT count(*) AS n FROM dead_letters",
    );
    assert!(table.contains("| 0 |"), "{table}");
    // Every column of every table, lists and binary included, in every format.
    for format in ["table", "csv", "json", "ndjson"] {
        let all = sql(dir.path(), format, "SELECT * FROM charging");
        assert!(all.contains("880"), "{format}: {all}");
        // Every line a row (or the table's frame): no blank line at the
        // end, which CSV and NDJSON readers take for one more record.
        assert!(
            all.ends_with('\n') && !all.ends_with("\n\n"),
            "{format}: {all:?}"
        );
    }
}

#[test]
fn unknown_config_key_is_refused_by_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("fleetgate.toml");
    std::fs::write(&config, "[storage]\nrol_rows = 5\n").expect("write config");
    let out = Command::new(BIN)
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .output()
        .expect("run");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("rol_rows"), "{stderr}");
}

/// A mistyped data directory is an error that names it, not an empty
/// answer that looks like no data, and reading creates nothing there.
#[test]
fn reading_a_data_directory_that_is_not_there_fails_with_its_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("dta");
    let out = dir.path().join("export");
    let statement = "SELECT count(*) FROM rtti";
    let runs: [&[&std::ffi::OsStr]; 2] = [
        &["sql".as_ref(), statement.as_ref()],
        &[
            "export".as_ref(),
            "--user".as_ref(),
            "alice".as_ref(),
            "--out".as_ref(),
            out.as_os_str(),
        ],
    ];
    for args in runs {
        let out = Command::new(BIN)
            .current_dir(dir.path())
            .args(args)
            .arg("--data-dir")
            .arg(&missing)
            .env("RUST_BACKTRACE", "0")
            .output()
            .expect("run fleetgate");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert!(
            stderr.contains("no data directory") && stderr.contains(&*missing.to_string_lossy()),
            "{args:?}: {stderr}"
        );
        assert!(!missing.exists(), "{args:?} created {}", missing.display());
    }
}
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_retention_lists_then_deletes_expired_partitions() {
    let server = TestServer::start();
    let vin = A;
    let three_days_ago = fleetgate::core::clock::now_ms() - 3 * 86_400_000;
    let probe = rtti_probe(vin, three_days_ago);
    publish_all(server.handle.mqtt_addr(), &[probe]).await;
    let data = server.data_dir();
    let audit = server.config.retention.audit_file.clone();
    server.handle.shutdown().expect("shutdown");
    let config = server.dir.path().join("fleetgate.toml");
    std::fs::write(
        &config,
        format!(
            // A grace of 1 ms: the sweep deletes the removed files from disk at once.
            "[retention]\naudit_file = {:?}\n[access]\nquery_timeout_ms = 1\n[storage]\nvacuum_grace_ms = 1\n",
            audit.display().to_string()
        ),
    )
    .expect("config");
    let admin = |extra: &[&str]| {
        let mut args = vec![
            "admin".as_ref(),
            "--config".as_ref(),
            config.as_os_str(),
            "--data-dir".as_ref(),
            data.as_os_str(),
            "retention".as_ref(),
        ];
        args.extend(extra.iter().map(|a| std::ffi::OsStr::new(*a)));
        fleetgate(server.dir.path(), &args)
    };
    let parquet = || {
        files_under(&data.join("rtti"))
            .into_iter()
            .filter(|p| is_data_file(p))
            .count()
    };
    let planned = admin(&["--dry-run"]);
    assert!(planned.contains("would delete rtti/date="), "{planned}");
    assert!(
        planned.contains("expired under rtti_probe_data"),
        "{planned}"
    );
    assert_eq!(parquet(), 1, "a dry run deletes nothing");
    assert!(!audit.exists(), "a dry run audits nothing");
    let done = admin(&[]);
    assert!(done.contains("deleted: 1 rows"), "{done}");
    assert_eq!(parquet(), 0);
    assert!(
        std::fs::read_to_string(&audit)
            .expect("audit")
            .contains("rtti_probe_data")
    );
}

#[test]
fn admin_events_change_the_vault_offline_and_are_audited() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("fleetgate.toml");
    std::fs::write(
        &config,
        format!(
            "[storage]\ndata_dir = {:?}\nkey_file = {:?}\nvault_file = {:?}\n[retention]\naudit_file = {:?}\n",
            dir.path().join("data").display().to_string(),
            dir.path().join("keys/root.key").display().to_string(),
            dir.path().join("keys/vault.redb").display().to_string(),
            dir.path().join("audit.jsonl").display().to_string(),
        ),
    )
    .expect("config");
    let admin = |args: &[&str]| {
        let mut all = vec!["admin".as_ref(), "--config".as_ref(), config.as_os_str()];
        all.extend(args.iter().map(|a| std::ffi::OsStr::new(*a)));
        fleetgate(dir.path(), &all)
    };
    let vin = A;
    let out = admin(&["event", "--vin", vin, "--event", "sim-deactivated"]);
    assert!(out.contains("sim_active=false"), "{out}");
    let out = admin(&[
        "event",
        "--vin",
        vin,
        "--event",
        "consent-given",
        "--consent",
        "smart-maintenance",
    ]);
    assert!(out.contains("smart_maintenance=true"), "{out}");
    let shown = admin(&["consent", "--vin", vin]);
    assert!(
        shown.contains("smart_maintenance: true") && shown.contains("sim_active: false"),
        "{shown}"
    );
    let audit = std::fs::read_to_string(dir.path().join("audit.jsonl")).expect("audit");
    assert_eq!(audit.lines().count(), 2);
    assert!(!audit.contains(vin));
}

/// A user registered, given a vehicle and querying and exporting it, all
/// from the command line in the server's directory (its defaults).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_sql_as_a_user_and_export() {
    let server = TestServer::start();
    let (_, bytes) = examples(Stream::Charging, "valid").remove(0);
    let vin = records(&bytes)[0]["vin"].as_str().expect("vin").to_owned();
    publish_all(
        server.handle.mqtt_addr(),
        &[(format!("vehicles/{vin}/charging"), bytes)],
    )
    .await;
    server.handle.shutdown().expect("shutdown");
    let dir = server.dir.path();
    let run = |args: &[&str]| {
        let args: Vec<&std::ffi::OsStr> = args.iter().map(std::ffi::OsStr::new).collect();
        fleetgate(dir, &args)
    };
    let token = run(&["access", "principal", "alice", "--kind", "user"]);
    assert!(token.starts_with("fg_"), "{token}");
    run(&[
        "access",
        "transfer",
        "--user",
        "alice",
        "--vin",
        &vin,
        "--at",
        "2026-11-01T00:00:00Z",
    ]);
    let csv = run(&[
        "sql",
        "--as",
        "alice",
        "--purpose",
        "own_data_access",
        "--format",
        "csv",
        "SELECT vin, seq, contract_number FROM charging ORDER BY seq",
    ]);
    assert_eq!(
        csv,
        format!(
            "vin,seq,contract_number\n{vin},880,SE-CHG-00048213\n{vin},881,SE-CHG-00048213\n{vin},882,SE-CHG-00048213\n"
        )
    );
    let refused = Command::new(BIN)
        .current_dir(dir)
        .args([
            "sql",
            "--as",
            "alice",
            "--purpose",
            "own_data_access",
            "SELECT * FROM rtti",
        ])
        .output()
        .expect("run");
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("refused") && stderr.contains("L2005"),
        "{stderr}"
    );
    let written = run(&[
        "export", "--user", "alice", "--out", "export", "--format", "json",
    ]);
    assert!(
        written.contains("charging.json") && written.contains("metadata.json"),
        "{written}"
    );
    let rows: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("export/charging.json")).expect("charging.json"),
    )
    .expect("json");
    assert_eq!(rows.as_array().map(Vec::len), Some(3));
    assert_eq!(rows[0]["vin"], vin.as_str());
    let listed = run(&["access", "list"]);
    assert!(
        listed.contains("\"alice\"") && !listed.contains(token.trim()),
        "{listed}"
    );
}

/// The review's repro, from the command line: a tenure registered, then the
/// vehicle sold (or its account deleted) with the server stopped; the
/// buyer's records arrive. The old holder reads none of them: no VIN, no
/// contract number.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sale_or_account_deletion_ends_the_old_holders_access() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run = |args: &[&str]| {
        let args: Vec<&std::ffi::OsStr> = args.iter().map(std::ffi::OsStr::new).collect();
        fleetgate(dir.path(), &args)
    };
    let (sold, deleted) = (A, B);
    for (user, vin, event) in [
        ("alice", sold, "vehicle-sold"),
        ("carol", deleted, "account-deleted"),
    ] {
        run(&["access", "principal", user, "--kind", "user"]);
        run(&[
            "access",
            "transfer",
            "--user",
            user,
            "--vin",
            vin,
            "--at",
            "2026-01-01T00:00:00Z",
        ]);
        run(&["admin", "event", "--vin", vin, "--event", event]);
    }
    let charging = |vin: &str, contract: &str| {
        (
            format!("vehicles/{vin}/charging"),
            format!(
                r#"{{"vin":"{vin}","ts":{TEST_NOW_MS},"seq":1,"session_id":"S1","event":"start","started_at":{TEST_NOW_MS},"remote_managed":false,"contract_number":"{contract}"}}"#
            )
            .into_bytes(),
        )
    };
    let server = fleetgate::ops::server::start(&test_config(dir.path())).expect("server");
    publish_all(
        server.mqtt_addr(),
        &[
            charging(sold, "SE-BUYER-1"),
            charging(deleted, "SE-BUYER-2"),
        ],
    )
    .await;
    server.shutdown().expect("shutdown");
    for user in ["alice", "carol"] {
        let csv = run(&[
            "sql",
            "--as",
            user,
            "--purpose",
            "own_data_access",
            "--format",
            "csv",
            "SELECT vin, contract_number FROM charging",
        ]);
        assert!(
            !csv.contains("SE-BUYER") && !csv.contains("WMW"),
            "{user} reads the next holder's rows: {csv}"
        );
    }
}

/// `vehicle credential` prints a new password once and stores only its
/// salted hash under the VIN's keyed tag; `vehicle revoke` removes it.
#[test]
fn vehicle_credentials_are_issued_and_revoked() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("fleetgate.toml"),
        "[broker]\ncredentials_file = \"keys/vehicle-credentials.json\"\n",
    )
    .expect("config");
    let vin = A;
    let run = |action: &str| {
        let words = [
            "vehicle",
            "--config",
            "fleetgate.toml",
            action,
            "--vin",
            vin,
        ];
        let args: Vec<&std::ffi::OsStr> = words.iter().map(std::ffi::OsStr::new).collect();
        fleetgate(dir.path(), &args)
    };
    let password = run("credential");
    let password = password.trim();
    assert_eq!(password.len(), 64, "{password}");
    assert!(password.chars().all(|c| c.is_ascii_hexdigit()));
    let store =
        std::fs::read_to_string(dir.path().join("keys/vehicle-credentials.json")).expect("store");
    assert!(!store.contains(vin) && !store.contains(password), "{store}");
    assert_eq!(run("revoke").trim(), "revoked");
    assert_eq!(run("revoke").trim(), "no password held");
    let unconfigured = Command::new(BIN)
        .current_dir(dir.path())
        .args(["vehicle", "credential", "--vin", vin])
        .output()
        .expect("run");
    assert!(!unconfigured.status.success());
    assert!(String::from_utf8_lossy(&unconfigured.stderr).contains("credentials_file"));
}

/// A data directory of an older version (Parquet files in date=/hour=
/// directories, no Delta log) is refused at start-up, with the command
/// that converts it; `admin convert` makes each table a Delta table over
/// the same files, and every row is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_data_directory_is_converted_in_place() {
    let server = TestServer::start();
    let mut messages = Vec::new();
    for stream in [Stream::Rtti, Stream::Diagnostics] {
        for (_, bytes) in examples(stream, "valid") {
            let vin = records(&bytes)[0]["vin"].as_str().expect("vin").to_owned();
            messages.push((format!("vehicles/{vin}/{}", stream.name()), bytes));
        }
    }
    publish_all(server.handle.mqtt_addr(), &messages).await;
    let data = server.data_dir();
    let config = server.config.clone();
    server.handle.shutdown().expect("shutdown");
    let count = async |table: &str| {
        count_at(&data, &format!("SELECT count(*) FROM {table}"), TEST_NOW_MS).await
    };
    let (rtti, diagnostics) = (count("rtti").await, count("diagnostics").await);
    assert!(rtti > 0 && diagnostics > 0);

    // What an older version left: the same files, no transaction log.
    for table in ["rtti", "diagnostics", "dead_letters"] {
        let log = data.join(table).join("_delta_log");
        if log.exists() {
            std::fs::remove_dir_all(log).expect("remove log");
        }
    }
    let refused = match fleetgate::ops::server::start(&config) {
        Ok(_) => panic!("a server started on an unconverted data directory"),
        Err(e) => e.to_string(),
    };
    assert!(refused.contains("fleetgate admin convert"), "{refused}");

    let converted = fleetgate(
        server.dir.path(),
        &[
            "admin".as_ref(),
            "--data-dir".as_ref(),
            data.as_os_str(),
            "convert".as_ref(),
        ],
    );
    assert!(converted.contains("rtti: a Delta table"), "{converted}");
    assert_eq!(
        (count("rtti").await, count("diagnostics").await),
        (rtti, diagnostics)
    );
    fleetgate::ops::server::start(&config)
        .expect("starts on the converted directory")
        .shutdown()
        .expect("shutdown");
}

/// `fleetgate admin retention` on a stopped node whose write-ahead log
/// still holds acknowledged rows (a crash before they reached a table)
/// retires no deletion request: those rows come back at the next start,
/// and the request must still be there to delete them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_retention_retires_no_request_while_the_wal_holds_rows() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Rows wait in the writer for ten minutes: acknowledged, in the WAL only.
    let server = ServeProcess::spawn(dir.path(), "[storage]\nroll_age_ms = 600000\n");
    publish_all(server.addr, &[charging(A, 1, TEST_NOW_MS, "SE-A-1")]).await;
    server.kill();
    let admin = |args: &[&str]| {
        let mut all: Vec<&std::ffi::OsStr> = vec![
            "admin".as_ref(),
            "--config".as_ref(),
            "fleetgate.toml".as_ref(),
        ];
        all.extend(args.iter().map(|a| std::ffi::OsStr::new(*a)));
        fleetgate(dir.path(), &all)
    };
    admin(&["event", "--vin", A, "--event", "charge-history-off"]);
    // Made ten minutes ago: past the five minutes after which a sweep
    // retires a request whose rows are all stored.
    let requests_file = dir.path().join("audit/deletion-requests.json");
    let mut requests: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&requests_file).expect("requests"))
            .expect("JSON");
    for request in requests.as_array_mut().expect("a list") {
        let made = request["requested_ms"].as_i64().expect("requested_ms");
        request["requested_ms"] = (made - 600_000).into();
    }
    std::fs::write(&requests_file, requests.to_string()).expect("aged");

    admin(&["retention"]);
    let requests: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&requests_file).expect("requests"))
            .expect("JSON");
    assert_eq!(requests.as_array().map(Vec::len), Some(1), "{requests}");
}

/// Each thread of process `pid`: its name and nice value.
fn threads_and_nice(pid: u32) -> Vec<(String, i32)> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("tasks");
    tasks
        .filter_map(|task| {
            let path = task.ok()?.path();
            let name = std::fs::read_to_string(path.join("comm")).ok()?;
            let stat = std::fs::read_to_string(path.join("stat")).ok()?;
            // After the name in parentheses: state is field 3, nice field 19.
            let nice = stat.rsplit_once(')')?.1.split_whitespace().nth(16)?;
            Some((name.trim().to_owned(), nice.parse().ok()?))
        })
        .collect()
}

/// On busy cores the threads that decide how long a vehicle waits for its
/// acknowledgement go first: table commits (Parquet, Delta) and the
/// retention sweep run at nice +5, the query pool at +10, and the broker,
/// the link and the workers (WAL fsyncs) at the process's own priority.
#[test]
fn work_that_can_wait_runs_at_a_lower_cpu_priority_than_ingest() {
    const EXPECTED: [(&str, i32); 8] = [
        ("router-", 0),
        ("mqtt-v4", 0),
        ("ingest", 0),
        ("worker-", 0),
        ("writer-", 0),
        ("commit-", 5),
        ("retention", 5),
        ("fleetgate-sql", 10),
    ];
    let dir = tempfile::tempdir().expect("tempdir");
    let server = ServeProcess::spawn(dir.path(), "");
    // Each thread lowers its own priority as it starts, which may be just
    // after the server says it is ready: read until all have, or time out
    // and report the last reading.
    let mismatches = |threads: &[(String, i32)]| -> Vec<String> {
        let Some(own) = threads.iter().find(|(name, _)| name == "fleetgate") else {
            return vec!["no main thread".into()];
        };
        EXPECTED
            .iter()
            .filter_map(|(prefix, nicer_by)| {
                let nice: Vec<i32> = threads
                    .iter()
                    .filter(|(name, _)| name.starts_with(prefix))
                    .map(|(_, nice)| *nice)
                    .collect();
                let expected = (own.1 + nicer_by).min(19);
                (nice.is_empty() || nice.iter().any(|n| *n != expected)).then(|| {
                    format!(
                        "{prefix}* at {nice:?}, expected {expected} (process at {})",
                        own.1
                    )
                })
            })
            .collect()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let wrong = loop {
        let wrong = mismatches(&threads_and_nice(server.child.id()));
        if wrong.is_empty() || std::time::Instant::now() > deadline {
            break wrong;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(wrong.is_empty(), "{wrong:#?}");
    server.terminate();
}
