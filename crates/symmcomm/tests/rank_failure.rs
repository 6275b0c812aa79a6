//! A rank dies (SIGKILL) in the middle of collectives: every surviving rank returns an error
//! naming its rank, group, operation and size within the deadline + 1 s, every later call fails
//! at once, and nothing hangs (dropping the communicator included). On the host backend with
//! one process per rank (the data plane goes through the job's store), killing an ordinary rank
//! and killing rank 0 (which serves the store); on GPUs with one process per GPU. And inside one
//! process: one communicator's deadline aborts every other communicator of the process. And on
//! GPUs, NCCL communicator creation: a peer that passed our control plane's handshake but never
//! makes the NCCL call (`ncclCommInitRankConfig`, `ncclCommSplit`) is an error within the
//! deadline + 1 s, not a hang, and the process still exits.
//!
//! Ranks are this test binary run again with `SYMMCOMM_TEST_CHILD` naming the role; without it
//! the `child_…` tests return at once. Times are compared on the host's wall clock (ms since the
//! epoch), which every process shares.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::TestBackend;
use common::procs::{self, Proc, ROLE, after, env_u64, epoch_ms, role_is};
use symmcomm::bootstrap::{Bootstrap, free_port};
use symmcomm::lab::test_hooks::{NcclCreation, skip_next_nccl_creation};
use symmcomm::{
    BackendChoice, Collective, CommConfig, Communicator, DType, Error, GroupKind, Impl, ReduceOp,
    TableSource,
};

const BACKEND: &str = "SYMMCOMM_TEST_BACKEND";
const DEADLINE_MS: &str = "SYMMCOMM_TEST_DEADLINE_MS";
const ELEMS: &str = "SYMMCOMM_TEST_ELEMS";
const CREATION: &str = "SYMMCOMM_TEST_CREATION";
/// The all-reduce implementation a rank loops on (`auto` unless named).
const IMPL: &str = "SYMMCOMM_TEST_IMPL";

fn variant(e: &Error) -> &'static str {
    match e {
        Error::Timeout { .. } => "Timeout",
        Error::Aborted { .. } => "Aborted",
        Error::Nccl { .. } => "Nccl",
        Error::Io { .. } => "Io",
        Error::RendezvousFailed { .. } => "RendezvousFailed",
        _ => "Other",
    }
}

fn config(backend: BackendChoice, deadline: Duration) -> CommConfig {
    CommConfig {
        backend,
        timeout: deadline,
        table: TableSource::None,
        ..CommConfig::default()
    }
}

/// Rank `r`'s input at iteration `it`: small integers, so f32 sums are exact.
fn input(rank: usize, it: u64, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((rank + 1) * 1000 + (i % 500)) as f32 + (it % 7) as f32)
        .collect()
}

/// Checked all-reduces, then collectives in a loop until one fails; prints what failed, when,
/// how fast a later call fails, and how long dropping the communicator took.
#[test]
fn child_rank() {
    if !role_is("rank") {
        return;
    }
    let deadline = Duration::from_millis(env_u64(DEADLINE_MS));
    let n = env_u64(ELEMS) as usize;
    let backend = match std::env::var(BACKEND).as_deref() {
        Ok("cuda") => BackendChoice::Cuda,
        _ => BackendChoice::Host,
    };
    let boot = Bootstrap::from_env(Duration::from_secs(60)).expect("rendezvous");
    let comm = match Communicator::new(boot, config(backend, deadline)) {
        Ok(c) => c,
        Err(e) => {
            println!("RESULT Init {} {e}", epoch_ms());
            std::process::exit(0);
        }
    };
    let g = comm.world().clone();
    let (rank, world) = (g.rank(), g.size());
    let imp: Impl = std::env::var(IMPL)
        .unwrap_or_else(|_| "auto".into())
        .parse()
        .expect("an implementation");
    let on = g.clone();
    let all_reduce = move |x: &symmcomm::Tensor, y: &symmcomm::Tensor| {
        on.collective(Collective::AllReduce(ReduceOp::Sum), x, y, None, imp)
    };
    let x = g.alloc_symmetric(DType::F32, &[n]).expect("alloc");
    let y = g.alloc_symmetric(DType::F32, &[n]).expect("alloc");
    // The data plane works before anything dies: three checked all-reduces.
    for it in 0..3u64 {
        g.upload(&x, &input(rank, it, n)).expect("upload");
        g.poison(&y).expect("poison");
        all_reduce(&x, &y).expect("all_reduce");
        let got: Vec<f32> = g.download(&y).expect("download");
        let all: Vec<Vec<f32>> = (0..world).map(|r| input(r, it, n)).collect();
        let want: Vec<f64> = (0..n)
            .map(|i| all.iter().map(|v| v[i] as f64).sum())
            .collect();
        let wrong = (0..n).filter(|&i| got[i] as f64 != want[i]).count();
        assert_eq!(
            wrong, 0,
            "rank {rank}: {wrong} of {n} wrong at iteration {it}"
        );
    }
    println!(
        "CHECKED {} on {} ({}, {})",
        g.describe(),
        comm.describe(),
        g.topology(),
        imp.name(comm.backend())
    );
    println!("LOOPING");
    let err = loop {
        if let Err(e) = all_reduce(&x, &y).and_then(|_| comm.synchronize()) {
            break e;
        }
    };
    println!("RESULT {} {} {err}", variant(&err), epoch_ms());
    let t = Instant::now();
    let later = all_reduce(&x, &y).map(|_| ());
    let later = later.and_then(|()| comm.synchronize());
    match later {
        Ok(()) => println!("AFTER Ok {}", t.elapsed().as_millis()),
        Err(e) => println!("AFTER {} {} {e}", variant(&e), t.elapsed().as_millis()),
    }
    let t = Instant::now();
    drop((x, y, all_reduce, g, comm));
    println!("DROPPED {}", t.elapsed().as_millis());
    std::process::exit(0);
}

/// What a survivor reported.
#[derive(Debug)]
struct Survivor {
    rank: usize,
    variant: String,
    at_ms: u64,
    message: String,
    after: String,
    output: Vec<String>,
}

/// Where the ranks of a failure test sit, and what they loop on.
#[derive(Clone, Copy, Debug)]
struct Layout {
    /// Ranks per simulated host (`SYMMCOMM_HOST_ID`); `None`: this machine's identity.
    per_host: Option<usize>,
    /// The all-reduce implementation of the loop.
    imp: &'static str,
}

const ONE_HOST: Layout = Layout {
    per_host: None,
    imp: "auto",
};

fn spawn_rank(
    rank: usize,
    world: usize,
    port: u16,
    backend: &str,
    deadline_ms: u64,
    layout: Layout,
) -> Proc {
    let mut env = vec![(IMPL, layout.imp.to_string())];
    if let Some(per) = layout.per_host {
        let host = format!("sim-host-{}", rank / per);
        env.push(("SYMMCOMM_HOST_ID", host.clone()));
        env.push(("NCCL_HOSTID", host));
        for (k, v) in symmcomm_lab::launch::SIMULATED_HOSTS_NCCL_ENV {
            if std::env::var(k).is_err() {
                env.push((k, v.into()));
            }
        }
    }
    procs::spawn(
        &format!("rank {rank}"),
        "child_rank",
        &[
            env,
            vec![
                (ROLE, "rank".into()),
                (BACKEND, backend.into()),
                (DEADLINE_MS, deadline_ms.to_string()),
                (ELEMS, 16384.to_string()),
                ("RANK", rank.to_string()),
                ("LOCAL_RANK", rank.to_string()),
                ("WORLD_SIZE", world.to_string()),
                ("MASTER_ADDR", "127.0.0.1".into()),
                ("MASTER_PORT", port.to_string()),
                ("NCCL_NVLS_ENABLE", "0".into()),
            ],
        ]
        .concat(),
    )
}

/// Start `world` ranks, let them loop collectives, SIGKILL `victim`, and check every survivor.
fn kill_one(backend: &str, world: usize, victim: usize, deadline_ms: u64) {
    kill_one_in(backend, world, victim, deadline_ms, ONE_HOST);
}

/// [`kill_one`] with the ranks placed and looping as `layout` says.
fn kill_one_in(backend: &str, world: usize, victim: usize, deadline_ms: u64, layout: Layout) {
    let port = free_port("127.0.0.1").expect("free port");
    let mut ranks: Vec<Proc> = (0..world)
        .map(|r| spawn_rank(r, world, port, backend, deadline_ms, layout))
        .collect();
    let start_by = Instant::now() + Duration::from_secs(120);
    for p in &mut ranks {
        let checked = p.wait_line("CHECKED", start_by);
        println!("{}: {checked}", p.name);
        p.wait_line("LOOPING", start_by);
    }
    std::thread::sleep(Duration::from_millis(300));
    let killed_at = epoch_ms();
    ranks[victim].child.kill().expect("SIGKILL the victim");
    let _ = ranks[victim].child.wait();
    let end_by = Instant::now() + Duration::from_millis(deadline_ms + 30_000);
    let survivors: Vec<Survivor> = ranks
        .into_iter()
        .enumerate()
        .filter(|(r, _)| *r != victim)
        .map(|(rank, p)| {
            let output = p.finish(end_by);
            let res = output
                .iter()
                .find_map(|l| after(l, "RESULT "))
                .unwrap_or_else(|| {
                    panic!("rank {rank}: no RESULT; output:\n{}", output.join("\n"))
                });
            let mut it = res.splitn(3, ' ');
            let variant = it.next().unwrap_or("").to_string();
            let at_ms = it.next().and_then(|v| v.parse().ok()).unwrap_or(u64::MAX);
            let message = it.next().unwrap_or("").to_string();
            let after_line = output
                .iter()
                .find_map(|l| after(l, "AFTER "))
                .unwrap_or("")
                .to_string();
            assert!(
                output.iter().any(|l| l.contains("DROPPED ")),
                "rank {rank}: dropping the communicator did not finish; output:\n{}",
                output.join("\n")
            );
            Survivor {
                rank,
                variant,
                at_ms,
                message,
                after: after_line,
                output,
            }
        })
        .collect();
    for s in &survivors {
        let late = s.at_ms.saturating_sub(killed_at);
        // Shown with --nocapture: what each survivor said and when.
        println!(
            "rank {} failed {late} ms after the kill (deadline {deadline_ms} ms): {} {}",
            s.rank, s.variant, s.message
        );
        println!("rank {}: a later call: {}", s.rank, s.after);
        assert!(
            ["Timeout", "Aborted", "Nccl"].contains(&s.variant.as_str()),
            "rank {}: {} {}; output:\n{}",
            s.rank,
            s.variant,
            s.message,
            s.output.join("\n")
        );
        assert!(
            s.at_ms >= killed_at && late <= deadline_ms + 1000,
            "rank {}: failed {late} ms after the kill, deadline {deadline_ms} ms + 1 s",
            s.rank
        );
        let bytes = format!("({} B)", 16384 * 4);
        let me = format!("rank {}/{world}", s.rank);
        for needle in ["all_reduce", "world", me.as_str(), bytes.as_str()] {
            assert!(
                s.message.contains(needle),
                "rank {}: the error does not name {needle:?}: {}",
                s.rank,
                s.message
            );
        }
        let mut a = s.after.splitn(3, ' ');
        let (v, ms) = (a.next().unwrap_or(""), a.next().unwrap_or(""));
        assert_eq!(v, "Aborted", "rank {}: a later call: {}", s.rank, s.after);
        let ms: u64 = ms.parse().unwrap_or(u64::MAX);
        assert!(
            ms < 1000,
            "rank {}: a later call took {ms} ms to fail",
            s.rank
        );
    }
}

#[test]
fn host_rank_killed_mid_collective() {
    kill_one("host", 3, 2, 2000);
}

#[test]
fn host_master_killed_mid_collective() {
    kill_one("host", 3, 0, 2000);
}

/// A group across two simulated hosts (ranks 0, 1 on one, 2, 3 on the other): the rank
/// killed sits on the other host than ranks 0 and 1, on the same as rank 2.
#[test]
fn host_rank_killed_on_the_other_host() {
    let layout = Layout {
        per_host: Some(2),
        imp: "auto",
    };
    kill_one_in("host", 4, 3, 2000, layout);
}

/// The same while the ranks loop on the hierarchical all-reduce: whichever step a survivor
/// waits in (inside its host, or across), its error names the all-reduce of `world`.
#[test]
fn host_rank_killed_mid_hierarchical_all_reduce() {
    let layout = Layout {
        per_host: Some(2),
        imp: "hierarchical",
    };
    kill_one_in("host", 4, 3, 2000, layout);
}

/// GPU: 2 GPUs as 2 hosts, NCCL between them over sockets; rank 1 (the other host) killed.
#[test]
fn cuda_rank_killed_on_the_other_host() {
    if !TestBackend::Cuda.can_run(2) {
        return;
    }
    let layout = Layout {
        per_host: Some(1),
        imp: "auto",
    };
    kill_one_in("cuda", 2, 1, 5000, layout);
}

#[test]
fn cuda_rank_killed_mid_collective() {
    if !TestBackend::Cuda.can_run(2) {
        return;
    }
    kill_one("cuda", 2, 1, 5000);
}

/// Two jobs of thread ranks in one process: in job A one rank stops taking part; A's deadline
/// aborts job B's communicators too, whose pending calls fail naming their own calls.
#[test]
fn child_two_jobs() {
    if !role_is("two_jobs") {
        return;
    }
    let deadline = Duration::from_millis(1500);
    let cfg = config(BackendChoice::Host, deadline);
    let a = Bootstrap::threads(2, Duration::from_secs(10));
    let b = Bootstrap::threads(2, Duration::from_secs(10));
    let started = Arc::new(std::sync::Barrier::new(4));
    std::thread::scope(|s| {
        let jobs = a.into_iter().map(|x| ("A", x));
        for (job, boot) in jobs.chain(b.into_iter().map(|x| ("B", x))) {
            let (cfg, started) = (cfg.clone(), started.clone());
            s.spawn(move || {
                let comm = Communicator::new(boot, cfg).expect("communicator");
                let g = comm.world();
                let x = g.alloc_symmetric(DType::F32, &[64]).expect("alloc");
                g.fill_random(&x, 1, None).expect("fill");
                started.wait();
                if job == "A" && comm.rank() == 1 {
                    // Alive but silent: never joins the collective.
                    std::thread::sleep(deadline * 2);
                    let t = Instant::now();
                    let e = g.all_reduce(&x, &x, ReduceOp::Sum).unwrap_err();
                    println!(
                        "LATER {job}{} {} {} {e}",
                        comm.rank(),
                        variant(&e),
                        t.elapsed().as_millis()
                    );
                    return;
                }
                let e = loop {
                    if let Err(e) = g.all_reduce(&x, &x, ReduceOp::Sum) {
                        break e;
                    }
                };
                println!(
                    "FAILED {job}{} {} {} {e}",
                    comm.rank(),
                    variant(&e),
                    epoch_ms()
                );
            });
        }
    });
    println!("DONE");
}

#[test]
fn a_deadline_aborts_every_communicator_of_the_process() {
    let p = procs::spawn("two jobs", "child_two_jobs", &[(ROLE, "two_jobs".into())]);
    let out = p.finish(Instant::now() + Duration::from_secs(60));
    let failed: Vec<(String, String, u64, String)> = out
        .iter()
        .filter_map(|l| after(l, "FAILED "))
        .map(|l| {
            let mut it = l.splitn(4, ' ');
            (
                it.next().unwrap_or("").to_string(),
                it.next().unwrap_or("").to_string(),
                it.next().and_then(|v| v.parse().ok()).unwrap_or(u64::MAX),
                it.next().unwrap_or("").to_string(),
            )
        })
        .collect();
    println!("{}", out.join("\n"));
    assert_eq!(
        failed.len(),
        3,
        "three ranks fail; output:\n{}",
        out.join("\n")
    );
    let a0 = failed.iter().find(|f| f.0 == "A0").expect("A0 failed");
    assert_eq!(a0.1, "Timeout", "{a0:?}");
    for needle in ["all_reduce", "world", "rank 0/2", "(256 B)"] {
        assert!(a0.3.contains(needle), "A0 does not name {needle}: {}", a0.3);
    }
    let first = failed.iter().map(|f| f.2).min().unwrap_or(0);
    for f in failed.iter().filter(|f| f.0.starts_with('B')) {
        assert_eq!(f.1, "Aborted", "{f:?}");
        assert!(f.3.contains("all_reduce on world"), "{f:?}");
        assert!(
            f.3.contains("timed out"),
            "B's reason is A's timeout: {f:?}"
        );
        assert!(
            f.2 - first <= 1000,
            "B learnt of the abort {} ms late",
            f.2 - first
        );
    }
    let later = out
        .iter()
        .find_map(|l| after(l, "LATER "))
        .expect("A1's later call");
    assert!(later.starts_with("A1 Aborted "), "{later}");
}

/// One rank of a communicator creation that rank 1 never joins at the NCCL level
/// (`SYMMCOMM_TEST_CREATION`: `init`, the world's `ncclCommInitRankConfig` in
/// `Communicator::new`, or `split`, the `ncclCommSplit` of `Communicator::split`). Both ranks
/// pass the control plane's exchange (the unique id, the split colours); the test hook then makes
/// rank 1 return instead of calling NCCL, and it stays alive and silent past rank 0's deadline.
/// Rank 0 reports its error (and, for a split, a later call on the parent and the drop), then
/// returns: the test harness must end the process with the abandoned creation still in NCCL.
#[test]
fn child_creation() {
    if !role_is("creation") {
        return;
    }
    let deadline = Duration::from_millis(env_u64(DEADLINE_MS));
    let split = match std::env::var(CREATION).as_deref() {
        Ok("init") => false,
        Ok("split") => true,
        other => panic!("{CREATION}={other:?}"),
    };
    let boot = Bootstrap::from_env(Duration::from_secs(60)).expect("rendezvous");
    let rank = boot.rank;
    if rank == 1 && !split {
        skip_next_nccl_creation(NcclCreation::InitRank);
    }
    let started = Instant::now();
    let made = Communicator::new(boot, config(BackendChoice::Cuda, deadline));
    let mut kept = None;
    let res = if split {
        let comm = made.expect("communicator");
        let g = comm.world().clone();
        // A window on the parent, so its teardown after the abandoned split is exercised too.
        let x = g.alloc_symmetric(DType::F32, &[1024]).expect("alloc");
        g.fill_random(&x, 1, None).expect("fill");
        g.all_reduce(&x, &x, ReduceOp::Sum).expect("all_reduce");
        comm.synchronize().expect("synchronize");
        g.barrier().expect("barrier");
        if rank == 1 {
            skip_next_nccl_creation(NcclCreation::Split);
        }
        let started = Instant::now();
        let res = comm.split(GroupKind::Tp, 0).map(|_| ());
        let took = started.elapsed();
        kept = Some((comm, g, x));
        res.map_err(|e| (e, took))
    } else {
        made.map(|_| ()).map_err(|e| (e, started.elapsed()))
    };
    let (err, took) = match res {
        Ok(()) => panic!("rank {rank}: the creation succeeded without rank 1"),
        Err(e) => e,
    };
    if rank == 1 {
        // The moment rank 0's NCCL call began waiting for this rank.
        println!("SKIPPED {} {err}", epoch_ms());
        // Alive and silent past rank 0's deadline; then gone without tearing anything down.
        std::thread::sleep(deadline + Duration::from_secs(2));
        std::process::exit(0);
    }
    println!(
        "RESULT {} {} {} {err}",
        variant(&err),
        epoch_ms(),
        took.as_millis()
    );
    if let Some((comm, g, x)) = kept {
        let t = Instant::now();
        match g.all_reduce(&x, &x, ReduceOp::Sum) {
            Ok(_) => println!("AFTER Ok {}", t.elapsed().as_millis()),
            Err(e) => println!("AFTER {} {} {e}", variant(&e), t.elapsed().as_millis()),
        }
        // Rank 1 leaves 2 s after its deadline; once it is gone the abandoned split may return
        // (and its thread abort the parent) before, during or after this drop.
        std::thread::sleep(Duration::from_secs(3));
        let t = Instant::now();
        drop((x, g, comm));
        println!("DROPPED {}", t.elapsed().as_millis());
    }
    println!("DONE");
}

/// Two processes, one per GPU; rank 1 never makes the NCCL call `which` creates the
/// communicator with. Rank 0 fails with `Timeout` within deadline (2 s) + 1 s of rank 1's
/// return, naming the NCCL call, its rank and the group; the process then exits normally.
fn a_peer_never_joins(which: &str, call: &str, group_needles: &[&str]) {
    if !TestBackend::Cuda.can_run(2) {
        return;
    }
    let deadline_ms = 2000u64;
    let port = free_port("127.0.0.1").expect("free port");
    let ranks: Vec<Proc> = (0..2)
        .map(|rank| {
            procs::spawn(
                &format!("rank {rank}"),
                "child_creation",
                &[
                    (ROLE, "creation".into()),
                    (CREATION, which.into()),
                    (DEADLINE_MS, deadline_ms.to_string()),
                    ("RANK", rank.to_string()),
                    ("LOCAL_RANK", rank.to_string()),
                    ("WORLD_SIZE", "2".into()),
                    ("MASTER_ADDR", "127.0.0.1".into()),
                    ("MASTER_PORT", port.to_string()),
                    ("NCCL_NVLS_ENABLE", "0".into()),
                ],
            )
        })
        .collect();
    // Starting CUDA and NCCL takes seconds; a hang is anything past two minutes.
    let end_by = Instant::now() + Duration::from_secs(120);
    let outputs: Vec<Vec<String>> = ranks.into_iter().map(|p| p.finish(end_by)).collect();
    let (out0, out1) = (&outputs[0], &outputs[1]);
    let all = || format!("rank 0:\n{}\nrank 1:\n{}", out0.join("\n"), out1.join("\n"));
    let skipped = out1
        .iter()
        .find_map(|l| after(l, "SKIPPED "))
        .unwrap_or_else(|| panic!("rank 1 did not skip {call}; {}", all()));
    assert!(skipped.contains("skipped by the test hook"), "{}", all());
    let skipped_at: u64 = skipped
        .split(' ')
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(u64::MAX);
    let result = out0
        .iter()
        .find_map(|l| after(l, "RESULT "))
        .unwrap_or_else(|| panic!("rank 0 reported no error; {}", all()));
    let mut it = result.splitn(4, ' ');
    let variant = it.next().unwrap_or("");
    let at_ms: u64 = it.next().and_then(|v| v.parse().ok()).unwrap_or(u64::MAX);
    let took_ms: u64 = it.next().and_then(|v| v.parse().ok()).unwrap_or(u64::MAX);
    let message = it.next().unwrap_or("");
    let late = at_ms.saturating_sub(skipped_at);
    // Shown with --nocapture.
    println!(
        "rank 0 failed {late} ms after rank 1 skipped {call} ({took_ms} ms in the call that failed; deadline {deadline_ms} ms): {variant} {message}"
    );
    assert_eq!(variant, "Timeout", "{}", all());
    assert!(
        late <= deadline_ms + 1000,
        "rank 0 failed {late} ms after rank 1 skipped {call}: deadline {deadline_ms} ms + 1 s; {}",
        all()
    );
    for needle in [call, "rank 0/2", "a peer did not join", "deadline of 2s"]
        .iter()
        .chain(group_needles)
    {
        assert!(
            message.contains(needle),
            "rank 0's error does not name {needle:?}: {message}"
        );
    }
    if which == "split" {
        let later = out0
            .iter()
            .find_map(|l| after(l, "AFTER "))
            .unwrap_or_else(|| panic!("no later call; {}", all()));
        let mut a = later.splitn(3, ' ');
        let (v, ms) = (a.next().unwrap_or(""), a.next().unwrap_or(""));
        assert_eq!(v, "Aborted", "a later call on the parent: {later}");
        let ms: u64 = ms.parse().unwrap_or(u64::MAX);
        assert!(ms < 1000, "a later call took {ms} ms to fail");
        assert!(
            out0.iter().any(|l| l.contains("DROPPED ")),
            "dropping the communicator did not finish; {}",
            all()
        );
    }
    assert!(
        out0.iter().any(|l| l.contains("DONE")) && out0.iter().any(|l| l.contains("1 passed")),
        "rank 0 did not end normally (the abandoned creation must not hold the process); {}",
        all()
    );
}

#[test]
fn cuda_init_without_a_peer_fails_within_the_deadline() {
    a_peer_never_joins("init", "ncclCommInitRankConfig", &["init on world"]);
}

#[test]
fn cuda_split_without_a_peer_fails_within_the_deadline() {
    a_peer_never_joins("split", "ncclCommSplit", &["split on world", "tp#0"]);
}
