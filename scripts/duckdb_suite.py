#!/usr/bin/env python3
"""Times scripts/queries.sql in DuckDB over a fleetgate data directory,
the way `loadgen queries` times it in fleetgate: cold is the first run on a
new connection (views set up untimed), hot the median of the next runs.
Each table is read as its Delta table's current version: the Parquet files
its log names (`deltalake` package), never a glob, which would also read
files a deletion removed that VACUUM has not deleted yet.

usage: duckdb_suite.py DATA_DIR [SUITE] [HOT_RUNS]   (prints JSON)
"""
import json
import statistics
import sys
import time

import duckdb
from deltalake import DeltaTable

TABLES = ["rtti", "diagnostics", "charging", "teleservice"]


def parse_suite(text):
    queries, name, lines = [], None, []
    for line in text.splitlines():
        if line.strip().startswith("-- name:"):
            if name:
                queries.append((name, "\n".join(lines).strip().rstrip(";").strip()))
            name, lines = line.split(":", 1)[1].strip(), []
        elif name and not line.lstrip().startswith("--"):
            lines.append(line)
    if name:
        queries.append((name, "\n".join(lines).strip().rstrip(";").strip()))
    return [(n, q) for n, q in queries if q]


def connect(data_dir):
    con = duckdb.connect()
    for table in TABLES:
        files = DeltaTable(f"{data_dir}/{table}").file_uris()
        listed = ", ".join("'" + f.replace("'", "''") + "'" for f in files)
        con.execute(
            f"CREATE VIEW {table} AS SELECT * FROM read_parquet([{listed}], hive_partitioning = true)"
        )
    return con


def main():
    data_dir = sys.argv[1]
    suite = sys.argv[2] if len(sys.argv) > 2 else "scripts/queries.sql"
    hot_runs = int(sys.argv[3]) if len(sys.argv) > 3 else 5
    out = []
    for name, sql in parse_suite(open(suite).read()):
        con = connect(data_dir)
        start = time.perf_counter()
        rows = len(con.execute(sql).fetchall())
        cold = (time.perf_counter() - start) * 1e3
        hot = []
        for _ in range(hot_runs):
            start = time.perf_counter()
            con.execute(sql).fetchall()
            hot.append((time.perf_counter() - start) * 1e3)
        out.append({"name": name, "cold_ms": cold, "hot_ms": statistics.median(hot), "rows": rows})
        con.close()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
