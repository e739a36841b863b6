//! The runtime principals' queries run on, shared by `/sql`, `/export` and
//! Flight SQL: `access.query_threads` threads with deep stacks of their own,
//! so a query never holds up ingest, `/metrics` or the admin routes, and no
//! statement can overflow a stack they share. Its threads run at a lower
//! CPU priority than the rest of the process, so that on busy cores the
//! pipeline, whose fsyncs decide the acknowledgements, goes first.

use std::future::Future;

use tokio::runtime::{Handle, Runtime};
use tokio::task::JoinHandle;

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
/// How much nicer (lower in CPU priority) than the process the query
/// threads run: under the scheduler's weights, a thread at +10 gets about a
/// tenth of the CPU time of one at +0 when both want a core.
pub const QUERY_NICENESS: i32 = 10;
/// The highest nice value there is.
const NICEST: i32 = 19;

/// The query runtime; dropping it drops the queries still running.
pub struct QueryPool {
    /// Taken only when the pool is dropped.
    runtime: Option<Runtime>,
    handle: Handle,
}

impl QueryPool {
    pub fn start(threads: u32) -> std::io::Result<Self> {
        // Threads inherit their creator's nice value, and the pool's own
        // threads create more: lower from the starting thread's, once.
        let nice = rustix::process::getpriority_process(None)
            .map_or(QUERY_NICENESS, |own| (own + QUERY_NICENESS).min(NICEST));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads.max(1) as usize)
            .max_blocking_threads(QUERY_BLOCKING_THREADS)
            .thread_name("fleetgate-sql")
            .thread_stack_size(QUERY_STACK_BYTES)
            .on_thread_start(move || run_at(nice))
            .enable_all()
            .build()?;
        Ok(Self {
            handle: runtime.handle().clone(),
            runtime: Some(runtime),
        })
    }

    pub fn handle(&self) -> QueryRuntime {
        QueryRuntime(self.handle.clone())
    }
}

impl Drop for QueryPool {
    fn drop(&mut self) {
        // Queries still running are dropped, not awaited to their end;
        // outside a runtime (which may not block), until they are dropped,
        // so that nothing they hold (the vault's file) outlives the server.
        if let Some(runtime) = self.runtime.take() {
            match tokio::runtime::Handle::try_current() {
                Ok(_) => runtime.shutdown_background(),
                Err(_) => runtime.shutdown_timeout(std::time::Duration::from_secs(5)),
            }
        }
    }
}

/// Sets the calling thread's nice value. On Linux it belongs to each
/// thread, and `setpriority` with no pid changes only the caller's.
/// Lowering the priority needs no privilege; if it fails anyway the thread
/// runs at the priority it inherited.
fn run_at(nice: i32) {
    if let Err(error) = rustix::process::setpriority_process(None, nice) {
        tracing::debug!(%error, "a query thread keeps the CPU priority it inherited");
    }
}

/// Where a front-end sends a principal's query to run.
#[derive(Clone)]
pub struct QueryRuntime(Handle);

impl QueryRuntime {
    /// Runs `work` on the query runtime. Dropping the returned future (the
    /// client went away, its request was dropped) cancels `work`, which
    /// stops its DataFusion tasks. `Err` when `work` panicked.
    pub fn run<T: Send + 'static>(
        &self,
        work: impl Future<Output = T> + Send + 'static,
    ) -> impl Future<Output = Result<T, tokio::task::JoinError>> + Send + 'static {
        let task = CancelOnDrop(self.0.spawn(work));
        async move {
            let mut task = task;
            (&mut task.0).await
        }
    }
}

impl QueryRuntime {
    /// Runs `work` on the query runtime to its end, whoever waits for it.
    pub fn spawn(&self, work: impl Future<Output = ()> + Send + 'static) {
        drop(self.0.spawn(work));
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
        let pool = QueryPool::start(1).expect("query runtime");
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
        let expected = (before + QUERY_NICENESS).min(NICEST);
        assert_eq!(on_worker, expected);
        assert_eq!(on_blocking, expected);
        assert_eq!(
            getpriority_process(None).expect("own priority"),
            before,
            "only the pool's threads"
        );
    }

    #[test]
    fn a_query_whose_caller_goes_away_is_cancelled() {
        let pool = QueryPool::start(1).expect("query runtime");
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
