//! `symmcomm soak`: one CUDA graph of mixed collectives (all-reduce, all-gather and
//! reduce-scatter at several sizes, by our kernels, NCCL's symmetric kernels and NCCL's regular
//! ones) replayed many times. Each replay bumps a device epoch counter first and every input is
//! refilled from it, so every replay moves fresh data; every `--check-every` replays each rank
//! checks every output against the f64 reference for that epoch. Failures must be 0.

use std::process::ExitCode;
use std::time::Instant;

use symmcomm::{
    BackendKind, Collective, Communicator, DType, EpochCounter, Graph, Group, Impl, ReduceOp,
};
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

/// Soak on this rank and print what it saw (rank 0 first the graph, and last the job's totals:
/// each rank prints before the job's counts are gathered, so nothing is lost when a rank that
/// failed ends the job). Returns whether the job had no failure.
fn soak_rank(rank: &Rank<'_>, args: &SoakArgs) -> anyhow::Result<bool> {
    let (comm, seed) = (rank.comm, rank.seed);
    let g = comm.world();
    let (cases, names) = graph_cases(g, comm.backend(), seed);
    if g.rank() == 0 {
        print_graph(seed, &names);
    }
    let soak = Soak::alloc(comm, cases)?;
    let graph = soak.warm_up_and_capture()?;
    let tally = soak.replay_and_check(&graph, args)?;
    tally.print(g.rank());
    let job = rank.gather_counts("soak counts", [tally.done, tally.checks, tally.failures])?;
    let failures: u64 = job.iter().map(|c| c[2]).sum();
    if g.rank() == 0 {
        print_job(&job, &tally, failures);
    }
    Ok(failures == 0)
}

/// The graph's cases on `g`, in [`collectives`]' order, each with its line for the listing
/// (collective, nccl-tests bytes, implementation).
fn graph_cases(g: &Group, backend: BackendKind, seed: u64) -> (Vec<Case>, Vec<String>) {
    let world = g.size();
    let mut cases = Vec::new();
    let mut names = Vec::new();
    for (i, (coll, piece, imp)) in collectives().into_iter().enumerate() {
        let imp = runnable(g, coll, piece, imp);
        let (i_elems, o_elems) = coll.io_elems(piece, world);
        cases.push(Case {
            coll,
            dtype: DType::BF16,
            shape: vec![i_elems],
            dim: None,
            imp,
            input_symm: true,
            output_symm: true,
            seed: seed.wrapping_add(i as u64),
        });
        names.push(format!(
            "{} {} B {}",
            coll.name(),
            i_elems.max(o_elems) * 2,
            imp.name(backend)
        ));
    }
    (cases, names)
}

/// `imp`, or, where this group lacks it (our kernels on the host backend, or across hosts),
/// the symmetric path instead, or the regular one where NCCL refused the windows, so the graph
/// keeps its shape everywhere.
fn runnable(g: &Group, coll: Collective, piece: usize, imp: Impl) -> Impl {
    [imp, Impl::Symmetric]
        .into_iter()
        .find(|&i| g.supports(coll, DType::BF16, i, piece).is_ok())
        .unwrap_or(Impl::Regular)
}

/// Rank 0's listing of the graph.
fn print_graph(seed: u64, names: &[String]) {
    println!(
        "symmcomm soak (seed {seed}): one graph of {} collectives:",
        names.len()
    );
    for c in names {
        println!("  {c}");
    }
}

/// This rank's soak: the graph's cases with their buffers, and the epoch counter that every
/// replay bumps and every input is refilled from.
struct Soak<'a> {
    comm: &'a Communicator,
    g: &'a Group,
    cases: Vec<Case>,
    bufs: Vec<verify::CaseBuffers>,
    counter: EpochCounter,
}

/// What this rank's replays saw.
struct Tally {
    /// Replays run.
    done: u64,
    /// Rounds of checking every output.
    checks: u64,
    /// Outputs that failed their check.
    failures: u64,
    /// The first failure, with the replays run before it.
    first_failure: Option<String>,
    /// Wall-clock seconds of the replays and checks.
    seconds: f64,
}

impl<'a> Soak<'a> {
    /// Buffers for every case on `comm`'s world group, and a zeroed epoch counter.
    fn alloc(comm: &'a Communicator, cases: Vec<Case>) -> anyhow::Result<Self> {
        let g = comm.world();
        let bufs: Vec<verify::CaseBuffers> = cases
            .iter()
            .map(|c| verify::alloc(g, c))
            .collect::<symmcomm::Result<_>>()?;
        let counter = g.epoch_counter()?;
        Ok(Soak {
            comm,
            g,
            cases,
            bufs,
            counter,
        })
    }

    /// One eager run of everything first (it connects and loads all that a capture must not),
    /// then the graph: bump the epoch counter, then every case refilled from it.
    fn warm_up_and_capture(&self) -> anyhow::Result<Graph> {
        let (comm, g) = (self.comm, self.g);
        for (c, b) in self.cases.iter().zip(&self.bufs) {
            verify::enqueue(g, c, b, None)?;
        }
        g.barrier()?;
        comm.begin_capture()?;
        let captured = (|| -> symmcomm::Result<()> {
            g.bump(&self.counter)?;
            for (c, b) in self.cases.iter().zip(&self.bufs) {
                verify::enqueue(g, c, b, Some(&self.counter))?;
            }
            Ok(())
        })();
        let graph = comm.end_capture()?;
        captured?;
        g.barrier()?;
        Ok(graph)
    }

    /// Replay `graph` `--replays` times, and after every `--check-every` replays make sure the
    /// epoch counter kept count and check every output against the reference for its epoch.
    fn replay_and_check(&self, graph: &Graph, args: &SoakArgs) -> anyhow::Result<Tally> {
        let g = self.g;
        let t0 = Instant::now();
        let (mut done, mut checks, mut failures) = (0u64, 0u64, 0u64);
        let mut first_failure = None;
        while done < args.replays {
            let batch = args.check_every.min(args.replays - done);
            for _ in 0..batch {
                graph.replay()?;
            }
            done += batch;
            self.comm.synchronize()?;
            let epoch = g.epoch(&self.counter)?;
            anyhow::ensure!(
                epoch == done,
                "rank {}: the epoch counter reads {epoch} after {done} replays",
                g.rank()
            );
            for (c, b) in self.cases.iter().zip(&self.bufs) {
                let got = g.download_bytes(&b.output)?;
                if let Err(e) = verify::check(g, c, epoch, &got) {
                    failures += 1;
                    first_failure.get_or_insert_with(|| format!("after {done} replays: {e}"));
                }
            }
            checks += 1;
        }
        Ok(Tally {
            done,
            checks,
            failures,
            first_failure,
            seconds: t0.elapsed().as_secs_f64(),
        })
    }
}

impl Tally {
    /// This rank's line, and its first failure if any.
    fn print(&self, rank: usize) {
        let Tally {
            done,
            checks,
            failures,
            seconds,
            ..
        } = *self;
        println!(
            "rank {rank}: {done} replays in {seconds:.1} s ({:.2} us per replay), {checks} checks of every output, {failures} failures",
            seconds * 1e6 / done.max(1) as f64,
        );
        if let Some(f) = &self.first_failure {
            println!("rank {rank} FIRST FAILURE {f}");
        }
    }
}

/// Rank 0's line for the job: every rank's count of `failures` in all, and which ranks failed.
fn print_job(job: &[[u64; 3]], tally: &Tally, failures: u64) {
    let (done, checks) = (tally.done, tally.checks);
    let who: Vec<String> = job
        .iter()
        .enumerate()
        .filter(|(_, c)| c[2] > 0)
        .map(|(r, c)| format!("rank {r}: {}", c[2]))
        .collect();
    println!(
        "symmcomm soak: {} ranks, {done} replays and {checks} checks each, {failures} failures{}",
        job.len(),
        if who.is_empty() {
            String::new()
        } else {
            format!(" ({})", who.join(", "))
        }
    );
}

pub(crate) fn run(args: SoakArgs) -> anyhow::Result<ExitCode> {
    let plan = args.ranks.plan()?;
    // Every rank exits as the job does.
    Ok(
        match plan.run(&args.ranks, Vec::new(), |rank| soak_rank(rank, &args))? {
            Ran::Launched(code) => code,
            Ran::Here(oks) if oks.iter().all(|&ok| ok) => ExitCode::SUCCESS,
            Ran::Here(_) => ExitCode::FAILURE,
        },
    )
}
