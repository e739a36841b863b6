//! Fixtures shared by the integration tests: a server on port 0 in a temp
//! dir, a QoS 1 publisher that waits for every PUBACK, the example payloads,
//! and an independent computation of the expected pseudonyms.
#![allow(dead_code, unreachable_pub)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use fleetgate::config::Config;
use fleetgate::ops::server::ServerHandle;
use fleetgate::schema::Stream;
use hmac::{Hmac, Mac};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use sha2::Sha256;

/// The topic VIN invalid examples are published under (schemas/examples/README.md).
pub const INVALID_EXAMPLE_VIN: &str = "WMWTEST0000000001";
/// Upper bound on any wait, so a broken server fails the test instead of hanging it.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// A running server and the temp dir holding its data and key.
pub struct TestServer {
    pub handle: ServerHandle,
    pub config: Config,
    pub dir: tempfile::TempDir,
}

/// The configuration of a test server: port 0, everything under `dir`.
pub fn test_config(dir: &Path) -> Config {
    let mut config = Config::isolated(dir);
    config.storage.roll_age_ms = 200;
    config.pipeline.workers = 2;
    config
}

impl TestServer {
    pub fn start() -> Self {
        Self::start_with(|_| {})
    }

    pub fn start_with(adjust: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = test_config(dir.path());
        adjust(&mut config);
        let handle = fleetgate::ops::server::start(&config).expect("server starts");
        Self {
            handle,
            config,
            dir,
        }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.config.storage.data_dir.clone()
    }

    pub fn key_file(&self) -> PathBuf {
        self.config.storage.key_file.clone()
    }

    pub fn vault_file(&self) -> PathBuf {
        self.config.storage.vault_file.clone()
    }

    /// The `/admin` routes of this server, with its admin token.
    pub fn admin(&self) -> Admin {
        Admin::new(self.handle.admin_addr(), &self.config)
    }

    /// Shuts the server down cleanly; its configuration and files stay.
    pub fn stop(self) -> (Config, tempfile::TempDir) {
        self.handle.shutdown().expect("shutdown");
        (self.config, self.dir)
    }

    /// Shuts the server down cleanly and starts it again on the same files.
    pub fn restart(self) -> Self {
        let (config, dir) = self.stop();
        let handle = fleetgate::ops::server::start(&config).expect("restart");
        Self {
            handle,
            config,
            dir,
        }
    }
}

/// A running server's HTTP endpoint and the admin token its `/admin` routes need.
pub struct Admin {
    pub addr: std::net::SocketAddr,
    pub token: String,
}

impl Admin {
    /// The endpoint at `addr` of the server started with `config`, whose
    /// token file it reads.
    pub fn new(addr: std::net::SocketAddr, config: &Config) -> Self {
        let token = std::fs::read_to_string(&config.admin.token_file)
            .expect("the admin token file")
            .trim()
            .to_owned();
        Self { addr, token }
    }

    /// POSTs JSON with the admin token; the status and the body.
    pub fn post(&self, path: &str, body: &str) -> (u16, String) {
        http_request(self.addr, "POST", path, Some(&self.token), body)
    }

    /// Registers the principal `body` describes; its bearer token.
    pub fn principal(&self, body: &str) -> String {
        let (status, answer) = self.post("/admin/principals", body);
        assert_eq!(status, 200, "{answer}");
        let answer: serde_json::Value = serde_json::from_str(&answer).expect("json");
        answer["token"].as_str().expect("token").to_owned()
    }
}

/// One HTTP/1.1 request, with a bearer token if given; the status and the
/// body as text.
pub fn http_request(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: &str,
) -> (u16, String) {
    let (status, bytes) = http_bytes(addr, method, path, bearer, body);
    (status, String::from_utf8(bytes).expect("UTF-8 answer"))
}

/// One HTTP/1.1 request; the status and the body's bytes.
pub fn http_bytes(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, Vec<u8>) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("request");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).expect("response");
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("header end");
    let head = String::from_utf8_lossy(&response[..split]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let mut payload = response[split + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        payload = dechunk(&payload);
    }
    (status, payload)
}

fn dechunk(mut body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(end) = body.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size =
            usize::from_str_radix(std::str::from_utf8(&body[..end]).unwrap_or("0").trim(), 16)
                .unwrap_or(0);
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&body[end + 2..end + 2 + size]);
        body = &body[end + 4 + size..];
    }
}

/// Publishes every (topic, payload) at QoS 1 over one MQTT 3.1.1 connection
/// and returns once every PUBACK has arrived.
pub async fn publish_all(addr: std::net::SocketAddr, messages: &[(String, Vec<u8>)]) {
    let client_id = format!(
        "test-publisher-{:016x}",
        fleetgate::core::clock::random_nonce()
    );
    let mut options = MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
    options.set_max_packet_size(4 * 1024 * 1024, 4 * 1024 * 1024);
    options.set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = AsyncClient::new(options, messages.len() + 10);
    let expected = messages.len();
    let acks = tokio::spawn(async move {
        let mut acked = 0;
        while acked < expected {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => acked += 1,
                Ok(_) => {}
                Err(e) => panic!("MQTT connection failed after {acked} acks: {e}"),
            }
        }
    });
    for (topic, payload) in messages {
        client
            .publish(topic.clone(), QoS::AtLeastOnce, false, payload.clone())
            .await
            .expect("publish queued");
    }
    tokio::time::timeout(DEADLINE, acks)
        .await
        .expect("every PUBACK within the deadline")
        .expect("ack task");
    client.disconnect().await.ok();
}

/// The clock the tests query at: 2026-11-24T12:00:00Z, hours after the
/// newest example record, so that every retention rule still keeps them
/// whatever today's date is. `tests/retention.rs` moves it on purpose.
pub const TEST_NOW_MS: i64 = 1_795_521_600_000;

/// [`publish_all`] for a test without a runtime of its own.
pub fn publish_blocking(addr: std::net::SocketAddr, messages: &[Message]) {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(publish_all(addr, messages));
}

/// One hour and one day in milliseconds.
pub const HOUR: i64 = 3_600_000;
pub const DAY: i64 = 24 * HOUR;
/// The two vehicles most tests publish for: A and B.
pub const A: &str = "WMW11DJ04N2T00001";
pub const B: &str = "WMW21GD07P2S00002";

/// A publish: its topic and payload.
pub type Message = (String, Vec<u8>);

/// `vin`'s publish on `stream` of one record: `fields` with the vehicle's
/// `vin`, `ts` and `seq`.
pub fn record(vin: &str, stream: Stream, seq: u64, ts: i64, fields: serde_json::Value) -> Message {
    let mut body = serde_json::json!({ "vin": vin, "ts": ts, "seq": seq });
    merge(&mut body, fields);
    (
        format!("vehicles/{vin}/{}", stream.name()),
        body.to_string().into_bytes(),
    )
}

/// `message` with `changes` set over its record's fields.
pub fn with(message: Message, changes: serde_json::Value) -> Message {
    let (topic, payload) = message;
    let mut body: serde_json::Value = serde_json::from_slice(&payload).expect("a record");
    merge(&mut body, changes);
    (topic, body.to_string().into_bytes())
}

fn merge(body: &mut serde_json::Value, changes: serde_json::Value) {
    if let (Some(body), serde_json::Value::Object(changes)) = (body.as_object_mut(), changes) {
        body.extend(changes);
    }
}

/// The start of charging session `S{seq}` at 40 % (AC, not remote-managed,
/// at one place), billed to `contract`.
pub fn charging(vin: &str, seq: u64, ts: i64, contract: &str) -> Message {
    record(
        vin,
        Stream::Charging,
        seq,
        ts,
        serde_json::json!({
            "session_id": format!("S{seq}"), "event": "start", "started_at": ts,
            "soc_pct": 40.0, "charging_mode": "ac", "remote_managed": false,
            "latitude": 59.31, "longitude": 18.02, "contract_number": contract,
        }),
    )
}

/// A teleservice call of `trigger` at mileage `seq` × 1000 km, with the
/// contact phone `+46700` and `seq` in six digits.
pub fn teleservice(vin: &str, seq: u64, ts: i64, trigger: &str) -> Message {
    record(
        vin,
        Stream::Teleservice,
        seq,
        ts,
        serde_json::json!({
            "trigger": trigger, "mileage_km": seq * 1000, "service_needs": ["oil"],
            "latitude": 59.4, "longitude": 17.9, "contact_phone": format!("+46700{seq:06}"),
        }),
    )
}

/// A battery-management warning with one fault code.
pub fn diagnostics(vin: &str, seq: u64, ts: i64) -> Message {
    record(
        vin,
        Stream::Diagnostics,
        seq,
        ts,
        serde_json::json!({
            "ecu": "BMS", "severity": "warning", "fault_codes": ["P0A7F"],
            "battery_voltage_v": 398.0,
        }),
    )
}

/// An RTTI probe of `vin` at `ts_ms`, as its topic and payload.
pub fn rtti_probe(vin: &str, ts_ms: i64) -> (String, Vec<u8>) {
    (
        format!("vehicles/{vin}/rtti"),
        format!(r#"{{"vin":"{vin}","ts":{ts_ms},"seq":1,"latitude":59.3,"longitude":18.0}}"#)
            .into_bytes(),
    )
}

/// Runs SQL through fleetgate's query entry point, as seen at [`TEST_NOW_MS`].
pub async fn query(data_dir: &Path, sql: &str) -> Vec<RecordBatch> {
    query_at(data_dir, sql, TEST_NOW_MS).await
}

/// Runs SQL as seen at `now_ms`, under the built-in retention rules.
pub async fn query_at(data_dir: &Path, sql: &str, now_ms: i64) -> Vec<RecordBatch> {
    let registry = fleetgate::schema::Registry::load().expect("schemas");
    let retention =
        fleetgate::lifecycle::retention::Retention::load(None, &registry).expect("rules");
    let ctx = fleetgate::query::session_at(data_dir, &registry, &retention, now_ms)
        .await
        .expect("session");
    fleetgate::query::run(&ctx, sql).await.expect("query runs")
}

/// Example payloads of a stream: (file name, bytes), sorted by name.
pub fn examples(stream: Stream, kind: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("schemas/examples")
        .join(stream.name())
        .join(kind);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("examples dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .map(|p| {
            let name = p.file_name().expect("name").to_string_lossy().into_owned();
            (name, std::fs::read(&p).expect("read"))
        })
        .collect();
    files.sort();
    files
}

/// The records of a valid example file.
pub fn records(bytes: &[u8]) -> Vec<serde_json::Value> {
    match serde_json::from_slice(bytes).expect("valid example is JSON") {
        serde_json::Value::Array(items) => items,
        one => vec![one],
    }
}

/// Days of a key epoch under the default configuration.
pub const KEY_EPOCH_DAYS: i64 = 30;

/// The key epoch of a timestamp under the default configuration.
pub fn epoch_of(ts_ms: i64) -> i32 {
    ts_ms.div_euclid(KEY_EPOCH_DAYS * 86_400_000) as i32
}

fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("hmac key");
    for part in parts {
        mac.update(part);
        mac.update(&[0]);
    }
    mac.finalize().into_bytes().into()
}

/// The vehicle's secrets, read from the vault of a stopped server.
pub fn vehicle_keys(
    key_file: &Path,
    vault_file: &Path,
    vin: &str,
) -> Option<fleetgate::privacy::vault::VehicleKeys> {
    let ring = fleetgate::privacy::pseudo::KeyRing::load_or_create(key_file).expect("key ring");
    let vault = fleetgate::privacy::vault::Vault::open(vault_file, &ring).expect("vault");
    vault.get(vin).expect("vault read")
}

/// The internal pseudonym of a vehicle in an epoch, computed here from the
/// root key and the vehicle's vault secret, independently of fleetgate's code:
/// HMAC(HMAC(root, "pseudonym-domain", "internal", epoch), "vehicle", secret).
pub fn expected_vehicle_id(
    key_file: &Path,
    vault_file: &Path,
    vin: &str,
    epoch: i32,
) -> Option<String> {
    let root = std::fs::read(key_file).expect("key file");
    let secret = vehicle_keys(key_file, vault_file, vin)?.secret;
    let domain_key = hmac(
        &root,
        &[b"pseudonym-domain", b"internal", &epoch.to_le_bytes()],
    );
    Some(hex::encode(
        &hmac(&domain_key, &[b"vehicle", &secret.0])[..16],
    ))
}

/// Every file under `dir`, recursively.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).expect("read_dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out
}

/// Every file under `root` is 0600 and every directory 0700 (or narrower);
/// returns how many files it checked.
pub fn assert_owner_only(root: &Path) -> usize {
    use std::os::unix::fs::PermissionsExt;
    let mut files = 0;
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read_dir") {
            let path = entry.expect("entry").path();
            let meta = std::fs::symlink_metadata(&path).expect("stat");
            let (allowed, what) = if meta.is_dir() {
                stack.push(path.clone());
                (0o700, "directory")
            } else {
                files += 1;
                (0o600, "file")
            };
            let mode = meta.permissions().mode() & 0o777;
            assert_eq!(
                mode & !allowed,
                0,
                "{what} {} is {mode:o}, wider than {allowed:o}",
                path.display()
            );
        }
    }
    files
}

/// Every value of every Parquet file under `dir`, decompressed and rendered
/// as text, so a scan for secrets sees what zstd hides from a byte scan.
pub fn parquet_text(dir: &Path) -> String {
    let mut text = String::new();
    for path in files_under(dir) {
        if path.extension().is_none_or(|e| e != "parquet") {
            continue;
        }
        let file = std::fs::File::open(&path).expect("open parquet");
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
            .expect("parquet reader")
            .build()
            .expect("reader");
        let batches: Vec<RecordBatch> = reader.map(|b| b.expect("batch")).collect();
        text.push_str(
            &arrow::util::pretty::pretty_format_batches(&batches)
                .expect("render")
                .to_string(),
        );
    }
    text
}

/// Waits for `done` to hold, polling, up to [`DEADLINE`].
pub fn wait_for(mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < DEADLINE,
            "condition not met within {DEADLINE:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `fleetgate serve` as a child process, as an operator runs it.
pub struct ServeProcess {
    pub child: std::process::Child,
    pub addr: std::net::SocketAddr,
    /// Where its `/metrics` and admin routes answer.
    pub admin: std::net::SocketAddr,
    /// Where MQTT 5 clients connect.
    pub mqtt5: std::net::SocketAddr,
    /// Where vehicles connect with client certificates, if `[broker.tls]` is set.
    pub tls: Option<std::net::SocketAddr>,
}

pub const BIN: &str = env!("CARGO_BIN_EXE_fleetgate");

impl ServeProcess {
    /// Starts `fleetgate serve` in `dir` on port 0 with `config` (TOML, may
    /// be empty), its log going to `dir/serve.log` (appended), and waits for
    /// the line saying where it listens.
    pub fn spawn(dir: &Path, config: &str) -> Self {
        Self::spawn_with_env(dir, config, &[])
    }

    /// [`ServeProcess::spawn`] with these environment variables set.
    pub fn spawn_with_env(dir: &Path, config: &str, env: &[(&str, &std::ffi::OsStr)]) -> Self {
        use std::io::BufRead;
        let config_path = dir.join("fleetgate.toml");
        std::fs::write(&config_path, config).expect("write config");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("serve.log"))
            .expect("log file");
        let mut child = std::process::Command::new(BIN)
            .current_dir(dir)
            .args([
                "serve",
                "--mqtt-addr",
                "127.0.0.1:0",
                "--mqtt5-addr",
                "127.0.0.1:0",
                "--admin-addr",
                "127.0.0.1:0",
                "--flight-sql-addr",
                "127.0.0.1:0",
                "--config",
            ])
            .arg(&config_path)
            // Its default log filter, whatever the caller's shell exports:
            // tests read what it logs.
            .env_remove("RUST_LOG")
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn fleetgate serve");
        let stdout = child.stdout.take().expect("stdout");
        let mut banner = String::new();
        std::io::BufReader::new(stdout)
            .read_line(&mut banner)
            .expect("banner");
        // The address after `marker`, up to the first of `ends`.
        let address = |marker: &str, ends: &[char]| -> Option<std::net::SocketAddr> {
            let rest = banner.split(marker).nth(1)?;
            rest.split(ends).next()?.parse().ok()
        };
        let addr = address("mqtt://", &[' ']).unwrap_or_else(|| {
            let log = std::fs::read_to_string(dir.join("serve.log")).unwrap_or_default();
            let last_run = log.rsplit(" INFO ").next().unwrap_or_default();
            let tail: String = last_run.chars().take(3000).collect();
            panic!("no address in {banner:?}; the log of that run:\n{tail}")
        });
        let admin = address("metrics on http://", &['/']).expect("the admin address in the banner");
        let mqtt5 = address("(MQTT 5: ", &[')']).expect("the MQTT 5 address in the banner");
        let tls = address("mqtts://", &[' ']);
        Self {
            child,
            addr,
            admin,
            mqtt5,
            tls,
        }
    }

    /// Starts `fleetgate serve` in `dir` with `config`, which must refuse to
    /// start (exit unsuccessfully within the deadline); returns its stderr.
    pub fn refused(dir: &Path, config: &str) -> String {
        let config_path = dir.join("refused.toml");
        std::fs::write(&config_path, config).expect("write config");
        let mut start = std::process::Command::new(BIN)
            .current_dir(dir)
            .args(["serve", "--mqtt-addr", "127.0.0.1:0", "--mqtt5-addr"])
            .args(["127.0.0.1:0", "--admin-addr", "127.0.0.1:0"])
            .args(["--flight-sql-addr", "127.0.0.1:0", "--config"])
            .arg(&config_path)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("fleetgate serve");
        let deadline = std::time::Instant::now() + DEADLINE;
        let status = loop {
            if let Some(status) = start.try_wait().expect("wait") {
                break status;
            }
            if std::time::Instant::now() > deadline {
                start.kill().ok();
                panic!("fleetgate started where it must refuse to");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(!status.success());
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut start.stderr.take().expect("stderr"), &mut stderr)
            .expect("stderr");
        stderr
    }

    /// Rows of `stream` this process stored, from its `/metrics`.
    pub fn rows_stored(&self, stream: &str) -> u64 {
        let (status, text) = http_request(self.admin, "GET", "/metrics", None, "");
        assert_eq!(status, 200);
        let prefix = format!("fleetgate_records_stored_total{{stream=\"{stream}\"}} ");
        text.lines()
            .find_map(|line| line.strip_prefix(&prefix))
            .and_then(|value| value.trim().parse::<f64>().ok())
            .map_or(0, |value| value as u64)
    }

    /// SIGTERM, and the exit status must be success.
    pub fn terminate(mut self) {
        self.signal("-TERM");
        let status = self.child.wait().expect("wait");
        assert!(status.success(), "serve exited with {status}");
    }

    /// SIGKILL: a crash.
    pub fn kill(mut self) {
        self.signal("-KILL");
        self.child.wait().expect("wait");
    }

    fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    }
}

/// A test that fails midway leaves no server running behind it.
impl Drop for ServeProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A faulty disk under one directory for a `fleetgate serve` process:
/// `tests/faults/fsync_fault.c`, built into the test's directory and loaded
/// with `LD_PRELOAD`. While [`FsyncFault::flag`] exists, syncs of files
/// under the directory fail (`"fail"`: `fdatasync` fails with EIO and the
/// unsynced bytes are lost) or hang (`"stall"`: `fsync` and `fdatasync`
/// wait until the flag is removed, and `<flag>.stalled` appears).
pub struct FsyncFault {
    pub flag: PathBuf,
    env: Vec<(&'static str, std::ffi::OsString)>,
}

impl FsyncFault {
    /// `mode` ("fail" or "stall") for files under `dir`/`under`, with its
    /// library and flag file in `dir`.
    pub fn new(dir: &Path, mode: &str, under: &str) -> Self {
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/faults/fsync_fault.c");
        let library = dir.join("libfsync_fault.so");
        let status = std::process::Command::new("cc")
            .args(["-shared", "-fPIC", "-O1", "-o"])
            .arg(&library)
            .arg(&source)
            .args(["-ldl", "-lpthread"])
            .status()
            .expect("cc runs");
        assert!(status.success(), "cc could not build {}", source.display());
        // As the process sees it (/proc/self/fd), whatever links the temp dir has.
        let under = dir.canonicalize().expect("temp dir").join(under);
        let flag = dir.join(format!("{mode}-fsync"));
        let env = vec![
            ("LD_PRELOAD", library.into_os_string()),
            ("FSYNC_FAULT", mode.into()),
            ("FSYNC_FAULT_UNDER", under.into_os_string()),
            ("FSYNC_FAULT_WHILE", flag.clone().into_os_string()),
        ];
        Self { flag, env }
    }

    /// The environment that loads the fault into a process.
    pub fn env(&self) -> Vec<(&'static str, &std::ffi::OsStr)> {
        self.env.iter().map(|(k, v)| (*k, v.as_os_str())).collect()
    }

    /// Whether a sync has hung (mode "stall").
    pub fn stalled(&self) -> bool {
        let mut marker = self.flag.clone().into_os_string();
        marker.push(".stalled");
        Path::new(&marker).exists()
    }
}

/// A single-number query result, as seen at [`TEST_NOW_MS`].
pub async fn count(data_dir: &Path, sql: &str) -> i64 {
    count_at(data_dir, sql, TEST_NOW_MS).await
}

/// A single-number query result, as seen at `now_ms`.
pub async fn count_at(data_dir: &Path, sql: &str, now_ms: i64) -> i64 {
    first_integer(&query_at(data_dir, sql, now_ms).await)
}

/// The first value of an answer whose first column is a BIGINT (a count).
pub fn first_integer(batches: &[arrow::array::RecordBatch]) -> i64 {
    batches[0]
        .column(0)
        .as_any()
        .downcast_ref::<arrow::array::Int64Array>()
        .expect("an integer result")
        .value(0)
}

/// Rows a sweep deleted from `table`.
pub fn rows_deleted(deleted: &[fleetgate::lifecycle::retention::Deletion], table: &str) -> u64 {
    deleted
        .iter()
        .filter(|d| d.table == table)
        .map(|d| d.rows)
        .sum()
}

/// A table's data file: Parquet outside `_delta_log` (whose checkpoints
/// are Parquet too).
pub fn is_data_file(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "parquet")
        && !path.components().any(|c| c.as_os_str() == "_delta_log")
}

/// A PostgreSQL server of its own for a test (Debian's `postgresql`
/// package): a fresh cluster in a temp dir, listening only on a Unix socket
/// in that dir (no TCP port to collide on), stopped when dropped.
/// PostgreSQL refuses to run as root: as root, it runs as the `postgres` user.
pub struct Postgres {
    pub dir: tempfile::TempDir,
    bin: PathBuf,
}

impl Postgres {
    pub fn start() -> Self {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .expect("PostgreSQL is installed (apt-get install postgresql)")
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .filter(|bin| bin.join("pg_ctl").exists())
            .max()
            .expect("a PostgreSQL version with pg_ctl");
        let dir = tempfile::tempdir().expect("tempdir");
        let postgres = Self { dir, bin };
        std::fs::create_dir(postgres.socket_dir()).expect("socket dir");
        if rustix::process::geteuid().is_root() {
            let status = std::process::Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(postgres.dir.path())
                .status()
                .expect("chown");
            assert!(status.success());
        }
        postgres.run(
            "initdb",
            &[
                "-A",
                "trust",
                "-U",
                "fleetgate",
                "-E",
                "UTF8",
                "--no-sync",
                "-D",
            ],
            &[postgres.data_dir().as_os_str()],
        );
        let options = format!(
            "-c listen_addresses='' -c unix_socket_directories='{}' -c wal_recycle=off",
            postgres.socket_dir().display()
        );
        let log = postgres.dir.path().join("server.log");
        postgres.run(
            "pg_ctl",
            &["-w", "-o", &options, "-l"],
            &[
                log.as_os_str(),
                "-D".as_ref(),
                postgres.data_dir().as_os_str(),
                "start".as_ref(),
            ],
        );
        postgres
    }

    /// The connection string fleetgate's `cluster.control_plane` takes.
    pub fn url(&self) -> String {
        format!(
            "host={} user=fleetgate dbname=postgres",
            self.socket_dir().display()
        )
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn socket_dir(&self) -> PathBuf {
        self.dir.path().join("socket")
    }

    /// `sql` through psql; its output, unaligned, tuples only.
    pub fn psql(&self, sql: &str) -> String {
        let output = std::process::Command::new(self.bin.join("psql"))
            .args(["-X", "-A", "-t", "-h"])
            .arg(self.socket_dir())
            .args(["-U", "fleetgate", "-d", "postgres", "-c", sql])
            .output()
            .expect("psql");
        assert!(
            output.status.success(),
            "psql: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// `program` of this PostgreSQL, run as the `postgres` user when we are root.
    fn command(&self, program: &str) -> std::process::Command {
        let path = self.bin.join(program);
        if rustix::process::geteuid().is_root() {
            let mut command = std::process::Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(path);
            command
        } else {
            std::process::Command::new(path)
        }
    }

    fn run(&self, program: &str, args: &[&str], more: &[&std::ffi::OsStr]) {
        let output = self
            .command(program)
            .args(args)
            .args(more)
            .output()
            .expect(program);
        assert!(
            output.status.success(),
            "{program}: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let data = self.data_dir();
        let _ = self
            .command("pg_ctl")
            .args(["-m", "immediate", "-D"])
            .arg(data)
            .arg("stop")
            .output();
    }
}

/// The bucket [`S3Server`] creates.
pub const BUCKET: &str = "fleetgate-test";

/// A moto S3 server on 127.0.0.1 with one bucket; killed when dropped.
pub struct S3Server {
    child: std::process::Child,
    pub addr: std::net::SocketAddr,
}

impl S3Server {
    pub fn start() -> Self {
        use std::io::{BufRead, BufReader};
        use std::process::{Command, Stdio};
        let mut child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", "0"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("moto_server must be installed (pip install 'moto[server]'; see .ci/run)");
        let stderr = child.stderr.take().expect("stderr");
        let mut lines = BufReader::new(stderr).lines();
        let port = loop {
            let line = lines
                .next()
                .expect("moto_server printed its address")
                .expect("line");
            if let Some(rest) = line.split("http://127.0.0.1:").nth(1) {
                let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
                break digits.parse::<u16>().expect("port");
            }
        };
        // Keep reading its log so that it never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let (status, body) = http_request(addr, "PUT", &format!("/{BUCKET}"), None, "");
        assert_eq!(status, 200, "create bucket: {body}");
        Self { child, addr }
    }

    /// Stops answering (SIGSTOP): connections hang until clients time out.
    pub fn pause(&self) {
        signal(&self.child, "STOP");
    }

    pub fn resume(&self) {
        signal(&self.child, "CONT");
    }
}

fn signal(child: &std::process::Child, name: &str) {
    let status = std::process::Command::new("kill")
        .args([&format!("-{name}"), &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
