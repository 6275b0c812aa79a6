//! One group on the CUDA backend: two NCCL communicators over the same ranks — one whose
//! windows hold the group's symmetric pool (NCCL runs its symmetric kernels there), and one
//! with no windows, so the regular path stays regular even on window memory (NCCL 2.27–2.28
//! always pick a symmetric kernel when both buffers are registered, even where it is slower).

use std::ffi::c_void;
use std::sync::Arc;

use nccl_sys::{
    DataType, NcclComm as RawComm, NcclResult, NcclWindow, RedOp, UniqueId, WIN_COLL_SYMMETRIC,
};

use super::DeviceShared;
use super::memory::NcclSegment;
use super::nccl::OwnedComm;
use super::own::OwnKernels;
use super::peers::{self, PeerView};
use crate::backend::{
    Algo, Call, CallShape, Collective, DcpFused, DcpShape, Exec, GroupBackend, Impl, NormFused,
    NormShape, StreamSel,
};
use crate::bootstrap::ControlPlane;
use crate::dtype::{DType, ReduceOp};
use crate::error::{Error, Op, OpCtx, Result};
use crate::kernels::CollectiveKernel;
use crate::memory::Memory;
use crate::topology::{CrossDomainWindows, GroupTopology};

pub(crate) fn nccl_dtype(d: DType) -> DataType {
    match d {
        DType::F32 => DataType::FLOAT32,
        DType::F16 => DataType::FLOAT16,
        DType::BF16 => DataType::BFLOAT16,
        DType::I32 => DataType::INT32,
        DType::U8 => DataType::UINT8,
    }
}

pub(crate) fn nccl_op(r: ReduceOp) -> RedOp {
    match r {
        ReduceOp::Sum => RedOp::SUM,
        ReduceOp::Avg => RedOp::AVG,
        ReduceOp::Max => RedOp::MAX,
        ReduceOp::Min => RedOp::MIN,
    }
}

/// One rank's view of a CUDA group.
#[derive(Debug)]
pub(crate) struct CudaGroup {
    /// Windows are registered here: the symmetric path.
    windows: Arc<OwnedComm>,
    /// No windows: the regular path.
    plain: Arc<OwnedComm>,
    rank: usize,
    size: usize,
    label: String,
    control: Arc<ControlPlane>,
    /// Our own kernels, when they run on this group.
    own: Option<Arc<OwnKernels>>,
    /// Every rank's view of each pool segment (segment order), for copy-engine transfers.
    segment_views: std::sync::Mutex<Vec<Vec<PeerView>>>,
    /// Why our kernels do not run here: the group spans several hosts (NVLink domains).
    cross_domain: Option<String>,
    /// The windows of a group that spans hosts, which NCCL may refuse there.
    cross_windows: Option<CrossDomainWindows>,
    /// Last, so that it is dropped after the communicators (fields drop in order).
    dev: Arc<DeviceShared>,
}

/// Our kernel for an algorithm and collective.
fn kernel_for(algo: Algo, coll: Collective) -> Option<CollectiveKernel> {
    Some(match (algo, coll) {
        (Algo::OneShot, Collective::AllReduce(_)) => CollectiveKernel::OneShotAllReduce,
        (Algo::TwoShot, Collective::AllReduce(_)) => CollectiveKernel::TwoShotAllReduce,
        (Algo::OneShot, Collective::AllGather) => CollectiveKernel::AllGather,
        (Algo::OneShot, Collective::ReduceScatter(_)) => CollectiveKernel::ReduceScatter,
        (Algo::LowLatency, Collective::AllReduce(_)) => CollectiveKernel::LlAllReduce,
        (Algo::LowLatency, Collective::AllGather) => CollectiveKernel::LlAllGather,
        (Algo::LowLatency, Collective::ReduceScatter(_)) => CollectiveKernel::LlReduceScatter,
        _ => return None,
    })
}

impl CudaGroup {
    fn ctx(&self, op: Op, bytes: usize) -> OpCtx {
        OpCtx {
            op,
            group: self.label.clone(),
            rank: self.rank,
            world: self.size,
            bytes,
        }
    }

    /// The world group: rank 0 makes a unique id and shares it over the control plane.
    pub(crate) fn world(
        dev: Arc<DeviceShared>,
        control: Arc<ControlPlane>,
        topology: &GroupTopology,
    ) -> Result<Self> {
        let label = control.prefix().to_string();
        let ctx = OpCtx {
            op: Op::Init,
            group: label.clone(),
            rank: control.rank(),
            world: control.size(),
            bytes: 0,
        };
        dev.bind(&ctx)?;
        let mut id = UniqueId::default();
        if control.rank() == 0 {
            // SAFETY: `id` is valid for writing.
            let r = unsafe { dev.nccl.get_unique_id(&mut id) };
            super::nccl::check(dev.nccl, r, "ncclGetUniqueId", &ctx)?;
        }
        let bytes = control.broadcast("nccl unique id", 0, id.as_bytes())?;
        let id = UniqueId::from_bytes(&bytes).ok_or_else(|| Error::InvalidArgument {
            ctx: ctx.clone(),
            detail: format!("rank 0 sent a unique id of {} bytes", bytes.len()),
        })?;
        let windows = OwnedComm::init(
            dev.nccl,
            &id,
            control.size(),
            control.rank(),
            &label,
            &dev.creation(&ctx),
        )
        .map_err(|e| dev.creation_failed(e))?;
        let windows = Arc::new(windows);
        Self::finish(dev, windows, control, label, topology)
    }

    /// Make the regular-path twin, connect both communicators' peers (so the first
    /// collective inside a graph capture does not try to), and register them for polling.
    /// Our kernels are set up only when the group lies in one NVLink domain: their workspace
    /// is imported by every peer, which a rank on another host cannot do.
    fn finish(
        dev: Arc<DeviceShared>,
        windows: Arc<OwnedComm>,
        control: Arc<ControlPlane>,
        label: String,
        topology: &GroupTopology,
    ) -> Result<Self> {
        let (rank, size) = (control.rank(), control.size());
        let ctx = OpCtx {
            op: Op::Init,
            group: label.clone(),
            rank,
            world: size,
            bytes: 0,
        };
        let plain = windows
            .split(0, rank, &format!("{label}/regular"), &dev.creation(&ctx))
            .map_err(|e| dev.creation_failed(e))?;
        let plain = Arc::new(plain);
        dev.track(&windows);
        dev.track(&plain);
        let mut g = CudaGroup {
            dev,
            windows,
            plain,
            rank,
            size,
            label,
            control,
            own: None,
            segment_views: std::sync::Mutex::new(Vec::new()),
            cross_domain: topology.kernels_unavailable(),
            cross_windows: topology.spans_domains().then(CrossDomainWindows::default),
        };
        g.warm_up()?;
        if g.cross_domain.is_some() {
            return Ok(g);
        }
        if let Some(k) = OwnKernels::new(&g.dev, &g.control, g.dev.kernel_slot_bytes, &ctx)? {
            let k = Arc::new(k);
            g.dev.track_own(&k, &g.label);
            g.own = Some(k);
        }
        Ok(g)
    }

    /// `ncclCommWindowRegister` of `seg` on `comm` (collective: every rank of the group calls it
    /// for its segment of this index, in the pool's SPMD order): NCCL's result code and the
    /// window (null when NCCL registered none).
    fn window_register_call(&self, comm: RawComm, seg: &NcclSegment) -> (NcclResult, NcclWindow) {
        let mut window = std::ptr::null_mut();
        // SAFETY: `seg.ptr` is a live `ncclMemAlloc` allocation of `seg.len` bytes and `window`
        // a place for NCCL to write the handle; the caller makes the collective call on every
        // rank.
        let r = unsafe {
            self.dev.nccl.comm_window_register(
                comm,
                seg.ptr as *mut c_void,
                seg.len,
                &mut window,
                WIN_COLL_SYMMETRIC,
            )
        };
        (r, window)
    }

    /// Register `seg` as a window of the windows communicator (every rank of the group, in the
    /// pool's SPMD order). Inside one NVLink domain a failure, or NCCL registering no window,
    /// is an error: symmetric memory was asked for and the system cannot give it.
    fn register_window(&self, comm: RawComm, seg: &mut NcclSegment, ctx: &OpCtx) -> Result<()> {
        let (r, window) = self.window_register_call(comm, seg);
        self.windows.check(r, "ncclCommWindowRegister", ctx)?;
        if window.is_null() {
            return Err(Error::ImplUnavailable {
                ctx: ctx.clone(),
                implementation: "nccl_symm".into(),
                why: "NCCL registered no window: symmetric memory is unsupported on this system (cuMem off, or GPUs not all connected by NVLink)".into(),
            });
        }
        seg.window = window;
        Ok(())
    }

    /// Register `seg` as a window in a group that spans hosts, where NCCL may refuse (an
    /// error, or no window): never an error here. Every rank's outcome is agreed on; after the
    /// first refusal the group registers nothing more and its pool is plain memory, the reason
    /// recorded for `nccl_symm` and `auto` to name. A window this rank did get is kept, unused,
    /// until the segment goes.
    fn register_across_hosts(
        &self,
        w: &CrossDomainWindows,
        comm: RawComm,
        seg: &mut NcclSegment,
        ctx: &OpCtx,
    ) -> Result<()> {
        if w.refused().is_some() {
            return Ok(());
        }
        // Every rank of the group makes the call for this segment (the refusal is agreed on
        // only afterwards, so no rank skips the collective call).
        let (r, window) = self.window_register_call(comm, seg);
        let nccl = self.dev.nccl;
        let mine = if let Err(e) = super::nccl::check(nccl, r, "ncclCommWindowRegister", ctx) {
            Err(e.to_string())
        } else if window.is_null() {
            Err("NCCL registered no window (its symmetric memory does not reach across these hosts)".into())
        } else {
            seg.window = window;
            super::test_hooks::take_window_refusal().map_or(Ok(()), Err)
        };
        w.settle(&self.control, mine, ctx).map(|_| ())
    }

    /// One tiny all-reduce on each communicator, outside any capture.
    fn warm_up(&self) -> Result<()> {
        let ctx = self.ctx(Op::Init, 4);
        let scratch = self.dev.scratch(&ctx)?;
        for comm in [&self.windows, &self.plain] {
            let p = scratch as *mut c_void;
            // SAFETY: `scratch` is 256 B of device memory of this device, alive for the
            // device's lifetime; the stream belongs to the current context.
            let r = unsafe {
                comm.nccl.all_reduce(
                    p,
                    p,
                    1,
                    DataType::FLOAT32,
                    RedOp::SUM,
                    comm.raw(),
                    self.dev.raw(StreamSel::Own) as *mut c_void,
                )
            };
            comm.check(r, "ncclAllReduce (warm-up)", &ctx)?;
        }
        self.dev.sync(StreamSel::Own, &ctx)
    }

    /// All-gather by the copy engine: a barrier (every peer's output is free), one copy of
    /// this rank's piece into every rank's output window, a barrier (every copy landed).
    fn ce_all_gather(&self, own: &OwnKernels, s: StreamSel, call: &Call) -> Result<()> {
        let ctx = &call.ctx;
        let loc = call.output_symm.ok_or_else(|| Error::InvalidArgument {
            ctx: ctx.clone(),
            detail: "the copy-engine all-gather writes into windows; the output is not in one"
                .into(),
        })?;
        let stream = self.dev.raw(s);
        let piece = call.piece * call.dtype.size();
        let src = call.input.addr();
        own.launch(CollectiveKernel::Barrier, call.dtype, 0, 0, 0, stream, ctx)?;
        {
            let views = self.segment_views.lock().unwrap_or_else(|p| p.into_inner());
            let seg = views
                .get(loc.segment)
                .ok_or_else(|| Error::InvalidArgument {
                    ctx: ctx.clone(),
                    detail: format!("segment {} has no peer views", loc.segment),
                })?;
            let copy = |dst: u64, stream: cudarc::driver::sys::CUstream| -> Result<()> {
                let r = {
                    // SAFETY: `dst` lies in a rank's window (mapped here) at this rank's piece of
                    // an output validated to hold `world * piece` bytes; `src` holds `piece`
                    // bytes; the first barrier guarantees no rank still reads that output.
                    unsafe { cudarc::driver::sys::cuMemcpyAsync(dst, src, piece, stream) }
                };
                super::driver::check(r, "cuMemcpyAsync (copy-engine all-gather)", ctx)
            };
            // This rank's own piece on the side stream, so the local copy overlaps the NVLink
            // copies instead of following them.
            let local = seg[self.rank].base() + (loc.offset + self.rank * piece) as u64;
            let in_place = local == src;
            if !in_place {
                self.dev.fork_side(s, ctx, |side| copy(local, side))?;
            }
            for p in (1..self.size).map(|i| (self.rank + i) % self.size) {
                copy(
                    seg[p].base() + (loc.offset + self.rank * piece) as u64,
                    stream,
                )?;
            }
            if !in_place {
                self.dev.join_side(s, ctx)?;
            }
        }
        own.launch(CollectiveKernel::Barrier, call.dtype, 0, 0, 0, stream, ctx)
    }

    fn comm_for(&self, imp: Impl) -> Option<&Arc<OwnedComm>> {
        match imp {
            Impl::Regular => Some(&self.plain),
            Impl::Symmetric => Some(&self.windows),
            _ => None,
        }
    }

    /// Our kernel for `algo` on `exec`'s stream (the copy engine for its all-gather).
    fn own_collective(&self, algo: Algo, exec: Exec, call: &Call) -> Result<()> {
        let ctx = &call.ctx;
        let own = self.own.as_ref().ok_or_else(|| Error::ImplUnavailable {
            ctx: ctx.clone(),
            implementation: algo.name().into(),
            why: "our kernels are not set up on this group".into(),
        })?;
        self.dev.bind(ctx)?;
        if algo == Algo::CopyEngine {
            return self.ce_all_gather(own, exec.stream, call);
        }
        let k = kernel_for(algo, call.coll).ok_or_else(|| Error::ImplUnavailable {
            ctx: ctx.clone(),
            implementation: algo.name().into(),
            why: format!("no {} kernel for {}", algo.name(), call.coll.name()),
        })?;
        own.launch(
            k,
            call.dtype,
            call.input.addr(),
            call.output.addr(),
            call.piece,
            self.dev.raw(exec.stream),
            ctx,
        )
    }

    /// NCCL's regular or symmetric path on `exec`'s stream, the symmetric one behind the guard
    /// kernel where the NCCL version needs it.
    fn nccl_collective(&self, exec: Exec, call: &Call) -> Result<()> {
        let ctx = &call.ctx;
        let Some(comm) = self.comm_for(call.imp) else {
            return Err(Error::ImplUnavailable {
                ctx: ctx.clone(),
                implementation: call.imp.name(crate::BackendKind::Cuda),
                why: self
                    .unavailable(
                        call.imp,
                        &CallShape {
                            coll: call.coll,
                            dtype: call.dtype,
                            piece: call.piece,
                            align: 256,
                        },
                    )
                    .unwrap_or_default(),
            });
        };
        let raw = comm.live(ctx)?;
        self.dev.bind(ctx)?;
        let stream = self.dev.raw(exec.stream) as *mut c_void;
        debug_assert!(
            call.imp != Impl::Symmetric
                || (call.input_symm.is_some() && call.output_symm.is_some()),
            "the symmetric path is dispatched with both buffers in windows"
        );
        if call.imp == Impl::Symmetric && self.dev.pdl_guard {
            self.launch_pdl_guard(stream, ctx)?;
        }
        enqueue_nccl(comm, raw, stream, call)
    }

    /// NCCL 2.28.0–2.30.6 launch symmetric kernels with programmatic dependent launch but never
    /// wait on the grid dependency: an empty kernel in between restores full ordering with
    /// whatever produced the input.
    fn launch_pdl_guard(&self, stream: *mut c_void, ctx: &OpCtx) -> Result<()> {
        let util = self.dev.util()?;
        // SAFETY: the guard kernel takes no parameters.
        unsafe {
            util.guard.launch(
                1,
                32,
                0,
                stream as cudarc::driver::sys::CUstream,
                &mut [],
                false,
                ctx,
            )
        }
    }
}

/// Enqueue `call`'s collective on NCCL communicator `comm` (live as `raw`) on `stream`.
fn enqueue_nccl(comm: &OwnedComm, raw: RawComm, stream: *mut c_void, call: &Call) -> Result<()> {
    let send = call.input.addr() as *const c_void;
    let recv = call.output.addr() as *mut c_void;
    let nccl = comm.nccl;
    let dt = nccl_dtype(call.dtype);
    // SAFETY: validation guaranteed both ranges hold the elements each call reads or writes on
    // this rank's device, and the buffers stay alive (the caller holds them, and graph captures
    // keep them); the stream belongs to the current context.
    let (r, name) = unsafe {
        match call.coll {
            Collective::AllReduce(op) => (
                nccl.all_reduce(send, recv, call.piece, dt, nccl_op(op), raw, stream),
                "ncclAllReduce",
            ),
            Collective::AllGather => (
                nccl.all_gather(send, recv, call.piece, dt, raw, stream),
                "ncclAllGather",
            ),
            Collective::ReduceScatter(op) => (
                nccl.reduce_scatter(send, recv, call.piece, dt, nccl_op(op), raw, stream),
                "ncclReduceScatter",
            ),
        }
    };
    comm.check(r, name, &call.ctx)
}

impl GroupBackend for CudaGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn alloc_segment(&self, bytes: usize, ctx: &OpCtx) -> Result<Arc<dyn Memory>> {
        self.dev.check_abort(ctx)?;
        let windows_comm = self.windows.live(ctx)?;
        self.dev.bind(ctx)?;
        let nccl = self.dev.nccl;
        let mut ptr: *mut c_void = std::ptr::null_mut();
        // SAFETY: `ptr` is valid for writing; the device's context is current.
        let r = unsafe { nccl.mem_alloc(&mut ptr, bytes) };
        super::nccl::check(nccl, r, "ncclMemAlloc", ctx)?;
        // From here the segment owns the allocation (and its window, once registered): an
        // error below frees them.
        let mut segment = NcclSegment {
            ptr: ptr as u64,
            len: bytes,
            window: std::ptr::null_mut(),
            comm: self.windows.clone(),
            ctx: self.dev.ctx.clone(),
        };
        match &self.cross_windows {
            None => self.register_window(windows_comm, &mut segment, ctx)?,
            Some(w) => self.register_across_hosts(w, windows_comm, &mut segment, ctx)?,
        }
        if self.own.is_some() {
            // Peers' views of this segment, for copy-engine transfers into their windows.
            let mut views = self.segment_views.lock().unwrap_or_else(|p| p.into_inner());
            let tag = format!("segment-{}", views.len());
            views.push(peers::exchange(
                &self.control,
                segment.ptr,
                self.dev.ordinal,
                &self.dev.ctx,
                &tag,
                ctx,
            )?);
        }
        Ok(Arc::new(segment))
    }

    fn unavailable(&self, imp: Impl, call: &CallShape) -> Option<String> {
        match imp {
            Impl::Regular => None,
            Impl::Symmetric => {
                if let Some(why) = self
                    .cross_windows
                    .as_ref()
                    .and_then(CrossDomainWindows::symmetric_unavailable)
                {
                    return Some(why);
                }
                if let Some(op) = call.coll.reduce()
                    && op != ReduceOp::Sum
                {
                    return Some(format!(
                        "NCCL's symmetric kernels reduce with sum only; {op} runs NCCL's regular kernels"
                    ));
                }
                let v = self.dev.nccl.version();
                let piece_bytes = call.piece * call.dtype.size();
                if v < nccl_sys::Version::new(2, 28, 7)
                    && (!piece_bytes.is_multiple_of(8) || call.align < 8)
                {
                    return Some(format!(
                        "NCCL {v}'s symmetric kernels corrupt data when a rank's piece ({piece_bytes} B) or a buffer address is not a multiple of 8 bytes (fixed in 2.28.7; seen here)"
                    ));
                }
                if self.dev.pdl_guard && self.dev.util().is_err() {
                    return Some(format!(
                        "NCCL {} launches symmetric kernels that can read inputs early; the guard kernel could not be loaded",
                        self.dev.nccl.version()
                    ));
                }
                None
            }
            Impl::Kernel(algo) => {
                if let Some(why) = &self.cross_domain {
                    return Some(why.clone());
                }
                let Some(own) = &self.own else {
                    return Some("our kernels are not set up on this group (world outside 2..8, kernel_slot_bytes 0, or a rank could not load them)".into());
                };
                if let Some(op) = call.coll.reduce()
                    && op != ReduceOp::Sum
                {
                    return Some(format!("our kernels reduce with sum only, not {op}"));
                }
                match (algo, call.coll) {
                    (Algo::CopyEngine, Collective::AllGather) => None,
                    (Algo::CopyEngine, _) => Some("the copy-engine algorithm only gathers".into()),
                    _ => match kernel_for(algo, call.coll) {
                        Some(k) => own.unavailable(k, call.dtype, call.piece),
                        None => Some(format!(
                            "no {} kernel for {}",
                            algo.name(),
                            call.coll.name()
                        )),
                    },
                }
            }
            Impl::Auto => Some("auto is resolved before dispatch".into()),
            Impl::Local | Impl::Hierarchical => Some(format!(
                "{} runs in the group layer, never here",
                imp.name(crate::BackendKind::Cuda)
            )),
        }
    }

    fn collective(&self, exec: Exec, call: &Call) -> Result<()> {
        let ctx = &call.ctx;
        self.dev.check_abort(ctx)?;
        self.dev.note_pending(ctx);
        match call.imp {
            Impl::Kernel(algo) => self.own_collective(algo, exec, call),
            _ => self.nccl_collective(exec, call),
        }
    }

    fn split(
        &self,
        color: usize,
        key: usize,
        control: Arc<ControlPlane>,
        topology: &GroupTopology,
    ) -> Result<Arc<dyn GroupBackend>> {
        let label = control.prefix().to_string();
        let ctx = self.ctx(Op::Split, 0);
        self.dev.check_abort(&ctx)?;
        self.windows.live(&ctx)?;
        self.dev.bind(&ctx)?;
        let windows = self
            .windows
            .split(color, key, &label, &self.dev.creation(&ctx))
            .map_err(|e| self.dev.creation_failed(e))?;
        let windows = Arc::new(windows);
        Ok(Arc::new(Self::finish(
            self.dev.clone(),
            windows,
            control,
            label,
            topology,
        )?))
    }

    fn describe(&self) -> String {
        let hosts = if self.cross_domain.is_some() {
            ", across hosts (NCCL only)"
        } else {
            ""
        };
        format!(
            "NCCL {} communicator of {} ranks{hosts}",
            self.dev.nccl.version(),
            self.size
        )
    }

    fn dcp_fused_unavailable(&self, shape: &DcpShape) -> Option<String> {
        if let Some(why) = &self.cross_domain {
            return Some(why.clone());
        }
        if self.own.is_none() {
            return Some("our kernels are not set up on this group (world outside 2..8, kernel_slot_bytes 0, or a rank could not load them)".into());
        }
        super::dcp::fused_shape_unavailable(shape)
    }

    fn dcp_fused(&self, exec: Exec, call: &DcpFused) -> Result<()> {
        let ctx = &call.ctx;
        if let Some(why) = self.dcp_fused_unavailable(&call.shape) {
            return Err(Error::ImplUnavailable {
                ctx: ctx.clone(),
                implementation: "fused".into(),
                why,
            });
        }
        let own = self.own.as_ref().expect("checked above");
        let loc = call.workspace_symm.ok_or_else(|| Error::InvalidArgument {
            ctx: ctx.clone(),
            detail: "the fused DCP combine's workspace must lie in this group's windows".into(),
        })?;
        self.dev.bind(ctx)?;
        let mut symm = own.protocol_args();
        {
            let views = self.segment_views.lock().unwrap_or_else(|p| p.into_inner());
            let seg = views
                .get(loc.segment)
                .ok_or_else(|| Error::InvalidArgument {
                    ctx: ctx.clone(),
                    detail: format!("segment {} has no peer views", loc.segment),
                })?;
            for (p, v) in seg.iter().enumerate() {
                symm.ws[p] = v.base() + loc.offset as u64;
            }
        }
        symm.input = call.partial.addr();
        symm.output = call.out.addr();
        symm.count = (call.shape.batch * call.shape.heads_local()) as u64;
        symm.slot_bytes = call.slot_bytes as u64;
        let mut dcp = super::dcp::shape_args(&call.shape, ctx)?;
        dcp.partial = call.partial.addr();
        dcp.lse = call.lse.addr();
        dcp.out = call.out.addr();
        dcp.merged_lse = call.merged_lse.as_ref().map_or(0, |m| m.addr());
        self.dev.dcp(exec.capturing, ctx)?.fused(
            &call.shape,
            &mut symm,
            &mut dcp,
            self.dev.raw(exec.stream),
            self.dev.own_kernels_pdl,
            ctx,
        )
    }

    fn norm_fused_unavailable(&self, shape: &NormShape, algo: Algo) -> Option<String> {
        if let Some(why) = &self.cross_domain {
            return Some(why.clone());
        }
        let Some(own) = &self.own else {
            return Some("our kernels are not set up on this group (world outside 2..8, kernel_slot_bytes 0, or a rank could not load them)".into());
        };
        super::norm::fused_unavailable(shape, algo, own.slot_bytes)
    }

    fn norm_fused(&self, exec: Exec, call: &NormFused) -> Result<()> {
        let ctx = &call.ctx;
        self.dev.check_abort(ctx)?;
        if let Some(why) = self.norm_fused_unavailable(&call.shape, call.algo) {
            return Err(Error::ImplUnavailable {
                ctx: ctx.clone(),
                implementation: format!("fused_{}", call.algo.name()),
                why,
            });
        }
        let own = self.own.as_ref().expect("checked above");
        self.dev.bind(ctx)?;
        self.dev.note_pending(ctx);
        let mut symm = own.workspace_args();
        symm.input = call.bufs.input.addr();
        symm.output = call.bufs.normed.addr();
        symm.count = (call.shape.tokens * call.shape.hidden) as u64;
        self.dev.norm(exec.capturing, ctx)?.fused(
            call,
            &mut symm,
            self.dev.raw(exec.stream),
            self.dev.own_kernels_pdl,
        )
    }
}
