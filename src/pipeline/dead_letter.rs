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

use crate::core::reject::Rejection;
use crate::schema::dead_letter_arrow_schema;

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
    RecordBatch::try_new(dead_letter_arrow_schema(), columns)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::reject::RejectCode;

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
