//! On a GPU: the CUDA model (cuBLAS GEMMs and `kernels.cu`) against the CPU model (f32, every
//! activation rounded to bf16 where the GPU stores one), both unsharded, the same weights from
//! the same seed: the final hidden state of every row within the bf16 tolerance. This is the
//! check of the CUDA kernels against an independent reference; the binary's own check compares
//! the sharded GPU model with the unsharded one, which share every kernel.
//!
//! Skips with a message where no GPU (or no cuBLAS) is usable; fails instead when
//! `SYMMCOMM_REQUIRE_GPU=1`.

use std::sync::Arc;
use std::time::Duration;

use symmcomm::{BackendChoice, Bootstrap, CommConfig, Communicator, DType, Stream, TableSource};
use tp_decode::check::{max_row_rel_err, passes, tolerance};
use tp_decode::cpu::{CpuCompute, Storage};
use tp_decode::cuda::{CudaCompute, Kernels, check_cublas};
use tp_decode::model::{Dims, Shard, decode_step};
use tp_decode::run::Engine;

/// Whether a GPU and cuBLAS are usable; says why not, or fails under SYMMCOMM_REQUIRE_GPU=1.
fn gpu_or_skip() -> bool {
    let required = std::env::var("SYMMCOMM_REQUIRE_GPU").is_ok_and(|v| v == "1");
    let why = match symmcomm::info::cuda_devices() {
        Ok(0) => "no GPU".to_string(),
        Ok(_) => match check_cublas() {
            Ok(()) => return true,
            Err(e) => e.to_string(),
        },
        Err(e) => e,
    };
    assert!(!required, "SYMMCOMM_REQUIRE_GPU=1 but: {why}");
    eprintln!("SKIP: {why}; set SYMMCOMM_REQUIRE_GPU=1 to fail instead");
    false
}

/// A seed of this run (printed, so that a failure can be replayed).
fn seed() -> u64 {
    let s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64);
    eprintln!("seed {s:#x}");
    s
}

/// The largest per-row error of the GPU model against the CPU model for each of `batches`.
fn errors(dims: &Dims, batches: &[usize], seed: u64) -> Vec<(usize, Option<f64>)> {
    let engine = Engine::new(0).expect("GPU 0");
    let boot = Bootstrap::threads(1, Duration::from_secs(60)).remove(0);
    let config = CommConfig {
        backend: BackendChoice::Cuda,
        cuda_context: Some(engine.ctx.clone()),
        table: TableSource::None,
        ..CommConfig::default()
    };
    let comm = Communicator::new(boot, config).expect("a one-rank communicator");
    let g = comm
        .world()
        .on(&Stream::from_cudarc(&engine.stream))
        .expect("the group on the engine's stream");
    let max_batch = batches.iter().copied().max().unwrap_or(1);
    let shard = Shard::unsharded(dims.clone()).expect("a valid model");
    let reduce = g
        .alloc_plain(DType::BF16, &[max_batch, dims.hidden])
        .expect("the all-reduce buffer");
    let kernels = Arc::new(Kernels::load(&engine.ctx).expect("kernels.cu"));
    let (stream, s) = (engine.stream.clone(), shard.clone());
    let mut gpu = CudaCompute::new(stream, kernels, s, max_batch, seed, reduce, None)
        .expect("the CUDA model");
    let mut cpu =
        CpuCompute::new(shard, max_batch, seed, Storage::Bf16, None).expect("the CPU model");
    let mut out = Vec::new();
    for &batch in batches {
        gpu.poison_output().expect("poison");
        decode_step(&mut gpu, dims.layers, batch).expect("a GPU step");
        cpu.poison_output();
        decode_step(&mut cpu, dims.layers, batch).expect("a CPU step");
        let got = gpu.output(batch).expect("the GPU output");
        out.push((
            batch,
            max_row_rel_err(&got, &cpu.output(batch), dims.hidden),
        ));
    }
    out
}

#[test]
fn cuda_model_matches_the_cpu_model() {
    if !gpu_or_skip() {
        return;
    }
    let seed = seed();
    let tiny = Dims::preset("tiny").expect("tiny");
    // Llama-3.1-8B's widths with 2 layers and a context of 300 (301 slots: not a multiple of
    // any tile of the attention kernel), and the tiny preset (head_dim 16: two lanes a token).
    let llama = Dims {
        layers: 2,
        context: 300,
        ..Dims::preset("llama-3.1-8b").expect("llama")
    };
    for (dims, batches) in [(tiny, vec![1, 5]), (llama, vec![1, 3])] {
        for (batch, err) in errors(&dims, &batches, seed) {
            eprintln!("{}, batch {batch}: {err:?}", dims.describe());
            assert!(
                passes(err, tolerance(true)),
                "{}, batch {batch}: largest per-row relative error {err:?}, tolerance {}",
                dims.describe(),
                tolerance(true)
            );
        }
    }
}
