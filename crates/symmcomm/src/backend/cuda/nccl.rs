//! An owned NCCL communicator: created from a unique id or split from a parent, with a deadline
//! (the blocking creation call runs on a helper thread; a peer that never joins is an error, not
//! a hang), polled for asynchronous errors, destroyed on a teardown thread after its drop
//! (`teardown.rs` says why), aborted at once when anything went wrong.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use cudarc::driver::CudaContext;
use nccl_sys::{Config, Nccl, NcclComm as RawComm, NcclResult, UniqueId};

use super::handoff::{GaveUp, call_with_deadline};
use super::test_hooks::{self, NcclCreation};
use crate::abort::AbortFlag;
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
    /// Set once the handle must not be passed to NCCL again: `ncclCommAbort` ran, or is owed
    /// (a split of it was abandoned, or an abort came while a split was running). Every use
    /// checks it; it mirrors [`Teardown::unusable`], and is set only with `teardown` locked.
    aborted: AtomicBool,
    /// Who may call NCCL on the handle, and who releases it.
    teardown: Mutex<Teardown>,
    label: String,
    /// The rank's CUDA context, kept alive until the communicator is destroyed (which may
    /// happen on a teardown thread after the rank's device is gone).
    cuda: Arc<CudaContext>,
}

// SAFETY: an NCCL communicator may be used from any thread as long as calls on it are not
// concurrent. symmcomm calls it from the rank that owns it (one thread at a time, with the
// rank's CUDA context bound), or from the helper thread of a split while the rank's thread only
// waits; a split in flight defers every other NCCL call on the parent (`Teardown`), and
// `abort_now` and `Drop` go through the same state.
unsafe impl Send for OwnedComm {}
// SAFETY: see `Send`; shared references only read the handle.
unsafe impl Sync for OwnedComm {}

/// A communicator's teardown state. Exactly one party releases the handle (`ncclCommAbort`
/// or `ncclCommDestroy`), and never while a split of it runs on a helper thread.
#[derive(Debug, Default)]
struct Teardown {
    /// A split of this communicator runs on a helper thread (which holds an `Arc` of it, so it
    /// is not dropped meanwhile): nothing else may call NCCL on it.
    split_in_flight: bool,
    /// The communicator may not be used any more.
    unusable: bool,
    /// `ncclCommAbort` is owed: the split thread runs it when its call returns.
    abort_owed: bool,
    /// The handle was released (or its release started); nothing may release it again.
    released: bool,
    /// Why it is unusable, when something more specific than "aborted" is known.
    reason: Option<String>,
}

/// What an abort request must do.
#[derive(Debug, PartialEq, Eq)]
enum AbortNow {
    /// Run `ncclCommAbort` now (this request released the handle).
    Run,
    /// A split is in flight: its thread aborts when the split returns.
    Deferred,
    /// Released or owed already.
    Done,
}

impl Teardown {
    /// Start a split; `false` when the communicator is unusable or a split already runs.
    fn begin_split(&mut self) -> bool {
        if self.unusable || self.released || self.split_in_flight {
            return false;
        }
        self.split_in_flight = true;
        true
    }

    /// Abort was asked for (the first specific reason is kept).
    fn request_abort(&mut self, reason: Option<String>) -> AbortNow {
        self.unusable = true;
        if self.reason.is_none() {
            self.reason = reason;
        }
        if self.released || self.abort_owed {
            AbortNow::Done
        } else if self.split_in_flight {
            self.abort_owed = true;
            AbortNow::Deferred
        } else {
            self.released = true;
            AbortNow::Run
        }
    }

    /// The split's call returned; `true` when its thread must now run the owed abort.
    fn end_split(&mut self) -> bool {
        self.split_in_flight = false;
        let owed = std::mem::take(&mut self.abort_owed);
        if owed {
            self.released = true;
        }
        owed
    }

    /// At drop (no split can be in flight: it holds an `Arc`): whether the handle is still to be
    /// released.
    fn release_on_drop(&mut self) -> bool {
        debug_assert!(!self.split_in_flight && !self.abort_owed);
        !std::mem::replace(&mut self.released, true)
    }
}

/// What a blocking, collective communicator creation needs to have a deadline.
#[derive(Debug)]
pub(crate) struct Creation<'a> {
    /// The operation on whose behalf the communicator is made (rank, group, world size).
    pub(crate) ctx: &'a OpCtx,
    /// The rank's CUDA context, made current on the helper thread.
    pub(crate) cuda: &'a Arc<CudaContext>,
    /// How long peers have to join.
    pub(crate) deadline: Duration,
    /// The communicator's abort flag, polled while waiting.
    pub(crate) abort: &'a AbortFlag,
}

/// Run the blocking creation `create` (the NCCL call of `which`, doing `what`) on a helper
/// thread with the rank's context current, and wait for it with the deadline. When the caller gives up
/// first, `abandon` runs (with why) and the communicator the call returns later, if any, is
/// aborted on the helper thread.
fn create_with_deadline(
    how: &Creation<'_>,
    which: NcclCreation,
    what: &str,
    create: impl FnOnce() -> Result<OwnedComm> + Send + 'static,
    abandon: impl FnOnce(&str),
) -> Result<OwnedComm> {
    let (call, thread) = call_and_thread(which);
    let cuda = how.cuda.clone();
    let bind_ctx = how.ctx.clone();
    let start = Instant::now();
    let made = call_with_deadline(
        thread,
        start + how.deadline,
        || how.abort.check(how.ctx),
        move || {
            cuda.bind_to_thread()
                .map_err(|e| Error::Cuda {
                    ctx: bind_ctx,
                    call: "cuCtxSetCurrent",
                    message: e.to_string(),
                })
                .and_then(|()| create())
        },
        move |late: Result<OwnedComm>| match late {
            Ok(comm) => {
                tracing::warn!(comm = %comm.label, "{call} returned after its caller gave up: aborting the new communicator");
                // Drop aborts a failed communicator (on this thread, the context current).
                comm.failed.store(true, Ordering::Relaxed);
                drop(comm);
            }
            Err(e) => tracing::warn!("{call} returned after its caller gave up: {e}"),
        },
    );
    match made {
        Ok(made) => made,
        Err(GaveUp::Spawn(e)) => Err(Error::io(
            format!("{}: starting the thread that calls {call}", how.ctx),
            e,
        )),
        Err(GaveUp::Deadline) => {
            let why = format!(
                "{call} ({what}) did not return within its deadline of {:?}: a peer did not join (it never made the matching {call} call, or died before it)",
                how.deadline
            );
            abandon(&why);
            Err(Error::Timeout {
                ctx: how.ctx.clone(),
                waited: start.elapsed(),
                detail: format!(
                    "{why}; the call is left to a helper thread, which aborts whatever it returns"
                ),
            })
        }
        Err(GaveUp::Polled(e)) => {
            abandon(&format!("{call} ({what}) was abandoned: {e}"));
            Err(e)
        }
    }
}

/// The NCCL call that makes a communicator, and the name of the helper thread that calls it.
fn call_and_thread(which: NcclCreation) -> (&'static str, &'static str) {
    match which {
        NcclCreation::InitRank => ("ncclCommInitRankConfig", "symmcomm-nccl-init"),
        NcclCreation::Split => ("ncclCommSplit", "symmcomm-nccl-split"),
    }
}

/// `Err` when the test hook says this thread skips `which` (see [`test_hooks`]).
fn skipped_by_test_hook(which: NcclCreation, ctx: &OpCtx) -> Result<()> {
    if test_hooks::take_skip(which) {
        return Err(Error::InvalidArgument {
            ctx: ctx.clone(),
            detail: format!(
                "skipped by the test hook skip_next_nccl_creation: this rank never called {}",
                call_and_thread(which).0
            ),
        });
    }
    Ok(())
}

/// A split of `parent` running on a helper thread. While it lives nothing else calls NCCL on
/// the parent (an abort is deferred); dropping it ends the split and runs an abort owed
/// meanwhile. It holds an `Arc` of the parent, so the parent is not dropped under the split.
struct SplitInFlight(Arc<OwnedComm>);

impl SplitInFlight {
    fn begin(parent: &Arc<OwnedComm>, ctx: &OpCtx) -> Result<Self> {
        if !parent.teardown().begin_split() {
            parent.live(ctx)?;
            return Err(Error::InvalidArgument {
                ctx: ctx.clone(),
                detail: format!(
                    "a split of NCCL communicator {} is already running",
                    parent.label
                ),
            });
        }
        Ok(SplitInFlight(parent.clone()))
    }
}

impl Drop for SplitInFlight {
    fn drop(&mut self) {
        let parent = &self.0;
        if parent.teardown().end_split() {
            // SAFETY: the split returned, so no NCCL call on the parent runs; the abort was owed
            // to this thread and `end_split` marked the handle released, so nobody else
            // releases it; the rank's context is current on this thread.
            let r = unsafe { parent.nccl.comm_abort(parent.comm) };
            tracing::warn!(comm = %parent.label, code = %r.name(), "NCCL communicator aborted after its split returned");
        }
    }
}

impl OwnedComm {
    fn new(nccl: &'static Nccl, comm: RawComm, label: &str, cuda: Arc<CudaContext>) -> Self {
        OwnedComm {
            nccl,
            comm,
            failed: AtomicBool::new(false),
            aborted: AtomicBool::new(false),
            teardown: Mutex::new(Teardown::default()),
            label: label.into(),
            cuda,
        }
    }

    fn teardown(&self) -> MutexGuard<'_, Teardown> {
        self.teardown.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Join the communicator named by `id` as `rank` of `size` (collective), within the
    /// deadline: a peer that never joins is `Error::Timeout`, not a hang.
    pub(crate) fn init(
        nccl: &'static Nccl,
        id: &UniqueId,
        size: usize,
        rank: usize,
        label: &str,
        how: &Creation<'_>,
    ) -> Result<Self> {
        skipped_by_test_hook(NcclCreation::InitRank, how.ctx)?;
        let (id, owned_label, ctx) = (*id, label.to_string(), how.ctx.clone());
        let cuda = how.cuda.clone();
        create_with_deadline(
            how,
            NcclCreation::InitRank,
            &format!("joining {label} as rank {rank} of {size}"),
            move || Self::init_blocking(nccl, &id, size, rank, &owned_label, cuda, &ctx),
            |_| {},
        )
    }

    /// `ncclCommInitRankConfig` itself: blocks until every rank of the id has called it.
    fn init_blocking(
        nccl: &'static Nccl,
        id: &UniqueId,
        size: usize,
        rank: usize,
        label: &str,
        cuda: Arc<CudaContext>,
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
        Ok(OwnedComm::new(nccl, comm, label, cuda))
    }

    /// Split: ranks with equal `color` form a new communicator ordered by `key` (collective
    /// over `self`), within the deadline. When it passes, the split is left running on its
    /// thread and `self` becomes unusable (`live` says why): its abort is deferred to that
    /// thread, which runs it when the split returns, since nothing may call NCCL on `self`
    /// meanwhile.
    pub(crate) fn split(
        self: &Arc<Self>,
        color: usize,
        key: usize,
        label: &str,
        how: &Creation<'_>,
    ) -> Result<Self> {
        self.live(how.ctx)?;
        skipped_by_test_hook(NcclCreation::Split, how.ctx)?;
        let in_flight = SplitInFlight::begin(self, how.ctx)?;
        let (owned_label, ctx) = (label.to_string(), how.ctx.clone());
        create_with_deadline(
            how,
            NcclCreation::Split,
            &format!(
                "splitting {} into {label}, colour {color}, key {key}",
                self.label
            ),
            move || {
                let made = in_flight.0.split_blocking(color, key, &owned_label, &ctx);
                // The split returned: end it (and run an abort owed meanwhile) now.
                drop(in_flight);
                made
            },
            |why| {
                self.abort_for(Some(format!(
                    "{why}; the parent may be mid-split, so it is aborted"
                )))
            },
        )
    }

    /// `ncclCommSplit` itself: blocks until every rank of `self` has called it.
    fn split_blocking(&self, color: usize, key: usize, label: &str, ctx: &OpCtx) -> Result<Self> {
        let mut comm: RawComm = std::ptr::null_mut();
        // SAFETY: `self.comm` is live (the split is in flight, so nothing aborts it meanwhile);
        // `comm` is valid for writing; a null config inherits the parent's; every rank of
        // `self` calls this in the same order; the rank's context is current on this thread.
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
        Ok(OwnedComm::new(self.nccl, comm, label, self.cuda.clone()))
    }

    /// The raw handle, for calls that pass it to NCCL. Callers on the rank's thread check
    /// [`OwnedComm::live`] first (the device does, before any enqueue).
    pub(crate) fn raw(&self) -> RawComm {
        self.comm
    }

    /// The handle, or `Err(Aborted)` (saying why) once the communicator is unusable.
    pub(crate) fn live(&self, ctx: &OpCtx) -> Result<RawComm> {
        if self.is_aborted() {
            let why = self.teardown().reason.clone();
            let reason = match why {
                Some(why) => format!("NCCL communicator {} is unusable: {why}", self.label),
                None => format!("NCCL communicator {} was aborted", self.label),
            };
            return Err(Error::Aborted {
                ctx: ctx.clone(),
                reason,
            });
        }
        Ok(self.comm)
    }

    /// Whether the handle may no longer be passed to NCCL: `ncclCommAbort` ran, or is owed to
    /// the thread of a split in flight.
    pub(crate) fn is_aborted(&self) -> bool {
        self.aborted.load(Ordering::Acquire)
    }

    /// Abort now (once): NCCL kernels waiting on peers exit and the handle is released. Called
    /// from the rank's own thread; when a split of this communicator is in flight on its helper
    /// thread, the abort is left to that thread, which runs it when the split returns.
    pub(crate) fn abort_now(&self) {
        self.abort_for(None);
    }

    /// [`OwnedComm::abort_now`], with why the communicator is unusable (for `live`'s error).
    fn abort_for(&self, reason: Option<String>) {
        let action = {
            let mut t = self.teardown();
            let action = t.request_abort(reason);
            self.failed.store(true, Ordering::Relaxed);
            self.aborted.store(true, Ordering::Release);
            action
        };
        match action {
            AbortNow::Done => return,
            AbortNow::Deferred => {
                tracing::warn!(comm = %self.label, "NCCL communicator abort deferred until its split returns");
                return;
            }
            AbortNow::Run => {}
        }
        // `ncclCommAbort` frees device memory, which waits for NCCL's kernels; a kernel stuck on
        // a dead peer may never end, so the abort runs on its own thread and is waited for only
        // briefly: the caller's error must not wait for it.
        let (nccl, comm) = (self.nccl, self.comm as usize);
        let aborted = call_with_deadline(
            "symmcomm-abort",
            Instant::now() + Duration::from_millis(300),
            || Ok(()),
            move || {
                // SAFETY: the communicator is live (`request_abort` released it just now, once),
                // no split of it is in flight (else the abort would have been deferred), and
                // nothing else uses it from now on (every use checks the flag).
                unsafe { nccl.comm_abort(comm as RawComm) }
            },
            |_| {},
        );
        match aborted {
            Ok(r) => {
                tracing::warn!(comm = %self.label, code = %r.name(), "NCCL communicator aborted")
            }
            Err(GaveUp::Spawn(e)) => {
                tracing::warn!(comm = %self.label, error = %e, "NCCL communicator not aborted: no thread for the abort")
            }
            Err(_) => {
                tracing::warn!(comm = %self.label, "NCCL communicator abort still running (its kernels have not ended)")
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
        let t = self.teardown.get_mut().unwrap_or_else(|p| p.into_inner());
        if !t.release_on_drop() {
            return;
        }
        let abort = t.unusable || self.failed.load(Ordering::Relaxed);
        if abort {
            // Abort when something failed: finalize would wait for peers that may be gone.
            // SAFETY: the communicator was not released before (per `release_on_drop`), no
            // window, group or split uses it any more (they hold an `Arc` to it), and it is
            // dropped once.
            let r = unsafe { self.nccl.comm_abort(self.comm) };
            if !r.is_success() {
                tracing::warn!(comm = %self.label, code = %r.name(), "NCCL communicator abort failed");
            }
            return;
        }
        // A healthy communicator is destroyed on a teardown thread (`teardown.rs` says why).
        let (nccl, comm, label, cuda) = (
            self.nccl,
            SendComm(self.comm),
            std::mem::take(&mut self.label),
            self.cuda.clone(),
        );
        super::teardown::run("symmcomm-nccl-destroy", TEARDOWN_SLOT_WAIT, move || {
            let comm = comm;
            if let Err(e) = cuda.bind_to_thread() {
                tracing::warn!(comm = %label, error = %e, "cannot bind the context to destroy an NCCL communicator");
            }
            // SAFETY: the communicator was not released before (per `release_on_drop`),
            // nothing uses it any more (its `OwnedComm` is being dropped, and windows,
            // groups and splits hold an `Arc` to that), and it is destroyed once, here; its
            // context is held alive by `cuda`.
            let r = unsafe { nccl.comm_destroy(comm.0) };
            if !r.is_success() {
                tracing::warn!(comm = %label, code = %r.name(), "NCCL communicator teardown failed");
            }
        });
    }
}

/// How long a drop waits for a free teardown slot before destroying on its own thread.
const TEARDOWN_SLOT_WAIT: Duration = Duration::from_secs(30);

/// A communicator handle on its way to a teardown thread.
struct SendComm(RawComm);

// SAFETY: the handle is moved to exactly one teardown thread, the only one that uses it after
// its `OwnedComm` was dropped (see `OwnedComm`'s `Send`).
unsafe impl Send for SendComm {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_abort_without_a_split_runs_once() {
        let mut t = Teardown::default();
        assert_eq!(t.request_abort(None), AbortNow::Run);
        assert_eq!(t.request_abort(Some("later".into())), AbortNow::Done);
        assert!(t.unusable && t.released);
        assert_eq!(t.reason.as_deref(), Some("later"));
        assert!(!t.begin_split());
        assert!(!t.release_on_drop());
    }

    #[test]
    fn an_abort_during_a_split_is_run_by_the_split_thread_once() {
        let mut t = Teardown::default();
        assert!(t.begin_split());
        assert!(!t.begin_split(), "one split at a time");
        assert_eq!(
            t.request_abort(Some("ncclCommSplit did not return".into())),
            AbortNow::Deferred
        );
        assert!(t.unusable && !t.released);
        assert_eq!(t.request_abort(None), AbortNow::Done);
        assert_eq!(t.reason.as_deref(), Some("ncclCommSplit did not return"));
        assert!(t.end_split(), "the split thread runs the owed abort");
        assert!(!t.release_on_drop());
    }

    #[test]
    fn an_abort_after_the_split_returned_runs_at_once() {
        let mut t = Teardown::default();
        assert!(t.begin_split());
        assert!(!t.end_split(), "nothing owed");
        assert_eq!(t.request_abort(None), AbortNow::Run);
        assert!(!t.release_on_drop());
    }

    #[test]
    fn a_healthy_communicator_is_released_by_drop() {
        let mut t = Teardown::default();
        assert!(t.begin_split());
        assert!(!t.end_split());
        assert!(t.release_on_drop());
        assert!(!t.release_on_drop());
    }

    #[test]
    fn concurrent_aborts_and_split_ends_release_exactly_once() {
        for _ in 0..500 {
            let t = Arc::new(Mutex::new(Teardown::default()));
            assert!(t.lock().unwrap().begin_split());
            let releases = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let (a, ra) = (t.clone(), releases.clone());
            let split = std::thread::spawn(move || {
                if a.lock().unwrap().end_split() {
                    ra.fetch_add(1, Ordering::SeqCst);
                }
            });
            let aborters: Vec<_> = (0..2)
                .map(|_| {
                    let (b, rb) = (t.clone(), releases.clone());
                    std::thread::spawn(move || {
                        if b.lock().unwrap().request_abort(None) == AbortNow::Run {
                            rb.fetch_add(1, Ordering::SeqCst);
                        }
                    })
                })
                .collect();
            split.join().unwrap();
            aborters.into_iter().for_each(|h| h.join().unwrap());
            if t.lock().unwrap().release_on_drop() {
                releases.fetch_add(1, Ordering::SeqCst);
            }
            assert_eq!(releases.load(Ordering::SeqCst), 1);
        }
    }
}
