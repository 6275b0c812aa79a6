//! How a command gets its ranks: thread ranks in this process (host backend, or `--threads`
//! on GPUs), or one process per GPU that this process launches (itself, with `--rank-child`),
//! or a rank of a job started by `symmcomm launch` / torchrun (RANK is set).

use std::time::Duration;

use anyhow::{Context, bail};
use symmcomm::policy::{SymmPolicy, apply_env_plan, nccl_env_plan};
use symmcomm::{BackendChoice, BackendKind, Bootstrap, CommConfig, Communicator};

/// Options every rank-running command shares.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct RankArgs {
    /// Backend: auto (CUDA when GPUs, the driver and NCCL are present), host or cuda.
    #[arg(long, default_value = "auto")]
    pub(crate) backend: String,
    /// Ranks: threads on the host backend (default 2), GPUs on CUDA (default: all visible).
    #[arg(long)]
    pub(crate) world: Option<usize>,
    /// On GPUs, run the ranks as threads of this process instead of one process per GPU.
    #[arg(long)]
    pub(crate) threads: bool,
    /// Deadline of every wait, in seconds.
    #[arg(long, default_value_t = 120)]
    pub(crate) timeout: u64,
    /// Turn symmetric memory off (SGLang's `--enable-symm-mem` not given).
    #[arg(long)]
    pub(crate) no_symm: bool,
    /// Decode-context-parallel size of the deployment (only the DCP group uses symmetric
    /// memory when > 1).
    #[arg(long, default_value_t = 1)]
    pub(crate) dcp_size: usize,
    /// Do not put the guard kernel before NCCL's symmetric kernels on NCCL 2.28.0–2.30.6
    /// (only to measure the hazard or the guard's cost).
    #[arg(long)]
    pub(crate) no_pdl_guard: bool,
    /// Launch our own kernels without programmatic dependent launch (only to measure what it
    /// saves).
    #[arg(long)]
    pub(crate) no_own_pdl: bool,
    /// Dispatch table for `auto` (a file written by `symmcomm tune`; default: the built-in one
    /// for this machine, if any).
    #[arg(long)]
    pub(crate) table: Option<std::path::PathBuf>,
    /// Internal: this process is a rank launched by a parent `symmcomm` command.
    #[arg(long, hide = true)]
    pub(crate) rank_child: bool,
}

/// Where the ranks run.
pub(crate) enum Plan {
    /// `world` thread ranks in this process.
    Threads { world: usize, config: CommConfig },
    /// This process launches `nproc` copies of itself, one per GPU.
    Parent { nproc: usize },
    /// This process is one rank of a launched job.
    Child { config: CommConfig },
}

impl RankArgs {
    pub(crate) fn policy(&self) -> SymmPolicy {
        SymmPolicy {
            enabled: !self.no_symm,
            dcp_size: self.dcp_size,
        }
    }

    fn backend_choice(&self) -> anyhow::Result<BackendChoice> {
        Ok(match self.backend.as_str() {
            "auto" => BackendChoice::Auto,
            "host" => BackendChoice::Host,
            "cuda" => BackendChoice::Cuda,
            other => bail!("unknown backend {other:?} (auto, host, cuda)"),
        })
    }

    /// The configuration of every rank.
    pub(crate) fn config(&self, backend: BackendChoice) -> CommConfig {
        CommConfig {
            backend,
            policy: self.policy(),
            timeout: Duration::from_secs(self.timeout),
            pdl_guard: !self.no_pdl_guard,
            own_kernels_pdl: !self.no_own_pdl,
            table: match &self.table {
                Some(p) => symmcomm::TableSource::File(p.clone()),
                None => symmcomm::TableSource::Builtin,
            },
            ..CommConfig::default()
        }
    }

    /// Apply the NCCL environment plan (before any thread exists) and decide where ranks run.
    pub(crate) fn plan(&self) -> anyhow::Result<Plan> {
        let env_plan = nccl_env_plan(&self.policy(), |k| std::env::var(k).ok());
        // SAFETY: called from `main` before this process starts any thread of its own
        // (tracing's subscriber starts none), so nothing reads the environment concurrently.
        unsafe { apply_env_plan(&env_plan) };
        let launched = std::env::var("RANK").is_ok() && std::env::var("WORLD_SIZE").is_ok();
        let choice = self.backend_choice()?;
        let backend = match choice {
            BackendChoice::Host => BackendKind::Host,
            BackendChoice::Cuda => BackendKind::Cuda,
            BackendChoice::Auto => match symmcomm::info::cuda_devices() {
                Ok(_) => BackendKind::Cuda,
                Err(why) => {
                    if !launched {
                        eprintln!(
                            "note: no usable GPU ({why}); running the host backend (ranks are threads, memory is host memory)"
                        );
                    }
                    BackendKind::Host
                }
            },
        };
        let fixed = match backend {
            BackendKind::Host => BackendChoice::Host,
            BackendKind::Cuda => BackendChoice::Cuda,
        };
        if self.rank_child || launched {
            return Ok(Plan::Child {
                config: self.config(fixed),
            });
        }
        match backend {
            BackendKind::Host => Ok(Plan::Threads {
                world: self.world.unwrap_or(2),
                config: self.config(fixed),
            }),
            BackendKind::Cuda => {
                let gpus = symmcomm::info::cuda_devices()
                    .map_err(|why| anyhow::anyhow!("the CUDA backend cannot start: {why}"))?;
                let world = self.world.unwrap_or(gpus);
                if world > gpus {
                    bail!("{world} ranks asked for, {gpus} GPUs visible");
                }
                if self.threads {
                    Ok(Plan::Threads {
                        world,
                        config: self.config(fixed),
                    })
                } else {
                    Ok(Plan::Parent { nproc: world })
                }
            }
        }
    }
}

/// Launch `nproc` copies of this process with the same arguments plus `--rank-child`.
pub(crate) fn launch_self(
    nproc: usize,
    extra_env: Vec<(String, String)>,
) -> anyhow::Result<std::process::ExitCode> {
    let exe = std::env::current_exe().context("finding this executable")?;
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    args.push("--rank-child".into());
    let mut spec = symmcomm_lab::launch::LaunchSpec::new(nproc, exe, args);
    spec.extra_env = extra_env;
    let report = symmcomm_lab::launch::launch(&spec)?;
    if !report.success() {
        eprintln!("{report}");
    }
    Ok(std::process::ExitCode::from(
        report.exit_code().clamp(0, 255) as u8,
    ))
}

/// This process's communicator as a launched rank.
pub(crate) fn child_comm(config: CommConfig) -> anyhow::Result<Communicator> {
    let boot = Bootstrap::from_env(config.timeout)
        .context("joining the job (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)")?;
    Ok(Communicator::new(boot, config)?)
}

/// Run `body` on `world` thread ranks and return every rank's result, or the first rank's
/// error (named by its rank).
pub(crate) fn on_threads<T: Send>(
    world: usize,
    config: &CommConfig,
    body: impl Fn(&Communicator) -> anyhow::Result<T> + Sync,
) -> anyhow::Result<Vec<T>> {
    // The library's harness carries library errors; keep the body's own error text.
    let failures = std::sync::Mutex::new(Vec::new());
    let results = symmcomm::run_rank_threads(world, config, |comm| match body(comm) {
        Ok(x) => Ok(Some(x)),
        Err(e) => {
            failures
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((comm.rank(), format!("{e:#}")));
            Ok(None)
        }
    });
    let mut out = Vec::with_capacity(world);
    for (r, res) in results.into_iter().enumerate() {
        match res {
            Ok(Some(x)) => out.push(x),
            Ok(None) => {}
            Err(e) => bail!("rank {r}: {e}"),
        }
    }
    let mut failures = failures.into_inner().unwrap_or_else(|p| p.into_inner());
    failures.sort();
    if let Some((r, e)) = failures.first() {
        bail!("rank {r}: {e}");
    }
    Ok(out)
}
