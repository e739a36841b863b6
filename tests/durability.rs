//! Durability across crashes, with `fleetgate serve` as a child process
//! killed by SIGKILL: what the write-ahead log holds survives, replay never
//! duplicates what Parquet already holds, and under load, with publishers
//! faster than the pipeline, a crash loses no acknowledged record at all:
//! the broker sends a PUBACK only once the record is in the fsync'd log.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};

const VINS: [&str; 3] = [A, B, "WMWXP7C05R2U00003"];
/// More vehicles, one publisher each, for the crash test's load.
const MORE_VINS: [&str; 3] = [
    "WMW31GD07P2S00004",
    "WMW41GD07P2S00005",
    "WMW51GD07P2S00006",
];

/// A diagnostics reading: the stream keeps (vehicle_id, seq), so every
/// record can be checked (RTTI deliberately stores neither).
fn probe(vin: &str, seq: u64) -> (String, Vec<u8>) {
    let payload = format!(
        r#"{{"vin":"{vin}","ts":{},"seq":{seq},"ecu":"DME","severity":"info","odometer_km":{}}}"#,
        1_795_500_000_000u64 + (seq % 1_000_000) * 10,
        seq % 100_000
    );
    (format!("vehicles/{vin}/diagnostics"), payload.into_bytes())
}

/// Rows of `wal_dir` a reader sees now, without touching the files.
fn rows_in_wal(wal_dir: &Path) -> usize {
    fleetgate::wal::inspect(wal_dir)
        .expect("inspect WAL")
        .shards
        .values()
        .flat_map(|s| &s.entries)
        .map(|e| e.batch.num_rows())
        .sum()
}

fn parquet_files(dir: &Path) -> usize {
    if !dir.exists() {
        return 0;
    }
    files_under(dir)
        .into_iter()
        .filter(|p| is_data_file(p))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_wal_holds_survives_sigkill() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    // Files are never committed while the server runs: only the WAL holds the data.
    let config = "[storage]\nroll_age_ms = 3600000\n";
    let server = ServeProcess::spawn(dir.path(), config);
    let messages: Vec<_> = (0..300).map(|seq| probe(VINS[0], seq)).collect();
    publish_all(server.addr, &messages).await;
    wait_for(|| rows_in_wal(&data.join("_wal")) == messages.len());
    assert_eq!(parquet_files(&data.join("diagnostics")), 0);
    server.kill();

    let server = ServeProcess::spawn(dir.path(), config);
    server.terminate();
    assert_eq!(count(&data, "SELECT count(*) FROM diagnostics").await, 300);
    assert_eq!(
        count(&data, "SELECT count(DISTINCT seq) FROM diagnostics").await,
        300
    );
    assert_eq!(
        rows_in_wal(&data.join("_wal")),
        0,
        "a clean stop leaves no entry in the log"
    );
    let log = std::fs::read_to_string(dir.path().join("serve.log")).expect("log");
    assert!(log.contains("already_stored=0"), "{log}");
    assert!(!log.contains("replayed=0"), "{log}");
}

/// A WAL fsync that fails (EIO, the unsynced bytes lost, as a writeback
/// error leaves them) acknowledges nothing on its strength: each publish is
/// acknowledged once a committed table file holds it, so a SIGKILL right
/// after the last PUBACK loses none of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_wal_fsync_acknowledges_only_what_a_commit_holds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let fault = FsyncFault::new(dir.path(), "fail", "data/_wal");
    // Commits every 500 ms; a PUBACK waits for one while the disk fails.
    let config = "[storage]\nroll_age_ms = 500\n";
    let server = ServeProcess::spawn_with_env(dir.path(), config, &fault.env());
    std::fs::write(&fault.flag, b"").expect("the disk starts failing");
    let messages: Vec<_> = (0..300).map(|seq| probe(VINS[2], seq)).collect();
    publish_all(server.addr, &messages).await;
    server.kill();
    std::fs::remove_file(&fault.flag).expect("the disk comes back");

    let log = std::fs::read_to_string(dir.path().join("serve.log")).expect("log");
    assert!(
        log.contains("WAL group commit failed"),
        "the fault never fired:\n{log}"
    );
    let server = ServeProcess::spawn(dir.path(), config);
    server.terminate();
    assert_eq!(
        count(&data, "SELECT count(DISTINCT seq) FROM diagnostics").await,
        300,
        "every acknowledged record is stored"
    );
    assert_eq!(count(&data, "SELECT count(*) FROM diagnostics").await, 300);
}

/// A table commit that hangs (its files' fsync does not return) holds back
/// no acknowledgement: the WAL decides them, and the writer goes on taking
/// batches while its commit waits. Before, a worker handed its batches to
/// the writer before its fsync, and a writer did not receive while it
/// committed, so a slow commit stalled the fsyncs and every PUBACK.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_table_commit_holds_back_no_acknowledgement() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let fault = FsyncFault::new(dir.path(), "stall", "data/diagnostics");
    // Commits every 100 ms; queues of 4 batches, which a hanging commit
    // would fill at once if it held the pipeline.
    let config = "[storage]\nroll_age_ms = 100\n[pipeline]\nqueue_capacity = 4\n";
    let server = ServeProcess::spawn_with_env(dir.path(), config, &fault.env());
    // Before the first publish: nothing under the table syncs until one.
    std::fs::write(&fault.flag, b"").expect("the table's disk hangs");
    let messages: Vec<_> = (0..1_000).map(|seq| probe(MORE_VINS[0], seq)).collect();
    let (first, rest) = messages.split_at(10);
    publish_all(server.addr, first).await;
    wait_for(|| fault.stalled());
    // Every PUBACK comes while the first commit still hangs.
    publish_all(server.addr, rest).await;
    // The table's creation at most: no version names a file yet.
    let versions = std::fs::read_dir(data.join("diagnostics/_delta_log"))
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
                .count()
        })
        .unwrap_or(0);
    assert!(
        versions <= 1,
        "{versions} log versions: a commit went through"
    );
    server.kill();
    std::fs::remove_file(&fault.flag).expect("the disk answers again");

    let server = ServeProcess::spawn(dir.path(), config);
    server.terminate();
    assert_eq!(
        count(&data, "SELECT count(DISTINCT seq) FROM diagnostics").await,
        1_000,
        "every acknowledged record is stored"
    );
    assert_eq!(
        count(&data, "SELECT count(*) FROM diagnostics").await,
        1_000
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_skips_what_parquet_already_holds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let config = "[storage]\nroll_age_ms = 50\n";
    let server = ServeProcess::spawn(dir.path(), config);
    let messages: Vec<_> = (0..300).map(|seq| probe(VINS[1], seq)).collect();
    publish_all(server.addr, &messages).await;
    // Committed to Parquet; the WAL's active segment still holds the same entries.
    let start = Instant::now();
    while count(&data, "SELECT count(*) FROM diagnostics").await < 300 {
        assert!(start.elapsed() < DEADLINE, "rows never became visible");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(rows_in_wal(&data.join("_wal")) >= 300);
    server.kill();

    let server = ServeProcess::spawn(dir.path(), config);
    server.terminate();
    assert_eq!(count(&data, "SELECT count(*) FROM diagnostics").await, 300);
    assert_eq!(
        count(&data, "SELECT count(DISTINCT seq) FROM diagnostics").await,
        300
    );
    let log = std::fs::read_to_string(dir.path().join("serve.log")).expect("log");
    assert!(log.contains("replayed=0"), "{log}");
}

/// A row the retention sweep deleted (its whole file) stays deleted after
/// SIGKILL, although the active WAL segment still holds its entry and the
/// deletion request that removed it has been retired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_the_sweep_deleted_is_not_replayed_after_sigkill() {
    use fleetgate::control::documents::Document;
    use fleetgate::lifecycle::requests::{self, DeletionRequest, MatchValue, Selection};
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    // A grace of 1 ms: a deleted row's file goes from disk at the next sweep.
    let config = "[storage]\nroll_age_ms = 50\nvacuum_grace_ms = 1\n\
                  [access]\nquery_timeout_ms = 1\n[retention]\nsweep_interval_secs = 1\n";
    let server = ServeProcess::spawn(dir.path(), config);
    let now = fleetgate::core::clock::now_ms();
    // Alone in its hour partition, an hour old: no rule has expired it.
    let ts = now - 3_600_000;
    let vin = VINS[0];
    let record = (
        format!("vehicles/{vin}/charging"),
        format!(
            r#"{{"vin":"{vin}","ts":{ts},"seq":1,"session_id":"S-GONE","event":"start","started_at":{ts},"remote_managed":true}}"#
        )
        .into_bytes(),
    );
    publish_all(server.addr, &[record]).await;
    wait_for(|| parquet_files(&data.join("charging")) == 1);
    // What `charging_session_ended` records (the admin API writes the same file).
    requests::add(
        &Document::File(dir.path().join("audit/deletion-requests.json")),
        DeletionRequest {
            rows: Selection {
                table: "charging".into(),
                matches: vec![
                    ("session_id".into(), MatchValue::Text("S-GONE".into())),
                    ("remote_managed".into(), MatchValue::Bool(true)),
                ],
            },
            event: "charging_session_ended".into(),
            // Old enough to be retired by the sweep that carries it out.
            requested_ms: now - fleetgate::lifecycle::retention::REQUEST_SETTLE_MS,
        },
    )
    .expect("request");
    let audit = dir.path().join("audit/deletions.jsonl");
    wait_for(|| std::fs::read_to_string(&audit).is_ok_and(|a| a.contains("delete_rows")));
    wait_for(|| {
        requests::load(&Document::File(
            dir.path().join("audit/deletion-requests.json"),
        ))
        .is_ok_and(|r| r.is_empty())
    });
    wait_for(|| parquet_files(&data.join("charging")) == 0);
    assert!(
        rows_in_wal(&data.join("_wal")) >= 1,
        "the active segment still holds the entry"
    );
    server.kill();

    let server = ServeProcess::spawn(dir.path(), config);
    server.terminate();
    let log = std::fs::read_to_string(dir.path().join("serve.log")).expect("log");
    let audit = std::fs::read_to_string(&audit).unwrap_or_default();
    assert_eq!(
        count_at(&data, "SELECT count(*) FROM charging", now).await,
        0,
        "a deleted row came back: {log}\n{audit}"
    );
    assert!(log.contains("replayed=0"), "{log}");
}

/// A segment that holds entries is sealed at `wal.max_segment_age_ms` and
/// deleted once they are in Parquet: a row does not stay in the log until
/// 64 MiB of traffic have filled its segment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_segment_is_deleted_once_its_rows_are_stored() {
    let server = TestServer::start_with(|c| c.wal.max_segment_age_ms = 1);
    let data = server.data_dir();
    publish_all(server.handle.mqtt_addr(), &[probe(VINS[0], 1)]).await;
    let metrics = server.handle.metrics().clone();
    wait_for(|| metrics.totals().stored == 1);
    wait_for(|| rows_in_wal(&data.join("_wal")) == 0);
    server.handle.shutdown().expect("shutdown");
}

/// Publishes probes for every vehicle of `vins` at QoS 1, in seq order,
/// until the connection dies; returns the seqs whose PUBACK arrived, per
/// vehicle.
async fn publish_until_killed(
    addr: std::net::SocketAddr,
    client_id: &str,
    vins: &'static [&'static str],
    first_seq: u64,
) -> BTreeMap<&'static str, Vec<u64>> {
    let mut options = MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
    options.set_keep_alive(Duration::from_secs(5));
    options.set_inflight(100);
    let (client, mut eventloop) = AsyncClient::new(options, 1000);
    let publisher = tokio::spawn(async move {
        for seq in first_seq.. {
            for vin in vins {
                let (topic, payload) = probe(vin, seq);
                if client
                    .publish(topic, QoS::AtLeastOnce, false, payload)
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
    });
    // pkid → (vin, seq), in the order the publishes left.
    let mut in_flight: BTreeMap<u16, (&'static str, u64)> = BTreeMap::new();
    let mut order = (first_seq, 0usize);
    let mut acked: BTreeMap<&'static str, Vec<u64>> = BTreeMap::new();
    loop {
        match eventloop.poll().await {
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                in_flight.insert(pkid, (vins[order.1], order.0));
                order.1 += 1;
                if order.1 == vins.len() {
                    order = (order.0 + 1, 0);
                }
            }
            Ok(Event::Incoming(Packet::PubAck(ack))) => {
                if let Some((vin, seq)) = in_flight.remove(&ack.pkid) {
                    acked.entry(vin).or_default().push(seq);
                }
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    publisher.abort();
    acked
}

/// Ten SIGKILLs at random moments while four publishers (six vehicles) send
/// QoS 1 as fast as their in-flight windows allow, faster than a debug build
/// stores: every record whose PUBACK arrived is stored, exactly once.
/// `CRASH_TEST_ACKNOWLEDGE=received` runs the same test against rumqttd's own
/// acknowledgement on receipt, where it fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_loses_no_acknowledged_record() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let acknowledge =
        std::env::var("CRASH_TEST_ACKNOWLEDGE").unwrap_or_else(|_| "durable".to_owned());
    let config =
        format!("[broker]\nacknowledge = \"{acknowledge}\"\n[storage]\nroll_age_ms = 100\n");
    // Kill points vary per run; the seed is printed so a failure can be replayed.
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64);
    println!("kill-point seed {seed}");
    let publishers: [(&str, &'static [&'static str]); 4] = [
        ("crash-publisher-0", &VINS),
        ("crash-publisher-1", &MORE_VINS[..1]),
        ("crash-publisher-2", &MORE_VINS[1..2]),
        ("crash-publisher-3", &MORE_VINS[2..]),
    ];
    let mut acked: BTreeMap<&'static str, Vec<u64>> = BTreeMap::new();
    for round in 0..10u64 {
        seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let kill_after = Duration::from_millis(300 + (seed >> 33) % 700);
        let server = ServeProcess::spawn(dir.path(), &config);
        let addr = server.addr;
        let running: Vec<_> = publishers
            .iter()
            .map(|&(client, vins)| {
                tokio::spawn(publish_until_killed(addr, client, vins, round * 1_000_000))
            })
            .collect();
        tokio::time::sleep(kill_after).await;
        server.kill();
        for publisher in running {
            for (vin, seqs) in publisher.await.expect("publisher") {
                acked.entry(vin).or_default().extend(seqs);
            }
        }
    }
    ServeProcess::spawn(dir.path(), &config).terminate();

    let batches = query(&data, "SELECT vehicle_id, seq FROM diagnostics").await;
    let key_file = dir.path().join("keys/root.key");
    let vault_file = dir.path().join("keys/vault.redb");
    let mut stored: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for batch in &batches {
        let ids = batch
            .column(0)
            .as_any()
            .downcast_ref::<arrow::array::StringArray>()
            .expect("ids");
        let seqs = batch
            .column(1)
            .as_any()
            .downcast_ref::<arrow::array::Int64Array>()
            .expect("seqs");
        for i in 0..batch.num_rows() {
            stored
                .entry(ids.value(i).to_owned())
                .or_default()
                .push(seqs.value(i) as u64);
        }
    }
    let mut total_acked = 0;
    let mut lost = Vec::new();
    for vin in VINS.iter().chain(&MORE_VINS) {
        let id = expected_vehicle_id(&key_file, &vault_file, vin, epoch_of(1_795_500_000_000))
            .expect("vehicle keys");
        let rows = stored.remove(&id).unwrap_or_default();
        let unique: BTreeSet<u64> = rows.iter().copied().collect();
        assert_eq!(unique.len(), rows.len(), "{vin}: a record is stored twice");
        let vin_acked = acked.get(vin).cloned().unwrap_or_default();
        total_acked += vin_acked.len();
        let missing: Vec<u64> = vin_acked
            .iter()
            .filter(|s| !unique.contains(s))
            .copied()
            .collect();
        println!(
            "{vin}: {} acked, {} stored, {} acked but missing",
            vin_acked.len(),
            unique.len(),
            missing.len()
        );
        if !missing.is_empty() {
            lost.push((vin, missing.len(), missing[0]));
        }
    }
    assert!(total_acked > 0, "the publishers never got an ack");
    assert!(
        lost.is_empty(),
        "acknowledged records missing (vin, count, first seq): {lost:?}"
    );
    assert_eq!(count(&data, "SELECT count(*) FROM dead_letters").await, 0);
    println!("in all: {total_acked} acked, all stored once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_parquet_write_is_reported_and_retried_until_it_succeeds() {
    let server = TestServer::start();
    let data = server.data_dir();
    // A regular file where the partition directory must go: creating the
    // directory fails (ENOTDIR, even for root) until the file is removed.
    let partition_day = data.join("diagnostics/date=2026-11-24");
    std::fs::create_dir_all(data.join("diagnostics")).expect("table dir");
    std::fs::write(&partition_day, b"in the way").expect("blocking file");
    let messages: Vec<_> = (0..200).map(|seq| probe(VINS[2], seq)).collect();
    publish_all(server.handle.mqtt_addr(), &messages).await;

    let metrics = server.handle.metrics().clone();
    let table = || &metrics.stream(fleetgate::schema::Stream::Diagnostics).table;
    let relaxed = std::sync::atomic::Ordering::Relaxed;
    wait_for(|| table().rows_delayed_by_write_errors.load(relaxed) > 0);
    assert_eq!(table().rows_stored.load(relaxed), 0);

    std::fs::remove_file(&partition_day).expect("the disk comes back");
    wait_for(|| table().rows_stored.load(relaxed) == 200);
    server.handle.shutdown().expect("shutdown");
    assert_eq!(
        count(&data, "SELECT count(DISTINCT seq) FROM diagnostics").await,
        200
    );
    assert_eq!(count(&data, "SELECT count(*) FROM diagnostics").await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_writer_holds_no_more_than_its_memory_budget() {
    // 1 MiB per table writer: a Delta commit costs milliseconds, so a
    // smaller share makes the catch-up after the disk is back crawl.
    let share = 1024 * 1024;
    let server = TestServer::start_with(|c| c.storage.memory_budget_bytes = 5 * share);
    let data = server.data_dir();
    let blocked = data.join("diagnostics/date=2026-11-24");
    std::fs::create_dir_all(data.join("diagnostics")).expect("table dir");
    std::fs::write(&blocked, b"in the way").expect("blocking file");
    let messages: Vec<_> = (0..10_000).map(|seq| probe(VINS[0], seq)).collect();
    publish_all(server.handle.mqtt_addr(), &messages).await;

    let metrics = server.handle.metrics().clone();
    let relaxed = std::sync::atomic::Ordering::Relaxed;
    let table = || &metrics.stream(fleetgate::schema::Stream::Diagnostics).table;
    wait_for(|| table().rows_delayed_by_write_errors.load(relaxed) > 0);
    // While the disk refuses, the writer stops taking rows; the rest wait in
    // the bounded queues, the WAL and the broker.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(table().rows_stored.load(relaxed), 0);
    std::fs::remove_file(&blocked).expect("the disk comes back");
    wait_for(|| table().rows_stored.load(relaxed) == 10_000);
    let peak = table().held_bytes_peak.load(relaxed);
    println!("writer memory peak {peak} bytes for a budget of {share}");
    // Over budget by at most the batches taken in one round before the check.
    assert!(peak <= (share + 512 * 1024) as u64, "peak {peak}");
    // And the share was reached: the budget, not the load, bounded it.
    assert!(peak >= (share * 3 / 4) as u64, "peak {peak}");
    server.handle.shutdown().expect("shutdown");
    assert_eq!(
        count(&data, "SELECT count(DISTINCT seq) FROM diagnostics").await,
        10_000
    );
    assert_eq!(
        count(&data, "SELECT count(*) FROM diagnostics").await,
        10_000
    );
}

/// The embedded broker's own buffer is bounded (`broker.segment_bytes` ×
/// `segment_count`, here 64 KiB). With the writer stalled, the pipeline
/// stops reading the broker, the broker's log fills, and then the broker
/// must stop taking publishes (no PUBACK, no socket reads) instead of
/// evicting records it already acknowledged. Once the disk is back, every
/// acknowledged record is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_broker_log_holds_publishers_back_and_loses_nothing_acknowledged() {
    let server = TestServer::start_with(|c| {
        c.broker.segment_bytes = 32 * 1024;
        c.broker.segment_count = 2;
        // 4 MiB per table writer: with a Delta commit per few rows, the
        // catch-up after the disk is back would take minutes in a debug build.
        c.storage.memory_budget_bytes = 5 * 4 * 1024 * 1024;
        c.pipeline.queue_capacity = 4;
    });
    let data = server.data_dir();
    let blocked = data.join("diagnostics/date=2026-11-24");
    std::fs::create_dir_all(data.join("diagnostics")).expect("table dir");
    std::fs::write(&blocked, b"in the way").expect("blocking file");

    let total = 20_000u64;
    let acked = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let addr = server.handle.mqtt_addr();
    let counter = acked.clone();
    let publisher = tokio::spawn(async move {
        let mut options =
            rumqttc::MqttOptions::new("backpressure", addr.ip().to_string(), addr.port());
        options.set_keep_alive(Duration::from_secs(60));
        options.set_inflight(100);
        let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 1000);
        let sender = tokio::spawn(async move {
            for seq in 0..total {
                let (topic, payload) = probe(VINS[1], seq);
                client
                    .publish(topic, rumqttc::QoS::AtLeastOnce, false, payload)
                    .await
                    .expect("queued");
            }
        });
        while counter.load(std::sync::atomic::Ordering::Relaxed) < total {
            match eventloop.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => {
                    counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                Ok(_) => {}
                Err(e) => panic!("connection failed: {e}"),
            }
        }
        sender.await.expect("sender");
    });

    let relaxed = std::sync::atomic::Ordering::Relaxed;
    let metrics = server.handle.metrics().clone();
    let table = || &metrics.stream(fleetgate::schema::Stream::Diagnostics).table;
    wait_for(|| table().rows_delayed_by_write_errors.load(relaxed) > 0);
    std::thread::sleep(Duration::from_secs(2));
    let held_back = acked.load(relaxed);
    println!("acknowledged while the disk refused: {held_back} of {total}");
    assert!(held_back < total, "the publisher was held back");
    std::fs::remove_file(&blocked).expect("the disk comes back");
    // A hang guard, not a speed test: a debug build on a shared machine
    // stores 20,000 records one budget share per commit.
    tokio::time::timeout(3 * DEADLINE, publisher)
        .await
        .expect("every PUBACK once the disk is back")
        .expect("publisher");
    wait_for(|| table().rows_stored.load(relaxed) == total);
    server.handle.shutdown().expect("shutdown");
    assert_eq!(
        count(&data, "SELECT count(DISTINCT seq) FROM diagnostics").await,
        total as i64
    );
}

/// A commit can land and still report failure (here: the checkpoint that
/// follows the 100th commit cannot be written, which delta-rs reports as
/// the commit's error). The writer must not write the same rows again: it
/// asks the table how far each WAL shard is committed before it retries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_that_landed_but_reported_failure_is_not_written_twice() {
    let server = TestServer::start_with(|c| c.storage.roll_age_ms = 10);
    let data = server.data_dir();
    let addr = server.handle.mqtt_addr();
    let metrics = server.handle.metrics().clone();
    let relaxed = std::sync::atomic::Ordering::Relaxed;
    let table = || &metrics.stream(fleetgate::schema::Stream::Diagnostics).table;
    publish_all(addr, &[probe(VINS[0], 0)]).await;
    wait_for(|| table().rows_stored.load(relaxed) == 1);
    // Version 99's checkpoint (every 100 commits) has a directory in its way.
    std::fs::create_dir(
        data.join("diagnostics/_delta_log/00000000000000000099.checkpoint.parquet"),
    )
    .expect("blocking directory");
    let total = 150u64;
    for seq in 1..total {
        publish_all(addr, &[probe(VINS[0], seq)]).await;
        let stored = seq + 1;
        wait_for(|| table().rows_stored.load(relaxed) >= stored);
    }
    assert!(
        table().rows_delayed_by_write_errors.load(relaxed) > 0,
        "the checkpoint failure was reported"
    );
    server.handle.shutdown().expect("shutdown");
    assert_eq!(
        count(&data, "SELECT count(*) FROM diagnostics").await,
        total as i64,
        "no row stored twice"
    );
}
