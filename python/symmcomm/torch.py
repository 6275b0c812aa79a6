"""symmcomm for PyTorch: tensors in a group's symmetric windows, collectives on torch's current
stream (eager, inside ``torch.cuda.graph``, and under ``torch.compile`` as opaque custom
ops), the collective fused with a decode layer's residual add and RMSNorm, the
``use_symmetric_memory`` allocator scope, and start-up from torchrun's environment or from an
existing ``torch.distributed`` process group.

The hot path hands the library integers (``data_ptr``, shape, strides, a dtype code, the raw
stream handle): no DLPack per call. CPU tensors work too, on the host backend (tests)."""

from __future__ import annotations

import os
import threading
from typing import Any, Optional, Sequence, Tuple

import torch

from symmcomm import _core, _views
from symmcomm._arrays import Arrays, Raw, impl_code, norm_impl_code, reduce_code
from symmcomm._collectives import gathered_shape, normalise_dim, scattered_shape
from symmcomm.errors import CapacityError, CaptureError, DTypeError

__all__ = [
    "init_from_env",
    "init_from_process_group",
    "empty",
    "prepare",
    "prepare_hierarchical",
    "all_reduce",
    "all_reduce_",
    "all_gather",
    "reduce_scatter",
    "all_reduce_add_rmsnorm",
    "reduce_scatter_add_rmsnorm",
    "DcpCombine",
    "DpGatheredBuffer",
    "use_symmetric_memory",
    "set_graph_pool",
    "allocator",
]

#: Element-type codes of the torch dtypes symmcomm moves.
_DTYPES = {
    torch.float32: _core.dtype_code("f32"),
    torch.float16: _core.dtype_code("f16"),
    torch.bfloat16: _core.dtype_code("bf16"),
    torch.int32: _core.dtype_code("i32"),
    torch.uint8: _core.dtype_code("u8"),
}
_DTYPE_NAMES = {d: _core.dtype_name(c) for d, c in _DTYPES.items()}

_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def _current_stream(device: int) -> int:
    """torch's current stream on `device`, as a raw handle."""
    if _raw_stream is not None:
        return _raw_stream(device)
    return torch.cuda.current_stream(device).cuda_stream


def _stream_handle(device: int, stream: Any) -> Optional[int]:
    """The raw stream a call on `device` runs on: `stream` (a torch stream or a handle), else
    torch's current stream; None for CPU tensors (the host backend's own queue)."""
    if stream is not None:
        return stream.cuda_stream if hasattr(stream, "cuda_stream") else int(stream)
    if device < 0:
        return None
    return _current_stream(device)


def _dtype_code(t: torch.Tensor) -> int:
    code = _DTYPES.get(t.dtype)
    if code is None:
        raise DTypeError(
            f"torch dtype {t.dtype} is not one of float32, float16, bfloat16, int32, uint8",
            kind="DTypeMismatch",
        )
    return code


class TorchArrays(Arrays):
    """torch tensors (CUDA, or CPU on the host backend)."""

    name = "torch"

    def raw(self, t: Any, dtype: Optional[str] = None) -> Raw:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"expected a torch.Tensor, got {type(t).__name__}")
        return Raw(t.get_device(), t.data_ptr(), _dtype_code(t), tuple(t.shape), t.stride(), True)

    def take(self, buffer: "_core.DLPackBuffer") -> torch.Tensor:
        return torch.from_dlpack(buffer)

    def prefix(self, whole: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        n = 1
        for s in shape:
            n *= s
        return whole.view(-1)[:n].view(tuple(shape))

    def stream(self, device: int, stream: Any) -> Optional[int]:
        return _stream_handle(device, stream)


ARRAYS = TorchArrays()


# ---- start-up -------------------------------------------------------------------------------


def _default_device() -> Optional[int]:
    """The GPU this process uses: the only visible one, else ``LOCAL_RANK``, else torch's
    current device; None without CUDA (the host backend)."""
    if not torch.cuda.is_available():
        return None
    if torch.cuda.device_count() == 1:
        return 0
    local = os.environ.get("LOCAL_RANK")
    return int(local) if local is not None else torch.cuda.current_device()


def init_from_env(**options: Any) -> _core.Communicator:
    """This rank's communicator from torchrun's environment (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``; rank 0 serves the rendezvous on
    ``SYMMCOMM_MASTER_PORT``, else ``MASTER_PORT`` + 1 under torchrun). Options as for
    ``Communicator.from_env`` (``backend``, ``timeout``, ``device``, ``symmetric``, ...);
    ``device`` defaults to this process's GPU."""
    options.setdefault("device", _default_device())
    return _core.Communicator.from_env(**options)


def _rendezvous_host() -> str:
    return os.environ.get("SYMMCOMM_MASTER_ADDR") or os.environ.get("MASTER_ADDR") or "127.0.0.1"


def init_from_process_group(
    group: Any = None,
    *,
    addr: Optional[str] = None,
    port: Optional[int] = None,
    **options: Any,
) -> _core.Communicator:
    """A communicator over the ranks of an initialised ``torch.distributed`` process group
    (default: the world), collective over it: its rank 0 picks a free port (on `addr`:
    ``SYMMCOMM_MASTER_ADDR``, ``MASTER_ADDR`` or 127.0.0.1) and broadcasts the address with
    ``broadcast_object_list``; then every rank joins the rendezvous. Ranks are the group's.
    With an NCCL process group, set the current CUDA device first."""
    import torch.distributed as dist

    pg = group if group is not None else dist.group.WORLD
    rank = dist.get_rank(pg)
    world = dist.get_world_size(pg)
    src = dist.get_global_rank(pg, 0) if pg is not dist.group.WORLD else 0
    where: list = [None, None]
    if rank == 0:
        host = addr or _rendezvous_host()
        where = [host, port or _core.free_port(host)]
    dist.broadcast_object_list(where, src=src, group=pg)
    options.setdefault("device", torch.cuda.current_device() if torch.cuda.is_available() else None)
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    return _core.Communicator.rendezvous(
        where[0], int(where[1]), rank, world, local_rank=local_rank, **options
    )


# ---- tensors in a group's windows --------------------------------------------------------------


def empty(
    group: _core.Group,
    shape: Sequence[int],
    dtype: torch.dtype = torch.float32,
    *,
    symmetric: Optional[bool] = True,
) -> torch.Tensor:
    """An uninitialised tensor of `shape` in `group`'s symmetric windows (``symmetric=True``;
    collective when the pool grows: every rank makes the same requests in the same order), in
    plain memory (``False``), or where the policy says (``None``). It is taken by DLPack once;
    the memory goes back to the pool when torch drops the last view of it. Keep it alive while
    a CUDA graph that uses it can replay."""
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        raise DTypeError(
            f"torch dtype {dtype} is not one of float32, float16, bfloat16, int32, uint8",
            kind="DTypeMismatch",
        )
    stream = _stream_handle(group.device_code, None)
    return torch.from_dlpack(group.empty([int(s) for s in shape], name, symmetric, stream))


def prepare(group: _core.Group, nbytes: int, stream: Any = None) -> None:
    """Make `group`'s collectives up to `nbytes` safe to capture in a CUDA graph (kernels
    loaded, pool and staging grown; collective when the pool grows). Call it before
    ``torch.cuda.graph``; inside a capture of `stream` (default: torch's current stream) it
    raises :class:`~symmcomm.CaptureError` and leaves the capture intact."""
    group.prepare(nbytes, _stream_handle(group.device_code, stream))


def prepare_hierarchical(group: _core.Group, nbytes: int, stream: Any = None) -> None:
    """Make `group`'s hierarchical all-reduces (``impl="hierarchical"``) up to `nbytes` safe to
    capture: the groups of its steps (new communicators), their scratch and the piece buffer
    (collective: every rank, the same `nbytes`, before ``torch.cuda.graph``). Without it the
    first hierarchical all-reduce makes them, which a capture refuses. Raises
    :class:`~symmcomm.ImplUnavailableError` on a group that does not span hosts with the same
    number of ranks on each."""
    group.prepare_hierarchical(nbytes, _stream_handle(group.device_code, stream))


# ---- collectives -------------------------------------------------------------------------------

def _collective(
    handle: int,
    coll: int,
    x: torch.Tensor,
    out: torch.Tensor,
    reduce: int,
    dim: int,
    impl: int,
    stream: Any = None,
) -> Optional[_core.Dispatch]:
    """The hot path: integers from the two tensors, one call into the library."""
    if x.numel() == 0 and out.numel() == 0:
        return None  # nothing to move on any rank (shapes are the same on every rank)
    device = x.get_device()
    return _core.collective(
        handle,
        coll,
        reduce,
        dim,
        device,
        x.data_ptr(),
        _dtype_code(x),
        x.shape,
        x.stride(),
        out.get_device(),
        out.data_ptr(),
        _dtype_code(out),
        out.shape,
        out.stride(),
        _stream_handle(device, stream),
        impl,
    )


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def all_reduce(
    group: _core.Group,
    x: torch.Tensor,
    out: Optional[torch.Tensor] = None,
    *,
    op: str = "sum",
    impl: str = "auto",
    stream: Any = None,
) -> torch.Tensor:
    """Reduce `x` over `group` into `out` (a new tensor when None; ``out=x`` is in place) on
    `stream` (default: torch's current stream). Returns `out`; ``group.last_dispatch`` says
    which implementation ran and why. Under ``torch.compile`` it is the custom op
    ``symmcomm::all_reduce``."""
    if out is None:
        out = torch.empty_like(x)
    handle = group.handle
    if _compiling():
        if out is x:
            torch.ops.symmcomm.all_reduce_(x, handle, reduce_code(op), impl_code(impl))
        else:
            torch.ops.symmcomm.all_reduce(x, out, handle, reduce_code(op), impl_code(impl))
        return out
    _collective(handle, _core.ALL_REDUCE, x, out, reduce_code(op), -1, impl_code(impl), stream)
    return out


def all_reduce_(
    group: _core.Group,
    x: torch.Tensor,
    *,
    op: str = "sum",
    impl: str = "auto",
    stream: Any = None,
) -> torch.Tensor:
    """Reduce `x` over `group` in place (torch.distributed's all_reduce); returns `x`."""
    return all_reduce(group, x, x, op=op, impl=impl, stream=stream)


def all_gather(
    group: _core.Group,
    x: torch.Tensor,
    out: Optional[torch.Tensor] = None,
    *,
    dim: Optional[int] = None,
    impl: str = "auto",
    stream: Any = None,
) -> torch.Tensor:
    """Concatenate every rank's `x` in rank order: flat (``dim=None``; a new ``[size *
    x.numel()]`` tensor when `out` is None) or along `dim`. Returns `out`."""
    d = normalise_dim(group, "all_gather", dim, x.dim())
    if out is None:
        out = x.new_empty(gathered_shape(group, tuple(x.shape), d))
    handle = group.handle
    if _compiling():
        torch.ops.symmcomm.all_gather(x, out, handle, d, impl_code(impl))
        return out
    _collective(handle, _core.ALL_GATHER, x, out, 0, d, impl_code(impl), stream)
    return out


def reduce_scatter(
    group: _core.Group,
    x: torch.Tensor,
    out: Optional[torch.Tensor] = None,
    *,
    op: str = "sum",
    dim: Optional[int] = None,
    impl: str = "auto",
    stream: Any = None,
) -> torch.Tensor:
    """Reduce `x` over `group` and keep this rank's piece, flat or along `dim` (a new tensor
    when `out` is None). Returns `out`."""
    d = normalise_dim(group, "reduce_scatter", dim, x.dim())
    if out is None:
        out = x.new_empty(scattered_shape(group, tuple(x.shape), d))
    handle = group.handle
    if _compiling():
        torch.ops.symmcomm.reduce_scatter(x, out, handle, reduce_code(op), d, impl_code(impl))
        return out
    _collective(handle, _core.REDUCE_SCATTER, x, out, reduce_code(op), d, impl_code(impl), stream)
    return out


# ---- the collective + residual add + RMSNorm of a decode layer ---------------------------------


def _norm_tensor(t: torch.Tensor) -> tuple:
    """One tensor as the add-RMSNorm's hot path takes it."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(t).__name__}")
    return (t.get_device(), t.data_ptr(), _dtype_code(t), t.shape, t.stride())


def _add_rmsnorm_call(
    handle: int,
    form: int,
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    normed_out: torch.Tensor,
    residual_out: torch.Tensor,
    impl: int,
    stream: Any = None,
) -> Optional[_core.NormDispatch]:
    """The hot path: integers from the five tensors, one call into the library."""
    tensors = [_norm_tensor(t) for t in (x, residual, weight, normed_out, residual_out)]
    if x.numel() == 0 and residual.numel() == 0:
        return None  # no tokens on any rank (shapes are the same on every rank)
    return _core.add_rmsnorm(
        handle, form, float(eps), *tensors, _stream_handle(tensors[0][0], stream), impl
    )


#: The custom ops by (form, in place).
_NORM_OP_NAMES = {
    (_core.ALL_REDUCE, False): "all_reduce_add_rmsnorm",
    (_core.ALL_REDUCE, True): "all_reduce_add_rmsnorm_",
    (_core.REDUCE_SCATTER, False): "reduce_scatter_add_rmsnorm",
    (_core.REDUCE_SCATTER, True): "reduce_scatter_add_rmsnorm_",
}


def _add_rmsnorm(
    form: int,
    group: _core.Group,
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    normed_out: Optional[torch.Tensor],
    residual_out: Optional[torch.Tensor],
    impl: str,
    stream: Any,
) -> Tuple[torch.Tensor, torch.Tensor]:
    if normed_out is None:
        normed_out = torch.empty_like(residual)
    if residual_out is None:
        residual_out = torch.empty_like(residual)
    handle, code = group.handle, norm_impl_code(impl)
    if _compiling():
        in_place = residual_out is residual
        op = getattr(torch.ops.symmcomm, _NORM_OP_NAMES[(form, in_place)])
        if in_place:
            op(x, residual, weight, normed_out, handle, float(eps), code)
        else:
            op(x, residual, weight, normed_out, residual_out, handle, float(eps), code)
        return normed_out, residual_out
    _add_rmsnorm_call(handle, form, x, residual, weight, eps, normed_out, residual_out, code, stream)
    return normed_out, residual_out


def all_reduce_add_rmsnorm(
    group: _core.Group,
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    *,
    normed_out: Optional[torch.Tensor] = None,
    residual_out: Optional[torch.Tensor] = None,
    impl: str = "auto",
    stream: Any = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """A decode layer's all-reduce, residual add and RMSNorm in one call, on `stream` (default:
    torch's current stream): ``residual_out = residual + all_reduce(x)``, ``normed_out =
    RMSNorm(residual_out) * weight`` (`x`, `residual` and the outputs ``[tokens, hidden]``,
    `weight` ``[hidden]``; one element type, bfloat16 or float16; hidden a multiple of 8, at
    most 16384; contiguous, 16-byte aligned). The outputs are new tensors when None;
    ``residual_out=residual`` updates the residual in place. Every rank passes the same
    residual and `impl`: ``auto`` (a fused kernel by size where one runs, else ``unfused``),
    ``fused``, ``fused_ll``, ``fused_oneshot``, ``fused_twoshot``, ``unfused`` (symmcomm's
    ``auto`` all-reduce, then the separate add-RMSNorm kernel) or ``nccl`` (NCCL's regular
    all-reduce, then that kernel). Returns ``(normed_out, residual_out)``;
    ``group.last_dispatch`` (a ``NormDispatch``) says what ran. Capturable in
    ``torch.cuda.graph`` (after :func:`prepare` and one eager call); under ``torch.compile``
    the custom op ``symmcomm::all_reduce_add_rmsnorm`` (``..._`` in place)."""
    return _add_rmsnorm(
        _core.ALL_REDUCE, group, x, residual, weight, eps, normed_out, residual_out, impl, stream
    )


def reduce_scatter_add_rmsnorm(
    group: _core.Group,
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    *,
    normed_out: Optional[torch.Tensor] = None,
    residual_out: Optional[torch.Tensor] = None,
    impl: str = "auto",
    stream: Any = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`all_reduce_add_rmsnorm` after a reduce-scatter along the rows (DP attention,
    sequence parallelism): `x` is ``[tokens, hidden]`` (tokens a multiple of the group's
    size) and rank ``r`` gets rows ``[r * tokens / size, (r + 1) * tokens / size)``, so
    `residual` and the outputs are ``[tokens / size, hidden]``; ``all_gather(group, normed,
    dim=0)`` gathers the normalised rows. No ``fused_twoshot`` in this form. Under
    ``torch.compile`` the custom op ``symmcomm::reduce_scatter_add_rmsnorm``."""
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
        stream,
    )


# ---- custom ops: opaque to torch.compile and graph capture -------------------------------------


@torch.library.custom_op("symmcomm::all_reduce_", mutates_args=("x",))
def _op_all_reduce_(x: torch.Tensor, group: int, reduce: int, impl: int) -> None:
    _collective(group, _core.ALL_REDUCE, x, x, reduce, -1, impl)


@_op_all_reduce_.register_fake
def _(x, group, reduce, impl):
    return None


@torch.library.custom_op("symmcomm::all_reduce", mutates_args=("out",))
def _op_all_reduce(x: torch.Tensor, out: torch.Tensor, group: int, reduce: int, impl: int) -> None:
    _collective(group, _core.ALL_REDUCE, x, out, reduce, -1, impl)


@_op_all_reduce.register_fake
def _(x, out, group, reduce, impl):
    return None


@torch.library.custom_op("symmcomm::all_gather", mutates_args=("out",))
def _op_all_gather(x: torch.Tensor, out: torch.Tensor, group: int, dim: int, impl: int) -> None:
    _collective(group, _core.ALL_GATHER, x, out, 0, dim, impl)


@_op_all_gather.register_fake
def _(x, out, group, dim, impl):
    return None


@torch.library.custom_op("symmcomm::reduce_scatter", mutates_args=("out",))
def _op_reduce_scatter(
    x: torch.Tensor, out: torch.Tensor, group: int, reduce: int, dim: int, impl: int
) -> None:
    _collective(group, _core.REDUCE_SCATTER, x, out, reduce, dim, impl)


@_op_reduce_scatter.register_fake
def _(x, out, group, reduce, dim, impl):
    return None


@torch.library.custom_op("symmcomm::dcp_combine", mutates_args=("out", "merged_lse"))
def _op_dcp_combine(
    partial: torch.Tensor,
    lse: torch.Tensor,
    out: torch.Tensor,
    merged_lse: Optional[torch.Tensor],
    combine: int,
    batch: int,
    impl: str,
) -> None:
    _core.dcp_run(combine, batch, impl, _stream_handle(out.get_device(), None))


@_op_dcp_combine.register_fake
def _(partial, lse, out, merged_lse, combine, batch, impl):
    return None


@torch.library.custom_op("symmcomm::dp_gather", mutates_args=("gathered",))
def _op_dp_gather(
    local_input: torch.Tensor, gathered: torch.Tensor, buffer: int, step: int, impl: str
) -> None:
    _core.dp_gather(buffer, step, impl, _stream_handle(gathered.get_device(), None))


@_op_dp_gather.register_fake
def _(local_input, gathered, buffer, step, impl):
    return None


@torch.library.custom_op("symmcomm::dp_scatter", mutates_args=("local_output",))
def _op_dp_scatter(
    gathered: torch.Tensor, local_output: torch.Tensor, buffer: int, step: int, impl: str
) -> None:
    _core.dp_scatter(buffer, step, impl, _stream_handle(local_output.get_device(), None))


@_op_dp_scatter.register_fake
def _(gathered, local_output, buffer, step, impl):
    return None


@torch.library.custom_op(
    "symmcomm::all_reduce_add_rmsnorm", mutates_args=("normed_out", "residual_out")
)
def _op_all_reduce_add_rmsnorm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    normed_out: torch.Tensor,
    residual_out: torch.Tensor,
    group: int,
    eps: float,
    impl: int,
) -> None:
    _add_rmsnorm_call(
        group, _core.ALL_REDUCE, x, residual, weight, eps, normed_out, residual_out, impl
    )


@_op_all_reduce_add_rmsnorm.register_fake
def _(x, residual, weight, normed_out, residual_out, group, eps, impl):
    return None


@torch.library.custom_op("symmcomm::all_reduce_add_rmsnorm_", mutates_args=("residual", "normed_out"))
def _op_all_reduce_add_rmsnorm_(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    normed_out: torch.Tensor,
    group: int,
    eps: float,
    impl: int,
) -> None:
    _add_rmsnorm_call(group, _core.ALL_REDUCE, x, residual, weight, eps, normed_out, residual, impl)


@_op_all_reduce_add_rmsnorm_.register_fake
def _(x, residual, weight, normed_out, group, eps, impl):
    return None


@torch.library.custom_op(
    "symmcomm::reduce_scatter_add_rmsnorm", mutates_args=("normed_out", "residual_out")
)
def _op_reduce_scatter_add_rmsnorm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    normed_out: torch.Tensor,
    residual_out: torch.Tensor,
    group: int,
    eps: float,
    impl: int,
) -> None:
    _add_rmsnorm_call(
        group, _core.REDUCE_SCATTER, x, residual, weight, eps, normed_out, residual_out, impl
    )


@_op_reduce_scatter_add_rmsnorm.register_fake
def _(x, residual, weight, normed_out, residual_out, group, eps, impl):
    return None


@torch.library.custom_op(
    "symmcomm::reduce_scatter_add_rmsnorm_", mutates_args=("residual", "normed_out")
)
def _op_reduce_scatter_add_rmsnorm_(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    normed_out: torch.Tensor,
    group: int,
    eps: float,
    impl: int,
) -> None:
    _add_rmsnorm_call(
        group, _core.REDUCE_SCATTER, x, residual, weight, eps, normed_out, residual, impl
    )


@_op_reduce_scatter_add_rmsnorm_.register_fake
def _(x, residual, weight, normed_out, group, eps, impl):
    return None


# ---- the DCP combine and DP attention's gathered buffer ---------------------------------------


class DcpCombine(_views.DcpCombine):
    """The DCP combine on torch tensors (see :class:`symmcomm.DcpCombine`); `dtype` and
    `out_dtype` are torch dtypes (bfloat16 or float32); runs go on torch's current stream."""

    def __init__(
        self,
        group: _core.Group,
        batch_max: int,
        heads: int,
        dim: int,
        dtype: torch.dtype = torch.bfloat16,
        out_dtype: Optional[torch.dtype] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            ARRAYS,
            group,
            batch_max,
            heads,
            dim,
            dtype=_DTYPE_NAMES.get(dtype, str(dtype)),
            out_dtype=None if out_dtype is None else _DTYPE_NAMES.get(out_dtype, str(out_dtype)),
            **kwargs,
        )

    def run(self, batch: int, impl: str = "auto", stream: Any = None) -> Optional[_core.CombineRun]:
        """Merge `batch` tokens on `stream` (default: torch's current stream); under
        ``torch.compile`` the custom op ``symmcomm::dcp_combine`` (which returns None)."""
        if _compiling():
            torch.ops.symmcomm.dcp_combine(
                self.partial_out(batch),
                self.partial_lse(batch),
                self.output(batch),
                self.merged_lse(batch),
                self.handle,
                batch,
                impl,
            )
            return None
        return super().run(batch, impl, stream)


class DpGatheredBuffer(_views.DpGatheredBuffer):
    """DP attention's gathered buffer on torch tensors (see
    :class:`symmcomm.DpGatheredBuffer`); gathers and scatters go on torch's current stream."""

    def __init__(
        self,
        group: _core.Group,
        hidden: int,
        dtype: torch.dtype,
        max_tokens_per_rank: int,
        symmetric: bool = True,
    ) -> None:
        super().__init__(
            ARRAYS, group, hidden, _DTYPE_NAMES.get(dtype, str(dtype)), max_tokens_per_rank, symmetric
        )

    def gather(self, step: _core.DpStep, impl: str = "auto", stream: Any = None):
        """Gather every rank's rows (collective); under ``torch.compile`` the custom op
        ``symmcomm::dp_gather`` (which returns None)."""
        if _compiling():
            torch.ops.symmcomm.dp_gather(
                self.padded_input(step), self.gathered(step), self.handle, step.handle, impl
            )
            return None
        return super().gather(step, impl, stream)

    def scatter(self, step: _core.DpStep, impl: str = "auto", stream: Any = None):
        """Reduce the gathered rows, keep this rank's (collective); under ``torch.compile``
        the custom op ``symmcomm::dp_scatter``."""
        if _compiling():
            torch.ops.symmcomm.dp_scatter(
                self.gathered(step), self.padded_output(step), self.handle, step.handle, impl
            )
            return None
        return super().scatter(step, impl, stream)


# ---- use_symmetric_memory: torch's own allocations in a group's windows -----------------------

#: Bytes a scope reserves when not told (one allocation of up to this many fits without
#: growing the pool); ``SYMMCOMM_TORCH_RESERVE_BYTES`` overrides it.
DEFAULT_RESERVE_BYTES = int(os.environ.get("SYMMCOMM_TORCH_RESERVE_BYTES", 64 << 20))

_allocator = None
_pools: dict = {}
_graph_pool: Any = None
_scopes = threading.local()


def allocator() -> "torch.cuda.memory.CUDAPluggableAllocator":
    """The pluggable allocator whose functions live in symmcomm's own extension module."""
    global _allocator
    if _allocator is None:
        _allocator = torch.cuda.memory.CUDAPluggableAllocator(
            _core.__file__, _core.ALLOC_FN, _core.FREE_FN
        )
    return _allocator


def _mem_pool(group: _core.Group) -> "torch.cuda.MemPool":
    """The group's MemPool (one per group, made on first use)."""
    pool = _pools.get(group.handle)
    if pool is None:
        pool = _pools[group.handle] = torch.cuda.MemPool(allocator().allocator())
    return pool


def set_graph_pool(pool: Any) -> None:
    """Tell scopes opened during a ``torch.cuda.graph`` capture which pool the graph allocates
    from (the handle of ``torch.cuda.graph_pool_handle()`` passed to ``torch.cuda.graph`` as
    ``pool=``; ``graph.pool()`` is only known once the capture ended): they leave it on entry and
    return to it on exit, as SGLang's scope does. None forgets it."""
    global _graph_pool
    _graph_pool = pool


def _open_scopes() -> list:
    s = getattr(_scopes, "stack", None)
    if s is None:
        s = _scopes.stack = []
    return s


class SymmetricMemory:
    """The scope ``use_symmetric_memory`` returns: while open, this thread's CUDA allocations
    (``torch.empty`` and friends) come from the group's symmetric pool through a ``MemPool``
    whose allocator is symmcomm's; a no-op when :attr:`active` is False (:attr:`reason` says
    why). Every rank must open it and allocate the same sizes in the same order."""

    def __init__(
        self,
        group: _core.Group,
        disabled: bool = False,
        reserve_bytes: Optional[int] = None,
        graph_pool: Any = None,
    ) -> None:
        self.group = group
        self.reserve_bytes = DEFAULT_RESERVE_BYTES if reserve_bytes is None else int(reserve_bytes)
        self.graph_pool = graph_pool
        placement = group.placement(disabled)
        if group.device is None:
            self.active, self.reason = False, "the host backend has no CUDA allocator"
        elif placement != "symmetric":
            self.active, self.reason = False, placement
        else:
            self.active, self.reason = True, "symmetric"
        self._left: Any = None
        self._nested = False
        self._pool_ctx: Any = None

    def __enter__(self) -> "SymmetricMemory":
        if not self.active:
            return self
        stack = _open_scopes()
        if stack and stack[-1].group.handle == self.group.handle:
            self._nested = True  # the outer scope of the same group already routes here
            return self
        capturing = torch.cuda.is_current_stream_capturing()
        graph_pool = self.graph_pool if self.graph_pool is not None else _graph_pool
        if capturing and graph_pool is None:
            raise CaptureError(
                "use_symmetric_memory inside torch.cuda.graph capture needs the graph's pool: "
                "capture with pool = torch.cuda.graph_pool_handle(); "
                "torch.cuda.graph(g, pool=pool) and pass graph_pool=pool (or call "
                "symmcomm.torch.set_graph_pool(pool))",
                kind="DuringCapture",
                group=self.group.label,
                rank=self.group.rank,
                world=self.group.size,
                op="pool_alloc",
            )
        if not capturing:
            # Collective when the pool grows; never inside a capture (reserve before it).
            self.group.reserve(self.reserve_bytes, _current_stream(self.group.device))
        self._leave_routing(stack, capturing, graph_pool)
        _core.push_alloc_group(self.group.handle)
        self._pool_ctx = torch.cuda.use_mem_pool(_mem_pool(self.group), self.group.device)
        self._pool_ctx.__enter__()
        stack.append(self)
        return self

    def _leave_routing(self, stack: list, capturing: bool, graph_pool: Any) -> None:
        """torch routes an allocation to the first pool whose filter takes it, in the order
        the pools began: leave the one that would win over this scope's (an outer scope's of
        another group, else the graph's during a capture), to enter it again on exit."""
        device = self.group.device
        if stack:
            self._left = _mem_pool(stack[-1].group).id
        elif capturing:
            self._left = graph_pool
        if self._left is not None:
            torch._C._cuda_endAllocateToPool(device, self._left)

    def __exit__(self, exc_type, exc, tb) -> bool:
        if not self.active:
            return False
        if self._nested:
            self._nested = False
            return False
        stack = _open_scopes()
        if stack and stack[-1] is self:
            stack.pop()
        self._pool_ctx.__exit__(None, None, None)
        _core.pop_alloc_group(self.group.handle)
        if self._left is not None:
            # Route this thread to it again; release the use count that beginning adds.
            torch._C._cuda_beginAllocateCurrentThreadToPool(self.group.device, self._left)
            torch._C._cuda_releasePool(self.group.device, self._left)
            self._left = None
        why = _core.take_alloc_error()
        if why is not None and exc_type is not None and issubclass(exc_type, torch.OutOfMemoryError):
            raise CapacityError(
                f"torch allocation in use_symmetric_memory({self.group.label}) failed: {why}",
                kind="CapacityExceeded",
                group=self.group.label,
                rank=self.group.rank,
                world=self.group.size,
                op="pool_alloc",
            ) from exc
        return False

    def __repr__(self) -> str:
        return f"SymmetricMemory({self.group.label}, active={self.active}, reason={self.reason!r})"


def use_symmetric_memory(
    group: _core.Group,
    disabled: bool = False,
    *,
    reserve_bytes: Optional[int] = None,
    graph_pool: Any = None,
) -> SymmetricMemory:
    """The seeds' ``with use_symmetric_memory(group, disabled=...): out = torch.empty(...)``:
    allocations inside come from `group`'s symmetric windows, so collectives on them run
    zero-copy. On entry the scope reserves `reserve_bytes` (default 64 MiB) collectively, so
    that torch's allocator callback never grows the pool; a request that does not fit raises
    :class:`~symmcomm.CapacityError` (from torch's out-of-memory error). A no-op when symmetric
    memory is off, the group has one rank, the policy reserves windows for another group, or
    `disabled`. Inside ``torch.cuda.graph`` capture it needs the graph's pool (`graph_pool` or
    :func:`set_graph_pool`), which it leaves on entry and re-enters on exit; nothing is
    reserved then (reserve before capturing)."""
    return SymmetricMemory(group, disabled, reserve_bytes, graph_pool)
