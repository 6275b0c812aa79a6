//! `symmcomm check`: every op × dtype × size (odd sizes too, and along every dimension of a
//! 3-d tensor) × implementation against the f64 reference, on fresh random inputs.

use std::process::ExitCode;

use symmcomm::{Algo, Collective, Communicator, DType, Impl, ReduceOp};
use symmcomm_lab::verify::{self, Case};

use crate::ranks::{Plan, RankArgs, child_comm, launch_self, on_threads};

/// Options of `check`.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct CheckArgs {
    #[command(flatten)]
    pub(crate) ranks: RankArgs,
    /// Element counts per rank piece (odd ones on purpose).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1,3,7,127,1000,4099,65537"
    )]
    pub(crate) elems: Vec<usize>,
    /// Seed of the inputs (default: random, printed).
    #[arg(long)]
    pub(crate) seed: Option<u64>,
}

fn colls() -> Vec<Collective> {
    let mut v = vec![Collective::AllGather];
    for op in ReduceOp::ALL {
        v.push(Collective::AllReduce(op));
        v.push(Collective::ReduceScatter(op));
    }
    v
}

/// Run every case on this rank; returns (cases run, failures described).
fn check_rank(
    comm: &Communicator,
    args: &CheckArgs,
    seed: u64,
) -> symmcomm::Result<(usize, usize, Vec<String>)> {
    let g = comm.world();
    let world = g.size();
    let (mut run, mut skipped, mut failed) = (0, 0, Vec::new());
    let mut n = 0u64;
    let impls = [
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
    ];
    let mut cases = Vec::new();
    for coll in colls() {
        let dtypes: &[DType] = if coll.reduce().is_some() {
            &DType::FLOATS
        } else {
            &DType::ALL
        };
        for &dtype in dtypes {
            for &e in &args.elems {
                let elems = if matches!(coll, Collective::ReduceScatter(_)) {
                    e * world
                } else {
                    e
                };
                for (imp, symm) in impls {
                    cases.push((coll, dtype, vec![elems], None, imp, symm));
                }
            }
            for dim in 0..3 {
                let mut shape = vec![3, 5, 4];
                if matches!(coll, Collective::ReduceScatter(_)) {
                    shape[dim] *= world;
                }
                if coll == Collective::AllReduce(ReduceOp::Sum)
                    || matches!(coll, Collective::AllReduce(_))
                {
                    continue;
                }
                for (imp, symm) in impls {
                    cases.push((coll, dtype, shape.clone(), Some(dim), imp, symm));
                }
            }
        }
    }
    for (coll, dtype, shape, dim, imp, symm) in cases {
        n += 1;
        let n_in: usize = shape.iter().product();
        let piece = if matches!(coll, Collective::ReduceScatter(_)) {
            n_in / world
        } else {
            n_in
        };
        if g.supports(coll, dtype, imp, piece).is_err() {
            skipped += 1;
            continue;
        }
        let case = Case {
            coll,
            dtype,
            shape,
            dim,
            imp,
            input_symm: symm,
            output_symm: symm,
            seed: seed ^ n.wrapping_mul(0x9E37_79B9),
        };
        run += 1;
        if let Err(e) = verify::run_checked(g, &case) {
            failed.push(format!("{case:?}: {e}"));
        }
    }
    Ok((run, skipped, failed))
}

pub(crate) fn run(args: CheckArgs) -> anyhow::Result<ExitCode> {
    let seed = args.seed.unwrap_or_else(rand_seed);
    let report = |r: usize, (run, skipped, failed): (usize, usize, Vec<String>)| {
        if r == 0 {
            println!(
                "symmcomm check (seed {seed}): {run} cases run, {skipped} not supported by the backend, {} failed",
                failed.len()
            );
        }
        for f in &failed {
            println!("rank {r} FAILED {f}");
        }
        failed.is_empty()
    };
    match args.ranks.plan()? {
        Plan::Parent { nproc } => launch_self(
            nproc,
            vec![("SYMMCOMM_CHECK_SEED".into(), seed.to_string())],
        ),
        Plan::Threads { world, config } => {
            let mut ok = true;
            let all = on_threads(world, &config, |comm| Ok(check_rank(comm, &args, seed)?))?;
            for (r, x) in all.into_iter().enumerate() {
                ok &= report(r, x);
            }
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Plan::Child { config } => {
            let seed = std::env::var("SYMMCOMM_CHECK_SEED")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(seed);
            let comm = child_comm(config)?;
            let ok = report(comm.rank(), check_rank(&comm, &args, seed)?);
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

pub(crate) fn rand_seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    symmcomm::lab::fill::splitmix64(t ^ u64::from(std::process::id()))
}
