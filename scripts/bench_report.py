#!/usr/bin/env python3
"""Turns the files scripts/bench.sh wrote into one Markdown results table.

usage: bench_report.py OUT_DIR COMMAND
"""
import datetime
import json
import math
import os
import platform
import re
import sys

out, command = sys.argv[1], sys.argv[2]


def load(name):
    with open(os.path.join(out, name)) as f:
        return json.load(f)


def read(name):
    with open(os.path.join(out, name)) as f:
        return f.read()


def metric(text, name, labels=""):
    m = re.search(r"^" + re.escape(name + labels) + r" (\S+)$", text, re.M)
    return float(m.group(1)) if m else float("nan")


def histogram_quantile(text, name, quant):
    """A quantile of a Prometheus histogram, interpolated within its bucket
    as PromQL's histogram_quantile does (the bounds are 25-28 % apart)."""
    buckets = sorted(
        (float(le), float(n))
        for le, n in re.findall(r"^" + re.escape(name) + r'_bucket\{le="([^"]+)"\} (\S+)$', text, re.M)
    )
    if not buckets or buckets[-1][1] == 0:
        return float("nan")
    rank = quant * buckets[-1][1]
    lower, below = 0.0, 0.0
    for bound, cumulative in buckets:
        if cumulative >= rank:
            if bound == float("inf"):
                return lower
            return lower + (bound - lower) * (rank - below) / max(cumulative - below, 1)
        lower, below = bound, cumulative
    return lower


def cpu():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def mem_gib():
    for line in open("/proc/meminfo"):
        if line.startswith("MemTotal"):
            return int(line.split()[1]) / 1024 / 1024
    return float("nan")


RUNS = ["ceiling", "e2e", "mosquitto", "half", "half-received"]
runs = {name: load(f"{name}/report.json") for name in RUNS}
rss = {name: read(f"{name}.rss_mib").strip() for name in RUNS}
e2e_metrics = read("e2e.metrics.txt")
half_metrics = read("half.metrics.txt")
verify = load("e2e/verify.json")
stored = {name: load(f"{name}.stored.json") for name in ["e2e", "half", "half-received"]}

lines = []
p = lines.append
p(f"Measured {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC with `{command}` on "
  f"{os.cpu_count()} cores ({cpu()}), {mem_gib():.0f} GiB RAM; loadgen ran on the same machine.")
e = runs["e2e"]
p(f"Load: {e['vehicles']} vehicles over {e['connections']} MQTT connections, QoS {e['qos']}, "
  f"{e['records_per_publish']} record per publish, mean payload {e['mean_payload_bytes']:.0f} bytes.")
p("")
p("| run | records/s acknowledged | records/s stored (durable, queryable) | publish→PUBACK p50 / p99 / p99.9 (ms) | peak RSS (MiB) |")
p("|---|---:|---:|---|---:|")
titles = {
    "ceiling": "fleetgate broker, discard sink (ceiling)",
    "e2e": "fleetgate end to end (WAL + pseudonymise + Parquet)",
    "mosquitto": "Mosquitto, plain QoS 1 subscriber",
    "half": "fleetgate at half the e2e rate (open loop)",
    "half-received": "the same, acknowledged on receipt (`broker.acknowledge = \"received\"`)",
}
for name in RUNS:
    r = runs[name]
    l = r["latency"]
    durable = f"{stored[name]['records_per_s']:,.0f}" if name in stored else "n/a"
    p(f"| {titles[name]} | {r['records_per_s']:,.0f} | {durable} | "
      f"{l['p50_us'] / 1e3:.2f} / {l['p99_us'] / 1e3:.2f} / {l['p999_us'] / 1e3:.2f} | {rss[name]} |")
p("")
durable = stored["e2e"]["records_per_s"]
ratio_mq = durable / runs["mosquitto"]["records_per_s"]
ratio_ceiling = durable / runs["ceiling"]["records_per_s"]
lost = stored["e2e"]["lost_in_broker"]
p(f"End to end (stored rate) vs Mosquitto's QoS 1 pass-through: **{ratio_mq:.2f}×**; vs fleetgate's own "
  f"discard-sink ceiling: **{ratio_ceiling:.0%}**. The e2e run's acknowledgements outran storage: "
  f"{e['records_acked']:,} records acked in {e['elapsed_s']:.1f} s, {stored['e2e']['stored']:,.0f} stored after "
  f"{stored['e2e']['seconds']:.1f} s"
  + (f"; **{lost:,.0f} acknowledged records never reached fleetgate**: rumqttd dropped the oldest unread "
     f"messages when its in-memory log (broker.segment_bytes × segment_count) overflowed." if lost > 0 else "."))
q = lambda text, name, quant: histogram_quantile(text, name, float(quant)) * 1e3
s3 = load("e2e-s3.stored.json")
p(f"With the tables on S3 (moto, a Python S3 server on the same two cores; WAL, keys and registry local): "
  f"{s3['records_per_s']:,.0f} records/s stored end to end, {s3['records_per_s'] / durable:.0%} of the local run's.")
p(f"At half rate ({runs['half']['records_per_s']:,.0f} records/s offered): receipt→durable (WAL fsync) "
  f"p50 {q(half_metrics, 'fleetgate_receipt_to_durable_seconds', '0.5'):.0f} ms, "
  f"p99 {q(half_metrics, 'fleetgate_receipt_to_durable_seconds', '0.99'):.0f} ms; receipt→queryable "
  f"p50 {q(half_metrics, 'fleetgate_receipt_to_queryable_seconds', '0.5'):.0f} ms, "
  f"p99 {q(half_metrics, 'fleetgate_receipt_to_queryable_seconds', '0.99'):.0f} ms "
  f"(from /metrics' histogram buckets, interpolated: within 28 %).")
syncs = metric(e2e_metrics, "fleetgate_wal_syncs_total")
synced = metric(e2e_metrics, "fleetgate_wal_bytes_total")
fsync_p50 = q(e2e_metrics, "fleetgate_wal_fsync_seconds", "0.5")
fsync_p99 = q(e2e_metrics, "fleetgate_wal_fsync_seconds", "0.99")
p(f"WAL in the e2e run: {syncs:,.0f} fsyncs, {synced / max(syncs, 1) / 1024:.0f} KiB per group commit, "
  f"fsync p50 {fsync_p50:.2f} ms, p99 {fsync_p99:.2f} ms.")
bad = [s for s in verify["streams"] if not s["ok"]]
p(f"Verification of the e2e run after a clean stop: **{'OK' if verify['ok'] else 'FAILED'}** — "
  + ", ".join(f"{s['stream']} {s['acked']:,} acked / {s['stored']:,} stored ({s['method']})" for s in verify["streams"])
  + ("" if not bad else f"; failures: {bad}") + ".")
p("")
p("| stream | JSON bytes received | Delta table bytes as written | after compaction + VACUUM | compacted / JSON |")
p("|---|---:|---:|---:|---:|")


def sizes(name):
    disk = {}
    for line in read(name).splitlines():
        size, path = line.split()
        disk[os.path.basename(path)] = int(size)
    return disk


disk, compacted = sizes("e2e.disk.txt"), sizes("e2e.disk.compacted.txt")
for s in ["rtti", "diagnostics", "charging", "teleservice"]:
    received = metric(e2e_metrics, "fleetgate_payload_bytes_received_total", f'{{stream="{s}"}}')
    p(f"| {s} | {received:,.0f} | {disk.get(s, 0):,} | {compacted.get(s, 0):,} | "
      f"{compacted.get(s, 0) / max(received, 1):.1%} |")
p(f"Compaction of every partition (`fleetgate admin compact --all`): {read('e2e.compact.time').strip()}; "
  "rewritten (files and bytes read → written, from the OPTIMIZE commits): "
  + "; ".join(f"{t} {r['files_removed']} → {r['files_added']} files, {r['bytes_removed']:,} → {r['bytes_added']:,} bytes"
              for t, r in load("compact.rewrites.json").items()) + ".")
rewrites = load("delete.rewrites.json")["charging"]
deleted = sum(int(n) for n in re.findall(r"^deleted charging/\S+ \(\w+\): (\d+) rows", read("delete.txt"), re.M))
charging_rows = next(s["stored"] for s in verify["streams"] if s["stream"] == "charging")
p(f"A retention DELETE of about 1 % of a table, on a copy of that compacted store (charge history switched off "
  f"for every hundredth vehicle): {deleted:,} of the {charging_rows:,} charging rows stored; "
  f"`fleetgate admin retention` (the DELETE, then VACUUM and log cleanup of all four tables) took "
  f"{read('delete.time').strip()}; "
  f"it rewrote {rewrites['files_removed']} file(s), {rewrites['bytes_removed']:,} bytes read → "
  f"{rewrites['bytes_added']:,} written, of a table of {rewrites['table_bytes']:,} bytes in {rewrites['table_files']} file(s).")
p("")
fg = {r["name"]: r for r in load("queries.fleetgate.json")}
dd = {r["name"]: r for r in load("queries.duckdb.json")}
p("| query | rows | fleetgate cold / hot (ms) | DuckDB cold / hot (ms) | ratio cold | ratio hot |")
p("|---|---:|---|---|---:|---:|")
cold, hot = [], []
for name, f in fg.items():
    d = dd[name]
    rc, rh = f["cold_ms"] / d["cold_ms"], f["hot_ms"] / d["hot_ms"]
    cold.append(rc)
    hot.append(rh)
    rows = f["rows"] if f["rows"] == d["rows"] else f"{f['rows']} (DuckDB {d['rows']})"
    p(f"| {name} | {rows} | {f['cold_ms']:.1f} / {f['hot_ms']:.1f} | {d['cold_ms']:.1f} / {d['hot_ms']:.1f} | "
      f"{rc:.2f}× | {rh:.2f}× |")
geo = lambda xs: math.exp(sum(map(math.log, xs)) / len(xs))
p(f"| **geomean** | | | | **{geo(cold):.2f}×** | **{geo(hot):.2f}×** |")
p("")
p("Ratios are fleetgate's time over DuckDB's: below 1 means fleetgate is faster.")
p("")
p("Flight SQL over the e2e store (after compaction), the suite as concurrent operator principals "
  "(`loadgen analysts`; the server runs at most `access.max_concurrent_queries` at once):")
p("")
p("| clients | queries | queries/s | p50 (ms) | p90 (ms) | p99 (ms) | errors |")
p("|---:|---:|---:|---:|---:|---:|---:|")
for name in ["analysts.1.json", "analysts.8.json", "analysts.32.json"]:
    a = load(name)
    p(f"| {a['clients']} | {a['queries']:,} | {a['queries_per_second']:.1f} | {a['p50_ms']:.1f} | "
      f"{a['p90_ms']:.1f} | {a['p99_ms']:.1f} | {a['errors']} |")
beside = [load(f"analysts.32.ingest.{i}.json") for i in (1, 2, 3)]
mid = lambda values: sorted(values)[len(values) // 2]
p(f"| 32 (with ingest; median of 3) | {mid([a['queries'] for a in beside]):,} | "
  f"{mid([a['queries_per_second'] for a in beside]):.1f} | {mid([a['p50_ms'] for a in beside]):.1f} | "
  f"{mid([a['p90_ms'] for a in beside]):.1f} | {mid([a['p99_ms'] for a in beside]):.1f} | "
  f"{sum(a['errors'] for a in beside)} |")
alone = [load(f"flight-ingest-alone.{i}/report.json") for i in (1, 2, 3)]
queried = [load(f"flight-ingest-queried.{i}/report.json") for i in (1, 2, 3)]
p99s = lambda runs: [r["latency"]["p99_us"] / 1e3 for r in runs]
pa, pq = mid(p99s(alone)), mid(p99s(queried))
runs = lambda runs: ", ".join(f"{v:.1f}" for v in p99s(runs))
p("")
p(f"Half-rate ingest ({mid([r['records_per_s'] for r in alone]):,.0f} records/s), alone and beside "
  f"32 query clients, three 20 s runs of each, alternating, each on a server of its own over a "
  f"fresh copy of the e2e store: publish→PUBACK p99 {pa:.2f} ms alone ({runs(alone)}), "
  f"{pq:.2f} ms beside them ({runs(queried)}): {pq / pa - 1:+.0%} (medians).")
fh = load("flight_vs_http.json")
p(f"`{fh['sql']}`: Flight SQL (ADBC) {fh['flight_sql']['median_s']:.2f} s, "
  f"POST /sql as Arrow IPC {fh['http_arrow']['median_s']:.2f} s (median of 3; "
  f"{fh['flight_sql']['rows']:,} rows).")
p("")
p("Live access (`loadgen followers`: N operator principals each following `charging` over "
  "`GET /live`, beside half-rate ingest; each N on a server of its own over a fresh copy of the "
  "e2e store, compared with the median ingest alone above):")
p("")
p("| followers | rows delivered | receipt→delivered p50 (ms) | p99 (ms) | max (ms) | errors "
  "| ingest PUBACK p99 (ms) | vs. no follower |")
p("|---:|---:|---:|---:|---:|---:|---:|---:|")
for n in [1, 16, 64, 256]:
    f = load(f"followers.{n}.json")
    ingest = load(f"live-ingest-{n}/report.json")["latency"]["p99_us"] / 1e3
    p(f"| {n} | {f['rows']:,} | {f['p50_ms']:.0f} | {f['p99_ms']:.0f} | {f['max_ms']:.0f} | "
      f"{f['errors']} | {ingest:.2f} | {ingest / pa - 1:+.0%} |")
ready = sorted(load(f"portal.{i}.json")["ready_ms"] for i in range(1, 6))
p("")
p(f"The portal in headless Chromium (`scripts/portal_check.py`, a user holding one vehicle of "
  f"the run): ready (signed in, history charted, live stream connected) {ready[2]:.0f} ms after "
  f"navigation (median of 5; {ready[0]:.0f}–{ready[-1]:.0f} ms).")
for part in ("fleet.md", "batched.md"):
    if os.path.exists(os.path.join(out, part)):
        p("")
        p(read(part).rstrip())
print("\n".join(lines))
