//! Bootstrap: who the ranks are and how they first talk. A key-value [`Store`] that every rank
//! reaches (served over TCP by rank 0 for processes, shared in memory for threads), and the
//! host-side collectives among a subset of ranks that groups build on it ([`ControlPlane`]).
//! Every wait has a deadline.

mod control;
mod env;
mod tcp;
mod threads;

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::Result;

pub use control::ControlPlane;
pub use env::{EnvRanks, HOST_ID_ENV, LaunchEnv};

/// The longest deadline a communicator or a rendezvous accepts: every wait adds it to the
/// clock, which must not overflow; a deadline of days would never end a hang anyone waits for.
pub(crate) const MAX_TIMEOUT: Duration = Duration::from_secs(7 * 24 * 3600);
pub use tcp::{RendezvousConfig, TcpStore, free_port};
pub use threads::ThreadStore;

/// Default deadline for bootstrap waits.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// A key-value store that every rank of a job reaches. Values are bytes; keys are strings.
pub trait Store: Send + Sync + fmt::Debug {
    /// Set `key` to `value` (overwrites).
    fn set(&self, key: &str, value: &[u8]) -> Result<()>;
    /// Wait until `key` exists or `deadline` passes; `Ok(None)` on the deadline.
    fn get(&self, key: &str, deadline: Instant) -> Result<Option<Vec<u8>>>;
    /// Add `delta` to the integer stored at `key` (0 when absent) and return the new value.
    fn add(&self, key: &str, delta: i64) -> Result<i64>;
    /// Remove `key` if present.
    fn delete(&self, key: &str) -> Result<()>;
    /// This rank is done with the job's collectives: wait until every rank has said farewell
    /// or is gone, or until `deadline` (then an error naming the ranks still missing). A store
    /// that one of the ranks serves must not go away while another rank is still reading its
    /// last exchange; a store that outlives every rank (in memory, shared by threads) needs no
    /// farewell, and the default returns at once.
    fn farewell(&self, deadline: Instant) -> Result<()> {
        let _ = deadline;
        Ok(())
    }
}

/// This process's place in the job and the store it talks through.
#[derive(Clone, Debug)]
pub struct Bootstrap {
    /// Global rank.
    pub rank: usize,
    /// Number of ranks in the job.
    pub world_size: usize,
    /// Rank among the processes of this node (selects the GPU).
    pub local_rank: usize,
    /// Deadline applied to every wait.
    pub timeout: Duration,
    store: Arc<dyn Store>,
    /// This rank's host identity, when given in code ([`Bootstrap::on_host`]).
    host: Option<String>,
}

impl Bootstrap {
    /// A bootstrap over an existing store.
    pub fn with_store(
        rank: usize,
        world_size: usize,
        local_rank: usize,
        timeout: Duration,
        store: Arc<dyn Store>,
    ) -> Self {
        Bootstrap {
            rank,
            world_size,
            local_rank,
            timeout,
            store,
            host: None,
        }
    }

    /// This rank placed on host `id`: ranks whose bootstraps name the same host share an
    /// NVLink domain, and a group whose ranks name different hosts runs NCCL only (see
    /// the topology module). For thread ranks that stand for several hosts (tests); a process
    /// sets `SYMMCOMM_HOST_ID` instead, and without either the machine's identity counts.
    pub fn on_host(mut self, id: impl Into<String>) -> Self {
        self.host = Some(id.into());
        self
    }

    /// The host identity given with [`Bootstrap::on_host`], if any.
    pub fn host(&self) -> Option<&str> {
        self.host.as_deref()
    }

    /// `world_size` in-process ranks (threads) sharing one in-memory store. Element `r` of the
    /// result belongs to rank `r`; hand each to its own thread.
    pub fn threads(world_size: usize, timeout: Duration) -> Vec<Bootstrap> {
        let store: Arc<dyn Store> = Arc::new(ThreadStore::new());
        (0..world_size)
            .map(|r| Bootstrap::with_store(r, world_size, r, timeout, store.clone()))
            .collect()
    }

    /// From torchrun's environment (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`,
    /// `MASTER_PORT`): rank 0 serves the TCP rendezvous, the others connect to it. Under
    /// torchrun, whose agent holds `MASTER_PORT`, the rendezvous is on `MASTER_PORT` + 1;
    /// `SYMMCOMM_MASTER_PORT` names another ([`EnvRanks::master_port`]).
    pub fn from_env(timeout: Duration) -> Result<Self> {
        let e = EnvRanks::from_env()?;
        Self::rendezvous(
            &RendezvousConfig {
                addr: e.master_addr.clone(),
                port: e.master_port,
                rank: e.rank,
                world_size: e.world_size,
                timeout,
            },
            e.local_rank,
        )
    }

    /// From a rendezvous address the engine hands over (rank 0 picked a free port with
    /// [`free_port`] and told the others through its own channel, say): rank 0 serves the TCP
    /// rendezvous at `cfg.addr:cfg.port`, the others connect to it.
    pub fn rendezvous(cfg: &RendezvousConfig, local_rank: usize) -> Result<Self> {
        let store = TcpStore::rendezvous(cfg)?;
        Ok(Bootstrap::with_store(
            cfg.rank,
            cfg.world_size,
            local_rank,
            cfg.timeout,
            Arc::new(store),
        ))
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The control plane of all ranks.
    pub fn world_control(&self) -> ControlPlane {
        ControlPlane::new(
            self.store.clone(),
            "world".into(),
            (0..self.world_size).collect(),
            self.rank,
            self.timeout,
        )
    }
}
