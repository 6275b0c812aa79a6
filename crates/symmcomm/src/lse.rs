//! The LSE merge of DCP partial attention: every rank attended over its KV shard for all `H`
//! gathered heads, giving a partial output `O_r[b,h,:]` (softmax-normalised within the shard)
//! and a log-sum-exp `s_r[b,h]`; the exact result is `S = log_β Σ_r β^{s_r}` and
//! `O = Σ_r β^{s_r − S}·O_r`. Here: the f64 reference and the f32 weights every implementation
//! uses. Empty shards (NaN or +inf LSE, and −inf) weigh 0; a row whose shards are all empty
//! gives zeros and LSE −inf, never NaN.

use serde::{Deserialize, Serialize};

/// The base of the log-sum-exp the attention kernel returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LseBase {
    /// `log2` (FlashInfer MLA, TRT-LLM gen kernels; SGLang's MLA path).
    Two,
    /// Natural log (FlashMLA, FlashAttention 3, vLLM's Triton MLA).
    E,
}

impl LseBase {
    /// `β^x`.
    pub fn exp(self, x: f64) -> f64 {
        match self {
            LseBase::Two => x.exp2(),
            LseBase::E => x.exp(),
        }
    }

    /// `log_β x`.
    pub fn log(self, x: f64) -> f64 {
        match self {
            LseBase::Two => x.log2(),
            LseBase::E => x.ln(),
        }
    }

    /// `β^x` in f32, as the kernels compute it.
    pub fn exp_f32(self, x: f32) -> f32 {
        match self {
            LseBase::Two => x.exp2(),
            LseBase::E => x.exp(),
        }
    }

    /// `log_β x` in f32.
    pub fn log_f32(self, x: f32) -> f32 {
        match self {
            LseBase::Two => x.log2(),
            LseBase::E => x.ln(),
        }
    }

    /// Name (`2`, `e`).
    pub fn name(self) -> &'static str {
        match self {
            LseBase::Two => "2",
            LseBase::E => "e",
        }
    }

    /// The kernels' encoding: 1 for base 2, 0 for base e.
    pub(crate) fn kernel_code(self) -> u32 {
        u32::from(self == LseBase::Two)
    }
}

/// An LSE as the merge reads it: NaN and +inf mark an empty shard and become −inf.
pub fn sanitize_lse(x: f64) -> f64 {
    if x.is_nan() || x == f64::INFINITY {
        f64::NEG_INFINITY
    } else {
        x
    }
}

/// The merged LSE and every shard's weight for one (token, head), in f64. All-empty rows give
/// `(−inf, zeros)`.
pub fn merge_weights(lses: &[f64], base: LseBase) -> (f64, Vec<f64>) {
    let v: Vec<f64> = lses.iter().map(|&x| sanitize_lse(x)).collect();
    let m = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if m == f64::NEG_INFINITY {
        return (f64::NEG_INFINITY, vec![0.0; v.len()]);
    }
    let sum: f64 = v.iter().map(|&x| base.exp(x - m)).sum();
    let s = m + base.log(sum);
    (s, v.iter().map(|&x| base.exp(x - s)).collect())
}

/// The same in f32, operation for operation as the CUDA kernels and the host backend do it:
/// writes the weights into `w` (one per shard) and returns the merged LSE.
pub(crate) fn merge_weights_f32(lses: &[f32], base: LseBase, w: &mut [f32]) -> f32 {
    let mut m = f32::NEG_INFINITY;
    for (wi, &x) in w.iter_mut().zip(lses) {
        let x = if x.is_nan() || x == f32::INFINITY {
            f32::NEG_INFINITY
        } else {
            x
        };
        *wi = x;
        m = m.max(x);
    }
    if m == f32::NEG_INFINITY {
        w.iter_mut().for_each(|wi| *wi = 0.0);
        return f32::NEG_INFINITY;
    }
    let sum: f32 = w.iter().map(|&x| base.exp_f32(x - m)).sum();
    let s = m + base.log_f32(sum);
    for wi in w.iter_mut() {
        let d = *wi - s;
        *wi = if d.is_nan() { 0.0 } else { base.exp_f32(d) };
    }
    s
}

/// The merged heads of one rank, head-major.
#[derive(Clone, Debug, PartialEq)]
pub struct MergedHeads {
    /// `[Hl, B, D]`: head `hl` of this rank is global head `rank·Hl + hl`.
    pub out: Vec<f64>,
    /// `[B, Hl]`: the merged LSE of this rank's heads (−inf for all-empty rows).
    pub lse: Vec<f64>,
}

/// The f64 reference of the combine for `rank`: `partial_out[r]` is rank r's `O_r` `[B, H, D]`
/// and `partial_lse[r]` its `s_r` `[B, H]`; heads are split rank-major (rank r owns
/// `[r·H/N, (r+1)·H/N)`). A shard whose weight is 0 contributes nothing, even if its output
/// holds NaN.
///
/// # Panics
/// When the slices do not have the shapes given, or `heads` is not a multiple of the ranks.
pub fn merge_reference(
    partial_out: &[Vec<f64>],
    partial_lse: &[Vec<f64>],
    batch: usize,
    heads: usize,
    dim: usize,
    rank: usize,
    base: LseBase,
) -> MergedHeads {
    let world = partial_out.len();
    assert_eq!(partial_lse.len(), world, "one LSE per rank");
    assert!(
        world > 0 && heads.is_multiple_of(world),
        "heads split over the ranks"
    );
    for r in 0..world {
        assert_eq!(
            partial_out[r].len(),
            batch * heads * dim,
            "O_{r} is [B, H, D]"
        );
        assert_eq!(partial_lse[r].len(), batch * heads, "s_{r} is [B, H]");
    }
    let hl = heads / world;
    let mut out = vec![0.0; hl * batch * dim];
    let mut lse = vec![0.0; batch * hl];
    for b in 0..batch {
        for l in 0..hl {
            let h = rank * hl + l;
            let lses: Vec<f64> = (0..world).map(|r| partial_lse[r][b * heads + h]).collect();
            let (s, w) = merge_weights(&lses, base);
            lse[b * hl + l] = s;
            let row = &mut out[(l * batch + b) * dim..(l * batch + b + 1) * dim];
            for (r, &wr) in w.iter().enumerate() {
                if wr == 0.0 {
                    continue;
                }
                let o = &partial_out[r][(b * heads + h) * dim..(b * heads + h + 1) * dim];
                for (y, &x) in row.iter_mut().zip(o) {
                    *y += wr * x;
                }
            }
        }
    }
    MergedHeads { out, lse }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_sum_to_one_and_empty_shards_weigh_nothing() {
        for base in [LseBase::Two, LseBase::E] {
            let (s, w) = merge_weights(&[1.0, f64::NAN, 3.0, f64::INFINITY], base);
            assert!((w.iter().sum::<f64>() - 1.0).abs() < 1e-12);
            assert_eq!((w[1], w[3]), (0.0, 0.0));
            assert!((s - base.log(base.exp(1.0) + base.exp(3.0))).abs() < 1e-12);
            let (s, w) = merge_weights(&[f64::NEG_INFINITY, f64::NAN], base);
            assert_eq!(s, f64::NEG_INFINITY);
            assert_eq!(w, vec![0.0, 0.0]);
            let mut w32 = [0f32; 3];
            let s32 = merge_weights_f32(
                &[f32::NAN, f32::NEG_INFINITY, f32::INFINITY],
                base,
                &mut w32,
            );
            assert_eq!(s32, f32::NEG_INFINITY);
            assert_eq!(w32, [0.0; 3]);
            let s32 = merge_weights_f32(&[0.5, -2.0, f32::NAN], base, &mut w32);
            let (s, w) = merge_weights(&[0.5, -2.0, f64::NAN], base);
            assert!((f64::from(s32) - s).abs() < 1e-6);
            for (a, b) in w32.iter().zip(&w) {
                assert!((f64::from(*a) - b).abs() < 1e-6);
            }
        }
    }

    #[test]
    fn reference_keeps_nan_of_empty_shards_out() {
        // Two ranks, B = 1, H = 2, D = 1; rank 1's shard is empty and its output is NaN.
        let o = vec![vec![2.0, 4.0], vec![f64::NAN, f64::NAN]];
        let s = vec![vec![0.0, 1.0], vec![f64::INFINITY, f64::NAN]];
        for rank in 0..2 {
            let m = merge_reference(&o, &s, 1, 2, 1, rank, LseBase::E);
            assert_eq!(m.out, vec![o[0][rank]]);
            assert_eq!(m.lse, vec![s[0][rank]]);
        }
    }
}
