//! A load run on an OS thread of its own with a 2-thread tokio runtime, so
//! the caller (a test, the CLI) stays synchronous: stop it, wait for it, or
//! drop it, which stops it and waits, so no load outlives its owner.

use std::future::Future;
use std::thread::JoinHandle;

use tokio::sync::watch;

/// The thread of one run and the flag that asks it to stop.
pub(crate) struct RunThread<R> {
    stop: watch::Sender<bool>,
    thread: Option<JoinHandle<R>>,
}

impl<R: Send + 'static> RunThread<R> {
    /// Starts `run` (given the stop flag) on a thread named `name`.
    ///
    /// # Panics
    ///
    /// If the thread cannot be spawned.
    pub(crate) fn spawn<F, Fut>(name: &str, run: F) -> RunThread<R>
    where
        F: FnOnce(watch::Receiver<bool>) -> Fut + Send + 'static,
        Fut: Future<Output = R>,
    {
        let (stop, stop_rx) = watch::channel(false);
        let thread = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .thread_name("loadgen-worker")
                    .enable_all()
                    .build()
                    .expect("loadgen: failed to build tokio runtime");
                runtime.block_on(run(stop_rx))
            })
            .expect("loadgen: failed to spawn load thread");
        RunThread {
            stop,
            thread: Some(thread),
        }
    }

    /// Asks the run to stop and waits for its result.
    pub(crate) fn stop(&mut self) -> R {
        self.stop.send_replace(true);
        self.join()
    }

    /// True once the run's thread has ended (or was joined).
    pub(crate) fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Waits for the run to end by itself; a panic in it is re-raised here.
    pub(crate) fn join(&mut self) -> R {
        let thread = self.thread.take().expect("loadgen: run already joined");
        match thread.join() {
            Ok(report) => report,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

impl<R> Drop for RunThread<R> {
    fn drop(&mut self) {
        if let Some(thread) = self.thread.take() {
            self.stop.send_replace(true);
            // A panic in the run thread is not re-raised from drop.
            let _ = thread.join();
        }
    }
}

/// True once the run was asked to stop (or its handle is gone).
pub(crate) fn stop_requested(stop: &watch::Receiver<bool>) -> bool {
    *stop.borrow() || stop.has_changed().is_err()
}
