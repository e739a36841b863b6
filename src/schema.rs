//! The stream schemas in `schemas/*.toml`, the single source of truth for every
//! field: its type, unit, whether it is required, its privacy class and what
//! the pipeline does with it before storage.
//!
//! The decoder validates against these definitions and the Arrow schema of
//! each table is derived from them; no field list is written anywhere else.
//! The schema files are compiled into the binary, so a release runs anywhere.

use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use serde::Deserialize;

pub use crate::core::table::Stream;
use crate::core::table::Table;

/// Errors in a schema file. Each names the stream and field at fault.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("schema {file}: {source}")]
    Parse {
        file: &'static str,
        source: Box<toml::de::Error>,
    },
    #[error("schema {stream}, field {field}: {problem}")]
    Field {
        stream: String,
        field: String,
        problem: String,
    },
    #[error("schema {stream}: {problem}")]
    Stream { stream: String, problem: String },
}

pub type Result<T, E = SchemaError> = std::result::Result<T, E>;

/// The file name and text of a stream's schema in `schemas/`.
fn source(stream: Stream) -> (&'static str, &'static str) {
    match stream {
        Stream::Teleservice => (
            "teleservice.toml",
            include_str!("../schemas/teleservice.toml"),
        ),
        Stream::Rtti => ("rtti.toml", include_str!("../schemas/rtti.toml")),
        Stream::Diagnostics => (
            "diagnostics.toml",
            include_str!("../schemas/diagnostics.toml"),
        ),
        Stream::Charging => ("charging.toml", include_str!("../schemas/charging.toml")),
    }
}

/// Value type of a field as it arrives in JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FieldType {
    String,
    Int,
    Float,
    Bool,
    /// RFC 3339 text or integer milliseconds since the Unix epoch.
    Timestamp,
    StringList,
}

impl FieldType {
    pub fn name(self) -> &'static str {
        match self {
            FieldType::String => "string",
            FieldType::Int => "int",
            FieldType::Float => "float",
            FieldType::Bool => "bool",
            FieldType::Timestamp => "timestamp",
            FieldType::StringList => "string_list",
        }
    }
}

/// What a field says about a person (catalog §4 identifier classes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PrivacyClass {
    /// Identifies a person or their car account on its own: VIN, contact data, contract number.
    DirectIdentifier,
    /// Identifies in combination: position, timestamps, incident ids.
    QuasiIdentifier,
    /// Other personal data.
    Personal,
    /// Technical vehicle data.
    Technical,
}

impl PrivacyClass {
    pub fn name(self) -> &'static str {
        match self {
            PrivacyClass::DirectIdentifier => "direct_identifier",
            PrivacyClass::QuasiIdentifier => "quasi_identifier",
            PrivacyClass::Personal => "personal",
            PrivacyClass::Technical => "technical",
        }
    }
}

/// What the pipeline does with a field before it is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transform {
    Keep,
    /// Validated, then never stored.
    Drop,
    /// A keyed pseudonym in the field's `domain`, from the vehicle's vault
    /// secret and the record's key epoch.
    Pseudonym,
    /// Rounded: floats to `decimals` decimal places, timestamps down to `coarsen_to`.
    Coarsen,
    /// Encrypted with the vehicle's data key (ChaCha20-Poly1305), for personal
    /// data a service needs back; stored as binary nonce ‖ ciphertext.
    Encrypt,
    /// Replaces the VIN by a trip id that changes with every ignition cycle
    /// (`cycle_field`), after `privacy.max_trip_minutes` and at every UTC
    /// hour (see `privacy::stage` for what it is made of).
    Trip,
}

impl Transform {
    pub fn name(self) -> &'static str {
        match self {
            Transform::Keep => "keep",
            Transform::Drop => "drop",
            Transform::Pseudonym => "pseudonym",
            Transform::Coarsen => "coarsen",
            Transform::Encrypt => "encrypt",
            Transform::Trip => "trip",
        }
    }
}

/// Unit a timestamp is coarsened to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CoarseUnit {
    Second,
    Minute,
    Hour,
}

impl CoarseUnit {
    pub fn millis(self) -> i64 {
        match self {
            CoarseUnit::Second => 1_000,
            CoarseUnit::Minute => 60_000,
            CoarseUnit::Hour => 3_600_000,
        }
    }
}

/// Records of a stream that may be stored only with a consent (seed §1 activation column).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsentGate {
    /// The record field that selects the gated records.
    pub field: String,
    /// The value of `field` that selects them.
    pub equals: String,
    /// The consent they need (see `core::consent::Consent::NAMES`).
    pub consent: String,
    /// Where the seed says so.
    pub seed: String,
}

/// One field of a stream, as written in its schema file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldSpec {
    pub name: String,
    #[serde(rename = "type")]
    pub field_type: FieldType,
    pub required: bool,
    pub privacy: PrivacyClass,
    pub transform: Transform,
    /// Stored column name, when it differs from the field name.
    pub column: Option<String>,
    pub unit: Option<String>,
    pub min: Option<f64>,
    pub max: Option<f64>,
    pub max_len: Option<usize>,
    pub allowed: Option<Vec<String>>,
    /// Pseudonym domain of a `pseudonym` field.
    pub domain: Option<String>,
    /// Decimal places a coarsened float keeps.
    pub decimals: Option<u32>,
    /// Unit a coarsened timestamp is truncated to.
    pub coarsen_to: Option<CoarseUnit>,
    /// Field holding the ignition cycle, for a `trip` field.
    pub cycle_field: Option<String>,
    pub description: String,
}

/// The domain of pseudonyms for the manufacturer's own analytics.
pub const INTERNAL_DOMAIN: &str = "internal";

/// Longest string accepted where a field sets no `max_len`.
pub const DEFAULT_MAX_LEN: usize = 256;
/// Most items accepted in a `string_list` field.
pub const MAX_LIST_ITEMS: usize = 64;

impl FieldSpec {
    pub fn column_name(&self) -> &str {
        self.column.as_deref().unwrap_or(&self.name)
    }

    pub fn max_len(&self) -> usize {
        self.max_len.unwrap_or(DEFAULT_MAX_LEN)
    }

    pub fn is_stored(&self) -> bool {
        self.transform != Transform::Drop
    }

    pub fn domain(&self) -> &str {
        self.domain.as_deref().unwrap_or(INTERNAL_DOMAIN)
    }

    /// Arrow type of the stored column.
    fn stored_type(&self) -> DataType {
        match (self.transform, self.field_type) {
            (Transform::Encrypt, _) => DataType::Binary,
            (Transform::Pseudonym | Transform::Trip, _) | (_, FieldType::String) => DataType::Utf8,
            (_, FieldType::Int) => DataType::Int64,
            (_, FieldType::Float) => DataType::Float64,
            (_, FieldType::Bool) => DataType::Boolean,
            (_, FieldType::Timestamp) => timestamp_type(),
            (_, FieldType::StringList) => {
                DataType::List(Arc::new(Field::new("item", DataType::Utf8, true)))
            }
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SchemaFile {
    stream: String,
    version: u32,
    description: String,
    field: Vec<FieldSpec>,
    #[serde(default)]
    consent_gate: Vec<ConsentGate>,
}

/// The fields every stream must carry, with the type they must have.
const ENVELOPE: [(&str, FieldType); 3] = [
    (VIN_FIELD, FieldType::String),
    (TS_FIELD, FieldType::Timestamp),
    ("seq", FieldType::Int),
];
/// Name of the field carrying the VIN, which must match the topic.
pub const VIN_FIELD: &str = "vin";
/// Name of the vehicle timestamp field, which decides the partition.
pub const TS_FIELD: &str = "ts";
/// System column: when fleetgate received the record.
pub const RECEIVED_AT_COLUMN: &str = "received_at";
/// System column of tables with pseudonyms: the key epoch they were made in.
pub const KEY_EPOCH_COLUMN: &str = "key_epoch";

/// Arrow type of every stored timestamp: milliseconds, UTC.
pub fn timestamp_type() -> DataType {
    DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()))
}

/// Arrow schema of the dead-letter table.
pub fn dead_letter_arrow_schema() -> SchemaRef {
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

/// A validated stream schema with its derived Arrow schema.
#[derive(Debug)]
pub struct StreamSchema {
    pub stream: Stream,
    pub version: u32,
    pub description: String,
    pub fields: Vec<FieldSpec>,
    /// Index of the `vin` field in `fields`.
    pub vin_index: usize,
    /// Index of the `ts` field in `fields`.
    pub ts_index: usize,
    /// Records that need a consent.
    pub consent_gates: Vec<ConsentGate>,
    /// Whether rows carry a `key_epoch` column (the stream has pseudonyms).
    pub has_key_epoch: bool,
    /// Stored columns: the stored fields, then `key_epoch` (if any), then `received_at`.
    pub arrow: SchemaRef,
}

impl StreamSchema {
    fn load(stream: Stream, dir: Option<&std::path::Path>) -> Result<Self> {
        let (file, built_in) = source(stream);
        let text = match dir {
            Some(dir) => {
                let path = dir.join(file);
                std::fs::read_to_string(&path).map_err(|e| SchemaError::Stream {
                    stream: stream.name().to_owned(),
                    problem: format!("cannot read {}: {e}", path.display()),
                })?
            }
            None => built_in.to_owned(),
        };
        let parsed: SchemaFile = toml::from_str(&text).map_err(|source| SchemaError::Parse {
            file,
            source: Box::new(source),
        })?;
        Self::from_file(stream, parsed)
    }

    fn from_file(stream: Stream, file: SchemaFile) -> Result<Self> {
        let stream_err = |problem: String| SchemaError::Stream {
            stream: stream.name().to_owned(),
            problem,
        };
        if file.stream != stream.name() {
            return Err(stream_err(format!("declares stream {:?}", file.stream)));
        }
        let mut seen = std::collections::HashSet::new();
        for f in &file.field {
            check_field(stream, f)?;
            if !seen.insert(f.name.as_str())
                || (f.column.is_some() && !seen.insert(f.column_name()))
            {
                return Err(stream_err(format!("name {:?} is used twice", f.name)));
            }
        }
        let position = |name: &str, ty: FieldType| {
            file.field
                .iter()
                .position(|f| f.name == name && f.field_type == ty && f.required)
                .ok_or_else(|| stream_err(format!("needs a required {ty:?} field {name:?}")))
        };
        for (name, ty) in ENVELOPE {
            position(name, ty)?;
        }
        let vin_index = position(VIN_FIELD, FieldType::String)?;
        let ts_index = position(TS_FIELD, FieldType::Timestamp)?;

        for f in file.field.iter().filter(|f| f.transform == Transform::Trip) {
            let cycle = f.cycle_field.as_deref().unwrap_or_default();
            if !file
                .field
                .iter()
                .any(|c| c.name == cycle && c.field_type == FieldType::Int)
            {
                return Err(stream_err(format!(
                    "trip field {:?} needs cycle_field naming an int field, not {cycle:?}",
                    f.name
                )));
            }
        }
        for gate in &file.consent_gate {
            if !file.field.iter().any(|f| f.name == gate.field) {
                return Err(stream_err(format!(
                    "consent gate on unknown field {:?}",
                    gate.field
                )));
            }
            if !crate::core::consent::Consent::NAMES.contains(&gate.consent.as_str()) {
                return Err(stream_err(format!(
                    "consent gate needs unknown consent {:?}",
                    gate.consent
                )));
            }
        }
        let has_key_epoch = file
            .field
            .iter()
            .any(|f| f.transform == Transform::Pseudonym);
        let mut columns: Vec<Field> = file
            .field
            .iter()
            .filter(|f| f.is_stored())
            .map(|f| Field::new(f.column_name(), f.stored_type(), !f.required))
            .collect();
        if has_key_epoch {
            columns.push(Field::new(KEY_EPOCH_COLUMN, DataType::Int32, false));
        }
        columns.push(Field::new(RECEIVED_AT_COLUMN, timestamp_type(), false));
        Ok(Self {
            stream,
            version: file.version,
            description: file.description,
            fields: file.field,
            vin_index,
            ts_index,
            consent_gates: file.consent_gate,
            has_key_epoch,
            arrow: Arc::new(Schema::new(columns)),
        })
    }
}

impl StreamSchema {
    fn consent_gate_lines(&self) -> Vec<String> {
        let mut lines: Vec<String> = self
            .consent_gates
            .iter()
            .map(|g| {
                format!(
                    "Records with `{} = {}` are stored only with the `{}` consent ({}).\n",
                    g.field, g.equals, g.consent, g.seed
                )
            })
            .collect();
        if !lines.is_empty() {
            lines.insert(0, "\n".to_owned());
        }
        lines
    }
}

/// The privacy rules every field must satisfy before the server starts.
fn check_field(stream: Stream, f: &FieldSpec) -> Result<()> {
    let problem = |problem: &str| {
        Err(SchemaError::Field {
            stream: stream.name().to_owned(),
            field: f.name.clone(),
            problem: problem.to_owned(),
        })
    };
    if f.privacy == PrivacyClass::DirectIdentifier
        && matches!(f.transform, Transform::Keep | Transform::Coarsen)
    {
        return problem(
            "a direct identifier must be pseudonymised, encrypted, replaced by a trip id or dropped",
        );
    }
    if matches!(
        f.transform,
        Transform::Pseudonym | Transform::Encrypt | Transform::Trip
    ) && f.field_type != FieldType::String
    {
        return problem(
            "only string fields can be pseudonymised, encrypted or replaced by a trip id",
        );
    }
    if f.transform == Transform::Trip && f.name != VIN_FIELD {
        return problem("only the vin can be replaced by a trip id");
    }
    match (f.transform, f.field_type) {
        (Transform::Coarsen, FieldType::Float) if f.decimals.is_none() => {
            return problem("a coarsened float needs decimals");
        }
        (Transform::Coarsen, FieldType::Timestamp) if f.coarsen_to.is_none() => {
            return problem("a coarsened timestamp needs coarsen_to");
        }
        (Transform::Coarsen, FieldType::Float | FieldType::Timestamp) => {}
        (Transform::Coarsen, _) => return problem("only floats and timestamps can be coarsened"),
        _ => {}
    }
    if f.domain.is_some() && f.transform != Transform::Pseudonym {
        return problem("domain is only for pseudonym fields");
    }
    if f.name == RECEIVED_AT_COLUMN || f.column.as_deref() == Some(RECEIVED_AT_COLUMN) {
        return problem("received_at is a system column");
    }
    if f.allowed.is_some() && f.field_type != FieldType::String {
        return problem("allowed values are only for string fields");
    }
    if (f.min.is_some() || f.max.is_some())
        && !matches!(f.field_type, FieldType::Int | FieldType::Float)
    {
        return problem("min/max are only for numeric fields");
    }
    if f.description.trim().is_empty() {
        return problem("needs a description");
    }
    Ok(())
}

/// All stream schemas, loaded once at start-up.
#[derive(Debug)]
pub struct Registry {
    streams: Vec<StreamSchema>,
}

impl Registry {
    /// Loads and checks every schema compiled into the binary.
    pub fn load() -> Result<Arc<Registry>> {
        Self::load_from(None)
    }

    /// Loads and checks the schemas in `dir`, or the built-in ones.
    pub fn load_from(dir: Option<&std::path::Path>) -> Result<Arc<Registry>> {
        let streams = Stream::ALL
            .into_iter()
            .map(|s| StreamSchema::load(s, dir))
            .collect::<Result<Vec<_>>>()?;
        Ok(Arc::new(Registry { streams }))
    }

    pub fn get(&self, stream: Stream) -> &StreamSchema {
        &self.streams[stream.index()]
    }

    pub fn iter(&self) -> impl Iterator<Item = &StreamSchema> {
        self.streams.iter()
    }

    /// Every table of the store with its Arrow schema, in [`Table::all`]
    /// order: the streams, then the dead letters.
    pub fn tables(&self) -> impl Iterator<Item = (Table, SchemaRef)> + '_ {
        Table::all().map(|table| (table, self.table_schema(table)))
    }

    /// The Arrow schema of a table.
    pub fn table_schema(&self, table: Table) -> SchemaRef {
        match table {
            Table::Stream(stream) => self.get(stream).arrow.clone(),
            Table::DeadLetters => dead_letter_arrow_schema(),
        }
    }

    /// The field tables of every stream in Markdown, as the README shows them.
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        for s in &self.streams {
            out.push_str(&format!(
                "#### `{}` (schema version {})\n\n{}.\n\n",
                s.stream, s.version, s.description
            ));
            out.push_str(
                "| field | type | unit | required | privacy | stored as | description |\n",
            );
            out.push_str("|---|---|---|---|---|---|---|\n");
            for f in &s.fields {
                let stored = match f.transform {
                    Transform::Keep => format!("`{}`", f.column_name()),
                    Transform::Pseudonym => {
                        format!("`{}` (pseudonym, domain {})", f.column_name(), f.domain())
                    }
                    Transform::Coarsen => match (f.decimals, f.coarsen_to) {
                        (Some(d), _) => format!("`{}` (rounded to {d} decimals)", f.column_name()),
                        (_, Some(unit)) => {
                            format!("`{}` (truncated to the {unit:?})", f.column_name())
                                .to_lowercase()
                        }
                        _ => format!("`{}` (coarsened)", f.column_name()),
                    },
                    Transform::Encrypt => format!("`{}` (encrypted)", f.column_name()),
                    Transform::Trip => format!("`{}` (one per trip)", f.column_name()),
                    Transform::Drop => "not stored".to_owned(),
                };
                let mut ty = f.field_type.name().to_owned();
                if let Some(allowed) = &f.allowed {
                    ty = format!("one of {}", allowed.join(", "));
                }
                out.push_str(&format!(
                    "| `{}` | {} | {} | {} | {} | {} | {} |\n",
                    f.name,
                    ty,
                    f.unit.as_deref().unwrap_or(""),
                    if f.required { "yes" } else { "no" },
                    f.privacy.name(),
                    stored,
                    f.description.replace('|', "\\|")
                ));
            }
            for gate in &s.consent_gate_lines() {
                out.push_str(gate);
            }
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<StreamSchema> {
        let file: SchemaFile = toml::from_str(text).expect("test schema parses as TOML");
        StreamSchema::from_file(Stream::Rtti, file)
    }

    const ENVELOPE_TOML: &str = r#"
stream = "rtti"
version = 1
description = "test"
[[field]]
name = "vin"
type = "string"
required = true
privacy = "direct_identifier"
transform = "pseudonym"
column = "vehicle_id"
description = "vin"
[[field]]
name = "ts"
type = "timestamp"
required = true
privacy = "quasi_identifier"
transform = "keep"
description = "ts"
[[field]]
name = "seq"
type = "int"
required = true
privacy = "technical"
transform = "keep"
description = "seq"
"#;

    #[test]
    fn shipped_schemas_load() {
        let registry = Registry::load().expect("shipped schemas are valid");
        let rtti = registry.get(Stream::Rtti);
        assert_eq!(rtti.arrow.field(0).name(), "trip_id");
        for linkable in [
            "vin",
            "vehicle_id",
            "seq",
            "ignition_cycle",
            KEY_EPOCH_COLUMN,
        ] {
            assert!(
                rtti.arrow.field_with_name(linkable).is_err(),
                "rtti stores {linkable}"
            );
        }
        assert!(rtti.arrow.field_with_name(RECEIVED_AT_COLUMN).is_ok());
        let teleservice = registry.get(Stream::Teleservice);
        assert!(teleservice.arrow.field_with_name("contact_phone").is_err());
        let sealed = teleservice
            .arrow
            .field_with_name("contact_phone_encrypted")
            .expect("encrypted");
        assert_eq!(sealed.data_type(), &DataType::Binary);
        assert!(teleservice.arrow.field_with_name(KEY_EPOCH_COLUMN).is_ok());
        assert_eq!(teleservice.consent_gates.len(), 1);
    }

    #[test]
    fn readme_shows_the_schemas_as_they_are() {
        let readme = include_str!("../README.md");
        let begin = "<!-- schema:begin (generated by `fleetgate schema`) -->\n";
        let end = "<!-- schema:end -->";
        let start = readme.find(begin).expect("README has the schema section") + begin.len();
        let stop = readme[start..].find(end).expect("schema section ends") + start;
        let generated = Registry::load().expect("schemas").markdown();
        assert!(
            readme[start..stop] == generated,
            "README schema section is stale: run `fleetgate schema` and paste its output"
        );
    }

    #[test]
    fn direct_identifier_kept_in_clear_is_refused() {
        let text = format!(
            "{ENVELOPE_TOML}[[field]]\nname = \"owner_email\"\ntype = \"string\"\nrequired = false\n\
             privacy = \"direct_identifier\"\ntransform = \"keep\"\ndescription = \"x\"\n"
        );
        let err = parse(&text).expect_err("must refuse");
        assert!(err.to_string().contains("owner_email"), "{err}");
    }

    #[test]
    fn field_without_policy_is_a_parse_error_naming_it() {
        let text = format!(
            "{ENVELOPE_TOML}[[field]]\nname = \"odometer\"\ntype = \"int\"\nrequired = false\n\
             description = \"x\"\n"
        );
        let file: std::result::Result<SchemaFile, _> = toml::from_str(&text);
        let err = file.expect_err("privacy and transform are required");
        assert!(err.to_string().contains("missing field `privacy`"), "{err}");
    }

    #[test]
    fn envelope_fields_are_required() {
        let text = ENVELOPE_TOML.replace("name = \"seq\"", "name = \"sequence\"");
        let err = parse(&text).expect_err("seq missing");
        assert!(err.to_string().contains("seq"), "{err}");
    }

    #[test]
    fn duplicate_names_are_refused() {
        let text = format!(
            "{ENVELOPE_TOML}[[field]]\nname = \"vehicle_id\"\ntype = \"string\"\nrequired = false\n\
             privacy = \"technical\"\ntransform = \"keep\"\ndescription = \"x\"\n"
        );
        assert!(parse(&text).is_err());
    }
}
