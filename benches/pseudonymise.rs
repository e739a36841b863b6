//! Pseudonymise: the privacy stage's per-record operations.
//!
//! Input: a worker's `Privacy` over a fresh key ring and vault, warmed so
//! that every vehicle already has its vault secret (the steady state; the
//! first record of a vehicle also pays one redb write). Measures the keyed
//! vehicle pseudonym for 10,000 vehicles, the ChaCha20-Poly1305 encryption
//! of a contract number, the RTTI trip id, and the whole transform of one
//! RTTI and one charging record into columns (`StreamBatcher::push`, which
//! applies every field's policy).

mod common;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use fleetgate::pipeline::batch::StreamBatcher;
use fleetgate::schema::{INTERNAL_DOMAIN, Registry, Stream};

const VEHICLES: u32 = 10_000;

fn pseudonymise(c: &mut Criterion) {
    let mut fixture = common::privacy();
    let privacy = &mut fixture.privacy;
    let vins: Vec<String> = (0..VEHICLES).map(common::vin).collect();
    let epoch = privacy.epoch(common::T0_MS);
    for vin in &vins {
        privacy.vehicle_id(INTERNAL_DOMAIN, vin, epoch);
    }
    let mut group = c.benchmark_group("pseudonymise");
    group.throughput(Throughput::Elements(1));
    let mut i = 0usize;
    group.bench_function("vehicle_id/10k_vehicles", |b| {
        b.iter(|| {
            i = (i + 1) % vins.len();
            privacy.vehicle_id(INTERNAL_DOMAIN, &vins[i], epoch)
        })
    });
    group.bench_function("encrypt/contract_number", |b| {
        b.iter(|| {
            i = (i + 1) % vins.len();
            privacy.encrypt(&vins[i], "contract_number", b"SE-CHG-00048213")
        })
    });
    let mut ts = common::T0_MS;
    group.bench_function("trip_id", |b| {
        b.iter(|| {
            i = (i + 1) % vins.len();
            ts += 5;
            privacy.trip_id(&vins[i], Some(12), ts)
        })
    });

    let registry = Registry::load().expect("schemas");
    for stream in [Stream::Rtti, Stream::Charging] {
        let records = common::decoded(stream, 1_000, 10);
        let mut batcher = StreamBatcher::new(registry.get(stream));
        let mut n = 0usize;
        group.bench_function(format!("all_field_policies/{}", stream.name()), |b| {
            b.iter(|| {
                let (vin, record) = &records[n % records.len()];
                n += 1;
                batcher.push(record, vin, common::T0_MS, privacy);
                if batcher.len() >= 65_536 {
                    batcher.drain().expect("drain");
                }
            })
        });
    }
    group.finish();
}

criterion_group!(benches, pseudonymise);
criterion_main!(benches);
