//! Hand-written FFI for NCCL >= 2.27, loaded at run time.
//!
//! Nothing here links against NCCL or CUDA: [`Nccl::load`] opens `libnccl.so.2` with
//! `dlopen` (or the file named by `SYMMCOMM_NCCL_LIBRARY`), checks `ncclGetVersion`, and
//! resolves a table of entry points, each called through an `unsafe` method of [`Nccl`]. There
//! is no logic beyond loading: turning codes into `Result`s and owning handles is the job of
//! the crates above this one.
//!
//! Codes that cross the boundary ([`NcclResult`], [`RedOp`], [`DataType`]) are integer
//! newtypes, never Rust `enum`s, so an unknown value from a newer NCCL is not undefined
//! behaviour. Layouts and signatures follow `nccl.h` of NCCL 2.28.3; [`Config`] documents why
//! its 2.28 layout is safe with 2.27 and 2.29+ too.
//!
//! # Safety contract
//!
//! Each `unsafe` method of [`Nccl`] is NCCL's C function, and NCCL's rules apply. In
//! particular, besides what each method's `# Safety` section adds:
//!
//! - a communicator ([`NcclComm`]) or window ([`NcclWindow`]) passed in was made by the same
//!   [`Nccl`] and has not been destroyed, aborted or deregistered ("live");
//! - a communicator is used by one thread at a time, and a group
//!   ([`Nccl::group_start`]..[`Nccl::group_end`]) belongs to the thread that opened it;
//! - out-pointers are valid for writing one value of their type;
//! - buffers are device memory of the communicator's device, large enough for `count`
//!   elements of the given [`DataType`], and stay alive until the GPU work queued on
//!   `stream` that uses them has finished;
//! - `stream` is null or a live CUDA stream of the communicator's device.
//!
//! # Example
//!
//! ```no_run
//! let nccl = nccl_sys::Nccl::load()?;
//! println!("NCCL {} from {}", nccl.version(), nccl.path().display());
//! # Ok::<(), nccl_sys::LoadError>(())
//! ```

#![warn(missing_docs)]

mod error;
mod loader;
mod types;
mod version;

pub use error::LoadError;
pub use loader::{LIBRARY_ENV_VAR, Nccl, SONAMES};
pub use types::{
    CONFIG_MAGIC, CONFIG_UNDEF_INT, CTA_POLICY_DEFAULT, CTA_POLICY_EFFICIENCY, CTA_POLICY_ZERO,
    Config, CudaStream, DataType, NcclComm, NcclResult, NcclWindow, OpaqueComm, OpaqueWindow,
    RedOp, SHRINK_ABORT, SHRINK_DEFAULT, SPLIT_NOCOLOR, UNIQUE_ID_BYTES, UniqueId,
    WIN_COLL_SYMMETRIC, WIN_DEFAULT, WIN_REQUIRED_ALIGNMENT,
};
pub use version::{MIN_VERSION, Version};
