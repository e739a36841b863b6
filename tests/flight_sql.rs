//! Arrow Flight SQL through clients nobody here wrote: the ADBC Flight SQL
//! driver (PyPI `adbc-driver-flightsql`, Go) and `pyarrow.flight` (C++).
//! The same policy, refusals and audit as `POST /sql`: a user reads her own
//! vehicle's rows only, listings show only her views, a forbidden purpose
//! and a hidden table are refused naming their rule, a call without a
//! token is unauthenticated, and every query lands in the query audit.

mod common;

use common::*;

/// pyarrow has no Flight SQL client: a command is a protobuf Any, written by
/// hand. Run before the scripts below.
const PROTOBUF: &str = r#"
def field(number, payload):
    n, length = len(payload), b""
    while True:
        byte, n = n & 0x7F, n >> 7
        length += bytes([byte | 0x80 if n else byte])
        if not n:
            break
    return bytes([(number << 3) | 2]) + length + payload

def command(name, body):
    url = b"type.googleapis.com/arrow.flight.protocol.sql." + name.encode()
    return field(1, url) + field(2, body)
"#;

/// Runs every client call; prints one JSON object of answers and errors.
const CLIENTS: &str = r#"
import json, sys
import adbc_driver_flightsql.dbapi as adbc
import pyarrow.flight as fl

addr, alice, analyst = sys.argv[1:4]
uri = "grpc://" + addr
out = {}

def connect(token, purpose):
    options = {"adbc.flight.sql.rpc.call_header.x-fleetgate-purpose": purpose}
    if token:
        options["adbc.flight.sql.authorization_header"] = "Bearer " + token
    return adbc.connect(uri, db_kwargs=options)

def attempt(call):
    try:
        return {"ok": call()}
    except Exception as e:
        return {"error": type(e).__name__ + ": " + str(e)}

def rows(token, purpose, sql, parameters=None):
    with connect(token, purpose) as conn, conn.cursor() as cur:
        cur.execute(sql, parameters)
        table = cur.fetch_arrow_table()
        return {"columns": table.column_names,
                "rows": [list(r.values()) for r in table.to_pylist()]}

def tables(token, purpose):
    with connect(token, purpose) as conn:
        objects = conn.adbc_get_objects(depth="tables").read_all().to_pylist()
        schema = conn.adbc_get_table_schema("charging").names
    names = sorted(t["table_name"] for c in objects for s in c["catalog_db_schemas"]
                   for t in s["db_schema_tables"])
    return {"tables": names, "charging_columns": schema}

own = "own_data_access"
out["alice_rows"] = attempt(lambda: rows(alice, own, "SELECT vin, contract_number FROM charging ORDER BY vin"))
out["alice_partitions"] = attempt(lambda: rows(alice, own, "SELECT date, hour, vin FROM charging"))
out["alice_empty"] = attempt(lambda: rows(alice, own, "SELECT vin FROM charging WHERE seq < 0"))
out["alice_listing"] = attempt(lambda: tables(alice, own))
out["forbidden_purpose"] = attempt(lambda: rows(alice, "economic_situation", "SELECT 1"))
out["hidden_table"] = attempt(lambda: rows(alice, own, "SELECT count(*) FROM rtti"))
out["no_token"] = attempt(lambda: rows(None, own, "SELECT 1"))
out["parameters"] = attempt(lambda: rows(alice, own, "SELECT vin, contract_number FROM charging WHERE seq = $1", (1,)))
out["parameters_none_match"] = attempt(lambda: rows(alice, own, "SELECT vin FROM charging WHERE seq = $1", (7,)))
out["parameter_mistyped"] = attempt(lambda: rows(alice, own, "SELECT vin FROM charging WHERE seq = $1", ("WMW11DJ04N2T09999",)))

# `field` and `command`: PROTOBUF, run before this.

def pyarrow_rows(token, purpose, sql):
    client = fl.FlightClient(uri)
    options = fl.FlightCallOptions(headers=[
        (b"authorization", b"Bearer " + token.encode()),
        (b"x-fleetgate-purpose", purpose.encode())])
    cmd = command("CommandStatementQuery", field(1, sql.encode()))
    info = client.get_flight_info(fl.FlightDescriptor.for_command(cmd), options)
    table = client.do_get(info.endpoints[0].ticket, options).read_all()
    return [list(r.values()) for r in table.to_pylist()]

def first_batch_then_gone(token, purpose, sql):
    client = fl.FlightClient(uri)
    options = fl.FlightCallOptions(headers=[
        (b"authorization", b"Bearer " + token.encode()),
        (b"x-fleetgate-purpose", purpose.encode())])
    cmd = command("CommandStatementQuery", field(1, sql.encode()))
    info = client.get_flight_info(fl.FlightDescriptor.for_command(cmd), options)
    reader = client.do_get(info.endpoints[0].ticket, options)
    rows = reader.read_chunk().data.num_rows
    reader.cancel()
    client.close()
    return rows

big = ("SELECT 1 AS one FROM information_schema.columns a, information_schema.columns b, "
       "information_schema.columns c")
out["pyarrow_partial"] = attempt(lambda: first_batch_then_gone(analyst, "operations", big))
out["big_count"] = attempt(lambda: pyarrow_rows(analyst, "operations", "SELECT count(*) FROM (" + big + ") AS t"))
out["parameters_unbound"] = attempt(lambda: pyarrow_rows(alice, own, "SELECT vin FROM charging WHERE seq = $1"))
def forged_ticket(token):
    client = fl.FlightClient(uri)
    options = fl.FlightCallOptions(headers=[
        (b"authorization", b"Bearer " + token.encode()),
        (b"x-fleetgate-purpose", b"operations")])
    # A handle claiming bound values of absurd length: refused unread.
    handle = b"\x00" * 32 + b"\x00\xff\xff\xff\x7f" + b"\xff" * 64
    ticket = fl.Ticket(command("TicketStatementQuery", field(1, handle)))
    return client.do_get(ticket, options).read_all().num_rows

out["forged_ticket"] = attempt(lambda: forged_ticket(analyst))
out["pyarrow_operator"] = attempt(lambda: pyarrow_rows(analyst, "operations", "SELECT count(*) AS n FROM charging"))
out["pyarrow_wrong_token"] = attempt(lambda: pyarrow_rows("fg_not_a_token", "operations", "SELECT 1"))
print(json.dumps(out, default=str))
"#;

fn run_clients(addr: std::net::SocketAddr, alice: &str, analyst: &str) -> serde_json::Value {
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            &format!("{PROTOBUF}{CLIENTS}"),
            &addr.to_string(),
            alice,
            analyst,
        ])
        .output()
        .expect("python3 must be installed (see .ci/run)");
    assert!(
        out.status.success(),
        "the clients failed (pip install adbc-driver-flightsql pyarrow): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON")
}

fn error_of(answer: &serde_json::Value) -> String {
    answer["error"]
        .as_str()
        .unwrap_or_else(|| panic!("expected an error, got {answer}"))
        .to_owned()
}

/// A server that stored one charging row of vehicle A and one of B, an
/// hour old; and the time it was started at.
async fn two_vehicles_charged() -> (TestServer, i64) {
    let server = TestServer::start();
    let now = fleetgate::core::clock::now_ms();
    publish_all(
        server.handle.mqtt_addr(),
        &[
            charging(A, 1, now - HOUR, "SE-A-1"),
            charging(B, 1, now - HOUR, "SE-B-1"),
        ],
    )
    .await;
    wait_for(|| server.handle.metrics().totals().stored == 2);
    (server, now)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adbc_and_pyarrow_query_through_the_same_policy_and_audit() {
    let (server, now) = two_vehicles_charged().await;
    let admin = server.admin();
    let alice = admin.principal(r#"{"id":"alice","kind":"user"}"#);
    let analyst = admin.principal(r#"{"id":"analyst","kind":"operator"}"#);
    let (status, body) = admin.post(
        "/admin/transfers",
        &format!(r#"{{"user":"alice","vin":"{A}","at_ms":{}}}"#, now - DAY),
    );
    assert_eq!(status, 200, "{body}");

    let out = run_clients(server.handle.flight_sql_addr(), &alice, &analyst);
    // Each plain statement fetched ran the plan its description made: six
    // of them (alice's three, pyarrow's partial, count and operator's);
    // refused, prepared and forged ones planned anew or not at all.
    let reused = std::sync::atomic::Ordering::Relaxed;
    assert_eq!(
        server.handle.metrics().flight_sql_plans_reused.load(reused),
        6,
        "{out}"
    );

    // Her vehicle's row only, the contract decrypted for her.
    assert_eq!(
        out["alice_rows"]["ok"],
        serde_json::json!({"columns": ["vin", "contract_number"], "rows": [[A, "SE-A-1"]]}),
        "{out}"
    );
    // Partition columns (which the engine may hand out as dictionaries)
    // arrive as the schema announced them.
    assert_eq!(
        out["alice_partitions"]["ok"]["rows"]
            .as_array()
            .map(Vec::len),
        Some(1),
        "{out}"
    );
    // No rows still has the columns.
    assert_eq!(
        out["alice_empty"]["ok"],
        serde_json::json!({"columns": ["vin"], "rows": []}),
        "{out}"
    );
    // Listings: her views, not RTTI (no vehicle id), dead letters or the audit.
    let listing = &out["alice_listing"]["ok"];
    let tables: Vec<&str> = listing["tables"]
        .as_array()
        .unwrap_or_else(|| panic!("{out}"))
        .iter()
        .filter_map(|t| t.as_str())
        .collect();
    assert!(tables.contains(&"charging"), "{out}");
    for hidden in ["rtti", "dead_letters", "query_audit"] {
        assert!(!tables.contains(&hidden), "{hidden} listed: {out}");
    }
    let columns = listing["charging_columns"].to_string();
    assert!(
        columns.contains("\"vin\"") && !columns.contains("vehicle_id"),
        "{out}"
    );
    // Refusals name their rule; no token is unauthenticated.
    assert!(
        error_of(&out["forbidden_purpose"]).contains("§9.3"),
        "{out}"
    );
    let hidden = error_of(&out["hidden_table"]);
    assert!(
        hidden.contains("rtti") && hidden.contains("refused"),
        "{out}"
    );
    assert!(
        error_of(&out["no_token"])
            .to_lowercase()
            .contains("unauthenticated"),
        "{out}"
    );
    // A prepared statement with a bound parameter: the same view.
    assert_eq!(
        out["parameters"]["ok"]["rows"],
        serde_json::json!([[A, "SE-A-1"]]),
        "{out}"
    );
    assert_eq!(
        out["parameters_none_match"]["ok"]["rows"],
        serde_json::json!([]),
        "{out}"
    );
    assert!(
        error_of(&out["parameters_unbound"]).contains("prepare it and bind"),
        "{out}"
    );
    // A value that does not fit its parameter is refused naming the
    // parameter, never quoting the value: not in the reply, not in the audit.
    let mistyped = error_of(&out["parameter_mistyped"]);
    assert!(mistyped.contains("parameter $1"), "{out}");
    let value = "WMW11DJ04N2T09999";
    assert!(!mistyped.contains(value), "{out}");
    for file in files_under(&server.config.access.audit_dir) {
        let text = std::fs::read_to_string(&file).expect("audit file");
        assert!(!text.contains(value), "{}: {text}", file.display());
    }
    assert!(
        error_of(&out["forged_ticket"]).contains("not one this server handed out"),
        "{out}"
    );
    // pyarrow.flight alone: the operator's count over every vehicle.
    assert_eq!(
        out["pyarrow_operator"]["ok"],
        serde_json::json!([[2]]),
        "{out}"
    );
    assert!(
        error_of(&out["pyarrow_wrong_token"]).contains("Unauthenticated"),
        "{out}"
    );

    assert!(
        out["pyarrow_partial"]["ok"]
            .as_u64()
            .is_some_and(|rows| rows > 0),
        "{out}"
    );

    // The query audit has her answered query (one row) and her refusals,
    // and the answer whose client went away after one batch, ended early.
    let audit_lines = || {
        let mut lines = Vec::new();
        for file in files_under(&server.config.access.audit_dir) {
            let text = std::fs::read_to_string(file).expect("audit file");
            lines.extend(
                text.lines()
                    .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("audit line")),
            );
        }
        lines
    };
    let cut_short = |l: &serde_json::Value| {
        l["principal"] == "analyst"
            && l["action"] == "delivered"
            && l["reason"]
                .as_str()
                .is_some_and(|r| r.contains("the client went away"))
    };
    wait_for(|| audit_lines().iter().any(cut_short));
    let lines = audit_lines();
    let partial = lines.iter().find(|l| cut_short(l)).expect("checked above");
    let all_rows = out["big_count"]["ok"][0][0].as_u64().expect("count");
    assert!(
        partial["rows"].as_u64().is_some_and(|rows| rows < all_rows),
        "{partial} of {all_rows}"
    );
    let alices: Vec<&serde_json::Value> =
        lines.iter().filter(|l| l["principal"] == "alice").collect();
    assert!(
        alices.iter().any(|l| l["tables"] == "charging"
            && l["rows"] == 1
            && l["decision"] == "charging:filter"),
        "{lines:?}"
    );
    assert!(
        alices
            .iter()
            .any(|l| l["decision"] == "refuse" && l["purpose"] == "economic_situation"),
        "{lines:?}"
    );
    assert!(
        alices
            .iter()
            .any(|l| l["decision"] == "refuse" && l["tables"] == "rtti"),
        "{lines:?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l["principal"] == "analyst" && l["rows"] == 1),
        "{lines:?}"
    );
    server.handle.shutdown().expect("shutdown");
}

/// Describes a statement over Flight SQL, waits for a line on stdin, then
/// fetches the ticket it got: prints the first column of the first row.
const DESCRIBE_THEN_FETCH: &str = r#"
import sys
import pyarrow.flight as fl

addr, token, purpose, sql = sys.argv[1:5]
cmd = command("CommandStatementQuery", field(1, sql.encode()))
client = fl.FlightClient("grpc://" + addr)
options = fl.FlightCallOptions(headers=[
    (b"authorization", b"Bearer " + token.encode()),
    (b"x-fleetgate-purpose", purpose.encode())])
info = client.get_flight_info(fl.FlightDescriptor.for_command(cmd), options)
print("described", flush=True)
sys.stdin.readline()
table = client.do_get(info.endpoints[0].ticket, options).read_all()
print(table.column(0)[0].as_py(), flush=True)
"#;

/// A plan a description made does not outlive a vehicle event: charge
/// history switched off between the description and the fetch hides the
/// vehicle's charging rows from that very fetch, though it comes within the
/// plan's second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deletion_between_describe_and_fetch_reaches_the_answer() {
    use std::io::{BufRead, Write};
    let (server, _) = two_vehicles_charged().await;
    let admin = server.admin();
    let analyst = admin.principal(r#"{"id":"analyst","kind":"operator"}"#);
    let mut client = std::process::Command::new("python3")
        .args([
            "-c",
            &format!("{PROTOBUF}{DESCRIBE_THEN_FETCH}"),
            &server.handle.flight_sql_addr().to_string(),
            &analyst,
            "operations",
            "SELECT count(*) FROM charging",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3 with pyarrow (see .ci/run)");
    let mut lines = std::io::BufReader::new(client.stdout.take().expect("stdout")).lines();
    let mut next = || lines.next().expect("a line").expect("readable");
    assert_eq!(next(), "described");
    let (status, body) = admin.post(
        "/admin/events",
        &format!(r#"{{"event":"charge_history_off","vin":"{A}"}}"#),
    );
    assert_eq!(status, 200, "{body}");
    let mut stdin = client.stdin.take().expect("stdin");
    writeln!(stdin, "fetch").expect("write");
    assert_eq!(next(), "1", "only B's row: the deletion reached the answer");
    assert!(client.wait().expect("exit").success());
}
