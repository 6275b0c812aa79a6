//! The `torchrun`-style launcher behind `symmcomm launch --nproc N -- CMD ARGS`: starts `N`
//! ranks of a program on this node with the torchrun variables set, prefixes their output with
//! `[rank R] ` (the global rank), and stops them all at the first failure or at the timeout.
//!
//! A job of several nodes runs one launcher per node (`--nnodes`, `--node-rank`, the same
//! `--master-addr` and `--master-port` everywhere): rank `R = node_rank · nproc + local`, and
//! `GROUP_RANK` / `NODE_RANK` name the node. On one machine, `--simulate-hosts K` splits the
//! node's ranks into `K` hosts of `nproc / K` consecutive ranks: each gets its host's
//! `SYMMCOMM_HOST_ID` and `NCCL_HOSTID`, so that symmcomm sees several NVLink domains and NCCL
//! several nodes, which it connects with its network transport over loopback
//! (`NCCL_SOCKET_IFNAME=lo`, `NCCL_IB_DISABLE=1`, `NCCL_MNNVL_ENABLE=0`, unless the caller set
//! them). `LOCAL_RANK` stays the rank's place on the machine, which picks its GPU.
//!
//! Children inherit the launcher's environment (so `NCCL_NVLS_ENABLE=0` set by the caller
//! reaches them), then get the torchrun variables, then `extra_env`. On Linux each child
//! is killed by the kernel if the launcher dies (`PR_SET_PDEATHSIG`); the signal is tied to the
//! thread that called [`launch`], which stays inside it until every child has exited.

// The crate's one error enum is larger than clippy's threshold; boxing it is error.rs's call.

use std::fmt;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use tracing::{debug, warn};

use symmcomm::bootstrap::{LaunchEnv, free_port};
use symmcomm::{Error, Op, OpCtx, Result};

/// How often the launcher looks at its children.
const POLL: Duration = Duration::from_millis(10);
/// How long the launcher waits for the output of exited children to drain.
const DRAIN: Duration = Duration::from_secs(2);

/// NCCL's transport settings for hosts simulated on one machine, each set only when the
/// caller's environment does not have it: sockets over loopback, no InfiniBand, no multi-node
/// NVLink (which would join the simulated hosts into one NVLink domain again).
pub const SIMULATED_HOSTS_NCCL_ENV: [(&str, &str); 3] = [
    ("NCCL_SOCKET_IFNAME", "lo"),
    ("NCCL_IB_DISABLE", "1"),
    ("NCCL_MNNVL_ENABLE", "0"),
];

/// What to launch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LaunchSpec {
    /// Number of ranks (processes) to start on this node.
    pub nproc: usize,
    /// Number of nodes of the job, each running one launcher with the same `nproc`.
    pub nnodes: usize,
    /// This node's index among them (`GROUP_RANK`); its ranks are `node_rank · nproc ..`.
    pub node_rank: usize,
    /// Split this node's ranks into this many simulated hosts (see the module's comment).
    pub simulate_hosts: Option<usize>,
    /// The program every rank runs.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<String>,
    /// `MASTER_ADDR` given to the ranks (rank 0 listens there).
    pub master_addr: String,
    /// `MASTER_PORT`; `None` picks a free port on `master_addr`.
    pub master_port: Option<u16>,
    /// Kill every rank when this much time has passed; `None` waits for ever.
    pub timeout: Option<Duration>,
    /// More variables for every rank, set after (and over) the torchrun ones.
    pub extra_env: Vec<(String, String)>,
}

impl LaunchSpec {
    /// `nproc` ranks of `program args` on loopback, with a free port, no timeout and no extra
    /// variables.
    pub fn new(nproc: usize, program: impl Into<PathBuf>, args: Vec<String>) -> Self {
        LaunchSpec {
            nproc,
            nnodes: 1,
            node_rank: 0,
            simulate_hosts: None,
            program: program.into(),
            args,
            master_addr: "127.0.0.1".into(),
            master_port: None,
            timeout: None,
            extra_env: Vec::new(),
        }
    }
}

/// How a rank ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RankStatus {
    /// It exited with this code.
    Code(i32),
    /// It was ended by this signal, not sent by the launcher.
    Signal(i32),
    /// The launcher killed it (another rank failed first, or the timeout passed).
    Killed,
}

impl RankStatus {
    /// Whether the rank exited with code 0.
    pub fn is_success(self) -> bool {
        self == RankStatus::Code(0)
    }
}

impl fmt::Display for RankStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RankStatus::Code(c) => write!(f, "exit code {c}"),
            RankStatus::Signal(s) => write!(f, "signal {s}"),
            RankStatus::Killed => f.write_str("killed by the launcher"),
        }
    }
}

/// One rank's end.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RankExit {
    /// The rank.
    pub rank: usize,
    /// How it ended.
    pub status: RankStatus,
    /// Whether this is the failure that made the launcher stop the others.
    pub first_failure: bool,
}

/// How a launch ended: every rank's status, in rank order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LaunchReport {
    /// One entry per rank, in rank order.
    pub ranks: Vec<RankExit>,
    /// Set when the timeout passed and the launcher killed the ranks still running.
    pub timed_out: Option<Duration>,
}

impl LaunchReport {
    /// Whether every rank exited with code 0.
    pub fn success(&self) -> bool {
        self.timed_out.is_none() && self.ranks.iter().all(|r| r.status.is_success())
    }

    /// The rank whose failure stopped the launch, if one did.
    pub fn first_failure(&self) -> Option<&RankExit> {
        self.ranks.iter().find(|r| r.first_failure)
    }

    /// The exit code for the launcher's own process: 0 on success, the first failure's exit
    /// code when it has one, else 1.
    pub fn exit_code(&self) -> i32 {
        if self.success() {
            return 0;
        }
        match self.first_failure().map(|r| r.status) {
            Some(RankStatus::Code(c)) if c != 0 => c,
            _ => 1,
        }
    }
}

impl fmt::Display for LaunchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.success() {
            return write!(f, "all {} ranks exited with code 0", self.ranks.len());
        }
        match (self.first_failure(), self.timed_out) {
            (Some(r), _) => write!(f, "rank {} failed first ({})", r.rank, r.status)?,
            (None, Some(t)) => write!(f, "timed out after {t:?}")?,
            (None, None) => f.write_str("failed")?,
        }
        for r in &self.ranks {
            if !r.first_failure {
                write!(f, "; rank {}: {}", r.rank, r.status)?;
            }
        }
        Ok(())
    }
}

fn launch_ctx(rank: usize, world: usize) -> OpCtx {
    OpCtx {
        op: Op::Init,
        group: "launch".into(),
        rank,
        world,
        bytes: 0,
    }
}

impl LaunchSpec {
    /// The global rank of this node's `local`-th rank.
    pub fn global_rank(&self, local: usize) -> usize {
        self.node_rank * self.nproc + local
    }

    /// Ranks of the whole job.
    pub fn world(&self) -> usize {
        self.nnodes * self.nproc
    }

    /// The simulated host of this node's `local`-th rank, if hosts are simulated:
    /// `sim-host-H`, numbered across the job's nodes.
    pub fn simulated_host(&self, local: usize) -> Option<String> {
        let k = self.simulate_hosts?;
        let per_host = self.nproc / k;
        Some(format!(
            "sim-host-{}",
            self.node_rank * k + local / per_host
        ))
    }

    /// Why this launch cannot be made, if it cannot.
    fn validate(&self) -> std::result::Result<(), String> {
        if self.nproc == 0 {
            return Err("launch needs at least one process (--nproc 0)".into());
        }
        if self.nnodes == 0 || self.node_rank >= self.nnodes {
            return Err(format!(
                "--node-rank {} is outside the job's {} nodes (--nnodes)",
                self.node_rank, self.nnodes
            ));
        }
        if self.nnodes > 1 && self.master_port.is_none() {
            return Err(format!(
                "a job of {} nodes needs --master-port, the same on every node's launcher",
                self.nnodes
            ));
        }
        if let Some(k) = self.simulate_hosts
            && (k == 0 || !self.nproc.is_multiple_of(k))
        {
            return Err(format!(
                "--simulate-hosts {k} does not split this node's {} ranks into hosts of equal size",
                self.nproc
            ));
        }
        Ok(())
    }
}

/// Start `spec.nproc` ranks and wait for them: returns when all have exited, or after killing
/// the others when one fails (non-zero exit or a signal) or the timeout passes. `Err` only when
/// the launch itself could not be made (a bad spec, no free port, a rank that would not start).
pub fn launch(spec: &LaunchSpec) -> Result<LaunchReport> {
    if let Err(detail) = spec.validate() {
        return Err(Error::InvalidArgument {
            ctx: launch_ctx(spec.global_rank(0), spec.world()),
            detail,
        });
    }
    let port = match spec.master_port {
        Some(p) => p,
        None => free_port(&spec.master_addr)?,
    };
    let start = Instant::now();
    let deadline = spec.timeout.map(|t| start + t);
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let (mut children, readers) = start_ranks(spec, port, done_tx)?;
    let mut watch = RankWatch::new(spec.nproc);
    watch.until_all_exited(&mut children, deadline, spec.timeout);
    drain_output(&done_rx, readers);
    Ok(watch.into_report(spec.global_rank(0)))
}

/// Start every rank with its output copied through a prefixer thread; each thread sends on
/// `done` at its EOF. Returns the children in rank order and the number of prefixer threads.
/// When a rank will not start, the ones started are killed.
fn start_ranks(
    spec: &LaunchSpec,
    port: u16,
    done: mpsc::Sender<()>,
) -> Result<(Vec<Child>, usize)> {
    let n = spec.nproc;
    let mut children: Vec<Child> = Vec::with_capacity(n);
    let mut readers = 0usize;
    for local in 0..n {
        let rank = spec.global_rank(local);
        let mut cmd = rank_command(spec, local, port);
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                kill_all(&mut children);
                return Err(Error::io(
                    format!(
                        "launch: starting rank {rank} of {}: {}",
                        spec.world(),
                        spec.program.display()
                    ),
                    e,
                ));
            }
        };
        debug!("launch: rank {rank} is pid {}", child.id());
        if let Some(out) = child.stdout.take() {
            readers += spawn_prefixer(rank, out, false, done.clone());
        }
        if let Some(err) = child.stderr.take() {
            readers += spawn_prefixer(rank, err, true, done.clone());
        }
        children.push(child);
    }
    Ok((children, readers))
}

/// The variables of this node's `local`-th rank: torchrun's, the node's (several nodes), its
/// simulated host's and NCCL's transport settings for simulated hosts (unless the launcher's
/// own environment, `get`, has them).
pub fn rank_env(
    spec: &LaunchSpec,
    local: usize,
    port: u16,
    get: impl Fn(&str) -> Option<String>,
) -> LaunchEnv {
    let (n, rank) = (spec.nproc, spec.global_rank(local));
    let mut env = LaunchEnv::for_rank(rank, spec.world(), local, n, &spec.master_addr, port);
    if spec.nnodes > 1 {
        env = env.on_node(spec.node_rank);
    }
    if let Some(host) = spec.simulated_host(local) {
        env = env.on_simulated_host(&host);
        for (name, value) in SIMULATED_HOSTS_NCCL_ENV {
            if get(name).is_none() {
                env.vars.push((name.into(), value.into()));
            }
        }
    }
    env
}

/// The command of this node's `local`-th rank: the program with the launcher's environment,
/// [`rank_env`] and `extra_env`, no stdin, piped output, killed if the launcher dies.
fn rank_command(spec: &LaunchSpec, local: usize, port: u16) -> Command {
    let env = rank_env(spec, local, port, |k| std::env::var(k).ok());
    let mut cmd = Command::new(&spec.program);
    cmd.args(&spec.args)
        .envs(env.vars.iter().map(|(k, v)| (k, v)))
        .envs(spec.extra_env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    die_with_parent(&mut cmd);
    cmd
}

/// What the launcher knows of its ranks while it waits for them.
struct RankWatch {
    /// How each rank ended, once it has.
    status: Vec<Option<RankStatus>>,
    /// Ranks the launcher killed (or tried to).
    killed: Vec<bool>,
    /// The first rank that failed on its own (not killed by the launcher).
    first_failure: Option<usize>,
    /// Set when the timeout passed before any rank failed.
    timed_out: Option<Duration>,
    /// The launcher has started killing the ranks still running.
    stopping: bool,
}

impl RankWatch {
    fn new(n: usize) -> Self {
        RankWatch {
            status: vec![None; n],
            killed: vec![false; n],
            first_failure: None,
            timed_out: None,
            stopping: false,
        }
    }

    /// Poll the children every [`POLL`] until all have exited; at the first failure or when
    /// `deadline` passes, kill the ones still running.
    fn until_all_exited(
        &mut self,
        children: &mut [Child],
        deadline: Option<Instant>,
        timeout: Option<Duration>,
    ) {
        loop {
            self.collect_exits(children);
            if self.status.iter().all(Option::is_some) {
                break;
            }
            let expired = deadline.is_some_and(|d| Instant::now() >= d);
            if (self.first_failure.is_some() || expired) && !self.stopping {
                self.stop(children, expired, timeout);
            }
            thread::sleep(POLL);
        }
    }

    /// Record every child that has exited since the last look; a child that cannot be waited
    /// for is killed.
    fn collect_exits(&mut self, children: &mut [Child]) {
        for (rank, child) in children.iter_mut().enumerate() {
            if self.status[rank].is_some() {
                continue;
            }
            match child.try_wait() {
                Ok(Some(st)) => {
                    let s = rank_status(st, self.killed[rank]);
                    debug!("launch: rank {rank} ended: {s}");
                    if !s.is_success() && self.first_failure.is_none() && !self.killed[rank] {
                        self.first_failure = Some(rank);
                    }
                    self.status[rank] = Some(s);
                }
                Ok(None) => {}
                Err(e) => {
                    warn!("launch: waiting for rank {rank}: {e}; killing it");
                    let _ = child.kill();
                    self.killed[rank] = true;
                }
            }
        }
    }

    /// Say why the launch stops (the timeout, when it `expired` before any failure, or the
    /// first failure) and kill every rank still running.
    fn stop(&mut self, children: &mut [Child], expired: bool, timeout: Option<Duration>) {
        self.stopping = true;
        if expired && self.first_failure.is_none() {
            self.timed_out = timeout;
            warn!("launch: timeout of {timeout:?} passed; killing every rank");
        } else if let Some(f) = self.first_failure {
            warn!("launch: rank {f} failed; killing the other ranks");
        }
        for (rank, child) in children.iter_mut().enumerate() {
            if self.status[rank].is_none() && !self.killed[rank] {
                if let Err(e) = child.kill() {
                    debug!("launch: killing rank {rank}: {e}");
                }
                self.killed[rank] = true;
            }
        }
    }

    /// Every rank's end, in rank order (a rank never seen to exit counts as killed); this
    /// node's ranks start at global rank `first`.
    fn into_report(self, first: usize) -> LaunchReport {
        let first_failure = self.first_failure;
        let ranks = self
            .status
            .into_iter()
            .enumerate()
            .map(|(local, s)| RankExit {
                rank: first + local,
                status: s.unwrap_or(RankStatus::Killed),
                first_failure: first_failure == Some(local),
            })
            .collect();
        LaunchReport {
            ranks,
            timed_out: self.timed_out,
        }
    }
}

/// Wait up to [`DRAIN`] for the `readers` prefixer threads to reach their EOF: exited children
/// close their pipes, but a grandchild holding one open must not hang us.
fn drain_output(done: &mpsc::Receiver<()>, readers: usize) {
    let drain_deadline = Instant::now() + DRAIN;
    for _ in 0..readers {
        let left = drain_deadline.saturating_duration_since(Instant::now());
        if done.recv_timeout(left).is_err() {
            warn!(
                "launch: some rank output is still open {DRAIN:?} after every rank exited (a process they started?); not waiting for it"
            );
            break;
        }
    }
}

fn rank_status(st: ExitStatus, killed_by_us: bool) -> RankStatus {
    if let Some(c) = st.code() {
        return RankStatus::Code(c);
    }
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(sig) = st.signal() {
            if killed_by_us && sig == libc::SIGKILL {
                return RankStatus::Killed;
            }
            return RankStatus::Signal(sig);
        }
    }
    if killed_by_us {
        RankStatus::Killed
    } else {
        RankStatus::Signal(-1)
    }
}

fn kill_all(children: &mut [Child]) {
    for c in children.iter_mut() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// Copy `pipe` to the launcher's stdout or stderr, a line at a time, each prefixed with
/// `[rank N] `. Returns the number of threads started (0 or 1); each sends on `done` at EOF.
fn spawn_prefixer(
    rank: usize,
    pipe: impl Read + Send + 'static,
    to_stderr: bool,
    done: mpsc::Sender<()>,
) -> usize {
    let name = format!(
        "symmcomm-launch-rank{rank}-{}",
        if to_stderr { "err" } else { "out" }
    );
    let spawned = thread::Builder::new().name(name).spawn(move || {
        let prefix = format!("[rank {rank}] ");
        let mut reader = BufReader::new(pipe);
        let mut line = Vec::new();
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) => break,
                Ok(_) => {
                    let mut out = Vec::with_capacity(prefix.len() + line.len() + 1);
                    out.extend_from_slice(prefix.as_bytes());
                    out.extend_from_slice(&line);
                    if !line.ends_with(b"\n") {
                        out.push(b'\n');
                    }
                    // One write per line, so lines of different ranks never interleave.
                    let res = if to_stderr {
                        let mut e = io::stderr().lock();
                        e.write_all(&out).and_then(|()| e.flush())
                    } else {
                        let mut o = io::stdout().lock();
                        o.write_all(&out).and_then(|()| o.flush())
                    };
                    if res.is_err() {
                        // Our own output is gone; keep draining so the child never blocks.
                        continue;
                    }
                }
                Err(e) => {
                    debug!("launch: reading the output of rank {rank}: {e}");
                    break;
                }
            }
        }
        let _ = done.send(());
    });
    match spawned {
        Ok(_) => 1,
        Err(e) => {
            warn!("launch: cannot start the output thread of rank {rank}: {e}");
            0
        }
    }
}

/// Ask the kernel to SIGKILL the child when the launcher dies.
#[cfg(target_os = "linux")]
fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: `getpid` has no preconditions.
    let launcher = unsafe { libc::getpid() };
    // Runs in the child between fork and exec: only async-signal-safe work (two system calls,
    // a captured integer, an `io::Error` built from an errno value without allocating).
    let hook = move || -> io::Result<()> {
        // SAFETY: PR_SET_PDEATHSIG takes a signal number; the other arguments are unused.
        let rc = unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // The launcher may have died before prctl took effect: then nobody would kill us.
        // SAFETY: `getppid` has no preconditions.
        if unsafe { libc::getppid() } != launcher {
            return Err(io::Error::from_raw_os_error(libc::ESRCH));
        }
        Ok(())
    };
    // SAFETY: `hook` runs between fork and exec and makes only async-signal-safe calls
    // (`prctl`, `getppid`, reading errno); it allocates nothing and takes no lock.
    unsafe {
        cmd.pre_exec(hook);
    }
}

#[cfg(not(target_os = "linux"))]
fn die_with_parent(_cmd: &mut Command) {}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(statuses: &[(RankStatus, bool)], timed_out: Option<Duration>) -> LaunchReport {
        LaunchReport {
            ranks: statuses
                .iter()
                .enumerate()
                .map(|(rank, &(status, first_failure))| RankExit {
                    rank,
                    status,
                    first_failure,
                })
                .collect(),
            timed_out,
        }
    }

    #[test]
    fn report_codes() {
        let ok = report(&[(RankStatus::Code(0), false); 3], None);
        assert!(ok.success());
        assert_eq!(ok.exit_code(), 0);
        let failed = report(
            &[
                (RankStatus::Killed, false),
                (RankStatus::Code(3), true),
                (RankStatus::Code(0), false),
            ],
            None,
        );
        assert!(!failed.success());
        assert_eq!(failed.exit_code(), 3);
        assert_eq!(failed.first_failure().map(|r| r.rank), Some(1));
        let s = failed.to_string();
        assert!(s.starts_with("rank 1 failed first (exit code 3)"), "{s}");
        let signal = report(&[(RankStatus::Signal(11), true)], None);
        assert_eq!(signal.exit_code(), 1);
        let timeout = report(&[(RankStatus::Killed, false)], Some(Duration::from_secs(1)));
        assert!(!timeout.success());
        assert_eq!(timeout.exit_code(), 1);
        assert!(timeout.to_string().contains("timed out"));
    }

    #[test]
    fn nodes_and_simulated_hosts_name_every_rank() {
        let mut spec = LaunchSpec::new(4, "/bin/true", vec![]);
        spec.nnodes = 2;
        spec.node_rank = 1;
        spec.master_port = Some(29400);
        spec.simulate_hosts = Some(2);
        assert_eq!(spec.validate(), Ok(()));
        let env = rank_env(&spec, 3, 29400, |k| {
            (k == "NCCL_IB_DISABLE").then(|| "0".to_string())
        });
        for (name, value) in [
            ("RANK", "7"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "3"),
            ("LOCAL_WORLD_SIZE", "4"),
            ("GROUP_RANK", "1"),
            ("NODE_RANK", "1"),
            ("SYMMCOMM_HOST_ID", "sim-host-3"),
            ("NCCL_HOSTID", "sim-host-3"),
            ("NCCL_SOCKET_IFNAME", "lo"),
            ("NCCL_MNNVL_ENABLE", "0"),
        ] {
            assert_eq!(env.get(name), Some(value), "{name}");
        }
        // The caller's own NCCL setting stays: the launcher does not add its own.
        assert_eq!(env.get("NCCL_IB_DISABLE"), None);
        assert_eq!(spec.simulated_host(0).as_deref(), Some("sim-host-2"));
        // One node, no simulation: exactly torchrun's six variables.
        let plain = LaunchSpec::new(2, "/bin/true", vec![]);
        assert_eq!(rank_env(&plain, 1, 1, |_| None).vars.len(), 6);
    }

    #[test]
    fn bad_node_and_host_layouts_are_refused() {
        let mut spec = LaunchSpec::new(4, "/bin/true", vec![]);
        spec.nnodes = 2;
        assert!(spec.validate().unwrap_err().contains("--master-port"));
        spec.master_port = Some(1);
        spec.node_rank = 2;
        assert!(spec.validate().unwrap_err().contains("--node-rank 2"));
        spec.node_rank = 0;
        spec.simulate_hosts = Some(3);
        assert!(spec.validate().unwrap_err().contains("--simulate-hosts 3"));
        assert!(matches!(launch(&spec), Err(Error::InvalidArgument { .. })));
    }

    #[test]
    fn zero_processes_is_an_error() {
        let spec = LaunchSpec::new(0, "/bin/true", vec![]);
        assert!(matches!(launch(&spec), Err(Error::InvalidArgument { .. })));
    }

    #[test]
    fn missing_program_is_an_error() {
        let spec = LaunchSpec::new(2, "/nonexistent/symmcomm-test-program", vec![]);
        match launch(&spec) {
            Err(Error::Io { context, .. }) => assert!(context.contains("rank 0"), "{context}"),
            other => panic!("{other:?}"),
        }
    }
}
