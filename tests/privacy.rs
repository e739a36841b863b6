//! The privacy model end to end: consent gates and SIM deactivation drop
//! records by policy (counted, not dead-lettered), pseudonyms rotate with
//! the key epoch, and erasing a vehicle's vault secrets unlinks its stored
//! rows from its VIN and makes its encrypted fields unreadable, while other
//! vehicles are unaffected.

mod common;

use common::*;
use fleetgate::core::consent::Consent;
use fleetgate::schema::Stream;

/// 2026-11-24T06:00:00Z and one key epoch (30 days) earlier.
const NOW: i64 = 1_795_500_000_000;
const EPOCH_EARLIER: i64 = NOW - 30 * 86_400_000;

/// A stream's records dropped by policy, by reason, from the shutdown totals.
fn dropped_by_policy(
    totals: &fleetgate::metrics::MetricsSnapshot,
    stream: Stream,
) -> Vec<(&'static str, u64)> {
    totals
        .streams
        .iter()
        .find(|s| s.stream == stream.name())
        .expect("stream")
        .dropped_by_policy
        .clone()
}

fn strings(batches: &[arrow::array::RecordBatch], column: usize) -> Vec<String> {
    batches
        .iter()
        .flat_map(|b| {
            let a = b.column(column);
            (0..a.len())
                .map(|i| arrow::util::display::array_value_to_string(a, i).expect("cell"))
                .collect::<Vec<_>>()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consent_and_sim_state_decide_what_is_stored() {
    let server = TestServer::start();
    let privacy = server.handle.privacy().clone();
    let opted_in = Consent {
        smart_maintenance: true,
        ..Consent::default()
    };
    privacy.set_consent(A, opted_in).expect("consent");
    let deactivated = Consent {
        sim_active: false,
        ..Consent::default()
    };
    privacy.set_consent(B, deactivated).expect("sim off");
    publish_all(
        server.handle.mqtt_addr(),
        &[
            teleservice(A, 1, NOW, "smart_maintenance"),
            teleservice(A, 2, NOW, "monthly"),
            teleservice(B, 3, NOW, "monthly"),
            diagnostics(B, 4, NOW),
        ],
    )
    .await;
    let data = server.data_dir();
    let totals = server.handle.shutdown().expect("shutdown");
    assert_eq!(count(&data, "SELECT count(*) FROM teleservice").await, 2);
    assert_eq!(
        count(&data, "SELECT count(*) FROM teleservice WHERE seq >= 3").await,
        0
    );
    assert_eq!(count(&data, "SELECT count(*) FROM diagnostics").await, 0);
    assert_eq!(count(&data, "SELECT count(*) FROM dead_letters").await, 0);
    assert_eq!(
        dropped_by_policy(&totals, Stream::Teleservice),
        vec![("sim_deactivated", 1)]
    );
    assert_eq!(
        dropped_by_policy(&totals, Stream::Diagnostics),
        vec![("sim_deactivated", 1)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pseudonyms_rotate_with_the_key_epoch() {
    let server = TestServer::start();
    publish_all(
        server.handle.mqtt_addr(),
        &[diagnostics(A, 1, EPOCH_EARLIER), diagnostics(A, 2, NOW)],
    )
    .await;
    let (data, key_file, vault_file) = (server.data_dir(), server.key_file(), server.vault_file());
    server.handle.shutdown().expect("shutdown");
    let batches = query(
        &data,
        "SELECT vehicle_id, key_epoch FROM diagnostics ORDER BY seq",
    )
    .await;
    let ids = strings(&batches, 0);
    let epochs = strings(&batches, 1);
    assert_ne!(ids[0], ids[1], "one vehicle, two epochs, two pseudonyms");
    assert_eq!(
        epochs,
        vec![
            epoch_of(EPOCH_EARLIER).to_string(),
            epoch_of(NOW).to_string()
        ]
    );
    for (id, epoch) in ids.iter().zip([EPOCH_EARLIER, NOW]) {
        let expected =
            expected_vehicle_id(&key_file, &vault_file, A, epoch_of(epoch)).expect("keys");
        assert_eq!(*id, expected);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erasure_unlinks_a_vehicle_and_leaves_others_alone() {
    let server = TestServer::start();
    let addr = server.handle.mqtt_addr();
    publish_all(
        addr,
        &[
            teleservice(A, 1, NOW, "monthly"),
            teleservice(B, 2, NOW, "monthly"),
        ],
    )
    .await;
    let (data, key_file, vault_file) = (server.data_dir(), server.key_file(), server.vault_file());
    let stored = || {
        server
            .handle
            .metrics()
            .stream(Stream::Teleservice)
            .table
            .rows_stored
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    wait_for(|| stored() == 2);
    assert!(server.handle.privacy().erase(A).expect("erase"));
    // A publishes again after erasure: a new pseudonym, which no key links to the old one.
    publish_all(addr, &[teleservice(A, 3, NOW, "monthly")]).await;
    server.handle.shutdown().expect("shutdown");

    let batches = query(
        &data,
        "SELECT vehicle_id, seq, contact_phone_encrypted FROM teleservice ORDER BY seq",
    )
    .await;
    let ids = strings(&batches, 0);
    assert_eq!(ids.len(), 3);
    assert_ne!(ids[0], ids[2], "after erasure A has a new pseudonym");
    // An operator holding every remaining key: the root key and the vault.
    let epoch = epoch_of(NOW);
    let new_a = expected_vehicle_id(&key_file, &vault_file, A, epoch).expect("A's new secret");
    assert_eq!(new_a, ids[2]);
    assert!(
        !ids[..2].contains(&new_a),
        "A's old rows cannot be found by A's VIN"
    );
    let b = expected_vehicle_id(&key_file, &vault_file, B, epoch).expect("B untouched");
    assert_eq!(b, ids[1]);
    // B's contact data still decrypts; A's old row decrypts with no key left.
    let sealed = |row: usize| {
        let text = strings(&batches, 2)[row].clone();
        hex::decode(text).expect("hex")
    };
    let b_key = vehicle_keys(&key_file, &vault_file, B)
        .expect("B keys")
        .data_key;
    let plain = fleetgate::privacy::stage::decrypt(&b_key, "contact_phone", &sealed(1))
        .expect("B decrypts");
    assert_eq!(plain, b"+46700000002");
    let a_key = vehicle_keys(&key_file, &vault_file, A)
        .expect("A's new keys")
        .data_key;
    assert_eq!(
        fleetgate::privacy::stage::decrypt(&a_key, "contact_phone", &sealed(0)),
        None
    );
    assert_eq!(
        fleetgate::privacy::stage::decrypt(&b_key, "contact_phone", &sealed(0)),
        None
    );
}

/// Crypto-shredding is true on disk: right after the erasure, and after a
/// clean stop, no byte of any file fleetgate keeps (data, keys, vault,
/// audit, registry) holds the erased vehicle's secret or data key; the
/// vault stays owner-only and the other vehicle keeps its keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_erased_vehicles_keys_are_in_no_file() {
    use std::os::unix::fs::PermissionsExt;
    let server = TestServer::start();
    publish_all(
        server.handle.mqtt_addr(),
        &[
            teleservice(A, 1, NOW, "monthly"),
            teleservice(B, 2, NOW, "monthly"),
        ],
    )
    .await;
    let stored = || {
        server
            .handle
            .metrics()
            .stream(Stream::Teleservice)
            .table
            .rows_stored
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    wait_for(|| stored() == 2);
    let privacy = server.handle.privacy().clone();
    let a = privacy.vault.get(A).expect("read").expect("A has keys");
    let b = privacy.vault.get(B).expect("read").expect("B has keys");
    let vault_file = server.vault_file();
    let mode = |path: &std::path::Path| {
        std::fs::metadata(path).expect("stat").permissions().mode() & 0o777
    };
    assert_eq!(mode(&vault_file), 0o600, "the vault holds every data key");
    assert!(privacy.erase(A).expect("erase"));
    let root = server.dir.path().to_owned();
    let scan = |when: &str| {
        let files = files_under(&root);
        assert!(files.contains(&vault_file), "{when}: the vault is scanned");
        for path in files {
            let bytes = std::fs::read(&path).expect("read");
            for (what, key) in [("secret", &a.secret.0), ("data key", &a.data_key.0)] {
                assert!(
                    !bytes.windows(key.len()).any(|w| w == key.as_slice()),
                    "{when}: A's {what} is still in {}",
                    path.display()
                );
            }
        }
    };
    scan("right after the erasure");
    assert_eq!(mode(&vault_file), 0o600, "the rewritten vault too");
    assert_eq!(privacy.vault.get(B).expect("read"), Some(b.clone()));
    // The running server keeps using the rewritten vault.
    publish_all(
        server.handle.mqtt_addr(),
        &[teleservice(A, 3, NOW, "monthly")],
    )
    .await;
    wait_for(|| stored() == 3);
    drop(privacy);
    let key_file = server.key_file();
    server.handle.shutdown().expect("shutdown");
    scan("after a clean stop");
    assert_eq!(
        vehicle_keys(&key_file, &vault_file, B),
        Some(b),
        "B survives"
    );
    let new_a = vehicle_keys(&key_file, &vault_file, A).expect("A's new keys");
    assert_ne!(new_a.secret, a.secret);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtti_trips_share_only_the_hour_bucket() {
    let server = TestServer::start();
    let probe = |vin: &str, cycle: u32, ts: i64, seq: u64| {
        let body = format!(
            r#"{{"vin":"{vin}","ts":{ts},"seq":{seq},"ignition_cycle":{cycle},"latitude":59.40412,"longitude":17.94457}}"#
        );
        (format!("vehicles/{vin}/rtti"), body.into_bytes())
    };
    publish_all(
        server.handle.mqtt_addr(),
        &[
            probe(A, 7, NOW, 1),
            probe(A, 7, NOW + 5_000, 2),
            probe(A, 8, NOW + 600_000, 3),
            probe(B, 7, NOW + 1_000, 1),
        ],
    )
    .await;
    let data = server.data_dir();
    server.handle.shutdown().expect("shutdown");
    let batches = query(&data, "SELECT trip_id, latitude FROM rtti ORDER BY ts").await;
    let trips = strings(&batches, 0);
    assert_eq!(trips[0], trips[2], "one trip keeps its id");
    assert_ne!(trips[0], trips[3], "a new ignition cycle, a new id");
    assert_ne!(trips[1], trips[0], "another vehicle, another id");
    // What they do share, so that a licensee's k counts vehicles: the key
    // generation of their hour, and within one vehicle its 16-bit bucket.
    let vehicle = fleetgate::privacy::stage::TRIP_VEHICLE_HEX;
    let generation = fleetgate::privacy::stage::TRIP_GENERATION_HEX;
    assert_eq!(trips[0][..vehicle], trips[3][..vehicle]);
    assert_ne!(trips[0][vehicle..], trips[3][vehicle..]);
    assert_eq!(trips[0][..generation], trips[1][..generation]);
    assert_eq!(
        strings(&batches, 1)[0],
        "59.404",
        "position rounded to 3 decimals"
    );
    let columns: Vec<String> = batches[0]
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    for linkable in ["vehicle_id", "seq", "ignition_cycle", "key_epoch"] {
        assert!(
            !columns.contains(&linkable.to_owned()),
            "{linkable} stored in rtti"
        );
    }
}

/// No text a sender chose reaches a dead letter: not its reason, its topic
/// or its copy, nor any other file. A name in an unknown stream level, an
/// unknown field, an enum value, a nested value and an unparseable payload
/// with an escaped VIN (which a token scan of raw bytes cannot see).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_keep_no_sender_text() {
    const NAME: &str = "AnnaSvensson";
    // B's VIN after its first letter, which arrives escaped as \u0057.
    const B_TAIL: &str = "MW21GD07P2S00002";
    let server = TestServer::start();
    let diag = format!("vehicles/{A}/diagnostics");
    let record = |seq: u32, fields: &str| {
        format!(r#"{{"vin":"{A}","ts":{NOW},"seq":{seq},{fields}}}"#).into_bytes()
    };
    publish_all(
        server.handle.mqtt_addr(),
        &[
            (format!("vehicles/{A}/{NAME}"), b"{}".to_vec()),
            (format!("garage/{NAME}/x"), b"{}".to_vec()),
            (
                diag.clone(),
                record(1, &format!(r#""ecu":"DME","severity":"info","{NAME}":1"#)),
            ),
            (
                diag.clone(),
                record(2, &format!(r#""ecu":"DME","severity":"{NAME}""#)),
            ),
            (
                diag.clone(),
                record(
                    3,
                    &format!(r#""ecu":{{"owner":"{NAME}"}},"severity":"info""#),
                ),
            ),
            (
                diag.clone(),
                format!(r#"{{"vin":"\u0057{B_TAIL}","owner":"{NAME}""#).into_bytes(),
            ),
        ],
    )
    .await;
    let data = server.data_dir();
    let totals = server.handle.shutdown().expect("shutdown");
    assert_eq!(totals.dead_letters_stored, 6);
    let values = parquet_text(&data);
    for secret in [NAME, B_TAIL] {
        assert!(
            !values.contains(secret),
            "{secret} in a dead letter:\n{values}"
        );
        for file in files_under(&data) {
            let bytes = std::fs::read(&file).expect("read");
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "{secret} in {}",
                file.display()
            );
        }
    }
}

/// RTTI is anonymous probe data: a rejected RTTI record names no vehicle
/// (no vehicle_id, no pseudonym in the topic) and keeps no copy of its
/// position; and nothing of a vehicle whose SIM is off is kept, rejected
/// or not (its rejections are counted as dropped by policy).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtti_dead_letters_name_no_vehicle_and_stop_with_the_sim() {
    let server = TestServer::start();
    let deactivated = Consent {
        sim_active: false,
        ..Consent::default()
    };
    server
        .handle
        .privacy()
        .set_consent(B, deactivated)
        .expect("sim off");
    let unknown_field = |vin: &str| {
        (
            format!("vehicles/{vin}/rtti"),
            format!(
                r#"{{"vin":"{vin}","ts":{NOW},"seq":1,"latitude":59.40412,"longitude":17.94457,"lane":99}}"#
            )
            .into_bytes(),
        )
    };
    let cut_short = |vin: &str| {
        (
            format!("vehicles/{vin}/rtti"),
            format!(r#"{{"vin":"{vin}","ts":{NOW},"latitude":59.40412,"longitude":17.94457"#)
                .into_bytes(),
        )
    };
    publish_all(
        server.handle.mqtt_addr(),
        &[
            unknown_field(A),
            cut_short(A),
            unknown_field(B),
            cut_short(B),
            (format!("vehicles/{B}/diagnostics"), b"not json".to_vec()),
        ],
    )
    .await;
    let data = server.data_dir();
    let totals = server.handle.shutdown().expect("shutdown");
    assert_eq!(
        count(&data, "SELECT count(*) FROM dead_letters").await,
        2,
        "B's rejections are not stored"
    );
    assert_eq!(
        count(
            &data,
            "SELECT count(*) FROM dead_letters WHERE stream = 'rtti' AND vehicle_id IS NULL \
             AND octet_length(payload) = 0 AND topic = 'vehicles/<vehicle>/rtti'"
        )
        .await,
        2
    );
    assert!(!parquet_text(&data).contains("59.404"));
    assert_eq!(
        dropped_by_policy(&totals, Stream::Rtti),
        vec![("sim_deactivated", 2)]
    );
    assert_eq!(
        dropped_by_policy(&totals, Stream::Diagnostics),
        vec![("sim_deactivated", 1)]
    );
}

/// A record that needs a consent its vehicle has not given is dropped by
/// policy even when it is invalid too: its dead letter would keep the
/// fields the consent protects (the call's exact position, its mileage),
/// and the vehicle gets no key for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_record_that_needs_a_consent_is_dropped_without_it() {
    let server = TestServer::start();
    let precise = serde_json::json!({"latitude": 48.1234567, "longitude": 11.7654321});
    let unknown_field = serde_json::json!({"x": 1});
    let mut invalid = with(teleservice(B, 7, NOW, "smart_maintenance"), precise);
    invalid = with(invalid, unknown_field);
    publish_all(server.handle.mqtt_addr(), &[invalid]).await;
    let metrics = server.handle.metrics().clone();
    let teleservice_counters = || metrics.stream(Stream::Teleservice);
    wait_for(|| {
        teleservice_counters()
            .records_received
            .load(std::sync::atomic::Ordering::Relaxed)
            == 1
    });
    let vault = std::sync::Arc::clone(server.handle.privacy());
    let data = server.data_dir();
    let totals = server.handle.shutdown().expect("shutdown");
    assert_eq!(
        dropped_by_policy(&totals, Stream::Teleservice),
        vec![("no_consent_smart_maintenance", 1)]
    );
    assert_eq!(totals.dead_letters_stored, 0);
    assert_eq!(count(&data, "SELECT count(*) FROM dead_letters").await, 0);
    assert!(!parquet_text(&data).contains("48.1234567"));
    assert_eq!(vault.vault.get(B).expect("vault"), None, "refused: no key");
}

/// A vehicle whose SIM is off has nothing stored, rejected publishes
/// included: one to an unknown stream or topic under its VIN is dropped
/// by policy, not dead-lettered, and gives it no key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vehicle_with_its_sim_off_has_no_rejected_topic_stored() {
    let server = TestServer::start();
    let deactivated = Consent {
        sim_active: false,
        ..Consent::default()
    };
    let privacy = std::sync::Arc::clone(server.handle.privacy());
    privacy.set_consent(B, deactivated).expect("sim off");
    publish_all(
        server.handle.mqtt_addr(),
        &[
            (format!("vehicles/{B}/radio"), b"{}".to_vec()),
            (format!("vehicles/{B}/teleservice/x"), b"{}".to_vec()),
            (format!("vehicles/{A}/radio"), b"{}".to_vec()),
        ],
    )
    .await;
    let metrics = server.handle.metrics().clone();
    wait_for(|| metrics.totals().rejected + metrics.totals().dropped == 3);
    let data = server.data_dir();
    let totals = server.handle.shutdown().expect("shutdown");
    assert_eq!(
        count(&data, "SELECT count(*) FROM dead_letters").await,
        1,
        "only A's"
    );
    assert_eq!(privacy.vault.get(B).expect("vault"), None, "no key for B");
    assert!(privacy.vault.get(A).expect("vault").is_some());
    assert_eq!(totals.unrouted_dropped, vec![("sim_deactivated", 2)]);
}
