//! Our own NVLink collectives on one group (`kernels/collectives.cu`, protocol in KERNELS.md):
//! the workspace and signal pad every rank pushes into (symmetric memory, mapped by every
//! peer), this rank's local state, and the launches.

use std::ffi::c_void;
use std::sync::Arc;

use super::DeviceShared;
use super::driver::check;
use super::memory::DeviceAlloc;
use super::modules::{Function, Module, source};
use super::peers::{self, PeerView};
use crate::bootstrap::ControlPlane;
use crate::dtype::DType;
use crate::error::{Error, OpCtx, Result};
use crate::kernels::{
    BLOCK_THREADS, CollectiveKernel, LL_MAX_BYTES, LL_OFFSET, MAX_BLOCKS, MAX_WORLD, SymmArgs,
    SymmState, ll_area_bytes, workspace_bytes,
};

use cudarc::driver::sys;

/// `ncclMemAlloc` memory that is not a window: our workspace. Freed on drop.
#[derive(Debug)]
struct Workspace {
    ptr: u64,
    dev: Arc<DeviceShared>,
}

impl Drop for Workspace {
    fn drop(&mut self) {
        if super::ABANDONED.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        if self.dev.ctx.bind_to_thread().is_err() {
            return;
        }
        // SAFETY: the workspace came from `ncclMemAlloc` and is freed once, after the context's
        // queued work (peers' mappings are their own and stay valid until they unmap).
        unsafe {
            let _ = sys::cuCtxSynchronize();
            let _ = self.dev.nccl.mem_free(self.ptr as *mut c_void);
        }
    }
}

/// Every function of the collectives module (`kernels/collectives.cu`), by name: loaded once
/// per device ([`DeviceShared::collectives`]) and shared by its groups.
#[derive(Debug, Clone)]
pub(crate) struct CollectiveFunctions(Arc<Vec<(&'static str, Function)>>);

impl CollectiveFunctions {
    pub(crate) fn load(
        ctx: &Arc<cudarc::driver::CudaContext>,
        cc: (i32, i32),
        op: &OpCtx,
    ) -> Result<Self> {
        let m = Module::load(ctx, source("collectives"), cc, op)?;
        let mut fs = Vec::new();
        for k in CollectiveKernel::ALL {
            for d in [DType::BF16, DType::F16, DType::F32] {
                if let Some(name) = k.function(d)
                    && !fs.iter().any(|(n, _)| *n == name)
                {
                    fs.push((name, m.function(name, op)?));
                }
            }
        }
        Ok(CollectiveFunctions(Arc::new(fs)))
    }

    fn get(&self, name: &str) -> Option<&Function> {
        self.0.iter().find(|(n, _)| *n == name).map(|(_, f)| f)
    }
}

/// Our kernels on one group.
#[derive(Debug)]
pub(crate) struct OwnKernels {
    functions: CollectiveFunctions,
    /// Every rank's workspace (then its pad at `ws_bytes`), as this rank addresses it.
    views: Vec<PeerView>,
    _workspace: Workspace,
    state: DeviceAlloc,
    ws_bytes: usize,
    pub(crate) slot_bytes: usize,
    rank: usize,
    world: usize,
    timeout_ns: u64,
    /// Launch with programmatic dependent launch.
    pdl: bool,
}

/// Blocks for a launch moving `bytes` per rank: one per 4 KiB, at most [`MAX_BLOCKS`] (128, from
/// 512 KiB). Measured on 2×H200: 1–4 blocks to 16 KiB, 16 at 64 KiB; 128 instead of 64 blocks
/// took one-shot at 4 MiB from 19.9 to 18.6 µs and left 1 MiB as it was.
pub(crate) fn grid_for(bytes: usize) -> u32 {
    (bytes.div_ceil(4096) as u32).clamp(1, MAX_BLOCKS)
}

/// Blocks for an LL launch moving `bytes` per piece: one thread per 8-byte chunk, at most 128
/// blocks (threads then take several chunks).
pub(crate) fn ll_grid_for(bytes: usize) -> u32 {
    (bytes.div_ceil(8 * BLOCK_THREADS as usize) as u32).clamp(1, MAX_BLOCKS)
}

impl OwnKernels {
    /// Set up our kernels on a group (collective). `Ok(None)` when they cannot run here (world
    /// outside 2..8, or some rank could not load them): the group then uses NCCL only.
    pub(crate) fn new(
        dev: &Arc<DeviceShared>,
        control: &ControlPlane,
        slot_bytes: usize,
        ctx: &OpCtx,
    ) -> Result<Option<Self>> {
        let world = control.size();
        if slot_bytes == 0 || !(2..=MAX_WORLD).contains(&world) {
            return Ok(None);
        }
        let loaded = dev.collectives().cloned();
        let flag = [u8::from(loaded.is_ok())];
        let all = control.all_gather("own kernels loaded", &flag)?;
        let functions = match loaded {
            Ok(fs) if all.iter().all(|f| f.first() == Some(&1)) => fs,
            Ok(_) => {
                tracing::warn!(
                    group = control.prefix(),
                    "a peer could not load our kernels; NCCL only"
                );
                return Ok(None);
            }
            Err(e) => {
                tracing::warn!(group = control.prefix(), error = %e, "our kernels could not be loaded; NCCL only");
                return Ok(None);
            }
        };
        let slot_bytes = slot_bytes.div_ceil(256) * 256;
        let ws_bytes = workspace_bytes(world, slot_bytes);
        // Workspace, then the signal pad, then the LL area at pad + LL_OFFSET (KERNELS.md §3).
        let total = ws_bytes + LL_OFFSET + ll_area_bytes(world);
        dev.bind(ctx)?;
        let mut p: *mut c_void = std::ptr::null_mut();
        // SAFETY: `p` is valid for writing; the context is current.
        let r = unsafe { dev.nccl.mem_alloc(&mut p, total) };
        super::nccl::check(dev.nccl, r, "ncclMemAlloc (kernel workspace)", ctx)?;
        let workspace = Workspace {
            ptr: p as u64,
            dev: dev.clone(),
        };
        let state = super::alloc(&dev.ctx, std::mem::size_of::<SymmState>(), ctx)?;
        // Zero pads and states before any peer can signal (KERNELS.md §4 rule 5); the exchange
        // below ends with a barrier.
        let r = {
            // SAFETY: both ranges are live device memory of this context.
            unsafe {
                let a = sys::cuMemsetD8_v2(workspace.ptr, 0, total);
                if a == sys::CUresult::CUDA_SUCCESS {
                    sys::cuMemsetD8_v2(state.ptr, 0, state.len)
                } else {
                    a
                }
            }
        };
        check(r, "cuMemsetD8", ctx)?;
        let views = peers::exchange(
            control,
            workspace.ptr,
            dev.ordinal,
            &dev.ctx,
            "kernel-workspace",
            ctx,
        )?;
        Ok(Some(OwnKernels {
            functions,
            views,
            _workspace: workspace,
            state,
            ws_bytes,
            slot_bytes,
            rank: control.rank(),
            world,
            timeout_ns: dev.timeout.as_nanos().min(u64::MAX as u128) as u64,
            pdl: dev.own_kernels_pdl,
        }))
    }

    fn function(&self, name: &str) -> Option<&Function> {
        self.functions.get(name)
    }

    /// Why `kernel` cannot move `elems` elements of `dtype` per piece, if it cannot.
    pub(crate) fn unavailable(
        &self,
        kernel: CollectiveKernel,
        dtype: DType,
        elems: usize,
    ) -> Option<String> {
        let Some(name) = kernel.function(dtype) else {
            return Some(format!("no {kernel:?} kernel for {dtype}"));
        };
        if self.function(name).is_none() {
            return Some(format!("kernel {name} is not loaded"));
        }
        let count = kernel.args_count(elems as u64, dtype);
        if let Some(payload) = kernel.ll_payload_bytes(count, dtype) {
            return (payload as usize > LL_MAX_BYTES).then(|| {
                format!(
                    "{payload} B per piece exceed the {LL_MAX_BYTES} B of the low-latency protocol"
                )
            });
        }
        let need = kernel.slot_bytes_needed(count, dtype, self.world as u32);
        if need as usize > self.slot_bytes {
            return Some(format!(
                "{need} B per piece exceed the {} B workspace slot (CommConfig::kernel_slot_bytes)",
                self.slot_bytes
            ));
        }
        None
    }

    /// Enqueue `kernel` on `stream`: `elems` elements (all-reduce: the buffer; all-gather and
    /// reduce-scatter: one piece).
    #[allow(clippy::too_many_arguments)] // the launch's independent parts
    pub(crate) fn launch(
        &self,
        kernel: CollectiveKernel,
        dtype: DType,
        input: u64,
        output: u64,
        elems: usize,
        stream: sys::CUstream,
        ctx: &OpCtx,
    ) -> Result<()> {
        let name = kernel
            .function(dtype)
            .ok_or_else(|| Error::InvalidArgument {
                ctx: ctx.clone(),
                detail: format!("no {kernel:?} kernel for {dtype}"),
            })?;
        let f = self.function(name).ok_or_else(|| Error::InvalidArgument {
            ctx: ctx.clone(),
            detail: format!("kernel {name} is not loaded"),
        })?;
        let mut args = SymmArgs {
            input,
            output,
            count: kernel.args_count(elems as u64, dtype),
            slot_bytes: self.slot_bytes as u64,
            state: self.state.ptr,
            timeout_ns: self.timeout_ns,
            rank: self.rank as u32,
            world: self.world as u32,
            ..SymmArgs::default()
        };
        for (p, v) in self.views.iter().enumerate() {
            args.ws[p] = v.base();
            args.pad[p] = v.base() + self.ws_bytes as u64;
        }
        let bytes = elems * dtype.size();
        let grid = match kernel {
            CollectiveKernel::Barrier => 1,
            CollectiveKernel::LlAllReduce
            | CollectiveKernel::LlAllGather
            | CollectiveKernel::LlReduceScatter => ll_grid_for(bytes),
            _ => grid_for(bytes),
        };
        let block = if kernel == CollectiveKernel::Barrier {
            32
        } else {
            BLOCK_THREADS
        };
        let mut params = [&mut args as *mut SymmArgs as *mut c_void];
        // SAFETY: every kernel of collectives.cu takes one `SymmArgs` by value (its C struct is
        // generated from ours, layout checked at compile time), which `params` points to; the
        // workspace, pads and state are alive as long as this group, and the
        // input and output ranges were validated by the caller.
        // Every kernel of collectives.cu waits on the grid dependency before it reads or writes
        // memory, so it may be launched with PDL (KERNELS.md §2 and §4 rule 7).
        unsafe { f.launch(grid, block, 0, stream, &mut params, self.pdl, ctx) }
    }

    /// The protocol part of a launch's arguments: every peer's signal pad, this rank's state,
    /// the deadline, rank and world (`ws`, `in`, `out`, `count` and `slot_bytes` left 0), for
    /// kernels of other modules that synchronise through this group's pads (`dcp.cu`).
    pub(crate) fn protocol_args(&self) -> SymmArgs {
        let mut args = SymmArgs {
            state: self.state.ptr,
            timeout_ns: self.timeout_ns,
            rank: self.rank as u32,
            world: self.world as u32,
            ..SymmArgs::default()
        };
        for (p, v) in self.views.iter().enumerate() {
            args.pad[p] = v.base() + self.ws_bytes as u64;
        }
        args
    }

    /// The arguments of a kernel of another module that moves data through this group's
    /// workspace (`rmsnorm.cu`): [`OwnKernels::protocol_args`] with every peer's workspace and
    /// the slot size (`in`, `out` and `count` left 0).
    pub(crate) fn workspace_args(&self) -> SymmArgs {
        let mut args = self.protocol_args();
        args.slot_bytes = self.slot_bytes as u64;
        for (p, v) in self.views.iter().enumerate() {
            args.ws[p] = v.base();
        }
        args
    }

    /// This rank's kernel state: an error names the peer and what failed.
    pub(crate) fn check_state(&self, ctx: &OpCtx) -> Result<()> {
        let mut st = SymmState::default();
        // SAFETY: the state is 64 bytes of device memory; the caller synchronised the stream.
        let r = unsafe {
            sys::cuMemcpyDtoH_v2(
                &mut st as *mut SymmState as *mut c_void,
                self.state.ptr,
                std::mem::size_of::<SymmState>(),
            )
        };
        check(r, "cuMemcpyDtoH (kernel state)", ctx)?;
        match st.error_message() {
            None => Ok(()),
            Some(reason) => Err(Error::Aborted {
                ctx: ctx.clone(),
                reason: format!("our NVLink kernels stopped: {reason}"),
            }),
        }
    }
}
