//! The small integers the hot path takes instead of objects: element types, reductions,
//! collectives, implementations and the add-RMSNorm's, each with the name Python code resolves
//! once.

use pyo3::prelude::*;
use symmcomm::norm::{NormForm, NormImpl};
use symmcomm::{Algo, Collective, DType, Impl, Op, ReduceOp};

use crate::errors::{IntoPy, invalid, no_group, to_py};

/// Element types by code (the index in this table).
pub(crate) const DTYPES: [DType; 5] = [DType::F32, DType::F16, DType::BF16, DType::I32, DType::U8];

/// Reductions by code.
pub(crate) const REDUCES: [ReduceOp; 4] = ReduceOp::ALL;

/// Collectives by code: all-reduce, all-gather, reduce-scatter.
pub(crate) const ALL_REDUCE: u8 = 0;
pub(crate) const ALL_GATHER: u8 = 1;
pub(crate) const REDUCE_SCATTER: u8 = 2;

fn bad(what: &str, code: u8, op: Op) -> PyErr {
    to_py(invalid(no_group(op), format!("unknown {what} code {code}")))
}

pub(crate) fn dtype(code: u8, op: Op) -> PyResult<DType> {
    DTYPES
        .get(code as usize)
        .copied()
        .ok_or_else(|| bad("dtype", code, op))
}

pub(crate) fn reduce(code: u8, op: Op) -> PyResult<ReduceOp> {
    REDUCES
        .get(code as usize)
        .copied()
        .ok_or_else(|| bad("reduction", code, op))
}

/// The collective of `code`, reducing with `reduce` where it reduces.
pub(crate) fn collective(code: u8, reduce_code: u8) -> PyResult<(Collective, Op)> {
    match code {
        ALL_REDUCE => Ok((
            Collective::AllReduce(reduce(reduce_code, Op::AllReduce)?),
            Op::AllReduce,
        )),
        ALL_GATHER => Ok((Collective::AllGather, Op::AllGather)),
        REDUCE_SCATTER => Ok((
            Collective::ReduceScatter(reduce(reduce_code, Op::ReduceScatter)?),
            Op::ReduceScatter,
        )),
        other => Err(bad("collective", other, Op::AllReduce)),
    }
}

/// Implementations by code: what [`impl_code`] hands out (new ones go last, so that codes a
/// caller resolved stay put).
fn implementations() -> Vec<Impl> {
    let mut all = vec![Impl::Auto, Impl::Regular, Impl::Symmetric, Impl::Local];
    all.extend(Algo::ALL.map(Impl::Kernel));
    all.push(Impl::Hierarchical);
    all
}

pub(crate) fn implementation(code: u8, op: Op) -> PyResult<Impl> {
    implementations()
        .get(code as usize)
        .copied()
        .ok_or_else(|| bad("implementation", code, op))
}

/// The form of an add-RMSNorm by its collective's code: [`ALL_REDUCE`] or [`REDUCE_SCATTER`].
pub(crate) fn norm_form(code: u8) -> PyResult<NormForm> {
    match code {
        ALL_REDUCE => Ok(NormForm::AllReduce),
        REDUCE_SCATTER => Ok(NormForm::ReduceScatter),
        other => Err(bad(
            "add-RMSNorm collective",
            other,
            Op::AllReduceAddRmsNorm,
        )),
    }
}

/// Add-RMSNorm implementations by code: what [`norm_impl_code`] hands out.
fn norm_implementations() -> Vec<NormImpl> {
    let mut all = vec![
        NormImpl::Auto,
        NormImpl::Fused(None),
        NormImpl::Unfused,
        NormImpl::Nccl,
    ];
    all.extend(Algo::ALL.map(|a| NormImpl::Fused(Some(a))));
    all
}

pub(crate) fn norm_implementation(code: u8, op: Op) -> PyResult<NormImpl> {
    norm_implementations()
        .get(code as usize)
        .copied()
        .ok_or_else(|| bad("add-RMSNorm implementation", code, op))
}

/// The code of an element type by name (`f32`, `float16`, `bf16`, ...).
#[pyfunction]
pub(crate) fn dtype_code(name: &str) -> PyResult<u8> {
    let canonical = match name {
        "float32" | "float" => "f32",
        "float16" | "half" => "f16",
        "bfloat16" => "bf16",
        "int32" => "i32",
        "uint8" => "u8",
        other => other,
    };
    let dtype: DType = canonical
        .parse()
        .map_err(|e: String| invalid(no_group(Op::Copy), e))
        .py()?;
    DTYPES
        .iter()
        .position(|d| *d == dtype)
        .map(|i| i as u8)
        .ok_or_else(|| {
            to_py(invalid(
                no_group(Op::Copy),
                format!("element type {dtype} has no code in this binding"),
            ))
        })
}

/// The name of the element type of `code` (`f32`, `bf16`, ...).
#[pyfunction]
pub(crate) fn dtype_name(code: u8) -> PyResult<&'static str> {
    Ok(dtype(code, Op::Copy)?.name())
}

/// Bytes per element of the element type of `code`.
#[pyfunction]
pub(crate) fn dtype_size(code: u8) -> PyResult<usize> {
    Ok(dtype(code, Op::Copy)?.size())
}

/// The code of a reduction by name (`sum`, `avg`, `max`, `min`).
#[pyfunction]
pub(crate) fn reduce_code(name: &str) -> PyResult<u8> {
    REDUCES
        .iter()
        .position(|r| r.name() == name)
        .map(|i| i as u8)
        .ok_or_else(|| {
            to_py(invalid(
                no_group(Op::AllReduce),
                format!("unknown reduction {name:?} (sum, avg, max, min)"),
            ))
        })
}

/// The code of an implementation by name (`auto`, `nccl`, `nccl_symm`, `host`, `oneshot`, ...,
/// `hierarchical`).
#[pyfunction]
pub(crate) fn impl_code(name: &str) -> PyResult<u8> {
    let imp: Impl = name
        .parse()
        .map_err(|e: String| invalid(no_group(Op::AllReduce), e))
        .py()?;
    implementations()
        .iter()
        .position(|i| *i == imp)
        .map(|i| i as u8)
        .ok_or_else(|| {
            to_py(invalid(
                no_group(Op::AllReduce),
                format!("implementation {name:?} has no code in this binding"),
            ))
        })
}

/// The code of an add-RMSNorm implementation by name (`auto`, `fused`, `fused_ll`,
/// `fused_oneshot`, `fused_twoshot`, `unfused`, `nccl`; on the host backend also with the
/// `host_` prefix its results carry, and `host` for `nccl`).
#[pyfunction]
pub(crate) fn norm_impl_code(name: &str) -> PyResult<u8> {
    let op = Op::AllReduceAddRmsNorm;
    let imp: NormImpl = name
        .parse()
        .map_err(|e: String| invalid(no_group(op), e))
        .py()?;
    norm_implementations()
        .iter()
        .position(|i| *i == imp)
        .map(|i| i as u8)
        .ok_or_else(|| {
            to_py(invalid(
                no_group(op),
                format!("add-RMSNorm implementation {name:?} has no code in this binding"),
            ))
        })
}
