"""One rank with torch on the CPU (host backend), started by launch.py: torch.compile of a
module calling the ops, or start-up from a gloo process group."""

from __future__ import annotations

import os
import sys

import torch

import symmcomm.torch as st
from launch import report


class Block(torch.nn.Module):
    """A row-parallel linear layer: local matmul, then the TP all-reduce; and a gather."""

    def __init__(self, group, weight):
        super().__init__()
        self.group = group
        self.weight = torch.nn.Parameter(weight, requires_grad=False)

    def forward(self, x):
        y = st.all_reduce(self.group, x @ self.weight)
        return st.all_gather(self.group, torch.relu(y), dim=0) + 1


def compile_scenario() -> bool:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    comm = st.init_from_env(backend="host", timeout=60)
    tp = comm.new_group(list(range(world)), "tp")
    gen = torch.Generator().manual_seed(3)
    weights = [torch.randint(-3, 4, (8, 8), generator=gen).float() for _ in range(world)]
    x = torch.randint(-3, 4, (4, 8), generator=gen).float()
    block = Block(tp, weights[rank])
    eager = block(x)
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    got = compiled(x)
    want_y = torch.relu(sum(x @ w for w in weights))
    want = torch.cat([want_y] * world) + 1
    ok = torch.equal(eager, want) and torch.equal(got, want)
    comm.close()
    return bool(ok)


def process_group_scenario() -> bool:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    comm = st.init_from_process_group(backend="host", timeout=60)
    x = torch.full((5,), float(rank + 1))
    y = st.all_reduce(comm.world, x)
    ref = x.clone()
    dist.all_reduce(ref)
    ok = torch.equal(y, ref) and comm.rank == rank and comm.world_size == world
    comm.close()
    dist.destroy_process_group()
    return bool(ok)


if __name__ == "__main__":
    scenario = sys.argv[1]
    ok = {"compile": compile_scenario, "process_group": process_group_scenario}[scenario]()
    report({"rank": int(os.environ["RANK"]), "ok": ok})
