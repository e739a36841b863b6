#!/usr/bin/env python3
"""One large answer two ways: Flight SQL (ADBC driver) and POST /sql as an
Arrow IPC stream, as the operator, three runs each; times as JSON.

usage: flight_vs_http.py FLIGHT_ADDR HTTP_ADDR ADMIN_TOKEN_FILE ROWS
"""
import json
import statistics
import sys
import time
import urllib.request

import adbc_driver_flightsql.dbapi as flight_sql
import pyarrow.ipc

flight_addr, http_addr, token_file, rows = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
admin_token = open(token_file).read().strip()
SQL = f"SELECT * FROM rtti LIMIT {rows}"
PURPOSE = "operations"


def post(path, body, token):
    request = urllib.request.Request(
        f"http://{http_addr}{path}", data=json.dumps(body).encode(), method="POST",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request) as answer:
        return answer.read()


token = json.loads(post("/admin/principals", {"id": f"bench-{time.time_ns()}", "kind": "operator"},
                        admin_token))["token"]


def over_flight():
    started = time.perf_counter()
    with flight_sql.connect(f"grpc://{flight_addr}", db_kwargs={
            "adbc.flight.sql.authorization_header": f"Bearer {token}",
            "adbc.flight.sql.rpc.call_header.x-fleetgate-purpose": PURPOSE,
            "adbc.flight.sql.client_option.with_max_msg_size": str(256 << 20)}) as conn:
        with conn.cursor() as cur:
            cur.execute(SQL)
            table = cur.fetch_arrow_table()
    return time.perf_counter() - started, table.num_rows


def over_http():
    started = time.perf_counter()
    body = post("/sql", {"sql": SQL, "purpose": PURPOSE, "format": "arrow"}, token)
    table = pyarrow.ipc.open_stream(body).read_all()
    return time.perf_counter() - started, table.num_rows


result = {"sql": SQL}
for name, run in [("flight_sql", over_flight), ("http_arrow", over_http)]:
    times, answered = [], None
    for _ in range(3):
        seconds, answered = run()
        times.append(seconds)
    result[name] = {"rows": answered, "seconds": times, "median_s": statistics.median(times)}
print(json.dumps(result))
