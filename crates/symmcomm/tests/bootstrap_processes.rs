//! The TCP rendezvous, store and launcher across real processes on loopback.
//!
//! Ranks are this test binary run again (`current_exe() --exact child_… --nocapture`) with
//! `SYMMCOMM_TEST_CHILD` naming the role; without it the `child_…` tests return at once. A
//! rank prints `ELAPSED <ms>` (time spent in the rendezvous) and `RESULT <variant> <message>`,
//! which the parent test checks for every rank. A rank that builds a communicator (host
//! backend) also prints `LEFT <ms>`: how long dropping it took.

// The crate's one error enum is larger than clippy's threshold; boxing it is error.rs's call.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

mod common;

use common::TestBackend;
use common::procs::{self, Proc, ROLE, after, env_u64, role_is};
use symmcomm::Error;
use symmcomm::bootstrap::{Bootstrap, free_port};
use symmcomm::{
    BackendChoice, CommConfig, Communicator, DType, Group, GroupKind, ReduceOp, TableSource,
};
use symmcomm_lab::launch::{LaunchSpec, RankStatus, launch};

const SCENARIO: &str = "SYMMCOMM_TEST_SCENARIO";
const TIMEOUT_MS: &str = "SYMMCOMM_TEST_TIMEOUT_MS";
const FAIL_RANK: &str = "SYMMCOMM_TEST_FAIL_RANK";
const FAIL_CODE: &str = "SYMMCOMM_TEST_FAIL_CODE";
const LAUNCH_CASE: &str = "SYMMCOMM_TEST_LAUNCH";
/// How much later than rank 0 the other ranks do their last collective.
const SLOW: Duration = Duration::from_millis(500);

// ---------------------------------------------------------------------------------------------
// Children
// ---------------------------------------------------------------------------------------------

fn variant(e: &Error) -> &'static str {
    match e {
        Error::WrongWorldSize { .. } => "WrongWorldSize",
        Error::DuplicateRank { .. } => "DuplicateRank",
        Error::RankOutOfRange { .. } => "RankOutOfRange",
        Error::MasterUnreachable { .. } => "MasterUnreachable",
        Error::AddrInUse { .. } => "AddrInUse",
        Error::Malformed { .. } => "Malformed",
        Error::RendezvousFailed { .. } => "RendezvousFailed",
        Error::BadEnv { .. } => "BadEnv",
        Error::Timeout { .. } => "Timeout",
        Error::Io { .. } => "Io",
        _ => "Other",
    }
}

/// A rank: rendezvous through the torchrun variables, then the scenario's work.
#[test]
fn child_rank() {
    if !role_is("rank") {
        return;
    }
    let timeout = Duration::from_millis(env_u64(TIMEOUT_MS));
    let scenario = std::env::var(SCENARIO).unwrap_or_default();
    let t0 = Instant::now();
    let boot = Bootstrap::from_env(timeout);
    println!("ELAPSED {}", t0.elapsed().as_millis());
    let boot = match boot {
        Ok(b) => b,
        Err(e) => {
            println!("RESULT {} {e}", variant(&e));
            std::process::exit(0);
        }
    };
    let outcome = match scenario.as_str() {
        "rendezvous" => finish(&boot),
        "store" => store_work(&boot).and_then(|()| finish(&boot)),
        "last-collective" | "last-collective-cuda" | "one-dies" | "one-hangs" => {
            let outcome = last_collective(boot, timeout, &scenario);
            match outcome {
                Ok(()) => println!("RESULT Ok"),
                Err(e) => println!("RESULT {} {e}", variant(&e)),
            }
            std::process::exit(0);
        }
        "idle" => {
            println!("READY");
            thread::sleep(Duration::from_secs(60));
            Ok(())
        }
        "block-get" => {
            println!("BLOCKING");
            let t = Instant::now();
            let r = boot.store().get("never-set", t + timeout);
            println!("GET_ELAPSED {}", t.elapsed().as_millis());
            match r {
                Ok(v) => {
                    println!("RESULT Ok get returned {v:?}");
                    std::process::exit(0);
                }
                Err(e) => {
                    println!("RESULT {} {e}", variant(&e));
                    std::process::exit(0);
                }
            }
        }
        other => panic!("unknown scenario {other:?}"),
    };
    match outcome {
        Ok(()) => println!("RESULT Ok"),
        Err(e) => println!("RESULT {} {e}", variant(&e)),
    }
    // Exit without the harness's summary, after rank 0's server is gone.
    drop(boot);
    std::process::exit(0);
}

/// Every rank's key and value, an `add` counter, and the control plane over the TCP store.
fn store_work(b: &Bootstrap) -> symmcomm::Result<()> {
    let (me, w) = (b.rank, b.world_size);
    let store = b.store();
    store.set(
        &format!("key/{me}"),
        format!("value of rank {me}").as_bytes(),
    )?;
    let deadline = Instant::now() + b.timeout;
    for r in 0..w {
        let v = store.get(&format!("key/{r}"), deadline)?;
        assert_eq!(
            v,
            Some(format!("value of rank {r}").into_bytes()),
            "rank {me}: key/{r}"
        );
    }
    store.add("counter", 1)?;
    let plane = b.world_control();
    plane.barrier("after add")?;
    assert_eq!(store.add("counter", 0)?, w as i64, "rank {me}: counter");
    let mine = vec![me as u8 + 1; me + 1];
    let all = plane.all_gather("ranks", &mine)?;
    for (r, v) in all.iter().enumerate() {
        assert_eq!(
            v,
            &vec![r as u8 + 1; r + 1],
            "rank {me}: all_gather slot {r}"
        );
    }
    let v = plane.broadcast("from the last", w - 1, b"last word")?;
    assert_eq!(v, b"last word");
    Ok(())
}

/// A communicator (host backend) on the bootstrap, then a last exchange that rank 0 finishes
/// first: rank 0 writes its part and drops its communicator at once, while the other ranks
/// sleep, read rank 0's part, do a last all-gather among themselves (all through the store
/// that rank 0's process serves), then `close` theirs. In `one-dies` the last rank instead
/// exits without a word (its process is gone, as if killed) and the others only read rank 0's
/// part; in `one-hangs` it sleeps past everyone's deadline. `last-collective-cuda` is
/// `last-collective` on the CUDA backend, one process per GPU: first a checked all-reduce of
/// every rank on the GPUs (NCCL communicators and windows exist, so every way out tears those
/// down too), and the late ranks' last work adds a checked all-reduce on the GPUs in a group
/// of their own (made, like every group, while rank 0 was still there).
fn last_collective(boot: Bootstrap, timeout: Duration, scenario: &str) -> symmcomm::Result<()> {
    let (me, world) = (boot.rank, boot.world_size);
    let cuda = scenario == "last-collective-cuda";
    let last = cuda || scenario == "last-collective";
    let config = CommConfig {
        backend: if cuda {
            BackendChoice::Cuda
        } else {
            BackendChoice::Host
        },
        timeout,
        table: TableSource::None,
        ..CommConfig::default()
    };
    let comm = Communicator::new(boot, config)?;
    let odd_one = me == world - 1 && !last;
    if odd_one && scenario == "one-dies" {
        std::process::exit(0);
    }
    if odd_one {
        thread::sleep(timeout * 3);
        std::process::exit(0);
    }
    let late = if cuda {
        checked_all_reduce(comm.world())?;
        Some(comm.split(GroupKind::Tp, usize::from(me != 0))?)
    } else {
        None
    };
    let store = comm.control().store();
    store.set(
        &format!("last/{me}"),
        format!("rank {me}'s part").as_bytes(),
    )?;
    if me != 0 {
        thread::sleep(SLOW);
        let v = store.get("last/0", Instant::now() + timeout)?;
        assert_eq!(
            v.as_deref(),
            Some(&b"rank 0's part"[..]),
            "rank {me}: last/0"
        );
        if last {
            let others = comm.control().subgroup("late", (1..world).collect());
            let all = others.all_gather("last", &[me as u8])?;
            let want: Vec<Vec<u8>> = (1..world).map(|r| vec![r as u8]).collect();
            assert_eq!(all, want, "rank {me}: the last all-gather");
        }
        if let Some(late) = &late {
            checked_all_reduce(late)?;
        }
    }
    drop(late);
    let t = Instant::now();
    if me != 0 && last {
        // The explicit way out, which returns the closing barrier's error.
        comm.close()?;
    } else {
        drop(comm);
    }
    println!("LEFT {}", t.elapsed().as_millis());
    Ok(())
}

/// An all-reduce of small integers on `g` (every rank a different input, so the f32 sums are
/// exact), into an output poisoned first, checked element by element.
fn checked_all_reduce(g: &Group) -> symmcomm::Result<()> {
    let n = 4096;
    let input = |r: usize| -> Vec<f32> { (0..n).map(|i| ((r + 1) * 10 + i % 97) as f32).collect() };
    let x = g.alloc_symmetric(DType::F32, &[n])?;
    let y = g.alloc_symmetric(DType::F32, &[n])?;
    g.upload(&x, &input(g.rank()))?;
    g.upload(&y, &vec![f32::NAN; n])?;
    g.all_reduce(&x, &y, ReduceOp::Sum)?;
    let got: Vec<f32> = g.download(&y)?;
    let want: Vec<f32> = (0..n)
        .map(|i| (0..g.size()).map(|r| input(r)[i]).sum())
        .collect();
    assert_eq!(
        got,
        want,
        "rank {} of {}: all-reduce",
        g.rank(),
        g.describe()
    );
    Ok(())
}

/// Tell rank 0 this rank is done; rank 0 waits for everyone before its server goes away.
fn finish(b: &Bootstrap) -> symmcomm::Result<()> {
    let store = b.store();
    if b.rank != 0 {
        return store.set(&format!("done/{}", b.rank), b"");
    }
    let deadline = Instant::now() + b.timeout;
    for r in 1..b.world_size {
        if store.get(&format!("done/{r}"), deadline)?.is_none() {
            panic!("rank 0: rank {r} never said it was done");
        }
    }
    Ok(())
}

/// A launched rank: prints what it was given, then exits, fails or sleeps as told.
#[test]
fn child_echo() {
    if !role_is("echo") {
        return;
    }
    let var = |n: &str| std::env::var(n).unwrap_or_else(|_| "-".into());
    let rank: usize = var("RANK").parse().unwrap_or(usize::MAX);
    // End the harness's "test child_echo ... " line so ours start their own.
    println!();
    println!(
        "echo rank={} world={} local_rank={} local_world={} addr={} port={} nvls={} extra={}",
        var("RANK"),
        var("WORLD_SIZE"),
        var("LOCAL_RANK"),
        var("LOCAL_WORLD_SIZE"),
        var("MASTER_ADDR"),
        var("MASTER_PORT"),
        var("NCCL_NVLS_ENABLE"),
        var("SYMMCOMM_TEST_EXTRA"),
    );
    eprintln!("to stderr from rank {rank}");
    print!("no newline at the end from rank {rank}");
    let _ = std::io::stdout().flush();
    match std::env::var(FAIL_RANK)
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    {
        None => std::process::exit(0),
        Some(f) if f == rank => {
            thread::sleep(Duration::from_millis(300));
            let code = std::env::var(FAIL_CODE)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(1);
            std::process::exit(code);
        }
        Some(_) => {
            thread::sleep(Duration::from_secs(60));
            std::process::exit(0);
        }
    }
}

/// Runs `launch()` on echo children and prints the report, one `REPORT` line per rank.
#[test]
fn child_launcher() {
    if !role_is("launcher") {
        return;
    }
    let exe = std::env::current_exe().expect("current_exe");
    let mut spec = LaunchSpec::new(
        3,
        exe,
        ["--exact", "child_echo", "--nocapture", "--test-threads=1"]
            .map(String::from)
            .to_vec(),
    );
    spec.extra_env = vec![
        (ROLE.into(), "echo".into()),
        ("SYMMCOMM_TEST_EXTRA".into(), "yes".into()),
    ];
    match std::env::var(LAUNCH_CASE).as_deref() {
        Ok("ok") => {}
        Ok("fail") => {
            spec.extra_env.push((FAIL_RANK.into(), "1".into()));
            spec.extra_env.push((FAIL_CODE.into(), "3".into()));
        }
        Ok("timeout") => {
            spec.nproc = 2;
            spec.extra_env.push((FAIL_RANK.into(), "99".into()));
            spec.timeout = Some(Duration::from_millis(1500));
        }
        other => panic!("unknown launch case {other:?}"),
    }
    if spec.timeout.is_none() {
        spec.timeout = Some(Duration::from_secs(30));
    }
    let t0 = Instant::now();
    let report = launch(&spec).expect("launch");
    for r in &report.ranks {
        println!(
            "REPORT rank={} status={:?} first={}",
            r.rank, r.status, r.first_failure
        );
    }
    println!(
        "REPORT success={} code={} timed_out={} ms={}",
        report.success(),
        report.exit_code(),
        report.timed_out.is_some(),
        t0.elapsed().as_millis()
    );
    println!("SUMMARY {report}");
    std::process::exit(0);
}

// ---------------------------------------------------------------------------------------------
// Parent side
// ---------------------------------------------------------------------------------------------

fn spawn_rank(rank: usize, world: usize, port: u16, timeout_ms: u64, scenario: &str) -> Proc {
    procs::spawn(
        &format!("rank {rank}"),
        "child_rank",
        &[
            (ROLE, "rank".into()),
            (SCENARIO, scenario.into()),
            (TIMEOUT_MS, timeout_ms.to_string()),
            ("RANK", rank.to_string()),
            ("WORLD_SIZE", world.to_string()),
            ("MASTER_ADDR", "127.0.0.1".into()),
            ("MASTER_PORT", port.to_string()),
        ],
    )
}

/// What a rank reported.
#[derive(Debug)]
struct Outcome {
    variant: String,
    message: String,
    elapsed_ms: u64,
    output: Vec<String>,
}

impl Proc {
    fn outcome(self, deadline: Instant) -> Outcome {
        let name = self.name.clone();
        let output = self.finish(deadline);
        let result = output
            .iter()
            .find_map(|l| after(l, "RESULT "))
            .unwrap_or_else(|| panic!("{name}: no RESULT line; output:\n{}", output.join("\n")));
        let (variant, message) = result.split_once(' ').unwrap_or((result, ""));
        let elapsed_ms = output
            .iter()
            .find_map(|l| after(l, "ELAPSED "))
            .and_then(|v| v.parse().ok())
            .unwrap_or(u64::MAX);
        Outcome {
            variant: variant.to_string(),
            message: message.to_string(),
            elapsed_ms,
            output,
        }
    }
}

/// Every rank's outcome, each checked to have returned within `timeout_ms` + 1 s.
fn outcomes(procs: Vec<Proc>, timeout_ms: u64) -> Vec<Outcome> {
    let deadline = Instant::now() + Duration::from_millis(timeout_ms + 10_000);
    procs
        .into_iter()
        .map(|p| {
            let name = p.name.clone();
            let o = p.outcome(deadline);
            assert!(
                o.elapsed_ms <= timeout_ms + 1000,
                "{name}: the rendezvous took {} ms, deadline {timeout_ms} ms; output:\n{}",
                o.elapsed_ms,
                o.output.join("\n")
            );
            o
        })
        .collect()
}

fn expect_all(outs: &[Outcome], variant: &str, needles: &[&str]) {
    for (i, o) in outs.iter().enumerate() {
        // Shown with --nocapture: what each rank said.
        println!(
            "process {i} ({} ms): {} {}",
            o.elapsed_ms, o.variant, o.message
        );
        assert_eq!(
            o.variant,
            variant,
            "process {i}: {} {}; output:\n{}",
            o.variant,
            o.message,
            o.output.join("\n")
        );
        for n in needles {
            assert!(
                o.message.contains(n),
                "process {i}: message lacks {n:?}: {}",
                o.message
            );
        }
    }
}

fn port() -> u16 {
    free_port("127.0.0.1").expect("free port")
}

// ---------------------------------------------------------------------------------------------
// Rendezvous and store
// ---------------------------------------------------------------------------------------------

#[test]
fn happy_path_three_and_four_processes() {
    for world in [3, 4] {
        let p = port();
        let procs = (0..world)
            .map(|r| spawn_rank(r, world, p, 5000, "store"))
            .collect();
        let outs = outcomes(procs, 5000);
        expect_all(&outs, "Ok", &[]);
    }
}

#[test]
fn wrong_world_size_reaches_every_rank() {
    let p = port();
    let procs = vec![
        spawn_rank(0, 3, p, 3000, "rendezvous"),
        spawn_rank(1, 2, p, 3000, "rendezvous"),
        spawn_rank(2, 3, p, 3000, "rendezvous"),
    ];
    let outs = outcomes(procs, 3000);
    expect_all(
        &outs,
        "WrongWorldSize",
        &["rank 1 announced world size 2, the master expects 3"],
    );
}

#[test]
fn duplicate_rank_reaches_every_rank() {
    let p = port();
    let procs = vec![
        spawn_rank(0, 3, p, 2500, "rendezvous"),
        spawn_rank(1, 3, p, 2500, "rendezvous"),
        spawn_rank(1, 3, p, 2500, "rendezvous"),
    ];
    let outs = outcomes(procs, 2500);
    // The message names both peers' addresses.
    expect_all(
        &outs,
        "DuplicateRank",
        &["rank 1 joined twice (from 127.0.0.1:"],
    );
    for o in &outs {
        assert_eq!(o.message.matches("127.0.0.1:").count(), 2, "{}", o.message);
    }
}

#[test]
fn master_unreachable() {
    let p = port();
    let outs = outcomes(vec![spawn_rank(1, 2, p, 1500, "rendezvous")], 1500);
    expect_all(
        &outs,
        "MasterUnreachable",
        &[
            "rank 1 could not reach the master at 127.0.0.1:",
            &p.to_string(),
        ],
    );
    assert!(outs[0].elapsed_ms >= 1400, "gave up early: {outs:?}");
}

#[test]
fn port_in_use() {
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let p = taken.local_addr().expect("addr").port();
    let outs = outcomes(vec![spawn_rank(0, 2, p, 2000, "rendezvous")], 2000);
    expect_all(
        &outs,
        "AddrInUse",
        &[&format!("rank 0 could not listen on 127.0.0.1:{p}")],
    );
    drop(taken);
}

/// Connect to the master once it listens (retrying until `deadline`).
fn connect_when_up(port: u16, deadline: Instant) -> TcpStream {
    loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => return s,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("master on {port} never came up: {e}"),
        }
    }
}

fn assert_closed_by_master(mut s: TcpStream, what: &str) {
    s.set_read_timeout(Some(Duration::from_secs(3)))
        .expect("read timeout");
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Ok(n) => panic!("{what}: the master answered garbage with {n} bytes"),
        Err(e) => panic!("{what}: the master did not close the connection: {e}"),
    }
}

/// How long each rank took to drop its communicator (`LEFT <ms>`).
fn left_ms(o: &Outcome) -> u64 {
    o.output
        .iter()
        .find_map(|l| after(l, "LEFT "))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no LEFT line; output:\n{}", o.output.join("\n")))
}

/// Issue 21: rank 0 finished its part and left while the others were still in their last
/// collective, whose reads then met a closed store. Rank 0's way out now waits for them.
#[test]
fn rank0_leaving_first_does_not_close_the_store_under_the_others() {
    let p = port();
    let procs = (0..3)
        .map(|r| spawn_rank(r, 3, p, 5000, "last-collective"))
        .collect();
    let outs = outcomes(procs, 5000);
    expect_all(&outs, "Ok", &[]);
    // Shown with --nocapture: rank 0 waited about SLOW for the others.
    println!("rank 0 left in {} ms", left_ms(&outs[0]));
}

/// Issue 21 on GPUs, one process per GPU (every visible GPU, at most 4): rank 0 finishes
/// first and leaves while the others still do their last work (the store rank 0's process
/// serves, an all-reduce on the GPUs in a group of their own); its way out waits for them,
/// then every rank tears down its NCCL communicators and windows, and every rank says Ok.
#[test]
fn cuda_rank0_leaving_first_does_not_close_the_store_under_the_others() {
    if !TestBackend::Cuda.can_run(2) {
        return;
    }
    let world = symmcomm::info::cuda_devices().expect("GPUs").min(4);
    let p = port();
    let procs = (0..world)
        .map(|r| spawn_rank(r, world, p, 30_000, "last-collective-cuda"))
        .collect();
    let outs = outcomes(procs, 30_000);
    expect_all(&outs, "Ok", &[]);
    println!("{world} GPUs: rank 0 left in {} ms", left_ms(&outs[0]));
}

/// A rank that died is not waited for: the others leave without waiting out their deadline.
#[test]
fn a_dead_rank_does_not_hold_the_others_on_their_way_out() {
    let p = port();
    let procs: Vec<Proc> = (0..3)
        .map(|r| spawn_rank(r, 3, p, 20_000, "one-dies"))
        .collect();
    let outs = procs
        .into_iter()
        .take(2)
        .map(|p| p.outcome(Instant::now() + Duration::from_secs(30)))
        .collect::<Vec<_>>();
    expect_all(&outs, "Ok", &[]);
    for (r, o) in outs.iter().enumerate() {
        let ms = left_ms(o);
        assert!(ms < 10_000, "rank {r} took {ms} ms to leave, deadline 20 s");
    }
}

/// A rank that hangs holds the others on their way out for one deadline, not longer.
#[test]
fn a_hung_rank_holds_the_others_only_until_the_deadline() {
    let timeout_ms = 1500;
    let p = port();
    let mut procs: Vec<Proc> = (0..3)
        .map(|r| spawn_rank(r, 3, p, timeout_ms, "one-hangs"))
        .collect();
    let hung = procs.pop().expect("rank 2");
    let outs: Vec<Outcome> = procs
        .into_iter()
        .map(|p| p.outcome(Instant::now() + Duration::from_secs(30)))
        .collect();
    expect_all(&outs, "Ok", &[]);
    for (r, o) in outs.iter().enumerate() {
        let ms = left_ms(o);
        // Rank 0 waits out its own deadline, then for rank 1, which started SLOW later.
        let bound = timeout_ms + SLOW.as_millis() as u64 + 1000;
        assert!(
            ms <= bound,
            "rank {r} took {ms} ms to leave, deadline {timeout_ms} ms"
        );
    }
    drop(hung);
}

#[test]
fn malformed_connections_do_not_stop_the_real_ranks() {
    let p = port();
    let rank0 = spawn_rank(0, 2, p, 5000, "store");
    let deadline = Instant::now() + Duration::from_secs(5);
    let garbage: Vec<(&str, Vec<u8>)> = vec![
        (
            "http request",
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        ),
        ("4 GiB frame header", {
            let mut v = u32::MAX.to_le_bytes().to_vec();
            v.extend_from_slice(&[0xab; 32]);
            v
        }),
        ("bad magic", {
            let mut v = 27u32.to_le_bytes().to_vec();
            v.push(0x01);
            v.extend_from_slice(b"NOTMAGIC");
            v.extend_from_slice(&[0; 18]);
            v
        }),
        ("unknown kind", vec![1, 0, 0, 0, 0x42]),
        ("truncated frame", vec![100, 0, 0, 0, 1, 2, 3]),
    ];
    let mut socks = Vec::new();
    for (what, bytes) in &garbage {
        let mut s = connect_when_up(p, deadline);
        s.write_all(bytes).expect("write garbage");
        socks.push((what, s));
    }
    // The truncated frame is only malformed once the sender gives up.
    if let Some((_, s)) = socks.last() {
        s.shutdown(std::net::Shutdown::Write).expect("shutdown");
    }
    let rank1 = spawn_rank(1, 2, p, 5000, "store");
    for (what, s) in socks {
        assert_closed_by_master(s, what);
    }
    let outs = outcomes(vec![rank0, rank1], 5000);
    expect_all(&outs, "Ok", &[]);
}

#[test]
fn malformed_connection_in_place_of_a_rank_times_out_everyone() {
    let p = port();
    let procs = vec![
        spawn_rank(0, 3, p, 2000, "rendezvous"),
        spawn_rank(1, 3, p, 2000, "rendezvous"),
    ];
    let mut s = connect_when_up(p, Instant::now() + Duration::from_secs(2));
    s.write_all(&u32::MAX.to_le_bytes()).expect("write");
    let outs = outcomes(procs, 2000);
    expect_all(
        &outs,
        "Timeout",
        &[
            "rank(s) [2] never arrived",
            "1 malformed connection(s)",
            "4294967295",
        ],
    );
}

#[test]
fn late_joiner_is_named_by_everyone_else() {
    let p = port();
    let procs = vec![
        spawn_rank(0, 3, p, 2000, "rendezvous"),
        spawn_rank(1, 3, p, 2000, "rendezvous"),
    ];
    let outs = outcomes(procs, 2000);
    expect_all(
        &outs,
        "Timeout",
        &["rank(s) [2] never arrived (joined: [0, 1])"],
    );
    // Past everyone's deadline the master is gone.
    let late = outcomes(vec![spawn_rank(2, 3, p, 1000, "rendezvous")], 1000);
    expect_all(&late, "MasterUnreachable", &["rank 2"]);
}

#[test]
fn killed_master_fails_a_blocked_get() {
    let p = port();
    let mut rank0 = spawn_rank(0, 2, p, 4000, "idle");
    let mut rank1 = spawn_rank(1, 2, p, 4000, "block-get");
    let deadline = Instant::now() + Duration::from_secs(10);
    rank0.wait_line("READY", deadline);
    rank1.wait_line("BLOCKING", deadline);
    thread::sleep(Duration::from_millis(200));
    rank0.child.kill().expect("kill rank 0");
    let out = rank1.outcome(deadline);
    assert!(
        out.variant == "RendezvousFailed" || out.variant == "Io",
        "{out:?}"
    );
    assert!(out.message.contains("127.0.0.1:"), "{}", out.message);
    assert!(out.message.contains("get 'never-set'"), "{}", out.message);
    let get_ms: u64 = out
        .output
        .iter()
        .find_map(|l| after(l, "GET_ELAPSED "))
        .and_then(|v| v.parse().ok())
        .expect("GET_ELAPSED");
    assert!(get_ms < 4000, "the get took {get_ms} ms: {out:?}");
}

// ---------------------------------------------------------------------------------------------
// Launcher
// ---------------------------------------------------------------------------------------------

fn run_launcher(case: &str) -> Vec<String> {
    let p = procs::spawn(
        &format!("launcher ({case})"),
        "child_launcher",
        &[
            (ROLE, "launcher".into()),
            (LAUNCH_CASE, case.into()),
            ("NCCL_NVLS_ENABLE", "0".into()),
        ],
    );
    p.finish(Instant::now() + Duration::from_secs(30))
}

fn report_line<'a>(out: &'a [String], prefix: &str) -> &'a str {
    out.iter()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no {prefix:?} line in:\n{}", out.join("\n")))
}

#[test]
fn launch_prefixes_output_and_passes_the_environment() {
    let out = run_launcher("ok");
    let port_line = report_line(&out, "[rank 0] echo ");
    let port = port_line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("port="))
        .expect("port");
    for r in 0..3 {
        let want = format!(
            "[rank {r}] echo rank={r} world=3 local_rank={r} local_world=3 addr=127.0.0.1 port={port} nvls=0 extra=yes"
        );
        assert!(
            out.contains(&want),
            "missing {want:?} in:\n{}",
            out.join("\n")
        );
        let err = format!("stderr: [rank {r}] to stderr from rank {r}");
        assert!(
            out.contains(&err),
            "missing {err:?} in:\n{}",
            out.join("\n")
        );
        let tail = format!("[rank {r}] no newline at the end from rank {r}");
        assert!(
            out.iter().any(|l| l.starts_with(&tail)),
            "missing {tail:?} in:\n{}",
            out.join("\n")
        );
    }
    // Every line the ranks wrote carries a prefix.
    for l in &out {
        let l = l.strip_prefix("stderr: ").unwrap_or(l);
        if l.starts_with("REPORT") || l.starts_with("SUMMARY") || !l.contains("echo rank=") {
            continue;
        }
        assert!(l.starts_with("[rank "), "unprefixed: {l:?}");
    }
    assert!(
        out.iter()
            .any(|l| l.starts_with("REPORT success=true code=0 timed_out=false"))
    );
}

#[test]
fn launch_stops_everyone_when_a_rank_fails() {
    let out = run_launcher("fail");
    let all = out.join("\n");
    assert!(
        out.contains(&"REPORT rank=1 status=Code(3) first=true".to_string()),
        "{all}"
    );
    for r in [0, 2] {
        let want = format!(
            "REPORT rank={r} status={:?} first=false",
            RankStatus::Killed
        );
        assert!(out.contains(&want), "missing {want:?} in:\n{all}");
    }
    let summary = report_line(&out, "REPORT success=");
    assert!(
        summary.starts_with("REPORT success=false code=3 timed_out=false"),
        "{all}"
    );
    let ms: u64 = summary
        .rsplit("ms=")
        .next()
        .and_then(|v| v.parse().ok())
        .expect("ms");
    assert!(ms < 20_000, "the sleeping ranks were not killed: {all}");
    assert!(
        report_line(&out, "SUMMARY").contains("rank 1 failed first (exit code 3)"),
        "{all}"
    );
}

#[test]
fn launch_timeout_kills_every_rank() {
    let out = run_launcher("timeout");
    let all = out.join("\n");
    for r in [0, 1] {
        let want = format!("REPORT rank={r} status=Killed first=false");
        assert!(out.contains(&want), "missing {want:?} in:\n{all}");
    }
    assert!(
        report_line(&out, "REPORT success=")
            .starts_with("REPORT success=false code=1 timed_out=true"),
        "{all}"
    );
}

// ---------------------------------------------------------------------------------------------
// Only the expected world, only where told
// ---------------------------------------------------------------------------------------------

/// A well-formed hello (protocol version 2) from a stranger claiming rank 7 of a world of 3.
fn hello_frame(rank: u32, world: u32) -> Vec<u8> {
    let mut p = vec![0x01];
    p.extend_from_slice(b"SYMMCOMM");
    p.extend_from_slice(&2u16.to_le_bytes());
    p.extend_from_slice(&rank.to_le_bytes());
    p.extend_from_slice(&world.to_le_bytes());
    p.extend_from_slice(&5000u64.to_le_bytes());
    let mut f = (p.len() as u32).to_le_bytes().to_vec();
    f.extend_from_slice(&p);
    f
}

#[test]
fn a_rank_outside_the_world_is_refused_to_everyone() {
    let p = port();
    let procs = vec![
        spawn_rank(0, 3, p, 3000, "rendezvous"),
        spawn_rank(1, 3, p, 3000, "rendezvous"),
    ];
    let mut s = connect_when_up(p, Instant::now() + Duration::from_secs(2));
    s.write_all(&hello_frame(7, 3)).expect("write");
    let outs = outcomes(procs, 3000);
    expect_all(
        &outs,
        "RankOutOfRange",
        &["rank 7 is out of range for world size 3"],
    );
}

/// With MASTER_ADDR unset, rank 0 listens on loopback only: the port answers on 127.0.0.1 and
/// is closed on this host's other addresses.
#[test]
fn the_rendezvous_binds_loopback_by_default() {
    let p = port();
    let mut rank0 = procs::spawn(
        "rank 0",
        "child_rank",
        &[
            (ROLE, "rank".into()),
            (SCENARIO, "idle".into()),
            (TIMEOUT_MS, "5000".into()),
            ("RANK", "0".into()),
            ("WORLD_SIZE", "2".into()),
            ("MASTER_PORT", p.to_string()),
        ],
    );
    // Rank 0 listens before it joins as a client of itself; a connection on loopback works.
    let s = connect_when_up(p, Instant::now() + Duration::from_secs(3));
    drop(s);
    // This host's other addresses (from the routing table, no packet sent).
    let others: Vec<std::net::IpAddr> = ["10.255.255.255:9", "[fd00::1]:9"]
        .iter()
        .filter_map(|a| {
            let sock = std::net::UdpSocket::bind(if a.starts_with('[') {
                "[::]:0"
            } else {
                "0.0.0.0:0"
            })
            .ok()?;
            sock.connect(a).ok()?;
            Some(sock.local_addr().ok()?.ip())
        })
        .filter(|ip| !ip.is_loopback() && !ip.is_unspecified())
        .collect();
    if others.is_empty() {
        eprintln!("note: this host has no address but loopback; only loopback was checked");
    }
    for ip in others {
        let r = TcpStream::connect_timeout(&(ip, p).into(), Duration::from_secs(1));
        assert!(
            r.is_err(),
            "the rendezvous port {p} answers on {ip}: it must listen on loopback only"
        );
    }
    let _ = rank0.child.kill();
}
