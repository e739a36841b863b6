//! Column builders derived from a stream schema: records in, one Arrow
//! record batch per hour partition out. Every field's transform (pseudonym,
//! coarsening, encryption, trip id, drop) is applied here, so nothing
//! downstream ever holds a raw identifier.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{
    ArrayBuilder, ArrayRef, BinaryBuilder, BooleanBuilder, Float64Builder, Int32Builder,
    Int64Builder, ListBuilder, RecordBatch, StringBuilder, TimestampMillisecondBuilder,
};

use crate::pipeline::decode::{Record, Value};
use crate::privacy::stage::Privacy;
use crate::schema::{FieldSpec, FieldType, StreamSchema, Transform};
use crate::store::{PartitionKey, Result};

enum Column {
    Binary(BinaryBuilder),
    Utf8(StringBuilder),
    Int64(Int64Builder),
    Float64(Float64Builder),
    Boolean(BooleanBuilder),
    Timestamp(TimestampMillisecondBuilder),
    List(ListBuilder<StringBuilder>),
}

impl Column {
    /// A builder with room for `rows` values (and `bytes` bytes of
    /// strings or bytes), so that a batch holds little more memory than
    /// its rows need.
    fn for_field(field_type: FieldType, transform: Transform, rows: usize, bytes: usize) -> Self {
        match (transform, field_type) {
            (Transform::Encrypt, _) => Column::Binary(BinaryBuilder::with_capacity(rows, bytes)),
            (Transform::Pseudonym | Transform::Trip, _) | (_, FieldType::String) => {
                Column::Utf8(StringBuilder::with_capacity(rows, bytes))
            }
            (_, FieldType::Int) => Column::Int64(Int64Builder::with_capacity(rows)),
            (_, FieldType::Float) => Column::Float64(Float64Builder::with_capacity(rows)),
            (_, FieldType::Bool) => Column::Boolean(BooleanBuilder::with_capacity(rows)),
            (_, FieldType::Timestamp) => Column::Timestamp(timestamp_builder(rows)),
            (_, FieldType::StringList) => Column::List(ListBuilder::with_capacity(
                StringBuilder::with_capacity(rows, bytes),
                rows,
            )),
        }
    }

    /// Bytes of string or byte values appended so far.
    fn value_bytes(&self) -> usize {
        match self {
            Column::Binary(b) => b.values_slice().len(),
            Column::Utf8(b) => b.values_slice().len(),
            Column::List(b) => b.values_ref().values_slice().len(),
            _ => 0,
        }
    }

    fn append(&mut self, value: &Value) {
        match (self, value) {
            (Column::Utf8(b), Value::Str(s)) => b.append_value(s),
            (Column::Int64(b), Value::Int(n)) => b.append_value(*n),
            (Column::Float64(b), Value::Float(n)) => b.append_value(*n),
            (Column::Boolean(b), Value::Bool(v)) => b.append_value(*v),
            (Column::Timestamp(b), Value::Timestamp(ms)) => b.append_value(*ms),
            (Column::List(b), Value::List(items)) => {
                for item in items {
                    b.values().append_value(item);
                }
                b.append(true);
            }
            (column, _) => column.append_null(),
        }
    }

    fn append_null(&mut self) {
        match self {
            Column::Binary(b) => b.append_null(),
            Column::Utf8(b) => b.append_null(),
            Column::Int64(b) => b.append_null(),
            Column::Float64(b) => b.append_null(),
            Column::Boolean(b) => b.append_null(),
            Column::Timestamp(b) => b.append_null(),
            Column::List(b) => b.append(false),
        }
    }

    fn finish(&mut self) -> ArrayRef {
        match self {
            Column::Binary(b) => Arc::new(b.finish()),
            Column::Utf8(b) => Arc::new(b.finish()),
            Column::Int64(b) => Arc::new(b.finish()),
            Column::Float64(b) => Arc::new(b.finish()),
            Column::Boolean(b) => Arc::new(b.finish()),
            Column::Timestamp(b) => Arc::new(b.finish()),
            Column::List(b) => Arc::new(b.finish()),
        }
    }

    fn len(&self) -> usize {
        match self {
            Column::Binary(b) => b.len(),
            Column::Utf8(b) => b.len(),
            Column::Int64(b) => b.len(),
            Column::Float64(b) => b.len(),
            Column::Boolean(b) => b.len(),
            Column::Timestamp(b) => b.len(),
            Column::List(b) => b.len(),
        }
    }
}

fn timestamp_builder(rows: usize) -> TimestampMillisecondBuilder {
    TimestampMillisecondBuilder::with_capacity(rows).with_timezone("UTC")
}

/// The stored columns of one partition: the schema's stored fields, then
/// key_epoch (if the stream has pseudonyms), then received_at.
struct Columns {
    fields: Vec<Column>,
    key_epoch: Option<Int32Builder>,
    received_at: TimestampMillisecondBuilder,
}

/// One stored field and where its value sits in a record.
struct StoredField {
    index: usize,
    spec: FieldSpec,
    /// Index of the ignition-cycle field, for a trip field.
    cycle_index: Option<usize>,
}

/// The parts of a stream schema the batcher needs, resolved once.
struct StoredLayout {
    arrow: arrow::datatypes::SchemaRef,
    stored: Vec<StoredField>,
    ts_index: usize,
    has_key_epoch: bool,
}

/// Accumulates one stream's valid records, grouped by hour partition.
pub struct StreamBatcher {
    layout: Arc<StoredLayout>,
    partitions: HashMap<PartitionKey, Columns>,
    /// Each partition of the last drain, in rows and, per stored field,
    /// bytes of values: the room its next builders start with. Builders
    /// that start with arrow's default room (1,024 values) made a batch of
    /// a hundred rows hold ten times the memory its rows need, which the
    /// table writers count against their budget and commit early for.
    last_drain: HashMap<PartitionKey, Room>,
}

/// The room a partition's builders start with.
struct Room {
    rows: usize,
    /// Per stored field, bytes of string or byte values.
    bytes: Vec<usize>,
}

/// Room for this many rows in a partition the last drain did not hold
/// (a vehicle may send records for many hours at once); the builders grow
/// from there.
const FIRST_ROWS: usize = 8;
/// The most rows' room a partition's builders start with: a burst (a
/// vehicle's backlog) leaves no large reservation to the small batches
/// after it; beyond it the builders grow as they fill.
const MOST_ROWS: usize = 4096;

impl StreamBatcher {
    pub fn new(schema: &StreamSchema) -> Self {
        let position = |name: &str| schema.fields.iter().position(|f| f.name == name);
        let stored = schema
            .fields
            .iter()
            .enumerate()
            .filter(|(_, f)| f.is_stored())
            .map(|(index, f)| StoredField {
                index,
                spec: f.clone(),
                cycle_index: f.cycle_field.as_deref().and_then(position),
            })
            .collect();
        Self {
            layout: Arc::new(StoredLayout {
                arrow: schema.arrow.clone(),
                stored,
                ts_index: schema.ts_index,
                has_key_epoch: schema.has_key_epoch,
            }),
            partitions: HashMap::new(),
            last_drain: HashMap::new(),
        }
    }

    /// Adds a valid record of vehicle `vin`, applying every field's transform.
    pub fn push(&mut self, record: &Record, vin: &str, received_at_ms: i64, privacy: &mut Privacy) {
        let ts = match record.values[self.layout.ts_index] {
            Value::Timestamp(ms) => ms,
            _ => received_at_ms,
        };
        let epoch = privacy.epoch(ts);
        let layout = &self.layout;
        let key = PartitionKey::from_millis(ts);
        let last_drain = &self.last_drain;
        let columns = self.partitions.entry(key).or_insert_with(|| {
            let room = last_drain.get(&key);
            let rows = room.map_or(FIRST_ROWS, |r| r.rows);
            Columns {
                fields: layout
                    .stored
                    .iter()
                    .enumerate()
                    .map(|(i, f)| {
                        let bytes = room.and_then(|r| r.bytes.get(i)).copied();
                        let bytes = bytes.unwrap_or(rows * 16);
                        Column::for_field(f.spec.field_type, f.spec.transform, rows, bytes)
                    })
                    .collect(),
                key_epoch: layout
                    .has_key_epoch
                    .then(|| Int32Builder::with_capacity(rows)),
                received_at: timestamp_builder(rows),
            }
        });
        for (field, column) in layout.stored.iter().zip(&mut columns.fields) {
            let value = &record.values[field.index];
            let spec = &field.spec;
            match (spec.transform, value) {
                (_, Value::Null) => column.append_null(),
                (Transform::Pseudonym, Value::Str(raw))
                    if spec.name == crate::schema::VIN_FIELD =>
                {
                    column.append(&Value::Str(privacy.vehicle_id(spec.domain(), raw, epoch)));
                }
                (Transform::Pseudonym, Value::Str(raw)) => {
                    let p = privacy.field_pseudonym(spec.domain(), &spec.name, vin, raw, epoch);
                    column.append(&Value::Str(p));
                }
                (Transform::Encrypt, Value::Str(raw)) => {
                    if let Column::Binary(b) = column {
                        b.append_value(privacy.encrypt(vin, &spec.name, raw.as_bytes()));
                    }
                }
                (Transform::Trip, _) => {
                    let cycle = field.cycle_index.and_then(|i| match record.values[i] {
                        Value::Int(c) => Some(c),
                        _ => None,
                    });
                    column.append(&Value::Str(privacy.trip_id(vin, cycle, ts)));
                }
                (Transform::Coarsen, Value::Float(x)) => {
                    let scale = 10f64.powi(spec.decimals.unwrap_or(0) as i32);
                    column.append(&Value::Float((x * scale).round() / scale));
                }
                (Transform::Coarsen, Value::Timestamp(ms)) => {
                    let unit = spec.coarsen_to.map_or(1, |u| u.millis());
                    column.append(&Value::Timestamp(ms.div_euclid(unit) * unit));
                }
                _ => column.append(value),
            }
        }
        if let Some(b) = &mut columns.key_epoch {
            b.append_value(epoch);
        }
        columns.received_at.append_value(received_at_ms);
    }

    /// Number of rows buffered across partitions.
    pub fn len(&self) -> usize {
        self.partitions.values().map(|c| c.received_at.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Finishes every partition into a record batch, leaving the batcher empty.
    pub fn drain(&mut self) -> Result<Vec<(PartitionKey, RecordBatch)>> {
        let mut out = Vec::with_capacity(self.partitions.len());
        // Each partition's next builders start with the room this drain's
        // took, a little more, so that a steady stream grows none; at most
        // `MOST_ROWS` rows, each field's bytes in proportion.
        self.last_drain = self
            .partitions
            .iter()
            .map(|(key, columns)| {
                let took = columns.received_at.len().max(1);
                let rows = (took + took / 8 + 1).min(MOST_ROWS);
                let bytes = columns
                    .fields
                    .iter()
                    .map(|c| c.value_bytes() / took * rows + rows)
                    .collect();
                (*key, Room { rows, bytes })
            })
            .collect();
        for (key, mut columns) in self.partitions.drain() {
            debug_assert!(
                columns
                    .fields
                    .iter()
                    .all(|c| c.len() == columns.received_at.len())
            );
            let mut arrays: Vec<ArrayRef> = columns.fields.iter_mut().map(Column::finish).collect();
            if let Some(b) = &mut columns.key_epoch {
                arrays.push(Arc::new(b.finish()));
            }
            arrays.push(Arc::new(columns.received_at.finish()));
            out.push((
                key,
                RecordBatch::try_new(self.layout.arrow.clone(), arrays)?,
            ));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::pipeline::decode::{Decoded, Limits, decode};
    use crate::privacy::pseudo::KeyRing;
    use crate::privacy::stage::{PrivacySettings, PrivacyShared};
    use crate::privacy::vault::Vault;
    use crate::schema::{Registry, Stream};

    /// The bytes `batch`'s rows use, without the room left in its buffers.
    fn used_bytes(batch: &RecordBatch) -> usize {
        batch
            .columns()
            .iter()
            .map(|c| c.to_data().get_slice_memory_size().expect("sized"))
            .sum()
    }

    /// A steady stream's batches (a hundred rows a drain, as workers hand
    /// over between WAL syncs) hold at most twice the memory their rows
    /// use: the table writers count held memory and commit when it fills.
    #[test]
    fn a_steady_streams_batches_hold_little_more_than_their_rows() {
        let dir = tempfile::tempdir().expect("tempdir");
        let keys = KeyRing::load_or_create(&dir.path().join("root.key")).expect("keys");
        let vault = Vault::open(&dir.path().join("vault.redb"), &keys).expect("vault");
        let settings = PrivacySettings {
            key_epoch_days: 30,
            max_trip: Duration::from_secs(1800),
        };
        let mut privacy = Privacy::new(PrivacyShared::new(keys, vault, settings));
        let registry = Registry::load().expect("schemas");
        let schema = registry.get(Stream::Rtti);
        let payload = std::fs::read(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("schemas/examples/rtti/valid/commute.json"),
        )
        .expect("example");
        let limits = Limits {
            max_payload_bytes: 1 << 20,
            max_records_per_publish: 100,
            max_clock_skew_ms: i64::MAX,
        };
        let vin = "WMW11DJ04N2T00001";
        let received_at_ms = 1_796_083_200_000;
        let mut decoded = Decoded::default();
        decode(schema, &limits, vin, &payload, received_at_ms, &mut decoded);
        assert!(!decoded.valid.is_empty(), "{:?}", decoded.rejected);
        let mut batcher = StreamBatcher::new(schema);
        for drain in 0..3 {
            let mut rows = 0;
            while rows < 100 {
                for record in &decoded.valid {
                    batcher.push(record, vin, received_at_ms, &mut privacy);
                    rows += 1;
                }
            }
            let batches = batcher.drain().expect("drain");
            assert_eq!(
                batches.iter().map(|(_, b)| b.num_rows()).sum::<usize>(),
                rows
            );
            for (partition, batch) in &batches {
                let (held, used) = (batch.get_array_memory_size(), used_bytes(batch));
                if drain > 0 {
                    assert!(
                        held <= 2 * used,
                        "{partition:?}: {held} bytes held for {used} used"
                    );
                }
            }
        }
        // A burst (a backlog of 10,000 rows) leaves the row after it a
        // bounded room, not the burst's.
        let mut rows = 0;
        while rows < 10_000 {
            for record in &decoded.valid {
                batcher.push(record, vin, received_at_ms, &mut privacy);
                rows += 1;
            }
        }
        let burst: usize = batcher
            .drain()
            .expect("drain")
            .iter()
            .map(|(_, b)| used_bytes(b))
            .sum();
        batcher.push(&decoded.valid[0], vin, received_at_ms, &mut privacy);
        let after = batcher.drain().expect("drain");
        let held: usize = after.iter().map(|(_, b)| b.get_array_memory_size()).sum();
        assert!(
            held < burst / 2,
            "{held} bytes held for one row after a burst of {burst}"
        );
    }
}
