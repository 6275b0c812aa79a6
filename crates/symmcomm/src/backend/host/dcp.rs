//! The DCP combine on the host backend, in f32 as the CUDA kernels compute it: the correction
//! step of the all-gather / correct / reduce-scatter sequence, and the merge the fused combine
//! does after its exchange.

use crate::backend::DcpShape;
use crate::dtype::DType;
use crate::lse::merge_weights_f32;

fn lse_at(bytes: &[u8], i: usize) -> f32 {
    f32::from_le_bytes(bytes[4 * i..4 * i + 4].try_into().expect("4 bytes"))
}

fn elem(dtype: DType, bytes: &[u8], i: usize) -> f32 {
    // Exact: every element type the combine takes is a subset of f32.
    dtype.read_f64(bytes, i) as f32
}

/// The correction step: `partial` is `[B, H, D]`, `lse_all` `[N, B, H]` f32. Returns the
/// corrected `[H, B, D]` in `shape.out` and the merged LSE `[B, H/N]` f32.
pub(crate) fn correct(shape: &DcpShape, partial: &[u8], lse_all: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let DcpShape {
        world,
        rank,
        batch,
        heads,
        dim,
        ..
    } = *shape;
    let hl = shape.heads_local();
    let mut out = vec![0u8; heads * batch * dim * shape.out.size()];
    let mut merged = vec![0u8; batch * hl * 4];
    let mut lses = vec![0f32; world];
    let mut w = vec![0f32; world];
    for b in 0..batch {
        for h in 0..heads {
            for (n, l) in lses.iter_mut().enumerate() {
                *l = lse_at(lse_all, (n * batch + b) * heads + h);
            }
            let s = merge_weights_f32(&lses, shape.base, &mut w);
            if h / hl == rank {
                let i = b * hl + h % hl;
                merged[4 * i..4 * i + 4].copy_from_slice(&s.to_le_bytes());
            }
            let wr = w[rank];
            for d in 0..dim {
                let y = if wr == 0.0 {
                    0.0
                } else {
                    wr * elem(shape.partial, partial, (b * heads + h) * dim + d)
                };
                shape
                    .out
                    .write_f64(&mut out, (h * batch + b) * dim + d, f64::from(y));
            }
        }
    }
    (out, merged)
}

/// The merge of the fused combine on `shape.rank`: `partials[r]` holds rank r's `[B, H, D]`
/// partial output followed by its `[B, H]` f32 LSE. Returns the merged `[H/N, B, D]` in
/// `shape.out` and the merged LSE `[B, H/N]` f32. Sums in f32 in rank order, skipping shards
/// of weight 0.
pub(crate) fn merge(shape: &DcpShape, partials: &[&[u8]]) -> (Vec<u8>, Vec<u8>) {
    let DcpShape {
        world,
        rank,
        batch,
        heads,
        dim,
        ..
    } = *shape;
    let hl = shape.heads_local();
    let o_bytes = batch * heads * dim * shape.partial.size();
    let mut out = vec![0u8; hl * batch * dim * shape.out.size()];
    let mut merged = vec![0u8; batch * hl * 4];
    let mut lses = vec![0f32; world];
    let mut w = vec![0f32; world];
    let mut acc = vec![0f32; dim];
    for b in 0..batch {
        for l in 0..hl {
            let h = rank * hl + l;
            for (r, x) in lses.iter_mut().enumerate() {
                *x = lse_at(&partials[r][o_bytes..], b * heads + h);
            }
            let s = merge_weights_f32(&lses, shape.base, &mut w);
            let i = b * hl + l;
            merged[4 * i..4 * i + 4].copy_from_slice(&s.to_le_bytes());
            acc.iter_mut().for_each(|a| *a = 0.0);
            for (r, &wr) in w.iter().enumerate() {
                if wr == 0.0 {
                    continue;
                }
                for (d, a) in acc.iter_mut().enumerate() {
                    *a += wr * elem(shape.partial, partials[r], (b * heads + h) * dim + d);
                }
            }
            for (d, &a) in acc.iter().enumerate() {
                shape
                    .out
                    .write_f64(&mut out, (l * batch + b) * dim + d, f64::from(a));
            }
        }
    }
    (out, merged)
}
