//! Policy: what the Data Act policy adds to planning a query.
//!
//! Input: the store of the `query` bench (50,000 diagnostics rows of 1,000
//! vehicles, 200,000 RTTI rows). Each iteration builds a session and plans
//! (logical and physical) one statement, executing nothing: first with no
//! policy (the storage-level retention views), then as the operator, as a
//! user holding 10 vehicles, and as a third party with grants on 10
//! vehicles. The difference is the policy's planning cost per query.

mod common;

use criterion::{Criterion, criterion_group, criterion_main};
use fleetgate::access::policy::{self, PolicyInputs, Scope};
use fleetgate::access::purpose::Purposes;
use fleetgate::access::registry::{
    AccessRegistry, GrantRequest, PrincipalKind, Role, new_principal,
};
use fleetgate::lifecycle::retention::Retention;
use fleetgate::schema::Registry;

const DAY_MS: i64 = 86_400_000;

const SIMPLE: &str = "SELECT count(*) FROM diagnostics WHERE severity = 'warning'";
const COMPLEX: &str = "WITH w AS (SELECT ecu, date_trunc('day', ts) AS day, count(*) AS n \
    FROM diagnostics WHERE severity <> 'info' GROUP BY 1, 2) \
    SELECT w.ecu, avg(w.n) AS mean, max(d.odometer_km) AS km FROM w JOIN diagnostics d ON d.ecu = w.ecu \
    WHERE d.ts > (SELECT min(ts) FROM diagnostics) GROUP BY w.ecu \
    UNION ALL SELECT 'all', 0.0, max(odometer_km) FROM diagnostics";

fn access_registry(now_ms: i64) -> AccessRegistry {
    let mut access = AccessRegistry::default();
    for (id, kind, role) in [
        ("alice", PrincipalKind::User, None),
        (
            "repair",
            PrincipalKind::ThirdParty,
            Some(Role::IndependentRepair),
        ),
    ] {
        let eea = kind == PrincipalKind::ThirdParty;
        let (principal, _) = new_principal(id, kind, role, eea, false, 0).expect("principal");
        access.add_principal(principal).expect("add");
    }
    for vehicle in 0..10 {
        let vin = common::vin(vehicle);
        access
            .transfer("alice", &vin, now_ms - 60 * DAY_MS)
            .expect("transfer");
        let grant = GrantRequest {
            user: "alice".into(),
            recipient: "repair".into(),
            vin,
            streams: vec!["diagnostics".into()],
            purpose: "repair_and_maintenance".into(),
            from_ms: Some(now_ms - 30 * DAY_MS),
            until_ms: None,
        };
        access.grant(grant, |_| Ok(()), now_ms).expect("grant");
    }
    access
}

fn policy(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut fixture = common::privacy();
    common::write_store(dir.path(), &mut fixture);
    let now_ms = common::T0_MS + DAY_MS;
    let schemas = Registry::load().expect("schemas");
    let retention = Retention::load(None, &schemas).expect("rules");
    let access = access_registry(now_ms);
    let purposes = Purposes::built_in().expect("purposes");
    let tables = fleetgate::store::Snapshots::new(
        fleetgate::store::StoreRoot::local(dir.path()).expect("store root"),
    );
    let inputs = PolicyInputs {
        tables: &tables,
        schemas: &schemas,
        retention: &retention,
        access: &access,
        privacy: Some(&fixture.shared),
        audit_dir: &dir.path().join("audit"),
        audit_keep_ms: 365 * DAY_MS,
        min_group: 5,
        now_ms,
        memory_limit: 256 << 20,
        scope: Scope::Every,
        distributed: false,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .expect("runtime");
    let mut group = c.benchmark_group("policy");
    for (query, sql) in [("simple", SIMPLE), ("complex", COMPLEX)] {
        group.bench_function(format!("{query}/no_policy"), |b| {
            b.iter(|| {
                rt.block_on(async {
                    let ctx = fleetgate::query::session_over(&tables, &schemas, &retention, now_ms)
                        .await
                        .expect("session");
                    ctx.sql(sql)
                        .await
                        .expect("plan")
                        .create_physical_plan()
                        .await
                        .expect("physical plan")
                })
            })
        });
        for (who, purpose) in [
            ("operator", "operations"),
            ("alice", "own_data_access"),
            ("repair", "repair_and_maintenance"),
        ] {
            let principal = access.principal(who).expect("principal");
            let purpose = purposes.check(purpose, principal.kind).expect("purpose");
            group.bench_function(format!("{query}/{}", principal.kind.name()), |b| {
                b.iter(|| {
                    rt.block_on(async {
                        let session = policy::session(&inputs, &principal, purpose)
                            .await
                            .expect("session");
                        session
                            .ctx
                            .sql(sql)
                            .await
                            .expect("plan")
                            .create_physical_plan()
                            .await
                            .expect("physical plan")
                    })
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, policy);
criterion_main!(benches);
