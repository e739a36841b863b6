//! The simulated fleet: vehicles that drive on a street grid around a city,
//! charge, call teleservice and report diagnostics, each publishing JSON
//! records that match fleetgate's `schemas/`.
//!
//! The mix per publish follows what a connected car sends: RTTI probes
//! every few seconds while driving dominate; charge-session events,
//! diagnostics and teleservice calls (monthly, event-driven, roadside,
//! high-voltage warn) are rarer. Every vehicle keeps one monotonic sequence
//! number per stream, which is what `verify` checks stored rows against.
//! Teleservice calls that need Smart Maintenance consent are never sent:
//! fleetgate would drop them by policy, and a verified run must account for
//! every acknowledged record.

use std::fmt::Write;

use fleetgate::schema::Stream;

/// Centre of the simulated city (Stockholm), in degrees.
const CITY: (f64, f64) = (59.3326, 18.0649);
/// Vehicles turn back towards the centre beyond this distance, in degrees.
const CITY_RADIUS_DEG: f64 = 0.15;
/// Distance between the grid's intersections, in degrees (about 500 m).
const BLOCK_DEG: f64 = 0.0045;
/// Seconds between two RTTI probes of a driving vehicle.
const PROBE_INTERVAL_S: f64 = 5.0;
/// Probes in one ignition cycle (one trip) before the vehicle parks.
const PROBES_PER_TRIP: u32 = 240;
/// Events of one charge session: a start, progress reports, an end.
const CHARGE_PROGRESS_EVENTS: u32 = 6;

/// Characters a VIN may contain (ISO 3779: no I, O or Q).
const VIN_LETTERS: &[u8] = b"ABCDEFGHJKLMNPRSTUVWXYZ";

/// Relative weights of the streams in a publish mix.
#[derive(Debug, Clone, Copy)]
pub struct Mix {
    pub rtti: u32,
    pub diagnostics: u32,
    pub charging: u32,
    pub teleservice: u32,
}

impl Default for Mix {
    /// Probe data dominates, as it does in a real fleet while vehicles drive.
    fn default() -> Self {
        Self {
            rtti: 90,
            diagnostics: 5,
            charging: 3,
            teleservice: 2,
        }
    }
}

impl Mix {
    fn pick(&self, rng: &mut fastrand::Rng) -> Stream {
        let total = self.rtti + self.diagnostics + self.charging + self.teleservice;
        let mut n = rng.u32(0..total.max(1));
        for (weight, stream) in [
            (self.rtti, Stream::Rtti),
            (self.diagnostics, Stream::Diagnostics),
            (self.charging, Stream::Charging),
        ] {
            if n < weight {
                return stream;
            }
            n -= weight;
        }
        Stream::Teleservice
    }
}

/// A run tag of six VIN letters: the VINs of one run never collide with
/// another run's in the same data directory.
pub fn run_tag(rng: &mut fastrand::Rng) -> String {
    (0..6)
        .map(|_| char::from(VIN_LETTERS[rng.usize(..VIN_LETTERS.len())]))
        .collect()
}

/// The VIN of vehicle `index` in a run: manufacturer code, run tag, index.
pub fn vin(run_tag: &str, index: u32) -> String {
    format!("WMW{run_tag}{index:08}")
}

/// One publish ready to send.
#[derive(Debug, Clone)]
pub struct Publish {
    pub topic: String,
    pub payload: Vec<u8>,
    pub stream: Stream,
    /// Sequence number of the first record; the rest follow it.
    pub first_seq: u64,
    pub records: u32,
}

struct ChargeSession {
    id: u64,
    started_ms: i64,
    soc_start: f64,
    energy_kwh: f64,
    events: u32,
    dc: bool,
}

/// One simulated vehicle.
pub struct Vehicle {
    pub index: u32,
    vin: String,
    topics: [String; Stream::ALL.len()],
    next_seq: [u64; Stream::ALL.len()],
    ignition_cycle: u64,
    probes_in_trip: u32,
    lat: f64,
    lon: f64,
    heading: f64,
    speed_kmh: f64,
    to_next_turn: f64,
    odometer_km: f64,
    soc_pct: f64,
    charge: Option<ChargeSession>,
    cases: u64,
}

impl Vehicle {
    pub fn new(run_tag: &str, index: u32, rng: &mut fastrand::Rng) -> Self {
        let vin = vin(run_tag, index);
        let topics = Stream::ALL.map(|s| format!("vehicles/{vin}/{}", s.name()));
        // Start on a grid line somewhere in the city, heading along it.
        let snap = |v: f64| (v / BLOCK_DEG).round() * BLOCK_DEG;
        Self {
            index,
            vin,
            topics,
            next_seq: [0; Stream::ALL.len()],
            ignition_cycle: rng.u64(1..5000),
            probes_in_trip: rng.u32(0..PROBES_PER_TRIP),
            lat: snap(CITY.0 + (rng.f64() - 0.5) * CITY_RADIUS_DEG),
            lon: CITY.1 + (rng.f64() - 0.5) * CITY_RADIUS_DEG,
            heading: 90.0 * f64::from(rng.u8(0..4)),
            speed_kmh: 30.0 + rng.f64() * 40.0,
            to_next_turn: BLOCK_DEG,
            odometer_km: 1000.0 + rng.f64() * 80_000.0,
            soc_pct: 20.0 + rng.f64() * 60.0,
            charge: None,
            cases: 0,
        }
    }

    pub fn vin(&self) -> &str {
        &self.vin
    }

    /// The next publish of this vehicle: `records` records of one stream
    /// picked from `mix`, stamped `now_ms`.
    pub fn publish(
        &mut self,
        mix: &Mix,
        records: u32,
        now_ms: i64,
        rng: &mut fastrand::Rng,
    ) -> Publish {
        let stream = mix.pick(rng);
        let first_seq = self.next_seq[stream.index()];
        let mut json = String::with_capacity(320 * records as usize);
        if records > 1 {
            json.push('[');
        }
        for i in 0..records {
            if i > 0 {
                json.push(',');
            }
            let seq = self.next_seq[stream.index()];
            self.next_seq[stream.index()] += 1;
            let _ = write!(json, r#"{{"vin":"{}","ts":{now_ms},"seq":{seq}"#, self.vin);
            match stream {
                Stream::Rtti => self.rtti(&mut json, rng),
                Stream::Diagnostics => self.diagnostics(&mut json, rng),
                Stream::Charging => self.charging(&mut json, now_ms, rng),
                Stream::Teleservice => self.teleservice(&mut json, rng),
            }
            json.push('}');
        }
        if records > 1 {
            json.push(']');
        }
        Publish {
            topic: self.topics[stream.index()].clone(),
            payload: json.into_bytes(),
            stream,
            first_seq,
            records,
        }
    }

    /// Drives one probe interval along the grid and writes a probe.
    fn rtti(&mut self, json: &mut String, rng: &mut fastrand::Rng) {
        self.probes_in_trip += 1;
        if self.probes_in_trip > PROBES_PER_TRIP {
            self.probes_in_trip = 0;
            self.ignition_cycle += 1;
        }
        self.speed_kmh = (self.speed_kmh + (rng.f64() - 0.5) * 12.0).clamp(0.0, 120.0);
        let step = self.speed_kmh / 3600.0 * PROBE_INTERVAL_S / 111.0;
        self.odometer_km += step * 111.0;
        self.to_next_turn -= step;
        if self.to_next_turn <= 0.0 {
            self.to_next_turn = BLOCK_DEG;
            self.heading = self.turn(rng);
        }
        let rad = self.heading.to_radians();
        self.lat += step * rad.cos();
        self.lon += step * rad.sin() / CITY.0.to_radians().cos();
        let indicator = match rng.u8(0..20) {
            0 => "left",
            1 => "right",
            _ => "off",
        };
        let _ = write!(
            json,
            r#","ignition_cycle":{},"latitude":{:.5},"longitude":{:.5},"speed_kmh":{:.1},"heading_deg":{:.1},"lane":{},"indicator":"{indicator}""#,
            self.ignition_cycle,
            self.lat,
            self.lon,
            self.speed_kmh,
            self.heading,
            rng.u8(1..4),
        );
        if rng.u16(0..500) == 0 {
            const HAZARDS: [&str; 4] = [
                "queue_end",
                "broken_down_vehicle",
                "slippery_road",
                "obstacle",
            ];
            let _ = write!(
                json,
                r#","hazard":"{}""#,
                HAZARDS[rng.usize(..HAZARDS.len())]
            );
        }
    }

    /// At an intersection: straight on, left or right; back towards the
    /// centre when the vehicle has left the city.
    fn turn(&self, rng: &mut fastrand::Rng) -> f64 {
        let (dlat, dlon) = (self.lat - CITY.0, self.lon - CITY.1);
        if dlat.abs() > CITY_RADIUS_DEG || dlon.abs() > CITY_RADIUS_DEG {
            return if dlat.abs() > dlon.abs() {
                if dlat > 0.0 { 180.0 } else { 0.0 }
            } else if dlon > 0.0 {
                270.0
            } else {
                90.0
            };
        }
        match rng.u8(0..4) {
            0 => (self.heading + 90.0) % 360.0,
            1 => (self.heading + 270.0) % 360.0,
            _ => self.heading,
        }
    }

    fn diagnostics(&mut self, json: &mut String, rng: &mut fastrand::Rng) {
        const ECUS: [&str; 5] = ["DME", "BMS", "EGS", "DSC", "KOMBI"];
        const CODES: [&str; 6] = ["P0420", "P0A7F", "P0730", "C1A00", "U0100", "P0300"];
        let (severity, codes) = match rng.u8(0..10) {
            0 => ("critical", 2),
            1..=3 => ("warning", 1),
            _ => ("info", 0),
        };
        let _ = write!(
            json,
            r#","ecu":"{}","severity":"{severity}","fault_codes":["#,
            ECUS[rng.usize(..ECUS.len())]
        );
        for i in 0..codes {
            if i > 0 {
                json.push(',');
            }
            let _ = write!(json, r#""{}""#, CODES[rng.usize(..CODES.len())]);
        }
        let _ = write!(
            json,
            r#"],"odometer_km":{},"operating_hours":{:.2},"battery_voltage_v":{:.1}"#,
            self.odometer_km as i64,
            self.odometer_km / 38.0,
            12.0 + rng.f64() * 2.4
        );
    }

    /// The next event of the vehicle's charge session, starting one if none runs.
    fn charging(&mut self, json: &mut String, now_ms: i64, rng: &mut fastrand::Rng) {
        let session = self.charge.get_or_insert_with(|| ChargeSession {
            id: rng.u64(..),
            started_ms: now_ms,
            soc_start: self.soc_pct,
            energy_kwh: 0.0,
            events: 0,
            dc: rng.bool(),
        });
        let event = match session.events {
            0 => "start",
            n if n > CHARGE_PROGRESS_EVENTS => "end",
            _ => "progress",
        };
        session.events += 1;
        let power = if session.dc { 120.0 } else { 11.0 };
        if event != "start" {
            session.energy_kwh += power * rng.f64() * 0.1;
            self.soc_pct = (self.soc_pct + rng.f64() * 8.0).min(100.0);
        }
        let _ = write!(
            json,
            r#","session_id":"CS-{:016X}","event":"{event}","started_at":{},"energy_kwh":{:.2},"soc_start_pct":{:.1},"soc_pct":{:.1},"max_power_kw":{power:.1},"charging_mode":"{}","remote_managed":{},"contract_number":"SE-CHG-{:08}""#,
            session.id,
            session.started_ms,
            session.energy_kwh,
            session.soc_start,
            self.soc_pct,
            if session.dc { "dc" } else { "ac" },
            session.id.is_multiple_of(7),
            self.index,
        );
        if event == "end" {
            let _ = write!(json, r#","ended_at":{now_ms}"#);
            self.charge = None;
        }
    }

    fn teleservice(&mut self, json: &mut String, rng: &mut fastrand::Rng) {
        let mileage = self.odometer_km as i64;
        match rng.u8(0..100) {
            0..=59 => {
                let _ = write!(
                    json,
                    r#","trigger":"monthly","mileage_km":{mileage},"service_needs":["engine_oil","vehicle_check"],"check_control_messages":[],"fault_codes":[]"#
                );
            }
            60..=89 => {
                self.cases += 1;
                let _ = write!(
                    json,
                    r#","trigger":"event","case_id":"CASE-{}-{}","mileage_km":{mileage},"service_needs":["brake_pads_front"],"check_control_messages":["CC-0346"],"fault_codes":["P0420"]"#,
                    self.index, self.cases
                );
            }
            90..=96 => {
                self.cases += 1;
                let _ = write!(
                    json,
                    r#","trigger":"roadside","case_id":"CASE-{}-{}","mileage_km":{mileage},"fault_codes":["HV-ISO-01"],"latitude":{:.5},"longitude":{:.5}"#,
                    self.index, self.cases, self.lat, self.lon
                );
            }
            _ => {
                let _ = write!(
                    json,
                    r#","trigger":"hv_warn","hv_incident_id":"HV-{}-{}","drivetrain":"BEV","plug_status":"unplugged","door_status":"closed","boot_status":"closed","engine_status":"off","ignition_status":"off","latitude":{:.5},"longitude":{:.5},"contact_phone":"+4670{:07}""#,
                    self.index,
                    rng.u32(..),
                    self.lat,
                    self.lon,
                    self.index
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetgate::pipeline::decode::{self, Limits};
    use fleetgate::schema::Registry;

    /// Every kind of record the fleet sends decodes without a rejection
    /// under fleetgate's own schemas and limits.
    #[test]
    fn generated_records_are_valid_under_the_schemas() -> anyhow::Result<()> {
        let registry = Registry::load()?;
        let pipeline = fleetgate::config::PipelineConfig::default();
        let limits = Limits {
            max_payload_bytes: pipeline.max_payload_bytes,
            max_records_per_publish: pipeline.max_records_per_publish,
            max_clock_skew_ms: pipeline.max_clock_skew_ms,
        };
        let mut rng = fastrand::Rng::with_seed(7);
        let tag = run_tag(&mut rng);
        let mut vehicles: Vec<Vehicle> = (0..50).map(|i| Vehicle::new(&tag, i, &mut rng)).collect();
        let mix = Mix {
            rtti: 1,
            diagnostics: 1,
            charging: 1,
            teleservice: 1,
        };
        let now = fleetgate::core::clock::now_ms();
        let mut seen = [0u32; Stream::ALL.len()];
        for round in 0..400 {
            let vehicle = &mut vehicles[round % 50];
            let publish = vehicle.publish(&mix, 1 + (round % 3) as u32, now, &mut rng);
            seen[publish.stream.index()] += 1;
            let mut out = decode::Decoded::default();
            decode::decode(
                registry.get(publish.stream),
                &limits,
                vehicle.vin(),
                &publish.payload,
                now,
                &mut out,
            );
            assert!(
                out.rejected.is_empty(),
                "{}: {:?}",
                String::from_utf8_lossy(&publish.payload),
                out.rejected.first().map(|r| &r.rejection)
            );
            assert_eq!(out.valid.len(), publish.records as usize);
        }
        assert!(
            seen.iter().all(|&n| n > 0),
            "every stream was generated: {seen:?}"
        );
        Ok(())
    }

    #[test]
    fn sequence_numbers_are_monotonic_per_stream() {
        let mut rng = fastrand::Rng::with_seed(1);
        let mut vehicle = Vehicle::new("ABCDEF", 3, &mut rng);
        let mut next = [0u64; Stream::ALL.len()];
        for _ in 0..200 {
            let p = vehicle.publish(&Mix::default(), 2, 0, &mut rng);
            assert_eq!(p.first_seq, next[p.stream.index()]);
            next[p.stream.index()] += 2;
        }
        assert!(fleetgate::privacy::pseudo::is_vin(vehicle.vin()));
    }

    #[test]
    fn vehicles_stay_near_the_city() {
        let mut rng = fastrand::Rng::with_seed(3);
        let mut vehicle = Vehicle::new("ABCDEF", 0, &mut rng);
        let only_rtti = Mix {
            rtti: 1,
            diagnostics: 0,
            charging: 0,
            teleservice: 0,
        };
        for _ in 0..20_000 {
            vehicle.publish(&only_rtti, 1, 0, &mut rng);
        }
        assert!((vehicle.lat - CITY.0).abs() < 2.0 * CITY_RADIUS_DEG);
        assert!((vehicle.lon - CITY.1).abs() < 2.0 * CITY_RADIUS_DEG);
    }
}
