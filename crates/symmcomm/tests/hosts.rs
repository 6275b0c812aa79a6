//! Groups that span hosts, simulated on one machine: ranks that report different host
//! identities (thread ranks through `Bootstrap::on_host`, processes through `SYMMCOMM_HOST_ID`,
//! and on GPUs `NCCL_HOSTID` too, so that NCCL connects them over its network transport).
//! What every rank learns of the topology; every op and every implementation allowed across
//! hosts against the f64 reference, and `auto`'s reason; our kernels refused by name; the
//! hierarchical all-reduce (flat, in place, captured in a graph); and windows NCCL refuses
//! across hosts falling back to plain memory with the reason recorded. On the host backend as
//! threads and as processes (CI), on GPUs as threads (symmcomm's topology only; NCCL keeps
//! NVLink), and as processes: 2 GPUs as 2 hosts, 4 GPUs as 2 hosts of 2 (skipped without GPUs
//! unless SYMMCOMM_REQUIRE_GPU=1).
//!
//! Ranks of the process tests are this test binary run again with `SYMMCOMM_TEST_CHILD`
//! naming the role; without it the `child_…` tests return at once.

mod common;

use std::time::{Duration, Instant};

use common::procs::{self, Proc, ROLE, after, env_u64, role_is};
use common::{TestBackend, all_ok, run_on_hosts, small_pool};
use symmcomm::bootstrap::{Bootstrap, free_port};
use symmcomm::dispatch::{DispatchRow, DispatchTable, Why};
use symmcomm::lab::test_hooks::refuse_next_window_across_hosts;
use symmcomm::topology::HostIdSource;
use symmcomm::{
    Algo, BackendChoice, BackendKind, Collective, CommConfig, Communicator, DType, Error, Group,
    GroupKind, Impl, ReduceOp, Result, TableSource,
};
use symmcomm_lab::verify::{self, Case};

fn colls() -> Vec<Collective> {
    let mut v = vec![Collective::AllGather];
    for op in ReduceOp::ALL {
        v.push(Collective::AllReduce(op));
        v.push(Collective::ReduceScatter(op));
    }
    v
}

fn dtypes_for(c: Collective) -> &'static [DType] {
    if c.reduce().is_some() {
        &DType::FLOATS
    } else {
        &DType::ALL
    }
}

/// Every implementation a caller can ask for, with where its buffers lie.
const IMPLS: [(Impl, bool); 10] = [
    (Impl::Regular, false),
    (Impl::Symmetric, true),
    (Impl::Auto, false),
    (Impl::Auto, true),
    (Impl::Hierarchical, false),
    (Impl::Hierarchical, true),
    (Impl::Kernel(Algo::OneShot), true),
    (Impl::Kernel(Algo::TwoShot), true),
    (Impl::Kernel(Algo::CopyEngine), true),
    (Impl::Kernel(Algo::LowLatency), false),
];

/// What an implementation that may not run on `g` must say, if anything.
fn check_refusal(g: &Group, imp: Impl, why: &str) {
    let spans = g.topology().spans_domains();
    match imp {
        Impl::Kernel(_) if spans => assert!(
            why.contains("one NVLink domain") && why.contains("NVLink domains (hosts)"),
            "{imp:?}: {why}"
        ),
        Impl::Regular | Impl::Auto => panic!("{imp:?} refused across hosts: {why}"),
        _ => {}
    }
}

/// What `auto` and the hierarchical all-reduce must report across hosts (`piece`: elements
/// of a rank's piece, the whole buffer for an all-reduce).
fn check_reason(g: &Group, case: &Case, piece: usize, ran: &symmcomm::Dispatched) {
    let domains = g.topology().domains().len();
    match (case.imp, ran.why) {
        (Impl::Auto, Why::CrossDomain { domains: d, .. }) => {
            assert_eq!(d, domains, "{}", ran.reason());
            let symmetric_ok = g
                .supports(case.coll, case.dtype, Impl::Symmetric, piece)
                .is_ok();
            // NCCL's rule, never our kernels: symmetric only with both buffers in windows.
            let want = if case.input_symm && case.output_symm && symmetric_ok {
                Impl::Symmetric
            } else {
                Impl::Regular
            };
            assert_eq!(ran.imp, want, "{case:?}: {}", ran.reason());
        }
        (Impl::Hierarchical, Why::Hierarchical { domains: d, .. }) => {
            assert_eq!(d, domains, "{}", ran.reason());
            assert_eq!(ran.imp, Impl::Hierarchical);
        }
        (Impl::Auto | Impl::Hierarchical, why) => {
            panic!("{case:?}: {why:?} ({})", ran.reason())
        }
        _ => assert_eq!(ran.imp, case.imp),
    }
}

/// Every op × dtype × size (flat, and along each dimension of a 3-d tensor) × implementation
/// on `g`, a group across hosts, against the f64 reference; returns the cases run.
fn sweep(g: &Group, seed: u64) -> Result<u64> {
    assert!(g.topology().spans_domains(), "{}", g.topology());
    let world = g.size();
    let (mut n, mut ran) = (0u64, 0u64);
    for coll in colls() {
        for &dtype in dtypes_for(coll) {
            let mut shapes: Vec<(Vec<usize>, Option<usize>)> = [1usize, 6, 1002]
                .into_iter()
                .map(|base| match coll {
                    Collective::ReduceScatter(_) => (vec![base * world], None),
                    _ => (vec![base], None),
                })
                .collect();
            if !matches!(coll, Collective::AllReduce(_)) {
                for dim in 0..3 {
                    let mut shape = vec![3, 2, 4];
                    if matches!(coll, Collective::ReduceScatter(_)) {
                        shape[dim] *= world;
                    }
                    shapes.push((shape, Some(dim)));
                }
            }
            for (shape, dim) in shapes {
                for (imp, symm) in IMPLS {
                    n += 1;
                    let numel: usize = shape.iter().product();
                    let piece = match coll {
                        Collective::ReduceScatter(_) => numel / world,
                        _ => numel,
                    };
                    if let Err(why) = g.supports(coll, dtype, imp, piece) {
                        check_refusal(g, imp, &why);
                        continue;
                    }
                    let case = Case {
                        coll,
                        dtype,
                        shape: shape.clone(),
                        dim,
                        imp,
                        input_symm: symm,
                        output_symm: symm,
                        seed: seed ^ n.wrapping_mul(0x9E37_79B9),
                    };
                    let d = common::checked(verify::run_checked(g, &case).inspect_err(|e| {
                        eprintln!("failed case {case:?}: {e}");
                    }))?;
                    check_reason(g, &case, piece, &d);
                    ran += 1;
                }
            }
        }
    }
    Ok(ran)
}

/// A hierarchical all-reduce of `n` bf16 elements captured in a graph (after
/// `prepare_hierarchical`), replayed with fresh inputs, in place, each replay checked.
fn hierarchical_in_a_graph(comm: &Communicator, g: &Group, seed: u64) -> Result<()> {
    let n = 4096 * g.topology().ranks_per_domain().unwrap_or(1);
    g.prepare_hierarchical(n * 2)?;
    let x = g.alloc_symmetric(DType::BF16, &[n])?;
    let counter = g.epoch_counter()?;
    let (graph, ran) = comm.capture(|| {
        g.bump(&counter)?;
        g.fill_random(&x, seed, Some(&counter))?;
        g.collective(
            Collective::AllReduce(ReduceOp::Sum),
            &x,
            &x,
            None,
            Impl::Hierarchical,
        )
    })?;
    assert!(
        matches!(ran.why, Why::Hierarchical { .. }),
        "{}",
        ran.reason()
    );
    let case = Case {
        coll: Collective::AllReduce(ReduceOp::Sum),
        dtype: DType::BF16,
        shape: vec![n],
        dim: None,
        imp: Impl::Hierarchical,
        input_symm: true,
        output_symm: true,
        seed,
    };
    for epoch in 1..=3u64 {
        graph.replay()?;
        comm.synchronize()?;
        let got = g.download_bytes(&x)?;
        verify::check(g, &case, epoch, &got).unwrap_or_else(|e| panic!("replay {epoch}: {e}"));
    }
    Ok(())
}

// ---- thread ranks (host backend in CI; CUDA where GPUs are) --------------------------------

/// The ranks learn every rank's host once; each group's domains follow from its members.
fn topology_per_group(b: TestBackend) {
    if !b.can_run(4) {
        return;
    }
    all_ok(run_on_hosts(4, 2, &b.config(), |comm| {
        let r = comm.rank();
        assert_eq!(comm.host_id().id, format!("host-{}", r / 2));
        assert_eq!(comm.host_id().source, HostIdSource::Bootstrap);
        assert_eq!(comm.topology().host_of(3), "host-1");
        let w = comm.world().topology();
        assert!(w.spans_domains());
        assert_eq!(
            w.to_string(),
            "2 NVLink domains (hosts): host-0 ranks [0, 1], host-1 ranks [2, 3]"
        );
        assert_eq!((w.my_domain(), w.rank_in_domain()), (r / 2, r % 2));
        // Tensor parallel inside a host: one domain, everything as on one machine.
        let tp = comm.split(GroupKind::Tp, r / 2)?;
        assert!(!tp.topology().spans_domains(), "{}", tp.topology());
        // Data parallel across the hosts: one rank on each.
        let dp = comm.split(GroupKind::Dp, r % 2)?;
        assert_eq!(dp.topology().domains().len(), 2);
        assert_eq!(dp.topology().ranks_per_domain(), Some(1));
        assert!(
            dp.describe().contains("across hosts") || comm.backend() == symmcomm::BackendKind::Host,
            "{}",
            dp.describe()
        );
        Ok(())
    }));
}

/// Every op and implementation allowed across hosts is right; the others say why not.
fn every_op_across_hosts(b: TestBackend) {
    let seed = common::seed();
    for (world, hosts) in [(2, 2), (4, 2), (3, 2)] {
        if !b.can_run(world) {
            continue;
        }
        let ran = all_ok(run_on_hosts(
            world,
            hosts,
            &small_pool(b.config()),
            |comm| sweep(comm.world(), seed),
        ));
        assert!(ran[0] > 0 && ran.iter().all(|&r| r == ran[0]), "{ran:?}");
        println!(
            "{world} ranks on {hosts} hosts: {} checked cases each",
            ran[0]
        );
    }
}

/// Asked for by name on a group across hosts, our kernels are refused, naming the topology;
/// the output stays untouched. So are the fused DCP combine, the fused add-RMSNorm and `local`.
fn our_kernels_refused_across_hosts(b: TestBackend) {
    if !b.can_run(4) {
        return;
    }
    all_ok(run_on_hosts(4, 2, &b.config(), |comm| {
        let g = comm.world();
        let x = g.alloc_symmetric(DType::BF16, &[512])?;
        let y = g.alloc_symmetric(DType::BF16, &[512])?;
        g.fill_random(&x, 7, None)?;
        g.poison(&y)?;
        let before = g.download_bytes(&y)?;
        for algo in Algo::ALL {
            let coll = match algo {
                Algo::CopyEngine => Collective::AllGather,
                _ => Collective::AllReduce(ReduceOp::Sum),
            };
            let out = if coll == Collective::AllGather {
                g.alloc_symmetric(DType::BF16, &[512 * 4])?
            } else {
                y.clone()
            };
            match g.collective(coll, &x, &out, None, Impl::Kernel(algo)) {
                Err(Error::ImplUnavailable {
                    ctx,
                    implementation,
                    why,
                }) => {
                    assert_eq!(implementation, Impl::Kernel(algo).name(comm.backend()));
                    assert_eq!(
                        (ctx.group.as_str(), ctx.rank, ctx.world),
                        ("world", g.rank(), 4)
                    );
                    assert!(
                        why.contains("one NVLink domain")
                            && why.contains("host-0 ranks [0, 1], host-1 ranks [2, 3]"),
                        "{why}"
                    );
                }
                other => panic!("{algo:?} across hosts: {other:?}"),
            }
        }
        assert_eq!(
            g.download_bytes(&y)?,
            before,
            "a refused call wrote its output"
        );
        let local = g.collective(
            Collective::AllReduce(ReduceOp::Sum),
            &x,
            &y,
            None,
            Impl::Local,
        );
        assert!(
            matches!(local, Err(Error::ImplUnavailable { .. })),
            "{local:?}"
        );
        let combine = symmcomm::dcp::DcpCombine::new(
            g,
            symmcomm::dcp::CombineSpec::new(2, 8, 16, DType::BF16, symmcomm::dcp::LseBase::Two),
            false,
        )?;
        let why = combine
            .unavailable(symmcomm::dcp::CombineImpl::Fused)
            .expect("the fused combine is our kernel");
        assert!(why.contains("one NVLink domain"), "{why}");
        // The fused add-RMSNorm too; auto runs it unfused, on NCCL's collective.
        use symmcomm::norm::{AddRmsNorm, NormForm, NormImpl};
        let t = |shape: &[usize]| g.alloc_symmetric(DType::BF16, shape);
        let (nx, nr, nw, no) = (t(&[2, 64])?, t(&[2, 64])?, t(&[64])?, t(&[2, 64])?);
        let args = AddRmsNorm::in_place(&nx, &nr, &nw, 1e-6, &no);
        match g.all_reduce_add_rmsnorm(&args, NormImpl::Fused(None)) {
            Err(Error::ImplUnavailable { why, .. }) => {
                assert!(why.contains("one NVLink domain"), "{why}");
            }
            other => panic!("the fused add-RMSNorm across hosts: {other:?}"),
        }
        let plan = g.add_rmsnorm_plan(NormForm::AllReduce, &args, NormImpl::Auto)?;
        assert_eq!(plan.imp, NormImpl::Unfused, "{}", plan.reason());
        Ok(())
    }));
}

/// The hierarchical all-reduce: refused where it has no meaning (one domain, uneven domains,
/// a size that does not split, another collective), right where it has, in place and in a
/// graph, and its reason names what ran each step.
fn hierarchical_all_reduce(b: TestBackend) {
    let seed = common::seed();
    if b.can_run(4) {
        all_ok(run_on_hosts(4, 2, &small_pool(b.config()), |comm| {
            let g = comm.world();
            let refused = |coll, n: usize| g.supports(coll, DType::F32, Impl::Hierarchical, n);
            let sum = Collective::AllReduce(ReduceOp::Sum);
            assert!(
                refused(sum, 7)
                    .unwrap_err()
                    .contains("do not split into the 2 ranks")
            );
            assert!(
                refused(Collective::AllGather, 8)
                    .unwrap_err()
                    .contains("all-reduces only")
            );
            let tp = comm.split(GroupKind::Tp, g.rank() / 2)?;
            let why = tp
                .supports(sum, DType::F32, Impl::Hierarchical, 8)
                .unwrap_err();
            assert!(why.contains("nothing to be hierarchical"), "{why}");
            // In place, every reduction.
            for op in ReduceOp::ALL {
                let x = g.alloc_plain(DType::F32, &[6, 10])?;
                g.upload(&x, &vec![1.0f32 + g.rank() as f32; 60])?;
                let ran =
                    g.collective(Collective::AllReduce(op), &x, &x, None, Impl::Hierarchical)?;
                let Why::Hierarchical {
                    domains,
                    per_domain,
                    all_reduce,
                    ..
                } = ran.why
                else {
                    panic!("{}", ran.reason());
                };
                assert_eq!((domains, per_domain), (2, 2));
                assert!(
                    matches!(all_reduce, Impl::Regular | Impl::Symmetric),
                    "{}",
                    ran.reason()
                );
                let want = match op {
                    ReduceOp::Sum => 10.0,
                    ReduceOp::Avg => 2.5,
                    ReduceOp::Max => 4.0,
                    ReduceOp::Min => 1.0,
                };
                assert_eq!(g.download::<f32>(&x)?, vec![want; 60], "{op:?}");
            }
            hierarchical_in_a_graph(comm, g, seed)?;
            Ok(())
        }));
    }
    if b.can_run(3) {
        all_ok(run_on_hosts(3, 2, &b.config(), |comm| {
            let why = comm
                .world()
                .supports(
                    Collective::AllReduce(ReduceOp::Sum),
                    DType::F32,
                    Impl::Hierarchical,
                    8,
                )
                .unwrap_err();
            assert!(why.contains("same number of ranks on every host"), "{why}");
            Ok(())
        }));
    }
    // Capturing before the hierarchy's groups exist is refused, naming the fix, not a hang.
    if b.can_run(2) {
        all_ok(run_on_hosts(2, 2, &b.config(), |comm| {
            let g = comm.world();
            let x = g.alloc_symmetric(DType::F32, &[8])?;
            g.upload(&x, &[g.rank() as f32 + 1.0; 8])?;
            comm.begin_capture()?;
            let r = g.collective(
                Collective::AllReduce(ReduceOp::Sum),
                &x,
                &x,
                None,
                Impl::Hierarchical,
            );
            comm.end_capture()?;
            match r {
                Err(Error::DuringCapture { action, .. }) => {
                    assert!(action.contains("prepare_hierarchical"), "{action}")
                }
                other => panic!("capturing before the hierarchy exists: {other:?}"),
            }
            Ok(())
        }));
    }
}

/// NCCL may refuse windows across hosts: when one rank's registration is refused (the test
/// hook), every rank turns the group's windows off, allocations still succeed, `nccl_symm`
/// names the refusal, `auto` runs the regular path saying why, and every result is right.
fn refused_windows_fall_back(b: TestBackend) {
    if !b.can_run(4) {
        return;
    }
    let seed = common::seed();
    all_ok(run_on_hosts(4, 2, &small_pool(b.config()), |comm| {
        let g = comm.world();
        if g.rank() == 3 {
            refuse_next_window_across_hosts("no symmetric memory across these hosts (test)");
        }
        let x = g.alloc_symmetric(DType::F32, &[1000])?;
        let y = g.alloc_symmetric(DType::F32, &[1000])?;
        assert!(x.is_symmetric() && g.pool_stats().segments == 1);
        let sum = Collective::AllReduce(ReduceOp::Sum);
        let why = g
            .supports(sum, DType::F32, Impl::Symmetric, 1000)
            .unwrap_err();
        assert!(
            why.contains("rank 3 of the group") && why.contains("across these hosts (test)"),
            "{why}"
        );
        match g.collective(sum, &x, &y, None, Impl::Symmetric) {
            Err(Error::ImplUnavailable { why, .. }) => assert!(why.contains("rank 3"), "{why}"),
            other => panic!("nccl_symm on refused windows: {other:?}"),
        }
        g.fill_random(&x, seed, None)?;
        let ran = g.all_reduce(&x, &y, ReduceOp::Sum)?;
        assert_eq!(ran.imp, Impl::Regular, "{}", ran.reason());
        assert!(
            ran.reason().contains("rank 3 of the group"),
            "{}",
            ran.reason()
        );
        // The pool keeps growing as plain memory, and everything stays right.
        let big = g.alloc_symmetric(DType::F32, &[1 << 19])?;
        assert!(big.is_symmetric() && g.pool_stats().segments >= 2);
        sweep(g, seed)?;
        Ok(())
    }));
}

/// `b`'s small-pool configuration with a table of f32 all-reduce rows of 4 ranks, each
/// `(max_bytes, domains, best)`, for both modes and unstaged.
fn with_all_reduce_rows(b: TestBackend, rows: Vec<(usize, usize, Impl)>) -> CommConfig {
    let mut config = small_pool(b.config());
    config.table = TableSource::Given(DispatchTable {
        source: "test".into(),
        device: "any".into(),
        backend: match b {
            TestBackend::Host => BackendKind::Host,
            TestBackend::Cuda => BackendKind::Cuda,
        },
        rows: rows
            .into_iter()
            .map(|(max_bytes, domains, best)| DispatchRow {
                op: "all_reduce".into(),
                dtype: DType::F32,
                world: 4,
                max_bytes,
                mode: None,
                domains,
                best,
                stage: false,
                measured_us: Default::default(),
            })
            .collect(),
        norm_rows: Vec::new(),
    });
    config
}

/// A table with rows for groups across 2 hosts (NCCL's regular path measured faster up to
/// 4 KiB, the symmetric one above): `auto` on such a group follows them, says so, and is right;
/// the rows inside one domain (our one-shot kernel) never apply across hosts.
fn auto_follows_rows_measured_across_hosts(b: TestBackend) {
    if !b.can_run(4) {
        return;
    }
    let seed = common::seed();
    let config = with_all_reduce_rows(
        b,
        vec![
            (4096, 2, Impl::Regular),
            (usize::MAX, 2, Impl::Symmetric),
            (usize::MAX, 1, Impl::Kernel(Algo::OneShot)),
        ],
    );
    all_ok(run_on_hosts(4, 2, &config, |comm| {
        let g = comm.world();
        for (elements, want) in [(256, Impl::Regular), (1 << 14, Impl::Symmetric)] {
            let case = Case {
                coll: Collective::AllReduce(ReduceOp::Sum),
                dtype: DType::F32,
                shape: vec![elements],
                dim: None,
                imp: Impl::Auto,
                input_symm: true,
                output_symm: true,
                seed: seed ^ elements as u64,
            };
            let ran = common::checked(verify::run_checked(g, &case))?;
            assert_eq!(ran.imp, want, "{elements} elements: {}", ran.reason());
            assert!(
                ran.reason().contains("the table's fastest path"),
                "{}",
                ran.reason()
            );
        }
        Ok(())
    }));
}

/// A table whose row across 2 hosts names the hierarchical all-reduce (measured faster than
/// NCCL's there): `auto` runs it eagerly (right, the steps in its reason); inside a capture it
/// runs it only where its groups and a large enough piece were made before, and otherwise takes
/// NCCL's path instead of failing; after `prepare_hierarchical`, hierarchically again.
fn auto_runs_hierarchical_where_the_table_measured_it(b: TestBackend) {
    if !b.can_run(4) {
        return;
    }
    let seed = common::seed();
    let config = with_all_reduce_rows(b, vec![(usize::MAX, 2, Impl::Hierarchical)]);
    all_ok(run_on_hosts(4, 2, &config, |comm| {
        let g = comm.world();
        let case = |elements: usize| Case {
            coll: Collective::AllReduce(ReduceOp::Sum),
            dtype: DType::F32,
            shape: vec![elements],
            dim: None,
            imp: Impl::Auto,
            input_symm: true,
            output_symm: true,
            seed: seed ^ elements as u64,
        };
        let ran = common::checked(verify::run_checked(g, &case(1024)))?;
        assert_eq!(ran.imp, Impl::Hierarchical, "{}", ran.reason());
        assert!(
            ran.reason().contains("reduce-scatter in the domain"),
            "{}",
            ran.reason()
        );
        // Captured at 4x the size the piece buffer was made for: NCCL's path, not an error.
        let big = 4096;
        let x = g.alloc_symmetric(DType::F32, &[big])?;
        let sum = Collective::AllReduce(ReduceOp::Sum);
        let (_graph, ran) = comm.capture(|| g.collective(sum, &x, &x, None, Impl::Auto))?;
        assert_eq!(ran.imp, Impl::Symmetric, "{}", ran.reason());
        g.prepare_hierarchical(big * 4)?;
        let (graph, ran) = comm.capture(|| g.collective(sum, &x, &x, None, Impl::Auto))?;
        assert_eq!(ran.imp, Impl::Hierarchical, "{}", ran.reason());
        // The captured hierarchical all-reduce is right.
        let checked_case = Case {
            imp: Impl::Hierarchical,
            ..case(big)
        };
        g.fill_random(&x, checked_case.seed, None)?;
        graph.replay()?;
        comm.synchronize()?;
        let got = g.download_bytes(&x)?;
        common::checked(verify::check(g, &checked_case, 0, &got))?;
        Ok(())
    }));
}

backend_tests!(
    topology_per_group,
    every_op_across_hosts,
    our_kernels_refused_across_hosts,
    hierarchical_all_reduce,
    refused_windows_fall_back,
    auto_follows_rows_measured_across_hosts,
    auto_runs_hierarchical_where_the_table_measured_it,
);

// ---- processes (the host backend over the store in CI; GPUs through NCCL's network) ---------

const BACKEND: &str = "SYMMCOMM_TEST_BACKEND";
const SEED: &str = "SYMMCOMM_TEST_SEED";

/// One rank of a job across simulated hosts: the sweep, the hierarchical all-reduce in a graph,
/// then a line the parent reads.
#[test]
fn child_hosts_rank() {
    if !role_is("hosts_rank") {
        return;
    }
    let backend = match std::env::var(BACKEND).as_deref() {
        Ok("cuda") => TestBackend::Cuda,
        _ => TestBackend::Host,
    };
    let seed = env_u64(SEED);
    let boot = Bootstrap::from_env(Duration::from_secs(60)).expect("rendezvous");
    let config = small_pool(backend.config());
    assert_eq!(
        config.backend,
        match backend {
            TestBackend::Cuda => BackendChoice::Cuda,
            TestBackend::Host => BackendChoice::Host,
        }
    );
    let comm = Communicator::new(boot, config).expect("communicator");
    let g = comm.world();
    println!("TOPOLOGY {}", g.topology());
    println!("GROUP {}", g.describe());
    let ran = sweep(g, seed).expect("sweep");
    hierarchical_in_a_graph(&comm, g, seed).expect("hierarchical in a graph");
    comm.close().expect("close");
    println!("SWEPT {ran}");
}

/// Rank `rank`'s variables for a job of `world` ranks on hosts of `per_host` ranks.
fn rank_env(
    backend: &str,
    rank: usize,
    world: usize,
    per_host: usize,
    port: u16,
    seed: u64,
) -> Vec<(&'static str, String)> {
    let host = format!("sim-host-{}", rank / per_host);
    let mut env = vec![
        (ROLE, "hosts_rank".into()),
        (BACKEND, backend.into()),
        (SEED, seed.to_string()),
        ("RANK", rank.to_string()),
        ("LOCAL_RANK", rank.to_string()),
        ("WORLD_SIZE", world.to_string()),
        ("MASTER_ADDR", "127.0.0.1".into()),
        ("MASTER_PORT", port.to_string()),
        ("SYMMCOMM_HOST_ID", host.clone()),
        ("NCCL_HOSTID", host),
        ("NCCL_NVLS_ENABLE", "0".into()),
    ];
    for (k, v) in symmcomm_lab::launch::SIMULATED_HOSTS_NCCL_ENV {
        if std::env::var(k).is_err() {
            env.push((k, v.into()));
        }
    }
    env
}

/// `world` ranks as processes on hosts of `per_host`: every one sweeps and says so.
fn processes_on_hosts(backend: &str, world: usize, per_host: usize) {
    let seed = common::seed();
    let port = free_port("127.0.0.1").expect("free port");
    let ranks: Vec<Proc> = (0..world)
        .map(|r| {
            procs::spawn(
                &format!("rank {r}"),
                "child_hosts_rank",
                &rank_env(backend, r, world, per_host, port, seed),
            )
        })
        .collect();
    let end_by = Instant::now() + Duration::from_secs(540);
    let mut swept = Vec::new();
    for (r, p) in ranks.into_iter().enumerate() {
        let out = p.finish(end_by);
        let topology = out.iter().find_map(|l| after(l, "TOPOLOGY ")).unwrap_or("");
        assert!(
            topology.starts_with(&format!("{} NVLink domains", world / per_host)),
            "rank {r}: {topology}\n{}",
            out.join("\n")
        );
        let n = out
            .iter()
            .find_map(|l| after(l, "SWEPT "))
            .and_then(|n| n.trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("rank {r} did not finish its sweep:\n{}", out.join("\n")));
        if r == 0 {
            for l in out.iter().filter(|l| l.contains("GROUP ")) {
                println!("rank 0: {l}");
            }
        }
        swept.push(n);
    }
    assert!(
        swept[0] > 0 && swept.iter().all(|&n| n == swept[0]),
        "{swept:?}"
    );
    println!("every rank ran {} checked cases", swept[0]);
}

/// CI: four processes on two simulated hosts, the host backend's data over the job's store.
#[test]
fn host_processes_on_two_hosts() {
    processes_on_hosts("host", 4, 2);
}

/// GPU: two GPUs as two hosts (one rank each): NCCL between them over sockets on loopback.
#[test]
fn cuda_two_gpus_as_two_hosts() {
    if !TestBackend::Cuda.can_run(2) {
        return;
    }
    processes_on_hosts("cuda", 2, 1);
}

/// GPU: four GPUs as two hosts of two: our kernels inside each host (the hierarchical
/// all-reduce's inner steps), NCCL across.
#[test]
fn cuda_four_gpus_as_two_hosts_of_two() {
    if !TestBackend::Cuda.can_run(4) {
        return;
    }
    processes_on_hosts("cuda", 4, 2);
}
