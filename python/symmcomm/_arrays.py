"""How one array library is handled: the adapter that the collectives, the DCP combine and the
DP gathered buffer are written against, so that NumPy (the core, host backend) and torch
(``symmcomm.torch``) share every step but the few that touch arrays.

An adapter turns an array into the integers the hot path takes (:class:`Raw`), takes
symmcomm's buffers by DLPack, and makes the views the combine and the gathered buffer hand
out (the first elements of a buffer as a contiguous array of a smaller shape).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Sequence

from symmcomm import _core
from symmcomm.errors import ArgumentError, NotContiguousError

#: Reduction codes by name.
REDUCE_CODES = {name: _core.reduce_code(name) for name in ("sum", "avg", "max", "min")}

#: Implementation codes by name, the usual ones resolved now (so that a function traced by
#: torch.compile finds them without calling into the extension), the rest as first used.
_IMPL_CODES: dict = {
    name: _core.impl_code(name)
    for name in ("auto", "nccl", "nccl_symm", "oneshot", "twoshot", "ll", "ce", "local",
                 "hierarchical", "host", "host_symm")
}

#: Add-RMSNorm implementation codes by name, likewise.
_NORM_IMPL_CODES: dict = {
    name: _core.norm_impl_code(name)
    for name in ("auto", "fused", "fused_ll", "fused_oneshot", "fused_twoshot", "unfused", "nccl")
}


def reduce_code(op: str) -> int:
    """The code of a reduction (``sum``, ``avg``, ``max``, ``min``)."""
    try:
        return REDUCE_CODES[op]
    except (KeyError, TypeError):
        return _core.reduce_code(str(op))  # raises the library's error


def impl_code(name: str) -> int:
    """The code of an implementation (``auto``, ``nccl``, ``nccl_symm``, ``host``, ``oneshot``...)."""
    code = _IMPL_CODES.get(name)
    if code is None:
        code = _IMPL_CODES[name] = _core.impl_code(name)
    return code


def norm_impl_code(name: str) -> int:
    """The code of an add-RMSNorm implementation (``auto``, ``fused``, ``fused_ll``,
    ``fused_oneshot``, ``fused_twoshot``, ``unfused``, ``nccl``; ``host_...`` on the host)."""
    code = _NORM_IMPL_CODES.get(name)
    if code is None:
        code = _NORM_IMPL_CODES[name] = _core.norm_impl_code(name)
    return code


class Raw(NamedTuple):
    """An array as the hot path takes it."""

    device: int  # -1: host memory, else the CUDA ordinal
    ptr: int
    dtype: int  # dtype code
    shape: tuple
    strides: tuple  # in elements
    writable: bool

    def tensor(self) -> tuple:
        """The five fields the add-RMSNorm's hot path takes for one tensor."""
        return (self.device, self.ptr, self.dtype, self.shape, self.strides)


class Arrays:
    """The adapter of one array library (see the module's documentation)."""

    #: The library's name, for messages.
    name = "arrays"

    def raw(self, a: Any, dtype: Optional[str] = None) -> Raw:
        raise NotImplementedError

    def take(self, buffer: "_core.DLPackBuffer") -> Any:
        """The array of a symmcomm buffer (once per allocation)."""
        raise NotImplementedError

    def prefix(self, whole: Any, shape: Sequence[int]) -> Any:
        """The first elements of the contiguous `whole` as a contiguous array of `shape`."""
        raise NotImplementedError

    def stream(self, raw: Raw, stream: Any) -> Optional[int]:
        """The raw stream handle a call runs on (None: the communicator's own)."""
        raise NotImplementedError


def group_error(cls, group: Any, op: str, message: str, nbytes: int = 0):
    """An exception of `cls` naming `group`'s rank and label, for the checks made in Python."""
    where = f"{op} on {group.label} rank {group.rank}/{group.size} ({nbytes} B)"
    return cls(
        f"{where}: {message}",
        kind="InvalidArgument",
        rank=group.rank,
        world=group.size,
        group=group.label,
        op=op,
        nbytes=nbytes,
    )


def check_pair(group: Any, op: str, x: Raw, out: Raw) -> None:
    """The output writable (the devices are checked by the library)."""
    if not out.writable:
        raise group_error(ArgumentError, group, op, "the output is read-only")


def contiguous_strides(shape: Sequence[int]) -> tuple:
    """Row-major strides (in elements) of `shape`."""
    strides = []
    acc = 1
    for d in reversed(shape):
        strides.append(acc)
        acc *= d
    return tuple(reversed(strides))


def not_contiguous(group: Any, op: str, what: str, shape, strides):
    return group_error(
        NotContiguousError,
        group,
        op,
        f"{what} is not contiguous (shape {list(shape)}, strides {list(strides)})",
    )
