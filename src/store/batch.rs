//! Column builders derived from a stream schema: records in, one Arrow
//! record batch per hour partition out. Pseudonymised fields are replaced
//! here, so nothing downstream ever holds a raw identifier.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{
    ArrayBuilder, ArrayRef, BooleanBuilder, Float64Builder, Int64Builder, ListBuilder, RecordBatch,
    StringBuilder, TimestampMillisecondBuilder,
};

use super::{PartitionKey, Result};
use crate::decode::{Record, Value};
use crate::pseudo::PseudonymCache;
use crate::schema::{FieldType, StreamSchema, Transform};

enum Column {
    Utf8(StringBuilder),
    Int64(Int64Builder),
    Float64(Float64Builder),
    Boolean(BooleanBuilder),
    Timestamp(TimestampMillisecondBuilder),
    List(ListBuilder<StringBuilder>),
}

impl Column {
    fn for_field(field_type: FieldType, transform: Transform) -> Self {
        match (transform, field_type) {
            (Transform::Pseudonym, _) | (_, FieldType::String) => {
                Column::Utf8(StringBuilder::new())
            }
            (_, FieldType::Int) => Column::Int64(Int64Builder::new()),
            (_, FieldType::Float) => Column::Float64(Float64Builder::new()),
            (_, FieldType::Bool) => Column::Boolean(BooleanBuilder::new()),
            (_, FieldType::Timestamp) => Column::Timestamp(timestamp_builder()),
            (_, FieldType::StringList) => Column::List(ListBuilder::new(StringBuilder::new())),
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
            Column::Utf8(b) => b.len(),
            Column::Int64(b) => b.len(),
            Column::Float64(b) => b.len(),
            Column::Boolean(b) => b.len(),
            Column::Timestamp(b) => b.len(),
            Column::List(b) => b.len(),
        }
    }
}

fn timestamp_builder() -> TimestampMillisecondBuilder {
    TimestampMillisecondBuilder::new().with_timezone("UTC")
}

/// The stored columns of one partition: the schema's stored fields, then received_at.
struct Columns {
    fields: Vec<Column>,
    received_at: TimestampMillisecondBuilder,
}

/// Accumulates one stream's valid records, grouped by hour partition.
pub struct StreamBatcher {
    layout: Arc<StoredLayout>,
    partitions: HashMap<PartitionKey, Columns>,
}

/// The parts of a stream schema the batcher needs, resolved once.
struct StoredLayout {
    arrow: arrow::datatypes::SchemaRef,
    /// (index into the record's values, transform, field name) of each stored column.
    stored: Vec<(usize, FieldType, Transform, String)>,
    ts_index: usize,
}

impl StreamBatcher {
    pub fn new(schema: &StreamSchema) -> Self {
        let stored = schema
            .fields
            .iter()
            .enumerate()
            .filter(|(_, f)| f.is_stored())
            .map(|(i, f)| (i, f.field_type, f.transform, f.name.clone()))
            .collect();
        Self {
            layout: Arc::new(StoredLayout {
                arrow: schema.arrow.clone(),
                stored,
                ts_index: schema.ts_index,
            }),
            partitions: HashMap::new(),
        }
    }

    /// Adds a valid record, pseudonymising the fields whose transform says so.
    pub fn push(&mut self, record: &Record, received_at_ms: i64, pseudonyms: &mut PseudonymCache) {
        let ts = match record.values[self.layout.ts_index] {
            Value::Timestamp(ms) => ms,
            _ => received_at_ms,
        };
        let layout = &self.layout;
        let columns = self
            .partitions
            .entry(PartitionKey::from_millis(ts))
            .or_insert_with(|| Columns {
                fields: layout
                    .stored
                    .iter()
                    .map(|(_, ty, transform, _)| Column::for_field(*ty, *transform))
                    .collect(),
                received_at: timestamp_builder(),
            });
        for ((index, _, transform, name), column) in layout.stored.iter().zip(&mut columns.fields) {
            let value = &record.values[*index];
            match (transform, value) {
                (Transform::Pseudonym, Value::Str(raw)) => {
                    column.append(&Value::Str(pseudonyms.get(name, raw)));
                }
                (Transform::Pseudonym, _) => column.append_null(),
                _ => column.append(value),
            }
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
        for (key, mut columns) in self.partitions.drain() {
            debug_assert!(
                columns
                    .fields
                    .iter()
                    .all(|c| c.len() == columns.received_at.len())
            );
            let mut arrays: Vec<ArrayRef> = columns.fields.iter_mut().map(Column::finish).collect();
            arrays.push(Arc::new(columns.received_at.finish()));
            out.push((
                key,
                RecordBatch::try_new(self.layout.arrow.clone(), arrays)?,
            ));
        }
        Ok(out)
    }
}
