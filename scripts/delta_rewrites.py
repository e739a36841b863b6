#!/usr/bin/env python3
"""What the commits of one kind rewrote in the Delta tables of a data directory.

usage: delta_rewrites.py DATA_DIR OPERATION [TABLE...]

Reads each table's `_delta_log/*.json` and, for the commits whose
`commitInfo.operation` is OPERATION (e.g. OPTIMIZE for compaction, DELETE for
a retention or erasure sweep), sums the files and bytes they removed from the
table and added to it. Prints one JSON object per table, with its whole size
(the files its newest version names, read with the `deltalake` package)
beside it.
"""
import glob
import json
import os
import sys

import deltalake

data_dir, operation = sys.argv[1], sys.argv[2]
tables = sys.argv[3:] or ["rtti", "diagnostics", "charging", "teleservice"]

report = {}
for table in tables:
    commits = sorted(glob.glob(os.path.join(data_dir, table, "_delta_log", "*.json")))
    out = {"commits": 0, "files_removed": 0, "bytes_removed": 0, "files_added": 0, "bytes_added": 0}
    for path in commits:
        actions = [json.loads(line) for line in open(path) if line.strip()]
        info = next((a["commitInfo"] for a in actions if "commitInfo" in a), {})
        mine = info.get("operation") == operation
        out["commits"] += mine
        for action in actions:
            if mine and "add" in action:
                out["files_added"] += 1
                out["bytes_added"] += action["add"]["size"]
            elif mine and "remove" in action:
                out["files_removed"] += 1
                out["bytes_removed"] += action["remove"].get("size") or 0
    files = deltalake.DeltaTable(os.path.join(data_dir, table)).get_add_actions(flatten=True)
    out["table_files"] = files.num_rows
    out["table_bytes"] = sum(files.column("size_bytes").to_pylist())
    report[table] = out
print(json.dumps(report, indent=1))
