"""examples/torch_tp_decode.py on the CPU (needs torch, not a GPU; the GPU machine runs it for
real): 2 ranks, the tiny preset, `--fused`; every backend runs, tokens agree where the example
says they must, and the results file gets its rows."""

from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("torch", reason="torch is not installed")

from launch import launch  # noqa: E402

WORKER = os.path.join(os.path.dirname(__file__), "torch_example_worker.py")


def test_the_decode_example_runs_its_backends_and_checks_its_tokens(tmp_path):
    out = tmp_path / "results.json"
    args = ["--preset", "tiny", "--layers", "2", "--batch", "1,3", "--steps", "4", "--fused"]
    launch(WORKER, 2, args=[*args, "--json", str(out)], timeout=240)
    rows = json.loads(out.read_text())["rows"]
    got = sorted((r["bytes"], r["impl"]) for r in rows)
    impls = ["auto", "fused", "torch.distributed", "unfused_add_rmsnorm"]
    assert got == sorted((b, i) for b in (1, 3) for i in impls), got
    for r in rows:
        assert r["op"] == "torch_decode_step" and r["world"] == 2 and r["ok"] is True, r
        assert r["us"] > 0, r
