//! symmcomm: the collective communication of LLM-inference parallelism (tensor parallel,
//! DP attention, decode context parallel) on NCCL symmetric memory, with our own NVLink kernels
//! where they beat NCCL.
//!
//! One API, two backends: `host` (ranks are threads, memory is host memory; the reference for
//! every test) and `cuda` (NCCL plus our kernels). See the README for an example.

#![warn(missing_docs, unreachable_pub)]
#![deny(unused_must_use)]

/// The README's example, compiled and run as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeExample;

mod abort;
pub mod backend;
pub mod bootstrap;
mod collective;
pub mod comm;
pub mod dcp;
pub mod dispatch;
pub mod dp_attention;
pub mod dtype;
pub mod error;
pub mod group;
mod interop;
pub mod kernels;
#[cfg(feature = "lab")]
pub mod lab;
pub mod memory;
pub mod policy;
pub mod pool;
pub mod rank_threads;
mod stream;
pub mod symm_pool;
pub mod tensor;

pub use abort::abort_all;
pub use backend::{Algo, BackendKind, Collective, Impl};
pub use bootstrap::Bootstrap;
pub use comm::{BackendChoice, CommConfig, Communicator, Graph, TableSource};
/// The cudarc this library is built with: an engine's cudarc types must come from this version.
pub use cudarc;
pub use dtype::{DType, Element, ReduceOp};
pub use error::{Error, Op, OpCtx, Result};
pub use group::{Dispatched, Group, SymmScope};
pub use interop::{Borrowed, DeviceView};
#[cfg(feature = "lab")]
pub use lab::EpochCounter;
pub use policy::{GroupKind, Placement, SymmPolicy};
pub use rank_threads::run_rank_threads;
pub use stream::Stream;
pub use tensor::{Layout, Tensor};

/// The visible GPUs, or why none.
pub fn gpus() -> std::result::Result<Vec<backend::cuda::GpuInfo>, String> {
    backend::cuda::gpus()
}

/// How many CUDA devices this process can use with the CUDA backend (driver and NCCL present),
/// or why none.
pub fn cuda_devices() -> std::result::Result<usize, String> {
    backend::cuda::device_count()
}
