//! DP attention's gathered buffer against an f64 reference written here from the definitions
//! (MAX_LEN: rank r's rows at r·max; SUM_LEN: at Σ_{q<r} b_q), with uneven token counts
//! including ranks with none, both padding modes, every dtype of activations, regular,
//! symmetric and `auto` paths, inside CUDA graphs; the agreement checks; and `decode-sim` on
//! the tiny preset. On every backend present.

mod common;

use common::{TestBackend, all_ok, small_pool};
use symmcomm::dp_attention::{DpBufferSpec, DpGatheredBuffer, DpPaddingMode, DpStep, TokenCounts};
use symmcomm::lab::fill;
use symmcomm::{
    Collective, Communicator, DType, Error, Group, GroupKind, Impl, ReduceOp, run_rank_threads,
};
use symmcomm_lab::bench::Variant;
use symmcomm_lab::decode_sim::{self, DECODE_STEP_OP, ModelDims, SimSpec, StepConfig};
use symmcomm_lab::reference::{self, Accumulation};

/// Token-count patterns for `world` ranks (capacity 8): a zero-count rank in the middle and
/// first, equal counts, nobody, and one so lopsided that the rule picks SUM_LEN.
fn patterns(world: usize) -> Vec<Vec<usize>> {
    let cut = |v: &[usize]| v[..world].to_vec();
    vec![
        cut(&[5, 0, 3, 1, 0, 6, 2, 4]),
        cut(&[0, 7, 2, 8, 1, 0, 0, 3]),
        vec![3; world],
        vec![0; world],
        cut(&[8, 1, 0, 0, 0, 0, 0, 0]),
    ]
}

/// Where rank `q`'s rows start in the gathered buffer, from the definitions.
fn start_of(mode: DpPaddingMode, counts: &[usize], q: usize) -> usize {
    match mode {
        DpPaddingMode::MaxLen => q * counts.iter().copied().max().unwrap_or(0),
        DpPaddingMode::SumLen => counts[..q].iter().sum(),
    }
}

/// Compare `got` with `want`/`tol` element by element; panics naming the first difference.
fn expect_close(what: &str, dtype: DType, got: &[u8], want: &[(usize, f64, f64)]) {
    let mut wrong = 0;
    let mut first = None;
    for &(k, w, tol) in want {
        let g = dtype.read_f64(got, k);
        if !(g.is_finite() && (g - w).abs() <= tol) {
            wrong += 1;
            first.get_or_insert((k, g, w));
        }
    }
    assert!(
        wrong == 0,
        "{what}: {wrong} of {} elements wrong, first {first:?} (index, got, want)",
        want.len()
    );
}

/// Gather then scatter one step on `buf`, with fresh inputs from `seed`, and check both.
fn check_step(
    g: &Group,
    buf: &DpGatheredBuffer,
    step: &DpStep,
    imp: Impl,
    seed: u64,
    separate_partial: bool,
) -> symmcomm::Result<()> {
    let spec = buf.spec();
    let (world, rank, hidden, dtype) = (g.size(), g.rank(), spec.hidden, spec.dtype);
    let counts = step.counts().counts().to_vec();
    let mode = step.mode();
    let what = format!("{mode} counts {counts:?} {dtype} {imp:?} rank {rank}");

    // Gather: each rank's rows, written into its send rows.
    g.fill_random(&buf.local_input(step)?, seed, None)?;
    g.poison(&buf.gathered(step)?)?;
    let out = buf.gather(step, imp)?;
    assert_eq!(out.tensor.shape(), [step.global_rows(), hidden]);
    assert_eq!(out.ran.is_none(), step.global_rows() == 0, "{what}");
    nccl_across_hosts(g, &out, &what);
    let got = g.download_bytes(&out.tensor)?;
    let mut want = Vec::new();
    for (q, &b) in counts.iter().enumerate() {
        assert_eq!(step.rows_of(q).start, start_of(mode, &counts, q), "{what}");
        for i in 0..b * hidden {
            let v = fill::value(dtype, seed, q as u64, 0, i as u64);
            want.push((start_of(mode, &counts, q) * hidden + i, v, 0.0));
        }
    }
    if mode == DpPaddingMode::SumLen {
        // No padding: every row is some rank's.
        assert_eq!(want.len(), step.global_rows() * hidden, "{what}");
    }
    expect_close(&format!("gather {what}"), dtype, &got, &want);

    // Scatter: the MLP's partial sums (different on every rank) over the gathered rows.
    let seed2 = seed ^ 0xABCD;
    let partial = if separate_partial {
        let t = g
            .scope(!buf.is_symmetric())
            .alloc(dtype, &[step.global_rows(), hidden])?;
        g.fill_random(&t, seed2, None)?;
        t
    } else {
        let t = buf.gathered(step)?;
        g.fill_random(&t, seed2, None)?;
        t
    };
    g.poison(&buf.padded_output(step)?)?;
    let out = if separate_partial {
        buf.scatter_from(step, &partial, imp)?
    } else {
        buf.scatter(step, imp)?
    };
    assert_eq!(out.tensor.shape(), [counts[rank], hidden]);
    nccl_across_hosts(g, &out, &what);
    let got = g.download_bytes(&out.tensor)?;
    let start = start_of(mode, &counts, rank);
    let want: Vec<(usize, f64, f64)> = (0..counts[rank] * hidden)
        .map(|i| {
            let vals: Vec<f64> = (0..world)
                .map(|q| fill::value(dtype, seed2, q as u64, 0, (start * hidden + i) as u64))
                .collect();
            let sum: f64 = vals.iter().sum();
            let mag: f64 = vals.iter().map(|v| v.abs()).sum();
            let tol = reference::tolerance(
                Collective::ReduceScatter(ReduceOp::Sum),
                dtype,
                world,
                mag,
                Accumulation::of(imp),
            );
            (i, sum, tol)
        })
        .collect();
    expect_close(&format!("scatter {what}"), dtype, &got, &want);
    Ok(())
}

/// On a group across hosts the gathered buffer's collectives run NCCL's paths (on the host
/// backend, its stand-ins), never our kernels, and `auto` says why.
fn nccl_across_hosts(g: &Group, out: &symmcomm::dp_attention::DpOutput, what: &str) {
    let Some(ran) = out.ran.as_ref().filter(|_| g.topology().spans_domains()) else {
        return;
    };
    assert!(
        matches!(ran.imp, Impl::Regular | Impl::Symmetric),
        "{what}: {} ran across hosts ({})",
        ran.name(),
        ran.reason()
    );
    if matches!(ran.why, symmcomm::dispatch::Why::Explicit) {
        return;
    }
    assert!(
        ran.reason().contains("NVLink domains"),
        "{what}: {}",
        ran.reason()
    );
}

fn gather_scatter_uneven_counts(b: TestBackend) {
    uneven_counts_on_hosts(b, 1, &[2, 3, 4, 8]);
}

/// The same on ranks split over two hosts (an uneven split for three ranks).
fn gather_scatter_across_hosts(b: TestBackend) {
    uneven_counts_on_hosts(b, 2, &[2, 3, 4]);
}

fn uneven_counts_on_hosts(b: TestBackend, hosts: usize, worlds: &[usize]) {
    let seed = common::seed();
    for &world in worlds {
        if !b.can_run(world) {
            continue;
        }
        let cfg = small_pool(b.config());
        all_ok(common::run_on_hosts(world, hosts, &cfg, |comm| {
            assert_eq!(comm.world().topology().domains().len(), hosts);
            let g = comm.world();
            let hidden = 24;
            let mut n = 0u64;
            for dtype in [DType::BF16, DType::F32] {
                for (imp, symmetric) in [
                    (Impl::Regular, false),
                    (Impl::Symmetric, true),
                    (Impl::Auto, true),
                    (Impl::Auto, false),
                ] {
                    let buf = DpGatheredBuffer::new(
                        g,
                        DpBufferSpec {
                            hidden,
                            dtype,
                            max_tokens_per_rank: 8,
                            symmetric,
                        },
                    )?;
                    assert_eq!(buf.is_symmetric(), symmetric);
                    for pattern in patterns(world) {
                        let counts = TokenCounts::exchange(g, pattern[g.rank()])?;
                        assert_eq!(counts.counts(), pattern.as_slice());
                        // The rule, from its definition.
                        let max = *pattern.iter().max().unwrap();
                        let sum: usize = pattern.iter().sum();
                        let by_rule = if sum * 2 >= max * world {
                            DpPaddingMode::MaxLen
                        } else {
                            DpPaddingMode::SumLen
                        };
                        assert_eq!(DpStep::new(counts.clone(), false).mode(), by_rule);
                        assert_eq!(
                            DpStep::new(counts.clone(), true).mode(),
                            DpPaddingMode::MaxLen
                        );
                        for mode in [DpPaddingMode::MaxLen, DpPaddingMode::SumLen] {
                            n += 1;
                            let step = DpStep::with_mode(counts.clone(), mode);
                            let rows = step.global_rows();
                            let piece = match mode {
                                DpPaddingMode::MaxLen => step.local_rows() * hidden,
                                DpPaddingMode::SumLen => rows * hidden,
                            };
                            let colls = match mode {
                                DpPaddingMode::MaxLen => [
                                    Collective::AllGather,
                                    Collective::ReduceScatter(ReduceOp::Sum),
                                ],
                                DpPaddingMode::SumLen => [Collective::AllReduce(ReduceOp::Sum); 2],
                            };
                            if rows > 0
                                && colls
                                    .iter()
                                    .any(|&c| g.supports(c, dtype, imp, piece).is_err())
                            {
                                continue;
                            }
                            check_step(g, &buf, &step, imp, seed ^ n, n.is_multiple_of(2))?;
                        }
                    }
                }
            }
            Ok(n)
        }));
    }
}

/// MAX_LEN captured once in a graph, replayed with fresh inputs each time.
fn graph_replays(b: TestBackend) {
    let seed = common::seed();
    for world in [2, 3, 4, 8] {
        if !b.can_run(world) {
            continue;
        }
        let cfg = small_pool(b.config());
        all_ok(run_rank_threads(world, &cfg, |comm| {
            let g = comm.world();
            let hidden = 64;
            let buf = DpGatheredBuffer::new(
                g,
                DpBufferSpec {
                    hidden,
                    dtype: DType::BF16,
                    max_tokens_per_rank: 4,
                    symmetric: true,
                },
            )?;
            let pattern = [3usize, 0, 2, 1, 0, 3, 1, 2];
            let counts = TokenCounts::exchange(g, pattern[g.rank()])?;
            let step = DpStep::new(counts, true);
            assert_eq!(step.mode(), DpPaddingMode::MaxLen);
            let partial = g.alloc_symmetric(DType::BF16, &[step.global_rows(), hidden])?;
            // Eagerly once (connects everything), then capture.
            buf.gather(&step, Impl::Auto)?;
            buf.scatter_from(&step, &partial, Impl::Auto)?;
            comm.synchronize()?;
            comm.begin_capture()?;
            let captured = buf
                .gather(&step, Impl::Auto)
                .and_then(|_| buf.scatter_from(&step, &partial, Impl::Auto));
            let graph = comm.end_capture()?;
            captured?;
            for replay in 0..3u64 {
                let (s1, s2) = (seed ^ (replay << 8), seed ^ (replay << 8) ^ 1);
                g.fill_random(&buf.local_input(&step)?, s1, None)?;
                g.fill_random(&partial, s2, None)?;
                g.poison(&buf.gathered(&step)?)?;
                g.poison(&buf.padded_output(&step)?)?;
                graph.replay()?;
                let got = g.download_bytes(&buf.gathered(&step)?)?;
                let mut want = Vec::new();
                for (q, &count) in pattern.iter().enumerate().take(world) {
                    for i in 0..count * hidden {
                        let v = fill::value(DType::BF16, s1, q as u64, 0, i as u64);
                        want.push((q * 3 * hidden + i, v, 0.0));
                    }
                }
                expect_close("graph gather", DType::BF16, &got, &want);
                let got = g.download_bytes(&buf.local_output(&step)?)?;
                let r = g.rank();
                let want: Vec<_> = (0..pattern[r] * hidden)
                    .map(|i| {
                        let vals: Vec<f64> = (0..world)
                            .map(|q| {
                                fill::value(
                                    DType::BF16,
                                    s2,
                                    q as u64,
                                    0,
                                    (r * 3 * hidden + i) as u64,
                                )
                            })
                            .collect();
                        let mag = vals.iter().map(|v| v.abs()).sum();
                        let tol = reference::tolerance(
                            Collective::ReduceScatter(ReduceOp::Sum),
                            DType::BF16,
                            world,
                            mag,
                            Accumulation::of(Impl::Auto),
                        );
                        (i, vals.iter().sum(), tol)
                    })
                    .collect();
                expect_close("graph scatter", DType::BF16, &got, &want);
            }
            Ok(())
        }));
    }
}

/// Sizes that every rank must agree on are checked, and a step that does not fit is refused,
/// on every rank, before anything runs.
fn agreement_and_capacity(b: TestBackend) {
    if !b.can_run(2) {
        return;
    }
    let cfg = small_pool(b.config());
    all_ok(run_rank_threads(2, &cfg, |comm: &Communicator| {
        let g = comm.world();
        let spec = DpBufferSpec {
            hidden: 16,
            dtype: DType::BF16,
            max_tokens_per_rank: 4,
            symmetric: true,
        };
        // A rank-dependent hidden size: refused on every rank, naming the other.
        let e = DpGatheredBuffer::new(
            g,
            DpBufferSpec {
                hidden: 16 + g.rank(),
                ..spec
            },
        )
        .unwrap_err();
        match &e {
            Error::Disagreement {
                other_rank, what, ..
            } => {
                assert_eq!(*other_rank, 1 - g.rank(), "{e}");
                assert!(what.contains("hidden"), "{e}");
            }
            _ => panic!("expected a disagreement, got {e}"),
        }
        let e = DpGatheredBuffer::new(
            g,
            DpBufferSpec {
                max_tokens_per_rank: 4 * (1 + g.rank()),
                ..spec
            },
        )
        .unwrap_err();
        assert!(matches!(e, Error::Disagreement { .. }), "{e}");

        let buf = DpGatheredBuffer::new(g, spec)?;
        // Rank 1 has more tokens than the buffer holds: every rank refuses the step.
        let counts = TokenCounts::exchange(g, [2, 5][g.rank()])?;
        let step = DpStep::new(counts, true);
        let e = buf.gather(&step, Impl::Auto).unwrap_err();
        match &e {
            Error::CapacityExceeded {
                needed, capacity, ..
            } => assert_eq!((*needed, *capacity), (5, 4), "{e}"),
            _ => panic!("expected capacity exceeded, got {e}"),
        }
        assert!(matches!(
            buf.scatter(&step, Impl::Auto).unwrap_err(),
            Error::CapacityExceeded { .. }
        ));

        // Counts agreed on another group do not size this group's buffer.
        let other = comm.split(GroupKind::Dp, 0)?;
        let counts = TokenCounts::exchange(&other, 1)?;
        let e = buf
            .gather(&DpStep::new(counts, false), Impl::Auto)
            .unwrap_err();
        assert!(
            matches!(e, Error::InvalidArgument { .. }) && e.to_string().contains("agreed on"),
            "{e}"
        );

        // A partial of the wrong shape is refused.
        let counts = TokenCounts::exchange(g, 2)?;
        let step = DpStep::new(counts.clone(), false);
        let wrong = g.alloc_symmetric(DType::BF16, &[3, 16])?;
        assert!(matches!(
            buf.scatter_from(&step, &wrong, Impl::Auto).unwrap_err(),
            Error::ShapeMismatch { .. }
        ));

        // SUM_LEN inside a graph would bake the counts in: refused during capture.
        let sum_len = DpStep::with_mode(counts, DpPaddingMode::SumLen);
        buf.gather(&sum_len, Impl::Auto)?;
        comm.synchronize()?;
        comm.begin_capture()?;
        let e = buf.gather(&sum_len, Impl::Auto).unwrap_err();
        let _graph = comm.end_capture()?;
        assert!(
            matches!(e, Error::InvalidArgument { .. }) && e.to_string().contains("SUM_LEN"),
            "{e}"
        );
        Ok(())
    }));
}

/// `decode-sim` on the tiny preset: every (config, batch, implementation) gives a row, and
/// every row's outputs match the reference, the DCP combine of every `dcp` layer included
/// (checked against the f64 merge; `auto` runs the fused combine where it can). World 3
/// cannot split the tiny model's 8 heads, so its dcp rows are skipped.
fn decode_sim_tiny(b: TestBackend) {
    let seed = common::seed();
    for world in [2, 3] {
        if !b.can_run(world) {
            continue;
        }
        let cfg = b.config();
        let rows = all_ok(run_rank_threads(world, &cfg, |comm| {
            let names: &[&str] = match comm.backend() {
                symmcomm::BackendKind::Host => &["host", "host_symm", "auto"],
                symmcomm::BackendKind::Cuda => &["nccl", "nccl_symm", "auto"],
            };
            let impls = names.iter().map(|s| Variant::parse(s).unwrap()).collect();
            let mut spec = SimSpec::new(ModelDims::tiny(), impls);
            spec.batches = vec![1, 5];
            spec.replays = 2;
            spec.repeats = 2;
            spec.warmup = 1;
            spec.seed = seed;
            if comm.backend() == symmcomm::BackendKind::Cuda {
                spec.compute_us = Some(2.0);
            }
            decode_sim::run(comm, comm.world(), &spec, &mut |_, _, _| {})
        }));
        let configs = if world == 2 { 3 } else { 2 };
        for r in &rows {
            assert_eq!(r.len(), configs * 2 * 3, "{r:?}");
            for row in r {
                assert_eq!(row.op, DECODE_STEP_OP);
                assert!(row.ok, "{row:?}");
                assert!(row.us > 0.0, "{row:?}");
                let c = StepConfig::parse(row.config.as_deref().unwrap()).unwrap();
                assert!(world == 2 || c != StepConfig::Dcp);
                assert_eq!(row.ran.is_some(), row.implementation == "auto");
                if let Some(ran) = &row.ran {
                    // What the auto rows ran names the combine exactly where dcp runs it.
                    let combine = ran
                        .split(' ')
                        .find_map(|op| op.strip_prefix("dcp_combine:"));
                    assert_eq!(combine.is_some(), c == StepConfig::Dcp, "{row:?}");
                    if let (Some(combine), TestBackend::Host) = (combine, b) {
                        // Thread ranks run the fused combine.
                        assert_eq!(combine, "host_fused", "{row:?}");
                    }
                }
            }
        }
        assert_eq!(rows[0], rows[1], "every rank reports the same rows");
    }
}

backend_tests!(
    gather_scatter_uneven_counts,
    gather_scatter_across_hosts,
    graph_replays,
    agreement_and_capacity,
    decode_sim_tiny
);
