//! symmcomm inside an engine: collectives on a stream the engine owns, inside graphs the
//! engine captures (any capture mode), on the engine's own memory, and the errors of what a
//! capture cannot hold. On the host backend the engine's memory is host memory; the CUDA tests
//! use cudarc the way a Rust engine does (its context, its stream, its `CudaSlice`s) and run on
//! as many GPUs as are present, up to 2 (a one-GPU machine runs them with groups of one rank).

mod common;

use std::sync::Arc;

use common::{TestBackend, all_ok, seed};
use symmcomm::cudarc::driver::{CudaContext, CudaStream, sys};
use symmcomm::lab::fill;
use symmcomm::{
    CommConfig, Communicator, DType, Error, Group, GroupKind, ReduceOp, Stream, run_rank_threads,
};

/// The world size the CUDA tests run at here: 2 when two GPUs are present, else 1.
fn cuda_world() -> Option<usize> {
    if !TestBackend::Cuda.can_run(1) {
        return None;
    }
    Some(symmcomm::info::cuda_devices().map_or(1, |n| n.min(2)))
}

/// An engine's rank: its context (the device's primary one) and its own stream.
struct Engine {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
}

impl Engine {
    fn new(ordinal: usize) -> Engine {
        let ctx = CudaContext::new(ordinal).expect("the engine's context");
        let stream = ctx.new_stream().expect("the engine's stream");
        Engine { ctx, stream }
    }
}

/// Run `body` on `world` thread ranks, each an engine on its own GPU (rank r on device r,
/// whose primary context both the engine and the communicator run on).
fn on_engines<R: Send + std::fmt::Debug>(
    world: usize,
    body: impl Fn(&Communicator, &Engine) -> symmcomm::Result<R> + Sync,
) -> Vec<R> {
    let engines: Vec<_> = (0..world).map(Engine::new).collect();
    all_ok(run_rank_threads(
        world,
        &TestBackend::Cuda.config(),
        |comm| body(comm, &engines[comm.rank()]),
    ))
}

/// The sum over ranks of fill values, as f32 (exact for up to 2 ranks: one rounding).
fn fill_sum(seed: u64, world: usize, epoch: u64, n: usize) -> Vec<f32> {
    (0..n as u64)
        .map(|i| {
            (0..world as u64)
                .map(|r| fill::value(DType::F32, seed, r, epoch, i) as f32)
                .sum()
        })
        .collect()
}

// ---- the engine's own memory, in place ----------------------------------------------------

/// On the host backend the engine's memory is host memory: a `Vec` wrapped in place.
#[test]
fn host_wraps_engine_memory_in_place() {
    let config = TestBackend::Host.config();
    let s = seed();
    let results = run_rank_threads(3, &config, |comm| {
        let g = comm.world();
        let r = g.rank() as u64;
        let mut x: Vec<f32> = (0..37)
            .map(|i| fill::value(DType::F32, s, r, 0, i) as f32)
            .collect();
        let mut out = vec![f32::NAN; 37 * 3];
        // SAFETY: both vectors outlive every call below, which run synchronously.
        let (xt, gathered) = unsafe {
            (
                g.wrap_raw(x.as_mut_ptr() as u64, DType::F32, &[37])?,
                g.wrap_raw(out.as_mut_ptr() as u64, DType::F32, &[3, 37])?,
            )
        };
        g.all_gather(&xt, &gathered)?;
        let ran = g.all_reduce(&xt, &xt, ReduceOp::Sum)?;
        assert!(!ran.staged_input, "host memory of the engine is not staged");
        g.synchronize()?;
        Ok((x, out))
    });
    for (rank, res) in results.into_iter().enumerate() {
        let (sum, gathered) = res.unwrap_or_else(|e| panic!("rank {rank}: {e}"));
        let want: Vec<f32> = (0..37u64)
            .map(|i| {
                (0..3u64)
                    .map(|r| fill::value(DType::F32, s, r, 0, i) as f32)
                    .fold(0.0f32, |a, b| a + b)
            })
            .collect();
        for (i, (g, w)) in sum.iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-6 * w.abs().max(1.0),
                "rank {rank} [{i}]: {g} vs {w}"
            );
        }
        for r in 0..3u64 {
            for i in 0..37u64 {
                let want = fill::value(DType::F32, s, r, 0, i) as f32;
                assert_eq!(
                    gathered[(r * 37 + i) as usize],
                    want,
                    "rank {rank} piece {r}[{i}]"
                );
            }
        }
    }
}

/// The host backend has no CUDA streams: binding one is a clear error, and so is a null pointer.
#[test]
fn host_refuses_cuda_streams_and_null_memory() {
    let config = TestBackend::Host.config();
    all_ok(run_rank_threads(1, &config, |comm| {
        let g = comm.world();
        // SAFETY: never used to enqueue anything.
        let e = g.on(&unsafe { Stream::from_raw(0x1234) }).unwrap_err();
        assert!(e.to_string().contains("host backend"), "{e}");
        // SAFETY: refused before anything reads it.
        let e = unsafe { g.wrap_raw(0, DType::F32, &[4]) }.unwrap_err();
        assert!(e.to_string().contains("null"), "{e}");
        // SAFETY: as above.
        let e = unsafe { g.wrap_raw(2, DType::F32, &[4]) }.unwrap_err();
        assert!(e.to_string().contains("multiple of"), "{e}");
        Ok(())
    }));
}

/// A deadline of zero, or so long that the clock would overflow, is refused at start.
#[test]
fn host_refuses_unusable_timeouts() {
    for timeout in [std::time::Duration::ZERO, std::time::Duration::MAX] {
        let boot = symmcomm::Bootstrap::threads(1, std::time::Duration::from_secs(5)).remove(0);
        let config = CommConfig {
            timeout,
            ..TestBackend::Host.config()
        };
        let e = Communicator::new(boot, config).unwrap_err();
        assert!(e.to_string().contains("timeout"), "{e}");
    }
}

/// An allocator callback may not run a collective: it takes slots of segments reserved before,
/// at the same offsets on every rank, and fails clearly when they are full.
#[test]
fn host_reserved_allocations_never_grow() {
    let config = common::small_pool(TestBackend::Host.config());
    let hits = all_ok(run_rank_threads(2, &config, |comm| {
        let g = comm.world();
        let e = g.alloc_symmetric_reserved(DType::U8, &[4096]).unwrap_err();
        assert!(matches!(e, Error::CapacityExceeded { .. }), "{e}");
        g.reserve_symmetric(256 << 10)?;
        let a = g.alloc_symmetric_reserved(DType::F32, &[1000])?;
        let b = g.alloc_symmetric_reserved(DType::BF16, &[3, 7])?;
        let big = g
            .alloc_symmetric_reserved(DType::U8, &[64 << 20])
            .unwrap_err();
        assert!(matches!(big, Error::CapacityExceeded { .. }), "{big}");
        assert_eq!(g.pool_stats().segments, 1, "nothing grew");
        Ok([g.lookup(a.addr()).unwrap(), g.lookup(b.addr()).unwrap()])
    }));
    assert_eq!(hits[0], hits[1], "same offsets on every rank");
}

/// On GPUs: the engine's `CudaSlice`s as input and output, on the engine's stream, eager;
/// and a pointer into one of the group's windows used zero-copy.
#[test]
fn cuda_engine_memory_eager() {
    let Some(world) = cuda_world() else { return };
    let s = seed();
    on_engines(world, |comm, e| {
        let g = comm.world().on(&Stream::from_cudarc(&e.stream))?;
        let r = g.rank() as u64;
        let host: Vec<f32> = (0..1000)
            .map(|i| fill::value(DType::F32, s, r, 0, i) as f32)
            .collect();
        let x = e.stream.clone_htod(&host).expect("upload");
        let mut y = e.stream.alloc_zeros::<f32>(1000).expect("alloc");
        let ran = {
            let (xt, yt) = (g.borrow(&x, &[1000])?, g.borrow_mut(&mut y, &[1000])?);
            g.all_reduce(&xt, &yt, ReduceOp::Sum)?
        };
        eprintln!(
            "rank {r}: engine memory ran {} ({})",
            ran.name(),
            ran.reason()
        );
        let got = e.stream.clone_dtoh(&y).expect("download");
        assert_eq!(got, fill_sum(s, world, 0, 1000), "rank {r}: {}", ran.name());

        // A raw pointer into a window of the group: found there, used without staging.
        let w = g.alloc_symmetric(DType::F32, &[1000])?;
        g.upload(&w, &host)?;
        // SAFETY: `w` outlives the call and holds 1000 f32.
        let wt = unsafe { g.wrap_raw(w.addr(), DType::F32, &[1000])? };
        assert!(g.lookup(wt.addr()).is_some());
        let ran = g.all_reduce(&wt, &wt, ReduceOp::Sum)?;
        assert!(!ran.staged_input && !ran.staged_output, "{}", ran.reason());
        assert_eq!(g.download::<f32>(&w)?, fill_sum(s, world, 0, 1000));
        Ok(())
    });
}

// ---- the engine's capture ------------------------------------------------------------------

/// One graph, captured by the engine on its stream in `mode`: bump the epoch, produce fresh
/// inputs, all-reduce them (auto) into the engine's memory; replayed `replays` times, every
/// replay's output checked.
fn replay_checked(mode: sys::CUstreamCaptureMode, replays: u64) {
    let Some(world) = cuda_world() else { return };
    let s = seed();
    const N: usize = 4096;
    on_engines(world, |comm, e| {
        let g = comm.world().on(&Stream::from_cudarc(&e.stream))?;
        g.prepare(N * 4)?;
        let input = g.alloc_symmetric(DType::F32, &[N])?;
        let counter = g.epoch_counter()?;
        let mut out = e.stream.alloc_zeros::<f32>(N).expect("alloc");
        let outt = g.borrow_mut(&mut out, &[N])?;
        e.stream.begin_capture(mode).expect("begin capture");
        let captured = (|| {
            assert!(g.capturing()?);
            g.bump(&counter)?;
            g.fill_random(&input, s, Some(&counter))?;
            g.all_reduce(&input, &outt, ReduceOp::Sum)
        })();
        let graph = e
            .stream
            .end_capture(sys::CUgraphInstantiate_flags(0))
            .expect("end capture")
            .expect("a graph");
        let ran = captured?;
        eprintln!(
            "rank {}: captured {} ({})",
            g.rank(),
            ran.name(),
            ran.reason()
        );
        drop(outt);
        for epoch in 1..=replays {
            graph.launch().expect("replay");
            let got = e.stream.clone_dtoh(&out).expect("download");
            let want = fill_sum(s, world, epoch, N);
            if let Some(i) = (0..N).find(|&i| got[i] != want[i]) {
                panic!(
                    "rank {} replay {epoch} ({mode:?}): [{i}] = {} not {} ({})",
                    g.rank(),
                    got[i],
                    want[i],
                    ran.name()
                );
            }
        }
        assert_eq!(g.epoch(&counter)?, replays);
        Ok(())
    });
}

#[test]
fn cuda_engine_capture_global_1000_replays() {
    replay_checked(
        sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_GLOBAL,
        1000,
    );
}

#[test]
fn cuda_engine_capture_relaxed_1000_replays() {
    replay_checked(
        sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED,
        1000,
    );
}

#[test]
fn cuda_engine_capture_thread_local() {
    replay_checked(
        sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
        100,
    );
}

/// Two graphs, one per batch size, as engines capture them, sharing the same buffers; replayed
/// in turn, each checked.
#[test]
fn cuda_two_graphs_share_buffers() {
    let Some(world) = cuda_world() else { return };
    let s = seed();
    const HIDDEN: usize = 512;
    on_engines(world, |comm, e| {
        let g = comm.world().on(&Stream::from_cudarc(&e.stream))?;
        let max = 8 * HIDDEN;
        g.prepare(max * 4)?;
        let x = g.alloc_symmetric(DType::F32, &[8, HIDDEN])?;
        let y = g.alloc_symmetric(DType::F32, &[8, HIDDEN])?;
        let counter = g.epoch_counter()?;
        let mut graphs = Vec::new();
        for batch in [1usize, 8] {
            let (xb, yb) = (
                x.narrow(0, 0, batch).unwrap(),
                y.narrow(0, 0, batch).unwrap(),
            );
            e.stream
                .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_GLOBAL)
                .expect("begin");
            let r = (|| {
                g.bump(&counter)?;
                g.fill_random(&xb, s, Some(&counter))?;
                g.all_reduce(&xb, &yb, ReduceOp::Sum)
            })();
            let graph = e
                .stream
                .end_capture(sys::CUgraphInstantiate_flags(0))
                .expect("end")
                .expect("graph");
            r?;
            graphs.push((batch, graph));
        }
        for round in 0..200u64 {
            let (batch, graph) = &graphs[(round % 2) as usize];
            g.poison(&y)?;
            graph.launch().expect("replay");
            let got = g.download::<f32>(&y)?;
            let want = fill_sum(s, world, round + 1, batch * HIDDEN);
            assert_eq!(
                &got[..batch * HIDDEN],
                &want[..],
                "round {round} batch {batch}"
            );
            assert!(
                got[batch * HIDDEN..].iter().all(|v| v.is_nan()),
                "wrote past batch {batch}"
            );
        }
        Ok(())
    });
}

/// What a capture cannot hold is an error naming the operation and size, the capture is left
/// valid, and nothing hangs; then wrong memory is refused.
#[test]
fn cuda_capture_and_memory_errors() {
    let Some(world) = cuda_world() else { return };
    on_engines(world, |comm, e| {
        let g = comm.world().on(&Stream::from_cudarc(&e.stream))?;
        let small = g.alloc_plain(DType::F32, &[4, 64])?;
        let gathered = g.alloc_plain(DType::F32, &[4, 64 * world])?;
        e.stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_GLOBAL)
            .expect("begin");
        // Reordering along dim 1 needs scratch that was never prepared (one rank copies in
        // place of gathering, and needs none).
        let gather = g.all_gather_dim(&small, &gathered, 1);
        let plain = g.alloc_plain(DType::F32, &[16]).unwrap_err();
        // Larger than any segment registered so far: the pool would have to grow.
        let grow = g.alloc_symmetric(DType::U8, &[1 << 30]).unwrap_err();
        let prepare = g.prepare(1 << 20).unwrap_err();
        let split = comm
            .world()
            .on(&Stream::from_cudarc(&e.stream))?
            .split(GroupKind::Tp, 0)
            .unwrap_err();
        let graph = e
            .stream
            .end_capture(sys::CUgraphInstantiate_flags(0))
            .expect("the capture is still valid after the refused calls");
        drop(graph);
        let mut errors = vec![plain, grow, prepare, split];
        match gather {
            Err(e) => {
                assert!(e.to_string().contains("all_gather"), "{e}");
                errors.push(e);
            }
            Ok(ran) => assert!(world == 1 && ran.imp == symmcomm::Impl::Local, "{ran:?}"),
        }
        for err in &errors {
            let text = err.to_string();
            assert!(matches!(err, Error::DuringCapture { .. }), "{text}");
            assert!(
                text.contains(&format!("rank {}", g.rank())),
                "names the rank: {text}"
            );
        }
        assert!(
            errors[1].to_string().contains("1073741824"),
            "{}",
            errors[1]
        );

        // Wrong memory: host memory, a misaligned address, a range past the allocation.
        let host = [0f32; 16];
        // SAFETY: refused before use.
        let bad_host = unsafe { g.wrap_raw(host.as_ptr() as u64, DType::F32, &[16]) };
        assert!(bad_host.is_err(), "host memory accepted as device memory");
        let x = e.stream.alloc_zeros::<f32>(64).expect("alloc");
        let base = g.borrow(&x, &[64])?.addr();
        // SAFETY: refused before use.
        let e1 = unsafe { g.wrap_raw(base + 2, DType::F32, &[4]) }.unwrap_err();
        assert!(e1.to_string().contains("multiple of"), "{e1}");
        // SAFETY: refused before use (the allocation may be rounded up, so ask for far more).
        let e2 = unsafe { g.wrap_raw(base, DType::F32, &[1 << 24]) }.unwrap_err();
        assert!(e2.to_string().contains("past the end"), "{e2}");
        // Non-contiguous engine memory: the collective names shape and strides.
        // SAFETY: 64 f32 cover every element the strides reach.
        let strided = unsafe { g.wrap_raw_strided(base, DType::F32, &[4, 8], &[16, 1])? };
        let e3 = g.all_reduce(&strided, &strided, ReduceOp::Sum).unwrap_err();
        assert!(matches!(e3, Error::NotContiguous { .. }), "{e3}");
        // A stream of another device, when there is one.
        if world > 1 {
            let other = Engine::new((g.rank() + 1) % world);
            let e4 = g.on(&Stream::from_cudarc(&other.stream)).unwrap_err();
            assert!(e4.to_string().contains("another CUDA context"), "{e4}");
            let y = other.stream.alloc_zeros::<f32>(64).expect("alloc");
            let e5 = g.borrow(&y, &[64]).unwrap_err();
            assert!(e5.to_string().contains("memory of device"), "{e5}");
        }
        Ok(())
    });
}

/// The communicator made on the engine's context (`CommConfig::cuda_context`) takes its device
/// from it; a group bound to the engine's stream is the same group as the one on the
/// communicator's own stream.
#[test]
fn cuda_adopts_the_engines_context() {
    if cuda_world().is_none() {
        return;
    }
    let engine = Engine::new(0);
    let boot = symmcomm::Bootstrap::threads(1, std::time::Duration::from_secs(30)).remove(0);
    let comm = Communicator::new(
        boot,
        CommConfig {
            cuda_context: Some(engine.ctx.clone()),
            ..TestBackend::Cuda.config()
        },
    )
    .expect("a communicator on the engine's context");
    assert!(comm.describe().contains("cuda:0"), "{}", comm.describe());
    // The engine's context keeps its own settings: symmcomm turned nothing off on it.
    assert!(engine.ctx.is_event_tracking());
}

#[test]
fn cuda_group_views_share_one_group() {
    let Some(world) = cuda_world() else { return };
    on_engines(world, |comm, e| {
        let own = comm.world().clone();
        let bound: Group = own.on(&Stream::from_cudarc(&e.stream))?;
        assert!(bound.same_group(&own));
        assert_eq!(bound.stream().raw(), Some(e.stream.cu_stream() as u64));
        assert_eq!(own.stream().raw(), None);
        Ok(())
    });
}
