//! tp-decode: one tensor-parallel decode step of a Llama-3.1-8B-shaped decoder as an inference
//! engine on cudarc runs it, with symmcomm for the two all-reduces of every layer: the engine
//! owns the CUDA context and stream, the GEMMs run on cuBLAS, its kernels are compiled at run
//! time by NVRTC, and the whole step is captured in one CUDA graph per batch size. The output
//! is checked against the unsharded model; the step is timed with symmcomm's `auto`, with
//! NCCL's regular path, and with symmcomm's fused all-reduce + residual add + RMSNorm. On a machine without GPUs the same model code runs on the CPU in f32
//! over symmcomm's host backend.
//!
//! - [`model`]: dimensions, a rank's shard, the decode step over [`compute::Compute`];
//! - [`weights`]: random weights, KV cache and input from a seed, shard by shard;
//! - [`cpu`] and [`cuda`]: the two implementations of [`compute::Compute`]; [`nvrtc`]: the
//!   run-time compile of the CUDA one's kernels (`kernels.cu`);
//! - [`check`]: the comparison with the unsharded model and its tolerances;
//! - [`variant`]: how the all-reduces run (an implementation, or fused with the add and
//!   RMSNorm that follow);
//! - [`run`]: one rank's run; [`results`]: the table and the results file.

#![warn(missing_docs, unreachable_pub)]
#![deny(unused_must_use)]

pub mod check;
pub mod compute;
pub mod cpu;
pub mod cuda;
pub mod model;
pub mod nvrtc;
pub mod results;
pub mod run;
pub mod variant;
pub mod weights;
