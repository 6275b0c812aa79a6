//! `symmcomm decode-sim`: the collectives of one decode step of a DeepSeek-V3-shaped model,
//! replayed in one CUDA graph per (config, batch, implementation), checked against the f64
//! reference, with the per-step and per-layer time against NCCL's regular path.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, bail};
use symmcomm::{BackendKind, Communicator};
use symmcomm_lab::bench::{Results, Row, Variant};
use symmcomm_lab::decode_sim::{self, ModelDims, SimSpec, StepConfig};

use crate::bench_cmd::{command_line, exit, meta};
use crate::ranks::{Plan, RankArgs, child_comm, launch_self, on_threads};

/// Options of `decode-sim`.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct DecodeSimArgs {
    #[command(flatten)]
    pub(crate) ranks: RankArgs,
    /// Model preset: deepseek-v3, or tiny (small, for tests).
    #[arg(long, default_value = "deepseek-v3")]
    pub(crate) model: String,
    /// Override the preset's hidden size.
    #[arg(long)]
    pub(crate) hidden: Option<usize>,
    /// Override the preset's number of attention heads.
    #[arg(long)]
    pub(crate) heads: Option<usize>,
    /// Override the preset's kv_lora_rank.
    #[arg(long)]
    pub(crate) kv_lora_rank: Option<usize>,
    /// Override the preset's RoPE dimension.
    #[arg(long)]
    pub(crate) rope_dim: Option<usize>,
    /// Override the preset's number of layers.
    #[arg(long)]
    pub(crate) layers: Option<usize>,
    /// Batch sizes: decode tokens of each rank's attention.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32,64")]
    pub(crate) batch: Vec<usize>,
    /// Configurations: tp, dp_attn, dcp.
    #[arg(long, value_delimiter = ',', default_value = "tp,dp_attn,dcp")]
    pub(crate) configs: Vec<String>,
    /// Implementations (default nccl,nccl_symm,auto; on the host backend host,host_symm,auto).
    #[arg(long, value_delimiter = ',')]
    pub(crate) impls: Vec<String>,
    /// A stand-in compute kernel spinning this many µs before each collective.
    #[arg(long)]
    pub(crate) compute_us: Option<f64>,
    /// Graph replays per timed region.
    #[arg(long, default_value_t = 10)]
    pub(crate) replays: usize,
    /// Timed regions (the median is reported).
    #[arg(long, default_value_t = 7)]
    pub(crate) repeats: usize,
    /// Results file: its decode_step rows are replaced and every other row is kept (a new file
    /// is created when none exists).
    #[arg(long)]
    pub(crate) json: Option<PathBuf>,
}

impl DecodeSimArgs {
    fn model(&self) -> anyhow::Result<ModelDims> {
        let mut m = ModelDims::preset(&self.model)
            .with_context(|| format!("unknown model {:?} (deepseek-v3, tiny)", self.model))?;
        let before = m.clone();
        for (field, value) in [
            (&mut m.hidden, self.hidden),
            (&mut m.heads, self.heads),
            (&mut m.kv_lora_rank, self.kv_lora_rank),
            (&mut m.rope_dim, self.rope_dim),
            (&mut m.layers, self.layers),
        ] {
            if let Some(v) = value {
                if v == 0 {
                    bail!("model dimensions must be at least 1");
                }
                *field = v;
            }
        }
        if m != before {
            m.name = format!("{}-custom", before.name);
        }
        Ok(m)
    }

    fn spec(&self, backend: BackendKind) -> anyhow::Result<SimSpec> {
        let impls: Vec<String> = if self.impls.is_empty() {
            match backend {
                BackendKind::Cuda => vec!["nccl", "nccl_symm", "auto"],
                BackendKind::Host => vec!["host", "host_symm", "auto"],
            }
            .into_iter()
            .map(String::from)
            .collect()
        } else {
            self.impls.clone()
        };
        let mut spec = SimSpec::new(
            self.model()?,
            impls
                .iter()
                .map(|s| Variant::parse(s).map_err(anyhow::Error::msg))
                .collect::<anyhow::Result<_>>()?,
        );
        spec.configs = self
            .configs
            .iter()
            .map(|c| StepConfig::parse(c).map_err(anyhow::Error::msg))
            .collect::<anyhow::Result<_>>()?;
        if self.batch.contains(&0) {
            bail!("batch sizes start at 1");
        }
        spec.batches = self.batch.clone();
        spec.replays = self.replays.max(1);
        spec.repeats = self.repeats.max(1);
        if let Some(us) = self.compute_us
            && !(us.is_finite() && us >= 0.0)
        {
            bail!("--compute-us must be a non-negative number of microseconds");
        }
        spec.compute_us = self.compute_us;
        if backend == BackendKind::Host {
            // The host reference is slow; fewer repetitions keep a run to seconds.
            spec.replays = spec.replays.min(2);
            spec.repeats = spec.repeats.min(3);
            spec.warmup = 1;
        }
        Ok(spec)
    }
}

/// Read `path` if it exists, replace its decode-step rows, write it back through a temporary
/// file (nothing half-written on error).
fn write_results(
    path: &PathBuf,
    comm: &Communicator,
    rows: Vec<Row>,
    command: String,
) -> anyhow::Result<()> {
    let mut results = if path.exists() {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut r: Results = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a results file", path.display()))?;
        r.meta
            .extra
            .insert("decode_sim_command".into(), serde_json::json!(command));
        r
    } else {
        Results {
            meta: meta(comm, command),
            ..Results::default()
        }
    };
    decode_sim::merge_rows(&mut results, rows);
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(&results)? + "\n")
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

/// What one rank does; rank 0 reports. Returns whether every row was right.
fn sim_rank(comm: &Communicator, args: &DecodeSimArgs) -> anyhow::Result<bool> {
    let spec = args.spec(comm.backend())?;
    let rank0 = comm.rank() == 0;
    if rank0 {
        eprintln!(
            "symmcomm decode-sim: {} on {} ranks ({} backend, {}), configs {}, batches {:?}, one CUDA graph per step{}",
            spec.model.describe(),
            comm.world_size(),
            comm.backend(),
            comm.describe(),
            spec.configs
                .iter()
                .map(|c| c.name())
                .collect::<Vec<_>>()
                .join(","),
            spec.batches,
            spec.compute_us
                .map(|us| format!(", {us} us of stand-in compute before each collective"))
                .unwrap_or_default()
        );
    }
    let t0 = Instant::now();
    let bar = (rank0 && std::io::stderr().is_terminal()).then(|| {
        let b = indicatif::ProgressBar::new((spec.configs.len() * spec.batches.len()) as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} {elapsed} {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    });
    let mut progress = |done: usize, total: usize, what: &str| {
        if let Some(b) = &bar {
            b.set_position(done as u64);
            b.set_message(what.to_string());
        } else if rank0 {
            eprintln!(
                "[{done}/{total}] {what} ({:.0} s)",
                t0.elapsed().as_secs_f64()
            );
        }
    };
    let rows = decode_sim::run(comm, comm.world(), &spec, &mut progress)?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let ok = rows.iter().all(|r| r.ok);
    if rank0 {
        println!(
            "communication of one decode step, {}, {} ranks, median us per graph replay (one step), slowest rank",
            spec.model.describe(),
            comm.world_size()
        );
        println!("{}", decode_sim::report(&rows, spec.model.layers));
        if !ok {
            println!(
                "WRONG RESULTS in {} rows",
                rows.iter().filter(|r| !r.ok).count()
            );
        }
        if let Some(path) = &args.json {
            write_results(path, comm, rows, command_line())?;
            eprintln!("decode_step rows written to {}", path.display());
        }
    }
    Ok(ok)
}

pub(crate) fn run(args: DecodeSimArgs) -> anyhow::Result<ExitCode> {
    match args.ranks.plan()? {
        Plan::Parent { nproc } => launch_self(nproc, Vec::new()),
        Plan::Threads { world, config } => {
            let oks = on_threads(world, &config, |comm| sim_rank(comm, &args))?;
            Ok(exit(oks.into_iter().all(|x| x)))
        }
        Plan::Child { config } => {
            let comm = child_comm(config)?;
            Ok(exit(sim_rank(&comm, &args)?))
        }
    }
}
