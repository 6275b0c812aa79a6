//! The add-RMSNorm on CUDA (`kernels/rmsnorm.cu`, KERNELS.md §10): the step alone after a
//! collective, and the launches of the fused kernels on a group's protocol state (pads, epoch)
//! and workspace.

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::driver::CudaContext;
use cudarc::driver::sys;

use super::modules::{Function, Module, source};
use crate::backend::{AddRmsNormStep, Algo, NormBuffers, NormForm, NormFused, NormShape};
use crate::dtype::DType;
use crate::error::{Error, OpCtx, Result};
use crate::kernels::{MAX_BLOCKS, NormKernel, RMSNORM_BLOCK_THREADS, RmsNormArgs, SymmArgs};

/// The kernels of `rmsnorm.cu`, loaded on one device.
#[derive(Debug)]
pub(crate) struct NormKernels {
    functions: Vec<(&'static str, Function)>,
}

/// The fused kernel of `form` and `algo`, if there is one.
pub(crate) fn kernel_for(form: NormForm, algo: Algo) -> Option<NormKernel> {
    Some(match (form, algo) {
        (NormForm::AllReduce, Algo::LowLatency) => NormKernel::LlAllReduce,
        (NormForm::AllReduce, Algo::OneShot) => NormKernel::OneShotAllReduce,
        (NormForm::AllReduce, Algo::TwoShot) => NormKernel::TwoShotAllReduce,
        (NormForm::ReduceScatter, Algo::LowLatency) => NormKernel::LlReduceScatter,
        (NormForm::ReduceScatter, Algo::OneShot) => NormKernel::ReduceScatter,
        _ => return None,
    })
}

impl NormKernels {
    pub(crate) fn load(ctx: &Arc<CudaContext>, cc: (i32, i32), op: &OpCtx) -> Result<Self> {
        let m = Module::load(ctx, source("rmsnorm"), cc, op)?;
        let mut functions = Vec::new();
        for kernel in NormKernel::ALL {
            for dtype in [DType::BF16, DType::F16] {
                let name = kernel.function(dtype).expect("bf16 and f16 are covered");
                functions.push((name, m.function(name, op)?));
            }
        }
        Ok(NormKernels { functions })
    }

    fn function(&self, kernel: NormKernel, dtype: DType, ctx: &OpCtx) -> Result<&Function> {
        let name = kernel
            .function(dtype)
            .ok_or_else(|| Error::InvalidArgument {
                ctx: ctx.clone(),
                detail: format!("the add-RMSNorm kernels take bf16 or f16, not {dtype}"),
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

    /// Enqueue the add-RMSNorm step alone: one block per row, grid-stride.
    pub(crate) fn add_rmsnorm(
        &self,
        step: &AddRmsNormStep,
        stream: sys::CUstream,
        pdl: bool,
    ) -> Result<()> {
        let f = self.function(NormKernel::AddRmsNorm, step.dtype, &step.ctx)?;
        let mut args = norm_args(&step.bufs, step.rows, step.hidden, &step.ctx)?;
        let grid = step.rows.clamp(1, 4096) as u32;
        let mut params = [&mut args as *mut RmsNormArgs as *mut c_void];
        // SAFETY: `symm_add_rmsnorm_*` takes one `RmsNormArgs` by value (its C struct is
        // generated from ours, layout checked at compile time); the norm module validated that
        // the input, residual and outputs hold [rows, hidden] and the weight [hidden], 16-byte
        // aligned, and the caller keeps them alive until the work is done (graphs keep them).
        // The kernel waits on the grid dependency before it touches memory, so PDL is safe.
        unsafe {
            f.launch(
                grid,
                RMSNORM_BLOCK_THREADS,
                0,
                stream,
                &mut params,
                pdl,
                &step.ctx,
            )
        }
    }

    /// Enqueue the fused kernel of `call` with `symm` (the group's protocol and workspace:
    /// pads, state, deadline, every peer's workspace and the slot size).
    pub(crate) fn fused(
        &self,
        call: &NormFused,
        symm: &mut SymmArgs,
        stream: sys::CUstream,
        pdl: bool,
    ) -> Result<()> {
        let sh = &call.shape;
        let kernel = kernel_for(sh.form, call.algo).ok_or_else(|| Error::ImplUnavailable {
            ctx: call.ctx.clone(),
            implementation: format!("fused_{}", call.algo.name()),
            why: format!(
                "no fused {} kernel for the {} form",
                call.algo.name(),
                sh.form.name()
            ),
        })?;
        let f = self.function(kernel, sh.dtype, &call.ctx)?;
        let mut args = norm_args(&call.bufs, sh.tokens, sh.hidden, &call.ctx)?;
        let grid = fused_grid(sh, call.algo);
        let mut params = [
            symm as *mut SymmArgs as *mut c_void,
            &mut args as *mut RmsNormArgs as *mut c_void,
        ];
        // SAFETY: the fused kernels take a `SymmArgs` and an `RmsNormArgs` by value (C structs
        // generated from ours, layout checked at compile time); the pads, state and workspace
        // belong to the group, which outlives the launch; the norm module validated the shapes
        // and alignment of the five buffers, which the caller keeps alive (graphs keep them).
        // Every kernel waits on the grid dependency (symm_enter) before it touches memory.
        unsafe {
            f.launch(
                grid,
                RMSNORM_BLOCK_THREADS,
                0,
                stream,
                &mut params,
                pdl,
                &call.ctx,
            )
        }
    }
}

/// Blocks of a fused launch, the same on every rank (it depends on the shape only): one per row
/// a block normalises (every row of the all-reduce, one rank's slice of the others), and for
/// the LL kernels at least one per 8 KiB pushed (a thread pushes a 16-byte unit at a time); at
/// most [`MAX_BLOCKS`].
pub(crate) fn fused_grid(sh: &NormShape, algo: Algo) -> u32 {
    let slice = sh.tokens.div_ceil(sh.world.max(1));
    let per_block = 16 * RMSNORM_BLOCK_THREADS as usize;
    let blocks = match (sh.form, algo) {
        (NormForm::AllReduce, Algo::LowLatency) => {
            sh.tokens.max(sh.input_bytes().div_ceil(per_block))
        }
        (NormForm::AllReduce, Algo::OneShot) => sh.tokens,
        (NormForm::ReduceScatter, Algo::LowLatency) => {
            slice.max((slice * sh.row_bytes()).div_ceil(per_block))
        }
        _ => slice,
    };
    blocks.clamp(1, MAX_BLOCKS as usize) as u32
}

/// Why our fused kernel for `algo` cannot run `shape` on a group whose workspace slots hold
/// `slot_bytes`, if it cannot (the part of the rules only CUDA has; the norm module checks the
/// rest).
pub(crate) fn fused_unavailable(
    shape: &NormShape,
    algo: Algo,
    slot_bytes: usize,
) -> Option<String> {
    let Some(kernel) = kernel_for(shape.form, algo) else {
        return Some(format!(
            "no fused {} kernel for the {} form",
            algo.name(),
            shape.form.name()
        ));
    };
    if kernel.function(shape.dtype).is_none() {
        return Some(format!(
            "the fused kernels take bf16 or f16, not {}",
            shape.dtype
        ));
    }
    let es = shape.dtype.size() as u64;
    let need = kernel.slot_bytes_needed(
        shape.tokens as u64,
        shape.hidden as u64,
        es,
        shape.world as u64,
    );
    (need as usize > slot_bytes).then(|| {
        format!(
            "fused {} needs a {need} B workspace slot; the group's is {slot_bytes} B \
             (CommConfig::kernel_slot_bytes)",
            algo.name()
        )
    })
}

/// The `RmsNormArgs` of a launch over `tokens` rows of `hidden` elements.
fn norm_args(bufs: &NormBuffers, tokens: usize, hidden: usize, ctx: &OpCtx) -> Result<RmsNormArgs> {
    let to_u32 = |v: usize, what: &str| {
        u32::try_from(v).map_err(|_| Error::InvalidArgument {
            ctx: ctx.clone(),
            detail: format!("{what} = {v} does not fit the add-RMSNorm kernels' 32-bit field"),
        })
    };
    let args = RmsNormArgs {
        input: bufs.input.addr(),
        residual: bufs.residual.addr(),
        weight: bufs.weight.addr(),
        normed: bufs.normed.addr(),
        residual_out: bufs.residual_out.addr(),
        tokens: to_u32(tokens, "tokens")?,
        hidden: to_u32(hidden, "hidden")?,
        eps: bufs.eps,
        reserved: 0,
    };
    let ptrs = [
        args.input,
        args.residual,
        args.weight,
        args.normed,
        args.residual_out,
    ];
    if let Some(p) = ptrs.iter().find(|&&p| p % 16 != 0) {
        return Err(Error::InvalidArgument {
            ctx: ctx.clone(),
            detail: format!("the add-RMSNorm kernels need 16-byte aligned buffers; {p:#x} is not"),
        });
    }
    Ok(args)
}
