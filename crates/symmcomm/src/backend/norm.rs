//! What a backend sees of a fused add-RMSNorm (the `norm` module): the shape of one call, its
//! five buffers, the fused call (collective, residual add and RMSNorm in one step per rank) and
//! the add-RMSNorm step alone (after a separate collective).

use crate::backend::Algo;
use crate::dtype::DType;
use crate::error::OpCtx;
use crate::memory::MemRef;

/// Which collective comes before the residual add and RMSNorm.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NormForm {
    /// All-reduce: every rank gets every row, normalised (tensor parallelism).
    AllReduce,
    /// Reduce-scatter along the rows: rank `r` gets rows `[r·T/N, (r+1)·T/N)`, normalised (DP
    /// attention, sequence parallelism).
    ReduceScatter,
}

impl NormForm {
    /// `all_reduce` or `reduce_scatter`.
    pub fn name(self) -> &'static str {
        match self {
            NormForm::AllReduce => "all_reduce",
            NormForm::ReduceScatter => "reduce_scatter",
        }
    }

    /// The algorithms a fused kernel of this form runs: low-latency and one barrier for both,
    /// two-shot (reduce-scatter, add and norm of the rank's rows, all-gather) for the all-reduce.
    pub fn fused_algos(self) -> &'static [Algo] {
        match self {
            NormForm::AllReduce => &[Algo::LowLatency, Algo::OneShot, Algo::TwoShot],
            NormForm::ReduceScatter => &[Algo::LowLatency, Algo::OneShot],
        }
    }
}

/// The shape of one add-RMSNorm call on one rank.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct NormShape {
    pub(crate) form: NormForm,
    pub(crate) world: usize,
    pub(crate) rank: usize,
    /// Rows of the input `T` (every rank's rows, in the reduce-scatter form).
    pub(crate) tokens: usize,
    pub(crate) hidden: usize,
    pub(crate) dtype: DType,
}

impl NormShape {
    /// Rows this rank normalises: `T` (all-reduce) or `T / N` (reduce-scatter).
    pub(crate) fn rows_out(&self) -> usize {
        match self.form {
            NormForm::AllReduce => self.tokens,
            NormForm::ReduceScatter => self.tokens / self.world.max(1),
        }
    }

    /// Bytes of one row.
    pub(crate) fn row_bytes(&self) -> usize {
        self.hidden * self.dtype.size()
    }

    /// Bytes of the input (the collective's larger buffer, as nccl-tests counts).
    pub(crate) fn input_bytes(&self) -> usize {
        self.tokens * self.row_bytes()
    }
}

/// The buffers of one add-RMSNorm call, contiguous and validated: `input` `[T, H]`, `residual`,
/// `normed` and `residual_out` `[rows_out, H]`, `weight` `[H]`, all of the call's element type.
#[derive(Clone, Debug)]
pub(crate) struct NormBuffers {
    pub(crate) input: MemRef,
    pub(crate) residual: MemRef,
    pub(crate) weight: MemRef,
    pub(crate) normed: MemRef,
    pub(crate) residual_out: MemRef,
    pub(crate) eps: f32,
}

/// The fused call on one rank: `algo`'s collective, the residual add and the RMSNorm in one
/// step (one kernel per rank on CUDA).
#[derive(Clone, Debug)]
pub(crate) struct NormFused {
    pub(crate) shape: NormShape,
    pub(crate) algo: Algo,
    pub(crate) bufs: NormBuffers,
    pub(crate) ctx: OpCtx,
}

/// The add-RMSNorm step alone on one rank: `bufs.input` holds the collective's result,
/// `[rows, H]` (it may be `bufs.normed`: the step works in place).
#[derive(Clone, Debug)]
pub(crate) struct AddRmsNormStep {
    pub(crate) rows: usize,
    pub(crate) hidden: usize,
    pub(crate) dtype: DType,
    pub(crate) bufs: NormBuffers,
    pub(crate) ctx: OpCtx,
}
