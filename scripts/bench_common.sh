# Shared by scripts/bench.sh, scripts/fleet_shape.sh and scripts/batched.sh
# (sourced): a work directory and the processes to stop on exit, and ports.
WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_port() {
  for _ in $(seq 200); do
    python3 -c "import socket,sys; socket.create_connection(('127.0.0.1', $1), 0.2)" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "nothing listens on port $1" >&2; return 1
}

# Shared by scripts/bench.sh and scripts/batched.sh: fleetgate started and
# stopped per run, its /metrics, loadgen with the run's fleet, and the wait
# until every acknowledged record is stored. They read FLEETGATE, LOADGEN,
# OUT, VEHICLES and CONNECTIONS from the caller.
peak_rss_mib() { awk '/VmHWM/ { printf "%.0f", $2 / 1024 }' "/proc/$1/status"; }
scrape() { python3 -c "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:$1/metrics').read().decode())"; }

# start_fleetgate NAME SINK [TOML [STORAGE]]: TOML goes before the [storage]
# table, STORAGE into it; sets FG_PID, FG_PORT, FG_ADMIN, FG_DIR
start_fleetgate() {
  FG_DIR=$WORK/$1
  mkdir -p "$FG_DIR"
  FG_PORT=$(free_port)
  FG_ADMIN=$(free_port)
  cat > "$FG_DIR/fleetgate.toml" <<TOML
${3:-}
[storage]
data_dir = "$FG_DIR/data"
key_file = "$FG_DIR/keys/root.key"
vault_file = "$FG_DIR/keys/vault.redb"
${4:-}
TOML
  # Its default log filter, whatever the caller's shell exports.
  env -u RUST_LOG "$FLEETGATE" serve --config "$FG_DIR/fleetgate.toml" --sink "$2" \
    --mqtt-addr "127.0.0.1:$FG_PORT" --mqtt5-addr 127.0.0.1:0 --admin-addr "127.0.0.1:$FG_ADMIN" --flight-sql-addr 127.0.0.1:0 \
    > "$OUT/$1.serve.log" 2>&1 &
  FG_PID=$!
  PIDS+=("$FG_PID")
  wait_port "$FG_PORT"
}
stop_fleetgate() {
  scrape "$FG_ADMIN" > "$OUT/$1.metrics.txt"
  peak_rss_mib "$FG_PID" > "$OUT/$1.rss_mib"
  kill -TERM "$FG_PID"
  wait "$FG_PID"
}
loadgen() { "$LOADGEN" run --vehicles "$VEHICLES" --connections "$CONNECTIONS" --qos 1 "$@"; }
# A PUBACK means the record is in the WAL, not yet in Parquet, so the
# end-to-end rate is the rate at which rows became queryable, not the ack
# rate: wait_stored RUN STARTED_AT polls /metrics until every record fleetgate
# received is stored (or counted as dropped or rejected) and no more arrive,
# and writes RUN.stored.json, including how many acknowledged records never
# reached fleetgate (rumqttd drops the oldest unread messages once its
# in-memory log is full).
wait_stored() {
  python3 - "$OUT/$1/report.json" "$FG_ADMIN" "$2" > "$OUT/$1.stored.json" <<'PY'
import json, re, sys, time, urllib.request
report, admin, started = json.load(open(sys.argv[1])), sys.argv[2], float(sys.argv[3])
def totals():
    text = urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics").read().decode()
    total = lambda name: sum(float(v) for v in re.findall(r"^" + name + r"\{[^}]*\} (\S+)$", text, re.M))
    done = total("fleetgate_records_stored_total") + total("fleetgate_records_dropped_by_policy_total") \
        + total("fleetgate_records_rejected_total")
    return total("fleetgate_records_received_total"), done
deadline, last, quiet_since, finished = time.time() + 600, None, time.time(), None
while time.time() < deadline:
    received, done = totals()
    if done >= report["records_acked"]:
        finished = time.time()
        break
    if (received, done) != last:
        last, quiet_since = (received, done), time.time()
        if done >= received:
            finished = time.time()
    elif time.time() - quiet_since > 5:
        break
    time.sleep(0.05)
received, done = totals()
seconds = (finished or time.time()) - started
print(json.dumps({"records": report["records_acked"], "received": received, "stored": done,
                  "lost_in_broker": report["records_acked"] - received, "seconds": seconds,
                  "records_per_s": done / seconds}))
PY
}

# start_mosquitto NAME: Mosquitto 2 on a free port, logging to OUT/NAME.log,
# with a plain QoS 1 subscriber of every vehicle topic; sets MQ_PORT, MQ_PID.
start_mosquitto() {
  MQ_PORT=$(free_port)
  cat > "$WORK/mosquitto.conf" <<CONF
listener $MQ_PORT 127.0.0.1
allow_anonymous true
persistence false
max_queued_messages 100000
CONF
  mosquitto -c "$WORK/mosquitto.conf" > "$OUT/$1.log" 2>&1 &
  MQ_PID=$!
  PIDS+=("$MQ_PID")
  wait_port "$MQ_PORT"
  mosquitto_sub -p "$MQ_PORT" -q 1 -t 'vehicles/#' > /dev/null &
  PIDS+=("$!")
  sleep 0.5
}
