//! CPU priority of the threads whose work can wait. On two busy cores the
//! ingest path (broker, link, workers and their WAL fsyncs) decides how long
//! a vehicle waits for its acknowledgement; encoding Parquet, committing to
//! Delta, compaction and queries decide only how soon rows are queryable or
//! an answer comes. Those run "nicer" (lower in priority): under the
//! scheduler's weights a thread at +5 gets about a third, one at +10 about
//! a tenth, of the CPU time of one at +0 when both want a core, and all of
//! it when the ingest path does not. The table commits go further and run
//! only on CPU time nothing else wants ([`run_when_idle`]). Lowering a
//! thread's priority needs no privilege; on Linux the nice value and the
//! policy belong to each thread, and threads inherit their creator's.

use rustix::process::{getpriority_process, setpriority_process};
use thread_priority::{
    NormalThreadSchedulePolicy, ThreadPriority, ThreadSchedulePolicy,
    set_thread_priority_and_policy, thread_native_id,
};

/// The retention sweep (deletions, compaction).
pub const STORE_NICENESS: i32 = 5;
/// The query pool: principals' queries, answers and live streams.
pub const QUERY_NICENESS: i32 = 10;
/// The highest nice value there is.
const NICEST: i32 = 19;

/// The nice value `by` above the calling thread's.
pub fn nicer_than_this_thread(by: i32) -> i32 {
    getpriority_process(None).map_or(by, |own| own.saturating_add(by).min(NICEST))
}

/// Sets the calling thread's nice value (`setpriority` with no pid changes
/// only the caller's on Linux). If that fails the thread keeps the
/// priority it inherited, which is only slower for the ingest path.
pub fn run_at(nice: i32) {
    if let Err(error) = setpriority_process(None, nice) {
        tracing::debug!(%error, "a thread keeps the CPU priority it inherited");
    }
}

/// Lowers the calling thread's priority by `by`: at the start of a thread
/// whose work can wait.
pub fn run_nicer(by: i32) {
    run_at(nicer_than_this_thread(by));
}

/// Runs the calling thread, and the threads it starts, only on CPU time no
/// other thread wants (Linux `SCHED_IDLE`). A nice value lowers a thread's
/// share, but a thread of the ingest path that wakes up still waits for the
/// running one's time slice (milliseconds, under EEVDF); an idle-policy
/// thread gives up the core to it at once. For work that is fine to starve
/// for a while: whatever it holds back waits in bounded memory (a table
/// writer's budget) and slows ingest down, never loses anything.
pub fn run_when_idle() {
    let idle = ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Idle);
    // Sets the policy, then nice 0, which SCHED_IDLE ignores (and which a
    // process started nicer may not set: the policy is set all the same).
    if let Err(error) =
        set_thread_priority_and_policy(thread_native_id(), ThreadPriority::Min, idle)
    {
        tracing::debug!(
            ?error,
            "a thread's scheduling policy or nice value is not as asked"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nicer_thread_leaves_the_others_as_they_were() {
        let before = getpriority_process(None).expect("own priority");
        let inside = std::thread::spawn(|| {
            run_nicer(STORE_NICENESS);
            let own = getpriority_process(None).expect("own priority");
            let child = std::thread::spawn(|| getpriority_process(None).expect("child's"))
                .join()
                .expect("child joined");
            (own, child)
        })
        .join()
        .expect("joined");
        let expected = (before + STORE_NICENESS).min(NICEST);
        assert_eq!(
            inside,
            (expected, expected),
            "the thread and what it starts"
        );
        assert_eq!(getpriority_process(None).expect("own"), before);
    }

    #[test]
    fn an_idle_thread_and_what_it_starts_run_only_on_idle_time() {
        let idle = ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Idle);
        let policies = std::thread::spawn(|| {
            run_when_idle();
            let own = thread_priority::thread_schedule_policy().expect("own policy");
            let child = std::thread::spawn(thread_priority::thread_schedule_policy)
                .join()
                .expect("child joined")
                .expect("child's policy");
            (own, child)
        })
        .join()
        .expect("joined");
        assert_eq!(policies, (idle, idle));
        assert_ne!(
            thread_priority::thread_schedule_policy().expect("own"),
            idle,
            "only that thread"
        );
    }
}
