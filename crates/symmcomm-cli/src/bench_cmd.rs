//! `symmcomm bench` and `symmcomm tune`: run the library's benchmark on every rank, print
//! nccl-tests-style and comparison tables on rank 0, write the results file / dispatch table.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, bail};
use symmcomm::dcp::CombineImpl;
use symmcomm::{BackendKind, Collective, Communicator, DType, ReduceOp};
use symmcomm_lab::bench::{
    self, BenchSpec, DcpBenchSpec, Limits, Meta, Mode, Results, Row, Timing, Variant,
};

use crate::ranks::{Plan, RankArgs, child_comm, launch_self, on_threads};

/// Options of `bench`.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct BenchArgs {
    #[command(flatten)]
    pub(crate) ranks: RankArgs,
    /// Operations: all_reduce, all_gather, reduce_scatter, and dcp_combine (the DCP combine at
    /// DeepSeek-V3 MLA shapes; `bench` only), comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "all_gather,reduce_scatter,all_reduce,dcp_combine"
    )]
    pub(crate) ops: Vec<String>,
    /// DCP combine: decode tokens per run (default 1,8,32,128 on GPUs, 1,8 on the host).
    #[arg(long, value_delimiter = ',')]
    pub(crate) dcp_batches: Vec<usize>,
    /// DCP combine implementations: nccl, nccl_symm, oneshot, fused (host: host, host_symm,
    /// host_fused). Default: nccl, nccl_symm, fused.
    #[arg(long, value_delimiter = ',')]
    pub(crate) dcp_impls: Vec<String>,
    /// Element types.
    #[arg(long, value_delimiter = ',', default_value = "bf16")]
    pub(crate) dtypes: Vec<String>,
    /// Sizes of the larger buffer (2K, 64M, ...). Default: 2K..256M on GPUs, 2K..1M on the host.
    #[arg(long, value_delimiter = ',')]
    pub(crate) sizes: Vec<String>,
    /// Implementations: nccl, nccl_symm, auto, auto_plain, ll, oneshot, twoshot, ce (host: host, host_symm).
    #[arg(long, value_delimiter = ',')]
    pub(crate) impls: Vec<String>,
    /// Modes: eager, graph.
    #[arg(long, value_delimiter = ',', default_value = "eager,graph")]
    pub(crate) modes: Vec<String>,
    /// Operations per timed region (eager).
    #[arg(long, default_value_t = 20)]
    pub(crate) iters: usize,
    /// Operations captured in one graph.
    #[arg(long, default_value_t = 20)]
    pub(crate) graph_ops: usize,
    /// Graph replays per timed region.
    #[arg(long, default_value_t = 10)]
    pub(crate) replays: usize,
    /// Timed regions per row (the median is reported).
    #[arg(long, default_value_t = 7)]
    pub(crate) repeats: usize,
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

/// The `--ops` name of the DCP combine rows.
const DCP_OP: &str = "dcp_combine";

fn parse_op(s: &str) -> anyhow::Result<Collective> {
    Ok(match s {
        "all_reduce" => Collective::AllReduce(ReduceOp::Sum),
        "all_gather" => Collective::AllGather,
        "reduce_scatter" => Collective::ReduceScatter(ReduceOp::Sum),
        other => {
            bail!("unknown op {other:?} (all_reduce, all_gather, reduce_scatter, dcp_combine)")
        }
    })
}

impl BenchArgs {
    fn spec(&self, backend: BackendKind) -> anyhow::Result<BenchSpec> {
        let impls = if self.impls.is_empty() {
            match backend {
                BackendKind::Cuda => vec![
                    "nccl",
                    "nccl_symm",
                    "ll",
                    "oneshot",
                    "twoshot",
                    "ce",
                    "auto",
                ],
                BackendKind::Host => vec!["host", "host_symm", "auto"],
            }
            .into_iter()
            .map(String::from)
            .collect()
        } else {
            self.impls.clone()
        };
        let mut spec = BenchSpec::standard(
            impls
                .iter()
                .map(|s| Variant::parse(s).map_err(anyhow::Error::msg))
                .collect::<anyhow::Result<_>>()?,
        );
        spec.ops = self
            .ops
            .iter()
            .filter(|s| s.as_str() != DCP_OP)
            .map(|s| parse_op(s))
            .collect::<anyhow::Result<_>>()?;
        spec.dtypes = self
            .dtypes
            .iter()
            .map(|s| s.parse::<DType>().map_err(anyhow::Error::msg))
            .collect::<anyhow::Result<_>>()?;
        if !self.sizes.is_empty() {
            spec.sizes = self
                .sizes
                .iter()
                .map(|s| bench::parse_bytes(s).map_err(anyhow::Error::msg))
                .collect::<anyhow::Result<_>>()?;
        } else if backend == BackendKind::Host {
            spec.sizes.retain(|&b| b <= 1 << 20);
        }
        spec.timing.modes = self
            .modes
            .iter()
            .map(|m| match m.as_str() {
                "eager" => Ok(Mode::Eager),
                "graph" => Ok(Mode::Graph),
                other => bail!("unknown mode {other:?} (eager, graph)"),
            })
            .collect::<anyhow::Result<_>>()?;
        spec.timing.iters = self.iters.max(1);
        spec.timing.graph_ops = self.graph_ops.max(1);
        spec.timing.replays = self.replays.max(1);
        spec.timing.repeats = self.repeats.max(1);
        if backend == BackendKind::Host {
            // The host reference is slow; fewer repetitions keep a sweep to seconds.
            spec.timing.iters = spec.timing.iters.min(5);
            spec.timing.replays = spec.timing.replays.min(2);
            spec.timing.repeats = spec.timing.repeats.min(3);
            spec.timing.warmup = 1;
        }
        Ok(spec)
    }
}

impl BenchArgs {
    /// The DCP rows to measure, if `--ops` asks for them.
    fn dcp_spec(
        &self,
        timing: &Timing,
        backend: BackendKind,
    ) -> anyhow::Result<Option<DcpBenchSpec>> {
        if !self.ops.iter().any(|o| o == DCP_OP) {
            return Ok(None);
        }
        let impls = if self.dcp_impls.is_empty() {
            DcpBenchSpec::default_impls()
        } else {
            self.dcp_impls
                .iter()
                .map(|s| s.parse::<CombineImpl>().map_err(anyhow::Error::msg))
                .collect::<anyhow::Result<_>>()?
        };
        let mut spec = DcpBenchSpec::deepseek_v3(impls, timing);
        if !self.dcp_batches.is_empty() {
            spec.batches = self.dcp_batches.clone();
        } else if backend == BackendKind::Host {
            // The host reference merges 128 x 512 values per token in software.
            spec.batches.retain(|&b| b <= 8);
        }
        Ok(Some(spec))
    }
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
    let rows = bench::run_dcp(comm, comm.world(), spec, &mut progress)?;
    if rank0 {
        eprintln!(
            "dcp_combine: {}",
            bench::elapsed_line(t0.elapsed(), rows.len())
        );
    }
    Ok(rows)
}

pub(crate) fn meta(comm: &Communicator, command: String) -> Meta {
    let facts = comm.facts();
    let mut extra = std::collections::BTreeMap::new();
    extra.insert("backend".into(), serde_json::json!(comm.backend()));
    if let Some(g) = facts.pdl_guard {
        extra.insert("pdl_guard".into(), serde_json::json!(g));
    }
    if let Some(p) = &facts.nccl_path {
        extra.insert("nccl_path".into(), serde_json::json!(p));
    }
    // Which GPUs of the host ran (a 2-GPU run on a larger machine says so).
    if let Ok(v) = std::env::var("CUDA_VISIBLE_DEVICES") {
        extra.insert("cuda_visible_devices".into(), serde_json::json!(v));
    }
    if let Ok(v) = std::env::var("SYMMCOMM_MACHINE") {
        extra.insert("machine".into(), serde_json::json!(v));
    }
    Meta {
        gpu: facts.name,
        gpus: comm.world_size(),
        nccl: facts.nccl.unwrap_or_else(|| "none".into()),
        driver: facts.driver.unwrap_or_else(|| "none".into()),
        commit: env!("SYMMCOMM_GIT_COMMIT").into(),
        date: today(),
        command,
        extra,
    }
}

/// Today's date (UTC) as YYYY-MM-DD.
fn today() -> String {
    let days = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 86_400) as i64;
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    format!("{:04}-{:02}-{:02}", if m <= 2 { y + 1 } else { y }, m, d)
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

/// What one rank does for `bench`; rank 0 reports. Returns whether every row was right.
fn bench_rank(comm: &Communicator, args: &BenchArgs, limits: &Limits) -> anyhow::Result<bool> {
    let spec = args.spec(comm.backend())?;
    if comm.rank() == 0 {
        eprintln!(
            "symmcomm bench: {} ranks on {} ({} backend), {} rows",
            comm.world_size(),
            comm.describe(),
            comm.backend(),
            spec.rows()
        );
    }
    let mut rows = sweep(comm, &spec)?;
    let collective_rows = rows.len();
    let dcp = args.dcp_spec(&spec.timing, comm.backend())?;
    if let Some(d) = &dcp {
        rows.extend(dcp_sweep(comm, d)?);
    }
    let ok = rows.iter().all(|r| r.ok);
    if comm.rank() == 0 {
        println!("{}", bench::nccl_tests_tables(&rows, comm.backend()));
        println!("{}", bench::comparison_table(&rows[..collective_rows]));
        if let Some(d) = &dcp {
            println!(
                "{}",
                bench::dcp_table(
                    &rows[collective_rows..],
                    comm.backend(),
                    d.heads * d.dim * d.dtype.size()
                )
            );
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
                meta: meta(comm, command_line()),
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

pub(crate) fn run_bench(args: BenchArgs) -> anyhow::Result<ExitCode> {
    match args.ranks.plan()? {
        Plan::Parent { nproc } => {
            let limits = measure_limits(&args, BackendKind::Cuda, nproc);
            launch_self(
                nproc,
                vec![(LIMITS_ENV.into(), serde_json::to_string(&limits)?)],
            )
        }
        Plan::Threads { world, config } => {
            let backend = match config.backend {
                symmcomm::BackendChoice::Host => BackendKind::Host,
                _ => BackendKind::Cuda,
            };
            let limits = measure_limits(&args, backend, world);
            let oks = on_threads(world, &config, |comm| bench_rank(comm, &args, &limits))?;
            Ok(exit(oks.into_iter().all(|x| x)))
        }
        Plan::Child { config } => {
            let comm = child_comm(config)?;
            let ok = bench_rank(&comm, &args, &limits_from_env())?;
            Ok(exit(ok))
        }
    }
}

/// What one rank does for `tune`; rank 0 writes the table.
fn tune_rank(comm: &Communicator, args: &TuneArgs) -> anyhow::Result<bool> {
    let backend = comm.backend();
    let mut spec = args.bench.spec(backend)?;
    spec.impls.retain(|v| v.imp != symmcomm::Impl::Auto);
    if comm.rank() == 0 {
        eprintln!("symmcomm tune: pass 1 of 2, {} rows", spec.rows());
    }
    let mut rows = sweep(comm, &spec)?;
    let device = comm.facts().name;
    let mut first = bench::tune_table(&rows, backend, &device, "tune pass 1");
    for r in &mut first.rows {
        r.stage = r.best != symmcomm::Impl::Regular;
    }
    comm.set_table(Some(first));
    spec.impls = vec![Variant {
        imp: symmcomm::Impl::Auto,
        windows: false,
    }];
    if comm.rank() == 0 {
        eprintln!("symmcomm tune: pass 2 of 2 (staging), {} rows", spec.rows());
    }
    rows.extend(sweep(comm, &spec)?);
    let table = bench::tune_table(
        &rows,
        backend,
        &device,
        &format!("symmcomm tune at {}", env!("SYMMCOMM_GIT_COMMIT")),
    );
    comm.set_table(Some(table.clone()));
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
            "dispatch table ({} rows) written to {}",
            table.rows.len(),
            args.out.display()
        );
    }
    Ok(ok)
}

pub(crate) fn run_tune(args: TuneArgs) -> anyhow::Result<ExitCode> {
    match args.bench.ranks.plan()? {
        Plan::Parent { nproc } => launch_self(nproc, Vec::new()),
        Plan::Threads { world, config } => {
            let oks = on_threads(world, &config, |comm| tune_rank(comm, &args))?;
            Ok(exit(oks.into_iter().all(|x| x)))
        }
        Plan::Child { config } => {
            let comm = child_comm(config)?;
            Ok(exit(tune_rank(&comm, &args)?))
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn today_is_a_date() {
        let d = super::today();
        assert_eq!(d.len(), 10);
        assert!(d.starts_with("20"));
    }
}
