//! An owned NCCL communicator: created from a unique id or split from a parent, polled for
//! asynchronous errors, finalized and destroyed on drop, aborted when anything went wrong.

use std::sync::atomic::{AtomicBool, Ordering};

use nccl_sys::{Config, Nccl, NcclComm as RawComm, NcclResult, UniqueId};

use crate::error::{Error, OpCtx, Result};

/// Turn an NCCL result into ours, with NCCL's own last-error message.
pub(crate) fn check(nccl: &Nccl, r: NcclResult, call: &'static str, ctx: &OpCtx) -> Result<()> {
    if r.is_success() {
        return Ok(());
    }
    // SAFETY: a null communicator is allowed; NCCL returns its process-wide last error.
    let last_error = unsafe { nccl.last_error(std::ptr::null_mut()) };
    Err(Error::Nccl {
        ctx: ctx.clone(),
        call,
        code: r.0,
        code_name: r.name().into_owned(),
        message: nccl.error_string(r),
        last_error,
    })
}

/// One NCCL communicator on this rank.
#[derive(Debug)]
pub(crate) struct OwnedComm {
    pub(crate) nccl: &'static Nccl,
    comm: RawComm,
    /// Set when an error was seen: drop aborts instead of finalizing.
    failed: AtomicBool,
    /// Set once `ncclCommAbort` ran: the handle is gone and must not be passed to NCCL again.
    aborted: AtomicBool,
    label: String,
}

// SAFETY: an NCCL communicator may be used from any thread as long as calls on it are not
// concurrent; symmcomm calls it only from the rank that owns it (one thread at a time, with
// the rank's CUDA context bound).
unsafe impl Send for OwnedComm {}
// SAFETY: see `Send`; shared references only read the handle.
unsafe impl Sync for OwnedComm {}

impl OwnedComm {
    /// Join the communicator named by `id` as `rank` of `size` (blocking, collective).
    pub(crate) fn init(
        nccl: &'static Nccl,
        id: &UniqueId,
        size: usize,
        rank: usize,
        label: &str,
        ctx: &OpCtx,
    ) -> Result<Self> {
        let mut comm: RawComm = std::ptr::null_mut();
        let mut config = Config::new(nccl.version().code());
        let name = std::ffi::CString::new(label).unwrap_or_default();
        config.comm_name = name.as_ptr();
        // SAFETY: `comm` and `config` are valid for the call; `name` outlives it; the rank's
        // CUDA context is current; every rank of the id calls this.
        let r = unsafe {
            nccl.comm_init_rank_config(&mut comm, size as i32, *id, rank as i32, &mut config)
        };
        check(nccl, r, "ncclCommInitRankConfig", ctx)?;
        Ok(OwnedComm {
            nccl,
            comm,
            failed: AtomicBool::new(false),
            aborted: AtomicBool::new(false),
            label: label.into(),
        })
    }

    /// Split: ranks with equal `color` form a new communicator ordered by `key` (collective
    /// over `self`).
    pub(crate) fn split(&self, color: usize, key: usize, label: &str, ctx: &OpCtx) -> Result<Self> {
        let mut comm: RawComm = std::ptr::null_mut();
        // SAFETY: `self.comm` is live; `comm` is valid for writing; a null config inherits the
        // parent's; every rank of `self` calls this in the same order.
        let r = unsafe {
            self.nccl.comm_split(
                self.comm,
                color as i32,
                key as i32,
                &mut comm,
                std::ptr::null_mut(),
            )
        };
        self.check(r, "ncclCommSplit", ctx)?;
        if comm.is_null() {
            return Err(Error::InvalidArgument {
                ctx: ctx.clone(),
                detail: "ncclCommSplit returned no communicator".into(),
            });
        }
        Ok(OwnedComm {
            nccl: self.nccl,
            comm,
            failed: AtomicBool::new(false),
            aborted: AtomicBool::new(false),
            label: label.into(),
        })
    }

    /// The raw handle, for calls that pass it to NCCL. Callers on the rank's thread check
    /// [`OwnedComm::live`] first (the device does, before any enqueue).
    pub(crate) fn raw(&self) -> RawComm {
        self.comm
    }

    /// The handle, or `Err(Aborted)` once the communicator was aborted.
    pub(crate) fn live(&self, ctx: &OpCtx) -> Result<RawComm> {
        if self.is_aborted() {
            return Err(Error::Aborted {
                ctx: ctx.clone(),
                reason: format!("NCCL communicator {} was aborted", self.label),
            });
        }
        Ok(self.comm)
    }

    /// Whether `ncclCommAbort` ran.
    pub(crate) fn is_aborted(&self) -> bool {
        self.aborted.load(Ordering::Acquire)
    }

    /// Abort now (once): NCCL kernels waiting on peers exit and the handle is released.
    /// Called only from the rank's own thread, so no other call on this communicator runs.
    pub(crate) fn abort_now(&self) {
        if self.aborted.swap(true, Ordering::AcqRel) {
            return;
        }
        self.failed.store(true, Ordering::Relaxed);
        // `ncclCommAbort` frees device memory, which waits for NCCL's kernels; a kernel stuck on
        // a dead peer may never end, so the abort runs on its own thread and is waited for only
        // briefly: the caller's error must not wait for it.
        let (nccl, comm, label) = (self.nccl, self.comm as usize, self.label.clone());
        let (tx, rx) = std::sync::mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name("symmcomm-abort".into())
            .spawn(move || {
                // SAFETY: the communicator is live (not aborted before, per the flag just
                // swapped), and nothing else uses it from now on (every use checks the flag).
                let r = unsafe { nccl.comm_abort(comm as RawComm) };
                let _ = tx.send(r);
            });
        match spawned.map(|_| rx.recv_timeout(std::time::Duration::from_millis(300))) {
            Ok(Ok(r)) => {
                tracing::warn!(comm = %label, code = %r.name(), "NCCL communicator aborted")
            }
            _ => {
                tracing::warn!(comm = %label, "NCCL communicator abort still running (its kernels have not ended)")
            }
        }
    }

    /// Check a result of a call on this communicator; an error marks it failed.
    pub(crate) fn check(&self, r: NcclResult, call: &'static str, ctx: &OpCtx) -> Result<()> {
        let res = check(self.nccl, r, call, ctx);
        if res.is_err() {
            self.failed.store(true, Ordering::Relaxed);
        }
        res
    }

    /// NCCL's asynchronous error state (a dead peer, a remote failure).
    pub(crate) fn async_error(&self, ctx: &OpCtx) -> Result<()> {
        self.live(ctx)?;
        let mut state = NcclResult::SUCCESS;
        // SAFETY: the communicator is live; `state` is valid for writing.
        let r = unsafe { self.nccl.comm_get_async_error(self.comm, &mut state) };
        self.check(r, "ncclCommGetAsyncError", ctx)?;
        if state.is_success() || state == NcclResult::IN_PROGRESS {
            Ok(())
        } else {
            self.check(state, "asynchronous NCCL operation", ctx)
        }
    }

    pub(crate) fn label(&self) -> &str {
        &self.label
    }
}

impl Drop for OwnedComm {
    fn drop(&mut self) {
        if self.is_aborted() {
            return;
        }
        // SAFETY: the communicator is live, no window or group uses it any more (they hold an
        // `Arc` to it), and it is dropped once. Abort when something failed: finalize would
        // wait for peers that may be gone.
        let r = unsafe {
            if self.failed.load(Ordering::Relaxed) {
                self.nccl.comm_abort(self.comm)
            } else {
                self.nccl.comm_destroy(self.comm)
            }
        };
        if !r.is_success() {
            tracing::warn!(comm = %self.label, code = %r.name(), "NCCL communicator teardown failed");
        }
    }
}
