//! What symmcomm's own lab (crates/symmcomm-lab) and tests use, not engines (feature `lab`):
//! deterministic fills of the reference generator ([`fill`]), poisoned outputs, device epoch
//! counters that give every graph replay fresh inputs, and the physical limits of a GPU pair.

use crate::backend::FillSpec;
use crate::dtype::DType;
use crate::error::{Op, Result};
use crate::group::Group;
use crate::tensor::Tensor;

pub use crate::backend::cuda::limits::{Limits, measure as measure_limits};
pub use crate::backend::cuda::test_hooks;
pub use crate::tensor::DimSplit;
/// The reference generator: element `i` of rank `rank` at epoch `e` for a seed, the same bits
/// on the host and in the fill kernels.
pub mod fill {
    pub use crate::fill::*;
}

/// A device counter that producers read as their epoch; bumping it inside a captured graph
/// gives every replay fresh inputs.
#[derive(Clone, Debug)]
pub struct EpochCounter {
    t: Tensor,
}

impl Group {
    /// Enqueue a fill of `t` with the reference generator ([`fill`]) for `seed` and this
    /// group's rank, at the epoch `counter` holds when the fill runs (0 without a counter).
    pub fn fill_random(&self, t: &Tensor, seed: u64, counter: Option<&EpochCounter>) -> Result<()> {
        self.fill_with(t, seed, counter, None)
    }

    /// [`Group::fill_random`] by a producer that lets the next kernel start at once and writes
    /// only after `delay_ns` (bf16 only on CUDA): what a consumer launched with programmatic
    /// dependent launch that does not wait on its grid dependency sees. For hazard tests.
    pub fn fill_random_early_release(
        &self,
        t: &Tensor,
        seed: u64,
        counter: Option<&EpochCounter>,
        delay_ns: u64,
    ) -> Result<()> {
        self.fill_with(t, seed, counter, Some(delay_ns))
    }

    fn fill_with(
        &self,
        t: &Tensor,
        seed: u64,
        counter: Option<&EpochCounter>,
        early_release_ns: Option<u64>,
    ) -> Result<()> {
        let r = self.contiguous_ref(t, Op::Fill)?;
        let spec = FillSpec {
            seed,
            rank: self.rank() as u64,
            epoch: counter.map(|c| c.t.buf.mem_ref(0)),
            early_release_ns,
        };
        let mut keep = vec![&t.buf];
        if let Some(c) = counter {
            keep.push(&c.t.buf);
        }
        let ctx = self.ctx(Op::Fill, t.bytes());
        let exec = self.exec(&ctx)?;
        self.keep_alive(exec, &keep, &ctx)?;
        self.device()
            .fill(exec.stream, &r, t.dtype, t.numel(), &spec)
    }

    /// Enqueue setting every byte of `t` to 0xFF (NaN for floats): outputs are poisoned before
    /// a run so an element left unwritten fails the check.
    pub fn poison(&self, t: &Tensor) -> Result<()> {
        let r = self.contiguous_ref(t, Op::Fill)?;
        let ctx = self.ctx(Op::Fill, t.bytes());
        let exec = self.exec(&ctx)?;
        self.keep_alive(exec, &[&t.buf], &ctx)?;
        self.device().memset(exec.stream, &r, t.bytes(), 0xFF)
    }

    /// A zeroed epoch counter in plain memory.
    pub fn epoch_counter(&self) -> Result<EpochCounter> {
        let t = self.alloc_plain(DType::U8, &[8])?;
        self.upload_bytes(&t, &[0; 8])?;
        Ok(EpochCounter { t })
    }

    /// Enqueue `counter += 1`.
    pub fn bump(&self, counter: &EpochCounter) -> Result<()> {
        let ctx = self.ctx(Op::Kernel, 8);
        let exec = self.exec(&ctx)?;
        self.keep_alive(exec, &[&counter.t.buf], &ctx)?;
        self.device().bump(exec.stream, &counter.t.buf.mem_ref(0))
    }

    /// The counter's value (waits for queued work).
    pub fn epoch(&self, counter: &EpochCounter) -> Result<u64> {
        let b = self.download_bytes(&counter.t)?;
        Ok(u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }
}
