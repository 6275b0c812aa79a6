"""Arrays of host memory (NumPy, or anything with ``__array_interface__``) on the host
backend: the adapter, and the public functions of the core package that take such arrays
(the collectives, the collective + residual add + RMSNorm, the DCP combine and the DP
buffer)."""

from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

from symmcomm import _core, _collectives, _views
from symmcomm._arrays import Arrays, Raw, contiguous_strides
from symmcomm.errors import DTypeError, NotContiguousError

#: Element types of ``__array_interface__`` type strings (kind and size).
_TYPESTRS = {"f4": "f32", "f2": "f16", "i4": "i32", "u1": "u8"}


def _numpy():
    try:
        import numpy
    except ImportError as e:  # pragma: no cover - numpy is in the test environment
        raise ImportError("symmcomm's host arrays need NumPy: pip install numpy") from e
    return numpy


class HostArrays(Arrays):
    """NumPy arrays (anything with ``__array_interface__``); bf16 travels as uint16 bits."""

    name = "numpy"

    def raw(self, a: Any, dtype: Optional[str] = None) -> Raw:
        try:
            ai = a.__array_interface__
        except AttributeError:
            raise TypeError(
                f"expected a NumPy array (an object with __array_interface__), got "
                f"{type(a).__name__}; torch tensors go through symmcomm.torch"
            ) from None
        ptr, readonly = ai["data"]
        typestr = ai["typestr"]
        if typestr[0] == ">":
            raise DTypeError(f"big-endian arrays are not supported ({typestr})")
        itemsize = int(typestr[2:])
        if dtype is None:
            name = _TYPESTRS.get(typestr[1:])
            if name is None:
                raise DTypeError(
                    f"element type {getattr(a, 'dtype', typestr)} ({typestr}) is not one of "
                    "float32, float16, int32, uint8 "
                    "(bf16 travels as uint16 with dtype='bf16')"
                )
        else:
            name = dtype
        code = _core.dtype_code(name)
        if _core.dtype_size(code) != itemsize:
            raise DTypeError(
                f"dtype {name!r} has {_core.dtype_size(code)}-byte elements, the array "
                f"{itemsize}-byte ones ({typestr})"
            )
        shape = tuple(ai["shape"])
        byte_strides = ai.get("strides")
        if byte_strides is None:
            strides = contiguous_strides(shape)
        else:
            if any(s % itemsize for s in byte_strides):
                raise NotContiguousError(
                    f"strides {byte_strides} (bytes) are not multiples of the element size "
                    f"{itemsize}"
                )
            strides = tuple(s // itemsize for s in byte_strides)
        return Raw(-1, ptr, code, shape, strides, not readonly)

    def take(self, buffer: "_core.DLPackBuffer") -> Any:
        np = _numpy()
        if buffer.dtype == "bf16":
            return np.from_dlpack(buffer.bits())
        return np.from_dlpack(buffer)

    def prefix(self, whole: Any, shape: Sequence[int]) -> Any:
        n = 1
        for s in shape:
            n *= s
        return whole.reshape(-1)[:n].reshape(tuple(shape))

    def stream(self, device: int, stream: Any) -> Optional[int]:
        return stream


ARRAYS = HostArrays()


def empty(group: "_core.Group", shape: Sequence[int], dtype: str = "f32", *, symmetric=True):
    """An uninitialised NumPy array of `shape` in `group`'s symmetric windows (``symmetric=
    True``; collective when the pool grows), in plain memory (``False``), or where the policy
    says (``None``). bf16 arrays hold uint16 bits: pass ``dtype="bf16"`` to the collectives.
    The memory goes back to the pool when the array (and every view of it) is dropped."""
    return ARRAYS.take(group.empty(list(shape), dtype, symmetric))


def _empty_like(x: Any, shape: tuple) -> Any:
    return _numpy().empty(shape, dtype=x.dtype)


def all_reduce(
    group: "_core.Group",
    x: Any,
    out: Any = None,
    *,
    op: str = "sum",
    impl: str = "auto",
    dtype: Optional[str] = None,
) -> Any:
    """Reduce `x` over the group into `out` (a new array when None; ``out=x`` is in place).
    Returns `out`; ``group.last_dispatch`` says what ran."""
    if out is None:
        out = _empty_like(x, tuple(x.shape))
    _collectives.run(ARRAYS, group, _core.ALL_REDUCE, x, out, op=op, impl=impl, dtype=dtype)
    return out


def all_reduce_(
    group: "_core.Group", x: Any, *, op: str = "sum", impl: str = "auto", dtype=None
) -> Any:
    """Reduce `x` over the group in place; returns `x`."""
    return all_reduce(group, x, x, op=op, impl=impl, dtype=dtype)


def all_gather(
    group: "_core.Group",
    x: Any,
    out: Any = None,
    *,
    dim: Optional[int] = None,
    impl: str = "auto",
    dtype: Optional[str] = None,
) -> Any:
    """Concatenate every rank's `x` in rank order into `out`: flat (``dim=None``; a new
    ``[size * x.size]`` array when `out` is None) or along `dim`. Returns `out`."""
    d = _collectives.normalise_dim(group, "all_gather", dim, len(x.shape))
    if out is None:
        out = _empty_like(x, _collectives.gathered_shape(group, tuple(x.shape), d))
    _collectives.run(ARRAYS, group, _core.ALL_GATHER, x, out, dim=d, impl=impl, dtype=dtype)
    return out


def reduce_scatter(
    group: "_core.Group",
    x: Any,
    out: Any = None,
    *,
    op: str = "sum",
    dim: Optional[int] = None,
    impl: str = "auto",
    dtype: Optional[str] = None,
) -> Any:
    """Reduce `x` over the group and keep this rank's piece (flat, or along `dim`) in `out`
    (a new array when None). Returns `out`."""
    d = _collectives.normalise_dim(group, "reduce_scatter", dim, len(x.shape))
    if out is None:
        out = _empty_like(x, _collectives.scattered_shape(group, tuple(x.shape), d))
    _collectives.run(
        ARRAYS, group, _core.REDUCE_SCATTER, x, out, op=op, dim=d, impl=impl, dtype=dtype
    )
    return out


def _add_rmsnorm(form, group, x, residual, weight, eps, normed_out, residual_out, impl, dtype):
    if normed_out is None:
        normed_out = _empty_like(residual, tuple(residual.shape))
    if residual_out is None:
        residual_out = _empty_like(residual, tuple(residual.shape))
    _collectives.run_norm(
        ARRAYS,
        group,
        form,
        x,
        residual,
        weight,
        eps,
        normed_out,
        residual_out,
        impl=impl,
        dtype=dtype,
    )
    return normed_out, residual_out


def all_reduce_add_rmsnorm(
    group: "_core.Group",
    x: Any,
    residual: Any,
    weight: Any,
    eps: float,
    *,
    normed_out: Any = None,
    residual_out: Any = None,
    impl: str = "auto",
    dtype: Optional[str] = None,
) -> Tuple[Any, Any]:
    """A decode layer's all-reduce, residual add and RMSNorm in one call: ``residual_out =
    residual + all_reduce(x)``, ``normed_out = RMSNorm(residual_out) * weight`` (every row on
    every rank; `x`, `residual` and the outputs ``[tokens, hidden]``, `weight` ``[hidden]``, one
    element type: f16, or bf16 as uint16 bits with ``dtype="bf16"``; hidden a multiple of 8).
    The outputs are new arrays when None; ``residual_out=residual`` updates the residual in
    place. Every rank passes the same residual (tensor parallelism keeps it so) and `impl`:
    ``auto`` (the size rule: a fused kernel where one runs, else ``unfused``), ``fused``,
    ``fused_ll``, ``fused_oneshot``, ``fused_twoshot``, ``unfused`` (the ``auto`` all-reduce,
    then the separate add-RMSNorm kernel), ``nccl`` (the regular all-reduce, then that kernel;
    ``host`` on the host backend). Returns ``(normed_out, residual_out)``;
    ``group.last_dispatch`` (a ``NormDispatch``) says what ran."""
    return _add_rmsnorm(
        _core.ALL_REDUCE, group, x, residual, weight, eps, normed_out, residual_out, impl, dtype
    )


def reduce_scatter_add_rmsnorm(
    group: "_core.Group",
    x: Any,
    residual: Any,
    weight: Any,
    eps: float,
    *,
    normed_out: Any = None,
    residual_out: Any = None,
    impl: str = "auto",
    dtype: Optional[str] = None,
) -> Tuple[Any, Any]:
    """:func:`all_reduce_add_rmsnorm` after a reduce-scatter along the rows (DP attention,
    sequence parallelism): `x` is ``[tokens, hidden]`` (tokens a multiple of the group's
    size), and rank ``r`` gets rows ``[r * tokens / size, (r + 1) * tokens / size)`` of the
    sum, so `residual` and the outputs are ``[tokens / size, hidden]``. ``all_gather(group,
    normed, dim=0)`` gathers the normalised rows. No ``fused_twoshot`` in this form."""
    return _add_rmsnorm(
        _core.REDUCE_SCATTER,
        group,
        x,
        residual,
        weight,
        eps,
        normed_out,
        residual_out,
        impl,
        dtype,
    )


class DcpCombine(_views.DcpCombine):
    __doc__ = _views.DcpCombine.__doc__

    def __init__(self, group: "_core.Group", batch_max: int, heads: int, dim: int, **kwargs):
        super().__init__(ARRAYS, group, batch_max, heads, dim, **kwargs)


class DpGatheredBuffer(_views.DpGatheredBuffer):
    __doc__ = _views.DpGatheredBuffer.__doc__

    def __init__(
        self,
        group: "_core.Group",
        hidden: int,
        dtype: str,
        max_tokens_per_rank: int,
        symmetric: bool = True,
    ):
        super().__init__(ARRAYS, group, hidden, dtype, max_tokens_per_rank, symmetric)


