"""symmcomm.torch on GPUs: every scenario of gpu_worker.py in one process (RANK=0,
WORLD_SIZE=1: a machine with one GPU) and in two (one per GPU; ``hosts``: each process on its
own simulated host), each process with a deadline.
Skipped with the reason when torch or CUDA is missing (a failure under
SYMMCOMM_REQUIRE_GPU=1); the 2-process runs are skipped on a machine with one GPU."""

from __future__ import annotations

import os

import pytest

from conftest import gpu_or_skip
from launch import launch

WORKER = os.path.join(os.path.dirname(__file__), "gpu_worker.py")
SCENARIOS = [
    "ops",
    "graph",
    "norm",
    "norm_graph",
    "scope",
    "compile",
    "dcp_dp",
    "errors",
    "process_group",
    "hosts",
]
#: Seconds each rank may take (torch import, NCCL start-up, compilation included).
RANK_TIMEOUT = float(os.environ.get("SYMMCOMM_GPU_RANK_TIMEOUT", "240"))


def gpu_env() -> dict:
    # NVLink multicast stays off unless the caller turns it on (the lent machines need it off).
    return {"NCCL_NVLS_ENABLE": os.environ.get("NCCL_NVLS_ENABLE", "0")}


@pytest.mark.gpu
@pytest.mark.parametrize("nproc", [1, 2])
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_gpu(scenario, nproc):
    gpu_or_skip(nproc)
    results = launch(WORKER, nproc, args=[scenario], timeout=RANK_TIMEOUT, env=gpu_env())
    assert [r["rank"] for r in results] == list(range(nproc))
    assert all(r["ok"] for r in results), results
    print(scenario, nproc, results)


@pytest.mark.gpu
def test_gpu_deadline():
    gpu_or_skip(2)
    results = launch(WORKER, 2, args=["deadline"], timeout=RANK_TIMEOUT, env=gpu_env())
    assert results[0]["aborted"] and "timed out" in results[0]["deadline"], results
