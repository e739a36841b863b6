//! A front-end served on a thread of its own with a single-threaded tokio
//! runtime, so that it never competes with the pipeline's threads (its
//! queries go to the query runtime, [`crate::ops::queries`]). The HTTP
//! endpoint and Flight SQL both run this way. A stop gives the calls under
//! way [`STOP_GRACE`] to end, then closes every connection: a client that
//! neither reads nor closes must not hold up a shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::thread::JoinHandle;

use std::time::Duration;

use tokio::sync::oneshot;

/// How long a stop waits for the calls under way.
const STOP_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start the {what} thread: {source}")]
    Thread {
        what: &'static str,
        source: std::io::Error,
    },
}

/// A running front-end; dropping it stops serving without waiting.
pub struct Served {
    pub addr: SocketAddr,
    stop: oneshot::Sender<()>,
    thread: JoinHandle<()>,
}

impl Served {
    /// Stops serving and waits for the thread.
    pub fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.thread.join();
    }
}

/// Binds `addr` and runs `serve` on a thread named `thread_name` until
/// stopped; `serve` gets the listener and the stop signal, and is dropped
/// with every connection [`STOP_GRACE`] after the signal if it has not
/// ended by then. `what` names the front-end in errors and logs.
pub fn spawn<F, Fut>(
    what: &'static str,
    thread_name: &str,
    addr: SocketAddr,
    serve: F,
) -> Result<Served, ServeError>
where
    F: FnOnce(tokio::net::TcpListener, oneshot::Receiver<()>) -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    let bind = |source| ServeError::Bind { what, addr, source };
    let listener = std::net::TcpListener::bind(addr).map_err(bind)?;
    let bound = listener.local_addr().map_err(bind)?;
    listener.set_nonblocking(true).map_err(bind)?;
    let (stop, stopped) = oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name(thread_name.into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = %e, front_end = what, "runtime");
                    return;
                }
            };
            runtime.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(listener) => listener,
                    Err(e) => return tracing::error!(error = %e, front_end = what, "listener"),
                };
                let (stop_serving, stop_signal) = oneshot::channel();
                let serving = serve(listener, stop_signal);
                tokio::pin!(serving);
                tokio::select! {
                    () = &mut serving => return,
                    _ = stopped => {}
                }
                let _ = stop_serving.send(());
                if tokio::time::timeout(STOP_GRACE, serving).await.is_err() {
                    tracing::warn!(
                        front_end = what,
                        "clients still connected at shutdown: closed"
                    );
                }
            });
            // Dropping the runtime drops every connection's task.
        })
        .map_err(|source| ServeError::Thread { what, source })?;
    Ok(Served {
        addr: bound,
        stop,
        thread,
    })
}
