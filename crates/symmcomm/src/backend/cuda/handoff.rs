//! A blocking call that may never return (NCCL's collective communicator creation, when a peer
//! never joins) run on a helper thread and waited for with a deadline. Exactly one side owns
//! the result: the waiting caller, if it arrives in time, or else the helper thread, which
//! disposes of it when the call finally returns. Nothing ever joins the helper thread.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

use crate::abort::POLL;
use crate::error::{Error, Result};

/// Why the caller stopped waiting.
#[derive(Debug)]
pub(crate) enum GaveUp {
    /// The deadline passed; the call is still running on its thread.
    Deadline,
    /// `poll` failed (the communicator was aborted); the call is still running on its thread.
    Polled(Error),
    /// The helper thread could not be started; the call never ran.
    Spawn(std::io::Error),
}

/// Where the result goes: still running, handed over, or left to the helper thread.
enum Slot<T> {
    Running,
    Returned(T),
    Abandoned,
}

struct Handoff<T> {
    slot: Mutex<Slot<T>>,
    returned: Condvar,
}

impl<T> Handoff<T> {
    fn lock(&self) -> MutexGuard<'_, Slot<T>> {
        self.slot.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Run `call` on a new thread named `name` and wait for its result until `deadline`, calling
/// `poll` at least every [`POLL`] (an error from it ends the wait). When the caller stops
/// waiting, the result of `call`, whenever it comes, goes to `dispose` on the helper thread
/// instead: the caller gets it, or `dispose` does, never both, never neither (unless the call
/// never returns). The thread is detached: nothing waits for it, not even the process's exit.
pub(crate) fn call_with_deadline<T: Send + 'static>(
    name: &str,
    deadline: Instant,
    poll: impl Fn() -> Result<()>,
    call: impl FnOnce() -> T + Send + 'static,
    dispose: impl FnOnce(T) + Send + 'static,
) -> std::result::Result<T, GaveUp> {
    let handoff = Arc::new(Handoff {
        slot: Mutex::new(Slot::Running),
        returned: Condvar::new(),
    });
    let theirs = handoff.clone();
    let spawned = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let value = call();
            let mut slot = theirs.lock();
            match *slot {
                Slot::Abandoned => {
                    drop(slot);
                    dispose(value);
                }
                _ => {
                    *slot = Slot::Returned(value);
                    theirs.returned.notify_all();
                }
            }
        });
    // Dropping the join handle detaches the thread.
    spawned.map_err(GaveUp::Spawn)?;
    let mut slot = handoff.lock();
    loop {
        if let Slot::Returned(_) = *slot {
            let Slot::Returned(value) = std::mem::replace(&mut *slot, Slot::Abandoned) else {
                unreachable!("just matched");
            };
            return Ok(value);
        }
        let now = Instant::now();
        if now >= deadline {
            *slot = Slot::Abandoned;
            return Err(GaveUp::Deadline);
        }
        if let Err(e) = poll() {
            *slot = Slot::Abandoned;
            return Err(GaveUp::Polled(e));
        }
        let slice = (deadline - now).min(POLL);
        slot = handoff
            .returned
            .wait_timeout(slot, slice)
            .unwrap_or_else(|p| p.into_inner())
            .0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{Op, OpCtx};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc;
    use std::time::Duration;

    fn never_aborted() -> Result<()> {
        Ok(())
    }

    #[test]
    fn a_call_that_returns_in_time_is_the_callers() {
        let disposed = Arc::new(AtomicUsize::new(0));
        let d = disposed.clone();
        let got = call_with_deadline(
            "test-in-time",
            Instant::now() + Duration::from_secs(30),
            never_aborted,
            || 42u64,
            move |_| {
                d.fetch_add(1, Ordering::SeqCst);
            },
        );
        assert_eq!(got.unwrap(), 42);
        assert_eq!(disposed.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_call_that_returns_after_the_deadline_is_disposed_of_on_its_thread() {
        // The call blocks until the test releases it, which happens only after the caller gave
        // up: the ordering is forced, not timed.
        let (release, blocked) = mpsc::channel::<()>();
        let (disposed_tx, disposed) = mpsc::channel::<(u64, Option<String>)>();
        let got = call_with_deadline(
            "test-late",
            Instant::now() + Duration::from_millis(20),
            never_aborted,
            move || {
                let _ = blocked.recv();
                7u64
            },
            move |v| {
                let thread = std::thread::current().name().map(str::to_string);
                let _ = disposed_tx.send((v, thread));
            },
        );
        assert!(matches!(got, Err(GaveUp::Deadline)), "{got:?}");
        release.send(()).unwrap();
        let (v, thread) = disposed.recv_timeout(Duration::from_secs(30)).unwrap();
        assert_eq!(v, 7);
        assert_eq!(thread.as_deref(), Some("test-late"));
        assert!(disposed.recv_timeout(Duration::from_millis(50)).is_err());
    }

    #[test]
    fn a_failing_poll_ends_the_wait_before_the_deadline() {
        let (release, blocked) = mpsc::channel::<()>();
        let (disposed_tx, disposed) = mpsc::channel::<u64>();
        let ctx = OpCtx {
            op: Op::Split,
            group: "world".into(),
            rank: 0,
            world: 2,
            bytes: 0,
        };
        let polls = AtomicUsize::new(0);
        let got = call_with_deadline(
            "test-polled",
            Instant::now() + Duration::from_secs(3600),
            || {
                if polls.fetch_add(1, Ordering::SeqCst) < 2 {
                    Ok(())
                } else {
                    Err(Error::Aborted {
                        ctx: ctx.clone(),
                        reason: "a peer failed".into(),
                    })
                }
            },
            move || {
                let _ = blocked.recv();
                9u64
            },
            move |v| {
                let _ = disposed_tx.send(v);
            },
        );
        match got {
            Err(GaveUp::Polled(Error::Aborted { reason, .. })) => {
                assert_eq!(reason, "a peer failed")
            }
            other => panic!("{other:?}"),
        }
        release.send(()).unwrap();
        assert_eq!(disposed.recv_timeout(Duration::from_secs(30)).unwrap(), 9);
    }

    #[test]
    fn at_the_deadline_exactly_one_side_owns_the_result() {
        // Calls that return around the deadline: each value reaches the caller or `dispose`,
        // exactly once.
        for i in 0..200u64 {
            let disposed = Arc::new(AtomicUsize::new(0));
            let d = disposed.clone();
            let (done_tx, done) = mpsc::channel::<()>();
            let got = call_with_deadline(
                "test-race",
                Instant::now() + Duration::from_micros(200),
                never_aborted,
                move || {
                    std::thread::sleep(Duration::from_micros(100 + (i * 37) % 200));
                    i
                },
                move |v| {
                    assert_eq!(v, i);
                    d.fetch_add(1, Ordering::SeqCst);
                    let _ = done_tx.send(());
                },
            );
            match got {
                Ok(v) => {
                    assert_eq!(v, i);
                    // `dispose` was dropped unused with the thread's closure.
                    assert!(done.recv_timeout(Duration::from_secs(30)).is_err());
                    assert_eq!(disposed.load(Ordering::SeqCst), 0);
                }
                Err(GaveUp::Deadline) => {
                    done.recv_timeout(Duration::from_secs(30)).unwrap();
                    assert_eq!(disposed.load(Ordering::SeqCst), 1);
                }
                Err(e) => panic!("{e:?}"),
            }
        }
    }
}
