//! `tp-decode`: the command. Checks the arguments, picks the backend and how the ranks run
//! (threads on the host backend; one process per GPU, launched by this process or by torchrun
//! / `symmcomm launch`, rank r on GPU r), runs every rank, and on rank 0 prints the table and
//! writes the results file.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use symmcomm::policy::{SymmPolicy, apply_env_plan, nccl_env_plan};
use symmcomm::{BackendChoice, BackendKind, Bootstrap, CommConfig, Communicator};
use symmcomm_lab::launch::{LaunchSpec, launch};
use tp_decode::check::tolerance;
use tp_decode::cpu::Storage;
use tp_decode::model::{Dims, Shard};
use tp_decode::results;
use tp_decode::run::{self, Engine, Measure, Settings};
use tp_decode::variant::Variant;

/// One tensor-parallel decode step of a Llama-3.1-8B-shaped model per batch size, in one CUDA
/// graph each, with symmcomm's `auto` all-reduces and NCCL's regular ones; checked against the
/// unsharded model and timed.
#[derive(Debug, Parser)]
#[command(name = "tp-decode", version)]
struct Args {
    /// Backend: auto (CUDA when GPUs, the driver and NCCL are present), host or cuda.
    #[arg(long, default_value = "auto")]
    backend: String,
    /// Model preset: llama-3.1-8b, or tiny (small, for the host backend and tests).
    #[arg(long, default_value = "llama-3.1-8b")]
    preset: String,
    /// Override the preset's number of layers.
    #[arg(long)]
    layers: Option<usize>,
    /// Override the preset's prefilled context (tokens in every sequence's KV cache).
    #[arg(long)]
    context: Option<usize>,
    /// Batch sizes: sequences decoding one token each; one graph per size.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32,64")]
    batch: Vec<usize>,
    /// How the all-reduces run: auto (symmcomm's dispatch), nccl (NCCL's regular path), any of
    /// symmcomm's implementations (nccl_symm, ll, oneshot, twoshot), or fused (symmcomm's
    /// all-reduce + residual add + RMSNorm in one call).
    #[arg(long, value_delimiter = ',', default_value = "auto,nccl,fused")]
    impls: Vec<String>,
    /// Timed steps per batch and implementation (graph replays on GPUs); the median is shown.
    #[arg(long, default_value_t = 20)]
    replays: usize,
    /// Ranks: threads on the host backend (default 2), GPUs on CUDA (default: all visible).
    #[arg(long)]
    world: Option<usize>,
    /// Seed of the weights, KV cache and input.
    #[arg(long, default_value_t = 0x5EED)]
    seed: u64,
    /// How the CPU stores activations on the host backend: f32, or bf16 (rounded where the
    /// GPU stores bf16, to see the GPU's rounding error without a GPU).
    #[arg(long, default_value = "f32")]
    host_dtype: String,
    /// Dispatch table for `auto` (written by `symmcomm tune`; default: the built-in one).
    #[arg(long)]
    table: Option<PathBuf>,
    /// Deadline of every wait of the communicator, in seconds.
    #[arg(long, default_value_t = 120)]
    timeout: u64,
    /// Results file: its engine_step rows are replaced, every other row kept (created when
    /// missing).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Internal: this process is a rank launched by a parent tp-decode.
    #[arg(long, hide = true)]
    rank_child: bool,
}

/// The model and the sweep, checked before anything starts.
fn settings(args: &Args) -> Result<Settings> {
    let mut dims = Dims::preset(&args.preset).with_context(|| {
        format!(
            "unknown preset {:?} (presets: {})",
            args.preset,
            Dims::PRESETS
        )
    })?;
    let preset = dims.clone();
    if let Some(l) = args.layers {
        dims.layers = l;
    }
    if let Some(c) = args.context {
        dims.context = c;
    }
    if dims != preset {
        dims.name = format!("{}-custom", preset.name);
    }
    dims.validate()?;
    if args.batch.is_empty() || args.batch.contains(&0) {
        bail!("--batch takes sizes of at least 1, e.g. 1,8,32,64");
    }
    let mut batches = args.batch.clone();
    batches.dedup();
    if args.impls.is_empty() {
        bail!("--impls takes at least one implementation, e.g. auto,nccl");
    }
    let impls = args
        .impls
        .iter()
        .map(|s| s.parse::<Variant>().map_err(anyhow::Error::msg))
        .collect::<Result<Vec<_>>>()?;
    if args.replays == 0 {
        bail!("--replays must be at least 1");
    }
    let host_storage = match args.host_dtype.as_str() {
        "f32" => Storage::F32,
        "bf16" => Storage::Bf16,
        other => bail!("unknown --host-dtype {other:?} (f32, bf16)"),
    };
    Ok(Settings {
        dims,
        batches,
        impls,
        replays: args.replays,
        seed: args.seed,
        host_storage,
    })
}

/// The backend this run uses.
fn backend(args: &Args, quiet: bool) -> Result<BackendKind> {
    Ok(match args.backend.as_str() {
        "host" => BackendKind::Host,
        "cuda" => {
            symmcomm::info::cuda_devices()
                .map_err(|why| anyhow::anyhow!("the CUDA backend cannot start: {why}"))?;
            BackendKind::Cuda
        }
        "auto" => match symmcomm::info::cuda_devices() {
            Ok(_) => BackendKind::Cuda,
            Err(why) => {
                if !quiet {
                    eprintln!(
                        "note: no usable GPU ({why}); running the host backend (the CPU model in \
                         f32, ranks are threads)"
                    );
                }
                BackendKind::Host
            }
        },
        other => bail!("unknown backend {other:?} (auto, host, cuda)"),
    })
}

fn config(args: &Args, backend: BackendKind) -> CommConfig {
    CommConfig {
        backend: match backend {
            BackendKind::Host => BackendChoice::Host,
            BackendKind::Cuda => BackendChoice::Cuda,
        },
        timeout: Duration::from_secs(args.timeout),
        table: match &args.table {
            Some(p) => symmcomm::TableSource::File(p.clone()),
            None => symmcomm::TableSource::Builtin,
        },
        ..CommConfig::default()
    }
}

/// One rank: run, gather on every rank, report on rank 0. Returns whether every check passed.
fn rank_main(
    comm: &Communicator,
    args: &Args,
    s: &Settings,
    engine: Option<&Engine>,
) -> Result<bool> {
    let rank0 = comm.rank() == 0;
    let bf16 = engine.is_some() || s.host_storage == Storage::Bf16;
    if rank0 {
        eprintln!(
            "tp-decode: {} ({} parameters), TP over {} ranks, {}, {}, batches {:?}",
            s.dims.describe(),
            match s.dims.params() as f64 {
                p if p >= 1e9 => format!("{:.2} B", p * 1e-9),
                p => format!("{:.2} M", p * 1e-6),
            },
            comm.world_size(),
            comm.describe(),
            if engine.is_some() {
                "bf16, one CUDA graph per step"
            } else if bf16 {
                "f32 on the CPU, activations rounded to bf16"
            } else {
                "f32 on the CPU"
            },
            s.batches
        );
    }
    let mine = match engine {
        Some(e) => run::run_cuda(comm, e, s)?,
        None => run::run_host(comm, s)?,
    };
    let all: Vec<Measure> = run::gather(comm, &mine)?;
    let ok = all.iter().all(|m| m.ok);
    if rank0 {
        println!(
            "engine step (tp-decode), {}, {} ranks, median us per decode step (slowest rank)",
            s.dims.name,
            comm.world_size()
        );
        println!("{}", results::table(&all, comm.backend(), tolerance(bf16)));
        if !ok {
            println!(
                "WRONG RESULTS at {} points",
                all.iter().filter(|m| !m.ok).count()
            );
        }
        if let Some(path) = &args.json {
            let rows = results::rows(&all, comm.world_size(), comm.backend());
            results::write_json(path, comm, rows)?;
            eprintln!("engine_step rows written to {}", path.display());
        }
    }
    Ok(ok)
}

/// This process is one rank of a launched job (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
/// MASTER_PORT): on CUDA, the engine of GPU LOCAL_RANK, its context handed to the communicator.
fn child(args: &Args, s: &Settings, backend: BackendKind) -> Result<bool> {
    let boot = Bootstrap::from_env(Duration::from_secs(args.timeout))
        .context("joining the job (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)")?;
    match backend {
        BackendKind::Host => {
            let comm = Communicator::new(boot, config(args, backend))?;
            rank_main(&comm, args, s, None)
        }
        BackendKind::Cuda => {
            let engine = Engine::new(boot.local_rank)?;
            let comm = Communicator::new(
                boot,
                CommConfig {
                    cuda_context: Some(engine.ctx.clone()),
                    ..config(args, backend)
                },
            )?;
            let ok = rank_main(&comm, args, s, Some(&engine))?;
            comm.close()?;
            Ok(ok)
        }
    }
}

/// Launch one copy of this process per GPU with `--rank-child`.
fn launch_ranks(nproc: usize) -> Result<ExitCode> {
    let exe = std::env::current_exe().context("finding this executable")?;
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    args.push("--rank-child".into());
    let report = launch(&LaunchSpec::new(nproc, exe, args))?;
    if !report.success() {
        eprintln!("tp-decode: {report}");
    }
    Ok(ExitCode::from(report.exit_code().clamp(0, 255) as u8))
}

fn exit(ok: bool) -> ExitCode {
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn main_inner(args: Args) -> Result<ExitCode> {
    let s = settings(&args)?;
    let launched = args.rank_child
        || (std::env::var_os("RANK").is_some() && std::env::var_os("WORLD_SIZE").is_some());
    let plan = nccl_env_plan(&SymmPolicy::default(), |k| std::env::var(k).ok());
    // SAFETY: nothing but this thread exists yet (no rank, no communicator, no launcher), so
    // nothing reads the environment concurrently.
    unsafe { apply_env_plan(&plan) };
    let backend = backend(&args, launched)?;
    if launched {
        return Ok(exit(child(&args, &s, backend)?));
    }
    match backend {
        BackendKind::Host => {
            let world = args.world.unwrap_or(2);
            Shard::new(s.dims.clone(), world.max(1), 0)?;
            // The CPU holds the unsharded model and every rank's shard in f32.
            let bytes = s.dims.params() as f64 * 8.0;
            if bytes > 16.0 * (1u64 << 30) as f64 {
                bail!(
                    "the host backend would hold {:.1} GiB of f32 weights; use --preset tiny or \
                     fewer --layers",
                    bytes / (1u64 << 30) as f64
                );
            }
            let config = config(&args, backend);
            // The harness carries symmcomm's errors; keep each rank's own error text aside.
            let failures = Mutex::new(Vec::new());
            let results = symmcomm::run_rank_threads(world, &config, |comm| {
                Ok(rank_main(comm, &args, &s, None)
                    .map_err(|e| {
                        let mut f = failures.lock().unwrap_or_else(|p| p.into_inner());
                        f.push(format!("rank {}: {e:#}", comm.rank()));
                    })
                    .ok())
            });
            if let Some(first) = failures.into_inner().unwrap_or_default().first() {
                bail!("{first}");
            }
            let mut ok = true;
            for (rank, r) in results.into_iter().enumerate() {
                ok &= r.with_context(|| format!("rank {rank}"))?.unwrap_or(false);
            }
            Ok(exit(ok))
        }
        BackendKind::Cuda => {
            let gpus = symmcomm::info::cuda_devices().map_err(anyhow::Error::msg)?;
            let world = args.world.unwrap_or(gpus);
            if world == 0 || world > gpus {
                bail!("--world {world}: {gpus} GPUs visible");
            }
            Shard::new(s.dims.clone(), world, 0)?;
            launch_ranks(world)
        }
    }
}

fn main() -> ExitCode {
    match main_inner(Args::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tp-decode: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
