//! The compute trait: the operations of one decode step, each named after what it does to the
//! step's activations ([`Act`]). [`crate::model::decode_step`] is written once over it; a CPU
//! implementation in f32 ([`crate::cpu`]) and a CUDA one in bf16 ([`crate::cuda`]) carry it out.
//! An implementation holds its shard's weights, its KV cache and one buffer per activation,
//! sized for the largest batch; `batch` says how many rows a call touches.

use anyhow::Result;

use crate::model::{Act, Linear, Norm};

/// The operations of a decode step.
pub trait Compute {
    /// [`Act::Hidden`] ← the step's input (the same every step, so that every step, and every
    /// replay of a captured one, computes the same output).
    fn load_input(&mut self, batch: usize) -> Result<()>;

    /// `y` ← RMSNorm of `x` (f32 sum of squares) times `w`.
    fn rms_norm(&mut self, x: Act, w: Norm, y: Act, batch: usize) -> Result<()>;

    /// `y` ← `x`·Wᵀ for this rank's shard of `w` (f32 accumulation).
    fn linear(&mut self, x: Act, w: Linear, y: Act, batch: usize) -> Result<()>;

    /// RoPE at the step's position ([`crate::model::Dims::context`]) on the q and k heads of
    /// [`Act::Qkv`] (q in place), and the rotated k and the v of the new token written into
    /// layer `layer`'s KV cache at that position.
    fn rope_append_kv(&mut self, layer: usize, batch: usize) -> Result<()>;

    /// [`Act::Attn`] ← softmax(q·Kᵀ/√d)·V per query head over layer `layer`'s cache (the
    /// prefilled context and the new token), grouped-query: each KV head serves
    /// `q_heads / kv_heads` query heads.
    fn attention(&mut self, layer: usize, batch: usize) -> Result<()>;

    /// [`Act::Mlp`] ← silu(gate) · up, gate and up from [`Act::GateUp`].
    fn swiglu(&mut self, batch: usize) -> Result<()>;

    /// [`Act::Hidden`] += [`Act::Reduce`].
    fn add_residual(&mut self, batch: usize) -> Result<()>;

    /// [`Act::Reduce`] ← its sum over the tensor-parallel group (nothing when unsharded).
    fn all_reduce(&mut self, batch: usize) -> Result<()>;

    /// What ends each half of a layer: [`Act::Hidden`] += the all-reduced [`Act::Reduce`], then
    /// `y` ← RMSNorm of [`Act::Hidden`] times `w`. By default the three operations above, one
    /// after the other ([`unfused_all_reduce_add_norm`]); an implementation may fuse them.
    fn all_reduce_add_norm(&mut self, w: Norm, y: Act, batch: usize) -> Result<()> {
        unfused_all_reduce_add_norm(self, w, y, batch)
    }
}

/// [`Compute::all_reduce_add_norm`] as three operations: all-reduce, residual add, RMSNorm.
pub fn unfused_all_reduce_add_norm<C: Compute + ?Sized>(
    c: &mut C,
    w: Norm,
    y: Act,
    batch: usize,
) -> Result<()> {
    c.all_reduce(batch)?;
    c.add_residual(batch)?;
    c.rms_norm(Act::Hidden, w, y, batch)
}
