//! symmcomm's errors as Python exceptions: every [`symmcomm::Error`] becomes an instance of one
//! class of `symmcomm.errors` (a hierarchy under `SymmcommError`, written in Python so that
//! its classes can also derive from `ValueError`, `TypeError`, `TimeoutError`, ...), carrying
//! the rank, group, operation and size that the Rust error names.

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyModule};
use symmcomm::{Error, ErrorKind, Op, OpCtx};

/// The Python module that defines the exception classes.
const ERRORS_MODULE: &str = "symmcomm.errors";

/// The class of `symmcomm.errors` an error is raised as: one per kind.
fn class_of(e: &Error) -> &'static str {
    match e.kind() {
        ErrorKind::DType => "DTypeError",
        ErrorKind::Shape => "ShapeError",
        ErrorKind::NotContiguous => "NotContiguousError",
        ErrorKind::Overlap => "OverlapError",
        ErrorKind::ForeignBuffer => "ForeignBufferError",
        ErrorKind::ImplUnavailable => "ImplUnavailableError",
        ErrorKind::InvalidArgument => "ArgumentError",
        ErrorKind::Capture => "CaptureError",
        ErrorKind::Capacity => "CapacityError",
        ErrorKind::Disagreement => "DisagreementError",
        ErrorKind::Deadline => "DeadlineError",
        ErrorKind::Aborted => "AbortedError",
        ErrorKind::Bootstrap => "BootstrapError",
        ErrorKind::Backend => "BackendError",
        _ => "SymmcommError",
    }
}

/// The variant's name (`NotContiguous`, `Timeout`, ...), as the exception's `kind`.
fn variant_of(e: &Error) -> String {
    let debug = format!("{e:?}");
    debug
        .split(|c: char| !c.is_alphanumeric())
        .next()
        .unwrap_or("Error")
        .to_string()
}

/// The rank an error names when it has no operation context (the bootstrap's).
fn bootstrap_rank(e: &Error) -> Option<usize> {
    match e {
        Error::WrongWorldSize { rank, .. }
        | Error::DuplicateRank { rank, .. }
        | Error::RankOutOfRange { rank, .. }
        | Error::MasterUnreachable { rank, .. }
        | Error::Malformed { rank, .. }
        | Error::RendezvousFailed { rank, .. } => Some(*rank),
        _ => None,
    }
}

fn errors_module(py: Python<'_>) -> PyResult<&Bound<'_, PyModule>> {
    static MODULE: PyOnceLock<Py<PyModule>> = PyOnceLock::new();
    MODULE
        .get_or_try_init(py, || py.import(ERRORS_MODULE).map(Bound::unbind))
        .map(|m| m.bind(py))
}

/// `e` as an instance of its `symmcomm.errors` class (a `RuntimeError` if that module cannot be
/// imported, which only happens when `_core` is loaded outside its package).
pub(crate) fn to_py(e: Error) -> PyErr {
    Python::attach(|py| build(py, &e).unwrap_or_else(|fallback| fallback))
}

fn build(py: Python<'_>, e: &Error) -> Result<PyErr, PyErr> {
    let message = e.to_string();
    let Ok(module) = errors_module(py) else {
        return Ok(PyRuntimeError::new_err(message));
    };
    let class = module.getattr(class_of(e))?;
    let kwargs = PyDict::new(py);
    kwargs.set_item("kind", variant_of(e))?;
    match e.ctx() {
        Some(ctx) => fill_ctx(&kwargs, ctx)?,
        None => kwargs.set_item("rank", bootstrap_rank(e))?,
    }
    let instance = class.call((message,), Some(&kwargs))?;
    Ok(PyErr::from_value(instance))
}

fn fill_ctx(kwargs: &Bound<'_, PyDict>, ctx: &OpCtx) -> PyResult<()> {
    kwargs.set_item("rank", ctx.rank)?;
    kwargs.set_item("world", ctx.world)?;
    kwargs.set_item("group", &ctx.group)?;
    kwargs.set_item("op", ctx.op.name())?;
    kwargs.set_item("nbytes", ctx.bytes)?;
    Ok(())
}

/// An `InvalidArgument` of `op` on `ctx`'s group: for the checks this module makes itself.
pub(crate) fn invalid(ctx: OpCtx, detail: impl Into<String>) -> Error {
    Error::InvalidArgument {
        ctx,
        detail: detail.into(),
    }
}

/// The context of a check made before any group is known (an argument of a constructor).
pub(crate) fn no_group(op: Op) -> OpCtx {
    OpCtx {
        op,
        group: "-".into(),
        rank: 0,
        world: 1,
        bytes: 0,
    }
}

/// Convert a library result.
pub(crate) trait IntoPy<T> {
    /// The error as a Python exception.
    fn py(self) -> PyResult<T>;
}

impl<T> IntoPy<T> for symmcomm::Result<T> {
    fn py(self) -> PyResult<T> {
        self.map_err(to_py)
    }
}
