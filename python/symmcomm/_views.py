"""The DCP combine and DP attention's gathered buffer on arrays, written once against an
:class:`~symmcomm._arrays.Arrays` adapter. Their buffers are taken by DLPack once, when they
are made; every view afterwards is an array view, and every run goes by handle to the hot
path."""

from __future__ import annotations

from typing import Any, Optional

from symmcomm import _core
from symmcomm._arrays import Arrays, group_error
from symmcomm.errors import ArgumentError


class DcpCombine:
    """The DCP combine (``cp_lse_ag_out_rs``) of one rank: write the attention's partial output
    into :meth:`partial_out` ``[B, H, D]`` and its LSE into :meth:`partial_lse` ``[B, H]``
    (f32), call :meth:`run`, read this rank's heads from :meth:`output` ``[H/N, B, D]`` (head
    ``h`` is global head ``rank * H/N + h``) and, if asked, :meth:`merged_lse` ``[B, H/N]``.

    Made collectively (every rank of `group`, same arguments, outside graph capture); every
    run is collective too (same batch, same implementation) and can be captured."""

    def __init__(
        self,
        arrays: Arrays,
        group: Any,
        batch_max: int,
        heads: int,
        dim: int,
        dtype: str = "bf16",
        out_dtype: Optional[str] = None,
        lse_base: str = "2",
        merged_lse: bool = False,
        fused: bool = True,
        disabled: bool = False,
        stream: Any = None,
    ) -> None:
        self.group = group
        self._arrays = arrays
        self._core = _core.DcpCombine(
            group,
            batch_max,
            heads,
            dim,
            dtype,
            out_dtype,
            lse_base,
            merged_lse,
            fused,
            disabled,
            arrays.stream(group.device_code, stream),
        )
        self.handle = self._core.handle
        self.spec = self._core.spec()
        self.heads_local = self._core.heads_local
        self._whole = {k: arrays.take(v) for k, v in self._core.buffers().items()}

    def _check(self, batch: int) -> None:
        if not 0 <= batch <= self.spec["batch_max"]:
            raise group_error(
                ArgumentError,
                self.group,
                "dcp_combine",
                f"batch {batch} exceeds the combine's batch_max {self.spec['batch_max']}",
            )

    def _view(self, name: str, batch: int, shape: tuple) -> Any:
        self._check(batch)
        return self._arrays.prefix(self._whole[name], shape)

    def partial_out(self, batch: int) -> Any:
        """Where the attention writes its partial output: ``[batch, H, D]``."""
        return self._view("partial_out", batch, (batch, self.spec["heads"], self.spec["dim"]))

    def partial_lse(self, batch: int) -> Any:
        """Where the attention writes its LSE: ``[batch, H]`` f32 (±inf or NaN: no tokens)."""
        return self._view("partial_lse", batch, (batch, self.spec["heads"]))

    def output(self, batch: int) -> Any:
        """This rank's merged heads after a run: ``[H/N, batch, D]``."""
        return self._view("output", batch, (self.heads_local, batch, self.spec["dim"]))

    def merged_lse(self, batch: int) -> Optional[Any]:
        """The merged LSE of this rank's heads: ``[batch, H/N]`` f32, when asked for."""
        if "merged_lse" not in self._whole:
            self._check(batch)
            return None
        return self._view("merged_lse", batch, (batch, self.heads_local))

    def unavailable(self, impl: str) -> Optional[str]:
        """Why `impl` cannot run this combine, or None."""
        return self._core.unavailable(impl)

    def run(self, batch: int, impl: str = "auto", stream: Any = None) -> "_core.CombineRun":
        """Merge `batch` tokens (`impl`: ``auto``, ``nccl``, ``nccl_symm``, ``fused``, ...)."""
        device = self.group.device_code
        return _core.dcp_run(self.handle, batch, impl, self._arrays.stream(device, stream))


class DpGatheredBuffer:
    """DP attention's gathered buffer: made once at a capacity every rank agrees on; per batch,
    :meth:`step` agrees every rank's token count, the attention writes this rank's rows into
    :meth:`local_input`, :meth:`gather` fills :meth:`gathered` (rank ``r``'s rows at
    ``step.rows_of(r)``), the MLP writes its partial sums in place, :meth:`scatter` leaves this
    rank's reduced rows in :meth:`local_output`."""

    def __init__(
        self,
        arrays: Arrays,
        group: Any,
        hidden: int,
        dtype: str,
        max_tokens_per_rank: int,
        symmetric: bool = True,
        stream: Any = None,
    ) -> None:
        self.group = group
        self._arrays = arrays
        self._core = _core.DpGatheredBuffer(
            group,
            hidden,
            dtype,
            max_tokens_per_rank,
            symmetric,
            arrays.stream(group.device_code, stream),
        )
        self.handle = self._core.handle
        self.spec = self._core.spec()
        self.is_symmetric = self._core.is_symmetric
        self._whole = {k: arrays.take(v) for k, v in self._core.buffers().items()}

    def step(
        self, local_count: int, cuda_graph: bool = False, mode: Optional[str] = None
    ) -> "_core.DpStep":
        """Agree on this batch's token counts (collective, host-side)."""
        return self._core.step(local_count, cuda_graph, mode)

    def _rows(self, step: "_core.DpStep", which: str, whole: str) -> Any:
        n = self._core.rows(step, which)
        return self._whole[whole][:n]

    def local_input(self, step: "_core.DpStep") -> Any:
        """This rank's ``[count, hidden]`` send rows: the attention writes here."""
        return self._rows(step, "local_input", "local_input")

    def padded_input(self, step: "_core.DpStep") -> Any:
        """The send rows as the gather reads them (``[local_rows, hidden]``, padding included)."""
        return self._rows(step, "padded_input", "local_input")

    def gathered(self, step: "_core.DpStep") -> Any:
        """The gathered ``[global_rows, hidden]`` rows."""
        return self._rows(step, "gathered", "gathered")

    def local_output(self, step: "_core.DpStep") -> Any:
        """This rank's ``[count, hidden]`` rows after the scatter."""
        return self._rows(step, "local_output", "local_output")

    def padded_output(self, step: "_core.DpStep") -> Any:
        """The receive rows as the scatter writes them (``[local_rows, hidden]``)."""
        return self._rows(step, "padded_output", "local_output")

    def gather(
        self, step: "_core.DpStep", impl: str = "auto", stream: Any = None
    ) -> Optional["_core.Dispatch"]:
        """Gather every rank's rows (collective); None when no rank had tokens."""
        device = self.group.device_code
        return _core.dp_gather(self.handle, step.handle, impl, self._arrays.stream(device, stream))

    def scatter(
        self, step: "_core.DpStep", impl: str = "auto", stream: Any = None
    ) -> Optional["_core.Dispatch"]:
        """Reduce the gathered rows across ranks, keep this rank's (collective)."""
        device = self.group.device_code
        return _core.dp_scatter(
            self.handle, step.handle, impl, self._arrays.stream(device, stream)
        )

    def scatter_from(
        self, step: "_core.DpStep", partial: Any, impl: str = "auto", stream: Any = None
    ) -> Optional["_core.Dispatch"]:
        """Reduce the caller's ``[global_rows, hidden]`` partial sums, keep this rank's rows."""
        r = self._arrays.raw(partial)
        return _core.dp_scatter_from(
            self.handle,
            step.handle,
            r.device,
            r.ptr,
            r.dtype,
            r.shape,
            r.strides,
            impl,
            self._arrays.stream(r.device, stream),
        )
