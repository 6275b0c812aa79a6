//! Every command that draws random inputs, run as a new user runs it on a machine without GPUs:
//! `symmcomm launch --nproc N -- symmcomm <command> --backend host`, without `--seed`. Each rank
//! is its own process, so the ranks must agree on the seed (rank 0's) or they check against
//! inputs the others never made; and rank 0's summary must be the job's, not its own.
//!
//! Until rank 0 stays alive until every rank is done with the job's store (a library fix), a
//! run can fail with "the master ... closed the connection ... did rank 0 exit?".

use std::collections::BTreeSet;
use std::process::{Command, Output};

const EXE: &str = env!("CARGO_BIN_EXE_symmcomm");

/// `symmcomm launch --nproc <nproc> -- symmcomm <args>`.
fn launch(nproc: usize, args: &[&str]) -> Output {
    Command::new(EXE)
        .args(["launch", "--nproc", &nproc.to_string(), "--", EXE])
        .args(args)
        .output()
        .expect("running symmcomm launch")
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The output, for assertion messages.
fn shown(out: &Output) -> String {
    let (o, e) = text(out);
    format!(
        "exit {:?}\n--- stdout\n{o}\n--- stderr\n{e}",
        out.status.code()
    )
}

/// The number after `(seed ` in `line`.
fn seed_of(line: &str) -> u64 {
    let rest = line.split("(seed ").nth(1).expect("a seed");
    rest.split([',', ')'])
        .next()
        .and_then(|s| s.parse().ok())
        .expect("a seed")
}

#[test]
fn check_agrees_on_its_inputs_across_processes() {
    let mut seeds = BTreeSet::new();
    for nproc in 2..=4 {
        for _ in 0..3 {
            let out = launch(nproc, &["check", "--backend", "host", "--elems", "1,7,127"]);
            let (stdout, _) = text(&out);
            assert!(out.status.success(), "{}", shown(&out));
            let summary: Vec<&str> = stdout
                .lines()
                .filter(|l| l.contains("symmcomm check (seed"))
                .collect();
            assert_eq!(summary.len(), 1, "one summary, rank 0's\n{}", shown(&out));
            assert!(summary[0].starts_with("[rank 0] "), "{}", shown(&out));
            assert!(
                summary[0].contains(&format!("{nproc} ranks)"))
                    && summary[0].ends_with(" 0 failed"),
                "{}",
                shown(&out)
            );
            assert!(!stdout.contains("FAILED"), "{}", shown(&out));
            seeds.insert(seed_of(summary[0]));
        }
    }
    assert!(seeds.len() > 1, "every run draws a fresh seed: {seeds:?}");
}

/// One rank's failures are the job's: rank 0's summary counts them and every rank's exit status
/// says so (thread ranks and processes alike).
#[test]
fn check_summary_is_the_jobs() {
    let args = [
        "check",
        "--backend",
        "host",
        "--elems",
        "1",
        "--fail-on-rank",
        "2",
    ];
    let launched = launch(3, &args);
    let threads = Command::new(EXE)
        .args(args)
        .args(["--world", "3"])
        .output()
        .expect("running symmcomm check");
    for out in [launched, threads] {
        let (stdout, _) = text(&out);
        assert!(!out.status.success(), "{}", shown(&out));
        let summary = stdout
            .lines()
            .find(|l| l.contains("symmcomm check (seed"))
            .unwrap_or_else(|| panic!("no summary\n{}", shown(&out)));
        let failed = stdout
            .lines()
            .filter(|l| l.contains("rank 2 FAILED"))
            .count();
        assert!(failed > 0, "{}", shown(&out));
        assert!(
            summary.ends_with(&format!(" {failed} failed (rank 2: {failed})")),
            "{}",
            shown(&out)
        );
    }
}

/// A job whose ranks run different commands stops at once, saying so.
#[test]
fn ranks_with_other_arguments_are_refused() {
    let out = Command::new(EXE)
        .args(["launch", "--nproc", "2", "--", "sh", "-c"])
        .arg(format!(
            "exec {EXE} check --backend host --elems $((RANK + 1))"
        ))
        .output()
        .expect("running symmcomm launch");
    let (_, stderr) = text(&out);
    assert!(!out.status.success(), "{}", shown(&out));
    assert!(
        stderr.contains("rank 1 was started with other arguments than rank 0"),
        "{}",
        shown(&out)
    );
}

#[test]
fn bench_under_launch_checks_every_row() {
    let path = std::env::temp_dir().join(format!(
        "symmcomm-launched-bench-{}.json",
        std::process::id()
    ));
    let out = launch(
        2,
        &[
            "bench",
            "--backend",
            "host",
            "--sizes",
            "2K",
            "--dcp-batches",
            "1",
            "--iters",
            "2",
            "--replays",
            "1",
            "--repeats",
            "1",
            "--json",
            path.to_str().expect("a UTF-8 temporary path"),
        ],
    );
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{}", shown(&out));
    assert!(!stdout.contains("WRONG"), "{}", shown(&out));
    assert!(stderr.contains("symmcomm bench (seed "), "{}", shown(&out));
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("the results file"))
            .expect("a results file");
    let _ = std::fs::remove_file(&path);
    let seed = results["meta"]["seed"].as_str().expect("the seed in meta");
    assert!(
        stderr.contains(&format!("(seed {seed})")),
        "{}",
        shown(&out)
    );
    let rows = results["rows"].as_array().expect("rows");
    let ops: BTreeSet<&str> = rows.iter().filter_map(|r| r["op"].as_str()).collect();
    assert_eq!(
        ops,
        BTreeSet::from(["all_gather", "all_reduce", "dcp_combine", "reduce_scatter"]),
        "{}",
        shown(&out)
    );
    for r in rows {
        assert_eq!(r["ok"], true, "{r}");
        assert_eq!(r["world"], 2, "{r}");
    }
}

/// Three ranks split neither 2 KiB of bf16 nor the DCP combine's 128 heads: those rows are left
/// out with a warning that says why, and the rest runs.
#[test]
fn bench_on_three_processes_says_what_does_not_split() {
    let out = launch(
        3,
        &[
            "bench",
            "--backend",
            "host",
            "--sizes",
            "2K,6K",
            "--modes",
            "eager",
            "--iters",
            "1",
            "--repeats",
            "1",
        ],
    );
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{}", shown(&out));
    assert!(!stdout.contains("WRONG"), "{}", shown(&out));
    assert!(
        stderr.contains(
            "warning: no all_gather bf16 rows at 2K: their elements do not split over 3 ranks"
        ),
        "{}",
        shown(&out)
    );
    assert!(
        stderr.contains("warning: no dcp_combine rows: its 128 heads do not split over 3 ranks"),
        "{}",
        shown(&out)
    );
}

#[test]
fn soak_under_launch_has_no_failures() {
    let out = launch(
        2,
        &[
            "soak",
            "--backend",
            "host",
            "--replays",
            "2",
            "--check-every",
            "1",
        ],
    );
    let (stdout, _) = text(&out);
    assert!(out.status.success(), "{}", shown(&out));
    assert!(
        stdout.contains("[rank 0] symmcomm soak (seed "),
        "{}",
        shown(&out)
    );
    assert!(
        stdout.contains("symmcomm soak: 2 ranks, 2 replays and 2 checks each, 0 failures"),
        "{}",
        shown(&out)
    );
    for r in 0..2 {
        assert!(
            stdout.contains(&format!("[rank {r}] rank {r}: 2 replays in"))
                && !stdout.contains("FIRST FAILURE"),
            "{}",
            shown(&out)
        );
    }
}

#[test]
fn decode_sim_under_launch_is_right() {
    for nproc in [2, 4] {
        let out = launch(
            nproc,
            &[
                "decode-sim",
                "--backend",
                "host",
                "--model",
                "tiny",
                "--layers",
                "1",
                "--batch",
                "1,3",
            ],
        );
        let (stdout, stderr) = text(&out);
        assert!(out.status.success(), "{}", shown(&out));
        assert!(
            stderr.contains("symmcomm decode-sim (seed "),
            "{}",
            shown(&out)
        );
        // 3 configs x 2 batches x 3 implementations, every one checked.
        let rows = stdout
            .lines()
            .filter_map(|l| l.strip_prefix("[rank 0] "))
            .filter(|l| l.starts_with("tp ") || l.starts_with("dp_attn ") || l.starts_with("dcp "))
            .count();
        assert_eq!(rows, 18, "{}", shown(&out));
        assert!(!stdout.contains("WRONG"), "{}", shown(&out));
    }
}

/// `symmcomm launch -- sh -c 'echo ...'` for one node of `nnodes` (`extra` launch arguments):
/// every rank's variables, by its global rank.
fn rank_vars(extra: &[&str]) -> Vec<(usize, String)> {
    let out = Command::new(EXE)
        .arg("launch")
        .args(extra)
        .args([
            "--",
            "sh",
            "-c",
            "echo VARS $RANK $WORLD_SIZE $LOCAL_RANK $LOCAL_WORLD_SIZE ${GROUP_RANK:--} \
             ${NODE_RANK:--} ${SYMMCOMM_HOST_ID:--} ${NCCL_HOSTID:--} ${NCCL_SOCKET_IFNAME:--}",
        ])
        .output()
        .expect("running symmcomm launch");
    assert!(out.status.success(), "{}", shown(&out));
    let (stdout, _) = text(&out);
    let mut vars: Vec<(usize, String)> = stdout
        .lines()
        .filter_map(|l| {
            let rank = l.strip_prefix("[rank ")?.split(']').next()?.parse().ok()?;
            Some((rank, l.split("VARS ").nth(1)?.to_string()))
        })
        .collect();
    vars.sort();
    vars
}

/// torchrun's multi-node variables: node 1 of 2 with 2 ranks each is ranks 2 and 3 of 4; its
/// output is prefixed with those ranks. Simulated hosts name every rank's host for symmcomm and
/// NCCL alike, and put NCCL's sockets on loopback.
#[test]
fn launch_sets_node_and_simulated_host_variables() {
    let node1 = rank_vars(&[
        "--nproc",
        "2",
        "--nnodes",
        "2",
        "--node-rank",
        "1",
        "--master-port",
        "29999",
    ]);
    assert_eq!(
        node1,
        vec![
            (2, "2 4 0 2 1 1 - - -".to_string()),
            (3, "3 4 1 2 1 1 - - -".to_string()),
        ]
    );
    let hosts = rank_vars(&["--nproc", "4", "--simulate-hosts", "2"]);
    let want: Vec<(usize, String)> = (0..4)
        .map(|r| {
            let h = format!("sim-host-{}", r / 2);
            (r, format!("{r} 4 {r} 4 - - {h} {h} lo"))
        })
        .collect();
    assert_eq!(hosts, want);
}

/// `check` on four processes as two simulated hosts: every op and every implementation allowed
/// across hosts (hierarchical among them) against the reference, our kernels not supported.
#[test]
fn check_across_simulated_hosts() {
    let out = Command::new(EXE)
        .args(["launch", "--nproc", "4", "--simulate-hosts", "2", "--", EXE])
        .args(["check", "--backend", "host", "--elems", "1,6,128"])
        .output()
        .expect("running symmcomm launch");
    let (stdout, _) = text(&out);
    assert!(out.status.success(), "{}", shown(&out));
    assert!(
        stdout.contains(
            "[rank 0] world: 2 NVLink domains (hosts): sim-host-0 ranks [0, 1], sim-host-1 ranks [2, 3]"
        ),
        "{}",
        shown(&out)
    );
    let summary = stdout
        .lines()
        .find(|l| l.contains("symmcomm check (seed"))
        .unwrap_or_else(|| panic!("no summary\n{}", shown(&out)));
    assert!(
        summary.contains("4 ranks)") && summary.ends_with(" 0 failed"),
        "{summary}"
    );
}

/// A job of two nodes, each its own launcher (here both on this machine, each node one
/// simulated host): they meet at node 0's port, node 1's ranks are 2 and 3, and `check` on the
/// four ranks, which span the two nodes' hosts, passes.
#[test]
fn two_launchers_make_one_job_of_two_nodes() {
    let port = symmcomm::bootstrap::free_port("127.0.0.1")
        .expect("a free port")
        .to_string();
    let node = |rank: &str| {
        Command::new(EXE)
            .args([
                "launch",
                "--nproc",
                "2",
                "--nnodes",
                "2",
                "--node-rank",
                rank,
            ])
            .args(["--master-port", &port, "--simulate-hosts", "1", "--", EXE])
            .args(["check", "--backend", "host", "--elems", "1,6"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("starting a launcher")
    };
    let (n0, n1) = (node("0"), node("1"));
    let (o0, o1) = (
        n0.wait_with_output().expect("node 0"),
        n1.wait_with_output().expect("node 1"),
    );
    assert!(o0.status.success(), "node 0: {}", shown(&o0));
    assert!(o1.status.success(), "node 1: {}", shown(&o1));
    let (s0, _) = text(&o0);
    let (s1, _) = text(&o1);
    assert!(
        s0.contains(
            "world: 2 NVLink domains (hosts): sim-host-0 ranks [0, 1], sim-host-1 ranks [2, 3]"
        ) && s0
            .lines()
            .any(|l| l.contains("4 ranks)") && l.ends_with(" 0 failed")),
        "node 0: {}",
        shown(&o0)
    );
    assert!(
        s1.lines()
            .all(|l| l.starts_with("[rank 2]") || l.starts_with("[rank 3]")),
        "node 1: {}",
        shown(&o1)
    );
}
