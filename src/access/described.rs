//! Plans a description made, kept for the run that follows it.
//!
//! A Flight SQL client describes a statement before it fetches the answer
//! (GetFlightInfo, then DoGet), and each would plan the statement over the
//! principal's views: planning is a good part of what a small query costs.
//! The physical plan a description made is kept for the next run of the same
//! statement by the same principal (same id and token) for the same purpose,
//! once, if that run starts within [`KEPT_FOR`] of the description's start;
//! a run after that, or of anything else, plans anew. So an answer may run
//! on views planned up to that long before: the rows, views and grants of
//! that moment, as a query already running sees. This node's changes to the
//! access registry and its vehicle events drop every kept plan at once
//! ([`DescribedPlans::clear`]), and so does each maintenance tick.
//!
//! A kept plan holds what planning read (file listings, a user's vehicle
//! keys): a timer drops it when its time is up, at most [`MOST_KEPT`] wait
//! ([`PER_PRINCIPAL`] of one principal), and a plan that reads the query
//! audit is not kept.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use datafusion::execution::TaskContext;
use datafusion::physical_plan::ExecutionPlan;

use super::registry::Principal;

/// How long after its description starts a plan may begin to run.
pub(super) const KEPT_FOR: Duration = Duration::from_secs(1);

/// How many described plans wait at most; the oldest go first.
const MOST_KEPT: usize = 64;

/// How many of them may be one principal's.
const PER_PRINCIPAL: usize = 4;

/// A planned statement, ready to run.
pub(super) struct Reusable {
    pub(super) plan: Arc<dyn ExecutionPlan>,
    /// The principal's session it was planned in, as its tasks run.
    pub(super) task: Arc<TaskContext>,
    /// `table:treatment` of every view it reads, for the audit.
    pub(super) treatments: String,
    /// The tables it names, for the audit.
    pub(super) tables: Vec<String>,
}

/// Who asked for which statement, for what.
#[derive(PartialEq, Eq)]
struct Key {
    principal: String,
    token_sha256: String,
    purpose: String,
    sql: String,
}

impl Key {
    fn of(principal: &Principal, purpose: &str, sql: &str) -> Self {
        Self {
            principal: principal.id.clone(),
            token_sha256: principal.token_sha256.clone(),
            purpose: purpose.to_owned(),
            sql: sql.to_owned(),
        }
    }
}

/// A kept plan, and when its description started.
struct Waiting {
    key: Key,
    since: Instant,
    plan: Reusable,
}

/// The described plans waiting for their run.
pub(super) struct DescribedPlans {
    kept_for: Duration,
    waiting: Mutex<Vec<Waiting>>,
}

impl DescribedPlans {
    /// Plans kept for [`KEPT_FOR`], or shorter: a kept plan's files must
    /// outlive its whole run, so the time by which `vacuum_grace_ms` (how
    /// long a deleted file stays) exceeds `query_timeout_ms` (how long a
    /// run lasts) bounds it (zero: no plan is kept).
    pub(super) fn for_config(vacuum_grace_ms: i64, query_timeout_ms: u64) -> Self {
        let slack = u64::try_from(vacuum_grace_ms)
            .unwrap_or(0)
            .saturating_sub(query_timeout_ms);
        Self::keeping_for(Duration::from_millis(slack).min(KEPT_FOR))
    }

    fn keeping_for(kept_for: Duration) -> Self {
        Self {
            kept_for,
            waiting: Mutex::new(Vec::new()),
        }
    }

    /// Keeps `plan`, which `principal` described for `purpose`, starting at
    /// `since`.
    pub(super) fn keep(
        self: &Arc<Self>,
        principal: &Principal,
        purpose: &str,
        sql: &str,
        since: Instant,
        plan: Reusable,
    ) {
        if self.kept_for.is_zero() || plan.tables.iter().any(|t| t == super::audit::TABLE) {
            return;
        }
        let key = Key::of(principal, purpose, sql);
        let mut dropped = Vec::new();
        {
            let mut waiting = self.lock();
            dropped.extend(self.expire(&mut waiting));
            let mine = waiting
                .iter()
                .filter(|w| w.key.principal == key.principal)
                .count();
            if mine >= PER_PRINCIPAL
                && let Some(oldest) = waiting
                    .iter()
                    .position(|w| w.key.principal == key.principal)
            {
                dropped.push(waiting.remove(oldest));
            }
            if waiting.len() >= MOST_KEPT {
                dropped.push(waiting.remove(0));
            }
            waiting.push(Waiting { key, since, plan });
        }
        drop(dropped);
        // Gone when its time is up, whether or not anything else comes.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let plans = Arc::downgrade(self);
            let left = self.kept_for.saturating_sub(since.elapsed());
            runtime.spawn(async move {
                tokio::time::sleep(left).await;
                if let Some(plans) = plans.upgrade() {
                    let expired = plans.expire(&mut plans.lock());
                    drop(expired);
                }
            });
        }
    }

    /// The plan `principal` described of `sql` for `purpose` most recently,
    /// if it may still run; it is then no longer kept.
    pub(super) fn take(&self, principal: &Principal, purpose: &str, sql: &str) -> Option<Reusable> {
        let key = Key::of(principal, purpose, sql);
        let (expired, found) = {
            let mut waiting = self.lock();
            let expired = self.expire(&mut waiting);
            let found = waiting
                .iter()
                .rposition(|w| w.key == key)
                .map(|at| waiting.remove(at).plan);
            (expired, found)
        };
        drop(expired);
        found
    }

    /// Drops every kept plan.
    pub(super) fn clear(&self) {
        let all = std::mem::take(&mut *self.lock());
        drop(all);
    }

    /// Takes out the plans whose time is up, to be dropped by the caller
    /// once the lock is released.
    fn expire(&self, waiting: &mut Vec<Waiting>) -> Vec<Waiting> {
        let (expired, kept) = std::mem::take(waiting)
            .into_iter()
            .partition(|w| w.since.elapsed() >= self.kept_for);
        *waiting = kept;
        expired
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Waiting>> {
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use datafusion::physical_plan::empty::EmptyExec;

    use super::*;
    use crate::access::registry::PrincipalKind;

    fn principal(id: &str, token_sha256: &str) -> Principal {
        Principal {
            id: id.into(),
            kind: PrincipalKind::User,
            token_sha256: token_sha256.into(),
            gatekeeper: false,
            role: None,
            eea: false,
            created_ms: 0,
        }
    }

    fn plan(tables: &[&str]) -> Reusable {
        Reusable {
            plan: Arc::new(EmptyExec::new(Arc::new(arrow::datatypes::Schema::empty()))),
            task: Arc::new(TaskContext::default()),
            treatments: String::new(),
            tables: tables.iter().map(|t| (*t).to_owned()).collect(),
        }
    }

    fn plans(kept_for: Duration) -> Arc<DescribedPlans> {
        Arc::new(DescribedPlans::keeping_for(kept_for))
    }

    /// A described plan goes to the same principal, with the same token,
    /// for the same purpose and statement, once; to no one else.
    #[test]
    fn a_described_plan_runs_once_for_whoever_described_it() {
        let plans = plans(Duration::from_secs(3600));
        let alice = principal("alice", "a1");
        let sql = "SELECT 1";
        plans.keep(&alice, "own_data_access", sql, Instant::now(), plan(&[]));
        assert!(
            plans
                .take(&principal("bob", "a1"), "own_data_access", sql)
                .is_none()
        );
        assert!(
            plans
                .take(&principal("alice", "a2"), "own_data_access", sql)
                .is_none()
        );
        assert!(plans.take(&alice, "operations", sql).is_none());
        assert!(plans.take(&alice, "own_data_access", "SELECT 2").is_none());
        assert!(plans.take(&alice, "own_data_access", sql).is_some());
        assert!(plans.take(&alice, "own_data_access", sql).is_none(), "once");
    }

    /// The bound is KEPT_FOR or what the vacuum grace leaves after a whole
    /// query; a plan whose description started longer ago does not run,
    /// none is kept where the bound is zero, nor one that reads the audit;
    /// a change drops them all.
    #[test]
    fn described_plans_wait_a_bounded_time_from_their_description() {
        let alice = principal("alice", "a1");
        assert_eq!(
            DescribedPlans::for_config(600_000, 30_000).kept_for,
            KEPT_FOR
        );
        let short = DescribedPlans::for_config(30_400, 30_000).kept_for;
        assert_eq!(short, Duration::from_millis(400));
        assert!(
            DescribedPlans::for_config(30_000, 30_000)
                .kept_for
                .is_zero()
        );
        let long = plans(Duration::from_secs(3600));
        long.keep(
            &alice,
            "p",
            "SELECT 1",
            Instant::now() - long.kept_for,
            plan(&[]),
        );
        assert!(
            long.take(&alice, "p", "SELECT 1").is_none(),
            "described too long ago"
        );
        let none = Arc::new(DescribedPlans::for_config(30_000, 30_000));
        none.keep(&alice, "p", "SELECT 1", Instant::now(), plan(&[]));
        assert!(none.take(&alice, "p", "SELECT 1").is_none());
        long.keep(
            &alice,
            "p",
            "SELECT a",
            Instant::now(),
            plan(&[super::super::audit::TABLE]),
        );
        assert!(
            long.take(&alice, "p", "SELECT a").is_none(),
            "reads the audit"
        );
        long.keep(&alice, "p", "SELECT 1", Instant::now(), plan(&[]));
        long.clear();
        assert!(long.take(&alice, "p", "SELECT 1").is_none(), "cleared");
    }

    /// At most PER_PRINCIPAL plans of one principal wait, and MOST_KEPT in
    /// all; the oldest go first.
    #[test]
    fn described_plans_wait_in_bounded_numbers() {
        let plans = plans(Duration::from_secs(3600));
        let alice = principal("alice", "a1");
        for n in 0..=PER_PRINCIPAL {
            plans.keep(
                &alice,
                "p",
                &format!("SELECT {n}"),
                Instant::now(),
                plan(&[]),
            );
        }
        assert!(
            plans.take(&alice, "p", "SELECT 0").is_none(),
            "alice's oldest went"
        );
        assert!(plans.take(&alice, "p", "SELECT 1").is_some());
        for n in 0..=MOST_KEPT {
            let someone = principal(&format!("p{n}"), "t");
            plans.keep(&someone, "p", "SELECT 1", Instant::now(), plan(&[]));
        }
        assert!(
            plans.take(&principal("p0", "t"), "p", "SELECT 1").is_none(),
            "the oldest went"
        );
        assert!(plans.take(&principal("p1", "t"), "p", "SELECT 1").is_some());
        let last = principal(&format!("p{MOST_KEPT}"), "t");
        assert!(plans.take(&last, "p", "SELECT 1").is_some());
    }
}
