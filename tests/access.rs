//! The Data Act query layer on real data: principal × table × purpose →
//! allow, filter, mask, aggregate or refuse, with exact result tables;
//! bypass attempts through every SQL form; tenure across a sale;
//! revocation and gatekeeper refusal; k-suppression of small groups; the
//! query audit log; the user export; the same over HTTP; and the bounds on
//! what a hostile statement may cost.

mod common;

use std::collections::BTreeSet;

use arrow::array::RecordBatch;
use arrow::util::display::array_value_to_string;
use common::*;
use fleetgate::access::AccessEnv;
use fleetgate::access::export::ExportFormat;
use fleetgate::access::registry::{GrantRequest, PrincipalKind, Role};
use fleetgate::config::Config;
use fleetgate::privacy::stage::PrivacyShared;

const NOW: i64 = TEST_NOW_MS;
/// Alice sells vehicle A to Bob at this time.
const SALE: i64 = NOW - 2 * DAY;

/// A fleet of probe vehicles: `n` of them in one 0.1° cell.
fn probes(first: u32, n: u32, lat: f64, lon: f64) -> Vec<(String, Vec<u8>)> {
    (first..first + n)
        .map(|i| {
            let vin = format!("WMW11DJ04N2T{i:05}");
            let body = format!(
                r#"{{"vin":"{vin}","ts":{},"seq":1,"latitude":{lat},"longitude":{lon},"speed_kmh":50.0}}"#,
                NOW - 2 * HOUR
            );
            (format!("vehicles/{vin}/rtti"), body.into_bytes())
        })
        .collect()
}

fn fleet_records() -> Vec<(String, Vec<u8>)> {
    let mut records = vec![
        charging(A, 1, NOW - 5 * DAY, "SE-A-1"),
        with(
            charging(A, 2, NOW - 6 * HOUR, "SE-A-2"),
            serde_json::json!({"remote_managed": true}),
        ),
        charging(A, 3, NOW - 5 * HOUR, "SE-A-3"),
        charging(B, 1, NOW - 3 * DAY, "SE-B-1"),
        teleservice(A, 10, NOW - 4 * DAY, "monthly"),
        teleservice(A, 11, NOW - DAY, "hv_warn"),
        teleservice(B, 5, NOW - 2 * DAY, "monthly"),
        diagnostics(A, 20, NOW - 3 * DAY),
        diagnostics(B, 21, NOW - 3 * DAY),
    ];
    records.extend(probes(100, 6, 59.3, 18.0));
    records.extend(probes(200, 2, 57.7, 11.9));
    records.extend(one_car_six_trips());
    records
}

/// One probe car, six ignition cycles in one hour and one cell: six trips,
/// one vehicle. `NOW` is hour-aligned, so all six share an hour partition.
fn one_car_six_trips() -> Vec<(String, Vec<u8>)> {
    (1..=6)
        .map(|cycle: i64| {
            let vin = "WMW11DJ04N2T00300";
            let body = format!(
                r#"{{"vin":"{vin}","ts":{},"seq":{cycle},"ignition_cycle":{cycle},"latitude":55.6,"longitude":13.0,"speed_kmh":30.0}}"#,
                NOW - 2 * HOUR + cycle * 60_000
            );
            (format!("vehicles/{vin}/rtti"), body.into_bytes())
        })
        .collect()
}

/// A stopped server's data, its vault opened, and principals, tenures and
/// grants in place.
struct Fixture {
    _dir: tempfile::TempDir,
    config: Config,
    env: AccessEnv,
}

fn principal(
    env: &AccessEnv,
    id: &str,
    kind: PrincipalKind,
    role: Option<Role>,
    eea: bool,
) -> String {
    env.add_principal(id, kind, role, eea, false, NOW)
        .expect("add principal")
}

fn grant(
    env: &AccessEnv,
    user: &str,
    to: &str,
    vin: &str,
    streams: &[&str],
    purpose: &str,
) -> Result<String, String> {
    let request = GrantRequest {
        user: user.into(),
        recipient: to.into(),
        vin: vin.into(),
        streams: streams.iter().map(|s| s.to_string()).collect(),
        purpose: purpose.into(),
        from_ms: Some(NOW - 30 * DAY),
        until_ms: None,
    };
    env.give_grant(request, NOW).map_err(|e| e.to_string())
}

async fn fixture() -> Fixture {
    let server = TestServer::start();
    let records = fleet_records();
    publish_all(server.handle.mqtt_addr(), &records).await;
    let stored = || server.handle.metrics().totals().stored;
    wait_for(|| stored() == records.len() as u64);
    let (config, dir) = server.stop();
    let privacy = PrivacyShared::open(&config).expect("vault");
    let env = AccessEnv::new(&config, Some(privacy)).expect("access env");
    for user in ["alice", "bob", "carol"] {
        principal(&env, user, PrincipalKind::User, None, false);
    }
    principal(
        &env,
        "repair",
        PrincipalKind::ThirdParty,
        Some(Role::IndependentRepair),
        true,
    );
    principal(
        &env,
        "partner",
        PrincipalKind::ThirdParty,
        Some(Role::ServicePartner),
        false,
    );
    principal(
        &env,
        "rcm",
        PrincipalKind::ThirdParty,
        Some(Role::RemoteChargeManagement),
        false,
    );
    principal(&env, "lic", PrincipalKind::Licensee, None, false);
    let transfer =
        |user: &str, vin: &str, at: i64| env.transfer(user, vin, at, NOW).expect("transfer");
    transfer("alice", A, NOW - 30 * DAY);
    transfer("carol", B, NOW - 30 * DAY);
    transfer("bob", A, SALE);
    grant(
        &env,
        "alice",
        "repair",
        A,
        &["teleservice", "diagnostics"],
        "repair_and_maintenance",
    )
    .expect("repair grant");
    grant(
        &env,
        "carol",
        "partner",
        B,
        &["teleservice"],
        "repair_and_maintenance",
    )
    .expect("partner grant");
    grant(
        &env,
        "bob",
        "rcm",
        A,
        &["charging"],
        "remote_charge_management",
    )
    .expect("rcm grant");
    Fixture {
        _dir: dir,
        config,
        env,
    }
}

/// Every cell as text ("" for NULL), row by row.
fn cells(batches: &[RecordBatch]) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    for batch in batches {
        for row in 0..batch.num_rows() {
            rows.push(
                batch
                    .columns()
                    .iter()
                    .map(|c| array_value_to_string(c, row).expect("cell"))
                    .collect(),
            );
        }
    }
    rows
}

impl Fixture {
    async fn ask(&self, who: &str, purpose: &str, sql: &str) -> Result<Vec<Vec<String>>, String> {
        let principal = self.env.principal(who).map_err(|e| e.to_string())?;
        self.env
            .query(&principal, purpose, sql, NOW)
            .await
            .map(|a| cells(&a.batches))
            .map_err(|e| e.to_string())
    }

    async fn rows(&self, who: &str, purpose: &str, sql: &str) -> Vec<Vec<String>> {
        match self.ask(who, purpose, sql).await {
            Ok(rows) => rows,
            Err(e) => panic!("{who}/{purpose}: {sql}: {e}"),
        }
    }

    /// Asserts a refusal naming `rule`.
    async fn refused(&self, who: &str, purpose: &str, sql: &str, rule: &str) {
        match self.ask(who, purpose, sql).await {
            Err(e) => assert!(
                e.starts_with("refused") && e.contains(rule),
                "{who}/{purpose}: {sql}: expected a refusal naming {rule:?}, got {e}"
            ),
            Ok(rows) => panic!("{who}/{purpose}: {sql}: answered {rows:?}, expected a refusal"),
        }
    }

    /// The operator's physical plan of `sql`, as one text.
    async fn plan(&self, sql: &str) -> String {
        self.rows("operator", "operations", &format!("EXPLAIN {sql}"))
            .await
            .concat()
            .join("\n")
    }

    /// Asserts the statement is not answered at all (refused or an error).
    async fn unanswered(&self, who: &str, purpose: &str, sql: &str) {
        if let Ok(rows) = self.ask(who, purpose, sql).await {
            panic!("{who}/{purpose}: {sql}: answered {rows:?}");
        }
    }
}

fn row(cells: &[&str]) -> Vec<String> {
    cells.iter().map(|c| c.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_policy_matrix_holds_on_real_data() {
    let f = fixture().await;
    let op = "operator";
    let ops = "operations";

    // Operator: every row, pseudonymised; encrypted fields NULL (mask)...
    assert_eq!(
        f.rows(
            op,
            ops,
            "SELECT seq, contract_number FROM charging ORDER BY ts"
        )
        .await,
        vec![
            row(&["1", ""]),
            row(&["1", ""]),
            row(&["2", ""]),
            row(&["3", ""])
        ]
    );
    f.unanswered(op, ops, "SELECT contract_number_encrypted FROM charging")
        .await;
    // ... readable only for the service purpose that needs them.
    assert_eq!(
        f.rows(
            op,
            "charge_history",
            "SELECT seq, contract_number FROM charging ORDER BY ts"
        )
        .await,
        vec![
            row(&["1", "SE-A-1"]),
            row(&["1", "SE-B-1"]),
            row(&["2", "SE-A-2"]),
            row(&["3", "SE-A-3"])
        ]
    );
    assert_eq!(
        f.rows(
            op,
            "hv_warn_call",
            "SELECT seq, contact_phone FROM teleservice ORDER BY seq"
        )
        .await,
        vec![
            row(&["5", "+46700000005"]),
            row(&["10", "+46700000010"]),
            row(&["11", "+46700000011"])
        ]
    );
    assert_eq!(
        f.rows(
            op,
            "hv_warn_call",
            "SELECT count(contract_number) FROM charging"
        )
        .await,
        vec![row(&["0"])],
        "a purpose reveals only its own fields"
    );
    f.refused(op, "economic_situation", "SELECT 1", "§9.3")
        .await;
    f.refused(op, "profiling", "SELECT 1", "Art. 6(2)(b)").await;
    f.refused(op, "marketing", "SELECT 1", "unknown").await;
    f.refused(op, "own_data_access", "SELECT 1", "not open to a operator")
        .await;

    // Users: their own vehicles, their own tenure, readable.
    let own = "own_data_access";
    let charges = "SELECT vin, seq, contract_number FROM charging ORDER BY ts";
    assert_eq!(
        f.rows("alice", own, charges).await,
        vec![row(&[A, "1", "SE-A-1"])]
    );
    assert_eq!(
        f.rows("bob", own, charges).await,
        vec![row(&[A, "2", "SE-A-2"]), row(&[A, "3", "SE-A-3"])]
    );
    assert_eq!(
        f.rows("carol", own, charges).await,
        vec![row(&[B, "1", "SE-B-1"])]
    );
    let calls = "SELECT vin, seq, contact_phone FROM teleservice ORDER BY ts";
    assert_eq!(
        f.rows("alice", own, calls).await,
        vec![row(&[A, "10", "+46700000010"])]
    );
    assert_eq!(
        f.rows("bob", own, calls).await,
        vec![row(&[A, "11", "+46700000011"])]
    );
    f.refused(
        "alice",
        own,
        "SELECT count(*) FROM rtti",
        "no vehicle identifier",
    )
    .await;
    f.refused(
        "alice",
        own,
        "SELECT count(*) FROM dead_letters",
        "operator only",
    )
    .await;
    f.refused(
        "alice",
        own,
        "SELECT count(*) FROM query_audit",
        "operator only",
    )
    .await;
    f.refused("alice", "operations", "SELECT 1", "not open to a user")
        .await;

    // Independent repair provider: alice's grant, alice's tenure only,
    // pseudonyms of its own domain, no contact data, no charging.
    let repair = "repair_and_maintenance";
    let seen = f
        .rows(
            "repair",
            repair,
            "SELECT vehicle_id, seq, contact_phone FROM teleservice ORDER BY ts",
        )
        .await;
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0][1..], row(&["10", ""])[..]);
    let internal = f
        .rows(op, ops, "SELECT DISTINCT vehicle_id FROM teleservice")
        .await;
    assert!(
        !internal.iter().any(|r| r[0] == seen[0][0]),
        "the recipient's pseudonym differs from the internal one"
    );
    assert_eq!(
        f.rows("repair", repair, "SELECT seq FROM diagnostics")
            .await,
        vec![row(&["20"])]
    );
    f.refused(
        "repair",
        repair,
        "SELECT * FROM charging",
        "never granted charging",
    )
    .await;
    f.refused(
        "repair",
        "product_improvement",
        "SELECT 1",
        "not open to a third_party",
    )
    .await;
    f.refused(
        "repair",
        "remote_charge_management",
        "SELECT * FROM teleservice",
        "no grant in force",
    )
    .await;

    // Service partner: maintenance needs of carol's vehicle, nothing else.
    let columns = f
        .rows(
            "partner",
            repair,
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'teleservice' ORDER BY ordinal_position",
        )
        .await;
    let columns: Vec<&str> = columns.iter().map(|r| r[0].as_str()).collect();
    assert_eq!(
        columns,
        [
            "vehicle_id",
            "ts",
            "trigger",
            "case_id",
            "mileage_km",
            "service_needs",
            "check_control_messages",
            "received_at",
            "date",
            "hour"
        ]
    );
    assert_eq!(
        f.rows(
            "partner",
            repair,
            "SELECT trigger, mileage_km FROM teleservice"
        )
        .await,
        vec![row(&["monthly", "5000"])]
    );

    // Remote charge management: bob's vehicle, remote-managed sessions only.
    assert_eq!(
        f.rows(
            "rcm",
            "remote_charge_management",
            "SELECT seq, remote_managed FROM charging"
        )
        .await,
        vec![row(&["2", "true"])]
    );

    // Licensee: aggregates only, groups of at least k = 5 vehicles.
    assert_eq!(
        f.rows(
            "lic",
            "traffic_information",
            "SELECT latitude_cell, longitude_cell, trips, records FROM rtti ORDER BY trips"
        )
        .await,
        vec![row(&["59.3", "18.0", "6", "6"])],
        "the 2-vehicle cell is suppressed"
    );
    // k counts vehicles, not trips: one car's six ignition cycles are one vehicle.
    assert_eq!(
        f.rows(
            "lic",
            "traffic_information",
            "SELECT count(*) FROM rtti WHERE latitude_cell < 56"
        )
        .await,
        vec![row(&["0"])],
        "six trips of one car are one vehicle, not a group of k"
    );
    assert_eq!(
        f.rows(
            "lic",
            "traffic_information",
            "SELECT vehicles, trips FROM rtti"
        )
        .await,
        vec![row(&["6", "6"])]
    );
    assert_eq!(
        f.rows(
            "lic",
            "product_improvement",
            "SELECT count(*) FROM charging"
        )
        .await,
        vec![row(&["0"])],
        "two vehicles charging make no group of five"
    );
    f.unanswered(
        "lic",
        "product_improvement",
        "SELECT vehicle_id FROM charging",
    )
    .await;
    f.unanswered("lic", "product_improvement", "SELECT latitude FROM rtti")
        .await;
    f.refused(
        "lic",
        "product_improvement",
        "SELECT * FROM dead_letters",
        "operator only",
    )
    .await;
    f.refused(
        "lic",
        "own_data_access",
        "SELECT 1",
        "not open to a licensee",
    )
    .await;
    f.refused("lic", "assets", "SELECT 1", "§9.3").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_sql_form_reaches_around_the_views() {
    let f = fixture().await;
    let own = "own_data_access";
    let data = f.config.storage.data_dir.display().to_string();
    for (sql, expected) in [
        ("SELECT count(*) FROM charging", "1"),
        (
            "SELECT count(*) FROM (SELECT * FROM charging UNION ALL SELECT * FROM charging)",
            "2",
        ),
        (
            "WITH c AS (SELECT * FROM charging) SELECT count(*) FROM c",
            "1",
        ),
        (
            "SELECT count(*) FROM charging WHERE seq IN (SELECT seq FROM charging)",
            "1",
        ),
        (
            "SELECT count(*) FROM charging c JOIN teleservice t ON c.vin = t.vin",
            "1",
        ),
        ("SELECT count(*) FROM datafusion.public.charging", "1"),
        (
            "SELECT count(*) FROM information_schema.views WHERE definition IS NOT NULL",
            "0",
        ),
    ] {
        assert_eq!(
            f.rows("alice", own, sql).await,
            vec![row(&[expected])],
            "{sql}"
        );
    }
    let tables: BTreeSet<String> = f
        .rows(
            "alice",
            own,
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'",
        )
        .await
        .into_iter()
        .map(|r| r[0].clone())
        .collect();
    assert_eq!(
        tables,
        ["charging", "diagnostics", "teleservice"]
            .map(String::from)
            .into()
    );
    // A query's session holds the tables it names; these name none as a
    // query does and still see every view.
    let shown: BTreeSet<String> = f
        .rows("alice", own, "SHOW TABLES")
        .await
        .into_iter()
        .filter(|r| r[1] == "public")
        .map(|r| r[2].clone())
        .collect();
    assert_eq!(shown, tables);
    let described = f.rows("alice", own, "DESCRIBE charging").await;
    assert!(described.iter().any(|r| r[0] == "vin"), "{described:?}");
    for who in ["alice", "repair", "lic", "operator"] {
        let purpose = match who {
            "alice" => own,
            "repair" => "repair_and_maintenance",
            "lic" => "product_improvement",
            _ => "operations",
        };
        for sql in [
            format!("COPY (SELECT * FROM teleservice) TO '{data}/copy.csv'"),
            format!("CREATE EXTERNAL TABLE raw STORED AS PARQUET LOCATION '{data}/charging/'"),
            "CREATE VIEW mine AS SELECT * FROM teleservice".to_owned(),
            "INSERT INTO teleservice SELECT * FROM teleservice".to_owned(),
            "SET datafusion.execution.batch_size = 1".to_owned(),
        ] {
            f.refused(who, purpose, &sql, "read-only").await;
        }
        // Files by path and the private decrypting function do not exist here.
        f.unanswered(who, purpose, &format!("SELECT * FROM '{data}/charging/'"))
            .await;
        f.unanswered(
            who,
            purpose,
            "SELECT fleetgate_reveal_contract_number(vehicle_id, key_epoch, contract_number) FROM charging",
        )
        .await;
        // Rows out of nothing, strings and arrays of any length, and where a
        // row sits among rows the view hides: none of these functions exists
        // here.
        for sql in [
            "SELECT count(*) FROM generate_series(1, 3)",
            "SELECT count(*) FROM range(1, 3)",
            "SELECT length(repeat('x', 3))",
            "SELECT length(lpad('x', 3))",
            "SELECT length(rpad('x', 3))",
            "SELECT cardinality(array_repeat(1, 3))",
            "SELECT cardinality(list_repeat(1, 3))",
            "SELECT cardinality(array_resize([1], 3))",
            "SELECT cardinality(range(3))",
            "SELECT cardinality(generate_series(1, 3))",
            "SELECT count(*) FROM (SELECT unnest(range(3)))",
            "SELECT input_file_name()",
            "SELECT file_row_index()",
            "WITH RECURSIVE t(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM t WHERE n < 3) SELECT count(*) FROM t",
        ] {
            f.unanswered(who, purpose, sql).await;
        }
    }
    assert!(!std::path::Path::new(&format!("{data}/copy.csv")).exists());
    f.refused(
        "alice",
        own,
        "EXPLAIN SELECT * FROM charging",
        "operator only",
    )
    .await;
    f.refused(
        "repair",
        "repair_and_maintenance",
        "EXPLAIN ANALYZE SELECT * FROM teleservice",
        "operator only",
    )
    .await;
    f.refused(
        "alice",
        own,
        "SELECT count(*) FROM datafusion.public.rtti",
        "no vehicle identifier",
    )
    .await;
    // A hidden table named anywhere in a query is refused, not left out of
    // the session it would otherwise not be named in.
    for hidden in [
        "WITH probes AS (SELECT * FROM rtti) SELECT count(*) FROM charging",
        "SELECT count(*) FROM charging WHERE seq IN (SELECT 1 FROM rtti)",
        "WITH rtti AS (SELECT * FROM rtti) SELECT count(*) FROM charging",
    ] {
        f.refused("alice", own, hidden, "no vehicle identifier")
            .await;
    }
    // Who asks and why are judged before what they wrote: an unknown
    // purpose is refused whatever the statement, even one that does not parse.
    f.refused("alice", "not_a_purpose", "SELEC nonsense FROM", "unknown")
        .await;
    assert!(
        !f.rows("operator", "operations", "EXPLAIN SELECT * FROM charging")
            .await
            .is_empty()
    );
    // A failure while running keeps its text from everyone but the operator:
    // it could quote a row outside the view.
    let failing = "SELECT seq / (seq - 10) FROM teleservice";
    let withheld = f.ask("repair", "repair_and_maintenance", failing).await;
    assert_eq!(
        withheld,
        Err("invalid: the query failed while running (details withheld)".to_owned())
    );
    let told = f.ask("operator", "operations", failing).await;
    assert!(told.is_err_and(|e| e.to_lowercase().contains("divide by zero")));
}

/// A predicate that would fail on a row outside the principal's view never
/// runs on one: the answer (or the failure) is the same whether or not such
/// a row exists, so neither an error nor its status tells a hidden row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_tell_nothing_about_rows_outside_the_view() {
    let f = fixture().await;
    let probe = |table: &str, condition: &str| {
        format!(
            "SELECT count(*) FROM {table} WHERE 1 / (CASE WHEN {condition} THEN 0 ELSE 1 END) = 1"
        )
    };
    // (principal, purpose, table, a condition only hidden rows meet, one no row meets,
    // the rows the principal sees)
    let cases = [
        // Licensee: the 2-vehicle cell at 57.7 and the one-car cell at 55.6
        // are suppressed (k = 5); the 6-vehicle cell at 59.3 is shown.
        (
            "lic",
            "traffic_information",
            "rtti",
            "latitude_cell < 58",
            "latitude_cell > 90",
            "1",
        ),
        (
            "lic",
            "product_improvement",
            "charging",
            "charging_mode = 'ac'",
            "charging_mode = 'dc'",
            "0",
        ),
        // Third party: alice's teleservice and diagnostics rows only, not
        // carol's vehicle B (seq 5, 21) nor bob's tenure (seq 11).
        (
            "repair",
            "repair_and_maintenance",
            "teleservice",
            "seq = 5 OR seq = 11",
            "seq = 999",
            "1",
        ),
        (
            "repair",
            "repair_and_maintenance",
            "diagnostics",
            "seq = 21",
            "seq = 999",
            "1",
        ),
        // User: alice held A until the sale; carol's B (diagnostics seq 21,
        // in the same hour file as A's seq 20) and bob's sessions are hidden.
        (
            "alice",
            "own_data_access",
            "diagnostics",
            "seq = 21",
            "seq = 999",
            "1",
        ),
        (
            "alice",
            "own_data_access",
            "charging",
            "seq > 1 OR contract_number = 'SE-B-1'",
            "seq > 999",
            "1",
        ),
    ];
    for (who, purpose, table, hidden_only, nothing, visible) in cases {
        for condition in [hidden_only, nothing] {
            assert_eq!(
                f.ask(who, purpose, &probe(table, condition)).await,
                Ok(vec![row(&[visible])]),
                "{who}: {table} WHERE {condition}"
            );
        }
    }
    // A predicate that cannot fail still prunes partitions inside the view:
    // charging has a file of 2026-11-19, which a one-day query does not read.
    let all = f.plan("SELECT count(*) FROM charging").await;
    assert!(
        all.contains("PolicyBarrierExec") && all.contains("date=2026-11-19"),
        "{all}"
    );
    let one_day = f
        .plan("SELECT count(*) FROM charging WHERE date = DATE '2026-11-24'")
        .await;
    assert!(!one_day.contains("date=2026-11-19"), "{one_day}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_gatekeepers_audit_and_export() {
    let f = fixture().await;
    let repair = "repair_and_maintenance";
    f.env
        .add_principal("gate", PrincipalKind::ThirdParty, None, true, true, NOW)
        .expect("add gatekeeper");
    let refusal =
        grant(&f.env, "alice", "gate", A, &["teleservice"], repair).expect_err("gatekeeper");
    assert!(refusal.contains("Art. 5(3)"), "{refusal}");
    f.env
        .add_principal(
            "far",
            PrincipalKind::ThirdParty,
            Some(Role::IndependentRepair),
            false,
            false,
            NOW,
        )
        .expect("add");
    let refusal = grant(&f.env, "alice", "far", A, &["teleservice"], repair).expect_err("not EEA");
    assert!(refusal.contains("EEA"), "{refusal}");
    let refusal =
        grant(&f.env, "carol", "repair", A, &["teleservice"], repair).expect_err("not hers");
    assert!(refusal.contains("does not hold"), "{refusal}");
    let refusal =
        grant(&f.env, "alice", "repair", A, &["teleservice"], "profiling").expect_err("purpose");
    assert!(refusal.contains("Art. 6(2)(b)"), "{refusal}");

    principal(&f.env, "dave", PrincipalKind::User, None, false);
    assert_eq!(
        f.rows(
            "dave",
            "own_data_access",
            "SELECT count(*), count(vin) FROM charging"
        )
        .await,
        vec![row(&["0", "0"])],
        "a user holding no vehicle sees nothing"
    );
    // A grant that starts in the future gives nothing yet.
    let future = GrantRequest {
        user: "bob".into(),
        recipient: "repair".into(),
        vin: A.into(),
        streams: vec!["diagnostics".into()],
        purpose: repair.into(),
        from_ms: Some(NOW + DAY),
        until_ms: None,
    };
    f.env.give_grant(future, NOW).expect("future grant");
    assert_eq!(
        f.rows("repair", repair, "SELECT seq FROM diagnostics")
            .await,
        vec![row(&["20"])],
        "alice's grant still shows her row; bob's future grant adds none"
    );
    assert_eq!(
        f.rows("repair", repair, "SELECT seq FROM teleservice")
            .await
            .len(),
        1
    );
    let refusal = f
        .env
        .revoke_grant("grant-1", Some("bob"), NOW)
        .expect_err("not bob's");
    assert!(refusal.to_string().contains("only its giver"), "{refusal}");
    assert!(
        f.env
            .revoke_grant("grant-1", Some("alice"), NOW)
            .expect("revoke")
    );
    assert!(
        !f.env
            .revoke_grant("grant-1", Some("alice"), NOW)
            .expect("again")
    );
    f.refused(
        "repair",
        repair,
        "SELECT seq FROM teleservice",
        "no grant in force",
    )
    .await;

    // Every query above is in the audit log, answered or refused, with no VIN.
    let audit = f
        .rows(
            "operator",
            "operations",
            "SELECT principal, decision, rows FROM query_audit WHERE principal = 'repair' AND tables = 'teleservice' ORDER BY decision DESC",
        )
        .await;
    assert_eq!(
        audit,
        vec![
            row(&["repair", "teleservice:filter", "1"]),
            row(&["repair", "refuse", ""])
        ]
    );
    let audit_dir = &f.config.access.audit_dir;
    let mut text = String::new();
    for entry in std::fs::read_dir(audit_dir).expect("audit dir") {
        text.push_str(&std::fs::read_to_string(entry.expect("entry").path()).expect("read"));
    }
    text.push_str(&std::fs::read_to_string(&f.config.retention.audit_file).expect("audit"));
    for secret in [A, B, "SE-A-1", "+46700000010"] {
        assert!(!text.contains(secret), "{secret} in the audit log");
    }

    // Alice's export: her rows only, readable, with metadata.
    let alice = f.env.principal("alice").expect("alice");
    let export = f.env.export(&alice, NOW).await.expect("export");
    let rows = |table: &str| {
        export
            .tables
            .iter()
            .find(|t| t.name == table)
            .map(|t| cells(&t.batches).len())
    };
    assert_eq!(
        (
            rows("charging"),
            rows("teleservice"),
            rows("diagnostics"),
            rows("rtti")
        ),
        (Some(1), Some(1), Some(1), None)
    );
    assert_eq!(export.metadata["vehicles"][0]["vin"], A);
    assert_eq!(export.metadata["tables"]["charging"]["schema_version"], 2);
    let fields = export.metadata["tables"]["charging"]["fields"]
        .as_array()
        .expect("fields");
    let energy = fields
        .iter()
        .find(|f| f["column"] == "soc_pct")
        .expect("soc_pct described");
    assert_eq!(energy["unit"], "%");
    let out = tempfile::tempdir().expect("out");
    let files = export
        .write_dir(out.path(), ExportFormat::Parquet)
        .expect("write");
    assert_eq!(files.len(), 4);
    let parquet = std::fs::File::open(out.path().join("charging.parquet")).expect("parquet");
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(parquet)
        .expect("reader")
        .build()
        .expect("build");
    let back: Vec<RecordBatch> = reader.map(|b| b.expect("batch")).collect();
    assert_eq!(cells(&back).len(), 1);
    let bob = f.env.principal("bob").expect("bob");
    assert!(f.env.export(&bob, NOW).await.is_ok());
    let op = f.env.principal("operator").expect("operator");
    assert!(
        f.env.export(&op, NOW).await.is_err(),
        "an export is a user's"
    );
    let json = f
        .env
        .export(&alice, NOW)
        .await
        .expect("export")
        .to_json()
        .expect("json");
    assert_eq!(json["tables"]["charging"][0]["contract_number"], "SE-A-1");
}

/// A grant ends at its `until`: past it the recipient reads nothing more,
/// not even the rows of the period it covered (as after a revocation).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_grant_gives_nothing_more() {
    let f = fixture().await;
    let repair = "repair_and_maintenance";
    principal(
        &f.env,
        "late",
        PrincipalKind::ThirdParty,
        Some(Role::IndependentRepair),
        true,
    );
    let request = |until_ms| GrantRequest {
        user: "alice".into(),
        recipient: "late".into(),
        vin: A.into(),
        streams: vec!["teleservice".into()],
        purpose: repair.into(),
        from_ms: Some(NOW - 30 * DAY),
        until_ms: Some(until_ms),
    };
    f.env
        .give_grant(request(NOW + DAY), NOW)
        .expect("grant in force");
    assert_eq!(
        f.rows("late", repair, "SELECT seq FROM teleservice")
            .await
            .len(),
        1
    );
    principal(
        &f.env,
        "gone",
        PrincipalKind::ThirdParty,
        Some(Role::IndependentRepair),
        true,
    );
    let ended = GrantRequest {
        recipient: "gone".into(),
        ..request(NOW - HOUR)
    };
    f.env
        .give_grant(ended, NOW - 2 * HOUR)
        .expect("grant that ended");
    f.refused(
        "gone",
        repair,
        "SELECT seq FROM teleservice",
        "no grant in force",
    )
    .await;
}

/// `POST /sql` and `GET /export` on a running server, with bearer tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_and_export_over_http() {
    let server = TestServer::start();
    let now = fleetgate::core::clock::now_ms();
    publish_all(
        server.handle.mqtt_addr(),
        &[
            charging(A, 1, now - HOUR, "SE-A-1"),
            charging(B, 1, now - HOUR, "SE-B-1"),
            teleservice(A, 7, now - HOUR, "monthly"),
        ],
    )
    .await;
    wait_for(|| server.handle.metrics().totals().stored == 3);
    let addr = server.handle.admin_addr();
    let admin = server.admin();
    let admin_token = admin.token.clone();
    let token = admin.principal(r#"{"id":"alice","kind":"user"}"#);
    let (status, body) = http_request(
        addr,
        "POST",
        "/admin/transfers",
        Some(&admin_token),
        &format!(r#"{{"user":"alice","vin":"{A}","at_ms":{}}}"#, now - DAY),
    );
    assert_eq!(status, 200, "{body}");
    let sql = r#"{"sql":"SELECT vin, contract_number FROM charging","purpose":"own_data_access"}"#;
    let (status, body) = http_request(addr, "POST", "/sql", Some(&token), sql);
    assert_eq!(status, 200, "{body}");
    let rows: serde_json::Value = serde_json::from_str(&body).expect("rows");
    assert_eq!(
        rows,
        serde_json::json!([{ "vin": A, "contract_number": "SE-A-1" }])
    );
    let csv = r#"{"sql":"SELECT vin FROM charging","purpose":"own_data_access","format":"csv"}"#;
    let (status, body) = http_request(addr, "POST", "/sql", Some(&token), csv);
    assert_eq!(
        (status, body.as_str()),
        (200, format!("vin\n{A}\n").as_str())
    );
    let ipc = r#"{"sql":"SELECT vin FROM charging","purpose":"own_data_access","format":"arrow"}"#;
    let (status, body) = http_bytes(addr, "POST", "/sql", Some(&token), ipc);
    assert_eq!(status, 200);
    let reader = arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(body), None)
        .expect("arrow stream");
    let batches: Vec<RecordBatch> = reader.map(|b| b.expect("batch")).collect();
    assert_eq!(cells(&batches), vec![row(&[A])]);
    let (status, _) = http_request(addr, "POST", "/sql", None, sql);
    assert_eq!(status, 401);
    let (status, _) = http_request(addr, "POST", "/sql", Some("fg_not_a_token"), sql);
    assert_eq!(status, 401);
    let forbidden = r#"{"sql":"SELECT 1","purpose":"economic_situation"}"#;
    let (status, body) = http_request(addr, "POST", "/sql", Some(&token), forbidden);
    assert_eq!(status, 403);
    assert!(body.contains("§9.3"), "{body}");
    // Alice grants a repair provider her teleservice data, then revokes it.
    let (status, body) = http_request(
        addr,
        "POST",
        "/admin/principals",
        Some(&admin_token),
        r#"{"id":"repair","kind":"third_party","role":"independent_repair","eea":true}"#,
    );
    assert_eq!(status, 200, "{body}");
    let repair: serde_json::Value = serde_json::from_str(&body).expect("json");
    let repair = repair["token"].as_str().expect("token").to_owned();
    let given = format!(
        r#"{{"recipient":"repair","vin":"{A}","streams":["teleservice"],"purpose":"repair_and_maintenance","from_ms":{}}}"#,
        now - DAY
    );
    let (status, body) = http_request(addr, "POST", "/grants", Some(&repair), &given);
    assert_eq!(
        status, 403,
        "a third party cannot give itself a grant: {body}"
    );
    let (status, body) = http_request(addr, "POST", "/grants", Some(&token), &given);
    assert_eq!(status, 200, "{body}");
    let id: serde_json::Value = serde_json::from_str(&body).expect("json");
    let id = id["grant"].as_str().expect("grant id").to_owned();
    let calls = r#"{"sql":"SELECT seq FROM teleservice","purpose":"repair_and_maintenance"}"#;
    let (status, body) = http_request(addr, "POST", "/sql", Some(&repair), calls);
    assert_eq!((status, body.as_str()), (200, r#"[{"seq":7}]"#));
    let (status, body) = http_request(addr, "DELETE", &format!("/grants/{id}"), Some(&token), "");
    assert_eq!(status, 200, "{body}");
    let (status, body) = http_request(addr, "POST", "/sql", Some(&repair), calls);
    assert_eq!(status, 403, "revoked at the next query: {body}");

    let (status, body) = http_request(addr, "GET", "/export", Some(&token), "");
    assert_eq!(status, 200, "{body}");
    let export: serde_json::Value = serde_json::from_str(&body).expect("export");
    assert_eq!(export["tables"]["charging"][0]["vin"], A);
    assert_eq!(export["metadata"]["user"], "alice");
    server.handle.shutdown().expect("shutdown");
}

/// The /admin routes need the admin token, from loopback too (behind a
/// same-host proxy every peer is loopback), and a principal's token is not it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_routes_need_the_admin_token() {
    use std::os::unix::fs::PermissionsExt;
    let server = TestServer::start();
    let addr = server.handle.admin_addr();
    let file = server.config.admin.token_file.clone();
    let mode = std::fs::metadata(&file)
        .expect("created at start")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let token = server.admin().token;
    assert!(token.len() >= 32);
    let sim_off = format!(r#"{{"event":"sim_deactivated","vin":"{A}"}}"#);
    let mallory = r#"{"id":"mallory","kind":"operator"}"#;
    // One character off: the last one changed to a character it is not.
    let last = if token.ends_with('0') { '1' } else { '0' };
    let wrong_one = format!("{}{last}", &token[..token.len() - 1]);
    assert_ne!(wrong_one, token);
    for wrong in [None, Some("fga_not_the_token"), Some(wrong_one.as_str())] {
        assert_eq!(
            http_request(addr, "POST", "/admin/events", wrong, &sim_off).0,
            401
        );
        assert_eq!(
            http_request(addr, "POST", "/admin/principals", wrong, mallory).0,
            401
        );
        assert_eq!(
            http_request(addr, "POST", "/admin/transfers", wrong, "{}").0,
            401
        );
        assert_eq!(
            http_request(addr, "POST", "/admin/grants", wrong, "{}").0,
            401
        );
        assert_eq!(
            http_request(addr, "DELETE", "/admin/grants/grant-1", wrong, "").0,
            401
        );
    }
    // A principal's token, even an operator's, is not the admin token.
    let (status, body) = http_request(addr, "POST", "/admin/principals", Some(&token), mallory);
    assert_eq!(status, 200, "{body}");
    let operator: serde_json::Value = serde_json::from_str(&body).expect("json");
    let operator = operator["token"].as_str().expect("token").to_owned();
    assert_eq!(
        http_request(addr, "POST", "/admin/events", Some(&operator), &sim_off).0,
        401
    );
    assert!(
        server
            .handle
            .privacy()
            .vault
            .consent(A)
            .expect("consent")
            .sim_active,
        "nothing changed"
    );
    // The right token works, and survives a restart.
    let config = server.config.clone();
    server.handle.shutdown().expect("shutdown");
    let again = fleetgate::ops::server::start(&config).expect("restart");
    let (status, body) = http_request(
        again.admin_addr(),
        "POST",
        "/admin/events",
        Some(&token),
        &sim_off,
    );
    assert_eq!(status, 200, "{body}");
    assert!(
        !again
            .privacy()
            .vault
            .consent(A)
            .expect("consent")
            .sim_active
    );
    again.shutdown().expect("shutdown");
}

/// Hostile statements get a clear 400 or 403 and the server keeps answering:
/// a statement too long or too deeply nested is refused before it is planned,
/// and an unknown purpose is neither echoed nor written to the audit whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_statements_are_bounded_and_the_server_lives() {
    let server = TestServer::start();
    let addr = server.handle.admin_addr();
    let admin = server.admin();
    let token = admin.principal(r#"{"id":"lic","kind":"licensee"}"#);
    let ask = |sql: &str, purpose: &str| {
        let request = serde_json::json!({ "sql": sql, "purpose": purpose }).to_string();
        http_request(addr, "POST", "/sql", Some(&token), &request)
    };
    let purpose = "product_improvement";
    // 300,000 terms (600 kB): over the statement size bound. Unbounded, its
    // tree overflowed the HTTP thread's stack and aborted the process.
    let (status, body) = ask(&format!("SELECT 1{}", "+1".repeat(300_000)), purpose);
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("limit") && body.contains("bytes"), "{body}");
    // 20,000 terms (40 kB) fit the size bound but have too many tokens.
    let (status, body) = ask(&format!("SELECT 1{}", "+1".repeat(20_000)), purpose);
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("limit") && body.contains("tokens"), "{body}");
    // 1,000 terms have few enough tokens but nest far too deep.
    let (status, body) = ask(&format!("SELECT 1{}", "+1".repeat(1_000)), purpose);
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("limit") && body.contains("nested"), "{body}");
    // 100 tables joined: too many for one statement.
    let tables: Vec<String> = (0..100).map(|i| format!("rtti r{i}")).collect();
    let (status, body) = ask(
        &format!("SELECT count(*) FROM {}", tables.join(", ")),
        purpose,
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("limit") && body.contains("tables"), "{body}");
    // 100 terms are answered.
    let (status, body) = ask(&format!("SELECT 1{} AS n", "+1".repeat(100)), purpose);
    assert_eq!((status, body.as_str()), (200, r#"[{"n":101}]"#));
    for sql in [
        "SELECT count(*) FROM generate_series(1, 4000000000)",
        "SELECT length(repeat('x', 2000000000))",
        "WITH RECURSIVE t(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM t) SELECT count(*) FROM t",
    ] {
        let (status, body) = ask(sql, purpose);
        assert_eq!(status, 400, "{sql}: {body}");
    }
    // A 1 MiB purpose is refused without being echoed, and kept out of the audit.
    let long_purpose = "x".repeat(1 << 20);
    let (status, body) = ask("SELECT 1", &long_purpose);
    assert_eq!(status, 403, "{body}");
    assert!(body.len() < 1_000, "the refusal echoes the purpose");
    let audited: u64 = files_under(&server.config.access.audit_dir)
        .iter()
        .map(|f| std::fs::metadata(f).expect("audit file").len())
        .sum();
    assert!(audited < 16_384, "{audited} audit bytes");
    let (status, _) = http_request(addr, "GET", "/metrics", None, "");
    assert_eq!(status, 200, "the server outlives every statement above");
    server.handle.shutdown().expect("shutdown");
}

/// An answer small as Arrow can be a large text (a long column name on
/// every row of a JSON answer): the text is held to the query memory bound
/// too, refused with a clear 400, and the Arrow answer of the same
/// statement still comes.
#[test]
fn an_answer_too_large_as_text_is_refused_with_a_limit() {
    let server = TestServer::start_with(|c| c.access.query_memory_mb = 1);
    let addr = server.handle.admin_addr();
    let token = server
        .admin()
        .principal(r#"{"id":"lic","kind":"licensee"}"#);
    let ask = |format: &str| {
        let forty: Vec<String> = (0..40).map(|i| format!("({i})")).collect();
        let values = forty.join(", ");
        // 1,600 rows of one boolean, each named by 2,000 characters: some
        // 200 bytes as Arrow, 3.2 MB as JSON.
        let sql = format!(
            "SELECT true AS \"{}\" FROM (VALUES {values}) a(v), (VALUES {values}) b(v)",
            "x".repeat(2_000)
        );
        let request =
            serde_json::json!({ "sql": sql, "purpose": "product_improvement", "format": format });
        http_bytes(addr, "POST", "/sql", Some(&token), &request.to_string())
    };
    let (status, body) = ask("json");
    let body = String::from_utf8_lossy(&body);
    assert_eq!(status, 400, "{}", &body[..body.len().min(200)]);
    assert!(
        body.contains("limit") && body.contains("query_memory_mb"),
        "{body}"
    );
    let (status, _) = ask("arrow");
    assert_eq!(status, 200);
    // As CSV the name comes once, but 262,144 rows of `true` are 1.3 MB of
    // text (32 kB of Arrow): refused the same way.
    let sixty_four: Vec<String> = (0..64).map(|i| format!("({i})")).collect();
    let values = sixty_four.join(", ");
    let sql = format!(
        "SELECT true AS t FROM (VALUES {values}) a(v), (VALUES {values}) b(v), \
         (VALUES {values}) c(v)"
    );
    let request =
        serde_json::json!({ "sql": sql, "purpose": "product_improvement", "format": "csv" });
    let (status, body) = http_request(addr, "POST", "/sql", Some(&token), &request.to_string());
    assert_eq!(status, 400, "{}", &body[..body.len().min(200)]);
    assert!(
        body.contains("limit") && body.contains("query_memory_mb"),
        "{body}"
    );
    server.handle.shutdown().expect("shutdown");
}

/// The operator's count of the hours a view keeps whole is read from the
/// log through the view's barrier, and the hours it filters row by row are
/// read; the count is the view's. A user's count of their own rows reads
/// them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_count_of_whole_hours_is_read_from_the_log() {
    let f = fixture().await;
    // charging: the hours of 2026-11-24 are within every rule, the older
    // ones are filtered by each row's time.
    let (whole, filtered) = ("date=2026-11-24", "date=2026-11-19");
    for sql in [
        "SELECT count(*) FROM charging",
        "SELECT date, hour, count(*) FROM charging GROUP BY date, hour",
    ] {
        let plan = f.plan(sql).await;
        assert!(
            plan.contains("PolicyBarrierExec") && !plan.contains(whole) && plan.contains(filtered),
            "{sql}: {plan}"
        );
    }
    // A filter on an hour: applied to each branch, above its barrier.
    let plan = f.plan("SELECT count(*) FROM charging WHERE hour = 7").await;
    assert!(
        plan.contains("PolicyBarrierExec")
            && plan.contains("partition_sizes=[1]")
            && !plan.contains(whole),
        "{plan}"
    );
    // A day of whole hours: nothing is read.
    let plan = f
        .plan("SELECT count(*) FROM charging WHERE date = DATE '2026-11-24'")
        .await;
    assert!(!plan.contains("file_type=parquet"), "{plan}");
    let plan = f.plan("SELECT count(seq) FROM charging").await;
    assert!(plan.contains(whole) && plan.contains(filtered), "{plan}");
    let op = "operator";
    let ops = "operations";
    for (all, each) in [
        (
            "SELECT count(*) FROM charging",
            "SELECT count(seq) FROM charging",
        ),
        (
            "SELECT count(*) FROM charging WHERE date = DATE '2026-11-24'",
            "SELECT count(seq) FROM charging WHERE date = DATE '2026-11-24'",
        ),
        (
            "SELECT count(*) FROM charging WHERE hour = 7",
            "SELECT count(seq) FROM charging WHERE hour = 7",
        ),
        (
            "SELECT date, hour, count(*) FROM charging GROUP BY date, hour ORDER BY date, hour",
            "SELECT date, hour, count(seq) FROM charging GROUP BY date, hour ORDER BY date, hour",
        ),
    ] {
        let counted = f.rows(op, ops, all).await;
        assert!(!counted.is_empty() && counted != vec![row(&["0"])], "{all}");
        assert_eq!(counted, f.rows(op, ops, each).await, "{all}");
    }
    let own = "own_data_access";
    let all = "SELECT count(*) FROM charging";
    assert_eq!(f.rows("alice", own, all).await, vec![row(&["1"])]);
    // Other aggregates by hour run over runs of rows, above the barrier,
    // with the hash aggregate's answers, for the operator and for a user.
    let by = |key: &str| {
        format!(
            "SELECT date, {key}, count(seq), max(seq), avg(seq) FROM charging \
             GROUP BY date, {key} ORDER BY 1, 2"
        )
    };
    let plan = f.plan(&by("hour")).await;
    assert!(
        plan.contains("RunAggregateExec") && plan.contains("PolicyBarrierExec"),
        "{plan}"
    );
    for (who, purpose) in [(op, ops), ("alice", own)] {
        let runs = f.rows(who, purpose, &by("hour")).await;
        assert!(!runs.is_empty(), "{who}");
        assert_eq!(runs, f.rows(who, purpose, &by("hour + 0")).await, "{who}");
    }
}

/// A query over its memory gets a clear error, and one over its time is
/// cancelled with a clear error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_are_bounded_in_memory_and_time() {
    let mut f = fixture().await;
    let (op, ops) = ("operator", "operations");
    // Teleservice has 3 rows: n of them cross-joined make 3^n.
    let joined = |n: usize| {
        (0..n)
            .map(|i| format!("teleservice t{i}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let key = |n: usize| {
        let parts: Vec<String> = (0..n).map(|i| format!("t{i}.seq")).collect();
        format!("concat({})", parts.join(", '-', "))
    };
    f.env.settings.query_memory_mb = 1;
    // 3^10 distinct strings in a hash table: far over 1 MiB.
    let distinct = format!("SELECT count(DISTINCT {}) FROM {}", key(10), joined(10));
    let e = f.ask(op, ops, &distinct).await.expect_err("over 1 MiB");
    assert!(e.starts_with("limit: resources exhausted"), "{e}");
    // An answer of 3^10 rows is over 1 MiB too.
    let rows = format!("SELECT {} FROM {}", key(10), joined(10));
    let e = f.ask(op, ops, &rows).await.expect_err("over 1 MiB");
    assert!(e.starts_with("limit: resources exhausted"), "{e}");
    // 3^20 rows take far longer than 200 ms: cancelled.
    f.env.settings.query_memory_mb = 256;
    f.env.settings.query_timeout_ms = 200;
    let slow = format!("SELECT count(*) FROM {}", joined(20));
    let e = f.ask(op, ops, &slow).await.expect_err("cancelled");
    assert!(e.starts_with("limit") && e.contains("cancelled"), "{e}");
    // The cancelled query gave its turn back: with the default timeout again,
    // a small query is answered.
    f.env.settings.query_timeout_ms = fleetgate::config::AccessConfig::default().query_timeout_ms;
    assert_eq!(
        f.rows(op, ops, "SELECT count(*) FROM teleservice").await,
        vec![row(&["3"])]
    );
}

/// Rows a legal hold keeps past their rule reach the operator only: a hold
/// preserves evidence, it gives no one else access.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_rows_past_their_rule_reach_the_operator_only() {
    use fleetgate::lifecycle::events::{self, EventRequest, VehicleEvent};
    let f = fixture().await;
    let privacy = f.env.privacy.clone().expect("vault");
    let hold = EventRequest {
        event: VehicleEvent::LegalHoldPlaced,
        vin: A.into(),
        consent: None,
        id: Some("LH-1".into()),
        case_id: None,
    };
    events::apply(&privacy, &f.env.lifecycle, &hold, NOW).expect("hold");
    // A's remote-managed session (seq 2, NOW - 6 h) is past its one-day rule.
    let later = NOW + 2 * DAY;
    let ask = |who: &'static str, purpose: &'static str| {
        let env = &f.env;
        async move {
            let principal = env.principal(who).expect("principal");
            let sql = "SELECT seq FROM charging WHERE remote_managed";
            cells(
                &env.query(&principal, purpose, sql, later)
                    .await
                    .expect("answer")
                    .batches,
            )
        }
    };
    assert_eq!(
        ask("rcm", "remote_charge_management").await,
        Vec::<Vec<String>>::new(),
        "the recipient's grant does not reach past the rule"
    );
    assert_eq!(
        ask("bob", "own_data_access").await,
        Vec::<Vec<String>>::new()
    );
    assert_eq!(ask("operator", "operations").await, vec![row(&["2"])]);
}

/// A sale ends the seller's tenure and every grant of the vehicle at the
/// event: the seller and the seller's grantee see none of the buyer's
/// rows, back-dated ones included; the buyer, registered after the event,
/// does. A change of hands cannot default to "now" while someone holds
/// the vehicle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sale_ends_the_sellers_tenure_and_grants_at_the_event() {
    let server = TestServer::start();
    let (addr, mqtt) = (server.handle.admin_addr(), server.handle.mqtt_addr());
    let now = fleetgate::core::clock::now_ms();
    let admin_token = server.admin().token;
    let admin = Some(admin_token.as_str());
    let registrar = server.admin();
    let token = |body: &str| registrar.principal(body);
    let alice = token(r#"{"id":"alice","kind":"user"}"#);
    let bob = token(r#"{"id":"bob","kind":"user"}"#);
    let repair =
        token(r#"{"id":"repair","kind":"third_party","role":"independent_repair","eea":true}"#);
    let transfer = |body: String| http_request(addr, "POST", "/admin/transfers", admin, &body);
    let (status, body) = transfer(format!(
        r#"{{"user":"alice","vin":"{A}","at_ms":{}}}"#,
        now - DAY
    ));
    assert_eq!(status, 200, "{body}");
    publish_all(
        mqtt,
        &[
            charging(A, 1, now - HOUR, "SE-A-1"),
            teleservice(A, 1, now - HOUR, "monthly"),
        ],
    )
    .await;
    wait_for(|| server.handle.metrics().totals().stored == 2);
    let given = format!(
        r#"{{"recipient":"repair","vin":"{A}","streams":["teleservice"],"purpose":"repair_and_maintenance","from_ms":{}}}"#,
        now - DAY
    );
    let (status, body) = http_request(addr, "POST", "/grants", Some(&alice), &given);
    assert_eq!(status, 200, "{body}");
    let calls = r#"{"sql":"SELECT seq FROM teleservice","purpose":"repair_and_maintenance"}"#;
    let (status, body) = http_request(addr, "POST", "/sql", Some(&repair), calls);
    assert_eq!((status, body.as_str()), (200, r#"[{"seq":1}]"#));
    // Registered without its time, a change of hands would run Alice's
    // tenure up to now, over the buyer's rows.
    let (status, body) = transfer(format!(r#"{{"user":"bob","vin":"{A}"}}"#));
    assert_eq!(status, 400, "{body}");

    let (status, body) = http_request(
        addr,
        "POST",
        "/admin/events",
        admin,
        &format!(r#"{{"event":"vehicle_sold","vin":"{A}"}}"#),
    );
    assert_eq!(status, 200, "{body}");
    // The buyer's car: a row now, and two back-dated into Alice's tenure.
    publish_all(
        mqtt,
        &[
            charging(A, 2, now, "SE-BUYER-2"),
            charging(A, 3, now - 2 * HOUR, "SE-BUYER-3"),
            teleservice(A, 2, now - 2 * HOUR, "monthly"),
        ],
    )
    .await;
    wait_for(|| server.handle.metrics().totals().stored == 5);
    let mine = r#"{"sql":"SELECT vin, contract_number FROM charging","purpose":"own_data_access"}"#;
    let (status, body) = http_request(addr, "POST", "/sql", Some(&alice), mine);
    assert_eq!(
        (status, body.as_str()),
        (200, "[]"),
        "the seller sees none of the buyer's rows"
    );
    let (status, body) = http_request(addr, "POST", "/sql", Some(&repair), calls);
    assert_eq!(status, 403, "Alice's grant ended with the sale: {body}");
    // After the event nobody holds the vehicle: the buyer is registered
    // from when it changed hands.
    let (status, body) = transfer(format!(
        r#"{{"user":"bob","vin":"{A}","at_ms":{}}}"#,
        now - HOUR / 2
    ));
    assert_eq!(status, 200, "{body}");
    let (status, body) = http_request(addr, "POST", "/sql", Some(&bob), mine);
    assert_eq!(status, 200, "{body}");
    let rows: serde_json::Value = serde_json::from_str(&body).expect("rows");
    assert_eq!(
        rows,
        serde_json::json!([{ "vin": A, "contract_number": "SE-BUYER-2" }])
    );
    let (status, body) = http_request(addr, "POST", "/sql", Some(&alice), mine);
    assert_eq!((status, body.as_str()), (200, "[]"), "still none");
    server.handle.shutdown().expect("shutdown");
}

/// An answer counts as one of its principal's running requests until it is
/// dropped, so a client that fetches answers and never reads them (a stalled
/// Flight SQL stream) holds at most `access.max_queries_per_principal`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_not_yet_dropped_count_against_the_principals_limit() {
    let (config, _dir) = TestServer::start().stop();
    let env = AccessEnv::new(&config, None).expect("access env");
    let operator = env.principal("operator").expect("operator");
    let ask = || env.query(&operator, "operations", "SELECT 1", NOW);
    let first = ask().await.expect("first");
    let _second = ask().await.expect("second");
    let third = ask().await;
    assert!(
        matches!(&third, Err(e) if e.to_string().contains("max_queries_per_principal")),
        "{third:?}"
    );
    drop(first);
    ask().await.expect("a dropped answer frees its turn");
}

/// A user's account page reads the whole query audit and runs a scan per
/// grant: it counts as one of the user's requests like a query, so a user
/// cannot run any number of them at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_page_counts_against_the_principals_limit() {
    let (config, _dir) = TestServer::start().stop();
    let privacy = PrivacyShared::open(&config).expect("vault");
    let env = AccessEnv::new(&config, Some(privacy)).expect("access env");
    env.add_principal("alice", PrincipalKind::User, None, false, false, NOW)
        .expect("alice");
    let alice = env.principal("alice").expect("alice");
    env.account(&alice, NOW).await.expect("an account page");
    let own = "own_data_access";
    let _first = env
        .query(&alice, own, "SELECT 1", NOW)
        .await
        .expect("first");
    let _second = env
        .query(&alice, own, "SELECT 1", NOW)
        .await
        .expect("second");
    let third = env.account(&alice, NOW).await;
    assert!(
        matches!(&third, Err(e) if e.to_string().contains("max_queries_per_principal")),
        "{third:?}"
    );
}
