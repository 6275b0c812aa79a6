//! The DCP combine for Python: made once per shape (it holds its buffers, exported once by
//! DLPack), run every step by its handle on the caller's stream, by the all-gather / correct /
//! reduce-scatter sequence or the fused kernel.

use std::sync::Arc;

use pyo3::prelude::*;
use pyo3::types::PyDict;
use symmcomm::dcp::{CombineImpl, CombineRun, CombineSpec, DcpCombine, LseBase};
use symmcomm::{DType, Op, Stream, Tensor};

use crate::codes;
use crate::dlpack::DLPackBuffer;
use crate::errors::{IntoPy, invalid};
use crate::group::PyGroup;
use crate::ops::{Dispatch, bind, bound};
use crate::registry::{Device, Registry};

/// A combine as the hot path sees it.
#[derive(Debug)]
pub(crate) struct CombineEntry {
    combine: DcpCombine,
    device: Device,
}

/// Every combine that has a Python object.
pub(crate) static COMBINES: Registry<CombineEntry> = Registry::new("DCP combine");

fn lse_base_of(name: &str, group: &symmcomm::Group) -> PyResult<LseBase> {
    match name {
        "2" | "two" | "log2" => Ok(LseBase::Two),
        "e" | "ln" => Ok(LseBase::E),
        other => Err(invalid(
            group.ctx(Op::DcpCombine, 0),
            format!("unknown LSE base {other:?} (\"2\" or \"e\")"),
        ))
        .py(),
    }
}

fn combine_impl_of(name: &str, group: &symmcomm::Group) -> PyResult<CombineImpl> {
    name.parse()
        .map_err(|e: String| invalid(group.ctx(Op::DcpCombine, 0), e))
        .py()
}

fn dtype_named(name: &str) -> PyResult<DType> {
    codes::dtype(codes::dtype_code(name)?, Op::DcpCombine)
}

/// What one run of a combine did.
#[pyclass(name = "CombineRun", module = "symmcomm._core", frozen)]
pub(crate) struct PyCombineRun {
    run: CombineRun,
}

#[pymethods]
impl PyCombineRun {
    /// The combine's name (`fused`, `nccl`, `nccl_symm`, `host`, `host_fused`, ...).
    #[getter]
    fn name(&self) -> String {
        self.run.name.clone()
    }

    /// For a sequence: what ran the all-gather and the reduce-scatter.
    #[getter]
    fn collectives(&self) -> Vec<Dispatch> {
        self.run
            .collectives
            .iter()
            .cloned()
            .map(Dispatch::new)
            .collect()
    }

    fn __repr__(&self) -> String {
        let parts: Vec<String> = self.run.collectives.iter().map(|d| d.name()).collect();
        format!("CombineRun({}, collectives {parts:?})", self.run.name)
    }
}

/// Merge `batch` tokens with the combine of `handle`, on `stream` (None: the communicator's
/// own), by `imp` (`auto`, `nccl`, `nccl_symm`, `fused`, ...). Every rank calls it with the
/// same batch and implementation; capturable in a CUDA graph.
#[pyfunction]
#[pyo3(signature = (handle, batch, imp="auto", stream=None))]
pub(crate) fn dcp_run(
    py: Python<'_>,
    handle: u64,
    batch: usize,
    imp: &str,
    stream: Option<u64>,
) -> PyResult<PyCombineRun> {
    let entry = COMBINES.get(handle, Op::DcpCombine).py()?;
    let imp = combine_impl_of(imp, entry.combine.group())?;
    let run = py
        .detach(|| {
            let on = bound(&entry.combine, stream, DcpCombine::on)?;
            on.run(batch, imp)
        })
        .py()?;
    Ok(PyCombineRun { run })
}

/// A DCP combine on one rank: from every rank's partial output `[B, H, D]` and LSE `[B, H]`,
/// this rank's merged heads `[H/N, B, D]` (and their merged LSE `[B, H/N]` if asked).
#[pyclass(name = "DcpCombine", module = "symmcomm._core", frozen)]
pub(crate) struct PyDcpCombine {
    handle: u64,
    entry: Arc<CombineEntry>,
}

impl Drop for PyDcpCombine {
    fn drop(&mut self) {
        COMBINES.remove(self.handle);
    }
}

impl PyDcpCombine {
    fn buffer(&self, t: Tensor) -> DLPackBuffer {
        DLPackBuffer::new(t, self.entry.device)
    }
}

#[pymethods]
impl PyDcpCombine {
    /// Allocate the combine's buffers on `group` (collective: every rank, same arguments,
    /// outside graph capture). `lse_base` is the base of the LSEs the attention writes ("2" or
    /// "e"); `disabled` puts the buffers in plain memory (as a disabled scope would). `stream`
    /// (torch's current one) is where a capture would be seen: making a combine inside one is
    /// an error, not a broken capture.
    #[new]
    #[pyo3(signature = (group, batch_max, heads, dim, dtype="bf16", out_dtype=None, lse_base="2", merged_lse=false, fused=true, disabled=false, stream=None))]
    #[allow(clippy::too_many_arguments)] // the spec's fields, as keyword arguments
    fn new(
        py: Python<'_>,
        group: &PyGroup,
        batch_max: usize,
        heads: usize,
        dim: usize,
        dtype: &str,
        out_dtype: Option<&str>,
        lse_base: &str,
        merged_lse: bool,
        fused: bool,
        disabled: bool,
        stream: Option<u64>,
    ) -> PyResult<Self> {
        let g = group.group().clone();
        let partial_dtype = dtype_named(dtype)?;
        let spec = CombineSpec {
            batch_max,
            heads,
            dim,
            partial_dtype,
            out_dtype: out_dtype
                .map(dtype_named)
                .transpose()?
                .unwrap_or(partial_dtype),
            base: lse_base_of(lse_base, &g)?,
            merged_lse,
            fused,
        };
        let combine = py
            .detach(|| DcpCombine::new(&bind(&g, stream)?, spec, disabled)?.on(&Stream::own()))
            .py()?;
        let entry = Arc::new(CombineEntry {
            combine,
            device: group.memory(),
        });
        let handle = COMBINES.insert(entry.clone());
        Ok(PyDcpCombine { handle, entry })
    }

    /// The integer that names this combine to `dcp_run` and torch's op.
    #[getter]
    fn handle(&self) -> u64 {
        self.handle
    }

    /// Heads this rank owns (`H / N`).
    #[getter]
    fn heads_local(&self) -> usize {
        self.entry.combine.heads_local()
    }

    /// The spec: `batch_max`, `heads`, `dim`, `dtype`, `out_dtype`, `lse_base`, `merged_lse`,
    /// `fused`.
    fn spec<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.entry.combine.spec();
        let d = PyDict::new(py);
        d.set_item("batch_max", s.batch_max)?;
        d.set_item("heads", s.heads)?;
        d.set_item("dim", s.dim)?;
        d.set_item("dtype", s.partial_dtype.name())?;
        d.set_item("out_dtype", s.out_dtype.name())?;
        d.set_item(
            "lse_base",
            match s.base {
                LseBase::Two => "2",
                LseBase::E => "e",
            },
        )?;
        d.set_item("merged_lse", s.merged_lse)?;
        d.set_item("fused", s.fused)?;
        Ok(d)
    }

    /// The combine's buffers at `batch_max`, each exported by DLPack: `partial_out`
    /// `[B, H, D]`, `partial_lse` `[B, H]` (f32), `output` `[H/N, B, D]` and, when asked for,
    /// `merged_lse` `[B, H/N]` (f32). A run of `batch` tokens uses the first elements of each,
    /// as a contiguous array of the batch's shape.
    fn buffers<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let c = &self.entry.combine;
        let b = c.spec().batch_max;
        let d = PyDict::new(py);
        d.set_item("partial_out", self.buffer(c.partial_out(b).py()?))?;
        d.set_item("partial_lse", self.buffer(c.partial_lse(b).py()?))?;
        d.set_item("output", self.buffer(c.output(b).py()?))?;
        if let Some(m) = c.merged_lse(b).py()? {
            d.set_item("merged_lse", self.buffer(m))?;
        }
        Ok(d)
    }

    /// Why `imp` cannot run this combine, or None when it can.
    fn unavailable(&self, imp: &str) -> PyResult<Option<String>> {
        let imp = combine_impl_of(imp, self.entry.combine.group())?;
        Ok(self.entry.combine.unavailable(imp))
    }

    /// Merge `batch` tokens (see `dcp_run`).
    #[pyo3(signature = (batch, imp="auto", stream=None))]
    fn run(
        &self,
        py: Python<'_>,
        batch: usize,
        imp: &str,
        stream: Option<u64>,
    ) -> PyResult<PyCombineRun> {
        dcp_run(py, self.handle, batch, imp, stream)
    }

    /// Wait for the work on `stream` (None: the communicator's own).
    #[pyo3(signature = (stream=None))]
    fn synchronize(&self, py: Python<'_>, stream: Option<u64>) -> PyResult<()> {
        let g = self.entry.combine.group().clone();
        py.detach(|| bind(&g, stream)?.synchronize()).py()
    }
}
