//! Groups for Python: what a group is (rank, size, kind, members, the hosts it spans), its
//! memory (symmetric and plain buffers handed over by DLPack, the pool's reservations for
//! torch's allocator, the `prepare`s that make captures safe) and its host-side waits. The
//! collectives themselves take the group's handle ([`crate::ops`], [`crate::norm`]), so that
//! torch's custom ops can name it.

use std::sync::Arc;

use pyo3::prelude::*;
use pyo3::types::PyDict;
use symmcomm::{DType, Group, Op};

use crate::codes;
use crate::comm::kind_of;
use crate::dlpack::DLPackBuffer;
use crate::errors::IntoPy;
use crate::norm::NormDispatch;
use crate::ops::{Dispatch, bind};
use crate::registry::{Device, GROUPS, GroupEntry, LastRun};

/// A group of ranks on this rank. Its `handle` names it to the hot path and to torch's ops.
#[pyclass(name = "Group", module = "symmcomm._core", frozen)]
pub(crate) struct PyGroup {
    handle: u64,
    entry: Arc<GroupEntry>,
}

impl PyGroup {
    /// `group` with a fresh handle.
    pub(crate) fn register(group: Group, device: Device) -> Self {
        let entry = Arc::new(GroupEntry::new(group, device));
        let handle = GROUPS.insert(entry.clone());
        PyGroup { handle, entry }
    }

    pub(crate) fn group(&self) -> &Group {
        &self.entry.group
    }

    pub(crate) fn memory(&self) -> Device {
        self.entry.device
    }

    pub(crate) fn entry(&self) -> &Arc<GroupEntry> {
        &self.entry
    }
}

impl Drop for PyGroup {
    fn drop(&mut self) {
        GROUPS.remove(self.handle);
    }
}

fn dtype_named(name: &str) -> PyResult<DType> {
    codes::dtype(codes::dtype_code(name)?, Op::PoolAlloc)
}

#[pymethods]
impl PyGroup {
    /// The integer that names this group to `symmcomm._core.collective` and torch's ops.
    #[getter]
    fn handle(&self) -> u64 {
        self.handle
    }

    /// Rank within the group.
    #[getter]
    fn rank(&self) -> usize {
        self.group().rank()
    }

    /// Number of ranks.
    #[getter]
    fn size(&self) -> usize {
        self.group().size()
    }

    /// `world`, `tp`, `dp`, `dcp` or `pp`.
    #[getter]
    fn kind(&self) -> &'static str {
        self.group().kind().name()
    }

    /// The label errors name the group by (`tp#0`, `world`).
    #[getter]
    fn label(&self) -> String {
        self.group().label().to_string()
    }

    /// The split colour the group was made with.
    #[getter]
    fn color(&self) -> usize {
        self.group().color()
    }

    /// Global ranks of the members, in group order.
    #[getter]
    fn members(&self) -> Vec<usize> {
        self.group().members().to_vec()
    }

    /// The CUDA ordinal of the group's memory, or None for host memory.
    #[getter]
    fn device(&self) -> Option<i32> {
        match self.entry.device {
            Device::Host => None,
            Device::Cuda(d) => Some(d),
        }
    }

    /// -1 for host memory, else the CUDA ordinal: what the hot path's `device` must match.
    #[getter]
    fn device_code(&self) -> i64 {
        self.entry.device.code()
    }

    /// What the group's last call ran (None before the first): a `Dispatch` for a
    /// collective, a `NormDispatch` for an add-RMSNorm (both have `name`, `reason`,
    /// `staged_input` and `staged_output`).
    #[getter]
    fn last_dispatch<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyAny>>> {
        Ok(match self.entry.last() {
            None => None,
            Some(LastRun::Collective(d)) => Some(Bound::new(py, Dispatch::new(d))?.into_any()),
            Some(LastRun::Norm(d)) => Some(Bound::new(py, NormDispatch::new(d))?.into_any()),
        })
    }

    /// The group's NVLink domains, one per host its ranks sit on, as plain data: `domains` (a
    /// list of `{"host": id, "ranks": [group ranks]}`, in the order of each one's first rank),
    /// `spans_domains`, `my_domain` (this rank's, an index into `domains`), `rank_in_domain`,
    /// `ranks_per_domain` (None when the domains differ in size), `kernels_unavailable` and
    /// `hierarchical_unavailable` (why, or None), and `describe` (in words).
    #[getter]
    fn topology<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let t = self.group().topology();
        let domains = t
            .domains()
            .iter()
            .map(|d| {
                let one = PyDict::new(py);
                one.set_item("host", &d.host)?;
                one.set_item("ranks", &d.ranks)?;
                Ok(one)
            })
            .collect::<PyResult<Vec<_>>>()?;
        let out = PyDict::new(py);
        out.set_item("domains", domains)?;
        out.set_item("spans_domains", t.spans_domains())?;
        out.set_item("my_domain", t.my_domain())?;
        out.set_item("rank_in_domain", t.rank_in_domain())?;
        out.set_item("ranks_per_domain", t.ranks_per_domain())?;
        out.set_item("kernels_unavailable", t.kernels_unavailable())?;
        out.set_item("hierarchical_unavailable", t.hierarchical_unavailable())?;
        out.set_item("describe", t.to_string())?;
        Ok(out)
    }

    /// Where a symmetric-memory scope opened on this group puts its buffers: `symmetric`, or
    /// why plain memory (`the group has one rank`, ...).
    #[pyo3(signature = (disabled=false))]
    fn placement(&self, disabled: bool) -> String {
        match self.group().placement(disabled) {
            symmcomm::Placement::Symmetric => "symmetric".into(),
            symmcomm::Placement::Plain(why) => why.to_string(),
        }
    }

    /// Whether a scope opened on this group uses its symmetric pool (the policy, the group's
    /// size and `disabled`).
    #[pyo3(signature = (disabled=false))]
    fn uses_symmetric(&self, disabled: bool) -> bool {
        self.group().placement(disabled).is_symmetric()
    }

    /// Split this group into groups of `kind` by `color` (collective over this group).
    fn split(&self, py: Python<'_>, kind: &str, color: usize) -> PyResult<PyGroup> {
        let kind = kind_of(kind)?;
        let g = self.group().clone();
        let made = py.detach(|| g.split(kind, color)).py()?;
        Ok(PyGroup::register(made, self.entry.device))
    }

    /// An uninitialised buffer of `shape` and `dtype` (`f32`, `f16`, `bf16`, `i32`, `u8`) for
    /// NumPy or torch to take by DLPack: in the group's symmetric windows (`symmetric=True`;
    /// collective when the pool grows, so every rank makes the same requests in the same
    /// order), in plain memory (`False`), or where the policy says (`None`). The memory goes
    /// back to the pool when the last array viewing it is dropped. `stream` (the caller's,
    /// torch's current one) is where a capture would be seen: growing the pool inside one is
    /// an error, not a broken capture.
    #[pyo3(signature = (shape, dtype="f32", symmetric=Some(true), stream=None))]
    fn empty(
        &self,
        py: Python<'_>,
        shape: Vec<usize>,
        dtype: &str,
        symmetric: Option<bool>,
        stream: Option<u64>,
    ) -> PyResult<DLPackBuffer> {
        let dtype = dtype_named(dtype)?;
        let g = self.group().clone();
        let t = py
            .detach(|| {
                let g = bind(&g, stream)?;
                match symmetric {
                    Some(true) => g.alloc_symmetric(dtype, &shape),
                    Some(false) => g.alloc_plain(dtype, &shape),
                    None => g.scope(false).alloc(dtype, &shape),
                }
            })
            .py()?;
        Ok(DLPackBuffer::new(t, self.entry.device))
    }

    /// Grow the pool (collectively, every rank with the same `nbytes`) so that one allocation
    /// of up to `nbytes` fits without growing it: what torch's allocator callback draws from.
    /// Refused while `stream` (None: the communicator's own) is being captured.
    #[pyo3(signature = (nbytes, stream=None))]
    fn reserve(&self, py: Python<'_>, nbytes: usize, stream: Option<u64>) -> PyResult<()> {
        let g = self.group().clone();
        py.detach(|| bind(&g, stream)?.reserve_symmetric(nbytes))
            .py()
    }

    /// Make this group's collectives up to `nbytes` safe to capture in a CUDA graph: load the
    /// kernels, grow the pool and the staging scratch (collective when the pool grows).
    /// Refused while `stream` (None: the communicator's own; pass torch's current stream, as
    /// `symmcomm.torch.prepare` does) is being captured.
    #[pyo3(signature = (nbytes, stream=None))]
    fn prepare(&self, py: Python<'_>, nbytes: usize, stream: Option<u64>) -> PyResult<()> {
        let g = self.group().clone();
        py.detach(|| bind(&g, stream)?.prepare(nbytes)).py()
    }

    /// Make the hierarchical all-reduces (`impl="hierarchical"`) of this group up to `nbytes`
    /// safe to capture: the groups of its steps (new communicators, made once), their scratch
    /// and the piece buffer. Collective: every rank with the same `nbytes`, outside any capture
    /// of `stream` (None: the communicator's own). Refused (`ImplUnavailableError`) on a group
    /// that does not span hosts with the same number of ranks on each.
    #[pyo3(signature = (nbytes, stream=None))]
    fn prepare_hierarchical(
        &self,
        py: Python<'_>,
        nbytes: usize,
        stream: Option<u64>,
    ) -> PyResult<()> {
        let g = self.group().clone();
        py.detach(|| bind(&g, stream)?.prepare_hierarchical(nbytes))
            .py()
    }

    /// The pool's sizes: `segments`, `capacity` and `in_use` (bytes).
    fn pool_stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.group().pool_stats();
        let d = PyDict::new(py);
        d.set_item("segments", s.segments)?;
        d.set_item("capacity", s.capacity)?;
        d.set_item("in_use", s.in_use)?;
        Ok(d)
    }

    /// `(segment, offset)` when `addr` (this rank's) lies in the group's windows, else None.
    fn lookup(&self, addr: u64) -> Option<(usize, usize)> {
        self.group()
            .lookup(addr)
            .map(|hit| (hit.segment, hit.offset))
    }

    /// Compare the ranks' pool requests now (collective); an error names the first that
    /// differs.
    fn verify_pool(&self, py: Python<'_>) -> PyResult<()> {
        let g = self.group().clone();
        py.detach(|| g.verify_pool()).py()
    }

    /// Wait for the work on `stream` (None: the communicator's own), then for every rank.
    #[pyo3(signature = (stream=None))]
    fn barrier(&self, py: Python<'_>, stream: Option<u64>) -> PyResult<()> {
        let g = self.group().clone();
        py.detach(|| bind(&g, stream)?.barrier()).py()
    }

    /// Wait for the work on `stream` (None: the communicator's own).
    #[pyo3(signature = (stream=None))]
    fn synchronize(&self, py: Python<'_>, stream: Option<u64>) -> PyResult<()> {
        let g = self.group().clone();
        py.detach(|| bind(&g, stream)?.synchronize()).py()
    }

    /// Whether `stream` (None: the communicator's own) is being captured into a graph now.
    #[pyo3(signature = (stream=None))]
    fn capturing(&self, py: Python<'_>, stream: Option<u64>) -> PyResult<bool> {
        let g = self.group().clone();
        py.detach(|| bind(&g, stream)?.capturing()).py()
    }

    /// The backend's description of the group's communicator.
    fn describe(&self) -> String {
        self.group().describe()
    }

    fn __repr__(&self) -> String {
        format!(
            "Group({}, rank {}/{}, members {:?}, handle {})",
            self.group().label(),
            self.group().rank(),
            self.group().size(),
            self.group().members(),
            self.handle
        )
    }
}
