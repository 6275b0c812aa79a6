//! What every group of one rank's communicator shares: its id, bootstrap, device,
//! configuration, abort flag, dispatch table, host topology, and the capture it may be running, with the rule
//! that keeps what captured work uses alive as long as the graph.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::abort::AbortFlag;
use crate::backend::{Exec, RankBackend, StreamSel};
use crate::bootstrap::Bootstrap;
use crate::buffer::{Buffer, KeepAlive};
use crate::config::CommConfig;
use crate::dispatch::DispatchTable;
use crate::error::{OpCtx, Result};
use crate::topology::{HostId, Topology};

pub(crate) struct CommShared {
    pub(crate) id: u64,
    pub(crate) boot: Bootstrap,
    pub(crate) device: Arc<dyn RankBackend>,
    pub(crate) config: CommConfig,
    /// Tripped when this communicator (or any of the process) is aborted.
    pub(crate) abort: Arc<AbortFlag>,
    pub(crate) table: std::sync::RwLock<Option<Arc<DispatchTable>>>,
    /// What a capture of the communicator's own stream keeps, while one runs.
    pub(crate) capture: Mutex<Option<KeepAlive>>,
    /// Every rank's host identity, exchanged once when the communicator started: each group's
    /// NVLink domains are derived from it.
    pub(crate) topology: Arc<Topology>,
    /// This rank's own host identity and where it came from.
    pub(crate) host: HostId,
}

impl fmt::Debug for CommShared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Comm#{}(rank {} on {})",
            self.id,
            self.boot.rank,
            self.device.describe()
        )
    }
}

impl CommShared {
    /// The dispatch table `auto` uses now.
    pub(crate) fn table(&self) -> Option<Arc<DispatchTable>> {
        self.table.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub(crate) fn capture_lock(&self) -> MutexGuard<'_, Option<KeepAlive>> {
        self.capture.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keep `buffers` alive as long as the graph being captured on `exec`'s stream, if one is:
    /// a capture of this communicator's own (`Communicator::begin_capture`) holds them in the
    /// graph it returns; the engine's capture holds them through the backend.
    pub(crate) fn keep_alive(
        &self,
        exec: Exec,
        buffers: &[&Arc<Buffer>],
        ctx: &OpCtx,
    ) -> Result<()> {
        if !exec.capturing {
            return Ok(());
        }
        let buffers = buffers.iter().map(|b| Arc::clone(b)).collect();
        if exec.stream == StreamSel::Own
            && let Some(k) = self.capture_lock().as_mut()
        {
            k.buffers.extend::<Vec<_>>(buffers);
            return Ok(());
        }
        self.device
            .retain_for_capture(exec, Box::new(KeepAlive { buffers }), ctx)
    }
}
