//! The model: the dimensions of a Llama-style decoder, one rank's tensor-parallel shard of them,
//! and one decode step written once over [`Compute`], so that the same code runs sharded and
//! unsharded, on the CPU and on the GPU.

use anyhow::{Result, bail};

use crate::compute::Compute;

/// A decoder's dimensions.
#[derive(Clone, Debug, PartialEq)]
pub struct Dims {
    /// Preset name (`llama-3.1-8b`, `tiny`), `-custom` appended when overridden.
    pub name: String,
    /// Hidden size.
    pub hidden: usize,
    /// MLP intermediate size.
    pub intermediate: usize,
    /// Decoder layers.
    pub layers: usize,
    /// Query heads.
    pub q_heads: usize,
    /// Key/value heads (grouped-query attention: `q_heads / kv_heads` queries share one).
    pub kv_heads: usize,
    /// Dimension of one head.
    pub head_dim: usize,
    /// Tokens already in every sequence's KV cache (random, "prefilled"); the step's token
    /// is at position `context` and attends to `context + 1` tokens.
    pub context: usize,
    /// RoPE base.
    pub rope_theta: f32,
    /// RMSNorm epsilon.
    pub eps: f32,
}

/// The longest context the attention kernel holds in shared memory (scores of 4 bytes).
pub const MAX_CONTEXT: usize = 8192;
/// The largest head dimension the kernels take.
pub const MAX_HEAD_DIM: usize = 256;

impl Dims {
    /// The presets' names, for errors and help.
    pub const PRESETS: &'static str = "llama-3.1-8b, tiny";

    /// A preset: `llama-3.1-8b` (hidden 4096, intermediate 14336, 32 layers, 32 query and 8
    /// KV heads of 128, RoPE base 500000 without Llama 3.1's long-context scaling, a context of
    /// 256 tokens) or `tiny` (hidden 64, 2 layers, 4/2 heads of 16, intermediate 128, context 8).
    pub fn preset(name: &str) -> Option<Dims> {
        match name {
            "llama-3.1-8b" => Some(Dims {
                name: name.into(),
                hidden: 4096,
                intermediate: 14336,
                layers: 32,
                q_heads: 32,
                kv_heads: 8,
                head_dim: 128,
                context: 256,
                rope_theta: 500_000.0,
                eps: 1e-5,
            }),
            "tiny" => Some(Dims {
                name: name.into(),
                hidden: 64,
                intermediate: 128,
                layers: 2,
                q_heads: 4,
                kv_heads: 2,
                head_dim: 16,
                context: 8,
                rope_theta: 10_000.0,
                eps: 1e-5,
            }),
            _ => None,
        }
    }

    /// Parameters of the linear layers and norms (the KV cache not counted).
    pub fn params(&self) -> u64 {
        let (h, i) = (self.hidden as u64, self.intermediate as u64);
        let q = (self.q_heads * self.head_dim) as u64;
        let kv = (self.kv_heads * self.head_dim) as u64;
        let layer = h * (q + 2 * kv) + q * h + 3 * h * i + 2 * h;
        self.layers as u64 * layer + h
    }

    /// One line for reports.
    pub fn describe(&self) -> String {
        format!(
            "{}: hidden {}, intermediate {}, {} layers, {} query / {} KV heads of {}, context {} + 1",
            self.name,
            self.hidden,
            self.intermediate,
            self.layers,
            self.q_heads,
            self.kv_heads,
            self.head_dim,
            self.context
        )
    }

    /// Whether the dimensions make a model the kernels can run.
    pub fn validate(&self) -> Result<()> {
        for (what, v) in [
            ("hidden", self.hidden),
            ("intermediate", self.intermediate),
            ("layers", self.layers),
            ("q_heads", self.q_heads),
            ("kv_heads", self.kv_heads),
            ("head_dim", self.head_dim),
        ] {
            if v == 0 {
                bail!("{what} must be at least 1");
            }
        }
        if !self.q_heads.is_multiple_of(self.kv_heads) {
            bail!(
                "{} query heads do not group evenly over {} KV heads",
                self.q_heads,
                self.kv_heads
            );
        }
        if !self.head_dim.is_power_of_two() || !(8..=MAX_HEAD_DIM).contains(&self.head_dim) {
            bail!(
                "head_dim {} must be a power of two from 8 to {MAX_HEAD_DIM} (the attention \
                 kernel reads rows in 16-byte pieces that tile a warp)",
                self.head_dim
            );
        }
        if self.context > MAX_CONTEXT {
            bail!(
                "context {} is longer than the attention kernel's {MAX_CONTEXT} tokens",
                self.context
            );
        }
        Ok(())
    }
}

/// One rank's share of the model under tensor parallelism over `world` ranks: q/k/v and
/// gate/up column-parallel (this rank's heads and intermediate features), o and down
/// row-parallel (the matching input columns), norms and the residual stream replicated.
#[derive(Clone, Debug, PartialEq)]
pub struct Shard {
    /// The full model.
    pub dims: Dims,
    /// Tensor-parallel ranks.
    pub world: usize,
    /// This rank.
    pub rank: usize,
}

impl Shard {
    /// Rank `rank` of `world`; the heads and the intermediate size must split evenly.
    pub fn new(dims: Dims, world: usize, rank: usize) -> Result<Shard> {
        dims.validate()?;
        if world == 0 || rank >= world {
            bail!("rank {rank} of {world} ranks");
        }
        for (what, v) in [
            ("query heads", dims.q_heads),
            ("KV heads", dims.kv_heads),
            ("intermediate features", dims.intermediate),
        ] {
            if !v.is_multiple_of(world) {
                bail!(
                    "{} {what} do not split over {world} tensor-parallel ranks",
                    v
                );
            }
        }
        Ok(Shard { dims, world, rank })
    }

    /// The whole model on one rank (the reference).
    pub fn unsharded(dims: Dims) -> Result<Shard> {
        Shard::new(dims, 1, 0)
    }

    /// Query heads of this rank.
    pub fn q_heads(&self) -> usize {
        self.dims.q_heads / self.world
    }

    /// KV heads of this rank.
    pub fn kv_heads(&self) -> usize {
        self.dims.kv_heads / self.world
    }

    /// Intermediate features of this rank.
    pub fn intermediate(&self) -> usize {
        self.dims.intermediate / self.world
    }

    /// Slots of each KV-cache row: the prefilled context and the step's token.
    pub fn cache_slots(&self) -> usize {
        self.dims.context + 1
    }

    /// Values per batch row of an activation on this rank.
    pub fn cols(&self, act: Act) -> usize {
        let d = &self.dims;
        match act {
            Act::Hidden | Act::Normed | Act::Reduce | Act::Out => d.hidden,
            Act::Qkv => (self.q_heads() + 2 * self.kv_heads()) * d.head_dim,
            Act::Attn => self.q_heads() * d.head_dim,
            Act::GateUp => 2 * self.intermediate(),
            Act::Mlp => self.intermediate(),
        }
    }
}

/// The activations of a step, one buffer each, `[batch, cols]` row-major.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    /// The residual stream.
    Hidden,
    /// RMSNorm's output, the input of q/k/v and gate/up.
    Normed,
    /// This rank's q, k and v heads, side by side (q rotated in place by RoPE).
    Qkv,
    /// Attention's output for this rank's query heads.
    Attn,
    /// o_proj's and down_proj's partial sums, all-reduced in place (on GPUs: in the TP group's
    /// symmetric memory).
    Reduce,
    /// gate and up of this rank's intermediate features, side by side.
    GateUp,
    /// SwiGLU's output.
    Mlp,
    /// The step's output: the final RMSNorm of the residual stream.
    Out,
}

impl Act {
    /// Every activation.
    pub const ALL: [Act; 8] = [
        Act::Hidden,
        Act::Normed,
        Act::Qkv,
        Act::Attn,
        Act::Reduce,
        Act::GateUp,
        Act::Mlp,
        Act::Out,
    ];
}

/// A linear layer of a decoder layer (weights `[out, in]`, y = x·Wᵀ).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Linear {
    /// q, k and v fused, column-parallel.
    Qkv(usize),
    /// o_proj, row-parallel.
    O(usize),
    /// gate and up fused, column-parallel.
    GateUp(usize),
    /// down_proj, row-parallel.
    Down(usize),
}

/// An RMSNorm's weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Norm {
    /// Before attention in layer `l`.
    Attn(usize),
    /// Before the MLP in layer `l`.
    Mlp(usize),
    /// After the last layer.
    Final,
}

/// One decode step for `batch` sequences (one new token each): the residual stream starts
/// from the step's input and ends, after the final RMSNorm, in [`Act::Out`]. Two all-reduces
/// per layer, after o_proj and after down_proj (unsharded, they do nothing), each followed by
/// the residual add and the RMSNorm that opens the next block
/// ([`Compute::all_reduce_add_norm`], which an implementation may fuse).
pub fn decode_step(c: &mut impl Compute, layers: usize, batch: usize) -> Result<()> {
    c.load_input(batch)?;
    if layers == 0 {
        return c.rms_norm(Act::Hidden, Norm::Final, Act::Out, batch);
    }
    c.rms_norm(Act::Hidden, Norm::Attn(0), Act::Normed, batch)?;
    for l in 0..layers {
        // Attention block: h += o_proj(attention(rope(qkv_proj(norm(h))))), then the MLP's norm.
        c.linear(Act::Normed, Linear::Qkv(l), Act::Qkv, batch)?;
        c.rope_append_kv(l, batch)?;
        c.attention(l, batch)?;
        c.linear(Act::Attn, Linear::O(l), Act::Reduce, batch)?;
        c.all_reduce_add_norm(Norm::Mlp(l), Act::Normed, batch)?;
        // MLP block: h += down_proj(silu(gate) * up), then the next layer's norm (the final one
        // after the last layer).
        c.linear(Act::Normed, Linear::GateUp(l), Act::GateUp, batch)?;
        c.swiglu(batch)?;
        c.linear(Act::Mlp, Linear::Down(l), Act::Reduce, batch)?;
        let (next, out) = if l + 1 < layers {
            (Norm::Attn(l + 1), Act::Normed)
        } else {
            (Norm::Final, Act::Out)
        };
        c.all_reduce_add_norm(next, out, batch)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama_has_eight_billion_parameters_without_embeddings() {
        let d = Dims::preset("llama-3.1-8b").unwrap();
        // 8.03 B with the two 525 M embedding matrices, which a decode step past the
        // embedding lookup does not touch.
        assert_eq!(d.params(), 6_979_588_096);
        let s = Shard::new(d, 2, 1).unwrap();
        assert_eq!(s.cols(Act::Qkv), (16 + 2 * 4) * 128);
        assert_eq!(s.cols(Act::GateUp), 14336);
    }

    #[test]
    fn bad_shapes_are_refused_with_the_reason() {
        let d = Dims::preset("llama-3.1-8b").unwrap();
        let e = Shard::new(d.clone(), 16, 0).unwrap_err().to_string();
        assert!(e.contains("8 KV heads do not split over 16"), "{e}");
        let e = Shard::new(
            Dims {
                context: MAX_CONTEXT + 1,
                ..d.clone()
            },
            1,
            0,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("context"), "{e}");
        let e = Shard::new(
            Dims {
                kv_heads: 5,
                ..d.clone()
            },
            1,
            0,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("do not group evenly"), "{e}");
        for head_dim in [4, 96, 512] {
            let e = Shard::new(
                Dims {
                    head_dim,
                    ..d.clone()
                },
                1,
                0,
            )
            .unwrap_err()
            .to_string();
            assert!(e.contains("power of two from 8 to 256"), "{head_dim}: {e}");
        }
    }
}
