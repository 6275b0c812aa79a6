//! The per-rank communicator: the device (host or CUDA), the world group, splits into typed
//! groups, graph capture across groups, and the configuration everything reads.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::abort::AbortFlag;
use crate::backend::{BackendKind, GraphExec, StreamSel};
use crate::bootstrap::{Bootstrap, ControlPlane};
use crate::buffer::KeepAlive;
use crate::config::{CommConfig, TableSource};
use crate::context::CommShared;
use crate::dispatch::DispatchTable;
use crate::error::{Error, Op, OpCtx, Result};
use crate::group::{Group, GroupShared};
use crate::policy::GroupKind;
use crate::topology::{HostId, Topology};

static NEXT_COMM_ID: AtomicU64 = AtomicU64::new(1);

/// What an error while starting the communicator of `boot`'s rank names.
fn init_ctx(boot: &Bootstrap) -> OpCtx {
    OpCtx {
        op: Op::Init,
        group: "world".into(),
        rank: boot.rank,
        world: boot.world_size,
        bytes: 0,
    }
}

/// This rank's communicator: create one per rank (per process, or per thread in tests).
#[derive(Debug)]
pub struct Communicator {
    shared: Arc<CommShared>,
    world: Group,
    /// Whether this rank has passed the closing barrier ([`Communicator::close`]).
    closed: bool,
}

impl Drop for Communicator {
    /// The closing barrier, unless [`Communicator::close`] passed it; a failure is a warning.
    fn drop(&mut self) {
        if self.closed {
            return;
        }
        if let Err(e) = self.farewell() {
            tracing::warn!(
                "rank {}: leaving without every rank's farewell: {e}",
                self.rank()
            );
        }
    }
}

/// A captured graph of collectives (of any groups of one communicator).
pub struct Graph {
    exec: Box<dyn GraphExec>,
    comm: Arc<CommShared>,
    _keep: KeepAlive,
}

impl fmt::Debug for Graph {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Graph({:?} on {:?})", self.exec, self.comm)
    }
}

impl Graph {
    /// Launch one replay (asynchronous on CUDA; call [`Communicator::synchronize`] to wait).
    pub fn replay(&self) -> Result<()> {
        self.comm.abort.check(&OpCtx {
            op: Op::Replay,
            group: "world".into(),
            rank: self.comm.boot.rank,
            world: self.comm.boot.world_size,
            bytes: 0,
        })?;
        self.exec.replay()
    }
}

impl Communicator {
    /// Start this rank's communicator. Collective: every rank of the bootstrap calls it.
    ///
    /// One process per GPU, from torchrun's variables (`no_run`: it needs the job):
    ///
    /// ```no_run
    /// use symmcomm::{Bootstrap, CommConfig, Communicator};
    /// let boot = Bootstrap::from_env(std::time::Duration::from_secs(60))?;
    /// let comm = Communicator::new(boot, CommConfig::default())?; // device = LOCAL_RANK
    /// println!("rank {} of {} on {}", comm.rank(), comm.world_size(), comm.describe());
    /// # Ok::<(), symmcomm::Error>(())
    /// ```
    ///
    /// Ranks as threads of one process, on the host backend:
    ///
    /// ```
    /// use symmcomm::{BackendChoice, Bootstrap, CommConfig, Communicator};
    /// let config = CommConfig { backend: BackendChoice::Host, ..CommConfig::default() };
    /// let boots = Bootstrap::threads(2, std::time::Duration::from_secs(30));
    /// let ranks: Vec<usize> = std::thread::scope(|s| {
    ///     let handles: Vec<_> = boots
    ///         .into_iter()
    ///         .map(|b| {
    ///             let config = config.clone();
    ///             s.spawn(move || Communicator::new(b, config).map(|c| c.rank()))
    ///         })
    ///         .collect();
    ///     handles.into_iter().map(|h| h.join().unwrap().unwrap()).collect()
    /// });
    /// assert_eq!(ranks, vec![0, 1]);
    /// ```
    pub fn new(boot: Bootstrap, config: CommConfig) -> Result<Self> {
        let id = NEXT_COMM_ID.fetch_add(1, Ordering::Relaxed);
        config.validate().map_err(|detail| Error::InvalidArgument {
            ctx: init_ctx(&boot),
            detail,
        })?;
        let abort = AbortFlag::registered();
        let device = crate::backend::start(&config.device_config(&boot), &abort)?;
        let table = match &config.table {
            TableSource::None => None,
            TableSource::Given(t) => Some(t.clone()),
            TableSource::File(p) => Some(DispatchTable::load(p)?),
            TableSource::Builtin => {
                DispatchTable::builtin(device.kind(), &device.describe(), boot.world_size)
            }
        };
        let control = Arc::new(
            boot.world_control()
                .for_communicator(config.timeout, abort.clone()),
        );
        let host = HostId::resolve(boot.host())?;
        let topology = Arc::new(Topology::exchange(&control, &host, &init_ctx(&boot))?);
        let world_topology = Arc::new(topology.world_group(boot.rank));
        let shared = Arc::new(CommShared {
            id,
            boot,
            device: device.clone(),
            config,
            abort,
            table: std::sync::RwLock::new(table.map(Arc::new)),
            capture: Mutex::new(None),
            topology,
            host,
        });
        let backend = device.world_group(control.clone(), &world_topology)?;
        let world = Group::new(GroupShared::new(
            shared.clone(),
            GroupKind::World,
            0,
            "world".into(),
            backend,
            control,
            world_topology,
        ));
        Ok(Communicator {
            shared,
            world,
            closed: false,
        })
    }

    /// Leave the job: the closing barrier that dropping the communicator passes too, with its
    /// error returned instead of logged. When one of the ranks serves the job's store (rank 0,
    /// for ranks that are processes), every rank waits here, the communicator's deadline at
    /// most, until every rank has said farewell or is gone (a rank that died is not waited
    /// for), so rank 0 never takes the store down under another rank's last collective. Thread
    /// ranks share an in-memory store and pass at once. Skipped after an abort and while the
    /// thread panics: the other ranks no longer count on this one's collectives.
    pub fn close(mut self) -> Result<()> {
        self.closed = true;
        self.farewell()
    }

    fn farewell(&self) -> Result<()> {
        if self.shared.abort.reason().is_some() || std::thread::panicking() {
            return Ok(());
        }
        let deadline = Instant::now() + self.shared.config.timeout;
        self.shared.boot.store().farewell(deadline)
    }

    /// Abort this communicator: every pending and later call on it (and on its groups and
    /// graphs) returns [`Error::Aborted`] with `reason`. [`crate::abort_all`] aborts every
    /// communicator of the process.
    pub fn abort(&self, reason: &str) {
        self.shared.abort.trip(reason);
    }

    /// Why this communicator was aborted, if it was.
    pub fn aborted(&self) -> Option<String> {
        self.shared.abort.reason()
    }

    /// Free and total device memory in bytes (`cuMemGetInfo`); `None` on the host backend.
    pub fn device_memory(&self) -> Result<Option<(usize, usize)>> {
        self.shared.device.memory_info()
    }

    /// Which backend runs.
    pub fn backend(&self) -> BackendKind {
        self.shared.device.kind()
    }

    /// The device, in words.
    pub fn describe(&self) -> String {
        self.shared.device.describe()
    }

    /// Global rank.
    pub fn rank(&self) -> usize {
        self.shared.boot.rank
    }

    /// Number of ranks.
    pub fn world_size(&self) -> usize {
        self.shared.boot.world_size
    }

    /// Every rank's host identity, as the ranks reported it when the communicator started:
    /// each group's NVLink domains ([`Group::topology`]) come from it.
    pub fn topology(&self) -> &Topology {
        &self.shared.topology
    }

    /// This rank's host identity and where it came from.
    pub fn host_id(&self) -> &HostId {
        &self.shared.host
    }

    /// The group of every rank.
    pub fn world(&self) -> &Group {
        &self.world
    }

    /// The dispatch table `auto` uses, if any.
    pub fn table(&self) -> Option<Arc<DispatchTable>> {
        self.shared.table()
    }

    /// Replace the dispatch table (every rank must install the same one).
    pub fn set_table(&self, table: Option<DispatchTable>) {
        *self.shared.table.write().unwrap_or_else(|p| p.into_inner()) = table.map(Arc::new);
    }

    /// Facts about the device for reports.
    pub fn facts(&self) -> crate::backend::DeviceFacts {
        self.shared.device.facts()
    }

    /// Split the world into groups of `kind`: ranks passing the same `color` form one group,
    /// ordered by global rank. Collective over the world.
    pub fn split(&self, kind: GroupKind, color: usize) -> Result<Group> {
        self.world.split(kind, color)
    }

    /// The communicator's own stream, where groups enqueue work unless bound to another
    /// ([`Group::on`]).
    pub fn stream(&self) -> crate::Stream {
        crate::Stream::own()
    }

    /// Start capturing the work enqueued on the communicator's own stream (collectives of any
    /// groups) into a graph. Nothing may register memory or grow a pool until
    /// [`Communicator::end_capture`]; that is an error, not a hang. An engine that captures
    /// its own stream needs none of this: groups bound to that stream see the capture.
    pub fn begin_capture(&self) -> Result<()> {
        let mut cap = self.shared.capture_lock();
        if cap.is_some() {
            return Err(Error::InvalidArgument {
                ctx: self.ctx(Op::Capture),
                detail: "a capture is already in progress".into(),
            });
        }
        self.shared.device.begin_capture()?;
        *cap = Some(KeepAlive::default());
        Ok(())
    }

    /// Stop capturing and instantiate the graph.
    pub fn end_capture(&self) -> Result<Graph> {
        let keep = self
            .shared
            .capture_lock()
            .take()
            .ok_or_else(|| Error::InvalidArgument {
                ctx: self.ctx(Op::Capture),
                detail: "no capture in progress".into(),
            })?;
        let exec = self.shared.device.end_capture()?;
        Ok(Graph {
            exec,
            comm: self.shared.clone(),
            _keep: keep,
        })
    }

    /// Capture what `enqueue` enqueues into a graph: [`Communicator::begin_capture`], `enqueue`,
    /// then [`Communicator::end_capture`] whatever `enqueue` returned, so a failed enqueue never
    /// leaves the stream capturing. `enqueue`'s error comes first.
    pub fn capture<T>(&self, enqueue: impl FnOnce() -> Result<T>) -> Result<(Graph, T)> {
        self.begin_capture()?;
        let enqueued = enqueue();
        let graph = self.end_capture();
        let value = enqueued?;
        Ok((graph?, value))
    }

    /// Wait for the work enqueued on the communicator's own stream.
    pub fn synchronize(&self) -> Result<()> {
        self.shared.abort.check(&self.ctx(Op::Barrier))?;
        crate::abort::on_failure(self.shared.device.synchronize(StreamSel::Own))
    }

    /// Time the work `enqueue` puts on the communicator's own stream.
    pub fn time(&self, enqueue: &mut dyn FnMut() -> Result<()>) -> Result<Duration> {
        self.shared.device.time(StreamSel::Own, enqueue)
    }

    fn ctx(&self, op: Op) -> OpCtx {
        OpCtx {
            op,
            group: "world".into(),
            rank: self.rank(),
            world: self.world_size(),
            bytes: 0,
        }
    }

    /// The control plane of all ranks (host-side exchanges; the CLI uses it to agree on
    /// benchmark parameters).
    pub fn control(&self) -> &ControlPlane {
        self.world.control()
    }
}
