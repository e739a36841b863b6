-- The analytics query suite of scripts/bench.sh, run as written by
-- fleetgate (DataFusion, `loadgen queries`) and by DuckDB
-- (scripts/duckdb_suite.py) over the same Parquet files. Every statement
-- is plain SQL both engines accept; each starts after a `-- name:` line.

-- name: rows_per_stream_hour
SELECT 'rtti' AS stream, date, hour, count(*) AS n FROM rtti GROUP BY date, hour
UNION ALL SELECT 'diagnostics', date, hour, count(*) FROM diagnostics GROUP BY date, hour
UNION ALL SELECT 'charging', date, hour, count(*) FROM charging GROUP BY date, hour
UNION ALL SELECT 'teleservice', date, hour, count(*) FROM teleservice GROUP BY date, hour
ORDER BY stream, date, hour;

-- name: charge_energy_per_day
SELECT date, charging_mode, sum(energy_kwh) AS kwh, count(*) AS sessions
FROM charging WHERE event = 'end'
GROUP BY date, charging_mode ORDER BY date, charging_mode;

-- name: hazards_per_road_cell
SELECT round(latitude, 2) AS lat_cell, round(longitude, 2) AS lon_cell, hazard, count(*) AS n
FROM rtti WHERE hazard IS NOT NULL
GROUP BY 1, 2, 3 ORDER BY n DESC, lat_cell, lon_cell, hazard LIMIT 20;

-- name: fault_code_top10
SELECT code, count(*) AS n
FROM (SELECT unnest(fault_codes) AS code FROM diagnostics) AS codes
GROUP BY code ORDER BY n DESC, code LIMIT 10;

-- name: critical_diagnostics_with_teleservice
SELECT d.ecu, count(DISTINCT d.vehicle_id) AS vehicles, count(*) AS pairs
FROM diagnostics AS d
JOIN teleservice AS t ON d.vehicle_id = t.vehicle_id AND d.key_epoch = t.key_epoch
WHERE d.severity = 'critical'
GROUP BY d.ecu ORDER BY vehicles DESC, d.ecu;

-- name: speed_profile_by_hour
SELECT date, hour, avg(speed_kmh) AS mean_kmh, max(speed_kmh) AS max_kmh, count(*) AS probes
FROM rtti GROUP BY date, hour ORDER BY date, hour;

-- name: probes_per_trip
SELECT count(DISTINCT trip_id) AS trips, count(*) * 1.0 / count(DISTINCT trip_id) AS probes_per_trip
FROM rtti;

-- name: soc_gain_by_mode
SELECT charging_mode, avg(soc_pct - soc_start_pct) AS mean_gain_pct, max(max_power_kw) AS max_kw
FROM charging GROUP BY charging_mode ORDER BY charging_mode;

-- name: teleservice_triggers
SELECT "trigger", count(*) AS calls, count(DISTINCT vehicle_id) AS vehicles
FROM teleservice GROUP BY "trigger" ORDER BY calls DESC, "trigger";

-- name: highest_odometer_top10
SELECT vehicle_id, max(odometer_km) AS km
FROM diagnostics GROUP BY vehicle_id ORDER BY km DESC, vehicle_id LIMIT 10;

-- name: busiest_cells_latest_day
SELECT round(latitude, 2) AS lat_cell, round(longitude, 2) AS lon_cell, count(*) AS n
FROM rtti WHERE date = (SELECT max(date) FROM rtti)
GROUP BY 1, 2 ORDER BY n DESC, lat_cell, lon_cell LIMIT 10;

-- name: lane_and_indicator_mix
SELECT lane, indicator, count(*) AS n
FROM rtti GROUP BY lane, indicator ORDER BY lane, indicator;
