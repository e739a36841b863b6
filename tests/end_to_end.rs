//! End to end through the real broker: every example payload of every stream
//! is published with rumqttc at QoS 1, the server is shut down cleanly, and
//! the SQL entry point must return exactly the expected rows and dead letters,
//! while no raw identifier appears anywhere under the data directory.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use chrono::{DateTime, Timelike};
use common::*;
use fleetgate::schema::{FieldType, Registry, Stream, Transform};
use serde_json::{Value as Json, json};

/// Values normalised by field type, so both sides compare alike: timestamps
/// as epoch milliseconds, floats as f64, integers as i64.
fn normalise(field_type: FieldType, value: &Json) -> Json {
    match (field_type, value) {
        (_, Json::Null) => Json::Null,
        (FieldType::Timestamp, Json::String(s)) => json!(
            DateTime::parse_from_rfc3339(s)
                .expect("rfc3339")
                .timestamp_millis()
        ),
        (FieldType::Float, v) => json!(v.as_f64().expect("float")),
        (FieldType::Int, v) => json!(v.as_i64().expect("int")),
        (_, v) => v.clone(),
    }
}

type Row = BTreeMap<String, Json>;

/// Where a published record's secrets are checked after shutdown.
struct Keys<'a> {
    key_file: &'a Path,
    vault_file: &'a Path,
}

/// The stored row a valid example record must become. Encrypted fields hold
/// their plaintext here: stored rows are decrypted before comparing. Trip
/// ids hold "<vin>/<ignition cycle>": stored ones are compared by grouping.
fn expected_row(stream: Stream, record: &Json, keys: &Keys) -> Row {
    let registry = Registry::load().expect("schemas");
    let schema = registry.get(stream);
    let vin = record["vin"].as_str().expect("vin");
    let ts = normalise(FieldType::Timestamp, &record["ts"])
        .as_i64()
        .expect("ts");
    let epoch = epoch_of(ts);
    let mut row = Row::new();
    for field in &schema.fields {
        let value = record.get(&field.name).cloned().unwrap_or(Json::Null);
        let stored = match field.transform {
            Transform::Drop => continue,
            _ if value.is_null() => Json::Null,
            Transform::Keep => normalise(field.field_type, &value),
            Transform::Pseudonym => json!(
                expected_vehicle_id(keys.key_file, keys.vault_file, vin, epoch)
                    .expect("vault secret")
            ),
            Transform::Encrypt => value,
            // Labelled by trip_labels(), which needs the records in order.
            Transform::Trip => Json::Null,
            Transform::Coarsen => match (field.decimals, normalise(field.field_type, &value)) {
                (Some(d), Json::Number(n)) => {
                    let scale = 10f64.powi(d as i32);
                    json!((n.as_f64().expect("float") * scale).round() / scale)
                }
                (None, Json::Number(n)) => {
                    let unit = field.coarsen_to.expect("unit").millis();
                    json!(n.as_i64().expect("ms").div_euclid(unit) * unit)
                }
                (_, other) => panic!("cannot coarsen {other}"),
            },
        };
        row.insert(field.column_name().to_owned(), stored);
    }
    if schema.has_key_epoch {
        row.insert("key_epoch".into(), json!(epoch));
    }
    row
}

/// The rows of a query, normalised by the stream's schema, with encrypted
/// values decrypted by their vehicle's data key; checks that the partition
/// columns agree with `ts` and that received_at is set, then drops them.
fn stored_rows(
    stream: Stream,
    batches: &[arrow::array::RecordBatch],
    keys: &Keys,
    vins: &[String],
) -> Vec<Row> {
    let registry = Registry::load().expect("schemas");
    let schema = registry.get(stream);
    let data_keys: BTreeMap<String, _> = vins
        .iter()
        .filter_map(|vin| {
            let k = vehicle_keys(keys.key_file, keys.vault_file, vin)?;
            let id = expected_vehicle_id(
                keys.key_file,
                keys.vault_file,
                vin,
                epoch_of(1_795_500_000_000),
            )?;
            Some((id, k.data_key))
        })
        .collect();
    let mut writer = arrow::json::LineDelimitedWriter::new(Vec::new());
    let refs: Vec<_> = batches.iter().collect();
    writer.write_batches(&refs).expect("json");
    writer.finish().expect("finish");
    let text = String::from_utf8(writer.into_inner()).expect("utf8");
    text.lines()
        .map(|line| {
            let object: serde_json::Map<String, Json> = serde_json::from_str(line).expect("row");
            let mut row = Row::new();
            for field in schema.fields.iter().filter(|f| f.is_stored()) {
                let value = object
                    .get(field.column_name())
                    .cloned()
                    .unwrap_or(Json::Null);
                let value = match (field.transform, &value) {
                    (Transform::Encrypt, Json::String(hex_text)) => {
                        let sealed = hex::decode(hex_text).expect("binary as hex");
                        let vehicle = object["vehicle_id"].as_str().expect("vehicle_id");
                        let key = data_keys
                            .get(vehicle)
                            .expect("a data key for the row's vehicle");
                        let plain = fleetgate::privacy::stage::decrypt(key, &field.name, &sealed)
                            .expect("decrypts");
                        json!(String::from_utf8(plain).expect("utf8"))
                    }
                    (Transform::Pseudonym | Transform::Trip | Transform::Encrypt, _) => value,
                    _ => normalise(field.field_type, &value),
                };
                row.insert(field.column_name().to_owned(), value);
            }
            if schema.has_key_epoch {
                row.insert("key_epoch".into(), object["key_epoch"].clone());
            }
            let ts = row["ts"].as_i64().expect("ts");
            let t = DateTime::from_timestamp_millis(ts).expect("ts in range");
            assert_eq!(
                object["date"],
                json!(t.date_naive().to_string()),
                "date partition"
            );
            assert_eq!(object["hour"], json!(t.hour()), "hour partition");
            assert!(object.contains_key("received_at"));
            row
        })
        .collect()
}

/// The trip each RTTI record belongs to, as the README defines trips: a new
/// one with every ignition cycle, when the current one reaches
/// `privacy.max_trip_minutes` (30 by default), and at every UTC hour.
fn trip_labels(records: &[Json]) -> Vec<String> {
    const MAX_TRIP_MS: i64 = 30 * 60_000;
    const HOUR_MS: i64 = 3_600_000;
    let mut current: BTreeMap<String, (Json, i64, usize)> = BTreeMap::new();
    records
        .iter()
        .map(|r| {
            let vin = r["vin"].as_str().expect("vin").to_owned();
            let ts = normalise(FieldType::Timestamp, &r["ts"])
                .as_i64()
                .expect("ts");
            let cycle = r["ignition_cycle"].clone();
            let trip = current.entry(vin.clone()).or_insert((cycle.clone(), ts, 0));
            if trip.0 != cycle
                || ts - trip.1 >= MAX_TRIP_MS
                || ts.div_euclid(HOUR_MS) != trip.1.div_euclid(HOUR_MS)
            {
                *trip = (cycle, ts, trip.2 + 1);
            }
            format!("{vin}/{}", trip.2)
        })
        .collect()
}

/// Rows compared as a multiset; trip ids compared by the rows they group.
fn assert_same_rows(stream: Stream, mut got: Vec<Row>, mut want: Vec<Row>) {
    let groups = |rows: &mut Vec<Row>| -> BTreeSet<Vec<String>> {
        let mut by_trip: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for row in rows.iter_mut() {
            if let Some(Json::String(trip)) = row.remove("trip_id") {
                by_trip
                    .entry(trip)
                    .or_default()
                    .push(json!(row).to_string());
            }
        }
        by_trip
            .into_values()
            .map(|mut members| {
                members.sort();
                members
            })
            .collect()
    };
    assert_eq!(groups(&mut got), groups(&mut want), "trips of {stream}");
    let sort = |rows: &mut Vec<Row>| rows.sort_by_key(|r| json!(r).to_string());
    sort(&mut got);
    sort(&mut want);
    assert_eq!(got, want, "rows of {stream}");
}

/// (stream, reason_code, record_index) of the dead letters an invalid example must produce.
fn expected_dead_letters(
    stream: Stream,
    name: &str,
    bytes: &[u8],
) -> Vec<(Option<String>, String, Option<i64>)> {
    let reason = name.split("__").next().expect("reason").to_owned();
    let indices: Vec<Option<i64>> = match serde_json::from_slice::<Json>(bytes) {
        Ok(Json::Array(items)) if !items.is_empty() => (0..items.len() as i64).map(Some).collect(),
        _ => vec![None],
    };
    indices
        .into_iter()
        .map(|i| (Some(stream.name().to_owned()), reason.clone(), i))
        .collect()
}

const VEHICLE_C: &str = "WMWXP7C05R2U00003";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_example_is_stored_or_dead_lettered_exactly() {
    let server = TestServer::start_with(|c| c.pipeline.max_payload_bytes = 8192);
    let (key_file, vault_file) = (server.key_file(), server.vault_file());
    let data_dir = server.data_dir();

    let mut messages = Vec::new();
    let mut published: BTreeMap<Stream, Vec<Json>> = BTreeMap::new();
    let mut expected_dl = Vec::new();
    let mut secrets = vec![
        INVALID_EXAMPLE_VIN.to_owned(),
        "+46701234567".into(),
        "Anna Svensson".into(),
    ];
    let mut vins = Vec::new();
    let mut gated = 0;
    for stream in Stream::ALL {
        for (_, bytes) in examples(stream, "valid") {
            let records = records(&bytes);
            let vin = records[0]["vin"].as_str().expect("vin").to_owned();
            for r in &records {
                // Smart Maintenance is opt-in and no consent is given here:
                // dropped by policy, counted, neither stored nor dead-lettered.
                if r.get("trigger") == Some(&json!("smart_maintenance")) {
                    gated += 1;
                } else {
                    published.entry(stream).or_default().push(r.clone());
                }
                for personal in ["contract_number", "contact_phone"] {
                    if let Some(value) = r.get(personal).and_then(Json::as_str) {
                        secrets.push(value.to_owned());
                    }
                }
            }
            secrets.push(vin.clone());
            vins.push(vin.clone());
            messages.push((format!("vehicles/{vin}/{stream}"), bytes));
        }
        for (name, bytes) in examples(stream, "invalid") {
            expected_dl.extend(expected_dead_letters(stream, &name, &bytes));
            messages.push((format!("vehicles/{INVALID_EXAMPLE_VIN}/{stream}"), bytes));
        }
    }
    secrets.push("SE-CHG-99999999".into());

    // One bad record between two good ones: the good ones are stored.
    let mixed = json!([
        {"vin": VEHICLE_C, "ts": "2026-11-24T09:00:00Z", "seq": 500, "ecu": "DME", "severity": "info"},
        {"vin": VEHICLE_C, "ts": "2026-11-24T09:00:01Z", "seq": 501, "ecu": "DME", "severity": "loud"},
        {"vin": VEHICLE_C, "ts": "2026-11-24T09:00:02Z", "seq": 502, "ecu": "DME", "severity": "info"}
    ]);
    for i in [0, 2] {
        published
            .entry(Stream::Diagnostics)
            .or_default()
            .push(mixed[i].clone());
    }
    expected_dl.push((Some("diagnostics".into()), "out_of_range".into(), Some(1)));
    messages.push((
        format!("vehicles/{VEHICLE_C}/diagnostics"),
        mixed.to_string().into_bytes(),
    ));

    // Topic-level and payload-level rejections.
    let oversize = format!(r#"{{"vin": "{VEHICLE_C}", "pad": "{}"}}"#, "x".repeat(9000));
    messages.push((format!("vehicles/{VEHICLE_C}/rtti"), oversize.into_bytes()));
    expected_dl.push((Some("rtti".into()), "oversize".into(), None));
    messages.push((format!("vehicles/{VEHICLE_C}/radio"), b"{}".to_vec()));
    expected_dl.push((None, "unknown_stream".into(), None));
    messages.push(("vehicles/NOT-A-VIN/rtti".into(), b"{}".to_vec()));
    expected_dl.push((Some("rtti".into()), "invalid_vin".into(), None));
    messages.push((
        format!("garage/{VEHICLE_C}"),
        format!("from {VEHICLE_C}").into_bytes(),
    ));
    expected_dl.push((None, "unknown_topic".into(), None));

    publish_all(server.handle.mqtt_addr(), &messages).await;
    let totals = server.handle.shutdown().expect("clean shutdown");

    // Every valid record, value by value.
    let keys = Keys {
        key_file: &key_file,
        vault_file: &vault_file,
    };
    for (stream, records) in published {
        let mut want: Vec<Row> = records
            .iter()
            .map(|r| expected_row(stream, r, &keys))
            .collect();
        if stream == Stream::Rtti {
            for (row, label) in want.iter_mut().zip(trip_labels(&records)) {
                row.insert("trip_id".into(), json!(label));
            }
        }
        let batches = query(&data_dir, &format!("SELECT * FROM {stream}")).await;
        let got = stored_rows(stream, &batches, &keys, &vins);
        let counted = totals
            .streams
            .iter()
            .find(|s| s.stream == stream.name())
            .expect("stream");
        assert_eq!(
            counted.stored as usize,
            want.len(),
            "stored counter of {stream}"
        );
        assert_same_rows(stream, got, want);
    }

    let teleservice = totals
        .streams
        .iter()
        .find(|s| s.stream == "teleservice")
        .expect("stream");
    assert!(gated > 0);
    assert_eq!(
        teleservice.dropped_by_policy,
        vec![("no_consent_smart_maintenance", gated)]
    );

    // Every rejection, with its reason, and nothing else.
    let batches = query(
        &data_dir,
        "SELECT stream, reason_code, record_index, topic, payload, payload_truncated, reason \
         FROM dead_letters",
    )
    .await;
    let mut writer = arrow::json::LineDelimitedWriter::new(Vec::new());
    writer
        .write_batches(&batches.iter().collect::<Vec<_>>())
        .expect("json");
    writer.finish().expect("finish");
    let text = String::from_utf8(writer.into_inner()).expect("utf8");
    let dead: Vec<serde_json::Map<String, Json>> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("row"))
        .collect();
    let mut got: Vec<_> = dead
        .iter()
        .map(|d| {
            (
                d.get("stream").and_then(Json::as_str).map(str::to_owned),
                d["reason_code"].as_str().expect("code").to_owned(),
                d.get("record_index").and_then(Json::as_i64),
            )
        })
        .collect();
    got.sort();
    expected_dl.sort();
    assert_eq!(got, expected_dl);
    let rejected_total: u64 = totals
        .streams
        .iter()
        .flat_map(|s| s.rejected.iter().map(|(_, n)| n))
        .chain(totals.unrouted_rejected.iter().map(|(_, n)| n))
        .sum();
    assert_eq!(rejected_total as usize, expected_dl.len());
    assert_eq!(totals.dead_letters_stored as usize, expected_dl.len());

    // Topics carry the pseudonym in the VIN slot (RTTI's name no vehicle);
    // reasons are not empty; bytes that did not parse are never copied.
    let now_epoch = epoch_of(fleetgate::core::clock::now_ms());
    let test_vehicle = expected_vehicle_id(&key_file, &vault_file, INVALID_EXAMPLE_VIN, now_epoch)
        .expect("vault secret");
    for d in &dead {
        assert!(!d["reason"].as_str().expect("reason").is_empty());
        let topic = d["topic"].as_str().expect("topic");
        if d["reason_code"] == "missing_field" {
            let stream = d["stream"].as_str().expect("stream");
            if stream == "rtti" {
                assert_eq!(topic, "vehicles/<vehicle>/rtti");
                assert_eq!(d.get("vehicle_id"), None);
            } else {
                assert_eq!(topic, format!("vehicles/vin:{test_vehicle}/{stream}"));
            }
        }
        if d["reason_code"] == "oversize" {
            assert_eq!(d["payload_truncated"], json!(true));
            assert_eq!(d["payload"].as_str().expect("payload").len(), 0);
        }
    }

    // No raw identifier anywhere: not in the file bytes (footers, statistics)
    // and not in any decompressed value.
    let values = parquet_text(&data_dir);
    assert!(
        values.contains(&test_vehicle),
        "the scan must see decompressed values"
    );
    for file in files_under(&data_dir) {
        let bytes = std::fs::read(&file).expect("read");
        for secret in &secrets {
            let found = bytes.windows(secret.len()).any(|w| w == secret.as_bytes());
            assert!(!found, "{secret} in the bytes of {}", file.display());
        }
    }
    for secret in &secrets {
        assert!(
            !values.contains(secret.as_str()),
            "{secret} in a stored value"
        );
        assert!(
            !values.to_uppercase().contains(&secret.to_uppercase()),
            "{secret} in any case"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_clients_publish_too() {
    use rumqttc::v5::{AsyncClient, Event, MqttOptions, mqttbytes::QoS, mqttbytes::v5::Packet};
    let server = TestServer::start();
    let addr = server.handle.mqtt5_addr();
    let (client, mut eventloop) = AsyncClient::new(
        MqttOptions::new("v5-vehicle", addr.ip().to_string(), addr.port()),
        10,
    );
    let (_, bytes) = examples(Stream::Rtti, "valid").remove(0);
    let vin = records(&bytes)[0]["vin"].as_str().expect("vin").to_owned();
    client
        .publish(
            format!("vehicles/{vin}/rtti"),
            QoS::AtLeastOnce,
            false,
            bytes.clone(),
        )
        .await
        .expect("publish");
    tokio::time::timeout(DEADLINE, async {
        loop {
            if let Event::Incoming(Packet::PubAck(_)) =
                eventloop.poll().await.expect("v5 connection")
            {
                break;
            }
        }
    })
    .await
    .expect("PUBACK");
    let data_dir = server.data_dir();
    server.handle.shutdown().expect("shutdown");
    let batches = query(&data_dir, "SELECT count(*) AS n FROM rtti").await;
    let n = batches[0]
        .column(0)
        .as_any()
        .downcast_ref::<arrow::array::Int64Array>()
        .expect("count")
        .value(0);
    assert_eq!(n as usize, records(&bytes).len());
}

/// A port another broker already serves is an error at start-up, naming
/// the port; before, the embedded broker's bind failed on its own thread,
/// the readiness probe was answered by the other broker, and fleetgate
/// reported itself running while its vehicles' records went elsewhere.
#[test]
fn a_server_refuses_to_start_on_an_mqtt_port_already_served() {
    let first = TestServer::start();
    let taken = first.handle.mqtt_addr();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = test_config(dir.path());
    config.broker.mqtt_addr = taken;
    let error = match fleetgate::ops::server::start(&config) {
        Ok(second) => {
            let reported = second.mqtt_addr();
            let _ = second.shutdown();
            panic!("a second server started, reporting {reported}");
        }
        Err(error) => error.to_string(),
    };
    assert!(error.contains(&taken.to_string()), "{error}");
    first.handle.shutdown().expect("shutdown");
}
