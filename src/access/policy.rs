//! The policy as a plan rewrite: for one principal and purpose, a
//! DataFusion session whose every table is a view written for them (for a
//! query, only the tables it names: [`tables_named`]). The
//! Parquet files are registered only in a second, private session that
//! plans those views; the principal's session holds the views and nothing
//! else: no file, no listing table, no function that decrypts. Whatever SQL
//! the principal writes (joins, subqueries, CTEs, UNION, information_schema)
//! can only ever reach rows and columns its views expose, and each view is
//! planned apart from the principal's query ([`super::barrier`]), so its
//! expressions (and their errors) only ever see rows of the view.
//!
//! | principal   | stream tables                                                     | dead_letters, query_audit |
//! |-------------|-------------------------------------------------------------------|---------------------------|
//! | operator    | all rows, internal pseudonyms; encrypted fields NULL unless the purpose reveals them | all rows |
//! | user        | own vehicles, own tenure only; VIN and encrypted fields readable; no RTTI | hidden |
//! | third party | granted vehicles, streams, period and purpose only; pseudonyms of the recipient's domain; encrypted fields NULL; role limits (below) | hidden |
//! | licensee    | aggregates per hour and category, groups of at least k vehicles (RTTI: by the vehicle bucket of its trip ids); no row, no identifier | hidden |
//!
//! Role limits: a service partner sees maintenance needs only; a remote
//! charge management provider sees remote-managed sessions only.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};

use arrow::array::{Array, AsArray, StringBuilder};
use arrow::datatypes::{DataType, Int32Type};
use datafusion::datasource::empty::EmptyTable;
use datafusion::execution::cache::cache_manager::CacheManagerConfig;
use datafusion::execution::disk_manager::{DiskManagerBuilder, DiskManagerMode};
use datafusion::execution::memory_pool::GreedyMemoryPool;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::execution::session_state::{SessionState, SessionStateBuilder};
use datafusion::logical_expr::{ColumnarValue, Volatility, create_udf};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::prelude::{SessionConfig, SessionContext};
use datafusion::sql::parser::Statement;
use datafusion::sql::sqlparser::ast::Statement as SqlStatement;

use super::barrier::{BarrierExec, PolicyView};
use super::purpose::Purpose;
use super::registry::{AccessRegistry, Period, Principal, PrincipalKind, Role, earlier_end};
use super::{AccessError, Result, audit};
use crate::core::table::Table;
use crate::lifecycle::requests::{sql_identifier, sql_literal};
use crate::lifecycle::retention::{Retention, VisibleRows};
use crate::privacy::pseudo::{KeyRing, Secret, vehicle_pseudonym};
use crate::privacy::stage::{PrivacyShared, TRIP_GENERATION_HEX, TRIP_VEHICLE_HEX, decrypt};
use crate::privacy::vault::VehicleKeys;
use crate::query::{
    PartitionGroups, RowCountsFromLog, earliest_rows, empty_table, portable_table, stored_table,
};
use crate::schema::{
    FieldSpec, FieldType, INTERNAL_DOMAIN, KEY_EPOCH_COLUMN, PrivacyClass, Registry, StreamSchema,
    Transform,
};
use crate::store::Snapshots;
use crate::store::delta::{self, PARTITION_COLUMNS};

/// What a principal's view does to a table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Treatment {
    /// Every row and column as stored (pseudonymised).
    Allow,
    /// Every row; some columns masked.
    Mask,
    /// Only some rows (and maybe some columns masked or re-pseudonymised).
    Filter,
    /// Only aggregates over groups of at least k vehicles.
    Aggregate,
}

impl Treatment {
    pub fn name(self) -> &'static str {
        match self {
            Treatment::Allow => "allow",
            Treatment::Mask => "mask",
            Treatment::Filter => "filter",
            Treatment::Aggregate => "aggregate",
        }
    }
}

/// The teleservice columns a service partner sees: maintenance needs (L2286-2287).
const SERVICE_PARTNER_COLUMNS: [&str; 7] = [
    "vehicle_id",
    "ts",
    "trigger",
    "case_id",
    "mileage_km",
    "service_needs",
    "check_control_messages",
];

/// What the policy needs to know.
pub struct PolicyInputs<'a> {
    /// The tables, as this node keeps them between queries.
    pub tables: &'a Snapshots,
    pub schemas: &'a Registry,
    pub retention: &'a Retention,
    pub access: &'a AccessRegistry,
    /// The vault and keys; needed for every principal but the operator
    /// without a revealing purpose.
    pub privacy: Option<&'a PrivacyShared>,
    /// Query audit files, for the operator's `query_audit` table.
    pub audit_dir: &'a Path,
    pub audit_keep_ms: i64,
    /// Smallest number of distinct vehicles in a licensee's result group.
    pub min_group: u32,
    pub now_ms: i64,
    /// Bytes the session's operators (and its answer) may reserve; nothing spills.
    pub memory_limit: usize,
    /// Which tables the session holds.
    pub scope: Scope<'a>,
    /// The views are planned for a Ballista cluster (see
    /// [`super::distributed`]): over the tables' files, without the
    /// query audit, and only for principals whose views are plain SQL.
    pub distributed: bool,
}

/// Which tables a principal's session holds.
#[derive(Clone, Copy)]
pub enum Scope<'a> {
    /// Every table the principal may see.
    Every,
    /// The tables a statement names ([`tables_named`]), so that a query
    /// loads and plans no other table's view.
    Named(&'a BTreeSet<String>),
    /// The tables a live stream follows, over the versions it follows and
    /// the rows it has not seen instead of the stored tables; never the
    /// query audit.
    Live(&'a super::live::LiveTables<'a>),
}

impl Scope<'_> {
    /// Whether the session holds the table `name`.
    fn holds(&self, name: &str) -> bool {
        match self {
            Scope::Every => true,
            Scope::Named(named) => named.contains(name),
            Scope::Live(live) => live.follows(name) && name != audit::TABLE,
        }
    }
}

/// A principal's session: the views it may query, and why the others are hidden.
pub struct PolicySession {
    pub ctx: SessionContext,
    pub treatments: BTreeMap<String, Treatment>,
    pub hidden: BTreeMap<String, String>,
}

/// One table's view for the principal: the SELECT over the table's
/// retention-filtered rows, or why it is hidden.
enum View {
    Select {
        columns: Vec<String>,
        filter: Option<String>,
        group_by: Vec<String>,
        having: Option<String>,
        treatment: Treatment,
    },
    Hidden(String),
}

impl View {
    /// The view's definition over `table`, of whose rows `visible` (by
    /// retention) are those still visible.
    fn sql(&self, table: &str, visible: &VisibleRows) -> String {
        let View::Select {
            columns,
            filter,
            group_by,
            having,
            ..
        } = self
        else {
            return String::new();
        };
        let mut sql = visible.select(table, &columns.join(", "));
        if let Some(filter) = filter {
            sql.push_str(&format!(" AND ({filter})"));
        }
        if !group_by.is_empty() {
            sql.push_str(&format!(" GROUP BY {}", group_by.join(", ")));
        }
        if let Some(having) = having {
            sql.push_str(&format!(" HAVING {having}"));
        }
        sql
    }
}

fn hidden(reason: impl Into<String>) -> View {
    View::Hidden(reason.into())
}

/// The session `principal` gets for `purpose`.
pub async fn session(
    inputs: &PolicyInputs<'_>,
    principal: &Principal,
    purpose: &Purpose,
) -> Result<PolicySession> {
    if inputs.distributed {
        distributable(principal, purpose)?;
    }
    // A live step reads one window, while many streams step at once: on
    // one partition, so that no repartition buffers (and counts against the
    // memory bound) the window's raw rows, those the views hide included.
    let partitions = matches!(inputs.scope, Scope::Live(_)).then_some(1);
    let ctx = principal_context(
        inputs.memory_limit,
        inputs.tables.cache_config(),
        partitions,
    )?;
    let files = SessionContext::new_with_config(SessionConfig::new());
    let root = inputs.tables.root();
    let planner = ViewPlanner::new(inputs, principal, purpose)?;
    let mut treatments = BTreeMap::new();
    let mut hidden_tables = BTreeMap::new();
    for (table, arrow_schema) in inputs.schemas.tables() {
        let name = table.name();
        if !inputs.scope.holds(name) {
            continue;
        }
        let view = match table {
            Table::Stream(stream) => planner.stream_view(inputs.schemas.get(stream), &files)?,
            Table::DeadLetters => planner.operator_only(),
        };
        let treatment = match &view {
            View::Hidden(reason) => {
                hidden_tables.insert(name.to_owned(), reason.clone());
                continue;
            }
            View::Select { treatment, .. } => *treatment,
        };
        let stored = match inputs.scope {
            Scope::Live(live) => live.table(name, &files, &ctx).await?,
            _ if inputs.distributed => portable_table(root, name, &files).await?,
            _ => stored_table(inputs.tables, name, &[&files, &ctx]).await?,
        };
        let visible = inputs.retention.visible_rows(
            name,
            inputs.now_ms,
            principal.kind == PrincipalKind::Operator,
            stored
                .as_ref()
                .and_then(|stored| earliest_rows(stored.as_ref(), name))
                .as_ref(),
        );
        let sql = view.sql(name, &visible);
        match stored {
            Some(stored) => files.register_table(name, stored)?,
            None if inputs.distributed => files.register_table(
                name,
                Arc::new(EmptyTable::new(delta::table_schema(&arrow_schema))),
            )?,
            None => files.register_table(name, empty_table(&arrow_schema)?)?,
        };
        install(&files, &ctx, name, &sql).await?;
        treatments.insert(name.to_owned(), treatment);
    }
    match planner.operator_only() {
        _ if !inputs.scope.holds(audit::TABLE) => {}
        // The audit's files are on this node only.
        View::Select { .. } if inputs.distributed => {
            hidden_tables.insert(
                audit::TABLE.to_owned(),
                "the query audit is read on the node that keeps it, not on the cluster".into(),
            );
        }
        View::Hidden(reason) => {
            hidden_tables.insert(audit::TABLE.to_owned(), reason);
        }
        View::Select { .. } => {
            let since = inputs.now_ms - inputs.audit_keep_ms;
            files.register_table(audit::TABLE, audit::table(inputs.audit_dir, since)?)?;
            let sql = format!(
                "SELECT * FROM {} WHERE at >= to_timestamp_millis({since})",
                audit::TABLE
            );
            install(&files, &ctx, audit::TABLE, &sql).await?;
            treatments.insert(audit::TABLE.to_owned(), Treatment::Allow);
        }
    }
    Ok(PolicySession {
        ctx,
        treatments,
        hidden: hidden_tables,
    })
}

/// Whether `principal`'s views for `purpose` can be planned on a cluster:
/// the operator's and a licensee's are SQL over the tables; a user's and a
/// third party's name VINs and pseudonyms of their own, and a revealing
/// purpose's decrypt with keys that stay on this node.
pub(super) fn distributable(principal: &Principal, purpose: &Purpose) -> Result<()> {
    if !matches!(
        principal.kind,
        PrincipalKind::Operator | PrincipalKind::Licensee
    ) {
        return Err(AccessError::Refused(format!(
            "distributed queries are for the operator and licensees; a {}'s views name its \
             vehicles and stay on this node: query without engine = ballista",
            principal.kind.name()
        )));
    }
    if !purpose.reveals.is_empty() {
        return Err(AccessError::Refused(format!(
            "purpose {} decrypts fields with keys that stay on this node: query it without \
             engine = ballista",
            purpose.name
        )));
    }
    Ok(())
}

/// Functions no principal's session has: table functions make rows out of
/// nothing (`generate_series(1, 4e9)`), and so do the array functions
/// `range` and `generate_series` with `unnest`; `repeat`, `lpad`, `rpad`,
/// `array_repeat` and `array_resize` make a string or an array as long as an
/// argument asks, outside the memory pool (`array_repeat(1, 2e9)` asks the
/// allocator for 16 GiB at once); and `input_file_name`, `file_row_index`
/// tell where a row sits among rows its view hides. Removing a function
/// removes its aliases (`list_repeat`, …).
const REMOVED_FUNCTIONS: [&str; 9] = [
    "repeat",
    "lpad",
    "rpad",
    "range",
    "generate_series",
    "array_repeat",
    "array_resize",
    "input_file_name",
    "file_row_index",
];

/// The configuration of every principal's session.
fn principal_config() -> SessionConfig {
    let mut config = SessionConfig::new().with_information_schema(true);
    config.options_mut().execution.enable_recursive_ctes = false;
    config
}

/// A state that parses statements as a principal's session does, before
/// that session is built.
pub fn parser() -> SessionState {
    SessionStateBuilder::new()
        .with_config(principal_config())
        .build()
}

/// The tables a plain query (`SELECT`, `WITH`, set operations) reads, by
/// name, for a session that holds those only; `None` for any other
/// statement (`SHOW`, `DESCRIBE`, `EXPLAIN`, ...) or a query that reads
/// another schema (`information_schema`), which need every table.
pub fn tables_named(
    parser: &SessionState,
    statement: &Statement,
) -> Result<Option<BTreeSet<String>>> {
    let Statement::Statement(statement_inner) = statement else {
        return Ok(None);
    };
    if !matches!(**statement_inner, SqlStatement::Query(_)) {
        return Ok(None);
    }
    let mut names = BTreeSet::new();
    for reference in parser.resolve_table_references(statement)? {
        if reference.schema().is_some_and(|s| s != "public") {
            return Ok(None);
        }
        names.insert(reference.table().to_owned());
    }
    Ok(Some(names))
}

/// The principal's own session: information_schema on, a memory pool of
/// `memory_limit` bytes with no spilling (a query may not fill the disk the
/// store writes to), the node's shared cache of Parquet footers (`cache`),
/// no recursive CTE (one can run forever), none of the functions in
/// [`REMOVED_FUNCTIONS`] nor any table function, and counts of whole views
/// read from the log through their barriers ([`RowCountsFromLog`]); on
/// `partitions` partitions if given, else one per core.
fn principal_context(
    memory_limit: usize,
    cache: CacheManagerConfig,
    partitions: Option<usize>,
) -> Result<SessionContext> {
    let runtime = RuntimeEnvBuilder::new()
        .with_memory_pool(Arc::new(GreedyMemoryPool::new(memory_limit)))
        .with_cache_manager(cache)
        .with_disk_manager_builder(
            DiskManagerBuilder::default().with_mode(DiskManagerMode::Disabled),
        )
        .build_arc()?;
    let mut config = principal_config();
    if let Some(partitions) = partitions {
        config = config.with_target_partitions(partitions);
    }
    let state = SessionStateBuilder::new()
        .with_config(config)
        .with_runtime_env(runtime)
        .with_default_features()
        .with_physical_optimizer_rule(Arc::new(RowCountsFromLog::new(is_barrier)))
        .with_physical_optimizer_rule(Arc::new(PartitionGroups::new(is_barrier)))
        .build();
    let ctx = SessionContext::new_with_state(state);
    let table_functions: Vec<String> = ctx.state().table_functions().keys().cloned().collect();
    for name in table_functions {
        ctx.deregister_udtf(&name);
    }
    for name in REMOVED_FUNCTIONS {
        ctx.deregister_udf(name);
    }
    Ok(ctx)
}

/// Whether `plan` is a view's barrier, which passes its input's rows.
fn is_barrier(plan: &dyn ExecutionPlan) -> bool {
    plan.is::<BarrierExec>()
}

/// Plans `sql` in the private session `files` and registers it in the
/// principal's session `ctx` as the view `name`, a [`PolicyView`]: never
/// inlined into the principal's query, so that the principal's expressions
/// see the view's rows only. No definition text: information_schema must
/// not show the pseudonyms and periods it filters on.
async fn install(
    files: &SessionContext,
    ctx: &SessionContext,
    name: &str,
    sql: &str,
) -> Result<()> {
    let plan = files.sql(sql).await?.into_unoptimized_plan();
    let table_columns: Vec<String> = files
        .table_provider(name)
        .await?
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    ctx.register_table(name, Arc::new(PolicyView::new(plan, &table_columns)))?;
    Ok(())
}

/// Writes each table's view for one principal and purpose.
struct ViewPlanner<'a> {
    inputs: &'a PolicyInputs<'a>,
    principal: &'a Principal,
    purpose: &'a Purpose,
    /// Users: their vehicles' VINs and keys, and the periods they held them.
    held: Vec<HeldVehicle>,
    /// Third parties: the keys of each vehicle a grant in force names.
    granted: HashMap<String, Option<VehicleKeys>>,
}

/// A vehicle a user held over some periods, with its current secrets.
struct HeldVehicle {
    vin: String,
    keys: VehicleKeys,
    periods: Vec<Period>,
}

impl<'a> ViewPlanner<'a> {
    fn new(
        inputs: &'a PolicyInputs<'a>,
        principal: &'a Principal,
        purpose: &'a Purpose,
    ) -> Result<Self> {
        // The vault is read once per vehicle here, not once per table.
        let mut held = Vec::new();
        let mut granted = HashMap::new();
        match principal.kind {
            PrincipalKind::User => {
                let privacy = inputs.privacy.ok_or(AccessError::VaultNeeded)?;
                for (vin, _) in inputs.access.vehicles_held(&principal.id) {
                    let Some(keys) = privacy.vault.get(&vin)? else {
                        continue;
                    };
                    // Only the tenures that can hold rows under the current secret.
                    let periods = inputs.access.held_periods_under(
                        &principal.id,
                        &vin,
                        i64::MIN,
                        None,
                        keys.created_ms,
                    );
                    if !periods.is_empty() {
                        held.push(HeldVehicle { keys, vin, periods });
                    }
                }
            }
            PrincipalKind::ThirdParty => {
                let privacy = inputs.privacy.ok_or(AccessError::VaultNeeded)?;
                for grant in inputs.access.grants_for(principal, inputs.now_ms) {
                    if !granted.contains_key(&grant.vin) {
                        granted.insert(grant.vin.clone(), privacy.vault.get(&grant.vin)?);
                    }
                }
            }
            PrincipalKind::Operator | PrincipalKind::Licensee => {}
        }
        Ok(Self {
            inputs,
            principal,
            purpose,
            held,
            granted,
        })
    }

    fn operator_only(&self) -> View {
        if self.principal.kind == PrincipalKind::Operator {
            // Every column but the WAL's: where a row came from in the log
            // is the store's business, in no view.
            let columns = crate::schema::dead_letter_arrow_schema()
                .fields()
                .iter()
                .map(|f| sql_identifier(f.name()))
                .chain(PARTITION_COLUMNS.map(str::to_owned))
                .collect();
            View::Select {
                columns,
                filter: None,
                group_by: Vec::new(),
                having: None,
                treatment: Treatment::Allow,
            }
        } else {
            hidden("open to the operator only")
        }
    }

    fn stream_view(&self, stream: &StreamSchema, files: &SessionContext) -> Result<View> {
        match self.principal.kind {
            PrincipalKind::Operator => self.operator_view(stream, files),
            PrincipalKind::User => self.user_view(stream, files),
            PrincipalKind::ThirdParty => self.third_party_view(stream),
            PrincipalKind::Licensee => Ok(self.licensee_view(stream)),
        }
    }

    fn operator_view(&self, stream: &StreamSchema, files: &SessionContext) -> Result<View> {
        let mut masked = false;
        let mut columns = Vec::new();
        for field in stream.fields.iter().filter(|f| f.is_stored()) {
            if field.transform == Transform::Encrypt {
                if self.purpose.reveals.contains(&field.name) {
                    let privacy = self.inputs.privacy.ok_or(AccessError::VaultNeeded)?;
                    let keys = DataKeys::new(privacy, privacy.vault.all_keys()?);
                    columns.push(reveal(files, field, keys));
                } else {
                    masked = true;
                    columns.push(masked_column(field));
                }
            } else {
                columns.push(sql_identifier(field.column_name()));
            }
        }
        columns.extend(system_columns(stream, true));
        Ok(View::Select {
            columns,
            filter: None,
            group_by: Vec::new(),
            having: None,
            treatment: if masked {
                Treatment::Mask
            } else {
                Treatment::Allow
            },
        })
    }

    fn user_view(&self, stream: &StreamSchema, files: &SessionContext) -> Result<View> {
        if !has_vehicle_id(stream) {
            return Ok(hidden(
                "RTTI rows carry no vehicle identifier (L2005): they cannot be attributed to a user",
            ));
        }
        let privacy = self.inputs.privacy.ok_or(AccessError::VaultNeeded)?;
        let mut vin_of = String::from("CASE");
        let mut clauses = Vec::new();
        for vehicle in &self.held {
            let ids: Vec<String> = self
                .epochs(&vehicle.periods, privacy)
                .map(|e| internal_id(privacy, &vehicle.keys, e))
                .collect();
            let ids = in_list(&ids);
            vin_of.push_str(&format!(
                " WHEN vehicle_id IN {ids} THEN {}",
                sql_text(&vehicle.vin)
            ));
            for period in &vehicle.periods {
                clauses.push(format!("(vehicle_id IN {ids} AND {})", ts_within(*period)));
            }
        }
        let keys = DataKeys::new(privacy, self.held.iter().map(|v| v.keys.clone()).collect());
        let mut columns = Vec::new();
        for field in stream.fields.iter().filter(|f| f.is_stored()) {
            columns.push(match field.transform {
                Transform::Pseudonym if field.column_name() == "vehicle_id" => {
                    format!("{} AS vin", end_case(&vin_of))
                }
                Transform::Encrypt => reveal(files, field, keys.clone()),
                _ => sql_identifier(field.column_name()),
            });
        }
        columns.extend(system_columns(stream, false));
        Ok(View::Select {
            columns,
            filter: Some(or_all(clauses)),
            group_by: Vec::new(),
            having: None,
            treatment: Treatment::Filter,
        })
    }

    fn third_party_view(&self, stream: &StreamSchema) -> Result<View> {
        let table = stream.stream.name();
        let role = self.principal.role.unwrap_or(Role::Other);
        if !role.streams().contains(&stream.stream) {
            return Ok(hidden(format!(
                "a recipient in role {} is never granted {table}",
                role.name()
            )));
        }
        let privacy = self.inputs.privacy.ok_or(AccessError::VaultNeeded)?;
        let domain = format!("recipient:{}", self.principal.id);
        let mut rename = String::from("CASE vehicle_id");
        let mut clauses = Vec::new();
        let grants = self
            .inputs
            .access
            .grants_for(self.principal, self.inputs.now_ms)
            .filter(|g| g.purpose == self.purpose.name && g.streams.iter().any(|s| s == table));
        for grant in grants {
            let until = earlier_end(grant.until_ms, grant.revoked_ms);
            let Some(Some(keys)) = self.granted.get(&grant.vin) else {
                continue;
            };
            let periods = self.inputs.access.held_periods_under(
                &grant.user,
                &grant.vin,
                grant.from_ms,
                until,
                keys.created_ms,
            );
            let mut ids = Vec::new();
            for epoch in self.epochs(&periods, privacy) {
                let internal = internal_id(privacy, keys, epoch);
                let theirs =
                    vehicle_pseudonym(&privacy.keys.domain_key(&domain, epoch), &keys.secret);
                rename.push_str(&format!(
                    " WHEN {} THEN {}",
                    sql_text(&internal),
                    sql_text(&theirs)
                ));
                ids.push(internal);
            }
            let ids = in_list(&ids);
            for period in periods {
                clauses.push(format!("(vehicle_id IN {ids} AND {})", ts_within(period)));
            }
        }
        if clauses.is_empty() {
            return Ok(hidden(format!(
                "no grant in force gives {} {table} for purpose {}",
                self.principal.id, self.purpose.name
            )));
        }
        let mut filter = or_all(clauses);
        if role == Role::RemoteChargeManagement {
            filter = format!("({filter}) AND coalesce(remote_managed, false)");
        }
        let mut columns = Vec::new();
        for field in stream.fields.iter().filter(|f| f.is_stored()) {
            let column = field.column_name();
            if role == Role::ServicePartner && !SERVICE_PARTNER_COLUMNS.contains(&column) {
                continue;
            }
            columns.push(match field.transform {
                Transform::Pseudonym if column == "vehicle_id" => {
                    format!("{} AS vehicle_id", end_case(&rename))
                }
                Transform::Encrypt => masked_column(field),
                _ => sql_identifier(column),
            });
        }
        columns.extend(system_columns(stream, false));
        Ok(View::Select {
            columns,
            filter: Some(filter),
            group_by: Vec::new(),
            having: None,
            treatment: Treatment::Filter,
        })
    }

    /// Aggregates only: per hour partition and category, the number of
    /// records and distinct vehicles and the mean of each technical measure;
    /// positions only as 0.1° cells; groups under k vehicles are left out.
    ///
    /// A stream without a vehicle identifier (RTTI) counts vehicles by the
    /// bucket its trip ids carry ([`crate::privacy::stage`]): distinct
    /// buckets among trip ids of one key generation are at most the number
    /// of vehicles, so a group must hold a single generation and at least k
    /// buckets. It also shows its number of trips.
    fn licensee_view(&self, stream: &StreamSchema) -> View {
        let k = self.inputs.min_group;
        let trip_column = stream
            .fields
            .iter()
            .find(|f| f.transform == Transform::Trip)
            .map(|f| sql_identifier(f.column_name()));
        let (mut measures, having) = match (&trip_column, has_vehicle_id(stream)) {
            (Some(trip), false) => {
                let vehicle = format!("substr({trip}, 1, {TRIP_VEHICLE_HEX})");
                let generation = format!("substr({trip}, 1, {TRIP_GENERATION_HEX})");
                (
                    vec![
                        "count(*) AS records".to_owned(),
                        format!("count(DISTINCT {vehicle}) AS vehicles"),
                        format!("count(DISTINCT {trip}) AS trips"),
                    ],
                    format!(
                        "count(DISTINCT {generation}) = 1 AND count(DISTINCT {vehicle}) >= {k}"
                    ),
                )
            }
            _ => (
                vec![
                    "count(*) AS records".to_owned(),
                    "count(DISTINCT vehicle_id) AS vehicles".to_owned(),
                ],
                format!("count(DISTINCT vehicle_id) >= {k}"),
            ),
        };
        let mut keys = vec!["date".to_owned(), "hour".to_owned()];
        let mut columns = keys.clone();
        for field in stream.fields.iter().filter(|f| f.is_stored()) {
            let column = sql_identifier(field.column_name());
            match (field.privacy, field.field_type) {
                (PrivacyClass::Technical, FieldType::String) if field.allowed.is_some() => {
                    keys.push(column.clone());
                    columns.push(column);
                }
                (PrivacyClass::Technical, FieldType::Bool) => {
                    keys.push(column.clone());
                    columns.push(column);
                }
                (PrivacyClass::Technical, FieldType::Int | FieldType::Float)
                    if field.name != "seq" =>
                {
                    measures.push(format!(
                        "avg({column}) AS {}",
                        sql_identifier(&format!("{}_avg", field.column_name()))
                    ));
                }
                (PrivacyClass::QuasiIdentifier, FieldType::Float)
                    if field.unit.as_deref() == Some("degree") =>
                {
                    let cell = format!("round({column}, 1)");
                    columns.push(format!(
                        "{cell} AS {}",
                        sql_identifier(&format!("{}_cell", field.column_name()))
                    ));
                    keys.push(cell);
                }
                _ => {}
            }
        }
        columns.extend(measures);
        View::Select {
            columns,
            filter: None,
            group_by: keys,
            having: Some(having),
            treatment: Treatment::Aggregate,
        }
    }

    /// Key epochs of rows written within `periods` (to now at the latest).
    fn epochs(
        &self,
        periods: &[Period],
        privacy: &PrivacyShared,
    ) -> impl Iterator<Item = i32> + use<> {
        let now = self.inputs.now_ms;
        let mut epochs: Vec<i32> = periods
            .iter()
            .flat_map(|(from, until)| {
                let last = until.unwrap_or(now).min(now);
                privacy.epoch((*from).max(0))..=privacy.epoch(last)
            })
            .collect();
        epochs.sort_unstable();
        epochs.dedup();
        epochs.into_iter()
    }
}

fn has_vehicle_id(stream: &StreamSchema) -> bool {
    stream
        .fields
        .iter()
        .any(|f| f.transform == Transform::Pseudonym && f.column_name() == "vehicle_id")
}

fn internal_id(privacy: &PrivacyShared, keys: &VehicleKeys, epoch: i32) -> String {
    vehicle_pseudonym(
        &privacy.keys.domain_key(INTERNAL_DOMAIN, epoch),
        &keys.secret,
    )
}

/// The system columns a principal sees: `key_epoch` for the operator only,
/// then `received_at` and the partition columns.
fn system_columns(stream: &StreamSchema, with_epoch: bool) -> Vec<String> {
    let mut columns = Vec::new();
    if with_epoch && stream.has_key_epoch {
        columns.push(KEY_EPOCH_COLUMN.to_owned());
    }
    columns.extend(["received_at", "date", "hour"].map(str::to_owned));
    columns
}

/// An encrypted field as a NULL text column under its field name.
fn masked_column(field: &FieldSpec) -> String {
    format!("CAST(NULL AS VARCHAR) AS {}", sql_identifier(&field.name))
}

fn sql_text(text: &str) -> String {
    sql_literal(&crate::lifecycle::requests::MatchValue::Text(
        text.to_owned(),
    ))
}

fn in_list(ids: &[String]) -> String {
    if ids.is_empty() {
        // Matches nothing; keeps the SQL valid.
        "(NULL)".to_owned()
    } else {
        sql_literal(&crate::lifecycle::requests::MatchValue::AnyOf(ids.to_vec()))
    }
}

fn ts_within((from, until): Period) -> String {
    let mut sql = format!("ts >= to_timestamp_millis({from})");
    if let Some(until) = until {
        sql.push_str(&format!(" AND ts < to_timestamp_millis({until})"));
    }
    sql
}

/// Closes a `CASE … WHEN …` expression; one without a branch is NULL.
fn end_case(case: &str) -> String {
    if case.contains(" WHEN ") {
        format!("{case} END")
    } else {
        "CAST(NULL AS VARCHAR)".to_owned()
    }
}

fn or_all(clauses: Vec<String>) -> String {
    if clauses.is_empty() {
        "false".to_owned()
    } else {
        clauses.join(" OR ")
    }
}

/// The data keys of some vehicles, found by a row's pseudonym and key epoch.
#[derive(Clone)]
struct DataKeys {
    shared: Arc<DataKeysInner>,
}

struct DataKeysInner {
    keys: KeyRing,
    vehicles: Vec<VehicleKeys>,
    by_epoch: Mutex<HashMap<i32, Arc<HashMap<String, Secret>>>>,
}

impl DataKeys {
    fn new(privacy: &PrivacyShared, vehicles: Vec<VehicleKeys>) -> Self {
        Self {
            shared: Arc::new(DataKeysInner {
                keys: privacy.keys.clone(),
                vehicles,
                by_epoch: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// The pseudonym → data key map of one epoch, computed on first use.
    fn of_epoch(&self, epoch: i32) -> Arc<HashMap<String, Secret>> {
        let inner = &self.shared;
        let mut cache = inner.by_epoch.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .entry(epoch)
            .or_insert_with(|| {
                let domain = inner.keys.domain_key(INTERNAL_DOMAIN, epoch);
                Arc::new(
                    inner
                        .vehicles
                        .iter()
                        .map(|v| (vehicle_pseudonym(&domain, &v.secret), v.data_key.clone()))
                        .collect(),
                )
            })
            .clone()
    }
}

/// `field` decrypted, through a function registered only in the private
/// session that plans the views: the principal cannot call it.
fn reveal(files: &SessionContext, field: &FieldSpec, keys: DataKeys) -> String {
    let name = format!("fleetgate_reveal_{}", field.name);
    let field_name = field.name.clone();
    let udf = create_udf(
        &name,
        vec![DataType::Utf8, DataType::Int32, DataType::Binary],
        DataType::Utf8,
        Volatility::Immutable,
        Arc::new(move |args: &[ColumnarValue]| {
            let arrays = ColumnarValue::values_to_arrays(args)?;
            let (ids, epochs, sealed) = (
                arrays[0].as_string::<i32>(),
                arrays[1].as_primitive::<Int32Type>(),
                arrays[2].as_binary::<i32>(),
            );
            let mut out = StringBuilder::with_capacity(ids.len(), ids.len() * 16);
            for row in 0..ids.len() {
                let clear = (!ids.is_null(row) && !epochs.is_null(row) && !sealed.is_null(row))
                    .then(|| keys.of_epoch(epochs.value(row)))
                    .and_then(|map| map.get(ids.value(row)).cloned())
                    .and_then(|key| decrypt(&key, &field_name, sealed.value(row)))
                    .and_then(|bytes| String::from_utf8(bytes).ok());
                out.append_option(clear);
            }
            Ok(ColumnarValue::Array(Arc::new(out.finish())))
        }),
    );
    files.register_udf(udf);
    format!(
        "{name}(vehicle_id, {KEY_EPOCH_COLUMN}, {}) AS {}",
        sql_identifier(field.column_name()),
        sql_identifier(&field.name)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tables a statement names, as the session for it holds them.
    fn named(sql: &str) -> Option<Vec<String>> {
        let parser = parser();
        let statement = parser
            .sql_to_statement(sql, &datafusion::common::config::Dialect::Generic)
            .expect("parses");
        tables_named(&parser, &statement)
            .expect("resolves")
            .map(|names| names.into_iter().collect())
    }

    #[test]
    fn a_query_names_the_tables_it_reads_and_other_statements_need_all() {
        let names = |list: &[&str]| Some(list.iter().map(|n| (*n).to_owned()).collect());
        assert_eq!(named("SELECT count(*) FROM rtti"), names(&["rtti"]));
        assert_eq!(
            named(
                "WITH c AS (SELECT * FROM charging) SELECT * FROM c JOIN teleservice t \
                 ON c.vin = t.vin WHERE c.seq IN (SELECT seq FROM diagnostics)"
            ),
            names(&["charging", "diagnostics", "teleservice"])
        );
        assert_eq!(
            named("SELECT * FROM datafusion.public.rtti"),
            names(&["rtti"])
        );
        assert_eq!(named("SELECT 1"), names(&[]));
        // A CTE named like a table hides the table from the query, not
        // the tables its body reads.
        assert_eq!(
            named("WITH rtti AS (SELECT * FROM charging) SELECT * FROM rtti"),
            names(&["charging"])
        );
        assert_eq!(
            named("WITH rtti AS (SELECT * FROM rtti) SELECT * FROM rtti"),
            names(&["rtti"])
        );
        for every in [
            "SHOW TABLES",
            "DESCRIBE rtti",
            "EXPLAIN SELECT * FROM rtti",
            "SELECT * FROM information_schema.tables",
            "SELECT * FROM rtti, information_schema.columns",
        ] {
            assert_eq!(named(every), None, "{every}");
        }
    }
}
