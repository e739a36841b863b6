//! The data dictionary (Data Act Art. 3(2), 4(1)): what fleetgate keeps of
//! each stream, generated from the stream schemas (`schemas/*.toml`) and
//! the retention rules (`schemas/retention.toml`) the pipeline and the
//! sweep run on, so that it cannot say something they do not do. Per
//! stream: every field a vehicle sends with its type, unit, bounds and
//! meaning, what it says about a person and what the pipeline does with it
//! before storing, the columns a reader sees, the consents some records
//! need, and each retention rule with the seed line it comes from. Served
//! at `GET /dictionary` and part of every export.

use serde_json::{Value, json};

use crate::core::table::DEAD_LETTERS;
use crate::lifecycle::retention::{Retention, Rule};
use crate::schema::{
    FieldSpec, KEY_EPOCH_COLUMN, RECEIVED_AT_COLUMN, Registry, StreamSchema, Transform,
};
use crate::store::delta::{PARTITION_COLUMNS, WAL_COLUMNS};

/// Version of the dictionary's own layout, raised when a key changes meaning.
pub const LAYOUT_VERSION: u32 = 1;

/// Whether a table is offered live, and to whom.
const LIVE: &str = "yes: GET /live, through the same view as SQL; a licensee's hourly \
                    aggregates once each hour has closed";

/// The dictionary of every table, as one JSON document.
pub fn build(schemas: &Registry, retention: &Retention) -> Value {
    let mut tables: Vec<Value> = schemas
        .iter()
        .map(|stream| stream_entry(stream, retention))
        .collect();
    tables.push(dead_letters_entry(retention));
    json!({
        "dictionary": "fleetgate data dictionary (EU Data Act Art. 3(2), 4(1))",
        "layout_version": LAYOUT_VERSION,
        "fleetgate_version": env!("CARGO_PKG_VERSION"),
        "generated_from": ["schemas/*.toml", "schemas/retention.toml"],
        "access": {
            "sql": "POST /sql and Arrow Flight SQL, through the principal's view",
            "live": "GET /live: rows as they are committed, through the same view as SQL",
            "export": "GET /export: a user's data of the periods they held each vehicle",
        },
        "tables": tables,
    })
}

fn stream_entry(stream: &StreamSchema, retention: &Retention) -> Value {
    let name = stream.stream.name();
    let fields: Vec<Value> = stream
        .fields
        .iter()
        .map(|field| field_entry(stream, field))
        .collect();
    let mut columns: Vec<Value> = Vec::new();
    if stream.has_key_epoch {
        columns.push(system_column(
            KEY_EPOCH_COLUMN,
            "Int32",
            "The vehicle key epoch the row's pseudonyms were made in (a new epoch after an \
             erasure makes the old pseudonyms unlinkable)",
        ));
    }
    columns.extend(common_columns());
    let gates: Vec<Value> = stream
        .consent_gates
        .iter()
        .map(|gate| {
            json!({
                "records": format!("{} = {}", gate.field, gate.equals),
                "consent": gate.consent,
                "without_it": "not stored: dead-lettered with reason `consent`",
                "seed": gate.seed,
            })
        })
        .collect();
    json!({
        "name": name,
        "kind": "stream",
        "schema_version": stream.version,
        "description": stream.description,
        "live": LIVE,
        "fields": fields,
        "system_columns": columns,
        "consent_gates": gates,
        "retention": rules_of(retention, name),
    })
}

/// One field as sent, and what becomes of it.
fn field_entry(stream: &StreamSchema, field: &FieldSpec) -> Value {
    let stored = field.is_stored().then(|| {
        let column = field.column_name();
        let data_type = stream
            .arrow
            .field_with_name(column)
            .map(|f| f.data_type().to_string())
            .unwrap_or_default();
        json!({ "column": column, "type": data_type })
    });
    json!({
        "name": field.name,
        "type": field.field_type.name(),
        "required": field.required,
        "unit": field.unit,
        "min": field.min,
        "max": field.max,
        "max_len": matches!(field.field_type, crate::schema::FieldType::String)
            .then(|| field.max_len()),
        "allowed": field.allowed,
        "description": field.description,
        "privacy": field.privacy.name(),
        "treatment": field.transform.name(),
        "treatment_explained": treatment_text(field),
        "stored_as": stored,
    })
}

/// What the pipeline does with `field`, in words.
fn treatment_text(field: &FieldSpec) -> String {
    match field.transform {
        Transform::Keep => "stored as sent (after validation)".to_owned(),
        Transform::Drop => "validated, then never stored".to_owned(),
        Transform::Pseudonym => format!(
            "stored only as a keyed pseudonym (HMAC-SHA-256 with the vehicle's secret) in \
             domain `{}`; an erasure deletes the secret",
            field.domain()
        ),
        Transform::Coarsen => match (field.decimals, field.coarsen_to) {
            (Some(decimals), _) => format!("rounded to {decimals} decimal places"),
            (None, Some(unit)) => format!("truncated to the {unit:?}").to_lowercase(),
            (None, None) => "coarsened".to_owned(),
        },
        Transform::Encrypt => "encrypted with the vehicle's data key (ChaCha20-Poly1305); \
                               readable only where a rule reveals it, unreadable once the key \
                               is erased"
            .to_owned(),
        Transform::Trip => format!(
            "the VIN is replaced by a trip id that changes with every ignition cycle (`{}`), \
             after `privacy.max_trip_minutes` and at every UTC hour",
            field.cycle_field.as_deref().unwrap_or("cycle")
        ),
    }
}

/// The columns every table has besides its fields.
fn common_columns() -> Vec<Value> {
    vec![
        system_column(
            RECEIVED_AT_COLUMN,
            "Timestamp(ms, UTC)",
            "When fleetgate received the record",
        ),
        system_column(
            WAL_COLUMNS[0],
            "Utf8",
            "Internal: the write-ahead log shard that held the row (in no view)",
        ),
        system_column(
            WAL_COLUMNS[1],
            "Int64",
            "Internal: the write-ahead log entry that held the row (in no view)",
        ),
        system_column(
            PARTITION_COLUMNS[0],
            "Date32",
            "Partition: UTC date of the row's time",
        ),
        system_column(
            PARTITION_COLUMNS[1],
            "Int32",
            "Partition: UTC hour of the row's time",
        ),
    ]
}

fn system_column(name: &str, data_type: &str, description: &str) -> Value {
    json!({ "column": name, "type": data_type, "description": description })
}

fn dead_letters_entry(retention: &Retention) -> Value {
    let columns: Vec<Value> = crate::schema::dead_letter_arrow_schema()
        .fields()
        .iter()
        .map(|f| json!({ "column": f.name(), "type": f.data_type().to_string() }))
        .chain(common_columns().into_iter().skip(1))
        .collect();
    json!({
        "name": DEAD_LETTERS,
        "kind": "dead_letters",
        "description": "Records that could not be stored, with the reason; identifiers in \
                        the payload are pseudonymised or cut before it is written. Operator only.",
        "live": LIVE,
        "columns": columns,
        "retention": rules_of(retention, DEAD_LETTERS),
    })
}

/// The rules of `table`, in the order they are tried.
fn rules_of(retention: &Retention, table: &str) -> Vec<Value> {
    retention
        .rules()
        .filter(|rule| rule.table == table)
        .map(rule_entry)
        .collect()
}

fn rule_entry(rule: &Rule) -> Value {
    json!({
        "rule": rule.name,
        "applies_to": rule.when.as_ref().map_or_else(
            || "every other row".to_owned(),
            |w| format!("{} = {}", w.field, match_text(&w.equals)),
        ),
        "keep_days": rule.keep_days,
        "keep_hours": rule.keep_hours,
        "keep_ms": rule.keep_ms(),
        "counted_from": crate::lifecycle::retention::time_column(&rule.table),
        "seed": rule.seed,
        "choice": rule.choice,
    })
}

fn match_text(value: &crate::lifecycle::requests::MatchValue) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_table_has_its_rules_and_every_field() {
        let schemas = Registry::load().expect("schemas");
        let retention = Retention::load(None, &schemas).expect("retention");
        let dictionary = build(&schemas, &retention);
        let tables = dictionary["tables"].as_array().expect("tables");
        assert_eq!(tables.len(), 5);
        for table in tables {
            let rules = table["retention"].as_array().expect("rules");
            assert!(!rules.is_empty(), "{}", table["name"]);
            // The last rule covers every row no earlier rule covers.
            assert_eq!(
                rules.last().expect("a rule")["applies_to"],
                "every other row"
            );
        }
    }
}
