//! NCCL communicators destroyed off the rank's thread.
//!
//! `ncclCommDestroy` of a healthy communicator is slow for a reason that has nothing to do
//! with the caller: the last local rank's call frees every local rank's communicator and joins
//! NCCL's proxy threads, which notice the stop only when their `poll` (500 ms) wakes up.
//! Measured on 2 × H200 (NCCL 2.28.3), one rank's drop of a group took ~0.45 s while creating
//! the next group took ~0.13 s, and a peer that finished its drop first waited in the next
//! split for all of it. So a group's drop hands its communicators to a teardown thread each and
//! returns.
//!
//! Nothing is lost or left half done:
//! - each teardown thread holds the rank's CUDA context, so the context outlives the destroy;
//! - at most [`MAX_IN_FLIGHT`] run at once: a drop beyond that waits for a slot (with a
//!   deadline, after which it destroys on its own thread);
//! - [`wait_idle`] waits (with a deadline) until every teardown has finished: the device's
//!   memory report, the device's own drop and the process's exit (an `atexit` handler, which
//!   also covers `std::process::exit`) call it, so memory is measured, and the process ends,
//!   only after NCCL has released everything (a process that ended under a teardown thread
//!   crashed in NCCL on 2 × H200).
//!
//! Aborts never come here: `ncclCommAbort` runs at once on the caller's thread.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Teardowns that may run at once (a drop beyond this waits for one to finish).
pub(crate) const MAX_IN_FLIGHT: usize = 16;

/// Teardowns in flight, and the condition that signals a change.
pub(crate) struct Teardowns {
    in_flight: Mutex<usize>,
    changed: Condvar,
    max_in_flight: usize,
}

/// The process's teardowns.
static TEARDOWNS: Teardowns = Teardowns::new(MAX_IN_FLIGHT);

impl Teardowns {
    pub(crate) const fn new(max_in_flight: usize) -> Self {
        Teardowns {
            in_flight: Mutex::new(0),
            changed: Condvar::new(),
            max_in_flight,
        }
    }

    fn lock(&self) -> MutexGuard<'_, usize> {
        self.in_flight.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Teardowns running now.
    pub(crate) fn in_flight(&self) -> usize {
        *self.lock()
    }

    /// Run `destroy` on a thread named `name`, once fewer than the maximum are in flight.
    /// When no slot frees within `slot_wait`, or the thread cannot be started, `destroy` runs
    /// here instead: it always runs exactly once.
    pub(crate) fn run(
        &'static self,
        name: &str,
        slot_wait: Duration,
        destroy: impl FnOnce() + Send + 'static,
    ) {
        let deadline = Instant::now() + slot_wait;
        let mut n = self.lock();
        while *n >= self.max_in_flight {
            let now = Instant::now();
            if now >= deadline {
                drop(n);
                tracing::warn!(
                    in_flight = self.max_in_flight,
                    "no teardown slot freed within {slot_wait:?}; destroying on this thread"
                );
                destroy();
                return;
            }
            n = self
                .changed
                .wait_timeout(n, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        *n += 1;
        drop(n);
        // The closure is moved into the thread only if it starts; otherwise it comes back.
        let slot = std::sync::Arc::new(Mutex::new(Some(destroy)));
        let theirs = slot.clone();
        let spawned = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let f = theirs.lock().unwrap_or_else(|p| p.into_inner()).take();
                if let Some(f) = f {
                    f();
                }
                self.finished();
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start a teardown thread; destroying on this thread");
            let f = slot.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(f) = f {
                f();
            }
            self.finished();
        }
    }

    fn finished(&self) {
        let mut n = self.lock();
        *n -= 1;
        drop(n);
        self.changed.notify_all();
    }

    /// Wait until no teardown is in flight, or `within` passes. Whether all finished.
    pub(crate) fn wait_idle(&self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        let mut n = self.lock();
        while *n > 0 {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            n = self
                .changed
                .wait_timeout(n, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }
}

/// How long the process's exit waits for teardowns still running.
const EXIT_WAIT: Duration = Duration::from_secs(60);

/// Run `destroy` on a teardown thread of the process (see the module's documentation).
pub(crate) fn run(name: &str, slot_wait: Duration, destroy: impl FnOnce() + Send + 'static) {
    static AT_EXIT: std::sync::Once = std::sync::Once::new();
    AT_EXIT.call_once(|| {
        // SAFETY: `wait_at_exit` is an `extern "C" fn()` that never unwinds (it only waits on
        // a mutex and a condition variable, whose poisoning it ignores).
        if unsafe { libc::atexit(wait_at_exit) } != 0 {
            tracing::warn!("cannot register the exit handler that waits for NCCL teardowns");
        }
    });
    TEARDOWNS.run(name, slot_wait, destroy);
}

/// Runs at the process's exit, before NCCL's and CUDA's own exit handlers (registered earlier,
/// so they run later): the teardowns finish first.
extern "C" fn wait_at_exit() {
    TEARDOWNS.wait_idle(EXIT_WAIT);
}

/// Wait until the process's teardowns have finished, at most `within`; `false` (and a warning)
/// when some are still running then.
pub(crate) fn wait_idle(within: Duration) -> bool {
    let idle = TEARDOWNS.wait_idle(within);
    if !idle {
        tracing::warn!(
            in_flight = TEARDOWNS.in_flight(),
            "NCCL communicator teardowns still running after {within:?}"
        );
    }
    idle
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc;

    fn leaked(max: usize) -> &'static Teardowns {
        Box::leak(Box::new(Teardowns::new(max)))
    }

    #[test]
    fn every_teardown_runs_once_and_wait_idle_sees_the_end() {
        let t = leaked(4);
        let ran = Arc::new(AtomicUsize::new(0));
        for _ in 0..20 {
            let ran = ran.clone();
            t.run("test-teardown", Duration::from_secs(30), move || {
                std::thread::sleep(Duration::from_millis(5));
                ran.fetch_add(1, Ordering::SeqCst);
            });
            assert!(t.in_flight() <= 4, "more than the maximum in flight");
        }
        assert!(t.wait_idle(Duration::from_secs(30)));
        assert_eq!(ran.load(Ordering::SeqCst), 20);
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn the_drop_returns_before_the_teardown_ends() {
        let t = leaked(4);
        let (release, released) = mpsc::channel::<()>();
        let (done, finished) = mpsc::channel::<()>();
        let start = Instant::now();
        t.run("test-teardown", Duration::from_secs(30), move || {
            let _ = released.recv_timeout(Duration::from_secs(10));
            let _ = done.send(());
        });
        assert!(start.elapsed() < Duration::from_secs(5));
        assert_eq!(t.in_flight(), 1);
        // Not idle while it runs: the wait gives up at its deadline.
        assert!(!t.wait_idle(Duration::from_millis(50)));
        release.send(()).unwrap();
        finished.recv_timeout(Duration::from_secs(30)).unwrap();
        assert!(t.wait_idle(Duration::from_secs(30)));
    }

    #[test]
    fn with_every_slot_taken_the_caller_destroys_itself_after_the_wait() {
        let t = leaked(1);
        let (release, released) = mpsc::channel::<()>();
        t.run("test-teardown", Duration::from_secs(30), move || {
            let _ = released.recv_timeout(Duration::from_secs(10));
        });
        let me = std::thread::current().id();
        let ran_on = Arc::new(Mutex::new(None));
        let r = ran_on.clone();
        let start = Instant::now();
        t.run("test-teardown", Duration::from_millis(100), move || {
            *r.lock().unwrap() = Some(std::thread::current().id());
        });
        assert!(start.elapsed() >= Duration::from_millis(100));
        assert_eq!(
            *ran_on.lock().unwrap(),
            Some(me),
            "ran on the caller's thread"
        );
        release.send(()).unwrap();
        assert!(t.wait_idle(Duration::from_secs(30)));
    }

    #[test]
    fn a_freed_slot_lets_a_waiting_drop_go_to_a_thread() {
        let t = leaked(1);
        let (release, released) = mpsc::channel::<()>();
        t.run("test-teardown", Duration::from_secs(30), move || {
            let _ = released.recv_timeout(Duration::from_secs(10));
        });
        let releaser = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            release.send(()).unwrap();
        });
        let me = std::thread::current().id();
        let ran_on = Arc::new(Mutex::new(None));
        let r = ran_on.clone();
        t.run("test-teardown", Duration::from_secs(30), move || {
            *r.lock().unwrap() = Some(std::thread::current().id());
        });
        releaser.join().unwrap();
        assert!(t.wait_idle(Duration::from_secs(30)));
        let ran = ran_on.lock().unwrap().expect("the teardown ran");
        assert_ne!(ran, me, "ran on a teardown thread");
    }
}
