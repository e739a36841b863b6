//! The dead-letter store: every rejected record with the reason, the topic,
//! the time of receipt and a size-limited, redacted copy of its bytes.
//!
//! Rejection is per record: one bad record never takes its neighbours in the
//! same publish with it. Dead letters are stored as Parquet in the
//! `dead_letters` table, partitioned by time of receipt, and queried like any
//! stream. They are personal data too: the topic's VIN slot is pseudonymised,
//! identifying fields of parseable records are replaced, and VIN-shaped tokens
//! in unparseable bytes are replaced by their pseudonym.

use std::sync::Arc;

use arrow::array::{
    ArrayRef, BooleanBuilder, Int64Builder, RecordBatch, StringBuilder, TimestampMillisecondBuilder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};

use crate::schema::{RECEIVED_AT_COLUMN, timestamp_type};

/// Name of the dead-letter table.
pub const TABLE: &str = "dead_letters";

/// Why a record was rejected. The code is what the `reason_code` column and
/// the counters hold; the message in [`Rejection`] says what exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectCode {
    /// The topic is not `vehicles/{VIN}/{stream}`.
    UnknownTopic,
    /// The topic's stream segment names no stream.
    UnknownStream,
    /// The topic's VIN segment is not a VIN.
    InvalidVin,
    /// The payload exceeds `pipeline.max_payload_bytes`.
    Oversize,
    /// The payload is not JSON.
    NotJson,
    /// The payload is an empty JSON array.
    Empty,
    /// The payload holds more than `pipeline.max_records_per_publish` records.
    TooManyRecords,
    /// A record is not a JSON object.
    NotAnObject,
    MissingField,
    WrongType,
    /// A value is outside its range, its allowed values or its length.
    OutOfRange,
    UnknownField,
    /// The record's VIN differs from the topic's.
    VinMismatch,
    /// A vehicle published to another vehicle's topic.
    ForeignTopic,
}

impl RejectCode {
    pub const ALL: [RejectCode; 14] = [
        RejectCode::UnknownTopic,
        RejectCode::UnknownStream,
        RejectCode::InvalidVin,
        RejectCode::Oversize,
        RejectCode::NotJson,
        RejectCode::Empty,
        RejectCode::TooManyRecords,
        RejectCode::NotAnObject,
        RejectCode::MissingField,
        RejectCode::WrongType,
        RejectCode::OutOfRange,
        RejectCode::UnknownField,
        RejectCode::VinMismatch,
        RejectCode::ForeignTopic,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RejectCode::UnknownTopic => "unknown_topic",
            RejectCode::UnknownStream => "unknown_stream",
            RejectCode::InvalidVin => "invalid_vin",
            RejectCode::Oversize => "oversize",
            RejectCode::NotJson => "not_json",
            RejectCode::Empty => "empty",
            RejectCode::TooManyRecords => "too_many_records",
            RejectCode::NotAnObject => "not_an_object",
            RejectCode::MissingField => "missing_field",
            RejectCode::WrongType => "wrong_type",
            RejectCode::OutOfRange => "out_of_range",
            RejectCode::UnknownField => "unknown_field",
            RejectCode::VinMismatch => "vin_mismatch",
            RejectCode::ForeignTopic => "foreign_topic",
        }
    }

    /// Position in [`RejectCode::ALL`], for counter arrays.
    pub fn index(self) -> usize {
        self as usize
    }
}

/// A rejection: its code and a message naming the field and the problem.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}: {message}", code.as_str())]
pub struct Rejection {
    pub code: RejectCode,
    pub message: String,
}

impl Rejection {
    pub fn new(code: RejectCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// One row of the dead-letter table. Holds no raw identifier.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    pub received_at_ms: i64,
    /// The topic with its VIN segment replaced by the pseudonym.
    pub topic: String,
    pub stream: Option<&'static str>,
    pub vehicle_id: Option<String>,
    pub rejection: Rejection,
    /// Index of the record in a JSON array payload.
    pub record_index: Option<usize>,
    /// Redacted copy, cut to `pipeline.dead_letter_payload_bytes`.
    pub payload: Vec<u8>,
    /// Size of the rejected bytes before cutting.
    pub payload_size: usize,
}

/// Arrow schema of the dead-letter table.
pub fn arrow_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new(RECEIVED_AT_COLUMN, timestamp_type(), false),
        Field::new("topic", DataType::Utf8, false),
        Field::new("stream", DataType::Utf8, true),
        Field::new("vehicle_id", DataType::Utf8, true),
        Field::new("reason_code", DataType::Utf8, false),
        Field::new("reason", DataType::Utf8, false),
        Field::new("record_index", DataType::Int64, true),
        Field::new("payload", DataType::Utf8, false),
        Field::new("payload_size", DataType::Int64, false),
        Field::new("payload_truncated", DataType::Boolean, false),
    ]))
}

/// Builds a record batch of dead letters.
pub fn to_batch(rows: &[DeadLetter]) -> Result<RecordBatch, arrow::error::ArrowError> {
    let mut received = TimestampMillisecondBuilder::new().with_timezone("UTC");
    let mut topic = StringBuilder::new();
    let mut stream = StringBuilder::new();
    let mut vehicle = StringBuilder::new();
    let mut code = StringBuilder::new();
    let mut reason = StringBuilder::new();
    let mut index = Int64Builder::new();
    let mut payload = StringBuilder::new();
    let mut size = Int64Builder::new();
    let mut truncated = BooleanBuilder::new();
    for row in rows {
        received.append_value(row.received_at_ms);
        topic.append_value(&row.topic);
        stream.append_option(row.stream);
        vehicle.append_option(row.vehicle_id.as_deref());
        code.append_value(row.rejection.code.as_str());
        reason.append_value(&row.rejection.message);
        index.append_option(row.record_index.map(|i| i as i64));
        payload.append_value(String::from_utf8_lossy(&row.payload));
        size.append_value(row.payload_size as i64);
        truncated.append_value(row.payload.len() < row.payload_size);
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(received.finish()),
        Arc::new(topic.finish()),
        Arc::new(stream.finish()),
        Arc::new(vehicle.finish()),
        Arc::new(code.finish()),
        Arc::new(reason.finish()),
        Arc::new(index.finish()),
        Arc::new(payload.finish()),
        Arc::new(size.finish()),
        Arc::new(truncated.finish()),
    ];
    RecordBatch::try_new(arrow_schema(), columns)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_and_indexed_in_order() {
        for (i, code) in RejectCode::ALL.iter().enumerate() {
            assert_eq!(code.index(), i);
        }
        let names: std::collections::HashSet<_> =
            RejectCode::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(names.len(), RejectCode::ALL.len());
    }

    #[test]
    fn batch_marks_truncation() {
        let row = DeadLetter {
            received_at_ms: 1,
            topic: "vehicles/x/rtti".into(),
            stream: Some("rtti"),
            vehicle_id: None,
            rejection: Rejection::new(RejectCode::NotJson, "expected value"),
            record_index: None,
            payload: b"abc".to_vec(),
            payload_size: 10,
        };
        let batch = to_batch(&[row]).expect("batch");
        assert_eq!(batch.num_rows(), 1);
        let truncated = batch
            .column_by_name("payload_truncated")
            .expect("column")
            .as_any()
            .downcast_ref::<arrow::array::BooleanArray>()
            .expect("bool");
        assert!(truncated.value(0));
    }
}
