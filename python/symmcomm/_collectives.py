"""Collectives on arrays, written once against an :class:`~symmcomm._arrays.Arrays` adapter:
the shapes of outputs made for the caller, the checks Python makes (one device, a writable
output), and the call into the hot path; likewise the collective fused with the residual add
and RMSNorm."""

from __future__ import annotations

from typing import Any, Optional

from symmcomm import _core
from symmcomm._arrays import (
    Arrays,
    check_pair,
    group_error,
    impl_code,
    norm_impl_code,
    reduce_code,
)
from symmcomm.errors import ArgumentError, ShapeError

OP_NAMES = {
    _core.ALL_REDUCE: "all_reduce",
    _core.ALL_GATHER: "all_gather",
    _core.REDUCE_SCATTER: "reduce_scatter",
}

#: The add-RMSNorm's operation names by the code of its collective.
NORM_OP_NAMES = {
    _core.ALL_REDUCE: "all_reduce_add_rmsnorm",
    _core.REDUCE_SCATTER: "reduce_scatter_add_rmsnorm",
}


def normalise_dim(group: Any, op: str, dim: Optional[int], ndim: int) -> int:
    """`dim` as the hot path takes it: -1 for the flat operation, else in ``0..ndim``."""
    if dim is None:
        return -1
    d = dim + ndim if dim < 0 else dim
    if not 0 <= d < ndim:
        raise group_error(
            ShapeError, group, op, f"dimension {dim} is out of range for a {ndim}-d tensor"
        )
    return d


def gathered_shape(group: Any, shape: tuple, dim: int) -> tuple:
    """The output shape of an all-gather of `shape` along `dim` (-1: flat)."""
    if dim < 0:
        n = 1
        for s in shape:
            n *= s
        return (group.size * n,)
    return shape[:dim] + (shape[dim] * group.size,) + shape[dim + 1 :]


def scattered_shape(group: Any, shape: tuple, dim: int) -> tuple:
    """The output shape of a reduce-scatter of `shape` along `dim` (-1: flat)."""
    if dim < 0:
        n = 1
        for s in shape:
            n *= s
        length, out = n, lambda piece: (piece,)
    else:
        length, out = shape[dim], lambda piece: shape[:dim] + (piece,) + shape[dim + 1 :]
    if length % group.size:
        raise group_error(
            ShapeError,
            group,
            "reduce_scatter",
            f"input has {length} elements along the split, not divisible by world size "
            f"{group.size}",
        )
    return out(length // group.size)


def run(
    arrays: Arrays,
    group: Any,
    coll: int,
    x: Any,
    out: Any,
    *,
    op: str = "sum",
    dim: int = -1,
    impl: str = "auto",
    stream: Any = None,
    dtype: Optional[str] = None,
) -> "_core.Dispatch":
    """One collective from `x` into `out` (`dim` already normalised: -1 flat)."""
    rx = arrays.raw(x, dtype)
    ro = arrays.raw(out, dtype)
    check_pair(group, OP_NAMES[coll], rx, ro)
    return _core.collective(
        group.handle,
        coll,
        reduce_code(op),
        dim,
        rx.device,
        rx.ptr,
        rx.dtype,
        rx.shape,
        rx.strides,
        ro.device,
        ro.ptr,
        ro.dtype,
        ro.shape,
        ro.strides,
        arrays.stream(rx.device, stream),
        impl_code(impl),
    )


def run_norm(
    arrays: Arrays,
    group: Any,
    form: int,
    x: Any,
    residual: Any,
    weight: Any,
    eps: float,
    normed_out: Any,
    residual_out: Any,
    *,
    impl: str = "auto",
    stream: Any = None,
    dtype: Optional[str] = None,
) -> "_core.NormDispatch":
    """One add-RMSNorm (`form`: ``ALL_REDUCE`` or ``REDUCE_SCATTER``) into the two outputs
    (`residual_out` may be `residual`: in place). The library checks everything else (element
    types, shapes, layout, alignment, overlap) before anything runs."""
    op = NORM_OP_NAMES[form]
    raws = [arrays.raw(a, dtype) for a in (x, residual, weight, normed_out, residual_out)]
    for what, r in (("normed_out", raws[3]), ("residual_out", raws[4])):
        if not r.writable:
            raise group_error(ArgumentError, group, op, f"{what} is read-only")
    return _core.add_rmsnorm(
        group.handle,
        form,
        float(eps),
        *(r.tensor() for r in raws),
        arrays.stream(raws[0].device, stream),
        norm_impl_code(impl),
    )
