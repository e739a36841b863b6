//! Inputs shared by the benches: realistic payloads, a privacy stage with a
//! throwaway key ring and vault, and decoded records ready for batching.
// Each bench uses its own part of this module.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use fleetgate::pipeline::decode::{self, Limits, Record};
use fleetgate::privacy::pseudo::{KeyRing, Secret};
use fleetgate::privacy::stage::{Privacy, PrivacySettings, PrivacyShared};
use fleetgate::privacy::vault::Vault;
use fleetgate::schema::{Registry, Stream};

/// 2026-11-25T08:00:00Z, so that every generated record lies in one day.
pub(crate) const T0_MS: i64 = 1_796_112_000_000;

/// A repeatable pseudo-random number in [0, 1) for (vehicle, seq), so that
/// positions and speeds vary the way real probes do instead of repeating
/// (which would flatter compression).
fn jitter(vehicle: u32, seq: u64) -> f64 {
    let mut x = (u64::from(vehicle) << 32 ^ seq).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^= x >> 29;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^= x >> 32;
    (x >> 11) as f64 / (1u64 << 53) as f64
}

/// An RTTI probe as a vehicle sends it (about 200 bytes).
pub(crate) fn rtti_record(vehicle: u32, seq: u64) -> String {
    let ts = T0_MS + seq as i64 * 5_000;
    let j = jitter(vehicle, seq);
    format!(
        r#"{{"vin":"WMWBENCH{vehicle:09}","ts":{ts},"seq":{seq},"ignition_cycle":{},"latitude":{:.5},"longitude":{:.5},"speed_kmh":{:.1},"heading_deg":{:.1},"lane":{},"indicator":"off"{}}}"#,
        100 + seq / 240,
        59.30 + f64::from(vehicle % 100) * 0.001 + (seq % 240) as f64 * 0.0001 + j * 0.0005,
        18.00 + f64::from(vehicle / 100 % 100) * 0.001 + j * 0.0007,
        30.0 + j * 60.0,
        (f64::from(vehicle * 90) + j * 20.0) % 360.0,
        1 + seq % 3,
        if seq.is_multiple_of(97) {
            r#","hazard":"queue_end""#
        } else {
            ""
        },
    )
}

/// A diagnostics record (about 200 bytes).
pub(crate) fn diagnostics_record(vehicle: u32, seq: u64) -> String {
    let ts = T0_MS + seq as i64 * 60_000;
    const ECUS: [&str; 4] = ["DME", "BMS", "EGS", "DSC"];
    const CODES: [&str; 4] = ["P0420", "P0A7F", "P0730", "U0100"];
    format!(
        r#"{{"vin":"WMWBENCH{vehicle:09}","ts":{ts},"seq":{seq},"ecu":"{}","severity":"{}","fault_codes":["{}"],"odometer_km":{},"operating_hours":{:.2},"battery_voltage_v":12.6}}"#,
        ECUS[seq as usize % 4],
        if seq.is_multiple_of(5) {
            "warning"
        } else {
            "info"
        },
        CODES[(seq as usize + vehicle as usize) % 4],
        20_000 + seq * 3 + u64::from(vehicle) * 17,
        500.0 + seq as f64 / 60.0 + jitter(vehicle, seq),
    )
}

/// A charge-session record with a contract number (encrypted when stored).
pub(crate) fn charging_record(vehicle: u32, seq: u64) -> String {
    let ts = T0_MS + seq as i64 * 600_000;
    format!(
        r#"{{"vin":"WMWBENCH{vehicle:09}","ts":{ts},"seq":{seq},"session_id":"CS-{vehicle}-{}","event":"progress","started_at":{T0_MS},"energy_kwh":{:.2},"soc_start_pct":20.0,"soc_pct":{:.1},"max_power_kw":11.0,"charging_mode":"ac","contract_number":"SE-CHG-{vehicle:08}"}}"#,
        seq / 8,
        seq as f64 * 0.8,
        (20 + seq % 80) as f64,
    )
}

/// `records` records of one vehicle and stream as one JSON array payload.
pub(crate) fn payload(stream: Stream, vehicle: u32, first_seq: u64, records: usize) -> Vec<u8> {
    let record = match stream {
        Stream::Rtti => rtti_record,
        Stream::Diagnostics => diagnostics_record,
        Stream::Charging => charging_record,
        Stream::Teleservice => teleservice_record,
    };
    let body: Vec<String> = (0..records as u64)
        .map(|i| record(vehicle, first_seq + i))
        .collect();
    if records == 1 {
        body.concat().into_bytes()
    } else {
        format!("[{}]", body.join(",")).into_bytes()
    }
}

/// A monthly teleservice call.
pub(crate) fn teleservice_record(vehicle: u32, seq: u64) -> String {
    let ts = T0_MS + seq as i64 * 3_600_000;
    format!(
        r#"{{"vin":"WMWBENCH{vehicle:09}","ts":{ts},"seq":{seq},"trigger":"monthly","mileage_km":{},"service_needs":["engine_oil","vehicle_check"],"check_control_messages":[],"fault_codes":[]}}"#,
        20_000 + seq * 40,
    )
}

pub(crate) fn vin(vehicle: u32) -> String {
    format!("WMWBENCH{vehicle:09}")
}

/// The limits fleetgate runs with by default.
pub(crate) fn limits() -> Limits {
    let pipeline = fleetgate::config::PipelineConfig::default();
    Limits {
        max_payload_bytes: pipeline.max_payload_bytes,
        max_records_per_publish: pipeline.max_records_per_publish,
        // Generated timestamps are fixed; never reject them as future ones.
        max_clock_skew_ms: i64::MAX / 4,
    }
}

/// A worker's privacy stage over a throwaway key ring and vault.
pub(crate) struct PrivacyFixture {
    pub(crate) privacy: Privacy,
    pub(crate) shared: Arc<PrivacyShared>,
    _dir: tempfile::TempDir,
}

pub(crate) fn privacy() -> PrivacyFixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let keys = KeyRing::from_root(Secret::random().expect("random key"));
    let vault = Vault::open(&dir.path().join("vault.redb"), &keys).expect("vault");
    let shared: Arc<PrivacyShared> = PrivacyShared::new(
        keys,
        vault,
        PrivacySettings {
            key_epoch_days: 30,
            max_trip: Duration::from_secs(1800),
        },
    );
    PrivacyFixture {
        privacy: Privacy::new(shared.clone()),
        shared,
        _dir: dir,
    }
}

/// Decoded valid records of `vehicles` vehicles, `per_vehicle` each, with their VINs.
pub(crate) fn decoded(stream: Stream, vehicles: u32, per_vehicle: usize) -> Vec<(String, Record)> {
    let registry = Registry::load().expect("schemas");
    let limits = limits();
    let mut out = Vec::with_capacity(vehicles as usize * per_vehicle);
    let mut decoded = decode::Decoded::default();
    for v in 0..vehicles {
        let vin = vin(v);
        decoded.clear();
        let payload = payload(stream, v, 0, per_vehicle);
        decode::decode(
            registry.get(stream),
            &limits,
            &vin,
            &payload,
            T0_MS,
            &mut decoded,
        );
        assert!(decoded.rejected.is_empty(), "bench input is valid");
        out.extend(decoded.valid.drain(..).map(|r| (vin.clone(), r)));
    }
    out
}

/// A data directory as the pipeline writes it: 200,000 RTTI rows (1,000
/// vehicles, 200 probes each) and 50,000 diagnostics rows, in hour
/// partitions, pseudonymised under `fixture`.
pub(crate) fn write_store(data_dir: &std::path::Path, fixture: &mut PrivacyFixture) {
    use fleetgate::pipeline::batch::StreamBatcher;
    let registry = Registry::load().expect("schemas");
    let root = fleetgate::store::StoreRoot::local(data_dir).expect("store root");
    for (stream, per_vehicle) in [(Stream::Rtti, 200), (Stream::Diagnostics, 50)] {
        let mut batcher = StreamBatcher::new(registry.get(stream));
        for (vin, record) in decoded(stream, 1_000, per_vehicle) {
            batcher.push(&record, &vin, T0_MS, &mut fixture.privacy);
        }
        let parts = batcher.drain().expect("drain");
        let schema = registry.get(stream).arrow.clone();
        fleetgate::store::append(&root, stream.name(), &schema, &parts, 3).expect("commit");
    }
}
