//! `symmcomm`: what this machine has (`info`), torchrun-style launching (`launch`), the
//! benchmark against NCCL (`bench`), a correctness sweep (`check`), dispatch tuning (`tune`),
//! a long run of a graph of collectives (`soak`), and `decode-sim`, which replays the
//! communication of one decode step. The work is in the library; this binary is glue.

mod args;
mod bench_cmd;
mod check_cmd;
mod decode_sim_cmd;
mod info;
mod ranks;
mod soak_cmd;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Collectives for LLM-inference parallelism on NCCL symmetric memory.
#[derive(Debug, Parser)]
#[command(name = "symmcomm", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Backends, GPUs, NCCL, NVRTC, the NCCL environment policy and the dispatch table.
    Info(info::InfoArgs),
    /// Start N ranks of a command with torchrun's variables (RANK, WORLD_SIZE, ...), on one of
    /// several nodes, or as several simulated hosts.
    Launch(LaunchArgs),
    /// Measure every collective and implementation against NCCL's regular path.
    Bench(bench_cmd::BenchArgs),
    /// Check every op, dtype and size (odd ones too) against the f64 reference.
    Check(check_cmd::CheckArgs),
    /// Measure implementations per size and write the dispatch table `auto` loads.
    Tune(bench_cmd::TuneArgs),
    /// Replay the collectives of one DeepSeek-V3 decode step (TP, DP attention, DCP) in a CUDA
    /// graph per implementation, checked, against NCCL.
    DecodeSim(decode_sim_cmd::DecodeSimArgs),
    /// Replay a graph of mixed collectives many times, checking every output periodically.
    Soak(soak_cmd::SoakArgs),
}

#[derive(Debug, clap::Args)]
struct LaunchArgs {
    /// Number of ranks on this node.
    #[arg(long, value_parser = args::whole::<usize>(1, args::MAX_RANKS as u64, "ranks on one host"))]
    nproc: usize,
    /// Number of nodes of the job: run one launcher per node, each with the same --nproc,
    /// --master-addr and --master-port. Rank = node-rank × nproc + local rank.
    #[arg(long, default_value_t = 1, value_parser = args::whole::<usize>(1, args::MAX_NODES as u64, "nodes of one job"))]
    nnodes: usize,
    /// This node's index among the job's nodes (GROUP_RANK and NODE_RANK in every rank).
    #[arg(long, default_value_t = 0, value_parser = args::whole::<usize>(0, args::MAX_NODES as u64 - 1, "a node's index"))]
    node_rank: usize,
    /// Pretend this node's ranks sit on K hosts (K must divide --nproc): each rank gets its
    /// host's SYMMCOMM_HOST_ID and NCCL_HOSTID, and NCCL's socket transport over loopback, so
    /// groups that span them run as groups across hosts do.
    #[arg(long, value_parser = args::whole::<usize>(1, args::MAX_RANKS as u64, "hosts on this node"))]
    simulate_hosts: Option<usize>,
    /// Rendezvous address (rank 0 listens there; with several nodes, node 0's address).
    #[arg(long, default_value = "127.0.0.1")]
    master_addr: String,
    /// Rendezvous port (default: a free one; required with --nnodes > 1).
    #[arg(long, value_parser = args::whole::<u16>(1, 65_535, "a TCP port; 0 is not one"))]
    master_port: Option<u16>,
    /// Kill every rank after this many seconds.
    #[arg(long, value_parser = args::whole::<u64>(1, args::MAX_LAUNCH_S, "seconds, at most a year"))]
    timeout: Option<u64>,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

fn launch(args: LaunchArgs) -> anyhow::Result<ExitCode> {
    let (program, rest) = args.command.split_first().expect("clap requires a command");
    let mut spec = symmcomm_lab::launch::LaunchSpec::new(args.nproc, program, rest.to_vec());
    spec.nnodes = args.nnodes;
    spec.node_rank = args.node_rank;
    spec.simulate_hosts = args.simulate_hosts;
    spec.master_addr = args.master_addr;
    spec.master_port = args.master_port;
    spec.timeout = args.timeout.map(std::time::Duration::from_secs);
    let report = symmcomm_lab::launch::launch(&spec)?;
    if !report.success() {
        eprintln!("{report}");
    }
    Ok(ExitCode::from(report.exit_code().clamp(0, 255) as u8))
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SYMMCOMM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let res = match cli.command {
        Command::Info(a) => info::run(a).map(|()| ExitCode::SUCCESS),
        Command::Launch(a) => launch(a),
        Command::Bench(a) => bench_cmd::run_bench(a),
        Command::Check(a) => check_cmd::run(a),
        Command::Tune(a) => bench_cmd::run_tune(a),
        Command::DecodeSim(a) => decode_sim_cmd::run(a),
        Command::Soak(a) => soak_cmd::run(a),
    };
    match res {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
