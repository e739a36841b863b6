//! Several nodes sharing a PostgreSQL control plane (`cluster.control_plane`)
//! and one set of tables: a vehicle gets one secret whichever node meets it
//! first (also when they meet it at once), an erasure on one node is in
//! force on the others, a principal or a legal hold made through one node
//! holds on the others, an erased secret leaves the database's table files,
//! the nodes' WAL shards never pass for one another in the tables' log, and
//! the maintenance lease has one holder and moves when it stops renewing.
//! Each test starts its own PostgreSQL (`common::Postgres`).

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use fleetgate::control::ControlPlane;
use fleetgate::control::lease::{self, Claim, Lease};
use fleetgate::privacy::pseudo::KeyRing;
use fleetgate::privacy::vault::Vault;
use fleetgate::schema::Stream;

const A: &str = "WMW11DJ04N2T00001";
const B: &str = "WMW21GD07P2S00002";
/// 2026-11-24T06:00:00Z.
const NOW: i64 = 1_795_500_000_000;

fn vins(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("WMW11DJ04N2T{i:05}")).collect()
}

/// A node's vault in the control plane, with its own connections.
fn shared_vault(postgres: &Postgres, keys: &KeyRing) -> Vault {
    let plane = ControlPlane::connect(&postgres.url()).expect("control plane");
    Vault::shared(Arc::new(plane), keys).expect("the cluster's root key")
}

/// Every file under `dir` whose bytes contain `needle`.
fn files_holding(dir: &Path, needle: &[u8]) -> Vec<std::path::PathBuf> {
    files_under(dir)
        .into_iter()
        .filter(|path| {
            std::fs::read(path)
                .map(|bytes| bytes.windows(needle.len()).any(|w| w == needle))
                .unwrap_or(false)
        })
        .collect()
}

#[test]
fn nodes_meeting_new_vehicles_at_once_give_each_one_secret() {
    let postgres = Postgres::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let keys = KeyRing::load_or_create(&dir.path().join("root.key")).expect("keys");
    let vins = vins(300);
    // Four callers on two "nodes", each asking for every vehicle at once,
    // in its own order: each vehicle must end with one secret for all.
    let answers: Vec<Vec<(String, [u8; 32])>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..4)
            .map(|caller| {
                let vault = shared_vault(&postgres, &keys);
                let mut order: Vec<&str> = vins.iter().map(String::as_str).collect();
                if caller % 2 == 1 {
                    order.reverse();
                }
                scope.spawn(move || {
                    let got = vault.get_or_create_all(&order).expect("keys");
                    order
                        .iter()
                        .zip(got)
                        .map(|(vin, keys)| ((*vin).to_owned(), keys.secret.0))
                        .collect()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("caller"))
            .collect()
    });
    let first: std::collections::HashMap<_, _> = answers[0].iter().cloned().collect();
    assert_eq!(first.len(), vins.len());
    for answer in &answers[1..] {
        for (vin, secret) in answer {
            assert_eq!(&first[vin], secret, "{vin} got two secrets");
        }
    }
    let count = postgres.psql("SELECT count(*) FROM fleetgate_vehicles");
    assert_eq!(count.trim(), "300");
    // A node started with a root key of its own would index every vehicle
    // anew (a second secret each): refused.
    let stranger = KeyRing::load_or_create(&dir.path().join("other.key")).expect("keys");
    let plane = ControlPlane::connect(&postgres.url()).expect("control plane");
    let refused = Vault::shared(Arc::new(plane), &stranger).expect_err("another root key");
    assert!(refused.to_string().contains("root key"), "{refused}");
}

#[test]
fn an_erasure_on_one_node_is_in_force_on_the_other_and_leaves_the_table_files() {
    let postgres = Postgres::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let keys = KeyRing::load_or_create(&dir.path().join("root.key")).expect("keys");
    let (one, two) = (
        shared_vault(&postgres, &keys),
        shared_vault(&postgres, &keys),
    );
    let a = one.get_or_create(A).expect("A");
    let b = one.get_or_create(B).expect("B");
    assert_eq!(two.get(A).expect("get"), Some(a.clone()));
    // Written to the table files: the scan below can see a secret there.
    postgres.psql("CHECKPOINT");
    let base = postgres.data_dir().join("base");
    assert!(
        !files_holding(&base, &a.secret.0).is_empty(),
        "the scan finds a stored secret"
    );
    // No VIN anywhere in the database, its WAL included: rows are keyed by
    // a keyed hash of the VIN.
    for vin in [A, B] {
        assert!(files_holding(&postgres.data_dir(), vin.as_bytes()).is_empty());
    }

    assert!(two.erase(A).expect("erase on node two"));
    assert_eq!(one.get(A).expect("get"), None, "gone for node one too");
    assert_eq!(one.get(B).expect("get"), Some(b.clone()), "B untouched");
    postgres.psql("CHECKPOINT");
    for secret in [&a.secret.0, &a.data_key.0] {
        assert_eq!(
            files_holding(&base, secret),
            Vec::<std::path::PathBuf>::new()
        );
    }
    assert!(!files_holding(&base, &b.secret.0).is_empty());
    // A returns: a new secret, never the old one.
    let again = one.get_or_create(A).expect("A again");
    assert_ne!(again.secret, a.secret);
    assert_eq!(two.get(A).expect("get"), Some(again));
}

#[test]
fn the_maintenance_lease_has_one_holder_and_moves_when_it_lapses() {
    let postgres = Postgres::start();
    let plane = |_| Arc::new(ControlPlane::connect(&postgres.url()).expect("control plane"));
    let term = Duration::from_secs(2);
    let first = Lease::new(plane(1), lease::MAINTENANCE, "node-1", term);
    let second = Lease::new(plane(2), lease::MAINTENANCE, "node-2", term);
    assert!(first.hold().expect("hold"));
    assert!(!second.hold().expect("hold"), "one holder at a time");
    assert!(first.hold().expect("renew"), "the holder renews");
    assert_eq!(second.holder().expect("holder").as_deref(), Some("node-1"));
    // node-1 stops renewing (killed): node-2 gets it once the term ran out.
    std::thread::sleep(term + Duration::from_millis(500));
    assert!(second.hold().expect("hold"), "the lapsed lease moves");
    assert!(
        !first.hold().expect("hold"),
        "and the old holder has lost it"
    );
    // A clean stop hands it over at once.
    second.release().expect("release");
    assert!(first.hold().expect("hold"));
}

/// A holder whose step (storing a dead node's WAL) outlasted its term asks
/// again before its next step (the sweep), rather than act on the answer
/// it had before: by then another node may hold the lease.
#[test]
fn a_holder_asks_again_after_a_step_that_outlasted_its_term() {
    let postgres = Postgres::start();
    let plane = |_| Arc::new(ControlPlane::connect(&postgres.url()).expect("control plane"));
    let term = Duration::from_secs(2);
    let first = Claim::new(Lease::new(plane(1), lease::MAINTENANCE, "node-1", term));
    let second = Lease::new(plane(2), lease::MAINTENANCE, "node-2", term);
    assert!(first.renew().expect("hold"));
    assert!(
        first.confirm().expect("confirm"),
        "trusted right after renewal"
    );
    // node-1's step takes longer than the term; node-2 takes the lease.
    std::thread::sleep(term + Duration::from_millis(500));
    assert!(second.hold().expect("hold"), "the lapsed lease moves");
    assert!(
        !first.confirm().expect("confirm"),
        "node-1 learns it lost the lease before it acts again"
    );
    // Once node-2 stops, node-1's next confirmation takes the lease back.
    second.release().expect("release");
    assert!(first.confirm().expect("confirm"));
}

/// What the nodes of a test cluster share: a PostgreSQL of its own, the
/// tables' directory and the root key every node starts with.
struct Cluster {
    postgres: Postgres,
    root_key: std::path::PathBuf,
    keys: KeyRing,
    tables: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Cluster {
    fn start() -> Self {
        let postgres = Postgres::start();
        let dir = tempfile::tempdir().expect("tempdir");
        let root_key = dir.path().join("root.key");
        let keys = KeyRing::load_or_create(&root_key).expect("root key");
        let tables = dir.path().join("tables");
        Self {
            postgres,
            root_key,
            keys,
            tables,
            _dir: dir,
        }
    }
}

/// A node of a two-node cluster: its own data dir, WAL and listeners; the
/// tables, the control plane and the root key shared.
fn node(postgres: &Postgres, tables: &Path, root_key: &Path, id: &str) -> TestServer {
    node_with(postgres, tables, root_key, id, |_| {})
}

/// [`node`], with `more` changing its configuration.
fn node_with(
    postgres: &Postgres,
    tables: &Path,
    root_key: &Path,
    id: &str,
    more: impl FnOnce(&mut fleetgate::config::Config),
) -> TestServer {
    let url = postgres.url();
    let tables = format!("file://{}", tables.display());
    TestServer::start_with(|c| {
        more(c);
        c.cluster.node_id = id.to_owned();
        c.cluster.control_plane = url;
        c.cluster.lease_secs = 3;
        c.retention.sweep_interval_secs = 1;
        c.storage.uri = Some(tables);
        fleetgate::core::fsio::create_dir_all(c.storage.key_file.parent().expect("keys dir"))
            .expect("keys dir");
        std::fs::copy(root_key, &c.storage.key_file).expect("the cluster's root key");
    })
}

fn lease_held(server: &TestServer) -> bool {
    server
        .handle
        .metrics()
        .maintenance_lease_held
        .load(std::sync::atomic::Ordering::Relaxed)
        == 1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_store_one_vehicle_under_one_pseudonym_and_share_its_erasure() {
    let cluster = Cluster::start();
    let (postgres, tables, root_key) = (&cluster.postgres, &cluster.tables, &cluster.root_key);
    let one = node(postgres, tables, root_key, "node-1");
    let two = node(postgres, tables, root_key, "node-2");
    let stored = |server: &TestServer| {
        server
            .handle
            .metrics()
            .stream(Stream::Teleservice)
            .table
            .rows_stored
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    // The vehicle reaches node 1, then (a failover) node 2.
    publish_all(one.handle.mqtt_addr(), &[teleservice(A, 1, NOW, "monthly")]).await;
    publish_all(two.handle.mqtt_addr(), &[teleservice(A, 2, NOW, "monthly")]).await;
    wait_for(|| stored(&one) == 1 && stored(&two) == 1);
    let ids = |batches: &[arrow::array::RecordBatch]| -> Vec<String> {
        let mut ids = Vec::new();
        for batch in batches {
            let column = arrow::array::cast::AsArray::as_string::<i32>(batch.column(0));
            ids.extend(column.iter().map(|v| v.expect("vehicle_id").to_owned()));
        }
        ids
    };
    let rows = query(tables, "SELECT vehicle_id FROM teleservice ORDER BY seq").await;
    let before = ids(&rows);
    assert_eq!(before.len(), 2, "both nodes' rows in the shared table");
    assert_eq!(
        before[0], before[1],
        "one vehicle, one pseudonym, whichever node"
    );

    // Each node's shard commits under its own name in the tables' log.
    let log = files_under(&tables.join("teleservice/_delta_log"))
        .into_iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .collect::<String>();
    assert!(log.contains("fleetgate-wal-node-1-"), "node 1's shards");
    assert!(log.contains("fleetgate-wal-node-2-"), "node 2's shards");

    // A principal registered through node 1 is known to node 2: the access
    // registry is one document in the control plane.
    let operator = one.admin().principal(r#"{"id":"ops","kind":"operator"}"#);
    let count = r#"{"sql":"SELECT count(*) AS n FROM teleservice","purpose":"operations"}"#;
    for server in [&one, &two] {
        let (status, body) = http_request(
            server.handle.admin_addr(),
            "POST",
            "/sql",
            Some(&operator),
            count,
        );
        assert_eq!(status, 200, "{body}");
        assert_eq!(body, r#"[{"n":2}]"#, "the same answer on every node");
    }
    // A legal hold placed through node 2 refuses an erasure asked of node 1.
    let hold = format!(r#"{{"event":"legal_hold_placed","vin":"{A}","id":"LH-1"}}"#);
    let (status, body) = two.admin().post("/admin/events", &hold);
    assert_eq!(status, 200, "{body}");
    let erase = format!(r#"{{"event":"erasure_requested","vin":"{A}"}}"#);
    let (status, body) = one.admin().post("/admin/events", &erase);
    assert_eq!(status, 409, "held on node 2, so refused on node 1: {body}");
    let release = format!(r#"{{"event":"legal_hold_released","vin":"{A}","id":"LH-1"}}"#);
    let (status, body) = one.admin().post("/admin/events", &release);
    assert_eq!(status, 200, "{body}");

    // Erased through node 1; node 2 has the vehicle's keys cached from its
    // own rows, and must drop them: A's next row there gets a new pseudonym.
    assert!(one.handle.privacy().erase(A).expect("erase"));
    std::thread::sleep(Duration::from_secs(1));
    publish_all(two.handle.mqtt_addr(), &[teleservice(A, 3, NOW, "monthly")]).await;
    wait_for(|| stored(&two) == 2);
    let after = ids(&query(tables, "SELECT vehicle_id FROM teleservice ORDER BY seq").await);
    assert_eq!(after.len(), 3);
    assert_ne!(after[2], before[0], "node 2 did not use the erased secret");

    // One node holds the maintenance lease; when it stops, the other takes it.
    wait_for(|| lease_held(&one) != lease_held(&two));
    let (holder, other) = if lease_held(&one) {
        (one, two)
    } else {
        (two, one)
    };
    holder.handle.shutdown().expect("shutdown");
    wait_for(|| lease_held(&other));
    other.handle.shutdown().expect("shutdown");
}

/// `deploy/haproxy.cfg` as shipped, listening on `listen` and sending to
/// `nodes` instead of the example addresses, running until dropped.
struct Haproxy {
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl Haproxy {
    /// HAProxy on `listen` in front of `nodes` (MQTT address, HTTP address
    /// for the health check).
    fn start(
        listen: std::net::SocketAddr,
        nodes: &[(std::net::SocketAddr, std::net::SocketAddr)],
    ) -> Self {
        let shipped = include_str!("../deploy/haproxy.cfg");
        let mut config = String::new();
        for line in shipped.lines() {
            let trimmed = line.trim_start();
            if trimmed.starts_with("bind ") {
                config.push_str(&format!("    bind {listen}\n"));
            } else if trimmed.starts_with("server ") {
                continue;
            } else {
                config.push_str(line);
                config.push('\n');
            }
        }
        for (i, (mqtt, http)) in nodes.iter().enumerate() {
            config.push_str(&format!(
                "    server node-{} {mqtt} check port {}\n",
                i + 1,
                http.port()
            ));
        }
        assert_eq!(
            shipped
                .lines()
                .filter(|l| l.trim_start().starts_with("bind "))
                .count(),
            1,
            "the shipped file binds once"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, config).expect("config");
        let child = std::process::Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("haproxy (apt-get install haproxy)");
        wait_for(|| std::net::TcpStream::connect(listen).is_ok());
        Self { child, _dir: dir }
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A vehicle as a fleet runs it: its own connection, its VIN as client id;
/// publishes `message` at QoS 1 and waits for the PUBACK, connecting again
/// (as a vehicle does) while the connection fails.
async fn vehicle_publishes(addr: std::net::SocketAddr, vin: &str, message: &Message) {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        assert!(tokio::time::Instant::now() < deadline, "{vin}: no PUBACK");
        let options = MqttOptions::new(vin, addr.ip().to_string(), addr.port());
        let (client, mut eventloop) = AsyncClient::new(options, 10);
        client
            .publish(
                message.0.clone(),
                QoS::AtLeastOnce,
                false,
                message.1.clone(),
            )
            .await
            .expect("queued");
        let acked = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::PubAck(_))) => return true,
                    Ok(_) => {}
                    Err(_) => return false,
                }
            }
        })
        .await
        .unwrap_or(false);
        if acked {
            // Sent once the event loop handles the request.
            client.disconnect().await.ok();
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                while let Ok(event) = eventloop.poll().await {
                    if let Event::Outgoing(rumqttc::Outgoing::Disconnect) = event {
                        break;
                    }
                }
            })
            .await;
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `fleetgate serve` as node `id` of a cluster, in `dir` (its data, WAL
/// and keys; the root key copied in on first start).
fn node_process(
    postgres: &Postgres,
    tables: &Path,
    root_key: &Path,
    id: &str,
    dir: &Path,
) -> ServeProcess {
    ServeProcess::spawn(dir, &node_config(postgres, tables, root_key, id, dir, 200))
}

/// The configuration of node `id`, its rows committed every `roll_age_ms`.
fn node_config(
    postgres: &Postgres,
    tables: &Path,
    root_key: &Path,
    id: &str,
    dir: &Path,
    roll_age_ms: u64,
) -> String {
    copy_root_key(root_key, dir);
    format!(
        "[storage]\nuri = \"file://{}\"\nroll_age_ms = {roll_age_ms}\n\
         [pipeline]\nworkers = 2\n\
         [cluster]\nnode_id = \"{id}\"\ncontrol_plane = \"{}\"\nlease_secs = 3\n",
        tables.display(),
        postgres.url()
    )
}

/// The cluster's root key into node `dir`, on its first start.
fn copy_root_key(root_key: &Path, dir: &Path) {
    let key = dir.join("keys/root.key");
    if !key.exists() {
        fleetgate::core::fsio::create_dir_all(&dir.join("keys")).expect("keys dir");
        std::fs::copy(root_key, &key).expect("the cluster's root key");
    }
}

/// The configuration of node `id` with the tables in `s3`'s bucket.
fn s3_node_config(
    postgres: &Postgres,
    s3: &S3Server,
    root_key: &Path,
    id: &str,
    dir: &Path,
) -> String {
    copy_root_key(root_key, dir);
    format!(
        "[storage]\nuri = \"s3://{BUCKET}/fleet\"\nroll_age_ms = 200\n\
         [storage.s3]\nendpoint = \"http://{}\"\nallow_http = true\n\
         access_key_id = \"test\"\nsecret_access_key = \"test\"\n\
         request_timeout_ms = 5000\nmax_retries = 3\n\
         [pipeline]\nworkers = 2\n\
         [cluster]\nnode_id = \"{id}\"\ncontrol_plane = \"{}\"\nlease_secs = 3\n",
        s3.addr,
        postgres.url()
    )
}

/// The number in the first row of `sql`'s answer over the tables of `root`.
async fn count_on(root: &fleetgate::store::StoreRoot, sql: &str) -> i64 {
    let registry = fleetgate::schema::Registry::load().expect("schemas");
    let rules = fleetgate::lifecycle::retention::Retention::load(None, &registry).expect("rules");
    let now = fleetgate::core::clock::now_ms();
    match fleetgate::query::session_on(root, &registry, &rules, now).await {
        Ok(ctx) => match fleetgate::query::run(&ctx, sql).await {
            Ok(batches) => first_integer(&batches),
            Err(_) => 0,
        },
        Err(_) => 0,
    }
}

/// Whether a `fleetgate serve` process holds the maintenance lease.
fn holds_maintenance(node: &ServeProcess) -> bool {
    gauge(node, "fleetgate_maintenance_lease_held") == Some(1)
}

/// Rows of the diagnostics table under `tables` (0 before its first commit).
async fn diagnostics_stored(tables: &Path) -> i64 {
    match tables.join("diagnostics/_delta_log").exists() {
        true => count(tables, "SELECT count(*) FROM diagnostics").await,
        false => 0,
    }
}

/// A node killed with its disk lost (nothing of its data directory left):
/// what it had acknowledged, and no table held yet, is in its WAL copies in
/// the shared store. Once its lease lapsed, the node holding the
/// maintenance lease stores it, each record once; the copies are deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_node_acknowledged_survives_the_node_and_its_disk() {
    let cluster = Cluster::start();
    let (postgres, tables, root_key) = (&cluster.postgres, &cluster.tables, &cluster.root_key);
    let dir_two = tempfile::tempdir().expect("dir");
    let two = node_process(postgres, tables, root_key, "node-2", dir_two.path());
    wait_for(|| holds_maintenance(&two));

    // Node 1 commits to the tables only once a minute: what it acknowledges
    // stays in its WAL, on its disk and in its copies.
    let dir_one = tempfile::tempdir().expect("dir");
    let config = node_config(postgres, tables, root_key, "node-1", dir_one.path(), 60_000);
    let one = ServeProcess::spawn(dir_one.path(), &config);
    let fleet = vins(25);
    let records: Vec<Message> = fleet
        .iter()
        .flat_map(|vin| (1..=2).map(|seq| diagnostics(vin, seq, NOW)))
        .collect();
    publish_all(one.addr, &records).await;
    assert_eq!(one.rows_stored("diagnostics"), 0, "nothing committed yet");
    one.kill();
    drop(dir_one);

    let deadline = std::time::Instant::now() + DEADLINE;
    while diagnostics_stored(tables).await < 50 {
        assert!(
            std::time::Instant::now() < deadline,
            "node 1's acknowledged records were not stored from its copies"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    wait_for(|| !holds_files(&tables.join("_fleetgate_wal")));
    two.terminate();
    assert_eq!(
        diagnostics_stored(tables).await,
        50,
        "each acknowledged record once"
    );
    assert_eq!(
        count(
            tables,
            "SELECT count(*) FROM (SELECT DISTINCT vehicle_id, seq FROM diagnostics)"
        )
        .await,
        50
    );
}

/// Whether any file is left below `dir`.
fn holds_files(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|entries| {
        entries.flatten().any(|e| {
            let path = e.path();
            !path.is_dir() || holds_files(&path)
        })
    })
}

/// Two processes under one `cluster.node_id` would commit under the same
/// Delta transaction ids and skip each other's rows: the second is refused
/// while the first keeps its lease, naming the name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_under_a_running_node_s_name_is_refused() {
    let cluster = Cluster::start();
    let (postgres, tables, root_key) = (&cluster.postgres, &cluster.tables, &cluster.root_key);
    let (dir_one, dir_two) = (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    );
    let one = node_process(postgres, tables, root_key, "node-1", dir_one.path());
    let twin = node_config(postgres, tables, root_key, "node-1", dir_two.path(), 200);
    let stderr = ServeProcess::refused(dir_two.path(), &twin);
    assert!(
        stderr.contains(r#"cluster.node_id "node-1" is in use"#),
        "{stderr}"
    );
    // The first runs on, and restarts on its own disk at once.
    one.terminate();
    node_process(postgres, tables, root_key, "node-1", dir_one.path()).terminate();
}

/// Vehicles each on a connection of their own, through the shipped HAProxy
/// configuration to two `fleetgate serve` processes: each vehicle keeps to
/// one node; once that node is killed (SIGKILL, right after acknowledging
/// a round), its vehicles reconnect and reach the other; once it restarts,
/// every acknowledged record is stored exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vehicles_reach_one_node_through_haproxy_and_another_when_it_is_killed() {
    let cluster = Cluster::start();
    let (postgres, tables, root_key) = (&cluster.postgres, &cluster.tables, &cluster.root_key);
    let (dir_one, dir_two) = (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    );
    let one = node_process(postgres, tables, root_key, "node-1", dir_one.path());
    let two = node_process(postgres, tables, root_key, "node-2", dir_two.path());
    let listen = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
        probe.local_addr().expect("addr")
    };
    let _haproxy = Haproxy::start(listen, &[(one.addr, one.admin), (two.addr, two.admin)]);
    let fleet = vins(20);
    let round = |seq: u64| {
        let fleet = fleet.clone();
        async move {
            for vin in &fleet {
                vehicle_publishes(listen, vin, &diagnostics(vin, seq, NOW)).await;
            }
        }
    };
    let stored = |node: &ServeProcess| node.rows_stored("diagnostics");
    round(1).await;
    wait_for(|| stored(&one) + stored(&two) == 20);
    let (first_one, first_two) = (stored(&one), stored(&two));
    assert!(
        first_one > 0 && first_two > 0,
        "both nodes take vehicles: {first_one} + {first_two}"
    );
    // Each vehicle comes back to the node it reached before.
    round(2).await;
    wait_for(|| stored(&one) + stored(&two) == 40);
    assert_eq!((stored(&one), stored(&two)), (2 * first_one, 2 * first_two));

    // Node 1 is killed right after acknowledging round 3 (some of it may be
    // in its WAL only); its vehicles reconnect through HAProxy to node 2.
    round(3).await;
    one.kill();
    round(4).await;
    wait_for(|| stored(&two) == 4 * first_two + first_one);
    // Node 1 restarts on its disk and stores what its WAL holds.
    let one = node_process(postgres, tables, root_key, "node-1", dir_one.path());
    let all = || count(tables, "SELECT count(*) FROM diagnostics");
    let deadline = std::time::Instant::now() + DEADLINE;
    while all().await < 80 {
        assert!(std::time::Instant::now() < deadline, "not all 80 stored");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    one.terminate();
    two.terminate();
    assert_eq!(all().await, 80, "every acknowledged record stored, once");
}

/// A node's WAL entries are stored under its name: renaming a node
/// (`cluster.node_id`) while its WAL holds entries would store them again.
/// fleetgate refuses that start, naming both names; under its old name it
/// stores them, and after that clean stop the rename is safe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wal_written_as_one_node_is_not_replayed_under_another_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Rows stay in the WAL only until a roll, a minute away.
    let plain = "[storage]\nroll_age_ms = 60000\n";
    let renamed = format!("{plain}[cluster]\nnode_id = \"node-1\"\n");
    let server = ServeProcess::spawn(dir.path(), plain);
    publish_all(
        server.addr,
        &[diagnostics(A, 1, NOW), diagnostics(A, 2, NOW)],
    )
    .await;
    server.kill();

    let stderr = ServeProcess::refused(dir.path(), &renamed);
    assert!(
        stderr.contains(r#"written as node """#) && stderr.contains(r#"node "node-1""#),
        "{stderr}"
    );

    ServeProcess::spawn(dir.path(), plain).terminate();
    ServeProcess::spawn(dir.path(), &renamed).terminate();
    let data = dir.path().join("data");
    assert_eq!(count(&data, "SELECT count(*) FROM diagnostics").await, 2);
}

/// A gauge of a `fleetgate serve` process's `/metrics`, by its full name.
fn gauge(node: &ServeProcess, name: &str) -> Option<u64> {
    let (_, text) = http_request(node.admin, "GET", "/metrics", None, "");
    let prefix = format!("{name} ");
    text.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .and_then(|value| value.trim().parse::<f64>().ok())
        .map(|value| value as u64)
}

/// Once a node can no longer trust that it holds the lease on its name
/// (here a node storing its WAL for it took it; a partition from PostgreSQL
/// looks the same to the node), it commits nothing and acknowledges
/// nothing: its publishes wait in its WAL. With the lease back, it copies,
/// acknowledges and stores them, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_lost_the_lease_on_its_name_commits_nothing_until_it_is_back() {
    let cluster = Cluster::start();
    let (postgres, tables, root_key) = (&cluster.postgres, &cluster.tables, &cluster.root_key);
    let dir = tempfile::tempdir().expect("dir");
    let one = node_process(postgres, tables, root_key, "node-1", dir.path());
    let first: Vec<Message> = vins(10).iter().map(|v| diagnostics(v, 1, NOW)).collect();
    publish_all(one.addr, &first).await;
    wait_for(|| one.rows_stored("diagnostics") == 10);
    assert_eq!(gauge(&one, "fleetgate_node_lease_held"), Some(1));

    let plane = ControlPlane::connect(&postgres.url()).expect("control plane");
    let set_holder = |sql: &'static str| {
        plane
            .run(|client| Ok(client.execute(sql, &[])?))
            .expect("lease row")
    };
    set_holder(
        "UPDATE fleetgate_leases SET holder = 'storing-for-a-dead-node:node-2', \
         expires_at = now() + interval '1 hour' WHERE name = 'node:node-1'",
    );
    wait_for(|| gauge(&one, "fleetgate_node_lease_held") == Some(0));
    let health = || http_request(one.admin, "GET", "/health", None, "").0;
    assert_eq!(
        health(),
        503,
        "a load balancer sends its vehicles elsewhere"
    );
    let second: Vec<Message> = vins(10).iter().map(|v| diagnostics(v, 2, NOW)).collect();
    let addr = one.addr;
    let publishing = tokio::spawn(async move { publish_all(addr, &second).await });
    wait_for(|| {
        gauge(
            &one,
            "fleetgate_write_errors_rows_total{table=\"diagnostics\"}",
        ) > Some(0)
    });
    assert!(
        !publishing.is_finished(),
        "a fenced node acknowledges nothing"
    );
    assert_eq!(
        one.rows_stored("diagnostics"),
        10,
        "a fenced node commits nothing"
    );
    assert_eq!(diagnostics_stored(tables).await, 10);

    set_holder("DELETE FROM fleetgate_leases WHERE name = 'node:node-1'");
    wait_for(|| gauge(&one, "fleetgate_node_lease_held") == Some(1));
    assert_eq!(health(), 200);
    publishing
        .await
        .expect("every PUBACK once the lease is back");
    wait_for(|| one.rows_stored("diagnostics") == 20);
    one.terminate();
    assert_eq!(diagnostics_stored(tables).await, 20);
}

/// Whether `addr` accepts an MQTT login as `vin` with `password`.
async fn logs_in(addr: std::net::SocketAddr, vin: &str, password: &str) -> bool {
    let mut options = rumqttc::MqttOptions::new(vin, addr.ip().to_string(), addr.port());
    options.set_credentials(vin, password);
    let (_client, mut eventloop) = rumqttc::AsyncClient::new(options, 10);
    let answer = tokio::time::timeout(DEADLINE, async {
        loop {
            match eventloop.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => return true,
                Ok(_) => {}
                Err(_) => return false,
            }
        }
    });
    answer.await.expect("a CONNACK or a refusal")
}

/// A vehicle credential issued through the shared store works on every
/// node, and once revoked, keeps the vehicle out of every node (each looks
/// at the store at most once a second).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vehicle_credential_and_its_revocation_hold_on_every_node() {
    use fleetgate::control::documents::Document;
    use fleetgate::ingest::auth;
    let cluster = Cluster::start();
    let (postgres, tables, root_key) = (&cluster.postgres, &cluster.tables, &cluster.root_key);
    let keys = &cluster.keys;
    let with_logins = |c: &mut fleetgate::config::Config| {
        c.broker.credentials_file = Some(c.storage.key_file.with_file_name("credentials.json"));
    };
    let one = node_with(postgres, tables, root_key, "node-1", with_logins);
    let two = node_with(postgres, tables, root_key, "node-2", with_logins);
    let plane = Arc::new(ControlPlane::connect(&postgres.url()).expect("control plane"));
    let store = Document::at(Some(&plane), auth::CREDENTIALS, "unused".into());
    let vin = &vins(1)[0];
    let password = auth::issue(&store, &keys.redaction_key(), vin, NOW).expect("issue");

    for node in [&one, &two] {
        let addr = node.handle.mqtt_addr();
        assert!(
            logs_in(addr, vin, &password).await,
            "the credential works on every node"
        );
        assert!(!logs_in(addr, vin, "a-guess").await);
    }
    assert!(auth::revoke(&store, &keys.redaction_key(), vin).expect("revoke"));
    let deadline = std::time::Instant::now() + DEADLINE;
    for node in [&one, &two] {
        while logs_in(node.handle.mqtt_addr(), vin, &password).await {
            assert!(
                std::time::Instant::now() < deadline,
                "revoked, still let in"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// A node cut off from PostgreSQL while another run of it was started
/// elsewhere and took its name: once it sees that, it stops (status 75),
/// for both would number their WAL entries alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_name_another_run_took_stops() {
    let cluster = Cluster::start();
    let dir = tempfile::tempdir().expect("dir");
    let (postgres, tables, root_key) = (&cluster.postgres, &cluster.tables, &cluster.root_key);
    let mut one = node_process(postgres, tables, root_key, "node-1", dir.path());
    let plane = ControlPlane::connect(&postgres.url()).expect("control plane");
    plane
        .run(|client| {
            Ok(client.execute(
                "UPDATE fleetgate_leases SET holder = 'node-1/1-0000beef', \
                 expires_at = now() + interval '1 hour' WHERE name = 'node:node-1'",
                &[],
            )?)
        })
        .expect("lease row");
    let deadline = std::time::Instant::now() + DEADLINE;
    let status = loop {
        if let Some(status) = one.child.try_wait().expect("wait") {
            break status;
        }
        assert!(std::time::Instant::now() < deadline, "the node ran on");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(status.code(), Some(75));
}

/// PostgreSQL, an S3 server (moto), three nodes and HAProxy on one
/// machine. Thirty vehicles publish at once through HAProxy, each on its
/// own connection and re-sending what got no PUBACK, as vehicles do, while
/// loadgen adds a fleet of its own. In the middle of it the node holding
/// the maintenance lease is SIGKILLed: its vehicles go on through the
/// other two, the lease moves to one of them, and the node, restarted on
/// its disk, stores what it acknowledged. The same query through every
/// node gives the same answer; loadgen's verification finds each record it
/// had acknowledged stored exactly once; and once compaction closes the
/// hour, each of the vehicles' records is in the table exactly once (one
/// the dead node had made durable and its vehicle re-sent to another node
/// is stored twice until then).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_lose_the_maintenance_holder_mid_run_and_keep_every_record_once() {
    use loadgen::run::{Progress, RunConfig, Stop};
    const RECORDS: u64 = 10;
    let cluster = Cluster::start();
    let (postgres, root_key) = (&cluster.postgres, &cluster.root_key);
    let s3 = S3Server::start();
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().expect("dir")).collect();
    let start = |i: usize| {
        let id = format!("node-{}", i + 1);
        let config = s3_node_config(postgres, &s3, root_key, &id, dirs[i].path());
        ServeProcess::spawn(dirs[i].path(), &config)
    };
    let mut nodes: Vec<Option<ServeProcess>> = (0..3).map(|i| Some(start(i))).collect();
    let listen = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
        probe.local_addr().expect("addr")
    };
    let backends: Vec<_> = nodes.iter().flatten().map(|n| (n.addr, n.admin)).collect();
    let _haproxy = Haproxy::start(listen, &backends);
    let holder = |nodes: &[Option<ServeProcess>]| {
        nodes
            .iter()
            .position(|n| n.as_ref().is_some_and(holds_maintenance))
    };
    wait_for(|| holder(&nodes).is_some());
    let killed = holder(&nodes).expect("a holder");

    let load = RunConfig {
        host: "127.0.0.1".into(),
        port: listen.port(),
        vehicles: 60,
        // HAProxy hashes these nine client ids over all three nodes.
        connections: 9,
        qos: rumqttc::QoS::AtLeastOnce,
        // Running on well past the kill.
        stop: Stop::Duration(Duration::from_secs(15)),
        rate: Some(100.0),
        records_per_publish: 1,
        inflight: 20,
        mix: loadgen::fleet::Mix {
            rtti: 2,
            diagnostics: 2,
            charging: 1,
            teleservice: 1,
        },
        seed: 5,
        drain_timeout: DEADLINE,
    };
    let loadgen = {
        let load = load.clone();
        tokio::spawn(async move {
            loadgen::run::run(&load, "CLUSTR", Arc::new(Progress::default())).await
        })
    };
    let fleet = vins(30);
    let sending: Vec<_> = fleet
        .iter()
        .map(|vin| {
            let vin = vin.clone();
            tokio::spawn(async move {
                for seq in 1..=RECORDS {
                    let record = diagnostics(&vin, seq, NOW + seq as i64 * 1_000);
                    vehicle_publishes(listen, &vin, &record).await;
                }
            })
        })
        .collect();
    let stored = |nodes: &[Option<ServeProcess>]| -> u64 {
        nodes
            .iter()
            .flatten()
            .map(|n| n.rows_stored("diagnostics"))
            .sum()
    };
    wait_for(|| stored(&nodes) >= 100);
    nodes[killed].take().expect("the holder").kill();
    for vehicle in sending {
        vehicle
            .await
            .expect("every record of the vehicle acknowledged");
    }
    let outcome = loadgen.await.expect("loadgen").expect("loadgen run");
    wait_for(|| holder(&nodes).is_some_and(|i| i != killed));

    nodes[killed] = Some(start(killed));
    let root = {
        let mut config = fleetgate::config::Config::default();
        config.storage.uri = Some(format!("s3://{BUCKET}/fleet"));
        config.storage.s3.endpoint = Some(format!("http://{}", s3.addr));
        config.storage.s3.allow_http = true;
        config.storage.s3.access_key_id = Some("test".into());
        config.storage.s3.secret_access_key = Some("test".into());
        fleetgate::store::StoreRoot::from_config(&config.storage).expect("store")
    };
    let ours = format!(
        "SELECT count(*) FROM (SELECT DISTINCT vehicle_id, seq FROM diagnostics \
         WHERE ts >= to_timestamp_millis({NOW}) AND ts <= to_timestamp_millis({}))",
        NOW + RECORDS as i64 * 1_000
    );
    let total = (fleet.len() as u64 * RECORDS) as i64;
    let deadline = std::time::Instant::now() + DEADLINE;
    while count_on(&root, &ours).await < total {
        assert!(
            std::time::Instant::now() < deadline,
            "not every record stored"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Every node answers the operator alike (the registry is shared).
    let admin_token = |i: usize| {
        std::fs::read_to_string(dirs[i].path().join("keys/admin.token"))
            .expect("admin token")
            .trim()
            .to_owned()
    };
    let first = nodes[0].as_ref().expect("node 1");
    let (status, body) = http_request(
        first.admin,
        "POST",
        "/admin/principals",
        Some(&admin_token(0)),
        r#"{"id":"ops","kind":"operator"}"#,
    );
    assert_eq!(status, 200, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).expect("json");
    let operator = answer["token"].as_str().expect("token").to_owned();
    let sql = serde_json::json!({
        "sql": format!(
            "SELECT vehicle_id, count(DISTINCT seq) AS records, max(seq) AS last \
             FROM diagnostics WHERE ts <= to_timestamp_millis({}) \
             GROUP BY vehicle_id ORDER BY vehicle_id",
            NOW + RECORDS as i64 * 1_000
        ),
        "purpose": "operations",
    })
    .to_string();
    let answers: Vec<(u16, String)> = nodes
        .iter()
        .flatten()
        .map(|n| http_request(n.admin, "POST", "/sql", Some(&operator), &sql))
        .collect();
    assert_eq!(answers[0].0, 200, "{}", answers[0].1);
    assert!(answers.iter().all(|a| *a == answers[0]), "{answers:?}");
    let rows: Vec<serde_json::Value> = serde_json::from_str(&answers[0].1).expect("rows");
    assert_eq!(rows.len(), fleet.len());
    assert!(
        rows.iter()
            .all(|r| r["records"] == RECORDS && r["last"] == RECORDS)
    );

    for node in nodes.into_iter().flatten() {
        node.terminate();
    }
    // loadgen's run: every record it had acknowledged, once.
    let manifest = loadgen::verify::Manifest {
        run_tag: outcome.run_tag.clone(),
        vehicles: load.vehicles,
        started_ms: outcome.started_ms,
        finished_ms: outcome.finished_ms,
        sent_by_stream: outcome.sent_by_stream,
        acks: outcome.acks.clone(),
    };
    let store = loadgen::verify::StoreLocation {
        store: root.clone(),
        key_file: root_key.clone(),
        vault: loadgen::verify::VaultLocation::ControlPlane(postgres.url()),
    };
    let verdict = loadgen::verify::verify(&manifest, &store)
        .await
        .expect("verify");
    let acked: u64 = verdict.streams.iter().map(|s| s.acked).sum();
    assert!(verdict.ok && acked > 0, "{verdict:?}");

    let settings = fleetgate::store::Compaction {
        target_bytes: 128 << 20,
        zstd_level: 3,
    };
    let closed = fleetgate::core::clock::now_ms() + 2 * 3_600_000;
    fleetgate::store::compact(&root, closed, settings).expect("compaction");
    let rows = format!(
        "SELECT count(*) FROM diagnostics WHERE ts >= to_timestamp_millis({NOW}) \
         AND ts <= to_timestamp_millis({})",
        NOW + RECORDS as i64 * 1_000
    );
    assert_eq!(
        count_on(&root, &rows).await,
        total,
        "every acknowledged record once"
    );
}
