#!/usr/bin/env bash
# Batched publishes: RECORDS records per publish (a JSON array), the runs of
# scripts/bench.sh steps 1, 2 and 4 again, so that the ratios at one record
# per publish can be read beside the same ratios with batches.
#
#   scripts/batched.sh OUT_DIR [PUBLISHES] [RECORDS]   (defaults: 200000, 10)
#
# 1. ceiling: fleetgate's embedded broker with the discard sink;
# 2. e2e:     fleetgate end to end; its rate is the acknowledged records over
#             the time until all are stored;
# 3. Mosquitto 2 with a plain QoS 1 subscriber.
# Uses the release build in ${CARGO_TARGET_DIR:-target} (scripts/bench.sh builds
# it and runs this as a step). Writes the runs' reports and batched.md to OUT_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=$1
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PUBLISHES=${2:-200000}
RECORDS=${3:-10}
VEHICLES=${VEHICLES:-10000}
CONNECTIONS=${CONNECTIONS:-8}
TARGET=${CARGO_TARGET_DIR:-target}
FLEETGATE=$TARGET/release/fleetgate
LOADGEN=$TARGET/release/loadgen
. scripts/bench_common.sh

echo "== batched: $RECORDS records per publish, fleetgate's broker with the discard sink"
start_fleetgate batched-ceiling discard
loadgen --port "$FG_PORT" --count "$PUBLISHES" --records-per-publish "$RECORDS" \
  --out "$OUT/batched-ceiling"
stop_fleetgate batched-ceiling

echo "== batched: fleetgate end to end"
start_fleetgate batched-e2e store
STARTED=$(date +%s.%N)
loadgen --port "$FG_PORT" --count "$PUBLISHES" --records-per-publish "$RECORDS" \
  --out "$OUT/batched-e2e"
wait_stored batched-e2e "$STARTED"
stop_fleetgate batched-e2e

echo "== batched: Mosquitto with a plain QoS 1 subscriber"
start_mosquitto batched-mosquitto
loadgen --port "$MQ_PORT" --count "$PUBLISHES" --records-per-publish "$RECORDS" \
  --out "$OUT/batched-mosquitto"
kill "$MQ_PID"

python3 - "$OUT" "$RECORDS" > "$OUT/batched.md" <<'PYEOF'
import json, os, sys
out, records = sys.argv[1], int(sys.argv[2])
load = lambda name: json.load(open(os.path.join(out, name)))
ceiling, e2e, mq = (load(f"batched-{run}/report.json") for run in ("ceiling", "e2e", "mosquitto"))
stored = load("batched-e2e.stored.json")
print(f"Batched publishes (`scripts/batched.sh`): {records} records per publish (a JSON array), "
      f"{ceiling['publishes_sent']:,} publishes per run, {ceiling['vehicles']:,} vehicles over "
      f"{ceiling['connections']} connections, QoS 1:")
print()
print("| run | records/s acknowledged | records/s stored | publish→PUBACK p50 / p99 (ms) |")
print("|---|---:|---:|---|")
ms = lambda r, q: r["latency"][q] / 1e3
for name, r, s in [("fleetgate broker, discard sink (ceiling)", ceiling, None),
                   ("fleetgate end to end", e2e, stored),
                   ("Mosquitto, plain QoS 1 subscriber", mq, None)]:
    s = f"{s['records_per_s']:,.0f}" if s else "n/a"
    print(f"| {name} | {r['records_per_s']:,.0f} | {s} | {ms(r, 'p50_us'):.1f} / {ms(r, 'p99_us'):.1f} |")
print()
lost = stored["lost_in_broker"]
print(f"Stored end to end: {stored['records_per_s'] / mq['records_per_s']:.2f}× Mosquitto's "
      f"pass-through, {stored['records_per_s'] / ceiling['records_per_s']:.0%} of the ceiling; "
      f"acknowledged but not received: {lost:,.0f}.")
PYEOF
cat "$OUT/batched.md"
