//! What this machine and process have, for reports and for an engine deciding how to start:
//! the GPUs, the NCCL library loaded (shared with the process when it had one), its version
//! and hazards, the driver, and the facts of a running communicator's device.

pub use crate::backend::DeviceFacts;
pub use crate::backend::cuda::{GpuInfo, driver_version, gpus, nccl, pdl_hazard};

/// How many CUDA devices this process can use with the CUDA backend (driver and NCCL present),
/// or why none.
pub fn cuda_devices() -> std::result::Result<usize, String> {
    crate::backend::cuda::device_count()
}
