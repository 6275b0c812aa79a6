"""One rank of the host backend as a process (started by launch.py): from torchrun's
environment or from a rendezvous address, a few collectives checked against the reference."""

from __future__ import annotations

import os
import sys

import numpy as np

import symmcomm as sc
from launch import report


def main(how: str) -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if how == "env":
        comm = sc.Communicator.from_env(backend="host", timeout=30, segment_bytes=2 << 20)
    else:
        port = int(os.environ["MASTER_PORT"]) + 7
        comm = sc.Communicator.rendezvous(
            "127.0.0.1", port, rank, world, backend="host", timeout=30, segment_bytes=2 << 20
        )
    g = comm.world
    assert (comm.rank, comm.world_size, g.rank, g.size) == (rank, world, rank, world)
    rng = np.random.default_rng(1234)
    inputs = [rng.integers(-50, 50, size=(6, 5)).astype(np.float32) for _ in range(world)]
    x = sc.empty(g, (6, 5), "f32")
    x[...] = inputs[rank]
    y = sc.all_reduce(g, x)
    gathered = sc.all_gather(g, inputs[rank], dim=1)
    tp = comm.new_group(list(range(world)), "tp")
    scattered = sc.reduce_scatter(tp, np.concatenate(inputs)[: 2 * world], dim=0)
    ok = (
        np.array_equal(y, np.sum(inputs, axis=0))
        and np.array_equal(gathered, np.concatenate(inputs, axis=1))
        and np.array_equal(
            scattered, (np.concatenate(inputs)[: 2 * world] * world)[2 * rank : 2 * rank + 2]
        )
    )
    report({"rank": rank, "ok": bool(ok), "impl": g.last_dispatch.name, "describe": g.describe()})
    comm.close()


if __name__ == "__main__":
    main(sys.argv[1])
