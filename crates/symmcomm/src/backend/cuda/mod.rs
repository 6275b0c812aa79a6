//! The CUDA backend: NCCL communicators, symmetric windows from `ncclMemAlloc`, CUDA graphs,
//! and our own kernels compiled by NVRTC.

use std::sync::Arc;

use crate::backend::RankBackend;
use crate::bootstrap::Bootstrap;
use crate::comm::CommConfig;
use crate::error::{Error, Result};

/// Whether the CUDA backend can start here: a driver, a GPU and NCCL.
pub(crate) fn probe() -> std::result::Result<(), String> {
    Err("the CUDA backend is not built yet".into())
}

/// Number of usable devices, or why none.
pub(crate) fn device_count() -> std::result::Result<usize, String> {
    probe().map(|()| 0)
}

/// Start the CUDA device of this rank.
pub(crate) fn start(boot: &Bootstrap, config: &CommConfig) -> Result<Arc<dyn RankBackend>> {
    let _ = (boot, config);
    Err(Error::NoGpu {
        reason: probe().unwrap_err(),
    })
}
