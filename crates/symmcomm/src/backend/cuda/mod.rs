//! The CUDA backend: one device and one stream per rank, NCCL communicators per group,
//! symmetric windows from `ncclMemAlloc`, CUDA graph capture, and our kernels compiled by
//! NVRTC. Every wait polls NCCL's asynchronous errors against the communicator's deadline;
//! creating an NCCL communicator (blocking and collective) has that deadline too.

mod dcp;
mod driver;
mod group;
mod handoff;
#[cfg(feature = "lab")]
pub(crate) mod limits;
mod memory;
mod modules;
mod nccl;
mod norm;
mod own;
mod peers;
mod retain;
mod teardown;
#[doc(hidden)]
pub mod test_hooks;

use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use cudarc::driver::sys;
use cudarc::driver::{CudaContext, CudaGraph, CudaStream};
use nccl_sys::{Nccl, Version};

use self::driver::{Event, check};
use self::group::CudaGroup;
use self::memory::{DeviceAlloc, ForeignDevice};
use self::modules::UtilKernels;
use self::nccl::{Creation, OwnedComm};
use crate::abort::{self, AbortFlag};
use crate::backend::{
    AddRmsNormStep, BackendKind, Copy2d, DcpCorrect, DeviceConfig, Exec, GraphExec, GroupBackend,
    RankBackend, StreamSel,
};
use crate::bootstrap::ControlPlane;
#[cfg(feature = "lab")]
use crate::dtype::DType;
use crate::error::{Error, Op, OpCtx, Result};
use crate::memory::{MemRef, Memory};
use crate::topology::GroupTopology;

/// NCCL 2.28.0 to 2.30.6 launch their symmetric kernels with programmatic dependent launch
/// but lost the `cudaGridDependencySynchronize` those kernels need (restored in 2.30.7).
pub fn pdl_hazard(v: Version) -> bool {
    Version::new(2, 28, 0) <= v && v <= Version::new(2, 30, 6)
}

/// Whether the CUDA backend can start here: the driver, a device, and NCCL. Returns the
/// number of devices.
pub(crate) fn probe() -> std::result::Result<usize, String> {
    // SAFETY: only tries to dlopen the driver library.
    if !unsafe { sys::is_culib_present() } {
        return Err("no CUDA driver (libcuda.so.1 not found)".into());
    }
    cudarc::driver::result::init().map_err(|e| format!("cuInit failed: {e}"))?;
    let n = cudarc::driver::result::device::get_count()
        .map_err(|e| format!("cuDeviceGetCount failed: {e}"))?;
    if n <= 0 {
        return Err("the CUDA driver sees no device".into());
    }
    Nccl::load().map_err(|e| e.to_string())?;
    Ok(n as usize)
}

/// Whether the driver sees a device (NCCL not needed).
fn probe_driver() -> std::result::Result<(), String> {
    // SAFETY: only tries to dlopen the driver library.
    if !unsafe { sys::is_culib_present() } {
        return Err("no CUDA driver".into());
    }
    cudarc::driver::result::init().map_err(|e| e.to_string())?;
    match cudarc::driver::result::device::get_count() {
        Ok(n) if n > 0 => Ok(()),
        _ => Err("no device".into()),
    }
}

/// Set once any communicator of the process was aborted: the device work queued then may
/// never finish (a kernel of NCCL's waiting for a dead peer), so releasing memory, which would
/// wait for it, is skipped from then on (the memory is left to the process's exit), and the
/// contexts are kept, so that nothing hangs after an abort.
pub(crate) static ABANDONED: AtomicBool = AtomicBool::new(false);

/// Contexts kept alive after an abort (see [`ABANDONED`]).
static KEPT_CONTEXTS: Mutex<Vec<Arc<CudaContext>>> = Mutex::new(Vec::new());

/// Number of usable devices, or why none.
pub(crate) fn device_count() -> std::result::Result<usize, String> {
    probe()
}

/// One visible GPU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuInfo {
    /// CUDA ordinal.
    pub ordinal: usize,
    /// Model name.
    pub name: String,
    /// Compute capability.
    pub cc: (i32, i32),
    /// Device memory in bytes.
    pub memory: usize,
}

/// The visible GPUs (no context is created).
pub fn gpus() -> std::result::Result<Vec<GpuInfo>, String> {
    // SAFETY: only tries to dlopen the driver library.
    if !unsafe { sys::is_culib_present() } {
        return Err("no CUDA driver (libcuda.so.1 not found)".into());
    }
    use cudarc::driver::result::device;
    cudarc::driver::result::init().map_err(|e| format!("cuInit failed: {e}"))?;
    let n = device::get_count().map_err(|e| e.to_string())?;
    (0..n)
        .map(|i| {
            let d = device::get(i).map_err(|e| e.to_string())?;
            let attr = |a| {
                // SAFETY: `d` is a valid device handle.
                unsafe { device::get_attribute(d, a) }.map_err(|e| e.to_string())
            };
            Ok(GpuInfo {
                ordinal: i as usize,
                name: device::get_name(d).map_err(|e| e.to_string())?,
                cc: (
                    attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
                    attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
                ),
                // SAFETY: `d` is a valid device handle.
                memory: unsafe { device::total_mem(d) }.map_err(|e| e.to_string())?,
            })
        })
        .collect()
}

/// The NCCL library the backend uses, if it loads.
pub fn nccl() -> std::result::Result<&'static Nccl, String> {
    Nccl::load().map_err(|e| e.to_string())
}

/// The NVIDIA kernel driver's version (`580.159.04`), from `/proc/driver/nvidia/version`.
pub fn driver_version() -> Option<String> {
    let text = std::fs::read_to_string("/proc/driver/nvidia/version").ok()?;
    let line = text.lines().next()?;
    line.split_whitespace()
        .find(|w| {
            w.chars().filter(|c| *c == '.').count() >= 1
                && w.chars().all(|c| c.is_ascii_digit() || c == '.')
        })
        .map(str::to_string)
}

/// Start the CUDA device of this rank.
pub(crate) fn start(config: &DeviceConfig, abort: &Arc<AbortFlag>) -> Result<Arc<dyn RankBackend>> {
    let op = check_device_visible(config)?;
    let ctx = primary_context(config, &op)?;
    let dev = Arc::new(DeviceShared::new(config, abort, ctx, &op)?);
    // The utility module (the guard kernel among others) loads now, never inside a capture; a
    // failure is kept and reported where a kernel of it is needed.
    let _ = dev.util();
    Ok(Arc::new(CudaDevice { dev }))
}

/// Check that the driver, NCCL and this rank's device are there; returns the context that
/// errors on the device carry.
fn check_device_visible(config: &DeviceConfig) -> Result<OpCtx> {
    // A missing or unusable NCCL is its own error (the library path and why), not "no GPU".
    if probe_driver().is_ok() {
        Nccl::load()?;
    }
    let count = probe().map_err(|reason| Error::NoGpu { reason })?;
    let ordinal = config.ordinal;
    let op = OpCtx {
        op: Op::Init,
        group: format!("cuda:{ordinal}"),
        rank: config.rank,
        world: config.world,
        bytes: 0,
    };
    if ordinal >= count {
        return Err(Error::NoGpu {
            reason: format!(
                "rank {} wants device {ordinal}, but only {count} are visible",
                config.rank
            ),
        });
    }
    Ok(op)
}

/// A cudarc error of driver call `call` as [`Error::Cuda`].
fn cuda_error(op: &OpCtx, call: &'static str) -> impl FnOnce(cudarc::driver::DriverError) -> Error {
    move |e| Error::Cuda {
        ctx: op.clone(),
        call,
        message: e.to_string(),
    }
}

/// Our own handle on the device's primary context (an engine's `CudaContext` is that same
/// context; its settings, event tracking included, stay the engine's), with event tracking off
/// in this handle.
fn primary_context(config: &DeviceConfig, op: &OpCtx) -> Result<Arc<CudaContext>> {
    let ordinal = config.ordinal;
    let ctx = CudaContext::new(ordinal).map_err(cuda_error(op, "cuDevicePrimaryCtxRetain"))?;
    if let Some(engine) = &config.cuda_context
        && engine.cu_ctx() != ctx.cu_ctx()
    {
        return Err(Error::InvalidArgument {
            ctx: op.clone(),
            detail: format!(
                "the engine's CUDA context (device {}) is not the primary context of device \
                 {ordinal}, which symmcomm runs on",
                engine.ordinal()
            ),
        });
    }
    // SAFETY: symmcomm never hands cudarc slices to this handle, so nothing relies on
    // cudarc's event tracking.
    unsafe { ctx.disable_event_tracking() };
    Ok(ctx)
}

/// What a rank's device and its groups share.
#[derive(Debug)]
pub(crate) struct DeviceShared {
    rank: usize,
    ordinal: usize,
    pub(crate) ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    /// A second stream, forked from and joined back to `stream` with `fork` and `join`, for
    /// work that overlaps (a local copy beside NVLink copies).
    side: Arc<CudaStream>,
    fork: Event,
    join: Event,
    pub(crate) nccl: &'static Nccl,
    name: String,
    cc: (i32, i32),
    util: OnceLock<std::result::Result<UtilKernels, String>>,
    dcp: OnceLock<std::result::Result<dcp::DcpKernels, String>>,
    norm: OnceLock<std::result::Result<norm::NormKernels, String>>,
    /// Our collective kernels, loaded once per device and shared by every group on it.
    collectives: OnceLock<std::result::Result<own::CollectiveFunctions, String>>,
    scratch: OnceLock<DeviceAlloc>,
    /// Serialises capture begin/end.
    graph: Mutex<()>,
    comms: Mutex<Vec<Weak<OwnedComm>>>,
    timeout: Duration,
    /// The communicator's abort flag: every wait polls it.
    abort: Arc<AbortFlag>,
    /// Collectives enqueued since the last completed wait (the last few), so a wait that runs
    /// past its deadline names what was pending.
    pending: Mutex<std::collections::VecDeque<OpCtx>>,
    /// Launch the guard kernel before NCCL's symmetric kernels (affected NCCL versions).
    pub(crate) pdl_guard: bool,
    /// Workspace slot of our own kernels (0: off).
    kernel_slot_bytes: usize,
    /// Launch our kernels with programmatic dependent launch (compute capability 9.0+).
    pub(crate) own_kernels_pdl: bool,
    /// Our kernels' groups, whose device-side error state every wait checks.
    own: Mutex<Vec<(Weak<own::OwnKernels>, String)>>,
}

/// What `cell` holds, loading it with `load` on first use; a failure is kept too (loading again
/// would fail the same way) and reported as `NoGpu` naming `what`.
fn loaded_once<'a, T>(
    cell: &'a OnceLock<std::result::Result<T, String>>,
    what: &str,
    load: impl FnOnce() -> Result<T>,
) -> Result<&'a T> {
    cell.get_or_init(|| load().map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|reason| Error::NoGpu {
            reason: format!("{what} unavailable: {reason}"),
        })
}

impl Drop for DeviceShared {
    /// The device goes last: its groups' communicators are on their teardown threads by now;
    /// let them finish (within the deadline), so that the process does not end under them.
    fn drop(&mut self) {
        teardown::wait_idle(self.timeout);
    }
}

impl DeviceShared {
    /// The device on `ctx`: its two streams and the events that fork and join them, its name
    /// and compute capability, and NCCL; each kernel module loads on its first use.
    fn new(
        config: &DeviceConfig,
        abort: &Arc<AbortFlag>,
        ctx: Arc<CudaContext>,
        op: &OpCtx,
    ) -> Result<Self> {
        let stream = ctx.new_stream().map_err(cuda_error(op, "cuStreamCreate"))?;
        let side = ctx.new_stream().map_err(cuda_error(op, "cuStreamCreate"))?;
        let fork = Event::new(false, op)?;
        let join = Event::new(false, op)?;
        let name = ctx.name().unwrap_or_else(|_| "CUDA device".into());
        let cc = ctx
            .compute_capability()
            .map_err(cuda_error(op, "cuDeviceGetAttribute"))?;
        let nccl = Nccl::load()?;
        Ok(DeviceShared {
            rank: config.rank,
            ordinal: config.ordinal,
            ctx,
            stream,
            side,
            fork,
            join,
            nccl,
            name,
            cc,
            util: OnceLock::new(),
            dcp: OnceLock::new(),
            norm: OnceLock::new(),
            collectives: OnceLock::new(),
            scratch: OnceLock::new(),
            graph: Mutex::new(()),
            comms: Mutex::new(Vec::new()),
            timeout: config.timeout,
            abort: abort.clone(),
            pending: Mutex::new(std::collections::VecDeque::new()),
            pdl_guard: config.pdl_guard && pdl_hazard(nccl.version()),
            kernel_slot_bytes: config.kernel_slot_bytes,
            own_kernels_pdl: config.own_kernels_pdl && cc.0 >= 9,
            own: Mutex::new(Vec::new()),
        })
    }

    fn op(&self, op: Op, bytes: usize) -> OpCtx {
        OpCtx {
            op,
            group: format!("cuda:{}", self.ordinal),
            rank: self.rank,
            world: 1,
            bytes,
        }
    }

    /// Make this device's context current on the calling thread.
    pub(crate) fn bind(&self, ctx: &OpCtx) -> Result<()> {
        self.ctx.bind_to_thread().map_err(|e| Error::Cuda {
            ctx: ctx.clone(),
            call: "cuCtxSetCurrent",
            message: e.to_string(),
        })
    }

    /// The `CUstream` work for `s` goes to.
    pub(crate) fn raw(&self, s: StreamSel) -> sys::CUstream {
        match s {
            StreamSel::Own => self.stream.cu_stream(),
            StreamSel::Cuda(raw) => raw as usize as sys::CUstream,
        }
    }

    /// Run `side_work` on the side stream, ordered after everything queued so far on `s`;
    /// returns after enqueueing. [`DeviceShared::join_side`] orders `s` after it. Both work
    /// under graph capture (the events become graph edges).
    pub(crate) fn fork_side(
        &self,
        s: StreamSel,
        ctx: &OpCtx,
        side_work: impl FnOnce(sys::CUstream) -> Result<()>,
    ) -> Result<()> {
        self.fork.record(self.raw(s), ctx)?;
        // SAFETY: both streams and the event belong to the current context.
        let r = unsafe { sys::cuStreamWaitEvent(self.side.cu_stream(), self.fork.raw(), 0) };
        check(r, "cuStreamWaitEvent", ctx)?;
        side_work(self.side.cu_stream())?;
        self.join.record(self.side.cu_stream(), ctx)
    }

    /// Order `s` after the side work of the last [`DeviceShared::fork_side`].
    pub(crate) fn join_side(&self, s: StreamSel, ctx: &OpCtx) -> Result<()> {
        // SAFETY: as in `fork_side`.
        let r = unsafe { sys::cuStreamWaitEvent(self.raw(s), self.join.raw(), 0) };
        check(r, "cuStreamWaitEvent", ctx)
    }

    /// Whether `s` is being captured now. A capture that an error invalidated is an error.
    pub(crate) fn capturing(&self, s: StreamSel, ctx: &OpCtx) -> Result<bool> {
        self.bind(ctx)?;
        let mut status = sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE;
        // SAFETY: `status` is valid for writing; the stream is this context's (checked when the
        // group was bound to it) or the legacy default stream.
        let r = unsafe { sys::cuStreamIsCapturing(self.raw(s), &mut status) };
        check(r, "cuStreamIsCapturing", ctx)?;
        match status {
            sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE => Ok(false),
            sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_ACTIVE => Ok(true),
            _ => Err(Error::Cuda {
                ctx: ctx.clone(),
                call: "cuStreamIsCapturing",
                message: "the stream's capture was invalidated by an earlier error; end it \
                          (cuStreamEndCapture) and capture again"
                    .into(),
            }),
        }
    }

    /// The utility kernels, compiled and loaded on first use.
    pub(crate) fn util(&self) -> Result<&UtilKernels> {
        loaded_once(&self.util, "utility kernels", || {
            UtilKernels::load(&self.ctx, self.cc, &self.op(Op::Kernel, 0))
        })
    }

    /// The DCP kernels, compiled and loaded on first use (never inside a capture: loading a
    /// module there is an error naming the operation; `Group::prepare` and the combine's
    /// constructor load it before).
    pub(crate) fn dcp(&self, capturing: bool, ctx: &OpCtx) -> Result<&dcp::DcpKernels> {
        if capturing && self.dcp.get().is_none() {
            return Err(Error::DuringCapture {
                ctx: ctx.clone(),
                action: "loading the DCP kernels (call Group::prepare before capturing)".into(),
            });
        }
        loaded_once(&self.dcp, "DCP kernels", || {
            dcp::DcpKernels::load(&self.ctx, self.cc, &self.op(Op::DcpCombine, 0))
        })
    }

    /// The add-RMSNorm kernels, compiled and loaded on first use (never inside a capture, as
    /// for [`DeviceShared::dcp`]; `Group::prepare` loads them before).
    pub(crate) fn norm(&self, capturing: bool, ctx: &OpCtx) -> Result<&norm::NormKernels> {
        if capturing && self.norm.get().is_none() {
            return Err(Error::DuringCapture {
                ctx: ctx.clone(),
                action: "loading the add-RMSNorm kernels (call Group::prepare before capturing)"
                    .into(),
            });
        }
        loaded_once(&self.norm, "add-RMSNorm kernels", || {
            norm::NormKernels::load(&self.ctx, self.cc, &self.op(Op::Kernel, 0))
        })
    }

    /// Our collective kernels, compiled and loaded on first use (once per device: groups made
    /// and dropped many times do not load the module again).
    pub(crate) fn collectives(&self) -> Result<&own::CollectiveFunctions> {
        loaded_once(&self.collectives, "our collective kernels", || {
            own::CollectiveFunctions::load(&self.ctx, self.cc, &self.op(Op::Kernel, 0))
        })
    }

    /// 256 bytes of device memory for warm-ups.
    pub(crate) fn scratch(&self, ctx: &OpCtx) -> Result<u64> {
        if let Some(s) = self.scratch.get() {
            return Ok(s.ptr);
        }
        let a = alloc(&self.ctx, 256, ctx)?;
        Ok(self.scratch.get_or_init(|| a).ptr)
    }

    /// Remember a communicator so waits poll its asynchronous errors.
    pub(crate) fn track(&self, c: &Arc<OwnedComm>) {
        let mut v = self.comms.lock().unwrap_or_else(|p| p.into_inner());
        v.retain(|w| w.strong_count() > 0);
        v.push(Arc::downgrade(c));
    }

    /// The watchdog's poll inside every wait: the abort flag (another rank or thread of this
    /// process gave up), then NCCL's asynchronous errors of every communicator.
    fn poll_comms(&self, ctx: &OpCtx) -> Result<()> {
        self.abort.check(ctx)?;
        let comms: Vec<Arc<OwnedComm>> = self
            .comms
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        for c in comms {
            c.async_error(ctx)?;
        }
        Ok(())
    }

    /// What creating a communicator of this device needs to have the deadline: the context to
    /// bind on the helper thread that makes the blocking call, and the abort flag to poll.
    pub(crate) fn creation<'a>(&'a self, ctx: &'a OpCtx) -> Creation<'a> {
        Creation {
            ctx,
            cuda: &self.ctx,
            deadline: self.timeout,
            abort: &self.abort,
        }
    }

    /// A communicator creation failed with `e`. After a deadline or an abort the creation call
    /// is still running on its helper thread (a parent mid-split, its windows registered): from
    /// now on release no memory, abort every other communicator of this device, and abort
    /// every communicator of the process, as any deadline does.
    pub(crate) fn creation_failed(&self, e: Error) -> Error {
        if matches!(e, Error::Timeout { .. } | Error::Aborted { .. }) {
            self.abandon_memory();
            self.abort_comms();
            abort::on_error(&e);
        }
        e
    }

    /// Release no device memory from now on (see [`ABANDONED`]), and keep this context.
    fn abandon_memory(&self) {
        ABANDONED.store(true, Ordering::Release);
        KEPT_CONTEXTS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(self.ctx.clone());
    }

    /// Abort every NCCL communicator of this device now (from the rank's own thread, so no
    /// other call on them runs concurrently): kernels waiting for a dead peer exit, and every
    /// later use of them is an error instead of a hang.
    fn abort_comms(&self) {
        let comms: Vec<Arc<OwnedComm>> = self
            .comms
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        if !comms.iter().any(|c| !c.is_aborted()) {
            return;
        }
        self.abandon_memory();
        for c in comms {
            c.abort_now();
        }
    }

    /// `Err(Aborted)` once the communicator was aborted, after aborting this device's NCCL
    /// communicators if that was not done yet.
    pub(crate) fn check_abort(&self, ctx: &OpCtx) -> Result<()> {
        let res = self.abort.check(ctx);
        if res.is_err() {
            self.abort_comms();
        }
        res
    }

    /// Wait for everything queued on `s`, polling NCCL's errors, within the deadline; then
    /// check our kernels' device-side error state.
    pub(crate) fn sync(&self, s: StreamSel, ctx: &OpCtx) -> Result<()> {
        self.check_abort(ctx)?;
        self.bind(ctx)?;
        let ev = Event::new(false, ctx)?;
        ev.record(self.raw(s), ctx)?;
        let res = ev
            .wait(Instant::now() + self.timeout, ctx, || self.poll_comms(ctx))
            .and_then(|()| self.check_own(ctx))
            .map_err(|e| self.name_pending(e));
        if res.is_ok() {
            self.pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clear();
        }
        if res.is_err() {
            // Peers may be gone: abort now, so that what is queued ends, and tell the process.
            self.abort_comms();
        }
        abort::on_failure(res)
    }

    /// Remember an enqueued collective until the next wait completes.
    pub(crate) fn note_pending(&self, ctx: &OpCtx) {
        let mut p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        if p.len() == 8 {
            p.pop_front();
        }
        p.push_back(ctx.clone());
    }

    /// A failed wait names the latest pending collective (its op, group and size) as the
    /// operation that did not complete, and lists the others.
    fn name_pending(&self, e: Error) -> Error {
        let pending = self
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let Some(last) = pending.back().cloned() else {
            return e;
        };
        let list: Vec<String> = pending.iter().map(|c| c.to_string()).collect();
        let also = format!(
            " (pending since the last completed wait: {})",
            list.join("; ")
        );
        match e {
            Error::Timeout { waited, detail, .. } => Error::Timeout {
                ctx: last,
                waited,
                detail: detail + &also,
            },
            Error::Aborted { reason, .. } => Error::Aborted {
                ctx: last,
                reason: reason + &also,
            },
            other => other,
        }
    }

    /// Remember a group's kernels so waits check their error state.
    fn track_own(&self, k: &Arc<own::OwnKernels>, label: &str) {
        let mut v = self.own.lock().unwrap_or_else(|p| p.into_inner());
        v.retain(|(w, _)| w.strong_count() > 0);
        v.push((Arc::downgrade(k), label.to_string()));
    }

    fn check_own(&self, ctx: &OpCtx) -> Result<()> {
        let live: Vec<(Arc<own::OwnKernels>, String)> = self
            .own
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter_map(|(w, l)| w.upgrade().map(|k| (k, l.clone())))
            .collect();
        for (k, label) in live {
            let c = OpCtx {
                group: label,
                ..ctx.clone()
            };
            k.check_state(&c)?;
        }
        Ok(())
    }
}

/// Allocate `bytes` of plain device memory.
fn alloc(ctx: &Arc<CudaContext>, bytes: usize, op: &OpCtx) -> Result<DeviceAlloc> {
    ctx.bind_to_thread().map_err(|e| Error::Cuda {
        ctx: op.clone(),
        call: "cuCtxSetCurrent",
        message: e.to_string(),
    })?;
    let mut ptr = 0u64;
    let r = {
        // SAFETY: `ptr` is valid for writing; the context is current.
        unsafe { sys::cuMemAlloc_v2(&mut ptr, bytes) }
    };
    check(r, "cuMemAlloc", op)?;
    Ok(DeviceAlloc {
        ptr,
        len: bytes,
        ctx: ctx.clone(),
    })
}

/// One rank's CUDA device.
#[derive(Debug)]
pub(crate) struct CudaDevice {
    dev: Arc<DeviceShared>,
}

/// A captured CUDA graph.
struct CudaGraphExec {
    graph: Option<CudaGraph>,
    dev: Arc<DeviceShared>,
}

impl std::fmt::Debug for CudaGraphExec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaGraph(cuda:{})", self.dev.ordinal)
    }
}

// SAFETY: graph handles are driver objects usable from any thread with the owning context
// current; replays bind it first and the graph is never used concurrently (`&self` replays are
// serialised by the rank that owns the graph).
unsafe impl Send for CudaGraphExec {}

impl GraphExec for CudaGraphExec {
    fn replay(&self) -> Result<()> {
        let ctx = self.dev.op(Op::Replay, 0);
        self.dev.check_abort(&ctx)?;
        self.dev.bind(&ctx)?;
        self.dev.note_pending(&ctx);
        match &self.graph {
            Some(g) => g.launch().map_err(|e| Error::Cuda {
                ctx,
                call: "cuGraphLaunch",
                message: e.to_string(),
            }),
            None => Ok(()),
        }
    }
}

fn cuda_of(r: &MemRef) -> u64 {
    r.addr()
}

impl RankBackend for CudaDevice {
    fn kind(&self) -> BackendKind {
        BackendKind::Cuda
    }

    fn describe(&self) -> String {
        format!(
            "{} (cuda:{}, sm_{}{}), NCCL {}",
            self.dev.name,
            self.dev.ordinal,
            self.dev.cc.0,
            self.dev.cc.1,
            self.dev.nccl.version()
        )
    }

    fn facts(&self) -> crate::backend::DeviceFacts {
        crate::backend::DeviceFacts {
            name: self.dev.name.clone(),
            nccl: Some(self.dev.nccl.version().to_string()),
            nccl_path: Some(self.dev.nccl.path().display().to_string()),
            driver: driver_version(),
            pdl_guard: Some(self.dev.pdl_guard),
        }
    }

    fn world_group(
        &self,
        control: Arc<ControlPlane>,
        topology: &GroupTopology,
    ) -> Result<Arc<dyn GroupBackend>> {
        Ok(Arc::new(CudaGroup::world(
            self.dev.clone(),
            control,
            topology,
        )?))
    }

    fn alloc_plain(&self, bytes: usize) -> Result<Arc<dyn Memory>> {
        let op = self.dev.op(Op::PoolAlloc, bytes);
        Ok(Arc::new(alloc(&self.dev.ctx, bytes, &op)?))
    }

    unsafe fn foreign(&self, addr: u64, bytes: usize, ctx: &OpCtx) -> Result<Arc<dyn Memory>> {
        self.dev.bind(ctx)?;
        Ok(Arc::new(ForeignDevice::check(
            addr,
            bytes,
            self.dev.ordinal,
            ctx,
        )?))
    }

    fn prepare(&self, ctx: &OpCtx) -> Result<()> {
        self.dev.bind(ctx)?;
        self.dev.util()?;
        self.dev.dcp(false, ctx)?;
        self.dev.norm(false, ctx)?;
        self.dev.collectives().map(|_| ())
    }

    fn check_stream(&self, s: StreamSel, ctx: &OpCtx) -> Result<()> {
        let StreamSel::Cuda(raw) = s else {
            return Ok(());
        };
        if raw == 0 {
            // The legacy default stream of whatever context is current: ours, bound per call.
            return Ok(());
        }
        self.dev.bind(ctx)?;
        let mut owner: sys::CUcontext = std::ptr::null_mut();
        // SAFETY: `owner` is valid for writing; a stream handle that is not a live stream is
        // reported by the driver as an error, which is returned.
        let r = unsafe { sys::cuStreamGetCtx(raw as usize as sys::CUstream, &mut owner) };
        check(r, "cuStreamGetCtx", ctx)?;
        if owner != self.dev.ctx.cu_ctx() {
            return Err(Error::InvalidArgument {
                ctx: ctx.clone(),
                detail: format!(
                    "stream {raw:#x} belongs to another CUDA context than device {}'s primary \
                     context, which this communicator runs on",
                    self.dev.ordinal
                ),
            });
        }
        Ok(())
    }

    fn exec(&self, s: StreamSel, ctx: &OpCtx) -> Result<Exec> {
        let capturing = self.dev.capturing(s, ctx)?;
        if !capturing {
            retain::release_deferred();
        }
        Ok(Exec {
            stream: s,
            capturing,
        })
    }

    fn retain_for_capture(
        &self,
        exec: Exec,
        keep: Box<dyn std::any::Any + Send>,
        ctx: &OpCtx,
    ) -> Result<()> {
        retain::for_capture(self.dev.raw(exec.stream), keep, ctx)
    }

    fn upload(&self, s: StreamSel, dst: &MemRef, src: &[u8]) -> Result<()> {
        let op = self.dev.op(Op::Copy, src.len());
        self.dev.sync(s, &op)?;
        let r = {
            // SAFETY: validation guaranteed `dst` holds `src.len()` bytes of this device; the
            // stream is idle, so nothing races with the copy.
            unsafe { sys::cuMemcpyHtoD_v2(cuda_of(dst), src.as_ptr() as *const c_void, src.len()) }
        };
        check(r, "cuMemcpyHtoD", &op)
    }

    fn download(&self, s: StreamSel, src: &MemRef, dst: &mut [u8]) -> Result<()> {
        let op = self.dev.op(Op::Copy, dst.len());
        self.dev.sync(s, &op)?;
        let r = {
            // SAFETY: as for upload, with `dst` valid for writing `dst.len()` bytes.
            unsafe {
                sys::cuMemcpyDtoH_v2(dst.as_mut_ptr() as *mut c_void, cuda_of(src), dst.len())
            }
        };
        check(r, "cuMemcpyDtoH", &op)
    }

    fn copy_2d(&self, s: StreamSel, c: &Copy2d) -> Result<()> {
        let op = self.dev.op(Op::Copy, c.rows * c.row_bytes);
        self.dev.bind(&op)?;
        if c.rows == 1 || (c.src_pitch == c.row_bytes && c.dst_pitch == c.row_bytes) {
            let r = {
                // SAFETY: both ranges hold `rows * row_bytes` bytes of device memory (validated).
                unsafe {
                    sys::cuMemcpyAsync(
                        cuda_of(&c.dst),
                        cuda_of(&c.src),
                        c.rows * c.row_bytes,
                        self.dev.raw(s),
                    )
                }
            };
            return check(r, "cuMemcpyAsync", &op);
        }
        let p = sys::CUDA_MEMCPY2D {
            srcXInBytes: 0,
            srcY: 0,
            srcMemoryType: sys::CUmemorytype::CU_MEMORYTYPE_DEVICE,
            srcHost: std::ptr::null(),
            srcDevice: cuda_of(&c.src),
            srcArray: std::ptr::null_mut(),
            srcPitch: c.src_pitch,
            dstXInBytes: 0,
            dstY: 0,
            dstMemoryType: sys::CUmemorytype::CU_MEMORYTYPE_DEVICE,
            dstHost: std::ptr::null_mut(),
            dstDevice: cuda_of(&c.dst),
            dstArray: std::ptr::null_mut(),
            dstPitch: c.dst_pitch,
            WidthInBytes: c.row_bytes,
            Height: c.rows,
        };
        let r = {
            // SAFETY: every row lies inside its buffer (validated by the group).
            unsafe { sys::cuMemcpy2DAsync_v2(&p, self.dev.raw(s)) }
        };
        check(r, "cuMemcpy2DAsync", &op)
    }

    #[cfg(feature = "lab")]
    fn fill(
        &self,
        s: StreamSel,
        dst: &MemRef,
        dtype: DType,
        elems: usize,
        spec: &crate::backend::FillSpec,
    ) -> Result<()> {
        let op = self.dev.op(Op::Fill, elems * dtype.size());
        self.dev.bind(&op)?;
        let util = self.dev.util()?;
        let mut out = cuda_of(dst);
        let mut n = elems as u64;
        let mut seed = spec.seed;
        let mut rank = spec.rank;
        let mut epoch = spec.epoch.as_ref().map_or(0, cuda_of);
        let mut epoch_if_null = 0u64;
        let grid = (elems.div_ceil(256)).clamp(1, 4096) as u32;
        let mut delay = spec.early_release_ns.unwrap_or(0);
        let mut args = [
            &mut out as *mut u64 as *mut c_void,
            &mut n as *mut u64 as *mut c_void,
            &mut seed as *mut u64 as *mut c_void,
            &mut rank as *mut u64 as *mut c_void,
            &mut epoch as *mut u64 as *mut c_void,
            &mut epoch_if_null as *mut u64 as *mut c_void,
            &mut delay as *mut u64 as *mut c_void,
        ];
        if spec.early_release_ns.is_some() {
            if dtype != DType::BF16 {
                return Err(Error::InvalidArgument {
                    ctx: op,
                    detail: format!("the early-release producer writes bf16, not {dtype}"),
                });
            }
            // One wave of blocks, so every block releases its dependents at once.
            let grid = grid.min(132);
            // SAFETY: the arguments match `symm_slow_fill_bf16(bf16*, u64, u64, u64, const u64*,
            // u64, u64)`; buffers as for the plain fill below.
            return unsafe {
                util.slow_fill_bf16()
                    .launch(grid, 256, 0, self.dev.raw(s), &mut args, false, &op)
            };
        }
        // SAFETY: the arguments match `symm_fill_*(T*, u64, u64, u64, const u64*, u64)` (the
        // last pointer is not passed); `out` holds `elems` elements and `epoch` is null or an
        // 8-byte counter, both alive until the work is enqueued (and kept by graphs).
        unsafe {
            util.fill(dtype)
                .launch(grid, 256, 0, self.dev.raw(s), &mut args[..6], false, &op)
        }
    }

    fn memset(&self, s: StreamSel, dst: &MemRef, bytes: usize, byte: u8) -> Result<()> {
        let op = self.dev.op(Op::Fill, bytes);
        self.dev.bind(&op)?;
        let r = {
            // SAFETY: `dst` holds `bytes` bytes of device memory (validated by the caller).
            unsafe { sys::cuMemsetD8Async(cuda_of(dst), byte, bytes, self.dev.raw(s)) }
        };
        check(r, "cuMemsetD8Async", &op)
    }

    #[cfg(feature = "lab")]
    fn bump(&self, s: StreamSel, counter: &MemRef) -> Result<()> {
        let op = self.dev.op(Op::Kernel, 8);
        self.dev.bind(&op)?;
        let util = self.dev.util()?;
        let mut p = cuda_of(counter);
        let mut args = [&mut p as *mut u64 as *mut c_void];
        // SAFETY: `symm_bump(u64*)` gets an 8-byte device counter.
        unsafe {
            util.bump
                .launch(1, 1, 0, self.dev.raw(s), &mut args, false, &op)
        }
    }

    fn dcp_correct(&self, exec: Exec, call: &DcpCorrect) -> Result<()> {
        self.dev.bind(&call.ctx)?;
        self.dev
            .dcp(exec.capturing, &call.ctx)?
            .correct(call, self.dev.raw(exec.stream))
    }

    fn add_rmsnorm(&self, exec: Exec, step: &AddRmsNormStep) -> Result<()> {
        self.dev.bind(&step.ctx)?;
        self.dev.norm(exec.capturing, &step.ctx)?.add_rmsnorm(
            step,
            self.dev.raw(exec.stream),
            self.dev.own_kernels_pdl,
        )
    }

    fn begin_capture(&self) -> Result<()> {
        let op = self.dev.op(Op::Capture, 0);
        let _g = self.dev.graph.lock().unwrap_or_else(|p| p.into_inner());
        self.dev.bind(&op)?;
        // Thread-local mode: other ranks' threads keep allocating while this one captures.
        self.dev
            .stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(|e| Error::Cuda {
                ctx: op,
                call: "cuStreamBeginCapture",
                message: e.to_string(),
            })?;
        Ok(())
    }

    fn end_capture(&self) -> Result<Box<dyn GraphExec>> {
        let op = self.dev.op(Op::Capture, 0);
        let _g = self.dev.graph.lock().unwrap_or_else(|p| p.into_inner());
        self.dev.bind(&op)?;
        let res = self
            .dev
            .stream
            .end_capture(sys::CUgraphInstantiate_flags(0));
        let graph = res.map_err(|e| Error::Cuda {
            ctx: op.clone(),
            call: "cuStreamEndCapture/cuGraphInstantiate",
            message: e.to_string(),
        })?;
        if let Some(g) = &graph {
            g.upload().map_err(|e| Error::Cuda {
                ctx: op,
                call: "cuGraphUpload",
                message: e.to_string(),
            })?;
        }
        Ok(Box::new(CudaGraphExec {
            graph,
            dev: self.dev.clone(),
        }))
    }

    fn synchronize(&self, s: StreamSel) -> Result<()> {
        self.dev.sync(s, &self.dev.op(Op::Barrier, 0))
    }

    fn memory_info(&self) -> Result<Option<(usize, usize)>> {
        let op = self.dev.op(Op::PoolAlloc, 0);
        // Dropped groups' communicators may still be on their teardown threads: what they hold
        // counts as used until they finish.
        if !teardown::wait_idle(self.dev.timeout) {
            return Err(Error::Timeout {
                ctx: op,
                waited: self.dev.timeout,
                detail: "NCCL communicators of dropped groups were still being destroyed, so \
                         device memory cannot be measured"
                    .into(),
            });
        }
        self.dev.bind(&op)?;
        let (mut free, mut total) = (0usize, 0usize);
        // SAFETY: both outputs are valid for writing; the device's context is current.
        let r = unsafe { sys::cuMemGetInfo_v2(&mut free, &mut total) };
        check(r, "cuMemGetInfo", &op)?;
        Ok(Some((free, total)))
    }

    fn time(&self, s: StreamSel, enqueue: &mut dyn FnMut() -> Result<()>) -> Result<Duration> {
        let op = self.dev.op(Op::Kernel, 0);
        self.dev.check_abort(&op)?;
        self.dev.bind(&op)?;
        let (a, b) = (Event::new(true, &op)?, Event::new(true, &op)?);
        a.record(self.dev.raw(s), &op)?;
        enqueue()?;
        self.dev.bind(&op)?;
        b.record(self.dev.raw(s), &op)?;
        let waited = b.wait(Instant::now() + self.dev.timeout, &op, || {
            self.dev.poll_comms(&op)
        });
        if waited.is_err() {
            self.dev.abort_comms();
        }
        abort::on_failure(waited)?;
        let ms = a.elapsed_ms(&b, &op)?;
        Ok(Duration::from_secs_f64(ms as f64 / 1e3))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pdl_hazard_range() {
        assert!(!pdl_hazard(Version::new(2, 27, 7)));
        assert!(pdl_hazard(Version::new(2, 28, 0)));
        assert!(pdl_hazard(Version::new(2, 28, 3)));
        assert!(pdl_hazard(Version::new(2, 28, 9)));
        assert!(pdl_hazard(Version::new(2, 30, 6)));
        assert!(!pdl_hazard(Version::new(2, 30, 7)));
        assert!(!pdl_hazard(Version::new(2, 31, 0)));
    }
}
