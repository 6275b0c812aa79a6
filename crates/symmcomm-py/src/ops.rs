//! The hot path: one collective on the caller's memory, given as integers (address, shape,
//! strides, dtype code, stream handle) so that no DLPack or buffer protocol runs per call. Each
//! call wraps the memory in place (`Group::wrap_raw_strided`, which checks device, range and
//! alignment), binds the caller's stream (`Group::on`), runs the collective with the GIL
//! released, and says what ran.

use pyo3::prelude::*;
use symmcomm::Arg;
use symmcomm::{Dispatched, Error, Group, Op, Stream, Tensor};

use crate::codes;
use crate::errors::{IntoPy, invalid};
use crate::registry::{Device, GROUPS, GroupEntry, LastRun};

/// What one collective ran, and why.
#[pyclass(module = "symmcomm._core", frozen)]
pub(crate) struct Dispatch {
    ran: Dispatched,
}

impl Dispatch {
    pub(crate) fn new(ran: Dispatched) -> Self {
        Dispatch { ran }
    }
}

#[pymethods]
impl Dispatch {
    /// The implementation that ran (`nccl_symm`, `oneshot`, `ll`, `host`, ...).
    #[getter]
    fn name(&self) -> String {
        self.ran.name()
    }

    /// Why it ran, in words (the dispatch table's row, an explicit choice, ...).
    #[getter]
    fn reason(&self) -> String {
        self.ran.reason()
    }

    /// Whether a plain input was copied into a window first.
    #[getter]
    fn staged_input(&self) -> bool {
        self.ran.staged_input
    }

    /// Whether the result went through a window and was copied to a plain output.
    #[getter]
    fn staged_output(&self) -> bool {
        self.ran.staged_output
    }

    fn __repr__(&self) -> String {
        format!(
            "Dispatch(name={:?}, staged_input={}, staged_output={}, reason={:?})",
            self.ran.name(),
            py_bool(self.ran.staged_input),
            py_bool(self.ran.staged_output),
            self.ran.reason()
        )
    }
}

pub(crate) fn py_bool(b: bool) -> &'static str {
    if b { "True" } else { "False" }
}

/// One argument of a collective as the caller hands it over: a view of its own memory.
pub(crate) struct RawView<'a> {
    pub(crate) arg: Arg,
    pub(crate) ptr: u64,
    pub(crate) shape: &'a [usize],
    pub(crate) strides: &'a [i64],
}

/// `group` with its work on `stream` (`None`: the communicator's own stream).
pub(crate) fn bind(group: &Group, stream: Option<u64>) -> symmcomm::Result<Group> {
    bound(group, stream, Group::on)
}

/// `x` (a group, a DCP combine, a DP buffer) with its work on the caller's `stream` (`None`:
/// where it is), for this one call.
pub(crate) fn bound<T: Clone>(
    x: &T,
    stream: Option<u64>,
    on: impl Fn(&T, &Stream) -> symmcomm::Result<T>,
) -> symmcomm::Result<T> {
    match stream {
        None => Ok(x.clone()),
        Some(handle) => {
            // SAFETY: the handle is the caller's stream (torch's current stream), alive for
            // the duration of this call; what is bound to it is dropped before the call
            // returns. `on` checks that the stream belongs to the communicator's device.
            let s = unsafe { Stream::from_raw(handle) };
            on(x, &s)
        }
    }
}

/// `Ok` when the caller's memory lies where the communicator runs (-1: host memory, else the
/// CUDA ordinal): host memory handed to a GPU communicator, or device memory to the host
/// backend (which would read it as host memory), is refused here.
pub(crate) fn check_device(entry: &GroupEntry, device: i64, op: Op) -> symmcomm::Result<()> {
    if device == entry.device.code() {
        return Ok(());
    }
    Err(invalid(
        entry.group.ctx(op, 0),
        format!(
            "a tensor lies in {}, but the communicator runs on {}",
            Device::describe(device),
            Device::describe(entry.device.code())
        ),
    ))
}

/// The caller's memory as a tensor of `group`, in place.
pub(crate) fn wrap(
    entry: &GroupEntry,
    group: &Group,
    op: Op,
    dtype: symmcomm::DType,
    view: &RawView<'_>,
) -> symmcomm::Result<Tensor> {
    let mut strides = Vec::with_capacity(view.strides.len());
    for &s in view.strides {
        let s = usize::try_from(s).map_err(|_| {
            invalid(
                group.ctx(op, 0),
                format!(
                    "{} has negative strides {:?} (shape {:?}); pass a contiguous view",
                    view.arg, view.strides, view.shape
                ),
            )
        })?;
        strides.push(s);
    }
    // SAFETY: the address, shape and strides describe a live array of the caller (a torch
    // tensor or a NumPy array it holds for the whole call, or, inside a graph capture, memory
    // that the graph's pool or the caller keeps for the graph's life). The library checks the
    // device, the range and the alignment on CUDA.
    let t = unsafe { group.wrap_raw_strided(view.ptr, dtype, view.shape, &strides)? };
    check_windows(entry, &t, view.arg, op)?;
    Ok(t)
}

/// Refuse memory that lies in the windows of another group (of this or another rank of the
/// process): it would be treated as plain memory and staged, which is never what the caller
/// meant by allocating it there.
fn check_windows(entry: &GroupEntry, t: &Tensor, arg: Arg, op: Op) -> symmcomm::Result<()> {
    if t.bytes() == 0 || entry.group.lookup(t.addr()).is_some() {
        return Ok(());
    }
    let other = GROUPS.find(|e| {
        e.device == entry.device
            && !e.group.same_group(&entry.group)
            && e.group.lookup(t.addr()).is_some()
    });
    match other {
        None => Ok(()),
        Some(o) => Err(Error::ForeignBuffer {
            ctx: entry.group.ctx(op, t.bytes()),
            arg,
            owner: format!(
                "the symmetric windows of group {} (rank {} of {}, global ranks {:?})",
                o.group.label(),
                o.group.rank(),
                o.group.size(),
                o.group.members()
            ),
        }),
    }
}

/// Run one collective on the caller's memory: `coll` (0 all-reduce, 1 all-gather, 2
/// reduce-scatter) reducing with `reduce`, along `dim` (< 0: flat), from the input (its
/// device: -1 host memory, else the CUDA ordinal; address; dtype code; shape; strides in
/// elements) into the output (the same fields), on `stream` (None: the communicator's own), by
/// `imp` (0: auto). Returns what ran.
#[pyfunction]
#[pyo3(signature = (group, coll, reduce, dim, in_device, in_ptr, in_dtype, in_shape, in_strides, out_device, out_ptr, out_dtype, out_shape, out_strides, stream=None, imp=0))]
#[allow(clippy::too_many_arguments)] // the hot path's integers, one per field, by design
pub(crate) fn collective(
    py: Python<'_>,
    group: u64,
    coll: u8,
    reduce: u8,
    dim: i64,
    in_device: i64,
    in_ptr: u64,
    in_dtype: u8,
    in_shape: Vec<usize>,
    in_strides: Vec<i64>,
    out_device: i64,
    out_ptr: u64,
    out_dtype: u8,
    out_shape: Vec<usize>,
    out_strides: Vec<i64>,
    stream: Option<u64>,
    imp: u8,
) -> PyResult<Dispatch> {
    let (coll, op) = codes::collective(coll, reduce)?;
    let in_dtype = codes::dtype(in_dtype, op)?;
    let out_dtype = codes::dtype(out_dtype, op)?;
    let imp = codes::implementation(imp, op)?;
    let entry = GROUPS.get(group, op).py()?;
    let input = RawView {
        arg: Arg::Input,
        ptr: in_ptr,
        shape: &in_shape,
        strides: &in_strides,
    };
    let output = RawView {
        arg: Arg::Output,
        ptr: out_ptr,
        shape: &out_shape,
        strides: &out_strides,
    };
    let ran = py
        .detach(|| {
            check_device(&entry, in_device, op)?;
            check_device(&entry, out_device, op)?;
            let g = bind(&entry.group, stream)?;
            let input = wrap(&entry, &g, op, in_dtype, &input)?;
            let output = wrap(&entry, &g, op, out_dtype, &output)?;
            let dim = usize::try_from(dim).ok();
            g.collective(coll, &input, &output, dim, imp)
        })
        .py()?;
    entry.record(LastRun::Collective(ran.clone()));
    Ok(Dispatch::new(ran))
}
