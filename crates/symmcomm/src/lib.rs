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
mod backend;
pub mod bootstrap;
mod buffer;
mod comm;
mod config;
mod context;
pub mod dcp;
pub mod dispatch;
pub mod dp_attention;
mod dtype;
mod error;
#[cfg(feature = "lab")]
mod fill;
mod group;
pub mod info;
mod interop;
#[cfg(feature = "lab")]
pub mod kernels;
#[cfg(not(feature = "lab"))]
mod kernels;
#[cfg(feature = "lab")]
pub mod lab;
mod lse;
mod memory;
pub mod norm;
pub mod policy;
mod pool;
mod rank_threads;
mod stream;
mod symm_pool;
mod tensor;
pub mod topology;

pub use abort::abort_all;
pub use backend::{Algo, BackendChoice, BackendKind, Collective, Impl};
pub use bootstrap::Bootstrap;
pub use comm::{Communicator, Graph};
pub use config::{CommConfig, TableSource};
/// The cudarc this library is built with: an engine's cudarc types must come from this version.
pub use cudarc;
pub use dtype::{DType, Element, ReduceOp};
pub use error::{Arg, Error, ErrorKind, Op, OpCtx, Result};
pub use group::{Dispatched, Group, SymmScope};
pub use interop::{Borrowed, DeviceView};
#[cfg(feature = "lab")]
pub use lab::EpochCounter;
pub use policy::{GroupKind, Placement, SymmPolicy};
pub use pool::{CheckMode, PoolConfig, SegmentHit};
pub use rank_threads::run_rank_threads;
pub use stream::Stream;
pub use symm_pool::PoolStats;
pub use tensor::{Layout, Tensor};
