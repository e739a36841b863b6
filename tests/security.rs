//! The MQTT front end's identity rules with real clients: over TLS, a
//! vehicle whose certificate (O = its VIN) the vehicle CA signed publishes
//! its own topic and is stored; a certificate from another CA is refused
//! at the handshake, and a publish to another vehicle's topic is refused and
//! counted, with nothing stored. On the plain listener with passwords, the
//! right password is stored, a wrong one, an unknown vehicle or a VIN as
//! client id are refused at CONNECT and counted. Every file and directory
//! the server creates is readable by its owner only.
//!
//! Certificates are made with the `openssl` command and TLS clients are
//! Mosquitto's `mosquitto_pub` (`.ci/run` installs mosquitto-clients).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering::Relaxed;

use arrow::array::AsArray;
use std::time::Duration;

use common::*;
use fleetgate::config::TlsListenerConfig;
use fleetgate::control::documents::Document;
use fleetgate::schema::Stream;

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, and a certificate it signs with the given subject and extensions.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn ca(&self, name: &str) {
        run(Command::new("openssl").args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-keyout",
            &self.path(&format!("{name}.key")).display().to_string(),
            "-out",
            &self.path(&format!("{name}.pem")).display().to_string(),
        ]));
    }

    fn sign(&self, ca: &str, name: &str, subject: &str, extensions: &str) {
        let key = self.path(&format!("{name}.key")).display().to_string();
        let csr = self.path(&format!("{name}.csr")).display().to_string();
        let ext = self.path(&format!("{name}.ext"));
        std::fs::write(&ext, extensions).expect("extensions");
        run(Command::new("openssl").args([
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-subj",
            subject,
            "-keyout",
            &key,
            "-out",
            &csr,
        ]));
        run(Command::new("openssl").args([
            "x509",
            "-req",
            "-in",
            &csr,
            "-days",
            "2",
            "-CAcreateserial",
            "-CA",
            &self.path(&format!("{ca}.pem")).display().to_string(),
            "-CAkey",
            &self.path(&format!("{ca}.key")).display().to_string(),
            "-extfile",
            &ext.display().to_string(),
            "-out",
            &self.path(&format!("{name}.pem")).display().to_string(),
        ]));
    }
}

/// Publishes one message with mosquitto_pub over TLS; true if it reports
/// success within 30 s (mosquitto_pub itself waits for ever on a listener
/// that never answers).
fn mosquitto_pub(pki: &Pki, port: u16, client: &str, topic: &str, payload: &str) -> bool {
    let out = Command::new("timeout")
        .args(["30", "mosquitto_pub"])
        // By name: rumqttd's rustls refuses an IP address as TLS server name (SNI).
        .args([
            "-h",
            "localhost",
            "-p",
            &port.to_string(),
            "-q",
            "1",
            "-i",
            "car-tls",
        ])
        .args([
            "--cafile",
            &pki.path("vehicle-ca.pem").display().to_string(),
        ])
        .args([
            "--cert",
            &pki.path(&format!("{client}.pem")).display().to_string(),
        ])
        .args([
            "--key",
            &pki.path(&format!("{client}.key")).display().to_string(),
        ])
        .args(["-t", topic, "-m", payload])
        .output()
        .expect("mosquitto_pub (install mosquitto-clients)");
    if !out.status.success() {
        eprintln!(
            "mosquitto_pub {topic}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out.status.success()
}

/// The payload of `vin`'s monthly teleservice call `seq`, stamped now.
fn teleservice_now(vin: &str, seq: u32) -> String {
    let now = fleetgate::core::clock::now_ms();
    let (_, payload) = teleservice(vin, seq.into(), now, "monthly");
    String::from_utf8(payload).expect("JSON is text")
}

fn rejected(server: &TestServer, stream: Stream, reason: &str) -> u64 {
    server
        .handle
        .metrics()
        .snapshot()
        .streams
        .iter()
        .find(|s| s.stream == stream.name())
        .and_then(|s| s.rejected.iter().find(|(r, _)| *r == reason))
        .map_or(0, |(_, n)| *n)
}

fn stored(server: &TestServer, stream: Stream) -> u64 {
    server
        .handle
        .metrics()
        .stream(stream)
        .table
        .rows_stored
        .load(Relaxed)
}

/// A vehicle CA, a server certificate for `localhost`, and car A's
/// certificate (O = its VIN).
fn vehicle_pki(dir: &Path) -> Pki {
    let pki = Pki::new(dir);
    pki.ca("vehicle-ca");
    pki.sign(
        "vehicle-ca",
        "server",
        "/CN=localhost",
        "subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth\n",
    );
    pki.sign(
        "vehicle-ca",
        "car-a",
        &format!("/O={A}/CN=car-a"),
        "extendedKeyUsage=clientAuth\n",
    );
    pki
}

fn tls_server(pki: &Pki) -> TestServer {
    TestServer::start_with(|c| {
        c.broker.tls = Some(TlsListenerConfig {
            addr: "127.0.0.1:0".parse().expect("addr"),
            cert_file: pki.path("server.pem"),
            key_file: pki.path("server.key"),
            client_ca_file: pki.path("vehicle-ca.pem"),
        });
    })
}

/// The TLS handshake used to run in the listener's accept loop with no time
/// limit: one client that opened a socket and said nothing stopped every
/// vehicle after it. Now each handshake runs in its connection's task,
/// within `broker.connect_timeout_ms`.
#[test]
fn a_silent_client_does_not_stop_the_tls_listener() {
    let certs = tempfile::tempdir().expect("tempdir");
    let pki = vehicle_pki(certs.path());
    let server = tls_server(&pki);
    let addr = server.handle.tls_addr().expect("TLS listener");

    let _silent = std::net::TcpStream::connect(addr).expect("a socket, and then nothing");
    let own = format!("/tenants/{A}/vehicles/{A}/teleservice");
    assert!(
        mosquitto_pub(&pki, addr.port(), "car-a", &own, &teleservice_now(A, 1)),
        "a vehicle after the silent client is served"
    );
    wait_for(|| stored(&server, Stream::Teleservice) == 1);
}

#[test]
fn tls_vehicles_publish_only_as_themselves() {
    let certs = tempfile::tempdir().expect("tempdir");
    let pki = vehicle_pki(certs.path());
    pki.ca("rogue-ca");
    pki.sign(
        "rogue-ca",
        "rogue-b",
        &format!("/O={B}/CN=rogue"),
        "extendedKeyUsage=clientAuth\n",
    );

    let server = tls_server(&pki);
    let port = server.handle.tls_addr().expect("TLS listener").port();

    let own = format!("/tenants/{A}/vehicles/{A}/teleservice");
    assert!(mosquitto_pub(
        &pki,
        port,
        "car-a",
        &own,
        &teleservice_now(A, 1)
    ));
    wait_for(|| stored(&server, Stream::Teleservice) == 1);

    // Another vehicle's topic under its own prefix: refused by fleetgate, counted.
    let foreign = format!("/tenants/{A}/vehicles/{B}/teleservice");
    mosquitto_pub(&pki, port, "car-a", &foreign, &teleservice_now(B, 1));
    wait_for(|| rejected(&server, Stream::Teleservice, "foreign_topic") == 1);
    // Outside its prefix: rumqttd drops the publish and the connection.
    mosquitto_pub(
        &pki,
        port,
        "car-a",
        &format!("vehicles/{B}/teleservice"),
        &teleservice_now(B, 2),
    );
    // A certificate the vehicle CA did not sign: no TLS session at all.
    let rogue = format!("/tenants/{B}/vehicles/{B}/teleservice");
    assert!(!mosquitto_pub(
        &pki,
        port,
        "rogue-b",
        &rogue,
        &teleservice_now(B, 3)
    ));

    // A's own publish after the refusals still arrives: the listener is fine.
    assert!(mosquitto_pub(
        &pki,
        port,
        "car-a",
        &own,
        &teleservice_now(A, 2)
    ));
    wait_for(|| stored(&server, Stream::Teleservice) == 2);
    std::thread::sleep(Duration::from_millis(500));
    let (config, _dir) = server.stop();
    let vehicles = futures_lite_block(count(
        &config.storage.data_dir,
        "SELECT count(DISTINCT vehicle_id) FROM teleservice",
    ));
    let rows = futures_lite_block(count(
        &config.storage.data_dir,
        "SELECT count(*) FROM teleservice",
    ));
    assert_eq!(
        (vehicles, rows),
        (1, 2),
        "only A's own two records are stored"
    );
}

/// Runs a future to completion on a small runtime (the test itself is sync,
/// because mosquitto_pub blocks).
fn futures_lite_block<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(f)
}

/// How a publish with rumqttc ended.
#[derive(Debug, PartialEq)]
enum Outcome {
    Acked,
    /// Refused at CONNECT with "bad user name or password".
    BadLogin,
    Failed,
}

/// Connects with rumqttc and publishes one record at QoS 1.
async fn publish_with(
    addr: std::net::SocketAddr,
    client_id: &str,
    login: Option<(&str, &str)>,
    topic: &str,
    payload: String,
) -> Outcome {
    let mut options = rumqttc::MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
    if let Some((user, password)) = login {
        options.set_credentials(user, password);
    }
    let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 10);
    if client
        .publish(topic, rumqttc::QoS::AtLeastOnce, false, payload)
        .await
        .is_err()
    {
        return Outcome::Failed;
    }
    let outcome = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match eventloop.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => return Outcome::Acked,
                Ok(_) => {}
                Err(rumqttc::ConnectionError::ConnectionRefused(
                    rumqttc::ConnectReturnCode::BadUserNamePassword,
                )) => return Outcome::BadLogin,
                Err(_) => return Outcome::Failed,
            }
        }
    })
    .await;
    outcome.unwrap_or(Outcome::Failed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_are_checked_at_connect_and_refusals_counted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let credentials_file = dir.path().join("vehicle-credentials.json");
    let file = credentials_file.clone();
    let server = TestServer::start_with(move |c| c.broker.credentials_file = Some(file));
    let tag_key = server.handle.privacy().keys.redaction_key();
    let password =
        fleetgate::ingest::auth::issue(&Document::File(credentials_file.clone()), &tag_key, A, 0)
            .expect("issue");
    let addr = server.handle.mqtt_addr();
    let topic_of = |vin: &str| format!("vehicles/{vin}/teleservice");
    let publish =
        |client: &'static str, user: &'static str, secret: Option<String>, to: &'static str| {
            let topic = topic_of(to);
            async move {
                let login = secret.as_deref().map(|p| (user, p));
                publish_with(addr, client, login, &topic, teleservice_now(to, 1)).await
            }
        };
    let right = || Some(password.clone());
    assert_eq!(publish(A, A, right(), A).await, Outcome::Acked);
    wait_for(|| stored(&server, Stream::Teleservice) == 1);
    assert_eq!(
        publish(A, A, Some("wrong".into()), A).await,
        Outcome::BadLogin
    );
    assert_eq!(publish(A, A, None, A).await, Outcome::BadLogin);
    assert_eq!(publish("car-a", A, right(), A).await, Outcome::BadLogin);
    assert_eq!(publish(B, B, right(), B).await, Outcome::BadLogin);
    assert_eq!(
        publish("admin", "admin", right(), A).await,
        Outcome::BadLogin
    );
    // Logged in as A, publishing to B's topic: the broker acknowledges it,
    // fleetgate refuses and counts it, and nothing is stored for B.
    assert_eq!(publish(A, A, right(), B).await, Outcome::Acked);
    wait_for(|| rejected(&server, Stream::Teleservice, "foreign_topic") == 1);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        stored(&server, Stream::Teleservice),
        1,
        "nothing stored for B"
    );

    let metrics = http_get(server.handle.admin_addr(), "/metrics");
    for line in [
        "fleetgate_mqtt_connects_accepted_total 2",
        "fleetgate_mqtt_connects_refused_total{reason=\"wrong_password\"} 1",
        "fleetgate_mqtt_connects_refused_total{reason=\"client_id_not_username\"} 1",
        "fleetgate_mqtt_connects_refused_total{reason=\"unknown_vehicle\"} 1",
        "fleetgate_mqtt_connects_refused_total{reason=\"username_not_a_vin\"} 1",
        "fleetgate_records_rejected_total{stream=\"teleservice\",reason=\"foreign_topic\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} missing in:\n{metrics}");
    }
    // Revoked: the next CONNECT is refused.
    assert!(
        fleetgate::ingest::auth::revoke(&Document::File(credentials_file.clone()), &tag_key, A)
            .expect("revoke")
    );
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(publish(A, A, right(), A).await, Outcome::BadLogin);
    let data = server.data_dir();
    let store = std::fs::read_to_string(&credentials_file).expect("store");
    assert!(!store.contains(A) && !store.contains(&password));
    server.handle.shutdown().expect("shutdown");
    // The foreign publish is evidence by topic and size only.
    let letters = query(
        &data,
        "SELECT reason_code, payload, payload_size FROM dead_letters",
    )
    .await;
    let reasons = letters[0].column(0).as_string::<i32>();
    let payloads = letters[0].column(1).as_string::<i32>();
    assert_eq!((reasons.value(0), payloads.value(0)), ("foreign_topic", ""));
}

fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .expect("request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("response");
    response
}

/// Raw bytes on the plain listener.
fn raw_session(addr: std::net::SocketAddr, bytes: &[u8]) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let _ = stream.write_all(bytes);
    // The broker closes the connection; reading returns at its close.
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest);
}

/// The return code of the CONNACK a CONNECT for `client_id` gets, if any.
fn connack_code(addr: std::net::SocketAddr, client_id: &str) -> Option<u8> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    stream.write_all(&connect_packet(client_id)).ok()?;
    let mut connack = [0u8; 4];
    stream.read_exact(&mut connack).ok()?;
    Some(connack[3])
}

/// An MQTT 3.1.1 CONNECT for `client_id`, keep-alive 10 s.
fn connect_packet(client_id: &str) -> Vec<u8> {
    let mut variable = b"\x00\x04MQTT\x04\x02\x00\x0a".to_vec();
    variable.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    variable.extend_from_slice(client_id.as_bytes());
    let mut packet = vec![0x10, variable.len() as u8];
    packet.extend_from_slice(&variable);
    packet
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversize_packets_close_only_their_connection() {
    let server = TestServer::start();
    let addr = server.handle.mqtt_addr();
    // Not MQTT at all.
    raw_session(addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    // A CONNECT, then a packet of an unknown type.
    let mut bad = connect_packet("garbage-1");
    bad.extend_from_slice(&[0xf0, 0x00]);
    raw_session(addr, &bad);
    // A CONNECT, then a PUBLISH announcing 4 MiB, over max_packet_bytes (1 MiB).
    let mut oversize = connect_packet("oversize-1");
    oversize.extend_from_slice(&[0x30, 0x80, 0x80, 0x80, 0x02]);
    oversize.extend_from_slice(&[0u8; 4096]);
    raw_session(addr, &oversize);
    // A remaining length that never ends (five continuation bytes).
    let mut endless = connect_packet("endless-1");
    endless.extend_from_slice(&[0x30, 0xff, 0xff, 0xff, 0xff, 0xff]);
    raw_session(addr, &endless);
    // A CONNECT that is cut short, and one with keep-alive 0.
    raw_session(addr, &connect_packet("cut-1")[..8]);
    let mut zero = connect_packet("zero-keepalive");
    zero[9] = 0;
    zero[10] = 0;
    raw_session(addr, &zero);

    // The listener still serves everyone else.
    let topic = format!("vehicles/{A}/teleservice");
    publish_all(addr, &[(topic, teleservice_now(A, 1).into_bytes())]).await;
    wait_for(|| stored(&server, Stream::Teleservice) == 1);
    server.handle.shutdown().expect("shutdown");
}

/// One connection floods QoS 0 publishes as fast as it can while another
/// vehicle publishes at QoS 1: every record of the other vehicle is stored.
/// Prints the other vehicle's PUBACK latency with and without the flood
/// (measured, not asserted: speed belongs in reports).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_client_does_not_starve_the_others() {
    let server = TestServer::start();
    let addr = server.handle.mqtt_addr();
    let quiet_round = |first: u32| async move {
        let mut latencies = Vec::new();
        for seq in first..first + 20 {
            let started = std::time::Instant::now();
            publish_all(
                addr,
                &[(
                    format!("vehicles/{A}/teleservice"),
                    teleservice_now(A, seq).into_bytes(),
                )],
            )
            .await;
            latencies.push(started.elapsed());
        }
        latencies.sort();
        latencies[latencies.len() / 2]
    };
    let calm = quiet_round(0).await;

    let flood = tokio::spawn(async move {
        let options = rumqttc::MqttOptions::new("flooder", addr.ip().to_string(), addr.port());
        let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 1000);
        let topic = format!("vehicles/{B}/diagnostics");
        let payload = format!(
            r#"{{"vin":"{B}","ts":{},"seq":1,"ecu":"BMS","severity":"info"}}"#,
            fleetgate::core::clock::now_ms()
        );
        let sender = tokio::spawn(async move {
            for _ in 0..200_000 {
                if client
                    .publish(
                        topic.as_str(),
                        rumqttc::QoS::AtMostOnce,
                        false,
                        payload.clone(),
                    )
                    .await
                    .is_err()
                {
                    break;
                }
            }
        });
        while !sender.is_finished() {
            if eventloop.poll().await.is_err() {
                break;
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let flooded = quiet_round(100).await;
    flood.abort();
    wait_for(|| stored(&server, Stream::Teleservice) == 40);
    let flooded_in = server
        .handle
        .metrics()
        .stream(Stream::Diagnostics)
        .records_received
        .load(Relaxed);
    println!(
        "quiet vehicle's median publish→PUBACK: {calm:?} alone, {flooded:?} beside a flood \
         ({flooded_in} flood records received meanwhile)"
    );
    server.handle.shutdown().expect("shutdown");
}

/// rumqttd 0.20 panicked, and stopped the listener for everyone, on the
/// second CONNECT of a client id its router had refused (vendor/rumqttd/
/// PATCHED.md). Two such CONNECTs, then an ordinary vehicle must still be
/// stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_client_id_does_not_stop_the_listener() {
    let server = TestServer::start();
    let addr = server.handle.mqtt_addr();
    for _ in 0..2 {
        raw_session(addr, &connect_packet("a/b"));
    }
    let topic = format!("vehicles/{A}/teleservice");
    publish_all(addr, &[(topic, teleservice_now(A, 1).into_bytes())]).await;
    wait_for(|| stored(&server, Stream::Teleservice) == 1);
    server.handle.shutdown().expect("shutdown");
}

/// A client that sends CONNECT and resets the connection before its CONNACK
/// is written used to keep its place in the router for ever (rumqttd
/// returned without telling the router it was gone): a few of them, and
/// every vehicle was refused at `broker.max_connections`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_reset_before_their_connack_do_not_use_up_the_connections() {
    use tokio::io::AsyncWriteExt;
    // One place is the ingest link's.
    let server = TestServer::start_with(|c| c.broker.max_connections = 4);
    let addr = server.handle.mqtt_addr();
    for i in 0..50 {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_zero_linger().expect("SO_LINGER 0");
        let mut stream = socket.connect(addr).await.expect("connect");
        stream
            .write_all(&connect_packet(&format!("reset-{i}")))
            .await
            .expect("CONNECT");
        // Closed with a reset (linger 0), not a FIN.
        drop(stream);
    }
    // The resets reach the router as their links fail: wait until a place
    // is free again (before the fix, none ever was).
    wait_for(|| connack_code(addr, "probe") == Some(0));
    let topic = format!("vehicles/{A}/teleservice");
    publish_all(addr, &[(topic, teleservice_now(A, 1).into_bytes())]).await;
    wait_for(|| stored(&server, Stream::Teleservice) == 1);
    server.handle.shutdown().expect("shutdown");
}

/// `broker.max_publishes_per_second`: a connection publishing faster is held
/// back (no PUBACK, no reads) until the next second, counted, and loses
/// nothing; another vehicle's publishes still go through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_over_its_publish_rate_is_held_back_and_counted() {
    let server = TestServer::start_with(|c| c.broker.max_publishes_per_second = 100);
    let addr = server.handle.mqtt_addr();
    let burst: Vec<_> = (0..400)
        .map(|seq| {
            let payload = format!(
                r#"{{"vin":"{B}","ts":{},"seq":{seq},"ecu":"BMS","severity":"info"}}"#,
                fleetgate::core::clock::now_ms()
            );
            (format!("vehicles/{B}/diagnostics"), payload.into_bytes())
        })
        .collect();
    let started = std::time::Instant::now();
    let flood = tokio::spawn(async move { publish_all(addr, &burst).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let quiet: Vec<_> = (0..5)
        .map(|seq| {
            (
                format!("vehicles/{A}/teleservice"),
                teleservice_now(A, seq).into_bytes(),
            )
        })
        .collect();
    publish_all(addr, &quiet).await;
    let quiet_done = started.elapsed();
    flood.await.expect("flood");
    let flood_done = started.elapsed();
    println!(
        "quiet vehicle acknowledged after {quiet_done:?}; the 400-record burst at 100/s after {flood_done:?}"
    );
    wait_for(|| stored(&server, Stream::Diagnostics) == 400);
    wait_for(|| stored(&server, Stream::Teleservice) == 5);
    let limited = server.handle.metrics().publish_rate_limited.load(Relaxed);
    assert!(limited >= 1, "the burst hit the limit ({limited})");
    let metrics = http_get(server.handle.admin_addr(), "/metrics");
    assert!(metrics.contains(&format!(
        "fleetgate_mqtt_publish_rate_limited_total {limited}"
    )));
    server.handle.shutdown().expect("shutdown");
}

/// Only fleetgate's own link may subscribe: a vehicle subscribing to `#`
/// would read every vehicle's raw records, so the broker disconnects it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_subscribes_is_disconnected() {
    let server = TestServer::start();
    let addr = server.handle.mqtt_addr();
    let options = rumqttc::MqttOptions::new("curious", addr.ip().to_string(), addr.port());
    let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 10);
    client
        .subscribe("#", rumqttc::QoS::AtMostOnce)
        .await
        .expect("queued");
    let outcome = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match eventloop.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => return "suback",
                Ok(_) => {}
                Err(_) => return "disconnected",
            }
        }
    })
    .await
    .expect("an answer");
    assert_eq!(outcome, "disconnected");
    // Publishing still works for everyone else.
    let topic = format!("vehicles/{A}/teleservice");
    publish_all(addr, &[(topic, teleservice_now(A, 1).into_bytes())]).await;
    wait_for(|| stored(&server, Stream::Teleservice) == 1);
    server.handle.shutdown().expect("shutdown");
}

/// fleetgate's link is the broker's only subscriber. A network client that
/// connects with its client id (the old fixed one, or the real one) must
/// neither replace it nor read anything, and records published meanwhile
/// are stored. Unpatched, rumqttd dropped the link for the newcomer and let
/// it subscribe to `#`: every raw record went to it, none to the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_network_client_cannot_take_over_the_ingest_link() {
    let server = TestServer::start();
    let addr = server.handle.mqtt_addr();
    let link_id = server.handle.link_client_id().to_owned();
    for (round, id) in ["fleetgate-ingest", link_id.as_str()]
        .into_iter()
        .enumerate()
    {
        let options = rumqttc::MqttOptions::new(id, addr.ip().to_string(), addr.port());
        let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 10);
        client
            .subscribe("#", rumqttc::QoS::AtMostOnce)
            .await
            .expect("queued");
        // Listen while a vehicle publishes; stop at the first error (rumqttc
        // would reconnect on the next poll).
        let spy = tokio::spawn(async move {
            let mut seen = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(3), async {
                loop {
                    match eventloop.poll().await {
                        Ok(rumqttc::Event::Incoming(
                            p @ (rumqttc::Packet::SubAck(_) | rumqttc::Packet::Publish(_)),
                        )) => seen.push(format!("{p:?}")),
                        Ok(_) => {}
                        Err(_) => break,
                    }
                }
            })
            .await;
            seen
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        let topic = format!("vehicles/{A}/teleservice");
        publish_all(
            addr,
            &[(topic, teleservice_now(A, round as u32).into_bytes())],
        )
        .await;
        let seen = spy.await.expect("spy");
        assert!(
            seen.is_empty(),
            "client id {id:?} subscribed or read: {seen:?}"
        );
        // The link still runs: the record is stored.
        wait_for(|| stored(&server, Stream::Teleservice) == round as u64 + 1);
    }
    let data = server.data_dir();
    server.handle.shutdown().expect("shutdown");
    assert_eq!(count(&data, "SELECT count(*) FROM teleservice").await, 2);
}

/// Vehicles publish QoS 0 or 1. A QoS 2 publish would be appended at its
/// PUBREL, past backpressure and the rate limit, so the broker refuses it:
/// MQTT 5 clients see Maximum QoS 1 in CONNACK and DISCONNECT 0x9B, MQTT
/// 3.1.1 clients are disconnected. Nothing of theirs is stored; QoS 1 still is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qos2_publish_is_refused_and_not_stored() {
    use rumqttc::v5::mqttbytes::{QoS as QoS5, v5::DisconnectReasonCode, v5::Packet as Packet5};
    let server = TestServer::start();
    let topic = format!("vehicles/{B}/teleservice");

    // MQTT 3.1.1: closed, no PUBREC.
    let addr = server.handle.mqtt_addr();
    let options = rumqttc::MqttOptions::new("qos2-v4", addr.ip().to_string(), addr.port());
    let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 10);
    client
        .publish(
            topic.as_str(),
            rumqttc::QoS::ExactlyOnce,
            false,
            teleservice_now(B, 1),
        )
        .await
        .expect("queued");
    let v4 = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match eventloop.poll().await {
                Ok(rumqttc::Event::Incoming(
                    rumqttc::Packet::PubRec(_) | rumqttc::Packet::PubComp(_),
                )) => return "acknowledged",
                Ok(_) => {}
                Err(_) => return "disconnected",
            }
        }
    })
    .await
    .expect("an answer");
    assert_eq!(v4, "disconnected");

    // MQTT 5: Maximum QoS 1 in CONNACK, then DISCONNECT 0x9B.
    let addr5 = server.handle.mqtt5_addr();
    let options = rumqttc::v5::MqttOptions::new("qos2-v5", addr5.ip().to_string(), addr5.port());
    let (client, mut eventloop) = rumqttc::v5::AsyncClient::new(options, 10);
    client
        .publish(
            topic.as_str(),
            QoS5::ExactlyOnce,
            false,
            teleservice_now(B, 2),
        )
        .await
        .expect("queued");
    let mut max_qos = None;
    let v5 = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match eventloop.poll().await {
                Ok(rumqttc::v5::Event::Incoming(Packet5::ConnAck(ack))) => {
                    max_qos = ack.properties.and_then(|p| p.max_qos);
                }
                Ok(rumqttc::v5::Event::Incoming(Packet5::PubRec(_) | Packet5::PubComp(_))) => {
                    return None;
                }
                Ok(_) => {}
                Err(rumqttc::v5::ConnectionError::MqttState(
                    rumqttc::v5::StateError::ServerDisconnect { reason_code, .. },
                )) => return Some(reason_code),
                Err(e) => panic!("MQTT 5 client: {e}"),
            }
        }
    })
    .await
    .expect("an answer");
    assert_eq!(max_qos, Some(1), "CONNACK advertises Maximum QoS 1");
    assert_eq!(v5, Some(DisconnectReasonCode::QoSNotSupported));

    // QoS 1 still works; nothing of B's is stored.
    let ok = format!("vehicles/{A}/teleservice");
    publish_all(addr, &[(ok, teleservice_now(A, 1).into_bytes())]).await;
    wait_for(|| stored(&server, Stream::Teleservice) == 1);
    let data = server.data_dir();
    server.handle.shutdown().expect("shutdown");
    assert_eq!(
        count(&data, "SELECT count(*) FROM teleservice").await,
        1,
        "no QoS 2 record stored"
    );
}

/// Every file fleetgate creates is 0600 and every directory 0700: data
/// directory, WAL segments, Parquet files and partitions, dead letters,
/// keys, vault, admin token, credentials, registry, deletion requests,
/// legal holds, audit logs and an export; checked while the server runs
/// (the WAL is not empty then) and after it stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_file_fleetgate_creates_is_owner_only() {
    let server = TestServer::start();
    let now = fleetgate::core::clock::now_ms();
    let charging = format!(
        r#"{{"vin":"{A}","ts":{now},"seq":1,"session_id":"S1","event":"start","started_at":{now},"soc_pct":40.0,"charging_mode":"ac","contract_number":"SE-1"}}"#
    );
    let case = format!(
        r#"{{"vin":"{A}","ts":{now},"seq":2,"trigger":"monthly","case_id":"C-1","contact_phone":"+46700000001"}}"#
    );
    publish_all(
        server.handle.mqtt_addr(),
        &[
            rtti_probe(B, now),
            (format!("vehicles/{A}/charging"), charging.into_bytes()),
            (format!("vehicles/{A}/teleservice"), case.into_bytes()),
            (format!("vehicles/{A}/diagnostics"), b"not json".to_vec()),
        ],
    )
    .await;
    let data = server.data_dir();
    let tables = ["rtti", "charging", "teleservice", "dead_letters"];
    wait_for(|| {
        tables.iter().all(|t| {
            let dir = data.join(t);
            dir.is_dir() && files_under(&dir).iter().any(|p| is_data_file(p))
        })
    });

    let admin = server.admin();
    let (status, body) = admin.post("/admin/principals", r#"{"id":"alice","kind":"user"}"#);
    assert_eq!(status, 200, "{body}");
    let alice: serde_json::Value = serde_json::from_str(&body).expect("json");
    let alice = alice["token"].as_str().expect("token").to_owned();
    let transfer = format!(
        r#"{{"user":"alice","vin":"{A}","at_ms":{}}}"#,
        now - 3_600_000
    );
    assert_eq!(admin.post("/admin/transfers", &transfer).0, 200);
    for event in [
        format!(r#"{{"event":"case_closed","vin":"{A}","id":"C-1"}}"#),
        format!(r#"{{"event":"legal_hold_placed","vin":"{A}","id":"LH-1"}}"#),
    ] {
        let (status, body) = admin.post("/admin/events", &event);
        assert_eq!(status, 200, "{body}");
    }
    let sql = r#"{"sql":"SELECT count(*) AS n FROM charging","purpose":"own_data_access"}"#;
    let (status, body) = http_request(
        server.handle.admin_addr(),
        "POST",
        "/sql",
        Some(&alice),
        sql,
    );
    assert_eq!(status, 200, "{body}");
    let env =
        fleetgate::access::AccessEnv::new(&server.config, Some(server.handle.privacy().clone()))
            .expect("access");
    let user = env.authenticate(&alice).expect("alice");
    let export = env.export(&user, now).await.expect("export");
    for format in [
        fleetgate::access::export::ExportFormat::Parquet,
        fleetgate::access::export::ExportFormat::Json,
    ] {
        let out = server.dir.path().join(format!("export-{format:?}/alice"));
        assert!(!export.write_dir(&out, format).expect("written").is_empty());
    }
    fleetgate::ingest::auth::issue(
        &Document::File(server.dir.path().join("keys/vehicle-credentials.json")),
        &server.handle.privacy().keys.redaction_key(),
        A,
        now,
    )
    .expect("credential");

    let root = server.dir.path().to_owned();
    let expected = [
        server.config.storage.key_file.clone(),
        server.config.storage.vault_file.clone(),
        server.config.admin.token_file.clone(),
        server.config.access.registry_file.clone(),
        server.config.retention.requests_file.clone(),
        server.config.retention.holds_file.clone(),
        server.config.retention.audit_file.clone(),
    ];
    let present = files_under(&root);
    for file in &expected {
        assert!(present.contains(file), "{} was not created", file.display());
    }
    assert!(
        present
            .iter()
            .any(|p| p.extension().is_some_and(|e| e == "wal")),
        "a WAL segment while running"
    );
    assert!(
        files_under(&server.config.access.audit_dir)
            .iter()
            .any(|p| p.extension().is_some_and(|e| e == "jsonl")),
        "the query audit"
    );
    let running = assert_owner_only(&root);
    server.handle.shutdown().expect("shutdown");
    let stopped = assert_owner_only(&root);
    assert!(
        running > 10 && stopped > 10,
        "{running} and {stopped} files checked"
    );
}

/// What a client sends never reaches the log through the broker's own
/// lines: a PUBLISH before CONNECT (its payload), a client id the router
/// refuses (a phone number), a second CONNECT (its user name and
/// password). rumqttd logged each packet whole, at levels fleetgate's
/// default filter lets through.
#[test]
fn the_broker_logs_no_packet_a_client_sent() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().expect("tempdir");
    let server = ServeProcess::spawn(dir.path(), "");
    let secret = "491701234567";

    let topic = b"vehicles/x/charging";
    let payload = format!(r#"{{"contact_phone":"+{secret}"}}"#);
    let mut publish = vec![0x30, (2 + topic.len() + payload.len()) as u8];
    publish.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    publish.extend_from_slice(topic);
    publish.extend_from_slice(payload.as_bytes());
    raw_session(server.addr, &publish);

    raw_session(server.addr, &connect_packet(&format!("+{secret}")));

    let mut second = b"\x00\x04MQTT\x04\xc2\x00\x0a".to_vec();
    for field in ["probe-1", &format!("u{secret}"), &format!("p{secret}")] {
        second.extend_from_slice(&(field.len() as u16).to_be_bytes());
        second.extend_from_slice(field.as_bytes());
    }
    let mut packets = connect_packet("probe-1");
    packets.extend_from_slice(&[0x10, second.len() as u8]);
    packets.extend_from_slice(&second);
    packets.extend_from_slice(&[0xc0, 0x00]);
    let mut stream = std::net::TcpStream::connect(server.addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    stream.write_all(&packets).expect("packets");
    // CONNACK, then the PINGRESP: the router handled the second CONNECT.
    let mut answers = [0u8; 6];
    stream
        .read_exact(&mut answers)
        .expect("CONNACK and PINGRESP");
    assert_eq!(answers[4..], [0xd0, 0x00]);
    drop(stream);

    server.terminate();
    let log = std::fs::read_to_string(dir.path().join("serve.log")).expect("log");
    for handled in ["NotConnectPacket", "Invalid client_id", "Unexpected packet"] {
        assert!(log.contains(handled), "{handled}: {log}");
    }
    assert!(!log.contains(secret), "{log}");
}

/// What fails in a client's TLS handshake is the client's doing: a TCP
/// probe of the TLS port is no warning, a client that speaks plain MQTT
/// or shows a certificate from another CA is one WARN line saying which
/// check failed, from a fixed set that quotes nothing from its certificate
/// (whose organisation is a VIN); never an ERROR.
#[test]
fn a_failed_tls_handshake_is_a_warning_that_quotes_no_certificate() {
    use std::io::Write;
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = vehicle_pki(dir.path());
    pki.ca("rogue-ca");
    pki.sign(
        "rogue-ca",
        "car-rogue",
        &format!("/O={A}/CN=car-rogue"),
        "extendedKeyUsage=clientAuth\n",
    );
    let server = ServeProcess::spawn(
        dir.path(),
        &format!(
            "[broker.tls]\naddr = \"127.0.0.1:0\"\ncert_file = {:?}\nkey_file = {:?}\nclient_ca_file = {:?}\n",
            pki.path("server.pem"),
            pki.path("server.key"),
            pki.path("vehicle-ca.pem"),
        ),
    );
    let tls = server.tls.expect("the TLS address in the banner");
    drop(std::net::TcpStream::connect(tls).expect("a probe"));
    let mut plain = std::net::TcpStream::connect(tls).expect("connect");
    plain
        .write_all(&connect_packet("plain-mqtt"))
        .expect("a CONNECT where a ClientHello belongs");
    let own = format!("/tenants/{A}/vehicles/{A}/teleservice");
    assert!(
        !mosquitto_pub(&pki, tls.port(), "car-rogue", &own, &teleservice_now(A, 1)),
        "a certificate from another CA is refused"
    );
    let warned = |failure: &str| {
        std::fs::read_to_string(dir.path().join("serve.log")).is_ok_and(|log| {
            log.lines().any(|l| {
                l.contains(" WARN ") && l.contains("A TLS handshake failed") && l.contains(failure)
            })
        })
    };
    wait_for(|| warned("client broke the TLS protocol"));
    wait_for(|| warned("client certificate from an unknown CA"));
    drop(plain);
    server.terminate();
    let log = std::fs::read_to_string(dir.path().join("serve.log")).expect("log");
    assert!(!log.contains(" ERROR "), "{log}");
    assert!(!log.contains(A), "{log}");
    assert_eq!(
        log.matches("A TLS handshake failed").count(),
        2,
        "the probe is no warning: {log}"
    );
}

/// An MQTT 5 session whose CONNECT (clean start, no properties) the broker
/// accepted, then `publish` sent; returns everything the broker sent back
/// until it closed the connection.
fn mqtt5_session(addr: std::net::SocketAddr, client_id: &str, publish: &[u8]) -> Vec<u8> {
    use std::io::{Read, Write};
    let mut connect = b"\x00\x04MQTT\x05\x02\x00\x0a\x00".to_vec();
    connect.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    connect.extend_from_slice(client_id.as_bytes());
    let mut packets = vec![0x10, connect.len() as u8];
    packets.extend_from_slice(&connect);
    packets.extend_from_slice(publish);
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    stream.write_all(&packets).expect("packets");
    let mut answers = Vec::new();
    stream
        .read_to_end(&mut answers)
        .expect("the broker closes the connection");
    assert_eq!(answers.first(), Some(&0x20), "a CONNACK first: {answers:?}");
    answers
}

/// MQTT 5 topic aliases a client may not send (alias 0; an empty topic
/// with an alias it never set) end its connection with a DISCONNECT that
/// says why, and one WARN line each; never an ERROR line, never its topic.
#[test]
fn a_topic_alias_a_client_may_not_send_disconnects_it_with_a_warning() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = ServeProcess::spawn(dir.path(), "");
    let topic = format!("vehicles/{A}/teleservice");
    // PUBLISH, QoS 0: the topic, properties (topic alias), a payload.
    let publish = |topic: &str, alias: u16| {
        let mut body = (topic.len() as u16).to_be_bytes().to_vec();
        body.extend_from_slice(topic.as_bytes());
        body.extend_from_slice(&[0x03, 0x23]);
        body.extend_from_slice(&alias.to_be_bytes());
        body.extend_from_slice(b"{}");
        let mut packet = vec![0x30, body.len() as u8];
        packet.extend_from_slice(&body);
        packet
    };
    for (client, publish, reason) in [
        ("alias-zero", publish(&topic, 0), 0x94),
        ("alias-unset", publish("", 7), 0x82),
    ] {
        let answers = mqtt5_session(server.mqtt5, client, &publish);
        let connack_len = usize::from(answers[1]) + 2;
        assert_eq!(
            answers.get(connack_len..),
            Some(&[0xe0, 0x02, reason, 0x00][..]),
            "{client}: a DISCONNECT with its reason after the CONNACK: {answers:?}"
        );
    }
    wait_for(|| {
        std::fs::read_to_string(dir.path().join("serve.log"))
            .is_ok_and(|log| log.matches("A publish was refused").count() == 2)
    });
    server.terminate();
    let log = std::fs::read_to_string(dir.path().join("serve.log")).expect("log");
    for warned in [
        "Alias must be greater than 0",
        "Empty topic name with invalid alias",
        "A publish was refused",
    ] {
        assert!(
            log.lines()
                .any(|l| l.contains(" WARN ") && l.contains(warned)),
            "{warned}: {log}"
        );
    }
    assert!(!log.contains(" ERROR "), "{log}");
    assert!(!log.contains(A), "{log}");
}

/// A vehicle fleet with passwords: a CONNECT that carries no login at all is
/// refused before the password check (which logs and counts refusals), so
/// the broker says so itself, at WARN, and names nothing the client sent.
#[test]
fn a_connect_without_a_login_is_refused_with_a_warning() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().expect("tempdir");
    let credentials = dir.path().join("vehicle-credentials.json");
    let server = ServeProcess::spawn(
        dir.path(),
        &format!("[broker]\ncredentials_file = {:?}\n", credentials),
    );
    let mut stream = std::net::TcpStream::connect(server.addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    stream
        .write_all(&connect_packet("491701234567"))
        .expect("CONNECT");
    let mut connack = [0u8; 4];
    stream.read_exact(&mut connack).expect("CONNACK");
    assert_eq!(
        connack,
        [0x20, 0x02, 0x00, 0x04],
        "bad user name or password"
    );
    wait_for(|| {
        std::fs::read_to_string(dir.path().join("serve.log")).is_ok_and(|log| {
            log.lines()
                .any(|l| l.contains(" WARN ") && l.contains("without a user name and password"))
        })
    });
    server.terminate();
    let log = std::fs::read_to_string(dir.path().join("serve.log")).expect("log");
    assert!(!log.contains("491701234567"), "{log}");
}
