#!/usr/bin/env bash
# One machine, one run: the numbers of the README's "Benchmarks" section.
#
#   scripts/bench.sh [PUBLISHES]        (default 2000000; 300-byte-class JSON records, QoS 1)
#
# 1. ceiling:   fleetgate's embedded broker with the discard sink, loadgen flat out;
# 2. e2e:       fleetgate end to end (WAL, pseudonymised, Parquet), loadgen flat out;
#               its rate is acknowledged records over the time until all are stored;
#               then stopped cleanly and verified record by record; compacted,
#               and on a copy a retention DELETE of 1 % of the charging table;
#               the same run with the tables on S3 (moto);
# 3. half rate: fleetgate at half of e2e's rate, open loop, for latency;
#               then the same with acknowledgements on receipt, to compare;
# 4. mosquitto: the same loadgen against Mosquitto (Debian package) with a plain
#               QoS 1 subscriber;
# 5. queries:   scripts/queries.sql over e2e's store, fleetgate vs DuckDB, cold and hot;
# 6. Flight SQL: the suite as 1, 8 and 32 concurrent principals over e2e's store;
#               half-rate ingest alone and beside 32 of them; a 1,000,000-row
#               answer over Flight SQL (ADBC) and over POST /sql (Arrow IPC);
# 7. live:      live followers beside half-rate ingest, the portal in a browser;
# 8. fleet:     one connection per vehicle, fleetgate and Mosquitto
#               (scripts/fleet_shape.sh: accept rate, memory per idle connection,
#               ingest with the fleet connected);
# 9. batched:   steps 1, 2 and 4 again with 10 records per publish, a tenth of
#               the publishes (scripts/batched.sh).
# Results land in $BENCH_OUT (default target/bench/<timestamp>): every loadgen
# report, /metrics scrapes, server logs, and results.md, which is also printed.
# Needs: mosquitto (apt-get install mosquitto mosquitto-clients), python3 with duckdb,
# deltalake, adbc-driver-flightsql and moto[server].
set -euo pipefail
cd "$(dirname "$0")/.."
PUBLISHES=${1:-2000000}
VEHICLES=${VEHICLES:-10000}
CONNECTIONS=${CONNECTIONS:-8}
HALF_RATE_SECS=${HALF_RATE_SECS:-30}
TARGET=${CARGO_TARGET_DIR:-target}
OUT=${BENCH_OUT:-target/bench/$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
. scripts/bench_common.sh

cargo build --release --locked -p fleetgate -p loadgen
FLEETGATE=$TARGET/release/fleetgate
LOADGEN=$TARGET/release/loadgen

echo "== 1. ceiling: embedded broker, discard sink"
start_fleetgate ceiling discard
loadgen --port "$FG_PORT" --count "$PUBLISHES" --out "$OUT/ceiling"
stop_fleetgate ceiling

echo "== 2. end to end: WAL, pseudonymised, Parquet"
start_fleetgate e2e store
STARTED=$(date +%s.%N)
loadgen --port "$FG_PORT" --count "$PUBLISHES" --out "$OUT/e2e"
wait_stored e2e "$STARTED"
stop_fleetgate e2e
"$LOADGEN" verify "$OUT/e2e/acked.json" --data-dir "$FG_DIR/data" \
  --key-file "$FG_DIR/keys/root.key" --vault-file "$FG_DIR/keys/vault.redb" > "$OUT/e2e/verify.json" \
  || echo "verification found missing or duplicated records (see $OUT/e2e/verify.json)" >&2
du -sb "$FG_DIR"/data/{rtti,diagnostics,charging,teleservice} > "$OUT/e2e.disk.txt"
# Compaction of every partition (the server compacts an hour once it is
# closed), then VACUUM of the small files by a sweep with no grace.
cat >> "$FG_DIR/fleetgate.toml" <<TOML
[access]
query_timeout_ms = 1
TOML
sed -i 's/^\[storage\]$/[storage]\nvacuum_grace_ms = 1/' "$FG_DIR/fleetgate.toml"
/usr/bin/time -f "%e s, %M KiB peak" -o "$OUT/e2e.compact.time" \
  "$FLEETGATE" admin --config "$FG_DIR/fleetgate.toml" compact --all > "$OUT/e2e.compact.txt"
# Before the sweep, whose log cleanup may remove the compaction's commits.
python3 scripts/delta_rewrites.py "$FG_DIR/data" OPTIMIZE > "$OUT/compact.rewrites.json"
"$FLEETGATE" admin --config "$FG_DIR/fleetgate.toml" retention > /dev/null
du -sb "$FG_DIR"/data/{rtti,diagnostics,charging,teleservice} > "$OUT/e2e.disk.compacted.txt"
E2E_DATA=$FG_DIR/data
# A retention DELETE of 1 % of a table, on a copy of the compacted store:
# charge history switched off for every hundredth vehicle, whose charging
# rows the next sweep deletes (a Delta DELETE, then VACUUM of what it replaced).
DEL_DIR=$WORK/delete
mkdir -p "$DEL_DIR"
cp -a "$FG_DIR/data" "$FG_DIR/keys" "$DEL_DIR/"
cat > "$DEL_DIR/fleetgate.toml" <<TOML
[storage]
data_dir = "$DEL_DIR/data"
key_file = "$DEL_DIR/keys/root.key"
vault_file = "$DEL_DIR/keys/vault.redb"
vacuum_grace_ms = 1
[retention]
audit_file = "$DEL_DIR/audit/deletions.jsonl"
requests_file = "$DEL_DIR/audit/deletion-requests.json"
holds_file = "$DEL_DIR/audit/legal-holds.json"
TOML
E2E_TAG=$(python3 -c "import json, sys; print(json.load(open(sys.argv[1]))['run_tag'])" "$OUT/e2e/report.json")
for i in $(seq 0 100 $((VEHICLES - 1))); do
  "$FLEETGATE" admin --config "$DEL_DIR/fleetgate.toml" event --event charge-history-off \
    --vin "$(printf 'WMW%s%08d' "$E2E_TAG" "$i")" > /dev/null
done
/usr/bin/time -f "%e s, %M KiB peak" -o "$OUT/delete.time" \
  "$FLEETGATE" admin --config "$DEL_DIR/fleetgate.toml" retention > "$OUT/delete.txt"
python3 scripts/delta_rewrites.py "$DEL_DIR/data" DELETE charging > "$OUT/delete.rewrites.json"
rm -rf "$DEL_DIR"

echo "== 2b. end to end with the tables on S3 (moto, a Python S3 server on the same cores)"
MOTO_PORT=$(free_port)
moto_server -H 127.0.0.1 -p "$MOTO_PORT" > "$OUT/moto.log" 2>&1 &
MOTO_PID=$!
PIDS+=("$MOTO_PID")
wait_port "$MOTO_PORT"
python3 -c "import urllib.request, sys; urllib.request.urlopen(urllib.request.Request(sys.argv[1], method='PUT'))" \
  "http://127.0.0.1:$MOTO_PORT/telemetry"
start_fleetgate e2e-s3 store "[storage.s3]
endpoint = \"http://127.0.0.1:$MOTO_PORT\"
region = \"us-east-1\"
allow_http = true
access_key_id = \"bench\"
secret_access_key = \"bench\"" 'uri = "s3://telemetry/fleetgate"'
STARTED=$(date +%s.%N)
loadgen --port "$FG_PORT" --count "$PUBLISHES" --out "$OUT/e2e-s3"
wait_stored e2e-s3 "$STARTED"
stop_fleetgate e2e-s3
kill "$MOTO_PID"

echo "== 3. half of the end-to-end (stored) rate, open loop"
HALF=$(python3 -c "import json; print(int(json.load(open('$OUT/e2e.stored.json'))['records_per_s'] / 2))")
start_fleetgate half store
STARTED=$(date +%s.%N)
loadgen --port "$FG_PORT" --rate "$HALF" --duration "$HALF_RATE_SECS" --out "$OUT/half"
wait_stored half "$STARTED"
stop_fleetgate half
# The same with rumqttd's acknowledgement on receipt: what acknowledging
# only durable records costs in latency.
start_fleetgate half-received store $'[broker]\nacknowledge = "received"'
STARTED=$(date +%s.%N)
loadgen --port "$FG_PORT" --rate "$HALF" --duration "$HALF_RATE_SECS" --out "$OUT/half-received"
wait_stored half-received "$STARTED"
stop_fleetgate half-received

echo "== 4. Mosquitto with a plain QoS 1 subscriber"
start_mosquitto mosquitto
loadgen --port "$MQ_PORT" --count "$PUBLISHES" --out "$OUT/mosquitto"
peak_rss_mib "$MQ_PID" > "$OUT/mosquitto.rss_mib"
kill "$MQ_PID"

echo "== 5. query suite: fleetgate (DataFusion) vs DuckDB"
"$LOADGEN" queries --suite scripts/queries.sql --data-dir "$E2E_DATA" > "$OUT/queries.fleetgate.json"
python3 scripts/duckdb_suite.py "$E2E_DATA" scripts/queries.sql > "$OUT/queries.duckdb.json"

echo "== 6. Flight SQL: concurrent principals, ingest beside them, a large answer"
# Each measurement that compares ingest with and without readers gets a
# server of its own over a fresh copy of the e2e store: on one server the
# later run would also meet the rows the earlier one stored (a larger log,
# more files in the open hour) and pay for them.
serve_flight() {
  FL_DIR=$WORK/$1
  rm -rf "$FL_DIR"
  cp -a "$WORK/e2e" "$FL_DIR"
  FL_PORT=$(free_port); FL_ADMIN=$(free_port); FL_FLIGHT=$(free_port)
  cat > "$FL_DIR/flight.toml" <<TOML
[storage]
data_dir = "$FL_DIR/data"
key_file = "$FL_DIR/keys/root.key"
vault_file = "$FL_DIR/keys/vault.redb"
[admin]
token_file = "$FL_DIR/keys/admin.token"
[access]
registry_file = "$FL_DIR/access/registry.json"
audit_dir = "$FL_DIR/audit/queries"
query_memory_mb = 2048
[retention]
audit_file = "$FL_DIR/audit/deletions.jsonl"
requests_file = "$FL_DIR/audit/deletion-requests.json"
holds_file = "$FL_DIR/audit/legal-holds.json"
TOML
  env -u RUST_LOG "$FLEETGATE" serve --config "$FL_DIR/flight.toml" \
    --mqtt-addr "127.0.0.1:$FL_PORT" --mqtt5-addr 127.0.0.1:0 --admin-addr "127.0.0.1:$FL_ADMIN" \
    --flight-sql-addr "127.0.0.1:$FL_FLIGHT" > "$OUT/$1.serve.log" 2>&1 &
  FL_PID=$!
  PIDS+=("$FL_PID")
  wait_port "$FL_FLIGHT"
}
stop_flight() {
  kill -TERM "$FL_PID"
  wait "$FL_PID"
  unset 'PIDS[-1]'
  rm -rf "$FL_DIR"
}
analysts() {
  "$LOADGEN" analysts --flight-addr "127.0.0.1:$FL_FLIGHT" --admin-addr "127.0.0.1:$FL_ADMIN" \
    --admin-token "$FL_DIR/keys/admin.token" "$@"
}
serve_flight flight
for clients in 1 8 32; do
  analysts --clients "$clients" --duration 30 > "$OUT/analysts.$clients.json"
done
python3 scripts/flight_vs_http.py "127.0.0.1:$FL_FLIGHT" "127.0.0.1:$FL_ADMIN" \
  "$FL_DIR/keys/admin.token" 1000000 > "$OUT/flight_vs_http.json"
stop_flight
# ingest_beside RUN SECS [LOAD_OUT LOAD...]: on a fresh server, LOAD (if
# any) in the background with its output in LOAD_OUT, then, 5 s after the
# server's start, half-rate ingest for SECS, reported in $OUT/RUN.
ingest_beside() {
  local run=$1 secs=$2 load_pid=
  serve_flight "$run"
  if [ $# -gt 2 ]; then
    local load_out=$3
    shift 3
    "$@" > "$load_out" &
    load_pid=$!
  fi
  sleep 5
  loadgen --port "$FL_PORT" --rate "$HALF" --duration "$secs" --out "$OUT/$run"
  [ -z "$load_pid" ] || wait "$load_pid"
  stop_flight
}
# Three of each, alternating: one run of each is within the machine's noise
# of the other.
for i in 1 2 3; do
  ingest_beside "flight-ingest-alone.$i" 20
  ingest_beside "flight-ingest-queried.$i" 20 "$OUT/analysts.32.ingest.$i.json" \
    analysts --clients 32 --duration 30
done

echo "== 7. live access: followers beside half-rate ingest, and the portal in a browser"
followers() {
  "$LOADGEN" followers --admin-addr "127.0.0.1:$FL_ADMIN" \
    --admin-token "$FL_DIR/keys/admin.token" --tables charging "$@"
}
for n in 1 16 64 256; do
  ingest_beside "live-ingest-$n" 30 "$OUT/followers.$n.json" followers --followers "$n" --duration 40
done
serve_flight portal
# A user holding the first vehicle of the e2e run (the store was copied from it).
ADMIN_AUTH="Authorization: Bearer $(cat "$FL_DIR/keys/admin.token")"
RUN_TAG=$(python3 -c "import json, sys; print(json.load(open(sys.argv[1]))['run_tag'])" \
  "$OUT/e2e/report.json")
USER_TOKEN=$(curl -s -X POST "http://127.0.0.1:$FL_ADMIN/admin/principals" -H "$ADMIN_AUTH" \
  -H 'Content-Type: application/json' -d '{"id":"bench-user","kind":"user"}' \
  | python3 -c "import json, sys; print(json.load(sys.stdin)['token'])")
curl -s -X POST "http://127.0.0.1:$FL_ADMIN/admin/transfers" -H "$ADMIN_AUTH" \
  -H 'Content-Type: application/json' \
  -d "{\"user\":\"bench-user\",\"vin\":\"WMW${RUN_TAG}00000000\",\"at_ms\":$(( $(date +%s) * 1000 - 86400000 ))}" > /dev/null
for i in 1 2 3 4 5; do
  python3 scripts/portal_check.py "http://127.0.0.1:$FL_ADMIN/portal#token=$USER_TOKEN" \
    | python3 -c "import json, sys; d = json.load(sys.stdin); print(json.dumps({'state': d['state'], 'ready_ms': d['ready_ms']}))" \
    > "$OUT/portal.$i.json"
done
stop_flight

echo "== 8. fleet shape: one connection per vehicle"
CARGO_TARGET_DIR=$TARGET scripts/fleet_shape.sh "$OUT"

echo "== 9. batched: 10 records per publish"
CARGO_TARGET_DIR=$TARGET VEHICLES=$VEHICLES CONNECTIONS=$CONNECTIONS \
  scripts/batched.sh "$OUT" $(( PUBLISHES / 10 )) 10

python3 scripts/bench_report.py "$OUT" "scripts/bench.sh $PUBLISHES" | tee "$OUT/results.md"
