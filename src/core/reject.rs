//! Why a record was rejected: the codes the `reason_code` column and the
//! counters hold, and the rejection that carries one with its message.

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
}
