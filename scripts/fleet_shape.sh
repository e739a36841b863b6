#!/usr/bin/env bash
# Fleet shape: one MQTT connection per vehicle, as a fleet connects.
#
#   scripts/fleet_shape.sh OUT_DIR [VEHICLES]
#
# VEHICLES defaults to the open-file limit less 1,000 (each side of a
# connection is a descriptor; loadgen and the broker both need some for
# themselves). The soft limit is raised to the hard one first, for Mosquitto
# too, which inherits it; an unlimited hard limit counts as 65,536. Uses the release build in ${CARGO_TARGET_DIR:-target}
# (scripts/bench.sh builds it and runs this as its last step).
# 1. fleetgate: VEHICLES vehicles connect, each from its own 127.x.y.z
#    address (`loadgen connections`): accept rate and resident set per idle
#    connection; while they stay connected, `loadgen run` flat out for
#    RUN_SECS over 8 connections; then the same once they are gone.
# 2. Mosquitto: the same VEHICLES connections, accept rate and memory.
# Writes fleet.*.json, the two runs' reports and fleet.md into OUT_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=$1
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
LIMIT=$(ulimit -n)
[ "$LIMIT" = unlimited ] && LIMIT=65536
VEHICLES=${2:-$(( LIMIT - 1000 ))}
if [ "$VEHICLES" -lt 1 ]; then
  echo "the open-file limit ($LIMIT) leaves no room for vehicles: raise it (ulimit -Hn)" >&2
  exit 1
fi
RUN_SECS=${RUN_SECS:-20}
TARGET=${CARGO_TARGET_DIR:-target}
FLEETGATE=$TARGET/release/fleetgate
LOADGEN=$TARGET/release/loadgen
. scripts/bench_common.sh
wait_file() {
  while [ ! -s "$1" ]; do
    kill -0 "$2" 2>/dev/null || { echo "loadgen connections stopped early" >&2; return 1; }
    sleep 0.5
  done
}

echo "== fleet shape: $VEHICLES vehicles, one connection each, against fleetgate"
PORT=$(free_port)
cat > "$WORK/fleetgate.toml" <<TOML
[broker]
max_connections = $(( VEHICLES + 100 ))
[storage]
data_dir = "$WORK/data"
key_file = "$WORK/keys/root.key"
vault_file = "$WORK/keys/vault.redb"
TOML
env -u RUST_LOG "$FLEETGATE" serve --config "$WORK/fleetgate.toml" --mqtt-addr "127.0.0.1:$PORT" \
  --mqtt5-addr 127.0.0.1:0 --admin-addr 127.0.0.1:0 --flight-sql-addr 127.0.0.1:0 \
  > "$OUT/fleet.serve.log" 2>&1 &
FG_PID=$!
PIDS+=("$FG_PID")
wait_port "$PORT"
sleep 2
# Held long enough to cover the connected run that follows.
"$LOADGEN" connections --server "127.0.0.1:$PORT" --vehicles "$VEHICLES" --server-pid "$FG_PID" \
  --hold $(( RUN_SECS + 15 )) --ready-file "$WORK/connected.json" > "$OUT/fleet.fleetgate.json" &
CONN_PID=$!
wait_file "$WORK/connected.json" "$CONN_PID"
"$LOADGEN" run --port "$PORT" --vehicles 10000 --connections 8 --qos 1 --duration "$RUN_SECS" \
  --out "$OUT/fleet.run-connected"
wait "$CONN_PID"
sleep 2
"$LOADGEN" run --port "$PORT" --vehicles 10000 --connections 8 --qos 1 --duration "$RUN_SECS" \
  --out "$OUT/fleet.run-alone"
kill -TERM "$FG_PID"
wait "$FG_PID"

echo "== fleet shape: the same connections against Mosquitto"
MQ_PORT=$(free_port)
cat > "$WORK/mosquitto.conf" <<CONF
listener $MQ_PORT 127.0.0.1
allow_anonymous true
persistence false
CONF
mosquitto -c "$WORK/mosquitto.conf" > "$OUT/fleet.mosquitto.log" 2>&1 &
MQ_PID=$!
PIDS+=("$MQ_PID")
wait_port "$MQ_PORT"
sleep 1
"$LOADGEN" connections --server "127.0.0.1:$MQ_PORT" --vehicles "$VEHICLES" --server-pid "$MQ_PID" \
  --hold 2 > "$OUT/fleet.mosquitto.json"
kill "$MQ_PID"

python3 - "$OUT" > "$OUT/fleet.md" <<'PYEOF'
import json, os, sys
out = sys.argv[1]
load = lambda name: json.load(open(os.path.join(out, name)))
fg, mq = load("fleet.fleetgate.json"), load("fleet.mosquitto.json")
connected, alone = load("fleet.run-connected/report.json"), load("fleet.run-alone/report.json")
print(f"Fleet shape (`scripts/fleet_shape.sh`): {fg['vehicles']:,} vehicles, one MQTT 3.1.1 "
      f"connection each from its own 127.x.y.z address (`loadgen connections`, "
      f"{fg['vehicles']:,} CONNECTs, 256 at a time), held idle with keep-alive pings:")
print()
print("| broker | connected | accepted in (s) | accepted/s | resident set before → after (MiB) | KiB per idle connection |")
print("|---|---:|---:|---:|---|---:|")
for name, r in [("fleetgate", fg), ("Mosquitto 2", mq)]:
    before, after = r["server_rss_before_kib"] / 1024, r["server_rss_connected_kib"] / 1024
    print(f"| {name} | {r['connected']:,} | {r['seconds']:.1f} | {r['accepted_per_second']:,.0f} | "
          f"{before:.0f} → {after:.0f} | {r['server_kib_per_connection']:.1f} |")
print()
c, a = connected["records_per_s"], alone["records_per_s"]
print(f"fleetgate ingest (`loadgen run`, 8 connections flat out, {connected['elapsed_s']:.0f} s) "
      f"with the {fg['connected']:,} vehicles connected: {c:,.0f} records/s acknowledged, PUBACK p99 "
      f"{connected['latency']['p99_us'] / 1e3:.1f} ms; after they left: {a:,.0f} records/s, p99 "
      f"{alone['latency']['p99_us'] / 1e3:.1f} ms ({c / a - 1:+.0%} with the fleet connected). "
      f"Connections fleetgate closed while held: {fg['dropped']}.")
PYEOF
cat "$OUT/fleet.md"
