//! How a command gets its ranks: thread ranks in this process (host backend, or `--threads`
//! on GPUs), or one process per GPU that this process launches (itself, with `--rank-child`),
//! or a rank of a job started by `symmcomm launch` / torchrun (RANK is set). Every rank joins
//! the job the same way: it takes rank 0's seed and checks that all ranks run the same command,
//! so that no rank draws inputs, or checks against a reference, that the others never made.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use symmcomm::policy::{SymmPolicy, apply_env_plan, nccl_env_plan};
use symmcomm::{BackendChoice, BackendKind, Bootstrap, CommConfig, Communicator};

use crate::args::{BackendArg, MAX_RANKS, MAX_WAIT_S, whole};

/// Options every rank-running command shares.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct RankArgs {
    /// Backend.
    #[arg(long, value_enum, default_value_t = BackendArg::Auto)]
    pub(crate) backend: BackendArg,
    /// Ranks: threads on the host backend (default 2), GPUs on CUDA (default: all visible).
    /// Under `symmcomm launch` or torchrun the job's WORLD_SIZE decides (and must agree).
    #[arg(long, value_parser = whole::<usize>(1, MAX_RANKS as u64, "ranks on one host"))]
    pub(crate) world: Option<usize>,
    /// On GPUs, run the ranks as threads of this process instead of one process per GPU.
    #[arg(long)]
    pub(crate) threads: bool,
    /// Deadline of every wait, in seconds.
    #[arg(
        long,
        default_value_t = 120,
        value_parser = whole::<u64>(1, MAX_WAIT_S, "seconds; a wait of more than a day is a hang")
    )]
    pub(crate) timeout: u64,
    /// Turn symmetric memory off (SGLang's `--enable-symm-mem` not given).
    #[arg(long)]
    pub(crate) no_symm: bool,
    /// Decode-context-parallel size of the deployment (only the DCP group uses symmetric
    /// memory when > 1); at most the number of ranks.
    #[arg(
        long,
        default_value_t = 1,
        value_parser = whole::<usize>(1, MAX_RANKS as u64, "ranks of the DCP group")
    )]
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
    /// Seed of every random input (default: a fresh one, drawn by rank 0 and used by every
    /// rank; printed, so a run can be repeated).
    #[arg(long, allow_negative_numbers = true)]
    pub(crate) seed: Option<u64>,
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
    /// This process is one rank of a launched job of `world` ranks (WORLD_SIZE, if readable).
    Child {
        config: CommConfig,
        world: Option<usize>,
    },
}

impl RankArgs {
    pub(crate) fn policy(&self) -> SymmPolicy {
        SymmPolicy {
            enabled: !self.no_symm,
            dcp_size: self.dcp_size,
        }
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
        let backend = match BackendChoice::from(self.backend) {
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
            // The job's size is WORLD_SIZE; a --world that says otherwise is a mistake.
            let job = std::env::var("WORLD_SIZE")
                .ok()
                .and_then(|w| w.parse::<usize>().ok());
            if let (Some(asked), Some(job)) = (self.world, job)
                && asked != job
                && !self.rank_child
            {
                bail!("--world {asked} disagrees with the launched job's WORLD_SIZE={job}");
            }
            if let Some(job) = job {
                self.check_dcp_size(job)?;
            }
            return Ok(Plan::Child {
                config: self.config(fixed),
                world: job,
            });
        }
        let world = match backend {
            BackendKind::Host => self.world.unwrap_or(2),
            BackendKind::Cuda => {
                let gpus = symmcomm::info::cuda_devices()
                    .map_err(|why| anyhow::anyhow!("the CUDA backend cannot start: {why}"))?;
                let world = self.world.unwrap_or(gpus);
                if world > gpus {
                    bail!("--world {world}: {world} ranks asked for, {gpus} GPUs visible");
                }
                world
            }
        };
        self.check_dcp_size(world)?;
        if backend == BackendKind::Cuda && !self.threads {
            return Ok(Plan::Parent { nproc: world });
        }
        if backend == BackendKind::Host && self.threads {
            eprintln!(
                "note: --threads changes nothing on the host backend (its ranks are threads)"
            );
        }
        Ok(Plan::Threads {
            world,
            config: self.config(fixed),
        })
    }

    fn check_dcp_size(&self, world: usize) -> anyhow::Result<()> {
        if self.dcp_size > world {
            bail!(
                "--dcp-size {} is more than the job's {world} ranks",
                self.dcp_size
            );
        }
        Ok(())
    }
}

/// One rank of the job as a command's body sees it: its communicator and what every rank of the
/// job agreed on when it joined.
#[derive(Debug)]
pub(crate) struct Rank<'a> {
    /// This rank's communicator.
    pub(crate) comm: &'a Communicator,
    /// The job's seed: `--seed`, or rank 0's fresh draw. The same on every rank.
    pub(crate) seed: u64,
}

impl<'a> Rank<'a> {
    /// Agree with every other rank of `comm`'s job, over the control plane: take rank 0's seed
    /// (its `--seed` or a fresh draw), and make sure every rank was started with the same
    /// arguments (else each would run, or check against, a different sweep).
    fn join(comm: &'a Communicator, args: &RankArgs) -> anyhow::Result<Self> {
        let seed = args.seed.unwrap_or_else(fresh_seed);
        let argv = rank_argv().join("\0");
        let mut mine = seed.to_le_bytes().to_vec();
        mine.extend_from_slice(argv.as_bytes());
        let all = comm
            .control()
            .all_gather("symmcomm job agreement", &mine)
            .context("agreeing on the job's seed and arguments")?;
        let decode = |b: &[u8]| -> anyhow::Result<(u64, String)> {
            anyhow::ensure!(b.len() >= 8, "a rank sent a malformed agreement");
            let (s, a) = b.split_at(8);
            let seed = u64::from_le_bytes(s.try_into().expect("8 bytes"));
            Ok((seed, String::from_utf8_lossy(a).into_owned()))
        };
        let (seed, argv0) = decode(&all[0])?;
        for (r, b) in all.iter().enumerate().skip(1) {
            let (_, argv_r) = decode(b)?;
            if argv_r != argv0 {
                bail!(
                    "rank {r} was started with other arguments than rank 0 (`{}` against `{}`); every rank must run the same command",
                    argv_r.replace('\0', " "),
                    argv0.replace('\0', " ")
                );
            }
        }
        Ok(Rank { comm, seed })
    }

    /// Every rank's `mine`, in rank order: counts for a summary of the whole job.
    pub(crate) fn gather_counts<const N: usize>(
        &self,
        tag: &str,
        mine: [u64; N],
    ) -> anyhow::Result<Vec<[u64; N]>> {
        let bytes: Vec<u8> = mine.iter().flat_map(|c| c.to_le_bytes()).collect();
        let all = self
            .comm
            .control()
            .all_gather(tag, &bytes)
            .with_context(|| format!("gathering every rank's {tag}"))?;
        all.iter()
            .enumerate()
            .map(|(r, b)| {
                anyhow::ensure!(b.len() == 8 * N, "rank {r} sent {} bytes of {tag}", b.len());
                Ok(std::array::from_fn(|i| {
                    u64::from_le_bytes(b[8 * i..8 * i + 8].try_into().expect("8 bytes"))
                }))
            })
            .collect()
    }
}

/// This process's arguments as a rank sees them (without the program and `--rank-child`).
fn rank_argv() -> Vec<String> {
    std::env::args()
        .skip(1)
        .filter(|a| a != "--rank-child")
        .collect()
}

/// A seed nobody chose: the clock and the process id, mixed.
fn fresh_seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    symmcomm::lab::fill::splitmix64(t ^ u64::from(std::process::id()))
}

/// Where a command's ranks ran.
#[derive(Debug)]
pub(crate) enum Ran<T> {
    /// This process launched one process per GPU; this is their exit code.
    Launched(ExitCode),
    /// What the ranks of this process returned, in rank order: every rank's (thread ranks) or
    /// this process's one (a launched rank).
    Here(Vec<T>),
}

impl Plan {
    /// The number of ranks of the job, where known before it starts.
    pub(crate) fn world(&self) -> Option<usize> {
        match self {
            Plan::Threads { world, .. } => Some(*world),
            Plan::Parent { nproc } => Some(*nproc),
            Plan::Child { world, .. } => *world,
        }
    }

    /// Run `body` on every rank of the plan, each rank having joined the job first
    /// ([`Rank::join`]). `parent_env` goes to the processes a parent launches.
    pub(crate) fn run<T: Send>(
        self,
        args: &RankArgs,
        parent_env: Vec<(String, String)>,
        body: impl Fn(&Rank<'_>) -> anyhow::Result<T> + Sync,
    ) -> anyhow::Result<Ran<T>> {
        match self {
            Plan::Parent { nproc } => launch_self(nproc, parent_env).map(Ran::Launched),
            Plan::Threads { world, config } => {
                on_threads(world, &config, |comm| body(&Rank::join(comm, args)?)).map(Ran::Here)
            }
            Plan::Child { config, .. } => {
                let boot = Bootstrap::from_env(config.timeout)
                    .context("joining the job (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)")?;
                let comm = Communicator::new(boot, config)?;
                let rank = Rank::join(&comm, args)?;
                Ok(Ran::Here(vec![body(&rank)?]))
            }
        }
    }
}

/// Launch `nproc` copies of this process with the same arguments plus `--rank-child`.
fn launch_self(nproc: usize, extra_env: Vec<(String, String)>) -> anyhow::Result<ExitCode> {
    let exe = std::env::current_exe().context("finding this executable")?;
    let mut args = rank_argv();
    args.push("--rank-child".into());
    let mut spec = symmcomm_lab::launch::LaunchSpec::new(nproc, exe, args);
    spec.extra_env = extra_env;
    let report = symmcomm_lab::launch::launch(&spec)?;
    if !report.success() {
        eprintln!("{report}");
    }
    Ok(ExitCode::from(report.exit_code().clamp(0, 255) as u8))
}

/// Run `body` on `world` thread ranks and return every rank's result, or the error of the rank
/// that failed first (named by its rank). A failing rank aborts the others, so that none waits
/// for it until its deadline.
fn on_threads<T: Send>(
    world: usize,
    config: &CommConfig,
    body: impl Fn(&Communicator) -> anyhow::Result<T> + Sync,
) -> anyhow::Result<Vec<T>> {
    // The library's harness carries library errors; keep the body's own error text.
    let failures = std::sync::Mutex::new(Vec::new());
    let results = symmcomm::run_rank_threads(world, config, |comm| match body(comm) {
        Ok(x) => Ok(Some(x)),
        Err(e) => {
            let mut failures = failures.lock().unwrap_or_else(|p| p.into_inner());
            if failures.is_empty() {
                symmcomm::abort_all(&format!("rank {} failed", comm.rank()));
            }
            failures.push((comm.rank(), format!("{e:#}")));
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
    // The first failure in time is the cause; the others are its consequences.
    let failures = failures.into_inner().unwrap_or_else(|p| p.into_inner());
    if let Some((r, e)) = failures.first() {
        bail!("rank {r}: {e}");
    }
    Ok(out)
}
