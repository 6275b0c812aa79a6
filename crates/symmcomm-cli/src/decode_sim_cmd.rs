//! `symmcomm decode-sim`: the collectives of one decode step of a DeepSeek-V3-shaped model,
//! replayed in one CUDA graph per (config, batch, implementation), checked against the f64
//! reference, with the per-step and per-layer time against NCCL's regular path.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, bail};
use symmcomm::{BackendKind, Communicator, Impl};
use symmcomm_lab::bench::{Results, Row, Variant};
use symmcomm_lab::decode_sim::{self, ModelDims, SimSpec};

use crate::args::{ConfigArg, ImplArg, MAX_BATCH, ModelArg, count, whole};
use crate::bench_cmd::{command_line, exit_of, meta};
use crate::ranks::{Rank, RankArgs};

/// Options of `decode-sim`.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct DecodeSimArgs {
    #[command(flatten)]
    pub(crate) ranks: RankArgs,
    /// Model preset.
    #[arg(long, value_enum, default_value_t = ModelArg::DeepseekV3)]
    pub(crate) model: ModelArg,
    /// Override the preset's hidden size.
    #[arg(long, value_parser = dimension())]
    pub(crate) hidden: Option<usize>,
    /// Override the preset's number of attention heads.
    #[arg(long, value_parser = dimension())]
    pub(crate) heads: Option<usize>,
    /// Override the preset's kv_lora_rank (the dcp rows need a multiple of 8).
    #[arg(long, value_parser = dimension())]
    pub(crate) kv_lora_rank: Option<usize>,
    /// Override the preset's RoPE dimension.
    #[arg(long, value_parser = dimension())]
    pub(crate) rope_dim: Option<usize>,
    /// Override the preset's number of layers.
    #[arg(long, value_parser = whole::<usize>(1, 1000, "layers of a model"))]
    pub(crate) layers: Option<usize>,
    /// Batch sizes: decode tokens of each rank's attention.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1,8,32,64",
        value_parser = whole::<usize>(1, MAX_BATCH as u64, "decode tokens per rank")
    )]
    pub(crate) batch: Vec<usize>,
    /// Configurations, comma-separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_values_t = [ConfigArg::Tp, ConfigArg::DpAttn, ConfigArg::Dcp]
    )]
    pub(crate) configs: Vec<ConfigArg>,
    /// Implementations (default nccl, nccl_symm, auto; on the host backend host, host_symm,
    /// auto).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub(crate) impls: Vec<ImplArg>,
    /// A stand-in compute kernel spinning this many µs before each collective.
    #[arg(long, allow_negative_numbers = true, value_parser = crate::args::micros)]
    pub(crate) compute_us: Option<f64>,
    /// Graph replays per timed region (default 10; 2 on the host backend, which is slow).
    #[arg(long, value_parser = count::<usize>())]
    pub(crate) replays: Option<usize>,
    /// Timed regions, the median is reported (default 7; 3 on the host backend).
    #[arg(long, value_parser = count::<usize>())]
    pub(crate) repeats: Option<usize>,
    /// Results file: its decode_step rows are replaced and every other row is kept (a new file
    /// is created when none exists).
    #[arg(long)]
    pub(crate) json: Option<PathBuf>,
}

/// A model dimension: 1 to 2^20.
fn dimension() -> impl Fn(&str) -> Result<usize, String> + Clone + Send + Sync {
    whole(1, 1 << 20, "a model dimension")
}

impl DecodeSimArgs {
    fn model(&self) -> ModelDims {
        let mut m = self.model.dims();
        let before = m.clone();
        for (field, value) in [
            (&mut m.hidden, self.hidden),
            (&mut m.heads, self.heads),
            (&mut m.kv_lora_rank, self.kv_lora_rank),
            (&mut m.rope_dim, self.rope_dim),
            (&mut m.layers, self.layers),
        ] {
            if let Some(v) = value {
                *field = v;
            }
        }
        if m != before {
            m.name = format!("{}-custom", before.name);
        }
        m
    }

    fn spec(&self, backend: BackendKind, seed: u64) -> SimSpec {
        let host = backend == BackendKind::Host;
        let impls: Vec<Variant> = if self.impls.is_empty() {
            [Impl::Regular, Impl::Symmetric, Impl::Auto]
                .into_iter()
                .map(Variant::of)
                .collect()
        } else {
            self.impls.iter().map(|i| i.variant()).collect()
        };
        let mut spec = SimSpec::new(self.model(), impls);
        spec.configs = self.configs.iter().map(|&c| c.into()).collect();
        spec.batches = self.batch.clone();
        // The host reference is slow; fewer repetitions by default keep a run to seconds.
        spec.replays = self.replays.unwrap_or(if host { 2 } else { 10 });
        spec.repeats = self.repeats.unwrap_or(if host { 3 } else { 7 });
        if host {
            spec.warmup = 1;
        }
        spec.compute_us = self.compute_us;
        spec.seed = seed;
        spec
    }
}

/// Read `path` if it exists, replace its decode-step rows, write it back through a temporary
/// file (nothing half-written on error).
fn write_results(
    path: &PathBuf,
    comm: &Communicator,
    rows: Vec<Row>,
    command: String,
    seed: u64,
) -> anyhow::Result<()> {
    let mut results = if path.exists() {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut r: Results = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a results file", path.display()))?;
        r.meta
            .extra
            .insert("decode_sim_command".into(), serde_json::json!(command));
        r.meta.extra.insert(
            "decode_sim_seed".into(),
            serde_json::json!(seed.to_string()),
        );
        r
    } else {
        Results {
            meta: meta(comm, command, seed),
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
fn sim_rank(rank: &Rank<'_>, args: &DecodeSimArgs) -> anyhow::Result<bool> {
    let comm = rank.comm;
    let spec = args.spec(comm.backend(), rank.seed);
    let rank0 = comm.rank() == 0;
    if rank0 {
        eprintln!(
            "symmcomm decode-sim (seed {}): {} on {} ranks ({} backend, {}), configs {}, batches {:?}, one CUDA graph per step{}",
            rank.seed,
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
            write_results(path, comm, rows, command_line(), rank.seed)?;
            eprintln!("decode_step rows written to {}", path.display());
        }
    }
    Ok(ok)
}

pub(crate) fn run(args: DecodeSimArgs) -> anyhow::Result<ExitCode> {
    let plan = args.ranks.plan()?;
    if plan.world() == Some(1) {
        bail!(
            "--world 1: decode-sim needs at least 2 ranks (one rank has no communication to replay)"
        );
    }
    let ran = plan.run(&args.ranks, Vec::new(), |rank| sim_rank(rank, &args))?;
    Ok(exit_of(ran))
}
