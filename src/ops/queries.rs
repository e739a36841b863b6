//! The runtime principals' queries run on, shared by `/sql`, `/export` and
//! Flight SQL: `access.query_threads` threads with deep stacks of their own,
//! so a query never holds up ingest, `/metrics` or the admin routes, and no
//! statement can overflow a stack they share. Its threads run at a lower
//! CPU priority than the rest of the process, so that on busy cores the
//! pipeline, whose fsyncs decide the acknowledgements, goes first. The
//! work it is given is tracked: when the pool stops it waits for that work
//! to end (the front-ends have stopped, so their clients are gone) rather
//! than cutting it off.

use std::future::Future;
use std::time::Duration;

use tokio::runtime::{Handle, Runtime};
use tokio::task::JoinHandle;
use tokio_util::task::TaskTracker;

use crate::core::priority;

/// Stack of each query thread. The statement bounds (`access::limits`)
/// keep a statement's tree shallow and DataFusion grows its own recursion
/// on the heap; this leaves room for the rest (evaluation, dropping the
/// tree). It is address space, not memory in use.
const QUERY_STACK_BYTES: usize = 64 << 20;
/// Most blocking threads of the query runtime (file reads; tokio's own
/// default). A query can hold one in delta-rs's kernel (`block_in_place`)
/// while the file reads it waits for need others (`spawn_blocking`), so a
/// pool near `access.max_concurrent_queries` deadlocks every query (seen
/// with 4 threads and 4 queries). Threads are made only when needed.
const QUERY_BLOCKING_THREADS: usize = 512;

/// The query runtime. Dropping it waits, up to its bound, for the work in
/// `tasks` to end, then drops whatever still runs.
pub struct QueryPool {
    /// Taken only when the pool is dropped.
    runtime: Option<Runtime>,
    handle: Handle,
    /// What runs on the pool and must end before it goes: every query,
    /// answer and live stream handed to it, and whatever else their owner
    /// tracks here (the live follower, whose log reads block a query thread
    /// on a future of this runtime: delta-rs's kernel panics if the runtime
    /// drops that future under it).
    tasks: TaskTracker,
    /// How long a stop waits for `tasks`: a query's time limit.
    stop_within: Duration,
}

impl QueryPool {
    /// A pool of `threads` that tracks its work in `tasks` and waits up to
    /// `stop_within` for it when it stops.
    pub fn start(threads: u32, tasks: TaskTracker, stop_within: Duration) -> std::io::Result<Self> {
        // Threads inherit their creator's nice value, and the pool's own
        // threads create more: lower from the starting thread's, once.
        let nice = priority::nicer_than_this_thread(priority::QUERY_NICENESS);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads.max(1) as usize)
            .max_blocking_threads(QUERY_BLOCKING_THREADS)
            .thread_name("fleetgate-sql")
            .thread_stack_size(QUERY_STACK_BYTES)
            .on_thread_start(move || priority::run_at(nice))
            .enable_all()
            .build()?;
        Ok(Self {
            handle: runtime.handle().clone(),
            runtime: Some(runtime),
            tasks,
            stop_within,
        })
    }

    pub fn handle(&self) -> QueryRuntime {
        QueryRuntime {
            handle: self.handle.clone(),
            tasks: self.tasks.clone(),
        }
    }
}

impl Drop for QueryPool {
    fn drop(&mut self) {
        let Some(runtime) = self.runtime.take() else {
            return;
        };
        let tasks = self.tasks.clone();
        let within = self.stop_within;
        // On a thread of its own: the caller may be inside a runtime, which
        // may neither block on another nor drop one.
        let stopping = std::thread::Builder::new()
            .name("fleetgate-sql-stop".into())
            .spawn(move || stop(runtime, &tasks, within));
        match stopping {
            Ok(thread) => {
                if thread.join().is_err() {
                    tracing::error!("stopping the query pool panicked");
                }
            }
            Err(error) => tracing::error!(%error, "cannot stop the query pool in order"),
        }
    }
}

/// Waits up to `within` for the work in `tasks` (the front-ends have
/// stopped, so their clients are gone: a live stream writes its last
/// `delivered` line, a log read is not cut short), then drops what is left
/// and waits until it is dropped, so that nothing it holds (the vault's
/// file) outlives the server.
fn stop(runtime: Runtime, tasks: &TaskTracker, within: Duration) {
    tasks.close();
    // The timer is made inside: it needs the runtime's.
    let settled = runtime.block_on(async { tokio::time::timeout(within, tasks.wait()).await });
    if settled.is_err() {
        tracing::warn!(
            tasks = tasks.len(),
            within_ms = within.as_millis(),
            "query work still running as the query pool stops; it is dropped"
        );
    }
    runtime.shutdown_timeout(Duration::from_secs(5));
}

/// Where a front-end sends a principal's query to run.
#[derive(Clone)]
pub struct QueryRuntime {
    handle: Handle,
    tasks: TaskTracker,
}

impl QueryRuntime {
    /// Runs `work` on the query runtime. Dropping the returned future (the
    /// client went away, its request was dropped) cancels `work`, which
    /// stops its DataFusion tasks. `Err` when `work` panicked.
    pub fn run<T: Send + 'static>(
        &self,
        work: impl Future<Output = T> + Send + 'static,
    ) -> impl Future<Output = Result<T, tokio::task::JoinError>> + Send + 'static {
        let task = CancelOnDrop(self.tasks.spawn_on(work, &self.handle));
        async move {
            let mut task = task;
            (&mut task.0).await
        }
    }
}

impl QueryRuntime {
    /// Runs `work` on the query runtime to its end, whoever waits for it.
    pub fn spawn(&self, work: impl Future<Output = ()> + Send + 'static) {
        drop(self.tasks.spawn_on(work, &self.handle));
    }
}

/// A spawned task that is aborted when its handle is dropped unfinished.
struct CancelOnDrop<T>(JoinHandle<T>);

impl<T> Drop for CancelOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// Sets its flag when dropped: when the task holding it ends.
    struct Dropped(Arc<AtomicBool>);

    impl Drop for Dropped {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    #[test]
    fn queries_run_nicer_than_the_process_and_leave_it_as_it_was() {
        use rustix::process::getpriority_process;
        let before = getpriority_process(None).expect("own priority");
        let pool = QueryPool::start(1, TaskTracker::new(), Duration::from_secs(60))
            .expect("query runtime");
        let caller = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("caller runtime");
        let on_worker = caller
            .block_on(pool.handle().run(async { getpriority_process(None) }))
            .expect("ran")
            .expect("worker's priority");
        let on_blocking = caller
            .block_on(
                pool.handle()
                    .run(async { tokio::task::spawn_blocking(|| getpriority_process(None)).await }),
            )
            .expect("ran")
            .expect("joined")
            .expect("blocking thread's priority");
        let expected = (before + priority::QUERY_NICENESS).min(19);
        assert_eq!(on_worker, expected);
        assert_eq!(on_blocking, expected);
        assert_eq!(
            getpriority_process(None).expect("own priority"),
            before,
            "only the pool's threads"
        );
    }

    /// delta-rs's kernel reads a table's log as this work does: a query
    /// thread blocks until a future it spawned on the same runtime ends,
    /// and panics if the runtime drops that future. Stopping the pool in
    /// the middle lets the work end instead.
    #[test]
    fn work_running_when_the_pool_stops_ends_before_the_pool_goes() {
        let pool = QueryPool::start(1, TaskTracker::new(), Duration::from_secs(60))
            .expect("query runtime");
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let (ended_tx, ended_rx) = std::sync::mpsc::channel();
        pool.handle().spawn(async move {
            let (read_tx, read_rx) = std::sync::mpsc::channel();
            tokio::spawn(async move {
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                let _ = read_tx.send("the log");
            });
            let _ = started_tx.send(());
            let read = tokio::task::block_in_place(|| read_rx.recv());
            let _ = ended_tx.send(read);
        });
        started_rx.recv().expect("the work started");
        drop(pool);
        assert_eq!(
            ended_rx.try_recv(),
            Ok(Ok("the log")),
            "the work was cut off"
        );
    }

    /// Work that does not end within the bound is dropped, and the pool goes.
    #[test]
    fn work_that_outlasts_the_bound_is_dropped_when_the_pool_stops() {
        let pool = QueryPool::start(1, TaskTracker::new(), Duration::from_millis(100))
            .expect("query runtime");
        let dropped = Arc::new(AtomicBool::new(false));
        let guard = Dropped(Arc::clone(&dropped));
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        pool.handle().spawn(async move {
            let _guard = guard;
            let _ = started_tx.send(());
            std::future::pending::<()>().await;
        });
        started_rx.recv().expect("the work started");
        drop(pool);
        assert!(dropped.load(Ordering::SeqCst), "the work outlived its pool");
    }

    #[test]
    fn a_query_whose_caller_goes_away_is_cancelled() {
        let pool = QueryPool::start(1, TaskTracker::new(), Duration::from_secs(60))
            .expect("query runtime");
        let dropped = Arc::new(AtomicBool::new(false));
        let guard = Dropped(Arc::clone(&dropped));
        let (started_tx, started_rx) = tokio::sync::oneshot::channel();
        let waiting = pool.handle().run(async move {
            let _guard = guard;
            let _ = started_tx.send(());
            std::future::pending::<()>().await;
        });
        let caller = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("caller runtime");
        // The caller waits until the query runs, then goes away.
        caller.block_on(async {
            tokio::select! {
                _ = waiting => panic!("the query cannot end by itself"),
                started = started_rx => started.expect("the query started"),
            }
        });
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while !dropped.load(Ordering::SeqCst) {
            assert!(
                std::time::Instant::now() < deadline,
                "the query still runs after its caller went away"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}
