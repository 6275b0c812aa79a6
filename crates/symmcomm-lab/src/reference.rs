//! The f64 reference of every collective, and the comparison of a result with it. Inputs are
//! given per rank as f64 values; results are compared element by element with a tolerance that
//! follows the dtype (exact for gathers, max and min; rounding of the type plus f32
//! accumulation for sums and averages). NaN never passes.

use symmcomm::DType;
use symmcomm::lab::DimSplit;
use symmcomm::{Collective, Impl};

/// The expected output of `rank` for per-rank inputs `inputs[r]`, flat (dimension 0) or along
/// `dim` of the per-rank `shape` (the input shape for all-gather and all-reduce, the output
/// shape for reduce-scatter; `None` = flat).
pub fn expected(
    coll: Collective,
    inputs: &[Vec<f64>],
    rank: usize,
    dim: Option<(usize, &[usize])>,
) -> Vec<f64> {
    let world = inputs.len();
    let n = inputs[0].len();
    // Along-dim operations in terms of (outer, piece, inner): rank r's piece sits at
    // [o, r*piece + p, i] of the large tensor.
    let split = match dim {
        Some((d, shape)) => DimSplit::of(shape, d).expect("dim within the shape"),
        None => DimSplit {
            outer: 1,
            piece: match coll {
                Collective::ReduceScatter(_) => n / world,
                _ => n,
            },
            inner: 1,
        },
    };
    let big = |o: usize, r: usize, p: usize, i: usize| {
        (o * world * split.piece + r * split.piece + p) * split.inner + i
    };
    let small = |o: usize, p: usize, i: usize| (o * split.piece + p) * split.inner + i;
    match coll {
        Collective::AllReduce(op) => (0..n)
            .map(|k| op.reduce_f64(inputs.iter().map(|x| x[k])))
            .collect(),
        Collective::AllGather => {
            let mut out = vec![0.0; n * world];
            for (r, x) in inputs.iter().enumerate() {
                for o in 0..split.outer {
                    for p in 0..split.piece {
                        for i in 0..split.inner {
                            out[big(o, r, p, i)] = x[small(o, p, i)];
                        }
                    }
                }
            }
            out
        }
        Collective::ReduceScatter(op) => {
            let mut out = vec![0.0; n / world];
            for o in 0..split.outer {
                for p in 0..split.piece {
                    for i in 0..split.inner {
                        out[small(o, p, i)] =
                            op.reduce_f64(inputs.iter().map(|x| x[big(o, rank, p, i)]));
                    }
                }
            }
            out
        }
    }
}

/// Where an implementation keeps the partial sums of a reduction, which bounds how far its
/// result may lie from the exact one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accumulation {
    /// In f32, rounded to the element type once: our kernels, NCCL's symmetric kernels, the
    /// host backend.
    F32,
    /// In the element type: NCCL's regular ring and tree kernels round every partial sum, so
    /// `world − 1` roundings (seen as 1-ulp bf16 differences on 4 GPUs), and an average
    /// scales every input in the type first (one more).
    ElementType,
}

impl Accumulation {
    /// What `imp` may do; `Auto` may run NCCL's regular kernels. The hierarchical all-reduce
    /// rounds once inside a domain and once more across domains (NCCL's regular kernels each
    /// time, at worst): `m + k` roundings of `m · k` ranks, within the element type's `m · k`
    /// when both are at least 2, and `k` when `m` is 1 (its inner steps are copies).
    pub fn of(imp: Impl) -> Self {
        match imp {
            Impl::Regular | Impl::Auto | Impl::Local | Impl::Hierarchical => {
                Accumulation::ElementType
            }
            Impl::Symmetric | Impl::Kernel(_) => Accumulation::F32,
        }
    }

    /// How many times a reduction of `world` terms is rounded to the element type.
    pub fn roundings(self, world: usize) -> usize {
        match self {
            Accumulation::F32 => 1,
            Accumulation::ElementType => world.saturating_sub(1).max(1),
        }
    }
}

/// The absolute tolerance of one reduced element: `world` terms whose absolute values sum to
/// `abs_sum` (0 for gathers, max and min, which are exact), reduced with `acc`.
pub fn tolerance(
    coll: Collective,
    dtype: DType,
    world: usize,
    abs_sum: f64,
    acc: Accumulation,
) -> f64 {
    use symmcomm::ReduceOp;
    match coll.reduce() {
        None | Some(ReduceOp::Max) | Some(ReduceOp::Min) => 0.0,
        Some(op) => {
            let mag = if op == ReduceOp::Avg {
                abs_sum / world.max(1) as f64
            } else {
                abs_sum
            };
            let premultiply = usize::from(op == ReduceOp::Avg && acc == Accumulation::ElementType);
            let roundings = acc.roundings(world) + premultiply;
            dtype.reduce_tolerance(world, roundings) * mag.max(f64::MIN_POSITIVE)
        }
    }
}

/// The first mismatch of a comparison and how many elements differ.
#[derive(Clone, Debug, PartialEq)]
pub struct Mismatch {
    /// Elements outside tolerance.
    pub wrong: usize,
    /// Elements compared.
    pub total: usize,
    /// First wrong index.
    pub first_index: usize,
    /// What was there.
    pub got: f64,
    /// What should have been.
    pub want: f64,
}

/// Compare `got` (little-endian elements of `dtype`) with `want`; `tol(k)` is the absolute
/// tolerance of element `k`.
pub fn compare(
    dtype: DType,
    got: &[u8],
    want: &[f64],
    tol: impl Fn(usize) -> f64,
) -> Result<(), Mismatch> {
    let total = want.len();
    let mut first: Option<(usize, f64, f64)> = None;
    let mut wrong = 0;
    for (k, &w) in want.iter().enumerate() {
        let g = dtype.read_f64(got, k);
        let ok = g.is_finite() && (g - w).abs() <= tol(k);
        if !ok {
            wrong += 1;
            if first.is_none() {
                first = Some((k, g, w));
            }
        }
    }
    match first {
        None => Ok(()),
        Some((first_index, got, want)) => Err(Mismatch {
            wrong,
            total,
            first_index,
            got,
            want,
        }),
    }
}

/// The largest relative error of one rounding to `dtype` (half an ulp).
fn rounding(dtype: DType) -> f64 {
    match dtype {
        DType::BF16 => 2f64.powi(-8),
        DType::F16 => 2f64.powi(-11),
        _ => f64::from(f32::EPSILON),
    }
}

/// The f64 reference of an add-RMSNorm on one rank, with the tolerance of every element.
#[derive(Clone, Debug, PartialEq)]
pub struct AddRmsNormRef {
    /// `residual + Σ_r input_r`, exactly, for the rank's rows.
    pub residual_out: Vec<f64>,
    /// `residual_out / sqrt(mean(residual_out²) + eps) · weight`, exactly.
    pub normed: Vec<f64>,
    /// Absolute tolerance of each element of `residual_out`.
    pub residual_tol: Vec<f64>,
    /// Absolute tolerance of each element of `normed`.
    pub normed_tol: Vec<f64>,
}

/// What an add-RMSNorm computes, independently of how: the rows of every rank's `inputs[r]`
/// (`[T, H]`, values exact in `dtype`) from `first_row` on (0 for the all-reduce form, `rank ·
/// T / N` for the reduce-scatter form), summed in f64, plus `residual` (`rows` rows of this
/// rank), normalised with `weight` and `eps`, all in f64. The tolerances allow for the
/// collective's roundings (`acc`), one rounding of the new residual, and for the normalised
/// value the error of the residual it normalises (through the row's rms too), f32 arithmetic and
/// one rounding.
pub fn add_rmsnorm(
    dtype: DType,
    inputs: &[Vec<f64>],
    residual: &[f64],
    weight: &[f64],
    eps: f64,
    first_row: usize,
    acc: Accumulation,
) -> AddRmsNormRef {
    let hidden = weight.len();
    let rows = residual.len() / hidden.max(1);
    let world = inputs.len();
    let sum_tol = tolerance(
        Collective::AllReduce(symmcomm::ReduceOp::Sum),
        dtype,
        world,
        1.0,
        acc,
    );
    let round = rounding(dtype);
    let mut out = AddRmsNormRef {
        residual_out: Vec::with_capacity(rows * hidden),
        normed: Vec::with_capacity(rows * hidden),
        residual_tol: Vec::with_capacity(rows * hidden),
        normed_tol: Vec::with_capacity(rows * hidden),
    };
    for t in 0..rows {
        let at = |j: usize| (first_row + t) * hidden + j;
        let r: Vec<f64> = (0..hidden)
            .map(|j| residual[t * hidden + j] + inputs.iter().map(|x| x[at(j)]).sum::<f64>())
            .collect();
        let r_tol: Vec<f64> = (0..hidden)
            .map(|j| {
                let abs: f64 = inputs.iter().map(|x| x[at(j)].abs()).sum();
                sum_tol * abs + round * (r[j].abs() + sum_tol * abs) + f64::MIN_POSITIVE
            })
            .collect();
        let rms = (r.iter().map(|x| x * x).sum::<f64>() / hidden as f64 + eps).sqrt();
        // The error of rms from the residuals' errors: at most the largest error.
        let rms_err = r_tol.iter().copied().fold(0.0, f64::max);
        // f32 sums of squares, in any order: a few ulps per doubling of the row.
        let arith = f64::from(f32::EPSILON) * (4.0 + (hidden as f64).log2());
        for j in 0..hidden {
            let n = r[j] / rms * weight[j];
            out.residual_out.push(r[j]);
            out.residual_tol.push(r_tol[j]);
            out.normed.push(n);
            out.normed_tol.push(
                weight[j].abs() * (r_tol[j] + r[j].abs() * rms_err / rms) / rms
                    + (round + arith) * n.abs()
                    + 1e-7,
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use symmcomm::ReduceOp;

    #[test]
    fn add_rmsnorm_of_a_known_row() {
        // Two ranks' rows sum to [1, 1, 1, 1]; plus the residual [0, 1, 1, 2] is [1, 2, 2, 3]:
        // mean of squares 18 / 4, rms sqrt(4.5).
        let inputs = vec![vec![0.5; 4], vec![0.5; 4]];
        let r = add_rmsnorm(
            DType::BF16,
            &inputs,
            &[0.0, 1.0, 1.0, 2.0],
            &[1.0, 1.0, 1.0, 2.0],
            0.0,
            0,
            Accumulation::F32,
        );
        assert_eq!(r.residual_out, vec![1.0, 2.0, 2.0, 3.0]);
        let rms = 4.5f64.sqrt();
        assert_eq!(r.normed, vec![1.0 / rms, 2.0 / rms, 2.0 / rms, 6.0 / rms]);
        // One bf16 rounding of 3 is within tolerance, two ulps are not.
        assert!(r.residual_tol[3] >= 3.0 * 2f64.powi(-8));
        assert!(r.residual_tol[3] < 3.0 * 2f64.powi(-6));
        assert!(
            r.normed_tol
                .iter()
                .zip(&r.normed)
                .all(|(t, n)| *t < n.abs() * 0.02)
        );
    }

    #[test]
    fn flat_references() {
        let inputs = vec![vec![1.0, 2.0, 3.0, 4.0], vec![10.0, 20.0, 30.0, 40.0]];
        assert_eq!(
            expected(Collective::AllReduce(ReduceOp::Sum), &inputs, 0, None),
            vec![11.0, 22.0, 33.0, 44.0]
        );
        assert_eq!(
            expected(Collective::AllGather, &inputs, 1, None),
            vec![1.0, 2.0, 3.0, 4.0, 10.0, 20.0, 30.0, 40.0]
        );
        assert_eq!(
            expected(Collective::ReduceScatter(ReduceOp::Max), &inputs, 1, None),
            vec![30.0, 40.0]
        );
    }

    #[test]
    fn along_dim_references() {
        // Per-rank [2, 1, 2] gathered along dim 1 into [2, 2, 2].
        let inputs = vec![vec![0.0, 1.0, 2.0, 3.0], vec![10.0, 11.0, 12.0, 13.0]];
        let shape = [2, 1, 2];
        assert_eq!(
            expected(Collective::AllGather, &inputs, 0, Some((1, &shape))),
            vec![0.0, 1.0, 10.0, 11.0, 2.0, 3.0, 12.0, 13.0]
        );
        // Reduce-scatter along dim 1: inputs [2, 2, 2] -> outputs [2, 1, 2].
        let inputs = vec![(0..8).map(f64::from).collect::<Vec<_>>(), vec![100.0; 8]];
        assert_eq!(
            expected(
                Collective::ReduceScatter(ReduceOp::Sum),
                &inputs,
                1,
                Some((1, &shape))
            ),
            vec![102.0, 103.0, 106.0, 107.0]
        );
    }

    #[test]
    fn compare_finds_the_first_error_and_rejects_nan() {
        let mut got = vec![0u8; 12];
        for (k, v) in [1.0, 2.0, f64::NAN].into_iter().enumerate() {
            DType::F32.write_f64(&mut got, k, v);
        }
        let m = compare(DType::F32, &got, &[1.0, 2.5, 3.0], |_| 0.1).unwrap_err();
        assert_eq!((m.wrong, m.first_index, m.got, m.want), (2, 1, 2.0, 2.5));
        assert!(compare(DType::F32, &got[..8], &[1.0, 2.05], |_| 0.1).is_ok());
    }

    /// The sum of `xs` in order with every partial sum rounded to bf16, as a ring does it.
    fn bf16_ring(xs: &[f64]) -> f64 {
        use half::bf16;
        xs.iter()
            .skip(1)
            .fold(bf16::from_f64(xs[0]), |acc, &x| {
                bf16::from_f64(acc.to_f64() + x)
            })
            .to_f64()
    }

    /// A ring that rounds every partial sum to bf16 (NCCL's regular kernels) stays within the
    /// element-type tolerance, and on 4 and 8 ranks it leaves the f32 tolerance for some inputs:
    /// so both bounds are tight enough to matter.
    #[test]
    fn element_type_rings_need_their_own_tolerance() {
        use half::bf16;
        let coll = Collective::AllReduce(ReduceOp::Sum);
        for world in [2usize, 4, 8] {
            let mut beyond_f32 = 0;
            for i in 0..20_000u64 {
                let xs: Vec<f64> = (0..world as u64)
                    .map(|r| symmcomm::lab::fill::value(DType::BF16, 7, r, 0, i))
                    .collect();
                let ring = bf16_ring(&xs);
                let exact: f64 = xs.iter().sum();
                let mag: f64 = xs.iter().map(|x| x.abs()).sum();
                let native = tolerance(coll, DType::BF16, world, mag, Accumulation::ElementType);
                assert!(
                    (ring - exact).abs() <= native,
                    "world {world}, element {i}: ring {ring} vs exact {exact}, tolerance {native}"
                );
                // An average as NCCL does it: every input scaled by 1/world in the type, then
                // the same ring.
                let scaled: Vec<f64> = xs
                    .iter()
                    .map(|&x| bf16::from_f64(x / world as f64).to_f64())
                    .collect();
                let avg_ring = bf16_ring(&scaled);
                let avg = Collective::AllReduce(ReduceOp::Avg);
                let avg_tol = tolerance(avg, DType::BF16, world, mag, Accumulation::ElementType);
                assert!(
                    (avg_ring - exact / world as f64).abs() <= avg_tol,
                    "world {world}, element {i}: average {avg_ring} vs {}, tolerance {avg_tol}",
                    exact / world as f64
                );
                let f32_tol = tolerance(coll, DType::BF16, world, mag, Accumulation::F32);
                beyond_f32 += usize::from((ring - exact).abs() > f32_tol);
            }
            if world == 2 {
                // One rounding: the same bound.
                assert_eq!(beyond_f32, 0);
            } else {
                assert!(
                    beyond_f32 > 0,
                    "world {world}: no ring sum left the f32 bound"
                );
            }
        }
        assert_eq!(Accumulation::of(Impl::Regular).roundings(8), 7);
        assert_eq!(Accumulation::of(Impl::Symmetric).roundings(8), 1);
    }
}
