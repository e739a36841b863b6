//! CPU priority of the threads whose work can wait. On two busy cores the
//! ingest path (broker, link, workers and their WAL fsyncs) decides how long
//! a vehicle waits for its acknowledgement; encoding Parquet, committing to
//! Delta, compaction and queries decide only how soon rows are queryable or
//! an answer comes. Those run "nicer" (lower in priority): under the
//! scheduler's weights a thread at +5 gets about a third, one at +10 about
//! a tenth, of the CPU time of one at +0 when both want a core, and all of
//! it when the ingest path does not. Lowering a thread's priority needs no
//! privilege; on Linux the nice value belongs to each thread, and threads
//! inherit their creator's.

use rustix::process::{getpriority_process, setpriority_process};

/// The table commits (Parquet, Delta) and the retention sweep (compaction).
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
}
