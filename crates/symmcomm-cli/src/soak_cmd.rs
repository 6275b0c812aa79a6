//! `symmcomm soak`: one CUDA graph of mixed collectives (all-reduce, all-gather and
//! reduce-scatter at several sizes, by our kernels, NCCL's symmetric kernels and NCCL's regular
//! ones) replayed many times. Each replay bumps a device epoch counter first and every input is
//! refilled from it, so every replay moves fresh data; every `--check-every` replays each rank
//! checks every output against the f64 reference for that epoch. Failures must be 0.

use std::process::ExitCode;
use std::time::Instant;

use symmcomm::{Collective, DType, Impl, ReduceOp};
use symmcomm_lab::verify::{self, Case};

use crate::args::count;
use crate::ranks::{Ran, Rank, RankArgs};

/// Options of `symmcomm soak`.
#[derive(Debug, clap::Args)]
pub(crate) struct SoakArgs {
    #[command(flatten)]
    ranks: RankArgs,
    /// Graph replays in all.
    #[arg(long, default_value_t = 1_000_000, value_parser = count::<u64>())]
    replays: u64,
    /// Check every output after this many replays.
    #[arg(long, default_value_t = 1000, value_parser = count::<u64>())]
    check_every: u64,
}

/// What one rank saw.
struct Outcome {
    rank: usize,
    cases: Vec<String>,
    replays: u64,
    checks: u64,
    failures: u64,
    first_failure: Option<String>,
    seconds: f64,
    /// Every rank's (replays, checks, failures), in rank order.
    job: Vec<[u64; 3]>,
}

/// The graph's collectives: (collective, per-rank piece in elements, implementation).
fn collectives() -> Vec<(Collective, usize, Impl)> {
    use symmcomm::Algo::{LowLatency, OneShot, TwoShot};
    let sum = ReduceOp::Sum;
    vec![
        (Collective::AllReduce(sum), 1024, Impl::Kernel(LowLatency)),
        (Collective::AllReduce(sum), 2048, Impl::Kernel(OneShot)),
        (Collective::AllReduce(sum), 131_072, Impl::Kernel(TwoShot)),
        (Collective::AllReduce(sum), 32_768, Impl::Symmetric),
        (Collective::AllReduce(sum), 524_288, Impl::Regular),
        (Collective::AllGather, 1024, Impl::Kernel(LowLatency)),
        (Collective::AllGather, 4096, Impl::Kernel(OneShot)),
        (Collective::AllGather, 32_768, Impl::Symmetric),
        (Collective::ReduceScatter(sum), 8192, Impl::Kernel(OneShot)),
        (Collective::ReduceScatter(sum), 65_536, Impl::Regular),
    ]
}

fn soak_rank(rank: &Rank<'_>, args: &SoakArgs) -> anyhow::Result<Outcome> {
    let (comm, seed) = (rank.comm, rank.seed);
    let g = comm.world();
    let world = g.size();
    let backend = comm.backend();
    let mut cases = Vec::new();
    let mut names = Vec::new();
    for (i, (coll, piece, imp)) in collectives().into_iter().enumerate() {
        // An implementation this backend lacks (our kernels on the host) runs the symmetric
        // path instead, so the graph keeps its shape everywhere.
        let imp = match g.supports(coll, DType::BF16, imp, piece) {
            Ok(()) => imp,
            Err(_) => Impl::Symmetric,
        };
        let (n_in, _) = coll.io_elems(piece, world);
        let case = Case {
            coll,
            dtype: DType::BF16,
            shape: vec![n_in],
            dim: None,
            imp,
            input_symm: true,
            output_symm: true,
            seed: seed.wrapping_add(i as u64),
        };
        let (i_elems, o_elems) = coll.io_elems(piece, world);
        names.push(format!(
            "{} {} B {}",
            coll.name(),
            i_elems.max(o_elems) * 2,
            imp.name(backend)
        ));
        cases.push(case);
    }
    let bufs: Vec<verify::CaseBuffers> = cases
        .iter()
        .map(|c| verify::alloc(g, c))
        .collect::<symmcomm::Result<_>>()?;
    let counter = g.epoch_counter()?;
    // One eager run of everything first: connects and loads all that a capture must not.
    for (c, b) in cases.iter().zip(&bufs) {
        verify::enqueue(g, c, b, None)?;
    }
    g.barrier()?;
    comm.begin_capture()?;
    let captured = (|| -> symmcomm::Result<()> {
        g.bump(&counter)?;
        for (c, b) in cases.iter().zip(&bufs) {
            verify::enqueue(g, c, b, Some(&counter))?;
        }
        Ok(())
    })();
    let graph = comm.end_capture()?;
    captured?;
    g.barrier()?;
    let t0 = Instant::now();
    let (mut done, mut checks, mut failures) = (0u64, 0u64, 0u64);
    let mut first_failure = None;
    while done < args.replays {
        let batch = args.check_every.min(args.replays - done);
        for _ in 0..batch {
            graph.replay()?;
        }
        done += batch;
        comm.synchronize()?;
        let epoch = g.epoch(&counter)?;
        anyhow::ensure!(
            epoch == done,
            "rank {}: the epoch counter reads {epoch} after {done} replays",
            g.rank()
        );
        for (c, b) in cases.iter().zip(&bufs) {
            let got = g.download_bytes(&b.output)?;
            if let Err(e) = verify::check(g, c, epoch, &got) {
                failures += 1;
                first_failure.get_or_insert_with(|| format!("after {done} replays: {e}"));
            }
        }
        checks += 1;
    }
    let seconds = t0.elapsed().as_secs_f64();
    let job = rank.gather_counts("soak counts", [done, checks, failures])?;
    Ok(Outcome {
        rank: g.rank(),
        cases: names,
        replays: done,
        checks,
        failures,
        first_failure,
        seconds,
        job,
    })
}

/// Print what rank `o.rank` saw (rank 0 also the graph and the job's totals); returns whether
/// the job had no failure.
fn report(o: &Outcome, seed: u64) -> bool {
    if o.rank == 0 {
        println!(
            "symmcomm soak (seed {seed}): one graph of {} collectives:",
            o.cases.len()
        );
        for c in &o.cases {
            println!("  {c}");
        }
    }
    println!(
        "rank {}: {} replays in {:.1} s ({:.2} us per replay), {} checks of every output, {} failures",
        o.rank,
        o.replays,
        o.seconds,
        o.seconds * 1e6 / o.replays.max(1) as f64,
        o.checks,
        o.failures
    );
    if let Some(f) = &o.first_failure {
        println!("rank {} FIRST FAILURE {f}", o.rank);
    }
    let failures: u64 = o.job.iter().map(|c| c[2]).sum();
    if o.rank == 0 {
        let who: Vec<String> = o
            .job
            .iter()
            .enumerate()
            .filter(|(_, c)| c[2] > 0)
            .map(|(r, c)| format!("rank {r}: {}", c[2]))
            .collect();
        println!(
            "symmcomm soak: {} ranks, {} replays and {} checks each, {failures} failures{}",
            o.job.len(),
            o.replays,
            o.checks,
            if who.is_empty() {
                String::new()
            } else {
                format!(" ({})", who.join(", "))
            }
        );
    }
    failures == 0
}

pub(crate) fn run(args: SoakArgs) -> anyhow::Result<ExitCode> {
    let plan = args.ranks.plan()?;
    let outcomes = match plan.run(&args.ranks, Vec::new(), |rank| {
        Ok((soak_rank(rank, &args)?, rank.seed))
    })? {
        Ran::Launched(code) => return Ok(code),
        Ran::Here(outcomes) => outcomes,
    };
    // Every rank exits as the job does (report says the job's verdict on every rank).
    let mut ok = true;
    for (o, seed) in &outcomes {
        ok &= report(o, *seed);
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
