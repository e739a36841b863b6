//! Retention, with the clock moved instead of waited for: for every rule
//! of `schemas/retention.toml`, a row is visible through SQL just before
//! its deadline and gone just after, while rows under longer rules stay;
//! the sweep deletes an hour partition exactly once every row in it has
//! expired, records the deletion in the audit log, and a dry run deletes
//! nothing.

mod common;

use common::*;
use fleetgate::lifecycle::retention::{self, Retention};
use fleetgate::schema::{Registry, Stream};

/// Every record's vehicle timestamp: 2026-11-24T12:00:00Z, the start of an hour.
const T: i64 = TEST_NOW_MS;

/// Vehicle A's record `seq` on `stream`, stamped `T`.
fn publish(stream: Stream, seq: u64, fields: serde_json::Value) -> Message {
    record(A, stream, seq, T, fields)
}

/// Vehicle A's RTTI probe `seq` at `ts`, at 59.3 N 18.0 E, at `speed` km/h.
fn probe_at(seq: u64, ts: i64, speed: Option<f64>) -> Message {
    record(
        A,
        Stream::Rtti,
        seq,
        ts,
        serde_json::json!({"latitude": 59.3, "longitude": 18.0, "speed_kmh": speed}),
    )
}

/// One record per rule, all at `T`, stored and committed.
async fn store_one_row_per_rule() -> TestServer {
    let server = TestServer::start();
    let messages = vec![
        publish(
            Stream::Teleservice,
            1,
            serde_json::json!({"trigger": "hv_warn", "hv_incident_id": "HV-1"}),
        ),
        publish(
            Stream::Teleservice,
            2,
            serde_json::json!({"trigger": "monthly", "mileage_km": 100}),
        ),
        publish(
            Stream::Rtti,
            1,
            serde_json::json!({"latitude": 59.3, "longitude": 18.0}),
        ),
        publish(
            Stream::Diagnostics,
            1,
            serde_json::json!({"ecu": "DME", "severity": "info"}),
        ),
        publish(
            Stream::Charging,
            1,
            serde_json::json!({"session_id": "S1", "event": "start", "started_at": T, "remote_managed": true}),
        ),
        publish(
            Stream::Charging,
            2,
            serde_json::json!({"session_id": "S2", "event": "start", "started_at": T, "remote_managed": false}),
        ),
        // Not JSON: dead letters, timed by their receipt.
        (format!("vehicles/{A}/diagnostics"), b"not json".to_vec()),
        (format!("vehicles/{A}/rtti"), b"not json".to_vec()),
    ];
    publish_all(server.handle.mqtt_addr(), &messages).await;
    server
}

async fn visible(data: &std::path::Path, table: &str, now_ms: i64) -> i64 {
    count_at(data, &format!("SELECT count(*) FROM {table}"), now_ms).await
}

async fn visible_where(data: &std::path::Path, table: &str, filter: &str, now_ms: i64) -> i64 {
    count_at(
        data,
        &format!("SELECT count(*) FROM {table} WHERE {filter}"),
        now_ms,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rule_hides_its_rows_at_its_deadline_and_not_before() {
    let server = store_one_row_per_rule().await;
    let data = server.data_dir();
    server.handle.shutdown().expect("shutdown");
    let received_at = async |stream: &str| {
        let batches = query(
            &data,
            &format!(
                "SELECT CAST(max(received_at) AS BIGINT) / 1000 FROM dead_letters WHERE stream = '{stream}'"
            ),
        )
        .await;
        batches[0]
            .column(0)
            .as_any()
            .downcast_ref::<arrow::array::Int64Array>()
            .expect("received_at")
            .value(0)
    };
    let rtti_received_at = received_at("rtti").await;
    let received_at = received_at("diagnostics").await;
    let rules = Retention::load(None, &Registry::load().expect("schemas")).expect("rules");
    let keep = |name: &str| {
        rules
            .rules()
            .find(|r| r.name == name)
            .unwrap_or_else(|| panic!("rule {name}"))
            .keep_ms()
    };
    // (rule, table, filter selecting its row, time the row counts from)
    let cases = [
        ("hv_warn_call", "teleservice", "\"trigger\" = 'hv_warn'", T),
        (
            "teleservice_case_data",
            "teleservice",
            "\"trigger\" = 'monthly'",
            T,
        ),
        ("rtti_probe_data", "rtti", "true", T),
        ("diagnostic_evaluation", "diagnostics", "true", T),
        ("remote_charge_management", "charging", "remote_managed", T),
        ("charge_history", "charging", "NOT remote_managed", T),
        (
            "rtti_dead_letters",
            "dead_letters",
            "stream = 'rtti'",
            rtti_received_at,
        ),
        (
            "dead_letters",
            "dead_letters",
            "stream = 'diagnostics'",
            received_at,
        ),
    ];
    assert_eq!(cases.len(), rules.rules().count(), "a case for every rule");
    for (rule, table, filter, from) in cases {
        let deadline = from + keep(rule);
        assert_eq!(
            visible_where(&data, table, filter, deadline - 1).await,
            1,
            "{rule}: visible just before its deadline"
        );
        assert_eq!(
            visible_where(&data, table, filter, deadline + 1).await,
            0,
            "{rule}: hidden just after its deadline"
        );
    }
    // A shorter rule hides only its own rows: the monthly call outlives the HV warn call.
    assert_eq!(
        visible(&data, "teleservice", T + keep("hv_warn_call") + 1).await,
        1
    );
    assert_eq!(
        visible(&data, "charging", T + keep("remote_charge_management") + 1).await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweep_deletes_a_partition_once_all_its_rows_expired_and_audits_it() {
    let server = store_one_row_per_rule().await;
    let data = server.data_dir();
    let audit_file = server.config.retention.audit_file.clone();
    server.handle.shutdown().expect("shutdown");
    let rules = Retention::load(None, &Registry::load().expect("schemas")).expect("rules");
    let partition = data.join("rtti/date=2026-11-24/hour=12");
    assert!(!parquet_in(&partition).is_empty());
    // The partition holds 12:00-13:00; RTTI is kept 24 hours.
    let all_expired = T + HOUR + DAY;

    let none = retention::sweep(&store(&data), &rules, run(all_expired - 1, false)).expect("sweep");
    assert!(none.iter().all(|d| d.table != "rtti"), "{none:?}");
    assert!(!parquet_in(&partition).is_empty());

    let planned = retention::sweep(&store(&data), &rules, run(all_expired, true)).expect("dry run");
    let rtti: Vec<_> = planned.iter().filter(|d| d.table == "rtti").collect();
    assert_eq!(rtti.len(), 1);
    assert_eq!(
        (rtti[0].rows, rtti[0].partition.as_str()),
        (1, "date=2026-11-24/hour=12")
    );
    assert!(
        !parquet_in(&partition).is_empty(),
        "a dry run deletes nothing"
    );

    let deleted = retention::sweep(&store(&data), &rules, run(all_expired, false)).expect("sweep");
    retention::audit(&audit_file, all_expired, &deleted).expect("audit");
    assert_eq!(deleted, planned);
    assert!(
        parquet_in(&partition).is_empty(),
        "the expired partition's files are gone from disk, not only from the table"
    );
    // Every other table keeps its rows for longer.
    for table in ["teleservice", "diagnostics", "charging"] {
        assert!(
            files_under(&data.join(table))
                .iter()
                .any(|p| is_data_file(p))
        );
    }
    let audit = std::fs::read_to_string(&audit_file).expect("audit log");
    let lines: Vec<serde_json::Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["table"], "rtti");
    assert_eq!(lines[0]["rows"], 1);
    assert_eq!(lines[0]["rules"], serde_json::json!(["rtti_probe_data"]));
    assert!(
        !audit.contains(A) && !audit.contains("59.3"),
        "no data in the audit: {audit}"
    );

    // Charging: the charge-history row outlives the remote-managed one, and
    // the partition goes once it has expired too.
    let charging = data.join("charging/date=2026-11-24/hour=12");
    let keep_history = rules
        .rules()
        .find(|r| r.name == "charge_history")
        .expect("rule")
        .keep_ms();
    retention::sweep(&store(&data), &rules, run(T + keep_history - 1, false)).expect("sweep");
    assert!(!parquet_in(&charging).is_empty());
    assert_eq!(count_at(&data, "SELECT count(*) FROM charging", T).await, 1);
    retention::sweep(&store(&data), &rules, run(T + HOUR + keep_history, false)).expect("sweep");
    assert!(parquet_in(&charging).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_rows_cannot_be_reached_by_any_statement() {
    let server = store_one_row_per_rule().await;
    let data = server.data_dir();
    server.handle.shutdown().expect("shutdown");
    let later = T + 2 * DAY;
    assert_eq!(visible(&data, "rtti", later).await, 0);
    // The Parquet files behind the views are not tables of the session.
    let base_tables = count_at(
        &data,
        "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public' AND table_type <> 'VIEW'",
        later,
    )
    .await;
    // Only tables with no files yet are plain (empty) tables; every stored one is a view.
    assert_eq!(base_tables, 0);
    for sql in [
        "SELECT count(*) FROM (SELECT * FROM rtti UNION ALL SELECT * FROM rtti) AS t",
        "WITH r AS (SELECT * FROM rtti) SELECT count(*) FROM r",
        "SELECT count(*) FROM rtti WHERE ts < now()",
    ] {
        assert_eq!(count_at(&data, sql, later).await, 0, "{sql}");
    }
}

/// Where the log's statistics put every row of an hour partition within
/// every rule, a query reads the partition without its time columns; a
/// partition before it that may hold an expired row is still read row by
/// row, and hides that row. RTTI, kept 24 hours: a row at `T` and one two
/// hours later, each in its own partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_within_their_rules_are_read_without_row_times() {
    let server = TestServer::start();
    publish_all(
        server.handle.mqtt_addr(),
        &[
            probe_at(1, T, Some(50.0)),
            probe_at(2, T + 2 * HOUR, Some(50.0)),
        ],
    )
    .await;
    let data = server.data_dir();
    server.handle.shutdown().expect("shutdown");
    let times = ["ts", "received_at"];
    let reads_times = |columns: &Vec<String>| times.iter().any(|t| columns.iter().any(|c| c == t));
    // Both rows within 24 hours: neither partition's times are read.
    let both = T + DAY - 1;
    assert_eq!(visible(&data, "rtti", both).await, 2);
    let scans = scanned_columns(&data, "SELECT avg(speed_kmh) FROM rtti", both).await;
    assert!(
        !scans.is_empty() && !scans.iter().any(reads_times),
        "{scans:?}"
    );
    // The first row expired: its partition is read with the times, the
    // later one without.
    let one = T + DAY + 1;
    assert_eq!(visible(&data, "rtti", one).await, 1);
    let scans = scanned_columns(&data, "SELECT avg(speed_kmh) FROM rtti", one).await;
    assert_eq!(
        scans.iter().filter(|s| reads_times(s)).count(),
        1,
        "{scans:?}"
    );
    assert_eq!(
        scans.iter().filter(|s| !reads_times(s)).count(),
        1,
        "{scans:?}"
    );
    assert_eq!(
        count_at(&data, "SELECT count(*) FROM rtti WHERE ts < now()", one).await,
        1
    );
    // Both expired.
    let none = T + 2 * HOUR + DAY + 1;
    assert_eq!(visible(&data, "rtti", none).await, 0);
    let scans = scanned_columns(&data, "SELECT avg(speed_kmh) FROM rtti", none).await;
    assert!(
        !scans.is_empty() && scans.iter().all(reads_times),
        "{scans:?}"
    );
}

/// `count(*)` by partition over a table whose view keeps every row of the
/// files it reads is answered from the row counts the log gives each file,
/// without opening one; where the view filters rows, or the count is not of
/// every row, the files are read. The answers are the same either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_counts_by_partition_come_from_the_log_where_the_view_keeps_every_row() {
    let server = TestServer::start();
    publish_all(
        server.handle.mqtt_addr(),
        &[
            probe_at(1, T, Some(50.0)),
            probe_at(2, T + 1, Some(50.0)),
            probe_at(3, T + 2 * HOUR, Some(50.0)),
        ],
    )
    .await;
    let data = server.data_dir();
    server.handle.shutdown().expect("shutdown");
    let by_hour = "SELECT hour, count(*) AS n FROM rtti GROUP BY date, hour ORDER BY hour";
    let counts = async |sql: &str, now_ms: i64| {
        let mut rows = Vec::new();
        for batch in query_at(&data, sql, now_ms).await {
            let hours = batch
                .column(0)
                .as_any()
                .downcast_ref::<arrow::array::Int32Array>();
            let n = batch
                .column(1)
                .as_any()
                .downcast_ref::<arrow::array::Int64Array>();
            let (hours, n) = (hours.expect("hours"), n.expect("counts"));
            rows.extend((0..batch.num_rows()).map(|i| (hours.value(i), n.value(i))));
        }
        rows
    };
    let reads_files =
        async |sql: &str, now_ms: i64| !scanned_columns(&data, sql, now_ms).await.is_empty();
    // Every row within its rule: counted from the log.
    let all = T + DAY - 1;
    assert_eq!(counts(by_hour, all).await, [(12, 2), (14, 1)]);
    assert!(!reads_files(by_hour, all).await);
    assert_eq!(count_at(&data, "SELECT count(*) FROM rtti", all).await, 3);
    assert!(!reads_files("SELECT count(*) FROM rtti", all).await);
    // The distinct hours are the groups of a count by hour.
    let hours = "SELECT count(DISTINCT hour) FROM rtti";
    assert_eq!(count_at(&data, hours, all).await, 2);
    assert!(!reads_files(hours, all).await);
    // A subquery runs with the plan, and a function may differ by row:
    // neither is evaluated while the plan is made.
    for (sql, n) in [
        (
            "SELECT count(*) FROM rtti WHERE date = (SELECT max(date) FROM rtti)",
            3,
        ),
        ("SELECT count(*) FROM rtti WHERE random() < 2", 3),
        ("SELECT count(*) FROM rtti WHERE 1 / (hour - 13) <> 0", 3),
    ] {
        assert_eq!(count_at(&data, sql, all).await, n, "{sql}");
    }
    // Not a count of every row: read.
    for (sql, n) in [
        ("SELECT count(DISTINCT latitude) FROM rtti", 1),
        ("SELECT count(speed_kmh) FROM rtti", 3),
        ("SELECT count(*) FROM rtti WHERE speed_kmh > 0", 3),
    ] {
        assert_eq!(count_at(&data, sql, all).await, n, "{sql}");
        assert!(reads_files(sql, all).await, "{sql}");
    }
    // The first hour's rows expired: the view filters them, so it is read.
    let later = T + DAY + 2;
    assert_eq!(counts(by_hour, later).await, [(14, 1)]);
    assert!(reads_files(by_hour, later).await);
    // A filter on the hour is applied to each part: the later hour's count
    // still comes from the log.
    let at_14 = "SELECT count(*) FROM rtti WHERE hour = 14";
    assert_eq!(count_at(&data, at_14, later).await, 1);
    let plan = query_at(&data, &format!("EXPLAIN {at_14}"), later).await;
    let plan = arrow::util::pretty::pretty_format_batches(&plan)
        .expect("plan")
        .to_string();
    assert!(plan.contains("partition_sizes=[1]"), "{plan}");
}

/// An aggregate grouped by `date` and `hour` runs over runs of rows with
/// the same partition values (`RunAggregateExec`), with the answers of
/// DataFusion's own hash aggregate, which a key computed from them gets:
/// nulls, several functions and several hours included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregates_by_hour_partition_agree_with_the_hash_aggregate() {
    let server = TestServer::start();
    publish_all(
        server.handle.mqtt_addr(),
        &[
            probe_at(1, T, Some(50.0)),
            probe_at(2, T + 1, None),
            probe_at(3, T + 2, Some(30.5)),
            probe_at(4, T + 2 * HOUR, None),
            probe_at(5, T + 3 * HOUR, Some(90.0)),
        ],
    )
    .await;
    let data = server.data_dir();
    server.handle.shutdown().expect("shutdown");
    let now = T + DAY - 1;
    let aggregates = "count(*), count(speed_kmh), sum(speed_kmh), avg(speed_kmh), \
                      min(speed_kmh), max(speed_kmh), min(latitude)";
    let by_partition = format!(
        "SELECT date, hour, {aggregates} FROM rtti GROUP BY date, hour ORDER BY date, hour"
    );
    let by_expression = format!(
        "SELECT date, hour + 0, {aggregates} FROM rtti GROUP BY date, hour + 0 ORDER BY 1, 2"
    );
    let text = |batches: Vec<arrow::array::RecordBatch>| {
        arrow::util::pretty::pretty_format_batches(&batches)
            .expect("format")
            .to_string()
            .lines()
            .filter(|line| !line.starts_with('+'))
            .skip(1)
            .map(|line| line.split('|').map(str::trim).collect::<Vec<_>>().join("|"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let runs = text(query_at(&data, &by_partition, now).await);
    let hashed = text(query_at(&data, &by_expression, now).await);
    assert_eq!(runs, hashed);
    assert_eq!(
        runs.lines().filter(|l| l.starts_with("|2026")).count(),
        3,
        "{runs}"
    );
    let data = &data;
    let plan =
        |sql: String| async move { text(query_at(data, &format!("EXPLAIN {sql}"), now).await) };
    assert!(
        plan(by_partition.clone())
            .await
            .contains("RunAggregateExec")
    );
    assert!(
        !plan(by_expression.clone())
            .await
            .contains("RunAggregateExec")
    );
    // A function whose state grows with its input keeps the hash aggregate.
    let distinct = "SELECT hour, count(DISTINCT speed_kmh) FROM rtti GROUP BY hour".to_owned();
    assert!(!plan(distinct).await.contains("RunAggregateExec"));
}

/// The columns each Parquet scan in the physical plan of `sql` at `now_ms` reads.
async fn scanned_columns(data: &std::path::Path, sql: &str, now_ms: i64) -> Vec<Vec<String>> {
    use arrow::array::AsArray;
    use arrow::datatypes::DataType;
    let mut plan = String::new();
    for batch in query_at(data, &format!("EXPLAIN {sql}"), now_ms).await {
        let text = |i: usize| arrow::compute::cast(batch.column(i), &DataType::Utf8).expect("text");
        let (kinds, plans) = (text(0), text(1));
        for row in 0..batch.num_rows() {
            if kinds.as_string::<i32>().value(row) == "physical_plan" {
                plan.push_str(plans.as_string::<i32>().value(row));
            }
        }
    }
    plan.lines()
        .filter(|line| line.contains("DataSourceExec: file_groups"))
        .map(|line| {
            let columns = line.split("projection=[").nth(1).unwrap_or_default();
            let columns = columns.split(']').next().unwrap_or_default();
            columns.split(", ").map(str::to_owned).collect()
        })
        .collect()
}

fn run(now_ms: i64, dry_run: bool) -> retention::SweepRun {
    retention::SweepRun {
        now_ms,
        max_clock_skew_ms: 86_400_000,
        // No grace: the files a deletion removed go from disk in the same sweep.
        vacuum_grace_ms: 0,
        dry_run,
        unstored_since_ms: None,
    }
}

fn store(data: &std::path::Path) -> fleetgate::store::StoreRoot {
    fleetgate::store::StoreRoot::local(data).expect("store root")
}

fn parquet_in(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    if !dir.exists() {
        return Vec::new();
    }
    files_under(dir)
        .into_iter()
        .filter(|p| is_data_file(p))
        .collect()
}

/// The server's own sweep, on the real clock: a probe from three days ago
/// is stored, then deleted by the background sweep, counted and audited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_sweeps_expired_partitions_in_the_background() {
    let server = TestServer::start_with(|c| {
        c.retention.sweep_interval_secs = 1;
        // Files a deletion removed are deleted from disk by the next sweep.
        c.access.query_timeout_ms = 1;
        c.storage.vacuum_grace_ms = 1;
    });
    let three_days_ago = fleetgate::core::clock::now_ms() - 3 * DAY;
    let probe = rtti_probe(A, three_days_ago);
    publish_all(server.handle.mqtt_addr(), &[probe]).await;
    let metrics = server.handle.metrics().clone();
    let relaxed = std::sync::atomic::Ordering::Relaxed;
    let rtti = || &metrics.stream(Stream::Rtti).table;
    wait_for(|| rtti().rows_stored.load(relaxed) == 1);
    wait_for(|| rtti().rows_expired.load(relaxed) == 1);
    let data = server.data_dir();
    wait_for(|| parquet_in(&data.join("rtti")).is_empty());
    let audit_file = server.config.retention.audit_file.clone();
    server.handle.shutdown().expect("shutdown");
    assert!(parquet_in(&data.join("rtti")).is_empty());
    let audit = std::fs::read_to_string(audit_file).expect("audit log");
    assert!(audit.contains(r#""table":"rtti""#), "{audit}");
}

/// The WAL entries of rows the sweep deleted still count as stored (the
/// tables' application transactions outlive every DELETE and VACUUM), so
/// that recovery never writes their rows again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_of_swept_rows_still_count_as_stored() {
    let server = store_one_row_per_rule().await;
    let data = server.data_dir();
    server.handle.shutdown().expect("shutdown");
    let rules = Retention::load(None, &Registry::load().expect("schemas")).expect("rules");
    let stored = || {
        fleetgate::store::block_on(fleetgate::store::stored_through(&store(&data), "", &[0, 1]))
            .expect("stored through")
    };
    let before = stored();
    assert!(
        before.keys().any(|(table, _)| table.name() == "rtti"),
        "{before:?}"
    );
    // RTTI's partition has expired whole; the HV warn call is deleted from its file.
    retention::sweep(&store(&data), &rules, run(T + HOUR + 200 * DAY, false)).expect("sweep");
    assert!(parquet_in(&data.join("rtti")).is_empty());
    assert_eq!(
        stored(),
        before,
        "every entry of a deleted row still counts as stored"
    );
}

/// A remote-managed charging row that arrives back-dated past its one-day
/// rule, after the previous sweep's window has passed its hour, goes at the
/// next sweep, not when its partition expires a year later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_back_dated_row_of_a_shorter_rule_goes_at_the_next_sweep() {
    let server = TestServer::start();
    let previous_sweep = fleetgate::core::clock::now_ms();
    let ts = previous_sweep - 3 * DAY;
    let row = |seq: u64, remote: bool| {
        let fields = serde_json::json!({
            "session_id": format!("S{seq}"), "event": "start", "started_at": ts,
            "remote_managed": remote,
        });
        record(A, Stream::Charging, seq, ts, fields)
    };
    publish_all(server.handle.mqtt_addr(), &[row(1, true), row(2, false)]).await;
    let data = server.data_dir();
    server.handle.shutdown().expect("shutdown");
    let rules = Retention::load(None, &Registry::load().expect("schemas")).expect("rules");
    let next = run(fleetgate::core::clock::now_ms(), false);
    let deleted = retention::sweep(&store(&data), &rules, next).expect("sweep");
    assert_eq!(
        deleted
            .iter()
            .map(|d| (d.table.as_str(), d.action, d.rows, d.rules.clone()))
            .collect::<Vec<_>>(),
        vec![(
            "charging",
            "delete_rows",
            1,
            vec!["remote_charge_management".to_owned()]
        )]
    );
}

/// A vehicle clock running ahead (accepted up to `max_clock_skew_ms`)
/// extends no rule: an RTTI probe stamped 20 hours after its receipt is
/// hidden 24 hours after its receipt, and the sweep deletes it then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_stamped_ahead_of_its_receipt_expires_by_its_receipt() {
    let server = TestServer::start();
    let received = fleetgate::core::clock::now_ms();
    publish_all(
        server.handle.mqtt_addr(),
        &[rtti_probe(A, received + 20 * HOUR)],
    )
    .await;
    let data = server.data_dir();
    server.handle.shutdown().expect("shutdown");
    let stored = fleetgate::core::clock::now_ms();
    assert_eq!(visible(&data, "rtti", received + 23 * HOUR).await, 1);
    let past_its_rule = stored + DAY + 60_000;
    assert_eq!(
        visible(&data, "rtti", past_its_rule).await,
        0,
        "hidden 24 hours after its receipt"
    );
    let rules = Retention::load(None, &Registry::load().expect("schemas")).expect("rules");
    let deleted =
        retention::sweep(&store(&data), &rules, run(past_its_rule, false)).expect("sweep");
    assert_eq!(rows_deleted(&deleted, "rtti"), 1, "{deleted:?}");
    assert!(parquet_in(&data.join("rtti")).is_empty());
}

/// Rows under a shorter rule than their table's longest are deleted from
/// disk soon after their deadline: a DELETE commit replaces the file that
/// held them with one without them, and VACUUM deletes the old file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_of_shorter_rules_are_rewritten_out_of_their_files() {
    let server = store_one_row_per_rule().await;
    let data = server.data_dir();
    server.handle.shutdown().expect("shutdown");
    let rules = Retention::load(None, &Registry::load().expect("schemas")).expect("rules");
    let keep_hv = rules
        .rules()
        .find(|r| r.name == "hv_warn_call")
        .expect("rule")
        .keep_ms();
    let partition = data.join("teleservice/date=2026-11-24/hour=12");
    let rows_on_disk = || -> i64 {
        parquet_in(&partition)
            .iter()
            .map(|f| {
                let reader = parquet::file::reader::SerializedFileReader::new(
                    std::fs::File::open(f).expect("open"),
                )
                .expect("parquet");
                parquet::file::reader::FileReader::metadata(&reader)
                    .file_metadata()
                    .num_rows()
            })
            .sum()
    };
    assert_eq!(rows_on_disk(), 2);

    let untouched =
        retention::sweep(&store(&data), &rules, run(T + keep_hv - 1, false)).expect("sweep");
    assert!(
        untouched.iter().all(|d| d.table != "teleservice"),
        "{untouched:?}"
    );

    let now = T + keep_hv + 1;
    let deleted = retention::sweep(&store(&data), &rules, run(now, false)).expect("sweep");
    let teleservice: Vec<_> = deleted
        .iter()
        .filter(|d| d.table == "teleservice")
        .collect();
    assert_eq!(teleservice.len(), 1, "{deleted:?}");
    assert_eq!(teleservice[0].action, "delete_rows");
    assert_eq!(
        (teleservice[0].rows, teleservice[0].rules.clone()),
        (1, vec!["hv_warn_call".to_owned()])
    );
    assert_eq!(rows_on_disk(), 1, "only the monthly call is left on disk");
    assert_eq!(
        count_at(&data, "SELECT count(*) FROM teleservice", T).await,
        1
    );

    let again = retention::sweep(&store(&data), &rules, run(now + 60_000, false)).expect("sweep");
    assert!(again.iter().all(|d| d.table != "teleservice"), "{again:?}");
    // The rewritten file is owner-only, like every file fleetgate creates.
    assert_owner_only(&data);
}

/// A DELETE commit records its predicate in the table's log: a deletion
/// request's selection must not outlive the rows it deleted there. After
/// the sweep that carried it out, no log file names it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deletion_requests_selection_does_not_stay_in_the_log() {
    use fleetgate::lifecycle::requests::{DeletionRequest, MatchValue, Selection};
    let server = store_one_row_per_rule().await;
    let data = server.data_dir();
    server.handle.shutdown().expect("shutdown");
    let request = DeletionRequest {
        rows: Selection {
            table: "charging".into(),
            matches: vec![("session_id".into(), MatchValue::Text("S1".into()))],
        },
        event: "charging_session_ended".into(),
        requested_ms: T,
    };
    let rules = Retention::load(None, &Registry::load().expect("schemas"))
        .expect("rules")
        .with_requests(vec![request]);
    let deleted = retention::sweep(&store(&data), &rules, run(T + HOUR, false)).expect("sweep");
    assert!(
        deleted
            .iter()
            .any(|d| d.table == "charging" && d.rules == vec!["charging_session_ended".to_owned()]),
        "{deleted:?}"
    );
    assert_eq!(count_at(&data, "SELECT count(*) FROM charging", T).await, 1);
    // The next sweep, once the DELETE commit is older than the log keeps
    // the newest commits for the writers.
    let later = fleetgate::core::clock::now_ms() + fleetgate::store::delta::HISTORY_KEPT_MS + 1_000;
    retention::sweep(&store(&data), &rules, run(later, false)).expect("sweep");
    let log = files_under(&data.join("charging/_delta_log"));
    assert!(!log.is_empty());
    for file in log {
        let text = String::from_utf8_lossy(&std::fs::read(&file).expect("read")).into_owned();
        assert!(
            !text.contains("'S1'"),
            "{} names the request: {text}",
            file.display()
        );
    }
}

/// A deletion request stays active for `REQUEST_SETTLE_MS`: a row received
/// before it but still on its way to the table is deleted by a later sweep
/// too. Then the sweep retires it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deletion_request_stays_active_until_rows_before_it_have_landed() {
    use fleetgate::lifecycle::requests::{self, DeletionRequest, MatchValue, Selection};
    let server = store_one_row_per_rule().await;
    let data = server.data_dir();
    let files = requests::LifecycleState::new(&server.config.retention, None);
    server.handle.shutdown().expect("shutdown");
    let requested_ms = fleetgate::core::clock::now_ms();
    requests::add(
        &files.requests,
        DeletionRequest {
            rows: Selection {
                table: "charging".into(),
                matches: vec![("session_id".into(), MatchValue::Text("S1".into()))],
            },
            event: "charging_session_ended".into(),
            requested_ms,
        },
    )
    .expect("request");
    let rules =
        || Retention::current(None, &files, &Registry::load().expect("schemas")).expect("rules");
    let sweep_at = |now_ms: i64| {
        retention::sweep_and_record(&store(&data), &rules(), &files, run(now_ms, false))
            .expect("sweep")
    };
    let pending = || requests::load(&files.requests).expect("requests").len();

    let first = sweep_at(requested_ms + 60_000);
    assert!(first.iter().any(|d| d.table == "charging"), "{first:?}");
    assert_eq!(pending(), 1, "a minute on, the request is still active");
    // In a cluster: a node's WAL copy written just before the request, not
    // yet stored (the node is down), keeps it active however old it is.
    let mut behind = run(requested_ms + 10 * retention::REQUEST_SETTLE_MS, false);
    behind.unstored_since_ms = Some(requested_ms - 1_000);
    retention::sweep_and_record(&store(&data), &rules(), &files, behind).expect("sweep");
    assert_eq!(
        pending(),
        1,
        "rows acknowledged before it are not stored yet"
    );
    sweep_at(requested_ms + retention::REQUEST_SETTLE_MS);
    assert_eq!(
        pending(),
        0,
        "retired once rows before it have had time to land"
    );
}

/// The number in the first column of the first row of `sql`'s answer.
async fn count_at(data: &std::path::Path, sql: &str, now_ms: i64) -> i64 {
    let batches = query_at(data, sql, now_ms).await;
    batches[0]
        .column(0)
        .as_any()
        .downcast_ref::<arrow::array::Int64Array>()
        .expect("a count")
        .value(0)
}

/// A vehicle re-sends a record that got no PUBACK (to the node it
/// reconnects to, or the same one): it is stored twice, until compaction
/// rewrites its closed hour sorted by vehicle, time and sequence number and
/// keeps one row of each record. A record with the same `seq` at another
/// time is another record, and so is another reading under the same `seq`
/// and time; RTTI, which stores neither vehicle nor `seq`,
/// is only binned. A partition a rewrite made is not rewritten again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_keeps_one_row_of_a_record_sent_twice_sorted() {
    let server = TestServer::start();
    let now = fleetgate::core::clock::now_ms();
    // An hour that closed two hours ago.
    let t0 = (now - 3 * HOUR) / HOUR * HOUR;
    let rounds = [
        vec![diagnostics(B, 1, t0 + 500), diagnostics(A, 2, t0 + 1_000)],
        vec![diagnostics(A, 1, t0), rtti_probe(A, t0)],
        // The re-sent record, and what only looks like it: the same seq at
        // another time, and another reading under the same seq and time.
        vec![diagnostics(A, 1, t0), rtti_probe(A, t0)],
        vec![
            diagnostics(A, 1, t0 + 2_000),
            with(
                diagnostics(A, 1, t0),
                serde_json::json!({"severity": "critical"}),
            ),
        ],
    ];
    publish_in_rounds(&server, rounds).await;
    let data = server.data_dir();
    let (config, _dir) = server.stop();
    let all = "SELECT count(*) FROM diagnostics";
    assert_eq!(count_at(&data, all, now).await, 6, "stored as received");
    let settings = fleetgate::store::Compaction::from_config(&config.storage);
    let root = store(&data);
    let replaced = fleetgate::store::compact(&root, now, settings).expect("compaction");
    assert!(
        replaced >= 4,
        "the partitions' files were replaced: {replaced}"
    );

    assert_eq!(count_at(&data, all, now).await, 5, "one row per record");
    let once =
        "SELECT count(*) FROM (SELECT DISTINCT vehicle_id, ts, seq, severity FROM diagnostics)";
    assert_eq!(count_at(&data, once, now).await, 5);
    let probes = "SELECT count(*) FROM rtti";
    assert_eq!(
        count_at(&data, probes, now).await,
        2,
        "RTTI is not deduplicated"
    );

    // The partition is one file, its rows in record order.
    let rows: Vec<(String, i64, i64)> = only_file(&root, &data, "diagnostics")
        .await
        .iter()
        .flat_map(record_keys)
        .collect();
    assert_eq!(rows.len(), 5);
    let mut sorted = rows.clone();
    sorted.sort();
    assert_eq!(rows, sorted, "sorted by vehicle, time and sequence number");
    assert_eq!(
        fleetgate::store::compact(&root, now, settings).expect("compaction"),
        0,
        "a rewritten partition is left alone"
    );
}

/// RTTI is rewritten sorted by band of latitude (0.01°), then time:
/// traffic queries ask for road cells and areas, and in a sorted file the
/// pages outside an area's band have statistics that let the reader skip
/// them. Probes stay as
/// received (RTTI stores no vehicle or sequence number to tell a re-sent
/// probe by), and a partition a rewrite made is not rewritten again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_sorts_rtti_by_latitude_band_then_time() {
    let server = TestServer::start();
    let now = fleetgate::core::clock::now_ms();
    let t0 = (now - 3 * HOUR) / HOUR * HOUR;
    let probe = |lat: f64, lon: f64, ts: i64| {
        (
            format!("vehicles/{A}/rtti"),
            format!(r#"{{"vin":"{A}","ts":{ts},"seq":1,"latitude":{lat},"longitude":{lon}}}"#)
                .into_bytes(),
        )
    };
    // Within the band of 59.10°, time orders the rows, not latitude; and
    // the probe sent twice is kept twice.
    let rounds = [
        vec![probe(59.9, 18.2, t0 + 3_000), probe(59.1, 17.9, t0 + 1_000)],
        vec![probe(59.5, 18.0, t0 + 2_000), probe(59.1, 17.5, t0 + 4_000)],
        vec![probe(59.1, 17.9, t0), probe(55.6, 13.0, t0 + 5_000)],
        vec![
            probe(59.105, 18.0, t0 + 500),
            probe(59.101, 18.0, t0 + 9_000),
        ],
        vec![probe(59.9, 18.2, t0 + 3_000)],
    ];
    publish_in_rounds(&server, rounds).await;
    let data = server.data_dir();
    let (config, _dir) = server.stop();
    let settings = fleetgate::store::Compaction::from_config(&config.storage);
    let root = store(&data);
    let replaced = fleetgate::store::compact(&root, now, settings).expect("compaction");
    assert_eq!(replaced, 5, "the partition's five files were replaced");

    let rows: Vec<(f64, f64, i64)> = only_file(&root, &data, "rtti")
        .await
        .iter()
        .flat_map(positions)
        .collect();
    let mut sorted = rows.clone();
    sorted.sort_by(|a, b| {
        let band = |lat: f64| (lat * 100.0).floor();
        band(a.0).total_cmp(&band(b.0)).then(a.2.cmp(&b.2))
    });
    assert_eq!(rows.len(), 9, "every probe kept");
    assert_eq!(rows, sorted, "sorted by band of latitude, then time");
    assert_eq!(
        fleetgate::store::compact(&root, now, settings).expect("compaction"),
        0,
        "a rewritten partition is left alone"
    );
}

/// Dead letters are rewritten like the streams: one file per closed hour,
/// in order of arrival, every rejection kept, and written with the
/// table's own column types.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_keeps_every_dead_letter_in_order_of_arrival() {
    // Dead letters are partitioned by time of receipt: all three in one hour.
    let into_hour = fleetgate::core::clock::now_ms() % HOUR;
    if into_hour > HOUR - 60_000 {
        tokio::time::sleep(std::time::Duration::from_millis(
            (HOUR - into_hour) as u64 + 100,
        ))
        .await;
    }
    let server = TestServer::start();
    let data = server.data_dir();
    let root = store(&data);
    let files = || async {
        match fleetgate::store::delta::open(&root, "dead_letters").await {
            Ok(Some(table)) => table
                .snapshot()
                .expect("snapshot")
                .log_data()
                .iter()
                .count(),
            _ => 0,
        }
    };
    // Each rejection waits for the one before to be committed: one file each.
    for round in 1..=3 {
        let rejected = (format!("vehicles/{A}/diagnostics"), b"not json".to_vec());
        publish_all(server.handle.mqtt_addr(), &[rejected]).await;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while files().await < round {
            assert!(
                std::time::Instant::now() < deadline,
                "dead letter {round} committed"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
    let (config, _dir) = server.stop();
    let settings = fleetgate::store::Compaction::from_config(&config.storage);
    // Two hours on, the hour they arrived in is closed.
    let later = fleetgate::core::clock::now_ms() + 2 * HOUR;
    let replaced = fleetgate::store::compact(&root, later, settings).expect("compaction");
    assert_eq!(replaced, 3, "the hour's three files were replaced");

    let batches = only_file(&root, &data, "dead_letters").await;
    let arrivals: Vec<i64> = batches
        .iter()
        .flat_map(|batch| {
            let column = batch.column_by_name("received_at").expect("received_at");
            let times =
                arrow::compute::cast(column, &arrow::datatypes::DataType::Int64).expect("cast");
            use arrow::array::AsArray;
            times
                .as_primitive::<arrow::datatypes::Int64Type>()
                .values()
                .to_vec()
        })
        .collect();
    assert_eq!(arrivals.len(), 3, "every dead letter kept");
    assert!(arrivals.is_sorted(), "in order of arrival: {arrivals:?}");
    assert_eq!(
        fleetgate::store::compact(&root, later, settings).expect("compaction"),
        0,
        "a rewritten partition is left alone"
    );
}

/// Publishes each round once the one before is stored, so that each
/// becomes files of its own.
async fn publish_in_rounds(
    server: &TestServer,
    rounds: impl IntoIterator<Item = Vec<(String, Vec<u8>)>>,
) {
    let mut sent = 0;
    for round in rounds {
        sent += round.len() as u64;
        publish_all(server.handle.mqtt_addr(), &round).await;
        wait_for(|| server.handle.metrics().totals().stored == sent);
    }
}

/// The rows of table `name`'s one file, which the test asserts it has.
async fn only_file(
    root: &fleetgate::store::StoreRoot,
    data: &std::path::Path,
    name: &str,
) -> Vec<arrow::array::RecordBatch> {
    let table = fleetgate::store::delta::open(root, name)
        .await
        .expect("open")
        .expect("a table");
    let files: Vec<String> = table
        .snapshot()
        .expect("snapshot")
        .log_data()
        .iter()
        .map(|f| f.path().to_string())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let file = std::fs::File::open(data.join(name).join(&files[0])).expect("file");
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReader::try_new(file, 1024)
        .expect("parquet");
    // Every reader takes the file's own Arrow types (a string written as a
    // view is cast back to a string in every scan).
    let declared = table
        .snapshot()
        .expect("snapshot")
        .snapshot()
        .arrow_schema();
    for column in arrow::array::RecordBatchReader::schema(&reader).fields() {
        let field = declared.field_with_name(column.name()).expect("a column");
        assert_eq!(
            column.data_type(),
            field.data_type(),
            "{name}.{} is written as the table declares it",
            column.name()
        );
    }
    reader.map(|batch| batch.expect("batch")).collect()
}

/// `(latitude, longitude, ts)` of each row of `batch`.
fn positions(batch: &arrow::array::RecordBatch) -> Vec<(f64, f64, i64)> {
    use arrow::array::AsArray;
    use arrow::datatypes::{DataType, Float64Type, Int64Type};
    let column = |name: &str| batch.column_by_name(name).expect(name).clone();
    let ts = arrow::compute::cast(&column("ts"), &DataType::Int64).expect("cast");
    let (lat, lon) = (column("latitude"), column("longitude"));
    (0..batch.num_rows())
        .map(|i| {
            (
                lat.as_primitive::<Float64Type>().value(i),
                lon.as_primitive::<Float64Type>().value(i),
                ts.as_primitive::<Int64Type>().value(i),
            )
        })
        .collect()
}

/// `(vehicle_id, ts, seq)` of each row of `batch`.
fn record_keys(batch: &arrow::array::RecordBatch) -> Vec<(String, i64, i64)> {
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::{DataType, Int64Type};
    let as_i64 = |name: &str| {
        let column = batch.column_by_name(name).expect(name);
        arrow::compute::cast(column, &DataType::Int64).expect("cast")
    };
    let (ts, seq) = (as_i64("ts"), as_i64("seq"));
    let ids = batch.column_by_name("vehicle_id").expect("vehicle_id");
    let ids = arrow::compute::cast(ids, &DataType::Utf8).expect("cast");
    (0..batch.num_rows())
        .map(|i| {
            assert!(!ids.is_null(i));
            (
                ids.as_string::<i32>().value(i).to_owned(),
                ts.as_primitive::<Int64Type>().value(i),
                seq.as_primitive::<Int64Type>().value(i),
            )
        })
        .collect()
}
