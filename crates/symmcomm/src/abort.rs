//! Aborting: when a wait runs past its deadline, or a failure that peers cannot recover from
//! is seen (an NCCL asynchronous error, our kernels' device-side error flag, a dead peer), every
//! communicator of the process is aborted. Each communicator carries an [`AbortFlag`]; every wait
//! of the library polls it, so a call pending on any thread returns [`Error::Aborted`] naming
//! its own rank, group, operation and size, and every later call fails at once the same way.
//!
//! The CUDA backend additionally aborts its NCCL communicators (`ncclCommAbort`) from the rank's
//! own thread when that thread sees the flag, so kernels stuck waiting for a dead peer exit.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use crate::error::{Error, OpCtx, Result};

/// How often a wait that cannot be woken directly (a store get, a condition variable) looks at
/// the abort flag: the bound on how late a pending call learns of an abort.
pub(crate) const POLL: Duration = Duration::from_millis(50);

/// One communicator's abort state.
#[derive(Debug, Default)]
pub(crate) struct AbortFlag {
    tripped: AtomicBool,
    reason: Mutex<Option<String>>,
}

impl AbortFlag {
    /// A fresh flag, known to [`abort_all`].
    pub(crate) fn registered() -> Arc<Self> {
        let f = Arc::new(AbortFlag::default());
        let mut reg = registry().lock().unwrap_or_else(|p| p.into_inner());
        reg.retain(|w| w.strong_count() > 0);
        reg.push(Arc::downgrade(&f));
        f
    }

    /// A flag nobody else trips (unit tests).
    #[cfg(test)]
    pub(crate) fn standalone() -> Arc<Self> {
        Arc::new(AbortFlag::default())
    }

    /// Whether the flag was tripped.
    pub(crate) fn is_tripped(&self) -> bool {
        self.tripped.load(Ordering::Acquire)
    }

    /// Why it was tripped.
    pub(crate) fn reason(&self) -> Option<String> {
        if !self.is_tripped() {
            return None;
        }
        self.reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// `Err(Aborted)` with `ctx` once tripped.
    pub(crate) fn check(&self, ctx: &OpCtx) -> Result<()> {
        match self.reason() {
            None => Ok(()),
            Some(reason) => Err(Error::Aborted {
                ctx: ctx.clone(),
                reason,
            }),
        }
    }

    /// Trip this flag only (the first reason wins).
    pub(crate) fn trip(&self, reason: &str) {
        let mut r = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        if r.is_none() {
            *r = Some(reason.to_string());
        }
        self.tripped.store(true, Ordering::Release);
    }
}

fn registry() -> &'static Mutex<Vec<Weak<AbortFlag>>> {
    static R: OnceLock<Mutex<Vec<Weak<AbortFlag>>>> = OnceLock::new();
    R.get_or_init(Default::default)
}

/// Abort every communicator of this process: every pending and later call on any of them
/// returns [`Error::Aborted`] with `reason`. The library calls this itself when a deadline
/// passes or a peer fails; an application may call it too (e.g. from a signal-handling thread).
pub fn abort_all(reason: &str) {
    let flags: Vec<Arc<AbortFlag>> = registry()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .filter_map(Weak::upgrade)
        .collect();
    tracing::error!(
        reason,
        communicators = flags.len(),
        "aborting every communicator"
    );
    for f in flags {
        f.trip(reason);
    }
}

/// Trip every communicator of the process when `res` is an error that leaves peers stuck (a
/// deadline passed, an NCCL or device failure, an abort seen elsewhere); pass `res` on.
pub(crate) fn on_failure<T>(res: Result<T>) -> Result<T> {
    if let Err(e) = &res {
        on_error(e);
    }
    res
}

/// Trip every communicator of the process when `e` leaves peers stuck (see [`on_failure`]).
pub(crate) fn on_error(e: &Error) {
    if leaves_peers_stuck(e) {
        abort_all(&e.to_string());
    }
}

/// Whether an error means the group can no longer make progress together.
fn leaves_peers_stuck(e: &Error) -> bool {
    matches!(
        e,
        Error::Timeout { .. }
            | Error::Aborted { .. }
            | Error::Nccl { .. }
            | Error::Io { .. }
            | Error::RendezvousFailed { .. }
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Op;

    fn ctx() -> OpCtx {
        OpCtx {
            op: Op::AllReduce,
            group: "tp#0".into(),
            rank: 1,
            world: 2,
            bytes: 4096,
        }
    }

    #[test]
    fn first_reason_wins_and_names_the_call() {
        let f = AbortFlag::standalone();
        assert!(f.check(&ctx()).is_ok());
        f.trip("rank 0 timed out");
        f.trip("something later");
        let e = f.check(&ctx()).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, Error::Aborted { .. }), "{msg}");
        for needle in [
            "all_reduce",
            "tp#0",
            "rank 1/2",
            "4096 B",
            "rank 0 timed out",
        ] {
            assert!(msg.contains(needle), "{msg} lacks {needle}");
        }
    }

    #[test]
    fn standalone_flags_are_not_registered() {
        // A registered flag is tripped by abort_all; a standalone one is not. (abort_all trips
        // every registered flag of the process, so this test registers none of its own and
        // only checks the standalone one stays clear.)
        let f = AbortFlag::standalone();
        assert!(
            !registry()
                .lock()
                .unwrap()
                .iter()
                .any(|w| w.upgrade().is_some_and(|g| Arc::ptr_eq(&g, &f)))
        );
    }
}
