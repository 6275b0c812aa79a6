"""One rank of the host backend as a process (started by launch.py): from torchrun's
environment or from a rendezvous address, a few collectives checked against the reference; or
(``hosts``) on a simulated host, the hierarchical all-reduce and the add-RMSNorm."""

from __future__ import annotations

import os
import sys

import numpy as np

import symmcomm as sc
from launch import report


def on_hosts() -> None:
    """Ranks 2h and 2h + 1 on simulated host ``sim-h``: the topology, the hierarchical
    all-reduce and the add-RMSNorm against float64 references."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    os.environ["SYMMCOMM_HOST_ID"] = f"sim-{rank // 2}"  # read when the communicator starts
    comm = sc.Communicator.from_env(backend="host", timeout=30, segment_bytes=2 << 20)
    g = comm.world
    rng = np.random.default_rng(99)
    inputs = [rng.integers(-50, 50, size=(4, 8)).astype(np.float32) for _ in range(world)]
    y = sc.all_reduce(g, inputs[rank], impl="hierarchical")
    hierarchical = g.last_dispatch.name
    ok = np.array_equal(y, np.sum(inputs, axis=0))
    parts = [rng.integers(-16, 16, size=(2, 16)) / 8 for _ in range(world)]
    residual = rng.integers(-16, 16, size=(2, 16)) / 8
    weight = rng.integers(2, 15, size=16) / 8
    normed, new_residual = sc.all_reduce_add_rmsnorm(
        g,
        parts[rank].astype(np.float16),
        residual.astype(np.float16),
        weight.astype(np.float16),
        1e-6,
    )
    total = residual + np.sum(parts, axis=0)  # exact in f16
    rms = np.sqrt(np.mean(total * total, axis=-1, keepdims=True) + float(np.float32(1e-6)))
    ok = ok and np.array_equal(new_residual.astype(np.float64), total)
    ok = ok and np.allclose(normed.astype(np.float64), total / rms * weight, rtol=3 * 2.0**-10)
    report(
        {
            "rank": rank,
            "ok": bool(ok),
            "host_id": comm.host_id,
            "source": comm.host_id_source,
            "topology": comm.topology,
            "hierarchical": hierarchical,
            "norm": g.last_dispatch.name,
        }
    )
    comm.close()


def main(how: str) -> None:
    if how == "hosts":
        on_hosts()
        return
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if how == "env":
        comm = sc.Communicator.from_env(backend="host", timeout=30, segment_bytes=2 << 20)
    else:
        port = int(os.environ["SYMMCOMM_TEST_RENDEZVOUS_PORT"])
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
