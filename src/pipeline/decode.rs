//! Decoding and validation: one MQTT payload in, one outcome per record out.
//!
//! A payload holds one JSON object or a JSON array of them. Every record is
//! checked against its stream's schema (types, required fields, ranges,
//! allowed values, unknown fields, the VIN against the topic's, the vehicle
//! timestamp against the time of receipt) and either becomes a [`Record`] or
//! a [`RejectedRecord`] carrying its own reason. Messages name the schema's
//! field and the problem, with sizes and positions; they never quote a value
//! or a name the sender chose, since any of them could identify a person.
//!
//! Two readings of one payload: the common case, every record valid, in one
//! pass that puts each field's value straight into its schema slot; and,
//! when that pass meets anything else, the payload read again as a JSON
//! tree, record by record, which words each rejection and keeps what the
//! dead letter needs. Both judge a value with the same functions (`judge_*`,
//! which [`convert`] dispatches to for a tree's value), so they accept
//! exactly the same records. A payload with a rejected record is read
//! twice, at most twice the work of one reading.

use std::fmt;

use chrono::DateTime;
use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Value as Json;

use crate::core::reject::{RejectCode, Rejection};
use crate::schema::{FieldSpec, FieldType, StreamSchema};

/// Earliest vehicle timestamp accepted: 2000-01-01T00:00:00Z.
const MIN_TIMESTAMP_MS: i64 = 946_684_800_000;

/// A validated field value, typed as its schema says.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Str(String),
    Int(i64),
    Float(f64),
    Bool(bool),
    /// Milliseconds since the Unix epoch, UTC.
    Timestamp(i64),
    List(Vec<String>),
}

/// A valid record: one value per field of its schema, in schema order.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub values: Vec<Value>,
}

impl Record {
    /// The value of string field `name`, if it has one.
    pub fn get<'a>(&'a self, schema: &StreamSchema, name: &str) -> Option<&'a str> {
        let i = schema.fields.iter().position(|f| f.name == name)?;
        match &self.values[i] {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The vehicle timestamp, which the schema guarantees is present.
    pub fn timestamp_ms(&self, schema: &StreamSchema) -> i64 {
        match self.values[schema.ts_index] {
            Value::Timestamp(ms) => ms,
            _ => unreachable!("ts is a required timestamp field, checked by the decoder"),
        }
    }
}

/// What was rejected, kept for the dead-letter copy.
#[derive(Debug, Clone, PartialEq)]
pub enum RejectedBytes {
    /// The whole payload, which could not be read as records.
    Payload,
    /// One parsed record of the payload.
    Json(Json),
}

#[derive(Debug, Clone, PartialEq)]
pub struct RejectedRecord {
    /// Index in a JSON array payload; `None` for a single object or the whole payload.
    pub index: Option<usize>,
    pub rejection: Rejection,
    pub bytes: RejectedBytes,
}

/// Limits a payload must respect, from `[pipeline]` in the config.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_payload_bytes: usize,
    pub max_records_per_publish: usize,
    pub max_clock_skew_ms: i64,
}

/// Outcomes of one payload, reused across payloads to keep allocations down.
#[derive(Debug, Default)]
pub struct Decoded {
    pub valid: Vec<Record>,
    pub rejected: Vec<RejectedRecord>,
}

impl Decoded {
    pub fn clear(&mut self) {
        self.valid.clear();
        self.rejected.clear();
    }
}

/// Decodes `payload` published on `vehicles/{topic_vin}/{schema.stream}`,
/// appending to `out`.
pub fn decode(
    schema: &StreamSchema,
    limits: &Limits,
    topic_vin: &str,
    payload: &[u8],
    received_at_ms: i64,
    out: &mut Decoded,
) {
    if payload.len() > limits.max_payload_bytes {
        out.rejected.push(whole_payload(
            RejectCode::Oversize,
            format!(
                "payload of {} bytes exceeds the limit of {} bytes",
                payload.len(),
                limits.max_payload_bytes
            ),
        ));
        return;
    }
    let checker = Checker {
        schema,
        topic_vin,
        max_ts_ms: received_at_ms.saturating_add(limits.max_clock_skew_ms),
    };
    let valid_before = out.valid.len();
    if checker
        .all_valid(payload, limits.max_records_per_publish, &mut out.valid)
        .is_ok()
    {
        return;
    }
    out.valid.truncate(valid_before);
    decode_tree(&checker, limits, payload, out);
}

/// A rejection of the whole payload.
fn whole_payload(code: RejectCode, message: String) -> RejectedRecord {
    RejectedRecord {
        index: None,
        rejection: Rejection::new(code, message),
        bytes: RejectedBytes::Payload,
    }
}

/// The slow way: the payload as a JSON tree, each record judged and every
/// rejection worded.
fn decode_tree(checker: &Checker, limits: &Limits, payload: &[u8], out: &mut Decoded) {
    let parsed: Json = match serde_json::from_slice(payload) {
        Ok(v) => v,
        Err(e) => {
            out.rejected.push(whole_payload(
                RejectCode::NotJson,
                format!(
                    "payload is not JSON ({:?} error at line {}, column {})",
                    e.classify(),
                    e.line(),
                    e.column()
                ),
            ));
            return;
        }
    };
    match parsed {
        Json::Array(items) if items.is_empty() => {
            out.rejected.push(whole_payload(
                RejectCode::Empty,
                "payload is an empty array".to_owned(),
            ));
        }
        Json::Array(items) if items.len() > limits.max_records_per_publish => {
            out.rejected.push(whole_payload(
                RejectCode::TooManyRecords,
                format!(
                    "payload holds {} records, more than the limit of {}",
                    items.len(),
                    limits.max_records_per_publish
                ),
            ));
        }
        Json::Array(items) => {
            for (i, item) in items.into_iter().enumerate() {
                checker.push(Some(i), item, out);
            }
        }
        item => checker.push(None, item, out),
    }
}

struct Checker<'a> {
    schema: &'a StreamSchema,
    topic_vin: &'a str,
    max_ts_ms: i64,
}

impl Checker<'_> {
    fn push(&self, index: Option<usize>, item: Json, out: &mut Decoded) {
        match self.record(&item) {
            Ok(record) => out.valid.push(record),
            Err(rejection) => out.rejected.push(RejectedRecord {
                index,
                rejection,
                bytes: RejectedBytes::Json(item),
            }),
        }
    }

    fn record(&self, item: &Json) -> Result<Record, Rejection> {
        let Json::Object(map) = item else {
            return Err(Rejection::new(
                RejectCode::NotAnObject,
                format!("record is a JSON {}, not an object", json_kind(item)),
            ));
        };
        let mut values = Vec::with_capacity(self.schema.fields.len());
        for field in &self.schema.fields {
            let value = match map.get(&field.name) {
                None | Some(Json::Null) if field.required => {
                    return Err(Rejection::new(
                        RejectCode::MissingField,
                        format!("required field '{}' is missing", field.name),
                    ));
                }
                None | Some(Json::Null) => Value::Null,
                Some(json) => convert(field, json)?,
            };
            values.push(value);
        }
        if let Some(key) = map
            .keys()
            .find(|k| !self.schema.fields.iter().any(|f| &f.name == *k))
        {
            return Err(Rejection::new(
                RejectCode::UnknownField,
                format!(
                    "a field not in the {} schema (its name is {} bytes long)",
                    self.schema.stream,
                    key.len()
                ),
            ));
        }
        self.finish(values)
    }

    /// The checks across fields, once each field's value is known.
    fn finish(&self, values: Vec<Value>) -> Result<Record, Rejection> {
        if !matches!(&values[self.schema.vin_index], Value::Str(vin) if vin == self.topic_vin) {
            return Err(Rejection::new(
                RejectCode::VinMismatch,
                "the record's vin differs from the VIN in the topic",
            ));
        }
        let record = Record { values };
        let ts = record.timestamp_ms(self.schema);
        if !(MIN_TIMESTAMP_MS..=self.max_ts_ms).contains(&ts) {
            return Err(Rejection::new(
                RejectCode::OutOfRange,
                "field 'ts' is before 2000 or too far after the time of receipt".to_owned(),
            ));
        }
        Ok(record)
    }

    /// The common case in one pass: appends the payload's records to
    /// `valid` if every one of them is valid, reading each field's value
    /// into its schema slot without a JSON tree of the record. `Err` at the
    /// first thing out of the ordinary (not JSON, an empty or too long
    /// array, an unknown, repeated or missing field, a value [`convert`]
    /// refuses), with `valid` holding some of the records: the caller reads
    /// the payload again the slow way, which words the rejection.
    fn all_valid(
        &self,
        payload: &[u8],
        max_records: usize,
        valid: &mut Vec<Record>,
    ) -> Result<(), serde_json::Error> {
        let mut json = serde_json::Deserializer::from_slice(payload);
        PayloadSeed {
            checker: self,
            max_records,
            valid,
        }
        .deserialize(&mut json)?;
        json.end()
    }
}

/// The one-pass reading gives up; the slow one says why.
fn give_up<E: serde::de::Error>() -> E {
    E::custom("not a payload of valid records only")
}

/// A payload: one record or an array of them.
struct PayloadSeed<'c, 's> {
    checker: &'c Checker<'s>,
    max_records: usize,
    valid: &'c mut Vec<Record>,
}

impl<'de> DeserializeSeed<'de> for PayloadSeed<'_, '_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for PayloadSeed<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a record or an array of records")
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<(), A::Error> {
        let record = RecordSeed(self.checker).visit_map(map)?;
        self.valid.push(record);
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut records = 0;
        while let Some(record) = seq.next_element_seed(RecordSeed(self.checker))? {
            records += 1;
            if records > self.max_records {
                return Err(give_up());
            }
            self.valid.push(record);
        }
        if records == 0 {
            return Err(give_up());
        }
        Ok(())
    }
}

/// One record, its fields read into their schema slots.
struct RecordSeed<'c, 's>(&'c Checker<'s>);

impl<'de> DeserializeSeed<'de> for RecordSeed<'_, '_> {
    type Value = Record;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Record, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for RecordSeed<'_, '_> {
    type Value = Record;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a record")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Record, A::Error> {
        let fields = &self.0.schema.fields;
        let mut slots: Vec<Option<Value>> = vec![None; fields.len()];
        while let Some(index) = map.next_key_seed(FieldSeed(fields))? {
            let value = map.next_value_seed(ValueSeed(&fields[index]))?;
            if slots[index].replace(value).is_some() {
                return Err(give_up());
            }
        }
        let values = slots
            .into_iter()
            .zip(fields)
            .map(|(slot, field)| match slot {
                Some(value) => Ok(value),
                None if field.required => Err(give_up()),
                None => Ok(Value::Null),
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.0.finish(values).map_err(|_| give_up())
    }
}

/// A record's key: the index of its schema field.
struct FieldSeed<'c>(&'c [FieldSpec]);

impl<'de> DeserializeSeed<'de> for FieldSeed<'_> {
    type Value = usize;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<usize, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for FieldSeed<'_> {
    type Value = usize;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a field name")
    }

    fn visit_str<E: serde::de::Error>(self, name: &str) -> Result<usize, E> {
        self.0
            .iter()
            .position(|field| field.name == name)
            .ok_or_else(give_up)
    }
}

/// A field's value, read straight into its type: no JSON tree, one
/// allocation for a string. Judged by the same functions as [`convert`];
/// anything they would reject, or that is not a JSON scalar or an array of
/// strings, gives up (the tree words why).
struct ValueSeed<'c>(&'c FieldSpec);

impl<'de> DeserializeSeed<'de> for ValueSeed<'_> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ValueSeed<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(type_name(self.0.field_type))
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<Value, E> {
        match self.0.required {
            true => Err(give_up()),
            false => Ok(Value::Null),
        }
    }

    fn visit_bool<E: serde::de::Error>(self, b: bool) -> Result<Value, E> {
        judge_bool(self.0, b).map_err(|_| give_up())
    }

    fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<Value, E> {
        judge_i64(self.0, n).map_err(|_| give_up())
    }

    fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<Value, E> {
        judge_u64(self.0, n).map_err(|_| give_up())
    }

    fn visit_f64<E: serde::de::Error>(self, n: f64) -> Result<Value, E> {
        judge_f64(self.0, n).map_err(|_| give_up())
    }

    fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Value, E> {
        judge_str(self.0, s).map_err(|_| give_up())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let field = self.0;
        if field.field_type != FieldType::StringList {
            return Err(give_up());
        }
        let mut list = Vec::new();
        while let Some(item) = seq.next_element::<String>()? {
            judge_list_len(field, list.len() + 1).map_err(|_| give_up())?;
            judge_list_item(field, &item).map_err(|_| give_up())?;
            list.push(item);
        }
        Ok(Value::List(list))
    }
}

/// Whether `json` is a valid value of `field`: the only values of a rejected
/// record that its dead-letter copy keeps as they are.
pub fn is_valid_value(field: &FieldSpec, json: &Json) -> bool {
    convert(field, json).is_ok()
}

/// Converts one JSON value to the field's type, checking its constraints.
fn convert(field: &FieldSpec, json: &Json) -> Result<Value, Rejection> {
    match json {
        Json::String(s) => judge_str(field, s),
        Json::Bool(b) => judge_bool(field, *b),
        Json::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(n), _, _) => judge_i64(field, n),
            (None, Some(n), _) => judge_u64(field, n),
            (None, None, Some(n)) => judge_f64(field, n),
            (None, None, None) => Err(wrong_type(field, "number")),
        },
        Json::Array(items) => {
            if field.field_type != FieldType::StringList {
                return Err(wrong_type(field, "array"));
            }
            judge_list_len(field, items.len())?;
            let mut list = Vec::with_capacity(items.len());
            for item in items {
                let s = item.as_str().ok_or_else(|| wrong_type(field, "array"))?;
                judge_list_item(field, s)?;
                list.push(s.to_owned());
            }
            Ok(Value::List(list))
        }
        Json::Null | Json::Object(_) => Err(wrong_type(field, json_kind(json))),
    }
}

fn wrong_type(field: &FieldSpec, got: &str) -> Rejection {
    Rejection::new(
        RejectCode::WrongType,
        format!(
            "field '{}' must be {}, got a JSON {got}",
            field.name,
            type_name(field.field_type)
        ),
    )
}

fn out_of_range(field: &FieldSpec, what: String) -> Rejection {
    Rejection::new(
        RejectCode::OutOfRange,
        format!("field '{}' {what}", field.name),
    )
}

/// A JSON string as a value of `field`: a string or an RFC 3339 timestamp.
fn judge_str(field: &FieldSpec, s: &str) -> Result<Value, Rejection> {
    match field.field_type {
        FieldType::String => {
            if s.len() > field.max_len() {
                return Err(out_of_range(
                    field,
                    format!("is {} bytes long, more than {}", s.len(), field.max_len()),
                ));
            }
            if let Some(allowed) = field.allowed.as_ref().filter(|a| !a.iter().any(|a| a == s)) {
                return Err(out_of_range(
                    field,
                    format!("is not one of {allowed:?} (a value of {} bytes)", s.len()),
                ));
            }
            Ok(Value::Str(s.to_owned()))
        }
        FieldType::Timestamp => DateTime::parse_from_rfc3339(s)
            .map(|t| Value::Timestamp(t.timestamp_millis()))
            .map_err(|_| wrong_type(field, "string")),
        _ => Err(wrong_type(field, "string")),
    }
}

/// A string list of `len` items: at most [`crate::schema::MAX_LIST_ITEMS`].
fn judge_list_len(field: &FieldSpec, len: usize) -> Result<(), Rejection> {
    match len > crate::schema::MAX_LIST_ITEMS {
        true => Err(out_of_range(
            field,
            format!(
                "has {len} items, more than {}",
                crate::schema::MAX_LIST_ITEMS
            ),
        )),
        false => Ok(()),
    }
}

/// One item of a string list: at most the field's length.
fn judge_list_item(field: &FieldSpec, item: &str) -> Result<(), Rejection> {
    match item.len() > field.max_len() {
        true => Err(out_of_range(
            field,
            format!("has an item longer than {} bytes", field.max_len()),
        )),
        false => Ok(()),
    }
}

/// A JSON integer that fits an `i64`.
fn judge_i64(field: &FieldSpec, n: i64) -> Result<Value, Rejection> {
    match field.field_type {
        FieldType::Int => {
            check_range(field, n as f64).map_err(|what| out_of_range(field, what))?;
            Ok(Value::Int(n))
        }
        FieldType::Float => judge_f64(field, n as f64),
        // Stored as microseconds: a time past what they hold would fail
        // every write of its table's batch, for ever.
        FieldType::Timestamp if n.checked_mul(1_000).is_none() => Err(out_of_range(
            field,
            "is beyond the times that can be stored".to_owned(),
        )),
        FieldType::Timestamp => Ok(Value::Timestamp(n)),
        _ => Err(wrong_type(field, "number")),
    }
}

/// A JSON integer, which past `i64::MAX` only a float field takes.
fn judge_u64(field: &FieldSpec, n: u64) -> Result<Value, Rejection> {
    match i64::try_from(n) {
        Ok(n) => judge_i64(field, n),
        Err(_) if field.field_type == FieldType::Float => judge_f64(field, n as f64),
        Err(_) => Err(wrong_type(field, "number")),
    }
}

/// A JSON number with a fraction or an exponent: a float field's only.
fn judge_f64(field: &FieldSpec, n: f64) -> Result<Value, Rejection> {
    match field.field_type {
        FieldType::Float => {
            check_range(field, n).map_err(|what| out_of_range(field, what))?;
            Ok(Value::Float(n))
        }
        _ => Err(wrong_type(field, "number")),
    }
}

fn judge_bool(field: &FieldSpec, b: bool) -> Result<Value, Rejection> {
    match field.field_type {
        FieldType::Bool => Ok(Value::Bool(b)),
        _ => Err(wrong_type(field, "boolean")),
    }
}

fn check_range(field: &FieldSpec, n: f64) -> Result<(), String> {
    if field.min.is_some_and(|min| n < min) || field.max.is_some_and(|max| n > max) {
        let bound = |b: Option<f64>| b.map_or("-".to_owned(), |b| b.to_string());
        return Err(format!(
            "is outside [{}, {}]",
            bound(field.min),
            bound(field.max)
        ));
    }
    Ok(())
}

fn type_name(t: FieldType) -> &'static str {
    match t {
        FieldType::String => "a string",
        FieldType::Int => "an integer",
        FieldType::Float => "a number",
        FieldType::Bool => "a boolean",
        FieldType::Timestamp => "an RFC 3339 string or epoch milliseconds",
        FieldType::StringList => "an array of strings",
    }
}

fn json_kind(json: &Json) -> &'static str {
    match json {
        Json::Null => "null",
        Json::Bool(_) => "boolean",
        Json::Number(_) => "number",
        Json::String(_) => "string",
        Json::Array(_) => "array",
        Json::Object(_) => "object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::{Registry, Stream};
    use std::path::Path;

    const TOPIC_VIN_OF_INVALID: &str = "WMWTEST0000000001";
    /// 2026-11-25T00:00:00Z, after every example's timestamp.
    const RECEIVED_AT_MS: i64 = 1_796_083_200_000;

    fn limits() -> Limits {
        Limits {
            max_payload_bytes: 256 * 1024,
            max_records_per_publish: 100,
            max_clock_skew_ms: 86_400_000,
        }
    }

    fn examples(stream: Stream, kind: &str) -> Vec<(String, Vec<u8>)> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("schemas/examples")
            .join(stream.name())
            .join(kind);
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .expect("examples directory")
            .map(|e| e.expect("dir entry").path())
            .filter(|p| p.extension().is_some_and(|e| e == "json"))
            .map(|p| {
                let name = p.file_name().expect("name").to_string_lossy().into_owned();
                (name, std::fs::read(&p).expect("read example"))
            })
            .collect();
        files.sort();
        assert!(!files.is_empty(), "no {kind} examples for {stream}");
        files
    }

    fn decode_one(stream: Stream, vin: &str, payload: &[u8]) -> Decoded {
        let registry = Registry::load().expect("schemas");
        let mut out = Decoded::default();
        decode(
            registry.get(stream),
            &limits(),
            vin,
            payload,
            RECEIVED_AT_MS,
            &mut out,
        );
        out
    }

    /// A time that fits an i64 of milliseconds but not one of microseconds
    /// (as stored) is rejected here, not at the table's write, where it
    /// failed every retry of its batch.
    #[test]
    fn a_time_past_what_can_be_stored_is_out_of_range() {
        const VIN: &str = "WMW11DJ04N2T00001";
        for started_at in [9_300_000_000_000_000_i64, i64::MIN, i64::MAX] {
            let payload = format!(
                r#"{{"vin":"{VIN}","ts":1796083100000,"seq":1,"session_id":"S","event":"start","started_at":{started_at}}}"#
            );
            let out = decode_one(Stream::Charging, VIN, payload.as_bytes());
            assert!(out.valid.is_empty(), "{started_at}");
            assert_eq!(out.rejected[0].rejection.code, RejectCode::OutOfRange);
        }
    }

    #[test]
    fn messages_never_quote_what_the_sender_wrote() {
        const VIN: &str = "WMW11DJ04N2T00001";
        let record = |extra: &str, severity: &str, ts: &str| {
            format!(
                r#"{{"vin":"{VIN}","ts":{ts},"seq":1,"ecu":"DME","severity":"{severity}"{extra}}}"#
            )
        };
        let payloads = [
            record(r#","AnnaSvensson":1"#, "info", "1796083100000"),
            record("", "AnnaSvensson", "1796083100000"),
            record("", "info", "1797123456789"),
            record(r#","battery_voltage_v":987654.5"#, "info", "1796083100000"),
            r#"{"AnnaSvensson"#.to_owned(),
            r#"{"vin":"\u0057MW21GD07P2S00002","owner":"AnnaSvensson""#.to_owned(),
        ];
        for payload in payloads {
            let out = decode_one(Stream::Diagnostics, VIN, payload.as_bytes());
            let message = &out.rejected[0].rejection.message;
            for secret in [
                "AnnaSvensson",
                "1797123456789",
                "987654",
                "MW21GD07P2S00002",
            ] {
                assert!(!message.contains(secret), "{secret} quoted in: {message}");
            }
        }
    }

    #[test]
    fn every_valid_example_decodes_completely() {
        for stream in Stream::ALL {
            for (name, bytes) in examples(stream, "valid") {
                let json: Json = serde_json::from_slice(&bytes).expect("valid example is JSON");
                let records = json.as_array().cloned().unwrap_or_else(|| vec![json]);
                let vin = records[0]["vin"].as_str().expect("vin").to_owned();
                let out = decode_one(stream, &vin, &bytes);
                assert!(
                    out.rejected.is_empty(),
                    "{stream}/{name}: {:?}",
                    out.rejected
                );
                assert_eq!(out.valid.len(), records.len(), "{stream}/{name}");
                assert!(
                    records.len() > 1,
                    "{stream}/{name} should hold several records"
                );
            }
        }
    }

    #[test]
    fn every_invalid_example_is_rejected_with_its_named_reason() {
        for stream in Stream::ALL {
            for (name, bytes) in examples(stream, "invalid") {
                let expected = name.split("__").next().expect("reason prefix");
                let out = decode_one(stream, TOPIC_VIN_OF_INVALID, &bytes);
                assert!(
                    out.valid.is_empty(),
                    "{stream}/{name} produced a valid record"
                );
                assert!(!out.rejected.is_empty(), "{stream}/{name}");
                for r in &out.rejected {
                    assert_eq!(
                        r.rejection.code.as_str(),
                        expected,
                        "{stream}/{name}: {r:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn values_are_typed_and_timestamps_normalised() {
        let payload = br#"{"vin":"WMW11DJ04N2T00001","ts":"2026-11-22T12:30:00+01:00","seq":7,
            "ecu":"EGS","severity":"critical","fault_codes":["P0730"],"operating_hours":3}"#;
        let out = decode_one(Stream::Diagnostics, "WMW11DJ04N2T00001", payload);
        let record = &out.valid[0];
        let registry = Registry::load().expect("schemas");
        let schema = registry.get(Stream::Diagnostics);
        let by_name = |name: &str| {
            let i = schema
                .fields
                .iter()
                .position(|f| f.name == name)
                .expect("field");
            record.values[i].clone()
        };
        // 2026-11-22T11:30:00Z
        assert_eq!(by_name("ts"), Value::Timestamp(1_795_347_000_000));
        assert_eq!(by_name("seq"), Value::Int(7));
        assert_eq!(by_name("operating_hours"), Value::Float(3.0));
        assert_eq!(by_name("fault_codes"), Value::List(vec!["P0730".into()]));
        assert_eq!(by_name("anomaly"), Value::Null);
    }

    #[test]
    fn one_bad_record_does_not_poison_its_batch() {
        let payload = br#"[
            {"vin":"WMW11DJ04N2T00001","ts":1795536000000,"seq":1,"ecu":"DME","severity":"info"},
            {"vin":"WMW11DJ04N2T00001","ts":1795536000000,"seq":2,"ecu":"DME","severity":"loud"},
            {"vin":"WMW11DJ04N2T00001","ts":1795536000000,"seq":3,"ecu":"DME","severity":"info"}]"#;
        let out = decode_one(Stream::Diagnostics, "WMW11DJ04N2T00001", payload);
        assert_eq!(out.valid.len(), 2);
        assert_eq!(out.rejected.len(), 1);
        assert_eq!(out.rejected[0].index, Some(1));
        assert_eq!(out.rejected[0].rejection.code, RejectCode::OutOfRange);

        // Nor the records of the payloads decoded before it into the same outcomes.
        let registry = Registry::load().expect("schemas");
        let mut out = Decoded::default();
        let good = br#"{"vin":"WMW11DJ04N2T00001","ts":1795536000000,"seq":9,"ecu":"DME","severity":"info"}"#;
        for payload in [&good[..], &payload[..]] {
            let schema = registry.get(Stream::Diagnostics);
            decode(
                schema,
                &limits(),
                "WMW11DJ04N2T00001",
                payload,
                RECEIVED_AT_MS,
                &mut out,
            );
        }
        let seqs: Vec<_> = out.valid.iter().map(|r| r.values[2].clone()).collect();
        assert_eq!(seqs, [Value::Int(9), Value::Int(1), Value::Int(3)]);
        assert_eq!(out.rejected.len(), 1);
    }

    #[test]
    fn limits_apply_to_the_whole_payload() {
        let big = vec![b' '; limits().max_payload_bytes + 1];
        let out = decode_one(Stream::Rtti, "WMW11DJ04N2T00001", &big);
        assert_eq!(out.rejected[0].rejection.code, RejectCode::Oversize);
        let many = format!("[{}]", vec!["{}"; 101].join(","));
        let out = decode_one(Stream::Rtti, "WMW11DJ04N2T00001", many.as_bytes());
        assert_eq!(out.rejected.len(), 1);
        assert_eq!(out.rejected[0].rejection.code, RejectCode::TooManyRecords);
    }

    #[test]
    fn messages_never_quote_identifying_values() {
        let payload = br#"{"vin":"WMW11DJ04N2T00001","ts":1795536000000,"seq":1,"session_id":"s",
            "event":"start","started_at":1795536000000,"contract_number":12345}"#;
        let out = decode_one(Stream::Charging, "WMW11DJ04N2T00001", payload);
        let message = &out.rejected[0].rejection.message;
        assert!(message.contains("contract_number"), "{message}");
        assert!(!message.contains("12345"), "{message}");
        let out = decode_one(Stream::Charging, "WMW21GD07P2S00002", payload);
        assert_eq!(out.rejected[0].rejection.code, RejectCode::WrongType);
    }

    /// The one-pass reading accepts a payload only when the JSON tree
    /// accepts every record of it, as the same records; and it is the
    /// reading that valid payloads take.
    #[test]
    fn the_one_pass_reading_accepts_what_the_tree_accepts() {
        let registry = Registry::load().expect("schemas");
        let agree = |stream: Stream, vin: &str, payload: &[u8]| -> bool {
            let checker = Checker {
                schema: registry.get(stream),
                topic_vin: vin,
                max_ts_ms: RECEIVED_AT_MS + limits().max_clock_skew_ms,
            };
            let mut one_pass = Vec::new();
            let accepted = checker
                .all_valid(payload, limits().max_records_per_publish, &mut one_pass)
                .is_ok();
            let mut tree = Decoded::default();
            decode_tree(&checker, &limits(), payload, &mut tree);
            if accepted {
                assert!(tree.rejected.is_empty(), "{:?}", tree.rejected);
                assert_eq!(one_pass, tree.valid);
            }
            accepted
        };
        for stream in Stream::ALL {
            for (name, bytes) in examples(stream, "valid") {
                let json: Json = serde_json::from_slice(&bytes).expect("valid example is JSON");
                let first = json.as_array().map_or(&json, |records| &records[0]);
                let vin = first["vin"].as_str().expect("vin");
                assert!(agree(stream, vin, &bytes), "{stream}/{name} takes one pass");
            }
            for (name, bytes) in examples(stream, "invalid") {
                assert!(
                    !agree(stream, TOPIC_VIN_OF_INVALID, &bytes),
                    "{stream}/{name} is not read in one pass"
                );
            }
        }
        const VIN: &str = "WMW11DJ04N2T00001";
        let record = |body: &str| format!(r#"{{"vin":"{VIN}","ts":1795536000000,{body}}}"#);
        let cases = [
            (record(r#""seq":1,"ecu":"DME","severity":"info""#), true),
            (record(r#""severity":"info","ecu":"DME","seq":1"#), true),
            (
                record(r#""seq":1,"ecu":"DME","severity":"info","anomaly":null"#),
                true,
            ),
            (
                record(r#""s\u0065q":1,"ecu":"DME","severity":"info""#),
                true,
            ),
            (
                format!(
                    " [{}] \n",
                    record(r#""seq":1,"ecu":"DME","severity":"info""#)
                ),
                true,
            ),
            // The tree takes the last of a repeated field; one pass leaves it to the tree.
            (
                record(r#""seq":1,"seq":2,"ecu":"DME","severity":"info""#),
                false,
            ),
            (record(r#""seq":1.0,"ecu":"DME","severity":"info""#), false),
            (record(r#""seq":1,"ecu":"DME","severity":"info"} {"#), false),
            (
                record(r#""seq":1,"ecu":"DME","severity":"info","extra":1"#),
                false,
            ),
            (record(r#""seq":1,"ecu":"DME","severity":null"#), false),
            // Each kind of value the one pass reads without a tree.
            (
                record(
                    r#""seq":1,"ecu":"D\"ME","severity":"info","fault_codes":["P0300","U0100"]"#,
                ),
                true,
            ),
            (
                record(r#""seq":1,"ecu":"DME","severity":"info","odometer_km":18446744073709551615"#),
                false,
            ),
            (
                record(
                    r#""seq":1,"ecu":"DME","severity":"info","operating_hours":18446744073709551615,"battery_voltage_v":12"#,
                ),
                true,
            ),
            (
                record(
                    r#""seq":1,"ecu":"DME","severity":"info","operating_hours":1e3,"odometer_km":0"#,
                ),
                true,
            ),
            (
                record(r#""seq":1,"ecu":"DME","severity":"info","battery_voltage_v":1000.5"#),
                false,
            ),
            (
                r#"{"vin":"WMW11DJ04N2T00001","ts":"2026-11-24T10:00:00+01:00","seq":1,"ecu":"D\u0045ME","severity":"info"}"#
                    .to_owned(),
                true,
            ),
            (
                r#"{"vin":"WMW11DJ04N2T00001","ts":"yesterday","seq":1,"ecu":"DME","severity":"info"}"#
                    .to_owned(),
                false,
            ),
            (record(r#""seq":-1,"ecu":"DME","severity":"info""#), false),
            (record(r#""seq":true,"ecu":"DME","severity":"info""#), false),
            (record(r#""seq":1,"ecu":{"a":1},"severity":"info""#), false),
            (
                record(r#""seq":1,"ecu":"DME","severity":"info","fault_codes":["P0300",7]"#),
                false,
            ),
            (
                record(&format!(
                    r#""seq":1,"ecu":"DME","severity":"info","fault_codes":[{}]"#,
                    vec!["\"P0300\""; 64].join(",")
                )),
                true,
            ),
            (
                record(&format!(
                    r#""seq":1,"ecu":"DME","severity":"info","fault_codes":[{}]"#,
                    vec!["\"P0300\""; 65].join(",")
                )),
                false,
            ),
            (
                record(&format!(
                    r#""seq":1,"ecu":"DME","severity":"info","anomaly":"{}""#,
                    "a".repeat(129)
                )),
                false,
            ),
            ("[]".to_owned(), false),
            ("7".to_owned(), false),
        ];
        for (payload, one_pass) in cases {
            assert_eq!(
                agree(Stream::Diagnostics, VIN, payload.as_bytes()),
                one_pass,
                "{payload}"
            );
        }
    }
}
