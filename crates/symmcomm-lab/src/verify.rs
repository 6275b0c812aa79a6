//! Checked runs of one collective: fresh generator inputs, a poisoned output, the call, and a
//! comparison with the f64 reference recomputed on the host from every rank's seed. Tests,
//! `symmcomm check` and every benchmark row use it, on any backend.

use crate::reference::{self, Mismatch};
use symmcomm::Tensor;
use symmcomm::lab::fill;
use symmcomm::{Collective, Impl};
use symmcomm::{DType, ReduceOp};
use symmcomm::{Dispatched, Group};
use symmcomm::{Error, Op, OpCtx, Result};

/// One case: which collective, on what, with which implementation.
#[derive(Clone, Debug, PartialEq)]
pub struct Case {
    /// The collective.
    pub coll: Collective,
    /// Element type.
    pub dtype: DType,
    /// Per-rank input shape.
    pub shape: Vec<usize>,
    /// `Some(d)`: gather or scatter along dimension `d`; `None`: flat.
    pub dim: Option<usize>,
    /// Implementation to request.
    pub imp: Impl,
    /// Put the input in the group's symmetric pool (else plain memory).
    pub input_symm: bool,
    /// Put the output in the group's symmetric pool (else plain memory).
    pub output_symm: bool,
    /// Seed of the inputs.
    pub seed: u64,
}

impl Case {
    /// The per-rank output shape.
    pub fn output_shape(&self, world: usize) -> Vec<usize> {
        let mut s = self.shape.clone();
        match (self.coll, self.dim) {
            (Collective::AllReduce(_), _) => {}
            (Collective::AllGather, Some(d)) => s[d] *= world,
            (Collective::ReduceScatter(_), Some(d)) => s[d] /= world,
            (Collective::AllGather, None) => s = vec![self.shape.iter().product::<usize>() * world],
            (Collective::ReduceScatter(_), None) => {
                s = vec![self.shape.iter().product::<usize>() / world]
            }
        }
        s
    }
}

/// Buffers of a case, allocated once and reusable across runs.
#[derive(Clone, Debug)]
pub struct CaseBuffers {
    /// Input.
    pub input: Tensor,
    /// Output.
    pub output: Tensor,
}

/// Allocate a case's buffers on `group`.
pub fn alloc(group: &Group, case: &Case) -> Result<CaseBuffers> {
    let out_shape = case.output_shape(group.size());
    let input = if case.input_symm {
        group.alloc_symmetric(case.dtype, &case.shape)?
    } else {
        group.alloc_plain(case.dtype, &case.shape)?
    };
    let output = if case.output_symm {
        group.alloc_symmetric(case.dtype, &out_shape)?
    } else {
        group.alloc_plain(case.dtype, &out_shape)?
    };
    Ok(CaseBuffers { input, output })
}

/// Enqueue one run: fill the input for `epoch` (`counter` when given, else epoch 0), poison
/// the output, run the collective.
pub fn enqueue(
    group: &Group,
    case: &Case,
    bufs: &CaseBuffers,
    counter: Option<&symmcomm::EpochCounter>,
) -> Result<Dispatched> {
    group.fill_random(&bufs.input, case.seed, counter)?;
    group.poison(&bufs.output)?;
    group.collective(case.coll, &bufs.input, &bufs.output, case.dim, case.imp)
}

/// Every rank's input at `epoch`, as f64 values.
fn inputs(case: &Case, world: usize, epoch: u64) -> Vec<Vec<f64>> {
    let n: usize = case.shape.iter().product();
    (0..world)
        .map(|r| {
            (0..n)
                .map(|i| fill::value(case.dtype, case.seed, r as u64, epoch, i as u64))
                .collect()
        })
        .collect()
}

/// Compare `got` (this rank's output bytes after a run at `epoch`) with the reference.
pub fn compare(
    case: &Case,
    world: usize,
    rank: usize,
    epoch: u64,
    got: &[u8],
) -> std::result::Result<(), Mismatch> {
    match case.dim {
        None => compare_flat(case, world, rank, epoch, got),
        Some(d) => compare_dim(case, d, world, rank, epoch, got),
    }
}

/// Along a dimension: materialise every rank's input and use the general reference.
fn compare_dim(
    case: &Case,
    d: usize,
    world: usize,
    rank: usize,
    epoch: u64,
    got: &[u8],
) -> std::result::Result<(), Mismatch> {
    let xs = inputs(case, world, epoch);
    let shape = match case.coll {
        Collective::ReduceScatter(_) => case.output_shape(world),
        _ => case.shape.clone(),
    };
    let dim = Some((d, shape.as_slice()));
    let want = reference::expected(case.coll, &xs, rank, dim);
    let tol: Vec<f64> = match case.coll.reduce() {
        None => vec![0.0; want.len()],
        Some(_) => {
            // Σ|x| at each output position: the same reference on absolute values with a sum.
            let abs: Vec<Vec<f64>> = xs
                .iter()
                .map(|x| x.iter().map(|v| v.abs()).collect())
                .collect();
            let sum = match case.coll {
                Collective::AllReduce(_) => Collective::AllReduce(ReduceOp::Sum),
                _ => Collective::ReduceScatter(ReduceOp::Sum),
            };
            reference::expected(sum, &abs, rank, dim)
                .iter()
                .map(|&m| tolerance_for(case, world, m))
                .collect()
        }
    };
    reference::compare(case.dtype, got, &want, |k| tol[k])
}

/// The tolerance of one reduced element whose inputs have Σ|x| = `mag`.
fn tolerance_for(case: &Case, world: usize, mag: f64) -> f64 {
    let acc = reference::Accumulation::of(case.imp);
    reference::tolerance(case.coll, case.dtype, world, mag, acc)
}

/// Flat operations: every expected element is recomputed from the generator on the fly, in
/// parallel over chunks, so multi-GiB outputs check without materialising the inputs.
fn compare_flat(
    case: &Case,
    world: usize,
    rank: usize,
    epoch: u64,
    got: &[u8],
) -> std::result::Result<(), Mismatch> {
    let reference = FlatReference {
        case,
        world,
        rank,
        epoch,
        n_in: case.shape.iter().product(),
        n_out: got.len() / case.dtype.size(),
    };
    let chunks = in_parallel_chunks(reference.n_out, |range| reference.check(got, range));
    merge_mismatches(chunks)
}

/// The expected output of a flat operation on this rank, element by element.
struct FlatReference<'a> {
    case: &'a Case,
    world: usize,
    rank: usize,
    epoch: u64,
    /// Elements of one rank's input.
    n_in: usize,
    /// Elements of this rank's output.
    n_out: usize,
}

impl FlatReference<'_> {
    /// Element `i` of rank `r`'s input.
    fn input(&self, r: usize, i: usize) -> f64 {
        let case = self.case;
        fill::value(case.dtype, case.seed, r as u64, self.epoch, i as u64)
    }

    /// The expected value of output element `k` and its tolerance.
    fn expected_at(&self, k: usize) -> (f64, f64) {
        let (case, world) = (self.case, self.world);
        match case.coll {
            Collective::AllGather => (self.input(k / self.n_in, k % self.n_in), 0.0),
            Collective::AllReduce(op) => {
                let want = op.reduce_f64((0..world).map(|r| self.input(r, k)));
                let mag: f64 = (0..world).map(|r| self.input(r, k).abs()).sum();
                (want, tolerance_for(case, world, mag))
            }
            Collective::ReduceScatter(op) => {
                let i = self.rank * self.n_out + k;
                let want = op.reduce_f64((0..world).map(|r| self.input(r, i)));
                let mag: f64 = (0..world).map(|r| self.input(r, i).abs()).sum();
                (want, tolerance_for(case, world, mag))
            }
        }
    }

    /// Compare the output elements `range` of `got`: the wrong ones counted, the first kept.
    fn check(
        &self,
        got: &[u8],
        range: std::ops::Range<usize>,
    ) -> std::result::Result<(), Mismatch> {
        let mut wrong = 0;
        let mut first = None;
        for k in range {
            let (want, tol) = self.expected_at(k);
            let g = self.case.dtype.read_f64(got, k);
            if !(g.is_finite() && (g - want).abs() <= tol) {
                wrong += 1;
                first.get_or_insert((k, g, want));
            }
        }
        match first {
            None => Ok(()),
            Some((first_index, got, want)) => Err(Mismatch {
                wrong,
                total: self.n_out,
                first_index,
                got,
                want,
            }),
        }
    }
}

/// `check` over `0..n` in chunks of at least 16 Ki elements, one thread per chunk (at most one
/// chunk per core, 64 at most); the results in chunk order.
fn in_parallel_chunks<R: Send>(
    n: usize,
    check: impl Fn(std::ops::Range<usize>) -> R + Sync,
) -> Vec<R> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(64);
    let chunk = n.div_ceil(threads).max(1 << 14);
    let check = &check;
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .step_by(chunk)
            .map(|start| {
                let end = (start + chunk).min(n);
                s.spawn(move || check(start..end))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("checker thread"))
            .collect()
    })
}

/// One mismatch for the whole output: the first chunk's (its first wrong element is the
/// output's first), with the wrong elements of every chunk.
fn merge_mismatches(
    chunks: Vec<std::result::Result<(), Mismatch>>,
) -> std::result::Result<(), Mismatch> {
    let mut total_wrong = 0;
    let mut first: Option<Mismatch> = None;
    for r in chunks {
        if let Err(m) = r {
            total_wrong += m.wrong;
            first.get_or_insert(m);
        }
    }
    match first {
        None => Ok(()),
        Some(mut m) => {
            m.wrong = total_wrong;
            Err(m)
        }
    }
}

/// A checked run that failed: its output differs from the reference, or the run itself failed.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// The output differs from the f64 reference.
    #[error(
        "{ctx}: {} of {} elements differ from the reference (first at {}: got {}, want {})",
        .mismatch.wrong, .mismatch.total, .mismatch.first_index, .mismatch.got, .mismatch.want
    )]
    WrongResult {
        /// The operation, group, rank and size.
        ctx: OpCtx,
        /// Where and by how much.
        mismatch: Mismatch,
    },
    /// The run failed before there was anything to check.
    #[error(transparent)]
    Run(#[from] Error),
}

/// Run a case once on every rank of `group` (collective) and check this rank's output.
pub fn run_checked(group: &Group, case: &Case) -> std::result::Result<Dispatched, CheckError> {
    let bufs = alloc(group, case)?;
    let d = enqueue(group, case, &bufs, None)?;
    let got = group.download_bytes(&bufs.output)?;
    check(group, case, 0, &got)?;
    Ok(d)
}

/// Turn a comparison into an error naming the group and rank.
pub fn check(
    group: &Group,
    case: &Case,
    epoch: u64,
    got: &[u8],
) -> std::result::Result<(), CheckError> {
    compare(case, group.size(), group.rank(), epoch, got).map_err(|mismatch| {
        CheckError::WrongResult {
            ctx: OpCtx {
                op: match case.coll {
                    Collective::AllReduce(_) => Op::AllReduce,
                    Collective::AllGather => Op::AllGather,
                    Collective::ReduceScatter(_) => Op::ReduceScatter,
                },
                group: group.label().into(),
                rank: group.rank(),
                world: group.size(),
                bytes: got.len(),
            },
            mismatch,
        }
    })
}
