//! What a communicator is configured with: the backend, the symmetric-memory policy, the
//! pools, the deadline, the dispatch table, the device and the engine's CUDA context.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::backend::{BackendChoice, DeviceConfig};
use crate::bootstrap::Bootstrap;
use crate::dispatch::DispatchTable;
use crate::policy::SymmPolicy;
use crate::pool::{CheckMode, PoolConfig};

use crate::bootstrap::MAX_TIMEOUT;

/// Where `auto`'s dispatch table comes from.
#[derive(Clone, Debug, PartialEq)]
pub enum TableSource {
    /// The table shipped for this device, if any; NCCL's rule otherwise.
    Builtin,
    /// No table: NCCL's rule everywhere.
    None,
    /// A table file written by `symmcomm tune`.
    File(PathBuf),
    /// A table given in code.
    Given(DispatchTable),
}

/// Everything a communicator is configured with.
#[derive(Clone, Debug)]
pub struct CommConfig {
    /// Backend.
    pub backend: BackendChoice,
    /// Which groups use symmetric memory.
    pub policy: SymmPolicy,
    /// Segment size and alignment of every group's pool.
    pub pool: PoolConfig,
    /// When ranks compare their pool requests.
    pub check: CheckMode,
    /// The per-operation deadline: no wait of any call (a collective's host exchange, a
    /// barrier, a synchronisation with the GPU, our kernels' flag spins, NCCL progress, the
    /// creation of an NCCL communicator in [`crate::Communicator::new`] and every split) lasts longer. When one passes, every communicator of the process is aborted and each pending
    /// call returns an error naming its rank, group, operation and size. Default 60 s.
    pub timeout: Duration,
    /// `auto`'s table.
    pub table: TableSource,
    /// CUDA device ordinal; `None` = the engine's context's device when `cuda_context` is
    /// given, else the bootstrap's local rank.
    pub device: Option<usize>,
    /// The engine's CUDA context (cudarc's, the device's primary context): the communicator
    /// runs on it, and leaves its settings (cudarc's event tracking among them) as they are.
    pub cuda_context: Option<Arc<cudarc::driver::CudaContext>>,
    /// On NCCL 2.28.0–2.30.6, put a guard kernel before each NCCL symmetric kernel so it
    /// cannot read its input before the producer finished. Turn off only to measure the hazard.
    pub pdl_guard: bool,
    /// Bytes of one workspace slot of our own kernels per group (the largest piece they move;
    /// each group's workspace is 4 × world × this). 0 turns our kernels off.
    pub kernel_slot_bytes: usize,
    /// Launch our own kernels with programmatic dependent launch (Hopper and later), so that one
    /// launches while its predecessor on the stream is still running; each waits on the grid
    /// dependency before touching memory (KERNELS.md §2). Off only to measure what it saves.
    pub own_kernels_pdl: bool,
}

impl Default for CommConfig {
    fn default() -> Self {
        CommConfig {
            backend: BackendChoice::Auto,
            policy: SymmPolicy::default(),
            pool: PoolConfig::default(),
            check: CheckMode::default(),
            timeout: Duration::from_secs(60),
            table: TableSource::Builtin,
            device: None,
            cuda_context: None,
            pdl_guard: true,
            kernel_slot_bytes: 4 << 20,
            own_kernels_pdl: true,
        }
    }
}

impl CommConfig {
    /// Why this configuration cannot start a communicator, if it cannot.
    pub(crate) fn validate(&self) -> std::result::Result<(), String> {
        self.pool
            .validate()
            .map_err(|detail| format!("pool configuration: {detail}"))?;
        if self.timeout.is_zero() || self.timeout > MAX_TIMEOUT {
            return Err(format!(
                "timeout {:?} is outside (0, {MAX_TIMEOUT:?}]",
                self.timeout
            ));
        }
        Ok(())
    }

    /// What the device of the rank `boot` describes starts with.
    pub(crate) fn device_config(&self, boot: &Bootstrap) -> DeviceConfig {
        DeviceConfig {
            choice: self.backend,
            rank: boot.rank,
            world: boot.world_size,
            ordinal: self
                .device
                .or(self.cuda_context.as_ref().map(|c| c.ordinal()))
                .unwrap_or(boot.local_rank),
            cuda_context: self.cuda_context.clone(),
            timeout: self.timeout,
            pdl_guard: self.pdl_guard,
            kernel_slot_bytes: self.kernel_slot_bytes,
            own_kernels_pdl: self.own_kernels_pdl,
        }
    }
}
