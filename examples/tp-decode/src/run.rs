//! One rank's run: build the tensor-parallel shard and the unsharded reference, then per batch
//! size and implementation run the step (eagerly, then in a CUDA graph on GPUs), check its
//! output against the reference, time it, and gather every rank's measurements on rank 0.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use cudarc::driver::{CudaContext, CudaGraph, CudaStream, sys};
use serde::{Deserialize, Serialize};
use symmcomm::{Communicator, DType, Group, GroupKind, Stream};

use crate::check::{max_row_rel_err, passes, tolerance};
use crate::cpu::{CpuCompute, CpuTp, Storage};
use crate::cuda::{CudaCompute, Kernels, check_cublas};
use crate::model::{Dims, Shard, decode_step};
use crate::variant::Variant;

/// What every rank runs.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The model.
    pub dims: Dims,
    /// Batch sizes, one graph each.
    pub batches: Vec<usize>,
    /// How the all-reduces run, one measurement each (`auto`, `nccl`, `fused`, ...).
    pub impls: Vec<Variant>,
    /// Timed steps (graph replays on GPUs) per batch and implementation.
    pub replays: usize,
    /// Seed of the weights, KV cache and input.
    pub seed: u64,
    /// How the CPU stores activations (the host backend only).
    pub host_storage: Storage,
}

impl Settings {
    fn max_batch(&self) -> usize {
        self.batches.iter().copied().max().unwrap_or(1)
    }
}

/// One (batch, implementation) point of one rank, or of all ranks once gathered.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Measure {
    /// Sequences in the step (one new token each).
    pub batch: usize,
    /// The variant asked for, by its name on the backend (`auto`, `nccl`, `fused`, `host`).
    pub imp: String,
    /// Median µs per step (gathered: the slowest rank's).
    pub us: f64,
    /// The largest per-row relative L2 error of the checked runs; `None` when an output was
    /// not finite.
    pub rel_err: Option<f64>,
    /// Whether every checked run passed the tolerance.
    pub ok: bool,
    /// What the all-reduces ran.
    pub ran: Vec<String>,
}

/// The engine of one GPU: its context (the device's primary one) and its stream.
#[derive(Debug)]
pub struct Engine {
    /// The context, handed to the communicator too.
    pub ctx: Arc<CudaContext>,
    /// The stream every kernel, GEMM and collective of the step is enqueued on.
    pub stream: Arc<CudaStream>,
}

impl Engine {
    /// The primary context of GPU `ordinal` and a new stream on it.
    pub fn new(ordinal: usize) -> Result<Engine> {
        let ctx = CudaContext::new(ordinal).with_context(|| format!("opening GPU {ordinal}"))?;
        // SAFETY: this engine allocates, uses and frees (stream-ordered) every buffer on its
        // one stream, so nothing needs cudarc's per-buffer events, which would otherwise be
        // recorded and waited on inside the graph captures.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream()?;
        Ok(Engine { ctx, stream })
    }
}

/// The worst of several checked runs' errors (`None`, not finite, is the worst).
fn worst(errs: &[Option<f64>]) -> Option<f64> {
    errs.iter().try_fold(0f64, |acc, e| e.map(|e| acc.max(e)))
}

/// The median of `v`.
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The host backend: the f32 CPU model, ranks as threads (or processes), each step timed with
/// the wall clock.
pub fn run_host(comm: &Communicator, s: &Settings) -> Result<Vec<Measure>> {
    let tp = comm.split(GroupKind::Tp, 0)?;
    let (max_batch, hidden) = (s.max_batch(), s.dims.hidden);
    let shard = Shard::new(s.dims.clone(), tp.size(), tp.rank())?;
    let cpu_tp = CpuTp::new(tp.clone(), max_batch, hidden)?;
    let cpu_tp = (tp.size() > 1).then_some(cpu_tp);
    let storage = s.host_storage;
    let mut model = CpuCompute::new(shard, max_batch, s.seed, storage, cpu_tp)?;
    let mut reference = CpuCompute::new(
        Shard::unsharded(s.dims.clone())?,
        max_batch,
        s.seed,
        storage,
        None,
    )?;
    let layers = s.dims.layers;
    let mut measures = Vec::new();
    for &batch in &s.batches {
        decode_step(&mut reference, layers, batch)?;
        let want = reference.output(batch);
        for &imp in &s.impls {
            // The fused operation is bf16: its points carry bf16 rounding even in f32 runs.
            let tol = tolerance(storage == Storage::Bf16 || imp.rounds_to_bf16());
            model.set_variant(imp);
            let first = checked_cpu(&mut model, &want, batch, layers)?;
            let mut times = Vec::with_capacity(s.replays);
            for _ in 0..s.replays {
                tp.barrier()?;
                let t0 = Instant::now();
                decode_step(&mut model, layers, batch)?;
                times.push(t0.elapsed().as_secs_f64() * 1e6);
            }
            let last = checked_cpu(&mut model, &want, batch, layers)?;
            let err = worst(&[first, last]);
            measures.push(Measure {
                batch,
                imp: imp.name(comm.backend()),
                us: median(times),
                rel_err: err,
                ok: passes(first, tol) && passes(last, tol),
                ran: model.ran(),
            });
        }
    }
    Ok(measures)
}

/// Poison the output, run `step`, and compare the first `batch` rows of the output with `want`.
fn checked(
    model: &mut CudaCompute,
    want: &[f32],
    batch: usize,
    step: impl FnOnce(&mut CudaCompute) -> Result<()>,
) -> Result<Option<f64>> {
    model.poison_output()?;
    step(model)?;
    Ok(max_row_rel_err(
        &model.output(batch)?,
        want,
        want.len() / batch,
    ))
}

/// [`checked`] on the CPU: poison, one step, compare.
fn checked_cpu(
    model: &mut CpuCompute,
    want: &[f32],
    batch: usize,
    layers: usize,
) -> Result<Option<f64>> {
    model.poison_output();
    decode_step(model, layers, batch)?;
    Ok(max_row_rel_err(
        &model.output(batch),
        want,
        want.len() / batch,
    ))
}

/// Capture what `step` enqueues on `stream` into a graph (global capture mode, as an engine
/// captures its decode step), ending the capture whatever `step` returned; `step`'s error
/// comes first.
fn capture(stream: &Arc<CudaStream>, step: impl FnOnce() -> Result<()>) -> Result<CudaGraph> {
    stream.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_GLOBAL)?;
    let enqueued = step();
    let graph = stream.end_capture(sys::CUgraphInstantiate_flags(0));
    enqueued.context("capturing the decode step")?;
    graph?.context("the capture recorded nothing")
}

/// Median µs of `replays` replays of `graph`, each timed with CUDA events on `stream`, after
/// three untimed ones and a barrier of the group.
fn time_replays(engine: &Engine, tp: &Group, graph: &CudaGraph, replays: usize) -> Result<f64> {
    for _ in 0..3 {
        graph.launch()?;
    }
    tp.barrier()?;
    let flags = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
    let mut events = Vec::with_capacity(replays);
    for _ in 0..replays {
        let start = engine.stream.record_event(flags)?;
        graph.launch()?;
        events.push((start, engine.stream.record_event(flags)?));
    }
    engine.stream.synchronize()?;
    let times = events
        .iter()
        .map(|(a, b)| Ok(f64::from(a.elapsed_ms(b)?) * 1e3))
        .collect::<Result<Vec<f64>>>()?;
    Ok(median(times))
}

/// The CUDA backend, one process per GPU: the engine's own context and stream, the TP group
/// bound to that stream, one graph per (batch, implementation) timed by replays.
pub fn run_cuda(comm: &Communicator, engine: &Engine, s: &Settings) -> Result<Vec<Measure>> {
    check_cublas()?;
    let tp = comm
        .split(GroupKind::Tp, 0)?
        .on(&Stream::from_cudarc(&engine.stream))?;
    let (max_batch, hidden) = (s.max_batch(), s.dims.hidden);
    // The largest all-reduce of a step: o_proj's and down_proj's output at the largest batch,
    // bf16. After this nothing allocates, registers or compiles inside a capture.
    tp.prepare(max_batch * hidden * DType::BF16.size())?;
    let window = tp.alloc_symmetric(DType::BF16, &[max_batch, hidden])?;
    let kernels = Arc::new(Kernels::load(&engine.ctx)?);
    let shard = Shard::new(s.dims.clone(), tp.size(), tp.rank())?;
    let group = (tp.size() > 1).then(|| tp.clone());
    let mut model = CudaCompute::new(
        engine.stream.clone(),
        kernels.clone(),
        shard,
        max_batch,
        s.seed,
        window,
        group,
    )?;
    // The unsharded model on the same GPU, all-reduce buffer in plain memory.
    let mut reference = CudaCompute::new(
        engine.stream.clone(),
        kernels,
        Shard::unsharded(s.dims.clone())?,
        max_batch,
        s.seed,
        tp.alloc_plain(DType::BF16, &[max_batch, hidden])?,
        None,
    )?;
    let tol = tolerance(true);
    let layers = s.dims.layers;
    let mut measures = Vec::new();
    for &batch in &s.batches {
        decode_step(&mut reference, layers, batch)?;
        let want = reference.output(batch)?;
        for &imp in &s.impls {
            model.set_variant(imp);
            // Eagerly first: cuBLAS picks its kernels, symmcomm its paths, outside the capture.
            let eager = checked(&mut model, &want, batch, |m| decode_step(m, layers, batch))?;
            model.set_variant(imp); // what the graph runs, from here
            let graph = capture(&engine.stream, || decode_step(&mut model, layers, batch))?;
            let first = checked(&mut model, &want, batch, |_| Ok(graph.launch()?))?;
            let us = time_replays(engine, &tp, &graph, s.replays)?;
            let last = checked(&mut model, &want, batch, |_| Ok(graph.launch()?))?;
            measures.push(Measure {
                batch,
                imp: imp.name(comm.backend()),
                us,
                rel_err: worst(&[eager, first, last]),
                ok: [eager, first, last].iter().all(|&e| passes(e, tol)),
                ran: model.ran(),
            });
        }
    }
    Ok(measures)
}

/// Every rank's measurements, merged on every rank: per point the slowest rank's time, the
/// largest error, whether every rank passed, and everything that ran. Collective.
pub fn gather(comm: &Communicator, mine: &[Measure]) -> Result<Vec<Measure>> {
    let all = comm
        .control()
        .all_gather("tp-decode measures", &serde_json::to_vec(mine)?)?;
    let mut merged: Vec<Measure> = mine.to_vec();
    for bytes in all {
        let theirs: Vec<Measure> = serde_json::from_slice(&bytes)?;
        for (m, t) in merged.iter_mut().zip(theirs) {
            m.us = m.us.max(t.us);
            m.rel_err = worst(&[m.rel_err, t.rel_err]);
            m.ok &= t.ok;
            for r in t.ran {
                if !m.ran.contains(&r) {
                    m.ran.push(r);
                }
            }
        }
    }
    Ok(merged)
}
