//! Plans a description made, kept for the run that follows it.
//!
//! A Flight SQL client describes a statement before it fetches the answer
//! (GetFlightInfo, then DoGet), and each would plan the statement over the
//! principal's views: planning is a good part of what a small query costs.
//! The physical plan a description made is kept for the next run of the same
//! statement by the same principal (same id and token) for the same purpose,
//! once, and for at most [`KEPT_FOR`]; a run after that, or of anything else,
//! plans anew. So an answer may be planned that long before it runs: it sees
//! the rows, views and grants of that moment, as a query that has just
//! started does while it runs.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use datafusion::execution::TaskContext;
use datafusion::physical_plan::ExecutionPlan;

use super::registry::Principal;

/// How long a described plan waits for its run.
pub(super) const KEPT_FOR: Duration = Duration::from_secs(1);

/// How many described plans wait at most; the oldest go first.
const MOST_KEPT: usize = 64;

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

/// The described plans waiting for their run.
pub(super) struct DescribedPlans {
    kept_for: Duration,
    waiting: Mutex<Vec<(Key, Instant, Reusable)>>,
}

impl Default for DescribedPlans {
    fn default() -> Self {
        Self::keeping_for(KEPT_FOR)
    }
}

impl DescribedPlans {
    fn keeping_for(kept_for: Duration) -> Self {
        Self {
            kept_for,
            waiting: Mutex::new(Vec::new()),
        }
    }

    /// Keeps `plan`, which `principal` described for `purpose`.
    pub(super) fn keep(&self, principal: &Principal, purpose: &str, sql: &str, plan: Reusable) {
        let mut waiting = self.waiting.lock().unwrap_or_else(PoisonError::into_inner);
        waiting.retain(|(_, at, _)| at.elapsed() < self.kept_for);
        if waiting.len() >= MOST_KEPT {
            waiting.remove(0);
        }
        waiting.push((Key::of(principal, purpose, sql), Instant::now(), plan));
    }

    /// The plan `principal` described of `sql` for `purpose`, if it still
    /// waits; it is then no longer kept.
    pub(super) fn take(&self, principal: &Principal, purpose: &str, sql: &str) -> Option<Reusable> {
        let key = Key::of(principal, purpose, sql);
        let mut waiting = self.waiting.lock().unwrap_or_else(PoisonError::into_inner);
        waiting.retain(|(_, at, _)| at.elapsed() < self.kept_for);
        let found = waiting.iter().position(|(k, _, _)| *k == key)?;
        Some(waiting.remove(found).2)
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

    fn plan() -> Reusable {
        Reusable {
            plan: Arc::new(EmptyExec::new(Arc::new(arrow::datatypes::Schema::empty()))),
            task: Arc::new(TaskContext::default()),
            treatments: String::new(),
            tables: Vec::new(),
        }
    }

    /// A described plan goes to the same principal, with the same token,
    /// for the same purpose and statement, once; to no one else.
    #[test]
    fn a_described_plan_runs_once_for_whoever_described_it() {
        let plans = DescribedPlans::default();
        let alice = principal("alice", "a1");
        let sql = "SELECT 1";
        plans.keep(&alice, "own_data_access", sql, plan());
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

    /// A plan not run within its time is dropped, and so is the oldest
    /// when too many wait.
    #[test]
    fn described_plans_wait_a_bounded_time_and_number() {
        let plans = DescribedPlans::keeping_for(Duration::ZERO);
        let alice = principal("alice", "a1");
        plans.keep(&alice, "p", "SELECT 1", plan());
        assert!(plans.take(&alice, "p", "SELECT 1").is_none());
        let plans = DescribedPlans::default();
        for n in 0..=MOST_KEPT {
            plans.keep(&alice, "p", &format!("SELECT {n}"), plan());
        }
        assert!(
            plans.take(&alice, "p", "SELECT 0").is_none(),
            "the oldest went"
        );
        assert!(plans.take(&alice, "p", "SELECT 1").is_some());
        assert!(
            plans
                .take(&alice, "p", &format!("SELECT {MOST_KEPT}"))
                .is_some()
        );
    }
}
