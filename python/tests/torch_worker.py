"""One rank with torch on the CPU (host backend), started by launch.py: torch.compile of a
module calling the ops (the collectives, or the all-reduce + residual add + RMSNorm), or
start-up from a gloo process group."""

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


class NormBlock(torch.nn.Module):
    """A decode layer's tail: a row-parallel matmul, then the all-reduce fused with the
    residual add and RMSNorm (the residual carried in place, or returned anew)."""

    def __init__(self, group, weight, norm_weight, in_place):
        super().__init__()
        self.group = group
        self.in_place = in_place
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.norm_weight = torch.nn.Parameter(norm_weight, requires_grad=False)

    def forward(self, x, residual):
        y = (x @ self.weight).to(torch.bfloat16)
        out = residual if self.in_place else None
        normed, residual = st.all_reduce_add_rmsnorm(
            self.group, y, residual, self.norm_weight, 1e-6, residual_out=out
        )
        return normed * 2, residual


def norm_ref(parts, residual, weight, eps):
    total = torch.stack([p.double() for p in parts]).sum(0).to(torch.bfloat16).double()
    r = (residual.double() + total).to(torch.bfloat16).double()
    rms = torch.sqrt((r * r).mean(-1, keepdim=True) + torch.tensor(eps, dtype=torch.float32).item())
    return r, r / rms * weight.double()


def compile_norm_scenario() -> bool:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    comm = st.init_from_env(backend="host", timeout=60)
    tp = comm.new_group(list(range(world)), "tp")
    gen = torch.Generator().manual_seed(5)
    weights = [torch.randint(-3, 4, (16, 32), generator=gen).float() / 8 for _ in range(world)]
    norm_weight = (torch.randint(2, 15, (32,), generator=gen).float() / 8).to(torch.bfloat16)
    x = torch.randint(-3, 4, (4, 16), generator=gen).float() / 8
    residual0 = (torch.randint(-16, 17, (4, 32), generator=gen).float() / 8).to(torch.bfloat16)
    parts = [(x @ w).to(torch.bfloat16) for w in weights]
    want_res, want_norm = norm_ref(parts, residual0, norm_weight, 1e-6)
    tol = dict(rtol=4 * 2**-7, atol=4 * 2**-7)
    ok = True
    for in_place in (False, True):
        block = NormBlock(tp, weights[rank], norm_weight, in_place)
        compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
        for run in (block, compiled, compiled):
            residual = residual0.clone()
            normed, new_res = run(x, residual)
            torch.testing.assert_close(new_res.double(), want_res, **tol)
            torch.testing.assert_close(normed.double(), want_norm * 2, **tol)
            # In place the caller's residual holds the new one; otherwise it is left alone.
            if in_place:
                ok = ok and torch.equal(residual, new_res) and not torch.equal(residual, residual0)
            else:
                ok = ok and torch.equal(residual, residual0)
    ok = ok and tp.last_dispatch.name == "host_unfused"
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
    ok = {
        "compile": compile_scenario,
        "compile_norm": compile_norm_scenario,
        "process_group": process_group_scenario,
    }[scenario]()
    report({"rank": int(os.environ["RANK"]), "ok": ok})
