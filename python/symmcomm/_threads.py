"""Ranks as threads of one process: N communicators made together, one thread per rank, the
results (or the first rank's error) gathered. The host backend's tests and examples run so."""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, List

from symmcomm import _core
from symmcomm.errors import DeadlineError


def run_threads(
    world_size: int,
    body: Callable[[_core.Communicator], Any],
    *,
    join_timeout: float = 600.0,
    **options: Any,
) -> List[Any]:
    """Run ``body(comm)`` on `world_size` thread ranks and return each rank's result, rank
    order. The communicators are made first, together (``Communicator.threads``), with
    `options` (``backend="host"`` unless given, ``timeout``, ...); each thread closes its own
    when `body` returns. If a rank raises, the first failing rank's exception is raised after
    every thread ended. Threads still running after `join_timeout` seconds are aborted
    (``abort_all``) and a :class:`DeadlineError` is raised."""
    options.setdefault("backend", "host")
    comms = _core.Communicator.threads(world_size, **options)
    results: List[Any] = [None] * world_size
    errors: List[BaseException] = [None] * world_size  # type: ignore[list-item]

    def rank_main(rank: int) -> None:
        comm = comms[rank]
        try:
            results[rank] = body(comm)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            errors[rank] = e
            comm.abort(f"rank {rank} raised {type(e).__name__}: {e}")
        finally:
            try:
                comm.close()
            except BaseException as e:  # noqa: BLE001
                if errors[rank] is None:
                    errors[rank] = e

    threads = [
        threading.Thread(target=rank_main, args=(r,), name=f"symmcomm-rank-{r}", daemon=True)
        for r in range(world_size)
    ]
    for t in threads:
        t.start()
    deadline = time.monotonic() + join_timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    alive = [t.name for t in threads if t.is_alive()]
    if alive:
        _core.abort_all(f"run_threads: {alive} still running after {join_timeout} s")
        for t in threads:
            t.join(10.0)
        raise DeadlineError(f"run_threads: {alive} did not finish within {join_timeout} s")
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise first
    return results
