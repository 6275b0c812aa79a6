//! The collective of a decode layer fused with the residual add and RMSNorm after it
//! (`Group::all_reduce_add_rmsnorm`, `Group::reduce_scatter_add_rmsnorm`), on the caller's
//! memory and stream: the five tensors come as integers (device, address, dtype code, shape,
//! strides), are wrapped in place as [`crate::ops`] wraps a collective's, and the call runs with
//! the GIL released. What ran is returned and recorded as the group's last dispatch.

use pyo3::prelude::*;
use symmcomm::norm::{AddRmsNorm, NormDispatched, NormForm};
use symmcomm::{Arg, Op};

use crate::codes;
use crate::errors::IntoPy;
use crate::ops::{Dispatch, RawView, bind, check_device, py_bool, wrap};
use crate::registry::{GROUPS, LastRun};

/// What one add-RMSNorm ran, and why: a fused kernel (`fused_ll`, `fused_oneshot`,
/// `fused_twoshot`, on the host backend `host_fused_...`), or a collective followed by the
/// separate add-RMSNorm kernel (`unfused`, `nccl`; `collective` says what ran the collective).
#[pyclass(module = "symmcomm._core", frozen)]
pub(crate) struct NormDispatch {
    ran: NormDispatched,
}

impl NormDispatch {
    pub(crate) fn new(ran: NormDispatched) -> Self {
        NormDispatch { ran }
    }

    fn collective_name(&self) -> Option<String> {
        self.ran.collective.as_ref().map(|d| d.name())
    }
}

#[pymethods]
impl NormDispatch {
    /// The implementation that ran (`fused_ll`, `fused_oneshot`, `unfused`, `nccl`, ...).
    #[getter]
    fn name(&self) -> String {
        self.ran.name()
    }

    /// Why it ran, in words (the size rule, an explicit choice, why no fused kernel could).
    #[getter]
    fn reason(&self) -> String {
        self.ran.reason().to_string()
    }

    /// Whether one fused kernel per rank ran the whole call.
    #[getter]
    fn fused(&self) -> bool {
        self.ran.collective.is_none()
    }

    /// For `unfused` and `nccl`: what ran the collective before the add-RMSNorm kernel (a
    /// `Dispatch`); None for a fused kernel.
    #[getter]
    fn collective(&self) -> Option<Dispatch> {
        self.ran.collective.clone().map(Dispatch::new)
    }

    /// Whether the collective staged a plain input through a window (never for a fused call).
    #[getter]
    fn staged_input(&self) -> bool {
        self.ran.collective.as_ref().is_some_and(|d| d.staged_input)
    }

    /// Whether the collective's result went through a window before the plain output (never
    /// for a fused call).
    #[getter]
    fn staged_output(&self) -> bool {
        self.ran
            .collective
            .as_ref()
            .is_some_and(|d| d.staged_output)
    }

    fn __repr__(&self) -> String {
        match self.collective_name() {
            None => format!(
                "NormDispatch(name={:?}, fused=True, reason={:?})",
                self.ran.name(),
                self.ran.reason()
            ),
            Some(c) => format!(
                "NormDispatch(name={:?}, collective={c:?}, staged_input={}, staged_output={}, \
                 reason={:?})",
                self.ran.name(),
                py_bool(self.staged_input()),
                py_bool(self.staged_output()),
                self.ran.reason()
            ),
        }
    }
}

/// One tensor as Python hands it over: (device: -1 host memory, else the CUDA ordinal;
/// address; dtype code; shape; strides in elements).
type RawArg = (i64, u64, u8, Vec<usize>, Vec<i64>);

fn view(arg: Arg, raw: &RawArg) -> RawView<'_> {
    RawView {
        arg,
        ptr: raw.1,
        shape: &raw.3,
        strides: &raw.4,
    }
}

/// Run one add-RMSNorm on the caller's memory: `form` (the collective's code: 0 all-reduce, 2
/// reduce-scatter along the rows), `eps`, the five tensors, on `stream` (None: the
/// communicator's own), by `imp` (a code of `norm_impl_code`; 0: auto). `residual_out` may be
/// `residual` itself (in place). Returns what ran.
#[pyfunction]
#[pyo3(signature = (group, form, eps, input, residual, weight, normed_out, residual_out, stream=None, imp=0))]
#[allow(clippy::too_many_arguments)] // the hot path's tensors, one per argument, by design
pub(crate) fn add_rmsnorm(
    py: Python<'_>,
    group: u64,
    form: u8,
    eps: f32,
    input: RawArg,
    residual: RawArg,
    weight: RawArg,
    normed_out: RawArg,
    residual_out: RawArg,
    stream: Option<u64>,
    imp: u8,
) -> PyResult<NormDispatch> {
    let form = codes::norm_form(form)?;
    let op = match form {
        NormForm::AllReduce => Op::AllReduceAddRmsNorm,
        NormForm::ReduceScatter => Op::ReduceScatterAddRmsNorm,
    };
    let imp = codes::norm_implementation(imp, op)?;
    let args = [
        (Arg::Input, &input),
        (Arg::Residual, &residual),
        (Arg::Weight, &weight),
        (Arg::NormedOut, &normed_out),
        (Arg::ResidualOut, &residual_out),
    ];
    let dtypes = args
        .iter()
        .map(|(_, raw)| codes::dtype(raw.2, op))
        .collect::<PyResult<Vec<_>>>()?;
    let entry = GROUPS.get(group, op).py()?;
    let ran = py
        .detach(|| {
            for (_, raw) in &args {
                check_device(&entry, raw.0, op)?;
            }
            let g = bind(&entry.group, stream)?;
            let t = args
                .iter()
                .zip(&dtypes)
                .map(|((arg, raw), &dtype)| wrap(&entry, &g, op, dtype, &view(*arg, raw)))
                .collect::<symmcomm::Result<Vec<_>>>()?;
            let call = AddRmsNorm {
                input: &t[0],
                residual: &t[1],
                weight: &t[2],
                eps,
                normed_out: &t[3],
                residual_out: &t[4],
            };
            match form {
                NormForm::AllReduce => g.all_reduce_add_rmsnorm(&call, imp),
                NormForm::ReduceScatter => g.reduce_scatter_add_rmsnorm(&call, imp),
            }
        })
        .py()?;
    entry.record(LastRun::Norm(ran.clone()));
    Ok(NormDispatch::new(ran))
}
