//! Random weights, KV cache and input from a seed, defined element by element on the *full*
//! (unsharded) tensors: element `i` of a tensor is a function of the seed, the tensor and `i`
//! alone. A rank generates its shard directly, as [`Piece`]s (blocks of full tensors), so that
//! its shard equals the corresponding slice of the full tensor by construction; the CPU
//! ([`fill_cpu`]) and the GPU (`tp_fill` in `kernels.cu`) compute the same values.
//!
//! Every value is exactly a bf16 (rounded to nearest even from an f32 computed without
//! contraction), so the f32 CPU model and the bf16 GPU model hold the same parameters.

use half::bf16;

use crate::model::Shard;

/// The full tensors of the model, each row-major (linear layers `[out, in]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `[q_heads·head_dim, hidden]`.
    Q,
    /// `[kv_heads·head_dim, hidden]`.
    K,
    /// `[kv_heads·head_dim, hidden]`.
    V,
    /// `[hidden, q_heads·head_dim]`.
    O,
    /// `[intermediate, hidden]`.
    Gate,
    /// `[intermediate, hidden]`.
    Up,
    /// `[hidden, intermediate]`.
    Down,
    /// `[hidden]`.
    AttnNorm,
    /// `[hidden]`.
    MlpNorm,
    /// `[batch, kv_heads, context + 1, head_dim]`: rotated keys.
    KCache,
    /// `[batch, kv_heads, context + 1, head_dim]`.
    VCache,
    /// `[batch, hidden]`: the residual stream entering layer 0.
    Input,
    /// `[hidden]`.
    FinalNorm,
}

/// What a compute backend holds for its shard: one buffer each (per layer, or once).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Param {
    /// This rank's rows of q, k and v, stacked: `[(q + 2·kv heads)·head_dim, hidden]`.
    Qkv,
    /// This rank's columns of o_proj: `[hidden, q heads·head_dim]`.
    O,
    /// This rank's rows of gate and up, stacked: `[2·intermediate/N, hidden]`.
    GateUp,
    /// This rank's columns of down_proj: `[hidden, intermediate/N]`.
    Down,
    /// Replicated.
    AttnNorm,
    /// Replicated.
    MlpNorm,
    /// This rank's KV heads: `[max batch, kv heads, context + 1, head_dim]`.
    KCache,
    /// As `KCache`.
    VCache,
    /// Replicated: `[max batch, hidden]`.
    Input,
    /// Replicated.
    FinalNorm,
}

impl Param {
    /// The buffers of one decoder layer.
    pub const PER_LAYER: [Param; 8] = [
        Param::Qkv,
        Param::O,
        Param::GateUp,
        Param::Down,
        Param::AttnNorm,
        Param::MlpNorm,
        Param::KCache,
        Param::VCache,
    ];
}

/// A block of a full tensor, written row by row (`cols` per row, contiguous) into a shard's
/// buffer from element `dst_offset`: `dst[dst_offset + r·cols + c] = value(key, (row0 + r)·
/// full_cols + col0 + c)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Piece {
    /// The full tensor's key ([`key`]).
    pub key: u64,
    /// Columns of the full tensor.
    pub full_cols: u64,
    /// First row of the block.
    pub row0: u64,
    /// First column of the block.
    pub col0: u64,
    /// Rows of the block.
    pub rows: u64,
    /// Columns of the block.
    pub cols: u64,
    /// Where the block starts in the shard's buffer (elements).
    pub dst_offset: usize,
    /// Values are `offset + scale·k` for a random integer `k` in [-128, 127].
    pub offset: f32,
    /// See `offset`.
    pub scale: f32,
}

/// SplitMix64's finaliser.
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The key of tensor `kind` of layer `layer` (0 for the global ones) under `seed`.
pub fn key(seed: u64, kind: Kind, layer: usize) -> u64 {
    let id = ((kind as u64) << 32) | layer as u64;
    splitmix64(seed ^ id.wrapping_mul(0xD1B5_4A32_D192_ED03))
}

/// Element `index` of the full tensor with `key`: bf16(offset + scale·k), k the top 8 bits
/// of a hash as a signed integer (kernels.cu: `tp_fill`).
pub fn value(key: u64, index: u64, offset: f32, scale: f32) -> f32 {
    let k = f32::from((splitmix64(key ^ index) >> 56) as u8 as i8);
    bf16::from_f32(offset + scale * k).to_f32()
}

/// `(offset, scale)` of a tensor: linear layers uniform with variance 1/fan_in (activations
/// keep their size), o_proj and down_proj also scaled by 1/√(2·layers) as GPT-2 and Megatron
/// initialise output projections (the residual stream keeps its size over depth, and bf16
/// rounding differences grow slowly with it); norms near 1; input and V uniform on [-1, 1), K
/// on [-4, 4) (so that attention is peaked and its output matters).
fn dist(shard: &Shard, kind: Kind) -> (f32, f32) {
    let d = &shard.dims;
    let linear = |fan_in: usize| (0.0, (3.0 / fan_in as f32).sqrt() / 128.0);
    let residual = |(o, s): (f32, f32)| (o, s / (2.0 * d.layers as f32).sqrt());
    match kind {
        Kind::Q | Kind::K | Kind::V | Kind::Gate | Kind::Up => linear(d.hidden),
        Kind::O => residual(linear(d.q_heads * d.head_dim)),
        Kind::Down => residual(linear(d.intermediate)),
        Kind::AttnNorm | Kind::MlpNorm | Kind::FinalNorm => (1.0, 1.0 / 1024.0),
        Kind::Input | Kind::VCache => (0.0, 1.0 / 128.0),
        Kind::KCache => (0.0, 1.0 / 32.0),
    }
}

/// The blocks of full tensors that make up `param` of layer `layer` on `shard` (batch-sized
/// tensors for `max_batch` rows).
pub fn pieces(
    shard: &Shard,
    param: Param,
    layer: usize,
    max_batch: usize,
    seed: u64,
) -> Vec<Piece> {
    let blocks = blocks(shard, param, max_batch);
    place(shard, blocks, layer, seed)
}

/// A block of a full tensor: (tensor, full columns, first row, first column, rows, columns).
type Block = (Kind, u64, u64, u64, u64, u64);

/// The blocks of full tensors that make up `param` on `shard`, in their order in its buffer.
fn blocks(shard: &Shard, param: Param, max_batch: usize) -> Vec<Block> {
    let d = &shard.dims;
    let (r, hd) = (shard.rank as u64, d.head_dim as u64);
    let hidden = d.hidden as u64;
    let (hq, hkv, inter) = (
        shard.q_heads() as u64,
        shard.kv_heads() as u64,
        shard.intermediate() as u64,
    );
    let cache_row = d.kv_heads as u64 * shard.cache_slots() as u64 * hd;
    let my_cache = hkv * shard.cache_slots() as u64 * hd;
    match param {
        // Column-parallel: this rank's output rows, every input column.
        Param::Qkv => vec![
            (Kind::Q, hidden, r * hq * hd, 0, hq * hd, hidden),
            (Kind::K, hidden, r * hkv * hd, 0, hkv * hd, hidden),
            (Kind::V, hidden, r * hkv * hd, 0, hkv * hd, hidden),
        ],
        Param::GateUp => vec![
            (Kind::Gate, hidden, r * inter, 0, inter, hidden),
            (Kind::Up, hidden, r * inter, 0, inter, hidden),
        ],
        // Row-parallel: every output row, this rank's input columns.
        Param::O => vec![(
            Kind::O,
            d.q_heads as u64 * hd,
            0,
            r * hq * hd,
            hidden,
            hq * hd,
        )],
        Param::Down => vec![(
            Kind::Down,
            d.intermediate as u64,
            0,
            r * inter,
            hidden,
            inter,
        )],
        Param::AttnNorm => vec![(Kind::AttnNorm, hidden, 0, 0, 1, hidden)],
        Param::MlpNorm => vec![(Kind::MlpNorm, hidden, 0, 0, 1, hidden)],
        Param::FinalNorm => vec![(Kind::FinalNorm, hidden, 0, 0, 1, hidden)],
        // This rank's KV heads of every sequence.
        Param::KCache => vec![(
            Kind::KCache,
            cache_row,
            0,
            r * my_cache,
            max_batch as u64,
            my_cache,
        )],
        Param::VCache => vec![(
            Kind::VCache,
            cache_row,
            0,
            r * my_cache,
            max_batch as u64,
            my_cache,
        )],
        Param::Input => vec![(Kind::Input, hidden, 0, 0, max_batch as u64, hidden)],
    }
}

/// `blocks` as pieces of layer `layer`'s tensors under `seed`, laid out back to back in the
/// shard's buffer.
fn place(shard: &Shard, blocks: Vec<Block>, layer: usize, seed: u64) -> Vec<Piece> {
    let mut dst_offset = 0;
    blocks
        .into_iter()
        .map(|(kind, full_cols, row0, col0, rows, cols)| {
            let (offset, scale) = dist(shard, kind);
            let piece = Piece {
                key: key(seed, kind, layer),
                full_cols,
                row0,
                col0,
                rows,
                cols,
                dst_offset,
                offset,
                scale,
            };
            dst_offset += (rows * cols) as usize;
            piece
        })
        .collect()
}

/// Elements of a buffer made of `pieces`.
pub fn len(pieces: &[Piece]) -> usize {
    pieces.iter().map(|p| (p.rows * p.cols) as usize).sum()
}

/// Write `pieces` into `dst` (f32).
pub fn fill_cpu(pieces: &[Piece], dst: &mut [f32]) {
    for p in pieces {
        let block = &mut dst[p.dst_offset..p.dst_offset + (p.rows * p.cols) as usize];
        for (r, row) in block.chunks_exact_mut(p.cols as usize).enumerate() {
            let first = (p.row0 + r as u64) * p.full_cols + p.col0;
            for (c, v) in row.iter_mut().enumerate() {
                *v = value(p.key, first + c as u64, p.offset, p.scale);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Dims;

    fn tiny() -> Dims {
        Dims::preset("tiny").unwrap()
    }

    /// The full tensor of `param` (the unsharded shard's buffer) as rows of `full_cols`.
    fn full(param: Param, layer: usize, batch: usize) -> Vec<f32> {
        let s = Shard::unsharded(tiny()).unwrap();
        let p = pieces(&s, param, layer, batch, 7);
        let mut v = vec![f32::NAN; len(&p)];
        fill_cpu(&p, &mut v);
        v
    }

    /// Every rank's shard of every tensor is the matching slice of the full tensor, and the
    /// shards together cover it.
    #[test]
    fn shards_are_slices_of_the_full_tensors() {
        let world = 2;
        let d = tiny();
        let hd = d.head_dim;
        let (batch, layer) = (3, 1);
        for rank in 0..world {
            let s = Shard::new(d.clone(), world, rank).unwrap();
            let shard = |param| {
                let p = pieces(&s, param, layer, batch, 7);
                let mut v = vec![f32::NAN; len(&p)];
                fill_cpu(&p, &mut v);
                v
            };
            let rows_of = |v: &[f32], cols: usize, from: usize, n: usize| -> Vec<f32> {
                v[from * cols..(from + n) * cols].to_vec()
            };
            let cols_of = |v: &[f32], cols: usize, from: usize, n: usize| -> Vec<f32> {
                v.chunks(cols)
                    .flat_map(|row| row[from..from + n].to_vec())
                    .collect()
            };
            // q, k, v: the unsharded Qkv buffer stacks the full Q, K and V.
            let full_qkv = full(Param::Qkv, layer, batch);
            let (hq, hkv) = (d.q_heads * hd, d.kv_heads * hd);
            let (q, rest) = full_qkv.split_at(hq * d.hidden);
            let (k, v) = rest.split_at(hkv * d.hidden);
            let (mq, mkv) = (s.q_heads() * hd, s.kv_heads() * hd);
            let mut want = rows_of(q, d.hidden, rank * mq, mq);
            want.extend(rows_of(k, d.hidden, rank * mkv, mkv));
            want.extend(rows_of(v, d.hidden, rank * mkv, mkv));
            assert_eq!(shard(Param::Qkv), want, "qkv of rank {rank}");
            // gate, up.
            let full_gu = full(Param::GateUp, layer, batch);
            let (g, u) = full_gu.split_at(d.intermediate * d.hidden);
            let mi = s.intermediate();
            let mut want = rows_of(g, d.hidden, rank * mi, mi);
            want.extend(rows_of(u, d.hidden, rank * mi, mi));
            assert_eq!(shard(Param::GateUp), want, "gate_up of rank {rank}");
            // o, down: columns.
            let o = full(Param::O, layer, batch);
            assert_eq!(shard(Param::O), cols_of(&o, hq, rank * mq, mq));
            let down = full(Param::Down, layer, batch);
            assert_eq!(
                shard(Param::Down),
                cols_of(&down, d.intermediate, rank * mi, mi)
            );
            // The caches: this rank's KV heads of every sequence.
            let slots = s.cache_slots() * hd;
            for param in [Param::KCache, Param::VCache] {
                let f = full(param, layer, batch);
                assert_eq!(
                    shard(param),
                    cols_of(
                        &f,
                        d.kv_heads * slots,
                        rank * s.kv_heads() * slots,
                        s.kv_heads() * slots
                    ),
                    "{param:?} of rank {rank}"
                );
            }
            for param in [Param::AttnNorm, Param::MlpNorm, Param::Input] {
                assert_eq!(shard(param), full(param, layer, batch), "{param:?}");
            }
        }
    }

    #[test]
    fn values_are_bf16_and_differ_between_tensors_and_layers() {
        let a = full(Param::Qkv, 0, 1);
        let b = full(Param::Qkv, 1, 1);
        assert_ne!(a, b);
        assert!(a.iter().all(|&x| bf16::from_f32(x).to_f32() == x));
        let distinct: std::collections::BTreeSet<u32> = a.iter().map(|x| x.to_bits()).collect();
        assert!(distinct.len() > 200, "{} distinct values", distinct.len());
        // A batch-sized tensor does not depend on the largest batch.
        assert_eq!(
            full(Param::KCache, 0, 2)[..],
            full(Param::KCache, 0, 3)[..len_for(2)]
        );
    }

    fn len_for(batch: usize) -> usize {
        let s = Shard::unsharded(tiny()).unwrap();
        len(&pieces(&s, Param::KCache, 0, batch, 7))
    }
}
