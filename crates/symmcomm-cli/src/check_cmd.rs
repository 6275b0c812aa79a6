//! `symmcomm check`: every op × dtype × size (odd sizes too, and along every dimension of a
//! 3-d tensor) × implementation against the f64 reference, on fresh random inputs. On a job
//! whose ranks span several hosts (or simulated ones), our kernels are not supported and the
//! hierarchical all-reduce is checked too.

use std::process::ExitCode;

use symmcomm::{Algo, Collective, DType, Group, Impl, ReduceOp};
use symmcomm_lab::verify::{self, Case};

use crate::args::{MAX_CHECK_ELEMS, whole};
use crate::ranks::{Ran, Rank, RankArgs};

/// Options of `check`.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct CheckArgs {
    #[command(flatten)]
    pub(crate) ranks: RankArgs,
    /// Element counts per rank piece (odd ones on purpose); fewer and smaller for a quick
    /// sweep (e.g. 1,7,127).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1,3,7,127,1000,4099,65537",
        value_parser = whole::<usize>(1, MAX_CHECK_ELEMS as u64, "elements of one rank's piece")
    )]
    pub(crate) elems: Vec<usize>,
    /// Internal, for tests of the job's summary: this rank counts every case it runs as failed.
    #[arg(long, hide = true)]
    pub(crate) fail_on_rank: Option<usize>,
}

fn colls() -> Vec<Collective> {
    let mut v = vec![Collective::AllGather];
    for op in ReduceOp::ALL {
        v.push(Collective::AllReduce(op));
        v.push(Collective::ReduceScatter(op));
    }
    v
}

/// Every implementation the sweep asks for, with whether both buffers are in windows.
const IMPLS: [(Impl, bool); 12] = [
    (Impl::Regular, false),
    (Impl::Symmetric, true),
    (Impl::Auto, true),
    (Impl::Auto, false),
    (Impl::Kernel(Algo::OneShot), false),
    (Impl::Kernel(Algo::OneShot), true),
    (Impl::Kernel(Algo::TwoShot), true),
    (Impl::Kernel(Algo::CopyEngine), true),
    (Impl::Kernel(Algo::LowLatency), false),
    (Impl::Kernel(Algo::LowLatency), true),
    (Impl::Hierarchical, false),
    (Impl::Hierarchical, true),
];

/// Run every case on this rank, printing each failure as it happens (before any rank can stop
/// the job), then gather every rank's (cases run, not supported, failed), in rank order.
fn check_rank(rank: &Rank<'_>, args: &CheckArgs) -> anyhow::Result<Vec<[u64; 3]>> {
    let g = rank.comm.world();
    let cases = sweep(g.size(), &args.elems, rank.seed);
    let counts = run_cases(g, cases, args.fail_on_rank);
    rank.gather_counts("check counts", counts)
}

/// Every case of the sweep, supported by the group or not, in order: by collective, dtype and
/// shape, every implementation of [`IMPLS`]; case `n` (from 1) draws its inputs from
/// `seed ^ n·0x9E37_79B9`.
fn sweep(world: usize, elems: &[usize], seed: u64) -> Vec<Case> {
    let mut cases = Vec::new();
    let mut n = 0u64;
    for coll in colls() {
        let dtypes: &[DType] = if coll.reduce().is_some() {
            &DType::FLOATS
        } else {
            &DType::ALL
        };
        for &dtype in dtypes {
            for (shape, dim) in shapes(coll, world, elems) {
                for (imp, symm) in IMPLS {
                    n += 1;
                    cases.push(Case {
                        coll,
                        dtype,
                        shape: shape.clone(),
                        dim,
                        imp,
                        input_symm: symm,
                        output_symm: symm,
                        seed: seed ^ n.wrapping_mul(0x9E37_79B9),
                    });
                }
            }
        }
    }
    cases
}

/// The per-rank input shapes of `coll`, with the dimension it runs along: flat ones of each
/// of `elems` per rank piece, then, except for an all-reduce (whose shape a dimension does not
/// change), a 3-d tensor along each dimension.
fn shapes(coll: Collective, world: usize, elems: &[usize]) -> Vec<(Vec<usize>, Option<usize>)> {
    let scatters = matches!(coll, Collective::ReduceScatter(_));
    let mut shapes = Vec::new();
    for &e in elems {
        shapes.push((vec![if scatters { e * world } else { e }], None));
    }
    if matches!(coll, Collective::AllReduce(_)) {
        return shapes;
    }
    for dim in 0..3 {
        let mut shape = vec![3, 5, 4];
        if scatters {
            shape[dim] *= world;
        }
        shapes.push((shape, Some(dim)));
    }
    shapes
}

/// Run every case `g` supports, printing each failure as it happens; returns (cases run, not
/// supported, failed). With `fail_on_rank` naming this rank, every case run counts as failed.
fn run_cases(g: &Group, cases: Vec<Case>, fail_on_rank: Option<usize>) -> [u64; 3] {
    let world = g.size();
    let (mut run, mut skipped, mut failed) = (0u64, 0u64, 0u64);
    for case in cases {
        let n_in: usize = case.shape.iter().product();
        let piece = if matches!(case.coll, Collective::ReduceScatter(_)) {
            n_in / world
        } else {
            n_in
        };
        if g.supports(case.coll, case.dtype, case.imp, piece).is_err() {
            skipped += 1;
            continue;
        }
        run += 1;
        let why = match verify::run_checked(g, &case) {
            Err(e) => e.to_string(),
            Ok(_) if fail_on_rank == Some(g.rank()) => "failed on purpose (--fail-on-rank)".into(),
            Ok(_) => continue,
        };
        failed += 1;
        println!("rank {} FAILED {case:?}: {why}", g.rank());
    }
    [run, skipped, failed]
}

/// The job's summary line from every rank's (run, not supported, failed).
fn summary(seed: u64, job: &[[u64; 3]]) -> String {
    let (run, skipped) = (job[0][0], job[0][1]);
    let counts = if job.iter().all(|c| c[0] == run && c[1] == skipped) {
        format!("{run} cases run on each rank, {skipped} not supported by the backend")
    } else {
        let by_rank = |i: usize| {
            job.iter()
                .map(|c| c[i].to_string())
                .collect::<Vec<_>>()
                .join("/")
        };
        format!(
            "cases run by rank {}, not supported by rank {}",
            by_rank(0),
            by_rank(1)
        )
    };
    let failed: u64 = job.iter().map(|c| c[2]).sum();
    let who: Vec<String> = job
        .iter()
        .enumerate()
        .filter(|(_, c)| c[2] > 0)
        .map(|(r, c)| format!("rank {r}: {}", c[2]))
        .collect();
    let who = if who.is_empty() {
        String::new()
    } else {
        format!(" ({})", who.join(", "))
    };
    format!(
        "symmcomm check (seed {seed}, {} ranks): {counts}, {failed} failed{who}",
        job.len()
    )
}

pub(crate) fn run(args: CheckArgs) -> anyhow::Result<ExitCode> {
    let plan = args.ranks.plan()?;
    let jobs = match plan.run(&args.ranks, Vec::new(), |rank| {
        if rank.comm.rank() == 0 {
            println!("world: {}", rank.comm.world().topology());
        }
        let job = check_rank(rank, &args)?;
        if rank.comm.rank() == 0 {
            println!("{}", summary(rank.seed, &job));
        }
        Ok(job)
    })? {
        Ran::Launched(code) => return Ok(code),
        Ran::Here(jobs) => jobs,
    };
    // Every rank exits as the job does, so that rank 0's status is the job's.
    let job_ok = jobs.iter().flatten().all(|c| c[2] == 0);
    Ok(if job_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    use super::summary;

    #[test]
    fn the_summary_counts_every_rank() {
        let s = summary(7, &[[10, 2, 0], [10, 2, 0], [10, 2, 3]]);
        assert_eq!(
            s,
            "symmcomm check (seed 7, 3 ranks): 10 cases run on each rank, 2 not supported by the backend, 3 failed (rank 2: 3)"
        );
        let s = summary(7, &[[10, 2, 0], [9, 3, 0]]);
        assert!(
            s.ends_with("cases run by rank 10/9, not supported by rank 2/3, 0 failed"),
            "{s}"
        );
    }
}
