"""symmcomm: collectives for LLM-inference parallelism (tensor parallel, DP attention, decode
context parallel) on NCCL symmetric memory and our own NVLink kernels, from Python.

The core package (this module) needs no torch: communicators, groups, symmetric buffers
handed over by DLPack, and collectives on NumPy arrays (host backend). ``symmcomm.torch``
adds torch tensors on torch's current stream, graph capture, custom ops and the
``use_symmetric_memory`` allocator scope.

Start-up: :meth:`Communicator.from_env` (torchrun's variables), :meth:`Communicator.rendezvous`
(an address every rank was told), :meth:`Communicator.threads` / :func:`run_threads` (ranks
as threads, host backend). Groups: ``comm.world``, ``comm.new_group(ranks, kind)``,
``comm.new_groups(lists, kind)``, ``comm.split(kind, color)``. A decode layer's collective
with the residual add and RMSNorm after it: :func:`all_reduce_add_rmsnorm`,
:func:`reduce_scatter_add_rmsnorm`. Hosts: ``comm.host_id``, ``comm.topology``,
``group.topology``; ``impl="hierarchical"`` for all-reduces of groups across hosts.
"""

from __future__ import annotations

from symmcomm import _core
from symmcomm._core import (
    CombineRun,
    Communicator,
    Dispatch,
    DLPackBuffer,
    DpStep,
    Group,
    NormDispatch,
    abort_all,
    free_port,
)
from symmcomm._env import nccl_env
from symmcomm._host import (
    DcpCombine,
    DpGatheredBuffer,
    all_gather,
    all_reduce,
    all_reduce_,
    all_reduce_add_rmsnorm,
    empty,
    reduce_scatter,
    reduce_scatter_add_rmsnorm,
)
from symmcomm._threads import run_threads
from symmcomm.errors import (
    AbortedError,
    ArgumentError,
    BackendError,
    BootstrapError,
    CapacityError,
    CaptureError,
    DeadlineError,
    DisagreementError,
    DTypeError,
    ForeignBufferError,
    ImplUnavailableError,
    NotContiguousError,
    OverlapError,
    ShapeError,
    SymmcommError,
)

__version__ = _core.__version__

__all__ = [
    "Communicator",
    "Group",
    "DLPackBuffer",
    "Dispatch",
    "NormDispatch",
    "CombineRun",
    "DpStep",
    "DcpCombine",
    "DpGatheredBuffer",
    "empty",
    "all_reduce",
    "all_reduce_",
    "all_gather",
    "reduce_scatter",
    "all_reduce_add_rmsnorm",
    "reduce_scatter_add_rmsnorm",
    "run_threads",
    "nccl_env",
    "free_port",
    "abort_all",
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
