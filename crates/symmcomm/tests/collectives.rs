//! Collectives against the f64 reference on fresh random inputs, on every backend present:
//! flat and along every dimension, every dtype and reduction, odd sizes, regular and symmetric
//! paths, `auto` with and without staging, graphs over several groups, and every bad input.

mod common;

use common::{TestBackend, all_ok, small_pool};
use symmcomm::CheckMode;
use symmcomm::dispatch::{DispatchRow, DispatchTable};
use symmcomm::{
    Algo, Collective, DType, Error, GroupKind, Impl, Placement, ReduceOp, SymmPolicy, TableSource,
    run_rank_threads,
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

fn flat_collectives(b: TestBackend) {
    let seed = common::seed();
    for world in [2, 3, 4, 8] {
        if !b.can_run(world) {
            continue;
        }
        let cfg = small_pool(b.config());
        all_ok(run_rank_threads(world, &cfg, |comm| {
            let g = comm.world();
            let mut n = 0u64;
            for coll in colls() {
                for &dtype in dtypes_for(coll) {
                    // Odd sizes and one that spans several 16-byte vectors; reduce-scatter
                    // inputs are multiples of the world size.
                    for base in [1usize, 7, 1001] {
                        let elems = match coll {
                            Collective::ReduceScatter(_) => base * world,
                            _ => base,
                        };
                        for (imp, symm) in [
                            (Impl::Regular, false),
                            (Impl::Symmetric, true),
                            (Impl::Auto, false),
                            (Impl::Auto, true),
                            (Impl::Kernel(Algo::OneShot), false),
                            (Impl::Kernel(Algo::OneShot), true),
                            (Impl::Kernel(Algo::TwoShot), false),
                            (Impl::Kernel(Algo::CopyEngine), true),
                            (Impl::Kernel(Algo::LowLatency), false),
                            (Impl::Kernel(Algo::LowLatency), true),
                        ] {
                            n += 1;
                            let piece = match coll {
                                Collective::ReduceScatter(_) => elems / world,
                                _ => elems,
                            };
                            if g.supports(coll, dtype, imp, piece).is_err() {
                                continue;
                            }
                            let case = Case {
                                coll,
                                dtype,
                                shape: vec![elems],
                                dim: None,
                                imp,
                                input_symm: symm,
                                output_symm: symm,
                                seed: seed ^ n,
                            };
                            let d = common::checked(
                                verify::run_checked(g, &case).inspect_err(|_| failed(&case)),
                            )?;
                            if imp == Impl::Auto {
                                // NCCL's rule without a table: symmetric iff both in windows
                                // and the symmetric path can take this call.
                                let want = if symm
                                    && g.supports(coll, dtype, Impl::Symmetric, piece).is_ok()
                                {
                                    Impl::Symmetric
                                } else {
                                    Impl::Regular
                                };
                                assert_eq!(d.imp, want, "{case:?}: {}", d.reason());
                            }
                        }
                    }
                }
            }
            Ok(n)
        }));
    }
}

fn failed(case: &Case) {
    eprintln!("failed case: {case:?}");
}

fn dim_collectives(b: TestBackend) {
    let seed = common::seed();
    for world in [2, 3, 4] {
        if !b.can_run(world) {
            continue;
        }
        let cfg = small_pool(b.config());
        all_ok(run_rank_threads(world, &cfg, |comm| {
            let g = comm.world();
            let mut n = 0u64;
            for coll in [
                Collective::AllGather,
                Collective::ReduceScatter(ReduceOp::Sum),
                Collective::ReduceScatter(ReduceOp::Max),
            ] {
                for dtype in [DType::BF16, DType::F32] {
                    for dim in 0..3 {
                        let mut shape = vec![3, 5, 2];
                        if matches!(coll, Collective::ReduceScatter(_)) {
                            shape[dim] *= world;
                        }
                        for (imp, symm) in [
                            (Impl::Regular, false),
                            (Impl::Symmetric, true),
                            (Impl::Auto, true),
                            (Impl::Kernel(Algo::OneShot), false),
                            (Impl::Kernel(Algo::CopyEngine), true),
                        ] {
                            n += 1;
                            if g.supports(coll, dtype, imp, 1).is_err() {
                                continue;
                            }
                            let case = Case {
                                coll,
                                dtype,
                                shape: shape.clone(),
                                dim: Some(dim),
                                imp,
                                input_symm: symm,
                                output_symm: symm,
                                seed: seed ^ (n << 20),
                            };
                            common::checked(
                                verify::run_checked(g, &case).inspect_err(|_| failed(&case)),
                            )?;
                        }
                    }
                }
            }
            Ok(())
        }));
    }
}

/// Every bad input gets its own error and leaves the poisoned output untouched.
/// A group of one rank: every collective's result is its input. `auto` copies it (or does
/// nothing in place) without a communicator; `local` names that; NCCL's paths agree.
fn one_rank_is_a_copy(b: TestBackend) {
    if !b.can_run(1) {
        return;
    }
    let s = common::seed();
    all_ok(run_rank_threads(1, &small_pool(b.config()), |comm| {
        let g = comm.world();
        let x = g.alloc_symmetric(DType::BF16, &[6, 40])?;
        g.fill_random(&x, s, None)?;
        let want = g.download_bytes(&x)?;
        let cases = [
            (Collective::AllReduce(ReduceOp::Sum), None),
            (Collective::AllReduce(ReduceOp::Max), None),
            (Collective::AllGather, None),
            (Collective::AllGather, Some(1)),
            (Collective::ReduceScatter(ReduceOp::Sum), None),
            (Collective::ReduceScatter(ReduceOp::Avg), Some(1)),
        ];
        for (coll, dim) in cases {
            for imp in [Impl::Auto, Impl::Local, Impl::Regular] {
                let y = g.alloc_plain(DType::BF16, &[6, 40])?;
                g.poison(&y)?;
                let ran = g.collective(coll, &x, &y, dim, imp)?;
                let want_imp = if imp == Impl::Regular {
                    Impl::Regular
                } else {
                    Impl::Local
                };
                assert_eq!(ran.imp, want_imp, "{coll:?} {imp:?}: {}", ran.reason());
                assert_eq!(g.download_bytes(&y)?, want, "{coll:?} dim {dim:?} {imp:?}");
            }
            // In place: nothing to do, the input stays.
            let ran = g.collective(coll, &x, &x, dim, Impl::Auto)?;
            assert_eq!(ran.imp, Impl::Local);
            assert_eq!(g.download_bytes(&x)?, want);
        }
        Ok(())
    }));
    // `local` on a group of two ranks is refused before anything runs.
    if b.can_run(2) {
        all_ok(run_rank_threads(2, &b.config(), |comm| {
            let g = comm.world();
            let x = g.alloc_symmetric(DType::F32, &[8])?;
            let e = g
                .collective(
                    Collective::AllReduce(ReduceOp::Sum),
                    &x,
                    &x,
                    None,
                    Impl::Local,
                )
                .unwrap_err();
            assert!(matches!(e, Error::ImplUnavailable { .. }), "{e}");
            Ok(())
        }));
    }
}

fn bad_inputs(b: TestBackend) {
    if !b.can_run(2) {
        return;
    }
    let cfg = small_pool(b.config());
    all_ok(run_rank_threads(2, &cfg, |comm| {
        let g = comm.world();
        let poisoned = |t: &symmcomm::Tensor| -> symmcomm::Result<bool> {
            Ok(g.download_bytes(t)?.iter().all(|&x| x == 0xFF))
        };
        let x = g.alloc_symmetric(DType::BF16, &[8])?;
        g.fill_random(&x, 1, None)?;

        let out = g.alloc_symmetric(DType::F32, &[8])?;
        g.poison(&out)?;
        let e = g.all_reduce(&x, &out, ReduceOp::Sum).unwrap_err();
        assert!(matches!(e, Error::DTypeMismatch { .. }), "{e}");
        assert!(poisoned(&out)?);

        let odd = g.alloc_symmetric(DType::BF16, &[7])?;
        let out = g.alloc_symmetric(DType::BF16, &[3])?;
        g.poison(&out)?;
        let e = g.reduce_scatter(&odd, &out, ReduceOp::Sum).unwrap_err();
        assert!(
            matches!(
                e,
                Error::NotDivisible {
                    len: 7,
                    world: 2,
                    ..
                }
            ),
            "{e}"
        );
        assert!(poisoned(&out)?);

        let m = g.alloc_symmetric(DType::BF16, &[2, 4])?;
        let t = m.transpose(0, 1).unwrap();
        let out = g.alloc_symmetric(DType::BF16, &[4, 2])?;
        g.poison(&out)?;
        let e = g.all_reduce(&t, &out, ReduceOp::Sum).unwrap_err();
        assert!(matches!(e, Error::NotContiguous { .. }), "{e}");
        assert!(poisoned(&out)?);

        let small = g.alloc_symmetric(DType::BF16, &[15])?;
        g.poison(&small)?;
        let e = g.all_gather(&x, &small).unwrap_err();
        assert!(
            matches!(
                e,
                Error::OutputTooSmall {
                    needed: 16,
                    got: 15,
                    ..
                }
            ),
            "{e}"
        );
        assert!(poisoned(&small)?);

        let ints = g.alloc_symmetric(DType::I32, &[8])?;
        let out = g.alloc_symmetric(DType::I32, &[8])?;
        g.poison(&out)?;
        let e = g.all_reduce(&ints, &out, ReduceOp::Sum).unwrap_err();
        assert!(
            matches!(
                e,
                Error::OpNotAllowed {
                    dtype: DType::I32,
                    ..
                }
            ),
            "{e}"
        );
        assert!(poisoned(&out)?);

        let plain = g.alloc_plain(DType::BF16, &[8])?;
        let out = g.alloc_symmetric(DType::BF16, &[8])?;
        g.poison(&out)?;
        let e = g
            .collective(
                Collective::AllReduce(ReduceOp::Sum),
                &plain,
                &out,
                None,
                Impl::Symmetric,
            )
            .unwrap_err();
        assert!(matches!(e, Error::NotSymmetric { .. }), "{e}");
        assert!(poisoned(&out)?);

        let cube = g.alloc_symmetric(DType::BF16, &[2, 2, 2])?;
        let out = g.alloc_symmetric(DType::BF16, &[2, 2, 4])?;
        g.poison(&out)?;
        let e = g.all_gather_dim(&cube, &out, 3).unwrap_err();
        assert!(
            matches!(
                e,
                Error::BadDim {
                    dim: 3,
                    ndim: 3,
                    ..
                }
            ),
            "{e}"
        );
        let e = g.all_gather_dim(&cube, &out, 1).unwrap_err();
        assert!(matches!(e, Error::ShapeMismatch { .. }), "{e}");
        assert!(poisoned(&out)?);

        let big = g.alloc_symmetric(DType::BF16, &[16])?;
        g.poison(&big)?;
        let a = big.narrow(0, 0, 8).unwrap();
        let c = big.narrow(0, 4, 8).unwrap();
        let e = g.all_reduce(&a, &c, ReduceOp::Sum).unwrap_err();
        assert!(matches!(e, Error::Overlap { .. }), "{e}");
        assert!(poisoned(&big)?);

        // A window of another group: refused by the symmetric path.
        let other = comm.split(GroupKind::Tp, 0)?;
        let foreign = other.alloc_symmetric(DType::BF16, &[8])?;
        let out = g.alloc_symmetric(DType::BF16, &[8])?;
        g.poison(&out)?;
        let e = g
            .collective(
                Collective::AllReduce(ReduceOp::Sum),
                &foreign,
                &out,
                None,
                Impl::Symmetric,
            )
            .unwrap_err();
        assert!(matches!(e, Error::ForeignBuffer { .. }), "{e}");
        assert!(poisoned(&out)?);
        // ...but the regular path may read any memory of this communicator.
        let got = {
            other.fill_random(&foreign, 5, None)?;
            // fill_random uses the group rank, equal in both groups here
            g.collective(
                Collective::AllReduce(ReduceOp::Sum),
                &foreign,
                &out,
                None,
                Impl::Regular,
            )?;
            g.download_bytes(&out)?
        };
        common::checked(verify::check(
            g,
            &Case {
                coll: Collective::AllReduce(ReduceOp::Sum),
                dtype: DType::BF16,
                shape: vec![8],
                dim: None,
                imp: Impl::Regular,
                input_symm: true,
                output_symm: true,
                seed: 5,
            },
            0,
            &got,
        ))?;
        Ok(())
    }));
}

/// Buffers of one communicator are refused by another.
fn foreign_communicator(b: TestBackend) {
    if !b.can_run(2) {
        return;
    }
    let cfg = small_pool(b.config());
    // Two communicators on the same thread ranks: start both, use a buffer across them.
    all_ok(run_rank_threads(2, &cfg, |comm| {
        let g = comm.world();
        let mine = g.alloc_symmetric(DType::F32, &[4])?;
        let boot = symmcomm::Bootstrap::threads(1, std::time::Duration::from_secs(5)).remove(0);
        let lone = symmcomm::Communicator::new(boot, small_pool(TestBackend::Host.config()))?;
        let theirs = lone.world().alloc_plain(DType::F32, &[4])?;
        let e = g.all_reduce(&theirs, &mine, ReduceOp::Sum).unwrap_err();
        assert!(matches!(e, Error::ForeignBuffer { .. }), "{e}");
        Ok(())
    }));
}

/// Collectives of two groups captured into one graph, fresh inputs written by a producer right
/// before each collective, every replay checked.
fn graph_of_two_groups(b: TestBackend) {
    if !b.can_run(2) {
        return;
    }
    let seed = common::seed();
    let cfg = small_pool(b.config());
    all_ok(run_rank_threads(2, &cfg, |comm| {
        let tp = comm.split(GroupKind::Tp, 0)?;
        let dcp = comm.split(GroupKind::Dcp, 0)?;
        let cases = [
            (
                &tp,
                Case {
                    coll: Collective::AllReduce(ReduceOp::Sum),
                    dtype: DType::BF16,
                    shape: vec![4096],
                    dim: None,
                    imp: Impl::Symmetric,
                    input_symm: true,
                    output_symm: true,
                    seed,
                },
            ),
            (
                &dcp,
                Case {
                    coll: Collective::AllGather,
                    dtype: DType::F16,
                    shape: vec![4, 3, 8],
                    dim: Some(1),
                    imp: Impl::Symmetric,
                    input_symm: true,
                    output_symm: false,
                    seed: seed ^ 1,
                },
            ),
            (
                &tp,
                Case {
                    coll: Collective::AllGather,
                    dtype: DType::BF16,
                    shape: vec![5000],
                    dim: None,
                    imp: Impl::Kernel(Algo::CopyEngine),
                    input_symm: false,
                    output_symm: true,
                    seed: seed ^ 3,
                },
            ),
            (
                &dcp,
                Case {
                    coll: Collective::AllReduce(ReduceOp::Sum),
                    dtype: DType::BF16,
                    shape: vec![33_000],
                    dim: None,
                    imp: Impl::Kernel(Algo::OneShot),
                    input_symm: false,
                    output_symm: false,
                    seed: seed ^ 4,
                },
            ),
            (
                &tp,
                Case {
                    coll: Collective::AllReduce(ReduceOp::Sum),
                    dtype: DType::F32,
                    shape: vec![70_001],
                    dim: None,
                    imp: Impl::Kernel(Algo::TwoShot),
                    input_symm: true,
                    output_symm: true,
                    seed: seed ^ 5,
                },
            ),
            (
                &dcp,
                Case {
                    coll: Collective::ReduceScatter(ReduceOp::Sum),
                    dtype: DType::F16,
                    shape: vec![2 * 4099],
                    dim: None,
                    imp: Impl::Kernel(Algo::OneShot),
                    input_symm: true,
                    output_symm: false,
                    seed: seed ^ 6,
                },
            ),
            (
                &dcp,
                Case {
                    coll: Collective::ReduceScatter(ReduceOp::Avg),
                    dtype: DType::F32,
                    shape: vec![1000],
                    dim: None,
                    imp: Impl::Regular,
                    input_symm: false,
                    output_symm: false,
                    seed: seed ^ 2,
                },
            ),
            // The low-latency protocol on both groups, beside the barrier kernels of the same
            // groups (one epoch counter per group), with tails that are not whole 8-byte lines.
            (
                &dcp,
                Case {
                    coll: Collective::AllReduce(ReduceOp::Sum),
                    dtype: DType::BF16,
                    shape: vec![5001],
                    dim: None,
                    imp: Impl::Kernel(Algo::LowLatency),
                    input_symm: false,
                    output_symm: false,
                    seed: seed ^ 7,
                },
            ),
            (
                &tp,
                Case {
                    coll: Collective::AllGather,
                    dtype: DType::U8,
                    shape: vec![2 * 1003],
                    dim: None,
                    imp: Impl::Kernel(Algo::LowLatency),
                    input_symm: false,
                    output_symm: true,
                    seed: seed ^ 8,
                },
            ),
            (
                &dcp,
                Case {
                    coll: Collective::ReduceScatter(ReduceOp::Sum),
                    dtype: DType::F32,
                    shape: vec![2 * 20_001],
                    dim: None,
                    imp: Impl::Kernel(Algo::LowLatency),
                    input_symm: true,
                    output_symm: false,
                    seed: seed ^ 9,
                },
            ),
        ];
        // Our kernels exist only on the CUDA backend.
        let cases: Vec<_> = cases
            .into_iter()
            .filter(|(g, c)| g.supports(c.coll, c.dtype, c.imp, 1).is_ok())
            .collect();
        let bufs: Vec<_> = cases
            .iter()
            .map(|(g, c)| verify::alloc(g, c))
            .collect::<symmcomm::Result<_>>()?;
        for (g, _) in &cases {
            g.prepare(1 << 16)?;
        }
        let counter = tp.epoch_counter()?;
        comm.begin_capture()?;
        tp.bump(&counter)?;
        for ((g, c), bf) in cases.iter().zip(&bufs) {
            verify::enqueue(g, c, bf, Some(&counter))?;
        }
        let graph = comm.end_capture()?;
        for replay in 1..=40u64 {
            graph.replay()?;
            comm.synchronize()?;
            assert_eq!(tp.epoch(&counter)?, replay);
            for ((g, c), bf) in cases.iter().zip(&bufs) {
                let got = g.download_bytes(&bf.output)?;
                common::checked(verify::check(g, c, replay, &got))?;
            }
        }
        Ok(())
    }));
}

/// Growing a pool while capturing is an error, on every rank, not a hang.
fn pool_growth_during_capture(b: TestBackend) {
    if !b.can_run(2) {
        return;
    }
    let cfg = small_pool(b.config());
    all_ok(run_rank_threads(2, &cfg, |comm| {
        let g = comm.world();
        let _warm = g.alloc_symmetric(DType::U8, &[1024])?;
        comm.begin_capture()?;
        let e = g.alloc_symmetric(DType::U8, &[8 << 20]).unwrap_err();
        assert!(matches!(e, Error::DuringCapture { .. }), "{e}");
        let e = g.alloc_plain(DType::U8, &[16]).unwrap_err();
        assert!(matches!(e, Error::DuringCapture { .. }), "{e}");
        // A slot that fits the existing segment is fine during capture.
        let fits = g.alloc_symmetric(DType::U8, &[1024])?;
        drop(fits);
        let _graph = comm.end_capture()?;
        Ok(())
    }));
}

/// `auto` stages a plain input into a window where the table says that wins.
fn auto_stages_by_table(b: TestBackend) {
    if !b.can_run(2) {
        return;
    }
    let seed = common::seed();
    let mut cfg = small_pool(b.config());
    cfg.table = TableSource::Given(DispatchTable {
        source: "test".into(),
        device: "any".into(),
        backend: symmcomm::BackendKind::Host,
        rows: vec![
            DispatchRow {
                op: "all_reduce".into(),
                dtype: DType::BF16,
                world: 2,
                max_bytes: 1 << 16,
                mode: None,
                domains: 1,
                best: Impl::Symmetric,
                stage: true,
                measured_us: Default::default(),
            },
            DispatchRow {
                op: "all_reduce".into(),
                dtype: DType::BF16,
                world: 2,
                max_bytes: usize::MAX,
                mode: None,
                domains: 1,
                best: Impl::Regular,
                stage: false,
                measured_us: Default::default(),
            },
        ],
        norm_rows: Vec::new(),
    });
    all_ok(run_rank_threads(2, &cfg, |comm| {
        let g = comm.world();
        let mut case = Case {
            coll: Collective::AllReduce(ReduceOp::Sum),
            dtype: DType::BF16,
            shape: vec![3000],
            dim: None,
            imp: Impl::Auto,
            input_symm: false,
            output_symm: false,
            seed,
        };
        let d = common::checked(verify::run_checked(g, &case))?;
        assert_eq!(d.imp, Impl::Symmetric, "{}", d.reason());
        assert!(d.staged_input && d.staged_output);
        case.shape = vec![1 << 16];
        let d = common::checked(verify::run_checked(g, &case))?;
        assert_eq!(d.imp, Impl::Regular, "{}", d.reason());
        Ok(())
    }));
}

/// Ranks that ask their pools for different sizes are stopped before registering, on every
/// rank, with the first differing request named.
fn spmd_divergence(b: TestBackend) {
    if !b.can_run(2) {
        return;
    }
    let mut cfg = small_pool(b.config());
    cfg.check = CheckMode::AtRegistration;
    let results = run_rank_threads(2, &cfg, |comm| {
        let g = comm.world();
        let _same = g.alloc_symmetric(DType::U8, &[100])?;
        let n = if comm.rank() == 0 { 4 << 20 } else { 5 << 20 };
        g.alloc_symmetric(DType::U8, &[n]).map(|_| ())
    });
    for (r, res) in results.into_iter().enumerate() {
        match res {
            Err(Error::SpmdDivergence {
                index,
                mine,
                theirs,
                ..
            }) => {
                // request #0 is the 100-byte one; #1 is the first difference... but the first
                // registration (for #0) verified only #0, so the divergence is #1.
                assert_eq!(index, 1, "rank {r}");
                let both = format!("{mine} / {theirs}");
                assert!(
                    both.contains("4194304") && both.contains("5242880"),
                    "rank {r}: {both}"
                );
            }
            other => panic!("rank {r}: expected SpmdDivergence, got {other:?}"),
        }
    }
}

/// Ranks that make the same requests in a different order are stopped at the next
/// registration, before it happens, naming the first request that differs.
fn spmd_divergence_in_order(b: TestBackend) {
    if !b.can_run(2) {
        return;
    }
    let mut cfg = small_pool(b.config());
    cfg.check = CheckMode::AtRegistration;
    let results = run_rank_threads(2, &cfg, |comm| {
        let g = comm.world();
        let _first = g.alloc_symmetric(DType::U8, &[100])?;
        let (a, c) = if comm.rank() == 0 {
            (65_536, 131_072)
        } else {
            (131_072, 65_536)
        };
        let _a = g.alloc_symmetric(DType::U8, &[a])?;
        let _c = g.alloc_symmetric(DType::U8, &[c])?;
        let res = g.alloc_symmetric(DType::U8, &[4 << 20]).map(|_| ());
        // Caught before the growth registered anything.
        assert_eq!(g.pool_stats().segments, 1, "rank {}", comm.rank());
        res
    });
    for (r, res) in results.into_iter().enumerate() {
        match res {
            Err(Error::SpmdDivergence {
                index,
                mine,
                theirs,
                ..
            }) => {
                assert_eq!(index, 1, "rank {r}: {mine} / {theirs}");
                let both = format!("{mine} / {theirs}");
                assert!(
                    both.contains("alloc of 65536 B") && both.contains("alloc of 131072 B"),
                    "rank {r}: {both}"
                );
            }
            other => panic!("rank {r}: expected SpmdDivergence, got {other:?}"),
        }
    }
}

/// Nothing that creates communicators or registers memory may run during capture: growing
/// the pool (`alloc_symmetric` past the segments, `reserve`), plain allocation, making a group.
fn registration_during_capture(b: TestBackend) {
    if !b.can_run(2) {
        return;
    }
    let cfg = small_pool(b.config());
    all_ok(run_rank_threads(2, &cfg, |comm| {
        let g = comm.world();
        let _warm = g.alloc_symmetric(DType::U8, &[1024])?;
        let before = g.pool_stats();
        comm.begin_capture()?;
        let e = g.prepare(8 << 20).unwrap_err();
        assert!(matches!(e, Error::DuringCapture { .. }), "{e}");
        let e = comm.split(GroupKind::Tp, 0).unwrap_err();
        assert!(matches!(e, Error::DuringCapture { .. }), "{e}");
        let _graph = comm.end_capture()?;
        assert_eq!(g.pool_stats(), before, "nothing was registered");
        Ok(())
    }));
}

/// A tensor outlives its communicator (it holds its memory), but another communicator refuses
/// it, and the output is left untouched.
fn tensor_after_its_communicator_is_dropped(b: TestBackend) {
    if !b.can_run(2) {
        return;
    }
    let cfg = small_pool(b.config());
    let olds = all_ok(run_rank_threads(2, &cfg, |comm| {
        let g = comm.world();
        let t = g.alloc_symmetric(DType::F32, &[8])?;
        g.fill_random(&t, 3, None)?;
        comm.synchronize()?;
        Ok(t)
    }));
    // Each rank drops its old tensor (and with it the old communicator's last resources) on
    // its own thread, as ranks do.
    let olds = std::sync::Mutex::new(olds.into_iter().map(Some).collect::<Vec<_>>());
    all_ok(run_rank_threads(2, &cfg, |comm| {
        let g = comm.world();
        let old = olds.lock().unwrap()[comm.rank()]
            .take()
            .expect("one old tensor per rank");
        let out = g.alloc_symmetric(DType::F32, &[8])?;
        g.poison(&out)?;
        let e = g.all_reduce(&old, &out, ReduceOp::Sum).unwrap_err();
        assert!(matches!(e, Error::ForeignBuffer { .. }), "{e}");
        assert!(g.download_bytes(&out)?.iter().all(|&x| x == 0xFF));
        Ok(())
    }));
}

/// Scopes follow the policy (with DCP, only the DCP group uses windows); raw addresses are found in the segment map.
fn scopes_and_lookup(b: TestBackend) {
    if !b.can_run(2) {
        return;
    }
    let mut cfg = small_pool(b.config());
    cfg.policy = SymmPolicy {
        enabled: true,
        dcp_size: 2,
    };
    all_ok(run_rank_threads(2, &cfg, |comm| {
        let tp = comm.split(GroupKind::Tp, 0)?;
        let dcp = comm.split(GroupKind::Dcp, 0)?;
        assert!(matches!(tp.scope(false).placement(), Placement::Plain(_)));
        assert_eq!(dcp.scope(false).placement(), Placement::Symmetric);
        assert!(matches!(dcp.scope(true).placement(), Placement::Plain(_)));
        let t = dcp.scope(false).alloc(DType::BF16, &[1000])?;
        assert!(t.is_symmetric());
        let p = tp.scope(false).alloc(DType::BF16, &[1000])?;
        assert!(!p.is_symmetric());
        let hit = dcp.lookup(t.addr()).expect("a window address is found");
        assert_eq!(hit.segment, 0);
        let last = dcp
            .lookup(t.addr() + t.bytes() as u64 - 1)
            .expect("last byte");
        assert_eq!(last.offset, hit.offset + t.bytes() - 1);
        assert!(dcp.lookup(p.addr()).is_none());
        assert!(tp.lookup(t.addr()).is_none());
        Ok(())
    }));
}

/// `auto` follows the graph rows while capturing and the eager rows otherwise.
fn auto_follows_the_mode(b: TestBackend) {
    if !b.can_run(2) {
        return;
    }
    let row = |mode, best| DispatchRow {
        op: "all_reduce".into(),
        dtype: DType::F32,
        world: 2,
        max_bytes: usize::MAX,
        mode: Some(mode),
        domains: 1,
        best,
        stage: false,
        measured_us: Default::default(),
    };
    let mut cfg = small_pool(b.config());
    cfg.table = TableSource::Given(DispatchTable {
        source: "test".into(),
        device: "any".into(),
        backend: symmcomm::BackendKind::Host,
        rows: vec![
            row(symmcomm_lab::bench::Mode::Eager, Impl::Regular),
            row(symmcomm_lab::bench::Mode::Graph, Impl::Symmetric),
        ],
        norm_rows: Vec::new(),
    });
    all_ok(run_rank_threads(2, &cfg, |comm| {
        let g = comm.world();
        let x = g.alloc_symmetric(DType::F32, &[1024])?;
        let y = g.alloc_symmetric(DType::F32, &[1024])?;
        g.fill_random(&x, 3, None)?;
        let d = g.all_reduce(&x, &y, ReduceOp::Sum)?;
        assert_eq!(d.imp, Impl::Regular, "eager: {}", d.reason());
        comm.begin_capture()?;
        let d = g.all_reduce(&x, &y, ReduceOp::Sum);
        let graph = comm.end_capture()?;
        let d = d?;
        assert_eq!(d.imp, Impl::Symmetric, "graph: {}", d.reason());
        graph.replay()?;
        comm.synchronize()?;
        Ok(())
    }));
}

backend_tests!(
    one_rank_is_a_copy,
    auto_follows_the_mode,
    flat_collectives,
    dim_collectives,
    bad_inputs,
    foreign_communicator,
    graph_of_two_groups,
    pool_growth_during_capture,
    auto_stages_by_table,
    spmd_divergence,
    spmd_divergence_in_order,
    registration_during_capture,
    tensor_after_its_communicator_is_dropped,
    scopes_and_lookup,
);
