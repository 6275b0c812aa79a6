//! `symmcomm info`: what this machine offers symmcomm, and what symmcomm will do about the
//! NCCL environment, and why.

use symmcomm::dispatch::DispatchTable;
use symmcomm::policy::{EnvAction, SymmPolicy, nccl_env_plan};

/// Options of `info`.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct InfoArgs {
    /// Assume symmetric memory is switched off.
    #[arg(long)]
    no_symm: bool,
    /// Decode-context-parallel size to plan the environment for.
    #[arg(
        long,
        default_value_t = 1,
        value_parser = crate::args::whole::<usize>(1, crate::args::MAX_RANKS as u64, "ranks of the DCP group")
    )]
    dcp_size: usize,
    /// A dispatch table file to show instead of the built-in one.
    #[arg(long)]
    table: Option<std::path::PathBuf>,
}

/// Print, in turn, the backends, NCCL, NVRTC, the hosts, the NCCL environment plan and the
/// dispatch table.
pub(crate) fn run(args: InfoArgs) -> anyhow::Result<()> {
    println!("symmcomm {}", env!("CARGO_PKG_VERSION"));
    print_backends();
    print_nccl();
    print_nvrtc();
    print_hosts()?;
    print_env_plan(&args);
    print_dispatch_table(dispatch_table(&args)?.as_ref());
    Ok(())
}

/// The backends: host always, CUDA with its devices and driver when it loads.
fn print_backends() {
    println!("backends:");
    println!("  host: available (ranks are threads of one process, memory is host memory)");
    match symmcomm::info::cuda_devices() {
        Ok(n) => println!("  cuda: available, {n} device(s)"),
        Err(why) => println!("  cuda: unavailable: {why}"),
    }
    match symmcomm::info::gpus() {
        Ok(gpus) => {
            for g in gpus {
                println!(
                    "  cuda:{} {} (sm_{}{}, {} MiB)",
                    g.ordinal,
                    g.name,
                    g.cc.0,
                    g.cc.1,
                    g.memory >> 20
                );
            }
        }
        Err(why) => println!("  GPUs: none ({why})"),
    }
    if let Some(d) = symmcomm::info::driver_version() {
        println!("  driver: {d}");
    }
}

/// The NCCL library found, and whether its version has the PDL hazard symmcomm guards against.
fn print_nccl() {
    match symmcomm::info::nccl() {
        Ok(n) => {
            println!("NCCL: {} at {}", n.version(), n.path().display());
            if symmcomm::info::pdl_hazard(n.version()) {
                println!(
                    "  PDL hazard: NCCL {} (2.28.0–2.30.6) launches its symmetric kernels with programmatic dependent launch\n  but without cudaGridDependencySynchronize, so they can read an input before its producer finished.\n  symmcomm launches an empty guard kernel before every nccl_symm collective (cost in BENCHMARKS.md);\n  --no-pdl-guard turns it off.",
                    n.version()
                );
            } else {
                println!("  PDL hazard: none for NCCL {}", n.version());
            }
        }
        Err(why) => println!("NCCL: unavailable: {why}"),
    }
}

/// The NVRTC that compiles symmcomm's kernels, and where its CUDA headers are.
fn print_nvrtc() {
    match symmcomm::kernels::NvrtcCompiler::new() {
        Ok(c) => {
            let (major, minor) = c.version();
            println!(
                "NVRTC: {major}.{minor}, CUDA headers in {}",
                c.include_dir().display()
            );
        }
        Err(e) => println!("NVRTC: unavailable: {e}"),
    }
}

/// What symmcomm does about each NCCL environment variable under `args`' policy, and why.
fn print_env_plan(args: &InfoArgs) {
    let policy = SymmPolicy {
        enabled: !args.no_symm,
        dcp_size: args.dcp_size,
    };
    println!(
        "NCCL environment (symmetric memory {}, DCP size {}):",
        if policy.enabled { "on" } else { "off" },
        policy.dcp_size
    );
    for d in nccl_env_plan(&policy, |k| std::env::var(k).ok()) {
        let what = match &d.action {
            EnvAction::Set { value } => format!("symmcomm sets {value}"),
            EnvAction::KeepUser { user, wanted } => {
                format!("your {user} stays (symmcomm would set {wanted})")
            }
            EnvAction::Observe { user: Some(u) } => format!("your {u} stays"),
            EnvAction::Observe { user: None } => "unset, left alone".into(),
        };
        println!("  {:<27} {:<40} {}", d.name, what, d.why);
    }
}

/// The dispatch table to show: `--table`'s file, else the built-in one for this machine's
/// first GPU and GPU count, if there is one.
fn dispatch_table(args: &InfoArgs) -> anyhow::Result<Option<DispatchTable>> {
    Ok(match &args.table {
        Some(p) => Some(DispatchTable::load(p)?),
        None => symmcomm::info::gpus()
            .ok()
            .and_then(|g| g.first().map(|d| (d.name.clone(), g.len())))
            .and_then(|(name, n)| DispatchTable::builtin(symmcomm::BackendKind::Cuda, &name, n)),
    })
}

/// `table`'s rows, or what `auto` does without one.
fn print_dispatch_table(table: Option<&DispatchTable>) {
    match table {
        Some(t) => {
            println!(
                "dispatch table: {} ({}, {} rows)",
                t.source,
                t.device,
                t.rows.len()
            );
            let upto = |max_bytes: usize| {
                if max_bytes == usize::MAX {
                    "∞".into()
                } else {
                    symmcomm_lab::bench::human_bytes(max_bytes)
                }
            };
            for r in &t.rows {
                let upto = upto(r.max_bytes);
                let across = if r.domains > 1 {
                    format!(" across {} hosts", r.domains)
                } else {
                    String::new()
                };
                println!(
                    "  {:<15} {:<5} world {}{across} up to {:>5}: {:<10} staging {}",
                    r.op,
                    r.dtype.name(),
                    r.world,
                    upto,
                    r.best.name(t.backend),
                    if r.stage { "wins" } else { "loses" }
                );
            }
            if t.norm_rows.is_empty() {
                println!("  add-RMSNorm: no rows; auto follows its size rule");
            }
            for r in &t.norm_rows {
                println!(
                    "  {:<26} {:<5} world {} up to {:>5} ({}): {}",
                    r.op,
                    r.dtype.name(),
                    r.world,
                    upto(r.max_bytes),
                    r.mode.map_or("both", |m| m.name()),
                    r.best.name()
                );
            }
        }
        None => println!(
            "dispatch table: none for this machine; auto follows NCCL's rule (symmetric path iff both buffers are in windows)"
        ),
    }
}

/// This process's host identity, what symmcomm does with groups that span hosts, and, for a
/// rank of a launched job (RANK and WORLD_SIZE set), every rank's host as the job sees it
/// (printed by rank 0; the ranks meet on the host backend, which needs no GPU).
fn print_hosts() -> anyhow::Result<()> {
    let me = symmcomm::topology::HostId::local()?;
    println!("hosts:");
    println!("  this process: {} ({})", me.id, me.source);
    println!(
        "  a group whose ranks sit on several hosts (NVLink domains) runs NCCL only: our kernels,\n  \
         peer imports and the copy engine need one domain. auto follows the table's rows for\n  \
         groups across that many hosts, else NCCL's rule (its symmetric path on windows NCCL\n  \
         accepted, else its regular path; windows NCCL refuses leave the pool as plain memory,\n  \
         the reason recorded), and `hierarchical` (auto's only where such a row names it)\n  \
         all-reduces by reduce-scatter inside each host, NCCL across hosts on the 1/m piece,\n  \
         all-gather inside."
    );
    println!(
        "  simulate hosts on one machine: symmcomm launch --simulate-hosts K (SYMMCOMM_HOST_ID and\n  \
         NCCL_HOSTID per rank)"
    );
    if std::env::var("RANK").is_err() || std::env::var("WORLD_SIZE").is_err() {
        return Ok(());
    }
    let config = symmcomm::CommConfig {
        backend: symmcomm::BackendChoice::Host,
        ..symmcomm::CommConfig::default()
    };
    let boot = symmcomm::Bootstrap::from_env(config.timeout)?;
    let comm = symmcomm::Communicator::new(boot, config)?;
    if comm.rank() == 0 {
        println!(
            "  this job ({} ranks): {}",
            comm.world_size(),
            comm.world().topology()
        );
    }
    comm.close()?;
    Ok(())
}
