//! Vehicle events through the admin HTTP API: consent and SIM changes take
//! effect on the next record, a sale crypto-shreds the vehicle, a closed
//! case, an ended session and a completed analysis hide their rows at once
//! and the sweep deletes them from disk; every event is idempotent,
//! survives a restart and is audited without the VIN, bad events are
//! refused with their reason, and a legal hold keeps rows and blocks
//! erasure until it is released.

mod common;

use std::sync::atomic::Ordering::Relaxed;

use common::*;
use fleetgate::metrics::PolicyDrop;
use fleetgate::schema::Stream;

fn event(admin: &Admin, body: &str) -> (u16, String) {
    admin.post("/admin/events", body)
}

/// Sends an event that must be refused with `status`, saying `reason`.
fn refused(admin: &Admin, body: &str, status: u16, reason: &str) {
    let (got, answer) = event(admin, body);
    assert_eq!(got, status, "{answer}");
    assert!(answer.contains(reason), "{answer}");
}

/// Applies an event that must succeed; returns the answer.
fn accepted(admin: &Admin, body: &str) -> String {
    let (status, answer) = event(admin, body);
    assert_eq!(status, 200, "{answer}");
    answer
}

fn smart_maintenance_call(vin: &str, seq: u64) -> Message {
    let fields = serde_json::json!({ "trigger": "smart_maintenance" });
    record(vin, Stream::Teleservice, seq, TEST_NOW_MS, fields)
}

/// A vehicle whose records are all refused by policy gets no key in the
/// vault: nothing of it is stored that a key would pseudonymise, so the
/// vault does not learn that it ever published. Its first stored record
/// creates the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vehicle_whose_records_are_all_refused_gets_no_key() {
    let server = TestServer::start();
    let mqtt = server.handle.mqtt_addr();
    let metrics = server.handle.metrics().clone();
    let teleservice = || metrics.stream(Stream::Teleservice);
    let vault = &server.handle.privacy().vault;

    publish_all(mqtt, &[smart_maintenance_call(B, 1)]).await;
    wait_for(|| {
        teleservice()
            .dropped_by_policy
            .get(PolicyDrop::ConsentSmartMaintenance)
            == 1
    });
    assert_eq!(vault.get(B).expect("vault"), None, "refused: no key");

    let stored = record(
        B,
        Stream::Teleservice,
        2,
        TEST_NOW_MS,
        serde_json::json!({}),
    );
    publish_all(mqtt, &[stored]).await;
    wait_for(|| vault.get(B).expect("vault").is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_change_collection_erase_vehicles_and_are_audited() {
    let server = TestServer::start();
    let admin = &server.admin();
    let mqtt = server.handle.mqtt_addr();
    let metrics = server.handle.metrics().clone();
    let teleservice = || metrics.stream(Stream::Teleservice);

    // Without consent a Smart Maintenance call is dropped by policy.
    publish_all(mqtt, &[smart_maintenance_call(A, 1)]).await;
    wait_for(|| {
        teleservice()
            .dropped_by_policy
            .get(PolicyDrop::ConsentSmartMaintenance)
            == 1
    });

    let given =
        r#"{"event":"consent_given","vin":"WMW11DJ04N2T00001","consent":"smart_maintenance"}"#;
    let (status, body) = event(admin, given);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("smart_maintenance=true"), "{body}");
    assert_eq!(event(admin, given).0, 200, "idempotent");
    publish_all(mqtt, &[smart_maintenance_call(A, 2)]).await;
    wait_for(|| teleservice().table.rows_stored.load(Relaxed) == 1);

    // SIM off: collection stops; on again: it resumes.
    accepted(
        admin,
        r#"{"event":"sim_deactivated","vin":"WMW11DJ04N2T00001"}"#,
    );
    publish_all(mqtt, &[smart_maintenance_call(A, 3)]).await;
    wait_for(|| {
        teleservice()
            .dropped_by_policy
            .get(PolicyDrop::SimDeactivated)
            == 1
    });
    accepted(
        admin,
        r#"{"event":"sim_activated","vin":"WMW11DJ04N2T00001"}"#,
    );
    publish_all(mqtt, &[smart_maintenance_call(A, 4)]).await;
    wait_for(|| teleservice().table.rows_stored.load(Relaxed) == 2);

    // A sale crypto-shreds the vehicle; a second one finds nothing left.
    let sold = r#"{"event":"vehicle_sold","vin":"WMW11DJ04N2T00001"}"#;
    let (status, body) = event(admin, sold);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("secrets erased"), "{body}");
    let (status, body) = event(admin, sold);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("nothing to erase"), "{body}");
    assert!(
        server
            .handle
            .privacy()
            .vault
            .get(A)
            .expect("vault")
            .is_none()
    );

    // Refusals, each with its reason.
    refused(
        admin,
        r#"{"event":"vehicle_sold","vin":"NOT-A-VIN"}"#,
        400,
        "not a VIN",
    );
    refused(
        admin,
        r#"{"event":"consent_given","vin":"WMW11DJ04N2T00001"}"#,
        400,
        "needs `consent`",
    );
    refused(
        admin,
        r#"{"event":"case_closed","vin":"WMW11DJ04N2T00001"}"#,
        400,
        "needs `id`",
    );
    assert_ne!(
        event(admin, r#"{"event":"teleported","vin":"WMW11DJ04N2T00001"}"#).0,
        200
    );

    // B's consent outlives a restart.
    let given_b =
        r#"{"event":"consent_given","vin":"WMW21GD07P2S00002","consent":"product_quality"}"#;
    assert_eq!(event(admin, given_b).0, 200);
    let config = server.config.clone();
    server.handle.shutdown().expect("shutdown");
    let restarted = fleetgate::ops::server::start(&config).expect("restart");
    let consent = restarted.privacy().vault.consent(B).expect("consent");
    assert!(consent.product_quality && consent.sim_active);
    restarted.shutdown().expect("shutdown");

    // The audit log: one line per applied event, in order, without a VIN.
    let audit = std::fs::read_to_string(&config.retention.audit_file).expect("audit log");
    let events: Vec<String> = audit
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("JSON line"))
        .map(|v| v["event"].as_str().expect("event").to_owned())
        .collect();
    assert_eq!(
        events,
        [
            "consent_given",
            "consent_given",
            "sim_deactivated",
            "sim_activated",
            "vehicle_sold",
            "vehicle_sold",
            "consent_given"
        ]
    );
    assert!(!audit.contains(A) && !audit.contains(B), "{audit}");
}

/// Vehicle A's record on `stream`, stamped at the tests' clock.
fn a_record(stream: Stream, seq: u64, fields: serde_json::Value) -> Message {
    record(A, stream, seq, TEST_NOW_MS, fields)
}

/// The `seq` column of `table` as a session with `rules` sees it.
async fn seqs(
    data: &std::path::Path,
    table: &str,
    rules: &fleetgate::lifecycle::retention::Retention,
) -> Vec<i64> {
    let registry = fleetgate::schema::Registry::load().expect("schemas");
    let ctx = fleetgate::query::session_at(data, &registry, rules, TEST_NOW_MS)
        .await
        .expect("session");
    let sql = format!("SELECT seq FROM {table} ORDER BY seq");
    let batches = fleetgate::query::run(&ctx, &sql).await.expect("query");
    batches
        .iter()
        .flat_map(|b| {
            let seq = b
                .column(0)
                .as_any()
                .downcast_ref::<arrow::array::Int64Array>()
                .expect("seq");
            seq.values().to_vec()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_events_hide_their_rows_at_once_and_the_sweep_deletes_them() {
    use fleetgate::lifecycle::retention::{self, Retention};
    let server = TestServer::start();
    let messages = vec![
        a_record(
            Stream::Teleservice,
            1,
            serde_json::json!({"trigger":"event","case_id":"CASE-1"}),
        ),
        a_record(
            Stream::Teleservice,
            2,
            serde_json::json!({"trigger":"roadside","case_id":"CASE-1"}),
        ),
        a_record(
            Stream::Teleservice,
            3,
            serde_json::json!({"trigger":"event","case_id":"CASE-2"}),
        ),
        a_record(
            Stream::Teleservice,
            4,
            serde_json::json!({"trigger":"monthly"}),
        ),
        a_record(
            Stream::Charging,
            1,
            serde_json::json!({"session_id": "S1", "event": "start", "started_at": TEST_NOW_MS, "remote_managed": true}),
        ),
        a_record(
            Stream::Charging,
            2,
            serde_json::json!({"session_id": "S1", "event": "start", "started_at": TEST_NOW_MS, "remote_managed": false}),
        ),
        a_record(
            Stream::Charging,
            3,
            serde_json::json!({"session_id": "S2", "event": "start", "started_at": TEST_NOW_MS, "remote_managed": true}),
        ),
        a_record(
            Stream::Diagnostics,
            1,
            serde_json::json!({"ecu":"BMS","severity":"warning","analysis_id":"AN-1"}),
        ),
        a_record(
            Stream::Diagnostics,
            2,
            serde_json::json!({"ecu":"DME","severity":"info"}),
        ),
    ];
    publish_all(server.handle.mqtt_addr(), &messages).await;
    let admin = &server.admin();
    for body in [
        r#"{"event":"case_closed","vin":"WMW11DJ04N2T00001","id":"CASE-1"}"#,
        r#"{"event":"case_closed","vin":"WMW11DJ04N2T00001","id":"CASE-1"}"#,
        r#"{"event":"charging_session_ended","vin":"WMW11DJ04N2T00001","id":"S1"}"#,
        r#"{"event":"analysis_completed","vin":"WMW11DJ04N2T00001","id":"AN-1"}"#,
    ] {
        let answer = accepted(admin, body);
        assert!(answer.contains("hidden now"), "{answer}");
    }
    let files = fleetgate::lifecycle::requests::LifecycleState::new(&server.config.retention, None);
    let data = server.data_dir();
    server.handle.shutdown().expect("shutdown");

    let registry = fleetgate::schema::Registry::load().expect("schemas");
    let rules = Retention::load(None, &registry).expect("rules");
    let pending = fleetgate::lifecycle::requests::load(&files.requests).expect("requests");
    assert_eq!(pending.len(), 3, "a request recorded twice is kept once");
    let with_requests = rules.clone().with_requests(pending);
    // Hidden from the moment the event was recorded; rows with no case,
    // other sessions and the session's charge history stay.
    assert_eq!(seqs(&data, "teleservice", &with_requests).await, vec![3, 4]);
    assert_eq!(seqs(&data, "charging", &with_requests).await, vec![2, 3]);
    assert_eq!(seqs(&data, "diagnostics", &with_requests).await, vec![2]);
    // Still on disk until the sweep.
    assert_eq!(seqs(&data, "teleservice", &rules).await, vec![1, 2, 3, 4]);

    let run = retention::SweepRun {
        now_ms: TEST_NOW_MS,
        vacuum_grace_ms: 60_000,
        max_clock_skew_ms: 86_400_000,
        dry_run: false,
        unstored_since_ms: None,
    };
    let deleted = retention::sweep(
        &fleetgate::store::StoreRoot::local(&data).expect("root"),
        &with_requests,
        run,
    )
    .expect("sweep");
    retention::audit(&files.audit_file, TEST_NOW_MS, &deleted).expect("audit");
    fleetgate::lifecycle::requests::retire(&files.requests, with_requests.requests())
        .expect("retire");
    let reasons: Vec<(String, u64)> = deleted
        .iter()
        .map(|d| (d.rules.join(","), d.rows))
        .collect();
    assert!(
        reasons.contains(&("case_closed".to_owned(), 2)),
        "{reasons:?}"
    );
    assert!(
        reasons.contains(&("charging_session_ended".to_owned(), 1)),
        "{reasons:?}"
    );
    assert!(
        reasons.contains(&("analysis_completed".to_owned(), 1)),
        "{reasons:?}"
    );
    // Gone from disk: the files no longer hold them, whatever the view.
    assert_eq!(seqs(&data, "teleservice", &rules).await, vec![3, 4]);
    assert_eq!(seqs(&data, "charging", &rules).await, vec![2, 3]);
    assert_eq!(seqs(&data, "diagnostics", &rules).await, vec![2]);
    assert!(
        fleetgate::lifecycle::requests::load(&files.requests)
            .expect("requests")
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_legal_hold_keeps_rows_and_blocks_erasure_until_released() {
    use fleetgate::lifecycle::retention::{self, Retention};
    let server = TestServer::start();
    let messages = vec![
        a_record(
            Stream::Teleservice,
            1,
            serde_json::json!({"trigger":"event","case_id":"CASE-9"}),
        ),
        a_record(
            Stream::Teleservice,
            2,
            serde_json::json!({"trigger":"monthly"}),
        ),
        a_record(
            Stream::Diagnostics,
            1,
            serde_json::json!({"ecu":"DME","severity":"info"}),
        ),
        a_record(
            Stream::Charging,
            1,
            serde_json::json!({"session_id": "S9", "event": "start", "started_at": TEST_NOW_MS}),
        ),
    ];
    publish_all(server.handle.mqtt_addr(), &messages).await;
    let admin = &server.admin();
    let placed = accepted(
        admin,
        r#"{"event":"legal_hold_placed","vin":"WMW11DJ04N2T00001","id":"LH-1"}"#,
    );
    assert!(placed.contains("legal hold placed"), "{placed}");
    refused(
        admin,
        r#"{"event":"erasure_requested","vin":"WMW11DJ04N2T00001"}"#,
        409,
        "LH-1",
    );
    accepted(
        admin,
        r#"{"event":"case_closed","vin":"WMW11DJ04N2T00001","id":"CASE-9"}"#,
    );
    accepted(
        admin,
        r#"{"event":"charge_history_off","vin":"WMW11DJ04N2T00001"}"#,
    );
    let config = server.config.clone();
    let data = server.data_dir();
    server.handle.shutdown().expect("shutdown");

    let files = &fleetgate::lifecycle::requests::LifecycleState::new(&config.retention, None);
    let rules = || {
        let registry = fleetgate::schema::Registry::load().expect("schemas");
        Retention::load(None, &registry)
            .expect("rules")
            .with_requests(fleetgate::lifecycle::requests::load(&files.requests).expect("requests"))
            .with_holds(&fleetgate::lifecycle::requests::load_holds(&files.holds).expect("holds"))
    };
    let sweep = |rules: &Retention, now_ms: i64| {
        let run = retention::SweepRun {
            now_ms,
            vacuum_grace_ms: 60_000,
            max_clock_skew_ms: 86_400_000,
            dry_run: false,
            unstored_since_ms: None,
        };
        let deleted = retention::sweep(
            &fleetgate::store::StoreRoot::local(&data).expect("root"),
            rules,
            run,
        )
        .expect("sweep");
        fleetgate::lifecycle::requests::retire(&files.requests, &rules.completed_by_sweep())
            .expect("retire");
        deleted
    };
    // Two years on, past every rule and past the requests: the hold keeps everything.
    let later = TEST_NOW_MS + 730 * 86_400_000;
    let held = rules();
    let seqs_at = |table: &'static str, rules: Retention| {
        let data = data.clone();
        async move {
            let registry = fleetgate::schema::Registry::load().expect("schemas");
            let ctx = fleetgate::query::session_at(&data, &registry, &rules, later)
                .await
                .expect("session");
            let sql = format!("SELECT count(*) FROM {table}");
            first_integer(&fleetgate::query::run(&ctx, &sql).await.expect("query"))
        }
    };
    assert_eq!(seqs_at("teleservice", held.clone()).await, 2);
    assert_eq!(seqs_at("diagnostics", held.clone()).await, 1);
    assert_eq!(seqs_at("charging", held.clone()).await, 1);
    let deleted = sweep(&held, later);
    assert!(deleted.is_empty(), "nothing held is deleted: {deleted:?}");
    assert_eq!(
        fleetgate::lifecycle::requests::load(&files.requests)
            .expect("requests")
            .len(),
        2,
        "requests wait"
    );

    // Released (on a restarted server): erasure goes through, and the sweep deletes.
    let restarted = fleetgate::ops::server::start(&config).expect("restart");
    let again = Admin::new(restarted.admin_addr(), &config);
    let released = accepted(
        &again,
        r#"{"event":"legal_hold_released","vin":"WMW11DJ04N2T00001","id":"LH-1"}"#,
    );
    assert!(released.contains("legal hold released"), "{released}");
    accepted(
        &again,
        r#"{"event":"erasure_requested","vin":"WMW11DJ04N2T00001"}"#,
    );
    restarted.shutdown().expect("shutdown");
    let free = rules();
    assert_eq!(seqs_at("teleservice", free.clone()).await, 0);
    let deleted = sweep(&free, later);
    assert!(!deleted.is_empty());
    assert!(
        fleetgate::lifecycle::requests::load(&files.requests)
            .expect("requests")
            .is_empty()
    );
    for table in ["teleservice", "diagnostics", "charging"] {
        assert!(
            !files_under(&data.join(table))
                .iter()
                .any(|p| is_data_file(p)),
            "{table} rows are gone from disk"
        );
    }
}

/// Rows a legal hold kept past their rule go at the server's next sweep
/// after the hold's release, though the sweep's window passed their hour
/// long ago.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_a_released_hold_kept_past_their_rule_go_at_the_next_sweep() {
    let server = TestServer::start_with(|c| c.retention.sweep_interval_secs = 1);
    let admin = &server.admin();
    accepted(
        admin,
        &format!(r#"{{"event":"legal_hold_placed","vin":"{A}","id":"LH-1"}}"#),
    );
    let ts = fleetgate::core::clock::now_ms() - 3 * 86_400_000;
    let charging = |seq: u64, remote: bool| {
        (
            format!("vehicles/{A}/charging"),
            format!(
                r#"{{"vin":"{A}","ts":{ts},"seq":{seq},"session_id":"S{seq}","event":"start","started_at":{ts},"remote_managed":{remote}}}"#
            )
            .into_bytes(),
        )
    };
    publish_all(
        server.handle.mqtt_addr(),
        &[charging(1, true), charging(2, false)],
    )
    .await;
    let metrics = server.handle.metrics().clone();
    let charging = || &metrics.stream(Stream::Charging).table;
    let rtti = || &metrics.stream(Stream::Rtti).table;
    wait_for(|| charging().rows_stored.load(Relaxed) == 2);
    // Written long ago, as far as the sweep can tell: only the release
    // can make it look at this partition again.
    let partition = files_under(&server.data_dir().join("charging"))[0]
        .parent()
        .expect("partition")
        .to_owned();
    std::fs::File::open(&partition)
        .expect("partition dir")
        .set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(3600))
        .expect("mtime");
    // An expired probe the hold does not cover: once it is gone, a sweep
    // has run (and kept the held rows).
    publish_all(server.handle.mqtt_addr(), &[rtti_probe(A, ts)]).await;
    wait_for(|| rtti().rows_expired.load(Relaxed) == 1);
    assert_eq!(charging().rows_expired.load(Relaxed), 0, "held");
    accepted(
        admin,
        &format!(r#"{{"event":"legal_hold_released","vin":"{A}","id":"LH-1"}}"#),
    );
    // The remote-managed session is past its one-day rule; the charge
    // history row is kept for a year.
    wait_for(|| charging().rows_expired.load(Relaxed) == 1);
    server.handle.shutdown().expect("shutdown");
}

/// Switching the charge history off deletes its rows and stops it: a
/// charging record the vehicle sends afterwards is dropped by policy, not
/// stored (and kept for its rule once the deletion request has retired);
/// switched on again, the next one is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_charge_history_switched_off_stores_no_charging_record() {
    let server = TestServer::start();
    let admin = &server.admin();
    let mqtt = server.handle.mqtt_addr();
    let metrics = server.handle.metrics().clone();
    let charging_counters = || metrics.stream(Stream::Charging);
    let off = accepted(
        admin,
        r#"{"event":"charge_history_off","vin":"WMW11DJ04N2T00001"}"#,
    );
    assert!(off.contains("charge_history_on"), "{off}");
    publish_all(mqtt, &[charging(A, 1, TEST_NOW_MS, "SE-A-1")]).await;
    wait_for(|| charging_counters().records_received.load(Relaxed) == 1);
    wait_for(|| metrics.totals().dropped == 1);
    assert_eq!(charging_counters().table.rows_stored.load(Relaxed), 0);

    let on = accepted(
        admin,
        r#"{"event":"charge_history_on","vin":"WMW11DJ04N2T00001"}"#,
    );
    assert!(on.contains("charge_history=true"), "{on}");
    publish_all(mqtt, &[charging(A, 2, TEST_NOW_MS, "SE-A-2")]).await;
    wait_for(|| charging_counters().table.rows_stored.load(Relaxed) == 1);
    assert_eq!(
        charging_counters()
            .dropped_by_policy
            .get(PolicyDrop::ChargeHistoryOff),
        1
    );
    server.handle.shutdown().expect("shutdown");
}
