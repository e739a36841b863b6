//! Data Act live access and the data dictionary on a running server: a
//! user follows their vehicle's rows as they are committed and resumes
//! where they stopped without a gap or a repeat; a third party follows
//! what a grant gives it until the grant is revoked; refusals and bounds;
//! the audit of every stream; and a dictionary that says what the schema
//! and retention files say, served over HTTP and part of the export.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// One Server-Sent Event.
#[derive(Debug, Clone)]
struct SseEvent {
    event: String,
    id: Option<String>,
    data: Value,
}

/// A `GET /live` stream read as a browser's EventSource would: HTTP/1.1,
/// chunked, events split on blank lines, comments skipped.
struct LiveClient {
    reader: BufReader<TcpStream>,
    /// Event text read but not yet split into events.
    pending: String,
    /// `rows` events of other tables read while waiting for one table's.
    stash: Vec<SseEvent>,
    /// The id of the last event read: where to resume.
    last_id: Option<String>,
}

impl LiveClient {
    /// Opens `/live?{query}`; the HTTP status and, on 200, the stream;
    /// otherwise the body.
    fn open(
        addr: SocketAddr,
        query: &str,
        token: &str,
        purpose: &str,
        last_id: Option<&str>,
    ) -> Result<Self, (u16, String)> {
        let mut stream = TcpStream::connect(addr).expect("connect");
        stream
            .set_read_timeout(Some(DEADLINE))
            .expect("read timeout");
        let resume = last_id.map_or(String::new(), |id| format!("Last-Event-ID: {id}\r\n"));
        write!(
            stream,
            "GET /live?{query} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\
             x-fleetgate-purpose: {purpose}\r\n{resume}Accept: text/event-stream\r\n\r\n"
        )
        .expect("request");
        let mut reader = BufReader::new(stream);
        let mut status_line = String::new();
        reader.read_line(&mut status_line).expect("status line");
        let status: u16 = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("status");
        let mut length = None;
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).expect("header");
            if line == "\r\n" {
                break;
            }
            if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                length = value.trim().parse::<usize>().ok();
            }
        }
        if status != 200 {
            let mut body = vec![0; length.unwrap_or(0)];
            reader.read_exact(&mut body).expect("body");
            return Err((status, String::from_utf8_lossy(&body).into_owned()));
        }
        Ok(Self {
            reader,
            pending: String::new(),
            stash: Vec::new(),
            last_id: None,
        })
    }

    /// The next event; `None` when the server closed the stream.
    fn next(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(end) = self.pending.find("\n\n") {
                let block: String = self.pending.drain(..end + 2).collect();
                let mut event = SseEvent {
                    event: "message".into(),
                    id: None,
                    data: Value::Null,
                };
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        event.event = v.trim().to_owned();
                    } else if let Some(v) = line.strip_prefix("id:") {
                        event.id = Some(v.trim().to_owned());
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                if data.is_empty() {
                    // A keep-alive comment: handed out, so that a waiting
                    // caller can look at its clock.
                    event.event = "comment".into();
                    return Some(event);
                }
                event.data = serde_json::from_str(&data).expect("JSON data");
                if event.id.is_some() {
                    self.last_id.clone_from(&event.id);
                }
                return Some(event);
            }
            // One chunk: its size in hex, the bytes, CRLF.
            let mut size = String::new();
            if self.reader.read_line(&mut size).ok()? == 0 {
                return None;
            }
            let size = usize::from_str_radix(size.trim(), 16).expect("chunk size");
            if size == 0 {
                return None;
            }
            let mut chunk = vec![0; size + 2];
            self.reader.read_exact(&mut chunk).ok()?;
            chunk.truncate(size);
            self.pending
                .push_str(&String::from_utf8(chunk).expect("UTF-8 events"));
        }
    }

    /// Events until `rows` rows of `table` came (other tables' rows and
    /// position events are kept too); panics past [`DEADLINE`].
    /// (A step hands out each table's rows in its own event, in no set
    /// order: rows of other tables read meanwhile are kept for later calls.)
    fn rows_of(&mut self, table: &str, rows: usize) -> (Vec<Value>, Vec<SseEvent>) {
        let started = Instant::now();
        let mut got = Vec::new();
        let (mut events, stashed): (Vec<SseEvent>, Vec<SseEvent>) = std::mem::take(&mut self.stash)
            .into_iter()
            .partition(|e| e.data["table"] == table);
        self.stash = stashed;
        for event in &events {
            got.extend(event.data["rows"].as_array().expect("rows").iter().cloned());
        }
        while got.len() < rows {
            assert!(started.elapsed() < DEADLINE, "only {got:?} of {table}");
            let event = self.next().expect("the stream ended early");
            assert_ne!(event.event, "end", "ended: {:?}", event.data);
            if event.event == "rows" {
                if event.data["table"] != table {
                    self.stash.push(event);
                    continue;
                }
                got.extend(event.data["rows"].as_array().expect("rows").iter().cloned());
            }
            events.push(event);
        }
        (got, events)
    }
}

/// Registers the user alice, holding `vin` since a day before `now`; her token.
fn alice_holds(admin: &Admin, vin: &str, now: i64) -> String {
    let alice = admin.principal(r#"{"id":"alice","kind":"user"}"#);
    let (status, body) = admin.post(
        "/admin/transfers",
        &format!(r#"{{"user":"alice","vin":"{vin}","at_ms":{}}}"#, now - DAY),
    );
    assert_eq!(status, 200, "{body}");
    alice
}

/// Alice (holding vehicle A since a day before `now`) following `charging`
/// on `server`, past the stream's `start` event.
fn alice_follows_charging(server: &TestServer, now: i64) -> LiveClient {
    let alice = alice_holds(&server.admin(), A, now);
    let addr = server.handle.admin_addr();
    let mut live =
        LiveClient::open(addr, "tables=charging", &alice, "own_data_access", None).expect("open");
    assert_eq!(live.next().expect("start").event, "start");
    live
}

/// Registers the repair shop `repair` and has alice grant it her vehicle
/// A's teleservice data from a day before `now`; its token and the grant id.
fn alice_grants_repair(admin: &Admin, alice: &str, now: i64) -> (String, String) {
    let repair = admin.principal(
        r#"{"id":"repair","kind":"third_party","role":"independent_repair","eea":true}"#,
    );
    let given = format!(
        r#"{{"recipient":"repair","vin":"{A}","streams":["teleservice"],"purpose":"repair_and_maintenance","from_ms":{}}}"#,
        now - DAY
    );
    let (status, body) = http_request(admin.addr, "POST", "/grants", Some(alice), &given);
    assert_eq!(status, 200, "{body}");
    let grant: Value = serde_json::from_str(&body).expect("json");
    let grant = grant["grant"].as_str().expect("grant id").to_owned();
    (repair, grant)
}

fn seqs(rows: &[Value]) -> Vec<i64> {
    rows.iter()
        .map(|r| r["seq"].as_i64().expect("seq"))
        .collect()
}

/// A user follows their own vehicle's charging and teleservice rows as they
/// are committed, sees nothing of another vehicle, and after reconnecting
/// with the last position gets exactly what it missed; a third party follows
/// what its grant gives until the grant is revoked; everything is audited.
#[test]
fn live_rows_follow_the_view_and_resume_without_gap_or_repeat() {
    let server = TestServer::start();
    let now = fleetgate::core::clock::now_ms();
    let addr = server.handle.admin_addr();
    let admin = server.admin();
    let alice = alice_holds(&admin, A, now);
    let mqtt = server.handle.mqtt_addr();
    let publish = |messages: &[Message]| publish_blocking(mqtt, messages);
    // A row stored before the stream opens is not live news.
    publish(&[charging(A, 1, now - HOUR, "SE-A-1")]);
    wait_for(|| server.handle.metrics().totals().stored == 1);

    let query = "tables=charging,teleservice";
    let mut live = LiveClient::open(addr, query, &alice, "own_data_access", None).expect("open");
    let start = live.next().expect("start");
    assert_eq!(start.event, "start");
    assert_eq!(
        start.data["tables"],
        serde_json::json!(["teleservice", "charging"])
    );
    publish(&[
        charging(A, 2, now - HOUR, "SE-A-2"),
        charging(B, 1, now - HOUR, "SE-B-1"),
        teleservice(A, 3, now - HOUR, "monthly"),
    ]);
    let (rows, _) = live.rows_of("charging", 1);
    assert_eq!(seqs(&rows), vec![2]);
    assert_eq!(rows[0]["vin"], A, "the user's view: VIN readable");
    assert_eq!(rows[0]["contract_number"], "SE-A-2");
    let (tele, _) = live.rows_of("teleservice", 1);
    assert_eq!(seqs(&tele), vec![3]);
    // Vehicle B's row is committed too, and never shown: wait until the
    // stream has moved past everything stored, then look at what came.
    wait_for(|| server.handle.metrics().totals().stored == 4);
    let mut last_id = live.last_id.clone().expect("an id");
    drop(live);

    // Missed while away: exactly these, once.
    publish(&[
        charging(A, 4, now - HOUR, "SE-A-4"),
        charging(A, 5, now - HOUR, "SE-A-5"),
        charging(B, 2, now - HOUR, "SE-B-2"),
    ]);
    wait_for(|| server.handle.metrics().totals().stored == 7);
    let mut live =
        LiveClient::open(addr, query, &alice, "own_data_access", Some(&last_id)).expect("resume");
    assert_eq!(live.next().expect("start").event, "start");
    publish(&[charging(A, 6, now - HOUR, "SE-A-6")]);
    let (rows, _) = live.rows_of("charging", 3);
    assert_eq!(
        seqs(&rows),
        vec![4, 5, 6],
        "missed rows once, then new ones"
    );
    last_id = live.last_id.clone().expect("an id");
    // The position is sealed: it tells nothing of the store's activity.
    assert!(!last_id.contains("charging"), "{last_id}");
    drop(live);

    // Far behind: 150 missed rows, each its own WAL entry (published one at
    // a time, each after the last one's PUBACK, so each in a group commit
    // of its own), more than a resumed stream's first step covers: they
    // come in several steps, every row once. A remote-managed session that
    // ended meanwhile is hidden at once (L1085-1087), live as in SQL.
    let missed: Vec<(String, Vec<u8>)> = (100..250)
        .map(|seq| charging(A, seq, now - HOUR, "SE-A"))
        .collect();
    for message in &missed {
        publish(std::slice::from_ref(message));
    }
    publish(&[with(
        charging(A, 7, now - HOUR, "SE-A-7"),
        serde_json::json!({ "remote_managed": true }),
    )]);
    wait_for(|| server.handle.metrics().totals().stored == 159);
    let (status, body) = admin.post(
        "/admin/events",
        &format!(r#"{{"event":"charging_session_ended","vin":"{A}","id":"S7"}}"#),
    );
    assert_eq!(status, 200, "{body}");
    let mut live =
        LiveClient::open(addr, query, &alice, "own_data_access", Some(&last_id)).expect("resume");
    let (rows, events) = live.rows_of("charging", 150);
    let mut got = seqs(&rows);
    got.sort_unstable();
    assert_eq!(got, (100..250).collect::<Vec<_>>(), "every missed row once");
    let steps = events.iter().filter(|e| e.event == "rows").count();
    assert!(steps >= 2, "150 entries behind came in {steps} step(s)");
    publish(&[charging(A, 8, now - HOUR, "SE-A-8")]);
    let (rows, _) = live.rows_of("charging", 1);
    assert_eq!(seqs(&rows), vec![8], "the ended session's row never came");
    drop(live);

    // A third party follows what alice's grant gives it, until she revokes it.
    let (repair, grant) = alice_grants_repair(&admin, &alice, now);
    let borrowed = LiveClient::open(
        addr,
        "tables=teleservice",
        &repair,
        "repair_and_maintenance",
        Some(&last_id),
    );
    assert!(
        matches!(&borrowed, Err((400, body)) if body.contains("live position")),
        "alice's position is hers only"
    );
    let refused = LiveClient::open(
        addr,
        "tables=charging",
        &repair,
        "repair_and_maintenance",
        None,
    );
    assert!(
        matches!(&refused, Err((403, body)) if body.contains("charging")),
        "no grant covers charging"
    );
    let mut followed = LiveClient::open(
        addr,
        "tables=teleservice",
        &repair,
        "repair_and_maintenance",
        None,
    )
    .expect("granted");
    assert_eq!(followed.next().expect("start").event, "start");
    publish(&[
        teleservice(A, 8, now - HOUR, "monthly"),
        teleservice(B, 9, now - HOUR, "monthly"),
    ]);
    let (rows, _) = followed.rows_of("teleservice", 1);
    assert_eq!(seqs(&rows), vec![8]);
    assert!(rows[0].get("vin").is_none(), "pseudonymised: {:?}", rows[0]);
    assert_ne!(rows[0]["vehicle_id"], Value::Null);
    assert!(
        rows[0].get("contact_phone").is_none_or(Value::is_null),
        "contact data stays hidden: {:?}",
        rows[0]
    );
    let (status, body) = http_request(
        addr,
        "DELETE",
        &format!("/grants/{grant}"),
        Some(&alice),
        "",
    );
    assert_eq!(status, 200, "{body}");
    publish(&[teleservice(A, 10, now - HOUR, "monthly")]);
    let ended = loop {
        let event = followed.next().expect("an end event");
        assert_ne!(
            event.event, "rows",
            "nothing after the revocation: {event:?}"
        );
        if event.event == "end" {
            break event;
        }
    };
    assert!(
        ended.data["reason"]
            .as_str()
            .is_some_and(|r| r.contains("teleservice")),
        "{ended:?}"
    );
    assert!(followed.next().is_none(), "the stream closes after `end`");

    // Every stream is in the audit: opened (`live`) and closed with the
    // rows it delivered (`delivered`), the revoked one as refused.
    let operator = admin.principal(r#"{"id":"ops","kind":"operator"}"#);
    let audit = r#"{"sql":"SELECT principal, action, decision, rows FROM query_audit WHERE action IN ('live', 'delivered') ORDER BY at","purpose":"operations"}"#;
    let rows: Vec<Value> = wait_for_value(|| {
        let (status, body) = http_request(addr, "POST", "/sql", Some(&operator), audit);
        assert_eq!(status, 200, "{body}");
        let rows: Vec<Value> = serde_json::from_str(&body).expect("rows");
        // The last stream's closing line is written once its task sees the end.
        (rows.iter().filter(|r| r["action"] == "delivered").count() == 4).then_some(rows)
    });
    let delivered: Vec<(&str, i64, &str)> = rows
        .iter()
        .filter(|r| r["action"] == "delivered")
        .map(|r| {
            (
                r["principal"].as_str().unwrap_or_default(),
                r["rows"].as_i64().unwrap_or(-1),
                r["decision"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        delivered,
        vec![
            ("alice", 2, "charging:filter,teleservice:filter"),
            ("alice", 3, "charging:filter,teleservice:filter"),
            ("alice", 151, "charging:filter,teleservice:filter"),
            ("repair", 1, "refuse"),
        ],
        "{rows:?}"
    );
    let opened: Vec<&str> = rows
        .iter()
        .filter(|r| r["action"] == "live")
        .map(|r| r["decision"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(
        opened,
        vec![
            "charging:filter,teleservice:filter",
            "charging:filter,teleservice:filter",
            "charging:filter,teleservice:filter",
            "error",
            "refuse",
            "teleservice:filter",
        ]
    );
    server.handle.shutdown().expect("shutdown");
}

/// Streams that keep up read the same window of each new commit, which the
/// server scans once for all of them; each still gets only what its own
/// principal's view holds: two users their own vehicle's rows, the
/// operator both, without the VIN.
#[test]
fn streams_at_one_position_each_get_their_own_view() {
    let server = TestServer::start();
    let now = fleetgate::core::clock::now_ms();
    let addr = server.handle.admin_addr();
    let admin = server.admin();
    let alice = alice_holds(&admin, A, now);
    let bob = admin.principal(r#"{"id":"bob","kind":"user"}"#);
    let (status, body) = admin.post(
        "/admin/transfers",
        &format!(r#"{{"user":"bob","vin":"{B}","at_ms":{}}}"#, now - DAY),
    );
    assert_eq!(status, 200, "{body}");
    let operator = admin.principal(r#"{"id":"ops","kind":"operator"}"#);
    let open = |token: &str, purpose: &str| {
        let mut live =
            LiveClient::open(addr, "tables=charging", token, purpose, None).expect("open");
        assert_eq!(live.next().expect("start").event, "start");
        live
    };
    let mut alices = open(&alice, "own_data_access");
    let mut bobs = open(&bob, "own_data_access");
    let mut operators = open(&operator, "operations");
    // Streams of one audience (one user's three, three operators for one
    // purpose) may share a window's JSON text (once a second asks for it;
    // whether they step in one reading is up to timing, and the reuse
    // itself is asserted by the unit tests): each still gets its own
    // view's rows.
    let mut alices_second = open(&alice, "own_data_access");
    let mut alices_third = open(&alice, "own_data_access");
    let second_operator = admin.principal(r#"{"id":"ops2","kind":"operator"}"#);
    let mut second_operators = open(&second_operator, "operations");
    let third_operator = admin.principal(r#"{"id":"ops3","kind":"operator"}"#);
    let mut third_operators = open(&third_operator, "operations");

    let mqtt = server.handle.mqtt_addr();
    for round in 0..2u64 {
        let seq = 10 * round + 1;
        let (a, b) = (seq as i64, seq as i64 + 1);
        publish_blocking(
            mqtt,
            &[
                charging(A, seq, now - HOUR, "SE-A"),
                charging(B, seq + 1, now - HOUR, "SE-B"),
            ],
        );
        for live in [&mut alices, &mut alices_second, &mut alices_third] {
            let (rows, _) = live.rows_of("charging", 1);
            assert_eq!((seqs(&rows), &rows[0]["vin"]), (vec![a], &Value::from(A)));
        }
        let (rows, _) = bobs.rows_of("charging", 1);
        assert_eq!((seqs(&rows), &rows[0]["vin"]), (vec![b], &Value::from(B)));
        for live in [&mut operators, &mut second_operators, &mut third_operators] {
            let (rows, _) = live.rows_of("charging", 2);
            let mut got = seqs(&rows);
            got.sort_unstable();
            assert_eq!(got, vec![a, b]);
            assert!(
                rows.iter().all(|r| r.get("vin").is_none_or(Value::is_null)),
                "the operator's view has no VIN: {rows:?}"
            );
        }
    }
    // Neither user got the other's row meanwhile: their streams hold
    // nothing more once everything is stored and delivered.
    wait_for(|| server.handle.metrics().totals().stored == 4);
    for (name, live) in [
        ("alice", &mut alices),
        ("alice's second", &mut alices_second),
        ("alice's third", &mut alices_third),
        ("bob", &mut bobs),
    ] {
        assert!(
            live.stash.iter().all(|e| e.data["table"] != "charging"),
            "{name}: {:?}",
            live.stash
        );
    }
}

/// Under a tiny query memory bound, with thousands of another vehicle's rows
/// committed beside hers, a user still gets her row: whether a step fits
/// must not depend on rows she cannot see (a window too large to share is
/// read through her own view; steps that are too large are halved).
#[test]
fn a_window_too_large_to_share_is_read_through_the_streams_own_view() {
    let server = TestServer::start_with(|c| c.access.query_memory_mb = 1);
    let now = fleetgate::core::clock::now_ms();
    let mut live = alice_follows_charging(&server, now);

    // Over a MiB of another vehicle's rows in the same commits as hers.
    let mut messages: Vec<Message> = (0..6000)
        .map(|seq| charging(B, seq, now - HOUR, "SE-B-0000000000000000000000000000"))
        .collect();
    messages.push(charging(A, 1, now - HOUR, "SE-A-1"));
    publish_blocking(server.handle.mqtt_addr(), &messages);
    let (rows, _) = live.rows_of("charging", 1);
    assert_eq!((seqs(&rows), &rows[0]["vin"]), (vec![1], &Value::from(A)));
}

/// An open stream that hands rows over writes `delivered` lines while it
/// stays open (at most every `access.live_audit_interval_ms`), not only
/// when it ends: a crash loses the count of one interval at most, and
/// alice's last read is not stuck at the moment she connected.
#[test]
fn an_open_stream_audits_what_it_delivered_as_it_goes() {
    let server = TestServer::start_with(|c| c.access.live_audit_interval_ms = 1);
    let now = fleetgate::core::clock::now_ms();
    let addr = server.handle.admin_addr();
    let admin = server.admin();
    let mut live = alice_follows_charging(&server, now);
    let mqtt = server.handle.mqtt_addr();
    let publish = |messages: &[Message]| publish_blocking(mqtt, messages);
    for seq in 1..=3 {
        publish(&[charging(A, seq, now - HOUR, "SE-A")]);
        let (rows, _) = live.rows_of("charging", 1);
        assert_eq!(seqs(&rows), vec![i64::try_from(seq).expect("small")]);
    }

    // The stream is still open: its lines so far count what it handed over.
    let operator = admin.principal(r#"{"id":"ops","kind":"operator"}"#);
    let audit = r#"{"sql":"SELECT rows, decision FROM query_audit WHERE action = 'delivered' AND principal = 'alice' ORDER BY at","purpose":"operations"}"#;
    let lines: Vec<Value> = wait_for_value(|| {
        let (status, body) = http_request(addr, "POST", "/sql", Some(&operator), audit);
        assert_eq!(status, 200, "{body}");
        let lines: Vec<Value> = serde_json::from_str(&body).expect("rows");
        let counted: i64 = lines.iter().filter_map(|l| l["rows"].as_i64()).sum();
        (counted >= 2).then_some(lines)
    });
    assert!(
        lines.iter().all(|l| l["decision"] == "charging:filter"),
        "{lines:?}"
    );
    drop(live);
    // Closed: every row counted once over all its lines.
    wait_for_value(|| {
        let (status, body) = http_request(addr, "POST", "/sql", Some(&operator), audit);
        assert_eq!(status, 200, "{body}");
        let lines: Vec<Value> = serde_json::from_str(&body).expect("rows");
        let counted: i64 = lines.iter().filter_map(|l| l["rows"].as_i64()).sum();
        (lines.len() > 1 && counted == 3).then_some(())
    });
}

/// Panics on the server's query threads since the test binary started.
static QUERY_THREAD_PANICS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Counts every panic on a query thread from now on (in any test of this
/// binary), printing it as before.
fn count_query_thread_panics() {
    static HOOKED: std::sync::Once = std::sync::Once::new();
    HOOKED.call_once(|| {
        let print = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let thread = std::thread::current();
            if thread
                .name()
                .is_some_and(|n| n.starts_with("fleetgate-sql"))
            {
                QUERY_THREAD_PANICS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            print(info);
        }));
    });
}

/// A clean stop while streams are behind and stepping: no log read is cut
/// short under delta-rs's kernel (which panicked, "TokioMultiThreadExecutor
/// has crashed", when the stop dropped the query runtime under a stream's
/// step or the follower's reading), and every stream's last line counts at
/// least the rows its client got.
#[test]
fn a_stop_while_streams_follow_cuts_no_log_read_short() {
    use std::collections::HashMap;
    count_query_thread_panics();
    let server = TestServer::start_with(|c| {
        // The follower reads the logs all the time, so a read is under way
        // when the stop comes.
        c.access.live_poll_ms = 5;
        c.access.max_live_per_principal = 8;
        c.access.live_audit_interval_ms = 3_600_000;
    });
    let now = fleetgate::core::clock::now_ms();
    let addr = server.handle.admin_addr();
    let alice = alice_holds(&server.admin(), A, now);
    // Each stream is read to its end on a thread of its own: its request
    // id and the rows its client got.
    let readers: Vec<_> = (0..8)
        .map(|_| {
            let mut live =
                LiveClient::open(addr, "tables=charging", &alice, "own_data_access", None)
                    .expect("open");
            let start = live.next().expect("start");
            assert_eq!(start.event, "start");
            let request_id = start.data["request_id"].as_str().expect("id").to_owned();
            std::thread::spawn(move || {
                let mut received = 0;
                while let Some(event) = live.next() {
                    if event.event == "rows" {
                        received += event.data["rows"].as_array().map_or(0, Vec::len);
                    }
                }
                (request_id, i64::try_from(received).expect("small"))
            })
        })
        .collect();
    // Enough rows in enough commits that the streams are still stepping
    // through them when the stop comes right after the last is acknowledged.
    let mqtt = server.handle.mqtt_addr();
    for batch in 0..40 {
        let messages: Vec<Message> = (1..=50)
            .map(|n| charging(A, batch * 50 + n, now - HOUR, "SE-A"))
            .collect();
        publish_blocking(mqtt, &messages);
    }
    let panics_before = QUERY_THREAD_PANICS.load(std::sync::atomic::Ordering::SeqCst);
    let server = server.restart();
    assert_eq!(
        QUERY_THREAD_PANICS.load(std::sync::atomic::Ordering::SeqCst),
        panics_before,
        "a query thread panicked while the server stopped"
    );
    let received: HashMap<String, i64> = readers
        .into_iter()
        .map(|reader| reader.join().expect("reader"))
        .collect();

    let operator = server
        .admin()
        .principal(r#"{"id":"ops","kind":"operator"}"#);
    let audit = r#"{"sql":"SELECT request_id, rows FROM query_audit WHERE action = 'delivered' AND principal = 'alice'","purpose":"operations"}"#;
    let (status, body) = http_request(
        server.handle.admin_addr(),
        "POST",
        "/sql",
        Some(&operator),
        audit,
    );
    assert_eq!(status, 200, "{body}");
    let lines: Vec<Value> = serde_json::from_str(&body).expect("rows");
    let counted: HashMap<String, i64> = lines
        .iter()
        .map(|l| {
            let id = l["request_id"].as_str().expect("id").to_owned();
            (id, l["rows"].as_i64().unwrap_or(0))
        })
        .collect();
    assert_eq!(lines.len(), 8, "one last line per stream: {lines:?}");
    for (id, got) in &received {
        let line = counted.get(id).copied();
        assert!(
            line.is_some_and(|rows| (*got..=2000).contains(&rows)),
            "stream {id}: its client got {got} rows, its line says {line:?}"
        );
    }
    server.handle.shutdown().expect("shutdown");
}

/// Retries `attempt` until it gives a value; panics past [`DEADLINE`].
fn wait_for_value<T>(mut attempt: impl FnMut() -> Option<T>) -> T {
    let started = Instant::now();
    loop {
        if let Some(value) = attempt() {
            return value;
        }
        assert!(started.elapsed() < DEADLINE, "timed out");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What a stream is refused for, and the bounds on how many may be open.
#[test]
fn live_streams_are_refused_and_bounded_like_queries() {
    let server = TestServer::start_with(|c| c.access.max_live_per_principal = 1);
    let addr = server.handle.admin_addr();
    let admin = server.admin();
    let alice = admin.principal(r#"{"id":"alice","kind":"user"}"#);
    let open = |query: &str, token: &str, purpose: &str, from: Option<&str>| {
        LiveClient::open(addr, query, token, purpose, from).map(|_| ())
    };
    let status = |r: Result<(), (u16, String)>| r.err().map(|(s, _)| s);
    assert_eq!(
        status(open(
            "tables=charging",
            "fga_nobody",
            "own_data_access",
            None
        )),
        Some(401)
    );
    assert_eq!(
        status(open("tables=secrets", &alice, "own_data_access", None)),
        Some(400)
    );
    assert_eq!(
        status(open("tables=", &alice, "own_data_access", None)),
        Some(400)
    );
    assert_eq!(
        status(open(
            "tables=charging",
            &alice,
            "own_data_access",
            Some("charging.0=-1")
        )),
        Some(400)
    );
    assert_eq!(
        status(open("tables=charging", &alice, "economic_situation", None)),
        Some(403)
    );
    assert_eq!(
        status(open("tables=rtti", &alice, "own_data_access", None)),
        Some(403)
    );
    // One stream per principal here: a second is refused until the first closes.
    let first =
        LiveClient::open(addr, "tables=charging", &alice, "own_data_access", None).expect("first");
    let second = open("tables=charging", &alice, "own_data_access", None);
    assert!(
        matches!(&second, Err((400, body)) if body.contains("max_live_per_principal")),
        "{second:?}"
    );
    drop(first);
    let mut open_at_shutdown = wait_for_value(|| {
        LiveClient::open(addr, "tables=charging", &alice, "own_data_access", None).ok()
    });
    assert_eq!(open_at_shutdown.next().expect("start").event, "start");
    // A stream still open does not hold up a shutdown: it ends.
    server.handle.shutdown().expect("shutdown");
    assert!(open_at_shutdown.next().is_none());
}

/// The dictionary says, field by field and rule by rule, what the schema
/// files and the retention file say (read here with a TOML parser of our
/// own, not through fleetgate), over HTTP without a token and in the export.
#[test]
fn the_dictionary_agrees_with_the_schemas_and_the_retention_rules() {
    let server = TestServer::start();
    let addr = server.handle.admin_addr();
    let (status, body) = http_request(addr, "GET", "/dictionary", None, "");
    assert_eq!(status, 200, "{body}");
    let dictionary: Value = serde_json::from_str(&body).expect("json");
    let tables = dictionary["tables"].as_array().expect("tables");
    let table = |name: &str| {
        tables
            .iter()
            .find(|t| t["name"] == name)
            .unwrap_or_else(|| panic!("{name} in the dictionary"))
    };
    let schemas_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas");
    let read = |file: &str| -> toml::Value {
        toml::from_str(&std::fs::read_to_string(schemas_dir.join(file)).expect("read"))
            .expect("toml")
    };
    for stream in ["teleservice", "rtti", "diagnostics", "charging"] {
        let file = read(&format!("{stream}.toml"));
        let entry = table(stream);
        assert_eq!(
            entry["schema_version"],
            file["version"].as_integer().expect("version")
        );
        assert_eq!(
            entry["description"],
            file["description"].as_str().expect("text")
        );
        assert!(entry["live"].as_str().is_some_and(|l| l.starts_with("yes")));
        let fields = file["field"].as_array().expect("fields");
        let described = entry["fields"].as_array().expect("fields");
        assert_eq!(
            described.len(),
            fields.len(),
            "{stream}: one entry per field"
        );
        for (field, described) in fields.iter().zip(described) {
            let text = |key: &str| field.get(key).and_then(toml::Value::as_str);
            assert_eq!(described["name"], text("name").expect("name"));
            assert_eq!(described["type"], text("type").expect("type"));
            assert_eq!(described["privacy"], text("privacy").expect("privacy"));
            assert_eq!(
                described["treatment"],
                text("transform").expect("transform")
            );
            assert_eq!(described["description"], text("description").expect("text"));
            assert_eq!(
                described["unit"].as_str(),
                text("unit"),
                "{stream}.{}",
                described["name"]
            );
            assert_eq!(
                described["required"],
                field["required"].as_bool().expect("bool")
            );
            let column = text("column").or(text("name"));
            match text("transform") {
                Some("drop") => assert_eq!(described["stored_as"], Value::Null),
                _ => assert_eq!(described["stored_as"]["column"].as_str(), column),
            }
        }
        let gates = file.get("consent_gate").and_then(toml::Value::as_array);
        assert_eq!(
            entry["consent_gates"].as_array().map_or(0, Vec::len),
            gates.map_or(0, Vec::len),
            "{stream}"
        );
    }
    let rules = read("retention.toml");
    let rules = rules["rule"].as_array().expect("rules");
    let mut described_rules = 0;
    for entry in tables {
        described_rules += entry["retention"].as_array().expect("rules").len();
    }
    assert_eq!(described_rules, rules.len(), "every rule, once");
    for rule in rules {
        let text = |key: &str| rule.get(key).and_then(toml::Value::as_str);
        let entry = table(text("table").expect("table"));
        let described = entry["retention"]
            .as_array()
            .expect("rules")
            .iter()
            .find(|r| r["rule"] == text("name").expect("name"))
            .expect("the rule under its table");
        assert_eq!(described["seed"], text("seed").expect("seed"));
        assert_eq!(described["choice"].as_str(), text("choice"));
        let number = |key: &str| rule.get(key).and_then(toml::Value::as_integer);
        assert_eq!(described["keep_days"].as_i64(), number("keep_days"));
        assert_eq!(described["keep_hours"].as_i64(), number("keep_hours"));
        match rule.get("when") {
            Some(when) => {
                let field = when["field"].as_str().expect("field");
                assert!(
                    described["applies_to"]
                        .as_str()
                        .is_some_and(|a| a.starts_with(&format!("{field} = "))),
                    "{described:?}"
                );
            }
            None => assert_eq!(described["applies_to"], "every other row"),
        }
    }
    // The export carries the same dictionary.
    let admin = server.admin();
    let alice = admin.principal(r#"{"id":"alice","kind":"user"}"#);
    let (status, body) = http_request(addr, "GET", "/export", Some(&alice), "");
    assert_eq!(status, 200, "{body}");
    let export: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(export["metadata"]["dictionary"], dictionary);
    server.handle.shutdown().expect("shutdown");
}

/// The portal at `url` in headless Chromium (`$CHROMIUM`, or Debian's
/// `chromium`, which `.ci/run` installs), driven by `scripts/portal_check.py`
/// over the DevTools protocol until the page is ready; its DOM and how long
/// it took, and a screenshot written to `screenshot`.
fn browse(url: &str, screenshot: &std::path::Path) -> (String, f64) {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/portal_check.py");
    let output = std::process::Command::new("python3")
        .arg(script)
        .arg(url)
        .arg(screenshot)
        .output()
        .expect("python3 runs");
    assert!(
        output.status.success(),
        "portal_check.py failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let page: Value = serde_json::from_slice(&output.stdout).expect("JSON");
    let dom = page["dom"].as_str().expect("the DOM").to_owned();
    (dom, page["ready_ms"].as_f64().unwrap_or(f64::NAN))
}

/// The portal in a real browser (headless Chromium), signed in by a link
/// with the token in its fragment: the user's vehicles, a chart of their
/// vehicle's state of charge, the live stream connected, and the grant
/// they gave with when its recipient last read; another vehicle's data
/// nowhere. Writes `target/portal.png`, the README's screenshot.
#[test]
fn the_portal_shows_a_users_vehicles_chart_and_grants_in_a_browser() {
    let server = TestServer::start();
    let now = fleetgate::core::clock::now_ms();
    let addr = server.handle.admin_addr();
    let admin = server.admin();
    let alice = alice_holds(&admin, A, now);
    // One session's progress: the state of charge the chart draws.
    let progress = |vin: &str, seq: u64, ts: i64, soc: f64| {
        let record = charging(vin, seq, ts, "SE-A");
        with(
            record,
            serde_json::json!({ "event": "progress", "soc_pct": soc }),
        )
    };
    let mut records: Vec<Message> = (0..12u32)
        .map(|i| {
            progress(
                A,
                u64::from(i) + 1,
                now - 6 * HOUR + i64::from(i) * 25 * 60_000,
                20.0 + f64::from(i) * 6.5,
            )
        })
        .collect();
    records.push(progress(B, 1, now - HOUR, 77.0));
    publish_blocking(server.handle.mqtt_addr(), &records);
    wait_for(|| server.handle.metrics().totals().stored == 13);
    let (repair, _) = alice_grants_repair(&admin, &alice, now);
    let read =
        r#"{"sql":"SELECT count(*) AS n FROM teleservice","purpose":"repair_and_maintenance"}"#;
    let (status, body) = http_request(addr, "POST", "/sql", Some(&repair), read);
    assert_eq!(status, 200, "{body}");

    // The account behind the page is a user's own.
    assert_eq!(http_request(addr, "GET", "/account", None, "").0, 401);
    let (status, body) = http_request(addr, "GET", "/account", Some(&repair), "");
    assert_eq!(status, 403, "{body}");

    let url = format!("http://{addr}/portal#token={alice}");
    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("portal.png");
    let _ = std::fs::remove_file(&shot);
    let (dom, ready_ms) = browse(&url, &shot);
    assert!(dom.contains(r#"data-state="ready""#), "{dom}");
    assert!(dom.contains(r#"<strong id="user">alice</strong>"#), "{dom}");
    assert!(dom.contains(&format!("<td>{A}</td>")), "the vehicle held");
    assert!(
        !dom.contains(B),
        "another vehicle's data is nowhere on the page"
    );
    assert_eq!(
        dom.matches("<circle").count(),
        12,
        "one point per charging record"
    );
    assert!(dom.contains("live: connected"), "{dom}");
    let grants = &dom[dom.find(r#"id="grants""#).expect("grants table")..];
    let grant_row = &grants[..grants.find("</tr></tbody>").expect("a grant row")];
    assert!(grant_row.contains("<td>repair</td>"), "{grant_row}");
    assert!(
        !grant_row.contains("never"),
        "its last read is shown: {grant_row}"
    );
    assert!(grant_row.contains("Revoke"), "{grant_row}");
    assert!(!dom.contains("#token="), "the token left the address");
    println!("portal ready {ready_ms} ms after navigation");
    // The README's screenshot.
    assert!(
        std::fs::metadata(&shot).is_ok_and(|m| m.len() > 10_000),
        "a screenshot"
    );
    server.handle.shutdown().expect("shutdown");
}

/// A table created before rows said which WAL entry held them gets the
/// two columns when a server first writes to it, keeps its old rows (NULL
/// there, never live news), and is followed live like any other.
#[test]
fn a_table_from_before_the_wal_columns_is_migrated_and_followed_live() {
    use deltalake::kernel::engine::arrow_conversion::TryIntoKernel;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = test_config(dir.path());
    let table_dir = config.storage.data_dir.join("charging");
    std::fs::create_dir_all(&table_dir).expect("table dir");
    // The charging table as fleetgate created it before: its fields, then
    // `date` and `hour`, and no WAL columns.
    let registry = fleetgate::schema::Registry::load().expect("schemas");
    let mut fields: Vec<arrow::datatypes::Field> = registry
        .get(fleetgate::schema::Stream::Charging)
        .arrow
        .fields()
        .iter()
        .map(|f| f.as_ref().clone())
        .collect();
    fields.push(arrow::datatypes::Field::new(
        "date",
        arrow::datatypes::DataType::Date32,
        true,
    ));
    fields.push(arrow::datatypes::Field::new(
        "hour",
        arrow::datatypes::DataType::Int32,
        true,
    ));
    let old = arrow::datatypes::Schema::new(fields);
    let old: deltalake::kernel::StructType = (&old).try_into_kernel().expect("kernel schema");
    let url = url::Url::from_directory_path(&table_dir).expect("url");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime
        .block_on(async {
            deltalake::DeltaTableBuilder::from_url(url)?
                .build()?
                .create()
                .with_columns(old.fields().cloned())
                .with_partition_columns(["date", "hour"])
                .await
        })
        .expect("an old table");

    let handle = fleetgate::ops::server::start(&config).expect("server starts");
    let server = TestServer {
        handle,
        config,
        dir,
    };
    let now = fleetgate::core::clock::now_ms();
    let mut live = alice_follows_charging(&server, now);
    runtime.block_on(publish_all(
        server.handle.mqtt_addr(),
        &[charging(A, 1, now - HOUR, "SE-A-1")],
    ));
    let (rows, _) = live.rows_of("charging", 1);
    assert_eq!(seqs(&rows), vec![1]);
    server.handle.shutdown().expect("shutdown");
}

/// A licensee follows hourly aggregates: each hour's k-anonymous groups
/// once the hour has closed, from the newest closed hour on; no row, no
/// group under k, no hour still open.
#[test]
fn a_licensee_gets_each_closed_hours_aggregates() {
    let server = TestServer::start_with(|c| c.access.min_group_vehicles = 3);
    let now = fleetgate::core::clock::now_ms();
    // The newest hour closed now (five minutes of grace after its end).
    let closed = (now - 5 * 60_000).div_euclid(HOUR) * HOUR - HOUR;
    let diagnostic = |vin: &str, seq: u32, ts: i64, severity: &str| {
        let body = format!(
            r#"{{"vin":"{vin}","ts":{ts},"seq":{seq},"ecu":"BMS","severity":"{severity}","battery_voltage_v":12.5}}"#
        );
        (format!("vehicles/{vin}/diagnostics"), body.into_bytes())
    };
    let vins = [
        "WMW11DJ04N2T00011",
        "WMW11DJ04N2T00012",
        "WMW11DJ04N2T00013",
    ];
    let mut records: Vec<(String, Vec<u8>)> = vins
        .iter()
        .enumerate()
        .map(|(i, vin)| diagnostic(vin, 1, closed + 600_000 + i as i64, "warning"))
        .collect();
    // Two vehicles only: under k, never shown.
    records.push(diagnostic(vins[0], 2, closed + 700_000, "critical"));
    records.push(diagnostic(vins[1], 2, closed + 700_000, "critical"));
    // The hour still open: not yet.
    records.push(diagnostic(vins[2], 3, now, "info"));
    publish_blocking(server.handle.mqtt_addr(), &records);
    wait_for(|| server.handle.metrics().totals().stored == 6);
    let admin = server.admin();
    let licensee = admin.principal(r#"{"id":"maps","kind":"licensee"}"#);
    let addr = server.handle.admin_addr();
    let mut live = LiveClient::open(
        addr,
        "tables=diagnostics",
        &licensee,
        "product_improvement",
        None,
    )
    .expect("a licensee's stream");
    assert_eq!(live.next().expect("start").event, "start");
    let (groups, _) = live.rows_of("diagnostics", 1);
    assert_eq!(groups.len(), 1, "{groups:?}");
    let group = &groups[0];
    assert_eq!(group["severity"], "warning");
    assert_eq!(group["vehicles"], 3);
    assert_eq!(group["records"], 3);
    let start = chrono::DateTime::from_timestamp_millis(closed).expect("time");
    assert_eq!(group["date"], start.format("%Y-%m-%d").to_string());
    assert_eq!(
        group["hour"],
        start.format("%H").to_string().parse::<i64>().expect("hour")
    );
    assert!(
        group.get("vehicle_id").is_none(),
        "no identifier: {group:?}"
    );
    server.handle.shutdown().expect("shutdown");
}

/// A position stays good across a restart: the server that comes back (a
/// new process would do the same: the key comes from the root key) takes
/// it, and the stream goes on from there without a gap or a repeat.
#[test]
fn a_position_survives_a_restart() {
    let server = TestServer::start();
    let now = fleetgate::core::clock::now_ms();
    let alice = alice_holds(&server.admin(), A, now);
    let query = "tables=charging";
    let mut live = LiveClient::open(
        server.handle.admin_addr(),
        query,
        &alice,
        "own_data_access",
        None,
    )
    .expect("open");
    assert_eq!(live.next().expect("start").event, "start");
    publish_blocking(
        server.handle.mqtt_addr(),
        &[charging(A, 1, now - HOUR, "SE-A-1")],
    );
    let (rows, _) = live.rows_of("charging", 1);
    assert_eq!(seqs(&rows), vec![1]);
    let last_id = live.last_id.clone().expect("an id");
    drop(live);
    let server = server.restart();
    publish_blocking(
        server.handle.mqtt_addr(),
        &[charging(A, 2, now - HOUR, "SE-A-2")],
    );
    wait_for(|| server.handle.metrics().totals().stored == 1);
    let mut live = LiveClient::open(
        server.handle.admin_addr(),
        query,
        &alice,
        "own_data_access",
        Some(&last_id),
    )
    .expect("the position of the run before");
    assert_eq!(live.next().expect("start").event, "start");
    publish_blocking(
        server.handle.mqtt_addr(),
        &[charging(A, 3, now - HOUR, "SE-A-3")],
    );
    let (rows, _) = live.rows_of("charging", 2);
    assert_eq!(
        seqs(&rows),
        vec![2, 3],
        "what came while away, then new; 1 not again"
    );
    server.handle.shutdown().expect("shutdown");
}

/// In a cluster a live stream follows every node's commits in the shared
/// tables: a user following her vehicle through node 2 gets the rows it
/// published to node 1, and only hers.
#[test]
fn a_stream_on_one_node_follows_rows_another_node_stored() {
    let postgres = Postgres::start();
    let shared = tempfile::tempdir().expect("tempdir");
    let root_key = shared.path().join("root.key");
    fleetgate::privacy::pseudo::KeyRing::load_or_create(&root_key).expect("root key");
    let tables = format!("file://{}", shared.path().join("tables").display());
    let node = |id: &str| {
        TestServer::start_with(|c| {
            c.cluster.node_id = id.to_owned();
            c.cluster.control_plane = postgres.url();
            c.cluster.lease_secs = 3;
            c.storage.uri = Some(tables.clone());
            fleetgate::core::fsio::create_dir_all(c.storage.key_file.parent().expect("keys"))
                .expect("keys dir");
            std::fs::copy(&root_key, &c.storage.key_file).expect("the cluster's root key");
        })
    };
    let one = node("node-1");
    let two = node("node-2");
    let now = fleetgate::core::clock::now_ms();
    let alice = alice_holds(&two.admin(), A, now);
    let mut live = LiveClient::open(
        two.handle.admin_addr(),
        "tables=charging",
        &alice,
        "own_data_access",
        None,
    )
    .expect("open");
    assert_eq!(live.next().expect("start").event, "start");
    publish_blocking(
        one.handle.mqtt_addr(),
        &[
            charging(A, 1, now - HOUR, "SE-A-1"),
            charging(B, 1, now - HOUR, "SE-B-1"),
        ],
    );
    let (rows, _) = live.rows_of("charging", 1);
    assert_eq!(seqs(&rows), vec![1]);
    assert_eq!(rows[0]["vin"], A);
    publish_blocking(
        one.handle.mqtt_addr(),
        &[charging(A, 2, now - HOUR, "SE-A-2")],
    );
    publish_blocking(
        two.handle.mqtt_addr(),
        &[charging(A, 3, now - HOUR, "SE-A-3")],
    );
    let (rows, _) = live.rows_of("charging", 2);
    let mut got = seqs(&rows);
    got.sort();
    assert_eq!(got, vec![2, 3], "from both nodes, once each");
}

/// A client that opens a stream and then never reads (nor closes) holds
/// up nothing when the server stops: once the socket's buffers are full
/// the stream cannot be written to its end, and after a short grace the
/// stop closes the connection rather than waiting for it for ever.
#[test]
fn a_client_that_never_reads_does_not_hold_up_a_stop() {
    let server = TestServer::start();
    let now = fleetgate::core::clock::now_ms();
    let addr = server.handle.admin_addr();
    let operator = server
        .admin()
        .principal(r#"{"id":"ops","kind":"operator"}"#);
    let mut silent = TcpStream::connect(addr).expect("connect");
    write!(
        silent,
        "GET /live?tables=charging HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {operator}\r\n\
         x-fleetgate-purpose: operations\r\nAccept: text/event-stream\r\n\r\n"
    )
    .expect("request");
    silent.set_read_timeout(Some(DEADLINE)).expect("timeout");
    let mut head = [0u8; 512];
    let read = silent.read(&mut head).expect("the answer's head");
    assert!(
        head[..read].starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&head[..read])
    );
    // Far more rows than loopback's socket buffers hold, as JSON.
    let messages: Vec<Message> = (0..40_000)
        .map(|seq| charging(B, seq, now - HOUR, "SE-B-0000000000000000000000000000"))
        .collect();
    publish_blocking(server.handle.mqtt_addr(), &messages);
    wait_for(|| server.handle.metrics().totals().stored == 40_000);

    let (done, stopped) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(server.handle.shutdown().is_ok());
    });
    assert_eq!(stopped.recv_timeout(DEADLINE), Ok(true), "the stop ended");
    drop(silent);
}

/// A stream opened before its table has any commit, then resumed from
/// its first position after a row was committed meanwhile: the row comes.
/// The position must say "followed from the start", not "never followed"
/// (which a resumed stream starts from now).
#[test]
fn a_stream_resumed_from_before_its_tables_first_commit_misses_nothing() {
    let server = TestServer::start();
    let now = fleetgate::core::clock::now_ms();
    let addr = server.handle.admin_addr();
    let alice = alice_holds(&server.admin(), A, now);
    let mqtt = server.handle.mqtt_addr();
    let mut live =
        LiveClient::open(addr, "tables=charging", &alice, "own_data_access", None).expect("open");
    let start = live.next().expect("start");
    assert_eq!(start.event, "start");
    let first = start.id.expect("the start event's id is a position");
    drop(live);

    publish_blocking(mqtt, &[charging(A, 1, now - HOUR, "SE-A-1")]);
    wait_for(|| server.handle.metrics().totals().stored == 1);
    let mut live = LiveClient::open(
        addr,
        "tables=charging",
        &alice,
        "own_data_access",
        Some(&first),
    )
    .expect("resume");
    assert_eq!(live.next().expect("start").event, "start");
    publish_blocking(mqtt, &[charging(A, 2, now - HOUR, "SE-A-2")]);
    let (rows, _) = live.rows_of("charging", 2);
    assert_eq!(
        seqs(&rows),
        vec![1, 2],
        "the row missed while away, then the new one"
    );
    drop(live);
    server.handle.shutdown().expect("shutdown");
}

/// Rows handed over get their `delivered` line once the audit interval
/// has passed even when no more rows follow: the grant holder's last read
/// keeps up with a stream left open on a quiet vehicle.
#[test]
fn rows_handed_over_are_audited_on_time_without_more_rows() {
    let server = TestServer::start_with(|c| c.access.live_audit_interval_ms = 10_000);
    let now = fleetgate::core::clock::now_ms();
    let addr = server.handle.admin_addr();
    let admin = server.admin();
    let mut live = alice_follows_charging(&server, now);
    publish_blocking(
        server.handle.mqtt_addr(),
        &[charging(A, 1, now - HOUR, "SE-A")],
    );
    let (rows, _) = live.rows_of("charging", 1);
    assert_eq!(seqs(&rows), vec![1]);

    // Nothing more comes; the stream stays open.
    let operator = admin.principal(r#"{"id":"ops","kind":"operator"}"#);
    let audit = r#"{"sql":"SELECT rows FROM query_audit WHERE action = 'delivered' AND principal = 'alice'","purpose":"operations"}"#;
    wait_for(|| {
        let (status, body) = http_request(addr, "POST", "/sql", Some(&operator), audit);
        assert_eq!(status, 200, "{body}");
        body.contains(r#""rows":1"#)
    });
    drop(live);
    server.handle.shutdown().expect("shutdown");
}
