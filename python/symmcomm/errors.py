"""The exceptions symmcomm raises: one hierarchy under :class:`SymmcommError`.

Every error that concerns a collective, a group or its memory carries what the Rust library
names: ``rank`` (in the group), ``world`` (the group's size), ``group`` (its label, ``tp#0``),
``op`` (``all_reduce``, ``pool_alloc``, ...) and ``nbytes`` (the size involved); ``kind`` is
the library's variant (``NotContiguous``, ``Timeout``, ...). Classes also derive from the
built-in exception a Python caller would expect (``ValueError`` for bad arguments,
``TypeError`` for element types, ``TimeoutError`` for deadlines, ``MemoryError`` for
capacity), so ``except ValueError`` keeps working.
"""

from __future__ import annotations

from typing import Optional

__all__ = [
    "SymmcommError",
    "ArgumentError",
    "ShapeError",
    "DTypeError",
    "NotContiguousError",
    "OverlapError",
    "ForeignBufferError",
    "ImplUnavailableError",
    "CaptureError",
    "CapacityError",
    "DisagreementError",
    "DeadlineError",
    "AbortedError",
    "BootstrapError",
    "BackendError",
]


class SymmcommError(Exception):
    """Base of every symmcomm error."""

    def __init__(
        self,
        message: str,
        *,
        kind: Optional[str] = None,
        rank: Optional[int] = None,
        world: Optional[int] = None,
        group: Optional[str] = None,
        op: Optional[str] = None,
        nbytes: Optional[int] = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.kind = kind
        self.rank = rank
        self.world = world
        self.group = group
        self.op = op
        self.nbytes = nbytes

    def __reduce__(self):  # picklable across processes (multiprocessing, torch.multiprocessing)
        return (
            _rebuild,
            (
                type(self),
                self.message,
                dict(
                    kind=self.kind,
                    rank=self.rank,
                    world=self.world,
                    group=self.group,
                    op=self.op,
                    nbytes=self.nbytes,
                ),
            ),
        )


def _rebuild(cls, message, fields):
    return cls(message, **fields)


class ArgumentError(SymmcommError, ValueError):
    """An argument is wrong (a generic check of the library or of the binding)."""


class ShapeError(ArgumentError):
    """Shapes disagree: output size, divisibility by the world size, a dimension out of range."""


class DTypeError(ArgumentError, TypeError):
    """Element types disagree, or a reduction is not defined on the element type."""


class NotContiguousError(ArgumentError):
    """A collective was given a view that is not contiguous."""


class OverlapError(ArgumentError):
    """Input and output overlap other than exactly in place."""


class ForeignBufferError(ArgumentError):
    """Memory of another group, communicator or device; or plain memory where windows are needed."""


class ImplUnavailableError(ArgumentError):
    """The implementation asked for cannot run here (backend, op, dtype, size or world)."""


class CaptureError(SymmcommError, RuntimeError):
    """Something that allocates, registers or compiles was asked for during CUDA graph capture."""


class CapacityError(SymmcommError, MemoryError):
    """A request does not fit the reserved segments or the capacity a buffer was made with."""


class DisagreementError(SymmcommError, RuntimeError):
    """Ranks passed different values where every rank must pass the same (SPMD violated)."""


class DeadlineError(SymmcommError, TimeoutError):
    """A wait ran past the communicator's deadline; the communicator is aborted."""


class AbortedError(SymmcommError, RuntimeError):
    """The communicator was aborted (a deadline, a peer's failure, or the user)."""


class BootstrapError(SymmcommError, RuntimeError):
    """The rendezvous or the environment failed (world size, duplicate rank, unreachable master)."""


class BackendError(SymmcommError, RuntimeError):
    """NCCL, CUDA or NVRTC failed, or no usable GPU."""
