//! The store on S3: a real S3 server (moto, from PyPI, which `.ci/run`
//! installs) started by the test on 127.0.0.1, port 0. fleetgate stores,
//! queries and deletes there exactly as on local disk, keeps nothing of the
//! tables on local disk, and when the server stops answering, loses nothing
//! it acknowledged: the writers retry until it is back.

mod common;

use std::time::Duration;

use common::*;
use fleetgate::config::Config;
use fleetgate::lifecycle::retention::{self, Retention};
use fleetgate::schema::{Registry, Stream};
use fleetgate::store::StoreRoot;

/// A server config whose tables live in the bucket.
fn on_s3(config: &mut Config, s3: &S3Server) {
    config.storage.uri = Some(format!("s3://{BUCKET}/fleet"));
    config.storage.s3.endpoint = Some(format!("http://{}", s3.addr));
    config.storage.s3.allow_http = true;
    config.storage.s3.access_key_id = Some("test".into());
    config.storage.s3.secret_access_key = Some("test".into());
    config.storage.s3.request_timeout_ms = 1_000;
    config.storage.s3.max_retries = 1;
}

async fn count(config: &Config, table: &str, now_ms: i64) -> i64 {
    let root = StoreRoot::from_config(&config.storage).expect("root");
    let registry = Registry::load().expect("schemas");
    let rules = Retention::load(None, &registry).expect("rules");
    let ctx = fleetgate::query::session_on(&root, &registry, &rules, now_ms)
        .await
        .expect("session");
    first_integer(
        &fleetgate::query::run(&ctx, &format!("SELECT count(*) FROM {table}"))
            .await
            .expect("count"),
    )
}

fn valid_examples(stream: Stream) -> Vec<(String, Vec<u8>)> {
    examples(stream, "valid")
        .into_iter()
        .map(|(_, bytes)| {
            let vin = records(&bytes)[0]["vin"].as_str().expect("vin").to_owned();
            (format!("vehicles/{vin}/{}", stream.name()), bytes)
        })
        .collect()
}

/// Compaction rewrites a closed hour in the bucket: the record a vehicle
/// sent twice is stored once, and nothing else is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_rewrites_an_hour_in_the_bucket() {
    let s3 = S3Server::start();
    let server = TestServer::start_with(|c| on_s3(c, &s3));
    let now = fleetgate::core::clock::now_ms();
    let hour_ago = now - 3 * 3_600_000;
    let mut sent = 0;
    for round in [
        vec![diagnostics(A, 1, hour_ago), diagnostics(B, 1, hour_ago)],
        vec![
            diagnostics(A, 1, hour_ago),
            diagnostics(A, 2, hour_ago + 1_000),
        ],
    ] {
        sent += round.len() as u64;
        publish_all(server.handle.mqtt_addr(), &round).await;
        wait_for(|| server.handle.metrics().totals().stored == sent);
    }
    let config = server.config.clone();
    server.handle.shutdown().expect("shutdown");
    assert_eq!(count(&config, "diagnostics", now).await, 4);

    let root = StoreRoot::from_config(&config.storage).expect("root");
    let settings = fleetgate::store::Compaction::from_config(&config.storage);
    let replaced = fleetgate::store::compact(&root, now, settings).expect("compaction on S3");
    assert!(replaced >= 2, "{replaced}");
    assert_eq!(count(&config, "diagnostics", now).await, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_live_in_the_bucket_and_retention_deletes_there() {
    let s3 = S3Server::start();
    let server = TestServer::start_with(|c| on_s3(c, &s3));
    let messages = valid_examples(Stream::Rtti);
    publish_all(server.handle.mqtt_addr(), &messages).await;
    let config = server.config.clone();
    let data = server.data_dir();
    server.handle.shutdown().expect("shutdown");

    assert_eq!(count(&config, "rtti", TEST_NOW_MS).await, 6);
    assert!(
        !data.join("rtti").exists(),
        "no table on local disk: only the write-ahead log is local"
    );

    let rules = Retention::load(None, &Registry::load().expect("schemas")).expect("rules");
    let run = retention::SweepRun {
        now_ms: TEST_NOW_MS + 2 * 86_400_000,
        max_clock_skew_ms: 86_400_000,
        vacuum_grace_ms: 0,
        dry_run: false,
        unstored_since_ms: None,
    };
    let root = StoreRoot::from_config(&config.storage).expect("root");
    let deleted = retention::sweep(&root, &rules, run).expect("sweep");
    assert_eq!(rows_deleted(&deleted, "rtti"), 6, "{deleted:?}");
    assert_eq!(count(&config, "rtti", TEST_NOW_MS).await, 0);
}

/// The S3 server stops answering while vehicles publish: acknowledgements
/// go on (they wait for the local WAL, not S3), the writers' commits fail
/// and are counted, and once it answers again every acknowledged record
/// is stored, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_s3_server_delays_rows_and_loses_none() {
    let s3 = S3Server::start();
    let server = TestServer::start_with(|c| on_s3(c, &s3));
    let metrics = server.handle.metrics().clone();
    let relaxed = std::sync::atomic::Ordering::Relaxed;
    let rtti = || &metrics.stream(Stream::Rtti).table;

    s3.pause();
    let messages = valid_examples(Stream::Rtti);
    publish_all(server.handle.mqtt_addr(), &messages).await;
    wait_for(|| rtti().rows_delayed_by_write_errors.load(relaxed) > 0);
    assert_eq!(rtti().rows_stored.load(relaxed), 0);
    std::thread::sleep(Duration::from_secs(1));
    s3.resume();
    wait_for(|| rtti().rows_stored.load(relaxed) == 6);

    let config = server.config.clone();
    server.handle.shutdown().expect("shutdown");
    assert_eq!(count(&config, "rtti", TEST_NOW_MS).await, 6);
}

/// In a cluster on S3, each WAL group commit is copied into the bucket
/// (`<prefix>/_fleetgate_wal/<node>/…`) before it counts as durable; read
/// back from there, the entries are whole; once committed, the copies go.
#[test]
fn wal_copies_live_in_the_bucket_until_committed() {
    use fleetgate::core::table::{PartitionKey, Table};
    use fleetgate::wal::copies::Copies;
    use fleetgate::wal::{ShardWal, Tracker, WalSettings};

    let s3 = S3Server::start();
    let mut config = Config::default();
    on_s3(&mut config, &s3);
    let root = StoreRoot::from_config(&config.storage).expect("root");
    let copies = Copies::new(root.wal_copies().expect("copies"), "node-1");
    let disk = tempfile::tempdir().expect("tempdir");
    let tracker = std::sync::Arc::new(Tracker::default());
    let settings = WalSettings {
        dir: disk.path().to_owned(),
        segment_bytes: 1 << 30,
        fsync_interval: Duration::from_millis(5),
        fsync_bytes: 1 << 20,
        max_segment_age: Duration::from_secs(3600),
        copies: Some(copies.clone()),
        fence: None,
    };
    let mut wal = ShardWal::open(&settings, 1, None, tracker.clone()).expect("open");
    let batch = arrow::array::RecordBatch::try_from_iter([(
        "seq",
        std::sync::Arc::new(arrow::array::Int64Array::from(vec![7, 8])) as _,
    )])
    .expect("batch");
    let partition = PartitionKey::from_millis(TEST_NOW_MS);
    let ids: Vec<_> = (0..3)
        .map(|_| {
            let id = wal
                .append(Table::DeadLetters, partition, &batch)
                .expect("append");
            wal.sync().expect("sync and copy");
            id
        })
        .collect();

    let recovered = copies.read(false).expect("read from the bucket");
    let entries = &recovered.shards[&1].entries;
    assert_eq!(entries.len(), 3);
    assert!(entries.iter().all(|e| e.batch == batch));
    let (status, listing) =
        http_request(s3.addr, "GET", &format!("/{BUCKET}?list-type=2"), None, "");
    assert_eq!(status, 200);
    assert!(
        listing.contains("fleet/_fleetgate_wal/node-1/shard-001/"),
        "{listing}"
    );

    tracker.covered(&ids);
    wal.truncate_covered().expect("delete the copies");
    assert!(copies.read(false).expect("read").shards.is_empty());
    assert!(copies.nodes().expect("nodes").is_empty());
}

/// An S3 stand-in that keeps connections alive (HTTP/1.1), for whole-object
/// PUT and GET, on a runtime of its own: moto's server closes every
/// connection after one answer, so a client never reuses one with it, as it
/// does with S3.
fn keep_alive_bucket() -> (std::net::SocketAddr, tokio::runtime::Runtime) {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};

    use axum::body::Bytes;
    use axum::extract::{Path, State};
    use axum::http::{HeaderMap, StatusCode, header};

    type Objects = Arc<Mutex<HashMap<String, Vec<u8>>>>;
    fn headers() -> HeaderMap {
        HeaderMap::from_iter([
            (header::ETAG, header::HeaderValue::from_static("\"probe\"")),
            (
                header::LAST_MODIFIED,
                header::HeaderValue::from_static("Tue, 01 Dec 2026 00:00:00 GMT"),
            ),
        ])
    }
    async fn put(
        State(objects): State<Objects>,
        Path(key): Path<String>,
        body: Bytes,
    ) -> (StatusCode, HeaderMap) {
        if let Ok(mut objects) = objects.lock() {
            objects.insert(key, body.to_vec());
        }
        (StatusCode::OK, headers())
    }
    async fn get(
        State(objects): State<Objects>,
        Path(key): Path<String>,
    ) -> Result<(HeaderMap, Vec<u8>), StatusCode> {
        let body = objects.lock().ok().and_then(|o| o.get(&key).cloned());
        body.map(|body| (headers(), body))
            .ok_or(StatusCode::NOT_FOUND)
    }
    let app = axum::Router::new()
        .route("/{*key}", axum::routing::put(put).get(get))
        .with_state(Objects::default());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("server runtime");
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let addr = listener.local_addr().expect("address");
    runtime.spawn(async move { axum::serve(listener, app).await });
    (addr, runtime)
}

/// One store is used from many runtimes: each table's commit thread has its
/// own, the WAL copies theirs, the queries theirs. A pooled connection must
/// not belong to the runtime that opened it: a request another runtime sends
/// over it would wait until that one runs again (a commit thread between two
/// rolls: here, never), or fail once it is gone (reqwest#2501).
#[test]
fn a_store_used_from_one_runtime_answers_another() {
    use object_store::{ObjectStoreExt, PutPayload, path::Path};
    let (addr, _server) = keep_alive_bucket();
    let mut config = Config::default();
    config.storage.uri = Some(format!("s3://{BUCKET}/fleet"));
    config.storage.s3.endpoint = Some(format!("http://{addr}"));
    config.storage.s3.allow_http = true;
    config.storage.s3.access_key_id = Some("test".into());
    config.storage.s3.secret_access_key = Some("test".into());
    config.storage.s3.request_timeout_ms = 5_000;
    config.storage.s3.max_retries = 0;
    let root = StoreRoot::from_config(&config.storage).expect("root");
    let (store, prefix) = root.object_store().expect("an object store");
    let key = Path::from(format!("{prefix}probe"));
    let runtime = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    };
    // A commit thread's runtime: it opens the connection, then idles.
    let first = runtime();
    first
        .block_on(store.put(&key, PutPayload::from_static(b"written")))
        .expect("put");
    let second = runtime();
    let read = second.block_on(async { store.get(&key).await?.bytes().await });
    assert_eq!(read.expect("get from another runtime").as_ref(), b"written");
    drop(first);
    let third = runtime();
    let read = third.block_on(async { store.get(&key).await?.bytes().await });
    assert_eq!(
        read.expect("get once the first runtime is gone").as_ref(),
        b"written"
    );
}
