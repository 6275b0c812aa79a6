//! The DCP combine on CUDA (`kernels/dcp.cu`): the correction kernel of the all-gather /
//! correct / reduce-scatter sequence, and the launch of the fused combine on a group's
//! protocol state (pads, epoch) with the combine's own workspace in the symmetric pool.

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::driver::CudaContext;
use cudarc::driver::sys;

use super::modules::{Function, Module, source};
use crate::backend::{DcpCorrect, DcpShape};
use crate::dtype::DType;
use crate::error::{Error, OpCtx, Result};
use crate::kernels::{DCP_BLOCK_THREADS, DcpArgs, MAX_BLOCKS, MAX_WORLD, SymmArgs, dcp_function};

/// The kernels of `dcp.cu`, loaded on one device.
#[derive(Debug)]
pub(crate) struct DcpKernels {
    functions: Vec<(&'static str, Function)>,
}

impl DcpKernels {
    pub(crate) fn load(ctx: &Arc<CudaContext>, cc: (i32, i32), op: &OpCtx) -> Result<Self> {
        let m = Module::load(ctx, source("dcp"), cc, op)?;
        let mut functions = Vec::new();
        for fused in [false, true] {
            for p in [DType::BF16, DType::F32] {
                for o in [DType::BF16, DType::F32] {
                    let name = dcp_function(fused, p, o).expect("bf16 and f32 are covered");
                    functions.push((name, m.function(name, op)?));
                }
            }
        }
        Ok(DcpKernels { functions })
    }

    fn function(&self, fused: bool, shape: &DcpShape, ctx: &OpCtx) -> Result<&Function> {
        let name = dcp_function(fused, shape.partial, shape.out).ok_or_else(|| {
            Error::InvalidArgument {
                ctx: ctx.clone(),
                detail: format!(
                    "the DCP kernels take bf16 or f32 partial outputs and outputs, not {} -> {}",
                    shape.partial, shape.out
                ),
            }
        })?;
        self.functions
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, f)| f)
            .ok_or_else(|| Error::InvalidArgument {
                ctx: ctx.clone(),
                detail: format!("kernel {name} is not loaded"),
            })
    }

    /// Enqueue the correction step.
    pub(crate) fn correct(&self, call: &DcpCorrect, stream: sys::CUstream) -> Result<()> {
        let sh = &call.shape;
        let f = self.function(false, sh, &call.ctx)?;
        let mut args = dcp_args(sh, &call.ctx)?;
        args.partial = call.partial.addr();
        args.lse = call.lse_all.addr();
        args.out = call.corrected.addr();
        args.merged_lse = call.merged_lse.as_ref().map_or(0, |m| m.addr());
        check_aligned(&[args.partial, args.out], &call.ctx)?;
        let rows = sh.batch * sh.heads;
        let warps = (DCP_BLOCK_THREADS / 32) as usize;
        let grid = rows.div_ceil(warps).clamp(1, 4096) as u32;
        let mut params = [&mut args as *mut DcpArgs as *mut c_void];
        // SAFETY: `dcp_correct_*` takes one `DcpArgs` by value (its C struct is generated from
        // ours); the group validated that the
        // partial output holds [B, H, D], the LSEs [N, B, H] f32, the corrected output [H, B, D]
        // and the merged LSE [B, H/N], and the caller keeps them alive until the work is done.
        unsafe {
            f.launch(
                grid,
                DCP_BLOCK_THREADS,
                0,
                stream,
                &mut params,
                false,
                &call.ctx,
            )
        }
    }

    /// Enqueue the fused combine with `symm` (the group's protocol: pads, state, deadline, and
    /// the combine's workspace as every peer's `ws`) and `dcp` (pointers set by the caller),
    /// with programmatic dependent launch when `pdl` (as our collectives are launched).
    pub(crate) fn fused(
        &self,
        shape: &DcpShape,
        symm: &mut SymmArgs,
        dcp: &mut DcpArgs,
        stream: sys::CUstream,
        pdl: bool,
        ctx: &OpCtx,
    ) -> Result<()> {
        let f = self.function(true, shape, ctx)?;
        check_aligned(&[dcp.partial, dcp.out], ctx)?;
        let grid = fused_grid(shape);
        let mut params = [
            symm as *mut SymmArgs as *mut c_void,
            dcp as *mut DcpArgs as *mut c_void,
        ];
        // SAFETY: `dcp_fused_*` takes a `SymmArgs` and a `DcpArgs` by value (C structs generated
        // from ours, layout checked at compile time); the workspace, pads
        // and state belong to the group and the combine, which outlive the launch (graphs keep
        // the buffers), and the group validated the shapes of every buffer. The kernel waits on
        // the grid dependency (symm_enter, its first statement) before it touches memory, so PDL
        // is safe.
        unsafe { f.launch(grid, DCP_BLOCK_THREADS, 0, stream, &mut params, pdl, ctx) }
    }
}

/// Blocks of the fused combine: one per 4 rows of `(token, local head)`, at most [`MAX_BLOCKS`]
/// (every rank computes the same number from the same shape). 128 blocks instead of 64 took the
/// 2-GPU combine at B = 32 from 15.3 to 13.7 µs (DeepSeek-V3 shapes, graph).
pub(crate) fn fused_grid(shape: &DcpShape) -> u32 {
    (shape.batch * shape.heads_local())
        .div_ceil(4)
        .clamp(1, MAX_BLOCKS as usize) as u32
}

fn dcp_args(sh: &DcpShape, ctx: &OpCtx) -> Result<DcpArgs> {
    let to_u32 = |v: usize, what: &str| {
        u32::try_from(v).map_err(|_| Error::InvalidArgument {
            ctx: ctx.clone(),
            detail: format!("{what} = {v} does not fit the DCP kernels' 32-bit field"),
        })
    };
    Ok(DcpArgs {
        world: to_u32(sh.world, "world")?,
        rank: to_u32(sh.rank, "rank")?,
        batch: to_u32(sh.batch, "batch")?,
        heads: to_u32(sh.heads, "heads")?,
        dim: to_u32(sh.dim, "dim")?,
        base2: sh.base.kernel_code(),
        ..DcpArgs::default()
    })
}

/// The DCP kernels move whole 16-byte vectors: rows of D = 8k elements from 16-byte aligned
/// buffers.
fn check_aligned(ptrs: &[u64], ctx: &OpCtx) -> Result<()> {
    if let Some(p) = ptrs.iter().find(|&&p| p % 16 != 0) {
        return Err(Error::InvalidArgument {
            ctx: ctx.clone(),
            detail: format!("the DCP kernels need 16-byte aligned buffers; {p:#x} is not"),
        });
    }
    Ok(())
}

/// Why the fused combine cannot run `shape` with our kernels, if it cannot (the part that does
/// not depend on the group).
pub(crate) fn fused_shape_unavailable(shape: &DcpShape) -> Option<String> {
    if !(2..=MAX_WORLD).contains(&shape.world) {
        return Some(format!(
            "the fused combine runs on 2..{MAX_WORLD} ranks, not {}",
            shape.world
        ));
    }
    if dcp_function(true, shape.partial, shape.out).is_none() {
        return Some(format!(
            "the fused combine takes bf16 or f32, not {} -> {}",
            shape.partial, shape.out
        ));
    }
    if !shape.dim.is_multiple_of(8) {
        return Some(format!(
            "the fused combine moves 8-element vectors; D = {} is not a multiple of 8",
            shape.dim
        ));
    }
    None
}

/// The pointer-free part of a launch's `DcpArgs` (for the group's fused launch).
pub(crate) fn shape_args(sh: &DcpShape, ctx: &OpCtx) -> Result<DcpArgs> {
    dcp_args(sh, ctx)
}
