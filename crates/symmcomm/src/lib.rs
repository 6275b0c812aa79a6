//! symmcomm: the collective communication of LLM-inference parallelism (tensor parallel,
//! DP attention, decode context parallel) on NCCL symmetric memory, with our own NVLink kernels
//! where they beat NCCL.
//!
//! One API, two backends: `host` (ranks are threads, memory is host memory; the reference for
//! every test) and `cuda` (NCCL plus our kernels). See the README for an example.

#![warn(missing_docs, unreachable_pub)]
#![deny(unused_must_use)]

pub mod backend;
pub mod bootstrap;
pub mod dtype;
pub mod error;
pub mod fill;
pub mod kernels;
pub mod memory;
pub mod policy;
pub mod pool;
pub mod symm_pool;
pub mod tensor;

pub use backend::{Algo, BackendKind, Collective, Impl};
pub use bootstrap::Bootstrap;
pub use dtype::{DType, Element, ReduceOp};
pub use error::{Error, Op, OpCtx, Result};
pub use policy::{GroupKind, Placement, SymmPolicy};
pub use tensor::{Layout, Tensor};
