//! `symmcomm bench` and `symmcomm tune`: run the library's benchmark on every rank, print
//! nccl-tests-style and comparison tables on rank 0, write the results file / dispatch table.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use symmcomm::DType;
use symmcomm::{Algo, BackendKind, Communicator, Impl};
use symmcomm_lab::bench::{
    self, BenchSpec, DcpBenchSpec, Limits, Meta, NormBenchSpec, Results, Row, Timing, Variant,
};

use crate::args::{
    CombineArg, DTypeArg, ImplArg, MAX_BATCH, ModeArg, NormArg, OpArg, count, whole,
};
use crate::ranks::{Plan, Ran, Rank, RankArgs};

/// Options of `bench`.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct BenchArgs {
    #[command(flatten)]
    pub(crate) ranks: RankArgs,
    /// Operations, comma-separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_values_t = [OpArg::AllGather, OpArg::ReduceScatter, OpArg::AllReduce, OpArg::DcpCombine]
    )]
    pub(crate) ops: Vec<OpArg>,
    /// DCP combine: decode tokens per run (default 1,8,32,128 on GPUs, 1,8 on the host).
    #[arg(
        long,
        value_delimiter = ',',
        value_parser = whole::<usize>(1, MAX_BATCH as u64, "decode tokens per run")
    )]
    pub(crate) dcp_batches: Vec<usize>,
    /// DCP combine implementations (default: nccl, nccl_symm, fused; on the host backend they
    /// are named host, host_symm, host_fused).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub(crate) dcp_impls: Vec<CombineArg>,
    /// All-reduce + add + RMSNorm: tokens per call (default 1,2,4,8,16,32,64 on GPUs, 1,2,4,8
    /// on the host).
    #[arg(
        long,
        value_delimiter = ',',
        value_parser = whole::<usize>(1, MAX_BATCH as u64, "decode tokens per call")
    )]
    pub(crate) norm_tokens: Vec<usize>,
    /// All-reduce + add + RMSNorm: hidden sizes (default 4096,7168).
    #[arg(long, value_delimiter = ',', value_parser = crate::args::hidden)]
    pub(crate) norm_hiddens: Vec<usize>,
    /// All-reduce + add + RMSNorm implementations (default: fused, unfused, nccl; on the host
    /// backend they are named host_fused, host_unfused, host).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub(crate) norm_impls: Vec<NormArg>,
    /// Element types, comma-separated (the all-reduce + add + RMSNorm rows take the first of
    /// bf16 and f16 listed, bf16 when neither is).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [DTypeArg::Bf16])]
    pub(crate) dtypes: Vec<DTypeArg>,
    /// Sizes of the larger buffer (2K, 64M, ...). Default: 2K..256M on GPUs, 2K..1M on the host.
    #[arg(long, value_delimiter = ',', value_parser = crate::args::bytes)]
    pub(crate) sizes: Vec<usize>,
    /// Implementations (default: nccl, nccl_symm, ll, oneshot, twoshot, ce, auto on GPUs;
    /// host, host_symm, auto on the host backend).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub(crate) impls: Vec<ImplArg>,
    /// Modes, comma-separated.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [ModeArg::Eager, ModeArg::Graph])]
    pub(crate) modes: Vec<ModeArg>,
    /// Operations per timed region, eager (default 20; 5 on the host backend, which is slow).
    #[arg(long, value_parser = count::<usize>())]
    pub(crate) iters: Option<usize>,
    /// Operations captured in one graph.
    #[arg(long, default_value_t = 20, value_parser = count::<usize>())]
    pub(crate) graph_ops: usize,
    /// Graph replays per timed region (default 10; 2 on the host backend).
    #[arg(long, value_parser = count::<usize>())]
    pub(crate) replays: Option<usize>,
    /// Timed regions per row, the median is reported (default 7; 3 on the host backend).
    #[arg(long, value_parser = count::<usize>())]
    pub(crate) repeats: Option<usize>,
    /// Write the results file here.
    #[arg(long)]
    pub(crate) json: Option<PathBuf>,
    /// Skip measuring the machine's limits (peer copy bandwidth, flag round trip).
    #[arg(long)]
    pub(crate) no_limits: bool,
}

/// Options of `tune`.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct TuneArgs {
    #[command(flatten)]
    pub(crate) bench: BenchArgs,
    /// Write the dispatch table here.
    #[arg(long, default_value = "symmcomm-dispatch.json")]
    pub(crate) out: PathBuf,
}

impl BenchArgs {
    fn spec(&self, backend: BackendKind, seed: u64) -> BenchSpec {
        let host = backend == BackendKind::Host;
        let impls: Vec<Variant> = if self.impls.is_empty() {
            match backend {
                BackendKind::Cuda => vec![
                    Variant::of(Impl::Regular),
                    Variant::of(Impl::Symmetric),
                    Variant::of(Impl::Kernel(Algo::LowLatency)),
                    Variant::of(Impl::Kernel(Algo::OneShot)),
                    Variant::of(Impl::Kernel(Algo::TwoShot)),
                    Variant::of(Impl::Kernel(Algo::CopyEngine)),
                    Variant::of(Impl::Auto),
                ],
                BackendKind::Host => vec![
                    Variant::of(Impl::Regular),
                    Variant::of(Impl::Symmetric),
                    Variant::of(Impl::Auto),
                ],
            }
        } else {
            self.impls.iter().map(|i| i.variant()).collect()
        };
        let mut spec = BenchSpec::standard(impls);
        spec.ops = self.ops.iter().filter_map(|o| o.collective()).collect();
        spec.dtypes = self.dtypes.iter().map(|&d| d.into()).collect();
        if !self.sizes.is_empty() {
            spec.sizes = self.sizes.clone();
        } else if host {
            spec.sizes.retain(|&b| b <= 1 << 20);
        }
        spec.timing.modes = self.modes.iter().map(|&m| m.into()).collect();
        // The host reference is slow; fewer repetitions by default keep a sweep to seconds.
        spec.timing.iters = self.iters.unwrap_or(if host { 5 } else { 20 });
        spec.timing.graph_ops = self.graph_ops;
        spec.timing.replays = self.replays.unwrap_or(if host { 2 } else { 10 });
        spec.timing.repeats = self.repeats.unwrap_or(if host { 3 } else { 7 });
        if host {
            spec.timing.warmup = 1;
        }
        spec.timing.seed = seed;
        spec
    }

    /// The DCP rows to measure, if `--ops` asks for them and the world can split the heads.
    fn dcp_spec(
        &self,
        timing: &Timing,
        backend: BackendKind,
        world: usize,
    ) -> Option<DcpBenchSpec> {
        if !self.ops.contains(&OpArg::DcpCombine) {
            return None;
        }
        let impls = if self.dcp_impls.is_empty() {
            DcpBenchSpec::default_impls()
        } else {
            self.dcp_impls.iter().map(|&c| c.into()).collect()
        };
        let mut spec = DcpBenchSpec::deepseek_v3(impls, timing);
        if !spec.heads.is_multiple_of(world) {
            return None;
        }
        if !self.dcp_batches.is_empty() {
            spec.batches = self.dcp_batches.clone();
        } else if backend == BackendKind::Host {
            // The host reference merges 128 x 512 values per token in software.
            spec.batches.retain(|&b| b <= 8);
        }
        Some(spec)
    }

    /// The all-reduce + add + RMSNorm rows to measure, if `--ops` asks for them.
    fn norm_spec(&self, timing: &Timing, backend: BackendKind) -> Option<NormBenchSpec> {
        if !self.ops.contains(&OpArg::ArRmsnorm) {
            return None;
        }
        let impls = if self.norm_impls.is_empty() {
            NormBenchSpec::default_impls()
        } else {
            self.norm_impls.iter().map(|&n| n.into()).collect()
        };
        let mut spec = NormBenchSpec::decode(impls, timing);
        spec.dtype = self
            .dtypes
            .iter()
            .map(|&d| DType::from(d))
            .find(|d| matches!(d, DType::BF16 | DType::F16))
            .unwrap_or(DType::BF16);
        if !self.norm_hiddens.is_empty() {
            spec.hiddens = self.norm_hiddens.clone();
        }
        if !self.norm_tokens.is_empty() {
            spec.tokens = self.norm_tokens.clone();
        } else if backend == BackendKind::Host {
            // The host reference adds and normalises every row in software.
            spec.tokens.retain(|&t| t <= 8);
        }
        Some(spec)
    }
}

/// Why some rows that `spec` names will not run, or not at the size asked: one line per
/// dtype and reason.
fn size_warnings(spec: &BenchSpec, world: usize) -> Vec<String> {
    let mut out = Vec::new();
    let list = |sizes: Vec<usize>| {
        sizes
            .into_iter()
            .map(bench::human_bytes)
            .collect::<Vec<_>>()
            .join(", ")
    };
    for &dtype in &spec.dtypes {
        let (tiny, ragged): (Vec<usize>, Vec<usize>) = (
            spec.sizes
                .iter()
                .copied()
                .filter(|&b| b < dtype.size())
                .collect(),
            spec.sizes
                .iter()
                .copied()
                .filter(|&b| b >= dtype.size() && !b.is_multiple_of(dtype.size()))
                .collect(),
        );
        if !tiny.is_empty() {
            out.push(format!(
                "no {} rows at {}: less than one element",
                dtype.name(),
                list(tiny)
            ));
        }
        if !ragged.is_empty() {
            out.push(format!(
                "the {} rows at {} move the whole elements only (not a multiple of {} B)",
                dtype.name(),
                list(ragged),
                dtype.size()
            ));
        }
        for &op in &spec.ops {
            let unsplit: Vec<usize> = spec
                .sizes
                .iter()
                .copied()
                .filter(|&b| b >= dtype.size() && bench::case_shape(op, dtype, b, world).is_none())
                .collect();
            if !unsplit.is_empty() {
                out.push(format!(
                    "no {} {} rows at {}: their elements do not split over {world} ranks",
                    op.name(),
                    dtype.name(),
                    list(unsplit)
                ));
            }
        }
    }
    out
}

/// The rows of a sweep on this rank, with a progress display on rank 0.
fn sweep(comm: &Communicator, spec: &BenchSpec) -> anyhow::Result<Vec<Row>> {
    let rank0 = comm.rank() == 0;
    let total = spec.rows();
    let bar = (rank0 && std::io::stderr().is_terminal()).then(|| {
        let b = indicatif::ProgressBar::new(total as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} {elapsed} {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    });
    let t0 = Instant::now();
    let mut progress = |done: usize, total: usize, what: &str| {
        if let Some(b) = &bar {
            b.set_position(done as u64);
            b.set_message(what.to_string());
        } else if rank0 && (done.is_multiple_of(10) || done == total) {
            eprintln!(
                "[{done}/{total}] {what} ({:.0} s)",
                t0.elapsed().as_secs_f64()
            );
        }
    };
    let rows = bench::run(comm, comm.world(), spec, &mut progress)?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    if rank0 {
        eprintln!("{}", bench::elapsed_line(t0.elapsed(), rows.len()));
    }
    Ok(rows)
}

/// The DCP rows on this rank (the world group is the DCP group).
fn dcp_sweep(comm: &Communicator, spec: &DcpBenchSpec) -> anyhow::Result<Vec<Row>> {
    logged_sweep(comm, "dcp_combine", |p| {
        bench::run_dcp(comm, comm.world(), spec, p)
    })
}

/// The all-reduce + add + RMSNorm rows on this rank (the world group is the TP group).
fn norm_sweep(comm: &Communicator, spec: &NormBenchSpec) -> anyhow::Result<Vec<Row>> {
    logged_sweep(comm, "ar_rmsnorm", |p| {
        bench::run_norm(comm, comm.world(), spec, p)
    })
}

/// `run` with rank 0 logging its progress and, under `label`, how long it took.
fn logged_sweep(
    comm: &Communicator,
    label: &str,
    run: impl FnOnce(&mut dyn FnMut(usize, usize, &str)) -> symmcomm::Result<Vec<Row>>,
) -> anyhow::Result<Vec<Row>> {
    let rank0 = comm.rank() == 0;
    let t0 = Instant::now();
    let mut progress = |done: usize, total: usize, what: &str| {
        if rank0 {
            eprintln!(
                "[{done}/{total}] {what} ({:.0} s)",
                t0.elapsed().as_secs_f64()
            );
        }
    };
    let rows = run(&mut progress)?;
    if rank0 {
        eprintln!("{label}: {}", bench::elapsed_line(t0.elapsed(), rows.len()));
    }
    Ok(rows)
}

/// The results file's provenance; `seed` is the job's seed of the inputs.
pub(crate) fn meta(comm: &Communicator, command: String, seed: u64) -> Meta {
    let mut meta = Meta::of(comm, env!("SYMMCOMM_GIT_COMMIT"), command);
    // A string: JSON readers that hold numbers as doubles would round a 64-bit seed.
    meta.extra
        .insert("seed".into(), serde_json::json!(seed.to_string()));
    meta
}

pub(crate) fn command_line() -> String {
    std::env::args()
        .filter(|a| a != "--rank-child")
        .map(|a| if a.contains(' ') { format!("'{a}'") } else { a })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Limits measured by the parent and handed to the ranks.
const LIMITS_ENV: &str = "SYMMCOMM_BENCH_LIMITS";

fn measure_limits(args: &BenchArgs, backend: BackendKind, world: usize) -> Limits {
    if args.no_limits || backend != BackendKind::Cuda || world < 2 {
        return Limits::default();
    }
    match symmcomm::lab::measure_limits(0, 1) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("warning: could not measure the limits: {e}");
            Limits::default()
        }
    }
}

fn limits_from_env() -> Limits {
    std::env::var(LIMITS_ENV)
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or_default()
}

/// What one rank does for `bench`; rank 0 reports. Returns whether every row was right (on
/// every rank: a row's check counts every rank's wrong elements).
fn bench_rank(rank: &Rank<'_>, args: &BenchArgs, limits: &Limits) -> anyhow::Result<bool> {
    let comm = rank.comm;
    let (backend, world) = (comm.backend(), comm.world_size());
    let spec = args.spec(backend, rank.seed);
    let dcp = args.dcp_spec(&spec.timing, backend, world);
    let norm = args.norm_spec(&spec.timing, backend);
    if comm.rank() == 0 {
        eprintln!(
            "symmcomm bench (seed {}): {world} ranks on {} ({backend} backend), {} rows",
            rank.seed,
            comm.describe(),
            spec.rows()
        );
        for w in size_warnings(&spec, world) {
            eprintln!("warning: {w}");
        }
        if args.ops.contains(&OpArg::DcpCombine) && dcp.is_none() {
            eprintln!(
                "warning: no dcp_combine rows: its {} heads do not split over {world} ranks",
                DcpBenchSpec::deepseek_v3(Vec::new(), &spec.timing).heads
            );
        }
    }
    let mut rows = sweep(comm, &spec)?;
    let collective_rows = rows.len();
    if let Some(d) = &dcp {
        rows.extend(dcp_sweep(comm, d)?);
    }
    if let Some(n) = &norm {
        rows.extend(norm_sweep(comm, n)?);
    }
    let ok = rows.iter().all(|r| r.ok);
    if comm.rank() == 0 {
        println!("{}", bench::nccl_tests_tables(&rows, backend));
        println!("{}", bench::comparison_table(&rows[..collective_rows]));
        if let Some(d) = &dcp {
            println!(
                "{}",
                bench::dcp_table(
                    &rows[collective_rows..],
                    backend,
                    d.heads * d.dim * d.dtype.size()
                )
            );
        }
        if norm.is_some() {
            println!("{}", bench::norm_table(&rows, backend));
        }
        if limits.p2p_copy_gbps > 0.0 {
            println!(
                "limits: peer copy {:.1} GB/s one way, {:.1} GB/s each way both at once; flag round trip {:.2} us",
                limits.p2p_copy_gbps, limits.p2p_bidir_gbps, limits.flag_roundtrip_us
            );
        } else {
            // Measured only with 2+ GPUs on the CUDA backend, and not with --no-limits.
            println!("limits: not measured (they need two GPUs; --no-limits skips them)");
        }
        if !ok {
            println!(
                "WRONG RESULTS in {} rows",
                rows.iter().filter(|r| !r.ok).count()
            );
        }
        if let Some(path) = &args.json {
            let results = Results {
                meta: meta(comm, command_line(), rank.seed),
                limits: limits.clone(),
                rows,
            };
            let text = serde_json::to_string_pretty(&results)?;
            std::fs::write(path, text + "\n")
                .with_context(|| format!("writing {}", path.display()))?;
            eprintln!("results written to {}", path.display());
        }
    }
    Ok(ok)
}

pub(crate) fn exit(all_ok: bool) -> ExitCode {
    if all_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Every rank's verdict, or the launched ranks' exit code.
pub(crate) fn exit_of(ran: Ran<bool>) -> ExitCode {
    match ran {
        Ran::Launched(code) => code,
        Ran::Here(oks) => exit(oks.into_iter().all(|x| x)),
    }
}

pub(crate) fn run_bench(args: BenchArgs) -> anyhow::Result<ExitCode> {
    let plan = args.ranks.plan()?;
    // The limits are measured before any rank starts (on GPUs 0 and 1), by this process.
    let limits = match &plan {
        Plan::Parent { nproc } => measure_limits(&args, BackendKind::Cuda, *nproc),
        Plan::Threads { world, config } => {
            let backend = match config.backend {
                symmcomm::BackendChoice::Host => BackendKind::Host,
                _ => BackendKind::Cuda,
            };
            measure_limits(&args, backend, *world)
        }
        Plan::Child { .. } => limits_from_env(),
    };
    let env = vec![(LIMITS_ENV.into(), serde_json::to_string(&limits)?)];
    let ran = plan.run(&args.ranks, env, |rank| bench_rank(rank, &args, &limits))?;
    Ok(exit_of(ran))
}

/// What one rank does for `tune`; rank 0 writes the table.
fn tune_rank(rank: &Rank<'_>, args: &TuneArgs) -> anyhow::Result<bool> {
    let comm = rank.comm;
    let backend = comm.backend();
    let mut spec = args.bench.spec(backend, rank.seed);
    spec.impls.retain(|v| v.imp != Impl::Auto);
    if comm.rank() == 0 {
        eprintln!(
            "symmcomm tune (seed {}): pass 1 of 2, {} rows",
            rank.seed,
            spec.rows()
        );
        for w in size_warnings(&spec, comm.world_size()) {
            eprintln!("warning: {w}");
        }
    }
    let mut rows = sweep(comm, &spec)?;
    let device = comm.facts().name;
    let mut first = bench::tune_table(&rows, backend, &device, "tune pass 1");
    for r in &mut first.rows {
        r.stage = r.best != Impl::Regular;
    }
    comm.set_table(Some(first));
    spec.impls = vec![Variant {
        imp: Impl::Auto,
        windows: false,
    }];
    if comm.rank() == 0 {
        eprintln!("symmcomm tune: pass 2 of 2 (staging), {} rows", spec.rows());
    }
    rows.extend(sweep(comm, &spec)?);
    let source = format!("symmcomm tune at {}", env!("SYMMCOMM_GIT_COMMIT"));
    let mut table = bench::tune_table(&rows, backend, &device, &source);
    comm.set_table(Some(table.clone()));
    // With `--ops ar_rmsnorm`: each fused kernel, unfused (the collectives' table now in
    // place) and NCCL's path, for the norm rows.
    if let Some(mut norm) = args.bench.norm_spec(&spec.timing, backend) {
        if args.bench.norm_impls.is_empty() {
            norm.impls = NormBenchSpec::tune_impls();
        }
        if comm.rank() == 0 {
            eprintln!("symmcomm tune: the add-RMSNorm, {} rows", norm.rows());
        }
        rows.extend(norm_sweep(comm, &norm)?);
        table = bench::tune_table(&rows, backend, &device, &source);
        comm.set_table(Some(table.clone()));
    }
    let ok = rows.iter().all(|r| r.ok);
    if comm.rank() == 0 {
        println!("{}", bench::nccl_tests_tables(&rows, backend));
        if !ok {
            // Wrong rows never enter the table (tune_table skips them), but the run fails.
            eprintln!(
                "WRONG RESULTS in {} rows (left out of the table)",
                rows.iter().filter(|r| !r.ok).count()
            );
        }
        table.save(&args.out)?;
        eprintln!(
            "dispatch table ({} rows, {} add-RMSNorm rows) written to {}",
            table.rows.len(),
            table.norm_rows.len(),
            args.out.display()
        );
    }
    Ok(ok)
}

pub(crate) fn run_tune(args: TuneArgs) -> anyhow::Result<ExitCode> {
    let plan = args.bench.ranks.plan()?;
    let ran = plan.run(&args.bench.ranks, Vec::new(), |rank| tune_rank(rank, &args))?;
    Ok(exit_of(ran))
}
