//! Communicators for Python: made from torchrun's environment, from a rendezvous address the
//! caller hands over (rank 0 picked it and told the others, over a torch process group say),
//! or as N thread ranks of one process (optionally standing for several hosts); the hosts the
//! ranks reported; and the groups they split into, by colour or by lists of ranks. Every wait
//! runs with the GIL released and ends by the configured deadline.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};
use symmcomm::bootstrap::RendezvousConfig;
use symmcomm::topology::HostIdSource;
use symmcomm::{BackendChoice, TableSource};
use symmcomm::{BackendKind, Bootstrap, CommConfig, Communicator, Error, GroupKind, Op};

use crate::errors::{IntoPy, invalid, no_group};
use crate::group::PyGroup;
use crate::registry::Device;

/// The colour of the ranks a rank list leaves out: a split needs one, and NCCL's "no colour"
/// (-1) would leave them without a communicator, which the library refuses. Positive as an
/// NCCL `int` and far from the colours of real groups.
const LEFT_OUT: usize = 1 << 30;

/// The options every constructor takes, as keyword arguments.
const OPTIONS: &[&str] = &[
    "backend",
    "timeout",
    "device",
    "symmetric",
    "dcp_size",
    "table",
    "segment_bytes",
    "kernel_slot_bytes",
];

/// A `CommConfig` from the keyword options.
fn config_of(options: Option<&Bound<'_, PyDict>>) -> PyResult<CommConfig> {
    let mut config = CommConfig::default();
    let Some(options) = options else {
        return Ok(config);
    };
    for (key, value) in options.iter() {
        let key: String = key.extract()?;
        if value.is_none() {
            continue;
        }
        match key.as_str() {
            "backend" => config.backend = backend_of(&value.extract::<String>()?)?,
            "timeout" => config.timeout = timeout_of(value.extract::<f64>()?)?,
            "device" => config.device = Some(value.extract::<usize>()?),
            "symmetric" => config.policy.enabled = value.extract::<bool>()?,
            "dcp_size" => config.policy.dcp_size = value.extract::<usize>()?,
            "table" => config.table = table_of(&value.extract::<String>()?),
            "segment_bytes" => config.pool.segment_bytes = value.extract::<usize>()?,
            "kernel_slot_bytes" => config.kernel_slot_bytes = value.extract::<usize>()?,
            other => {
                return Err(PyTypeError::new_err(format!(
                    "unknown option {other:?}; the options are {}",
                    OPTIONS.join(", ")
                )));
            }
        }
    }
    Ok(config)
}

fn backend_of(name: &str) -> PyResult<BackendChoice> {
    match name {
        "auto" => Ok(BackendChoice::Auto),
        "host" => Ok(BackendChoice::Host),
        "cuda" => Ok(BackendChoice::Cuda),
        other => Err(invalid(
            no_group(Op::Init),
            format!("unknown backend {other:?} (auto, host, cuda)"),
        ))
        .py(),
    }
}

fn timeout_of(seconds: f64) -> PyResult<Duration> {
    Duration::try_from_secs_f64(seconds)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| {
            crate::errors::to_py(invalid(
                no_group(Op::Init),
                format!("timeout must be a positive number of seconds, got {seconds}"),
            ))
        })
}

fn table_of(name: &str) -> TableSource {
    match name {
        "builtin" => TableSource::Builtin,
        "none" => TableSource::None,
        path => TableSource::File(path.into()),
    }
}

/// A group kind by name (`world`, `tp`, `dp`, `dcp`, `pp`).
pub(crate) fn kind_of(name: &str) -> PyResult<GroupKind> {
    match name {
        "world" => Ok(GroupKind::World),
        "tp" => Ok(GroupKind::Tp),
        "dp" => Ok(GroupKind::Dp),
        "dcp" => Ok(GroupKind::Dcp),
        "pp" => Ok(GroupKind::Pp),
        other => Err(invalid(
            no_group(Op::Split),
            format!("unknown group kind {other:?} (world, tp, dp, dcp, pp)"),
        ))
        .py(),
    }
}

/// Where a started communicator's memory lives.
fn device_of(comm: &Communicator, config: &CommConfig, local_rank: usize) -> Device {
    match comm.backend() {
        BackendKind::Host => Device::Host,
        BackendKind::Cuda => Device::Cuda(config.device.unwrap_or(local_rank) as i32),
    }
}

/// This rank's communicator. Collective to make (every rank of the job makes its own).
/// Frozen: its methods take `&self`, so a thread may read it while another makes groups.
#[pyclass(name = "Communicator", module = "symmcomm._core", frozen)]
pub(crate) struct PyCommunicator {
    /// None once closed.
    comm: Mutex<Option<Arc<Communicator>>>,
    device: Device,
    world: Py<PyGroup>,
    /// How many groups of each kind were made by rank lists: the next one's colour.
    made: Mutex<HashMap<GroupKind, usize>>,
}

impl PyCommunicator {
    fn start(py: Python<'_>, boot: Bootstrap, config: CommConfig) -> PyResult<Self> {
        let local_rank = boot.local_rank;
        let made = py.detach(|| Communicator::new(boot, config.clone())).py()?;
        Self::wrap(py, made, &config, local_rank)
    }

    fn wrap(
        py: Python<'_>,
        comm: Communicator,
        config: &CommConfig,
        local_rank: usize,
    ) -> PyResult<Self> {
        let device = device_of(&comm, config, local_rank);
        let world = Py::new(py, PyGroup::register(comm.world().clone(), device))?;
        Ok(PyCommunicator {
            comm: Mutex::new(Some(Arc::new(comm))),
            device,
            world,
            made: Mutex::new(HashMap::new()),
        })
    }

    fn slot(&self) -> MutexGuard<'_, Option<Arc<Communicator>>> {
        self.comm.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The communicator, unless it was closed.
    fn comm(&self) -> PyResult<Arc<Communicator>> {
        self.slot().clone().ok_or_else(|| {
            crate::errors::to_py(invalid(
                no_group(Op::Barrier),
                "the communicator was closed",
            ))
        })
    }

    /// Split the world once: this rank passes `color`; its group, unless it is left out.
    fn split_world(
        &self,
        py: Python<'_>,
        kind: GroupKind,
        color: usize,
    ) -> PyResult<Option<PyGroup>> {
        let comm = self.comm()?;
        let group = py.detach(|| comm.split(kind, color)).py()?;
        Ok((color != LEFT_OUT).then(|| PyGroup::register(group, self.device)))
    }

    /// Check that every rank passed the same rank lists (collective over the world).
    fn agree(&self, py: Python<'_>, lists: &[Vec<usize>]) -> PyResult<()> {
        let comm = self.comm()?;
        let world = comm.world_size();
        let ctx = comm.world().ctx(Op::Split, 0);
        for list in lists {
            if list.is_empty() {
                return Err(invalid(ctx, "a group needs at least one rank")).py();
            }
            let mut seen = vec![false; world];
            for &r in list {
                if r >= world || std::mem::replace(&mut seen[r], true) {
                    return Err(invalid(
                        ctx,
                        format!("ranks {list:?}: each rank must be below {world} and listed once"),
                    ))
                    .py();
                }
            }
        }
        let mine = format!("{lists:?}");
        py.detach(|| -> symmcomm::Result<()> {
            let all = comm
                .control()
                .all_gather("new_group ranks", mine.as_bytes())?;
            for (r, theirs) in all.iter().enumerate() {
                let theirs = String::from_utf8_lossy(theirs);
                if theirs != mine {
                    return Err(Error::Disagreement {
                        ctx: ctx.clone(),
                        what: "the ranks of new groups".into(),
                        mine: mine.clone(),
                        other_rank: r,
                        theirs: theirs.into_owned(),
                    });
                }
            }
            Ok(())
        })
        .py()
    }
}

#[pymethods]
impl PyCommunicator {
    /// From torchrun's environment (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`,
    /// `MASTER_PORT`). Rank 0 serves the rendezvous on `SYMMCOMM_MASTER_PORT` if set, else
    /// `MASTER_PORT` + 1 under torchrun (whose agent holds `MASTER_PORT`), else `MASTER_PORT`.
    #[staticmethod]
    #[pyo3(signature = (**options))]
    fn from_env(py: Python<'_>, options: Option<&Bound<'_, PyDict>>) -> PyResult<Self> {
        let config = config_of(options)?;
        let boot = py.detach(|| Bootstrap::from_env(config.timeout)).py()?;
        Self::start(py, boot, config)
    }

    /// From a rendezvous address every rank was told: rank 0 serves it at `addr:port`, the
    /// others connect. `local_rank` picks the GPU (default: `rank`).
    #[staticmethod]
    #[pyo3(signature = (addr, port, rank, world_size, local_rank=None, **options))]
    fn rendezvous(
        py: Python<'_>,
        addr: String,
        port: u16,
        rank: usize,
        world_size: usize,
        local_rank: Option<usize>,
        options: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Self> {
        let config = config_of(options)?;
        let cfg = RendezvousConfig {
            addr,
            port,
            rank,
            world_size,
            timeout: config.timeout,
        };
        let local_rank = local_rank.unwrap_or(rank);
        let boot = py.detach(|| Bootstrap::rendezvous(&cfg, local_rank)).py()?;
        Self::start(py, boot, config)
    }

    /// `world_size` communicators of one process, rank `r` at index `r`: ranks as threads (the
    /// host backend's tests). They are made concurrently, since making one is collective;
    /// hand each to its own thread. `hosts` (one identity per rank) places the ranks on
    /// simulated hosts: ranks naming the same one share an NVLink domain, and groups that span
    /// several run as groups across hosts do (without it every rank is on this machine).
    #[staticmethod]
    #[pyo3(signature = (world_size, hosts=None, **options))]
    fn threads(
        py: Python<'_>,
        world_size: usize,
        hosts: Option<Vec<String>>,
        options: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Vec<Self>> {
        let config = config_of(options)?;
        if world_size == 0 {
            return Err(invalid(no_group(Op::Init), "world_size must be at least 1")).py();
        }
        let mut boots = Bootstrap::threads(world_size, config.timeout);
        if let Some(hosts) = hosts {
            if hosts.len() != world_size {
                return Err(invalid(
                    no_group(Op::Init),
                    format!(
                        "hosts names {} hosts for {world_size} ranks: one per rank",
                        hosts.len()
                    ),
                ))
                .py();
            }
            boots = boots
                .into_iter()
                .zip(hosts)
                .map(|(boot, host)| boot.on_host(host))
                .collect();
        }
        let made: Vec<symmcomm::Result<Communicator>> = py.detach(|| {
            std::thread::scope(|s| {
                let handles: Vec<_> = boots
                    .into_iter()
                    .map(|boot| {
                        let config = config.clone();
                        s.spawn(move || Communicator::new(boot, config))
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                    .collect()
            })
        });
        let mut comms = Vec::with_capacity(world_size);
        for (rank, made) in made.into_iter().enumerate() {
            comms.push(Self::wrap(py, made.py()?, &config, rank)?);
        }
        Ok(comms)
    }

    /// Global rank.
    #[getter]
    fn rank(&self) -> PyResult<usize> {
        Ok(self.comm()?.rank())
    }

    /// Number of ranks.
    #[getter]
    fn world_size(&self) -> PyResult<usize> {
        Ok(self.comm()?.world_size())
    }

    /// `host` or `cuda`.
    #[getter]
    fn backend(&self) -> PyResult<String> {
        Ok(self.comm()?.backend().to_string())
    }

    /// This rank's host identity: ranks that report the same one share an NVLink domain
    /// (`hostname/boot_id`, or `SYMMCOMM_HOST_ID`, or what `threads(hosts=...)` gave).
    #[getter]
    fn host_id(&self) -> PyResult<String> {
        Ok(self.comm()?.host_id().id.clone())
    }

    /// Where `host_id` came from: `bootstrap` (given in code), `env` (`SYMMCOMM_HOST_ID`) or
    /// `machine` (hostname and boot id).
    #[getter]
    fn host_id_source(&self) -> PyResult<&'static str> {
        Ok(match self.comm()?.host_id().source {
            HostIdSource::Bootstrap => "bootstrap",
            HostIdSource::Env => "env",
            HostIdSource::Machine => "machine",
        })
    }

    /// Every rank's host identity, in global rank order, as the ranks reported them at
    /// start-up: each group's `topology` comes from it.
    #[getter]
    fn topology(&self) -> PyResult<Vec<String>> {
        let comm = self.comm()?;
        let t = comm.topology();
        Ok((0..t.world()).map(|r| t.host_of(r).to_string()).collect())
    }

    /// The CUDA ordinal the communicator runs on, or None on the host backend.
    #[getter]
    fn device(&self) -> Option<i32> {
        match self.device {
            Device::Host => None,
            Device::Cuda(d) => Some(d),
        }
    }

    /// The device in words.
    fn describe(&self) -> PyResult<String> {
        Ok(self.comm()?.describe())
    }

    /// Facts for reports: device name, NCCL version and path, driver, PDL guard.
    fn facts<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let f = self.comm()?.facts();
        let d = PyDict::new(py);
        d.set_item("name", f.name)?;
        d.set_item("nccl", f.nccl)?;
        d.set_item("nccl_path", f.nccl_path)?;
        d.set_item("driver", f.driver)?;
        d.set_item("pdl_guard", f.pdl_guard)?;
        Ok(d)
    }

    /// The group of every rank.
    #[getter]
    fn world(&self, py: Python<'_>) -> Py<PyGroup> {
        self.world.clone_ref(py)
    }

    /// Split the world into groups of `kind`: ranks passing the same `color` form one group,
    /// ordered by global rank. Collective over the world.
    fn split(&self, py: Python<'_>, kind: &str, color: usize) -> PyResult<PyGroup> {
        let kind = kind_of(kind)?;
        if color >= LEFT_OUT {
            return Err(invalid(
                self.comm()?.world().ctx(Op::Split, 0),
                format!("colour {color} is too large (below {LEFT_OUT})"),
            ))
            .py();
        }
        Ok(self
            .split_world(py, kind, color)?
            .expect("a rank passing a colour is a member"))
    }

    /// The group of `ranks` (global ranks; the group orders them by global rank): collective
    /// over the world, every rank passes the same list; members get the group, the others
    /// None (torch.distributed.new_group's contract).
    #[pyo3(signature = (ranks, kind="tp"))]
    fn new_group(
        &self,
        py: Python<'_>,
        ranks: Vec<usize>,
        kind: &str,
    ) -> PyResult<Option<PyGroup>> {
        self.new_groups(py, vec![ranks], kind)
    }

    /// Several disjoint groups of `kind` in one split (every tp group of the job, say):
    /// collective over the world, every rank passes the same lists; each rank gets the group
    /// whose list holds it, or None.
    #[pyo3(signature = (rank_lists, kind="tp"))]
    fn new_groups(
        &self,
        py: Python<'_>,
        rank_lists: Vec<Vec<usize>>,
        kind: &str,
    ) -> PyResult<Option<PyGroup>> {
        let kind = kind_of(kind)?;
        self.agree(py, &rank_lists)?;
        let comm = self.comm()?;
        let ctx = comm.world().ctx(Op::Split, 0);
        let mut seen = vec![false; comm.world_size()];
        for &r in rank_lists.iter().flatten() {
            if std::mem::replace(&mut seen[r], true) {
                return Err(invalid(
                    ctx,
                    format!("rank {r} is in two of the lists {rank_lists:?}"),
                ))
                .py();
            }
        }
        let me = comm.rank();
        let first = {
            let mut made = self.made.lock().unwrap_or_else(|p| p.into_inner());
            let first = *made.get(&kind).unwrap_or(&0);
            made.insert(kind, first + rank_lists.len());
            first
        };
        let color = rank_lists
            .iter()
            .position(|l| l.contains(&me))
            .map_or(LEFT_OUT, |i| first + i);
        self.split_world(py, kind, color)
    }

    /// Abort: every pending and later call on this communicator raises `AbortedError`.
    fn abort(&self, reason: &str) -> PyResult<()> {
        self.comm()?.abort(reason);
        Ok(())
    }

    /// Why the communicator was aborted, or None.
    #[getter]
    fn aborted(&self) -> PyResult<Option<String>> {
        Ok(self.comm()?.aborted())
    }

    /// Wait for the work on the world group's stream, then for every rank.
    fn barrier(&self, py: Python<'_>) -> PyResult<()> {
        let comm = self.comm()?;
        py.detach(|| comm.world().barrier()).py()
    }

    /// Leave the job: the closing barrier (every rank waits, up to the deadline, until every
    /// rank has said farewell or is gone). The groups made from it stay usable only for what
    /// they already hold; make no new calls on them.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let Some(comm) = self.slot().take() else {
            return Ok(());
        };
        match Arc::try_unwrap(comm) {
            Ok(comm) => py.detach(|| comm.close()).py(),
            // A call on another thread still holds it: it leaves when that call returns.
            Err(shared) => {
                drop(shared);
                Ok(())
            }
        }
    }

    /// Whether `close` was called.
    #[getter]
    fn closed(&self) -> bool {
        self.slot().is_none()
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_exc))]
    fn __exit__(&self, py: Python<'_>, _exc: &Bound<'_, PyTuple>) -> PyResult<()> {
        self.close(py)
    }

    fn __repr__(&self) -> String {
        match &*self.slot() {
            None => "Communicator(closed)".into(),
            Some(c) => format!(
                "Communicator(rank {}/{}, {})",
                c.rank(),
                c.world_size(),
                c.describe()
            ),
        }
    }
}

impl Drop for PyCommunicator {
    /// Leave with the GIL released: the closing barrier may wait for the other ranks.
    fn drop(&mut self) {
        if let Some(comm) = self.slot().take() {
            Python::attach(|py| py.detach(move || drop(comm)));
        }
    }
}

/// A TCP port on `host` that was free a moment ago (for rank 0 to serve a rendezvous on).
#[pyfunction]
#[pyo3(signature = (host="127.0.0.1"))]
pub(crate) fn free_port(py: Python<'_>, host: &str) -> PyResult<u16> {
    py.detach(|| symmcomm::bootstrap::free_port(host)).py()
}

/// Abort every communicator of the process.
#[pyfunction]
pub(crate) fn abort_all(reason: &str) {
    symmcomm::abort_all(reason);
}
