//! Distributed SQL on Ballista: `fleetgate ballista scheduler` and two
//! `fleetgate ballista executor` processes run the queries a node sends
//! them (`"engine": "ballista"` on `POST /sql`), over the node's tables and
//! under the same policy views as a local query. The answers are the local
//! ones, a licensee still gets aggregates only, the principals whose views
//! cannot leave the node are refused, and the executors did the work
//! (their work directories hold the job's shuffle files, owner-only).

mod common;

use std::io::BufRead;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use common::*;

/// A child process killed when dropped.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A port nothing listens on now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// `fleetgate ballista scheduler` on port 0, and where it listens.
fn scheduler(dir: &Path) -> (Running, SocketAddr) {
    let log = std::fs::File::create(dir.join("scheduler.log")).expect("log");
    let mut child = Command::new(BIN)
        .current_dir(dir)
        .args(["ballista", "scheduler", "--bind", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .expect("scheduler starts");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    std::io::BufReader::new(stdout)
        .read_line(&mut line)
        .expect("the scheduler's first line");
    let addr = line
        .trim()
        .rsplit("df://")
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address in {line:?}"));
    (Running(child), addr)
}

/// `fleetgate ballista executor` for `scheduler`, its work directory under `dir`.
fn executor(dir: &Path, name: &str, scheduler: SocketAddr) -> (Running, PathBuf) {
    let work = dir.join(name);
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).expect("log");
    let child = Command::new(BIN)
        .current_dir(dir)
        .args(["ballista", "executor", "--scheduler"])
        .arg(scheduler.to_string())
        .arg("--bind")
        .arg(format!("127.0.0.1:{}", free_port()))
        .arg("--grpc-port")
        .arg(free_port().to_string())
        .arg("--work-dir")
        .arg(&work)
        .stderr(log)
        .spawn()
        .expect("executor starts");
    (Running(child), work)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ballista_answers_as_the_node_does_under_the_same_policy() {
    let cluster_dir = tempfile::tempdir().expect("tempdir");
    let (_scheduler, at) = scheduler(cluster_dir.path());
    let server =
        TestServer::start_with(|c| c.access.ballista_scheduler = Some(format!("df://{at}")));
    let executors: Vec<(Running, PathBuf)> = ["executor-1", "executor-2"]
        .iter()
        .map(|name| executor(cluster_dir.path(), name, at))
        .collect();

    // Six vehicles: enough for a licensee's groups of five.
    let now = fleetgate::core::clock::now_ms();
    let vins: Vec<String> = (1..=6).map(|i| format!("WMW11DJ04N2T{i:05}")).collect();
    let mut messages = Vec::new();
    for (i, vin) in vins.iter().enumerate() {
        let i = i as u64;
        messages.push(charging(vin, 1, now - HOUR - i as i64, &format!("SE-{i}")));
        for seq in 0..=i {
            messages.push(diagnostics(vin, seq, now - 2 * HOUR + seq as i64 * 1000));
        }
        messages.push(rtti_probe(vin, now - HOUR));
    }
    // One car alone in a cell: a group the licensee never sees.
    messages.push(record(
        &vins[0],
        fleetgate::schema::Stream::Rtti,
        2,
        now - HOUR,
        serde_json::json!({"latitude": 55.6, "longitude": 13.0}),
    ));
    let total = messages.len() as u64;
    publish_all(server.handle.mqtt_addr(), &messages).await;
    wait_for(|| server.handle.metrics().totals().stored == total);

    let addr = server.handle.admin_addr();
    let admin = server.admin();
    let operator = admin.principal(r#"{"id":"ops","kind":"operator"}"#);
    let licensee = admin.principal(r#"{"id":"lic","kind":"licensee"}"#);
    let user = admin.principal(r#"{"id":"alice","kind":"user"}"#);
    let ask = |token: &str, purpose: &str, sql: &str, engine: &str| {
        let request = serde_json::json!({ "sql": sql, "purpose": purpose, "engine": engine });
        http_request(addr, "POST", "/sql", Some(token), &request.to_string())
    };

    for sql in [
        "SELECT count(*) AS n FROM charging",
        "SELECT vehicle_id, count(*) AS n, max(seq) AS last FROM diagnostics \
         GROUP BY vehicle_id ORDER BY vehicle_id",
        "SELECT c.vehicle_id, count(*) AS readings FROM charging c \
         JOIN diagnostics d ON c.vehicle_id = d.vehicle_id \
         GROUP BY c.vehicle_id ORDER BY readings, c.vehicle_id",
        "SELECT * FROM charging ORDER BY vehicle_id",
        "SELECT date, hour, count(*) AS n FROM diagnostics WHERE seq >= 2 \
         GROUP BY date, hour ORDER BY date, hour",
    ] {
        let local = ask(&operator, "operations", sql, "local");
        let distributed = ask(&operator, "operations", sql, "ballista");
        assert_eq!(local.0, 200, "{sql}: {}", local.1);
        assert_eq!(distributed, local, "{sql}");
    }
    let (_, charged) = ask(
        &operator,
        "operations",
        "SELECT count(*) AS n FROM charging",
        "ballista",
    );
    assert_eq!(charged, r#"[{"n":6}]"#);

    // A licensee: its aggregates, the same on the cluster; rows never.
    let cells = "SELECT vehicles, trips FROM rtti";
    let local = ask(&licensee, "traffic_information", cells, "local");
    assert_eq!(local.0, 200, "{}", local.1);
    assert_ne!(local.1, "[]", "six vehicles in one cell make a group");
    assert_eq!(
        ask(&licensee, "traffic_information", cells, "ballista"),
        local
    );
    // An expression that fails on a hidden row runs on none, here as there.
    let probe = |condition: &str| {
        format!(
            "SELECT count(*) AS n FROM rtti \
             WHERE 1 / (CASE WHEN {condition} THEN 0 ELSE 1 END) = 1"
        )
    };
    let hidden = probe("latitude_cell < 58");
    let hidden = ask(&licensee, "traffic_information", &hidden, "ballista");
    let no_row = probe("latitude_cell > 90");
    let no_row = ask(&licensee, "traffic_information", &no_row, "ballista");
    assert_eq!(hidden, (200, r#"[{"n":1}]"#.to_owned()));
    assert_eq!(no_row, hidden);
    for sql in [
        "SELECT vehicle_id FROM charging",
        "SELECT latitude FROM rtti",
    ] {
        let (status, body) = ask(&licensee, "product_improvement", sql, "ballista");
        assert_ne!(status, 200, "{sql}: {body}");
        assert_eq!(
            (status, body),
            ask(&licensee, "product_improvement", sql, "local"),
            "{sql}"
        );
    }

    // Views that name vehicles, decrypt, or read this node's files stay here.
    let (status, body) = ask(&user, "own_data_access", "SELECT 1", "ballista");
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("operator and licensees"), "{body}");
    let (status, body) = ask(
        &operator,
        "operations",
        "SELECT * FROM query_audit",
        "ballista",
    );
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("query audit"), "{body}");

    // The audit says where each query ran.
    let audit = "SELECT action, count(*) AS n FROM query_audit \
                 WHERE principal = 'lic' AND decision <> 'refuse' GROUP BY action ORDER BY action";
    let (status, body) = ask(&operator, "operations", audit, "local");
    assert_eq!(status, 200, "{body}");
    let actions: Vec<serde_json::Value> = serde_json::from_str(&body).expect("rows");
    let ran = |action: &str| {
        actions
            .iter()
            .find(|r| r["action"] == action)
            .and_then(|r| r["n"].as_u64())
    };
    assert!(
        ran("query").is_some() && ran("query_ballista").is_some(),
        "{body}"
    );

    // The executors ran the jobs: their shuffle files, readable by no one else.
    let written: Vec<PathBuf> = executors
        .iter()
        .flat_map(|(_, work)| files_under(work))
        .collect();
    assert!(
        written
            .iter()
            .any(|f| f.extension().is_some_and(|e| e == "arrow" || e == "data")),
        "no shuffle file under the executors' work directories: {written:?}"
    );
    for (_, work) in &executors {
        if work.exists() {
            assert_owner_only(work);
        }
    }
}
