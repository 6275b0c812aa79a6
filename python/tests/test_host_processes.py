"""Ranks as processes on the host backend: start-up from torchrun's environment and from a
rendezvous address, collectives over the job's store, every process with a deadline."""

from __future__ import annotations

import os

import pytest

from launch import launch

WORKER = os.path.join(os.path.dirname(__file__), "host_worker.py")


@pytest.mark.parametrize("how", ["env", "rendezvous"])
@pytest.mark.parametrize("nproc", [1, 2, 3])
def test_processes(how, nproc):
    results = launch(WORKER, nproc, args=[how], timeout=120)
    assert [r["rank"] for r in results] == list(range(nproc))
    assert all(r["ok"] for r in results), results
    if nproc > 1:
        assert all("processes" in r["describe"] for r in results)


def test_symmcomm_master_port_wins():
    """SYMMCOMM_MASTER_PORT names the rendezvous port (torchrun's agent holds MASTER_PORT)."""
    import symmcomm as sc

    results = launch(
        WORKER, 2, args=["env"], env={"SYMMCOMM_MASTER_PORT": str(sc.free_port())}, timeout=120
    )
    assert all(r["ok"] for r in results)
