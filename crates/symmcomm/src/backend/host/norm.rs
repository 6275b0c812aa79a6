//! The add-RMSNorm on the host backend, in f32 with the operations of the CUDA kernels
//! (KERNELS.md §10): the collective's result (rounded to the element type), plus the residual,
//! rounded (the new residual); the RMSNorm of that rounded residual, rounded. Only the sum of
//! squares is added in another order (here row order; the kernels use a tree), which moves
//! `rstd` by an f32 rounding or two.

use super::fabric::reduce_sum;
use crate::backend::{Algo, NormForm, NormShape};
use crate::dtype::DType;

/// The value of element `i` of `bytes`, exactly (bf16 and f16 are subsets of f32).
fn elem(dtype: DType, bytes: &[u8], i: usize) -> f32 {
    dtype.read_f64(bytes, i) as f32
}

/// `reduced` (rows of `hidden` elements, the collective's result) plus `residual`, rounded to
/// `dtype`, and the RMSNorm of that with `weight` and `eps`: `(residual_out, normed)` bytes.
pub(crate) fn add_rmsnorm(
    dtype: DType,
    hidden: usize,
    eps: f32,
    reduced: &[u8],
    residual: &[u8],
    weight: &[u8],
) -> (Vec<u8>, Vec<u8>) {
    let rows = reduced.len() / (hidden * dtype.size()).max(1);
    let w: Vec<f32> = (0..hidden).map(|j| elem(dtype, weight, j)).collect();
    let mut residual_out = vec![0u8; reduced.len()];
    let mut normed = vec![0u8; reduced.len()];
    let mut y = vec![0f32; hidden];
    for t in 0..rows {
        let mut ss = 0f32;
        for (j, yj) in y.iter_mut().enumerate() {
            let i = t * hidden + j;
            let h = elem(dtype, reduced, i) + elem(dtype, residual, i);
            dtype.write_f64(&mut residual_out, i, f64::from(h));
            *yj = elem(dtype, &residual_out, i);
            ss += *yj * *yj;
        }
        let rstd = 1.0 / (ss / hidden as f32 + eps).sqrt();
        for (j, (&yj, &wj)) in y.iter().zip(&w).enumerate() {
            dtype.write_f64(&mut normed, t * hidden + j, f64::from(yj * rstd * wj));
        }
    }
    (residual_out, normed)
}

/// The fused call on `shape.rank` from what every rank posted: `posted[r]` is rank r's input
/// `[T, H]` followed by its residual `[rows_out, H]`. Returns `(residual_out, normed)` bytes of
/// this rank's rows. The rows are reduced in f32 in rank order and rounded, as the all-reduce
/// and reduce-scatter give them; two-shot takes each row's residual from the rank that owns
/// the row (the kernel adds and normalises a row there and gathers the results).
pub(crate) fn fused(
    shape: &NormShape,
    algo: Algo,
    posted: &[&[u8]],
    weight: &[u8],
    eps: f32,
) -> (Vec<u8>, Vec<u8>) {
    let row = shape.row_bytes();
    let in_bytes = shape.input_bytes();
    let (rows, first) = match shape.form {
        NormForm::AllReduce => (shape.tokens, 0),
        NormForm::ReduceScatter => (shape.rows_out(), shape.rank * shape.rows_out()),
    };
    let parts: Vec<&[u8]> = posted
        .iter()
        .map(|p| &p[first * row..(first + rows) * row])
        .collect();
    let reduced = reduce_sum(shape.dtype, &parts);
    let residual: Vec<u8> = if algo == Algo::TwoShot && shape.form == NormForm::AllReduce {
        let slice = shape.tokens.div_ceil(shape.world);
        (0..rows)
            .flat_map(|t| &posted[t / slice][in_bytes + t * row..in_bytes + (t + 1) * row])
            .copied()
            .collect()
    } else {
        posted[shape.rank][in_bytes..in_bytes + rows * row].to_vec()
    };
    add_rmsnorm(shape.dtype, shape.hidden, eps, &reduced, &residual, weight)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(dtype: DType, xs: &[f64]) -> Vec<u8> {
        let mut b = vec![0u8; xs.len() * dtype.size()];
        for (i, &x) in xs.iter().enumerate() {
            dtype.write_f64(&mut b, i, x);
        }
        b
    }

    #[test]
    fn add_rmsnorm_of_a_known_row() {
        // reduced + residual = [1, 2, 2, 4]: mean of squares 25 / 4, rms 2.5.
        let d = DType::BF16;
        let (r, n) = add_rmsnorm(
            d,
            4,
            0.0,
            &bytes(d, &[0.5, 1.0, 3.0, 4.0]),
            &bytes(d, &[0.5, 1.0, -1.0, 0.0]),
            &bytes(d, &[1.0, 1.0, 2.0, -1.0]),
        );
        let read = |b: &[u8]| (0..4).map(|i| d.read_f64(b, i)).collect::<Vec<_>>();
        assert_eq!(read(&r), vec![1.0, 2.0, 2.0, 4.0]);
        let want = [0.4, 0.8, 1.6, -1.6].map(|x: f64| half::bf16::from_f64(x).to_f64());
        assert_eq!(read(&n), want.to_vec());
    }
}
