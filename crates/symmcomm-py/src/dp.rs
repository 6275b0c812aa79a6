//! DP attention's gathered buffer for Python: allocated once at a capacity every rank agrees
//! on (its three buffers exported once by DLPack), a step agreed per batch (every rank's token
//! count), then the gather before the MLP and the scatter after it, by handles on the caller's
//! stream.

use std::sync::Arc;

use pyo3::prelude::*;
use pyo3::types::PyDict;
use symmcomm::Arg;
use symmcomm::dp_attention::{
    DpBufferSpec, DpGatheredBuffer, DpOutput, DpPaddingMode, DpStep, TokenCounts,
};
use symmcomm::{Op, Tensor};

use crate::codes;
use crate::dlpack::DLPackBuffer;
use crate::errors::{IntoPy, invalid};
use crate::group::PyGroup;
use crate::ops::{Dispatch, RawView, bind, bound, check_device, wrap};
use crate::registry::{GroupEntry, Registry};

/// A gathered buffer as the hot path sees it.
#[derive(Debug)]
pub(crate) struct BufferEntry {
    buffer: DpGatheredBuffer,
    group: Arc<GroupEntry>,
    /// The three buffers whole (views of their first rows hold the allocations).
    local_in: Tensor,
    global: Tensor,
    local_out: Tensor,
}

/// Every gathered buffer and every step that has a Python object.
pub(crate) static BUFFERS: Registry<BufferEntry> = Registry::new("DP gathered buffer");
pub(crate) static STEPS: Registry<DpStep> = Registry::new("DP step");

fn implementation(name: &str, group: &symmcomm::Group, op: Op) -> PyResult<symmcomm::Impl> {
    name.parse()
        .map_err(|e: String| invalid(group.ctx(op, 0), e))
        .py()
}

fn ran_of(out: DpOutput) -> Option<Dispatch> {
    out.ran.map(Dispatch::new)
}

/// Gather every rank's rows into the gathered buffer (collective) for the step of `step`.
#[pyfunction]
#[pyo3(signature = (buffer, step, imp="auto", stream=None))]
pub(crate) fn dp_gather(
    py: Python<'_>,
    buffer: u64,
    step: u64,
    imp: &str,
    stream: Option<u64>,
) -> PyResult<Option<Dispatch>> {
    on_buffer(
        py,
        (buffer, step, imp, stream),
        Op::DpGather,
        |on, s, imp| on.gather(s, imp),
    )
}

/// Reduce the gathered buffer across ranks and keep this rank's rows (collective).
#[pyfunction]
#[pyo3(signature = (buffer, step, imp="auto", stream=None))]
pub(crate) fn dp_scatter(
    py: Python<'_>,
    buffer: u64,
    step: u64,
    imp: &str,
    stream: Option<u64>,
) -> PyResult<Option<Dispatch>> {
    on_buffer(
        py,
        (buffer, step, imp, stream),
        Op::DpScatter,
        |on, s, imp| on.scatter(s, imp),
    )
}

/// `run` on buffer `buffer` bound to `stream`, for the step of `step`, with `imp`: the handles
/// looked up, the GIL released while it runs; what ran.
fn on_buffer(
    py: Python<'_>,
    (buffer, step, imp, stream): (u64, u64, &str, Option<u64>),
    op: Op,
    run: impl FnOnce(&DpGatheredBuffer, &DpStep, symmcomm::Impl) -> symmcomm::Result<DpOutput> + Send,
) -> PyResult<Option<Dispatch>> {
    let b = BUFFERS.get(buffer, op).py()?;
    let s = STEPS.get(step, op).py()?;
    let imp = implementation(imp, &b.group.group, op)?;
    let out = py
        .detach(|| {
            let on = bound(&b.buffer, stream, DpGatheredBuffer::on)?;
            run(&on, &s, imp)
        })
        .py()?;
    Ok(ran_of(out))
}

/// Reduce the caller's `[global_rows, hidden]` partial sums (its own memory, given as
/// integers) across ranks and keep this rank's rows in the buffer's output (collective).
#[pyfunction]
#[pyo3(signature = (buffer, step, device, ptr, dtype, shape, strides, imp="auto", stream=None))]
#[allow(clippy::too_many_arguments)] // the hot path's integers, one per field, by design
pub(crate) fn dp_scatter_from(
    py: Python<'_>,
    buffer: u64,
    step: u64,
    device: i64,
    ptr: u64,
    dtype: u8,
    shape: Vec<usize>,
    strides: Vec<i64>,
    imp: &str,
    stream: Option<u64>,
) -> PyResult<Option<Dispatch>> {
    let b = BUFFERS.get(buffer, Op::DpScatter).py()?;
    let s = STEPS.get(step, Op::DpScatter).py()?;
    let imp = implementation(imp, &b.group.group, Op::DpScatter)?;
    let dtype = codes::dtype(dtype, Op::DpScatter)?;
    let view = RawView {
        arg: Arg::Input,
        ptr,
        shape: &shape,
        strides: &strides,
    };
    let out = py
        .detach(|| {
            check_device(&b.group, device, Op::DpScatter)?;
            let g = bind(&b.group.group, stream)?;
            let partial = wrap(&b.group, &g, Op::DpScatter, dtype, &view)?;
            let on = match stream {
                None => b.buffer.clone(),
                Some(_) => b.buffer.on(g.stream())?,
            };
            on.scatter_from(&s, &partial, imp)
        })
        .py()?;
    Ok(ran_of(out))
}

/// One step's plan: every rank's token count as the group agreed on it, and the padding mode.
#[pyclass(name = "DpStep", module = "symmcomm._core", frozen)]
pub(crate) struct PyDpStep {
    handle: u64,
    step: Arc<DpStep>,
}

impl Drop for PyDpStep {
    fn drop(&mut self) {
        STEPS.remove(self.handle);
    }
}

#[pymethods]
impl PyDpStep {
    /// The integer that names this step to `dp_gather`, `dp_scatter` and torch's ops.
    #[getter]
    fn handle(&self) -> u64 {
        self.handle
    }

    /// Every rank's token count, in group rank order.
    #[getter]
    fn counts(&self) -> Vec<usize> {
        self.step.counts().counts().to_vec()
    }

    /// This rank's count.
    #[getter]
    fn local_count(&self) -> usize {
        self.step.counts().local()
    }

    /// `max_len` or `sum_len`.
    #[getter]
    fn mode(&self) -> &'static str {
        self.step.mode().name()
    }

    /// Rows of the gathered buffer.
    #[getter]
    fn global_rows(&self) -> usize {
        self.step.global_rows()
    }

    /// Rows of this rank's send and receive buffers (padded in MAX_LEN).
    #[getter]
    fn local_rows(&self) -> usize {
        self.step.local_rows()
    }

    /// `(start, stop)`: where `rank`'s rows lie in the gathered buffer.
    fn rows_of(&self, rank: usize) -> PyResult<(usize, usize)> {
        if rank >= self.step.counts().counts().len() {
            let ctx = self.step.counts().group().ctx(Op::DpGather, 0);
            return Err(invalid(ctx, format!("rank {rank} is not in the group"))).py();
        }
        let r = self.step.rows_of(rank);
        Ok((r.start, r.end))
    }

    fn __repr__(&self) -> String {
        format!(
            "DpStep({}, counts {:?})",
            self.step.mode(),
            self.step.counts().counts()
        )
    }
}

/// DP attention's gathered buffer with this rank's send and receive buffers.
#[pyclass(name = "DpGatheredBuffer", module = "symmcomm._core", frozen)]
pub(crate) struct PyDpGatheredBuffer {
    handle: u64,
    entry: Arc<BufferEntry>,
}

impl Drop for PyDpGatheredBuffer {
    fn drop(&mut self) {
        BUFFERS.remove(self.handle);
    }
}

impl PyDpGatheredBuffer {
    fn step_of(&self, step: &PyDpStep) -> Arc<DpStep> {
        step.step.clone()
    }
}

#[pymethods]
impl PyDpGatheredBuffer {
    /// Allocate the buffers on every rank of `group` (collective; every rank passes the same
    /// values, checked): `[max_tokens_per_rank, hidden]` to send, `[N · max_tokens_per_rank,
    /// hidden]` gathered, `[max_tokens_per_rank, hidden]` to receive, in the group's windows
    /// when `symmetric` and the policy allow. `stream` (torch's current one) is where a
    /// capture would be seen: making a buffer inside one is an error, not a broken capture.
    #[new]
    #[pyo3(signature = (group, hidden, dtype, max_tokens_per_rank, symmetric=true, stream=None))]
    fn new(
        py: Python<'_>,
        group: &PyGroup,
        hidden: usize,
        dtype: &str,
        max_tokens_per_rank: usize,
        symmetric: bool,
        stream: Option<u64>,
    ) -> PyResult<Self> {
        let g = group.group().clone();
        let spec = DpBufferSpec {
            hidden,
            dtype: codes::dtype(codes::dtype_code(dtype)?, Op::DpGather)?,
            max_tokens_per_rank,
            symmetric,
        };
        let (buffer, views) = py
            .detach(|| -> symmcomm::Result<_> {
                let buffer =
                    DpGatheredBuffer::new(&bind(&g, stream)?, spec)?.on(&symmcomm::Stream::own())?;
                // A step of no tokens: its views start at the buffers' first rows, so they
                // hold the whole allocations (a collective exchange, as every step's).
                let none = DpStep::new(TokenCounts::exchange(&g, 0)?, false);
                let views = (
                    buffer.local_input(&none)?,
                    buffer.gathered(&none)?,
                    buffer.local_output(&none)?,
                );
                Ok((buffer, views))
            })
            .py()?;
        let entry = Arc::new(BufferEntry {
            buffer,
            group: group.entry().clone(),
            local_in: views.0,
            global: views.1,
            local_out: views.2,
        });
        let handle = BUFFERS.insert(entry.clone());
        Ok(PyDpGatheredBuffer { handle, entry })
    }

    /// The integer that names this buffer to `dp_gather`, `dp_scatter` and torch's ops.
    #[getter]
    fn handle(&self) -> u64 {
        self.handle
    }

    /// Whether the buffers lie in the group's symmetric windows.
    #[getter]
    fn is_symmetric(&self) -> bool {
        self.entry.buffer.is_symmetric()
    }

    /// Agree on this step's token counts (collective, host-side): this rank has `local_count`
    /// tokens. The padding mode is SGLang's rule (MAX_LEN whenever `cuda_graph`), or `mode`
    /// (`max_len`, `sum_len`) when given.
    #[pyo3(signature = (local_count, cuda_graph=false, mode=None))]
    fn step(
        &self,
        py: Python<'_>,
        local_count: usize,
        cuda_graph: bool,
        mode: Option<&str>,
    ) -> PyResult<PyDpStep> {
        let g = self.entry.group.group.clone();
        let mode = match mode {
            None => None,
            Some("max_len") => Some(DpPaddingMode::MaxLen),
            Some("sum_len") => Some(DpPaddingMode::SumLen),
            Some(other) => {
                return Err(invalid(
                    g.ctx(Op::DpGather, 0),
                    format!("unknown padding mode {other:?} (max_len, sum_len)"),
                ))
                .py();
            }
        };
        let counts = py.detach(|| TokenCounts::exchange(&g, local_count)).py()?;
        let step = match mode {
            None => DpStep::new(counts, cuda_graph),
            Some(m) => DpStep::with_mode(counts, m),
        };
        let step = Arc::new(step);
        let handle = STEPS.insert(step.clone());
        Ok(PyDpStep { handle, step })
    }

    /// The three buffers whole, each exported by DLPack: `local_input` `[M, hidden]`,
    /// `gathered` `[N · M, hidden]`, `local_output` `[M, hidden]` (M = max tokens per rank).
    fn buffers<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let spec = self.entry.buffer.spec();
        let (m, h) = (spec.max_tokens_per_rank, spec.hidden);
        let n = self.entry.group.group.size();
        let device = self.entry.group.device;
        let d = PyDict::new(py);
        for (name, t, rows) in [
            ("local_input", &self.entry.local_in, m),
            ("gathered", &self.entry.global, n * m),
            ("local_output", &self.entry.local_out, m),
        ] {
            // SAFETY: `t` views the first rows of an allocation of `rows` × `hidden` elements
            // (`DpGatheredBuffer::new` made it so), and the buffer keeps the allocation alive.
            let whole = unsafe { DLPackBuffer::covering(t.clone(), &[rows, h], device) };
            d.set_item(name, whole)?;
        }
        Ok(d)
    }

    /// Rows of `which` (`local_input`, `padded_input`, `gathered`, `local_output`,
    /// `padded_output`) for `step`, after the library's checks (the step agreed on this
    /// buffer's group, its counts within capacity, no SUM_LEN inside a capture).
    fn rows(&self, step: &PyDpStep, which: &str) -> PyResult<usize> {
        let b = &self.entry.buffer;
        let s = self.step_of(step);
        let t = match which {
            "local_input" => b.local_input(&s),
            "padded_input" => b.padded_input(&s),
            "gathered" => b.gathered(&s),
            "local_output" => b.local_output(&s),
            "padded_output" => b.padded_output(&s),
            other => {
                return Err(invalid(
                    self.entry.group.group.ctx(Op::DpGather, 0),
                    format!("unknown view {other:?}"),
                ))
                .py();
            }
        };
        Ok(t.py()?.shape()[0])
    }

    /// The spec: `hidden`, `dtype`, `max_tokens_per_rank`, `symmetric`.
    fn spec<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.entry.buffer.spec();
        let d = PyDict::new(py);
        d.set_item("hidden", s.hidden)?;
        d.set_item("dtype", s.dtype.name())?;
        d.set_item("max_tokens_per_rank", s.max_tokens_per_rank)?;
        d.set_item("symmetric", s.symmetric)?;
        Ok(d)
    }

    /// Gather (see `dp_gather`); None when no rank had tokens.
    #[pyo3(signature = (step, imp="auto", stream=None))]
    fn gather(
        &self,
        py: Python<'_>,
        step: &PyDpStep,
        imp: &str,
        stream: Option<u64>,
    ) -> PyResult<Option<Dispatch>> {
        dp_gather(py, self.handle, step.handle, imp, stream)
    }

    /// Scatter (see `dp_scatter`); None when no rank had tokens.
    #[pyo3(signature = (step, imp="auto", stream=None))]
    fn scatter(
        &self,
        py: Python<'_>,
        step: &PyDpStep,
        imp: &str,
        stream: Option<u64>,
    ) -> PyResult<Option<Dispatch>> {
        dp_scatter(py, self.handle, step.handle, imp, stream)
    }
}
