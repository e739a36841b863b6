//! Fuzzing of everything a client's bytes reach before they are stored:
//! the topic parser, the JSON decoder and validator of every stream, the
//! privacy stage and the Arrow batch builder, and the redaction of dead
//! letters. Inputs are the valid and invalid examples of `schemas/examples/`
//! mutated (bytes flipped, inserted, deleted, cut), arbitrary bytes, and
//! JSON objects built from each schema's field names with values of every
//! type and size. The property: nothing panics, every record comes out
//! either stored or rejected with a reason, and a batch always builds.
//!
//! `FLEETGATE_FUZZ_CASES` sets the cases per property (default 512, which
//! keeps the suite quick); `scripts/fuzz` runs a long campaign.

mod common;

use std::time::Duration;

use common::{A, examples};
use fleetgate::ingest::link::{Route, route};
use fleetgate::pipeline::batch::StreamBatcher;
use fleetgate::pipeline::decode::{self, Decoded, Limits};
use fleetgate::privacy::pseudo::{KeyRing, Secret};
use fleetgate::privacy::stage::{Privacy, PrivacySettings, PrivacyShared};
use fleetgate::privacy::vault::Vault;
use fleetgate::schema::{Registry, Stream};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

const RECEIVED_MS: i64 = common::TEST_NOW_MS;

fn cases() -> u32 {
    std::env::var("FLEETGATE_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(512)
}

fn runner() -> TestRunner {
    TestRunner::new(Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    })
}

/// The path of one publish through a worker, as far as the bytes go.
struct Path {
    registry: std::sync::Arc<Registry>,
    limits: Limits,
    privacy: Privacy,
    _dir: tempfile::TempDir,
}

impl Path {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let keys = KeyRing::from_root(Secret::random().expect("key"));
        let vault = Vault::open(&dir.path().join("vault.redb"), &keys).expect("vault");
        let shared = PrivacyShared::new(
            keys,
            vault,
            PrivacySettings {
                key_epoch_days: 30,
                max_trip: Duration::from_secs(1800),
            },
        );
        let pipeline = fleetgate::config::PipelineConfig::default();
        Self {
            registry: Registry::load().expect("schemas"),
            limits: Limits {
                max_payload_bytes: pipeline.max_payload_bytes,
                max_records_per_publish: pipeline.max_records_per_publish,
                max_clock_skew_ms: pipeline.max_clock_skew_ms,
            },
            privacy: Privacy::new(shared),
            _dir: dir,
        }
    }

    /// Decodes, pseudonymises and batches `payload`, or redacts it as a
    /// dead letter; returns (stored, rejected) record counts.
    fn publish(&mut self, topic: &str, payload: &[u8]) -> (usize, usize) {
        let (vin, stream) = match route(topic) {
            Route::Vehicle { vin, stream } => (vin, stream),
            Route::Rejected { .. } => {
                self.privacy.redact(payload, None);
                self.privacy.redact(topic.as_bytes(), None);
                return (0, 1);
            }
        };
        let schema = self.registry.get(stream);
        let mut decoded = Decoded::default();
        decode::decode(
            schema,
            &self.limits,
            &vin,
            payload,
            RECEIVED_MS,
            &mut decoded,
        );
        for rejected in &decoded.rejected {
            assert!(
                !rejected.rejection.message.is_empty(),
                "a rejection has a reason"
            );
            self.privacy.redact(payload, Some((&vin, 0)));
        }
        let mut batcher = StreamBatcher::new(schema);
        for record in &decoded.valid {
            batcher.push(record, &vin, RECEIVED_MS, &mut self.privacy);
        }
        let batches = batcher
            .drain()
            .expect("a batch of decoded records always builds");
        let rows: usize = batches.iter().map(|(_, b)| b.num_rows()).sum();
        assert_eq!(rows, decoded.valid.len());
        (decoded.valid.len(), decoded.rejected.len())
    }
}

/// Every example payload of every stream, valid and invalid.
fn corpus() -> Vec<(Stream, Vec<u8>)> {
    let mut corpus = Vec::new();
    for stream in Stream::ALL {
        for kind in ["valid", "invalid"] {
            for (_, bytes) in examples(stream, kind) {
                corpus.push((stream, bytes));
            }
        }
    }
    corpus
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Insert(usize, Vec<u8>),
    Delete(usize, usize),
    Cut(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let interesting = prop_oneof![
        Just(b"\"".to_vec()),
        Just(b"{".to_vec()),
        Just(b"]".to_vec()),
        Just(b"-1e400".to_vec()),
        Just(b"9223372036854775807".to_vec()),
        Just(b"null".to_vec()),
        Just("\u{202e}Ä\u{0}".as_bytes().to_vec()),
        proptest::collection::vec(any::<u8>(), 1..16),
    ];
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(at, b)| Mutation::Flip(at, b)),
        (any::<usize>(), interesting).prop_map(|(at, bytes)| Mutation::Insert(at, bytes)),
        (any::<usize>(), 1usize..32).prop_map(|(at, n)| Mutation::Delete(at, n)),
        any::<usize>().prop_map(Mutation::Cut),
    ]
}

fn apply(mut bytes: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        let len = bytes.len().max(1);
        match m {
            Mutation::Flip(at, b) => {
                if !bytes.is_empty() {
                    let at = at % bytes.len();
                    bytes[at] ^= b;
                }
            }
            Mutation::Insert(at, new) => {
                let at = at % (bytes.len() + 1);
                bytes.splice(at..at, new.iter().copied());
            }
            Mutation::Delete(at, n) => {
                let at = at % len;
                let end = (at + n).min(bytes.len());
                if at < end {
                    bytes.drain(at..end);
                }
            }
            Mutation::Cut(at) => bytes.truncate(at % len),
        }
    }
    bytes
}

#[test]
fn mutated_examples_never_panic() {
    let corpus = corpus();
    let path = std::cell::RefCell::new(Path::new());
    let strategy = (0..corpus.len(), proptest::collection::vec(mutation(), 0..6));
    runner()
        .run(&strategy, |(index, mutations)| {
            let (stream, bytes) = &corpus[index];
            let payload = apply(bytes.clone(), &mutations);
            path.borrow_mut()
                .publish(&format!("vehicles/{A}/{stream}"), &payload);
            Ok(())
        })
        .expect("no panic on mutated examples");
}

#[test]
fn arbitrary_bytes_never_panic() {
    let path = std::cell::RefCell::new(Path::new());
    let strategy = (
        proptest::sample::select(Stream::ALL.to_vec()),
        proptest::collection::vec(any::<u8>(), 0..4096),
    );
    runner()
        .run(&strategy, |(stream, payload)| {
            let (stored, rejected) = path
                .borrow_mut()
                .publish(&format!("vehicles/{A}/{stream}"), &payload);
            prop_assert!(stored + rejected >= 1, "every payload has an outcome");
            Ok(())
        })
        .expect("no panic on arbitrary bytes");
}

/// A JSON value of any type, including extreme numbers and long strings.
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::{Value, json};
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_filter("JSON numbers are finite", |f| f.is_finite())
            .prop_map(|f| json!(f)),
        "[ -~]{0,40}".prop_map(Value::String),
        "\\PC{0,300}".prop_map(Value::String),
        Just(json!("2026-11-24T12:00:00Z")),
        Just(json!("+275760-09-13T00:00:00Z")),
        Just(json!(A)),
    ];
    leaf.prop_recursive(2, 24, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::Array),
            proptest::collection::btree_map("[a-z_]{1,12}", inner, 0..4)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

#[test]
fn schema_shaped_json_never_panics() {
    let registry = Registry::load().expect("schemas");
    let fields: Vec<(Stream, Vec<String>)> = Stream::ALL
        .iter()
        .map(|&s| {
            (
                s,
                registry
                    .get(s)
                    .fields
                    .iter()
                    .map(|f| f.name.clone())
                    .collect(),
            )
        })
        .collect();
    let path = std::cell::RefCell::new(Path::new());
    let strategy = (
        0..fields.len(),
        proptest::collection::vec((any::<proptest::sample::Index>(), json_value()), 0..24),
        1usize..4,
    );
    runner()
        .run(&strategy, |(stream_index, values, copies)| {
            let (stream, names) = &fields[stream_index];
            let mut record = serde_json::Map::new();
            record.insert("vin".into(), serde_json::json!(A));
            record.insert("ts".into(), serde_json::json!(RECEIVED_MS));
            record.insert("seq".into(), serde_json::json!(1));
            for (name, value) in values {
                record.insert(name.get(names).clone(), value);
            }
            let one = serde_json::Value::Object(record);
            let payload = if copies == 1 {
                one
            } else {
                serde_json::Value::Array(vec![one; copies])
            };
            let bytes = serde_json::to_vec(&payload).expect("json");
            let (stored, rejected) = path
                .borrow_mut()
                .publish(&format!("vehicles/{A}/{stream}"), &bytes);
            prop_assert_eq!(
                stored + rejected,
                copies,
                "each record is stored or rejected"
            );
            Ok(())
        })
        .expect("no panic on schema-shaped JSON");
}

#[test]
fn topics_never_panic_and_parse_only_vehicle_topics() {
    let path = std::cell::RefCell::new(Path::new());
    let strategy = prop_oneof![
        "\\PC{0,80}",
        "vehicles/[A-Za-z0-9]{15,18}/(rtti|teleservice|diagnostics|charging|x)(/.*)?",
        "/?(tenants/[A-Z0-9]{1,17}/)?vehicles/[A-HJ-NPR-Z0-9]{17}/(rtti|charging)",
    ];
    runner()
        .run(&strategy, |topic| {
            if let Route::Vehicle { vin, stream } = route(&topic) {
                let own = format!("vehicles/{vin}/{stream}");
                let tenant = format!("/tenants/{vin}/{own}");
                prop_assert!(
                    topic == own || topic.eq_ignore_ascii_case(&tenant),
                    "{}",
                    topic
                );
            }
            path.borrow_mut().publish(&topic, b"{}");
            Ok(())
        })
        .expect("no panic on topics");
}
